"""The C SDK's helpers for the real tools: the arguments they send and how they hand
answers and errors back, against mock tools (the host side is tested elsewhere)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from guest_sdk_mock import E_DENIED, E_UNAVAILABLE, MockHost, ToolError, compile_guest

AGENT = r"""
#include "torpor.h"

static void err_into(torpor_jb *b, const char *key, int err) {
    const torpor_result *e = torpor_last_error();
    torpor_jb_key(b, key);
    torpor_jb_f(b, "{\"err\": %d, \"code\": %s, \"retryable\": %b}", err, e ? e->code_name : NULL,
                e ? e->retryable : 0);
}

int torpor_main(void) {
    torpor_jb b = TORPOR_JB_INIT;
    int err;
    torpor_jb_obj(&b);

    torpor_kv_set_ns("team", "k", "{\"x\": 1}");
    torpor_json *v = torpor_kv_get_ns("team", "k", &err);
    torpor_jb_key(&b, "kv_get_ns"); torpor_jb_value(&b, v);
    torpor_json_free(v);
    torpor_jb_key(&b, "kv_incr_ns"); torpor_jb_int(&b, torpor_kv_incr_ns("team", "n", 5, &err));
    torpor_jb_key(&b, "kv_incr_private"); torpor_jb_int(&b, torpor_kv_incr_ns(NULL, "n", 1, &err));
    torpor_kv_incr_ns("secret", "n", 1, &err);
    err_into(&b, "kv_denied", err);

    char *text = torpor_llm_ask("be brief", "hello", &err);
    torpor_jb_key(&b, "ask"); torpor_jb_str(&b, text);
    torpor_free(text);
    torpor_json *a = torpor_llm_chat_with("llm.cheap", "[{\"role\": \"user\", \"content\": \"hi\"}]",
                                          "{\"temperature\": 0, \"max_tokens\": 5}", &err);
    torpor_jb_key(&b, "chat_tokens"); torpor_jb_value(&b, torpor_json_path(a, "usage.total_tokens"));
    torpor_json_free(a);
    a = torpor_llm_chat("[]", "[1]", &err);
    err_into(&b, "chat_bad_options", err);
    a = torpor_llm_chat("[{\"role\": \"user\", \"content\": \"storm\"}]", NULL, &err);
    err_into(&b, "chat_rate_limited", err);

    torpor_json *r = torpor_http_fetch("PUT", "https://api.example.com/x", "{\"X-A\": \"1\"}", "body", &err);
    torpor_jb_key(&b, "fetch_status"); torpor_jb_value(&b, torpor_json_get(r, "status"));
    torpor_json_free(r);
    r = torpor_http_fetch_with("http.other", NULL, "https://api.example.com/y", NULL, NULL, &err);
    torpor_jb_key(&b, "fetch_with"); torpor_jb_value(&b, torpor_json_get(r, "url"));
    torpor_json_free(r);
    int status = 0;
    torpor_json *j = torpor_http_get_json(NULL, "https://api.example.com/customers/1", &status, &err);
    torpor_jb_key(&b, "get_json"); torpor_jb_f(&b, "{\"value\": %v, \"status\": %d}", j, status);
    torpor_json_free(j);
    j = torpor_http_get_json(NULL, "https://api.example.com/text", &status, &err);
    err_into(&b, "get_json_not_json", err);
    j = torpor_http_get_json(NULL, "http://127.0.0.1/", &status, &err);
    err_into(&b, "get_json_denied", err);
    r = torpor_http_post_json("http.send", "https://api.example.com/tickets", "{\"a\": [1, 2]}", &err);
    torpor_jb_key(&b, "post_json"); torpor_jb_value(&b, torpor_json_get(r, "status"));
    torpor_json_free(r);

    torpor_json *m = torpor_mcp_call("crm", "lookup", "{\"id\": \"C-1\"}", &err);
    torpor_jb_key(&b, "mcp"); torpor_jb_value(&b, torpor_json_get(m, "structured"));
    torpor_json_free(m);
    m = torpor_mcp_call("crm", "crash", NULL, &err);
    err_into(&b, "mcp_crash", err);

    torpor_jb_end(&b);
    return torpor_output(torpor_jb_finish(&b));
}
"""


def test_sdk_helpers(tmp_path: Path) -> None:
    src = tmp_path / "agent.c"
    src.write_text(AGENT)
    wasm = compile_guest([src], tmp_path / "agent.wasm")
    calls: list[tuple[str, dict[str, Any]]] = []
    kv: dict[str, Any] = {}

    def rec(name: str, fn: Any) -> Any:
        def tool(args: dict[str, Any]) -> Any:
            calls.append((name, args))
            return fn(args)
        return tool

    def kv_incr(a: dict[str, Any]) -> Any:
        if a.get("namespace") == "secret":
            raise ToolError(E_DENIED, "namespace 'secret' is not granted", rule='tools."kv.incr".namespaces')
        k = (a.get("namespace"), a["key"])
        kv[str(k)] = kv.get(str(k), 0) + a["by"]
        return {"value": kv[str(k)]}

    def chat(a: dict[str, Any]) -> Any:
        if a["messages"][-1]["content"] == "storm":
            raise ToolError(-9, "the LLM server rate limited the call", retryable=True)
        return {"content": "hi!", "usage": {"total_tokens": 7}, "message": {"role": "assistant", "content": "hi!"}}

    def fetch(a: dict[str, Any]) -> Any:
        url = a["url"]
        if "127.0.0.1" in url:
            raise ToolError(E_DENIED, "127.0.0.1 is a loopback address", rule='tools."http.fetch".allow_private')
        if url.endswith("/text"):
            return {"status": 200, "body": "plain", "headers": {}}
        return {"status": 200, "url": url, "json": {"id": 1}, "headers": {}}

    def mcp_tool(a: dict[str, Any]) -> Any:
        return {"structured": {"id": a["id"]}, "text": "", "content": []}

    def crash(a: dict[str, Any]) -> Any:
        raise ToolError(E_UNAVAILABLE, "the MCP server exited during the call", retryable=True)

    tools = {
        "kv.get": rec("kv.get", lambda a: {"value": kv.get(str((a.get("namespace"), a["key"])))}),
        "kv.set": rec("kv.set", lambda a: kv.__setitem__(str((a.get("namespace"), a["key"])), a["value"]) or {}),
        "kv.incr": rec("kv.incr", kv_incr),
        "llm.chat": rec("llm.chat", chat),
        "llm.cheap": rec("llm.cheap", chat),
        "http.fetch": rec("http.fetch", fetch),
        "http.other": rec("http.other", fetch),
        "http.send": rec("http.send", lambda a: {"status": 201, "json": {"ok": True}}),
        "mcp.crm.lookup": rec("mcp.crm.lookup", mcp_tool),
        "mcp.crm.crash": rec("mcp.crm.crash", crash),
    }
    r = MockHost().run(wasm, "{}", tools=tools)
    assert r.status == "completed", (r.error_code, r.error_message, r.logs)
    o = r.output
    assert o["kv_get_ns"] == {"x": 1} and o["kv_incr_ns"] == 5 and o["kv_incr_private"] == 1
    assert o["kv_denied"] == {"err": -7, "code": "denied", "retryable": False}
    assert o["ask"] == "hi!" and o["chat_tokens"] == 7
    assert o["chat_bad_options"] == {"err": -5, "code": "invalid_args", "retryable": False}
    assert o["chat_rate_limited"] == {"err": -9, "code": "rate_limited", "retryable": True}
    assert o["fetch_status"] == 200 and o["fetch_with"] == "https://api.example.com/y"
    assert o["get_json"] == {"value": {"id": 1}, "status": 200}
    assert o["get_json_not_json"]["err"] == -6 and o["get_json_denied"]["code"] == "denied"
    assert o["post_json"] == 201 and o["mcp"] == {"id": "C-1"}
    assert o["mcp_crash"] == {"err": -11, "code": "unavailable", "retryable": True}

    sent = dict((name, args) for name, args in calls if name not in ("kv.get", "kv.set", "kv.incr"))
    assert calls[0] == ("kv.set", {"key": "k", "value": {"x": 1}, "namespace": "team"})
    assert ("kv.incr", {"key": "n", "by": 1}) in calls  # NULL namespace: the private call, unchanged
    assert sent["llm.cheap"] == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 5}
    assert next(a for n, a in calls if n == "llm.chat") == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}
    assert next(a for n, a in calls if n == "http.fetch") == {
        "url": "https://api.example.com/x", "method": "PUT", "headers": {"X-A": "1"}, "body": "body"}
    assert sent["http.other"] == {"url": "https://api.example.com/y", "method": "GET"}
    assert sent["http.send"] == {"url": "https://api.example.com/tickets", "method": "POST", "json": {"a": [1, 2]}}
    assert sent["mcp.crm.crash"] == {}
    assert json.dumps(o)  # the output is plain JSON
