"""Immutable JSON values and mappings.

The engine's inputs (requests, usage) must be hashable and immutable so that a
decision can be cached, logged and replayed without anyone mutating the request
behind the engine's back.  Parsed JSON is made of dicts and lists, which are
neither, so requests freeze their arguments on construction: objects become
:class:`FrozenDict` and arrays become tuples.  ``thaw`` turns them back into
plain JSON for display, audit records and custom validators.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FrozenDict(Mapping[K, V]):
    """A read-only, hashable mapping.

    Hashing is by content, so two requests with equal arguments hash equally
    regardless of key order.  The hash is computed lazily because most requests
    are never hashed.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data) if data is not None else {}
        self._hash: int | None = None

    @classmethod
    def _adopt(cls, data: dict[K, V]) -> FrozenDict[K, V]:
        """A FrozenDict over ``data`` itself, not a copy (``data`` is the caller's new dict, kept by no one else)."""
        self = cls.__new__(cls)
        self._data = data
        self._hash = None
        return self

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return dict(self._data.items()) == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenDict({self._data!r})"


#: Values frozen as they are (exact types: a subclass takes the general path of :func:`freeze`).
_SCALARS = frozenset((type(None), bool, int, str))


class NotJSONError(TypeError):
    """A value the engine cannot decide on because JSON cannot carry it.

    The host should answer the guest with ``invalid_args`` (note that Python's
    ``json.loads`` accepts ``NaN``, which is not JSON).
    """


def freeze(value: Any) -> Any:
    """Return an immutable, hashable copy of a parsed-JSON value.

    Raises :class:`NotJSONError` for values that JSON cannot carry, because the
    engine's rules (equality, ranges, detectors) are only defined over JSON —
    and ``NaN``, which is unequal to itself, would make decisions depend on
    object identity.
    """
    tp = type(value)
    if tp in _SCALARS:  # exact types first: every tool call freezes its arguments
        return value
    if tp is dict or (not isinstance(value, bool | int | str | float) and isinstance(value, Mapping)):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise NotJSONError(f"JSON object keys must be strings, got {type(k).__name__}")
            out[k] = v if type(v) in _SCALARS else freeze(v)
        return FrozenDict._adopt(out)
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # NaN and the infinities: no JSON text carries them
            raise NotJSONError(f"{value!r} is not a JSON value (numbers must be finite)")
        return value
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    raise NotJSONError(f"{type(value).__name__} is not a JSON value")


def thaw(value: Any) -> Any:
    """Return a plain (dict/list) deep copy of a frozen JSON value."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [thaw(v) for v in value]
    return value
