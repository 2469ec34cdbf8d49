"""The operator's memory cap: ``--max-memory``, ``$TORPOR_MAX_MEMORY``, ``Host(max_memory=)``.

A bundle's ``budgets.memory`` is the bundle's word, and bundles are not trusted, so the
operator bounds every agent's memory on its host whatever the bundle declares: the agent
gets the smaller of the two. A module whose initial memory is above the cap is refused
before anything is allocated (``memory_limit``, naming the cap and the bundle's budget),
and a guest that grows is stopped at the cap, not at its own budget. Through the real CLI
and a real guest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import GUESTS, BundleFactory
from test_budget_boundary import bundle_of

from host.errors import ConfigError
from host.runtime import Host

# 20 pages (1.25 MiB) of initial memory, under a 4 MiB budget.
BIG_START = """
(module
  (memory (export "memory") 20)
  (func (export "torpor_main") (result i32) (i32.const 0)))
"""
POLICY = """
[agent]
name = "roomy"
[budgets]
memory = "4MiB"
"""


def torpor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr and "internal" not in proc.stdout, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_a_module_above_the_cap_is_refused_naming_both_figures(tmp_path: Path) -> None:
    bundle = bundle_of(tmp_path, BIG_START, POLICY, "roomy")
    store = tmp_path / "s"
    fits = _json(torpor("run", str(bundle), "--store", str(store), "--json"))
    assert fits["status"] == "completed", fits  # within its own budget and no cap: it runs
    for how in (["--max-memory", "1MiB"], []):
        proc = torpor("run", str(bundle), "--store", str(store), "--json", *how,
                      env={} if how else {"TORPOR_MAX_MEMORY": "1MiB"})
        err = _json(proc)["error"]
        assert proc.returncode == 2 and err["code"] == "memory_limit", (how, proc.stdout)
        assert "1.2 MiB" in err["message"] and "memory cap of 1 MiB" in err["message"], err["message"]
        assert "budget is 4 MiB" in err["message"], err["message"]
    listed = _json(torpor("ps", "--store", str(store), "--json"))
    assert len(listed) == 1, listed  # the refused runs wrote no agent


def test_a_growing_guest_stops_at_the_smaller_of_cap_and_budget(bundles: BundleFactory, tmp_path: Path) -> None:
    """The grow guest (budget 16 MiB) allocates and touches 256 KiB blocks until memory.grow
    fails; the fuel it burns is in proportion to the memory it got (deterministic)."""
    bundle = tmp_path / "grow.torpor"
    bundle.write_bytes(bundles.load(GUESTS / "grow").raw)
    fuel = {}
    for cap in (None, "4MiB", "64MiB"):
        extra = ["--max-memory", cap] if cap else []
        res = _json(torpor("run", str(bundle), "--store", str(tmp_path / "s"), "--json", *extra))
        assert res["status"] == "failed" and res["error"]["code"] == "memory_limit", res
        fuel[cap] = res["fuel_used"]
    assert fuel["4MiB"] < fuel[None] / 2, fuel  # stopped at the cap: a quarter of the budget
    assert fuel["64MiB"] == fuel[None], fuel  # a cap above the budget changes nothing


def test_the_host_takes_the_smaller_limit_and_refuses_nonsense(bundles: BundleFactory, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    b = bundles.load(GUESTS / "grow")  # budgets.memory 16 MiB
    with Host(tmp_path / "a", max_memory="2MiB") as host:
        assert host.limits_for(b, None).memory_bytes == 2 << 20
    monkeypatch.setenv("TORPOR_MAX_MEMORY", "8MiB")
    with Host(tmp_path / "b") as host:
        assert host.limits_for(b, None).memory_bytes == 8 << 20
        res = anyio.run(lambda: host.run(b, {}))
        assert res.error is not None and res.error["code"] == "memory_limit"
    with Host(tmp_path / "c", max_memory=1 << 30) as host:  # the argument wins over the environment
        assert host.limits_for(b, None).memory_bytes == 16 << 20
    for bad in ("lots", "12 parsecs", "1KiB", -5):
        with pytest.raises(ConfigError):
            Host(tmp_path / "d", max_memory=bad)
    path = tmp_path / "grow.torpor"
    path.write_bytes(b.raw)
    proc = torpor("run", str(path), "--store", str(tmp_path / "e"), "--max-memory", "lots")
    assert proc.returncode == 2 and proc.stderr.startswith("torpor: error[invalid_config]: --max-memory"), proc.stderr
