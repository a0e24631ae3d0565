// Fuzz target: checkpoints (checkpoint_open + the parameter read, i.e. model_load; doc/formats.md
// "Checkpoint"). A checkpoint that loads must also run, so each one then does a forward and
// backward pass on a short batch and a KV-cached greedy generation of two tokens, as training
// and sampling would. Build and run: make fuzz-checkpoint (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_checkpoint(const char *path) {
    Model m;
    model_load(&m, path);
    const int V = m.cfg.vocab_size, T = m.cfg.max_seq_len < 4 ? m.cfg.max_seq_len : 4;
    int in[4], tg[4], out[3], prompt = 0;
    for (int t = 0; t < T; t++) { in[t] = (t * 7) % V; tg[t] = (t * 5 + 1) % V; }
    model_forward(&m, in, tg, 1, T);
    model_zero_grad(&m);
    model_backward(&m);
    if (m.cfg.max_seq_len >= 3) {
        uint64_t rng = 1;
        model_generate(&m, 1, &prompt, 1, 2, 0.0f, &rng, out, NULL, NULL);
        if (out[1] < 0 || out[1] >= V || out[2] < 0 || out[2] >= V) abort();
    }
    model_free(&m);
    gemm_release_panels(); // the GEMM's panels outlive a model: release them so the leak check holds
}
FUZZ_TARGET(fuzz_checkpoint)
