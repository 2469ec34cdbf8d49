"""The module graph of a JavaScript or TypeScript agent: its own files and vendored packages.

Why the builder resolves and QuickJS parses: QuickJS's own parser is the one that knows
which imports a module makes, so the builder does not parse JavaScript twice. While
``torpor_js_init`` compiles the agent (:mod:`host.sandbox.js_runtime`), each import QuickJS
meets is a question to this graph: what does ``"./util.js"`` in ``lib/a.ts`` name
(:meth:`ModuleGraph.resolve`), and what is that module's source (:meth:`ModuleGraph.source`).
Every module is compiled, under its own name, into the agent's pristine image, so a stack
trace names ``lib/util.ts:12:5`` with no source map, and a spawn loads nothing.

Names are paths relative to the agent's directory (``agent.ts``, ``lib/util.js``,
``node_modules/left-pad/index.js``), and resolution never leaves that directory nor
touches the network: relative specifiers are probed the way TypeScript authors write
them (``./util``, ``./util.js`` for ``util.ts``, ``./dir`` for ``dir/index``), bare
ones are looked up in ``node_modules`` directories from the importer up to the agent's
directory, through the package's ``package.json`` (``"exports"`` with the ``import``,
``module`` and ``default`` conditions and ``./*`` subpath patterns; else ``"module"``,
``"main"`` or ``index.js``). A TypeScript module has its types blanked out
(:mod:`host.sandbox.ts_strip`), every position kept. CommonJS (``.cjs``, or a package
whose ``"type"`` is ``"commonjs"``) is refused: an ES module runtime cannot ``require``.

What cannot be resolved is a :class:`~host.errors.ToolchainError` naming the importing
file, line and column and the specifier. A cycle of imports is legal in ES modules and
compiles; :meth:`ModuleGraph.cycle_note` describes it so that a binding read before its
module ran (a ``ReferenceError`` at run time) says which modules form the cycle.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host.errors import ToolchainError

#: The module every agent imports: built into the runtime, never a file.
TORPOR_MODULE = "torpor"
#: Extensions of an ES module, in the order an extensionless specifier probes them.
EXTENSIONS = (".ts", ".mts", ".js", ".mjs")
#: The conditions of package.json "exports" an agent's import matches, besides "default".
CONDITIONS = frozenset({"torpor", "import", "module", "default"})
#: The most modules and bytes of source one agent may bundle.
MAX_MODULES = 4096
MAX_TOTAL_SOURCE = 16 << 20


def entry_file(agent_dir: Path) -> Path:
    """The agent's entry module: ``agent.js``, else ``agent.ts``."""
    js = agent_dir / "agent.js"
    if not js.is_file() and (agent_dir / "agent.ts").is_file():
        return agent_dir / "agent.ts"
    return js


@dataclass
class ModuleGraph:
    """The modules of one agent as the build discovers them (see the module docstring).

    ``sources`` may hold modules given in memory (by name) instead of files on disk.
    """

    root: Path
    entry: str
    sources: dict[str, str] = field(default_factory=dict)
    edges: dict[str, list[str]] = field(default_factory=dict)
    total: int = 0
    #: The first resolution error, exactly as raised (the C side only sees its text).
    failure: ToolchainError | None = None

    @classmethod
    def of_dir(cls, agent_dir: Path) -> ModuleGraph:
        entry = entry_file(agent_dir)
        return cls(root=agent_dir.resolve(), entry=entry.name)

    @classmethod
    def single(cls, source: str, filename: str = "agent.js") -> ModuleGraph:
        """An agent of one module held in memory (imports only ``torpor``)."""
        return cls(root=Path("/nonexistent-torpor-agent"), entry=filename, sources={filename: source})

    # ---- the two questions the build asks ------------------------------------------

    def resolve(self, base: str, spec: str) -> str:
        """The name of the module ``spec`` imported from module ``base`` refers to."""
        try:
            name = self._resolve(base, spec)
            if name != TORPOR_MODULE and not name.endswith(EXTENSIONS):
                raise self._fail(base, spec, f"{name} is not a JavaScript or TypeScript module "
                                 f"({', '.join(EXTENSIONS)}); data goes in a module (export default {{...}})")
        except ToolchainError as exc:
            self.failure = self.failure or exc
            raise
        self.edges.setdefault(base, []).append(name)
        return name

    def source(self, name: str) -> str:
        """The JavaScript of module ``name`` (TypeScript with its types blanked out)."""
        try:
            return self._source(name)
        except ToolchainError as exc:
            self.failure = self.failure or exc
            raise

    def cycle_note(self) -> str:
        """``"a.js -> b.js -> a.js"`` for the first import cycle, or ``""``."""
        state: dict[str, int] = {}
        path: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            path.append(node)
            for nxt in self.edges.get(node, ()):
                if state.get(nxt) == 1:
                    return [*path[path.index(nxt):], nxt]
                if nxt not in state and (found := visit(nxt)):
                    return found
            path.pop()
            state[node] = 2
            return None

        found = visit(self.entry)
        return " -> ".join(found) if found else ""

    # ---- resolution ------------------------------------------------------------------

    def _where(self, base: str, spec: str) -> str:
        """``base:line:col`` of the first string literal ``spec`` in ``base``'s source."""
        text = self.sources.get(base, "")
        for quote in ('"', "'", "`"):
            at = text.find(quote + spec + quote)
            if at >= 0:
                line = text.count("\n", 0, at) + 1
                col = at - (text.rfind("\n", 0, at) + 1) + 1
                return f"{base}:{line}:{col}"
        return base

    def _fail(self, base: str, spec: str, why: str) -> ToolchainError:
        return ToolchainError(f"JavaScript module resolution failed: {self._where(base, spec)}: "
                              f"cannot import {spec!r}: {why}")

    def _resolve(self, base: str, spec: str) -> str:
        if spec == TORPOR_MODULE:
            return TORPOR_MODULE
        if base == TORPOR_MODULE:
            raise self._fail(base, spec, "the torpor module imports nothing")
        if spec.startswith(("./", "../")) or spec in (".", ".."):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(base), spec))
            if target == ".." or target.startswith("../"):
                raise self._fail(base, spec, "it is outside the agent's directory")
            found = self._probe(target)
            if found is None:
                raise self._fail(base, spec, f"no such module (looked for {target} with "
                                 f"{', '.join(EXTENSIONS)} and {target}/index)")
            return found
        if spec.startswith("/") or ":" in spec.split("/", 1)[0]:
            raise self._fail(base, spec, "an agent imports relative paths ('./x.js') or packages from "
                             "node_modules, not absolute paths or URLs (nothing is fetched at build)")
        return self._resolve_package(base, spec)

    def _file(self, name: str) -> bool:
        if name in self.sources:
            return True
        path = self.root / name
        try:
            return path.is_file() and path.resolve().is_relative_to(self.root)
        except OSError:
            return False

    def _probe(self, target: str) -> str | None:
        """``target`` as written, with an extension, ``.js`` meaning ``.ts``, or as a directory."""
        candidates = [target, *(target + ext for ext in EXTENSIONS)]
        stem, ext = posixpath.splitext(target)
        if ext in (".js", ".mjs"):
            candidates.append(stem + (".ts" if ext == ".js" else ".mts"))
        candidates += [posixpath.join(target, "index" + ext) for ext in EXTENSIONS]
        return next((c for c in candidates if self._file(c)), None)

    def _resolve_package(self, base: str, spec: str) -> str:
        parts = spec.split("/")
        if spec.startswith("@"):
            if len(parts) < 2 or not parts[1]:
                raise self._fail(base, spec, "a scoped package name needs '@scope/name'")
            pkg, rest = "/".join(parts[:2]), parts[2:]
        else:
            pkg, rest = parts[0], parts[1:]
        if not pkg or any(p in ("", ".", "..") for p in parts):
            raise self._fail(base, spec, "not a package name")
        subpath = "./" + "/".join(rest) if rest else "."
        directory = posixpath.dirname(base)
        while True:
            pkg_dir = posixpath.normpath(posixpath.join(directory, "node_modules", pkg))
            if (self.root / pkg_dir).is_dir():
                return self._package_entry(base, spec, pkg_dir, subpath)
            if directory in ("", "."):
                break
            directory = posixpath.dirname(directory)
        raise self._fail(base, spec, f"no package {pkg!r} under node_modules (vendor it into the agent's "
                         "directory: `torpor build` installs nothing)")

    def _package_json(self, base: str, spec: str, pkg_dir: str) -> dict[str, Any]:
        if not self._file(f"{pkg_dir}/package.json"):  # absent, or a link out of the agent's directory
            return {}
        path = self.root / pkg_dir / "package.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise self._fail(base, spec, f"{pkg_dir}/package.json is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise self._fail(base, spec, f"{pkg_dir}/package.json is not a JSON object")
        return data

    def _package_entry(self, base: str, spec: str, pkg_dir: str, subpath: str) -> str:
        meta = self._package_json(base, spec, pkg_dir)
        exports = meta.get("exports")
        if exports is not None:
            target = _match_exports(exports, subpath)
            if target is None:
                raise self._fail(base, spec, f"{pkg_dir}/package.json \"exports\" has no {subpath!r} for an "
                                 "ES module import (conditions: import, module, default)")
            if not target.startswith("./"):
                raise self._fail(base, spec, f"{pkg_dir}/package.json \"exports\" maps {subpath!r} to "
                                 f"{target!r}, which is not inside the package")
            name = posixpath.normpath(posixpath.join(pkg_dir, target))
            if not name.startswith(pkg_dir + "/") or not self._file(name):
                raise self._fail(base, spec, f"{pkg_dir}/package.json \"exports\" names {target!r}, "
                                 "which is not a file of the package")
            return self._esm_only(base, spec, name, meta)
        if subpath == ".":
            for key in ("module", "main"):
                value = meta.get(key)
                if isinstance(value, str) and value:
                    found = self._probe(posixpath.normpath(posixpath.join(pkg_dir, value)))
                    if found is not None and found.startswith(pkg_dir + "/"):
                        return self._esm_only(base, spec, found, meta if key == "main" else {})
            found = self._probe(posixpath.join(pkg_dir, "index"))
        else:
            found = self._probe(posixpath.normpath(posixpath.join(pkg_dir, subpath)))
        if found is None or not found.startswith(pkg_dir + "/"):
            raise self._fail(base, spec, f"the package at {pkg_dir} has no module for {subpath!r}")
        return self._esm_only(base, spec, found, meta)

    def _esm_only(self, base: str, spec: str, name: str, meta: dict[str, Any]) -> str:
        if name.endswith(".cjs") or (meta.get("type") == "commonjs" and name.endswith(".js")):
            raise self._fail(base, spec, f"{name} is a CommonJS module; a Torpor agent imports ES modules only "
                             "(use the package's ESM build)")
        return name

    # ---- sources ---------------------------------------------------------------------

    def _source(self, name: str) -> str:
        if name in self.sources:
            text = self.sources[name]
        else:
            if len(self.sources) >= MAX_MODULES:
                raise ToolchainError(f"the agent imports more than {MAX_MODULES} modules")
            path = self.root / name
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ToolchainError(f"cannot read {name}: {exc}") from None
        self.total += len(text.encode("utf-8"))
        if self.total > MAX_TOTAL_SOURCE:
            raise ToolchainError(f"{name}: the agent's modules come to {self.total:,} bytes of source; "
                                 f"the limit is {MAX_TOTAL_SOURCE:,}")
        if "\0" in text:
            raise ToolchainError(f"{name}: a NUL character in the source")
        self.sources[name] = text
        if name.endswith((".ts", ".mts")):
            from host.sandbox.ts_strip import strip_types

            return strip_types(text, name)  # positions kept: errors name the .ts line
        return text


def _match_exports(exports: Any, subpath: str) -> str | None:
    """What package.json ``"exports"`` maps ``subpath`` to for an ES module import (Node's
    algorithm: subpath keys, ``*`` patterns, nested conditions, arrays as fallbacks)."""
    if isinstance(exports, str | list) or (isinstance(exports, dict) and not any(
            k.startswith(".") for k in exports)):
        return _conditions(exports) if subpath == "." else None
    if not isinstance(exports, dict):
        return None
    if subpath in exports:
        return _conditions(exports[subpath])
    best: tuple[str, str] | None = None
    for key in exports:
        if key.count("*") != 1:
            continue
        head, tail = key.split("*")
        fits = subpath.startswith(head) and subpath.endswith(tail) and len(subpath) >= len(head) + len(tail)
        if fits and (best is None or len(head) > len(best[0].split("*")[0])):  # the longest prefix wins
            best = (key, subpath[len(head):len(subpath) - len(tail)])
    if best is None:
        return None
    target = _conditions(exports[best[0]])
    return None if target is None else target.replace("*", best[1])


def _conditions(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return next((t for v in value if (t := _conditions(v)) is not None), None)
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in CONDITIONS:
                found = _conditions(sub)
                if found is not None:
                    return found
    return None
