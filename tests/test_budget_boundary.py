"""Every budget covers everything a guest can make the host hold, and the deadline fires
whatever the guest runs.

Hand-written modules (WAT) that a C compiler would never emit: a table grown by
millions of elements, 1,024 iovecs that all point at the same 64 KiB, and Asyncify
"control" exports of the module's own that never return (the host calls them holding
the GIL, which a Python epoch ticker needs). Each runs through the real CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import wasmtime
from child_rss import run_measured

from host.sandbox import abi
from host.sandbox import bundle as bundle_mod


def _custom_section(name: str, payload: bytes) -> bytes:
    def leb(n: int) -> bytes:
        out = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    body = leb(len(name)) + name.encode() + payload
    return b"\x00" + leb(len(body)) + body


def bundle_of(tmp_path: Path, wat: str, policy: str, name: str) -> Path:
    """A bundle of a hand-written module, marked as prepared (no Binaryen pass over it)."""
    module = wasmtime.wat2wasm(wat) + _custom_section(abi.ABI_SECTION, str(abi.ABI_VERSION).encode())
    path = tmp_path / f"{name}.torpor"
    path.write_bytes(bundle_mod.pack(module, policy))
    return path


def run_cli(bundle: Path, store: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], float, int]:
    """Run the bundle; the process, its wall time, and its own peak RSS in KiB."""
    argv = [sys.executable, "-m", "host.cli", "run", str(bundle), "--store", str(store), "--json", *extra]
    m = run_measured(argv, timeout=120)
    proc = subprocess.CompletedProcess(argv, m.returncode, m.stdout.decode(errors="replace"),
                                       m.stderr.decode(errors="replace"))
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and '"internal"' not in proc.stdout, proc.stdout + proc.stderr
    return proc, m.seconds, m.peak_rss // 1024


def result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


POLICY = """
[agent]
name = "{name}"
[budgets]
fuel = 1_000_000_000
memory = "2MiB"
wall_clock = "{wall}"
"""

CONTROLS_THAT_NEVER_RETURN = """
(module
  (import "torpor" "tool_call" (func $tool_call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "clock.now")
  (global $state (mut i32) (i32.const 0))
  (func (export "asyncify_start_unwind") (param i32) (global.set $state (i32.const 1)))
  (func (export "asyncify_stop_unwind") (global.set $state (i32.const 0)))
  (func (export "asyncify_start_rewind") (param i32) (loop $spin (br $spin)))
  (func (export "asyncify_stop_rewind") (global.set $state (i32.const 0)))
  (func (export "asyncify_get_state") (result i32) (global.get $state))
  (func (export "torpor_main") (result i32)
    (drop (call $tool_call (i32.const 16) (i32.const 9) (i32.const 0) (i32.const 0)))
    (i32.const 0)))
"""


def test_the_deadline_fires_inside_a_control_export_the_host_calls(tmp_path: Path) -> None:
    """The rewind call is made holding the GIL; the guest's own `asyncify_start_rewind`
    spins with fuel for hours. The 2 s wall-clock budget must end it, not the fuel."""
    policy = POLICY.format(name="spinner", wall="2s") + '[tools."clock.now"]\n'
    bundle = bundle_of(tmp_path, CONTROLS_THAT_NEVER_RETURN, policy, "spinner")
    proc, _, _ = run_cli(bundle, tmp_path / "s", "--fuel", str(10**15))
    res = result(proc)
    # Only the deadline can end it (fuel for hours; the run's timeout is the hang guard).
    assert res["status"] == "failed" and res["error"]["code"] == "deadline_exceeded", res


TABLE_GROWER = """
(module
  (import "torpor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (func (export "torpor_main") (result i32)
    (local $got i32)
    (local.set $got (table.grow $t (ref.null func) (i32.const 50000000)))
    (call $out (local.get $got))
    (i32.const 0))
  (func $out (param $v i32)
    ;; {"grew": -1} or {"grew": 1}: one digit is enough to tell
    (i32.store8 (i32.const 100) (i32.const 123))
    (i64.store (i32.const 101) (i64.const 0x3a22776572672220))
    (i32.store8 (i32.const 109) (select (i32.const 45) (i32.const 32) (i32.lt_s (local.get $v) (i32.const 0))))
    (i32.store8 (i32.const 110) (i32.const 49))
    (i32.store8 (i32.const 111) (i32.const 125))
    (drop (call $output_write (i32.const 100) (i32.const 12)))))
"""


def test_a_table_cannot_be_grown_past_the_host_limit(tmp_path: Path) -> None:
    """50 million funcref slots would be 400 MB of host memory outside the linear memory."""
    bundle = bundle_of(tmp_path, TABLE_GROWER, POLICY.format(name="tables", wall="10s"), "tables")
    proc, _, peak_kib = run_cli(bundle, tmp_path / "s")
    res = result(proc)
    assert res["status"] == "completed" and res["output"] == {"grew": -1}, res  # table.grow answered -1
    assert peak_kib < 300 * 1024, f"the host reached {peak_kib // 1024} MiB"


IOVEC_AMPLIFIER = """
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (func (export "torpor_main") (result i32)
    (local $i i32)
    ;; 1024 iovecs at 0x10000, each {ptr=0, len=65536}: the first page, 1024 times over.
    (block $done (loop $fill
      (br_if $done (i32.ge_u (local.get $i) (i32.const 1024)))
      (i32.store (i32.add (i32.const 0x10000) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
      (i32.store (i32.add (i32.const 0x10004) (i32.mul (local.get $i) (i32.const 8))) (i32.const 65536))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $fill)))
    (memory.fill (i32.const 0) (i32.const 65) (i32.const 65536))
    (local.set $i (i32.const 0))
    (block $end (loop $write
      (br_if $end (i32.ge_u (local.get $i) (i32.const 200)))
      (drop (call $fd_write (i32.const 1) (i32.const 0x10000) (i32.const 1024) (i32.const 0x12000)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $write)))
    (i32.const 0)))
"""


def test_a_vector_of_iovecs_cannot_multiply_a_small_memory(tmp_path: Path) -> None:
    """200 writes of 1,024 iovecs over one 64 KiB page: 13 GB if the host gathered it all."""
    policy = POLICY.format(name="iovecs", wall="20s") + '[wasi]\nallow = ["fd_write"]\n'
    bundle = bundle_of(tmp_path, IOVEC_AMPLIFIER, policy, "iovecs")
    proc, _, peak_kib = run_cli(bundle, tmp_path / "s")
    res = result(proc)
    assert res["status"] == "completed", res
    assert peak_kib < 300 * 1024, f"the host reached {peak_kib // 1024} MiB"
