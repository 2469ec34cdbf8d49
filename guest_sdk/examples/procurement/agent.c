/*
 * procurement: the twelve-step purchase workflow of the seed article ("step 7 of
 * a 12-step procurement workflow being executed by an agent acting on behalf of
 * a finance manager with a $50,000 spending authority").
 *
 * Input:  {"item": "laptops", "amount": 75000,
 *          "requester": "finance-manager",   (optional, the default)
 *          "note": "for the new hires"}      (optional, forwarded to the requester)
 * Tools:  erp.budget, erp.vendors, erp.quote, erp.validate_quote, erp.create_po,
 *         notify.send (the operator's demo tools in procurement_tools.py, backed
 *         by the store; `torpor run --tools-dir guest_sdk/examples/procurement`),
 *         kv.get / kv.set (the agent's own durable memory).
 * Output: {"status": "ordered" | "rejected", "reason": null | "<why>",
 *          "rule": null | "<the policy rule that refused>", "message": ...,
 *          "item", "amount", "requester", "budget": {...}, "quotes": [...],
 *          "skipped": [...], "chosen": {...} | null, "po": {...} | null,
 *          "notification": {"sent", "message_id", "redacted", "error"}}
 *
 * The steps:
 *   1. read the requisition (bad input fails the run: agent_error);
 *   2. erp.budget: the requester's remaining budget (too little: rejected);
 *   3. erp.vendors: the vendors registered for the item;
 *   4. erp.quote from each: vendors that cannot quote (no_quote, below_min_order,
 *      a policy denial) are skipped with the structured reason;
 *   5. pick the best quote: most units for the amount, then the shortest lead
 *      time, then the vendor id;
 *   6. erp.validate_quote: vendor compliance, quote unused, budget still covers
 *      it; an invalid quote is skipped and step 5 picks the next one;
 *   7. record the chosen quote in the agent's memory (kv.set "requisition");
 *   8. erp.create_po. The agent does not know the spending authority: the POLICY
 *      sends a PO above 50,000 to a human, and the agent hibernates inside this
 *      call (status waiting_approval) until `torpor approve` / `torpor deny`;
 *   9. act on the answer: a PO, or a structured refusal (an operator's denial,
 *      a policy limit, the ERP re-checking the budget after a long wait);
 *  10. compose the requester's notification (with their note, if any);
 *  11. notify.send; if the PII guardrail refuses it (pii_detected), send it
 *      again without the note (the only free text); a rate limit is reported;
 *  12. record the outcome (kv.set "requisition") and set the output.
 *
 * A business refusal (no budget, no usable quote, approval denied) is a
 * completed run with status "rejected" and a reason: the agent did its job and
 * the requester is told. Only bad input or an unexpected tool failure fails the run.
 */
#include "torpor.h"

#define MAX_QUOTES 16

typedef struct {
    char *quote_id, *vendor;
    int64_t quantity, lead_time_days;
    bool usable;
} quote;

typedef struct {
    const char *item, *requester, *note;
    int64_t amount;
    torpor_json *budget;   /* erp.budget result */
    quote quotes[MAX_QUOTES];
    size_t nquotes;
    torpor_jb skipped;     /* [{"vendor", "step", "code", "reason", "message"}] */
    const quote *chosen;
    torpor_json *po;       /* erp.create_po result */
    const char *status, *reason, *rule;
    char *message;
} requisition;

/* "tool_failed" details carry a "reason"; policy denials a "reason_code". */
static const char *why(const torpor_result *r) {
    const char *s = torpor_json_str(torpor_json_get(r->value, "reason"));
    if (!s) s = torpor_json_str(torpor_json_get(r->value, "reason_code"));
    return s ? s : r->code_name;
}

static void skip(requisition *q, const char *vendor, const char *step, const torpor_result *r) {
    torpor_logf(TORPOR_INFO, "%s: %s skipped (%s: %s)", step, vendor, r->code_name, r->message);
    torpor_jb_f(&q->skipped, "{\"vendor\": %s, \"step\": %s, \"code\": %s, \"reason\": %s, \"message\": %s}",
                vendor, step, r->code_name, why(r), r->message);
}

/* rule: the policy rule that refused (r->rule), or NULL when the ERP or the agent decided.
 * reason and rule are copied: they usually point into a tool result that is freed next. */
static void reject(requisition *q, const char *reason, const char *rule, char *message) {
    torpor_logf(TORPOR_WARN, "rejected (%s): %s", reason, message);
    q->status = "rejected";
    q->reason = torpor_strdup(reason);
    q->rule = rule ? torpor_strdup(rule) : NULL;
    q->message = message;
}

/* A tool failure the workflow has no answer for fails the run, with the details logged. */
static int unexpected(const char *tool, const torpor_result *r) {
    return torpor_fail("%s: %s: %s", tool, r->code_name, r->message);
}

/* Step 5: the best usable quote not yet tried, or NULL. */
static quote *best(requisition *q) {
    quote *b = NULL;
    for (size_t i = 0; i < q->nquotes; i++) {
        quote *c = &q->quotes[i];
        if (!c->usable) continue;
        if (!b || c->quantity > b->quantity ||
            (c->quantity == b->quantity && (c->lead_time_days < b->lead_time_days ||
                                            (c->lead_time_days == b->lead_time_days &&
                                             strcmp(c->vendor, b->vendor) < 0))))
            b = c;
    }
    return b;
}

static char *quotes_json(const requisition *q) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_arr(&b);
    for (size_t i = 0; i < q->nquotes; i++)
        torpor_jb_f(&b, "{\"quote_id\": %s, \"vendor\": %s, \"quantity\": %lld, \"lead_time_days\": %lld}",
                    q->quotes[i].quote_id, q->quotes[i].vendor, (long long)q->quotes[i].quantity,
                    (long long)q->quotes[i].lead_time_days);
    torpor_jb_end(&b);
    return torpor_jb_finish(&b);
}

static char *chosen_json(const requisition *q) {
    if (!q->chosen) return torpor_strdup("null");
    return torpor_jsonf("{\"quote_id\": %s, \"vendor\": %s, \"quantity\": %lld, \"lead_time_days\": %lld}",
                        q->chosen->quote_id, q->chosen->vendor, (long long)q->chosen->quantity,
                        (long long)q->chosen->lead_time_days);
}

/* Steps 2-9. Returns 0, or non-zero after torpor_fail for an unexpected error. */
static int purchase(requisition *q) {
    /* 2. the requester's remaining budget */
    torpor_result r = torpor_callf("erp.budget", "{\"requester\": %s}", q->requester);
    if (!r.ok) {
        if (r.code == TORPOR_E_DENIED || r.code == TORPOR_E_TOOL_FAILED) {
            reject(q, why(&r), r.rule, torpor_strf("cannot look up the budget of %s: %s", q->requester, r.message));
            return 0;
        }
        return unexpected("erp.budget", &r);
    }
    q->budget = r.value, r.value = NULL;
    int64_t remaining = torpor_json_int(torpor_json_get(q->budget, "remaining"));
    torpor_result_free(&r);
    if (q->amount > remaining) {
        reject(q, "insufficient_budget", NULL,
               torpor_strf("%s has %lld left in %s; the request is for %lld", q->requester, (long long)remaining,
                           torpor_json_str(torpor_json_get(q->budget, "cost_center")), (long long)q->amount));
        return 0;
    }

    /* 3. the vendors for this item */
    r = torpor_callf("erp.vendors", "{\"item\": %s}", q->item);
    if (!r.ok) {
        if (r.code == TORPOR_E_TOOL_FAILED || r.code == TORPOR_E_DENIED) {
            reject(q, why(&r), r.rule, torpor_strdup(r.message));
            return 0;
        }
        return unexpected("erp.vendors", &r);
    }
    torpor_json *vendors = r.value;
    r.value = NULL;
    torpor_result_free(&r);

    /* 4. a quote from each */
    for (size_t i = 0; i < torpor_json_len(torpor_json_get(vendors, "vendors")) && q->nquotes < MAX_QUOTES; i++) {
        const char *vendor = torpor_json_str(torpor_json_index(torpor_json_get(vendors, "vendors"), i));
        r = torpor_callf("erp.quote", "{\"vendor\": %s, \"item\": %s, \"amount\": %lld}", vendor, q->item,
                         (long long)q->amount);
        if (r.ok) {
            quote *c = &q->quotes[q->nquotes++];
            c->quote_id = torpor_strdup(torpor_json_str(torpor_json_get(r.value, "quote_id")));
            c->vendor = torpor_strdup(vendor);
            c->quantity = torpor_json_int(torpor_json_get(r.value, "quantity"));
            c->lead_time_days = torpor_json_int(torpor_json_get(r.value, "lead_time_days"));
            c->usable = c->quote_id && c->quantity > 0;
        } else if (r.code == TORPOR_E_TOOL_FAILED || r.code == TORPOR_E_DENIED ||
                   r.code == TORPOR_E_RATE_LIMITED || r.code == TORPOR_E_UNAVAILABLE ||
                   r.code == TORPOR_E_TIMEOUT) {
            skip(q, vendor, "quote", &r); /* one vendor that cannot quote does not stop the tender */
        } else {
            return unexpected("erp.quote", &r);
        }
        torpor_result_free(&r);
    }
    torpor_json_free(vendors);

    /* 5 + 6. pick the best quote and validate it; fall back to the next best */
    quote *c;
    while ((c = best(q)) != NULL) {
        r = torpor_callf("erp.validate_quote", "{\"quote_id\": %s, \"requester\": %s}", c->quote_id, q->requester);
        if (r.ok) {
            torpor_result_free(&r);
            break;
        }
        if (r.code != TORPOR_E_TOOL_FAILED && r.code != TORPOR_E_DENIED) return unexpected("erp.validate_quote", &r);
        c->usable = false;
        skip(q, c->vendor, "validate", &r);
        torpor_result_free(&r);
    }
    if (!c) {
        reject(q, "no_valid_quote", NULL, torpor_strf("no vendor gave a usable quote for %lld of %s", (long long)q->amount,
                                                q->item));
        return 0;
    }
    q->chosen = c;

    /* 7. remember the decision (the agent's own durable memory) */
    char *chosen = chosen_json(q);
    if (torpor_kv_set("requisition", torpor_jsonf("{\"status\": \"ordering\", \"item\": %s, \"amount\": %lld, "
                                                  "\"requester\": %s, \"chosen\": %j}",
                                                  q->item, (long long)q->amount, q->requester, chosen)) != 0)
        return unexpected("kv.set", torpor_last_error());
    torpor_free(chosen);

    /* 8. the purchase order. Above the spending authority the policy parks the agent here
     * (waiting_approval) until a human decides; the agent cannot tell, and need not. */
    r = torpor_callf("erp.create_po",
                     "{\"requester\": %s, \"vendor\": %s, \"quote_id\": %s, \"amount\": %lld, "
                     "\"lines\": [{\"item\": %s, \"quantity\": %lld, \"total\": %lld}]}",
                     q->requester, c->vendor, c->quote_id, (long long)q->amount, q->item, (long long)c->quantity,
                     (long long)q->amount);

    /* 9. act on the answer */
    if (r.ok) {
        q->po = r.value, r.value = NULL;
        q->status = "ordered";
        q->message = torpor_strf("%s ordered %lld %s from %s for %lld", torpor_json_str(torpor_json_get(q->po, "po_id")),
                                 (long long)c->quantity, q->item, c->vendor, (long long)q->amount);
        torpor_log(TORPOR_INFO, q->message);
    } else if (r.code == TORPOR_E_DENIED) {
        /* an operator said no (reason_code approval_denied), or a rule such as the amount ceiling */
        reject(q, why(&r), r.rule, torpor_strdup(r.message));
    } else if (r.code == TORPOR_E_TOOL_FAILED) {
        /* the ERP re-checks at order time: e.g. the budget was spent while we waited */
        reject(q, why(&r), r.rule, torpor_strdup(r.message));
    } else {
        return unexpected("erp.create_po", &r);
    }
    torpor_result_free(&r);
    return 0;
}

/* Steps 10 + 11: tell the requester. Fills "notification" into the output builder. */
static void notify(requisition *q, torpor_jb *out) {
    const char *po_id = torpor_json_str(torpor_json_get(q->po, "po_id"));
    char *subject = q->po ? torpor_strf("Purchase order %s: %s", po_id, q->item)
                          : torpor_strf("Purchase request for %s declined", q->item);
    char *body = torpor_strf("%s (request: %lld for %s).", q->message, (long long)q->amount, q->item);
    bool redacted = false;
    for (int attempt = 0; attempt < 2; attempt++) {
        char *text = (q->note && !redacted) ? torpor_strf("%s\nYour note: %s", body, q->note) : torpor_strdup(body);
        torpor_result r = torpor_callf("notify.send", "{\"to\": %s, \"subject\": %s, \"body\": %s}", q->requester,
                                       subject, text);
        torpor_free(text);
        const char *code = why(&r);
        if (r.ok) {
            torpor_jb_key(out, "notification");
            torpor_jb_f(out, "{\"sent\": true, \"message_id\": %v, \"redacted\": %b, \"error\": null}",
                        torpor_json_get(r.value, "message_id"), redacted);
            torpor_result_free(&r);
            return;
        }
        if (r.code == TORPOR_E_DENIED && torpor_streq(code, "pii_detected") && q->note && !redacted) {
            /* the guardrail found personal data; the only free text is the requester's note */
            torpor_logf(TORPOR_WARN, "notification refused (%s); resending without the note", r.message);
            redacted = true;
            torpor_result_free(&r);
            continue;
        }
        torpor_logf(TORPOR_WARN, "notification not sent: %s: %s", code, r.message);
        torpor_jb_key(out, "notification");
        torpor_jb_f(out, "{\"sent\": false, \"message_id\": null, \"redacted\": %b, \"error\": {\"code\": %s, "
                         "\"reason\": %s, \"message\": %s}}",
                    redacted, r.code_name, code, r.message);
        torpor_result_free(&r);
        return;
    }
}

int torpor_main(void) {
    /* 1. the requisition */
    const torpor_json *in = torpor_input();
    const torpor_json *amount = torpor_json_get(in, "amount");
    const torpor_json *requester = torpor_json_get(in, "requester");
    const torpor_json *note = torpor_json_get(in, "note");
    requisition q = {
        .item = torpor_json_str(torpor_json_get(in, "item")),
        .requester = requester ? torpor_json_str(requester) : "finance-manager",
        .note = torpor_json_str(note),
        .amount = torpor_json_int(amount),
    };
    if (!q.item || !*q.item || !torpor_json_is_int(amount) || q.amount <= 0 || !q.requester ||
        (note && !torpor_json_is_null(note) && !q.note))
        return torpor_fail("input needs {\"item\": string, \"amount\": positive integer} and optionally "
                           "\"requester\" and \"note\" (strings)");
    torpor_logf(TORPOR_INFO, "requisition: %lld for %s by %s", (long long)q.amount, q.item, q.requester);
    torpor_jb_arr(&q.skipped);

    if (purchase(&q) != 0) return 1;

    /* 10 + 11. notify the requester, 12. record the outcome and answer */
    torpor_jb out = TORPOR_JB_INIT;
    torpor_jb_obj(&out);
    torpor_jb_key(&out, "status"), torpor_jb_str(&out, q.status);
    torpor_jb_key(&out, "reason"), torpor_jb_str(&out, q.reason);
    torpor_jb_key(&out, "rule"), torpor_jb_str(&out, q.rule);
    torpor_jb_key(&out, "message"), torpor_jb_str(&out, q.message);
    torpor_jb_key(&out, "item"), torpor_jb_str(&out, q.item);
    torpor_jb_key(&out, "amount"), torpor_jb_int(&out, q.amount);
    torpor_jb_key(&out, "requester"), torpor_jb_str(&out, q.requester);
    torpor_jb_key(&out, "budget"), torpor_jb_value(&out, q.budget);
    torpor_jb_key(&out, "quotes"), torpor_jb_raw(&out, quotes_json(&q));
    torpor_jb_end(&q.skipped);
    torpor_jb_key(&out, "skipped"), torpor_jb_raw(&out, torpor_jb_finish(&q.skipped));
    torpor_jb_key(&out, "chosen"), torpor_jb_raw(&out, chosen_json(&q));
    torpor_jb_key(&out, "po"), torpor_jb_value(&out, q.po);
    notify(&q, &out);
    torpor_jb_end(&out);
    char *output = torpor_jb_finish(&out);
    if (!output) return torpor_fail("internal: unbalanced output");

    if (torpor_kv_set("requisition", output) != 0) return unexpected("kv.set", torpor_last_error());
    return torpor_output(output);
}
