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
agent's CPU and its disk's flushes overlap (``snapshots.lmdb_store``, ``sync``). A
power loss rolls such an agent back to a consistent earlier step (its checkpoint, journal
and effects were in the same commits), from which it redoes the same calls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.to_thread

from host.errors import LeaseLost
from host.runtime import logs
from host.runtime.agent import LiveAgent
from host.runtime.observe import NOBODY, Observer
from host.trust import audit
from snapshots.group_commit import GroupCommitter
from snapshots.store import SyncWhen

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

    async def run(self, fn: Callable[[Any], T], sync: SyncWhen = "now") -> T:
        """Run ``fn(txn)`` in a commit and return its value once the commit is durable
        (``sync`` short of ``"now"``: once committed; a later durable commit makes it durable)."""
        done = self.committer.try_inline(fn, sync=sync)  # an idle committer, when no sync is due
        if done is not None:
            value: T = done.unwrap()
            return value
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
        queued = len(agent.events)
        logged = (0, 0)

        def write(txn: Any) -> tuple[T | None, int, str, Events]:
            nonlocal logged
            if self.fence is not None:
                self._check_fence(txn, agent)
            result = fn(txn) if fn is not None else None
            if agent.unlogged.lines or agent.unlogged.skipped:
                logged = logs.flush(txn, agent.agent_id, agent.unlogged)
            events = agent.events[:queued] + (after(result) if after is not None and result is not None else [])
            rec = dict(agent.record)
            audit.append_events(txn, rec, events)
            txn.put_agent(rec)
            return result, rec["audit_seq"], rec["audit_head"], events

        t0 = time.perf_counter()
        result, seq, head, sealed = await self.run(write, sync)
        agent.record["audit_seq"] = seq
        agent.record["audit_head"] = head
        del agent.events[:queued]
        agent.unlogged.take(*logged)
        self.observer.committed(agent, sealed, time.perf_counter() - t0)
        return result

    def _check_fence(self, txn: Any, agent: LiveAgent) -> None:
        stored = txn.get_agent(agent.agent_id)
        if stored is None:
            return  # its spawn: nobody else can hold it yet
        lease = (stored.get("owner") or {}).get("lease")
        if stored.get("audit_seq") != agent.record.get("audit_seq") or lease not in (None, self.fence):
            by = f"lease {lease}" if lease is not None else f"now {stored.get('status')}"
            raise LeaseLost(f"agent {agent.agent_id} was taken over by another host ({by}); "
                            "this host's step is not committed")
