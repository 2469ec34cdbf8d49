"""The host: spawns agents, mediates their tool calls, hibernates and resumes them.

:class:`Host` is the embeddable API (the CLI is a thin layer over it). It owns
one Wasmtime :class:`~host.engine.Engine`, one store (LMDB by default) and a
group committer that lets many agents' checkpoints share one commit.

The life of a tool call, which is also the durability protocol:

1. the guest calls ``tool_call``; its instance unwinds (see :mod:`host.execution`);
2. the host asks the policy engine; the agent's state is captured as snapshot
   *K* and written in one transaction with the journal's *intent* record for
   the call (and, for a transactional tool such as ``kv.incr``, with the tool's
   effect and result too);
3. the tool runs; its result is journaled;
4. the instance is rewound with the result — in place if it is still warm, or
   rebuilt from snapshot *K* if it went cold meanwhile.

After a crash, ``resume`` restores the latest snapshot and answers its pending
call from the journal; a call with an intent but no result is re-run only when
the tool is idempotent or transactional, otherwise the agent is parked
``in_doubt`` for an operator. No recorded tool call ever runs twice.
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
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import platformdirs

import policies
from snapshots.errors import SnapshotError
from snapshots.format import Snapshot, decode_snapshot, encode_snapshot
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore

from . import abi, bundle as bundle_mod, imports
from .bundle import Bundle
from .engine import Engine, LoadedModule
from .errors import AgentNotFound, AgentStateError, ConfigError, TorporError
from .execution import Captured, Completed, Execution, Failed, Limits, PendingCall, Suspended, error_response
from .ids import new_agent_id
from .tools.builtin import BUILTINS
from .tools.registry import ToolContext, ToolError, ToolSpec, load_handler, spec_from_function

T = TypeVar("T")

TERMINAL = frozenset({"completed", "failed", "terminated"})
DEFAULT_FUEL = 1_000_000_000
DEFAULT_MEMORY = 64 << 20
DEFAULT_DEADLINE_S = 30.0
LOG_LIMIT = 1000


def default_store_dir() -> Path:
    """``$TORPOR_STORE`` or the user's data directory."""
    env = os.environ.get("TORPOR_STORE")
    if env:
        return Path(env)
    return Path(platformdirs.user_data_dir("torpor")) / "store"


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
    pending: dict[str, Any] | None = None
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
        }
        if self.error is not None:
            d["error"] = self.error
        if self.pending is not None:
            d["pending"] = self.pending
        return d


@dataclass
class _Agent:
    """A running agent's host-side state (its guest state is in ``ex`` or ``captured``)."""

    record: dict[str, Any]
    bundle: Bundle
    loaded: LoadedModule
    tools: dict[str, ToolSpec]
    limits: Limits
    ex: Execution | None = None
    captured: Captured | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def agent_id(self) -> str:
        return str(self.record["agent_id"])

    @property
    def usage(self) -> dict[str, Any]:
        u: dict[str, Any] = self.record.setdefault("usage", {})
        return u


class Host:
    """An embeddable Torpor host on one store directory.

    Use as an async context manager (``async with Host(dir) as host``) or call
    :meth:`close`. ``warm_idle_s`` is how long a suspended agent keeps its
    instance in memory while its tool runs before it is hibernated (released,
    to be rebuilt from its snapshot).
    """

    def __init__(self, store_dir: str | Path | None = None, *, warm_idle_s: float = 0.05,
                 wasm_threads: int | None = None) -> None:
        self.store_dir = Path(store_dir) if store_dir is not None else default_store_dir()
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the store directory {self.store_dir}: {exc.strerror}") from exc
        self.store = LmdbStore.open(self.store_dir / "db")
        self.committer = GroupCommitter(self.store)
        self.engine = Engine(cache_dir=self.store_dir / "cache")
        self.warm_idle_s = warm_idle_s
        self._limiter = anyio.CapacityLimiter(wasm_threads or max(1, os.cpu_count() or 1))
        self._bundles: dict[str, Bundle] = {}
        self._tools: dict[str, dict[str, ToolSpec]] = {}
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

    def _tools_for(self, b: Bundle) -> dict[str, ToolSpec]:
        tools = self._tools.get(b.digest)
        if tools is None:
            tools = {}
            for name, grant in b.policy.grants.items():
                handler = getattr(grant, "handler", None)
                if handler:
                    fn = load_handler(handler, bundle_tools=b.tools, bundle_digest=b.digest)
                    spec = spec_from_function(fn, name=name)
                elif name in BUILTINS:
                    spec = BUILTINS[name]
                else:
                    continue  # granted but unimplemented: calls get `unknown_tool`
                idem = getattr(grant, "idempotent", None)
                if idem is not None and spec.idempotent != bool(idem):
                    spec = ToolSpec(spec.name, spec.func, spec.args_model, bool(idem) and spec.idempotent if not handler else bool(idem), spec.transactional, spec.description)
                tools[name] = spec
            self._tools[b.digest] = tools
        return tools

    def _loaded(self, b: Bundle) -> tuple[LoadedModule, Any]:
        loaded = self.engine.load(b.module, b.module_digest)
        has_tools = bool(b.policy.grants)
        wasi = frozenset(getattr(b.policy, "wasi_allow", ()) or ())
        loaded.check_imports(has_tools, wasi, b.policy.agent.name)

        def make_linker(eng: Any) -> Any:
            import wasmtime

            linker = wasmtime.Linker(eng)
            imports.define(linker, tools=has_tools)
            return linker

        pre = loaded.instance_pre(("v1", has_tools, wasi), make_linker)
        if has_tools and not loaded.suspendable:
            raise TorporError("the module imports tool_call but was not transformed for suspension; repack it with `torpor pack`", code="invalid_module")
        return loaded, pre

    def _limits(self, b: Bundle, fuel: int | None) -> Limits:
        budgets = b.policy.budgets
        return Limits(
            fuel=int(fuel if fuel is not None else (getattr(budgets, "fuel", None) or DEFAULT_FUEL)),
            memory_bytes=int(getattr(budgets, "memory", None) or DEFAULT_MEMORY),
            deadline_s=float(getattr(budgets, "wall_clock", None) or DEFAULT_DEADLINE_S),
        )

    # -- public API ------------------------------------------------------------
    async def run(self, b: Bundle, input: Any = None, *, fuel: int | None = None,
                  on_behalf_of: str | None = None) -> RunResult:
        """Spawn an agent from a bundle and drive it until it finishes or waits on a human."""
        agent = self._spawn(b, input, fuel=fuel, on_behalf_of=on_behalf_of)
        ex = Execution(agent.loaded, self._pre(agent), agent.limits, agent.record["input_raw"].encode(), log_sink=self._log_sink(agent))
        agent.ex = ex
        outcome = await self._run_wasm(ex.start)
        return await self._drive(agent, outcome)

    async def resume(self, agent_id: str) -> RunResult:
        """Continue an agent from its latest checkpoint (after a restart or a crash)."""
        agent, pending = self._load_agent(agent_id)
        if pending is None:
            # Died before its first checkpoint: nothing happened outside it; start over.
            ex = Execution(agent.loaded, self._pre(agent), agent.limits, agent.record["input_raw"].encode(), log_sink=self._log_sink(agent))
            agent.ex = ex
            self._set_status(agent, "running")
            return await self._drive(agent, await self._run_wasm(ex.start))
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

    def fork(self, agent_id: str, checkpoint: int) -> str:
        """A new agent continuing from checkpoint ``checkpoint`` of ``agent_id``."""
        with self.store.read() as txn:
            rec = txn.get_agent(agent_id)
            blob = txn.get_checkpoint(agent_id, checkpoint) if rec else None
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id}")
        if blob is None:
            raise TorporError(f"agent {agent_id} has no checkpoint {checkpoint}", code="checkpoint_not_found")
        snap = decode_snapshot(blob)
        new_id = new_agent_id()
        now = time.time()
        new = dict(rec)
        new.update({
            "agent_id": new_id, "status": "suspended", "parent": {"agent_id": agent_id, "checkpoint": checkpoint},
            "created_at": now, "updated_at": now, "output": None, "error": None, "owner": None,
            "checkpoints": 1, "pending": snap.pending, "usage": dict(snap.usage),
        })
        forked = dataclasses.replace(snap, agent_id=new_id, seq=1, created_at=now)
        data = encode_snapshot(forked)
        new["snapshot_bytes"] = len(data)
        new["last_checkpoint_bytes"] = len(data)
        pending_seq = int(snap.pending["seq"]) if snap.pending else None

        def write(txn: Any) -> None:
            txn.put_agent(new)
            txn.put_checkpoint(new_id, 1, data, now)
            if pending_seq is not None:
                entry = txn.get_journal(agent_id, pending_seq)
                if entry is not None:
                    txn.put_journal(new_id, pending_seq, entry)
            old_ns, new_ns = f"agent:{agent_id}", f"agent:{new_id}"
            for key in txn.kv_keys(old_ns, ""):
                value = txn.kv_get(old_ns, key)
                if value is not None:
                    txn.kv_set(new_ns, key, value)

        self.store.transact(write)
        return new_id

    def list_agents(self) -> list[dict[str, Any]]:
        with self.store.read() as txn:
            return list(txn.iter_agents())

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        with self.store.read() as txn:
            rec = txn.get_agent(agent_id)
        if rec is None:
            raise AgentNotFound(f"no agent {agent_id} in store {self.store_dir}")
        return rec

    def inspect(self, agent_id: str) -> dict[str, Any]:
        rec = self.get_agent(agent_id)
        with self.store.read() as txn:
            cps = txn.list_checkpoints(agent_id)
        out = {k: v for k, v in rec.items() if k not in ("input_raw", "owner")}
        out["checkpoint_list"] = [{"seq": c.seq, "size": c.size, "created_at": c.created_at} for c in cps]
        return out

    # -- internals: spawning and loading ----------------------------------------
    def _spawn(self, b: Bundle, input: Any, *, fuel: int | None, on_behalf_of: str | None) -> _Agent:
        self.register_bundle(b)
        loaded, _ = self._loaded(b)
        tools = self._tools_for(b)
        now = time.time()
        aid = new_agent_id(now)
        input_raw = json.dumps(input, separators=(",", ":"))
        record: dict[str, Any] = {
            "agent_id": aid, "name": b.name, "bundle_digest": b.digest, "module_digest": b.module_digest,
            "status": "running", "input": input, "input_raw": input_raw, "output": None, "error": None,
            "created_at": now, "updated_at": now, "finished_at": None, "principal": on_behalf_of,
            "parent": None, "fuel_limit": fuel, "checkpoints": 0, "snapshot_bytes": 0,
            "last_checkpoint_bytes": 0, "pending": None, "owner": self._owner,
            "usage": {"fuel_used": 0, "tool_calls": 0, "suspensions": 0, "hibernations": 0,
                      "wall_s": 0.0, "tokens": 0, "denials": 0, "calls_by_tool": {}},
        }
        agent = _Agent(record, b, loaded, tools, self._limits(b, fuel))
        self.store.transact(lambda txn: txn.put_agent(record))
        return agent

    def _pre(self, agent: _Agent) -> Any:
        return self._loaded(agent.bundle)[1]

    def _load_agent(self, agent_id: str) -> tuple[_Agent, PendingCall | None]:
        rec = self.get_agent(agent_id)
        status = rec.get("status")
        if status in TERMINAL:
            raise AgentStateError(f"agent {agent_id} is {status}; only unfinished agents can be resumed")
        if status in ("waiting_approval", "in_doubt"):
            raise AgentStateError(f"agent {agent_id} is {status}: an operator must decide before it can resume")
        b = self.bundle_by_digest(rec["bundle_digest"])
        loaded, _ = self._loaded(b)
        agent = _Agent(rec, b, loaded, self._tools_for(b), self._limits(b, rec.get("fuel_limit")))
        rec["owner"] = self._owner
        with self.store.read() as txn:
            seq = txn.latest_checkpoint(agent_id)
            blob = txn.get_checkpoint(agent_id, seq) if seq is not None else None
        if blob is None:
            return agent, None
        try:
            snap = decode_snapshot(blob, expect_module_digest=b.module_digest, expect_abi_version=abi.ABI_VERSION)
        except SnapshotError as exc:
            raise TorporError(f"agent {agent_id}: checkpoint {seq} cannot be restored: {exc}", code="snapshot_corrupt") from exc
        agent.captured = Captured(snap.memory, snap.globals, snap.async_buf)
        agent.record["usage"] = dict(snap.usage)
        agent.record["checkpoints"] = snap.seq
        if snap.pending is None:
            return agent, None
        return agent, PendingCall.from_dict(snap.pending)

    def _resumable(self, rec: dict[str, Any]) -> bool:
        if rec.get("status") in TERMINAL or rec.get("status") in ("waiting_approval", "in_doubt"):
            return False
        owner = rec.get("owner") or {}
        if owner.get("host") == self._owner["host"] and owner.get("pid") not in (None, os.getpid()):
            start = _process_start(int(owner["pid"]))
            if start is not None and start == owner.get("start"):
                return False  # its process is alive and still driving it
        return True

    # -- internals: driving ------------------------------------------------------
    async def _run_wasm(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _commit(self, fn: Callable[[Any], T]) -> T:
        fut = self.committer.submit(fn)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - non-asyncio backend
            return await anyio.to_thread.run_sync(fut.result)
        return await asyncio.wrap_future(fut, loop=loop)

    def _log_sink(self, agent: _Agent) -> Callable[[int, str], None]:
        def sink(level: int, message: str) -> None:
            if len(agent.logs) < LOG_LIMIT:
                agent.logs.append({"level": imports.LOG_LEVELS[level], "message": message})

        return sink

    async def _drive(self, agent: _Agent, outcome: Any) -> RunResult:
        """Serve tool calls until the agent completes, fails or parks."""
        while isinstance(outcome, Suspended):
            ex = agent.ex
            assert ex is not None
            call = outcome.call
            usage = agent.usage
            usage["suspensions"] = usage.get("suspensions", 0) + 1
            usage["fuel_used"] = ex.fuel_used
            usage["tool_calls"] = call.seq
            by_tool = usage.setdefault("calls_by_tool", {})
            by_tool[call.tool] = by_tool.get(call.tool, 0) + 1
            captured = ex.capture()
            agent.captured = captured
            decision = self._decide(agent, call)
            spec = agent.tools.get(call.tool)
            if isinstance(decision, policies.Terminate):
                await self._checkpoint(agent, call, captured, None)
                return await self._finish(agent, Failed("terminated", decision.reason), status="terminated")
            if isinstance(decision, policies.RequireApproval):
                await self._checkpoint(agent, call, captured, None, status="waiting_approval",
                                       extra={"approval": {"reason": decision.reason, "rule": decision.rule}})
                ex.release()
                agent.ex = None
                return self._result(agent)
            if isinstance(decision, policies.Deny):
                usage["denials"] = usage.get("denials", 0) + 1
                answer = (abi.E_DENIED, error_response("denied", decision.reason, rule=decision.rule, reason_code=decision.code))
                await self._checkpoint(agent, call, captured, answer)
            elif spec is None:
                answer = (abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {call.tool!r} is available to this agent"))
                await self._checkpoint(agent, call, captured, answer)
            else:
                answer = await self._checkpoint_and_run(agent, call, captured, spec)
            outcome = await self._continue(agent, call, *answer)
        return await self._finish(agent, outcome)

    def _decide(self, agent: _Agent, call: PendingCall) -> Any:
        u = agent.usage
        req = policies.ToolRequest(agent_id=agent.agent_id, tool=call.tool, args=call.args, call_seq=call.seq,
                                   principal=agent.record.get("principal"), agent_name=agent.record.get("name"))
        usage = policies.Usage(fuel_used=int(u.get("fuel_used", 0)), tool_calls=int(u.get("tool_calls", 0)) - 1,
                               tokens=int(u.get("tokens", 0)), denials=int(u.get("denials", 0)),
                               calls_by_tool=dict(u.get("calls_by_tool", {})),
                               wall_clock_s=float(u.get("wall_s", 0.0)))
        return policies.decide(agent.bundle.policy, req, usage, time.time())

    def _ctx(self, agent: _Agent, call: PendingCall) -> ToolContext:
        return ToolContext(agent_id=agent.agent_id, agent_name=agent.bundle.name, call_seq=call.seq,
                           kv_namespace=f"agent:{agent.agent_id}", principal=agent.record.get("principal"),
                           now=time.time, store=self.store)

    def _snapshot_bytes(self, agent: _Agent, call: PendingCall, captured: Captured) -> tuple[int, bytes]:
        seq = int(agent.record.get("checkpoints", 0)) + 1
        snap = Snapshot(agent_id=agent.agent_id, seq=seq, module_digest=agent.bundle.module_digest,
                        abi_version=abi.ABI_VERSION, memory=captured.memory, globals=captured.globals,
                        async_buf=captured.async_buf, entry=abi.ENTRY_EXPORT, pending=call.to_dict(),
                        usage=dict(agent.usage), created_at=time.time())
        return seq, encode_snapshot(snap)

    def _record_checkpoint(self, agent: _Agent, seq: int, size: int, call: PendingCall, status: str) -> dict[str, Any]:
        rec = agent.record
        rec["checkpoints"] = seq
        rec["snapshot_bytes"] = int(rec.get("snapshot_bytes", 0)) + size
        rec["last_checkpoint_bytes"] = size
        rec["pending"] = call.to_dict()
        rec["status"] = status
        rec["updated_at"] = time.time()
        return dict(rec)

    async def _checkpoint(self, agent: _Agent, call: PendingCall, captured: Captured,
                          answer: tuple[int, bytes] | None, *, status: str = "suspended",
                          extra: dict[str, Any] | None = None) -> None:
        """Write snapshot K, the journal intent, and (when already known) the answer, in one commit."""
        seq, blob = self._snapshot_bytes(agent, call, captured)
        rec = self._record_checkpoint(agent, seq, len(blob), call, status)
        if extra:
            rec.update(extra)
            agent.record.update(extra)
        entry: dict[str, Any] = {"tool": call.tool, "args": call.args, "checkpoint": seq, "state": "intent", "t": time.time()}
        if answer is not None:
            entry.update(state="done", status=answer[0], response=answer[1].decode())

        def write(txn: Any) -> None:
            txn.put_checkpoint(agent.agent_id, seq, blob, rec["updated_at"])
            txn.put_journal(agent.agent_id, call.seq, entry)
            txn.put_agent(rec)

        await self._commit(write)

    async def _checkpoint_and_run(self, agent: _Agent, call: PendingCall, captured: Captured, spec: ToolSpec) -> tuple[int, bytes]:
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
            rec = self._record_checkpoint(agent, seq, len(blob), call, "suspended")
            base = {"tool": call.tool, "args": call.args, "checkpoint": seq, "t": time.time()}

            def write(txn: Any) -> tuple[int, bytes]:
                txn.put_checkpoint(agent.agent_id, seq, blob, rec["updated_at"])
                txn.put_agent(rec)
                answer = self._run_transactional(spec, args, ctx, txn)
                txn.put_journal(agent.agent_id, call.seq, {**base, "state": "done", "status": answer[0], "response": answer[1].decode()})
                return answer

            return await self._commit(write)
        await self._checkpoint(agent, call, captured, None)
        answer = await self._run_tool(agent, spec, args, ctx)
        entry = {"tool": call.tool, "args": call.args, "checkpoint": agent.record["checkpoints"], "state": "done",
                 "status": answer[0], "response": answer[1].decode(), "t": time.time()}
        await self._commit(lambda txn: txn.put_journal(agent.agent_id, call.seq, entry))
        return answer

    def _run_transactional(self, spec: ToolSpec, args: Any, ctx: ToolContext, txn: Any) -> tuple[int, bytes]:
        try:
            return self._encode_result(spec.func(args, ctx, txn))
        except ToolError as err:
            return self._tool_error(err)
        except Exception as exc:  # a tool bug must not take the host down
            return abi.E_TOOL_FAILED, error_response("tool_failed", f"{spec.name} failed: {type(exc).__name__}: {exc}")

    async def _run_tool(self, agent: _Agent, spec: ToolSpec, args: Any, ctx: ToolContext) -> tuple[int, bytes]:
        """Run a tool; if it outlasts ``warm_idle_s``, hibernate the waiting agent meanwhile."""
        result: list[tuple[int, bytes]] = []

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

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await anyio.sleep(0)
            if not result:
                with anyio.move_on_after(self.warm_idle_s):
                    while not result:
                        await anyio.sleep(0.001)
                if not result and agent.ex is not None:
                    agent.ex.release()
                    agent.ex = None
                    agent.usage["hibernations"] = agent.usage.get("hibernations", 0) + 1
        return result[0]

    @staticmethod
    def _encode_result(value: Any) -> tuple[int, bytes]:
        try:
            data = json.dumps(value, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            return abi.E_TOOL_FAILED, error_response("tool_failed", f"the tool returned a value that is not JSON: {exc}")
        if len(data) > abi.MAX_RESPONSE:
            return abi.E_RESULT_TOO_LARGE, error_response("result_too_large", f"the tool's result is {len(data)} bytes; the limit is {abi.MAX_RESPONSE}")
        return 0, data

    @staticmethod
    def _tool_error(err: ToolError) -> tuple[int, bytes]:
        errno = abi.ERROR_CODES.get(err.code, abi.E_TOOL_FAILED)
        return errno, error_response(err.code, str(err), retryable=err.retryable, **err.details)

    async def _answer_from_journal(self, agent: _Agent, call: PendingCall) -> tuple[int, bytes] | None:
        """The answer to a resumed agent's pending call: recorded, re-run when safe, or parked."""
        with self.store.read() as txn:
            entry = txn.get_journal(agent.agent_id, call.seq)
        if entry is not None and entry.get("state") == "done":
            return int(entry["status"]), str(entry["response"]).encode()
        spec = agent.tools.get(call.tool)
        decision = self._decide(agent, call)
        if isinstance(decision, policies.Deny):
            answer = (abi.E_DENIED, error_response("denied", decision.reason, rule=decision.rule))
        elif spec is None:
            answer = (abi.E_UNKNOWN_TOOL, error_response("unknown_tool", f"no tool named {call.tool!r} is available to this agent"))
        elif spec.idempotent or spec.transactional:
            try:
                args = spec.validate(call.args)
            except ToolError as err:
                answer = self._tool_error(err)
            else:
                ctx = self._ctx(agent, call)
                if spec.transactional:
                    def write(txn: Any) -> tuple[int, bytes]:
                        a = self._run_transactional(spec, args, ctx, txn)
                        txn.put_journal(agent.agent_id, call.seq, {"tool": call.tool, "args": call.args, "state": "done", "status": a[0], "response": a[1].decode(), "t": time.time()})
                        return a
                    return await self._commit(write)
                answer = await self._run_tool(agent, spec, args, ctx)
        else:
            self._set_status(agent, "in_doubt", extra={"in_doubt": {
                "call": call.to_dict(),
                "reason": f"{call.tool} is not idempotent and the host stopped after starting it but before recording its result",
            }})
            return None
        await self._commit(lambda txn: txn.put_journal(agent.agent_id, call.seq, {"tool": call.tool, "args": call.args, "state": "done", "status": answer[0], "response": answer[1].decode(), "t": time.time()}))
        return answer

    async def _continue(self, agent: _Agent, call: PendingCall, status: int, response: bytes) -> Any:
        ex = agent.ex
        if ex is None or not ex.live:
            assert agent.captured is not None
            u = agent.usage
            ex = Execution.restore(agent.loaded, self._pre(agent), agent.limits, agent.record["input_raw"].encode(),
                                   agent.captured, fuel_used=int(u.get("fuel_used", 0)), call_seq=call.seq,
                                   pending=call, log_sink=self._log_sink(agent))
            agent.ex = ex
        return await self._run_wasm(ex.resume, status, response)

    def _set_status(self, agent: _Agent, status: str, *, extra: dict[str, Any] | None = None) -> None:
        agent.record["status"] = status
        agent.record["updated_at"] = time.time()
        if extra:
            agent.record.update(extra)
        rec = dict(agent.record)
        self.store.transact(lambda txn: txn.put_agent(rec))

    async def _finish(self, agent: _Agent, outcome: Any, *, status: str | None = None) -> RunResult:
        rec = agent.record
        ex = agent.ex
        if ex is not None:
            rec["usage"]["fuel_used"] = ex.fuel_used
            ex.release()
            agent.ex = None
        now = time.time()
        if isinstance(outcome, Completed):
            rec.update(status="completed", output=outcome.output, error=None)
        else:
            assert isinstance(outcome, Failed)
            rec.update(status=status or "failed", error={"code": outcome.code, "message": outcome.message})
        rec.update(finished_at=now, updated_at=now, pending=None, owner=None)
        snapshot = dict(rec)
        await self._commit(lambda txn: txn.put_agent(snapshot))
        return self._result(agent)

    def _result(self, agent: _Agent) -> RunResult:
        rec = agent.record
        u = rec.get("usage", {})
        return RunResult(
            agent_id=agent.agent_id, status=rec["status"], output=rec.get("output"), error=rec.get("error"),
            fuel_used=int(u.get("fuel_used", 0)), tool_calls=int(u.get("tool_calls", 0)),
            suspensions=int(u.get("suspensions", 0)), checkpoints=int(rec.get("checkpoints", 0)),
            snapshot_bytes=int(rec.get("snapshot_bytes", 0)),
            pending=rec.get("pending") if rec["status"] not in TERMINAL else None, logs=list(agent.logs),
        )


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
