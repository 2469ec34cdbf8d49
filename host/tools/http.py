"""``http.fetch``: HTTP requests to the hosts a policy allows, and nowhere else.

Grant settings (``[tools."http.fetch"]``, or any ``[tools."http.NAME"]``):

``hosts``               allowlist (required): ``"api.example.com"`` (default
                        ports), ``"api.example.com:8443"``, ``"*.example.com"``,
                        ``"127.0.0.1:8080"``, ``"[::1]:8080"``.
``methods``             allowed methods; default ``["GET"]``.
``allow_private``       ``true`` or addresses/networks (``["127.0.0.1",
                        "10.0.0.0/8"]``) that may be reached although not public.
                        Without it loopback, private, link-local, CGNAT, multicast
                        and unspecified addresses are refused — after DNS
                        resolution, so a public name resolving to 127.0.0.1 is
                        refused as well.
``headers``             headers the host adds, with ``{credential}`` placeholders
                        filled from the grant's ``credentials``:
                        ``headers = { Authorization = "Bearer {crm_token}" }``.
                        The guest can neither see nor override them.
``max_redirects``       redirects followed (default 5), each re-checked against
                        the allowlist and the address rules.
``timeout``             for the whole call, redirects and body included (default 30s).
``max_response_bytes``  body cap (default 256KiB); reading stops at the cap.

Arguments: ``url`` (required), ``method`` (default GET), ``headers`` (object of
strings), one of ``body`` (text), ``body_base64`` or ``json`` (any JSON value,
sent as ``application/json``), ``max_bytes`` (a lower cap), ``truncate``
(true: a body over the cap is cut and ``truncated`` set, instead of an error).

Result: ``{"status", "headers", "url", "redirects", "bytes", "truncated"}`` and
the body as ``json`` (parsed, when the content type is JSON and it parses),
else ``body`` (UTF-8 text, with ``json_error`` when it claimed to be JSON) or
``body_base64`` (anything else).  A status of 404 or 500 is a
successful fetch (the guest decides); transport failures are structured errors
(``timeout``, ``unavailable``), refusals are ``denied`` with a ``reason_code``
(``host_not_allowed``, ``address_not_allowed``, ``method_not_allowed``,
``url_userinfo``, ``url_invalid``, ``scheme_not_allowed``,
``header_not_allowed``) and the ``rule`` that refused.

Secrets the host injected are scrubbed from everything returned (by the tool call
pipeline, for every tool: :mod:`host.trust.scrub`), so an endpoint that echoes
request headers cannot hand the guest its credential; and a secret the operator
bound to hosts is never sent to any other (``credential_host_not_allowed``).

The URL the policy judged is the URL sent: the pipeline hands the policy
:func:`canonical_args` (the URL parsed once by :func:`netguard.parse_url`, dot
segments removed, escapes of unreserved characters decoded), and the tool parses
that same canonical text into the same target.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import urljoin

import anyio
import httpx
from pydantic import BaseModel, ConfigDict, Field

from host.tools import netguard
from host.tools._net import (
    ResponseTooLarge,
    check_bound,
    grant_of,
    read_capped,
    rule,
    transport_error,
)
from host.tools._net import (
    client as new_client,
)
from host.tools.registry import ToolContext, ToolError
from policies.schema import fill_placeholders

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_BYTES = 256 << 10
DEFAULT_MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Set by the host or meaningless for a single request; a guest may not choose them.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
     "proxy-authorization", "proxy-connection", "expect"}
)
USER_AGENT = "torpor-http/1"


class FetchArgs(BaseModel):
    """Arguments of ``http.fetch`` (strict: no coercion, no unknown keys)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=netguard.MAX_URL)
    method: str = Field(default="GET", min_length=1, max_length=16)
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    body_base64: str | None = None
    json_body: Any = Field(default=None, alias="json")
    max_bytes: int | None = Field(default=None, gt=0)
    truncate: bool = False


def _guest_headers(tool: str, headers: dict[str, str], injected: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if len(headers) > 64:
        raise ToolError("invalid_args", f"{tool}: at most 64 headers")
    for k, v in headers.items():
        if not k or any(ord(c) <= 0x20 or ord(c) >= 0x7F or c in '()<>@,;:\\"/[]?={}' for c in k):
            raise ToolError("invalid_args", f"{tool}: {k!r} is not a valid header name")
        if any(c in v for c in "\r\n\0"):
            raise ToolError("invalid_args", f"{tool}: header {k!r} contains a line break or NUL")
        low = k.lower()
        if low in RESERVED_HEADERS:
            raise ToolError("denied", f"{tool}: header {k!r} is set by the host", reason_code="header_not_allowed")
        if low in injected:
            raise ToolError(
                "denied",
                f"{tool}: header {k!r} is injected by the host from the policy; the agent cannot set it",
                reason_code="header_not_allowed",
                rule=rule(tool, "headers"),
            )
        out[k] = v
    return out


def _body(tool: str, args: FetchArgs) -> tuple[bytes | None, str | None]:
    given = [x for x in ("body", "body_base64", "json_body") if getattr(args, x) is not None]
    if len(given) > 1:
        raise ToolError("invalid_args", f"{tool}: give one of body, body_base64, json")
    if args.body is not None:
        return args.body.encode(), None
    if args.body_base64 is not None:
        try:
            return base64.b64decode(args.body_base64, validate=True), None
        except (binascii.Error, ValueError):
            raise ToolError("invalid_args", f"{tool}: body_base64 is not valid base64") from None
    if args.json_body is not None:
        return json.dumps(args.json_body, separators=(",", ":")).encode(), "application/json"
    return None, None


async def fetch(args: FetchArgs, ctx: ToolContext, *, tool: str = "http.fetch") -> dict[str, Any]:
    """Perform one mediated request (see the module docstring for the rules)."""
    grant = grant_of(ctx, tool)
    hosts: tuple[str, ...] = tuple(getattr(grant, "hosts", ()) or ())
    methods = tuple(getattr(grant, "methods", ()) or ()) or ("GET",)
    allow_private = getattr(grant, "allow_private", False)
    timeout = float(getattr(grant, "timeout", None) or DEFAULT_TIMEOUT_S)
    cap = int(getattr(grant, "max_response_bytes", None) or DEFAULT_MAX_BYTES)
    if args.max_bytes is not None:
        cap = min(cap, args.max_bytes)
    max_redirects = getattr(grant, "max_redirects", None)
    max_redirects = DEFAULT_MAX_REDIRECTS if max_redirects is None else int(max_redirects)

    method = args.method.upper()
    if method not in methods:
        raise ToolError(
            "denied",
            f"{tool}: method {method} is not allowed (allowed: {', '.join(methods)})",
            rule=rule(tool, "methods"),
            reason_code="method_not_allowed",
        )
    target = _allowed_target(tool, args.url, hosts)
    try:
        injected = {k: fill_placeholders(v, ctx.secrets) for k, v in (getattr(grant, "headers", None) or {}).items()}
    except KeyError as exc:
        raise ToolError(
            "unavailable", f"{tool}: credential {exc.args[0]!r} was not provided by the host", retryable=False,
            reason_code="credential_missing",
        ) from None
    used = [n for n in ctx.secrets if any("{" + n + "}" in v for v in (getattr(grant, "headers", None) or {}).values())]
    check_bound(tool, ctx, used, target)
    headers = _guest_headers(tool, args.headers, {k.lower() for k in injected})
    body, content_type = _body(tool, args)
    if content_type and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = content_type
    headers.setdefault("User-Agent", USER_AGENT)

    origin = target.origin
    chain: list[str] = []
    try:
        with anyio.fail_after(timeout):
            async with new_client(timeout) as client:
                while True:
                    send_headers = dict(headers)
                    if target.origin == origin:  # credentials never follow a redirect to another origin
                        send_headers.update(injected)
                    response = await _send(client, tool, target, allow_private, method, send_headers, body)
                    try:
                        location = response.headers.get("location")
                        if response.status_code in REDIRECTS and location is not None and len(chain) < max_redirects:
                            chain.append(target.url)
                            target = _redirect_target(tool, target, location, hosts)
                            if response.status_code == 303 or (
                                response.status_code in (301, 302) and method not in ("GET", "HEAD")
                            ):
                                method, body = "GET", None
                                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                            continue
                        truncated = False
                        try:
                            data = await read_capped(response, cap)
                        except ResponseTooLarge as big:
                            if not args.truncate:
                                raise ToolError(
                                    "result_too_large",
                                    f"{tool}: the response body is larger than {cap} bytes "
                                    "(pass truncate: true to receive the first bytes)",
                                    limit=cap,
                                    status=response.status_code,
                                    reason_code="response_too_large",
                                ) from None
                            data, truncated = big.data, True
                        return _result(response, target, chain, data, truncated)
                    finally:
                        await response.aclose()
    except TimeoutError:
        raise ToolError("timeout", f"{tool}: {target.netloc} did not answer within {timeout:g}s", retryable=True) from None
    except httpx.HTTPError as exc:
        raise transport_error(tool, exc, target.netloc) from None


def canonical_args(args: Any) -> Any:
    """The arguments as the tool will use them: the URL in its canonical form (parsed once).

    The policy decides on these (:meth:`host.runtime.tool_call.ToolCallPipeline.request`)
    and the tool is handed the same, so a path rule cannot be stepped out of with
    ``/./``, ``/../`` or ``%2e%2e``. A URL that does not parse is left as it is: the tool
    refuses it.
    """
    if isinstance(args, dict) and isinstance(args.get("url"), str):
        try:
            url = netguard.parse_url(args["url"]).url
        except ToolError:
            return args
        if url != args["url"]:
            return {**args, "url": url}
    return args


def _allowed_target(tool: str, url: str, hosts: tuple[str, ...]) -> netguard.Target:
    target = netguard.parse_url(url, rule=rule(tool, "hosts"))
    if not netguard.host_allowed(target, hosts):
        raise ToolError(
            "denied",
            f"{tool}: {target.netloc} is not on the allowlist ({', '.join(hosts) or 'empty'})",
            rule=rule(tool, "hosts"),
            reason_code="host_not_allowed",
            host=target.netloc,
        )
    return target


def _redirect_target(tool: str, current: netguard.Target, location: str, hosts: tuple[str, ...]) -> netguard.Target:
    try:
        nxt = _allowed_target(tool, urljoin(current.url, location.strip()), hosts)
    except ToolError as err:
        raise ToolError(
            "denied",
            f"{tool}: {current.netloc} redirected to a refused URL: {err}",
            rule=err.details.get("rule", rule(tool, "hosts")),
            reason_code="redirect_not_allowed",
            cause=err.details.get("reason_code"),
        ) from None
    return nxt


async def _send(
    client: httpx.AsyncClient,
    tool: str,
    target: netguard.Target,
    allow_private: Any,
    method: str,
    headers: dict[str, str],
    body: bytes | None,
) -> httpx.Response:
    """Send to a checked address of the target, trying them in order until one connects."""
    addrs = await netguard.checked_addresses(target, allow_private, rule=rule(tool, "allow_private"))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.ip is None else {}
    last: Exception | None = None
    for addr in addrs:
        request = client.build_request(
            method, target.pinned_url(addr), headers={**headers, "Host": target.netloc}, content=body,
            extensions=extensions,
        )
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:
            last = exc
    assert last is not None
    raise last


def _result(
    response: httpx.Response, target: netguard.Target, chain: list[str], data: bytes, truncated: bool,
) -> dict[str, Any]:
    headers: dict[str, str] = {}
    for k, v in response.headers.multi_items():
        k = k.lower()
        headers[k] = f"{headers[k]}, {v}" if k in headers else v
    out: dict[str, Any] = {
        "status": response.status_code,
        "headers": headers,
        "url": target.url,
        "redirects": chain,
        "bytes": len(data),
        "truncated": truncated,
    }
    try:
        out["body"] = data.decode("utf-8")
    except UnicodeDecodeError:
        out["body_base64"] = base64.b64encode(data).decode()
    ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if "body" in out and (ctype == "application/json" or ctype.endswith("+json")) and not truncated:
        try:
            out["json"] = json.loads(out["body"], parse_constant=_no_constant)
            del out["body"]  # the parsed form replaces the text: half the size against the 1 MiB result cap
        except ValueError as exc:
            out["json_error"] = str(exc)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
