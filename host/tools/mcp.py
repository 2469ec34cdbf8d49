"""MCP servers as capabilities: ``mcp.SERVER.TOOL`` tools, mediated like any other.

A policy names a server and the tools it grants::

    [mcp.tickets]
    credentials = ["tickets_token"]
    tools = ["lookup_customer", "create_ticket"]
    timeout = "20s"                                # per call (default 30s)

    [tools."mcp.tickets.create_ticket"]            # optional: rates, approval, argument rules
    approval = true

and the host's operator config (:mod:`host.tools.mcp_config`) says how to start it::

    [mcp.servers.tickets]
    command = "tickets-mcp"
    env = { TICKETS_TOKEN = "{tickets_token}" }   # placeholders: credentials the policy grants

or, for a remote server, ``url = "https://..."`` with ``headers`` (streamable HTTP;
``{credential}`` placeholders filled host side and sent to that origin only).

The host starts the server on first use (stdio transport, through the ``mcp``
SDK; no shell; an environment of PATH, the server's own HOME, and what the operator
config names), or
connects to it (:mod:`host.tools.mcp_transport`), lists its tools and their JSON
Schemas, and keeps it running for later calls and other agents with the same
configuration.  The client side of the protocol (progress, sampling, elicitation,
roots, log and resource notifications) is :mod:`host.tools.mcp_peer`.  Before a call goes to the
server its arguments are validated against the tool's published input schema
(``invalid_args`` otherwise), after the policy engine has decided the call.

**Supervision.**  Servers live on one supervisor event loop in a daemon thread
of the host process, independent of the event loop of any one ``Host`` call (a
CLI run, a test, an embedding service), so a server outlives the run that
started it.  A server that

* exits during a call (a remote one: its response stream ends): the guest gets
  ``unavailable`` (``server_crashed``, retryable) at once and the server is
  restarted (reconnected);
* hangs past the timeout: ``timeout``, and the server is restarted (a
  single-threaded server stuck in one call would hang every later one).  A call
  whose server reports progress is not hanging: each progress notification
  starts the timeout again, up to the server's ``hard_timeout``;
* lies about its schema — rejects arguments that match its own input schema,
  answers against its own output schema, or sends a malformed result:
  ``tool_failed`` with a ``reason_code`` (``schema_mismatch``,
  ``schema_violation``, ``bad_response``), and the server is restarted (its
  tools listed again).  A restart cuts off other calls in flight on that
  server; they get ``server_crashed`` and may retry.  A tool whose published
  schema is not a JSON Schema at all is refused (``unavailable``,
  ``schema_invalid``, not retryable) without a restart: the server would
  publish the same schema again;
* cannot start: ``unavailable`` (``server_start_failed``), and further starts
  back off exponentially (up to 30 s) so a broken command does not spin.

Servers idle for :data:`IDLE_S` are stopped; all are stopped at process exit.
A tool the server reports as failed (``isError``) is a ``tool_failed`` error
whose message is the tool's text.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from host import json_schema
from host.tools.mcp_config import resolve
from host.tools.mcp_peer import CallRoute, Peer
from host.tools.mcp_stdio import MAX_MESSAGE_BYTES, TOO_LARGE
from host.tools.mcp_transport import ServerConfig, connect, stderr_file
from host.tools.registry import AnyArgs, InputRequired, ToolContext, ToolError
from policies.schema import mcp_tool_parts

log = logging.getLogger("torpor.mcp")
T = TypeVar("T")

__all__ = ["SUPERVISOR", "ServerConfig", "Supervisor", "ToolInfo", "call_tool", "shutdown"]

DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_HARD_TIMEOUT_S = 600.0
IDLE_S = 300.0
REAP_EVERY_S = 30.0
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
TASK_REQUIRED = ("the server runs this tool only as a task (execution.taskSupport = required); Torpor calls tools "
                 "and waits for their answer, and does not run task-augmented calls")
CONNECTION_CLOSED = -32000
INVALID_PARAMS = -32602


@dataclass
class ToolInfo:
    """One tool as the server published it, with its schemas compiled (or why they could not be)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    annotations: dict[str, Any] | None = None
    task_support: str | None = None  # "required": the server runs it only as a task (not supported here)
    input_validator: Any = None
    output_validator: Any = None
    schema_error: str | None = None

    @classmethod
    def from_listing(cls, raw: dict[str, Any]) -> ToolInfo:
        info = cls(
            name=str(raw.get("name")),
            description=str(raw.get("description") or ""),
            input_schema=dict(raw.get("inputSchema") or {}),
            output_schema=raw.get("outputSchema") if isinstance(raw.get("outputSchema"), dict) else None,
            annotations=raw.get("annotations") if isinstance(raw.get("annotations"), dict) else None,
            task_support=(raw.get("execution") or {}).get("taskSupport") if isinstance(raw.get("execution"), dict)
            else None,
        )
        try:
            info.input_validator = _compile(info.input_schema)
            if info.output_schema is not None:
                info.output_validator = _compile(info.output_schema)
        except jsonschema.exceptions.SchemaError as exc:
            info.schema_error = exc.message
        return info

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema,
                "output_schema": self.output_schema, "annotations": self.annotations,
                "task_support": self.task_support, "schema_error": self.schema_error}

    @property
    def rerun_safe(self) -> bool:
        """The server says a call changes nothing (read-only) or may be repeated (idempotent)."""
        a = self.annotations or {}
        return a.get("readOnlyHint") is True or a.get("idempotentHint") is True


def _compile(schema: dict[str, Any]) -> Any:
    # The server's schema is untrusted: its patterns run under a time budget (json_schema).
    return json_schema.check_schema(schema)(schema)


def _schema_errors(validator: Any, value: Any) -> list[str]:
    """Readable schema violations (at most five); an unresolvable schema counts as one."""
    try:
        errors = sorted(json_schema.errors(validator, value), key=lambda e: list(e.absolute_path))
    except Exception as exc:  # e.g. a $ref the schema cannot resolve (never fetched), a pattern too slow
        return [f"the schema cannot be applied: {exc}"]
    out = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.absolute_path) or "(arguments)"
        out.append(f"{where}: {e.message}")
    return out


@dataclass
class _Server:
    """One running server and its session; touched only on the supervisor loop."""

    config: ServerConfig
    peer: Peer
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    session: Any = None
    read: Any = None  # the transport's receive stream: no open senders once the process is gone
    tools: dict[str, ToolInfo] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    dead: bool = False
    generation: int = 0


class Supervisor:
    """Starts, reuses, restarts and stops MCP servers for every ``Host`` in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: dict[ServerConfig, _Server] = {}
        self._starting: dict[ServerConfig, asyncio.Lock] = {}
        self._failures: dict[ServerConfig, tuple[int, float]] = {}
        self._generations: dict[ServerConfig, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every server task, stopping ones included
        self._atexit = False
        self._reaper_future: Any = None
        self._reaper_task: asyncio.Task[None] | None = None

    # -- the loop thread --------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._loop.is_running():
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="torpor-mcp", daemon=True)
                self._thread.start()
                started.wait(5)
                self._loop = loop
                self._reaper_future = asyncio.run_coroutine_threadsafe(self._start_reaper(), loop)
                if not self._atexit:
                    atexit.register(self.close)
                    self._atexit = True
            return self._loop

    @contextlib.asynccontextmanager
    async def owned_by_this_loop(self, timeout: float = 10.0) -> AsyncIterator[None]:
        """For a long-running host (``torpor serve``): while the block runs, the servers live
        on the caller's own event loop, the one its agents' tool calls run on, so a call
        crosses no thread (two crossings per call otherwise, each a wake-up of a thread:
        ``torpor bench mcp``).  Servers started before on the supervisor's own thread are
        stopped first; every server is stopped when the block ends."""
        loop = asyncio.get_running_loop()
        await anyio.to_thread.run_sync(self.close)  # a thread loop from before, and its servers
        with self._lock:
            self._loop, self._thread = loop, None
            self._starting.clear()  # asyncio locks are bound to the loop they first ran on
        await self._start_reaper()
        try:
            yield
        finally:
            with self._lock:
                if self._loop is loop:
                    self._loop = None
            await self._shutdown(timeout)
            self._starting.clear()
            self._failures.clear()

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the supervisor loop and await it from the caller's loop (at once,
        when the caller's loop is the supervisor's: :meth:`owned_by_this_loop`)."""
        loop = self._ensure_loop()
        try:
            if asyncio.get_running_loop() is loop:
                return await coro
        except RuntimeError:  # not asyncio: below
            pass
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): wait in a worker thread instead
            import anyio.to_thread

            return await anyio.to_thread.run_sync(fut.result)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise

    # -- public API ---------------------------------------------------------------
    async def call(self, config: ServerConfig, tool: str, args: dict[str, Any], timeout: float,
                   hard_timeout: float | None = None, route: CallRoute | None = None) -> dict[str, Any]:
        """Call one tool: validated, bounded, supervised.  Raises :class:`ToolError`.

        ``timeout`` is how long the server may stay silent; each progress notification
        starts it again, up to ``hard_timeout`` in all.  ``route`` takes what the server
        asks and tells during the call (:mod:`host.tools.mcp_peer`)."""
        hard = max(timeout, hard_timeout if hard_timeout is not None else DEFAULT_HARD_TIMEOUT_S)
        return await self._on_loop(self._call(config, tool, args, timeout, hard, route or CallRoute(tool)))

    async def list_tools(self, config: ServerConfig) -> list[dict[str, Any]]:
        """The server's tools and schemas (starting it if needed)."""

        async def run() -> list[dict[str, Any]]:
            server = await self._get(config)
            return [t.describe() for t in server.tools.values()]

        return await self._on_loop(run())

    def running(self) -> dict[str, int]:
        """Server name → generation (1 for the first process, +1 per restart), for inspection and tests."""
        return {c.name: s.generation for c, s in list(self._servers.items()) if not s.dead}

    def close(self, timeout: float = 10.0) -> None:
        """Stop every server and the loop thread (idempotent; registered at exit)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if thread is None and loop is not None and loop.is_running():
                return  # a host's own loop (owned_by_this_loop): its block stops the servers
            self._loop = self._thread = None
        if loop is None or not loop.is_running() or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(timeout), loop).result(timeout + 1)
        self._reaper_future = None
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout)
        self._starting.clear()
        self._failures.clear()

    # -- on the supervisor loop -------------------------------------------------------
    async def _shutdown(self, timeout: float) -> None:
        """Stop the reaper and every server, on their loop."""
        reaper = self._reaper_task
        if reaper is not None:  # stop it here, on its loop, so it ends before the loop does
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            self._reaper_task = None
        servers = list(self._servers.values())
        self._servers.clear()
        for s in servers:
            s.stop.set()
        # Servers being restarted are still stopping in the background: wait for them too,
        # so that no process outlives the host (their transports terminate hung ones).
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def _healthy(self, server: _Server | None) -> bool:
        if server is None or server.dead or not server.ready.done() or server.ready.cancelled():
            return False
        if server.ready.exception() is not None:
            return False
        if server.read is not None and server.read.statistics().open_send_streams == 0:
            # The transport's reader is gone: the process closed its stdout (it died while idle).
            self._restart(server, "it exited while idle", start=False)
            return False
        return True

    async def _get(self, config: ServerConfig) -> _Server:
        server = self._servers.get(config)
        if server is not None and self._healthy(server):
            server.last_used = time.monotonic()
            return server
        lock = self._starting.setdefault(config, asyncio.Lock())
        async with lock:  # one start at a time per configuration
            server = self._servers.get(config)
            if server is not None and self._healthy(server):
                return server
            return await self._start(config)

    async def _start(self, config: ServerConfig) -> _Server:
        failures, not_before = self._failures.get(config, (0, 0.0))
        wait = not_before - time.monotonic()
        if wait > 0:
            raise ToolError(
                "unavailable", f"MCP server {config.name} {'could not be reached' if config.remote else 'failed to start'} "
                f"{failures} time(s); next attempt in {wait:.1f}s",
                retryable=True, retry_after_s=round(wait, 3), reason_code="server_start_failed",
            )
        generation = self._generations.get(config, 0) + 1
        self._generations[config] = generation
        server = _Server(config, Peer(config.name, config.roots), generation=generation)
        server.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        server.task = asyncio.get_running_loop().create_task(self._run(server))
        self._tasks.add(server.task)
        server.task.add_done_callback(self._tasks.discard)
        self._servers[config] = server
        try:
            await asyncio.wait_for(asyncio.shield(server.ready), config.startup_timeout)
        except Exception as exc:
            server.stop.set()
            server.dead = True
            if self._servers.get(config) is server:
                del self._servers[config]
            n = failures + 1
            self._failures[config] = (n, time.monotonic() + min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1)))
            why = str(exc) if type(exc) is RuntimeError else _describe(exc)  # _run's own words, or the cause
            if config.remote:
                what = (f"at {config.url} did not answer in time" if isinstance(exc, TimeoutError)
                        else f"at {config.url} could not be reached: {why}")
            elif isinstance(exc, TimeoutError):
                what = "did not start in time"
            elif "FileNotFoundError" in why and config.command and "/" not in config.command:
                # The likeliest first mistake: a server installed where the host's PATH finds it
                # (a virtualenv, ~/.local/bin), which the server's own minimal PATH does not name.
                path = dict(config.env).get("PATH", "")
                what = (f"failed to start: command {config.command!r} is not on its PATH ({path}): give its "
                        f"absolute path as `command`, or a PATH in `env`, under [mcp.servers.{config.name}] of the "
                        "operator config (`torpor doctor` shows it)")
            else:
                what = f"failed to start: {why}"
            log.warning("MCP server %s %s", config.name, what)
            raise ToolError(
                "unavailable", f"MCP server {config.name} {what}", retryable=True, reason_code="server_start_failed"
            ) from None
        self._failures.pop(config, None)
        log.info("MCP server %s started (generation %d, %d tools)", config.name, generation, len(server.tools))
        return server

    async def _run(self, server: _Server) -> None:
        """Hold the server's transport and session open until told to stop or it dies."""
        from mcp import ClientSession

        cfg = server.config
        with stderr_file() as errlog:
            try:
                async with connect(cfg, errlog) as (read, write), \
                        ClientSession(read, write, **server.peer.session_kwargs()) as session:
                    await session.initialize()
                    listing = await session.list_tools()
                    tools = [t.model_dump(by_alias=True, mode="json") for t in listing.tools]
                    server.tools = {t["name"]: ToolInfo.from_listing(t) for t in tools}
                    server.session = session
                    # stdio: the reader's senders close when the process closes its stdout (it died
                    # while idle); streamable HTTP has no such stream, a dead remote fails the call.
                    server.read = None if cfg.remote else read
                    server.ready.set_result(None)
                    await server.stop.wait()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # an exception group from the SDK's task groups, mostly
                if not server.ready.done():
                    server.ready.set_exception(RuntimeError(_describe(exc)))
                elif not server.stop.is_set():
                    log.warning("MCP server %s failed: %s", cfg.name, _describe(exc))
            finally:
                server.dead = True
                server.session = None
                if not server.ready.done():
                    server.ready.set_exception(RuntimeError("the server exited during startup"))
                errlog.seek(0)
                tail = errlog.read()[-2000:]
                if tail.strip():
                    log.info("MCP server %s stderr (tail): %s", cfg.name, tail)

    def _restart(self, server: _Server, why: str, *, start: bool = True) -> None:
        """Stop a misbehaving server and (unless ``start`` is false) start a fresh one in the background."""
        log.warning("MCP server %s: %s; restarting it", server.config.name, why)
        server.dead = True
        server.stop.set()
        if self._servers.get(server.config) is server:
            del self._servers[server.config]
        if not start:
            return

        async def again() -> None:
            with contextlib.suppress(ToolError):
                await self._get(server.config)

        asyncio.get_running_loop().create_task(again())

    async def _start_reaper(self) -> None:
        self._reaper_task = asyncio.get_running_loop().create_task(self._reaper())

    async def _reaper(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            now = time.monotonic()
            for cfg, s in list(self._servers.items()):
                if not s.dead and now - s.last_used > IDLE_S:
                    log.info("MCP server %s idle for %.0fs; stopping it", cfg.name, now - s.last_used)
                    s.stop.set()
                    del self._servers[cfg]

    async def _call(self, config: ServerConfig, tool: str, args: dict[str, Any], timeout: float, hard: float,
                    route: CallRoute) -> dict[str, Any]:
        server = await self._get(config)
        name = f"mcp.{config.name}.{tool}"
        info = server.tools.get(tool)
        if info is None:
            raise ToolError("unknown_tool", f"{name}: the MCP server {config.name} offers no tool {tool!r}")
        if info.schema_error is not None:
            # Refused, not restarted: the listing is the server's code, a restart would publish it again
            # (and cut off other agents' calls in flight for nothing).
            raise ToolError(
                "unavailable", f"{name}: the server published a schema that is not a valid JSON Schema: {info.schema_error}",
                retryable=False, reason_code="schema_invalid",
            )
        if info.task_support == "required":
            raise ToolError("unavailable", f"{name}: {TASK_REQUIRED}", retryable=False, reason_code="task_required")
        problems = _schema_errors(info.input_validator, args)
        if problems:
            raise ToolError("invalid_args", f"{name}: " + "; ".join(problems))
        session = server.session
        if session is None:
            raise ToolError("unavailable", f"{name}: the server is not running", retryable=True, reason_code="server_crashed")
        from mcp import MCPError

        server.last_used = time.monotonic()
        start = anyio.current_time()
        scope = anyio.CancelScope(deadline=start + timeout)
        progressed = [False]

        def alive() -> None:  # a progress notification: the quiet period starts again, within the hard limit
            progressed[0] = True
            scope.deadline = min(anyio.current_time() + timeout, start + hard)

        route.progressed = alive
        route.cut = scope.cancel  # a question for a person: the call is cut (mcp_peer), made again once answered
        key = server.peer.enter(route)
        try:
            try:
                with scope:
                    result = await session.call_tool(tool, args,
                                                     progress_callback=server.peer.progress_callback(route))
            finally:
                if route.asked is not None:  # whatever the cut call came to, it waits for a person
                    raise InputRequired(route.asked)
            if scope.cancelled_caught:
                raise TimeoutError
        except InputRequired:
            raise
        except TimeoutError:
            spent = anyio.current_time() - start
            if spent >= hard - 0.001:
                why = f"still running after its hard limit of {hard:g}s (it was making progress)"
            else:
                why = f"no answer and no progress within {timeout:g}s"
            self._restart(server, f"{tool}: {why}")
            raise ToolError("timeout", f"{name}: {why}", retryable=True,
                            reason_code="hard_timeout" if progressed[0] and spent >= hard - 0.001 else "timeout") from None
        except MCPError as exc:
            if exc.code == TOO_LARGE or (config.remote and "byte limit" in exc.message):  # an SSE event or a JSON body
                raise ToolError(
                    "result_too_large", f"{name}: the server's answer is larger than the "
                    f"{MAX_MESSAGE_BYTES}-byte cap; it was cut there, unread", reason_code="result_too_large",
                ) from None
            if exc.code == CONNECTION_CLOSED or server.dead:
                self._restart(server, f"it exited during a call of {tool}")
                raise ToolError(
                    "unavailable", f"{name}: the MCP server {_gone(config)} during the call ({exc.message}); "
                    "it is being restarted", retryable=True, reason_code="server_crashed",
                ) from None
            if exc.code == INVALID_PARAMS:
                self._restart(server, f"{tool} rejected arguments its own schema accepts")
                raise ToolError(
                    "tool_failed",
                    f"{name}: the server rejected arguments that match its published schema: {exc.message}",
                    reason_code="schema_mismatch",
                ) from None
            raise ToolError(
                "tool_failed", f"{name}: the server answered with error {exc.code}: {exc.message}",
                reason_code="server_error",
            ) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            self._restart(server, f"its connection closed during a call of {tool}")
            raise ToolError(
                "unavailable", f"{name}: the MCP server's connection closed; it is being restarted",
                retryable=True, reason_code="server_crashed",
            ) from None
        except RuntimeError as exc:  # the SDK's own output-schema check
            self._restart(server, f"{tool} answered against its output schema")
            raise ToolError(
                "tool_failed", f"{name}: the server's answer violates its own output schema: {str(exc)[:500]}",
                reason_code="schema_violation",
            ) from None
        except Exception as exc:
            self._restart(server, f"{tool} sent a malformed answer")
            raise ToolError(
                "tool_failed", f"{name}: malformed answer from the server: {_describe(exc)[:500]}",
                reason_code="bad_response",
            ) from None
        finally:
            server.peer.leave(key)
        return _answer(self, server, name, info, result)


def _answer(sup: Supervisor, server: _Server, name: str, info: ToolInfo, result: Any) -> dict[str, Any]:
    raw = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    content = raw.get("content") if isinstance(raw.get("content"), list) else []
    structured = raw.get("structuredContent")
    text = "\n".join(c["text"] for c in content if isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str))
    if raw.get("isError"):
        raise ToolError("tool_failed", f"{name}: {text[:1000] or 'the tool reported an error'}", reason_code="tool_error")
    if info.output_validator is not None:
        problems = _schema_errors(info.output_validator, structured) if structured is not None else [
            "no structuredContent although the tool declares an output schema"]
        if problems:
            sup._restart(server, f"{info.name} answered against its output schema")
            raise ToolError(
                "tool_failed", f"{name}: the server's answer violates its own output schema: " + "; ".join(problems),
                reason_code="schema_violation",
            )
    return one_representation(content, structured, text)


def one_representation(content: list[Any], structured: Any, text: str) -> dict[str, Any]:
    """What the guest is told: the tool's text once.

    ``structured`` is the server's ``structuredContent`` (or the text's JSON object when
    the server sent none), left out when it is only the text wrapped as ``{"result": text}``
    (what the SDK's FastMCP sends for a tool that returns a string); ``text`` the text blocks
    joined, left out when it is only the JSON of ``structured`` (the spec's advice to
    servers); ``content`` the blocks that are not text (images, audio, resources), which have
    no other form. Either way the guest's 1 MiB cap holds about 1 MiB of the tool's content.
    """
    if text and structured == {"result": text}:
        structured = None
    if structured is None and text:
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
            if isinstance(parsed, dict):
                structured = parsed
    if structured is not None and text:
        with contextlib.suppress(ValueError):
            if json.loads(text) == structured:
                text = ""
    others = [c for c in content if not (isinstance(c, dict) and c.get("type") == "text")]
    return {"content": others, "structured": structured, "text": text}


def _gone(config: ServerConfig) -> str:
    return "at " + str(config.url) + " dropped the connection" if config.remote else "exited"


def _describe(exc: BaseException) -> str:
    """The innermost real error of an exception (group)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


SUPERVISOR = Supervisor()
"""The process-wide supervisor every ``mcp.*`` tool uses."""


def shutdown() -> None:
    """Stop every MCP server of this process (also runs at exit)."""
    SUPERVISOR.close()


async def call_tool(args: AnyArgs, ctx: ToolContext, *, tool: str) -> dict[str, Any]:
    """The handler behind every ``mcp.SERVER.TOOL``: the server as this host's operator config
    provides what the policy names (:func:`~host.tools.mcp_config.resolve`), called via the supervisor."""
    parts = mcp_tool_parts(tool)
    servers = getattr(ctx.policy, "mcp", None) or {}
    if parts is None or parts[0] not in servers:
        raise ToolError("unknown_tool", f"{tool}: the policy names no MCP server for it")
    server, name = parts
    spec = servers[server]
    config = resolve(server, spec, ctx.mcp_config, ctx.secrets)
    timeout = getattr(ctx.grant, "timeout", None) or spec.timeout or DEFAULT_CALL_TIMEOUT_S
    hard = getattr(spec, "hard_timeout", None) or DEFAULT_HARD_TIMEOUT_S
    arguments = args.model_dump()
    route = CallRoute(tool, event=ctx.event, sample=_sampler(ctx, getattr(spec, "sampling", None)),
                      elicitation=bool(getattr(spec, "elicitation", False)), elicited=list(ctx.elicited))
    return await SUPERVISOR.call(config, name, arguments, float(timeout), float(hard), route)


async def rerun_safe(ctx: ToolContext, *, tool: str) -> bool:
    """Whether a call of ``tool`` cut short by a crash may run again: only where the operator
    trusts the server's annotations (``trust_annotations = true``) and the server, asked
    now, marks the tool ``readOnlyHint`` or ``idempotentHint``.  A server that cannot be
    asked gives no such word: False (the agent waits for an operator)."""
    parts = mcp_tool_parts(tool)
    servers = getattr(ctx.policy, "mcp", None) or {}
    if parts is None or parts[0] not in servers or not getattr(servers[parts[0]], "trust_annotations", False):
        return False
    try:
        config = resolve(parts[0], servers[parts[0]], ctx.mcp_config, ctx.secrets)
        listing = await SUPERVISOR.list_tools(config)
    except ToolError as exc:
        log.warning("%s: its server could not be asked for its annotations: %s", tool, exc)
        return False
    info = next((t for t in listing if t["name"] == parts[1]), None)
    return info is not None and ToolInfo.from_listing({"name": parts[1], "annotations": info["annotations"]}).rerun_safe


def _sampler(ctx: ToolContext, llm_tool: str | None) -> Any:
    """The call's answer to a sampling request: the granted llm tool, run by the calling
    agent's pipeline on the caller's loop (``ctx.nested``), or None (refused)."""
    nested = ctx.nested
    if llm_tool is None or nested is None:
        return None
    try:
        caller = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): the pipeline's loop cannot be handed work from another thread here
        return None

    async def sample(chat_args: dict[str, Any]) -> dict[str, Any]:
        async def run() -> dict[str, Any]:
            return dict(await nested(llm_tool, chat_args))

        fut: concurrent.futures.Future[dict[str, Any]] = asyncio.run_coroutine_threadsafe(run(), caller)
        return await asyncio.wrap_future(fut)

    return sample
