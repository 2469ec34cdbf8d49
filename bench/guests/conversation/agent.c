/* conversation: an LLM agent whose conversation grows every turn, for the storage
 * benchmark (`torpor bench conversation`). Input:
 *   {"turns": N, "bytes": B, "tool": "llm" | "kv", "summarise": K}
 * Each turn appends a user message of B bytes of word-like text (a fixed PRNG, so
 * every run writes the same bytes), sends the whole conversation to the tool
 * (llm.chat's messages, or kv.set of the messages), and appends the answer. With
 * "summarise": K > 0, every K turns the oldest half of the history is replaced by a
 * short summary message: the agent rewrites its history, data moves in memory.
 * The conversation is one JSON array text grown with torpor_realloc, so it moves
 * when the allocator cannot grow it in place, as a real agent's buffers do.
 * Output: {"turns": N, "bytes": <conversation bytes>, "check": <hash>}. */
#include "torpor.h"

static const char *WORDS[] = {
    "the", "agent", "tool", "model", "answer", "request", "memory", "store", "turn", "of",
    "and", "a", "to", "in", "is", "that", "for", "it", "with", "as", "was", "on", "be",
    "customer", "order", "invoice", "shipping", "delay", "refund", "policy", "account",
    "please", "check", "status", "thanks", "weather", "report", "summary", "meeting",
    "schedule", "budget", "quarter", "revenue", "forecast", "incident", "ticket", "user",
};
#define NWORDS (sizeof(WORDS) / sizeof(WORDS[0]))

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_rand(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static char *conv;      /* "[" + messages joined by "," (no closing bracket) */
static size_t conv_len, conv_cap;

static void conv_append(const char *s, size_t n) {
    if (conv_len + n + 2 > conv_cap) {
        size_t cap = conv_cap ? conv_cap : 4096;
        while (cap < conv_len + n + 2) cap = cap + cap / 2;
        conv = (char *)torpor_realloc(conv, cap);
        if (!conv) torpor_panic("out of memory at %zu bytes", cap);
        conv_cap = cap;
    }
    memcpy(conv + conv_len, s, n);
    conv_len += n;
    conv[conv_len] = 0;
}

static void add_message(const char *role, const char *text, size_t text_len) {
    torpor_jb b;
    memset(&b, 0, sizeof b);
    torpor_jb_obj(&b);
    torpor_jb_key(&b, "role");
    torpor_jb_str(&b, role);
    torpor_jb_key(&b, "content");
    torpor_jb_strn(&b, text, text_len);
    torpor_jb_end(&b);
    char *m = torpor_jb_finish(&b);
    if (conv_len > 1) conv_append(",", 1);
    conv_append(m, strlen(m));
    torpor_free(m);
}

static char *words(size_t n) {
    char *t = (char *)torpor_alloc(n + 1);
    size_t i = 0;
    while (i < n) {
        const char *w = WORDS[next_rand() % NWORDS];
        size_t wl = strlen(w);
        for (size_t k = 0; k < wl && i < n; k++) t[i++] = w[k];
        if (i < n) t[i++] = (next_rand() % 13 == 0) ? '.' : ' ';
    }
    t[n] = 0;
    return t;
}

/* Keep the first message and the newest half; the older half becomes one summary. */
static void summarise(int turn) {
    size_t half = conv_len / 2, cut = 1;
    /* the first message boundary at or after the middle: a "},{" */
    for (size_t i = half; i + 2 < conv_len; i++)
        if (conv[i] == '}' && conv[i + 1] == ',' && conv[i + 2] == '{') { cut = i + 2; break; }
    if (cut <= 1) return;
    char *rest = torpor_strndup(conv + cut, conv_len - cut);
    conv_len = 1; /* keep "[" */
    char *s = torpor_strf("summary of the conversation before turn %d: %zu bytes of requests and answers", turn, cut);
    add_message("system", s, strlen(s));
    torpor_free(s);
    conv_append(",", 1);
    conv_append(rest, strlen(rest));
    torpor_free(rest);
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t turns = torpor_json_int(torpor_json_get(in, "turns"));
    int64_t size = torpor_json_int(torpor_json_get(in, "bytes"));
    int64_t every = torpor_json_int(torpor_json_get(in, "summarise"));
    bool use_kv = torpor_json_streq(torpor_json_get(in, "tool"), "kv");
    if (turns < 0 || size < 1) return torpor_fail("input needs \"turns\" >= 0 and \"bytes\" >= 1");
    conv_append("[", 1);
    for (int64_t t = 0; t < turns; t++) {
        if (every > 0 && t > 0 && t % every == 0) summarise((int)t);
        char *text = words((size_t)size);
        add_message("user", text, (size_t)size);
        torpor_free(text);
        conv_append("]", 1); /* closed for the call, reopened after */
        int err = 0;
        if (use_kv) {
            err = torpor_kv_set("conversation", conv);
            if (err) return torpor_fail("kv.set failed at turn %lld", (long long)t);
            conv_len--;
            add_message("assistant", "stored", 6);
        } else {
            torpor_json *ans = torpor_llm_chat(conv, NULL, &err);
            if (!ans) return torpor_fail("llm.chat failed at turn %lld: %s", (long long)t,
                                         torpor_last_error() ? torpor_last_error()->message : "?");
            conv_len--;
            const char *content = torpor_json_str(torpor_json_get(ans, "content"));
            if (!content) content = "";
            add_message("assistant", content, strlen(content));
            torpor_json_free(ans);
        }
    }
    uint32_t check = 0;
    for (size_t i = 0; i < conv_len; i++) check = check * 31 + (uint8_t)conv[i];
    return torpor_outputf("{\"turns\": %lld, \"bytes\": %zu, \"check\": %u}", (long long)turns, conv_len, check);
}
