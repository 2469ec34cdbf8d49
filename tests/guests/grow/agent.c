/* grow: allocates without end through torpor_alloc, touching every block so
 * the pages are real. When memory.grow fails the SDK calls
 * abort(TORPOR_ABORT_OOM, ...): the host reports memory_limit. */
#include "torpor.h"

int torpor_main(void) {
    for (size_t i = 0;; i++) {
        char *p = (char *)torpor_alloc(256 * 1024);
        memset(p, (int)(i & 0xFF), 256 * 1024);
    }
}
