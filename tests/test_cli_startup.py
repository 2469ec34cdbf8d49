"""The CLI starts light: `torpor --help`, `ps`, `inspect` and `logs` import neither Wasmtime nor
pydantic nor the snapshot codec, and `ps`/`inspect` build no Host; a command imports
the module of its own group only.

Timing tests would be flaky on a shared machine; what makes the start slow is what is
imported, so that is what these check (the figures are in the README's "Start-up").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from host.cli import common
from host.runtime import logs
from snapshots.lmdb_store import DURABILITY_LEVELS, LmdbStore
from snapshots.store import WriteTxn

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("wasmtime", "pydantic", "pydantic_core", "zstandard", "anyio", "cryptography", "httpx",
         "policies.schema", "policies.engine", "snapshots.format", "snapshots.delta", "host.runtime.host",
         "host.sandbox", "host.benchmarks", "bench")


def _modules_after(argv: list[str]) -> tuple[int, set[str], str]:
    """Run the CLI's main in a fresh interpreter; the modules it imported and its exit code."""
    code = ("import json, sys\nfrom host.cli.app import main\n"
            f"rc = main({argv!r})\n"
            "sys.stderr.write('MODULES ' + json.dumps(sorted(sys.modules)) + ' RC ' + str(rc))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    tail = proc.stderr.rsplit("MODULES ", 1)
    assert len(tail) == 2, proc.stderr
    mods, rc = tail[1].rsplit(" RC ", 1)
    return int(rc), set(json.loads(mods)), proc.stdout


# main() turns signals into a safe stop (standard library only): light, and on every path.
LIGHT = {"host.sandbox", "host.sandbox.interrupts"}


def _heavy(mods: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(m for m in mods - LIGHT if any(m == h or m.startswith(h + ".") for h in HEAVY if h not in allowed))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding two agent records (written directly: no Wasmtime needed)."""
    root = tmp_path_factory.mktemp("store")
    with LmdbStore.open(root / "db") as s:
        def write(txn: WriteTxn) -> None:
            for i, status in enumerate(("completed", "suspended")):
                txn.put_agent({"agent_id": f"01M9AAAAAAAAAAAAAAAAAAAAA{i}", "name": "greet",
                               "status": status, "created_at": 1.0, "usage": {"fuel_used": 7, "tool_calls": 1},
                               "checkpoints": 1, "last_checkpoint_bytes": 300})

        s.transact(write)
        pending = logs.Pending()  # a log line kept for the second, as a commit of its would write it
        pending.add("info", "hello from the guest")
        s.transact(lambda txn: logs.flush(txn, "01M9AAAAAAAAAAAAAAAAAAAAA1", pending))
    return root


def test_help_imports_nothing_heavy() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "host.cli", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.count("|") == 2}
    assert not _heavy(imported), _heavy(imported)
    assert "bench BENCH" in proc.stdout and "agents: run agents and look at them" in proc.stdout


def test_ps_and_inspect_read_the_store_without_a_host(store: Path) -> None:
    code, mods, out = _modules_after(["ps", "--store", str(store), "--json"])
    # pydantic-core's JSON parser decodes only the fields ps shows; pydantic itself stays out.
    assert code == 0 and not _heavy(mods, allowed=("pydantic_core",)), _heavy(mods)
    rows = json.loads(out)
    assert [(r["agent_id"][-1], r["status"], r["fuel_used"]) for r in rows] == [("0", "completed", 7),
                                                                                  ("1", "suspended", 7)]
    code, mods, out = _modules_after(["inspect", rows[1]["agent_id"], "--store", str(store)])
    assert code == 0 and not _heavy(mods), _heavy(mods)
    assert "status   suspended" in out
    assert not {"host.cli.trust", "host.cli.store", "host.cli.bundles"} & mods
    code, mods, _ = _modules_after(["approvals", "--store", str(store)])
    assert code == 0 and not _heavy(mods), _heavy(mods)
    code, mods, out = _modules_after(["logs", rows[1]["agent_id"], "--store", str(store)])
    assert code == 0 and not _heavy(mods), _heavy(mods)
    assert out.endswith(" #0 [info] hello from the guest\n"), out


def test_ps_against_a_server_imports_httpx_but_no_runtime() -> None:
    """`torpor --server URL ps` builds the agents group only (the URL is not taken for the
    command) and imports the HTTP client, not Wasmtime or the server's application."""
    from host.server.client import Client  # noqa: F401  (the module must import on its own)

    code, mods, out = _modules_after(["--server", "http://127.0.0.1:9", "ps", "--json"])
    assert code == 2 and json.loads(out)["error"]["code"] == "server_unreachable"
    assert "httpx" in mods and "host.cli.registry" not in mods and "starlette" not in mods
    client_side = ("httpx", "anyio", "zstandard")  # httpx imports these two itself (its transport, zstd bodies)
    assert not _heavy(mods, allowed=client_side), _heavy(mods, allowed=client_side)


def test_ps_human_output_has_a_line_per_agent(store: Path) -> None:
    code, _, out = _modules_after(["ps", "--store", str(store), "--status", "suspended"])
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["AGENT", "NAME", "STATUS"]
    assert len(lines) == 2 and lines[1].split()[1:3] == ["greet", "suspended"]


def test_the_parser_spells_the_stores_durability_levels() -> None:
    assert common.DURABILITY_CHOICES == DURABILITY_LEVELS


def test_the_groups_table_names_what_each_module_registers() -> None:
    import argparse
    from importlib import import_module

    from host.cli import app

    for group, names in app.GROUPS:
        sub = argparse.ArgumentParser().add_subparsers()
        import_module(f"host.cli.{group}").add_parsers(sub)
        assert tuple(sub.choices) == names, group
    full = app.build_parser()
    for _, names in app.GROUPS:  # a command's own parser registers its whole group, no more
        for name in names:
            only = app.build_parser(name)
            assert _subcommands(only) == {*names}, name
    assert _subcommands(full) == {n for _, names in app.GROUPS for n in names} | {"bench"}


def _subcommands(parser: object) -> set[str]:
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_main_in_process_gives_the_signal_handlers_back(store: Path) -> None:
    """Only the process's own command ignores signals once its work is done: a caller of
    main(argv) keeps its handlers, so the processes it starts later can still be stopped."""
    import signal

    from host.cli.app import main

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main(["ps", "--store", str(store), "--json"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before
