"""Percentiles and tables for the benchmarks (nanosecond samples in, microseconds out)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    xs = sorted(samples_ns)
    if not xs:
        raise ValueError("no samples")

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000.0

    return {"n": len(xs), "p50_us": pick(0.50), "p90_us": pick(0.90), "p99_us": pick(0.99), "max_us": xs[-1] / 1000.0}


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "system": platform.system()}


def table(rows: dict[str, dict[str, float]]) -> str:
    out = [f"{'case':44} {'n':>7} {'p50 µs':>9} {'p90 µs':>9} {'p99 µs':>9} {'max µs':>9}"]
    for name, r in rows.items():
        out.append(f"{name:44} {int(r['n']):>7} {r['p50_us']:>9.1f} {r['p90_us']:>9.1f} {r['p99_us']:>9.1f} {r['max_us']:>9.1f}")
    return "\n".join(out)


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2)
