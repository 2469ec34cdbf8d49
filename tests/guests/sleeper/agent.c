/* sleeper: input {"ms": M, "sleeps": S, "incr": N, "raw": <args>?}.
 * Sleeps M milliseconds S times (timer.sleep, durable: a long sleep hibernates
 * the agent), then counts to N with kv.incr, which its policy rate-limits with
 * on_limit = "wait" (the host holds a call over the rate instead of denying it).
 * Outputs the count and the milliseconds clock.now saw pass. With "raw", makes
 * one timer.sleep call with those arguments as given and outputs its answer's
 * code: how a guest sees bad arguments. An error the guest sees is its output
 * ({"error": code, "at": i}), so a test can read it. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const torpor_json *raw = torpor_json_get(in, "raw");
    if (raw) {
        char *args = torpor_jsonf("%v", raw);
        torpor_result r = torpor_call("timer.sleep", args);
        torpor_free(args);
        int rc = torpor_outputf("{\"ok\": %b, \"code\": %s, \"message\": %s}", r.ok, r.code_name, r.message);
        torpor_result_free(&r);
        return rc;
    }
    int64_t ms = torpor_json_int(torpor_json_get(in, "ms"));
    int64_t sleeps = torpor_json_int(torpor_json_get(in, "sleeps"));
    int64_t n = torpor_json_int(torpor_json_get(in, "incr"));
    int err = 0;
    int64_t t0 = torpor_clock_now(&err);
    if (err) return torpor_fail("clock.now failed: %s", torpor_error_name(err));
    for (int64_t i = 0; i < sleeps; i++) {
        int rc = torpor_sleep_ms(ms);
        if (rc) return torpor_outputf("{\"error\": %s, \"at\": %lld}", torpor_last_error()->code_name, (long long)i);
    }
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        count = torpor_kv_incr("count", 1, &err);
        if (err) return torpor_outputf("{\"error\": %s, \"at\": %lld}", torpor_last_error()->code_name, (long long)i);
    }
    int64_t t1 = torpor_clock_now(&err);
    if (err) return torpor_fail("clock.now failed: %s", torpor_error_name(err));
    return torpor_outputf("{\"count\": %lld, \"elapsed_ms\": %lld}", (long long)count, (long long)(t1 - t0));
}
