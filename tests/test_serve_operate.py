"""An operator's moves over /v1 (resume, fork, resolve), the store's audit check, and an
agent's log lines kept in the store, against a real uvicorn server on 127.0.0.1.

Scopes, tenants and typed errors for each route; the log lines written in the commits of
the steps that logged them, bounded per agent, paginated, followed by long poll, and still
there after the server restarts; an in_doubt agent (a real ``torpor run`` SIGKILLed while
its non-idempotent tool is in flight) settled over HTTP."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import (
    InProcessServer,
    auth,
    kill_mid_call,
    payer_bundle,
    register,
    start_process,
    token,
)

from host.runtime import logs
from host.server import openapi
from host.trust import audit
from snapshots.lmdb_store import LmdbStore

pytestmark = pytest.mark.timeout(300)

BIG = {"item": "laptops", "amount": 75000}


def test_log_lines_are_kept_paginated_followed_and_survive_a_restart(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [ref] = register(store, bundles.example("procurement"))
    with InProcessServer(store) as srv:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read", "approvals:write")
        reader = token(srv.host.store, "acme", "runs:read")
        other = token(srv.host.store, "globex", "admin")
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            parked = c.post("/v1/runs", headers=auth(ops), json={"agent": ref, "input": BIG, "wait": 60}).json()
            assert parked["status"] == "waiting_approval", parked
            aid = parked["agent_id"]
            page = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader)).json()
            before = page["lines"]
            assert before[0]["level"] == "info" and before[0]["message"].startswith("requisition: 75000 for laptops")
            assert [x["seq"] for x in before] == list(range(len(before))) and len(before) >= 2, page
            assert (page["first"], page["next"], page["more"], page["status"]) == (0, len(before), False,
                                                                                   "waiting_approval")
            r = c.get(f"/v1/agents/{aid}/logs", headers=auth(other))
            assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found"
            for bad in ({"after": "x"}, {"limit": "0"}, {"after": "-2"}, {"wait": "-1"}):
                r = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader), params=bad)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", bad
    # A new server on the same store: the lines are the store's, not the old process's memory.
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        page = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader)).json()
        assert page["lines"] == before
        # Follow: a long poll after the last line waits, and the approval's drive answers it.
        followed: list[Any] = []
        poll = threading.Thread(target=lambda: followed.append(c.get(
            f"/v1/agents/{aid}/logs", headers=auth(reader), params={"after": len(before) - 1, "wait": 60}).json()))
        t0 = time.monotonic()
        poll.start()
        time.sleep(0.3)
        assert poll.is_alive()  # parked on a person, nothing after the last line yet: it waits
        c.post(f"/v1/agents/{aid}/approve", headers=auth(ops), json={})
        poll.join(60)
        assert followed and followed[0]["lines"] and followed[0]["lines"][0]["seq"] == len(before), followed
        assert time.monotonic() - t0 < 30
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(reader)).json()
        assert done["status"] == "completed"
        everything = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader)).json()
        said = [x["message"] for x in everything["lines"]]
        assert everything["lines"][:len(before)] == before and any("ordered" in m for m in said), said
        assert [x["seq"] for x in everything["lines"]] == list(range(len(said)))
        one = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader), params={"after": 0, "limit": 1}).json()
        assert [x["seq"] for x in one["lines"]] == [1] and one["more"] is (len(said) > 2)
        # An ended agent's long poll answers at once (nothing more comes).
        t0 = time.monotonic()
        end = c.get(f"/v1/agents/{aid}/logs", headers=auth(reader), params={"after": len(said), "wait": 30}).json()
        assert end["lines"] == [] and end["status"] == "completed" and time.monotonic() - t0 < 10


def test_a_server_killed_mid_run_leaves_each_line_once(bundles: BundleFactory, tmp_path: Path) -> None:
    """SIGKILL of `torpor serve` while an agent logs and calls; the next server finishes it.
    The lines of the segment the kill cut short were in no commit, and the segment runs again
    from the checkpoint: the kept log has each step's line once, numbered without a gap."""
    store = tmp_path / "store"
    [ref] = register(store, bundles.guest("chatty"))
    secret = token(store, "acme", "runs:write", "runs:read")
    proc, url = start_process(store)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            aid = c.post("/v1/runs", headers=auth(secret), json={"agent": ref, "input": {"n": 6, "ms": 200}}
                         ).json()["agent_id"]
            deadline = time.monotonic() + 60
            while len(c.get(f"/v1/agents/{aid}/logs", headers=auth(secret)).json()["lines"]) < 3:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(secret)).json()
        assert done["status"] == "completed", done
        page = c.get(f"/v1/agents/{aid}/logs", headers=auth(secret)).json()
    assert [x["message"] for x in page["lines"]] == [*(f"step {i}" for i in range(6)), "done"], page
    assert [x["seq"] for x in page["lines"]] == list(range(7)) and page["next"] == 7


def test_the_stored_log_is_bounded_per_agent(tmp_path: Path) -> None:
    """Through the runtime's one writer, on a real LMDB store: the oldest batches go first,
    numbers are never reused, and lines dropped before a commit leave a gap."""
    store = LmdbStore.open(tmp_path / "db")
    try:
        pending = logs.Pending()
        for batch in range(30):  # 30 commits of 100 lines of 100 bytes: past MAX_LINES and MAX_BYTES
            for i in range(100):
                pending.add("info", f"{batch:03d}-{i:03d} " + "x" * 92)
            done = store.transact(lambda txn: logs.flush(txn, "a1", pending))
            pending.take(*done)
            assert not pending.lines and not pending.skipped
        page = logs.read(store, "a1", limit=1000)
        kept = page["lines"]
        assert page["next"] == 3000 and kept[-1]["seq"] == 2999 and kept[-1]["message"].startswith("029-099")
        assert len(kept) <= logs.MAX_LINES and sum(len(x["message"]) for x in kept) <= logs.MAX_BYTES
        assert page["first"] == kept[0]["seq"] > 0 and [x["seq"] for x in kept] == list(range(page["first"], 3000))
        assert logs.read(store, "a2")["lines"] == []  # another agent's log is its own
        # One segment that logs far more than a log keeps before its commit: the newest stay.
        for i in range(3 * logs.MAX_LINES):
            pending.add("debug", f"burst {i}")
        assert len(pending.lines) <= 2 * logs.MAX_LINES and pending.skipped > 0
        store.transact(lambda txn: pending.take(*logs.flush(txn, "a1", pending)))
        page = logs.read(store, "a1", after=3000 + 3 * logs.MAX_LINES - 2)
        assert [x["message"] for x in page["lines"]] == [f"burst {3 * logs.MAX_LINES - 1}"]
        assert logs.read(store, "a1")["next"] == 3000 + 3 * logs.MAX_LINES
        pending.add("info", "y" * (logs.MAX_LINE + 10))
        store.transact(lambda txn: pending.take(*logs.flush(txn, "a1", pending)))
        assert logs.read(store, "a1", after=logs.read(store, "a1")["next"] - 2)["lines"][0]["message"].endswith(
            "longer than the stored log keeps]")
    finally:
        store.close()


def test_a_log_line_reaches_a_terminal_escaped() -> None:
    """What a guest logs is its own text: `torpor logs` shows it on one line, escape sequences inert."""
    from host.cli.agents import _shown

    assert _shown("a\x1b]0;owned\x07b\nc\td\x9b2J é") == "a\\x1b]0;owned\\x07b\\x0ac\td\\x9b2J é"


def test_fork_and_resume_over_http(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [ref] = register(store, bundles.example("procurement"))
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read", "approvals:write")
        reader = token(srv.host.store, "acme", "runs:read")
        other = token(srv.host.store, "globex", "admin")
        aid = c.post("/v1/runs", headers=auth(ops), json={"agent": ref, "input": BIG, "wait": 60}).json()["agent_id"]
        c.post(f"/v1/agents/{aid}/approve", headers=auth(ops), json={})
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(reader)).json()
        assert done["status"] == "completed" and done["checkpoints"] >= 2, done
        # Refused with the runtime's codes: a finished agent, a scope too small, another tenant, bad bodies.
        r = c.post(f"/v1/agents/{aid}/resume", headers=auth(ops))
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state", r.text
        assert "only unfinished agents can be resumed" in r.json()["error"]["message"]
        assert c.post(f"/v1/agents/{aid}/resume", headers=auth(reader)).status_code == 403
        assert c.post(f"/v1/agents/{aid}/fork", headers=auth(reader), json={"checkpoint": 1}).status_code == 403
        for who in (other,):
            for path, body in (("resume", None), ("fork", {"checkpoint": 1}), ("resolve", {"retry": True})):
                r = c.post(f"/v1/agents/{aid}/{path}", headers=auth(who), json=body)
                assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found", (path, r.text)
        for body in ({}, {"checkpoint": -1}, {"checkpoint": "1"}, {"checkpoint": True}):
            r = c.post(f"/v1/agents/{aid}/fork", headers=auth(ops), json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", body
        r = c.post(f"/v1/agents/{aid}/fork", headers=auth(ops), json={"checkpoint": 999})
        assert r.status_code == 404 and r.json()["error"]["code"] == "checkpoint_not_found", r.text
        # The fork at checkpoint 1 (parked on the approval) is the tenant's, suspended until resumed.
        r = c.post(f"/v1/agents/{aid}/fork", headers=auth(ops), json={"checkpoint": 1})
        assert r.status_code == 201, r.text
        forked = r.json()
        assert forked["parent"] == aid and forked["checkpoint"] == 1
        fid = forked["agent_id"]
        rec = c.get(f"/v1/agents/{fid}", headers=auth(reader)).json()
        assert rec["status"] == "suspended" and rec["parent"] == {"agent_id": aid, "checkpoint": 1}
        assert c.get(f"/v1/agents/{fid}", headers=auth(other)).status_code == 404
        r = c.post(f"/v1/agents/{fid}/resume", headers=auth(ops))
        assert r.status_code == 202 and r.json()["agent_id"] == fid, r.text
        ended = c.get(f"/v1/agents/{fid}/wait", params={"timeout": 60}, headers=auth(reader)).json()
        # The fork goes on from its parent's checkpoint 1, at the call the parent waited on; the
        # approval was the parent's, so the fork asks for its own.
        assert ended["status"] == "waiting_approval" and ended["pending"]["tool"] == "erp.create_po", ended
        kinds = [x["kind"] for x in c.get(f"/v1/agents/{fid}/audit", headers=auth(reader)).json()["records"]]
        assert kinds[0] == "agent.forked" and "agent.resumed" in kinds


def test_resume_refuses_an_agent_asleep_before_its_time_or_already_running(bundles: BundleFactory,
                                                                           tmp_path: Path) -> None:
    store = tmp_path / "store"
    sleeper, slow = register(store, bundles.guest("sleeper"), bundles.guest("slowtool"))
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ops = token(srv.host.store, "acme", "runs:write", "runs:read")
        asleep = c.post("/v1/runs", headers=auth(ops), json={"agent": sleeper, "input": {"ms": 600_000, "sleeps": 1},
                                                             "wait": 30}).json()
        assert asleep["status"] == "sleeping", asleep
        r = c.post(f"/v1/agents/{asleep['agent_id']}/resume", headers=auth(ops))
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_due" and "sleeps until" in r.text, r.text
        busy = c.post("/v1/runs", headers=auth(ops), json={"agent": slow, "input": {"n": 2, "ms": 1000}}).json()
        r = c.post(f"/v1/agents/{busy['agent_id']}/resume", headers=auth(ops))
        assert r.status_code == 409 and "running on this server already" in r.json()["error"]["message"], r.text
        done = c.get(f"/v1/agents/{busy['agent_id']}/wait", params={"timeout": 60}, headers=auth(ops)).json()
        assert done["status"] == "completed" and done["output"]["calls"] == 2, done  # driven once, not twice


def test_the_openapi_document_names_every_route_with_its_scope(bundles: BundleFactory, tmp_path: Path) -> None:
    from starlette.routing import Route

    with InProcessServer(tmp_path / "store") as srv:
        names = {r.name for r in srv.app.routes if isinstance(r, Route) and r.include_in_schema}  # not the console
        assert names <= set(openapi.DETAILS), names - set(openapi.DETAILS)  # none left to the default scope
        doc = openapi.document(srv.app.routes)
    paths = doc["paths"]
    assert paths["/v1/agents/{agent_id}/resume"]["post"]["x-torpor-scope"] == "runs:write"
    assert paths["/v1/agents/{agent_id}/fork"]["post"]["requestBody"]["required"] is True
    assert paths["/v1/agents/{agent_id}/resolve"]["post"]["x-torpor-scope"] == "approvals:write"
    assert paths["/v1/agents/{agent_id}/resolve"]["post"]["requestBody"]["required"] is True
    assert paths["/v1/audit/verify"]["get"]["x-torpor-scope"] == "admin"
    assert {p["name"] for p in paths["/v1/agents/{agent_id}/logs"]["get"]["parameters"]} == {
        "agent_id", "after", "limit", "wait"}


def test_the_audit_verified_over_http_is_the_stores_check(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    [ref] = register(store, bundles.example("procurement"))
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        admin = token(srv.host.store, "acme", "admin")
        reader = token(srv.host.store, "acme", "runs:read")
        other = token(srv.host.store, "globex", "runs:read")
        aid = c.post("/v1/runs", headers=auth(admin), json={"agent": ref, "input": BIG, "wait": 60}).json()["agent_id"]
        assert c.get("/v1/agents", headers=auth("tpo_nope")).status_code == 401  # a refusal: host.gateway
        deadline = time.monotonic() + 30
        while c.get("/v1/audit/verify", headers=auth(admin), params={"agent": "host.gateway"}).json()["records"] == 0:
            assert time.monotonic() < deadline, "the gateway's refusal never reached its chain"
            time.sleep(0.1)
        for agent_id in (None, "host.gateway", aid):
            answer = c.get("/v1/audit/verify", headers=auth(admin), params={"agent": agent_id} if agent_id else None)
            assert answer.status_code == 200, answer.text
            here = audit.verify_store(srv.host.store, agent_id=agent_id).to_dict()
            assert answer.json() == here and here["ok"] is True, (agent_id, answer.json(), here)
        assert answer.json()["agents"] == 1 and answer.json()["records"] > 0
        whole = c.get("/v1/audit/verify", headers=auth(admin)).json()
        assert whole["agents"] == 2 and whole["ok"] is True, whole  # the agent and host.gateway
        # A tenant's reader verifies its own agent only; the store and host chains need admin.
        assert c.get("/v1/audit/verify", headers=auth(reader), params={"agent": aid}).json()["ok"] is True
        for params in (None, {"agent": "host.gateway"}):
            r = c.get("/v1/audit/verify", headers=auth(reader), params=params)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", params
        r = c.get("/v1/audit/verify", headers=auth(other), params={"agent": aid})
        assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found"
        r = c.get("/v1/audit/verify", headers=auth(admin), params={"agent": "a/b"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"


@pytest.fixture
def payer(bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return payer_bundle(bundles, tmp_path, monkeypatch)


def test_an_in_doubt_call_is_settled_over_http(payer: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    kill_mid_call(payer, store, tmp_path / "charge.log")
    # The server takes the agent over at start; its call may have taken effect: in_doubt.
    with InProcessServer(store) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        ops = token(srv.host.store, "default", "runs:write", "runs:read", "approvals:write")
        runner = token(srv.host.store, "default", "runs:write", "runs:read")
        other = token(srv.host.store, "acme", "admin")
        deadline = time.monotonic() + 60
        while not (rows := c.get("/v1/agents", headers=auth(ops)).json()["agents"]) or \
                rows[0]["status"] != "in_doubt":
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        aid = rows[0]["agent_id"]
        assert c.post(f"/v1/agents/{aid}/resolve", headers=auth(runner), json={"retry": True}).status_code == 403
        assert c.post(f"/v1/agents/{aid}/resolve", headers=auth(other), json={"retry": True}).status_code == 404
        r = c.post(f"/v1/agents/{aid}/resume", headers=auth(ops))
        assert r.status_code == 409 and "an operator must decide" in r.json()["error"]["message"], r.text
        for body in ({}, {"retry": True, "fail": "x"}, {"retry": "yes"}, {"result": None}, {"fail": " "},
                     {"retry": False}):
            r = c.post(f"/v1/agents/{aid}/resolve", headers=auth(ops), json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", (body, r.text)
        assert c.get(f"/v1/agents/{aid}", headers=auth(ops)).json()["status"] == "in_doubt"  # nothing changed
        r = c.post(f"/v1/agents/{aid}/resolve", headers=auth(ops), json={"result": {"charged": 42, "by": "bank"}})
        assert r.status_code == 200, r.text
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(ops)).json()
        assert done["status"] == "completed", done
        assert done["output"]["results"][0]["value"] == {"charged": 42, "by": "bank"}, done["output"]
        assert (tmp_path / "charge.log").read_text().count("started") == 1  # the call was not run again
        resolved = [x for x in c.get(f"/v1/agents/{aid}/audit", headers=auth(ops)).json()["records"]
                    if x["kind"] == "operator.resolved"]
        assert resolved[0]["action"] == "result" and resolved[0]["by"].startswith("token:tok_")
        r = c.post(f"/v1/agents/{aid}/resolve", headers=auth(ops), json={"fail": "too late"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
