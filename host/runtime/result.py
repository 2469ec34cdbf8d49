"""What a run (or resume) of one agent comes to: :class:`RunResult`, and the statuses that end or park an agent.

Kept apart from :mod:`host.runtime.agent` (the live agent, with Wasmtime behind it) so that
a client of ``torpor serve`` rebuilds and prints a run's result from the agent's record
without importing the sandbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: A finished agent: nothing more will run.
TERMINAL = frozenset({"completed", "failed", "terminated"})
#: A parked agent: it waits on a person (an approval, an in-doubt call to settle, or
#: its stored state, bundle or module found damaged: ``corrupt``, with the error naming what).
PARKED = frozenset({"waiting_approval", "in_doubt", "corrupt"})


@dataclass
class RunResult:
    """What a run (or resume) of one agent came to.

    ``tool_calls`` counts the calls the policy let through (a denied call is answered
    and checkpointed, and counted in ``suspensions``, not here); ``suspensions`` counts
    every time the guest stopped at a tool call, allowed or not.
    """

    agent_id: str
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    fuel_used: int = 0
    tool_calls: int = 0
    suspensions: int = 0
    checkpoints: int = 0
    snapshot_bytes: int = 0
    tokens: int = 0
    pending: dict[str, Any] | None = None
    approval: dict[str, Any] | None = None
    wake_at: float | None = None  # a sleeping agent's wake time (Unix seconds)
    logs: list[dict[str, Any]] = field(default_factory=list)
    #: The agent's record this result stands for, as the run's last commit wrote it (None when
    #: the result was made without one): a server answers a waited run with it, without
    #: reading the store again. Not a figure of the run: not in :meth:`to_dict`.
    record: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "agent_id": self.agent_id,
            "status": self.status,
            "output": self.output,
            "fuel_used": self.fuel_used,
            "tool_calls": self.tool_calls,
            "suspensions": self.suspensions,
            "checkpoints": self.checkpoints,
            "snapshot_bytes": self.snapshot_bytes,
            "tokens": self.tokens,
        }
        if self.error is not None:
            d["error"] = self.error
        if self.pending is not None:
            d["pending"] = self.pending
        if self.approval is not None:
            d["approval"] = self.approval
        if self.wake_at is not None:
            d["wake_at"] = self.wake_at
        return d

    @classmethod
    def of_record(cls, rec: dict[str, Any], logs: list[dict[str, Any]] | None = None) -> RunResult:
        """The result an agent record stands for."""
        u = rec.get("usage", {})
        status = rec["status"]
        return cls(
            agent_id=str(rec["agent_id"]), status=status, output=rec.get("output"), error=rec.get("error"),
            fuel_used=int(u.get("fuel_used", 0)), tool_calls=int(u.get("tool_calls", 0)),
            suspensions=int(u.get("suspensions", 0)), checkpoints=int(rec.get("checkpoints", 0)),
            snapshot_bytes=int(rec.get("snapshot_bytes", 0)), tokens=int(u.get("tokens", 0)),
            pending=rec.get("pending") if status not in TERMINAL else None,
            approval=rec.get("approval") if status == "waiting_approval" else None, logs=list(logs or []),
            wake_at=rec.get("wake_at") if status == "sleeping" else None, record=rec,
        )
