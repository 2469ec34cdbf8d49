"""The README's tutorial is true: its agent and policy, extracted verbatim, build and run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _block(text: str, lang: str, marker: str) -> str:
    for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S):
        if marker in m.group(1):
            return m.group(1)
    raise AssertionError(f"no {lang} block containing {marker!r} in README.md")


def test_tutorial_agent_builds_and_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    d = tmp_path / "greet"
    d.mkdir()
    (d / "agent.c").write_text(_block(readme, "c", "greet/agent.c"))
    (d / "policy.toml").write_text(_block(readme, "toml", "greet/policy.toml"))
    cli = [sys.executable, "-m", "host.cli"]
    built = subprocess.run([*cli, "build", str(d), "-o", str(tmp_path / "greet.torpor")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    for visits in (1, 2):
        run = subprocess.run([*cli, "run", str(tmp_path / "greet.torpor"), "--input", '{"name": "ada"}',
                              "--store", str(tmp_path / "store"), "--json"], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        # Each agent has its own private key-value namespace, so every run counts from 1.
        assert json.loads(run.stdout)["output"] == {"greeting": "hello, ada", "visits": 1}, visits
