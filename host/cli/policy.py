"""``torpor policy check`` and ``torpor policy explain``: a policy file, before any agent runs under it.

The pure engine of :mod:`policies` answers both; nothing here opens a store.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from host.cli.common import EXIT_FAILED, EXIT_OK, JSON_HELP, STORE_HELP, emit, parse_input

TITLE = "policy: check and explain policy files"


def policy_of(path: str) -> Any:
    """The policy of ``path``: a policy file, or a bundle (its policy, as a host would run it)."""
    import policies

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""  # load_policy reports it
    if head == b"PK\x03\x04":  # a bundle (a zip archive)
        from host.sandbox import bundle as bundle_mod

        return bundle_mod.load(path).policy
    return policies.load_policy(path)


def cmd_policy_check(args: argparse.Namespace) -> int:
    """Validate a policy file and summarise what it grants; hold its MCP servers against this
    host's operator config (and, with ``--connect``, against what each server lists)."""
    from host.cli.common import operator_config
    from host.tools import mcp_config

    pol = policy_of(args.file)
    operator = operator_config(args) if pol.mcp else mcp_config.EMPTY
    found = mcp_config.check(pol, operator)
    data: dict[str, Any] = {"file": args.file, "ok": not found.errors, "agent": pol.agent.name,
                            "tools": sorted(pol.grants), "digest": pol.digest, "notes": found.notes}
    if pol.mcp:
        data["operator_config"] = operator.source
    messages = list(found.errors)
    listings: dict[str, Any] = {}
    if getattr(args, "connect", False) and pol.mcp:
        import anyio

        from host.cli.mcp import quiet_supervisor, server_secrets
        from host.tools import mcp_catalog

        secrets: dict[str, str] = {}
        for spec in pol.mcp.values():
            secrets.update(server_secrets(args, spec))
        try:
            with quiet_supervisor():
                listings = anyio.run(mcp_catalog.list_policy_servers, pol, secrets, operator)
        finally:
            mcp_catalog.shutdown()
        # A server this host does not configure was reported above, not again as one that could not be asked.
        unconfigured = {n for n, s in pol.mcp.items() if n not in operator.servers and not s.self_started}
        issues = mcp_catalog.grant_issues(pol, {n: lst for n, lst in listings.items() if n not in unconfigured})
        messages += [i.message for i in issues]
        data.update(ok=not messages, servers={n: lst.to_dict() for n, lst in listings.items()},
                    issues=[{"message": i.message, "field": i.field, "suggestion": i.suggestion} for i in issues])
    if found.errors:
        data["errors"] = found.errors

    def human() -> None:
        for note in found.notes:
            print(f"{args.file}: note: {note}")
        if messages:
            for m in messages:
                print(f"{args.file}: {m}")
            return
        print(f"{args.file}: ok\n{pol.summary()}")
        for n, lst in listings.items():
            print(f"mcp.{n} ({lst.where}): every grant is a tool it offers ({len(lst.tools)} tools)")

    emit(args, data, human)
    return EXIT_OK if not messages else EXIT_FAILED


def cmd_policy_explain(args: argparse.Namespace) -> int:
    """The decision on one tool call, with every rule that took part in it."""
    import policies

    pol = policies.load_policy(args.file)
    req_args = parse_input(args.args, "--args")
    req = policies.ToolRequest(agent_id=args.agent or "explain", tool=args.tool, args=req_args, call_seq=1,
                               agent_name=pol.agent.name, principal=args.tenant, tenant=args.tenant)
    usage = policies.Usage()
    keys = policies.aggregate_keys(pol, req)
    if args.store and keys:  # the limits shared beyond one call, as the store counts them now
        from host.cli.common import existing_store
        from host.runtime.budgets import read_shared
        from snapshots.lmdb_store import LmdbStore

        store = LmdbStore.open(existing_store(args) / "db", readonly=True)
        try:
            with store.read() as txn:
                usage = policies.Usage(shared=read_shared(txn, keys))
        finally:
            store.close()
    exp = policies.explain(pol, req, usage, time.time())
    emit(args, exp.to_dict(), lambda: print(str(exp)))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``policy check`` and ``policy explain``."""
    pol = sub.add_parser("policy", help="check and explain policy files", description="check and explain policy files")
    psub = pol.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    check_help = ("validate a policy file (or a bundle's policy) and hold the MCP servers it names against this host's "
                  "operator config (exit 1 when one is not configured)")
    sp = psub.add_parser("check", help=check_help, description=check_help)
    sp.add_argument("file", help="a policy.toml, or a bundle")
    sp.add_argument("--connect", action="store_true",
                    help="start or connect to each [mcp.NAME] server and check every grant against the tools it lists "
                         "(exit 1 when one is not offered)")
    sp.add_argument("--store", default=None, help=STORE_HELP + " (with --connect: its vault fills servers' credentials)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_policy_check)
    explain_help = "show the decision for a tool call and every rule behind it"
    sp = psub.add_parser("explain", help=explain_help, description=explain_help)
    sp.add_argument("file", help="a policy.toml")
    sp.add_argument("--tool", required=True, help="the tool name")
    sp.add_argument("--args", default="{}", help="JSON arguments")
    sp.add_argument("--tenant", default=None, help="the principal the call is made for (the tenant scope of limits)")
    sp.add_argument("--agent", default=None, help="the agent id the call is made by (the agent and run scopes)")
    sp.add_argument("--store", default=None,
                    help="read the limits shared beyond one call (scope run, agent, policy, tenant) from this store")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_policy_explain)
