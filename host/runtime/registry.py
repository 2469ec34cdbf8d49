"""The registry of versioned agents: bundles pushed under a name, versions, tags, diffs.

Why: a bundle's digest says exactly which agent runs, but nobody deploys by digest.
Operators push a bundle under a name (``procurement``), move tags (``production``,
``canary``) between its versions, and start runs by reference: ``procurement@production``,
``procurement`` (the version pushed last) or ``sha256:<hex>``. A run resolves its
reference once, at spawn, and records the digest it got (``bundle_digest``) and the
reference it was started as (``started_as``): the record never follows a tag, so moving
``production`` back leaves every running and hibernated agent on the version it started
with, and ``torpor inspect`` answers which version ran.

Names are per tenant: each tenant has its own namespace of names and tags. A digest
(``sha256:<hex>``) resolves for a tenant that pushed it (under any name), or for anyone if
no tenant pushed it (a bundle the store keeps because a run of its file used it: the
embedded CLI's ``torpor run FILE``); a digest another tenant pushed does not exist for
the others, so one tenant can neither run nor learn of another's bundles. The embedded
CLI is tenant ``default``.

Storage goes through :class:`~snapshots.store.AgentStore` only, in its ``registry``
bucket (sealed: a value changed on disk is refused, never followed), three kinds of key:

* ``n/TENANT/NAME``: the name's head (JSON): the version pushed last, the tags;
* ``v/TENANT/NAME/DIGEST``: one version (JSON): digest, ABI, tools, push time;
* ``d/TENANT/DIGEST/NAME``: empty, so that ``sha256:...`` resolves in one lookup;
* ``g/DIGEST``: empty, "some tenant pushed this digest" (then it is not everyone's).

Every push and every tag move is sealed onto the host-level audit chain ``host.registry``
(:func:`host.trust.audit.append_host_events`) in its own transaction: who moved
``production`` to which digest, and from which, is as tamper-evident as an agent's log
(``torpor audit show host.registry``).

The bundle's bytes go to the ``bundles`` bucket under their digest, in the same
transaction, through the one writer of that bucket (:func:`~host.runtime.loader.store_bundle`).
A push is validated by the one loader of bundles (:func:`host.sandbox.bundle.load_bytes`)
and the module checked against its own policy by the one validator
(:mod:`host.sandbox.validate`); whether a bundle's own code may run stays the run's
question (``BundleLoader.bundle_code``): pushing a bundle that carries Python stores it,
running it still needs the operator's trust.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from host.errors import BundleNotFound, InvalidReference
from host.trust import audit
from snapshots.errors import RecordCorrupt
from snapshots.store import REGISTRY_BUCKET, AgentStore, ReadTxn

__all__ = ["DEFAULT_TENANT", "Registry", "Resolved", "parse_ref"]

#: The tenant of the embedded CLI and of every caller that names none.
DEFAULT_TENANT = "default"
DIGEST_PREFIX = "sha256:"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # no '@', ':' or '/': they delimit refs and keys
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]{64}")
_HEX_PREFIX = re.compile(r"[0-9a-f]+")
MAX_REF = 300
#: The host-level audit chain of registry writes.
CHAIN = audit.host_chain("registry")


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a reference resolved to: the exact digest, and the name and tag it was named by
    (None for a bare ``sha256:`` reference; tag None for a name alone or a pinned digest)."""

    ref: str
    digest: str
    name: str | None = None
    tag: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """What a run records as ``started_as`` (with the digest beside it as ``bundle_digest``)."""
        return {"ref": self.ref, "name": self.name, "tag": self.tag, "digest": self.digest}


def parse_ref(ref: str) -> tuple[str | None, str | None, str | None]:
    """``(name, tag, digest)`` of a reference: ``name``, ``name@tag``, ``name@sha256:<hex>``
    or ``sha256:<hex>``; :class:`InvalidReference` for anything else."""
    if not isinstance(ref, str) or not ref or len(ref) > MAX_REF:
        raise InvalidReference(f"a bundle reference is NAME, NAME@TAG or sha256:<hex>, got {_quote(ref)}")
    if ref.startswith(DIGEST_PREFIX):
        return None, None, normalize_digest(ref)
    name, at, rest = ref.partition("@")
    check_name(name)
    if not at:
        return name, None, None
    if rest.startswith(DIGEST_PREFIX):
        return name, None, normalize_digest(rest)
    check_name(rest, what="tag")
    return name, rest, None


def normalize_digest(text: str) -> str:
    """A digest as the store keys it (64 lowercase hex digits), from ``sha256:<hex>`` or the hex."""
    hexpart = text[len(DIGEST_PREFIX):] if isinstance(text, str) and text.startswith(DIGEST_PREFIX) else text
    if not isinstance(hexpart, str) or not _HEX.fullmatch(hexpart):
        raise InvalidReference(f"a bundle digest is sha256: and 64 lowercase hex digits, got {_quote(text)}")
    return hexpart


#: Names that would read as something else (``GET /v1/bundles/diff`` is the diff).
RESERVED_NAMES = frozenset({"diff"})


def check_name(name: str, *, what: str = "name") -> str:
    """A registry name or tag: 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidReference(f"a registry {what} is 1 to 128 letters, digits, '.', '_' or '-' (starting with a "
                               f"letter or digit), got {_quote(name)}")
    if what == "name" and name in RESERVED_NAMES:
        raise InvalidReference(f"{name!r} is reserved; push the bundle under another name (--name)")
    return name


def check_tenant(tenant: str) -> str:
    """A tenant: 1 to 64 letters, digits, '.', '_' or '-'."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise InvalidReference(f"a tenant is 1 to 64 letters, digits, '.', '_' or '-', got {_quote(tenant)}")
    return tenant


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _head_key(tenant: str, name: str) -> str:
    return f"n/{tenant}/{name}"


def _version_key(tenant: str, name: str, digest: str) -> str:
    return f"v/{tenant}/{name}/{digest}"


def _digest_key(tenant: str, digest: str, name: str) -> str:
    return f"d/{tenant}/{digest}/{name}"


def _pushed_key(digest: str) -> str:
    return f"g/{digest}"


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _load(key: str, raw: bytes) -> dict[str, Any]:
    """A registry value as the JSON object it must be; RecordCorrupt otherwise (its seal
    matched, so the writer was wrong or older: named, never guessed around)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RecordCorrupt(f"registry entry {key!r} does not decode: {exc}") from exc
    if not isinstance(value, dict):
        raise RecordCorrupt(f"registry entry {key!r} is not a JSON object")
    return value


def _get(txn: ReadTxn, key: str) -> dict[str, Any] | None:
    raw = txn.get_blob(REGISTRY_BUCKET, key)
    return None if raw is None else _load(key, raw)


class Registry:
    """Named, versioned, tagged bundles in a store, per tenant."""

    def __init__(self, store: AgentStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    # -- writes -------------------------------------------------------------------------
    def push(self, bundle_bytes: bytes, *, name: str | None = None, tenant: str = DEFAULT_TENANT,
             tag: str | None = None, by: str | None = None) -> dict[str, Any]:
        """Store a bundle under its digest as a version of ``name`` (default: the agent's own
        name, from its policy) as the latest, and move ``tag`` to it if given. Pushing a
        version again keeps its first push time and makes it the latest. Returns the version
        (name, digest, abi, tools, pushed_at, tags).

        A bundle that does not load (``invalid_bundle``, ``invalid_policy``, ...) or whose
        module does not fit its own policy (``import_not_granted``, ``memory_limit``) is
        refused before anything is written. ``by``: who pushed (audited).
        """
        if name is not None:
            check_name(name)
        check_tenant(tenant)
        if tag is not None:
            check_name(tag, what="tag")
        # The loader, the validator and Wasmtime behind them load here, on a push: listing
        # and resolving (``torpor registry list``) read the store alone.
        from host.runtime.loader import store_bundle
        from host.sandbox import bundle as bundle_mod
        from host.sandbox import validate

        b = bundle_mod.load_bytes(bytes(bundle_bytes), source=f"the bundle pushed as {name or 'its agent name'}")
        validate.check_policy(validate.check_module(b.module), b.policy)
        named = name if name is not None else check_name(b.name)  # the agent's name, from its policy
        now = self.clock()
        fresh = {"digest": b.digest, "abi": b.abi_version, "tools": sorted(b.policy.grants), "pushed_at": now,
                 "agent": b.name, "size": len(b.raw), "module_digest": b.module_digest,
                 "host_code": sorted(b.host_code)}

        def write(txn: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            store_bundle(txn, b)
            vkey = _version_key(tenant, named, b.digest)
            version = _get(txn, vkey)
            if version is None:
                version = fresh
                txn.put_blob(REGISTRY_BUCKET, vkey, _dump(version))
                txn.put_blob(REGISTRY_BUCKET, _digest_key(tenant, b.digest, named), b"")
                txn.put_blob(REGISTRY_BUCKET, _pushed_key(b.digest), b"")
            head = _get(txn, _head_key(tenant, named)) or {"name": named, "created_at": now, "tags": {}}
            head["latest"] = b.digest
            head["updated_at"] = now
            previous = None
            if tag is not None:
                previous = head.get("tags", {}).get(tag)
                head["tags"] = {**head.get("tags", {}), tag: b.digest}
            txn.put_blob(REGISTRY_BUCKET, _head_key(tenant, named), _dump(head))
            audit.append_host_events(txn, CHAIN, [("registry.pushed", {
                "tenant": tenant, "name": named, "digest": b.digest, "new_version": version is fresh,
                "tag": tag, "previous": previous, "by": by})])
            return version, head

        version, head = self.store.transact(write)
        return _version_view(named, version, head)

    def tag(self, name: str, tag: str, digest: str, *, tenant: str = DEFAULT_TENANT,
            by: str | None = None) -> dict[str, Any]:
        """Point ``tag`` of ``name`` at ``digest`` (a version pushed under that name).

        Only new runs follow it: agents started on the tag keep the digest they started with.
        Returns the name, tag, digest and the digest the tag held before (or None). ``by``:
        who moved it (audited).
        """
        check_name(name)
        check_name(tag, what="tag")
        check_tenant(tenant)
        wanted = digest

        def write(txn: Any) -> tuple[str | None, str]:
            head = _get(txn, _head_key(tenant, name))
            if head is None:
                raise BundleNotFound(f"no bundle named {name!r} in the registry")
            digest = _version_of(txn, tenant, name, head, wanted)
            if _get(txn, _version_key(tenant, name, digest)) is None:
                raise BundleNotFound(f"{DIGEST_PREFIX}{digest} is not a version of {name!r} "
                                     f"(push it with --name {name} first)")
            tags = dict(head.get("tags", {}))
            previous = tags.get(tag)
            tags[tag] = digest
            head["tags"] = tags
            head["updated_at"] = self.clock()
            txn.put_blob(REGISTRY_BUCKET, _head_key(tenant, name), _dump(head))
            previous = previous if isinstance(previous, str) else None
            audit.append_host_events(txn, CHAIN, [("registry.tagged", {
                "tenant": tenant, "name": name, "tag": tag, "digest": digest, "previous": previous, "by": by})])
            return previous, digest

        previous, digest = self.store.transact(write)
        return {"name": name, "tag": tag, "digest": digest, "previous": previous}

    # -- reads --------------------------------------------------------------------------
    def lookup(self, ref: str, *, tenant: str = DEFAULT_TENANT) -> Resolved:
        """What ``ref`` names now, for ``tenant``; :class:`BundleNotFound` when nothing."""
        name, tag, digest = parse_ref(ref)
        check_tenant(tenant)
        with self.store.read() as txn:
            if name is None:
                assert digest is not None
                prefix = f"d/{tenant}/{digest}/"
                if next(iter(txn.iter_blobs(REGISTRY_BUCKET, prefix)), None) is not None:
                    return Resolved(ref, digest)
                # Not this tenant's: everyone's only if no tenant pushed it and the store keeps it.
                if (txn.get_blob(REGISTRY_BUCKET, _pushed_key(digest)) is not None
                        or next(iter(txn.iter_blobs("bundles", digest)), None) is None):
                    raise BundleNotFound(f"no bundle {DIGEST_PREFIX}{digest} in this registry")
                return Resolved(ref, digest)
            head = _get(txn, _head_key(tenant, name))
            if head is None:
                raise BundleNotFound(f"no bundle named {name!r} in the registry")
            if digest is not None:
                if _get(txn, _version_key(tenant, name, digest)) is None:
                    raise BundleNotFound(f"{DIGEST_PREFIX}{digest} is not a version of {name!r}")
                return Resolved(ref, digest, name)
            if tag is None:
                return Resolved(ref, _head_digest(head, "latest", name), name)
            tags = head.get("tags", {})
            if not isinstance(tags, dict) or tag not in tags:
                known = ", ".join(sorted(tags)) if isinstance(tags, dict) and tags else "none"
                raise BundleNotFound(f"{name!r} has no tag {tag!r} (its tags: {known})")
            return Resolved(ref, _digest_of(tags[tag], f"{name}@{tag}"), name, tag)

    def resolve(self, ref: str, *, tenant: str = DEFAULT_TENANT) -> str:
        """The digest ``ref`` names now, for ``tenant`` (see :meth:`lookup`)."""
        return self.lookup(ref, tenant=tenant).digest

    def names(self, *, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
        """Every name of the tenant: how many versions, its tags, its latest version."""
        check_tenant(tenant)
        counts: dict[str, int] = {}
        rows: list[dict[str, Any]] = []
        with self.store.read() as txn:
            for key, _ in txn.iter_blobs(REGISTRY_BUCKET, f"v/{tenant}/"):
                name = key.split("/")[2]
                counts[name] = counts.get(name, 0) + 1
            for key, raw in txn.iter_blobs(REGISTRY_BUCKET, f"n/{tenant}/"):
                head = _load(key, raw)
                name = key.split("/", 2)[2]
                rows.append({"name": name, "versions": counts.get(name, 0), "tags": dict(head.get("tags", {})),
                             "latest": head.get("latest"), "updated_at": head.get("updated_at")})
        return rows

    def versions(self, name: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """A name's versions (oldest push first: digest, abi, tools, pushed_at, tags), its tags
        and its latest version; :class:`BundleNotFound` for a name the tenant never pushed."""
        check_name(name)
        check_tenant(tenant)
        with self.store.read() as txn:
            head = _get(txn, _head_key(tenant, name))
            if head is None:
                raise BundleNotFound(f"no bundle named {name!r} in the registry")
            found = [_load(key, raw) for key, raw in txn.iter_blobs(REGISTRY_BUCKET, f"v/{tenant}/{name}/")]
        found.sort(key=lambda v: (float(v.get("pushed_at") or 0), str(v.get("digest"))))
        return {"name": name, "latest": head.get("latest"), "tags": dict(head.get("tags", {})),
                "versions": [_version_view(name, v, head) for v in found]}

    def diff(self, a: str, b: str, *, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        """What the policy of ``b`` grants differently from that of ``a`` (both references),
        as data, with the same as text under ``"text"``; whether the module differs too."""
        from host.runtime.loader import stored_bundle
        from policies.diff import diff_policies

        ra, rb = self.lookup(a, tenant=tenant), self.lookup(b, tenant=tenant)
        ba, bb = stored_bundle(self.store, ra.digest), stored_bundle(self.store, rb.digest)
        d = diff_policies(ba.policy, bb.policy)
        module_same = ba.module_digest == bb.module_digest
        header = (f"{ra.ref} ({DIGEST_PREFIX}{ra.digest[:12]}) -> {rb.ref} ({DIGEST_PREFIX}{rb.digest[:12]})\n"
                  f"module: {'the same' if module_same else 'changed'} (abi v{ba.abi_version} -> v{bb.abi_version})")
        return {"a": {**ra.to_dict(), "abi": ba.abi_version, "agent": ba.name},
                "b": {**rb.to_dict(), "abi": bb.abi_version, "agent": bb.name},
                "module": {"same": module_same, "a": ba.module_digest, "b": bb.module_digest},
                **d.to_dict(), "text": f"{header}\n{d.text()}"}


#: The shortest digest prefix a tag move takes: ``torpor registry show`` prints 12 hex digits.
MIN_DIGEST_PREFIX = 8


def _version_of(txn: ReadTxn, tenant: str, name: str, head: dict[str, Any], wanted: str) -> str:
    """The digest of the version of ``name`` that ``wanted`` names for a tag move: its digest
    (``sha256:<hex>`` or the hex), a prefix of it of at least :data:`MIN_DIGEST_PREFIX` hex
    digits that no other version of the name shares (what ``registry show`` prints), or
    ``NAME@TAG`` / ``NAME@sha256:...`` of the same name (promote what ``canary`` runs)."""
    if isinstance(wanted, str) and "@" in wanted:
        ref_name, tag, digest = parse_ref(wanted)
        if ref_name != name:
            raise InvalidReference(f"{_quote(wanted)} is not a version of {name!r}: a tag moves within its name")
        if digest is not None:
            return digest
        tags = head.get("tags", {})
        if not isinstance(tags, dict) or tag not in tags:
            known = ", ".join(sorted(tags)) if isinstance(tags, dict) and tags else "none"
            raise BundleNotFound(f"{name!r} has no tag {tag!r} (its tags: {known})")
        return _digest_of(tags[tag], wanted)
    hexpart = wanted[len(DIGEST_PREFIX):] if isinstance(wanted, str) and wanted.startswith(DIGEST_PREFIX) else wanted
    if isinstance(hexpart, str) and MIN_DIGEST_PREFIX <= len(hexpart) < 64 and _HEX_PREFIX.fullmatch(hexpart):
        found = [key.rsplit("/", 1)[1] for key, _ in txn.iter_blobs(REGISTRY_BUCKET, f"v/{tenant}/{name}/{hexpart}")]
        if len(found) == 1:
            return found[0]
        if found:
            raise InvalidReference(f"{_quote(wanted)} is the start of {len(found)} versions of {name!r}: give more digits")
        raise BundleNotFound(f"no version of {name!r} starts with {_quote(wanted)} (`torpor registry show {name}`)")
    try:
        return normalize_digest(wanted)
    except InvalidReference:
        raise InvalidReference(f"a version is sha256:<hex> (its first {MIN_DIGEST_PREFIX} digits or more, as "
                               f"`torpor registry show` prints them) or NAME@TAG, got {_quote(wanted)}") from None


def _digest_of(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX.fullmatch(value):
        raise RecordCorrupt(f"registry entry of {what} holds {_quote(value)}, not a digest")
    return value


def _head_digest(head: dict[str, Any], field: str, name: str) -> str:
    return _digest_of(head.get(field), f"{name} ({field})")


def _version_view(name: str, version: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """A version as shown: its fields, the tags that point at it, whether it is the latest."""
    digest = version.get("digest")
    tags = head.get("tags", {})
    return {"name": name, **version, "tags": sorted(t for t, d in tags.items() if d == digest),
            "latest": head.get("latest") == digest}
