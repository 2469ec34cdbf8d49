"""What an operator tunes about a server: body caps, rate limits, how long a drain may take."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerConfig:
    """Limits of one ``torpor serve``.

    Rates are requests per second, refilled continuously, with ``*_burst`` requests allowed
    at once (a token bucket per operator token and one per tenant). ``max_body_bytes`` caps
    every request body but bundle uploads, which ``max_bundle_bytes`` caps. ``drain_timeout``
    is how long SIGTERM waits for running agents to reach their end or park before it
    interrupts them at their next safe point (they stay at their last checkpoint).
    """

    max_body_bytes: int = 1 << 20
    max_bundle_bytes: int = 64 << 20
    token_rate: float = 100.0
    token_burst: int = 500
    tenant_rate: float = 500.0
    tenant_burst: int = 2000
    #: Requests without a valid token, per client address (each one is audited).
    anonymous_rate: float = 20.0
    anonymous_burst: int = 100
    drain_timeout: float = 10.0
    #: The longest a ``wait`` (run or long poll) may hold a request.
    max_wait_s: float = 300.0
    #: How often refused requests are written to the host's audit chain (batched: a flood
    #: of refusals costs one commit per interval, not one per request).
    audit_flush_s: float = 0.25
    #: Offer the registry's agents as MCP tools at ``/mcp`` (``torpor serve --mcp``).
    mcp: bool = False
    #: In a fleet: how many work messages this host drives at once (None: its pool's size;
    #: 0: a gateway only, driving nothing), and the work queue's ack wait (None: twice the lease).
    work_slots: int | None = None
    work_ack_wait: float | None = None
