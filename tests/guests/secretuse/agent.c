/* secretuse: input {"n": N, "ms": M}. Calls the host tool `erp.check` N times.
 * The tool uses the `erp_token` credential on the host side and answers only
 * {"ok": true, "order": i}: the agent never sees the secret, only the result.
 * Each answer takes M milliseconds, so the host hibernates the agent while it
 * waits (snapshots), and a short credential lease can run out mid-call. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t n = torpor_json_int(torpor_json_get(in, "n"));
    int64_t ms = torpor_json_int(torpor_json_get(in, "ms"));
    int64_t oks = 0, sum = 0;
    for (int64_t i = 0; i < n; i++) {
        torpor_result r = torpor_callf("erp.check", "{\"order\": %lld, \"ms\": %lld}", (long long)i, (long long)ms);
        if (!r.ok) return torpor_fail("erp.check failed: %s: %s", r.code_name, r.message);
        if (torpor_json_bool(torpor_json_get(r.value, "ok"))) oks++;
        sum += torpor_json_int(torpor_json_get(r.value, "order"));
        torpor_logf(TORPOR_INFO, "order %lld checked: %s", (long long)i, r.raw);
        torpor_result_free(&r);
    }
    return torpor_outputf("{\"ok\": %lld, \"sum\": %lld}", (long long)oks, (long long)sum);
}
