"""Flower settings for governed tasks.

Use: ``celery -A workers.app flower --conf=config/flowerconfig.py``.

Flower reads this file with ``--conf`` (tornado options, plain Python run before Flower builds
its web application). Command-line options given after it win; ``FLOWER_<OPTION>`` environment
variables are read first, so the options set here win over them: that is why basic auth is not
set here. Give it in the environment, never on the command line (where ``ps`` shows it to every
user of the machine)::

    export FLOWER_BASIC_AUTH=admin:choose-a-password      # user:password[,user2:password2]

Flower listens on 127.0.0.1 (its basic auth travels in plain HTTP): set ``FLOWER_ADDRESS``
(read here) or pass ``--address`` to listen elsewhere, e.g. ``--address=0.0.0.0`` inside a
container whose port the host publishes on its own loopback (docker-compose.yml does).

What the governance layer puts where (every governed outcome is a Celery task event):

- ``result``: the reason, first line, of DENIED, HELD, DEFERRED, SHADOWED, SUGGESTED and
  REJECTED tasks, and of a governed task that FAILED (a limit names its policy setting); a held
  task's result goes on with its context, requester, approvals so far, expiry and the
  ``govctl held approve ID --key PATH`` command that decides it. The task list shows that first
  line in full, wrapped (``governance.flower``), with filters for the governance states;
- ``args`` / ``kwargs``: the call, with the values of secret-named keys (password, token,
  secret, api_key, authorization, ...) shown as ``***``;
- ``received``: when the task was received, or held or denied at publish time; ``started``:
  none while the task waits (DEFERRED, HELD), until it runs;
- ``worker``: the worker that ran it; none for a task only a publisher or ``govctl`` saw;
- ``tenant``: the governed task's tenant (a column of its own);
- the **Tenants** page (``/tenants``, in the navigation bar; ``/api/tenants`` in JSON): per
  tenant, running, waiting, the oldest wait, its share of the worker time over the last minute,
  its weight and whether it is paused, as ``govctl status`` shows them.
"""

import os

from governance.flower import format_task, use_governance_templates

# Flower's pages, with the task list extended for the governance states.
use_governance_templates()

# Loopback unless told otherwise (FLOWER_ADDRESS, or --address on the command line).
address = os.environ.get("FLOWER_ADDRESS", "127.0.0.1")

# The task list: the tenant, and the result column shows the governance reason next to the state.
tasks_columns = "name,uuid,state,tenant,result,received,started,runtime,worker"

# format_task, imported above, is a Flower option too: what the task list and the task pages
# show of a task (see governance.flower.format_task).
__all__ = ["address", "format_task", "tasks_columns"]
