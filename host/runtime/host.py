"""The host: spawns agents, mediates their tool calls, hibernates and resumes them.

:class:`Host` is the embeddable API (the CLI is a thin layer over it). It owns
one Wasmtime :class:`~host.sandbox.engine.Engine`, one store (LMDB by default), a
group committer that lets many agents' checkpoints share one commit, and the
concurrency pools agents queue on.

The life of a tool call, which is also the durability protocol:

1. the guest calls ``tool_call``; its instance unwinds (see :mod:`host.sandbox.execution`);
2. the policy engine decides (pure: :func:`policies.decide`); the agent's state
   is captured as snapshot *K* and written in one transaction with the
   journal's *intent* record for the call and the audit records of the
   decision (and, for a transactional tool such as ``kv.incr``, with the
   tool's effect and result too);
3. the tool runs; its result is journaled;
4. the instance is rewound with the result — in place if it is still warm, or
   rebuilt from snapshot *K* if it went cold meanwhile.

After a crash, ``resume`` restores the latest snapshot and answers its pending
call from the journal; a call with an intent but no result is re-run only when
the tool is idempotent or transactional, otherwise the agent is parked
``in_doubt`` for an operator. No recorded tool call ever runs twice.

A call that needs a human parks the agent ``waiting_approval``: it holds no
instance, no thread and no pool slot, only its checkpoint. ``approve`` and
``deny`` (from any process) decide it and resume the agent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

import policies
from host.errors import AgentNotFound, AgentStateError, ConfigError, TorporError
from host.ids import new_agent_id
from host.paths import default_store_dir
from host.runtime.overlay import WriteOverlay
from host.runtime.pools import PriorityPool
from host.sandbox import abi, imports
from host.sandbox import bundle as bundle_mod
from host.sandbox import wasi as wasi_imports
from host.sandbox.bundle import Bundle
from host.sandbox.engine import Engine, EngineConfig, LoadedModule
from host.sandbox.execution import (
    Captured,
    Completed,
    Execution,
    Failed,
    Limits,
    PendingCall,
    Suspended,
    error_response,
)
from host.tools.builtin import BUILTINS
from host.tools.registry import ToolContext, ToolError, ToolSpec, load_handler, spec_from_function
from host.trust import audit
from host.trust.identity import IdentityService
from snapshots.errors import SnapshotError, StoreConfigError
from snapshots.format import Snapshot, decode_snapshot, encode_snapshot
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore
from snapshots.store import INPUTS_BUCKET, AgentStore

T = TypeVar("T")


class CredentialBroker(Protocol):
    """Hands tools the secrets their grant names, on the host side only (see issue 5's broker).

    ``check`` runs at spawn and refuses a policy naming a credential that does
    not exist; ``secrets_for`` leases (or renews) the named secrets for one
    call (its lease events, for the audit log, go to ``on_event``); ``revoke``
    ends every lease of an agent when it terminates.
    """

    def check(self, agent_id: str, policy: Any) -> None: ...

    def secrets_for(self, agent_id: str, tool: str, names: tuple[str, ...], *,
                    on_event: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, str]: ...

    def revoke(self, agent_id: str) -> list[str]: ...

TERMINAL = frozenset({"completed", "failed", "terminated"})
PARKED = frozenset({"waiting_approval", "in_doubt"})
DEFAULT_FUEL = 1_000_000_000
DEFAULT_MEMORY = 64 << 20
DEFAULT_DEADLINE_S = 30.0
DEFAULT_POOL_SIZE = 64
LOG_LIMIT = 1000
WASM_PAGE = 65536

Answer = tuple[int, bytes]


@dataclass
class RunResult:
    """What a run (or resume) of one agent came to."""

    agent_id: str
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    fuel_used: int = 0
    tool_calls: int = 0
    suspensions: int = 0
    checkpoints: int = 0
    snapshot_bytes: int = 0
    tokens: int = 0
    pending: dict[str, Any] | None = None
    approval: dict[str, Any] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "agent_id": self.agent_id,
            "status": self.status,
            "output": self.output,
            "fuel_used": self.fuel_used,
            "tool_calls": self.tool_calls,
            "suspensions": self.suspensions,
            "checkpoints": self.checkpoints,
            "snapshot_bytes": self.snapshot_bytes,
            "tokens": self.tokens,
        }
        if self.error is not None:
            d["error"] = self.error
        if self.pending is not None:
            d["pending"] = self.pending
        if self.approval is not None:
            d["approval"] = self.approval
        return d


@dataclass
class _Agent:
    """A running agent's host-side state (its guest state is in ``ex`` or ``captured``)."""

    record: dict[str, Any]
    bundle: Bundle
    loaded: LoadedModule
    tools: dict[str, ToolSpec]
    validators: dict[str, Any]
    limits: Limits
    pre: Any = None  # the module's InstancePre under this agent's grants
    ex: Execution | None = None
    captured: Captured | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    run_fuel_start: int = 0
    run_exec_s: float = 0.0
    last_segment_s: float | None = None  # how long the guest last ran between tool calls
    run_started: float = field(default_factory=time.time)
    _input: bytes | None = field(default=None, repr=False)

    @property
    def agent_id(self) -> str:
        return str(self.record["agent_id"])

    @property
    def input_bytes(self) -> bytes:
        """The input as the guest reads it: the host's own JSON encoding of it.

        Kept in the store's ``inputs`` bucket, written once at spawn, not in the agent
        record, which every commit rewrites (a large input in it cost its size at every
        tool call). The host loads it with the agent; records of older hosts carry it
        in the record (``input_raw``, or ``input`` alone), which is then used.
        """
        if self._input is None:
            raw = self.record.get("input_raw")
            text = raw if isinstance(raw, str) else json.dumps(self.record.get("input"), separators=(",", ":"))
            self._input = text.encode()
        return self._input

    @property
    def usage(self) -> dict[str, Any]:
        u: dict[str, Any] = self.record.setdefault("usage", {})
        return u

    def event(self, kind: str, /, **data: Any) -> None:
        """Queue an audit event; it is sealed into the log by the agent's next commit."""
        self.events.append((kind, data))


class Host:
    """An embeddable Torpor host on one store directory.

    Use as a context manager (sync or async) or call :meth:`close`.

    ``warm_idle_s``: how long a suspended agent keeps its instance in memory
    while its tool runs before it is hibernated (released, to be rebuilt from
    its snapshot); ``max_warm`` and ``max_warm_bytes``: how many may wait warm at
    once, and how much linear memory they may hold together (their memories' sizes,
    the most their instances can keep resident; default half of the machine's RAM),
    before the next one goes cold immediately (memory pressure). ``pool_size``: agents running at once in this host;
    ``class_pools``: sizes for agent classes (a policy's ``agent.pool``),
    others share the host pool only. ``engine``: a Wasmtime layout by profile
    name (``dense``, the default, packs the most instances into a process;
    ``fast`` runs compute-heavy guests about twice as fast; see
    ``bench/RESULTS.md``) or an :class:`~host.sandbox.engine.EngineConfig`.
    ``durability``: what a returned commit of the LMDB store survives, ``"sync"``
    (on stable storage: also a power loss) or ``"process"`` (in the OS page cache,
    flushed every second: the host process being killed, which is what the
    crash-consistency promise covers, without a disk flush per commit); default
    ``$TORPOR_DURABILITY`` or ``sync``. See :mod:`snapshots.lmdb_store`.
    """

    def __init__(self, store_dir: str | Path | None = None, *, warm_idle_s: float = 0.05,
                 wasm_threads: int | None = None, pool_size: int = DEFAULT_POOL_SIZE,
                 class_pools: dict[str, int] | None = None, broker: CredentialBroker | None = None,
                 max_warm: int = 10_000, store: AgentStore | None = None,
                 engine: str | EngineConfig | None = None, durability: str | None = None,
                 max_warm_bytes: int | None = None) -> None:
        # Arguments first: nothing is opened yet that a bad one would leave open.
        config = engine if isinstance(engine, EngineConfig) else EngineConfig.for_profile(engine)
        if max_warm_bytes is None:
            max_warm_bytes = _physical_memory() // 2
        if isinstance(max_warm_bytes, bool) or not isinstance(max_warm_bytes, int) or max_warm_bytes < 0:
            raise ConfigError(f"max_warm_bytes must be a number of bytes >= 0, got {max_warm_bytes!r}")
        self.store_dir = Path(store_dir) if store_dir is not None else default_store_dir()
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the store directory {self.store_dir}: {exc.strerror}") from exc
        # Any AgentStore will do (a fleet backend later); LMDB in the directory is the default.
        if store is not None and durability is not None:
            raise ConfigError("durability applies to the LMDB store the host opens; open a store "
                              "passed as store= with its own durability instead")
        try:
            self.store: AgentStore = (store if store is not None
                                      else LmdbStore.open(self.store_dir / "db", durability=durability))
        except StoreConfigError as exc:
            raise ConfigError(str(exc)) from exc
        try:
            self.committer = GroupCommitter(self.store)
            self.engine = Engine(config, cache_dir=self.store_dir / "cache")
        except BaseException:
            # Close what was opened: a later Host on this directory in this process
            # would otherwise find the store "already open".
            if hasattr(self, "committer"):
                self.committer.close()
            if store is None:
                self.store.close()
            raise
        self.warm_idle_s = warm_idle_s
        self.max_warm = max_warm
        self.max_warm_bytes = max_warm_bytes
        self.warm_bytes = 0  # the linear memory of the instances counted in warm_waiting
        self.inline_segment_s = 0.001  # guest segments shorter than this run inline (see _run_guest)
        self.warm_waiting = 0  # instances kept in memory while their agent waits on a tool
        self._limiter = anyio.CapacityLimiter(wasm_threads or max(1, os.cpu_count() or 1))
        self.pool = PriorityPool(pool_size, "host")
        self.class_pools = {name: PriorityPool(size, name) for name, size in (class_pools or {}).items()}
        if broker is None:
            from host.trust.credentials import VaultBroker

            broker = VaultBroker.for_store(self.store_dir)  # the store's own vault (opened lazily)
        self.broker = broker
        self.identity = IdentityService(self.store, self.store_dir)  # agent tokens; the host signing key
        self.heads = audit.HeadSealer(self.store, lambda: self.identity.key)  # signed audit heads
        self._bundles: dict[str, Bundle] = {}
        self._tools: dict[str, tuple[dict[str, ToolSpec], dict[str, Any]]] = {}
        self._owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}

    # -- context management ---------------------------------------------------
    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.committer.close()
        try:
            if getattr(self.store, "commits", 0):
                self.heads.maybe_seal()  # sign the audit log's heads, if one is due
        finally:
            self.store.close()

    # -- bundles -------------------------------------------------------------
    def register_bundle(self, b: Bundle) -> None:
        """Keep the bundle in the store so any later resume can find the exact module."""
        if b.digest in self._bundles:
            return
        self._bundles[b.digest] = b

        def save(txn: Any) -> None:
            if txn.get_blob("bundles", b.digest) is None:
                txn.put_blob("bundles", b.digest, b.raw)

        self.store.transact(save)

    def bundle_by_digest(self, digest: str) -> Bundle:
        b = self._bundles.get(digest)
        if b is None:
            with self.store.read() as txn:
                raw = txn.get_blob("bundles", digest)
            if raw is None:
                raise TorporError(f"bundle {digest[:12]} is no longer in the store", code="bundle_missing")
            b = bundle_mod.load_bytes(raw, source=f"bundle {digest[:12]}")
            self._bundles[digest] = b
        return b

    def _tools_for(self, b: Bundle) -> tuple[dict[str, ToolSpec], dict[str, Any]]:
        """The tool specs and custom validators a bundle's policy names (loaded once)."""
        cached = self._tools.get(b.digest)
        if cached is None:
            tools: dict[str, ToolSpec] = {}
            for name, grant in b.policy.grants.items():
                if grant.handler:
                    fn = load_handler(grant.handler, bundle_tools=b.tools, bundle_digest=b.digest)
                    spec = spec_from_function(fn, name=name, idempotent=grant.idempotent)
                elif name in BUILTINS:
                    spec = BUILTINS[name]
                    if spec.idempotent and not grant.idempotent:  # a policy may only tighten
                        spec = dataclasses.replace(spec, idempotent=False)
                else:
                    continue  # granted but not implemented here: calls answer `unknown_tool`
                tools[name] = spec
            validators = {ref: load_handler(ref, bundle_tools=b.tools, bundle_digest=b.digest)
                          for ref in b.policy.custom_validator_refs}
            cached = (tools, validators)
            self._tools[b.digest] = cached
        return cached

    def load_module(self, b: Bundle) -> tuple[LoadedModule, Any]:
        """The compiled module and the ``InstancePre`` for a bundle, imports checked against its policy."""
        loaded = self.engine.load(b.module, b.module_digest)
        has_tools = bool(b.policy.grants)
        wasi = frozenset(b.policy.wasi_allow)
        loaded.check_imports(has_tools, wasi, b.policy.agent.name)

        def make_linker(eng: Any) -> Any:
            import wasmtime

            linker = wasmtime.Linker(eng)
            imports.define(linker, tools=has_tools)
            if wasi:
                wasi_imports.define(linker, loaded.module, wasi)
            return linker

        pre = loaded.instance_pre(("v1", has_tools, wasi), make_linker)
        if has_tools and not loaded.suspendable:
            raise TorporError("the module imports tool_call but was not transformed for suspension; repack it with `torpor pack`", code="invalid_module")
        return loaded, pre

    def limits_for(self, b: Bundle, fuel: int | None, fuel_used: int = 0) -> Limits:
        """Limits for one run: per-run fuel on top of what was used, capped by the total."""
        budgets = b.policy.budgets
        per_run = int(fuel if fuel is not None else (budgets.fuel or DEFAULT_FUEL))
        cap = fuel_used + per_run
        if budgets.fuel_total is not None:
            cap = min(cap, int(budgets.fuel_total))
        memory = int(budgets.memory or DEFAULT_MEMORY)
        memory = max(WASM_PAGE, memory - memory % WASM_PAGE)  # whole wasm pages
        return Limits(fuel=cap, memory_bytes=memory, deadline_s=float(budgets.wall_clock or DEFAULT_DEADLINE_S))

    # -- public API ------------------------------------------------------------
    async def run(self, b: Bundle, input: Any = None, *, fuel: int | None = None,
                  on_behalf_of: str | None = None, priority: int | None = None) -> RunResult:
        """Spawn an agent from a bundle and drive it until it finishes or parks."""
        agent = await self._spawn(b, input, fuel=fuel, on_behalf_of=on_behalf_of)
        async with self._slots(agent, priority):
            self._begin_run(agent)
            ex = self._new_execution(agent)
            agent.ex = ex
            outcome = await self._run_guest(agent, ex, ex.start)
            return await self._drive(agent, outcome)

    async def resume(self, agent_id: str, *, priority: int | None = None) -> RunResult:
        """Continue an agent from its latest checkpoint (after a restart, a crash or a decision)."""
        agent, pending = self._load_agent(agent_id)
        async with self._slots(agent, priority):
            self._begin_run(agent)
            agent.event("agent.resumed", checkpoint=agent.record.get("checkpoints", 0))
            if pending is None:
                # Died before its first checkpoint: nothing happened outside it; start over.
                ex = self._new_execution(agent)
                agent.ex = ex
                agent.record["status"] = "running"
                await self._commit_agent(agent)
                return await self._drive(agent, await self._run_guest(agent, ex, ex.start))
            answer = await self._answer_from_journal(agent, pending)
            if answer is None:
                return self._result(agent)
            return await self._drive(agent, await self._continue(agent, pending, *answer))

    async def resume_all(self) -> list[RunResult]:
        """Resume every agent that is not finished, not parked, and not owned by a live process."""
        ids = [r["agent_id"] for r in self.list_agents() if self._resumable(r)]
        results: list[RunResult] = []

        async def one(aid: str) -> None:
            try:
                results.append(await self.resume(aid))
            except TorporError as exc:
                results.append(RunResult(aid, "failed", error={"code": exc.code, "message": str(exc)}))

        async with anyio.create_task_group() as tg:
            for aid in ids:
                tg.start_soon(one, aid)
        return results

    def approvals(self) -> list[dict[str, Any]]:
        """Pending approval requests: the call, its arguments and the rule that asked."""
        with self.store.read() as txn:
            return [json.loads(v) for _, v in txn.iter_blobs("approvals")]

    async def approve(self, agent_id: str, *, note: str | None = None, by: str | None = None) -> RunResult:
        """Approve the call an agent waits on, then resume it (the tool runs)."""
        def decide(txn: Any, rec: dict[str, Any], call: dict[str, Any]) -> None:
            txn.put_journal(agent_id, int(call["seq"]), {
                "tool": call["tool"], "args": call.get("args"), "state": "approved", "t": time.time(),
                "fuel": (rec.get("usage") or {}).get("fuel_used", 0),
                "approval": {"by": by, "note": note}})

        self._decide_approval(agent_id, "approval.granted", {"by": by, "note": note}, decide)
        return await self.resume(agent_id)

    async def deny(self, agent_id: str, *, reason: str, by: str | None = None) -> RunResult:
        """Deny the call an agent waits on, then resume it (the guest sees a denial)."""
        def decide(txn: Any, rec: dict[str, Any], call: dict[str, Any]) -> None:
            rule = (rec.get("approval") or {}).get("rule", "approval")
            response = error_response("denied", f"denied by an operator: {reason}", rule=rule, reason_code="approval_denied")
            txn.put_journal(agent_id, int(call["seq"]), {
                "tool": call["tool"], "args": call.get("args"), "state": "done", "status": abi.E_DENIED,
                "response": response.decode(), "t": time.time(), "approval": {"by": by, "reason": reason}})

        self._decide_approval(agent_id, "approval.denied", {"by": by, "reason": reason}, decide)
        return await self.resume(agent_id)

    def _decide_approval(self, agent_id: str, kind: str, data: dict[str, Any],
                         decide: Callable[[Any, dict[str, Any], dict[str, Any]], None]) -> None:
        """Check-and-set in one transaction: of two operators deciding at once, one wins."""
        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is None:
                raise AgentNotFound(f"no agent {agent_id} in store {self.store_dir}")
            if rec.get("status") != "waiting_approval":
                already = " (someone already decided it)" if rec.get("status") in ("approved", "suspended", "running") else ""
                raise AgentStateError(f"agent {agent_id} is {rec.get('status')}, not waiting for approval{already}")
            call = rec.get("pending") or {}
            decide(txn, rec, call)
            rec["status"] = "approved" if kind == "approval.granted" else "suspended"
            rec["updated_at"] = time.time()
            _append_audit(txn, rec, [(kind, {"call_seq": call.get("seq"), "tool": call.get("tool"), **data})])
            txn.put_agent(rec)
            txn.delete_blob("approvals", agent_id)

        self.store.transact(write)

    async def resolve(self, agent_id: str, *, retry: bool = False, result: Any = None,
                      fail: str | None = None, by: str | None = None) -> RunResult:
        """Settle an ``in_doubt`` agent: re-run its call, supply the call's result, or fail it.

        Only a person can know whether a non-idempotent call that was started
        before a crash took effect (did the payment go out?), so the host asks.
        """
        if sum((retry, result is not None, fail is not None)) != 1:
            raise ConfigError("resolve needs exactly one of: retry, a result, or fail")

        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is None:
                raise AgentNotFound(f"no agent {agent_id} in store {self.store_dir}")
            if rec.get("status") != "in_doubt":
                raise AgentStateError(f"agent {agent_id} is {rec.get('status')}, not in_doubt")
            call = (rec.get("in_doubt") or {}).get("call") or rec.get("pending") or {}
            seq = int(call["seq"])
            base = {"tool": call.get("tool"), "args": call.get("args"), "t": time.time(), "resolved_by": by}
            if retry:
                txn.put_journal(agent_id, seq, {**base, "state": "approved"})
                action: dict[str, Any] = {"action": "retry"}
            elif result is not None:
                status, response = self._encode_result(result)
                txn.put_journal(agent_id, seq, {**base, "state": "done", "status": status, "response": response.decode()})
                action = {"action": "result", "result_digest": audit.digest(result)}
            else:
                action = {"action": "fail", "reason": fail}
            rec["status"] = "suspended" if fail is None else "failed"
            retired: list[tuple[str, dict[str, Any]]] = []
            if fail is not None:
                rec.update(error={"code": "in_doubt_failed", "message": f"failed by an operator: {fail}"},
                           finished_at=time.time(), pending=None)
                self.identity.retire(rec, lambda kind, **d: retired.append((kind, d)))(txn)
            rec["in_doubt"] = None
            rec["updated_at"] = time.time()
            _append_audit(txn, rec, [("operator.resolved", {"call_seq": seq, "by": by, **action}),
                                     *([("agent.failed", {"error": rec["error"]})] if fail is not None else []),
                                     *retired])
            txn.put_agent(rec)

        self.store.transact(write)
        if fail is not None:
            rec = self.get_agent(agent_id)
            u = rec.get("usage", {})
            return RunResult(agent_id, rec["status"], error=rec.get("error"), fuel_used=int(u.get("fuel_used", 0)),
                             tool_calls=int(u.get("tool_calls", 0)), checkpoints=int(rec.get("checkpoints", 0)))
        return await self.resume(agent_id)

    def fork(self, agent_id: str, checkpoint: int) -> str:
        """A new agent continuing from checkpoint ``checkpoint`` of ``agent_id``.

        The fork starts with a copy of the parent's private key-value data as
        it is now (the store keeps no history of it).
        """
        with self.store.read() as txn:
            rec = txn.get_agent(agent_id)
            blob = txn.get_checkpoint(agent_id, checkpoint) if rec else None
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id}")
        if blob is None:
            raise TorporError(f"agent {agent_id} has no checkpoint {checkpoint}", code="checkpoint_not_found")
        fb = self.bundle_by_digest(rec["bundle_digest"])
        pristine = self.load_module(fb)[0].image
        try:
            snap = decode_snapshot(blob, expect_module_digest=fb.module_digest, pristine=pristine)
        except SnapshotError as exc:
            raise TorporError(f"agent {agent_id}: checkpoint {checkpoint} is unusable: {exc}", code="snapshot_corrupt") from exc
        new_id = new_agent_id()
        now = time.time()
        new = dict(rec)
        new.update({
            "agent_id": new_id, "status": "suspended", "parent": {"agent_id": agent_id, "checkpoint": checkpoint},
            "created_at": now, "updated_at": now, "finished_at": None, "output": None, "error": None, "owner": None,
            "checkpoints": 1, "pending": snap.pending, "usage": dict(snap.usage), "audit_seq": 0,
            "audit_head": audit.GENESIS, "approval": None, "in_doubt": None,
        })
        forked = dataclasses.replace(snap, agent_id=new_id, seq=1, created_at=now)
        data = encode_snapshot(forked, pristine=pristine)
        new["snapshot_bytes"] = len(data)
        new["last_checkpoint_bytes"] = len(data)
        pending_seq = int(snap.pending["seq"]) if snap.pending else None
        events: list[tuple[str, dict[str, Any]]] = [("agent.forked", {"parent": agent_id, "checkpoint": checkpoint,
                                                                      "bundle_digest": rec["bundle_digest"]})]
        provision = self.identity.provision(new, lambda kind, **d: events.append((kind, d)))

        def write(txn: Any) -> None:
            provision(txn)
            txn.put_checkpoint(new_id, 1, data, now)
            stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
            if stored_input is not None:  # a parent of an older host has it in its record, now copied
                txn.put_blob(INPUTS_BUCKET, new_id, stored_input)
            if pending_seq is not None:
                entry = txn.get_journal(agent_id, pending_seq)
                if entry is not None:
                    txn.put_journal(new_id, pending_seq, entry)
            old_ns, new_ns = f"agent:{agent_id}", f"agent:{new_id}"
            for key in txn.kv_keys(old_ns, ""):
                value = txn.kv_get(old_ns, key)
                if value is not None:
                    txn.kv_set(new_ns, key, value)
            _append_audit(txn, new, events)
            txn.put_agent(new)

        self.store.transact(write)
        return new_id

    def list_agents(self) -> list[dict[str, Any]]:
        now = time.time()
        with self.store.read() as txn:
            agents = list(txn.iter_agents())
        for a in agents:
            a["stalled"] = _stalled(a, now)
        return agents

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        with self.store.read() as txn:
            rec = txn.get_agent(agent_id)
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id} in store {self.store_dir}")
        rec["stalled"] = _stalled(rec, time.time())
        return rec

    def inspect(self, agent_id: str) -> dict[str, Any]:
        rec = self.get_agent(agent_id)
        with self.store.read() as txn:
            cps = txn.list_checkpoints(agent_id)
            stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
        out = {k: v for k, v in rec.items() if k not in ("input_raw", "owner")}
        if stored_input is not None:
            out["input"] = json.loads(stored_input)
        out["checkpoint_list"] = [{"seq": c.seq, "size": c.size, "created_at": c.created_at} for c in cps]
        return out

    def audit_records(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's audit log, in order."""
        with self.store.read() as txn:
            return [json.loads(v) for _, v in txn.iter_blobs(audit.BUCKET, f"{agent_id}/")]

    # -- internals: spawning and loading ----------------------------------------
    async def _spawn(self, b: Bundle, input: Any, *, fuel: int | None, on_behalf_of: str | None) -> _Agent:
        if fuel is not None and fuel < 0:
            raise ConfigError("fuel must be a non-negative integer")
        self.register_bundle(b)
        loaded, pre = self.load_module(b)
        tools, validators = self._tools_for(b)
        now = time.time()
        aid = new_agent_id(now)
        try:
            input_raw = json.dumps(input, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:  # refused before anything is written
            raise ConfigError(f"the agent's input must be JSON: {exc}") from exc
        record: dict[str, Any] = {
            "agent_id": aid, "name": b.name, "bundle_digest": b.digest, "module_digest": b.module_digest,
            "status": "running", "input_bytes": len(input_raw), "output": None, "error": None,
            "created_at": now, "updated_at": now, "finished_at": None, "last_progress": now,
            "stall_timeout": b.policy.budgets.stall_timeout, "principal": on_behalf_of,
            "parent": None, "fuel_limit": fuel, "checkpoints": 0, "snapshot_bytes": 0,
            "last_checkpoint_bytes": 0, "pending": None, "owner": self._owner, "audit_seq": 0,
            "audit_head": audit.GENESIS,
            "usage": {"fuel_used": 0, "tool_calls": 0, "suspensions": 0, "hibernations": 0,
                      "tokens": 0, "denials": 0, "calls_by_tool": {}, "recent_calls": {}},
        }
        agent = _Agent(record, b, loaded, tools, validators, self.limits_for(b, fuel), pre=pre, _input=input_raw)
        if self.broker is not None:
            self.broker.check(aid, b.policy)  # a missing credential refuses the agent before it starts
        agent.event("agent.spawned", name=b.name, bundle_digest=b.digest, principal=on_behalf_of,
                    input_digest=audit.digest(input))
        provision = self.identity.provision(record, agent.event)

        def write(txn: Any) -> None:
            provision(txn)
            txn.put_blob(INPUTS_BUCKET, aid, input_raw)

        await self._commit_agent(agent, write)
        return agent

    def _new_execution(self, agent: _Agent) -> Execution:
        return Execution(agent.loaded, self._pre(agent), agent.limits, agent.input_bytes,
                         fuel_used=int(agent.usage.get("fuel_used", 0)), log_sink=self._log_sink(agent))

    def _pre(self, agent: _Agent) -> Any:
        # Linked and import-checked once per agent load, not at every spawn or cold restore.
        return agent.pre

    def _begin_run(self, agent: _Agent) -> None:
        """A run starts: per-run budgets count from here."""
        agent.run_started = time.time()
        agent.run_exec_s = 0.0
        agent.run_fuel_start = int(agent.usage.get("fuel_used", 0))
        agent.limits = self.limits_for(agent.bundle, agent.record.get("fuel_limit"), agent.run_fuel_start)

    def _slots(self, agent: _Agent, priority: int | None) -> Any:
        prio = agent.bundle.policy.agent.priority if priority is None else priority
        class_pool = self.class_pools.get(agent.bundle.policy.agent.pool)
        host_pool = self.pool

        class _Both:
            async def __aenter__(self) -> None:
                if class_pool is not None:
                    await class_pool.acquire(prio)
                try:
                    await host_pool.acquire(prio)
                except BaseException:
                    if class_pool is not None:
                        class_pool.release()
                    raise

            async def __aexit__(self, *exc: object) -> None:
                host_pool.release()
                if class_pool is not None:
                    class_pool.release()

        return _Both()

    def _load_agent(self, agent_id: str) -> tuple[_Agent, PendingCall | None]:
        rec = self.get_agent(agent_id)
        status = rec.get("status")
        if status in TERMINAL:
            raise AgentStateError(f"agent {agent_id} is {status}; only unfinished agents can be resumed")
        if status in PARKED:
            raise AgentStateError(f"agent {agent_id} is {status}: an operator must decide before it can resume")
        b = self.bundle_by_digest(rec["bundle_digest"])
        loaded, pre = self.load_module(b)
        tools, validators = self._tools_for(b)
        self._claim(agent_id)
        rec = self.get_agent(agent_id)
        rec.pop("stalled", None)
        with self.store.read() as txn:
            seq = txn.latest_checkpoint(agent_id)
            blob = txn.get_checkpoint(agent_id, seq) if seq is not None else None
            stored_input = txn.get_blob(INPUTS_BUCKET, agent_id)
        agent = _Agent(rec, b, loaded, tools, validators, self.limits_for(b, rec.get("fuel_limit")), pre=pre,
                       _input=stored_input)
        if blob is None:
            return agent, None
        try:
            snap = decode_snapshot(blob, expect_module_digest=b.module_digest, expect_abi_version=abi.ABI_VERSION,
                                   pristine=loaded.image)
        except SnapshotError as exc:
            self._release_claim(agent_id)
            raise TorporError(f"agent {agent_id}: checkpoint {seq} cannot be restored: {exc}", code="snapshot_corrupt") from exc
        agent.captured = Captured(snap.memory, snap.globals, snap.async_buf)
        # Usage counted after the checkpoint (decisions, tokens) lives in the record; fuel
        # and the call counter restart from the snapshot, since that is where the guest resumes.
        agent.usage["fuel_used"] = int(snap.usage.get("fuel_used", agent.usage.get("fuel_used", 0)))
        agent.record["checkpoints"] = max(int(agent.record.get("checkpoints", 0)), snap.seq)
        if snap.pending is None:
            return agent, None
        return agent, PendingCall.from_dict(snap.pending)

    def _claim(self, agent_id: str) -> None:
        """Take ownership of an agent atomically, unless a live process holds it."""
        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is None:
                raise AgentNotFound(f"no agent {agent_id}")
            if not self._resumable(rec) and rec.get("status") not in PARKED and rec.get("status") not in TERMINAL:
                raise AgentStateError(f"agent {agent_id} is being run by process {rec['owner'].get('pid')}")
            rec["owner"] = self._owner
            txn.put_agent(rec)

        self.store.transact(write)

    def _release_claim(self, agent_id: str) -> None:
        def write(txn: Any) -> None:
            rec = txn.get_agent(agent_id)
            if rec is not None and rec.get("owner") == self._owner:
                rec["owner"] = None
                txn.put_agent(rec)

        self.store.transact(write)

    def _resumable(self, rec: dict[str, Any]) -> bool:
        if rec.get("status") in TERMINAL or rec.get("status") in PARKED:
            return False
        owner = rec.get("owner") or {}
        if owner.get("host") == self._owner["host"] and owner.get("pid") not in (None, os.getpid()):
            start = _process_start(int(owner["pid"]))
            if start is not None and start == owner.get("start"):
                return False  # its process is alive and still driving it
        return True

    # -- internals: commits and audit ------------------------------------------
    async def _run_wasm(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _run_guest(self, agent: _Agent, ex: Execution, fn: Callable[..., Any], *args: Any) -> Any:
        """Run guest code with what is left of the run's wall-clock budget, and count the time spent."""
        left = agent.limits.deadline_s - agent.run_exec_s
        if left <= 0:
            return Failed("deadline_exceeded", f"the agent exceeded its wall-clock budget of {agent.limits.deadline_s:g} s")
        ex.limits = dataclasses.replace(agent.limits, deadline_s=left)
        # A thread hop costs more than a short guest segment, and the GIL serialises
        # most of the work anyway: an agent whose last segment was short runs its next
        # one inline on the event loop; a first segment, or one after a long one, goes
        # to a worker thread so a compute-heavy guest never stalls the other agents.
        # The choice rests on the segment's own run time, measured where it runs: timed
        # from here, a segment sent to a thread would include the hop and its wait for a
        # worker (milliseconds with a few agents at once), look long, and send the next
        # one to a thread too, for ever (measured: every segment of 4 concurrent agents
        # went to a thread, ~870 µs per tool call).
        inline = agent.last_segment_s is not None and agent.last_segment_s < self.inline_segment_s
        took = [0.0]

        def timed(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                took[0] = time.perf_counter() - t

        t0 = time.perf_counter()
        try:
            return timed(*args) if inline else await self._run_wasm(timed, *args)
        finally:
            agent.last_segment_s = took[0]
            agent.run_exec_s += time.perf_counter() - t0  # the budget counts the wait too, as before

    async def _commit(self, fn: Callable[[Any], T]) -> T:
        done = self.committer.try_inline(fn)  # an idle committer at durability "process"
        if done is not None:
            value: T = done.unwrap()
            return value
        fut = self.committer.submit(fn)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - non-asyncio backend
            return await anyio.to_thread.run_sync(fut.result)
        return await asyncio.wrap_future(fut, loop=loop)

    async def _commit_agent(self, agent: _Agent, fn: Callable[[Any], T] | None = None,
                            after: Callable[[T], list[tuple[str, dict[str, Any]]]] | None = None) -> T | None:
        """One transaction: ``fn``, the agent's queued audit events (plus ``after(result)``), its record."""
        queued = len(agent.events)

        def write(txn: Any) -> tuple[T | None, int, str]:
            result = fn(txn) if fn is not None else None
            events = agent.events[:queued] + (after(result) if after is not None and result is not None else [])
            rec = dict(agent.record)
            _append_audit(txn, rec, events)
            txn.put_agent(rec)
            return result, rec["audit_seq"], rec["audit_head"]

        result, seq, head = await self._commit(write)
        agent.record["audit_seq"] = seq
        agent.record["audit_head"] = head
        del agent.events[:queued]
        return result

    def _log_sink(self, agent: _Agent) -> Callable[[int, str], None]:
        def sink(level: int, message: str) -> None:
            if len(agent.logs) < LOG_LIMIT:
                agent.logs.append({"level": imports.LOG_LEVELS[level], "message": message})

        return sink

    # -- internals: governance ---------------------------------------------------
    def _policy_usage(self, agent: _Agent, now: float) -> policies.Usage:
        u = agent.usage
        return policies.Usage(
            fuel_used=int(u.get("fuel_used", 0)),
            fuel_used_run=int(u.get("fuel_used", 0)) - agent.run_fuel_start,
            wall_clock_s=max(0.0, now - float(agent.record.get("created_at", now))),
            wall_clock_run_s=max(0.0, now - agent.run_started),
            tool_calls=int(u.get("tool_calls", 0)), tokens=int(u.get("tokens", 0)),
            denials=int(u.get("denials", 0)), calls_by_tool=dict(u.get("calls_by_tool", {})),
            recent_calls={k: tuple(v) for k, v in (u.get("recent_calls") or {}).items()},
        )

    def _store_usage(self, agent: _Agent, usage: policies.Usage) -> None:
        u = agent.usage
        u.update(tool_calls=usage.tool_calls, tokens=usage.tokens, denials=usage.denials,
                 calls_by_tool=dict(usage.calls_by_tool),
                 recent_calls={k: list(v) for k, v in usage.recent_calls.items()})

    def _budget_check(self, agent: _Agent, before: policies.Usage, after: policies.Usage) -> policies.BudgetEvent | None:
        """Record warnings crossed between two usages; return the first exceeded limit, if any."""
        exceeded = None
        for ev in policies.budget_events(agent.bundle.policy, before, after):
            data = ev.to_dict()
            data.pop("kind", None)
            agent.event("budget." + ev.kind, **data)
            if ev.terminate and exceeded is None:
                exceeded = ev
        return exceeded

    # -- internals: driving ------------------------------------------------------
    async def _drive(self, agent: _Agent, outcome: Any) -> RunResult:
        """Serve tool calls until the agent completes, fails or parks."""
        policy = agent.bundle.policy
        while isinstance(outcome, Suspended):
            ex = agent.ex
            assert ex is not None
            call = outcome.call
            now = time.time()
            usage = agent.usage
            usage["suspensions"] = usage.get("suspensions", 0) + 1
            usage["fuel_used"] = ex.fuel_used
            agent.record["last_progress"] = now
            captured = ex.capture()
            agent.captured = captured
            args_digest = audit.digest(call.args)
            agent.event("tool.requested", call_seq=call.seq, tool=call.tool, args_digest=args_digest)
            try:
                req = policies.ToolRequest(agent_id=agent.agent_id, tool=call.tool, args=call.args, call_seq=call.seq,
                                           principal=agent.record.get("principal"), agent_name=agent.bundle.name)
            except policies.NotJSONError as exc:
                answer = (abi.E_INVALID_ARGS, error_response("invalid_args", f"{call.tool}: {exc}"))
                await self._checkpoint(agent, call, captured, answer)
                outcome = await self._continue(agent, call, *answer)
                continue
            before = self._policy_usage(agent, now)
            decision = policies.decide(policy, req, before, now, custom_validators=agent.validators)
            after = policies.record_decision(policy, before, req, decision, now)
            self._store_usage(agent, after)
            agent.event("tool." + {"allow": "allowed", "deny": "denied", "approval": "approval_requested",
                                   "terminate": "terminated"}.get(decision.kind, decision.kind),
                        call_seq=call.seq, tool=call.tool, decision=decision.to_dict())
            if isinstance(decision, policies.Terminate):
                await self._checkpoint(agent, call, captured, None)
                report = decision.to_dict()
                return await self._finish(agent, Failed(decision.code, decision.reason), status="terminated", report=report)
            if isinstance(decision, policies.RequireApproval):
                approval = {"agent_id": agent.agent_id, "name": agent.bundle.name, "call": call.to_dict(),
                            "reason": decision.reason, "rule": decision.rule, "requested_at": now,
                            "principal": agent.record.get("principal")}
                await self._checkpoint(agent, call, captured, None, status="waiting_approval",
                                       extra={"approval": {"reason": decision.reason, "rule": decision.rule},
                                              "owner": None},
                                       also=lambda txn, a=approval: txn.put_blob("approvals", agent.agent_id, audit.canonical(a)))  # type: ignore[misc]
                self._release(agent)
                return self._result(agent)
            if isinstance(decision, policies.Deny):
                answer = _denial(decision)
                await self._checkpoint(agent, call, captured, answer)
            elif call.tool not in agent.tools:
                answer = (abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {call.tool!r} is available to this agent"))
                await self._checkpoint(agent, call, captured, answer)
            else:
                answer = await self._checkpoint_and_run(agent, call, captured, agent.tools[call.tool])
                exceeded = self._budget_check(agent, after, self._policy_usage(agent, time.time()))
                if exceeded is not None:
                    await self._commit_agent(agent)
                    return await self._finish(agent, Failed("budget_exceeded", exceeded.message), status="terminated",
                                              report=exceeded.to_dict())
            outcome = await self._continue(agent, call, *answer)
        return await self._finish(agent, outcome)

    def _ctx(self, agent: _Agent, call: PendingCall) -> ToolContext:
        def report_tokens(n: int) -> None:
            agent.usage["tokens"] = int(agent.usage.get("tokens", 0)) + max(0, int(n))
            agent.event("tokens.used", call_seq=call.seq, tool=call.tool, tokens=max(0, int(n)), total=agent.usage["tokens"])

        policy = agent.bundle.policy
        grant = policy.grants.get(call.tool)
        secrets: dict[str, str] = {}
        if grant is not None and grant.credentials and self.broker is not None:
            secrets = self.broker.secrets_for(agent.agent_id, call.tool, tuple(grant.credentials),
                                              on_event=lambda kind, data: agent.event(kind, **data))
        return ToolContext(agent_id=agent.agent_id, agent_name=agent.bundle.name, call_seq=call.seq,
                           kv_namespace=f"agent:{agent.agent_id}", principal=agent.record.get("principal"),
                           now=time.time, store=self.store, report_tokens=report_tokens, grant=grant,
                           policy=policy, secrets=secrets)

    def _snapshot_bytes(self, agent: _Agent, call: PendingCall, captured: Captured) -> tuple[int, bytes]:
        seq = int(agent.record.get("checkpoints", 0)) + 1
        u = agent.usage
        snap = Snapshot(agent_id=agent.agent_id, seq=seq, module_digest=agent.bundle.module_digest,
                        abi_version=abi.ABI_VERSION, memory=captured.memory, globals=captured.globals,
                        async_buf=captured.async_buf, entry=abi.ENTRY_EXPORT, pending=call.to_dict(),
                        usage={"fuel_used": u.get("fuel_used", 0), "tool_calls": u.get("tool_calls", 0)},
                        created_at=time.time())
        return seq, encode_snapshot(snap, pristine=agent.loaded.image)

    def _record_checkpoint(self, agent: _Agent, seq: int, size: int, call: PendingCall, status: str) -> None:
        rec = agent.record
        rec["checkpoints"] = seq
        rec["snapshot_bytes"] = int(rec.get("snapshot_bytes", 0)) + size
        rec["last_checkpoint_bytes"] = size
        rec["pending"] = call.to_dict()
        rec["status"] = status
        rec["updated_at"] = time.time()

    async def _checkpoint(self, agent: _Agent, call: PendingCall, captured: Captured,
                          answer: Answer | None, *, status: str = "suspended",
                          extra: dict[str, Any] | None = None, also: Callable[[Any], None] | None = None) -> None:
        """Write snapshot K, the journal intent (with the answer when already known), audit, record: one commit."""
        seq, blob = self._snapshot_bytes(agent, call, captured)
        self._record_checkpoint(agent, seq, len(blob), call, status)
        if extra:
            agent.record.update(extra)
        entry: dict[str, Any] = {"tool": call.tool, "args": call.args, "checkpoint": seq, "state": "intent",
                                 "fuel": agent.usage.get("fuel_used", 0), "t": time.time()}
        if answer is not None:
            entry.update(state="done", status=answer[0], response=answer[1].decode())
            agent.event("tool.answered", call_seq=call.seq, tool=call.tool, status=answer[0], result_digest=audit.digest(answer[1].decode()))
        agent.event("checkpoint", checkpoint=seq, size=len(blob))
        created = agent.record["updated_at"]

        def write(txn: Any) -> None:
            txn.put_checkpoint(agent.agent_id, seq, blob, created)
            txn.put_journal(agent.agent_id, call.seq, entry)
            if also is not None:
                also(txn)

        await self._commit_agent(agent, write)

    async def _checkpoint_and_run(self, agent: _Agent, call: PendingCall, captured: Captured, spec: ToolSpec) -> Answer:
        try:
            args = spec.validate(call.args)
        except ToolError as err:
            answer = self._tool_error(err)
            await self._checkpoint(agent, call, captured, answer)
            return answer
        ctx = self._ctx(agent, call)
        if spec.transactional:
            # Snapshot, intent, the tool's effect and its result: one atomic commit.
            seq, blob = self._snapshot_bytes(agent, call, captured)
            self._record_checkpoint(agent, seq, len(blob), call, "suspended")
            agent.event("checkpoint", checkpoint=seq, size=len(blob))
            base = {"tool": call.tool, "args": call.args, "checkpoint": seq, "fuel": agent.usage.get("fuel_used", 0), "t": time.time()}
            created = agent.record["updated_at"]

            def write(txn: Any) -> Answer:
                txn.put_checkpoint(agent.agent_id, seq, blob, created)
                answer = self._run_transactional(spec, args, ctx, txn)
                txn.put_journal(agent.agent_id, call.seq, {**base, "state": "done", "status": answer[0], "response": answer[1].decode()})
                return answer

            def events(answer: Answer) -> list[tuple[str, dict[str, Any]]]:
                return [("tool.answered", {"call_seq": call.seq, "tool": call.tool, "status": answer[0],
                                           "result_digest": audit.digest(answer[1].decode())})]

            result = await self._commit_agent(agent, write, events)
            assert result is not None
            return result
        await self._checkpoint(agent, call, captured, None)
        answer = await self._run_tool(agent, spec, args, ctx)
        await self._journal_answer(agent, call, answer)
        return answer

    async def _journal_answer(self, agent: _Agent, call: PendingCall, answer: Answer) -> None:
        entry = {"tool": call.tool, "args": call.args, "checkpoint": agent.record["checkpoints"], "state": "done",
                 "fuel": agent.usage.get("fuel_used", 0), "status": answer[0], "response": answer[1].decode(), "t": time.time()}
        agent.event("tool.answered", call_seq=call.seq, tool=call.tool, status=answer[0],
                    result_digest=audit.digest(answer[1].decode()))
        await self._commit_agent(agent, lambda txn: txn.put_journal(agent.agent_id, call.seq, entry))

    def _run_transactional(self, spec: ToolSpec, args: Any, ctx: ToolContext, txn: Any) -> Answer:
        """Run a transactional tool on a write overlay: its writes land only if it succeeds."""
        overlay = WriteOverlay(txn)
        try:
            answer = self._encode_result(spec.func(args, ctx, overlay))
        except ToolError as err:
            return self._tool_error(err)
        except Exception as exc:  # a tool bug must not take the host down
            return abi.E_TOOL_FAILED, error_response("tool_failed", f"{spec.name} failed: {type(exc).__name__}: {exc}")
        if answer[0] == 0:
            overlay.apply()
        return answer

    async def _run_tool(self, agent: _Agent, spec: ToolSpec, args: Any, ctx: ToolContext) -> Answer:
        """Run a tool; if it outlasts ``warm_idle_s``, hibernate the waiting agent meanwhile."""
        result: list[Answer] = []
        done = anyio.Event()

        async def call() -> None:
            try:
                if spec.is_async:
                    value = await spec.func(args, ctx)
                else:
                    value = await anyio.to_thread.run_sync(spec.func, args, ctx)
                result.append(self._encode_result(value))
            except ToolError as err:
                result.append(self._tool_error(err))
            except Exception as exc:
                result.append((abi.E_TOOL_FAILED, error_response("tool_failed", f"{spec.name} failed: {type(exc).__name__}: {exc}")))
            finally:
                done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            size = agent.ex.memory_size() if agent.ex is not None else 0
            if agent.ex is not None and (self.warm_waiting >= self.max_warm
                                         or self.warm_bytes + size > self.max_warm_bytes):
                # Memory pressure: too many instances, or too much memory, already wait
                # warm; go cold at once (the checkpoint is already durable).
                self._hibernate(agent)
            counted = agent.ex is not None
            if counted:
                self.warm_waiting += 1
                self.warm_bytes += size
            try:
                with anyio.move_on_after(self.warm_idle_s):
                    await done.wait()
                if not done.is_set() and agent.ex is not None:
                    self._hibernate(agent)
            finally:
                if counted:
                    self.warm_waiting -= 1
                    self.warm_bytes -= size
        return result[0]

    def _hibernate(self, agent: _Agent) -> None:
        self._release(agent)
        agent.usage["hibernations"] = agent.usage.get("hibernations", 0) + 1

    def _release(self, agent: _Agent) -> None:
        if agent.ex is not None:
            agent.ex.release()
            agent.ex = None

    @staticmethod
    def _encode_result(value: Any) -> Answer:
        try:
            data = _RESULT_JSON(value).encode()
        except (TypeError, ValueError) as exc:
            return abi.E_TOOL_FAILED, error_response("tool_failed", f"the tool returned a value that is not JSON: {exc}")
        if len(data) > abi.MAX_RESPONSE:
            return abi.E_RESULT_TOO_LARGE, error_response("result_too_large", f"the tool's result is {len(data)} bytes; the limit is {abi.MAX_RESPONSE}")
        return 0, data

    @staticmethod
    def _tool_error(err: ToolError) -> Answer:
        errno = abi.ERROR_CODES.get(err.code, abi.E_TOOL_FAILED)
        return errno, error_response(err.code, str(err), retryable=err.retryable, **err.details)

    async def _answer_from_journal(self, agent: _Agent, call: PendingCall) -> Answer | None:
        """The answer to a resumed agent's pending call: recorded, approved, re-run when safe, or parked."""
        with self.store.read() as txn:
            entry = txn.get_journal(agent.agent_id, call.seq)
        if entry is not None and entry.get("state") == "done":
            return int(entry["status"]), str(entry["response"]).encode()
        spec = agent.tools.get(call.tool)
        if entry is not None and entry.get("state") == "approved":
            # A human approved it and the tool has not started: run it, now, once.
            if spec is None:
                answer = (abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {call.tool!r} is available to this agent"))
                await self._journal_answer(agent, call, answer)
                return answer
            agent.record["status"] = "running"
            intent = {**entry, "state": "intent", "t": time.time()}
            await self._commit_agent(agent, lambda txn: txn.put_journal(agent.agent_id, call.seq, intent))
            return await self._execute_now(agent, call, spec)
        if spec is None:
            answer = (abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {call.tool!r} is available to this agent"))
        elif spec.idempotent or spec.transactional:
            # The call was decided and recorded as intent before the crash; safe to run again.
            return await self._execute_now(agent, call, spec)
        else:
            agent.record["status"] = "in_doubt"
            agent.record["in_doubt"] = {
                "call": call.to_dict(),
                "reason": f"{call.tool} is not idempotent and the host stopped after starting it but before recording its result",
            }
            agent.event("agent.in_doubt", call_seq=call.seq, tool=call.tool)
            agent.record["owner"] = None
            await self._commit_agent(agent)
            return None
        await self._journal_answer(agent, call, answer)
        return answer

    async def _execute_now(self, agent: _Agent, call: PendingCall, spec: ToolSpec) -> Answer:
        try:
            args = spec.validate(call.args)
        except ToolError as err:
            answer = self._tool_error(err)
            await self._journal_answer(agent, call, answer)
            return answer
        ctx = self._ctx(agent, call)
        if spec.transactional:
            def write(txn: Any) -> Answer:
                a = self._run_transactional(spec, args, ctx, txn)
                txn.put_journal(agent.agent_id, call.seq, {"tool": call.tool, "args": call.args, "state": "done",
                                                           "fuel": agent.usage.get("fuel_used", 0),
                                                           "status": a[0], "response": a[1].decode(), "t": time.time()})
                return a

            result = await self._commit_agent(agent, write, lambda a: [("tool.answered", {
                "call_seq": call.seq, "tool": call.tool, "status": a[0], "result_digest": audit.digest(a[1].decode())})])
            assert result is not None
            return result
        answer = await self._run_tool(agent, spec, args, ctx)
        await self._journal_answer(agent, call, answer)
        return answer

    async def _continue(self, agent: _Agent, call: PendingCall, status: int, response: bytes) -> Any:
        ex = agent.ex
        if ex is None or not ex.live:
            assert agent.captured is not None
            u = agent.usage
            ex = Execution.restore(agent.loaded, self._pre(agent), agent.limits, agent.input_bytes,
                                   agent.captured, fuel_used=int(u.get("fuel_used", 0)), call_seq=call.seq,
                                   pending=call, log_sink=self._log_sink(agent))
            agent.ex = ex
        if agent.record.get("status") != "running":
            agent.record["status"] = "running"
        return await self._run_guest(agent, ex, ex.resume, status, response)

    async def _finish(self, agent: _Agent, outcome: Any, *, status: str | None = None,
                      report: dict[str, Any] | None = None) -> RunResult:
        rec = agent.record
        ex = agent.ex
        if ex is not None:
            rec["usage"]["fuel_used"] = ex.fuel_used
        self._release(agent)
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
        await self._commit_agent(agent, retire)
        if self.heads.due():
            await anyio.to_thread.run_sync(self.heads.maybe_seal)
        return self._result(agent)

    def _result(self, agent: _Agent) -> RunResult:
        rec = agent.record
        u = rec.get("usage", {})
        return RunResult(
            agent_id=agent.agent_id, status=rec["status"], output=rec.get("output"), error=rec.get("error"),
            fuel_used=int(u.get("fuel_used", 0)), tool_calls=int(u.get("tool_calls", 0)),
            suspensions=int(u.get("suspensions", 0)), checkpoints=int(rec.get("checkpoints", 0)),
            snapshot_bytes=int(rec.get("snapshot_bytes", 0)), tokens=int(u.get("tokens", 0)),
            pending=rec.get("pending") if rec["status"] not in TERMINAL else None,
            approval=rec.get("approval") if rec["status"] == "waiting_approval" else None, logs=list(agent.logs),
        )


def _denial(decision: policies.Deny) -> Answer:
    """A policy denial as the guest sees it (ABI.md section 5): a rate or invocation
    limit is ``rate_limited`` (retryable), every other refusal is ``denied``."""
    extra: dict[str, Any] = {"rule": decision.rule, "reason_code": decision.code}
    if decision.retry_after_s is not None:
        extra["retry_after_s"] = decision.retry_after_s
    if decision.code == "rate_limited" or (decision.code == "budget_exceeded" and ".max_calls" in decision.rule):
        return abi.E_RATE_LIMITED, error_response("rate_limited", decision.reason, retryable=decision.code == "rate_limited", **extra)
    return abi.E_DENIED, error_response("denied", decision.reason, **extra)


# A tool's result as the guest reads it (built once: json.dumps with options builds an encoder per call).
_RESULT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode

def _append_audit(txn: Any, rec: dict[str, Any], events: list[tuple[str, dict[str, Any]]]) -> None:
    """Seal events onto the agent's chain inside ``txn``; updates ``rec``'s chain head."""
    seq = int(rec.get("audit_seq", 0))
    head = str(rec.get("audit_head") or audit.GENESIS)
    now = time.time()
    for kind, data in events:
        seq += 1
        sealed = audit.seal(rec["agent_id"], seq, head, now, kind, data)
        txn.put_blob(audit.BUCKET, audit.record_key(rec["agent_id"], seq), audit.canonical(sealed))
        head = sealed["hash"]
    rec["audit_seq"] = seq
    rec["audit_head"] = head


def _physical_memory() -> int:
    """The machine's RAM in bytes (1 GiB where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 1 << 30


def _stalled(rec: dict[str, Any], now: float) -> bool:
    """No progress (tool call, output) within the policy's stall_timeout while unfinished."""
    limit = rec.get("stall_timeout")
    if not limit or rec.get("status") not in ("running", "suspended", "approved"):
        return False
    return now - float(rec.get("last_progress") or rec.get("created_at") or now) > float(limit)


def _process_start(pid: int) -> int | None:
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


def run_sync(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async host call from synchronous code (the CLI)."""
    return anyio.run(coro_fn)
