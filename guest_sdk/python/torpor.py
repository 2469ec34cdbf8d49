"""The ``torpor`` module of a Python agent (guest ABI v1 through CPython for WASI).

Compiled into every Python agent's pristine image at build time (by the guest itself, so
the bytecode is the runtime's own). It runs inside the sandbox; its only ways out are the
native functions of ``_torpor`` (guest_sdk/python/runtime.c) and the tool calls the
runtime makes when the agent's coroutine yields one of this module's pending calls.

An agent is ``agent.py`` with ``async def main(input)`` (or ``async def main()``): every
``await torpor.tool(...)`` hands a pending call to the runtime, which makes it with the
wasm stack otherwise empty, so the agent may hibernate there. What ``main`` returns
(other than ``None``) becomes the output.
"""

import json
import sys

import _torpor

__all__ = ["DeniedError", "ToolError", "input", "log", "output", "sleep", "tool"]


class ToolError(Exception):
    """A tool call the host answered with an error object (ABI.md section 5).

    ``code`` (``"denied"``, ``"tool_failed"``, ...), ``message``, ``retryable``, ``rule``
    (when a policy rule decided) and ``details`` (any other member the tool attached).
    """

    def __init__(self, body):
        body = body if isinstance(body, dict) else {}
        message = body.get("message")
        self.message = message if isinstance(message, str) else "tool call failed"
        super().__init__(self.message)
        code = body.get("code")
        self.code = code if isinstance(code, str) else "tool_failed"
        retryable = body.get("retryable")
        self.retryable = retryable if isinstance(retryable, bool) else False
        rule = body.get("rule")
        self.rule = rule if isinstance(rule, str) else None
        self.details = {k: v for k, v in body.items() if k not in ("code", "message", "retryable", "rule")}

    def __str__(self):
        where = f" (rule {self.rule})" if self.rule else ""
        return f"{self.code}: {self.message}{where}"


class DeniedError(ToolError):
    """The policy refused the call: ``code == "denied"`` and ``rule`` says which rule."""


_input_value = None
_input_read = False


def input():
    """The agent's input, parsed once (the host checked it is JSON before the agent started)."""
    global _input_value, _input_read
    if not _input_read:
        text = _torpor.input()
        _input_value = json.loads(text) if text else None
        _input_read = True
    return _input_value


def output(value):
    """Sets the agent's output (the last call wins); ``value`` must serialise to JSON."""
    _torpor.output(json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False))


def _text(args):
    parts = []
    for a in args:
        if isinstance(a, str):
            parts.append(a)
        elif isinstance(a, BaseException):
            parts.append(f"{type(a).__name__}: {a}")
        else:
            try:
                parts.append(json.dumps(a, ensure_ascii=False))
            except (TypeError, ValueError):
                parts.append(repr(a))
    return " ".join(parts)


class _Log:
    """The agent's log: ``log("x", 1)`` is info; ``log.debug``, ``log.info``, ``log.warn``, ``log.error``."""

    def __call__(self, *args):
        _torpor.log(1, _text(args))

    def debug(self, *args):
        _torpor.log(0, _text(args))

    def info(self, *args):
        _torpor.log(1, _text(args))

    def warn(self, *args):
        _torpor.log(2, _text(args))

    warning = warn

    def error(self, *args):
        _torpor.log(3, _text(args))


log = _Log()


class _Call:
    """A pending tool call: awaiting it yields it to the runtime, which sends back (code, text).

    Under asyncio (an agent that imports it) the call waits instead on a future of the
    agent's event loop, which makes the calls one at a time (see :func:`_drive`)."""

    __slots__ = ("args", "name")

    def __init__(self, name, args):
        self.name = name
        self.args = args

    def __await__(self):
        loop = _loop
        if loop is None:
            return (yield self)
        return (yield from loop._submit(self).__await__())


async def tool(name, args=None):
    """Calls a tool granted by the agent's policy; the agent may hibernate until it answers.

    Raises :class:`DeniedError` when the policy refuses the call, :class:`ToolError`
    (``e.code``) for every other failure.
    """
    if not isinstance(name, str):
        raise TypeError("torpor.tool: the name must be a string")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise TypeError("torpor.tool: the arguments must be a dict (a JSON object)")
    text = json.dumps(args, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    for s in (name, text):
        if not s.isascii():
            s.encode("utf-8")  # a lone surrogate raises here, in the agent's frame
    code, body = await _Call(name, text)  # the runtime reads their UTF-8 in place
    value = json.loads(body) if body else None
    if code < 0:
        err = ToolError(value)
        if err.code == "denied":
            err = DeniedError(value)
        raise err
    return value


async def sleep(ms):
    """Sleeps ``ms`` milliseconds as a host-settled timer (the ``timer.sleep`` tool, which
    the policy must grant): the agent hibernates meanwhile; a crash does not restart it."""
    await tool("timer.sleep", {"ms": max(0, int(ms))})


class _LogStream:
    """sys.stdout / sys.stderr: whole lines to the agent's log (there is no terminal)."""

    def __init__(self, level):
        self._level = level
        self._buf = ""

    def write(self, s):
        self._buf += str(s)
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            _torpor.log(self._level, line)
        if len(self._buf) > 65536:
            self.flush()
        return len(s)

    def flush(self):
        if self._buf:
            _torpor.log(self._level, self._buf)
            self._buf = ""

    def isatty(self):
        return False


# ---- the runtime's side (runtime.c calls these) ------------------------------------

_AGENT_FILES = set()


def _request(yielded):
    """What the runtime makes of a value the agent's coroutine yielded: (name, args), str."""
    if type(yielded) is _Call:
        return (yielded.name, yielded.args)
    raise RuntimeError(
        f"the agent awaited {type(yielded).__name__!s} {yielded!r:.80}, which nothing here settles: "
        "an agent waits only on torpor.tool() and torpor.sleep() (and coroutines that await them), "
        "or on asyncio tasks and futures when the agent imports asyncio")


def _start(main, seed):
    """What the runtime drives: the coroutine of ``main``, or, when the agent imported
    asyncio, :func:`_drive` running it as a task; ``random`` reseeded per agent if the
    image imported it."""
    rnd = sys.modules.get("random")
    if rnd is not None:
        rnd.seed(seed)
    coro = main(input()) if main.__code__.co_argcount > 0 else main()
    if "asyncio" in sys.modules:
        return _drive(coro)
    return coro


# ---- asyncio: concurrent tool calls ---------------------------------------------------

_loop = None  # the agent's event loop while _drive runs it


def _event_loop():
    """The agent's asyncio event loop (the class is made here: only an agent that imports
    asyncio pays for it).

    It runs inside the coroutine the runtime drives, so the runtime is unchanged: a tool
    call a task awaits is queued on the loop; when no callback is ready the loop yields
    the oldest queued call to the runtime, which makes it with the wasm stack empty (the
    agent may hibernate there, its tasks, futures and queue all heap objects) and sends
    the answer back; the loop settles that call's future and runs what became ready.
    ``gather`` over N calls is then N suspensions, the calls made in the order the tasks
    issued them, like ``Promise.all`` in the JavaScript runtime. There is no clock inside
    the sandbox: what needs one (``asyncio.sleep(s)`` for s > 0, timeouts) raises a
    RuntimeError naming ``torpor.sleep``."""
    import asyncio
    import collections
    from asyncio import events

    class _AgentLoop(asyncio.AbstractEventLoop):
        def __init__(self):
            self._ready = collections.deque()
            self._calls = collections.deque()  # (call, future): not made yet, oldest first

        def _submit(self, call):
            fut = asyncio.Future(loop=self)
            self._calls.append((call, fut))
            return fut

        def call_soon(self, callback, *args, context=None):
            handle = events.Handle(callback, args, self, context)
            self._ready.append(handle)
            return handle

        call_soon_threadsafe = call_soon

        def call_later(self, delay, callback, *args, context=None):
            raise RuntimeError(
                "asyncio timers need a clock, which the sandbox does not have: use "
                "`await torpor.sleep(ms)` (a durable, host-settled timer); asyncio.sleep(0) works")

        def call_at(self, when, callback, *args, context=None):
            return self.call_later(0, callback)

        def time(self):
            return 0.0

        def create_future(self):
            return asyncio.Future(loop=self)

        def create_task(self, coro, *, name=None, context=None):
            return asyncio.Task(coro, loop=self, name=name, context=context)

        def get_debug(self):
            return False

        def set_debug(self, enabled):
            pass

        def is_running(self):
            return True

        def is_closed(self):
            return False

        def get_exception_handler(self):
            return None

        def set_exception_handler(self, handler):
            raise RuntimeError("the agent's event loop reports unhandled errors to its log")

        def call_exception_handler(self, context):
            exc = context.get("exception")
            what = context.get("message", "unhandled error in the event loop")
            _torpor.log(2, f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what)

        default_exception_handler = call_exception_handler

    return _AgentLoop()


def _waiting_at(task):
    """Where ``task`` is suspended, as the agent's own ``file:line`` frames."""
    where = [f"{f.f_code.co_filename}:{f.f_lineno}" for f in task.get_stack() if f.f_code.co_filename in _AGENT_FILES]
    return f" (at {', '.join(where)})" if where else ""


def _drive(coro):
    """Runs ``coro`` as the main task of the agent's event loop, yielding each tool call
    to the runtime (the only values this generator yields), until the main task is done.

    Tasks still pending then are cancelled and their queued calls never made (as
    ``asyncio.run`` cancels what ``main`` left behind). If nothing is ready and no call is
    queued while the main task waits, nothing can ever wake it: that is an error naming
    where the agent waits, not a hang."""
    global _loop
    import asyncio
    from asyncio import events

    loop = _event_loop()
    _loop = loop
    events._set_running_loop(loop)
    try:
        main = loop.create_task(coro)
        ready, calls = loop._ready, loop._calls
        while True:
            while ready:
                handle = ready.popleft()
                if not handle._cancelled:
                    handle._run()
            if main.done():
                break
            if not calls:
                raise RuntimeError(
                    "the agent waits on something nothing will settle" + _waiting_at(main) + ": its tasks "
                    "may wait on each other and on torpor tool calls, and on nothing else")
            call, fut = calls.popleft()
            if fut.done():  # its task was cancelled before the call's turn: never made
                continue
            answer = yield call  # the runtime makes the call; the agent may hibernate here
            if not fut.done():
                fut.set_result(answer)
        for task in asyncio.all_tasks(loop):
            task.cancel()
        while ready:
            handle = ready.popleft()
            if not handle._cancelled:
                handle._run()
        return main.result()
    finally:
        events._set_running_loop(None)
        _loop = None


def _finish(result):
    sys.stdout.flush()
    sys.stderr.flush()
    if result is not None:
        output(result)


def _report(what, exc):
    """Logs ``exc`` at error level with the agent's own frames (the host reports it)."""
    import traceback

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    if isinstance(exc, SyntaxError) and what == "build":
        where = f"{exc.filename}:{exc.lineno}" if exc.filename else "agent.py"
        _torpor.log(3, f"{where}: SyntaxError: {exc.msg}")
        return
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in _AGENT_FILES]
    head = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    lines = [f"{what}: {head}" if what != "build" else head]
    if frames:
        if what == "build":
            last = frames[-1]
            lines[0] = f"{last.filename}:{last.lineno}: {head}"
        lines.append("Traceback (most recent call last):")
        lines.extend(s.rstrip("\n") for s in traceback.format_list(frames))
    _torpor.log(3, "\n".join(lines))


class _Sources:
    """The agent's own modules (agent.py and what it vendors), compiled here on import."""

    def __init__(self, files):
        self._files = files  # name -> (filename, source, is_package)

    def find_spec(self, fullname, path=None, target=None):
        entry = self._files.get(fullname)
        if entry is None:
            return None
        from importlib.machinery import ModuleSpec

        spec = ModuleSpec(fullname, self, origin=entry[0], is_package=entry[2])
        if entry[2]:
            spec.submodule_search_locations = []
        spec.has_location = True
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        filename, source, _ = self._files[module.__name__]
        module.__file__ = filename
        exec(compile(source, filename, "exec", dont_inherit=True), module.__dict__)


def _parse_sources(blob):
    files = {}
    at = 4
    for _ in range(int.from_bytes(blob[:4], "little")):
        parts = []
        for _ in range(3):
            n = int.from_bytes(blob[at:at + 4], "little")
            parts.append(blob[at + 4:at + 4 + n].decode("utf-8"))
            at += 4 + n
            if len(parts) == 1:
                parts.append(blob[at] == 1)
                at += 1
        name, pkg, filename, source = parts
        files[name] = (filename, source, pkg)
    return files


def _build(blob):
    """Imports the agent at build time (its top level runs here, once) and returns ``main``."""
    import gc
    import linecache

    files = _parse_sources(blob)
    for filename, source, _ in files.values():
        _AGENT_FILES.add(filename)
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.meta_path.insert(0, _Sources(files))
    sys.stdout = _LogStream(1)
    sys.stderr = _LogStream(2)
    sys.modules["torpor"] = sys.modules[__name__]
    import agent

    if "asyncio" not in sys.modules and any("asyncio" in source for _, source, _ in files.values()):
        # Imported here when the agent imports it only inside main: main then runs as a
        # task of the agent's event loop all the same (see _start).
        import asyncio  # noqa: F401

    main = getattr(agent, "main", None)
    if main is None or getattr(main, "__code__", None) is None or not (main.__code__.co_flags & 0x80):
        raise TypeError("agent.py must define `async def main(input)` (or `async def main()`)")
    # The set-up objects are never collected again: a collection would dirty their pages
    # in every agent's delta.
    gc.collect()
    gc.freeze()
    return main
