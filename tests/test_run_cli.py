"""End to end through the real `torpor` CLI: build, run, budgets, exit codes, JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import EXAMPLES, BundleFactory


def torpor(*args: str, store: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "host.cli", *args]
    if store is not None and args and args[0] in {"run", "resume", "ps", "inspect", "fork", "approvals"}:
        cmd += ["--store", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def run_json(*args: str, store: Path) -> tuple[int, dict[str, Any]]:
    proc = torpor(*args, "--json", store=store)
    return proc.returncode, json.loads(proc.stdout)


def test_build_and_run_hello(tmp_path: Path) -> None:
    out = tmp_path / "h.torpor"
    proc = torpor("build", str(EXAMPLES / "hello"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    code, res = run_json("run", str(out), "--input", '{"name":"ada"}', store=tmp_path / "store")
    assert code == 0
    assert res["status"] == "completed"
    assert res["output"] == {"greeting": "hello, ada"}
    assert res["fuel_used"] > 0
    assert res["tool_calls"] == 0
    assert isinstance(res["agent_id"], str) and len(res["agent_id"]) == 26


def test_hello_out_of_fuel(bundles: BundleFactory, tmp_path: Path) -> None:
    code, res = run_json("run", str(bundles.example("hello")), "--input", '{"name":"ada"}', "--fuel", "10", store=tmp_path)
    assert code != 0
    assert res["status"] == "failed"
    assert res["error"]["code"] == "out_of_fuel"


def test_human_output_and_error_line(bundles: BundleFactory, tmp_path: Path) -> None:
    proc = torpor("run", str(bundles.example("hello")), "--input", '{"name":"bob"}', store=tmp_path)
    assert proc.returncode == 0
    assert "hello, bob" in proc.stdout
    bad = torpor("run", str(tmp_path / "missing.torpor"), store=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("torpor: error[invalid_bundle]:")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_steps_suspends_at_every_call(bundles: BundleFactory, tmp_path: Path) -> None:
    code, res = run_json("run", str(bundles.example("steps")), "--input", '{"n":50}', store=tmp_path)
    assert code == 0, res
    assert res["output"] == {"sum": 1275, "last": 50}
    assert res["suspensions"] >= 50
    assert res["checkpoints"] >= 50
    assert res["snapshot_bytes"] > 0
    code, info = run_json("inspect", res["agent_id"], store=tmp_path)
    assert code == 0
    assert info["status"] == "completed"
    assert len(info["checkpoint_list"]) == res["checkpoints"]
    code, rows = run_json("ps", store=tmp_path)
    assert [r["agent_id"] for r in rows] == [res["agent_id"]]


def test_inspect_bundle(bundles: BundleFactory) -> None:
    proc = torpor("inspect-bundle", str(bundles.example("steps")), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["abi_version"] == 1
    assert "torpor.tool_call" in info["imports"]
    assert "asyncify_start_unwind" in info["exports"]
    assert len(info["digest"]) == 64


def test_policy_check_and_explain(tmp_path: Path) -> None:
    good = EXAMPLES / "steps" / "policy.toml"
    ok = torpor("policy", "check", str(good))
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "policy.toml"
    bad.write_text('[agent]\nname = "x"\n[budgets]\ntokns = 5\n')
    proc = torpor("policy", "check", str(bad))
    assert proc.returncode == 2
    assert "tokns" in proc.stderr and "tokens" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) >= 1
    explain = torpor("policy", "explain", str(good), "--tool", "kv.incr", "--args", '{"key": "counter"}', "--json")
    assert explain.returncode == 0, explain.stderr
    assert json.loads(explain.stdout)["decision"]["decision"] == "allow"
    denied = torpor("policy", "explain", str(good), "--tool", "kv.set", "--args", "{}")
    assert denied.returncode == 0
    assert "not_granted" in denied.stdout or "not granted" in denied.stdout


def test_pack_a_module_built_elsewhere(tmp_path: Path) -> None:
    from host.sandbox import toolchain

    raw = toolchain.compile_c([EXAMPLES / "steps" / "agent.c"])
    assert not toolchain.is_prepared(raw)
    (tmp_path / "steps.wasm").write_bytes(raw)
    out = tmp_path / "steps.torpor"
    proc = torpor("pack", str(tmp_path / "steps.wasm"), "--policy", str(EXAMPLES / "steps" / "policy.toml"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    code, res = run_json("run", str(out), "--input", '{"n": 5}', store=tmp_path / "store")
    assert code == 0 and res["output"] == {"sum": 15, "last": 5}
    # Packing an already prepared module leaves it as it is.
    from host.sandbox import bundle as bundle_mod

    prepared = bundle_mod.load(out).module
    assert bundle_mod.load_bytes(bundle_mod.pack(prepared, (EXAMPLES / "steps" / "policy.toml").read_text())).module == prepared


def test_a_mistyped_store_is_an_error_not_a_new_store(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-store"
    for cmd in (["ps"], ["inspect", "01M81BEHCZ7QPNDWNTXHP1Z5PE"], ["resume", "--all"], ["approvals"]):
        proc = torpor(*cmd, store=missing)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert "no Torpor store at" in proc.stderr
    assert not missing.exists()


def test_every_command_prints_its_help() -> None:
    """`torpor COMMAND --help` for every command and subcommand: exit 0 and a usage line
    (a command's own parser is built with the top-level parser's class)."""
    from host.cli import app

    parser = app.build_parser()
    commands: list[list[str]] = []
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, sub in getattr(action, "choices", {}).items():
            commands.append([name])
            for sub_action in sub._subparsers._group_actions if sub._subparsers else []:
                commands.extend([name, child] for child in getattr(sub_action, "choices", {}))
    assert len(commands) > 20, commands
    for argv in commands:
        proc = subprocess.run([sys.executable, "-m", "host.cli", *argv, "--help"], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: torpor"), (argv, proc.stderr[-500:])
