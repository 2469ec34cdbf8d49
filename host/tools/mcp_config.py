"""The operator's configuration of this host (``torpor.toml``): how to start or reach each MCP
server, and the named roots policies refer to.

Why it exists: a bundle travels between machines, so it must not say where a server's
executable, its working directory or its data live on one of them; and a command line (or
a URL the agent's credentials go to) is the operator's decision, never the bundle's.  A
policy names a server and what it needs of it (``[mcp.NAME]``: tools, argument rules,
credentials, roots relative to a named root); this file says how this host provides it::

    [roots]
    tickets = "/srv/tickets"                 # policy roots "tickets" and "tickets/2026" resolve here

    [mcp]
    home = "/var/lib/torpor/mcp-home"        # each server's HOME is HOME/NAME (created 0700)

    [mcp.servers.crm]
    command = "crm-mcp"                      # looked up on the server's own PATH
    args = ["--db", "/srv/crm/db"]
    cwd = "/srv/crm"
    env = { CRM_TOKEN = "{crm_token}" }      # {name}: a credential the policy grants the server
    inherit_env = ["LANG"]                   # host variables passed on by name

    [mcp.servers.tickets]
    url = "https://mcp.example.com/mcp"
    headers = { Authorization = "Bearer {tickets_token}" }

Where it is read from: ``torpor --config FILE``, else ``$TORPOR_CONFIG``, else
``torpor.toml`` in the user's configuration directory (``~/.config/torpor/torpor.toml`` on
Linux; absent there means an empty configuration).  Relative paths in it (``cwd``, ``home``,
roots, a ``command`` with a ``/``) are relative to the file's directory.

**A server's environment** is built here and nowhere else: ``PATH`` (:data:`DEFAULT_PATH`
unless the server's ``env`` sets it), ``HOME`` (a directory of the server's own), the host
variables ``inherit_env`` names, and the server's ``env`` with ``{credential}`` placeholders
filled from the secrets leased for the call, which are only those the policy grants.
Nothing else of the host's environment reaches the process.

A policy that still says itself how to start a server (``command``, ``url``: the
deprecated form) is used only where this file does not name that server; :func:`check`
says so, and refuses a policy naming a server that neither configures.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from host.errors import ConfigError, McpServerNotConfigured
from host.tools.mcp_transport import DEFAULT_STARTUP_TIMEOUT_S, ServerConfig
from host.tools.registry import ToolError
from policies.schema import (
    ROOT_NAME,
    Duration,
    ServerStart,
    check_env,
    fill_placeholders,
    placeholders,
    split_root,
)

CONFIG_ENV = "TORPOR_CONFIG"
CONFIG_NAME = "torpor.toml"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
"""A server's PATH unless its ``env`` sets one: the system's directories, never the host's PATH."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSpec(ServerStart):
    """``[mcp.servers.NAME]``: how this host starts (``command``) or reaches (``url``) one server."""

    inherit_env: tuple[StrictStr, ...] = ()
    home: StrictStr | None = None
    startup_timeout: Duration | None = None

    @field_validator("inherit_env")
    @classmethod
    def _inherit(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        check_env(dict.fromkeys(v, ""))
        return v

    @model_validator(mode="after")
    def _one_transport(self) -> ServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (a stdio server) and url (a streamable-HTTP server)")
        if self.url is not None and (self.args or self.env or self.cwd is not None or self.inherit_env
                                     or self.home is not None):
            raise ValueError("args, cwd, env, inherit_env and home start a process; a url server takes headers")
        if self.command is not None and self.headers:
            raise ValueError("headers are sent to a url server; a command server takes env instead")
        return self


class McpSection(_Closed):
    """``[mcp]``: where servers' homes are, and the servers."""

    home: StrictStr | None = None
    servers: dict[str, ServerSpec] = Field(default_factory=dict)

    @field_validator("servers")
    @classmethod
    def _names(cls, v: dict[str, ServerSpec]) -> dict[str, ServerSpec]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"{name!r} is not a server name; use letters, digits, '_' and '-'")
        return v


class _File(_Closed):
    roots: dict[str, StrictStr] = Field(default_factory=dict)
    mcp: McpSection = Field(default_factory=McpSection)

    @field_validator("roots")
    @classmethod
    def _root_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not ROOT_NAME.match(name):
                raise ValueError(f"{name!r} is not a root name; use letters, digits, '_' and '-'")
        return v


@dataclass(frozen=True)
class OperatorConfig:
    """This host's operator configuration, paths made absolute (see the module's docstring)."""

    source: str | None = None  # the file it was read from (None: no file, nothing configured)
    servers: Mapping[str, ServerSpec] = field(default_factory=dict)
    roots: Mapping[str, str] = field(default_factory=dict)
    home: str | None = None  # the directory of servers' homes (None: the user's state directory)

    def where(self) -> str:
        """The file, as a message names it."""
        return self.source or "no operator config file"

    def home_of(self, server: str) -> str:
        """The HOME a server of this name gets: its own directory."""
        return f"{self.home if self.home is not None else _default_homes()}/{server}"

    def root_uri(self, root: str) -> str:
        """A policy's root (``NAME`` or ``NAME/rel/path``; a ``file://`` URI is kept as it is)
        as the ``file://`` URI the server is told; KeyError for a root this config lacks."""
        parts = split_root(root)
        if parts is None:
            return root
        return _uri(self.roots[parts[0]], parts[1])


# Asked on every call (resolve runs per call): computed once per process, or per root.
@functools.cache
def _default_homes() -> str:
    import platformdirs

    return str(Path(platformdirs.user_state_dir("torpor")) / "mcp-home")


@functools.lru_cache(maxsize=1024)
def _uri(base: str, rest: str) -> str:
    return (Path(base) / rest if rest else Path(base)).as_uri()


EMPTY = OperatorConfig()


def default_path() -> Path:
    """``$TORPOR_CONFIG``, else ``torpor.toml`` in the user's configuration directory."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_config_dir("torpor")) / CONFIG_NAME


def load(path: str | Path | None = None) -> OperatorConfig:
    """The operator config at ``path`` (it must exist), or where :func:`default_path` says (a
    file that is not there: the empty configuration, unless ``$TORPOR_CONFIG`` named it)."""
    named = path is not None or bool(os.environ.get(CONFIG_ENV))
    p = Path(path) if path is not None else default_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if named:
            raise ConfigError(f"operator config {p}: no such file (named by "
                              f"{'--config' if path is not None else '$' + CONFIG_ENV})") from None
        return EMPTY
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"operator config {p}: cannot read it ({exc})") from None
    return parse(text, source=str(p.resolve()))


def parse(text: str, source: str = "<string>") -> OperatorConfig:
    """Check operator-config TOML; relative paths are taken from ``source``'s directory."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"operator config {source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"operator config {source}: values nest too deep") from None
    try:
        data = _File.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors()[:5])
        raise ConfigError(f"operator config {source}: {problems}") from None
    base = Path(source).parent if source.startswith("/") else Path.cwd()

    def absolute(p: str) -> str:
        return str(base / Path(p).expanduser())

    servers = {}
    for name, spec in data.mcp.servers.items():
        changes: dict[str, Any] = {}
        if spec.cwd is not None:
            changes["cwd"] = absolute(spec.cwd)
        if spec.home is not None:
            changes["home"] = absolute(spec.home)
        if spec.command is not None and "/" in spec.command:
            changes["command"] = absolute(spec.command)
        servers[name] = spec.model_copy(update=changes)
    return OperatorConfig(source=source, servers=servers, roots={n: absolute(d) for n, d in data.roots.items()},
                          home=None if data.mcp.home is None else absolute(data.mcp.home))


def _problem(e: Any) -> str:
    """One validation error, located; ``[mcp.NAME]`` (a policy's table) points at ``[mcp.servers.NAME]``."""
    loc = [str(p) for p in e["loc"]]
    if e["type"] == "extra_forbidden" and len(loc) == 2 and loc[0] == "mcp":
        return f"[mcp.{loc[1]}] is not a key of [mcp]: a server is configured as [mcp.servers.{loc[1]}]"
    return f"{'.'.join(loc) or '(top)'}: {e['msg']}"


# -- from a policy's [mcp.NAME] and this host's config to a server ----------------------------


def resolve(name: str, spec: Any, config: OperatorConfig | None, secrets: Mapping[str, str]) -> ServerConfig:
    """How to start or reach the server a policy's ``[mcp.NAME]`` (``spec``) names, on this host.

    The operator's ``[mcp.servers.NAME]`` when there is one; else the policy's own
    ``command``/``url`` (the deprecated form); else ``unavailable``
    (``server_not_configured``: a run is refused before it starts, see :func:`check`).
    ``{credential}`` placeholders are filled from ``secrets``, the credentials leased for this call.
    """
    config = config if config is not None else EMPTY
    op = config.servers.get(name)
    try:
        roots = tuple(config.root_uri(r) for r in spec.roots)
    except KeyError as exc:
        raise ToolError("unavailable", f"MCP server {name}: the policy's root {exc.args[0]!r} is not a root of "
                        f"this host's operator config ({config.where()})", reason_code="server_not_configured") from None
    startup = float(spec.startup_timeout or DEFAULT_STARTUP_TIMEOUT_S)
    try:
        if op is not None:
            if op.startup_timeout is not None:
                startup = float(op.startup_timeout)
            if op.url is not None:
                return ServerConfig(name=name, url=op.url, headers=_filled(op.headers, secrets), roots=roots,
                                    startup_timeout=startup)
            home = op.home or config.home_of(name)
            return ServerConfig(name=name, command=op.command, args=tuple(op.args), cwd=op.cwd, roots=roots,
                                startup_timeout=startup, home=None if "HOME" in op.env else home,
                                env=server_env(op.env, op.inherit_env, secrets, home))
        if spec.url is not None:
            return ServerConfig(name=name, url=spec.url, headers=_filled(spec.headers, secrets), roots=roots,
                                startup_timeout=startup)
        if spec.command is not None:
            home = config.home_of(name)
            return ServerConfig(name=name, command=str(spec.command), args=tuple(spec.args), cwd=spec.cwd,
                                roots=roots, startup_timeout=startup, home=None if "HOME" in spec.env else home,
                                env=server_env(spec.env, (), secrets, home))
    except KeyError as exc:
        raise ToolError("unavailable", f"MCP server {name}: credential {exc.args[0]!r} was not provided by the host",
                        reason_code="credential_missing") from None
    raise ToolError("unavailable", _not_configured(name, config), reason_code="server_not_configured")


def server_env(env: Mapping[str, str], inherit: tuple[str, ...], secrets: Mapping[str, str],
               home: str) -> tuple[tuple[str, str], ...]:
    """A stdio server's whole environment: PATH, HOME, the named host variables, its ``env``
    (placeholders filled; it may set PATH and HOME itself).  KeyError: a missing credential."""
    out = {"PATH": DEFAULT_PATH, "HOME": home}
    out.update({k: os.environ[k] for k in inherit if k in os.environ})
    out.update({k: fill_placeholders(v, secrets) for k, v in env.items()})
    return tuple(sorted(out.items()))


def _filled(table: Mapping[str, str], secrets: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, fill_placeholders(v, secrets)) for k, v in table.items()))


def _not_configured(name: str, config: OperatorConfig) -> str:
    return (f"the policy names MCP server {name!r}, which this host does not configure: add "
            f"[mcp.servers.{name}] (command = ... or url = ...) to the operator config "
            f"({config.source or 'none found: ' + str(default_path()) + '; --config FILE or $' + CONFIG_ENV})")


# -- checking a policy against this host ------------------------------------------------------


@dataclass
class Findings:
    """What :func:`check` found: ``errors`` refuse a run; ``notes`` are deprecations."""

    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check(policy: Any, config: OperatorConfig | None) -> Findings:
    """Whether this host can provide every MCP server a policy names, without starting any.

    An error for a server neither the operator config nor the policy itself configures, a
    root the operator config does not name, and an operator placeholder naming a credential
    the policy does not grant that server (it would never be filled); a note for each use of
    the deprecated form (a command or URL in the policy, ``file://`` roots).
    """
    config = config if config is not None else EMPTY
    out = Findings()
    for name, spec in sorted(getattr(policy, "mcp", {}).items()):
        op = config.servers.get(name)
        if op is None and not spec.self_started:
            out.errors.append(f"mcp.{name}: {_not_configured(name, config)}")
        elif op is None:
            what = "url" if spec.url is not None else "command"
            out.notes.append(f"mcp.{name}: the policy says itself how to start the server ({what}): deprecated; "
                             f"the bundle is tied to this machine and runs only with --trust-bundle-code; move "
                             f"{what} to [mcp.servers.{name}] of the operator config ({config.where()})")
        elif spec.self_started:
            out.notes.append(f"mcp.{name}: the policy's {'url' if spec.url is not None else 'command'} is ignored "
                             f"here: the operator config ({config.where()}) configures this server")
        for root in spec.roots:
            parts = split_root(root)
            if parts is None:
                out.notes.append(f"mcp.{name}.roots: {root!r} is a path of one machine: deprecated; name a root of "
                                 "the operator config ([roots] NAME = DIR) and a path under it")
            elif parts[0] not in config.roots:
                known = ", ".join(sorted(config.roots)) or "none"
                out.errors.append(f"mcp.{name}.roots: {root!r} names no root of this host's operator config "
                                  f"({config.where()}; its roots: {known})")
        if op is not None:
            granted = set(spec.credentials)
            for section, table in (("env", op.env), ("headers", op.headers)):
                for key, value in sorted(table.items()):
                    for ph in placeholders(value):
                        if ph not in granted:
                            out.errors.append(
                                f"mcp.{name}: the operator config's [mcp.servers.{name}].{section}.{key} needs the "
                                f"credential {ph!r}, which the policy does not grant this server (add it to "
                                f"[mcp.{name}].credentials)")
    return out


def require(policy: Any, config: OperatorConfig | None) -> None:
    """:func:`check`'s errors as one :class:`~host.errors.McpServerNotConfigured`, before a run starts."""
    errors = check(policy, config).errors
    if errors:
        raise McpServerNotConfigured("; ".join(errors))


def configured_by_operator(policy: Any, config: OperatorConfig | None) -> set[str]:
    """The servers of the policy this host's operator config starts or reaches (a bundle's own
    command or URL for them is never used, so it is no host code of the bundle's here)."""
    servers = (config or EMPTY).servers
    return {name for name in getattr(policy, "mcp", {}) if name in servers}


def survey(config: OperatorConfig) -> dict[str, Any]:
    """What ``torpor doctor`` says of the operator config, without starting anything: each
    server, how it is started or reached, and what stops it from starting here (a command
    not found on its PATH, a missing working directory); each root and whether it exists."""
    import shutil

    servers: dict[str, Any] = {}
    for name, op in sorted(config.servers.items()):
        problem = None
        if op.command is not None:
            path = op.env.get("PATH", DEFAULT_PATH)
            if shutil.which(op.command, path=path) is None:
                problem = (f"command {op.command!r} is not an executable on its PATH ({path}): give its absolute "
                           "path as `command`, or a PATH in `env`")
            elif op.cwd is not None and not Path(op.cwd).is_dir():
                problem = f"cwd {op.cwd} is not a directory"
        how = op.url if op.url is not None else " ".join((str(op.command), *op.args))
        servers[name] = {"how": how, "problem": problem}
    roots = {name: {"path": d, "exists": Path(d).is_dir()} for name, d in sorted(config.roots.items())}
    return {"file": config.source, "servers": servers, "roots": roots,
            "home": config.home or _default_homes()}
