"""The ``torpor`` command line: the parser, the grouped help, and errors turned into exit codes.

The commands live in one module per group of ``torpor --help`` (:mod:`.bundles`,
:mod:`.agents`, :mod:`.registry`, :mod:`.approvals`, :mod:`.store`, :mod:`.policy`, :mod:`.trust`);
each imports what its commands need inside them, so that starting the CLI costs
the standard library and the parser, not Wasmtime or pydantic.

Every command takes ``--json`` for scripts. Errors are typed exceptions turned
into one readable line (``torpor: error[code]: message``) and a non-zero exit
code; with ``--json`` the error is a JSON object on stdout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from importlib import import_module
from typing import Any

from host.cli import remote
from host.cli.common import EXIT_ERROR, EXIT_INTERNAL, EXIT_OK, error_code, is_reported, open_host

# Kept for callers of the old single-module CLI (tests drive `app._host(args)`).
_host = open_host

# The groups of `torpor --help`, in order: the module host.cli.GROUP registers these
# commands (a test holds the two to each other), so that a command imports its own.
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bundles", ("build", "pack", "inspect-bundle")),
    ("agents", ("run", "resume", "ps", "inspect", "logs", "fork")),
    ("registry", ("push", "registry")),
    ("approvals", ("approvals", "approve", "deny", "resolve")),
    ("store", ("store", "doctor")),
    ("policy", ("policy",)),
    ("mcp", ("mcp",)),
    ("trust", ("secrets", "audit", "replay", "identity")),
    ("server", ("serve", "fleet", "tokens")),
)
#: The global options that take a value (the word after them is not the command).
GLOBAL_VALUED = ("--server", "--token-file", "--config")
BENCH_TITLE = "bench: load tests"
# What `torpor --help` says of `bench` when its parser is not built (see build_parser).
BENCH_HELP = "load-test cold start, suspend/resume, density and tool round trips"
EXIT_CODES = ("exit codes: 0 completed/ok, 1 the agent failed or was terminated, 2 the command could not do "
              "its work, 3 internal error, 4 the agent waits on a person (approval, in-doubt call), 5 some agents "
              "need attention (ps, resume --all, audit verify: a record that does not decode, an agent parked "
              "corrupt or ended by a host error, a broken audit chain; the others were handled)")


class _TorporParser(argparse.ArgumentParser):
    """The top-level parser, whose help lists the commands by group (argparse lists
    them flat), laid out only when the help is printed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command_groups: list[tuple[str, list[tuple[str, str]]]] = []

    def format_help(self) -> str:
        """The usual help, with the grouped commands after the description (argparse
        builds a command's own parser with this class too: those have no groups)."""
        if not self.command_groups:
            return super().format_help()
        description, epilog = self.description, self.epilog
        self.description = f"{description}\n\n{_grouped_commands(self.command_groups)}"
        self.epilog = _wrap(epilog or "")
        try:
            return super().format_help()
        finally:
            self.description, self.epilog = description, epilog


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``torpor`` parser: all of it, or with ``command`` (what :func:`main` is about
    to run) only that command's group.

    Why: each group's module is imported to register its commands, and ``torpor ps``
    should not pay for the others. The bench package imports Wasmtime and the whole
    runtime at import, so ``bench`` is only registered for itself or for the whole
    parser; for the help (``command`` is ``""`` or unknown), a stand-in with its name
    and help takes its place.
    """
    p = _TorporParser(
        prog="torpor",
        usage="torpor [-h] [--version] [--config FILE] [--server URL] [--token-file FILE] COMMAND ...",
        description="Run AI agents as sandboxed, hibernating WebAssembly instances.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version="torpor 0.1.0")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the operator config: how this host starts or reaches the MCP servers policies name, and "
                        "the roots they refer to (default $TORPOR_CONFIG, else torpor.toml in the user config "
                        "directory; `torpor doctor` prints it)")
    remote.add_options(p)  # `torpor --server URL COMMAND`: the command asks a server (host/cli/remote.py)
    # The flat list argparse would print is replaced by the grouped one of format_help.
    sub = p.add_subparsers(dest="command", metavar="COMMAND", prog="torpor", help=argparse.SUPPRESS)
    only = next((group for group, names in GROUPS if command in names), "bench" if command == "bench" else None)
    for group, _ in GROUPS:
        if only in (None, group):
            module = import_module(f"host.cli.{group}")
            before = set(sub.choices)
            module.add_parsers(sub)
            p.command_groups.append((module.TITLE, [row for name in sub.choices if name not in before
                                                    for row in _command_rows(sub, name)]))
    if command is None or only == "bench":
        from bench.cli import add_parser as add_bench_parser

        add_bench_parser(sub)  # `torpor bench ...`
    elif only is None:
        sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    if only in (None, "bench"):
        p.command_groups.append((BENCH_TITLE, [("bench BENCH", _helps(sub)["bench"])]))
    return p


def _width() -> int:
    import shutil  # as argparse does, and only when a help is printed

    return max(60, min(100, shutil.get_terminal_size().columns) - 2)


def _wrap(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=_width())


def _helps(sub: Any) -> dict[str, str]:
    """The one-line help of each command registered on ``sub``."""
    return {a.dest: a.help or "" for a in sub._choices_actions}


def _command_rows(sub: Any, name: str) -> list[tuple[str, str]]:
    """``(command, help)`` for ``name``, or for each of its subcommands (``store check``, ...)."""
    inner = next((a for a in sub.choices[name]._actions if isinstance(a, argparse._SubParsersAction)), None)
    if inner is None:
        return [(name, _helps(sub)[name])]
    return [(f"{name} {child}", text) for child, text in _helps(inner).items()]


def _grouped_commands(groups: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """Every command with its one-line help, under the title of its group."""
    import textwrap

    pad = 4 + max(len(name) for _, rows in groups for name, _ in rows) + 2
    lines = ["commands (`torpor COMMAND --help` for each):"]
    for title, rows in groups:
        lines.append(f"\n  {title}")
        for name, text in rows:
            wrapped = textwrap.wrap(text, width=_width() - pad) or [""]
            lines.append(f"    {name:{pad - 4}}{wrapped[0]}")
            lines.extend(" " * pad + rest for rest in wrapped[1:])
    return "\n".join(lines)


def _command_of(argv: Sequence[str]) -> str:
    """The command ``argv`` names (its first word that is not an option), or ``""`` when
    there is none or the top-level help comes first (``torpor --help ps``). The value of a
    global option (``--server URL``) is not a command."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-h", "--help"):
            return ""
        if arg in GLOBAL_VALUED:
            skip = True
            continue
        if not arg.startswith("-"):
            return arg
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torpor`` console script (``argv`` None: this process's own
    command line, so the process ends when the command does)."""
    entry = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
    fn = getattr(args, "fn", None)
    if fn is None:
        parser.print_help()
        return EXIT_ERROR
    from host.sandbox import interrupts

    # Ctrl-C and SIGTERM end the work at a safe point. Once it has ended, the process's own
    # command ignores them (one landing while the outcome is printed or Python exits must
    # not kill it); a caller in the same process (tests, bench) gets its handlers back, and
    # its child processes do not inherit ignored signals.
    try:
        with interrupts.handle_signals(then_ignore=entry):
            try:
                remote.check(args)  # a command a named server cannot answer is refused before it starts
                return int(fn(args))
            except Exception as exc:
                if interrupts.requested():  # what an interrupted guest or toolchain left behind
                    raise interrupts.Interrupted(interrupts.requested()) from exc
                raise
    except KeyboardInterrupt as exc:
        status = _interrupted(getattr(exc, "signum", signal.SIGINT))
        if entry:
            # The process ends here, without waiting on threads the interrupt left behind (a
            # worker blocked in a call the cancelled work will never answer kept the
            # interpreter's exit waiting forever: `torpor bench interrupts` found it). What
            # the command committed is on disk already: the store is safe against the
            # process being killed at any instant, so skipping the shutdown is too.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status
    except BrokenPipeError:  # `torpor audit show X | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if is_reported(exc):  # a typed error: one line, exit 2 (3 for a server's own bug, as for ours)
            code, message = error_code(exc), str(exc)
            exit_code = EXIT_INTERNAL if code == "internal" else EXIT_ERROR
        elif os.environ.get("TORPOR_DEBUG"):
            raise
        else:  # a host bug: still one line, and the traceback on request
            code, exit_code = "internal", EXIT_INTERNAL
            message = f"internal error ({type(exc).__name__}: {exc}); rerun with TORPOR_DEBUG=1 for a traceback"
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": {"code": code, "message": message}}))
        else:
            print(f"torpor: error[{code}]: {message}", file=sys.stderr)
        return exit_code


def _interrupted(signum: int) -> int:
    print("torpor: interrupted" + ("" if signum == signal.SIGINT else f" (signal {signum})"), file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # pragma: no cover - `python -m host.cli.app`
    sys.exit(main())
