"""The audit log shows tampering: in the store and in exports, every kind of edit is found and named."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host
from host.trust import audit
from host.trust.identity import HostKey

pytestmark = pytest.mark.timeout(120)
STEPS = Path(__file__).parent.parent / "guest_sdk" / "examples" / "steps"


@pytest.fixture(scope="module")
def pristine_store(bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two finished agents and a signed head, built once; each test works on a copy."""
    d = tmp_path_factory.mktemp("audit") / "store"
    b = bundles.load(STEPS)
    with Host(d) as host:
        # One record a step (a call's request, decision, checkpoint and answer together):
        # enough calls for the record positions the tests below cut, move and forge.
        ids = [anyio.run(host.run, b, {"n": n}).agent_id for n in (12, 8)]
    return d, sorted(ids)


@pytest.fixture
def store(pristine_store: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, list[str]]:
    src, ids = pristine_store
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, ids


def _verify(d: Path) -> audit.VerifyReport:
    with Host(d) as host:
        return audit.verify_store(host.store)


def _edit(d: Path, fn: Any) -> None:
    from snapshots.lmdb_store import LmdbStore

    s = LmdbStore.open(d / "db")
    try:
        s.transact(fn)
    finally:
        s.close()


def _get(txn: Any, aid: str, seq: int) -> dict[str, Any]:
    return json.loads(txn.get_blob("audit", audit.record_key(aid, seq)))


def _put(txn: Any, aid: str, seq: int, rec: dict[str, Any]) -> None:
    txn.put_blob("audit", audit.record_key(aid, seq), audit.canonical(rec))


def test_intact_store_verifies_and_cli_exits_0(store: tuple[Path, list[str]]) -> None:
    from host.cli import main

    d, ids = store
    report = _verify(d)
    assert report.ok, report.summary()
    assert report.agents == 2 and report.heads >= 1 and report.records > 20
    assert main(["audit", "verify", "--store", str(d)]) == 0
    assert main(["audit", "show", ids[0], "--payloads", "--store", str(d)]) == 0


def test_modified_record_is_named(store: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    d, ids = store

    def edit(txn: Any) -> None:
        rec = _get(txn, ids[1], 4)
        rec["decision"] = {"decision": "allow", "rules": ["forged"]}
        _put(txn, ids[1], 4, rec)

    _edit(d, edit)
    first = _verify(d).first
    assert first is not None and first.kind == "modified"
    assert (first.agent_id, first.seq) == (ids[1], 4) and audit.record_key(ids[1], 4) in first.message
    assert main(["audit", "verify", "--store", str(d), "--json"]) == 5  # that agent needs attention
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["first_problem"]["seq"] == 4 and out["first_problem"]["agent_id"] == ids[1]
    assert [a["agent_id"] for a in out["attention"]] == [ids[1]]


def test_removed_records_are_named(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    with Host(d) as host:
        last = host.get_agent(ids[0])["audit_seq"]
    _edit(d, lambda txn: txn.delete_blob("audit", audit.record_key(ids[0], 5)))
    first = _verify(d).first
    assert first is not None and (first.kind, first.agent_id, first.seq) == ("removed", ids[0], 5)
    _edit(d, lambda txn: txn.delete_blob("audit", audit.record_key(ids[1], 3)))
    report = _verify(d)
    assert report.first is not None and report.first.agent_id == ids[0]  # the first problem, in agent order
    assert [(p.agent_id, p.seq) for p in report.problems] == [(ids[0], 5), (ids[1], 3)]
    assert last > 5


def test_removed_tail_is_named(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    with Host(d) as host:
        last = host.get_agent(ids[1])["audit_seq"]
    _edit(d, lambda txn: txn.delete_blob("audit", audit.record_key(ids[1], last)))
    first = _verify(d).first
    assert first is not None and first.kind == "removed" and first.seq == last and "recorded head" in first.message


def test_inserted_record_is_named(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    aid = ids[0]

    def append(txn: Any) -> None:  # a well-formed record chained onto the end
        rec = txn.get_agent(aid)
        prev = _get(txn, aid, rec["audit_seq"])
        forged = audit.seal(aid, rec["audit_seq"] + 1, prev["hash"], time.time(), "approval.granted", {"by": "mallory"})
        _put(txn, aid, rec["audit_seq"] + 1, forged)

    _edit(d, append)
    first = _verify(d).first
    assert first is not None and first.kind == "inserted" and "approval.granted" in first.message


def test_inserted_in_the_middle_with_renumbering_is_named(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    aid = ids[1]

    def insert(txn: Any) -> None:
        rec = txn.get_agent(aid)
        n = rec["audit_seq"]
        for seq in range(n, 5, -1):  # shift records 6..n up by one key
            _put(txn, aid, seq + 1, _get(txn, aid, seq))
        before = _get(txn, aid, 5)
        _put(txn, aid, 6, audit.seal(aid, 6, before["hash"], before["t"], "tool.allowed", {"call_seq": 9, "tool": "x"}))

    _edit(d, insert)
    first = _verify(d).first
    assert first is not None and first.kind == "inserted" and first.seq == 6 and first.agent_id == aid


def test_reordered_records_are_named(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    aid = ids[0]

    def swap(txn: Any) -> None:
        a, b = _get(txn, aid, 6), _get(txn, aid, 7)
        _put(txn, aid, 6, b)
        _put(txn, aid, 7, a)

    _edit(d, swap)
    first = _verify(d).first
    assert first is not None and first.kind == "reordered" and first.seq == 6 and "reordered" in first.message


def test_rewritten_history_is_caught_by_the_signed_head(store: tuple[Path, list[str]]) -> None:
    """An attacker without the host key rewrites a record, re-hashes the rest and fixes the agent's head."""
    d, ids = store
    aid = ids[0]

    def rewrite(txn: Any) -> None:
        rec = txn.get_agent(aid)
        recs = [_get(txn, aid, s) for s in range(1, rec["audit_seq"] + 1)]
        recs[3]["decision"] = {"decision": "allow", "rules": ["forged"]}
        prev = audit.GENESIS
        for r in recs:
            body = {k: v for k, v in r.items() if k != "hash"} | {"prev": prev}
            r2 = audit.seal(aid, body.pop("seq"), prev, body.pop("t"), body.pop("kind"),
                            {k: v for k, v in body.items() if k not in ("agent_id", "prev")})
            _put(txn, aid, r2["seq"], r2)
            prev = r2["hash"]
        rec["audit_head"] = prev
        txn.put_agent(rec)

    _edit(d, rewrite)
    report = _verify(d)
    assert report.first is not None and report.first.kind == "modified"
    assert "signed head" in report.first.message and report.first.agent_id == aid


def test_tampered_signed_head_is_caught(store: tuple[Path, list[str]]) -> None:
    d, _ = store

    def edit(txn: Any) -> None:
        head = json.loads(txn.get_blob("audit_heads", "h/000000000001"))
        head["count"] += 1
        txn.put_blob("audit_heads", "h/000000000001", audit.canonical(head))

    _edit(d, edit)
    first = _verify(d).first
    assert first is not None and "signed head 1" in first.message and "signature" in first.message


# -- exports ----------------------------------------------------------------------------------------------------
def _export(d: Path, **kw: Any) -> list[str]:
    out = io.BytesIO()
    with Host(d) as host:
        audit.export(host.store, out, host.identity.key, **kw)
    return out.getvalue().decode().splitlines()


def _record_lines(lines: list[str]) -> list[int]:
    return [i for i, line in enumerate(lines) if line.startswith('{"record"')]


def _check(lines: list[str], **kw: Any) -> audit.VerifyReport:
    return audit.verify_export([line.encode() for line in lines], **kw)


def test_export_round_trip_and_each_tampering(store: tuple[Path, list[str]]) -> None:
    d, _ = store
    lines = _export(d)
    assert _check(lines).ok
    recs = _record_lines(lines)
    i = recs[5]
    # modified
    bad = list(lines)
    obj = json.loads(bad[i])
    obj["record"]["t"] += 1
    bad[i] = json.dumps(obj)
    first = _check(bad).first
    assert first is not None and first.kind == "modified" and first.where == f"line {i + 1}"
    # removed
    bad = lines[:i] + lines[i + 1:]
    first = _check(bad).first
    assert first is not None and first.kind == "removed" and f"before line {i + 1}" in first.message
    # reordered
    bad = list(lines)
    bad[i], bad[i + 1] = bad[i + 1], bad[i]
    first = _check(bad).first
    assert first is not None and first.kind == "reordered" and first.where == f"line {i + 1}"
    # inserted: a well-formed record linking to its predecessor, placed before the genuine one
    prev = json.loads(lines[i - 1])["record"]
    forged = audit.seal(prev["agent_id"], prev["seq"] + 1, prev["hash"], prev["t"], "approval.granted", {"by": "m"})
    bad = [*lines[:i], json.dumps({"record": forged}), *lines[i:]]
    first = _check(bad).first
    assert first is not None and first.kind == "inserted" and first.where == f"line {i + 1}"
    # truncated: the seal (and the end) cut off
    first = _check(lines[:-3]).first
    assert first is not None and first.kind in ("removed", "modified")


def test_export_rewritten_consistently_fails_on_its_seal_and_heads(store: tuple[Path, list[str]]) -> None:
    d, _ = store
    lines = _export(d)
    recs = _record_lines(lines)
    # rewrite the last record of the first agent and fix its manifest: only the signatures can tell
    last_of_first = max(i for i in recs if json.loads(lines[i])["record"]["agent_id"] == json.loads(lines[recs[0]])["record"]["agent_id"])
    rec = json.loads(lines[last_of_first])["record"]
    body = {k: v for k, v in rec.items() if k not in ("hash",)}
    body["error"] = {"code": "none", "message": "all fine"}
    new = audit.seal(body.pop("agent_id"), body.pop("seq"), body.pop("prev"), body.pop("t"), body.pop("kind"), body)
    bad = list(lines)
    bad[last_of_first] = json.dumps({"record": new})
    man_i = max(i for i in range(last_of_first) if lines[i].startswith('{"agent"'))
    man = json.loads(lines[man_i])
    man["agent"]["head"] = new["hash"]
    bad[man_i] = json.dumps(man)
    report = _check(bad)
    assert not report.ok
    assert any("signed head" in p.message or "seal" in p.message for p in report.problems)


def test_export_signed_by_another_key_fails_when_pinned(store: tuple[Path, list[str]]) -> None:
    d, _ = store
    out = io.BytesIO()
    with Host(d) as host:
        audit.export(host.store, out, HostKey.generate())
        pinned = {host.identity.key.key_id: host.identity.key.public}
    lines = out.getvalue().decode().splitlines()
    report = _check(lines, public_keys=pinned)
    assert not report.ok and report.first is not None and "not the pinned key" in report.first.message


def test_export_since_keeps_its_anchor(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    with Host(d) as host:
        recs = audit.stored_records(host.store, ids[0])
    since = recs[6]["t"]
    lines = _export(d, since=since)
    assert _check(lines).ok
    recs_i = _record_lines(lines)
    first_of_agent = next(i for i in recs_i if json.loads(lines[i])["record"]["agent_id"] == ids[0])
    bad = lines[:first_of_agent] + lines[first_of_agent + 1:]  # drop its first exported record
    first = _check(bad).first
    assert first is not None and first.kind == "removed"
    assert audit.parse_time("1970-01-01T00:00:10Z") == 10.0
    assert abs(audit.parse_time("1d") - (time.time() - 86400)) < 5


def test_cli_export_then_verify_file_names_the_altered_record(store: tuple[Path, list[str]], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    d, _ = store
    f = tmp_path / "log.jsonl"
    assert main(["audit", "export", "--store", str(d), "-o", str(f)]) == 0
    assert main(["audit", "verify", "--file", str(f)]) == 0
    lines = f.read_text().splitlines()
    i = _record_lines(lines)[3]
    lines[i] = lines[i].replace('"kind":"', '"kind":"x', 1)
    f.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["audit", "verify", "--file", str(f)]) == 1
    out = capsys.readouterr().out
    assert f"line {i + 1}" in out and "modified" in out


# -- signed heads and retention -----------------------------------------------------------------------------------
def test_host_seals_heads_periodically(store: tuple[Path, list[str]], bundles: Any) -> None:
    d, _ = store
    with Host(d) as host:
        n0 = audit.verify_store(host.store).heads
        host.heads.interval_s = 0.0
        anyio.run(lambda: host.run(bundles.load(STEPS), {"n": 1}))
        heads = audit.verify_store(host.store)
    assert heads.ok and heads.heads > n0
    with Host(d) as host:
        host.heads.interval_s = 0.0
        assert host.heads.maybe_seal() is None  # nothing changed: no new head


def test_pruning_keeps_the_rest_verifiable(store: tuple[Path, list[str]], tmp_path: Path) -> None:
    from host.cli import main

    d, ids = store
    with Host(d) as host:
        recs = audit.stored_records(host.store, ids[0])
        cut = recs[9]["t"]
        result = audit.prune(host.store, host.identity.key, before=cut)
        older = sum(1 for r in recs if r["t"] < cut)
        assert result["refused"] == [] and result["records"] >= older > 0
        left = audit.stored_records(host.store, ids[0])
        assert left[0]["kind"] == audit.CHECKPOINT_KIND and left[0]["hash"] == recs[left[0]["seq"] - 1]["hash"]
        assert left[1:] == [r for r in recs if r["seq"] > left[0]["seq"]]
        assert audit.verify_store(host.store).ok
        # pruning again, further, folds the old checkpoint into the new one
        audit.prune(host.store, host.identity.key, before=time.time() + 1)
        cp = audit.stored_records(host.store, ids[0])
        assert len(cp) == 1 and cp[0]["pruned"]["from_seq"] == 1 and cp[0]["pruned"]["count"] == len(recs)
        assert audit.verify_store(host.store).ok
    f = tmp_path / "pruned.jsonl"
    assert main(["audit", "export", "--store", str(d), "-o", str(f)]) == 0
    assert main(["audit", "verify", "--file", str(f), "--store", str(d)]) == 0

    def forge(txn: Any) -> None:  # a checkpoint claiming fewer records were pruned
        key = audit.record_key(ids[0], cp[0]["seq"])
        rec = json.loads(txn.get_blob("audit", key))
        rec["pruned"]["count"] = 1
        txn.put_blob("audit", key, audit.canonical(rec))

    _edit(d, forge)
    first = _verify(d).first
    assert first is not None and "checkpoint" in first.message and first.agent_id == ids[0]


def test_pruning_refuses_a_broken_chain(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    _edit(d, lambda txn: txn.delete_blob("audit", audit.record_key(ids[1], 2)))
    with Host(d) as host:
        result = audit.prune(host.store, host.identity.key, before=time.time() + 1)
        assert [r["agent_id"] for r in result["refused"]] == [ids[1]]
        assert "removed" in result["refused"][0]["reason"]
    assert _verify(d).first.agent_id == ids[1]  # the evidence is still there


def test_every_single_line_edit_of_an_export_is_detected(store: tuple[Path, list[str]]) -> None:
    """Modify, delete, duplicate or swap any one line (records, manifest, heads, header, seal): never accepted."""
    d, _ = store
    lines = _export(d)
    assert _check(lines).ok
    for i, line in enumerate(lines):
        obj = json.loads(line)
        ((kind, value),) = obj.items()
        key = next(k for k in sorted(value) if k not in ("sig",))
        changed = dict(value, **{key: "tampered"})
        variants = {
            "modified": [*lines[:i], json.dumps({kind: changed}), *lines[i + 1:]],
            "deleted": lines[:i] + lines[i + 1:],
            "duplicated": [*lines[:i + 1], line, *lines[i + 1:]],
        }
        if i + 1 < len(lines) and lines[i + 1] != line:
            variants["swapped"] = [*lines[:i], lines[i + 1], line, *lines[i + 2:]]
        for what, bad in variants.items():
            report = _check(bad)
            assert not report.ok, f"{what} line {i + 1} ({kind}) went unnoticed"
            assert report.first is not None and report.first.message


def test_every_single_record_edit_in_the_store_is_detected(store: tuple[Path, list[str]]) -> None:
    d, ids = store
    with Host(d) as host:
        for aid in ids:
            with host.store.read() as txn:
                original = dict(txn.iter_blobs("audit", f"{aid}/"))
            keys = sorted(original)
            for i, k in enumerate(keys):
                rec = json.loads(original[k])
                edits: dict[str, Any] = {
                    "modified": lambda txn, k=k, rec=rec: txn.put_blob("audit", k, audit.canonical(rec | {"t": 0})),
                    "deleted": lambda txn, k=k: txn.delete_blob("audit", k),
                }
                if i + 1 < len(keys):
                    nk = keys[i + 1]
                    a, b = original[k], original[nk]
                    edits["swapped"] = lambda txn, k=k, nk=nk, a=a, b=b: (txn.put_blob("audit", k, b),
                                                                         txn.put_blob("audit", nk, a))
                for what, edit in edits.items():
                    host.store.transact(edit)
                    report = audit.verify_store(host.store)
                    assert not report.ok, f"{what} {k} went unnoticed"
                    assert report.first is not None and report.first.agent_id == aid, report.first
                    host.store.transact(lambda txn, saved=original: [txn.put_blob("audit", key, v)
                                                                     for key, v in saved.items()])
        assert audit.verify_store(host.store).ok
