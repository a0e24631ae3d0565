// Fuzz target: training states (train_state_load; DIR/train_state.bin, doc/robustness.md "Exact
// resume": a 256-int32 header, a whole checkpoint, AdamW's m and v), used as --resume uses them:
// the config-only read (config_from_args), the full read with weights and moments
// (model_from_args), main's checks, the data position put back on a loader (dataloader_seek,
// over a one-shard stand-in of 16 tokens inside the loaded vocabulary), then one training step
// of B 1, T 4 (or max_seq_len): forward, backward, clipping, the finite-loss guard, an AdamW
// update continuing the saved step count, main's counters advanced, and a 2-token sample
// with the saved RNG. Build and run: make fuzz-trainstate (dev/fuzz/fuzz_common.h).
#include "fuzz_common.h"

static void fuzz_trainstate(const char *path) {
    static int shard_fd = -1;
    static char shard_path[64];
    gemm_forget_panels(); // a die() after the last input's matmuls: the harness freed them
    TrainState st;
    const Config c = train_state_load(path, NULL, &st);
    Model m;
    train_state_load(path, &m, &st);
    if (memcmp(&c, &m.cfg, sizeof c)) abort();
    Args a = default_args();
    a.steps = 1 << 30; // the largest --steps: main refuses a state past --steps
    if (st.step > a.steps) die("--resume: the run already did %d steps, more than --steps %d", st.step, a.steps);
    const int V = c.vocab_size, T = c.max_seq_len < 4 ? c.max_seq_len : 4;
    // the stand-in shard, rewritten for this vocabulary
    if (shard_fd < 0) {
        shard_fd = memfd_create("fuzz_shard", 0);
        if (shard_fd < 0) { perror("memfd_create"); abort(); }
        snprintf(shard_path, sizeof shard_path, "/proc/self/fd/%d", shard_fd);
    }
    int h[HEADER_INTS] = {0};
    uint16_t tok[16];
    h[0] = SHARD_MAGIC; h[1] = SHARD_VERSION; h[2] = 16;
    for (int i = 0; i < 16; i++) tok[i] = (uint16_t)((i * 7 + 1) % V);
    if (ftruncate(shard_fd, 0) != 0 || pwrite(shard_fd, h, sizeof h, 0) != (ssize_t)sizeof h ||
        pwrite(shard_fd, tok, sizeof tok, sizeof h) != (ssize_t)sizeof tok) { perror("shard"); abort(); }
    DataLoader d;
    dataloader_init(&d, shard_path, 1, T, V);
    if (st.shuffle) dataloader_shuffle(&d, (uint64_t)a.seed);
    dataloader_seek(&d, st.epoch, st.shard_index, st.pos);
    // one step of main's loop
    dataloader_next(&d);
    float loss = model_forward(&m, d.inputs, d.targets, 1, T);
    model_zero_grad(&m);
    model_backward(&m);
    float norm = model_clip_grad_norm(&m, a.grad_clip);
    if (!isfinite(loss) || !isfinite(norm)) die("step %d: loss %g / grad norm %g is not finite; stopping", st.step + 1, loss, norm);
    AdamW opt = {lr_at(&a, st.step), a.beta1, a.beta2, a.eps, a.weight_decay};
    model_update(&m, &opt);
    long long tokens_seen = st.tokens_seen;
    tokens_seen += T;
    TrainState next = {st.step + 1, d.epoch, d.shard_index, (long long)d.pos, st.shuffle, st.rng, st.B, st.T, tokens_seen};
    int out[3], prompt = 0;
    model_generate(&m, 1, &prompt, 1, 2, a.temperature, &next.rng, out, NULL, NULL);
    if (out[1] < 0 || out[1] >= V || out[2] < 0 || out[2] >= V) abort();
    dataloader_free(&d);
    model_free(&m);
    gemm_release_panels(); // the GEMM's panels outlive a model: release them so the leak check holds
}
FUZZ_TARGET(fuzz_trainstate)
