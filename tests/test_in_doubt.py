"""A non-idempotent call cut short by SIGKILL is never re-run blindly: the agent waits for an operator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BundleFactory
from serve_helpers import kill_mid_call, payer_bundle


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def killed_mid_call(bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, str]:
    bundle = payer_bundle(bundles, tmp_path, monkeypatch)  # its tool on $TORPOR_TOOLS_PATH for every process below
    marker = tmp_path / "charge.log"
    store = tmp_path / "store"
    kill_mid_call(bundle, store, marker)
    res = _cli("resume", "--all", "--store", str(store), "--json")
    rows = json.loads(res.stdout)
    assert [r["status"] for r in rows] == ["in_doubt"], res.stdout + res.stderr
    return store, marker, rows[0]["agent_id"]


def test_in_doubt_then_operator_supplies_the_result(killed_mid_call: tuple[Path, Path, str]) -> None:
    store, marker, agent = killed_mid_call
    info = json.loads(_cli("inspect", agent, "--store", str(store), "--json").stdout)
    assert info["status"] == "in_doubt"
    assert "not idempotent" in info["in_doubt"]["reason"]
    again = _cli("resume", "--all", "--store", str(store), "--json")
    assert json.loads(again.stdout) == []  # parked: resume --all leaves it alone
    done = _cli("resolve", agent, "--result", '{"charged": 42, "confirmed_by": "bank"}', "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["output"]["results"][0]["value"] == {"charged": 42, "confirmed_by": "bank"}
    assert marker.read_text().count("started") == 1  # never re-run


def test_in_doubt_then_operator_retries(killed_mid_call: tuple[Path, Path, str]) -> None:
    store, marker, agent = killed_mid_call
    done = _cli("resolve", agent, "--retry", "--store", str(store), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["output"]["results"][0]["value"] == {"charged": 42}
    assert marker.read_text().count("started") == 2  # once cut short, once by the operator's choice
    bad = _cli("resolve", agent, "--retry", "--store", str(store))
    assert bad.returncode == 2 and "not in_doubt" in bad.stderr
