/*
 * torpor.h - the C guest SDK of Torpor (guest ABI v1, see guest_sdk/ABI.md).
 *
 * Freestanding: no libc. The SDK runtime (torpor.c) provides what it needs:
 * memcpy/memset/memmove/memcmp/strlen/strcmp, an allocator over memory.grow,
 * a JSON parser (small DOM), a JSON builder and printf-style formatting,
 * input/output/log helpers and tool calls with structured errors.
 *
 * A complete agent:
 *
 *     #include "torpor.h"
 *
 *     int torpor_main(void) {
 *         const char *name = torpor_json_str(torpor_json_get(torpor_input(), "name"));
 *         if (!name) return torpor_fail("input needs a string \"name\"");
 *         int64_t n = torpor_kv_incr("greetings", 1, NULL);
 *         return torpor_outputf("{\"greeting\": \"hello, %S\", \"count\": %lld}", name, n);
 *     }
 *
 * Build (what `torpor build` runs):
 *   python -m ziglang cc --target=wasm32-freestanding -O2 -nostdlib -ffreestanding \
 *     -I guest_sdk/c -Wl,--no-entry -Wl,--export-dynamic -Wl,-z,stack-size=65536 \
 *     -Wl,--export=__torpor_async -o agent.wasm guest_sdk/c/torpor.c agent.c
 *
 * Conventions:
 *  - Every accessor accepts NULL and answers "missing" (NULL / 0 / false), so
 *    lookups chain: torpor_json_int(torpor_json_path(in, "order.0.qty")).
 *  - Functions returning `char *` or a non-const `torpor_json *` hand ownership
 *    to the caller (torpor_free / torpor_json_free). `const` results are borrowed.
 *  - Out of memory never returns NULL: it aborts the agent (host: memory_limit).
 *  - Programming errors (a bad format conversion, a freed pointer freed again)
 *    panic: the agent fails with error code `aborted` and the message.
 *  - All state lives in linear memory, so it survives hibernation at a tool call.
 */
#ifndef TORPOR_H
#define TORPOR_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TORPOR_ABI_VERSION 1

/* Size of the Asyncify unwind buffer (bytes of saved wasm locals/call frames). */
#ifndef TORPOR_ASYNC_STACK
#define TORPOR_ASYNC_STACK 16384
#endif
/* Maximum nesting depth accepted by the JSON parser and builder. */
#ifndef TORPOR_JSON_MAX_DEPTH
#define TORPOR_JSON_MAX_DEPTH 64
#endif

/* ------------------------------------------------------------------------- */
/* Error codes (negative i32 results of the host imports; ABI.md section 5).  */
/* ------------------------------------------------------------------------- */
#define TORPOR_OK                  0
#define TORPOR_E_FAULT            -1  /* "fault": bad pointer/length */
#define TORPOR_E_INVALID_JSON     -2  /* "invalid_json" */
#define TORPOR_E_TOO_LARGE        -3  /* "too_large": a limit was exceeded */
#define TORPOR_E_UNKNOWN_TOOL     -4  /* "unknown_tool": granted, but no such tool on the host */
#define TORPOR_E_INVALID_ARGS     -5  /* "invalid_args": arguments failed validation */
#define TORPOR_E_TOOL_FAILED      -6  /* "tool_failed": the tool raised */
#define TORPOR_E_DENIED           -7  /* "denied": not granted, or a policy rule refused */
#define TORPOR_E_RESULT_TOO_LARGE -8  /* "result_too_large" */
#define TORPOR_E_RATE_LIMITED     -9  /* "rate_limited" */
#define TORPOR_E_TIMEOUT         -10  /* "timeout" */
#define TORPOR_E_UNAVAILABLE     -11  /* "unavailable" */

/* Limits of ABI v1. */
#define TORPOR_MAX_TOOL_NAME   128
#define TORPOR_MAX_ARGS        (1u << 20)
#define TORPOR_MAX_RESPONSE    (1u << 20)
#define TORPOR_MAX_OUTPUT      (1u << 20)
#define TORPOR_MAX_LOG         (1u << 16)

/* Log levels. */
#define TORPOR_DEBUG 0
#define TORPOR_INFO  1
#define TORPOR_WARN  2
#define TORPOR_ERROR 3

/* abort() kinds. */
#define TORPOR_ABORT_PANIC 0
#define TORPOR_ABORT_OOM   1

/* ------------------------------------------------------------------------- */
/* Raw host imports (module "torpor"). Prefer the wrappers below; these are   */
/* here for completeness and for tests that probe the host.                   */
/* ------------------------------------------------------------------------- */
#define TORPOR_IMPORT(n) __attribute__((import_module("torpor"), import_name(n)))

TORPOR_IMPORT("input_len")     int32_t torpor_sys_input_len(void);
TORPOR_IMPORT("input_read")    int32_t torpor_sys_input_read(void *ptr, int32_t cap);
TORPOR_IMPORT("output_write")  int32_t torpor_sys_output_write(const void *ptr, int32_t len);
TORPOR_IMPORT("log")           int32_t torpor_sys_log(int32_t level, const void *ptr, int32_t len);
TORPOR_IMPORT("tool_call")     int32_t torpor_sys_tool_call(const void *name, int32_t name_len,
                                                            const void *args, int32_t args_len);
TORPOR_IMPORT("response_len")  int32_t torpor_sys_response_len(void);
TORPOR_IMPORT("response_read") int32_t torpor_sys_response_read(void *ptr, int32_t cap);
TORPOR_IMPORT("abort") _Noreturn void torpor_sys_abort(int32_t kind, const void *msg, int32_t len);

/* ------------------------------------------------------------------------- */
/* Entry point. Define it in your agent; return 0 for success, anything else  */
/* reports failure (error code `agent_error`). The declaration exports it.    */
/* ------------------------------------------------------------------------- */
__attribute__((export_name("torpor_main"))) int torpor_main(void);

#pragma GCC visibility push(hidden)

/* ------------------------------------------------------------------------- */
/* Memory: C basics and the allocator                                         */
/* ------------------------------------------------------------------------- */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* 8-byte aligned blocks from a size-class allocator over memory.grow.
 * Never returns NULL for n > 0: on exhaustion the agent aborts (memory_limit).
 * torpor_alloc(0) returns a unique minimal block. torpor_realloc(p, 0) frees p
 * and returns NULL. Freeing a pointer that is not a live block panics. */
void *torpor_alloc(size_t n);
void *torpor_calloc(size_t count, size_t size);
void *torpor_realloc(void *p, size_t n);
void torpor_free(void *p);
char *torpor_strdup(const char *s);
char *torpor_strndup(const char *s, size_t n); /* copies n bytes (may hold NULs) + NUL */
bool torpor_streq(const char *a, const char *b); /* NULL-safe; NULL == NULL */
size_t torpor_heap_used(void);     /* bytes held by live blocks (incl. headers) */
size_t torpor_heap_reserved(void); /* bytes the allocator took from the host */

/* ------------------------------------------------------------------------- */
/* JSON DOM (parse, read)                                                     */
/* ------------------------------------------------------------------------- */
typedef enum {
    TORPOR_JSON_MISSING = 0, /* what torpor_json_type(NULL) answers */
    TORPOR_JSON_NULL,
    TORPOR_JSON_BOOL,
    TORPOR_JSON_NUMBER,
    TORPOR_JSON_STRING,
    TORPOR_JSON_ARRAY,
    TORPOR_JSON_OBJECT
} torpor_json_type_t;

typedef struct torpor_json torpor_json; /* opaque, immutable once parsed */

/* Strict RFC 8259 parse of exactly n bytes (no NUL needed). Returns NULL on any
 * malformation: truncation, trailing garbage, bad escapes, invalid UTF-8,
 * control characters in strings, nesting deeper than TORPOR_JSON_MAX_DEPTH.
 * Never reads outside [s, s+n). Unpaired \uD800-\uDFFF escapes decode to U+FFFD.
 * Duplicate keys are kept; torpor_json_get finds the last one. */
torpor_json *torpor_json_parse(const char *s, size_t n);
torpor_json *torpor_json_parse_cstr(const char *s);
void torpor_json_free(torpor_json *root); /* only on roots you own */

torpor_json_type_t torpor_json_type(const torpor_json *v);
bool torpor_json_is_null(const torpor_json *v);   /* JSON null (not "missing") */
bool torpor_json_is_bool(const torpor_json *v);
bool torpor_json_is_number(const torpor_json *v);
bool torpor_json_is_int(const torpor_json *v);    /* integer literal within int64 */
bool torpor_json_is_string(const torpor_json *v);
bool torpor_json_is_array(const torpor_json *v);
bool torpor_json_is_object(const torpor_json *v);

/* Object member by key (NULL if v is not an object or has no such key). */
const torpor_json *torpor_json_get(const torpor_json *obj, const char *key);
/* Dotted path: "a.b.0.c" or "a.b[0].c"; numeric segments index arrays.
 * An empty path answers v. Keys containing '.' or '[' need torpor_json_get. */
const torpor_json *torpor_json_path(const torpor_json *v, const char *path);
/* i-th array element, or the i-th member value of an object. */
const torpor_json *torpor_json_index(const torpor_json *v, size_t i);
/* i-th member key of an object (NULL otherwise). */
const char *torpor_json_key(const torpor_json *obj, size_t i);
/* Elements of an array, members of an object, bytes of a string; else 0. */
size_t torpor_json_len(const torpor_json *v);

const char *torpor_json_str(const torpor_json *v); /* NUL-terminated; NULL if not a string */
bool torpor_json_streq(const torpor_json *v, const char *s); /* string equal to s */
/* Integers exactly; other numbers truncated toward zero and clamped to int64;
 * non-numbers 0. Check torpor_json_is_int first when it matters. */
int64_t torpor_json_int(const torpor_json *v);
double torpor_json_num(const torpor_json *v);     /* non-numbers: 0.0 */
bool torpor_json_bool(const torpor_json *v);      /* true only for JSON true */

/* Compact JSON text of v (NULL v gives "null"). Caller frees. Numbers are
 * written as they were parsed, so a parse/dump round trip is lossless. */
char *torpor_json_dump(const torpor_json *v);

/* ------------------------------------------------------------------------- */
/* Formatting: torpor_jsonf / torpor_strf                                     */
/* ------------------------------------------------------------------------- */
/* Conversions (no widths or flags):
 *   %s     JSON: C string as a quoted, escaped JSON string (NULL -> null)
 *          text: the C string as is
 *   %.*s   same, with an explicit byte length (int, then const char *)
 *   %S     JSON: C string escaped WITHOUT quotes, to splice into a literal:
 *          "{\"greeting\": \"hello, %S\"}"      text: same as %s
 *   %.*S   same with explicit length
 *   %j     raw JSON text inserted as is (NULL -> null)
 *   %v     a const torpor_json * serialized (NULL -> null)
 *   %d %i  int        %u unsigned     %ld %lu long     %lld %llu long long/int64_t
 *   %zu %zd size_t    %x unsigned hex %llx
 *   %b     int as true/false
 *   %f %g %e  double (15 significant digits; NaN/Inf -> null in JSON)
 *   %c     a byte (text only)           %%  a percent sign
 * Escaping turns invalid UTF-8 into U+FFFD, so the result is always valid JSON
 * if the format is. An unknown conversion panics. The text functions
 * (torpor_strf, torpor_logf, torpor_fail, torpor_panic) are checked by the
 * compiler as printf formats; %j/%v/%b/%S work there too but draw a warning. */
char *torpor_jsonf(const char *fmt, ...);
char *torpor_vjsonf(const char *fmt, va_list ap);
char *torpor_strf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
char *torpor_vstrf(const char *fmt, va_list ap);

/* ------------------------------------------------------------------------- */
/* JSON builder: commas, quoting and escaping are handled for you.            */
/*                                                                            */
/*     torpor_jb b = TORPOR_JB_INIT;                                          */
/*     torpor_jb_obj(&b);                                                     */
/*       torpor_jb_key(&b, "items"); torpor_jb_arr(&b);                       */
/*         for (...) torpor_jb_str(&b, name);                                 */
/*       torpor_jb_end(&b);                                                   */
/*       torpor_jb_key(&b, "count"); torpor_jb_int(&b, n);                    */
/*     torpor_jb_end(&b);                                                     */
/*     char *json = torpor_jb_finish(&b);   // NULL if the calls were unbalanced */
/* ------------------------------------------------------------------------- */
typedef struct torpor_buf { char *p; size_t len, cap; } torpor_buf; /* internal */
typedef struct torpor_jb {
    torpor_buf out;
    int depth;
    int err;
    uint8_t st[TORPOR_JSON_MAX_DEPTH + 1];
} torpor_jb;
#define TORPOR_JB_INIT {0}

void torpor_jb_obj(torpor_jb *b);
void torpor_jb_arr(torpor_jb *b);
void torpor_jb_end(torpor_jb *b);
void torpor_jb_key(torpor_jb *b, const char *key);
void torpor_jb_str(torpor_jb *b, const char *s); /* NULL -> null */
void torpor_jb_strn(torpor_jb *b, const char *s, size_t n);
void torpor_jb_int(torpor_jb *b, int64_t v);
void torpor_jb_num(torpor_jb *b, double v);
void torpor_jb_bool(torpor_jb *b, bool v);
void torpor_jb_null(torpor_jb *b);
void torpor_jb_raw(torpor_jb *b, const char *json);       /* NULL -> null; not validated */
void torpor_jb_value(torpor_jb *b, const torpor_json *v); /* NULL -> null */
void torpor_jb_f(torpor_jb *b, const char *fmt, ...);     /* one value, torpor_jsonf rules */
/* The finished text (caller frees), or NULL when the calls did not form exactly
 * one balanced value; either way the builder is reset for reuse. */
char *torpor_jb_finish(torpor_jb *b);
void torpor_jb_reset(torpor_jb *b);

/* ------------------------------------------------------------------------- */
/* Input, output, logging, failing                                            */
/* ------------------------------------------------------------------------- */
const char *torpor_input_text(size_t *len); /* raw input (NUL-terminated), cached */
const torpor_json *torpor_input(void);      /* parsed input, cached; borrowed */

/* Set the agent's output (valid JSON, <= 1 MiB; last call wins).
 * 0 or a negative TORPOR_E_* code. NULL json -> TORPOR_E_INVALID_JSON. */
int torpor_output(const char *json);
int torpor_output_n(const char *json, size_t len);
int torpor_outputf(const char *fmt, ...);
int torpor_output_value(const torpor_json *v);

/* Log a message (level TORPOR_DEBUG..TORPOR_ERROR); longer than 64 KiB is cut. */
int torpor_log(int level, const char *msg);
int torpor_logf(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Log the formatted message at error level and return 1, for
 * `return torpor_fail("...")` from torpor_main (error code agent_error). */
int torpor_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Fail the agent right here (error code `aborted`) with a formatted message. */
_Noreturn void torpor_panic(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ------------------------------------------------------------------------- */
/* Tools                                                                       */
/* ------------------------------------------------------------------------- */
typedef struct torpor_result {
    bool ok;                /* the tool succeeded */
    int code;               /* 0, or a negative TORPOR_E_* code */
    const char *code_name;  /* "ok", or the error's "code" ("denied", ...) */
    const char *message;    /* error message ("" on success) */
    const char *rule;       /* policy rule that decided, or NULL */
    bool retryable;         /* the host says a retry may succeed */
    const char *raw;        /* response JSON text, NUL-terminated ("" if none) */
    size_t raw_len;
    torpor_json *value;     /* parsed response: the result, or the error object */
} torpor_result;

/* Call a tool with a JSON object of arguments (NULL means "{}"). This is the
 * only place the agent may be hibernated; it resumes here with the answer.
 * Free the result with torpor_result_free. */
torpor_result torpor_call(const char *tool, const char *args_json);
/* Same, arguments built with torpor_jsonf rules:
 *   torpor_callf("kv.incr", "{\"key\": %s, \"by\": %lld}", key, by) */
torpor_result torpor_callf(const char *tool, const char *args_fmt, ...);
void torpor_result_free(torpor_result *r);
const char *torpor_error_name(int code); /* TORPOR_E_* -> "fault", ...; 0 -> "ok" */

/* Builtin tool wrappers. On failure they return NULL/0, store the negative code
 * in *err (when err is not NULL) and keep the full error for torpor_last_error;
 * on success *err = 0. */
/* kv.get: the stored value (caller frees with torpor_json_free); a JSON null
 * node when the key is absent. */
torpor_json *torpor_kv_get(const char *key, int *err);
/* kv.set: value_json is the JSON text to store (NULL -> null). 0 or error. */
int torpor_kv_set(const char *key, const char *value_json);
/* kv.incr: adds `by` and answers the new value. */
int64_t torpor_kv_incr(const char *key, int64_t by, int *err);
/* clock.now: Unix time in milliseconds (the only clock a guest has). */
int64_t torpor_clock_now(int *err);
/* timer.sleep: sleep ms milliseconds (0 to 30 days), durably: the host
 * journals the wake time, holds a short sleep and hibernates the agent through
 * a long one (status "sleeping"), and resumes it here when the time has come,
 * after a host restart too. 0, or a negative code (a policy that does not grant
 * timer.sleep: TORPOR_E_DENIED; a bad ms: TORPOR_E_INVALID_ARGS). */
int torpor_sleep_ms(int64_t ms);
/* The last failed wrapper call (valid until the next failure), or NULL. */
const torpor_result *torpor_last_error(void);

/* ------------------------------------------------------------------------- */
/* Shared key-value namespaces                                                */
/* ------------------------------------------------------------------------- */
/* kv.get / kv.set / kv.incr in a shared namespace: one the tool's grant lists
 * in `namespaces = [...]`, visible to every agent whose policy grants it.
 * ns == NULL is the agent's private namespace (the same as the calls above).
 * A namespace the grant does not list fails with TORPOR_E_DENIED. */
torpor_json *torpor_kv_get_ns(const char *ns, const char *key, int *err);
int torpor_kv_set_ns(const char *ns, const char *key, const char *value_json);
int64_t torpor_kv_incr_ns(const char *ns, const char *key, int64_t by, int *err);

/* ------------------------------------------------------------------------- */
/* LLM (llm.chat)                                                             */
/* ------------------------------------------------------------------------- */
/* A chat completion. messages_json: a JSON array of {"role", "content"}
 * objects. options_json: NULL or a JSON object whose members are added to the
 * call (temperature, max_tokens, response_format, stop, seed, model, ...).
 * The host chooses the endpoint, model and credential from the policy; the
 * token usage counts against the agent's budget. Returns the answer (caller
 * frees with torpor_json_free):
 *   {"content": "...", "message": {...}, "finish_reason": "stop",
 *    "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}, "model": ...}
 * or NULL on failure (*err, torpor_last_error: rate_limited, timeout, ...). */
torpor_json *torpor_llm_chat(const char *messages_json, const char *options_json, int *err);
/* The same through another llm.* grant, e.g. "llm.cheap". */
torpor_json *torpor_llm_chat_with(const char *tool, const char *messages_json, const char *options_json,
                                  int *err);
/* One system message (NULL for none) and one user message; the reply text
 * (caller frees with torpor_free), or NULL on failure. */
char *torpor_llm_ask(const char *system, const char *user, int *err);

/* ------------------------------------------------------------------------- */
/* HTTP (http.fetch)                                                          */
/* ------------------------------------------------------------------------- */
/* One request to a host on the grant's allowlist. method NULL means GET;
 * headers_json NULL or a JSON object of strings; body NULL or text. Returns
 * the response (caller frees):
 *   {"status": 200, "headers": {...}, "url": ..., "redirects": [...],
 *    "json": <the parsed body, when it is JSON> | "body": "<text>" | "body_base64": "..."}
 * An HTTP error status is an answer, not a failure: check "status". NULL on
 * failure: refused by the policy (denied, with a reason_code), timeout,
 * unavailable, result_too_large. */
torpor_json *torpor_http_fetch(const char *method, const char *url, const char *headers_json,
                               const char *body, int *err);
/* The same through another http.* grant, e.g. "http.send_reply". */
torpor_json *torpor_http_fetch_with(const char *tool, const char *method, const char *url,
                                    const char *headers_json, const char *body, int *err);
/* GET url (through `tool`, NULL for "http.fetch") and return its parsed JSON
 * body (caller frees); *status (optional) gets the HTTP status. NULL on failure
 * or when the body is not JSON (the response is in torpor_last_error()->value). */
torpor_json *torpor_http_get_json(const char *tool, const char *url, int *status, int *err);
/* POST json_body (JSON text) to url through `tool` (NULL for "http.fetch");
 * returns the response object as torpor_http_fetch does. */
torpor_json *torpor_http_post_json(const char *tool, const char *url, const char *json_body, int *err);

/* ------------------------------------------------------------------------- */
/* MCP servers (mcp.SERVER.TOOL)                                              */
/* ------------------------------------------------------------------------- */
/* Call the tool `tool` of the MCP server `server` ([mcp.SERVER] in the policy)
 * with a JSON object of arguments (NULL means {}). The host validates them
 * against the tool's published schema. Returns (caller frees)
 *   {"structured": <structured result or null>, "text": "...", "content": [...]}
 * or NULL on failure (invalid_args, tool_failed, unavailable when the server
 * crashed — the host restarts it, a retry may succeed — timeout, ...). */
torpor_json *torpor_mcp_call(const char *server, const char *tool, const char *args_json, int *err);

#pragma GCC visibility pop

#ifdef __cplusplus
}
#endif
#endif /* TORPOR_H */
