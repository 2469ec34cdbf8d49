"""Whether the store can take work: the check behind ``/readyz``.

``/readyz`` answers load balancers without a token (the gateway lets ``/healthz`` and
``/readyz`` through), so whatever it does, anyone can make it do often. The check is an
empty write transaction: it proves the store is open, was not opened read-only, has no
failed background flush (durability ``process``), and that its writer lock can be taken
(a writer stuck holding it would stall every agent), and it commits nothing, so LMDB
writes no page and syncs nothing. Beside it, the free space of the store's disk (a full
disk is ``store_full``). One check runs at a time, off the event loop, at most every
:data:`CHECK_TTL_S` seconds: probes in between are answered with the last result, so a
flood of probes costs the store one transaction per interval.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from host.server.responses import code_of
from snapshots.store import AgentStore

#: How long one check's result answers the probes that follow it.
CHECK_TTL_S = 1.0
#: A check that takes longer than this is an answer in itself: ``store_busy``.
CHECK_TIMEOUT_S = 2.0
#: Below this much free disk the store is not ready to take work (a commit may not fit).
MIN_FREE_BYTES = 1 << 20


@dataclass(frozen=True)
class StoreHealth:
    """One check's result: ``problem`` is None when the store can take work."""

    problem: tuple[str, str] | None  # (code, message)
    disk_free_bytes: int | None
    took_ms: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.problem is None, "disk_free_bytes": self.disk_free_bytes,
                               "check_ms": round(self.took_ms, 3)}
        if self.problem is not None:
            out["code"], out["message"] = self.problem
        return out


class StoreProbe:
    """The cached, single-flight store check of one server (see the module docstring)."""

    def __init__(self, store: AgentStore, directory: Path) -> None:
        self.store = store
        self.directory = directory
        self._last: tuple[float, StoreHealth] | None = None
        self._lock = anyio.Lock()

    async def check(self) -> StoreHealth:
        """The store's health, at most :data:`CHECK_TTL_S` old."""
        async with self._lock:  # one check at a time; the probes waiting behind it get its result
            if self._last is not None and time.monotonic() - self._last[0] < CHECK_TTL_S:
                return self._last[1]
            t0 = time.perf_counter()
            health: StoreHealth | None = None
            with anyio.move_on_after(CHECK_TIMEOUT_S):
                health = await anyio.to_thread.run_sync(self._check, abandon_on_cancel=True)
            if health is None:
                health = StoreHealth(("store_busy", f"the store's writer lock was not free within {CHECK_TIMEOUT_S:g}s"),
                                     None, (time.perf_counter() - t0) * 1000)
            self._last = (time.monotonic(), health)
            return health

    def _check(self) -> StoreHealth:
        t0 = time.perf_counter()
        free: int | None = None
        try:
            free = shutil.disk_usage(self.directory).free
            self.store.transact(_nothing)
        except Exception as exc:  # whatever it is, the store cannot take work: say which
            return StoreHealth((code_of(exc), str(exc)[:500]), free, (time.perf_counter() - t0) * 1000)
        took = (time.perf_counter() - t0) * 1000
        if free < MIN_FREE_BYTES:
            return StoreHealth(("store_full", f"the store's disk has {free} bytes free"), free, took)
        return StoreHealth(None, free, took)


def _nothing(txn: Any) -> None:
    """An empty write transaction's body: it takes the writer lock and writes nothing."""
