"""The guest toolchain runs in child processes, under limits: what both sides share.

Binaryen ends the process it runs in when a module is beyond it (``Fatal()`` is
``exit(1)``), aborts on a failed assertion, and one hostile module can keep it busy
for minutes and gigabytes; the C compiler can do the same on hostile source. In a
server that packs or builds what users push, each of these would take the server
down. So every toolchain step runs in a child process (``toolchain_worker.py``)
with an address-space limit and a CPU-time limit it sets on itself, a wall-clock
deadline kept by the parent, and its output read with a bound; how the child ended
becomes a typed error in the parent (see :func:`host.sandbox.binaryen.asyncify`
and :func:`host.sandbox.toolchain.compile_c`).

The limits come from the environment (README, "Toolchain limits"), so an operator
can size them to the machine without code.

The worker imports this module too, so it imports little at the top: a child's
start-up is paid on every build.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from typing import IO, TYPE_CHECKING, NamedTuple

from host.errors import ConfigError

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable

#: The directory holding the ``host`` package: first on the child's module path, so
#: that ``python -m host.sandbox.toolchain_worker`` runs this very source tree.
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER_MODULE = "host.sandbox.toolchain_worker"

#: Exit status of a worker that caught a MemoryError (its limit was hit in Python).
EXIT_NO_MEMORY = 75

STDERR_KEEP = 32 << 10  # bytes kept from the head and from the tail of a child's stderr

BINARYEN_TIMEOUT_ENV = "TORPOR_BINARYEN_TIMEOUT"
BINARYEN_MEMORY_ENV = "TORPOR_BINARYEN_MEMORY"
CC_TIMEOUT_ENV = "TORPOR_CC_TIMEOUT"
CC_MEMORY_ENV = "TORPOR_CC_MEMORY"


class Limits(NamedTuple):
    """How long (wall clock) and how much address space one toolchain step may take."""

    timeout_s: float
    memory_bytes: int
    timeout_env: str
    memory_env: str

    def timeout_text(self) -> str:
        return f"{self.timeout_s:g} s (${self.timeout_env})"

    def memory_text(self) -> str:
        return f"{_size(self.memory_bytes)} of address space (${self.memory_env})"


def binaryen_limits() -> Limits:
    """Binaryen's limits: 60 s and 2 GiB unless the environment says otherwise.

    A normal agent takes well under a second and about 40 MiB (plus thread stacks);
    the spec suite has modules that would take minutes and gigabytes.
    """
    return _limits(BINARYEN_TIMEOUT_ENV, 60.0, BINARYEN_MEMORY_ENV, 2 << 30)


def cc_limits() -> Limits:
    """The C compiler's limits: 300 s and 4 GiB unless the environment says otherwise.

    Address space, not resident memory: Zig reserves a thread stack per core, so the
    default leaves room for a machine with many cores.
    """
    return _limits(CC_TIMEOUT_ENV, 300.0, CC_MEMORY_ENV, 4 << 30)


def _limits(timeout_env: str, timeout_default: float, memory_env: str, memory_default: int) -> Limits:
    timeout = timeout_default
    raw = os.environ.get(timeout_env, "").strip()
    if raw:
        from policies.units import parse_duration  # only when set: `policies` is not light

        try:
            timeout = float(raw) if _is_number(raw) else parse_duration(raw)
        except ValueError as exc:
            raise ConfigError(f"${timeout_env}: {exc}") from exc
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(f"${timeout_env}: the timeout must be a positive number of seconds (got {raw!r})")
    memory = memory_default
    raw = os.environ.get(memory_env, "").strip()
    if raw:
        from policies.units import parse_size

        try:
            memory = parse_size(raw)
        except ValueError as exc:
            raise ConfigError(f"${memory_env}: {exc}") from exc
    return Limits(timeout, memory, timeout_env, memory_env)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _size(value: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:g} {unit}"
    return f"{value} bytes"


def cpu_seconds_for(limits: Limits, threads: int) -> int:
    """The CPU-time backstop: the wall-clock limit times the threads that may run, plus slack."""
    return math.ceil(limits.timeout_s * max(1, threads)) + 1


# -- in the child --------------------------------------------------------------------
def limit_self(memory_bytes: int, cpu_seconds: int) -> None:
    """Cap this process's address space and CPU time, and turn off core dumps.

    Called first thing in the worker (not from ``preexec_fn``, which is unsafe when the
    parent has threads, as a host does). Limits are only ever lowered: a process may
    not raise a hard limit its parent set.
    """
    import resource

    def lower(which: int, soft: int, hard: int) -> None:
        _, cur_hard = resource.getrlimit(which)
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
            soft = min(soft, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(which, (soft, hard))

    lower(resource.RLIMIT_AS, memory_bytes, memory_bytes)
    # SIGXCPU at the soft limit, SIGKILL at the hard one: a backstop for a child whose
    # parent died (the parent's wall-clock deadline is the limit that normally acts).
    lower(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 5)
    lower(resource.RLIMIT_CORE, 0, 0)  # an abort must not leave a core file behind


# -- in the parent -------------------------------------------------------------------
class Finished(NamedTuple):
    """How a child ended: its status (negative: killed by that signal), its output, and
    whether the parent stopped it at the deadline."""

    returncode: int
    stdout: bytes
    stderr: str
    timed_out: bool
    elapsed_s: float

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        import signal

        try:
            return signal.Signals(-self.returncode).name
        except ValueError:
            return f"signal {-self.returncode}"


def worker_command(*args: str) -> list[str]:
    """``python -S -m host.sandbox.toolchain_worker ARGS`` with this interpreter.

    ``-S``: no ``site`` (and no editable-install finder) to import, which saves a
    third of the interpreter's start-up; :func:`worker_env` passes our module path
    instead, so the child imports exactly the modules this process would.
    """
    return [sys.executable, "-S", "-m", WORKER_MODULE, *args]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ours, ``PYTHONPATH`` = this source tree and our module path,
    and ``extra`` where the environment does not already say otherwise."""
    env = dict(os.environ)
    paths = [PROJECT_ROOT]
    for entry in sys.path:
        if entry:
            full = os.path.abspath(entry)
            if full not in paths:
                paths.append(full)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for key, value in (extra or {}).items():
        env.setdefault(key, value)
    return env


def run_child(
    cmd: list[str],
    *,
    input: bytes,
    timeout_s: float,
    env: dict[str, str],
    cwd: str | None = None,
    while_starting: Callable[[], object] | None = None,
) -> Finished:
    """Run ``cmd`` to its end or to the deadline, feeding it ``input``.

    The child gets its own session, so that at the deadline (or when this process is
    interrupted) the whole group is killed, the compiler's own children with it.
    Standard error is kept up to 32 KiB from each end: a validator may print a whole
    module, and the parent must not be the one that runs out of memory.

    ``while_starting`` runs here while the child starts up (a Python interpreter and
    Binaryen take a tenth of a second to load): work that can overlap it, such as
    validating the input. If it raises, the child is killed and the error propagates.
    """
    import subprocess
    import threading
    import time

    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    out_chunks: list[bytes] = []
    err = _BoundedText()
    # A thread blocked in waitpid() wakes the moment the child ends; Popen.wait(timeout)
    # would poll with sleeps of up to 50 ms, paid on every build.
    waiter = threading.Thread(target=proc.wait, daemon=True)
    threads = [
        threading.Thread(target=_feed, args=(proc.stdin, input), daemon=True),
        threading.Thread(target=_drain, args=(proc.stdout, out_chunks.append), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err.add), daemon=True),
    ]
    timed_out = False
    try:
        if while_starting is not None:
            while_starting()
        for t in threads:
            t.start()
        waiter.start()
        waiter.join(max(0.0, timeout_s - (time.monotonic() - start)))
        timed_out = waiter.is_alive()
    finally:
        if proc.poll() is None:  # the deadline, an error or an interruption here
            _kill_group(proc)
            proc.wait()
        for t in threads:
            if t.ident is not None:
                t.join(timeout=5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
    return Finished(proc.returncode, b"".join(out_chunks), err.text(), timed_out, time.monotonic() - start)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's session (it is its leader): Zig's clang dies with Zig."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def _feed(stream: IO[bytes], data: bytes) -> None:
    """Write the input from a thread: a child that never reads must not block the deadline."""
    with contextlib.suppress(OSError):  # BrokenPipeError: the child ended before reading it all
        stream.write(data)
    with contextlib.suppress(OSError):
        stream.close()


def _drain(stream: IO[bytes], sink: Callable[[bytes], object]) -> None:
    fd = stream.fileno()
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 65536):
            sink(chunk)


class _BoundedText:
    """The first and the last ``STDERR_KEEP`` bytes of a stream, and how much was dropped."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = STDERR_KEEP - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            if len(self.tail) > STDERR_KEEP:
                cut = len(self.tail) - STDERR_KEEP
                self.dropped += cut
                del self.tail[:cut]

    def text(self) -> str:
        middle = f"\n[... {self.dropped} bytes left out ...]\n" if self.dropped else ""
        return bytes(self.head).decode(errors="replace") + middle + bytes(self.tail).decode(errors="replace")
