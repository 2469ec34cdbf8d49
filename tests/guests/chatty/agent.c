/* chatty: input {"n": N, "ms": M}. Logs "step I" before each of N calls of the host
 * tool `slow.echo` (M milliseconds each), then "done": which lines an agent's kept log
 * holds after its host is killed mid-run and another host finishes it. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t n = torpor_json_int(torpor_json_get(in, "n"));
    int64_t ms = torpor_json_int(torpor_json_get(in, "ms"));
    for (int64_t i = 0; i < n; i++) {
        torpor_logf(TORPOR_INFO, "step %lld", (long long)i);
        torpor_result r = torpor_callf("slow.echo", "{\"value\": %lld, \"ms\": %lld}", (long long)i, (long long)ms);
        if (!r.ok) return torpor_fail("slow.echo failed: %s: %s", r.code_name, r.message);
        torpor_result_free(&r);
    }
    torpor_log(TORPOR_INFO, "done");
    return torpor_outputf("{\"calls\": %lld}", (long long)n);
}
