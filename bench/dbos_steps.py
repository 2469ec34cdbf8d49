"""DBOS Transact on SQLite doing ``torpor bench steps``'s work: the baseline of issue 19.

Why DBOS: it is what a Python user would pick for durable steps without a server (PyPI
``dbos``, its system database in one SQLite file). The work is the same as the ``steps``
agent's: a workflow of N durable steps, each incrementing a counter (the step's output,
checkpointed by DBOS before the next step runs, as Torpor journals each ``kv.incr``);
once as one workflow, once as many concurrent workflows. DBOS runs as shipped: SQLite's
defaults (rollback journal, ``synchronous=FULL``), so a step is on stable storage once
it returns, as a Torpor call is at ``sync``.

DBOS is a process-wide singleton; each measurement launches it on a fresh SQLite file in
a temporary directory and destroys it after. Only the ``bench`` extra installs it: the
caller gets None when it is missing, and the benchmark says so instead of a figure.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from host.errors import TorporError

__all__ = ["available", "dbos_steps"]


def available() -> bool:
    """Whether ``dbos`` is installed (``pip install -e '.[bench]'``)."""
    try:
        import dbos  # noqa: F401
    except ImportError:
        return False
    return True


def dbos_steps(n_one: int, workflows: int, n_each: int) -> dict[str, Any]:
    """Steps per second of one workflow of ``n_one`` steps and of ``workflows`` concurrent
    workflows of ``n_each`` steps, each step a durable counter increment."""
    from dbos import DBOS

    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-dbos-"))
    for name in ("dbos", "sqlalchemy"):  # DBOS logs every launch and recovery pass at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        DBOS(config={"name": "torpor-bench-steps", "system_database_url": f"sqlite:///{tmp / 'dbos.sqlite'}",
                     "log_level": "WARNING", "run_admin_server": False})  # type: ignore[typeddict-unknown-key, unused-ignore]

        @DBOS.step()  # type: ignore[untyped-decorator, unused-ignore]
        def incr(count: int) -> int:
            return count + 1

        @DBOS.workflow()  # type: ignore[untyped-decorator, unused-ignore]
        def steps(n: int) -> int:
            count = 0
            for _ in range(n):
                count = incr(count)
            return count

        DBOS.launch()
        try:
            if steps(3) != 3:  # warm up: the schema, the pool's connections
                raise TorporError("DBOS steps workflow answered wrongly")
            t0 = time.perf_counter()
            got = steps(n_one)
            one_s = time.perf_counter() - t0
            if got != n_one:
                raise TorporError(f"DBOS workflow counted {got}, not {n_one}")
            t0 = time.perf_counter()
            handles = [DBOS.start_workflow(steps, n_each) for _ in range(workflows)]
            results = [h.get_result() for h in handles]
            many_s = time.perf_counter() - t0
            if any(r != n_each for r in results):
                raise TorporError("a concurrent DBOS workflow counted wrongly")
        finally:
            DBOS.destroy(destroy_registry=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import dbos as _dbos

    return {"version": getattr(_dbos, "__version__", None) or _version(),
            "one_workflow_steps": n_one, "one_workflow_steps_per_s": round(n_one / one_s),
            "one_step_mean_us": round(one_s / n_one * 1e6, 1),
            "workflows": workflows, "steps_each": n_each,
            "concurrent_steps_per_s": round(workflows * n_each / many_s)}


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dbos")
    except PackageNotFoundError:  # pragma: no cover - imported but not installed as a distribution
        return None
