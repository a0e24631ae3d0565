/*
train_ctxkv.c: the CPU reference of ctxkv, in fp32. Pythia (GPT-NeoX) and its KV-cache-efficient
attention variants -- MHA, GQA/MQA, MLA and Context-KV -- forward and backward, AdamW and
KV-cached decoding. It equals Hugging Face's GPTNeoXForCausalLM to ~1e-6 (test_ctxkv.c checks).

The model (doc/model.md):
  h0      = embed_in[ids]                                  no positional embedding
  x_{l+1} = x_l + Attn(LN_1(x_l)) + MLP(LN_2(x_l))         parallel residual, both LNs read x_l
  Attn    = q, k, v per variant, rotate-half RoPE on the first rotary_dims of each head,
            causal softmax, dense
  MLP     = dense_4h_to_h(GELU_erf(dense_h_to_4h(x)))
  logits  = embed_out · LN_f(x_L)                          untied, no bias

This file holds the model only, in this order:
  Layers              embedding, layernorm, matmul, rope, gelu, residual, cross-entropy
  The model           Model, KVCache, allocation, gradients, AdamW
  The attention core  causal softmax attention (training, prefill) and over the cache (decoding)
  Attention variants  one stretch each, then the table ATTN_VARIANTS that the model calls:
    MHA               mha_views, mha_project_forward/backward, mha_cache_write, mha_decode
                      (dev/reference.py: attn_mha)
    GQA / MQA         gqa_*  (doc/attention.md; dev/reference.py: attn_gqa)
    MLA               rmsnorm, mla_gather_keys, mla_* with the absorbed decode (doc/attention.md;
                      dev/reference.py: mla_project, attn_mla, mla_absorbed_decode)
    Context-KV        ctx_attention (slots), ctx_*, the ContextBlock, compute_contexts, OACD,
                      phase 1 (jacobi_shift, phase1_round)  (doc/context_kv.md; dev/reference.py:
                      attn_ctxkv, ctxkv_ring_decode, context_block, contexts_sequential)
  The whole model     the attention block, layer and head (ctxkv/pythia.h), model_forward/backward
  KV-cached decoding  model_att_rows, kvcache_gather (what the shared eviction needs), model_prefill,
                      model_decode_step (KV eviction: ctxkv/kvpolicy.h, doc/kv_eviction.md)
Everything around it is shared with the CUDA mirror train_ctxkv.cu, in ctxkv/ (each header
opens with what it defines): utils.h, config.h (config, presets, KV accounting), layout.h
(parameter and activation layout: the checkpoint order), args.h (the flag table), kvpolicy.h
(which cached tokens a KV policy keeps), kvcache.h (the decoder's cache), decode.h (its
allocation, the prefill's eviction, a decode step's slot), data.h (shards, loader, token table),
checkpoint.h (checkpoints, training state, init), eval.h (evaluation, also by decoding;
generation), pythia.h (the wiring of the layers) and train.h (the training driver and main). simd.h holds the CPU's performance-only code (vector exp, the GEMM micro-kernel).
A reader learning one method reads its stretch of Attention variants, then the doc page.

Shapes in comments: B batch, T time, C = n_embd, H heads, D head dim, G key/value heads, R rotary
dims, F = n_inner (MLP width), V vocab, Vp padded vocab, L layers, d_c context width.

Build: make train_ctxkv.  Usage: ./train_ctxkv -h
*/
#ifdef _OPENMP
#include <omp.h>
#endif
#define STB_DS_IMPLEMENTATION
#include "ctxkv/utils.h"
#include "ctxkv/config.h"
typedef float floatX;       // parameters and activations are fp32 here (the CUDA program: bf16)
#define PARAM_ALIGN_BYTES 4 // no padding between parameter tensors: the block is the checkpoint's order
#define ATT_KEEPS_PROBS 1   // the attention keeps P (B,H,T,T) for its backward: the readable reference
#include "ctxkv/layout.h"
#include "ctxkv/args.h"
#include "ctxkv/kvcache.h" // KVCache, the decoder's cache, and its eviction policy (KV-cached decoding, below)
#include "ctxkv/simd.h"

// ----------------------------------------------------------------------------
// Layers: forward/backward pairs. Backward functions ACCUMULATE (+=) into their gradients, so a
// tensor read twice (x_l feeds both LayerNorms) needs no special case.

// embedding: out[b,t,:] = table[ids[b,t], :]                          table (Vp,C), out (B,T,C)
static void embedding_forward(float *out, const int *ids, const float *table, int BT, int C) {
    for (int i = 0; i < BT; i++) memcpy(out + (size_t)i * C, table + (size_t)ids[i] * C, C * sizeof(float));
}

// serial on purpose: repeated ids add into the same row
static void embedding_backward(float *dtable, const float *dout, const int *ids, int BT, int C) {
    for (int i = 0; i < BT; i++) axpy(dtable + (size_t)ids[i] * C, 1.0f, dout + (size_t)i * C, C);
}

static void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                              const float *b, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        const float m = sum_of(x, C) / C, v = sum_sq_dev(x, C, m) / C; // mean and (biased) variance, 8 lanes at a time
        const float r = 1.0f / sqrtf(v + eps);
        for (int i = 0; i < C; i++) y[i] = (x[i] - m) * r * w[i] + b[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

// dx = r·(g − mean(g) − x̂·mean(g⊙x̂)), g = dy⊙w;  dw += Σ dy⊙x̂;  db += Σ dy
static void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                               const float *w, const float *mean, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float m = mean[n], r = rstd[n];
        float g_mean = 0.0f, gx_mean = 0.0f;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - m) * r, g = dy[i] * w[i];
            g_mean += g;
            gx_mean += g * xhat;
        }
        g_mean /= C;
        gx_mean /= C;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - m) * r;
            dx[i] += r * (dy[i] * w[i] - g_mean - xhat * gx_mean);
        }
    }
    // weight grads reduce over N: parallel over channels so no two threads write one entry
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float sw = 0.0f, sb = 0.0f;
        for (int n = 0; n < N; n++) {
            float dy = dout[(size_t)n * C + i];
            sw += dy * (inp[(size_t)n * C + i] - mean[n]) * rstd[n];
            sb += dy;
        }
        dw[i] += sw;
        db[i] += sb;
    }
}

// Linear layer, PyTorch layout: out (N,OC) = inp (N,C) · wᵀ + bias (OC, or NULL for none).
// The plain loop it computes: out[n][o] = bias[o] + Σ_c inp[n][c]·w[o][c]. A few rows (decoding,
// up to batch 16) read each weight once for all rows (few_rows_matmul); more go through the
// packed GEMM (ctxkv/simd.h), which reads w as the transposed view it needs.
static void matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int C, int OC) {
    if (N <= 16) few_rows_matmul(out, inp, w, bias, N, C, OC);
    else gemm(out, inp, C, 1, w, 1, C, N, C, OC, 1, bias); // B[c][o] = w[o][c]; out is written, not read
}

// dinp (N,C) += dout·w;  dw (OC,C) += doutᵀ·inp;  dbias (OC) += Σ_n dout.   Any of the three may be NULL.
static void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                            const float *w, int N, int C, int OC) {
    if (dinp) gemm(dinp, dout, OC, 1, w, C, 1, N, OC, C, 0, NULL);
    if (dw) gemm(dw, dout, 1, OC, inp, C, 1, OC, N, C, 0, NULL); // A[o][n] = dout[n][o]: doutᵀ read through strides
    if (dbias) {
#pragma omp parallel for schedule(static)
        for (int o0 = 0; o0 < OC; o0 += 64) {
            int ko = OC - o0 < 64 ? OC - o0 : 64;
            for (int n = 0; n < N; n++) axpy(dbias + o0, 1.0f, dout + (size_t)n * OC + o0, ko);
        }
    }
}

// RoPE table for R rotated dims: cos/sin (max_seq_len, R/2), θ[p][i] = p · base^(−2i/R),
// formed in fp32 as HF does. The model has one for its rotary_dims and, for MLA, one for d_R.
typedef struct { int R; float *cos, *sin; } Rope;

static Rope rope_init(int max_seq_len, int R, float base) {
    Rope rp = {R, NULL, NULL};
    size_t n = (size_t)max_seq_len * (R / 2 > 0 ? R / 2 : 1);
    rp.cos = malloc_check(n * sizeof(float), "rope table");
    rp.sin = malloc_check(n * sizeof(float), "rope table");
    for (int i = 0; i < R / 2; i++) {
        float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)R);
        for (int p = 0; p < max_seq_len; p++) {
            float theta = (float)p * inv_freq;
            rp.cos[p * (R / 2) + i] = cosf(theta);
            rp.sin[p * (R / 2) + i] = sinf(theta);
        }
    }
    return rp;
}

static void rope_free(Rope *rp) { free(rp->cos); free(rp->sin); }

// Rotate-half RoPE in place on the first R dims of n_heads heads per row, pairs (i, i + R/2):
//   x'[i] = x[i]c − x[i+R/2]s,  x'[i+R/2] = x[i+R/2]c + x[i]s.
// Rows are (B,T) positions, pos = pos0 + t. sign = −1 applies the inverse rotation.
static void rope_rotate(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride,
                        const Rope *rp, float sign) {
    const int half = rp->R / 2;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * T * n_heads * rp->R >= PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = rp->cos + (size_t)(pos0 + t) * half, *s = rp->sin + (size_t)(pos0 + t) * half;
            float *row = x + ((size_t)b * T + t) * row_stride;
            for (int h = 0; h < n_heads; h++) {
                float *v = row + (size_t)h * head_stride;
                for (int i = 0; i < half; i++) {
                    float x1 = v[i], x2 = v[i + half], si = sign * s[i];
                    v[i] = x1 * c[i] - x2 * si;
                    v[i + half] = x2 * c[i] + x1 * si;
                }
            }
        }
}

static void rope_forward(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(x, B, T, pos0, row_stride, n_heads, head_stride, rp, 1.0f);
}

// the rotation is orthogonal, so its backward is the inverse rotation of the gradient
static void rope_backward(float *dx, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(dx, B, T, pos0, row_stride, n_heads, head_stride, rp, -1.0f);
}

// exact GELU, 0.5·x·(1 + erf(x/√2)), as HF's "gelu" (not the tanh form), 8 entries at a time
// (erf8 and exp8 in ctxkv/simd.h; a tail of fewer than 8 goes through the same lanes, padded)
static void gelu_forward(float *out, const float *inp, size_t N) {
#pragma omp parallel for schedule(static) if (N >= PAR_MIN)
    for (size_t i = 0; i < N; i += 8) {
        const int n = N - i < 8 ? (int)(N - i) : 8;
        const v8 x = load8_n(inp + i, n);
        store8_n(out + i, splat8(0.5f) * x * (splat8(1.0f) + erf8(x * splat8((float)M_SQRT1_2))), n);
    }
}

// GELU'(x) = 0.5(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π)
static void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
    const v8 inv_sqrt_2pi = splat8(0.3989422804014327f);
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i += 8) {
        const int n = N - i < 8 ? (int)(N - i) : 8;
        const v8 x = load8_n(inp + i, n);
        const v8 grad = splat8(0.5f) * (splat8(1.0f) + erf8(x * splat8((float)M_SQRT1_2))) + x * exp8(splat8(-0.5f) * x * x) * inv_sqrt_2pi;
        store8_n(dinp + i, load8_n(dinp + i, n) + grad * load8_n(dout + i, n), n);
    }
}

// out = a + b + c (the parallel residual); its backward is the identity into each branch,
// which is why model_backward hands the same dresid to both branches.
static void residual3_forward(float *out, const float *a, const float *b, const float *c, size_t N) {
#pragma omp parallel for schedule(static) if (N >= PAR_MIN)
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i] + c[i];
}

// Cross-entropy over the first V columns of logits (N,Vp); padding columns never count.
// losses[n] = lse[n] − logits[n][target], lse = logsumexp of the row (kept for backward);
// ignored rows get loss 0. Returns the mean over non-ignored rows and sets *n_valid.
static float crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V,
                                  int Vp, int *n_valid) {
    double total = 0.0;
    int valid = 0;
#pragma omp parallel for schedule(static) reduction(+ : total, valid)
    for (int n = 0; n < N; n++) {
        losses[n] = 0.0f;
        const float *z = logits + (size_t)n * Vp;
        float maxv = max_of(z, V);
        lse[n] = maxv + logf(sum_exp_shift(z, V, maxv));
        if (targets[n] == IGNORE_INDEX) continue;
        losses[n] = lse[n] - z[targets[n]];
        total += losses[n];
        valid++;
    }
    *n_valid = valid;
    return valid ? (float)(total / valid) : 0.0f;
}

// dlogits = (softmax(logits) − onehot(target)) / n_valid, written IN PLACE over logits
// (saves a (B,T,Vp) buffer). Ignored rows and padding columns get 0.
static void crossentropy_backward(float *logits_to_dlogits, const float *lse, const int *targets, int N, int V,
                                  int Vp, int n_valid) {
    const float scale = 1.0f / (float)n_valid;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *z = logits_to_dlogits + (size_t)n * Vp;
        if (targets[n] == IGNORE_INDEX) { memset(z, 0, Vp * sizeof(float)); continue; }
        exp_shift_sum(z, V, lse[n]); // z = softmax
        for (int i = 0; i < V; i++) z[i] *= scale;
        z[targets[n]] -= scale;
        for (int i = V; i < Vp; i++) z[i] = 0.0f;
    }
}

// ----------------------------------------------------------------------------
// The model: parameters, activations and optimizer state, and the KV cache decoding keeps

// ContextBlock scratch (Context-KV, below): one ContextLayer on N rows

typedef struct {
    int cap;                          // rows allocated
    float *u, *u_mean, *u_rstd;       // (N,E), (N), (N) LN_e(E)
    float *z;                         // (N,d_c+E) [S ; u]
    float *pre, *g;                   // (N,d_c) before / after GELU
    float *r, *r_mean, *r_rstd;       // (N,d_c) S + g, and LN_c's statistics
    float *out;                       // (N,d_c)
    float *dr, *dpre, *dz, *du, *dE;  // backward scratch
} BlockActs;

typedef struct {
    Config cfg;
    ParamTensor *tensors;       // stb_ds array: checkpoint order, names, shapes
    size_t num_params;
    float *params_memory; Params p;
    float *grads_memory;  Params g;       // allocated on first backward
    float *m_memory, *v_memory;           // AdamW moments, allocated on first update
    int adam_step;
    float grad_scale;                     // the clip's factor, applied by the next AdamW update (1: none)
    Rope rope;                            // rotary_dims of each head (Pythia's partial RoPE)
    Rope mla_rope;                        // MLA's decoupled d_R dims (R = 0 otherwise)
    char *acts_memory; Acts a; size_t acts_cap;        // activations, capacity in bytes
    char *gacts_memory; GradActs ga; size_t gacts_cap; // their gradients
    size_t batch_cap;
    int B, T;                   // shape of the last forward
    int *inputs, *targets;      // copies of the last forward's batch
    float mean_loss;            // of the last forward with targets, else -1
    int n_valid;                // non-ignored targets in the last forward
    BlockActs cb;               // ContextBlock scratch (phase 1 and the exact recurrence)
    int head_from;              // B = 1 inference: logits only for rows >= head_from (0 = all)
    int head_last_of;           // prefill of sequences of this length: logits only of each one's last row, as rows 0..B-1
    KVPolicy kv_policy;         // which tokens the decoder keeps (ctxkv/kvpolicy.h); zero: full
} Model;


static void model_alloc_params(Model *m, const Config *c) {
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->p.layer = calloc_check(c->n_layer * sizeof(LayerParams), "layer params");
    m->g.layer = calloc_check(c->n_layer * sizeof(LayerParams), "layer grads");
    m->num_params = layout_params(c, NULL, NULL, &m->tensors, NULL);
    m->params_memory = malloc_check(m->num_params * sizeof(float), "parameters");
    layout_params(c, m->params_memory, &m->p, NULL, NULL);
    m->rope = rope_init(c->max_seq_len, c->rotary_dims, c->rope_base);
    m->mla_rope = rope_init(c->max_seq_len, c->attn_type == ATTN_MLA ? c->mla_rope_dim / c->mla_rope_split : 0, c->rope_base);
    m->a.layer = calloc_check(c->n_layer * sizeof(LayerActs), "layer acts");
    m->mean_loss = -1.0f;
    m->grad_scale = 1.0f;
    tensors_set_phase(m->tensors, c, 2);
}

// The host copy of the parameters (ctxkv/checkpoint.h) is params_memory itself here.
static void model_to_device(Model *m) { (void)m; }
static void model_to_host(const Model *m) { (void)m; }

// AdamW's m and v in checkpoint order, zeros before the first update (the training state)
static void model_get_moments(const Model *m, float *mh, float *vh) {
    if (m->m_memory) {
        memcpy(mh, m->m_memory, m->num_params * sizeof(float));
        memcpy(vh, m->v_memory, m->num_params * sizeof(float));
    } else {
        memset(mh, 0, m->num_params * sizeof(float));
        memset(vh, 0, m->num_params * sizeof(float));
    }
}
static void model_set_moments(Model *m, const float *mh, const float *vh, int adam_step) {
    if (!m->m_memory) {
        m->m_memory = (float *)malloc_check(m->num_params * sizeof(float), "AdamW m");
        m->v_memory = (float *)malloc_check(m->num_params * sizeof(float), "AdamW v");
    }
    memcpy(m->m_memory, mh, m->num_params * sizeof(float));
    memcpy(m->v_memory, vh, m->num_params * sizeof(float));
    m->adam_step = adam_step;
}

static void model_free(Model *m) {
    free(m->params_memory); free(m->grads_memory); free(m->m_memory); free(m->v_memory);
    free(m->acts_memory); free(m->gacts_memory); rope_free(&m->rope); rope_free(&m->mla_rope);
    free(m->p.layer); free(m->g.layer); free(m->a.layer);
    free(m->inputs); free(m->targets); free(m->cb.u);
    arrfree(m->tensors);
    gemm_release_panels(); // the GEMM's per-thread panels (ctxkv/simd.h) are regrown on the next use
    memset(m, 0, sizeof *m);
}

// Points the activations at memory for a (B,T) batch, growing the block when this batch
// needs more than any earlier one.
static void model_ensure_acts(Model *m, int B, int T) {
    size_t need = layout_acts(&m->cfg, B, T, NULL, &m->a, NULL);
    if (need > m->acts_cap) {
        free(m->acts_memory);
        m->acts_memory = (char *)malloc_check(need, "activations");
        m->acts_cap = need;
    }
    layout_acts(&m->cfg, B, T, m->acts_memory, &m->a, NULL);
    size_t BT = (size_t)B * T;
    if (BT > m->batch_cap) {
        free(m->inputs); free(m->targets);
        m->inputs = malloc_check(BT * sizeof(int), "batch");
        m->targets = malloc_check(BT * sizeof(int), "batch");
        m->batch_cap = BT;
    }
}

// rows [row0, row0 + n) of the last forward's logits (Vp each): here they are the logits themselves
static float *model_logits_host(Model *m, size_t row0, size_t n) { (void)n; return m->a.logits + row0 * m->cfg.padded_vocab_size; }

// gradients of the parameters, laid out as the parameters: allocated on first use
static void model_ensure_grads(Model *m) {
    if (m->grads_memory) return;
    m->grads_memory = (float *)calloc_check(m->num_params * sizeof(float), "gradients");
    layout_params(&m->cfg, m->grads_memory, &m->g, NULL, NULL);
}

// zeroes / moves device memory (here: host memory): what ctxkv/pythia.h calls
static void device_zero(void *p, size_t bytes) { memset(p, 0, bytes); }

static void device_move(void *dst, const void *src, size_t bytes) { memmove(dst, src, bytes); }

static void model_zero_grad(Model *m) {
    if (m->grads_memory) memset(m->grads_memory, 0, m->num_params * sizeof(float));
    m->grad_scale = 1.0f;
}

// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_: the grads are scaled by
// min(1, max_norm / (norm + 1e-6)), inside the next model_update (grad_scale; the gradients are
// left as they are). Returns the norm before clipping. max_norm <= 0: no clip.
static float model_clip_grad_norm(Model *m, float max_norm) {
    double sq = 0.0;
    const float *g = m->grads_memory;
#pragma omp parallel for schedule(static) reduction(+ : sq)
    for (size_t i = 0; i < m->num_params; i++) sq += (double)g[i] * g[i];
    float norm = (float)sqrt(sq);
    m->grad_scale = clip_scale(norm, max_norm);
    return norm;
}

// AdamW (ctxkv/layout.h has the update and its constants) over every tensor not frozen
static void model_update(Model *m, const AdamW *opt) {
    if (!m->m_memory) {
        m->m_memory = calloc_check(m->num_params * sizeof(float), "AdamW m");
        m->v_memory = calloc_check(m->num_params * sizeof(float), "AdamW v");
    }
    const AdamWStep st = adamw_step(opt, ++m->adam_step);
    // The loop vectorizes (70m: 100 -> 35 ms an update) with the constants in locals (a store to
    // p could alias *opt) and sqrt free of errno (-fno-math-errno, in the Makefile).
    const float gs = m->grad_scale, b1 = opt->beta1, b2 = opt->beta2, eps = opt->eps;
    const float step_size = st.step_size, bc2_sqrt = st.bc2_sqrt;
    for (ptrdiff_t ti = 0; ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        if (t->frozen) continue;
        const float decay = adamw_decay(opt, t);
        float *p = m->params_memory + t->offset, *g = m->grads_memory + t->offset;
        float *mm = m->m_memory + t->offset, *vv = m->v_memory + t->offset;
        const size_t n = t->rows * t->cols;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            const float gi = g[i] * gs;
            p[i] *= decay;
            mm[i] = b1 * mm[i] + (1.0f - b1) * gi;
            vv[i] = b2 * vv[i] + (1.0f - b2) * gi * gi;
            p[i] -= step_size * mm[i] / (sqrtf(vv[i]) / bc2_sqrt + eps);
        }
    }
    m->grad_scale = 1.0f;
}

// ----------------------------------------------------------------------------
// The attention core: causal softmax attention over the sequence (training, prefill) and over
// the cache (decoding). H query heads share G key/value heads: query head h reads KV head
// h / (H/G) (G = H for MHA).

// A view of per-head vectors inside a (B,T,row) buffer: head h of token (b,t) starts at
// base + (b*T + t)*row_stride + h*head_stride. Lets one attention core read the fused QKV
// of MHA and the separate Q / KV projections of the other variants.
typedef struct { float *base; int row_stride, head_stride; } HeadView;

static inline float *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

// where the causal core finds one layer's q, k and v, how many key/value heads there are, and
// the q·k width (D, or D + d_R for MLA)
typedef struct { HeadView q, k, v; int kv_heads, dqk; } CoreViews;

// Causal softmax attention over one layer's views. H query heads share G = cv.kv_heads key/value
// heads: query head h reads KV head h / (H/G) (G = H for MHA). at->atty (B,T,H*Dv); the
// probabilities stay in at->att (B,H,T,T) for the backward.
static void attention_forward(AttnActs *at, CoreViews cv, int B, int T, int H, int Dv, float scale) {
    float *out = at->atty, *att = at->att;
    const HeadView q = cv.q, k = cv.k, v = cv.v;
    const int G = cv.kv_heads, Dqk = cv.dqk, group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            for (int t = 0; t < T; t++) {
                const float *qt = head_at(q, T, b, t, h);
                float *p = att + (((size_t)b * H + h) * T + t) * T;
                // p[s] = scale · q_t·k_s (eight keys at a time), softmax, o = Σ_s p[s] v_s (in registers)
                dot_rows(p, 1, head_at(k, T, b, 0, g), (size_t)k.row_stride, Dqk, qt, t + 1, 0.0f);
                for (int s = 0; s <= t; s++) p[s] *= scale;
                float inv = 1.0f / exp_shift_sum(p, t + 1, max_of(p, t + 1));
                for (int s = 0; s <= t; s++) p[s] *= inv;
                for (int s = t + 1; s < T; s++) p[s] = 0.0f;
                float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                memset(o, 0, Dv * sizeof(float));
                rows_axpy(o, p, head_at(v, T, b, 0, g), (size_t)v.row_stride, Dv, t + 1);
            }
        }
}

// dV_g += Σ_h Pᵀ·dO,  dP = dO·Vᵀ,  dS = P⊙(dP − rowsum(dP⊙P)),  dQ += scale·dS·K,  dK_g += scale·dSᵀ·Q.
// Into the gradient views dcv (+=), dP in dat->att. Parallel over (b, g) so the heads that share
// a KV head accumulate into it from one thread.
static void attention_backward(AttnActs *dat, CoreViews dcv, const AttnActs *at, CoreViews cv, int B, int T, int H, int Dv,
                               float scale) {
    float *datt = dat->att;
    const float *dout = dat->atty, *att = at->att;
    const HeadView dq = dcv.q, dk = dcv.k, dv = dcv.v, q = cv.q, k = cv.k, v = cv.v;
    const int G = cv.kv_heads, Dqk = cv.dqk, group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < G; g++)
            for (int h = g * group; h < (g + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const float *p = att + (((size_t)b * H + h) * T + t) * T;
                    float *dp = datt + (((size_t)b * H + h) * T + t) * T;
                    const float *dot_ = dout + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                    float rowsum = 0.0f;
                    for (int s = 0; s <= t; s++) {
                        dp[s] = dot(dot_, head_at(v, T, b, s, g), Dv);
                        axpy(head_at(dv, T, b, s, g), p[s], dot_, Dv);
                        rowsum += dp[s] * p[s];
                    }
                    const float *qt = head_at(q, T, b, t, h);
                    float *dqt = head_at(dq, T, b, t, h);
                    for (int s = 0; s <= t; s++) {
                        float ds = p[s] * (dp[s] - rowsum) * scale;
                        axpy(dqt, ds, head_at(k, T, b, s, g), Dqk);
                        axpy(head_at(dk, T, b, s, g), ds, qt, Dqk);
                    }
                }
}

// Each sequence's new token (query heads q, one row per sequence) attends over its kv->n_attend
// cached tokens in layer l, whose slots are [K of G heads | V of G heads]; out (B, H*D).
#define KV_BLOCK_SLOTS 64 // cached tokens per block: 64 KB at pythia-14m, read by every head while in L2
static void cached_attention(const Model *m, HeadView q, float *out, const KVCache *kv, int l, int G) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), n = kv->n_attend;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t per_head = kv_scratch_per_head(c, kv->capacity), pt = kv->per_token;
    const int per_group = H / G;
    // The slots go by in blocks, each head taking its scores (then its weighted values) from a
    // block while the block is in L2: one query against eight keys at a time (dot_rows), then
    // the values summed in registers (rows_axpy). Each block first comes from memory in one
    // sequential sweep (touch_rows): read head by head, 128 B of every 1 KB slot at a time, the
    // cache left the memory bus half idle (dev/bench_decode.py at batch 8: attention 0.9 -> 0.6 ms
    // a step). The work splits over sequences and, when there are fewer sequences than threads,
    // over groups of KV heads.
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    int parts = kv->batch >= nthreads ? 1 : (nthreads + kv->batch - 1) / kv->batch;
    if (parts > G) parts = G;
    const int tasks = kv->batch * parts;
#pragma omp parallel for schedule(static) if ((size_t)kv->batch * n * pt >= (1u << 16) && tasks > 1)
    for (int task = 0; task < tasks; task++) {
        const int b = task / parts, p = task % parts;
        const int g0 = G * p / parts, g1 = G * (p + 1) / parts, h0 = g0 * per_group, h1 = g1 * per_group;
        float *scores = kv->scratch + (size_t)b * H * per_head;
        const float *slots = kv_slot(kv, l, b, 0); // slot s at slots + s·pt
        for (int s0 = 0; s0 < n; s0 += KV_BLOCK_SLOTS) {
            const int len = n - s0 < KV_BLOCK_SLOTS ? n - s0 : KV_BLOCK_SLOTS;
            if (parts == 1) { // all heads: the block is one contiguous run
                touch_rows(slots + s0 * pt, pt, (int)pt, len);
            } else {
                touch_rows(slots + s0 * pt + g0 * D, pt, (g1 - g0) * D, len);       // K of this task's heads
                touch_rows(slots + s0 * pt + (G + g0) * D, pt, (g1 - g0) * D, len); // and V, for the second pass
            }
            for (int h = h0; h < h1; h++)
                dot_rows(scores + h * per_head + s0, 1, slots + s0 * pt + (h / per_group) * D, pt, D, head_at(q, 1, b, 0, h), len, 0.0f);
        }
        for (int h = h0; h < h1; h++) {
            float *sc = scores + h * per_head;
            for (int s = 0; s < n; s++) sc[s] *= scale;
            float inv = 1.0f / exp_shift_sum(sc, n, max_of(sc, n));
            for (int s = 0; s < n; s++) sc[s] *= inv;
            memset(out + ((size_t)b * H + h) * D, 0, D * sizeof(float));
        }
        for (int s0 = 0; s0 < n; s0 += KV_BLOCK_SLOTS) {
            const int len = n - s0 < KV_BLOCK_SLOTS ? n - s0 : KV_BLOCK_SLOTS;
            for (int h = h0; h < h1; h++)
                rows_axpy(out + ((size_t)b * H + h) * D, scores + h * per_head + s0, slots + s0 * pt + (G + h / per_group) * D, pt, D, len);
        }
    }
}

// ----------------------------------------------------------------------------
// Attention variants (doc/attention.md). Each variant is one stretch of code below and one row
// of ATTN_VARIANTS after them:
//   views              where the causal core finds q, k and v in the variant's activations
//   project_forward    q, k, v from x = LN_1(x_l) (B,T,C) at positions pos0.., RoPE applied
//   project_backward   its backward: dat holds dq, dk, dv from the core; accumulates into dx
//                      (B,T,C) and the layer's parameter gradients lg
//   cache_write        what the KV cache keeps of each token (attn_kv_elements in ctxkv/config.h),
//                      for n tokens of B sequences at once (prefill: the prompt; decode: n = 1)
//   decode             each sequence's new token (x: B rows, position kv->pos) into slot
//                      kv->write_slot, then attending over the kv->n_attend filled slots;
//                      writes at->atty (B, H*D)
// The output projection, the residual layer around it and the rest of the model are shared.

// ---- MHA: Pythia's own attention. Fused QKV, interleaved per head: [q | k | v] of head h at h*3D.

static CoreViews mha_views(const Config *c, const AttnActs *at) {
    const int C = c->n_embd, H = c->n_head, D = head_dim(c);
    CoreViews v = {{at->qkv, 3 * C, 3 * D}, {at->qkv + D, 3 * C, 3 * D}, {at->qkv + 2 * D, 3 * C, 3 * D}, H, D};
    return v;
}

static void mha_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, int B, int T, int pos0) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg);
    matmul_forward(at->qkv, x, lp->qkv_w, lp->qkv_b, B * T, C, 3 * C);
    rope_forward(at->qkv, B, T, pos0, 3 * C, H, 3 * D, &m->rope);     // q
    rope_forward(at->qkv + D, B, T, pos0, 3 * C, H, 3 * D, &m->rope); // k
}

static void mha_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 float *dx, const float *x, int B, int T) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg);
    (void)at;
    rope_backward(dat->qkv, B, T, 0, 3 * C, H, 3 * D, &m->rope);
    rope_backward(dat->qkv + D, B, T, 0, 3 * C, H, 3 * D, &m->rope);
    matmul_backward(dx, lg->qkv_w, lg->qkv_b, dat->qkv, x, lp->qkv_w, B * T, C, 3 * C);
}

// slot: [K of the H heads | V of the H heads] (the GQA layout with G = H)
static void mha_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    const int H = c->n_head, D = head_dim(c);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < n; t++) {
            const float *r = at->qkv + ((size_t)b * n + t) * 3 * H * D;
            float *slot = dst + b * seq_stride + (size_t)t * 2 * H * D;
            for (int g = 0; g < H; g++) {
                memcpy(slot + g * D, r + g * 3 * D + D, D * sizeof(float));
                memcpy(slot + (H + g) * D, r + g * 3 * D + 2 * D, D * sizeof(float));
            }
        }
}

static void mha_decode(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, KVCache *kv, int l) {
    mha_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    mha_cache_write(&m->cfg, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    const CoreViews v = mha_views(&m->cfg, at);
    cached_attention(m, v.q, at->atty, kv, l, v.kv_heads);
}

// ---- GQA / MQA (Ainslie et al. 2023; Shazeer 2019): G key/value heads, each shared by a group
// of H/G query heads (MQA: G = 1). q (H heads), then kv = [K of G heads | V of G heads].

static CoreViews gqa_views(const Config *c, const AttnActs *at) {
    const int H = c->n_head, D = head_dim(c), G = c->n_kv_head;
    CoreViews v = {{at->q, H * D, D}, {at->kv, 2 * G * D, D}, {at->kv + G * D, 2 * G * D, D}, G, D};
    return v;
}

static void gqa_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, int B, int T, int pos0) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg), G = m->cfg.n_kv_head;
    matmul_forward(at->q, x, lp->q_w, lp->q_b, B * T, C, H * D);
    matmul_forward(at->kv, x, lp->kv_w, lp->kv_b, B * T, C, 2 * G * D);
    rope_forward(at->q, B, T, pos0, H * D, H, D, &m->rope);
    rope_forward(at->kv, B, T, pos0, 2 * G * D, G, D, &m->rope); // the G key heads, before sharing
}

static void gqa_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 float *dx, const float *x, int B, int T) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg), G = m->cfg.n_kv_head;
    (void)at;
    rope_backward(dat->q, B, T, 0, H * D, H, D, &m->rope);
    rope_backward(dat->kv, B, T, 0, 2 * G * D, G, D, &m->rope);
    matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, B * T, C, H * D);
    matmul_backward(dx, lg->kv_w, lg->kv_b, dat->kv, x, lp->kv_w, B * T, C, 2 * G * D);
}

// slot: [K of the G heads | V of the G heads], as projected
static void gqa_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    const size_t w = 2 * (size_t)c->n_kv_head * head_dim(c);
    for (int b = 0; b < B; b++) memcpy(dst + b * seq_stride, at->kv + (size_t)b * n * w, n * w * sizeof(float));
}

static void gqa_decode(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, KVCache *kv, int l) {
    gqa_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    gqa_cache_write(&m->cfg, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    const CoreViews v = gqa_views(&m->cfg, at);
    cached_attention(m, v.q, at->atty, kv, l, v.kv_heads);
}

// ---- MLA (DeepSeek-V2, doc/attention.md): keys and values come from one latent per token,
//   ĉ = RMSNorm(W_DKV x) (kv_rank), [k_nope_h | v_h] = W_UK/UV_h ĉ,
// plus a decoupled RoPE key k_pe = RoPE(W_KR x) (d_R) shared by all heads; the query of head h is
// [q_nope_h | q_pe_h] (D + d_R), optionally from its own latent (q_rank). The cache keeps only ĉ
// and k_pe; decoding absorbs W_UK into the query and W_UV after the attention. A model converted
// from mha (doc/retrofit.md) rotates d_R as mla_rope_split groups (one per head) and may leave
// the latent linear (ĉ = W_DKV x, mla_linear_latent).

// RMSNorm (MLA's latent norms): y = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps). Weight only.
// inp rows are in_stride apart (MLA normalises the first kv_rank columns of a wider row).
static void rmsnorm_forward(float *out, float *rstd, const float *inp, int in_stride, const float *w, int N, int C,
                            float eps) {
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * in_stride;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + eps);
        for (int i = 0; i < C; i++) out[(size_t)n * C + i] = x[i] * r * w[i];
        rstd[n] = r;
    }
}

// dx += r·g − x·r³·mean(g⊙x), g = dy⊙w;  dw += Σ dy⊙x·r
static void rmsnorm_backward(float *dinp, int in_stride, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * in_stride, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * in_stride;
        float r = rstd[n], gx = 0.0f;
        for (int i = 0; i < C; i++) gx += dy[i] * w[i] * x[i];
        gx /= C;
        for (int i = 0; i < C; i++) dx[i] += r * dy[i] * w[i] - x[i] * r * r * r * gx;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += dout[(size_t)n * C + i] * inp[(size_t)n * in_stride + i] * rstd[n];
        dw[i] += s;
    }
}

// A linear latent (mla_linear_latent, doc/retrofit.md): ĉ = c, the first R of each kv_a row
// (rows kva_stride apart) copied to latent (BT, R); backward: the rows' gradients added back.
static void mla_copy_latent(float *latent, float *kv_a, int kva_stride, int BT, int R, int backward) {
    for (int n = 0; n < BT; n++) {
        if (backward) axpy(kv_a + (size_t)n * kva_stride, 1.0f, latent + (size_t)n * R, R);
        else memcpy(latent + (size_t)n * R, kv_a + (size_t)n * kva_stride, R * sizeof(float));
    }
}

// MLA: k[bt][h] = [k_nope_h (from kvb) | k_pe (shared by all heads)]
static void mla_gather_keys(float *k, const float *kvb, const float *kpe, int kpe_stride, int BT, int H, int D, int dR) {
    const int Dq = D + dR;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < BT; n++)
        for (int h = 0; h < H; h++) {
            float *dst = k + ((size_t)n * H + h) * Dq;
            memcpy(dst, kvb + ((size_t)n * H + h) * 2 * D, D * sizeof(float));
            memcpy(dst + D, kpe + (size_t)n * kpe_stride, dR * sizeof(float));
        }
}

// its backward: dk_nope to its head in dkvb, dk_pe summed over the heads that share it
static void mla_gather_keys_backward(float *dkvb, float *dkpe, int kpe_stride, const float *dk, int BT, int H, int D, int dR) {
    const int Dq = D + dR;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < BT; n++)
        for (int h = 0; h < H; h++) {
            const float *src = dk + ((size_t)n * H + h) * Dq;
            axpy(dkvb + ((size_t)n * H + h) * 2 * D, 1.0f, src, D);
            axpy(dkpe + (size_t)n * kpe_stride, 1.0f, src + D, dR);
        }
}

// q and k per head [nope (D) | rope (dR)]; v is the second half of kvb's head. The core sees H
// key heads: training materialises one key per query head (mla_gather_keys).
static CoreViews mla_views(const Config *c, const AttnActs *at) {
    const int H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, ATTN_MLA);
    CoreViews v = {{at->q, H * Dq, Dq}, {at->k, H * Dq, Dq}, {at->kvb + D, H * 2 * D, 2 * D}, H, Dq};
    return v;
}

static void mla_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, int B, int T, int pos0) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), R = c->kv_rank, dR = c->mla_rope_dim;
    const int Dq = D + dR, KVA = R + dR;
    if (c->q_rank > 0) { // query compression: q = W_UQ · RMSNorm(W_DQ x)
        matmul_forward(at->q_lat, x, lp->q_a_w, NULL, BT, C, c->q_rank);
        rmsnorm_forward(at->q_lat_norm, at->q_lat_rstd, at->q_lat, c->q_rank, lp->q_a_norm_w, BT, c->q_rank, c->rms_eps);
        matmul_forward(at->q, at->q_lat_norm, lp->q_b_w, NULL, BT, c->q_rank, H * Dq);
    } else {
        matmul_forward(at->q, x, lp->q_w, NULL, BT, C, H * Dq);
    }
    const int S = c->mla_rope_split, Rs = dR / S; // RoPE groups of Rs dims
    for (int s = 0; s < S; s++) rope_forward(at->q + D + s * Rs, B, T, pos0, H * Dq, H, Dq, &m->mla_rope); // q_pe
    matmul_forward(at->kv_a, x, lp->kv_a_w, NULL, BT, C, KVA);               // [c | k_R]
    rope_forward(at->kv_a + R, B, T, pos0, KVA, S, Rs, &m->mla_rope);        // k_pe
    if (c->mla_linear_latent) mla_copy_latent(at->c_norm, at->kv_a, KVA, BT, R, 0);
    else rmsnorm_forward(at->c_norm, at->c_rstd, at->kv_a, KVA, lp->kv_a_norm_w, BT, R, c->rms_eps);
    matmul_forward(at->kvb, at->c_norm, lp->kv_b_w, NULL, BT, R, H * 2 * D); // [k_nope | v]
    mla_gather_keys(at->k, at->kvb, at->kv_a + R, KVA, BT, H, D, dR);
}

static void mla_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 float *dx, const float *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), R = c->kv_rank, dR = c->mla_rope_dim;
    const int Dq = D + dR, KVA = R + dR;
    mla_gather_keys_backward(dat->kvb, dat->kv_a + R, KVA, dat->k, BT, H, D, dR);
    const int S = c->mla_rope_split, Rs = dR / S;
    rope_backward(dat->kv_a + R, B, T, 0, KVA, S, Rs, &m->mla_rope);
    for (int s = 0; s < S; s++) rope_backward(dat->q + D + s * Rs, B, T, 0, H * Dq, H, Dq, &m->mla_rope);
    matmul_backward(dat->c_norm, lg->kv_b_w, NULL, dat->kvb, at->c_norm, lp->kv_b_w, BT, R, H * 2 * D);
    if (c->mla_linear_latent) mla_copy_latent(dat->c_norm, dat->kv_a, KVA, BT, R, 1);
    else rmsnorm_backward(dat->kv_a, KVA, lg->kv_a_norm_w, dat->c_norm, at->kv_a, lp->kv_a_norm_w, at->c_rstd, BT, R);
    matmul_backward(dx, lg->kv_a_w, NULL, dat->kv_a, x, lp->kv_a_w, BT, C, KVA);
    if (c->q_rank > 0) {
        matmul_backward(dat->q_lat_norm, lg->q_b_w, NULL, dat->q, at->q_lat_norm, lp->q_b_w, BT, c->q_rank, H * Dq);
        rmsnorm_backward(dat->q_lat, c->q_rank, lg->q_a_norm_w, dat->q_lat_norm, at->q_lat, lp->q_a_norm_w, at->q_lat_rstd, BT, c->q_rank);
        matmul_backward(dx, lg->q_a_w, NULL, dat->q_lat, x, lp->q_a_w, BT, C, c->q_rank);
    } else {
        matmul_backward(dx, lg->q_w, NULL, dat->q, x, lp->q_w, BT, C, H * Dq);
    }
}

// slot: [ĉ (kv_rank) | k_pe (dR)]
static void mla_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    const int R = c->kv_rank, dR = c->mla_rope_dim;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < n; t++) {
            const size_t row = (size_t)b * n + t;
            float *slot = dst + b * seq_stride + (size_t)t * (R + dR);
            memcpy(slot, at->c_norm + row * R, R * sizeof(float));
            memcpy(slot + R, at->kv_a + row * (R + dR) + R, dR * sizeof(float));
        }
}

// The absorbed form: score_s = q_nope·W_UK ĉ_s + q_pe·k_pe_s = (W_UKᵀ q_nope)·ĉ_s + q_pe·k_pe_s,
// and o = W_UV Σ_s P_s ĉ_s, so only the cached latents and rope keys are ever read.
static void mla_decode(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, KVCache *kv, int l) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), R = c->kv_rank, dR = c->mla_rope_dim, n = kv->n_attend;
    const float scale = 1.0f / sqrtf((float)(D + dR));
    const size_t per_head = kv_scratch_per_head(c, kv->capacity);
    mla_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    mla_cache_write(c, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    const HeadView q = mla_views(c, at).q;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)kv->batch * n * (R + dR) >= PAR_MIN)
    for (int b = 0; b < kv->batch; b++)
        for (int h = 0; h < H; h++) {
            float *scores = kv->scratch + ((size_t)b * H + h) * per_head, *q_abs = scores + kv->capacity, *o_lat = q_abs + R;
            const float *qh = head_at(q, 1, b, 0, h);
            memset(q_abs, 0, R * sizeof(float)); // q̃ = W_UK_hᵀ q_nope   (R)
            for (int j = 0; j < D; j++) axpy(q_abs, qh[j], lp->kv_b_w + ((size_t)h * 2 * D + j) * R, R);
            for (int s = 0; s < n; s++) {
                const float *slot = kv_slot(kv, l, b, s);
                scores[s] = scale * (dot(q_abs, slot, R) + dot(qh + D, slot + R, dR));
            }
            float inv = 1.0f / exp_shift_sum(scores, n, max_of(scores, n));
            memset(o_lat, 0, R * sizeof(float)); // ō = Σ P ĉ   (R)
            for (int s = 0; s < n; s++) axpy(o_lat, scores[s] * inv, kv_slot(kv, l, b, s), R);
            float *o = at->atty + ((size_t)b * H + h) * D;
            for (int j = 0; j < D; j++) o[j] = dot(lp->kv_b_w + ((size_t)h * 2 * D + D + j) * R, o_lat, R); // W_UV_h ō
        }
}

// ---- Context-KV (doc/context_kv.md): layer 0 attends over contexts instead of tokens. A
// ContextBlock runs the recurrence c_t = LN_c(c_{t-1} + GELU(W_c [c_{t-1}; LN_e(e_t)] + b_c)) over the
// token embeddings; query t attends over M slots, slot k holding the key/value of the context at
// t − k·I. The block is trained first and alone (phase 1: OACD, by parallel Jacobi iteration) and
// then frozen, so its contexts are constants for the rest of the model (phase 2).

// Context-KV attention (layer 0, doc/context_kv.md). Query t attends over M slots: slot k
// holds the key/value of the context at s = t − k·I when s >= 0; empty slots are masked out.
// No positional encoding: the slot order and the recurrence carry position.
// q, kc, vc (B,T,H*D) (kc/vc indexed by the source position s) in at, out at->atty (B,T,H*D),
// the probabilities kept in at->att (B,H,T,M).
static void ctx_attention_forward(AttnActs *at, int B, int T, int H, int D, int interval, int M) {
    float *out = at->atty, *att = at->att;
    const float *q = at->q, *kc = at->kc, *vc = at->vc;
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * C + h * D;
                float *p = att + (((size_t)b * H + h) * T + t) * M;
                int n = 0; // filled slots: s = t, t−I, … while s >= 0
                for (int k = 0; k < M && t - k * interval >= 0; k++, n++)
                    p[k] = scale * dot(qt, kc + ((size_t)b * T + t - k * interval) * C + h * D, D);
                float inv = 1.0f / exp_shift_sum(p, n, max_of(p, n));
                for (int k = 0; k < M; k++) p[k] = k < n ? p[k] * inv : 0.0f;
                float *o = out + ((size_t)b * T + t) * C + h * D;
                memset(o, 0, D * sizeof(float));
                for (int k = 0; k < n; k++) axpy(o, p[k], vc + ((size_t)b * T + t - k * interval) * C + h * D, D);
            }
}

// dV_s += P·dO, dP = dO·V_s, dS = P⊙(dP − Σ P⊙dP), dq += scale·Σ dS·K_s, dK_s += scale·dS·q.
// Parallel over (b, h): the slots of different t share source positions, so t stays serial.
static void ctx_attention_backward(AttnActs *dat, const AttnActs *at, int B, int T, int H, int D, int interval, int M) {
    float *dq = dat->q, *dkc = dat->kc, *dvc = dat->vc, *datt = dat->att;
    const float *dout = dat->atty, *att = at->att, *q = at->q, *kc = at->kc, *vc = at->vc;
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * M;
                float *dp = datt + (((size_t)b * H + h) * T + t) * M;
                const float *dot_ = dout + ((size_t)b * T + t) * C + h * D, *qt = q + ((size_t)b * T + t) * C + h * D;
                float *dqt = dq + ((size_t)b * T + t) * C + h * D;
                float rowsum = 0.0f;
                int n = 0;
                for (int k = 0; k < M && t - k * interval >= 0; k++, n++) {
                    size_t src = ((size_t)b * T + t - k * interval) * C + h * D;
                    dp[k] = dot(dot_, vc + src, D);
                    axpy(dvc + src, p[k], dot_, D);
                    rowsum += dp[k] * p[k];
                }
                for (int k = 0; k < n; k++) {
                    size_t src = ((size_t)b * T + t - k * interval) * C + h * D;
                    float ds = p[k] * (dp[k] - rowsum) * scale;
                    axpy(dqt, ds, kc + src, D);
                    axpy(dkc + src, ds, qt, D);
                }
            }
}

// q from the token; keys and values of every context (constants: no gradient flows into them)
static void ctx_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, int B, int T, int pos0) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd;
    (void)pos0; // no positional encoding: the slot order and the recurrence carry position
    matmul_forward(at->q, x, lp->q_w, lp->q_b, BT, C, C);
    matmul_forward(at->kc, m->a.contexts, lp->k_w, lp->k_b, BT, c->context_dim, C);
    matmul_forward(at->vc, m->a.contexts, lp->v_w, lp->v_b, BT, c->context_dim, C);
}

static void ctx_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 float *dx, const float *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd;
    (void)at;
    matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, BT, C, C);
    matmul_backward(NULL, lg->k_w, lg->k_b, dat->kc, m->a.contexts, lp->k_w, BT, c->context_dim, C);
    matmul_backward(NULL, lg->v_w, lg->v_b, dat->vc, m->a.contexts, lp->v_w, BT, c->context_dim, C);
}

// Slot k of the new token at n−1 = kv->pos is the context of position n−1 − k·I, while it exists; its key
// and value are recomputed from the ring (kvcache_push_context keeps the contexts there).
static void ctx_decode(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, KVCache *kv, int l) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), C = c->n_embd, I = c->context_interval, dc = c->context_dim, n = kv->pos + 1;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t per_head = kv_scratch_per_head(c, kv->capacity);
    (void)l;
    matmul_forward(at->q, x, lp->q_w, lp->q_b, kv->batch, C, C); // only the query: the slots come from the ring
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)kv->batch * n * dc >= PAR_MIN)
    for (int b = 0; b < kv->batch; b++)
        for (int h = 0; h < H; h++) {
            float *scores = kv->scratch + ((size_t)b * H + h) * per_head;
            float *keys = scores + kv->capacity + 2 * c->kv_rank, *vals = keys + (size_t)c->max_contexts * D;
            const float *qh = at->q + (size_t)b * C + h * D;
            int slots = 0;
            for (int k = 0; k < c->max_contexts && n - 1 - k * I >= 0; k++, slots++) {
                const float *ctx = kv->ring + ((size_t)b * kv->ring_len + (n - 1 - k * I) % kv->ring_len) * dc;
                for (int j = 0; j < D; j++) { // this head's rows of W_k and W_v
                    keys[k * D + j] = dot(lp->k_w + (size_t)(h * D + j) * dc, ctx, dc) + lp->k_b[h * D + j];
                    vals[k * D + j] = dot(lp->v_w + (size_t)(h * D + j) * dc, ctx, dc) + lp->v_b[h * D + j];
                }
                scores[k] = scale * dot(qh, keys + k * D, D);
            }
            float inv = 1.0f / exp_shift_sum(scores, slots, max_of(scores, slots));
            float *o = at->atty + ((size_t)b * H + h) * D;
            memset(o, 0, D * sizeof(float));
            for (int k = 0; k < slots; k++) axpy(o, scores[k] * inv, vals + k * D, D);
        }
}

static void blockacts_ensure(BlockActs *cb, int N, int E, int dc) {
    if (N <= cb->cap) return;
    free(cb->u); // one allocation, u is its start
    size_t per_row = (size_t)E * 4 + (size_t)(dc + E) * 2 + (size_t)dc * 6 + 4;
    float *p = malloc_check((size_t)N * per_row * sizeof(float), "context block");
#define TAKE(ptr, n) do { cb->ptr = p; p += (size_t)N * (n); } while (0)
    TAKE(u, E); TAKE(u_mean, 1); TAKE(u_rstd, 1); TAKE(z, dc + E); TAKE(pre, dc); TAKE(g, dc);
    TAKE(r, dc); TAKE(r_mean, 1); TAKE(r_rstd, 1); TAKE(out, dc);
    TAKE(dr, dc); TAKE(dpre, dc); TAKE(dz, dc + E); TAKE(du, E); TAKE(dE, E);
#undef TAKE
    cb->cap = N;
}

static void contextblock_forward(BlockActs *cb, const Params *p, const float *S, const float *E, int N, int Ed, int dc,
                                 float eps) {
    layernorm_forward(cb->u, cb->u_mean, cb->u_rstd, E, p->ctx_ln_e_w, p->ctx_ln_e_b, N, Ed, eps);
    for (int n = 0; n < N; n++) { // z = [S ; u]
        memcpy(cb->z + (size_t)n * (dc + Ed), S + (size_t)n * dc, dc * sizeof(float));
        memcpy(cb->z + (size_t)n * (dc + Ed) + dc, cb->u + (size_t)n * Ed, Ed * sizeof(float));
    }
    matmul_forward(cb->pre, cb->z, p->ctx_w, p->ctx_b, N, dc + Ed, dc);
    gelu_forward(cb->g, cb->pre, (size_t)N * dc);
    for (size_t i = 0; i < (size_t)N * dc; i++) cb->r[i] = S[i] + cb->g[i];
    layernorm_forward(cb->out, cb->r_mean, cb->r_rstd, cb->r, p->ctx_ln_c_w, p->ctx_ln_c_b, N, dc, eps);
}

// Gradients of the block's parameters only (into g): S is a constant (detached iterate) and
// E belongs to the frozen embeddings, so their gradients are not formed.
static void contextblock_backward(BlockActs *cb, const Params *p, Params *g, const float *dout, const float *E, int N,
                                  int Ed, int dc) {
    memset(cb->dr, 0, (size_t)N * dc * sizeof(float));
    layernorm_backward(cb->dr, g->ctx_ln_c_w, g->ctx_ln_c_b, dout, cb->r, p->ctx_ln_c_w, cb->r_mean, cb->r_rstd, N, dc);
    memset(cb->dpre, 0, (size_t)N * dc * sizeof(float));
    gelu_backward(cb->dpre, cb->pre, cb->dr, (size_t)N * dc); // dr reaches g through the residual
    memset(cb->dz, 0, (size_t)N * (dc + Ed) * sizeof(float));
    matmul_backward(cb->dz, g->ctx_w, g->ctx_b, cb->dpre, cb->z, p->ctx_w, N, dc + Ed, dc);
    for (int n = 0; n < N; n++) memcpy(cb->du + (size_t)n * Ed, cb->dz + (size_t)n * (dc + Ed) + dc, Ed * sizeof(float));
    memset(cb->dE, 0, (size_t)N * Ed * sizeof(float));
    layernorm_backward(cb->dE, g->ctx_ln_e_w, g->ctx_ln_e_b, cb->du, E, p->ctx_ln_e_w, cb->u_mean, cb->u_rstd, N, Ed);
}

// The exact recurrence c_t = ContextBlock(c_{t-1}, e_t), c_{-1} = 0 at each sequence start,
// from the current embed_in: one time step after another, the B sequences of a step at once.
// Writes m->a.contexts (B,T,d_c). No gradient is ever formed through it (constants).
static void compute_contexts(Model *m, const int *inputs, int B, int T) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim;
    blockacts_ensure(&m->cb, B, Ed, dc);
    float *prev = malloc_check((size_t)B * dc * sizeof(float), "contexts"), *emb = malloc_check((size_t)B * Ed * sizeof(float), "contexts");
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) {
            const float *cp = t > 0 ? m->a.contexts + ((size_t)b * T + t - 1) * dc : NULL;
            if (cp) memcpy(prev + (size_t)b * dc, cp, dc * sizeof(float));
            else memset(prev + (size_t)b * dc, 0, dc * sizeof(float));
            memcpy(emb + (size_t)b * Ed, m->p.embed_in + (size_t)inputs[b * T + t] * Ed, Ed * sizeof(float));
        }
        contextblock_forward(&m->cb, &m->p, prev, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) memcpy(m->a.contexts + ((size_t)b * T + t) * dc, m->cb.out + (size_t)b * dc, dc * sizeof(float));
    }
    free(prev);
    free(emb);
}

// stores context c_pos of sequence b in the ring and as its running context
static void kvcache_push_context(const Config *c, KVCache *kv, int b, int pos, const float *ctx) {
    const int dc = c->context_dim;
    if (kv->ring_len) memcpy(kv->ring + ((size_t)b * kv->ring_len + pos % kv->ring_len) * dc, ctx, dc * sizeof(float));
    memcpy(kv->running + (size_t)b * dc, ctx, dc * sizeof(float));
}

// OACD diversity loss on rows X (N,d), per slice of `slice` consecutive rows, averaged:
//   L_slice = −||X − 1μᵀ||_F / n + λ·||μ||²,   μ = mean of the slice's n rows
// The Frobenius norm is not squared: it rewards spread without letting one direction dominate.
static float oacd_forward(const float *X, int N, int d, int slice, float lambda) {
    double total = 0.0;
    int n_slices = 0;
    for (int s0 = 0; s0 < N; s0 += slice, n_slices++) {
        int n = N - s0 < slice ? N - s0 : slice;
        double mu_sq = 0.0, dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            double mu = 0.0;
            for (int i = 0; i < n; i++) mu += X[(size_t)(s0 + i) * d + j];
            mu /= n;
            mu_sq += mu * mu;
            for (int i = 0; i < n; i++) { double e = X[(size_t)(s0 + i) * d + j] - mu; dev_sq += e * e; }
        }
        total += -sqrt(dev_sq) / n + lambda * mu_sq;
    }
    return (float)(total / n_slices);
}

// dX_t = (−(X_t − μ)/||X − 1μᵀ||_F + 2λμ) / n per slice, / number of slices. (The centring
// drops out of the first term because the deviations of a slice sum to zero.)
static void oacd_backward(float *dX, const float *X, int N, int d, int slice, float lambda) {
    int n_slices = (N + slice - 1) / slice;
    float *mu = malloc_check(d * sizeof(float), "oacd");
    for (int s0 = 0; s0 < N; s0 += slice) {
        int n = N - s0 < slice ? N - s0 : slice;
        double dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            double m_ = 0.0;
            for (int i = 0; i < n; i++) m_ += X[(size_t)(s0 + i) * d + j];
            mu[j] = (float)(m_ / n);
            for (int i = 0; i < n; i++) { double e = X[(size_t)(s0 + i) * d + j] - mu[j]; dev_sq += e * e; }
        }
        float F = (float)sqrt(dev_sq), inv_F = F > 1e-12f ? 1.0f / F : 0.0f;
        float scale = 1.0f / ((float)n * n_slices);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < d; j++) {
                size_t idx = (size_t)(s0 + i) * d + j;
                dX[idx] = scale * (-(X[idx] - mu[j]) * inv_F + 2.0f * lambda * mu[j]);
            }
    }
    free(mu);
}

// The parallel fixed-point (Jacobi) iteration of the recurrence over every position at once:
//   S = shift(P) (+ noise), O = ContextBlock(S, E), P <- O.
// Position t is exact after t+1 iterations without noise, so T iterations give the exact
// recurrence (the harness checks this). E (B,T,Ed) embeddings, P (B,T,d_c) in/out.
static void jacobi_shift(float *S, const float *P, int B, int T, int dc, float noise, uint64_t *rng) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *dst = S + ((size_t)b * T + t) * dc;
            if (t == 0) memset(dst, 0, dc * sizeof(float)); // each sequence starts from c_{-1} = 0
            else memcpy(dst, P + ((size_t)b * T + t - 1) * dc, dc * sizeof(float));
            if (noise > 0.0f)
                for (int j = 0; j < dc; j++) dst[j] += noise * random_normal(rng);
        }
}

typedef struct { float loss, converged; int iters; } Phase1Stats;

// Phase 1 on one batch: Jacobi iterations, each one OACD loss and one Adam step on the block
// (everything else frozen), until the converged fraction reaches p1_stop or p1_iters run out.
static Phase1Stats phase1_round(Model *m, const Args *a, const int *tokens, int B, int T, uint64_t *rng, int round) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim, N = B * T;
    blockacts_ensure(&m->cb, N, Ed, dc);
    float *E = malloc_check((size_t)N * Ed * sizeof(float), "phase 1"), *P = malloc_check((size_t)N * dc * sizeof(float), "phase 1");
    float *S = malloc_check((size_t)N * dc * sizeof(float), "phase 1"), *dO = malloc_check((size_t)N * dc * sizeof(float), "phase 1");
    embedding_forward(E, tokens, m->p.embed_in, N, Ed);
    for (size_t i = 0; i < (size_t)N * dc; i++) P[i] = 0.01f * random_normal(rng);
    model_ensure_grads(m);
    AdamW opt = {a->p1_lr, a->beta1, a->beta2, a->eps, 0.0f}; // Adam: no weight decay
    Phase1Stats st = {0};
    for (int it = 0; it < a->p1_iters; it++) {
        jacobi_shift(S, P, B, T, dc, a->p1_noise, rng);
        contextblock_forward(&m->cb, &m->p, S, E, N, Ed, dc, c->ln_eps);
        const float *O = m->cb.out;
        st.loss = oacd_forward(O, N, dc, a->oacd_slice, a->oacd_lambda);
        model_zero_grad(m);
        oacd_backward(dO, O, N, dc, a->oacd_slice, a->oacd_lambda);
        contextblock_backward(&m->cb, &m->p, &m->g, dO, E, N, Ed, dc);
        float norm = model_clip_grad_norm(m, a->p1_clip);
        if (!isfinite(st.loss) || !isfinite(norm)) die("phase 1 round %d iteration %d: loss %g / grad norm %g is not finite", round, it, st.loss, norm);
        model_update(m, &opt);
        int conv = 0;
        for (int n = 0; n < N; n++) {
            float d2 = 0.0f;
            for (int j = 0; j < dc; j++) { float d = O[(size_t)n * dc + j] - P[(size_t)n * dc + j]; d2 += d * d; }
            conv += d2 / dc < a->p1_tol;
        }
        st.converged = (float)conv / N;
        st.iters = it + 1;
        memcpy(P, O, (size_t)N * dc * sizeof(float)); // detached: the next iterate
        printf("phase 1 round %d iter %d | oacd loss %.5f | converged %.3f | norm %.3f\n", round, it + 1, st.loss, st.converged, norm);
        fflush(stdout);
        if (st.converged >= a->p1_stop) break;
    }
    free(E); free(P); free(S); free(dO);
    return st;
}

// ---- The variants, indexed by layer kind (attn_type, or ATTN_CTX for a ctxkv layer 0)

typedef struct {
    CoreViews (*views)(const Config *c, const AttnActs *at); // NULL: Context-KV attends over its slots
    void (*project_forward)(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, int B, int T, int pos0);
    void (*project_backward)(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                             float *dx, const float *x, int B, int T);
    // rows b·n + t (b < B, t < n) into the slots dst + b·seq_stride + t·attn_kv_elements; NULL: contexts go to the ring
    void (*cache_write)(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride);
    void (*decode)(const Model *m, const LayerParams *lp, AttnActs *at, const float *x, KVCache *kv, int l);
} AttnVariant;

static const AttnVariant ATTN_VARIANTS[] = {
    {mha_views, mha_project_forward, mha_project_backward, mha_cache_write, mha_decode}, // ATTN_MHA
    {gqa_views, gqa_project_forward, gqa_project_backward, gqa_cache_write, gqa_decode}, // ATTN_GQA
    {gqa_views, gqa_project_forward, gqa_project_backward, gqa_cache_write, gqa_decode}, // ATTN_MQA: G = 1
    {mla_views, mla_project_forward, mla_project_backward, mla_cache_write, mla_decode}, // ATTN_MLA
    {NULL, ctx_project_forward, ctx_project_backward, NULL, ctx_decode},                 // ATTN_CTX
};

// ----------------------------------------------------------------------------
// The whole model: the attention block, the Pythia layer and the head (ctxkv/pythia.h, shared
// with the mirror), then forward and backward

#include "ctxkv/pythia.h"

// Forward pass. inputs/targets (B,T); targets may be NULL (inference). Returns the mean loss
// (or -1 without targets). Logits are left in m->a.logits (B,T,Vp).
static float model_forward(Model *m, const int *inputs, const int *targets, int B, int T) {
    const Config *c = &m->cfg;
    const int C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size, BT = B * T;
    check_batch(c, inputs, targets, B, T);
    model_ensure_acts(m, B, T);
    m->B = B;
    m->T = T;
    memcpy(m->inputs, inputs, BT * sizeof(int));
    if (targets) memcpy(m->targets, targets, BT * sizeof(int));
    Acts *a = &m->a;
    if (has_context_block(c)) compute_contexts(m, inputs, B, T);
    if (c->model_type == MODEL_CTXPYTHIA) memcpy(a->resid, a->contexts, (size_t)BT * C * sizeof(float)); // x_0 = contexts
    else embedding_forward(a->resid, inputs, m->p.embed_in, BT, C);
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, a->resid + (size_t)(l + 1) * BT * C, a->resid + (size_t)l * BT * C, B, T, NULL);
    head_forward(m, BT);
    m->mean_loss = -1.0f;
    if (targets) m->mean_loss = crossentropy_forward(a->losses, a->lse, a->logits, targets, BT, V, Vp, &m->n_valid);
    return m->mean_loss;
}

// Backward of the last forward (which must have had targets). Accumulates into m->g.
// Overwrites the logits with dlogits.
static void model_backward(Model *m) {
    const Config *c = &m->cfg;
    if (m->mean_loss < 0.0f) die("model_backward called without a forward pass with targets");
    const int B = m->B, T = m->T, BT = B * T, C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size;
    model_ensure_grads(m);
    size_t need = layout_acts(c, B, T, NULL, NULL, &m->ga);
    if (need > m->gacts_cap) {
        free(m->gacts_memory);
        m->gacts_memory = (char *)malloc_check(need, "activation gradients");
        m->gacts_cap = need;
    }
    layout_acts(c, B, T, m->gacts_memory, NULL, &m->ga);
    Acts *a = &m->a;
    GradActs *ga = &m->ga;
    if (m->n_valid == 0) return; // every target ignored: the loss is a constant

    float *dlogits = a->logits;
    crossentropy_backward(dlogits, a->lse, m->targets, BT, V, Vp, m->n_valid);
    memset(ga->dlnf, 0, (size_t)BT * C * sizeof(float));
    matmul_backward(ga->dlnf, m->g.embed_out, NULL, dlogits, a->lnf, m->p.embed_out, BT, C, Vp);
    memset(ga->dresid, 0, (size_t)BT * C * sizeof(float));
    float *xL = a->resid + (size_t)c->n_layer * BT * C;
    layernorm_backward(ga->dresid, m->g.lnf_w, m->g.lnf_b, ga->dlnf, xL, m->p.lnf_w, a->lnf_mean, a->lnf_rstd, BT, C);
    for (int l = c->n_layer - 1; l >= 0; l--) layer_backward(m, l, a->resid + (size_t)l * BT * C, B, T);
    // ctxpythia's input is the contexts, constants: embed_in gets no gradient (it stays frozen)
    if (c->model_type != MODEL_CTXPYTHIA) embedding_backward(m->g.embed_in, ga->dresid, m->inputs, BT, C);
}

// ----------------------------------------------------------------------------
// KV-cached decoding: prefill the prompts in one forward pass, then one token per sequence at a
// time through every layer's variant decode. The policy (ctxkv/kvpolicy.h) says which slots hold
// which tokens; the variants only see slots.

// what ctxkv/decode.h needs: the prefill's attention rows, and moving kept slots
static void *device_alloc(size_t bytes, const char *what) { return calloc_check(bytes, what); }
static void device_release(void *p) { free(p); }

static void model_att_rows(const Model *m, int l, int b, int h, int t0, int rows, int n, float *out) {
    memcpy(out, m->a.layer[l].at.att + (((size_t)b * m->cfg.n_head + h) * n + t0) * n, (size_t)rows * n * sizeof(float));
}

static void kvcache_gather(const Config *c, KVCache *kv, int l, int b, const float *stage, const int *keep) {
    const int budget = kv->policy.budget;
    for (int u = 0; u < kv_units(c, c->attn_type); u++) {
        size_t off[2];
        const int run = kv_unit_runs(c, c->attn_type, u, off);
        for (int i = 0; i < budget; i++) {
            const float *src = stage + (size_t)keep[u * budget + i] * kv->per_token;
            float *dst = kv_slot(kv, l, b, i);
            for (int r = 0; r < (off[1] != off[0] ? 2 : 1); r++) memcpy(dst + off[r], src + off[r], run * sizeof(float));
        }
    }
}

#include "ctxkv/decode.h"

// Prefill: the B prompts (B,n) in one forward pass, then their keys/values (or latents, or
// contexts) into the cache, compressed when the policy says so. Returns the logits of the last
// prompt tokens: row b at b * *row_stride (Vp: the head ran on those rows only, head_last_of).
// The logits (here and from model_decode_step) are the caller's until the next call: sampling
// overwrites them in place.
static float *model_prefill(Model *m, KVCache *kv, const int *prompts, int n, size_t *row_stride) {
    const Config *c = &m->cfg;
    const int B = kv->batch;
    m->head_last_of = n; // only the last prompt token's logits are read
    model_forward(m, prompts, NULL, B, n);
    m->head_last_of = 0;
    kvcache_fill_prompt(m, kv, n);
    *row_stride = c->padded_vocab_size;
    return m->a.logits;
}

// One token per sequence (tokens[B]) at position kv->pos through the model, reading the
// cache. Returns the logits (B,Vp).
static float *model_decode_step(Model *m, KVCache *kv, const int *tokens) {
    const Config *c = &m->cfg;
    const int B = kv->batch, C = c->n_embd, dc = c->context_dim, Ed = c->embed_dim;
    kvcache_step_begin(kv);
    check_batch(c, tokens, NULL, B, 1);
    model_ensure_acts(m, B, 1);
    if (has_context_block(c)) { // c_t = ContextBlock(c_{t−1}, e_t), c_{−1} = 0
        blockacts_ensure(&m->cb, B, Ed, dc);
        if (kv->pos == 0) memset(kv->running, 0, (size_t)B * dc * sizeof(float));
        float *emb = malloc_check((size_t)B * Ed * sizeof(float), "decode");
        embedding_forward(emb, tokens, m->p.embed_in, B, Ed);
        contextblock_forward(&m->cb, &m->p, kv->running, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) kvcache_push_context(c, kv, b, kv->pos, m->cb.out + (size_t)b * dc);
        free(emb);
    }
    if (c->model_type == MODEL_CTXPYTHIA) memcpy(m->a.resid, kv->running, (size_t)B * C * sizeof(float));
    else embedding_forward(m->a.resid, tokens, m->p.embed_in, B, C);
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, m->a.resid + (size_t)(l + 1) * B * C, m->a.resid + (size_t)l * B * C, B, 1, kv);
    head_forward(m, B);
    kvcache_step_end(kv);
    return m->a.logits;
}

// ----------------------------------------------------------------------------
// What ctxkv/eval.h and ctxkv/train.h need from this program, then the shared driver and main

static const float *model_losses(const Model *m) { return m->a.losses; }
static void model_sync(void) {}

#define PROGRAM_WHAT "Trains a Pythia (GPT-NeoX) model on token shards, fp32 on the CPU."
static void device_banner(char *buf, size_t n) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    snprintf(buf, n, "CPU fp32, %d thread%s", threads, threads == 1 ? "" : "s");
}

// the memory a training step needs (activations, their gradients, parameters, gradients, AdamW)
static void check_training_memory(Model *m, int B, int T) {
    double need = (double)layout_acts(&m->cfg, B, T, NULL, &m->a, NULL) + (double)layout_acts(&m->cfg, B, T, NULL, NULL, &m->ga) +
                  16.0 * m->num_params;
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > 0.9 * have)
        die("-b %d -t %d need about %.1f GiB (activations, gradients, AdamW state), more than this machine's %.1f GiB; lower -b or -t",
            B, T, need / (1 << 30), have / (1 << 30));
}

#include "ctxkv/train.h"
