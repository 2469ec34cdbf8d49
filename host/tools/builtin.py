"""Built-in tools: a key-value store on the agent's LMDB store, a clock, a durable sleep, a log, and
the network tools (``llm.*``, ``http.*``, ``mcp.SERVER.TOOL``).

``kv.*`` are transactional: each runs inside the store transaction that
journals its result, so their effect and the record of it commit together.
Keys live in the agent's own namespace (private to one agent) unless the call
names a ``namespace`` that the grant lists in ``namespaces``: a shared
namespace, the same for every agent on this store whose policy grants it.
Read and write access are granted separately (``kv.get`` and ``kv.set`` /
``kv.incr`` each have their own grant), so a namespace can be read-only.

:data:`BUILTINS` resolves tool *families*: every ``llm.NAME`` is an
``llm.chat``, every ``http.NAME`` an ``http.fetch`` and every
``mcp.SERVER.TOOL`` a call to an MCP server, each configured by its own grant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from host.tools.registry import AnyArgs, ToolContext, ToolError, ToolSpec, spec_from_function, tool
from policies.paths import locator
from policies.schema import tool_kind
from snapshots.errors import RecordCorrupt

MAX_KEY = 512
MAX_VALUE = 1 << 20
MAX_SLEEP_MS = 30 * 24 * 3600 * 1000  # a month: longer waits are a schedule, not a sleep


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class KvGetArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)
    namespace: str | None = Field(default=None, min_length=1, max_length=64)


class KvSetArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)
    value: Any = None
    namespace: str | None = Field(default=None, min_length=1, max_length=64)


class KvIncrArgs(_Strict):
    key: str = Field(min_length=1, max_length=MAX_KEY)
    by: int = Field(default=1, ge=-(1 << 53), le=1 << 53)
    namespace: str | None = Field(default=None, min_length=1, max_length=64)


SHARED_PREFIX = "shared:"


def kv_namespace(tool_name: str, namespace: str | None, ctx: ToolContext) -> str:
    """The store namespace of a call: the agent's own, or a shared one its grant lists.

    Shared namespaces live under ``shared:NAME`` in the store, apart from every
    agent's private ``agent:ID`` namespace, so no name a guest can choose
    reaches another agent's private data.
    """
    if namespace is None:
        return ctx.kv_namespace
    granted = tuple(getattr(ctx.grant, "namespaces", ()) or ())
    if namespace not in granted:
        raise ToolError(
            "denied",
            f"{tool_name}: namespace {namespace!r} is not granted"
            + (f" (granted: {', '.join(granted)})" if granted else " (this grant lists no shared namespaces)"),
            rule=locator("tools", tool_name, "namespaces"),
            reason_code="namespace_not_granted",
        )
    return SHARED_PREFIX + namespace


def _read(tool_name: str, txn: Any, namespace: str, key: str) -> bytes | None:
    """A stored value, or a typed error when it does not match its digest: never wrong data.

    The store checks each kv value against the digest written with it; a value changed
    on disk becomes ``record_corrupt`` for the guest, which may report it or go on.
    """
    try:
        raw: bytes | None = txn.kv_get(namespace, key)
    except RecordCorrupt as exc:
        raise ToolError("record_corrupt", f"{tool_name}: the stored value of key {key!r} is damaged: {exc}") from exc
    return raw


class NoArgs(_Strict):
    pass


class SleepArgs(_Strict):
    """``timer.sleep``: ``{"ms": N}`` (a duration) or ``{"until": unix_seconds}`` (a time), one of them."""

    ms: float | None = Field(default=None, ge=0, le=MAX_SLEEP_MS, allow_inf_nan=False)
    until: float | None = Field(default=None, ge=0, le=4102444800, allow_inf_nan=False)  # before 2100

    @model_validator(mode="after")
    def _one(self) -> SleepArgs:
        if (self.ms is None) == (self.until is None):
            raise ValueError('give exactly one of "ms" (milliseconds) or "until" (Unix seconds)')
        return self

    def wake_at(self, now: float) -> float:
        """The Unix time the sleep ends (``until`` in the past: now, it has ended); an
        ``until`` more than :data:`MAX_SLEEP_MS` ahead is ``invalid_args``, as such an ``ms`` is."""
        if self.ms is not None:
            return now + self.ms / 1000.0
        assert self.until is not None
        if self.until - now > MAX_SLEEP_MS / 1000:
            raise ToolError("invalid_args", f"timer.sleep: until is more than 30 days ahead ({self.until - now:.0f}s)")
        return max(now, self.until)


class LogArgs(_Strict):
    level: str = "info"
    message: str = Field(max_length=65536)


@tool("kv.get", idempotent=True, transactional=True)
def kv_get(args: KvGetArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Read a key (null when absent)."""
    raw = _read("kv.get", txn, kv_namespace("kv.get", args.namespace, ctx), args.key)
    if raw is None:
        return {"value": None}
    try:
        return {"value": json.loads(raw)}
    except ValueError as exc:  # a value from before seals, damaged: no digest could tell
        raise ToolError("record_corrupt", f"kv.get: the stored value of key {args.key!r} is not JSON") from exc


@tool("kv.set", idempotent=True, transactional=True)
def kv_set(args: KvSetArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Write a key to any JSON value."""
    raw = json.dumps(args.value, separators=(",", ":")).encode()
    if len(raw) > MAX_VALUE:
        raise ToolError("too_large", f"kv.set: value is {len(raw)} bytes; the limit is {MAX_VALUE}")
    txn.kv_set(kv_namespace("kv.set", args.namespace, ctx), args.key, raw)
    return {}


@tool("kv.incr", idempotent=False, transactional=True)
def kv_incr(args: KvIncrArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Add ``by`` (default 1) to an integer key and return the new value, exactly once."""
    ns = kv_namespace("kv.incr", args.namespace, ctx)
    raw = _read("kv.incr", txn, ns, args.key)
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
    txn.kv_set(ns, args.key, str(value).encode())
    return {"value": value}


@tool("clock.now", idempotent=True)
def clock_now(args: NoArgs, ctx: ToolContext) -> dict[str, Any]:
    """The host's wall clock, in Unix milliseconds (recorded, so replays see the same time)."""
    return {"unix_ms": int(ctx.now() * 1000)}


@tool("timer.sleep", idempotent=True)
def timer_sleep(args: SleepArgs, ctx: ToolContext) -> dict[str, Any]:
    """The answer to a sleep that has ended: how long it slept, counted from the call
    (``slept_ms``: the ``ms`` asked, or from the call's journaled intent to ``until``), and
    the host's clock at waking (``unix_ms``).

    The waiting is the runtime's (:mod:`host.runtime.timers`): it journals the wake time
    with the call's intent, holds a short sleep in-process and hibernates the agent through
    a long one, and a resume after a crash waits for that same time; this runs once the time
    has come, like any tool, and its answer is journaled like any other."""
    slept = args.ms
    if slept is None:
        slept = 0.0
        if ctx.store is not None:
            with ctx.store.read() as txn:
                entry = txn.get_journal(ctx.agent_id, ctx.call_seq)
            t, at = (entry.get("t"), entry.get("wake_at")) if isinstance(entry, dict) else (None, None)
            if isinstance(t, int | float) and isinstance(at, int | float):
                slept = max(0.0, (at - t) * 1000)
    return {"slept_ms": int(slept), "unix_ms": int(ctx.now() * 1000)}


@tool("log", idempotent=True)
def log_tool(args: LogArgs, ctx: ToolContext) -> dict[str, Any]:
    """Append a line to the agent's log (the `log` import does the same without a tool call)."""
    return {}


def _family_spec(name: str, kind: str) -> ToolSpec:
    """The spec of one member of a tool family, bound to its name (for rule locators and MCP routing).

    Declared idempotent: the runtime lowers it to what the grant says (a grant
    may only tighten), and the policy's default for each family is the safe
    one (``http.*`` is idempotent only for GET/HEAD/OPTIONS, ``mcp.*`` never
    unless the policy says so).
    """
    # The network tools (httpx, jsonschema, the MCP SDK) load on first use, not with the CLI.
    if kind == "llm.chat":
        from host.tools import llm as llm_tool

        async def llm(args: llm_tool.ChatArgs, ctx: ToolContext) -> dict[str, Any]:
            return await llm_tool.chat(args, ctx, tool=name)

        return ToolSpec(name, llm, llm_tool.ChatArgs, idempotent=True,
                        description="a chat completion from the LLM the grant names")
    if kind == "http.fetch":
        from host.tools import http as http_tool

        async def fetch(args: http_tool.FetchArgs, ctx: ToolContext) -> dict[str, Any]:
            return await http_tool.fetch(args, ctx, tool=name)

        return ToolSpec(name, fetch, http_tool.FetchArgs, idempotent=True, canonical=http_tool.canonical_args,
                        description="an HTTP request to a host on the grant's allowlist")

    from host.tools import mcp as mcp_tool

    async def mcp(args: AnyArgs, ctx: ToolContext) -> dict[str, Any]:
        return await mcp_tool.call_tool(args, ctx, tool=name)

    async def rerun_safe(ctx: ToolContext) -> bool:
        return await mcp_tool.rerun_safe(ctx, tool=name)

    return ToolSpec(name, mcp, AnyArgs, idempotent=True, description="a tool of an MCP server",
                    rerun_safe=rerun_safe)


_FAMILIES = frozenset({"llm.chat", "http.fetch", "mcp"})


class _Builtins(Mapping[str, ToolSpec]):
    """The fixed builtins plus the families ``llm.*``, ``http.*``, ``mcp.SERVER.TOOL``.

    Iteration lists the fixed ones; lookups also resolve family members, so the
    runtime's ``name in BUILTINS`` / ``BUILTINS[name]`` works for every name a
    policy can grant without a handler.
    """

    def __init__(self, fixed: dict[str, ToolSpec]) -> None:
        self._fixed = fixed
        self._family: dict[str, ToolSpec] = {}

    def __getitem__(self, name: str) -> ToolSpec:
        spec = self._fixed.get(name) or self._family.get(name)
        if spec is not None:
            return spec
        kind = tool_kind(name)
        if kind not in _FAMILIES:
            raise KeyError(name)
        spec = self._family[name] = _family_spec(name, kind)
        return spec

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self._fixed:
            return True
        return tool_kind(name) in _FAMILIES

    def __iter__(self) -> Iterator[str]:
        return iter(self._fixed)

    def __len__(self) -> int:
        return len(self._fixed)


BUILTINS: Mapping[str, ToolSpec] = _Builtins(
    {spec.name: spec for spec in (spec_from_function(f) for f in (kv_get, kv_set, kv_incr, clock_now, timer_sleep,
                                                                          log_tool))}
)  # llm.chat and http.fetch resolve as members of their families, on first use
