"""``torpor bench python``: Python agents (CPython for WASI) beside the C and JS agents, in the same run.

``steps`` (C), ``steps-js`` and ``steps-py`` (the same agent in JavaScript and Python),
each measured as :mod:`bench.js_guests` measures them, one engine and one store: spawn
from the pristine image to the first await; one agent hibernating at every await (suspend
before and with the commit at ``process``, resume, the bytes of each checkpoint); round
trips per second. The C agent is the baseline the issue's targets are read against (also
``python bench/py_guests.py ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # `python bench/py_guests.py ...`: the repository root on the path, for `bench.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
from typing import Any

from bench.js_guests import measure_agents, show_agents
from bench.rig import machine

#: The issue's targets for a small Python agent (p50, on the 2-core machine).
PY_TARGETS = {"spawn_p50_us": 600.0, "suspend_no_commit_p50_us": 500.0, "resume_p50_us": 500.0,
              "record_bytes_p50": 8 * 1024.0, "round_trips_per_s": 1000.0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings, agents = measure_agents(args, ("steps", "steps-js", "steps-py"))
    res: dict[str, Any] = {"bench": "python", **settings, "machine": machine(), "durability": "process",
                           "agents": agents}
    for key, name in (("py", "steps-py"), ("js", "steps-js"), ("c", "steps")):
        a = agents[name]
        res.update({
            f"{key}_spawn_p50_us": a["spawn"]["p50_us"], f"{key}_spawn_p99_us": a["spawn"]["p99_us"],
            f"{key}_suspend_no_commit_p50_us": a["suspend_no_commit"]["p50_us"],
            f"{key}_suspend_p50_us": a["suspend"]["p50_us"], f"{key}_resume_p50_us": a["resume"]["p50_us"],
            f"{key}_resume_p99_us": a["resume"]["p99_us"], f"{key}_record_bytes_p50": a["record_bytes_p50"],
            f"{key}_round_trips_per_s": a["round_trips_per_s"],
            f"{key}_release_p50_us": a["release"]["p50_us"], f"{key}_spawn_release_p50_us": a["spawn_release"]["p50_us"],
            f"{key}_round_trips_per_s_with_release": a["round_trips_per_s_with_release"], f"{key}_recycled": a["recycled"],
        })
    res.update({"py_targets": PY_TARGETS, "plot": None, "plot_note": "no plot for this benchmark"})
    return res


def show(r: dict[str, Any]) -> None:
    show_agents(r)
    t = r["py_targets"]
    print(f"\nPython targets (p50): spawn {r['py_spawn_p50_us']} µs (≤ {t['spawn_p50_us']:g}), suspend "
          f"{r['py_suspend_no_commit_p50_us']} µs before the commit (≤ {t['suspend_no_commit_p50_us']:g}), resume "
          f"{r['py_resume_p50_us']} µs (≤ {t['resume_p50_us']:g}), {r['py_record_bytes_p50']} B per hibernated agent "
          f"(≤ {t['record_bytes_p50']:g}), {r['py_round_trips_per_s']} round trips/s (≥ {t['round_trips_per_s']:g})"
          f"  [engine {r['engine']}]")
    print(f"Release (the instance put back for the next agent: {'recycled' if r['py_recycled'] else 'dropped'}): "
          f"after a suspend {r['py_release_p50_us']} µs, after a spawn {r['py_spawn_release_p50_us']} µs p50; "
          f"{r['py_round_trips_per_s_with_release']} round trips/s counting it")


if __name__ == "__main__":
    from bench.cli import main

    sys.exit(main(["python", *sys.argv[1:]]))
