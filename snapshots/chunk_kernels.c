/* Content-defined chunking: where to cut a byte stream so that the same content cuts
 * the same way wherever it sits (snapshots/chunks.py explains why).
 *
 * A gear hash (FastCDC's): h = (h << 1) + gear[byte], so h depends on the last 64
 * bytes only; a cut falls after a byte where (h & mask) == 0, no sooner than `min`
 * bytes into the chunk and no later than `max`. The gear table comes from Python
 * (chunks.py derives it), so the two implementations cannot drift apart.
 *
 * Built on first use by snapshots/native_build.py and called through ctypes from
 * snapshots/chunks.py, which keeps a pure-Python version with the same results.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Writes the end offset of each chunk into ends (at most cap of them) and returns how
 * many chunks the stream has (more than cap: call again with room for all). */
size_t tp_cdc_cut(const uint8_t *p, size_t n, const uint64_t *gear, size_t min, uint64_t mask, size_t max,
                  uint32_t *ends, size_t cap) {
    size_t count = 0, start = 0;
    while (start < n) {
        size_t end = n - start <= min ? n : 0;
        if (!end) {
            size_t limit = n - start < max ? n : start + max;
            uint64_t h = 0;
            size_t i = start + min;
            /* the hash of the 64 bytes before the first allowed cut */
            for (size_t k = (i - start > 64 ? i - 64 : start); k < i; k++) h = (h << 1) + gear[p[k]];
            end = limit;
            for (; i < limit; i++) {
                h = (h << 1) + gear[p[i]];
                if (!(h & mask)) { end = i + 1; break; }
            }
        }
        if (count < cap) ends[count] = (uint32_t)end;
        count++;
        start = end;
    }
    return count;
}

/* -- reading a tree: each distinct name once ---------------------------------------------
 *
 * A level of a chunk tree is a run of 32-byte names, and memory holds many equal pages:
 * an agent's 5 MB state at 400 turns of a conversation is 1,158 data references to 206
 * distinct chunks. chunks.py looks up and checks each distinct chunk once; this finds
 * them (the per-reference work that was a Python loop body). The level's bytes are then
 * the references' contents in order: delta.Pieces (delta_kernels.c) copies them. */

static uint64_t mix64(uint64_t x) { /* murmur3's finaliser */
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* ids[i] = which distinct name reference i is (numbered in order of first appearance);
 * firsts[j] = the reference where distinct name j first appears. Returns the number of
 * distinct names, or (size_t)-1 if the scratch table cannot be allocated. The hash mixes
 * all 32 bytes with a per-process `seed`, so names crafted into a damaged index cannot
 * cheaply make every lookup collide. */
size_t tp_unique_names(const uint8_t *names, size_t n, uint64_t seed, uint32_t *ids, uint32_t *firsts) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    uint32_t *slot = calloc(cap, sizeof(uint32_t)); /* distinct id + 1; 0: empty */
    if (!slot) return (size_t)-1;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *name = names + 32 * i;
        uint64_t w[4];
        memcpy(w, name, 32);
        size_t s = (size_t)(mix64(w[0] ^ seed) ^ mix64(w[1] + seed) ^ mix64(w[2] ^ (seed >> 1)) ^ mix64(w[3])) & (cap - 1);
        for (;;) {
            uint32_t v = slot[s];
            if (!v) {
                slot[s] = (uint32_t)(k + 1);
                firsts[k] = (uint32_t)i;
                ids[i] = (uint32_t)k++;
                break;
            }
            if (!memcmp(names + 32 * (size_t)firsts[v - 1], name, 32)) {
                ids[i] = v - 1;
                break;
            }
            s = (s + 1) & (cap - 1);
        }
    }
    free(slot);
    return k;
}
