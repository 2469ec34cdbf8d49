"""The host: spawns agents, mediates their tool calls, hibernates and resumes them.

:class:`Host` is the embeddable API (the CLI is a thin layer over it), and a thin
facade: it opens the parts and hands each piece of work to the module that owns it.

* lifecycle (:mod:`host.runtime.lifecycle`): spawn, load and claim, finish;
* mediation (:mod:`host.runtime.tool_call`): the life of one tool call, which is also
  the durability protocol, top to bottom in one module;
* decisions of a person (:mod:`host.runtime.approvals`) and :mod:`host.runtime.fork`;
* queries (:mod:`host.runtime.queries`): pure reads of the store.

It owns one Wasmtime :class:`~host.sandbox.engine.Engine`, one store (LMDB by default),
a group committer that lets many agents' checkpoints share one commit, the guest runner
that decides where guest code runs and which instances wait warm, and the concurrency
pools agents queue on.

A call that needs a human parks the agent ``waiting_approval``: it holds no
instance, no thread and no pool slot, only its checkpoint. ``approve`` and
``deny`` (from any process) decide it and resume the agent.

An agent that sleeps (``timer.sleep``, or a rate-limited call whose grant waits) past a
moment parks ``sleeping`` the same way, with its wake-up in the store's wake index
(:mod:`host.runtime.timers`). Nothing in this class wakes it by itself: ``torpor serve``
does, at its time; an embedding program calls :meth:`Host.wake_due` (every due agent, once)
when :meth:`Host.wakeups` says one is due, e.g. in a loop::

    while host.wakeups():
        await anyio.sleep(max(0.0, host.wakeups()[0].at - time.time()))
        await host.wake_due()
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio

from host.errors import AgentStateError, ConfigError
from host.paths import default_store_dir
from host.runtime import approvals as approvals_mod
from host.runtime import lifecycle as lifecycle_mod
from host.runtime import logs as logs_mod
from host.runtime import observe as observe_mod
from host.runtime import queries, timers
from host.runtime import tracing as tracing_mod
from host.runtime.agent import LiveAgent, RunResult
from host.runtime.commits import AgentCommits
from host.runtime.fork import fork as fork_agent
from host.runtime.guest import GuestRunner
from host.runtime.leases import HostLease
from host.runtime.lifecycle import Lifecycle
from host.runtime.loader import BundleLoader, limits_for
from host.runtime.observe import NOBODY, Observer
from host.runtime.pools import PriorityPool, slots
from host.runtime.registry import DEFAULT_TENANT, Registry
from host.runtime.timers import Wakeup
from host.runtime.tool_call import Ended, Parked, ToolCallPipeline
from host.runtime.tracing import Tracing
from host.sandbox import validate
from host.sandbox.bundle import Bundle
from host.sandbox.engine import Engine, EngineConfig, LoadedModule
from host.sandbox.execution import Limits, Outcome
from host.tools import mcp_config
from host.tools.mcp_config import OperatorConfig
from host.tools.sources import ToolSources
from host.trust import audit
from host.trust.credentials import CredentialBroker
from host.trust.identity import IdentityService
from snapshots.errors import StoreConfigError, StoreFull, StoreUnavailable
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore
from snapshots.store import UNREADABLE, AgentStore, SyncWhen

__all__ = ["CredentialBroker", "Host", "RunResult", "default_store_dir", "run_sync"]

T = TypeVar("T")

DEFAULT_POOL_SIZE = 64


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

    The tools a policy's ``handler = "module:function"`` may name are the operator's
    (:mod:`host.tools.sources`): ``handlers`` (``{"module:function": fn}``), the
    ``torpor.tools`` entry points of installed packages, and the ``*.py`` of
    ``tools_dirs`` (default ``$TORPOR_TOOLS_PATH``). ``trust_bundle_code``: digests of the
    bundles whose own Python may run in this process; any other bundle that carries Python
    is refused (``bundle_code_refused``).
    ``max_memory``: the operator's cap on any agent's memory (bytes, or a size such as
    ``"256MiB"``; default ``$TORPOR_MAX_MEMORY``, else none), whatever its bundle's
    ``budgets.memory`` says: an agent gets the smaller of the two, and a module whose
    initial memory is above it is refused (``memory_limit``) before anything is allocated.
    ``observer``: who is told of spawns, guest segments, suspensions, resumes and commits
    (:mod:`host.runtime.observe`; a server's metrics); nobody by default, see :meth:`observe`.
    ``tracing``: the OpenTelemetry spans of what agents do (:mod:`host.runtime.tracing`),
    told the same things beside the observer; by default built from the environment
    (``OTEL_EXPORTER_OTLP_ENDPOINT``), none when it does not ask for traces.
    ``checkpoint_every``: the most tool calls one checkpoint covers (default
    ``$TORPOR_CHECKPOINT_EVERY``, else 1: a checkpoint at every call). Above 1, an allowed
    transactional call (``kv.incr``: its effect and answer commit together) between
    checkpoints writes its journal entry, effect and audit only, and the guest goes on in
    place; a checkpoint is still taken every that many calls, every
    :data:`~host.runtime.tool_call.CHECKPOINT_EVERY_S`, and at every other call (a
    non-transactional tool, a denial, an approval, a wait). After a crash the agent is
    re-executed from its last checkpoint, fed the journaled answers (no tool runs again,
    nothing is counted or audited twice), then goes live (:mod:`host.runtime.tool_call`).
    ``operator_config``: how this host starts or reaches the MCP servers policies name, and
    the roots they refer to (:mod:`host.tools.mcp_config`: an ``OperatorConfig``, or the path
    of a ``torpor.toml``); by default none, so a policy naming a server is refused when its
    run starts unless it says itself how to start it (the deprecated form).
    """

    def __init__(self, store_dir: str | Path | None = None, *, warm_idle_s: float = 0.05,
                 wasm_threads: int | None = None, pool_size: int = DEFAULT_POOL_SIZE,
                 class_pools: dict[str, int] | None = None, broker: CredentialBroker | None = None,
                 max_warm: int = 10_000, store: AgentStore | None = None,
                 engine: str | EngineConfig | None = None, durability: str | None = None,
                 max_warm_bytes: int | None = None, handlers: Mapping[str, Callable[..., Any]] | None = None,
                 tools_dirs: Sequence[str | Path] | None = None, trust_bundle_code: Iterable[str] = (),
                 max_memory: int | str | None = None, observer: Observer | None = None,
                 tracing: Tracing | None = None, lease_s: float | None = None,
                 operator_config: OperatorConfig | str | Path | None = None,
                 checkpoint_every: int | None = None) -> None:
        # Arguments first: nothing is opened yet that a bad one would leave open.
        operator = (operator_config if isinstance(operator_config, OperatorConfig)
                    else mcp_config.EMPTY if operator_config is None else mcp_config.load(operator_config))
        config = engine if isinstance(engine, EngineConfig) else EngineConfig.for_profile(engine)
        sources = ToolSources(handlers=handlers, tools_dirs=tools_dirs, trust_bundle_code=trust_bundle_code)
        memory_cap = validate.max_memory(max_memory)
        every = _checkpoint_every(checkpoint_every)
        traced = tracing if tracing is not None else tracing_mod.from_env()  # OTEL_* refused before opening
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
        self.pool = PriorityPool(pool_size, "host")
        self.class_pools = {name: PriorityPool(size, name) for name, size in (class_pools or {}).items()}
        if broker is None:
            from host.trust.credentials import VaultBroker

            broker = VaultBroker.for_store(self.store_dir)  # the store's own vault (opened lazily)
        self.broker: CredentialBroker | None = broker
        self.identity = IdentityService(self.store, self.store_dir)  # agent tokens; the host signing key
        self.heads = audit.HeadSealer(self.store, lambda: self.identity.key)  # signed audit heads
        self.guest = GuestRunner(threads=wasm_threads or max(1, os.cpu_count() or 1), warm_idle_s=warm_idle_s,
                                 max_warm=max_warm, max_warm_bytes=max_warm_bytes)
        self.operator_config = operator
        self.loader = BundleLoader(self.store, self.engine, sources, max_memory=memory_cap, mcp_config=operator)
        # In a fleet (lease_s given: hosts sharing one store), this host's lease, renewed by
        # the server while it lives; its agents' claims name it, and its commits are fenced.
        self.lease = HostLease(lease_s) if lease_s is not None else None
        self.commits = AgentCommits(self.committer, fence=self.lease.lease_id if self.lease else None)
        self.calls = ToolCallPipeline(self.store, self.commits, self.guest, self.broker, mcp_config=operator)
        self.calls.checkpoint_every = every
        self.lifecycle = Lifecycle(self.store, self.store_dir, self.loader, self.commits, self.guest,
                                   self.identity, self.heads, self.broker, lease=self.lease)
        if self.lease is not None:
            self.renew_lease()
        self.registry = Registry(self.store)  # named, versioned, tagged bundles (`torpor push`)
        self.observer: Observer = NOBODY
        self.tracing = traced
        self.observe(observer if observer is not None else NOBODY)

    def observe(self, observer: Observer) -> None:
        """Tell ``observer`` what this host does from now on (it replaces the one before).

        The parts that see the moments it is told of (the commits, the guest runner) hold
        it; the host itself tells it of spawns and resumes. With tracing on, the tracer is
        told too (one fan-out); off, ``observer`` is held as it is: the seam costs what it did."""
        if self.tracing is not None:
            observer = observe_mod.fan_out(observer, self.tracing)
        self.observer = observer
        self.commits.observer = observer
        self.guest.observer = observer

    # -- context management ---------------------------------------------------
    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def renew_lease(self) -> float:
        """Extend this host's fleet lease (see :mod:`host.runtime.leases`); its new expiry."""
        if self.lease is None:
            raise ConfigError("this host runs alone (no lease_s): there is no lease to renew")
        return self.lease.renew(self.store)

    def close(self) -> None:
        self.committer.close()
        if self.lease is not None:
            try:  # a clean stop frees this host's agents for the others at once
                self.lease.release(self.store)
            except Exception as exc:  # the cluster is gone: the lease expires by itself
                import logging

                logging.getLogger("torpor.host").warning("could not release the lease %s: %s",
                                                         self.lease.lease_id, exc)
        try:
            if getattr(self.store, "commits", 0):
                self.heads.maybe_seal()  # sign the audit log's heads, if one is due
        finally:
            self.store.close()
            if self.tracing is not None:
                self.tracing.shutdown()  # the spans still batched go out before the process ends

    # -- the guest runner's gauges, as the host's ---------------------------------
    @property
    def warm_waiting(self) -> int:
        """Instances kept in memory while their agent waits on a tool."""
        return self.guest.warm_waiting

    @property
    def warm_bytes(self) -> int:
        """The linear memory of the instances waiting warm."""
        return self.guest.warm_bytes

    # -- bundles and modules ---------------------------------------------------------
    def register_bundle(self, b: Bundle) -> None:
        """Keep the bundle in the store so any later resume can find the exact module."""
        self.loader.register(b)

    def bundle_by_digest(self, digest: str) -> Bundle:
        return self.loader.by_digest(digest)

    def load_module(self, b: Bundle) -> tuple[LoadedModule, Any]:
        """The compiled module and the ``InstancePre`` for a bundle, imports checked against its policy."""
        return self.loader.module(b)

    def limits_for(self, b: Bundle, fuel: int | None, fuel_used: int = 0) -> Limits:
        """Limits for one run: per-run fuel on top of what was used, capped by the total."""
        return limits_for(b, fuel, fuel_used, self.loader.max_memory)

    # -- running agents ------------------------------------------------------------------
    async def run(self, b: Bundle, input: Any = None, *, fuel: int | None = None,
                  on_behalf_of: str | None = None, priority: int | None = None,
                  tenant: str | None = None, started_as: Mapping[str, Any] | None = None) -> RunResult:
        """Spawn an agent from a bundle and drive it until it finishes or parks.

        ``started_as``: the registry reference that named the bundle (see :meth:`run_ref`).
        The spawn is not synced on its own: nobody hears of the agent before the run's next
        commit (a checkpoint, a park, its end), which is durable and covers it, so a run
        without tool calls costs one sync, not two."""
        _, drive = await self.start(b, input, fuel=fuel, on_behalf_of=on_behalf_of, priority=priority,
                                    tenant=tenant, started_as=started_as, sync="later")
        return await drive()

    async def start(self, b: Bundle, input: Any = None, *, fuel: int | None = None,
                    on_behalf_of: str | None = None, priority: int | None = None, tenant: str | None = None,
                    also: Callable[[Any, str], None] | None = None, started_as: Mapping[str, Any] | None = None,
                    sync: SyncWhen = "now", claim: bool = True) -> tuple[str, Callable[[], Awaitable[RunResult]]]:
        """Spawn an agent (its record committed) and return its id with the call that drives it.

        Why split from :meth:`run`: a server answers with the new agent's id as soon as the
        spawn is durable and drives the agent in the background. ``tenant`` is recorded on
        the agent (whom a server ran it for); ``also`` adds writes to the spawn's own
        transaction (see :meth:`~host.runtime.lifecycle.Lifecycle.spawn`); ``started_as``:
        the registry reference that named the bundle (:meth:`~host.runtime.registry.Registry.lookup`).
        ``sync="later"``: the caller tells nobody of the agent until the drive's next commit
        or :meth:`settle` (a server waiting for the run's end): the spawn is not synced alone.
        ``claim=False``: the spawn names no owner (a fleet hands the run to its work queue,
        and whichever host takes it claims it); the drive returned must then not be called."""
        t0 = time.perf_counter()
        agent = await self.lifecycle.spawn(b, input, fuel=fuel, on_behalf_of=on_behalf_of, tenant=tenant, also=also,
                                           started_as=started_as, sync=sync, claim=claim)
        self.observer.spawned(agent, time.perf_counter() - t0)

        async def drive() -> RunResult:
            async with self._slots(agent.bundle, priority):
                self.lifecycle.begin_run(agent)
                return await self._drive(agent, lambda: self.guest.start(agent))

        return agent.agent_id, drive

    async def settle(self) -> None:
        """Make every commit so far durable: a sync only when a ``sync="later"`` spawn is
        still unsynced (else no I/O). Run before telling anyone of such an agent."""
        await self.commits.settle()

    async def run_ref(self, ref: str, input: Any = None, *, tenant: str = DEFAULT_TENANT, fuel: int | None = None,
                      on_behalf_of: str | None = None, priority: int | None = None) -> RunResult:
        """Run the bundle a registry reference names now (``procurement@production``,
        ``procurement``, ``sha256:<hex>``; see :mod:`host.runtime.registry`).

        The reference is resolved once, here: the agent records the digest it got and the
        reference it was started as, and keeps that digest whatever the tag does later.
        """
        resolved = self.registry.lookup(ref, tenant=tenant)
        b = self.bundle_by_digest(resolved.digest)
        return await self.run(b, input, fuel=fuel, on_behalf_of=on_behalf_of, priority=priority, tenant=tenant,
                              started_as=resolved.to_dict())

    async def resume(self, agent_id: str, *, priority: int | None = None) -> RunResult:
        """Continue an agent from its latest checkpoint (after a restart, a crash or a decision).

        An agent whose bundle, module, input, checkpoint or journaled answer cannot be used
        (damaged, or not matching its digest) is parked ``corrupt`` (its error names what)
        instead of raising: see :func:`host.runtime.lifecycle.damage`.
        """
        t0 = time.perf_counter()
        try:
            agent, pending = self.lifecycle.load(agent_id)
        except Exception as exc:
            error = lifecycle_mod.damage(exc)
            if error is None:
                raise
            return self.lifecycle.park_corrupt(agent_id, error)
        self.observer.resumed(agent, time.perf_counter() - t0)
        async with self._slots(agent.bundle, priority):
            self.lifecycle.begin_run(agent)
            # In a fleet the event names the host that resumed it (its lease): who took it over.
            agent.event("agent.resumed", checkpoint=agent.record.get("checkpoints", 0),
                        **({"host": self.lease.lease_id} if self.lease is not None else {}))
            lifecycle_mod.note_bundle_code(agent, self.loader.bundle_code(agent.bundle))
            if pending is None:
                # Died before its first checkpoint: nothing happened outside it; start over.
                agent.record["status"] = "running"
                await self.commits.agent(agent)
                return await self._drive(agent, lambda: self.guest.start(agent))

            async def answered() -> Outcome | Ended | Parked:
                assert pending is not None
                step = await self.calls.recover(agent, pending)
                return step if isinstance(step, Ended | Parked) else await self.guest.answer(agent, pending, *step)

            return await self._drive(agent, answered)

    async def _drive(self, agent: LiveAgent, first: Callable[[], Awaitable[Outcome | Ended | Parked]]) -> RunResult:
        """Run the agent's first segment, serve its tool calls until it ends (then finish it)
        or parks. The agent's error boundary: whatever goes wrong while handling this agent
        ends this agent, with the error recorded, and nothing else; only a store that
        cannot be written (full, unavailable) or a signal stops the caller.

        Damage to the agent's own stored state (a journal answer that does not match its
        digest, read by ``recover`` at resume; see :func:`~host.runtime.lifecycle.damage`)
        parks it ``corrupt`` as at load, with its data left as it is for an operator: it
        must not finish, since what it would finish with is not what was recorded."""
        try:
            outcome = await first()
            step = outcome if isinstance(outcome, Ended | Parked) else await self.calls.serve(agent, outcome)
        except Exception as exc:
            if isinstance(exc, StoreFull | StoreUnavailable):
                raise  # the agent stays at its last commit, to resume once the store is back
            self.guest.release(agent)
            error = lifecycle_mod.damage(exc)
            if error is not None:
                return self.lifecycle.park_corrupt(agent.agent_id, error)
            step = Ended(lifecycle_mod.host_error(exc))
        if isinstance(step, Parked):
            return agent.result()
        return await self.lifecycle.finish(agent, step)

    def _slots(self, b: Bundle, priority: int | None) -> Any:
        agent_cfg = b.policy.agent
        return slots(self.pool, self.class_pools.get(agent_cfg.pool),
                     agent_cfg.priority if priority is None else priority)

    def check_resumable(self, rec: dict[str, Any], now: float | None = None) -> None:
        """Refuse, with the error :meth:`resume` would raise, to resume the agent of ``rec``
        (finished, parked on a person, asleep before its time, driven by another live
        process), touching nothing: for a caller that answers before it resumes in the
        background (``torpor serve``)."""
        self.lifecycle.check_resumable(rec, time.time() if now is None else now)

    async def resume_all(self) -> list[RunResult]:
        """Resume every agent that is not finished, not parked, and not owned by a live
        process, and every sleeping one whose time has come (:meth:`due`)."""
        ids = self.resumable()
        return await self._resume_each([*ids, *(a for a in self.due() if a not in set(ids))])

    async def wake_due(self) -> list[RunResult]:
        """Resume every sleeping agent whose wake time has come, each once (the embedded
        counterpart of ``torpor serve``'s timer loop: call it when :meth:`wakeups` says so)."""
        return await self._resume_each(self.due())

    def due(self, now: float | None = None) -> list[str]:
        """The sleeping agents whose wake time has come, earliest first (entries of the wake
        index naming no such agent are dropped on the way: see :func:`host.runtime.timers.sweep`)."""
        return [w.agent_id for w in timers.sweep(self.store, time.time() if now is None else now)]

    def wakeups(self) -> list[Wakeup]:
        """Every sleeping agent's wake-up (agent, time, reason), earliest first."""
        return timers.entries(self.store)

    async def _resume_each(self, ids: Sequence[str]) -> list[RunResult]:
        """Resume each agent concurrently; an error is reported for it, and the others go on."""
        results: list[RunResult] = []

        async def one(aid: str) -> None:
            # Each agent on its own: an error is reported for it, and the others go on.
            try:
                results.append(await self.resume(aid))
            except AgentStateError as exc:  # another process took it meanwhile, or it finished
                results.append(_not_resumed(self.store, aid, "not_resumed", exc))
            except Exception as exc:
                code = getattr(exc, "code", None)
                results.append(_not_resumed(self.store, aid, code if isinstance(code, str) else "host_error", exc))

        async with anyio.create_task_group() as tg:
            for aid in ids:
                tg.start_soon(one, aid)
        return results

    def resumable(self) -> list[str]:
        """The agents :meth:`resume_all` would resume (unfinished, not parked, not driven by a
        live process), in id order; a record that does not decode is parked corrupt on the way."""
        agents = self.list_agents()
        for r in agents:
            if r.get(UNREADABLE):  # list it as corrupt from now on (ps reads summaries, not records)
                self.lifecycle.park_corrupt(r["agent_id"], r["error"])
        return [r["agent_id"] for r in agents if self.lifecycle.resumable(r)]

    def orphaned(self, now: float | None = None) -> list[str]:
        """In a fleet: the resumable agents this host may take over. Those claimed under
        another host's lease once it expired, or under none; and those under our own lease
        untouched for a whole lease period, whose drive here ended without parking them
        (the store was away at a commit): the caller skips those it is driving. A fresh
        claim of ours is a drive about to start, not an orphan."""
        if self.lease is None:
            return []
        mine, now = self.lease.lease_id, time.time() if now is None else now
        out = []
        for r in self.list_agents():
            if not self.lifecycle.resumable(r):
                continue
            if (r.get("owner") or {}).get("lease") != mine or float(r.get("updated_at") or 0) < now - self.lease.lease_s:
                out.append(r["agent_id"])
        return out

    # -- a person's decisions ------------------------------------------------------------
    def approvals(self) -> list[dict[str, Any]]:
        """Pending approval requests: the call, its arguments and the rule that asked."""
        return queries.approvals(self.store)

    async def approve(self, agent_id: str, *, note: str | None = None, by: str | None = None,
                      answer: Any = None) -> RunResult:
        """Approve the call an agent waits on, then resume it (the tool runs).  An agent that
        waits on a question (an MCP server's elicitation) takes ``answer``, checked against
        the schema asked for: the call is made again with it."""
        self.decide_approve(agent_id, note=note, by=by, answer=answer)
        return await self.resume(agent_id)

    async def deny(self, agent_id: str, *, reason: str, by: str | None = None) -> RunResult:
        """Deny the call an agent waits on, then resume it (the guest sees a denial)."""
        self.decide_deny(agent_id, reason=reason, by=by)
        return await self.resume(agent_id)

    def decide_approve(self, agent_id: str, *, note: str | None = None, by: str | None = None,
                       answer: Any = None) -> None:
        """Record the approval (or the answer to a question) only (status ``approved``);
        resuming is the caller's part (a server answers the person at once and resumes the
        agent in the background)."""
        self._admitted(agent_id)
        approvals_mod.approve(self.store, agent_id, note=note, by=by, where=self.store_dir, answer=answer)

    def decide_deny(self, agent_id: str, *, reason: str, by: str | None = None) -> None:
        """Record the denial only (status ``suspended``); resuming is the caller's part."""
        self._admitted(agent_id)
        approvals_mod.deny(self.store, agent_id, reason=reason, by=by, where=self.store_dir)

    async def resolve(self, agent_id: str, *, retry: bool = False, result: Any = None,
                      fail: str | None = None, by: str | None = None) -> RunResult:
        """Settle an ``in_doubt`` agent: re-run its call, supply the call's result, or fail it."""
        self.decide_resolve(agent_id, retry=retry, result=result, fail=fail, by=by)
        if fail is not None:
            return RunResult.of_record(self.get_agent(agent_id))
        return await self.resume(agent_id)

    def decide_resolve(self, agent_id: str, *, retry: bool = False, result: Any = None, fail: str | None = None,
                       by: str | None = None) -> None:
        """Record the settlement only (status ``suspended``, or ``failed`` with ``fail``);
        resuming is the caller's part, as with :meth:`decide_approve`."""
        if fail is None:
            self._admitted(agent_id)
        approvals_mod.resolve(self.store, self.identity, agent_id, retry=retry, result=result, fail=fail, by=by,
                              where=self.store_dir)

    def _admitted(self, agent_id: str) -> None:
        """Refuse a decision that would resume an agent this host may not run (its bundle's
        Python is not trusted here, or its policy names an MCP server this host's operator
        config does not provide) before the decision is recorded, not after."""
        rec = self.get_agent(agent_id)
        try:
            b = self.loader.by_digest(str(rec.get("bundle_digest")))
        except Exception:  # a missing or damaged bundle: the resume parks it and says so
            return
        mcp_config.require(b.policy, self.operator_config)
        self.loader.bundle_code(b)

    def fork(self, agent_id: str, checkpoint: int) -> str:
        """A new agent continuing from checkpoint ``checkpoint`` of ``agent_id`` (see :mod:`host.runtime.fork`)."""
        return fork_agent(self.store, self.loader, self.identity, agent_id, checkpoint)

    # -- queries -----------------------------------------------------------------------
    def list_agents(self) -> list[dict[str, Any]]:
        return queries.list_agents(self.store)

    def get_agent(self, agent_id: str) -> dict[str, Any]:
        return queries.get_agent(self.store, agent_id, where=self.store_dir)

    def inspect(self, agent_id: str) -> dict[str, Any]:
        return queries.inspect(self.store, agent_id, where=self.store_dir)

    def logs(self, agent_id: str, *, after: int = -1, limit: int = logs_mod.PAGE_MAX) -> dict[str, Any]:
        """The agent's guest log lines kept in the store (see :func:`host.runtime.logs.read`)."""
        return logs_mod.read(self.store, agent_id, after=after, limit=limit)

    def audit_records(self, agent_id: str) -> list[dict[str, Any]]:
        """The agent's audit log, in order."""
        return audit.records(self.store, agent_id)


def _not_resumed(store: AgentStore, agent_id: str, code: str, exc: Exception) -> RunResult:
    """What ``resume_all`` reports for an agent it could not resume: the agent as the
    store has it now (untouched), and why."""
    try:
        with store.read() as txn:
            rec = txn.get_agent(agent_id)
        status = str(rec.get("status")) if rec else "unknown"
    except Exception:  # the store itself failed: the error below says so
        status = "unknown"
    return RunResult(agent_id, status, error={"code": code, "message": str(exc)})


def _checkpoint_every(given: int | None) -> int:
    """``checkpoint_every`` as given, else ``$TORPOR_CHECKPOINT_EVERY``, else 1; at least 1."""
    raw: Any = given if given is not None else os.environ.get("TORPOR_CHECKPOINT_EVERY") or 1
    try:
        every = int(raw) if not isinstance(raw, bool) else -1
    except ValueError:
        every = -1
    if every < 1:
        raise ConfigError(f"checkpoint_every (or $TORPOR_CHECKPOINT_EVERY) must be a whole number >= 1, got {raw!r}")
    return every


def _physical_memory() -> int:
    """The machine's RAM in bytes (1 GiB where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 1 << 30


def run_sync(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async host call from synchronous code (the CLI)."""
    return anyio.run(coro_fn)
