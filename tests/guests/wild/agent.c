/*
 * wild: calls every import with out-of-bounds, negative and wrapping pointers
 * and absurd lengths, records each return code, and compares with what ABI.md
 * says (bounds are checked first: E_FAULT; then size limits: E_TOO_LARGE; then
 * content). Output (written last, with a valid buffer):
 *   {"memory_bytes": N, "<import>": {"<case>": rc, ...}, ...,
 *    "mismatches": ["<import>.<case>: got X, want Y", ...]}
 * With input {"abort": true} it finally calls abort() with a message pointer
 * that is out of bounds: the agent must fail with `aborted`, host unharmed.
 */
#include "torpor.h"

typedef struct {
    torpor_jb out, bad;
    const char *section;
} rec;

static void check(rec *r, const char *name, int got, int want) {
    torpor_jb_key(&r->out, name);
    torpor_jb_int(&r->out, got);
    if (got != want)
        torpor_jb_f(&r->bad, "\"%S.%S: got %d, want %d\"", r->section, name, got, want);
}

static void begin(rec *r, const char *section) {
    r->section = section;
    torpor_jb_key(&r->out, section);
    torpor_jb_obj(&r->out);
}

#define P(x) ((void *)(uintptr_t)(x))

static char small[64];

/* The bad (pointer, length) pairs every import gets. Computed at each call
 * from the current memory size (the report's own allocations may grow it). */
static const char *const CASES[] = {"neg_ptr",  "neg_len",  "past_end",   "straddle_end",
                                    "wrap_u32", "wrap_i32", "absurd_len", "huge_ptr"};
#define NCASES (sizeof CASES / sizeof CASES[0])

static uint32_t mem_bytes(void) { return (uint32_t)__builtin_wasm_memory_size(0) * 65536u; }

static void *case_ptr(size_t i) {
    uint32_t p[] = {0xFFFFFFF0u, (uint32_t)(uintptr_t)small, mem_bytes() + 64, mem_bytes() - 4,
                    0xFFFFFF00u, 0x7FFFFFFFu, (uint32_t)(uintptr_t)small, 0xFFFFFFFFu};
    return P(p[i]);
}

static int32_t case_len(size_t i) {
    uint32_t l[] = {8, 0xFFFFFFFFu, 8, 16, 0x200, 0x7FFFFFFFu, 0x7FFFFFFFu, 0};
    return (int32_t)l[i];
}

int torpor_main(void) {
    const size_t nbad = NCASES;
    /* big valid buffers for the size limits */
    size_t big_n = TORPOR_MAX_OUTPUT + 1;
    char *big = (char *)torpor_alloc(big_n);
    memset(big, ' ', big_n);
    big[0] = '0';

    rec r = {TORPOR_JB_INIT, TORPOR_JB_INIT, 0};
    torpor_jb_obj(&r.out);
    torpor_jb_arr(&r.bad);
    torpor_jb_key(&r.out, "memory_bytes");
    torpor_jb_int(&r.out, mem_bytes());

    begin(&r, "input_read");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i], torpor_sys_input_read(case_ptr(i), case_len(i)), TORPOR_E_FAULT);
    check(&r, "end_empty", torpor_sys_input_read(P(mem_bytes()), 0), 0);
    torpor_jb_end(&r.out);

    begin(&r, "output_write");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i], torpor_sys_output_write(case_ptr(i), case_len(i)), TORPOR_E_FAULT);
    check(&r, "end_empty", torpor_sys_output_write(P(mem_bytes()), 0), TORPOR_E_INVALID_JSON);
    check(&r, "too_large", torpor_sys_output_write(big, (int32_t)big_n), TORPOR_E_TOO_LARGE);
    check(&r, "not_json", torpor_sys_output_write("{\"a\":", 5), TORPOR_E_INVALID_JSON);
    check(&r, "nan", torpor_sys_output_write("NaN", 3), TORPOR_E_INVALID_JSON);
    torpor_jb_end(&r.out);

    begin(&r, "log");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i], torpor_sys_log(TORPOR_INFO, case_ptr(i), case_len(i)), TORPOR_E_FAULT);
    check(&r, "bad_level", torpor_sys_log(7, "hi", 2), TORPOR_E_INVALID_ARGS);
    check(&r, "negative_level", torpor_sys_log(-1, "hi", 2), TORPOR_E_INVALID_ARGS);
    check(&r, "too_large", torpor_sys_log(TORPOR_INFO, big, TORPOR_MAX_LOG + 1), TORPOR_E_TOO_LARGE);
    check(&r, "ok", torpor_sys_log(TORPOR_DEBUG, "wild: still alive", 17), 0);
    torpor_jb_end(&r.out);

    begin(&r, "tool_call_name");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i],
              torpor_sys_tool_call(case_ptr(i), case_len(i), "{}", 2), TORPOR_E_FAULT);
    torpor_jb_end(&r.out);

    begin(&r, "tool_call_args");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i],
              torpor_sys_tool_call("kv.get", 6, case_ptr(i), case_len(i)), TORPOR_E_FAULT);
    char long_name[TORPOR_MAX_TOOL_NAME + 1];
    memset(long_name, 'x', sizeof long_name);
    check(&r, "name_too_long", torpor_sys_tool_call(long_name, (int32_t)sizeof long_name, "{}", 2),
          TORPOR_E_TOO_LARGE);
    check(&r, "args_too_large",
          torpor_sys_tool_call("kv.get", 6, big, (int32_t)(TORPOR_MAX_ARGS + 1)), TORPOR_E_TOO_LARGE);
    /* after a failed call the error object is the response */
    int32_t rl = torpor_sys_response_len();
    check(&r, "error_response_present", rl > 0 ? 0 : -100, 0);
    torpor_jb_end(&r.out);

    begin(&r, "response_read");
    for (size_t i = 0; i < nbad; i++)
        check(&r, CASES[i], torpor_sys_response_read(case_ptr(i), case_len(i)), TORPOR_E_FAULT);
    check(&r, "end_empty", torpor_sys_response_read(P(mem_bytes()), 0), 0);
    torpor_jb_end(&r.out);

    torpor_free(big);
    torpor_jb_end(&r.bad);
    char *bad_list = torpor_jb_finish(&r.bad);
    torpor_jb_key(&r.out, "mismatches");
    torpor_jb_raw(&r.out, bad_list);
    torpor_jb_end(&r.out);
    char *out = torpor_jb_finish(&r.out);
    int rc = torpor_output(out);
    if (rc != 0) return torpor_fail("output_write of the report failed: %d", rc);

    if (torpor_json_bool(torpor_json_get(torpor_input(), "abort")))
        torpor_sys_abort(TORPOR_ABORT_PANIC, P(0xFFFFFFF0u), 100);
    return 0;
}
