// Fuzz target: LAMBADA eval files (eval_lambada, doc/formats.md "Evaluation files"), evaluated
// as --eval-lambada evaluates them, on the smallest mha model of make_seeds.c (vocabulary 5,
// max_seq_len 8: longer examples are skipped) with at most 8 examples scored (--lambada-max 8).
// Build and run: make fuzz-lambada (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_lambada(const char *path) {
    gemm_forget_panels(); // a die() after the last input's matmuls: the harness freed them
    Config c = fuzz_small_config();
    Model m;
    model_init_random(&m, &c, 0.5f, 7);
    float acc, ppl;
    int n;
    eval_lambada(&m, path, 8, &acc, &ppl, &n, 0);
    if (n < 0 || n > 8 || !(acc >= 0.0f && acc <= 1.0f) || m.head_from != 0) abort();
    model_free(&m);
    gemm_release_panels(); // the GEMM's panels outlive a model: release them so the leak check holds
}
FUZZ_TARGET(fuzz_lambada)
