/* crunch: a memory-bound loop (hash a 256 KiB table, n rounds), to price the engine
 * profiles: bounds-checked loads and stores ("dense") against guard pages ("fast"). */
#include "torpor.h"
static uint32_t buf[65536];
int torpor_main(void) {
    const torpor_json *n = torpor_json_get(torpor_input(), "n");
    int64_t rounds = torpor_json_int(n);
    uint32_t h = 1;
    for (int64_t r = 0; r < rounds; r++)
        for (uint32_t i = 0; i < 65536; i++) { h = h * 2654435761u + buf[(i * 7919u) & 65535]; buf[i] = h; }
    return torpor_outputf("{\"h\": %u}", h);
}
