"""The operator console (host/server/console/) over HTTP against a real uvicorn server on
127.0.0.1: the login and its session cookie, CSRF on every form, escaping of what agents
write (a script payload through agent output, tool arguments, input and denial reasons),
tenant isolation, expired sessions and revoked tokens, and each page with real agents.
The same flows in a real browser: test_console_browser.py."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, register, token

from host.server.console import views
from host.server.console.sessions import COOKIE
from host.trust import operator_tokens

PAYLOAD = "<script>alert('xss')</script>"
BIG = {"item": "laptops", "amount": 75000}


@pytest.fixture(scope="module")
def served(bundles: BundleFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = tmp_path_factory.mktemp("console") / "store"
    [procurement, hello] = register(store, bundles.example("procurement"), bundles.example("hello"))
    with InProcessServer(store) as srv:
        s = srv.host.store
        ops = token(s, "acme", "runs:write", "runs:read", "approvals:write", "registry:write")
        with httpx.Client(base_url=srv.url, timeout=60, headers=auth(ops)) as api:
            def run(ref: str, payload: dict[str, Any]) -> dict[str, Any]:
                r = api.post("/v1/runs", json={"agent": ref, "input": payload, "wait": 60})
                assert r.status_code == 201, r.text
                return dict(r.json())

            hostile = run(procurement, {"item": "monitors", "amount": 2400, "requester": PAYLOAD})
            greeted = run(hello, {"name": PAYLOAD})
            waiting = run(procurement, BIG)
            assert hostile["status"] == "completed" and greeted["status"] == "completed"
            assert waiting["status"] == "waiting_approval"
            with Path(bundles.example("procurement")).open("rb") as f:
                assert api.post("/v1/bundles", params={"name": "procurement", "tag": "production"},
                                content=f.read()).status_code == 201
        yield {"srv": srv, "ops": ops, "hostile": hostile["agent_id"], "greeted": greeted["agent_id"],
               "waiting": waiting["agent_id"], "reader": token(s, "acme", "runs:read"),
               "admin": token(s, "acme", "admin"), "globex": token(s, "globex", "admin"), "procurement": procurement}


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


@contextlib.contextmanager
def login(srv: InProcessServer, secret: str) -> Iterator[httpx.Client]:
    """A browser-like client logged in with ``secret`` (cookies kept, redirects not followed)."""
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        form = c.get("/console/login")
        assert form.status_code == 200
        r = c.post("/console/login", data={"csrf": _csrf(form.text), "token": secret, "next": "/"})
        assert r.status_code == 303 and r.headers["location"] == "/", r.text
        yield c


def test_login_sets_an_http_only_samesite_session_cookie_and_never_the_token(served: dict[str, Any]) -> None:
    srv = served["srv"]
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.get("/console/agents/x?y=1")
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=%2Fconsole%2Fagents%2Fx")
        form = c.get("/console/login")
        assert "Content-Security-Policy" in form.headers and form.headers["X-Frame-Options"] == "DENY"
        # without the login form's CSRF token: refused, and no session
        r = c.post("/console/login", data={"token": served["reader"]})
        assert r.status_code == 403 and COOKIE not in r.cookies
        # a wrong token: the form again, saying why
        r = c.post("/console/login", data={"csrf": _csrf(form.text), "token": "tpo_nope"})
        assert r.status_code == 401 and "unknown operator token" in r.text and COOKIE not in r.cookies
        r = c.post("/console/login", data={"csrf": _csrf(form.text), "token": served["reader"],
                                           "next": "https://evil.example/"})
        assert r.status_code == 303 and r.headers["location"] == "/"  # never a redirect off the console
        cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(COOKIE + "="))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert served["reader"] not in cookie
        page = c.get("/")
        assert page.status_code == 200 and served["hostile"] in page.text
        # the session cookie is not a credential of the API (no CSRF there: it takes bearer tokens only)
        assert c.get("/v1/agents").status_code == 401
        assert c.post(f"/v1/agents/{served['waiting']}/approve", json={}).status_code == 401
        # log out: the cookie is worthless from then on
        r = c.post("/console/logout", data={"csrf": _csrf(page.text)})
        assert r.status_code == 303
        c.cookies.set(COOKIE, cookie.split(";")[0].split("=", 1)[1])
        assert c.get("/").status_code == 303


def test_what_agents_write_is_escaped_everywhere(served: dict[str, Any]) -> None:
    srv = served["srv"]
    with login(srv, served["admin"]) as c:
        pages = {
            "agents": c.get("/"),
            "timeline": c.get(f"/console/agents/{served['hostile']}"),
            "hello": c.get(f"/console/agents/{served['greeted']}"),
            "audit": c.get(f"/console/agents/{served['hostile']}/audit"),
            "unknown": c.get("/console/agents/" + PAYLOAD.replace("/", "%2F")),  # not even a route
            "no_agent": c.get("/console/agents/<img src=x onerror=alert(1)>"),
            "diff": c.get("/console/registry", params={"a": PAYLOAD, "b": "procurement"}),
            "filter": c.get("/", params={"name": PAYLOAD}),
        }
        for name, r in pages.items():
            assert "<script>alert" not in r.text and "<img src=x" not in r.text, name  # never markup
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'; script-src 'self'"), name
        t = pages["timeline"].text
        # the payload is there, as text: in the input, the tool arguments, the denial reasons, the output
        escaped = "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;"
        assert t.count(escaped) >= 4, t
        assert "tool.denied" in t and 'tools.&#34;erp.budget&#34;.args.requester.pattern' in t
        assert escaped in pages["hello"].text  # the agent's output
        assert pages["unknown"].status_code == 404 and escaped in pages["unknown"].text
        assert pages["no_agent"].status_code == 404 and "agent_not_found" in pages["no_agent"].text
        assert "&lt;img src=x onerror=alert(1)&gt;" in pages["no_agent"].text
        assert pages["diff"].status_code == 200 and "diff-error" in pages["diff"].text


def test_forms_need_the_session_csrf_token_and_the_scope(served: dict[str, Any]) -> None:
    srv = served["srv"]
    aid = served["waiting"]
    with login(srv, served["reader"]) as reader, login(srv, served["ops"]) as ops:
        page = ops.get("/console/approvals")
        assert page.status_code == 200 and aid in page.text
        # no token, another session's token: refused, nothing decided
        r = ops.post(f"/console/agents/{aid}/approve", data={"note": "x"})
        assert r.status_code == 403 and "CSRF" in r.text
        r = ops.post(f"/console/agents/{aid}/approve", data={"csrf": _csrf(reader.get("/").text)})
        assert r.status_code == 403
        # a token without approvals:write: refused even with its own CSRF token
        r = reader.post(f"/console/agents/{aid}/approve", data={"csrf": _csrf(reader.get("/").text)})
        assert r.status_code == 403 and "approvals:write" in r.text
        assert srv.host.get_agent(aid)["status"] == "waiting_approval"
        # a denial needs a reason
        r = ops.post(f"/console/agents/{aid}/deny", data={"csrf": _csrf(page.text), "note": " "})
        assert r.status_code == 400
        r = ops.post(f"/console/agents/{aid}/approve", data={"csrf": _csrf(page.text), "note": "ok by the CFO"})
        assert r.status_code == 303 and r.headers["location"] == f"/console/agents/{aid}"
        deadline = time.monotonic() + 60
        while srv.host.get_agent(aid)["status"] != "completed":
            assert time.monotonic() < deadline, srv.host.get_agent(aid)["status"]
            time.sleep(0.05)
        t = ops.get(f"/console/agents/{aid}").text
        assert "approved by token:" in t and "ok by the CFO" in t and "resumed from checkpoint" in t
        # the audit chain, verified by the button (a form like the others)
        audit = ops.get(f"/console/agents/{aid}/audit")
        assert ops.post(f"/console/agents/{aid}/audit/verify", data={}).status_code == 403
        v = ops.post(f"/console/agents/{aid}/audit/verify", data={"csrf": _csrf(audit.text)})
        assert v.status_code == 200 and 'id="verdict"' in v.text and 'class="ok"' in v.text


def test_tenants_see_only_their_own(served: dict[str, Any]) -> None:
    with login(served["srv"], served["globex"]) as c:
        assert served["hostile"] not in c.get("/").text
        r = c.get(f"/console/agents/{served['hostile']}")
        assert r.status_code == 404 and "agent_not_found" in r.text
        assert c.get(f"/console/agents/{served['hostile']}/audit").status_code == 404
        assert served["waiting"] not in c.get("/console/approvals").text
        assert "procurement" not in c.get("/console/registry").text.split("Policy diff")[0]
        r = c.get("/console/registry", params={"a": "procurement@production", "b": "procurement"})
        assert "bundle_not_found" in r.text


def test_an_expired_session_or_a_revoked_token_asks_for_a_login_again(served: dict[str, Any]) -> None:
    srv = served["srv"]
    sessions = srv.state.console.sessions
    with login(srv, served["reader"]) as c:
        assert c.get("/").status_code == 200
        idle, sessions.idle_s = sessions.idle_s, 0.0
        try:
            time.sleep(0.01)
            r = c.get("/console/approvals")
        finally:
            sessions.idle_s = idle
        assert r.status_code == 303 and "expired" in r.headers["location"]
        assert c.get("/").status_code == 303  # the session is gone, not only late
    secret = token(srv.host.store, "acme", "runs:read")
    with login(srv, secret) as c:
        assert c.get("/").status_code == 200
        tok = operator_tokens.authenticate(srv.host.store, secret)
        operator_tokens.revoke(srv.host.store, tok.token_id)
        r = c.get("/")
        assert r.status_code == 303 and "revoked" in r.headers["location"]


def test_registry_health_and_the_api_document(served: dict[str, Any]) -> None:
    srv = served["srv"]
    with login(srv, served["admin"]) as c:
        reg = c.get("/console/registry", params={"a": "procurement@production", "b": served["procurement"]})
        assert reg.status_code == 200 and "production" in reg.text and 'id="diff"' in reg.text
        health = c.get("/console/health")
        assert health.status_code == 200 and "spawn latency" in health.text and "tool calls by outcome" in health.text
        assert health.text.count("<svg") >= 5
        static = c.get("/console/static/console.css")
        assert static.status_code == 200 and static.headers["content-type"].startswith("text/css")
        assert c.get("/console/static/..%2Fpages.py").status_code == 404
    with login(srv, served["reader"]) as c:
        assert "spawn latency" not in c.get("/console/health").text  # server-wide figures: admin only
    doc = httpx.get(srv.url + "/openapi.json", headers=auth(served["admin"])).json()
    assert not any(p == "/" or p.startswith("/console") for p in doc["paths"])


def test_the_timeline_chart_places_calls_waits_and_checkpoints() -> None:
    record = {"created_at": 100.0, "finished_at": 110.0, "status": "completed"}
    recs = [
        {"kind": "agent.spawned", "t": 100.0, "name": "p"},
        {"kind": "tool.requested", "t": 101.0, "call_seq": 1, "tool": "erp.create_po"},
        {"kind": "tool.approval_requested", "t": 101.0, "call_seq": 1, "tool": "erp.create_po",
         "decision": {"decision": "approval", "rule": "r", "reason": "big"}},
        {"kind": "checkpoint", "t": 101.5, "checkpoint": 1, "size": 10},
        {"kind": "approval.granted", "t": 105.0, "by": "token:t", "note": None},
        {"kind": "agent.resumed", "t": 105.5, "checkpoint": 1},
        {"kind": "tool.answered", "t": 106.0, "call_seq": 1, "tool": "erp.create_po", "status": 0},
        {"kind": "agent.completed", "t": 110.0},
    ]
    tl = views.timeline(record, recs, {1: {"args": {"amount": 1}, "response": '{"ok": true}', "fuel": 7}}, 200.0)
    [call] = tl.calls
    assert call.waited == (101.0, 105.0) and call.decided_by == "token:t" and call.outcome == "ok"
    assert call.fuel == 7 and call.fuel_step == 7 and call.took == 5.0 and tl.ended == (110.0, "completed")
    chart = tl.chart()
    assert [r["name"] for r in chart["rows"]] == ["lifecycle", "erp.create_po", "approvals"]
    call_bar, wait_bar = chart["bars"]
    # 10 s of life over the chart's inner width: the call spans 1 s -> 6 s, the wait 1 s -> 5 s
    inner = views.CHART_W - views.LABEL_W - 10
    assert call_bar["x"] == pytest.approx(views.LABEL_W + inner * 0.1) and call_bar["w"] == pytest.approx(inner * 0.5)
    assert wait_bar["css"] == "approval" and wait_bar["w"] == pytest.approx(inner * 0.4)
    assert {m["css"] for m in chart["marks"]} == {"checkpoint", "resume", "end"}


def test_console_refusals_are_audited_and_bodies_capped(served: dict[str, Any]) -> None:
    from host.trust import audit

    srv = served["srv"]
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        form = c.get("/console/login")
        assert c.post("/console/login", data={"csrf": _csrf(form.text), "token": "tpo_guess"}).status_code == 401
        # the gateway still caps what the console's paths take (no bearer token needed to hit the login)
        big = c.post("/console/login", content=b"token=" + b"x" * (2 << 20),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert big.status_code == 413
    deadline = time.monotonic() + 10
    while True:
        refused = [r for r in audit.records(srv.host.store, "host.gateway")
                   if r["kind"] == "gateway.refused" and r.get("path") == "/console/login"]
        if {r["code"] for r in refused} >= {"unauthenticated", "payload_too_large"}:
            break
        assert time.monotonic() < deadline, refused
        time.sleep(0.05)
    assert not any("tpo_guess" in json.dumps(r) for r in refused)  # what was tried is not written down
