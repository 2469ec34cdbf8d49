"""The native helper builder: compiled once by Zig into the cache, loaded with ctypes,
and a clear fallback (None plus the reason) when it cannot be."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from snapshots import native_build

ROOT = Path(__file__).resolve().parent.parent


def _unique() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def test_builds_once_into_the_cache_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORPOR_NATIVE", raising=False)
    src = tmp_path / "add.c"
    src.write_text("int tp_add(int a, int b) { return a + b; }\n")
    name = _unique()
    lib = native_build.load(name, src)
    assert lib is not None
    lib.tp_add.restype = ctypes.c_int
    assert lib.tp_add(40, 2) == 42
    built = list((tmp_path / "cache").glob(f"{name}-*"))
    assert len(built) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    assert native_build.status()[name].startswith("native (")
    # The same source is not rebuilt: the file is reused as it is.
    mtime = built[0].stat().st_mtime_ns
    assert native_build.load(name, src) is lib
    assert native_build._library_path(name, src.read_bytes()) == built[0]
    assert built[0].stat().st_mtime_ns == mtime


def test_a_compile_error_falls_back_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_NATIVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORPOR_NATIVE", raising=False)
    src = tmp_path / "broken.c"
    src.write_text("int tp_broken(void) { return undefined_name; }\n")
    name = _unique()
    assert native_build.load(name, src) is None
    why = native_build.status()[name]
    assert why.startswith("pure Python") and "undefined_name" in why
    assert not list((tmp_path / "cache").glob("*"))  # nothing half-written left behind


def test_disabled_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORPOR_NATIVE", "0")
    src = tmp_path / "x.c"
    src.write_text("int tp_x(void) { return 1; }\n")
    name = _unique()
    assert native_build.load(name, src) is None
    assert native_build.status()[name] == "disabled by TORPOR_NATIVE=0"


def test_pure_python_host_runs_an_agent_end_to_end(tmp_path: Path) -> None:
    """With the native helpers off, a real agent still hibernates at every call and resumes."""
    code = (
        "import json, sys\n"
        "from snapshots import delta\n"
        "from host.runtime import Host\n"
        "from bench.rig import load_bundle\n"
        "assert delta._kernels() is None\n"
        "import anyio\n"
        "async def main():\n"
        "    with Host(sys.argv[1], warm_idle_s=0) as h:\n"
        "        r = await h.run(load_bundle('steps'), {'n': 5})\n"
        "        print(json.dumps({'status': r.status, 'output': r.output, 'checkpoints': r.checkpoints}))\n"
        "anyio.run(main)\n"
    )
    env = {**__import__("os").environ, "TORPOR_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    out = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["output"] == {"sum": 15, "last": 5}
    assert out["checkpoints"] >= 5


def test_doctor_reports_the_native_helpers() -> None:
    """`torpor doctor --json` says whether the fast paths are in use, and why not."""
    def doctor(**env: str) -> dict[str, object]:
        proc = subprocess.run([sys.executable, "-m", "host.cli", "doctor", "--json"], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env={**__import__("os").environ, **env})
        assert proc.returncode == 0, proc.stderr
        return __import__("json").loads(proc.stdout)

    off = doctor(TORPOR_NATIVE="0")
    assert off["fast_paths"] is False
    assert off["native"] == {"delta_kernels": "disabled by TORPOR_NATIVE=0", "memory_pool": "disabled by TORPOR_NATIVE=0"}
    on = doctor(TORPOR_ENGINE="dense")
    assert on["engine_profile"] == "dense" and on["durability"] in ("sync", "process")
    if str(on["native"]["delta_kernels"]).startswith("native"):  # type: ignore[index]
        assert on["fast_paths"] is (str(on["native"]["memory_pool"]).startswith("native"))  # type: ignore[index]
    proc = subprocess.run([sys.executable, "-m", "host.cli", "doctor"], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**__import__("os").environ, "TORPOR_DURABILITY": "bogus"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "TORPOR_DURABILITY" in proc.stderr
