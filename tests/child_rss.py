"""Run a child process and measure its own peak RSS.

``getrusage(RUSAGE_CHILDREN)`` is the largest of *every* child this process has waited for,
so in a long-lived pytest (or xdist) worker a test would see the peak of whatever ran
before it. ``os.wait4`` reports the resources of the one child it reaps.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float
    peak_rss: int  # bytes


def run_measured(argv: list[str], timeout: float = 120.0) -> Measured:
    """``argv`` to completion (killed after ``timeout`` seconds), with its peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: dict[str, bytes] = {}

    def drain(name: str) -> None:
        pipe = getattr(proc, name)
        out[name] = pipe.read()
        pipe.close()

    readers = [threading.Thread(target=drain, args=(n,), daemon=True) for n in ("stdout", "stderr")]
    for r in readers:
        r.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    for r in readers:
        r.join()
    seconds = time.perf_counter() - t0
    if seconds >= timeout:
        raise subprocess.TimeoutExpired(argv, timeout, out.get("stdout"), out.get("stderr"))
    return Measured(proc.returncode, out.get("stdout", b""), out.get("stderr", b""), seconds,
                    usage.ru_maxrss * 1024)
