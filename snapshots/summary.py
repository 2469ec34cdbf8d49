"""The few fields of an agent record that a listing shows, as a small fixed record.

Why a second record per agent: ``torpor ps`` on a store of 10,000 agents must answer in
150 ms, and decoding 10,000 agent records of about 1 KB of JSON each (to show eight
fields of each) took most of that alone. The store writes this summary beside the agent
record in the same transaction (so the two never disagree after a commit), and a lister
reads only summaries: one ``struct`` unpack and two short UTF-8 decodes per agent.

The summary is derived data, never read back into an agent: a summary that does not
decode (bytes on disk are not trusted) is :class:`~snapshots.errors.RecordCorrupt`,
and the store then derives it again from the agent record, or gives the record's
stand-in.
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

from .errors import RecordCorrupt

__all__ = ["AgentSummary", "decode_summary", "encode_summary", "summary_of"]

# version, len(status), then fuel_used, tool_calls, tokens, checkpoints,
# last_checkpoint_bytes, created_at, stall_timeout, last_progress; then status, then name.
_HEAD = struct.Struct("<BBqqqqqddd")
_VERSION = 1
_NONE = math.nan  # a float field the record does not have
_I64 = (-(2**63), 2**63 - 1)


class AgentSummary(NamedTuple):
    """What ``torpor ps`` shows of one agent (and what it needs to flag a stalled one)."""

    agent_id: str
    name: str | None
    status: str | None
    fuel_used: int
    tool_calls: int
    tokens: int
    checkpoints: int
    last_checkpoint_bytes: int
    created_at: float | None
    stall_timeout: float | None
    last_progress: float | None


def _int(value: Any) -> int:
    if type(value) is int and _I64[0] <= value <= _I64[1]:  # the usual case, first: every commit encodes five
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if isinstance(value, float):
        if not math.isfinite(value):
            return 0
        value = int(value)
    return min(max(int(value), _I64[0]), _I64[1])  # an int beyond 64 bits: clamped, never an OverflowError


def _float(value: Any) -> float | None:
    if type(value) is float:  # the usual case, first
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond the float range
        return None
    return f if math.isfinite(f) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _fields(record: dict[str, Any]) -> tuple[Any, ...]:
    """The fields of :class:`AgentSummary`, in order, from an agent record."""
    usage = record.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    get, uget = record.get, usage.get
    return (
        str(get("agent_id")), _text(get("name")), _text(get("status")),
        _int(uget("fuel_used", 0)), _int(uget("tool_calls", 0)), _int(uget("tokens", 0)),
        _int(get("checkpoints", 0)), _int(get("last_checkpoint_bytes", 0)),
        _float(get("created_at")), _float(get("stall_timeout")), _float(get("last_progress")),
    )


def summary_of(record: dict[str, Any]) -> AgentSummary:
    """The summary of an agent record (a stand-in for a damaged one has no usage: zeros)."""
    return _new(AgentSummary, _fields(record))


def encode_summary(record: dict[str, Any]) -> bytes:
    """The stored form of :func:`summary_of` ``(record)`` (the agent id is the key, not stored).

    Every commit of an agent writes one: packed straight from the fields, no summary built."""
    _, name, status, fuel, calls, tokens, cps, last, created, stall, progress = _fields(record)
    # surrogatepass: a name is the host's own text, but never let a listing's record fail a commit
    raw_status = (status or "").encode("utf-8", "surrogatepass")[:255]
    raw_name = b"\xff" if name is None else name.encode("utf-8", "surrogatepass")
    return _HEAD.pack(_VERSION, len(raw_status), fuel, calls, tokens, cps, last,
                      _NONE if created is None else created, _NONE if stall is None else stall,
                      _NONE if progress is None else progress) + raw_status + raw_name


_new = tuple.__new__  # AgentSummary's generated __new__ costs a keyword-argument call per agent


# Statuses and names repeat across agents: decode each distinct one once per process.
_TEXT: dict[bytes, str] = {}
_TEXT_MAX = 4096


def _decode_text(raw: bytes) -> str:
    text = _TEXT.get(raw)
    if text is None:
        text = raw.decode()
        if len(_TEXT) < _TEXT_MAX:
            _TEXT[raw] = text
    return text


def decode_summary(agent_id: str, raw: bytes) -> AgentSummary:
    """The summary stored for ``agent_id``; :class:`RecordCorrupt` if ``raw`` is not one.

    This runs once per agent in ``torpor ps``: it is written for speed.
    """
    try:
        version, n, fuel, calls, tokens, cps, last, created, stall, progress = _HEAD.unpack_from(raw)
        end = _HEAD.size + n
        if version != _VERSION or len(raw) < end:
            raise ValueError(f"version {version}" if version != _VERSION else "cut short")
        tail = raw[end:]
        return _new(AgentSummary, (
            agent_id, None if tail == b"\xff" else _decode_text(tail), _decode_text(raw[_HEAD.size : end]) if n else None,
            fuel, calls, tokens, cps, last,
            None if created != created else created,  # NaN: the record has none
            None if stall != stall else stall, None if progress != progress else progress))
    except (struct.error, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise RecordCorrupt(f"the listing summary of agent {agent_id} does not decode ({exc})") from None
