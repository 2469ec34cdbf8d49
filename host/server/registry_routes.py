"""The registry over HTTP: push, list, show, tag and diff bundles, per tenant.

``POST /v1/bundles?name=NAME[&tag=TAG]`` (the bundle file as the body),
``GET /v1/bundles``, ``GET /v1/bundles/{name}``, ``PUT /v1/bundles/{name}/tags/{tag}``
(``{"digest"}``) and ``GET /v1/bundles/diff?a=REF&b=REF``. Each answers with the very
dict :class:`~host.runtime.registry.Registry` returns, so ``torpor --json`` prints the
same against a server as against a local store.

Scopes: ``registry:write`` to push and tag, ``runs:read`` to read. The tenant is the
token's: names, tags and digests of another tenant do not exist for it (``404
bundle_not_found``, exactly as a name nobody pushed). The gateway caps the upload
(``413``; ``ServerConfig.max_bundle_bytes``); what is inside it is checked by the one
loader of bundles in the registry's ``push`` (``400 invalid_bundle`` and the others).
Pushing validates and writes the store, so it runs on a worker thread, not the loop.
Pushes and tag moves are audited on ``host.registry`` with the token that made them.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from host.errors import InvalidInput
from host.runtime.registry import Registry
from host.server.gateway import require
from host.server.inputs import json_object
from host.server.responses import json_response

__all__ = ["RegistryRoutes", "routes"]


def _param(request: Request, name: str, *, required: bool) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise InvalidInput(f"give the query parameter {name!r} once")
    if not values:
        if required:
            raise InvalidInput(f"the query parameter {name!r} is required")
        return None
    return values[0]


class RegistryRoutes:
    """The registry's routes over one host's :class:`Registry`."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def push(self, request: Request) -> Response:
        """Store the body (a bundle file) as the latest version of ``name``, and move ``tag`` to it."""
        who = require(request, "registry:write")
        name = _param(request, "name", required=False)
        tag = _param(request, "tag", required=False)
        raw = await request.body()  # capped by the gateway as it streams in
        version = await anyio.to_thread.run_sync(
            lambda: self.registry.push(raw, name=name, tenant=who.tenant, tag=tag, by=f"token:{who.token_id}"))
        return json_response(version, 201)

    async def index(self, request: Request) -> Response:
        """Every name of the tenant: versions, latest, tags."""
        who = require(request, "runs:read")
        return json_response({"bundles": self.registry.names(tenant=who.tenant)})

    async def show(self, request: Request) -> Response:
        """One name's versions (digest, abi, tools, pushed_at, tags) and tags."""
        who = require(request, "runs:read")
        return json_response(self.registry.versions(request.path_params["name"], tenant=who.tenant))

    async def tag(self, request: Request) -> Response:
        """Point a tag at a version of the name (agents already started keep their own)."""
        who = require(request, "registry:write")
        body = await json_object(request)
        digest = body.get("digest")
        if not isinstance(digest, str):
            raise InvalidInput("the body must name the version: {\"digest\": \"sha256:<hex>\"}")
        moved = self.registry.tag(request.path_params["name"], request.path_params["tag"], digest,
                                  tenant=who.tenant, by=f"token:{who.token_id}")
        return json_response(moved)

    async def diff(self, request: Request) -> Response:
        """What the policy of ``b`` grants differently from that of ``a`` (two references)."""
        who = require(request, "runs:read")
        a = _param(request, "a", required=True)
        b = _param(request, "b", required=True)
        assert a is not None and b is not None
        # Two bundles are read and verified from the store: off the loop.
        found = await anyio.to_thread.run_sync(lambda: self.registry.diff(a, b, tenant=who.tenant))
        return json_response(found)


def routes(state: Any) -> list[BaseRoute]:
    """The registry's routes, for :func:`host.server.app.create_app` (``state.host`` is the host)."""
    api = RegistryRoutes(state.host.registry)
    return [
        Route("/v1/bundles", api.push, methods=["POST"], name="push_bundle"),
        Route("/v1/bundles", api.index, methods=["GET"], name="list_bundles"),
        # Before /v1/bundles/{name}: "diff" is a reserved name (host.runtime.registry.RESERVED_NAMES).
        Route("/v1/bundles/diff", api.diff, methods=["GET"], name="diff_bundles"),
        Route("/v1/bundles/{name}", api.show, methods=["GET"], name="show_bundle"),
        Route("/v1/bundles/{name}/tags/{tag}", api.tag, methods=["PUT"], name="tag_bundle"),
    ]
