"""Host-side tools for the `inventory` example agent.

The policy names the handler (`handler = "inventory_tools:reserve"`). This is an
operator tool, not part of the agent: `torpor build` does not pack it into the bundle
(a bundle carries no host code), and the host finds it because its operator names this
directory (`torpor run inventory.torpor --tools-dir guest_sdk/examples/inventory`, or
`$TORPOR_TOOLS_PATH`). The host validates the
guest's JSON arguments against `ReserveArgs` (strictly: `"qty": "5"` is a structured
`invalid_args` error, not coerced) before calling `reserve(args, ctx)`.

Failures the agent can act on are raised as the host's `ToolError`: code
`tool_failed`, a message, and details (`available`) that arrive as members of the
error object the agent receives.

The warehouse is an in-process demo table; a real tool would call an inventory
service (and the agent would never see its credentials).
"""

from __future__ import annotations

import threading
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from host.tools.registry import ToolContext, ToolError


class ReserveArgs(BaseModel):
    """Arguments of `inventory.reserve`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    order_id: str = Field(min_length=1, max_length=64)
    sku: str = Field(min_length=1, max_length=64)
    qty: int = Field(gt=0, le=10_000)


class OutOfStock(ToolError):
    """Fewer units on hand than requested: a structured, actionable failure."""

    def __init__(self, sku: str, requested: int, available: int) -> None:
        super().__init__(
            "tool_failed",
            f"out of stock: {sku} (requested {requested}, available {available})",
            sku=sku,
            requested=requested,
            available=available,
        )


class UnknownSku(ToolError):
    def __init__(self, sku: str) -> None:
        super().__init__("tool_failed", f"unknown sku: {sku}", sku=sku)


INITIAL_STOCK: dict[str, int] = {"apple": 10, "pear": 2, "plum": 0, "fig": 25}

_lock = threading.Lock()
_stock: dict[str, int] = dict(INITIAL_STOCK)
_reservations: dict[str, int] = {}


def reset() -> None:
    """Restore the demo warehouse (tests)."""
    with _lock:
        _stock.clear()
        _stock.update(INITIAL_STOCK)
        _reservations.clear()


def reserve(args: ReserveArgs, ctx: ToolContext | None = None) -> dict[str, Any]:
    """Reserve `qty` units of `sku` for `order_id`.

    Returns {"reservation_id": str, "remaining": int}; raises OutOfStock when
    fewer than `qty` units are on hand and UnknownSku for SKUs not carried.
    """
    with _lock:
        if args.sku not in _stock:
            raise UnknownSku(args.sku)
        have = _stock[args.sku]
        if have < args.qty:
            raise OutOfStock(args.sku, args.qty, have)
        _stock[args.sku] = have - args.qty
        n = _reservations.get(args.order_id, 0) + 1
        _reservations[args.order_id] = n
        return {"reservation_id": f"{args.order_id}/{n}", "remaining": have - args.qty}
