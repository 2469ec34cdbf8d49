"""``torpor bench steps``: tool round trips per second with warm instances, through the runtime
(one agent, many agents, and the time of a call phase by phase), DBOS Transact doing the same
durable steps in the same run (:mod:`bench.dbos_steps`), the bare execution core and a
synchronous-import baseline (also ``python bench/steps.py ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/steps.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from bench import dbos_steps
from bench.rig import (
    TARGETS,
    Latency,
    Progress,
    Rig,
    answer,
    cdf,
    draw_plot,
    in_processes,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    no_gc,
    positive,
)
from host.errors import ConfigError, TorporError
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


#: The phases of a call through the runtime, in the order they happen (``--json``: ``phases_us``).
PHASES = ("guest", "policy", "encode", "audit", "commit")


@contextlib.contextmanager
def _phase_clock() -> Iterator[dict[str, int]]:
    """Time each phase of every tool call, in ns summed over the calls (``PHASES``).

    ``guest``: capturing the guest's state and running it from one call to the next;
    ``policy``: the request and the policy's decision (with its usage); ``encode``: checkpoint
    *K* (the delta and its chunks); ``audit``: sealing the step's audit events onto the chain
    (inside the commit's transaction, on the event loop's thread for an LMDB store); ``commit``:
    the rest of the commit until it is acknowledged (the transaction, the tool's effect for
    ``kv.incr``, waiting for a sync the store needs first or for a ``"now"`` commit's ack).
    The wrappers cost a few µs a call, so this is a run of its own, not the timed one.
    """
    from host.runtime import commits as commits_mod
    from host.runtime.guest import GuestRunner
    from host.runtime.tool_call import ToolCallPipeline
    from host.trust import audit

    ns = dict.fromkeys(PHASES, 0)
    clock = time.perf_counter_ns
    saved: list[tuple[Any, str, Any]] = []
    # A phase's time is its own: a phase timed inside another (a call answered inline runs its
    # policy and commit inside the guest's segment) is taken out of the one around it.
    inside: list[str] = []

    def begin(phase: str) -> int:
        inside.append(phase)
        return clock()

    def end(phase: str, t: int) -> None:
        took = clock() - t
        inside.pop()
        ns[phase] += took
        if inside:
            ns[inside[-1]] -= took

    def wrap(owner: Any, name: str, phase: str) -> None:
        orig = owner.__dict__[name]
        fn = orig.__func__ if isinstance(orig, staticmethod) else orig
        if inspect.iscoroutinefunction(fn):
            async def timed_async(*a: Any, **k: Any) -> Any:
                t = begin(phase)
                try:
                    return await fn(*a, **k)
                finally:
                    end(phase, t)
            new: Any = timed_async
        else:
            def timed(*a: Any, **k: Any) -> Any:
                t = begin(phase)
                try:
                    return fn(*a, **k)
                finally:
                    end(phase, t)
            new = timed
        saved.append((owner, name, orig))
        setattr(owner, name, staticmethod(new) if isinstance(orig, staticmethod) else new)

    wrap(GuestRunner, "answer", "guest")
    wrap(ToolCallPipeline, "receive", "guest")
    wrap(ToolCallPipeline, "request", "policy")
    wrap(ToolCallPipeline, "decide", "policy")
    wrap(ToolCallPipeline, "decide_plain", "policy")  # a call answered inline decides here alone
    wrap(ToolCallPipeline, "snapshot", "encode")
    wrap(commits_mod.AgentCommits, "run", "commit")
    wrap(commits_mod.AgentCommits, "agent_now", "commit")  # the commit of a call answered inline
    saved.append((commits_mod, "audit", audit))

    class _TimedAudit:  # commits.py reaches the chain through `audit.append_events`
        def __getattr__(self, name: str) -> Any:
            return getattr(audit, name)

        @staticmethod
        def append_events(*a: Any, **k: Any) -> Any:
            t = begin("audit")
            try:
                return audit.append_events(*a, **k)
            finally:
                end("audit", t)

    setattr(commits_mod, "audit", _TimedAudit())  # noqa: B010 (a module attribute, patched)
    try:
        yield ns
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def _runtime_round_trips(b: Bundle, agents: int, n: int, profile_path: str | None,
                         progress: Progress, phases: bool = False) -> dict[str, Any]:
    """Tool round trips through the real host runtime: policy, journal, checkpoint, kv.incr
    (a checkpoint every ``$TORPOR_CHECKPOINT_EVERY`` calls, default each: see ``Host``).

    With ``phases``, the calls are also timed phase by phase (:func:`_phase_clock`)."""
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
            every = host.calls.checkpoint_every
            inline0 = host.calls.answered_inline
            with contextlib.ExitStack() as stack:
                ns = stack.enter_context(_phase_clock()) if phases else None
                t0, c0 = time.perf_counter(), time.process_time()
                anyio.run(main)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            if prof is not None and profile_path:
                prof.disable()
                prof.dump_stats(profile_path)
            progress.done()
            bad = [r for r in results if r.status != "completed"]
            if bad:
                raise TorporError(f"{len(bad)} runtime agents did not complete: {bad[0].error}")
            calls = sum(r.tool_calls for r in results)
            inline = host.calls.answered_inline - inline0
            used = store.used_bytes() - used0
        finally:
            host.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"round_trips_per_s": round(calls / dt), "agents": agents, "calls": calls,
           "wall_s": round(dt, 2), "bytes_per_tool_call": round(used / calls, 1),
           # the process's CPU (every thread) a call: what a loaded machine's wall clock hides
           "cpu_us_per_call": round(cpu * 1e6 / calls, 1), "checkpoint_every": every,
           # calls answered inside the guest's import, no unwind (ToolCallPipeline.answer_inline)
           "inline_share": round(inline / calls, 3)}
    if ns is not None:
        per = {k: round(v / calls / 1e3, 1) for k, v in ns.items()}
        per["other"] = round(dt * 1e6 / calls - sum(per.values()), 1)
        per["total"] = round(dt * 1e6 / calls, 1)
        out["phases_us"] = per
    return out


def _agents_worker(raw: bytes, store_dir: str, agents: int, n: int, barrier: Any, results: Any) -> None:
    """One host process of :func:`_runtime_across_processes` (module level: it is pickled).

    Its agents start when every process's do (the barrier), so the processes' timed
    runs overlap; it reports its calls, its start and end on the machine's monotonic
    clock (one clock for every process on Linux) and its CPU."""
    try:
        import anyio

        from host.runtime.host import Host
        from host.sandbox import bundle as bundle_mod

        b = bundle_mod.load_bytes(raw, source="steps")
        host = Host(store_dir, warm_idle_s=60.0)
        try:
            anyio.run(lambda: host.run(b, {"n": 1}))  # its instances warm, outside the timing
            done: list[Any] = []

            async def main() -> None:
                async def one() -> None:
                    done.append(await host.run(b, {"n": n}))

                async with anyio.create_task_group() as tg:
                    for _ in range(agents):
                        tg.start_soon(one)

            barrier.wait()
            t0, c0 = time.monotonic(), time.process_time()
            anyio.run(main)
            t1, cpu = time.monotonic(), time.process_time() - c0
            store: Any = host.store
            syncs = {"syncs": store.flushes, "interleaved_syncs": store.interleaved_syncs}
        finally:
            host.close()
        bad = [r for r in done if r.status != "completed"]
        if bad:
            raise TorporError(f"{len(bad)} agents did not complete: {bad[0].error}")
        results.put(("ok", {"calls": sum(r.tool_calls for r in done), "t0": t0, "t1": t1, "cpu": cpu, **syncs}))
    except BaseException as exc:  # reported to the parent, which fails the benchmark
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def _runtime_across_processes(b: Bundle, processes: int, agents: int, n: int, progress: Progress) -> dict[str, Any]:
    """The many-agent run spread over ``processes`` host processes sharing one store: how a
    host uses more than one core (every stage of a call is Python under its process's GIL).

    Each process is a :class:`~host.runtime.host.Host` on the same store directory, running
    its share of the agents; LMDB serialises their commits (each process group-commits its
    own, and at ``sync`` a transaction after another process's unsynced commits syncs them
    first, ``snapshots.lmdb_store``). The rate is every call over the time from the first
    process's start to the last one's end: the machine's, not a sum of separate rates."""
    from host.runtime.host import Host

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-steps-procs-"))
    try:
        host = Host(tmp, warm_idle_s=60.0)  # the store, its keys and the compiled module, made once
        try:
            import anyio

            anyio.run(lambda: host.run(b, {"n": 1}))
        finally:
            host.close()
        share = [agents // processes + (1 if i < agents % processes else 0) for i in range(processes)]
        outs = in_processes(_agents_worker, [(b.raw, str(tmp), k, n) for k in share], progress, "a host process")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    calls = sum(o["calls"] for o in outs)
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    return {"processes": processes, "agents": agents, "calls": calls, "round_trips_per_s": round(calls / wall),
            "wall_s": round(wall, 2), "cpu_us_per_call": round(sum(o["cpu"] for o in outs) * 1e6 / calls, 1),
            "per_process_round_trips_per_s": [round(o["calls"] / (o["t1"] - o["t0"])) for o in outs],
            # syncs of each process, and those a transaction made after another process's commits
            "syncs": [o["syncs"] for o in outs], "interleaved_syncs": [o["interleaved_syncs"] for o in outs]}


#: Issue 19's targets (2-core machine): one agent at ``sync``, and many agents at each level.
STEP_TARGETS = {"one_agent_sync_per_s": 2_000, "one_agent_vs_dbos": 3.0, "agents_sync_per_s": 10_000,
                "agents_process_per_s": 20_000}


def _targets(res: dict[str, Any]) -> dict[str, Any]:
    """Each of issue 19's targets this run can judge (its durability level's), met or not:
    the many agents by the better of one process and several (``--processes``)."""
    level = res["durability"]
    spread = res.get("processes") or {}
    agents = max(res["round_trips_per_s"], spread.get("round_trips_per_s", 0))
    out: dict[str, Any] = {}
    if level == "sync":
        out["one_agent_sync_per_s"] = {"target": STEP_TARGETS["one_agent_sync_per_s"],
                                       "measured": res["one_agent_round_trips_per_s"]}
    if res.get("one_agent_vs_dbos") is not None:
        out["one_agent_vs_dbos"] = {"target": STEP_TARGETS["one_agent_vs_dbos"], "measured": res["one_agent_vs_dbos"]}
    key = f"agents_{level}_per_s"
    out[key] = {"target": STEP_TARGETS[key], "measured": agents}
    for t in out.values():
        t["met"] = t["measured"] >= t["target"]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Tool round trips per second: the runtime (one agent, many agents, and where a call's time
    goes), DBOS doing the same work in the same run, the execution core, a sync baseline."""
    n = positive("--n", args.n if args.n is not None else (20 if args.quick else 200))
    agents = positive("--agents", args.agents if args.agents is not None else (4 if args.quick else 64))
    one_n = positive("--one-n", args.one_n if args.one_n is not None else (50 if args.quick else 2000))
    dbos_n = positive("--dbos-n", args.dbos_n if args.dbos_n is not None else (20 if args.quick else 500))
    processes = positive("--processes", args.processes if args.processes is not None
                         else min(os.cpu_count() or 1, agents, 2 if args.quick else 64))
    if processes > agents:  # refused before anything runs: a process with no agent measures nothing
        raise ConfigError(f"--processes {processes} is more than --agents {agents}: each process needs agents to run")
    dbos_each = min(n, 5 if args.quick else 20)
    engine_n = 2000 if args.quick else 50_000
    engine = make_engine(args.engine)
    b = load_bundle("steps")
    rig = make_rig(engine, b)
    sync_rig = make_rig(engine, b, sync_tools=True)
    _engine_round_trips(rig, 100)  # warm up
    core_rate, core_lat = _engine_round_trips(rig, engine_n)
    base_rate, _ = _engine_round_trips(sync_rig, engine_n)
    one = _runtime_round_trips(b, 1, one_n, None, Progress("one agent", 1, args.progress))
    phased = _runtime_round_trips(b, 1, min(one_n, 1000), None, Progress("phases", 1, args.progress), phases=True)
    rt = _runtime_round_trips(b, agents, n, args.profile, Progress("runtime", agents, args.progress))
    spread = (_runtime_across_processes(b, processes, agents, n, Progress("processes", processes, args.progress))
              if processes > 1 else None)
    dbos: dict[str, Any] | None = None
    if not args.no_dbos:
        if not dbos_steps.available():
            raise TorporError("DBOS is not installed: pip install -e '.[bench]' (or pass --no-dbos)")
        dbos = dbos_steps.dbos_steps(dbos_n, agents, dbos_each)
    res: dict[str, Any] = {
        "bench": "steps", "engine": engine.config.profile, "machine": machine(), "durability": resolve_durability(None),
        "round_trips_per_s": rt["round_trips_per_s"], "runtime_agents": agents, "runtime_calls": rt["calls"],
        "runtime_wall_s": rt["wall_s"], "runtime_bytes_per_tool_call": rt["bytes_per_tool_call"],
        "runtime_cpu_us_per_call": rt["cpu_us_per_call"], "checkpoint_every": rt["checkpoint_every"],
        "processes": spread,
        "runtime_inline_share": rt["inline_share"], "one_agent_inline_share": one["inline_share"],
        "one_agent_round_trips_per_s": one["round_trips_per_s"], "one_agent_calls": one["calls"],
        "one_agent_cpu_us_per_call": one["cpu_us_per_call"],
        "phases_us": phased["phases_us"], "phases_round_trips_per_s": phased["round_trips_per_s"],
        "dbos": dbos,
        "one_agent_vs_dbos": round(one["round_trips_per_s"] / dbos["one_workflow_steps_per_s"], 2) if dbos else None,
        "agents_vs_dbos": round(rt["round_trips_per_s"] / dbos["concurrent_steps_per_s"], 2) if dbos else None,
        "processes_vs_dbos": (round(spread["round_trips_per_s"] / dbos["concurrent_steps_per_s"], 2)
                              if dbos and spread else None),
        "core_round_trips_per_s": round(core_rate), "core_round_trip": core_lat.summary(),
        "baseline_round_trips_per_s": round(base_rate), "baseline_round_trip_mean_us": round(1e6 / base_rate, 2),
        "cprofile": args.profile,
    }

    def draw(plt: Any) -> None:
        _fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        cdf(axes[0], {"warm round trip (unwind + rewind in place)": core_lat.samples},
             f"one tool round trip, execution core (sync-import baseline: mean {res['baseline_round_trip_mean_us']} µs)")
        names = ["runtime, 1 agent", f"runtime, {agents} agents", "execution core", "sync baseline"]
        vals = [res["one_agent_round_trips_per_s"], res["round_trips_per_s"], res["core_round_trips_per_s"],
                res["baseline_round_trips_per_s"]]
        colors = ["tab:blue", "tab:blue", "tab:green", "tab:gray"]
        if dbos:
            names += ["DBOS, 1 workflow", f"DBOS, {agents} workflows"]
            vals += [dbos["one_workflow_steps_per_s"], dbos["concurrent_steps_per_s"]]
            colors += ["tab:orange", "tab:orange"]
        axes[1].bar(names, vals, color=colors)
        axes[1].axhline(TARGETS["round_trips_per_s"], color="tab:red", linestyle="--", label="target")
        axes[1].set_yscale("log")
        axes[1].set_ylabel("tool round trips (durable steps) per second (log)")
        axes[1].tick_params(axis="x", labelrotation=20)
        axes[1].legend()

    res["step_targets"] = _targets(res)
    res.update(draw_plot(args.plot, draw))
    return res


def show(r: dict[str, Any]) -> None:
    d = r.get("dbos")
    every = r.get("checkpoint_every", 1)
    where = "per call" if every == 1 else f"every {every} calls ($TORPOR_CHECKPOINT_EVERY), the journal between"
    print(f"runtime at {r['durability']} (Host: policy, audit, durable journal + kv.incr per call, checkpoint {where}):")
    print(f"  one agent x {r['one_agent_calls']:,} calls: {r['one_agent_round_trips_per_s']:,}/s"
          + (f" = {r['one_agent_vs_dbos']}x DBOS's one workflow ({d['one_workflow_steps_per_s']:,} steps/s)" if d else "")
          + f"; CPU {r['one_agent_cpu_us_per_call']} µs a call; {r.get('one_agent_inline_share', 0):.0%} answered inline")
    print(f"  {r['runtime_agents']} agents x {r['runtime_calls'] // r['runtime_agents']} calls: "
          f"{r['round_trips_per_s']:,}/s"
          + (f" = {r['agents_vs_dbos']}x DBOS's {d['workflows']} workflows ({d['concurrent_steps_per_s']:,} steps/s)"
             if d else "") + f"; CPU {r['runtime_cpu_us_per_call']} µs a call; "
          f"{r.get('runtime_inline_share', 0):.0%} answered inline")
    sp = r.get("processes")
    if sp:
        print(f"  {sp['agents']} agents over {sp['processes']} host processes on the one store: "
              f"{sp['round_trips_per_s']:,}/s"
              + (f" = {r['processes_vs_dbos']}x DBOS's {d['workflows']} workflows" if d else "")
              + f"; CPU {sp['cpu_us_per_call']} µs a call (each process: "
              + ", ".join(f"{x:,}/s" for x in sp["per_process_round_trips_per_s"]) + ")")
    ph = r["phases_us"]
    print("  one call, µs (a timed run of its own, one agent): "
          + ", ".join(f"{k} {ph[k]}" for k in (*PHASES, "other", "total")))
    print(f"  on disk per tool call: {r['runtime_bytes_per_tool_call']} B (checkpoint, journal, audit, agent record)")
    if d:
        print(f"DBOS Transact {d['version']} on SQLite (defaults: rollback journal, synchronous=FULL): one workflow "
              f"{d['one_workflow_steps_per_s']:,} steps/s (mean {d['one_step_mean_us']} µs), {d['workflows']} "
              f"workflows x {d['steps_each']}: {d['concurrent_steps_per_s']:,} steps/s")
    c = r["core_round_trip"]
    print(f"execution core (warm, unwind + rewind in place): {r['core_round_trips_per_s']:,}/s, p50 {c['p50_us']} µs, "
          f"p99 {c['p99_us']} µs")
    print(f"baseline (synchronous import, no unwind):        {r['baseline_round_trips_per_s']:,}/s, mean "
          f"{r['baseline_round_trip_mean_us']} µs  [engine {r['engine']}]")
    names = {"one_agent_sync_per_s": "one agent at sync, calls/s", "one_agent_vs_dbos": "one agent vs DBOS's one workflow, x",
             "agents_sync_per_s": "many agents at sync, calls/s", "agents_process_per_s": "many agents at process, calls/s"}
    print("targets (issue 19): " + "; ".join(
        f"{names[k]} {t['measured']:,} of {t['target']:,}: {'met' if t['met'] else 'missed'}"
        for k, t in r.get("step_targets", {}).items()))
    if r.get("cprofile"):
        print(f"cProfile of the runtime phase: {r['cprofile']} (python -m pstats {r['cprofile']})")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["steps", *sys.argv[1:]]))
