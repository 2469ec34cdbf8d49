"""snapshots.fastjson writes the standard library's bytes, whatever the value.

Why it matters: audit hashes are recomputed by the verifier with the standard library,
digests of arguments and results are compared with digests older versions stored, and
agent records and journal entries written by earlier versions must read back the same;
so the fast encoder may never write other bytes than ``json.dumps`` did, NaN, exponents,
surrogates, int keys and huge ints included (those go to the standard library).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snapshots import fastjson


def std_compact(obj: Any, allow_nan: bool = True) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan).encode()


def std_canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=1e-6, max_value=1e-3), st.floats(min_value=1e15, max_value=1e17),
    st.sampled_from([0.0, -0.0, 1e-4, 9.999999999999999e-5, 1e16, 9999999999999998.0, 1e-05, 1.5e16]),
)
ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**64 + 2),
                 st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2))
texts = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF))  # lone surrogates too
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.tuples(inner, inner),
                            st.dictionaries(texts, inner, max_size=5)),
    max_leaves=30,
)


def outcome(encode: Any, value: Any) -> bytes | type[BaseException]:
    """The bytes, or the type of the error (a lone surrogate fails either way: UTF-8 has none)."""
    try:
        return bytes(encode(value))
    except (TypeError, ValueError) as exc:
        return type(exc)


@settings(max_examples=600, deadline=None)
@given(values)
def test_same_bytes_as_the_standard_library(value: Any) -> None:
    assert outcome(fastjson.compact, value) == outcome(std_compact, value)
    assert outcome(fastjson.canonical, value) == outcome(std_canonical, value)
    assert (outcome(lambda v: fastjson.compact(v, allow_nan=False), value)
            == outcome(lambda v: std_compact(v, allow_nan=False), value))


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_float_alone_and_in_a_record(x: float) -> None:
    assert fastjson.compact(x) == std_compact(x)
    record = {"t": x, "usage": {"recent": [x, -x]}}
    assert fastjson.canonical(record) == std_canonical(record)


@pytest.mark.parametrize("value", [
    float("nan"), [math.inf], {"a": -math.inf},  # orjson would write null
    {1: "int key"}, {"b": 1, 2: "mixed"}, {True: 1, None: 2},  # orjson refuses non-string keys
    "\ud800", {"k": "\udfff"},  # lone surrogates: orjson refuses (and so does UTF-8)
    2**64, -(2**63) - 1,  # beyond 64 bits: orjson refuses
    1e-7, 0.00001, 1e16, 1.5e300,  # exponents: orjson writes them its own way
])
def test_values_orjson_writes_otherwise_fall_back(value: Any) -> None:
    assert outcome(fastjson.compact, value) == outcome(std_compact, value)
    assert outcome(fastjson.canonical, value) == outcome(std_canonical, value)


def test_what_the_standard_library_refuses_is_refused_alike() -> None:
    class Thing:
        pass

    for bad in (Thing(), {"a": {1, 2}}, {"k": b"bytes"}):
        with pytest.raises(TypeError):
            std_compact(bad)
        with pytest.raises(TypeError):
            fastjson.compact(bad)
    circular: list[Any] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        fastjson.compact(circular)
    with pytest.raises(ValueError):
        fastjson.compact({"x": math.nan}, allow_nan=False)


def test_deep_nesting_falls_back() -> None:
    deep: Any = 0
    for _ in range(300):  # beyond orjson's 254 levels
        deep = [deep]
    assert fastjson.compact(deep) == std_compact(deep)
    assert fastjson.canonical(deep) == std_canonical(deep)


def test_the_encoding_bench_runs_on_a_real_run_s_values() -> None:
    """``bench/commit_encoding.py`` checks both encoders write the same bytes before timing them."""
    from bench import commit_encoding

    out = commit_encoding.run(rounds=1)
    assert set(out["us"]) == {"agent_record", "journal_entry", "audit_step"}
    assert out["bytes"]["agent_record"] > 500 and all(r["fast_best"] > 0 for r in out["us"].values())
