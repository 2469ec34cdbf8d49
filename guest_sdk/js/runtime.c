/*
 * runtime.c - QuickJS-ng as a Torpor guest of ABI v1 (guest_sdk/ABI.md).
 *
 * The JS runtime is an ordinary ABI v1 module: it imports only from `torpor`, exports
 * `torpor_main`, and suspends only inside `tool_call`. What makes it cheap to hibernate is
 * where that call is made: never from inside the interpreter, only from the job loop below
 * once nothing else is runnable. An agent's `await torpor.tool(...)` has then already
 * saved its async frame as a heap object, so the wasm stack at the suspension is just
 * torpor_main -> run_loop -> issue_call, and `torpor build` runs Asyncify on those three
 * functions alone (an only-list), not over the interpreter.
 *
 * Two phases:
 *  - build time: `torpor_js_init(src)` (called once by the builder, then the linear memory
 *    and globals are written back into the module as its pristine image, the idea of Wizer)
 *    creates the runtime and the context, evaluates the `torpor` module and compiles the
 *    agent's module, so a spawn neither parses nor compiles anything;
 *  - run time: `torpor_main` seeds Math.random, evaluates the agent module, calls its
 *    default export and drains the job queue; whenever no job is runnable it makes the
 *    oldest pending tool call (one suspension), settles its promise and drains again.
 *
 * No WASI: the few libc functions that would reach the outside (stdio, clocks) are
 * defined here instead, deterministically, so the module imports nothing but `torpor`.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>

#include "quickjs.h"
#include "no_wasi.h"

#include "runtime_abi.h" /* the torpor imports, the Asyncify buffer, the seed (shared with the other runtime) */

/* How many tool calls may wait at once (Promise.all over thousands of calls): beyond it
 * torpor.tool() rejects with a RangeError the agent can catch. The policy's own limits
 * (max_calls, rates) still decide each call. */
#ifndef TORPOR_JS_MAX_PENDING
#define TORPOR_JS_MAX_PENDING 1024
#endif

static JSRuntime *rt;
static JSContext *ctx;
static JSValue native_obj;   /* __torpor_native: input/output/log/call (+ start, set by torpor.js) */
static JSValue agent_module; /* the compiled, not yet evaluated, agent module */
static int initialized;
static int started;
/* "a.js -> b.js -> a.js" when the agent's modules import each other in a cycle (from the
 * builder): appended to a ReferenceError, the way a cycle goes wrong at run time. */
static char *cycle_note;

/* The agent's seed (`__torpor_seed`, runtime_abi.h): 8 bytes derived from the agent's id,
 * so agents spawned from one image draw different Math.random sequences and a replay draws
 * the same one. Zero (a host that does not write it) means "derive it from the input". */

/* A tool call waiting for its turn. Its name and arguments are QuickJS's own UTF-8 views
 * of the JS strings (JS_ToCStringLen: for an ASCII string, the string itself, held by a
 * reference), not copies: the arguments of a call that sends a whole conversation are
 * then in the heap once, not twice (the JSON text and a C copy), and so in the checkpoint
 * taken while the agent hibernates on the call. */
typedef struct pending_call {
    struct pending_call *next;
    const char *name;
    const char *args;
    size_t name_len, args_len;
    JSValue resolve, reject;
} pending_call;
static pending_call *queue_head, *queue_tail;
static int queue_len;

/* ---- libc without WASI ----------------------------------------------------- */

/* Deterministic clocks: a guest has no clock (ABI.md section 6); real time comes from the
 * journaled `clock.now` tool. Date.now() is therefore 0 unless the agent asks the host.
 * (no_wasi.h sends QuickJS's calls here.) */
int torpor_js_clock_gettime(clockid_t id, struct timespec *ts) { (void)id; ts->tv_sec = 0; ts->tv_nsec = 0; return 0; }
int torpor_js_gettimeofday(struct timeval *tv, void *tz) {
    (void)tz;
    if (tv) { tv->tv_sec = 0; tv->tv_usec = 0; }
    return 0;
}
/* QuickJS's debug dumps: there is no stdout. */
int torpor_js_printf(const char *fmt, ...) { (void)fmt; return 0; }
int torpor_js_fprintf(FILE *f, const char *fmt, ...) { (void)f; (void)fmt; return 0; }
int torpor_js_fputc(int c, FILE *f) { (void)f; return c; }
size_t torpor_js_fwrite(const void *p, size_t size, size_t n, FILE *f) { (void)p; (void)size; (void)f; return n; }

static void say(int level, const char *s, size_t n) {
    if (n > 65536) n = 65536;
    torpor_sys_log(level, s, (int32_t)n);
}

_Noreturn static void fail_oom(size_t n) {
    static const char msg[] = "the JavaScript heap could not grow (memory budget reached)";
    (void)n;
    torpor_sys_abort(1, msg, (int32_t)(sizeof msg - 1));
}

/* QuickJS's allocator and this driver's: guest_sdk/runtime_alloc.h (shared with the Python
 * runtime), which keeps what memory holds after a turn a function of the live blocks
 * (freed blocks zeroed; small ones from pools and mid-size ones from pages, lowest free
 * slot first), and ends the agent as `memory_limit` at once when memory runs out (the only
 * deterministic answer: a half-built object graph cannot be trusted). */
#include "runtime_alloc.h"
_Noreturn static void alloc_failed(size_t n) { fail_oom(n); }

static void *qjs_malloc(void *o, size_t s) { (void)o; return t_malloc(s); }
static void *qjs_calloc(void *o, size_t c, size_t s) { (void)o; return t_calloc(c, s); }
static void qjs_free(void *o, void *p) { (void)o; t_free(p); }
static void *qjs_realloc(void *o, void *p, size_t s) {
    (void)o;
    if (p && !s) { t_free(p); return NULL; }
    return t_realloc(p, s);
}
static size_t qjs_usable(const void *p) { return t_usable(p); }
static const JSMallocFunctions qjs_mf = {qjs_calloc, qjs_malloc, qjs_free, qjs_realloc, qjs_usable};

/* ---- the native functions behind the torpor module ------------------------- */

static JSValue n_input(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val; (void)argc; (void)argv;
    int32_t n = torpor_sys_input_len();
    if (n <= 0) return JS_NewString(c, "");
    char *buf = t_malloc((size_t)n);
    int32_t got = torpor_sys_input_read(buf, n);
    JSValue s = JS_NewStringLen(c, buf, got > 0 ? (size_t)got : 0);
    t_free(buf);
    return s;
}

static JSValue n_output(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    size_t n;
    const char *s = argc > 0 ? JS_ToCStringLen(c, &n, argv[0]) : NULL;
    if (!s) return JS_EXCEPTION;
    int32_t rc = torpor_sys_output_write(s, (int32_t)n);
    JS_FreeCString(c, s);
    if (rc < 0) return JS_ThrowRangeError(c, "torpor.output: the host refused the output (error %d; at most 1 MiB of JSON)", (int)rc);
    return JS_UNDEFINED;
}

static JSValue n_log(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    int32_t level = 1;
    if (argc < 2 || JS_ToInt32(c, &level, argv[0])) return JS_EXCEPTION;
    size_t n;
    const char *s = JS_ToCStringLen(c, &n, argv[1]);
    if (!s) return JS_EXCEPTION;
    say(level, s, n);
    JS_FreeCString(c, s);
    return JS_UNDEFINED;
}

/* native.call(name, argsJson) -> a promise of [code, responseText], settled by run_loop. */
static JSValue n_call(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val;
    if (argc < 2) return JS_ThrowTypeError(c, "call(name, args)");
    if (queue_len >= TORPOR_JS_MAX_PENDING)
        return JS_ThrowRangeError(c, "torpor.tool: more than %d tool calls are waiting at once", TORPOR_JS_MAX_PENDING);
    pending_call *pc = t_calloc(1, sizeof *pc);
    pc->name = JS_ToCStringLen(c, &pc->name_len, argv[0]);
    pc->args = pc->name ? JS_ToCStringLen(c, &pc->args_len, argv[1]) : NULL;
    if (!pc->args) { JS_FreeCString(c, pc->name); t_free(pc); return JS_EXCEPTION; }
    JSValue funcs[2];
    JSValue promise = JS_NewPromiseCapability(c, funcs);
    if (JS_IsException(promise)) { JS_FreeCString(c, pc->name); JS_FreeCString(c, pc->args); t_free(pc); return promise; }
    pc->resolve = funcs[0];
    pc->reject = funcs[1];
    if (queue_tail) queue_tail->next = pc; else queue_head = pc;
    queue_tail = pc;
    queue_len++;
    return promise;
}

/* ---- Math.random with a per-agent seed --------------------------------------- */

static uint64_t rng_state = 1;

static uint64_t xorshift64star(void) {
    uint64_t x = rng_state;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    rng_state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static JSValue n_random(JSContext *c, JSValueConst this_val, int argc, JSValueConst *argv) {
    (void)this_val; (void)argc; (void)argv;
    uint64_t bits = xorshift64star() >> 11; /* 53 bits */
    return JS_NewFloat64(c, (double)bits / 9007199254740992.0);
}

static uint64_t fnv1a(const uint8_t *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 0x100000001b3ULL; }
    return h;
}

/* ---- errors ----------------------------------------------------------------- */

/* Logs `what: message` and the stack of the exception value at error level: the host
 * reports the last error line with `agent_error`. */
static void report(const char *what, JSValueConst exc) {
    const char *msg = JS_ToCString(ctx, exc);
    JSValue stack = JS_IsObject(exc) ? JS_GetPropertyStr(ctx, exc, "stack") : JS_UNDEFINED;
    const char *st = JS_IsString(stack) ? JS_ToCString(ctx, stack) : NULL;
    size_t a = strlen(what), b = msg ? strlen(msg) : 9, s = st ? strlen(st) : 0;
    char *line = malloc(a + b + s + 4);
    if (!line) fail_oom(a + b + s + 4);
    memcpy(line, what, a);
    memcpy(line + a, ": ", 2);
    memcpy(line + a + 2, msg ? msg : "(unknown)", b);
    size_t n = a + 2 + b;
    if (st && s) { line[n++] = '\n'; memcpy(line + n, st, s); n += s; }
    while (n && (line[n - 1] == '\n' || line[n - 1] == ' ')) n--;
    if (cycle_note && msg && !strncmp(msg, "ReferenceError", 14)) {
        /* how an import cycle goes wrong: a binding read before its module's top level ran */
        static const char pre[] = "\n(the agent's modules import each other in a cycle: ";
        static const char post[] = "; a module's top level may have used a binding of one that had not run yet)";
        size_t c = strlen(cycle_note);
        char *longer = realloc(line, n + sizeof pre + c + sizeof post);
        if (!longer) fail_oom(n + sizeof pre + c + sizeof post);
        line = longer;
        memcpy(line + n, pre, sizeof pre - 1); n += sizeof pre - 1;
        memcpy(line + n, cycle_note, c); n += c;
        memcpy(line + n, post, sizeof post - 1); n += sizeof post - 1;
    }
    say(3, line, n);
    free(line);
    if (st) JS_FreeCString(ctx, st);
    if (msg) JS_FreeCString(ctx, msg);
    JS_FreeValue(ctx, stack);
}

static int fail_with_exception(const char *what) {
    JSValue exc = JS_GetException(ctx);
    report(what, exc);
    JS_FreeValue(ctx, exc);
    return 1;
}

static int fail_msg(const char *msg) {
    say(3, msg, strlen(msg));
    return 1;
}

/* ---- modules ------------------------------------------------------------------ */

/* An agent is a graph of ES modules: its own files and packages under node_modules,
 * resolved and read by the builder (host/sandbox/js_modules.py) while torpor_js_init
 * runs. QuickJS's parser finds the imports; for each it asks the builder, through the
 * tool_call import (answered by the builder alone, only during the build), for the
 * resolved name ("build.resolve") and then for that module's source ("build.source").
 * Every module is compiled and linked at build, so a spawn loads nothing. The resolutions
 * stay in the image for `import()` at run time, which can only reach a module the build
 * compiled (a static import somewhere in the agent). */
typedef struct resolution { struct resolution *next; char *base, *spec, *name; } resolution;
static resolution *resolutions;
static int building;
static char *copy_str(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (!d) fail_oom(n + 1);
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

/* Asks the builder `what` about "a\0b"; returns its NUL-terminated answer and the code
 * (negative: the answer is an error message). */
static char *ask_builder(const char *what, const char *a, const char *b, int32_t *code) {
    size_t an = strlen(a), bn = strlen(b);
    char *args = malloc(an + bn + 2);
    if (!args) fail_oom(an + bn + 2);
    memcpy(args, a, an + 1);
    memcpy(args + an + 1, b, bn + 1);
    *code = torpor_sys_tool_call(what, (int32_t)strlen(what), args, (int32_t)(an + bn + 1));
    free(args);
    int32_t n = torpor_sys_response_len();
    char *buf = malloc(n > 0 ? (size_t)n + 1 : 1);
    if (!buf) fail_oom((size_t)n + 1);
    int32_t got = n > 0 ? torpor_sys_response_read(buf, n) : 0;
    buf[got > 0 ? got : 0] = 0;
    return buf;
}

static char *norm_module(JSContext *c, const char *base, const char *name, void *opaque) {
    (void)opaque;
    for (resolution *r = resolutions; r; r = r->next)
        if (!strcmp(r->base, base) && !strcmp(r->spec, name)) return js_strdup(c, r->name);
    if (!building) {
        JS_ThrowReferenceError(c, "cannot import '%s' from %s: only the modules `torpor build` bundled can be imported "
                                  "(import it statically somewhere in the agent)", name, base);
        return NULL;
    }
    int32_t code;
    char *answer = ask_builder("build.resolve", base, name, &code);
    if (code < 0) {
        JS_ThrowReferenceError(c, "%s", answer);
        free(answer);
        return NULL;
    }
    resolution *r = calloc(1, sizeof *r);
    if (!r) fail_oom(sizeof *r);
    r->base = copy_str(base, strlen(base));
    r->spec = copy_str(name, strlen(name));
    r->name = answer;
    r->next = resolutions;
    resolutions = r;
    return js_strdup(c, answer);
}

static JSModuleDef *load_module(JSContext *c, const char *name, void *opaque) {
    (void)opaque;
    if (!building) {
        JS_ThrowReferenceError(c, "cannot load the module '%s' after the build", name);
        return NULL;
    }
    int32_t code;
    char *src = ask_builder("build.source", name, "", &code);
    if (code < 0) {
        JS_ThrowReferenceError(c, "%s", src);
        free(src);
        return NULL;
    }
    JSValue v = JS_Eval(c, src, strlen(src), name, JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
    free(src);
    if (JS_IsException(v)) return NULL;
    JSModuleDef *m = JS_VALUE_GET_PTR(v);
    JS_FreeValue(c, v); /* the context's module list keeps it */
    return m;
}

extern int torpor_qjs_link(JSContext *c, JSValueConst module); /* qjs_link.c */

/* ---- build time ------------------------------------------------------------------- */

extern void __wasm_call_ctors(void);

/* Scratch memory the builder writes the sources into before calling torpor_js_init. */
EXPORT("torpor_js_alloc") void *torpor_js_alloc(int32_t n) { return malloc(n > 0 ? (size_t)n : 1); }

/* Builds the pristine state: runtime, context, the torpor module evaluated, the agent's
 * module compiled (not run). Returns 0, or 1 after logging the error (syntax errors name
 * the file and line). Called once, at build time, never by the host. */
EXPORT("torpor_js_init") int torpor_js_init(const char *lib, int32_t lib_len, const char *entry, int32_t entry_len) {
    if (initialized) return fail_msg("the JavaScript runtime is already initialised");
    __wasm_call_ctors();
    rt = JS_NewRuntime2(&qjs_mf, NULL);
    if (!rt) return fail_msg("cannot create the JavaScript runtime");
    /* Deep recursion runs into the wasm stack (the host's stack_overflow), not a
     * QuickJS limit measured against a C stack that wasm does not have. */
    JS_SetMaxStackSize(rt, 0);
    JS_SetModuleLoaderFunc(rt, norm_module, load_module, NULL);
    ctx = JS_NewContext(rt);
    if (!ctx) return fail_msg("cannot create the JavaScript context");

    JSValue global = JS_GetGlobalObject(ctx);
    native_obj = JS_NewObject(ctx);
    JS_SetPropertyStr(ctx, native_obj, "input", JS_NewCFunction(ctx, n_input, "input", 0));
    JS_SetPropertyStr(ctx, native_obj, "output", JS_NewCFunction(ctx, n_output, "output", 1));
    JS_SetPropertyStr(ctx, native_obj, "log", JS_NewCFunction(ctx, n_log, "log", 2));
    JS_SetPropertyStr(ctx, native_obj, "call", JS_NewCFunction(ctx, n_call, "call", 2));
    JS_SetPropertyStr(ctx, global, "__torpor_native", JS_DupValue(ctx, native_obj));
    JSValue math = JS_GetPropertyStr(ctx, global, "Math");
    JS_SetPropertyStr(ctx, math, "random", JS_NewCFunction(ctx, n_random, "random", 0));
    JS_FreeValue(ctx, math);
    JS_FreeValue(ctx, global);

    JSValue lib_fn = JS_Eval(ctx, lib, (size_t)lib_len, "torpor", JS_EVAL_TYPE_MODULE | JS_EVAL_FLAG_COMPILE_ONLY);
    if (JS_IsException(lib_fn)) return fail_with_exception("the torpor module does not compile");
    JSValue done = JS_EvalFunction(ctx, lib_fn);
    if (JS_IsException(done)) return fail_with_exception("the torpor module failed");
    while (JS_IsJobPending(rt)) {
        JSContext *c;
        if (JS_ExecutePendingJob(rt, &c) < 0) return fail_with_exception("the torpor module failed");
    }
    JS_FreeValue(ctx, done);

    /* The entry and everything it imports, compiled and linked (run: torpor_main). */
    building = 1;
    char *ename = copy_str(entry, (size_t)entry_len);
    JSModuleDef *m = load_module(ctx, ename, NULL);
    free(ename);
    if (!m) { building = 0; return fail_with_exception("compile"); }
    agent_module = JS_DupValue(ctx, JS_MKPTR(JS_TAG_MODULE, m));
    if (JS_ResolveModule(ctx, agent_module) < 0) { building = 0; return fail_with_exception("compile"); }
    if (torpor_qjs_link(ctx, agent_module) < 0) { building = 0; return fail_with_exception("link"); }
    int32_t code;
    char *note = ask_builder("build.cycles", "", "", &code);
    if (code >= 0 && note[0]) cycle_note = note; else free(note);
    building = 0;
    JS_RunGC(rt);
    wipe_dead_stack(); /* the compiler's dead frames are no part of the image */
    initialized = 1;
    return 0;
}

/* ---- run time: the job loop ------------------------------------------------------- */

/* The one place tool_call is made; Asyncify instruments only this, run_loop and
 * torpor_main. */
NOINLINE static int32_t issue_call(pending_call *pc) {
    wipe_dead_stack(); /* the interpreter's dead frames are no part of the checkpoint */
    return torpor_sys_tool_call(pc->name, (int32_t)pc->name_len, pc->args, (int32_t)pc->args_len);
}

static void settle(pending_call *pc, int32_t code) {
    int32_t n = torpor_sys_response_len();
    char *buf = t_malloc(n > 0 ? (size_t)n : 1);
    int32_t got = n > 0 ? torpor_sys_response_read(buf, n) : 0;
    JSValue pair = JS_NewArray(ctx);
    JS_SetPropertyUint32(ctx, pair, 0, JS_NewInt32(ctx, code));
    JS_SetPropertyUint32(ctx, pair, 1, JS_NewStringLen(ctx, buf, got > 0 ? (size_t)got : 0));
    t_free(buf);
    JSValue r = JS_Call(ctx, pc->resolve, JS_UNDEFINED, 1, (JSValueConst *)&pair);
    JS_FreeValue(ctx, r);
    JS_FreeValue(ctx, pair);
    JS_FreeValue(ctx, pc->resolve);
    JS_FreeValue(ctx, pc->reject);
    JS_FreeCString(ctx, pc->name);
    JS_FreeCString(ctx, pc->args);
    t_free(pc);
}

static int drain_jobs(void) {
    while (JS_IsJobPending(rt)) {
        JSContext *c;
        if (JS_ExecutePendingJob(rt, &c) < 0) return fail_with_exception("uncaught exception in a job");
    }
    return 0;
}

NOINLINE static int run_loop(JSValueConst main_promise) {
    for (;;) {
        if (drain_jobs()) return 1;
        JSPromiseStateEnum st = JS_PromiseState(ctx, main_promise);
        if (st == JS_PROMISE_FULFILLED) return 0;
        if (st == JS_PROMISE_REJECTED) {
            JSValue exc = JS_PromiseResult(ctx, main_promise);
            report("Uncaught", exc);
            JS_FreeValue(ctx, exc);
            return 1;
        }
        pending_call *pc = queue_head;
        if (!pc)
            return fail_msg("the agent awaits a promise that nothing will settle (no tool call is pending "
                            "and no job can run): it would wait forever");
        queue_head = pc->next;
        if (!queue_head) queue_tail = NULL;
        queue_len--;
        int32_t code = issue_call(pc); /* the agent may hibernate here */
        settle(pc, code);
    }
}

static void seed_random(void) {
    uint64_t seed = __torpor_seed;
    if (seed == 0) {
        int32_t n = torpor_sys_input_len();
        char *buf = t_malloc(n > 0 ? (size_t)n : 1);
        int32_t got = n > 0 ? torpor_sys_input_read(buf, n) : 0;
        seed = fnv1a((const uint8_t *)buf, got > 0 ? (size_t)got : 0, 0xcbf29ce484222325ULL);
        t_free(buf);
    }
    rng_state = seed ? seed : 1;
}

EXPORT("torpor_main") NOINLINE int torpor_main(void) {
    if (!initialized) return fail_msg("this JavaScript runtime was not initialised by `torpor build`");
    if (started) return fail_msg("torpor_main was entered twice");
    started = 1;
    seed_random();
    JSModuleDef *m = JS_VALUE_GET_PTR(agent_module);
    JSValue evaluated = JS_EvalFunction(ctx, agent_module); /* consumes agent_module */
    agent_module = JS_UNDEFINED;
    if (JS_IsException(evaluated)) return fail_with_exception("Uncaught");
    JSValue ns = JS_GetModuleNamespace(ctx, m);
    if (JS_IsException(ns)) return fail_with_exception("Uncaught");
    JSValue start = JS_GetPropertyStr(ctx, native_obj, "start");
    JSValue args[2] = {evaluated, ns};
    JSValue main_promise = JS_Call(ctx, start, JS_UNDEFINED, 2, (JSValueConst *)args);
    JS_FreeValue(ctx, start);
    JS_FreeValue(ctx, evaluated);
    JS_FreeValue(ctx, ns);
    if (JS_IsException(main_promise)) return fail_with_exception("Uncaught");
    int rc = run_loop(main_promise);
    JS_FreeValue(ctx, main_promise);
    return rc;
}
