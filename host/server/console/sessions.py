"""The console's logins: a session per browser, kept in an HTTP-only, SameSite cookie.

An operator logs in with an operator token (the very tokens of the API). The cookie holds
only a random session id; the server keeps, per session, the SHA-256 of the token's secret
(never the secret), the token checked again at every request through
:func:`host.trust.operator_tokens.authenticate_hash` (a revoked or expired token ends the
session at its next request, as the gateway refuses it), and a CSRF token that every form
posts back. A session ends after :attr:`Sessions.idle_s` without a request or
:attr:`Sessions.max_s` after the login, at logout, or when the server restarts (they are
in memory only: a restart asks everyone to log in again, and nothing of them is on disk).

Why not the secret itself in the cookie: a cookie travels with every request and sits in
the browser's profile; a session id is worthless once the session ended.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from host.errors import Unauthenticated
from host.server.gateway import Principal
from host.trust import operator_tokens
from snapshots.store import AgentStore

#: The cookie's name; ``__Host-`` would need Secure, which plain-HTTP loopback cannot give.
COOKIE = "torpor_session"
#: The login form's own CSRF cookie (before there is a session), double-submitted.
LOGIN_COOKIE = "torpor_login"
#: Sessions held at most (the oldest are dropped beyond it: a flood of logins stays bounded).
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One browser's login: which token, its CSRF token, when it began and was last used."""

    sid: str
    key: str  # the SHA-256 of the operator token's secret
    csrf: str
    started: float
    seen: float
    principal: Principal = field(compare=False)


class Sessions:
    """The logins of one console (in memory; see the module docstring)."""

    def __init__(self, store: AgentStore, *, idle_s: float = 3600.0, max_s: float = 12 * 3600.0) -> None:
        self.store = store
        self.idle_s = idle_s
        self.max_s = max_s
        self._by_id: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def login(self, secret: str, now: float | None = None) -> Session:
        """A new session for the operator token ``secret``; :class:`Unauthenticated` if it is not
        an active token."""
        token = operator_tokens.authenticate(self.store, secret.strip())
        t = time.time() if now is None else now
        s = Session(sid=secrets.token_urlsafe(32), key=operator_tokens.secret_hash(secret.strip()),
                    csrf=secrets.token_urlsafe(32), started=t, seen=t,
                    principal=Principal(token.token_id, token.tenant, frozenset(token.scopes)))
        with self._lock:
            self._by_id[s.sid] = s
            while len(self._by_id) > MAX_SESSIONS:
                self._by_id.popitem(last=False)
        return s

    def get(self, sid: str | None, now: float | None = None) -> Session:
        """The live session ``sid`` names, its token checked again; :class:`Unauthenticated`
        saying why not (no session, expired, the token revoked or expired)."""
        if not sid:
            raise Unauthenticated("log in with an operator token")
        t = time.time() if now is None else now
        with self._lock:
            s = self._by_id.get(sid)
            if s is None:
                raise Unauthenticated("the session has ended: log in again")
            if t - s.seen > self.idle_s or t - s.started > self.max_s:
                del self._by_id[sid]
                raise Unauthenticated("the session expired: log in again")
        try:
            token = operator_tokens.authenticate_hash(self.store, s.key, now=t)
        except Unauthenticated:
            self.end(sid)
            raise
        s.seen = t
        s.principal = Principal(token.token_id, token.tenant, frozenset(token.scopes))  # scopes as stored now
        return s

    def end(self, sid: str | None) -> None:
        """Log out: the session id is worthless from now on."""
        if sid:
            with self._lock:
                self._by_id.pop(sid, None)

    def __len__(self) -> int:
        return len(self._by_id)


def same(a: str | None, b: str | None) -> bool:
    """Whether two CSRF tokens match (in constant time; a missing one never does)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
