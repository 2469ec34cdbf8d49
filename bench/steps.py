"""``torpor bench steps``: tool round trips per second with warm instances, through the runtime,
the bare execution core and a synchronous-import baseline (also ``python bench/steps.py ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/steps.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import shutil
import tempfile
import time
from typing import Any

from bench.rig import (
    TARGETS,
    Latency,
    Progress,
    Rig,
    answer,
    cdf,
    draw_plot,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    no_gc,
    positive,
)
from host.errors import TorporError
from host.sandbox.bundle import Bundle
from host.sandbox.execution import Completed, Suspended
from snapshots.lmdb_store import resolve_durability


def _engine_round_trips(rig: Rig, n: int) -> tuple[float, Latency]:
    """Round trips of one warm agent: the tool call unwinds and is rewound in place (or, in
    the synchronous baseline, simply returns, and only the total is timed)."""
    ex = rig.execution(json.dumps({"n": n}).encode())
    lat = Latency()
    with no_gc():
        t0 = time.perf_counter_ns()
        out = ex.start()
        k = 0
        while isinstance(out, Suspended):
            k += 1
            t1 = time.perf_counter_ns()
            out = ex.resume(0, answer(k))
            lat.add(time.perf_counter_ns() - t1)
        dt = time.perf_counter_ns() - t0
    if not isinstance(out, Completed) or out.output != {"sum": n * (n + 1) // 2, "last": n}:
        raise TorporError(f"steps answered {out}")
    return n / (dt / 1e9), lat


def _runtime_round_trips(b: Bundle, agents: int, n: int, profile_path: str | None,
                         progress: Progress) -> dict[str, Any]:
    """Tool round trips through the real host runtime: policy, journal, checkpoint, kv.incr."""
    import anyio

    from host.runtime.host import Host

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-steps-"))
    try:
        host = Host(tmp, warm_idle_s=60.0)
        try:
            results: list[Any] = []

            async def one() -> None:
                results.append(await host.run(b, {"n": n}))
                progress.update(len(results))

            async def main() -> None:
                async with anyio.create_task_group() as tg:
                    for _ in range(agents):
                        tg.start_soon(one)

            anyio.run(lambda: host.run(b, {"n": 1}))  # load and compile outside the timing
            store: Any = host.store  # an LmdbStore: the embedded default
            used0 = store.used_bytes()
            prof = None
            if profile_path:
                import cProfile

                prof = cProfile.Profile()
                prof.enable()
            t0 = time.perf_counter()
            anyio.run(main)
            dt = time.perf_counter() - t0
            if prof is not None and profile_path:
                prof.disable()
                prof.dump_stats(profile_path)
            progress.done()
            bad = [r for r in results if r.status != "completed"]
            if bad:
                raise TorporError(f"{len(bad)} runtime agents did not complete: {bad[0].error}")
            calls = sum(r.tool_calls for r in results)
            used = store.used_bytes() - used0
        finally:
            host.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"round_trips_per_s": round(calls / dt), "runtime_agents": agents, "runtime_calls": calls,
            "runtime_wall_s": round(dt, 2), "runtime_bytes_per_tool_call": round(used / calls, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Tool round trips per second with warm instances: runtime, execution core, sync baseline."""
    n = positive("--n", args.n if args.n is not None else (20 if args.quick else 200))
    agents = positive("--agents", args.agents if args.agents is not None else (4 if args.quick else 64))
    engine_n = 2000 if args.quick else 50_000
    engine = make_engine(args.engine)
    b = load_bundle("steps")
    rig = make_rig(engine, b)
    sync_rig = make_rig(engine, b, sync_tools=True)
    _engine_round_trips(rig, 100)  # warm up
    core_rate, core_lat = _engine_round_trips(rig, engine_n)
    base_rate, _ = _engine_round_trips(sync_rig, engine_n)
    rt = _runtime_round_trips(b, agents, n, args.profile, Progress("runtime", agents, args.progress))
    res: dict[str, Any] = {
        "bench": "steps", "engine": engine.config.profile, "machine": machine(), "durability": resolve_durability(None),
        **rt,
        "core_round_trips_per_s": round(core_rate), "core_round_trip": core_lat.summary(),
        "baseline_round_trips_per_s": round(base_rate), "baseline_round_trip_mean_us": round(1e6 / base_rate, 2),
        "cprofile": args.profile,
    }

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        cdf(axes[0], {"warm round trip (unwind + rewind in place)": core_lat.samples},
             f"one tool round trip, execution core (sync-import baseline: mean {res['baseline_round_trip_mean_us']} µs)")
        names = ["runtime (durable)", "execution core", "sync baseline"]
        vals = [res["round_trips_per_s"], res["core_round_trips_per_s"], res["baseline_round_trips_per_s"]]
        axes[1].bar(names, vals, color=["tab:blue", "tab:green", "tab:gray"])
        axes[1].axhline(TARGETS["round_trips_per_s"], color="tab:red", linestyle="--", label="target")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("tool round trips per second (log)")
        axes[1].legend()

    res.update(draw_plot(args.plot, draw))
    return res


def show(r: dict[str, Any]) -> None:
    print(f"runtime (Host, {r['runtime_agents']} agents x {r['runtime_calls'] // r['runtime_agents']} kv.incr, "
          f"durable journal + checkpoint per call): {r['round_trips_per_s']:,} round trips/s (target ≥ 10,000)")
    print(f"  on disk per tool call: {r['runtime_bytes_per_tool_call']} B (checkpoint, journal, audit, agent record)")
    c = r["core_round_trip"]
    print(f"execution core (warm, unwind + rewind in place): {r['core_round_trips_per_s']:,}/s, p50 {c['p50_us']} µs, "
          f"p99 {c['p99_us']} µs")
    print(f"baseline (synchronous import, no unwind):        {r['baseline_round_trips_per_s']:,}/s, mean "
          f"{r['baseline_round_trip_mean_us']} µs  [engine {r['engine']}]")
    if r.get("cprofile"):
        print(f"cProfile of the runtime phase: {r['cprofile']} (python -m pstats {r['cprofile']})")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["steps", *sys.argv[1:]]))
