/* Snapshot hot loops: find the chunks of a linear memory that differ from the module's
 * pristine image, gather them, XOR them against that image, scatter them back.
 *
 * Built on first use by snapshots/native_build.py (zig cc) and called through ctypes
 * from snapshots/delta.py and snapshots/format.py, which keep pure-Python versions of
 * every function with the same results (the tests compare the two).
 *
 * Conventions shared by all functions: a memory of `mem_len` bytes is cut into chunks
 * of `chunk` bytes, the last one possibly shorter; the reference of a chunk is the
 * pristine image under it, and zeros past the image's end (a fresh instance grown to
 * the same size holds zeros there). Chunk indices are ascending uint32. The callers
 * validate every size and index before calling: these functions trust them.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

static size_t chunk_len(size_t i, size_t chunk, size_t mem_len) {
    size_t off = i * chunk;
    return mem_len - off < chunk ? mem_len - off : chunk;
}

static int is_zero(const uint8_t *p, size_t n) {
    /* Word-at-a-time OR: one stream, no second buffer to read (memcmp against a
     * zero page reads two). The compiler vectorises the loop. */
    uint64_t acc = 0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        uint64_t w[4];
        memcpy(w, p + i, 32);
        acc |= w[0] | w[1] | w[2] | w[3];
        if (acc) return 0;
    }
    for (; i < n; i++) acc |= p[i];
    return acc == 0;
}

static int chunk_differs(const uint8_t *cur, const uint8_t *pri, size_t pri_len, size_t off, size_t n) {
    if (off >= pri_len) return !is_zero(cur + off, n);
    if (off + n <= pri_len) return memcmp(cur + off, pri + off, n) != 0;
    size_t head = pri_len - off;
    return memcmp(cur + off, pri + off, head) != 0 || !is_zero(cur + pri_len, n - head);
}

/* Indices of the chunks of cur[0, mem_len) that differ from the reference, written to
 * `out` (room for every chunk). `skip`, when not NULL, holds one byte per chunk: a
 * non-zero byte marks a chunk known to equal the reference (a page never touched),
 * which is not read at all. Returns the number of indices written. */
size_t tp_changed_chunks(const uint8_t *cur, size_t mem_len, const uint8_t *pri, size_t pri_len,
                         size_t chunk, const uint8_t *skip, uint32_t *out) {
    size_t nchunks = (mem_len + chunk - 1) / chunk, n = 0;
    for (size_t i = 0; i < nchunks; i++) {
        if (skip && skip[i]) continue;
        size_t off = i * chunk;
        if (chunk_differs(cur, pri, pri_len, off, chunk_len(i, chunk, mem_len))) out[n++] = (uint32_t)i;
    }
    return n;
}

/* Copy the chunks `idx[0..n)` of cur[0, mem_len) one after another into `out`; with
 * `xor`, XOR each against its reference as it goes (format flag bit 0). */
void tp_gather(const uint8_t *cur, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
               const uint32_t *idx, size_t n, int xor, uint8_t *out) {
    for (size_t k = 0; k < n; k++) {
        size_t off = (size_t)idx[k] * chunk, len = chunk_len(idx[k], chunk, mem_len);
        memcpy(out, cur + off, len);
        if (xor && off < pri_len) {
            size_t m = pri_len - off < len ? pri_len - off : len;
            for (size_t j = 0; j < m; j++) out[j] ^= pri[off + j];
        }
        out += len;
    }
}

/* XOR the concatenated chunks in `buf` (as tp_gather lays them out) against their
 * references, in place: undoes tp_gather's `xor` on decode. */
void tp_xor_chunks(uint8_t *buf, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
                   const uint32_t *idx, size_t n) {
    for (size_t k = 0; k < n; k++) {
        size_t off = (size_t)idx[k] * chunk, len = chunk_len(idx[k], chunk, mem_len);
        if (off < pri_len) {
            size_t m = pri_len - off < len ? pri_len - off : len;
            for (size_t j = 0; j < m; j++) buf[j] ^= pri[off + j];
        }
        buf += len;
    }
}

/* Write the concatenated chunks in `src` to their places in dst[0, mem_len). */
void tp_scatter(uint8_t *dst, size_t mem_len, size_t chunk, const uint32_t *idx, size_t n, const uint8_t *src) {
    for (size_t k = 0; k < n; k++) {
        size_t off = (size_t)idx[k] * chunk, len = chunk_len(idx[k], chunk, mem_len);
        memcpy(dst + off, src, len);
        src += len;
    }
}

/* Mark in `skip` (one byte per chunk of `chunk` bytes over [addr, addr + len)) the
 * chunks none of whose pages is present or swapped according to the kernel's
 * /proc/self/pagemap (open as `fd`): pages never touched since they were mapped.
 * Returns 0, or -1 when the pagemap cannot be read (then `skip` is all zeros). */
int tp_untouched(int fd, uintptr_t addr, size_t len, size_t chunk, size_t page, uint8_t *skip) {
    size_t nchunks = (len + chunk - 1) / chunk;
    memset(skip, 0, nchunks);
    if (len == 0) return 0;
    size_t first = addr / page, last = (addr + len - 1) / page;
    uint64_t buf[512];
    size_t c = 0;
    /* a chunk is untouched while all its pages so far are untouched */
    memset(skip, 1, nchunks);
    for (size_t p = first; p <= last;) {
        size_t want = last - p + 1 > 512 ? 512 : last - p + 1;
        ssize_t got = pread(fd, buf, want * 8, (off_t)(p * 8));
        if (got != (ssize_t)(want * 8)) {
            memset(skip, 0, nchunks);
            return -1;
        }
        for (size_t k = 0; k < want; k++, p++) {
            if (!(buf[k] & (3ULL << 62))) continue;
            /* chunks overlapping page p */
            uintptr_t plo = p * page, phi = plo + page;
            size_t lo = plo > addr ? (plo - addr) / chunk : 0;
            size_t hi = (phi - addr - 1) / chunk;
            if (hi >= nchunks) hi = nchunks - 1;
            for (c = lo; c <= hi; c++) skip[c] = 0;
        }
    }
    return 0;
}

/* 0 when idx[0..n) is strictly ascending and below `nchunks`, else 1 + the position
 * of the first index that is not. */
size_t tp_check_indices(const uint32_t *idx, size_t n, size_t nchunks) {
    for (size_t k = 0; k < n; k++) {
        if (idx[k] >= nchunks || (k > 0 && idx[k] <= idx[k - 1])) return k + 1;
    }
    return 0;
}
