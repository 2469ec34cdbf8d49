"""The local secrets vault: credentials encrypted at rest, opened only by the host.

Why a file beside the store and not a bucket in it: the vault must be
readable by ``torpor secrets`` and by a host whose LMDB environment is already
open (LMDB forbids opening one environment twice in a process), and it must
never be copied along with snapshots or exports. It is one JSON file,
``<store>/vault.json`` (mode 0600), written atomically (temporary file, fsync,
rename) under an exclusive lock, so concurrent ``secrets set`` never lose an
update.

Each value is sealed with AES-256-GCM under a fresh 96-bit nonce; the
associated data binds it to its name and version, so a ciphertext moved to
another name (or rolled back to an older version of the file entry) fails to
open instead of handing the wrong secret to a tool. Names and metadata
(created, updated, version) are plaintext: listing never needs the key.

The key comes from, in order: an explicit key file, ``TORPOR_VAULT_KEY``
(base64url of 32 random bytes, as printed by ``torpor secrets keygen``, or
else a passphrase stretched with scrypt and the vault's salt),
``TORPOR_VAULT_KEY_FILE``, or ``<store>/vault.key``, which is created (0600)
when the first secret is set and no key was given. The vault records a
key *fingerprint* (an HMAC of a fixed string, revealing nothing of the key),
so a wrong key is refused with a clear message before any decryption.
"""

from __future__ import annotations

import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets as pysecrets
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from host.errors import ConfigError, TorporError
from host.trust.identity import b64d, b64e

VAULT_FILE = "vault.json"
KEY_FILE = "vault.key"
LOCK_FILE = "vault.lock"
FORMAT = 1
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_VALUE = 64 * 1024
_FINGERPRINT_MSG = b"torpor-vault-key-fingerprint-v1"


class VaultError(TorporError):
    """The vault file is unreadable, or an operation on it is not possible."""

    code = "vault"


class VaultKeyError(VaultError):
    """No key, a malformed key, or a key that does not open this vault."""

    code = "vault_key"


class SecretNotFound(VaultError):
    """No secret of that name in the vault."""

    code = "secret_not_found"


@dataclass(frozen=True)
class SecretInfo:
    """A secret's metadata (never its value)."""

    name: str
    version: int
    created_at: float
    updated_at: float
    hosts: tuple[str, ...] = ()  # the hosts it may be sent to (empty: not bound)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "created_at": self.created_at, "updated_at": self.updated_at,
                "hosts": list(self.hosts)}


@dataclass(frozen=True)
class KeySource:
    """Where the vault key comes from: exactly one of ``value`` (env text) or ``path`` (key file)."""

    value: str | None
    path: Path | None
    label: str
    create_if_missing: bool = False

    @classmethod
    def resolve(cls, store_dir: str | Path, key_file: str | Path | None = None) -> KeySource:
        if key_file is not None:
            return cls(None, Path(key_file), f"key file {key_file}")
        env = os.environ.get("TORPOR_VAULT_KEY")
        if env:
            return cls(env, None, "TORPOR_VAULT_KEY")
        env_file = os.environ.get("TORPOR_VAULT_KEY_FILE")
        if env_file:
            return cls(None, Path(env_file), f"TORPOR_VAULT_KEY_FILE ({env_file})")
        default = Path(store_dir) / KEY_FILE
        return cls(None, default, f"key file {default}", create_if_missing=True)


def generate_key() -> str:
    """A fresh vault key: base64url of 32 random bytes."""
    return b64e(pysecrets.token_bytes(32))


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{name!r} is not a secret name; use letters, digits and '_' (e.g. erp_token), "
                          "starting with a letter or '_'")
    return name


def _fingerprint(key: bytes) -> str:
    return hmac.new(key, _FINGERPRINT_MSG, hashlib.sha256).hexdigest()[:16]


class Vault:
    """One vault file. Methods re-read the file, so several processes can share it."""

    def __init__(self, store_dir: str | Path, *, key_file: str | Path | None = None,
                 key_source: KeySource | None = None) -> None:
        self.dir = Path(store_dir)
        self.path = self.dir / VAULT_FILE
        self.source = key_source or KeySource.resolve(self.dir, key_file)
        self._key: bytes | None = None

    # -- file ------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.exists()

    def _read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": FORMAT, "key": None, "secrets": {}}
        except OSError as exc:
            raise VaultError(f"cannot read the vault {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise VaultError(f"the vault {self.path} is not valid JSON ({exc}); restore it from a backup") from exc
        if not isinstance(data, dict) or not isinstance(data.get("secrets"), dict):
            raise VaultError(f"the vault {self.path} is not a Torpor vault")
        if int(data.get("format", 0)) > FORMAT:
            raise VaultError(f"the vault {self.path} has format {data.get('format')}, newer than this Torpor's {FORMAT}")
        return data

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}")
        body = json.dumps(data, sort_keys=True, indent=1).encode()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise VaultError(f"cannot write the vault {self.path}: {exc.strerror}") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise VaultError(f"cannot lock the vault in {self.dir}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- key -------------------------------------------------------------------
    def _raw_key_text(self, *, create: bool) -> str | None:
        src = self.source
        if src.value is not None:
            return src.value
        assert src.path is not None
        try:
            return src.path.read_text().strip()
        except FileNotFoundError:
            if not (create and src.create_if_missing):
                return None
        except OSError as exc:
            raise VaultKeyError(f"cannot read the vault key from {src.label}: {exc.strerror}") from exc
        text = generate_key()
        try:
            fd = os.open(src.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return src.path.read_text().strip()
        except OSError as exc:
            raise VaultKeyError(f"cannot create the vault key {src.path}: {exc.strerror}") from exc
        try:
            os.write(fd, (text + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return text

    def _derive(self, text: str, data: dict[str, Any], *, create: bool) -> tuple[bytes, dict[str, Any]]:
        """The 32-byte key and the key metadata the vault file records."""
        meta = data.get("key") or {}
        try:
            raw = b64d(text)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) == 32 and meta.get("kdf") in (None, "none"):
            return raw, {"kdf": "none", "fingerprint": _fingerprint(raw)}
        # A passphrase: stretch it with scrypt and the vault's salt.
        if meta.get("kdf") == "scrypt":
            salt = b64d(str(meta["salt"]))
        elif create and not data.get("secrets"):
            salt = pysecrets.token_bytes(16)
        else:
            raise VaultKeyError(
                f"the vault key from {self.source.label} is not a 32-byte base64url key, and this vault was not "
                "created with a passphrase; use the key it was created with (see `torpor secrets keygen`)")
        key = Scrypt(salt=salt, length=32, n=2**14, r=8, p=1).derive(text.encode())
        return key, {"kdf": "scrypt", "salt": b64e(salt), "n": 2**14, "r": 8, "p": 1, "fingerprint": _fingerprint(key)}

    def _key_for(self, data: dict[str, Any], *, create: bool = False) -> tuple[bytes, dict[str, Any]]:
        text = self._raw_key_text(create=create)
        if not text:
            raise VaultKeyError(
                f"no vault key: set TORPOR_VAULT_KEY (e.g. from `torpor secrets keygen`) or TORPOR_VAULT_KEY_FILE; "
                f"looked for {self.source.label}")
        key, meta = self._derive(text, data, create=create)
        recorded = (data.get("key") or {}).get("fingerprint")
        if recorded is not None and not hmac.compare_digest(str(recorded), meta["fingerprint"]):
            raise VaultKeyError(
                f"the vault key from {self.source.label} does not open the vault {self.path} (it was sealed with the "
                f"key whose fingerprint is {recorded}, this one is {meta['fingerprint']}); use the key the vault was "
                "created with")
        return key, meta

    def check_key(self) -> None:
        """Raise :class:`VaultKeyError` unless the configured key opens this vault."""
        self._key_for(self._read())

    # -- secrets -----------------------------------------------------------------
    def list(self) -> list[SecretInfo]:
        """Names and metadata, sorted; needs no key."""
        data = self._read()
        return [SecretInfo(name, int(e["version"]), float(e["created_at"]), float(e["updated_at"]),
                           tuple(e.get("hosts") or ()))
                for name, e in sorted(data["secrets"].items())]

    def names(self) -> set[str]:
        return set(self._read()["secrets"])

    def set(self, name: str, value: str | bytes, *, hosts: Sequence[str] = ()) -> SecretInfo:
        """Store (or replace) a secret; returns its metadata.

        ``hosts`` binds it to the hosts it may be sent to (``api.example.com``,
        ``*.example.com``, ``127.0.0.1:8080``): a tool refuses to send it anywhere else,
        whatever a bundle's policy grants. The binding is sealed with the value (it is
        part of the associated data), so a binding changed in the file fails to open.
        """
        validate_name(name)
        bound = _canonical_hosts(hosts)
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if not raw:
            raise ConfigError(f"the value for secret {name} is empty")
        if len(raw) > MAX_VALUE:
            raise ConfigError(f"the value for secret {name} is {len(raw)} bytes; the limit is {MAX_VALUE}")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"the value for secret {name} is not UTF-8 text") from exc
        with self._locked():
            data = self._read()
            key, meta = self._key_for(data, create=True)
            now = time.time()
            old = data["secrets"].get(name)
            version = int(old["version"]) + 1 if old else 1
            nonce = pysecrets.token_bytes(12)
            ct = AESGCM(key).encrypt(nonce, raw, _aad(name, version, bound))
            data["secrets"][name] = {"version": version, "created_at": float(old["created_at"]) if old else now,
                                     "updated_at": now, "nonce": b64e(nonce), "ciphertext": b64e(ct)}
            if bound:
                data["secrets"][name]["hosts"] = list(bound)
            data["key"] = meta
            data["format"] = FORMAT
            self._write(data)
        return SecretInfo(name, version, float(data["secrets"][name]["created_at"]), now, bound)

    def remove(self, name: str) -> bool:
        """Delete a secret; False when there was none. Needs no key."""
        validate_name(name)
        with self._locked():
            data = self._read()
            if name not in data["secrets"]:
                return False
            del data["secrets"][name]
            self._write(data)
        return True

    def get(self, name: str) -> str:
        """A secret's value (host side only: for the broker, never for printing)."""
        return self.get_many((name,))[name]

    def get_many(self, names: Sequence[str]) -> dict[str, str]:
        return {name: value for name, (value, _) in self.get_bound(names).items()}

    def get_bound(self, names: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Values with the hosts each is bound to (checked: the binding is sealed with the value)."""
        data = self._read()
        missing = [n for n in names if n not in data["secrets"]]
        if missing:
            raise SecretNotFound(f"no secret {', '.join(missing)} in the vault {self.path}; "
                                 f"add it with `torpor secrets set {missing[0]}`")
        key, _ = self._key_for(data)
        out: dict[str, tuple[str, tuple[str, ...]]] = {}
        for name in names:
            e = data["secrets"][name]
            try:
                hosts = tuple(str(h) for h in (e.get("hosts") or ()))
                plain = AESGCM(key).decrypt(b64d(e["nonce"]), b64d(e["ciphertext"]),
                                            _aad(name, int(e["version"]), hosts))
            except (InvalidTag, binascii.Error, ValueError, KeyError, TypeError) as exc:
                raise VaultKeyError(f"secret {name} in {self.path} does not decrypt: the vault entry (or its host "
                                    "binding) was altered, or sealed with another key") from exc
            out[name] = (plain.decode("utf-8"), hosts)
        return out


def _canonical_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """Host patterns as the policy's allowlists spell them (refused when malformed)."""
    from policies.schema import format_host_pattern, parse_host_pattern

    out: list[str] = []
    for h in hosts:
        try:
            out.append(format_host_pattern(*parse_host_pattern(h)))
        except ValueError as exc:
            raise ConfigError(f"secret host binding {h!r}: {exc}") from None
    return tuple(dict.fromkeys(out))


def _aad(name: str, version: int, hosts: Sequence[str] = ()) -> bytes:
    base = f"torpor-vault-v1\x00{name}\x00{version}"
    if hosts:  # bound secrets seal their binding too (unbound entries keep the original associated data)
        base += "\x00hosts\x00" + ",".join(hosts)
    return base.encode()
