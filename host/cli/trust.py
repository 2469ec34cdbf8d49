"""``torpor secrets``, ``torpor audit``, ``torpor replay`` and ``torpor identity``.

Registered by :func:`add_parsers` from :func:`host.cli.build_parser`. Like the
rest of the CLI, every command takes ``--json`` and ``--store``; errors are
typed (:class:`~host.errors.TorporError`) and become one line and exit 2.
Verification commands exit 1 when they find tampering or a mismatch, so a
script can tell "the log is broken" from "the command could not run".

Secret values are read from stdin (or ``--value-file``), never from the
command line, where they would land in shell history and ``ps`` output; and
no command ever prints one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from host.cli import remote
from host.cli.common import (
    EXIT_ATTENTION,
    EXIT_FAILED,
    EXIT_OK,
    add_command,
    emit,
    existing_store,
    iso,
    open_store,
    report_attention,
    store_dir,
)
from host.errors import ConfigError, TorporError

TITLE = "trust: secrets, audit, replay and identity"


def _pinned_keys(args: argparse.Namespace) -> dict[str, Any] | None:
    """Keys given with --public-key (PEM file, or base64url text), by key id."""
    from host.trust.identity import key_id, public_key_from, public_raw

    values = getattr(args, "public_key", None) or []
    if not values:
        return None
    keys: dict[str, Any] = {}
    for v in values:
        p = Path(v)
        text = p.read_text() if p.exists() else v
        pub = public_key_from(text)
        keys[key_id(public_raw(pub))] = pub
    return keys


# -- secrets --------------------------------------------------------------------------------------------------
def _vault(args: argparse.Namespace) -> Any:
    from host.trust.vault import Vault

    return Vault(store_dir(args), key_file=getattr(args, "key_file", None))


def _read_value(args: argparse.Namespace) -> str:
    src = args.value_file
    if src and src != "-":
        try:
            data = Path(src).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--value-file {src}: cannot read ({exc.strerror})") from exc
    elif sys.stdin.isatty() and not src:
        import getpass

        data = getpass.getpass(f"value for {args.name} (not echoed): ").encode()
    else:
        data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("the secret value is not UTF-8 text") from exc
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    return text


def cmd_secrets_set(args: argparse.Namespace) -> int:
    info = _vault(args).set(args.name, _read_value(args), hosts=tuple(args.host or ()))
    bound = f", bound to {', '.join(info.hosts)}" if info.hosts else ""
    emit(args, info.to_dict(), lambda: print(f"secret {info.name} stored (version {info.version}{bound})"))
    return EXIT_OK


def cmd_secrets_list(args: argparse.Namespace) -> int:
    v = _vault(args)
    items = [i.to_dict() for i in v.list()]

    def human() -> None:
        if not items:
            print(f"no secrets in {v.path}")
            return
        print(f"{'NAME':32}  {'VERSION':>7}  {'CREATED':19}  {'UPDATED':19}  HOSTS")
        for i in items:
            print(f"{i['name']:32}  {i['version']:>7}  {iso(i['created_at']):19}  {iso(i['updated_at']):19}  "
                  f"{', '.join(i['hosts']) or '(any the grant allows)'}")

    emit(args, items, human)
    return EXIT_OK


def cmd_secrets_rm(args: argparse.Namespace) -> int:
    from host.trust.vault import SecretNotFound

    if not _vault(args).remove(args.name):
        raise SecretNotFound(f"no secret {args.name} in the vault")
    emit(args, {"name": args.name, "removed": True}, lambda: print(f"secret {args.name} removed"))
    return EXIT_OK


def cmd_secrets_keygen(args: argparse.Namespace) -> int:
    from host.trust.vault import generate_key

    key = generate_key()
    emit(args, {"key": key}, lambda: print(key))
    return EXIT_OK


# -- audit ----------------------------------------------------------------------------------------------------
def cmd_audit_show(args: argparse.Namespace) -> int:
    from host.trust import audit

    client = remote.connect(args, local_only=("payloads",))  # the journal is not served over HTTP
    if client is not None:
        with client:
            # A host chain (host.gateway, host.registry) has records but no agent record.
            rec: dict[str, Any] | None = None if args.agent.startswith(audit.host_chain("")) else client.agent(args.agent)
            recs = client.audit_records(args.agent)
            report = audit.VerifyReport.from_dict(client.verify_audit(args.agent))
        journal: dict[int, Any] = {}
    else:
        with open_store(args, readonly=True) as store:
            with store.read() as txn:
                rec = txn.get_agent(args.agent)
                journal = dict(txn.iter_journal(args.agent)) if args.payloads else {}
            recs = audit.records(store, args.agent)
            if rec is None and not recs:
                raise TorporError(f"no agent {args.agent} in store {store_dir(args)}", code="agent_not_found")
            report = audit.verify_store(store, agent_id=args.agent)
    # "stalled" is what a server's get_agent adds to the record: the stored record is shown
    hidden = ("input_raw", "owner", "stalled")
    data = {"agent_id": args.agent, "agent": {k: v for k, v in (rec or {}).items() if k not in hidden},
            "records": recs, "verify": report.to_dict()}
    if args.payloads:
        data["journal"] = {str(k): v for k, v in journal.items()}

    def human() -> None:
        if rec is not None:
            who = f" on behalf of {rec['principal']}" if rec.get("principal") else ""
            parent = f", forked from {rec['parent']['agent_id']}" if rec.get("parent") else ""
            print(f"agent {args.agent} ({rec.get('name')}, bundle {str(rec.get('bundle_digest'))[:16]}){who}{parent}: "
                  f"{rec.get('status')}")
        shown: set[int] = set()
        for line, r in zip(audit.trace_lines(recs), recs, strict=True):
            print(line)
            cs = r.get("call_seq")
            if args.payloads and r.get("kind") == "tool.requested" and isinstance(cs, int) and cs in journal \
                    and cs not in shown:
                shown.add(cs)
                e = journal[cs]
                print(f"{'':34} args {json.dumps(e.get('args'))}")
                if "response" in e:
                    print(f"{'':34} answer [{e.get('status')}] {e.get('response')}")
        print(("chain intact" if report.ok else "chain BROKEN: " + report.first.message if report.first else "")
              + f" ({len(recs)} records)")

    emit(args, data, human)
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from host.trust import audit

    if args.file:
        if remote.server_url(args):
            raise ConfigError("--file verifies an export here, not on a server: drop --server (or $TORPOR_SERVER)")
        pinned = _pinned_keys(args)
        if pinned is None and args.store:
            with open_store(args, readonly=True) as store, store.read() as txn:
                pinned = audit._trusted_keys(txn, None) or None
        try:
            f = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"cannot read {args.file}: {exc.strerror}") from exc
        with f:
            report = audit.verify_export(f, public_keys=pinned)
        report.source = f"export {args.file}"
    elif (client := remote.connect(args, local_only=("public_key",))) is not None:
        # One agent's chain (of the token's tenant), a host chain, or the server's whole store
        # (those two need a token with the scope admin): the report of the same check.
        with client:
            report = audit.VerifyReport.from_dict(client.verify_audit(args.agent))
        report.source = f"server {client.url}"
    else:
        with open_store(args, readonly=True) as store:
            report = audit.verify_store(store, public_keys=_pinned_keys(args), agent_id=args.agent)
        report.source = f"store {store_dir(args)}"

    damaged = report.attention()

    def human() -> None:
        print(report.summary())
        for p in report.problems[1:10]:
            print(f"  also: {p.message}")
        for n in report.notes:
            print(f"  note: {n}")
        report_attention(damaged)

    emit(args, report.to_dict(), human)
    if args.file or report.store_wide:
        return EXIT_OK if report.ok else EXIT_FAILED
    # In a store, damage confined to some agents' chains or records: they need attention,
    # the others verified.
    return EXIT_ATTENTION if damaged else EXIT_OK if report.ok else EXIT_FAILED


def cmd_audit_export(args: argparse.Namespace) -> int:
    from host.trust import audit
    from host.trust.identity import HostKey

    since = audit.parse_time(args.since) if args.since else None
    key = HostKey.load_or_create(store_dir(args))
    with open_store(args, readonly=False) as store:
        if args.output and args.output != "-":
            try:
                with open(args.output, "wb") as out:
                    summary = audit.export(store, out, key, since=since, agent_id=args.agent)
            except OSError as exc:
                raise ConfigError(f"cannot write {args.output}: {exc.strerror}") from exc
            summary["file"] = args.output
            emit(args, summary, lambda: print(f"exported {summary['records']} records of {summary['agents']} agents "
                                               f"to {args.output}", file=sys.stderr))
        else:
            summary = audit.export(store, sys.stdout.buffer, key, since=since, agent_id=args.agent)
            sys.stdout.buffer.flush()
            print(f"exported {summary['records']} records of {summary['agents']} agents", file=sys.stderr)
    return EXIT_OK


def cmd_audit_seal(args: argparse.Namespace) -> int:
    from host.trust import audit
    from host.trust.identity import HostKey

    key = HostKey.load_or_create(store_dir(args))
    with open_store(args, readonly=False) as store:
        head = store.transact(lambda txn: audit.seal_head(txn, key))
    data = {"sealed": head is not None, "head": head}
    emit(args, data, lambda: print(
        f"signed head {head['seq']}: {head['agents']} agents, {head['count']} records, key {head['key_id']}"
        if head else "nothing changed since the last signed head"))
    return EXIT_OK


def cmd_audit_prune(args: argparse.Namespace) -> int:
    from host.trust import audit
    from host.trust.identity import HostKey

    before = audit.parse_time(args.before)
    if before > time.time():
        raise ConfigError("--before is in the future; pruning keeps records at or after it")
    key = HostKey.load_or_create(store_dir(args))
    with open_store(args, readonly=False) as store:
        result = audit.prune(store, key, before=before, agent_id=args.agent)
        store.transact(lambda txn: audit.seal_head(txn, key))

    def human() -> None:
        print(f"pruned {result['records']} records of {result['agents']} agents older than {iso(before)}; "
              "each agent's chain now starts at a signed checkpoint")
        for r in result["refused"]:
            print(f"  refused {r['agent_id']}: {r['reason']}")

    emit(args, result, human)
    return EXIT_OK if not result["refused"] else EXIT_FAILED


# -- replay ---------------------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    from host.runtime import Host
    from host.runtime.replay import replay
    from host.sandbox import bundle as bundle_mod

    b = bundle_mod.load(args.bundle) if args.bundle else None
    host = Host(existing_store(args))
    try:
        report = replay(host, args.agent, bundle=b, cold=args.cold)
    finally:
        host.close()

    def human() -> None:
        print(report.summary())
        for m in report.mismatches:
            where = f"call {m.call_seq}" if m.call_seq is not None else "outcome"
            print(f"  {where:>9}  {m.field}: expected {json.dumps(m.expected, default=str)}, "
                  f"got {json.dumps(m.got, default=str)}")
        for n in report.notes:
            print(f"  note: {n}")
        if report.audit_ok is not None:
            print(f"  audit chain: {'intact' if report.audit_ok else 'BROKEN (see torpor audit verify)'}")

    emit(args, report.to_dict(), human)
    return EXIT_OK if report.matched else EXIT_FAILED


# -- identity -------------------------------------------------------------------------------------------------
def cmd_identity_show(args: argparse.Namespace) -> int:
    with open_store(args, readonly=True) as store, store.read() as txn:
        rec = txn.get_agent(args.agent)
        revoked = txn.get_blob("revocations", f"agent/{args.agent}")
    if rec is None:
        raise TorporError(f"no agent {args.agent} in store {store_dir(args)}", code="agent_not_found")
    ident = dict(rec.get("identity") or {})
    data = {"agent_id": args.agent, "name": rec.get("name"), "version": rec.get("bundle_digest"),
            "principal": rec.get("principal"), "parent": (rec.get("parent") or {}).get("agent_id"),
            "spawned_at": rec.get("created_at"), "terminated_at": rec.get("finished_at"), "status": rec.get("status"),
            "token": ident or None, "revoked": json.loads(revoked) if revoked else None}

    def human() -> None:
        print(f"agent      {args.agent}\nname       {data['name']}\nversion    {data['version']}")
        print(f"principal  {data['principal'] or '-'}\nparent     {data['parent'] or '-'}")
        print(f"spawned    {iso(data['spawned_at'])}\nretired    {iso(data['terminated_at'])} ({data['status']})")
        if ident:
            print(f"token      {ident.get('token_id')} (key {ident.get('key_id')}), expires {iso(ident.get('expires_at'))}")
        if data["revoked"]:
            print(f"revoked    {iso(data['revoked'].get('revoked_at'))}: {data['revoked'].get('reason')}")

    emit(args, data, human)
    return EXIT_OK


def cmd_identity_token(args: argparse.Namespace) -> int:
    from host.trust.identity import IdentityService

    with open_store(args, readonly=False) as store:
        token = IdentityService(store, store_dir(args)).token_for(args.agent)
    emit(args, {"agent_id": args.agent, "token": token}, lambda: print(token))
    return EXIT_OK


def cmd_identity_verify(args: argparse.Namespace) -> int:
    from host.trust.identity import IdentityError, verify_token

    token = sys.stdin.read().strip() if args.token == "-" else args.token
    pinned = _pinned_keys(args)
    try:
        if pinned is not None and not args.store:
            claims = verify_token(token, public_keys=pinned)
        else:
            with open_store(args, readonly=True) as store:
                claims = verify_token(token, store=store, public_keys=pinned)
    except IdentityError as exc:
        err = {"code": exc.code, "message": str(exc)}
        emit(args, {"valid": False, "error": err}, lambda: print(f"token INVALID [{err['code']}]: {err['message']}"))
        return EXIT_FAILED
    emit(args, {"valid": True, "claims": claims.to_dict()}, lambda: print(
        f"token valid: agent {claims.agent_id} ({claims.name}, version {claims.version[:16]})"
        f"{' for ' + claims.principal if claims.principal else ''}, expires {iso(claims.expires_at)}"))
    return EXIT_OK


def cmd_identity_key(args: argparse.Namespace) -> int:
    from host.trust.identity import HostKey

    key = HostKey.load_or_create(store_dir(args))
    data = {"key_id": key.key_id, "algorithm": "Ed25519", "public_key": key.public_b64(), "pem": key.public_pem()}
    emit(args, data, lambda: print(f"key id {key.key_id} (Ed25519)\n{key.public_pem()}", end=""))
    return EXIT_OK


# -- parsers --------------------------------------------------------------------------------------------------
def add_parsers(sub: Any) -> None:
    """Register ``secrets``, ``audit``, ``replay`` and ``identity`` on the CLI's subparsers."""

    def leaf(parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        return add_command(parent, name, fn, help, store=True, allow_abbrev=False)

    sec = sub.add_parser("secrets", help="the credential vault (values are never printed)",
                         description="Manage the local vault of credentials that policies grant to tools. The key "
                                     "comes from --key-file, $TORPOR_VAULT_KEY, $TORPOR_VAULT_KEY_FILE or "
                                     "STORE/vault.key (created on first use).")
    ssub = sec.add_subparsers(dest="secrets_command", metavar="SUBCOMMAND")
    sp = leaf(ssub, "set", cmd_secrets_set, "store a secret; the value comes from stdin (or --value-file), never argv")
    sp.add_argument("name", help="the secret's name, as policies give it (letters, digits, '_')")
    sp.add_argument("--value-file", help="read the value from this file ('-' for stdin); one trailing newline is dropped")
    sp.add_argument("--key-file", help="the vault key file (default: see `torpor secrets --help`)")
    sp.add_argument("--host", action="append", metavar="HOST",
                    help="bind the secret to a host it may be sent to (repeat; api.example.com, *.example.com, "
                         "127.0.0.1:8080): tools refuse to send it anywhere else, whatever a policy grants")
    leaf(ssub, "list", cmd_secrets_list, "list secret names and metadata (never values; needs no key)")
    sp = leaf(ssub, "rm", cmd_secrets_rm, "remove a secret (needs no key)")
    sp.add_argument("name", help="the secret's name")
    leaf(ssub, "keygen", cmd_secrets_keygen, "print a fresh random vault key (for TORPOR_VAULT_KEY)")

    aud = sub.add_parser("audit", help="show, verify, export and prune the tamper-evident audit log",
                         description="The audit log: hash-chained per agent, signed periodically as a whole.")
    asub = aud.add_subparsers(dest="audit_command", metavar="SUBCOMMAND")
    sp = leaf(asub, "show", cmd_audit_show, "print an agent's decision trace (exit 1 if its chain is broken)")
    sp.add_argument("agent", help="the agent id")
    sp.add_argument("--payloads", action="store_true", help="also show each call's arguments and answer from the journal")
    sp = leaf(asub, "verify", cmd_audit_verify,
              "verify the whole store (or --file EXPORT; or a server's store, with an admin token); exit 1 naming the "
              "first modified, removed, inserted or reordered record")
    sp.add_argument("--file", help="verify an export (JSON Lines; '-' for stdin) instead of the store")
    sp.add_argument("--agent", help="only this agent's chain, or a host chain such as host.gateway (not with --file)")
    sp.add_argument("--public-key", action="append",
                    help="pin the signer: a PEM file or base64url key (repeatable; default: the store's own keys)")
    sp = leaf(asub, "export", cmd_audit_export, "write the log as signed JSON Lines to stdout (or -o FILE)")
    sp.add_argument("--since", help="only records at or after this time (Unix seconds, ISO 8601, or an age: 30d, 12h)")
    sp.add_argument("--agent", help="only this agent")
    sp.add_argument("-o", "--output", help="write to this file instead of stdout")
    leaf(asub, "seal", cmd_audit_seal, "sign a head over every agent's chain now (hosts do it periodically)")
    sp = leaf(asub, "prune", cmd_audit_prune,
              "delete records older than --before, leaving a signed checkpoint so the rest still verifies")
    sp.add_argument("--before", required=True, help="Unix seconds, ISO 8601, or an age (e.g. 180d)")
    sp.add_argument("--agent", help="only this agent")

    sp = leaf(sub, "replay", cmd_replay,
              "re-execute an agent from its recorded input with its recorded tool results (no tool runs) and check "
              "every call, its arguments, the fuel at each call and the output against the record")
    sp.add_argument("agent", help="the agent id")
    sp.add_argument("--bundle", help="the agent's bundle file, if the store no longer has it")
    sp.add_argument("--cold", action="store_true", help="rebuild the instance from a capture at every call")

    ide = sub.add_parser("identity", help="agent identities: show, token, verify, the host's public key")
    isub = ide.add_subparsers(dest="identity_command", metavar="SUBCOMMAND")
    sp = leaf(isub, "show", cmd_identity_show, "an agent's identity: name, version, principal, parent, lifetime, token")
    sp.add_argument("agent", help="the agent id")
    sp = leaf(isub, "token", cmd_identity_token, "print the agent's current identity token (renewed if near expiry)")
    sp.add_argument("agent", help="the agent id (a live one: a retired agent has no token)")
    sp = leaf(isub, "verify", cmd_identity_verify, "verify an identity token (exit 1 if forged, expired or revoked)")
    sp.add_argument("token", help="the token, or '-' to read it from stdin")
    sp.add_argument("--public-key", action="append", help="verify offline against this key (PEM file or base64url)")
    leaf(isub, "key", cmd_identity_key, "print the host's public signing key (to pin it when verifying elsewhere)")
