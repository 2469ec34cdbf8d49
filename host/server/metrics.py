"""``GET /metrics``: the server and its agents in the Prometheus text format (scope ``admin``).

Three sources, each counted at one place:

* the runtime, through its one observer seam (:mod:`host.runtime.observe`): :class:`Metrics`
  is the host's observer. Spawns, suspensions and resumes with their latencies, fuel and
  guest time per segment, and commit latency are told directly; tool calls by tool and
  outcome, denials, tokens and how agents ended are read from the audit events each commit
  seals, so a metric counts exactly what the audit log records;
* the HTTP edge: :class:`HttpMetrics`, an ASGI middleware outside the gateway, counts every
  request by method, route template and status (refusals of the gateway included);
* the store and the server's own counters, read when a scrape asks (a collector): agents by
  status from the store's listing summaries (10,000 small summaries for 10,000 agents, read
  once per :data:`LISTING_TTL_S` however many scrapes come), the LMDB file's
  size and the bytes its live pages hold, the gateway's refusals by code (``rate_limited``
  among them: :class:`~host.server.gateway.RefusalAudit` counts every refusal it audits),
  agents being driven and instances waiting warm.

What the runtime and the edge count is kept as plain numbers (:class:`_Counter`,
:class:`_Histogram`: a dict update, not a locked ``prometheus_client`` child, on the hot
path) and handed to ``prometheus_client`` as metric families when a scrape asks, through
one collector in the application's own :class:`~prometheus_client.CollectorRegistry`, never
the process-wide one, so several servers in one process (the tests) do not share or clash.
``bench/observe_overhead.py`` measures what it costs a tool call and a request.

Labels are bounded, never an agent's input, arguments or output, nor a secret: a tool is
named only if the agent's policy grants it (any other name a guest makes up is
``<ungranted>``), tenants are the operators' own, and every label keeps at most
:data:`MAX_LABEL_VALUES` values (then ``<other>``), so no client or guest can grow the
registry without bound.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import anyio.to_thread
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from host.runtime import Host
from host.runtime.agent import PARKED, TERMINAL, LiveAgent
from host.runtime.observe import Events, Observer
from host.runtime.registry import DEFAULT_TENANT
from host.runtime.timers import SLEEPING
from host.server.gateway import ASGIApp, Message, Receive, RefusalAudit, Scope, Send, require
from host.server.scheduler import Scheduler
from snapshots.lmdb_store import LmdbStore

#: Seconds, from a tenth of a millisecond (a warm suspend) to ten seconds (a stuck disk).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
#: How long agents-by-status and the store's sizes read at one scrape serve the next ones.
LISTING_TTL_S = 2.0
#: The most values one label takes; later ones are counted under ``<other>``.
MAX_LABEL_VALUES = 256
OTHER = "<other>"
#: Every status an agent record can hold (another, from a damaged summary, is ``<other>``).
STATUSES = tuple(sorted({"running", "suspended", "approved", SLEEPING, *PARKED, *TERMINAL}))
#: How an agent's end is audited -> its final status.
_ENDS = {"agent.completed": "completed", "agent.failed": "failed", "agent.terminated": "terminated"}
#: The policy's decision events -> the outcome of the call (its answer is not counted again).
_DECIDED = {"tool.denied": "denied", "tool.approval_requested": "approval", "tool.terminated": "terminated"}
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Bounded:
    """The values of one label seen so far, at most ``limit``; any later one is :data:`OTHER`."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return OTHER
        self.seen.add(value)
        return value


class _Counter:
    """One counter family as plain numbers by label values.

    Why not ``prometheus_client.Counter``: its ``labels(...).inc()`` takes a lock and costs
    about 1.5 µs, and a tool call moves four or five series; a dict update costs a tenth
    of that. The numbers are changed on the server's event loop only and read by a scrape
    through a copy of the dict (one C call under the GIL), so a scrape never sees one torn.
    """

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], n: float = 1.0) -> None:
        values = self.values
        values[key] = values.get(key, 0.0) + n

    def family(self) -> Metric:
        f = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, n in sorted(dict(self.values).items()):
            f.add_metric(list(key), n)
        return f


class _Histogram:
    """One latency histogram as plain numbers: a count per bucket, and the sum (see :class:`_Counter`)."""

    __slots__ = ("counts", "doc", "name", "sum")

    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc = name, doc
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # a bucket counts what is <= its bound
        self.sum += seconds

    def family(self) -> Metric:
        counts, total = list(self.counts), self.sum
        buckets, seen = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
            seen += n
            buckets.append(("+Inf" if math.isinf(bound) else repr(bound), seen))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=total)


class Metrics(Observer):
    """The metrics of one server, and the observer of its host (see the module docstring)."""

    def __init__(self, host: Host, scheduler: Scheduler, refusals: RefusalAudit) -> None:
        self.host = host
        self.scheduler = scheduler
        self.refusals = refusals
        self._tenant = _Bounded()
        self._tool = _Bounded()
        self._reason = _Bounded()
        self._route = _Bounded()
        tenant = ("tenant",)
        self.spawns = _Counter("torpor_spawns", "Agents spawned, by tenant", tenant)
        self.spawn_seconds = _Histogram("torpor_spawn_seconds", "From a spawn's request to its durable record")
        self.suspensions = _Counter("torpor_suspensions", "Guests stopped at a tool call and checkpointed, by tenant",
                                    tenant)
        self.suspend_seconds = _Histogram("torpor_suspend_seconds",
                                          "From a guest's stop at a tool call to its durable checkpoint")
        self.resumes = _Counter("torpor_resumes", "Agents restored from their latest checkpoint, by tenant", tenant)
        self.resume_seconds = _Histogram("torpor_resume_seconds",
                                         "Claiming an agent and restoring it from its latest checkpoint")
        self.tool_calls = _Counter("torpor_tool_calls",
                                   "Tool calls by tool and outcome: ok, error, denied, terminated, or approval "
                                   "(parked for a person; its answer after the decision is counted again)",
                                   ("tool", "outcome"))
        self.denials = _Counter("torpor_denials", "Tool calls the policy denied, by tool and reason code",
                                ("tool", "reason"))
        self.tokens = _Counter("torpor_tokens", "Tokens tools reported spent (LLM calls), by tenant", tenant)
        self.fuel = _Counter("torpor_fuel", "Fuel burnt by guest code, by tenant", tenant)
        self.guest_seconds = _Counter("torpor_guest_seconds", "Time guest code ran, by tenant", tenant)
        self.finished = _Counter("torpor_agents_finished", "Agents the runtime ran to their end, by final status", ("status",))
        self.commit_seconds = _Histogram("torpor_commit_seconds",
                                         "An agent step's commit (checkpoint, journal, audit, record), until durable")
        self.http = _Counter("torpor_http_requests", "HTTP requests by method, route template and status",
                             ("method", "route", "status"))
        self._http_keys: dict[tuple[str, str, int], tuple[str, str, str]] = {}
        self.registry = CollectorRegistry(auto_describe=True)  # this application's own, never the global one
        self.registry.register(_ScrapeTime(self))
        self._listing_lock = threading.Lock()
        self._listing: tuple[float, dict[str, float]] | None = None

    # -- the runtime's observer ------------------------------------------------------------
    def _tenant_of(self, agent: LiveAgent) -> tuple[str]:
        tenant = agent.record.get("tenant")
        return (self._tenant(tenant if isinstance(tenant, str) else DEFAULT_TENANT),)

    def spawned(self, agent: LiveAgent, seconds: float) -> None:
        self.spawns.inc(self._tenant_of(agent))
        self.spawn_seconds.observe(seconds)

    def ran(self, agent: LiveAgent, fuel: int, seconds: float) -> None:
        tenant = self._tenant_of(agent)
        if fuel > 0:
            self.fuel.inc(tenant, fuel)
        self.guest_seconds.inc(tenant, seconds)

    def suspended(self, agent: LiveAgent, seconds: float) -> None:
        self.suspensions.inc(self._tenant_of(agent))
        self.suspend_seconds.observe(seconds)

    def resumed(self, agent: LiveAgent, seconds: float) -> None:
        self.resumes.inc(self._tenant_of(agent))
        self.resume_seconds.observe(seconds)

    def committed(self, agent: LiveAgent, events: Events, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        decided: set[Any] = set()  # calls whose outcome a decision event gave (their answer is not counted again)
        for kind, data in events:
            if kind == "tool.answered":
                if data.get("call_seq") not in decided:
                    self._call(agent, data, "ok" if data.get("status") == 0 else "error")
            elif kind in _DECIDED:
                decided.add(data.get("call_seq"))
                tool = self._call(agent, data, _DECIDED[kind])
                if kind == "tool.denied":
                    reason = (data.get("decision") or {}).get("code")
                    self.denials.inc((tool, self._reason(str(reason))))
            elif kind == "tokens.used":
                self.tokens.inc(self._tenant_of(agent), max(0, int(data.get("tokens") or 0)))
            elif kind in _ENDS:
                self.finished.inc((_ENDS[kind],))

    def _call(self, agent: LiveAgent, data: dict[str, Any], outcome: str) -> str:
        name = data.get("tool")
        tool = self._tool(name) if isinstance(name, str) and name in agent.tools else "<ungranted>"
        self.tool_calls.inc((tool, outcome))
        return tool

    # -- the HTTP edge -----------------------------------------------------------------------
    def request(self, method: str, route: str, status: int) -> None:
        """Count one HTTP request (called by :class:`HttpMetrics` once it was answered)."""
        key = (method if method in _METHODS else OTHER, route, status)  # bounded: never a client's own text
        labels = self._http_keys.get(key)
        if labels is None:
            labels = self._http_keys[key] = (key[0], self._route(route), str(status))
        self.http.inc(labels)

    # -- what a scrape reads --------------------------------------------------------------------
    def families(self) -> list[_Counter | _Histogram]:
        return [self.spawns, self.spawn_seconds, self.suspensions, self.suspend_seconds, self.resumes,
                self.resume_seconds, self.tool_calls, self.denials, self.tokens, self.fuel, self.guest_seconds,
                self.finished, self.commit_seconds, self.http]

    def listing(self) -> dict[str, float]:
        """Agents by status and the store's sizes, read at most every :data:`LISTING_TTL_S`."""
        with self._listing_lock:
            now = time.monotonic()
            if self._listing is not None and now - self._listing[0] < LISTING_TTL_S:
                return self._listing[1]
            counts: dict[str, float] = dict.fromkeys(STATUSES, 0)
            with self.host.store.read() as txn:
                for summary in txn.iter_agent_summaries():
                    status = summary.status if summary.status in counts else OTHER
                    counts[status] = counts.get(status, 0) + 1
            store = self.host.store
            if isinstance(store, LmdbStore):
                counts["<file_bytes>"] = (store.path / "data.mdb").stat().st_size
                counts["<used_bytes>"] = store.used_bytes()
            self._listing = (time.monotonic(), counts)
            return counts

    def render(self) -> bytes:
        """The text a scrape gets."""
        return generate_latest(self.registry)

    def routes(self) -> list[BaseRoute]:
        async def metrics(request: Request) -> Response:
            """The server's and its agents' metrics, in the Prometheus text format."""
            require(request, "admin")
            body = await anyio.to_thread.run_sync(self.render)  # the listing reads the store: off the loop
            return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

        return [Route("/metrics", metrics, methods=["GET"], name="metrics")]


class _ScrapeTime(Collector):
    """Everything a scrape shows, read when it asks: the counted families, the store's listing
    and sizes, the server's own counters."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # read only at scrape time (the registry must not call collect() to describe it)

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for family in m.families():
            yield family.family()
        listing = m.listing()
        agents = GaugeMetricFamily("torpor_agents", "Agents in the store by status", labels=["status"])
        for status, n in sorted(listing.items()):
            if not status.startswith("<") or status == OTHER:
                agents.add_metric([status], n)
        yield agents
        if "<file_bytes>" in listing:
            yield GaugeMetricFamily("torpor_store_file_bytes", "Size of the store's LMDB data file",
                                    value=listing["<file_bytes>"])
            yield GaugeMetricFamily("torpor_store_used_bytes", "Bytes held by the store's live B-tree pages",
                                    value=listing["<used_bytes>"])
        refusals = CounterMetricFamily("torpor_gateway_refusals",
                                       "Requests the gateway refused, by error code (rate_limited: over a rate limit)",
                                       labels=["code"])
        for code, n in sorted(dict(m.refusals.counts).items()):
            refusals.add_metric([code], n)
        yield refusals
        yield GaugeMetricFamily("torpor_agents_driving", "Agents this server is driving now",
                                value=len(m.scheduler.active))
        yield GaugeMetricFamily("torpor_warm_instances", "Guest instances kept in memory while their tool runs",
                                value=m.host.warm_waiting)


class HttpMetrics:
    """Counts every HTTP request by method, route template and status (:meth:`Metrics.request`).

    Outside the gateway, so its refusals count too. The route is the router's template
    (``/v1/agents/{agent_id}``), never the path a client sent: ``<refused>`` for a request
    the gateway answered before any route, ``<unmatched>`` for one no route matched.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what a request that raised is answered with

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            if route is not None:
                template = str(getattr(route, "path", "<unmatched>"))
            elif "principal" in (scope.get("state") or {}):
                template = "<unmatched>"
            else:
                template = "<refused>"
            self.metrics.request(str(scope.get("method", "")), template, status)
