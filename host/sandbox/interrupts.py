"""Ctrl-C and SIGTERM end work at a safe point, never inside a callback from Wasmtime.

Python runs a signal handler in the main thread between two bytecodes, wherever that
thread is. When it is running guest code, that is inside a host import that Wasmtime
called back into, and an exception raised there unwinds through Wasmtime's C frames
and the ctypes trampoline (a run of the test suite died of "double free or corruption"
that way). So while :func:`handle_signals` is in force:

* the handler only records the signal and interrupts every guest through its engine
  (the epoch is moved past any deadline, so running wasm traps at its next check);
* if the main thread is inside Wasmtime, the handler returns and the call unwinds by
  itself; :class:`Interrupted` is raised once it is back in Python
  (:func:`raise_if_requested`, called by the execution after every call into wasm);
* otherwise it raises :class:`Interrupted` at once, as Ctrl-C always did.

Either way nothing half-done is committed: an agent is left at its last checkpoint,
which ``torpor resume`` continues.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

_tls = threading.local()
_engines: weakref.WeakSet[Any] = weakref.WeakSet()
_longest_deadline = [1]  # in epoch ticks: how far the epoch must move to trap every guest
_requested = [0]  # the signal number, while one waits to end the work


class Interrupted(KeyboardInterrupt):
    """The work was ended by a signal (``signum``), at a point where that is safe."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def register_engine(engine: Any) -> None:
    """An engine whose guests a signal must interrupt (a ``wasmtime.Engine``)."""
    _engines.add(engine)


def note_deadline(ticks: int) -> None:
    """A store was armed with a deadline this many ticks away."""
    if ticks > _longest_deadline[0]:
        _longest_deadline[0] = ticks


@contextlib.contextmanager
def in_wasm() -> Iterator[None]:
    """Mark a call into Wasmtime that may call back into Python on this thread."""
    depth = getattr(_tls, "depth", 0)
    _tls.depth = depth + 1
    try:
        yield
    finally:
        _tls.depth = depth


def enter_wasm() -> int:
    """The fast form of :func:`in_wasm` for hot paths: pair with :func:`leave_wasm`."""
    depth: int = getattr(_tls, "depth", 0)
    _tls.depth = depth + 1
    return depth


def leave_wasm(depth: int) -> None:
    _tls.depth = depth


def requested() -> int:
    """The signal that asked the work to end, or 0."""
    return _requested[0]


def raise_if_requested() -> None:
    """Raise :class:`Interrupted` if a signal asked the work to end (call at safe points only)."""
    if _requested[0] and not getattr(_tls, "depth", 0):
        raise Interrupted(_requested[0])


def interrupt_guests() -> None:
    """Make every running guest trap at its next epoch check (also from another thread)."""
    for engine in list(_engines):
        for _ in range(_longest_deadline[0] + 1):
            engine.increment_epoch()


def request(signum: int) -> None:
    """Ask the work to end as a signal would, without raising here: for a process whose
    signals another loop owns (``torpor serve``: uvicorn's handlers), so that running
    guests trap at their next epoch check and the runtime raises :class:`Interrupted` at
    its next safe point. :func:`clear` ends the request."""
    _requested[0] = signum
    interrupt_guests()


def clear() -> None:
    """Forget a :func:`request` (the work it ended is over)."""
    _requested[0] = 0


def _handle(signum: int, frame: Any) -> None:
    _requested[0] = signum
    interrupt_guests()
    if getattr(_tls, "depth", 0):
        return  # inside Wasmtime: the call unwinds, then the execution raises
    raise Interrupted(signum)


class _QuietInterruptedTasks(logging.Filter):
    """Drop asyncio's report of a task that ended by the interrupt: when a signal lands in
    one task of several, the event loop's shutdown logs the others' ``Interrupted`` with
    a traceback (``unhandled exception during asyncio.run() shutdown``), which says no
    more than the one line the command prints. Anything else it logs still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, BaseExceptionGroup):
            return not all(isinstance(e, KeyboardInterrupt) for e in exc.exceptions)
        return not (isinstance(exc, KeyboardInterrupt) and _requested[0])


_QUIET = _QuietInterruptedTasks()


def _quiet_unraisable(hook: Any) -> Any:
    """``sys.unraisablehook`` that drops an :class:`Interrupted` raised where Python cannot
    propagate it (a weakref callback of the import system, a finalizer): Python printed it
    as "Exception ignored ... Traceback" (`torpor bench interrupts` found one in 206
    signals). The signal is still recorded, and the work still ends at its next safe point."""

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, Interrupted):
            hook(info)

    return unraisable


@contextlib.contextmanager
def handle_signals(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), *,
                   then_ignore: bool = False) -> Iterator[None]:
    """While in force, ``signums`` end the work as described in the module docstring.

    Afterwards the previous handlers are back, or, with ``then_ignore`` (a command whose
    process ends next), the signals are ignored, so that one landing while the outcome
    is reported cannot cut the report short; :func:`requested` still says if one came.
    Only from the main thread (where Python runs handlers); elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    asyncio_log = logging.getLogger("asyncio")
    asyncio_log.addFilter(_QUIET)
    previous_unraisable = sys.unraisablehook
    sys.unraisablehook = _quiet_unraisable(previous_unraisable)
    try:
        for s in signums:
            if previous[s] != signal.SIG_IGN:  # a shell's background job ignores SIGINT: keep that
                signal.signal(s, _handle)
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if then_ignore else handler)
        asyncio_log.removeFilter(_QUIET)
        if not then_ignore:  # a process that ends next keeps it: a late signal is as quiet
            sys.unraisablehook = previous_unraisable
        if not then_ignore:
            _requested[0] = 0
