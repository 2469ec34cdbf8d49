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
