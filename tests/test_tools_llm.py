"""llm.chat against OpenAI- and Anthropic-shaped servers on 127.0.0.1: the request the
grant shapes, token accounting, bounded retries, and every kind of bad answer."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from loopback import Loopback, Reply, Request, chat_completion, free_port, json_reply
from tools_helpers import Ctx, answer, invoke, policy

from host.tools import llm
from host.tools.registry import ToolError

MSG = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(llm, "BACKOFF_MAX_S", 0.02)


def grant(srv: Loopback, extra: str = "", name: str = "llm.chat") -> str:
    return f'[tools."{name}"]\nbase_url = "{srv.base}/v1"\nmodel = "m-small"\n{extra}'


def ctx(srv: Loopback, extra: str = "", *, secrets: dict[str, str] | None = None, name: str = "llm.chat") -> Ctx:
    return Ctx(policy(grant(srv, extra, name)), name, secrets=secrets or {})


def route(fn: Any) -> dict[str, Any]:
    return {"/v1/chat/completions": fn}


def test_request_shape_tokens_and_credential() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("hi there", prompt_tokens=12, completion_tokens=30)))) as srv:
        c = ctx(srv, 'credentials = ["openai_key"]\nmax_tokens = 64', secrets={"openai_key": "sk-test-0123456789"})
        r = invoke("llm.chat", {**MSG, "max_tokens": 1000, "temperature": 0.2, "response_format": {"type": "json_object"}}, c)
        assert not isinstance(r, ToolError), r
        assert r["content"] == "hi there" and r["message"] == {"role": "assistant", "content": "hi there"}
        assert r["usage"] == {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
        assert r["finish_reason"] == "stop" and r["attempts"] == 1
        assert c.tokens == [42]
        req = srv.requests[0]
        assert req.headers["authorization"] == "Bearer sk-test-0123456789"
        body = req.json
        assert body["model"] == "m-small" and body["max_tokens"] == 64  # capped by the grant
        assert body["messages"] == MSG["messages"] and body["temperature"] == 0.2 and body["stream"] is False
        assert "sk-test" not in str(r)


def test_local_server_needs_no_credential_and_model_choice_is_granted() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("ok", model=r.json["model"])))) as srv:
        c = ctx(srv, 'models = ["m-large"]')
        r = invoke("llm.chat", {**MSG, "model": "m-large"}, c)
        assert r["model"] == "m-large" and "authorization" not in srv.requests[0].headers
        r = invoke("llm.chat", {**MSG, "model": "gpt-7"}, c)
        assert isinstance(r, ToolError) and r.code == "denied"
        assert r.details["rule"] == 'tools."llm.chat".model' and r.details["reason_code"] == "model_not_allowed"
        assert len(srv.requests) == 1  # the refused call never left the host


def test_arguments_are_strict() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("ok")))) as srv:
        c = ctx(srv)
        for bad in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]}, {**MSG, "temprature": 1},
                    {**MSG, "max_tokens": "10"}):
            r = invoke("llm.chat", bad, c)
            assert isinstance(r, ToolError) and r.code == "invalid_args", bad
        assert srv.requests == []


def test_429_storm_is_bounded_then_rate_limited() -> None:
    with Loopback(route(lambda r: json_reply({"error": {"message": "slow down"}}, 429, **{"Retry-After": "0"}))) as srv:
        c = ctx(srv, "retries = 3")
        r = invoke("llm.chat", MSG, c)
        assert isinstance(r, ToolError) and r.code == "rate_limited" and r.retryable
        assert r.details["attempts"] == 4 and len(srv.requests) == 4
        assert c.tokens == []


def test_retry_after_beyond_the_cap_gives_up_at_once() -> None:
    with Loopback(route(lambda r: json_reply({}, 429, **{"Retry-After": "3600"}))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv))
        assert isinstance(r, ToolError) and r.code == "rate_limited"
        assert r.details["retry_after_s"] == 3600 and len(srv.requests) == 1


def test_5xx_then_success_is_retried_and_counted_once() -> None:
    answers = iter([Reply(503, b"busy"), Reply(500, b"oops"), json_reply(chat_completion("third time"))])
    with Loopback(route(lambda r: next(answers))) as srv:
        c = ctx(srv)
        r = invoke("llm.chat", MSG, c)
        assert r["content"] == "third time" and r["attempts"] == 3 and c.tokens == [15]


def test_5xx_storm_is_unavailable() -> None:
    with Loopback(route(lambda r: Reply(502, b"bad gateway"))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, "retries = 1"))
        assert isinstance(r, ToolError) and r.code == "unavailable" and r.retryable and r.details["status"] == 502
        assert len(srv.requests) == 2


def test_a_hanging_server_times_out_without_retries() -> None:
    with Loopback(route(lambda r: Reply(200, b"{}", hang=3))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, 'timeout = "300ms"'))
        assert isinstance(r, ToolError) and r.code == "timeout" and r.retryable
        assert len(srv.requests) == 1  # a timeout, not the 3 s answer, and not retried


def test_oversized_answer_is_refused_at_the_cap() -> None:
    big = chat_completion("x" * 50_000)
    with Loopback(route(lambda r: json_reply(big))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, 'max_response_bytes = "4KiB"'))
        assert isinstance(r, ToolError) and r.code == "result_too_large" and r.details["limit"] == 4096


def test_gzip_bomb_stops_at_the_cap() -> None:
    bomb = gzip.compress(b"[" + b"0," * 5_000_000 + b"0]")
    with Loopback(route(lambda r: Reply(200, bomb, {"Content-Type": "application/json", "Content-Encoding": "gzip"}))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, 'max_response_bytes = "64KiB"'))
        assert isinstance(r, ToolError) and r.code == "result_too_large"


def test_truncated_answer_is_retried_then_unavailable() -> None:
    with Loopback(route(lambda r: Reply(200, b'{"choices": [', {"Content-Type": "application/json"}, content_length=500))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, "retries = 1"))
        assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "bad_response"
        assert len(srv.requests) == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>not json</html>", "bad_response"),
        (b'{"choices": [{"message": {"role": "assistant", "content": 7}}]}', "bad_response"),
        (b'{"choices": []}', "bad_response"),
        (b'[1, 2]', "bad_response"),
        (b'{"choices": [{"message": {"content": NaN}}]}', "bad_response"),
    ],
)
def test_malformed_answers_are_structured_errors(body: bytes, reason: str) -> None:
    with Loopback(route(lambda r: Reply(200, body, {"Content-Type": "application/json"}))) as srv:
        c = ctx(srv)
        r = invoke("llm.chat", MSG, c)
        assert isinstance(r, ToolError) and r.code == "tool_failed" and r.details["reason_code"] == reason
        assert c.tokens == []


def test_malformed_answer_with_usage_still_counts_its_tokens() -> None:
    body = {"usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150}, "choices": "nope"}
    with Loopback(route(lambda r: json_reply(body))) as srv:
        c = ctx(srv)
        r = invoke("llm.chat", MSG, c)
        assert isinstance(r, ToolError) and r.code == "tool_failed" and r.details["tokens"] == 150
        assert c.tokens == [150]


def test_missing_usage_is_estimated_not_free() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("a" * 400, usage=False)))) as srv:
        c = ctx(srv)
        r = invoke("llm.chat", MSG, c)
        assert r["usage"]["estimated"] is True and r["usage"]["total_tokens"] >= 100
        assert c.tokens == [r["usage"]["total_tokens"]]


def test_upstream_errors_are_scrubbed_of_the_key() -> None:
    key = "sk-live-SECRET-abcdef0123"

    def reject(r: Request) -> Reply:
        return json_reply({"error": {"message": f"Incorrect API key provided: {r.headers['authorization'][7:]}"}}, 401)

    with Loopback(route(reject)) as srv:
        c = ctx(srv, 'credentials = ["k"]', secrets={"k": key})
        status, r = answer("llm.chat", MSG, c)  # through the pipeline's choke point
        assert status != 0 and r["code"] == "tool_failed" and r["status"] == 401
        assert key not in str(r) and "[redacted]" in str(r)
        assert len(srv.requests) == 1  # a 4xx is not retried


def test_connection_refused_is_unavailable() -> None:
    port = free_port()
    p = policy(f'[tools."llm.chat"]\nbase_url = "http://127.0.0.1:{port}/v1"\nmodel = "m"\nretries = 1')
    r = invoke("llm.chat", MSG, Ctx(p, "llm.chat"))
    assert isinstance(r, ToolError) and r.code == "unavailable" and r.details["reason_code"] == "connect_failed"


def test_missing_credential_is_unavailable_not_a_crash() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("x")))) as srv:
        r = invoke("llm.chat", MSG, ctx(srv, 'credentials = ["k"]'))
        assert isinstance(r, ToolError) and r.code == "unavailable" and srv.requests == []


def test_a_second_llm_grant_is_its_own_tool() -> None:
    with Loopback(route(lambda r: json_reply(chat_completion("cheap")))) as srv:
        c = ctx(srv, "max_tokens = 5", name="llm.cheap")
        r = invoke("llm.cheap", MSG, c)
        assert r["content"] == "cheap" and srv.requests[0].json["max_tokens"] == 5


def test_anthropic_adapter() -> None:
    def messages(r: Request) -> Reply:
        return json_reply({
            "id": "msg_1", "type": "message", "role": "assistant", "model": r.json["model"],
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 20, "output_tokens": 7, "cache_read_input_tokens": 3},
        })

    with Loopback({"/v1/messages": messages}) as srv:
        c = ctx(srv, 'provider = "anthropic"\ncredentials = ["ak"]\nmax_tokens = 100', secrets={"ak": "ant-key-123456"})
        r = invoke("llm.chat", {**MSG, "stop": "END"}, c)
        assert r["content"] == "Hello world" and r["finish_reason"] == "stop"
        assert r["usage"] == {"prompt_tokens": 23, "completion_tokens": 7, "total_tokens": 30} and c.tokens == [30]
        req = srv.requests[0]
        assert req.headers["x-api-key"] == "ant-key-123456" and req.headers["anthropic-version"]
        assert req.json == {"model": "m-small", "max_tokens": 100, "system": "be brief",
                            "messages": [{"role": "user", "content": "hello"}], "stop_sequences": ["END"]}


def test_retry_after_parsing() -> None:
    def resp(v: str) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": v})

    assert llm.retry_after(resp("7")) == 7
    assert llm.retry_after(resp("-3")) == 0
    assert llm.retry_after(resp("soon")) is None
    assert llm.retry_after(resp("Wed, 21 Oct 2015 07:28:10 GMT"), now=1445412480.0) == 10.0
    assert llm.retry_after(httpx.Response(429)) is None
