"""Content chunks: long conversations stored once, read back exactly, damage named.

The cut and the tree (``snapshots.chunks``) on their own; the LMDB store keeping long
journal entries and format-3 checkpoints as chunks; and the runtime with the
conversation agent of ``torpor bench conversation`` (a real guest, real LMDB files, a
real loopback model server): retention, compaction, fork, replay and the audit over
chunked checkpoints, and a changed or missing chunk refused at resume as
``snapshot_corrupt``.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import shutil
from array import array
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import BundleFactory

from host.runtime import Host
from host.runtime.replay import replay
from host.sandbox.execution import PendingCall
from host.trust import audit
from snapshots import chunks, lazy
from snapshots import delta as delta_mod
from snapshots import format as fmt
from snapshots.delta import MemoryDelta, apply_delta
from snapshots.errors import RecordCorrupt, SnapshotCorrupt, SnapshotError, StoreUnavailable
from snapshots.format import (
    CHUNKED_VERSION,
    Snapshot,
    chunk_ref,
    decode_snapshot,
    encode_checkpoint,
    peek_snapshot,
)
from snapshots.lmdb_store import STORE_FORMAT, LmdbStore

GUEST = Path(__file__).resolve().parents[1] / "bench" / "guests" / "conversation"
WORDS = [b"the", b"agent", b"tool", b"model", b"memory", b"turn", b"of", b"and", b"order", b"refund"]


def _text(n: int, seed: int = 1) -> bytes:
    r = random.Random(seed)
    return b" ".join(r.choice(WORDS) for _ in range(n // 4))[:n]


def _dict_store() -> tuple[dict[bytes, bytes], Any]:
    held: dict[bytes, bytes] = {}

    def put(name: bytes, content: bytes) -> None:
        held.setdefault(name, chunks.store_chunk(content))

    return held, put


# -- the cut and the tree -----------------------------------------------------------------------
@pytest.mark.parametrize("params", [chunks.DATA_CUT, chunks.INDEX_CUT])
def test_native_and_python_cuts_agree(params: tuple[int, int, int]) -> None:
    for data in (b"", b"x", os.urandom(100), os.urandom(70_000), _text(50_000), bytes(40_000)):
        ends = chunks.cut(data, params)
        assert ends == chunks._cut_py(data, *params)
        assert ends == sorted(ends) and (not data or ends[-1] == len(data))
        sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
        assert all(s <= params[2] for s in sizes)


@pytest.fixture(params=["native", "python"])
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tree read by the native per-reference kernels, and again by the Python loop."""
    if request.param == "python":
        monkeypatch.setattr(chunks, "_lib", [None])
    elif chunks._kernel() is None:
        pytest.skip("native chunk kernels unavailable: " + str(chunks.native_build.status()))
    return str(request.param)


def test_a_tree_of_many_equal_chunks_reads_back_exactly(read_path: str) -> None:
    held, put = _dict_store()
    page, text = _text(4096, seed=3), _text(9_000, seed=4)
    # equal pages and repeated runs: many references to few distinct chunks, at every level
    data = (bytes(70_000) + page * 40 + text + bytes(50_000) + page * 30 + text * 3) * 6
    ref = chunks.write_tree(data, put)
    names = list(chunks.tree_digests(ref, held.get))
    assert len(set(names)) * 3 < len(names)
    assert chunks.read_tree(ref, held.get) == data
    victim = max(set(names), key=names.count)  # the chunk referenced most often, changed
    good = held[victim]
    held[victim] = good[:-1] + bytes([good[-1] ^ 1])
    chunks.clear_cache()
    with pytest.raises(RecordCorrupt, match=victim.hex()):
        chunks.read_tree(ref, held.get)


def test_pieces_read_back_any_range_and_scatter_across_their_parts() -> None:
    if delta_mod._kernels() is None:
        pytest.skip("native delta kernels unavailable")
    parts = [b"abc", b"defgh", b"", b"ij"]
    ids = (ctypes.c_uint32 * 8)(0, 1, 0, 3, 2, 1, 3, 1)  # repeated, empty and adjacent parts
    pieces = delta_mod.Pieces(ids, parts)
    joined = b"".join(parts[i] for i in ids)
    assert len(pieces) == len(joined) and pieces.gather() == joined
    for a in range(len(joined) + 1):
        for b in range(a, len(joined) + 2):
            assert pieces.gather(a, b) == joined[a:b]
    # memory chunks 0 and 2 (of 3, 4 bytes each) from the stream's last 8 bytes, which
    # straddle three parts
    delta = MemoryDelta.packed(12, 4, array("I", [0, 2]).tobytes(), pieces, start=len(joined) - 8)
    memory = bytearray(12)
    apply_delta(delta, memory)
    assert memory == joined[-8:-4] + bytes(4) + joined[-4:] and delta.data == joined[-8:]


@pytest.mark.usefixtures("read_path")
def test_data_moved_in_memory_stores_only_what_is_new() -> None:
    held, put = _dict_store()
    data = _text(400_000)
    ref = chunks.write_tree(data, put)
    before = sum(map(len, held.values()))
    # moved by 5 bytes (a buffer reallocated), with a message inserted in the middle
    moved = b"12345" + data[:200_000] + _text(2_000, seed=2) + data[200_000:]
    ref2 = chunks.write_tree(moved, put)
    added = sum(map(len, held.values())) - before
    assert added < 0.1 * before, (added, before)
    assert chunks.read_tree(ref, held.get) == data and chunks.read_tree(ref2, held.get) == moved
    assert len(ref2) <= 3 + 2 * 4 + chunks.INLINE_INDEX  # the record's reference stays short


@pytest.mark.usefixtures("read_path")
def test_a_changed_or_missing_chunk_is_named_never_read() -> None:
    held, put = _dict_store()
    data = _text(100_000)
    ref = chunks.write_tree(data, put)
    names = list(chunks.tree_digests(ref, held.get))
    victim = names[-1]
    good = held[victim]
    held[victim] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(RecordCorrupt, match=victim.hex()):
        chunks.read_tree(ref, held.get)
    held[victim] = held[names[0]]  # another real chunk under this name
    with pytest.raises(RecordCorrupt, match=f"{victim.hex()} does not match its digest"):
        chunks.read_tree(ref, held.get)
    del held[victim]
    with pytest.raises(RecordCorrupt, match=f"{victim.hex()} is missing"):
        chunks.read_tree(ref, held.get)
    with pytest.raises(ValueError):
        chunks.read_tree(ref[:-1], held.get)


@pytest.mark.usefixtures("read_path")
def test_a_cached_chunk_changed_or_missing_in_the_store_is_still_named() -> None:
    """The process cache of verified chunks serves a chunk only while the store holds
    the very bytes that were checked: damage after a first read is still refused."""
    held, put = _dict_store()
    data = _text(200_000, seed=7)
    ref = chunks.write_tree(data, put)
    chunks.clear_cache()
    assert chunks.read_tree(ref, held.get) == data  # checked, and now cached
    assert chunks.read_tree(ref, held.get) == data  # from the cache
    victim = list(chunks.tree_digests(ref, held.get))[-1]
    good = held[victim]
    held[victim] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(RecordCorrupt, match=victim.hex()):
        chunks.read_tree(ref, held.get)
    del held[victim]
    with pytest.raises(RecordCorrupt, match=f"{victim.hex()} is missing"):
        chunks.read_tree(ref, held.get)
    held[victim] = good
    assert chunks.read_tree(ref, held.get) == data


def test_the_verified_chunk_cache_keeps_to_its_bound() -> None:
    held, put = _dict_store()
    ref = chunks.write_tree(_text(300_000, seed=8), put)
    try:
        chunks.set_cache_limit(50_000)
        chunks.read_tree(ref, held.get)
        assert 0 < chunks._verified.size <= 50_000
        chunks.set_cache_limit(0)  # off: nothing kept, still read and checked
        assert chunks.read_tree(ref, held.get) == _text(300_000, seed=8) and chunks._verified.size == 0
    finally:
        chunks.set_cache_limit(chunks.CACHE_LIMIT)


# -- the store ------------------------------------------------------------------------------------
def _messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": _text(2_000, seed=i).decode()} for i in range(n)]


def test_a_conversation_sent_again_adds_its_new_message(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "db") as store:
        for call in range(1, 41):
            entry = {"tool": "llm.chat", "args": {"messages": _messages(call)}, "state": "intent"}
            store.transact(lambda t, e=entry, c=call: t.put_journal("a", c, e))
        with store.read() as txn:
            # exact values back (the audit's digests are over these)
            got = dict(txn.iter_journal("a"))
            assert got[40]["args"]["messages"] == _messages(40)
            assert audit.digest(got[25]["args"]) == audit.digest({"messages": _messages(25)})
        stats = store.stats()["agents"]["a"]
        whole = sum(len(json.dumps({"messages": _messages(c)})) for c in range(1, 41))
        stored = stats["journal"] + stats["journal_chunks"]
        assert stored < whole / 8, (stored, whole)  # not the square of the turns
        assert store.check().ok


def test_a_changed_journal_chunk_is_named(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with LmdbStore.open(db) as store:
        store.transact(lambda t: t.put_journal("a", 1, {"args": {"messages": _messages(20)}}))
        with store.read() as txn:
            names = [k for k, _ in txn._iter_prefix(txn._chunks, b"")]  # type: ignore[attr-defined]
    env = lmdb.open(str(db), max_dbs=32)
    with env.begin(write=True, db=env.open_db(b"chunks")) as txn:
        raw = bytearray(txn.get(names[0]))
        raw[-1] ^= 0x10
        txn.put(names[0], bytes(raw))
    env.close()
    with LmdbStore.open(db) as store:
        with store.read() as txn, pytest.raises(RecordCorrupt, match=r"journal entry 1 of agent a: chunk"):
            txn.get_journal("a", 1)
        report = store.check()
        assert not report.ok and {p.database for p in report.problems} == {"journal", "chunks"}
        assert store.compact()["chunks_deleted"] == 0  # still named by the entry: kept for an operator
    key = b"a\0" + (1).to_bytes(8, "big")
    env = lmdb.open(str(db), max_dbs=32)
    with env.begin(write=True, db=env.open_db(b"journal")) as txn:
        raw = bytearray(txn.get(key))
        raw[-3] ^= 0x10  # the entry's own reference, under its seal
        txn.put(key, bytes(raw))
    env.close()
    with LmdbStore.open(db) as store, pytest.raises(RecordCorrupt, match="journal entry 1 of agent a"):
        store.compact()  # a reference it cannot read: it never guesses which chunks are free


def _big_snapshot(seq: int, memory: bytes, agent: str = "a") -> Snapshot:
    size = 1 << 20
    chunk = 4096
    n = (len(memory) + chunk - 1) // chunk
    data = memory.ljust(n * chunk, b"\0")
    delta = MemoryDelta(size, chunk, [(i, data[i * chunk:(i + 1) * chunk]) for i in range(n)])
    return Snapshot(agent_id=agent, seq=seq, module_digest="ab" * 32, abi_version=1, memory=delta, globals=(),
                    async_buf=(16, 1024), entry="torpor_main", pending={"seq": seq, "tool": "llm.chat",
                                                                        "args": {"messages": []}},
                    usage={"fuel_used": seq}, created_at=float(seq))


def test_large_checkpoints_are_format_3_and_share_their_chunks(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with LmdbStore.open(db) as store:
        for seq in (1, 2):
            snap = _big_snapshot(seq, _text(300_000 + 2_000 * seq))
            blob, new = encode_checkpoint(snap)
            assert peek_snapshot(blob).format_version == CHUNKED_VERSION and len(blob) < 400
            store.transact(lambda t, b=blob, n=new, s=seq: t.put_checkpoint("a", s, b, 0.0, n))
            with store.read() as txn:
                back = decode_snapshot(txn.get_checkpoint("a", seq) or b"", chunks_from=txn.get_chunk)
            assert back == snap
        small, none = encode_checkpoint(_big_snapshot(3, b"tiny"))
        assert none == {} and chunk_ref(small) is None  # a small agent's record is as before
        with store.read() as txn, pytest.raises(SnapshotError, match="chunks_from"):
            decode_snapshot(txn.get_checkpoint("a", 2) or b"")
        stats = store.stats()
        per = stats["agents"]["a"]
        assert per["checkpoints_chunks"] < 1.3 * stats["chunks"]["bytes"]
        # prune checkpoint 1: compaction frees what only it named, keeps what 2 shares
        store.transact(lambda t: t.prune_checkpoints("a", 2))
        freed = store.compact()
        assert freed["chunks_deleted"] > 0 and freed["chunks_kept"] > 0
        assert store.compact()["chunks_deleted"] == 0
        with store.read() as txn:
            ref = chunk_ref(txn.get_checkpoint("a", 2) or b"")
            assert ref is not None
            victim = list(chunks.tree_digests(ref, txn.get_chunk))[-1]
        assert store.check().ok
    _put_raw(db, b"chunks", victim, None)
    with LmdbStore.open(db) as store, store.read() as txn, \
            pytest.raises(SnapshotCorrupt, match=f"chunk {victim.hex()} is missing"):
        decode_snapshot(txn.get_checkpoint("a", 2) or b"", chunks_from=txn.get_chunk)


def _round_trip(snap: Snapshot, pristine: bytes | None = None) -> tuple[bytes, Snapshot]:
    blob, new = encode_checkpoint(snap, pristine=pristine)
    held = {name: chunks.store_chunk(content) for name, content in new.items()}
    return blob, decode_snapshot(blob, chunks_from=held.get, pristine=pristine)


def test_a_large_checkpoint_parses_its_pending_arguments_only_when_they_are_read() -> None:
    args = {"model": "m", "messages": [{"role": "user", "content": _text(200_000, seed=4).decode()}]}
    snap = replace(_big_snapshot(1, _text(300_000)), pending={"seq": 7, "tool": "llm.chat", "args": args})
    blob, back = _round_trip(snap)
    assert peek_snapshot(blob).format_version == CHUNKED_VERSION
    held = lazy.raw(back, "pending")
    assert isinstance(held, lazy.Lazy) and not held.ready
    call = PendingCall.from_snapshot(back)  # what a resume builds: the arguments not parsed
    assert call is not None and (call.seq, call.tool) == (7, "llm.chat")
    held_args = lazy.raw(call, "args")
    assert isinstance(held_args, lazy.Lazy) and not held_args.ready
    assert call.args == args and held_args.ready and not held.ready  # parsed once read, exactly
    assert back.pending == snap.pending and list(back.pending or {}) == ["seq", "tool", "args"]
    assert back == snap and encode_checkpoint(back)[0] == blob  # written again, the same record
    # arguments that are not the last key are kept in the head: the decoded order is the same
    odd = replace(snap, pending={"args": args, "seq": 7, "tool": "llm.chat"})
    again = _round_trip(odd)[1]
    assert list(again.pending or {}) == ["args", "seq", "tool"] and again == odd
    idle = _round_trip(replace(snap, pending=None))[1]
    assert idle.pending is None and idle.pending_call() is None and PendingCall.from_snapshot(idle) is None


@pytest.mark.parametrize("kernels", ["native", "python"])
@pytest.mark.parametrize("xor", [False, True])
def test_a_decoded_large_checkpoint_restores_its_memory_from_where_it_lies_in_the_payload(
        kernels: str, xor: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels == "python":
        monkeypatch.setattr(delta_mod, "_kernels_lib", [None])
    elif delta_mod._kernels() is None or chunks._kernel() is None:
        pytest.skip("native kernels unavailable: " + str(delta_mod.native_build.status()))
    snap = _big_snapshot(1, _text(300_000, seed=5))
    # a module image with data under the first chunks: those are stored XOR'd against it
    image = _text(20_000, seed=6).ljust(snap.memory.memory_size, b"\0") if xor else None
    blob, back = _round_trip(snap, image)
    stored = back.memory._stored[0]
    assert isinstance(stored, delta_mod._Tail)  # not copied out of the payload
    # natively, not even copied together: the chunk tree's pieces, scattered into memory
    assert isinstance(stored.payload, delta_mod.Pieces) == (kernels == "native")
    assert (back.memory._stored[1] is not None) == xor  # kept XOR'd, un-XOR'd as it is written
    restored, expected = bytearray(image or bytes(snap.memory.memory_size)), bytearray(image or b"")
    expected = expected or bytearray(snap.memory.memory_size)
    apply_delta(back.memory, restored)
    apply_delta(snap.memory, expected)
    assert restored == expected and back.memory.changed_bytes == snap.memory.changed_bytes
    assert encode_checkpoint(back, pristine=image)[0] == blob  # written again from where it lies
    again = _round_trip(snap, image)[1]
    assert again.memory.data == snap.memory.data and again == snap  # the bytes, copied out


def test_malformed_pending_arguments_are_snapshot_corrupt_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    snap = replace(_big_snapshot(1, _text(300_000)), pending={"seq": 2, "tool": "kv.set", "args": {"v": "x" * 99}})
    real = fmt._meta_apart
    monkeypatch.setattr(fmt, "_meta_apart", lambda pending, usage: real(pending, usage)[:-1])  # an encoder's bug
    _, back = _round_trip(snap)
    assert back.pending_call() is not None  # the head is intact
    with pytest.raises(SnapshotCorrupt, match="inconsistent although its checksum holds"):
        _ = back.pending


def test_a_format_3_record_written_before_the_arguments_were_kept_apart_still_decodes() -> None:
    snap = replace(_big_snapshot(1, _text(300_000)), pending={"seq": 3, "tool": "kv.set", "args": {"v": [1, 2]}})
    out, flags = fmt._raw_payload(snap, None)  # the metadata as one JSON text, no flag
    found: chunks.Chunks = {}
    ref = chunks.write_tree(bytes(out), found.setdefault)
    body = fmt._record_prefix(CHUNKED_VERSION, flags, snap.abi_version, snap.module_digest) + ref
    blob = body + fmt.hashlib.blake2b(body, digest_size=fmt._CHECKSUM_LEN).digest()
    held = {name: chunks.store_chunk(content) for name, content in found.items()}
    back = decode_snapshot(blob, chunks_from=held.get)
    assert back == snap and not isinstance(lazy.raw(back, "pending"), lazy.Lazy)


def _put_raw(db: Path, name: bytes, key: bytes, value: bytes | None) -> None:
    env = lmdb.open(str(db), max_dbs=32)
    with env.begin(write=True, db=env.open_db(name)) as txn:
        if value is None:
            txn.delete(key)
        else:
            txn.put(key, value)
    env.close()


def test_store_format_is_upgraded_in_place_and_a_newer_one_refused(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with LmdbStore.open(db) as store:
        store.transact(lambda t: t.put_journal("a", 1, {"state": "done"}))
    _put_raw(db, b"_torpor", b"format", b"2")  # as the release before chunks left it
    with LmdbStore.open(db) as store, store.read() as txn:
        assert txn.get_journal("a", 1) == {"state": "done"}  # its values read as they are
    env = lmdb.open(str(db), max_dbs=32, readonly=True)
    with env.begin(db=env.open_db(b"_torpor", create=False)) as txn:
        assert txn.get(b"format") == str(STORE_FORMAT).encode()
    env.close()
    _put_raw(db, b"_torpor", b"format", str(STORE_FORMAT + 1).encode())
    with pytest.raises(StoreUnavailable, match=f"format {STORE_FORMAT + 1}, newer"):
        LmdbStore.open(db)


# -- the runtime, with the conversation agent ----------------------------------------------------
def _guest(tmp: Path, policy_extra: str) -> Path:
    d = tmp / "conversation"
    shutil.copytree(GUEST, d)
    (d / "policy.toml").write_text((d / "policy.toml").read_text() + policy_extra)
    return d


def test_retention_compaction_fork_replay_and_audit_over_chunked_checkpoints(
        bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(_guest(tmp_path / "src", "\n[retention]\ncheckpoints = 3\n"))
    store_dir = tmp_path / "store"
    turns = {"turns": 8, "bytes": 20_000, "tool": "kv", "summarise": 3}
    with Host(store_dir) as host:
        res = anyio.run(lambda: host.run(b, turns))
        assert res.status == "completed", res
        with host.store.read() as txn:
            cps = txn.list_checkpoints(res.agent_id)
            assert [c.seq for c in cps] == [6, 7, 8]  # the policy keeps three
            assert all(chunk_ref(txn.get_checkpoint(res.agent_id, c.seq) or b"") is not None for c in cps)
        assert host.store.compact()["chunks_deleted"] > 0  # what only the pruned checkpoints named
        assert host.store.check().ok
        fork = host.fork(res.agent_id, 6)
        forked = anyio.run(lambda: host.resume(fork))
        assert forked.status == "completed" and forked.output == res.output
        rep = replay(host, res.agent_id)
        assert rep.complete and rep.calls_replayed == rep.calls_recorded == 8
        assert audit.verify_store(host.store, agent_id=res.agent_id).ok


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_a_damaged_chunk_is_refused_at_resume_as_snapshot_corrupt(
        bundles: BundleFactory, tmp_path: Path, damage: str) -> None:
    b = bundles.load(_guest(tmp_path / "src", 'approval = true\n'))  # kv.set waits for a person
    store_dir = tmp_path / "store"
    with Host(store_dir) as host:
        res = anyio.run(lambda: host.run(b, {"turns": 2, "bytes": 100_000, "tool": "kv"}))
        assert res.status == "waiting_approval", res
        with host.store.read() as txn:
            ref = chunk_ref(txn.get_checkpoint(res.agent_id, 1) or b"")
            assert ref is not None
            victim = list(chunks.tree_digests(ref, txn.get_chunk))[-1]
            stored = txn.get_chunk(victim)
    assert stored is not None
    _put_raw(store_dir / "db", b"chunks", victim,
             None if damage == "missing" else stored[:-1] + bytes([stored[-1] ^ 0x01]))
    with Host(store_dir) as host:
        out = anyio.run(lambda: host.approve(res.agent_id))
        assert out.status == "corrupt" and out.error is not None, out
        assert out.error["code"] == "snapshot_corrupt" and victim.hex() in out.error["message"]
