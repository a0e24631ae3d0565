// Fuzz target: recall eval files (eval_recall, doc/formats.md "Evaluation files"), evaluated as
// --eval-recall evaluates them, on the smallest mha model of make_seeds.c (vocabulary 5,
// max_seq_len 8: a longer example is an error) at batch 2.
// Build and run: make fuzz-recall (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_recall(const char *path) {
    gemm_forget_panels(); // a die() after the last input's matmuls: the harness freed them
    Config c = fuzz_small_config();
    Model m;
    model_init_random(&m, &c, 0.5f, 7);
    RecallResult r = eval_recall(&m, path, 2, 0);
    long long sum = 0;
    for (int g = 0; g < r.n_groups; g++) sum += r.group_answers[g];
    if (r.answers < 1 || r.correct < 0 || r.correct > r.answers || sum != r.answers) abort();
    char json[4096];
    recall_json(&r, json, sizeof json);
    model_free(&m);
    gemm_release_panels(); // the GEMM's panels outlive a model: release them so the leak check holds
}
FUZZ_TARGET(fuzz_recall)
