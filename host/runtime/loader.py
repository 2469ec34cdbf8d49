"""From a bundle to what an agent runs with: the stored bundle, the compiled module
linked under the policy's grants, the tools the policy names, the limits of a run.

The tools come from the operator (:class:`~host.tools.sources.ToolSources`): a bundle's
own Python is refused before anything of it loads, unless the operator trusts that bundle.

Every agent load goes through :class:`BundleLoader`, and each piece is made once per
bundle (per module for the compiled code): spawning the thousandth agent of a bundle
costs a dictionary lookup, not a link.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from host.errors import TorporError
from host.sandbox import bundle as bundle_mod
from host.sandbox import imports, validate
from host.sandbox import wasi as wasi_imports
from host.sandbox.bundle import Bundle
from host.sandbox.engine import Engine, LoadedModule
from host.sandbox.execution import Limits
from host.tools import mcp_config
from host.tools.builtin import BUILTINS
from host.tools.mcp_config import OperatorConfig
from host.tools.registry import ToolSpec, spec_from_function
from host.tools.sources import ToolSources
from snapshots.errors import RecordCorrupt
from snapshots.store import AgentStore, WriteTxn

DEFAULT_FUEL = 1_000_000_000
DEFAULT_MEMORY = validate.DEFAULT_MEMORY
DEFAULT_DEADLINE_S = 30.0
WASM_PAGE = validate.WASM_PAGE

#: The tool specs a policy grants, and its custom validators, by reference.
Tools = tuple[dict[str, ToolSpec], dict[str, Any]]


class BundleLoader:
    """Bundles kept in the store, their modules compiled and linked, their tools loaded."""

    def __init__(self, store: AgentStore, engine: Engine, sources: ToolSources | None = None, *,
                 max_memory: int | None = None, mcp_config: OperatorConfig | None = None) -> None:
        self.store = store
        self.engine = engine
        self.sources = sources if sources is not None else ToolSources()
        self.max_memory = max_memory  # the operator's cap on any agent's memory (validate.max_memory)
        self.mcp_config = mcp_config  # how this host starts or reaches the MCP servers policies name
        self._bundles: dict[str, Bundle] = {}
        self._tools: dict[str, Tools] = {}

    def register(self, b: Bundle) -> None:
        """Keep the bundle in the store so any later resume can find the exact module."""
        if b.digest in self._bundles:
            return
        self._bundles[b.digest] = b
        self.store.transact(lambda txn: store_bundle(txn, b))

    def by_digest(self, digest: str) -> Bundle:
        """The bundle an agent was spawned from, from memory or the store.

        Content-addressed, so checked twice before use: the store checks the bytes
        against the digest they were sealed with (RecordCorrupt), and the bundle they
        load must be the one its key names (a bundle stored before seals existed, or
        put under another bundle's key, is refused here: ``record_corrupt``).
        """
        b = self._bundles.get(digest)
        if b is None:
            b = stored_bundle(self.store, digest)
            self._bundles[digest] = b
        return b

    def bundle_code(self, b: Bundle) -> dict[str, str] | None:
        """The bundle's host code (Python members, MCP server commands) and their digests if
        the operator trusts it, None if it brings none; :class:`~host.errors.BundleCodeRefused`
        otherwise. Asked before anything of the bundle is loaded, started or stored.

        A server the operator config provides is started as the operator says, never by the
        bundle's own command line (the deprecated form): that is no code of the bundle's here."""
        mine = mcp_config.configured_by_operator(b.policy, self.mcp_config)
        code = {k: v for k, v in b.host_code.items() if not (k.startswith("mcp.") and k[4:] in mine)}
        return self.sources.admit(b.digest, b.name, code)

    def tools(self, b: Bundle) -> Tools:
        """The tool specs and custom validators a bundle's policy names (loaded once).

        Every reference resolves to an operator tool, or to the bundle's own Python only
        once :meth:`bundle_code` admitted it (checked here again: no path loads it without).
        Every MCP server the policy names must be one this host provides (its operator config,
        or the policy's own deprecated command): refused here, before the agent starts, not
        at its first call (``mcp_server_not_configured``).
        """
        cached = self._tools.get(b.digest)
        if cached is None:
            mcp_config.require(b.policy, self.mcp_config)
            python = b.python if self.bundle_code(b) is not None else {}  # refused here if not trusted
            tools: dict[str, ToolSpec] = {}
            for name, grant in b.policy.grants.items():
                if grant.handler:
                    fn = self.sources.resolve(grant.handler, bundle_digest=b.digest, bundle_python=python)
                    spec = spec_from_function(fn, name=name, idempotent=grant.idempotent)
                elif name in BUILTINS:
                    spec = BUILTINS[name]
                    if spec.idempotent and not grant.idempotent:  # a policy may only tighten
                        spec = dataclasses.replace(spec, idempotent=False)
                else:
                    continue  # granted but not implemented here: calls answer `unknown_tool`
                tools[name] = spec
            validators = {ref: self.sources.resolve(ref, bundle_digest=b.digest, bundle_python=python)
                          for ref in b.policy.custom_validator_refs}
            cached = (tools, validators)
            self._tools[b.digest] = cached
        return cached

    def module(self, b: Bundle) -> tuple[LoadedModule, Any]:
        """The compiled module and the ``InstancePre`` for a bundle.

        The module is checked against the ABI, the host's limits, the operator's memory cap
        and its policy (memory, imports) from its headers before it is compiled or instantiated.
        """
        validate.check_policy(self.engine.validate(b.module, b.module_digest), b.policy, max_memory=self.max_memory)
        loaded = self.engine.load(b.module, b.module_digest)
        has_tools = bool(b.policy.grants)
        wasi = frozenset(b.policy.wasi_allow)

        def make_linker(eng: Any) -> Any:
            import wasmtime

            linker = wasmtime.Linker(eng)
            imports.define(linker, tools=has_tools)
            if wasi:
                wasi_imports.define(linker, loaded.module, wasi)
            return linker

        pre = loaded.instance_pre(("v1", has_tools, wasi), make_linker)
        if has_tools and not loaded.suspendable:
            raise TorporError("the module imports tool_call but was not transformed for suspension; "
                              "repack it with `torpor pack`", code="invalid_module")
        return loaded, pre


def store_bundle(txn: WriteTxn, b: Bundle) -> None:
    """Keep a verified bundle's bytes under its digest, in the caller's transaction: the one
    writer of the ``bundles`` bucket (a run registers its bundle, the registry pushes one)."""
    try:
        stored = txn.get_blob("bundles", b.digest)
    except RecordCorrupt:
        stored = None  # a damaged copy: these bytes have the digest, so they repair it
    if stored is None:
        txn.put_blob("bundles", b.digest, b.raw)


def stored_bundle(store: AgentStore, digest: str) -> Bundle:
    """The bundle kept in the store under ``digest``, verified to be that bundle."""
    with store.read() as txn:
        raw = txn.get_blob("bundles", digest)
    if raw is None:
        raise TorporError(f"bundle {digest[:12]} is no longer in the store", code="bundle_missing")
    b = bundle_mod.load_bytes(raw, source=f"bundle {digest[:12]}")
    if b.digest != digest:
        raise TorporError(f"bundle {digest} in the store does not match its digest (it holds bundle "
                          f"{b.digest[:12]}: changed on disk)", code="record_corrupt")
    return b


def limits_for(b: Bundle, fuel: int | None, fuel_used: int = 0, max_memory: int | None = None) -> Limits:
    """Limits for one run: per-run fuel on top of what was used, capped by the total; the
    policy's memory budget, or the operator's cap ``max_memory`` when that is smaller."""
    budgets = b.policy.budgets
    per_run = int(fuel if fuel is not None else (budgets.fuel or DEFAULT_FUEL))
    cap = fuel_used + per_run
    if budgets.fuel_total is not None:
        cap = min(cap, int(budgets.fuel_total))
    return Limits(fuel=cap, memory_bytes=validate.memory_limit(b.policy, max_memory),
                  deadline_s=float(budgets.wall_clock or DEFAULT_DEADLINE_S))
