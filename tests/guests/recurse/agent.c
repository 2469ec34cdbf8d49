/* recurse: unbounded recursion on the wasm stack; the host reports
 * stack_overflow. The call is not in tail position (its result is used by a
 * non-commutative subtraction) and the volatile read keeps the compiler from
 * proving anything, so no tail-call or loop transformation applies. */
#include "torpor.h"

static volatile int64_t g_stop = 0;

__attribute__((noinline)) static int64_t deep(int64_t n, int64_t a, int64_t b, int64_t c) {
    if (n == g_stop - 1) return a;
    return n - deep(n + 1, b + n, c ^ n, a * 3) + (a ^ b) - c;
}

int torpor_main(void) {
    return (int)deep(0, 1, 2, 3);
}
