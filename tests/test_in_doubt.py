"""A non-idempotent call cut short by SIGKILL is never re-run blindly: the agent waits for an operator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GUESTS, BundleFactory

from host.sandbox import bundle as bundle_mod

TOOLS = '''
import os, time
from pydantic import BaseModel


class ChargeArgs(BaseModel):
    marker: str
    amount: int


def charge(args: ChargeArgs, ctx) -> dict:
    first = not os.path.exists(args.marker)
    with open(args.marker, "a") as f:
        f.write("started\\n")
    if first:
        time.sleep(30)  # the host is killed while the payment is "in flight"
    return {"charged": args.amount}
'''

POLICY = '[agent]\nname = "payer"\n[tools."charge"]\nhandler = "pay_tools:charge"\n'


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def killed_mid_call(bundles: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, str]:
    module = bundles.load(GUESTS / "caller").module
    bundle = tmp_path / "payer.torpor"
    bundle.write_bytes(bundle_mod.pack(module, POLICY))
    tools = tmp_path / "tools"  # the operator's tools, for every `torpor` process below
    tools.mkdir()
    (tools / "pay_tools.py").write_text(TOOLS)
    monkeypatch.setenv("TORPOR_TOOLS_PATH", str(tools))
    marker = tmp_path / "charge.log"
    store = tmp_path / "store"
    payload = {"calls": [{"tool": "charge", "args": {"marker": str(marker), "amount": 42}}]}
    proc = subprocess.Popen([sys.executable, "-m", "host.cli", "run", str(bundle), "--input", json.dumps(payload),
                             "--store", str(store), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() or "started" not in marker.read_text():  # created, then written: wait for both
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
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
