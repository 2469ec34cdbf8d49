"""The store contract on LMDB and on the fleet store (NATS), then LmdbStore on real LMDB files: growth, error cases."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import snapshots.lmdb_store as lmdb_store_mod
from snapshots import (
    BLOB_BUCKETS,
    AgentStore,
    CheckpointExists,
    CheckpointInfo,
    LmdbStore,
    NotFound,
    StoreError,
    StoreFull,
    StoreUnavailable,
    WriteTxn,
)


@pytest.fixture
def store(any_store: AgentStore) -> AgentStore:
    """The contract tests below run on LMDB and on the fleet store (``conftest.any_store``)."""
    return any_store


def test_agents_crud_and_order(store: AgentStore) -> None:
    def fill(t: WriteTxn) -> None:
        for aid in ["b", "a", "ab", "é", "a-1"]:
            t.put_agent({"agent_id": aid, "state": "hibernated", "n": len(aid)})

    store.transact(fill)
    with store.read() as r:
        assert r.get_agent("ab") == {"agent_id": "ab", "state": "hibernated", "n": 2}
        assert r.get_agent("zz") is None
        assert [a["agent_id"] for a in r.iter_agents()] == ["a", "a-1", "ab", "b", "é"]

    store.transact(lambda t: t.put_agent({"agent_id": "a", "state": "running"}))
    store.transact(lambda t: t.delete_agent("b"))
    with store.read() as r:
        assert r.get_agent("a") == {"agent_id": "a", "state": "running"}
        assert r.get_agent("b") is None
    with pytest.raises(NotFound, match="no agent 'b'"):
        store.transact(lambda t: t.delete_agent("b"))
    store.transact(lambda t: t.delete_agent("b", missing_ok=True))


def test_checkpoints_ordered_per_agent_and_immutable(store: AgentStore) -> None:
    def fill(t: WriteTxn) -> None:
        for seq in (2, 1, 300, 256):
            t.put_checkpoint("a", seq, b"A%d" % seq, float(seq))
        t.put_checkpoint("ab", 1, b"AB", 0.5)  # an agent whose id extends "a"

    store.transact(fill)
    with store.read() as r:
        assert [c.seq for c in r.list_checkpoints("a")] == [1, 2, 256, 300]
        assert r.list_checkpoints("a")[0] == CheckpointInfo(seq=1, size=2, created_at=1.0)
        assert r.latest_checkpoint("a") == 300
        assert r.latest_checkpoint("ab") == 1
        assert r.latest_checkpoint("aa") is None
        assert r.latest_checkpoint("zzz") is None
        assert r.get_checkpoint("a", 256) == b"A256"
        assert r.get_checkpoint("a", 3) is None
    with pytest.raises(CheckpointExists, match="immutable"):
        store.transact(lambda t: t.put_checkpoint("a", 2, b"other", 9.0))
    with store.read() as r:
        assert r.get_checkpoint("a", 2) == b"A2"
    assert store.transact(lambda t: t.prune_checkpoints("a", keep_from=256)) == 2
    with store.read() as r:
        assert [c.seq for c in r.list_checkpoints("a")] == [256, 300]
        assert r.latest_checkpoint("ab") == 1


def test_journal_and_purge(store: AgentStore) -> None:
    def fill(t: WriteTxn) -> None:
        t.put_agent({"agent_id": "a"})
        for call in (3, 1, 2):
            t.put_journal("a", call, {"call": call, "result": "ok"})
        t.put_journal("ab", 1, {"other": True})
        t.put_checkpoint("a", 1, b"x", 0.0)

    store.transact(fill)
    with store.read() as r:
        assert [c for c, _ in r.iter_journal("a")] == [1, 2, 3]
        assert r.get_journal("a", 2) == {"call": 2, "result": "ok"}
        assert r.get_journal("a", 9) is None
    store.transact(lambda t: t.delete_agent("a", purge=True))
    with store.read() as r:
        assert list(r.iter_journal("a")) == []
        assert r.list_checkpoints("a") == []
        assert r.get_journal("ab", 1) == {"other": True}


def test_kv_and_incr(store: AgentStore) -> None:
    assert store.transact(lambda t: t.kv_incr("rate", "agent-1:http", 1)) == 1
    assert store.transact(lambda t: t.kv_incr("rate", "agent-1:http", 41)) == 42
    assert store.transact(lambda t: t.kv_incr("rate", "agent-1:http", -2)) == 40

    def fill(t: WriteTxn) -> None:
        t.kv_set("rate", "agent-2:sql", b"7")
        t.kv_set("rate2", "agent-1:x", b"other namespace")
        t.kv_set("rate", "zzz", b"")

    store.transact(fill)
    with store.read() as r:
        assert r.kv_get("rate", "agent-1:http") == b"40"
        assert r.kv_keys("rate") == ["agent-1:http", "agent-2:sql", "zzz"]
        assert r.kv_keys("rate", "agent-1") == ["agent-1:http"]
        assert r.kv_keys("rate2") == ["agent-1:x"]
    assert store.transact(lambda t: t.kv_delete("rate", "zzz")) is True
    assert store.transact(lambda t: t.kv_delete("rate", "zzz")) is False
    store.transact(lambda t: t.kv_set("rate", "bad", b"nope"))
    with pytest.raises(StoreError, match="not a decimal integer"):
        store.transact(lambda t: t.kv_incr("rate", "bad", 1))


def test_blobs(store: AgentStore) -> None:
    assert "audit" in BLOB_BUCKETS
    store.transact(lambda t: t.put_blob("bundles", "agent.wasm", b"\0asm"))
    store.transact(lambda t: [t.put_blob("audit", f"000{i}", b"e%d" % i) for i in range(3)])
    with store.read() as r:
        assert r.get_blob("bundles", "agent.wasm") == b"\0asm"
        assert r.get_blob("audit", "agent.wasm") is None
        assert list(r.iter_blobs("audit")) == [("0000", b"e0"), ("0001", b"e1"), ("0002", b"e2")]
    assert store.transact(lambda t: t.delete_blob("bundles", "agent.wasm")) is True
    with pytest.raises(ValueError, match="unknown blob bucket 'secrets'"):
        store.transact(lambda t: t.put_blob("secrets", "k", b"v"))


def test_invalid_ids_refused(store: AgentStore) -> None:
    with pytest.raises(ValueError, match="NUL"):
        store.transact(lambda t: t.put_agent({"agent_id": "a\x00b"}))
    with pytest.raises(ValueError, match="non-empty"):
        store.transact(lambda t: t.put_checkpoint("", 1, b"", 0.0))
    with pytest.raises(ValueError, match="allows"):
        store.transact(lambda t: t.put_agent({"agent_id": "x" * 600}))
    with pytest.raises(ValueError, match="counts from 1"):
        store.transact(lambda t: t.put_checkpoint("a", 0, b"", 0.0))


def test_failed_transaction_writes_nothing(store: AgentStore) -> None:
    def boom(t: WriteTxn) -> None:
        t.put_agent({"agent_id": "half"})
        raise RuntimeError("agent crashed mid-write")

    with pytest.raises(RuntimeError):
        store.transact(boom)
    with pytest.raises(RuntimeError), store.write() as w:
        w.put_agent({"agent_id": "half2"})
        raise RuntimeError("x")
    with store.read() as r:
        assert r.get_agent("half") is None and r.get_agent("half2") is None


def test_write_context_manager(store: AgentStore) -> None:
    with store.write() as w:
        w.put_agent({"agent_id": "w"})
    with store.read() as r:
        assert r.get_agent("w") == {"agent_id": "w"}


def test_readers_see_a_snapshot(store: AgentStore) -> None:
    store.transact(lambda t: t.kv_set("ns", "k", b"1"))
    with store.read() as r:
        store.transact(lambda t: t.kv_set("ns", "k", b"2"))  # another thread's view in real life
        assert r.kv_get("ns", "k") == b"1"
    with store.read() as r:
        assert r.kv_get("ns", "k") == b"2"


def test_map_grows_from_tiny(tmp_path: Path) -> None:
    blob = os.urandom(300)
    with LmdbStore.open(tmp_path / "tiny", map_size=64 * 1024) as s:
        for i in range(200):
            s.transact(
                lambda t, i=i: (
                    t.put_checkpoint(f"agent-{i:04d}", 1, blob, 0.0),
                    t.put_agent({"agent_id": f"agent-{i:04d}"}),
                )
            )
        big = os.urandom(200_000)
        s.transact(lambda t: t.put_blob("bundles", "big", big))  # one write larger than the map
        assert s.grows >= 2 and s.map_size > 64 * 1024
        with s.read() as r:
            assert len(list(r.iter_agents())) == 200
            assert r.get_checkpoint("agent-0199", 1) == blob
            assert r.get_blob("bundles", "big") == big
    with LmdbStore.open(tmp_path / "tiny") as s, s.read() as r:  # the grown size persisted
        assert r.get_checkpoint("agent-0000", 1) == blob


def test_write_cm_grows_and_asks_for_retry(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "tiny", map_size=64 * 1024) as s:
        before = s.map_size
        with pytest.raises(StoreError, match="has been grown"), s.write() as w:
            w.put_blob("bundles", "big", os.urandom(100_000))
        assert s.map_size > before


def test_grow_refused_when_disk_too_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with LmdbStore.open(tmp_path / "s", map_size=64 * 1024) as s:
        fake = shutil._ntuple_diskusage(10**9, 10**9, 0)  # type: ignore[attr-defined]
        monkeypatch.setattr(lmdb_store_mod.shutil, "disk_usage", lambda _p: fake)
        with pytest.raises(StoreFull, match="free disk space"):
            s.transact(lambda t: t.put_blob("bundles", "big", os.urandom(200_000)))
        with s.read() as r:
            assert r.get_blob("bundles", "big") is None


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="does not exist"):
        LmdbStore.open(tmp_path / "nope", create=False)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        LmdbStore.open(tmp_path / "nope", readonly=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnavailable, match="not a directory"):
        LmdbStore.open(tmp_path / "file")


def test_open_twice_in_one_process(tmp_path: Path) -> None:
    with (
        LmdbStore.open(tmp_path / "s"),
        pytest.raises(StoreUnavailable, match="already open in this process"),
    ):
        LmdbStore.open(tmp_path / "s")
    LmdbStore.open(tmp_path / "s").close()  # released on close


def test_readonly_open(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s") as s:
        s.transact(lambda t: t.put_agent({"agent_id": "a"}))
    with LmdbStore.open(tmp_path / "s", readonly=True) as ro:
        with ro.read() as r:
            assert r.get_agent("a") == {"agent_id": "a"}
        with pytest.raises(StoreUnavailable, match="read-only"):
            ro.transact(lambda t: t.put_agent({"agent_id": "b"}))


@contextlib.contextmanager
def mounted_tmpfs(where: Path, options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) to make a tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_directory(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        try:
            with pytest.raises(StoreUnavailable, match="not writable"):
                LmdbStore.open(d)
        finally:
            d.chmod(0o755)
        return
    with mounted_tmpfs(tmp_path / "ro", "size=1m,ro") as d:  # root ignores permission bits
        with pytest.raises(StoreUnavailable, match="not writable"):
            LmdbStore.open(d)
        with pytest.raises(StoreUnavailable, match="cannot create"):
            LmdbStore.open(d / "sub")


def test_disk_full_is_store_full_and_atomic(tmp_path: Path) -> None:
    with (
        mounted_tmpfs(tmp_path / "full", "size=256k") as d,
        LmdbStore.open(d / "s", map_size=8 << 20) as s,
    ):
        s.transact(lambda t: t.put_agent({"agent_id": "before"}))
        committed = 0
        with pytest.raises(StoreFull, match=r"disk under store .* is full"):
            for i in range(1000):
                s.transact(
                    lambda t, i=i: (
                        t.put_agent({"agent_id": f"a{i}"}),
                        t.put_blob("audit", f"{i}", os.urandom(3000)),
                    )
                )
                committed = i + 1
        with s.read() as r:
            assert r.get_agent("before") is not None
            assert r.get_agent(f"a{committed}") is None  # the failed one left nothing behind
            assert r.get_blob("audit", f"{committed}") is None
            assert committed == 0 or r.get_agent(f"a{committed - 1}") is not None


def test_closed_store(tmp_path: Path) -> None:
    s = LmdbStore.open(tmp_path / "s")
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.transact(lambda t: None)
