// ctxkv/pythia.h: how the model is wired from its layers -- the attention block (through the
// variant table), the Pythia layer with its parallel residual, and the final LayerNorm and head --
// shared by train_ctxkv.c and train_ctxkv.cu, so that the two programs cannot wire the model
// differently. Each program includes it after its variants and ATTN_VARIANTS, and provides the
// layers it calls (matmul_*, layernorm_*, gelu_*, residual3_forward, attention_*, ctx_attention_*,
// with the CPU program's shapes and argument order), the Model, device_zero(p, bytes) and
// device_move(dst, src, bytes).
#ifndef CTXKV_PYTHIA_H
#define CTXKV_PYTHIA_H

// out (B,T,C) = dense(attention(q, k, v)) for x = LN_1(x_l): the causal core, or for Context-KV's
// layer 0 the core over its context slots. A core writes at->atty and keeps in at what its
// backward needs (ctxkv/layout.h, ATT_KEEPS_PROBS: P on the CPU, row logsumexps on the GPU).
static void attention_block_forward(const Model *m, int kind, const LayerParams *lp, AttnActs *at, floatX *out,
                                    const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const AttnVariant *v = &ATTN_VARIANTS[kind];
    const int H = c->n_head, D = head_dim(c);
    v->project_forward(m, lp, at, x, B, T, 0);
    if (v->views) {
        const CoreViews cv = v->views(c, at);
        attention_forward(at, cv, B, T, H, D, 1.0f / sqrtf((float)cv.dqk));
    } else {
        ctx_attention_forward(at, B, T, H, D, c->context_interval, c->max_contexts);
    }
    matmul_forward(out, at->atty, lp->dense_w, lp->dense_b, B * T, H * D, c->n_embd);
}

static void attention_block_backward(const Model *m, int kind, const LayerParams *lp, LayerParams *lg, const AttnActs *at,
                                     AttnActs *dat, floatX *dx, const floatX *dout, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const AttnVariant *v = &ATTN_VARIANTS[kind];
    const int H = c->n_head, D = head_dim(c);
    matmul_backward(dat->atty, lg->dense_w, lg->dense_b, dout, at->atty, lp->dense_w, B * T, H * D, c->n_embd);
    if (v->views) {
        const CoreViews cv = v->views(c, at), dcv = v->views(c, dat); // the gradients have the same layout
        attention_backward(dat, dcv, at, cv, B, T, H, D, 1.0f / sqrtf((float)cv.dqk));
    } else {
        ctx_attention_backward(dat, at, B, T, H, D, c->context_interval, c->max_contexts);
    }
    v->project_backward(m, lp, lg, at, dat, dx, x, B, T);
}

// decoding: each sequence's new token through layer l's attention, reading (and extending) the cache
static void attention_block_decode(const Model *m, int l, const LayerParams *lp, AttnActs *at, floatX *out, const floatX *x,
                                   KVCache *kv) {
    const Config *c = &m->cfg;
    ATTN_VARIANTS[layer_kind(c, l)].decode(m, lp, at, x, kv, l);
    matmul_forward(out, at->atty, lp->dense_w, lp->dense_b, kv->batch, c->n_head * head_dim(c), c->n_embd);
}

// One Pythia layer: x_out = x + Attn(LN_1(x)) + MLP(LN_2(x)), the parallel residual.
// With a KV cache (decoding: T = 1) the attention reads the cached tokens instead.
static void layer_forward(Model *m, int l, floatX *x_out, const floatX *x, int B, int T, KVCache *kv) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, F = c->n_inner;
    const LayerParams *lp = &m->p.layer[l];
    LayerActs *la = &m->a.layer[l];
    layernorm_forward(la->ln1, la->ln1_mean, la->ln1_rstd, x, lp->ln1_w, lp->ln1_b, BT, C, c->ln_eps);
    layernorm_forward(la->ln2, la->ln2_mean, la->ln2_rstd, x, lp->ln2_w, lp->ln2_b, BT, C, c->ln_eps);
    if (kv) attention_block_decode(m, l, lp, &la->at, m->a.attn_out, la->ln1, kv);
    else attention_block_forward(m, layer_kind(c, l), lp, &la->at, m->a.attn_out, la->ln1, B, T);
    matmul_forward(la->fc, la->ln2, lp->fc_w, lp->fc_b, BT, C, F);
    gelu_forward(la->fc_gelu, la->fc, (size_t)BT * F);
    matmul_forward(m->a.mlp_out, la->fc_gelu, lp->proj_w, lp->proj_b, BT, F, C);
    residual3_forward(x_out, x, m->a.attn_out, m->a.mlp_out, (size_t)BT * C);
}

// ga->dresid holds d loss / d x_out on entry and d loss / d x on return: the parallel
// residual passes it unchanged to x, to the attention output and to the MLP output.
static void layer_backward(Model *m, int l, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, F = c->n_inner;
    const LayerParams *lp = &m->p.layer[l];
    LayerParams *lg = &m->g.layer[l];
    LayerActs *la = &m->a.layer[l];
    GradActs *ga = &m->ga;
    // every per-layer gradient buffer (dln1 .. dfc) is contiguous: zero them together
    device_zero(ga->dln1, (size_t)((char *)ga->dlnf - (char *)ga->dln1));
    const int kind = layer_kind(c, l);
    layout_attn_acts(c, kind, B, T, ga->dat_base, 0, &ga->dat, 1);
    // MLP branch
    matmul_backward(ga->dfc_gelu, lg->proj_w, lg->proj_b, ga->dresid, la->fc_gelu, lp->proj_w, BT, F, C);
    gelu_backward(ga->dfc, la->fc, ga->dfc_gelu, (size_t)BT * F);
    matmul_backward(ga->dln2, lg->fc_w, lg->fc_b, ga->dfc, la->ln2, lp->fc_w, BT, C, F);
    // attention branch
    attention_block_backward(m, kind, lp, lg, &la->at, &ga->dat, ga->dln1, ga->dresid, la->ln1, B, T);
    // both LayerNorms read x: their input grads add into the residual gradient
    layernorm_backward(ga->dresid, lg->ln1_w, lg->ln1_b, ga->dln1, x, lp->ln1_w, la->ln1_mean, la->ln1_rstd, BT, C);
    layernorm_backward(ga->dresid, lg->ln2_w, lg->ln2_b, ga->dln2, x, lp->ln2_w, la->ln2_mean, la->ln2_rstd, BT, C);
}

// final LayerNorm and the untied head: logits (BT, Vp) from resid[L]
static void head_forward(Model *m, int BT) {
    const Config *c = &m->cfg;
    const int C = c->n_embd, Vp = c->padded_vocab_size;
    Acts *a = &m->a;
    const floatX *xL = a->resid + (size_t)c->n_layer * BT * C;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, xL, m->p.lnf_w, m->p.lnf_b, BT, C, c->ln_eps);
    // The vocabulary head is most of a forward's cost, so evaluation and prefill skip the rows
    // they do not read. Prefill (head_last_of = T) needs only each sequence's last row: those
    // rows move to the front of lnf (row b; in increasing b no source is overwritten before it
    // is read) and their logits are rows 0..B-1. LAMBADA (head_from) needs rows >= head_from.
    if (m->head_last_of > 0) {
        const int T = m->head_last_of, B = BT / T;
        for (int b = 0; b < B; b++) device_move(a->lnf + (size_t)b * C, a->lnf + ((size_t)b * T + T - 1) * C, C * sizeof(floatX));
        matmul_forward(a->logits, a->lnf, m->p.embed_out, NULL, B, C, Vp);
        return;
    }
    int from = m->head_from > 0 && m->head_from < BT ? m->head_from : 0;
    matmul_forward(a->logits + (size_t)from * Vp, a->lnf + (size_t)from * C, m->p.embed_out, NULL, BT - from, C, Vp);
}
#endif
