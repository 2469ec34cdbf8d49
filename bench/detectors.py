"""The detection table: each detector against written variants of the values it must find.

Not a speed benchmark: a corpus of base values (cards, e-mails, phone numbers, national
identifiers, secrets), each written in the variants an agent (or a model) may produce
by accident or on purpose (full-width or other scripts' digits, zero-width characters,
a line break inside, non-breaking spaces, soft hyphens, and the encodings that are
known limits), each inside a sentence. For every detector and variant it counts how
many the detectors find on the raw text (as before normalisation), with normalisation
(the default), and with the heuristic decoding mode (``decode = true``).

    python bench/detectors.py [--json]

``tests/test_secrets_boundary.py`` holds the normalised column to 100% for every
variant but the known limits.
"""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Callable

from policies.detectors import find, find_raw

BASES: dict[str, list[str]] = {
    "card": ["4111 1111 1111 1111", "5555555555554444", "378282246310005", "6011-1111-1111-1117"],
    "email": ["ada.lovelace@example.com", "j.smith+billing@mail.example.co.uk"],
    "phone": ["+44 20 7946 0958", "415-555-0134", "+1 415 555 0134"],
    "national_id": ["123-45-6789", "AB 12 34 56 C"],
    "secret": ["sk-proj-9fK2mQ7xLr4TzW8vBn3Yc6HdJp1Se5Ga0Ui", "AKIAQW3EXAMPLE7KEY2Z",
               "ghp_Xk9Lm2Np4Qr6St8Uv0Wx1Yz3Ab5Cd7Ef9Gh1Ij"],
}

_FULLWIDTH = {c: chr(ord(c) + 0xFEE0) for c in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz@.-+_"}


def _digits(base: int) -> Callable[[str], str]:
    return lambda s: "".join(chr(base + int(c)) if c.isdigit() else c for c in s)


def _every(n: int, mark: str) -> Callable[[str], str]:
    return lambda s: "".join(c + (mark if i % n == n - 1 and i < len(s) - 1 else "") for i, c in enumerate(s))


def _middle(mark: str) -> Callable[[str], str]:
    return lambda s: s[: len(s) // 2] + mark + s[len(s) // 2 :]


VARIANTS: dict[str, Callable[[str], str]] = {
    "plain": lambda s: s,
    "full-width": lambda s: "".join(_FULLWIDTH.get(c, c) for c in s),
    "arabic-indic digits": _digits(0x0660),
    "devanagari digits": _digits(0x0966),
    "bengali digits": _digits(0x09E6),
    "zero-width space": _every(3, "\u200b"),
    "zero-width joiner": _every(2, "\u200d"),
    "soft hyphen": _every(4, "\u00ad"),
    "line break inside": _middle("\n"),
    "CRLF inside": _middle("\r\n"),
    "non-breaking spaces": lambda s: s.replace(" ", "\u00a0"),
    "full-width + zero-width": lambda s: _every(3, "\u200b")("".join(_FULLWIDTH.get(c, c) for c in s)),
    # known limits: found only in the heuristic mode, or not at all
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "hex": lambda s: s.encode().hex(),
    "split in two calls (first half)": lambda s: s[: len(s) // 2],
}
KNOWN_LIMITS = frozenset({"base64", "hex", "split in two calls (first half)"})


def corpus() -> list[tuple[str, str, str, str]]:
    """``(detector, variant, base, text)`` for every base value and variant, in a sentence."""
    return [(det, name, base, f"please use {fn(base)} for this order")
            for det, bases in BASES.items() for base in bases for name, fn in VARIANTS.items()]


def table() -> dict[str, dict[str, dict[str, int]]]:
    """``{variant: {detector: {"n", "raw", "normalised", "decoded"}}}``."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for det, variant, _base, text in corpus():
        row = out.setdefault(variant, {}).setdefault(det, {"n": 0, "raw": 0, "normalised": 0, "decoded": 0})
        row["n"] += 1
        row["raw"] += any(h.detector == det for h in find_raw(text, [det]))
        row["normalised"] += any(h.detector == det for h in find(text, [det]))
        row["decoded"] += any(h.detector == det for h in find(text, [det], decode=True))
    return out


def markdown(t: dict[str, dict[str, dict[str, int]]]) -> str:
    dets = list(BASES)
    lines = ["| variant | " + " | ".join(dets) + " | all |", "|---" * (len(dets) + 2) + "|"]
    totals = {"raw": [0, 0], "normalised": [0, 0], "decoded": [0, 0]}
    for variant, row in t.items():
        cells = []
        n_all = sum(r["n"] for r in row.values())
        for d in dets:
            r = row[d]
            cells.append(f"{r['raw']} → {r['normalised']} ({r['decoded']}) / {r['n']}")
        sums = {k: sum(r[k] for r in row.values()) for k in ("raw", "normalised", "decoded")}
        for k in totals:
            totals[k][0] += sums[k]
            totals[k][1] += n_all
        mark = " (known limit)" if variant in KNOWN_LIMITS else ""
        lines.append(f"| {variant}{mark} | " + " | ".join(cells)
                     + f" | {sums['raw']} → {sums['normalised']} ({sums['decoded']}) / {n_all} |")
    lines.append("")
    lines.append("Overall: " + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in totals.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    t = table()
    print(json.dumps(t, indent=1) if args.json else markdown(t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
