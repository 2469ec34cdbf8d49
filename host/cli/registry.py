"""``torpor push`` and ``torpor registry list|show|tag|diff``: the registry of versioned agents.

Local (embedded) mode: the commands read and write the registry in the store the command
names, as tenant ``default`` (:mod:`host.runtime.registry`), with no
:class:`~host.runtime.Host` built: a push validates the bundle and writes two records,
a listing reads a few. ``torpor run NAME@TAG`` (in :mod:`.agents`) runs what a
reference names.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from host.cli import remote
from host.cli.common import EXIT_OK, add_command, decided_by, emit, iso, open_store, store_dir
from host.errors import BundleError

if TYPE_CHECKING:
    from host.runtime.registry import Registry

T = TypeVar("T")

TITLE = "registry: named, versioned, tagged agents"
BY_HELP = "who does this, for the audit chain host.registry (default: $USER)"
REF_HELP = "a bundle reference: NAME (the version pushed last), NAME@TAG, NAME@sha256:<hex> or sha256:<hex>"


@contextmanager
def _registry(args: argparse.Namespace, *, readonly: bool, create: bool = False) -> Iterator[Registry]:
    """The registry of the command's store (``create``: make the store if there is none,
    as ``push`` may be the first command a store sees)."""
    from host.runtime.registry import Registry

    if create:
        from snapshots.lmdb_store import LmdbStore

        directory = store_dir(args)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from host.errors import ConfigError

            raise ConfigError(f"cannot create the store directory {directory}: {exc.strerror}") from exc
        store = LmdbStore.open(directory / "db", durability=getattr(args, "durability", None))
        try:
            yield Registry(store)
        finally:
            store.close()
        return
    with open_store(args, readonly=readonly) as opened:
        yield Registry(opened)



def _local(args: argparse.Namespace, fn: Callable[[Registry], T], *, readonly: bool = True, create: bool = False) -> T:
    """``fn`` of the registry in the command's store (``readonly`` unless it writes)."""
    with _registry(args, readonly=readonly and not create, create=create) as registry:
        return fn(registry)


def _short(digest: Any) -> str:
    return f"sha256:{str(digest)[:12]}" if digest else "-"


def cmd_push(args: argparse.Namespace) -> int:
    """Store a bundle file under its digest as the latest version of a name, and tag it."""
    path = Path(args.bundle)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no such bundle file") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot read bundle ({exc.strerror})") from exc
    # No --name: the agent's own. A server records the operator token as who pushed (no --by).
    version = remote.either(args, lambda client: client.push(raw, name=args.name, tag=args.tag),
                            lambda: _local(args, lambda r: r.push(raw, name=args.name, tag=args.tag,
                                                                  by=decided_by(args)), create=True),
                            local_only=("by",))

    def human() -> None:
        tags = f", tagged {', '.join(version['tags'])}" if version["tags"] else ""
        print(f"pushed {version['name']} {_short(version['digest'])} (abi v{version['abi']}, "
              f"{len(version['tools'])} tools{tags})")
        print(f"digest sha256:{version['digest']}")
        if version.get("host_code"):
            print(f"it carries host code ({', '.join(version['host_code'])}): a host runs it only with "
                  f"--trust-bundle-code {version['digest']}")

    emit(args, version, human)
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """Every name in the registry, with its number of versions, its latest and its tags."""
    rows = remote.either(args, lambda client: client.bundles()["bundles"], lambda: _local(args, lambda r: r.names()))

    def human() -> None:
        if not rows:
            print("the registry is empty (`torpor push BUNDLE --name NAME`)")
            return
        print(f"{'NAME':24}  {'VERSIONS':>8}  {'LATEST':19}  TAGS")
        for r in rows:
            tags = " ".join(f"{t}={str(d)[:12]}" for t, d in sorted(r["tags"].items()))
            print(f"{r['name']:24}  {r['versions']:>8}  {_short(r['latest']):19}  {tags or '-'}")

    emit(args, {"bundles": rows}, human)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """One name's versions (digest, ABI, granted tools, push time, tags), oldest first."""
    info = remote.either(args, lambda client: client.bundle(args.name),
                         lambda: _local(args, lambda r: r.versions(args.name)))

    def human() -> None:
        n = len(info["versions"])
        print(f"{info['name']}: {n} version{'s' if n != 1 else ''}, latest {_short(info['latest'])}")
        for t, d in sorted(info["tags"].items()):
            print(f"  tag {t} -> {_short(d)}")
        for v in info["versions"]:
            marks = [*v["tags"], *(["latest"] if v["latest"] else [])]
            print(f"{_short(v['digest'])}  pushed {iso(v.get('pushed_at'))}  abi v{v.get('abi')}"
                  + (f"  [{', '.join(marks)}]" if marks else ""))
            print(f"  tools  {', '.join(v.get('tools') or []) or 'none'}")
            if v.get("host_code"):
                print(f"  host code  {', '.join(v['host_code'])} (runs only with --trust-bundle-code)")

    emit(args, info, human)
    return EXIT_OK


def cmd_tag(args: argparse.Namespace) -> int:
    """Point a tag of a name at one of its versions (new runs follow it; running agents do not)."""
    moved = remote.either(args, lambda client: client.tag(args.name, args.tag, args.digest),
                          lambda: _local(args, lambda r: r.tag(args.name, args.tag, args.digest, by=decided_by(args)),
                                         readonly=False),
                          local_only=("by",))

    def human() -> None:
        was = f" (was {_short(moved['previous'])})" if moved["previous"] else ""
        print(f"{moved['name']}@{moved['tag']} -> {_short(moved['digest'])}{was}")

    emit(args, moved, human)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    """What B's policy grants differently from A's: tools, approvals, network, secrets, limits, budgets."""
    d = remote.either(args, lambda client: client.diff(args.a, args.b), lambda: _local(args, lambda r: r.diff(args.a, args.b)))
    emit(args, d, lambda: print(d["text"]))
    return EXIT_OK


def add_parsers(sub: Any) -> None:
    """Register ``push`` and ``registry list|show|tag|diff``."""
    sp = add_command(sub, "push", cmd_push, "store a bundle in the registry as the latest version of a name "
                     "(and tag it)", store=True, writes=True)
    sp.add_argument("bundle", help="a .torpor bundle file")
    sp.add_argument("--name", help="the name to push it as (default: the agent's name in its policy)")
    sp.add_argument("--tag", help="move this tag (e.g. production, canary) to the pushed version")
    sp.add_argument("--by", default=None, help=BY_HELP)
    reg_help = "list, show, tag and diff the versions of named agents"
    reg = sub.add_parser("registry", help=reg_help, description=reg_help)
    rsub = reg.add_subparsers(dest="registry_command", metavar="SUBCOMMAND")
    add_command(rsub, "list", cmd_list, "every name in the registry: versions, latest, tags", store=True)
    sp = add_command(rsub, "show", cmd_show, "a name's versions: digest, ABI, granted tools, push time, tags",
                     store=True)
    sp.add_argument("name", help="a registry name")
    sp = add_command(rsub, "tag", cmd_tag, "point a tag of a name at one of its versions (agents already started "
                     "keep the version they started with)", store=True)
    sp.add_argument("name", help="a registry name")
    sp.add_argument("tag", help="the tag to move (e.g. production)")
    sp.add_argument("digest", help="the version: its digest (sha256:<hex>, or its first 8 hex digits or more, as `torpor "
                    "registry show NAME` prints them), or NAME@TAG to point it where another tag points")
    sp.add_argument("--by", default=None, help=BY_HELP)
    sp = add_command(rsub, "diff", cmd_diff, "what the policy of B grants differently from that of A (tools, "
                     "approvals, network hosts, secrets, limits, budgets)", store=True)
    sp.add_argument("a", help=REF_HELP)
    sp.add_argument("b", help=REF_HELP)
