"""The maintenance leader's lock: one worker of a deployment does the leader's work at a time.

The lock is a key holding the leader's id with an expiry; the leader renews it every round, and
it lapses after a few rounds without renewal, so another worker takes over when the leader dies.
Renewal extends the expiry only if the key still holds this process's id, in one step: a lock
that lapsed and was taken by another worker between a read and a renewal would otherwise be
extended for it.
"""

from __future__ import annotations

from governance.store.keys import DeploymentKeys
from governance.store.state import StateStore

#: Extend a lock's expiry if it still holds this process's id.
RENEW_IF_MINE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class LeaderLock:
    """The deployment's maintenance lock, as held (or not) by one process."""

    def __init__(self, state: StateStore, me: str, ttl_ms: int) -> None:
        self._state = state
        self._me = me
        self._ttl_ms = ttl_ms

    def take_or_keep(self) -> bool:
        """Take the lock if it is free, or extend it if it is ours: whether we lead now."""
        key = DeploymentKeys.maintenance_leader
        client = self._state.client

        def lead() -> bool:
            if client.set(key, self._me, nx=True, px=self._ttl_ms):
                return True
            return bool(client.eval(RENEW_IF_MINE, 1, key, self._me, self._ttl_ms))

        return bool(self._state.run("maintenance lock", lead))
