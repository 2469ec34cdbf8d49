"""The durable-execution promise: SIGKILL the host at random moments, resume, lose nothing, repeat nothing.

`steps` adds each `kv.incr` result to a sum kept in C locals. If a recorded
call ran again, `last` would pass 200; if state were lost, `sum` would be off.
`steps-js` does the same in JavaScript (its sum lives in an async function's frame, a
QuickJS heap object), with fewer trials: a JS module's compile is paid once, in a warm-up
store whose compile cache each trial's store starts with.
`steps-zig` does the same in Zig (its locals live in Zig's frames and shadow stack),
in fewer trials, with the same warm compile cache, and so does `steps-py` in Python (its
sum lives in a coroutine's frame, a CPython heap object).

The moment of each kill is drawn at random along the run — as a random number
of checkpoints already written, plus random jitter, watched from outside the
host through LMDB — so that kills land mid-run however loaded the machine is.
A few trials kill at a random time right after start (before the first
checkpoint, during spawn or compilation).

Both durability levels: ``sync`` (every commit on disk before the agent goes on) and,
in fewer trials, ``process`` (commits end in the OS page cache, which a SIGKILL of the
host does not touch). ``run`` gets the level by its ``--durability`` flag and
``resume``/``ps``/``inspect`` by ``$TORPOR_DURABILITY``, so both routes are exercised.
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

import lmdb
import pytest
from conftest import BundleFactory

#: (example, n, durability, trials, of which early kills): `sync` is the default and gets the most.
LEVELS = [("steps", 200, "sync", 20, 3), ("steps", 200, "process", 6, 1),
          ("steps-js", 50, "sync", 5, 1), ("steps-js", 50, "process", 2, 0),
          ("steps-zig", 100, "sync", 4, 1), ("steps-py", 50, "sync", 3, 1)]


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


@pytest.mark.parametrize(("example", "N", "durability", "trials", "early_trials"), LEVELS)
def test_sigkill_then_resume_all(bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 example: str, N: int, durability: str, trials: int, early_trials: int) -> None:
    bundle = str(bundles.example(example))
    rng = random.Random(1234)
    killed_mid_run = 0
    env = {**os.environ, "TORPOR_DURABILITY": durability}
    monkeypatch.delenv("TORPOR_DURABILITY", raising=False)  # `run` must get it from its flag
    warm = tmp_path / "warm"
    subprocess.run(_cli("run", bundle, "--input", json.dumps({"n": 0}), "--store", str(warm), "--json"),
                   check=True, capture_output=True, timeout=300)
    for trial in range(trials):
        store = tmp_path / f"s{trial}"
        shutil.copytree(warm / "cache", store / "cache")  # the compiled module: a kill is not a compile
        proc = subprocess.Popen(_cli("run", bundle, "--input", json.dumps({"n": N}), "--store", str(store), "--json",
                                     "--durability", durability),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if trial < early_trials:
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
        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True, text=True,
                             timeout=120, env=env)
        resumed = json.loads(res.stdout)
        if resumed:
            assert len(resumed) == 1, resumed
            final = resumed[0]
        else:  # nothing to resume: killed before the agent was recorded, or after it finished
            rows = json.loads(subprocess.run(_cli("ps", "--store", str(store), "--json"), capture_output=True,
                                             text=True, timeout=60, env=env).stdout)
            if not rows:
                continue
            final = json.loads(subprocess.run(_cli("inspect", rows[0]["agent_id"], "--store", str(store), "--json"),
                                              capture_output=True, text=True, timeout=60, env=env).stdout)
        assert final["status"] == "completed", (trial, res.stdout, res.stderr, final.get("error"))
        assert final["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, final["output"])
    assert killed_mid_run >= trials - early_trials, f"only {killed_mid_run} trials killed the host mid-run"
