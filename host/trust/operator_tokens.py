"""Operator tokens: who may talk to a ``torpor serve`` gateway, for which tenant, with which scopes.

An operator token is a bearer secret printed once by ``torpor tokens create``. The store
keeps only the SHA-256 of the secret (bucket ``operator_tokens``, keyed by that hash), with
the token's id, name, tenant, scopes and its created, expiry and revocation times: a copy of
the store does not hand out working keys, and a lookup is one read by the hash of what the
client sent. Revoking and expiring are checked at every request (the stored entry is read
each time; only its decoding is remembered, keyed by the very bytes read, so a revocation
is new bytes and is seen at once), so a revoked token stops working at the next request,
also when another process revoked it.

These are not agent identities (:mod:`host.trust.identity`): those are the tokens an agent
carries for its tools; these are the keys people and scripts hold to the server.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from host.errors import ConfigError, TorporError, Unauthenticated
from snapshots.store import AgentStore

BUCKET = "operator_tokens"
#: What the gateway knows how to grant; ``admin`` allows every one of them.
SCOPES = ("runs:write", "runs:read", "approvals:write", "registry:write", "admin")
#: Every secret starts so, to be found by secret scanners and told apart from agent tokens.
SECRET_PREFIX = "tpo_"
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NAME_MAX = 128
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenNotFound(TorporError):
    """No operator token with that id."""

    code = "token_not_found"


@dataclass(frozen=True)
class OperatorToken:
    """A stored token (never its secret)."""

    token_id: str
    name: str | None
    tenant: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"token_id": self.token_id, "name": self.name, "tenant": self.tenant, "scopes": list(self.scopes),
                "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at}

    def state(self, now: float) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    @classmethod
    def of(cls, d: dict[str, Any]) -> OperatorToken:
        return cls(token_id=str(d["token_id"]), name=d.get("name"), tenant=str(d["tenant"]),
                   scopes=tuple(str(s) for s in d.get("scopes") or ()), created_at=float(d["created_at"]),
                   expires_at=None if d.get("expires_at") is None else float(d["expires_at"]),
                   revoked_at=None if d.get("revoked_at") is None else float(d["revoked_at"]))


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def parse_expiry(text: str, *, now: float | None = None) -> float:
    """``30d``, ``12h``, ``15m``, ``90s``, ``2w``: the Unix time that far from now."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ConfigError(f"--expires {text!r} is not a duration: use e.g. 90s, 15m, 12h, 30d or 2w")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ConfigError("--expires must be a positive duration")
    return (time.time() if now is None else now) + seconds


def create(store: AgentStore, *, tenant: str, scopes: list[str] | tuple[str, ...], name: str | None = None,
           expires_at: float | None = None, now: float | None = None) -> tuple[str, OperatorToken]:
    """A new token: ``(secret, token)``. The secret is returned once and stored only hashed."""
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ConfigError(f"tenant {tenant!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not scopes:
        raise ConfigError(f"a token needs at least one --scope (of {', '.join(SCOPES)})")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ConfigError(f"unknown scope {unknown[0]!r}; the scopes are {', '.join(SCOPES)}")
    if name is not None and (len(name) > _NAME_MAX or not name.isprintable()):
        raise ConfigError(f"a token name is at most {_NAME_MAX} printable characters")
    t = time.time() if now is None else now
    if expires_at is not None and expires_at <= t:
        raise ConfigError("the token would expire before it is created")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = OperatorToken(token_id="tok_" + secrets.token_hex(8), name=name, tenant=tenant,
                          scopes=tuple(dict.fromkeys(scopes)), created_at=t, expires_at=expires_at, revoked_at=None)
    key = secret_hash(secret)

    def write(txn: Any) -> None:
        txn.put_blob(BUCKET, key, json.dumps(token.to_dict()).encode())

    store.transact(write)
    return secret, token


def tokens(store: AgentStore) -> list[OperatorToken]:
    """Every token, oldest first."""
    with store.read() as txn:
        found = [_decode(raw) for _, raw in txn.iter_blobs(BUCKET)]
    return sorted((t for t in found if t is not None), key=lambda t: (t.created_at, t.token_id))


def revoke(store: AgentStore, token_id: str, *, now: float | None = None) -> OperatorToken:
    """Mark the token revoked (kept, for the record of who held what); revoking twice keeps the first time."""
    t = time.time() if now is None else now

    def write(txn: Any) -> OperatorToken:
        for key, raw in txn.iter_blobs(BUCKET):
            token = _decode(raw)
            if token is not None and token.token_id == token_id:
                if token.revoked_at is None:
                    d = {**token.to_dict(), "revoked_at": t}
                    txn.put_blob(BUCKET, key, json.dumps(d).encode())
                    return OperatorToken.of(d)
                return token
        raise TokenNotFound(f"no operator token {token_id!r} (see `torpor tokens list`)")

    result: OperatorToken = store.transact(write)
    return result


def authenticate(store: AgentStore, secret: str, *, now: float | None = None) -> OperatorToken:
    """The active token whose secret this is; :class:`Unauthenticated` naming why not."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 256:
        raise Unauthenticated("the bearer token is not an operator token")
    return authenticate_hash(store, secret_hash(secret), now=now)


def authenticate_hash(store: AgentStore, key: str, *, now: float | None = None) -> OperatorToken:
    """:func:`authenticate` by the SHA-256 of the secret (what a console session keeps instead
    of the secret itself: the token is checked again at every request, revocation included)."""
    with store.read() as txn:
        raw = txn.get_blob(BUCKET, key)
    token = _decode(raw) if raw is not None else None
    if token is None:
        raise Unauthenticated("unknown operator token")
    state = token.state(time.time() if now is None else now)
    if state != "active":
        raise Unauthenticated(f"operator token {token.token_id} is {state}")
    return token


#: Stored entries already decoded, by their bytes (a gateway reads the same few tokens at
#: every request: decoding is most of the check's cost). Bounded; emptied when full.
_DECODED: dict[bytes, OperatorToken | None] = {}
_DECODED_MAX = 1024


def _decode(raw: bytes | None) -> OperatorToken | None:
    """A stored token, or None for bytes that are not one (a damaged entry grants nothing)."""
    if raw is None:
        return None
    raw = bytes(raw)
    try:
        return _DECODED[raw]
    except KeyError:
        pass
    try:
        d = json.loads(raw)
        token = OperatorToken.of(d) if isinstance(d, dict) else None
    except (ValueError, KeyError, TypeError):
        token = None
    if len(_DECODED) >= _DECODED_MAX:
        _DECODED.clear()
    _DECODED[raw] = token
    return token
