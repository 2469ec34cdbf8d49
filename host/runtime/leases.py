"""Which host of a fleet drives which agent: a lease per host, renewed while it lives.

Why one lease per host, not per agent: a host drives hundreds of agents; renewing each
agent's lease would be hundreds of commits a second for nothing. An agent's claim
(``Lifecycle.owner`` in its record) names its host's lease; the lease, in the store's
kv space (namespace :data:`NAMESPACE`), says until when that host is alive. A host that
dies stops renewing; once its lease has expired, its agents are ``resumable`` by every
other host, and the first whose claim commits drives them from their last checkpoint.

Why in the store rather than beside it: a claim reads the lease it overrides in the same
transaction, and the fleet store (``snapshots.nats_store``) commits a transaction only on
the view of the latest commit, so two hosts cannot both take one agent over, and a host
whose agent was taken over cannot commit a step of it any more (``AgentCommits`` fences on
the record's owner and audit sequence).

Time: an expiry is a wall-clock time written by the renewing host and read by the others;
hosts' clocks must agree to well within the lease (NTP does, on one machine trivially).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from host.errors import ConfigError

__all__ = ["DEFAULT_LEASE_S", "NAMESPACE", "HostLease", "lease_expired"]

#: The kv namespace of the hosts' leases, by lease id.
NAMESPACE = "fleet.leases"
DEFAULT_LEASE_S = 3.0


def lease_expired(txn: Any, lease_id: str, now: float) -> bool:
    """Whether the lease ``lease_id`` is missing or past its expiry, as ``txn`` sees it."""
    raw = txn.kv_get(NAMESPACE, lease_id)
    if raw is None:
        return True
    try:
        return bool(float(json.loads(raw)["expires_at"]) <= now)
    except (ValueError, KeyError, TypeError):  # unreadable: nobody can be shown to hold it
        return True


@dataclass
class HostLease:
    """This process's lease: its id (host, pid, a random part) and its length."""

    lease_s: float
    lease_id: str = ""
    renewed_at: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lease_s, (int, float)) and 0.2 <= self.lease_s <= 3600):
            raise ConfigError(f"a lease is 0.2 to 3600 seconds, got {self.lease_s!r}")
        if not self.lease_id:
            self.lease_id = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    def renew(self, store: Any) -> float:
        """Extend the lease by ``lease_s`` from now (one commit); the new expiry."""
        now = time.time()
        expires = now + self.lease_s
        body = json.dumps({"expires_at": expires, "renewed_at": now, "host": socket.gethostname(),
                           "pid": os.getpid(), "lease_s": self.lease_s}).encode()
        store.transact(lambda t: t.kv_set(NAMESPACE, self.lease_id, body))
        self.renewed_at = now
        return expires

    def release(self, store: Any) -> None:
        """Give the lease up (a clean stop): this host's agents are free at once."""
        store.transact(lambda t: t.kv_delete(NAMESPACE, self.lease_id))

    @staticmethod
    def holders(store: Any, now: float | None = None) -> list[dict[str, Any]]:
        """Every lease in the store, with whether it is live (``torpor fleet status``)."""
        now = time.time() if now is None else now
        out = []
        with store.read() as r:
            for key in r.kv_keys(NAMESPACE):
                raw = r.kv_get(NAMESPACE, key)
                try:
                    body = json.loads(raw) if raw is not None else {}
                except ValueError:
                    body = {}
                out.append({"lease": key, **body, "live": not lease_expired(r, key, now)})
        return out
