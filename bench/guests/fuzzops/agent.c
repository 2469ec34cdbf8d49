/*
 * fuzzops: a guest steered by its input, for the property-based tests of the boundary
 * (bench/fuzz.py, tests/test_fuzz_boundary.py). Two modes:
 *
 * {"mode": "ops", "scratch": N, "ops": [[imp, amode, aval, alen, bmode, bval, blen, arg, "hex"], ...]}
 *   calls the `torpor` imports with the pointers, lengths and payloads given. For each op
 *   the payload (hex) is copied to the start of a scratch buffer of N bytes, and each
 *   pointer is resolved by its mode: 0 = scratch + val, 1 = end of memory + val,
 *   2 = val itself (all modulo 2^32). imp: 0 input_len, 1 input_read(a, alen),
 *   2 output_write(a, alen), 3 log(arg, a, alen), 4 tool_call(a, alen, b, blen),
 *   5 response_len, 6 response_read(a, alen), 7 abort(arg, a, alen) (last op only).
 *   A write import (input_read, response_read) whose range is inside memory but not
 *   inside the scratch buffer is skipped (rc 1000): it would overwrite the guest itself.
 *   Output: {"scratch": S, "input_len": L, "results": [[rc, a, alen, b, blen, mem_bytes, aux], ...]}
 *   with aux = 1 when the bytes input_read copied equal the input's first rc bytes,
 *   and the response length before the call for response_read; 0 otherwise.
 *   Before an abort op the report is written as the output, then abort is called.
 *
 * {"mode": "json", "docs": ["hex", ...]}: parses each document with the SDK's parser,
 *   in the sandbox; output: [hex of torpor_json_dump, or null when the parse failed].
 */
#include "torpor.h"

static uint32_t mem_bytes(void) { return (uint32_t)__builtin_wasm_memory_size(0) * 65536u; }

static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Decode hex into dst (at most cap bytes); returns the byte count, or -1. */
static int64_t unhex(const char *hex, uint8_t *dst, size_t cap) {
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > cap) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) return -1;
        dst[i] = (uint8_t)(hi << 4 | lo);
    }
    return (int64_t)(n / 2);
}

static void jb_hex(torpor_jb *b, const uint8_t *p, size_t n) {
    static const char digits[] = "0123456789abcdef";
    char *s = (char *)torpor_alloc(2 * n + 1);
    for (size_t i = 0; i < n; i++) {
        s[2 * i] = digits[p[i] >> 4];
        s[2 * i + 1] = digits[p[i] & 15];
    }
    s[2 * n] = 0;
    torpor_jb_str(b, s);
    torpor_free(s);
}

static int64_t field(const torpor_json *op, size_t i) { return torpor_json_int(torpor_json_index(op, i)); }

static uint32_t resolve(int64_t mode, int64_t val, uint8_t *scratch) {
    if (mode == 0) return (uint32_t)(uintptr_t)scratch + (uint32_t)val;
    if (mode == 1) return mem_bytes() + (uint32_t)val;
    return (uint32_t)val;
}

/* Would a host write to [p, p + cap) land in memory outside the scratch buffer? */
static bool hits_guest(uint32_t p, int32_t cap, uint8_t *scratch, size_t scratch_n) {
    if (cap < 0) return false;
    uint64_t end = (uint64_t)p + (uint64_t)(uint32_t)cap;
    if (end > mem_bytes()) return false; /* out of bounds: the host refuses it */
    uint64_t lo = (uint32_t)(uintptr_t)scratch;
    return !(p >= lo && end <= lo + scratch_n);
}

static int run_ops(const torpor_json *in) {
    int64_t scratch_n = torpor_json_int(torpor_json_get(in, "scratch"));
    const torpor_json *ops = torpor_json_get(in, "ops");
    if (scratch_n < 64 || scratch_n > (8 << 20) || !torpor_json_is_array(ops))
        return torpor_fail("ops mode needs \"scratch\" (64 B .. 8 MiB) and \"ops\"");
    uint8_t *scratch = (uint8_t *)torpor_calloc(1, (size_t)scratch_n);
    size_t in_len = 0;
    const char *in_text = torpor_input_text(&in_len);

    torpor_jb out = TORPOR_JB_INIT;
    torpor_jb_obj(&out);
    torpor_jb_key(&out, "scratch");
    torpor_jb_int(&out, (int64_t)(uintptr_t)scratch);
    torpor_jb_key(&out, "input_len");
    torpor_jb_int(&out, (int64_t)in_len);
    torpor_jb_key(&out, "results");
    torpor_jb_arr(&out);
    size_t n = torpor_json_len(ops);
    for (size_t i = 0; i < n; i++) {
        const torpor_json *op = torpor_json_index(ops, i);
        int64_t imp = field(op, 0), arg = field(op, 7);
        const char *hex = torpor_json_str(torpor_json_index(op, 8));
        if (unhex(hex ? hex : "", scratch, (size_t)scratch_n) < 0) return torpor_fail("op %zu: bad hex", i);
        uint32_t a = resolve(field(op, 1), field(op, 2), scratch);
        int32_t alen = (int32_t)field(op, 3);
        uint32_t b = resolve(field(op, 4), field(op, 5), scratch);
        int32_t blen = (int32_t)field(op, 6);
        uint32_t mem = mem_bytes();
        int64_t rc = 0, aux = 0;
        void *pa = (void *)(uintptr_t)a, *pb = (void *)(uintptr_t)b;
        switch (imp) {
        case 0: rc = torpor_sys_input_len(); break;
        case 1:
            if (hits_guest(a, alen, scratch, (size_t)scratch_n)) { rc = 1000; break; }
            rc = torpor_sys_input_read(pa, alen);
            aux = rc >= 0 && (size_t)rc <= in_len && memcmp(scratch + (a - (uint32_t)(uintptr_t)scratch), in_text, (size_t)rc) == 0;
            break;
        case 2: rc = torpor_sys_output_write(pa, alen); break;
        case 3: rc = torpor_sys_log((int32_t)arg, pa, alen); break;
        case 4: rc = torpor_sys_tool_call(pa, alen, pb, blen); aux = torpor_sys_response_len(); break;
        case 5: rc = torpor_sys_response_len(); break;
        case 6:
            if (hits_guest(a, alen, scratch, (size_t)scratch_n)) { rc = 1000; break; }
            aux = torpor_sys_response_len();
            rc = torpor_sys_response_read(pa, alen);
            break;
        case 7: {
            torpor_jb_end(&out);
            torpor_jb_end(&out);
            char *report = torpor_jb_finish(&out);
            torpor_output(report);
            torpor_sys_abort((int32_t)arg, pa, alen);
        }
        default: return torpor_fail("op %zu: unknown import %lld", i, (long long)imp);
        }
        torpor_jb_arr(&out);
        torpor_jb_int(&out, rc);
        torpor_jb_int(&out, a);
        torpor_jb_int(&out, alen);
        torpor_jb_int(&out, b);
        torpor_jb_int(&out, blen);
        torpor_jb_int(&out, mem);
        torpor_jb_int(&out, aux);
        torpor_jb_end(&out);
    }
    torpor_jb_end(&out);
    torpor_jb_end(&out);
    char *report = torpor_jb_finish(&out);
    int rc = torpor_output(report);
    return rc == 0 ? 0 : torpor_fail("output_write of the report failed: %d", rc);
}

static int run_json(const torpor_json *in) {
    const torpor_json *docs = torpor_json_get(in, "docs");
    if (!torpor_json_is_array(docs)) return torpor_fail("json mode needs \"docs\"");
    torpor_jb out = TORPOR_JB_INIT;
    torpor_jb_arr(&out);
    for (size_t i = 0; i < torpor_json_len(docs); i++) {
        const char *hex = torpor_json_str(torpor_json_index(docs, i));
        size_t cap = hex ? strlen(hex) / 2 + 1 : 1;
        uint8_t *raw = (uint8_t *)torpor_alloc(cap);
        int64_t n = unhex(hex ? hex : "", raw, cap);
        if (n < 0) return torpor_fail("doc %zu: bad hex", i);
        torpor_json *v = torpor_json_parse((const char *)raw, (size_t)n);
        if (!v) {
            torpor_jb_null(&out);
        } else {
            char *d = torpor_json_dump(v);
            jb_hex(&out, (const uint8_t *)d, strlen(d));
            torpor_free(d);
            torpor_json_free(v);
        }
        torpor_free(raw);
    }
    torpor_jb_end(&out);
    char *report = torpor_jb_finish(&out);
    int rc = torpor_output(report);
    return rc == 0 ? 0 : torpor_fail("output_write of the report failed: %d", rc);
}

int torpor_main(void) {
    const torpor_json *in = torpor_input();
    if (torpor_json_streq(torpor_json_get(in, "mode"), "json")) return run_json(in);
    return run_ops(in);
}
