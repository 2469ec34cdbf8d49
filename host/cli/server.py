"""``torpor serve`` and ``torpor tokens``: the long-running host and the keys to it.

``serve`` imports :mod:`host.server` (Starlette, uvicorn) only when it runs, so that
``torpor --help`` and the other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from host.cli.common import EXIT_OK, MAX_MEMORY_HELP, add_command, emit, iso, open_host, store_dir
from host.errors import ConfigError

TITLE = "server: serve agents over HTTP, and its operator tokens"
DEFAULT_LISTEN = "127.0.0.1:8700"


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ConfigError(f"--listen {text!r}: use HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]"), int(port)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the store's agents over HTTP until SIGTERM or Ctrl-C, then drain."""
    address, port = _listen(args.listen)
    for name in ("max_body_bytes", "token_burst", "tenant_burst"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("token_rate", "tenant_rate", "drain_timeout"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive number")
    from host.server.app import bind, create_app, serve
    from host.server.config import ServerConfig

    overrides: dict[str, Any] = {k: getattr(args, k) for k in (
        "max_body_bytes", "token_rate", "token_burst", "tenant_rate", "tenant_burst", "drain_timeout")
        if getattr(args, k) is not None}
    if args.mcp:
        overrides["mcp"] = True
    if getattr(args, "work_slots", None) is not None:
        if args.work_slots < 0:
            raise ConfigError("--work-slots must be 0 or more")
        overrides["work_slots"] = args.work_slots
    sock = bind(address, port)  # before "listening": a port in use is one line, exit 2
    port = sock.getsockname()[1]  # the port 0 chose
    try:
        host = open_host(args)
    except BaseException:
        sock.close()
        raise
    try:
        app = create_app(host, config=ServerConfig(**overrides))
        traces = ", traces over OTLP" if host.tracing is not None else ""
        mcp_at = f"; MCP at http://{address}:{port}/mcp" if args.mcp else ""
        print(f"torpor serve: listening on http://{address}:{port} (store {host.store_dir}; the console at "
              f"http://{address}:{port}/{traces}{mcp_at})", file=sys.stderr, flush=True)
        status = serve(app, host=address, port=port, log_level=args.log_level, sock=sock)
    finally:
        host.close()
        sock.close()
    print("torpor serve: stopped", file=sys.stderr, flush=True)
    return status


def _token_store(args: argparse.Namespace, *, create: bool) -> Any:
    from host.cli.common import existing_store, is_fleet, open_fleet_store
    from snapshots.lmdb_store import LmdbStore

    if is_fleet(args):
        return open_fleet_store(args)
    if create:
        d = store_dir(args)
        try:
            (d / "db").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the store directory {d}: {exc.strerror}") from exc
        return LmdbStore.open(d / "db")
    return LmdbStore.open(existing_store(args) / "db", create=False)


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """Issue an operator token; its secret is printed once, and only its hash is kept."""
    from host.trust import operator_tokens

    expires = operator_tokens.parse_expiry(args.expires) if args.expires else None
    store = _token_store(args, create=True)
    try:
        secret, token = operator_tokens.create(store, tenant=args.tenant, scopes=args.scope or [], name=args.name,
                                               expires_at=expires)
    finally:
        store.close()

    def human() -> None:
        print(secret)
        print(f"token {token.token_id}: tenant {token.tenant}, scopes {' '.join(token.scopes)}, "
              f"expires {iso(token.expires_at) if token.expires_at else 'never'} (the secret above is shown once)",
              file=sys.stderr)

    emit(args, {"secret": secret, **token.to_dict()}, human)
    return EXIT_OK


def cmd_tokens_list(args: argparse.Namespace) -> int:
    """Every operator token (never a secret), with its state."""
    import time

    from host.trust import operator_tokens

    store = _token_store(args, create=False)
    try:
        found = operator_tokens.tokens(store)
    finally:
        store.close()
    now = time.time()
    rows = [{**t.to_dict(), "state": t.state(now)} for t in found]

    def human() -> None:
        if not rows:
            print("no operator tokens (`torpor tokens create`)")
        for r in rows:
            print(f"{r['token_id']}  {r['state']:8}  {r['tenant']:16}  {' '.join(r['scopes']):40}  "
                  f"{r['name'] or '-'}  expires {iso(r['expires_at']) if r['expires_at'] else 'never'}")

    emit(args, rows, human)
    return EXIT_OK


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    """Revoke an operator token: the next request with it is refused (401)."""
    from host.trust import operator_tokens

    store = _token_store(args, create=False)
    try:
        token = operator_tokens.revoke(store, args.token_id)
    finally:
        store.close()
    emit(args, token.to_dict(), lambda: print(f"token {token.token_id}: revoked at {iso(token.revoked_at)}"))
    return EXIT_OK


def cmd_fleet_status(args: argparse.Namespace) -> int:
    """The fleet's hosts (their leases, live or expired) and the agents each holds."""
    import time

    from host.cli.common import is_fleet, open_fleet_store
    from host.runtime.agent import TERMINAL
    from host.runtime.leases import HostLease

    if not is_fleet(args):
        raise ConfigError("torpor fleet status needs --store nats://host:port[,host:port...] (a fleet store)")
    store = open_fleet_store(args)
    try:
        seq = store.sync()
        now = time.time()
        leases = HostLease.holders(store, now)
        held: dict[str, int] = {}
        statuses: dict[str, int] = {}
        with store.read() as r:
            for rec in r.iter_agents():
                status = str(rec.get("status"))
                statuses[status] = statuses.get(status, 0) + 1
                lease = (rec.get("owner") or {}).get("lease")
                if lease is not None and status not in TERMINAL:
                    held[lease] = held.get(lease, 0) + 1
        work = store.work_state()  # the work queue's depth: runs and wake-ups not yet taken, taken not done
    finally:
        store.close()
    hosts = [{"lease": h["lease"], "host": h.get("host"), "pid": h.get("pid"), "live": h["live"],
              "expires_in_s": round(float(h.get("expires_at", now)) - now, 2), "agents": held.get(h["lease"], 0)}
             for h in leases]
    orphaned = sum(n for lease, n in held.items() if not any(h["lease"] == lease and h["live"] for h in hosts))
    out = {"stream": store.stream, "sequence": seq, "hosts": hosts, "agents": statuses, "orphaned": orphaned,
           "work": work}

    def human() -> None:
        print(f"stream {store.stream} at sequence {seq}; agents: "
              + (", ".join(f"{n} {st}" for st, n in sorted(statuses.items())) or "none"))
        if not hosts:
            print("no hosts hold a lease")
        for h in hosts:
            state = f"live, {h['expires_in_s']:.1f} s left" if h["live"] else "EXPIRED"
            print(f"{h['lease']:40} {state:22} {h['agents']} unfinished agents")
        if orphaned:
            print(f"{orphaned} unfinished agents held under expired leases: a live host takes them over")
        if work is not None:
            print(f"work queue: {work['pending']} waiting, {work['unacknowledged']} taken by hosts and not done, "
                  f"{work['redelivered']} delivered again")

    emit(args, out, human)
    return EXIT_OK


def _fleet_options(sp: argparse.ArgumentParser) -> None:
    """The options of a fleet store (``--store nats://host:port[,host:port...]``)."""
    sp.add_argument("--local-dir", default=None, metavar="DIR",
                    help="with --store nats://...: this host's own directory (its copy of the store, compile "
                         "cache, signing key); default the user data dir's fleet/")
    sp.add_argument("--stream", default=None, metavar="NAME", help="with --store nats://...: the JetStream "
                    "stream that holds the store (default TORPOR)")
    sp.add_argument("--replicas", type=int, default=None, metavar="N",
                    help="with --store nats://...: copies of the stream when it is created (default 3)")
    sp.add_argument("--lease", type=float, default=None, metavar="S",
                    help="with --store nats://...: this host's lease; its agents are taken over by another "
                         "host once it has not renewed it for S seconds (default 3)")


def add_parsers(sub: Any) -> None:
    sp = add_command(sub, "serve", cmd_serve, "serve the store's agents over an authenticated HTTP API "
                     "(runs, approvals, audit, events) until SIGTERM, then drain", store=True, writes=True, runs=True)
    sp.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                    help=f"the address to listen on (default {DEFAULT_LISTEN})")
    sp.add_argument("--max-memory", default=None, metavar="SIZE", help=MAX_MEMORY_HELP)
    sp.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                    help="the largest request body taken, bundle uploads aside (default 1 MiB)")
    sp.add_argument("--token-rate", type=float, default=None, metavar="R",
                    help="requests per second per operator token (default 100)")
    sp.add_argument("--token-burst", type=int, default=None, metavar="N", help="burst per token (default 500)")
    sp.add_argument("--tenant-rate", type=float, default=None, metavar="R",
                    help="requests per second per tenant (default 500)")
    sp.add_argument("--tenant-burst", type=int, default=None, metavar="N", help="burst per tenant (default 2000)")
    sp.add_argument("--drain-timeout", type=float, default=None, metavar="S",
                    help="on SIGTERM, how long running agents may go on before they are interrupted at their "
                         "next safe point, left at their last checkpoint (default 10)")
    sp.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                    help="the server's log level (default warning)")
    sp.add_argument("--mcp", action="store_true",
                    help="also offer every registry agent of the caller's tenant as an MCP tool at /mcp (streamable "
                         "HTTP, behind the same operator tokens: runs:read lists, runs:write calls)")
    _fleet_options(sp)
    sp.add_argument("--work-slots", type=int, default=None, metavar="N",
                    help="with --store nats://...: how many agents this host takes from the fleet's work queue at "
                         "once (default its pool's size; 0: a gateway only, which accepts work and drives none)")

    fl = sub.add_parser("fleet", help="the hosts of a fleet store (--store nats://...) and their agents",
                        description="the hosts of a fleet store (--store nats://...) and their agents")
    fsub = fl.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    sp = add_command(fsub, "status", cmd_fleet_status, "each host's lease (live or expired) and the unfinished "
                     "agents it holds", store=True)
    _fleet_options(sp)

    tok = sub.add_parser("tokens", help="create, list and revoke operator tokens for `torpor serve`",
                         description="create, list and revoke operator tokens for `torpor serve`")
    tsub = tok.add_subparsers(dest="tokens_command", metavar="SUBCOMMAND")
    sp = add_command(tsub, "create", cmd_tokens_create, "issue an operator token (the secret is printed once)",
                     store=True)
    sp.add_argument("--tenant", required=True, help="the tenant the token acts for: it sees only its agents")
    sp.add_argument("--scope", action="append", metavar="SCOPE",
                    help="a scope it grants (repeatable): runs:write, runs:read, approvals:write, registry:write, "
                         "admin")
    sp.add_argument("--expires", default=None, metavar="AGE", help="it expires after this long: 90s, 15m, 12h, 30d")
    sp.add_argument("--name", default=None, help="a name to tell it apart in `torpor tokens list`")
    _fleet_options(sp)
    add_command(tsub, "list", cmd_tokens_list, "list operator tokens and their state (never their secrets)", store=True)
    sp = add_command(tsub, "revoke", cmd_tokens_revoke, "revoke an operator token", store=True)
    sp.add_argument("token_id", metavar="TOKEN_ID", help="the token's id (tok_..., see `torpor tokens list`)")
