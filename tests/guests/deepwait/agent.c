/* deepwait: input {"depth": N}. Recurses N frames deep (each frame keeps live
 * locals), calls kv.incr at the bottom, and unwinds adding up. With a small
 * depth it completes; with a large one the wasm stack at the tool call does
 * not fit the Asyncify buffer and the host must fail it cleanly
 * (suspend_overflow), never corrupt memory. */
#include "torpor.h"

__attribute__((noinline)) static int64_t dive(int64_t depth, int64_t a, int64_t b, int64_t c) {
    if (depth == 0) {
        int err;
        return torpor_kv_incr("bottom", 1, &err) + a + b + c;
    }
    int64_t r = dive(depth - 1, a + 1, b ^ depth, c * 3 + 1);
    return ((r ^ a) * 3 + b) % 1000003 - (c & 7);  /* not an accumulator: no loop rewrite */
}

int torpor_main(void) {
    int64_t depth = torpor_json_int(torpor_json_get(torpor_input(), "depth"));
    int64_t total = dive(depth, 0, 0, 0);
    return torpor_outputf("{\"total\": %lld}", total);
}
