"""A power loss during a `sync`-level commit's one sync: the store rolls back to the commit before.

Real LMDB files throughout. The torn write is made on the files a real `sync`-level store
wrote: commit k is synced, then commit k+1 is made and the store closed; every page that
commit k+1 wrote (the pages of data.mdb that differ from the file as it was after commit
k, meta pages aside) is zeroed, with its meta page left in place, as if the power went
during its ``fdatasync`` after the meta page reached the disk and before its pages did.
A marker of another boot stands for the writer that had the store open.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import lmdb
import pytest

from host.cli import app as cli
from snapshots import LmdbStore, StoreCorrupt, StoreError, StoreSuspect, meta_pages, unflushed
from snapshots.lmdb_store import DURABILITY_ENV

OTHER_BOOT = str(uuid.UUID(int=0x5678))  # stands for the boot during which the power went

pytestmark = pytest.mark.skipif(unflushed.boot_id() is None, reason="no /proc boot id on this system")


@pytest.fixture(autouse=True)
def _default_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DURABILITY_ENV, raising=False)


def _commit_k(t: Any) -> None:
    for i in range(40):
        t.put_agent({"agent_id": f"a{i:02d}", "status": "suspended", "step": 1})
        t.put_journal(f"a{i:02d}", 1, {"tool": "kv.incr", "state": "done", "pad": "x" * 200})
    t.kv_set("ns", "k", b"committed at k")


def _commit_k1(t: Any) -> None:
    for i in range(0, 40, 3):
        t.put_agent({"agent_id": f"a{i:02d}", "status": "suspended", "step": 2})
        t.put_journal(f"a{i:02d}", 2, {"tool": "kv.incr", "state": "done", "pad": "y" * 200})
    t.put_agent({"agent_id": "late", "status": "running"})
    t.kv_set("ns", "k", b"committed at k+1")


def _torn_store(path: Path, level: str = "sync", cut: bool = False) -> tuple[int, bytes]:
    """A store whose last commit (k+1) lost its pages, and a marker of another boot.

    ``cut``: the file's growth was lost too (it ends where commit k left it). Returns
    commit k+1's txn id and data.mdb as commit k left it."""
    with LmdbStore.open(path, durability="sync") as store:
        store.transact(_commit_k)  # synced before it returns
        after_k = (path / "data.mdb").read_bytes()
        store.transact(_commit_k1)
    newer, _ = meta_pages.newer_older(meta_pages.read_metas(path / "data.mdb"))
    data = bytearray((path / "data.mdb").read_bytes())
    psize = newer.psize
    torn = 0
    for start in range(2 * psize, len(data), psize):
        old = after_k[start : start + psize]
        if data[start : start + psize] != old.ljust(psize, b"\0"):
            data[start : start + psize] = bytes(psize)
            torn += 1
    assert torn >= 2  # commit k+1 wrote pages (a leaf or two, branch and root pages)
    if cut:
        assert len(data) > len(after_k)  # commit k+1 grew the file
        del data[len(after_k):]
    (path / "data.mdb").write_bytes(data)
    unflushed.write_marker(path, level, boot=OTHER_BOOT, pid=4242, start=777, opened_at=1_700_000_000.0)
    return newer.txnid, after_k


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().out


def _markers(path: Path) -> list[str]:
    d = path / unflushed.MARKER_DIR
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# -- the meta pages --------------------------------------------------------------------------
def test_read_metas_agrees_with_lmdb_and_roll_back_then_undo(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), sync=False)
    for i in range(3):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v")
    last = int(env.info()["last_txnid"])
    env.close()
    m0, m1 = meta_pages.read_metas(tmp_path / "data.mdb")
    assert (m0.pgno, m1.pgno) == (0, 1) and {m0.txnid, m1.txnid} == {last, last - 1}
    newer, older = meta_pages.newer_older((m0, m1))
    assert newer.txnid == last and newer.index == last & 1 and newer.main_entries == 3 and older.main_entries == 2
    before = (tmp_path / "data.mdb").read_bytes()

    done = meta_pages.roll_back(tmp_path)
    assert (done.dropped_txn, done.current_txn) == (last, last - 1)
    a, b = meta_pages.read_metas(tmp_path / "data.mdb")
    assert a.txnid == b.txnid == last - 1 and (a.pgno, b.pgno) == (0, 1)  # the copy names its own page
    with pytest.raises(StoreError, match="no earlier snapshot"):
        meta_pages.roll_back(tmp_path)
    env = lmdb.open(str(tmp_path))
    assert int(env.info()["last_txnid"]) == last - 1
    with env.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"k0", b"k1"]
    env.close()

    meta_pages.undo(done)
    assert (tmp_path / "data.mdb").read_bytes() == before


def test_after_a_rollback_the_next_commit_restores_the_two_snapshots(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), sync=False)
    for i in range(3):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v")
    env.close()
    meta_pages.roll_back(tmp_path)
    env = lmdb.open(str(tmp_path))
    with env.begin(write=True) as txn:
        txn.put(b"x", b"v")
    env.close()
    m0, m1 = meta_pages.read_metas(tmp_path / "data.mdb")
    assert (m0.txnid, m1.txnid) == (2, 3)  # each page again holds the txn of its parity
    env = lmdb.open(str(tmp_path))
    with env.begin() as txn:
        assert [k for k, _ in txn.cursor()] == [b"k0", b"k1", b"x"]
    env.close()


def test_roll_back_refuses_a_store_open_in_another_process(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path))
    for i in range(2):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v")
    env.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys, lmdb
            env = lmdb.open(sys.argv[1]); print("open", flush=True); sys.stdin.readline()
        """), str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        before = (tmp_path / "data.mdb").read_bytes()
        with pytest.raises(StoreError, match="open in another process"):
            meta_pages.roll_back(tmp_path)
        assert (tmp_path / "data.mdb").read_bytes() == before
    finally:
        holder.kill()
        holder.wait(timeout=10)


@pytest.mark.parametrize("damage", ["not lmdb", "short"])
def test_read_metas_refuses_what_is_not_an_lmdb_file(tmp_path: Path, damage: str) -> None:
    env = lmdb.open(str(tmp_path))
    env.close()
    raw = (tmp_path / "data.mdb").read_bytes()
    (tmp_path / "data.mdb").write_bytes(b"\x07" * 8192 if damage == "not lmdb" else raw[:5000])
    with pytest.raises(StoreCorrupt):
        meta_pages.read_metas(tmp_path / "data.mdb")


# -- torpor store check ----------------------------------------------------------------------
@pytest.mark.parametrize("cut", [False, True], ids=["pages-zeroed", "file-cut-short"])
def test_check_rolls_back_a_torn_last_commit_and_the_store_opens_at_commit_k(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: bool) -> None:
    path = tmp_path / "db"
    dropped, _ = _torn_store(path, cut=cut)
    with pytest.raises(StoreSuspect):
        LmdbStore.open(path)

    code, out = _cli(capsys, "store", "check", "--store", str(path))
    assert code == 0, out
    assert f"rolled back the last commit (txn {dropped}, never acknowledged)" in out
    assert f"at txn {dropped - 1}" in out and "ok:" in out and "rerun with --accept" in out
    code, out = _cli(capsys, "store", "check", "--store", str(path), "--accept", "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["rollback"] is None and len(data["cleared"]) == 1

    with LmdbStore.open(path) as store, store.read() as r:  # opens: no longer suspect
        agents = {a["agent_id"]: a for a in r.iter_agents()}
        assert sorted(agents) == [f"a{i:02d}" for i in range(40)]  # commit k's, all; not k+1's "late"
        assert {a["step"] for a in agents.values()} == {1}
        assert r.kv_get("ns", "k") == b"committed at k"
        assert [r.get_journal(f"a{i:02d}", 2) for i in range(0, 40, 3)] == [None] * 14
        assert all(r.get_journal(f"a{i:02d}", 1) is not None for i in range(40))
    with LmdbStore.open(path) as store:  # and takes new commits
        store.transact(lambda t: t.kv_set("ns", "k", b"after"))
        assert store.check().ok


def test_check_leaves_a_store_whose_both_trees_are_damaged_as_it_was(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "db"
    dropped, after_k = _torn_store(path)
    # Damage commit k's tree too, in a page commit k+1 did not write: a leaf of the journal.
    data = bytearray((path / "data.mdb").read_bytes())
    psize = 4096
    pages = [s for s in range(2 * psize, len(after_k), psize)
             if data[s : s + psize] == after_k[s : s + psize] and b"x" * 200 in after_k[s : s + psize]]
    assert pages
    data[pages[0] : pages[0] + psize] = bytes(psize)
    (path / "data.mdb").write_bytes(data)
    before = (path / "data.mdb").read_bytes()

    code, out = _cli(capsys, "store", "check", "--store", str(path), "--accept", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["cleared"] == [] and report["accepted"] is False
    assert report["rollback"]["rolled_back"] is False and report["rollback"]["dropped_txn"] == dropped
    assert f"previous snapshot (txn {dropped - 1}) fails the check too" in report["rollback"]["message"]
    assert "nothing was changed" in report["rollback"]["message"]
    assert (path / "data.mdb").read_bytes() == before and len(_markers(path)) == 1
    with pytest.raises(StoreSuspect):
        LmdbStore.open(path)


def test_a_clean_store_is_never_touched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    healthy = tmp_path / "healthy"
    with LmdbStore.open(healthy) as store:
        store.transact(_commit_k)
        store.transact(_commit_k1)
    before = (healthy / "data.mdb").read_bytes()
    code, out = _cli(capsys, "store", "check", "--store", str(healthy), "--repair", "--accept", "--json")
    assert code == 0 and json.loads(out)["rollback"] is None
    assert (healthy / "data.mdb").read_bytes() == before

    # A broken newest tree without a marker is not a cut-off sync: reported, never rolled back.
    torn = tmp_path / "torn"
    _torn_store(torn)
    for name in _markers(torn):
        (torn / unflushed.MARKER_DIR / name).unlink()
    before = (torn / "data.mdb").read_bytes()
    code, out = _cli(capsys, "store", "check", "--store", str(torn), "--repair", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and report["rollback"] is None and report["suspect"] == []
    assert (torn / "data.mdb").read_bytes() == before


def test_a_process_level_writers_store_is_rolled_back_only_with_repair(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "db"
    dropped, _ = _torn_store(path, level="process")
    before = (path / "data.mdb").read_bytes()
    code, out = _cli(capsys, "store", "check", "--store", str(path), "--json")
    assert code == 1 and json.loads(out)["rollback"] is None
    assert (path / "data.mdb").read_bytes() == before

    code, out = _cli(capsys, "store", "check", "--store", str(path), "--repair", "--accept")
    assert code == 0, out
    assert f"rolled back the last commit (txn {dropped}, not flushed before the restart)" in out
    assert "accepted: cleared 1 marker" in out
    with LmdbStore.open(path) as store, store.read() as r:
        assert r.get_agent("late") is None and r.kv_get("ns", "k") == b"committed at k"


def test_a_torn_free_list_that_no_record_read_touches_is_found_and_rolled_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "db"
    with LmdbStore.open(path) as store:
        store.transact(_commit_k)
        after_k = (path / "data.mdb").read_bytes()
        store.transact(_commit_k1)
    assert meta_pages.verify_structure(path) == []  # py-lmdb >= 3.0 (pyproject) has the verifier
    newer, older = meta_pages.newer_older(meta_pages.read_metas(path / "data.mdb"))
    psize = newer.psize
    at = newer.free_root * psize
    assert newer.free_root != older.free_root and after_k[at : at + psize] != (path / "data.mdb").read_bytes()[at : at + psize]
    with open(path / "data.mdb", "r+b") as f:  # commit k+1's free-list page never made it
        f.seek(at)
        f.write(bytes(psize))
    with LmdbStore.open(path, readonly=True) as store:
        assert store.check().ok  # every record still reads: the records alone would pass it
    unflushed.write_marker(path, "sync", boot=OTHER_BOOT, pid=4242, start=777, opened_at=1_700_000_000.0)

    code, out = _cli(capsys, "store", "check", "--store", str(path), "--accept", "--json")
    data = json.loads(out)
    assert code == 0 and data["rollback"]["rolled_back"] is True and data["rollback"]["dropped_txn"] == newer.txnid
    with LmdbStore.open(path) as store:  # the next commits allocate from commit k's free list
        for i in range(5):
            store.transact(lambda t, i=i: t.kv_set("ns", f"after{i}", b"v" * 3000))
        with store.read() as r:
            assert r.kv_get("ns", "k") == b"committed at k" and r.get_agent("late") is None
    assert meta_pages.verify_structure(path) == []
