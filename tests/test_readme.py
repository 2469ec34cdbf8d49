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


def test_embedding_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    code = _block(readme, "python", "# embed.py")
    built = subprocess.run([sys.executable, "-m", "host.cli", "build", str(ROOT / "guest_sdk" / "examples" / "steps"),
                            "-o", str(tmp_path / "steps.torpor")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (tmp_path / "embed.py").write_text(code)
    run = subprocess.run([sys.executable, "embed.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "completed {'sum': 6, 'last': 3}"
