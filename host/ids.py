"""Sortable unique agent ids (ULID layout: 48-bit milliseconds + 80 random bits, Crockford base32).

Sortable so that ``torpor ps`` and LMDB key order list agents by spawn time
without an index; random enough that hosts in a fleet never collide.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_agent_id(now: float | None = None) -> str:
    """A fresh 26-character id; ``now`` (seconds) is only for tests."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
