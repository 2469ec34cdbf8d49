"""procurement, in Python: the twelve-step purchase workflow of ../procurement/agent.c,
step for step, with the same input, tools, policy and output (see that file's header).
Above the 50,000 spending authority the POLICY parks the agent inside erp.create_po
(waiting_approval); the agent hibernates in that await until `torpor approve` / `deny`."""

from dataclasses import dataclass
from typing import Any

import torpor
from torpor import ToolError, log


@dataclass
class Quote:
    quote_id: str
    vendor: str
    quantity: int
    lead_time_days: int
    usable: bool

    def view(self) -> dict[str, Any]:
        return {"quote_id": self.quote_id, "vendor": self.vendor, "quantity": self.quantity,
                "lead_time_days": self.lead_time_days}


class Rejected(Exception):
    """The workflow's answer is no: completes as {"status": "rejected", ...}."""

    def __init__(self, reason: str, rule: str | None, message: str) -> None:
        super().__init__(message)
        self.outcome = {"status": "rejected", "reason": reason, "rule": rule, "message": message}
        log.warn(f"rejected ({reason}): {message}")


def why(e: ToolError) -> str:
    """"tool_failed" details carry a "reason"; policy denials a "reason_code"."""
    for key in ("reason", "reason_code"):
        value = e.details.get(key)
        if isinstance(value, str):
            return value
    return e.code


async def call(name: str, args: dict[str, Any]) -> tuple[Any, ToolError | None]:
    try:
        return await torpor.tool(name, args), None
    except ToolError as e:
        return None, e


def unexpected(name: str, e: ToolError) -> Exception:
    """A tool failure the workflow has no answer for fails the run."""
    return RuntimeError(f"{name}: {e.code}: {e.message}")


def best(quotes: list[Quote]) -> Quote | None:
    usable = [q for q in quotes if q.usable]
    return min(usable, key=lambda q: (-q.quantity, q.lead_time_days, q.vendor), default=None)


async def main(input: Any) -> dict[str, Any]:
    # 1. the requisition
    input = input if isinstance(input, dict) else {}
    item, amount = input.get("item"), input.get("amount")
    requester = input.get("requester", "finance-manager")
    note = input.get("note")
    if (not isinstance(item, str) or not item or not isinstance(amount, int) or isinstance(amount, bool)
            or amount <= 0 or not isinstance(requester, str) or (note is not None and not isinstance(note, str))):
        raise TypeError('input needs {"item": string, "amount": positive integer} and optionally '
                        '"requester" and "note" (strings)')
    log.info(f"requisition: {amount} for {item} by {requester}")

    quotes: list[Quote] = []
    skipped: list[dict[str, str]] = []
    state: dict[str, Any] = {"budget": None, "chosen": None, "po": None}

    def skip(vendor: str, step: str, e: ToolError) -> None:
        log.info(f"{step}: {vendor} skipped ({e.code}: {e.message})")
        skipped.append({"vendor": vendor, "step": step, "code": e.code, "reason": why(e), "message": e.message})

    async def purchase() -> dict[str, Any]:
        # 2. the requester's remaining budget
        budget, err = await call("erp.budget", {"requester": requester})
        if err:
            if err.code in ("denied", "tool_failed"):
                raise Rejected(why(err), err.rule, f"cannot look up the budget of {requester}: {err.message}")
            raise unexpected("erp.budget", err)
        state["budget"] = budget
        if amount > budget["remaining"]:
            raise Rejected("insufficient_budget", None, f"{requester} has {budget['remaining']} left in "
                           f"{budget['cost_center']}; the request is for {amount}")

        # 3. the vendors for this item
        vendors, err = await call("erp.vendors", {"item": item})
        if err:
            if err.code in ("tool_failed", "denied"):
                raise Rejected(why(err), err.rule, err.message)
            raise unexpected("erp.vendors", err)

        # 4. a quote from each; one vendor that cannot quote does not stop the tender
        for vendor in vendors["vendors"][:16]:
            r, err = await call("erp.quote", {"vendor": vendor, "item": item, "amount": amount})
            if err is None:
                quotes.append(Quote(r["quote_id"], vendor, r["quantity"], r["lead_time_days"],
                                    bool(r["quote_id"]) and r["quantity"] > 0))
            elif err.code in ("tool_failed", "denied", "rate_limited", "unavailable", "timeout"):
                skip(vendor, "quote", err)
            else:
                raise unexpected("erp.quote", err)

        # 5 + 6. pick the best quote and validate it; fall back to the next best
        while (c := best(quotes)) is not None:
            _, err = await call("erp.validate_quote", {"quote_id": c.quote_id, "requester": requester})
            if not err:
                break
            if err.code not in ("tool_failed", "denied"):
                raise unexpected("erp.validate_quote", err)
            c.usable = False
            skip(c.vendor, "validate", err)
        if c is None:
            raise Rejected("no_valid_quote", None, f"no vendor gave a usable quote for {amount} of {item}")
        state["chosen"] = c

        # 7. remember the decision (the agent's own durable memory)
        _, err = await call("kv.set", {"key": "requisition", "value": {
            "status": "ordering", "item": item, "amount": amount, "requester": requester, "chosen": c.view()}})
        if err:
            raise unexpected("kv.set", err)

        # 8. the purchase order: above the spending authority the policy parks the agent in
        # this await until a human decides; the agent cannot tell, and need not.
        order, err = await call("erp.create_po", {
            "requester": requester, "vendor": c.vendor, "quote_id": c.quote_id, "amount": amount,
            "lines": [{"item": item, "quantity": c.quantity, "total": amount}],
        })

        # 9. act on the answer
        if err is None:
            state["po"] = order
            message = f"{order['po_id']} ordered {c.quantity} {item} from {c.vendor} for {amount}"
            log.info(message)
            return {"status": "ordered", "reason": None, "rule": None, "message": message}
        # an operator said no, a rule refused, or the ERP re-checked at order time
        if err.code in ("denied", "tool_failed"):
            raise Rejected(why(err), err.rule, err.message)
        raise unexpected("erp.create_po", err)

    try:
        outcome = await purchase()
    except Rejected as r:
        outcome = r.outcome
    po = state["po"]

    # 10 + 11. tell the requester; resend without the note if the PII guardrail refuses it
    subject = f"Purchase order {po['po_id']}: {item}" if po else f"Purchase request for {item} declined"
    body = f"{outcome['message']} (request: {amount} for {item})."
    notification: dict[str, Any] = {}
    redacted = False
    for _ in range(2):
        text = f"{body}\nYour note: {note}" if note and not redacted else body
        sent, err = await call("notify.send", {"to": requester, "subject": subject, "body": text})
        if err is None:
            notification = {"sent": True, "message_id": sent["message_id"], "redacted": redacted, "error": None}
            break
        if err.code == "denied" and why(err) == "pii_detected" and note and not redacted:
            log.warn(f"notification refused ({err.message}); resending without the note")
            redacted = True
            continue
        log.warn(f"notification not sent: {why(err)}: {err.message}")
        notification = {"sent": False, "message_id": None, "redacted": redacted,
                        "error": {"code": err.code, "reason": why(err), "message": err.message}}
        break

    # 12. record the outcome and answer
    chosen = state["chosen"]
    output = {
        **outcome, "item": item, "amount": amount, "requester": requester, "budget": state["budget"],
        "quotes": [q.view() for q in quotes], "skipped": skipped, "chosen": chosen.view() if chosen else None,
        "po": po, "notification": notification,
    }
    _, err = await call("kv.set", {"key": "requisition", "value": output})
    if err:
        raise unexpected("kv.set", err)
    return output
