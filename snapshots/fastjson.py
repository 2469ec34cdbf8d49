"""JSON the store writes, byte for byte what the standard library writes, in a fraction of its time.

Why: a journaled tool call encodes its agent record (about 1 KB), its journal entry, its
audit step and two digests; the standard library's encoder took about 13 µs for the record
alone and 14 µs for the sorted audit step, most of a call's commit. orjson encodes either
in under 1 µs, but not always into the same bytes: it writes ``null`` for NaN and the
infinities (the standard library writes ``NaN`` and ``Infinity``), and exponents its own way
(``1e-7`` for ``1e-07``, ``0.00001`` for ``1e-05``). Those bytes matter: the audit chain's
hashes are recomputed by the verifier from the parsed record with the standard library
(:func:`host.trust.audit.canonical`), digests of arguments and results are compared with
digests stored by earlier versions, and a record read back must hold what was written.

So a value goes to orjson only when a walk of it finds nothing where the two could
differ: plain ``dict`` (string keys), ``list``, ``tuple``, ``str``, ``int``, ``bool``,
``None``, and ``float`` zero or of magnitude in [1e-4, 1e16), where both write the shortest
decimal that reads back as the float, without an exponent. Anything else (a NaN, a
``1e-9``, an int key, a type the standard library would refuse) and anything orjson
refuses (a lone surrogate, an int beyond 64 bits) is encoded by the standard library, as
it always was. ``tests/test_fastjson.py`` holds the two encoders to the same bytes.

Imports nothing of the project (this is ``snapshots/``, which ``host/`` builds on).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["canonical", "compact"]

_STD_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_STD_STRICT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_STD_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def _load(obj: Any, option: int | None = None) -> bytes:
    """The first encode imports orjson (a command that only reads the store, ``torpor ps``,
    never pays its import) and puts its encoder in place of this function."""
    global _dumps, _SORT
    import orjson

    _SORT = orjson.OPT_SORT_KEYS
    _dumps = orjson.dumps
    return _dumps(obj) if option is None else _dumps(obj, option=_SORT)


_dumps: Callable[..., bytes] = _load
_SORT = -1  # orjson.OPT_SORT_KEYS once loaded (-1: ask _load for it)
# Types both encoders write alike whatever the value (a str's lone surrogate makes orjson
# refuse, an int beyond 64 bits too: those fall back below).
_SCALARS = frozenset((str, int, bool, type(None)))


def _plain(obj: Any) -> bool:
    """Whether orjson writes ``obj`` exactly as the standard library does (see the module doc).

    Written for speed: it walks every commit's agent record, a hundred-odd values. The loop
    over a dict's items and the one over a list's values are written out twice on purpose:
    one loop over both (keys checked apart, or a list's values zipped with empty keys)
    measured 15-25 % slower on an agent record (``bench/commit_encoding.py``'s values).
    """
    tp = type(obj)
    if tp is dict:
        for k, v in obj.items():
            if type(k) is not str:
                return False
            tv = type(v)
            if tv in _SCALARS:
                continue
            if tv is float:
                if not (1e-4 <= abs(v) < 1e16 or v == 0.0):
                    return False
            elif not _plain(v):
                return False
        return True
    if tp is list or tp is tuple:
        for v in obj:
            tv = type(v)
            if tv in _SCALARS:
                continue
            if tv is float:
                if not (1e-4 <= abs(v) < 1e16 or v == 0.0):
                    return False
            elif not _plain(v):
                return False
        return True
    if tp in _SCALARS:
        return True
    if tp is float:
        return bool(1e-4 <= abs(obj) < 1e16 or obj == 0.0)
    return False


def compact(obj: Any, *, allow_nan: bool = True) -> bytes:
    """``json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan).encode()``,
    faster (``allow_nan=False``: ``ValueError`` for a NaN or an infinity, as there).

    Keys in the dict's own order: how every agent record and journal entry is stored.
    """
    try:
        if _plain(obj):
            return _dumps(obj)
    except (TypeError, RecursionError):  # orjson refused (a lone surrogate, an int beyond 64 bits, deep nesting)
        pass
    return (_STD_COMPACT if allow_nan else _STD_STRICT)(obj).encode()


def canonical(obj: Any) -> bytes:
    """``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()``,
    faster: the form audit hashes and digests are taken over."""
    try:
        if _plain(obj):
            return _dumps(obj, option=_SORT)
    except (TypeError, RecursionError):
        pass
    return _STD_CANONICAL(obj).encode()
