"""Issue 22: secrets never reach the guest, and the policy decides on exactly what the tool will do.

One section per class of the issue, each against the real tools and loopback servers
(HTTP, model, MCP) on 127.0.0.1, most through a real guest (tests/guests/caller) on a
real host; and the "done when" test: a run of tools that each try to leak their secret
through every path, then a scan of the store, the CLI's outputs and the logs for the
secret and for any fragment of it of 8 characters or more.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
from conftest import GUESTS, ROOT, BundleFactory
from loopback import Loopback, Reply, Request, chat_completion, json_reply
from tools_helpers import Ctx, answer, invoke, policy

from host.runtime import Host, RunResult
from host.runtime.budgets import LIMITS_NAMESPACE
from host.runtime.tool_call import ToolCallPipeline, canonical_args
from host.sandbox import bundle as bundle_mod
from host.tools import mcp, netguard
from host.tools.builtin import BUILTINS
from host.tools.registry import ToolError, spec_from_function
from host.trust.credentials import VaultBroker
from host.trust.scrub import FRAGMENT, REDACTED, Scrubber
from host.trust.vault import Vault, VaultKeyError
from policies import Deny, NotJSONError, ToolRequest, Usage, decide, explain, parse_policy

pytestmark = pytest.mark.timeout(300)
MCP_SERVER = Path(__file__).parent / "mcp_fixture_server.py"


def new_secret(tag: str) -> str:
    # Letters of the URL-safe alphabet: no 8-character window of it turns up by chance in
    # the hex digests and ids a store is full of.
    return f"sk-{tag}-" + secrets.token_urlsafe(30)


def fragments(secret: str) -> list[str]:
    """The secret, its hex and base64 forms, and every window of FRAGMENT characters."""
    raw = secret.encode()
    forms = [secret, raw.hex(), base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")]
    return forms + [secret[i:i + FRAGMENT] for i in range(len(secret) - FRAGMENT + 1)]


def leaks(text: str | bytes, secret: str) -> list[str]:
    hay = text.decode("latin-1") if isinstance(text, bytes) else text
    return [f for f in fragments(secret) if f in hay]


@pytest.fixture(scope="module")
def caller_module(bundles: BundleFactory) -> bytes:
    return bundles.load(GUESTS / "caller").module


def make(module: bytes, policy_text: str) -> bundle_mod.Bundle:
    return bundle_mod.load_bytes(bundle_mod.pack(module, policy_text))


def run(host: Host, b: bundle_mod.Bundle, calls: list[dict[str, Any]], **kw: Any) -> RunResult:
    return anyio.run(lambda: host.run(b, {"calls": calls}, **kw))


HEAD = '[agent]\nname = "secrets"\n\n[budgets]\nfuel = 500_000_000\nmemory = "32MiB"\nwall_clock = "60s"\n'


# --- 1. what a tool returns is scrubbed: one choke point -----------------------------------------


def test_the_scrubber_finds_every_form_and_fragment() -> None:
    s = new_secret("unit")
    scrub = Scrubber([s])
    cases = {
        "raw": s, "inside": f"key={s};", "json-escaped": json.dumps(s).replace("s", "\\u0073"),
        "every-other-escaped": "".join(f"\\u{ord(c):04x}" if i % 2 else c for i, c in enumerate(s)),
        "percent": quote(s, safe=""), "double-percent": quote(quote(s, safe=""), safe=""),
        "html": "".join(f"&#x{ord(c):x};" for c in s), "html-named": html.escape(s),
        "base64": base64.b64encode(s.encode()).decode(), "base64 in text": "Basic " + base64.b64encode(
            f"user:{s}".encode()).decode() + " sent", "hex": s.encode().hex(), "HEX": s.encode().hex().upper(),
        "prefix at the end": "the key is " + s[:-1], "suffix at the start": s[1:] + " was the key",
        "short prefix at a cut": "key " + s[:5], "middle": "x" + s[10:20] + "y",
    }
    for name, text in cases.items():
        clean = scrub.value({"v": [text], text: 1})
        dumped = json.dumps(clean)
        assert REDACTED in dumped, name
        assert leaks(dumped, s) == [], (name, dumped)
    assert scrub.text("nothing to see, 50% & co") == "nothing to see, 50% & co"
    assert Scrubber([]).value({"a": s}) == {"a": s}  # no secrets: nothing to do


def _leaky_http(secret_header: str = "x-key") -> dict[str, Any]:
    def escaped(r: Request) -> Reply:  # the credential echoed JSON-escaped: decoded, it is clear
        k = r.headers[secret_header]
        body = '{"echo": "' + "".join(f"\\u{ord(c):04x}" for c in k[:4]) + k[4:] + '"}'
        return Reply(200, body.encode(), {"Content-Type": "application/json"})

    def escaped_text(r: Request) -> Reply:
        k = r.headers[secret_header]
        return Reply(200, ("x\\u" + f"{ord(k[0]):04x}" + k[1:]).encode(), {"Content-Type": "text/plain"})

    def padded(r: Request) -> Reply:
        return Reply(200, ("#" * 100 + r.headers[secret_header] + "#" * 100).encode(), {"Content-Type": "text/plain"})

    return {
        "/escaped": escaped,
        "/escaped-text": escaped_text,
        "/padded": padded,
        "/start": lambda r: Reply(302, b"", {"Location": "/next?k=" + quote(r.headers[secret_header], safe="")}),
        "/next": lambda r: json_reply({"ok": True}),
        "/binary": lambda r: Reply(200, b"\xff\xfe" + r.headers[secret_header].encode(),
                                   {"Content-Type": "application/octet-stream"}),
    }


def http_ctx(srv: Loopback, secret: str, hosts: tuple[str, ...] = ()) -> Ctx:
    c = Ctx(policy(f'[tools."http.fetch"]\nhosts = ["{srv.netloc}"]\nallow_private = ["127.0.0.1"]\n'
                   'headers = { "X-Key" = "{crm}" }\ncredentials = ["crm"]\n'), "http.fetch", secrets={"crm": secret})
    return c


def test_http_echoes_redirects_and_cut_bodies_are_scrubbed() -> None:
    s = new_secret("http")
    with Loopback(_leaky_http()) as srv:
        c = http_ctx(srv, s)
        for url, extra in [("/escaped", {}), ("/escaped-text", {}), ("/start", {}), ("/binary", {}),
                           ("/padded", {"max_bytes": 100 + len(s) - 1, "truncate": True}),  # a prefix at the cut
                           ("/padded", {"max_bytes": 100 + 5, "truncate": True})]:
            status, r = answer("http.fetch", {"url": srv.base + url, **extra}, c)
            assert status == 0, r
            assert leaks(json.dumps(r), s) == [], (url, r)
        assert all(req.headers["x-key"] == s for req in srv.requests)  # the server did get it
        status, r = answer("http.fetch", {"url": srv.base + "/start"}, c)
        assert (REDACTED in r["url"] and REDACTED in r["redirects"][0]) or REDACTED in r["url"]


def test_llm_error_messages_cut_at_the_secret_are_scrubbed() -> None:
    key = new_secret("llm")

    def reject(r: Request) -> Reply:  # the key lands exactly at the host's 500-character cut
        k = r.headers["authorization"][7:]
        return json_reply({"error": {"message": "A" * (500 - len(k) + 1) + k}}, 401)

    def echo(r: Request) -> Reply:
        return json_reply(chat_completion("your key: " + json.dumps(r.headers["authorization"])))

    with Loopback({"/v1/chat/completions": reject}) as srv:
        c = Ctx(policy(f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m"\ncredentials = ["k"]\n'),
                "llm.chat", secrets={"k": key})
        status, r = answer("llm.chat", {"messages": [{"role": "user", "content": "hi"}]}, c)
        assert status != 0 and r["code"] == "tool_failed" and leaks(json.dumps(r), key) == []
        assert REDACTED in r["message"]
    with Loopback({"/v1/chat/completions": echo}) as srv:
        c = Ctx(policy(f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m"\ncredentials = ["k"]\n'),
                "llm.chat", secrets={"k": key})
        status, r = answer("llm.chat", {"messages": [{"role": "user", "content": "hi"}]}, c)
        assert status == 0 and leaks(json.dumps(r), key) == [] and REDACTED in r["content"]


def mcp_toml(name: str = "leaky") -> str:
    return (f'[mcp.{name}]\ncommand = "{sys.executable}"\nargs = ["{MCP_SERVER}"]\ntools = ["leak_env"]\n'
            'timeout = "10s"\nenv = { CRM_TOKEN = "{mcp_token}" }\ncredentials = ["mcp_token"]\n')


def test_mcp_results_and_errors_are_scrubbed() -> None:
    s = new_secret("mcp")
    c = Ctx(policy("", mcp_toml()), "mcp.leaky.leak_env", secrets={"mcp_token": s})
    try:
        for how in ("result", "escaped", "error", "rpc_error"):
            raw = invoke("mcp.leaky.leak_env", {"how": how}, c)
            assert s in str(raw.details if isinstance(raw, ToolError) else raw) or s in str(raw) or how == "escaped"
            _status, r = answer("mcp.leaky.leak_env", {"how": how}, c)
            assert leaks(json.dumps(r), s) == [], (how, r)
    finally:
        mcp.shutdown()


def test_an_operator_tools_exception_is_scrubbed_for_the_guest_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    s = new_secret("exc")

    def connect(args: Any, ctx: Any) -> dict[str, Any]:
        raise ConnectionError(f"db at 10.0.0.5 refused password {s}")

    spec = spec_from_function(connect, name="db.query")
    with caplog.at_level(logging.WARNING, logger="torpor.tools"):
        status, data = ToolCallPipeline.settle(spec, Scrubber([s]), exc=ConnectionError(f"refused password {s}"))
    msg = json.loads(data)
    assert status != 0 and msg["code"] == "tool_failed" and "refused password" in msg["message"]
    assert leaks(data, s) == [] and REDACTED in msg["message"]
    assert "refused password" in caplog.text and "ConnectionError" in caplog.text  # the operator keeps the details
    assert leaks(caplog.text, s) == []


# --- 1b. a secret bound to hosts is never sent anywhere else ---------------------------------------


def test_a_bound_secret_is_never_sent_outside_its_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)
    s = new_secret("bound")
    vault = Vault(tmp_path)
    with Loopback(_leaky_http() | {"/ok": lambda r: json_reply({"ok": True})}) as srv:
        vault.set("crm", s, hosts=["api.example.com"])
        leased = VaultBroker(vault).secrets_for("A", "http.fetch", ("crm",))
        c = http_ctx(srv, s)
        ctx_secrets = leased
        c.secrets = dict(ctx_secrets)

        def ctx_bound() -> Any:
            ctx = Ctx.ctx(c)
            ctx.secret_hosts = {"crm": ("api.example.com",)}
            return ctx

        c.ctx = ctx_bound  # type: ignore[method-assign]
        r = invoke("http.fetch", {"url": srv.base + "/ok"}, c)
        assert isinstance(r, ToolError) and r.details["reason_code"] == "credential_host_not_allowed", r
        assert srv.requests == []  # nothing was sent: the host could not echo it
        assert leased.bindings() == {"crm": ("api.example.com",)}
        # bound to the loopback server itself: sent
        vault.set("crm", s, hosts=[srv.netloc])
        leased = VaultBroker(vault).secrets_for("B", "http.fetch", ("crm",))
        assert leased.bindings() == {"crm": (srv.netloc,)}
        c.ctx = lambda: (lambda x: (setattr(x, "secret_hosts", leased.bindings()), x)[1])(Ctx.ctx(c))  # type: ignore[method-assign]
        r = invoke("http.fetch", {"url": srv.base + "/ok"}, c)
        assert not isinstance(r, ToolError) and srv.requests[0].headers["x-key"] == s
    # the binding is sealed with the value: a binding widened in the file does not open
    data = json.loads((tmp_path / "vault.json").read_text())
    data["secrets"]["crm"]["hosts"] = ["evil.example"]
    (tmp_path / "vault.json").write_text(json.dumps(data))
    with pytest.raises(VaultKeyError):
        vault.get_bound(["crm"])


def test_a_bound_llm_key_goes_only_to_its_host(tmp_path: Path) -> None:
    key = new_secret("llmbound")
    with Loopback({"/v1/chat/completions": lambda r: json_reply(chat_completion("ok"))}) as srv:
        c = Ctx(policy(f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m"\ncredentials = ["k"]\n'),
                "llm.chat", secrets={"k": key})
        base_ctx = c.ctx
        c.ctx = lambda: (lambda x: (setattr(x, "secret_hosts", {"k": ("api.openai.com",)}), x)[1])(base_ctx())  # type: ignore[method-assign]
        r = invoke("llm.chat", {"messages": [{"role": "user", "content": "hi"}]}, c)
        assert isinstance(r, ToolError) and r.details["reason_code"] == "credential_host_not_allowed"
        assert srv.requests == []


# --- 2. the policy decides on what the tool will send ----------------------------------------------


def test_the_policy_judges_the_url_the_tool_sends(caller_module: bytes, tmp_path: Path) -> None:
    with Loopback({"/.*": lambda r: json_reply({"path": r.path})}) as srv:
        pol = HEAD + (f'[tools."http.fetch"]\nhosts = ["{srv.netloc}"]\nallow_private = ["127.0.0.1"]\n'
                      f'[tools."http.fetch".args.url]\npattern = "^http://127\\\\.0\\\\.0\\\\.1:{srv.port}/public/"\n'
                      'forbid_pattern = "admin"\n')
        urls = ["/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2E/%2e%2e/etc", "/public/%61dmin",
                "/public/./a/../b", "/public/x/%2e/y"]
        with Host(tmp_path) as host:
            res = run(host, make(caller_module, pol), [{"tool": "http.fetch", "args": {"url": srv.base + u}}
                                                        for u in urls])
        assert res.status == "completed", res.error
        results = res.output["results"]
        assert [r["code"] for r in results] == ["denied"] * 4 + ["ok", "ok"], results
        assert {r["reason_code"] for r in results[:4]} == {"invalid_args"}
        # what was judged is what was sent: the canonical URL, byte for byte
        sent = [req.path for req in srv.requests]
        judged = [netguard.parse_url(canonical_args(BUILTINS["http.fetch"], {"url": srv.base + u})["url"]).path
                  for u in urls[4:]]
        assert sent == judged == ["/public/b", "/public/x/y"]
        assert [r["value"]["json"]["path"] for r in results[4:]] == sent


def test_canonical_urls_are_a_fixed_point() -> None:
    for u in ["http://h/a/./b/../c?x=%2e", "http://H:80/%7e/%41/../", "https://h/a%2fb/%2E%2E/c", "http://h"]:
        t = netguard.parse_url(u)
        assert netguard.parse_url(t.url) == t  # the tool, parsing what was judged, gets the same target


# --- 3. numbers the engine can judge ----------------------------------------------------------------


def spend(extra: str = "", field: str = "amount") -> Any:
    return parse_policy('[agent]\nname = "n"\n[tools."erp.pay"]\nhandler = "m:f"\n[[validators]]\n'
                        f'on = ["tool:erp.pay"]\nspending_limit = {{ field = "{field}", max = 1000 {extra}}}\n'
                        '[tools."t.x"]\nhandler = "m:f"\n[tools."t.x".args.n]\nmax = 10\n')


def req(tool: str, args: Any, **kw: Any) -> ToolRequest:
    return ToolRequest(agent_id="a", tool=tool, args=args, call_seq=1, **kw)


def test_numbers_are_judged_never_crash_and_never_slip_through() -> None:
    p = spend()
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(NotJSONError):  # refused at parse: no JSON text carries them
            req("erp.pay", {"amount": bad})
    for args, why in [({"amount": -5000}, "negative"), ({"amount": 2 ** 64}, "64 bits"),
                      ({"amount": -(2 ** 200)}, "bits"), ({"order": {"amount": 10 ** 6}}, "absent but"),
                      ({"amount": "5"}, "must be a number"), ({"amount": 1001}, "exceeds")]:
        d = decide(p, req("erp.pay", args), Usage(), 0.0)
        assert isinstance(d, Deny) and d.code == "spending_limit" and why in d.reason, (args, d)
    d = decide(p, req("t.x", {"n": 10 ** 40}), Usage(), 0.0)
    assert isinstance(d, Deny) and "beyond 64 bits" in d.reason
    assert "bits" in str(explain(p, req("t.x", {"n": 10 ** 5000}), Usage(), 0.0))  # shown without a crash
    assert not isinstance(decide(spend(", allow_negative = true"), req("erp.pay", {"amount": -5}), Usage(), 0.0), Deny)
    assert not isinstance(decide(p, req("erp.pay", {"amount": 999.5}), Usage(), 0.0), Deny)


# --- 4. limits over runs, agents, policies and tenants ------------------------------------------------


def shared_policy(scope: str = "tenant", rate: str = "") -> str:
    return HEAD + ('[tools."kv.set"]\n' + rate + '\n[[validators]]\non = ["tool:kv.set"]\n'
                   f'spending_limit = {{ field = "value", max = 1000, scope = "{scope}" }}\n')


def test_a_tenant_spending_limit_is_a_total_across_agents_and_restarts(caller_module: bytes, tmp_path: Path) -> None:
    b = make(caller_module, shared_policy("tenant"))
    pay = [{"tool": "kv.set", "args": {"key": "k", "value": 400}}]
    with Host(tmp_path) as host:
        codes = [run(host, b, pay, on_behalf_of="acme").output["results"][0] for _ in range(3)]
        assert [c["code"] for c in codes] == ["ok", "ok", "denied"]
        assert "scope tenant acme" in codes[2]["value"]["message"] and "800 already" in codes[2]["value"]["message"]
        assert run(host, b, pay, on_behalf_of="globex").output["results"][0]["code"] == "ok"  # another tenant
    with Host(tmp_path) as host:  # a restart resets nothing
        assert run(host, b, pay, on_behalf_of="acme").output["results"][0]["code"] == "denied"
    out = subprocess.run([sys.executable, "-m", "host.cli", "policy", "explain", str(_write(tmp_path, b)),
                          "--tool", "kv.set", "--args", '{"key": "k", "value": 300}', "--tenant", "acme",
                          "--store", str(tmp_path), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    exp = json.loads(out.stdout)
    assert exp["decision"]["decision"] == "deny" and "scope tenant acme" in exp["decision"]["reason"], out.stderr


def _write(tmp_path: Path, b: bundle_mod.Bundle) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(b.policy_text)
    return p


def test_run_and_agent_scopes(caller_module: bytes, tmp_path: Path) -> None:
    pay = [{"tool": "kv.set", "args": {"key": "k", "value": 400}}] * 3
    with Host(tmp_path) as host:
        for scope in ("run", "agent"):
            res = run(host, make(caller_module, shared_policy(scope)), pay)
            assert [r["code"] for r in res.output["results"]] == ["ok", "ok", "denied"], scope
        res = run(host, make(caller_module, shared_policy("call")), pay)  # per call: each passes alone
        assert [r["code"] for r in res.output["results"]] == ["ok"] * 3
        with host.store.read() as txn:  # an ended agent's run and agent counters are deleted with its end
            assert txn.kv_keys(LIMITS_NAMESPACE) == []


def test_a_policy_wide_rate_counts_every_agent(caller_module: bytes, tmp_path: Path) -> None:
    pol = HEAD + '[tools."kv.get"]\nrate = "2/min"\nrate_scope = "policy"\n'
    b = make(caller_module, pol)
    with Host(tmp_path) as host:
        codes = [run(host, b, [{"tool": "kv.get", "args": {"key": "k"}}]).output["results"][0]["code"]
                 for _ in range(3)]
    assert codes == ["ok", "ok", "rate_limited"]


def test_a_shared_limit_holds_across_processes(caller_module: bytes, tmp_path: Path) -> None:
    """Four processes, each an agent paying 400 twice for one tenant, at once: the store
    lets through exactly two payments (800 of 1,000), whatever the interleaving."""
    bundle_file = tmp_path / "pay.torpor"
    bundle_file.write_bytes(bundle_mod.pack(caller_module, shared_policy("tenant")))
    calls = json.dumps({"calls": [{"tool": "kv.set", "args": {"key": "k", "value": 400}}] * 2})
    store = tmp_path / "store"
    Host(store).close()
    procs = [subprocess.Popen([sys.executable, "-m", "host.cli", "run", str(bundle_file), "--store", str(store),
                               "--input", calls, "--on-behalf-of", "acme", "--json"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [json.loads(p.communicate(timeout=180)[0]) for p in procs]
    codes = [r["code"] for o in outs for r in o["output"]["results"]]
    assert codes.count("ok") == 2 and codes.count("denied") == 6, codes


# --- 5. detectors normalise before they match -----------------------------------------------------------


def test_the_detection_table_holds() -> None:
    sys.path.insert(0, str(ROOT))
    from bench import detectors as table_mod

    t = table_mod.table()
    for variant, row in t.items():
        for det, r in row.items():
            if variant in table_mod.KNOWN_LIMITS:
                continue
            assert r["normalised"] == r["n"], (variant, det, r)
    assert sum(r["raw"] for row in t.values() for r in row.values()) < sum(
        r["normalised"] for row in t.values() for r in row.values())


def test_a_full_width_card_in_a_request_is_denied(caller_module: bytes, tmp_path: Path) -> None:
    with Loopback({"/.*": lambda r: json_reply({})}) as srv:
        pol = HEAD + (f'[tools."http.fetch"]\nhosts = ["{srv.netloc}"]\nallow_private = ["127.0.0.1"]\n'
                      'methods = ["POST"]\n[[validators]]\non = ["tool:http.fetch"]\ndetect = ["card", "email"]\n')
        card = "".join(chr(ord(c) + 0xFEE0) if c.isdigit() else c for c in "4111 1111 1111 1111")
        bodies = [f"pay with {card}", "pay with 4111 1111\n1111 1111", "mail ada\u200b@example.com"]
        with Host(tmp_path) as host:
            res = run(host, make(caller_module, pol), [
                {"tool": "http.fetch", "args": {"url": srv.base + "/pay", "method": "POST", "body": body}}
                for body in bodies])
        assert [r["reason_code"] for r in res.output["results"]] == ["pii_detected"] * 3
        assert srv.requests == []


# --- 6. tokens: the larger of the server's report and the host's count --------------------------------------


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 400, "completion_tokens": 300, "total_tokens": 0},  # a zero total beside its parts
    {"prompt_tokens": 0.5, "completion_tokens": 0.5, "total_tokens": 1.0},  # fractions
    {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},  # far lower than the text
    None,  # missing
])
def test_a_misreporting_model_server_is_charged_the_hosts_count(usage: Any) -> None:
    content = "word " * 500  # 2,500 bytes: 625 tokens by the host's count

    def reply(r: Request) -> Reply:
        body = chat_completion(content)
        body.pop("usage")
        if usage is not None:
            body["usage"] = usage
        return json_reply(body)

    with Loopback({"/v1/chat/completions": reply}) as srv:
        c = Ctx(policy(f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m"\n'), "llm.chat")
        r = invoke("llm.chat", {"messages": [{"role": "user", "content": "x" * 400}]}, c)
    assert not isinstance(r, ToolError), r
    assert c.tokens == [r["usage"]["total_tokens"]] and c.tokens[0] >= 625 + 100
    assert r["usage"]["estimated"] is True
    if usage is not None and usage["total_tokens"] == 0:
        assert c.tokens[0] >= 700  # at least the server's own parts


def test_a_token_budget_cannot_be_dodged_through_a_real_guest(caller_module: bytes, tmp_path: Path) -> None:
    def reply(r: Request) -> Reply:
        body = chat_completion("word " * 400)
        body["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return json_reply(body)

    with Loopback({"/v1/chat/completions": reply}) as srv:
        pol = HEAD.replace('wall_clock = "60s"\n', 'wall_clock = "60s"\ntokens = 300\n') + (
            f'[tools."llm.chat"]\nbase_url = "{srv.base}/v1"\nmodel = "m"\n')
        msg = {"tool": "llm.chat", "args": {"messages": [{"role": "user", "content": "hi"}]}}
        with Host(tmp_path) as host:
            res = run(host, make(caller_module, pol), [msg] * 3)
    assert res.status == "terminated" and res.error["code"] == "budget_exceeded", res
    assert res.tokens >= 500


# --- done when: a run of leaky tools, then every place a secret could land is scanned ------------------------


LEAK_POLICY = """
[tools."leak.erp"]
handler = "leak_tools:leak"
credentials = ["erp_token"]

[tools."leak.stash"]
handler = "leak_tools:stash"
credentials = ["crm_token"]

[tools."leak.other"]
handler = "leak_tools:other"
credentials = ["erp_token"]

[tools."http.fetch"]
hosts = ["{netloc}"]
allow_private = ["127.0.0.1"]
headers = {{ "X-Key" = "{{crm_token}}" }}
credentials = ["crm_token"]

[tools."llm.chat"]
base_url = "{base}/v1"
model = "m"
credentials = ["llm_key"]

{mcp}
"""


@pytest.mark.parametrize("scrub", [True, False], ids=["scrubbed", "control-unscrubbed"])
def test_no_secret_reaches_the_store_the_cli_or_the_logs(caller_module: bytes, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, scrub: bool) -> None:
    """Every tool tries to leak its secret through every path; nothing of any secret (no
    window of 8 characters, no hex or base64 form) is left in the store's files, the CLI's
    outputs or the logs. The control run switches the choke point off: the same scan then
    finds every secret in the journal, the CLI's outputs and the guest's result, which is
    what makes the first run's empty finding mean something."""
    if not scrub:
        from host.trust import scrub as scrub_mod

        monkeypatch.setattr(Scrubber, "json_bytes", lambda self, data: None)
        monkeypatch.setattr(scrub_mod._LogScrubber, "filter", lambda self, record: True)
    monkeypatch.delenv("TORPOR_VAULT_KEY", raising=False)
    monkeypatch.delenv("TORPOR_VAULT_KEY_FILE", raising=False)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    store = tmp_path / "store"
    values = {name: new_secret(name.split("_")[0]) for name in ("erp_token", "crm_token", "llm_key", "mcp_token")}
    vault = Vault(store)
    for name, value in values.items():
        vault.set(name, value)

    def llm_reply(r: Request) -> Reply:
        k = r.headers["authorization"][7:]
        if "fail" in r.body.decode():
            return json_reply({"error": {"message": "A" * (500 - len(k) + 1) + k}}, 401)
        return json_reply(chat_completion("the key is " + json.dumps(k).replace(k[:2], f"\\u{ord(k[0]):04x}" + k[1])))

    routes = _leaky_http() | {"/v1/chat/completions": llm_reply}
    with Loopback(routes) as srv:
        pol = HEAD + LEAK_POLICY.format(netloc=srv.netloc, base=srv.base, mcp=mcp_toml())
        b = make(caller_module, pol)
        http = [{"tool": "http.fetch", "args": {"url": srv.base + u, **x}} for u, x in [
            ("/escaped", {}), ("/escaped-text", {}), ("/start", {}), ("/binary", {}),
            ("/padded", {"max_bytes": 100 + len(values["crm_token"]) - 1, "truncate": True}),
            ("/padded", {"max_bytes": 104, "truncate": True})]]
        calls = ([{"tool": "leak.erp", "args": {"how": h}} for h in ("result", "raise", "tool_error", "cut")]
                 + [{"tool": "leak.stash", "args": {}}, {"tool": "leak.other", "args": {}}] + http
                 + [{"tool": "llm.chat", "args": {"messages": [{"role": "user", "content": c}]}} for c in ("hi", "fail")]
                 + [{"tool": "mcp.leaky.leak_env", "args": {"how": h}} for h in ("result", "escaped", "error", "rpc_error")])
        caplog.set_level(logging.DEBUG)
        try:
            # The policy names an MCP server's command: host code, so this bundle is trusted.
            with Host(store, warm_idle_s=0.0, broker=VaultBroker.for_store(store), trust_bundle_code=[b.digest],
                      tools_dirs=[Path(__file__).parent]) as host:  # leak_tools.py, an operator tool here
                res = anyio.run(lambda: host.run(b, {"calls": calls}))
        finally:
            mcp.shutdown()
        assert len({req.headers.get("x-key") for req in srv.requests if "x-key" in req.headers}) == 1  # sent, host side
    assert res.status == "completed", res.error
    results = res.output["results"]
    assert len(results) == len(calls)
    assert [r["code"] for r in results[:4]] == ["ok", "tool_failed", "denied", "ok"]
    assert all(r["code"] == "ok" for r in results[4:12]), results[4:12]
    assert (REDACTED in json.dumps(results)) is scrub

    def cli(*args: str) -> str:
        p = subprocess.run([sys.executable, "-m", "host.cli", *args, "--store", str(store)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "TORPOR_STORE": str(store)})
        assert p.returncode in (0, 1), (args, p.stderr)
        return p.stdout + p.stderr

    outputs = {
        "inspect": cli("inspect", res.agent_id), "inspect --json": cli("inspect", res.agent_id, "--json"),
        "audit show --payloads": cli("audit", "show", res.agent_id, "--payloads"),
        "audit show --payloads --json": cli("audit", "show", res.agent_id, "--payloads", "--json"),
        "audit export": cli("audit", "export"), "ps --json": cli("ps", "--json"),
    }
    places: dict[str, bytes | str] = {f"cli {k}": v for k, v in outputs.items()}
    places["result and guest logs"] = json.dumps([res.to_dict(), res.logs])
    places["host logs"] = caplog.text
    for f in store.rglob("*"):
        if f.is_file() and f.name not in ("vault.json", "vault.key"):  # the vault holds ciphertext, and the key
            places[f"file {f.relative_to(store)}"] = f.read_bytes()
    assert any(f.name == "data.mdb" for f in store.rglob("*"))
    found = {(where, name): hits for where, text in places.items() for name, v in values.items()
             if (hits := leaks(text, v))}
    if scrub:
        assert found == {}, found
        return
    for name in values:  # the control: every secret, in every place the guest's answers go
        for where in ("cli inspect --json", "cli audit show --payloads", "result and guest logs", "file db/data.mdb"):
            assert (where, name) in found, (where, name, sorted(found))


def test_secrets_set_binds_hosts_from_the_cli(tmp_path: Path) -> None:
    env = {**__import__("os").environ, "TORPOR_VAULT_KEY": ""}
    env.pop("TORPOR_VAULT_KEY")

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "host.cli", "secrets", *args, "--store", str(tmp_path)],
                              cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=120, env=env)

    p = cli("set", "crm", "--host", "API.Example.com", "--host", "127.0.0.1:8080", "--json", stdin="v-123456789\n")
    assert p.returncode == 0, p.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert listed[0]["hosts"] == ["api.example.com", "127.0.0.1:8080"]
    bad = cli("set", "crm", "--host", "http://x/", stdin="v\n")
    assert bad.returncode != 0 and "error[invalid_config]: secret host binding" in bad.stderr
    assert Vault(tmp_path).get_bound(["crm"])["crm"] == ("v-123456789", ("api.example.com", "127.0.0.1:8080"))


def test_the_scrub_benchmark_runs() -> None:
    sys.path.insert(0, str(ROOT))
    from bench import scrub as scrub_bench

    rows = scrub_bench.run(5)
    assert set(rows) == {f"{n}, {k} secret(s)" for n in ("small result", "64 KiB JSON", "256 KiB text") for k in (0, 1, 4)}
