"""One commit per step of an agent: its writes, its queued audit events, its record.

Every change the runtime makes to an agent goes through :meth:`AgentCommits.agent`:
the step's own writes (a checkpoint, a journal entry, a tool's effect), the audit
events the agent queued since its last commit, sealed onto its hash chain, and its
record, in one transaction of the group committer (many agents' commits share one
``fdatasync``). A crash leaves either all of a step or none of it.

Every commit is durable before its ``await`` returns, so nothing that follows it (a tool
dispatched on a journaled intent, a reply to a client) runs ahead of it. The exception is
asked for by name (``sync``, :data:`snapshots.store.SyncWhen`), for a commit nobody outside
the agent hears of before the agent's next durable commit covers it: a run's spawn when
the caller waits for the run's end (``"later"``: the run's end syncs both), and a
transactional tool's effect with its answer (``"soon"``, ``kv.incr``: only the guest sees
the answer, and the agent's next tool, park or end is a durable commit). The store syncs
a ``"soon"`` commit in the background while the agent computes its next step, so one
agent's CPU and its disk's flushes overlap (``snapshots.lmdb_store``, ``sync``; on the
loop, below, one sync covers two such commits). A
power loss rolls such an agent back to a consistent earlier step (its checkpoint, journal
and effects were in the same commits), from which it redoes the same calls.

Where a commit runs: on the event loop's own thread, when the store's commits are local and
cheap (an LMDB store: :class:`_LoopCommits`). The transaction is a few dozen microseconds of
Python and LMDB; handing it to the group committer's writer thread and back cost two thread
hand-offs a commit, and with many agents the writer's Python and the loop's fought over the
GIL (the loop waited for it ~40% of its time, bench/RESULTS.md). So the loop commits, unsynced,
and a ``"now"`` commit then waits for its *durable ack*: the store's background syncer syncs
everything committed so far and tells the loop (``LmdbStore.add_sync_listener``), which wakes
every commit the sync covered. While a sync is under way the store takes one more commit
(a transaction begins only once every commit but the last is synced, see
``snapshots.lmdb_store``); the commits that arrive after that wait on the loop and go, when
the sync ends, into one transaction together (each in its own nested transaction): group
commit, with the tool dispatched on the durable ack of its intent. A store without sync
listeners (the fleet's, whose commits are network round trips) keeps the group committer's
writer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from host.errors import LeaseLost
from host.runtime import logs
from host.runtime.agent import LiveAgent
from host.runtime.observe import NOBODY, Observer
from host.trust import audit
from snapshots.errors import StoreError
from snapshots.group_commit import GroupCommitter
from snapshots.store import Outcome, SyncWhen

T = TypeVar("T")

#: Events derived from a step's result, sealed in the same commit.
Events = list[tuple[str, dict[str, Any]]]


class AgentCommits:
    """Commits through a :class:`~snapshots.group_commit.GroupCommitter` from async code.

    ``fence``: this host's lease id in a fleet (:mod:`host.runtime.leases`). Then every
    step first checks, in its own transaction, that the stored record is still the one
    this host last committed (same audit sequence) and not claimed under another lease;
    if not, another host took the agent over and the step is refused (``LeaseLost``):
    nothing of it is written, whatever this host ran meanwhile.
    """

    async def settle(self) -> None:
        """Make every commit so far durable (a sync only if one was left unsynced): what
        runs before anything tells the outside world of a commit made short of ``"now"``."""
        store = self.committer.store
        if getattr(store, "durability", "sync") == "sync" and getattr(store, "unflushed_commits", 1):
            await anyio.to_thread.run_sync(store.settle)

    def __init__(self, committer: GroupCommitter, fence: str | None = None) -> None:
        self.committer = committer
        self.fence = fence
        self.observer: Observer = NOBODY  # told of every commit of an agent (Host.observe)
        store = committer.store
        #: commits on the event loop's thread (see the module docstring), one per loop
        self._on_loop = (callable(getattr(store, "add_sync_listener", None))
                         and getattr(store, "durability", None) in ("sync", "process"))
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopCommits] = (
            weakref.WeakKeyDictionary())

    async def run(self, fn: Callable[[Any], T], sync: SyncWhen = "now") -> T:
        """Run ``fn(txn)`` in a commit and return its value once the commit is durable
        (``sync`` short of ``"now"``: once committed; a later durable commit makes it durable)."""
        if self._on_loop:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # pragma: no cover - non-asyncio backend
                loop = None
            if loop is not None:
                local = self._loops.get(loop)
                if local is None:
                    local = self._loops[loop] = _LoopCommits(self.committer.store, loop)
                value: T = await local.run(fn, sync)
                return value
        done = self.committer.try_inline(fn, sync=sync)  # an idle committer, when no sync is due
        if done is not None:
            inline: T = done.unwrap()
            return inline
        fut = self.committer.submit(fn, sync=sync)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - non-asyncio backend
            return await anyio.to_thread.run_sync(fut.result)
        return await asyncio.wrap_future(fut, loop=loop)

    async def agent(self, agent: LiveAgent, fn: Callable[[Any], T] | None = None,
                    after: Callable[[T], Events] | None = None, *, sync: SyncWhen = "now") -> T | None:
        """One transaction: ``fn``, the agent's queued audit events (plus ``after(result)``), its
        guest log lines since the last commit (:mod:`host.runtime.logs`), its record."""
        step = _Step(self, agent, fn, after)
        t0 = time.perf_counter()
        result: T | None = step.done(await self.run(step, sync), t0)
        return result

    def agent_now(self, agent: LiveAgent, fn: Callable[[Any], T], after: Callable[[T], Events]) -> T | None:
        """The commit :meth:`agent` makes at ``sync="soon"``, made now, synchronously, when
        the store can take it without waiting (on the event loop's thread, with nothing queued
        ahead of it, no sync to wait for first, no fleet fence to check); else None and
        nothing is written. For a call answered inside the guest's ``tool_call`` import
        (:meth:`host.runtime.tool_call.ToolCallPipeline.answer_inline`), which cannot wait.
        A store that fails the commit raises, as :meth:`agent` does."""
        local = self._loop_commits_now()
        if local is None:
            return None
        step = _Step(self, agent, fn, after)
        t0 = time.perf_counter()
        result: T | None = step.done(local.commit_now(step)[0].unwrap(), t0)
        return result

    def can_commit_now(self) -> bool:
        """Whether :meth:`agent_now` would commit now rather than decline."""
        return self._loop_commits_now() is not None

    def _loop_commits_now(self) -> _LoopCommits | None:
        """The running loop's committer, if this thread runs a loop whose commits go on it,
        and it can take a commit now: nothing queued ahead, no sync to wait for, no fence."""
        if not self._on_loop or self.fence is not None:
            return None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a worker thread, or no loop
            return None
        local = self._loops.get(loop)
        return local if local is not None and not local.queue and local.ready() else None

    def _check_fence(self, txn: Any, agent: LiveAgent) -> None:
        stored = txn.get_agent(agent.agent_id)
        if stored is None:
            return  # its spawn: nobody else can hold it yet
        lease = (stored.get("owner") or {}).get("lease")
        if stored.get("audit_seq") != agent.record.get("audit_seq") or lease not in (None, self.fence):
            by = f"lease {lease}" if lease is not None else f"now {stored.get('status')}"
            raise LeaseLost(f"agent {agent.agent_id} was taken over by another host ({by}); "
                            "this host's step is not committed")


class _Step:
    """One agent step as a transaction (``fn``, the queued audit events, the guest's log
    lines, the record) and the bookkeeping once it is committed: the one body of every
    commit of an agent, made awaited (:meth:`AgentCommits.agent`) or at once
    (:meth:`AgentCommits.agent_now`)."""

    __slots__ = ("after", "agent", "commits", "fn", "logged", "queued")

    def __init__(self, commits: AgentCommits, agent: LiveAgent, fn: Callable[[Any], Any] | None,
                 after: Callable[[Any], Events] | None) -> None:
        self.commits, self.agent, self.fn, self.after = commits, agent, fn, after
        self.queued = len(agent.events)
        self.logged = (0, 0)

    def __call__(self, txn: Any) -> tuple[Any, int, str, int | None, Events]:
        agent = self.agent
        if self.commits.fence is not None:
            self.commits._check_fence(txn, agent)
        result = self.fn(txn) if self.fn is not None else None
        if agent.unlogged.lines or agent.unlogged.skipped:
            self.logged = logs.flush(txn, agent.agent_id, agent.unlogged)
        events = agent.events[:self.queued] + (self.after(result) if self.after is not None and result is not None
                                               else [])
        rec = dict(agent.record)
        audit.append_events(txn, rec, events)
        txn.put_agent(rec)
        return result, rec["audit_seq"], rec["audit_head"], rec.get("audit_events"), events

    def done(self, written: tuple[Any, int, str, int | None, Events], t0: float) -> Any:
        """The step is committed: the record's audit head moves on, the sealed events and
        log lines are dropped from the queues, the observer is told; ``fn``'s result."""
        result, seq, head, n, sealed = written
        agent = self.agent
        agent.record["audit_seq"] = seq
        agent.record["audit_head"] = head
        if n is not None:
            agent.record["audit_events"] = n
        del agent.events[:self.queued]
        agent.unlogged.take(*self.logged)
        self.commits.observer.committed(agent, sealed, time.perf_counter() - t0)
        return result


class _LoopCommits:
    """Commits made on one event loop's thread, to a store with sync listeners (an LMDB store).

    A commit goes at once when nothing is queued ahead of it and the store can begin a
    transaction without waiting for a sync (at most one commit unsynced); else it is queued,
    and the queue goes in one transaction as soon as the store can take one (a sync ended).
    Every commit is made unsynced; the background syncer is started when a ``"now"`` commit
    waits for its ack, when two commits are unsynced (:meth:`_sync_if_due`), and when commits
    are queued behind them. So ``"soon"`` means: synced by the time the store needs it, at the
    latest with the commit after next; a ``"now"`` commit is acknowledged once a sync covered it.
    Futures and the queue are touched only on the loop; the syncer's thread only schedules
    :meth:`_synced` on it.
    """

    #: At most this many commits in one transaction (as the group committer's ``max_batch``).
    MAX_BATCH = 512

    def __init__(self, store: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        # Weakly: AgentCommits keeps one of these per loop, keyed weakly by the loop.
        self._loop = weakref.ref(loop)
        self.durable = store.durability == "sync"  # at "process" a commit is acknowledged when made
        self.queue: list[tuple[Callable[[Any], Any], SyncWhen, asyncio.Future[tuple[Outcome, int]]]] = []
        self.waiting: list[tuple[int, asyncio.Future[None]]] = []  # (commit number, its durable ack)
        self.drain_due = False
        self.last_commit_at = 0.0  # perf_counter() of the last commit made here
        store.add_sync_listener(self._on_sync)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "a loop's committer outlived its loop"
        return loop

    def ready(self) -> bool:
        """A transaction can begin now without waiting for a sync (``LmdbStore._before_write``)."""
        return not self.durable or self.store.commits - self.store.flushed_commits <= 1

    def commit_now(self, fn: Callable[[Any], T]) -> tuple[Outcome, int]:
        """Commit ``fn`` at once (the caller checked that nothing is queued and :meth:`ready`):
        its outcome and the commit's number."""
        (outcome,) = self.store.transact_batch((fn,), sync="later")
        number: int = self.store.commits
        self._sync_if_due()
        return outcome, number

    async def run(self, fn: Callable[[Any], T], sync: SyncWhen) -> T:
        if not self.queue and self.ready():
            outcome, number = self.commit_now(fn)
        else:
            fut: asyncio.Future[tuple[Outcome, int]] = self.loop.create_future()
            self.queue.append((fn, sync, fut))
            self._kick()
            outcome, number = await fut
        value: T = outcome.unwrap()
        if sync == "now" and self.durable and self.store.flushed_commits < number:
            ack: asyncio.Future[None] = self.loop.create_future()
            self.waiting.append((number, ack))
            self.store.sync_soon()  # one that began before this commit does not cover it: the next will
            await ack
        return value

    def _sync_if_due(self) -> None:
        """Start a sync once two commits are unsynced (the store takes no third before it
        ends), or at the first when the disk is the slower of the two: its last sync took
        longer than the time since the commit before. Else a lone agent's next commit, made
        while its guest computes, shares the sync (one ``fdatasync`` per two of its calls,
        the sync overlapping its CPU). A power loss costs at most the two unsynced commits
        nobody was told of, either way."""
        now = time.perf_counter()
        since, self.last_commit_at = now - self.last_commit_at, now
        unsynced = self.store.commits - self.store.flushed_commits
        if unsynced >= 2 or (unsynced == 1 and self.store.last_sync_s > since):
            self.store.sync_soon()

    def _kick(self) -> None:
        """Commit the queue now if the store can take it, else have a sync end soon."""
        if not self.queue or self.drain_due:
            return
        if self.ready():
            self.drain_due = True
            self.loop.call_soon(self._drain)
        else:
            self.store.sync_soon()  # its end calls _synced, which kicks again

    def _drain(self) -> None:
        self.drain_due = False
        if not self.ready():
            self._kick()
            return
        batch = [item for item in self.queue[:self.MAX_BATCH] if not item[2].cancelled()]
        del self.queue[:self.MAX_BATCH]
        if batch:
            try:
                outcomes = self.store.transact_batch([fn for fn, _, _ in batch], sync="later")
            except BaseException as exc:  # the store failed: nothing of the batch written
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else StoreError(
                            f"the commit was interrupted: {type(exc).__name__}"))
                if not isinstance(exc, Exception):
                    raise
            else:
                number = self.store.commits
                for (_, _, fut), outcome in zip(batch, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result((outcome, number))
                self._sync_if_due()
        self._kick()

    def _on_sync(self, flushed: int, error: BaseException | None) -> None:
        """On the syncing thread: hand the news to the loop."""
        loop = self._loop()
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits on it any more
            loop.call_soon_threadsafe(self._synced, flushed, error)

    def _synced(self, flushed: int, error: BaseException | None) -> None:
        still: list[tuple[int, asyncio.Future[None]]] = []
        for number, ack in self.waiting:
            if ack.done():
                continue
            if error is not None:
                ack.set_exception(error)
            elif number <= flushed:
                ack.set_result(None)
            else:
                still.append((number, ack))
        self.waiting = still
        self._kick()
