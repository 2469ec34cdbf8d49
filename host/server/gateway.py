"""The gateway: who is asking, for which tenant, how often, with how large a body.

Every HTTP request but ``/healthz`` and ``/readyz`` passes :class:`GatewayMiddleware`
(a plain ASGI middleware, so streamed responses are not buffered) before any route:

1. a draining server refuses new work (``503 shutting_down``);
2. ``Authorization: Bearer <secret>`` must name an active operator token
   (:mod:`host.trust.operator_tokens`: unknown, revoked, expired are ``401``), except on
   the paths that authenticate themselves (``own_auth``: the console's pages, whose
   session cookie :mod:`host.server.console` checks, with the same tokens and its own
   per-token rate limit);
3. the token's and its tenant's token buckets must have room (``429`` + ``Retry-After``);
   requests without a valid token have their own bucket per client address, so that a
   flood of bad keys cannot flood the audit either;
4. the body is capped: a ``Content-Length`` over the cap is refused before it is read,
   and a body that streams past it is cut off where it crosses (``413``).

The :class:`Principal` then sits on ``request.state.principal``; a route calls
:func:`require` with the scope it needs (``403``). Each refusal is written to the host's
own audit chain ``host.gateway`` (``torpor audit show host.gateway``) by
:class:`RefusalAudit`, batched, through :func:`host.trust.audit.append_host_events`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
from starlette.requests import Request

from host.errors import (
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    RateLimited,
    ShuttingDown,
    TorporError,
    Unauthenticated,
)
from host.server.config import ServerConfig
from host.server.responses import code_of, error_response
from host.trust import audit, operator_tokens
from snapshots.store import AgentStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths answered without a token (a load balancer's probes).
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: The host-level audit chain of refused requests.
CHAIN = audit.host_chain("gateway")
#: Refusals held for the next flush at most; beyond it they are counted, not listed.
MAX_PENDING_REFUSALS = 10_000

_log = logging.getLogger("torpor.server")


@dataclass(frozen=True)
class Principal:
    """The operator token a request came with: its id, tenant and scopes."""

    token_id: str
    tenant: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """Whether the token grants ``scope``; ``admin`` grants every scope."""
        return "admin" in self.scopes or scope in self.scopes


def principal(request: Request) -> Principal:
    """The principal the gateway authenticated for this request."""
    p = getattr(request.state, "principal", None)
    if not isinstance(p, Principal):  # a route reached without the gateway: a wiring bug, refused
        raise Unauthenticated("no operator token was checked for this request")
    return p


def require(request: Request, scope: str) -> Principal:
    """The request's principal if its token grants ``scope``; else :class:`Forbidden` (403), audited."""
    p = principal(request)
    if not p.allows(scope):
        exc = Forbidden(f"operator token {p.token_id} lacks the scope {scope!r}")
        refusals: RefusalAudit | None = getattr(request.app.state, "refusals", None)
        if refusals is not None:
            refusals.note(request.scope, exc, p, needs=scope)
        raise exc
    return p


class TokenBuckets:
    """A token bucket per key: ``rate`` per second refilled, ``burst`` at most.

    Keys are operator token ids, tenants and client addresses; the first two are as many
    as the operator created, the third is bounded by dropping full (idle) buckets once
    there are more than ``max_keys``.
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = float(rate)
        self.burst = float(max(1, burst))
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float | None = None) -> float | None:
        """Take one request's room: None if there was room, else the seconds until there is."""
        t = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(key, (self.burst, t))
        tokens = min(self.burst, tokens + (t - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, t)
            return (1.0 - tokens) / self.rate if self.rate > 0 else 3600.0
        self._buckets[key] = (tokens - 1.0, t)
        if len(self._buckets) > self.max_keys:
            self._forget_full(t)
        return None

    def give_back(self, key: str) -> None:
        """Return a request's room taken by :meth:`take` (the request was refused after all)."""
        tokens, at = self._buckets.get(key, (self.burst, time.monotonic()))
        self._buckets[key] = (min(self.burst, tokens + 1.0), at)

    def _forget_full(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]


class RefusalAudit:
    """Writes refused requests to the ``host.gateway`` audit chain, a batch per interval.

    Why batched: a refusal is cheap to send and a commit is not; one commit per interval
    bounds what a flood of refused requests costs the store. What waits in memory is
    bounded too (``MAX_PENDING_REFUSALS``); beyond it the refusals are counted and the
    count is written as one ``gateway.refusals_dropped`` record.
    """

    def __init__(self, store: AgentStore, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._dropped = 0
        #: Refusals by error code over the server's life, dropped ones included (``/metrics``).
        self.counts: dict[str, int] = {}
        self._wake = anyio.Event()

    def note(self, scope: Scope, exc: TorporError, who: Principal | None = None, **extra: Any) -> None:
        """Queue one refused request for the audit (what, who, from where; never a secret)."""
        code = code_of(exc)
        self.counts[code] = self.counts.get(code, 0) + 1
        if len(self._pending) >= MAX_PENDING_REFUSALS:
            self._dropped += 1
            return
        client = scope.get("client")
        data: dict[str, Any] = {
            "code": code, "method": str(scope.get("method", ""))[:16],
            "path": str(scope.get("path", ""))[:256], "peer": client[0] if client else None,
            "message": str(exc)[:512],
        }
        if who is not None:
            data.update(token_id=who.token_id, tenant=who.tenant)
        data.update(extra)
        self._pending.append(("gateway.refused", data))

    async def run(self) -> None:
        """Flush every ``interval_s`` until cancelled (the lifespan flushes once more at the end)."""
        while True:
            await anyio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        events, self._pending = self._pending, []
        if self._dropped:
            events.append(("gateway.refusals_dropped", {"count": self._dropped}))
            self._dropped = 0
        if not events:
            return

        def write(txn: Any) -> None:
            audit.append_host_events(txn, CHAIN, events)

        try:
            await anyio.to_thread.run_sync(self.store.transact, write)
        except Exception:  # the store refused (full, unavailable): the requests were refused anyway
            _log.exception("could not audit %d refused requests", len(events))


class GatewayMiddleware:
    """Authentication, rate limits and body caps in front of every route (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, store: AgentStore, config: ServerConfig, refusals: RefusalAudit,
                 draining: Callable[[], bool], own_auth: Callable[[str], bool] | None = None) -> None:
        self.app = app
        #: Paths that authenticate themselves (the console's pages, by a session cookie): the
        #: gateway still refuses them while draining and caps their bodies, but asks no bearer token.
        self.own_auth = own_auth
        self.store = store
        self.config = config
        self.refusals = refusals
        self.draining = draining
        self.per_token = TokenBuckets(config.token_rate, config.token_burst)
        self.per_tenant = TokenBuckets(config.tenant_rate, config.tenant_burst)
        self.anonymous = TokenBuckets(config.anonymous_rate, config.anonymous_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        who: Principal | None = None
        try:
            if self.draining():
                raise ShuttingDown("the server is shutting down and takes no new work; retry against a running one")
            if self.own_auth is None or not self.own_auth(scope["path"]):
                who = self._authenticate(scope)
                self._limit(who)
            cap = self._cap(scope)
            length = _content_length(scope)
            if length is not None and length > cap:
                raise PayloadTooLarge(f"the request body is {length} bytes; this server takes at most {cap}")
        except TorporError as exc:
            if not isinstance(exc, ShuttingDown):
                self.refusals.note(scope, exc, who)
            await error_response(exc)(scope, receive, send)
            return
        if who is not None:
            scope.setdefault("state", {})["principal"] = who
        await self.app(scope, self._capped(scope, receive, cap, who), send)

    def _authenticate(self, scope: Scope) -> Principal:
        header = _header(scope, b"authorization")
        if header is None:
            self._limit_anonymous(scope)
            raise Unauthenticated("this server needs an operator token: Authorization: Bearer <token> "
                                  "(`torpor tokens create`)")
        kind, _, secret = header.partition(" ")
        if kind.lower() != "bearer" or not secret.strip():
            self._limit_anonymous(scope)
            raise Unauthenticated("the Authorization header must be 'Bearer <operator token>'")
        try:
            token = operator_tokens.authenticate(self.store, secret.strip())
        except Unauthenticated:
            self._limit_anonymous(scope)
            raise
        return Principal(token.token_id, token.tenant, frozenset(token.scopes))

    def _limit_anonymous(self, scope: Scope) -> None:
        client = scope.get("client")
        wait = self.anonymous.take(client[0] if client else "-")
        if wait is not None:
            raise RateLimited("too many requests without a valid operator token from this address", retry_after=wait)

    def _limit(self, who: Principal) -> None:
        wait = self.per_token.take(who.token_id)
        if wait is not None:
            raise RateLimited(f"operator token {who.token_id} is over its rate limit "
                              f"({self.config.token_rate:g}/s, burst {self.config.token_burst})", retry_after=wait)
        wait = self.per_tenant.take(who.tenant)
        if wait is not None:
            self.per_token.give_back(who.token_id)  # the token did not get its request served
            raise RateLimited(f"tenant {who.tenant} is over its rate limit "
                              f"({self.config.tenant_rate:g}/s, burst {self.config.tenant_burst})", retry_after=wait)

    def _cap(self, scope: Scope) -> int:
        # Only a push carries a bundle; a tag move is a small JSON body like any other.
        if scope["path"] == "/v1/bundles" and scope.get("method") == "POST":
            return self.config.max_bundle_bytes
        return self.config.max_body_bytes

    def _capped(self, scope: Scope, receive: Receive, cap: int, who: Principal | None) -> Receive:
        """``receive`` that refuses a body streaming past ``cap`` (no Content-Length, or a false one)."""
        seen = [0]

        async def capped() -> Message:
            message = await receive()
            if message.get("type") == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > cap:
                    exc = PayloadTooLarge(f"the request body is over {cap} bytes, the most this server takes")
                    self.refusals.note(scope, exc, who)
                    raise exc
            return message

        return capped


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or ():
        if k.lower() == name:
            return bytes(v).decode("latin-1")
    return None


def _content_length(scope: Scope) -> int | None:
    raw = _header(scope, b"content-length")
    if raw is None:
        return None
    try:
        n = int(raw.strip())
    except ValueError:
        raise InvalidInput("the Content-Length header is not a number") from None
    return n if n >= 0 else None
