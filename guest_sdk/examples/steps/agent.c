/* steps: input {"n": N}. Calls kv.incr("counter", 1) N times and keeps a running
 * sum of the answers in C locals, which must survive every hibernation at a
 * tool call. With a fresh store and n = 200: {"sum": 20100, "last": 200}. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *n = torpor_json_get(torpor_input(), "n");
    if (!torpor_json_is_int(n) || torpor_json_int(n) < 0)
        return torpor_fail("input needs a non-negative integer \"n\"");

    int64_t steps = torpor_json_int(n), sum = 0, last = 0;
    for (int64_t i = 0; i < steps; i++) {
        int err;
        last = torpor_kv_incr("counter", 1, &err); /* may hibernate here */
        if (err) {
            const torpor_result *e = torpor_last_error();
            return torpor_fail("kv.incr failed at step %lld: %s: %s", (long long)i,
                               e->code_name, e->message);
        }
        sum += last;
    }
    return torpor_outputf("{\"sum\": %lld, \"last\": %lld}", sum, last);
}
