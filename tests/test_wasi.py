"""A WASI-libc guest runs only with the WASI functions its policy grants, deterministically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from conftest import GUESTS

from host.errors import ImportNotGranted
from host.runtime import Host
from host.sandbox import bundle as bundle_mod

GRANT = '''[agent]
name = "wasi"
[wasi]
allow = ["fd_write", "fd_close", "fd_seek", "fd_fdstat_get", "clock_time_get", "random_get"]
'''


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("wasi") / "agent.wasm"
    cmd = [sys.executable, "-m", "ziglang", "cc", "--target=wasm32-wasi", "-O2", "-g0", "-mexec-model=reactor",
           "-Wl,--export=torpor_main", "-o", str(out), str(GUESTS / "wasi" / "agent.c")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_granted_wasi_runs_deterministically(module: bytes, tmp_path: Path) -> None:
    b = bundle_mod.load_bytes(bundle_mod.pack(module, GRANT))
    with Host(tmp_path) as host:
        first = anyio.run(lambda: host.run(b, {}))
        second = anyio.run(lambda: host.run(b, {}))
    assert first.status == "completed", first.error
    assert first.output == second.output  # the clock and the random source derive from fuel
    assert first.output["t"] > 0
    assert {"level": "info", "message": "hello from wasi libc"} in first.logs
    assert {"level": "warn", "message": "a warning"} in first.logs


def test_ungranted_wasi_is_refused_before_it_runs(module: bytes, tmp_path: Path) -> None:
    policy = GRANT.replace('"random_get"', "").replace(", ]", "]")
    b = bundle_mod.load_bytes(bundle_mod.pack(module, policy))
    with Host(tmp_path) as host, pytest.raises(ImportNotGranted, match="random_get"):
        anyio.run(lambda: host.run(b, {}))
