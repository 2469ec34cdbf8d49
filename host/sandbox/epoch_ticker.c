/* The epoch ticker: a native thread that moves a Wasmtime engine's epoch on.
 *
 * A store's wall-clock deadline is a number of epoch ticks. A ticker written in Python
 * needs the GIL for every tick, and the host holds the GIL through some of its calls
 * into guest code (Asyncify's control exports, for speed): a module exporting its own
 * control functions that never return would then keep the deadline from ever firing.
 * This thread never touches Python, so the deadline fires whatever the guest runs.
 *
 * The engine and the increment function are passed in by address (libwasmtime is
 * already loaded by wasmtime-py); the caller keeps the engine alive for as long as the
 * process lives, as the thread does.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

typedef void (*tp_increment_fn)(void *engine);

struct tp_ticker {
    tp_increment_fn increment;
    void *engine;
    struct timespec period;
};

static void *tp_tick(void *arg) {
    struct tp_ticker *t = (struct tp_ticker *)arg;
    for (;;) {
        struct timespec left = t->period;
        while (nanosleep(&left, &left) != 0) {
        }
        t->increment(t->engine);
    }
    return NULL;
}

/* Start a detached ticker for `engine`, one tick every `period_ns`. 0 on success, else an errno. */
int tp_ticker_start(void *increment, void *engine, int64_t period_ns) {
    struct tp_ticker *t = (struct tp_ticker *)malloc(sizeof *t);
    if (t == NULL) return 12; /* ENOMEM */
    t->increment = (tp_increment_fn)increment;
    t->engine = engine;
    t->period.tv_sec = (time_t)(period_ns / 1000000000);
    t->period.tv_nsec = (long)(period_ns % 1000000000);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_t thread;
    int rc = pthread_create(&thread, &attr, tp_tick, t);
    pthread_attr_destroy(&attr);
    if (rc != 0) free(t);
    return rc;
}
