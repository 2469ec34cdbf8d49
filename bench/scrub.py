"""What the one scrubbing choke point costs a tool's answer.

``ToolCallPipeline.settle`` turns a tool's value into the answer the guest reads and
scrubs it of the agent's secrets. This measures, in one run, the answer built with no
secrets to scrub (the baseline: the scrubber does nothing) against the same answer
scrubbed of 1 and of 4 secrets, for three answers: a small result, an ``http.fetch``-like
JSON object of 64 KiB, and a 256 KiB text body (the default ``max_response_bytes``).
The answers hold no secret (the common case: everything is searched, nothing masked).

    python bench/scrub.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from typing import Any

from bench._stats import machine, percentiles, table
from host.runtime.tool_call import ToolCallPipeline
from host.tools.registry import spec_from_function
from host.trust.scrub import Scrubber


def _answers() -> dict[str, Any]:
    words = "the quick brown fox jumps over the lazy dog 0123456789 "
    return {
        "small result": {"ok": True, "order": 42, "status": "shipped"},
        "64 KiB JSON": {"status": 200, "headers": {"content-type": "application/json"},
                        "json": {"items": [{"id": f"C-{i}", "name": words[: 20 + i % 30], "n": i}
                                           for i in range(900)]}},
        "256 KiB text": {"status": 200, "body": (words * 5000)[: 256 << 10], "truncated": False},
    }


def run(n: int) -> dict[str, dict[str, float]]:
    spec = spec_from_function(lambda args, ctx: None, name="bench.tool")
    rows: dict[str, dict[str, float]] = {}
    for name, value in _answers().items():
        for k in (0, 1, 4):
            scrub = Scrubber(["sk-live-" + secrets.token_urlsafe(30) for _ in range(k)])
            reps = n if name == "small result" else max(20, n // 50)
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter_ns()
                ToolCallPipeline.settle(spec, scrub, value)
                samples.append(time.perf_counter_ns() - t0)
            rows[f"{name}, {k} secret(s)"] = percentiles(samples)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    rows = run(200 if args.quick else 5000)
    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    else:
        print(table(rows))
        for name in _answers():
            base = rows[f"{name}, 0 secret(s)"]["p50_us"]
            print(f"{name}: p50 x{rows[f'{name}, 1 secret(s)']['p50_us'] / base:.1f} with 1 secret, "
                  f"x{rows[f'{name}, 4 secret(s)']['p50_us'] / base:.1f} with 4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
