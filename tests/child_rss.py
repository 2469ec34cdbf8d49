"""Run a child process and measure its own peak RSS.

Two traps make the obvious ways wrong in a long-lived pytest (or xdist) worker:
``getrusage(RUSAGE_CHILDREN)`` is the largest of *every* child the worker has waited for,
and even ``wait4`` on the one child counts the worker's own size, because a child forked
(or vforked) from a large process starts its high-water mark there, before its ``exec``.
So the child is started by a small Python launcher, and the launcher reports what ``wait4``
says of the child it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[2:])\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'code': os.waitstatus_to_exitcode(status), 'rss': usage.ru_maxrss * 1024}, f)\n"
)


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    peak_rss: int  # bytes


def run_measured(argv: list[str], timeout: float = 120.0) -> Measured:
    """``argv`` to completion with its own peak RSS (its output passes through the launcher)."""
    fd, report = tempfile.mkstemp(prefix="child-rss-", suffix=".json")
    os.close(fd)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, report, *argv], capture_output=True,
                              timeout=timeout)
        seconds = time.perf_counter() - t0
        with open(report) as f:
            text = f.read()
        if not text:
            raise AssertionError(f"the launcher reported nothing (exit {proc.returncode}): "
                                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
        got = json.loads(text)
    finally:
        os.unlink(report)
    return Measured(int(got["code"]), proc.stdout, proc.stderr, seconds, int(got["rss"]))
