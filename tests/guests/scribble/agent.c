/* scribble: proves that an instance recycled from one agent to the next carries nothing
 * of the first (tests/test_recycle.py, host/sandbox/recycle.py).
 *
 * {"mode": "fill", "seed": S} reports how many pages its memory has, then overwrites
 * every word of linear memory with a canary derived from S (computed at run time, so it
 * is in no data segment): static data, .bss, heap and the shadow stack below its own
 * frame; only the 16 KiB of stack its callers may still use are left. Then it returns.
 * {"mode": "park", "seed": S} fills a heap block and a static array with the canary and
 * waits on a tool call; resumed, it reports the canaries it still finds there.
 * {"mode": "scan", "seed": S} counts canary words in all of memory and nonzero words of
 * its .bss array: both must be 0 in an instance as fresh as instantiation makes one.
 * {"mode": "spin"} loops forever (fuel and wall-clock limits); {"mode": "grow", "pages":
 * P} reports whether memory.grow by P pages succeeded (the memory budget). */
#include "torpor.h"

static uint64_t canary_of(uint64_t x) { /* splitmix64 */
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return (x ^ (x >> 31)) | 1;
}

static uint64_t g_static[1024];

static uint64_t count(uint64_t canary, size_t from, size_t to) {
    uint64_t hits = 0;
    for (size_t a = from; a + 8 <= to; a += 8) hits += *(volatile uint64_t *)(uintptr_t)a == canary;
    return hits;
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    const char *mode = torpor_json_str(torpor_json_get(in, "mode"));
    if (!mode) return torpor_fail("input needs a \"mode\"");
    uint64_t canary = canary_of((uint64_t)torpor_json_int(torpor_json_get(in, "seed")));
    size_t size = __builtin_wasm_memory_size(0) * 65536;
    if (mode[0] == 'f') {
        int rc = torpor_outputf("{\"pages\": %d}", (int)__builtin_wasm_memory_size(0));
        uintptr_t frame = (uintptr_t)__builtin_frame_address(0);
        for (size_t a = 8; a + 8 <= size; a += 8) {
            if (a + 512 >= frame && a < frame + 16384) continue; /* our callers' frames */
            *(volatile uint64_t *)a = canary;
        }
        return rc;
    }
    if (mode[0] == 'p') {
        uint64_t *heap = (uint64_t *)torpor_alloc(4096);
        if (!heap) return torpor_fail("out of memory");
        for (int i = 0; i < 512; i++) heap[i] = canary;
        for (int i = 0; i < 1024; i++) g_static[i] = canary;
        torpor_result r = torpor_call("kv.incr", "{\"key\": \"k\"}");
        if (!r.ok) return torpor_fail("kv.incr failed");
        uint64_t hits = count(canary, (uintptr_t)heap, (uintptr_t)heap + 4096) +
                        count(canary, (uintptr_t)g_static, (uintptr_t)(g_static + 1024));
        return torpor_outputf("{\"hits\": %llu, \"value\": %lld}", (unsigned long long)hits,
                              (long long)torpor_json_int(torpor_json_get(r.value, "value")));
    }
    if (mode[0] == 's' && mode[1] == 'c') {
        uint64_t nonzero = 0;
        for (int i = 0; i < 1024; i++) nonzero += g_static[i] != 0;
        return torpor_outputf("{\"hits\": %llu, \"static_nonzero\": %llu}",
                              (unsigned long long)count(canary, 8, size), (unsigned long long)nonzero);
    }
    if (mode[0] == 's') {
        volatile uint64_t x = 0;
        for (;;) x++;
    }
    int64_t pages = torpor_json_int(torpor_json_get(in, "pages"));
    int ok = __builtin_wasm_memory_grow(0, (size_t)pages) != (size_t)-1;
    return torpor_outputf("{\"grew\": %d}", ok);
}
