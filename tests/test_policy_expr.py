"""The approval condition language: parsing, precedence, three-valued evaluation."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.expr import (
    And,
    Compare,
    Condition,
    ConditionSyntaxError,
    Const,
    Not,
    Or,
    PathRef,
    Truthy,
)


def ev(text: str, args: Any) -> bool | None:
    return Condition.parse(text).evaluate(args)


@pytest.mark.parametrize(
    ("text", "args", "expected"),
    [
        ("amount > 50000", {"amount": 75000}, True),
        ("amount > 50000", {"amount": 50000}, False),
        ("amount >= 50000", {"amount": 50000}, True),
        ("amount < 10", {"amount": 9.5}, True),
        ("amount <= 10", {"amount": 10}, True),
        ("amount == 10", {"amount": 10.0}, True),
        ("amount != 10", {"amount": 11}, True),
        ("50000 < amount", {"amount": 75000}, True),
        ("amount > 50_000", {"amount": 50001}, True),
        ("amount > 1e3", {"amount": 1001}, True),
        ("amount > -5", {"amount": -1}, True),
        ("currency == 'EUR'", {"currency": "EUR"}, True),
        ('currency == "EUR"', {"currency": "USD"}, False),
        ("vendor.id == 'v1'", {"vendor": {"id": "v1"}}, True),
        ("items.0.price > 5", {"items": [{"price": 6}]}, True),
        ("urgent", {"urgent": True}, True),
        ("urgent", {"urgent": False}, False),
        ("urgent", {}, False),
        ("not urgent", {"urgent": False}, True),
        ("flag == true", {"flag": True}, True),
        ("flag == 1", {"flag": True}, False),
        ("note == null", {}, True),
        ("note != null", {"note": "x"}, True),
        ("true", {}, True),
        ("false", {}, False),
        ("name > 'm'", {"name": "z"}, True),
    ],
)
def test_evaluation(text: str, args: Any, expected: bool) -> None:
    assert ev(text, args) is expected


@pytest.mark.parametrize(
    ("text", "args"),
    [
        ("amount > 50000", {}),
        ("amount > 50000", {"amount": "75000"}),
        ("amount > 50000", {"amount": True}),
        ("amount > 50000", {"amount": None}),
        ("name > 5", {"name": "z"}),
        ("urgent", {"urgent": "yes"}),
        ("not (amount > 5)", {}),
    ],
)
def test_unknown_fails_closed(text: str, args: Any) -> None:
    assert ev(text, args) is None


def test_kleene_logic() -> None:
    # false and unknown = false; true or unknown = true; otherwise unknown.
    assert ev("amount > 5 and flag", {"flag": False}) is False
    assert ev("amount > 5 or flag", {"flag": True}) is True
    assert ev("amount > 5 and flag", {"flag": True}) is None
    assert ev("amount > 5 or flag", {"flag": False}) is None


def test_precedence_and_binds_tighter_than_or() -> None:
    c = Condition.parse("a or b and c")
    assert c.ast == Or(
        (Truthy(PathRef(("a",))), And((Truthy(PathRef(("b",))), Truthy(PathRef(("c",))))))
    )
    assert ev("a or b and c", {"a": True, "b": False, "c": False}) is True
    assert ev("(a or b) and c", {"a": True, "b": False, "c": False}) is False


def test_precedence_not_binds_tightest() -> None:
    c = Condition.parse("not a and b")
    assert c.ast == And((Not(Truthy(PathRef(("a",)))), Truthy(PathRef(("b",)))))
    assert Condition.parse("not amount > 5").ast == Not(
        Compare(PathRef(("amount",)), ">", Const(5))
    )
    assert ev("not not a", {"a": True}) is True


def test_paths_and_bindings() -> None:
    c = Condition.parse("amount > 5 and vendor.id == 'x' or amount < 0")
    assert [str(p) for p in c.paths()] == ["amount", "vendor.id"]
    assert c.bindings({"amount": 7}) == "amount = 7, vendor.id = (missing)"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty condition"),
        ("amount >> 5", "column 9"),
        ("amount = 5", "write '=='"),
        ("amount > 5 && x", "write 'and'"),
        ("a || b", "write 'or'"),
        ("!a", "write 'not'"),
        ("amount > 5 AND x", "lowercase"),
        ("(amount > 5", "expected ')'"),
        ("amount > 5)", "unexpected ')'"),
        ("amount 5", "comparison operator"),
        ("5 > 3", "at least one argument"),
        ("1 < a < 5", "chained"),
        ("a > 'unterminated", "unterminated string"),
        ("a > 5x", "invalid number"),
        ("a > #", "unexpected character"),
        ("42", "comparison operator"),
        ("(a) > 5", "parenthesised"),
        ("a and", "expected an argument name"),
    ],
)
def test_syntax_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConditionSyntaxError, match=re.escape(fragment)):
        Condition.parse(text)


# --- property: printing an AST and parsing it back gives the same meaning -----------

names = st.sampled_from(["a", "b", "c", "amount", "vendor.id"])
consts = st.one_of(st.integers(-100, 100), st.sampled_from(["x", "y"]), st.booleans(), st.none())
ops = st.sampled_from([">", ">=", "<", "<=", "==", "!="])
leaves = st.one_of(
    st.builds(
        lambda n, o, v: Compare(PathRef(tuple(n.split("."))), o, Const(v)), names, ops, consts
    ),
    st.builds(lambda n: Truthy(PathRef(tuple(n.split(".")))), names),
)
trees = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(Not, inner),
        st.builds(lambda xs: And(tuple(xs)), st.lists(inner, min_size=2, max_size=3)),
        st.builds(lambda xs: Or(tuple(xs)), st.lists(inner, min_size=2, max_size=3)),
    ),
    max_leaves=8,
)
values = st.one_of(st.integers(-100, 100), st.sampled_from(["x", "y"]), st.booleans(), st.none())
arg_docs = st.fixed_dictionaries(
    {},
    optional={
        "a": values,
        "b": values,
        "c": values,
        "amount": values,
        "vendor": st.fixed_dictionaries({}, optional={"id": values}),
    },
)


@given(trees, arg_docs)
def test_round_trip_preserves_meaning(tree: Any, args: dict[str, Any]) -> None:
    from policies.expr import evaluate

    reparsed = Condition.parse(str(tree))
    assert reparsed.evaluate(args) == evaluate(tree, args)
