"""``torpor run``, ``resume``, ``ps``, ``inspect`` and ``fork``: running agents and looking at them.

``run``, ``resume`` and ``fork`` build a :class:`~host.runtime.Host`; ``ps`` and
``inspect`` only read, so they open the store read-only and ask
:mod:`host.runtime.queries`, without Wasmtime, the committer or the vault.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from host.cli.common import (
    AGENT_HELP,
    EXIT_OK,
    add_command,
    emit,
    iso,
    open_host,
    open_store,
    parse_input,
    print_result,
    result_exit,
    store_dir,
)
from host.errors import ConfigError

if TYPE_CHECKING:
    from snapshots.store import ReadTxn

TITLE = "agents: run agents and look at them"


def cmd_run(args: argparse.Namespace) -> int:
    """Spawn an agent from a bundle and drive it until it ends or waits on a person."""
    from host.runtime import run_sync
    from host.sandbox import bundle as bundle_mod

    if args.fuel is not None and args.fuel < 0:
        raise ConfigError("--fuel must be a non-negative integer")
    b = bundle_mod.load(args.bundle)
    payload = parse_input(args.input)
    host = open_host(args)
    try:
        res = run_sync(lambda: host.run(b, payload, fuel=args.fuel, on_behalf_of=args.on_behalf_of))
    finally:
        host.close()
    if not args.json:
        said = str((res.error or {}).get("message", ""))
        for line in res.logs:
            if line["level"] == "error" and line["message"] and said.endswith(line["message"]):
                continue  # what torpor_fail() said is the end of the error printed below: once is enough
            print(f"[{line['level']}] {line['message']}", file=sys.stderr)
    emit(args, res.to_dict(), lambda: print_result(res))
    return result_exit(res)


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume one agent, or every unfinished one, from its latest checkpoint."""
    from host.runtime import run_sync

    host = open_host(args)
    try:
        if args.all:
            results = run_sync(host.resume_all)
        elif args.agent:
            results = [run_sync(lambda: host.resume(args.agent))]
        else:
            raise ConfigError("name an agent to resume, or pass --all")
    finally:
        host.close()
    data = [r.to_dict() for r in results]

    def human() -> None:
        if not results:
            print("nothing to resume")
        for r in results:
            print_result(r)

    emit(args, data if args.all else data[0], human)
    return max((result_exit(r) for r in results), default=EXIT_OK)


# What `torpor ps` shows of each record (the rest of a record, about 1 KB, is not decoded).
_PS_FIELDS = ("name", "status", "checkpoints", "last_checkpoint_bytes", "created_at",
              "stall_timeout", "last_progress")  # the last two for queries.stalled
_PS_USAGE = ("fuel_used", "tool_calls", "tokens")


def _ps_decoder(txn: ReadTxn) -> Callable[[str, bytes], dict[str, Any]]:
    """A decoder of the fields ``ps`` shows, from a record's JSON text read in ``txn``.

    Why not ``queries.list_agents``: it decodes every field of every record, and on
    10,000 agents ``json.loads`` alone took most of the 150 ms ``ps`` may take.
    pydantic-core's parser, told which fields to keep, skips the others without making
    Python objects of them (about a quarter of the time). A record of another shape, or
    one that does not decode, is read as the store reads it (in full, or its stand-in).
    """
    from pydantic_core import SchemaValidator, ValidationError
    from pydantic_core import core_schema as cs

    from snapshots.store import unreadable_record

    def fields(names: Sequence[str], **more: cs.TypedDictField) -> cs.TypedDictSchema:
        return cs.typed_dict_schema({**{n: cs.typed_dict_field(cs.any_schema(), required=False) for n in names},
                                     **more}, extra_behavior="ignore")

    usage = cs.typed_dict_field(cs.nullable_schema(fields(_PS_USAGE)), required=False)
    validator = SchemaValidator(fields(_PS_FIELDS, usage=usage))

    def decode(agent_id: str, raw: bytes) -> dict[str, Any]:
        try:
            return cast("dict[str, Any]", validator.validate_json(raw))
        except ValidationError:
            return txn.get_agent(agent_id) or unreadable_record(agent_id, "its key is not UTF-8")

    return decode


def _usage(rec: dict[str, Any]) -> dict[str, Any]:
    usage = rec.get("usage")
    return usage if isinstance(usage, dict) else {}  # a stand-in for a damaged record has none


_PS_LINE = "%-26s  %-14.14s  %-16s  %12s  %6s  %7s  %5s  %6s"  # one %-format: half an f-string's cost


def cmd_ps(args: argparse.Namespace) -> int:
    """One line per agent in the store (with ``--json``, one object per agent)."""
    from host.runtime.queries import stalled

    now = time.time()
    with open_store(args, readonly=True) as store, store.read() as txn:
        decode = _ps_decoder(txn)
        records = [(agent_id, decode(agent_id, raw)) for agent_id, raw in txn.iter_agents_raw()]
    if args.status:
        records = [(agent_id, a) for agent_id, a in records if a.get("status") == args.status]
    if args.json:
        rows = []
        for agent_id, a in records:
            usage = _usage(a)
            rows.append({
                "agent_id": agent_id, "name": a.get("name"), "status": a.get("status"),
                "fuel_used": usage.get("fuel_used", 0), "tool_calls": usage.get("tool_calls", 0),
                "checkpoints": a.get("checkpoints", 0), "last_checkpoint_bytes": a.get("last_checkpoint_bytes", 0),
                "tokens": usage.get("tokens", 0), "stalled": stalled(a, now), "created_at": a.get("created_at"),
            })
        emit(args, rows, lambda: None)  # --json: the human form is below
        return EXIT_OK
    lines = [_PS_LINE % ("AGENT", "NAME", "STATUS", "FUEL", "CALLS", "TOKENS", "CKPT", "LAST")]
    for agent_id, a in records:
        usage = _usage(a)
        status = a.get("status")
        lines.append(_PS_LINE % (agent_id, a.get("name"), f"{status} (stalled)" if stalled(a, now) else status,
                                 usage.get("fuel_used", 0), usage.get("tool_calls", 0), usage.get("tokens", 0),
                                 a.get("checkpoints", 0), a.get("last_checkpoint_bytes", 0)))
    sys.stdout.write("\n".join(lines) + "\n")  # one write: 10,000 print calls cost more than the lines
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """One agent in full: status, output or error, pending call, usage, checkpoints."""
    from host.runtime import queries

    with open_store(args, readonly=True) as store:
        info = queries.inspect(store, args.agent, where=store_dir(args))

    def human() -> None:
        print(f"agent    {info['agent_id']} ({info.get('name')}, bundle {str(info.get('bundle_digest'))[:16]})")
        print(f"status   {info.get('status')}")
        if info.get("principal"):
            print(f"for      {info['principal']}")
        if info.get("parent"):
            print(f"forked   from {info['parent']['agent_id']} at checkpoint {info['parent']['checkpoint']}")
        if info.get("output") is not None:
            print("output   " + json.dumps(info["output"]))
        if info.get("error"):
            print(f"error    [{info['error']['code']}] {info['error']['message']}")
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
    host = open_host(args)
    try:
        new_id = host.fork(args.agent, args.checkpoint)
    finally:
        host.close()
    emit(args, {"agent_id": new_id, "parent": args.agent, "checkpoint": args.checkpoint},
         lambda: print(f"forked {args.agent}@{args.checkpoint} as {new_id}; run `torpor resume {new_id}`"))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``run``, ``resume``, ``ps``, ``inspect`` and ``fork``."""
    sp = add_command(sub, "run", cmd_run, "run an agent bundle to completion (or until it waits on a human)",
                     store=True, writes=True)
    sp.add_argument("bundle", help="a .torpor bundle file")
    sp.add_argument("--input", help="JSON input, or @FILE")
    sp.add_argument("--fuel", type=int, help="fuel budget for this run (overrides the policy)")
    sp.add_argument("--on-behalf-of", help="the principal the agent acts for")
    sp = add_command(sub, "resume", cmd_resume, "resume a suspended agent from its latest checkpoint",
                     store=True, writes=True)
    sp.add_argument("agent", nargs="?", help=AGENT_HELP)
    sp.add_argument("--all", action="store_true", help="resume every unfinished agent")
    sp = add_command(sub, "ps", cmd_ps, "list agents", store=True)
    sp.add_argument("--status", help="only agents with this status")
    sp = add_command(sub, "inspect", cmd_inspect, "show an agent: status, output, checkpoints, pending call, usage",
                     store=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp = add_command(sub, "fork", cmd_fork, "start a new agent from an earlier checkpoint of another",
                     store=True, writes=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp.add_argument("--checkpoint", type=int, required=True, help="the checkpoint number (see `torpor inspect`)")
