"""The runtime room: the :class:`Host` facade over agent lifecycle, the tool-call
pipeline, approvals, pools, fork, replay and the read-only queries.

``from host.runtime import Host`` is the public way in. The names are loaded on first
use, so that a light command (``torpor ps``) can import :mod:`host.runtime.queries`
without paying for Wasmtime and the whole runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host.paths import default_store_dir
    from host.runtime.host import Host, RunResult, run_sync

__all__ = ["Host", "RunResult", "default_store_dir", "run_sync"]

def __getattr__(name: str) -> Any:
    if name in ("Host", "RunResult", "run_sync"):
        from host.runtime import host

        return getattr(host, name)
    if name == "default_store_dir":
        from host.paths import default_store_dir

        return default_store_dir
    raise AttributeError(f"module 'host.runtime' has no attribute {name!r}")
