"""The durable-execution promise: SIGKILL the host at random moments, resume, lose nothing, repeat nothing.

`steps` adds each `kv.incr` result to a sum kept in C locals. If a recorded
call ran again, `last` would pass 200; if state were lost, `sum` would be off.

The moment of each kill is drawn at random along the run — as a random number
of checkpoints already written, plus random jitter, watched from outside the
host through LMDB — so that kills land mid-run however loaded the machine is.
A few trials kill at a random time right after start (before the first
checkpoint, during spawn or compilation).
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

import lmdb
from conftest import BundleFactory

TRIALS = 20
EARLY_TRIALS = 3
N = 200


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "host.cli", *args]


class _Watcher:
    """Counts the checkpoints a running host has committed, reading its LMDB from outside."""

    def __init__(self, db_dir: Path) -> None:
        self.db_dir = db_dir
        self.env: lmdb.Environment | None = None

    def count(self) -> int:
        if self.env is None:
            if not (self.db_dir / "data.mdb").exists():
                return 0
            try:
                self.env = lmdb.open(str(self.db_dir), max_dbs=32, readonly=True, lock=True)
            except lmdb.Error:
                self.close()
                return 0
        try:
            with self.env.begin() as txn:  # a named db opened in a read txn is valid only in it
                return int(txn.stat(self.env.open_db(b"checkpoints", txn=txn, create=False))["entries"])
        except lmdb.Error:  # e.g. the host grew its map: reopen on the next look
            self.close()
            return 0

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
        self.env = None


def test_sigkill_then_resume_all(bundles: BundleFactory, tmp_path: Path) -> None:
    bundle = str(bundles.example("steps"))
    rng = random.Random(1234)
    killed_mid_run = 0
    for trial in range(TRIALS):
        store = tmp_path / f"s{trial}"
        proc = subprocess.Popen(_cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(store), "--json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if trial < EARLY_TRIALS:
            time.sleep(rng.uniform(0.0, 0.5))
        else:
            target = rng.randint(1, N - 10)
            watcher = _Watcher(store / "db")
            deadline = time.monotonic() + 60
            while proc.poll() is None and watcher.count() < target and time.monotonic() < deadline:
                time.sleep(0.001)
            watcher.close()
            time.sleep(rng.uniform(0, 0.002))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_run += 1
        proc.communicate(timeout=60)

        if not (store / "db").is_dir():  # killed before the store existed: nothing to resume, nothing lost
            continue
        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True, text=True, timeout=120)
        resumed = json.loads(res.stdout)
        if resumed:
            assert len(resumed) == 1, resumed
            final = resumed[0]
        else:  # nothing to resume: killed before the agent was recorded, or after it finished
            rows = json.loads(subprocess.run(_cli("ps", "--store", str(store), "--json"), capture_output=True,
                                             text=True, timeout=60).stdout)
            if not rows:
                continue
            final = json.loads(subprocess.run(_cli("inspect", rows[0]["agent_id"], "--store", str(store), "--json"),
                                              capture_output=True, text=True, timeout=60).stdout)
        assert final["status"] == "completed", (trial, res.stdout, res.stderr, final.get("error"))
        assert final["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, final["output"])
    assert killed_mid_run >= TRIALS - EARLY_TRIALS, f"only {killed_mid_run} trials killed the host mid-run"
