"""What the language runtimes built once per machine share: their cache, sources and build instance.

A guest language runtime (QuickJS for JavaScript, CPython for Python) is an ABI v1
module compiled by the ``ziglang`` wheel from a source distribution pinned on PyPI, built
on first use and cached under ``<user cache>/torpor/<kind>`` (or an environment variable
per kind) behind a file lock, written by atomic rename; its Cranelift machine code is
cached beside it. An agent of that language is the runtime pre-initialised with the agent
(:mod:`host.sandbox.preinit`) inside a build-time instance whose imports answer nothing:
the author's code runs under a fuel budget and a memory cap and cannot reach the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.errors import ToolchainError
from host.sandbox import abi, isolation, preinit

#: The ABI declarations both runtimes' drivers include (``guest_sdk/runtime_abi.h``): its
#: directory is on both compile lines and its bytes in both cache keys.
SHARED_ABI_HEADER = Path(__file__).resolve().parents[2] / "guest_sdk" / "runtime_abi.h"
#: The allocator both drivers include (zeroing freed blocks, the mid-size pages), beside it.
SHARED_ALLOC_HEADER = SHARED_ABI_HEADER.with_name("runtime_alloc.h")
SHARED_INCLUDE = f"-I{SHARED_ABI_HEADER.parent}"


def shared_headers() -> bytes:
    """The bytes of every header both runtimes include, for their cache keys: a change of
    one rebuilds both."""
    return b"\0".join(path.read_bytes() for path in (SHARED_ABI_HEADER, SHARED_ALLOC_HEADER))


def cache_dir(kind: str, env: str) -> Path:
    """Where the runtime of ``kind`` lives (``$env`` or ``<user cache>/torpor/<kind>``)."""
    value = os.environ.get(env)
    if value:
        return Path(value)
    import platformdirs

    return Path(platformdirs.user_cache_dir("torpor")) / kind


@contextlib.contextmanager
def cache_lock(d: Path) -> Iterator[Path]:
    """The cache directory ``d``, held exclusively: two builds at once would both compile."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` at ``path`` by rename: a reader sees the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + "-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def pypi_sdist(d: Path, package: str, version: str, filename: str, sha256: str, *, what: str) -> bytes:
    """A pinned source distribution, from the cache ``d`` or PyPI, checked against its hash.

    Called with the cache lock held."""
    path = d / filename
    if path.exists():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == sha256:
            return data
        path.unlink()  # a damaged download: fetch it again
    with tempfile.TemporaryDirectory(prefix="torpor-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{package}=={version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolchainError(f"cannot download the {what} sources ({package}=={version}): {exc}") from exc
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            raise ToolchainError(
                f"cannot download the {what} sources ({package}=={version} from PyPI): "
                + (proc.stderr.strip().splitlines() or ["pip download failed"])[-1])
        data = got.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ToolchainError(f"the downloaded {filename} has SHA-256 {digest}, not the pinned {sha256}")
    write_atomic(path, data)
    return data


def zig_version() -> str:
    """The toolchain's versions, part of every runtime's cache key."""
    from importlib import metadata

    try:
        return metadata.version("ziglang") + "/" + metadata.version("icpp-binaryen")
    except metadata.PackageNotFoundError:
        return "missing"


def zig(args: list[str], *, what: str, memory_bytes: int | None = None) -> None:
    """Runs ``zig ARGS`` in the toolchain's limited child process."""
    limits = isolation.cc_limits()
    cpu = isolation.cpu_seconds_for(limits, os.cpu_count() or 1)
    memory = max(limits.memory_bytes, memory_bytes or 0)
    cmd = isolation.worker_command("zig", str(memory), str(cpu), *args)
    fin = isolation.run_child(cmd, input=b"", timeout_s=limits.timeout_s, env=isolation.worker_env())
    if fin.timed_out:
        raise ToolchainError(f"compiling {what} did not finish within {limits.timeout_text()}")
    if fin.returncode != 0:
        errors = [line for line in fin.stderr.splitlines() if "error" in line.lower()]
        raise ToolchainError(f"compiling {what} failed:\n" + "\n".join(errors[:20] or [fin.stderr.strip()[-2000:]]))


def parallel(jobs: list[tuple[list[str], str]]) -> None:
    """Several ``zig`` runs at once, one per usable core."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in [pool.submit(zig, args, what=what) for args, what in jobs]:
            fut.result()


def cached_module(path: Path, build: Callable[[], bytes], *, what: str | None = None) -> bytes:
    """The module at ``path``, built by ``build`` on first use on this machine and cached.

    The lock is not held while building (a build takes minutes and other caches in the
    directory stay usable); a second builder that raced writes the same bytes. ``what``
    names the build in one line on stderr before it starts and one when it is done: a
    minute or more of a silent ``torpor build`` looks like a hang to whoever waits."""
    if path.exists():
        return path.read_bytes()
    with cache_lock(path.parent):
        if path.exists():  # another process built it while this one waited
            return path.read_bytes()
    t0 = time.monotonic()
    if what:
        print(f"torpor: building {what}, once for this machine (cached in {path.parent})", file=sys.stderr,
              flush=True)
    wasm = build()
    with cache_lock(path.parent):
        write_atomic(path, wasm)
    if what:
        print(f"torpor: built {what.split(' (')[0]} in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return wasm


def _wasmtime_version() -> str:
    from importlib import metadata

    return metadata.version("wasmtime")


def compiled(engine: Any, wasm: bytes, d: Path, prefix: str) -> Any:
    """``wasm`` compiled by Cranelift, its machine code cached in ``d`` beside the module."""
    import wasmtime

    art = d / f"{prefix}-{hashlib.sha256(wasm).hexdigest()[:16]}-{_wasmtime_version()}.cwasm"
    if art.exists():
        try:
            return wasmtime.Module.deserialize_file(engine, str(art))
        except wasmtime.WasmtimeError:
            art.unlink()
    module = wasmtime.Module(engine, wasm)
    with contextlib.suppress(OSError):
        art.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(art, bytes(module.serialize()))
    return module


def init_engine() -> Any:
    """The engine of build-time instances: fuel-metered, optimised like the host's."""
    import wasmtime

    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.cranelift_opt_level = "speed"
    return wasmtime.Engine(cfg)


class InitFailed(Exception):
    """The build-time init called the host in a way it must not, or aborted."""


@dataclass
class BuildInstance:
    """A runtime instantiated for its build-time init: imports that answer nothing
    (no input, no tools), what it logged in ``said``."""

    runtime: bytes
    store: Any
    exports: Any
    said: list[str] = field(default_factory=list)

    def func(self, name: str) -> Any:
        import wasmtime

        f = self.exports.get(name) if hasattr(self.exports, "get") else None
        if not isinstance(f, wasmtime.Func):
            raise ToolchainError(f"the runtime module lacks its build export {name}; clear its cache and rebuild")
        return f

    @property
    def memory(self) -> Any:
        import wasmtime

        mem = self.exports["memory"]
        if not isinstance(mem, wasmtime.Memory):
            raise ToolchainError("the runtime module has no memory")
        return mem

    def put(self, alloc: str, data: bytes, what: str) -> int:
        """``data`` copied into guest memory allocated by the export ``alloc``."""
        ptr = int(self.func(alloc)(self.store, len(data)))
        if ptr <= 0:
            raise ToolchainError(f"{what}: no room in the build's memory")
        self.memory.write(self.store, data, ptr)
        return ptr

    def image(self, drop_exports: frozenset[str]) -> bytes:
        """The runtime with this instance's memory and mutable globals as its pristine image."""
        import wasmtime

        values: dict[int, int | float] = {}
        for gname, index in preinit.global_exports(self.runtime).items():
            g = self.exports[gname]
            if isinstance(g, wasmtime.Global) and g.type(self.store).mutable:
                values[index] = g.value(self.store)
        mem = self.memory
        img = preinit.Image(memory=bytes(mem.read(self.store, 0, mem.data_len(self.store))), globals=values)
        return preinit.apply(self.runtime, img, drop_exports=drop_exports)


#: Answers a build-time question the runtime asks through ``tool_call`` (its name and raw
#: arguments): a status (0, or -1 for a refusal) and the answer the guest reads back.
Builder = Callable[[str, bytes], tuple[int, bytes]]


def build_instance(runtime: bytes, module: Any, engine: Any, *, fuel: int, memory: int,
                   builder: Builder | None = None) -> BuildInstance:
    """``module`` (compiled from ``runtime``) instantiated for its init, see :class:`BuildInstance`.

    Without ``builder`` a tool call during the init is refused (an agent cannot call
    anything while it is built); with one, its questions (the JS runtime asking where an
    import points and for that module's source) are answered and nothing else."""
    import wasmtime

    store = wasmtime.Store(engine)
    store.set_fuel(fuel)
    store.set_limits(memory_size=memory)
    said: list[str] = []
    linker = wasmtime.Linker(engine)
    i32 = wasmtime.ValType.i32()

    def define(name: str, params: int, results: int, fn: Any) -> None:
        ty = wasmtime.FuncType([i32] * params, [i32] * results)
        linker.define_func(abi.IMPORT_MODULE, name, ty, fn, access_caller=True)

    answer = [b""]

    def read_bytes(caller: Any, ptr: int, n: int) -> bytes | None:
        mem = caller.get("memory")
        if not isinstance(mem, wasmtime.Memory) or ptr < 0 or n < 0 or ptr + n > mem.data_len(caller):
            return None
        return bytes(mem.read(caller, ptr, ptr + n))

    def read(caller: Any, ptr: int, n: int) -> str:
        data = read_bytes(caller, ptr, n)
        return "(unreadable message)" if data is None else data.decode("utf-8", "replace")

    def log(caller: Any, level: int, ptr: int, n: int) -> int:
        said.append(read(caller, ptr, min(n, 65536)))
        return 0

    def refuse(caller: Any, *args: int) -> int:
        raise InitFailed("the agent called the host while it was being built")

    def abort(caller: Any, kind: int, ptr: int, n: int) -> None:
        raise InitFailed(read(caller, ptr, min(n, 4096)))

    def ask(caller: Any, name_ptr: int, name_len: int, args_ptr: int, args_len: int) -> int:
        if builder is None:
            raise InitFailed("the agent called the host while it was being built")
        what = read(caller, name_ptr, min(name_len, 64))
        raw = read_bytes(caller, args_ptr, args_len)
        if raw is None:
            raise InitFailed("the builder's question is outside memory")
        rc, answer[0] = builder(what, raw)
        return rc

    def response_read(caller: Any, ptr: int, n: int) -> int:
        data = answer[0][:max(0, n)]
        mem = caller.get("memory")
        if not isinstance(mem, wasmtime.Memory) or ptr < 0 or ptr + len(data) > mem.data_len(caller):
            return -1
        mem.write(caller, data, ptr)
        return len(data)

    define("input_len", 0, 1, lambda caller: 0)
    define("input_read", 2, 1, lambda caller, p, n: 0)
    define("output_write", 2, 1, refuse)
    define("log", 3, 1, log)
    define("tool_call", 4, 1, ask)
    define("response_len", 0, 1, lambda caller: len(answer[0]))
    define("response_read", 2, 1, response_read)
    define("abort", 3, 0, abort)
    inst = linker.instantiate(store, module)
    return BuildInstance(runtime=runtime, store=store, exports=inst.exports(store), said=said)


def trap_message(exc: Any, filename: str, doing: str, verb: str) -> str:
    """One line for a trap of the build-time init (``doing``: "compiling the agent",
    ``verb``: "compile")."""
    import wasmtime

    if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
        return f"{filename}: {doing} ran out of fuel"
    if exc.trap_code == wasmtime.TrapCode.STACK_OVERFLOW:
        return f"{filename}: the source nests too deeply to {verb} (stack overflow)"
    return f"{filename}: {doing} failed ({exc.trap_code}): {str(exc).splitlines()[0]}"
