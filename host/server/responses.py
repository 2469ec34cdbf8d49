"""Every answer the server gives in JSON, errors above all: ``{"error": {"code", "message"}}``.

The one place an exception becomes an HTTP status: the codes are the CLI's
(``host.errors`` classes' ``code``), so a script reads the same code from ``torpor
--json`` and from the API.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import orjson
from starlette.responses import Response

from host.errors import RateLimited, TorporError

_log = logging.getLogger("torpor.server")

#: HTTP status by error code; a ``TorporError`` with another code is a 400 (the request
#: asked for something the host refuses), anything else a 500.
STATUS: dict[str, int] = {
    "invalid_input": 400, "invalid_bundle": 400, "invalid_config": 400, "mcp_server_not_configured": 400, "invalid_policy": 400,
    "bundle_code_refused": 400, "unauthenticated": 401, "forbidden": 403,
    "agent_not_found": 404, "bundle_not_found": 404, "not_found": 404, "method_not_allowed": 405,
    "checkpoint_not_found": 404,
    "invalid_state": 409, "not_due": 409, "idempotency_conflict": 409, "payload_too_large": 413,
    "rate_limited": 429, "internal": 500, "shutting_down": 503, "store_full": 503, "store_unavailable": 503,
    # the server's own bytes are damaged: its fault, not the request's (the message names the record)
    "record_corrupt": 500, "snapshot_corrupt": 500, "store_error": 500,
    "store_corrupt": 503, "store_suspect": 503, "store_flush_failed": 503,
}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON of a runtime dict (records hold only JSON values; ``default=str`` for the odd float key)."""
    return Response(encode(data), status_code=status, headers=headers, media_type="application/json")


def encode(data: Any) -> bytes:
    """Compact JSON of ``data``, by orjson (an agent record in about 2 µs where the standard
    library takes about 17: every answer is one); what it refuses (an integer past 64 bits)
    by the standard library, so any value the API answered before is answered the same."""
    try:
        return orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(data, default=str, separators=(",", ":")).encode()


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def code_of(exc: BaseException) -> str:
    """The code an exception is answered with: its own ``code`` (the host's errors, and the
    store's, snapshots' and policies' errors carry one, as the CLI prints them), else
    ``internal``."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else "internal"


def error_response(exc: BaseException) -> Response:
    """The JSON answer to an error; a 429 says ``Retry-After`` (whole seconds, at least 1)."""
    code = code_of(exc)
    if code == "internal":
        _log.error("internal error answering a request", exc_info=exc)
        message = f"internal error ({type(exc).__name__}); the server's log has the traceback"
    else:
        message = str(exc)
    status = STATUS.get(code, 400 if isinstance(exc, TorporError) else 500)
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return json_response(error_body(code, message), status, headers)
