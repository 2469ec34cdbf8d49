"""What every group of ``torpor`` commands shares: exit codes, output, the store a
command names, and the code an error is reported under.

Kept light on purpose (the standard library and :mod:`host.errors` at import): every
command imports it, and ``torpor ps`` must answer in well under 150 ms.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host.errors import ConfigError, TorporError

if TYPE_CHECKING:
    from host.runtime import Host, RunResult
    from snapshots.lmdb_store import LmdbStore

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran; the agent failed or was terminated, or a check found problems
EXIT_ERROR = 2  # the command itself could not do its work
EXIT_INTERNAL = 3  # a bug in Torpor
EXIT_PARKED = 4  # the agent waits: on a person (approval, an in-doubt call to settle), or asleep until a time
# ps, resume --all, audit verify: the others were handled, but some agents are damaged (record
# unreadable, parked corrupt, ended by a host error, audit chain broken; host.runtime.queries.attention)
EXIT_ATTENTION = 5

JSON_HELP = "print one JSON document"
AGENT_HELP = "the agent id (see `torpor ps`)"
# snapshots.lmdb_store.DURABILITY_LEVELS, spelled out so that building the parser does not
# import the store (a test keeps the two equal).
DURABILITY_CHOICES = ("sync", "process")
MAX_MEMORY_HELP = ("the most memory any agent may have on this host (bytes, or e.g. 256MiB), whatever its bundle's "
                   "budgets.memory says: it gets the smaller; a module whose initial memory is above it is refused "
                   "(memory_limit); default $TORPOR_MAX_MEMORY, else the bundle's budget alone")
STORE_HELP = "store directory (default: $TORPOR_STORE or the user data dir; `torpor doctor` prints it)"


def add_command(sub: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str, *,
                store: bool = False, writes: bool = False, runs: bool = False,
                **kwargs: Any) -> argparse.ArgumentParser:
    """Register one command with ``--json`` and, as it needs them, ``--store`` and
    ``--durability``, and for the commands that run agents (``runs``) where their tools come
    from (``--tools-dir``) and which bundles' own code may run (``--trust-bundle-code``)."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, **kwargs)
    sp.add_argument("--json", action="store_true", help=JSON_HELP)
    if store:
        sp.add_argument("--store", default=None, help=STORE_HELP)
    if writes:
        sp.add_argument("--durability", choices=DURABILITY_CHOICES, default=None,
                        help="how commits reach the disk: sync (each one before the agent goes on; survives "
                             "a power loss) or process (into the OS page cache, flushed every second and at exit; "
                             "survives this process being killed, not a power loss); default $TORPOR_DURABILITY, "
                             "else sync")
    if runs:
        sp.add_argument("--tools-dir", action="append", default=None, metavar="DIR",
                        help="a directory of operator tools: a policy's handler `mod:func` may name the function func "
                             "of DIR/mod.py (repeatable; searched before $TORPOR_TOOLS_PATH, which lists more, "
                             "separated by ':'); installed packages' `torpor.tools` entry points are tools too")
        sp.add_argument("--trust-bundle-code", action="append", default=None, metavar="DIGEST",
                        help="run the host code a bundle carries (its Python, its policy's MCP server commands), "
                             "with this process's privileges, for the bundle with this full digest (`torpor "
                             "inspect-bundle` shows it and the code; repeatable); without it such a bundle is "
                             "refused: error[bundle_code_refused]")
    sp.set_defaults(fn=fn)
    return sp


def emit(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    """Print ``data`` as one JSON line under ``--json``, else call ``human`` to print it for people."""
    if getattr(args, "json", False):
        print(json.dumps(data, default=str))
    else:
        human()


def iso(t: Any) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``, or ``-`` when there is none."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError):
        return "-"


def until(t: float, now: float | None = None, prefix: str = "in ") -> str:
    """How far off a time is, for people: ``in 4.2s``, ``in 3.1h``, or ``due``."""
    left = t - (time.time() if now is None else now)
    if left <= 0:
        return "due"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if left >= size:
            return f"{prefix}{left / size:.1f}{unit}"
    return f"{prefix}{left:.1f}s"


def parse_input(text: str | None, flag: str = "--input") -> Any:
    """JSON given inline or as ``@FILE`` (``None`` means ``{}``), held to the bounds of JSON
    from a guest: the agent or the tool it goes to reads it as such."""
    if text is None:
        return {}
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{flag} {text}: cannot read file ({exc.strerror})") from exc
    from host.sandbox import guest_json  # the same bounds as JSON from a guest: it goes to one

    try:
        return guest_json.parse(text)
    except guest_json.PoisonValue as exc:
        raise ConfigError(f"{flag} is not valid JSON: {exc}") from exc


def print_result(res: RunResult) -> None:
    """One agent's run result for people: status, output or error, what it waits on, usage."""
    status = res.status
    print(f"agent {res.agent_id}: {status}")
    if res.output is not None:
        print(json.dumps(res.output, indent=2))
    if res.error:
        print(f"error[{res.error['code']}]: {res.error['message']}")
    if status == "sleeping" and res.wake_at is not None:
        print(f"sleeping until {iso(res.wake_at)} ({until(res.wake_at)}) at {res.pending and res.pending.get('tool')} "
              "(torpor serve wakes it then; or torpor resume --all once it is due)")
    elif res.pending and status not in ("completed", "failed"):
        print(f"waiting on {res.pending.get('tool')} (call {res.pending.get('seq')})")
    question = (res.approval or {}).get("question") if status == "waiting_approval" else None
    if isinstance(question, dict):
        print(f"{question.get('server')} asks: {question.get('message')}")
        print(f"answer with: torpor approve {res.agent_id} --answer JSON  (schema: "
              f"{json.dumps(question.get('requested_schema'), separators=(',', ':'))[:400]}); "
              f"or torpor deny {res.agent_id} --reason WHY to decline")
    # Every call the agent made suspended it and left a checkpoint; only those the policy let
    # through count as tool calls (README, "What `torpor run` reports").
    not_run = res.suspensions - res.tool_calls
    calls = f"tool calls {res.tool_calls}" + (f" (+{not_run} not run: denied or refused)" if not_run > 0 else "")
    print(f"fuel {res.fuel_used}, {calls}, suspensions {res.suspensions}, checkpoints {res.checkpoints}, "
          f"snapshot bytes {res.snapshot_bytes}")


def decided_by(args: argparse.Namespace) -> str | None:
    """Who does it, for the audit: ``--by``, else ``$USER``, read when the command runs (the
    parser's default is None: against a server ``--by`` is refused, the token is who)."""
    import os

    return getattr(args, "by", None) or os.environ.get("USER")


def report_attention(damaged: dict[str, str]) -> None:
    """Name the agents that need attention on stderr, one line each (at most 20), for people."""
    import sys

    if not damaged:
        return
    print(f"torpor: {len(damaged)} agent{'s' if len(damaged) != 1 else ''} need{'s' if len(damaged) == 1 else ''} "
          f"attention (exit {EXIT_ATTENTION}):", file=sys.stderr)
    for agent_id, why in list(damaged.items())[:20]:
        print(f"  {agent_id}: {why}", file=sys.stderr)
    if len(damaged) > 20:
        print(f"  ... and {len(damaged) - 20} more (--json lists them all)", file=sys.stderr)


def result_exit(res: RunResult) -> int:
    """The exit code of a run: 0 completed, 4 parked on a person or asleep, 1 anything else."""
    if res.status == "completed":
        return EXIT_OK
    if res.status in ("waiting_approval", "in_doubt", "sleeping"):
        return EXIT_PARKED
    return EXIT_FAILED


def store_dir(args: argparse.Namespace) -> Path:
    """``--store``, else ``$TORPOR_STORE``, else the user data directory."""
    if getattr(args, "store", None):
        return Path(args.store)
    from host.paths import default_store_dir

    return default_store_dir()


def existing_store(args: argparse.Namespace) -> Path:
    """The store directory, which must hold a store: only ``run`` creates one, so for any
    other command a missing directory is a mistyped ``--store``, not an empty store."""
    store = store_dir(args)
    if not (store / "db").is_dir():
        raise ConfigError(f"no Torpor store at {store} (check --store or $TORPOR_STORE; `torpor run` creates one)")
    return store


def is_fleet(args: argparse.Namespace) -> bool:
    """Whether ``--store`` names a fleet store (``nats://host:port[,...]``), not a directory."""
    return str(getattr(args, "store", None) or "").startswith("nats://")


def fleet_local_dir(args: argparse.Namespace) -> Path:
    """A fleet host's own directory (its copy of the store, compile cache, signing key):
    ``--local-dir``, else ``$TORPOR_STORE`` or the user data directory, under ``fleet``."""
    if getattr(args, "local_dir", None):
        return Path(args.local_dir)
    from host.paths import default_store_dir

    return default_store_dir() / "fleet"


def open_fleet_store(args: argparse.Namespace) -> Any:
    """The fleet store ``--store nats://...`` names, its local copy in the host's own directory."""
    from snapshots.nats_store import DEFAULT_STREAM, NatsStore

    local = fleet_local_dir(args)
    try:
        local.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the host's directory {local}: {exc.strerror}") from exc
    return NatsStore.open(args.store, local / "copy", stream=getattr(args, "stream", None) or DEFAULT_STREAM,
                          replicas=getattr(args, "replicas", None) or 3)


def operator_config(args: argparse.Namespace) -> Any:
    """The operator config (``torpor.toml``: MCP servers, named roots) the command uses:
    ``torpor --config FILE``, else ``$TORPOR_CONFIG``, else the user's configuration directory
    (:func:`host.tools.mcp_config.load`)."""
    from host.tools import mcp_config

    return mcp_config.load(getattr(args, "config", None))


def open_host(args: argparse.Namespace) -> Host:
    """The host on the store the command names (created only by ``run``); on a fleet store
    (``--store nats://...``) a host with a lease, its own files in ``--local-dir``."""
    from host.runtime import Host
    from host.tools.sources import dirs_from_env
    from host.trust.credentials import VaultBroker

    tools_dirs = [*(getattr(args, "tools_dir", None) or []), *dirs_from_env()]
    if is_fleet(args):
        local = fleet_local_dir(args)
        fleet = open_fleet_store(args)
        try:
            return Host(local, store=fleet, broker=VaultBroker.for_store(local), tools_dirs=tools_dirs,
                        trust_bundle_code=getattr(args, "trust_bundle_code", None) or (),
                        max_memory=getattr(args, "max_memory", None), lease_s=getattr(args, "lease", None) or 3.0,
                        operator_config=operator_config(args))
        except BaseException:
            fleet.close()
            raise
    config = operator_config(args)  # a bad file is refused before the store is opened
    store = store_dir(args) if args.command in ("run", "serve") else existing_store(args)
    return Host(store, broker=VaultBroker.for_store(store), durability=getattr(args, "durability", None),
                tools_dirs=tools_dirs, trust_bundle_code=getattr(args, "trust_bundle_code", None) or (),
                max_memory=getattr(args, "max_memory", None), operator_config=config)


@contextmanager
def open_store(args: argparse.Namespace, *, readonly: bool) -> Iterator[LmdbStore]:
    """The command's store itself, for commands that look (``readonly``) or write a record
    or two: no :class:`~host.runtime.Host` (Wasmtime, the committer, the vault) is built.
    A store refused as suspect is refused here too."""
    from snapshots.lmdb_store import LmdbStore

    store = LmdbStore.open(existing_store(args) / "db", readonly=readonly, create=False)
    try:
        yield store
    finally:
        store.close()


def is_reported(exc: BaseException) -> bool:
    """Whether ``exc`` is one of the typed errors a command reports in one line (exit 2),
    not a bug. The error classes are imported here, when something failed, not at start."""
    from policies.errors import PolicyError
    from snapshots.errors import SnapshotError, StoreError

    return isinstance(exc, (TorporError, PolicyError, SnapshotError, StoreError))


def error_code(exc: BaseException) -> str:
    """The stable code an error is reported under (``error[CODE]``): its own ``code`` (the
    host's, the store's, snapshots' and policies' errors each carry one)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else "store_error"
