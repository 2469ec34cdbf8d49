/* mib: a 1 MiB agent for the suspend benchmark. It keeps 720 KiB of tables (a cache
 * it mostly never touches again, as real agents keep documents; two blocks sized to
 * the SDK allocator's 512 and 256 KiB classes, so linear memory ends just under
 * 1 MiB), rewrites a 32 KiB working set, then calls kv.incr n times, changing one
 * byte of the working set after each answer. Output: {"sum": ..., "check": ...}. */
#include "torpor.h"

#define TABLE (480 * 1024)
#define TABLE2 (240 * 1024)
#define WORKING (32 * 1024)

int torpor_main(void) {
    const torpor_json *n = torpor_json_get(torpor_input(), "n");
    if (!torpor_json_is_int(n) || torpor_json_int(n) < 0)
        return torpor_fail("input needs a non-negative integer \"n\"");
    int64_t steps = torpor_json_int(n), sum = 0;
    uint8_t *table = (uint8_t *)torpor_alloc(TABLE);
    uint8_t *table2 = (uint8_t *)torpor_alloc(TABLE2);
    if (!table || !table2) return torpor_fail("out of memory");
    table2[0] = 1;
    for (int i = 0; i < WORKING; i++) table[i] = (uint8_t)(i * 7 + 1);
    for (int64_t i = 0; i < steps; i++) {
        int err;
        int64_t v = torpor_kv_incr("counter", 1, &err); /* may hibernate here */
        if (err) return torpor_fail("kv.incr failed at step %lld", (long long)i);
        table[(i * 4099) % WORKING] ^= (uint8_t)v;
        sum += v;
    }
    uint32_t check = 0;
    for (int i = 0; i < WORKING; i++) check = check * 31 + table[i];
    return torpor_outputf("{\"sum\": %lld, \"check\": %u}", (long long)sum, check);
}
