"""OpenTelemetry traces of what agents do, fed by the runtime's observer seam (:mod:`host.runtime.observe`).

One agent is one trace, from its spawn to its end, across every hibernation and every
process that resumed it: the trace id and the root span's id are derived from the agent id
(:func:`trace_ids`), so a span written by the process that resumed an agent a day later has
the same parent as one written at its spawn, without any context stored in the agent. The
root span (``invoke_agent <name>``) is written when the agent ends, spanning its whole life;
its children are written as things happen:

* ``torpor.spawn``, ``torpor.resume``, ``torpor.suspend``: the lifecycle moments the observer
  is told of, with their measured durations (a suspension: from the guest's stop at a tool
  call to its durable checkpoint);
* ``execute_tool <tool>``: one tool call, from the guest's stop to the answer it was given
  (or to its parking for a person: the call after the decision is a new span from the
  resume), with a ``torpor.policy <tool>`` child for the policy's decision (its kind, rule
  and reason code) and, for an LLM call, a ``chat <model>`` child carrying the OpenTelemetry
  GenAI semantic conventions (``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``...).

What the spans carry is what the audit events carry: ids, names, codes, counts and times.
Never an argument, a result, a log line, a denial's free text or an error message, since
any of them may hold what an agent or a tool was handed (a secret a tool leased is scrubbed
from answers, but a trace should not depend on that): a span's attributes are built only
from the fields named in this module.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``)
is set and ``OTEL_SDK_DISABLED`` is not ``true``: :func:`from_env` then builds a tracer
provider of Torpor's own (never the process-wide one a host embedding Torpor may have set)
exporting OTLP over HTTP/protobuf in batches; the other ``OTEL_*`` variables (headers,
service name, resource attributes, timeouts) are read by the SDK itself. When it is off the
``opentelemetry`` packages are not even imported and the seam is exactly as without this
module (``bench/observe_overhead.py`` measures both).
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from host.errors import ConfigError
from host.runtime.observe import Events, Observer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import Span, Tracer

    from host.runtime.agent import LiveAgent

_log = logging.getLogger("torpor.tracing")

#: The instrumentation scope of every span.
SCOPE = "torpor"
#: Tool-call spans held open at most (calls between their request and their answer); beyond
#: it the oldest is ended as it is (``torpor.tool.outcome`` ``unknown``) so memory stays bounded.
MAX_OPEN_CALLS = 10_000
#: The policy's decision events and the decision each stands for.
_DECISIONS = {"tool.allowed": "allow", "tool.denied": "deny", "tool.approval_requested": "approval",
              "tool.terminated": "terminate", "tool.deferred": "defer"}
#: What LLM providers are called in the GenAI conventions (``gen_ai.provider.name``).
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}


def trace_ids(agent_id: str) -> tuple[int, int]:
    """The trace id and the root span id of ``agent_id``'s trace: the same in every process."""
    h = hashlib.sha256(b"torpor.trace\0" + agent_id.encode()).digest()
    trace_id = int.from_bytes(h[:16], "big") or 1  # neither may be zero (an invalid context)
    span_id = int.from_bytes(h[16:24], "big") or 1
    return trace_id, span_id


def enabled_by_env(env: dict[str, str] | None = None) -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, the SDK not disabled)."""
    e = os.environ if env is None else env
    if e.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or e.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def from_env() -> Tracing | None:
    """A :class:`Tracing` exporting over OTLP/HTTP when the environment asks for it, else None."""
    if not enabled_by_env():
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Torpor exports traces over "
                          "'http/protobuf' only (point the endpoint at a collector's OTLP/HTTP port, 4318)")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return Tracing.with_exporter(OTLPSpanExporter(), batch=True)


def _safe(method: Callable[..., None]) -> Callable[..., None]:
    """An observer method that logs what it raises instead of raising it: an exception from an
    observer would end the agent's run, and a trace is never worth an agent."""

    @functools.wraps(method)
    def guarded(self: Any, *args: Any) -> None:
        try:
            method(self, *args)
        except Exception:
            _log.exception("tracing: %s failed (the agent goes on; its trace may miss a span)", method.__name__)

    return guarded


class _Pinned:  # an IdGenerator by its two methods: the SDK is imported only when tracing is on
    """An id generator that hands out random ids, or the ids pinned for the span being started
    (an agent's root span, whose ids are derived from the agent id: :func:`trace_ids`)."""

    def __init__(self) -> None:
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

        self.random = RandomIdGenerator()
        self.pinned: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("torpor_pinned_ids",
                                                                                            default=None)

    def generate_span_id(self) -> int:
        ids = self.pinned.get()
        return ids[1] if ids is not None else self.random.generate_span_id()

    def generate_trace_id(self) -> int:
        ids = self.pinned.get()
        return ids[0] if ids is not None else self.random.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        return True  # random, or the bits of a SHA-256 (W3C trace context level 2's "random" flag)


class _Call:
    """A tool call's open span and what is known of it until its answer."""

    __slots__ = ("ran_at", "span", "started_ns", "tokens")

    def __init__(self, span: Span, started_ns: int) -> None:
        self.span = span
        self.started_ns = started_ns
        self.ran_at: int | None = None  # when the tool began to run (after the checkpoint)
        self.tokens: dict[str, Any] | None = None  # the LLM usage it reported


class Tracing(Observer):
    """The runtime's observer writing spans (see the module docstring)."""

    def __init__(self, provider: TracerProvider, ids: _Pinned) -> None:
        self.provider = provider
        self._ids = ids
        self.tracer: Tracer = provider.get_tracer(SCOPE)
        self._calls: OrderedDict[tuple[str, Any], _Call] = OrderedDict()
        self._resumed_ns: dict[str, int] = {}  # an agent's last resume: a call recovered after it starts there
        self._checkpoint: dict[str, tuple[int, int]] = {}  # an agent's last checkpoint (seq, bytes)

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, *, batch: bool = True) -> Tracing:
        """Tracing into ``exporter`` (batched in a background thread, or each span as it ends)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        ids = _Pinned()
        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME")
                                                            or "torpor"}), id_generator=cast("IdGenerator", ids))
        provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
        return cls(provider, ids)

    def shutdown(self) -> None:
        """End what is still open and flush the exporter (the host is closing)."""
        for call in list(self._calls.values()):
            call.span.set_attribute("torpor.tool.outcome", "open_at_shutdown")
            call.span.end()
        self._calls.clear()
        try:
            self.provider.shutdown()
        except Exception:  # an exporter that cannot reach its collector must not fail a close
            _log.exception("could not flush the traces")

    # -- the spans ---------------------------------------------------------------------------
    def _parent(self, agent_id: str) -> Any:
        from opentelemetry import trace

        trace_id, span_id = trace_ids(agent_id)
        root = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))
        return trace.set_span_in_context(trace.NonRecordingSpan(root))

    def _span(self, agent: LiveAgent, name: str, start_ns: int, attributes: dict[str, Any],
              parent: Span | None = None) -> Span:
        from opentelemetry import trace

        context = trace.set_span_in_context(parent) if parent is not None else self._parent(agent.agent_id)
        return self.tracer.start_span(name, context=context, start_time=start_ns,
                                      attributes={"torpor.agent.id": agent.agent_id, **attributes})

    def _moment(self, agent: LiveAgent, name: str, seconds: float, attributes: dict[str, Any]) -> None:
        end = time.time_ns()
        self._span(agent, name, end - int(seconds * 1e9), attributes).end(end_time=end)

    # -- the observer ------------------------------------------------------------------------
    @_safe
    def spawned(self, agent: LiveAgent, seconds: float) -> None:
        self._moment(agent, "torpor.spawn", seconds, _agent_attributes(agent))

    @_safe
    def resumed(self, agent: LiveAgent, seconds: float) -> None:
        self._resumed_ns[agent.agent_id] = time.time_ns()
        self._moment(agent, "torpor.resume", seconds,
                     {**_agent_attributes(agent), "torpor.checkpoint.seq": int(agent.record.get("checkpoints", 0))})

    @_safe
    def suspended(self, agent: LiveAgent, seconds: float) -> None:
        seq, size = self._checkpoint.get(agent.agent_id, (int(agent.record.get("checkpoints", 0)), 0))
        self._moment(agent, "torpor.suspend", seconds, {"torpor.checkpoint.seq": seq, "torpor.checkpoint.bytes": size})
        now = time.time_ns()
        for (aid, _), call in reversed(self._calls.items()):  # the call it stopped at runs from now on
            if aid == agent.agent_id:
                if call.ran_at is None:
                    call.ran_at = now
                break

    @_safe
    def committed(self, agent: LiveAgent, events: Events, seconds: float) -> None:
        end = time.time_ns()
        for kind, data in events:
            if kind == "tool.requested":
                self._requested(agent, data, end, seconds)
            elif kind in _DECISIONS:
                self._decided(agent, data, _DECISIONS[kind], end, seconds)
            elif kind == "checkpoint":
                self._checkpoint[agent.agent_id] = (int(data.get("checkpoint") or 0), int(data.get("size") or 0))
            elif kind == "tokens.used":
                call = self._open(agent, data.get("call_seq"), end, str(data.get("tool", "")), recovered=True)
                call.tokens = data
            elif kind == "tool.answered":
                self._answered(agent, data, end)
            elif kind.startswith("agent.") and _final(agent, kind):
                self._ended(agent, kind[len("agent."):], data, end)

    # -- tool calls ------------------------------------------------------------------------------
    def _requested(self, agent: LiveAgent, data: dict[str, Any], end: int, seconds: float) -> None:
        stopped = getattr(agent, "stopped_at", 0.0)
        # The guest's stop, in wall-clock time (it was taken on the monotonic clock).
        start = end - int((time.perf_counter() - stopped) * 1e9) if stopped else end - int(seconds * 1e9)
        self._open(agent, data.get("call_seq"), start, str(data.get("tool", "")))

    def _open(self, agent: LiveAgent, seq: Any, start_ns: int, tool: str, *, recovered: bool = False) -> _Call:
        key = (agent.agent_id, seq)
        call = self._calls.get(key)
        if call is not None:
            return call
        if recovered:  # decided in an earlier drive (an approval, a restart): it starts at the resume
            start_ns = min(start_ns, self._resumed_ns.get(agent.agent_id, start_ns))
        span = self._span(agent, f"execute_tool {tool}", start_ns,
                          {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                           "torpor.call.seq": seq if isinstance(seq, int) else -1})
        call = self._calls[key] = _Call(span, start_ns)
        while len(self._calls) > MAX_OPEN_CALLS:
            _, old = self._calls.popitem(last=False)
            old.span.set_attribute("torpor.tool.outcome", "unknown")
            old.span.end()
        return call

    def _decided(self, agent: LiveAgent, data: dict[str, Any], decision: str, end: int, seconds: float) -> None:
        call = self._open(agent, data.get("call_seq"), end, str(data.get("tool", "")))
        raw = data.get("decision")
        d: dict[str, Any] = raw if isinstance(raw, dict) else {}
        attributes: dict[str, Any] = {"torpor.policy.decision": decision, "gen_ai.tool.name": str(data.get("tool", ""))}
        rule = d.get("rule")
        if isinstance(rule, str):
            attributes["torpor.policy.rule"] = rule
        rules = d.get("rules")
        if isinstance(rules, list) and all(isinstance(r, str) for r in rules):
            attributes["torpor.policy.rules"] = rules
        if isinstance(d.get("code"), str):
            attributes["torpor.policy.code"] = d["code"]
        at = max(call.started_ns, end - int(seconds * 1e9))  # decided before this commit began
        self._span(agent, f"torpor.policy {data.get('tool', '')}", at, attributes, parent=call.span).end(end_time=at)
        call.span.set_attribute("torpor.policy.decision", decision)
        if decision in ("approval", "terminate", "defer"):  # no answer follows in this drive
            call.span.set_attribute("torpor.tool.outcome", decision)
            self._close(agent.agent_id, data.get("call_seq"), end)

    def _answered(self, agent: LiveAgent, data: dict[str, Any], end: int) -> None:
        call = self._open(agent, data.get("call_seq"), end, str(data.get("tool", "")), recovered=True)
        status = data.get("status")
        ok = status == 0
        call.span.set_attribute("torpor.tool.status", status if isinstance(status, int) else -1)
        if call.span.is_recording() and not any(k == "torpor.policy.decision" for k in _attributes(call.span)):
            call.span.set_attribute("torpor.policy.decision", "recorded")  # decided in an earlier drive
        call.span.set_attribute("torpor.tool.outcome", "ok" if ok else "error")
        if call.tokens is not None:
            self._llm(agent, call, end)
        if not ok:
            from opentelemetry.trace import Status, StatusCode

            call.span.set_status(Status(StatusCode.ERROR))
            call.span.set_attribute("error.type", "tool_error")
        self._close(agent.agent_id, data.get("call_seq"), end)

    def _llm(self, agent: LiveAgent, call: _Call, end: int) -> None:
        """The GenAI span of an LLM call: model, provider, input and output tokens."""
        t: dict[str, Any] = call.tokens or {}
        model = t.get("model") if isinstance(t.get("model"), str) else None
        attributes: dict[str, Any] = {"gen_ai.operation.name": "chat"}
        if model:
            attributes["gen_ai.request.model"] = model
            attributes["gen_ai.response.model"] = model
        provider = _PROVIDERS.get(str(t.get("provider")))
        if provider:
            attributes["gen_ai.provider.name"] = provider
            attributes["gen_ai.system"] = provider  # the older name, still read by many backends
        for key, attr in (("input_tokens", "gen_ai.usage.input_tokens"), ("output_tokens", "gen_ai.usage.output_tokens")):
            if isinstance(t.get(key), int):
                attributes[attr] = t[key]
        if isinstance(t.get("tokens"), int):
            attributes["torpor.tokens"] = t["tokens"]
        name = f"chat {model}" if model else "chat"
        self._span(agent, name, call.ran_at or call.started_ns, attributes, parent=call.span).end(end_time=end)

    def _close(self, agent_id: str, seq: Any, end: int) -> None:
        call = self._calls.pop((agent_id, seq), None)
        if call is not None:
            call.span.end(end_time=max(end, call.started_ns))

    # -- the agent's end ---------------------------------------------------------------------
    def _ended(self, agent: LiveAgent, status: str, data: dict[str, Any], end: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        for key in [k for k in self._calls if k[0] == agent.agent_id]:
            call = self._calls[key]
            call.span.set_attribute("torpor.tool.outcome", "unknown")
            self._close(agent.agent_id, key[1], end)
        self._resumed_ns.pop(agent.agent_id, None)
        self._checkpoint.pop(agent.agent_id, None)
        created = agent.record.get("created_at")
        start = int(float(created) * 1e9) if isinstance(created, int | float) else end
        u = agent.usage
        attributes: dict[str, Any] = {
            **_agent_attributes(agent), "gen_ai.operation.name": "invoke_agent", "torpor.agent.status": status,
            "torpor.fuel": int(u.get("fuel_used", 0) or 0), "torpor.tokens": int(u.get("tokens", 0) or 0),
            "torpor.tool_calls": int(u.get("tool_calls", 0) or 0),
            "torpor.checkpoints": int(agent.record.get("checkpoints", 0) or 0),
        }
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            attributes["error.type"] = error["code"]  # the code only: a message may quote what the agent held
        token = self._ids.pinned.set(trace_ids(agent.agent_id))
        try:
            from opentelemetry.context import Context

            span = self.tracer.start_span(f"invoke_agent {agent.bundle.name}", context=Context(),
                                          start_time=min(start, end), attributes=attributes)
        finally:
            self._ids.pinned.reset(token)
        if status != "completed":
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end)


def _agent_attributes(agent: LiveAgent) -> dict[str, Any]:
    tenant = agent.record.get("tenant")
    out: dict[str, Any] = {"gen_ai.agent.id": agent.agent_id, "gen_ai.agent.name": agent.bundle.name,
                           "torpor.bundle.digest": agent.bundle.digest}
    if isinstance(tenant, str):
        out["torpor.tenant"] = tenant
    return out


def _final(agent: LiveAgent, kind: str) -> bool:
    """Whether ``kind`` is the event of the agent's end (``agent.<its final status>``, sealed
    by the commit that set ``finished_at``)."""
    rec = agent.record
    return rec.get("finished_at") is not None and kind == f"agent.{rec.get('status')}"


def _attributes(span: Span) -> dict[str, Any]:
    return dict(getattr(span, "attributes", None) or {})
