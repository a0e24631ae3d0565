// Fuzz target: context blocks (context_block_load, doc/formats.md "Context block"), loaded as
// --context-block loads them: into a model built first, here the small layer-0 ctxkv model of
// make_seeds.c (embed width 4, context width 2, vocabulary 5, interval 2, 2 contexts), whose
// widths the seed matches. A block that loads is then used: a forward pass on 8 tokens runs the
// block's exact recurrence over the batch (compute_contexts) and layer 0's attention over the
// contexts (the ring wraps: 4 contexts, 2 slots), and a 3-token KV-cached greedy generation
// pushes contexts into the cache. Build and run: make fuzz-ctxblock (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_ctxblock(const char *path) {
    gemm_forget_panels(); // a die() after the last input's matmuls: the harness freed them
    Config c = fuzz_small_config(); // with a ctxkv layer 0, as make_seeds.c's ctxkv.bin
    c.n_layer = 2;
    c.layer0_type = LAYER0_CTXKV; c.context_dim = 2; c.context_interval = 2; c.max_contexts = 2;
    Model m;
    model_init_random(&m, &c, 0.5f, 7);
    context_block_load(&m, path);
    const int T = 8, V = c.vocab_size;
    int in[8], tg[8], out[4], prompt = 1;
    for (int t = 0; t < T; t++) { in[t] = (t * 3 + 1) % V; tg[t] = (t * 2) % V; }
    model_forward(&m, in, tg, 1, T);
    uint64_t rng = 1;
    model_generate(&m, 1, &prompt, 1, 3, 0.0f, &rng, out, NULL, NULL);
    for (int i = 1; i < 4; i++)
        if (out[i] < 0 || out[i] >= V) abort();
    model_free(&m);
    gemm_release_panels(); // the GEMM's panels outlive a model: release them so the leak check holds
}
FUZZ_TARGET(fuzz_ctxblock)
