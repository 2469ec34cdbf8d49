"""The scheduler: which agents this server drives, and when.

It drives every agent in the background of the server's one task group:

* runs started over HTTP (:meth:`Scheduler.drive`);
* agents a person decided (approve, deny: :meth:`Scheduler.resume`);
* at start, every agent a previous process left (``Host.resumable``: running, suspended,
  approved, not driven by a live process), so a SIGKILL loses nothing and, the runtime's
  journal being what it is, runs no recorded tool call twice;
* in a fleet (:meth:`Scheduler.fleet`, when the host has a lease): the host's lease
  renewed three times per lease period, and every agent whose host's lease expired taken
  over (``Host.orphaned`` finds them; the claim's commit decides between hosts that try
  at once), within a poll of the expiry;
* waits that end at a time (:meth:`Scheduler.timers`): an agent parked ``sleeping`` (a
  ``timer.sleep``, a rate-limited call whose grant waits) has a durable entry in the
  runtime's wake index (:mod:`host.runtime.timers`), written in the commit that parked it,
  so it holds nothing in memory and is resumed by whichever server runs on the store when
  its time comes: one started after a SIGKILL finds the index as the killed one left it.

Anyone who waits on an agent (a long poll, an event stream) is woken by
:meth:`Scheduler.changed` when a drive of that agent ends, and looks at the store again.
The guest's log lines of one drive (``RunResult.logs``) are kept for the latest drives for a
while (:class:`RecentLogs`), so that a long poll can hand them to the client that started
the run (``torpor --server URL run`` prints them as a local run does); the store keeps every
drive's lines too (:mod:`host.runtime.logs`, served by ``GET /v1/agents/{id}/logs``), but
numbered per agent, not per drive.

In a fleet on NATS (a host with a lease whose store offers a work queue,
:mod:`snapshots.work_queue`), work is dispatched through the queue rather than in-process:
a new run accepted here, a wake-up heard here (an approval answered, a tool's result, a
timer due, an orphan found, an agent left by a previous process) is published as a work
message, and every host of the fleet pulls from the one shared consumer as many as it has
room for (``work_slots``), claims the agent (the store decides between hosts), drives it to
its next hibernation or its end, says it is still at it while a long segment runs, then
acknowledges. A host that dies holding a message has it delivered again, to another host,
after the queue's ``ack_wait``; a message delivered twice starts nothing twice (the agent
is finished, parked, or held under a live lease: acknowledged and left). The single-host
path (an LMDB store, no lease) drives in-process as before, at the same cost.

On SIGTERM, :meth:`Scheduler.drain` starts no more drives, lets the running ones end or
park for ``drain_timeout``, then interrupts the rest at their next safe point
(:func:`host.sandbox.interrupts.request`): each is left at its last checkpoint, in the
store, for the next server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread

from host.errors import AgentNotFound, AgentStateError, LeaseLost
from host.runtime import Host, RunResult
from host.runtime.timers import Wakeup
from host.sandbox import interrupts
from snapshots.work_queue import Kind, Work, WorkQueue

_log = logging.getLogger("torpor.server")

#: How long the timer loop sleeps at most before it looks at the store again (a wake-up
#: written by another process on the same store is found within this).
TIMER_POLL_S = 1.0
#: How often, at most, a fleet host looks for agents whose host's lease expired.
FLEET_POLL_S = 0.25
#: How long a pull from the work queue waits for a message before it looks again.
PULL_WAIT_S = 1.0
#: At most this many work messages taken in one pull.
PULL_BATCH = 16
#: How often a waiter for an agent's stop looks at the store again when another host of the
#: fleet may be driving it (no drive here wakes it: ``host.server.agents.wait_until_stopped``).
QUEUED_POLL_S = 0.05


class RecentLogs:
    """The guest log lines of the latest drives, per agent, within a count and a byte bound
    (oldest dropped first): a drive's lines are in no record, and a server with thousands
    of agents must not keep them all. The latest drive's are kept whatever their size (a
    run's log is capped at ``host.runtime.agent.LOG_BYTES``)."""

    def __init__(self, max_agents: int = 1024, max_bytes: int = 16 << 20) -> None:
        self.max_agents = max_agents
        self.max_bytes = max_bytes
        self.bytes = 0
        self._logs: OrderedDict[str, tuple[list[dict[str, Any]], int]] = OrderedDict()

    def put(self, agent_id: str, logs: list[dict[str, Any]]) -> None:
        """The lines of the drive that just ended (they replace the agent's earlier ones)."""
        self.drop(agent_id)
        if not logs:
            return
        size = sum(len(str(line.get("message", ""))) + 16 for line in logs)
        self._logs[agent_id] = (logs, size)
        self.bytes += size
        while len(self._logs) > 1 and (len(self._logs) > self.max_agents or self.bytes > self.max_bytes):
            _, (_, dropped) = self._logs.popitem(last=False)
            self.bytes -= dropped

    def get(self, agent_id: str) -> list[dict[str, Any]]:
        kept = self._logs.get(agent_id)
        return list(kept[0]) if kept else []

    def drop(self, agent_id: str) -> None:
        kept = self._logs.pop(agent_id, None)
        if kept is not None:
            self.bytes -= kept[1]


class Drive:
    """One drive the scheduler started: once it has ended, what it came to (``result``: None
    until then, and when it raised; the agent's own errors are in its record)."""

    __slots__ = ("agent_id", "ended", "result")

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.ended = False
        self.result: RunResult | None = None


class _Queued(Drive):
    """A run handed to the fleet's work queue: whichever host takes it drives it, so its
    result is never known here (a waiter reads the store)."""

    __slots__ = ()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Scheduler:
    """Background drives of one host's agents (see the module docstring)."""

    def __init__(self, host: Host, work: WorkQueue | None = None, work_slots: int | None = None) -> None:
        self.host = host
        #: The fleet's work queue, when dispatch goes through it (see the module docstring).
        self.work = work
        #: How many work messages this host holds at once (0: a gateway only, it drives nothing).
        self.work_slots = host.pool.size if work_slots is None else work_slots
        self._held: dict[int, Work] = {}  # work messages taken and not answered, by stream sequence
        self._publishes: set[asyncio.Task[None]] = set()
        self.work_stats = {"published": 0, "taken": 0, "acked": 0, "nacked": 0, "duplicates": 0,
                           "redelivered": 0}
        self.draining = False
        self.interrupted = False  # the drain asked running guests to stop at a safe point
        self.active: dict[str, int] = {}  # agent id -> drives in flight
        self.started = 0  # drives started, over the server's life
        self._tg: anyio.abc.TaskGroup | None = None
        self._drives: set[asyncio.Task[None]] = set()
        self._idle = anyio.Event()
        self._idle.set()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}  # agent id -> the futures its waiters await
        self._timer_wake = anyio.Event()
        self.logs = RecentLogs()

    # -- the task group -------------------------------------------------------------------
    def attach(self, tg: anyio.abc.TaskGroup) -> None:
        """The task group drives run under (the server's lifespan owns it): until it is
        cancelled, and no longer (see :meth:`_hold`)."""
        self._tg = tg
        tg.start_soon(self._hold, name="torpor drives")

    async def _hold(self) -> None:
        """Live as long as the task group; when it is cancelled, cancel the drives still in
        flight (a tool's I/O: each stays at its last commit) and wait for them to end.

        Why drives are the loop's own tasks and not the task group's: starting one through
        anyio's task group costs about 15 µs more than ``loop.create_task``, on every run."""
        try:
            await anyio.sleep_forever()
        finally:
            left = list(self._drives)
            for task in left:
                task.cancel()
            if left:
                with anyio.CancelScope(shield=True):
                    await asyncio.wait(left)

    def take_over(self) -> int:
        """Resume, in the background, every agent a previous process left; how many."""
        ids = self.host.resumable()
        for aid, work_id in self._work_ids(ids):
            self.resume(aid, work_id or None, "orphan")
        return len(ids)

    # -- driving agents -------------------------------------------------------------------
    @property
    def queued(self) -> bool:
        """Whether work goes through the fleet's work queue (else it is driven here)."""
        return self.work is not None

    def drive(self, agent_id: str, fn: Callable[[], Awaitable[RunResult]]) -> Drive | None:
        """Run ``fn`` (a spawn's drive, a resume) in the background: the drive, or None once
        draining (the agent stays as the store has it, for the next server to take over).

        With a work queue, a new run is published as work instead (``fn`` is not called: the
        host that takes the message resumes the agent from the store, its spawn unclaimed)."""
        if self.draining or self._tg is None:
            return None
        if self.work is not None:
            self._publish("run", agent_id, f"run:{agent_id}")
            return _Queued(agent_id)
        return self._start(agent_id, fn)

    def _start(self, agent_id: str, fn: Callable[[], Awaitable[RunResult]], work: Work | None = None) -> Drive:
        self.active[agent_id] = self.active.get(agent_id, 0) + 1
        self.started += 1
        if self._idle.is_set():
            self._idle = anyio.Event()
        d = Drive(agent_id)
        task = asyncio.get_running_loop().create_task(self._guard(d, fn, work), name=f"agent {agent_id}")
        self._drives.add(task)
        task.add_done_callback(self._drives.discard)
        return d

    def driving(self, agent_id: str) -> bool:
        """Whether a drive of ``agent_id`` is in flight here (it is running until that ends)."""
        return agent_id in self.active

    def resume(self, agent_id: str, work_id: str | None = None, kind: Kind = "wake") -> bool:
        """Resume the agent in the background (a decision was recorded, its time came, or it
        was left); with a work queue, publish that it needs driving (``work_id``: the event's
        id, so that two hosts telling of one event make one message; a fresh one by default)."""
        if self.draining or self._tg is None:
            return False
        if self.work is not None:
            self._publish(kind, agent_id, work_id or f"{kind}:{agent_id}:{uuid.uuid4().hex}")
            return True
        self._start(agent_id, lambda: self.host.resume(agent_id))
        return True

    # -- the fleet's work queue ---------------------------------------------------------------
    def work_report(self) -> dict[str, int]:
        """What this host published to and took from the work queue (``/readyz``)."""
        return {**self.work_stats, "held": len(self._held), "slots": self.work_slots}

    def _publish(self, kind: Kind, agent_id: str, work_id: str) -> None:
        """Publish a work message in the background (a round trip to the cluster, off the loop).
        One that fails is logged: the agent is found again by the orphan look (unclaimed, or
        under an expired lease) and published then."""
        work = self.work
        assert work is not None

        async def go() -> None:
            try:
                await anyio.to_thread.run_sync(work.publish, kind, agent_id, work_id)
                self.work_stats["published"] += 1
            except Exception as exc:
                _log.warning("fleet: could not publish work for agent %s (%s): %s", agent_id, kind, exc)

        task = asyncio.get_running_loop().create_task(go(), name=f"publish {kind} {agent_id}")
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    async def pull_work(self) -> None:
        """Take work from the fleet's queue while there is room, drive each message's agent;
        and say, well within the queue's ``ack_wait``, that what is held is still in progress.
        Until cancelled."""
        assert self.work is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_held)
            while True:
                room = self.work_slots - len(self._held)
                if self.draining or room <= 0:
                    await anyio.sleep(0.05 if not self.draining else PULL_WAIT_S)
                    continue
                try:
                    taken = await anyio.to_thread.run_sync(self.work.pull, min(room, PULL_BATCH), PULL_WAIT_S)
                except Exception as exc:  # the cluster is away for a moment: pull again
                    _log.warning("fleet: pulling work failed: %s", exc)
                    await anyio.sleep(PULL_WAIT_S)
                    continue
                for w in taken:
                    self._take(w)

    def _take(self, w: Work) -> None:
        """Drive the agent of a work message taken (or, if it is driven here already, let the
        message go: the drive in flight answers for the agent)."""
        self.work_stats["taken"] += 1
        if w.deliveries > 1:
            self.work_stats["redelivered"] += 1
            # A host took it and did not answer within the ack wait: it died, or was cut off.
            _log.warning("fleet: work for agent %s delivered again (%d times): resuming it from its last commit",
                         w.agent_id, w.deliveries)
        if self.draining:  # another host takes it now
            self._answer(w, "nak")
            return
        if w.agent_id in self.active:  # driven here already: that drive answers for the agent
            self.work_stats["duplicates"] += 1
            self._answer(w, "ack")
            return
        self._held[w.message.seq] = w
        aid = w.agent_id
        self._start(aid, lambda: self.host.resume(aid), w)

    def _answer(self, w: Work, how: str) -> None:
        """Acknowledge (done, or not ours) or nak (deliver again to any host) ``w``, off the loop."""
        work = self.work
        assert work is not None
        self._held.pop(w.message.seq, None)
        self.work_stats["acked" if how == "ack" else "nacked"] += 1

        async def go() -> None:
            try:
                if how == "ack":
                    await anyio.to_thread.run_sync(work.ack, w)
                else:
                    await anyio.to_thread.run_sync(work.nak, w, 0.2)
            except Exception as exc:  # unanswered: delivered again after ack_wait, and found done then
                _log.warning("fleet: could not answer work for agent %s: %s", w.agent_id, exc)

        task = asyncio.get_running_loop().create_task(go(), name=f"answer {w.agent_id}")
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    async def _keep_held(self) -> None:
        """Every third of ``ack_wait``: the messages held are still in progress."""
        work = self.work
        assert work is not None

        def say(held: list[Work]) -> None:
            for w in held:
                if w.message.seq in self._held:  # not answered meanwhile
                    work.in_progress(w)

        while True:
            await anyio.sleep(work.ack_wait / 3)
            if self._held:
                try:
                    await anyio.to_thread.run_sync(say, list(self._held.values()))
                except Exception as exc:
                    _log.warning("fleet: could not say work is in progress: %s", exc)

    async def _guard(self, d: Drive, fn: Callable[[], Awaitable[RunResult]], work: Work | None = None) -> None:
        """One drive, whose errors end here: the agent's own are in its record already. A work
        message it came from is acknowledged once the agent ended or parked, or is not this
        host's to drive; it is delivered again (nak) when the drive was cut short here (the
        drain, a store that could not be written)."""
        agent_id = d.agent_id
        answer = "ack"
        try:
            result = await fn()
            d.result = result
            self.logs.put(agent_id, result.logs)
            if result.status == "sleeping":
                self._timer_wake.set()  # it parked until a time: the timer loop looks again
        except LeaseLost as exc:  # a fleet host that was away past its lease: the other host's state stands
            _log.warning("agent %s: %s", agent_id, exc)
        except (AgentStateError, AgentNotFound) as exc:  # someone else drove or decided it meanwhile
            _log.info("agent %s not driven: %s", agent_id, exc)
        except interrupts.Interrupted:  # drained: left at its last checkpoint
            _log.info("agent %s interrupted by the drain; it resumes from its last checkpoint", agent_id)
            answer = "nak"  # another host takes it now
        except Exception:  # a store that cannot be written, a host bug: logged, the server goes on
            _log.exception("driving agent %s failed", agent_id)
            answer = "nak"
        except BaseException:  # cancelled (the server stops): another host takes it at once
            answer = "nak"
            raise
        finally:
            if work is not None:
                self._answer(work, answer)
            d.ended = True
            n = self.active.get(agent_id, 1) - 1
            if n > 0:
                self.active[agent_id] = n
            else:
                self.active.pop(agent_id, None)
            if not self.active:
                self._idle.set()
            self.notify(agent_id)

    # -- who waits on an agent --------------------------------------------------------------
    def notify(self, agent_id: str) -> None:
        """Wake whoever waits on ``agent_id`` (they read the store again)."""
        for woken in self._waiters.pop(agent_id, ()):
            _wake(woken)

    def wake_all(self) -> None:
        """Wake every waiter (the server is draining: long polls answer now)."""
        for aid in list(self._waiters):
            self.notify(aid)

    async def changed(self, agent_id: str, timeout: float) -> None:
        """Return when a drive of ``agent_id`` ends, or after ``timeout`` seconds.

        A future of the waiter's own, which the drive's end or a timer completes: plain
        asyncio rather than an anyio event in a cancel scope, since a waited run waits here
        once per request and this costs a few microseconds where those cost tens; and the
        waiter is woken by the end itself, not by a callback of another future (a loop step
        less between the drive's end and its answer)."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        waiting = self._waiters.setdefault(agent_id, set())
        waiting.add(woken)
        timer = loop.call_later(max(0.0, timeout), _wake, woken)
        try:
            await woken
        finally:
            timer.cancel()
            waiting.discard(woken)
            if not waiting and self._waiters.get(agent_id) is waiting:
                del self._waiters[agent_id]

    # -- a fleet: this host's lease, the agents of hosts whose lease expired ------------------
    async def fleet(self) -> None:
        """Renew this host's lease and take over orphaned agents; until cancelled.

        Two loops, so that a slow look for orphans (it reads every agent) never delays a
        renewal: a lease that lapses under load would hand this host's agents to others."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew_lease)
            tg.start_soon(self._take_over_orphans)

    async def _renew_lease(self) -> None:
        lease = self.host.lease
        assert lease is not None
        while True:
            try:
                await anyio.to_thread.run_sync(self.host.renew_lease)
            except Exception:  # the cluster is away for a moment: the next try may reach it
                _log.exception("fleet: renewing the lease failed")
            await anyio.sleep(lease.lease_s / 3)

    async def _take_over_orphans(self) -> None:
        lease = self.host.lease
        assert lease is not None
        while True:
            try:
                if not self.draining:
                    for aid, work_id in await anyio.to_thread.run_sync(self._orphans):
                        if aid not in self.active:
                            _log.info("taking over agent %s (its host's lease expired)", aid)
                            self._take_over(aid, work_id)
            except Exception:  # the cluster is away for a moment: look again at the next poll
                _log.exception("fleet: looking for orphaned agents failed")
            await anyio.sleep(min(FLEET_POLL_S, lease.lease_s / 4))

    def _take_over(self, aid: str, work_id: str) -> None:
        """Drive an orphan here, at once, where this host drives work: its dead host's message
        waits out the ack wait, and the queue's stream may be electing a leader (a NATS node
        went with the host: in CI that held take-overs past two minutes); the claim decides
        between hosts that find the same orphan, and a message delivered later finds it driven
        or done. A gateway that drives nothing (``--work-slots 0``) publishes it instead."""
        if self.work is not None and self.work_slots <= 0:
            self.resume(aid, work_id, "orphan")
        elif not self.draining and self._tg is not None:
            self._start(aid, lambda: self.host.resume(aid))

    def _orphans(self) -> list[tuple[str, str]]:
        """The agents to take over (``Host.orphaned``), each with the id of its work message:
        one per expired lease and ``ack_wait`` period, so that every host finding the same
        orphan publishes one message; an unclaimed run not yet under way has its run's (a
        run whose message is in the queue is not published again, one whose publish was lost is)."""
        return self._work_ids(self.host.orphaned())

    def _work_ids(self, ids: list[str]) -> list[tuple[str, str]]:
        if self.work is None or not ids:
            return [(aid, "") for aid in ids]
        period = int(time.time() // self.work.ack_wait)
        out = []
        with self.host.store.read() as r:
            for aid in ids:
                rec = r.get_agent(aid) or {}
                lease = (rec.get("owner") or {}).get("lease")
                fresh = not lease and rec.get("status") == "running" and not rec.get("checkpoints")
                out.append((aid, f"run:{aid}" if fresh else f"orphan:{aid}:{lease}:{period}"))
        return out

    # -- waits that end at a time ------------------------------------------------------------
    async def timers(self) -> None:
        """Resume each sleeping agent when its wake time comes; until cancelled.

        The wake index is the store's (:meth:`Host.due` reads it and drops stale entries);
        an entry stays until the resume's own commit wakes its agent, so an agent already
        being driven here is skipped, and the loop looks again when a drive parks an agent
        ``sleeping`` (maybe until a time earlier than any it knew) or a poll passes.

        The loop sleeps until the earliest wake time it read, and resumes the agents due by
        then at once, from what it read (the resume's claim checks the agent still sleeps
        until then), before it reads the store again: a thread hop and a read less between
        a deadline and its resume."""
        pending: list[Wakeup] = []
        while True:
            now = time.time()
            if not self.draining:
                for w in pending:
                    if w.at <= now and w.agent_id and w.agent_id not in self.active:
                        self.resume(w.agent_id, f"timer:{w.agent_id}:{w.at!r}")
            due, pending = await anyio.to_thread.run_sync(self._look, now)  # one thread hop, two reads
            if not self.draining:
                at = {w.agent_id: w.at for w in pending}
                for aid in due:
                    if aid not in self.active:
                        self.resume(aid, f"timer:{aid}:{at[aid]!r}" if aid in at else None)
            later = [w.at for w in pending if w.at > now and w.agent_id not in self.active]
            now = time.time()  # the look took time: sleep until the deadline, not that long after it
            sleep = min([TIMER_POLL_S, *(at - now for at in later)])
            self._timer_wake = anyio.Event()
            with anyio.move_on_after(max(0.0, sleep)):
                await self._timer_wake.wait()

    def _look(self, now: float) -> tuple[list[str], list[Wakeup]]:
        """The due agents, and every wake-up, as the store has them now."""
        return self.host.due(now), self.host.wakeups()

    # -- draining ---------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Start no more drives; answer every waiter now."""
        self.draining = True
        self.wake_all()

    async def drain(self, grace_s: float) -> None:
        """Let running drives end or park for ``grace_s``, then interrupt what still runs at its
        next safe point (left at its last checkpoint), then cancel what waits on I/O."""
        self.begin_drain()
        with anyio.move_on_after(grace_s):
            await self._idle.wait()
        if self._idle.is_set():
            return
        _log.warning("drain: interrupting %d agents still running after %.1fs", len(self.active), grace_s)
        # Cleared by the caller once no drive is left (end_interrupt): a segment still in
        # wasm that saw the flag gone would take its interrupt trap for a deadline.
        self.interrupted = True
        interrupts.request(signal.SIGTERM)
        with anyio.move_on_after(max(2.0, grace_s / 2)):
            await self._idle.wait()

    def end_interrupt(self) -> None:
        """Forget the drain's interrupt, once every drive has ended (the task group is closed)."""
        if self.interrupted:
            interrupts.clear()
            self.interrupted = False
