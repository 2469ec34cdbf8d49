/*
 * torpor.c - runtime of the Torpor C guest SDK (guest ABI v1).
 * Freestanding: only compiler builtins and the `torpor` host imports.
 * See torpor.h for the API and guest_sdk/ABI.md for the contract with the host.
 *
 * Design notes:
 *  - No function pointers, no indirect calls: Asyncify then only instruments
 *    the functions that can actually reach torpor_sys_tool_call.
 *  - All state is in linear memory (statics and the heap), so a snapshot of
 *    memory + globals taken at a tool call holds everything.
 */
#include "torpor.h"

#pragma GCC visibility push(hidden)
#ifndef TORPOR_SDK_NO_MINSIZE
#pragma clang attribute push(__attribute__((minsize)), apply_to = function)
#endif

/* ========================================================================= */
/* Asyncify data buffer (ABI.md section 6).                                   */
/* ========================================================================= */
struct torpor_async_buf {
    uint8_t *cur;
    uint8_t *end;
    uint8_t data[TORPOR_ASYNC_STACK];
};
__attribute__((used, aligned(16))) struct torpor_async_buf __torpor_async = {
    __torpor_async.data,
    __torpor_async.data + TORPOR_ASYNC_STACK,
    {0},
};

#define E_ALLOC_MAX ((size_t)0x7FFFFF00u)

/* ========================================================================= */
/* C basics                                                                   */
/* ========================================================================= */
__attribute__((no_builtin("memcpy"))) void *memcpy(void *dst, const void *src, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if ((((uintptr_t)d | (uintptr_t)s) & 3) == 0) {
        for (; n >= 4; n -= 4, d += 4, s += 4) *(uint32_t *)d = *(const uint32_t *)s;
    }
    while (n--) *d++ = *s++;
    return dst;
}

__attribute__((no_builtin("memmove"))) void *memmove(void *dst, const void *src, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    const uint8_t *s = (const uint8_t *)src;
    if (d == s || n == 0) return dst;
    if (d < s || d >= s + n) return memcpy(dst, src, n);
    while (n--) d[n] = s[n];
    return dst;
}

__attribute__((no_builtin("memset"))) void *memset(void *dst, int c, size_t n) {
    uint8_t *d = (uint8_t *)dst;
    uint8_t b = (uint8_t)c;
    if (((uintptr_t)d & 3) == 0) {
        uint32_t w = 0x01010101u * b;
        for (; n >= 4; n -= 4, d += 4) *(uint32_t *)d = w;
    }
    while (n--) *d++ = b;
    return dst;
}

__attribute__((no_builtin("memcmp"))) int memcmp(const void *a, const void *b, size_t n) {
    const uint8_t *x = (const uint8_t *)a, *y = (const uint8_t *)b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
    return 0;
}

__attribute__((no_builtin("strlen"))) size_t strlen(const char *s) {
    const char *p = s;
    while (*p) p++;
    return (size_t)(p - s);
}

int strcmp(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return (int)(uint8_t)*a - (int)(uint8_t)*b;
}

int strncmp(const char *a, const char *b, size_t n) {
    for (; n; n--, a++, b++) {
        if (*a != *b) return (int)(uint8_t)*a - (int)(uint8_t)*b;
        if (!*a) return 0;
    }
    return 0;
}

bool torpor_streq(const char *a, const char *b) {
    if (!a || !b) return a == b;
    return strcmp(a, b) == 0;
}

/* ========================================================================= */
/* Allocator: 16 classes of 16..256 bytes, then powers of two up to 2 GiB.    */
/* Every block has an 8-byte header {class, magic}; free blocks keep the next */
/* free block of their class in their first payload word. Space comes from    */
/* the rest of the page holding __heap_base, then only from memory.grow,      */
/* whose answer (the old page count) is where the new pages start.            */
/* ========================================================================= */
#define HDR 8u
#define NFINE 16u
#define NCLASS (NFINE + 23u)
#define MAGIC_LIVE 0x70A110C8u
#define MAGIC_FREE 0xF4EEB10Cu
#define PAGE 65536u

typedef struct blk { uint32_t cls; uint32_t magic; } blk;

extern unsigned char __heap_base;

static void *g_free[NCLASS];
static uintptr_t g_bump, g_bump_end;
static size_t g_used, g_reserved;
static bool g_heap_init;

static size_t class_size(unsigned c) {
    return c < NFINE ? (size_t)(c + 1) * 16u : (size_t)512u << (c - NFINE);
}

static unsigned class_of(size_t total) {
    if (total <= 256) return (unsigned)((total + 15) / 16) - 1;
    unsigned c = NFINE;
    size_t s = 512;
    while (s < total) s <<= 1, c++;
    return c;
}

static _Noreturn void oom(void) {
    static const char msg[] = "torpor_alloc: out of memory";
    torpor_sys_abort(TORPOR_ABORT_OOM, msg, (int32_t)(sizeof msg - 1));
}

/* Put [g_bump, g_bump_end) into the free lists as the largest blocks that fit. */
static void retire_bump(void) {
    while (g_bump_end - g_bump >= 16) {
        size_t left = g_bump_end - g_bump;
        unsigned c = NCLASS - 1;
        while (class_size(c) > left) c--;
        blk *h = (blk *)g_bump;
        h->cls = c;
        h->magic = MAGIC_FREE;
        *(void **)(h + 1) = g_free[c];
        g_free[c] = h + 1;
        g_bump += class_size(c);
    }
    g_bump = g_bump_end;
}

static void heap_init(void) {
    uintptr_t base = ((uintptr_t)&__heap_base + 15) & ~(uintptr_t)15;
    g_bump = base;
    g_bump_end = ((uintptr_t)&__heap_base + PAGE - 1) & ~(uintptr_t)(PAGE - 1);
    if (g_bump_end < g_bump) g_bump_end = g_bump;
    g_reserved = g_bump_end - g_bump;
    g_heap_init = true;
}

static void *carve(size_t sz) {
    while (g_bump_end - g_bump < sz) {
        size_t want = sz - (g_bump_end - g_bump);
        size_t pages = (want + PAGE - 1) / PAGE;
        size_t old = __builtin_wasm_memory_grow(0, pages);
        if (old == (size_t)-1) oom();
        uintptr_t start = (uintptr_t)old * PAGE;
        if (start != g_bump_end) {
            retire_bump();
            g_bump = start;
        }
        g_bump_end = start + pages * PAGE;
        g_reserved += pages * PAGE;
    }
    void *p = (void *)g_bump;
    g_bump += sz;
    return p;
}

void *torpor_alloc(size_t n) {
    if (n > E_ALLOC_MAX) oom();
    if (!g_heap_init) heap_init();
    unsigned c = class_of(n + HDR);
    blk *h;
    if (g_free[c]) {
        h = (blk *)g_free[c] - 1;
        if (h->magic != MAGIC_FREE || h->cls != c) torpor_panic("torpor_alloc: heap corrupted");
        g_free[c] = *(void **)(h + 1);
    } else {
        h = (blk *)carve(class_size(c));
        h->cls = c;
    }
    h->magic = MAGIC_LIVE;
    g_used += class_size(c);
    return h + 1;
}

static blk *live_header(void *p, const char *who) {
    blk *h = (blk *)p - 1;
    if (((uintptr_t)p & 7) || (uintptr_t)p < (uintptr_t)&__heap_base + HDR ||
        (uintptr_t)p > (uintptr_t)__builtin_wasm_memory_size(0) * PAGE || h->magic != MAGIC_LIVE ||
        h->cls >= NCLASS)
        torpor_panic("%s: not a live block (double free?)", who);
    return h;
}

void torpor_free(void *p) {
    if (!p) return;
    blk *h = live_header(p, "torpor_free");
    h->magic = MAGIC_FREE;
    *(void **)p = g_free[h->cls];
    g_free[h->cls] = p;
    g_used -= class_size(h->cls);
}

void *torpor_realloc(void *p, size_t n) {
    if (!p) return torpor_alloc(n);
    if (n == 0) {
        torpor_free(p);
        return NULL;
    }
    blk *h = live_header(p, "torpor_realloc");
    size_t have = class_size(h->cls) - HDR;
    if (n <= have) return p;
    void *q = torpor_alloc(n);
    memcpy(q, p, have);
    torpor_free(p);
    return q;
}

void *torpor_calloc(size_t count, size_t size) {
    if (size && count > E_ALLOC_MAX / size) oom();
    void *p = torpor_alloc(count * size);
    memset(p, 0, count * size);
    return p;
}

char *torpor_strndup(const char *s, size_t n) {
    char *d = (char *)torpor_alloc(n + 1);
    if (n) memcpy(d, s, n);
    d[n] = 0;
    return d;
}

char *torpor_strdup(const char *s) { return s ? torpor_strndup(s, strlen(s)) : NULL; }

size_t torpor_heap_used(void) { return g_used; }
size_t torpor_heap_reserved(void) { return g_reserved; }

/* ========================================================================= */
/* Growable byte buffer                                                       */
/* ========================================================================= */
static void sb_reserve(torpor_buf *b, size_t extra) {
    if (extra > E_ALLOC_MAX || b->len > E_ALLOC_MAX - extra) oom();
    size_t need = b->len + extra + 1;
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 56;
    while (cap < need) cap = cap * 2 + 8;
    b->p = (char *)torpor_realloc(b->p, cap);
    b->cap = cap;
}

static void sb_putn(torpor_buf *b, const char *s, size_t n) {
    sb_reserve(b, n);
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void sb_puts(torpor_buf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_putc(torpor_buf *b, char c) {
    sb_reserve(b, 1);
    b->p[b->len++] = c;
    b->p[b->len] = 0;
}

/* Hand the contents over as a NUL-terminated heap string. */
static char *sb_take(torpor_buf *b) {
    if (!b->p) sb_reserve(b, 0), b->p[0] = 0;
    char *p = b->p;
    b->p = NULL;
    b->len = b->cap = 0;
    return p;
}

/* ========================================================================= */
/* UTF-8 and JSON string escaping                                             */
/* ========================================================================= */
/* Length of the valid UTF-8 sequence at s (n bytes available), 0 if invalid
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static size_t utf8_seq(const uint8_t *s, size_t n) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;
        if (c == 0xED && s[1] >= 0xA0) return 0;
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;
        if (c == 0xF4 && s[1] >= 0x90) return 0;
        return 4;
    }
    return 0;
}

static const char HEX[] = "0123456789abcdef";

/* Append s[0..n) as the inside of a JSON string literal. */
static void sb_escape(torpor_buf *b, const char *str, size_t n) {
    const uint8_t *s = (const uint8_t *)str;
    size_t i = 0;
    sb_reserve(b, n);
    while (i < n) {
        size_t run = i;
        while (run < n && s[run] >= 0x20 && s[run] < 0x80 && s[run] != '"' && s[run] != '\\') run++;
        if (run > i) {
            sb_putn(b, (const char *)s + i, run - i);
            i = run;
            continue;
        }
        uint8_t c = s[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sb_putn(b, e, 2);
            i++;
        } else if (c < 0x20) {
            char e[6] = {'\\', 'u', '0', '0', HEX[c >> 4], HEX[c & 15]};
            switch (c) {
            case '\b': sb_putn(b, "\\b", 2); break;
            case '\f': sb_putn(b, "\\f", 2); break;
            case '\n': sb_putn(b, "\\n", 2); break;
            case '\r': sb_putn(b, "\\r", 2); break;
            case '\t': sb_putn(b, "\\t", 2); break;
            default: sb_putn(b, e, 6);
            }
            i++;
        } else {
            size_t l = utf8_seq(s + i, n - i);
            if (l == 0) {
                sb_putn(b, "\\ufffd", 6);
                i++;
            } else {
                sb_putn(b, (const char *)s + i, l);
                i += l;
            }
        }
    }
}

static void sb_jstr(torpor_buf *b, const char *s, size_t n) {
    sb_putc(b, '"');
    sb_escape(b, s, n);
    sb_putc(b, '"');
}

/* ========================================================================= */
/* Numbers                                                                    */
/* ========================================================================= */
static void sb_u64(torpor_buf *b, uint64_t v) {
    char t[20];
    int i = 20;
    do t[--i] = (char)('0' + v % 10), v /= 10; while (v);
    sb_putn(b, t + i, (size_t)(20 - i));
}

static void sb_i64(torpor_buf *b, int64_t v) {
    if (v < 0) {
        sb_putc(b, '-');
        sb_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        sb_u64(b, (uint64_t)v);
    }
}

static void sb_hex(torpor_buf *b, uint64_t v) {
    char t[16];
    int i = 16;
    do t[--i] = HEX[v & 15], v >>= 4; while (v);
    sb_putn(b, t + i, (size_t)(16 - i));
}

static const double P10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                             1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                             1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};
static const double P10_BIG[] = {1e1, 1e2, 1e4, 1e8, 1e16, 1e32, 1e64, 1e128, 1e256};

/* 10^e for e >= 0 (inf past the double range). */
static double pow10_pos(int e) {
    if (e <= 22) return P10[e];
    if (e > 400) e = 400;
    double r = 1.0;
    for (int i = 0; e; i++, e >>= 1)
        if (e & 1) r *= i < 9 ? P10_BIG[i] : 1e300 * 1e300;
    return r;
}

/* m * 10^e, exact when the classic fast path applies, else within a few ulp. */
static double scale10(double m, int e) {
    if (m == 0.0) return m;
    if (e >= 0) {
        while (e > 300 && m < 1e300) m *= 1e100, e -= 100;
        return m * pow10_pos(e);
    }
    while (e < -300) m /= 1e100, e += 100;
    return m / pow10_pos(-e);
}

static int is_finite(double d) { return d == d && d - d == 0.0; }

/* 15 significant digits, trailing zeros dropped, like %.15g. */
static void sb_double(torpor_buf *b, double v, bool json) {
    if (!is_finite(v)) {
        if (json) sb_puts(b, "null");
        else sb_puts(b, v != v ? "nan" : (v < 0 ? "-inf" : "inf"));
        return;
    }
    if (v == 0.0) {
        sb_putc(b, '0');
        return;
    }
    if (v < 0) sb_putc(b, '-'), v = -v;
    /* decimal exponent e with 10^e <= v < 10^(e+1) */
    union { double d; uint64_t u; } bits = {v};
    int e2 = (int)((bits.u >> 52) & 0x7FF) - 1023;
    int e = (int)((double)e2 * 0.30102999566398120);
    while (e > -330 && scale10(1.0, e) > v) e--;
    while (e < 310 && scale10(1.0, e + 1) <= v) e++;
    uint64_t m = (uint64_t)(scale10(v, 14 - e) + 0.5);
    if (m >= 1000000000000000ull) m = (m + 5) / 10, e++;
    if (m < 100000000000000ull) m = 100000000000000ull; /* guard against scaling error */
    if (e == 308 && m > 179769313486231ull) m = 179769313486231ull; /* stay below DBL_MAX */
    char d[15];
    for (int i = 14; i >= 0; i--) d[i] = (char)('0' + m % 10), m /= 10;
    int nd = 15;
    while (nd > 1 && d[nd - 1] == '0') nd--;
    if (e >= -5 && e < 15) {
        if (e < 0) {
            sb_puts(b, "0.");
            for (int i = -1; i > e; i--) sb_putc(b, '0');
            sb_putn(b, d, (size_t)nd);
        } else {
            for (int i = 0; i <= e; i++) sb_putc(b, i < nd ? d[i] : '0');
            if (nd > e + 1) {
                sb_putc(b, '.');
                sb_putn(b, d + e + 1, (size_t)(nd - e - 1));
            }
        }
    } else {
        sb_putc(b, d[0]);
        if (nd > 1) sb_putc(b, '.'), sb_putn(b, d + 1, (size_t)(nd - 1));
        sb_putc(b, 'e');
        sb_i64(b, e);
    }
}

/* ========================================================================= */
/* JSON DOM                                                                    */
/* ========================================================================= */
struct torpor_json {
    uint8_t type;
    uint8_t is_int;
    uint16_t _pad;
    uint32_t len;  /* string bytes; array elements; object members */
    uint32_t cap;  /* capacity of kids, in entries */
    union { int64_t i; double d; } num;
    char *s;       /* string bytes, or the raw text of a non-integer number */
    torpor_json **kids; /* array: values; object: key, value, key, value, ... */
};

static torpor_json *node_new(uint8_t type, size_t extra) {
    torpor_json *n = (torpor_json *)torpor_alloc(sizeof(torpor_json) + extra);
    memset(n, 0, sizeof *n);
    n->type = type;
    if (extra) n->s = (char *)(n + 1);
    return n;
}

void torpor_json_free(torpor_json *v) {
    if (!v) return;
    if (v->kids) {
        uint32_t n = v->type == TORPOR_JSON_OBJECT ? v->len * 2 : v->len;
        for (uint32_t i = 0; i < n; i++) torpor_json_free(v->kids[i]);
        torpor_free(v->kids);
    }
    torpor_free(v);
}

typedef struct {
    const uint8_t *p, *end;
    int depth;
} parser;

static void skip_ws(parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hex4(const uint8_t *p) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0'
              : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 63)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 63));
        o[2] = (char)(0x80 | (cp & 63));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 63));
    o[2] = (char)(0x80 | ((cp >> 6) & 63)); o[3] = (char)(0x80 | (cp & 63));
    return 4;
}

/* ps->p at the opening quote. */
static torpor_json *parse_string(parser *ps) {
    const uint8_t *q = ps->p + 1;
    while (q < ps->end && *q != '"') q += (*q == '\\') ? 2 : 1;
    if (q >= ps->end) return NULL;
    const uint8_t *s = ps->p + 1, *e = q;
    torpor_json *n = node_new(TORPOR_JSON_STRING, (size_t)(e - s) + 1);
    char *o = n->s;
    while (s < e) {
        uint8_t c = *s;
        if (c == '\\') {
            uint8_t x = s[1]; /* s + 1 < e: the scan above stepped over it */
            s += 2;
            switch (x) {
            case '"': *o++ = '"'; break;
            case '\\': *o++ = '\\'; break;
            case '/': *o++ = '/'; break;
            case 'b': *o++ = '\b'; break;
            case 'f': *o++ = '\f'; break;
            case 'n': *o++ = '\n'; break;
            case 'r': *o++ = '\r'; break;
            case 't': *o++ = '\t'; break;
            case 'u': {
                int u = e - s >= 4 ? hex4(s) : -1;
                if (u < 0) goto fail;
                s += 4;
                uint32_t cp = (uint32_t)u;
                if (cp >= 0xD800 && cp <= 0xDBFF && e - s >= 6 && s[0] == '\\' && s[1] == 'u') {
                    int lo = hex4(s + 2);
                    if (lo >= 0xDC00 && lo <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
                        s += 6;
                    }
                }
                if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* unpaired surrogate */
                o += put_utf8(o, cp);
                break;
            }
            default: goto fail;
            }
        } else if (c < 0x20) {
            goto fail;
        } else if (c < 0x80) {
            *o++ = (char)c;
            s++;
        } else {
            size_t l = utf8_seq(s, (size_t)(e - s));
            if (!l) goto fail;
            memcpy(o, s, l);
            o += l;
            s += l;
        }
    }
    *o = 0;
    n->len = (uint32_t)(o - n->s);
    ps->p = q + 1;
    return n;
fail:
    torpor_free(n);
    return NULL;
}

static torpor_json *parse_number(parser *ps) {
    const uint8_t *p = ps->p, *start = p, *end = ps->end;
    bool neg = false, is_int = true, overflow = false;
    uint64_t mant = 0;   /* first 19 significant digits */
    int nsig = 0, exp10 = 0;
    uint64_t ival = 0;
    if (p < end && *p == '-') neg = true, p++;
    if (p >= end || *p < '0' || *p > '9') return NULL;
    if (*p == '0') {
        p++;
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            unsigned d = *p++ - '0';
            if (ival > (UINT64_MAX - d) / 10) overflow = true;
            else ival = ival * 10 + d;
            if (nsig < 19) mant = mant * 10 + d, nsig++;
            else exp10++;
        }
    }
    if (p < end && *p == '.') {
        is_int = false;
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') {
            unsigned d = *p++ - '0';
            if (nsig < 19 && (mant || d)) mant = mant * 10 + d, nsig++, exp10--;
            else if (nsig < 19) exp10--; /* leading zeros of 0.000x */
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        is_int = false;
        p++;
        bool eneg = false;
        if (p < end && (*p == '+' || *p == '-')) eneg = *p == '-', p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        int ev = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (ev < 100000) ev = ev * 10 + (*p - '0');
            p++;
        }
        exp10 += eneg ? -ev : ev;
    }
    ps->p = p;
    if (is_int && !overflow && ival <= (uint64_t)INT64_MAX + (neg ? 1u : 0u)) {
        torpor_json *n = node_new(TORPOR_JSON_NUMBER, 0);
        n->is_int = 1;
        n->num.i = neg ? (int64_t)((uint64_t)0 - ival) : (int64_t)ival;
        return n;
    }
    size_t rl = (size_t)(p - start);
    torpor_json *n = node_new(TORPOR_JSON_NUMBER, rl + 1);
    memcpy(n->s, start, rl);
    n->s[rl] = 0;
    n->len = (uint32_t)rl;
    double d;
    if (mant < (1ull << 53) && exp10 >= -22 && exp10 <= 22)
        d = exp10 >= 0 ? (double)mant * P10[exp10] : (double)mant / P10[-exp10];
    else
        d = scale10((double)mant, exp10);
    n->num.d = neg ? -d : d;
    return n;
}

static torpor_json *parse_value(parser *ps);

static void kids_add(torpor_json *c, uint32_t used, torpor_json *kid) {
    if (used == c->cap) {
        uint32_t cap = c->cap ? c->cap * 2 : 4;
        c->kids = (torpor_json **)torpor_realloc(c->kids, cap * sizeof(torpor_json *));
        c->cap = cap;
    }
    c->kids[used] = kid;
}

static torpor_json *parse_container(parser *ps, bool obj) {
    if (++ps->depth > TORPOR_JSON_MAX_DEPTH) return NULL;
    torpor_json *c = node_new(obj ? TORPOR_JSON_OBJECT : TORPOR_JSON_ARRAY, 0);
    uint8_t close = obj ? '}' : ']';
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return c;
    }
    for (;;) {
        skip_ws(ps);
        if (obj) {
            if (ps->p >= ps->end || *ps->p != '"') goto fail;
            torpor_json *k = parse_string(ps);
            if (!k) goto fail;
            kids_add(c, c->len * 2, k);
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                /* keep the key counted so that free releases it */
                kids_add(c, c->len * 2 + 1, NULL);
                c->len++;
                goto fail;
            }
            ps->p++;
            skip_ws(ps);
            torpor_json *v = parse_value(ps);
            kids_add(c, c->len * 2 + 1, v);
            c->len++;
            if (!v) goto fail;
        } else {
            torpor_json *v = parse_value(ps);
            if (!v) goto fail;
            kids_add(c, c->len, v);
            c->len++;
        }
        skip_ws(ps);
        if (ps->p >= ps->end) goto fail;
        if (*ps->p == ',') {
            ps->p++;
            continue;
        }
        if (*ps->p == close) {
            ps->p++;
            ps->depth--;
            return c;
        }
        goto fail;
    }
fail:
    torpor_json_free(c);
    return NULL;
}

static bool lit(parser *ps, const char *w, size_t n) {
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, w, n) != 0) return false;
    ps->p += n;
    return true;
}

static torpor_json *parse_value(parser *ps) {
    skip_ws(ps);
    if (ps->p >= ps->end) return NULL;
    switch (*ps->p) {
    case '{': return parse_container(ps, true);
    case '[': return parse_container(ps, false);
    case '"': return parse_string(ps);
    case 't':
        if (!lit(ps, "true", 4)) return NULL;
        {
            torpor_json *n = node_new(TORPOR_JSON_BOOL, 0);
            n->num.i = 1;
            return n;
        }
    case 'f': return lit(ps, "false", 5) ? node_new(TORPOR_JSON_BOOL, 0) : NULL;
    case 'n': return lit(ps, "null", 4) ? node_new(TORPOR_JSON_NULL, 0) : NULL;
    default: return parse_number(ps);
    }
}

torpor_json *torpor_json_parse(const char *s, size_t n) {
    if (!s) return NULL;
    parser ps = {(const uint8_t *)s, (const uint8_t *)s + n, 0};
    torpor_json *v = parse_value(&ps);
    if (!v) return NULL;
    skip_ws(&ps);
    if (ps.p != ps.end) {
        torpor_json_free(v);
        return NULL;
    }
    return v;
}

torpor_json *torpor_json_parse_cstr(const char *s) { return s ? torpor_json_parse(s, strlen(s)) : NULL; }

torpor_json_type_t torpor_json_type(const torpor_json *v) {
    return v ? (torpor_json_type_t)v->type : TORPOR_JSON_MISSING;
}
bool torpor_json_is_null(const torpor_json *v) { return v && v->type == TORPOR_JSON_NULL; }
bool torpor_json_is_bool(const torpor_json *v) { return v && v->type == TORPOR_JSON_BOOL; }
bool torpor_json_is_number(const torpor_json *v) { return v && v->type == TORPOR_JSON_NUMBER; }
bool torpor_json_is_int(const torpor_json *v) { return v && v->type == TORPOR_JSON_NUMBER && v->is_int; }
bool torpor_json_is_string(const torpor_json *v) { return v && v->type == TORPOR_JSON_STRING; }
bool torpor_json_is_array(const torpor_json *v) { return v && v->type == TORPOR_JSON_ARRAY; }
bool torpor_json_is_object(const torpor_json *v) { return v && v->type == TORPOR_JSON_OBJECT; }

static const torpor_json *get_n(const torpor_json *o, const char *key, size_t kl) {
    if (!o || o->type != TORPOR_JSON_OBJECT || !key) return NULL;
    for (uint32_t i = o->len; i-- > 0;) {
        const torpor_json *k = o->kids[2 * i];
        if (k->len == kl && memcmp(k->s, key, kl) == 0) return o->kids[2 * i + 1];
    }
    return NULL;
}

const torpor_json *torpor_json_get(const torpor_json *obj, const char *key) {
    return key ? get_n(obj, key, strlen(key)) : NULL;
}

const torpor_json *torpor_json_index(const torpor_json *v, size_t i) {
    if (!v || i >= v->len) return NULL;
    if (v->type == TORPOR_JSON_ARRAY) return v->kids[i];
    if (v->type == TORPOR_JSON_OBJECT) return v->kids[2 * i + 1];
    return NULL;
}

const char *torpor_json_key(const torpor_json *obj, size_t i) {
    if (!obj || obj->type != TORPOR_JSON_OBJECT || i >= obj->len) return NULL;
    return obj->kids[2 * i]->s;
}

const torpor_json *torpor_json_path(const torpor_json *v, const char *path) {
    if (!path) return NULL;
    const char *p = path;
    while (v && *p) {
        const char *seg = p;
        size_t sl;
        bool bracket = *p == '[';
        if (bracket) {
            seg = ++p;
            while (*p && *p != ']') p++;
            if (*p != ']') return NULL;
            sl = (size_t)(p - seg);
            p++;
        } else {
            while (*p && *p != '.' && *p != '[') p++;
            sl = (size_t)(p - seg);
        }
        if (*p == '.') p++;
        bool digits = sl > 0 && sl <= 10;
        size_t idx = 0;
        for (size_t i = 0; i < sl && digits; i++) {
            if (seg[i] < '0' || seg[i] > '9') digits = false;
            else idx = idx * 10 + (size_t)(seg[i] - '0');
        }
        if (v->type == TORPOR_JSON_ARRAY) {
            if (!digits) return NULL;
            v = torpor_json_index(v, idx);
        } else if (v->type == TORPOR_JSON_OBJECT && !bracket) {
            v = get_n(v, seg, sl);
        } else {
            return NULL;
        }
    }
    return v;
}

size_t torpor_json_len(const torpor_json *v) {
    if (!v) return 0;
    switch (v->type) {
    case TORPOR_JSON_STRING:
    case TORPOR_JSON_ARRAY:
    case TORPOR_JSON_OBJECT: return v->len;
    default: return 0;
    }
}

const char *torpor_json_str(const torpor_json *v) {
    return v && v->type == TORPOR_JSON_STRING ? v->s : NULL;
}

bool torpor_json_streq(const torpor_json *v, const char *s) {
    if (!v || v->type != TORPOR_JSON_STRING || !s) return false;
    size_t n = strlen(s);
    return n == v->len && memcmp(v->s, s, n) == 0;
}

int64_t torpor_json_int(const torpor_json *v) {
    if (!v || v->type != TORPOR_JSON_NUMBER) return 0;
    if (v->is_int) return v->num.i;
    double d = v->num.d;
    if (d != d) return 0;
    if (d >= 9223372036854775807.0) return INT64_MAX;
    if (d <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)d;
}

double torpor_json_num(const torpor_json *v) {
    if (!v || v->type != TORPOR_JSON_NUMBER) return 0.0;
    return v->is_int ? (double)v->num.i : v->num.d;
}

bool torpor_json_bool(const torpor_json *v) { return v && v->type == TORPOR_JSON_BOOL && v->num.i; }

static void sb_dump(torpor_buf *b, const torpor_json *v) {
    if (!v) {
        sb_puts(b, "null");
        return;
    }
    switch (v->type) {
    case TORPOR_JSON_NULL: sb_puts(b, "null"); break;
    case TORPOR_JSON_BOOL: sb_puts(b, v->num.i ? "true" : "false"); break;
    case TORPOR_JSON_NUMBER:
        if (v->is_int) sb_i64(b, v->num.i);
        else if (v->s) sb_putn(b, v->s, v->len);
        else sb_double(b, v->num.d, true);
        break;
    case TORPOR_JSON_STRING: sb_jstr(b, v->s, v->len); break;
    case TORPOR_JSON_ARRAY:
        sb_putc(b, '[');
        for (uint32_t i = 0; i < v->len; i++) {
            if (i) sb_putc(b, ',');
            sb_dump(b, v->kids[i]);
        }
        sb_putc(b, ']');
        break;
    case TORPOR_JSON_OBJECT:
        sb_putc(b, '{');
        for (uint32_t i = 0; i < v->len; i++) {
            if (i) sb_putc(b, ',');
            sb_jstr(b, v->kids[2 * i]->s, v->kids[2 * i]->len);
            sb_putc(b, ':');
            sb_dump(b, v->kids[2 * i + 1]);
        }
        sb_putc(b, '}');
        break;
    }
}

char *torpor_json_dump(const torpor_json *v) {
    torpor_buf b = {0};
    sb_dump(&b, v);
    return sb_take(&b);
}

/* ========================================================================= */
/* printf-style formatting                                                    */
/* ========================================================================= */
static void vfmt(torpor_buf *b, const char *f, va_list ap, bool json) {
    while (*f) {
        const char *lit_end = f;
        while (*lit_end && *lit_end != '%') lit_end++;
        if (lit_end > f) sb_putn(b, f, (size_t)(lit_end - f));
        f = lit_end;
        if (!*f) break;
        const char *spec = f++;
        int prec = -1;
        if (f[0] == '.' && f[1] == '*') {
            prec = va_arg(ap, int);
            f += 2;
        }
        int lmod = 0; /* 1 = l, 2 = ll, 3 = z */
        if (*f == 'l') {
            lmod = 1, f++;
            if (*f == 'l') lmod = 2, f++;
        } else if (*f == 'z') {
            lmod = 3, f++;
        }
        char c = *f ? *f++ : 0;
        switch (c) {
        case '%': sb_putc(b, '%'); break;
        case 's':
        case 'S': {
            const char *s = va_arg(ap, const char *);
            if (!s) {
                if (json && c == 's') sb_puts(b, "null");
                else if (!json) sb_puts(b, "(null)");
                break;
            }
            size_t n = prec >= 0 ? (size_t)prec : strlen(s);
            if (!json) sb_putn(b, s, n);
            else if (c == 's') sb_jstr(b, s, n);
            else sb_escape(b, s, n);
            break;
        }
        case 'j': {
            const char *s = va_arg(ap, const char *);
            sb_puts(b, s ? s : "null");
            break;
        }
        case 'v': sb_dump(b, va_arg(ap, const torpor_json *)); break;
        case 'd':
        case 'i':
            if (lmod == 2) sb_i64(b, va_arg(ap, long long));
            else if (lmod) sb_i64(b, va_arg(ap, long));
            else sb_i64(b, va_arg(ap, int));
            break;
        case 'u':
        case 'x': {
            uint64_t u = lmod == 2 ? va_arg(ap, unsigned long long)
                       : lmod ? va_arg(ap, unsigned long) : va_arg(ap, unsigned);
            if (c == 'u') sb_u64(b, u);
            else sb_hex(b, u);
            break;
        }
        case 'b': sb_puts(b, va_arg(ap, int) ? "true" : "false"); break;
        case 'f':
        case 'g':
        case 'e': sb_double(b, va_arg(ap, double), json); break;
        case 'c': sb_putc(b, (char)va_arg(ap, int)); break;
        default: {
            size_t n = (size_t)(f - spec);
            char bad[8];
            if (n > 7) n = 7;
            memcpy(bad, spec, n);
            bad[n] = 0;
            torpor_panic("format: unsupported conversion \"%s\" in \"%s\"", bad, lit_end);
        }
        }
    }
}

char *torpor_vjsonf(const char *fmt, va_list ap) {
    torpor_buf b = {0};
    vfmt(&b, fmt, ap, true);
    return sb_take(&b);
}

char *torpor_jsonf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vjsonf(fmt, ap);
    va_end(ap);
    return s;
}

char *torpor_vstrf(const char *fmt, va_list ap) {
    torpor_buf b = {0};
    vfmt(&b, fmt, ap, false);
    return sb_take(&b);
}

char *torpor_strf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vstrf(fmt, ap);
    va_end(ap);
    return s;
}

/* ========================================================================= */
/* JSON builder                                                               */
/* ========================================================================= */
#define JB_TOP 0u
#define JB_OBJ 1u
#define JB_ARR 2u
#define JB_HAS 4u
#define JB_KEY 8u

static bool jb_pre(torpor_jb *b) {
    if (b->err) return false;
    uint8_t *s = &b->st[b->depth];
    if ((*s & 3) == JB_OBJ) {
        if (!(*s & JB_KEY)) return (b->err = 1), false;
        *s &= (uint8_t)~JB_KEY;
        return true;
    }
    if (*s & JB_HAS) {
        if ((*s & 3) == JB_TOP) return (b->err = 1), false;
        sb_putc(&b->out, ',');
    }
    *s |= JB_HAS;
    return true;
}

static void jb_open(torpor_jb *b, unsigned kind, char c) {
    if (!jb_pre(b)) return;
    if (b->depth >= TORPOR_JSON_MAX_DEPTH) {
        b->err = 1;
        return;
    }
    sb_putc(&b->out, c);
    b->st[++b->depth] = (uint8_t)kind;
}

void torpor_jb_obj(torpor_jb *b) { jb_open(b, JB_OBJ, '{'); }
void torpor_jb_arr(torpor_jb *b) { jb_open(b, JB_ARR, '['); }

void torpor_jb_end(torpor_jb *b) {
    if (b->err) return;
    uint8_t s = b->st[b->depth];
    if (b->depth == 0 || (s & JB_KEY)) {
        b->err = 1;
        return;
    }
    sb_putc(&b->out, (s & 3) == JB_OBJ ? '}' : ']');
    b->depth--;
}

void torpor_jb_key(torpor_jb *b, const char *key) {
    if (b->err) return;
    uint8_t *s = &b->st[b->depth];
    if ((*s & 3) != JB_OBJ || (*s & JB_KEY) || !key) {
        b->err = 1;
        return;
    }
    if (*s & JB_HAS) sb_putc(&b->out, ',');
    sb_jstr(&b->out, key, strlen(key));
    sb_putc(&b->out, ':');
    *s |= JB_HAS | JB_KEY;
}

void torpor_jb_strn(torpor_jb *b, const char *s, size_t n) {
    if (!jb_pre(b)) return;
    if (s) sb_jstr(&b->out, s, n);
    else sb_puts(&b->out, "null");
}
void torpor_jb_str(torpor_jb *b, const char *s) { torpor_jb_strn(b, s, s ? strlen(s) : 0); }
void torpor_jb_int(torpor_jb *b, int64_t v) {
    if (jb_pre(b)) sb_i64(&b->out, v);
}
void torpor_jb_num(torpor_jb *b, double v) {
    if (jb_pre(b)) sb_double(&b->out, v, true);
}
void torpor_jb_bool(torpor_jb *b, bool v) {
    if (jb_pre(b)) sb_puts(&b->out, v ? "true" : "false");
}
void torpor_jb_null(torpor_jb *b) {
    if (jb_pre(b)) sb_puts(&b->out, "null");
}
void torpor_jb_raw(torpor_jb *b, const char *json) {
    if (jb_pre(b)) sb_puts(&b->out, json ? json : "null");
}
void torpor_jb_value(torpor_jb *b, const torpor_json *v) {
    if (jb_pre(b)) sb_dump(&b->out, v);
}
void torpor_jb_f(torpor_jb *b, const char *fmt, ...) {
    if (!jb_pre(b)) return;
    va_list ap;
    va_start(ap, fmt);
    vfmt(&b->out, fmt, ap, true);
    va_end(ap);
}

void torpor_jb_reset(torpor_jb *b) {
    torpor_free(b->out.p);
    memset(b, 0, sizeof *b);
}

char *torpor_jb_finish(torpor_jb *b) {
    char *r = NULL;
    if (!b->err && b->depth == 0 && (b->st[0] & JB_HAS)) r = sb_take(&b->out);
    torpor_jb_reset(b);
    return r;
}

/* ========================================================================= */
/* Input, output, logging                                                     */
/* ========================================================================= */
static char *g_input;
static size_t g_input_len;
static torpor_json *g_input_json;
static bool g_input_parsed;

const char *torpor_input_text(size_t *len) {
    if (!g_input) {
        int32_t n = torpor_sys_input_len();
        if (n < 0) n = 0;
        g_input = (char *)torpor_alloc((size_t)n + 1);
        int32_t got = n ? torpor_sys_input_read(g_input, n) : 0;
        if (got < 0) got = 0;
        g_input[got] = 0;
        g_input_len = (size_t)got;
    }
    if (len) *len = g_input_len;
    return g_input;
}

const torpor_json *torpor_input(void) {
    if (!g_input_parsed) {
        size_t n;
        const char *s = torpor_input_text(&n);
        g_input_json = torpor_json_parse(s, n);
        g_input_parsed = true;
    }
    return g_input_json;
}

int torpor_output_n(const char *json, size_t len) {
    if (!json) return TORPOR_E_INVALID_JSON;
    if (len > TORPOR_MAX_OUTPUT) return TORPOR_E_TOO_LARGE;
    return torpor_sys_output_write(json, (int32_t)len);
}

int torpor_output(const char *json) { return torpor_output_n(json, json ? strlen(json) : 0); }

int torpor_output_value(const torpor_json *v) {
    char *s = torpor_json_dump(v);
    int rc = torpor_output(s);
    torpor_free(s);
    return rc;
}

int torpor_outputf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vjsonf(fmt, ap);
    va_end(ap);
    int rc = torpor_output(s);
    torpor_free(s);
    return rc;
}

static int log_n(int level, const char *msg, size_t n) {
    if (!msg) msg = "(null)", n = 6;
    if (n > TORPOR_MAX_LOG) {
        n = TORPOR_MAX_LOG;
        while (n > 0 && ((uint8_t)msg[n] & 0xC0) == 0x80) n--; /* cut at a character */
    }
    return torpor_sys_log(level, msg, (int32_t)n);
}

int torpor_log(int level, const char *msg) { return log_n(level, msg, msg ? strlen(msg) : 0); }

int torpor_logf(int level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vstrf(fmt, ap);
    va_end(ap);
    int rc = torpor_log(level, s);
    torpor_free(s);
    return rc;
}

int torpor_fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vstrf(fmt, ap);
    va_end(ap);
    torpor_log(TORPOR_ERROR, s);
    torpor_free(s);
    return 1;
}

_Noreturn void torpor_panic(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *s = torpor_vstrf(fmt, ap);
    va_end(ap);
    size_t n = strlen(s);
    if (n > TORPOR_MAX_LOG) n = TORPOR_MAX_LOG;
    torpor_sys_abort(TORPOR_ABORT_PANIC, s, (int32_t)n);
}

/* ========================================================================= */
/* Tools                                                                       */
/* ========================================================================= */
const char *torpor_error_name(int code) {
    static const char *const names[] = {"ok",           "fault",          "invalid_json",
                                        "too_large",    "unknown_tool",   "invalid_args",
                                        "tool_failed",  "denied",         "result_too_large",
                                        "rate_limited", "timeout",        "unavailable"};
    if (code <= 0 && code >= -11) return names[-code];
    return "unknown";
}

torpor_result torpor_call(const char *tool, const char *args_json) {
    torpor_result r;
    memset(&r, 0, sizeof r);
    if (!tool) tool = "";
    if (!args_json) args_json = "{}";
    size_t nl = strlen(tool), al = strlen(args_json);
    int32_t rc = torpor_sys_tool_call(tool, (int32_t)nl, args_json, (int32_t)al);
    int32_t n = torpor_sys_response_len();
    if (n < 0) n = 0;
    char *raw = (char *)torpor_alloc((size_t)n + 1);
    int32_t got = n ? torpor_sys_response_read(raw, n) : 0;
    if (got < 0) got = 0;
    raw[got] = 0;
    r.raw = raw;
    r.raw_len = (size_t)got;
    r.code = rc;
    r.ok = rc == 0;
    r.value = torpor_json_parse(raw, (size_t)got);
    if (r.ok) {
        r.code_name = "ok";
        r.message = "";
    } else {
        const char *cn = torpor_json_str(torpor_json_get(r.value, "code"));
        const char *msg = torpor_json_str(torpor_json_get(r.value, "message"));
        r.code_name = cn ? cn : torpor_error_name(rc);
        r.message = msg ? msg : "";
        r.rule = torpor_json_str(torpor_json_get(r.value, "rule"));
        r.retryable = torpor_json_bool(torpor_json_get(r.value, "retryable"));
    }
    return r;
}

torpor_result torpor_callf(const char *tool, const char *args_fmt, ...) {
    va_list ap;
    va_start(ap, args_fmt);
    char *args = torpor_vjsonf(args_fmt, ap);
    va_end(ap);
    torpor_result r = torpor_call(tool, args);
    torpor_free(args);
    return r;
}

void torpor_result_free(torpor_result *r) {
    if (!r) return;
    torpor_free((void *)r->raw);
    torpor_json_free(r->value);
    memset(r, 0, sizeof *r);
}

static torpor_result g_last_err;

const torpor_result *torpor_last_error(void) { return g_last_err.raw ? &g_last_err : NULL; }

/* Record r (taking ownership) as the last error; answer its code. */
static int wrap_fail(torpor_result *r, int *err) {
    if (r->ok) { /* the tool answered, but not in the documented shape */
        r->ok = false;
        r->code = TORPOR_E_TOOL_FAILED;
        r->code_name = "tool_failed";
        r->message = "unexpected result shape";
    }
    torpor_result_free(&g_last_err);
    g_last_err = *r;
    if (err) *err = r->code;
    return r->code;
}

torpor_json *torpor_kv_get(const char *key, int *err) {
    torpor_result r = torpor_callf("kv.get", "{\"key\": %s}", key);
    torpor_json *obj = r.value;
    if (!r.ok || !torpor_json_is_object(obj)) return wrap_fail(&r, err), NULL;
    /* detach the "value" member from the response, free the rest */
    torpor_json *v = NULL;
    for (uint32_t i = obj->len; i-- > 0;) {
        if (torpor_json_streq(obj->kids[2 * i], "value")) {
            v = obj->kids[2 * i + 1];
            obj->kids[2 * i + 1] = node_new(TORPOR_JSON_NULL, 0);
            break;
        }
    }
    if (!v) return wrap_fail(&r, err), NULL;
    torpor_result_free(&r);
    if (err) *err = 0;
    return v;
}

int torpor_kv_set(const char *key, const char *value_json) {
    torpor_result r = torpor_callf("kv.set", "{\"key\": %s, \"value\": %j}", key, value_json);
    if (!r.ok) return wrap_fail(&r, NULL);
    torpor_result_free(&r);
    return 0;
}

static int64_t int_result(torpor_result *r, const char *field, int *err) {
    const torpor_json *v = torpor_json_get(r->value, field);
    if (!r->ok || !torpor_json_is_int(v)) return wrap_fail(r, err), 0;
    int64_t x = torpor_json_int(v);
    torpor_result_free(r);
    if (err) *err = 0;
    return x;
}

int64_t torpor_kv_incr(const char *key, int64_t by, int *err) {
    torpor_result r = torpor_callf("kv.incr", "{\"key\": %s, \"by\": %lld}", key, (long long)by);
    return int_result(&r, "value", err);
}

int64_t torpor_clock_now(int *err) {
    torpor_result r = torpor_call("clock.now", "{}");
    return int_result(&r, "unix_ms", err);
}

int torpor_sleep_ms(int64_t ms) {
    torpor_result r = torpor_callf("timer.sleep", "{\"ms\": %lld}", (long long)ms);
    if (!r.ok) return wrap_fail(&r, NULL);
    torpor_result_free(&r);
    return 0;
}

/* ========================================================================= */
/* Shared namespaces, LLM, HTTP, MCP                                           */
/* ========================================================================= */
/* Take the parsed response out of r (freeing the rest), or fail. */
static torpor_json *take_object(torpor_result *r, int *err) {
    if (!r->ok || !torpor_json_is_object(r->value)) return wrap_fail(r, err), NULL;
    torpor_json *v = r->value;
    r->value = NULL;
    torpor_result_free(r);
    if (err) *err = 0;
    return v;
}

/* Detach the member `key` of the response object (freeing the rest), or fail. */
static torpor_json *take_member(torpor_result *r, const char *key, int *err) {
    torpor_json *obj = r->value;
    if (!r->ok || !torpor_json_is_object(obj)) return wrap_fail(r, err), NULL;
    torpor_json *v = NULL;
    for (uint32_t i = obj->len; i-- > 0;) {
        if (torpor_json_streq(obj->kids[2 * i], key)) {
            v = obj->kids[2 * i + 1];
            obj->kids[2 * i + 1] = node_new(TORPOR_JSON_NULL, 0);
            break;
        }
    }
    if (!v) return wrap_fail(r, err), NULL;
    torpor_result_free(r);
    if (err) *err = 0;
    return v;
}

torpor_json *torpor_kv_get_ns(const char *ns, const char *key, int *err) {
    if (!ns) return torpor_kv_get(key, err);
    torpor_result r = torpor_callf("kv.get", "{\"key\": %s, \"namespace\": %s}", key, ns);
    return take_member(&r, "value", err);
}

int torpor_kv_set_ns(const char *ns, const char *key, const char *value_json) {
    if (!ns) return torpor_kv_set(key, value_json);
    torpor_result r = torpor_callf("kv.set", "{\"key\": %s, \"value\": %j, \"namespace\": %s}", key,
                                   value_json, ns);
    if (!r.ok) return wrap_fail(&r, NULL);
    torpor_result_free(&r);
    return 0;
}

int64_t torpor_kv_incr_ns(const char *ns, const char *key, int64_t by, int *err) {
    if (!ns) return torpor_kv_incr(key, by, err);
    torpor_result r = torpor_callf("kv.incr", "{\"key\": %s, \"by\": %lld, \"namespace\": %s}", key,
                                   (long long)by, ns);
    return int_result(&r, "value", err);
}

/* Add every member of the JSON object text `extra` (NULL: nothing) to an open object. */
static bool jb_merge(torpor_jb *b, const char *extra) {
    if (!extra) return true;
    torpor_json *o = torpor_json_parse_cstr(extra);
    if (!torpor_json_is_object(o)) {
        torpor_json_free(o);
        return false;
    }
    for (size_t i = 0; i < torpor_json_len(o); i++) {
        torpor_jb_key(b, torpor_json_key(o, i));
        torpor_jb_value(b, torpor_json_index(o, i));
    }
    torpor_json_free(o);
    return true;
}

/* A failure found before any call: recorded like a tool's, so torpor_last_error explains it. */
static void *local_fail(int code, const char *name, const char *message, int *err) {
    torpor_result r;
    memset(&r, 0, sizeof r);
    r.code = code;
    r.code_name = name;
    r.message = message;
    char *raw = torpor_jsonf("{\"code\": %s, \"message\": %s, \"retryable\": false}", name, message);
    r.raw = raw;
    r.raw_len = strlen(raw);
    r.value = torpor_json_parse_cstr(raw);
    torpor_result_free(&g_last_err);
    g_last_err = r;
    g_last_err.message = torpor_json_str(torpor_json_get(g_last_err.value, "message"));
    g_last_err.code_name = torpor_json_str(torpor_json_get(g_last_err.value, "code"));
    if (err) *err = code;
    return NULL;
}

torpor_json *torpor_llm_chat_with(const char *tool, const char *messages_json, const char *options_json,
                                  int *err) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_obj(&b);
    torpor_jb_key(&b, "messages");
    torpor_jb_raw(&b, messages_json ? messages_json : "[]");
    bool ok = jb_merge(&b, options_json);
    torpor_jb_end(&b);
    char *args = torpor_jb_finish(&b);
    if (!ok || !args) {
        torpor_free(args);
        return local_fail(TORPOR_E_INVALID_ARGS, "invalid_args", "options_json must be a JSON object", err);
    }
    torpor_result r = torpor_call(tool ? tool : "llm.chat", args);
    torpor_free(args);
    return take_object(&r, err);
}

torpor_json *torpor_llm_chat(const char *messages_json, const char *options_json, int *err) {
    return torpor_llm_chat_with("llm.chat", messages_json, options_json, err);
}

char *torpor_llm_ask(const char *system, const char *user, int *err) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_arr(&b);
    if (system) torpor_jb_f(&b, "{\"role\": \"system\", \"content\": %s}", system);
    torpor_jb_f(&b, "{\"role\": \"user\", \"content\": %s}", user ? user : "");
    torpor_jb_end(&b);
    char *messages = torpor_jb_finish(&b);
    torpor_json *answer = torpor_llm_chat(messages, NULL, err);
    torpor_free(messages);
    if (!answer) return NULL;
    const char *text = torpor_json_str(torpor_json_get(answer, "content"));
    char *out = torpor_strdup(text ? text : "");
    torpor_json_free(answer);
    return out;
}

torpor_json *torpor_http_fetch_with(const char *tool, const char *method, const char *url,
                                    const char *headers_json, const char *body, int *err) {
    torpor_jb b = TORPOR_JB_INIT;
    torpor_jb_obj(&b);
    torpor_jb_key(&b, "url");
    torpor_jb_str(&b, url);
    torpor_jb_key(&b, "method");
    torpor_jb_str(&b, method ? method : "GET");
    if (headers_json) {
        torpor_jb_key(&b, "headers");
        torpor_jb_raw(&b, headers_json);
    }
    if (body) {
        torpor_jb_key(&b, "body");
        torpor_jb_str(&b, body);
    }
    torpor_jb_end(&b);
    char *args = torpor_jb_finish(&b);
    torpor_result r = torpor_call(tool ? tool : "http.fetch", args);
    torpor_free(args);
    return take_object(&r, err);
}

torpor_json *torpor_http_fetch(const char *method, const char *url, const char *headers_json,
                               const char *body, int *err) {
    return torpor_http_fetch_with("http.fetch", method, url, headers_json, body, err);
}

torpor_json *torpor_http_get_json(const char *tool, const char *url, int *status, int *err) {
    torpor_result r = torpor_callf(tool ? tool : "http.fetch", "{\"url\": %s}", url);
    if (status) *status = (int)torpor_json_int(torpor_json_get(r.value, "status"));
    if (r.ok && !torpor_json_get(r.value, "json")) { /* answered, but not with JSON */
        r.ok = false;
        r.code = TORPOR_E_TOOL_FAILED;
        r.code_name = "tool_failed";
        r.message = "the response body is not JSON";
        return wrap_fail(&r, err), NULL;
    }
    return take_member(&r, "json", err);
}

torpor_json *torpor_http_post_json(const char *tool, const char *url, const char *json_body, int *err) {
    torpor_result r = torpor_callf(tool ? tool : "http.fetch", "{\"url\": %s, \"method\": \"POST\", \"json\": %j}",
                                   url, json_body);
    return take_object(&r, err);
}

torpor_json *torpor_mcp_call(const char *server, const char *tool, const char *args_json, int *err) {
    char *name = torpor_strf("mcp.%s.%s", server ? server : "", tool ? tool : "");
    torpor_result r = torpor_call(name, args_json ? args_json : "{}");
    torpor_free(name);
    return take_object(&r, err);
}

#ifndef TORPOR_SDK_NO_MINSIZE
#pragma clang attribute pop
#endif
#pragma GCC visibility pop
