"""``GET /openapi.json``: the API described from the routes themselves.

Each route's path, method and name come from the Starlette router, its summary from the
endpoint's docstring, and what it needs (scope, body, answers) from :data:`DETAILS`, keyed
by route name; a route without an entry there is described with what the router knows,
so the document never omits a route, and a test compares the two.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.routing import BaseRoute, Mount, Route

ERROR = {"$ref": "#/components/schemas/Error"}
_PARAM = re.compile(r"{([^}:]+)(?::[^}]+)?}")

#: name -> (scope, request body schema or None, status of success)
DETAILS: dict[str, tuple[str | None, dict[str, Any] | None, int]] = {
    "create_run": ("runs:write", {
        "type": "object", "required": ["agent"],
        "properties": {"agent": {"type": "string", "description": "name, name@tag or sha256:<hex>"},
                       "input": {"description": "the agent's input (JSON)"},
                       "fuel": {"type": "integer", "minimum": 0},
                       "on_behalf_of": {"type": "string", "maxLength": 256,
                                        "description": "the principal the agent acts for"},
                       "wait": {"type": "number", "minimum": 0, "description": "seconds to wait for the agent"}}},
        201),
    "list_agents": ("runs:read", None, 200),
    "get_agent": ("runs:read", None, 200),
    "inspect_agent": ("runs:read", None, 200),
    "wait_agent": ("runs:read", None, 200),
    "agent_events": ("runs:read", None, 200),
    "list_approvals": ("runs:read", None, 200),
    "approve_agent": ("approvals:write", {"type": "object", "properties": {"note": {"type": "string"}}}, 200),
    "deny_agent": ("approvals:write", {"type": "object", "required": ["reason"],
                                       "properties": {"reason": {"type": "string"}}}, 200),
    "resume_agent": ("runs:write", None, 202),
    "fork_agent": ("runs:write", {"type": "object", "required": ["checkpoint"],
                                  "properties": {"checkpoint": {"type": "integer", "minimum": 0}}}, 201),
    "resolve_agent": ("approvals:write", {
        "type": "object", "description": "exactly one of retry, result, fail", "required": [],
        "oneOf": [{"required": ["retry"]}, {"required": ["result"]}, {"required": ["fail"]}],
        "properties": {"retry": {"type": "boolean", "description": "run the call again (it did not take effect)"},
                       "result": {"description": "the call's result (JSON): it did take effect"},
                       "fail": {"type": "string", "description": "fail the agent, for this reason"}}}, 200),
    "agent_logs": ("runs:read", None, 200),
    "verify_audit": ("admin", None, 200),
    "agent_audit": ("runs:read", None, 200),
    "verify_agent_audit": ("runs:read", None, 200),
    "healthz": (None, None, 200),
    "readyz": (None, None, 200),
    "openapi": ("runs:read", None, 200),
    "metrics": ("admin", None, 200),
    "push_bundle": ("registry:write", {"type": "string", "format": "binary",
                                       "description": "the bundle file (application/octet-stream)"}, 201),
    "list_bundles": ("runs:read", None, 200),
    "show_bundle": ("runs:read", None, 200),
    "tag_bundle": ("registry:write", {"type": "object", "required": ["digest"],
                                      "properties": {"digest": {"type": "string", "description": "sha256:<hex>"}}},
                   200),
    "diff_bundles": ("runs:read", None, 200),
}

#: name -> the media type of a success that is not JSON.
MEDIA: dict[str, str] = {"metrics": "text/plain; version=0.0.4"}

#: name -> the query parameters of the route: (name, required, description).
QUERY: dict[str, tuple[tuple[str, bool, str], ...]] = {
    "agent_logs": (("after", False, "the last line number seen (default -1: from the oldest kept)"),
                   ("limit", False, "at most this many lines (1-1000, default 1000)"),
                   ("wait", False, "seconds to wait for a line after 'after' (long poll; capped)")),
    "verify_audit": (("agent", False, "one chain: an agent of the token's tenant (scope runs:read) or a host "
                                      "chain such as host.gateway (admin); default the whole store (admin)"),),
    "wait_agent": (("timeout", False, "seconds to wait (default 30; capped)"),),
    "push_bundle": (("name", False, "the registry name (default: the agent's name in its policy)"),
                    ("tag", False, "a tag to move to the pushed version")),
    "diff_bundles": (("a", True, "a reference: name, name@tag or sha256:<hex>"),
                     ("b", True, "a reference: name, name@tag or sha256:<hex>")),
}


def _flatten(routes: list[BaseRoute], prefix: str = "") -> list[Route]:
    out: list[Route] = []
    for r in routes:
        if isinstance(r, Route):
            if not r.include_in_schema:  # the console's pages: not the API
                continue
            if prefix:
                r = Route(prefix + r.path, r.endpoint, methods=list(r.methods or ()), name=r.name)
            out.append(r)
        elif isinstance(r, Mount):
            out.extend(_flatten(list(r.routes), prefix + r.path))
    return out


def document(routes: list[BaseRoute], *, version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for route in _flatten(routes):
        scope, body, ok = DETAILS.get(route.name, ("runs:read", None, 200))
        doc = (route.endpoint.__doc__ or route.name).strip().splitlines()[0]
        for method in sorted(m for m in (route.methods or ()) if m != "HEAD"):
            op: dict[str, Any] = {
                "operationId": route.name, "summary": doc,
                "parameters": [*({"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                                 for p in _PARAM.findall(route.path)),
                               *({"name": q, "in": "query", "required": req, "description": what,
                                  "schema": {"type": "string"}} for q, req, what in QUERY.get(route.name, ()))],
                "responses": {str(ok): {"description": "success",
                                        **({"content": {MEDIA[route.name]: {"schema": {"type": "string"}}}}
                                           if route.name in MEDIA else {})},
                              "default": {"description": "an error",
                                          "content": {"application/json": {"schema": ERROR}}}},
            }
            if scope is None:
                op["security"] = []  # open: the gateway lets it through without a token
                op["description"] = "Open: no operator token needed (a load balancer's probe)."
            else:
                op["x-torpor-scope"] = scope
                op["description"] = f"Needs an operator token with the scope `{scope}` (or `admin`)."
            if body is not None:
                binary = body.get("format") == "binary"  # an upload (a bundle file), not JSON
                op["requestBody"] = {"required": binary or "required" in body,
                                     "content": {"application/octet-stream" if binary else "application/json":
                                                 {"schema": body}}}
            paths.setdefault(route.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Torpor", "version": version,
                 "description": "Start, watch and decide sandboxed agents (`torpor serve`)."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}},
        },
        "security": [{"operatorToken": []}],
    }
