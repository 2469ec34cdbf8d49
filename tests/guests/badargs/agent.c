/* badargs: sends kv.incr arguments that are not JSON, not an object, or of the
 * wrong types, and reports every answer; then a correct call must still work.
 * Output: {"<case>": {"rc": int, "code": str, "message": str}, ...}
 * Expected: not_json, truncated, invalid_utf8 -> invalid_json (-2);
 *           array, string, key_number, by_string, by_float, missing_key -> invalid_args (-5);
 *           valid -> rc 0 with result {"value": 1} on a fresh store. */
#include "torpor.h"

static void report(torpor_jb *b, const char *name, const char *args, size_t len) {
    int rc = torpor_sys_tool_call("kv.incr", 7, args, (int32_t)len);
    int32_t n = torpor_sys_response_len();
    char *raw = (char *)torpor_alloc((size_t)(n > 0 ? n : 0) + 1);
    int32_t got = n > 0 ? torpor_sys_response_read(raw, n) : 0;
    torpor_json *resp = torpor_json_parse(raw, got > 0 ? (size_t)got : 0);
    torpor_jb_key(b, name);
    torpor_jb_f(b, "{\"rc\": %d, \"code\": %s, \"message\": %v, \"result\": %v}", rc,
                torpor_error_name(rc), torpor_json_get(resp, "message"),
                rc == 0 ? resp : NULL);
    torpor_json_free(resp);
    torpor_free(raw);
}

#define CASE(b, name, lit) report(b, name, lit, sizeof(lit) - 1)

int torpor_main(void) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_obj(&b);
    CASE(&b, "not_json", "key=counter&by=1");
    CASE(&b, "truncated", "{\"key\": \"counter\", \"by\": ");
    CASE(&b, "invalid_utf8", "{\"key\": \"\xff\xfe\"}");
    CASE(&b, "array", "[\"counter\", 1]");
    CASE(&b, "string", "\"counter\"");
    CASE(&b, "key_number", "{\"key\": 5}");
    CASE(&b, "by_string", "{\"key\": \"counter\", \"by\": \"1\"}");
    CASE(&b, "by_float", "{\"key\": \"counter\", \"by\": 1.5}");
    CASE(&b, "missing_key", "{\"by\": 1}");
    CASE(&b, "valid", "{\"key\": \"badargs-counter\", \"by\": 1}");
    torpor_jb_end(&b);
    char *out = torpor_jb_finish(&b);
    return torpor_output(out);
}
