/* noentry: a module without the torpor_main export; the host must refuse it. */
#include "torpor.h"

__attribute__((export_name("not_main"))) int not_main(void) {
    return torpor_output("{}");
}
