"""The rooms of ARCHITECTURE.md, checked: which room may import which, no import cycles,
and only the CLI parses command lines.

The imports are read from the source (every ``import`` and ``from ... import`` statement,
also those inside functions, which is where a lazy import hides a cycle), so a later
change cannot break the direction silently. The checker is run once on a planted upward
import to show that it can fail.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("host", "policies", "snapshots", "guest_sdk", "bench")

# Module-name prefix -> room; the longest prefix wins.
ROOMS = {
    "policies": "policies",
    "snapshots": "snapshots",
    "guest_sdk": "guest_sdk",
    "bench": "bench",
    "host": "floor",  # host/__init__, errors, ids, paths: what every room of host/ may use
    "host.sandbox": "sandbox",
    "host.trust": "trust",
    "host.tools": "tools",
    "host.runtime": "runtime",
    "host.cli": "cli",
    "host.server": "server",
}

# Room -> the rooms it may import (besides itself). The direction is one way:
# policies and snapshots know nothing of host; the sandbox nothing of the runtime;
# only the CLI sits above the runtime, and only it reaches into bench (lazily).
ALLOWED = {
    "policies": set(),
    "snapshots": set(),
    "guest_sdk": set(),
    "floor": set(),
    "sandbox": {"floor", "policies", "snapshots"},
    "trust": {"floor", "policies", "snapshots"},
    "tools": {"floor", "policies", "snapshots"},
    "runtime": {"floor", "sandbox", "trust", "tools", "policies", "snapshots"},
    "server": {"floor", "sandbox", "trust", "tools", "runtime", "policies", "snapshots"},
    "cli": {"floor", "sandbox", "trust", "tools", "runtime", "server", "policies", "snapshots", "bench"},
    "bench": {"floor", "sandbox", "trust", "tools", "runtime", "server", "policies", "snapshots", "guest_sdk"},
}

# Rooms that are libraries: they take arguments, not command lines.
NO_ARGPARSE = {"policies", "snapshots", "guest_sdk", "floor", "sandbox", "trust", "tools", "runtime", "server"}


def room_of(module: str) -> str | None:
    best = None
    for prefix in ROOMS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    return ROOMS[best] if best is not None else None


def modules(root: Path) -> Iterator[tuple[str, Path]]:
    """Every Python module of the project's packages (bundled example tools aside: they
    are agent code's host-side tools, loaded from a bundle, not part of the host)."""
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if "examples" in rel.parts or "results" in rel.parts:
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def imports_of(module: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in known else base), node.lineno


def check(root: Path) -> list[str]:
    """Every broken rule under ``root``, one readable line each."""
    mods = dict(modules(root))
    known = set(mods)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        room = room_of(mod)
        assert room is not None, mod
        for target, line in imports_of(mod, path, known):
            where = f"{path.relative_to(root)}:{line}"
            if target == "argparse" and room in NO_ARGPARSE:
                problems.append(f"{where}: {mod} imports argparse; only the CLI parses command lines")
            target_room = room_of(target)
            if target_room is None:
                continue  # the standard library or a third-party package
            if target_room != room and target_room not in ALLOWED[room]:
                problems.append(f"{where}: {mod} ({room}) imports {target} ({target_room}), "
                                f"which the {room} room may not import")
            # A package's __init__ importing its own submodules is no cycle: Python has the
            # package in sys.modules by then. Using a name from a package that is still
            # initialising is, and that is an edge to the package itself.
            if target in known and target != mod:
                graph[mod].add(target)
    problems.extend(f"import cycle among: {', '.join(cycle)}" for cycle in _cycles(graph))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_room() -> None:
    assert all(room_of(m) is not None for m, _ in modules(ROOT))
    rooms = {room_of(m) for m, _ in modules(ROOT)}
    assert rooms == set(ALLOWED), rooms


def test_imports_point_one_way_and_never_in_a_cycle() -> None:
    problems = check(ROOT)
    assert not problems, "\n".join(problems)


def test_architecture_md_names_every_room() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for pkg in sorted({m for m, p in modules(ROOT) if p.name == "__init__.py"}):
        assert pkg.replace(".", "/") + "/" in text, f"ARCHITECTURE.md does not describe {pkg}/"


def test_the_checker_finds_an_upward_import_an_argparse_and_a_cycle(tmp_path: Path) -> None:
    """The rules can fail: plant one of each violation in a copy of the tree."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "results"))
    assert check(tmp_path) == []
    abi = tmp_path / "host" / "sandbox" / "abi.py"
    abi.write_text(abi.read_text() + "\n\ndef _late() -> None:\n    from host.runtime import host  # upward\n")
    (tmp_path / "policies" / "cli_bits.py").write_text("import argparse\n")
    (tmp_path / "snapshots" / "ping.py").write_text("from snapshots import pong\n")
    (tmp_path / "snapshots" / "pong.py").write_text("from . import ping\n")
    problems = check(tmp_path)
    assert any("host.sandbox.abi (sandbox) imports host.runtime.host (runtime)" in p for p in problems), problems
    assert any("policies.cli_bits imports argparse" in p for p in problems), problems
    assert any(p.startswith("import cycle among:") and "snapshots.ping" in p and "snapshots.pong" in p
               for p in problems), problems
