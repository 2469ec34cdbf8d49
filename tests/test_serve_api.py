"""The /v1 API beyond the gateway, against a real uvicorn server on 127.0.0.1: approvals
decided over HTTP, the event stream (and a client that leaves it), long polls (wake-up
times: test_serve_timers.py), and the OpenAPI document held to the routes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, register, token

BIG = {"item": "laptops", "amount": 75000}


@pytest.fixture
def served(bundles: BundleFactory, tmp_path: Path) -> Iterator[tuple[InProcessServer, dict[str, str]]]:
    store = tmp_path / "store"
    refs = register(store, bundles.example("procurement"), bundles.example("steps"), bundles.example("hello"))
    with InProcessServer(store) as srv:
        yield srv, dict(zip(("procurement", "steps", "hello"), refs, strict=True))


def _until(cond: Any, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_approval_over_http_resumes_in_the_background(served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, refs = served
    ops = token(srv.host.store, "acme", "runs:write", "runs:read", "approvals:write")
    reader = token(srv.host.store, "acme", "runs:read")
    other = token(srv.host.store, "globex", "admin")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/runs", headers=auth(ops), json={"agent": refs["procurement"], "input": BIG, "wait": 60})
        agent = r.json()
        assert r.status_code == 201 and agent["status"] == "waiting_approval", agent
        aid = agent["agent_id"]
        [pending] = c.get("/v1/approvals", headers=auth(reader)).json()["approvals"]
        assert pending["agent_id"] == aid and pending["call"]["tool"] == "erp.create_po"
        assert c.get("/v1/approvals", headers=auth(other)).json() == {"approvals": []}
        r = c.post(f"/v1/agents/{aid}/approve", headers=auth(reader), json={})
        assert r.status_code == 403
        r = c.post(f"/v1/agents/{aid}/approve", headers=auth(other), json={})
        assert r.status_code == 404  # another tenant's agent does not exist for it
        r = c.post(f"/v1/agents/{aid}/approve", headers=auth(ops), json={"note": "ok by the CFO"})
        assert r.status_code == 200 and r.json()["status"] in ("approved", "running", "completed"), r.text
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(reader)).json()
        assert done["status"] == "completed" and done["output"]["status"] == "ordered", done
        r = c.post(f"/v1/agents/{aid}/approve", headers=auth(ops), json={})
        assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"
        granted = [x for x in c.get(f"/v1/agents/{aid}/audit", headers=auth(reader)).json()["records"]
                   if x["kind"] == "approval.granted"]
        assert granted[0]["note"] == "ok by the CFO" and granted[0]["by"].startswith("token:tok_")
        # deny: needs a reason, then the agent completes rejected
        aid2 = c.post("/v1/runs", headers=auth(ops), json={"agent": refs["procurement"], "input": BIG,
                                                           "wait": 60}).json()["agent_id"]
        r = c.post(f"/v1/agents/{aid2}/deny", headers=auth(ops), json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input"
        c.post(f"/v1/agents/{aid2}/deny", headers=auth(ops), json={"reason": "not this quarter"})
        done = c.get(f"/v1/agents/{aid2}/wait", params={"timeout": 60}, headers=auth(reader)).json()
        assert done["status"] == "completed" and done["output"]["reason"] == "approval_denied"


def _sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    event: dict[str, str] = {}
    for line in lines:
        if not line:
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(": ")
            event[k] = v


def test_event_stream_follows_an_agent_to_its_end_and_resumes_from_last_event_id(
        served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, refs = served
    t = token(srv.host.store, "acme", "admin")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        aid = c.post("/v1/runs", headers=auth(t), json={"agent": refs["procurement"], "input": BIG}).json()["agent_id"]
        seen: list[dict[str, str]] = []
        with c.stream("GET", f"/v1/agents/{aid}/events", headers=auth(t)) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for ev in _sse(r.iter_lines()):
                seen.append(ev)
                if ev.get("event") == "tool.approval_requested":
                    c.post(f"/v1/agents/{aid}/approve", headers=auth(t), json={})
                if ev.get("event") == "end":
                    break
        kinds = [e["event"] for e in seen]
        assert kinds[0] == "agent.spawned" and kinds[-2:] == ["agent.completed", "end"]
        assert {"tool.requested", "tool.approval_requested", "approval.granted"} <= set(kinds)
        ids = [int(e["id"]) for e in seen if "id" in e]
        assert ids == list(range(1, len(ids) + 1))  # each record once, in order
        assert json.loads(seen[0]["data"])["agent_id"] == aid
        # reconnecting after event 5 gets 6.. and the end
        with c.stream("GET", f"/v1/agents/{aid}/events", headers={**auth(t), "Last-Event-ID": "5"}) as r:
            again = list(_sse(r.iter_lines()))
        assert [int(e["id"]) for e in again if "id" in e] == ids[5:] and again[-1]["event"] == "end"
        r = c.get(f"/v1/agents/{aid}/events", headers={**auth(t), "Last-Event-ID": "x"})
        assert r.status_code == 400


def test_a_client_leaving_mid_stream_costs_nothing(served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, refs = served
    t = token(srv.host.store, "acme", "admin")
    events = srv.app.state.events
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        aid = c.post("/v1/runs", headers=auth(t), json={"agent": refs["procurement"], "input": BIG,
                                                         "wait": 60}).json()["agent_id"]
        for _ in range(3):  # the agent waits on a person: its stream stays open until the client goes
            with c.stream("GET", f"/v1/agents/{aid}/events", headers=auth(t)) as r:
                lines = _sse(r.iter_lines())  # held: dropping it would close the stream before the check
                first = next(lines)
                assert first["event"] == "agent.spawned"
                assert events.open_streams >= 1
        _until(lambda: events.open_streams == 0, "the streams of clients that left are closed")
        assert c.get("/readyz").status_code == 200
        c.post(f"/v1/agents/{aid}/approve", headers=auth(t), json={})
        assert c.get(f"/v1/agents/{aid}/wait?timeout=60", headers=auth(t)).json()["status"] == "completed"


def test_wait_long_polls_until_the_agent_stops(served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, refs = served
    t = token(srv.host.store, "acme", "admin")
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        aid = c.post("/v1/runs", headers=auth(t), json={"agent": refs["steps"], "input": {"n": 50}}).json()["agent_id"]
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(t)).json()
        assert done["status"] == "completed" and done["output"] == {"sum": 1275, "last": 50}
        assert c.get(f"/v1/agents/{aid}/wait", params={"timeout": "soon"}, headers=auth(t)).status_code == 400
        inspected = c.get(f"/v1/agents/{aid}/inspect", headers=auth(t)).json()
        assert inspected["input"] == {"n": 50} and len(inspected["checkpoint_list"]) >= 1


def test_a_run_waited_for_is_answered_with_its_last_commit_unread(served: tuple[InProcessServer, dict[str, str]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """While this server drives the agent it is running, and the end of the drive wakes the
    request: the record the drive's last commit wrote is the answer, the store not read for
    it (a run of 50 tool calls, hibernating or not, is not polled), and it is the record the
    store holds, as ``GET /v1/agents/{id}`` reads it: completed, parked or failed."""
    srv, refs = served
    t = token(srv.host.store, "acme", "admin")
    reads: list[str] = []
    real = type(srv.host).get_agent

    def counted(self: Any, agent_id: str) -> dict[str, Any]:
        reads.append(agent_id)
        return real(self, agent_id)

    monkeypatch.setattr(type(srv.host), "get_agent", counted)
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        answers = {}
        for status, body in (("completed", {"agent": refs["steps"], "input": {"n": 50}}),
                             ("waiting_approval", {"agent": refs["procurement"], "input": BIG}),
                             ("failed", {"agent": refs["steps"], "input": {"n": 50}, "fuel": 1})):
            reads.clear()
            r = c.post("/v1/runs", headers=auth(t), json={**body, "wait": 60})
            assert r.status_code == 201 and r.json()["status"] == status, r.text
            assert reads == []
            answers[status] = answer = r.json()
            stored = c.get(f"/v1/agents/{answer['agent_id']}", headers=auth(t)).json()
            assert {k: v for k, v in answer.items() if k != "logs"} == stored
        assert answers["completed"]["output"] == {"sum": 1275, "last": 50}
        # another tenant's token does not get it by waiting either
        other = token(srv.host.store, "globex", "admin")
        aid = answers["completed"]["agent_id"]
        assert c.get(f"/v1/agents/{aid}/wait", params={"timeout": 1}, headers=auth(other)).status_code == 404


def test_openapi_document_matches_the_routes(served: tuple[InProcessServer, dict[str, str]]) -> None:
    from starlette.routing import Route

    srv, _ = served
    t = token(srv.host.store, "acme", "runs:read")
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/openapi.json").status_code == 401
        doc = c.get("/openapi.json", headers=auth(t)).json()
    routes = {(r.path, m.lower()) for r in srv.app.routes if isinstance(r, Route) and r.include_in_schema
              for m in (r.methods or ()) if m != "HEAD"}  # the console's pages are not the API
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert documented == routes
    assert doc["paths"]["/v1/runs"]["post"]["x-torpor-scope"] == "runs:write"
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    for path in ("/v1/agents/{agent_id}/events", "/v1/agents/{agent_id}/approve", "/v1/approvals"):
        assert path in doc["paths"]

