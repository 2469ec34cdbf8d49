"""Calls answered inside the guest's ``tool_call`` import, with no unwind and rewind.

With ``checkpoint_every`` above 1, an allowed ``kv.incr`` between checkpoints is answered
inline when the store can commit it at once (:meth:`ToolCallPipeline.answer_inline`). These
tests run real guests on real Wasmtime and real LMDB stores and check that the fast path
really runs (its counter), and that it changes nothing a run leaves behind: outputs,
journals, kv values, fuel and audit events equal those of the same run with every call
unwound; that what it must not answer (a denial, an approval, a call of a tool that is not
transactional) goes the usual way; that fuel budgets and the event loop's other tasks are
kept; and that a journal entry lost on disk past the checkpoint is refused at resume
(RecordCorrupt), never a recorded call run twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import lmdb
import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory
from test_crash_replay import cut_mid_run

from host.runtime import tool_call
from host.runtime.host import Host
from host.runtime.tool_call import ToolCallPipeline
from host.sandbox import bundle as bundle_mod
from host.sandbox import execution
from host.trust import audit
from snapshots.errors import StoreUnavailable
from snapshots.lmdb_store import _seq_key

EVERY = 64

#: Fields of an audit event that name the run, not what it did: its agent, its times, its chain
#: links, its identity token, and a checkpoint's compressed size (the snapshot holds its time).
_RUN_FIELDS = {"agent_id", "t", "prev", "hash", "seq", "n", "expires_at", "issued_at", "token_id", "key_id",
               "input_digest", "late_s", "size"}


@pytest.fixture(autouse=True)
def _window_in_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    # The replay window counted in calls alone: the checkpoints fall at the same calls on a
    # loaded machine, so that two runs can be compared event by event.
    monkeypatch.setattr(tool_call, "CHECKPOINT_EVERY_S", 3600.0)


def _host(path: Path, durability: str = "process") -> Host:
    host = Host(path, checkpoint_every=EVERY, durability=durability)
    # Every guest segment on the loop's thread (where calls can be answered inline): on a
    # loaded machine a segment may outlast the 1 ms that otherwise sends it to a thread.
    host.guest.inline_segment_s = 10.0
    return host


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = _host(tmp_path / "store")
    try:
        yield h
    finally:
        h.close()


def _unwound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call the usual way: unwound, answered by the pipeline, rewound."""
    monkeypatch.setattr(ToolCallPipeline, "answer_inline", lambda self, agent, call: None)


def _events(host: Host, agent_id: str) -> list[dict[str, Any]]:
    return [{k: v for k, v in e.items() if k not in _RUN_FIELDS} for e in audit.records(host.store, agent_id)]


def _journal(host: Host, agent_id: str) -> list[tuple[int, dict[str, Any]]]:
    with host.store.read() as txn:
        return [(seq, {k: v for k, v in e.items() if k != "t"}) for seq, e in txn.iter_journal(agent_id)]


def _counter(host: Host, agent_id: str) -> bytes | None:
    with host.store.read() as txn:
        value: bytes | None = txn.kv_get(f"agent:{agent_id}", "counter")
        return value


def _run(host: Host, b: bundle_mod.Bundle, input: Any) -> Any:
    return anyio.run(lambda: host.run(b, input))


@pytest.mark.parametrize("durability", ["process", "sync"])
def test_inline_and_unwound_runs_leave_the_same_record(bundles: BundleFactory, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, durability: str) -> None:
    b = bundles.load(EXAMPLES / "steps")
    n = 300
    with _host(tmp_path / "inline", durability) as host:
        fast = _run(host, b, {"n": n})
        answered = host.calls.answered_inline
        assert fast.status == "completed" and fast.output == {"sum": n * (n + 1) // 2, "last": n}
        assert answered > n // 4, f"only {answered} of {n} calls were answered inline"
        fast_rec = host.get_agent(fast.agent_id)
        fast_journal, fast_events = _journal(host, fast.agent_id), _events(host, fast.agent_id)
        fast_counter = _counter(host, fast.agent_id)
        assert audit.verify_store(host.store, agent_id=fast.agent_id).ok
    with monkeypatch.context() as m:
        _unwound(m)
        with _host(tmp_path / "unwound", durability) as host:
            slow = _run(host, b, {"n": n})
            assert host.calls.answered_inline == 0
            slow_rec = host.get_agent(slow.agent_id)
            slow_journal, slow_events = _journal(host, slow.agent_id), _events(host, slow.agent_id)
            slow_counter = _counter(host, slow.agent_id)
    assert slow.output == fast.output
    assert fast_counter == slow_counter == str(n).encode()
    assert fast_journal == slow_journal  # the same calls, answers, checkpoints and fuel, call by call
    assert len(fast_journal) == n
    assert fast_events == slow_events
    for key in ("fuel_used", "tool_calls", "suspensions", "calls_by_tool", "denials"):
        assert fast_rec["usage"][key] == slow_rec["usage"][key], key
    assert fast_rec["checkpoints"] == slow_rec["checkpoints"] < n // 4


def _caller_policy(tmp_path: Path) -> Path:
    """The caller guest under a policy whose ``kv.incr`` is plain (answered inline), whose
    ``kv.set`` denies one key and asks a person for another, and which grants a tool that is
    not transactional (``clock.now``)."""
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "agent.c").write_text((GUESTS / "caller" / "agent.c").read_text())
    (d / "policy.toml").write_text('''[agent]
name = "mixed"

[tools."kv.incr"]

[tools."kv.set"]
approval = { when = "key == 'ask'", reason = "a person says" }
[tools."kv.set".args.key]
allow = ["x", "ask"]

[tools."clock.now"]
''')
    return d


def test_denial_approval_and_other_tools_between_inline_calls_go_the_usual_way(
        bundles: BundleFactory, tmp_path: Path, host: Host) -> None:
    b = bundles.load(_caller_policy(tmp_path))
    incr = {"tool": "kv.incr", "args": {"key": "a"}}
    calls = ([incr] * 10 + [{"tool": "kv.set", "args": {"key": "no", "value": 1}}] + [incr] * 10
             + [{"tool": "clock.now", "args": {}}] + [incr] * 10
             + [{"tool": "kv.set", "args": {"key": "ask", "value": 2}}] + [incr] * 10)
    res = _run(host, b, {"calls": calls})
    assert res.status == "waiting_approval", res.error
    before = host.calls.answered_inline
    assert before > 10, f"only {before} calls were answered inline"
    agent_id = res.agent_id
    res = anyio.run(lambda: host.approve(agent_id))
    assert res.status == "completed", res.error
    assert host.calls.answered_inline > before  # inline again after the approval's resume
    r = res.output["results"]
    assert len(r) == len(calls)
    incrs = [x["value"]["value"] for x, c in zip(r, calls, strict=True) if c is incr]
    assert incrs == list(range(1, 41))
    assert r[10]["code"] == "denied" and r[10]["reason_code"] == "invalid_args"
    assert r[21]["rc"] == 0 and r[21]["code"] == "ok"  # clock.now, unwound and run the usual way
    assert r[32]["rc"] == 0  # the approved kv.set
    events = audit.records(host.store, agent_id)
    assert [e["call_seq"] for e in events if e["kind"] == "tool.denied"] == [11]
    assert [e["call_seq"] for e in events if e["kind"] == "tool.approval_requested"] == [33]
    answered = sorted(e["call_seq"] for e in events if e["kind"] == "tool.answered")
    assert answered == list(range(1, len(calls) + 1))  # each call answered once, the denial too
    assert audit.verify_store(host.store, agent_id=agent_id).ok
    with host.store.read() as txn:
        assert [seq for seq, _ in txn.iter_journal(agent_id)] == list(range(1, len(calls) + 1))
        assert txn.kv_get(f"agent:{agent_id}", "a") == b"40"
        assert txn.kv_get(f"agent:{agent_id}", "ask") == b"2"
        assert txn.kv_get(f"agent:{agent_id}", "no") is None


def test_a_guest_burning_fuel_between_inline_calls_is_stopped_by_its_fuel_budget(
        bundles: BundleFactory, host: Host) -> None:
    b = bundles.load(GUESTS / "spinner")  # fuel = 20,000,000
    res = _run(host, b, {"n": 100_000, "spin": 2_000})
    assert res.status == "failed" and res.error is not None and res.error["code"] == "out_of_fuel", res.error
    assert host.calls.answered_inline > 100
    rec = host.get_agent(res.agent_id)
    with host.store.read() as txn:
        made = len(list(txn.iter_journal(res.agent_id)))
    assert 100 < made < 100_000
    assert rec["usage"]["tool_calls"] == made
    assert rec["usage"]["fuel_used"] <= b.policy.budgets.fuel
    assert _counter(host, res.agent_id) == str(made).encode()  # every call counted once, none lost


def test_the_loop_runs_other_tasks_while_an_agent_is_answered_inline(bundles: BundleFactory,
                                                                    tmp_path: Path) -> None:
    b = bundles.load(EXAMPLES / "steps")
    n, every = 3000, 1000
    seen: list[int] = []  # calls answered inline so far, each time the other task ran
    results: list[Any] = []
    host = Host(tmp_path / "store", checkpoint_every=every, durability="process")
    host.guest.inline_segment_s = 10.0

    async def main() -> None:
        async def agent() -> None:
            results.append(await host.run(b, {"n": n}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(agent)
            while not results:  # another task of the loop: it runs whenever the agent gives the loop back
                seen.append(host.calls.answered_inline)
                await anyio.sleep(0)

    try:
        anyio.run(main)
        assert results[0].status == "completed"
        assert host.calls.answered_inline > n // 2
    finally:
        host.close()
    # Without its time slice an agent answered inline would make up to a window's worth of
    # calls (`every`) in one guest segment, the loop held all along; with it, it gives the
    # loop back every millisecond or so: a few calls.
    longest = max(b - a for a, b in itertools.pairwise(seen))
    assert longest < every // 5, f"{longest} calls were answered inline while the loop's other task waited"


def test_a_journal_entry_lost_past_the_checkpoint_is_record_corrupt_not_a_call_run_again(
        bundles: BundleFactory, tmp_path: Path) -> None:
    """The run is cut between checkpoints (its commits stay, as after a SIGKILL), an entry past
    the checkpoint is deleted from the LMDB file, and the resume must not go live early: the
    agent's record says it made that call, so it is parked ``corrupt`` and its kv counter,
    call count and journal stay as they were."""
    b = bundle_mod.load(bundles.example("steps"))
    path = tmp_path / "store"
    host = Host(path, checkpoint_every=1000)
    try:
        agent_id = cut_mid_run(host, b, 20)
        with host.store.read() as txn:
            seqs = [seq for seq, _ in txn.iter_journal(agent_id)]
        last = max(seqs)
        counter = _counter(host, agent_id)
        calls = host.get_agent(agent_id)["usage"]["tool_calls"]
        assert counter == str(last).encode() and calls == last
    finally:
        host.close()
    lost = last - 3
    env = lmdb.open(str(path / "db"), max_dbs=32)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(_seq_key(agent_id, lost, "call_seq"), db=env.open_db(b"journal", txn=txn))
    finally:
        env.close()

    host = Host(path, checkpoint_every=1000)
    try:
        result = anyio.run(lambda: host.resume(agent_id))
        assert result.status == "corrupt", result
        assert result.error is not None and result.error["code"] == "record_corrupt", result.error
        assert f"journal entry {lost}" in result.error["message"]
        assert _counter(host, agent_id) == counter  # no recorded call ran again
        assert host.get_agent(agent_id)["usage"]["tool_calls"] == calls
        with host.store.read() as txn:
            assert [seq for seq, _ in txn.iter_journal(agent_id)] == [s for s in seqs if s != lost]
    finally:
        host.close()


def _in_guest() -> bool:
    """Whether this runs inside a guest's call into wasm: in an import, a call answered inline."""
    return getattr(execution._tls, "ex", None) is not None


def test_a_host_error_before_the_commit_declines_and_the_usual_way_answers(
        bundles: BundleFactory, host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every seventh inline attempt fails at its last stage before the commit (after the call
    was counted, decided and audited): the call is not trapped but goes the usual way, from
    the state the agent had before the attempt, and nothing is counted or audited twice."""
    real = ToolCallPipeline.transaction
    attempts = [0]

    def failing(self: ToolCallPipeline, *a: Any, **k: Any) -> Any:
        if _in_guest():
            attempts[0] += 1
            if attempts[0] % 7 == 0:
                raise RuntimeError("a host error before the commit")
        return real(self, *a, **k)

    monkeypatch.setattr(ToolCallPipeline, "transaction", failing)
    n = 300
    res = _run(host, bundles.load(EXAMPLES / "steps"), {"n": n})
    assert res.status == "completed" and res.output == {"sum": n * (n + 1) // 2, "last": n}, res.error
    assert attempts[0] >= 14 and host.calls.answered_inline > n // 4
    usage = host.get_agent(res.agent_id)["usage"]
    assert usage["tool_calls"] == usage["suspensions"] == n and usage["calls_by_tool"] == {"kv.incr": n}
    events = audit.records(host.store, res.agent_id)
    for kind in ("tool.requested", "tool.allowed", "tool.answered"):
        assert sorted(e["call_seq"] for e in events if e["kind"] == kind) == list(range(1, n + 1)), kind
    assert audit.verify_store(host.store, agent_id=res.agent_id).ok
    with host.store.read() as txn:
        assert [seq for seq, _ in txn.iter_journal(res.agent_id)] == list(range(1, n + 1))


def test_a_store_failing_an_inline_commit_stops_the_run_as_on_the_usual_way(
        bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses a commit made inside the guest's import: the run stops with the
    store's error (as a failing commit of the usual way stops it), the agent stays at its
    last commit, and a resume once the store is back finishes it exactly."""
    path = tmp_path / "store"
    b = bundles.load(EXAMPLES / "steps")
    n = 300
    host = _host(path)
    store: Any = host.store
    real = store.transact_batch
    failed: list[int] = []

    def transact_batch(fns: Any, **kw: Any) -> Any:
        if not failed and _in_guest() and host.calls.answered_inline >= 20:
            failed.append(host.calls.answered_inline)
            raise StoreUnavailable("the disk went away")
        return real(fns, **kw)

    monkeypatch.setattr(store, "transact_batch", transact_batch)
    try:
        with pytest.raises(StoreUnavailable):
            _run(host, b, {"n": n})
        assert failed
        (agent_id,) = [r["agent_id"] for r in host.list_agents()]
        with host.store.read() as txn:
            made = len(list(txn.iter_journal(agent_id)))
        assert _counter(host, agent_id) == str(made).encode()  # nothing of the failed commit
    finally:
        host.close()
    with _host(path) as host:
        res = anyio.run(lambda: host.resume(agent_id))
        assert res.status == "completed" and res.output == {"sum": n * (n + 1) // 2, "last": n}, res.error
        assert _counter(host, agent_id) == str(n).encode()
        assert host.get_agent(agent_id)["usage"]["tool_calls"] == n
        assert audit.verify_store(host.store, agent_id=agent_id).ok
