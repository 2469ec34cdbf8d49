"""Where a command's work happens: the local store, or a ``torpor serve`` (``--server URL``).

``torpor --server URL`` (or ``$TORPOR_SERVER``; the operator token from ``--token-file`` or
``$TORPOR_TOKEN``) makes ``run``, ``resume``, ``fork``, ``ps``, ``inspect``, ``logs``,
``approvals``, ``approve``, ``deny``, ``resolve``, ``audit show|verify``, ``push`` and
``registry list|show|tag|diff`` ask a server through
:class:`host.server.client.Client`. The server answers with the dicts the runtime's
queries return, so each command keeps one printing code for both sides; this module is the
one place that picks the side (:func:`connect`), and refuses what cannot go to a server:
a command that only works on a local store, and an option that names something local
(``--store``, ``--tools-dir``, ...), each with one line rather than silently ignored.

Kept light: httpx and the client are imported by :func:`connect`, only when a server is named.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from host.errors import ConfigError

if TYPE_CHECKING:
    from host.server.client import Client

T = TypeVar("T")

SERVER_ENV = "TORPOR_SERVER"
TOKEN_ENV = "TORPOR_TOKEN"
SERVER_HELP = (f"talk to a `torpor serve` at this URL (e.g. http://127.0.0.1:8700) instead of a local store: run, "
               f"resume, fork, ps, inspect, logs, approvals, approve, deny, resolve, audit show|verify, push, registry "
               f"(default ${SERVER_ENV})")
TOKEN_FILE_HELP = f"a file holding the operator token for --server (default ${TOKEN_ENV})"

#: The commands that work against a server (``audit`` and ``registry``: these subcommands).
REMOTE = frozenset({"run", "resume", "fork", "ps", "inspect", "logs", "approvals", "approve", "deny", "resolve",
                    "push", "audit show", "audit verify",
                    "registry list", "registry show", "registry tag", "registry diff"})
#: Commands that are local by nature (the server's own side, load tests on scratch stores):
#: with ``$TORPOR_SERVER`` set they still work locally (an operator's shell may have both);
#: only an explicit ``--server`` is refused.
SERVER_SIDE = frozenset({"serve", "tokens", "fleet", "bench"})
#: The options of a local host or store (:func:`host.cli.common.add_command`), meaningless
#: to a server, which has its own.
LOCAL_OPTIONS = (("store", "--store"), ("durability", "--durability"), ("tools_dir", "--tools-dir"),
                 ("trust_bundle_code", "--trust-bundle-code"), ("max_memory", "--max-memory"),
                 ("config", "--config"))
#: A long poll's length: the server holds the request at most this long (and caps it).
POLL_S = 60.0
#: Statuses in which an agent on a server still moves on by itself (host.server.agents.MOVING).
MOVING = frozenset({"running", "suspended", "approved"})


def add_options(parser: argparse.ArgumentParser) -> None:
    """The global options ``--server`` and ``--token-file`` (before the command)."""
    parser.add_argument("--server", metavar="URL", default=None, help=SERVER_HELP)
    parser.add_argument("--token-file", metavar="FILE", default=None, help=TOKEN_FILE_HELP)


def server_url(args: argparse.Namespace) -> str | None:
    """The server the command talks to, or None for the local store."""
    url = getattr(args, "server", None) or os.environ.get(SERVER_ENV) or None
    return url.strip() if url else None


def command_path(args: argparse.Namespace) -> str:
    """``run``, ``audit show``, ``registry tag``, ...: the command as :data:`REMOTE` names it."""
    sub = getattr(args, f"{args.command.replace('-', '_')}_command", None) if args.command else None
    return f"{args.command} {sub}" if isinstance(sub, str) else str(args.command)


def check(args: argparse.Namespace) -> None:
    """Refuse a command that cannot go to the named server (before it does anything)."""
    url = server_url(args)
    if url is None:
        return
    path = command_path(args)
    if path in REMOTE:
        return
    explicit = getattr(args, "server", None) is not None
    if args.command in SERVER_SIDE and not explicit:
        return
    if explicit or hasattr(args, "store"):  # a command that only reads files is not the server's business
        how = "--server" if explicit else f"${SERVER_ENV}"
        raise ConfigError(f"`torpor {path}` does not go to a server ({how} {url}): it works on this machine's store "
                          "and files; the commands a server answers are: " + ", ".join(sorted(REMOTE)))


def connect(args: argparse.Namespace, *, local_only: tuple[str, ...] = ()) -> Client | None:
    """The client of the server the command names, or None for the local store.

    ``local_only``: the command's own options (``dest`` names) that mean nothing to a
    server; set, each is refused in one line, as are the local host's options."""
    url = server_url(args)
    if url is None:
        return None
    for dest, flag in (*LOCAL_OPTIONS, *((d, "--" + d.replace("_", "-")) for d in local_only)):
        value = getattr(args, dest, None)
        if value not in (None, False, []):
            raise ConfigError(f"{flag} does not apply against a server (--server/${SERVER_ENV} {url}): the server "
                              "uses its own store and settings; drop it, or run the command locally")
    from host.server.client import Client

    return Client(url, _token(args))


def either(args: argparse.Namespace, on_server: Callable[[Client], T], locally: Callable[[], T], *,
           local_only: tuple[str, ...] = ()) -> T:
    """What ``on_server`` asks the named server, or, with none named, what ``locally`` reads
    from the store: the same dict either way, for the command's one printing code."""
    client = connect(args, local_only=local_only)
    if client is None:
        return locally()
    with client:
        return on_server(client)


def _token(args: argparse.Namespace) -> str | None:
    """The operator token: ``--token-file``, else ``$TORPOR_TOKEN`` (None: none given)."""
    path = getattr(args, "token_file", None)
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from exc
        if not text:
            raise ConfigError(f"--token-file {path} is empty")
        return text
    return os.environ.get(TOKEN_ENV, "").strip() or None


def until_stopped(client: Client, rec: dict[str, Any]) -> dict[str, Any]:
    """The agent once it stopped moving and the server's drive of it ended, by long polls
    (the answer then carries ``logs``, the drive's guest log lines): what a local run or
    decision returns when it returns. Interrupted (Ctrl-C), it says which agent goes on."""
    agent_id = str(rec["agent_id"])
    try:
        while rec.get("status") in MOVING or "logs" not in rec:
            rec = client.wait(agent_id, POLL_S)
    except KeyboardInterrupt:  # Ctrl-C ends the waiting here, not the agent there: say where it is
        import sys

        print(f"torpor: stopped waiting; agent {agent_id} goes on on the server (`torpor inspect {agent_id}`)",
              file=sys.stderr)
        raise
    return rec


def result_of(rec: dict[str, Any]) -> Any:
    """The :class:`~host.runtime.RunResult` a stopped agent's record stands for, with its logs
    (from :mod:`host.runtime.result`: no Wasmtime is imported to print it)."""
    from host.runtime.result import RunResult

    return RunResult.of_record(rec, rec.get("logs") or [])
