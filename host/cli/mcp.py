"""``torpor mcp tools``: what an MCP server offers, asked of the server; ``torpor mcp serve``:
this store's agents offered to MCP clients over stdio (:mod:`host.server.mcp_local`).

The server is one the operator config names (``[mcp.servers.NAME]`` of ``torpor.toml``),
started or reached as a run would, for a policy (``--policy FILE``, its ``[mcp.NAME]``)
or a bundle's policy (``--bundle FILE``) or for none; or a URL (a streamable-HTTP
endpoint).  Its credentials, when its ``env`` or ``headers`` name some, come from the
store's vault, as for a run: those the policy grants it, or, with no policy, those the
operator config names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from host.cli.common import EXIT_OK, JSON_HELP, STORE_HELP, emit

TITLE = "mcp: MCP servers"


def server_secrets(args: argparse.Namespace, spec: Any) -> dict[str, str]:
    """The credentials ``[mcp.NAME]`` names, read from the store's vault (none: no vault read)."""
    return _vault_secrets(args, tuple(spec.credentials))


def _vault_secrets(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, str]:
    if not names:
        return {}
    from host.cli.common import store_dir
    from host.trust.vault import Vault

    values: dict[str, str] = Vault(store_dir(args), key_file=getattr(args, "key_file", None)).get_many(names)
    return values


@contextlib.contextmanager
def quiet_supervisor() -> Iterator[None]:
    """The command reports a server that cannot be asked itself, in one line: the
    supervisor's own warning about it would say the same again."""
    import logging

    logger = logging.getLogger("torpor.mcp")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _server_spec(args: argparse.Namespace, operator: Any) -> tuple[str, Any]:
    """``(name, [mcp.NAME] spec)`` of the server the command names (with no policy, an empty
    one granting all of the operator config's placeholders)."""
    from host.errors import ConfigError, InvalidInput
    from policies.schema import McpServer

    target = str(args.target)
    if target.startswith(("http://", "https://")):  # a URL server: not from a policy
        if args.policy or args.bundle:
            raise InvalidInput("give a server URL, or a server name with --policy/--bundle, not both")
        headers = {}
        for h in args.header or ():
            k, sep, v = h.partition(":")
            if not sep:
                raise InvalidInput(f"--header {h!r}: write it as 'Name: value'")
            headers[k.strip()] = v.strip()
        try:
            return "url", McpServer(url=target, headers=headers)
        except ValueError as exc:
            raise InvalidInput(f"{target}: {exc}") from None
    if args.policy and args.bundle:
        raise InvalidInput(f"{target}: name the policy (--policy FILE) or the bundle (--bundle FILE), not both")
    if not args.policy and not args.bundle:
        from policies.schema import placeholders

        op = operator.servers.get(target)
        if op is None:
            known = ", ".join(sorted(operator.servers)) or "none"
            raise ConfigError(f"the operator config ({operator.where()}) configures no MCP server {target!r} (its "
                              f"servers: {known}); name the policy (--policy FILE) or bundle (--bundle FILE) that "
                              "has it, or give the server's URL")
        used = sorted({ph for v in (*op.env.values(), *op.headers.values()) for ph in placeholders(v)})
        return target, McpServer(credentials=tuple(used))
    if args.policy:
        import policies

        pol = policies.load_policy(args.policy)
        source = args.policy
    else:
        from host.sandbox import bundle as bundle_mod

        pol = bundle_mod.load(args.bundle).policy
        source = args.bundle
    if target not in pol.mcp:
        known = ", ".join(sorted(pol.mcp)) or "none"
        raise ConfigError(f"{source} names no MCP server {target!r} (its servers: {known})")
    return target, pol.mcp[target]


def cmd_mcp_tools(args: argparse.Namespace) -> int:
    """List a server's tools with their input and output schemas and annotations."""
    import anyio

    from host.cli.common import operator_config
    from host.errors import McpServerError
    from host.tools import mcp_catalog

    operator = operator_config(args)
    name, spec = _server_spec(args, operator)
    try:
        with quiet_supervisor():
            listing = anyio.run(mcp_catalog.list_server, name, spec, server_secrets(args, spec), operator)
    finally:
        mcp_catalog.shutdown()
    if listing.error is not None:
        raise McpServerError(listing.error)
    emit(args, listing.to_dict(), lambda: _print_listing(listing))
    return EXIT_OK


def _print_listing(listing: Any) -> None:
    print(f"{listing.server} ({listing.where}): {len(listing.tools)} tools")
    for t in listing.tools:
        notes = [k for k, v in sorted((t.get("annotations") or {}).items()) if k.endswith("Hint") and v is True]
        print(f"  {t['name']}" + (f"  [{', '.join(notes)}]" if notes else ""))
        if t.get("description"):
            print(f"      {str(t['description']).splitlines()[0]}")
        print(f"      input:  {json.dumps(t.get('input_schema'), sort_keys=True)}")
        if t.get("output_schema") is not None:
            print(f"      output: {json.dumps(t['output_schema'], sort_keys=True)}")
        if t.get("schema_error"):
            print(f"      schema error: {t['schema_error']}")


def cmd_mcp_serve(args: argparse.Namespace) -> int:
    """Offer the store's registry agents as MCP tools over stdio until the client closes stdin."""
    import anyio

    from host.cli.common import open_host
    from host.server.mcp_local import LocalMcp

    host = open_host(args)
    try:
        anyio.run(LocalMcp(host).serve)
    finally:
        host.close()
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``mcp tools`` and ``mcp serve``."""
    top = sub.add_parser("mcp", help="ask MCP servers what they offer", description="ask MCP servers what they offer")
    msub = top.add_subparsers(dest="mcp_command", metavar="SUBCOMMAND")
    text = "list an MCP server's tools, with their input and output schemas and annotations"
    sp = msub.add_parser("tools", help=text, description=text)
    sp.add_argument("target", metavar="SERVER", help="a server name of the operator config (torpor --config FILE) "
                                                     "or of --policy/--bundle, or a streamable-HTTP URL")
    sp.add_argument("--policy", default=None, metavar="FILE",
                    help="the policy.toml whose [mcp.SERVER] to start (as this host's operator config provides it)")
    sp.add_argument("--bundle", default=None, metavar="FILE", help="the bundle whose policy's [mcp.SERVER] to start")
    sp.add_argument("--header", action="append", default=None, metavar="'NAME: VALUE'",
                    help="an HTTP header sent to a URL server (repeatable)")
    sp.add_argument("--store", default=None, help=STORE_HELP + " (its vault fills the server's credentials)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_mcp_tools)
    text = ("offer the store's registry agents as MCP tools over stdio (for an MCP client that starts "
            "`torpor mcp serve`); a call runs the agent here and answers with its output")
    sp = msub.add_parser("serve", help=text, description=text)
    sp.add_argument("--store", default=None, help=STORE_HELP)
    sp.add_argument("--tools-dir", action="append", default=None, metavar="DIR",
                    help="a directory of operator tools the agents' policies name (repeatable; see `torpor run`)")
    sp.add_argument("--trust-bundle-code", action="append", default=None, metavar="DIGEST",
                    help="run the host code the bundle with this digest carries (repeatable; see `torpor run`)")
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    sp.set_defaults(fn=cmd_mcp_serve)
