"""``torpor bench``: load tests of cold start, suspend/resume, density, tool round trips and CLI start-up.

Each benchmark measures Torpor and, in the same process and the same run, a
baseline doing the same work the obvious way, because a figure without its
baseline on the same machine says little. One module a benchmark
(``bench/coldstart.py``, ``suspend``, ``density``, ``steps``, ``cli_startup``), on the harness of
``bench/rig.py``; this module holds only their command line.

Why it imports nothing heavy at module level: ``torpor --help`` builds every
subparser, this one included, and must start fast; a benchmark's module (and
Wasmtime, the store, the runtime) is imported when that benchmark runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

#: The engine profiles (``host.sandbox.engine.PROFILES``), spelled out so that building the
#: parser does not import Wasmtime; a test keeps the two equal.
ENGINE_PROFILES = ("dense", "dense-cow", "fast", "pooled")

#: Each benchmark: (its module in ``bench``, its one-line help).
BENCHES: dict[str, tuple[str, str]] = {
    "coldstart": ("coldstart", "spawn latency of a cached bundle vs naive wasmtime-py and a Python subprocess per agent"),
    "suspend": ("suspend", "suspend/resume at real tool calls: delta snapshots vs full-memory copies, "
                           "commits at durability sync and process"),
    "density": ("density", "hibernate N agents into LMDB; hold as many warm instances as the process can"),
    "steps": ("steps", "tool round trips per second with warm instances"),
    "js": ("js_guests", "JavaScript agents beside the C agent in the same run: spawn to the first await, suspend, "
                        "resume, bytes per hibernated agent, round trips per second hibernating at every await"),
    "python": ("py_guests", "Python agents beside the C and JavaScript agents in the same run: spawn to the first "
                            "await, suspend, resume, bytes per hibernated agent, round trips per second hibernating "
                            "at every await"),
    "conversation": ("conversation", "bytes stored for an LLM agent whose conversation grows every turn, time per "
                                     "turn, suspend/resume at the last turn"),
    "cli": ("cli_startup", "start-up of a fresh torpor process (--help, ps, inspect) on a store of 10,000 agents, "
                           "against python -c pass"),
    "fuzz": ("fuzz", "property-based fuzzing of the sandbox boundary (imports, validator, modules, snapshots, "
                     "bundles, policies, the SDK's JSON parser) with hello checked after every case"),
    "interrupts": ("interrupts", "hundreds of SIGINTs and SIGTERMs at random instants into real torpor run and "
                                 "resume --all processes: exit 130/143, never an abort, every agent finished once"),
    "serve": ("serve", "a real torpor serve on 127.0.0.1: hello start-to-completion over HTTP vs the embedded Host.run, "
                       "requests/s of start-run and get-agent, the RSS of 10,000 agents hibernated on it"),
    "mcp": ("mcp_overhead", "an MCP tool call as the host runs it vs the mcp SDK's own call to the same stdio "
                            "server, alternating in one run: Torpor's MCP layer in ms at p50"),
    "soak": ("soak", "10,000 agents of mixed kinds (budgets hit, poison values, failing tools) through one host "
                     "for 10 minutes: RSS slope, descriptors, mappings, every end state checked"),
}

#: The fuzz targets (``bench.fuzz.TARGETS``), spelled out for the same reason; a test keeps them equal.
FUZZ_TARGETS = ("imports", "sdk_json", "validator", "modules", "snapshots", "bundles", "policies")

_MAIN_ARGV: list[str] = []


def _argv_tail(args: argparse.Namespace) -> list[str]:
    argv = list(_MAIN_ARGV or sys.argv[1:])
    return argv[argv.index(args.bench):] if args.bench in argv else [args.bench]


def _run(args: argparse.Namespace) -> int:
    """Run one benchmark and print its figures (a table, or one JSON document with ``--json``)."""
    from bench.rig import TARGETS, cpu_speed_ms
    from host.errors import TorporError
    from snapshots.errors import SnapshotError, StoreError

    module = importlib.import_module(f"bench.{BENCHES[args.bench][0]}")
    if args.plot is None and not args.no_plot:
        args.plot = f"torpor-bench-{args.bench}.png"
    if args.no_plot:
        args.plot = None
    if args.progress is None:
        args.progress = sys.stderr.isatty()
    speed_before = cpu_speed_ms()
    try:
        res: dict[str, Any] = module.run(args)
    except (SnapshotError, StoreError) as exc:
        raise TorporError(f"bench {args.bench}: the store failed: {exc}", code=getattr(exc, "code", "store_error")) from exc
    if isinstance(res.get("machine"), dict):
        res["machine"]["cpu_speed_ms"] = {"before": speed_before, "after": cpu_speed_ms()}
    res["targets"] = {k: v for k, v in TARGETS.items() if k in res}
    res["command"] = "torpor bench " + " ".join(_argv_tail(args))
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        module.show(res)
        speed = res.get("machine", {}).get("cpu_speed_ms")
        if speed:
            print(f"machine speed: a fixed Python loop took {speed['before']} ms before and {speed['after']} ms "
                  "after (lower is faster; compare runs taken at similar speeds)")
        if res.get("plot"):
            print(f"plot: {res['plot']}")
        elif res.get("plot_note"):
            print(f"plot: {res['plot_note']}")
    # A benchmark that checks behaviour as it goes (soak, interrupts) fails the command when it found a fault.
    return 1 if res.get("failed") else 0


def _add_benches(bench: argparse.ArgumentParser) -> None:
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (_, help_) in BENCHES.items():
        sp = bsub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="print one JSON document")
        sp.add_argument("--quick", action="store_true", help="a small smoke run (seconds, for CI)")
        # cli and interrupts run torpor processes, not an engine of their own; fuzz runs a Host
        if name not in ("cli", "fuzz", "interrupts", "serve", "mcp"):
            sp.add_argument("--engine", choices=ENGINE_PROFILES, default=None,
                            help="engine profile (default: $TORPOR_ENGINE or dense; see host/sandbox/engine.py and "
                                 "bench/RESULTS.md)")
        sp.add_argument("--plot", default=None, metavar="PNG",
                        help=f"where to draw the plot (default torpor-bench-{name}.png)")
        sp.add_argument("--no-plot", action="store_true", help="draw no plot")
        prog = sp.add_mutually_exclusive_group()
        prog.add_argument("--progress", dest="progress", action="store_true", default=None,
                          help="progress on stderr (default: when stderr is a terminal)")
        prog.add_argument("--no-progress", dest="progress", action="store_false")
        if name == "coldstart":
            sp.add_argument("--n", type=int, help="spawns per case (default 10,000; --quick 300)")
            sp.add_argument("--subprocesses", type=int, help="Python subprocesses for the baseline (default 200)")
        elif name == "suspend":
            sp.add_argument("--n", type=int,
                            help="suspend/resume cycles per agent, mode and durability level (default 3,000)")
            sp.add_argument("--also", action="append", metavar="AGENT",
                            help="another example agent to measure beside steps and mib, e.g. steps-zig "
                                 "(repeatable)")
        elif name in ("js", "python"):
            sp.add_argument("--n", type=int, help="suspend/resume cycles per agent (default 2,000; --quick 100)")
            sp.add_argument("--spawns", type=int, help="spawns per agent (default 2,000; --quick 100)")
        elif name == "density":
            sp.add_argument("--agents", type=int, help="agents to hibernate (default 1,000,000; --quick 2,000)")
            sp.add_argument("--warm", type=int, help="most warm instances to try to hold (default 100,000)")
            sp.add_argument("--no-warm", action="store_true", help="skip the warm-instance phase")
            sp.add_argument("--batch", type=int, default=512, help="agents per hibernation batch (default 512)")
            sp.add_argument("--processes", type=int, default=1,
                            help="host processes hibernating at once into the one store (default 1; "
                                 "one per core to use the machine)")
            sp.add_argument("--per-txn", type=int, default=64,
                            help="agents per transaction function within a batch (default 64; 1: one each)")
            sp.add_argument("--store", help="scratch store directory to hibernate into (default: a temporary one)")
            sp.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is")
            sp.add_argument("--agent", choices=("steps", "steps-js", "steps-py"), default="steps",
                            help="the agent hibernated: steps (C, default), steps-js (JavaScript) or steps-py "
                                 "(Python)")
        elif name == "steps":
            sp.add_argument("--n", type=int, help="tool calls per runtime agent (default 200)")
            sp.add_argument("--agents", type=int, help="concurrent runtime agents (default 64)")
            sp.add_argument("--one-n", type=int, help="tool calls of the lone runtime agent (default 2,000)")
            sp.add_argument("--dbos-n", type=int, help="steps of DBOS's lone workflow (default 500)")
            sp.add_argument("--no-dbos", action="store_true", help="skip the DBOS baseline")
            sp.add_argument("--profile", metavar="FILE", help="write a cProfile of the many-agent phase to FILE")
            sp.add_argument("--processes", type=int,
                            help="host processes the many agents are also run across, on one store, one per core "
                                 "(default: the machine's cores; 1 skips that phase)")
        elif name == "conversation":
            sp.add_argument("--turns", help="comma-separated turn counts (default 50,100,200,400; --quick 10,20)")
            sp.add_argument("--bytes", type=int, help="bytes a turn adds to the conversation (default 2,000)")
            sp.add_argument("--tool", help="the tool it sends the conversation to: llm, kv or both as llm,kv "
                                           "(default llm)")
            sp.add_argument("--rounds", type=int, help="suspend/resume rounds at the last turn (default 50)")
            sp.add_argument("--agent", default="conversation",
                            help="the agent: conversation (C, default), conversation-js or conversation-py, or "
                                 "several comma-separated to measure them side by side in one run")
            sp.add_argument("--no-summarise", action="store_true",
                            help="skip the agent that rewrites its history (summarises) every 25 turns")
            sp.add_argument("--profile", metavar="FILE", help="write a cProfile of the last case's resumes to FILE")
        elif name == "cli":
            sp.add_argument("--agents", type=int, help="agents in the store (default 10,000; --quick 200)")
            sp.add_argument("--rounds", type=int, help="timed runs of each command (default 40; --quick 3)")
            sp.add_argument("--store", help="build the store in this new directory and keep it "
                                            "(default: a temporary one)")
        elif name == "fuzz":
            sp.add_argument("--minutes", type=float, help="how long to fuzz, over all targets (default 10; --quick 0.2)")
            sp.add_argument("--target", action="append", choices=FUZZ_TARGETS,
                            help="fuzz only this target (repeatable; default: all)")
            sp.add_argument("--seed", type=int, help="the first seed (default: the time); each round of cases takes "
                                                     "the next")
        elif name == "interrupts":
            sp.add_argument("--interrupts", type=int, help="signals to send (default 300; --quick 8)")
            sp.add_argument("--agents", type=int, help="agents in each store (default 3; --quick 2)")
            sp.add_argument("--steps", type=int, help="tool calls each agent makes (default 200; --quick 40)")
            sp.add_argument("--per-store", type=int, help="signals sent into the commands of one store (default 10)")
            sp.add_argument("--seed", type=int, default=2107, help="seed of the instants (default 2107)")
        elif name == "serve":
            sp.add_argument("--n", type=int, help="hello runs timed over HTTP and embedded, per durability "
                                                  "(default 2,000; --quick 20)")
            sp.add_argument("--requests", type=int, help="requests per throughput case (default 3,000; --quick 40)")
            sp.add_argument("--clients", help="comma-separated concurrent clients (default 1,16; --quick 1,4)")
            sp.add_argument("--agents", type=int, help="agents to park on one server (default 10,000; --quick 20)")
            sp.add_argument("--durability", choices=("sync", "process"), default=None,
                            help="measure at this durability only (default: hello at both, the rest at sync)")
            sp.add_argument("--against", metavar="DIR",
                            help="another checkout of Torpor: its server's hello over HTTP timed beside this one's, "
                                 "requests alternated")
        elif name == "mcp":
            sp.add_argument("--n", type=int, help="calls of each kind (default 5,000; --quick 200)")
        elif name == "soak":
            sp.add_argument("--agents", type=int, help="agents to run at least (default 10,000; --quick 300)")
            sp.add_argument("--minutes", type=float,
                            help="minutes to run at least (default 10; --quick 0: until --agents have ended)")
            sp.add_argument("--concurrency", type=int, help="agents running at once (default 32)")
            sp.add_argument("--durability", choices=("sync", "process"), default=None,
                            help="the store's durability (default $TORPOR_DURABILITY, else sync)")
        sp.set_defaults(fn=_run)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``torpor bench BENCH`` on the CLI's subparsers (called from ``build_parser``)."""
    bench: argparse.ArgumentParser = sub.add_parser(
        "bench", help="load-test cold start, suspend/resume, density, tool round trips and CLI start-up",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    _add_benches(bench)
    return bench


def main(argv: Sequence[str] | None = None) -> int:
    """``python bench/<name>.py ...``: ``torpor bench ...`` without the rest of the CLI.

    Signals and errors end as the CLI ends them: Ctrl-C and SIGTERM at a safe point
    (never inside a call from Wasmtime), exit 128 + the signal; an error in one line,
    exit 2; so that a script and ``torpor bench`` behave alike.
    """
    import signal

    from host.errors import TorporError
    from host.sandbox import interrupts

    argv = list(sys.argv[1:] if argv is None else argv)
    _MAIN_ARGV[:] = ["bench", *argv]
    parser = argparse.ArgumentParser(prog="torpor bench", description=__doc__.split("\n\n")[0] if __doc__ else None)
    _add_benches(parser)
    args = parser.parse_args(argv)
    signum = 0
    try:
        with interrupts.handle_signals(then_ignore=True):
            return int(args.fn(args))
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
    except TorporError as exc:
        signum = interrupts.requested()  # an error an interrupted guest left behind is the interrupt
        if not signum:
            if args.json:
                print(json.dumps({"status": "error", "error": {"code": exc.code, "message": str(exc)}}))
            else:
                print(f"torpor: error[{exc.code}]: {exc}", file=sys.stderr)
            return 2
    except Exception:  # a trap from a baseline's plain wasmtime-py call, say: the interrupt's if one came
        signum = interrupts.requested()
        if not signum:
            raise
    print("torpor: interrupted" + ("" if signum == signal.SIGINT else f" (signal {signum})"), file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # `python -m bench.cli coldstart ...`
    sys.exit(main())
