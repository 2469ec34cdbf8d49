"""What MCP servers offer, asked of the servers themselves: ``torpor mcp tools`` and
``torpor policy check --connect``.

A policy names a server's tools from memory; the server is the authority.  This module
connects to each server a policy names (through the process-wide supervisor, as a call
would), lists its tools with their input and output schemas and annotations, and holds
every grant against that listing, so that a misspelt grant is found when the policy is
checked, not when an agent first calls it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from host.tools.mcp import SUPERVISOR, TASK_REQUIRED
from host.tools.mcp_config import OperatorConfig, resolve
from host.tools.registry import ToolError
from policies.errors import PolicyIssue
from policies.schema import mcp_tool_parts


@dataclass
class Listing:
    """One server as it answered (``tools``), or why it could not be asked (``error``)."""

    server: str
    where: str
    tools: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"server": self.server, "where": self.where, "tools": self.tools}
        if self.error is not None:
            out["error"] = {"code": self.error_code, "message": self.error}
        return out


async def list_server(name: str, spec: Any, secrets: dict[str, str], operator: OperatorConfig | None = None) -> Listing:
    """Connect to ``[mcp.NAME]`` (``spec``, its credentials from ``secrets``) as this host's
    operator config provides it, and list its tools."""
    try:
        config = resolve(name, spec, operator, secrets)
    except ToolError as exc:
        return Listing(name, str(spec.url or spec.command or "not configured"), error=str(exc),
                       error_code=str(exc.details.get("reason_code") or exc.code))
    try:
        tools = await SUPERVISOR.list_tools(config)
    except ToolError as exc:
        return Listing(name, config.where(), error=str(exc), error_code=str(exc.details.get("reason_code") or exc.code))
    return Listing(name, config.where(), sorted(tools, key=lambda t: str(t["name"])))


async def list_policy_servers(policy: Any, secrets: dict[str, str],
                              operator: OperatorConfig | None = None) -> dict[str, Listing]:
    """Every server of a policy, listed (one after the other: a CLI check, not a hot path)."""
    return {name: await list_server(name, spec, secrets, operator) for name, spec in sorted(policy.mcp.items())}


def grant_issues(policy: Any, listings: dict[str, Listing]) -> list[PolicyIssue]:
    """Every grant of an MCP tool (and every name in ``[mcp.NAME].tools``) that its server
    does not offer, with the nearest name it does; a server that could not be asked is one
    issue of its own."""
    issues: list[PolicyIssue] = []
    for name, failed in sorted(listings.items()):
        if failed.error is not None:
            issues.append(PolicyIssue(f"mcp.{name}: the server could not be asked for its tools: {failed.error}",
                                      f"mcp.{name}"))
    wanted: dict[tuple[str, str], str] = {}
    for grant in sorted(policy.grants):
        parts = mcp_tool_parts(grant)
        if parts is not None:
            wanted.setdefault(parts, f'tools."{grant}"')
    for server, spec in sorted(policy.mcp.items()):
        for tool in spec.tools:
            wanted[(server, tool)] = f"mcp.{server}.tools"
    for (server, tool), where in sorted(wanted.items()):
        listing = listings.get(server)
        if listing is None or listing.error is not None:
            continue
        offered = [str(t["name"]) for t in listing.tools]
        if tool in offered:
            found = next(t for t in listing.tools if t["name"] == tool)
            if found.get("task_support") == "required":
                issues.append(PolicyIssue(f"{where}: {tool}: {TASK_REQUIRED}", where))
            continue
        guess = difflib.get_close_matches(tool, offered, n=1, cutoff=0.6)
        hint = f" — did you mean {guess[0]!r}?" if guess else f" (it offers {', '.join(offered) or 'no tools'})"
        issues.append(PolicyIssue(f"{where}: the MCP server {server} offers no tool {tool!r}{hint}", where,
                                  guess[0] if guess else None))
    return issues


def shutdown() -> None:
    """Stop the servers a listing started (a CLI process ends after it)."""
    SUPERVISOR.close()
