/*
 * sdk_selftest: exports that let tests/test_guest_sdk_*.py exercise the SDK
 * runtime (JSON parser, builder, formatting, allocator) case by case, and a
 * torpor_main that exercises the tool wrappers against a host.
 */
#include "torpor.h"

#define EXPORT(n) __attribute__((export_name(n)))

static char *g_buf;
static size_t g_buf_cap;
static char *g_out;

/* Answer s through t_out (takes ownership); returns its length or -1 for NULL. */
static int32_t put_out(char *s) {
    torpor_free(g_out);
    g_out = s;
    return s ? (int32_t)strlen(s) : -1;
}

EXPORT("t_buf") char *t_buf(uint32_t n) {
    if (n + 1 > g_buf_cap) {
        g_buf = (char *)torpor_realloc(g_buf, n + 1);
        g_buf_cap = n + 1;
    }
    return g_buf;
}

EXPORT("t_out") const char *t_out(void) { return g_out; }
EXPORT("t_heap_used") uint32_t t_heap_used(void) { return (uint32_t)torpor_heap_used(); }
EXPORT("t_heap_reserved") uint32_t t_heap_reserved(void) { return (uint32_t)torpor_heap_reserved(); }
EXPORT("t_alloc") void *t_alloc(uint32_t n) { return torpor_alloc(n); }
EXPORT("t_free") void t_free(void *p) { torpor_free(p); }
EXPORT("t_realloc") void *t_realloc(void *p, uint32_t n) { return torpor_realloc(p, n); }

/* Parse g_buf[0..len), dump it compactly. -1: parse failed; -2: leak. */
EXPORT("t_parse") int32_t t_parse(uint32_t len) {
    put_out(NULL);
    size_t before = torpor_heap_used();
    torpor_json *v = torpor_json_parse(g_buf, len);
    if (!v) return torpor_heap_used() == before ? -1 : -2;
    torpor_json_free(v);
    if (torpor_heap_used() != before) return -2;
    v = torpor_json_parse(g_buf, len);
    char *d = torpor_json_dump(v);
    torpor_json_free(v);
    return put_out(d);
}

static const char *type_name(torpor_json_type_t t) {
    switch (t) {
    case TORPOR_JSON_MISSING: return "missing";
    case TORPOR_JSON_NULL: return "null";
    case TORPOR_JSON_BOOL: return "bool";
    case TORPOR_JSON_NUMBER: return "number";
    case TORPOR_JSON_STRING: return "string";
    case TORPOR_JSON_ARRAY: return "array";
    case TORPOR_JSON_OBJECT: return "object";
    }
    return "?";
}

/* g_buf = JSON text, NUL, path (NUL-terminated). Describe the node at path. */
EXPORT("t_query") int32_t t_query(uint32_t json_len) {
    torpor_json *root = torpor_json_parse(g_buf, json_len);
    if (!root) return put_out(NULL);
    const char *path = g_buf + json_len + 1;
    const torpor_json *v = torpor_json_path(root, path);
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_obj(&b);
    torpor_jb_key(&b, "type"); torpor_jb_str(&b, type_name(torpor_json_type(v)));
    torpor_jb_key(&b, "is_null"); torpor_jb_bool(&b, torpor_json_is_null(v));
    torpor_jb_key(&b, "is_int"); torpor_jb_bool(&b, torpor_json_is_int(v));
    torpor_jb_key(&b, "int"); torpor_jb_f(&b, "\"%lld\"", (long long)torpor_json_int(v));
    torpor_jb_key(&b, "num"); torpor_jb_num(&b, torpor_json_num(v));
    torpor_jb_key(&b, "bool"); torpor_jb_bool(&b, torpor_json_bool(v));
    torpor_jb_key(&b, "len"); torpor_jb_int(&b, (int64_t)torpor_json_len(v));
    torpor_jb_key(&b, "str"); torpor_jb_strn(&b, torpor_json_str(v), torpor_json_len(v));
    torpor_jb_key(&b, "key0"); torpor_jb_str(&b, torpor_json_key(v, 0));
    torpor_jb_key(&b, "first"); torpor_jb_value(&b, torpor_json_index(v, 0));
    torpor_jb_key(&b, "get_a"); torpor_jb_value(&b, torpor_json_get(v, "a"));
    torpor_jb_end(&b);
    torpor_json_free(root);
    return put_out(torpor_jb_finish(&b));
}

/* torpor_json_num of the document in g_buf[0..len) (NaN if it does not parse). */
EXPORT("t_num") double t_num(uint32_t len) {
    torpor_json *v = torpor_json_parse(g_buf, len);
    double d = v ? torpor_json_num(v) : 0.0 / 0.0;
    torpor_json_free(v);
    return d;
}

EXPORT("t_double") int32_t t_double(double d) { return put_out(torpor_jsonf("%f", d)); }
EXPORT("t_double_text") int32_t t_double_text(double d) { return put_out(torpor_strf("%g", d)); }

/* Fixed formatting / builder cases; the test knows the expected texts. */
EXPORT("t_format") int32_t t_format(void) {
    torpor_jb all = TORPOR_JB_INIT;
    torpor_jb_obj(&all);
#define CASE(name, expr)            \
    do {                            \
        char *s_ = (expr);          \
        torpor_jb_key(&all, name);  \
        torpor_jb_str(&all, s_);    \
        torpor_free(s_);            \
    } while (0)

    CASE("s_escape", torpor_jsonf("{\"k\": %s}", "q\"b\\s/n\nt\tc\x01 \x7f é 😀"));
    CASE("s_null", torpor_jsonf("[%s]", (const char *)NULL));
    CASE("S_splice", torpor_jsonf("\"hello, %S!\"", "a\"b"));
    CASE("s_len", torpor_jsonf("%.*s", 3, "abcdef"));
    CASE("s_len_nul", torpor_jsonf("%.*s", 3, "a\0b"));
    CASE("s_bad_utf8", torpor_jsonf("%s", "x\xff\xc3(y\xed\xa0\x80z\xf0\x9f\x98"));
    CASE("ints", torpor_jsonf("[%d, %i, %u, %ld, %lld, %llu, %zu, %x, %llx]", -5, 7, 4000000000u,
                              -123456L, (long long)INT64_MIN, (unsigned long long)UINT64_MAX,
                              (size_t)42, 255u, 0xDEADBEEFCAFEull));
    CASE("int64_max", torpor_jsonf("%lld", (long long)INT64_MAX));
    CASE("bools", torpor_jsonf("[%b, %b]", 1, 0));
    CASE("raw", torpor_jsonf("{\"a\": %j, \"b\": %j}", "[1, {\"x\": null}]", (const char *)NULL));
    CASE("percent", torpor_strf("100%% %s %c", "sure", 'x'));
    CASE("text_s", torpor_strf("<%s|%.*s|%s>", "a\"b", 2, "xyz", (const char *)NULL));
    CASE("doubles", torpor_jsonf("[%f, %f, %f, %f, %f]", 0.1, -2.5, 1e21, 1.0 / 3.0, 0.0));
    CASE("nonfinite_json", torpor_jsonf("[%f, %f]", 1e308 * 10, 0.0 / 0.0));
    CASE("nonfinite_text", torpor_strf("%g %g", -1e308 * 10, 0.0 / 0.0));
    {
        torpor_json *v = torpor_json_parse_cstr("{\"x\": [1, 2.50, \"s\"]}");
        CASE("value", torpor_jsonf("{\"v\": %v, \"missing\": %v}", torpor_json_get(v, "x"),
                                   torpor_json_get(v, "nope")));
        torpor_json_free(v);
    }

    /* builder: a good document and several misuses (each -> NULL) */
    {
        torpor_jb b = TORPOR_JB_INIT;
        torpor_jb_obj(&b);
        torpor_jb_key(&b, "name"); torpor_jb_str(&b, "tab\there");
        torpor_jb_key(&b, "n"); torpor_jb_int(&b, -42);
        torpor_jb_key(&b, "x"); torpor_jb_num(&b, 2.5);
        torpor_jb_key(&b, "ok"); torpor_jb_bool(&b, true);
        torpor_jb_key(&b, "nothing"); torpor_jb_null(&b);
        torpor_jb_key(&b, "list"); torpor_jb_arr(&b);
        for (int i = 0; i < 3; i++) torpor_jb_int(&b, i);
        torpor_jb_obj(&b); torpor_jb_end(&b);
        torpor_jb_arr(&b); torpor_jb_end(&b);
        torpor_jb_raw(&b, "{\"r\":1}");
        torpor_jb_f(&b, "{\"f\": %s}", "v");
        torpor_jb_strn(&b, "a\0b", 3);
        torpor_jb_end(&b);
        torpor_jb_key(&b, "k\"ey"); torpor_jb_str(&b, NULL);
        torpor_jb_end(&b);
        CASE("builder", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* value without key in an object */
        torpor_jb_obj(&b); torpor_jb_int(&b, 1); torpor_jb_end(&b);
        CASE("builder_no_key", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* unclosed */
        torpor_jb_arr(&b); torpor_jb_int(&b, 1);
        CASE("builder_unclosed", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* two top-level values */
        torpor_jb_int(&b, 1); torpor_jb_int(&b, 2);
        CASE("builder_two_values", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* key in an array, end too often */
        torpor_jb_arr(&b); torpor_jb_key(&b, "k"); torpor_jb_end(&b); torpor_jb_end(&b);
        CASE("builder_key_in_array", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* dangling key */
        torpor_jb_obj(&b); torpor_jb_key(&b, "k"); torpor_jb_end(&b);
        CASE("builder_dangling_key", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* empty */
        CASE("builder_empty", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* too deep */
        for (int i = 0; i < TORPOR_JSON_MAX_DEPTH + 1; i++) torpor_jb_arr(&b);
        for (int i = 0; i < TORPOR_JSON_MAX_DEPTH + 1; i++) torpor_jb_end(&b);
        CASE("builder_too_deep", torpor_jb_finish(&b));
    }
    {
        torpor_jb b = TORPOR_JB_INIT; /* exactly the max depth is fine */
        for (int i = 0; i < TORPOR_JSON_MAX_DEPTH; i++) torpor_jb_arr(&b);
        for (int i = 0; i < TORPOR_JSON_MAX_DEPTH; i++) torpor_jb_end(&b);
        char *s = torpor_jb_finish(&b);
        CASE("builder_max_depth_len", torpor_jsonf("%zu", s ? strlen(s) : 0));
        torpor_free(s);
    }
#undef CASE
    torpor_jb_end(&all);
    return put_out(torpor_jb_finish(&all));
}

/* Random alloc / realloc / free with content checks. 0 = fine, <0 = failure. */
static uint32_t g_rng;
static uint32_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 17;
    g_rng ^= g_rng << 5;
    return g_rng;
}

#define SLOTS 256
EXPORT("t_alloc_stress") int32_t t_alloc_stress(uint32_t seed, uint32_t iters, uint32_t max_size) {
    static uint8_t *ptr[SLOTS];
    static uint32_t size[SLOTS];
    static uint8_t tag[SLOTS];
    g_rng = seed ? seed : 1;
    size_t base = torpor_heap_used();
    for (uint32_t it = 0; it < iters; it++) {
        uint32_t i = rnd() % SLOTS;
        if (ptr[i]) { /* verify the content survived */
            for (uint32_t k = 0; k < size[i]; k++)
                if (ptr[i][k] != (uint8_t)(tag[i] + k)) return -1;
            if (((uintptr_t)ptr[i] & 7) != 0) return -2;
        }
        uint32_t op = rnd() % 3;
        uint32_t n = (rnd() % 8 == 0) ? rnd() % max_size : rnd() % 200;
        if (op == 0 || !ptr[i]) {
            torpor_free(ptr[i]);
            ptr[i] = (uint8_t *)torpor_alloc(n);
        } else if (op == 1) {
            ptr[i] = (uint8_t *)torpor_realloc(ptr[i], n);
            if (n == 0) { size[i] = 0; continue; }
            uint32_t keep = size[i] < n ? size[i] : n;
            for (uint32_t k = 0; k < keep; k++)
                if (ptr[i][k] != (uint8_t)(tag[i] + k)) return -3;
        } else {
            torpor_free(ptr[i]);
            ptr[i] = NULL;
            size[i] = 0;
            continue;
        }
        size[i] = n;
        tag[i] = (uint8_t)rnd();
        for (uint32_t k = 0; k < n; k++) ptr[i][k] = (uint8_t)(tag[i] + k);
    }
    for (uint32_t i = 0; i < SLOTS; i++) {
        torpor_free(ptr[i]);
        ptr[i] = NULL;
        size[i] = 0;
    }
    if (torpor_heap_used() != base) return -4;
    return 0;
}

/* Tool wrappers against a host with kv.* and clock.now. */
int torpor_main(void) {
    torpor_jb b = TORPOR_JB_INIT;
    int err = 99;
    torpor_jb_obj(&b);

    torpor_json *missing = torpor_kv_get("nothing-here", &err);
    torpor_jb_key(&b, "get_missing");
    torpor_jb_f(&b, "{\"err\": %d, \"is_null\": %b}", err, torpor_json_is_null(missing));
    torpor_json_free(missing);

    int set_rc = torpor_kv_set("doc", "{\"list\": [1, 2, 3], \"s\": \"\\u00e9\"}");
    torpor_json *doc = torpor_kv_get("doc", &err);
    torpor_jb_key(&b, "set_get");
    torpor_jb_f(&b, "{\"set\": %d, \"err\": %d, \"value\": %v, \"second\": %v}", set_rc, err, doc,
                torpor_json_path(doc, "list[1]"));
    torpor_json_free(doc);

    int64_t a = torpor_kv_incr("n", 5, &err);
    int64_t c = torpor_kv_incr("n", -7, NULL);
    torpor_jb_key(&b, "incr");
    torpor_jb_f(&b, "[%lld, %lld, %d]", (long long)a, (long long)c, err);

    int64_t now = torpor_clock_now(&err);
    torpor_jb_key(&b, "clock");
    torpor_jb_f(&b, "{\"unix_ms\": %lld, \"err\": %d}", (long long)now, err);

    /* kv.incr on a string value: a tool error through the wrapper */
    torpor_kv_set("text", "\"abc\"");
    int64_t bad = torpor_kv_incr("text", 1, &err);
    const torpor_result *e = torpor_last_error();
    torpor_jb_key(&b, "incr_error");
    torpor_jb_f(&b, "{\"value\": %lld, \"err\": %d, \"code\": %s, \"message\": %s}",
                (long long)bad, err, e ? e->code_name : NULL, e ? e->message : NULL);

    /* raw torpor_call: granted but unknown, not granted, then a rule's denial */
    torpor_result r = torpor_call("no.such.tool", NULL);
    torpor_jb_key(&b, "unknown");
    torpor_jb_f(&b, "{\"ok\": %b, \"code\": %d, \"name\": %s, \"retryable\": %b, \"raw\": %j}", r.ok,
                r.code, r.code_name, r.retryable, r.raw);
    torpor_result_free(&r);

    r = torpor_call("not.granted", "{}");
    torpor_jb_key(&b, "ungranted");
    torpor_jb_f(&b, "{\"code\": %d, \"name\": %s, \"rule\": %s}", r.code, r.code_name, r.rule);
    torpor_result_free(&r);

    r = torpor_callf("test.deny", "{\"channel\": %s}", "#general");
    torpor_jb_key(&b, "denied");
    torpor_jb_f(&b, "{\"ok\": %b, \"code\": %d, \"name\": %s, \"rule\": %s, \"retryable\": %b}", r.ok,
                r.code, r.code_name, r.rule, r.retryable);
    torpor_result_free(&r);

    r = torpor_callf("test.echo", "{\"s\": %s, \"n\": %lld}", "é\n\"", (long long)INT64_MIN);
    torpor_jb_key(&b, "echo");
    torpor_jb_f(&b, "{\"ok\": %b, \"value\": %v}", r.ok, r.value);
    torpor_result_free(&r);

    torpor_log(TORPOR_INFO, "selftest done");
    torpor_logf(TORPOR_DEBUG, "heap used %zu reserved %zu", torpor_heap_used(), torpor_heap_reserved());
    torpor_jb_end(&b);
    char *out = torpor_jb_finish(&b);
    return torpor_output(out);
}
