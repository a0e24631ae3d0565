// ctxkv/layout.h: the parameter tensors of every variant in checkpoint order (the one place that
// defines that order, for both programs and prepro/ckpt.py), and the activation buffers of a
// (B,T) batch. Both are laid out in one block each, as llm.c does. Last, AdamW's hyperparameters
// and the per-step, per-tensor constants both programs' model_update use.
//
// The includer defines floatX, the type parameters and activations are stored in (float in
// train_ctxkv.c; bf16 or float in train_ctxkv.cu), and PARAM_ALIGN_BYTES, where each parameter
// tensor starts in its block (the CPU: no padding; the GPU: 256, so cuBLASLt gets aligned
// operands). Per-row statistics (LayerNorm mean/rstd, ...) and losses are always float.
#ifndef CTXKV_LAYOUT_H
#define CTXKV_LAYOUT_H
#include "config.h"

// ----------------------------------------------------------------------------
// Parameters (doc/formats.md)

typedef struct {
    floatX *ln1_w, *ln1_b;      // (C) input_layernorm
    floatX *ln2_w, *ln2_b;      // (C) post_attention_layernorm
    // attention: which of these exist depends on attn_type (doc/formats.md); the rest are NULL
    floatX *qkv_w, *qkv_b;      // mha (3C, C), (3C): row h*3D + s*D + j, s = 0 q, 1 k, 2 v (HF interleaved per head)
    floatX *q_w, *q_b;          // gqa/mqa (H*D, C), (H*D);  mla without q_rank: q_w (H*(D+dR), C), no bias
    floatX *kv_w, *kv_b;        // gqa/mqa (2*G*D, C), (2*G*D): K heads, then V heads
    floatX *q_a_w, *q_a_norm_w, *q_b_w; // mla with q_rank: (q_rank, C), (q_rank), (H*(D+dR), q_rank)
    floatX *kv_a_w, *kv_a_norm_w;       // mla: (kv_rank+dR, C) latent rows then k_R rows, (kv_rank; none with a linear latent)
    floatX *kv_b_w;                     // mla: (H*2D, kv_rank), per head [W_UK (D rows) | W_UV (D rows)]
    floatX *k_w, *k_b, *v_w, *v_b;      // ctxkv layer 0: (C, d_c), (C) each; its q_w/q_b are (C, C), (C)
    floatX *dense_w, *dense_b;  // (C, H*D), (C)
    floatX *fc_w, *fc_b;        // (F, C), (F) dense_h_to_4h
    floatX *proj_w, *proj_b;    // (C, F), (C) dense_4h_to_h
} LayerParams;

typedef struct {
    floatX *embed_in;           // (Vp, E), E = embed_dim
    // ContextBlock (ctxkv / ctxpythia): c_t = LN_c(c_{t-1} + GELU(W_c [c_{t-1}; LN_e(e_t)] + b_c))
    floatX *ctx_ln_e_w, *ctx_ln_e_b;    // (E)
    floatX *ctx_w, *ctx_b;              // (d_c, d_c + E), (d_c)
    floatX *ctx_ln_c_w, *ctx_ln_c_b;    // (d_c)
    LayerParams *layer;        // [L]
    floatX *lnf_w, *lnf_b;      // (C)
    floatX *embed_out;          // (Vp, C) untied head, no bias
} Params;

typedef struct {
    char name[48];
    size_t rows, cols;         // a 1-D tensor has rows == 1
    size_t offset;             // in floats, from the start of the parameter block (checkpoint order)
    size_t dev_offset;         // in elements, from the start of the program's block (PARAM_ALIGN_BYTES aligned)
    int frozen;                // not updated (and not decayed) by the optimizer
} ParamTensor;

static size_t param_align(size_t n) {
    const size_t a = PARAM_ALIGN_BYTES / sizeof(floatX) > 0 ? PARAM_ALIGN_BYTES / sizeof(floatX) : 1;
    return (n + a - 1) / a * a;
}

// Walks the parameter order once. With base == NULL it only counts; otherwise it points
// every tensor of P into base (the program's block, at the aligned offsets). If table != NULL,
// appends a descriptor per tensor. Returns the number of parameters (the checkpoint's);
// *dev_size (if not NULL) receives the block's size in elements (with the alignment padding).
// This is the one place that defines the checkpoint order.
static size_t layout_params(const Config *c, floatX *base, Params *P, ParamTensor **table, size_t *dev_size) {
    size_t off = 0, dev_off = 0;
    const size_t C = c->n_embd, F = c->n_inner, Vp = c->padded_vocab_size;
#define TENSOR(field, label, r, k)                                                                         \
    do {                                                                                                   \
        if (P) field = base ? base + dev_off : NULL;                                                       \
        if (table) {                                                                                       \
            ParamTensor t_ = {};                                                                           \
            t_.rows = (r); t_.cols = (k); t_.offset = off; t_.dev_offset = dev_off;                        \
            snprintf(t_.name, sizeof t_.name, "%s", label);                                                \
            arrput(*table, t_);                                                                            \
        }                                                                                                  \
        off += (size_t)(r) * (k);                                                                          \
        dev_off += param_align((size_t)(r) * (k));                                                         \
    } while (0)
    char name[48];
    const size_t E = c->embed_dim, dc = c->context_dim;
    TENSOR(P->embed_in, "embed_in", Vp, E);
    if (has_context_block(c)) {
        TENSOR(P->ctx_ln_e_w, "ctx_ln_e_w", 1, E);
        TENSOR(P->ctx_ln_e_b, "ctx_ln_e_b", 1, E);
        TENSOR(P->ctx_w, "ctx_w", dc, dc + E);
        TENSOR(P->ctx_b, "ctx_b", 1, dc);
        TENSOR(P->ctx_ln_c_w, "ctx_ln_c_w", 1, dc);
        TENSOR(P->ctx_ln_c_b, "ctx_ln_c_b", 1, dc);
    }
    for (int l = 0; l < c->n_layer; l++) {
        LayerParams *lp = P ? &P->layer[l] : NULL;
#define LTENSOR(field, label, r, k) do { snprintf(name, sizeof name, "layer%d.%s", l, label); TENSOR(lp->field, name, r, k); } while (0)
        LTENSOR(ln1_w, "ln1_w", 1, C);
        LTENSOR(ln1_b, "ln1_b", 1, C);
        LTENSOR(ln2_w, "ln2_w", 1, C);
        LTENSOR(ln2_b, "ln2_b", 1, C);
        // the attention tensors: the only part of the order that depends on the variant
        const size_t H = c->n_head, D = C / H, G = c->n_kv_head, dR = c->mla_rope_dim;
        switch (layer_kind(c, l)) {
        case ATTN_CTX: // queries from the token, keys and values from the contexts
            LTENSOR(q_w, "q_w", C, C);
            LTENSOR(q_b, "q_b", 1, C);
            LTENSOR(k_w, "k_w", C, dc);
            LTENSOR(k_b, "k_b", 1, C);
            LTENSOR(v_w, "v_w", C, dc);
            LTENSOR(v_b, "v_b", 1, C);
            break;
        case ATTN_MHA:
            LTENSOR(qkv_w, "qkv_w", 3 * C, C);
            LTENSOR(qkv_b, "qkv_b", 1, 3 * C);
            break;
        case ATTN_GQA:
        case ATTN_MQA:
            LTENSOR(q_w, "q_w", H * D, C);
            LTENSOR(q_b, "q_b", 1, H * D);
            LTENSOR(kv_w, "kv_w", 2 * G * D, C);
            LTENSOR(kv_b, "kv_b", 1, 2 * G * D);
            break;
        case ATTN_MLA:
            if (c->q_rank > 0) {
                LTENSOR(q_a_w, "q_a_w", c->q_rank, C);
                LTENSOR(q_a_norm_w, "q_a_norm_w", 1, c->q_rank);
                LTENSOR(q_b_w, "q_b_w", H * (D + dR), c->q_rank);
            } else {
                LTENSOR(q_w, "q_w", H * (D + dR), C);
            }
            LTENSOR(kv_a_w, "kv_a_w", c->kv_rank + dR, C);
            if (!c->mla_linear_latent) LTENSOR(kv_a_norm_w, "kv_a_norm_w", 1, c->kv_rank);
            LTENSOR(kv_b_w, "kv_b_w", H * 2 * D, c->kv_rank);
            break;
        }
        LTENSOR(dense_w, "dense_w", C, H * D);
        LTENSOR(dense_b, "dense_b", 1, C);
        LTENSOR(fc_w, "fc_w", F, C);
        LTENSOR(fc_b, "fc_b", 1, F);
        LTENSOR(proj_w, "proj_w", C, F);
        LTENSOR(proj_b, "proj_b", 1, C);
#undef LTENSOR
    }
    TENSOR(P->lnf_w, "lnf_w", 1, C);
    TENSOR(P->lnf_b, "lnf_b", 1, C);
    TENSOR(P->embed_out, "embed_out", Vp, C);
#undef TENSOR
    if (dev_size) *dev_size = dev_off;
    return off;
}

// Which tensors train. Phase 1 trains only the ContextBlock (OACD); phase 2 (and every model
// without a block) trains the rest with the block frozen; ctxpythia also freezes embed_in,
// which feeds only the block (doc/context_kv.md).
static void tensors_set_phase(ParamTensor *tensors, const Config *c, int phase) {
    for (ptrdiff_t i = 0; i < arrlen(tensors); i++) {
        ParamTensor *t = &tensors[i];
        int in_block = strncmp(t->name, "ctx_", 4) == 0;
        int embed_frozen = c->model_type == MODEL_CTXPYTHIA && strcmp(t->name, "embed_in") == 0;
        t->frozen = phase == 1 ? !in_block : (in_block || embed_frozen);
    }
}

// ----------------------------------------------------------------------------
// Activations: one allocation for a (B,T) batch; each buffer starts on a 256-byte boundary
// (offsets in bytes), pointers set by layout_acts.
//
// The one place where the two programs' layouts differ is what the attention forward keeps for
// its backward, set by the program before it includes this header:
//   ATT_KEEPS_PROBS 1  the probabilities P, (B,H,T,T) a layer: the CPU program, whose backward is
//                      the readable reference (and whose SnapKV reads P's last rows directly);
//   ATT_KEEPS_PROBS 0  each query row's logsumexp, (B,H,T) fp32: the CUDA program, whose backward
//                      recomputes P from q, k and it (FlashAttention-2), so that a layer's
//                      activations grow as T, not T² (--kv-report's train_activation_bytes).
#if !defined(ATT_KEEPS_PROBS)
#error "define ATT_KEEPS_PROBS (1: keep P, 0: keep the row logsumexps) before including ctxkv/layout.h"
#endif

// The attention's own activations. Which exist depends on attn_type; the others are NULL.
// Dq = D for mha/gqa/mqa, D + dR for mla (the query/key width of one head).
typedef struct {
    floatX *qkv;                        // mha (B,T,3C): q and k after RoPE, v as projected
    floatX *q;                          // gqa/mqa/mla (B,T,H*Dq): after RoPE (mla: on the last dR of each head)
    floatX *kv;                         // gqa/mqa (B,T,2*G*D): K heads (after RoPE) then V heads
    floatX *q_lat, *q_lat_norm; float *q_lat_rstd; // mla with q_rank: (B,T,q_rank) x2, (B,T)
    floatX *kv_a;                       // mla (B,T,kv_rank+dR): raw latent | k_R after RoPE
    floatX *c_norm; float *c_rstd;      // mla (B,T,kv_rank) the cached latent ĉ, (B,T)
    floatX *kvb;                        // mla (B,T,H*2D): per head [k_nope | v]
    floatX *k;                          // mla (B,T,H*Dq): per head [k_nope | k_pe], gathered for the core
    floatX *kc, *vc;                    // ctxkv (B,T,C): W_k c_s + b_k and W_v c_s + b_v for every position s
    // What the core keeps of its softmax for backward (ATT_KEEPS_PROBS, below): one of the two.
    floatX *att;                        // the CPU program: (B,H,T,T) probabilities P, zero above the
                                        // diagonal; ctxkv (B,H,T,M), one per slot, zero for empty
                                        // ones. In the gradients: dP.
    float *lse;                         // the CUDA program: (B,H,T) log Σ_s exp(score) of each query
                                        // row, from which backward recomputes P tile by tile. In the
                                        // gradients: D = rowsum(dO ⊙ O) of each row.
    floatX *atty;                       // (B,T,H*D) attention output, heads merged, before dense
} AttnActs;

typedef struct {
    floatX *ln1; float *ln1_mean, *ln1_rstd;  // (B,T,C), (B,T), (B,T)
    floatX *ln2; float *ln2_mean, *ln2_rstd;  // (B,T,C), (B,T), (B,T)
    AttnActs at;
    floatX *fc, *fc_gelu;               // (B,T,F) before and after GELU
} LayerActs;

typedef struct {
    floatX *resid;                      // (L+1, B,T,C): resid[l] is the input of layer l
    LayerActs *layer;                   // [L]
    floatX *attn_out, *mlp_out;         // (B,T,C) scratch, not needed by backward
    floatX *lnf; float *lnf_mean, *lnf_rstd;  // (B,T,C), (B,T), (B,T)
    floatX *logits;                     // (B,T,Vp); backward overwrites it with dlogits
    float *losses;                      // (B,T) per-position loss (0 where ignored)
    float *lse;                         // (B,T) logsumexp of each row of logits
    floatX *contexts;                   // (B,T,d_c) the ContextBlock's c_t (ctxkv / ctxpythia), constants
} Acts;

// gradients of activations: reused by every layer during backward
typedef struct {
    floatX *dresid;                     // (B,T,C) running gradient of the residual stream
    floatX *dln1, *dln2;                // (B,T,C)
    AttnActs dat;                       // same shapes as AttnActs (the rstd/att fields: datt only),
    char *dat_base;                     // laid out per layer kind at this address (layer_backward)
    floatX *dfc_gelu, *dfc;             // (B,T,F)
    floatX *dlnf;                       // (B,T,C)
} GradActs;


#define ACT_ALIGN 256
static size_t act_align(size_t bytes) { return (bytes + ACT_ALIGN - 1) / ACT_ALIGN * ACT_ALIGN; }
// ptr = base + off (or NULL when only counting); off advances by n elements of ptr's type.
// (Left defined: the programs lay out their own scratch blocks with it too.)
#define BUF(ptr, n) do { ptr = base ? (__typeof__(ptr))(base + off) : NULL; off += act_align((size_t)(n) * sizeof(*ptr)); } while (0)

// Lays out one AttnActs of a layer of the given kind for (B,T), from byte offset off. With
// grads != 0 the per-row statistics are skipped (lse stays: there it holds D).
static size_t layout_attn_acts(const Config *c, int kind, size_t B, size_t T, char *base, size_t off, AttnActs *at, int grads) {
    const size_t BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, kind);
    const size_t G = c->n_kv_head, dR = c->mla_rope_dim, KVA = c->kv_rank + dR;
    memset(at, 0, sizeof *at);
    size_t att_cols = T; // keys per query row in att
    switch (kind) {
    case ATTN_CTX:
        BUF(at->q, BT * C);
        BUF(at->kc, BT * C);
        BUF(at->vc, BT * C);
        att_cols = c->max_contexts;
        break;
    case ATTN_MHA:
        BUF(at->qkv, BT * 3 * C);
        break;
    case ATTN_GQA:
    case ATTN_MQA:
        BUF(at->q, BT * H * D);
        BUF(at->kv, BT * 2 * G * D);
        break;
    case ATTN_MLA:
        BUF(at->q, BT * H * Dq);
        if (c->q_rank > 0) {
            BUF(at->q_lat, BT * c->q_rank);
            BUF(at->q_lat_norm, BT * c->q_rank);
            if (!grads) BUF(at->q_lat_rstd, BT);
        }
        BUF(at->kv_a, BT * KVA);
        BUF(at->c_norm, BT * c->kv_rank);
        if (!grads) BUF(at->c_rstd, BT);
        BUF(at->kvb, BT * H * 2 * D);
        BUF(at->k, BT * H * Dq);
        break;
    }
    if (ATT_KEEPS_PROBS) BUF(at->att, B * H * T * att_cols);
    else BUF(at->lse, B * H * T);
    BUF(at->atty, BT * H * D);
    return off;
}

// Returns the bytes the layout needs.
static size_t layout_acts(const Config *c, size_t B, size_t T, char *base, Acts *A, GradActs *G) {
    size_t off = 0;
    const size_t C = c->n_embd, F = c->n_inner, L = c->n_layer, Vp = c->padded_vocab_size;
    const size_t BT = B * T;
    if (A) {
        BUF(A->resid, (L + 1) * BT * C);
        for (size_t l = 0; l < L; l++) {
            LayerActs *la = &A->layer[l];
            BUF(la->ln1, BT * C); BUF(la->ln1_mean, BT); BUF(la->ln1_rstd, BT);
            BUF(la->ln2, BT * C); BUF(la->ln2_mean, BT); BUF(la->ln2_rstd, BT);
            off = layout_attn_acts(c, layer_kind(c, (int)l), B, T, base, off, &la->at, 0);
            BUF(la->fc, BT * F); BUF(la->fc_gelu, BT * F);
        }
        BUF(A->attn_out, BT * C); BUF(A->mlp_out, BT * C);
        BUF(A->lnf, BT * C); BUF(A->lnf_mean, BT); BUF(A->lnf_rstd, BT);
        BUF(A->logits, BT * Vp);
        BUF(A->losses, BT);
        BUF(A->lse, BT);
        BUF(A->contexts, has_context_block(c) ? BT * c->context_dim : 0);
    }
    if (G) {
        BUF(G->dresid, BT * C); BUF(G->dln1, BT * C); BUF(G->dln2, BT * C);
        // one set of attention gradients serves every layer: size it for the largest kind
        size_t off_at = off;
        for (int l = 0; l < c->n_layer; l++) {
            size_t end = layout_attn_acts(c, layer_kind(c, l), B, T, NULL, off_at, &G->dat, 1);
            if (end > off) off = end;
        }
        G->dat_base = base ? base + off_at : NULL;
        BUF(G->dfc_gelu, BT * F); BUF(G->dfc, BT * F);
        BUF(G->dlnf, BT * C);
    }
    return off;
}

// ----------------------------------------------------------------------------
// AdamW exactly as torch.optim.AdamW, step t = 1, 2, ...: decoupled decay p *= 1 − lr·wd on the
// 2-D tensors (matrices, embeddings; not biases or norm weights), then
//   m = β1·m + (1−β1)·g,  v = β2·v + (1−β2)·g²,  p −= step_size · m / (sqrt(v)/bc2_sqrt + eps)
// with step_size = lr/(1−β1^t) and bc2_sqrt = sqrt(1−β2^t). Each program runs the loop.

typedef struct { float lr, beta1, beta2, eps, weight_decay; } AdamW;
typedef struct { float step_size, bc2_sqrt; } AdamWStep;

static AdamWStep adamw_step(const AdamW *opt, int t) {
    AdamWStep s = {opt->lr / (1.0f - powf(opt->beta1, (float)t)), sqrtf(1.0f - powf(opt->beta2, (float)t))};
    return s;
}

static float adamw_decay(const AdamW *opt, const ParamTensor *t) {
    return t->rows > 1 ? 1.0f - opt->lr * opt->weight_decay : 1.0f;
}

// torch.nn.utils.clip_grad_norm_'s factor: min(1, max_norm / (norm + 1e-6)); 1 when max_norm <= 0
// or the norm is not finite (the non-finite-loss guard stops such a step)
static float clip_scale(float norm, float max_norm) {
    if (!(max_norm > 0.0f) || !isfinite(norm)) return 1.0f;
    const float coef = max_norm / (norm + 1e-6f);
    return coef < 1.0f ? coef : 1.0f;
}

#endif
