"""One agent as the runtime holds it while it runs, and what a run comes to.

:class:`LiveAgent` is the host-side state of an agent between its load and its next
park or finish: its stored record (status, usage, audit head), its bundle and compiled
module, the tools its policy grants, and its guest state (a live
:class:`~host.sandbox.execution.Execution`, or a :class:`~host.sandbox.execution.Captured`
one waiting to be restored). :class:`RunResult` is what the caller of a run is told.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from host.sandbox.bundle import Bundle
from host.sandbox.engine import LoadedModule
from host.sandbox.execution import Captured, Execution, Limits
from host.tools.registry import ToolSpec

#: A finished agent: nothing more will run.
TERMINAL = frozenset({"completed", "failed", "terminated"})
#: A parked agent: it waits on a person (an approval, an in-doubt call to settle, or
#: its stored state, bundle or module found damaged: ``corrupt``, with the error naming what).
PARKED = frozenset({"waiting_approval", "in_doubt", "corrupt"})

#: The answer to a tool call as the guest reads it: (ABI status code, JSON bytes).
Answer = tuple[int, bytes]

# How many guest log lines, and bytes of them, one run keeps for its caller: a guest
# decides how much it logs, the host decides how much of that it holds.
LOG_LIMIT = 1000
LOG_BYTES = 1 << 20


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
    logs: list[dict[str, Any]] = field(default_factory=list)

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
        )


@dataclass
class LiveAgent:
    """A running agent's host-side state (its guest state is in ``ex`` or ``captured``)."""

    record: dict[str, Any]
    bundle: Bundle
    loaded: LoadedModule
    tools: dict[str, ToolSpec]
    validators: dict[str, Any]
    limits: Limits
    pre: Any = None  # the module's InstancePre under this agent's grants (linked once per load)
    ex: Execution | None = None
    captured: Captured | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_bytes: int = 0
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    run_fuel_start: int = 0
    run_exec_s: float = 0.0
    last_segment_s: float | None = None  # how long the guest last ran between tool calls
    stopped_at: float = 0.0  # perf_counter() when the guest last stopped at a tool call
    run_started: float = field(default_factory=time.time)
    _input: bytes | None = field(default=None, repr=False)

    @property
    def agent_id(self) -> str:
        return str(self.record["agent_id"])

    @property
    def input_bytes(self) -> bytes:
        """The input as the guest reads it: the host's own JSON encoding of it.

        Kept in the store's ``inputs`` bucket, written once at spawn, not in the agent
        record, which every commit rewrites (a large input in it cost its size at every
        tool call). The host loads it with the agent; records of older hosts carry it
        in the record (``input_raw``, or ``input`` alone), which is then used.
        """
        if self._input is None:
            raw = self.record.get("input_raw")
            text = raw if isinstance(raw, str) else json.dumps(self.record.get("input"), separators=(",", ":"))
            self._input = text.encode()
        return self._input

    @property
    def usage(self) -> dict[str, Any]:
        u: dict[str, Any] = self.record.setdefault("usage", {})
        return u

    def event(self, kind: str, /, **data: Any) -> None:
        """Queue an audit event; it is sealed into the log by the agent's next commit."""
        self.events.append((kind, data))

    def log(self, level: str, message: str) -> None:
        """Keep a guest log line for the caller (the first :data:`LOG_LIMIT` lines and
        :data:`LOG_BYTES` bytes of a run; then one line saying the rest was dropped)."""
        if len(self.logs) >= LOG_LIMIT or self.log_bytes >= LOG_BYTES:
            return
        room = LOG_BYTES - self.log_bytes
        if len(message) > room:
            message = message[:room] + " [the run's log is full: later lines are dropped]"
        self.log_bytes += len(message)
        self.logs.append({"level": level, "message": message})

    def result(self) -> RunResult:
        return RunResult.of_record(self.record, self.logs)
