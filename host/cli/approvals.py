"""``torpor approvals``, ``approve``, ``deny`` and ``resolve``: the decisions only a person makes.

An agent parked on a person holds nothing but its checkpoint, so any process may
decide: each command opens the store, decides, resumes the agent and prints its result;
against a server (``--server``), the server records the decision and resumes the agent,
and the command waits for it to end or park again.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from host.cli import remote
from host.cli.common import (
    AGENT_HELP,
    EXIT_OK,
    add_command,
    decided_by,
    emit,
    iso,
    open_host,
    open_store,
    parse_input,
    print_result,
    result_exit,
)

if TYPE_CHECKING:
    from host.runtime import Host, RunResult
    from host.server.client import Client

TITLE = "approvals: decide what agents wait on"


def cmd_approvals(args: argparse.Namespace) -> int:
    """The tool calls waiting for a person, with the rule that asked."""
    def locally() -> list[dict[str, Any]]:
        from host.runtime import queries

        with open_store(args, readonly=True) as store:
            return queries.approvals(store)

    pending = remote.either(args, lambda client: client.approvals(), locally)

    def human() -> None:
        if not pending:
            print("no pending approvals")
        for p in pending:
            call = p.get("call", {})
            print(f"{p['agent_id']}  {p.get('name')}  {iso(p.get('requested_at', 0))}")
            print(f"  call   {call.get('tool')} {json.dumps(call.get('args'))}")
            question = p.get("question") if p.get("kind") == "elicitation" else None
            if isinstance(question, dict):  # a server's question for a person: answered, not approved
                print(f"  asks   {question.get('server')}: {question.get('message')}")
                print(f"  schema {json.dumps(question.get('requested_schema'), separators=(',', ':'))}")
                print(f"  answer torpor approve {p['agent_id']} --answer JSON  (torpor deny declines)")
            else:
                print(f"  reason {p.get('reason')}  (rule {p.get('rule')})")

    emit(args, pending, human)
    return EXIT_OK


def _drive(args: argparse.Namespace, action: Callable[[Host], Awaitable[RunResult]]) -> int:
    """Open the host, drive one agent with ``action(host)``, print the result, map it to an exit code."""
    from host.runtime import run_sync

    host = open_host(args)
    try:
        res = run_sync(lambda: action(host))
    finally:
        host.close()
    emit(args, res.to_dict(), lambda: print_result(res))
    return result_exit(res)


def _decided(args: argparse.Namespace, decide: Callable[[Client], dict[str, Any]]) -> int:
    """Against a server: record the decision there (it resumes the agent in the background),
    wait for the agent to end or park again, and print it as a local decision does."""
    client = remote.connect(args, local_only=("by",))  # the server records the token as who decided
    assert client is not None
    with client:
        res = remote.result_of(remote.until_stopped(client, decide(client)))
    emit(args, res.to_dict(), lambda: print_result(res))
    return result_exit(res)


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve the call the agent waits on, and resume it."""
    answer = parse_input(args.answer, "--answer") if args.answer is not None else None
    if remote.server_url(args):
        return _decided(args, lambda client: client.approve(args.agent, note=args.note, answer=answer))
    return _drive(args, lambda host: host.approve(args.agent, note=args.note, by=decided_by(args), answer=answer))


def cmd_deny(args: argparse.Namespace) -> int:
    """Deny the call the agent waits on; the agent gets a denial it can act on."""
    if remote.server_url(args):
        return _decided(args, lambda client: client.deny(args.agent, reason=args.reason))
    return _drive(args, lambda host: host.deny(args.agent, reason=args.reason, by=decided_by(args)))



def cmd_resolve(args: argparse.Namespace) -> int:
    """Settle a call cut short mid-flight (in_doubt): retry it, supply its result, or fail the agent."""
    result = parse_input(args.result, "--result") if args.result is not None else None
    if remote.server_url(args):
        return _decided(args, lambda client: client.resolve(args.agent, retry=args.retry, result=result,
                                                            fail=args.fail))
    return _drive(args, lambda host: host.resolve(args.agent, retry=args.retry, result=result, fail=args.fail,
                                                  by=decided_by(args)))


def add_parsers(sub: Any) -> None:
    """Register ``approvals``, ``approve``, ``deny`` and ``resolve``."""
    by_help = "who decides, kept in the audit log (default: $USER)"
    add_command(sub, "approvals", cmd_approvals, "list tool calls waiting for a human decision", store=True)
    sp = add_command(sub, "approve", cmd_approve, "approve the call an agent waits on, and resume it",
                     store=True, writes=True, runs=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp.add_argument("--note", help="a note kept in the audit log")
    sp.add_argument("--answer", metavar="JSON",
                    help="the answer to the question the agent waits on (an MCP server's elicitation), as JSON or "
                         "@FILE; checked against the schema the server asked for")
    sp.add_argument("--by", default=None, help=by_help)
    sp = add_command(sub, "deny", cmd_deny, "deny the call an agent waits on (or decline the question it waits on); "
                     "the agent sees a denial and continues",
                     store=True, writes=True, runs=True)
    sp.add_argument("agent", help=AGENT_HELP)
    sp.add_argument("--reason", required=True, help="why; the agent sees it in the denial")
    sp.add_argument("--by", default=None, help=by_help)
    sp = add_command(sub, "resolve", cmd_resolve,
                     "settle an in_doubt agent: re-run its call, supply its result, or fail it", store=True, writes=True,
                     runs=True)
    sp.add_argument("agent", help=AGENT_HELP)
    how = sp.add_mutually_exclusive_group(required=True)
    how.add_argument("--retry", action="store_true", help="run the call again (it did not take effect)")
    how.add_argument("--result", help="the call's result as JSON, or @FILE (it did take effect)")
    how.add_argument("--fail", metavar="REASON", help="fail the agent")
    sp.add_argument("--by", default=None, help=by_help)
