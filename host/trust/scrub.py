"""The one scrubber: every secret, and every fragment of one, out of what a tool returns.

A tool holds leased secrets on the host side; whatever it hands back (its result, its
error message, the text of an exception it raised, a URL it was redirected to, a body
cut at a length the guest chose) may quote one. :class:`Scrubber` is applied by the tool
call pipeline (:meth:`host.runtime.tool_call.ToolCallPipeline.settle`) to every answer of
every tool, built in, operator or MCP, before the answer is journaled or the guest sees
it. No tool scrubs for itself: one choke point, so that no path can be forgotten.

What it removes, from every string of the answer at every depth (object keys too):

* a secret, and any run of :data:`FRAGMENT` or more of its characters, anywhere;
* at a cut point (the start or the end of a string, where a truncation leaves
  a secret's prefix or suffix) a prefix or suffix of :data:`EDGE` or more characters;
* the same after decoding: JSON/C-style escapes (``\\u0073``, ``\\x73``), percent-
  encoding and HTML entities, applied until nothing changes; a string whose decoded form
  holds a secret is replaced by that decoded form with the secret masked;
* a string that is entirely base64 or hex is decoded and checked as bytes, and masked
  in place (re-encoded) when it holds a secret; the hex and base64 forms of each secret
  are also searched for inside text (a ``Basic`` header echoed in an HTML page).

What no scrubber can stop is a transformation it does not know: a server that encrypts,
hashes, reverses or re-encodes a secret in a way not listed above hands the guest a
value from which the secret can be recovered. That is why secrets are also bound to the
hosts they may be sent to (README, "Secrets").

Cost: nothing when the call has no secrets; otherwise a few substring searches (in C)
per secret over the answer's strings.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import html
import json
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import unquote

REDACTED = "[redacted]"
MIN_SECRET = 4  # shorter values would redact ordinary text; no real credential is this short
FRAGMENT = 8  # a run of this many characters of a secret is masked anywhere
EDGE = 4  # a secret's prefix (suffix) this long is masked at the end (start) of a string: a cut point
_ANCHOR = 4  # search step: every fragment of FRAGMENT characters holds an aligned block of this many
_ENCODED_FRAGMENT = 24  # of a hex or base64 form: 12 bytes of the secret in hex, 18 in base64
_MAX_DECODE_ROUNDS = 4

_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\([\"\\/bfnrt'])")
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_B64 = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2}){8,}")


def _unescape(s: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return chr(int(m.group(1), 16))
        if m.group(2):
            return chr(int(m.group(2), 16))
        c = m.group(3)
        return _SIMPLE.get(c, c)

    return _ESCAPE.sub(one, s) if "\\" in s else s


def _decode(s: str) -> str:
    """JSON and C escapes, percent-encoding and HTML entities, until a fixed point."""
    for _ in range(_MAX_DECODE_ROUNDS):
        before = s
        s = _unescape(s)
        if "%" in s:
            s = unquote(s, errors="replace")
        if "&" in s:
            s = html.unescape(s)
        if s == before:
            break
    return s


def _encoded_forms(secret: str) -> list[str]:
    """Hex and base64 forms of a secret, as they would appear inside other text."""
    raw = secret.encode("utf-8", "surrogatepass")
    forms = [raw.hex(), raw.hex().upper()]
    for k in range(3):  # the secret at each alignment of base64's 3-byte groups
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * k + raw).decode().rstrip("=")
            start = 4 if k else 0  # the first group mixes in what came before
            core = text[start : len(text) - 4]  # and the last one what comes after
            if len(core) >= FRAGMENT:
                forms.append(core)
    return forms


def _binary_text(text: str) -> str:
    """A hex or base64 string's bytes as latin-1 text ("" when it does not decode)."""
    try:
        if _HEX.fullmatch(text):
            return bytes.fromhex(text).decode("latin-1")
        alt = "-" in text or "_" in text
        return (base64.urlsafe_b64decode if alt else base64.b64decode)(
            text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4)).decode("latin-1")
    except (binascii.Error, ValueError):
        return ""


def _strings(value: Any, out: list[str]) -> None:
    """Every string of a JSON value, keys included."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list | tuple):
        for v in value:
            _strings(v, out)
    elif isinstance(value, dict):
        for k, v in value.items():
            out.append(str(k))
            _strings(v, out)


class Scrubber:
    """Masks a set of secrets (and their fragments, decoded and encoded forms) in JSON values."""

    def __init__(self, values: Iterable[str]) -> None:
        self.secrets: tuple[str, ...] = tuple(sorted(
            {v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET}, key=len, reverse=True))
        needles: list[tuple[str, bool]] = []
        for s in self.secrets:
            needles.append((s, True))
            needles.extend((f, False) for f in _encoded_forms(s))
        self._needles = tuple(dict.fromkeys(needles))
        # What a string must contain for the slow search to find anything (a fast test first,
        # over all of an answer's strings at once): a block of 5 characters of a secret at
        # every 4th offset (a fragment of FRAGMENT characters holds one), its first and last
        # EDGE characters (a cut point), and blocks of 12 of its encoded forms at every 12th
        # offset (a fragment of _ENCODED_FRAGMENT holds one).
        probes: list[str] = []
        for needle, raw in self._needles:
            if len(needle) < FRAGMENT:
                probes.append(needle)
            elif raw:
                probes += [needle[i : i + 5] for i in range(0, len(needle) - 4, 4)]
                probes += [needle[:EDGE], needle[-EDGE:]]
            else:
                probes += [needle[i : i + 12] for i in range(0, len(needle) - 11, 12)]
        self._probes = tuple(dict.fromkeys(probes))

    def __bool__(self) -> bool:
        return bool(self.secrets)

    # -- text ------------------------------------------------------------------------
    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` holds a secret or a fragment of one worth masking."""
        spans: list[tuple[int, int]] = []
        n = len(text)
        for needle, raw in self._needles:
            m = len(needle)
            if m < FRAGMENT:
                i = text.find(needle)
                while i >= 0:
                    spans.append((i, i + m))
                    i = text.find(needle, i + 1)
            else:
                for s in range(0, m - _ANCHOR + 1, _ANCHOR):
                    gram = needle[s : s + _ANCHOR]
                    i = text.find(gram)
                    while i >= 0:
                        a, b, sa, sb = i, i + _ANCHOR, s, s + _ANCHOR
                        while a > 0 and sa > 0 and text[a - 1] == needle[sa - 1]:
                            a, sa = a - 1, sa - 1
                        while b < n and sb < m and text[b] == needle[sb]:
                            b, sb = b + 1, sb + 1
                        if b - a >= (FRAGMENT if raw else _ENCODED_FRAGMENT) or (
                                raw and b - a >= EDGE and ((a == 0 and sb == m) or (b == n and sa == 0))):
                            spans.append((a, b))
                        i = text.find(gram, i + 1)
            if not raw:
                continue
            # a cut point: the end of the text holds a prefix, its start a suffix
            for k in range(min(m, n, FRAGMENT - 1), EDGE - 1, -1):
                if text.endswith(needle[:k]):
                    spans.append((n - k, n))
                    break
            for k in range(min(m, n, FRAGMENT - 1), EDGE - 1, -1):
                if text.startswith(needle[-k:]):
                    spans.append((0, k))
                    break
        return spans

    def _mask(self, text: str) -> str:
        spans = self._spans(text)
        if not spans:
            return text
        spans.sort()
        out: list[str] = []
        pos = 0
        cur_a, cur_b = spans[0]
        for a, b in spans[1:]:
            if a <= cur_b:
                cur_b = max(cur_b, b)
                continue
            out += [text[pos:cur_a], REDACTED]
            pos = cur_b
            cur_a, cur_b = a, b
        out += [text[pos:cur_a], REDACTED, text[cur_b:]]
        return "".join(out)

    def _binary(self, text: str) -> str:
        """A string that is all base64 or all hex: checked (and masked) as the bytes it encodes."""
        if _HEX.fullmatch(text):
            data = bytes.fromhex(text)
            masked = self._mask(data.decode("latin-1"))
            if masked != data.decode("latin-1"):
                out = masked.encode("latin-1", "replace").hex()
                return out.upper() if text.isupper() else out
            return text
        if _B64.fullmatch(text):
            urlsafe = "-" in text or "_" in text
            try:
                bare = text.rstrip("=")
                data = (base64.urlsafe_b64decode if urlsafe else base64.b64decode)(bare + "=" * (-len(bare) % 4))
            except (binascii.Error, ValueError):
                return text
            plain = data.decode("latin-1")
            masked = self._mask(plain)
            if masked != plain:
                enc = base64.urlsafe_b64encode if urlsafe else base64.b64encode
                return enc(masked.encode("latin-1", "replace")).decode()
        return text

    def _suspect(self, strings: list[str]) -> bool:
        """Whether any of ``strings``, or its decoded forms, may hold something to mask (no
        false negatives; a false positive only costs the slow search)."""
        forms = list(strings)
        for t in strings:
            if "\\" in t or "%" in t or "&" in t:
                forms.append(_decode(t))
            if len(t) >= 16 and (_HEX.fullmatch(t) or _B64.fullmatch(t)):
                forms.append(_binary_text(t))
        blob = "\x00".join(forms)
        return any(p in blob for p in self._probes)

    def text(self, text: str) -> str:
        """``text`` with every secret and fragment masked, in its decoded form if that is where one hides."""
        if not self.secrets or not self._suspect([text]):
            return text
        return self._text(text)

    def _text(self, text: str) -> str:
        masked = self._binary(self._mask(text))
        for _ in range(_MAX_DECODE_ROUNDS):
            decoded = _decode(masked)
            if decoded == masked:
                break
            again = self._binary(self._mask(decoded))
            if again == decoded:
                break  # nothing hides in the decoded form: keep the text as it was
            masked = again  # a secret hid behind an encoding: the guest gets the decoded, masked form
        return masked

    def value(self, value: Any) -> Any:
        """A JSON value with every string (keys too) scrubbed, at every depth."""
        if not self.secrets:
            return value
        strings: list[str] = []
        _strings(value, strings)
        if not self._suspect(strings):
            return value
        return self._value(value)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        if isinstance(value, dict):
            return {self._text(str(k)): self._value(v) for k, v in value.items()}
        return value

    def found(self, value: Any) -> bool:
        """Whether a JSON value (or text) holds anything this scrubber would mask."""
        return bool(self.value(value) != value)

    def json_bytes(self, data: bytes) -> bytes | None:
        """The scrubbed JSON text ``data``, or None when it holds nothing to mask."""
        if not self.secrets:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            text = data.decode("utf-8", "replace")
            clean = self.text(text)
            return clean.encode() if clean != text else None
        clean = self.value(value)
        if clean == value:
            return None
        return json.dumps(clean, separators=(",", ":"), ensure_ascii=False).encode()


# -- the logs of the libraries a tool uses ------------------------------------------------------
#
# A tool's HTTP client logs each request's URL (httpx, at INFO), and a redirect a server
# chose may carry a secret in it. While a tool runs, the pipeline makes its scrubber the
# current one (:func:`scrubbing`); this filter, on the loggers of the libraries the tools
# use, masks what a record would print with it. Context variables follow the call into
# its tasks and worker threads, so concurrent calls of different agents do not mix.

_CURRENT: contextvars.ContextVar[Scrubber | None] = contextvars.ContextVar("torpor_scrubber", default=None)
LIBRARY_LOGGERS = ("httpx", "httpcore", "mcp")


class _LogScrubber(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        scrub = _CURRENT.get()
        if scrub:
            try:
                text = record.getMessage()
            except Exception:  # a record that does not format: leave it to the handler's own error path
                return True
            clean = scrub.text(text)
            if clean != text:
                record.msg, record.args = clean, None
        return True


_FILTER = _LogScrubber()


def install_log_filter() -> None:
    """Put the filter on the library loggers (idempotent; their child loggers too, which
    do not inherit a parent's filters)."""
    for name in LIBRARY_LOGGERS:
        for logger_name in [name, *[n for n in logging.root.manager.loggerDict if n.startswith(name + ".")]]:
            logger = logging.getLogger(logger_name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)


@contextlib.contextmanager
def scrubbing(scrub: Scrubber) -> Iterator[None]:
    """Make ``scrub`` the current scrubber of the library logs while a tool runs."""
    install_log_filter()
    token = _CURRENT.set(scrub)
    try:
        yield
    finally:
        _CURRENT.reset(token)
