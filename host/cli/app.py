"""The ``torpor`` command line: the parser, the grouped help, and errors turned into exit codes.

The commands live in one module per group of ``torpor --help`` (:mod:`.bundles`,
:mod:`.agents`, :mod:`.approvals`, :mod:`.store`, :mod:`.policy`, :mod:`.trust`);
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
from typing import Any

from host.cli import agents, approvals, bundles, policy, store, trust
from host.cli.common import EXIT_ERROR, EXIT_INTERNAL, EXIT_OK, error_code, open_host
from host.errors import TorporError

# Kept for callers of the old single-module CLI (tests drive `app._host(args)`).
_host = open_host

# The groups of `torpor --help`, in order: each module registers its own commands.
GROUPS = (bundles, agents, approvals, store, policy, trust)
BENCH_TITLE = "bench: load tests"
# What `torpor --help` says of `bench` when its parser is not built (see build_parser).
BENCH_HELP = "load-test cold start, suspend/resume, density and tool round trips"
EXIT_CODES = ("exit codes: 0 completed/ok, 1 the agent failed or was terminated, 2 the command could not do "
              "its work, 3 internal error, 4 the agent waits on a person (approval, in-doubt call)")


class _TorporParser(argparse.ArgumentParser):
    """The top-level parser, whose help lists the commands by group (argparse lists
    them flat), laid out only when the help is printed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.command_groups: list[tuple[str, list[tuple[str, str]]]] = []

    def format_help(self) -> str:
        """The usual help, with the grouped commands after the description."""
        description, epilog = self.description, self.epilog
        self.description = f"{description}\n\n{_grouped_commands(self.command_groups)}"
        self.epilog = _wrap(epilog or "")
        try:
            return super().format_help()
        finally:
            self.description, self.epilog = description, epilog


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole ``torpor`` parser; with ``command`` (what :func:`main` is about to run)
    the ``bench`` parser is only built when ``command`` is ``bench``.

    Why: the bench package imports Wasmtime and the whole runtime at import, a few
    hundred milliseconds that ``torpor ps`` or ``torpor --help`` must not pay; a
    stand-in with the same name and help takes its place in their parser.
    """
    p = _TorporParser(
        prog="torpor",
        usage="torpor [-h] [--version] COMMAND ...",
        description="Run AI agents as sandboxed, hibernating WebAssembly instances.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version="torpor 0.1.0")
    # The flat list argparse would print is replaced by the grouped one below.
    sub = p.add_subparsers(dest="command", metavar="COMMAND", prog="torpor", help=argparse.SUPPRESS)
    groups = p.command_groups
    for module in GROUPS:
        before = set(sub.choices)
        module.add_parsers(sub)
        groups.append((module.TITLE, [row for name in sub.choices if name not in before
                                      for row in _command_rows(sub, name)]))
    if command is None or command == "bench":
        from host.benchmarks import add_parser as add_bench_parser

        add_bench_parser(sub)  # `torpor bench ...`
    else:
        sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    groups.append((BENCH_TITLE, [("bench BENCH", _helps(sub)["bench"])]))
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


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torpor`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_of(argv) or "")
    args = parser.parse_args(argv)
    fn = getattr(args, "fn", None)
    if fn is None:
        parser.print_help()
        return EXIT_ERROR
    from host.sandbox import interrupts
    from policies.errors import PolicyError
    from snapshots.errors import SnapshotError, StoreError

    try:
        with interrupts.handle_signals(then_ignore=True):  # Ctrl-C and SIGTERM end the work at a safe point
            return int(fn(args))
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", signal.SIGINT))
    except (TorporError, PolicyError, SnapshotError, StoreError) as exc:
        if interrupts.requested():  # what an interrupted guest or toolchain left behind
            return _interrupted(interrupts.requested())
        code = error_code(exc)
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": {"code": code, "message": str(exc)}}))
        else:
            print(f"torpor: error[{code}]: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `torpor audit show X | head`: the reader left, which is fine
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # a host bug: still one line, and the traceback on request
        if interrupts.requested():
            return _interrupted(interrupts.requested())
        if os.environ.get("TORPOR_DEBUG"):
            raise
        msg = f"internal error ({type(exc).__name__}: {exc}); rerun with TORPOR_DEBUG=1 for a traceback"
        if getattr(args, "json", False):
            print(json.dumps({"status": "error", "error": {"code": "internal", "message": msg}}))
        else:
            print(f"torpor: error[internal]: {msg}", file=sys.stderr)
        return EXIT_INTERNAL


def _interrupted(signum: int) -> int:
    print("torpor: interrupted" + ("" if signum == signal.SIGINT else f" (signal {signum})"), file=sys.stderr)
    return 128 + signum


if __name__ == "__main__":  # pragma: no cover - `python -m host.cli.app`
    sys.exit(main())
