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
# Two base32 digits per lookup: half the Python steps of a digit-at-a-time loop.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
# Random bytes drawn 4 KiB at a time: one getrandom() syscall per ~400 ids rather
# than one per id (a hibernation burst mints thousands per second).
_POOL_BYTES = 4000
_pool = b""
_pool_pos = 0


def _forget_pool() -> None:
    """A forked child must not hand out the random bytes its parent will also use."""
    global _pool, _pool_pos
    _pool, _pool_pos = b"", 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def new_agent_id(now: float | None = None) -> str:
    """A fresh 26-character id, greater than every id this process made before."""
    global _last, _pool, _pool_pos
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    with _lock:
        if _pool_pos + 10 > len(_pool):
            _pool, _pool_pos = os.urandom(_POOL_BYTES), 0
        rand = int.from_bytes(_pool[_pool_pos : _pool_pos + 10], "big")
        _pool_pos += 10
        value = (ms << _RAND_BITS) | rand
        if value <= _last:
            value = _last + 1  # same millisecond (or a clock step back): count up
        _last = value
    pairs = []
    for _ in range(13):
        pairs.append(_PAIRS[value & 1023])
        value >>= 10
    return "".join(reversed(pairs))
