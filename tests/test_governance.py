"""Governance through a real guest: every tool call decided by the policy, denials the guest can read,
terminations with reports, human approval across processes, budgets, pools and stalls."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import EXAMPLES, GUESTS, BundleFactory

from host.errors import AgentNotFound, AgentStateError
from host.runtime import Host, RunResult
from host.runtime.pools import PriorityPool
from host.sandbox import bundle as bundle_mod

TOOLS = '''
from pydantic import BaseModel, ConfigDict
from host.tools import ToolContext, ToolError


class SendArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str
    body: str


def send(args: SendArgs, ctx: ToolContext) -> dict:
    return {"sent": True}


class PayArgs(BaseModel):
    amount: int
    vendor: str = "acme"


def pay(args: PayArgs, ctx: ToolContext) -> dict:
    ctx.store.transact(lambda txn: txn.kv_set("test:payments", f"{ctx.agent_id}:{ctx.call_seq}", str(args.amount).encode()))
    return {"paid": args.amount}


class ThinkArgs(BaseModel):
    tokens: int


def think(args: ThinkArgs, ctx: ToolContext) -> dict:
    ctx.report_tokens(args.tokens)
    return {"thought": True}


from host.tools import tool


class PostArgs(BaseModel):
    fail: bool


@tool("ledger.post", transactional=True)
def post(args: PostArgs, ctx: ToolContext, txn) -> dict:
    txn.kv_set("test:ledger", f"entry-{ctx.call_seq}", b"1")
    if args.fail:
        raise ToolError("ledger_closed", "the ledger is closed")
    return {"posted": ctx.call_seq}


class BigArgs(BaseModel):
    n: int


def big(args: BigArgs, ctx: ToolContext) -> dict:
    return {"blob": "x" * args.n}


def boom(args: BigArgs, ctx: ToolContext) -> dict:
    raise RuntimeError("kaput")


class SleepArgs(BaseModel):
    ms: int


async def sleep(args: SleepArgs, ctx: ToolContext) -> dict:
    import anyio
    await anyio.sleep(args.ms / 1000)
    return {"slept": args.ms}
'''


@pytest.fixture(autouse=True)
def gov_tools(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator installs the tools these policies name (gov_tools.py in a tools directory)."""
    from host.tools.sources import TOOLS_PATH_ENV

    d = tmp_path_factory.getbasetemp() / "gov-tools"
    d.mkdir(exist_ok=True)
    (d / "gov_tools.py").write_text(TOOLS)
    monkeypatch.setenv(TOOLS_PATH_ENV, str(d))


@pytest.fixture(scope="module")
def caller_module(bundles: BundleFactory) -> bytes:
    return bundles.load(GUESTS / "caller").module


def make(module: bytes, policy: str) -> bundle_mod.Bundle:
    return bundle_mod.load_bytes(bundle_mod.pack(module, policy))


def run(host: Host, b: bundle_mod.Bundle, calls: list[dict[str, Any]], **kw: Any) -> RunResult:
    return anyio.run(lambda: host.run(b, {"calls": calls}, **kw))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Host(tmp_path) as h:
        yield h


POLICY_HEAD = '[agent]\nname = "gov"\n'


def test_argument_constraints_each_kind(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '''
[tools."outbox.send"]
handler = "gov_tools:send"
[tools."outbox.send".args.to]
allow = ["#support", "#ops"]
required = true
[tools."outbox.send".args.body]
forbid_pattern = "(?i)password"
max_length = 40
[tools."pay"]
handler = "gov_tools:pay"
[tools."pay".args.amount]
min = 1
max = 1000
[tools."pay".args.vendor]
pattern = "^[a-z]+$"
[tools."pay".args."meta.override"]
forbidden = true
[tools."pay".args."meta.level"]
max = 3
'''
    res = run(host, make(caller_module, policy), [
        {"tool": "outbox.send", "args": {"to": "#support", "body": "hi"}},
        {"tool": "outbox.send", "args": {"to": "#all-company", "body": "hi"}},
        {"tool": "outbox.send", "args": {"body": "hi"}},
        {"tool": "outbox.send", "args": {"to": "#ops", "body": "the password is hunter2"}},
        {"tool": "outbox.send", "args": {"to": "#ops", "body": "x" * 41}},
        {"tool": "pay", "args": {"amount": 5000}},
        {"tool": "pay", "args": {"amount": 10, "vendor": "Evil Corp"}},
        {"tool": "pay", "args": {"amount": 10, "meta": {"override": True}}},
        {"tool": "pay", "args": {"amount": 10, "meta": {"level": 9}}},
        {"tool": "pay", "args": {"amount": 10}},
    ])
    assert res.status == "completed", res.error
    r = res.output["results"]
    assert [x["rc"] for x in r] == [0, -7, -7, -7, -7, -7, -7, -7, -7, 0]
    assert all(x["code"] == "denied" for x in r[1:9])
    assert all(x["reason_code"] == "invalid_args" for x in r[1:9])
    assert r[7]["rule"].endswith("forbidden") and r[8]["rule"].endswith("max")
    assert r[1]["rule"] == 'tools."outbox.send".args.to.allow'
    assert "#all-company" in r[1]["value"]["message"]


def test_pii_in_outbound_arguments_is_denied(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '''
[tools."outbox.send"]
handler = "gov_tools:send"
[[validators]]
on = ["tool:outbox.send"]
detect = ["email", "card", "secret"]
'''
    res = run(host, make(caller_module, policy), [
        {"tool": "outbox.send", "args": {"to": "x", "body": "write to ada@example.com"}},
        {"tool": "outbox.send", "args": {"to": "x", "body": "card 4111 1111 1111 1111"}},
        {"tool": "outbox.send", "args": {"to": "x", "body": "key AKIAIOSFODNN7EXAMPLE"}},
        {"tool": "outbox.send", "args": {"to": "x", "body": "order 4111 1111 1111 1112 shipped"}},
    ])
    r = res.output["results"]
    assert [x["reason_code"] for x in r[:3]] == ["pii_detected", "pii_detected", "secret_detected"]
    assert r[3]["rc"] == 0  # not Luhn-valid: not a card
    assert "4111 1111 1111 1111" not in json.dumps(r)  # the reason masks what it found


def test_rate_limit_under_a_hammering_guest(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[tools."kv.incr"]\nrate = "5/min"\n'
    res = run(host, make(caller_module, policy), [{"tool": "kv.incr", "args": {"key": "k"}}] * 20)
    r = res.output["results"]
    assert sum(1 for x in r if x["rc"] == 0) == 5
    denied = [x for x in r if x["rc"] != 0]
    assert len(denied) == 15 and all(x["reason_code"] == "rate_limited" for x in denied)
    assert all(x["rc"] == -9 and x["code"] == "rate_limited" and x["value"]["retryable"] for x in denied)
    assert all(x["value"]["retry_after_s"] > 0 for x in denied)
    assert r[4]["value"] == {"value": 5}


def test_repeated_denials_terminate_with_a_report(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[budgets]\nmax_denials = 2\n[tools."kv.incr"]\n'
    res = run(host, make(caller_module, policy), [{"tool": "kv.set", "args": {"key": "k", "value": 1}}] * 5)
    assert res.status == "terminated"
    assert res.error is not None and res.error["code"] == "too_many_denials"
    info = host.inspect(res.agent_id)
    assert info["error"]["report"]["cause"]["code"] == "not_granted"
    assert info["usage"]["denials"] == 3


def test_token_budget_warns_then_terminates(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[budgets]\ntokens = 1000\ntoken_warnings = [0.5]\n[tools."llm.think"]\nhandler = "gov_tools:think"\n'
    res = run(host, make(caller_module, policy), [{"tool": "llm.think", "args": {"tokens": 400}}] * 5)
    assert res.status == "terminated"
    assert res.error is not None and res.error["code"] == "budget_exceeded"
    assert res.tokens == 1200
    kinds = [r["kind"] for r in host.audit_records(res.agent_id)]
    assert kinds.count("budget.warning") == 1
    assert "budget.exceeded" in kinds
    assert kinds[-1] == "agent.terminated"


def test_tool_call_budget(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[budgets]\ntool_calls = 3\n[tools."kv.incr"]\n'
    res = run(host, make(caller_module, policy), [{"tool": "kv.incr", "args": {"key": "k"}}] * 5)
    assert res.status == "terminated" and res.error is not None
    assert res.error["code"] == "budget_exceeded"
    assert host.inspect(res.agent_id)["usage"]["calls_by_tool"] == {"kv.incr": 3}


def test_output_guardrail(host: Host, bundles: BundleFactory) -> None:
    hello = bundles.load(EXAMPLES / "hello")
    policy = '[agent]\nname = "hello"\n[[validators]]\non = ["output"]\ndetect = ["email"]\n'
    b = bundle_mod.load_bytes(bundle_mod.pack(hello.module, policy))
    assert anyio.run(lambda: host.run(b, {"name": "ada"})).status == "completed"
    res = anyio.run(lambda: host.run(b, {"name": "ada@example.com"}))
    assert res.status == "failed" and res.error is not None
    assert res.error["code"] == "output_rejected"
    assert res.output is None


APPROVAL_POLICY = POLICY_HEAD + '''
[tools."pay"]
handler = "gov_tools:pay"
approval = { when = "amount > 100", reason = "above spending authority" }
'''


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


def test_approval_from_another_process(caller_module: bytes, tmp_path: Path) -> None:
    b = make(caller_module, APPROVAL_POLICY)
    with Host(tmp_path) as host:
        small = run(host, b, [{"tool": "pay", "args": {"amount": 50}}])
        assert small.status == "completed"
        big = run(host, b, [{"tool": "pay", "args": {"amount": 500}}, {"tool": "pay", "args": {"amount": 7}}])
        assert big.status == "waiting_approval"
        assert big.approval is not None and big.approval["rule"] == "tools.pay.approval"
        assert big.approval["reason"].startswith("above spending authority")
        pending = host.approvals()
        assert [p["agent_id"] for p in pending] == [big.agent_id]
        assert pending[0]["call"]["args"] == {"amount": 500, "vendor": "acme"} or pending[0]["call"]["args"]["amount"] == 500
    listed = json.loads(_cli("approvals", "--store", str(tmp_path), "--json").stdout)
    assert listed[0]["rule"] == "tools.pay.approval"
    done = _cli("approve", big.agent_id, "--note", "ok by finance", "--store", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["status"] == "completed"
    assert [r["value"] for r in out["output"]["results"]] == [{"paid": 500}, {"paid": 7}]
    again = _cli("approve", big.agent_id, "--store", str(tmp_path))
    assert again.returncode == 2 and "not waiting for approval" in again.stderr
    with Host(tmp_path) as host:
        assert host.approvals() == []
        kinds = [r["kind"] for r in host.audit_records(big.agent_id)]
        assert "tool.approval_requested" in kinds and "approval.granted" in kinds


def test_deny_gives_the_guest_a_denial(host: Host, caller_module: bytes) -> None:
    b = make(caller_module, APPROVAL_POLICY)
    res = run(host, b, [{"tool": "pay", "args": {"amount": 500}}, {"tool": "pay", "args": {"amount": 5}}])
    assert res.status == "waiting_approval"
    out = anyio.run(lambda: host.deny(res.agent_id, reason="not this quarter", by="cfo"))
    assert out.status == "completed"
    first, second = out.output["results"]
    assert first["rc"] == -7 and "not this quarter" in first["value"]["message"]
    assert second["value"] == {"paid": 5}


@pytest.mark.parametrize("decision", ["deny", "approve", "resolve"])
def test_a_decision_changed_in_the_journal_parks_the_agent(host: Host, caller_module: bytes, decision: str) -> None:
    """A person's decision is journaled sealed: rewritten on disk into a payment that never ran, it is refused."""
    from host.runtime import approvals as approvals_mod
    from snapshots import sealed

    b = make(caller_module, APPROVAL_POLICY)
    res = run(host, b, [{"tool": "pay", "args": {"amount": 500}}])
    assert res.status == "waiting_approval" and res.pending is not None
    seq, aid = int(res.pending["seq"]), res.agent_id
    if decision == "deny":
        approvals_mod.deny(host.store, aid, reason="no", by="cfo", where=None)
    elif decision == "approve":
        approvals_mod.approve(host.store, aid, note=None, by="cfo", where=None)
    else:  # an operator supplies the result of a call left in doubt
        host.store.transact(lambda t: t.put_agent({**t.get_agent(aid), "status": "in_doubt"}))
        approvals_mod.resolve(host.store, host.identity, aid, retry=False, result={"paid": 1}, fail=None, by="ops")
    key = aid.encode() + b"\0" + seq.to_bytes(8, "big")

    def rewrite(t: Any) -> None:
        raw = t._txn.get(key, db=t._dbs["journal"])
        entry = json.loads(raw[sealed.HEADER_SIZE:])
        entry.update(state="done", status=0, response=json.dumps({"paid": 500}))
        t._txn.put(key, raw[:sealed.HEADER_SIZE] + json.dumps(entry).encode(), db=t._dbs["journal"])

    host.store.transact(rewrite)
    out = anyio.run(lambda: host.resume(aid))
    assert out.status == "corrupt" and out.output is None and out.error is not None, out
    assert out.error["code"] == "record_corrupt"
    assert f"journal entry {seq} of agent {aid} does not match its digest" in out.error["message"]
    with host.store.read() as txn:
        assert txn.kv_keys("test:payments", "") == []  # the tool never ran


def test_two_operators_approve_at_once_one_wins(caller_module: bytes, tmp_path: Path) -> None:
    b = make(caller_module, APPROVAL_POLICY)
    with Host(tmp_path) as host:
        res = run(host, b, [{"tool": "pay", "args": {"amount": 500}}])
    procs = [subprocess.Popen([sys.executable, "-m", "host.cli", "approve", res.agent_id, "--store", str(tmp_path), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(o for o, p in zip(outs, procs, strict=True) if p.returncode == 2)
    assert "not waiting for approval" in loser[0] or "being run" in loser[0]
    with Host(tmp_path) as host, host.store.read() as txn:
        assert len(txn.kv_keys("test:payments", "")) == 1  # the tool ran exactly once


def test_approve_or_deny_unknown_running_or_finished(host: Host, caller_module: bytes) -> None:
    with pytest.raises(AgentNotFound):
        anyio.run(lambda: host.approve("01NOSUCHAGENT0000000000000"))
    done = run(host, make(caller_module, APPROVAL_POLICY), [{"tool": "pay", "args": {"amount": 1}}])
    with pytest.raises(AgentStateError, match="completed"):
        anyio.run(lambda: host.deny(done.agent_id, reason="x"))


def test_pool_caps_concurrency_and_loses_nobody(bundles: BundleFactory, tmp_path: Path) -> None:
    hello = bundles.load(EXAMPLES / "hello")
    n = 10_000
    with Host(tmp_path, pool_size=64) as host:
        results: list[RunResult] = []

        async def main() -> None:
            async def one(i: int) -> None:
                results.append(await host.run(hello, {"name": str(i)}))

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)

        anyio.run(main)
        assert host.pool.peak == 64
        assert host.pool.in_use == 0
    assert len(results) == n
    assert all(r.status == "completed" for r in results)
    assert sorted(int(r.output["greeting"].split(", ")[1]) for r in results) == list(range(n))


def test_priority_pool_serves_higher_priority_first() -> None:
    order: list[int] = []

    async def main() -> None:
        pool = PriorityPool(1)
        await pool.acquire()

        async def waiter(prio: int) -> None:
            async with pool.slot(prio):
                order.append(prio)

        async with anyio.create_task_group() as tg:
            for prio in (1, 5, 3, 5, 0):
                tg.start_soon(waiter, prio)
            await anyio.sleep(0.05)
            pool.release()

    anyio.run(main)
    assert order == [5, 5, 3, 1, 0]


def test_failing_transactional_tool_leaves_nothing_behind(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[tools."ledger.post"]\nhandler = "gov_tools:post"\n'
    res = run(host, make(caller_module, policy), [
        {"tool": "ledger.post", "args": {"fail": False}},
        {"tool": "ledger.post", "args": {"fail": True}},
    ])
    r = res.output["results"]
    assert r[0]["value"] == {"posted": 1}
    assert r[1]["code"] == "ledger_closed" and r[1]["rc"] == -6
    with host.store.read() as txn:
        assert txn.kv_keys("test:ledger", "") == ["entry-1"]


def test_tool_failures_reach_the_guest_as_structured_errors(host: Host, caller_module: bytes) -> None:
    policy = POLICY_HEAD + '[tools."big"]\nhandler = "gov_tools:big"\n[tools."boom"]\nhandler = "gov_tools:boom"\n'
    res = run(host, make(caller_module, policy), [
        {"tool": "big", "args": {"n": 10}},
        {"tool": "big", "args": {"n": 2 << 20}},
        {"tool": "boom", "args": {"n": 1}},
        {"tool": "big", "args": {"n": "ten"}},
    ])
    assert res.status == "completed", res.error
    ok, too_large, raised, bad = res.output["results"]
    assert ok["value"] == {"blob": "x" * 10}
    assert (too_large["rc"], too_large["code"]) == (-8, "result_too_large")
    assert (raised["rc"], raised["code"]) == (-6, "tool_failed") and "kaput" in raised["value"]["message"]
    assert (bad["rc"], bad["code"]) == (-5, "invalid_args")


def test_stalled_agent_is_reported(caller_module: bytes, tmp_path: Path) -> None:
    policy = POLICY_HEAD + '[budgets]\nstall_timeout = "300ms"\n[tools."sleep"]\nhandler = "gov_tools:sleep"\n'
    b = make(caller_module, policy)
    seen: dict[str, Any] = {}
    with Host(tmp_path) as host:
        def watch() -> None:  # the tool sleeps 1.5 s: stalled from 0.3 s after its call began until it answers
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                seen["agents"] = host.list_agents()
                if any(a["stalled"] for a in seen["agents"]) or any(
                        a["status"] == "completed" for a in seen["agents"]):
                    return
                time.sleep(0.05)

        t = threading.Thread(target=watch)
        t.start()
        res = run(host, b, [{"tool": "sleep", "args": {"ms": 1500}}])
        t.join()
        assert res.status == "completed"
        assert [a["stalled"] for a in seen["agents"]] == [True]
        assert host.list_agents()[0]["stalled"] is False
