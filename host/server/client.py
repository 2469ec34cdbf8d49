"""A small synchronous client of the ``/v1`` API, for ``torpor --server URL``.

One method per route the CLI uses, each answering with the very dict the route sends
(the runtime's query dicts, so the CLI prints them with its local code). Every request
goes through :meth:`Client.request`, and every answer that is not a success through
:func:`error_of`, the one parser of the server's errors: ``{"error": {"code",
"message"}}`` becomes the :class:`~host.errors.TorporError` subclass of that code, so a
command fails against a server exactly as against a store (same code, same exit).

Faults of the way there are typed too: nothing listening, an unknown host or a timeout is
:class:`~host.errors.ServerUnreachable`; an answer that is not the API's (a wrong URL, a
proxy's page) is :class:`~host.errors.BadServerAnswer`. A ``429`` is retried once after
its ``Retry-After`` when that is short, else reported with it.

Imports httpx, and nothing of the server's application: the CLI imports this module only
when a command talks to a server, so ``torpor --help`` and local commands never pay for it.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from host import errors
from host.errors import BadServerAnswer, ConfigError, RateLimited, ServerUnreachable, TorporError

#: The longest ``Retry-After`` the client sleeps through before its one retry; a longer
#: one is reported to the person (who may rather do something else meanwhile).
MAX_RETRY_AFTER_S = 10.0
#: How long one long poll asks the server to hold the request (the server caps it too).
POLL_S = 60.0
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0


@functools.cache
def _codes() -> dict[str, type[TorporError]]:
    """Every error class of :mod:`host.errors`, by its code."""
    found: dict[str, type[TorporError]] = {}
    pending: list[type[TorporError]] = [TorporError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == errors.__name__:
            found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_of(response: httpx.Response, where: str) -> TorporError:
    """The typed error a non-success answer stands for (``where``: the server's URL, for
    messages about answers that are not the API's)."""
    try:
        body = response.json()
        err = body["error"]
        code, message = err["code"], err["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        return BadServerAnswer(f"HTTP {response.status_code} from {where}{response.request.url.path} is not a Torpor "
                               "API answer (check the --server URL)")
    if code == RateLimited.code:
        retry = _retry_after(response)
        return RateLimited(f"{message} (retry after {retry:g}s)", retry_after=retry)
    if code == "not_found":  # no such route (not a missing agent or bundle: those have their own codes)
        message = f"{message}: {response.request.method} {response.request.url.path} (check the --server URL)"
    cls = _codes().get(code)
    if cls is None or cls is RateLimited:  # a code of another package (invalid_policy, store_full, ...)
        return TorporError(message, code=code)
    return cls(message)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _segment(value: str) -> str:
    """A path segment: an agent id or a name, escaped (a ``/`` in it must not become a route)."""
    return quote(value, safe="")


class Client:
    """The ``/v1`` API of one server, as one operator token (``None``: no token; the server
    answers ``401``). Use it as a context manager, or :meth:`close` it."""

    def __init__(self, url: str, token: str | None, *, sleep: Callable[[float], None] = time.sleep) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--server {url!r}: give the server's URL, e.g. http://127.0.0.1:8700")
        self.url = url.rstrip("/")
        self.token = token
        self._sleep = sleep
        headers = {"Accept": "application/json", "User-Agent": "torpor-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers,
                                  timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the one way out -------------------------------------------------------------------------
    def request(self, method: str, path: str, *, json_body: Any = None, content: bytes | None = None,
                params: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
                read_timeout: float = READ_TIMEOUT_S, retry_transport: bool = False) -> Any:
        """Send one request; its JSON answer, or the typed error it stands for.

        A ``429`` with a short ``Retry-After`` is sent again once (the gateway refused it
        before any route ran, so nothing happened). ``retry_transport``: a request that is
        safe to send twice (a read, or a run with its idempotency key) is also sent again
        once when the connection broke before an answer came."""
        send_headers = dict(headers or {})
        body: bytes | None = content
        if json_body is not None:
            body = json.dumps(json_body).encode()
            send_headers["Content-Type"] = "application/json"
        timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)
        for attempt in (1, 2):
            try:
                response = self._http.request(method, path, content=body, params=params, headers=send_headers,
                                              timeout=timeout)
            except httpx.TransportError as exc:
                if attempt == 1 and retry_transport and not isinstance(exc, httpx.ConnectError):
                    continue
                raise self._unreachable(exc) from None
            if response.status_code < 400:
                try:
                    return response.json()
                except ValueError:
                    raise BadServerAnswer(f"{self.url}{path} answered HTTP {response.status_code} without JSON "
                                          "(check the --server URL)") from None
            err = error_of(response, self.url)
            if attempt == 1 and isinstance(err, RateLimited) and err.retry_after <= MAX_RETRY_AFTER_S:
                self._sleep(max(err.retry_after, 0.05))
                continue
            if err.code == "unauthenticated" and not self.token:
                err = type(err)(f"{err} (no operator token: set $TORPOR_TOKEN or pass --token-file)")
            raise err
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _unreachable(self, exc: httpx.TransportError) -> ServerUnreachable:
        why = {httpx.ConnectError: "cannot connect", httpx.TimeoutException: "no answer in time"}
        what = next((text for cls, text in why.items() if isinstance(exc, cls)), "the connection failed")
        detail = str(exc).strip() or type(exc).__name__
        return ServerUnreachable(f"torpor server at {self.url}: {what} ({detail})")

    # -- runs and agents ---------------------------------------------------------------------------
    def start_run(self, agent: str, payload: Any, *, fuel: int | None = None, on_behalf_of: str | None = None,
                  wait: float | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """Start a run of ``agent`` (name, name@tag, sha256:digest); with ``wait``, answered once
        it stops moving or the wait ends. One key per invocation: a retried request (after
        a broken connection or a 429) finds the run the first one started."""
        body: dict[str, Any] = {"agent": agent, "input": payload}
        if fuel is not None:
            body["fuel"] = fuel
        if on_behalf_of is not None:
            body["on_behalf_of"] = on_behalf_of
        if wait is not None:
            body["wait"] = wait
        key = idempotency_key or uuid.uuid4().hex
        answer: dict[str, Any] = self.request("POST", "/v1/runs", json_body=body, headers={"Idempotency-Key": key},
                                              read_timeout=READ_TIMEOUT_S + (wait or 0), retry_transport=True)
        return answer

    def wait(self, agent_id: str, timeout: float = POLL_S) -> dict[str, Any]:
        """The agent once it stops moving (running, suspended, approved), or after ``timeout``."""
        answer: dict[str, Any] = self.request("GET", f"/v1/agents/{_segment(agent_id)}/wait",
                                              params={"timeout": timeout}, read_timeout=READ_TIMEOUT_S + timeout,
                                              retry_transport=True)
        return answer

    def agents(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.request("GET", "/v1/agents", retry_transport=True)["agents"]
        return answer

    def agent(self, agent_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/v1/agents/{_segment(agent_id)}", retry_transport=True)
        return answer

    def inspect(self, agent_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/v1/agents/{_segment(agent_id)}/inspect",
                                              retry_transport=True)
        return answer

    def resume(self, agent_id: str) -> dict[str, Any]:
        """Ask the server to resume the agent (it runs in the background); the agent as it is then."""
        answer: dict[str, Any] = self.request("POST", f"/v1/agents/{_segment(agent_id)}/resume")
        return answer

    def fork(self, agent_id: str, checkpoint: int) -> dict[str, Any]:
        """A new agent from checkpoint ``checkpoint`` of ``agent_id``: ``{"agent_id", "parent", "checkpoint"}``."""
        answer: dict[str, Any] = self.request("POST", f"/v1/agents/{_segment(agent_id)}/fork",
                                              json_body={"checkpoint": checkpoint})
        return answer

    def logs(self, agent_id: str, *, after: int = -1, limit: int | None = None,
             wait: float | None = None) -> dict[str, Any]:
        """The agent's kept log lines after line ``after``; with ``wait``, a long poll for the next."""
        params: dict[str, Any] = {"after": after}
        if limit is not None:
            params["limit"] = limit
        if wait:
            params["wait"] = wait
        answer: dict[str, Any] = self.request("GET", f"/v1/agents/{_segment(agent_id)}/logs", params=params,
                                              read_timeout=READ_TIMEOUT_S + (wait or 0), retry_transport=True)
        return answer

    # -- approvals -----------------------------------------------------------------------------------
    def approvals(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.request("GET", "/v1/approvals", retry_transport=True)["approvals"]
        return answer

    def approve(self, agent_id: str, *, note: str | None = None, answer: Any = None) -> dict[str, Any]:
        """Record the approval (or the answer to the agent's question); the server resumes the
        agent in the background."""
        body: dict[str, Any] = {} if note is None else {"note": note}
        if answer is not None:
            body["answer"] = answer
        got: dict[str, Any] = self.request("POST", f"/v1/agents/{_segment(agent_id)}/approve", json_body=body)
        return got

    def deny(self, agent_id: str, *, reason: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("POST", f"/v1/agents/{_segment(agent_id)}/deny",
                                              json_body={"reason": reason})
        return answer

    def resolve(self, agent_id: str, *, retry: bool = False, result: Any = None,
                fail: str | None = None) -> dict[str, Any]:
        """Settle an in_doubt agent (exactly one of the three); the server resumes it unless failed."""
        body: dict[str, Any] = {"retry": True} if retry else {"fail": fail} if fail is not None else {"result": result}
        answer: dict[str, Any] = self.request("POST", f"/v1/agents/{_segment(agent_id)}/resolve", json_body=body)
        return answer

    # -- audit ---------------------------------------------------------------------------------------
    def audit_records(self, agent_id: str) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.request("GET", f"/v1/agents/{_segment(agent_id)}/audit",
                                                    retry_transport=True)["records"]
        return answer

    def verify_audit(self, agent_id: str | None = None) -> dict[str, Any]:
        """The audit check's report: one agent's chain or a host chain, or (None) the whole store's."""
        answer: dict[str, Any] = self.request("GET", "/v1/audit/verify",
                                              params={"agent": agent_id} if agent_id else None, retry_transport=True)
        return answer

    # -- the registry ------------------------------------------------------------------------------
    def push(self, raw: bytes, *, name: str | None = None, tag: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in (("name", name), ("tag", tag)) if v is not None}
        answer: dict[str, Any] = self.request("POST", "/v1/bundles", content=raw, params=params,
                                              headers={"Content-Type": "application/octet-stream"})
        return answer

    def bundles(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", "/v1/bundles", retry_transport=True)
        return answer

    def bundle(self, name: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", f"/v1/bundles/{_segment(name)}", retry_transport=True)
        return answer

    def tag(self, name: str, tag: str, digest: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("PUT", f"/v1/bundles/{_segment(name)}/tags/{_segment(tag)}",
                                              json_body={"digest": digest})
        return answer

    def diff(self, a: str, b: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.request("GET", "/v1/bundles/diff", params={"a": a, "b": b},
                                              retry_transport=True)
        return answer
