/* Native helpers of host/sandbox/recycle.py: the proof that a module's code cannot change
 * its tables or its segments, and the copy that puts an instance's written chunks back
 * to the pristine image.
 *
 * Why a proof: a warm instance handed from one agent to the next must hold nothing of
 * the first. Memory and globals the host resets itself; tables and the dropped state of
 * data and element segments it cannot read back cheaply (the Python runtime's table has
 * 4,600 entries), so an instance is recycled only when no instruction of the module can
 * change them: table.set, table.grow, table.fill, table.copy, table.init, elem.drop and
 * data.drop. Tables are then exactly as instantiation left them, whatever ran.
 *
 * The walk decodes every instruction of every function body with its immediates, so a
 * byte of an immediate is never mistaken for an opcode. Any opcode it does not know
 * (exceptions, GC, function references, or a future proposal) answers "not proven":
 * the instance is then dropped as before, never recycled on a guess.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { SCAN_SAFE = 1, SCAN_MUTATES = 0, SCAN_UNKNOWN = -1, SCAN_MALFORMED = -2 };

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    int bad;
} cur_t;

static uint64_t leb(cur_t *c) {
    uint64_t v = 0;
    int shift = 0;
    while (c->p < c->end) {
        uint8_t b = *c->p++;
        if (shift < 64) v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) return v;
        shift += 7;
        if (shift > 70) break;
    }
    c->bad = 1;
    return 0;
}

static void skip(cur_t *c, size_t n) {
    if ((size_t)(c->end - c->p) < n) {
        c->bad = 1;
        c->p = c->end;
    } else {
        c->p += n;
    }
}

static void memarg(cur_t *c) {
    uint64_t align = leb(c);
    if (align & 0x40) leb(c); /* multi-memory: a memory index follows */
    leb(c);                   /* offset */
}

/* One function body's instructions, up to the end of the body. */
static int scan_body(cur_t *c) {
    uint64_t groups = leb(c);
    for (uint64_t i = 0; i < groups && !c->bad; i++) {
        leb(c);  /* count */
        leb(c);  /* value type (single byte for every type this host accepts) */
    }
    while (c->p < c->end && !c->bad) {
        uint8_t op = *c->p++;
        if (op <= 0x01 || op == 0x05 || op == 0x0B || op == 0x0F || op == 0x1A || op == 0x1B || op == 0xD1 ||
            (op >= 0x45 && op <= 0xC4))
            continue; /* no immediates */
        switch (op) {
        case 0x02: case 0x03: case 0x04: /* block type: 0x40, a value type, or an s33 type index */
        case 0x0C: case 0x0D: case 0x10: case 0x12:
        case 0x20: case 0x21: case 0x22: case 0x23: case 0x24:
        case 0x25: /* table.get: reads */
        case 0x3F: case 0x40: case 0xD0: case 0xD2:
            leb(c);
            continue;
        case 0x0E: { /* br_table */
            uint64_t n = leb(c);
            for (uint64_t k = 0; k <= n && !c->bad; k++) leb(c);
            continue;
        }
        case 0x11: case 0x13: /* call_indirect, return_call_indirect: type, table */
            leb(c);
            leb(c);
            continue;
        case 0x1C: { /* select with types */
            uint64_t n = leb(c);
            for (uint64_t k = 0; k < n && !c->bad; k++) leb(c);
            continue;
        }
        case 0x26: /* table.set */
            return SCAN_MUTATES;
        case 0x41: case 0x42:
            leb(c);
            continue;
        case 0x43:
            skip(c, 4);
            continue;
        case 0x44:
            skip(c, 8);
            continue;
        case 0xFC: {
            uint64_t sub = leb(c);
            if (sub <= 7) continue;                  /* saturating truncations */
            switch (sub) {
            case 8: leb(c); leb(c); continue;        /* memory.init: data, memory */
            case 10: leb(c); leb(c); continue;       /* memory.copy */
            case 11: leb(c); continue;               /* memory.fill */
            case 16: leb(c); continue;               /* table.size */
            case 9: case 12: case 13: case 14: case 15: case 17:
                return SCAN_MUTATES;                 /* data.drop, table.init, elem.drop, table.copy/grow/fill */
            default:
                return SCAN_UNKNOWN;
            }
        }
        case 0xFD: {
            uint64_t sub = leb(c);
            if (sub <= 11 || sub == 92 || sub == 93) memarg(c);
            else if (sub == 12 || sub == 13) skip(c, 16);
            else if (sub >= 21 && sub <= 34) skip(c, 1);
            else if (sub >= 84 && sub <= 91) { memarg(c); skip(c, 1); }
            else if (sub > 0x113) return SCAN_UNKNOWN;
            continue;
        }
        case 0xFE: {
            uint64_t sub = leb(c);
            if (sub == 3) skip(c, 1); /* atomic.fence */
            else if (sub <= 2 || (sub >= 0x10 && sub <= 0x4E)) memarg(c);
            else return SCAN_UNKNOWN;
            continue;
        }
        default:
            if (op >= 0x28 && op <= 0x3E) { /* loads and stores */
                memarg(c);
                continue;
            }
            return SCAN_UNKNOWN;
        }
    }
    return c->bad ? SCAN_MALFORMED : SCAN_SAFE;
}

/* 1: no instruction of the module can change a table or drop a segment; 0: one can;
 * -1: an instruction this walk does not know; -2: malformed. */
int tp_code_keeps_tables(const uint8_t *wasm, size_t len) {
    cur_t c = {wasm, wasm + len, 0};
    if (len < 8) return SCAN_MALFORMED;
    c.p += 8;
    while (c.p < c.end) {
        uint8_t id = *c.p++;
        uint64_t size = leb(&c);
        if (c.bad || size > (uint64_t)(c.end - c.p)) return SCAN_MALFORMED;
        const uint8_t *body_end = c.p + size;
        if (id == 10) {
            cur_t s = {c.p, body_end, 0};
            uint64_t n = leb(&s);
            for (uint64_t i = 0; i < n; i++) {
                uint64_t fsize = leb(&s);
                if (s.bad || fsize > (uint64_t)(s.end - s.p)) return SCAN_MALFORMED;
                cur_t f = {s.p, s.p + fsize, 0};
                int r = scan_body(&f);
                if (r != SCAN_SAFE) return r;
                s.p += fsize;
            }
        }
        c.p = body_end;
    }
    return SCAN_SAFE;
}

/* Copy each listed chunk of `pristine` over `mem` (a chunk past `size` is cut short, one
 * past it skipped): the instance's memory equals the image again where it was written. */
void tp_reset_chunks(uint8_t *mem, const uint8_t *pristine, size_t size, size_t chunk, const uint32_t *idx,
                     size_t n) {
    for (size_t i = 0; i < n; i++) {
        size_t off = (size_t)idx[i] * chunk;
        if (off >= size) continue;
        size_t len = size - off < chunk ? size - off : chunk;
        memcpy(mem + off, pristine + off, len);
    }
}
