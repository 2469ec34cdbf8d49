// triage, in TypeScript: ../triage/agent.c step for step, with the same input, tools,
// policy and output. Classify a support ticket with the LLM, look the customer up in the
// CRM (HTTP, or an MCP server), count tickets per category in a shared namespace, draft
// a reply with the LLM, and send it through a grant that waits for a human's approval:
// the agent hibernates in that await, holding no memory on the host.
import { tool, log, ToolError } from "torpor";

interface Ticket { id: string; customer_id: string; subject?: string; body: string }
interface Input { ticket: Ticket; crm: string; lookup?: "http" | "mcp" }
interface Chat { content: string; usage?: { total_tokens?: number } }
type Customer = Record<string, unknown>;

const CLASSIFY =
  'Classify the support ticket. Answer with a JSON object ' +
  '{"category": "billing" | "bug" | "account" | "other", "priority": "high" | "normal"} ' +
  "and nothing else.";

const DRAFT =
  "You are a courteous support agent. Write a short reply to the customer's ticket. " +
  "Do not promise refunds; a specialist follows up.";

let tokens = 0; // tokens reported by each LLM answer, summed for the output

// One LLM call, retried (durably: each attempt is its own checkpoint) while the host says
// a retry may succeed.
async function ask(system: string, user: string, options: Record<string, unknown>): Promise<string | null> {
  const messages = [{ role: "system", content: system }, { role: "user", content: user }];
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const answer = await tool<Chat>("llm.chat", { messages, ...options });
      tokens += answer.usage?.total_tokens ?? 0;
      return typeof answer.content === "string" ? answer.content : "";
    } catch (e) {
      if (!(e instanceof ToolError)) throw e;
      log.warn(`llm.chat failed (attempt ${attempt + 1}): ${e.code}: ${e.message}`);
      if (!e.retryable) break;
    }
  }
  return null;
}

// The customer record, or null when unknown or unreachable.
async function lookup(crm: string, customerId: string, viaMcp: boolean): Promise<Customer | null> {
  try {
    if (viaMcp) {
      const r = await tool<{ structured?: unknown }>("mcp.crm.lookup_customer", { customer_id: customerId });
      const c = r.structured;
      return c !== null && typeof c === "object" && !Array.isArray(c) ? (c as Customer) : null;
    }
    const r = await tool<{ status: number; json?: unknown }>("http.fetch", { url: `${crm}/customers/${customerId}` });
    if (r.json === undefined) {
      log.warn("customer lookup failed: the response body is not JSON");
      return null;
    }
    if (r.status !== 200) {
      log.warn(`customer ${customerId}: HTTP ${r.status}`);
      return null;
    }
    return r.json as Customer;
  } catch (e) {
    if (!(e instanceof ToolError)) throw e;
    log.warn(`${viaMcp ? "mcp lookup" : "customer lookup"} failed: ${e.message}`);
    return null;
  }
}

function parse(text: string): any {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

export default async function main(input: Input) {
  const t = input?.ticket;
  const str = (v: unknown): v is string => typeof v === "string";
  if (!t || !str(t.id) || !str(t.customer_id) || !str(t.body) || !str(input.crm)) {
    throw new TypeError("input needs ticket.id, ticket.customer_id, ticket.body and crm");
  }

  // 1. Classify. A malformed classification is not fatal: the ticket goes to "other".
  const ticketText = `Subject: ${str(t.subject) ? t.subject : ""}\n\n${t.body}`;
  const verdict = await ask(CLASSIFY, ticketText, {
    temperature: 0, max_tokens: 60, response_format: { type: "json_object" },
  });
  if (verdict === null) throw new Error(`could not classify ticket ${t.id}`);
  const v = parse(verdict);
  const category: string = str(v?.category) ? v.category : "other";
  const priority: string = str(v?.priority) ? v.priority : "normal";

  // 2. Look the customer up.
  const customer = await lookup(input.crm, t.customer_id, input.lookup === "mcp");
  const name = str(customer?.name) ? customer!.name : "unknown";
  const plan = str(customer?.plan) ? customer!.plan : "unknown";

  // 3. Count tickets per category, across agents (a shared namespace).
  let count = 0;
  try {
    count = (await tool<{ value: number }>("kv.incr", { namespace: "triage-stats", key: category, by: 1 })).value;
  } catch (e) {
    if (!(e instanceof ToolError)) throw e;
    log.warn(`kv.incr: ${e.message}`);
  }

  // 4. Draft the reply.
  const prompt = `Customer: ${name} (plan: ${plan})\nCategory: ${category}, priority ${priority}\n\n${ticketText}`;
  const draft = await ask(DRAFT, prompt, { temperature: 0.3 });
  if (draft === null) throw new Error(`could not draft a reply to ticket ${t.id}`);

  // 5. Send it: the grant requires a human's approval, so the agent parks in this await.
  let sent: { status?: number; json?: any } | null = null;
  let failure: ToolError | null = null;
  try {
    sent = await tool("http.send_reply", {
      url: `${input.crm}/tickets/${t.id}/replies`, method: "POST",
      json: { to: t.customer_id, category, body: draft },
    });
  } catch (e) {
    if (!(e instanceof ToolError)) throw e;
    failure = e;
  }
  const replyId = sent?.json?.reply_id;
  const ok = sent !== null && Math.trunc((sent.status ?? 0) / 100) === 2 && str(replyId);

  return {
    ticket: t.id, category, priority, customer, draft, sent: ok,
    ...(ok ? { reply_id: replyId }
           : { not_sent: { code: failure ? failure.code : "http_error",
                           message: failure ? failure.message : "the helpdesk did not accept the reply" } }),
    category_count: count, tokens,
  };
}
