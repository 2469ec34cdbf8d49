"""The one parser of JSON that crosses into the host from an agent.

Guest output, tool arguments (and so kv keys and values) and agent inputs are JSON the
host did not write. Valid JSON can still be poison for a Python host: nesting thousands
deep overflows every recursive walk (the policy engine's, the audit's canonical form),
a lone surrogate (``"\\ud800"``) parses but cannot be encoded again, ``1e999`` parses
as infinity, which strict JSON cannot write back, and an integer of thousands of digits
costs quadratic time to print. Each of those ended, later and somewhere else, in an
``internal error`` that left the agent ``running``.

So every such value is parsed here, at the boundary, and refused with
:class:`PoisonValue` (a ``ValueError``) naming the problem: the guest gets an error code
for its call, an operator a clear message, and nothing downstream sees the value.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

#: Containers may nest this deep (real agent payloads nest a few levels; the host's
#: recursive walks stay far from Python's recursion limit).
MAX_DEPTH = 64
#: Integers must fit 64 bits, signed or unsigned (what every other JSON peer can read).
INT_MIN = -(1 << 63)
INT_MAX = (1 << 64) - 1
_INT_DIGITS = 21  # a longer literal is out of range before it is converted


class PoisonValue(ValueError):
    """JSON the host will not take: not RFC 8259, or beyond the host's bounds."""


def _constant(name: str) -> Any:
    raise PoisonValue(f"{name} is not JSON")


def _int(text: str) -> int:
    if len(text) > _INT_DIGITS:
        raise PoisonValue(f"the integer {text[:24]}... does not fit 64 bits")
    value = int(text)
    if not INT_MIN <= value <= INT_MAX:
        raise PoisonValue(f"the integer {text} does not fit 64 bits")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise PoisonValue(f"the number {text[:24]} is beyond the range of a double")
    return value


_DECODER = json.JSONDecoder(parse_constant=_constant, parse_int=_int, parse_float=_float)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)  # a JSON string literal: its brackets do not nest
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def nesting(text: str) -> int:
    """How deep the containers of a JSON text nest, counted before it is decoded.

    Why count first: the decoder is recursive, and a text nested thousands deep would
    only stop at Python's recursion limit. At that depth the garbage collector can run
    finalizers (a dropped Wasmtime store's, say) that then fail for want of stack and
    are skipped, leaking what they would have freed: the soak benchmark found that.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return 0  # cannot nest deeper than its openers (the common case: no scan)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def parse(data: bytes | str) -> Any:
    """Parse strict JSON from an agent, within the host's bounds (see the module docstring)."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as exc:
        raise PoisonValue(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if nesting(text) > MAX_DEPTH:
        raise PoisonValue(f"nested deeper than {MAX_DEPTH} levels")
    try:
        value = _DECODER.decode(text)
    except RecursionError:  # a text the count misjudged (an unterminated string): still refused
        raise PoisonValue(f"nested deeper than {MAX_DEPTH} levels") from None
    except PoisonValue:
        raise
    except ValueError as exc:  # json.JSONDecodeError, and int() past its digit limit
        raise PoisonValue(str(exc)) from None
    check(value)
    return value


def check(value: Any) -> None:
    """Refuse a Python value the host could not carry as JSON: too deep, a lone surrogate,
    a number out of range, a type JSON has not (for values handed in through the API)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            _check_str(v)
        elif v is None or isinstance(v, bool):
            continue
        elif isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                raise PoisonValue("an integer does not fit 64 bits")
        elif isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise PoisonValue(f"{v} is not JSON")
        elif isinstance(v, dict | list | tuple):
            if depth > MAX_DEPTH:
                raise PoisonValue(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(v, dict):
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise PoisonValue(f"an object key is a {type(k).__name__}, not a string")
                    _check_str(k)
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)
        else:
            raise PoisonValue(f"a {type(v).__name__} is not JSON")


def _check_str(s: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise PoisonValue("a string holds a lone surrogate (not Unicode text)") from None
