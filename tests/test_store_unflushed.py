"""Unflushed markers: a `process`-level store cut off by a machine restart is detected.

Real LMDB files and real processes. A machine restart is simulated by a marker that
names another boot id (written by the module's own writer); a killed writer is a real
subprocess killed with SIGKILL. ``check`` runs on a store the real host wrote, then on
the same store with a bit flipped in one checkpoint, and on one with a broken B-tree.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import BundleFactory

from host.cli import app as cli
from snapshots import (
    LmdbStore,
    StoreError,
    StoreSuspect,
    StoreUnavailable,
    diff_memory,
    encode_snapshot,
    unflushed,
)
from snapshots.format import GlobalValue, Snapshot
from snapshots.lmdb_store import DURABILITY_ENV

ROOT = Path(__file__).resolve().parent.parent
OTHER_BOOT = str(uuid.UUID(int=0x1234))  # stands for an earlier boot of this machine

pytestmark = pytest.mark.skipif(unflushed.boot_id() is None, reason="no /proc boot id on this system")


@pytest.fixture(autouse=True)
def _no_env_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DURABILITY_ENV, raising=False)


def _markers(store: Path) -> list[str]:
    d = store / unflushed.MARKER_DIR
    return sorted(os.listdir(d)) if d.is_dir() else []


def _earlier_boot(store: Path, pid: int = 4242) -> Path:
    return unflushed.write_marker(store, "process", boot=OTHER_BOOT, pid=pid, start=777,
                                  opened_at=1_700_000_000.0)


def _record(agent_id: str, seq: int) -> bytes:
    pristine = bytes(65536)
    memory = bytearray(pristine)
    memory[1024:1040] = b"agent state %04d" % seq
    snap = Snapshot(agent_id=agent_id, seq=seq, module_digest="ab" * 32, abi_version=1,
                    memory=diff_memory(pristine, memory), globals=(GlobalValue("__stack_pointer", "i32", 4096),),
                    async_buf=(8192, 1024), entry="torpor_main", pending={"tool": "kv.incr", "call": seq},
                    usage={"fuel_used": seq}, created_at=1.0)
    return encode_snapshot(snap)


def _fill(store: LmdbStore) -> None:
    def write(t: Any) -> None:
        for agent in ("a", "b"):
            t.put_agent({"agent_id": agent, "status": "suspended", "checkpoints": 2})
            for seq in (1, 2):
                t.put_checkpoint(agent, seq, _record(agent, seq), float(seq))
                t.put_journal(agent, seq, {"tool": "kv.incr", "state": "done"})
        t.kv_set("ns", "k", b"v")

    store.transact(write)


def _flip_checkpoint(db: Path, agent: str, seq: int) -> None:
    """Flip one bit in the middle of a stored checkpoint, behind the store's back."""
    env = lmdb.open(str(db), max_dbs=32)
    try:
        ckpt = env.open_db(b"checkpoints")
        key = agent.encode() + b"\x00" + struct.pack(">Q", seq)
        with env.begin(write=True) as txn:
            value = bytearray(txn.get(key, db=ckpt))
            value[len(value) // 2] ^= 0x10
            txn.put(key, bytes(value), db=ckpt)
    finally:
        env.close()


# -- markers while open ---------------------------------------------------------------------
def test_process_level_store_is_marked_while_open_and_not_after_close(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = LmdbStore.open(path, durability="process", flush_interval_s=3600)
    try:
        names = _markers(path)
        assert len(names) == 1
        body = json.loads((path / unflushed.MARKER_DIR / names[0]).read_text())
        assert body["boot"] == unflushed.boot_id() and body["pid"] == os.getpid()
        assert body["start"] == unflushed.process_start(os.getpid()) and body["durability"] == "process"
        assert names[0] == f"{body['boot']}_{body['pid']}_{body['start']}.json"
        store.transact(lambda t: t.kv_set("ns", "k", b"v"))
        assert store.unflushed_commits == 1 and len(_markers(path)) == 1
    finally:
        store.close()
    assert _markers(path) == []
    # A sync-level writer marks too (a power loss during a commit's sync may tear it).
    with LmdbStore.open(path, durability="sync") as store:
        store.transact(lambda t: t.kv_set("ns", "k2", b"v"))
        (name,) = _markers(path)
        assert json.loads((path / unflushed.MARKER_DIR / name).read_text())["durability"] == "sync"
    assert _markers(path) == []
    with LmdbStore.open(path, readonly=True) as store:  # a reader never marks
        assert _markers(path) == []


def test_a_failed_final_flush_keeps_the_marker(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = LmdbStore.open(path, durability="process", flush_interval_s=3600)
    store.transact(lambda t: t.kv_set("ns", "k", b"v"))
    real = store._env

    class FailingSync:
        def sync(self, force: bool = False) -> None:
            raise lmdb.Error("EIO")

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    store._env = FailingSync()  # type: ignore[assignment]
    with pytest.raises(StoreUnavailable, match=r"flushing store .* failed"):
        store.close()
    assert len(_markers(path)) == 1  # a later power loss must still be detected


def test_a_forked_child_leaves_its_parents_marker(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = LmdbStore.open(path, durability="process", flush_interval_s=3600)
    try:
        marker = _markers(path)
        pid = os.fork()
        if pid == 0:  # the child closes the store it inherited
            try:
                store.close()
            finally:
                os._exit(0 if _markers(path) == marker else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _markers(path) == marker
    finally:
        store.close()
    assert _markers(path) == []


# -- an earlier boot ------------------------------------------------------------------------
def test_a_marker_from_an_earlier_boot_makes_the_store_suspect(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LmdbStore.open(path) as store:
        store.transact(lambda t: t.kv_set("ns", "k", b"before"))
    marker = _earlier_boot(path)
    for readonly in (False, True):
        with pytest.raises(StoreSuspect) as info:
            LmdbStore.open(path, readonly=readonly)
        msg = str(info.value)
        assert "process 4242" in msg and "earlier boot" in msg and "torpor store check" in msg
        assert f"--store {path}" in msg and "--accept" in msg and marker.name in msg
        assert isinstance(info.value, StoreUnavailable) and info.value.code == "store_suspect"
    with LmdbStore.open(path, durability="process", accept_suspect=True) as store, store.read() as r:
        assert r.kv_get("ns", "k") == b"before"
        assert len(_markers(path)) == 2  # its own, and the suspect one, which it leaves
    assert _markers(path) == [marker.name]  # accepting opens; only a check clears it
    with pytest.raises(StoreSuspect):
        LmdbStore.open(path)


@pytest.mark.parametrize(("name", "body"), [
    ("junk.txt", b"hello"),
    (f"{OTHER_BOOT}_1_2.json", b"{not json"),
    (f"{uuid.UUID(int=7)}_1_2.json", json.dumps({"boot": OTHER_BOOT, "pid": 1, "start": 2, "host": "h",
                                                 "opened_at": 1.0, "durability": "process"}).encode()),
])
def test_a_malformed_marker_makes_the_store_suspect_naming_the_file(tmp_path: Path, name: str, body: bytes) -> None:
    path = tmp_path / "s"
    LmdbStore.open(path).close()
    (path / unflushed.MARKER_DIR).mkdir(exist_ok=True)  # a writable open made it
    (path / unflushed.MARKER_DIR / name).write_bytes(body)
    with pytest.raises(StoreSuspect, match=re.escape(f"marker file {name} is malformed")):
        LmdbStore.open(path)
    boot = unflushed.boot_id()
    assert boot is not None
    (current,) = unflushed.scan(path, boot).suspect
    assert current.marker is None and current.path.name == name


# -- this boot ------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import os, sys
    from snapshots import LmdbStore

    store = LmdbStore.open(sys.argv[1], durability="process", flush_interval_s=3600)
    store.transact(lambda t: t.put_agent({"agent_id": "agent", "seq": 1}))
    print(os.listdir(os.path.join(sys.argv[1], "unflushed"))[0], store.unflushed_commits, flush=True)
    sys.stdin.readline()  # never comes: SIGKILL
    """
)


def test_a_killed_writers_marker_is_removed_and_its_commits_are_there(tmp_path: Path) -> None:
    path = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        name, unflushed_commits = proc.stdout.readline().split()
        assert name.split("_")[1] == str(proc.pid) and unflushed_commits == "1"
        with LmdbStore.open(path) as store:  # a live writer's marker is left alone (beside this one's)
            assert name in _markers(path) and len(_markers(path)) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with LmdbStore.open(path, readonly=True) as store:  # a reader opens, and removes nothing
        assert _markers(path) == [name]
    with LmdbStore.open(path) as store, store.read() as r:
        assert r.get_agent("agent") == {"agent_id": "agent", "seq": 1}  # the page cache kept it
    assert _markers(path) == []


def test_a_reused_pid_is_not_mistaken_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s"
    LmdbStore.open(path).close()
    boot = unflushed.boot_id()
    assert boot is not None
    start = unflushed.process_start(os.getpid())
    assert start is not None
    old = unflushed.write_marker(path, "process", boot=boot, pid=os.getpid(), start=start - 1)
    assert unflushed.scan(path, boot).stale == (old,)  # our pid, another start: that writer is gone
    LmdbStore.open(path).close()
    assert _markers(path) == []


def test_without_a_boot_id_there_are_no_markers_and_no_refusals(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s"
    LmdbStore.open(path).close()
    marker = _earlier_boot(path)
    monkeypatch.setattr(unflushed, "BOOT_ID_PATH", tmp_path / "no-such-file")
    assert unflushed.boot_id() is None
    with LmdbStore.open(path, durability="process") as store:
        store.transact(lambda t: t.kv_set("ns", "k", b"v"))
        assert _markers(path) == [marker.name]  # no marker of its own
    with LmdbStore.open(path, readonly=True) as store:
        assert store.check().suspect == ()


# -- check ----------------------------------------------------------------------------------
def test_check_passes_a_healthy_store_and_names_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LmdbStore.open(path) as store:
        _fill(store)
        report = store.check()
    assert report.ok and report.problems == () and report.suspect == ()
    assert report.counts["agents"] == 2 and report.counts["checkpoints"] == 4
    assert report.counts["journal"] == 4 and report.counts["kv"] == 1 and report.counts["_torpor"] == 2  # format, sealed
    _flip_checkpoint(path, "b", 2)
    _earlier_boot(path)
    with LmdbStore.open(path, readonly=True, accept_suspect=True) as store:
        report = store.check()
        (problem,) = report.problems
        assert not report.ok and report.counts["checkpoints"] == 4
        assert (problem.database, problem.agent_id, problem.seq) == ("checkpoints", "b", 2)
        assert "agent 'b' seq 2" in str(problem) and "checksum" in problem.message
        assert [s.marker.pid for s in report.suspect if s.marker is not None] == [4242]
        data = report.to_dict()
        assert data["ok"] is False and data["problems"][0]["agent_id"] == "b" and data["problems"][0]["seq"] == 2
        assert data["suspect"][0]["marker"]["pid"] == 4242
        with pytest.raises(StoreError, match="1 problem"):
            store.clear_suspect(report)
    assert len(_markers(path)) == 1


def test_check_reports_undecodable_records(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LmdbStore.open(path) as store:
        _fill(store)
    env = lmdb.open(str(path), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.put(b"a", b"{torn", db=env.open_db(b"agents", txn=txn))
        txn.put(b"a\x00" + struct.pack(">Q", 9), b"[1]", db=env.open_db(b"journal", txn=txn))
    env.close()
    with LmdbStore.open(path) as store:
        problems = store.check().problems
    assert [(p.database, p.agent_id, p.seq) for p in problems] == [("agents", "a", None), ("journal", "a", 9)]


def test_check_reports_a_broken_btree_instead_of_raising(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with LmdbStore.open(path) as store:
        store.transact(lambda t: [t.kv_set("ns", f"k{i:05d}", b"v" * 100) for i in range(300)])
        store.transact(lambda t: t.put_agent({"agent_id": "a"}))
    # Point the last child of every branch page (here: kv's root) past the end of the file,
    # as a crash that lost a page write could. LMDB page: pgno u64, pad u16, flags u16,
    # lower u16, upper u16, then node offsets; a branch node starts with its child's pgno.
    data = bytearray((path / "data.mdb").read_bytes())
    page = 4096
    broken = 0
    for start in range(2 * page, len(data), page):
        flags, lower = struct.unpack_from("<HH", data, start + 10)
        if flags == 0x01:  # P_BRANCH
            last = struct.unpack_from("<H", data, start + 16 + (lower - 16) - 2)[0]
            struct.pack_into("<HHH", data, start + last, 0xFFFF, 0x0FFF, 0)
            broken += 1
    assert broken
    (path / "data.mdb").write_bytes(data)
    with LmdbStore.open(path, readonly=True) as store:
        report = store.check()
    (problem,) = report.problems
    assert problem.database == "kv" and "MDB_PAGE_NOTFOUND" in problem.message
    assert 0 < report.counts["kv"] < 300
    assert report.counts["agents"] == 1 and report.counts["_torpor"] == 2  # the others still checked (format, sealed)


# -- the CLI --------------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_store_check_suspect_accept_and_corrupt(bundles: BundleFactory, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    bundle = str(bundles.example("steps"))
    code, out, _ = _cli(capsys, "run", bundle, "--input", '{"n": 3}', "--store", str(store), "--json",
                        "--durability", "process")
    assert code == 0, out
    agent = json.loads(out)["agent_id"]
    assert _markers(store / "db") == []  # closed cleanly

    code, out, _ = _cli(capsys, "store", "check", "--store", str(store), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["problems"] == [] and data["suspect"] == []
    assert data["counts"]["agents"] == 1 and data["counts"]["checkpoints"] >= 3 and data["counts"]["journal"] >= 3
    assert data["store"] == str(store / "db") and data["accepted"] is False

    _earlier_boot(store / "db")
    code, _, err = _cli(capsys, "run", bundle, "--input", '{"n": 1}', "--store", str(store))
    assert code == 2 and err.startswith("torpor: error[store_suspect]:") and "torpor store check" in err
    code, out, _ = _cli(capsys, "ps", "--store", str(store), "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == "store_suspect"

    code, out, _ = _cli(capsys, "store", "check", "--store", str(store))  # the human summary
    assert code == 0 and "suspect markers (1)" in out and "process 4242" in out and "ok:" in out
    assert len(_markers(store / "db")) == 1  # checking alone does not clear
    code, out, _ = _cli(capsys, "store", "check", "--store", str(store / "db"), "--accept")  # the message's path
    assert code == 0 and "cleared 1 marker" in out
    assert _markers(store / "db") == []
    code, out, _ = _cli(capsys, "ps", "--store", str(store), "--json")
    assert code == 0 and [r["agent_id"] for r in json.loads(out)] == [agent]

    _flip_checkpoint(store / "db", agent, 2)
    _earlier_boot(store / "db")
    code, out, _ = _cli(capsys, "store", "check", "--store", str(store), "--accept", "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["accepted"] is False and data["cleared"] == []
    assert [(p["database"], p["agent_id"], p["seq"]) for p in data["problems"]] == [("checkpoints", agent, 2)]
    assert len(_markers(store / "db")) == 1
    code, out, _ = _cli(capsys, "store", "check", "--store", str(store), "--accept")
    assert code == 1 and f"checkpoints agent '{agent}' seq 2:" in out and "not accepted" in out
    code, _, err = _cli(capsys, "ps", "--store", str(store))
    assert code == 2 and "error[store_suspect]" in err


def test_cli_store_check_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(capsys, "store", "check", "--store", str(tmp_path / "nowhere"))
    assert code == 2 and err.startswith("torpor: error[invalid_config]: no Torpor store at")
    assert not (tmp_path / "nowhere").exists()


def test_a_failed_open_leaves_no_marker_and_no_open_path(tmp_path: Path) -> None:
    path = tmp_path / "s"
    store = LmdbStore.open(path, durability="process")
    (mine,) = _markers(path)
    with pytest.raises(StoreUnavailable, match="already open in this process"):
        LmdbStore.open(path, durability="process")
    assert _markers(path) == [mine]  # the first handle's marker is untouched
    store.transact(lambda t: t._txn.put(b"format", b"99", db=t._dbs["_torpor"]))
    store.close()
    assert _markers(path) == []
    for _ in range(2):  # the second time must fail the same way: not "already open"
        with pytest.raises(StoreUnavailable, match="newer than this Torpor"):
            LmdbStore.open(path, durability="process")
        assert _markers(path) == []


def test_cli_store_check_reports_a_store_that_makes_lmdb_abort(tmp_path: Path) -> None:
    """Some corrupt pages make LMDB fail an assertion and abort the process instead of
    returning an error: the check runs in a child, so that is reported as a finding."""
    path = tmp_path / "db"
    with LmdbStore.open(path) as store:
        store.transact(lambda t: [t.kv_set("ns", f"k{i:05d}", b"v" * 100) for i in range(300)])
    data = bytearray((path / "data.mdb").read_bytes())
    page = 4096
    pristine = bytes(data)
    leaves = [start for start in range(2 * page, len(data), page)
              if struct.unpack_from("<H", data, start + 10)[0] == 0x02 and b"k00" in data[start : start + page]]
    assert len(leaves) > 4
    # A kv leaf in the middle whose flags a torn write zeroed: the cursor walking from
    # its left neighbour asserts IS_LEAF and aborts.
    struct.pack_into("<H", data, leaves[len(leaves) // 2] + 10, 0)
    (path / "data.mdb").write_bytes(data)

    def check() -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "host.cli", "store", "check", "--store", str(path), "--json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        report: dict[str, Any] = json.loads(proc.stdout)
        assert report["ok"] is False and report["accepted"] is False
        return report

    (problem,) = check()["problems"]
    assert "LMDB stopped the checking process" in problem["message"] and "SIG" in problem["message"]
    # Zeroed leaves of the main database (which names the others): the store cannot even
    # be opened, which is a finding too, not an error of the checker.
    data = bytearray(pristine)
    for start in range(2 * page, len(data), page):
        if struct.unpack_from("<H", data, start + 10)[0] == 0x02 and b"checkpoints" in data[start : start + page]:
            struct.pack_into("<H", data, start + 10, 0)
    (path / "data.mdb").write_bytes(data)
    (problem,) = check()["problems"]
    assert problem["message"].startswith("LMDB cannot open the store") and "MDB_CORRUPTED" in problem["message"]
