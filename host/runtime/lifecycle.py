"""An agent's life around its tool calls: spawn, load and claim, finish.

Each of these is a first-class audited event: ``agent.spawned`` (with its identity
provisioned in the same commit), ``agent.resumed``, ``agent.completed`` /
``agent.failed`` / ``agent.terminated`` (with its identity retired and its credential
leases revoked in the same commit). Ownership of a running agent is a claim in its
record (pid, host and process start time), so that two processes never drive one agent
and a dead process's agents can be taken over. In a fleet the claim also names the
host's lease (:mod:`host.runtime.leases`): the agent is held while that lease is live,
whichever machine holds it, and free once it expired.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio.to_thread

import policies
from host.errors import (
    AgentNotFound,
    AgentStateError,
    BundleError,
    ConfigError,
    ModuleError,
    TorporError,
)
from host.ids import new_agent_id
from host.runtime import budgets, leases, queries, timers
from host.runtime.agent import PARKED, TERMINAL, LiveAgent, RunResult
from host.runtime.commits import AgentCommits
from host.runtime.guest import GuestRunner
from host.runtime.leases import HostLease
from host.runtime.loader import BundleLoader, limits_for
from host.runtime.tool_call import Ended
from host.sandbox import abi, guest_json
from host.sandbox.bundle import Bundle
from host.sandbox.execution import Captured, Completed, Failed, PendingCall
from host.sandbox.validate import OperatorMemoryCap
from host.trust import audit
from host.trust.audit import HeadSealer
from host.trust.credentials import CredentialBroker
from host.trust.identity import IdentityService
from policies import PolicyError
from snapshots.errors import RecordCorrupt, SnapshotError, StoreFull, StoreUnavailable
from snapshots.format import decode_snapshot
from snapshots.store import CORRUPT_STATUS, INPUTS_BUCKET, UNREADABLE, AgentStore, SyncWhen

Owner = dict[str, Any]


class Lifecycle:
    """Spawns, loads (restores) and finishes agents, and keeps their ownership claims."""

    def __init__(self, store: AgentStore, where: object, loader: BundleLoader, commits: AgentCommits,
                 guest: GuestRunner, identity: IdentityService, heads: HeadSealer,
                 broker: CredentialBroker | None, lease: HostLease | None = None) -> None:
        self.store = store
        self.lease = lease
        self.where = where  # the store's directory, for messages
        self.loader = loader
        self.commits = commits
        self.guest = guest
        self.identity = identity
        self.heads = heads
        self.broker = broker
        self.owner: Owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid())}
        if lease is not None:
            self.owner["lease"] = lease.lease_id

    # -- spawn ------------------------------------------------------------------------------
    async def spawn(self, b: Bundle, input: Any, *, fuel: int | None, on_behalf_of: str | None,
                    tenant: str | None = None, also: Callable[[Any, str], None] | None = None,
                    started_as: Mapping[str, Any] | None = None, sync: SyncWhen = "now",
                    claim: bool = True) -> LiveAgent:
        """A new agent: its record, input and identity written, ``agent.spawned`` audited.

        ``tenant``: whom the agent is run for (a server's operator tenant; recorded, and the
        ``tenant`` scope of shared limits). ``also(txn, agent_id)``: more writes for the
        spawn's own transaction (a server's idempotency key, so that a key never names a run the store
        does not hold, nor a run exists without its key). ``started_as``: the registry
        reference the run was started by (``ref``, ``name``, ``tag``;
        :class:`~host.runtime.registry.Resolved`), kept in the record and the audit beside the
        digest it resolved to, which is what the agent runs for good. ``sync="later"``: the
        caller tells nobody of the agent before its next commit, which is durable and covers
        the spawn's (:class:`~host.runtime.commits.AgentCommits`). ``claim=False``: no owner
        (a fleet's work queue hands the run to the host that claims it)."""
        if fuel is not None and fuel < 0:
            raise ConfigError("fuel must be a non-negative integer")
        loaded, pre = self.loader.module(b)  # a refused module leaves nothing in the store
        code = self.loader.bundle_code(b)  # nor does a bundle whose Python the operator did not trust
        tools, validators = self.loader.tools(b)
        self.loader.register(b)
        now = time.time()
        aid = new_agent_id(now)
        try:  # refused before anything is written; the same bounds as what a guest sends
            guest_json.check(input)
            input_raw = json.dumps(input, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the agent's input must be JSON: {exc}") from exc
        record: dict[str, Any] = {
            "agent_id": aid, "name": b.name, "bundle_digest": b.digest, "module_digest": b.module_digest,
            "status": "running", "input_bytes": len(input_raw), "output": None, "error": None,
            "created_at": now, "updated_at": now, "finished_at": None, "last_progress": now,
            "stall_timeout": b.policy.budgets.stall_timeout, "principal": on_behalf_of,
            "parent": None, "fuel_limit": fuel, "checkpoints": 0, "snapshot_bytes": 0,
            "bundle_code": None, **({"tenant": tenant} if tenant is not None else {}),
            "started_as": _started_as(started_as),
            "last_checkpoint_bytes": 0, "pending": None, "owner": self.owner if claim else None, "audit_seq": 0,
            "audit_head": audit.GENESIS,
            "usage": {"fuel_used": 0, "tool_calls": 0, "suspensions": 0, "hibernations": 0,
                      "tokens": 0, "denials": 0, "calls_by_tool": {}, "recent_calls": {}},
        }
        limits = limits_for(b, fuel, max_memory=self.loader.max_memory)
        agent = LiveAgent(record, b, loaded, tools, validators, limits, pre=pre, _input=input_raw)
        if self.broker is not None:
            self.broker.check(aid, b.policy)  # a missing credential refuses the agent before it starts
        agent.event("agent.spawned", name=b.name, bundle_digest=b.digest, principal=on_behalf_of,
                    input_digest=audit.digest(input), **({"started_as": record["started_as"]} if started_as else {}))
        note_bundle_code(agent, code)
        provision = self.identity.provision(record, agent.event)

        def write(txn: Any) -> None:
            provision(txn)
            txn.put_blob(INPUTS_BUCKET, aid, input_raw)
            if also is not None:
                also(txn, aid)

        await self.commits.agent(agent, write, sync=sync)
        return agent

    def begin_run(self, agent: LiveAgent) -> None:
        """A run starts: per-run budgets count from here."""
        agent.run_started = time.time()
        agent.run_exec_s = 0.0
        agent.run_fuel_start = int(agent.usage.get("fuel_used", 0))
        agent.limits = limits_for(agent.bundle, agent.record.get("fuel_limit"), agent.run_fuel_start,
                                  self.loader.max_memory)

    # -- load ---------------------------------------------------------------------------------
    def load(self, agent_id: str) -> tuple[LiveAgent, PendingCall | None]:
        """Claim an unfinished agent and restore it from its latest checkpoint.

        Returns the agent (its guest state captured, not yet instantiated) and the call it
        waits on, or None if it died before its first checkpoint.
        """
        rec = queries.get_agent(self.store, agent_id, where=self.where)
        check_unfinished(rec)
        b = self.loader.by_digest(rec["bundle_digest"])
        loaded, pre = self.loader.module(b)
        # Its Python runs again in this process: only with the same opt-in as at spawn.
        tools, validators = self.loader.tools(b)
        self.claim(agent_id)
        rec = queries.get_agent(self.store, agent_id, where=self.where)
        rec.pop("stalled", None)
        snap = None
        try:
            with self.store.read() as txn:
                seq = txn.latest_checkpoint(agent_id)
                blob = txn.get_checkpoint(agent_id, seq) if seq is not None else None
                stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
                if blob is not None:  # decoded in the transaction: a large checkpoint reads its chunks
                    snap = decode_snapshot(blob, expect_module_digest=b.module_digest,
                                           expect_abi_version=abi.ABI_VERSION, pristine=loaded.image,
                                           chunks_from=txn.get_chunk)
        except SnapshotError as exc:
            self.release_claim(agent_id)
            raise TorporError(f"agent {agent_id}: checkpoint {seq} cannot be restored: {exc}",
                              code="snapshot_corrupt") from exc
        limits = limits_for(b, rec.get("fuel_limit"), max_memory=self.loader.max_memory)
        agent = LiveAgent(rec, b, loaded, tools, validators, limits, pre=pre, _input=stored_input)
        agent.replaying = True  # calls journaled past the checkpoint are answered from the journal
        if snap is None:
            return agent, None
        agent.captured = Captured(snap.memory, snap.globals, snap.async_buf)
        # Usage counted after the checkpoint (decisions, tokens) lives in the record; fuel
        # and the call counter restart from the snapshot, since that is where the guest resumes.
        budgets.count_fuel(agent, int(snap.usage.get("fuel_used", agent.usage.get("fuel_used", 0))))
        agent.record["checkpoints"] = max(int(agent.record.get("checkpoints", 0)), snap.seq)
        # The call's arguments stay undecoded: an answer read from the journal never needs them.
        return agent, PendingCall.from_snapshot(snap)

    def check_resumable(self, rec: dict[str, Any], now: float) -> None:
        """Refuse, as :meth:`load` and :meth:`claim` would, to resume the agent of ``rec``
        (finished, parked on a person, asleep before its time, or driven by another live
        process), without touching it: a server says so to the request that asked, before it
        resumes the agent in the background."""
        check_unfinished(rec)
        if rec.get("status") == timers.SLEEPING:
            timers.check_due(rec, now)
        if self.held_elsewhere(rec):
            raise AgentStateError(f"agent {rec.get('agent_id')} is being run by process {rec['owner'].get('pid')}")

    def claim(self, agent_id: str) -> None:
        """Take ownership of an agent atomically, unless a live process holds it."""
        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is None:
                raise AgentNotFound(f"no agent {agent_id}")
            if rec.get("status") == timers.SLEEPING:
                timers.check_due(rec, time.time())  # before its time: refused, untouched
                if self.held_elsewhere(rec, txn):  # another process is waking it now
                    raise AgentStateError(f"agent {agent_id} is being run by process {rec['owner'].get('pid')}")
            elif not self.resumable(rec, txn) and rec.get("status") not in PARKED and rec.get("status") not in TERMINAL:
                raise AgentStateError(f"agent {agent_id} is being run by process {rec['owner'].get('pid')}")
            rec["owner"] = self.owner
            txn.put_agent(rec)

        self.store.transact(write)

    def release_claim(self, agent_id: str) -> None:
        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is not None and rec.get("owner") == self.owner:
                rec["owner"] = None
                txn.put_agent(rec)

        self.store.transact(write)

    def resumable(self, rec: dict[str, Any], txn: Any = None) -> bool:
        """Unfinished, not parked, not asleep (the wake index says when it is due), and not
        driven by another live process on this machine (or, in a fleet, under a live lease)."""
        if rec.get("status") in TERMINAL or rec.get("status") in PARKED or rec.get("status") == timers.SLEEPING:
            return False
        return not self.held_elsewhere(rec, txn)

    def held_elsewhere(self, rec: dict[str, Any], txn: Any = None) -> bool:
        """Whether another live process drives the agent (its claim names it): a live lease
        other than ours in a fleet (read in ``txn`` when given), else a live process on
        this machine."""
        owner = rec.get("owner") or {}
        lease_id = owner.get("lease")
        if lease_id is not None:
            if self.lease is not None and lease_id == self.lease.lease_id:
                return False
            if txn is not None:
                return not leases.lease_expired(txn, lease_id, time.time())
            with self.store.read() as r:
                return not leases.lease_expired(r, lease_id, time.time())
        if owner.get("host") == self.owner["host"] and owner.get("pid") not in (None, os.getpid()):
            start = process_start(int(owner["pid"]))
            if start is not None and start == owner.get("start"):
                return True  # its process is alive and still driving it
        return False

    def park_corrupt(self, agent_id: str, error: dict[str, str]) -> RunResult:
        """Park an agent whose bundle, module or stored state cannot be used, naming what.

        It stays in the store as it is (nothing is deleted or rewritten but its record's
        status) for an operator: restore the store from a copy, or fail the agent.
        """
        def write(txn: Any) -> dict[str, Any]:
            rec = txn.get_agent(agent_id)
            if rec is None:
                raise AgentNotFound(f"no agent {agent_id} in store {self.where}")
            if rec.get(UNREADABLE):
                # The record itself is the damage: leave its bytes as they are, list it as corrupt.
                txn.mark_unreadable(agent_id, str(rec["error"]["message"]))
                return dict(rec)
            rec.update(status=CORRUPT_STATUS, error=error, owner=None, updated_at=time.time())
            audit.append_events(txn, rec, [("agent.corrupt", {"error": error})])
            txn.put_agent(rec)
            return dict(rec)

        return RunResult.of_record(self.store.transact(write))

    # -- finish -------------------------------------------------------------------------------
    async def finish(self, agent: LiveAgent, end: Ended) -> RunResult:
        """The agent is done: output checked, identity retired, leases revoked, all audited."""
        outcome, status, report = end.outcome, end.status, end.report
        rec = agent.record
        ex = agent.ex
        if ex is not None:
            budgets.count_fuel(agent, ex.fuel_used)
        self.guest.release(agent)
        retire = self.identity.retire(rec, agent.event)  # the identity ends with the agent (same commit)
        now = time.time()
        if isinstance(outcome, Completed):
            verdict = policies.check_output(agent.bundle.policy, outcome.output, now, custom_validators=agent.validators,
                                            agent_id=agent.agent_id, principal=rec.get("principal"))
            if isinstance(verdict, policies.Allow):
                rec.update(status="completed", output=outcome.output, error=None)
                agent.event("agent.completed", output_digest=audit.digest(outcome.output))
            else:
                d = verdict.to_dict()
                rec.update(status="failed", output=None, error={
                    "code": "output_rejected", "message": f"the output was not released: {d.get('reason')}",
                    "rule": d.get("rule"), "decision": d})
                agent.event("agent.failed", error=rec["error"])
        else:
            assert isinstance(outcome, Failed)
            err: dict[str, Any] = {"code": outcome.code, "message": outcome.message}
            said = [line["message"] for line in agent.logs if line["level"] == "error"]
            if outcome.code == "agent_error" and said:
                err["message"] = f"{outcome.message}: {said[-1]}"  # what torpor_fail() said
            if report:
                err["report"] = report
                if "rule" in report:
                    err["rule"] = report["rule"]
            final = status or "failed"
            rec.update(status=final, error=err)
            agent.event("agent." + final, error=err)
        rec.update(finished_at=now, updated_at=now, pending=None, owner=None, last_progress=now)
        if self.broker is not None:
            revoked = self.broker.revoke(agent.agent_id)
            if revoked:
                agent.event("credential.revoked", names=revoked)

        def write(txn: Any) -> None:
            retire(txn)
            budgets.forget_counters(txn, agent.agent_id)  # it makes no more calls

        await self.commits.agent(agent, write)
        if self.heads.due():
            await anyio.to_thread.run_sync(self.heads.maybe_seal)
        return agent.result()


def note_bundle_code(agent: LiveAgent, code: dict[str, str] | None) -> None:
    """Audit that this process runs the agent's bundle's own code (Python modules, MCP server
    commands), trusted by the operator, naming each one's digest (at spawn and every resume)."""
    if code is not None:
        agent.record["bundle_code"] = {"trusted_by": "operator", "code": code}
        agent.event("bundle_code.trusted", bundle_digest=agent.bundle.digest, code=code, trusted_by="operator")


def damage(exc: Exception) -> dict[str, str] | None:
    """The typed error an exception means for the one agent it was raised for, or None
    when it is about the store (full, unavailable: the agent waits, untouched).

    An agent's own bundle, module, policy or stored state that cannot be used makes it
    ``corrupt`` (:meth:`Lifecycle.park_corrupt`); anything else is a host error that ends
    that agent alone (:func:`host_error`). Either way no other agent, and not the process.
    """
    if isinstance(exc, StoreFull | StoreUnavailable):
        return None
    if isinstance(exc, RecordCorrupt):  # a journal entry, input or bundle of its own, changed on disk
        return {"code": exc.code, "message": str(exc)}
    if isinstance(exc, SnapshotError):
        return {"code": "snapshot_corrupt", "message": str(exc)}
    if isinstance(exc, OperatorMemoryCap):
        return None  # the agent is sound; this host's cap is below what it needs: refused, left as it is
    if isinstance(exc, ModuleError | BundleError):
        return {"code": exc.code, "message": str(exc)}
    if isinstance(exc, PolicyError):
        return {"code": "invalid_policy", "message": str(exc)}
    if isinstance(exc, TorporError) and exc.code in CORRUPT_CODES:
        return {"code": exc.code, "message": str(exc)}
    return None


#: Codes of errors about an agent's own stored things: they park it ``corrupt``.
CORRUPT_CODES = frozenset({"snapshot_corrupt", "bundle_missing", "record_corrupt", "invalid_module",
                           "invalid_bundle", "abi_version", "import_not_granted", "invalid_policy",
                           "replay_diverged"})


def host_error(exc: Exception) -> Failed:
    """An unexpected exception while driving one agent, as that agent's failure."""
    code = getattr(exc, "code", None)
    return Failed(code if isinstance(code, str) else "host_error",
                  f"the host failed while running this agent ({type(exc).__name__}: {exc})"[:2000])


def process_start(pid: int) -> int | None:
    """The kernel's start time of a live (non-zombie) process, or None.

    Start time and pid together name a process: a recycled pid has another
    start time, and a killed process not yet reaped (a zombie) is dead to us.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _started_as(started_as: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The reference a run was started by, as its record keeps it (the digest is the record's
    ``bundle_digest``, never a second copy that could disagree)."""
    if started_as is None:
        return None
    return {k: started_as.get(k) for k in ("ref", "name", "tag")}


def check_unfinished(rec: dict[str, Any]) -> None:
    """Refuse (``invalid_state``) to resume a finished agent, or one parked on a person."""
    status = rec.get("status")
    if status in TERMINAL:
        raise AgentStateError(f"agent {rec.get('agent_id')} is {status}; only unfinished agents can be resumed")
    if status in PARKED:
        raise AgentStateError(f"agent {rec.get('agent_id')} is {status}: an operator must decide before it can resume")
