/*
test_ctxkv_cpu.c: the CPU program as a small library for test_ctxkv_cu, the CUDA harness, so
that the GPU is compared with train_ctxkv.c itself (the same source as ./train_ctxkv), not with
a copy of it.

It includes train_ctxkv.c under TESTING, as test_ctxkv.c does. Every function there is static,
so none of them clashes with the CUDA program's functions of the same names in the other
translation unit; only the cpu_* entry points below are exported, with plain C types. This
object also carries stb_ds's implementation for the whole test binary (test_ctxkv_cu.cu
defines CTXKV_STB_EXTERNAL). Built with the C compiler, with OpenMP and -march=native where the
CPU build has them (the real-shape checks run pythia-160m on this side): see the Makefile's
build/test_ctxkv_cpu.o.
*/
#define TESTING
#include "train_ctxkv.c"
#include "test_configs.h"

// Forward, backward and `steps` AdamW steps (with clip_grad_norm_) on one batch of the checkpoint
// at model_path, as test_ctxkv.c's check_reference. Fills logits (B*T*Vp), *loss, grads (P, in
// checkpoint order), losses (steps: the loss before each update) and params_after (P). Returns
// the number of parameters.
size_t cpu_run_training(const char *model_path, const int *inputs, const int *targets, int B, int T, float lr,
                        float beta1, float beta2, float eps, float weight_decay, float grad_clip, int steps,
                        float *logits, float *loss, float *grads, float *losses, float *params_after) {
    Model m;
    model_load(&m, model_path);
    const size_t BT = (size_t)B * T, Vp = m.cfg.padded_vocab_size;
    *loss = model_forward(&m, inputs, targets, B, T);
    memcpy(logits, m.a.logits, BT * Vp * sizeof(float));
    model_zero_grad(&m);
    model_backward(&m);
    memcpy(grads, m.grads_memory, m.num_params * sizeof(float));
    AdamW opt = {lr, beta1, beta2, eps, weight_decay};
    for (int s = 0; s < steps; s++) {
        losses[s] = model_forward(&m, inputs, targets, B, T);
        model_zero_grad(&m);
        model_backward(&m);
        model_clip_grad_norm(&m, grad_clip);
        model_update(&m, &opt);
    }
    memcpy(params_after, m.params_memory, m.num_params * sizeof(float));
    size_t P = m.num_params;
    model_free(&m);
    return P;
}

// One phase-1 round (phase1_round) of `iters` Jacobi iterations on tokens (B,T), with the
// phase-1 defaults except the noise, the RNG seed and no early stop. Fills the round's last
// OACD loss and converged fraction, the gradients of its last iteration (after clipping) and
// the parameters after its Adam steps.
size_t cpu_run_phase1(const char *model_path, const int *tokens, int B, int T, int iters, float noise,
                      unsigned long long seed, float *loss, float *converged, float *grads, float *params_after) {
    Model m;
    model_load(&m, model_path);
    model_set_phase(&m, 1);
    Args a = default_args();
    a.p1_iters = iters;
    a.p1_noise = noise;
    a.p1_stop = 2.0f; // never: run every iteration
    uint64_t rng = seed;
    Phase1Stats st = phase1_round(&m, &a, tokens, B, T, &rng, 1);
    *loss = st.loss;
    *converged = st.converged;
    memcpy(grads, m.grads_memory, m.num_params * sizeof(float));
    memcpy(params_after, m.params_memory, m.num_params * sizeof(float));
    size_t P = m.num_params;
    model_free(&m);
    return P;
}

// KV-cached greedy decoding of B sequences, as test_ctxkv.c's check_cached_decoding: prefill
// prompts (B, n_prompt), then n_decode steps. seq (B, n_prompt + n_decode) receives the
// prompts and the greedy tokens; logits (B, n_prompt + n_decode, Vp) the logits at each decoded
// position i (rows before n_prompt are left alone); *cache_bytes the cache's size.
void cpu_run_decode(const char *model_path, const int *prompts, int B, int n_prompt, int n_decode, int *seq,
                    float *logits_out, size_t *cache_bytes) {
    Model m;
    model_load(&m, model_path);
    const int n = n_prompt + n_decode, V = m.cfg.vocab_size, Vp = m.cfg.padded_vocab_size;
    int *next = malloc_check(B * sizeof(int), "decode");
    uint64_t rng = 5;
    for (int b = 0; b < B; b++) memcpy(seq + (size_t)b * n, prompts + (size_t)b * n_prompt, n_prompt * sizeof(int));
    KVCache kv = kvcache_new(&m.cfg, B, n_prompt, n_decode, &KV_POLICY_FULL);
    size_t stride;
    const float *logits = model_prefill(&m, &kv, prompts, n_prompt, &stride);
    for (int i = n_prompt; i < n; i++) {
        for (int b = 0; b < B; b++) seq[(size_t)b * n + i] = next[b] = sample_token(logits + b * stride, V, 0.0f, &rng, NULL);
        logits = model_decode_step(&m, &kv, next);
        stride = Vp;
        for (int b = 0; b < B; b++) memcpy(logits_out + ((size_t)b * n + i) * Vp, logits + (size_t)b * Vp, Vp * sizeof(float));
    }
    *cache_bytes = kv.bytes;
    kvcache_free(&kv);
    free(next);
    model_free(&m);
}

// decode_under (test_configs.h) on the checkpoint at model_path with the policy {kind, budget,
// sinks, window, pool}: logits (B, T−P, Vp) of rows P−1..T−2, the cache's bytes and, after a
// compressing prefill, its kept positions (kept_out: L·B·units·budget ints, or NULL)
void cpu_run_decode_under(const char *model_path, const int policy[5], const int *x, int B, int T, int P,
                          float *logits_out, size_t *cache_bytes, int *kept_out) {
    Model m;
    model_load(&m, model_path);
    const KVPolicy p = {policy[0], policy[1], policy[2], policy[3], policy[4]};
    KVCache kv = decode_under(&m, &p, x, B, T, P, logits_out);
    *cache_bytes = kv.bytes;
    if (kept_out && kv.kept)
        memcpy(kept_out, kv.kept, (size_t)(m.cfg.n_layer - kv.first_layer) * B * kv_units(&m.cfg, m.cfg.attn_type) * p.budget * sizeof(int));
    kvcache_free(&kv);
    model_free(&m);
}
