/* wasi: a guest built against WASI libc (not the Torpor SDK), as agents in other
 * languages are. It prints (stdout and stderr become the agent's log), draws
 * random bytes and reads the clock (both deterministic under Torpor), and writes
 * its output through the torpor ABI. Built by the test as a WASI "reactor". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

__attribute__((import_module("torpor"), import_name("output_write"))) int output_write(const char *p, int n);

__attribute__((export_name("torpor_main"))) int torpor_main(void) {
    printf("hello from wasi libc\n");
    fprintf(stderr, "a warning\n");
    unsigned char r[8];
    arc4random_buf(r, sizeof r);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char buf[128];
    int n = snprintf(buf, sizeof buf, "{\"r\": %u, \"t\": %lld}", (unsigned)r[0], (long long)ts.tv_nsec);
    output_write(buf, n);
    return 0;
}
