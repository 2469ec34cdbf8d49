"""``torpor run``, ``resume``, ``ps``, ``inspect``, ``logs`` and ``fork``: running agents and looking at them.

``run``, ``resume`` and ``fork`` build a :class:`~host.runtime.Host`; ``ps``, ``inspect``
and ``logs`` only read, so they open the store read-only and ask
:mod:`host.runtime.queries` (and :mod:`host.runtime.logs`), without Wasmtime, the
committer or the vault. Each also goes to a server (``--server``, :mod:`host.cli.remote`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.cli import remote
from host.cli.common import (
    AGENT_HELP,
    EXIT_ATTENTION,
    EXIT_OK,
    MAX_MEMORY_HELP,
    add_command,
    emit,
    iso,
    open_host,
    open_store,
    parse_input,
    print_result,
    report_attention,
    result_exit,
    store_dir,
    until,
)
from host.errors import ConfigError

if TYPE_CHECKING:
    from host.runtime import RunResult

TITLE = "agents: run agents and look at them"


def cmd_run(args: argparse.Namespace) -> int:
    """Spawn an agent from a bundle and drive it until it ends or waits on a person."""
    if args.fuel is not None and args.fuel < 0:
        raise ConfigError("--fuel must be a non-negative integer")
    ref = None if _is_bundle_path(args.bundle) else args.bundle
    client = remote.connect(args)
    if client is not None:
        if ref is None:
            raise ConfigError(f"{args.bundle} is a bundle file: a server runs what its registry holds; push it first "
                              "(`torpor --server URL push FILE`), then run NAME, NAME@TAG or sha256:<digest>")
        payload = parse_input(args.input)
        # Started once (one idempotency key), answered at once with its id (which Ctrl-C then
        # names), then long polls until it ends or parks.
        with client:
            started = client.start_run(ref, payload, fuel=args.fuel, on_behalf_of=args.on_behalf_of)
            return _report_run(args, remote.result_of(remote.until_stopped(client, started)))
    from host.runtime import run_sync
    from host.sandbox import bundle as bundle_mod

    b = bundle_mod.load(args.bundle) if ref is None else None
    payload = parse_input(args.input)
    host = open_host(args)
    try:
        if b is not None:
            res = run_sync(lambda: host.run(b, payload, fuel=args.fuel, on_behalf_of=args.on_behalf_of))
        else:  # a registry reference: resolved once, its digest recorded (`torpor inspect` shows both)
            assert ref is not None
            res = run_sync(lambda: host.run_ref(ref, payload, fuel=args.fuel, on_behalf_of=args.on_behalf_of))
    finally:
        host.close()
    return _report_run(args, res)


def _report_run(args: argparse.Namespace, res: RunResult) -> int:
    """Print a run's guest log lines (stderr) and its result; its exit code."""
    if not args.json:
        said = str((res.error or {}).get("message", ""))
        for line in res.logs:
            if line["level"] == "error" and line["message"] and said.endswith(line["message"]):
                continue  # what torpor_fail() said is the end of the error printed below: once is enough
            print(f"[{line['level']}] {line['message']}", file=sys.stderr)
    emit(args, res.to_dict(), lambda: print_result(res))
    return result_exit(res)


def _is_bundle_path(arg: str) -> bool:
    """Whether ``torpor run``'s argument names a bundle file rather than a registry reference:
    an existing file, or what only a path can be (a '/', a ``.torpor`` suffix): a reference
    has neither, so a mistyped path is reported as a missing file, not an unknown name."""
    p = Path(arg)
    return p.is_file() or "/" in arg or arg.endswith(".torpor") or p.exists()


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume one agent, or every unfinished one, from its latest checkpoint.

    With ``--all``, agents that need attention (damaged before or by this run; see
    :func:`host.runtime.queries.attention`) are listed too, each result with its
    ``attention``, and the exit code is ``EXIT_ATTENTION`` when there are any.
    """
    client = remote.connect(args)
    if client is not None:  # the server resumes it in the background; we wait as after an approval
        if args.all:
            raise ConfigError("--all does not apply against a server: it resumes every agent it can by itself (at "
                              "start, and when a wait ends); name one agent to resume")
        if not args.agent:
            raise ConfigError("name an agent to resume")
        with client:
            res = remote.result_of(remote.until_stopped(client, client.resume(args.agent)))
        emit(args, res.to_dict(), lambda: print_result(res))
        return result_exit(res)
    from host.runtime import RunResult, queries, run_sync

    host = open_host(args)
    damaged: dict[str, str] = {}
    try:
        if args.all:
            results = run_sync(host.resume_all)
            for r in results:  # an agent resume --all could not drive for a host error
                if r.error and r.error.get("code") in queries.HOST_ERROR_CODES:
                    damaged[r.agent_id] = f"not resumed, a host error: [{r.error['code']}] {r.error.get('message')}"
            seen = {r.agent_id for r in results}
            for rec in host.list_agents():
                why = queries.attention(rec)
                if why is not None:
                    damaged.setdefault(str(rec["agent_id"]), why)
                    if rec["agent_id"] not in seen:  # damaged before this run: reported, not resumed
                        results.append(RunResult.of_record(rec))
        elif args.agent:
            results = [run_sync(lambda: host.resume(args.agent))]
        else:
            raise ConfigError("name an agent to resume, or pass --all")
        asleep = host.wakeups() if args.all else []  # not due yet: serve, or a later resume --all, wakes them
    finally:
        host.close()
    data = [{**r.to_dict(), "attention": damaged.get(r.agent_id)} if args.all else r.to_dict() for r in results]

    def human() -> None:
        if not results:
            print("nothing to resume")
        for r in results:
            print_result(r)
        if asleep:
            n = len(asleep)
            print(f"{n} agent{'s' if n != 1 else ''} still sleep{'s' if n == 1 else ''}; the next wakes at "
                  f"{iso(asleep[0].at)} ({until(asleep[0].at)}), the last at {iso(asleep[-1].at)}")
        report_attention(damaged)

    emit(args, data if args.all else data[0], human)
    if damaged:
        return EXIT_ATTENTION
    return max((result_exit(r) for r in results), default=EXIT_OK)


_PS_LINE = "%-26s  %-14.14s  %-16s  %12s  %6s  %7s  %5s  %6s"  # one %-format: half an f-string's cost


def cmd_ps(args: argparse.Namespace) -> int:
    """One line per agent in the store (with ``--json``, one object per agent, with its
    ``attention``: why it needs an operator, or null); ``EXIT_ATTENTION`` when some do.

    It reads each agent's listing summary (``snapshots.summary``), not its record: on
    10,000 agents the records are 10 MB of JSON, the summaries under 1 MB. Only a failed
    agent's record is read, for its error's code (a host error needs attention).
    """
    from host.runtime.queries import attention, stalled_since

    now = time.time()
    damaged: dict[str, str] = {}
    client = remote.connect(args)
    if client is not None:  # the server's records of the token's tenant, as the store's summaries
        from snapshots.summary import summary_of

        with client:
            records = [r for r in client.agents() if not args.status or r.get("status") == args.status]
        rows = [summary_of(r) for r in records]
        wakes = {str(r["agent_id"]): float(r["wake_at"]) for r in records
                 if r.get("status") == "sleeping" and isinstance(r.get("wake_at"), int | float)}
        for r in records:
            why = attention(r) if r.get("status") in ("corrupt", "failed") else None
            if why is not None:
                damaged[str(r["agent_id"])] = why
    else:
        from host.runtime.timers import wake_times

        with open_store(args, readonly=True) as store, store.read() as txn:
            rows = list(txn.iter_agent_summaries())
            wakes = wake_times(txn) if any(s.status == "sleeping" for s in rows) else {}
            if args.status:
                rows = [s for s in rows if s.status == args.status]
            for s in rows:
                if s.status in ("corrupt", "failed"):
                    why = attention(txn.get_agent(s.agent_id) or {"status": s.status})
                    if why is not None:
                        damaged[s.agent_id] = why
    code = EXIT_ATTENTION if damaged else EXIT_OK
    if args.json:
        emit(args, [{
            "agent_id": s.agent_id, "name": s.name, "status": s.status, "fuel_used": s.fuel_used,
            "tool_calls": s.tool_calls, "checkpoints": s.checkpoints, "last_checkpoint_bytes": s.last_checkpoint_bytes,
            "tokens": s.tokens, "stalled": stalled_since(s.status, s.stall_timeout, s.last_progress or s.created_at, now),
            "created_at": s.created_at, "attention": damaged.get(s.agent_id), "wake_at": wakes.get(s.agent_id),
        } for s in rows], lambda: None)  # --json: the human form is below
        return code
    lines = [_PS_LINE % ("AGENT", "NAME", "STATUS", "FUEL", "CALLS", "TOKENS", "CKPT", "LAST")]
    for s in rows:  # the first 8 fields of a summary are the columns, in order
        if s.stall_timeout and stalled_since(s.status, s.stall_timeout, s.last_progress or s.created_at, now):
            s = s._replace(status=f"{s.status} (stalled)")
        elif s.agent_id in wakes:
            s = s._replace(status=f"sleeping {until(wakes[s.agent_id], now, prefix='')}")  # fits the column
        lines.append(_PS_LINE % s[:8])
    sys.stdout.write("\n".join(lines) + "\n")  # one write: 10,000 print calls cost more than the lines
    sys.stdout.flush()
    report_attention(damaged)
    return code


def cmd_inspect(args: argparse.Namespace) -> int:
    """One agent in full: status, output or error, pending call, usage, checkpoints."""
    def locally() -> dict[str, Any]:
        from host.runtime import queries

        with open_store(args, readonly=True) as store:
            return queries.inspect(store, args.agent, where=store_dir(args))

    info = remote.either(args, lambda client: client.inspect(args.agent), locally)

    def human() -> None:
        print(f"agent    {info['agent_id']} ({info.get('name')}, bundle {str(info.get('bundle_digest'))[:16]})")
        started = info.get("started_as")
        if isinstance(started, dict) and started.get("ref"):
            print(f"version  started as {started['ref']}: bundle sha256:{info.get('bundle_digest')} (the version it "
                  "runs, whatever the tag names now)")
        print(f"status   {info.get('status')}")
        if info.get("principal"):
            print(f"for      {info['principal']}")
        code = info.get("bundle_code")
        if isinstance(code, dict):
            pieces = code.get("code") or {}
            print("code     the bundle's own code ran in the host (trusted by the operator): "
                  + ", ".join(f"{m} sha256 {d}" for m, d in pieces.items()))
        if info.get("parent"):
            print(f"forked   from {info['parent']['agent_id']} at checkpoint {info['parent']['checkpoint']}")
        if info.get("output") is not None:
            print("output   " + json.dumps(info["output"]))
        if info.get("error"):
            print(f"error    [{info['error']['code']}] {info['error']['message']}")
        if info.get("status") == "sleeping" and info.get("wake_at") is not None:
            print(f"wakes    {iso(info['wake_at'])} ({until(info['wake_at'])}; {info.get('wake_reason')})")
        if info.get("pending") and info.get("status") not in ("completed", "failed", "terminated"):
            print(f"pending  {info['pending']['tool']} {json.dumps(info['pending'].get('args'))} (call {info['pending']['seq']})")
        u = info.get("usage", {})
        print(f"usage    fuel {u.get('fuel_used', 0)}, tool calls {u.get('tool_calls', 0)}, suspensions "
              f"{u.get('suspensions', 0)}, hibernations {u.get('hibernations', 0)}, tokens {u.get('tokens', 0)}")
        cps = info["checkpoint_list"]
        print(f"checkpoints ({len(cps)}):")
        shown = cps if len(cps) <= 12 else [*cps[:5], None, *cps[-5:]]
        for c in shown:
            if c is None:
                print("  ...")
                continue
            print(f"  #{c['seq']:<5} {c['size']:>7} bytes  {iso(c['created_at'])}")

    emit(args, info, human)
    return EXIT_OK


def cmd_fork(args: argparse.Namespace) -> int:
    """A new agent started from an earlier checkpoint of another (not run until resumed)."""
    def locally() -> dict[str, Any]:
        host = open_host(args)
        try:
            return {"agent_id": host.fork(args.agent, args.checkpoint), "parent": args.agent,
                    "checkpoint": args.checkpoint}
        finally:
            host.close()

    forked = remote.either(args, lambda client: client.fork(args.agent, args.checkpoint), locally)
    new_id = forked["agent_id"]
    emit(args, forked, lambda: print(f"forked {args.agent}@{args.checkpoint} as {new_id}; run `torpor resume {new_id}`"))
    return EXIT_OK


#: How often ``logs --follow`` reads a local store again.
FOLLOW_POLL_S = 0.2


def cmd_logs(args: argparse.Namespace) -> int:
    """An agent's guest log lines as the store (or the server's) keeps them; ``--follow``
    prints new ones as they are committed, until the agent ends (Ctrl-C stops following)."""
    if args.after < -1 or (args.limit is not None and args.limit < 1):
        raise ConfigError("--after must be -1 or a line number, --limit a positive number")
    client = remote.connect(args)
    if client is not None:
        with client:
            return _print_logs(args, lambda after, wait: client.logs(args.agent, after=after, limit=args.limit,
                                                                      wait=wait))
    from host.runtime import logs, queries
    from host.runtime.result import TERMINAL

    with open_store(args, readonly=True) as store:
        def page(after: int, wait: float) -> dict[str, Any]:
            deadline = time.monotonic() + wait
            while True:  # a follower on a local store reads it again until a line comes or the agent ends
                status = queries.get_agent(store, args.agent, where=store_dir(args)).get("status")
                found = logs.read(store, args.agent, after=after, **({"limit": args.limit} if args.limit else {}))
                if found["lines"] or status in TERMINAL or time.monotonic() >= deadline:
                    return {**found, "status": status}
                time.sleep(FOLLOW_POLL_S)

        return _print_logs(args, page)


#: The control characters a guest's line may carry, but a terminal must not be sent as they are
#: (escape sequences move the cursor, retitle the window, ...): all but the tab.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def _shown(message: str) -> str:
    """A guest's log line as a person's terminal shows it: one line, its control characters escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", message)


def _print_logs(args: argparse.Namespace, page: Callable[[int, float], dict[str, Any]]) -> int:
    """Print pages of lines from ``page(after, wait)`` (one side's reader): every kept line
    after ``--after`` (``--limit``: one page); with ``--follow``, then the new ones until the
    agent ends. ``--json``: the page, or with ``--follow`` one JSON line per log line."""
    from host.runtime.result import TERMINAL

    first = page(args.after, 0.0)
    if args.json and not args.follow:
        emit(args, first, lambda: None)
        return EXIT_OK
    if first["first"] > args.after + 1 and not args.json:
        n = first["first"] - args.after - 1
        print(f"({n} earlier line{'s' if n != 1 else ''} not kept: a log keeps an agent's latest lines)",
              file=sys.stderr)
    current = first
    while True:
        for line in current["lines"]:
            if args.json:
                print(json.dumps(line), flush=True)
            else:
                print(f"{iso(line['t'])} #{line['seq']} [{line['level']}] {_shown(line['message'])}", flush=args.follow)
        after = current["lines"][-1]["seq"] if current["lines"] else args.after
        args.after = after
        if current["more"] and (args.limit is None or args.follow):
            current = page(after, 0.0)
        elif args.follow and current["status"] not in TERMINAL:
            current = page(after, remote.POLL_S)
        else:
            return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``run``, ``resume``, ``ps``, ``inspect``, ``logs`` and ``fork``."""
    sp = add_command(sub, "run", cmd_run, "run an agent bundle to completion (or until it waits on a human)",
                     store=True, writes=True, runs=True)
    sp.add_argument("bundle", help="a .torpor bundle file, or a registry reference: NAME (the version pushed last), "
                                   "NAME@TAG, NAME@sha256:<hex> or sha256:<hex> (see `torpor push`)")
    sp.add_argument("--input", help="JSON input, or @FILE")
    sp.add_argument("--fuel", type=int, help="fuel budget for this run (overrides the policy)")
    sp.add_argument("--on-behalf-of", help="the principal the agent acts for")
    sp.add_argument("--max-memory", metavar="SIZE", help=MAX_MEMORY_HELP)
    sp = add_command(sub, "resume", cmd_resume, "resume a suspended agent from its latest checkpoint",
                     store=True, writes=True, runs=True)
    sp.add_argument("agent", nargs="?", help=AGENT_HELP)
    sp.add_argument("--all", action="store_true", help="resume every unfinished agent (a sleeping one once its "
                    "wake time has come; it says how many still sleep and until when)")
    sp.add_argument("--max-memory", metavar="SIZE", help=MAX_MEMORY_HELP)
    sp = add_command(sub, "ps", cmd_ps, "list agents", store=True)
    sp.add_argument("--status", help="only agents with this status")
    sp = add_command(sub, "inspect", cmd_inspect, "show an agent: status, output, checkpoints, pending call, usage",
                     store=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp = add_command(sub, "logs", cmd_logs, "show an agent's guest log lines (its latest, kept in the store)",
                     store=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp.add_argument("--after", type=int, default=-1, metavar="SEQ",
                    help="only the lines numbered after SEQ (the # of a line printed before)")
    sp.add_argument("--limit", type=int, default=None, help="at most this many lines")
    sp.add_argument("-f", "--follow", action="store_true",
                    help="then print new lines as the agent logs them, until it ends (Ctrl-C stops following)")
    sp = add_command(sub, "fork", cmd_fork, "start a new agent from an earlier checkpoint of another",
                     store=True, writes=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp.add_argument("--checkpoint", type=int, required=True, help="the checkpoint number (see `torpor inspect`)")
