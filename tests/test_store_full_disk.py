"""A full disk is always ``store_full``, and once there is room again ``resume --all``
finishes every agent with the right output, nothing committed lost, no call run twice.

Two ways to fill a disk, both through the real CLI: a small real filesystem (tmpfs,
where this process may mount one), and a file size limit (RLIMIT_FSIZE) on the child
process. LMDB reports a write that the disk cut short as EIO, not ENOSPC; both must come
out as ``store_full``, wherever the write fails (a commit, the map, the host key).

The agents are `steps`: n transactional kv.incr calls whose answers they sum, so the
output {"sum": n(n+1)/2, "last": n} proves that every call ran exactly once.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import BundleFactory

from snapshots import lmdb_store


def _output(n: int) -> dict[str, int]:
    return {"sum": n * (n + 1) // 2, "last": n}


def torpor(*args: str, preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "error[internal]" not in proc.stderr and '"internal"' not in proc.stdout, proc.stdout + proc.stderr
    return proc


def _file_size_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG, or short (EIO)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _cut_off_runs(bundle: Path, store: Path, n: int, runs: int, limit: Callable[[], None] | None) -> None:
    """Start ``runs`` agents until the disk refuses: each run must end in store_full."""
    for _ in range(runs):
        proc = torpor("run", str(bundle), "--input", json.dumps({"n": n}), "--store", str(store), "--json",
                      preexec_fn=limit)
        assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:])
        error = json.loads(proc.stdout)["error"]
        assert error["code"] == "store_full", error


def _agents(store: Path) -> dict[str, dict[str, Any]]:
    proc = torpor("ps", "--store", str(store), "--json")
    assert proc.returncode == 0, proc.stderr
    return {r["agent_id"]: r for r in json.loads(proc.stdout)}


def _finish_all(store: Path, n: int, before: dict[str, dict[str, Any]]) -> None:
    """``resume --all`` completes every agent the store has, each exactly once through its calls."""
    proc = torpor("resume", "--all", "--store", str(store), "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = {r["agent_id"]: r for r in json.loads(proc.stdout)}
    assert set(results) == set(before), (results.keys(), before.keys())
    for aid, res in results.items():
        assert res["status"] == "completed" and res["output"] == _output(n), res
        assert res["tool_calls"] == n and res["checkpoints"] >= before[aid]["checkpoints"], (res, before[aid])
    assert all(a["status"] == "completed" for a in _agents(store).values())
    verified = torpor("audit", "verify", "--store", str(store), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stdout[-2000:]


def test_a_file_size_limit_is_store_full_and_resume_all_finishes_every_agent(
        bundles: BundleFactory, tmp_path: Path) -> None:
    n = 600  # about 2 MiB of store: more than the limit lets one agent write
    limit = _file_size_limit(1 << 20)
    _cut_off_runs(bundles.example("steps"), tmp_path, n, 3, limit)
    before = _agents(tmp_path)
    assert before and all(a["status"] in ("running", "suspended") for a in before.values()), before
    assert max(a["checkpoints"] for a in before.values()) > 50  # cut off mid-run, not only at spawn

    # Still no room: every agent reports store_full and stays as it was (nothing failed).
    still = torpor("resume", "--all", "--store", str(tmp_path), "--json", preexec_fn=limit)
    for res in json.loads(still.stdout):
        assert res["error"]["code"] == "store_full" and res["status"] in ("running", "suspended"), res
    assert {a: r["status"] for a, r in _agents(tmp_path).items()} == {a: r["status"] for a, r in before.items()}

    _finish_all(tmp_path, n, before)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, grown later by remounting; skipped where this process may not mount."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the file size limit test covers the rest")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or made.returncode}); the file size "
                    "limit test covers the rest")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_filesystem_is_store_full_and_resume_all_finishes_after_space_is_freed(
        bundles: BundleFactory, small_disk: Path) -> None:
    n = 2000  # about 7 MiB of store: far more than the filesystem holds
    store = small_disk / "store"
    _cut_off_runs(bundles.example("steps"), store, n, 3, None)
    before = _agents(store)
    assert before and all(a["status"] in ("running", "suspended") for a in before.values()), before
    assert shutil.disk_usage(small_disk).free < 64 << 10  # it really filled up
    grown = subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], capture_output=True, text=True)
    assert grown.returncode == 0, grown.stderr
    _finish_all(store, n, before)


# -- what counts as a full disk ----------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_every_full_disk_error_is_store_full(tmp_path: Path, code: int) -> None:
    exc = lmdb.Error(f"mdb_txn_commit: {os.strerror(code)}")
    assert lmdb_store._is_disk_full(exc, tmp_path)
    assert lmdb_store._is_disk_full(OSError(code, os.strerror(code)), tmp_path)


def test_a_short_write_is_full_only_when_there_is_no_room(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eio = lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.EIO)}")
    (tmp_path / "data.mdb").write_bytes(b"")
    assert not lmdb_store._is_disk_full(eio, tmp_path)  # room to spare: a real I/O error
    real = os.statvfs(tmp_path)

    class Full:
        f_bavail, f_frsize = 3, real.f_frsize

    monkeypatch.setattr(lmdb_store.os, "statvfs", lambda _p: Full())
    assert lmdb_store._is_disk_full(eio, tmp_path)
    assert not lmdb_store._is_disk_full(lmdb.Error("mdb_txn_commit: MDB_CORRUPTED"), tmp_path)
