"""Warm instances recycled from one agent to the next of the same module (``recycle.c``).

Why: a large guest pays most of its spawn and resume in making an instance, not in
running. A Python agent's 14 MiB image is ~760 pages touched to its first await; with
Wasmtime's pooling allocator a slot's reset drops their mappings, so every spawn faults
~630 of them in again, and the ``dense`` layout copies 8 MiB of data segments in at each
instantiation. A released instance that is put back to the pristine state itself keeps
its pages mapped and resident: the next spawn or resume of the module takes it and runs.

Exact, or not at all. An instance's state is its memory, its globals, its tables and the
dropped state of its segments (nothing else of a store outlives a call: fuel and the
epoch deadline are set before every call, store limits at every take). At release:

* memory: the chunks that may differ from the image are copied back from it. Which ones:
  those of the capture just taken, when no guest code ran since (a hibernation), or those
  a restore wrote, else those ``diff_memory`` finds (pagemap-guided in the copy-on-write
  layouts). A memory that grew past the image is not recycled: it cannot shrink.
* globals: every mutable global is set back to its value at instantiation. Wasm gives
  the host no way to reach a global the module does not export, so the host compiles the
  module with one export more per unexported mutable global (``torpor.r<index>``, see
  :func:`expose_globals`); the bundle, its digest and its snapshots are unchanged.
* tables and segments: never changed, proven once per module by ``recycle.c`` walking
  every instruction (no ``table.set/grow/fill/copy/init``, ``elem.drop``, ``data.drop``).
  A module that has one, or an instruction the walk does not know, is not recycled.

Only an instance whose last call ended at a tool call or at the agent's end is kept (a
trap, an interrupt or an exception leaves it to be dropped), at most ``TORPOR_RECYCLE``
(default 4, 0: off) per module and linker, and at most ``TORPOR_RECYCLE_MAX`` bytes of
linear memory in all (default 256 MiB). Without the native helper nothing is recycled.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.errors import ConfigError
from host.sandbox import write_watch
from host.sandbox.validate import ModuleShape
from host.sandbox.wasm_binary import Reader, _leb_encode, check_header
from snapshots import native_build
from snapshots.delta import MemoryAt, MemoryDelta, PristineImage, diff_memory
from snapshots.format import GlobalValue

__all__ = ["DEFAULT_KEEP", "DEFAULT_MAX_BYTES", "ENV_KEEP", "ENV_MAX_BYTES", "Plan", "Shelves", "Warm",
           "expose_globals", "plan", "status"]

_SOURCE = Path(__file__).with_name("recycle.c")
ENV_KEEP = "TORPOR_RECYCLE"
ENV_MAX_BYTES = "TORPOR_RECYCLE_MAX"
DEFAULT_KEEP = 4
DEFAULT_MAX_BYTES = 256 << 20
#: The prefix of the exports :func:`expose_globals` adds (not ``abi.GLOBAL_EXPORT_PREFIX``:
#: those are the globals a capture saves, and these are not part of a snapshot).
RESET_EXPORT_PREFIX = "torpor.r"

_lib_lock = threading.Lock()
_lib_cache: list[Any] = []
_status: list[str] = []


def _lib() -> Any:
    with _lib_lock:
        if _lib_cache:
            return _lib_cache[0]
        lib = native_build.load("recycle", _SOURCE)
        if lib is not None:
            lib.tp_code_keeps_tables.restype = ctypes.c_int
            lib.tp_code_keeps_tables.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            lib.tp_reset_chunks.restype = None
            lib.tp_reset_chunks.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                            ctypes.c_char_p, ctypes.c_size_t]
        _lib_cache.append(lib)
        return lib


def keep_by_env() -> int:
    """Idle instances kept per module and linker (``$TORPOR_RECYCLE``; 0 turns recycling off)."""
    raw = os.environ.get(ENV_KEEP, "").strip().lower()
    if not raw:
        return DEFAULT_KEEP
    if raw in {"off", "false", "no"}:
        return 0
    try:
        n = int(raw)
    except ValueError as exc:
        raise ConfigError(f"${ENV_KEEP} must be a number of instances (0 turns recycling off), not {raw!r}") from exc
    return max(0, n)


def max_bytes_by_env() -> int:
    """Linear memory held by idle instances in all (``$TORPOR_RECYCLE_MAX``, bytes or ``"256MiB"``)."""
    raw = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    from policies.units import parse_size

    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(f"${ENV_MAX_BYTES}: {exc}") from exc


@dataclass(frozen=True)
class Plan:
    """How a module's instances are put back: the module to compile and its mutable globals.

    ``wasm``/``digest``: the module with every mutable global exported (the compile cache's
    key is this digest); ``globals``: (export name, value type) of every mutable global.
    ``initial``: their values in a fresh instance (filled in when the module is loaded).
    """

    wasm: bytes
    digest: str
    globals: tuple[tuple[str, str], ...]
    initial: tuple[GlobalValue, ...] = ()


def plan(wasm: bytes, digest: str, shape: ModuleShape) -> tuple[Plan | None, str]:
    """A :class:`Plan` for a module whose instances can be recycled, or None and why not."""
    lib = _lib()
    if lib is None:
        return None, "the native helper is unavailable"
    verdict = lib.tp_code_keeps_tables(wasm, len(wasm))
    if verdict != 1:
        why = {0: "its code can change a table or drop a segment",
               -1: "its code has an instruction the check does not know"}.get(verdict, "its code is malformed")
        return None, why
    exposed, names = expose_globals(wasm, shape)
    new_digest = digest if exposed is wasm else hashlib.sha256(exposed).hexdigest()
    return Plan(exposed, new_digest, names), "recycled"


def expose_globals(wasm: bytes, shape: ModuleShape) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """``wasm`` with an export ``torpor.r<i>`` for each mutable global ``i`` it does not export,
    and (export name, type) of every mutable global. The same bytes when all are exported.

    Only the export section changes (its entries appended to): code, data and every index
    stay as they were, so the module computes exactly what it did.
    """
    exported: dict[int, str] = {}
    for name, e in shape.exports.items():
        if e.kind == "global":
            exported.setdefault(e.index, name)
    names: list[tuple[str, str]] = []
    extra: list[tuple[str, int]] = []
    for i, g in enumerate(shape.globals):
        if not g.mutable:
            continue
        found = exported.get(i)
        if found is None:
            name = f"{RESET_EXPORT_PREFIX}{i}"
            if name in shape.exports:
                raise ConfigError(f"the module already exports a `{name}` that is not global {i}")
            extra.append((name, i))
        else:
            name = found
        names.append((name, g.valtype))
    if not extra:
        return wasm, tuple(names)
    check_header(wasm)
    pos = 8
    while pos < len(wasm):
        sid = wasm[pos]
        r = Reader(wasm, pos + 1)
        size = r.u32()
        body, end = r.pos, r.pos + size
        if sid == 7:
            r = Reader(wasm, body, end)
            count = r.u32()
            entries = wasm[r.pos:end]
            for name, i in extra:
                raw = name.encode()
                entries += _leb_encode(len(raw)) + raw + b"\x03" + _leb_encode(i)
            payload = _leb_encode(count + len(extra)) + entries
            return wasm[:pos] + b"\x07" + _leb_encode(len(payload)) + payload + wasm[end:], tuple(names)
        pos = end
    raise ConfigError("the module has no export section")  # unreachable: `memory` is always exported


@dataclass
class Warm:
    """An idle instance, back in the pristine state, with the handles a spawn needs."""

    store: Any
    instance: Any
    exports: Any
    mem: Any
    entry: Any
    memory_bytes: int
    #: Its memory's write tracking (host/sandbox/write_watch.py), kept from one agent to the
    #: next: registering and protecting 14 MiB at every instantiation is what made it cost.
    watch: write_watch.Tracked | None = None


@dataclass
class Shelves:
    """The idle instances of one module, by linker (an ``InstancePre``: the imports they are
    linked with), with what putting one back needs."""

    plan: Plan
    image: PristineImage
    chunk_size: int
    keep: int = field(default_factory=keep_by_env)
    _by_pre: dict[int, tuple[Any, list[Warm]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    taken: int = 0
    kept: int = 0
    dropped: int = 0

    def take(self, pre: Any, memory_budget: int) -> Warm | None:
        """An idle instance linked by ``pre`` whose memory fits ``memory_budget``, or None."""
        if self.image.size > memory_budget:
            return None  # a fresh instance fails the same way, with the budget's error
        with self._lock:
            entry = self._by_pre.get(id(pre))
            if not entry or not entry[1]:
                return None
            warm = entry[1].pop()
            self.taken += 1
        _budget.release(warm.memory_bytes)
        return warm

    def give(self, pre: Any, warm: Warm, base: int, size: int, dirty: MemoryDelta | None,
             set_global: Any) -> bool:
        """Put ``warm`` back to the pristine state and keep it; False when it is not kept.

        ``base``/``size``: its linear memory; ``dirty``: a delta against the image this
        memory equals now (the capture just taken, or the restore's), or None: compared
        here. ``set_global(warm, value)``: sets one global of the instance.
        """
        if self.keep <= 0 or size != self.image.size:
            self.dropped += 1
            return False
        with self._lock:
            entry = self._by_pre.get(id(pre))
            if entry is not None and len(entry[1]) >= self.keep:
                self.dropped += 1
                return False
        if not _budget.acquire(size):
            self.dropped += 1
            return False
        try:
            if dirty is None or dirty.chunk_size != self.chunk_size:
                dirty = diff_memory(self.image, MemoryAt(base, size), self.chunk_size, untouched_is_pristine=True,
                                    private_mapping=True, candidates=_tracked_candidates(warm.watch, base, size,
                                                                                         self.chunk_size))
            idx = dirty.index_bytes
            if idx:
                _lib().tp_reset_chunks(base, self.image.addr, size, self.chunk_size, idx, len(idx) // 4)
            for g in self.plan.initial:
                set_global(warm, g)
            w = warm.watch
            if w is not None:
                # Everything written so far, the reset's copies too, is protected again: the
                # next agent's first capture compares what it writes, from the image's state.
                if w.base != base or w.size != size or write_watch.written_pages(w) is None:
                    write_watch.untrack(w)
                    warm.watch = None
                else:
                    w.differed = ()
        except BaseException:
            _budget.release(size)
            raise
        warm.memory_bytes = size
        with self._lock:
            entry = self._by_pre.setdefault(id(pre), (pre, []))
            entry[1].append(warm)
            self.kept += 1
        return True

    def idle(self) -> int:
        """Idle instances kept now."""
        with self._lock:
            return sum(len(v[1]) for v in self._by_pre.values())

    def clear(self) -> None:
        """Drop every idle instance (their memory goes back as the stores are freed)."""
        with self._lock:
            entries = [w for _, ws in self._by_pre.values() for w in ws]
            self._by_pre.clear()
        for w in entries:
            _budget.release(w.memory_bytes)
            if w.watch is not None:
                write_watch.untrack(w.watch)

    def __del__(self) -> None:
        # A module dropped with its host gives back its share of the process-wide budget,
        # and lifts the write protection before the memories go back to the memory pool.
        self.clear()


def _tracked_candidates(w: write_watch.Tracked | None, base: int, size: int, chunk_size: int) -> list[int] | None:
    """The pages a tracked memory may differ from the image in (written since the last
    capture, or differing at it), or None: compare as without tracking."""
    if w is None or w.base != base or w.size != size or chunk_size != write_watch.PAGE:
        return None
    written = write_watch.written_pages(w)
    return None if written is None else sorted(set(written).union(w.differed))


class _Budget:
    """The linear memory all idle instances of the process hold (``TORPOR_RECYCLE_MAX``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0
        self.limit: int | None = None

    def acquire(self, n: int) -> bool:
        with self._lock:
            if self.limit is None:
                self.limit = max_bytes_by_env()
            if self.held + n > self.limit:
                return False
            self.held += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)


_budget = _Budget()


def status() -> str:
    """Whether the native helper is available (what recycling needs)."""
    _lib()
    return native_build.status().get("recycle", "not loaded")
