"""The policy settings of the real tools: llm.*, http.*, kv namespaces, [mcp.NAME] —
checked at load, with typo-aware messages, and defaults that say what the host will do."""

from __future__ import annotations

import pytest

from policies import PolicyError, parse_policy, policy_from_dict
from policies.schema import canonical_host, tool_kind

HEAD = '[agent]\nname = "t"\n'


def load(text: str):  # type: ignore[no-untyped-def]
    return parse_policy(HEAD + text, source="policy.toml")


def errors(text: str) -> str:
    with pytest.raises(PolicyError) as info:
        load(text)
    return str(info.value)


FULL = """
[tools."llm.chat"]
base_url = "https://api.openai.com/v1/"
model = "gpt-4o-mini"
models = ["gpt-4o"]
credentials = ["openai"]
max_tokens = 800
retries = 3
timeout = "45s"

[tools."llm.local"]
provider = "anthropic"
base_url = "http://127.0.0.1:8400/v1"
model = "claude-x"

[tools."http.fetch"]
hosts = ["API.Example.com", "crm.internal:8443", "*.B\u00fccher.de", "127.0.0.1:8080", "[::1]:9000"]
allow_private = ["127.0.0.1", "10.0.0.0/8", "::1"]
headers = { Authorization = "Bearer {crm}" }
credentials = ["crm"]
max_response_bytes = "512KiB"
max_redirects = 2

[tools."http.send"]
hosts = ["crm.internal:8443"]
methods = ["post"]
approval = true

[tools."kv.get"]
namespaces = ["team", "config"]

[mcp.tickets]
command = "/usr/bin/tickets-mcp"
args = ["--stdio"]
env = { TOKEN = "{tickets}" }
credentials = ["tickets"]
tools = ["lookup", "create"]
timeout = "20s"

[tools."mcp.tickets.create"]
approval = true
"""


def test_a_full_policy_loads_normalised() -> None:
    p = load(FULL)
    llm = p.grants["llm.chat"]
    assert llm.base_url == "https://api.openai.com/v1" and llm.model == "gpt-4o-mini" and llm.timeout == 45
    assert llm.idempotent is True
    http = p.grants["http.fetch"]
    assert http.hosts == ("api.example.com", "crm.internal:8443", "*.xn--bcher-kva.de", "127.0.0.1:8080", "[::1]:9000")
    assert http.allow_private == ("127.0.0.1/32", "10.0.0.0/8", "::1/128")
    assert http.max_response_bytes == 512 * 1024 and http.idempotent is True  # GET only
    send = p.grants["http.send"]
    assert send.methods == ("POST",) and send.idempotent is False and send.approval is not None
    assert p.grants["kv.get"].namespaces == ("team", "config")
    # [mcp.tickets].tools grants mcp.tickets.lookup and .create; the server's credentials go to both
    assert set(p.grants) >= {"mcp.tickets.lookup", "mcp.tickets.create"}
    assert p.grants["mcp.tickets.lookup"].credentials == ("tickets",)
    assert p.grants["mcp.tickets.create"].approval is not None and p.grants["mcp.tickets.create"].idempotent is False
    assert p.mcp["tickets"].args == ("--stdio",) and p.mcp["tickets"].timeout == 20
    again = policy_from_dict(p.to_dict())
    assert again.digest == p.digest
    assert "mcp" in p.summary() or "tickets" in p.summary()


def test_tool_kinds() -> None:
    assert tool_kind("llm.chat") == "llm.chat" and tool_kind("llm.cheap") == "llm.chat"
    assert tool_kind("http.crm") == "http.fetch" and tool_kind("mcp.s.t") == "mcp" and tool_kind("mcp.s.a.b") == "mcp"
    assert tool_kind("mcp.s") is None and tool_kind("erp.po") is None and tool_kind("http.crm", True) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[tools."kv.get"]\nhosts = ["a.com"]', 'tools."kv.get".hosts: `hosts` configures http.fetch; kv.get does not use it'),
        ('[tools."x.y"]\nhandler = "m:f"\nmodel = "m"', "`model` configures llm.chat; a user tool does not use it"),
        ('[tools."http.fetch"]\nmethods = ["GET"]', 'http.fetch needs hosts = [...]'),
        ('[tools."llm.chat"]\nmodel = "m"', "llm.chat needs base_url"),
        ('[tools."llm.chat"]\nbase_url = "http://x/v1"', "llm.chat needs model"),
        ('[tools."llm.chat"]\nbase_url = "ftp://x"\nmodel = "m"', "is not an http(s) URL"),
        ('[tools."llm.chat"]\nbase_url = "http://u:p@x/v1"\nmodel = "m"', "no credentials, query or fragment"),
        ('[tools."llm.chat"]\nbase_url = "http://x"\nmodel = "m"\napi_key = "k"', "'k' must also be listed in credentials"),
        ('[tools."llm.chat"]\nbase_url = "http://x"\nmodel = "m"\nprovider = "opneai"', "did you mean 'openai'?"),
        ('[tools."llm.chat"]\nbase_url = "http://x"\nmodel = "m"\nretries = 99', "retries: must be at most 10"),
        ('[tools."http.fetch"]\nhost = ["a.com"]', "unknown key 'host' — did you mean 'hosts'?"),
        ('[tools."http.fetch"]\nhosts = ["a.com"]\nmethods = ["GETT"]', "unknown HTTP method 'GETT' — did you mean 'GET'?"),
        ('[tools."http.fetch"]\nhosts = ["2130706433"]', "is not a canonical IPv4 address"),
        ('[tools."http.fetch"]\nhosts = ["a.com:99999"]', "is not a port number"),
        ('[tools."http.fetch"]\nhosts = ["user@a.com"]', "contains a character a host name cannot have"),
        ('[tools."http.fetch"]\nhosts = ["*.10.0.0.1"]', "a wildcard needs a domain name"),
        ('[tools."http.fetch"]\nhosts = ["a.com"]\nallow_private = ["10.0.0.0/33"]', "is not an IP address or network"),
        ('[tools."http.fetch"]\nhosts = ["a.com"]\nheaders = { Host = "x" }', "is set by the host"),
        ('[tools."http.fetch"]\nhosts = ["a.com"]\nheaders = { A = "{tok}" }', "{tok} names no credential of this grant"),
        ('[tools."http.fetch"]\nhosts = ["a.com"]\nmax_response_bytes = "1GiB"', "must be between 1 B and 64MiB"),
        ('[tools."kv.set"]\nnamespaces = ["Team Notes"]', "is not a namespace name"),
        ('[tools."mcp.tickts.lookup"]\n[mcp.tickets]\ncommand = "x"', "no MCP server [mcp.tickts] — did you mean 'mcp.tickets.lookup'?"),
        ('[tools."mcp.tickets.lokup"]\n[mcp.tickets]\ncommand = "x"\ntools = ["lookup"]', "does not list 'lokup' — did you mean 'lookup'?"),
        ('[mcp.tickets]\ncomand = "x"', "[mcp.tickets] unknown key 'comand' — did you mean 'command'?"),
        ('[mcp.tickets]\ncommand = "x"\nenv = { T = "{tok}" }', "{tok} names no credential of this server"),
        ('[mcp.tickets]\ncommand = "x"\ntools = ["a b"]', "is not an MCP tool name"),
        ('[mcp."bad.name"]\ncommand = "x"', "is not a server name"),
        ('[tools."llm.chat"]\nhandler = "m:f"', "llm.chat is a builtin tool; remove `handler`"),
    ],
)
def test_mistakes_are_named(text: str, expected: str) -> None:
    assert expected in errors(text)


def test_a_family_name_with_a_handler_is_a_user_tool() -> None:
    p = load('[tools."http.legacy"]\nhandler = "legacy_tools:fetch"')
    assert p.grants["http.legacy"].handler == "legacy_tools:fetch"


def test_policy_may_loosen_mcp_idempotence_but_not_tighten_builtins_wrongly() -> None:
    p = load('[mcp.s]\ncommand = "x"\ntools = ["t"]\n[tools."mcp.s.t"]\nidempotent = true')
    assert p.grants["mcp.s.t"].idempotent is True
    p = load('[tools."http.fetch"]\nhosts = ["a.com"]\nmethods = ["POST"]\nidempotent = true')  # the author asserts it
    assert p.grants["http.fetch"].idempotent is True


@pytest.mark.parametrize(
    ("host", "canon"),
    [("Example.COM.", "example.com"), ("b\u00fccher.de", "xn--bcher-kva.de"), ("\uff45xample.com", "example.com"),
     ("[::FFFF:127.0.0.1]", "::ffff:7f00:1"), ("10.0.0.1", "10.0.0.1")],
)
def test_canonical_hosts(host: str, canon: str) -> None:
    assert canonical_host(host) == canon


@pytest.mark.parametrize("host", ["0x7f.1", "127.1", "0177.0.0.1", "4294967296", "a..b", "-a.com", "fe80::1%eth0", ""])
def test_ambiguous_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError):
        canonical_host(host)
