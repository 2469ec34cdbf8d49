"""Host-side tools: Python callables the guest reaches through ``tool_call``.

See :mod:`host.tools.registry` for how a tool is declared and
:mod:`host.tools.builtin` for the built-ins (``kv.*``, ``clock.now``, ``log``).
"""

from .registry import ToolContext, ToolError, ToolSpec, tool

__all__ = ["ToolContext", "ToolError", "ToolSpec", "tool"]
