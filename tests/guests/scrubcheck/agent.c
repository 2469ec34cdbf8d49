/* scrubcheck: proves that a recycled linear memory carries nothing of its previous
 * owner (tests/test_memory_pool.py).
 *
 * {"mode": "write", "seed": S, "kib": K} fills K KiB of heap, a static array and a
 * stack array with a canary word derived from S (computed at run time and kept in
 * wasm locals, so it is in no data segment), then scans its own memory for the canary
 * and reports the hits (a control: the scanner does find canaries that are there).
 * {"mode": "scan", "seed": S, "pages": P} grows its memory to P pages with memory.grow
 * and, before allocating anything else, counts canary words in all of memory and
 * nonzero bytes in the part it grew: both must be 0 in a fresh memory. */
#include "torpor.h"

static uint64_t canary_of(uint64_t x) { /* splitmix64: no zero, no trivial pattern */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return (x ^ (x >> 31)) | 1;
}

static uint64_t g_static[1024]; /* .bss: zero only because a new memory is */

static uint64_t count_hits(uint64_t canary, size_t from, size_t to, uint64_t *nonzero) {
    uint64_t hits = 0, nz = 0;
    for (size_t a = from; a + 8 <= to; a += 8) {
        uint64_t w = *(volatile uint64_t *)(uintptr_t)a;
        hits += w == canary;
        nz += w != 0;
    }
    if (nonzero) *nonzero = nz;
    return hits;
}

static void fill_stack(uint64_t canary) {
    volatile uint64_t stack[512];
    for (int i = 0; i < 512; i++) stack[i] = canary;
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const char *mode = torpor_json_str(torpor_json_get(in, "mode"));
    const torpor_json *seed = torpor_json_get(in, "seed");
    if (!mode || !torpor_json_is_int(seed)) return torpor_fail("input needs \"mode\" and an integer \"seed\"");
    uint64_t canary = canary_of((uint64_t)torpor_json_int(seed));
    if (mode[0] == 'w') {
        int64_t kib = torpor_json_int(torpor_json_get(in, "kib"));
        uint64_t *heap = (uint64_t *)torpor_alloc((size_t)kib * 1024);
        if (!heap) return torpor_fail("out of memory");
        for (size_t i = 0; i < (size_t)kib * 128; i++) heap[i] = canary;
        for (int i = 0; i < 1024; i++) g_static[i] = canary;
        fill_stack(canary);
        size_t size = __builtin_wasm_memory_size(0) * 65536;
        uint64_t hits = count_hits(canary, 8, size, 0);
        return torpor_outputf("{\"pages\": %d, \"hits\": %llu}", (int)__builtin_wasm_memory_size(0),
                              (unsigned long long)hits);
    }
    int64_t pages = torpor_json_int(torpor_json_get(in, "pages"));
    size_t initial = __builtin_wasm_memory_size(0) * 65536;
    if ((size_t)pages > __builtin_wasm_memory_size(0) &&
        __builtin_wasm_memory_grow(0, (size_t)pages - __builtin_wasm_memory_size(0)) == (size_t)-1)
        return torpor_fail("memory.grow failed");
    size_t size = __builtin_wasm_memory_size(0) * 65536;
    uint64_t nonzero = 0, static_hits = 0;
    uint64_t hits = count_hits(canary, 8, size, 0);
    count_hits(canary, initial, size, &nonzero);
    for (int i = 0; i < 1024; i++) static_hits += g_static[i] != 0;
    return torpor_outputf("{\"pages\": %d, \"hits\": %llu, \"nonzero_grown\": %llu, \"static_nonzero\": %llu}",
                          (int)__builtin_wasm_memory_size(0), (unsigned long long)hits,
                          (unsigned long long)nonzero, (unsigned long long)static_hits);
}
