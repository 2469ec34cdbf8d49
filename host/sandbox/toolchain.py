"""The guest toolchain: C or Zig sources to a Torpor-ready wasm module, with nothing but PyPI.

Zig (the ``ziglang`` wheel) is the C compiler to ``wasm32-freestanding``, and the
Zig compiler for agents written in Zig (:func:`compile_zig`);
Binaryen (the ``icpp-binaryen`` wheel) applies Asyncify. :func:`prepare_module`
is shared by ``torpor build`` and ``torpor pack`` so a module built elsewhere
gets exactly the same transforms. Both tools run in child processes under time
and memory limits (``isolation.py``), so no module and no source can take the
calling process down.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from host.errors import ModuleError, ToolchainError
from host.sandbox import abi, binaryen, isolation, wasm_binary

SDK_DIR = Path(__file__).resolve().parents[2] / "guest_sdk" / "c"  # from host/sandbox/ up to the top
ZIG_SDK_DIR = SDK_DIR.parent / "zig"

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
    """Compile C sources plus the guest SDK runtime into one raw wasm module.

    The compiler runs under ``$TORPOR_CC_TIMEOUT`` (wall clock, default 300 s) and
    ``$TORPOR_CC_MEMORY`` (address space, default 4 GiB): hostile source must not
    take the building process, or the machine, with it.
    """
    if not sources:
        raise ToolchainError("no C sources to compile")
    sdk_runtime = SDK_DIR / "torpor.c"
    inputs = [str(p) for p in sources]
    if sdk_runtime.exists() and sdk_runtime.resolve() not in {p.resolve() for p in sources}:
        inputs.insert(0, str(sdk_runtime))
    includes = [f"-I{SDK_DIR}"] + [f"-I{d}" for d in include_dirs or []]
    limits = isolation.cc_limits()
    with tempfile.TemporaryDirectory(prefix="torpor-build-") as tmp:
        out = Path(tmp) / "agent.wasm"
        # -fno-crash-diagnostics: a crashing clang would otherwise leave the agent's
        # preprocessed source in /tmp for anyone to read.
        args = ["cc", *COMPILE_FLAGS, "-fno-crash-diagnostics", *includes, *(extra_flags or []), "-o", str(out), *inputs]
        return _run_zig(args, out, limits, language="C")


# The Zig build of an agent: ``start.zig`` is the root (it exports ``torpor_main`` and
# ``__torpor_async``), the agent's file is the module ``agent`` and the SDK the module
# ``torpor``. ReleaseSafe keeps Zig's safety checks, so an overflow or a bad index fails
# the agent with ``aborted`` and the check's message rather than computing garbage.
# ``-mcpu=mvp+bulk_memory+mutable_globals``: a stripped Zig module declares no target
# features, and Binaryen (which reads them from that section) would refuse the
# sign-extension and float-conversion instructions the generic CPU emits.
ZIG_FLAGS = (
    "-target", "wasm32-freestanding",
    "-mcpu=mvp+bulk_memory+mutable_globals",
    "-O", "ReleaseSafe",
    "-fstrip",
    "-fno-entry",
    "--stack", "65536",
    "--export=" + abi.ENTRY_EXPORT,
    "--export=" + abi.ASYNC_BUF_EXPORT,
    # as C's --export-dynamic does: the host reads it to tell a shadow-stack overflow
    # (stack_overflow) from any other out-of-bounds trap
    "--export=" + abi.STACK_POINTER_EXPORT,
)

#: The files that make a directory a Zig agent, in the order they are looked for.
ZIG_ENTRY_FILES = ("agent.zig", "main.zig")


def compile_zig(entry: Path) -> bytes:
    """Compile a Zig agent (``entry``: its ``agent.zig`` or ``main.zig``) into a raw wasm module.

    The agent imports the SDK as ``@import("torpor")`` and may import other files of
    its directory. Zig runs in the agent's directory, so a compile error names the
    agent's file as ``agent.zig:LINE:COL``; the same limits as the C compiler apply.
    """
    if not entry.is_file():
        raise ToolchainError(f"{entry}: no such Zig source")
    limits = isolation.cc_limits()
    with tempfile.TemporaryDirectory(prefix="torpor-build-") as tmp:
        out = Path(tmp) / "agent.wasm"
        args = [
            "build-exe", *ZIG_FLAGS,
            "--dep", "torpor", "--dep", "agent", f"-Mroot={ZIG_SDK_DIR / 'start.zig'}",
            f"-Mtorpor={ZIG_SDK_DIR / 'torpor.zig'}",
            "--dep", "torpor", f"-Magent={entry.name}",
            f"-femit-bin={out}",
        ]
        return _run_zig(args, out, limits, language="Zig", cwd=entry.parent)


def _run_zig(args: list[str], out: Path, limits: isolation.Limits, *, language: str, cwd: Path | None = None) -> bytes:
    """Run ``python -m ziglang ARGS`` in the toolchain's child process and read ``out``."""
    cpu = isolation.cpu_seconds_for(limits, os.cpu_count() or 1)  # the compiler may use every core
    cmd = isolation.worker_command("zig", str(limits.memory_bytes), str(cpu), *args)
    try:
        fin = isolation.run_child(cmd, input=b"", timeout_s=limits.timeout_s, env=isolation.worker_env(),
                                  cwd=None if cwd is None else str(cwd))
    except OSError as exc:  # pragma: no cover - broken install
        raise ToolchainError(f"cannot run the compiler: {exc}") from exc
    if fin.timed_out:
        raise ToolchainError(f"the {language} compiler did not finish within {limits.timeout_text()} and was stopped")
    if fin.returncode != 0:
        raise _compile_failure(fin, limits, language=language)
    return out.read_bytes()


_CC_OOM = re.compile(r"out of memory|OutOfMemory|Buffer allocation failed|bad_alloc|Cannot allocate memory|MemoryError")


# Zig's diagnostics: ``agent.zig:12:5: error: expected ';' after statement``.
_ZIG_ERROR = re.compile(r"^(?P<where>[^\s:][^:\n]*\.zig:\d+:\d+): error: (?P<what>.+)$", re.MULTILINE)


def _compile_failure(fin: isolation.Finished, limits: isolation.Limits, *, language: str = "C") -> ToolchainError:
    """The typed error for a compiler that failed: a compile error, a limit or a crash."""
    err = fin.stderr.strip()
    if "No module named ziglang" in err:
        return ToolchainError(f"the {language} toolchain is missing: run `pip install ziglang` (or reinstall torpor)")
    if _CC_OOM.search(err) or fin.returncode == isolation.EXIT_NO_MEMORY:
        return ToolchainError(f"the {language} compiler ran out of memory under its limit of {limits.memory_text()}")
    sig = fin.signal_name
    crash = re.search(r"clang frontend command failed (?:with exit code (\d+)|due to signal)", err)
    if sig is None and crash is not None:
        code = int(crash.group(1) or 0)
        sig = _signal_name(code - 128) if code > 128 else "a signal"
    if sig is not None:
        return ToolchainError(
            f"the {language} compiler crashed ({sig}) under its limits of {limits.memory_text()} and "
            f"{limits.timeout_text()}; raise them if the build needs more"
            + (f":\n{err}" if err else "")
        )
    first = _ZIG_ERROR.search(err) if language == "Zig" else None
    if first is not None:  # the first error's file and line lead, the compiler's full report follows
        return ToolchainError(f"Zig compilation failed at {first['where']}: {first['what']}\n{err}")
    return ToolchainError(f"{language} compilation failed:\n" + err)


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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
