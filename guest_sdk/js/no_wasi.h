/*
 * no_wasi.h - force-included into the QuickJS sources when `torpor build` compiles them.
 *
 * QuickJS reaches the outside world through a handful of libc functions: stdio (its debug
 * dumps) and the clocks (Date, the Math.random seed). Against wasi-libc those would become
 * WASI imports, which an ABI v1 guest does not have. Renaming them here sends them to
 * guest_sdk/js/runtime.c instead: output is dropped, clocks are deterministic.
 */
#ifndef TORPOR_JS_NO_WASI_H
#define TORPOR_JS_NO_WASI_H
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

int torpor_js_printf(const char *fmt, ...);
int torpor_js_fprintf(FILE *f, const char *fmt, ...);
int torpor_js_fputc(int c, FILE *f);
size_t torpor_js_fwrite(const void *p, size_t size, size_t n, FILE *f);
int torpor_js_gettimeofday(struct timeval *tv, void *tz);
int torpor_js_clock_gettime(clockid_t id, struct timespec *ts);

#undef stdout
#undef stderr
#define stdout ((FILE *)0)
#define stderr ((FILE *)0)
#define printf torpor_js_printf
#define fprintf torpor_js_fprintf
#define fputc torpor_js_fputc
#define fwrite torpor_js_fwrite
#define gettimeofday torpor_js_gettimeofday
#define clock_gettime torpor_js_clock_gettime
#endif
