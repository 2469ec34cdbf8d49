"""http.fetch: allowlists, the SSRF guard (after DNS, pinned to the checked address),
redirects, credentials injected and scrubbed, size caps and broken servers."""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from loopback import Loopback, Reply, free_port, json_reply
from tools_helpers import Ctx, answer, invoke, policy

from host.tools import netguard
from host.tools.registry import ToolError


@pytest.fixture
def srv() -> Iterator[Loopback]:
    routes = {
        "/customers/C-42": lambda r: json_reply({"id": "C-42", "name": "Ada"}),
        "/echo": lambda r: json_reply({"method": r.method, "headers": r.headers, "body": r.body.decode()}),
        "/big": lambda r: Reply(200, b"x" * 10_000),
        "/binary": lambda r: Reply(200, bytes(range(256)), {"Content-Type": "application/octet-stream"}),
        "/badjson": lambda r: Reply(200, b'{"a": 1,', {"Content-Type": "application/json"}),
        "/hang": lambda r: Reply(200, b"late", hang=3),
        "/truncated": lambda r: Reply(200, b"only a little", content_length=5000),
        "/garbage": lambda r: Reply(raw=b"HELLO THERE\r\n\r\n"),
        "/bomb": lambda r: Reply(200, gzip.compress(b"0" * 20_000_000), {"Content-Encoding": "gzip"}),
        "/redirect/(.*)": lambda r: Reply(302, b"", {"Location": _unquote(r.path.split("/redirect/", 1)[1])}),
        "/loop": lambda r: Reply(302, b"", {"Location": "/loop"}),
        "/post-redirect": lambda r: Reply(303, b"", {"Location": "/echo"}),
    }
    with Loopback(routes) as s:
        yield s


def _unquote(text: str) -> str:
    from urllib.parse import unquote

    return unquote(text)


def grant(hosts: list[str], extra: str = "", name: str = "http.fetch") -> str:
    hs = ", ".join(f'"{h}"' for h in hosts)
    return f'[tools."{name}"]\nhosts = [{hs}]\n{extra}'


def ctx(hosts: list[str], extra: str = 'allow_private = ["127.0.0.1"]', *, secrets: dict[str, str] | None = None,
        name: str = "http.fetch") -> Ctx:
    return Ctx(policy(grant(hosts, extra, name)), name, secrets=secrets or {})


def denied(r: Any, reason: str) -> bool:
    return isinstance(r, ToolError) and r.code == "denied" and r.details.get("reason_code") == reason


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Names the guard resolves, and what to: any other name fails to resolve."""
    table: dict[str, list[str]] = {}
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        answer = table.get(host)
        if answer is None:
            raise OSError(f"no such host {host}")
        if len(answer) > 1 and host.startswith("rebind."):
            return [answer.pop(0)]  # a different answer every time it is asked
        return list(answer)

    monkeypatch.setattr(netguard, "resolver", resolve)
    table["__calls__"] = calls  # type: ignore[assignment]
    return table


# -- the happy path ----------------------------------------------------------------------


def test_get_json_with_injected_credential(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nheaders = { Authorization = "Bearer {crm}" }\ncredentials = ["crm"]',
            secrets={"crm": "crm-token-0123456789"})
    r = invoke("http.fetch", {"url": srv.base + "/customers/C-42"}, c)
    assert r["status"] == 200 and r["json"] == {"id": "C-42", "name": "Ada"}
    assert r["url"] == srv.base + "/customers/C-42" and r["redirects"] == [] and r["truncated"] is False
    assert r["headers"]["content-type"] == "application/json"
    req = srv.requests[0]
    assert req.headers["authorization"] == "Bearer crm-token-0123456789" and req.headers["host"] == srv.netloc


def test_echoed_credentials_are_scrubbed(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nheaders = { "X-Api-Key" = "{crm}" }\ncredentials = ["crm"]',
            secrets={"crm": "crm-token-0123456789"})
    status, r = answer("http.fetch", {"url": srv.base + "/echo"}, c)  # through the pipeline's choke point
    assert status == 0 and r["status"] == 200 and "crm-token" not in str(r)
    assert r["json"]["headers"]["x-api-key"] == "[redacted]"


def test_guest_cannot_set_injected_or_reserved_headers(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nheaders = { Authorization = "Bearer {crm}" }\ncredentials = ["crm"]',
            secrets={"crm": "crm-token-0123456789"})
    r = invoke("http.fetch", {"url": srv.base + "/echo", "headers": {"authorization": "Bearer mine"}}, c)
    assert denied(r, "header_not_allowed")
    r = invoke("http.fetch", {"url": srv.base + "/echo", "headers": {"Host": "evil.test"}}, c)
    assert denied(r, "header_not_allowed")
    r = invoke("http.fetch", {"url": srv.base + "/echo", "headers": {"X-A": "1\r\nX-B: 2"}}, c)
    assert isinstance(r, ToolError) and r.code == "invalid_args"
    assert srv.requests == []


def test_methods_allowlist_and_json_body(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/echo", "method": "POST", "json": {"a": 1}}, ctx([srv.netloc]))
    assert denied(r, "method_not_allowed") and r.details["rule"] == 'tools."http.fetch".methods'
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmethods = ["GET", "POST"]')
    r = invoke("http.fetch", {"url": srv.base + "/echo", "method": "post", "json": {"a": 1}}, c)
    assert r["json"]["method"] == "POST" and r["json"]["body"] == '{"a":1}'
    assert r["json"]["headers"]["content-type"] == "application/json"


def test_binary_and_malformed_json_bodies(srv: Loopback) -> None:
    c = ctx([srv.netloc])
    r = invoke("http.fetch", {"url": srv.base + "/binary"}, c)
    assert "body" not in r and len(r["body_base64"]) > 300
    r = invoke("http.fetch", {"url": srv.base + "/badjson"}, c)
    assert r["status"] == 200 and r["body"] == '{"a": 1,' and "json" not in r and r["json_error"]


def test_status_codes_are_data(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/customers/C-999"}, ctx([srv.netloc]))
    assert r["status"] == 404 and r["body"] == "no route"


# -- allowlist and SSRF --------------------------------------------------------------------


def test_host_not_on_the_allowlist(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": "http://example.com/"}, ctx([srv.netloc]))
    assert denied(r, "host_not_allowed") and r.details["rule"] == 'tools."http.fetch".hosts'
    other = free_port()  # same address, another port: not on the list either
    r = invoke("http.fetch", {"url": f"http://127.0.0.1:{other}/"}, ctx([srv.netloc]))
    assert denied(r, "host_not_allowed")


def test_loopback_is_refused_unless_the_policy_names_it(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/customers/C-42"}, ctx([srv.netloc], ""))
    assert denied(r, "address_not_allowed") and r.details["address"] == "127.0.0.1"
    assert "allow_private" in str(r)
    r = invoke("http.fetch", {"url": srv.base + "/customers/C-42"}, ctx([srv.netloc], 'allow_private = ["10.0.0.0/8"]'))
    assert denied(r, "address_not_allowed")
    assert srv.requests == []


def test_a_name_resolving_to_loopback_is_refused(srv: Loopback, fake_dns: dict[str, list[str]]) -> None:
    fake_dns["crm.example.com"] = ["127.0.0.1"]
    fake_dns["mixed.example.com"] = ["93.184.216.34", "127.0.0.1"]
    url = f"http://crm.example.com:{srv.port}/customers/C-42"
    r = invoke("http.fetch", {"url": url}, ctx([f"crm.example.com:{srv.port}"], ""))
    assert denied(r, "address_not_allowed") and "resolves to it" in str(r)
    r = invoke("http.fetch", {"url": f"http://mixed.example.com:{srv.port}/"}, ctx([f"mixed.example.com:{srv.port}"], ""))
    assert denied(r, "address_not_allowed")
    assert srv.requests == []
    # named by the policy: allowed, and the request carries the name, not the address
    r = invoke("http.fetch", {"url": url}, ctx([f"crm.example.com:{srv.port}"]))
    assert r["status"] == 200 and srv.requests[0].headers["host"] == f"crm.example.com:{srv.port}"


def test_dns_is_asked_once_and_the_checked_address_is_used(srv: Loopback, fake_dns: dict[str, Any]) -> None:
    fake_dns["rebind.example.com"] = ["127.0.0.1", "10.0.0.1"]  # first answer allowed, second not
    r = invoke("http.fetch", {"url": f"http://rebind.example.com:{srv.port}/customers/C-42"},
               ctx([f"rebind.example.com:{srv.port}"]))
    assert r["status"] == 200 and fake_dns["__calls__"] == ["rebind.example.com"]


@pytest.mark.parametrize(
    "url",
    [
        "http://{netloc}@example.com/",  # userinfo: the real host is example.com
        "http://user:pw@{netloc}/customers/C-42",  # credentials in the URL
        "http://example.com#@{netloc}/",  # the fragment hides the host from naive parsers
        "http://example.com\\@{netloc}/",  # backslash: parsers disagree
        "http://{netloc}\\@example.com/",
        "http://example.com%2f@{netloc}/",
        "http:/{netloc}/",
        "http://2130706433:{port}/",  # decimal 127.0.0.1
        "http://0x7f000001:{port}/",  # hex
        "http://0x7f.1:{port}/",
        "http://0177.0.0.1:{port}/",  # octal
        "http://127.1:{port}/",  # short form
        "http://127.0.0.1.:{port}/x",  # trailing dot: normalised, then checked
        "http://[::ffff:127.0.0.1]:{port}/",  # IPv4-mapped IPv6
        "http://[::ffff:7f00:1]:{port}/",
        "http://[64:ff9b::7f00:1]:{port}/",  # NAT64 form
        "http://[::1]:{port}/",
        "http://[::]:{port}/",
        "http://0.0.0.0:{port}/",
        "http://localhost:{port}/",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[fe80::1%25lo]:{port}/",
        "file:///etc/passwd",
        "gopher://{netloc}/",
        "http://%31%32%37.0.0.1:{port}/",
        " http://{netloc}/",
    ],
)
def test_urls_crafted_to_escape_the_allowlist(srv: Loopback, url: str, fake_dns: dict[str, list[str]]) -> None:
    # The policy allows exactly 127.0.0.1 on this port, and names no other private address.
    u = url.format(netloc=srv.netloc, port=srv.port)
    r = invoke("http.fetch", {"url": u}, ctx([srv.netloc]))
    if u == f"http://127.0.0.1.:{srv.port}/x":  # the same host, written with a trailing dot
        assert r["status"] == 404
        return
    assert isinstance(r, ToolError) and r.code == "denied", (u, r)
    assert r.details["reason_code"] in (
        "host_not_allowed", "url_userinfo", "url_invalid", "scheme_not_allowed", "address_not_allowed"), r.details
    assert srv.requests == []


@pytest.mark.parametrize(
    "host",
    ["[::1]:{port}", "0.0.0.0:{port}", "[::]:{port}", "[::ffff:127.0.0.1]:{port}", "[64:ff9b::7f00:1]:{port}",
     "[::127.0.0.1]:{port}", "169.254.169.254", "10.0.0.1", "192.168.1.1", "100.64.0.1", "[fe80::1]", "[fc00::1]",
     "224.0.0.1"],
)
def test_listed_but_non_public_addresses_need_allow_private(srv: Loopback, host: str) -> None:
    h = host.format(port=srv.port)
    r = invoke("http.fetch", {"url": f"http://{h}/"}, ctx([h], ""))
    assert denied(r, "address_not_allowed"), (h, r)
    assert srv.requests == []


def test_idn_homographs_are_compared_as_punycode(srv: Loopback, fake_dns: dict[str, list[str]]) -> None:
    fake_dns["paypal.test"] = ["127.0.0.1"]
    fake_dns["xn--pypal-4ve.test"] = ["127.0.0.1"]
    c = ctx([f"paypal.test:{srv.port}"])
    r = invoke("http.fetch", {"url": f"http://p\u0430ypal.test:{srv.port}/customers/C-42"}, c)  # Cyrillic a
    assert denied(r, "host_not_allowed") and "xn--" in r.details["host"]
    # Fullwidth letters are the same name after UTS 46 mapping, as a browser would resolve it.
    r = invoke("http.fetch", {"url": f"http://\uff50\uff41\uff59\uff50\uff41\uff4c.test:{srv.port}/customers/C-42"}, c)
    assert r["status"] == 200 and srv.requests[-1].headers["host"] == f"paypal.test:{srv.port}"


def test_wildcards_match_subdomains_only(fake_dns: dict[str, list[str]]) -> None:
    t = netguard.parse_url("https://api.example.com/")
    assert netguard.host_allowed(t, ["*.example.com"])
    assert not netguard.host_allowed(netguard.parse_url("https://example.com/"), ["*.example.com"])
    assert not netguard.host_allowed(netguard.parse_url("https://evilexample.com/"), ["*.example.com"])
    assert not netguard.host_allowed(netguard.parse_url("https://api.example.com.evil.net/"), ["*.example.com"])
    assert not netguard.host_allowed(netguard.parse_url("https://api.example.com:8443/"), ["*.example.com"])
    assert netguard.host_allowed(netguard.parse_url("http://api.example.com/"), ["api.example.com"])


# -- redirects -------------------------------------------------------------------------------


def test_redirects_within_the_allowlist_are_followed(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/redirect/%2Fcustomers%2FC-42"}, ctx([srv.netloc]))
    assert r["status"] == 200 and r["json"]["id"] == "C-42"
    assert r["redirects"] == [srv.base + "/redirect/%2Fcustomers%2FC-42"] and r["url"] == srv.base + "/customers/C-42"


def test_redirect_outside_the_allowlist_is_refused(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/redirect/http%3A%2F%2Fexample.org%2F"}, ctx([srv.netloc]))
    assert denied(r, "redirect_not_allowed") and r.details["cause"] == "host_not_allowed"


def test_redirect_to_a_private_address_is_refused(srv: Loopback, fake_dns: dict[str, list[str]]) -> None:
    fake_dns["internal.example.com"] = ["10.1.2.3"]
    loc = "http%3A%2F%2Finternal.example.com%2Fadmin"
    r = invoke("http.fetch", {"url": srv.base + "/redirect/" + loc}, ctx([srv.netloc, "internal.example.com"]))
    assert denied(r, "address_not_allowed") and r.details["address"] == "10.1.2.3"
    loc = "http%3A%2F%2F169.254.169.254%2Flatest%2Fmeta-data%2F"
    r = invoke("http.fetch", {"url": srv.base + "/redirect/" + loc}, ctx([srv.netloc, "169.254.169.254"]))
    assert denied(r, "address_not_allowed")
    loc = "http%3A%2F%2F2130706433%2F"
    r = invoke("http.fetch", {"url": srv.base + "/redirect/" + loc}, ctx([srv.netloc]))
    assert denied(r, "redirect_not_allowed") and r.details["cause"] == "url_invalid"


def test_redirect_loops_stop_and_303_turns_post_into_get(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/loop"}, ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmax_redirects = 3'))
    assert r["status"] == 302 and len(r["redirects"]) == 3
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmethods = ["POST"]')
    r = invoke("http.fetch", {"url": srv.base + "/post-redirect", "method": "POST", "body": "x"}, c)
    assert r["json"]["method"] == "GET" and r["json"]["body"] == ""


def test_credentials_do_not_follow_a_redirect_to_another_origin(srv: Loopback) -> None:
    with Loopback({"/echo": lambda r: json_reply({"headers": r.headers})}) as other:
        c = ctx([srv.netloc, other.netloc],
                'allow_private = ["127.0.0.1"]\nheaders = { Authorization = "Bearer {t}" }\ncredentials = ["t"]',
                secrets={"t": "token-abcdef"})
        loc = f"http%3A%2F%2F{other.netloc}%2Fecho"
        r = invoke("http.fetch", {"url": srv.base + "/redirect/" + loc}, c)
        assert r["status"] == 200 and "authorization" not in r["json"]["headers"]
        assert srv.requests[0].headers["authorization"] == "Bearer token-abcdef"


# -- sizes and broken servers -------------------------------------------------------------------


def test_response_cap_and_truncate(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmax_response_bytes = "1KiB"')
    r = invoke("http.fetch", {"url": srv.base + "/big"}, c)
    assert isinstance(r, ToolError) and r.code == "result_too_large" and r.details["limit"] == 1024
    r = invoke("http.fetch", {"url": srv.base + "/big", "truncate": True}, c)
    assert r["truncated"] is True and r["bytes"] == 1024 and r["body"] == "x" * 1024
    r = invoke("http.fetch", {"url": srv.base + "/big", "max_bytes": 100, "truncate": True}, c)
    assert r["bytes"] == 100


def test_gzip_bomb_stops_at_the_cap(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/bomb"}, ctx([srv.netloc]))
    assert isinstance(r, ToolError) and r.code == "result_too_large"


def test_a_hanging_server_times_out(srv: Loopback) -> None:
    r = invoke("http.fetch", {"url": srv.base + "/hang"}, ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\ntimeout = "300ms"'))
    assert isinstance(r, ToolError) and r.code == "timeout" and r.retryable


@pytest.mark.parametrize("path", ["/truncated", "/garbage"])
def test_truncated_and_malformed_responses(srv: Loopback, path: str) -> None:
    r = invoke("http.fetch", {"url": srv.base + path}, ctx([srv.netloc]))
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "bad_response"


def test_connection_refused() -> None:
    port = free_port()
    r = invoke("http.fetch", {"url": f"http://127.0.0.1:{port}/"}, ctx([f"127.0.0.1:{port}"]))
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "connect_failed"


def test_strict_arguments(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmethods = ["POST"]')
    for bad in ({}, {"url": 5}, {"url": srv.base, "headers": {"a": 1}}, {"url": srv.base, "verify": False},
                {"url": srv.base, "method": "POST", "body": "a", "json": {}},
                {"url": srv.base, "method": "POST", "body_base64": "!!"}):
        r = invoke("http.fetch", bad, c)
        assert isinstance(r, ToolError) and r.code == "invalid_args", bad


def test_named_http_grants_have_their_own_rules(srv: Loopback) -> None:
    c = ctx([srv.netloc], 'allow_private = ["127.0.0.1"]\nmethods = ["POST"]', name="http.send")
    r = invoke("http.send", {"url": srv.base + "/echo", "method": "POST", "body": "hi"}, c)
    assert r["json"]["body"] == "hi"
    r = invoke("http.send", {"url": srv.base + "/echo"}, c)
    assert denied(r, "method_not_allowed") and r.details["rule"] == 'tools."http.send".methods'


def test_no_grant_no_request(srv: Loopback) -> None:
    c = Ctx(policy('[tools."kv.get"]'), "http.fetch")
    r = invoke("http.fetch", {"url": srv.base + "/echo"}, c)
    assert denied(r, "not_granted")
