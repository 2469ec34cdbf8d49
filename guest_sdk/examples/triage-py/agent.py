"""triage, in Python: ../triage/agent.c step for step, with the same input, tools, policy
and output. Classify a support ticket with the LLM, look the customer up in the CRM
(HTTP, or an MCP server), count tickets per category in a shared namespace, draft a reply
with the LLM, and send it through a grant that waits for a human's approval: the agent
hibernates in that await, holding no memory on the host."""

import json
from typing import Any

import torpor
from torpor import ToolError, log

CLASSIFY = ('Classify the support ticket. Answer with a JSON object '
            '{"category": "billing" | "bug" | "account" | "other", "priority": "high" | "normal"} '
            "and nothing else.")

DRAFT = ("You are a courteous support agent. Write a short reply to the customer's ticket. "
         "Do not promise refunds; a specialist follows up.")

tokens = 0  # tokens reported by each LLM answer, summed for the output


async def ask(system: str, user: str, **options: Any) -> str | None:
    """One LLM call, retried (durably: each attempt is its own checkpoint) while the host
    says a retry may succeed."""
    global tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    for attempt in range(3):
        try:
            answer = await torpor.tool("llm.chat", {"messages": messages, **options})
        except ToolError as e:
            log.warn(f"llm.chat failed (attempt {attempt + 1}): {e.code}: {e.message}")
            if not e.retryable:
                break
            continue
        usage = answer.get("usage") or {}
        tokens += usage.get("total_tokens") or 0
        content = answer.get("content")
        return content if isinstance(content, str) else ""
    return None


async def lookup(crm: str, customer_id: str, via_mcp: bool) -> dict[str, Any] | None:
    """The customer record, or None when unknown or unreachable."""
    try:
        if via_mcp:
            r = await torpor.tool("mcp.crm.lookup_customer", {"customer_id": customer_id})
            c = r.get("structured")
            return c if isinstance(c, dict) else None
        r = await torpor.tool("http.fetch", {"url": f"{crm}/customers/{customer_id}"})
        if "json" not in r:
            log.warn("customer lookup failed: the response body is not JSON")
            return None
        if r["status"] != 200:
            log.warn(f"customer {customer_id}: HTTP {r['status']}")
            return None
        return r["json"] if isinstance(r["json"], dict) else None
    except ToolError as e:
        log.warn(f"{'mcp lookup' if via_mcp else 'customer lookup'} failed: {e.message}")
        return None


def parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def text_of(d: Any, key: str, default: str) -> str:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) else default


async def main(input: Any) -> dict[str, Any]:
    t = input.get("ticket") if isinstance(input, dict) else None
    if (not isinstance(t, dict) or not all(isinstance(t.get(k), str) for k in ("id", "customer_id", "body"))
            or not isinstance(input.get("crm"), str)):
        raise TypeError("input needs ticket.id, ticket.customer_id, ticket.body and crm")
    crm = input["crm"]

    # 1. Classify. A malformed classification is not fatal: the ticket goes to "other".
    ticket_text = f"Subject: {text_of(t, 'subject', '')}\n\n{t['body']}"
    verdict = await ask(CLASSIFY, ticket_text, temperature=0, max_tokens=60, response_format={"type": "json_object"})
    if verdict is None:
        raise RuntimeError(f"could not classify ticket {t['id']}")
    v = parse(verdict)
    category = text_of(v, "category", "other")
    priority = text_of(v, "priority", "normal")

    # 2. Look the customer up.
    customer = await lookup(crm, t["customer_id"], input.get("lookup") == "mcp")
    name = text_of(customer, "name", "unknown")
    plan = text_of(customer, "plan", "unknown")

    # 3. Count tickets per category, across agents (a shared namespace).
    count = 0
    try:
        count = (await torpor.tool("kv.incr", {"namespace": "triage-stats", "key": category, "by": 1}))["value"]
    except ToolError as e:
        log.warn(f"kv.incr: {e.message}")

    # 4. Draft the reply.
    prompt = f"Customer: {name} (plan: {plan})\nCategory: {category}, priority {priority}\n\n{ticket_text}"
    draft = await ask(DRAFT, prompt, temperature=0.3)
    if draft is None:
        raise RuntimeError(f"could not draft a reply to ticket {t['id']}")

    # 5. Send it: the grant requires a human's approval, so the agent parks in this await.
    sent: dict[str, Any] | None = None
    failure: ToolError | None = None
    try:
        sent = await torpor.tool("http.send_reply", {
            "url": f"{crm}/tickets/{t['id']}/replies", "method": "POST",
            "json": {"to": t["customer_id"], "category": category, "body": draft},
        })
    except ToolError as e:
        failure = e
    body = sent.get("json") if sent is not None else None
    reply_id = body.get("reply_id") if isinstance(body, dict) else None
    ok = sent is not None and int(sent.get("status") or 0) // 100 == 2 and isinstance(reply_id, str)

    out: dict[str, Any] = {"ticket": t["id"], "category": category, "priority": priority, "customer": customer,
                           "draft": draft, "sent": ok}
    if ok:
        out["reply_id"] = reply_id
    else:
        out["not_sent"] = {"code": failure.code if failure else "http_error",
                           "message": failure.message if failure else "the helpdesk did not accept the reply"}
    out["category_count"] = count
    out["tokens"] = tokens
    return out
