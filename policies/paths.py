"""Argument paths and rule locators.

Two kinds of path meet here:

* an *argument path* names a place inside a tool's JSON arguments, written with
  dots (``vendor.id``), digits for array positions (``items.0``) and ``*`` for
  every element of an array or every value of an object (``items.*.price``);
* a *rule locator* names a place inside the policy file, written the way the
  TOML header reads (``tools."slack.post".args.channel.allow``), so that a
  person reading a denial can search the file for it.

Findings inside JSON values are reported as JSONPath-like strings
(``$.items[2].price``) because that is what people know from other tools.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WILDCARD = "*"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_path(text: str) -> tuple[str, ...]:
    """Split an argument path into segments, refusing empty ones.

    Raises ``ValueError`` with a message naming the problem, e.g. for
    ``"vendor..id"`` or a leading dot.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(
            "an argument path must be a non-empty string such as 'amount' or 'vendor.id'"
        )
    if text != text.strip():
        raise ValueError(f"argument path {text!r} has leading or trailing spaces")
    segments = tuple(text.split("."))
    for seg in segments:
        if not seg:
            raise ValueError(
                f"argument path {text!r} has an empty segment; write segments separated by single dots, e.g. 'vendor.id'"
            )
        if seg != WILDCARD and WILDCARD in seg:
            raise ValueError(
                f"argument path {text!r}: '*' must be a whole segment, e.g. 'items.*.price'"
            )
    return segments


@dataclass(frozen=True)
class Match:
    """A value found at a concrete place in a JSON document."""

    path: str
    value: Any


def _is_array(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def resolve(
    document: Any, segments: Sequence[str], root: str = "$"
) -> tuple[list[Match], list[str]]:
    """Find every value at ``segments`` inside ``document``.

    Returns ``(found, missing)``: the values found with their concrete paths,
    and the concrete paths that were looked for but absent.  Keeping the
    missing paths lets ``required`` name exactly which element lacks a field
    when the path has a wildcard (``items[3].sku``).
    """
    frontier: list[tuple[str, Any]] = [(root, document)]
    missing: list[str] = []
    for seg in segments:
        nxt: list[tuple[str, Any]] = []
        for where, value in frontier:
            if seg == WILDCARD:
                if isinstance(value, Mapping):
                    nxt.extend((child_path(where, k), v) for k, v in value.items())
                elif _is_array(value):
                    nxt.extend((child_path(where, i), v) for i, v in enumerate(value))
                else:
                    missing.append(f"{where}[*]")
            elif isinstance(value, Mapping):
                if seg in value:
                    nxt.append((child_path(where, seg), value[seg]))
                else:
                    missing.append(child_path(where, seg))
            elif _is_array(value) and seg.isdigit() and int(seg) < len(value):
                nxt.append((child_path(where, int(seg)), value[int(seg)]))
            else:
                missing.append(
                    child_path(where, int(seg) if seg.isdigit() and _is_array(value) else seg)
                )
        frontier = nxt
    return [Match(p, v) for p, v in frontier], missing


def child_path(parent: str, key: str | int) -> str:
    """The JSONPath-like path of ``parent``'s child ``key``."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    if _IDENT.match(key):
        return f"{parent}.{key}"
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'{parent}["{escaped}"]'


def quote_key(key: str) -> str:
    """A TOML key as it appears in a table header: bare if possible, else quoted."""
    if _BARE_KEY.match(key):
        return key
    escaped = key.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def locator(*parts: str | int) -> str:
    """Join keys into a rule locator: strings are TOML keys, ints are array positions.

    ``locator("tools", "slack.post", "args", "channel", "allow")`` is
    ``tools."slack.post".args.channel.allow``; ``locator("validators", 0,
    "detect", "card")`` is ``validators[0].detect.card``.
    """
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + quote_key(part)
    return out
