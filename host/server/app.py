"""The server's application: routes, gateway, error answers, and the lifespan that drives agents.

:func:`create_app` builds the Starlette application around a :class:`~host.runtime.Host`.
Its lifespan opens one anyio task group in which the scheduler drives agents and the
gateway's refusals are flushed to the audit; at start the scheduler takes over what a
previous process left; at shutdown it drains (see :mod:`host.server.scheduler`).

:func:`serve` runs it under uvicorn, whose own signal handling stays in charge:
SIGTERM/SIGINT make uvicorn stop listening and wait for open requests, and our
:class:`_Server` also tells the application to refuse new work (``503 shutting_down``) and
to answer long polls and streams at once, so that the drain is not held up by them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from host.errors import ConfigError, TorporError
from host.runtime import Host
from host.server import agents, approvals, events, metrics, openapi, operate, runs
from host.server import audit as audit_routes
from host.server import logs as log_routes
from host.server.config import ServerConfig
from host.server.gateway import GatewayMiddleware, RefusalAudit, require
from host.server.health import StoreProbe
from host.server.protocol import HttpProtocol
from host.server.responses import error_body, error_response, json_response
from host.server.scheduler import Scheduler
from policies import PolicyError
from snapshots.errors import SnapshotError, StoreError

_log = logging.getLogger("torpor.server")


class ServerState:
    """What the routes and the lifespan share: the host, the scheduler, readiness."""

    def __init__(self, host: Host, config: ServerConfig) -> None:
        self.host = host
        self.config = config
        self.scheduler = Scheduler(host, work=_work_queue(host, config), work_slots=config.work_slots)
        self.refusals = RefusalAudit(host.store, config.audit_flush_s)
        self.store_probe = StoreProbe(host.store, host.store_dir)
        self.ready = False
        self.taken_over = 0
        self.console: Any = None  # host.server.console's Console, when mounted

    @property
    def draining(self) -> bool:
        return self.scheduler.draining


def _work_queue(host: Host, config: ServerConfig) -> Any:
    """The fleet's work queue, when this host is one of a fleet whose store offers one (the
    NATS store): work is then dispatched through it (``host.server.scheduler``); else None."""
    opener = getattr(host.store, "work_queue", None)
    if host.lease is None or opener is None:
        return None
    return opener(ack_wait=config.work_ack_wait or max(2.0, 2 * host.lease.lease_s))


def _extra_routes(state: ServerState) -> list[BaseRoute]:
    """Routes of the rooms other helpers own (the registry), when they are present."""
    found: list[BaseRoute] = []
    for module in ("host.server.registry_routes", "host.server.console"):
        try:
            mod = __import__(module, fromlist=["routes"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        found.extend(mod.routes(state))
    return found


def create_app(host: Host, *, config: ServerConfig | None = None) -> Starlette:
    """The ASGI application serving ``host`` (which the caller opens and closes)."""
    config = config or ServerConfig()
    state = ServerState(host, config)
    sched = state.scheduler
    run_api = runs.Runs(host, sched, config.max_wait_s)
    agent_api = agents.Agents(host, sched, config.max_wait_s)
    approval_api = approvals.Approvals(host, sched)
    event_api = events.Events(host, sched)
    audit_api = audit_routes.Audit(host)
    operate_api = operate.Operate(host, sched)
    log_api = log_routes.Logs(host, sched, config.max_wait_s)
    telemetry = metrics.Metrics(host, sched, state.refusals)
    host.observe(telemetry)  # the runtime's one observer seam: spawns, suspensions, resumes, commits

    async def healthz(request: Request) -> Response:
        """Liveness: the process answers (no token needed)."""
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Readiness: taking work, and the store can take writes (no token needed; 503 while
        starting or draining, or when the store cannot be written: see host.server.health)."""
        if state.draining:
            return json_response(error_body("shutting_down", "the server is shutting down"), 503)
        if not state.ready:
            return json_response(error_body("starting", "the server is starting"), 503)
        store = await state.store_probe.check()
        if store.problem is not None:
            body = error_body(*store.problem)
            body["store"] = store.to_dict()
            return json_response(body, 503)
        body = {"status": "ready", "agents_running": len(sched.active), "store": store.to_dict()}
        if sched.work is not None:  # a fleet host: what it published to and took from the work queue
            body["work"] = sched.work_report()
        return json_response(body)

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"], name="healthz"),
        Route("/readyz", readyz, methods=["GET"], name="readyz"),
        *runs.routes(run_api), *agents.routes(agent_api), *events.routes(event_api),
        *approvals.routes(approval_api), *audit_routes.routes(audit_api), *operate.routes(operate_api),
        *log_routes.routes(log_api),
        *telemetry.routes(), *_extra_routes(state),
    ]

    async def openapi_json(request: Request) -> Response:
        """This document: the API as the routes define it."""
        require(request, "runs:read")
        return json_response(openapi.document(app.routes))

    routes.append(Route("/openapi.json", openapi_json, methods=["GET"], name="openapi"))
    endpoint = None
    if config.mcp:  # the registry's agents as MCP tools, behind the same gateway (host/server/mcp_endpoint.py)
        from host.server.mcp_endpoint import McpEndpoint

        endpoint = McpEndpoint(host, run_api, sched)
        routes.append(Route("/mcp", endpoint.asgi, name="mcp"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            # MCP servers the agents call live on this loop, where their tool calls run (no
            # thread crossed per call), kept across runs and agents, stopped after the drain.
            # Entered before the task group and left after it: the MCP endpoint's session
            # manager holds a task group of its own, and cancel scopes must nest.
            from host.tools.mcp import SUPERVISOR as mcp_servers

            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(mcp_servers.owned_by_this_loop())
                if endpoint is not None:
                    await stack.enter_async_context(endpoint.run())
                async with anyio.create_task_group() as tg:
                    sched.attach(tg)
                    tg.start_soon(state.refusals.run)
                    tg.start_soon(sched.timers)
                    if host.lease is not None:
                        tg.start_soon(sched.fleet)
                    if sched.work is not None:
                        tg.start_soon(sched.pull_work)
                    state.taken_over = sched.take_over()
                    if state.taken_over:
                        _log.info("took over %d agents a previous process left", state.taken_over)
                    state.ready = True
                    try:
                        yield
                    finally:
                        state.ready = False
                        await sched.drain(config.drain_timeout)
                        await state.refusals.flush()
                        tg.cancel_scope.cancel()  # what still waits (a tool's I/O) stays at its last commit
        finally:
            sched.end_interrupt()  # every drive has ended: none can take the interrupt for a deadline

    async def torpor_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    async def client_gone(request: Request, exc: Exception) -> Response:
        """The client hung up before its request was read whole: there is nobody to answer,
        and nothing went wrong here (not an internal error, no traceback in the log)."""
        return Response(status_code=400)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_input")
        return json_response(error_body(code, str(exc.detail)), exc.status_code)

    # The errors that carry a code are answered where the route raised them; only an
    # error without one (a bug) reaches Starlette's outermost handler, which answers the
    # same JSON but also logs it and closes the connection.
    coded: dict[Any, Any] = {cls: torpor_error for cls in (TorporError, StoreError, SnapshotError, PolicyError)}
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={**coded, HTTPException: http_error, ClientDisconnect: client_gone,
                                        Exception: torpor_error})
    app.state.server = state
    app.state.refusals = state.refusals
    app.state.events = event_api
    app.state.metrics = telemetry
    console = getattr(state, "console", None)  # the console's pages check their own session cookie
    app.add_middleware(GatewayMiddleware, store=host.store, config=config, refusals=state.refusals,
                       draining=lambda: state.draining, own_auth=console.owns if console is not None else None)
    app.add_middleware(metrics.HttpMetrics, metrics=telemetry)  # outermost: the gateway's refusals count too
    return app


def begin_drain(app: Starlette) -> None:
    """Refuse new work and answer waiters now (the first step of a SIGTERM)."""
    app.state.server.scheduler.begin_drain()


#: How long an idle keep-alive connection is kept open, in seconds. Longer than the idle
#: expiry of the clients and proxies in front of a server (httpx 5 s, load balancers 60 s),
#: so that they close an idle connection first: a server that closes first races the client's
#: next request on that connection, which then fails (a reset or an empty answer: httpx's
#: ``ReadError``) though the server never read it. uvicorn's own default, 5 s, is exactly
#: httpx's, and under load a pooled connection idle for about that long lost such requests.
KEEP_ALIVE_S = 75


def uvicorn_config(app: Starlette, *, host: str, port: int, log_level: str = "warning",
                   graceful_timeout: int = 5) -> uvicorn.Config:
    """How uvicorn serves ``app``: the one place its settings are chosen (``serve`` and the
    tests' in-process servers use it alike). HTTP/1.1 through :class:`HttpProtocol` (httptools,
    an answer in one ``send``); keep-alive :data:`KEEP_ALIVE_S`; no access log (a line per
    request, formatted on the loop)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on", http=HttpProtocol,
                          timeout_keep_alive=KEEP_ALIVE_S, timeout_graceful_shutdown=graceful_timeout,
                          access_log=False)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before ``torpor serve`` says it listens: a port another
    process holds is one typed error (``address_in_use``), not "listening on" followed by
    uvicorn's own log line and exit 1. Port 0 picks a free port (``getsockname`` says which)."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as exc:
        raise ConfigError(f"--listen {host}:{port}: {exc.strerror or exc}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart past TIME_WAIT
    try:
        sock.bind(where)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        sock.close()
        code = "address_in_use" if exc.errno == errno.EADDRINUSE else None
        hint = ": another process listens there (stop it, or pick another port)" if code else ""
        raise ConfigError(f"--listen {host}:{port}: {exc.strerror or exc}{hint}", code=code) from None
    return sock


def serve(app: Starlette, *, host: str, port: int, log_level: str = "warning",
          graceful_timeout: int = 5, sock: socket.socket | None = None) -> int:
    """Run ``app`` under uvicorn until SIGTERM/SIGINT, then drain; 0 once drained. ``sock``:
    a socket :func:`bind` made (else uvicorn binds ``host:port`` itself)."""
    config = uvicorn_config(app, host=host, port=port, log_level=log_level, graceful_timeout=graceful_timeout)
    server = _Server(config, app)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1


class _Server(uvicorn.Server):
    """uvicorn's server, whose signal handler also starts the application's drain."""

    def __init__(self, config: uvicorn.Config, app: Starlette) -> None:
        super().__init__(config)
        self.torpor_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # A drained server exits 0 rather than re-raising the signal once it is done.
        self._captured_signals.clear()
        state = self.torpor_app.state.server
        state.scheduler.draining = True  # refuse new requests from now on
        with contextlib.suppress(RuntimeError):  # no loop running: nobody waits yet
            asyncio.get_running_loop().call_soon_threadsafe(state.scheduler.wake_all)
