"""The approval condition language (``approval.when``).

A policy says when a call needs a human in one line, e.g.
``amount > 50000 and not vendor.preferred``.  The language is deliberately
tiny so that it can be read at a glance, parsed once at load time (a mistake
is a load error, not a surprise at three in the morning) and evaluated with no
way to run code: there is no ``eval``, no function calls, no arithmetic.

Grammar (lowest precedence first)::

    condition  := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | primary
    primary    := "(" condition ")" | operand [op operand]
    op         := ">" | ">=" | "<" | "<=" | "==" | "!="
    operand    := path | number | string | "true" | "false" | "null"
    path       := name ("." (name | digits))*      e.g. amount, vendor.id, items.0.price

A path on its own (``urgent``) is true when the argument is the boolean
``true``.  Numbers may use underscores (``50_000``).  Strings take single or
double quotes.

Evaluation is three-valued, because an approval rule must fail closed: if
``amount > 50000`` is asked of a call whose ``amount`` is missing or is the
string ``"75000"``, the answer is *unknown*, not *false*, and an unknown
condition requires approval.  ``==`` and ``!=`` are always decidable: a missing
argument equals ``null``; booleans never equal numbers.  ``and``, ``or`` and
``not`` follow Kleene logic (``false and unknown`` is false, ``true or
unknown`` is true).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Scalar = str | int | float | bool | None

_OPS = (">=", "<=", "==", "!=", ">", "<")
_NUMBER = re.compile(r"-?\d+(?:_\d+)*(?:\.\d+(?:_\d+)*)?(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.(?:[A-Za-z0-9_-]+))*")
_KEYWORDS = {"and", "or", "not", "true", "false", "null"}
_MISSING = object()


class ConditionSyntaxError(ValueError):
    """A condition that does not parse; the message names the column."""


# --- AST ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PathRef:
    """An argument path, e.g. ``vendor.id``."""

    segments: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.segments)


@dataclass(frozen=True)
class Const:
    """A literal: number, string, boolean or null."""

    value: Scalar

    def __str__(self) -> str:
        return _render_scalar(self.value)


Operand = PathRef | Const


@dataclass(frozen=True)
class Compare:
    """``left op right``."""

    left: Operand
    op: str
    right: Operand

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class Truthy:
    """A path on its own: true when the argument is the boolean ``true``."""

    path: PathRef

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class ConstCondition:
    """``true`` or ``false`` on its own (always / never)."""

    value: bool

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True)
class Not:
    operand: Node

    def __str__(self) -> str:
        return f"not {_paren(self.operand)}"


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " and ".join(_paren(o) for o in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " or ".join(_paren(o) for o in self.operands)


Node = Compare | Truthy | ConstCondition | Not | And | Or


def _paren(node: Node) -> str:
    return f"({node})" if isinstance(node, And | Or) else str(node)


def _render_scalar(value: Scalar) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# --- tokens ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tok:
    kind: str  # "(", ")", "op", "and", "or", "not", "const", "path", "end"
    text: str
    pos: int
    value: Any = None


def _error(source: str, pos: int, message: str) -> ConditionSyntaxError:
    return ConditionSyntaxError(f"{message} at column {pos + 1} of {source!r}")


def _tokenize(source: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    n = len(source)
    while i < n:
        c = source[i]
        if c.isspace():
            i += 1
            continue
        if c in "()":
            toks.append(_Tok(c, c, i))
            i += 1
            continue
        two = source[i : i + 2]
        if two in ("&&", "||"):
            word = "and" if two == "&&" else "or"
            raise _error(source, i, f"unexpected {two!r}; write {word!r}")
        op = next((o for o in _OPS if source.startswith(o, i)), None)
        if op is not None:
            toks.append(_Tok("op", op, i))
            i += len(op)
            continue
        if c == "=":
            raise _error(source, i, "unexpected '='; write '==' to compare")
        if c == "!":
            raise _error(source, i, "unexpected '!'; write 'not' or '!='")
        if c in "'\"":
            j = i + 1
            chars: list[str] = []
            while j < n and source[j] != c:
                if source[j] == "\\" and j + 1 < n:
                    nxt = source[j + 1]
                    chars.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
                    j += 2
                else:
                    chars.append(source[j])
                    j += 1
            if j >= n:
                raise _error(source, i, "unterminated string")
            toks.append(_Tok("const", source[i : j + 1], i, "".join(chars)))
            i = j + 1
            continue
        m = _NUMBER.match(source, i)
        if m is not None and (c.isdigit() or c == "-"):
            text = m.group(0)
            end = m.end()
            if end < n and (source[end].isalnum() or source[end] in "_."):
                raise _error(source, i, f"invalid number {source[i : end + 1]!r}...")
            clean = text.replace("_", "")
            num: int | float = float(clean) if any(ch in clean for ch in ".eE") else int(clean)
            toks.append(_Tok("const", text, i, num))
            i = end
            continue
        m = _WORD.match(source, i)
        if m is not None:
            word = m.group(0)
            low = word.lower()
            if low in _KEYWORDS and word != low:
                raise _error(source, i, f"write {low!r} in lowercase, not {word!r}")
            if word in ("and", "or", "not"):
                toks.append(_Tok(word, word, i))
            elif word in ("true", "false", "null"):
                toks.append(
                    _Tok("const", word, i, {"true": True, "false": False, "null": None}[word])
                )
            else:
                toks.append(_Tok("path", word, i, tuple(word.split("."))))
            i = m.end()
            continue
        raise _error(source, i, f"unexpected character {c!r}")
    toks.append(_Tok("end", "", n))
    return toks


# --- parser ------------------------------------------------------------------------


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.toks = _tokenize(source)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def advance(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, message: str, tok: _Tok | None = None) -> ConditionSyntaxError:
        t = tok or self.tok
        return _error(self.source, t.pos, message)

    def describe(self, tok: _Tok) -> str:
        return "end of condition" if tok.kind == "end" else repr(tok.text)

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail("empty condition; write e.g. 'amount > 50000'")
        node = self.parse_or()
        if self.tok.kind != "end":
            raise self.fail(
                f"unexpected {self.describe(self.tok)}; expected 'and', 'or' or the end"
            )
        return node

    def parse_or(self) -> Node:
        items = [self.parse_and()]
        while self.tok.kind == "or":
            self.advance()
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Node:
        items = [self.parse_not()]
        while self.tok.kind == "and":
            self.advance()
            items.append(self.parse_not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_not(self) -> Node:
        if self.tok.kind == "not":
            self.advance()
            return Not(self.parse_not())
        return self.parse_primary()

    def parse_operand(self) -> Operand:
        t = self.tok
        if t.kind == "path":
            self.advance()
            return PathRef(t.value)
        if t.kind == "const":
            self.advance()
            return Const(t.value)
        raise self.fail(f"expected an argument name or a value, got {self.describe(t)}")

    def parse_primary(self) -> Node:
        if self.tok.kind == "(":
            open_tok = self.advance()
            node = self.parse_or()
            if self.tok.kind != ")":
                raise self.fail(
                    f"expected ')' to close the '(' at column {open_tok.pos + 1}, got {self.describe(self.tok)}"
                )
            self.advance()
            if self.tok.kind == "op":
                raise self.fail(
                    "cannot compare a parenthesised condition; compare an argument with a value"
                )
            return node
        left_tok = self.tok
        left = self.parse_operand()
        if self.tok.kind != "op":
            if isinstance(left, PathRef) and self.tok.kind not in ("const", "path"):
                return Truthy(left)
            if isinstance(left, Const) and isinstance(left.value, bool):
                return ConstCondition(left.value)
            raise self.fail(
                f"expected a comparison operator (>, >=, <, <=, ==, !=) after {left_tok.text!r}, got {self.describe(self.tok)}"
            )
        op = self.advance().text
        right = self.parse_operand()
        if isinstance(left, Const) and isinstance(right, Const):
            raise self.fail(
                "a comparison needs at least one argument name; both sides are values", left_tok
            )
        if self.tok.kind == "op":
            raise self.fail(
                f"chained comparisons are not supported; write e.g. 'x > 1 and x < 5' instead of {op!r} ... {self.tok.text!r}"
            )
        return Compare(left, op, right)


# --- evaluation --------------------------------------------------------------------


def _lookup(args: Any, segments: tuple[str, ...]) -> Any:
    value = args
    for seg in segments:
        if isinstance(value, Mapping):
            if seg not in value:
                return _MISSING
            value = value[seg]
        elif isinstance(value, Sequence) and not isinstance(value, str) and seg.isdigit():
            idx = int(seg)
            if idx >= len(value):
                return _MISSING
            value = value[idx]
        else:
            return _MISSING
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if (
        isinstance(a, Sequence)
        and isinstance(b, Sequence)
        and not isinstance(a, str)
        and not isinstance(b, str)
    ):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _operand_value(op: Operand, args: Any) -> Any:
    if isinstance(op, Const):
        return op.value
    return _lookup(args, op.segments)


def evaluate(node: Node, args: Any) -> bool | None:
    """Evaluate ``node`` against ``args``; ``None`` means *unknown*."""
    if isinstance(node, Compare):
        a = _operand_value(node.left, args)
        b = _operand_value(node.right, args)
        if node.op in ("==", "!="):
            a = None if a is _MISSING else a
            b = None if b is _MISSING else b
            eq = json_equal(a, b)
            return eq if node.op == "==" else not eq
        if not ((_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))):
            return None
        if node.op == ">":
            return bool(a > b)
        if node.op == ">=":
            return bool(a >= b)
        if node.op == "<":
            return bool(a < b)
        return bool(a <= b)
    if isinstance(node, Truthy):
        v = _lookup(args, node.path.segments)
        if v is _MISSING or v is None or v is False:
            return False
        if v is True:
            return True
        return None
    if isinstance(node, ConstCondition):
        return node.value
    if isinstance(node, Not):
        inner = evaluate(node.operand, args)
        return None if inner is None else not inner
    if isinstance(node, And):
        result: bool | None = True
        for o in node.operands:
            r = evaluate(o, args)
            if r is False:
                return False
            if r is None:
                result = None
        return result
    # Or
    result = False
    for o in node.operands:
        r = evaluate(o, args)
        if r is True:
            return True
        if r is None:
            result = None
    return result


def _collect_paths(node: Node, out: list[PathRef]) -> None:
    if isinstance(node, Compare):
        for operand in (node.left, node.right):
            if isinstance(operand, PathRef) and operand not in out:
                out.append(operand)
    elif isinstance(node, Truthy):
        if node.path not in out:
            out.append(node.path)
    elif isinstance(node, Not):
        _collect_paths(node.operand, out)
    elif isinstance(node, And | Or):
        for o in node.operands:
            _collect_paths(o, out)


@dataclass(frozen=True)
class Condition:
    """A parsed ``approval.when``: the text as written and its syntax tree."""

    source: str
    ast: Node

    @classmethod
    def parse(cls, source: str) -> Condition:
        """Parse ``source``; raises :class:`ConditionSyntaxError` naming the column."""
        if not isinstance(source, str):
            raise ConditionSyntaxError("a condition must be a string such as 'amount > 50000'")
        return cls(source=source, ast=_Parser(source).parse())

    def evaluate(self, args: Any) -> bool | None:
        """True, False, or None when an argument is missing or of the wrong type."""
        return evaluate(self.ast, args)

    def paths(self) -> tuple[PathRef, ...]:
        """The argument paths the condition reads, in order of appearance."""
        out: list[PathRef] = []
        _collect_paths(self.ast, out)
        return tuple(out)

    def bindings(self, args: Any) -> str:
        """``amount = 75000, vendor.id = "v1"``: the values the condition saw, for reasons."""
        parts = []
        for p in self.paths():
            v = _lookup(args, p.segments)
            shown = "(missing)" if v is _MISSING else _render_value(v)
            parts.append(f"{p} = {shown}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.source


def _render_value(v: Any) -> str:
    if v is None or isinstance(v, bool | int | float | str):
        text = _render_scalar(v)
    elif isinstance(v, Mapping):
        text = "{...}"
    else:
        text = "[...]"
    return text if len(text) <= 60 else text[:57] + "..."
