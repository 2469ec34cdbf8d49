"""Detectors for personal data and secrets in outbound JSON.

Output guardrails stop an agent from leaking what it should not: a customer's
e-mail into a public channel, a card number into a log, an API key into a chat
message.  Each detector is a pure function of a string; :func:`scan` walks a
JSON value (every string, every integer, every object key — a card number sent
as a JSON number or smuggled in a key is still a card number) and reports each
finding with its JSON path.

Findings never carry the full matched text, only a masked form, because a
denial reason travels to the agent, the audit log and operators' terminals —
echoing the secret there would leak it a second time.

Every string is normalised before it is matched (:func:`normalise`: NFKC, digits
of every script as ASCII digits, zero-width and control characters removed,
whitespace folded, line breaks inside a value joined), so full-width digits, a
zero-width space or a line break inside a card number hide nothing. Encodings
(base64, hex) are found only in the optional heuristic mode (``decode = true``
on the validator); a value split across calls, or encrypted, is not found at
all (bench/RESULTS.md, "Detection table").

The detectors favour precision where a false positive would block ordinary
work:

* ``card``: 13–19 digits (optionally grouped by single spaces or dashes) that
  pass the Luhn check *and* start with a major network's prefix (Visa,
  Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro).  Digits inside a
  longer digit run are not a card.
* ``phone``: North American numbers written with separators
  (``415-555-0134``, ``(415) 555 0134``, ``+1 415 555 0134``) and
  international numbers written with a leading ``+`` and 8–15 digits.  A bare
  run of ten digits is not reported (it is more often an order number).
* ``national_id``: US Social Security numbers written ``123-45-6789`` or
  ``123 45 6789`` (invalid areas 000, 666, 9xx, group 00 and serial 0000
  excluded) and UK National Insurance numbers (``QQ 12 34 56 C``).
* ``email``: ``local@domain.tld``.
* ``secret``: AWS access key ids (``AKIA…``/``ASIA…``), AWS secret keys next to
  their name, ``sk-…`` keys (OpenAI, Anthropic), Stripe secret keys, GitHub
  (``ghp_…``, ``github_pat_…``), GitLab, Slack tokens and webhooks, Google API
  keys, JWTs, PEM private keys, high-entropy ``Bearer`` tokens, and
  high-entropy values assigned to names like ``api_key``, ``secret``,
  ``token`` (and any value assigned to ``password``).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .paths import child_path

DETECTORS: tuple[str, ...] = ("email", "phone", "card", "national_id", "secret")
"""Every detector name a policy may list in ``detect``."""

PII_DETECTORS = frozenset({"email", "phone", "card", "national_id"})

LABELS: Mapping[str, str] = {
    "email": "e-mail address",
    "phone": "phone number",
    "card": "payment card number",
    "national_id": "national identifier",
    "secret": "secret",
}


@dataclass(frozen=True)
class Hit:
    """A match inside one string: what kind, where, and a masked rendering."""

    detector: str
    kind: str
    start: int
    end: int
    masked: str


@dataclass(frozen=True)
class Finding:
    """A hit located in a JSON document.

    ``path`` is JSONPath-like (``$.items[2].note``); ``in_key`` is true when the
    match was in an object key rather than a value.
    """

    detector: str
    kind: str
    path: str
    masked: str
    in_key: bool = False

    def describe(self) -> str:
        """``payment card number (visa) at $.note: …1111``."""
        label = LABELS.get(self.detector, self.detector)
        kind = f" ({self.kind})" if self.kind != self.detector else ""
        where = f"a key of {self.path}" if self.in_key else self.path
        return f"{label}{kind} at {where}: {self.masked}"


# --- helpers -----------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check used by payment card numbers."""
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_network(digits: str) -> str | None:
    """The network a card number's prefix and length belong to, or ``None``."""
    n = len(digits)
    if not digits.isdigit() or not 13 <= n <= 19:
        return None
    p2, p3, p4 = int(digits[:2]), int(digits[:3]), int(digits[:4])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 2221 <= p4 <= 2720) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or p2 == 65 or 644 <= p3 <= 649) and n >= 16:
        return "discover"
    if 3528 <= p4 <= 3589 and n >= 16:
        return "jcb"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39)) and n >= 14:
        return "diners"
    if p2 == 62 and n >= 16:
        return "unionpay"
    if p2 in (50, 56, 57, 58) or digits[0] == "6":
        return "maestro"
    return None


def shannon_entropy(text: str) -> float:
    """Bits per character; random tokens score high, words and repeats low."""
    if not text:
        return 0.0
    counts = Counter(text)
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def mask_secret(text: str) -> str:
    """Keep a recognisable prefix (it names the kind of key), hide the rest."""
    keep = 4 if len(text) >= 12 else 0
    return f"{text[:keep]}…[{len(text)} chars]"


def _mask_email(text: str) -> str:
    local, _, domain = text.partition("@")
    tld = domain.rsplit(".", 1)[-1]
    return f"{local[:1]}***@***.{tld}"


def _mask_digits(text: str, keep: int) -> str:
    digits = [c for c in text if c.isdigit()]
    return "…" + "".join(digits[-keep:]) if keep else "…"


# --- detectors ---------------------------------------------------------------------

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![A-Za-z0-9-])"
)


def find_emails(text: str) -> list[Hit]:
    """E-mail addresses."""
    return [
        Hit("email", "email", m.start(), m.end(), _mask_email(m.group(0)))
        for m in _EMAIL.finditer(text)
    ]


_NANP = re.compile(
    r"(?<![\d+\w])(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\d])"
)
_INTL = re.compile(r"(?<![\w+])\+\d[\d ().-]{6,22}\d(?!\d)")


def find_phones(text: str) -> list[Hit]:
    """Phone numbers written as phone numbers (separators or a leading ``+``)."""
    hits: list[Hit] = []
    for m in _NANP.finditer(text):
        hits.append(Hit("phone", "phone", m.start(), m.end(), _mask_digits(m.group(0), 2)))
    for m in _INTL.finditer(text):
        s = m.group(0)
        digits = sum(c.isdigit() for c in s)
        if not 8 <= digits <= 15 or ".." in s or "--" in s or "  " in s:
            continue
        if any(h.start <= m.start() < h.end for h in hits):
            continue
        hits.append(Hit("phone", "phone", m.start(), m.end(), _mask_digits(s, 2)))
    return hits


_DIGIT_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d)*(?!\d)")
_GROUP = re.compile(r"\d+")


def find_cards(text: str) -> list[Hit]:
    """Luhn-valid numbers with a card network's prefix and length.

    A run of digit groups (``1234 4111 1111 1111 1111``) is searched for any
    contiguous sequence of whole groups that is a card, so a card cannot hide
    behind a reference number written before it; digits are never split inside
    a group, so a long number does not contain a "card".
    """
    hits: list[Hit] = []
    for run in _DIGIT_RUN.finditer(text):
        groups = [
            (g.start() + run.start(), g.end() + run.start(), g.group(0))
            for g in _GROUP.finditer(run.group(0))
        ]
        i = 0
        while i < len(groups):
            found = False
            digits = ""
            for j in range(i, len(groups)):
                digits += groups[j][2]
                if len(digits) > 19:
                    break
                if len(digits) >= 13 and luhn_valid(digits):
                    network = card_network(digits)
                    if network is not None:
                        hits.append(
                            Hit(
                                "card", network, groups[i][0], groups[j][1], _mask_digits(digits, 4)
                            )
                        )
                        i = j + 1
                        found = True
                        break
            if not found:
                i += 1
    return hits


_SSN = re.compile(r"(?<![\d-])(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])")
_NINO = re.compile(
    r"(?<![A-Za-z0-9])([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]) ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])(?![A-Za-z0-9])"
)
_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def find_national_ids(text: str) -> list[Hit]:
    """US Social Security numbers and UK National Insurance numbers."""
    hits: list[Hit] = []
    for m in _SSN.finditer(text):
        area, group, serial = m.group(1), m.group(3), m.group(4)
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        hits.append(Hit("national_id", "us_ssn", m.start(), m.end(), "***-**-****"))
    for m in _NINO.finditer(text):
        if m.group(1) in _NINO_BAD_PREFIXES:
            continue
        hits.append(Hit("national_id", "uk_nino", m.start(), m.end(), "** ** ** ** *"))
    return hits


# (kind, pattern, group holding the secret, minimum entropy or None)
_SECRET_PATTERNS: tuple[tuple[str, re.Pattern[str], int, float | None], ...] = (
    ("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"), 0, None),
    (
        "aws_access_key_id",
        re.compile(
            r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}(?![A-Z0-9])"
        ),
        0,
        None,
    ),
    (
        "aws_secret_access_key",
        re.compile(
            r"(?i)aws_?secret_?(?:access_?)?key[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
        ),
        1,
        None,
    ),
    (
        "api_key",
        re.compile(r"(?<![A-Za-z0-9_-])sk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
        0,
        None,
    ),
    (
        "stripe_key",
        re.compile(r"(?<![A-Za-z0-9])(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"),
        0,
        None,
    ),
    (
        "github_token",
        re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})"),
        0,
        None,
    ),
    ("gitlab_token", re.compile(r"(?<![A-Za-z0-9_])glpat-[A-Za-z0-9_-]{20,}"), 0, None),
    ("slack_token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,}"), 0, None),
    (
        "slack_webhook",
        re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9_/]{20,}"),
        0,
        None,
    ),
    ("google_api_key", re.compile(r"(?<![A-Za-z0-9_-])AIza[0-9A-Za-z_-]{35}"), 0, None),
    (
        "jwt",
        re.compile(
            r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
        ),
        0,
        None,
    ),
    ("bearer_token", re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/-]{20,}=*)"), 1, 3.0),
    (
        "password",
        re.compile(r"(?i)\b(?:password|passwd|pwd)[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{6,})"),
        1,
        None,
    ),
    (
        "credential",
        re.compile(
            r"(?i)\b(?:api[_-]?key|apikey|secret|client[_-]?secret|access[_-]?key|auth[_-]?token|token)[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9._~+/=-]{16,})"
        ),
        1,
        3.0,
    ),
)


def find_secrets(text: str) -> list[Hit]:
    """API keys, tokens, private keys and passwords.

    Specific formats come first; when a generic pattern (``token = …``) covers
    the same text as a specific one (``sk-…``), the specific kind is reported.
    """
    hits: list[Hit] = []
    for kind, pattern, group, min_entropy in _SECRET_PATTERNS:
        for m in pattern.finditer(text):
            start, end = m.span(group)
            secret = m.group(group)
            if min_entropy is not None and shannon_entropy(secret) < min_entropy:
                continue
            if any(h.start < end and start < h.end for h in hits):
                continue
            masked = secret if kind == "private_key" else mask_secret(secret)
            hits.append(Hit("secret", kind, start, end, masked))
    hits.sort(key=lambda h: h.start)
    return hits


FINDERS: Mapping[str, Callable[[str], list[Hit]]] = {
    "email": find_emails,
    "phone": find_phones,
    "card": find_cards,
    "national_id": find_national_ids,
    "secret": find_secrets,
}


_LINE_BREAKS = re.compile(r"\s*[\n\r\u2028\u2029\x0b\x0c\x85]\s*")
_SPACES = re.compile(r"\s+")


def _plain_char(c: str) -> str:
    """One character as the detectors read it: a digit of any script as its ASCII digit,
    format characters (zero-width space, joiners, soft hyphen, BOM) and controls dropped."""
    if c.isascii():
        return "" if (ord(c) < 0x20 and c not in "\t\n\r\x0b\x0c") or c == "\x7f" else c
    d = unicodedata.decimal(c, None)
    if d is not None:
        return str(d)
    cat = unicodedata.category(c)
    if cat == "Cf" or (cat == "Cc" and not c.isspace()):
        return ""
    return c


def normalise(text: str) -> tuple[str, ...]:
    """The forms of a string the detectors match, so that a variant cannot slip past.

    NFKC (full-width and other compatibility forms become their plain letters and
    digits), digits of every script as ASCII digits, format and control characters
    removed, whitespace folded to one space; and a second form with line breaks (and
    the spaces around them) removed, for a value broken across lines. The first form
    is the text itself when nothing changes (then it is the only one).
    """
    if text.isascii() and not any(ord(c) < 0x20 or c == "\x7f" for c in text):
        folded = _SPACES.sub(" ", text) if "  " in text else text
        return (text,) if folded == text else (text, folded)
    plain = "".join(_plain_char(c) for c in unicodedata.normalize("NFKC", text))
    forms = [text, _SPACES.sub(" ", plain)]
    joined = _SPACES.sub(" ", _LINE_BREAKS.sub("", plain))
    forms.append(joined)
    return tuple(dict.fromkeys(forms))


_ENCODED = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")


def decoded_forms(text: str) -> list[str]:
    """The heuristic mode (``decode = true``): base64 and hex runs of 12 or more characters
    that decode to UTF-8 text, so a value sent encoded is scanned too. Off by default: it
    costs a decode per such run and is easily defeated (split across calls, another
    encoding, encryption), which is why it is a heuristic and not a guarantee."""
    out: list[str] = []
    for m in _ENCODED.finditer(text):
        tok = m.group(0).rstrip("=")
        candidates: list[bytes] = []
        if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", tok):
            candidates.append(bytes.fromhex(tok))
        try:
            alt = "-" in tok or "_" in tok
            candidates.append((base64.urlsafe_b64decode if alt else base64.b64decode)(tok + "=" * (-len(tok) % 4)))
        except (binascii.Error, ValueError):
            pass
        for raw in candidates:
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if decoded.isprintable() or all(c.isprintable() or c.isspace() for c in decoded):
                out.append(decoded)
    return out


def find(text: str, detectors: Iterable[str] = DETECTORS, *, decode: bool = False) -> list[Hit]:
    """Every hit of the named detectors in one string (in any of its :func:`normalise`
    forms, and with ``decode`` in its base64 and hex runs too), in detector order."""
    names = tuple(detectors)
    forms = list(normalise(text))
    if decode:
        forms += [f for d in decoded_forms(text) for f in normalise(d)]
    hits: list[Hit] = []
    seen: set[tuple[str, str, str]] = set()
    for name in names:
        try:
            finder = FINDERS[name]
        except KeyError:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}") from None
        for form in forms:
            for hit in finder(form):
                key = (hit.detector, hit.kind, hit.masked)
                if key not in seen:
                    seen.add(key)
                    hits.append(hit)
    return hits


def find_raw(text: str, detectors: Iterable[str] = DETECTORS) -> list[Hit]:
    """The detectors on the text exactly as given, no normalisation (for the detection table)."""
    return [hit for name in detectors for hit in FINDERS[name](text)]


def iter_strings(value: Any, root: str = "$") -> Iterator[tuple[str, str, bool]]:
    """Yield ``(path, text, in_key)`` for every string, integer and key in a JSON value."""
    if isinstance(value, str):
        yield root, value, False
    elif isinstance(value, bool) or value is None or isinstance(value, float):
        return
    elif isinstance(value, int):
        yield root, str(value), False
    elif isinstance(value, Mapping):
        for k, v in value.items():
            path = child_path(root, str(k))
            yield path, str(k), True
            yield from iter_strings(v, path)
    elif isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        for i, v in enumerate(value):
            yield from iter_strings(v, child_path(root, i))


def scan(value: Any, detectors: Iterable[str] = DETECTORS, root: str = "$", *,
         decode: bool = False) -> list[Finding]:
    """Every finding of the named detectors anywhere inside a JSON value (``decode``: the
    heuristic mode, :func:`decoded_forms`)."""
    names = tuple(detectors)
    for name in names:
        if name not in FINDERS:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}")
    findings: list[Finding] = []
    for path, text, in_key in iter_strings(value, root):
        for hit in find(text, names, decode=decode):
            findings.append(Finding(hit.detector, hit.kind, path, hit.masked, in_key))
    return findings
