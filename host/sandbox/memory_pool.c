/* A recycling allocator of linear memories for Wasmtime's `dense` layout, installed as
 * a host memory creator (wasmtime_config_host_memory_creator_set).
 *
 * Why: with no reservation, no guard pages and no copy-on-write image, Wasmtime maps
 * every linear memory fresh at instantiation and unmaps it when the store is dropped,
 * and a memory.grow maps a new region, copies, and unmaps the old one. Every page the
 * agent (or Wasmtime's data-segment copy, or a restore) then touches costs a page
 * fault, 1-2 us on a VM: resuming a 1 MiB agent spent most of ~210 us faulting. Here
 * memories come from buffers that earlier agents already faulted in: a spawn or a
 * restore of a recently released size touches no fresh page, and growth within a
 * buffer's capacity neither moves nor copies.
 *
 * Isolation: a buffer is scrubbed when it is released, before it can be handed out
 * again, so a new memory reads as zeros except for what Wasmtime copies in (its data
 * segments). At release rather than at reuse because (1) the resume path is the
 * latency-critical one, and a release happens after the agent's checkpoint is taken;
 * (2) the bytes are hot in cache then (a capture has just read them); (3) no agent's
 * bytes ever wait in the pool, where a core dump or a bug could expose them.
 *
 * Scrubbing only what can be dirty: /proc/self/pagemap says, per page, whether it is
 * present or swapped. A private anonymous page that is neither was never written (or
 * was dropped) and reads as zeros, so it is skipped, and stays unfaulted: a recycled
 * buffer's RSS stays what the agents using it really touched. A present page is read
 * first: one that held data is zeroed and kept, one that already reads as zeros is
 * given back to the kernel (see scrub: captures skip absent pages, so a buffer's
 * present pages are what every later capture reads). Without pagemap every accessible
 * byte is checked.
 *
 * Invariant (why a new memory is all zeros): bytes at or beyond a memory's accessible
 * size are never written (in this layout Wasmtime bounds-checks every guest access, and
 * Torpor's host checks its own), so [size, capacity) stays zero during a lifetime, and
 * the scrub (or dropping the pages) makes [0, size) zero at its end.
 *
 * Address space: buffers of up to 8 MiB are carved from 64 MiB arenas, never unmapped
 * one by one. Adjacent anonymous mappings merge into one kernel mapping, which is what
 * lets the `dense` layout hold 100,000 instances under vm.max_map_count; but every
 * munmap between live memories leaves a hole that splits a mapping, and under churn
 * (agents released and resumed in random order) that cost about half a mapping per
 * live memory with per-memory mappings (measured, Wasmtime's own allocation included).
 * Arenas keep it at a few mappings in all. MADV_NOHUGEPAGE on them keeps a small
 * memory's first touch from faulting in a 2 MiB page shared with its neighbours.
 *
 * Bounded: released buffers are kept scrubbed and resident ("hot") while the hot ones
 * hold at most `max_free` resident bytes. Beyond that a buffer's pages are handed back
 * to the kernel (MADV_DONTNEED: RSS drops exactly as with munmap, and the pages read as
 * zeros again) and its address range waits "cold" for reuse: an arena's address space
 * is kept for the pool's life (what stays is address space and page tables, not
 * memory). Buffers above 8 MiB are mapped on their own and unmapped when not kept hot.
 *
 * Thread-safe: one mutex guards the lists and counters; scrubbing, copying, madvise
 * and munmap happen outside it. The pool is reference-counted: the Python handle, the
 * creator held by the Wasmtime config/engine (dropped by its finalizer) and every live
 * memory each hold a reference, so the pool outlives the last of them.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

/* -- Wasmtime C API shapes (wasmtime/config.h), declared here: we do not link it -- */
typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasm_memorytype_t wasm_memorytype_t;
typedef wasmtime_error_t *(*error_new_fn)(const char *message);

typedef struct {
    void *env;
    uint8_t *(*get_memory)(void *env, size_t *byte_size, size_t *byte_capacity);
    wasmtime_error_t *(*grow_memory)(void *env, size_t new_size);
    void (*finalizer)(void *env);
} wasmtime_linear_memory_t;

typedef struct {
    void *env;
    wasmtime_error_t *(*new_memory)(void *env, const wasm_memorytype_t *ty, size_t minimum, size_t maximum,
                                    size_t reserved_size_in_bytes, size_t guard_size_in_bytes,
                                    wasmtime_linear_memory_t *memory_ret);
    void (*finalizer)(void *env);
} wasmtime_memory_creator_t;

/* -- the pool ------------------------------------------------------------------------ */
#define WASM_PAGE ((size_t)65536)
#define NCLASS 48 /* capacities 1, 2, 3, 4, 6, 8, 12, ... wasm pages: up to 2^24 pages */
#define ARENA_BYTES ((size_t)64 << 20)
#define ARENA_MAX_BUFFER ((size_t)8 << 20) /* larger buffers get their own mapping */
#define PM_PRESENT_OR_SWAPPED (3ULL << 62)

/* One buffer; while live, also the Wasmtime linear memory's env (its address is fixed
 * for the memory's lifetime, even when a growth moves the bytes to another buffer). */
typedef struct tp_mem {
    struct tp_pool *pool;
    uint8_t *base;
    size_t cap;      /* usable bytes */
    size_t size;     /* accessible bytes in this lifetime */
    size_t maximum;  /* the memory's maximum in bytes (this lifetime) */
    size_t hw;       /* most bytes ever accessible since last dropped: [hw, cap) untouched */
    size_t resident; /* while hot: resident bytes counted against the cap */
    int in_arena;    /* carved from an arena: never unmapped on its own */
    struct tp_mem *next;
} tp_mem;

typedef struct tp_arena {
    uint8_t *base;
    size_t size;
    struct tp_arena *next;
} tp_arena;

enum {
    ST_LIVE, ST_HOT_BUFFERS, ST_HOT_RESIDENT, ST_HOT_BYTES, ST_MAX_FREE, ST_COLD_BUFFERS, ST_COLD_BYTES,
    ST_ARENAS, ST_ARENA_BYTES, ST_REUSED_HOT, ST_REUSED_COLD, ST_CARVED, ST_MAPPED, ST_UNMAPPED,
    ST_DROPPED, ST_GROW_IN_PLACE, ST_GROW_MOVED, ST_RELEASED, ST_SCRUBBED_BYTES, ST_HINTED, ST_PAGEMAP,
    ST_COUNT
};

typedef struct tp_pool {
    pthread_mutex_t lock;
    tp_mem *hot[NCLASS];  /* scrubbed, resident */
    tp_mem *cold[NCLASS]; /* pages handed back, address range kept (arena buffers only) */
    tp_arena *arenas;
    uint8_t *bump;        /* the unused tail of the newest arena */
    size_t bump_left;
    size_t max_free;      /* resident bytes the hot buffers may hold */
    size_t hot_resident, hot_bytes, nhot, cold_bytes, ncold, narenas, arena_bytes;
    uint64_t refs, live;
    uint64_t reused_hot, reused_cold, carved, mapped, unmapped, dropped, grow_in_place, grow_moved, released,
        scrubbed, hinted;
    int pagemap_fd;
    pid_t pagemap_pid; /* /proc/self at open: a forked child must not read its parent's */
    size_t page;
    error_new_fn error_new;
    uint64_t *on_destroy;
} tp_pool;

/* A capacity hint for the next memory this thread creates in `hint_pool` (a restore
 * knows the snapshot's size before it instantiates). Consumed by that memory. */
static _Thread_local tp_pool *hint_pool;
static _Thread_local size_t hint_bytes;

static size_t class_pages(int c) {
    /* 1, 2, 3, 4, 6, 8, 12, 16, ...: powers of two and 1.5x them (at most 1/3 unused) */
    if (c < 2) return (size_t)c + 1;
    size_t p = (size_t)1 << (c / 2);
    return c % 2 ? p + p / 2 : p;
}

static int class_of(size_t bytes) {
    size_t pages = bytes / WASM_PAGE + (bytes % WASM_PAGE != 0);
    for (int c = 0; c < NCLASS; c++)
        if (class_pages(c) >= pages) return c;
    return -1; /* too large to pool: mapped exactly, unmapped at release */
}

/* The largest class that fits in `bytes`, or -1. */
static int class_within(size_t bytes) {
    int best = -1;
    for (int c = 0; c < NCLASS && class_pages(c) * WASM_PAGE <= bytes; c++) best = c;
    return best;
}

static void pool_unref(tp_pool *p);

static wasmtime_error_t *fail(tp_pool *p, const char *msg) {
    return p->error_new ? p->error_new(msg) : NULL;
}

static void push_cold_locked(tp_pool *p, tp_mem *m, int c) {
    m->resident = 0;
    m->hw = 0;
    m->next = p->cold[c];
    p->cold[c] = m;
    p->cold_bytes += m->cap;
    p->ncold++;
}

/* A new arena-carved buffer of class `c`, or NULL (lock held). The tail of an arena too
 * short for the request is cut into cold buffers of smaller classes, not wasted. */
static tp_mem *carve_locked(tp_pool *p, int c) {
    size_t cap = class_pages(c) * WASM_PAGE;
    if (p->bump_left < cap) {
        void *base = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                          -1, 0);
        if (base == MAP_FAILED) return NULL;
        tp_arena *a = (tp_arena *)calloc(1, sizeof *a);
        if (!a) {
            munmap(base, ARENA_BYTES);
            return NULL;
        }
#ifdef MADV_NOHUGEPAGE
        madvise(base, ARENA_BYTES, MADV_NOHUGEPAGE);
#endif
        while (p->bump_left >= WASM_PAGE) {
            int k = class_within(p->bump_left);
            tp_mem *t = (tp_mem *)calloc(1, sizeof *t);
            if (!t) break;
            t->pool = p;
            t->base = p->bump;
            t->cap = class_pages(k) * WASM_PAGE;
            t->in_arena = 1;
            p->bump += t->cap;
            p->bump_left -= t->cap;
            push_cold_locked(p, t, k);
        }
        a->base = (uint8_t *)base;
        a->size = ARENA_BYTES;
        a->next = p->arenas;
        p->arenas = a;
        p->narenas++;
        p->arena_bytes += ARENA_BYTES;
        p->bump = a->base;
        p->bump_left = ARENA_BYTES;
    }
    tp_mem *m = (tp_mem *)calloc(1, sizeof *m);
    if (!m) return NULL;
    m->pool = p;
    m->base = p->bump;
    m->cap = cap;
    m->in_arena = 1;
    p->bump += cap;
    p->bump_left -= cap;
    p->carved++;
    return m;
}

/* A zeroed buffer able to hold `want` bytes: a hot one of its class if any (already
 * faulted in), else a cold one, else new. NULL when the kernel refuses. */
static tp_mem *take_buffer(tp_pool *p, size_t want) {
    int c = class_of(want);
    size_t cap = c >= 0 ? class_pages(c) * WASM_PAGE : want;
    tp_mem *m = NULL;
    pthread_mutex_lock(&p->lock);
    if (c >= 0 && (m = p->hot[c]) != NULL) {
        p->hot[c] = m->next;
        p->hot_resident -= m->resident;
        p->hot_bytes -= m->cap;
        p->nhot--;
        p->reused_hot++;
    } else if (c >= 0 && (m = p->cold[c]) != NULL) {
        p->cold[c] = m->next;
        p->cold_bytes -= m->cap;
        p->ncold--;
        p->reused_cold++;
    } else if (c >= 0 && cap <= ARENA_MAX_BUFFER) {
        m = carve_locked(p, c);
    }
    pthread_mutex_unlock(&p->lock);
    if (m) {
        m->next = NULL;
        return m;
    }
    if (cap <= ARENA_MAX_BUFFER && c >= 0) return NULL; /* the arena could not be mapped */
    m = (tp_mem *)calloc(1, sizeof *m);
    if (!m) return NULL;
    void *base = mmap(NULL, cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        free(m);
        return NULL;
    }
    m->pool = p;
    m->base = (uint8_t *)base;
    m->cap = cap;
    pthread_mutex_lock(&p->lock);
    p->mapped++;
    pthread_mutex_unlock(&p->lock);
    return m;
}

/* Zero [0, n) of one page unless it already reads as zeros: reading first leaves zero
 * pages (the kernel's shared one included) unwritten. Returns the bytes written. */
static size_t zero_if_dirty(uint8_t *p, size_t n) {
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, 64);
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) break;
    }
    if (i + 64 > n) {
        uint8_t acc = 0;
        for (size_t k = i; k < n; k++) acc |= p[k];
        if (!acc) return 0;
    }
    memset(p + i, 0, n - i);
    return n - i;
}

/* Give the pages [from, to) of a buffer back to the kernel; they read as zeros. Returns
 * the bytes that stay resident: none, or all of them if the kernel refuses (they are
 * zero already, so the buffer is correct either way). */
static size_t drop_pages(tp_mem *m, size_t page, size_t from, size_t to, size_t present) {
    if (from >= to) return 0;
    if (madvise(m->base + from * page, (to - from) * page, MADV_DONTNEED) == 0) return 0;
    return present * page;
}

/* Scrub a released buffer: zero what may be dirty in [0, size), and return the resident
 * bytes in [0, hw) (hw itself, an upper bound, where pagemap cannot tell). *written
 * gets the bytes zeroed.
 *
 * A present page that already reads as zeros is given back rather than kept: the agent
 * that used the buffer faulted it in without leaving data in it (a read, a full-memory
 * restore of zeros, an earlier, larger lifetime). Kept, it would make every later
 * capture of whoever gets this buffer read it, since a capture skips only pages the
 * kernel reports absent (a 1 MiB memory: ~13 present pages read instead of 224). A page
 * that held data stays, zeroed: the next agent of this size most likely writes there
 * too, and a fault costs more than the zeroing. */
static size_t scrub(tp_pool *p, tp_mem *m, size_t *written) {
    size_t page = p->page, resident = 0, w = 0;
    size_t npages = (m->hw + page - 1) / page;
    uintptr_t first = (uintptr_t)m->base / page;
    size_t i = 0;
    if (p->pagemap_fd >= 0 && getpid() == p->pagemap_pid) {
        uint64_t ent[512];
        /* The run of pages to give back: [run_from, run_to), run_present of them present
         * (absent pages inside it cost nothing and spare a madvise call per gap). */
        size_t run_from = 0, run_to = 0, run_present = 0;
        while (i < npages) {
            size_t n = npages - i < 512 ? npages - i : 512;
            ssize_t got = pread(p->pagemap_fd, ent, n * 8, (off_t)((first + i) * 8));
            if (got != (ssize_t)(n * 8)) break; /* check every byte from here on, below */
            for (size_t k = 0; k < n; k++) {
                if (!(ent[k] & PM_PRESENT_OR_SWAPPED)) continue;
                size_t pg = i + k, off = pg * page;
                /* Past `size` the invariant holds: zeros. */
                size_t z = off < m->size ? zero_if_dirty(m->base + off, m->size - off < page ? m->size - off : page) : 0;
                if (z) { /* kept: the run to give back ends before it */
                    w += z;
                    resident += page;
                    if (run_present) resident += drop_pages(m, page, run_from, run_to, run_present);
                    run_present = 0;
                    continue;
                }
                if (run_present == 0) run_from = pg;
                run_to = pg + 1;
                run_present++;
                if (run_to - run_from >= 4096) { /* bound the run: madvise in 16 MiB steps */
                    resident += drop_pages(m, page, run_from, run_to, run_present);
                    run_present = 0;
                }
            }
            i += n;
        }
        if (run_present) resident += drop_pages(m, page, run_from, run_to, run_present);
    }
    for (size_t off = i * page; off < m->size; off += page)
        w += zero_if_dirty(m->base + off, m->size - off < page ? m->size - off : page);
    if (i < npages) resident += m->hw - i * page;
    *written = w;
    return resident;
}

/* Hand a buffer's pages back to the kernel and keep its address range cold, or unmap a
 * buffer of its own. Lock not held. */
static void drop_buffer(tp_pool *p, tp_mem *m) {
    if (!m->in_arena) {
        munmap(m->base, m->cap);
        free(m);
        pthread_mutex_lock(&p->lock);
        p->unmapped++;
        pthread_mutex_unlock(&p->lock);
        return;
    }
    /* [hw, cap) was never touched since it was last dropped. If the kernel refuses,
     * zero by hand: the range must read as zeros before it is reused. */
    if (m->hw && madvise(m->base, m->hw, MADV_DONTNEED) != 0) memset(m->base, 0, m->hw);
    pthread_mutex_lock(&p->lock);
    p->dropped++;
    push_cold_locked(p, m, class_of(m->cap));
    pthread_mutex_unlock(&p->lock);
}

/* The end of a lifetime: keep the buffer hot (scrubbed) while the cap allows, else drop
 * it. Does not touch the pool's reference count. */
static void release_buffer(tp_pool *p, tp_mem *m) {
    int c = class_of(m->cap);
    int poolable = c >= 0 && class_pages(c) * WASM_PAGE == m->cap;
    /* Racy early look (checked again under the lock): a full pool does not scrub. */
    int hot = poolable &&
              __atomic_load_n(&p->hot_resident, __ATOMIC_RELAXED) < __atomic_load_n(&p->max_free, __ATOMIC_RELAXED);
    size_t written = 0, resident = 0;
    if (hot) resident = scrub(p, m, &written);
    m->size = 0;
    pthread_mutex_lock(&p->lock);
    p->released++;
    p->scrubbed += written;
    /* At least a page each: the cap also bounds how many buffers wait hot. */
    if (resident < p->page) resident = p->page;
    if (hot && p->hot_resident + resident <= p->max_free) {
        m->resident = resident;
        m->next = p->hot[c];
        p->hot[c] = m;
        p->hot_resident += resident;
        p->hot_bytes += m->cap;
        p->nhot++;
        pthread_mutex_unlock(&p->lock);
        return;
    }
    pthread_mutex_unlock(&p->lock);
    drop_buffer(p, m);
}

/* -- the Wasmtime callbacks ------------------------------------------------------------ */
static uint8_t *mem_get(void *env, size_t *byte_size, size_t *byte_capacity) {
    tp_mem *m = (tp_mem *)env;
    *byte_size = m->size;
    *byte_capacity = m->cap;
    return m->base;
}

static wasmtime_error_t *mem_grow(void *env, size_t new_size) {
    tp_mem *m = (tp_mem *)env;
    tp_pool *p = m->pool;
    if (new_size <= m->size) return NULL;
    if (new_size > m->maximum) return fail(p, "torpor memory pool: growth past the memory's maximum");
    if (new_size <= m->cap) { /* in place: [size, new_size) is already zero */
        m->size = new_size;
        if (new_size > m->hw) m->hw = new_size;
        pthread_mutex_lock(&p->lock);
        p->grow_in_place++;
        pthread_mutex_unlock(&p->lock);
        return NULL;
    }
    /* Move to a bigger buffer, with room to double, so that a growing agent moves only
     * a logarithmic number of times. */
    size_t want = m->cap > SIZE_MAX / 2 ? new_size : 2 * m->cap;
    if (want < new_size) want = new_size;
    if (want > m->maximum) want = m->maximum;
    tp_mem *n = take_buffer(p, want);
    if (!n) return fail(p, "torpor memory pool: cannot map memory to grow into");
    memcpy(n->base, m->base, m->size);
    /* m keeps its identity (Wasmtime holds it) and takes n's buffer; n carries the old
     * buffer, with this lifetime's size, to release. */
    tp_mem old = *m;
    m->base = n->base;
    m->cap = n->cap;
    m->hw = n->hw;
    m->in_arena = n->in_arena;
    n->base = old.base;
    n->cap = old.cap;
    n->hw = old.hw;
    n->in_arena = old.in_arena;
    n->size = old.size;
    m->size = new_size;
    if (new_size > m->hw) m->hw = new_size;
    pthread_mutex_lock(&p->lock);
    p->grow_moved++;
    pthread_mutex_unlock(&p->lock);
    release_buffer(p, n);
    return NULL;
}

static void mem_finalize(void *env) {
    tp_mem *m = (tp_mem *)env;
    tp_pool *p = m->pool;
    release_buffer(p, m);
    pthread_mutex_lock(&p->lock);
    p->live--;
    pthread_mutex_unlock(&p->lock);
    pool_unref(p);
}

static wasmtime_error_t *pool_new_memory(void *env, const wasm_memorytype_t *ty, size_t minimum, size_t maximum,
                                         size_t reserved, size_t guard, wasmtime_linear_memory_t *ret) {
    (void)ty;
    tp_pool *p = (tp_pool *)env;
    size_t want = minimum;
    if (hint_pool == p) {
        if (hint_bytes > want) want = hint_bytes < maximum ? hint_bytes : maximum;
        hint_pool = NULL;
        hint_bytes = 0;
    }
    if (guard != 0 || reserved != 0)
        /* JIT code would elide bounds checks against guard pages we do not provide. */
        return fail(p, "torpor memory pool: needs memory_reservation=0 and memory_guard_size=0");
    if (want < minimum) want = minimum;
    tp_mem *m = take_buffer(p, want);
    if (!m) return fail(p, "torpor memory pool: cannot map a linear memory");
    m->size = minimum;
    m->maximum = maximum;
    if (minimum > m->hw) m->hw = minimum;
    pthread_mutex_lock(&p->lock);
    p->refs++;
    p->live++;
    if (want > minimum) p->hinted++;
    pthread_mutex_unlock(&p->lock);
    ret->env = m;
    ret->get_memory = mem_get;
    ret->grow_memory = mem_grow;
    ret->finalizer = mem_finalize;
    return NULL;
}

/* -- lifetime --------------------------------------------------------------------------- */
static void free_list(tp_mem *m) {
    while (m) {
        tp_mem *next = m->next;
        if (!m->in_arena) munmap(m->base, m->cap);
        free(m);
        m = next;
    }
}

static void pool_destroy(tp_pool *p) {
    for (int c = 0; c < NCLASS; c++) {
        free_list(p->hot[c]);
        free_list(p->cold[c]);
    }
    while (p->arenas) {
        tp_arena *next = p->arenas->next;
        munmap(p->arenas->base, p->arenas->size);
        free(p->arenas);
        p->arenas = next;
    }
    if (p->pagemap_fd >= 0) close(p->pagemap_fd);
    pthread_mutex_destroy(&p->lock);
    if (p->on_destroy) __atomic_store_n(p->on_destroy, 1, __ATOMIC_RELAXED);
    free(p);
}

static void pool_unref(tp_pool *p) {
    pthread_mutex_lock(&p->lock);
    uint64_t left = --p->refs;
    pthread_mutex_unlock(&p->lock);
    if (left == 0) pool_destroy(p);
}

static void creator_finalize(void *env) { pool_unref((tp_pool *)env); }

/* /proc/self/pagemap, opened, if it tells the truth: a page just written must read as
 * present. A sandbox that emulates the file with zeros would otherwise make the scrub
 * skip dirty pages. -1 when unavailable or untrustworthy (then every byte is checked). */
static int open_pagemap(size_t page) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    uint8_t *probe = (uint8_t *)mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int ok = 0;
    if (probe != MAP_FAILED) {
        *(volatile uint8_t *)probe = 1;
        uint64_t ent = 0;
        ok = pread(fd, &ent, 8, (off_t)((uintptr_t)probe / page * 8)) == 8 && (ent & PM_PRESENT_OR_SWAPPED);
        munmap(probe, page);
    }
    if (!ok) {
        close(fd);
        return -1;
    }
    return fd;
}

/* -- the API called from host/sandbox/memory_pool.py ------------------------------------------- */

/* A pool keeping at most `max_free` resident bytes of hot buffers; `error_new` is
 * Wasmtime's wasmtime_error_new. The caller holds one reference (tp_pool_unref). */
void *tp_pool_new(size_t max_free, void *error_new) {
    tp_pool *p = (tp_pool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        free(p);
        return NULL;
    }
    p->max_free = max_free;
    p->refs = 1;
    p->error_new = (error_new_fn)error_new;
    long page = sysconf(_SC_PAGESIZE);
    p->page = page > 0 ? (size_t)page : 4096;
    p->pagemap_fd = open_pagemap(p->page);
    p->pagemap_pid = getpid();
    return p;
}

/* Fill a wasmtime_memory_creator_t for wasmtime_config_host_memory_creator_set. The
 * creator holds a reference, dropped by its finalizer when Wasmtime drops the config
 * or the engine. */
void tp_pool_creator(void *pool, wasmtime_memory_creator_t *out) {
    tp_pool *p = (tp_pool *)pool;
    pthread_mutex_lock(&p->lock);
    p->refs++;
    pthread_mutex_unlock(&p->lock);
    out->env = p;
    out->new_memory = pool_new_memory;
    out->finalizer = creator_finalize;
}

void tp_pool_unref(void *pool) { pool_unref((tp_pool *)pool); }

/* The next memory this thread creates in this pool gets room for `bytes`. */
void tp_pool_hint(void *pool, size_t bytes) {
    hint_pool = (tp_pool *)pool;
    hint_bytes = bytes;
}

/* Keep at most `max_free` resident bytes of hot buffers from now on; the excess is
 * dropped now, largest classes first (0 drops every hot buffer). */
void tp_pool_set_max_free(void *pool, size_t max_free) {
    tp_pool *p = (tp_pool *)pool;
    tp_mem *drop = NULL;
    pthread_mutex_lock(&p->lock);
    p->max_free = max_free;
    for (int c = NCLASS - 1; c >= 0; c--) {
        while (p->hot[c] && p->hot_resident > max_free) {
            tp_mem *m = p->hot[c];
            p->hot[c] = m->next;
            p->hot_resident -= m->resident;
            p->hot_bytes -= m->cap;
            p->nhot--;
            m->next = drop;
            drop = m;
        }
    }
    pthread_mutex_unlock(&p->lock);
    while (drop) {
        tp_mem *next = drop->next;
        drop_buffer(p, drop);
        drop = next;
    }
}

/* Set *flag to 1 when the pool is freed (for the tests: the finalizers really run). The
 * flag must outlive the pool. */
void tp_pool_watch(void *pool, uint64_t *flag) {
    tp_pool *p = (tp_pool *)pool;
    pthread_mutex_lock(&p->lock);
    p->on_destroy = flag;
    pthread_mutex_unlock(&p->lock);
}

/* Counters, in the order of the ST_* enum; returns how many were written. */
size_t tp_pool_stats(void *pool, uint64_t *out, size_t n) {
    tp_pool *p = (tp_pool *)pool;
    uint64_t v[ST_COUNT];
    pthread_mutex_lock(&p->lock);
    v[ST_LIVE] = p->live;
    v[ST_HOT_BUFFERS] = p->nhot;
    v[ST_HOT_RESIDENT] = p->hot_resident;
    v[ST_HOT_BYTES] = p->hot_bytes;
    v[ST_MAX_FREE] = p->max_free;
    v[ST_COLD_BUFFERS] = p->ncold;
    v[ST_COLD_BYTES] = p->cold_bytes;
    v[ST_ARENAS] = p->narenas;
    v[ST_ARENA_BYTES] = p->arena_bytes;
    v[ST_REUSED_HOT] = p->reused_hot;
    v[ST_REUSED_COLD] = p->reused_cold;
    v[ST_CARVED] = p->carved;
    v[ST_MAPPED] = p->mapped;
    v[ST_UNMAPPED] = p->unmapped;
    v[ST_DROPPED] = p->dropped;
    v[ST_GROW_IN_PLACE] = p->grow_in_place;
    v[ST_GROW_MOVED] = p->grow_moved;
    v[ST_RELEASED] = p->released;
    v[ST_SCRUBBED_BYTES] = p->scrubbed;
    v[ST_HINTED] = p->hinted;
    v[ST_PAGEMAP] = p->pagemap_fd >= 0;
    pthread_mutex_unlock(&p->lock);
    if (n > ST_COUNT) n = ST_COUNT;
    memcpy(out, v, n * sizeof *out);
    return n;
}
