"""Host-side tools: Python callables the guest reaches through ``tool_call``.

See :mod:`host.tools.registry` for how a tool is declared and
:mod:`host.tools.builtin` for the built-ins (``kv.*``, ``clock.now``, ``log``,
and the families ``llm.*``, ``http.*``, ``mcp.SERVER.TOOL``).  The network
tools live in :mod:`host.tools.llm` (chat completions with token accounting),
:mod:`host.tools.http` (allowlisted HTTP) with its SSRF guard
:mod:`host.tools.netguard`, and :mod:`host.tools.mcp` (MCP servers, supervised, started or
reached as the operator config of :mod:`host.tools.mcp_config` says).
"""

from host.tools.registry import ToolContext, ToolError, ToolSpec, tool

__all__ = ["ToolContext", "ToolError", "ToolSpec", "tool"]
