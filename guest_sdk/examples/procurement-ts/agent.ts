// procurement, in TypeScript: the twelve-step purchase workflow of ../procurement/agent.c,
// step for step, with the same input, tools, policy and output (see that file's header).
// Above the 50,000 spending authority the POLICY parks the agent inside erp.create_po
// (waiting_approval); the agent hibernates in that await until `torpor approve` / `deny`.
import { tool, log, ToolError } from "torpor";

interface Requisition {
  item: string;
  amount: number;
  requester: string;
  note: string | null;
}

interface Quote {
  quote_id: string;
  vendor: string;
  quantity: number;
  lead_time_days: number;
  usable: boolean;
}

interface Skipped {
  vendor: string;
  step: string;
  code: string;
  reason: string;
  message: string;
}

type Outcome = { status: "ordered" | "rejected"; reason: string | null; rule: string | null; message: string };

// "tool_failed" details carry a "reason"; policy denials a "reason_code".
function why(e: ToolError): string {
  return (e.reason as string | undefined) ?? (e.reason_code as string | undefined) ?? e.code;
}

function failure(e: unknown): ToolError {
  if (e instanceof ToolError) return e;
  throw e; // not a tool's answer: a bug, which fails the run with its stack
}

async function call<T = any>(name: string, args: Record<string, unknown>): Promise<[T | null, ToolError | null]> {
  try {
    return [await tool<T>(name, args), null];
  } catch (e) {
    return [null, failure(e)];
  }
}

// A tool failure the workflow has no answer for fails the run.
function unexpected(name: string, e: ToolError): never {
  throw new Error(`${name}: ${e.code}: ${e.message}`);
}

function reject(reason: string, rule: string | null | undefined, message: string): Outcome {
  log.warn(`rejected (${reason}): ${message}`);
  return { status: "rejected", reason, rule: rule ?? null, message };
}

function best(quotes: Quote[]): Quote | null {
  let b: Quote | null = null;
  for (const c of quotes) {
    if (!c.usable) continue;
    if (!b || c.quantity > b.quantity ||
        (c.quantity === b.quantity && (c.lead_time_days < b.lead_time_days ||
          (c.lead_time_days === b.lead_time_days && c.vendor < b.vendor)))) b = c;
  }
  return b;
}

const view = (q: Quote | null) =>
  q && { quote_id: q.quote_id, vendor: q.vendor, quantity: q.quantity, lead_time_days: q.lead_time_days };

export default async function main(input: any) {
  // 1. the requisition
  const requester = input?.requester === undefined ? "finance-manager" : input.requester;
  const note = input?.note ?? null;
  if (typeof input?.item !== "string" || !input.item || !Number.isInteger(input.amount) || input.amount <= 0 ||
      typeof requester !== "string" || (note !== null && typeof note !== "string")) {
    throw new TypeError('input needs {"item": string, "amount": positive integer} and optionally ' +
                        '"requester" and "note" (strings)');
  }
  const q: Requisition = { item: input.item, amount: input.amount, requester, note };
  log.info(`requisition: ${q.amount} for ${q.item} by ${q.requester}`);

  const quotes: Quote[] = [];
  const skipped: Skipped[] = [];
  const skip = (vendor: string, step: string, e: ToolError) => {
    log.info(`${step}: ${vendor} skipped (${e.code}: ${e.message})`);
    skipped.push({ vendor, step, code: e.code, reason: why(e), message: e.message });
  };
  let budget: any = null;
  let chosen: Quote | null = null;
  let po: any = null;

  const purchase = async (): Promise<Outcome> => {
    // 2. the requester's remaining budget
    let [b, err] = await call("erp.budget", { requester: q.requester });
    if (err) {
      if (err.code === "denied" || err.code === "tool_failed") {
        return reject(why(err), err.rule, `cannot look up the budget of ${q.requester}: ${err.message}`);
      }
      unexpected("erp.budget", err);
    }
    budget = b;
    if (q.amount > budget.remaining) {
      return reject("insufficient_budget", null,
                    `${q.requester} has ${budget.remaining} left in ${budget.cost_center}; the request is for ${q.amount}`);
    }

    // 3. the vendors for this item
    const [vendors, verr] = await call<{ vendors: string[] }>("erp.vendors", { item: q.item });
    if (verr) {
      if (verr.code === "tool_failed" || verr.code === "denied") return reject(why(verr), verr.rule, verr.message);
      unexpected("erp.vendors", verr);
    }

    // 4. a quote from each; one vendor that cannot quote does not stop the tender
    for (const vendor of vendors!.vendors.slice(0, 16)) {
      const [r, qerr] = await call("erp.quote", { vendor, item: q.item, amount: q.amount });
      if (r) {
        quotes.push({ quote_id: r.quote_id, vendor, quantity: r.quantity, lead_time_days: r.lead_time_days,
                      usable: Boolean(r.quote_id) && r.quantity > 0 });
      } else if (["tool_failed", "denied", "rate_limited", "unavailable", "timeout"].includes(qerr!.code)) {
        skip(vendor, "quote", qerr!);
      } else {
        unexpected("erp.quote", qerr!);
      }
    }

    // 5 + 6. pick the best quote and validate it; fall back to the next best
    let c: Quote | null;
    while ((c = best(quotes)) !== null) {
      const [, e] = await call("erp.validate_quote", { quote_id: c.quote_id, requester: q.requester });
      if (!e) break;
      if (e.code !== "tool_failed" && e.code !== "denied") unexpected("erp.validate_quote", e);
      c.usable = false;
      skip(c.vendor, "validate", e);
    }
    if (!c) return reject("no_valid_quote", null, `no vendor gave a usable quote for ${q.amount} of ${q.item}`);
    chosen = c;

    // 7. remember the decision (the agent's own durable memory)
    const [, kerr] = await call("kv.set", { key: "requisition", value: {
      status: "ordering", item: q.item, amount: q.amount, requester: q.requester, chosen: view(c) } });
    if (kerr) unexpected("kv.set", kerr);

    // 8. the purchase order: above the spending authority the policy parks the agent in
    // this await until a human decides; the agent cannot tell, and need not.
    const [order, perr] = await call("erp.create_po", {
      requester: q.requester, vendor: c.vendor, quote_id: c.quote_id, amount: q.amount,
      lines: [{ item: q.item, quantity: c.quantity, total: q.amount }],
    });

    // 9. act on the answer
    if (order) {
      po = order;
      const message = `${po.po_id} ordered ${c.quantity} ${q.item} from ${c.vendor} for ${q.amount}`;
      log.info(message);
      return { status: "ordered", reason: null, rule: null, message };
    }
    // an operator said no, a rule refused, or the ERP re-checked at order time
    if (perr!.code === "denied" || perr!.code === "tool_failed") return reject(why(perr!), perr!.rule, perr!.message);
    unexpected("erp.create_po", perr!);
  };

  const outcome = await purchase();

  // 10 + 11. tell the requester; resend without the note if the PII guardrail refuses it
  const subject = po ? `Purchase order ${po.po_id}: ${q.item}` : `Purchase request for ${q.item} declined`;
  const body = `${outcome.message} (request: ${q.amount} for ${q.item}).`;
  let notification: Record<string, unknown> = {};
  let redacted = false;
  for (let attempt = 0; attempt < 2; attempt++) {
    const text = q.note && !redacted ? `${body}\nYour note: ${q.note}` : body;
    const [sent, e] = await call("notify.send", { to: q.requester, subject, body: text });
    if (sent) {
      notification = { sent: true, message_id: sent.message_id, redacted, error: null };
      break;
    }
    if (e!.code === "denied" && why(e!) === "pii_detected" && q.note && !redacted) {
      log.warn(`notification refused (${e!.message}); resending without the note`);
      redacted = true;
      continue;
    }
    log.warn(`notification not sent: ${why(e!)}: ${e!.message}`);
    notification = { sent: false, message_id: null, redacted, error: { code: e!.code, reason: why(e!), message: e!.message } };
    break;
  }

  // 12. record the outcome and answer
  const output = {
    ...outcome, item: q.item, amount: q.amount, requester: q.requester, budget,
    quotes: quotes.map(view), skipped, chosen: view(chosen), po, notification,
  };
  const [, kerr] = await call("kv.set", { key: "requisition", value: output });
  if (kerr) unexpected("kv.set", kerr);
  return output;
}
