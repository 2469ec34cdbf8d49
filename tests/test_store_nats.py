"""The fleet store on a real 3-node JetStream cluster: what LMDB alone cannot show.

Two ``NatsStore`` objects on one stream are two hosts of a fleet (each its own NATS
connection, its own local copy). The contract tests shared with LMDB are in
``test_store_lmdb.py`` (``conftest.any_store``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.nats_cluster import NatsCluster
from snapshots import NotFound, StoreConfigError, StoreError, WriteTxn
from snapshots.nats_store import NatsStore, parse_nats_url
from snapshots.oplog import decode_ops, encode_ops


@pytest.fixture
def stream() -> str:
    return f"T{uuid.uuid4().hex[:12]}"


@pytest.fixture
def pair(nats_cluster: NatsCluster, tmp_path: Path, stream: str) -> Iterator[tuple[NatsStore, NatsStore]]:
    """Two hosts on one stream, each connected to a different node."""
    urls = nats_cluster.urls
    with NatsStore.open(urls[0], tmp_path / "a", stream=stream) as a, \
            NatsStore.open(urls[1], tmp_path / "b", stream=stream) as b:
        yield a, b


def test_a_commit_on_one_host_is_read_on_another(pair: tuple[NatsStore, NatsStore]) -> None:
    a, b = pair
    a.transact(lambda t: (t.put_agent({"agent_id": "x", "status": "running"}),
                          t.put_checkpoint("x", 1, b"ckpt", 1.5), t.put_journal("x", 1, {"r": 7})))
    b.sync()
    with b.read() as r:
        assert r.get_agent("x") == {"agent_id": "x", "status": "running"}
        assert r.get_checkpoint("x", 1) == b"ckpt"
        assert r.get_journal("x", 1) == {"r": 7}
    # b writes on top of what it read; a's next write is based on b's
    b.transact(lambda t: t.put_agent({"agent_id": "x", "status": "done"}))
    a.transact(lambda t: t.put_checkpoint("x", 2, b"two", 2.0))
    b.sync()
    with b.read() as r:
        assert r.get_agent("x") == {"agent_id": "x", "status": "done"}
        assert [c.seq for c in r.list_checkpoints("x")] == [1, 2]
    a.sync()
    assert a.applied_seq == b.applied_seq == 3  # three commits, three log entries


def test_concurrent_increments_from_two_hosts_are_serialized(pair: tuple[NatsStore, NatsStore]) -> None:
    a, b = pair
    n = 25
    errors: list[BaseException] = []

    def bump(store: NatsStore) -> None:
        try:
            for _ in range(n):
                store.transact(lambda t: t.kv_incr("c", "k", 1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(s,)) for s in (a, b, a, b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert errors == []
    for s in (a, b):
        s.sync()
        with s.read() as r:
            assert r.kv_get("c", "k") == str(4 * n).encode()  # no increment lost, none counted twice


def _lagging(store: NatsStore, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold ``store``'s applier until the event is set: its copy lags the log, as a host's
    does when its connection is slow or it was paused."""
    go = threading.Event()
    take = store._take

    def held(msg: Any) -> Any:
        go.wait(30)
        return take(msg)

    monkeypatch.setattr(store, "_take", held)
    return go


def test_a_host_that_lost_the_agent_cannot_commit(pair: tuple[NatsStore, NatsStore],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Fencing: a commit is conditional on the whole log, so a stale owner's step is refused
    and, run again on the current state, sees it no longer owns the agent."""
    a, b = pair
    a.transact(lambda t: t.kv_set("lease", "agent-1", b"a"))
    b.sync()
    go = _lagging(a, monkeypatch)
    b.transact(lambda t: t.kv_set("lease", "agent-1", b"b"))  # b takes agent-1 over; a has not seen it
    runs: list[bytes | None] = []

    def step(t: WriteTxn) -> None:
        owner = t.kv_get("lease", "agent-1")
        runs.append(owner)
        go.set()
        if owner != b"a":
            raise StoreError("agent-1 is leased to another host")
        t.put_checkpoint("agent-1", 5, b"late", 9.0)

    with pytest.raises(StoreError, match="leased to another host"):
        a.transact(step)
    assert runs == [b"a", b"b"]  # the stale view was refused by the cluster, the step ran again
    assert a.races == 1
    # the non-retrying write() is refused outright on a stale view of the agent: b's commit
    # on agent-1's subject (a take-over writes its record) fails a's condition on that subject
    go = _lagging(a, monkeypatch)
    b.transact(lambda t: (t.kv_set("lease", "agent-1", b"b2"), t.put_agent({"agent_id": "agent-1", "owner": "b"})))
    with pytest.raises(StoreError, match="another host committed first"), a.write() as w:
        w.put_checkpoint("agent-1", 6, b"late", 9.0)
    go.set()
    a.sync()
    b.sync()
    for s in (a, b):
        with s.read() as r:
            assert r.list_checkpoints("agent-1") == []
            assert r.kv_get("lease", "agent-1") == b"b2"
            assert r.get_agent("agent-1") == {"agent_id": "agent-1", "owner": "b"}


def test_hosts_writing_different_agents_do_not_race(pair: tuple[NatsStore, NatsStore],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Conditions per agent: a commit on a view that lacks another agent's newer commits is
    accepted (it depends on its own agent only), lands after them, and the copy applies both
    in log order; a group commit of several agents is one entry conditioned on each."""
    a, b = pair
    a.transact(lambda t: t.put_agent({"agent_id": "x", "n": 0}))
    b.sync()
    go = _lagging(a, monkeypatch)  # a's copy does not see b's commits yet
    b.transact(lambda t: (t.put_agent({"agent_id": "y", "n": 1}), t.put_journal("y", 1, {"r": 1})))
    threading.Timer(0.3, go.set).start()  # a's commit waits for its copy to apply b's first
    a.transact(lambda t: t.put_agent({"agent_id": "x", "n": (t.get_agent("x") or {})["n"] + 1}))
    assert a.races == 0 and b.races == 0
    outcomes = b.transact_batch([lambda t: t.put_journal("x", 1, {"r": 2}),
                                 lambda t: t.put_agent({"agent_id": "y", "n": 2}),
                                 lambda t: t.put_agent({}),  # raises: its writes are not in the entry
                                 lambda t: t.kv_set("shared", "k", b"v")])
    assert [o.error is None for o in outcomes] == [True, True, False, True]
    last = b.sync()
    a.sync()
    for s in (a, b):
        with s.read() as r:
            assert r.get_agent("x") == {"agent_id": "x", "n": 1} and r.get_agent("y") == {"agent_id": "y", "n": 2}
            assert r.get_journal("x", 1) == {"r": 2} and r.get_journal("y", 1) == {"r": 1}
            assert r.kv_get("shared", "k") == b"v"
        assert s.applied_seq == last
    # the batch was one entry with a message on each partition it wrote: x, y, the shared key
    msgs = [a._bridge.get(a.stream, seq) for seq in range(last - 2, last + 1)]
    assert [m.headers["Torpor-Part"] for m in msgs if m is not None] == ["1/3", "2/3", "3/3"]
    subjects = sorted(m.subject for m in msgs if m is not None)
    assert subjects[:2] == [f"{a.stream}.a.x", f"{a.stream}.a.y"] and subjects[2].startswith(f"{a.stream}.k.h")
    assert subjects[2].split(".")[3] == "k"  # the shared key, under its bucket's prefix
    # a stale view of one agent of a group commit refuses the whole entry, which runs again
    go = _lagging(a, monkeypatch)
    b.transact(lambda t: t.put_agent({"agent_id": "y", "n": 3}))
    threading.Timer(0.3, go.set).start()
    seen: list[int] = []

    def bump_y(t: WriteTxn) -> None:
        n = (t.get_agent("y") or {})["n"]
        seen.append(n)
        t.put_agent({"agent_id": "y", "n": n + 1})

    a.transact_batch([lambda t: t.put_journal("x", 2, {"r": 3}), bump_y])
    assert seen == [2, 3] and a.races == 1
    b.sync()
    with b.read() as r:
        assert r.get_agent("y") == {"agent_id": "y", "n": 4} and r.get_journal("x", 2) == {"r": 3}
    # a walk over every agent's keys (the whole wake index) in a group commit is committed on
    # its own (conditioned on the whole stream), the other functions together (on their agents)
    b.transact(lambda t: [t.put_blob("timers", f"1/{x}", b"{}") for x in ("x", "y")])
    before = dict(b.conditions)
    outs = b.transact_batch([lambda t: t.put_journal("x", 9, {"r": 9}),
                             lambda t: t.kv_set("n", "agents", str(len(list(t.iter_blobs("timers")))).encode()),
                             lambda t: t.put_journal("y", 9, {"r": 9})])
    assert [o.error for o in outs] == [None, None, None]
    assert b.conditions["stream"] == before.get("stream", 0) + 1
    assert b.conditions["partitions"] == before.get("partitions", 0) + 1
    with b.read() as r:
        assert r.kv_get("n", "agents") == b"2" and r.get_journal("y", 9) == {"r": 9}


def test_a_large_step_is_one_atomic_batch(pair: tuple[NatsStore, NatsStore], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = pair
    a._max_part = 64 * 1024  # parts of 64 KiB: a 300 KB checkpoint goes as an atomic batch of 5
    blob = os.urandom(300_000)
    a.transact(lambda t: (t.put_checkpoint("big", 1, blob, 1.0), t.put_agent({"agent_id": "big"})))
    last = b.sync()
    with b.read() as r:
        assert r.get_checkpoint("big", 1) == blob and r.get_agent("big") == {"agent_id": "big"}
    assert last == a.applied_seq and last >= 5  # five stream messages, one commit
    # a stale batch is refused whole: nothing of it is stored
    go = _lagging(a, monkeypatch)
    b.transact(lambda t: t.put_agent({"agent_id": "big", "v": 2}))  # a's view of "big" is stale
    before = b.sync()
    with pytest.raises(StoreError, match="another host committed first"), a.write() as w:
        w.put_checkpoint("big", 2, blob, 2.0)
    go.set()
    assert b.sync() == before
    a.sync()
    with a.read() as r:
        assert r.latest_checkpoint("big") == 1


def test_a_new_copy_is_rebuilt_from_the_log(nats_cluster: NatsCluster, tmp_path: Path, stream: str) -> None:
    with NatsStore.open(nats_cluster.url, tmp_path / "first", stream=stream) as s:
        s.transact(lambda t: [t.put_journal("j", i, {"i": i}) for i in range(1, 6)])
        s.transact(lambda t: t.delete_agent("nobody", missing_ok=True))
        with pytest.raises(NotFound):
            s.transact(lambda t: t.delete_agent("nobody"))
    with NatsStore.open(nats_cluster.url, tmp_path / "fresh", stream=stream) as s:
        s.sync()
        with s.read() as r:
            assert [c for c, _ in r.iter_journal("j")] == [1, 2, 3, 4, 5]
    # a copy belongs to its stream: another stream refuses it
    with pytest.raises(StoreConfigError, match="local copy of stream"):
        NatsStore.open(nats_cluster.url, tmp_path / "fresh", stream=stream + "x")


def test_commits_go_on_with_a_node_killed(nats_cluster: NatsCluster, tmp_path: Path, stream: str) -> None:
    """R3: a quorum of two commits; the killed node catches up when it is back."""
    with NatsStore.open(nats_cluster.urls[0], tmp_path / "c", stream=stream, timeout=20.0) as s:
        s.transact(lambda t: t.kv_set("n", "before", b"1"))
        nats_cluster.kill(2)
        try:
            for i in range(5):
                s.transact(lambda t, i=i: t.kv_set("n", f"k{i}", b"x"))
        finally:
            nats_cluster.restart(2)
        with s.read() as r:
            assert r.kv_keys("n") == ["before", "k0", "k1", "k2", "k3", "k4"]
    with NatsStore.open(nats_cluster.urls[2], tmp_path / "d", stream=stream, timeout=20.0) as s:
        s.sync()
        with s.read() as r:
            assert r.kv_keys("n") == ["before", "k0", "k1", "k2", "k3", "k4"]


def test_bad_urls_and_options_are_config_errors(tmp_path: Path) -> None:
    assert parse_nats_url("nats://127.0.0.1:1,127.0.0.1:2") == ["nats://127.0.0.1:1", "nats://127.0.0.1:2"]
    for bad in ("http://x:1", "nats://x", "nats://x:0", "nats://:4222"):
        with pytest.raises(StoreConfigError):
            parse_nats_url(bad)
    with pytest.raises(StoreConfigError, match="replicas"):
        NatsStore.open("nats://127.0.0.1:1", tmp_path, replicas=7)


def test_an_unreachable_cluster_is_unavailable(tmp_path: Path) -> None:
    from bench.nats_cluster import _free_ports
    from snapshots import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="cannot connect"):
        NatsStore.open(f"nats://127.0.0.1:{_free_ports(1)[0]}", tmp_path, timeout=3.0)


def test_the_op_log_round_trips_and_refuses_garbage() -> None:
    ops: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
        ("put_checkpoint", ("a", 1, b"\x00\xff", 1.25), {"chunks": {b"d" * 32: memoryview(b"c")}}),
        ("put_agent", ({"agent_id": "a", "b": {"nested": [1, "é"]}},), {}),
        ("delete_agent", ("a",), {"purge": True, "missing_ok": False}),
    ]
    back = decode_ops(encode_ops(ops))
    assert back[0] == ("put_checkpoint", ("a", 1, b"\x00\xff", 1.25), {"chunks": {b"d" * 32: b"c"}})
    assert back[1:] == ops[1:]
    from snapshots import StoreCorrupt

    frame = encode_ops(ops)
    for bad in (b"", frame[:10], frame[:-1], b"\x00\x00\x00\x02{}", frame.replace(b"put_agent", b"rm_rf_all")):
        with pytest.raises(StoreCorrupt):
            decode_ops(bad)


def test_doctor_checks_the_cluster(nats_cluster: NatsCluster, tmp_path: Path, stream: str) -> None:
    """``torpor doctor --store nats://...``: the stream's leader and its two current followers."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "host.cli", "doctor", "--store", nats_cluster.url, "--stream", stream,
                          "--local-dir", str(tmp_path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    fleet = json.loads(out.stdout)["fleet"]
    assert fleet["replicas_configured"] == 3 and fleet["leader"] in {"n1", "n2", "n3"}
    assert len(fleet["followers"]) == 2 and fleet["server_version"].startswith("2.")
    down = subprocess.run([sys.executable, "-m", "host.cli", "doctor", "--store", "nats://127.0.0.1:1",
                           "--local-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert down.returncode == 2 and down.stderr.strip().splitlines() == [
        "torpor: error[store_unavailable]: cannot connect to NATS at nats://127.0.0.1:1: "
        "nats: no servers available for connection"]


def test_keys_are_labelled_with_the_agent_they_belong_to() -> None:
    """What a commit is conditioned on: the agents whose keys it touched, a shared key, a
    bucket of shared keys it walked, or the whole log when it walked agents' keys (a blind
    write reads nothing; the walk of the agent records is read at the view)."""
    from snapshots.oplog import (
        GLOBAL,
        RecordingTxn,
        bucket_of,
        partition_of_blob,
        partition_of_kv,
        walk_of,
    )

    assert partition_of_kv("agent:A1", "counter") == "A1"
    assert partition_of_kv("torpor:limits", "run:A1/tool") == "A1"
    assert partition_of_kv("torpor:limits", "agent:A1:x") == "A1"
    assert partition_of_kv("torpor:limits", "run:A1/", prefix=True) == "A1"
    assert partition_of_kv("torpor:limits", "run:A1", prefix=True) == GLOBAL  # would cover run:A10/...
    assert partition_of_kv("torpor:limits", "tenant:acme") == "kv:torpor:limits/tenant:acme"  # its own
    assert partition_of_kv("fleet.leases", "h:1") == "kv:fleet.leases/h:1"
    assert partition_of_kv("fleet.leases", "", prefix=True) == walk_of("kv:fleet.leases")  # a bucket of shared keys
    assert partition_of_kv("torpor:limits", "", prefix=True) == GLOBAL  # agents' keys among them
    assert partition_of_blob("audit", "A1/000000000003") == "A1"
    assert partition_of_blob("audit", "A1/", prefix=True) == "A1"
    assert partition_of_blob("audit", "A1", prefix=True) == GLOBAL
    assert partition_of_blob("logs", "A1") == "A1"
    assert partition_of_blob("inputs", "A1") == "A1" and partition_of_blob("inputs", "A", prefix=True) == GLOBAL
    assert partition_of_blob("timers", "00000001732270000.250000/A1") == "A1"
    assert partition_of_blob("timers", "", prefix=True) == GLOBAL  # every agent's wake-ups
    assert partition_of_blob("revocations", "agent/A1") == "A1"
    assert partition_of_blob("registry", "v/acme/x") == "blob:registry/v/acme/x"
    assert partition_of_blob("registry", "v/acme/", prefix=True) == walk_of("blob:registry")
    assert bucket_of("blob:registry/v/acme/x") == ("blob:registry", "v/acme/x") and bucket_of("A1") is None

    class Null:
        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: 0

    step = RecordingTxn(Null())  # a step: the agent's keys, and a blind write of another key
    step.get_agent("A1")
    step.kv_incr("agent:A1", "counter", 1)
    step.put_blob("audit", "A1/000000000001", b"x")
    step.kv_set("fleet.leases", "h:1", b"{}")
    assert step.read == {"A1"} and step.wrote == {"A1", "kv:fleet.leases/h:1"} and not step.global_read
    claim = RecordingTxn(Null())  # a take-over: reads a lease
    claim.get_agent("A1")
    claim.kv_get("fleet.leases", "h:1")
    claim.put_agent({"agent_id": "A1"})
    assert claim.read == {"A1", "kv:fleet.leases/h:1"} and claim.wrote == {"A1"} and not claim.global_read
    seal = RecordingTxn(Null())  # the agent records, read at the view; a bucket of shared keys
    seal.iter_agents()
    seal.iter_blobs("heads", "chain/")
    assert seal.snapshot_walk and not seal.global_read and seal.read == {walk_of("blob:heads")}
    walk = RecordingTxn(Null())
    walk.iter_blobs("audit", "")  # every agent's chain
    assert walk.global_read and not walk.read


def test_the_log_is_compacted_and_a_new_copy_starts_from_the_snapshot(
        nats_cluster: NatsCluster, tmp_path: Path, stream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compaction: a snapshot of a copy in the object store, the log purged up to the lowest
    live copy's position; a copy the log no longer reaches starts from the snapshot."""
    url = nats_cluster.url
    a = NatsStore.open(url, tmp_path / "a", stream=stream, compact_every=0, position_ttl=2.0)
    b = NatsStore.open(url, tmp_path / "b", stream=stream, compact_every=0, position_ttl=2.0)
    try:
        for i in range(20):
            a.transact(lambda t, i=i: (t.put_agent({"agent_id": f"g{i % 4}", "i": i}),
                                       t.put_journal(f"g{i % 4}", i + 1, {"i": i})))
        b.sync()
        b._report_position()  # (its reporter says so within a second)
        go = _lagging(b, monkeypatch)  # b stops applying at 20: the log is kept from there on
        for i in range(20, 30):
            a.transact(lambda t, i=i: t.put_journal(f"g{i % 4}", i + 1, {"i": i}))
        b._report_position()  # fresh: a loaded machine may have starved its reporter past the ttl
        first = a.compact_log()
        assert first["log_snapshot_seq"] == 30 and first["log_purged_before"] == 21
        assert a._bridge.first_seq(stream) == 21
        go.set()
        b.sync()
        b._report_position()
        with b.read() as r:
            assert len(list(r.iter_journal("g1"))) == 8
        done = a.compact_log()  # both copies at 30 now: everything before is purged
        assert done["log_purged_before"] == 31 and a._bridge.first_seq(stream) == 31
        assert a._bridge.snapshots(f"{stream}_snap", replicas=3) == [f"{30:020d}"]  # the older one dropped
        # a new host starts from the snapshot and follows the log from there
        a.transact(lambda t: t.put_agent({"agent_id": "late", "i": 99}))
        with NatsStore.open(url, tmp_path / "c", stream=stream, compact_every=0) as c:
            c.sync()
            assert c.applied_seq == a.applied_seq == 31
            with c.read() as r:
                assert [n for n, _ in r.iter_journal("g2")] == [3, 7, 11, 15, 19, 23, 27]
                assert r.get_agent("late") == {"agent_id": "late", "i": 99}
            c.transact(lambda t: t.put_journal("late", 1, {"from": "c"}))  # and commits on top of it
        a.sync()
        with a.read() as r:
            assert r.get_journal("late", 1) == {"from": "c"}
        # a copy that was away while the log was compacted past it starts from the snapshot too
        b.close()
        for i in range(5):
            a.transact(lambda t, i=i: t.put_journal("late", i + 2, {"i": i}))
        time.sleep(2.5)  # b's position expires
        a.compact_log()
        assert a._bridge.first_seq(stream) == a.applied_seq + 1
        with NatsStore.open(url, tmp_path / "b", stream=stream, compact_every=0) as b2:
            with b2.read() as r:
                assert [n for n, _ in r.iter_journal("late")] == [1, 2, 3, 4, 5, 6]
            # agents whose last message was purged still commit, on the copy that compacted and
            # on another (their condition names sequence 0, as the server now counts it) ...
            b2.transact(lambda t: t.put_journal("g1", 99, {"after": "compaction"}))
            a.transact(lambda t: t.put_journal("g3", 99, {"after": "compaction"}))
            a.sync()
            a.transact(lambda t: t.put_journal("g1", 100, {"after": "b2"}))  # ... and on top of that as usual
            b2.sync()
            with b2.read() as r:
                assert r.get_journal("g1", 100) == {"after": "b2"} and r.get_journal("g3", 99) == {"after": "compaction"}
    finally:
        a.close()
        b.close()


def test_the_log_compacts_by_itself(nats_cluster: NatsCluster, tmp_path: Path, stream: str) -> None:
    with NatsStore.open(nats_cluster.url, tmp_path / "a", stream=stream, compact_every=10) as a:
        for i in range(12):
            a.transact(lambda t, i=i: t.kv_set("n", f"k{i}", b"x"))
        deadline = time.monotonic() + 20
        while a._bridge.first_seq(stream) <= 10:
            assert time.monotonic() < deadline, "no compaction"
            time.sleep(0.1)
        assert a._bridge.snapshots(f"{stream}_snap", replicas=3)


def test_the_work_queue_hands_each_message_to_one_host_and_again_after_the_ack_wait(
        pair: tuple[NatsStore, NatsStore]) -> None:
    """``snapshots.work_queue`` on the real cluster: one message per work id (a second publish
    of the same id is dropped), one host at a time, delivered again to the other host when the
    first does not answer within the ack wait, gone once acknowledged; a message that is not
    work is terminated, not handed out."""
    a, b = pair
    assert a.work_state() is None  # no host made one yet (torpor fleet status says nothing of it)
    qa, qb = a.work_queue(ack_wait=1.0), b.work_queue(ack_wait=1.0)
    qa.publish("run", "agt_1", "run:agt_1")
    qb.publish("run", "agt_1", "run:agt_1")  # the same event told by another host: one message
    qb.publish("wake", "agt_2", "wake:agt_2:1")
    a._bridge.publish_work(qa.subject, b"not json", msg_id="junk")
    taken = qa.pull(10, 2.0)
    assert sorted((w.kind, w.agent_id, w.deliveries) for w in taken) == [("run", "agt_1", 1), ("wake", "agt_2", 1)]
    assert qb.pull(10, 0.3) == []  # held by a, not handed to b too
    qa.in_progress(taken[0])  # a is still at agt_1's work ...
    qa.ack(taken[1])  # ... and done with agt_2's
    time.sleep(0.6)
    qa.in_progress(taken[0])
    again = qb.pull(10, 3.0)  # a stops answering (as if it died): b gets agt_1's, once more
    assert [(w.agent_id, w.deliveries) for w in again] == [("agt_1", 2)]
    qb.ack(again[0])
    qa.ack(taken[0])  # a late answer of the first holder changes nothing
    assert qa.pull(10, 1.5) == [] and qb.pull(10, 0.3) == []
    assert qa.state()["pending"] == 0 and qa.state()["unacknowledged"] == 0 and a.work_state() == qa.state()
    with pytest.raises(ValueError):
        qa.publish("explode", "agt_1", "x")  # type: ignore[arg-type]
    assert a.work_queue(ack_wait=5.0).ack_wait == 1.0  # the consumer's, which the first host set
    # many hosts telling of one event at the same moment (a duplicate id "in process" at the
    # server is a duplicate too): no error, one message
    go = threading.Barrier(8)
    failed: list[BaseException] = []

    def tell(q: Any) -> None:
        go.wait()
        try:
            q.publish("orphan", "agt_3", "orphan:agt_3:lease:1")
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=tell, args=(q,)) for q in (qa, qb) * 4]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not failed, failed
    assert [w.agent_id for w in qa.pull(10, 1.0)] == ["agt_3"]


def test_walks_over_shared_keys_commit_beside_three_busy_hosts(nats_cluster: NatsCluster, tmp_path: Path,
                                                              stream: str) -> None:
    """Issue 17's walks under load: three hosts commit agents' steps (a record and audit
    records each, through the real chain code) without pause while each also seals the signed
    audit heads (a walk over every agent record) and walks a registry-like bucket of shared
    keys to add to it. Before, every such walk was conditioned on the whole stream and gave
    up after 40 lost races against the fleet's steps; now the seal reads the records at its
    view and the bucket walk is conditioned on that bucket alone: every walk commits, and the
    store verifies (every chain intact, every signed head consistent with them)."""
    from host.trust import audit
    from host.trust.identity import HostKey

    hosts = [NatsStore.open(nats_cluster.urls[i], tmp_path / f"h{i}", stream=stream) for i in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    steps = [0, 0, 0]
    walks = [0, 0, 0]

    def step_loop(i: int) -> None:
        s = hosts[i]
        try:
            while not stop.is_set():
                aid = f"agt{i}x{steps[i] % 4}"

                def step(t: WriteTxn, aid: str = aid) -> None:
                    rec = t.get_agent(aid) or {"agent_id": aid, "audit_seq": 0, "audit_head": audit.GENESIS}
                    audit.append_events(t, rec, [("tool.called", {"n": steps[i]})])
                    t.put_agent(rec)

                s.transact(step)
                steps[i] += 1
        except BaseException as exc:
            errors.append(exc)

    def walk_loop(i: int, rounds: int) -> None:
        s, key = hosts[i], HostKey.generate()
        try:
            for n in range(rounds):
                s.transact(lambda t: audit.seal_head(t, key))
                s.transact(lambda t, n=n: t.put_blob("registry", f"v/h{i}/{n}",
                                                     str(len(list(t.iter_blobs("registry", "v/")))).encode()))
                walks[i] += 1
        except BaseException as exc:
            errors.append(exc)

    try:
        steppers = [threading.Thread(target=step_loop, args=(i,)) for i in range(3)]
        for th in steppers:
            th.start()
        while min(steps) < 5 and not errors:  # every host under way
            time.sleep(0.01)
        walkers = [threading.Thread(target=walk_loop, args=(i, 12)) for i in range(3)]
        for th in walkers:
            th.start()
        for th in walkers:
            th.join(120)
        stop.set()
        for th in steppers:
            th.join(60)
        assert not errors, errors
        assert walks == [12, 12, 12] and min(steps) > 20, (walks, steps)
        hosts[0].sync()
        with hosts[0].read() as r:
            found = [k for k, _ in r.iter_blobs("registry", "v/")]
            assert len(found) == 36  # no walk's write lost
        report = audit.verify_store(hosts[0])
        assert report.ok, report.summary()
        assert sum(h.conditions["stream"] for h in hosts) == 0  # no walk raced the whole stream
    finally:
        stop.set()
        for h in hosts:
            h.close()
