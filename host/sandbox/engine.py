"""One Wasmtime engine per host, its on-disk compile cache, and loaded modules.

Compiling a module costs milliseconds to seconds; spawning an agent must cost
microseconds. So each module is compiled once per (module digest, engine
configuration, Wasmtime version), serialized to ``<store>/cache``, and later
deserialized — after its checksum is verified, because Wasmtime trusts
serialized artifacts blindly and a corrupt one must be rebuilt, never loaded.
In memory, each module gets one :class:`LoadedModule` holding the compiled
module, the pristine memory image snapshots are diffed against, and one
``InstancePre`` per grant set, reused across spawns.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import wasmtime
from wasmtime import _ffi

from host.errors import ConfigError, ModuleError
from host.sandbox import abi, interrupts, memory_pool, recycle, validate
from host.sandbox.validate import HOST_LIMITS, HostLimits, ModuleShape
from snapshots import PristineImage, native_build
from snapshots.format import GlobalValue

EPOCH_TICK_S = 0.005
MAX_WASM_STACK = 512 << 10


#: Named engine layouts (see :class:`EngineConfig`); ``TORPOR_ENGINE`` picks one for a host.
PROFILES = ("dense", "dense-cow", "fast", "pooled")
DEFAULT_PROFILE = "dense"


@dataclass(frozen=True)
class EngineConfig:
    """The engine settings that change generated code or memory layout (and so the cache key).

    Why profiles: Wasmtime's default layout reserves 4 GiB plus guard pages of
    address space per linear memory and maps the module's data image
    copy-on-write, which costs about four kernel memory mappings per live
    instance, so about 16,000 instances exhaust Linux's default
    ``vm.max_map_count`` of 65,530 (measured: ENOMEM at instance 16,300). Torpor
    wants tens of thousands of warm agents per process, so the default is:

    * ``dense`` (default): no reservation, no guard pages, no growth headroom, no
      copy-on-write image. A memory is plain anonymous memory of exactly its size
      (data segments are copied in at spawn), so neighbouring instances' memories
      merge into one kernel mapping: an instance costs no mapping of its own and
      the number of live instances is bounded by RAM alone (measured: 100,000 warm
      agents at 22.6 KiB RSS each, 0.01 mappings each). Price: explicit bounds
      checks on every load and store (a memory-bound C loop runs about 1.7x slower
      than ``fast``) and a memory that is copied when it grows. Agents that mostly
      wait on tools spawn and run faster than with ``fast`` (no 4 GiB mmap/munmap).
      Memories come from a recycling pool (host/sandbox/memory_pool.py, ``memory_pool``):
      buffers earlier agents already faulted in, scrubbed at release, carved from
      64 MiB arenas; without it every page a spawn or a restore touched was a page
      fault (a 1 MiB agent's restore: ~210 µs, ~50 µs with the pool).
    * ``dense-cow``: ``dense`` with the copy-on-write data image: about 2
      mappings per instance (about 32,000 live instances per process). No memory
      pool: Wasmtime gives a host memory creator no copy-on-write image, so the pool
      would quietly turn this profile into ``dense``.
    * ``fast``: Wasmtime's defaults (4 GiB reservation + guard pages): bounds
      checks elided, best for compute-heavy agents; about 16,000 live instances.
    * ``pooled``: Wasmtime's pooling allocator (one reservation for
      ``pool_instances`` slots of ``pool_max_memory`` bytes, reused across
      spawns): the fastest spawn, but about 4 mappings per live instance, a hard
      cap of ``pool_instances`` live instances, and no agent may have a memory
      budget above ``pool_max_memory``.

    In every layout a released instance whose module passes host/sandbox/recycle.py's
    checks is put back to the pristine state and reused by the next spawn or resume of the
    module, so a large image (a Python agent's 14 MiB) is neither copied in (``dense``) nor
    faulted in again (``pooled``). Why ``dense`` stays the default even for Python agents,
    though ``pooled`` meets issue 26's targets with more room (``dense`` sits at the suspend
    target: its write tracking reads back 14 MiB at each capture): one engine serves
    a host, and ``pooled`` would cost every agent of it its density (a reservation per
    slot, about 4 mappings per live instance, a hard cap of live instances, memory budgets
    of at most ``pool_max_memory``); a host of mostly Python agents picks it by name.

    Figures and commands: bench/RESULTS.md (``python bench/engine_profiles.py``).
    """

    max_wasm_stack: int = MAX_WASM_STACK
    cranelift_opt_level: str = "speed"
    profile: str = DEFAULT_PROFILE
    #: None keeps Wasmtime's default for the field
    memory_reservation: int | None = 0
    memory_guard_size: int | None = 0
    memory_reservation_for_growth: int | None = 0
    memory_init_cow: bool = False
    pool_instances: int = 0  # 0: on-demand allocation; > 0: the pooling allocator with that many slots
    pool_max_memory: int = 64 << 20
    #: Recycle linear memories through host/sandbox/memory_pool.c (``dense`` only: see
    #: :meth:`uses_memory_pool`). Runtime-only: not part of the fingerprint.
    memory_pool: bool = True
    #: Resident bytes of free memories the pool keeps (None: ``$TORPOR_MEMORY_POOL_MAX`` or 64 MiB).
    memory_pool_max_free: int | None = None

    @classmethod
    def for_profile(cls, name: str | None = None) -> EngineConfig:
        """The configuration of a named profile (default: ``$TORPOR_ENGINE`` or ``dense``)."""
        name = name or os.environ.get("TORPOR_ENGINE") or DEFAULT_PROFILE
        if name == "dense":
            return cls(profile=name, memory_pool=memory_pool.enabled_by_env())
        if name == "dense-cow":
            return cls(profile=name, memory_init_cow=True, memory_pool=False)
        if name == "fast":
            return cls(profile=name, memory_reservation=None, memory_guard_size=None,
                       memory_reservation_for_growth=None, memory_init_cow=True, memory_pool=False)
        if name == "pooled":
            return cls(profile=name, memory_reservation=64 << 20, memory_guard_size=64 << 10,
                       memory_reservation_for_growth=0, memory_init_cow=True, pool_instances=40_000,
                       memory_pool=False)
        raise ConfigError(f"unknown engine profile {name!r}; choose one of {', '.join(PROFILES)}")

    def uses_memory_pool(self) -> bool:
        """Whether this layout can take its memories from host/sandbox/memory_pool.c.

        Only the plain ``dense`` layout: the pool provides no guard pages (JIT code
        would elide bounds checks against them), Wasmtime gives a host memory creator
        no copy-on-write image (``dense-cow`` would silently lose its image and become
        ``dense``), and the pooling allocator manages its own slots.
        """
        return (self.memory_pool and self.memory_reservation == 0 and self.memory_guard_size == 0
                and not self.memory_init_cow and self.pool_instances == 0)

    def fingerprint(self) -> str:
        try:
            wt_version = metadata.version("wasmtime")
        except metadata.PackageNotFoundError:  # pragma: no cover
            wt_version = "unknown"
        # Where memories come from does not change compiled code: leave it out, so that
        # turning the pool on or off reuses the same compile cache.
        cfg = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_ONLY}
        blob = json.dumps({"cfg": cfg, "fuel": True, "epoch": True, "wasmtime": wt_version}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def wasmtime_config(self) -> wasmtime.Config:
        """A fresh ``wasmtime.Config`` with fuel and epoch interruption always on."""
        cfg = wasmtime.Config()
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        cfg.max_wasm_stack = self.max_wasm_stack
        cfg.cranelift_opt_level = self.cranelift_opt_level
        if self.memory_reservation is not None:
            cfg.memory_reservation = self.memory_reservation
        if self.memory_guard_size is not None:
            cfg.memory_guard_size = self.memory_guard_size
        if self.memory_reservation_for_growth is not None:
            cfg.memory_reservation_for_growth = self.memory_reservation_for_growth
        cfg.memory_init_cow = self.memory_init_cow
        if self.pool_instances > 0:
            _enable_pooling(cfg, self.pool_instances, self.pool_max_memory)
        return cfg


#: EngineConfig fields that change no generated code (kept out of the fingerprint).
_RUNTIME_ONLY = frozenset({"memory_pool", "memory_pool_max_free"})


def _enable_pooling(cfg: wasmtime.Config, slots: int, max_memory: int) -> None:
    """Switch ``cfg`` to the pooling allocator through the C API (wasmtime-py has no class for it)."""
    from wasmtime import _ffi as ffi

    pc = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_stacks_set(pc, 0)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pc, max_memory)
        ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pc)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pc)


class Engine:
    """A Wasmtime engine with fuel and epoch interruption, plus its epoch ticker.

    The ticker is a daemon thread that bumps the engine's epoch every
    ``EPOCH_TICK_S``; a store's deadline is a number of ticks, which is how a
    runaway guest is stopped by wall clock without a signal.
    """

    def __init__(self, config: EngineConfig | None = None, cache_dir: Path | None = None,
                 limits: HostLimits = HOST_LIMITS) -> None:
        self.config = config or EngineConfig.for_profile()
        #: What this host accepts from any module (checked before compiling, see :meth:`validate`).
        self.limits = limits
        cfg = self.config.wasmtime_config()
        #: Recycled linear memories (host/sandbox/memory_pool.py), or None: Wasmtime's own allocation.
        self.memory_pool: memory_pool.MemoryPool | None = None
        if self.config.uses_memory_pool():
            self.memory_pool = memory_pool.create(self.config.memory_pool_max_free)
            if self.memory_pool is not None:
                self.memory_pool.install(cfg)
        self.wasmtime = wasmtime.Engine(cfg)
        interrupts.register_engine(self.wasmtime)  # a Ctrl-C stops its guests through the epoch
        #: Without a copy-on-write image, Wasmtime initialises data segments with
        #: code that checks fuel and epoch, so stores must be armed before instantiation.
        self.prearm = not self.config.memory_init_cow
        self.fingerprint = self.config.fingerprint()
        self.cache_dir = cache_dir
        self._modules: dict[str, LoadedModule] = {}
        self._shapes: dict[str, ModuleShape] = {}  # validated, not (yet) loaded
        self._lock = threading.Lock()
        self._ticker: str | None = None  # "native" or "python" once started
        self.cache_hits = 0
        self.cache_rebuilds = 0

    # -- epochs -------------------------------------------------------------
    def ensure_ticker(self) -> None:
        """Start the epoch ticker on first use: native where the helper builds, else Python."""
        if self._ticker is None:
            with self._lock:
                if self._ticker is None:
                    self._ticker = _start_native_ticker(self.wasmtime) or self._start_python_ticker()

    @property
    def ticker_native(self) -> bool:
        """True when the deadline fires whatever holds the GIL (see ``epoch_ticker.c``)."""
        return self._ticker == "native"

    def _start_python_ticker(self) -> str:
        t = threading.Thread(target=self._tick, name="torpor-epoch", daemon=True)
        t.start()
        return "python"

    def _tick(self) -> None:
        eng = self.wasmtime
        while True:
            time.sleep(EPOCH_TICK_S)
            eng.increment_epoch()

    @staticmethod
    def deadline_ticks(seconds: float) -> int:
        return max(1, int(seconds / EPOCH_TICK_S) + 1)

    # -- compile cache -------------------------------------------------------
    def compile(self, wasm: bytes, digest: str) -> wasmtime.Module:
        """A compiled module, from the disk cache when a verified entry exists."""
        if self.cache_dir is None:
            return self._compile_fresh(wasm)
        key = f"{digest[:32]}-{self.fingerprint}"
        art = self.cache_dir / f"{key}.cwasm"
        meta = self.cache_dir / f"{key}.json"
        if art.exists() and meta.exists():
            try:
                info = json.loads(meta.read_text())
                blob = art.read_bytes()
                if info.get("sha256") == hashlib.sha256(blob).hexdigest() and info.get("module") == digest:
                    module = wasmtime.Module.deserialize(self.wasmtime, blob)
                    self.cache_hits += 1
                    return module
            except (OSError, ValueError, wasmtime.WasmtimeError):
                pass
            # Stale or corrupt: drop it and rebuild below.
            self.cache_rebuilds += 1
            for p in (art, meta):
                with contextlib.suppress(OSError):
                    p.unlink()
        module = self._compile_fresh(wasm)
        tmp = art.with_suffix(f".tmp{os.getpid()}")
        tmp_meta = meta.with_suffix(f".tmp{os.getpid()}")
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            blob = bytes(module.serialize())
            tmp.write_bytes(blob)
            os.replace(tmp, art)
            tmp_meta.write_text(json.dumps({"sha256": hashlib.sha256(blob).hexdigest(), "module": digest}))
            os.replace(tmp_meta, meta)
        except OSError:
            # A read-only or full cache only costs a recompile next time; a half-written
            # file is not left to hold the space a full disk needs for the store.
            for p in (tmp, tmp_meta):
                with contextlib.suppress(OSError):
                    p.unlink()
        return module

    def _compile_fresh(self, wasm: bytes) -> wasmtime.Module:
        try:
            return wasmtime.Module(self.wasmtime, wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleError(f"invalid WebAssembly module: {_first_line(str(exc))}") from exc

    def validate(self, wasm: bytes, digest: str) -> ModuleShape:
        """The module's shape, checked against the ABI and the host's limits (once per digest).

        Every module passes here before Wasmtime sees it (:meth:`load` calls it first):
        see :mod:`host.sandbox.validate` for why Wasmtime cannot be the first to look.
        """
        loaded = self._modules.get(digest)
        if loaded is not None:
            return loaded.shape
        shape = self._shapes.get(digest)
        if shape is None:
            shape = validate.check_module(wasm, self.limits)
            with self._lock:
                shape = self._shapes.setdefault(digest, shape)
        return shape

    def load(self, wasm: bytes, digest: str) -> LoadedModule:
        """The process-wide :class:`LoadedModule` for this module digest (validated, then compiled)."""
        loaded = self._modules.get(digest)
        if loaded is None:
            shape = self.validate(wasm, digest)
            # A module whose instances can be put back to the pristine state is compiled
            # with its mutable globals exported (host/sandbox/recycle.py); the bundle's
            # digest stays the module's identity, the compile cache keys the bytes compiled.
            plan, why = recycle.plan(wasm, digest, shape)
            module = self.compile(wasm, digest) if plan is None else self.compile(plan.wasm, plan.digest)
            loaded = LoadedModule.create(self, module, digest, shape, plan)
            loaded.recycle_note = why
            with self._lock:
                loaded = self._modules.setdefault(digest, loaded)
                self._shapes.pop(digest, None)
        return loaded


_TICKER_SOURCE = Path(__file__).with_name("epoch_ticker.c")


def _start_native_ticker(engine: wasmtime.Engine) -> str | None:
    """A native thread ticking ``engine``'s epoch ("native"), or None where the helper is unavailable."""
    lib = native_build.load("epoch_ticker", _TICKER_SOURCE)
    if lib is None:
        return None
    lib.tp_ticker_start.restype = ctypes.c_int
    lib.tp_ticker_start.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    increment = ctypes.cast(_ffi.dll.wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    # The thread gets an engine handle of its own (never deleted), so that the Python
    # Engine may be freed, at exit too, while the thread still ticks.
    handle = ctypes.cast(_ffi.wasmtime_engine_clone(engine.ptr()), ctypes.c_void_p).value
    if lib.tp_ticker_start(increment, handle, int(EPOCH_TICK_S * 1e9)) != 0:
        _ffi.wasm_engine_delete(ctypes.cast(handle or 0, ctypes.POINTER(_ffi.wasm_engine_t)))
        return None
    return "native"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


@dataclass
class LoadedModule:
    """A compiled agent module with what spawning and snapshotting need."""

    engine: Engine
    module: wasmtime.Module
    digest: str
    imports: list[tuple[str, str, str]]  # (module, name, kind)
    pristine: bytes  # linear memory right after instantiation
    async_buf: tuple[int, int]  # (address, size) of the asyncify data
    global_exports: tuple[tuple[str, str], ...]  # (export name, kind) of snapshotted globals
    suspendable: bool
    entry_results: int = 1  # how many results the entry export returns (0 or 1)
    has_initialize: bool = False  # a WASI reactor's `_initialize`, run once before the entry
    chunk_size: int = 4096  # the granularity of its checkpoints' deltas (abi.CHUNK_SECTION)
    shape: ModuleShape = field(kw_only=True)  # what host.sandbox.validate read
    #: Idle instances put back to the pristine state, or None: not recyclable (host/sandbox/recycle.py)
    shelves: recycle.Shelves | None = field(default=None, kw_only=True)
    recycle_note: str = field(default="", kw_only=True)  # why (not) recycled
    _pres: dict[Any, wasmtime.InstancePre] = field(default_factory=dict)
    #: ``pristine`` prepared once for captures, encodes and restores (see PristineImage)
    image: PristineImage = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.image = PristineImage(self.pristine)

    @classmethod
    def create(cls, engine: Engine, module: wasmtime.Module, digest: str, shape: ModuleShape,
               plan: recycle.Plan | None = None) -> LoadedModule:
        """Everything spawning needs, from the validated ``shape`` (not from Wasmtime's
        export types, whose Python wrappers abort on v128 and reference values)."""
        imports = [(imp.module, imp.name, imp.kind) for imp in shape.imports]
        pristine, async_buf, initial = _pristine_image(engine, module, imports, plan.globals if plan else ())
        loaded = cls(engine, module, digest, imports, pristine, async_buf, shape.snapshot_globals,
                     shape.suspendable, shape.entry_results, shape.has_initialize, shape.chunk_size, shape=shape)
        if plan is not None:
            plan = recycle.Plan(plan.wasm, plan.digest, plan.globals, initial)
            loaded.shelves = recycle.Shelves(plan, loaded.image, loaded.chunk_size)
        return loaded

    def check_imports(self, granted_tools: bool, wasi_allow: frozenset[str], policy_name: str) -> None:
        """Refuse, before anything runs, a module importing what the policy does not grant."""
        self.shape.check_imports(granted_tools, wasi_allow, policy_name)

    def instance_pre(self, key: Any, make_linker: Any) -> wasmtime.InstancePre:
        pre = self._pres.get(key)
        if pre is None:
            linker = make_linker(self.engine.wasmtime)
            try:
                pre = linker.instantiate_pre(self.module)
            except wasmtime.WasmtimeError as exc:
                raise ModuleError(f"cannot link the module: {_first_line(str(exc))}") from exc
            self._pres[key] = pre
        return pre


def _pristine_image(engine: Engine, module: wasmtime.Module, imports: list[tuple[str, str, str]],
                    global_names: tuple[tuple[str, str], ...] = ()) -> tuple[bytes, tuple[int, int], tuple[GlobalValue, ...]]:
    """Instantiate once with inert imports and read the initial memory, asyncify buffer and
    the values of the mutable globals ``global_names`` (what a recycled instance is reset to).

    Instantiation runs no guest code (we refuse start functions below), so the
    memory is exactly the data segments: the image every snapshot is a delta
    against and every restore starts from.
    """
    store = wasmtime.Store(engine.wasmtime)
    # Fuel 0 makes any guest code trap; without a copy-on-write image Wasmtime's own
    # data-segment initialisation needs fuel and an epoch deadline (start sections were
    # refused in Engine.load).
    store.set_fuel(1 << 30 if engine.prearm else 0)
    if engine.prearm:
        store.set_epoch_deadline(1 << 30)
    linker = wasmtime.Linker(engine.wasmtime)
    try:
        linker.define_unknown_imports_as_traps(module)
        inst = linker.instantiate(store, module)
    except wasmtime.WasmtimeError as exc:
        raise ModuleError(f"cannot instantiate the module: {_first_line(str(exc))}") from exc
    except wasmtime.Trap as exc:
        raise ModuleError(f"the module traps while instantiating (start function?): {_first_line(str(exc))}") from exc
    exports = inst.exports(store)
    mem = exports[abi.MEMORY_EXPORT]
    assert isinstance(mem, wasmtime.Memory)
    pristine = bytes(mem.read(store, 0, mem.data_len(store)))
    buf = exports.get(abi.ASYNC_BUF_EXPORT)
    async_buf = (0, 0)
    if isinstance(buf, wasmtime.Global):
        addr = int(buf.value(store))
        if addr > 0 and addr + 8 <= len(pristine):
            cur = int.from_bytes(pristine[addr : addr + 4], "little")
            end = int.from_bytes(pristine[addr + 4 : addr + 8], "little")
            if cur == addr + 8 and addr + 8 < end <= len(pristine):
                async_buf = (addr, end - addr)
    initial = []
    for name, kind in global_names:
        g = exports[name]
        assert isinstance(g, wasmtime.Global)
        initial.append(GlobalValue(name, kind, g.value(store)))  # type: ignore[arg-type]
    return pristine, async_buf, tuple(initial)
