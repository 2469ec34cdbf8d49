"""Concurrency pools with a queue and priorities.

A :class:`PriorityPool` admits at most ``size`` holders at once; the rest wait
in a queue served highest priority first, then first come first served. The
host keeps one host-wide pool and one per agent class (the policy's
``agent.pool``): an agent needs a slot in both to run, taken in that fixed
order (class, then host) so two agents can never deadlock holding one each.

Why not ``anyio.CapacityLimiter``: it is FIFO only, and priorities are the
point. Waiters are anyio events, so cancellation (a Ctrl-C, a task group
shutting down) removes a waiter cleanly and never leaks a slot.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio


@dataclass(order=True)
class _Waiter:
    sort_key: tuple[int, int]
    event: anyio.Event = field(compare=False)
    granted: bool = field(default=False, compare=False)
    cancelled: bool = field(default=False, compare=False)


class PriorityPool:
    """At most ``size`` concurrent holders; waiters served by priority (higher first)."""

    def __init__(self, size: int, name: str = "pool") -> None:
        if size < 1:
            raise ValueError(f"pool {name!r}: size must be at least 1, got {size}")
        self.size = size
        self.name = name
        self.in_use = 0
        self.peak = 0
        self._queue: list[_Waiter] = []
        self._counter = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._queue if not w.cancelled)

    async def acquire(self, priority: int = 0) -> None:
        if self.in_use < self.size and not self.waiting:
            self._take()
            return
        waiter = _Waiter((-priority, next(self._counter)), anyio.Event())
        heapq.heappush(self._queue, waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()  # granted as we were cancelled: pass the slot on
            else:
                waiter.cancelled = True
            raise

    def _take(self) -> None:
        self.in_use += 1
        self.peak = max(self.peak, self.in_use)

    def release(self) -> None:
        if self.in_use <= 0:
            raise RuntimeError(f"pool {self.name!r} released more often than acquired")
        self.in_use -= 1
        while self._queue:
            waiter = heapq.heappop(self._queue)
            if waiter.cancelled:
                continue
            waiter.granted = True
            self._take()
            waiter.event.set()
            break

    @asynccontextmanager
    async def slot(self, priority: int = 0) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()


@asynccontextmanager
async def slots(host_pool: PriorityPool, class_pool: PriorityPool | None, priority: int) -> AsyncIterator[None]:
    """A slot in the agent's class pool (if it has one), then in the host pool: always in
    that order, so that two agents can never deadlock holding one each."""
    if class_pool is not None:
        await class_pool.acquire(priority)
    try:
        async with host_pool.slot(priority):
            yield
    finally:
        if class_pool is not None:
            class_pool.release()
