"""OpenTelemetry traces (host/runtime/tracing.py): one agent one trace across hosts, a span per
spawn, suspension, resume, tool call and policy decision, GenAI attributes on LLM calls, no
secret anywhere; exported over real OTLP/HTTP to a collector on 127.0.0.1 when the
environment names one."""

from __future__ import annotations

import http.server
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import EXAMPLES, BundleFactory
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from serve_helpers import auth, register, start_process, token
from test_triage import CRM_TOKEN, TICKET, Broker, agent_dir, build, fake

from host.errors import ConfigError
from host.runtime import Host
from host.runtime import tracing as tracing_mod
from host.runtime.tracing import Tracing, trace_ids

#: A value the ticket carries into the LLM's arguments: it must reach no span either.
ARG_SECRET = "sk-live-ARGSECRET-93f1c2"


def _tracing() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return Tracing.with_exporter(exporter, batch=False), exporter


def _everything(spans: list[ReadableSpan]) -> str:
    """Every name, attribute key and value, and event of the spans, as one text."""
    return json.dumps([[s.name, {k: str(v) for k, v in (s.attributes or {}).items()},
                        [e.name for e in s.events]] for s in spans])


def _by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


@pytest.fixture
def services() -> Iterator[Any]:
    with fake.Services(0, 0, lifetime=120) as s:
        yield s


def test_an_agent_is_one_trace_across_hosts_with_genai_attributes_and_no_secret(tmp_path: Path,
                                                                                  services: Any) -> None:
    crm_auth = ('methods = ["GET"]\n', 'methods = ["GET"]\nheaders = { Authorization = "Bearer {crm_token}" }\n'
                'credentials = ["crm_token"]\n')
    b = build(agent_dir(tmp_path, services, replace=dict([crm_auth])))
    ticket = {**TICKET, "body": TICKET["body"] + f" My API key is {ARG_SECRET}."}
    payload = {"ticket": ticket, "crm": f"http://127.0.0.1:{services.crm_port}"}
    first, first_spans = _tracing()
    with Host(tmp_path / "store", broker=Broker(), tracing=first) as host:
        r = anyio.run(lambda: host.run(b, payload))
        assert r.status == "waiting_approval", (r.error, r.logs)
    before = list(first_spans.get_finished_spans())  # the host's close ended and flushed everything
    # Another host (as another process would) takes the approval: same trace, same root.
    second, second_spans = _tracing()
    with Host(tmp_path / "store", broker=Broker(), tracing=second) as host:
        done = anyio.run(lambda: host.approve(r.agent_id, by="lead@example.com"))
        assert done.status == "completed", (done.error, done.logs)
    after = list(second_spans.get_finished_spans())
    spans = before + after

    trace_id, root_id = trace_ids(r.agent_id)
    assert {s.context.trace_id for s in spans} == {trace_id}
    # The root: written once, at the end, by the host that saw it; it spans the agent's life.
    [root] = _by_name(spans, "invoke_agent triage")
    assert root in after and root.parent is None and root.context.span_id == root_id
    assert root.attributes is not None
    assert root.attributes["torpor.agent.status"] == "completed" and root.attributes["gen_ai.agent.id"] == r.agent_id
    assert root.attributes["torpor.tokens"] == services.tokens > 0
    assert root.start_time is not None and root.end_time is not None
    # (the spawn span starts at the request, a moment before the record's created_at)
    assert all(s.start_time is not None and s.start_time >= root.start_time for s in spans if s.name != "torpor.spawn")
    assert all(s.end_time is not None and s.end_time <= root.end_time for s in spans)
    by_id = {s.context.span_id: s for s in spans}

    def parent(s: ReadableSpan) -> ReadableSpan | None:
        return by_id.get(s.parent.span_id) if s.parent is not None else None

    # Lifecycle spans hang off the root, in both hosts.
    [spawn] = _by_name(before, "torpor.spawn")
    [resume] = _by_name(after, "torpor.resume")
    suspends = _by_name(spans, "torpor.suspend")
    assert len(suspends) >= r.suspensions > 0
    for s in (spawn, resume, *suspends):
        assert s.parent is not None and s.parent.span_id == root_id
    # Tool calls: each a span under the root, with its policy decision as a child.
    tools = [s for s in spans if s.name.startswith("execute_tool ")]
    assert {s.name for s in tools} >= {"execute_tool llm.chat", "execute_tool http.fetch", "execute_tool kv.incr",
                                       "execute_tool http.send_reply"}
    for s in tools:
        assert s.parent is not None and s.parent.span_id == root_id
        assert s.attributes is not None and s.attributes["gen_ai.operation.name"] == "execute_tool"
    # The reply: parked for a person in the first host, run after the approval in the second.
    parked, sent = sorted(_by_name(spans, "execute_tool http.send_reply"), key=lambda s: s.start_time or 0)
    assert parked in before and parked.attributes is not None and parked.attributes["torpor.tool.outcome"] == "approval"
    assert sent in after and sent.attributes is not None and sent.attributes["torpor.tool.outcome"] == "ok"
    [decision] = [s for s in spans if s.name == "torpor.policy http.send_reply"]
    assert parent(decision) is parked and decision.attributes is not None
    assert decision.attributes["torpor.policy.decision"] == "approval"
    assert decision.attributes["torpor.policy.rule"] == 'tools."http.send_reply".approval'
    allowed = [s for s in spans if s.name == "torpor.policy http.fetch"]
    assert allowed and all(s.attributes is not None and s.attributes["torpor.policy.decision"] == "allow"
                           for s in allowed)
    # LLM calls: a GenAI span under each llm.chat call; their tokens add up to the bill.
    chats = _by_name(spans, "chat triage-small")
    assert len(chats) == 2
    for c in chats:
        p = parent(c)
        assert p is not None and p.name == "execute_tool llm.chat"
        a = c.attributes
        assert a is not None and a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == "triage-small"
        assert a["gen_ai.provider.name"] == "openai"
        assert isinstance(a["gen_ai.usage.input_tokens"], int) and isinstance(a["gen_ai.usage.output_tokens"], int)
    assert sum(int(c.attributes["gen_ai.usage.input_tokens"]) + int(c.attributes["gen_ai.usage.output_tokens"])
               for c in chats if c.attributes) == services.tokens
    # No secret: neither the leased CRM credential nor what the agent put into a tool's arguments.
    text = _everything(spans)
    assert CRM_TOKEN not in text and ARG_SECRET not in text and "Lovelace" not in text


def test_a_denial_is_a_policy_span_with_its_rule(bundles: BundleFactory, tmp_path: Path) -> None:
    b = bundles.load(EXAMPLES / "procurement")
    tracing, exporter = _tracing()
    note = "call me on +44 20 7946 0018"
    with Host(tmp_path, tracing=tracing) as host:
        res = anyio.run(lambda: host.run(b, {"item": "monitors", "amount": 4_800, "note": note}))
        assert res.status == "completed", (res.error, res.logs)
    spans = list(exporter.get_finished_spans())
    denials = [s for s in spans if s.name == "torpor.policy notify.send"
               and s.attributes is not None and s.attributes["torpor.policy.decision"] == "deny"]
    assert len(denials) == 1
    a = denials[0].attributes
    assert a is not None and a["torpor.policy.code"] == "pii_detected"
    assert str(a["torpor.policy.rule"]).startswith("validators[1].detect.")
    assert "7946" not in _everything(spans)  # the denied argument is nowhere
    denied_call = next(s for s in spans if denials[0].parent and s.context.span_id == denials[0].parent.span_id)
    assert denied_call.name == "execute_tool notify.send" and denied_call.attributes is not None
    assert denied_call.attributes["torpor.tool.outcome"] == "error"  # the agent was answered a denial


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector's trace endpoint: keeps each request's decoded spans."""

    received: list[Any]

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        self.received.append((self.path, self.headers.get("x-tenant"), req))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_traces_go_over_otlp_http_when_the_environment_names_an_endpoint(
        bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[Any] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "torpor-under-test")
        b = bundles.load(EXAMPLES / "steps")
        with Host(tmp_path) as host:
            assert host.tracing is not None
            res = anyio.run(lambda: host.run(b, {"n": 2}))
            assert res.status == "completed"
        # The close flushed the batch: the collector has the whole trace.
        spans = [(rs, s) for _, _, req in received for rs in req.resource_spans
                 for ss in rs.scope_spans for s in ss.spans]
        assert {path for path, _, _ in received} == {"/v1/traces"}
        assert {tenant for _, tenant, _ in received} == {"acme"}
        names = [s.name for _, s in spans]
        assert names.count("execute_tool kv.incr") == 2 and "invoke_agent steps" in names
        trace_id, root_id = trace_ids(res.agent_id)
        assert {int.from_bytes(s.trace_id, "big") for _, s in spans} == {trace_id}
        [root] = [s for _, s in spans if s.name == "invoke_agent steps"]
        assert int.from_bytes(root.span_id, "big") == root_id and root.parent_span_id == b""
        service = {a.value.string_value for rs, _ in spans for a in rs.resource.attributes if a.key == "service.name"}
        assert service == {"torpor-under-test"}
    finally:
        server.shutdown()
        server.server_close()


def test_torpor_serve_exports_its_agents_traces_and_flushes_them_at_sigterm(bundles: BundleFactory,
                                                                            tmp_path: Path) -> None:
    """The real command: ``torpor serve`` with the variable set runs an agent over HTTP and,
    at SIGTERM, sends what it still batched before it exits."""
    received: list[Any] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    store = tmp_path / "store"
    [steps] = register(store, bundles.example("steps"))
    secret = token(store, "acme", "runs:write")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
           "OTEL_BSP_SCHEDULE_DELAY": "60000"}  # nothing goes out before the SIGTERM but what it flushes
    proc, url = start_process(store, env=env)
    try:
        r = httpx.post(url + "/v1/runs", headers=auth(secret), json={"agent": steps, "input": {"n": 3}, "wait": 60},
                       timeout=60)
        assert r.status_code == 201 and r.json()["status"] == "completed", r.text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b"traces over OTLP" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.shutdown()
        server.server_close()
    names = [s.name for _, _, req in received for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert names.count("execute_tool kv.incr") == 3 and names.count("invoke_agent steps") == 1, names


def test_the_environment_turns_tracing_on_and_refuses_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                 "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    assert tracing_mod.from_env() is None  # off: not even the SDK is needed
    assert tracing_mod.enabled_by_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing_mod.enabled_by_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"})
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="http/protobuf"):
        tracing_mod.from_env()


def test_a_failing_tracer_never_ends_an_agent(bundles: BundleFactory, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    tracing, exporter = _tracing()

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the SDK broke")

    tracing.tracer.start_span = broken  # type: ignore[method-assign]
    b = bundles.load(EXAMPLES / "steps")
    with Host(tmp_path, tracing=tracing) as host:
        res = anyio.run(lambda: host.run(b, {"n": 3}))
    assert res.status == "completed" and res.output == {"sum": 6, "last": 3}
    assert exporter.get_finished_spans() == ()
    assert "tracing: committed failed" in caplog.text
