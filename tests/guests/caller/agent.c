/* caller: a scriptable agent for host tests. Input:
 *   {"calls": [{"tool": "kv.incr", "args": {...}}, ...], "stop_on_error": false}
 * Calls each tool in order and outputs
 *   {"results": [{"rc": 0, "code": "ok", "reason_code": ..., "rule": ..., "value": <result or error>}, ...]}
 * so a test can drive any policy through a real guest and see exactly what the
 * guest was told. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *calls = torpor_json_get(torpor_input(), "calls");
    bool stop = torpor_json_bool(torpor_json_get(torpor_input(), "stop_on_error"));
    torpor_jb out = TORPOR_JB_INIT;
    torpor_jb_obj(&out);
    torpor_jb_key(&out, "results");
    torpor_jb_arr(&out);
    size_t n = torpor_json_len(calls);
    for (size_t i = 0; i < n; i++) {
        const torpor_json *c = torpor_json_index(calls, i);
        const char *tool = torpor_json_str(torpor_json_get(c, "tool"));
        char *args = torpor_json_dump(torpor_json_get(c, "args"));
        torpor_result r = torpor_call(tool ? tool : "", args ? args : "{}");
        torpor_jb_obj(&out);
        torpor_jb_key(&out, "rc");
        torpor_jb_int(&out, r.code);
        torpor_jb_key(&out, "code");
        torpor_jb_str(&out, r.code_name);
        torpor_jb_key(&out, "reason_code");
        torpor_jb_value(&out, torpor_json_get(r.value, "reason_code"));
        torpor_jb_key(&out, "rule");
        torpor_jb_str(&out, r.rule);
        torpor_jb_key(&out, "value");
        torpor_jb_value(&out, r.value);
        torpor_jb_end(&out);
        bool failed = !r.ok;
        torpor_result_free(&r);
        torpor_free(args);
        if (failed && stop) break;
    }
    torpor_jb_end(&out);
    torpor_jb_end(&out);
    return torpor_output(torpor_jb_finish(&out));
}
