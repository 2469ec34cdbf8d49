"""The one reader of what a request sends: its JSON body, its query numbers, its agent id.

Bodies are parsed by :mod:`host.sandbox.guest_json` (bounded depth, no lone surrogates,
numbers a double and 64 bits can hold): what a client sends often goes on to an agent, so
it is held to the same bounds as what an agent sends. Every refusal is ``invalid_input``.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request

from host.errors import AgentNotFound, InvalidInput
from host.runtime import Host
from host.sandbox import guest_json
from host.server.gateway import Principal

#: The tenant of an agent started without one (the CLI's embedded mode).
DEFAULT_TENANT = "default"


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object (``{}`` for an empty body when ``optional``)."""
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise InvalidInput("the request needs a JSON object body")
    try:
        text = raw.decode("utf-8")
        value = guest_json.parse(text)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"the body is not UTF-8: {exc}") from None
    except guest_json.PoisonValue as exc:
        raise InvalidInput(f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"the body must be a JSON object, not a {type(value).__name__}")
    return value


def number(value: Any, name: str, *, low: float, high: float | None = None) -> float:
    """A finite number within bounds (``high`` clamps rather than refuses: a long wait is capped)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidInput(f"{name} must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise InvalidInput(f"{name} must be a number >= {low:g}")
    return float(value) if high is None else min(float(value), high)


def optional_string(body: dict[str, Any], name: str, *, limit: int = 4096) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidInput(f"{name!r} must be a string of at most {limit} characters")
    return value


def tenant_of(rec: dict[str, Any]) -> str:
    return str(rec.get("tenant") or DEFAULT_TENANT)


def owned_agent(host: Host, agent_id: str, who: Principal) -> dict[str, Any]:
    """The agent's record if it belongs to the principal's tenant. Another tenant's agent is
    ``agent_not_found`` exactly as a missing one is, so ids of others do not leak; the
    message names no store path."""
    try:
        rec = host.get_agent(agent_id)
    except (AgentNotFound, ValueError):  # ValueError: not a key the store can hold
        rec = None
    return owned(rec, agent_id, who)


def owned(rec: dict[str, Any] | None, agent_id: str, who: Principal) -> dict[str, Any]:
    """``rec`` (an agent record already read) if it is the principal tenant's; else
    ``agent_not_found``, as :func:`owned_agent` answers."""
    if rec is None or tenant_of(rec) != who.tenant:
        raise AgentNotFound(f"no agent {agent_id[:64]}")
    return rec
