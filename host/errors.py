"""Typed errors of the host.

Every error the host raises on purpose derives from :class:`TorporError` and
carries a stable machine-readable ``code`` beside a message a person can act
on. The CLI prints ``error[code]: message`` (or a JSON object with ``--json``)
and exits non-zero; embedders can catch the classes.
"""

from __future__ import annotations


class TorporError(Exception):
    """Base of all deliberate host errors."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ToolchainError(TorporError):
    """The guest toolchain failed: compiler missing, compile error, Binaryen failure."""

    code = "toolchain"


class ModuleError(TorporError):
    """A wasm module is malformed or does not follow the guest ABI."""

    code = "invalid_module"


class AbiVersionError(ModuleError):
    """The module was built for a guest ABI version this host does not implement."""

    code = "abi_version"


class ImportNotGranted(ModuleError):
    """The module imports something its policy does not grant."""

    code = "import_not_granted"


class MemoryLimitError(ModuleError):
    """The module declares more memory than its policy's budget (or the host) allows."""

    code = "memory_limit"


class BundleError(TorporError):
    """A bundle file is missing, truncated, corrupted or not a bundle."""

    code = "invalid_bundle"


class AgentNotFound(TorporError):
    """No agent with that id in the store."""

    code = "agent_not_found"


class AgentStateError(TorporError):
    """The agent is not in a state that allows the operation (e.g. resume of a finished agent)."""

    code = "invalid_state"


class LeaseLost(AgentStateError):
    """A host of a fleet tried to commit a step of an agent another host has taken over
    since (its lease expired): the step is refused, the other host's state stands."""

    code = "lease_lost"


class ConfigError(TorporError):
    """Invalid host configuration or command-line input."""

    code = "invalid_config"


class BundleCodeRefused(TorporError):
    """A bundle carries host code (Python, or MCP server commands in its policy), which would
    run with the host's privileges, and the operator did not say it trusts that bundle
    (``--trust-bundle-code DIGEST``)."""

    code = "bundle_code_refused"


class HandlerNotRegistered(ConfigError):
    """A policy names a tool handler or validator (``module:function``) that no operator
    tool provides: handlers resolve to registered tools, never to any importable callable."""

    code = "handler_not_registered"


class McpServerNotConfigured(ConfigError):
    """A policy names an MCP server this host cannot provide: its operator config
    (``torpor.toml``) does not configure it and the policy does not say itself how to start
    it, or names a root or a credential for it that neither provides. Raised when a run
    starts, before the agent does, never at its first call."""

    code = "mcp_server_not_configured"


class InvalidInput(TorporError):
    """A request's input is not what the API takes (not JSON, a field of the wrong type)."""

    code = "invalid_input"


class BundleNotFound(TorporError):
    """No bundle with that name, tag or digest (for this tenant)."""

    code = "bundle_not_found"


class Unauthenticated(TorporError):
    """A request without a valid operator token (none, unknown, revoked or expired)."""

    code = "unauthenticated"


class Forbidden(TorporError):
    """The operator token is valid but lacks the scope the request needs."""

    code = "forbidden"


class IdempotencyConflict(TorporError):
    """An idempotency key reused with a different request than the one it first named."""

    code = "idempotency_conflict"


class PayloadTooLarge(TorporError):
    """A request body over the server's cap."""

    code = "payload_too_large"


class RateLimited(TorporError):
    """Too many requests for a token or a tenant; ``retry_after`` says when to try again (seconds)."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(TorporError):
    """The server is draining (SIGTERM): it takes no new work."""

    code = "shutting_down"


class InvalidReference(ConfigError):
    """A registry name, tag, tenant or reference (``name``, ``name@tag``, ``sha256:<hex>``)
    that is not well formed."""

    code = "invalid_reference"


class ServerUnreachable(TorporError):
    """``torpor --server URL``: nothing answered there (connection refused, unknown host, timed out)."""

    code = "server_unreachable"


class BadServerAnswer(TorporError):
    """An answer that is not the Torpor API's (a wrong URL, a proxy's page, a body that is not its JSON)."""

    code = "bad_server_answer"


class McpServerError(TorporError):
    """An MCP server could not be asked (``torpor mcp tools``): not started, not reachable,
    a credential missing; the message says which and why."""

    code = "mcp_server"
