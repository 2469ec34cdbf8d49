/* soak: the misbehaving kinds of agent the soak benchmark (bench/soak.py) mixes with
 * the examples, one mode each, chosen by the input {"mode": ..., ...}:
 *   "spin"   never returns: the host ends it on fuel or on its wall-clock deadline
 *            (which one depends on the policy the benchmark packs it with);
 *   "grow"   allocates and touches memory without end: memory_limit;
 *   "calls"  calls kv.incr {"n"} times: past budgets.tool_calls the host terminates it;
 *   "call"   hands the host {"text"}, a JSON text, as is, as kv.set's arguments;
 *   "output" hands the host {"text"} as is as its output.
 * For "call" and "output" the output is the host's answer {"rc": int, "code": str}
 * (an output the host took is the text itself). */
#include "torpor.h"

static volatile uint32_t g_spin;

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const char *mode = torpor_json_str(torpor_json_get(in, "mode"));
    if (!mode) return torpor_fail("input needs a string \"mode\"");
    if (strcmp(mode, "spin") == 0) {
        for (;;) g_spin++;
    }
    if (strcmp(mode, "grow") == 0) {
        for (size_t i = 0;; i++) {
            char *p = (char *)torpor_alloc(256 * 1024);
            memset(p, (int)(i & 0xFF), 256 * 1024);
        }
    }
    if (strcmp(mode, "calls") == 0) {
        int64_t n = torpor_json_int(torpor_json_get(in, "n")), last = 0;
        for (int64_t i = 0; i < n; i++) {
            int err;
            last = torpor_kv_incr("calls", 1, &err);
            if (err) return torpor_fail("kv.incr failed at call %lld: %s", (long long)i,
                                        torpor_last_error()->code_name);
        }
        return torpor_outputf("{\"last\": %lld}", last);
    }
    const char *text = torpor_json_str(torpor_json_get(in, "text"));
    if (!text) return torpor_fail("mode %s needs a string \"text\"", mode);
    size_t len = strlen(text);
    int rc;
    if (strcmp(mode, "call") == 0) {
        rc = torpor_sys_tool_call("kv.set", 6, text, (int32_t)len);
    } else {
        rc = torpor_sys_output_write(text, (int32_t)len);
        if (rc == 0) return 0;
    }
    return torpor_outputf("{\"rc\": %d, \"code\": %s}", rc, torpor_error_name(rc));
}
