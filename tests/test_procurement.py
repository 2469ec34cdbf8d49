"""The procurement example (guest_sdk/examples/procurement/): the twelve-step purchase
workflow, really compiled and run by the host, with its demo ERP in the store. The main
paths run against its TypeScript and Python ports (guest_sdk/examples/procurement-ts/,
procurement-py/) too, which must answer exactly the same: approval while hibernated in an
``await`` included.

Amounts up to the 50,000 spending authority complete on their own; above it the POLICY
parks the agent in ``waiting_approval`` inside ``erp.create_po`` until an operator
decides, from any process. A denial is answered to the agent as a structured
``denied`` error: it completes with ``{"status": "rejected", "reason":
"approval_denied"}``, creates no purchase order and tells the requester.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from conftest import EXAMPLES, BundleFactory

import policies
from host.errors import AgentStateError
from host.runtime import Host, RunResult
from host.sandbox.bundle import Bundle

EXAMPLE = EXAMPLES / "procurement"
#: The same workflow in C, TypeScript and Python (same tools, same policy but for its name and, for
#: Python, the memory budget its interpreter needs).
PORTS = ["procurement", "procurement-ts", "procurement-py"]

# 300 s: on a fresh machine the TypeScript port's first build also builds the JS runtime (~1-2 min).
pytestmark = pytest.mark.timeout(300)


def _tools_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("procurement_tools_under_test", EXAMPLE / "procurement_tools.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pt = _tools_module()


@pytest.fixture(scope="module")
def bundle(bundles: BundleFactory) -> Bundle:
    return bundles.load(EXAMPLE)


@pytest.fixture(scope="module")
def bundle_path(bundles: BundleFactory) -> Path:
    return bundles.path(EXAMPLE)


@pytest.fixture(scope="module", params=PORTS)
def port(request: pytest.FixtureRequest, bundles: BundleFactory) -> Bundle:
    return bundles.load(EXAMPLES / request.param)


@pytest.fixture(scope="module", params=PORTS)
def port_path(request: pytest.FixtureRequest, bundles: BundleFactory) -> Path:
    return bundles.path(EXAMPLES / request.param)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compile cache the tests' stores share: each port's module (the Python one takes
    ~9 s of Cranelift) is compiled once in this module, not once per test's store."""
    return tmp_path_factory.mktemp("compiled")


@pytest.fixture(autouse=True)
def _shared_compile_cache(compiled: Path, tmp_path: Path) -> Iterator[None]:
    shutil.copytree(compiled, tmp_path / "cache", dirs_exist_ok=True)
    yield
    if (tmp_path / "cache").is_dir():
        shutil.copytree(tmp_path / "cache", compiled, dirs_exist_ok=True)


def run(host: Host, b: Bundle, payload: dict[str, Any]) -> RunResult:
    return anyio.run(lambda: host.run(b, payload))


def state(host_or_dir: Host | Path) -> dict[str, Any]:
    """The demo ERP and outbox as the store holds them now."""
    if isinstance(host_or_dir, Host):
        st: dict[str, Any] = pt.erp_state(host_or_dir.store)
        return st
    with Host(host_or_dir) as h:
        st = pt.erp_state(h.store)
    return st


def pos(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st["erp"].items() if k.startswith("po/")}


def outbox(st: dict[str, Any], who: str = "finance-manager") -> list[dict[str, Any]]:
    return st["notify"].get(f"outbox/{who}") or []


def kinds(host: Host, agent_id: str) -> list[str]:
    return [r["kind"] for r in host.audit_records(agent_id)]


def torpor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


# -- the policy alone decides (pure engine, no agent) -----------------------------------------------
def _po(amount: int, total: int | None = None, vendor: str = "acme") -> dict[str, Any]:
    line = {"item": "laptops", "quantity": 1, "total": amount if total is None else total}
    return {"requester": "finance-manager", "vendor": vendor, "quote_id": "Q-000001", "amount": amount,
            "lines": [line]}


def test_the_policy_holds_the_spending_authority_and_the_guardrails() -> None:
    pol = policies.load_policy(EXAMPLE / "policy.toml")

    def decide(tool: str, args: dict[str, Any], usage: policies.Usage | None = None) -> policies.Decision:
        req = policies.ToolRequest(agent_id="a", tool=tool, args=args, call_seq=1, agent_name="procurement")
        return policies.decide(pol, req, usage or policies.Usage(), 1000.0)

    assert isinstance(decide("erp.create_po", _po(50_000)), policies.Allow)  # at the authority: fine
    d = decide("erp.create_po", _po(50_001))
    assert isinstance(d, policies.RequireApproval)
    assert set(d.rules) == {"validators[0].spending_limit", 'tools."erp.create_po".approval'}
    # an order whose declared amount understates its lines still waits for a human
    d = decide("erp.create_po", _po(40_000, total=90_000))
    assert isinstance(d, policies.RequireApproval) and d.rules == ("validators[0].spending_limit",)
    # beyond anyone's authority, or from a vendor off the approved list: denied outright
    d = decide("erp.create_po", _po(600_000))
    assert isinstance(d, policies.Deny) and d.rule == 'tools."erp.create_po".args.amount.max'
    d = decide("erp.quote", {"vendor": "shady-llc", "item": "laptops", "amount": 10})
    assert isinstance(d, policies.Deny) and d.rule == 'tools."erp.quote".args.vendor.allow'
    # notifications: personal data refused, and at most 3 a minute
    msg = {"to": "finance-manager", "subject": "PO", "body": "card 4111 1111 1111 1111"}
    d = decide("notify.send", msg)
    assert isinstance(d, policies.Deny) and d.code == "pii_detected"
    msg["body"] = "ordered"
    busy = policies.Usage(recent_calls={"notify.send": (990.0, 995.0, 999.0)})
    d = decide("notify.send", msg, busy)
    assert isinstance(d, policies.Deny) and d.code == "rate_limited" and d.rule.startswith('tools."notify.send".rate')
    d = decide("notify.send", {**msg, "to": "dana@corp.example"})
    assert isinstance(d, policies.Deny) and d.rule == 'tools."notify.send".args.to.pattern'


# -- amounts within the spending authority -------------------------------------------------
def test_small_purchase_completes_without_approval(port: Bundle, tmp_path: Path) -> None:
    bundle = port
    with Host(tmp_path) as host:
        res = run(host, bundle, {"item": "laptops", "amount": 20_000})
        assert res.status == "completed", (res.error, res.logs)
        out = res.output
        assert out["status"] == "ordered" and out["reason"] is None
        # steps 2-6: budget read, quotes from every registered vendor, structured refusals skipped
        assert out["budget"]["remaining"] == 1_000_000
        assert [(q["vendor"], q["quantity"]) for q in out["quotes"]] == [("acme", 16), ("globex", 16)]
        assert {(s["vendor"], s["reason"]) for s in out["skipped"]} == {("initech", "no_quote"),
                                                                       ("umbrella", "below_min_order")}
        assert out["chosen"]["vendor"] == "acme"  # 16 units each: the shorter lead time wins
        assert out["po"]["po_id"] == "PO-000001" and out["po"]["amount"] == 20_000
        assert out["notification"] == {"sent": True, "message_id": "MSG-000001", "redacted": False, "error": None}

        # no human was involved, and the policy never asked for one
        k = kinds(host, res.agent_id)
        assert "tool.approval_requested" not in k and "approval.granted" not in k
        assert host.approvals() == []

        # the ERP's state, in the store
        st = state(host)
        po = st["erp"]["po/PO-000001"]
        assert po["status"] == "issued" and po["amount"] == 20_000 and po["vendor"] == "acme"
        assert po["lines"] == [{"item": "laptops", "quantity": 16, "total": 20_000}]
        assert po["agent_id"] == res.agent_id
        assert st["erp"]["budget/finance-manager"]["committed"] == 20_000
        assert st["erp"][f"quote/{po['quote_id']}"]["po_id"] == "PO-000001"
        [msg] = outbox(st)
        assert msg["subject"] == "Purchase order PO-000001: laptops" and "16 laptops from acme" in msg["body"]

        # effects are visible to later runs: the next requisition sees the committed budget
        res2 = run(host, bundle, {"item": "chairs", "amount": 9_000, "requester": "finance-manager"})
        assert res2.output["status"] == "ordered", res2.output
        assert res2.output["budget"]["remaining"] == 980_000
        assert res2.output["chosen"]["vendor"] == "initech"  # 31 chairs at 290 beats acme's 29
        st = state(host)
        assert sorted(pos(st)) == ["po/PO-000001", "po/PO-000002"]
        assert st["erp"]["budget/finance-manager"]["committed"] == 29_000


def test_personal_data_never_reaches_a_notification(bundle: Bundle, tmp_path: Path) -> None:
    """The PII validator refuses the notification; the agent resends it without the note."""
    note = "urgent - call me on +44 20 7946 0018 or charge card 4111 1111 1111 1111"
    with Host(tmp_path) as host:
        res = run(host, bundle, {"item": "monitors", "amount": 4_800, "note": note})
        assert res.status == "completed", (res.error, res.logs)
        assert res.output["status"] == "ordered"
        assert res.output["notification"]["sent"] is True and res.output["notification"]["redacted"] is True
        assert res.output is not None
        denied = [r for r in host.audit_records(res.agent_id) if r["kind"] == "tool.denied"]
        assert len(denied) == 1 and denied[0]["tool"] == "notify.send"
        assert denied[0]["decision"]["code"] == "pii_detected"
        assert denied[0]["decision"]["rule"].startswith("validators[1].detect.")
        [msg] = outbox(state(host))
        assert "4111" not in msg["body"] and "7946" not in msg["body"] and "note" not in msg["body"].lower()
        # a harmless note is forwarded as is
        res = run(host, bundle, {"item": "monitors", "amount": 2_400, "note": "for the new starters"})
        assert res.output["notification"]["redacted"] is False
        assert outbox(state(host))[-1]["body"].endswith("Your note: for the new starters")


def test_business_refusals_complete_as_rejected(bundle: Bundle, tmp_path: Path) -> None:
    with Host(tmp_path) as host:
        # step 2: too little budget left; no vendor is even asked
        res = run(host, bundle, {"item": "laptops", "amount": 40_000, "requester": "ops-lead"})
        assert res.status == "completed"
        assert (res.output["status"], res.output["reason"]) == ("rejected", "insufficient_budget")
        assert res.output["quotes"] == [] and res.output["po"] is None
        assert outbox(state(host), "ops-lead")[0]["subject"] == "Purchase request for laptops declined"
        # step 3: an item nobody sells
        res = run(host, bundle, {"item": "yachts", "amount": 10_000})
        assert (res.output["status"], res.output["reason"]) == ("rejected", "unknown_item")
        # step 8: above what any approver may sign: the policy's argument ceiling denies it outright
        res = run(host, bundle, {"item": "laptops", "amount": 600_000})
        assert res.status == "completed"
        assert (res.output["reason"], res.output["rule"]) == ("invalid_args", 'tools."erp.create_po".args.amount.max')
        assert pos(state(host)) == {}
        # bad input is a failed run, not a rejection
        res = run(host, bundle, {"item": "laptops", "amount": "lots"})
        assert res.status == "failed" and res.error is not None and res.error["code"] == "agent_error"


# -- above the spending authority ---------------------------------------------------------------
def test_large_purchase_waits_for_approval_via_the_cli(port_path: Path, tmp_path: Path) -> None:
    bundle_path = port_path
    store = str(tmp_path)
    proc = torpor("run", str(bundle_path), "--input", '{"item":"laptops","amount":75000}', "--json", "--store", store)
    res = json.loads(proc.stdout)
    assert res["status"] == "waiting_approval", (proc.stdout, proc.stderr)
    assert proc.returncode == 4  # parked on a person: neither success nor failure
    agent_id = res["agent_id"]
    assert res["pending"]["tool"] == "erp.create_po" and res["pending"]["args"]["amount"] == 75_000
    # the policy asked, not the agent: both spending-authority rules name themselves
    assert res["approval"]["rule"] == "validators[0].spending_limit"
    assert "amount > 50000" in res["approval"]["reason"]
    st = state(tmp_path)
    assert pos(st) == {} and st["erp"]["budget/finance-manager"]["committed"] == 0 and outbox(st) == []

    proc = torpor("approvals", "--json", "--store", store)
    [pending] = json.loads(proc.stdout)
    assert pending["agent_id"] == agent_id and pending["call"]["tool"] == "erp.create_po"

    # another process decides (the one that ran the agent has exited)
    proc = torpor("approve", agent_id, "--note", "ok by the CFO", "--json", "--store", store)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert json.loads(proc.stdout)["status"] == "completed"

    proc = torpor("inspect", agent_id, "--json", "--store", store)
    info = json.loads(proc.stdout)
    assert info["status"] == "completed"
    out = info["output"]
    assert out["status"] == "ordered" and out["po"]["amount"] == 75_000
    # globex offered the most laptops but is on hold: validation failed, the next best was taken
    assert ("globex", "vendor_on_hold") in {(s["vendor"], s["reason"]) for s in out["skipped"]}
    assert out["chosen"]["vendor"] == "acme" and out["chosen"]["quantity"] == 60

    st = state(tmp_path)
    [po] = pos(st).values()
    assert po["amount"] == 75_000 and po["lines"][0]["quantity"] == 60
    assert st["erp"]["budget/finance-manager"]["committed"] == 75_000
    assert len(outbox(st)) == 1 and po["po_id"] in outbox(st)[0]["subject"]
    with Host(tmp_path) as host:
        granted = [r for r in host.audit_records(agent_id) if r["kind"] == "approval.granted"]
        assert granted and granted[0]["note"] == "ok by the CFO"
        assert host.approvals() == []

    # approving again is refused with a clear error
    proc = torpor("approve", agent_id, "--store", store)
    assert proc.returncode == 2 and "not waiting for approval" in proc.stderr


def test_denied_purchase_is_rejected_and_the_requester_told(port: Bundle, tmp_path: Path) -> None:
    bundle = port
    with Host(tmp_path) as host:
        res = run(host, bundle, {"item": "laptops", "amount": 60_000})
        assert res.status == "waiting_approval"
        done = anyio.run(lambda: host.deny(res.agent_id, reason="not in this quarter's plan", by="cfo"))
        assert done.status == "completed", (done.error, done.logs)
        out = done.output
        assert (out["status"], out["reason"]) == ("rejected", "approval_denied")
        assert "not in this quarter's plan" in out["message"] and out["po"] is None
        st = state(host)
        assert pos(st) == {} and st["erp"]["budget/finance-manager"]["committed"] == 0
        [msg] = outbox(st)
        assert msg["subject"] == "Purchase request for laptops declined"
        assert "not in this quarter's plan" in msg["body"]
        assert "approval.denied" in kinds(host, res.agent_id)


def test_two_operators_approve_at_once(bundle: Bundle, bundle_path: Path, tmp_path: Path) -> None:
    # in one process: Host.approve raises AgentStateError for the loser
    with Host(tmp_path / "a") as host:
        res = run(host, bundle, {"item": "laptops", "amount": 51_000})
        assert res.status == "waiting_approval"
        outcomes: list[Any] = []

        async def approve(who: str) -> None:
            try:
                outcomes.append(await host.approve(res.agent_id, by=who))
            except AgentStateError as exc:
                outcomes.append(exc)

        async def both() -> None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(approve, "alice")
                tg.start_soon(approve, "bob")

        anyio.run(both)
        won = [o for o in outcomes if isinstance(o, RunResult)]
        lost = [o for o in outcomes if isinstance(o, AgentStateError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert won[0].status == "completed" and won[0].output["status"] == "ordered"
        assert "not waiting for approval" in str(lost[0])
        assert len(pos(state(host))) == 1

    # from two processes at once: one wins, the other is told
    store = tmp_path / "b"
    proc = torpor("run", str(bundle_path), "--input", '{"item":"laptops","amount":75000}', "--json", "--store", str(store))
    agent_id = json.loads(proc.stdout)["agent_id"]
    procs = [subprocess.Popen([sys.executable, "-m", "host.cli", "approve", agent_id, "--store", str(store), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert sorted(p.returncode for p in procs) == [0, 2], outs
    loser = next(o for o, p in zip(outs, procs, strict=True) if p.returncode == 2)
    err = json.loads(loser[0])["error"]
    assert err["code"] == "invalid_state" and ("not waiting for approval" in err["message"] or "being run" in err["message"])
    st = state(store)
    assert len(pos(st)) == 1 and st["erp"]["budget/finance-manager"]["committed"] == 75_000  # exactly once
