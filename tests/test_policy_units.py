"""Durations, sizes and rates as written in policy files."""

from __future__ import annotations

import pytest

from policies.units import format_duration, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("5min", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("5 parsecs", "unknown unit 'parsecs'"),
        ("5", "invalid duration"),
        ("", "empty duration"),
        ("0s", "greater than zero"),
        (-3, "greater than zero"),
        (True, "boolean"),
        ([1], "expected a duration"),
        ("5S", "did you mean 's'"),
        ("s", "invalid duration"),
    ],
)
def test_bad_durations(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("32MiB", 32 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("0.5MiB", 512 * 1024),
        ("100B", 100),
        ("100", 100),
        ("1_024", 1024),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("32MB", "did you mean 'MiB'"),
        ("32mib", "did you mean 'MiB'"),
        ("lots", "invalid size"),
        (0, "greater than zero"),
        (-5, "greater than zero"),
        (1.5, "expected a size"),
        ("0.3B", "whole number of bytes"),
    ],
)
def test_bad_sizes(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "count", "window"),
    [
        ("100/s", 100, 1.0),
        ("10/min", 10, 60.0),
        ("1000/h", 1000, 3600.0),
        ("5/10s", 5, 10.0),
        ("1/d", 1, 86400.0),
    ],
)
def test_rates(text: str, count: int, window: float) -> None:
    r = parse_rate(text)
    assert (r.count, r.window_s, str(r)) == (count, window, text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("100", "invalid rate"),
        ("0/s", "greater than zero"),
        ("5/fortnight", "unknown unit"),
        (5, "expected a rate"),
    ],
)
def test_bad_rates(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_rate(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (604800, 7200, 90, 12.5, 0.25)] == [
        "7d",
        "2h",
        "90s",
        "12.5s",
        "250ms",
    ]
