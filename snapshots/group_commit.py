"""Group commit: many writers' transactions share one durable commit.

Why: a durable LMDB commit costs an ``fdatasync`` (about 0.5 ms on this machine's disk),
which caps a host at about 2,000 hibernations a second if every agent committed
alone. Here one writer thread takes whatever has been queued, runs all of it in one
transaction and syncs once; callers wait on a Future. (A lone durable writer still waits
for a whole sync, unless it asks for less, below; a store opened with
``durability="process"`` removes the sync from the commit altogether and flushes in the
background, see ``snapshots.lmdb_store``.)

Batching policy: a lone request is committed at once (no added latency when the host is
quiet). When commits are cheap (a store at ``durability="process"``: no sync) and the
writer is idle, the caller commits a lone request on its own thread instead: the two
thread hand-offs of a queued request (~35 µs each here) cost more than the commit
itself (~28 µs). At ``sync`` a lone commit waits for an ``fdatasync``, which must not
block the caller (a host's event loop), so such requests go to the writer thread. When
the writer finds more than one request waiting it lingers up to
``max_delay_s`` for more, up to ``max_batch`` per commit, because concurrent arrivals
predict more of them. Requests that arrive while a commit is in flight form the next
batch, so under load batches grow by themselves.

Per-commit durability: a request submitted with ``sync`` short of ``"now"`` (its caller
tells nobody of it before a later durable commit covers it; ``snapshots.store.SyncWhen``)
lets its batch commit without waiting for a sync if every request in it says so (the
batch takes the most urgent of its requests' ``sync``). Such a request is also
committed inline when the writer is idle and the store is at most one commit behind (so
the transaction need not wait for a sync first): no sync, no hand-off.

Failure isolation: the store runs each function in its own nested transaction
(``AgentStore.transact_batch``): a function that raises fails only its own Future and
leaves no writes; the rest of the batch commits. An error of the store itself (disk
full) fails every Future of that batch. Functions may be run more than once (the map
grew), so they must act only through the transaction they are given.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from .errors import StoreError
from .store import AgentStore, Outcome, SyncWhen, WriteTxn

__all__ = ["GroupCommitter"]

T = TypeVar("T")

_Item = tuple[Future[Any], Callable[[WriteTxn], Any], SyncWhen]  # the Future, the function, when synced


class GroupCommitter:
    """Queue transaction functions from any thread; commit them in batches on one thread."""

    def __init__(
        self,
        store: AgentStore,
        max_batch: int = 512,
        max_delay_s: float = 0.002,
        *,
        name: str = "torpor-group-commit",
        inline_when_idle: bool | None = None,
    ) -> None:
        """``inline_when_idle``: commit a lone request on the submitting thread when the
        writer is idle; default: when the store's commits do not sync
        (``durability == "process"``)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        self._store = store
        self._max_batch = max_batch
        self._max_delay = max_delay_s
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # None: stop
        self._closed = False
        self._close_lock = threading.Lock()
        if inline_when_idle is None:
            inline_when_idle = getattr(store, "durability", "sync") == "process"
        self._inline = inline_when_idle
        # Held while a batch commits, on the writer thread or inline on a caller's.
        self._busy = threading.Lock()
        #: commits made and functions run (for tests, metrics and benchmarks)
        self.batches = 0
        self.items = 0
        self.inline_commits = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def store(self) -> AgentStore:
        """The store this committer commits to."""
        return self._store

    def submit(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> Future[T]:
        """Queue ``fn`` for the next batch; the Future resolves once it is committed.

        Committed means what the store's durability level promises (on stable storage
        at ``sync``, in the OS page cache at ``process``); with ``sync`` short of ``"now"``, only
        once a later durable commit returns (see the module docstring).
        """
        fut: Future[T] = Future()
        if self._closed:
            raise _closed_error()
        try:
            done = self.try_inline(fn, sync=sync)
        except Exception as exc:  # the store failed: a Future carries it, as from the writer
            fut.set_exception(exc)
            return fut
        if done is not None:
            if done.error is not None:
                fut.set_exception(done.error)
            else:
                fut.set_result(done.value)
            return fut
        with self._close_lock:  # so that nothing is queued behind the stop mark
            if self._closed:
                raise _closed_error()
            self._queue.put((fut, fn, sync))
        return fut

    def try_inline(self, fn: Callable[[WriteTxn], Any], *, sync: SyncWhen = "now") -> Outcome | None:
        """Commit ``fn`` on this thread, now, if that is cheap; None if it was not run.

        It is, when the store's commits do not sync (``inline_when_idle``), nothing is
        queued and the writer is idle (see the module docstring). The Outcome holds
        ``fn``'s value or its error; an error of the store itself (disk full) is raised.
        This is ``submit`` without a Future, for callers that are on the suspend path:
        a Future's condition variable and hand-offs cost about as much as the commit.
        """
        cheap = self._inline or (sync != "now" and getattr(self._store, "unflushed_commits", 2) <= 1)
        if not (cheap and self._queue.empty() and self._busy.acquire(blocking=False)):
            return None
        # Idle writer, nothing queued. A request queued meanwhile by another thread is
        # not ordered before this one by anything, so committing this one first is a
        # valid order.
        try:
            if self._closed:
                raise _closed_error()
            (outcome,) = self._store.transact_batch((fn,), sync=sync)
        finally:
            self._busy.release()
        self.batches += 1
        self.items += 1
        self.inline_commits += 1
        return outcome

    def commit(self, fn: Callable[[WriteTxn], T], *, sync: SyncWhen = "now") -> T:
        """Commit ``fn`` and wait for it: inline when :meth:`try_inline` can, else queued.

        Blocks the calling thread for the writer's commit (an ``fdatasync`` at ``sync``),
        so an event loop should use :meth:`try_inline` and await :meth:`submit` instead.
        """
        done = self.try_inline(fn, sync=sync)
        if done is None:
            return self.submit(fn, sync=sync).result()
        value: T = done.unwrap()
        return value

    def close(self, timeout: float | None = None) -> None:
        """Commit everything queued so far, then stop the writer thread. Idempotent."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join(timeout)

    def __enter__(self) -> GroupCommitter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ writer

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch: list[_Item] = [first]
            stop = self._drain(batch)
            if not stop and 1 < len(batch) < self._max_batch and self._max_delay > 0:
                stop = self._linger(batch, time.monotonic() + self._max_delay)
            self._commit(batch)

    def _drain(self, batch: list[_Item]) -> bool:
        """Take what is queued right now, up to max_batch; True if the stop mark came."""
        get = self._queue.get_nowait
        while len(batch) < self._max_batch:
            try:
                item = get()
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
        return False

    def _linger(self, batch: list[_Item], deadline: float) -> bool:
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return False
            if item is None:
                return True
            batch.append(item)
            if self._drain(batch):
                return True
        return False

    def _commit(self, batch: list[_Item], *, locked: bool = False) -> None:
        if not locked:
            with self._busy:
                self._commit(batch, locked=True)
            return
        live = [(fut, fn, sync) for fut, fn, sync in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        whens = {sync for _, _, sync in live}  # one sync covers the batch: the most urgent request's
        sync: SyncWhen = "now" if "now" in whens else "soon" if "soon" in whens else "later"
        try:
            outcomes = self._store.transact_batch([fn for _, fn, _ in live], sync=sync)
        except BaseException as exc:  # the store failed: nothing of the batch written (or, its sync failed, durable)
            for fut, _, _ in live:
                fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.items += len(live)
        for (fut, _, _), outcome in zip(live, outcomes, strict=True):
            if outcome.error is not None:
                fut.set_exception(outcome.error)
            else:
                fut.set_result(outcome.value)


def _closed_error() -> StoreError:
    return StoreError("GroupCommitter is closed; submit to a new one or use store.transact")
