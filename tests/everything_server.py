"""The reference MCP "everything" server from npm, installed once per machine for the tests.

Node and npm come from Debian's packages (``.ci/run`` installs ``nodejs npm``); the server is
the npm package pinned below, installed with npm into ``~/.cache/torpor/npm/`` under a file
lock (parallel test workers share one install) and moved into place whole, so a worker never
sees half an install.  Tests start it as ``node .../dist/index.js stdio``: no ``npx``, which
would ask the registry at every start.

Without Node on the machine the tests are skipped, except where ``$CI`` is set or
``TORPOR_NODE_TESTS=required`` (as ``.ci/run`` sets it): there a missing Node is a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "@modelcontextprotocol/server-everything"
VERSION = "2026.8.31"


def required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("TORPOR_NODE_TESTS") == "required"


def node() -> str | None:
    """The ``node`` executable (Debian's), or None."""
    return shutil.which("node")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torpor" / "npm"


def install() -> Path:
    """The server's entry script, installed on first use (under a lock, moved into place whole)."""
    root = cache_dir()
    target = root / f"server-everything-{VERSION}"
    entry = target / "node_modules" / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js"
    if entry.is_file():
        return entry
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if entry.is_file():  # another worker installed it while we waited
            return entry
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed (Debian's package npm; .ci/run installs it)")
        work = Path(tempfile.mkdtemp(prefix="install-", dir=root))
        try:
            subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(work),
                            f"{PACKAGE}@{VERSION}"], check=True, capture_output=True, timeout=600)
            os.replace(work, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(work)
    return entry
