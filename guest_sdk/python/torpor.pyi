"""Type hints for the ``torpor`` module of a Python agent (guest_sdk/python/torpor.py).

Point an editor or type checker at this directory (``mypy_path``, or ``extraPaths`` in
Pyright) to check ``agent.py``.

Concurrent calls are asyncio's: when the agent imports ``asyncio`` (anywhere),
``asyncio.gather``, ``create_task``, ``wait`` and ``TaskGroup`` over ``tool(...)`` calls
work (the calls are made one at a time, each a suspension; the sandbox has no clock, so
``asyncio.sleep(s)`` for s > 0 and timeouts raise: use :func:`sleep`).
"""

from typing import Any

JSON = Any

class ToolError(Exception):
    """A tool call the host answered with an error object (ABI.md section 5)."""

    code: str
    message: str
    retryable: bool
    rule: str | None
    details: dict[str, JSON]
    def __init__(self, body: JSON) -> None: ...

class DeniedError(ToolError):
    """The policy refused the call: ``code == "denied"``, ``rule`` says which rule."""

def input() -> JSON:
    """The agent's input (parsed JSON)."""

def output(value: JSON) -> None:
    """Sets the agent's output (the last call wins); ``value`` must serialise to JSON."""

class _Log:
    def __call__(self, *args: object) -> None: ...
    def debug(self, *args: object) -> None: ...
    def info(self, *args: object) -> None: ...
    def warn(self, *args: object) -> None: ...
    def warning(self, *args: object) -> None: ...
    def error(self, *args: object) -> None: ...

log: _Log

async def tool(name: str, args: dict[str, JSON] | None = None) -> JSON:
    """Calls a tool granted by the policy; the agent may hibernate until it answers.
    Raises :class:`DeniedError` or :class:`ToolError`."""

async def sleep(ms: float) -> None:
    """A durable, host-settled timer (the ``timer.sleep`` tool)."""
