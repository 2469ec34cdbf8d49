"""Build and load Torpor's small native helpers: C compiled by Zig, loaded with ctypes.

Why native code at all: the hot paths of hibernation (finding the changed chunks of a
linear memory, gathering and XOR-ing them, writing them back; recycling linear
memories) are a few microseconds of work in C and ten to fifty times that in CPython.

Why this way: Torpor installs from PyPI alone, with no system C compiler and no Python
headers (a wheel per platform would need a build farm). The ``ziglang`` wheel Torpor
already depends on for guests is a complete C toolchain for the host too, so a helper
is compiled once per machine, on first use, into the user cache
(``$TORPOR_NATIVE_CACHE`` or ``<user cache>/torpor/native``), and loaded through ctypes
(no Python C API: the library does not depend on the Python version). The file name
holds a hash of the source, the compiler flags, the Zig version and the machine, so an
upgrade never loads a stale library, and it is written to a temporary name and renamed
into place, so two processes building at once cannot load a half-written file.

Every caller keeps a pure-Python path with the same results: when the compiler is
missing or fails, or ``TORPOR_NATIVE=0`` is set, :func:`load` returns None and says why
in :func:`status`. Tests run both paths.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

__all__ = ["cache_dir", "disabled", "load", "status"]

# Baseline CPU: a cache directory may be shared by machines of one architecture, and
# the helpers' loops are memory-bound anyway (memcmp/memcpy come from the libc).
_FLAGS = ("-shared", "-fPIC", "-O2", "-mcpu=baseline", "-fno-strict-aliasing", "-Wall", "-Werror")
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
_loaded: dict[str, ctypes.PyDLL | None] = {}
_status: dict[str, str] = {}


def disabled() -> bool:
    """True when ``TORPOR_NATIVE=0`` asks for the pure-Python paths."""
    return os.environ.get("TORPOR_NATIVE", "1").strip().lower() in {"0", "false", "no", "off"}


def cache_dir() -> Path:
    """Where built helpers live (``$TORPOR_NATIVE_CACHE`` or the user cache)."""
    env = os.environ.get("TORPOR_NATIVE_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("torpor")) / "native"


def _zig_version() -> str:
    from importlib import metadata  # here: ~15 ms to import, and only a build key needs it

    try:
        return metadata.version("ziglang")
    except metadata.PackageNotFoundError:
        return "missing"


def _library_path(name: str, source: bytes) -> Path:
    h = hashlib.sha256()
    for part in (source, " ".join(_FLAGS).encode(), _zig_version().encode(),
                 platform.machine().encode(), sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    suffix = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir() / f"{name}-{h.hexdigest()[:16]}{suffix}"


def _compile(source_path: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.stem + "-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [sys.executable, "-m", "ziglang", "cc", *_FLAGS, "-o", tmp, str(source_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise OSError(f"zig cc failed: {proc.stderr.strip()[:2000]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(name: str, source_path: Path) -> ctypes.PyDLL | None:
    """The helper built from ``source_path``, building it on first use; None if unavailable.

    Loaded with ``PyDLL``: calls keep the GIL. The helpers' functions run for
    microseconds, and releasing and re-taking the GIL around each call costs more than
    that in a host whose other threads are busy.
    """
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib: ctypes.PyDLL | None = None
        if disabled():
            _status[name] = "disabled by TORPOR_NATIVE=0"
        else:
            try:
                source = source_path.read_bytes()
                path = _library_path(name, source)
                if not path.exists():
                    _compile(source_path, path)
                lib = ctypes.PyDLL(str(path))
                _status[name] = f"native ({path})"
            except (OSError, subprocess.SubprocessError) as exc:
                _status[name] = f"pure Python (native helper unavailable: {exc})"
                lib = None
        _loaded[name] = lib
        return lib


def status() -> dict[str, str]:
    """For each helper asked for so far: whether it is native (and where) or why not."""
    with _lock:
        return dict(_status)
