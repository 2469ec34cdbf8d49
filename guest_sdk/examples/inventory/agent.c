/*
 * inventory: reserve stock for an order, handling structured tool errors.
 *
 * Input:  {"order_id": "A-1001",
 *          "order": [{"sku": "apple", "qty": 3}, {"sku": "pear", "qty": "5"}, ...]}
 * Tools:  inventory.reserve (an operator tool on the host, inventory_tools.py),
 *         kv.get / kv.set (the agent's durable store).
 * Output: {"order_id": ..., "reserved": [...], "backordered": [...],
 *          "rejected": [...], "open_backorders": N}
 *
 * What it shows:
 *  - invalid_args: order lines arrive from an upstream system that sometimes
 *    sends quantities as strings ("5"). The line is passed through as is; when
 *    the tool's argument model rejects it (invalid_args) the agent normalises
 *    the quantity once and retries.
 *  - tool_failed with details: an out-of-stock SKU fails with
 *    {"code": "tool_failed", "message": ..., "available": N, ...}; the agent
 *    reserves what is there and backorders the rest.
 *  - durable state: backorders accumulate in kv under "backorders".
 */
#include "torpor.h"

typedef struct {
    const char *order_id;
    torpor_jb reserved, backordered, rejected;
    torpor_jb all_backorders; /* previous backorders + this order's */
    int64_t open_backorders;
} summary;

static void note_reserved(summary *s, const char *sku, int64_t qty, const torpor_result *r) {
    torpor_jb_f(&s->reserved, "{\"sku\": %s, \"qty\": %lld, \"reservation\": %v}", sku, qty,
                torpor_json_get(r->value, "reservation_id"));
}

static void note_backorder(summary *s, const char *sku, int64_t qty) {
    torpor_jb_f(&s->backordered, "{\"sku\": %s, \"qty\": %lld}", sku, qty);
    torpor_jb_f(&s->all_backorders, "{\"order_id\": %s, \"sku\": %s, \"qty\": %lld}", s->order_id,
                sku, qty);
    s->open_backorders++;
}

static void note_rejected(summary *s, size_t line, const torpor_result *r) {
    torpor_jb_f(&s->rejected, "{\"line\": %zu, \"error\": %s, \"message\": %s}", line, r->code_name,
                r->message);
}

static torpor_result reserve(const summary *s, const char *sku, const char *qty_json) {
    return torpor_callf("inventory.reserve", "{\"order_id\": %s, \"sku\": %s, \"qty\": %j}",
                        s->order_id, sku, qty_json);
}

static void handle_line(summary *s, size_t i, const torpor_json *line) {
    const char *sku = torpor_json_str(torpor_json_get(line, "sku"));
    const torpor_json *qty = torpor_json_get(line, "qty");

    /* Pass the quantity through exactly as upstream sent it. */
    char *qty_json = torpor_json_dump(qty);
    torpor_result r = reserve(s, sku, qty_json);

    if (r.code == TORPOR_E_INVALID_ARGS && torpor_json_is_string(qty)) {
        /* "5" -> 5: parse the string as JSON; retry only if it is an integer. */
        torpor_json *n = torpor_json_parse_cstr(torpor_json_str(qty));
        if (torpor_json_is_int(n)) {
            torpor_logf(TORPOR_WARN, "line %zu: qty %s was a string, retrying as a number", i,
                        qty_json);
            torpor_free(qty_json);
            qty_json = torpor_json_dump(n);
            torpor_result_free(&r);
            r = reserve(s, sku, qty_json);
        }
        torpor_json_free(n);
    }
    torpor_json *want_v = torpor_json_parse_cstr(qty_json);
    int64_t want = torpor_json_int(want_v);
    torpor_json_free(want_v);
    torpor_free(qty_json);

    const torpor_json *available = torpor_json_get(r.value, "available");
    if (r.ok) {
        note_reserved(s, sku, want, &r);
    } else if (r.code == TORPOR_E_TOOL_FAILED && torpor_json_is_int(available)) {
        /* Out of stock: take what is there, backorder the rest. */
        int64_t have = torpor_json_int(available);
        torpor_logf(TORPOR_INFO, "line %zu: %s; backordering %lld", i, r.message,
                    (long long)(want - (have > 0 ? have : 0)));
        if (have > 0) {
            char *have_json = torpor_jsonf("%lld", (long long)have);
            torpor_result part = reserve(s, sku, have_json);
            torpor_free(have_json);
            if (part.ok) note_reserved(s, sku, have, &part), want -= have;
            torpor_result_free(&part);
        }
        note_backorder(s, sku, want);
    } else {
        torpor_logf(TORPOR_WARN, "line %zu rejected: %s: %s", i, r.code_name, r.message);
        note_rejected(s, i, &r);
    }
    torpor_result_free(&r);
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const torpor_json *order = torpor_json_get(in, "order");
    summary s = {.order_id = torpor_json_str(torpor_json_get(in, "order_id"))};
    if (!s.order_id || !torpor_json_is_array(order))
        return torpor_fail("input needs \"order_id\" (string) and \"order\" (array)");

    /* Earlier backorders (null the first time). */
    int err;
    torpor_json *prev = torpor_kv_get("backorders", &err);
    if (err) return torpor_fail("kv.get backorders: %s", torpor_last_error()->message);
    torpor_jb_arr(&s.all_backorders);
    for (size_t i = 0; i < torpor_json_len(prev); i++)
        torpor_jb_value(&s.all_backorders, torpor_json_index(prev, i));
    s.open_backorders = (int64_t)torpor_json_len(prev);
    torpor_json_free(prev);

    torpor_jb_arr(&s.reserved);
    torpor_jb_arr(&s.backordered);
    torpor_jb_arr(&s.rejected);
    for (size_t i = 0; i < torpor_json_len(order); i++) handle_line(&s, i, torpor_json_index(order, i));
    torpor_jb_end(&s.reserved);
    torpor_jb_end(&s.backordered);
    torpor_jb_end(&s.rejected);
    torpor_jb_end(&s.all_backorders);

    char *all = torpor_jb_finish(&s.all_backorders);
    if (torpor_kv_set("backorders", all) != 0)
        return torpor_fail("kv.set backorders: %s", torpor_last_error()->message);
    torpor_free(all);

    char *reserved = torpor_jb_finish(&s.reserved);
    char *backordered = torpor_jb_finish(&s.backordered);
    char *rejected = torpor_jb_finish(&s.rejected);
    return torpor_outputf("{\"order_id\": %s, \"reserved\": %j, \"backordered\": %j, "
                          "\"rejected\": %j, \"open_backorders\": %lld}",
                          s.order_id, reserved, backordered, rejected, s.open_backorders);
}
