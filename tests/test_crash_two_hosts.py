"""Two host processes on one store at once, one SIGKILLed mid-run: the other finishes
untouched, ``resume --all`` finishes the killed one's agent, nothing lost or run twice.

How a host uses a second core (``torpor bench steps`` measures it): a process per core on
the same LMDB store, each claiming its own agents. Their commits interleave under LMDB's
writer lock, and at ``sync`` each process syncs what the other left unsynced before it
writes over it (``snapshots.lmdb_store``, ``snapshots.synced_mark``). `steps` sums each
``kv.incr`` result in C locals: a recorded call run again would push ``last`` past N, a
lost one would break ``sum``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BundleFactory, store_entries


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


# N: the calls of each run, long enough that both runs' agents are recorded (two CLI start-ups
# apart) before the first ends: at `process` a call is a fraction of a `sync` one.
@pytest.mark.parametrize(("durability", "trials", "N"), [("sync", 3, 200), ("process", 2, 2000)])
def test_one_of_two_hosts_killed_mid_run(bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         durability: str, trials: int, N: int) -> None:
    bundle = str(bundles.example("steps"))
    monkeypatch.delenv("TORPOR_CHECKPOINT_EVERY", raising=False)
    env = {**os.environ, "TORPOR_DURABILITY": durability}
    warm = tmp_path / "warm"
    subprocess.run(_cli("run", bundle, "--input", json.dumps({"n": 0}), "--store", str(warm), "--json"),
                   check=True, capture_output=True, timeout=300)
    rng = random.Random(7)
    killed_mid_run = 0
    for trial in range(trials):
        store = tmp_path / f"s{trial}"
        # The store exists before the two start, as it would beside a running server, with the
        # compiled module in its cache (a kill is not a compile) and the warm-up's agent.
        shutil.copytree(warm, store)
        run = _cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(store), "--json",
                   "--durability", durability)
        victim = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        other = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while victim.poll() is None and store_entries(store / "db", b"agents") < 3 and time.monotonic() < deadline:
            time.sleep(0.001)  # both runs' agents recorded
        target = store_entries(store / "db", b"checkpoints") + rng.randint(5, N // 2)  # then both runs' calls, interleaved
        while victim.poll() is None and store_entries(store / "db", b"checkpoints") < target and time.monotonic() < deadline:
            time.sleep(0.001)
        killed = victim.poll() is None
        if killed:
            os.kill(victim.pid, signal.SIGKILL)
        victim.communicate(timeout=60)
        out, err = other.communicate(timeout=120)
        assert other.returncode == 0, err
        assert json.loads(out)["output"] == {"sum": N * (N + 1) // 2, "last": N}
        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True, text=True,
                             timeout=120, env=env)
        assert res.returncode == 0, res.stderr
        resumed = json.loads(res.stdout)
        # Killed with its agent finished (the process was closing) leaves nothing to resume.
        assert len(resumed) <= (1 if killed else 0), resumed
        killed_mid_run += len(resumed)
        if resumed:
            assert resumed[0]["status"] == "completed", resumed[0]
            assert resumed[0]["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, resumed[0]["output"])
        rows = json.loads(subprocess.run(_cli("ps", "--store", str(store), "--json"), capture_output=True, text=True,
                                         timeout=60, env=env).stdout)
        assert sorted(r["status"] for r in rows) == ["completed"] * 3, rows
        verify = subprocess.run(_cli("audit", "verify", "--store", str(store), "--json"), capture_output=True,
                                text=True, timeout=60, env=env)
        assert verify.returncode == 0, verify.stdout + verify.stderr
    assert killed_mid_run >= trials - 1, f"only {killed_mid_run} of {trials} trials killed a host mid-run"
