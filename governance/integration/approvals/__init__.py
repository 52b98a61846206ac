"""The approvals wing, split by caller.

- :mod:`~governance.integration.approvals.gate`: "is this call released?", asked by the
  publisher and the worker (grants and signed releases, verified);
- :mod:`~governance.integration.approvals.holding`: putting a call in the held store (publisher,
  worker);
- :mod:`~governance.integration.approvals.reviewers`: the reviewers' workflow (``govctl``, and
  the maintenance thread for expired holds);
- :mod:`~governance.integration.approvals.notify`: telling reviewers that something waits.

It imports only the floor of the integration layer (the runtime and its helpers).
"""

from governance.integration.approvals.gate import COST_ALERT, ApprovalGate
from governance.integration.approvals.holding import Holding
from governance.integration.approvals.reviewers import ApprovalOutcome, Reviewers

__all__ = ["COST_ALERT", "ApprovalGate", "ApprovalOutcome", "Holding", "Reviewers"]
