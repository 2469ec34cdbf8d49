"""The durable-execution promise on the grouped path: many agents in one host, SIGKILL, resume.

tests/test_crash_resume.py kills a host running one agent, whose commits go through the
group committer one at a time. Here one host process runs eight `steps` agents at once
(``Host.run`` in one task group), so their commits share transactions and syncs (the
committer's batches), and each run's spawn is left unsynced for its first checkpoint's
commit to cover (``durable=False``). The process is SIGKILLed once the store holds a
random number of checkpoints; ``torpor resume --all`` must then finish every agent the
store holds with the exact sum: a lost commit or a recorded call run again would change it.
Both durability levels; ``sync`` gets more trials.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import BundleFactory
from test_crash_resume import _cli, _Watcher

AGENTS, N = 8, 60

_HOST = textwrap.dedent("""
    import sys, anyio
    from host.runtime.host import Host
    from host.sandbox import bundle
    b = bundle.load(sys.argv[1])
    host = Host(sys.argv[2], durability=sys.argv[3])
    async def main():
        async with anyio.create_task_group() as tg:
            for _ in range({agents}):
                tg.start_soon(host.run, b, {{"n": {n}}})
    anyio.run(main)
    host.close()
    print("done", flush=True)
""").format(agents=AGENTS, n=N)


@pytest.mark.parametrize(("durability", "trials"), [("sync", 3), ("process", 1)])
def test_sigkill_mid_group_commit_then_resume_all(bundles: BundleFactory, tmp_path: Path, durability: str,
                                                  trials: int) -> None:
    bundle = str(bundles.example("steps"))
    rng = random.Random(19)
    env = {**os.environ, "TORPOR_DURABILITY": durability}
    killed = 0
    for trial in range(trials):
        store = tmp_path / f"s{trial}"
        proc = subprocess.Popen([sys.executable, "-c", _HOST, bundle, str(store), durability],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        target = rng.randint(AGENTS, AGENTS * N // 2)  # checkpoints in the store, all agents' together
        watcher = _Watcher(store / "db")
        deadline = time.monotonic() + 120
        while proc.poll() is None and watcher.count() < target and time.monotonic() < deadline:
            time.sleep(0.001)
        watcher.close()
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]

        res = subprocess.run(_cli("resume", "--all", "--store", str(store), "--json"), capture_output=True,
                             text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        rows = json.loads(subprocess.run(_cli("ps", "--store", str(store), "--json"), capture_output=True,
                                         text=True, timeout=60, env=env).stdout)
        assert 1 <= len(rows) <= AGENTS, rows  # a spawn lost to the kill was never acknowledged to anyone
        for row in rows:
            final = json.loads(subprocess.run(_cli("inspect", row["agent_id"], "--store", str(store), "--json"),
                                              capture_output=True, text=True, timeout=60, env=env).stdout)
            assert final["status"] == "completed", (trial, final.get("error"))
            assert final["output"] == {"sum": N * (N + 1) // 2, "last": N}, (trial, final["output"])
        verify = subprocess.run(_cli("audit", "verify", "--store", str(store), "--json"), capture_output=True,
                                text=True, timeout=120, env=env)
        assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert killed == trials, f"only {killed} of {trials} trials killed the host mid-run"
