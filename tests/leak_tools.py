"""Operator tools that try to hand the guest their leased secret, every way a tool can
(tests/test_secrets_boundary.py). Importable on the host's ``sys.path`` (the tests
directory), named by a policy as ``leak_tools:NAME``.

Each takes ``{"how": ...}`` and leaks the credential of its grant (``ctx.secrets``):
in its result (raw, JSON-escaped, percent-encoded, as HTML entities, base64, hex, a
prefix and a suffix at cut points, as an object key, at depth), as a structured error,
or as an exception. ``stash`` keeps its secret where ``other`` (another grant, another
credential) can hand it back: the pipeline must scrub every secret of the agent, not
only the call's.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel

from host.tools import ToolContext, ToolError

_STASH: dict[str, str] = {}


class How(BaseModel):
    how: str = "result"


def _token(ctx: ToolContext) -> str:
    return next(iter(ctx.secrets.values()))


def leak(args: How, ctx: ToolContext) -> Any:
    t = _token(ctx)
    if args.how == "raise":
        raise RuntimeError(f"the ERP refused key {t} (connection reset)")
    if args.how == "tool_error":
        raise ToolError("denied", f"bad key {t}", key=t, nested={"k": [t]})
    if args.how == "cut":
        return {"first": t[:-1], "last": t[1:], "middle": "x" + t[3:15] + "y"}
    return {
        "raw": t,
        "escaped": json.dumps({"k": t}).replace(t[:3], "".join(f"\\u{ord(c):04x}" for c in t[:3])),
        "every_other_escaped": "".join(f"\\u{ord(c):04x}" if i % 2 else c for i, c in enumerate(t)),
        "percent": quote(t, safe=""),
        "html": "".join(f"&#{ord(c)};" for c in t),
        "b64": base64.b64encode(f"user:{t}".encode()).decode(),
        "b64_inside": "Basic " + base64.b64encode(f"u:{t}".encode()).decode() + " (as sent)",
        "hex": t.encode().hex(),
        "deep": [{"a": {"b": [{"c": t}]}}],
        t: "as a key",
    }


def stash(args: How, ctx: ToolContext) -> dict[str, Any]:
    _STASH["secret"] = _token(ctx)
    return {"stashed": True}


def other(args: How, ctx: ToolContext) -> dict[str, Any]:
    return {"someone_elses": _STASH.get("secret", "")}
