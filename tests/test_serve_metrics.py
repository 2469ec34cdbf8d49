"""``/metrics``, ``/healthz`` and ``/readyz`` against a real uvicorn server on 127.0.0.1: a real
run (spawn, tool calls, a park on approval, an approval over HTTP, a denial) shows in the
Prometheus text exactly as the agent's own record and audit count it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import BundleFactory
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import InProcessServer, auth, register, token

from host.server import health

NOTE = {"item": "laptops", "amount": 75000, "note": "call me on bob@example.com"}


@pytest.fixture
def served(bundles: BundleFactory, tmp_path: Path) -> Iterator[tuple[InProcessServer, dict[str, str]]]:
    store = tmp_path / "store"
    refs = register(store, bundles.example("procurement"), bundles.guest("notool"))
    with InProcessServer(store) as srv:
        yield srv, dict(zip(("procurement", "notool"), refs, strict=True))


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(c: httpx.Client, secret: str) -> Samples:
    """Every sample of ``/metrics``, as the Prometheus parser reads it."""
    r = c.get("/metrics", headers=auth(secret))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_a_run_shows_in_the_metrics(served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, refs = served
    admin = token(srv.host.store, "acme", "admin")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/runs", headers=auth(admin), json={"agent": refs["procurement"], "input": NOTE, "wait": 60})
        assert r.status_code == 201 and r.json()["status"] == "waiting_approval", r.text
        aid = r.json()["agent_id"]
        r = c.post(f"/v1/agents/{aid}/approve", headers=auth(admin), json={"note": "ok"})
        assert r.status_code == 200, r.text
        done = c.get(f"/v1/agents/{aid}/wait", params={"timeout": 60}, headers=auth(admin)).json()
        assert done["status"] == "completed" and done["output"]["status"] == "ordered", done
        assert done["output"]["notification"]["redacted"] is True  # the guardrail denied the first one
        records = c.get(f"/v1/agents/{aid}/audit", headers=auth(admin)).json()["records"]
        m = scrape(c, admin)

    kinds = [x["kind"] for x in records]
    assert value(m, "torpor_spawns_total", tenant="acme") == 1
    assert value(m, "torpor_spawn_seconds_count") == 1
    # a suspension per stop at a tool call, as the agent's own record and audit count them
    stops = kinds.count("tool.requested")
    assert stops == done["usage"]["suspensions"] > 5
    assert value(m, "torpor_suspensions_total", tenant="acme") == stops
    assert value(m, "torpor_suspend_seconds_count") == stops
    assert value(m, "torpor_resumes_total", tenant="acme") == 1  # after the approval, from its checkpoint
    assert value(m, "torpor_resume_seconds_count") == 1
    # tool calls by tool and outcome
    assert value(m, "torpor_tool_calls_total", tool="erp.create_po", outcome="approval") == 1
    assert value(m, "torpor_tool_calls_total", tool="erp.create_po", outcome="ok") == 1
    assert value(m, "torpor_tool_calls_total", tool="notify.send", outcome="denied") == 1
    assert value(m, "torpor_tool_calls_total", tool="notify.send", outcome="ok") == 1
    assert value(m, "torpor_tool_calls_total", tool="erp.budget", outcome="ok") == 1
    [denied] = [x for x in records if x["kind"] == "tool.denied"]
    assert value(m, "torpor_denials_total", tool="notify.send", reason=denied["decision"]["code"]) == 1
    answered = kinds.count("tool.answered") - 1  # the denied call's answer is its denial, counted once
    outcomes = sum(v for (name, labels), v in m.items() if name == "torpor_tool_calls_total"
                   and dict(labels)["outcome"] in ("ok", "error"))
    assert outcomes == answered
    # how it ended, what it burnt, what the store holds
    assert value(m, "torpor_agents_finished_total", status="completed") == 1
    assert value(m, "torpor_agents", status="completed") == 1
    assert value(m, "torpor_agents", status="waiting_approval") == 0
    assert value(m, "torpor_fuel_total", tenant="acme") == done["usage"]["fuel_used"] > 0
    assert value(m, "torpor_commit_seconds_count") >= stops
    assert value(m, "torpor_store_file_bytes") > 0 and value(m, "torpor_store_used_bytes") > 0
    # the HTTP edge, by route template (never the agent id of the path)
    assert value(m, "torpor_http_requests_total", method="POST", route="/v1/runs", status="201") == 1
    assert value(m, "torpor_http_requests_total", method="POST", route="/v1/agents/{agent_id}/approve",
                 status="200") == 1
    assert not [k for k in m if aid in str(k)]


def test_a_tool_the_policy_does_not_grant_is_not_a_label(served: tuple[InProcessServer, dict[str, str]]) -> None:
    """A guest names any tool it likes; a label takes only the names its policy grants."""
    srv, refs = served
    admin = token(srv.host.store, "acme", "admin")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/runs", headers=auth(admin), json={"agent": refs["notool"], "wait": 60})
        assert r.json()["status"] == "completed", r.text
        m = scrape(c, admin)
    assert value(m, "torpor_tool_calls_total", tool="<ungranted>", outcome="denied") == 2
    assert value(m, "torpor_tool_calls_total", tool="kv.get", outcome="ok") == 1
    assert not [k for k in m if "no.such.tool" in str(k) or "kv.set" in str(k)]


def test_metrics_need_an_admin_token_and_health_needs_none(served: tuple[InProcessServer, dict[str, str]]) -> None:
    srv, _ = served
    admin = token(srv.host.store, "acme", "admin")
    reader = token(srv.host.store, "acme", "runs:read")
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
        r = c.get("/metrics", headers=auth(reader))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["store"]["ok"] is True, ready.text
        assert ready.json()["store"]["disk_free_bytes"] > 0
        doc = c.get("/openapi.json", headers=auth(reader)).json()
        m = scrape(c, admin)
    assert doc["paths"]["/metrics"]["get"]["x-torpor-scope"] == "admin"
    assert "text/plain; version=0.0.4" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    for open_path in ("/healthz", "/readyz"):
        assert doc["paths"][open_path]["get"]["security"] == []
    # the refusals counted by the gateway, and by the HTTP edge under their route
    assert value(m, "torpor_gateway_refusals_total", code="unauthenticated") == 1
    assert value(m, "torpor_gateway_refusals_total", code="forbidden") == 1
    assert value(m, "torpor_http_requests_total", method="GET", route="<refused>", status="401") == 1
    assert value(m, "torpor_http_requests_total", method="GET", route="/metrics", status="403") == 1
    assert value(m, "torpor_http_requests_total", method="GET", route="/readyz", status="200") == 1


def test_readyz_is_503_while_the_store_cannot_take_a_write(served: tuple[InProcessServer, dict[str, str]],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that holds the store's lock makes the server not ready, and ready again once it lets go."""
    srv, _ = served
    monkeypatch.setattr(health, "CHECK_TIMEOUT_S", 0.3)
    monkeypatch.setattr(health, "CHECK_TTL_S", 0.0)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with srv.host.store.write():
            holding.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        r = httpx.get(srv.url + "/readyz", timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_busy", r.text
    finally:
        release.set()
        t.join(30)
    deadline = time.monotonic() + 10
    while (r := httpx.get(srv.url + "/readyz", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.05)


def test_readyz_probes_share_one_store_check(served: tuple[InProcessServer, dict[str, str]]) -> None:
    """Anyone can probe /readyz: a burst of probes costs the store one transaction per interval."""
    srv, _ = served
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        before, t0 = srv.host.store.commits, time.monotonic()
        for _ in range(50):
            assert c.get("/readyz").status_code == 200
        elapsed = time.monotonic() - t0
    assert srv.host.store.commits - before <= 1 + elapsed / health.CHECK_TTL_S


def test_histogram_buckets_are_cumulative_and_bounds_inclusive() -> None:
    from host.server.metrics import LATENCY_BUCKETS, _Histogram

    h = _Histogram("torpor_x_seconds", "x")
    for v in (0.0, 0.001, 0.0011, 3.0, 99.0):  # 0.001 is a bound: counted in its own bucket
        h.observe(v)
    [family] = text_string_to_metric_families(_exposition(h.family()))
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.001"] == 2 and buckets["0.0025"] == 3 and buckets["5.0"] == 4 and buckets["+Inf"] == 5
    assert list(buckets.values()) == sorted(buckets.values()) and len(buckets) == len(LATENCY_BUCKETS) + 1
    assert {s.name: s.value for s in family.samples}["torpor_x_seconds_count"] == 5


def test_a_label_keeps_a_bounded_number_of_values() -> None:
    from host.server.metrics import OTHER, _Bounded

    label = _Bounded(limit=3)
    assert [label(v) for v in ("a", "b", "c", "d", "a", "e")] == ["a", "b", "c", OTHER, "a", OTHER]


def _exposition(family: object) -> str:
    from prometheus_client import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    class One:
        def collect(self) -> list[object]:
            return [family]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())  # type: ignore[arg-type]
    return generate_latest(registry).decode()
