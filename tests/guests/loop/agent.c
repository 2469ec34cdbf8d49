/* loop: never returns; the host must stop it with out_of_fuel (or its
 * wall-clock deadline when fuel is plentiful). */
#include "torpor.h"

static volatile uint32_t g_spin;

int torpor_main(void) {
    for (;;) g_spin++;
}
