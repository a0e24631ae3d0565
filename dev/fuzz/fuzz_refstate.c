// Fuzz target: reference states (refstate_load in test_ctxkv.c, doc/formats.md "Reference
// state"); every array of a state that loads is read once.
// Build and run: make fuzz-refstate (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_refstate(const char *path) {
    RefState r;
    if (!refstate_load(&r, path)) return; // malformed: it said why and returned 0
    const size_t BT = (size_t)r.B * r.T;
    volatile double sum = r.loss;
    for (size_t i = 0; i < BT; i++) sum += (double)r.inputs[i] + r.targets[i];
    for (size_t i = 0; i < BT * r.V; i++) sum += r.logits[i];
    for (int i = 0; i < r.P; i++) sum += r.grads[i];
    for (int i = 0; i < r.S; i++) sum += r.losses[i];
    (void)sum;
    refstate_free(&r);
}
FUZZ_TARGET(fuzz_refstate)
