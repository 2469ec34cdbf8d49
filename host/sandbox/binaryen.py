"""A thin binding to Binaryen's C API, loaded from the ``icpp-binaryen`` wheel.

Torpor needs three things from Binaryen and nothing else: read a module, export
its mutable globals (so a snapshot can capture them), run the Asyncify pass on
the imports that may suspend, and add a custom section. The wheel ships
``libbinaryen.so``; its own cffi declarations cover too little, so we declare
the few functions we call here. Keeping it to this module means a future
toolchain (``wasm-opt`` on PATH, another language's build) swaps one file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from host.errors import ToolchainError

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
uint32_t BinaryenModuleGetFeatures(BinaryenModuleRef module);
void BinaryenModuleSetFeatures(BinaryenModuleRef module, uint32_t features);
void free(void*);
"""

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
        path = Path(icpp_binaryen.__file__).parent / "lib" / "libbinaryen.so"
        ffi = cffi.FFI()
        ffi.cdef(_CDEF)
        try:
            _lib = ffi.dlopen(str(path))
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
) -> bytes:
    """Return ``wasm`` transformed so that the host can snapshot it at a suspending import.

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
            # that Binaryen 116 does not read from the target_features section.
            features = lib.BinaryenModuleGetFeatures(mod) | lib.BinaryenFeatureBulkMemory()
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
                lib.BinaryenSetOptimizeLevel(optimize_level)
                lib.BinaryenSetShrinkLevel(1)
                names = [ffi.new("char[]", p.encode()) for p in passes]
                arr = ffi.new("const char*[]", names)
                lib.BinaryenModuleRunPasses(mod, arr, len(names))
                lib.BinaryenClearPassArguments()
            for sname, payload in (custom_sections or {}).items():
                lib.BinaryenAddCustomSection(mod, sname.encode(), payload, len(payload))
            if not lib.BinaryenModuleValidate(mod):
                raise ToolchainError("the module failed Binaryen validation after the Asyncify transform")
            res = lib.BinaryenModuleAllocateAndWrite(mod, ffi.NULL)
            try:
                return bytes(ffi.buffer(res.binary, res.binaryBytes))
            finally:
                lib.free(res.binary)
                if res.sourceMap != ffi.NULL:
                    lib.free(res.sourceMap)
        finally:
            lib.BinaryenModuleDispose(mod)
