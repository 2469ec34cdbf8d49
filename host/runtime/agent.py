"""One agent as the runtime holds it while it runs, and what a run comes to.

:class:`LiveAgent` is the host-side state of an agent between its load and its next
park or finish: its stored record (status, usage, audit head), its bundle and compiled
module, the tools its policy grants, and its guest state (a live
:class:`~host.sandbox.execution.Execution`, or a :class:`~host.sandbox.execution.Captured`
one waiting to be restored). :class:`~host.runtime.result.RunResult` is what the caller of a run is told.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from host.runtime.logs import Pending
from host.runtime.result import PARKED, TERMINAL, RunResult
from host.sandbox.bundle import Bundle
from host.sandbox.engine import LoadedModule
from host.sandbox.execution import Captured, Execution, Limits
from host.tools.registry import ToolSpec

# What a run comes to lives in host.runtime.result (light: a client of a server reads it
# without Wasmtime); named here too for the runtime's modules that import them from here.
__all__ = ["LOG_BYTES", "LOG_LIMIT", "PARKED", "TERMINAL", "Answer", "LiveAgent", "RunResult"]

#: The answer to a tool call as the guest reads it: (ABI status code, JSON bytes).
Answer = tuple[int, bytes]

# How many guest log lines, and bytes of them, one run keeps for its caller: a guest
# decides how much it logs, the host decides how much of that it holds.
LOG_LIMIT = 1000
LOG_BYTES = 1 << 20


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
    unlogged: Pending = field(default_factory=Pending)  # lines the next commit writes to the store's log
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    run_fuel_start: int = 0
    run_exec_s: float = 0.0
    last_segment_s: float | None = None  # how long the guest last ran between tool calls
    stopped_at: float = 0.0  # perf_counter() when the guest last stopped at a tool call
    run_started: float = field(default_factory=time.time)
    #: Re-executing from a checkpoint after a load: calls the journal already answered are
    #: fed their answers (:meth:`host.runtime.tool_call.ToolCallPipeline.replayed`) until
    #: the first call it has not, where the agent goes live again.
    replaying: bool = False
    #: Calls answered from the journal alone since the agent's last checkpoint, and when
    #: that checkpoint was taken (``time.monotonic()``, or the load): the replay window.
    since_checkpoint: int = 0
    checkpointed_at: float = field(default_factory=time.monotonic)
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
        :data:`LOG_BYTES` bytes of a run; then one line saying the rest was dropped), and
        for the store's log of the agent, which the next commit writes (:mod:`host.runtime.logs`)."""
        self.unlogged.add(level, message)
        if len(self.logs) >= LOG_LIMIT or self.log_bytes >= LOG_BYTES:
            return
        room = LOG_BYTES - self.log_bytes
        if len(message) > room:
            message = message[:room] + " [the run's log is full: later lines are dropped]"
        self.log_bytes += len(message)
        self.logs.append({"level": level, "message": message})

    def result(self) -> RunResult:
        return RunResult.of_record(self.record, self.logs)
