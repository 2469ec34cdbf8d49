// greet/agent.c
#include "torpor.h"

int torpor_main(void) {
    const char *name = torpor_json_str(torpor_json_get(torpor_input(), "name"));
    if (!name) return torpor_fail("input needs a string \"name\"");
    int err;
    /* A tool call: the agent may hibernate here. "greet" is a shared namespace, the same for
       every agent whose policy grants it, so the count goes on from run to run. */
    int64_t visits = torpor_kv_incr_ns("greet", "visits", 1, &err);
    if (err) return torpor_fail("kv.incr: %s", torpor_last_error()->message);
    return torpor_outputf("{\"greeting\": \"hello, %S\", \"visits\": %lld}", name, (long long)visits);
}
