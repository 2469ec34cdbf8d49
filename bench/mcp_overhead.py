"""What Torpor's MCP client layer costs over a direct ``mcp`` SDK call, in the same run.

Two copies of the same stdio server (``tests/mcp_fixture_server.py``, its
``lookup_customer`` tool: input and output schemas, a structured answer) are called in
alternating rounds, so both see the same machine at the same moments:

* **direct**: the SDK's own ``ClientSession.call_tool`` on a session this process holds
  (what a Python program with no sandbox would do);
* **torpor**: the ``mcp.crm.lookup_customer`` tool as the host runs it
  (``host.tools.builtin``): its configuration from the policy, the hop to the supervisor's
  event loop and back, the arguments checked against the published schema, progress
  requested, the answer told once. Not the guest, the policy engine or the commit: those
  are measured by ``torpor bench steps`` and ``suspend``.

Both with the servers on the host's own event loop (``torpor serve``: no thread crossed)
and on the supervisor's thread (a CLI run: two crossings per call).  The figure is the
difference of the p50s (the target, for ``torpor serve``: at most 0.5 ms) and their ratio.

    torpor bench mcp [--n N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from bench._stats import machine, percentiles, table

SERVER = Path(__file__).resolve().parent.parent / "tests" / "mcp_fixture_server.py"
ARGS = {"customer_id": "C-42"}
TARGET_OVERHEAD_MS = 0.5


def _policy() -> Any:
    from policies import parse_policy

    return parse_policy('[agent]\nname = "bench"\n[mcp.crm]\ntools = ["lookup_customer"]\n')


def _operator() -> Any:
    """The host's operator config: how to start the server the policy names (resolved per call)."""
    import tempfile

    from host.tools import mcp_config

    return mcp_config.parse(f'[mcp]\nhome = "{tempfile.gettempdir()}/torpor-bench-mcp-home"\n'
                            f'[mcp.servers.crm]\ncommand = "{sys.executable}"\nargs = ["{SERVER}"]\n')


async def _measure(n: int, progress: bool, own_loop: bool) -> dict[str, list[int]]:
    """``own_loop``: the servers on this loop, as ``torpor serve`` keeps them; else on the
    supervisor's thread, as a CLI run or an embedding without it does."""
    from host.tools import mcp as mcp_tool

    if not own_loop:
        return await _alternate(n, progress)
    async with mcp_tool.SUPERVISOR.owned_by_this_loop():
        return await _alternate(n, progress)


async def _alternate(n: int, progress: bool) -> dict[str, list[int]]:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    from host.tools import mcp as mcp_tool
    from host.tools.builtin import BUILTINS
    from host.tools.registry import ToolContext

    pol = _policy()
    spec = BUILTINS["mcp.crm.lookup_customer"]
    ctx = ToolContext(agent_id="bench", agent_name="bench", call_seq=1, kv_namespace="agent:bench",
                      grant=pol.grants["mcp.crm.lookup_customer"], policy=pol, mcp_config=_operator())
    args = spec.validate(ARGS)
    params = StdioServerParameters(command=sys.executable, args=[str(SERVER)])
    out: dict[str, list[int]] = {"direct": [], "torpor": []}
    try:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await session.list_tools()  # the SDK validates answers against the listed output schema
            for _ in range(50):  # both warm: servers started, code paths taken
                await session.call_tool("lookup_customer", ARGS)
                await spec.func(args, ctx)
            for i in range(n):
                t = time.perf_counter_ns()
                r = await session.call_tool("lookup_customer", ARGS)
                out["direct"].append(time.perf_counter_ns() - t)
                assert not r.is_error
                t = time.perf_counter_ns()
                v = await spec.func(args, ctx)
                out["torpor"].append(time.perf_counter_ns() - t)
                assert v["structured"]["id"] == "C-42"
                if progress and i % 500 == 0:
                    print(f"  {i}/{n}", file=sys.stderr)
    finally:
        mcp_tool.shutdown()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.rig import positive

    n = positive("--n", args.n) if args.n is not None else (200 if args.quick else 5000)
    out: dict[str, Any] = {"bench": "mcp", "machine": machine(), "n": n, "cases": {}}
    for case, own in (("serve", True), ("thread", False)):
        samples = anyio.run(_measure, n, bool(args.progress), own)
        rows = {k: percentiles(v) for k, v in samples.items()}
        overhead_ms = (rows["torpor"]["p50_us"] - rows["direct"]["p50_us"]) / 1000
        out["cases"][case] = {"rows": rows, "overhead_p50_ms": round(overhead_ms, 3),
                              "ratio_p50": round(rows["torpor"]["p50_us"] / rows["direct"]["p50_us"], 2)}
    # The target is the long-running host's (issue 24: servers owned by `torpor serve`).
    out["rows"] = out["cases"]["serve"]["rows"]
    out["overhead_p50_ms"] = out["cases"]["serve"]["overhead_p50_ms"]
    out["ratio_p50"] = out["cases"]["serve"]["ratio_p50"]
    out["target_overhead_ms"] = TARGET_OVERHEAD_MS
    out["met"] = out["overhead_p50_ms"] <= TARGET_OVERHEAD_MS
    return out


def show(res: dict[str, Any]) -> None:
    names = {"serve": "servers on the host's own loop (torpor serve)",
             "thread": "servers on the supervisor's thread (a CLI run)"}
    for case, r in res["cases"].items():
        print(f"an MCP tool call over stdio, {res['n']} each, alternating (µs): {names[case]}")
        print(table({"direct: the mcp SDK's ClientSession.call_tool": r["rows"]["direct"],
                     "torpor: mcp.crm.lookup_customer as the host runs it": r["rows"]["torpor"]}))
        print(f"  Torpor's MCP layer: +{r['overhead_p50_ms']} ms at p50 ({r['ratio_p50']}x the direct call)")
    print(f"target (torpor serve) at most {res['target_overhead_ms']} ms over the direct call at p50: "
          f"{'met' if res['met'] else 'NOT met'} (+{res['overhead_p50_ms']} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    ns = parser.parse_args()
    ns.progress = False
    result = run(ns)
    if ns.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        show(result)
