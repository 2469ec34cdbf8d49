"""The bytes on disk are untrusted: every value read back into an agent is checked first.

Real LMDB files, changed under the store's feet the way a disk or a hand would: a
recorded tool answer, an input, a bundle, a kv value, an audit record, a data file cut
short. Healthy agents beside them are resumable forks of a finished `steps` agent (its
fork at checkpoint 2 waits on call 2, whose answer is in the journal, and goes on with
the counter at 5: its output is {"sum": 1 + 2 + 6 + 7 + 8, "last": 8}). Most cases go
through the real CLI, as an operator would meet them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, BundleFactory

from host.runtime import Host
from host.tools.builtin import KvGetArgs, kv_get
from host.tools.registry import ToolContext, ToolError
from snapshots import sealed
from snapshots.errors import RecordCorrupt, StoreCorrupt
from snapshots.lmdb_store import STORE_FORMAT, LmdbStore

FORK_OUTPUT = {"sum": 1 + 2 + 6 + 7 + 8, "last": 8}


# -- raw access to the LMDB files -----------------------------------------------------------------
def _raw(db_dir: Path, name: bytes, key: bytes) -> bytes:
    env = lmdb.open(str(db_dir), max_dbs=32, readonly=True)
    try:
        with env.begin(db=env.open_db(name, create=False)) as txn:
            value = txn.get(key)
    finally:
        env.close()
    assert value is not None, (name, key)
    return bytes(value)


def _put(db_dir: Path, name: bytes, key: bytes, value: bytes | None) -> None:
    """Write (or delete) one raw value, as a hand editing the file would: no digest recomputed."""
    env = lmdb.open(str(db_dir), max_dbs=32)
    try:
        with env.begin(write=True, db=env.open_db(name)) as txn:
            if value is None:
                txn.delete(key)
            else:
                txn.put(key, value)
    finally:
        env.close()


def _seq(agent_id: str, seq: int) -> bytes:
    return agent_id.encode() + b"\0" + seq.to_bytes(8, "big")


def _payload(raw: bytes) -> bytes:
    assert sealed.is_sealed(raw), raw[:20]
    return raw[sealed.HEADER_SIZE:]


def _reseal_same_header(raw: bytes, payload: bytes) -> bytes:
    """New bytes under the old header: the digest now describes other bytes."""
    return raw[: sealed.HEADER_SIZE] + payload


def _store_with_forks(bundles: BundleFactory, path: Path, n: int) -> tuple[str, list[str]]:
    with Host(path) as host:
        done = anyio.run(lambda: host.run(bundles.load(EXAMPLES / "steps"), {"n": 5}))
        assert done.ok and done.output == {"sum": 15, "last": 5}
        return done.agent_id, [host.fork(done.agent_id, 2) for _ in range(n)]


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=180)


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "internal" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _problems(store_dir: Path) -> list[dict[str, Any]]:
    checked = torpor("store", "check", "--store", str(store_dir), "--json")
    report = _json(checked)
    assert checked.returncode == (0 if report["ok"] else 1), checked.stdout
    problems: list[dict[str, Any]] = report["problems"]
    return problems


# -- journal answers ------------------------------------------------------------------------------
def test_a_changed_journal_answer_parks_the_agent_naming_the_entry(bundles: BundleFactory, tmp_path: Path) -> None:
    _, (fork, healthy) = _store_with_forks(bundles, tmp_path, 2)
    db = tmp_path / "db"
    raw = _raw(db, b"journal", _seq(fork, 2))
    entry = json.loads(_payload(raw))
    assert entry["state"] == "done" and json.loads(entry["response"]) == {"value": 2}
    entry["response"] = json.dumps({"value": 1000})  # a different answer, as if the tool had said it
    changed = _reseal_same_header(raw, json.dumps(entry).encode())
    _put(db, b"journal", _seq(fork, 2), changed)

    assert _problems(tmp_path) == [{
        "database": "journal", "key": f"agent {fork!r} call_seq 2", "agent_id": fork, "seq": 2,
        "message": f"journal entry 2 of agent {fork} does not match its digest (changed or damaged on disk)"}]

    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    by_id = {r["agent_id"]: r for r in _json(resumed)}
    assert by_id[fork]["status"] == "corrupt" and by_id[fork]["output"] is None, by_id[fork]
    assert by_id[fork]["error"]["code"] == "record_corrupt"
    assert f"journal entry 2 of agent {fork} does not match its digest" in by_id[fork]["error"]["message"]
    assert by_id[healthy]["status"] == "completed" and by_id[healthy]["output"] == FORK_OUTPUT, by_id[healthy]

    again = _json(torpor("resume", fork, "--store", str(tmp_path), "--json"))  # parked: stays so
    assert again["error"]["code"] == "invalid_state" and "corrupt" in again["error"]["message"]
    assert _raw(db, b"journal", _seq(fork, 2)) == changed  # the damaged bytes are kept for an operator
    with Host(tmp_path) as host:
        last = host.audit_records(fork)[-1]
    assert last["kind"] == "agent.corrupt" and last["error"]["code"] == "record_corrupt"


def test_an_answer_moved_from_another_entry_does_not_pass(bundles: BundleFactory, tmp_path: Path) -> None:
    """The digest covers the key: call 1's sealed answer put in call 2's place is refused."""
    parent, (fork,) = _store_with_forks(bundles, tmp_path, 1)
    db = tmp_path / "db"
    _put(db, b"journal", _seq(fork, 2), _raw(db, b"journal", _seq(parent, 1)))
    with Host(tmp_path) as host:
        res = anyio.run(lambda: host.resume(fork))
    assert res.status == "corrupt" and res.error is not None and res.error["code"] == "record_corrupt", res
    assert f"journal entry 2 of agent {fork} does not match its digest" in res.error["message"]


def test_an_answer_resealed_on_disk_is_caught_by_the_audit(bundles: BundleFactory, tmp_path: Path) -> None:
    """Someone who rewrites an answer and recomputes its seal (a checksum) still does not get
    it replayed: the answer is compared with the digest the audit chain holds for it."""
    _, (fork, healthy) = _store_with_forks(bundles, tmp_path, 2)
    db = tmp_path / "db"
    entry = json.loads(_payload(_raw(db, b"journal", _seq(fork, 2))))
    entry["response"] = json.dumps({"value": 1000})
    _put(db, b"journal", _seq(fork, 2), sealed.seal("journal", _seq(fork, 2), json.dumps(entry).encode()))
    assert _problems(tmp_path) == []  # the seal matches: store check cannot tell
    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    by_id = {r["agent_id"]: r for r in _json(resumed)}
    assert by_id[fork]["status"] == "corrupt" and by_id[fork]["output"] is None, by_id[fork]
    assert by_id[fork]["error"]["code"] == "record_corrupt"
    assert "differs from the one its audit record holds" in by_id[fork]["error"]["message"], by_id[fork]
    assert by_id[healthy]["status"] == "completed" and by_id[healthy]["output"] == FORK_OUTPUT, by_id[healthy]


# -- inputs, bundles, kv values -------------------------------------------------------------------
def test_a_changed_input_parks_the_agent(bundles: BundleFactory, tmp_path: Path) -> None:
    _, (fork, healthy) = _store_with_forks(bundles, tmp_path, 2)
    db = tmp_path / "db"
    raw = _raw(db, b"inputs", fork.encode())
    assert json.loads(_payload(raw)) == {"n": 5}
    _put(db, b"inputs", fork.encode(), _reseal_same_header(raw, b'{"n":50}'))

    [problem] = _problems(tmp_path)
    assert (problem["database"], problem["agent_id"]) == ("inputs", fork)
    assert problem["message"].startswith(f"the input of agent {fork} does not match its digest")

    res = _json(torpor("resume", fork, "--store", str(tmp_path), "--json"))
    assert res["status"] == "corrupt" and res["error"]["code"] == "record_corrupt", res
    assert f"the input of agent {fork} does not match its digest" in res["error"]["message"]
    inspected = _json(torpor("inspect", fork, "--store", str(tmp_path), "--json"))
    assert inspected["status"] == "corrupt" and inspected["input_error"]["code"] == "record_corrupt"
    ok = _json(torpor("resume", healthy, "--store", str(tmp_path), "--json"))
    assert ok["status"] == "completed" and ok["output"] == FORK_OUTPUT


def test_a_changed_bundle_parks_its_agents(bundles: BundleFactory, tmp_path: Path) -> None:
    _, (fork,) = _store_with_forks(bundles, tmp_path, 1)
    db = tmp_path / "db"
    with Host(tmp_path) as host:
        digest = host.get_agent(fork)["bundle_digest"]
    raw = _raw(db, b"bundles", digest.encode())
    payload = bytearray(_payload(raw))
    payload[len(payload) // 2] ^= 0x01
    _put(db, b"bundles", digest.encode(), _reseal_same_header(raw, bytes(payload)))

    [problem] = _problems(tmp_path)
    assert problem["database"] == "bundles" and problem["key"] == f"key {digest!r}"
    assert problem["message"].startswith(f"bundle {digest} does not match its digest")
    res = _json(torpor("resume", "--all", "--store", str(tmp_path), "--json"))
    assert [(r["agent_id"], r["status"], r["error"]["code"]) for r in res] == [(fork, "corrupt", "record_corrupt")]
    assert f"bundle {digest} does not match its digest" in res[0]["error"]["message"]


def test_another_bundle_sealed_under_the_key_is_refused(bundles: BundleFactory, tmp_path: Path) -> None:
    """Whoever re-seals other bytes under a bundle's key still fails the content address."""
    _, (fork,) = _store_with_forks(bundles, tmp_path, 1)
    with Host(tmp_path) as host:
        digest = host.get_agent(fork)["bundle_digest"]
    other = bundles.load(EXAMPLES / "hello")
    assert other.digest != digest
    key = digest.encode()
    _put(tmp_path / "db", b"bundles", key, sealed.seal("bundles", key, other.raw))
    with Host(tmp_path) as host:
        res = anyio.run(lambda: host.resume(fork))
    assert res.status == "corrupt" and res.error is not None and res.error["code"] == "record_corrupt", res
    assert f"bundle {digest} in the store does not match its digest (it holds bundle {other.digest[:12]}" \
        in res.error["message"]


def test_a_changed_kv_value_is_a_tool_error_not_data(bundles: BundleFactory, tmp_path: Path) -> None:
    """The fork's next kv.incr reads its counter: a changed one is an error the guest sees."""
    _, (fork, healthy) = _store_with_forks(bundles, tmp_path, 2)
    db = tmp_path / "db"
    key = f"agent:{fork}".encode() + b"\0counter"
    raw = _raw(db, b"kv", key)
    assert _payload(raw) == b"5"
    _put(db, b"kv", key, _reseal_same_header(raw, b"9"))
    [problem] = _problems(tmp_path)
    assert problem["database"] == "kv"
    assert problem["message"].startswith(f"kv value 'counter' of namespace agent:{fork} does not match its digest")

    res = _json(torpor("resume", fork, "--store", str(tmp_path), "--json"))
    assert res["status"] == "failed" and res["output"] is None, res  # the guest gave up on the error
    assert "kv.incr failed at step 2: record_corrupt" in res["error"]["message"], res["error"]
    assert f"kv value 'counter' of namespace agent:{fork} does not match its digest" in res["error"]["message"]
    assert _json(torpor("resume", healthy, "--store", str(tmp_path), "--json"))["output"] == FORK_OUTPUT


def test_kv_get_gives_the_tool_a_typed_error(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s") as store:
        store.transact(lambda t: t.kv_set("agent:a", "k", b'{"x":1}'))
    key = b"agent:a\0k"
    raw = _raw(tmp_path / "s", b"kv", key)
    _put(tmp_path / "s", b"kv", key, _reseal_same_header(raw, b'{"x":2}'))
    ctx = ToolContext(agent_id="a", agent_name="n", call_seq=1, kv_namespace="agent:a")
    with LmdbStore.open(tmp_path / "s") as store, store.read() as txn:
        with pytest.raises(ToolError) as info:
            kv_get(KvGetArgs(key="k"), ctx, txn)
        with pytest.raises(RecordCorrupt, match="kv value 'k' of namespace agent:a does not match its digest"):
            txn.kv_get("agent:a", "k")
    assert info.value.code == "record_corrupt" and "does not match its digest" in str(info.value)


# -- stores written before seals ------------------------------------------------------------------
def _unseal_in_place(db: Path, name: bytes, key: bytes) -> None:
    _put(db, name, key, _payload(_raw(db, name, key)))


def test_values_written_before_seals_are_read_as_they_are(bundles: BundleFactory, tmp_path: Path) -> None:
    """A store of format 1 (no digests anywhere) resumes its agents, and is upgraded in place."""
    _, (fork,) = _store_with_forks(bundles, tmp_path, 1)
    db = tmp_path / "db"
    with Host(tmp_path) as host:
        digest = host.get_agent(fork)["bundle_digest"]
    for name, key in ((b"journal", _seq(fork, 2)), (b"inputs", fork.encode()), (b"bundles", digest.encode()),
                      (b"kv", f"agent:{fork}".encode() + b"\0counter")):
        _unseal_in_place(db, name, key)
    _put(db, b"_torpor", b"sealed", None)
    _put(db, b"_torpor", b"format", b"1")
    with LmdbStore.open(db, readonly=True) as store:
        assert store.check().ok  # no digest to check is not a problem in an older store
    with Host(tmp_path) as host:
        res = anyio.run(lambda: host.resume(fork))
        assert res.status == "completed" and res.output == FORK_OUTPUT, res
    assert _raw(db, b"_torpor", b"format") == str(STORE_FORMAT).encode()  # an older Torpor must not misread them
    assert sealed.is_sealed(_raw(db, b"journal", _seq(fork, 3)))  # new values are sealed


def test_a_store_created_with_seals_refuses_an_unsealed_value(tmp_path: Path) -> None:
    with LmdbStore.open(tmp_path / "s") as store:
        store.transact(lambda t: t.put_journal("a", 1, {"state": "done", "status": 0, "response": "{}"}))
    _unseal_in_place(tmp_path / "s", b"journal", _seq("a", 1))
    with LmdbStore.open(tmp_path / "s") as store:
        with store.read() as txn, pytest.raises(RecordCorrupt, match="journal entry 1 of agent a carries no digest"):
            txn.get_journal("a", 1)
        [problem] = store.check().problems
    assert (problem.database, problem.agent_id, problem.seq) == ("journal", "a", 1)


# -- store check and audit verify see every kind of record -----------------------------------------
def test_store_check_verifies_every_kind_of_record(bundles: BundleFactory, tmp_path: Path) -> None:
    _, forks = _store_with_forks(bundles, tmp_path, 7)
    db = tmp_path / "db"
    with Host(tmp_path) as host:
        digest = host.get_agent(forks[0])["bundle_digest"]
        host.heads.maybe_seal(force=True)
    with LmdbStore.open(db, readonly=True) as store:
        assert store.check().ok

    def flip(name: bytes, key: bytes) -> None:
        raw = bytearray(_raw(db, name, key))
        raw[-1] ^= 0x01
        _put(db, name, key, bytes(raw))

    _put(db, b"agents", forks[0].encode(), b"{torn")
    flip(b"checkpoints", _seq(forks[1], 1))
    flip(b"journal", _seq(forks[2], 2))
    flip(b"inputs", forks[3].encode())
    flip(b"bundles", digest.encode())
    flip(b"kv", f"agent:{forks[4]}".encode() + b"\0counter")
    _put(db, b"audit", f"{forks[5]}/000000000001".encode(), b"{torn")
    _put(db, b"audit_heads", b"h/000000000001", b"\x00")
    found = {(p["database"], p["agent_id"]) for p in _problems(tmp_path)}
    assert found == {("agents", forks[0]), ("checkpoints", forks[1]), ("journal", forks[2]), ("inputs", forks[3]),
                     ("bundles", None), ("kv", None), ("audit", forks[5]), ("audit_heads", None)}, found


def test_audit_verify_and_listings_go_on_past_a_record_that_does_not_decode(
        bundles: BundleFactory, tmp_path: Path) -> None:
    _, forks = _store_with_forks(bundles, tmp_path, 3)
    db = tmp_path / "db"
    with Host(tmp_path) as host:
        host.heads.maybe_seal(force=True)
    _put(db, b"audit", f"{forks[0]}/000000000002".encode(), b"\xff\xfe")
    _put(db, b"agents", forks[1].encode(), b"[1,")
    _put(db, b"approvals", forks[2].encode(), b"{torn")
    verified = torpor("audit", "verify", "--store", str(tmp_path), "--json")
    report = _json(verified)
    # Some agents need attention (exit 5): the one whose chain is broken, the one whose record
    # does not decode; the others verified.
    assert verified.returncode == 5 and not report["ok"], verified.stdout + verified.stderr
    assert {a["agent_id"] for a in report["attention"]} == {forks[0], forks[1]}, report["attention"]
    # The chain and the signed head that vouches for the record both say so; nothing else does.
    assert {(p["agent_id"], p["kind"], p["seq"]) for p in report["problems"]} == {(forks[0], "modified", 2)}, \
        report["problems"]
    assert all(f"store key {forks[0]}/000000000002" in p["message"] for p in report["problems"])
    assert any(forks[1] in note and "does not decode" in note for note in report["notes"]), report["notes"]
    shown = torpor("audit", "show", forks[0], "--store", str(tmp_path))
    assert shown.returncode == 1 and "does not decode" in shown.stdout and "chain BROKEN" in shown.stdout, \
        shown.stdout + shown.stderr
    pending = _json(torpor("approvals", "--store", str(tmp_path), "--json"))
    assert [(p["agent_id"], p["error"]["code"]) for p in pending] == [(forks[2], "record_corrupt")]
    # ps reads listing summaries, not records: it lists every agent, and the damaged one as
    # corrupt once a writer has read its record (resume --all parks it).
    rows = _json(torpor("ps", "--store", str(tmp_path), "--json"))
    assert {r["agent_id"] for r in rows} >= set(forks), rows
    resumed = torpor("resume", "--all", "--store", str(tmp_path), "--json")
    assert resumed.returncode >= 0 and "internal" not in resumed.stdout + resumed.stderr, resumed.stderr
    listed = torpor("ps", "--store", str(tmp_path), "--json")
    rows = _json(listed)
    assert {r["agent_id"]: r["status"] for r in rows}[forks[1]] == "corrupt"
    assert listed.returncode == 5 and [r["agent_id"] for r in rows if r["attention"]] == [forks[1]], rows
    assert torpor("store", "check", "--store", str(tmp_path), "--json").returncode != 0


# -- listing summaries ----------------------------------------------------------------------------
def test_ps_reads_summaries_that_match_the_records(bundles: BundleFactory, tmp_path: Path) -> None:
    """Every commit writes the agent's summary with its record; ps shows the record's fields."""
    _, forks = _store_with_forks(bundles, tmp_path, 2)
    with Host(tmp_path) as host:
        anyio.run(lambda: host.resume(forks[0]))
        records = {a["agent_id"]: a for a in host.list_agents()}
    rows = _json(torpor("ps", "--store", str(tmp_path), "--json"))
    assert len(rows) == len(records) == 3
    for row in rows:
        rec = records[row["agent_id"]]
        assert (row["name"], row["status"], row["checkpoints"], row["last_checkpoint_bytes"], row["created_at"]) == \
            (rec["name"], rec["status"], rec["checkpoints"], rec["last_checkpoint_bytes"], rec["created_at"])
        assert (row["fuel_used"], row["tool_calls"], row["tokens"]) == \
            (rec["usage"]["fuel_used"], rec["usage"]["tool_calls"], rec["usage"].get("tokens", 0))
    assert {r["status"] for r in rows} == {"completed", "suspended"}, rows


def test_a_store_without_summaries_is_listed_and_upgraded(bundles: BundleFactory, tmp_path: Path) -> None:
    """A store of format 2 (no summaries) is listed read-only from its records, and a
    writable open writes the summaries; a summary that does not decode is read again from
    its record, and one that went missing is written again at the next writable open."""
    _, forks = _store_with_forks(bundles, tmp_path, 2)
    db = tmp_path / "db"
    before = _json(torpor("ps", "--store", str(tmp_path), "--json"))
    env = lmdb.open(str(db), max_dbs=32)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"summaries", txn=txn), delete=True)
        txn.put(b"format", b"2", db=env.open_db(b"_torpor", txn=txn))
    env.close()
    assert _json(torpor("ps", "--store", str(tmp_path), "--json")) == before  # read-only: from the records
    with LmdbStore.open(db) as store:  # writable: upgraded
        pass
    assert _raw(db, b"_torpor", b"format") == str(STORE_FORMAT).encode()
    assert len(_raw(db, b"summaries", forks[0].encode())) < 200
    assert _json(torpor("ps", "--store", str(tmp_path), "--json")) == before
    _put(db, b"summaries", forks[0].encode(), b"\x09garbage")
    assert _json(torpor("ps", "--store", str(tmp_path), "--json")) == before  # read again from the record
    assert ("summaries", forks[0]) in {(p["database"], p["agent_id"]) for p in _problems(tmp_path)}
    _put(db, b"summaries", forks[1].encode(), None)
    assert _json(torpor("ps", "--store", str(tmp_path), "--json")) == before  # counts differ: from the records
    with LmdbStore.open(db) as store, store.read() as txn:
        assert len(list(txn.iter_agent_summaries())) == 3
    assert len(_raw(db, b"summaries", forks[1].encode())) < 200  # written again


# -- a data file cut short ------------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["meta pages", "half", "inside the meta pages"])
def test_a_truncated_data_file_is_refused_with_a_typed_error(bundles: BundleFactory, tmp_path: Path,
                                                             keep: str) -> None:
    _store_with_forks(bundles, tmp_path, 2)
    data = tmp_path / "db" / "data.mdb"
    size = data.stat().st_size
    assert _json(torpor("ps", "--store", str(tmp_path), "--json"))  # readable before
    cut = {"meta pages": 2 * 4096, "half": size // 2 // 4096 * 4096, "inside the meta pages": 100}[keep]
    assert cut < size
    with open(data, "r+b") as f:
        f.truncate(cut)
    for argv in (["ps"], ["resume", "--all"], ["audit", "verify"]):
        proc = torpor(*argv, "--store", str(tmp_path))
        assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)  # never a signal (SIGBUS: -7)
        assert proc.stderr.startswith("torpor: error[store_corrupt]: "), (argv, proc.stderr)
    checked = torpor("store", "check", "--store", str(tmp_path), "--json")
    report = _json(checked)
    assert checked.returncode == 1 and not report["ok"] and "corrupt" in report["problems"][0]["message"]
    if keep != "inside the meta pages":
        assert f"data.mdb is {cut} bytes" in report["problems"][0]["message"]
    with pytest.raises(StoreCorrupt):
        LmdbStore.open(tmp_path / "db", readonly=True)
