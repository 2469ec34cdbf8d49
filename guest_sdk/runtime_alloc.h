/* The one allocator of the JavaScript and Python runtimes (guest_sdk/js/runtime.c,
 * guest_sdk/python/runtime.c): small blocks from pools, mid-size ones from pages, the rest
 * from libc, what is freed zeroed; and the wipe of the dead C stack before a suspension.
 *
 * Why (issue 23's failure, re-run for both languages: what a turn of a conversation stored
 * grew with the conversation): a checkpoint stores every page that differs from the
 * pristine image, cut into content-defined chunks the store keeps once.
 * - What an agent frees in bulk (the JSON text of a tool call's arguments, the escaped
 *   copy of every message, a buffer a realloc moved) is the conversation again, left in
 *   new places each turn: zeroed, it is runs of zeros, one chunk compressed to nothing.
 * - A conversation's messages are blocks of a few KiB that live for the whole run, and
 *   each tool call makes and frees as many again. Under libc's malloc a freed block keeps
 *   a free-list link that changes every turn, beside live messages, so every checkpoint
 *   re-stored chunks of the conversation. Here blocks of MID_MIN bytes to 16 KiB come from
 *   32 KiB pages whose slots are bits in a table apart, lowest free slot of the first page
 *   with room first: what memory holds after a turn depends on the live blocks only.
 *
 * One header so that the two runtimes cannot drift apart; both builds hash it into their
 * cache keys (host/sandbox/guest_runtime_build.py: shared_headers), so a change here
 * rebuilds both. The includer defines alloc_failed(n), what running out of memory does
 * (both end the agent as memory_limit, each with its language's message), and takes its
 * interpreter's allocations from t_malloc, t_calloc, t_realloc, t_free and t_usable.
 * Included once, by the runtime's one translation unit. */
#ifndef TORPOR_RUNTIME_ALLOC_H
#define TORPOR_RUNTIME_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "runtime_abi.h" /* NOINLINE */

extern size_t malloc_usable_size(void *);
/* The includer's: ends the agent as memory_limit (n: the request that failed). */
_Noreturn static void alloc_failed(size_t n);

/* A freed libc block of this many bytes or more is zeroed (smaller ones are the
 * interpreters' own objects, reused in place). */
#define ZERO_FREED_MIN 256
/* Through a volatile pointer: a memset the compiler sees followed by free() is a dead
 * store it deletes (it did: the "zeroed" garbage stayed). */
static void *(*volatile wipe)(void *, int, size_t) = memset;

#define MID_MIN 513 /* SMALL_MAX + 1: below, the pools */
#define MID_MAX 16384
#define MID_SHIFT 15 /* 32 KiB pages, carved from 256 KiB regions */
#define MID_PAGE (1u << MID_SHIFT)
#define MID_NCLASS 5
#define MID_MAXPAGES 8192 /* 256 MiB of them: past it, requests go to libc */
static const uint32_t mid_sizes[MID_NCLASS] = {1024, 2048, 4096, 8192, 16384};
static uint8_t mid_class[(1u << (32 - MID_SHIFT))]; /* class + 1 of each 32 KiB page; 0: not a mid page */
static uint8_t *mid_pages[MID_NCLASS][MID_MAXPAGES];
static uint32_t mid_bits[MID_NCLASS][MID_MAXPAGES];  /* bit i: slot i handed out */
static uint32_t mid_count[MID_NCLASS], mid_total;
static uint8_t *mid_next, *mid_end;

static inline int in_mid_range(size_t n) { return n >= MID_MIN && n <= MID_MAX; }
static inline int from_mid(const void *p) { return p && mid_class[(uintptr_t)p >> MID_SHIFT] != 0; }
static inline size_t mid_size(const void *p) { return mid_sizes[mid_class[(uintptr_t)p >> MID_SHIFT] - 1u]; }

/* A block of at least n bytes (in_mid_range(n)), or NULL past MID_MAXPAGES pages. */
static void *m_malloc(size_t n) {
    unsigned c = 0;
    while (mid_sizes[c] < n) c++;
    uint32_t slots = MID_PAGE / mid_sizes[c], full = slots == 32 ? 0xFFFFFFFFu : (1u << slots) - 1;
    for (uint32_t i = 0; i < mid_count[c]; i++) {
        uint32_t b = mid_bits[c][i];
        if (b == full) continue;
        unsigned k = (unsigned)__builtin_ctz(~b);
        mid_bits[c][i] = b | (1u << k);
        return mid_pages[c][i] + (size_t)k * mid_sizes[c];
    }
    if (mid_total >= MID_MAXPAGES) return NULL;
    if (mid_end - mid_next < (ptrdiff_t)MID_PAGE) {
        uint8_t *r = malloc(8 * MID_PAGE + MID_PAGE);
        if (!r) return NULL;
        mid_next = (uint8_t *)(((uintptr_t)r + MID_PAGE - 1) & ~(uintptr_t)(MID_PAGE - 1));
        mid_end = mid_next + 8 * MID_PAGE;
    }
    uint8_t *pg = mid_next;
    mid_next += MID_PAGE;
    mid_class[(uintptr_t)pg >> MID_SHIFT] = (uint8_t)(c + 1);
    mid_total++;
    mid_pages[c][mid_count[c]] = pg;
    mid_bits[c][mid_count[c]++] = 1;
    return pg;
}

/* Frees p (from_mid(p)): its slot is zeroed and its bit cleared. */
static void m_free(void *p) {
    unsigned c = mid_class[(uintptr_t)p >> MID_SHIFT] - 1u;
    uint8_t *pg = (uint8_t *)((uintptr_t)p & ~(uintptr_t)(MID_PAGE - 1));
    memset(p, 0, mid_sizes[c]); /* no free() follows: the store stays */
    for (uint32_t i = 0; i < mid_count[c]; i++)
        if (mid_pages[c][i] == pg) { mid_bits[c][i] &= ~(1u << ((uint32_t)((uint8_t *)p - pg) / mid_sizes[c])); return; }
}

/* Whether the mid block p can hold n bytes in place (n in its class's upper half): then
 * what the shrink gives back is zeroed, so a freed tail holds nothing. Otherwise the
 * caller moves the block (its allocator, then m_free). */
static int m_resize_in_place(void *p, size_t n) {
    size_t size = mid_size(p);
    if (n > size || n <= size / 2) return 0;
    if (n < size) memset((uint8_t *)p + n, 0, size - n);
    return 1;
}

/* ---- small blocks (up to SMALL_MAX bytes): 4 KiB pools, lowest free slot first -------- */

/* An interpreter's own objects (QuickJS's objects, shapes, atoms and promise records;
 * CPython's dicts, frames and ints) are made and dropped by the thousand every turn.
 * Under libc's malloc (QuickJS's) or a LIFO free list (pymalloc's shape), the blocks a
 * turn dropped kept their contents and a link that changes every turn, and the next
 * turn's new objects landed wherever the list pointed: every checkpoint re-stored the
 * pages (and the content chunks around them) that this garbage was scattered over. Here,
 * as for the mid blocks: a pool of one size class keeps its slots' state in a bitmap in
 * its header, a request takes the lowest free slot of the lowest pool of its class with
 * room, and a freed slot is zeroed. What the pools hold after a turn then depends on the
 * live objects only, and the ones a turn makes and drops reuse the same low slots. */
#define SMALL_MAX 512
#define SMALL_ALIGN 8 /* pymalloc's alignment on a 32-bit target */
/* Few classes, about 1.5x apart: a turn's objects of a dozen sizes dirty a handful of
 * pools, not one per 8-byte size. */
static const uint16_t class_sizes[] = {8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512};
#define NCLASS (sizeof class_sizes / sizeof class_sizes[0])
#define POOL_SHIFT 12
#define POOL_SIZE (1u << POOL_SHIFT)
#define ARENA_SIZE (256u * 1024)
#define MAX_POOLS 16384 /* 64 MiB of them: past it, requests go to libc */
#define POOL_WORDS (MAX_POOLS / 32)

typedef struct pool {
    uint16_t cls, used; /* blocks handed out */
    uint32_t id;        /* index in pool_addr */
    uint32_t low;       /* no bitmap word below it has a free slot */
    uint32_t bits[];    /* bit i: slot i handed out (bits past the last slot set) */
} pool_t;

static uint8_t size_class[SMALL_MAX / SMALL_ALIGN]; /* (n - 1) / 8 -> class */
static uint16_t class_slots[NCLASS], class_first[NCLASS]; /* slots of a pool; offset of slot 0 */
static pool_t *pool_addr[MAX_POOLS];
static uint32_t pool_room[NCLASS][POOL_WORDS];       /* bit id: pool id of that class has a free slot */
static uint32_t room_words[NCLASS][POOL_WORDS / 32]; /* bit w: pool_room[c][w] has a bit set */
static pool_t *room_first[NCLASS];                   /* the lowest pool with room, or NULL: unknown */
static uint32_t pool_count;
static uint32_t pool_map[(1u << (32 - POOL_SHIFT)) / 32]; /* a bit per 4 KiB page: a pool's */
static uint8_t *arena_next, *arena_end;                   /* the arena being carved into pools */

static void init_small(void) {
    unsigned c = 0;
    for (unsigned i = 0; i < SMALL_MAX / SMALL_ALIGN; i++) {
        while (class_sizes[c] < (i + 1) * SMALL_ALIGN) c++;
        size_class[i] = (uint8_t)c;
    }
    for (c = 0; c < NCLASS; c++) {
        unsigned n = POOL_SIZE / class_sizes[c], first;
        for (;; n--) { /* the most slots that fit beside a header whose bitmap covers them */
            first = (unsigned)((sizeof(pool_t) + 4 * ((n + 31) / 32) + SMALL_ALIGN - 1) & ~(size_t)(SMALL_ALIGN - 1));
            if (first + n * class_sizes[c] <= POOL_SIZE) break;
        }
        class_slots[c] = (uint16_t)n;
        class_first[c] = (uint16_t)first;
    }
}

static inline int from_pool(const void *p) {
    uintptr_t pg = (uintptr_t)p >> POOL_SHIFT;
    return p && ((pool_map[pg / 32] >> (pg % 32)) & 1);
}
static inline pool_t *pool_of(const void *p) { return (pool_t *)((uintptr_t)p & ~(uintptr_t)(POOL_SIZE - 1)); }
static inline size_t pool_block_size(const void *p) { return class_sizes[pool_of(p)->cls]; }

static inline void set_room(unsigned c, uint32_t id) {
    if (room_first[c] && room_first[c]->id > id) room_first[c] = pool_addr[id];
    pool_room[c][id / 32] |= 1u << (id % 32);
    room_words[c][id / 1024] |= 1u << (id / 32 % 32);
}
static inline void clear_room(unsigned c, uint32_t id) {
    if (room_first[c] && room_first[c]->id == id) room_first[c] = NULL;
    if (!(pool_room[c][id / 32] &= ~(1u << (id % 32)))) room_words[c][id / 1024] &= ~(1u << (id / 32 % 32));
}
/* The lowest pool of class c with a free slot (two levels of bitmap: a few words read). */
static pool_t *pool_with_room(unsigned c) {
    if (room_first[c]) return room_first[c];
    for (uint32_t i = 0; i < POOL_WORDS / 32; i++)
        if (room_words[c][i]) {
            uint32_t w = i * 32 + (uint32_t)__builtin_ctz(room_words[c][i]);
            return room_first[c] = pool_addr[w * 32 + (uint32_t)__builtin_ctz(pool_room[c][w])];
        }
    return NULL;
}

static pool_t *new_pool(unsigned c) {
    if (pool_count >= MAX_POOLS) return NULL;
    if (arena_end - arena_next < (ptrdiff_t)POOL_SIZE) {
        /* Plain malloc: Zig's wasi-libc aligned_alloc does not align 256 KiB blocks
         * (seen), and its malloc hands blocks this large out on 64 KiB pages anyway. */
        uint8_t *a = malloc(ARENA_SIZE);
        if (!a) return NULL;
        arena_next = (uint8_t *)(((uintptr_t)a + POOL_SIZE - 1) & ~(uintptr_t)(POOL_SIZE - 1));
        arena_end = a + ARENA_SIZE;
    }
    pool_t *pl = (pool_t *)arena_next;
    arena_next += POOL_SIZE;
    memset(pl, 0, POOL_SIZE); /* free slots are zeros: libc's memory may not be */
    uintptr_t pg = (uintptr_t)pl >> POOL_SHIFT;
    pool_map[pg / 32] |= 1u << (pg % 32);
    pl->cls = (uint16_t)c;
    pl->id = pool_count++;
    for (unsigned i = class_slots[c]; i < 32 * ((class_slots[c] + 31u) / 32); i++) pl->bits[i / 32] |= 1u << (i % 32);
    pool_addr[pl->id] = pl;
    set_room(c, pl->id);
    return pl;
}

/* A block of at least n bytes (n <= SMALL_MAX), or NULL when no pool can be made. */
static void *p_malloc(size_t n) {
    if (!class_slots[0]) init_small();
    unsigned c = size_class[n ? (n - 1) / SMALL_ALIGN : 0];
    pool_t *pl = pool_with_room(c);
    if (!pl && !(pl = new_pool(c))) return NULL;
    unsigned i = pl->low;
    while (pl->bits[i] == 0xFFFFFFFFu) i++;
    pl->low = i;
    unsigned k = (unsigned)__builtin_ctz(~pl->bits[i]);
    pl->bits[i] |= 1u << k;
    if (++pl->used == class_slots[c]) clear_room(c, pl->id);
    return (uint8_t *)pl + class_first[c] + (size_t)(i * 32 + k) * class_sizes[c];
}

/* Frees p (from_pool(p)): its slot is zeroed and its bit cleared. */
static void p_free(void *p) {
    pool_t *pl = pool_of(p);
    unsigned c = pl->cls, size = class_sizes[c];
    unsigned slot = (unsigned)((uint8_t *)p - (uint8_t *)pl - class_first[c]) / size;
    memset(p, 0, size); /* no free() follows: the store stays */
    pl->bits[slot / 32] &= ~(1u << (slot % 32));
    if (slot / 32 < pl->low) pl->low = slot / 32;
    if (pl->used-- == class_slots[c]) set_room(c, pl->id);
}

/* Whether the pool block p can hold n bytes in place (what a shrink gives back zeroed). */
static int p_resize_in_place(void *p, size_t n) {
    size_t size = pool_block_size(p);
    if (n > size || (n <= size / 2 && size > 64)) return 0;
    if (n < size) memset((uint8_t *)p + n, 0, size - n);
    return 1;
}

/* ---- the allocator: pools, mid pages, then libc ----------------------------------- */

/* Set while the pristine image is built: every freed libc block is zeroed, however small
 * (what the build discarded would otherwise stay in the image as non-zero pages that
 * every spawn and restore copies; zero pages are no data segment at all). */
static int zero_all_freed;
static inline int zero_libc_block(size_t n) { return zero_all_freed || n >= ZERO_FREED_MIN; }

static void *l_malloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) alloc_failed(n);
    return p;
}
static void l_free(void *p) {
    if (!p) return;
    size_t n = malloc_usable_size(p);
    if (zero_libc_block(n)) wipe(p, 0, n);
    free(p);
}
/* libc's realloc is called only for blocks not worth zeroing: a shrink or a growth of a
 * larger one may move it, and libc would leave the old block whole (seen: a stale copy of
 * the conversation's JSON, the buffer json.dumps and JSON.stringify shrink at their end,
 * in every checkpoint beside the live one). Here a move is malloc, copy and l_free; a
 * shrink to half the block or more stays in place, its tail zeroed. */
static void *l_realloc(void *p, size_t n) {
    if (!n) n = 1;
    size_t old = p ? malloc_usable_size(p) : 0;
    if (p && zero_libc_block(old)) {
        if (n <= old && n >= old / 2) {
            wipe((uint8_t *)p + n, 0, old - n); /* the tail a shrink gives back */
            return p;
        }
        void *q = l_malloc(n);
        memcpy(q, p, n < old ? n : old);
        l_free(p);
        return q;
    }
    void *q = realloc(p, n);
    if (!q) alloc_failed(n);
    return q;
}

static void *t_malloc(size_t n) {
    void *p = n <= SMALL_MAX ? p_malloc(n) : in_mid_range(n) ? m_malloc(n) : NULL;
    return p ? p : l_malloc(n);
}
static void t_free(void *p) {
    if (from_pool(p)) p_free(p);
    else if (from_mid(p)) m_free(p);
    else l_free(p);
}
static size_t t_usable(const void *p) {
    return from_pool(p) ? pool_block_size(p) : from_mid(p) ? mid_size(p) : malloc_usable_size((void *)p);
}
static void *t_calloc(size_t c, size_t s) {
    if (s && c > SIZE_MAX / s) alloc_failed(SIZE_MAX);
    size_t n = c * s;
    if (n > MID_MAX) {
        void *p = calloc(c, s);
        if (!p) alloc_failed(n);
        return p;
    }
    void *p = t_malloc(n);
    memset(p, 0, n ? n : 1);
    return p;
}
static void *t_realloc(void *p, size_t n) {
    if (!p) return t_malloc(n);
    int pool = from_pool(p), mid = !pool && from_mid(p);
    if (!pool && !mid) return l_realloc(p, n); /* libc's block stays libc's, as in pymalloc */
    if (pool ? p_resize_in_place(p, n) : m_resize_in_place(p, n)) return p;
    size_t old = t_usable(p);
    void *q = t_malloc(n);
    memcpy(q, p, n < old ? n : old);
    t_free(p);
    return q;
}

/* ---- the C stack: below the frame of the suspension, nothing is live --------------- */

/* A checkpoint is taken while the agent waits in tool_call, with the wasm stack at
 * torpor_main -> run_loop -> issue_call. Below those frames lie the dead frames of what
 * ran before (the interpreter's, a few KiB to tens of KiB of pointers and values), which
 * differ every turn: zeroed, a checkpoint holds only the live frames there. The walk
 * stops at 4 KiB of zeros (deeper, the stack is as the last wipe left it) or at the
 * stack's low end; it touches only words of this function's caller's dead stack, never a
 * frame of its own (it calls nothing, and its one variable is above what it wipes). */
extern uint8_t __stack_low; /* wasm-ld: the lowest address of the C stack */
#define DEAD_STACK_ZERO_RUN 512 /* 8-byte words of zeros that end the walk */
NOINLINE static void wipe_dead_stack(void) {
    volatile uint64_t mark = 0;
    uintptr_t low = ((uintptr_t)&__stack_low + 7) & ~(uintptr_t)7;
    uintptr_t at = ((uintptr_t)&mark & ~(uintptr_t)7) - 8;
    for (unsigned zeros = 0; at >= low + 8 && zeros < DEAD_STACK_ZERO_RUN; at -= 8) {
        volatile uint64_t *w = (volatile uint64_t *)at;
        if (*w) { *w = 0; zeros = 0; } else zeros++;
    }
    (void)mark;
}

#endif
