"""``POST /v1/runs``: start an agent, once per idempotency key.

The agent is named by ``name``, ``name@tag`` (through the registry, per tenant) or
``sha256:<hex>`` (a bundle the store holds). The spawn is committed before the answer
(``201`` and the agent), and the agent is driven in the background by the scheduler;
with ``wait`` the answer comes when it stops running or the wait ends.

Idempotency: an ``Idempotency-Key`` is stored in the spawn's own transaction, keyed by
tenant and the key's hash, with a fingerprint of the request (agent, input, fuel). The
same key and request again answer the same agent (``200``); the same key with another
request is ``409 idempotency_conflict``. Requests with one key are serialised in the
process, and the key is durable with the run, so a retry after a crash or a timeout
finds the run it started and never starts a second one.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from host.errors import BundleNotFound, IdempotencyConflict, InvalidInput, TorporError
from host.runtime import Host
from host.runtime.result import PARKED, TERMINAL
from host.sandbox.bundle import Bundle
from host.server import agents as agents_routes
from host.server.gateway import require
from host.server.inputs import json_object, number, optional_string, owned, owned_agent
from host.server.responses import json_response
from host.server.scheduler import Drive
from host.trust import audit

IDEMPOTENCY_BUCKET = "server"
_KEY_MAX = 256


def resolve(host: Host, ref: str, tenant: str) -> tuple[Bundle, dict[str, Any]]:
    """The bundle a run names, through the tenant's registry (:meth:`Registry.lookup
    <host.runtime.registry.Registry.lookup>`), and the reference as the run records it
    (``started_as``)."""
    resolved = host.registry.lookup(ref, tenant=tenant)
    try:
        return host.bundle_by_digest(resolved.digest), resolved.to_dict()
    except TorporError as exc:
        if exc.code == "bundle_missing":
            raise BundleNotFound(f"no bundle {ref!r} in this server's store") from None
        raise


def _key_name(tenant: str, key: str) -> str:
    return f"idem/{tenant}/{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _stored_key(host: Host, name: str) -> dict[str, Any] | None:
    with host.store.read() as txn:
        raw = txn.get_blob(IDEMPOTENCY_BUCKET, name)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


class Runs:
    """Starts runs for the server; holds the in-process lock of each idempotency key in use."""

    def __init__(self, host: Host, scheduler: Any, max_wait_s: float) -> None:
        self.host = host
        self.scheduler = scheduler
        self.max_wait_s = max_wait_s
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    async def create(self, request: Request) -> Response:
        """Start a run: body ``{"agent", "input"?, "fuel"?, "on_behalf_of"?, "wait"?}``, header ``Idempotency-Key``."""
        who = require(request, "runs:write")
        body = await json_object(request)
        ref = body.get("agent")
        if not isinstance(ref, str) or not ref or len(ref) > 512:
            raise InvalidInput("'agent' must name the agent to run: name, name@tag or sha256:<digest>")
        payload = body.get("input", {})
        fuel = body.get("fuel")
        if fuel is not None and (isinstance(fuel, bool) or not isinstance(fuel, int) or fuel < 0):
            raise InvalidInput("'fuel' must be a non-negative integer")
        on_behalf_of = optional_string(body, "on_behalf_of", limit=256)  # the principal the agent acts for
        wait = None if body.get("wait") is None else number(body["wait"], "'wait'", low=0, high=self.max_wait_s)
        key = request.headers.get("idempotency-key")
        if key is not None and (not key or len(key) > _KEY_MAX or not key.isprintable()):
            raise InvalidInput(f"Idempotency-Key must be 1-{_KEY_MAX} printable characters")
        b, started_as = resolve(self.host, ref, who.tenant)
        if key is None:
            agent_id, drive = await self._start(b, payload, fuel, on_behalf_of, who.tenant, None, started_as,
                                                bool(wait))
            status = 201
        else:  # the request's fingerprint (canonical JSON hashed) only where a key needs it
            fingerprint = audit.digest({"agent": ref, "digest": b.digest, "input": payload, "fuel": fuel,
                                        **({"on_behalf_of": on_behalf_of} if on_behalf_of is not None else {})})
            agent_id, drive, status = await self._start_once(b, payload, fuel, on_behalf_of, who.tenant, key,
                                                             fingerprint, started_as, bool(wait))
        if wait:  # the record the wait ended on is the answer (not read again), with its drive's log lines
            rec = await agents_routes.wait_until_stopped(self.host, self.scheduler, agent_id, wait, drive)
            if rec.get("status") not in TERMINAL | PARKED:  # those are written by a synced commit
                await self.host.settle()  # a run still going: its spawn synced before the reply names it
            return json_response(owned(rec, agent_id, who), status)
        if status == 200:  # an idempotent retry may name a waiting request's spawn, not yet synced
            await self.host.settle()
        return json_response(owned_agent(self.host, agent_id, who), status)

    async def start(self, b: Bundle, payload: Any, tenant: str, started_as: dict[str, Any]) -> str:
        """Start a run without an idempotency key and drive it in the background (an MCP call)."""
        agent_id, _ = await self._start(b, payload, None, None, tenant, None, started_as, waits=False)
        return agent_id

    async def _start(self, b: Bundle, payload: Any, fuel: int | None, on_behalf_of: str | None, tenant: str,
                     key: tuple[str, str] | None, started_as: dict[str, Any], waits: bool) -> tuple[str, Drive | None]:
        """Spawn and drive; ``waits``: the request waits for the run, whose next commit (or the
        reply's :meth:`~host.runtime.host.Host.settle`) syncs the spawn: one sync, not two."""
        also = None
        if key is not None:
            name, fingerprint = key

            def also(txn: Any, agent_id: str) -> None:  # in the spawn's own transaction
                txn.put_blob(IDEMPOTENCY_BUCKET, name, json.dumps(
                    {"fingerprint": fingerprint, "agent_id": agent_id, "t": time.time()}).encode())
        try:
            # Handed to the fleet's work queue, the spawn is left unclaimed: the host that takes it claims it.
            agent_id, drive = await self.host.start(b, payload, fuel=fuel, on_behalf_of=on_behalf_of, tenant=tenant,
                                                    also=also, started_as=started_as, sync="later" if waits else "now",
                                                    claim=not self.scheduler.queued)
        except TorporError as exc:
            if exc.code == "invalid_config" and "input" in str(exc):  # the spawn's check of the input
                raise InvalidInput(str(exc)) from None
            raise
        return agent_id, self.scheduler.drive(agent_id, drive)

    async def _start_once(self, b: Bundle, payload: Any, fuel: int | None, on_behalf_of: str | None, tenant: str, key: str,
                          fingerprint: str, started_as: dict[str, Any], waits: bool) -> tuple[str, Drive | None, int]:
        name = _key_name(tenant, key)
        lock, users = self._locks.get(name, (anyio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                found = _stored_key(self.host, name)
                if found is not None:
                    if found.get("fingerprint") != fingerprint:
                        raise IdempotencyConflict("this Idempotency-Key was used for a different request "
                                                  "(another agent, input or fuel); use a new key")
                    return str(found["agent_id"]), None, 200
                agent_id, drive = await self._start(b, payload, fuel, on_behalf_of, tenant, (name, fingerprint),
                                                    started_as, waits)
                return agent_id, drive, 201
        finally:
            lock, users = self._locks[name]
            if users <= 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


def routes(runs: Runs) -> list[Route]:
    return [Route("/v1/runs", runs.create, methods=["POST"], name="create_run")]
