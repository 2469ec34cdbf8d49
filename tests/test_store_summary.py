"""The listing summary every commit writes beside the agent record (snapshots/summary.py):
packed straight from the record, it decodes to exactly what :func:`summary_of` says of the
record, whatever odd values a damaged or older record holds."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshots.errors import RecordCorrupt
from snapshots.summary import AgentSummary, decode_summary, encode_summary, summary_of

odd = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                st.lists(st.integers(), max_size=2))
records = st.fixed_dictionaries(
    {"agent_id": st.text(min_size=1, max_size=8)},
    optional={"name": st.one_of(st.text(), odd), "status": st.one_of(st.sampled_from(["running", "completed"]), odd),
              "usage": st.one_of(st.fixed_dictionaries({}, optional={"fuel_used": odd, "tool_calls": odd,
                                                                      "tokens": odd}), odd),
              "checkpoints": odd, "last_checkpoint_bytes": odd, "created_at": odd, "stall_timeout": odd,
              "last_progress": odd},
)


def _same(a: AgentSummary, b: AgentSummary) -> bool:
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(a, b, strict=True))


@settings(max_examples=400, deadline=None)
@given(records)
def test_the_stored_summary_decodes_to_the_summary_of_the_record(record: dict[str, Any]) -> None:
    expected = summary_of(record)
    status = expected.status
    if status is not None and len(status.encode("utf-8", "surrogatepass")) > 255:
        return  # a status is cut to 255 bytes on disk (no status is that long)
    if status == "":
        expected = expected._replace(status=None)  # stored as no status
    try:
        got = decode_summary(expected.agent_id, encode_summary(record))
    except RecordCorrupt:  # a lone surrogate in a name reads back as damage, never as another name
        assert any("\ud800" <= c <= "\udfff" for c in (expected.name or "") + (status or ""))
        return
    assert _same(got, expected), (got, expected)


@pytest.mark.parametrize(("value", "as_int", "as_float"), [
    (7, 7, 7.0), (True, 0, None), (3.7, 3, 3.7), (math.inf, 0, None), (math.nan, 0, None),
    (2**70, 2**63 - 1, float(2**70)), (-(2**70), -(2**63), float(-(2**70))), (10**400, 2**63 - 1, None),
    ("5", 0, None), (None, 0, None), ([1], 0, None),
])
def test_odd_values_read_as_before(value: Any, as_int: int, as_float: float | None) -> None:
    s = summary_of({"agent_id": "a", "usage": {"fuel_used": value}, "checkpoints": value, "created_at": value})
    assert (s.fuel_used, s.checkpoints, s.created_at) == (as_int, as_int, as_float)
    assert type(s.fuel_used) is int and isinstance(s, AgentSummary)
