"""A thin binding to Binaryen's C API, loaded from the ``icpp-binaryen`` wheel.

Torpor needs three things from Binaryen and nothing else: read a module, export
its mutable globals (so a snapshot can capture them), run the Asyncify pass on
the imports that may suspend, and add a custom section. The wheel ships
``libbinaryen.so``; its own cffi declarations cover too little, so we declare
the few functions we call here. Keeping it to this module means a future
toolchain (``wasm-opt`` on PATH, another language's build) swaps one file.

Binaryen runs in a child process (``toolchain_worker.py``, under the limits of
``isolation.py``): its fatal errors end the process they run in and its
assertions abort it, so :func:`asyncify` turns how the child ended into a
:class:`~host.errors.ModuleError` (Binaryen refused the module, and what it said)
or a :class:`~host.errors.ToolchainError` (Binaryen crashed or hit a limit), and
the calling process lives on.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import TYPE_CHECKING, Any

from host.errors import ModuleError, ToolchainError, TorporError
from host.sandbox import isolation

if TYPE_CHECKING:
    from collections.abc import Callable

_CDEF = """
typedef struct BinaryenModule* BinaryenModuleRef;
typedef struct BinaryenGlobal* BinaryenGlobalRef;
typedef struct BinaryenExport* BinaryenExportRef;
typedef uintptr_t BinaryenType;
typedef uint32_t BinaryenIndex;
typedef struct { void* binary; size_t binaryBytes; char* sourceMap; } BinaryenModuleAllocateAndWriteResult;
BinaryenModuleRef BinaryenModuleRead(char* input, size_t inputSize);
void BinaryenModuleRunPasses(BinaryenModuleRef module, const char** passes, BinaryenIndex numPasses);
void BinaryenSetPassArgument(const char* name, const char* value);
void BinaryenClearPassArguments(void);
void BinaryenSetOptimizeLevel(int level);
void BinaryenSetShrinkLevel(int level);
BinaryenIndex BinaryenGetNumGlobals(BinaryenModuleRef module);
BinaryenGlobalRef BinaryenGetGlobalByIndex(BinaryenModuleRef module, BinaryenIndex index);
const char* BinaryenGlobalGetName(BinaryenGlobalRef global);
bool BinaryenGlobalIsMutable(BinaryenGlobalRef global);
const char* BinaryenGlobalImportGetModule(BinaryenGlobalRef import);
BinaryenExportRef BinaryenAddGlobalExport(BinaryenModuleRef module, const char* internalName, const char* externalName);
BinaryenIndex BinaryenGetNumExports(BinaryenModuleRef module);
BinaryenExportRef BinaryenGetExportByIndex(BinaryenModuleRef module, BinaryenIndex index);
const char* BinaryenExportGetName(BinaryenExportRef export_);
const char* BinaryenExportGetValue(BinaryenExportRef export_);
uint32_t BinaryenExportGetKind(BinaryenExportRef export_);
uint32_t BinaryenExternalGlobal(void);
void BinaryenAddCustomSection(BinaryenModuleRef module, const char* name, const char* contents, BinaryenIndex contentsSize);
bool BinaryenModuleValidate(BinaryenModuleRef module);
BinaryenModuleAllocateAndWriteResult BinaryenModuleAllocateAndWrite(BinaryenModuleRef module, const char* sourceMapUrl);
void BinaryenModuleDispose(BinaryenModuleRef module);
uint32_t BinaryenFeatureAll(void);
uint32_t BinaryenFeatureBulkMemory(void);
uint32_t BinaryenFeatureMutableGlobals(void);
uint32_t BinaryenFeatureNontrappingFPToInt(void);
uint32_t BinaryenFeatureSignExt(void);
uint32_t BinaryenModuleGetFeatures(BinaryenModuleRef module);
void BinaryenModuleSetFeatures(BinaryenModuleRef module, uint32_t features);
void free(void*);
"""

#: Features a caller may enable for a module that uses them undeclared (by name).
EXTRA_FEATURES = {"nontrapping-float-to-int": "BinaryenFeatureNontrappingFPToInt", "sign-ext": "BinaryenFeatureSignExt"}


class ValidationFailed(ToolchainError):
    """Binaryen's validator refused the transformed module (its reasons are on stderr)."""


_lock = threading.Lock()  # Binaryen's pass arguments and optimize levels are process-global.
_lib: Any = None
_ffi: Any = None


def _load() -> tuple[Any, Any]:
    global _lib, _ffi
    if _lib is None:
        try:
            import cffi
            import icpp_binaryen
        except ImportError as exc:  # pragma: no cover - install problem
            raise ToolchainError(
                "Binaryen is not installed: run `pip install icpp-binaryen cffi` "
                "(or reinstall torpor)"
            ) from exc
        path = os.path.join(os.path.dirname(icpp_binaryen.__file__), "lib", "libbinaryen.so")
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        try:
            _lib = ffi.dlopen(path)
        except OSError as exc:  # pragma: no cover - install problem
            raise ToolchainError(f"cannot load Binaryen from {path}: {exc}") from exc
        _ffi = ffi
    return _lib, _ffi


def asyncify(
    wasm: bytes,
    *,
    suspending_imports: list[str],
    global_export_prefix: str = "torpor.g",
    custom_sections: dict[str, bytes] | None = None,
    optimize_level: int = 2,
    extra_passes: tuple[str, ...] = ("strip-debug", "memory-packing"),
    while_starting: Callable[[], object] | None = None,
    pass_arguments: dict[str, str] | None = None,
    enable_features: tuple[str, ...] = (),
) -> bytes:
    """Return ``wasm`` transformed so that the host can snapshot it at a suspending import.

    What the transform does: :func:`asyncify_in_process`. It runs in a child process
    under ``$TORPOR_BINARYEN_TIMEOUT`` (wall clock, default 60 s) and
    ``$TORPOR_BINARYEN_MEMORY`` (address space, default 2 GiB). Raises
    :class:`~host.errors.ModuleError` when Binaryen refuses the module (naming the
    feature it lacks where that can be recognised) and
    :class:`~host.errors.ToolchainError` when it crashes or hits a limit.
    ``while_starting`` runs in this process while the worker starts (see
    :func:`isolation.run_child`); an error it raises ends the call. ``pass_arguments``
    are more of Binaryen's pass arguments (``asyncify-onlylist`` for the JS runtime,
    whose suspension is reached through three functions only). ``enable_features`` names
    features of :data:`EXTRA_FEATURES` the module uses without declaring them (the
    Python runtime's prebuilt libpython).
    """
    limits = isolation.binaryen_limits()
    threads = _binaryen_threads()
    request = {
        "suspending_imports": list(suspending_imports),
        "global_export_prefix": global_export_prefix,
        "custom_sections": {k: v.hex() for k, v in (custom_sections or {}).items()},
        "optimize_level": optimize_level,
        "extra_passes": list(extra_passes),
        "pass_arguments": dict(pass_arguments or {}),
        "enable_features": list(enable_features),
    }
    cmd = isolation.worker_command(
        "asyncify", str(limits.memory_bytes), str(isolation.cpu_seconds_for(limits, threads))
    )
    # Binaryen starts a thread per core, each with a stack and a malloc arena: left
    # alone, a 64-core machine would need gigabytes of address space for a hello agent.
    env = isolation.worker_env({"BINARYEN_CORES": str(threads), "MALLOC_ARENA_MAX": "2"})
    try:
        fin = isolation.run_child(
            cmd,
            input=json.dumps(request).encode() + b"\n" + wasm,
            timeout_s=limits.timeout_s,
            env=env,
            while_starting=while_starting,
        )
    except OSError as exc:  # pragma: no cover - cannot start a process at all
        raise ToolchainError(f"cannot start the Binaryen worker: {exc}") from exc
    status, _, payload = fin.stdout.partition(b"\n")
    if fin.returncode == 0 and not fin.timed_out:
        if status == b"ok":
            return payload
        if status == b"error":
            raise _reported_error(json.loads(payload), fin.stderr)
    raise failure(fin, limits)


def _binaryen_threads() -> int:
    """Binaryen's worker threads: ``$BINARYEN_CORES`` if set, else the cores, at most 8."""
    raw = os.environ.get("BINARYEN_CORES", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))


# -- how the worker ended, as a typed error ----------------------------------------------
# (pattern in what Binaryen said, the feature it means): recognised so that the message
# names the feature, not only Binaryen's words.
_FEATURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"tail call", re.I), "tail calls (return_call, return_call_indirect)"),
    (re.compile(r"Tables may not be 64-bit"), "64-bit tables (table64, part of memory64)"),
    (re.compile(r"non-number types, like references"),
     "reference-typed values live across a suspending call (Asyncify saves numbers only)"),
    (re.compile(r"Block requires more values than are available"),
     "blocks with parameters (multi-value)"),
    (re.compile(r"Tuples are not allowed unless multivalue"), "multiple results (multi-value)"),
    (re.compile(r"\[--enable-([\w-]+)\]"), "{0}"),
    (re.compile(r"global init must be constant"), "extended constant expressions (extended-const)"),
    (re.compile(r"invalid code after (?:misc|SIMD|atomic|GC) prefix"), "an instruction newer than Binaryen"),
    (re.compile(r"invalid wasm type"), "a value type newer than Binaryen (e.g. exnref)"),
)
_OOM = re.compile(r"bad_alloc|MemoryError|out of memory|Cannot allocate memory|failed to map segment", re.I)


def failure(fin: isolation.Finished, limits: isolation.Limits) -> TorporError:
    """The typed error for a Binaryen worker that ended without a result.

    A Binaryen ``Fatal`` (exit status 1) means it refused the module: ``invalid_module``,
    with what it said and, where recognisable, the feature it lacks. A signal, a
    deadline, a memory limit or any other status means the toolchain failed:
    ``toolchain``, naming the limit that was hit.
    """
    err = fin.stderr
    if fin.timed_out:
        return ToolchainError(
            f"Binaryen did not finish within {limits.timeout_text()} and was stopped; "
            "the module is too large or too complex for it (or the limit too low)"
        )
    sig = fin.signal_name
    if fin.returncode == isolation.EXIT_NO_MEMORY or (_OOM.search(err) and fin.returncode != 1):
        return ToolchainError(f"Binaryen ran out of memory under its limit of {limits.memory_text()}")
    if sig == "SIGXCPU" or (sig == "SIGKILL" and "Fatal:" not in err):
        return ToolchainError(
            f"Binaryen was stopped by its CPU-time limit (derived from {limits.timeout_text()}) "
            f"or killed by the system ({sig})"
        )
    if sig is not None:
        said = _assertion(err) or _last_line(err)
        return ToolchainError(f"Binaryen crashed on this module ({sig}" + (f": {said})" if said else ")"))
    fatal = _fatal(err)
    if fin.returncode == 1 and fatal is not None:
        return ModuleError(_refusal(fatal))
    said = _last_line(err)
    return ToolchainError(
        f"the Binaryen worker failed (exit status {fin.returncode})" + (f": {said}" if said else "")
    )


def _reported_error(payload: dict[str, Any], stderr: str) -> TorporError:
    """An error the worker reported itself; a validator's refusal names the feature."""
    message = str(payload.get("message", "Binaryen failed"))
    if payload.get("validation"):
        feature = _feature(stderr)
        first = _validator_line(stderr)
        if feature is not None or "all used features should be allowed" in stderr:
            what = feature or f"an instruction its features do not enable{_instruction(stderr)}"
            return ModuleError(
                f"Binaryen refused the module: it uses {what}, which the module's "
                "target_features section does not declare (or Binaryen does not support)"
                + (f"; Binaryen said: {first}" if first else "")
            )
        return ToolchainError(message + (f": {first}" if first else ""))
    if payload.get("code") == ModuleError.code:
        return ModuleError(message)
    return ToolchainError(message, code=str(payload.get("code") or ToolchainError.code))


def _refusal(fatal: str) -> str:
    feature = _feature(fatal)
    version = _version()
    if feature is not None:
        return f"the module uses {feature}, which Binaryen{version} does not support (it said: {fatal})"
    if fatal.startswith("cannot read"):
        return f"Binaryen{version} {fatal}"
    return f"Binaryen{version} refused the module: {fatal}"


def _fatal(err: str) -> str | None:
    """What Binaryen's ``Fatal`` said, with the parse error that led to it if any."""
    m = re.search(r"Fatal: ([^\n]*)", err)
    if m is None:
        return None
    parse = re.search(r"\[parse exception: ([^\n]*?)\]Fatal", err)
    if parse is not None:
        return f"cannot read the module: {parse.group(1)}"
    return m.group(1).strip()


def _feature(text: str) -> str | None:
    for pattern, name in _FEATURES:
        m = pattern.search(text)
        if m is not None:
            return name.format(*m.groups())
    return None


def _validator_line(err: str) -> str | None:
    m = re.search(r"\[wasm-validator error[^\n]*", err)
    return re.sub(r",? on\s*$", "", m.group(0))[:300] if m else None


def _instruction(err: str) -> str:
    """``" (v128.const)"`` from the expression a validator error prints after its line."""
    m = re.search(r"all used features should be allowed, on \n\(([\w.]+)", err)
    return f" ({m.group(1)})" if m else ""


def _assertion(err: str) -> str | None:
    m = re.search(r"([\w./-]+:\d+: [^\n]*Assertion [^\n]*failed\.?)", err)
    if m is None:
        return None
    return re.sub(r"^\S*/src/", "src/", m.group(1))[:300]


def _last_line(err: str) -> str:
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _version() -> str:
    """`` 116`` (the Binaryen release the wheel ships), or nothing when unknown."""
    try:
        from importlib import metadata

        return " " + metadata.version("icpp-binaryen").split(".")[0]
    except Exception:  # the message is still useful without it
        return ""


def asyncify_in_process(
    wasm: bytes,
    *,
    suspending_imports: list[str],
    global_export_prefix: str = "torpor.g",
    custom_sections: dict[str, bytes] | None = None,
    optimize_level: int = 2,
    extra_passes: tuple[str, ...] = ("strip-debug", "memory-packing"),
    pass_arguments: dict[str, str] | None = None,
    enable_features: tuple[str, ...] = (),
) -> bytes:
    """:func:`asyncify` in this very process: only for the toolchain worker.

    Binaryen may end or abort the process it runs in on a module it cannot handle;
    everything else calls :func:`asyncify`, which runs this in a child process.

    * every mutable global defined (not imported) by the module is exported as
      ``{prefix}{index}``: after an Asyncify unwind, linear memory plus these
      globals are the agent's whole state;
    * the Asyncify pass instruments the call paths to ``suspending_imports``
      (each ``module.name``) and adds the ``asyncify_*`` exports;
    * ``custom_sections`` are appended (the ABI version, for one);
    * ``extra_passes`` then run: by default debug info is stripped and zero
      runs are dropped from data segments (a hello agent shrinks from ~28 KiB
      to ~10 KiB; linear memory after instantiation is unchanged).

    Globals are exported *before* Asyncify runs, so its own bookkeeping globals
    stay private: the host never snapshots them (they are reset by
    ``asyncify_start_rewind``).
    """
    lib, ffi = _load()
    with _lock:
        buf = ffi.new("char[]", wasm)
        mod = lib.BinaryenModuleRead(buf, len(wasm))
        if mod == ffi.NULL:
            raise ToolchainError("Binaryen could not parse the module")
        try:
            # Clang >= 20 emits memory.copy/fill under a feature name ("bulk-memory-opt")
            # that Binaryen 116 does not read from the target_features section. Exported
            # mutable globals are this transform's own doing, so a module without a
            # target_features section (an MVP module) must not be refused for them.
            features = (lib.BinaryenModuleGetFeatures(mod) | lib.BinaryenFeatureBulkMemory()
                        | lib.BinaryenFeatureMutableGlobals())
            for name in enable_features:
                if name not in EXTRA_FEATURES:
                    raise ToolchainError(f"unknown Binaryen feature {name!r}")
                features |= getattr(lib, EXTRA_FEATURES[name])()
            lib.BinaryenModuleSetFeatures(mod, features)
            exported: set[str] = set()
            kind_global = lib.BinaryenExternalGlobal()
            for i in range(lib.BinaryenGetNumExports(mod)):
                exp = lib.BinaryenGetExportByIndex(mod, i)
                if lib.BinaryenExportGetKind(exp) == kind_global:
                    exported.add(ffi.string(lib.BinaryenExportGetName(exp)).decode())
            for i in range(lib.BinaryenGetNumGlobals(mod)):
                glob = lib.BinaryenGetGlobalByIndex(mod, i)
                if not lib.BinaryenGlobalIsMutable(glob):
                    continue
                if lib.BinaryenGlobalImportGetModule(glob) != ffi.NULL:
                    imp = ffi.string(lib.BinaryenGlobalImportGetModule(glob))
                    if imp:
                        continue  # imported globals belong to the host, not the snapshot
                external = f"{global_export_prefix}{i}"
                if external in exported:
                    continue
                name = lib.BinaryenGlobalGetName(glob)
                lib.BinaryenAddGlobalExport(mod, name, external.encode())
            passes = (("asyncify",) if suspending_imports else ()) + tuple(extra_passes)
            if passes:
                lib.BinaryenClearPassArguments()
                if suspending_imports:
                    lib.BinaryenSetPassArgument(b"asyncify-imports", ",".join(suspending_imports).encode())
                for key, value in (pass_arguments or {}).items():
                    lib.BinaryenSetPassArgument(key.encode(), value.encode())
                lib.BinaryenSetOptimizeLevel(optimize_level)
                lib.BinaryenSetShrinkLevel(1)
                names = [ffi.new("char[]", p.encode()) for p in passes]
                arr = ffi.new("const char*[]", names)
                lib.BinaryenModuleRunPasses(mod, arr, len(names))
                lib.BinaryenClearPassArguments()
            for sname, payload in (custom_sections or {}).items():
                lib.BinaryenAddCustomSection(mod, sname.encode(), payload, len(payload))
            if not lib.BinaryenModuleValidate(mod):
                raise ValidationFailed("the module failed Binaryen validation after the Asyncify transform")
            res = lib.BinaryenModuleAllocateAndWrite(mod, ffi.NULL)
            try:
                return bytes(ffi.buffer(res.binary, res.binaryBytes))
            finally:
                lib.free(res.binary)
                if res.sourceMap != ffi.NULL:
                    lib.free(res.sourceMap)
        finally:
            lib.BinaryenModuleDispose(mod)
