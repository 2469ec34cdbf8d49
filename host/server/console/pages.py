"""The console's pages: server-rendered HTML over the same runtime the ``/v1`` API serves.

Every page but the login needs a live session (:mod:`host.server.console.sessions`) and the
scope the API route of the same data needs (``runs:read`` to look, ``approvals:write`` to
decide); a page without one sends the browser to the login, saying why. Every form
posts the session's CSRF token, checked before anything else (``403`` without it). An
agent, a bundle or a version of another tenant does not exist here, as in the API.

The pages are Jinja2 templates with autoescaping on for everything: what an agent wrote
(its output, log lines, tool arguments and answers), agent and tool names, denial reasons
and notes are shown as text, never as markup. Every answer also carries a
Content-Security-Policy allowing only this server's own script and style files, so even a
missed escape could not run a script.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from host.errors import Forbidden, InvalidInput, RateLimited, TorporError, Unauthenticated
from host.server import metrics as metrics_mod
from host.server.agents import MOVING
from host.server.console import views
from host.server.console.sessions import COOKIE, LOGIN_COOKIE, Session, Sessions, same
from host.server.gateway import Principal, TokenBuckets
from host.server.inputs import owned_agent, tenant_of
from host.server.responses import STATUS, code_of
from host.trust import audit
from policies import PolicyError
from snapshots.errors import SnapshotError, StoreError

HERE = Path(__file__).resolve().parent
#: The files under /console/static/, read once (nothing else is served from the disk).
STATIC = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
#: Headers of every page: no framing, no inline script or style, nothing cached.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; connect-src 'self'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
#: The longest note or reason a form takes (as the API's bodies).
NOTE_MAX = 4096
ANSWER_MAX = 65536  # the longest answer to a question a form takes
#: Timeline rows a page shows at most (a long conversation's log is cut in the middle, and says so).
MAX_ROWS = 2000
#: Fields of a form body read at most (a form is small; the gateway's body cap applies as well).
FORM_MAX_FIELDS = 16

Handler = Callable[[Request], Awaitable[Response]]


class Console:
    """The console of one server (``state``: the server's :class:`~host.server.app.ServerState`)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.host = state.host
        self.sessions = Sessions(self.host.store)
        cfg = state.config
        self.per_token = TokenBuckets(cfg.token_rate, cfg.token_burst)
        self.logins = TokenBuckets(cfg.anonymous_rate, cfg.anonymous_burst)  # login attempts per address
        # autoescape=True: every template, every value (a missing field of an odd record renders empty).
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                      trim_blocks=True, lstrip_blocks=True)
        self.env.filters["when"] = _when
        self.env.filters["took"] = views.duration
        self.static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}

    # -- plumbing --------------------------------------------------------------------------------
    def render(self, request: Request, template: str, status: int = 200, session: Session | None = None,
               **context: Any) -> Response:
        html = self.env.get_template(template).render(
            session=session, who=session.principal if session else None, path=request.url.path, **context)
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def page(self, handler: Callable[[Request, Session], Awaitable[Response]], scope: str = "runs:read",
             *, post: bool = False) -> Handler:
        """A page: its session checked (else to the login), its scope and, for a form, its CSRF token."""

        async def run(request: Request) -> Response:
            try:
                session = self.sessions.get(request.cookies.get(COOKIE))
            except Unauthenticated as exc:
                if post:
                    return self.error(request, exc, None)
                return _to_login(request.url.path + (f"?{request.url.query}" if request.url.query else ""), str(exc))
            try:
                wait = self.per_token.take(session.principal.token_id)
                if wait is not None:
                    raise RateLimited(f"operator token {session.principal.token_id} is over its rate limit",
                                      retry_after=wait)
                self.require(request, session.principal, scope)
                if post:
                    form = await request.form(max_fields=FORM_MAX_FIELDS, max_files=0)
                    if not same(_field(form, "csrf"), session.csrf):
                        self._note(request, Forbidden("the form was posted without this session's CSRF token"),
                                   session.principal)
                        raise Forbidden("the form was posted without this session's CSRF token: reload the page "
                                        "and try again")
                    request.state.form = form
                return await handler(request, session)
            except (TorporError, StoreError, SnapshotError, PolicyError) as exc:
                return self.error(request, exc, session)

        return run

    def require(self, request: Request, who: Principal, scope: str) -> None:
        if not who.allows(scope):
            exc = Forbidden(f"operator token {who.token_id} lacks the scope {scope!r}")
            self._note(request, exc, who, needs=scope)
            raise exc

    def _note(self, request: Request, exc: TorporError, who: Principal | None, **extra: Any) -> None:
        refusals = getattr(self.state, "refusals", None)
        if refusals is not None:
            refusals.note(request.scope, exc, who, **extra)

    def error(self, request: Request, exc: BaseException, session: Session | None) -> Response:
        code = code_of(exc)
        status = STATUS.get(code, 400 if isinstance(exc, TorporError) else 500)
        headers = dict(HEADERS)
        if isinstance(exc, RateLimited):
            headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
        html = self.env.get_template("error.html").render(
            session=session, who=session.principal if session else None, path=request.url.path, code=code,
            message=str(exc), status=status)
        return HTMLResponse(html, status_code=status, headers=headers)

    # -- login ---------------------------------------------------------------------------------
    async def login_form(self, request: Request) -> Response:
        """The login form, with a CSRF token of its own in a cookie and in the form."""
        token = _new_token()
        response = self.render(request, "login.html", csrf=token, next=_local(request.query_params.get("next")),
                               reason=request.query_params.get("reason", "")[:200])
        response.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/console/login")
        return response

    async def login(self, request: Request) -> Response:
        """Check the token; on success a new session, its cookie, and the page asked for."""
        client = request.client.host if request.client else "-"
        try:
            wait = self.logins.take(client)
            if wait is not None:
                raise RateLimited("too many login attempts from this address", retry_after=wait)
            form = await request.form(max_fields=FORM_MAX_FIELDS, max_files=0)
            if not same(_field(form, "csrf"), request.cookies.get(LOGIN_COOKIE)):
                raise Forbidden("the login form was posted without its CSRF token: reload the login page")
            try:
                session = await anyio.to_thread.run_sync(lambda: self.sessions.login(_field(form, "token") or ""))
            except Unauthenticated as exc:
                self._note(request, exc, None)
                return self.render(request, "login.html", 401, csrf=_field(form, "csrf"),
                                   next=_local(_field(form, "next")), reason=str(exc))
        except TorporError as exc:
            if not isinstance(exc, RateLimited):
                self._note(request, exc, None)
            return self.error(request, exc, None)
        response = RedirectResponse(_local(_field(form, "next")) or "/", status_code=303, headers=HEADERS)
        response.set_cookie(COOKIE, session.sid, max_age=int(self.sessions.max_s), httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/console/login")
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        self.sessions.end(session.sid)
        response = RedirectResponse("/console/login?reason=" + quote("logged out"), status_code=303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.static:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(self.static[name], media_type=STATIC[name],
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    # -- agents --------------------------------------------------------------------------------
    async def agents(self, request: Request, session: Session) -> Response:
        """The tenant's agents: counts by status, filters, stalled ones flagged."""
        who = session.principal
        rows = [r for r in await anyio.to_thread.run_sync(self.host.list_agents) if tenant_of(r) == who.tenant]
        q = request.query_params
        status, name, version = (q.get(k, "").strip()[:200] for k in ("status", "name", "version"))
        counts = views.counts(rows)
        shown = [r for r in rows if (not status or r.get("status") == status or (status == "stalled" and r.get("stalled")))
                 and (not name or name.lower() in str(r.get("name", "")).lower())
                 and (not version or _version_matches(r, version))]
        shown.sort(key=lambda r: float(r.get("created_at") or 0), reverse=True)
        stalled = sum(1 for r in rows if r.get("stalled"))
        return self.render(request, "agents.html", session=session, rows=shown[:500], total=len(shown),
                           counts=counts, stalled=stalled, status_filter=status, name=name, version=version,
                           chart=views.bars(counts))

    async def agent(self, request: Request, session: Session) -> Response:
        """One agent's timeline: every call with its arguments, answer and decision, checkpoints,
        approvals, resumes, fuel, tokens and times; a chart of it; approve or deny when it waits."""
        aid = request.path_params["agent_id"]
        owned_agent(self.host, aid, session.principal)

        def read() -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, Any]]:
            info = self.host.inspect(aid)
            records = self.host.audit_records(aid)
            with self.host.store.read() as txn:
                journal = dict(txn.iter_journal(aid))
            return info, records, journal

        info, records, journal = await anyio.to_thread.run_sync(read)
        tl = views.timeline(info, records, journal, time.time())
        cut = max(0, len(tl.items) - MAX_ROWS)
        if cut:  # the chart keeps every call; the table its beginning and its end
            half = MAX_ROWS // 2
            tl.items = [*tl.items[:half], views.Item(tl.items[half].t, "cut", f"… {cut:,} rows not shown: the "
                                                     "audit chain page has them all", "other"),
                        *tl.items[-half:]]
        logs = self.state.scheduler.logs.get(aid) if hasattr(self.state.scheduler, "logs") else None
        approval = None
        if info.get("status") == "waiting_approval":
            approval = next((a for a in self.host.approvals() if a.get("agent_id") == aid), None)
        return self.render(request, "agent.html", session=session, a=info, tl=tl, chart=tl.chart(),
                           output=views.shown(info.get("output")) if info.get("output") is not None else None,
                           input=views.shown(info.get("input")) if "input" in info else None,
                           error=info.get("error"), logs=logs or [], approval=approval,
                           approval_args=views.shown(approval["call"].get("args")) if approval else None,
                           moving=info.get("status") in MOVING)

    async def audit_page(self, request: Request, session: Session) -> Response:
        """The agent's audit chain, record by record; the verify button posts to :meth:`verify`."""
        aid = request.path_params["agent_id"]
        rec = owned_agent(self.host, aid, session.principal)
        records = await anyio.to_thread.run_sync(lambda: self.host.audit_records(aid))
        lines = list(zip(audit.trace_lines(records), records, strict=True))
        return self.render(request, "audit.html", session=session, a=rec, lines=lines, report=None)

    async def verify(self, request: Request, session: Session) -> Response:
        aid = request.path_params["agent_id"]
        rec = owned_agent(self.host, aid, session.principal)

        def check() -> tuple[Any, list[dict[str, Any]]]:
            return audit.verify_store(self.host.store, agent_id=aid), self.host.audit_records(aid)

        report, records = await anyio.to_thread.run_sync(check)
        lines = list(zip(audit.trace_lines(records), records, strict=True))
        return self.render(request, "audit.html", session=session, a=rec, lines=lines, report=report.to_dict(),
                           summary=report.summary())

    # -- approvals -------------------------------------------------------------------------------
    async def approvals(self, request: Request, session: Session) -> Response:
        who = session.principal
        mine = {r["agent_id"] for r in await anyio.to_thread.run_sync(self.host.list_agents)
                if r.get("status") == "waiting_approval" and tenant_of(r) == who.tenant}
        pending = [{**a, "args_text": views.shown(a.get("call", {}).get("args"))}
                   for a in self.host.approvals() if a.get("agent_id") in mine]
        return self.render(request, "approvals.html", session=session, pending=pending,
                           can_decide=who.allows("approvals:write"))

    async def decide(self, request: Request, session: Session) -> Response:
        """Approve or deny the call the agent waits on; it resumes in the background."""
        aid = request.path_params["agent_id"]
        who = session.principal
        owned_agent(self.host, aid, who)
        form = request.state.form
        note = (_field(form, "note") or "").strip()
        if len(note) > NOTE_MAX:
            raise InvalidInput(f"a note is at most {NOTE_MAX} characters")
        by = f"token:{who.token_id}"
        if request.path_params["decision"] == "approve":
            answer = _answer(_field(form, "answer"))  # a question's answer (an MCP server's elicitation)
            await anyio.to_thread.run_sync(lambda: self.host.decide_approve(aid, note=note or None, by=by,
                                                                            answer=answer))
        else:
            if not note:
                raise InvalidInput("a denial needs a reason (the agent is told it)")
            await anyio.to_thread.run_sync(lambda: self.host.decide_deny(aid, reason=note, by=by))
        self.state.scheduler.resume(aid)
        return RedirectResponse(f"/console/agents/{quote(aid)}", status_code=303, headers=HEADERS)

    # -- registry --------------------------------------------------------------------------------
    async def registry(self, request: Request, session: Session) -> Response:
        """The tenant's bundles: versions and tags; a diff of two references' policies."""
        tenant = session.principal.tenant
        reg = self.host.registry
        names = await anyio.to_thread.run_sync(lambda: reg.names(tenant=tenant))
        detail = await anyio.to_thread.run_sync(lambda: [reg.versions(n["name"], tenant=tenant) for n in names])
        a, b = request.query_params.get("a", "").strip()[:300], request.query_params.get("b", "").strip()[:300]
        diff = diff_error = None
        if a and b:
            try:
                diff = await anyio.to_thread.run_sync(lambda: reg.diff(a, b, tenant=tenant))
            except (TorporError, PolicyError) as exc:
                diff_error = f"{code_of(exc)}: {exc}"
        return self.render(request, "registry.html", session=session, names=detail, a=a, b=b, diff=diff,
                           diff_error=diff_error)

    # -- health ----------------------------------------------------------------------------------
    async def health(self, request: Request, session: Session) -> Response:
        """Readiness and the headline metrics as small charts (server-wide ones for ``admin``)."""
        who = session.principal
        store = await self.state.store_probe.check()
        rows = [r for r in await anyio.to_thread.run_sync(self.host.list_agents) if tenant_of(r) == who.tenant]
        counts = views.counts(rows)
        charts: list[dict[str, Any]] = [{"title": f"agents of {who.tenant} by status", "chart": views.bars(counts)}]
        m = getattr(request.app.state, "metrics", None)
        if who.allows("admin") and m is not None:
            for title, hist in (("spawn latency", m.spawn_seconds), ("suspend latency", m.suspend_seconds),
                                ("resume latency", m.resume_seconds), ("commit latency", m.commit_seconds)):
                bounds = [*(views.duration(b) for b in metrics_mod.LATENCY_BUCKETS), "more"]
                charts.append({"title": f"{title} ({sum(hist.counts):,})",
                               "chart": views.bars({f"≤ {k}" if k != "more" else "more": v
                                                    for k, v in zip(bounds, hist.counts, strict=True) if v})})
            outcome: dict[str, float] = {}
            for (_, out), n in dict(m.tool_calls.values).items():
                outcome[out] = outcome.get(out, 0) + n
            charts.append({"title": "tool calls by outcome", "chart": views.bars(outcome)})
            charts.append({"title": "HTTP requests by status", "chart": views.bars(_by_status(m))})
        return self.render(request, "health.html", session=session, store=store.to_dict(),
                           ready=self.state.ready and not self.state.draining, driving=len(self.state.scheduler.active),
                           warm=self.host.warm_waiting, charts=charts, admin=who.allows("admin"))

    @staticmethod
    def owns(path: str) -> bool:
        return owns(path)

    # -- routes ------------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        def r(path: str, endpoint: Handler, method: str, name: str) -> Route:
            return Route(path, endpoint, methods=[method], name=name, include_in_schema=False)

        return [
            r("/", self.page(self.agents), "GET", "console_agents"),
            r("/console/login", self.login_form, "GET", "console_login_form"),
            r("/console/login", self.login, "POST", "console_login"),
            r("/console/logout", self.page(self.logout, post=True), "POST", "console_logout"),
            r("/console/static/{name}", self.static_file, "GET", "console_static"),
            r("/console/agents/{agent_id}", self.page(self.agent), "GET", "console_agent"),
            r("/console/agents/{agent_id}/audit", self.page(self.audit_page), "GET", "console_audit"),
            r("/console/agents/{agent_id}/audit/verify", self.page(self.verify, post=True), "POST",
              "console_verify"),
            r("/console/agents/{agent_id}/{decision:str}", self.page(self._decision, "approvals:write", post=True),
              "POST", "console_decide"),
            r("/console/approvals", self.page(self.approvals), "GET", "console_approvals"),
            r("/console/registry", self.page(self.registry), "GET", "console_registry"),
            r("/console/health", self.page(self.health), "GET", "console_health"),
            r("/console/{rest:path}", self.page(self._missing), "GET", "console_missing"),  # last: an HTML 404
        ]

    async def _missing(self, request: Request, session: Session) -> Response:
        raise TorporError(f"no console page {request.url.path[:200]}", code="not_found")

    async def _decision(self, request: Request, session: Session) -> Response:
        if request.path_params["decision"] not in ("approve", "deny"):
            raise TorporError("no such action", code="not_found")
        return await self.decide(request, session)


def owns(path: str) -> bool:
    """Whether the console answers ``path`` (and checks its own session there, not a bearer token)."""
    return path == "/" or path.startswith("/console/")


def _field(form: Any, name: str) -> str | None:
    value = form.get(name)
    return value if isinstance(value, str) else None


def _local(target: str | None) -> str:
    """``target`` if it is a path of this server's console (never another site: an open redirect)."""
    if not target:
        return ""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return ""
    return target if owns(parts.path) and not parts.path.startswith("/console/log") else ""


def _to_login(target: str, reason: str) -> Response:
    url = "/console/login?next=" + quote(_local(target) or "/", safe="") + "&reason=" + quote(reason, safe="")
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def _new_token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(t))) + f".{int(float(t) % 1 * 1000):03d}Z"


def _version_matches(rec: dict[str, Any], text: str) -> bool:
    """A version filter: a bundle digest prefix, or the reference it was started as (``name@tag``)."""
    t = text.lower().removeprefix("sha256:")
    if str(rec.get("bundle_digest", "")).startswith(t):
        return True
    started = rec.get("started_as")
    return isinstance(started, dict) and text in (str(started.get("ref")), str(started.get("tag")))


def _by_status(m: Any) -> dict[str, float]:
    out: dict[str, float] = {}
    for (_, _, status), n in dict(m.http.values).items():
        out[status] = out.get(status, 0) + n
    return dict(sorted(out.items()))


def _answer(text: str | None) -> Any:
    """The answer field of a decision form as JSON (None when the form has none)."""
    if text is None or not text.strip():
        return None
    from host.sandbox import guest_json

    if len(text) > ANSWER_MAX:
        raise InvalidInput(f"an answer is at most {ANSWER_MAX} characters")
    try:
        return guest_json.parse(text)
    except guest_json.PoisonValue as exc:
        raise InvalidInput(f"the answer is not valid JSON: {exc}") from None
