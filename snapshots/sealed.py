"""Sealed values: a stored value carries a digest of itself and of where it is stored.

Why: the bytes on disk are untrusted. A checkpoint checks itself (``format.py``), but a
journal answer, an input, a bundle or a kv value changed on disk would otherwise be
read back into an agent as if it were what was recorded: the agent would complete
with a wrong result while every other check passes. So every such value is written
through :func:`seal` and read through :func:`unseal`, which raises
:class:`~snapshots.errors.RecordCorrupt` naming the record instead of returning bytes
that are not what was written. This module is the one place that knows the layout.

A sealed value is::

    0xFF | version (1 byte) | digest (16 bytes) | payload

The digest is the first 16 bytes of SHA-256 over the database name, the key and the
payload, so a value copied under another key (journal entry 3's answer put in place of
entry 4's) fails as surely as a flipped bit. SHA-256 because this machine's OpenSSL
runs it in hardware (about 2 µs for a journal entry, faster than BLAKE2b here); 128
bits are plenty against accidents. It is a checksum, not a signature: someone who can
write the store can also write a matching digest (the signed audit log is what tells
deliberate rewriting apart).

Why 0xFF first: no value this store wrote before seals existed starts with it (they are
JSON, decimal ASCII, UTF-8 text or zip archives, and 0xFF never starts UTF-8), so
those older values are told apart and accepted as they are (``strict=False``); a store
created with seals refuses an unsealed value (``strict=True``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import NoReturn

from .errors import RecordCorrupt

__all__ = ["HEADER_SIZE", "MARK", "VERSION", "is_sealed", "seal", "unseal"]

#: The first byte of every sealed value (never the first byte of UTF-8 or of a zip).
MARK = 0xFF
#: The seal layout and digest this code writes (SHA-256 truncated to 16 bytes).
VERSION = 1
_DIGEST = 16
_HEAD = bytes((MARK, VERSION))
HEADER_SIZE = len(_HEAD) + _DIGEST
_KEY_LEN = struct.Struct("<H")


_sha256 = hashlib.sha256
_PREFIXES: dict[str, bytes] = {}


def _digest(database: str, key: bytes, payload: bytes) -> bytes:
    prefix = _PREFIXES.get(database)
    if prefix is None:
        prefix = _PREFIXES[database] = database.encode() + b"\x00"
    # The key's length first, so that (key "a", payload "bc") and (key "ab", "c") differ.
    # One buffer, one call: cheaper than update() for the small values of the tool-call path.
    return _sha256(b"".join((prefix, _KEY_LEN.pack(len(key)), key, payload))).digest()[:_DIGEST]


def seal(database: str, key: bytes, payload: bytes) -> bytes:
    """``payload`` as stored at ``key`` of ``database``: with its header and digest."""
    return b"".join((_HEAD, _digest(database, key, payload), payload))


def is_sealed(raw: bytes) -> bool:
    """Whether ``raw`` claims to be sealed (its first byte is the mark)."""
    return bool(raw) and raw[0] == MARK


def unseal(database: str, key: bytes, raw: bytes, what: Callable[[], str], *, strict: bool) -> bytes:
    """The payload of a value read from ``key`` of ``database``, once its digest matches.

    ``what`` names the record for the error ("journal entry 3 of agent X"), built only
    when there is one. An unsealed value (written before seals existed) is returned as it
    is unless ``strict`` (a store whose every value was written sealed). Raises
    RecordCorrupt when the digest does not match, the header is cut short, or the seal is
    of a version this code does not know.
    """
    if not raw or raw[0] != MARK:
        if strict:
            _corrupt(database, what, "carries no digest, but this store seals every value it writes")
        return raw  # written before seals existed: accepted as it is
    if len(raw) < HEADER_SIZE:
        _corrupt(database, what, f"is {len(raw)} bytes, shorter than its seal's header")
    if raw[1] != VERSION:
        _corrupt(database, what, f"has a seal of version {raw[1]}; this Torpor reads version {VERSION}")
    payload = raw[HEADER_SIZE:]
    if not raw.startswith(_digest(database, key, payload), len(_HEAD)):
        _corrupt(database, what, "does not match its digest")
    return payload


def _corrupt(database: str, what: Callable[[], str], problem: str) -> NoReturn:
    label = what()
    raise RecordCorrupt(f"{label} {problem} (changed or damaged on disk)", database=database, key=label)
