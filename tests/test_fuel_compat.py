"""Records an older host wrote still resume and replay after the fuel a call is recorded
with changed (session 11: counted at the ``tool_call`` import's entry, the unwind and the
rewind being the host's work, so that a call answered inline and one unwound record the same).

The fixture holds two real stores written by the host as it was before that change
(commit 194e11e, ``steps`` built from ``guest_sdk/examples/steps``): ``fx-old1``, a run of 20
calls that completed; ``fx-old2``, a run of 300 calls at ``TORPOR_CHECKPOINT_EVERY=64``
SIGKILLed after 101 (its checkpoint at call 65, calls 66 to 101 in the journal alone).
Made with: ``torpor build guest_sdk/examples/steps -o steps.torpor``, ``torpor run
steps.torpor --input '{"n": 20}' --store fx-old1``, the same with ``{"n": 300}`` into
``fx-old2`` killed once its journal held 100 entries; data.mdb and the host key kept, as a
zstd-compressed tar.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import zstandard

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old-fuel-stores.tar.zst"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def _stores(tmp_path: Path) -> Path:
    raw = zstandard.ZstdDecompressor().decompress(FIXTURE.read_bytes(), max_output_size=64 << 20)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


def _only_agent(store: Path) -> str:
    rows = json.loads(_cli("ps", "--store", str(store), "--json").stdout)
    assert len(rows) == 1, rows
    return str(rows[0]["agent_id"])


def test_an_older_hosts_completed_run_replays_matched(tmp_path: Path) -> None:
    store = _stores(tmp_path) / "fx-old1"
    agent = _only_agent(store)
    out = _cli("replay", agent, "--store", str(store), "--json")
    report = json.loads(out.stdout)
    assert report["mismatches"] == [] and report["matched"] is True, report
    assert report["calls_replayed"] == 20


def test_an_older_hosts_run_killed_between_checkpoints_resumes_and_replays(tmp_path: Path) -> None:
    """The resume re-executes from the older host's checkpoint, fed the journal it wrote
    (fuel counted its way), then goes on live; the whole record then replays matched."""
    store = _stores(tmp_path) / "fx-old2"
    env = {**os.environ, "TORPOR_CHECKPOINT_EVERY": "64"}
    res = _cli("resume", "--all", "--store", str(store), "--json", env=env)
    assert res.returncode == 0, res.stderr
    (final,) = json.loads(res.stdout)
    assert final["status"] == "completed", final
    assert final["output"] == {"sum": 300 * 301 // 2, "last": 300}
    report = json.loads(_cli("replay", final["agent_id"], "--store", str(store), "--json").stdout)
    assert report["mismatches"] == [] and report["matched"] is True, report["mismatches"][:3]
    verify = _cli("audit", "verify", "--store", str(store), "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
