"""The credential broker: secrets leased per agent and tool, handed to host-side tools only.

How a secret travels: a policy grants a tool by name the credentials it may
use (``credentials = ["erp_token"]`` in ``[tools."erp.query"]``). At spawn the
host asks :meth:`VaultBroker.check` to refuse the agent if one of them is not
in the vault or the vault key is wrong, before a single instruction runs. At
each call of that tool the host asks :meth:`VaultBroker.secrets_for`, which
holds a *lease* per (agent, tool, credential): issued on first use, renewed
transparently while the agent keeps working, replaced by a fresh one if it
ran out while the agent was idle (waiting on a human for days, say), and
revoked when the agent terminates. The values go into the tool's
``ToolContext.secrets`` and nowhere else: not into the guest (which only sees
the tool's result), not into the journal, snapshots or the audit log (which
record the lease ids and expiry, never a value).

The mapping a tool receives is lease-backed: reading a value after the lease
was revoked (say, a tool that kept the mapping in a background thread after
the agent ended) raises :class:`LeaseRevoked`; reading it after the lease
expired renews it on the spot, as long as the agent is still alive.

Leases live in the broker's memory: they are permissions of a running host,
not durable state. After a crash the next host simply leases anew, and the
audit log (``credential.leased``, ``credential.renewed``,
``credential.revoked``) is the durable record of who held what, when.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from host.errors import ConfigError, TorporError
from host.trust.vault import Vault

DEFAULT_LEASE_TTL_S = 300.0
MAX_REMEMBERED_DEAD = 100_000

EventSink = Callable[[str, dict[str, Any]], None]


class CredentialBroker(Protocol):
    """Hands tools the secrets their grant names, on the host side only.

    ``check`` runs at spawn and refuses a policy naming a credential that does
    not exist; ``secrets_for`` leases (or renews) the named secrets for one
    call (its lease events, for the audit log, go to ``on_event``); ``revoke``
    ends every lease of an agent when it terminates. :class:`VaultBroker` is the
    one backed by the store's own vault.
    """

    def check(self, agent_id: str, policy: Any) -> None: ...

    def secrets_for(self, agent_id: str, tool: str, names: tuple[str, ...], *,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, str]: ...

    def revoke(self, agent_id: str) -> list[str]: ...


def scrub_values(broker: CredentialBroker | None, agent_id: str, names: tuple[str, ...],
                 leased: dict[str, str]) -> list[str]:
    """Every secret value an answer to this agent must not carry: the call's leased ones and
    the others its policy names (``broker.scrub_values``, when the broker offers it)."""
    values = list(dict.values(leased))  # the raw values: no lease check, no renewal event
    more = getattr(broker, "scrub_values", None)
    if more is not None and names:
        values += more(agent_id, names)
    return values


def bindings(secrets: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """The hosts each leased secret is bound to (empty: unbound)."""
    of = getattr(secrets, "bindings", None)
    return dict(of()) if of is not None else {}


class CredentialError(TorporError):
    """A credential cannot be brokered."""

    code = "credential"


class CredentialMissing(CredentialError):
    """A policy names a credential the vault does not hold: the agent is refused at spawn."""

    code = "credential_missing"


class LeaseRevoked(CredentialError):
    """The lease behind a secret was revoked (its agent terminated); the value is no longer available."""

    code = "lease_revoked"


@dataclass
class Lease:
    """One agent's permission to hand one credential to one tool, until ``expires_at``."""

    lease_id: str
    agent_id: str
    tool: str
    name: str
    issued_at: float
    expires_at: float
    renewals: int = 0
    revoked_at: float | None = None
    value: str = field(default="", repr=False)
    hosts: tuple[str, ...] = ()  # the operator's binding: the hosts it may be sent to (empty: unbound)

    def active(self, now: float) -> bool:
        return self.revoked_at is None and now < self.expires_at

    def public(self) -> dict[str, Any]:
        """What the audit log records of a lease: ids and times, never the value."""
        return {"lease_id": self.lease_id, "name": self.name, "tool": self.tool, "issued_at": self.issued_at,
                "expires_at": self.expires_at, "renewals": self.renewals}


class LeasedSecrets(dict[str, str]):
    """The ``ToolContext.secrets`` mapping: each read checks (and if need be renews) its lease."""

    def __init__(self, broker: VaultBroker, leases: dict[str, Lease], on_event: EventSink | None) -> None:
        super().__init__({name: lease.value for name, lease in leases.items()})
        self._broker = broker
        self._leases = leases
        self._on_event = on_event

    def __getitem__(self, name: str) -> str:
        lease = self._leases[name]
        return self._broker._value(lease, self._on_event)

    def get(self, name: str, default: Any = None) -> Any:
        if name not in self._leases:
            return default
        return self[name]

    def __repr__(self) -> str:  # never print values, even in a traceback
        return f"LeasedSecrets({sorted(self._leases)})"

    def bindings(self) -> dict[str, tuple[str, ...]]:
        """The hosts each secret may be sent to, as the operator bound it in the vault."""
        return {name: lease.hosts for name, lease in self._leases.items()}

    def values(self) -> Any:
        return [self[n] for n in self._leases]

    def items(self) -> Any:
        return [(n, self[n]) for n in self._leases]


class VaultBroker:
    """A :class:`CredentialBroker` backed by the local :class:`~host.trust.vault.Vault`.

    ``lease_ttl_s``: how long a lease lasts without use; a lease with less
    than half of that left is renewed when its tool is called again.
    ``clock`` is for tests.
    """

    def __init__(self, vault: Vault, *, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if lease_ttl_s <= 0:
            raise ConfigError("the lease lifetime must be positive")
        self.vault = vault
        self.lease_ttl_s = float(lease_ttl_s)
        self.clock = clock
        self._lock = threading.RLock()
        self._leases: dict[tuple[str, str, str], Lease] = {}
        # Agents whose leases were revoked (bounded: only agents that held a lease, most recent first).
        self._dead: OrderedDict[str, None] = OrderedDict()
        # Per live agent, the values of every credential its policy names: what answers are scrubbed of.
        self._scrub: dict[str, dict[str, str]] = {}

    @classmethod
    def for_store(cls, store_dir: str | Path | None, *, key_file: str | Path | None = None,
                  lease_ttl_s: float = DEFAULT_LEASE_TTL_S) -> VaultBroker:
        """The broker of a store directory (``None``: the default store, as :class:`Host` resolves it)."""
        if store_dir is None:
            from host.paths import default_store_dir

            store_dir = default_store_dir()
        return cls(Vault(store_dir, key_file=key_file), lease_ttl_s=lease_ttl_s)

    # -- CredentialBroker --------------------------------------------------------
    def check(self, agent_id: str, policy: Any) -> None:
        """Refuse (before the agent starts) a policy naming a credential the vault cannot supply."""
        wanted = [(tool, name) for tool, grant in policy.grants.items() for name in (grant.credentials or ())]
        if not wanted:
            return  # no vault, no key needed
        have = self.vault.names()
        for tool, name in wanted:
            if name not in have:
                raise CredentialMissing(
                    f"policy `{policy.agent.name}` gives tool `{tool}` the credential `{name}`, which is not in the "
                    f"vault {self.vault.path}; add it with `torpor secrets set {name}` (value on stdin), "
                    "then run the agent again")
        self.vault.check_key()
        with self._lock:
            self._dead.pop(agent_id, None)

    def secrets_for(self, agent_id: str, tool: str, names: tuple[str, ...], *,
                    on_event: EventSink | None = None) -> dict[str, str]:
        """Lease (or renew) ``names`` for one call of ``tool``; the values, host side only."""
        now = self.clock()
        leases: dict[str, Lease] = {}
        with self._lock:
            if agent_id in self._dead:
                raise LeaseRevoked(f"agent {agent_id} has terminated; its credentials were revoked")
            need = [n for n in names if not self._usable(agent_id, tool, n, now)]
            values = self.vault.get_bound(need) if need else {}
            for name in names:
                leases[name] = self._lease(agent_id, tool, name, now, values.get(name), on_event)
        return LeasedSecrets(self, leases, on_event)

    def scrub_values(self, agent_id: str, names: tuple[str, ...]) -> list[str]:
        """The values of ``names`` (every credential the agent's policy names), for scrubbing
        answers only: a tool of one grant must not hand the guest another grant's secret."""
        with self._lock:
            known = self._scrub.setdefault(agent_id, {})
            need = [n for n in names if n not in known]
            if need:
                have = self.vault.names()
                known.update(self.vault.get_many([n for n in need if n in have]))
            return [known[n] for n in names if n in known]

    def revoke(self, agent_id: str) -> list[str]:
        """End every lease of the agent (it terminated); the names of the credentials it held."""
        now = self.clock()
        names: set[str] = set()
        with self._lock:
            self._scrub.pop(agent_id, None)
            for key in [k for k in self._leases if k[0] == agent_id]:
                lease = self._leases.pop(key)
                lease.revoked_at = now
                lease.value = ""
                names.add(lease.name)
            if names:
                self._dead[agent_id] = None
                while len(self._dead) > MAX_REMEMBERED_DEAD:
                    self._dead.popitem(last=False)
        return sorted(names)

    # -- leases ------------------------------------------------------------------
    def leases(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        """The leases this broker holds (active or expired-but-unreplaced), without values."""
        with self._lock:
            return [dict(lease.public(), agent_id=lease.agent_id, active=lease.active(self.clock()))
                    for lease in self._leases.values() if agent_id is None or lease.agent_id == agent_id]

    def _usable(self, agent_id: str, tool: str, name: str, now: float) -> bool:
        lease = self._leases.get((agent_id, tool, name))
        return lease is not None and lease.active(now) and bool(lease.value)

    def _lease(self, agent_id: str, tool: str, name: str, now: float, value: tuple[str, tuple[str, ...]] | None,
               on_event: EventSink | None) -> Lease:
        key = (agent_id, tool, name)
        lease = self._leases.get(key)
        if lease is not None and lease.active(now) and lease.value:
            if lease.expires_at - now < self.lease_ttl_s / 2:
                self._renew(lease, now, on_event)
            return lease
        assert value is not None
        previous = lease
        lease = Lease(uuid.uuid4().hex, agent_id, tool, name, now, now + self.lease_ttl_s, value=value[0],
                      hosts=value[1])
        self._leases[key] = lease
        data = lease.public()
        if previous is not None:
            data.update(replaces=previous.lease_id, reason="the previous lease expired",
                        previous_expired_at=previous.expires_at)
            previous.value = ""
        _emit(on_event, "credential.leased", data)
        return lease

    def _renew(self, lease: Lease, now: float, on_event: EventSink | None) -> None:
        lease.expires_at = now + self.lease_ttl_s
        lease.renewals += 1
        _emit(on_event, "credential.renewed", {"lease_id": lease.lease_id, "name": lease.name, "tool": lease.tool,
                                               "expires_at": lease.expires_at, "renewals": lease.renewals})

    def _value(self, lease: Lease, on_event: EventSink | None) -> str:
        """A read through a tool's mapping: refuse after revocation, renew after expiry."""
        now = self.clock()
        with self._lock:
            if lease.revoked_at is not None or lease.agent_id in self._dead:
                raise LeaseRevoked(f"the lease on credential {lease.name} for agent {lease.agent_id} was revoked "
                                   "(the agent terminated); a tool must not keep secrets past its call")
            current = self._leases.get((lease.agent_id, lease.tool, lease.name))
            if current is not None and current is not lease and current.active(now):
                return current.value  # replaced meanwhile by a fresh lease
            if not lease.value:
                lease.value = self.vault.get(lease.name)
            if not lease.active(now) or lease.expires_at - now < self.lease_ttl_s / 2:
                self._renew(lease, now, on_event)
            return lease.value


def _emit(sink: EventSink | None, kind: str, data: dict[str, Any]) -> None:
    if sink is not None:
        sink(kind, data)
