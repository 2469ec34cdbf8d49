"""Two real host processes on one store, and a SIGKILL right after a commit."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from snapshots import LmdbStore

WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from snapshots import LmdbStore

    path, n, go = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    store = LmdbStore.open(path, map_size=64 * 1024)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    pad = os.urandom(1500)  # forces both processes to grow the map while racing
    for i in range(n):
        def step(t, i=i):
            t.kv_set("pad", f"{os.getpid()}-{i}", pad)
            return t.kv_incr("counters", "shared", 1)
        store.transact(step)
        with store.read() as r:  # readers too must follow the other process's growth
            assert int(r.kv_get("counters", "shared")) >= i + 1
    print("grows", store.grows, store.adopted, flush=True)
    store.close()
    """
)


def test_two_processes_increment_without_lost_updates(tmp_path: Path) -> None:
    path = tmp_path / "shared"
    LmdbStore.open(path, map_size=64 * 1024).close()
    go = tmp_path / "go"
    n = 150
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(n), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    grown = adopted = 0
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        _, g, a = out.split()
        grown, adopted = grown + int(g), adopted + int(a)
    assert grown >= 1
    with LmdbStore.open(path) as store, store.read() as r:
        assert r.kv_get("counters", "shared") == str(2 * n).encode()
        assert len(r.kv_keys("pad")) == 2 * n
        assert store.map_size > 64 * 1024


KILLED = textwrap.dedent(
    """
    import sys, time
    from snapshots import LmdbStore

    store = LmdbStore.open(sys.argv[1])
    store.transact(lambda t: (t.put_checkpoint("agent", 1, b"state-1", 1.0), t.put_agent({"agent_id": "agent", "seq": 1})))
    print("committed", flush=True)
    with store.read():  # die holding a reader slot and the lock file open
        time.sleep(60)
    """
)


def test_commit_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "committed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with LmdbStore.open(path) as store:
        with store.read() as r:
            assert r.get_checkpoint("agent", 1) == b"state-1"
            assert r.get_agent("agent") == {"agent_id": "agent", "seq": 1}
        # The writer is not wedged by the killed one's lock: the write finishes (on a thread,
        # so that a wedged one fails the test instead of hanging it).
        wrote = threading.Thread(target=store.transact,
                                 args=(lambda t: t.put_checkpoint("agent", 2, b"state-2", 2.0),), daemon=True)
        wrote.start()
        wrote.join(timeout=120)
        assert not wrote.is_alive(), "the write waited on the killed writer's lock"
