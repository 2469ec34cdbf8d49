"""Durations, sizes and rates as people write them in policy files.

Policies are read by people, so they say ``"30s"`` and ``"32MiB"``; the host
needs seconds and bytes.  Parsing happens once, at load time, and every error
says what was wrong and what a valid value looks like, because the message ends
up in front of the person who wrote the file.

Sizes are binary (KiB = 1024 bytes).  ``"MB"`` is refused rather than guessed,
because a policy that silently meant 1,000,000 where its author meant 1,048,576
is a limit nobody asked for.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}

_DECIMAL_SIZE = {
    "KB": "KiB",
    "MB": "MiB",
    "GB": "GiB",
    "kB": "KiB",
    "K": "KiB",
    "M": "MiB",
    "G": "GiB",
}

_NUMBER = r"\d+(?:_\d+)*(?:\.\d+)?"
_DURATION_PART = re.compile(rf"\s*({_NUMBER})\s*([a-zA-Z]+)\s*")
_SIZE = re.compile(rf"^\s*({_NUMBER})\s*([a-zA-Z]*)\s*$")
_RATE = re.compile(rf"^\s*(\d+(?:_\d+)*)\s*/\s*({_NUMBER})?\s*([a-zA-Z]+)\s*$")

DURATION_HELP = 'write a number and a unit (ms, s, m, h, d), e.g. "500ms", "30s", "5m", "1h30m"'
SIZE_HELP = 'write bytes as an integer, or a number and a unit (B, KiB, MiB, GiB), e.g. "32MiB"'
RATE_HELP = 'write calls per window, e.g. "100/s", "10/min", "1000/h" or "5/10s"'


def parse_duration(value: object) -> float:
    """Return a duration in seconds.

    Accepts a non-negative number of seconds, or a string of one or more
    number+unit parts (``"1h30m"``).  Zero is refused: every duration in a
    policy is a limit or a window, and a zero limit is almost always a typo.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got a boolean; {DURATION_HELP}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"empty duration; {DURATION_HELP}")
        pos = 0
        seconds = 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if m is None:
                raise ValueError(f"invalid duration {value!r}; {DURATION_HELP}")
            number, unit = m.group(1), m.group(2)
            if unit not in DURATION_UNITS:
                hint = _unit_hint(unit, DURATION_UNITS)
                raise ValueError(
                    f"invalid duration {value!r}: unknown unit {unit!r}{hint}; {DURATION_HELP}"
                )
            seconds += float(number.replace("_", "")) * DURATION_UNITS[unit]
            pos = m.end()
    else:
        raise ValueError(f"expected a duration, got {type_name(value)}; {DURATION_HELP}")
    if math.isnan(seconds) or math.isinf(seconds) or seconds <= 0:
        raise ValueError(f"duration must be greater than zero (got {value!r}); {DURATION_HELP}")
    return seconds


def parse_size(value: object) -> int:
    """Return a size in bytes from an integer or a string such as ``"32MiB"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got a boolean; {SIZE_HELP}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.match(value)
        if m is None:
            raise ValueError(f"invalid size {value!r}; {SIZE_HELP}")
        number, unit = m.group(1).replace("_", ""), m.group(2) or "B"
        if unit not in SIZE_UNITS:
            if unit in _DECIMAL_SIZE:
                raise ValueError(
                    f"invalid size {value!r}: {unit!r} is ambiguous — did you mean {_DECIMAL_SIZE[unit]!r}? "
                    "(sizes are binary: 1 KiB = 1024 bytes)"
                )
            raise ValueError(
                f"invalid size {value!r}: unknown unit {unit!r}{_unit_hint(unit, SIZE_UNITS)}; {SIZE_HELP}"
            )
        exact = float(number) * SIZE_UNITS[unit]
        if exact != int(exact):
            raise ValueError(f"invalid size {value!r}: not a whole number of bytes")
        size = int(exact)
    else:
        raise ValueError(f"expected a size, got {type_name(value)}; {SIZE_HELP}")
    if size <= 0:
        raise ValueError(f"size must be greater than zero (got {value!r})")
    return size


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` calls in any sliding window of ``window_s`` seconds."""

    count: int
    window_s: float
    text: str

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> RateLimit:
    """Parse ``"100/s"``, ``"10/min"``, ``"1000/h"`` or ``"5/10s"``."""
    if not isinstance(value, str):
        raise ValueError(f"expected a rate string, got {type_name(value)}; {RATE_HELP}")
    m = _RATE.match(value)
    if m is None:
        raise ValueError(f"invalid rate {value!r}; {RATE_HELP}")
    count = int(m.group(1).replace("_", ""))
    number = m.group(2) or "1"
    unit = m.group(3)
    if unit not in DURATION_UNITS:
        raise ValueError(
            f"invalid rate {value!r}: unknown unit {unit!r}{_unit_hint(unit, DURATION_UNITS)}; {RATE_HELP}"
        )
    window = float(number.replace("_", "")) * DURATION_UNITS[unit]
    if count <= 0 or window <= 0:
        raise ValueError(
            f"invalid rate {value!r}: count and window must be greater than zero; {RATE_HELP}"
        )
    return RateLimit(count=count, window_s=window, text=value.strip())


def format_duration(seconds: float) -> str:
    """Render seconds the way a person would write them (for messages)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def type_name(value: object) -> str:
    """The TOML name of a value's type, for error messages."""
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _unit_hint(unit: str, units: dict[str, float] | dict[str, int]) -> str:
    lowered = {u.lower(): u for u in units}
    if unit.lower() in lowered:
        return f" — did you mean {lowered[unit.lower()]!r}?"
    close = difflib.get_close_matches(unit, list(units), n=1, cutoff=0.5)
    return f" — did you mean {close[0]!r}?" if close else ""
