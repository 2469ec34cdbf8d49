"""Where a policy's ``handler = "module:function"`` (and ``custom`` validator) comes from.

A policy travels inside a bundle, and a bundle is not trusted; the host process is. So a
reference in a policy is only a *name*: it resolves to code the operator registered, and
never to whatever Python can import (``os:system`` is importable; it is not a tool). The
operator's tools, in the order they are looked up:

1. callables handed to the embeddable host (``Host(handlers={"mod:func": fn})``);
2. installed packages that register tools through the entry-point group
   :data:`ENTRY_POINT_GROUP` (``name = "package.module:function"``); a reference matches an
   entry point's name or its value, and loads exactly that object;
3. directories the operator names (``--tools-dir DIR``, ``$TORPOR_TOOLS_PATH``,
   ``Host(tools_dirs=[...])``): ``mod:func`` is the function ``func`` defined in ``DIR/mod.py``
   (the first directory that has ``mod.py`` wins, as in ``PATH``).

A bundle may still carry Python (``tools/NAME.py``, packed explicitly), and its policy may
name MCP servers (``[mcp.NAME] command = ...``) for the host to start; either is code that
runs with the host's privileges, so such a bundle is refused
(:class:`~host.errors.BundleCodeRefused`) unless the operator trusts that very bundle by its
digest (``--trust-bundle-code DIGEST``, ``Host(trust_bundle_code=[...])``). Only then may its
modules answer references, and never one an operator tool also answers (that is refused:
a bundle does not shadow the operator's tools).

No module the host loads from a file goes into ``sys.modules`` under its own name: a tools
directory's ``json.py`` or a bundle's ``os.py`` is not ``json`` or ``os`` for anyone else,
two bundles' ``tools.py`` never meet, and nothing is added to ``sys.path``. Each is
registered under a private name made of where it came from and its content's digest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from host.errors import BundleCodeRefused, ConfigError, HandlerNotRegistered

#: The entry-point group installed packages register tools in (``name = "module:function"``).
ENTRY_POINT_GROUP = "torpor.tools"
#: Directories of operator tools, separated like ``PATH`` (``os.pathsep``).
TOOLS_PATH_ENV = "TORPOR_TOOLS_PATH"

_LOCK = threading.RLock()  # loading a module is not something two threads should do at once


def normalize_digest(digest: str) -> str:
    """A bundle digest as the host compares it: 64 lower-case hex digits (``sha256:`` allowed).

    A prefix is not enough: trusting code on a short prefix would let anyone with a
    few hours of hashing present another bundle under it.
    """
    d = digest.strip().lower().removeprefix("sha256:")
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise ConfigError(f"--trust-bundle-code needs a bundle's full digest (64 hex digits, as `torpor "
                          f"inspect-bundle` prints it), got {digest[:80]!r}")
    return d


def dirs_from_env(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The directories ``$TORPOR_TOOLS_PATH`` names, in order (empty entries skipped)."""
    value = (os.environ if environ is None else environ).get(TOOLS_PATH_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p]


def entry_point_tools() -> dict[str, str]:
    """The installed ``torpor.tools`` entry points, name -> value (for ``torpor doctor``)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


class ToolSources:
    """The operator's tools, and the bundles whose own Python the operator trusts."""

    def __init__(self, *, handlers: Mapping[str, Callable[..., Any]] | None = None,
                 tools_dirs: Sequence[str | Path] | None = None, trust_bundle_code: Iterable[str] = (),
                 entry_points: bool = True) -> None:
        self.handlers = dict(handlers or {})
        for ref, fn in self.handlers.items():
            _split(ref)
            if not callable(fn):
                raise ConfigError(f"handlers[{ref!r}] is not callable")
        dirs = dirs_from_env() if tools_dirs is None else [Path(d) for d in tools_dirs]
        for d in dirs:
            if not d.is_dir():
                raise ConfigError(f"tools directory {d} is not a directory (--tools-dir, ${TOOLS_PATH_ENV})")
        self.tools_dirs = [d.resolve() for d in dirs]
        self.trusted = frozenset(normalize_digest(d) for d in trust_bundle_code)
        self._use_entry_points = entry_points
        self._entry_points: dict[str, importlib.metadata.EntryPoint] | None = None

    # -- a bundle's own Python --------------------------------------------------------------
    def admit(self, digest: str, name: str, code: Mapping[str, str]) -> dict[str, str] | None:
        """Whether a bundle may run here, before anything of it is loaded or started.

        ``code`` maps each piece of host code the bundle brings to its sha256: its Python
        members (``tools/NAME.py``) and the MCP servers its policy would start (``mcp.NAME``:
        a command line is code too). A bundle without any is admitted (None); one with some
        only if the operator trusts its digest, and then ``code`` is returned, for the audit.
        """
        if not code:
            return None
        if digest not in self.trusted:
            python = [c for c in sorted(code) if not c.startswith("mcp.")]
            servers = [c for c in sorted(code) if c.startswith("mcp.")]
            what = "; ".join(part for part in (
                f"Python that would run inside the host process ({', '.join(python)})" if python else "",
                f"MCP servers whose commands the host would start ({', '.join(servers)})" if servers else "",
            ) if part)
            raise BundleCodeRefused(
                f"bundle {name!r} ({digest}) carries host code, with the host's privileges: {what}; Torpor runs "
                f"a bundle's own code only for a bundle you trust: check it with `torpor inspect-bundle`, then "
                f"pass `--trust-bundle-code {digest}` (Host(trust_bundle_code=[digest]) when embedding), or "
                "install its tools as operator tools (--tools-dir, or the `torpor.tools` entry points) and run "
                "a bundle without them")
        return dict(sorted(code.items()))

    # -- references ---------------------------------------------------------------------------
    def resolve(self, ref: str, *, bundle_digest: str, bundle_python: Mapping[str, str]) -> Callable[..., Any]:
        """The callable a policy's ``module:function`` names, from the operator's tools, or
        from the bundle's own Python if (and only if) it was admitted as trusted.

        ``bundle_python`` maps the bundle's module names to their sources (empty unless the
        bundle was admitted).
        """
        mod, func = _split(ref)
        operator = self._operator(ref, mod, func)
        carried = mod in bundle_python and bundle_digest in self.trusted
        if operator is not None and carried:
            raise ConfigError(f"tool handler {ref!r} is both an operator tool ({operator[0]}) and a module the "
                              f"trusted bundle carries (tools/{mod}.py); a bundle never shadows the operator's tools: "
                              "rename the bundle's module")
        if operator is not None:
            return operator[1]()
        if carried:
            module = _bundle_module(mod, bundle_python[mod], bundle_digest)
            return _defined_function(module, mod, func, ref, f"the bundle's tools/{mod}.py")
        where = [f"{len(self.handlers)} given to the host"] if self.handlers else []
        where.append(f"{len(self._eps())} in the `{ENTRY_POINT_GROUP}` entry points")
        where.append("tools directories " + (", ".join(str(d) for d in self.tools_dirs) or "none"))
        raise HandlerNotRegistered(
            f"tool handler {ref!r} is not a registered operator tool ({'; '.join(where)}); a policy's handler "
            f"names a tool the operator installed: put {mod}.py in a directory given with --tools-dir (or "
            f"${TOOLS_PATH_ENV}), or register it in the `{ENTRY_POINT_GROUP}` entry-point group of an "
            "installed package")

    def _operator(self, ref: str, mod: str, func: str) -> tuple[str, Callable[[], Callable[..., Any]]] | None:
        """Where an operator tool answering ``ref`` is, and how to load it; None if none does."""
        if ref in self.handlers:
            fn = self.handlers[ref]
            return "given to the host", lambda: fn
        ep = self._eps().get(ref)
        if ep is not None:
            return f"entry point {ep.name} = {ep.value}", lambda: _load_entry_point(ep, ref)
        if mod.isidentifier():
            for d in self.tools_dirs:
                path = d / f"{mod}.py"
                if path.is_file():
                    return str(path), lambda p=path: _defined_function(_dir_module(mod, p), mod, func, ref, str(p))
        return None

    def _eps(self) -> dict[str, importlib.metadata.EntryPoint]:
        """The group's entry points by name and by value (read once: listing is not free)."""
        if self._entry_points is None:
            found: dict[str, importlib.metadata.EntryPoint] = {}
            if self._use_entry_points:
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    found.setdefault(ep.name, ep)
                    found.setdefault(ep.value.replace(" ", ""), ep)
            self._entry_points = found
        return self._entry_points


def _split(ref: str) -> tuple[str, str]:
    mod, sep, func = ref.partition(":")
    if not sep or not mod or not func.isidentifier():
        raise ConfigError(f"tool handler {ref!r} must look like `module:function`")
    return mod, func


def _load_entry_point(ep: importlib.metadata.EntryPoint, ref: str) -> Callable[..., Any]:
    try:
        with _LOCK:
            fn = ep.load()
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"tool handler {ref!r}: entry point {ep.name} = {ep.value} does not load: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not callable(fn):
        raise ConfigError(f"tool handler {ref!r}: entry point {ep.name} = {ep.value} is not callable")
    return typing.cast(Callable[..., Any], fn)


def _defined_function(module: types.ModuleType, mod: str, func: str, ref: str, where: str) -> Callable[..., Any]:
    """``func`` of ``module``, if it is a public function the module itself defines.

    Why so strict: a module's namespace also holds what it imported (``from subprocess
    import run``) and its classes; a policy may name the module's tools, not those.
    """
    fn = module.__dict__.get(func)
    if func.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
        raise HandlerNotRegistered(f"tool handler {ref!r}: {where} defines no public function {func!r} "
                                   "(a handler is a function defined in the tool module itself)")
    return typing.cast(Callable[..., Any], fn)


def _private_name(kind: str, origin: str, mod: str, source: bytes) -> str:
    tag = hashlib.sha256(origin.encode() + b"\0" + source).hexdigest()[:16]
    return f"torpor_{kind}_{tag}_{mod}"


def _dir_module(mod: str, path: Path) -> types.ModuleType:
    """``DIR/mod.py`` loaded once per content, under a private name (see the module doc)."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read tool module {path}: {exc.strerror}") from exc
    qual = _private_name("tools", str(path), mod, source)
    with _LOCK:
        module = sys.modules.get(qual)
        if module is not None:
            return module
        module = types.ModuleType(qual)
        module.__file__ = str(path)
        return _exec(module, qual, source, str(path), f"tool module {path}")


def _bundle_module(mod: str, source: str, digest: str) -> types.ModuleType:
    """A trusted bundle's module, namespaced by the bundle's digest: two bundles (or two
    versions of one agent) never share tool code, whatever their modules are called."""
    qual = _private_name("bundle", digest, mod, source.encode())
    with _LOCK:
        module = sys.modules.get(qual)
        if module is not None:
            return module
        module = types.ModuleType(qual)
        module.__file__ = f"<bundle {digest[:12]}>/tools/{mod}.py"
        return _exec(module, qual, source.encode(), module.__file__, f"the bundle's module tools/{mod}.py")


def _exec(module: types.ModuleType, qual: str, source: bytes, filename: str, what: str) -> types.ModuleType:
    # Registered before it runs (as import does), so that its classes resolve their module
    # (pydantic models, dataclasses); removed again if it fails.
    sys.modules[qual] = module
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except (Exception, SystemExit) as exc:  # a module that calls exit() while loading must not end the host
        del sys.modules[qual]
        raise ConfigError(f"{what} failed to load: {type(exc).__name__}: {exc}") from exc
    return module
