"""The outbound-address guard of the network tools (SSRF protection).

A guest chooses URLs; the policy chooses where they may lead.  The guard
answers two questions, in this order, for every request and every redirect hop:

1. **Is the URL on the allowlist?**  The URL is parsed strictly (one parser,
   ours, so no two parsers can disagree about which host a URL names): only
   ``http``/``https``; no userinfo at all (``http://allowed@evil/`` is refused,
   not "interpreted"); no backslashes, whitespace or control characters; no
   percent-escapes in the host; the host normalised by
   :func:`policies.schema.canonical_host` (IDNA/UTS 46 to punycode, lowercase,
   no trailing dot) so that a homograph cannot equal an ASCII allowlist entry;
   numeric hosts only as a canonical dotted quad (``2130706433``, ``0x7f.1``,
   ``0177.0.0.1`` are refused, since resolvers read them as 127.0.0.1) or a
   bracketed IPv6 address.
2. **Is the address public, or named by the policy?**  After DNS resolution,
   every address the name resolves to must be globally routable, or be inside
   the grant's ``allow_private`` networks.  IPv6 forms that embed an IPv4
   address (``::ffff:127.0.0.1``, NAT64 ``64:ff9b::7f00:1``, 6to4, Teredo,
   IPv4-compatible) are checked as the embedded address too.

The HTTP client then connects to the very address that was checked (the URL it
sends carries the IP; ``Host`` and TLS SNI carry the name), so a second DNS
answer cannot change the destination: DNS rebinding has nothing to rebind.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from host.tools.registry import ToolError
from policies.schema import parse_host_pattern

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL = 8192

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


def _deny(message: str, reason: str, rule: str | None = None, **details: Any) -> ToolError:
    extra: dict[str, Any] = {"reason_code": reason, **details}
    if rule is not None:
        extra["rule"] = rule
    return ToolError("denied", message, **extra)


@dataclass(frozen=True)
class Target:
    """A parsed, normalised request URL (the fragment is dropped: it is never sent)."""

    scheme: str
    host: str  # canonical: punycode, lowercase; IPv6 without brackets
    port: int
    path: str  # path and query, canonical (canonical_path), "/" when empty

    @property
    def ip(self) -> IPAddress | None:
        """The host as an address when the URL names one literally."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def netloc(self) -> str:
        """``host[:port]`` as the ``Host`` header carries it (default ports omitted)."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if self.port == DEFAULT_PORTS[self.scheme] else f"{h}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def pinned_url(self, addr: IPAddress) -> str:
        """The URL with the checked address in place of the name (what is actually connected to)."""
        h = f"[{addr.compressed}]" if addr.version == 6 else str(addr)
        return f"{self.scheme}://{h}:{self.port}{self.path}"


def parse_url(url: str, *, rule: str | None = None) -> Target:
    """Parse a guest URL strictly; raise a structured ``denied`` error naming what is wrong."""
    if not isinstance(url, str) or not url:
        raise _deny("the URL is empty", "url_invalid", rule)
    if len(url) > MAX_URL:
        raise _deny(f"the URL is {len(url)} characters; the limit is {MAX_URL}", "url_invalid", rule)
    bad = next((c for c in url if ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\"), None)
    if bad is not None:
        raise _deny(
            f"the URL contains {bad!r}; whitespace, control characters and backslashes are refused "
            "(percent-encode them in the path)",
            "url_invalid",
            rule,
        )
    m = _SCHEME.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme not in DEFAULT_PORTS:
        raise _deny(f"only http and https URLs are allowed (got {scheme or 'no scheme'!r})", "scheme_not_allowed", rule)
    rest = url[m.end() :] if m else url
    if not rest.startswith("//"):
        raise _deny(f"{url!r} is not an absolute http(s) URL", "url_invalid", rule)
    rest = rest[2:]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    tail = tail.split("#", 1)[0]
    if "@" in authority:
        raise _deny(
            "URLs with credentials (user@host) are refused; the host injects credentials itself",
            "url_userinfo",
            rule,
        )
    if not authority:
        raise _deny(f"{url!r} has no host", "url_invalid", rule)
    if authority.count(":") > 1 and not authority.startswith("["):
        raise _deny("an IPv6 address in a URL must be in brackets: http://[::1]:8080/", "url_invalid", rule)
    try:
        wildcard, host, port = parse_host_pattern(authority)
        if wildcard:
            raise ValueError("'*' is not a host")
    except ValueError as exc:
        raise _deny(f"the URL's host is refused: {exc}", "url_invalid", rule) from None
    path = canonical_path(tail if tail.startswith("/") else "/" + tail)
    return Target(scheme, host, port if port is not None else DEFAULT_PORTS[scheme], path)


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def canonical_path(tail: str) -> str:
    """A path (and query) in the one form the policy judges and the client sends.

    Escapes of unreserved characters are decoded (``%2e`` is ``.``, RFC 3986 6.2.2.2),
    the others upper-cased, and dot segments removed (5.2.4), so that ``/a/./b``,
    ``/a/x/../b`` and ``/a/%2E%2e/b`` cannot pass a path rule as one thing and reach the
    server as another. The query keeps its text, escapes upper-cased.
    """
    path, sep, query = tail.partition("?")

    def esc(m: re.Match[str]) -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()

    path = _ESCAPE.sub(esc, path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    path = "/" + "/".join(out)
    if sep:
        path += "?" + _ESCAPE.sub(lambda m: "%" + m.group(1).upper(), query)
    return path


def host_allowed(target: Target, patterns: Sequence[str]) -> bool:
    """Whether the target matches an allowlist entry (canonical entries from the policy).

    ``host`` matches only itself on the scheme's default port; ``host:port`` that
    port; ``*.domain`` any subdomain (not ``domain`` itself).
    """
    for entry in patterns:
        wildcard, host, port = parse_host_pattern(entry)
        if port is None:
            if target.port != DEFAULT_PORTS[target.scheme]:
                continue
        elif port != target.port:
            continue
        if (target.host.endswith("." + host)) if wildcard else (target.host == host):
            return True
    return False


def _embedded(addr: IPAddress) -> list[IPAddress]:
    """The addresses a connection to ``addr`` really reaches, for checking.

    IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``) and NAT64
    (``64:ff9b::/96``) addresses stand for their IPv4 address: that one is
    judged.  6to4 and Teredo addresses are judged both as themselves and as the
    IPv4 address they embed.
    """
    if not isinstance(addr, ipaddress.IPv6Address):
        return [addr]
    if addr.ipv4_mapped is not None:
        return [addr.ipv4_mapped]
    if addr in _NAT64 or addr in _NAT64_LOCAL:
        return [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)]
    if int(addr) >> 32 == 0 and int(addr) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return [ipaddress.IPv4Address(int(addr))]
    out: list[IPAddress] = [addr]
    if addr.sixtofour is not None:
        out.append(addr.sixtofour)
    if addr.teredo is not None:
        out.extend(addr.teredo)
    return out


def address_kind(addr: IPAddress) -> str:
    """A word for a non-public address, for messages: loopback, private, link-local, ..."""
    for a in reversed(_embedded(addr)):
        for attr in ("is_loopback", "is_unspecified", "is_link_local", "is_multicast", "is_private", "is_reserved"):
            if getattr(a, attr):
                return attr[3:].replace("_", "-")
    return "non-public"


def address_allowed(addr: IPAddress, allow_private: bool | Sequence[str]) -> bool:
    """Public (globally routable, not multicast) addresses pass; others only when the policy names them.

    ``allow_private = true`` admits every address; a list admits addresses
    inside its networks.  An IPv6 form embedding an IPv4 address needs both to
    pass.
    """
    if allow_private is True:
        return True
    nets = [ipaddress.ip_network(n) for n in allow_private] if allow_private else []
    for a in _embedded(addr):
        if a.is_global and not a.is_multicast:
            continue
        if not any(a.version == n.version and a in n for n in nets):
            return False
    return True


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """All addresses the system resolver gives for ``host`` (TCP), in its order."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


resolver: Resolver = system_resolve
"""The resolver the guard uses (tests replace it to simulate DNS answers)."""


async def checked_addresses(
    target: Target, allow_private: bool | Sequence[str], *, rule: str | None = None
) -> list[IPAddress]:
    """The addresses to connect to, every one of them checked; refuse if any is not allowed.

    A name with even one forbidden address is refused outright: a resolver that
    mixes a public and a loopback answer is hostile or misconfigured, and
    either way not to be trusted with a choice.
    """
    literal = target.ip
    if literal is not None:
        addrs: list[IPAddress] = [literal]
    else:
        try:
            answers = await resolver(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise ToolError(
                "unavailable", f"cannot resolve {target.host}: {exc}", retryable=True, reason_code="dns_failed"
            ) from None
        addrs = []
        for text in answers:
            try:
                addrs.append(ipaddress.ip_address(text.split("%", 1)[0]))
            except ValueError:
                continue
        if not addrs:
            raise ToolError("unavailable", f"{target.host} has no address", retryable=True, reason_code="dns_failed")
    for a in addrs:
        if not address_allowed(a, allow_private):
            kind = address_kind(a)
            via = "" if literal is not None else f" ({target.host} resolves to it)"
            raise _deny(
                f"{a} is a {kind} address{via}; the policy does not allow it "
                f'(name it in allow_private, e.g. allow_private = ["{a}"])',
                "address_not_allowed",
                rule,
                address=str(a),
            )
    return addrs
