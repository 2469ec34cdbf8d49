"""One agent's live Wasmtime instance and the suspend/resume mechanics around it.

An :class:`Execution` is synchronous and single-threaded on purpose: it runs
the guest until the guest finishes, fails, or reaches a tool call. At a tool
call the ``tool_call`` import asks Asyncify to unwind the wasm stack into the
agent's own linear memory and returns; the entry export then returns to us
and the whole agent is linear memory plus a few mutable globals. From there
the instance can stay in memory (warm) and be rewound in place, or be captured
(:meth:`capture`), dropped, and later rebuilt from the capture in a fresh
instance (:meth:`restore`). Either way the guest's ``tool_call`` returns the
tool's answer as if it had simply blocked.

The orchestration (policies, tools, the store, anyio) lives in
:mod:`host.runtime`; this module knows only Wasmtime and the ABI.
"""

from __future__ import annotations

import ctypes
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import wasmtime
from wasmtime import _bindings as _wasmtime_bindings
from wasmtime import _ffi
from wasmtime._extern import wrap_extern as _wrap_extern

from host.sandbox import abi, guest_json, interrupts, write_watch
from host.sandbox.engine import LoadedModule
from host.sandbox.validate import HOST_LIMITS
from snapshots.delta import MemoryAt, MemoryDelta, apply_delta, diff_memory, touched_pages
from snapshots.format import GlobalValue, Snapshot
from snapshots.lazy import LazyField

_tls = threading.local()

NORMAL, UNWINDING, REWINDING = 0, 1, 2
ABORT_EXIT = 2  # GuestAbort kind raised by WASI proc_exit; the message is the status
INITIALIZE_EXPORT = abi.INITIALIZE_EXPORT
PAGE = 65536
U32 = 0xFFFFFFFF
_INSTANTIATION_FUEL = 1 << 40
#: What an agent's store may hold beside its one linear memory (whose size is the
#: policy's memory budget): one instance, one memory, a few tables of bounded length.
#: A table element is host memory outside the linear memory (8-16 bytes each), so a
#: ``table.grow`` past the limit answers -1, as a ``memory.grow`` past the budget does.
#: The same bounds the validator holds a module's declared tables to (host/sandbox/validate.py).
MAX_TABLE_ELEMENTS = HOST_LIMITS.max_table_elements
STORE_LIMITS = {"table_elements": MAX_TABLE_ELEMENTS, "instances": 1, "tables": HOST_LIMITS.max_tables, "memories": 1}


# Small Wasmtime C calls on hot paths, bound through PyDLL so that they keep the GIL:
# wasmtime-py binds them through CDLL, which releases and re-takes the GIL around each
# call, and in a host whose other threads are busy every re-take can wait. (Calls that
# run guest code, wasmtime_func_call, still release it.)
_WT_HOLD = ctypes.PyDLL(_ffi.dll._name)


def _hold_gil(name: str) -> Any:
    src = getattr(_wasmtime_bindings, "_" + name)
    fn = getattr(_WT_HOLD, name)
    fn.restype, fn.argtypes = src.restype, src.argtypes
    return fn


_memory_data = _hold_gil("wasmtime_memory_data")
_memory_data_size = _hold_gil("wasmtime_memory_data_size")
_export_get = _hold_gil("wasmtime_instance_export_get")
_global_get_c = _hold_gil("wasmtime_global_get")
_global_set_c = _hold_gil("wasmtime_global_set")
_get_fuel_c = _hold_gil("wasmtime_context_get_fuel")  # read at every tool call (fuel_now)
_set_fuel_c = _hold_gil("wasmtime_context_set_fuel")  # at every rewind (finish_rewind)
# For Asyncify's four control exports only: Binaryen-generated functions that set two
# globals and return, so holding the GIL through them cannot stall other threads, while
# releasing and re-taking it costs a wake-up whenever another thread (the epoch ticker,
# the committer) is waiting. Everything that runs the guest's own code releases it.
_func_call_hold = _hold_gil("wasmtime_func_call")
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)(
    ctypes.cast(ctypes.memmove, ctypes.c_void_p).value or 0
)


class GuestAbort(Exception):
    """Raised inside the ``abort`` import; carries the guest's reason out of the wasm call."""

    def __init__(self, kind: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ImportFault(Exception):
    """A host import found the guest's arguments unusable (answered with an error code)."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class PendingCall:
    """The tool call an unwound agent is waiting on.

    ``args`` (parsed JSON) may be given as a :class:`~snapshots.lazy.Lazy`: a call
    restored from a large checkpoint parses its arguments only if something reads them
    (running the call again, the journal, an inspection), not to answer it from the journal.
    """

    seq: int
    tool: str
    args: LazyField[Any] = LazyField()  # noqa: RUF009 (a descriptor: no default)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "tool": self.tool, "args": self.args}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PendingCall:
        return cls(int(d["seq"]), str(d["tool"]), d.get("args"))

    @classmethod
    def from_snapshot(cls, snap: Snapshot) -> PendingCall | None:
        """The call ``snap`` is parked at (its arguments still undecoded), or None."""
        call = snap.pending_call()
        return None if call is None else cls(*call)


@dataclass(frozen=True)
class Suspended:
    call: PendingCall


@dataclass(frozen=True)
class Completed:
    output: Any
    exit_code: int = 0


@dataclass(frozen=True)
class Failed:
    code: str
    message: str


Outcome = Suspended | Completed | Failed


@dataclass(frozen=True)
class Limits:
    """Per-agent resource limits enforced by Wasmtime."""

    fuel: int  # total fuel for the agent's whole run, across suspensions
    memory_bytes: int
    deadline_s: float  # wall clock the guest may spend executing, per run


@dataclass(frozen=True)
class Captured:
    """Everything needed to rebuild an unwound agent in a fresh instance."""

    memory: MemoryDelta
    globals: tuple[GlobalValue, ...]
    async_buf: tuple[int, int]


def error_response(code: str, message: str, **extra: Any) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    body.update(extra)
    body.setdefault("retryable", False)
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Execution:
    """A live instance of one agent (see the module docstring)."""

    loaded: LoadedModule
    pre: wasmtime.InstancePre
    limits: Limits
    input: bytes
    fuel_used: int = 0
    call_seq: int = 0
    log_sink: Callable[[int, str], None] | None = None
    seed: bytes = b""  # written at the module's __torpor_seed before the first instruction
    output: bytes | None = None
    response: bytes = b""
    response_status: int = 0
    mode: int = NORMAL
    pending: PendingCall | None = None
    async_buf: tuple[int, int] = (0, 0)
    _store: Any = None
    _exports: Any = None
    _mem: Any = None
    _entry: Any = None
    _instance: Any = None
    _watch: write_watch.Tracked | None = None  # the memory's write tracking, when it has one
    #: The instance may be put back for the next agent (host/sandbox/recycle.py): its last
    #: call ended at a tool call or at the agent's end, or it was restored and not yet run.
    _reusable: bool = False
    #: A delta against the image that the memory equals now (the capture just taken with no
    #: guest code run since, or the delta a restore wrote): what a reset copies back.
    _dirty: MemoryDelta | None = None
    recycled: bool = False  # this instance came from a recycled one (for tests and benchmarks)
    #: Asked by the ``tool_call`` import before it unwinds (:meth:`answer_inline`): the
    #: answer to give the guest at once, or None to unwind as usual. Set by the runtime
    #: around a segment it runs on its own thread; the sandbox knows nothing of what it does.
    inline_answer: Callable[[PendingCall], tuple[int, bytes] | None] | None = None
    #: The fuel the guest had used when it entered its latest ``tool_call``: what that call
    #: is recorded and replayed with, answered inline or unwound alike.
    call_fuel: int = 0
    #: The fuel this instance's unwinds and rewinds burnt, which is not counted (the host's
    #: work). A host before session 11 counted it: ``call_fuel + host_fuel`` is what such a
    #: host would have recorded at this call, had every call since the start or the restore
    #: been unwound (as a replay's are), so its records still replay (:meth:`fuel_matches`).
    host_fuel: int = 0
    #: Every value :attr:`host_fuel` had at a call, kept only when asked (a replay: a set):
    #: a record an older host began and this one resumed from one of its checkpoints is
    #: offset by the older host's count at that checkpoint from then on.
    fuel_history: set[int] | None = None
    #: Calls answered inline, and the host's time spent answering them (not the guest's).
    inline_answers: int = 0
    inline_s: float = 0.0
    _armed: int = 0  # the fuel the store was given at the segment's start

    # -- lifecycle ----------------------------------------------------------
    def _instantiate(self, capacity: int = 0) -> None:
        """An instance in the pristine state: a recycled one when the module's shelves hold one
        (host/sandbox/recycle.py), else a fresh one; ``capacity``: the memory size a restore
        will grow it to.

        With the memory pool the memory is then created with room for ``capacity``
        (from a recycled, already-faulted buffer when one is free), so the restore's
        grow neither moves nor copies.
        """
        shelves = self.loaded.shelves
        warm = shelves.take(self.pre, self.limits.memory_bytes) if shelves is not None else None
        if warm is not None:
            # Already in the pristine state (put back at its release); the store's limits are
            # this agent's, and _arm sets its fuel and deadline before its first instruction.
            warm.store.set_limits(memory_size=self.limits.memory_bytes, **STORE_LIMITS)
            self._store, self._instance, self._exports = warm.store, warm.instance, warm.exports
            self._mem, self._entry = warm.mem, warm.entry
            self._watch = warm.watch  # still tracking its writes, protected again at its reset
            self.recycled = True
            return
        self.recycled = False
        engine = self.loaded.engine
        store = wasmtime.Store(engine.wasmtime)
        # Tables are bounded at load (validate.py); these bound what the guest grows at run time.
        store.set_limits(memory_size=self.limits.memory_bytes, **STORE_LIMITS)
        if engine.prearm:
            # Without a copy-on-write image Wasmtime copies the data segments in with code
            # that checks fuel and epoch. That is the host's work, not the agent's: give it
            # its own allowance (start functions, the only guest code instantiation could
            # run, are refused at load); _arm sets the agent's budget before its first
            # instruction.
            store.set_fuel(_INSTANTIATION_FUEL)
            store.set_epoch_deadline(engine.deadline_ticks(self.limits.deadline_s))
        pool = engine.memory_pool
        if capacity and pool is not None:
            pool.hint(capacity)
        depth = interrupts.enter_wasm()  # instantiation may call back into Python (the memory creator)
        try:
            try:
                inst = self.pre.instantiate(store)
            finally:
                interrupts.leave_wasm(depth)
        except (wasmtime.Trap, wasmtime.WasmtimeError):
            interrupts.raise_if_requested()  # an interrupt trap during data-segment setup
            raise
        self._store = store
        self._instance = inst
        self._exports = _LazyExports(store, inst)
        self._mem = self._exports[abi.MEMORY_EXPORT]
        self._entry = self._exports.raw(abi.ENTRY_EXPORT)

    @property
    def _hold_gil(self) -> bool:
        """Keep the GIL through Asyncify's control exports only while the epoch ticker is
        native: a module's own "control" export that loops would otherwise stop the
        Python ticker, and with it the wall-clock deadline."""
        return self.loaded.engine.ticker_native

    def _call(self, name: str, *args: int, hold_gil: bool = False) -> None:
        """Call an i32-only export with no results on the fast path (``hold_gil``: only for
        the asyncify controls, see ``_func_call_hold``)."""
        ext = self._exports.raw(name)
        if ext is None:
            raise KeyError(name)
        _call_raw(self._store, ext, args, 0, hold_gil=hold_gil)

    def prepare(self) -> None:
        """Spawn: an instance in the pristine state (fresh, or recycled: host/sandbox/recycle.py),
        armed with budget and deadline, before its first instruction."""
        self._instantiate()
        self._arm()
        self._reusable = True  # nothing ran yet

    def _arm(self) -> int:
        remaining = self.limits.fuel - self.fuel_used
        store = self._store
        self._armed = max(0, remaining)
        store.set_fuel(self._armed)
        self.loaded.engine.ensure_ticker()
        ticks = self.loaded.engine.deadline_ticks(self.limits.deadline_s)
        interrupts.note_deadline(ticks)
        store.set_epoch_deadline(ticks)
        return remaining

    def _watch_writes(self) -> None:
        """Start tracking the writes to a memory that holds the pristine image now (fresh,
        or a restore before its delta is written): from here on a capture compares only the
        pages written since and those that differed at the previous capture
        (host/sandbox/write_watch.py). Only where every page is plain anonymous memory: a
        copy-on-write image is narrowed by its file pages already (``private_mapping``)."""
        if self.recycled:
            return  # the recycled instance's tracking (or none) goes on: see recycle.Shelves.give
        self._watch = None
        if self.loaded.engine.config.memory_init_cow or self.loaded.chunk_size != write_watch.PAGE:
            return
        self._watch = write_watch.track(*self._mem_base_len())

    def start(self) -> Outcome:
        """Take an instance in the pristine state (fresh or recycled) and run the entry export."""
        self._instantiate()
        self._watch_writes()
        if self.loaded.suspendable:
            self.async_buf = self.loaded.async_buf
            if self.async_buf == (0, 0):
                # A module built without the SDK's buffer: reserve a fresh page past
                # everything the guest has, before its first instruction runs.
                old = self._mem.grow(self._store, 1)
                self.async_buf = (old * PAGE, PAGE)
        self._write_seed()
        return self._call_entry(initialize=self.loaded.has_initialize)

    def _write_seed(self) -> None:
        """Put the agent's seed where the module's ``__torpor_seed`` points, if it has one
        (in bounds, or not at all: a module cannot make the host write elsewhere)."""
        cell = self._exports.get(abi.SEED_EXPORT) if self.seed else None
        if not isinstance(cell, wasmtime.Global):
            return
        addr = int(cell.value(self._store)) & U32
        if addr + len(self.seed) <= self._mem.data_len(self._store):
            self._mem.write(self._store, self.seed, addr)

    @classmethod
    def restore(cls, loaded: LoadedModule, pre: wasmtime.InstancePre, limits: Limits, input: bytes,
                captured: Captured, *, fuel_used: int, call_seq: int, pending: PendingCall,
                log_sink: Callable[[int, str], None] | None = None) -> Execution:
        """Rebuild an unwound agent in an instance in the pristine state (call :meth:`resume` next)."""
        ex = cls(loaded, pre, limits, input, fuel_used=fuel_used, call_seq=call_seq, log_sink=log_sink)
        size = captured.memory.memory_size
        ex._instantiate(size)
        store, mem = ex._store, ex._mem
        cur = mem.data_len(store)
        if size > cur and mem.grow(store, (size - cur + PAGE - 1) // PAGE) < 0:
            raise ValueError("cannot grow memory to the snapshot's size")
        ex._watch_writes()
        apply_delta(captured.memory, MemoryAt(*ex._mem_base_len()))
        ex.restore_globals(captured.globals)
        ex.async_buf = captured.async_buf
        ex.pending = pending
        ex._dirty, ex._reusable = captured.memory, True
        return ex

    def resume(self, status: int, response: bytes) -> Outcome:
        """Rewind into the pending ``tool_call``, which returns ``status`` with ``response``."""
        if self.pending is None:
            raise RuntimeError("resume() without a pending call")
        self.response_status = status
        self.response = response
        return self._call_entry(rewind=True)

    def release(self) -> None:
        """Drop the instance; the agent lives on only in its capture.

        (Freeing the store on a background thread was measured and rejected: the
        hand-off and the GIL it takes back cost more than the ~40 µs unmap it moves.)
        """
        shelves = self.loaded.shelves
        kept = False
        try:
            if shelves is not None and self._reusable and self._store is not None:
                from host.sandbox.recycle import Warm

                base, size = self._mem_base_len()
                warm = Warm(self._store, self._instance, self._exports, self._mem, self._entry, size, self._watch)
                kept = shelves.give(self.pre, warm, base, size, self._dirty, _reset_global)
        finally:
            if self._watch is not None and not kept:
                write_watch.untrack(self._watch)
            self._watch = None
            self._reusable, self._dirty = False, None
        self._store = self._exports = self._mem = self._entry = self._instance = None

    @property
    def live(self) -> bool:
        return self._store is not None

    # -- running ------------------------------------------------------------
    def _call_entry(self, rewind: bool = False, initialize: bool = False) -> Outcome:
        store = self._store
        remaining = self._arm()
        if remaining <= 0:
            return Failed("out_of_fuel", "the agent's fuel budget is used up")
        prev = getattr(_tls, "ex", None)
        _tls.ex = self
        self._reusable, self._dirty = False, None  # until this call ends at a tool call or the end
        depth = interrupts.enter_wasm()  # a signal now waits for this call to unwind
        try:
            if rewind:
                self._call("asyncify_start_rewind", self.async_buf[0], hold_gil=self._hold_gil)
                self.mode = REWINDING
            if initialize:
                # A WASI "reactor" module runs its constructors (libc, C++ statics) here, once.
                self._call(INITIALIZE_EXPORT)
                if self.mode == UNWINDING:
                    raise GuestAbort(abi.ABORT_PANIC, f"a tool call during {INITIALIZE_EXPORT} is not supported")
            result = _call_raw(store, self._entry, (), self.loaded.entry_results)
            outcome: Outcome
            if self.mode == UNWINDING:
                self._call("asyncify_stop_unwind", hold_gil=self._hold_gil)
                self.mode = NORMAL
                assert self.pending is not None
                outcome = Suspended(self.pending)
            else:
                code = int(result) if isinstance(result, int) else 0
                if code != 0:
                    outcome = Failed("agent_error", f"the agent returned {code} from {abi.ENTRY_EXPORT}")
                else:
                    outcome = Completed(self._output_value(), 0)
        except GuestAbort as exc:
            if exc.kind == ABORT_EXIT:  # WASI proc_exit: a normal end, with a status
                status = int(str(exc))
                outcome = (Completed(self._output_value(), 0) if status == 0 else
                           Failed("agent_error", f"the agent exited with status {status}"))
            else:
                outcome = Failed("memory_limit" if exc.kind == abi.ABORT_OOM else "aborted", str(exc))
        except wasmtime.Trap as trap:
            outcome = self._classify_trap(trap)
        except wasmtime.WasmtimeError as exc:
            outcome = Failed("trap", _first_line(str(exc)))
        finally:
            interrupts.leave_wasm(depth)
            _tls.ex = prev
            try:
                self.fuel_used += remaining - store.get_fuel()
            except wasmtime.WasmtimeError:
                self.fuel_used = self.limits.fuel
        # A signal that arrived meanwhile ends the work here, back in Python, with nothing
        # of this segment committed (an interrupt trap is the signal's, not a deadline).
        interrupts.raise_if_requested()
        if isinstance(outcome, Suspended):
            # The unwind is the host's work, not the guest's (nor is the rewind, see
            # finish_rewind): the call is counted at its entry, as one answered inline.
            self.host_fuel += max(0, self.fuel_used - self.call_fuel)
            self.fuel_used = self.call_fuel
            if self.fuel_history is not None:
                self.fuel_history.add(self.host_fuel)
        else:
            self.mode = NORMAL
        self._reusable = isinstance(outcome, Suspended | Completed)
        return outcome

    def _output_value(self) -> Any:
        if self.output is None:
            return None
        return guest_json.parse(self.output)  # checked by output_write; parsed the same way

    def _classify_trap(self, trap: wasmtime.Trap) -> Failed:
        code = trap.trap_code
        msg = _trap_summary(trap.message)
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return Failed("out_of_fuel", f"the agent ran out of fuel (budget {self.limits.fuel})")
        if code == wasmtime.TrapCode.INTERRUPT:
            return Failed("deadline_exceeded", f"the agent exceeded its wall-clock budget of {self.limits.deadline_s:g} s")
        if code == wasmtime.TrapCode.STACK_OVERFLOW:
            return Failed("stack_overflow", "the agent exhausted its call stack (unbounded recursion?)")
        if self.mode == UNWINDING:
            # Asyncify ran out of room saving the stack (it traps, or faults past the
            # buffer): the agent is failed here and never snapshotted, so no state escapes.
            return Failed(
                "suspend_overflow",
                f"the agent's stack at this tool call does not fit the {self.async_buf[1]}-byte suspension "
                "buffer; rebuild with a larger -DTORPOR_ASYNC_STACK (C) or `pub const torpor_async_stack` (Zig)",
            )
        if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS and self._shadow_stack_overflowed():
            return Failed("stack_overflow", "the agent overflowed its shadow stack (unbounded recursion?)")
        return Failed("trap", msg)

    def _shadow_stack_overflowed(self) -> bool:
        sp = self._exports.get(abi.STACK_POINTER_EXPORT) if self._exports is not None else None
        if not isinstance(sp, wasmtime.Global):
            return False
        try:
            value = int(sp.value(self._store)) & U32
        except wasmtime.WasmtimeError:
            return False
        return value < 1024 or value > self._mem.data_len(self._store)

    # -- memory -------------------------------------------------------------
    def _mem_base_len(self) -> tuple[int, int]:
        ctx = self._store._context()
        ref = ctypes.byref(self._mem._memory)
        return ctypes.addressof(_memory_data(ctx, ref).contents), int(_memory_data_size(ctx, ref))

    def _buffer(self) -> Any:
        base, n = self._mem_base_len()
        return (ctypes.c_ubyte * n).from_address(base)

    def memory_size(self) -> int:
        return self._mem_base_len()[1]

    def read(self, ptr: int, length: int, limit: int) -> bytes:
        return self.read_many((ptr, length, limit))[0]

    def read_many(self, *ranges: tuple[int, int, int]) -> list[bytes]:
        """Copy each (pointer, length, limit) out of linear memory, checked in ABI.md's
        order across all of them: every range's bounds (``E_FAULT``) before any size limit
        (``E_TOO_LARGE``), so a call's answer does not depend on which buffer came first."""
        base, n = self._mem_base_len()
        for ptr, length, _ in ranges:
            p = ptr & U32
            if length < 0:
                raise ImportFault(abi.E_FAULT, f"negative length {length}")
            if p + length > n:
                raise ImportFault(abi.E_FAULT, f"range [{p}, {p + length}) is outside linear memory ({n} bytes)")
        for _, length, limit in ranges:
            if length > limit:
                raise ImportFault(abi.E_TOO_LARGE, f"{length} bytes exceeds the limit of {limit}")
        return [ctypes.string_at(base + (ptr & U32), length) if length else b"" for ptr, length, _ in ranges]

    def write(self, ptr: int, cap: int, data: bytes) -> int:
        p = ptr & U32
        if cap < 0:
            raise ImportFault(abi.E_FAULT, f"negative capacity {cap}")
        base, n = self._mem_base_len()
        # The guest claims [ptr, ptr + cap) is its buffer: all of it must be in bounds,
        # or a short answer could land in memory the guest did not offer.
        if p + cap > n:
            raise ImportFault(abi.E_FAULT, f"range [{p}, {p + cap}) is outside linear memory ({n} bytes)")
        count = min(cap, len(data))
        if count:
            _memmove(base + p, data, count)
        return count

    # -- capture ------------------------------------------------------------
    def capture(self) -> Captured:
        """The unwound agent's state: memory delta against the pristine image, globals, buffer."""
        # Pages of this memory the kernel reports never touched equal the pristine image
        # (Wasmtime maps zero pages and the data image; the memory pool hands out
        # buffers whose absent pages read as zeros, and data segments and restores
        # write theirs): skipped unread, they stay unmapped, so every capture of the
        # instance reads only the pages the agent (or its restore) really touched. The
        # memory is a private mapping: pages of a copy-on-write image the agent only
        # read are the image file's own, skipped too (a 12.6 MiB Python image: ~850
        # pages present, ~150 written).
        base, size = self._mem_base_len()
        candidates = self._write_candidates(base, size)
        delta = diff_memory(self.loaded.image, MemoryAt(base, size), self.loaded.chunk_size,
                            untouched_is_pristine=True, private_mapping=True, candidates=candidates)
        if self._watch is not None:
            self._watch.differed = delta.indices
        self._dirty = delta
        return Captured(delta, self.capture_globals(), self.async_buf)

    def _write_candidates(self, base: int, size: int) -> list[int] | None:
        """The pages a tracked memory may differ from the image in: written since the last
        capture (protected again now), differing at it, or grown since tracking began
        (those the kernel reports touched). None: compare as without tracking."""
        w = self._watch
        if w is None:
            return None
        if w.base != base or size < w.size:  # moved by a grow: not the range being tracked
            self._watch = None
            return None
        written = write_watch.written_pages(w)
        if written is None:
            return None
        pages = set(written)
        pages.update(w.differed)
        if size > w.size:
            grown = touched_pages(base + w.size, size - w.size)
            first = w.size // write_watch.PAGE
            pages.update(range(first, size // write_watch.PAGE) if grown is None else (first + p for p in grown))
        return sorted(pages)

    def capture_globals(self) -> tuple[GlobalValue, ...]:
        """The snapshotted mutable globals of the live instance."""
        store, exports = self._store, self._exports
        return tuple(
            GlobalValue(name, kind, _global_get(store, exports.raw(name), kind))  # type: ignore[arg-type]
            for name, kind in self.loaded.global_exports
        )

    def restore_globals(self, globals_: tuple[GlobalValue, ...]) -> None:
        """Set the snapshotted globals of a fresh instance (part of :meth:`restore`)."""
        for g in globals_:
            ext = self._exports.raw(g.name)
            if ext is None:
                raise KeyError(g.name)
            _global_set(self._store, ext, g)

    # -- imports (called by Wasmtime through the linker) ----------------------
    def fuel_now(self) -> int:
        """The fuel the guest has used so far, read while it runs (inside an import)."""
        left = ctypes.c_uint64(0)
        error = _get_fuel_c(self._store._context(), ctypes.byref(left))
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        return self.fuel_used + self._armed - int(left.value)

    def fuel_matches(self, recorded: int) -> bool:
        """Whether ``recorded``, the fuel a record holds for the call this instance is
        stopped at, is the fuel it shows: this host's count, or an older host's, which
        counted the unwinds and rewinds too (:attr:`host_fuel`, or one of its earlier values
        in :attr:`fuel_history`)."""
        return self.fuel_offset_known(recorded - self.call_fuel)

    def fuel_offset_known(self, offset: int) -> bool:
        """Whether a recorded fuel this far above this host's count is an older host's count."""
        return offset in (0, self.host_fuel) or (self.fuel_history is not None and offset in self.fuel_history)

    def answer_inline(self, call: PendingCall) -> int | None:
        """Ask :attr:`inline_answer` for ``call``'s answer, without unwinding: the status
        ``tool_call`` returns, with the response buffer set as a rewind would set it, or None
        (unwind). The time the runtime spends answering is counted in :attr:`inline_s`."""
        ask = self.inline_answer
        if ask is None:
            return None
        t0 = time.perf_counter()
        got = ask(call)
        if got is None:
            return None
        self.response_status, self.response = got
        self.inline_answers += 1
        self.inline_s += time.perf_counter() - t0
        return self.response_status

    def begin_unwind(self, call: PendingCall) -> None:
        addr, size = self.async_buf
        base = self._mem_base_len()[0]
        hdr = (ctypes.c_uint32 * 2).from_address(base + addr)
        hdr[0] = addr + 8
        hdr[1] = addr + size
        self.pending = call
        self._call("asyncify_start_unwind", addr, hold_gil=self._hold_gil)
        self.mode = UNWINDING

    def finish_rewind(self) -> int:
        self._call("asyncify_stop_rewind", hold_gil=self._hold_gil)
        self.mode = NORMAL
        # The fuel the rewind burnt is given back: a call answered inline has none to burn,
        # and a re-executed guest must show the same fuel at every call whichever way its
        # calls were answered (the journal checks it, host.runtime.tool_call.replayed).
        left = ctypes.c_uint64(0)
        if not _get_fuel_c(self._store._context(), ctypes.byref(left)):
            self.host_fuel += max(0, self._armed - int(left.value))
        error = _set_fuel_c(self._store._context(), self._armed)
        if error:
            raise wasmtime.WasmtimeError._from_ptr(error)
        return self.response_status


class _LazyExports:
    """Exports looked up one by one, on first use.

    ``Instance.exports()`` in wasmtime-py wraps every export of the instance,
    which costs more than instantiation itself; a spawn needs only the memory
    and the entry point, and the rest only at a suspension.
    """

    __slots__ = ("_cache", "_ctx", "_inst", "_raw")

    def __init__(self, store: wasmtime.Store, inst: wasmtime.Instance) -> None:
        self._ctx = store._context()
        self._inst = inst._instance
        self._cache: dict[str, Any] = {}
        self._raw: dict[str, Any] = {}

    def raw(self, name: str) -> Any:
        """The export as a raw ``wasmtime_extern_t`` (no Python wrapper), or None."""
        try:
            return self._raw[name]
        except KeyError:
            pass
        raw = name.encode()
        item = _ffi.wasmtime_extern_t()
        if not _export_get(self._ctx, ctypes.byref(self._inst), raw, len(raw), ctypes.byref(item)):
            return None
        self._raw[name] = item
        return item

    def get(self, name: str) -> Any:
        try:
            return self._cache[name]
        except KeyError:
            pass
        raw = name.encode()
        item = _ffi.wasmtime_extern_t()
        if not _ffi.wasmtime_instance_export_get(self._ctx, ctypes.byref(self._inst), raw, len(raw), ctypes.byref(item)):
            return None
        ext = _wrap_extern(item)
        self._cache[name] = ext
        return ext

    def __getitem__(self, name: str) -> Any:
        ext = self.get(name)
        if ext is None:
            raise KeyError(name)
        return ext


# -- the fast path into Wasmtime ------------------------------------------------------
# wasmtime-py's Func.__call__ and Global.value/set_value look up the export's type,
# build a FuncType/ValType object per parameter and convert every value through Val:
# about 15 µs per call, four calls per suspension and as many per resume. These
# helpers make the same checked C API calls (wasmtime_func_call still checks the
# signature) with values we already know to be i32, and re-raise a host import's
# exception exactly as wasmtime-py's ``enter_wasm`` does.
_VAL = _ffi.wasmtime_val_t
_TRAP_PTR = ctypes.POINTER(_ffi.wasm_trap_t)
_NO_VALS = (_VAL * 0)()
_KIND_CODE = {"i32": 0, "i64": 1, "f32": 2, "f64": 3}


def _call_raw(store: wasmtime.Store, ext: Any, args: tuple[int, ...], nresults: int, *,
              hold_gil: bool = False) -> int | None:
    nargs = len(args)
    if nargs:
        params = (_VAL * nargs)()
        for i, a in enumerate(args):
            params[i].kind = 0  # type: ignore[assignment]  # WASMTIME_I32
            params[i].of.i32 = a
    else:
        params = _NO_VALS
    results = (_VAL * nresults)() if nresults else _NO_VALS
    trap = _TRAP_PTR()
    call = _func_call_hold if hold_gil else _ffi.wasmtime_func_call
    error = call(store._context(), ctypes.byref(ext.of.func), params, nargs, results, nresults, ctypes.byref(trap))
    if error:
        # Owned first, then dropped with the exception raised in its place: an import's
        # exception comes back from Wasmtime as this error, and raising the exception
        # before wrapping it leaked the error's native memory (about 1.9 KiB) every
        # time a guest was ended by an import's exception (its out-of-memory and panic
        # aborts, proc_exit); the soak benchmark found the resident set growing so.
        err = wasmtime.WasmtimeError._from_ptr(error)
        _raise_callback_exception()
        raise err
    if trap:
        trap_obj = wasmtime.Trap._from_ptr(trap)
        _raise_callback_exception()
        raise trap_obj
    _tls.callback_exc = None  # a call that did not trap leaves nothing to raise
    kind: int = results[0].kind if nresults == 1 else -1  # type: ignore[assignment]
    if kind == 0:
        return int(results[0].of.i32)
    return None


def _raise_callback_exception() -> None:
    """Raise what a host import raised during the call into wasm that just trapped on this
    thread (the trap is how the exception left the guest).

    Why our own, per thread: wasmtime-py keeps the exception of its trampoline in one
    module global, and with guests running on several threads one guest's exception
    was raised for another (the soak benchmark found an agent out of fuel reported as
    out of memory, with its neighbour's message, while the neighbour got a bare trap).
    Every import the host links goes through :func:`define_import`, which keeps it here.
    """
    exc = getattr(_tls, "callback_exc", None)
    if exc is not None:
        _tls.callback_exc = None
        raise exc


# Host imports take the same shortcut on the way in: wasmtime-py's trampoline wraps
# each parameter in a Val and type-checks each result through freshly allocated
# ValType objects (about 10 µs per import call; a tool round trip makes four).
# Imports defined with ``define_import`` receive the raw slots instead; Wasmtime
# has already checked the import's signature against the module at link time.
_FAST_FUNCS: dict[int, tuple[Callable[..., Any], tuple[str, ...], str | None, bool]] = {}
_fast_lock = threading.Lock()
_fast_next = [1]
_VAL_KINDS = ("i32", "i64", "f32", "f64")


@_ffi.wasmtime_func_unchecked_callback_t  # type: ignore[untyped-decorator]
def _fast_trampoline(env: int | None, caller: Any, vals: Any, n: int) -> int | None:
    try:
        fn, params, result_kind, all_i32 = _FAST_FUNCS[env or 0]
        if all_i32:  # the torpor imports
            result = fn(*[vals[i].i32 for i in range(len(params))])
        else:
            result = fn(*[getattr(vals[i], kind) for i, kind in enumerate(params)])
        if result_kind is not None:
            setattr(vals[0], result_kind, result)
        return 0
    except BaseException as exc:  # handed to the caller of the wasm function on this thread
        _tls.callback_exc = exc
        trap = wasmtime.Trap("python exception")._consume()
        value: int | None = ctypes.cast(trap, ctypes.c_void_p).value
        return value


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # type: ignore[untyped-decorator]
def _fast_finalize(env: int | None) -> None:
    _FAST_FUNCS.pop(env or 0, None)


def define_import(linker: wasmtime.Linker, module: str, name: str, nparams: int | Sequence[str],
                  nresults: int | str | None, fn: Callable[..., Any]) -> None:
    """Define a host import on the fast trampoline: ``nparams`` i32 parameters (or the
    kinds of its parameters, ``"i32"``, ``"i64"``, ``"f32"``, ``"f64"``) and ``nresults``
    0 or 1 i32 results (or the kind of its one result, None for none).

    Same contract as ``Linker.define_func`` for such functions: ``fn`` gets the
    parameters as Python numbers (integers signed) and returns one (or None when it
    has no result); an exception it raises comes out of the wasm call, on this thread.
    """
    params = ("i32",) * nparams if isinstance(nparams, int) else tuple(nparams)
    result_kind = nresults if isinstance(nresults, str) or nresults is None else ("i32" if nresults else None)
    if isinstance(nresults, int) and nresults not in (0, 1):
        raise ValueError("define_import supports 0 or 1 results")
    if any(k not in _VAL_KINDS for k in (*params, *([result_kind] if result_kind else []))):
        raise ValueError(f"define_import supports parameters and results of kinds {_VAL_KINDS}")

    def vt(kind: str) -> wasmtime.ValType:
        made: wasmtime.ValType = getattr(wasmtime.ValType, kind)()
        return made

    ty = wasmtime.FuncType([vt(k) for k in params], [vt(result_kind)] if result_kind else [])
    with _fast_lock:
        idx = _fast_next[0]
        _fast_next[0] += 1
        _FAST_FUNCS[idx] = (fn, params, result_kind, all(k == "i32" for k in params))
    mod_b, name_b = module.encode(), name.encode()
    error = _ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(), ctypes.create_string_buffer(mod_b), len(mod_b), ctypes.create_string_buffer(name_b),
        len(name_b), ty.ptr(), _fast_trampoline, idx, _fast_finalize)
    if error:
        _FAST_FUNCS.pop(idx, None)
        raise wasmtime.WasmtimeError._from_ptr(error)


def _global_get(store: wasmtime.Store, ext: Any, kind: str) -> int | float:
    if ext is None:
        raise KeyError("global export")
    raw = _VAL()
    _global_get_c(store._context(), ctypes.byref(ext.of.global_), ctypes.byref(raw))
    value: int | float = getattr(raw.of, kind)
    return value


def _global_set(store: wasmtime.Store, ext: Any, g: GlobalValue) -> None:
    raw = _VAL()
    raw.kind = _KIND_CODE[g.kind]  # type: ignore[assignment]
    if g.kind in ("i32", "i64"):
        bits = 32 if g.kind == "i32" else 64
        v = int(g.value) & ((1 << bits) - 1)
        setattr(raw.of, g.kind, v - (1 << bits) if v >= 1 << (bits - 1) else v)
    else:
        setattr(raw.of, g.kind, float(g.value))
    error = _global_set_c(store._context(), ctypes.byref(ext.of.global_), ctypes.byref(raw))
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


def _reset_global(warm: Any, g: GlobalValue) -> None:
    """Set one global of an idle instance (host/sandbox/recycle.py puts it back so)."""
    _global_set(warm.store, warm.exports.raw(g.name), g)


def _trap_summary(text: str) -> str:
    """The informative lines of a Wasmtime trap ("wasm trap: ...", "memory fault at ...")."""
    lines = [ln.strip() for ln in text.splitlines()]
    picked = [ln.split(": ", 1)[1] if ln[:1].isdigit() and ": " in ln else ln
              for ln in lines if "wasm trap:" in ln or "memory fault" in ln]
    if picked:
        return "; ".join(p.replace("wasm trap: ", "") for p in reversed(picked))
    return _first_line(text)


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else "trap"


def current() -> Execution:
    ex: Execution | None = getattr(_tls, "ex", None)
    if ex is None:  # pragma: no cover - only if Wasmtime calls us outside _call_entry
        raise RuntimeError("host import called outside an agent execution")
    return ex
