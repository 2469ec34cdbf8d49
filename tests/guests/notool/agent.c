/* notool: calls tools its policy does not grant (kv.set: registered but not
 * granted; no.such.tool: not registered at all). Both must come back as
 * structured errors it can handle (denied, rule "tools", ABI.md 4.5), then a
 * granted tool still works.
 * Output: {"kv.set": {...}, "no.such.tool": {...}, "kv.get": {...}} */
#include "torpor.h"

static void report(torpor_jb *b, const char *tool, const char *args) {
    torpor_result r = torpor_call(tool, args);
    torpor_jb_key(b, tool);
    torpor_jb_f(b, "{\"rc\": %d, \"code\": %s, \"message\": %s, \"response\": %v}", r.code,
                r.code_name, r.message, r.value);
    torpor_result_free(&r);
}

int torpor_main(void) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_obj(&b);
    report(&b, "kv.set", "{\"key\": \"k\", \"value\": 1}");
    report(&b, "no.such.tool", "{}");
    report(&b, "kv.get", "{\"key\": \"k\"}");
    torpor_jb_end(&b);
    char *out = torpor_jb_finish(&b);
    return torpor_output(out);
}
