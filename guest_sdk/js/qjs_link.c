/*
 * qjs_link.c - QuickJS-ng's engine with one entry point added: linking a module at build.
 *
 * Compiled in place of quickjs.c (it includes it whole) because the engine links a module
 * only inside JS_EvalFunction, i.e. when it also evaluates it. `torpor build` links the
 * agent's module graph without running any of it, so an import of a name a module does not
 * export, or an `export *` that resolves in a circle, is a build error naming the module,
 * and the linked environments are part of the pristine image (a spawn does not link).
 */
/* Every allocation through the runtime's JSMallocFunctions (runtime.c: the pools and pages
 * of guest_sdk/runtime_alloc.h), none through QuickJS's own arena of small blocks: that one
 * keeps a LIFO free list threaded through freed blocks, which it does not zero, so the
 * objects a turn made and dropped left their contents and a link that changes every turn
 * scattered over the heap, and every checkpoint re-stored the chunks around them (a third
 * of what a turn of a conversation stored). QuickJS-ng takes the per-block path when built
 * for AddressSanitizer; that is the only thing the macro changes in its sources (dtoa.c's
 * one use is disabled). */
#define __SANITIZE_ADDRESS__ 1
#include "quickjs.c"

int torpor_qjs_link(JSContext *ctx, JSValueConst module) {
    if (JS_VALUE_GET_TAG(module) != JS_TAG_MODULE) return -1;
    JSModuleDef *m = JS_VALUE_GET_PTR(module);
    if (js_create_module_function(ctx, m) < 0) return -1;
    return js_link_module(ctx, m);
}
