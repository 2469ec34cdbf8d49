/* park: input {"n": N}. Asks to write kv "parked" = N, which its policy sends for
 * approval every time: the run hibernates waiting_approval. Approved, it completes
 * {"parked": N}; denied, it completes {"denied": true}. */
#include "torpor.h"

int torpor_main(void) {
    const torpor_json *n = torpor_json_get(torpor_input(), "n");
    if (!torpor_json_is_int(n)) return torpor_fail("input needs an integer \"n\"");
    long long v = (long long)torpor_json_int(n);
    torpor_result r = torpor_callf("kv.set", "{\"key\": \"parked\", \"value\": %lld}", v);
    int ok = r.code == 0;
    torpor_result_free(&r);
    if (!ok) return torpor_outputf("{\"denied\": true}");
    return torpor_outputf("{\"parked\": %lld}", v);
}
