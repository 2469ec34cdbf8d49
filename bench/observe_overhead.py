"""What ``/metrics`` costs the hot paths: ``python bench/observe_overhead.py [--quick] [--json]``.

Four figures against its baseline in the same run:

* the runtime: tool round trips of the ``steps`` agent through :class:`~host.runtime.Host`
  (policy, checkpoint, journal, ``kv.incr`` per call) with nobody watching (the
  :data:`~host.runtime.observe.NOBODY` seam) and with the server's
  :class:`~host.server.metrics.Metrics` as its observer, alternated round by round (on a
  shared machine a difference of microseconds drowns in this figure's noise, hence the next);
* the observer alone: every call a real run of those agents made on its observer (recorded),
  made again on the server's ``Metrics`` and on ``NOBODY``, per tool call;
* the HTTP edge: one request through :class:`~host.server.metrics.HttpMetrics` around a
  minimal ASGI application, against that application alone (no network: the middleware's
  own cost, which a loopback request would hide in its noise);
* the traces (``host/runtime/tracing.py``): off (no ``OTEL_EXPORTER_OTLP_ENDPOINT``), the
  host's observer is the server's ``Metrics`` itself, not a fan-out: checked, and the cost
  is the ``Metrics`` figure; on, the same replayed calls made on the tracer alone and on
  ``Metrics`` and the tracer together (spans into the SDK's batch processor, exported to an
  exporter that drops them: the SDK's cost on the event loop, not the network's);
* the seam itself: one call of an empty observer method;
* a scrape of a store of 10,000 agents (``bench.cli_startup.build_store``): the first, which
  reads the listing, and one within the listing's cache time.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/observe_overhead.py`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
import timeit
from typing import Any

from bench.rig import load_bundle, machine
from host.errors import TorporError


def _runtime(rounds: int, agents: int, n: int, http_requests: int) -> dict[str, Any]:
    import anyio

    from host.runtime import Host
    from host.runtime.observe import NOBODY
    from host.server.app import create_app

    b = load_bundle("steps")
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-observe-"))
    rates: dict[str, list[float]] = {"nobody": [], "metrics": []}
    try:
        with Host(tmp, warm_idle_s=60.0, durability="process") as host:  # no fsync noise: the CPU cost
            app = create_app(host)  # its Metrics becomes the host's observer
            metrics = app.state.metrics
            if host.tracing is not None or host.observer is not app.state.metrics:  # off: no fan-out
                raise TorporError("run this benchmark without OTEL_EXPORTER_OTLP_ENDPOINT: it measures tracing off")
            anyio.run(lambda: host.run(b, {"n": 1}))  # load and compile outside the timing

            async def batch() -> int:
                results = []

                async def one() -> None:
                    results.append(await host.run(b, {"n": n}))

                async with anyio.create_task_group() as tg:
                    for _ in range(agents):
                        tg.start_soon(one)
                if any(r.status != "completed" for r in results):
                    raise TorporError("a steps agent did not complete")
                return sum(r.tool_calls for r in results)

            for _ in range(rounds):
                for name, observer in (("nobody", NOBODY), ("metrics", metrics)):
                    host.observe(observer)
                    t0 = time.perf_counter()
                    calls = anyio.run(batch)
                    rates[name].append(calls / (time.perf_counter() - t0))
            scraped = metrics.render().decode()
            http = _http(metrics, http_requests)  # the same server's Metrics, counting for real
            replay = _replay(host, b, metrics, agents, n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "torpor_tool_calls_total" not in scraped:
        raise TorporError("the observer counted nothing")
    nobody, watched = statistics.median(rates["nobody"]), statistics.median(rates["metrics"])
    return {"agents": agents, "calls_per_agent": n, "rounds": rounds,
            "nobody_round_trips_per_s": round(nobody), "metrics_round_trips_per_s": round(watched),
            "metrics_cost_us_per_call": round(1e6 / watched - 1e6 / nobody, 2),
            "all_round_trips_per_s": {k: [round(v) for v in vs] for k, vs in rates.items()}, "http": http,
            **replay}


def _replay(host: Any, b: Any, metrics: Any, agents: int, n: int) -> dict[str, Any]:
    """The observer's own cost per tool call, free of the runtime's noise: the calls a real run
    makes on its observer (recorded), made again on the server's Metrics and on NOBODY."""
    import anyio

    from host.runtime.observe import NOBODY, Observer, fan_out

    calls: list[tuple[str, tuple[Any, ...]]] = []

    class Recorder(Observer):
        def spawned(self, *a: Any) -> None:
            calls.append(("spawned", a))

        def ran(self, *a: Any) -> None:
            calls.append(("ran", a))

        def suspended(self, *a: Any) -> None:
            calls.append(("suspended", a))

        def resumed(self, *a: Any) -> None:
            calls.append(("resumed", a))

        def committed(self, agent: Any, events: Any, seconds: float) -> None:
            calls.append(("committed", (agent, list(events), seconds)))

    host.observe(Recorder())

    async def batch() -> int:
        results = [await host.run(b, {"n": n}) for _ in range(agents)]
        return sum(r.tool_calls for r in results)

    tool_calls = anyio.run(batch)
    host.observe(metrics)

    def replay(observer: Observer) -> None:
        for name, args in calls:
            getattr(observer, name)(*args)

    tracing = _tracing()
    try:
        per = {name: min(timeit.repeat(lambda o=o: replay(o), number=5, repeat=5)) / 5  # type: ignore[misc]
               for name, o in (("nobody", NOBODY), ("metrics", metrics), ("tracing", tracing),
                               ("metrics_and_tracing", fan_out(metrics, tracing)))}
    finally:
        tracing.shutdown()
    return {"replayed_observer_calls": len(calls), "replayed_tool_calls": tool_calls,
            "observer_us_per_tool_call": {k: round(v / tool_calls * 1e6, 3) for k, v in per.items()}}


def _tracing() -> Any:
    """The runtime's tracer as OTEL_EXPORTER_OTLP_ENDPOINT builds it (a batch processor), into
    an exporter that drops what it is handed."""
    from collections.abc import Sequence

    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from host.runtime.tracing import Tracing

    class Drop(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    return Tracing.with_exporter(Drop(), batch=True)


def _http(metrics: Any, requests: int) -> dict[str, Any]:
    from starlette.routing import Route

    from host.server.metrics import HttpMetrics

    route = Route("/v1/agents/{agent_id}", lambda r: None, methods=["GET"], name="get_agent")
    start = {"type": "http.response.start", "status": 200, "headers": []}
    body = {"type": "http.response.body", "body": b"{}"}

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = route  # as the router sets it
        await send(start)
        await send(body)

    wrapped = HttpMetrics(inner, metrics)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    async def loop(app: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(requests):
            await app({"type": "http", "method": "GET", "path": "/v1/agents/x", "state": {}}, receive, send)
        return (time.perf_counter() - t0) / requests * 1e6

    async def main() -> tuple[list[float], list[float]]:
        bare, counted = [], []
        for _ in range(5):
            bare.append(await loop(inner))
            counted.append(await loop(wrapped))
        return bare, counted

    bare, counted = asyncio.run(main())
    return {"requests": requests, "bare_us": round(min(bare), 3), "with_http_metrics_us": round(min(counted), 3),
            "http_metrics_cost_us": round(min(counted) - min(bare), 3)}


def _scrape(agents: int) -> dict[str, Any]:
    """A scrape of a server whose store holds ``agents`` agents: the first reads the listing,
    those within the next :data:`~host.server.metrics.LISTING_TTL_S` reuse it."""
    from bench.cli_startup import build_store
    from bench.rig import Progress
    from host.runtime import Host
    from host.server.app import create_app

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-scrape-"))
    try:
        built = build_store(tmp, agents, Progress("store", agents, False))
        with Host(tmp) as host:
            metrics = create_app(host).state.metrics
            t0 = time.perf_counter()
            text = metrics.render().decode()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics.render()
            cached = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if f'torpor_agents{{status="completed"}} {float(agents)}' not in text:
        raise TorporError("the scrape did not count the store's agents")
    return {"agents": built["agents"], "first_scrape_ms": round(first * 1000, 2),
            "cached_scrape_ms": round(cached * 1000, 2), "bytes": len(text)}


def _seam() -> dict[str, Any]:
    from host.runtime.observe import NOBODY

    n = 1_000_000
    per = min(timeit.repeat(lambda: NOBODY.committed(None, (), 0.0), number=n, repeat=5)) / n  # type: ignore[arg-type]
    empty = min(timeit.repeat(lambda: None, number=n, repeat=5)) / n
    return {"nobody_call_ns": round(per * 1e9, 1), "empty_lambda_ns": round(empty * 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    runtime = _runtime(2 if args.quick else 6, 4 if args.quick else 16, 20 if args.quick else 200,
                       2_000 if args.quick else 100_000)
    res = {"bench": "observe_overhead", "machine": machine(), "runtime": runtime, "http": runtime.pop("http"),
           "seam": _seam(), "scrape": _scrape(1_000 if args.quick else 10_000)}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        rt, http, seam = res["runtime"], res["http"], res["seam"]
        print(f"runtime round trips/s (median of {rt['rounds']}): nobody {rt['nobody_round_trips_per_s']:,}, "
              f"metrics {rt['metrics_round_trips_per_s']:,} ({rt['metrics_cost_us_per_call']} µs a call)")
        o = rt["observer_us_per_tool_call"]
        print(f"observer calls of a real run, replayed: {o['metrics']} µs a tool call on Metrics, {o['nobody']} µs "
              f"on NOBODY; tracing on: {o['tracing']} µs on the tracer, {o['metrics_and_tracing']} µs on both")
        print(f"HTTP request, in-process ASGI: bare {http['bare_us']} µs, with HttpMetrics "
              f"{http['with_http_metrics_us']} µs ({http['http_metrics_cost_us']} µs a request)")
        sc = res["scrape"]
        print(f"/metrics on a store of {sc['agents']:,} agents: {sc['first_scrape_ms']} ms, then "
              f"{sc['cached_scrape_ms']} ms while the listing is cached")
        print(f"NOBODY seam call: {seam['nobody_call_ns']} ns (an empty lambda: {seam['empty_lambda_ns']} ns)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
