"""Flower settings for governed tasks.

Use: ``celery -A workers.app flower --conf=config/flowerconfig.py``.

Flower reads this file with ``--conf`` (tornado options, plain Python assignments). Command-line
options given after it win; ``FLOWER_<OPTION>`` environment variables are read first, so the
options set here win over them: that is why basic auth is not set here. Give it in the
environment, never on the command line (where ``ps`` shows it to every user of the machine)::

    export FLOWER_BASIC_AUTH=admin:choose-a-password      # user:password[,user2:password2]

What the governance layer puts where (every governed outcome is a Celery task event):

- ``result``: the reason, first line, of DENIED, HELD, DEFERRED, SHADOWED, SUGGESTED and
  REJECTED tasks (a held task's result goes on with its context, requester, approvals so far,
  expiry and the ``govctl held approve ID --key PATH`` command that decides it);
- ``args`` / ``kwargs``: the call, with the values of secret-named keys (password, token,
  secret, api_key, authorization, ...) shown as ``***``;
- ``received``: when the task was received, or held or denied at publish time.
"""

# The task list: the result column shows the governance reason next to the state.
tasks_columns = "name,uuid,state,result,received,started,runtime,worker"
