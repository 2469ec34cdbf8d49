"""Built-in tools: a key-value store on the agent's LMDB store, a clock, and a log.

``kv.*`` are transactional: each runs inside the store transaction that
journals its result, so their effect and the record of it commit together.
Keys live in the agent's own namespace (private to one agent) unless the
policy grants more.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .registry import ToolContext, ToolError, ToolSpec, spec_from_function, tool

MAX_KEY = 512
MAX_VALUE = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KvGetArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)


class KvSetArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)
    value: Any = None


class KvIncrArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)
    by: int = Field(default=1, ge=-(1 << 53), le=1 << 53)


class NoArgs(_Strict):
    pass


class LogArgs(_Strict):
    level: str = "info"
    message: str = Field(max_length=65536)


@tool("kv.get", idempotent=True, transactional=True)
def kv_get(args: KvGetArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Read a key (null when absent)."""
    raw = txn.kv_get(ctx.kv_namespace, args.key)
    return {"value": None if raw is None else json.loads(raw)}


@tool("kv.set", idempotent=True, transactional=True)
def kv_set(args: KvSetArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Write a key to any JSON value."""
    raw = json.dumps(args.value, separators=(",", ":")).encode()
    if len(raw) > MAX_VALUE:
        raise ToolError("too_large", f"kv.set: value is {len(raw)} bytes; the limit is {MAX_VALUE}")
    txn.kv_set(ctx.kv_namespace, args.key, raw)
    return {}


@tool("kv.incr", idempotent=False, transactional=True)
def kv_incr(args: KvIncrArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Add ``by`` (default 1) to an integer key and return the new value, exactly once."""
    raw = txn.kv_get(ctx.kv_namespace, args.key)
    if raw is not None:
        try:
            current = json.loads(raw)
        except ValueError:
            current = None
        if not isinstance(current, int) or isinstance(current, bool):
            raise ToolError("invalid_args", f"kv.incr: key {args.key!r} does not hold an integer")
    else:
        current = 0
    value = current + args.by
    txn.kv_set(ctx.kv_namespace, args.key, str(value).encode())
    return {"value": value}


@tool("clock.now", idempotent=True)
def clock_now(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """The host's wall clock, in Unix milliseconds (recorded, so replays see the same time)."""
    return {"unix_ms": int(ctx.now() * 1000)}


@tool("log", idempotent=True)
def log_tool(args: LogArgs, ctx: ToolContext) -> dict[str, Any]:
    """Append a line to the agent's log (the `log` import does the same without a tool call)."""
    return {}


BUILTINS: dict[str, ToolSpec] = {
    spec.name: spec for spec in (spec_from_function(f) for f in (kv_get, kv_set, kv_incr, clock_now, log_tool))
}
