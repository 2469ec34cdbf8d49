"""Demo ERP and notification tools for the `procurement` example agent.

These are example tools, not product features: a tiny ERP (requester budgets,
vendors, quotes, purchase orders) and a notification outbox, kept in the host's
store so that their effects survive the host and are visible to later runs and
to other processes. The policy names each handler (`handler =
"procurement_tools:create_po"`). These are the operator's tools, not the agent's:
the bundle carries no Python (`torpor build` does not pack this file), and the host
finds the handlers because its operator names this directory
(`torpor run procurement.torpor --tools-dir guest_sdk/examples/procurement`, or
`$TORPOR_TOOLS_PATH`).

Every tool is *transactional* (`fn(args, ctx, txn)`): it reads and writes the
store through `txn.kv_get` / `txn.kv_set` inside the very transaction that
journals its result, so a purchase order is created, and a budget committed,
exactly once even if the host is killed at any moment. A tool checks everything
before it writes anything: a `ToolError` is an answer, journaled in the same
commit, so a write made before raising would be kept.

Namespaces (shared by every agent on the store, like a real ERP):

- ``procurement:erp``     ``seeded``, ``budget/<requester>``, ``vendor/<id>``,
                          ``category/<name>``, ``item/<item>``, ``quote/<id>``,
                          ``po/<id>``, ``seq/quote``, ``seq/po``
- ``procurement:notify``  ``outbox/<recipient>`` (a list of messages), ``seq``

The demo data (`DEMO_*`) is written the first time any tool runs on a store
(deterministically: same data, same ids, on every fresh store).

Failures the agent can act on are `ToolError("tool_failed", message, reason=...)`
with details: ``no_quote``, ``below_min_order``, ``vendor_on_hold``,
``quote_used``, ``insufficient_budget`` (with ``remaining``), ...
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from host.tools.registry import ToolContext, ToolError, tool

ERP = "procurement:erp"
NOTIFY = "procurement:notify"

# -- demo data ---------------------------------------------------------------------
DEMO_BUDGETS: dict[str, dict[str, Any]] = {
    # the seed article's persona: a finance manager (the policy holds the 50,000 spending authority)
    "finance-manager": {"cost_center": "CC-4100", "budget": 1_000_000, "committed": 0},
    "ops-lead": {"cost_center": "CC-2200", "budget": 30_000, "committed": 0},
}
DEMO_VENDORS: dict[str, dict[str, Any]] = {
    # contact details are personal data: they must never reach a notification
    "acme": {"name": "Acme Corp", "status": "active", "lead_time_days": 10, "min_order": 0,
             "contact": "sales@acme.example", "prices": {"laptops": 1250, "monitors": 240, "chairs": 310}},
    "globex": {"name": "Globex", "status": "on_hold", "hold_reason": "compliance review pending",
               "lead_time_days": 21, "min_order": 0, "contact": "+1 555 0100",
               "prices": {"laptops": 1190, "monitors": 230}},
    "initech": {"name": "Initech", "status": "active", "lead_time_days": 14, "min_order": 0,
                "contact": "bids@initech.example", "prices": {"monitors": 250, "chairs": 290}},
    "umbrella": {"name": "Umbrella", "status": "active", "lead_time_days": 5, "min_order": 25_000,
                 "contact": "orders@umbrella.example", "prices": {"laptops": 1310, "chairs": 280}},
}
DEMO_CATEGORIES: dict[str, list[str]] = {
    "it-hardware": ["acme", "globex", "initech", "umbrella"],
    "furniture": ["acme", "initech", "umbrella"],
}
DEMO_ITEMS: dict[str, str] = {"laptops": "it-hardware", "monitors": "it-hardware", "chairs": "furniture"}

ID = r"^[a-z][a-z0-9-]{1,31}$"


# -- store helpers -------------------------------------------------------------------
def _get(txn: Any, key: str, ns: str = ERP) -> Any:
    raw = txn.kv_get(ns, key)
    return None if raw is None else json.loads(raw)


def _put(txn: Any, key: str, value: Any, ns: str = ERP) -> None:
    txn.kv_set(ns, key, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def _next(txn: Any, key: str, ns: str = ERP) -> int:
    n = int(_get(txn, key, ns) or 0) + 1
    _put(txn, key, n, ns)
    return n


def seed(txn: Any) -> None:
    """Write the demo data unless this store already has it (idempotent, deterministic)."""
    if _get(txn, "seeded") is not None:
        return
    for rid, b in DEMO_BUDGETS.items():
        _put(txn, f"budget/{rid}", {"requester": rid, **b})
    for vid, v in DEMO_VENDORS.items():
        _put(txn, f"vendor/{vid}", {"vendor": vid, **v})
    for cat, vendors in DEMO_CATEGORIES.items():
        _put(txn, f"category/{cat}", vendors)
    for item, cat in DEMO_ITEMS.items():
        _put(txn, f"item/{item}", cat)
    _put(txn, "seeded", 1)


def _budget(txn: Any, requester: str) -> dict[str, Any]:
    b = _get(txn, f"budget/{requester}")
    if b is None:
        raise ToolError("tool_failed", f"no budget on file for requester {requester!r}",
                        reason="unknown_requester", requester=requester)
    b["remaining"] = int(b["budget"]) - int(b["committed"])
    return dict(b)


def _vendor(txn: Any, vendor: str) -> dict[str, Any]:
    v = _get(txn, f"vendor/{vendor}")
    if v is None:
        raise ToolError("tool_failed", f"unknown vendor {vendor!r}", reason="unknown_vendor", vendor=vendor)
    return dict(v)


# -- argument models (strict: the host rejects anything else as invalid_args) ---------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class BudgetArgs(_Strict):
    requester: str = Field(pattern=ID)


class VendorsArgs(_Strict):
    item: str = Field(min_length=1, max_length=64)


class QuoteArgs(_Strict):
    vendor: str = Field(pattern=ID)
    item: str = Field(min_length=1, max_length=64)
    amount: int = Field(gt=0)


class ValidateArgs(_Strict):
    quote_id: str = Field(min_length=1, max_length=32)
    requester: str = Field(pattern=ID)


class Line(_Strict):
    item: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0)
    total: int = Field(gt=0)


class CreatePoArgs(_Strict):
    requester: str = Field(pattern=ID)
    vendor: str = Field(pattern=ID)
    quote_id: str = Field(min_length=1, max_length=32)
    amount: int = Field(gt=0)
    lines: list[Line] = Field(min_length=1, max_length=50)


class NotifyArgs(_Strict):
    to: str = Field(pattern=ID)
    subject: str = Field(min_length=1, max_length=120)
    body: str = Field(max_length=2000)


# -- tools ----------------------------------------------------------------------------
@tool("erp.budget", idempotent=True, transactional=True)
def budget(args: BudgetArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """The requester's budget: {requester, cost_center, budget, committed, remaining}."""
    seed(txn)
    return _budget(txn, args.requester)


@tool("erp.vendors", idempotent=True, transactional=True)
def vendors(args: VendorsArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """The vendors registered for the item's category: {item, category, vendors: [id, ...]}."""
    seed(txn)
    cat = _get(txn, f"item/{args.item}")
    if cat is None:
        raise ToolError("tool_failed", f"{args.item!r} is not in the catalogue", reason="unknown_item",
                        item=args.item, known=sorted(DEMO_ITEMS))
    return {"item": args.item, "category": cat, "vendors": list(_get(txn, f"category/{cat}") or [])}


@tool("erp.quote", transactional=True)
def quote(args: QuoteArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """A vendor's quote for spending `amount` on `item` (a fixed-budget tender).

    The vendor states how many units it delivers for the amount and when:
    {quote_id, vendor, item, amount, quantity, lead_time_days}. Raises
    tool_failed with reason no_quote (item not offered), below_min_order or
    amount_too_small (the amount does not buy one unit).
    """
    seed(txn)
    v = _vendor(txn, args.vendor)
    price = v["prices"].get(args.item)
    if price is None:
        raise ToolError("tool_failed", f"{v['name']} does not quote {args.item}", reason="no_quote",
                        vendor=args.vendor, item=args.item)
    if args.amount < int(v["min_order"]):
        raise ToolError("tool_failed", f"{v['name']} takes orders from {v['min_order']}; {args.amount} is below it",
                        reason="below_min_order", vendor=args.vendor, min_order=v["min_order"])
    quantity = args.amount // int(price)
    if quantity < 1:
        raise ToolError("tool_failed", f"{args.amount} does not buy one unit of {args.item} from {v['name']}",
                        reason="amount_too_small", vendor=args.vendor)
    qid = f"Q-{_next(txn, 'seq/quote'):06d}"
    q = {"quote_id": qid, "vendor": args.vendor, "item": args.item, "amount": args.amount, "quantity": quantity,
         "lead_time_days": int(v["lead_time_days"]), "agent_id": ctx.agent_id, "po_id": None}
    _put(txn, f"quote/{qid}", q)
    # The vendor's contact is in the ERP record, deliberately not in the quote the agent sees.
    return {k: q[k] for k in ("quote_id", "vendor", "item", "amount", "quantity", "lead_time_days")}


def _check_quote(txn: Any, quote_id: str, requester: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The checks a quote must pass, at validation and again when the PO is created."""
    q = _get(txn, f"quote/{quote_id}")
    if q is None:
        raise ToolError("tool_failed", f"no quote {quote_id}", reason="unknown_quote", quote_id=quote_id)
    if q.get("po_id"):
        raise ToolError("tool_failed", f"quote {quote_id} was already ordered as {q['po_id']}",
                        reason="quote_used", quote_id=quote_id, po_id=q["po_id"])
    v = _vendor(txn, q["vendor"])
    if v["status"] != "active":
        raise ToolError("tool_failed", f"vendor {v['name']} is {v['status']}: {v.get('hold_reason', '')}".rstrip(": "),
                        reason="vendor_" + str(v["status"]), vendor=q["vendor"])
    b = _budget(txn, requester)
    if int(q["amount"]) > b["remaining"]:
        raise ToolError("tool_failed", f"{requester} has {b['remaining']} left; the quote is for {q['amount']}",
                        reason="insufficient_budget", remaining=b["remaining"], amount=q["amount"])
    return q, v, b


@tool("erp.validate_quote", idempotent=True, transactional=True)
def validate_quote(args: ValidateArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Check a quote before ordering: it exists and is unused, the vendor is active, the budget covers it."""
    seed(txn)
    q, _vendor_rec, b = _check_quote(txn, args.quote_id, args.requester)
    return {"valid": True, "quote_id": q["quote_id"], "vendor": q["vendor"], "amount": q["amount"],
            "remaining_after": b["remaining"] - int(q["amount"])}


@tool("erp.create_po", transactional=True)
def create_po(args: CreatePoArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Create the purchase order and commit the budget, in one transaction.

    Everything is checked again here (the agent may have waited days for an
    approval meanwhile): the quote is unused and matches the order, the vendor
    is active, the requester's remaining budget covers the amount.
    """
    seed(txn)
    q, v, b = _check_quote(txn, args.quote_id, args.requester)
    total = sum(line.total for line in args.lines)
    if total != args.amount:
        raise ToolError("tool_failed", f"the lines sum to {total}, not the order amount {args.amount}",
                        reason="lines_mismatch", lines_total=total, amount=args.amount)
    if args.vendor != q["vendor"] or args.amount != q["amount"] or any(
            line.item != q["item"] or line.quantity != q["quantity"] for line in args.lines):
        raise ToolError("tool_failed", f"the order does not match quote {q['quote_id']}", reason="quote_mismatch",
                        quote={k: q[k] for k in ("vendor", "item", "amount", "quantity")})
    # All checks passed: now write (PO, quote, budget) — committed with the journal entry.
    po_id = f"PO-{_next(txn, 'seq/po'):06d}"
    po = {"po_id": po_id, "status": "issued", "requester": args.requester, "cost_center": b["cost_center"],
          "vendor": args.vendor, "vendor_name": v["name"], "quote_id": q["quote_id"], "amount": args.amount,
          "lines": [line.model_dump() for line in args.lines], "lead_time_days": q["lead_time_days"],
          "agent_id": ctx.agent_id, "principal": ctx.principal}
    _put(txn, f"po/{po_id}", po)
    _put(txn, f"quote/{q['quote_id']}", {**q, "po_id": po_id})
    budget_rec = _get(txn, f"budget/{args.requester}")
    budget_rec["committed"] = int(budget_rec["committed"]) + args.amount
    _put(txn, f"budget/{args.requester}", budget_rec)
    return {"po_id": po_id, "status": "issued", "vendor": args.vendor, "amount": args.amount,
            "remaining": int(budget_rec["budget"]) - int(budget_rec["committed"])}


@tool("notify.send", transactional=True)
def notify(args: NotifyArgs, ctx: ToolContext, txn: Any) -> dict[str, Any]:
    """Put a message in the recipient's outbox: {message_id}."""
    n = _next(txn, "seq", NOTIFY)
    msg_id = f"MSG-{n:06d}"
    box = _get(txn, f"outbox/{args.to}", NOTIFY) or []
    box.append({"message_id": msg_id, "to": args.to, "subject": args.subject, "body": args.body,
                "agent_id": ctx.agent_id})
    _put(txn, f"outbox/{args.to}", box, NOTIFY)
    return {"message_id": msg_id}


# -- reading the demo state (tests, operators) ------------------------------------------------
def erp_state(store: Any) -> dict[str, Any]:
    """Everything in the demo ERP and outbox, decoded: {"erp": {key: value}, "notify": {key: value}}."""
    out: dict[str, Any] = {}
    with store.read() as txn:
        for name, ns in (("erp", ERP), ("notify", NOTIFY)):
            out[name] = {k: _get(txn, k, ns) for k in txn.kv_keys(ns, "")}
    return out
