"""policies/ decides and never acts: guard its imports.

The engine must stay a pure function of its inputs (no clock, no store, no
runtime), so that decisions can be replayed from the audit log and the package
can be used without the host.  Reading the policy file (pathlib, tomllib) is
the one I/O it is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import policies

PACKAGE = Path(policies.__file__).parent
FORBIDDEN = {
    "wasmtime",
    "anyio",
    "asyncio",
    "lmdb",
    "zstandard",
    "host",
    "snapshots",
    "time",
    "datetime",
    "random",
    "os",
    "subprocess",
    "socket",
    "importlib",
    "threading",
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_policies_imports_nothing_that_acts() -> None:
    offenders = {
        f"{p.name}: {sorted(imported_modules(p) & FORBIDDEN)}"
        for p in PACKAGE.glob("*.py")
        if imported_modules(p) & FORBIDDEN
    }
    assert not offenders


def test_only_the_loader_touches_files() -> None:
    users = {
        p.name for p in PACKAGE.glob("*.py") if {"pathlib", "tomllib", "io"} & imported_modules(p)
    }
    assert users == {"schema.py"}
