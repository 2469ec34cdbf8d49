/* The ABI declarations the JavaScript and Python runtimes share (guest_sdk/js/runtime.c,
 * guest_sdk/python/runtime.c): the `torpor` imports of ABI.md, the export attributes, the
 * Asyncify buffer of ABI.md section 7 and the agent's seed of section 6.
 *
 * One header so that the two runtimes cannot drift apart; both builds hash it into their
 * cache keys (host/sandbox/js_runtime.py, py_runtime.py: runtime_key), so a change here
 * rebuilds both. Included once, by the runtime's one translation unit (it defines the
 * buffer and the seed). */
#ifndef TORPOR_RUNTIME_ABI_H
#define TORPOR_RUNTIME_ABI_H

#include <stdint.h>

#define IMPORT(n) __attribute__((import_module("torpor"), import_name(n)))
IMPORT("input_len")     int32_t torpor_sys_input_len(void);
IMPORT("input_read")    int32_t torpor_sys_input_read(void *ptr, int32_t cap);
IMPORT("output_write")  int32_t torpor_sys_output_write(const void *ptr, int32_t len);
IMPORT("log")           int32_t torpor_sys_log(int32_t level, const void *ptr, int32_t len);
IMPORT("tool_call")     int32_t torpor_sys_tool_call(const void *name, int32_t name_len,
                                                     const void *args, int32_t args_len);
IMPORT("response_len")  int32_t torpor_sys_response_len(void);
IMPORT("response_read") int32_t torpor_sys_response_read(void *ptr, int32_t cap);
IMPORT("abort") _Noreturn void torpor_sys_abort(int32_t kind, const void *msg, int32_t len);

#define EXPORT(n) __attribute__((export_name(n)))
#define NOINLINE __attribute__((noinline))

/* The Asyncify buffer of ABI.md section 7 (only a few small frames are ever saved). */
#ifndef TORPOR_ASYNC_STACK
#define TORPOR_ASYNC_STACK 4096
#endif
struct torpor_async_buf { uint8_t *cur; uint8_t *end; uint8_t data[TORPOR_ASYNC_STACK]; };
__attribute__((used)) struct torpor_async_buf __torpor_async = {
    __torpor_async.data, __torpor_async.data + TORPOR_ASYNC_STACK};

/* The agent's seed (ABI.md section 6): written by the host before torpor_main first runs
 * (exported by the link, --export). */
__attribute__((used)) uint64_t __torpor_seed;

#endif
