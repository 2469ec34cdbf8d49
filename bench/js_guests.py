"""``torpor bench js``: JavaScript agents (QuickJS-ng) beside the C agent, in the same run.

For ``steps`` (C) and ``steps-js`` (the same agent in JavaScript), loaded the way the host
loads them: spawn from the pristine image to the first await (a fresh instance, the seed,
the agent's module evaluated, its first ``tool_call``); then one agent hibernating at
every await: suspend (unwind, capture, delta against the image, encode, the LMDB commit at
``process``), resume (read, decode, a fresh instance, restore, rewind), the bytes each
checkpoint takes, and round trips per second over the whole loop. The C agent is the
baseline the issue's targets are read against (also ``python bench/js_guests.py ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/js_guests.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import contextlib
import shutil
import tempfile
import time
from typing import Any

from bench.rig import (
    Latency,
    Progress,
    load_bundle,
    machine,
    make_engine,
    make_rig,
    positive,
    spawn_latency,
    table,
)
from bench.suspend import _suspend_agent
from snapshots.group_commit import GroupCommitter
from snapshots.lmdb_store import LmdbStore

#: The issue's targets for a JS agent (p50, on the 2-core machine).
JS_TARGETS = {"spawn_p50_us": 600.0, "suspend_no_commit_p50_us": 400.0, "resume_p50_us": 400.0,
              "record_bytes_p50": 5 * 1024.0, "round_trips_per_s": 2000.0}


def measure_agents(args: argparse.Namespace, names: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each agent of ``names`` measured in turn with one engine and one store: spawn to the
    first await, then one agent hibernating at every await. Also what ``torpor bench
    python`` runs, with the Python agent beside these two. Returns the run's settings
    (engine, cycles, spawns) and the figures by agent."""
    cycles = positive("--n", args.n if args.n is not None else (100 if args.quick else 2000))
    spawns = positive("--spawns", args.spawns if args.spawns is not None else (100 if args.quick else 2000))
    engine = make_engine(args.engine)
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-guests-"))
    agents: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            store = stack.enter_context(LmdbStore.open(tmp / "db", durability="process"))
            committer = GroupCommitter(store)
            stack.callback(committer.close)
            for name in names:
                rig = make_rig(engine, load_bundle(name))
                spawn_release = Latency()
                spawn = spawn_latency(rig, spawns, Progress(f"{name} spawn", spawns, args.progress), spawn_release)
                t0 = time.perf_counter()
                r = _suspend_agent(rig, store, committer, cycles, False,
                                   Progress(f"{name} hibernate", cycles, args.progress))
                elapsed = time.perf_counter() - t0
                r.pop("_samples")
                # Round trips: a suspend and a resume before the commit, at their p50s (the
                # commit is group-committed with other agents in a host); and the loop as
                # measured here, one agent alone, each commit awaited.
                per_trip = r["suspend_no_commit"]["p50_us"] + r["resume"]["p50_us"]
                # The release after a suspend (the instance put back for the next agent when it
                # is recycled) is off the agent's path but not free: also counted in a round trip.
                per_trip_released = per_trip + r["release"]["p50_us"]
                agents[name] = {"spawn": spawn.summary(), "spawn_release": spawn_release.summary(), **r,
                                "round_trips_per_s": round(1e6 / per_trip) if per_trip else None,
                                "round_trips_per_s_with_release": round(1e6 / per_trip_released)
                                if per_trip_released else None,
                                "recycled": rig.loaded.shelves is not None,
                                "round_trips_per_s_one_agent_committing": round(cycles / elapsed),
                                "module_bytes": len(rig.bundle.module), "image_bytes": len(rig.loaded.image)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"engine": engine.config.profile, "cycles": cycles, "spawns": spawns}, agents


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings, agents = measure_agents(args, ("steps", "steps-js"))
    cycles, spawns = settings["cycles"], settings["spawns"]
    js, c = agents["steps-js"], agents["steps"]
    res: dict[str, Any] = {
        "bench": "js", "engine": settings["engine"], "machine": machine(), "cycles": cycles, "spawns": spawns,
        "durability": "process", "agents": agents,
        "js_spawn_p50_us": js["spawn"]["p50_us"], "js_spawn_p99_us": js["spawn"]["p99_us"],
        "js_suspend_no_commit_p50_us": js["suspend_no_commit"]["p50_us"],
        "js_suspend_p50_us": js["suspend"]["p50_us"], "js_resume_p50_us": js["resume"]["p50_us"],
        "js_resume_p99_us": js["resume"]["p99_us"], "js_record_bytes_p50": js["record_bytes_p50"],
        "js_round_trips_per_s": js["round_trips_per_s"],
        "c_spawn_p50_us": c["spawn"]["p50_us"], "c_suspend_no_commit_p50_us": c["suspend_no_commit"]["p50_us"],
        "c_resume_p50_us": c["resume"]["p50_us"], "c_record_bytes_p50": c["record_bytes_p50"],
        "c_round_trips_per_s": c["round_trips_per_s"],
        "js_targets": JS_TARGETS,
        "plot": None, "plot_note": "no plot for this benchmark",
    }
    return res


def show_agents(r: dict[str, Any]) -> None:
    """The per-agent table and lines (shared with ``torpor bench python``)."""
    rows: dict[str, dict[str, float]] = {}
    for name, a in r["agents"].items():
        mem = a["memory_bytes"] // 1024
        rows[f"{name} ({mem} KiB) spawn to first await"] = a["spawn"]
        rows[f"{name} ({mem} KiB) suspend, no commit"] = a["suspend_no_commit"]
        rows[f"{name} ({mem} KiB) suspend @process"] = a["suspend"]
        rows[f"{name} ({mem} KiB) resume"] = a["resume"]
    print(table(rows))
    for name, a in r["agents"].items():
        print(f"{name}: record p50 {a['record_bytes_p50']} B (max {a['record_bytes_max']}); "
              f"{a['round_trips_per_s']} round trips/s hibernating at every await before the commit "
              f"({a['round_trips_per_s_one_agent_committing']}/s one agent alone awaiting each commit); module {a['module_bytes']} B, "
              f"image {a['image_bytes'] // 1024} KiB")


def show(r: dict[str, Any]) -> None:
    show_agents(r)
    t = r["js_targets"]
    print(f"\nJS targets (p50): spawn {r['js_spawn_p50_us']} µs (≤ {t['spawn_p50_us']:g}), suspend "
          f"{r['js_suspend_no_commit_p50_us']} µs before the commit (≤ {t['suspend_no_commit_p50_us']:g}), resume "
          f"{r['js_resume_p50_us']} µs (≤ {t['resume_p50_us']:g}), {r['js_record_bytes_p50']} B per hibernated agent "
          f"(≤ {t['record_bytes_p50']:g}), {r['js_round_trips_per_s']} round trips/s (≥ {t['round_trips_per_s']:g})"
          f"  [engine {r['engine']}]")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["js", *sys.argv[1:]]))
