"""The toolchain cannot take the process down: every way Binaryen or the C compiler can
fail on hostile input ends as a typed error (``invalid_module`` or ``toolchain``) in a
process that lives on.

Each hostile module is generated here and is a real crasher: the first test runs
Binaryen the old way (in-process, in a throwaway interpreter) and watches that
interpreter die, by exit status 1 without a word of ``error[...]`` or by SIGABRT.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime
from conftest import EXAMPLES, ROOT

from host.errors import ConfigError, ModuleError, ToolchainError
from host.sandbox import binaryen, bundle, isolation, toolchain

HELLO_POLICY = EXAMPLES / "hello" / "policy.toml"
# What the ABI asks of every module (host/sandbox/validate.py checks it before the
# toolchain runs): the tool-call import's type, `memory` and `torpor_main` exported.
TOOL_CALL = '(import "torpor" "tool_call" (func $tc (param i32 i32 i32 i32) (result i32)))'
MEMORY = '(memory (export "memory") 1)'
CALL_WAT = "(call $tc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))"


# -- modules, generated ---------------------------------------------------------------
def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _section(ident: int, payload: bytes) -> bytes:
    return bytes([ident]) + _leb(len(payload)) + payload


def _vec(items: list[bytes]) -> bytes:
    return _leb(len(items)) + b"".join(items)


def _name(text: str) -> bytes:
    return _leb(len(text)) + text.encode()


def _module(body: bytes, *, memory_pages: int = 1, data: bytes | None = None) -> bytes:
    """An agent module (torpor.tool_call imported, ``memory`` and ``torpor_main`` exported)
    whose entry is ``body``; written byte by byte, for bodies too big for a text format."""
    types = _section(1, _vec([b"\x60\x04\x7f\x7f\x7f\x7f\x01\x7f", b"\x60\x00\x01\x7f"]))
    imports = _section(2, _vec([_name("torpor") + _name("tool_call") + b"\x00" + _leb(0)]))
    funcs = _section(3, _vec([_leb(1)]))
    memory = _section(5, _vec([b"\x00" + _leb(memory_pages)]))
    exports = _section(7, _vec([_name("torpor_main") + b"\x00" + _leb(1), _name("memory") + b"\x02" + _leb(0)]))
    fbody = b"\x00" + body + b"\x0b"
    code = _section(10, _vec([_leb(len(fbody)) + fbody]))
    datas = _section(11, _vec([b"\x00\x41\x00\x0b" + _leb(len(data)) + data])) if data is not None else b""
    return b"\0asm\x01\0\0\0" + types + imports + funcs + memory + exports + code + datas


CALL = b"\x41\x00" * 4 + b"\x10\x00"  # i32.const 0 (four times), call $tc


def tail_call() -> bytes:
    """Spec-valid: a tail call to the suspending import. Binaryen: ``Fatal: tail calls not
    yet supported in asyncify``, exit status 1."""
    return wasmtime.wat2wasm(
        f'(module {TOOL_CALL} {MEMORY} (func (export "torpor_main") (result i32)'
        " (return_call $tc (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))"
    )


def table64() -> bytes:
    """Spec-valid (memory64): a 64-bit table. Binaryen 116 cannot read it: exit status 1.
    (The module validator refuses it first, as it refuses 64-bit memories.)"""
    return wasmtime.wat2wasm(
        f'(module {TOOL_CALL} {MEMORY} (table i64 1 funcref) (func (export "torpor_main") (result i32) {CALL_WAT}))'
    )


def wide_arithmetic() -> bytes:
    """Spec-valid (wide arithmetic): ``i64.add128``, an opcode Binaryen 116 cannot read."""
    return wasmtime.wat2wasm(
        f'(module {TOOL_CALL} {MEMORY} (func (export "torpor_main") (result i32)'
        f" (i64.add128 (i64.const 1) (i64.const 2) (i64.const 3) (i64.const 4)) drop drop {CALL_WAT}))"
    )


def reference_across_call() -> bytes:
    """Spec-valid: a funcref local live across the suspending call. Asyncify: ``Fatal``."""
    return wasmtime.wat2wasm(
        f'(module {TOOL_CALL} {MEMORY} (table 1 funcref) (func (export "torpor_main") (result i32)'
        f" (local funcref) (local.set 0 (table.get (i32.const 0))) (drop {CALL_WAT}) (ref.is_null (local.get 0))))"
    )


def float_data_offset() -> bytes:
    """Invalid: a data segment placed at an f32 offset. Binaryen reads it, then its
    memory-packing pass fails an assertion: SIGABRT."""
    return wasmtime.wat2wasm(
        f'(module {MEMORY} (data (f32.const 0) "\\00\\00\\00\\00\\00\\00\\00\\00abc\\00\\00\\00\\00\\00\\00\\00\\00")'
        ' (func (export "torpor_main") (result i32) (i32.const 0)))'
    )


def truncated_hello() -> bytes:
    """A real agent cut short: Binaryen's reader ``Fatal``s, exit status 1."""
    raw = toolchain.compile_c([EXAMPLES / "hello" / "agent.c"], include_dirs=[EXAMPLES / "hello"])
    return raw[: len(raw) * 2 // 3]


def deep_expression(depth: int = 20_000) -> bytes:
    """Spec-valid and 60 KB: ``1 + (1 + (1 + ...))`` 20,000 deep. Binaryen's time grows
    with the square of the depth (6,000: about 4 s; 20,000: about 100 s)."""
    return _module(CALL + b"\x41\x01" * depth + b"\x6a" * depth)


def big_data(mib: int = 32) -> bytes:
    """Valid: a module with ``mib`` MiB of non-zero data, which Binaryen holds several
    times over (the input, its copy, the segment, the output)."""
    size = mib << 20
    return _module(CALL, memory_pages=(size >> 16) + 1, data=b"\x01" * size)


# -- the old way dies --------------------------------------------------------------------
_IN_PROCESS = textwrap.dedent(
    """
    import sys
    from host.sandbox import binaryen
    binaryen.asyncify_in_process(sys.stdin.buffer.read(), suspending_imports=["torpor.tool_call"])
    print("survived")
    """
)


@pytest.mark.parametrize(
    ("make", "death"),
    [
        (tail_call, 1),
        (table64, 1),
        (wide_arithmetic, 1),
        (reference_across_call, 1),
        (truncated_hello, 1),
        (float_data_offset, -signal.SIGABRT),
    ],
)
def test_in_process_binaryen_kills_its_process(make: Callable[[], bytes], death: int) -> None:
    """Why the worker exists: Binaryen in the calling process ends it, with no typed error."""
    proc = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS], input=make(), capture_output=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == death, proc.stderr
    assert b"survived" not in proc.stdout
    assert b"Error" not in proc.stderr  # no Python exception: the process just ended


# -- the new way: a typed error, and this very process lives on ---------------------------------
def test_pack_in_process_raises_typed_errors_and_the_caller_lives() -> None:
    policy = HELLO_POLICY.read_text()
    with pytest.raises(ModuleError, match=r"tail calls \(return_call"):
        bundle.pack(tail_call(), policy)
    with pytest.raises(ModuleError, match=r"an instruction newer than Binaryen"):
        bundle.pack(wide_arithmetic(), policy)
    with pytest.raises(ModuleError, match=r"not valid WebAssembly: type mismatch"):
        bundle.pack(float_data_offset(), policy)  # Wasmtime refuses it before Binaryen sees it
    # Straight to Binaryen, no validation first: its abort is contained in the worker.
    with pytest.raises(ToolchainError, match=r"Binaryen crashed on this module \(SIGABRT: .*MemoryPacking.*Assertion"):
        binaryen.asyncify(float_data_offset(), suspending_imports=["torpor.tool_call"])
    with pytest.raises(ModuleError, match=r"Binaryen( \d+)? cannot read the module: "):
        binaryen.asyncify(truncated_hello(), suspending_imports=["torpor.tool_call"])
    # ... and the toolchain still works in this process.
    raw = bundle.build_dir(EXAMPLES / "hello")
    assert bundle.load_bytes(raw).name == "hello"


def test_a_time_limit_stops_binaryen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(isolation.BINARYEN_TIMEOUT_ENV, "1")
    with pytest.raises(ToolchainError, match=r"did not finish within 1 s \(\$TORPOR_BINARYEN_TIMEOUT\)"):
        bundle.pack(deep_expression(), HELLO_POLICY.read_text())


# -- through the real CLI ----------------------------------------------------------------------
def torpor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host.cli", *args],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, **(env or {})},
    )


CLI_CASES = {
    "tail_call": (tail_call, {}, "invalid_module", r"uses tail calls \(return_call, return_call_indirect\)"),
    "table64": (table64, {}, "invalid_module", r"table 0 has limits flag 0x04"),
    "wide_arithmetic": (wide_arithmetic, {}, "invalid_module", r"uses an instruction newer than Binaryen"),
    "reference_across_call": (reference_across_call, {}, "invalid_module", r"reference-typed values live across a suspending call"),
    "float_data_offset": (float_data_offset, {}, "invalid_module", r"not valid WebAssembly: type mismatch"),
    "truncated_hello": (truncated_hello, {}, "invalid_module", r"malformed wasm module: section 11 declares"),
    "time_limit": (deep_expression, {"TORPOR_BINARYEN_TIMEOUT": "1s"}, "toolchain",
                   r"Binaryen did not finish within 1 s \(\$TORPOR_BINARYEN_TIMEOUT\)"),
    "memory_limit": (big_data, {"TORPOR_BINARYEN_MEMORY": "128MiB", "BINARYEN_CORES": "1"}, "toolchain",
                     r"Binaryen ran out of memory under its limit of 128 MiB of address space \(\$TORPOR_BINARYEN_MEMORY\)"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_torpor_pack_survives_hostile_modules(case: str, tmp_path: Path) -> None:
    make, env, code, message = CLI_CASES[case]
    module = tmp_path / f"{case}.wasm"
    module.write_bytes(make())
    out = tmp_path / "out.torpor"
    proc = torpor("pack", str(module), "--policy", str(HELLO_POLICY), "-o", str(out), "--json", env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)  # not a signal, not 1 or 3
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == code, error
    assert re.search(message, error["message"]), error
    assert not out.exists()
    # The toolchain still builds an agent afterwards, with the default limits.
    built = torpor("build", str(EXAMPLES / "hello"), "-o", str(tmp_path / "hello.torpor"), "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["name"] == "hello"


SLOW_C = """\
#include "torpor.h"
#define A(x) x x x x
#define B(x) A(A(x))
#define C(x) B(B(x))
#define D(x) C(C(x))
static volatile int sink;
int torpor_main(void) {
    D(A(sink += 1;))
    return torpor_outputf("{\\"n\\": %d}", sink);
}
"""


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TORPOR_CC_TIMEOUT": "1"}, r"the C compiler did not finish within 1 s \(\$TORPOR_CC_TIMEOUT\)"),
        ({"TORPOR_CC_MEMORY": "64MiB"}, r"64 MiB of address space \(\$TORPOR_CC_MEMORY\)"),
    ],
    ids=["time", "memory"],
)
def test_torpor_build_survives_a_compiler_over_its_limits(env: dict[str, str], message: str, tmp_path: Path) -> None:
    """262,144 statements at -O2 keep clang busy for minutes; 64 MiB is too little for Zig."""
    agent = tmp_path / "slow"
    agent.mkdir()
    (agent / "agent.c").write_text(SLOW_C)
    (agent / "policy.toml").write_text(HELLO_POLICY.read_text())
    proc = torpor("build", str(agent), "-o", str(tmp_path / "slow.torpor"), "--json", env=env)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "toolchain", error
    assert re.search(message, error["message"]), error
    built = torpor("build", str(EXAMPLES / "hello"), "-o", str(tmp_path / "hello.torpor"), "--json")
    assert built.returncode == 0, built.stderr


# -- how an ending is read ---------------------------------------------------------------
LIMITS = isolation.Limits(60.0, 2 << 30, isolation.BINARYEN_TIMEOUT_ENV, isolation.BINARYEN_MEMORY_ENV)


def _ended(returncode: int, stderr: str = "", timed_out: bool = False) -> isolation.Finished:
    return isolation.Finished(returncode, b"", stderr, timed_out, 0.1)


@pytest.mark.parametrize(
    ("fin", "cls", "message"),
    [
        (_ended(-signal.SIGXCPU), ToolchainError, "CPU-time limit"),
        (_ended(-signal.SIGKILL), ToolchainError, "killed by the system (SIGKILL)"),
        (_ended(-signal.SIGSEGV, "Segmentation fault"), ToolchainError, "crashed on this module (SIGSEGV"),
        (_ended(-signal.SIGABRT, "terminate called after throwing an instance of 'std::bad_alloc'"),
         ToolchainError, "ran out of memory under its limit of 2 GiB"),
        (_ended(isolation.EXIT_NO_MEMORY), ToolchainError, "ran out of memory"),
        (_ended(0, timed_out=True), ToolchainError, "did not finish within 60 s"),
        (_ended(1, "[parse exception: bad section (at 0:9)]Fatal: error in parsing wasm binary"),
         ModuleError, "cannot read the module: bad section (at 0:9)"),
        (_ended(1, "Fatal: something new"), ModuleError, "refused the module: something new"),
        (_ended(1, "Traceback ...\nImportError: no cffi"), ToolchainError, "worker failed (exit status 1): ImportError"),
    ],
)
def test_each_ending_is_a_typed_error(fin: isolation.Finished, cls: type[Exception], message: str) -> None:
    err = binaryen.failure(fin, LIMITS)
    assert type(err) is cls
    assert message in str(err)


@pytest.mark.parametrize(
    ("fin", "message"),
    [
        (_ended(1, "ImportError: No module named ziglang"), "the C toolchain is missing"),
        (_ended(1, "LLVM ERROR: out of memory\nzig: error: clang frontend command failed with exit code 134"),
         "the C compiler ran out of memory under its limit of 4 GiB"),
        (_ended(1, "zig: error: clang frontend command failed with exit code 139"), "the C compiler crashed (SIGSEGV)"),
        (_ended(-signal.SIGSEGV), "the C compiler crashed (SIGSEGV) under its limits of 4 GiB"),
        (_ended(1, "agent.c:3:1: error: unknown type name 'in'"), "C compilation failed:\nagent.c:3:1: error"),
    ],
)
def test_each_compiler_ending_is_a_typed_error(fin: isolation.Finished, message: str) -> None:
    err = toolchain._compile_failure(fin, isolation.cc_limits())
    assert type(err) is ToolchainError
    assert message in str(err)


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isolation.binaryen_limits()[:2] == (60.0, 2 << 30)
    monkeypatch.setenv("TORPOR_BINARYEN_TIMEOUT", "1m30s")
    monkeypatch.setenv("TORPOR_BINARYEN_MEMORY", "512MiB")
    monkeypatch.setenv("TORPOR_CC_TIMEOUT", "2.5")
    assert isolation.binaryen_limits()[:2] == (90.0, 512 << 20)
    assert isolation.cc_limits()[:2] == (2.5, 4 << 30)
    monkeypatch.setenv("TORPOR_CC_MEMORY", "lots")
    with pytest.raises(ConfigError, match=r"\$TORPOR_CC_MEMORY: invalid size 'lots'"):
        isolation.cc_limits()
    monkeypatch.setenv("TORPOR_BINARYEN_TIMEOUT", "-1")
    with pytest.raises(ConfigError, match=r"\$TORPOR_BINARYEN_TIMEOUT"):
        isolation.binaryen_limits()


def test_a_childs_stderr_is_kept_within_bounds() -> None:
    fin = isolation.run_child(
        [sys.executable, "-c", "import sys; sys.stderr.write('begin ' + 'x' * 1_000_000 + ' end')"],
        input=b"", timeout_s=60, env=dict(os.environ),
    )
    assert fin.returncode == 0
    assert fin.stderr.startswith("begin ") and fin.stderr.endswith(" end")
    assert len(fin.stderr) < 3 * isolation.STDERR_KEEP
