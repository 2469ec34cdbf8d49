"""Deterministic replay: the exact bundle, the recorded input and answers, compared call by call."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.runtime import Host
from host.runtime.replay import BundleMissing, ReplayError, replay
from host.sandbox import bundle as bundle_mod
from host.trust.credentials import VaultBroker
from host.trust.vault import Vault

pytestmark = pytest.mark.timeout(120)
STEPS = Path(__file__).parent.parent / "guest_sdk" / "examples" / "steps"
SECRETUSE = Path(__file__).parent / "guests" / "secretuse"


@pytest.fixture(scope="module")
def steps_store(bundles: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("replay") / "store"
    with Host(d, warm_idle_s=0.0) as host:
        res = anyio.run(lambda: host.run(bundles.load(STEPS), {"n": 6}))
    assert res.status == "completed"
    return d, res.agent_id


@pytest.fixture
def store(steps_store: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    d = tmp_path / "store"
    shutil.copytree(steps_store[0], d)
    return d, steps_store[1]


def _tamper_journal(d: Path, aid: str, seq: int, **changes: Any) -> None:
    with Host(d) as host:
        def edit(txn: Any) -> None:
            entry = txn.get_journal(aid, seq)
            entry.update(changes)
            txn.put_journal(aid, seq, entry)

        host.store.transact(edit)


def test_replay_of_a_finished_run_matches_warm_and_cold(store: tuple[Path, str]) -> None:
    d, aid = store
    with Host(d) as host:
        for cold in (False, True):
            r = replay(host, aid, cold=cold)
            assert r.matched, r.to_dict()
            assert r.complete and r.calls_replayed == r.calls_recorded == 6
            assert r.outcome == {"status": "completed", "output": host.get_agent(aid)["output"]}
            assert r.fuel_used == host.get_agent(aid)["usage"]["fuel_used"]
            assert r.audit_ok is True


def test_cli_replay_reports_the_match(store: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    d, aid = store
    assert main(["replay", aid, "--store", str(d)]) == 0
    out = capsys.readouterr().out
    assert "matched" in out and "6 tool calls" in out
    assert main(["replay", aid, "--store", str(d), "--json", "--cold"]) == 0
    assert json.loads(capsys.readouterr().out)["matched"] is True


def test_altered_arguments_are_reported_at_their_call(store: tuple[Path, str]) -> None:
    d, aid = store
    _tamper_journal(d, aid, 3, args={"key": "counter", "by": 2})
    with Host(d) as host:
        r = replay(host, aid)
    assert not r.matched
    m = r.mismatches[0]
    assert (m.call_seq, m.field) == (3, "args")
    assert m.expected == {"key": "counter", "by": 2} and m.got == {"key": "counter", "by": 1}
    assert "DIFFERS at call 3, args" in r.summary()


def test_altered_fuel_and_answers_are_reported(store: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    d, aid = store
    with Host(d) as host, host.store.read() as txn:
        fuel4 = txn.get_journal(aid, 4)["fuel"]
    _tamper_journal(d, aid, 4, fuel=fuel4 + 1)
    _tamper_journal(d, aid, 5, response='{"value":7}')  # a different recorded answer: the guest computes another sum
    with Host(d) as host:
        r = replay(host, aid)
    fields = [(m.call_seq, m.field) for m in r.mismatches]
    assert fields[0] == (4, "fuel") and (None, "output") in fields
    assert r.mismatches[0].expected == fuel4 + 1 and r.mismatches[0].got == fuel4
    assert main(["replay", aid, "--store", str(d)]) == 1
    out = capsys.readouterr().out
    assert "call 4" in out and "fuel" in out


def test_a_changed_recorded_output_is_a_mismatch(store: tuple[Path, str]) -> None:
    d, aid = store
    with Host(d) as host:
        rec = host.get_agent(aid)
        rec.pop("stalled")
        rec["output"] = {"sum": 0, "last": 0}
        host.store.transact(lambda txn: txn.put_agent(rec))
        r = replay(host, aid)
    assert [(m.call_seq, m.field) for m in r.mismatches] == [(None, "output")]


def test_bundle_gone_is_a_clear_error_and_the_file_brings_it_back(store: tuple[Path, str], bundles: Any,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from host.cli import main

    d, aid = store
    with Host(d) as host:
        digest = host.get_agent(aid)["bundle_digest"]
        host.store.transact(lambda txn: txn.delete_blob("bundles", digest))
        with pytest.raises(BundleMissing, match="no longer in the store") as exc:
            replay(host, aid)
        assert exc.value.code == "bundle_missing" and "--bundle" in str(exc.value)
    assert main(["replay", aid, "--store", str(d)]) == 2
    assert "bundle_missing" in capsys.readouterr().err
    path = bundles.path(STEPS)
    assert main(["replay", aid, "--store", str(d), "--bundle", str(path)]) == 0
    other = bundle_mod.load_bytes(bundle_mod.build_dir(SECRETUSE))
    with Host(d) as host, pytest.raises(ReplayError, match="exact bundle") as exc2:
        replay(host, aid, bundle=other)
    assert exc2.value.code == "bundle_mismatch"


class NoBroker:
    """A broker that fails the test if replay asks it for anything."""

    def check(self, agent_id: str, policy: Any) -> None:
        raise AssertionError("replay must not check credentials")

    def secrets_for(self, *a: Any, **k: Any) -> dict[str, str]:
        raise AssertionError("replay must not lease secrets")

    def revoke(self, agent_id: str) -> list[str]:
        raise AssertionError("replay must not revoke")


def test_replay_runs_no_tool_and_leases_no_secret(bundles: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)
    b = bundles.load(SECRETUSE)
    Vault(tmp_path / "s").set("erp_token", "tok-123456789")
    with Host(tmp_path / "s", broker=VaultBroker.for_store(tmp_path / "s")) as host:
        res = anyio.run(lambda: host.run(b, {"n": 3, "ms": 0}))
        assert res.status == "completed"
    tool_mod = next(m for n, m in sys.modules.items()  # the operator's tool, loaded under a private name
                    if n.startswith("torpor_tools_") and getattr(m, "__file__", None) == str((SECRETUSE / "secret_tools.py").resolve()))
    seen = len(tool_mod.SEEN)
    with Host(tmp_path / "s", broker=NoBroker()) as host:
        r = replay(host, res.agent_id, cold=True)
    assert r.matched, r.to_dict()
    assert len(tool_mod.SEEN) == seen  # the tool did not run


APPROVE_POLICY = """
[agent]
name = "steps-approved"

[budgets]
fuel = {fuel}
memory = "16MiB"
wall_clock = "30s"

[tools."kv.incr"]
approval = true
"""


def test_replay_across_approvals_rearms_each_runs_fuel_budget(bundles: Any, tmp_path: Path) -> None:
    """Each approval resumes the agent from its checkpoint in a new run with its own fuel budget: a budget
    smaller than the whole run's fuel, but enough for each run, must be re-armed the same way in replay."""
    steps = bundles.load(STEPS)
    with Host(tmp_path / "probe") as host:
        probe = anyio.run(lambda: host.run(steps, {"n": 3}))
    per_run = probe.fuel_used * 2 // 3  # less than the whole, more than any one segment
    b = bundle_mod.load_bytes(bundle_mod.pack(steps.module, APPROVE_POLICY.format(fuel=per_run)))
    with Host(tmp_path / "s") as host:
        res = anyio.run(lambda: host.run(b, {"n": 3}))
        while res.status == "waiting_approval":
            res = anyio.run(host.approve, res.agent_id)
        assert res.status == "completed" and res.fuel_used > per_run
        r = replay(host, res.agent_id)
        assert r.matched, r.to_dict()
        assert r.calls_replayed == 3 and r.fuel_used == res.fuel_used
        assert not [n for n in r.notes if "not compared" in n]  # approved calls: fuel checked against checkpoints


def test_replay_of_a_parked_agent_matches_what_is_recorded(bundles: Any, tmp_path: Path) -> None:
    steps = bundles.load(STEPS)
    b = bundle_mod.load_bytes(bundle_mod.pack(steps.module, APPROVE_POLICY.format(fuel=50_000_000)))
    with Host(tmp_path / "s") as host:
        res = anyio.run(lambda: host.run(b, {"n": 3}))
        res = anyio.run(lambda: host.approve(res.agent_id))
        assert res.status == "waiting_approval"
        r = replay(host, res.agent_id)
    assert r.matched and not r.complete
    assert any("ends at call 2" in n for n in r.notes)


def test_replay_of_a_fork_uses_its_parents_history(bundles: Any, tmp_path: Path) -> None:
    with Host(tmp_path / "s") as host:
        parent = anyio.run(lambda: host.run(bundles.load(STEPS), {"n": 4}))
        child = host.fork(parent.agent_id, 2)
        done = anyio.run(lambda: host.resume(child))
        assert done.status == "completed"
        r = replay(host, child)
        assert r.matched, r.to_dict()
        assert r.calls_replayed == 4 and r.outcome["output"] == done.output


CRASH_TOOLS = '''
import os
from pydantic import BaseModel


class EchoArgs(BaseModel):
    value: int
    ms: int = 0


def echo(args: EchoArgs, ctx: object) -> dict[str, int]:
    if str(args.value) == os.environ.get("TORPOR_TEST_CRASH_AT"):
        os._exit(9)  # the host dies in the middle of the tool call: no result is journaled
    return {"value": args.value}
'''


def test_replay_of_an_agent_resumed_after_a_crash_matches(bundles: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The host process dies mid-call; another resumes the agent from its checkpoint (re-running the
    idempotent call). The checkpoint kept the exact fuel count, so the replay from the start matches the
    journal at every call, the ones after the crash included."""
    import subprocess

    slow = bundles.load(Path(__file__).parent / "guests" / "slowtool")
    policy = slow.policy_text.replace("slow_tools:echo", "crash_tools:echo")
    path = tmp_path / "crashy.torpor"
    path.write_bytes(bundle_mod.pack(slow.module, policy))
    tools = tmp_path / "tools"  # the operator's tools, for this process and the `torpor run` below
    tools.mkdir()
    (tools / "crash_tools.py").write_text(CRASH_TOOLS)
    monkeypatch.setenv("TORPOR_TOOLS_PATH", str(tools))
    store = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-m", "host.cli", "run", str(path), "--input", '{"n": 5, "ms": 0}',
                           "--store", str(store)], env={**__import__("os").environ, "TORPOR_TEST_CRASH_AT": "3"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    with Host(store) as host:
        (agent,) = host.list_agents()
        res = anyio.run(lambda: host.resume(agent["agent_id"]))
        assert res.status == "completed"
        kinds = [r["kind"] for r in host.audit_records(res.agent_id)]
        assert "agent.resumed" in kinds
        r = replay(host, res.agent_id)
        assert r.matched, r.to_dict()
        assert r.calls_replayed == 5 and r.fuel_used == res.fuel_used
