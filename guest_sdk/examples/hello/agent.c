/* hello: no tools. Input {"name": "ada"} -> output {"greeting": "hello, ada"}. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *name = torpor_json_get(torpor_input(), "name");
    if (!torpor_json_is_string(name)) return torpor_fail("input needs a string \"name\"");

    /* %.*S escapes the bytes into the JSON string literal (quotes, control
     * characters, even a \u0000 inside the name survive). */
    return torpor_outputf("{\"greeting\": \"hello, %.*S\"}",
                          (int)torpor_json_len(name), torpor_json_str(name));
}
