/* slowtool: input {"n": N, "ms": M}. Calls the host tool `slow.echo` N times;
 * each answer takes M milliseconds, long enough for the host to hibernate the
 * agent while it waits (the cold path). Keeps a running checksum in locals. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t n = torpor_json_int(torpor_json_get(in, "n"));
    int64_t ms = torpor_json_int(torpor_json_get(in, "ms"));
    int64_t acc = 7;
    for (int64_t i = 0; i < n; i++) {
        torpor_result r = torpor_callf("slow.echo", "{\"value\": %lld, \"ms\": %lld}", (long long)i, (long long)ms);
        if (!r.ok) return torpor_fail("slow.echo failed: %s: %s", r.code_name, r.message);
        acc = acc * 31 + torpor_json_int(torpor_json_get(r.value, "value"));
        torpor_result_free(&r);
    }
    return torpor_outputf("{\"acc\": %lld, \"calls\": %lld}", (long long)acc, (long long)n);
}
