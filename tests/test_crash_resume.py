"""The durable-execution promise: SIGKILL the host at random moments, resume, lose nothing, repeat nothing.

`steps` adds each `kv.incr` result to a sum kept in C locals. If a recorded
call ran again, `last` would pass 200; if state were lost, `sum` would be off.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import BundleFactory

TRIALS = 20
N = 200


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


def test_sigkill_then_resume_all(bundles: BundleFactory, tmp_path: Path) -> None:
    bundle = str(bundles.example("steps"))
    # Calibrate: how long does an uninterrupted run take here (process start included)?
    t0 = time.monotonic()
    ref = subprocess.run(_cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(tmp_path / "ref"), "--json"),
                         capture_output=True, text=True, timeout=120)
    full = time.monotonic() - t0
    assert json.loads(ref.stdout)["output"] == {"sum": N * (N + 1) // 2, "last": N}

    rng = random.Random(1234)
    killed_mid_run = 0
    for trial in range(TRIALS):
        store = tmp_path / f"s{trial}"
        proc = subprocess.Popen(_cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(store), "--json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(0.2, 1.0) * full)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_run += 1
        proc.communicate(timeout=60)

        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True, text=True, timeout=120)
        ps = subprocess.run(_cli("ps", "--store", str(store), "--json"), capture_output=True, text=True, timeout=60)
        rows = json.loads(ps.stdout)
        if not rows:  # killed before the agent was even recorded: nothing to resume, nothing lost
            continue
        assert len(rows) == 1, rows
        info = json.loads(subprocess.run(_cli("inspect", rows[0]["agent_id"], "--store", str(store), "--json"),
                                         capture_output=True, text=True, timeout=60).stdout)
        assert info["status"] == "completed", (trial, res.stdout, res.stderr, info.get("error"))
        assert info["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, info["output"])
    assert killed_mid_run >= TRIALS // 2, f"only {killed_mid_run} trials killed the host mid-run"
