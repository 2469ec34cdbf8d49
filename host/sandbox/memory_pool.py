"""Recycled linear memories for the ``dense`` engine layout (``memory_pool.c``).

Why: in the ``dense`` layout (no reservation, no guard pages, no copy-on-write image)
Wasmtime maps each linear memory fresh at instantiation, unmaps it when the store is
dropped, and maps, copies and unmaps on every ``memory.grow``. On a VM every page
touched afterwards is a 1-2 µs page fault: resuming a 1 MiB agent spent most of its
~210 µs faulting (instantiate 45 µs, grow 120 µs). A host memory creator written in C
hands out buffers that earlier agents already faulted in, scrubbed to zeros when they
were released, and grows within a buffer's capacity without moving it. Restores pass
the snapshot's size as a hint (:meth:`MemoryPool.hint`) so that the memory is created
with room for it and the grow that follows costs nothing.

Why C and not a Python callback: Wasmtime calls the creator from inside
instantiation, store drops and ``memory.grow``, on any thread, often without the GIL;
a Python callback would take the GIL on each of them.

The pool is bounded (:data:`DEFAULT_MAX_FREE`, ``EngineConfig.memory_pool_max_free``
or ``$TORPOR_MEMORY_POOL_MAX``): released buffers beyond it give their pages back to the
kernel. When the native helper is unavailable (no compiler, ``TORPOR_NATIVE=0``) or
``TORPOR_MEMORY_POOL=0`` is set, the engine allocates exactly as Wasmtime does by itself.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _ffi

from host.errors import ConfigError
from snapshots import native_build

__all__ = ["DEFAULT_MAX_FREE", "ENV_ENABLED", "ENV_MAX_FREE", "STAT_NAMES", "MemoryPool", "create", "default_max_free",
           "enabled_by_env", "status"]

_SOURCE = Path(__file__).with_name("memory_pool.c")

#: Resident bytes of free buffers a pool keeps by default: enough for a few hundred
#: small agents or tens of 1 MiB ones in flight between release and reuse, and small
#: next to a host's RSS.
DEFAULT_MAX_FREE = 64 << 20
ENV_MAX_FREE = "TORPOR_MEMORY_POOL_MAX"
ENV_ENABLED = "TORPOR_MEMORY_POOL"

#: The counters of ``tp_pool_stats``, in its order.
STAT_NAMES = (
    "live",  # memories alive now
    "hot_buffers",  # released buffers kept scrubbed and resident, ready for reuse
    "hot_resident_bytes",  # their resident bytes (what the cap bounds; at least a page each)
    "hot_bytes",  # their capacity
    "max_free_bytes",  # the cap
    "cold_buffers",  # released buffers whose pages went back to the kernel (address range kept)
    "cold_bytes",  # their capacity
    "arenas",  # 64 MiB arenas mapped (buffers up to 8 MiB are carved from them)
    "arena_bytes",  # their size
    "reused_hot",  # memories (or growths) served by a hot buffer: no page fault
    "reused_cold",  # ... by a cold buffer: faults like fresh memory, no mmap
    "carved",  # buffers newly carved from an arena
    "mapped",  # buffers above 8 MiB mapped on their own
    "unmapped",  # ... and unmapped
    "dropped",  # released buffers made cold (the hot ones held the cap)
    "grow_in_place",  # growths within a buffer's capacity
    "grow_moved",  # growths that moved to a bigger buffer
    "released",  # buffers released (memory dropped, or left behind by a move)
    "scrubbed_bytes",  # bytes zeroed at release
    "hinted",  # memories created bigger than their minimum on a hint
    "pagemap",  # 1 when scrubbing is guided by /proc/self/pagemap
)


class _Creator(ctypes.Structure):
    """``wasmtime_memory_creator_t`` (wasmtime/config.h), with plain pointers."""

    _fields_ = [("env", ctypes.c_void_p), ("new_memory", ctypes.c_void_p), ("finalizer", ctypes.c_void_p)]


_lib_lock = threading.Lock()
_lib_cache: list[Any] = []
_watch_flags: list[ctypes.c_uint64] = []


def _lib() -> Any:
    """The native pool (declared argument types), or None when it cannot be built/loaded."""
    with _lib_lock:
        if _lib_cache:
            return _lib_cache[0]
        lib = native_build.load("memory_pool", _SOURCE)
        if lib is not None:
            p, sz = ctypes.c_void_p, ctypes.c_size_t
            for name, res, args in (
                ("tp_pool_new", p, [sz, p]),
                ("tp_pool_creator", None, [p, ctypes.POINTER(_Creator)]),
                ("tp_pool_unref", None, [p]),
                ("tp_pool_hint", None, [p, sz]),
                ("tp_pool_set_max_free", None, [p, sz]),
                ("tp_pool_stats", sz, [p, ctypes.POINTER(ctypes.c_uint64), sz]),
                ("tp_pool_watch", None, [p, ctypes.POINTER(ctypes.c_uint64)]),
            ):
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = res, args
        _lib_cache.append(lib)
        return lib


# Bound once: the config setter takes our struct type, and a pointer to Wasmtime's
# error constructor is handed to C (the helper does not link against libwasmtime).
_set_creator = ctypes.CDLL(_ffi.dll._name).wasmtime_config_host_memory_creator_set
_set_creator.restype = None
_set_creator.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Creator)]
_ERROR_NEW = ctypes.cast(_ffi.dll.wasmtime_error_new, ctypes.c_void_p).value


def enabled_by_env() -> bool:
    """False when ``$TORPOR_MEMORY_POOL`` is 0/off/false/no: the ``dense`` profile then
    allocates as Wasmtime does by itself (a switch for comparisons and for ruling the pool out)."""
    return os.environ.get(ENV_ENABLED, "1").strip().lower() not in {"0", "off", "false", "no"}


def default_max_free() -> int:
    """The pool cap from ``$TORPOR_MEMORY_POOL_MAX`` (bytes or ``"64MiB"``; 0 keeps nothing)."""
    raw = os.environ.get(ENV_MAX_FREE, "").strip()
    if not raw:
        return DEFAULT_MAX_FREE
    if raw == "0":
        return 0
    from policies.units import parse_size

    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(f"${ENV_MAX_FREE}: {exc}") from exc


class MemoryPool:
    """One native pool, installed into one Wasmtime config (so one engine).

    Holds its own reference to the C pool, so :meth:`stats` stays valid after the
    engine is gone; the C side frees the pool when the engine, every memory and this
    handle have let go.
    """

    def __init__(self, lib: Any, max_free: int) -> None:
        if max_free < 0:
            raise ConfigError("the memory pool's cap must be at least 0 bytes")
        self._lib = lib
        ptr = lib.tp_pool_new(max_free, _ERROR_NEW)
        if not ptr:
            raise MemoryError("cannot create the memory pool")
        self._ptr: int | None = ptr
        self._hint = lib.tp_pool_hint

    def install(self, cfg: wasmtime.Config) -> None:
        """Make ``cfg`` allocate its linear memories from this pool (before the engine is built)."""
        creator = _Creator()
        self._lib.tp_pool_creator(self._ptr, ctypes.byref(creator))
        _set_creator(ctypes.cast(cfg.ptr(), ctypes.c_void_p), ctypes.byref(creator))

    def hint(self, nbytes: int) -> None:
        """Give the next memory this thread creates in this pool room for ``nbytes``.

        A restore knows the snapshot's size before it instantiates: with the hint, the
        memory comes from a buffer of that size class and the grow that follows stays
        in place. Thread-local, consumed by the next memory (a stale hint only sizes a
        buffer).
        """
        self._hint(self._ptr, nbytes)

    def set_max_free(self, nbytes: int) -> None:
        """Change the cap; hot buffers beyond it give their pages back now (0: all of them)."""
        self._lib.tp_pool_set_max_free(self._ptr, max(0, nbytes))

    def watch(self) -> ctypes.c_uint64:
        """A flag the C side sets to 1 when it frees the pool (engine, memories and this handle
        all gone): how the tests see the finalizers run. Never freed: C may write it late."""
        flag = ctypes.c_uint64(0)
        _watch_flags.append(flag)
        self._lib.tp_pool_watch(self._ptr, ctypes.byref(flag))
        return flag

    def stats(self) -> dict[str, int]:
        """The pool's counters (see :data:`STAT_NAMES`)."""
        out = (ctypes.c_uint64 * len(STAT_NAMES))()
        n = self._lib.tp_pool_stats(self._ptr, out, len(STAT_NAMES))
        return {name: int(out[i]) for i, name in enumerate(STAT_NAMES[:n])}

    def __del__(self) -> None:
        ptr, self._ptr = getattr(self, "_ptr", None), None
        if ptr:
            self._lib.tp_pool_unref(ptr)


def create(max_free: int | None = None) -> MemoryPool | None:
    """A new pool keeping at most ``max_free`` free resident bytes, or None without the helper."""
    lib = _lib()
    if lib is None:
        return None
    return MemoryPool(lib, default_max_free() if max_free is None else max_free)


def status() -> str:
    """Whether the native pool is available, and where from (or why not)."""
    _lib()
    return native_build.status().get("memory_pool", "not loaded")
