/* The allocator pieces the JavaScript and Python runtimes share (guest_sdk/js/runtime.c,
 * guest_sdk/python/runtime.c): zeroing what is freed, and the mid-size page allocator.
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
 * cache keys (host/sandbox/guest_runtime_build.py: SHARED_HEADERS), so a change here
 * rebuilds both. The includer defines, before including it:
 * - MID_MIN: the smallest request served here (the Python runtime's small-object pools
 *   serve what is below);
 * - mid_region_failed(): what m_malloc returns when libc has no region for new pages
 *   (NULL: the caller falls back to libc; or a call that ends the agent as memory_limit).
 * Included once, by the runtime's one translation unit. */
#ifndef TORPOR_RUNTIME_ALLOC_H
#define TORPOR_RUNTIME_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef MID_MIN
#error "define MID_MIN (the smallest block the page allocator serves) before including runtime_alloc.h"
#endif

extern size_t malloc_usable_size(void *);

/* A freed libc block of this many bytes or more is zeroed (smaller ones are the
 * interpreters' own objects, reused in place). */
#define ZERO_FREED_MIN 256
/* Through a volatile pointer: a memset the compiler sees followed by free() is a dead
 * store it deletes (it did: the "zeroed" garbage stayed). */
static void *(*volatile wipe)(void *, int, size_t) = memset;

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

static void *mid_region_failed(void);

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
        if (!r) return mid_region_failed();
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
    wipe(p, 0, mid_sizes[c]);
    for (uint32_t i = 0; i < mid_count[c]; i++)
        if (mid_pages[c][i] == pg) { mid_bits[c][i] &= ~(1u << ((uint32_t)((uint8_t *)p - pg) / mid_sizes[c])); return; }
}

/* Whether the mid block p can hold n bytes in place (n in its class's upper half): then
 * what the shrink gives back is zeroed, so a freed tail holds nothing. Otherwise the
 * caller moves the block (its allocator, then m_free). */
static int m_resize_in_place(void *p, size_t n) {
    size_t size = mid_size(p);
    if (n > size || n <= size / 2) return 0;
    if (n < size) wipe((uint8_t *)p + n, 0, size - n);
    return 1;
}

#endif
