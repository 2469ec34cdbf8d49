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

/* Whether a pagemap entry says the page may differ from what its mapping is backed by:
 * swapped (bit 62: only anonymous pages are, here), or present (bit 63) and, when
 * `skip_file` is set, not a page of the backing file (bit 61 clear). A present file page
 * of a MAP_PRIVATE mapping is the file's page cache page, never written through this
 * mapping: the first write replaces it with an anonymous copy. */
static int maybe_written(uint64_t e, int skip_file) {
    if (e & (1ULL << 62)) return 1;
    if (!(e & (1ULL << 63))) return 0;
    return !skip_file || !(e & (1ULL << 61));
}

/* Indices of the chunks of cur[0, mem_len) that differ from the reference, written to
 * `out` (room for every chunk); returns how many.
 *
 * With `pagemap_fd` >= 0 (an open /proc/self/pagemap), `cur` page-aligned and `chunk` a
 * multiple or a divisor of `page` (no chunk straddles a page it does not cover), a chunk
 * none of whose pages the kernel reports written (maybe_written: never touched since
 * mapped, or, with `skip_file`, only read from a copy-on-write file mapping) reads as
 * what the mapping is backed by, which the caller vouches is the reference: it is
 * skipped unread. Reading it would fault in a page for nothing, and with Wasmtime's
 * copy-on-write image most of a large image is read by the guest but never written.
 * If the pagemap cannot be read, every chunk is compared. */
size_t tp_changed_chunks(const uint8_t *cur, size_t mem_len, const uint8_t *pri, size_t pri_len,
                         size_t chunk, int pagemap_fd, size_t page, int skip_file, uint32_t *out) {
    size_t nchunks = (mem_len + chunk - 1) / chunk, n = 0;
    int use_map = pagemap_fd >= 0 && page > 0 && (chunk % page == 0 || page % chunk == 0) &&
                  (uintptr_t)cur % page == 0;
    uint64_t map[512];
    size_t map_first = 0, map_count = 0;
    for (size_t i = 0; i < nchunks; i++) {
        size_t off = i * chunk, len = chunk_len(i, chunk, mem_len);
        if (use_map) {
            size_t p0 = ((uintptr_t)cur + off) / page, np = (len + page - 1) / page, k;
            int touched = 0;
            for (k = 0; k < np && !touched; k++) {
                size_t pg = p0 + k;
                if (pg < map_first || pg >= map_first + map_count) {
                    size_t want = 512;
                    ssize_t got = pread(pagemap_fd, map, want * 8, (off_t)(pg * 8));
                    if (got < 8) { use_map = 0; touched = 1; break; }
                    map_first = pg;
                    map_count = (size_t)got / 8;
                }
                touched = maybe_written(map[pg - map_first], skip_file);
            }
            if (!touched) continue;
        }
        if (chunk_differs(cur, pri, pri_len, off, len)) out[n++] = (uint32_t)i;
    }
    return n;
}

/* Which of the chunks `cand[0..ncand)` (ascending) of cur[0, mem_len) differ from the
 * reference, written to `out`; returns how many. The candidates come from the caller's
 * write tracking (host/sandbox/write_watch.py): every other chunk is known unchanged. */
size_t tp_changed_among(const uint8_t *cur, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
                        const uint32_t *cand, size_t ncand, uint32_t *out) {
    size_t nchunks = (mem_len + chunk - 1) / chunk, n = 0;
    for (size_t k = 0; k < ncand; k++) {
        size_t i = cand[k];
        if (i >= nchunks) break;
        if (chunk_differs(cur, pri, pri_len, i * chunk, chunk_len(i, chunk, mem_len))) out[n++] = (uint32_t)i;
    }
    return n;
}

/* Copy the chunks `idx[0..n)` of cur[0, mem_len) one after another into `out`. */
void tp_gather(const uint8_t *cur, size_t mem_len, size_t chunk, const uint32_t *idx, size_t n, uint8_t *out) {
    for (size_t k = 0; k < n; k++) {
        size_t off = (size_t)idx[k] * chunk, len = chunk_len(idx[k], chunk, mem_len);
        memcpy(out, cur + off, len);
        out += len;
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

/* 0 when idx[0..n) is strictly ascending and below `nchunks`, else 1 + the position
 * of the first index that is not. */
size_t tp_check_indices(const uint32_t *idx, size_t n, size_t nchunks) {
    for (size_t k = 0; k < n; k++) {
        if (idx[k] >= nchunks || (k > 0 && idx[k] <= idx[k - 1])) return k + 1;
    }
    return 0;
}

/* Read one LEB128 varint at buf[*pos, len) into *out and advance *pos. Returns 0, or -1
 * when the buffer ends first or the varint is longer than 10 bytes. */
static int get_uvarint(const uint8_t *buf, size_t len, size_t *pos, uint64_t *out) {
    uint64_t value = 0;
    for (unsigned shift = 0; shift <= 63; shift += 7) {
        if (*pos >= len) return -1;
        uint8_t b = buf[(*pos)++];
        value |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            *out = value;
            return 0;
        }
    }
    return -1;
}

/* Read `count` LEB128 varints from buf[pos, len) into `out`. Returns the position after
 * the last one, or -1 when the buffer ends first or a varint is longer than 10 bytes. */
long long tp_uvarints(const uint8_t *buf, size_t len, size_t pos, size_t count, uint64_t *out) {
    for (size_t k = 0; k < count; k++)
        if (get_uvarint(buf, len, &pos, &out[k]) != 0) return -1;
    return (long long)pos;
}

/* XOR each chunk of `idx` whose `mask` byte is set (mask[i] for chunk i; chunks at or
 * past `mask_len` count as unset) with the pristine bytes under it. The caller marks the
 * chunks whose pristine bytes are not all zero, the only ones XOR changes. `packed`: the
 * chunks lie one after another in `buf` (as tp_gather lays them out); otherwise `buf`
 * is the memory itself and each chunk is at its own offset. */
static void xor_masked(uint8_t *buf, int packed, size_t mem_len, const uint8_t *pri, size_t pri_len,
                       size_t chunk, const uint32_t *idx, size_t n, const uint8_t *mask, size_t mask_len) {
    size_t pos = 0;
    for (size_t k = 0; k < n; k++) {
        size_t off = (size_t)idx[k] * chunk, len = chunk_len(idx[k], chunk, mem_len);
        if (idx[k] < mask_len && mask[idx[k]] && off < pri_len) {
            uint8_t *at = buf + (packed ? pos : off);
            size_t m = pri_len - off < len ? pri_len - off : len;
            for (size_t j = 0; j < m; j++) at[j] ^= pri[off + j];
        }
        pos += len;
    }
}

/* tp_gather, each chunk XOR'd with the pristine bytes under it where `mask` marks its
 * chunk (see xor_masked): the chunks as the snapshot format stores them, in one pass
 * over memory. Returns 1 if any chunk was XOR'd, else 0. */
int tp_gather_xor(const uint8_t *cur, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
                  const uint32_t *idx, size_t n, const uint8_t *mask, size_t mask_len, uint8_t *out) {
    int xored = 0;
    tp_gather(cur, mem_len, chunk, idx, n, out);
    for (size_t k = 0; k < n && !xored; k++) xored = idx[k] < mask_len && mask[idx[k]];
    if (xored) xor_masked(out, 1, mem_len, pri, pri_len, chunk, idx, n, mask, mask_len);
    return xored;
}

/* XOR, in place, the packed chunks in `buf` (see xor_masked): encoding and decoding. */
void tp_xor_masked(uint8_t *buf, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
                   const uint32_t *idx, size_t n, const uint8_t *mask, size_t mask_len) {
    xor_masked(buf, 1, mem_len, pri, pri_len, chunk, idx, n, mask, mask_len);
}

static size_t put_uvarint(uint8_t *out, uint64_t v) {
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

/* The snapshot format's payload in one pass (snapshots/format.py, encode_snapshot, is
 * the reference and the fallback): the `nhdr` header varints, `created` as a
 * little-endian f64, the gaps between the `n` ascending chunk indices as varints, the
 * `tail` bytes (agent id, entry, metadata JSON, globals, already laid out), then the
 * chunks' bytes `data`, XOR'd with the pristine image where `mask` marks a chunk (see
 * tp_xor_masked). Returns the payload's length, or -1 if `cap` is too small. */
long long tp_encode_payload(uint8_t *out, size_t cap, const uint64_t *hdr, size_t nhdr, double created,
                            const uint32_t *idx, size_t n, const uint8_t *tail, size_t tail_len,
                            const uint8_t *data, size_t data_len, const uint8_t *pri, size_t pri_len,
                            size_t chunk, size_t mem_len, const uint8_t *mask, size_t mask_len) {
    if (cap < 10 * nhdr + 8 + 5 * n + tail_len + data_len) return -1;
    size_t pos = 0;
    for (size_t k = 0; k < nhdr; k++) pos += put_uvarint(out + pos, hdr[k]);
    uint64_t bits;
    memcpy(&bits, &created, 8);
    for (int b = 0; b < 8; b++) out[pos++] = (uint8_t)(bits >> (8 * b));
    uint32_t last = 0;
    for (size_t k = 0; k < n; k++) {
        pos += put_uvarint(out + pos, idx[k] - last);
        last = idx[k];
    }
    memcpy(out + pos, tail, tail_len);
    pos += tail_len;
    memcpy(out + pos, data, data_len);
    if (mask) tp_xor_masked(out + pos, mem_len, pri, pri_len, chunk, idx, n, mask, mask_len);
    return (long long)(pos + data_len);
}

/* Read `n` gap varints from buf[pos, len) into ascending chunk indices (the first gap
 * is the first index). Returns the position after them, or -1 when the buffer ends
 * first, a varint is too long, or an index would not fit in 32 bits. */
long long tp_read_gaps(const uint8_t *buf, size_t len, size_t pos, size_t n, uint32_t *out) {
    uint64_t index = 0, gap;
    for (size_t k = 0; k < n; k++) {
        if (get_uvarint(buf, len, &pos, &gap) != 0 || gap > 0xFFFFFFFFu) return -1;
        index += gap;
        if (index > 0xFFFFFFFFu) return -1;
        out[k] = (uint32_t)index;
    }
    return (long long)pos;
}

/* The payload's head in one call: the `nhdr` header varints into `hdr`, the f64 after
 * them into `created`, then hdr[5] gap varints into ascending indices in `idx` (room for
 * `idx_cap`). Returns the position after the gaps; -1 if the head is malformed (ends
 * early, a varint too long, an index past 32 bits); -2 if `idx` is too small for hdr[5]
 * indices (then `hdr` is filled: call again with room for them). */
long long tp_parse_head(const uint8_t *buf, size_t len, uint64_t *hdr, size_t nhdr, double *created,
                        uint32_t *idx, size_t idx_cap) {
    size_t pos = 0;
    for (size_t k = 0; k < nhdr; k++)
        if (get_uvarint(buf, len, &pos, &hdr[k]) != 0) return -1;
    if (len - pos < 8 || nhdr < 6) return -1;
    uint64_t bits = 0;
    for (int b = 0; b < 8; b++) bits |= (uint64_t)buf[pos + b] << (8 * b);
    memcpy(created, &bits, 8);
    pos += 8;
    if (hdr[5] > idx_cap) return -2;
    return tp_read_gaps(buf, len, pos, (size_t)hdr[5], idx);
}

/* After tp_scatter of chunks stored XOR'd with the pristine image: un-XOR them where
 * they now lie in memory `dst`. */
void tp_unxor_in_place(uint8_t *dst, size_t mem_len, const uint8_t *pri, size_t pri_len, size_t chunk,
                       const uint32_t *idx, size_t n, const uint8_t *mask, size_t mask_len) {
    xor_masked(dst, 0, mem_len, pri, pri_len, chunk, idx, n, mask, mask_len);
}

/* -- pieces: a byte stream held as references to distinct parts ------------------------
 *
 * A chunk tree's level read back (snapshots/chunks.py) is n references to k distinct
 * parts, part j at ptrs[j] holding lens[j] bytes, reference i naming part ids[i]. Kept
 * that way, a restore copies a checkpoint's memory chunks from the parts straight into
 * the instance's memory instead of first copying every part into one payload
 * (delta._Tail over a Pieces). ids[i] < k: the caller built them. */

/* Seek byte `start` of the stream: *r = the reference holding it, *off = the offset in
 * that reference's part. Returns -1 if the stream is shorter. */
static int piece_seek(const uint32_t *ids, size_t nids, const size_t *lens, size_t start, size_t *r, size_t *off) {
    size_t i = 0;
    while (i < nids && start >= lens[ids[i]]) {
        start -= lens[ids[i]];
        i++;
    }
    if (i == nids && start) return -1;
    *r = i;
    *off = start;
    return 0;
}

/* Copy `len` bytes of the stream from reference *r, offset *off, to dst, advancing both.
 * Returns -1 if the stream runs out first. */
static int piece_copy(uint8_t *dst, size_t len, const uint32_t *ids, size_t nids, const uint8_t *const *ptrs,
                      const size_t *lens, size_t *r, size_t *off) {
    while (len) {
        if (*r >= nids) return -1;
        size_t part = lens[ids[*r]], take = part - *off < len ? part - *off : len;
        memcpy(dst, ptrs[ids[*r]] + *off, take);
        dst += take;
        len -= take;
        *off += take;
        if (*off == part) {
            (*r)++;
            *off = 0;
        }
    }
    return 0;
}

/* The stream's length. */
size_t tp_pieces_size(const uint32_t *ids, size_t nids, const size_t *lens) {
    size_t total = 0;
    for (size_t i = 0; i < nids; i++) total += lens[ids[i]];
    return total;
}

/* The stream's bytes [start, end) into dst (end - start bytes); 0, or -1 if the stream
 * is shorter. */
int tp_pieces_gather(uint8_t *dst, const uint32_t *ids, size_t nids, const uint8_t *const *ptrs, const size_t *lens,
                     size_t start, size_t end) {
    size_t r, off;
    if (end < start || piece_seek(ids, nids, lens, start, &r, &off)) return -1;
    return piece_copy(dst, end - start, ids, nids, ptrs, lens, &r, &off);
}

/* tp_scatter with the chunks' bytes read from the stream from byte `start`: memory chunk
 * idx[k] gets the next chunk_len bytes. 0, or -1 if the stream runs out. */
int tp_pieces_scatter(uint8_t *dst, size_t mem_len, size_t chunk, const uint32_t *idx, size_t n, const uint32_t *ids,
                      size_t nids, const uint8_t *const *ptrs, const size_t *lens, size_t start) {
    size_t r, off;
    if (piece_seek(ids, nids, lens, start, &r, &off)) return -1;
    for (size_t k = 0; k < n; k++) {
        size_t o = (size_t)idx[k] * chunk;
        if (piece_copy(dst + o, chunk_len(idx[k], chunk, mem_len), ids, nids, ptrs, lens, &r, &off)) return -1;
    }
    return 0;
}
