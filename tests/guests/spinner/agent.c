/* spinner: input {"n": N, "spin": S}. Burns S loop iterations of fuel, then calls
 * kv.incr("counter", 1), N times; outputs {"last": <the last value>}. A guest whose
 * calls are answered inside its tool_call import, burning fuel between them, for the
 * tests of calls answered inline (tests/test_inline_calls.py). */
#include "torpor.h"

static volatile uint32_t g_spin;

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t n = torpor_json_int(torpor_json_get(in, "n"));
    int64_t spin = torpor_json_int(torpor_json_get(in, "spin"));
    int64_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < spin; j++) g_spin++;
        int err;
        last = torpor_kv_incr("counter", 1, &err);
        if (err) return torpor_fail("kv.incr failed at step %lld", (long long)i);
    }
    return torpor_outputf("{\"last\": %lld}", last);
}
