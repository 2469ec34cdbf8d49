"""The gateway and the core API against a real uvicorn server on 127.0.0.1 (in a thread of
the test process): tokens, scopes, tenants, rate limits, body caps, runs, idempotency."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BundleFactory
from serve_helpers import InProcessServer, auth, register, token

from host.server.config import ServerConfig
from host.trust import audit, operator_tokens


@pytest.fixture
def served(bundles: BundleFactory, tmp_path: Path) -> Iterator[tuple[InProcessServer, str, str]]:
    store = tmp_path / "store"
    hello, steps = register(store, bundles.example("hello"), bundles.example("steps"))
    with InProcessServer(store) as srv:
        yield srv, hello, steps


def _refusals(srv: InProcessServer) -> list[dict[str, object]]:
    import anyio

    anyio.run(srv.state.refusals.flush)  # the batch not yet written
    return [r for r in audit.records(srv.host.store, "host.gateway") if r["kind"] == "gateway.refused"]


def test_no_token_bad_token_revoked_expired_are_401_json_and_audited(served: tuple[InProcessServer, str, str]) -> None:
    srv, _, _ = served
    store = srv.host.store
    good = token(store, "acme", "runs:read")
    revoked = token(store, "acme", "runs:read")
    rid = next(t.token_id for t in operator_tokens.tokens(store) if operator_tokens.authenticate(store, revoked).token_id == t.token_id)
    expired = operator_tokens.create(store, tenant="acme", scopes=["runs:read"], now=time.time() - 100,
                                     expires_at=time.time() - 1)[0]
    with httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/agents", headers=auth(good)).status_code == 200
        operator_tokens.revoke(store, rid)
        cases = {"none": {}, "not bearer": {"Authorization": "Basic abc"}, "unknown": auth("tpo_nothing"),
                 "revoked": auth(revoked), "expired": auth(expired)}
        for what, headers in cases.items():
            r = c.get("/v1/agents", headers=headers)
            assert r.status_code == 401, what
            assert r.json()["error"]["code"] == "unauthenticated", what
        assert "revoked" in c.get("/v1/agents", headers=auth(revoked)).json()["error"]["message"]
        assert "expired" in c.get("/v1/agents", headers=auth(expired)).json()["error"]["message"]
        assert c.get("/healthz").status_code == 200  # open paths need no token
    refused = _refusals(srv)
    assert len(refused) >= 5 and {r["code"] for r in refused} == {"unauthenticated"}
    assert all(revoked not in json.dumps(r) for r in refused)  # no secret in the audit
    report = audit.verify_store(store, agent_id="host.gateway")
    assert report.ok, report.summary()


def test_scopes_and_tenants(served: tuple[InProcessServer, str, str]) -> None:
    srv, hello, _ = served
    store = srv.host.store
    writer = token(store, "acme", "runs:write", "runs:read")
    reader = token(store, "acme", "runs:read")
    other = token(store, "globex", "runs:read", "runs:write")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/runs", headers=auth(reader), json={"agent": hello, "input": {"name": "ada"}})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = c.post("/v1/runs", headers=auth(writer), json={"agent": hello, "input": {"name": "ada"}, "wait": 30})
        assert r.status_code == 201, r.text
        agent = r.json()
        assert agent["status"] == "completed" and agent["output"] == {"greeting": "hello, ada"}
        assert agent["tenant"] == "acme" and agent["bundle_digest"] == hello.removeprefix("sha256:")
        aid = agent["agent_id"]
        assert c.get(f"/v1/agents/{aid}", headers=auth(reader)).json()["agent_id"] == aid
        assert [a["agent_id"] for a in c.get("/v1/agents", headers=auth(reader)).json()["agents"]] == [aid]
        # another tenant: not found, never forbidden, and not listed
        for path in (f"/v1/agents/{aid}", f"/v1/agents/{aid}/inspect", f"/v1/agents/{aid}/audit",
                     f"/v1/agents/{aid}/events", f"/v1/agents/{aid}/wait?timeout=0"):
            r = c.get(path, headers=auth(other))
            assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found", path
        assert c.get("/v1/agents", headers=auth(other)).json() == {"agents": []}
        # its own audit: records and a verified chain
        recs = c.get(f"/v1/agents/{aid}/audit", headers=auth(reader)).json()["records"]
        assert recs[0]["kind"] == "agent.spawned" and recs[-1]["kind"] == "agent.completed"
        assert c.get(f"/v1/agents/{aid}/audit/verify", headers=auth(reader)).json()["ok"] is True
    refused = _refusals(srv)
    assert any(r["code"] == "forbidden" and r.get("needs") == "runs:write" for r in refused)


def test_bad_runs_unknown_digest_invalid_json_oversized(served: tuple[InProcessServer, str, str]) -> None:
    srv, hello, _ = served
    t = token(srv.host.store, "acme", "runs:write", "runs:read")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/runs", headers=auth(t), json={"agent": "sha256:" + "0" * 64})
        assert r.status_code == 404 and r.json()["error"]["code"] == "bundle_not_found"
        r = c.post("/v1/runs", headers=auth(t), json={"agent": "nosuchname"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "bundle_not_found"
        for body in (b'{"agent": ', b"[1, 2]", b'{"agent": "x", "input": NaN}', b"\xff\xfe",
                     b'{"agent": "' + hello.encode() + b'", "input": {"s": "\\ud800"}}'):
            r = c.post("/v1/runs", headers={**auth(t), "Content-Type": "application/json"}, content=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_input", (body, r.text)
        r = c.post("/v1/runs", headers=auth(t), json={"agent": hello, "fuel": -1})
        assert r.status_code == 400
        big = json.dumps({"agent": hello, "input": {"pad": "x" * (2 << 20)}})
        r = c.post("/v1/runs", headers={**auth(t), "Content-Type": "application/json"}, content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: cut off where it crosses the cap
            for _ in range(40):
                yield b"x" * 65536

        r = c.post("/v1/runs", headers={**auth(t), "Content-Type": "application/json"}, content=chunks())
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert c.get("/v1/agents", headers=auth(t)).json() == {"agents": []}  # none of these started a run
        r = c.get("/v1/agents/nope", headers=auth(t))
        assert r.status_code == 404 and r.json()["error"]["code"] == "agent_not_found"
        r = c.get("/v1/nowhere", headers=auth(t))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_same_idempotency_key_one_run_and_conflict(served: tuple[InProcessServer, str, str]) -> None:
    srv, hello, _ = served
    t = token(srv.host.store, "acme", "runs:write", "runs:read")
    other = token(srv.host.store, "globex", "runs:write", "runs:read")
    body = {"agent": hello, "input": {"name": "ada"}}
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        first = c.post("/v1/runs", headers={**auth(t), "Idempotency-Key": "k-1"}, json=body)
        again = c.post("/v1/runs", headers={**auth(t), "Idempotency-Key": "k-1"}, json={**body, "wait": 10})
        assert (first.status_code, again.status_code) == (201, 200)
        assert first.json()["agent_id"] == again.json()["agent_id"]
        r = c.post("/v1/runs", headers={**auth(t), "Idempotency-Key": "k-1"}, json={**body, "input": {"name": "bob"}})
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_conflict"
        # keys are per tenant: another tenant's same key is its own run
        r = c.post("/v1/runs", headers={**auth(other), "Idempotency-Key": "k-1"}, json=body)
        assert r.status_code == 201 and r.json()["agent_id"] != first.json()["agent_id"]
        assert len(c.get("/v1/agents", headers=auth(t)).json()["agents"]) == 1


def test_rate_limits_per_token_and_tenant(bundles: BundleFactory, tmp_path: Path) -> None:
    store = tmp_path / "store"
    register(store, bundles.example("hello"))
    cfg = ServerConfig(token_rate=0.01, token_burst=3, tenant_rate=0.01, tenant_burst=5)
    with InProcessServer(store, cfg) as srv, httpx.Client(base_url=srv.url) as c:
        a, b = token(srv.host.store, "acme", "runs:read"), token(srv.host.store, "acme", "runs:read")
        codes = [c.get("/v1/agents", headers=auth(a)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/v1/agents", headers=auth(a))
        assert r.json()["error"]["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
        # the tenant's bucket: 5 in all, so b gets 2 before the tenant is over
        codes = [c.get("/v1/agents", headers=auth(b)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert "tenant acme" in c.get("/v1/agents", headers=auth(b)).json()["error"]["message"]
        assert any(r["code"] == "rate_limited" for r in _refusals(srv))
