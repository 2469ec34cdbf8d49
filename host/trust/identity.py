"""Agent identity: every agent is a principal with a signed, expiring, revocable token.

Why a token at all: a tool (or a service a tool calls) must be able to ask
"which agent is this, running which exact code, on whose behalf?" and get an
answer it can check without trusting the caller. The answer is an Ed25519
signed statement issued by the host at spawn::

    tpr1.<base64url(JSON claims)>.<base64url(signature)>

with claims ``sub`` (agent id), ``name``, ``ver`` (bundle digest: the agent's
version is the exact code it runs), ``prn`` (the principal from
``--on-behalf-of``), ``par`` (the parent agent if forked), ``iat``/``exp`` and a
unique ``jti``. Tokens live host-side only (the store's ``identity`` bucket);
the guest never sees one. At termination the agent's identity is retired: its
token id and the agent itself go on the revocation list (``revocations``
bucket), so a token copied somewhere stops verifying even before it expires.

The host's signing key is one Ed25519 key in the store directory
(``host_ed25519.key``, mode 0600, created on first use). It also signs audit
heads and checkpoints (:mod:`host.trust.audit`); every use prefixes its message with
its own domain string so that a signature made for one purpose can never be
passed off as another. Its public half is recorded in the store's ``meta``
bucket under ``host_key/<key id>`` so that verifiers holding only the store
(or an export) can check signatures, including those of an older key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from host.errors import ConfigError, TorporError
from snapshots.errors import FULL_ERRNOS, StoreFull

KEY_FILE = "host_ed25519.key"
TOKEN_PREFIX = "tpr1"
DEFAULT_TTL_S = 3600.0
IDENTITY_BUCKET = "identity"
REVOCATIONS_BUCKET = "revocations"
META_BUCKET = "meta"

DOMAIN_TOKEN = b"torpor-identity-token-v1\x00"


class IdentityError(TorporError):
    """An identity token could not be issued or does not verify."""

    code = "identity"


class TokenInvalid(IdentityError):
    """The token is malformed, or its signature does not verify (forged or altered)."""

    code = "token_invalid"


class TokenExpired(IdentityError):
    """The token was genuine but its lifetime is over; ask the host for a fresh one."""

    code = "token_expired"


class TokenRevoked(IdentityError):
    """The token (or the agent it names) was revoked: the agent has terminated."""

    code = "token_revoked"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def key_id(public_raw: bytes) -> str:
    """A short, stable name of a public key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def public_key_from(value: str | bytes | Ed25519PublicKey) -> Ed25519PublicKey:
    """A public key from raw bytes, base64url of them, PEM text, or a key object."""
    if isinstance(value, Ed25519PublicKey):
        return value
    raw: bytes
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("the PEM public key is not an Ed25519 key")
            return key
        try:
            raw = b64d(text)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError("a public key must be PEM or base64url of 32 raw bytes") from exc
    else:
        raw = value
    if len(raw) != 32:
        raise ConfigError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class HostKey:
    """The host's Ed25519 signing key, kept in a 0600 file in the store directory.

    Created on first use. Creation is race-free across processes: the key is
    written to a private temporary file and hard-linked into place, so two
    hosts starting at once end up sharing whichever key won.
    """

    def __init__(self, private: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private
        self.public = private.public_key()
        self.public_raw = public_raw(self.public)
        self.key_id = key_id(self.public_raw)
        self.path = path

    @classmethod
    def generate(cls) -> HostKey:
        """A throwaway key (tests, or an embedder with its own key management)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, store_dir: str | Path) -> HostKey:
        path = Path(store_dir) / KEY_FILE
        if not path.exists():
            cls._create(path)
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> HostKey:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the host signing key {p}: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{p} is not a PEM Ed25519 private key ({exc}); restore it from a backup") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{p} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key, p)

    @staticmethod
    def _create(path: Path) -> None:
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                try:
                    view = memoryview(pem)
                    while view:  # a short write (a disk filling up) must not leave half a key
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.link(tmp, path)  # atomic: fails if another process linked its key first
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise StoreFull(f"cannot create the host signing key {path}: the disk is full "
                                f"({exc.strerror}); free disk space") from exc
            raise ConfigError(f"cannot create the host signing key {path}: {exc.strerror}") from exc

    def sign(self, domain: bytes, message: bytes) -> str:
        """Signature (base64url) over ``domain + message``."""
        return b64e(self._private.sign(domain + message))

    def public_b64(self) -> str:
        return b64e(self.public_raw)

    def public_pem(self) -> str:
        return self.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def verify_signature(public: Ed25519PublicKey, domain: bytes, message: bytes, signature: str) -> bool:
    try:
        public.verify(b64d(signature), domain + message)
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def register_public_key(txn: Any, key: HostKey) -> None:
    """Record the key's public half in the store (``meta`` bucket), once."""
    name = f"host_key/{key.key_id}"
    if txn.get_blob(META_BUCKET, name) is None:
        body = {"key_id": key.key_id, "public_key": key.public_b64(), "algorithm": "Ed25519", "created_at": time.time()}
        txn.put_blob(META_BUCKET, name, json.dumps(body, sort_keys=True).encode())


def known_public_keys(txn: Any) -> dict[str, Ed25519PublicKey]:
    """Every host public key recorded in the store, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for name, raw in txn.iter_blobs(META_BUCKET, "host_key/"):
        try:
            body = json.loads(raw)
            pub = public_key_from(str(body["public_key"]))
        except (ValueError, KeyError, ConfigError):
            continue
        if key_id(public_raw(pub)) == name.removeprefix("host_key/"):
            keys[name.removeprefix("host_key/")] = pub
    return keys


@dataclass(frozen=True)
class IdentityClaims:
    """What a verified token says about the agent presenting it."""

    agent_id: str
    name: str
    version: str  # the bundle digest
    principal: str | None
    parent: str | None
    issued_at: float
    expires_at: float
    token_id: str
    key_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "name": self.name, "version": self.version, "principal": self.principal,
                "parent": self.parent, "issued_at": self.issued_at, "expires_at": self.expires_at,
                "token_id": self.token_id, "key_id": self.key_id}


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed token and what the host records about it."""

    token: str
    claims: IdentityClaims

    def public(self) -> dict[str, Any]:
        """The agent record's ``identity`` field: the claims, never the bearer token itself."""
        c = self.claims
        return {"token_id": c.token_id, "key_id": c.key_id, "issued_at": c.issued_at, "expires_at": c.expires_at,
                "version": c.version, "principal": c.principal, "parent": c.parent, "retired_at": None}

    def event(self) -> dict[str, Any]:
        """Data of the ``identity.issued`` audit event."""
        c = self.claims
        return {"token_id": c.token_id, "key_id": c.key_id, "expires_at": c.expires_at, "version": c.version,
                "principal": c.principal}

    def save(self, txn: Any) -> None:
        """Keep the token host-side (``identity`` bucket) so tools can present it."""
        txn.put_blob(IDENTITY_BUCKET, self.claims.agent_id, json.dumps(
            {"token": self.token, **self.claims.to_dict()}, sort_keys=True).encode())


def sign_token(key: HostKey, claims: IdentityClaims) -> str:
    body = {"v": 1, "kid": claims.key_id, "jti": claims.token_id, "sub": claims.agent_id, "name": claims.name,
            "ver": claims.version, "prn": claims.principal, "par": claims.parent, "iat": claims.issued_at,
            "exp": claims.expires_at}
    payload = b64e(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    sig = key.sign(DOMAIN_TOKEN, payload.encode())
    return f"{TOKEN_PREFIX}.{payload}.{sig}"


def decode_token(token: str) -> tuple[IdentityClaims, str, str]:
    """The claims of a token *without* checking it, plus its payload and signature parts."""
    if not isinstance(token, str):
        raise TokenInvalid("an identity token is a string")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenInvalid(f"not a Torpor identity token (expected `{TOKEN_PREFIX}.<claims>.<signature>`)")
    try:
        body = json.loads(b64d(parts[1]))
        claims = IdentityClaims(
            agent_id=str(body["sub"]), name=str(body["name"]), version=str(body["ver"]),
            principal=None if body.get("prn") is None else str(body["prn"]),
            parent=None if body.get("par") is None else str(body["par"]),
            issued_at=float(body["iat"]), expires_at=float(body["exp"]), token_id=str(body["jti"]),
            key_id=str(body["kid"]))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise TokenInvalid(f"the identity token's claims are unreadable ({type(exc).__name__})") from exc
    return claims, parts[1], parts[2]


def verify_token(token: str, *, store: Any = None, public_keys: Mapping[str, Ed25519PublicKey] | None = None,
                 now: float | None = None, leeway_s: float = 5.0) -> IdentityClaims:
    """Check a token and return who it names; raise if it is forged, expired or revoked.

    Pass the host's ``store`` (then the signing keys and the revocation list
    come from it), or ``public_keys`` (key id -> key) to verify offline, in
    which case revocation cannot be checked.
    """
    claims, payload, sig = decode_token(token)
    keys: dict[str, Ed25519PublicKey] = dict(public_keys or {})
    revoked: dict[str, Any] | None = None
    if store is not None:
        with store.read() as txn:
            keys.update(known_public_keys(txn))
            for name in (f"token/{claims.token_id}", f"agent/{claims.agent_id}"):
                raw = txn.get_blob(REVOCATIONS_BUCKET, name)
                if raw is not None:
                    revoked = dict(json.loads(raw), scope=name.partition("/")[0])
                    break
    public = keys.get(claims.key_id)
    if public is None:
        raise TokenInvalid(f"the token is signed by key {claims.key_id}, which this host does not know")
    if not verify_signature(public, DOMAIN_TOKEN, payload.encode(), sig):
        raise TokenInvalid("the identity token's signature does not verify: it was altered or forged")
    t = time.time() if now is None else now
    if revoked is not None:
        what = f"token {claims.token_id}" if revoked["scope"] == "token" else f"agent {claims.agent_id}'s identity"
        raise TokenRevoked(f"{what} was revoked at {_iso(float(revoked.get('revoked_at', 0)))} "
                           f"({revoked.get('reason', 'revoked')})")
    if t > claims.expires_at + leeway_s:
        raise TokenExpired(f"agent {claims.agent_id}'s identity token expired at {_iso(claims.expires_at)}; "
                           "a tool gets a fresh one with host.trust.identity.token_for(ctx)")
    if t + leeway_s < claims.issued_at:
        raise TokenInvalid("the identity token is not valid yet (issued in the future: clock skew?)")
    return claims


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class IdentityService:
    """Issues, renews, retires and verifies agent identities for one host and store.

    The signing key is loaded (or created) on first use, so a host that never
    spawns an agent never writes one.
    """

    def __init__(self, store: Any, store_dir: str | Path, *, ttl_s: float = DEFAULT_TTL_S,
                 key: HostKey | None = None) -> None:
        if ttl_s <= 0:
            raise ConfigError("the identity token lifetime must be positive")
        self.store = store
        self.store_dir = Path(store_dir)
        self.ttl_s = float(ttl_s)
        self._key = key
        self._registered = False
        self._lock = threading.Lock()

    @property
    def key(self) -> HostKey:
        with self._lock:
            if self._key is None:
                self._key = HostKey.load_or_create(self.store_dir)
            return self._key

    def ensure_registered(self, txn: Any) -> None:
        """Record the public key in the store inside ``txn`` (cheap after the first time)."""
        if not self._registered:
            register_public_key(txn, self.key)
            self._registered = True

    def issue(self, record: Mapping[str, Any], *, now: float | None = None) -> IssuedToken:
        """Sign a token for an agent record (``agent_id``, ``name``, ``bundle_digest``, ``principal``, ``parent``)."""
        t = time.time() if now is None else now
        parent = record.get("parent")
        key = self.key
        claims = IdentityClaims(
            agent_id=str(record["agent_id"]), name=str(record.get("name") or ""),
            version=str(record.get("bundle_digest") or ""), principal=record.get("principal"),
            parent=parent.get("agent_id") if isinstance(parent, dict) else parent,
            issued_at=t, expires_at=t + self.ttl_s, token_id=uuid.uuid4().hex, key_id=key.key_id)
        return IssuedToken(sign_token(key, claims), claims)

    def provision(self, record: dict[str, Any], event: Callable[..., None]) -> Callable[[Any], None]:
        """Spawn: issue a token, note it in ``record``, queue ``identity.issued``; returns the txn writer."""
        issued = self.issue(record)
        record["identity"] = issued.public()
        event("identity.issued", **issued.event())

        def write(txn: Any) -> None:
            self.ensure_registered(txn)
            issued.save(txn)

        return write

    def retire(self, record: dict[str, Any], event: Callable[..., None], *, reason: str | None = None
               ) -> Callable[[Any], None]:
        """Termination: mark ``record`` retired, queue ``identity.revoked``; returns the txn writer.

        The writer puts the agent on the revocation list (which voids every
        token naming it, whatever its id) and drops the stored token; it is
        idempotent (a transaction may re-run).
        """
        now = time.time()
        agent_id = str(record["agent_id"])
        ident = record.get("identity")
        if isinstance(ident, dict) and ident.get("retired_at") is None:
            ident = dict(ident, retired_at=now)
            record["identity"] = ident
        why = reason or "the agent ended"
        token_id = ident.get("token_id") if isinstance(ident, dict) else None
        event("identity.revoked", token_id=token_id, reason=why)
        entry = json.dumps({"agent_id": agent_id, "revoked_at": now, "reason": why}, sort_keys=True).encode()

        def write(txn: Any) -> None:
            txn.put_blob(REVOCATIONS_BUCKET, f"agent/{agent_id}", entry)
            txn.delete_blob(IDENTITY_BUCKET, agent_id)

        return write

    def revoke_token(self, token: str, *, reason: str = "revoked by an operator") -> IdentityClaims:
        """Void one token (say, one that leaked) without retiring its agent; ``token_for`` then issues another."""
        claims = self.verify(token)
        entry = json.dumps({"token_id": claims.token_id, "agent_id": claims.agent_id, "revoked_at": time.time(),
                            "reason": reason}, sort_keys=True).encode()

        def write(txn: Any) -> None:
            txn.put_blob(REVOCATIONS_BUCKET, f"token/{claims.token_id}", entry)
            raw = txn.get_blob(IDENTITY_BUCKET, claims.agent_id)
            if raw is not None and json.loads(raw).get("token_id") == claims.token_id:
                txn.delete_blob(IDENTITY_BUCKET, claims.agent_id)

        self.store.transact(write)
        return claims

    def token_for(self, agent_id: str, *, min_remaining_s: float | None = None, txn: Any = None) -> str:
        """The agent's current token, re-issued if it expires within ``min_remaining_s``.

        Renewal keeps a long-lived agent (one that waited days for an approval)
        able to present a valid identity; a retired agent gets none. Pass
        ``txn`` from inside a transactional tool (the store allows one writer).
        """
        margin = self.ttl_s / 3 if min_remaining_s is None else min_remaining_s

        def current(t: Any) -> str | None:
            raw = t.get_blob(IDENTITY_BUCKET, agent_id)
            if raw is None:
                return None
            body = json.loads(raw)
            if float(body.get("expires_at", 0)) - time.time() > margin:
                return str(body["token"])
            return None

        def renew(t: Any) -> str:
            found = current(t)
            if found is not None:
                return found
            rec = t.get_agent(agent_id)
            if rec is None:
                raise IdentityError(f"no agent {agent_id}: it has no identity", code="agent_not_found")
            if t.get_blob(REVOCATIONS_BUCKET, f"agent/{agent_id}") is not None or rec.get("status") in (
                    "completed", "failed", "terminated"):
                raise TokenRevoked(f"agent {agent_id} is {rec.get('status')}: its identity was retired")
            issued = self.issue(rec)
            self.ensure_registered(t)
            issued.save(t)
            return issued.token

        if txn is not None:
            return renew(txn)
        with self.store.read() as r:
            found = current(r)
        if found is not None:
            return found
        return str(self.store.transact(renew))

    def verify(self, token: str, *, now: float | None = None) -> IdentityClaims:
        """:func:`verify_token` against this host's store and key."""
        return verify_token(token, store=self.store, public_keys={self.key.key_id: self.key.public}, now=now)


def token_for(ctx: Any, *, txn: Any = None) -> str:
    """For a host-side tool: the calling agent's identity token, to present to a service.

    ``ctx`` is the tool's :class:`~host.tools.registry.ToolContext`; the host's
    store directory is found from its store.
    """
    store = ctx.store
    if store is None:
        raise IdentityError("this tool context has no store, so no identity")
    svc = IdentityService(store, Path(store.path).parent)
    return svc.token_for(ctx.agent_id, txn=txn)
