"""Running an agent's guest code, and keeping its instance warm or letting it go cold.

The :class:`GuestRunner` owns the two decisions about a guest's instance that are
about time and memory, not about the agent's meaning:

* where a guest segment runs: inline on the event loop when the agent's last segment
  was short (a thread hop costs more than a short segment), in a worker thread
  otherwise, so that a compute-heavy guest never stalls the other agents. An agent
  with no segment of its own yet (a new one, or one just loaded from its checkpoint)
  goes by the last such first segment of its module: the first segment of a short
  agent such as ``hello`` is all of its run, and two thread hand-offs cost more than it
  does;
* whether an instance waits warm while its tool runs (and is rewound in place, the
  fast path) or is dropped at once and rebuilt from its checkpoint (hibernation):
  it goes cold when its tool outlasts ``warm_idle_s``, or at once when too many
  instances, or too much linear memory, already wait warm.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from host.runtime.agent import LiveAgent
from host.runtime.observe import NOBODY, Observer
from host.sandbox import abi, imports
from host.sandbox.execution import Execution, Failed, Outcome, PendingCall

T = TypeVar("T")

#: The answer to a call the guest makes, asked inside its import (:attr:`Execution.inline_answer`).
InlineAnswer = Callable[[PendingCall], tuple[int, bytes] | None]

#: Modules whose last first segment's time is remembered at most.
_MAX_MODULES = 4096


class GuestRunner:
    """Runs guest segments and holds the accounting of instances waiting warm."""

    def __init__(self, *, threads: int, warm_idle_s: float, max_warm: int, max_warm_bytes: int) -> None:
        self.warm_idle_s = warm_idle_s
        self.max_warm = max_warm
        self.max_warm_bytes = max_warm_bytes
        self.warm_waiting = 0  # instances kept in memory while their agent waits on a tool
        self.warm_bytes = 0  # the linear memory of the instances counted in warm_waiting
        self.inline_segment_s = 0.001  # guest segments shorter than this run inline
        # module digest -> how long the last first segment (an agent's first after a start
        # or a load) of that module ran; later segments are the agent's own business
        self._first_segment_s: dict[str, float] = {}
        self._limiter = anyio.CapacityLimiter(threads)
        self.observer: Observer = NOBODY  # told of every segment's fuel and time (Host.observe)

    # -- starting and continuing a guest ------------------------------------------------
    async def start(self, agent: LiveAgent) -> Outcome:
        """A fresh instance runs the agent from its entry point."""
        ex = self._execution(agent)
        agent.ex = ex
        return await self.run(agent, ex, ex.start)

    async def answer(self, agent: LiveAgent, call: PendingCall, status: int, response: bytes,
                     inline: InlineAnswer | None = None) -> Outcome:
        """Give the guest its tool call's answer and run it to its next stop.

        A warm instance is rewound in place; a cold one is rebuilt from the agent's
        captured state first (the checkpoint the call was written with). ``inline``: asked
        for the answer to each call the guest makes meanwhile, inside its ``tool_call``
        import, when the segment runs on the event loop's thread (:meth:`run`).
        """
        ex = agent.ex
        if ex is None or not ex.live:
            assert agent.captured is not None
            ex = Execution.restore(agent.loaded, agent.pre, agent.limits, agent.input_bytes, agent.captured,
                                   fuel_used=int(agent.usage.get("fuel_used", 0)), call_seq=call.seq,
                                   pending=call, log_sink=self._log_sink(agent))
            agent.ex = ex
        if agent.record.get("status") != "running":
            agent.record["status"] = "running"
        return await self.run(agent, ex, ex.resume, status, response, inline=inline)

    def _execution(self, agent: LiveAgent) -> Execution:
        return Execution(agent.loaded, agent.pre, agent.limits, agent.input_bytes,
                         fuel_used=int(agent.usage.get("fuel_used", 0)), log_sink=self._log_sink(agent),
                         seed=abi.agent_seed(agent.agent_id))

    @staticmethod
    def _log_sink(agent: LiveAgent) -> Callable[[int, str], None]:
        def sink(level: int, message: str) -> None:
            agent.log(imports.LOG_LEVELS[level], message)

        return sink

    # -- where a segment runs ---------------------------------------------------------------
    async def run(self, agent: LiveAgent, ex: Execution, fn: Callable[..., Outcome], *args: Any,
                  inline: InlineAnswer | None = None) -> Outcome:
        """Run guest code with what is left of the run's wall-clock budget, and count the time spent.

        A segment on the event loop's thread may have its tool calls answered inline
        (``inline``, :attr:`Execution.inline_answer`); the host's time answering them is not
        the guest's: the wall-clock budget and the segment's length (which decides where the
        next one runs) count the guest's stretches between its calls only. (The epoch
        deadline armed for the segment counts them too: at most a time slice,
        ``host.runtime.tool_call.SLICE_S``, past which calls are not answered inline.)"""
        left = agent.limits.deadline_s - agent.run_exec_s
        if left <= 0:
            return Failed("deadline_exceeded", f"the agent exceeded its wall-clock budget of {agent.limits.deadline_s:g} s")
        ex.limits = dataclasses.replace(agent.limits, deadline_s=left)
        # The choice rests on the segment's own run time, measured where it runs: timed
        # from here, a segment sent to a thread would include the hop and its wait for a
        # worker (milliseconds with a few agents at once), look long, and send the next
        # one to a thread too, for ever (measured: every segment of 4 concurrent agents
        # went to a thread, ~870 µs per tool call).
        module = agent.bundle.module_digest
        first = agent.last_segment_s is None
        last = self._first_segment_s.get(module) if first else agent.last_segment_s
        on_loop = last is not None and last < self.inline_segment_s
        took = [0.0]

        def timed(*a: Any) -> Outcome:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                took[0] = time.perf_counter() - t

        t0 = time.perf_counter()
        fuel0, answered0, host0 = ex.fuel_used, ex.inline_answers, ex.inline_s
        ex.inline_answer = inline if on_loop else None  # never from a worker thread: commits are the loop's
        try:
            return timed(*args) if on_loop else await self.in_thread(timed, *args)
        finally:
            ex.inline_answer = None
            host_s = ex.inline_s - host0
            guest_s = max(0.0, took[0] - host_s)
            stretch = guest_s / (1 + ex.inline_answers - answered0)  # the guest's run between two stops
            agent.last_segment_s = stretch
            if first:
                if len(self._first_segment_s) >= _MAX_MODULES and module not in self._first_segment_s:
                    self._first_segment_s.clear()  # a bound, not an eviction policy: it refills at once
                self._first_segment_s[module] = stretch
            agent.run_exec_s += time.perf_counter() - t0 - host_s  # the budget counts the wait too
            self.observer.ran(agent, ex.fuel_used - fuel0, guest_s)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in a worker thread (as many at once as the host has wasm threads)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    # -- warm or cold -----------------------------------------------------------------------
    async def wait_warm(self, agent: LiveAgent, done: anyio.Event) -> None:
        """Wait for ``done`` (the agent's tool), keeping its instance warm while that is cheap.

        The agent's checkpoint is already durable, so letting the instance go is always
        safe: it goes at once under memory pressure, and after ``warm_idle_s`` otherwise.
        """
        size = agent.ex.memory_size() if agent.ex is not None else 0
        if agent.ex is not None and (self.warm_waiting >= self.max_warm
                                     or self.warm_bytes + size > self.max_warm_bytes):
            self.hibernate(agent)
        counted = agent.ex is not None
        if counted:
            self.warm_waiting += 1
            self.warm_bytes += size
        try:
            with anyio.move_on_after(self.warm_idle_s):
                await done.wait()
            if not done.is_set() and agent.ex is not None:
                self.hibernate(agent)
        finally:
            if counted:
                self.warm_waiting -= 1
                self.warm_bytes -= size

    def hibernate(self, agent: LiveAgent) -> None:
        """Drop a waiting agent's instance; it will be rebuilt from its checkpoint."""
        self.release(agent)
        agent.usage["hibernations"] = agent.usage.get("hibernations", 0) + 1

    @staticmethod
    def release(agent: LiveAgent) -> None:
        """Give the agent's instance (and its memory) back."""
        if agent.ex is not None:
            agent.ex.release()
            agent.ex = None
