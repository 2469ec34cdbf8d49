"""The guest toolchain: C sources to a Torpor-ready wasm module, with nothing but PyPI.

Zig (the ``ziglang`` wheel) is the C compiler to ``wasm32-freestanding``;
Binaryen (the ``icpp-binaryen`` wheel) applies Asyncify. :func:`prepare_module`
is shared by ``torpor build`` and ``torpor pack`` so a module built elsewhere
gets exactly the same transforms. Binaryen runs in a child process under time
and memory limits (``isolation.py``), so no module can take the calling process
down.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from host.errors import ModuleError, ToolchainError
from host.sandbox import abi, binaryen, wasm_binary

SDK_DIR = Path(__file__).resolve().parents[2] / "guest_sdk" / "c"  # from host/sandbox/ up to the top

COMPILE_FLAGS = (
    "--target=wasm32-freestanding",
    "-O2",
    "-g0",
    "-nostdlib",
    "-ffreestanding",
    "-Wl,--no-entry",
    "-Wl,--export-dynamic",
    "-Wl,-z,stack-size=65536",
    f"-Wl,--export={abi.ASYNC_BUF_EXPORT}",
)


def compile_c(sources: list[Path], *, include_dirs: list[Path] | None = None, extra_flags: list[str] | None = None) -> bytes:
    """Compile C sources plus the guest SDK runtime into one raw wasm module."""
    if not sources:
        raise ToolchainError("no C sources to compile")
    sdk_runtime = SDK_DIR / "torpor.c"
    inputs = [str(p) for p in sources]
    if sdk_runtime.exists() and sdk_runtime.resolve() not in {p.resolve() for p in sources}:
        inputs.insert(0, str(sdk_runtime))
    includes = [f"-I{SDK_DIR}"] + [f"-I{d}" for d in include_dirs or []]
    with tempfile.TemporaryDirectory(prefix="torpor-build-") as tmp:
        out = Path(tmp) / "agent.wasm"
        cmd = [sys.executable, "-m", "ziglang", "cc", *COMPILE_FLAGS, *includes, *(extra_flags or []), "-o", str(out), *inputs]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except FileNotFoundError as exc:  # pragma: no cover - broken install
            raise ToolchainError(f"cannot run the compiler: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise ToolchainError("the C compiler did not finish within 300 s") from exc
        if proc.returncode != 0:
            if "No module named ziglang" in proc.stderr:
                raise ToolchainError("the C toolchain is missing: run `pip install ziglang` (or reinstall torpor)")
            raise ToolchainError("C compilation failed:\n" + proc.stderr.strip())
        return out.read_bytes()


def abi_version_of(wasm: bytes) -> int | None:
    """The ABI version recorded in the module's ``torpor.abi`` section, or None."""
    payload = wasm_binary.custom_sections(wasm).get(abi.ABI_SECTION)
    if payload is None:
        return None
    try:
        return int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModuleError(f"malformed {abi.ABI_SECTION} section: {payload[:32]!r}") from exc


def is_prepared(wasm: bytes) -> bool:
    """True when the module already went through :func:`prepare_module`."""
    return abi_version_of(wasm) is not None


def prepare_module(wasm: bytes) -> bytes:
    """Apply the host's transforms to a raw module (idempotent).

    Exports the mutable globals, runs Asyncify on the suspending imports and
    records the ABI version. A module that already carries the ABI section is
    returned unchanged after its version is checked.
    """
    wasm_binary.check_header(wasm)
    version = abi_version_of(wasm)
    if version is not None:
        if version not in abi.SUPPORTED_ABI_VERSIONS:
            raise_abi_version(version)
        return wasm
    return binaryen.asyncify(
        wasm,
        suspending_imports=list(abi.SUSPENDING_IMPORTS),
        global_export_prefix=abi.GLOBAL_EXPORT_PREFIX,
        custom_sections={abi.ABI_SECTION: str(abi.ABI_VERSION).encode()},
        # Binaryen only ever sees a valid module; Wasmtime checks it while the worker loads.
        while_starting=lambda: check_with_wasmtime(wasm),
    )


def check_with_wasmtime(wasm: bytes) -> None:
    """Refuse a module that is not valid WebAssembly before Binaryen sees it.

    Binaryen assumes valid input: on an invalid module it exits or aborts (in its
    child process, so the host lives on, but with a message about Binaryen's
    internals). :mod:`host.sandbox.validate` reads a module's sections, not its code;
    Wasmtime's validator checks the code too and says what is wrong with it.
    """
    import wasmtime

    # A default engine (creating one costs microseconds): every feature Wasmtime enables
    # by default passes here; a module using one Binaryen lacks is refused by Binaryen,
    # with the feature named. Not cached: an engine alive at exit warns as it is freed.
    try:
        wasmtime.Module.validate(wasmtime.Engine(), wasm)
    except wasmtime.WasmtimeError as exc:
        detail = " ".join(str(exc).split())
        raise ModuleError(f"the module is not valid WebAssembly: {detail}") from exc


def raise_abi_version(version: int) -> None:
    from host.errors import AbiVersionError

    supported = ", ".join(str(v) for v in sorted(abi.SUPPORTED_ABI_VERSIONS))
    raise AbiVersionError(
        f"the module targets guest ABI v{version}; this host supports v{supported}. "
        "Rebuild the agent against this version of the guest SDK."
    )
