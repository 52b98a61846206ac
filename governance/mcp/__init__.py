"""An MCP server for a governed deployment: any agent that speaks the Model Context Protocol
calls the deployment's governed tools (``govctl mcp serve``, on the official ``mcp`` SDK).

- :mod:`~governance.mcp.catalog`: the app's governed tool tasks, their input schemas, and which
  of them an agent of a tenant may see (the policy, without its hooks);
- :mod:`~governance.mcp.gateway`: publishing a call through the governance publisher, and
  reading where its task is (ledger, held store, result backend), who owns it, cancelling it;
- :mod:`~governance.mcp.status`: where a task is, in words (progress notifications);
- :mod:`~governance.mcp.server`: ``tools/list`` and ``tools/call`` (progress, timeout, result by
  id, cancellation) on the SDK's low-level server;
- :mod:`~governance.mcp.serve`: the stdio and streamable HTTP transports, bearer tokens;
- :mod:`~governance.mcp.tokens`: the token file (hashes only; constant-time comparison);
- :mod:`~governance.mcp.settings`: ``GOVERNANCE_MCP_*``.

The ``mcp`` SDK is an optional dependency (``pip install 'celery-governance[mcp]'``); only
:mod:`~governance.mcp.tokens`, :mod:`~governance.mcp.status` and
:mod:`~governance.mcp.settings` import without it. See docs/mcp.md.
"""
