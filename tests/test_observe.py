"""The runtime's observer seam (host/runtime/observe.py): an embedder's observer is told of the
spawn, every segment, suspension and commit, and the events it is shown are the agent's audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from conftest import BundleFactory

from host.runtime import Host
from host.runtime.agent import LiveAgent
from host.runtime.observe import Events, Observer
from host.sandbox import bundle as bundle_mod


class Recorder(Observer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def spawned(self, agent: LiveAgent, seconds: float) -> None:
        self.calls.append(("spawned", seconds))

    def ran(self, agent: LiveAgent, fuel: int, seconds: float) -> None:
        self.calls.append(("ran", fuel))

    def suspended(self, agent: LiveAgent, seconds: float) -> None:
        self.calls.append(("suspended", seconds))

    def resumed(self, agent: LiveAgent, seconds: float) -> None:
        self.calls.append(("resumed", seconds))

    def committed(self, agent: LiveAgent, events: Events, seconds: float) -> None:
        self.calls.append(("committed", [kind for kind, _ in events]))


def test_an_observer_sees_what_the_audit_log_records(bundles: BundleFactory, tmp_path: Path) -> None:
    seen = Recorder()
    with Host(tmp_path / "store", observer=seen) as host:
        b = bundle_mod.load(bundles.example("steps"))
        result = anyio.run(lambda: host.run(b, {"n": 4}))
        assert result.status == "completed", result.error
        audit_kinds = [r["kind"] for r in host.audit_records(result.agent_id)]
    kinds = [name for name, _ in seen.calls]
    assert kinds.count("spawned") == 1 and kinds.count("resumed") == 0
    assert kinds.count("suspended") == result.suspensions == 4
    assert sum(fuel for name, fuel in seen.calls if name == "ran") == result.fuel_used > 0
    committed = [k for name, ks in seen.calls if name == "committed" for k in ks]
    assert committed == audit_kinds  # every record of the agent's log, in order, and nothing else
    assert all(s >= 0 for name, s in seen.calls if name in ("spawned", "suspended"))
