/* logsteps: input {"n": N, "lines": L}. Logs L lines, then calls kv.incr("counter", 1),
 * N times: the steps agent with a guest log, for what keeping log lines in the store
 * costs a tool call (`python bench/log_overhead.py`; L = 0 is the same agent silent). */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    int64_t n = torpor_json_int(torpor_json_get(in, "n"));
    int64_t lines = torpor_json_int(torpor_json_get(in, "lines"));
    int64_t last = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t j = 0; j < lines; j++)
            torpor_logf(TORPOR_INFO, "step %lld: line %lld of %lld, a line of a typical length", (long long)i,
                        (long long)j, (long long)lines);
        int err;
        last = torpor_kv_incr("counter", 1, &err);
        if (err) return torpor_fail("kv.incr failed at step %lld", (long long)i);
    }
    return torpor_outputf("{\"last\": %lld}", last);
}
