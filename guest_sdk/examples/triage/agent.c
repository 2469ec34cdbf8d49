/*
 * triage: a support-triage agent.
 *
 * Input:  {"ticket": {"id": "T-1001", "customer_id": "C-42", "subject": "...", "body": "..."},
 *          "crm": "http://127.0.0.1:8401",      the CRM / helpdesk API
 *          "lookup": "http" | "mcp"}            how to find the customer (default http)
 * Tools:  llm.chat          classify the ticket, then draft the reply (tokens budgeted)
 *         http.fetch        GET the customer from the CRM (read-only grant)
 *         mcp.crm.lookup_customer   the same through an MCP server, when lookup = "mcp"
 *         kv.incr           count tickets per category in the shared namespace "triage-stats"
 *         http.send_reply   POST the reply; its grant says approval = true, so the agent
 *                           hibernates until a human approves (or denies) the send
 * Output: {"ticket", "category", "priority", "customer", "draft", "sent", "reply_id" | "not_sent",
 *          "category_count", "tokens"}
 *
 * Every tool call is a durable checkpoint: the agent can be killed anywhere and
 * resumed without re-asking the LLM a question it already paid for. While it
 * waits for the LLM or for the approval it holds no memory on the host.
 */
#include "torpor.h"

static const char *CLASSIFY =
    "Classify the support ticket. Answer with a JSON object "
    "{\"category\": \"billing\" | \"bug\" | \"account\" | \"other\", \"priority\": \"high\" | \"normal\"} "
    "and nothing else.";

static const char *DRAFT =
    "You are a courteous support agent. Write a short reply to the customer's ticket. "
    "Do not promise refunds; a specialist follows up.";

/* Tokens reported by each LLM answer, summed for the output. */
static int64_t g_tokens;

/* One LLM call, retried (durably: each attempt is its own checkpoint) while the
 * host says a retry may succeed. Returns the answer text or NULL. */
static char *ask(const char *system, const char *user, const char *options) {
    char *messages = torpor_jsonf("[{\"role\": \"system\", \"content\": %s}, {\"role\": \"user\", \"content\": %s}]",
                                  system, user);
    for (int attempt = 0; attempt < 3; attempt++) {
        int err;
        torpor_json *answer = torpor_llm_chat(messages, options, &err);
        if (answer) {
            g_tokens += torpor_json_int(torpor_json_path(answer, "usage.total_tokens"));
            const char *text = torpor_json_str(torpor_json_get(answer, "content"));
            char *out = torpor_strdup(text ? text : "");
            torpor_json_free(answer);
            torpor_free(messages);
            return out;
        }
        const torpor_result *e = torpor_last_error();
        torpor_logf(TORPOR_WARN, "llm.chat failed (attempt %d): %s: %s", attempt + 1, e->code_name, e->message);
        if (!e->retryable) break;
    }
    torpor_free(messages);
    return NULL;
}

/* The customer record (caller frees), or NULL when unknown or unreachable. */
static torpor_json *lookup(const char *crm, const char *customer_id, bool via_mcp) {
    int err;
    if (via_mcp) {
        char *args = torpor_jsonf("{\"customer_id\": %s}", customer_id);
        torpor_json *r = torpor_mcp_call("crm", "lookup_customer", args, &err);
        torpor_free(args);
        if (!r) {
            torpor_logf(TORPOR_WARN, "mcp lookup failed: %s", torpor_last_error()->message);
            return NULL;
        }
        char *dumped = torpor_json_dump(torpor_json_get(r, "structured"));
        torpor_json_free(r);
        torpor_json *c = torpor_json_parse_cstr(dumped);
        torpor_free(dumped);
        return torpor_json_is_object(c) ? c : (torpor_json_free(c), NULL);
    }
    char *url = torpor_strf("%s/customers/%s", crm, customer_id);
    int status = 0;
    torpor_json *c = torpor_http_get_json(NULL, url, &status, &err);
    torpor_free(url);
    if (!c) {
        torpor_logf(TORPOR_WARN, "customer lookup failed: %s", torpor_last_error()->message);
        return NULL;
    }
    if (status != 200) {
        torpor_logf(TORPOR_WARN, "customer %s: HTTP %d", customer_id, status);
        torpor_json_free(c);
        return NULL;
    }
    return c;
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const torpor_json *t = torpor_json_get(in, "ticket");
    const char *id = torpor_json_str(torpor_json_get(t, "id"));
    const char *customer_id = torpor_json_str(torpor_json_get(t, "customer_id"));
    const char *subject = torpor_json_str(torpor_json_get(t, "subject"));
    const char *body = torpor_json_str(torpor_json_get(t, "body"));
    const char *crm = torpor_json_str(torpor_json_get(in, "crm"));
    bool via_mcp = torpor_json_streq(torpor_json_get(in, "lookup"), "mcp");
    if (!id || !customer_id || !body || !crm)
        return torpor_fail("input needs ticket.id, ticket.customer_id, ticket.body and crm");

    /* 1. Classify. A malformed classification is not fatal: the ticket goes to "other". */
    char *ticket_text = torpor_strf("Subject: %s\n\n%s", subject ? subject : "", body);
    char *verdict = ask(CLASSIFY, ticket_text, "{\"temperature\": 0, \"max_tokens\": 60, "
                                               "\"response_format\": {\"type\": \"json_object\"}}");
    if (!verdict) return torpor_fail("could not classify ticket %s", id);
    torpor_json *v = torpor_json_parse_cstr(verdict);
    const char *category = torpor_json_str(torpor_json_get(v, "category"));
    const char *priority = torpor_json_str(torpor_json_get(v, "priority"));
    if (!category) category = "other";
    if (!priority) priority = "normal";

    /* 2. Look the customer up. */
    torpor_json *customer = lookup(crm, customer_id, via_mcp);
    const char *name = torpor_json_str(torpor_json_get(customer, "name"));
    const char *plan = torpor_json_str(torpor_json_get(customer, "plan"));

    /* 3. Count tickets per category, across agents (a shared namespace). */
    int err;
    int64_t count = torpor_kv_incr_ns("triage-stats", category, 1, &err);
    if (err) torpor_logf(TORPOR_WARN, "kv.incr: %s", torpor_last_error()->message);

    /* 4. Draft the reply. */
    char *prompt = torpor_strf("Customer: %s (plan: %s)\nCategory: %s, priority %s\n\n%s",
                               name ? name : "unknown", plan ? plan : "unknown", category, priority,
                               ticket_text);
    char *draft = ask(DRAFT, prompt, "{\"temperature\": 0.3}");
    if (!draft) return torpor_fail("could not draft a reply to ticket %s", id);

    /* 5. Send it: the grant requires a human's approval, so the agent parks here. */
    char *url = torpor_strf("%s/tickets/%s/replies", crm, id);
    char *reply = torpor_jsonf("{\"to\": %s, \"category\": %s, \"body\": %s}", customer_id, category, draft);
    torpor_json *sent = torpor_http_post_json("http.send_reply", url, reply, &err);
    const char *reply_id = torpor_json_str(torpor_json_path(sent, "json.reply_id"));
    bool ok = sent && torpor_json_int(torpor_json_get(sent, "status")) / 100 == 2 && reply_id;

    torpor_jb out = TORPOR_JB_INIT;
    torpor_jb_obj(&out);
    torpor_jb_key(&out, "ticket");        torpor_jb_str(&out, id);
    torpor_jb_key(&out, "category");      torpor_jb_str(&out, category);
    torpor_jb_key(&out, "priority");      torpor_jb_str(&out, priority);
    torpor_jb_key(&out, "customer");      torpor_jb_value(&out, customer);
    torpor_jb_key(&out, "draft");         torpor_jb_str(&out, draft);
    torpor_jb_key(&out, "sent");          torpor_jb_bool(&out, ok);
    if (ok) {
        torpor_jb_key(&out, "reply_id");  torpor_jb_str(&out, reply_id);
    } else {
        const torpor_result *e = sent ? NULL : torpor_last_error();
        torpor_jb_key(&out, "not_sent");
        torpor_jb_f(&out, "{\"code\": %s, \"message\": %s}", e ? e->code_name : "http_error",
                    e ? e->message : "the helpdesk did not accept the reply");
    }
    torpor_jb_key(&out, "category_count"); torpor_jb_int(&out, count);
    torpor_jb_key(&out, "tokens");        torpor_jb_int(&out, g_tokens);
    torpor_jb_end(&out);
    return torpor_output(torpor_jb_finish(&out));
}
