/* poison: hands the host a JSON text it was given, as is, where the host parses guest
 * JSON: as tool arguments (kv.set) and as its output. The input is
 * {"mode": "call" | "output", "text": "<the JSON text>"}.
 * Output: the host's answer, {"rc": int, "code": str}; for mode "output" a refused
 * output is reported the same way (the text itself when the host took it). */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const char *mode = torpor_json_str(torpor_json_get(in, "mode"));
    const char *text = torpor_json_str(torpor_json_get(in, "text"));
    if (!mode || !text) return torpor_fail("input needs strings \"mode\" and \"text\"");
    size_t len = strlen(text);
    int rc;
    if (mode[0] == 'c') {
        rc = torpor_sys_tool_call("kv.set", 6, text, (int32_t)len);
    } else {
        rc = torpor_sys_output_write(text, (int32_t)len);
        if (rc == 0) return 0;
    }
    return torpor_outputf("{\"rc\": %d, \"code\": %s}", rc, torpor_error_name(rc));
}
