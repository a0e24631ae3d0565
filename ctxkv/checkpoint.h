// ctxkv/checkpoint.h: checkpoint files, the training state behind exact resume, the
// context-block file of Context-KV phase 1, and the model the flags ask for (random init, a
// checkpoint, --init-from conversion, --resume). Formats: doc/formats.md. Shared by both programs.
//
// All of it works on the model's host copy of the parameters: fp32, in checkpoint order. It is
// included after the program's model code and uses this much of it (the model interface):
//   Model: cfg, tensors (ParamTensor table), num_params, params_memory (the host copy), adam_step
//   model_alloc_params(m, cfg)   allocate a model of this config (host copy and the program's own)
//   model_to_device(m)           the host copy -> the parameters the program computes with
//   model_to_host(m)             the program's (master) parameters -> the host copy
//   model_get_moments(m, mh, vh) AdamW's m and v in checkpoint order (zeros before the first update)
//   model_set_moments(m, mh, vh, adam_step)
//   model_free(m)
// In train_ctxkv.c the host copy IS the parameters, so the two copies are no-ops.
#ifndef CTXKV_CHECKPOINT_H
#define CTXKV_CHECKPOINT_H
#include "args.h"

// Reads and validates a checkpoint's header and size: refuses one whose header is
// inconsistent or whose size differs from what the header implies. With out != NULL, leaves the
// file open at the parameters.
static Config checkpoint_open(const char *path, FILE **out) {
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a checkpoint (%lld bytes)", path, size);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != CKPT_MAGIC) die("'%s' is not a ctxkv checkpoint (magic %d, expected %d)", path, h[0], CKPT_MAGIC);
    if (h[1] != CKPT_VERSION) die("'%s' has checkpoint version %d, this build reads %d", path, h[1], CKPT_VERSION);
    Config c = config_from_header(h);
    const char *problem = config_problem(&c);
    if (problem) die("'%s': bad config in header: %s", path, problem);
    size_t n = layout_params(&c, NULL, NULL, NULL, NULL);
    long long expect = (long long)sizeof h + (long long)n * (long long)sizeof(float);
    if (size != expect)
        die("'%s' has %lld bytes but its header implies %lld (%zu parameters): wrong size", path, size, expect, n);
    if (out) *out = f;
    else fclose(f);
    return c;
}

static void model_load(Model *m, const char *path) {
    FILE *f;
    Config c = checkpoint_open(path, &f);
    model_alloc_params(m, &c);
    fread_check(m->params_memory, sizeof(float), m->num_params, f, path);
    fclose(f);
    model_to_device(m);
}

static void model_save(const Model *m, const char *path) {
    int h[HEADER_INTS];
    config_to_header(&m->cfg, h);
    model_to_host(m); // the (master) weights are the checkpoint
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    atomic_commit(&af);
}

// ----------------------------------------------------------------------------
// Training state for exact resume: one file, written atomically, so weights and optimizer
// state can never disagree. Layout: a 256-int32 header (below), then a complete checkpoint
// (its own header and the parameters), then AdamW's m and v (doc/formats.md).

#define TRAIN_STATE_MAGIC 20261129
#define TRAIN_STATE_VERSION 1
#define TRAIN_STATE_FILE "train_state.bin"

typedef struct {
    int step;                  // optimizer steps done
    int epoch;                 // data loader position: the next batch is in this epoch,
    int shard_index;           // at this slot of its shard order,
    long long pos;             // after this many tokens of that shard
    int shuffle;               // --shuffle was given (the order depends on it)
    uint64_t rng;              // sampling RNG
    int B, T;
    long long tokens_seen;     // (AdamW's update count is the model's adam_step, saved beside these)
} TrainState;

static void train_state_save(const Model *m, const char *path, const TrainState *st) {
    int h[HEADER_INTS] = {0}, ch[HEADER_INTS];
    h[0] = TRAIN_STATE_MAGIC; h[1] = TRAIN_STATE_VERSION; h[2] = st->step; h[3] = m->adam_step;
    h[4] = st->shard_index; split64(h + 5, (uint64_t)st->pos); split64(h + 7, st->rng);
    h[9] = st->B; h[10] = st->T; split64(h + 11, (uint64_t)st->tokens_seen);
    h[13] = st->epoch; h[14] = st->shuffle;
    config_to_header(&m->cfg, ch);
    model_to_host(m);
    float *moments = (float *)malloc_check(2 * m->num_params * sizeof(float), "training state");
    model_get_moments(m, moments, moments + m->num_params);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(ch, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    fwrite_check(moments, sizeof(float), 2 * m->num_params, af.f, af.tmp);
    atomic_commit(&af); // the previous state stays in place until this rename
    free(moments);
}

// Reads and validates the state's header and its model config; with m != NULL also the weights
// and AdamW state.
static Config train_state_load(const char *path, Model *m, TrainState *st) {
    FILE *f = fopen_check(path, "rb");
    long long size = file_size(f);
    int h[HEADER_INTS], ch[HEADER_INTS];
    if (size < 2LL * (long long)sizeof h) die("'%s' is too small to be a training state", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != TRAIN_STATE_MAGIC || h[1] != TRAIN_STATE_VERSION) die("'%s' is not a training state (magic %d, version %d)", path, h[0], h[1]);
    fread_check(ch, sizeof(int), HEADER_INTS, f, path);
    if (ch[0] != CKPT_MAGIC || ch[1] != CKPT_VERSION) die("'%s': the embedded checkpoint header is bad", path);
    Config c = config_from_header(ch);
    const char *problem = config_problem(&c);
    if (problem) die("'%s': bad config: %s", path, problem);
    size_t n = layout_params(&c, NULL, NULL, NULL, NULL);
    if (size != 2LL * (long long)sizeof h + 3LL * 4 * (long long)n) die("'%s' has %lld bytes, not the %lld its header implies: truncated or corrupt", path, size, 2LL * (long long)sizeof h + 12LL * (long long)n);
    const int adam_step = h[3];
    st->step = h[2]; st->shard_index = h[4]; st->pos = (long long)join64(h + 5); st->rng = join64(h + 7);
    st->B = h[9]; st->T = h[10]; st->tokens_seen = (long long)join64(h + 11);
    st->epoch = h[13]; st->shuffle = h[14];
    // tokens_seen is step * B * T in every state the program writes; bound it so += cannot overflow
    if (st->B < 1 || st->T < 1 || st->tokens_seen < 0 || st->tokens_seen > (long long)st->step * st->B * st->T)
        die("'%s': bad batch shape or token count", path);
    // AdamW's count is the step count: one update per step, so it can never pass the step
    if (st->step < 0 || adam_step < 0 || adam_step > st->step || st->shard_index < 0 || st->pos < 0) die("'%s': bad step or data position", path);
    // every epoch takes at least one batch, so the epoch can't pass the step; shuffle is a flag
    if (st->epoch < 0 || st->epoch > st->step || (st->shuffle != 0 && st->shuffle != 1)) die("'%s': bad data epoch or shuffle flag", path);
    if (m) {
        model_alloc_params(m, &c);
        fread_check(m->params_memory, sizeof(float), n, f, path);
        model_to_device(m);
        float *moments = (float *)malloc_check(2 * n * sizeof(float), "training state");
        fread_check(moments, sizeof(float), 2 * n, f, path);
        model_set_moments(m, moments, moments + n, adam_step);
        free(moments);
    }
    fclose(f);
    return c;
}

// ----------------------------------------------------------------------------
// Tensors by name, in the host copy

static const ParamTensor *find_tensor(const Model *m, const char *name) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}

// layer l's tensor LEAF (e.g. "qkv_w") in the host copy
static float *host_tensor(const Model *m, int l, const char *leaf) {
    char name[48];
    snprintf(name, sizeof name, "layer%d.%s", l, leaf);
    const ParamTensor *t = find_tensor(m, name);
    if (!t) die("internal: no tensor %s", name);
    return m->params_memory + t->offset;
}

// the part of a tensor's name after "layerN."
static const char *tensor_leaf(const char *name) { return strrchr(name, '.') ? strrchr(name, '.') + 1 : name; }

static void model_set_phase(Model *m, int phase) { tensors_set_phase(m->tensors, &m->cfg, phase); }

// ----------------------------------------------------------------------------
// Context-KV: the context-block file (phase 1's output: the block and the embeddings it saw)

#define CTXBLOCK_MAGIC 20261126
#define CTXBLOCK_VERSION 1
static const char *BLOCK_TENSORS[] = {"ctx_ln_e_w", "ctx_ln_e_b", "ctx_w", "ctx_b", "ctx_ln_c_w", "ctx_ln_c_b", "embed_in"};
#define N_BLOCK_TENSORS 7

static void context_block_save(const Model *m, const char *path) {
    const Config *c = &m->cfg;
    int h[HEADER_INTS] = {0};
    h[0] = CTXBLOCK_MAGIC; h[1] = CTXBLOCK_VERSION; h[2] = c->embed_dim; h[3] = c->context_dim;
    h[4] = c->padded_vocab_size; h[5] = c->vocab_size;
    model_to_host(m);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        fwrite_check(m->params_memory + t->offset, sizeof(float), t->rows * t->cols, af.f, af.tmp);
    }
    atomic_commit(&af);
}

// Loads a phase-1 block (and the embeddings it was trained on) into a model whose widths match.
static void context_block_load(Model *m, const char *path) {
    const Config *c = &m->cfg;
    if (!has_context_block(c)) die("--context-block needs a model with a context block (--layer0 ctxkv or --model-type ctxpythia)");
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a context block", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != CTXBLOCK_MAGIC || h[1] != CTXBLOCK_VERSION) die("'%s' is not a context block file (magic %d, version %d)", path, h[0], h[1]);
    if (h[2] != c->embed_dim || h[3] != c->context_dim || h[4] != c->padded_vocab_size || h[5] != c->vocab_size)
        die("'%s' is a context block for embed width %d, context width %d, vocab %d, but the model has embed width %d, "
            "context width %d, vocab %d", path, h[2], h[3], h[5], c->embed_dim, c->context_dim, c->vocab_size);
    long long expect = sizeof h;
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        expect += 4LL * t->rows * t->cols;
    }
    if (size != expect) die("'%s' has %lld bytes, its header implies %lld: truncated or corrupt", path, size, expect);
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        fread_check(m->params_memory + t->offset, sizeof(float), t->rows * t->cols, f, path);
    }
    fclose(f);
    model_to_device(m);
}

// ----------------------------------------------------------------------------
// The model the flags ask for

// Random init as HF GPTNeoX (_init_weights): N(0, init_std) for matrices and embeddings,
// LayerNorm 1/0, biases 0; the two residual-output matrices (dense, proj) are scaled by
// 1/sqrt(2L) as in GPT-2, which keeps the residual stream's variance flat with depth.
// On the host with the shared RNG, so both programs start from the same weights.
static void model_init_random(Model *m, const Config *c, float init_std, uint64_t seed) {
    model_alloc_params(m, c);
    uint64_t rng = seed ? seed : 1;
    memset(m->params_memory, 0, m->num_params * sizeof(float));
    const float resid_std = init_std / sqrtf(2.0f * c->n_layer);
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        ParamTensor *t = &m->tensors[i];
        float *w = m->params_memory + t->offset;
        size_t n = t->rows * t->cols;
        const char *leaf = tensor_leaf(t->name);
        if (strcmp(leaf, "ln1_w") == 0 || strcmp(leaf, "ln2_w") == 0 || strcmp(leaf, "lnf_w") == 0 ||
            strstr(leaf, "norm_w") || strcmp(leaf, "ctx_ln_e_w") == 0 || strcmp(leaf, "ctx_ln_c_w") == 0) {
            for (size_t j = 0; j < n; j++) w[j] = 1.0f; // LayerNorm and RMSNorm weights
        } else if (strcmp(leaf, "ctx_w") == 0 || strcmp(leaf, "ctx_b") == 0) {
            // the prototype's init: W_c ~ N(0, 0.1²), b_c ~ N(0, 0.01²); it reports that
            // Xavier-style init keeps phase 1 from converging
            float std = strcmp(leaf, "ctx_w") == 0 ? 0.1f : 0.01f;
            for (size_t j = 0; j < n; j++) w[j] = std * random_normal(&rng);
        } else if (t->rows > 1) {
            float std = (strcmp(leaf, "dense_w") == 0 || strcmp(leaf, "proj_w") == 0) ? resid_std : init_std;
            size_t real_rows = t->rows;
            if (strcmp(leaf, "embed_in") == 0 || strcmp(leaf, "embed_out") == 0) real_rows = c->vocab_size;
            for (size_t j = 0; j < real_rows * t->cols; j++) w[j] = std * random_normal(&rng);
        } // biases stay 0; padding rows of the embeddings stay 0
    }
    model_to_device(m);
}

// ---- mha -> mla (doc/retrofit.md: the equations, and which parts are exact)

// Symmetric eigendecomposition by cyclic Jacobi rotations, in double: A (n x n, row-major) is
// overwritten; on return its diagonal holds the eigenvalues and row i of Vt the eigenvector of
// A[i][i]. Each rotation (p, q) zeroes A[p][q]: rows p and q are updated in place (contiguous)
// and mirrored into columns p and q, which keeps A symmetric.
static void jacobi_eigen(double *A, double *Vt, int n) {
    for (int i = 0; i < n * n; i++) Vt[i] = (i / n == i % n) ? 1.0 : 0.0;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0.0, diag = 0.0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) *(i == j ? &diag : &off) += A[i * n + j] * A[i * n + j];
        if (off <= 1e-30 * diag || off == 0.0) return;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                const double apq = A[p * n + q];
                if (apq == 0.0) continue;
                // tan t of the angle that zeroes A[p][q], from θ = (a_qq − a_pp) / 2a_pq (the smaller root)
                const double theta = (A[q * n + q] - A[p * n + p]) / (2.0 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                const double cs = 1.0 / sqrt(t * t + 1.0), sn = t * cs;
                double *rp = A + (size_t)p * n, *rq = A + (size_t)q * n;
                for (int k = 0; k < n; k++) {
                    if (k == p || k == q) continue;
                    const double apk = rp[k], aqk = rq[k];
                    rp[k] = cs * apk - sn * aqk;
                    rq[k] = sn * apk + cs * aqk;
                    A[(size_t)k * n + p] = rp[k];
                    A[(size_t)k * n + q] = rq[k];
                }
                rp[p] -= t * apq;
                rq[q] += t * apq;
                rp[q] = rq[p] = 0.0;
                double *vp = Vt + (size_t)p * n, *vq = Vt + (size_t)q * n;
                for (int k = 0; k < n; k++) {
                    const double a = vp[k], b = vq[k];
                    vp[k] = cs * a - sn * b;
                    vq[k] = sn * a + cs * b;
                }
            }
    }
}

// Layer l of the mha model src becomes MLA in m (config c: d_R = H·R in H RoPE groups, q_rank 0):
//   W_q,h    = s·[0 (R rows) | W_q,h pass rows | (W_q,h rotary rows in group h, 0 elsewhere)],
//              s = √(D+d_R)/√D so that the score scale 1/√(D+d_R) becomes mha's 1/√D
//   W_KR     = the rotary rows of every head's W_k, group h = head h
//   M        = per head [0 (R rows) | W_k,h pass rows ; W_v,h] (2HD x C): the keys without RoPE
//              and the values; W_DKV = V_rᵀ and W_UKV = M V_r from the top kv_rank eigenvectors
//              V_r of MᵀM (M's right singular vectors: the best rank-kv_rank fit, Eckart–Young)
//   dense_b += W_O b_v (attention weights sum to 1); the pass part of b_k shifts all of a query's
//   scores alike and is dropped exactly; b_q and the rotary part of b_k have no place in MLA.
// Returns the largest |b_q| and |rotary b_k| dropped, and the part of M's Frobenius norm² the
// rank keeps.
static float mla_from_mha_layer(Model *m, const Model *src, const Config *c, int l, double *kept) {
    const int C = c->n_embd, H = c->n_head, D = head_dim(c), R = src->cfg.rotary_dims, r = c->kv_rank;
    const int dR = c->mla_rope_dim, Dq = D + dR, rows = 2 * H * D;
    const float s = sqrtf((float)Dq) / sqrtf((float)D);
    const float *qkv_w = host_tensor(src, l, "qkv_w"), *qkv_b = host_tensor(src, l, "qkv_b");
    float *q_w = host_tensor(m, l, "q_w"), *kv_a_w = host_tensor(m, l, "kv_a_w"), *kv_b_w = host_tensor(m, l, "kv_b_w");
    float *dense_b = host_tensor(m, l, "dense_b");
    const float *dense_w = host_tensor(m, l, "dense_w");
    float dropped = 0.0f;
#define SRC_ROW(h, part, j) (qkv_w + ((size_t)(h) * 3 * D + (size_t)(part) * D + (j)) * C) // part 0 q, 1 k, 2 v
    memset(q_w, 0, (size_t)H * Dq * C * sizeof(float));
    memset(kv_a_w, 0, (size_t)(r + dR) * C * sizeof(float));
    for (int h = 0; h < H; h++) {
        for (int j = R; j < D; j++)
            for (int i = 0; i < C; i++) q_w[((size_t)h * Dq + j) * C + i] = s * SRC_ROW(h, 0, j)[i];
        for (int j = 0; j < R; j++) {
            for (int i = 0; i < C; i++) {
                q_w[((size_t)h * Dq + D + h * R + j) * C + i] = s * SRC_ROW(h, 0, j)[i];
                kv_a_w[((size_t)r + h * R + j) * C + i] = SRC_ROW(h, 1, j)[i];
            }
            dropped = fmaxf(dropped, fabsf(qkv_b[h * 3 * D + D + j]));
        }
        for (int j = 0; j < D; j++) dropped = fmaxf(dropped, fabsf(qkv_b[h * 3 * D + j]));
        for (int o = 0; o < C; o++) { // the value bias, through dense
            float acc = 0.0f;
            for (int j = 0; j < D; j++) acc += dense_w[(size_t)o * C + h * D + j] * qkv_b[h * 3 * D + 2 * D + j];
            dense_b[o] += acc;
        }
    }
    // M (rows x C) and MᵀM in double
    double *M = (double *)calloc_check((size_t)rows * C * sizeof(double), "mla conversion");
    for (int h = 0; h < H; h++)
        for (int j = 0; j < D; j++)
            for (int i = 0; i < C; i++) {
                if (j >= R) M[((size_t)h * 2 * D + j) * C + i] = SRC_ROW(h, 1, j)[i];
                M[((size_t)h * 2 * D + D + j) * C + i] = SRC_ROW(h, 2, j)[i];
            }
#undef SRC_ROW
    double *A = (double *)calloc_check((size_t)C * C * sizeof(double), "mla conversion");
    double *V = (double *)malloc_check((size_t)C * C * sizeof(double), "mla conversion");
    for (int k = 0; k < rows; k++)
        for (int i = 0; i < C; i++) {
            const double mki = M[(size_t)k * C + i];
            if (mki != 0.0)
                for (int j = 0; j < C; j++) A[(size_t)i * C + j] += mki * M[(size_t)k * C + j];
        }
    jacobi_eigen(A, V, C);
    int *order = (int *)malloc_check(C * sizeof(int), "mla conversion"); // eigenvalues, largest first
    for (int i = 0; i < C; i++) order[i] = i;
    for (int i = 1; i < C; i++)
        for (int j = i; j > 0 && A[order[j] * (C + 1)] > A[order[j - 1] * (C + 1)]; j--) {
            int t = order[j]; order[j] = order[j - 1]; order[j - 1] = t;
        }
    double total = 0.0, part = 0.0;
    for (int i = 0; i < C; i++) total += A[i * (C + 1)];
    memset(kv_b_w, 0, (size_t)rows * r * sizeof(float));
    for (int t = 0; t < r && t < C; t++) { // latent t: W_DKV row t = eigenvector, W_UKV column t = M · it
        const int e = order[t];
        part += A[e * (C + 1)];
        const double *v = V + (size_t)e * C; // the eigenvector
        for (int i = 0; i < C; i++) kv_a_w[(size_t)t * C + i] = (float)v[i];
        for (int k = 0; k < rows; k++) {
            double acc = 0.0;
            for (int i = 0; i < C; i++) acc += M[(size_t)k * C + i] * v[i];
            kv_b_w[(size_t)k * r + t] = (float)acc;
        }
    } // a rank above C leaves its extra latents at 0
    *kept = total > 0.0 ? part / total : 1.0;
    if (!c->mla_linear_latent) { // RMSNorm is not linear: the latent is only rescaled per token
        float *norm_w = host_tensor(m, l, "kv_a_norm_w");
        for (int i = 0; i < r; i++) norm_w[i] = 1.0f;
    }
    free(M); free(A); free(V); free(order);
    return dropped;
}

// --init-from: every tensor the two models share (same name and shape) is copied; an mha
// checkpoint becomes gqa/mqa by mean-pooling the K and V heads of each group (Ainslie et al.),
// or mla by the SVD above (MHA2MLA, Ji et al.).
static void model_init_from(Model *m, const Config *c, const char *path, float init_std, uint64_t seed) {
    Model src;
    model_load(&src, path);
    model_init_random(m, c, init_std, seed);
    int *copied = (int *)calloc_check(arrlen(m->tensors) * sizeof(int), "init-from");
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i], *u = find_tensor(&src, t->name);
        if (u && t->rows == u->rows && t->cols == u->cols) {
            memcpy(m->params_memory + t->offset, src.params_memory + u->offset, t->rows * t->cols * sizeof(float));
            copied[i] = 1;
        }
    }
    // Every tensor must come from the checkpoint, except those the conversion makes below
    // (gqa/mqa q and kv from an mha qkv) and those that start fresh by design (the context
    // block, ctxkv's k and v). Anything else would silently stay random.
    int converting_heads = src.cfg.attn_type == ATTN_MHA && (c->attn_type == ATTN_GQA || c->attn_type == ATTN_MQA);
    int converting_mla = src.cfg.attn_type == ATTN_MHA && c->attn_type == ATTN_MLA;
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const char *name = m->tensors[i].name, *leaf = tensor_leaf(name);
        int fresh_by_design = !strncmp(name, "ctx_", 4) ||
                              (c->layer0_type == LAYER0_CTXKV && !strncmp(name, "layer0.", 7) &&
                               (!strcmp(leaf, "k_w") || !strcmp(leaf, "k_b") || !strcmp(leaf, "v_w") || !strcmp(leaf, "v_b") ||
                                (src.cfg.attn_type == ATTN_MHA && (!strcmp(leaf, "q_w") || !strcmp(leaf, "q_b")))));
        int made_by_conversion = (converting_heads && (!strcmp(leaf, "q_w") || !strcmp(leaf, "q_b") ||
                                                       !strcmp(leaf, "kv_w") || !strcmp(leaf, "kv_b"))) ||
                                 (converting_mla && (!strcmp(leaf, "q_w") || !strcmp(leaf, "kv_a_w") ||
                                                     !strcmp(leaf, "kv_a_norm_w") || !strcmp(leaf, "kv_b_w")));
        if (!copied[i] && !fresh_by_design && !made_by_conversion)
            die("--init-from: '%s' has no tensor %s of shape [%zu, %zu]; the only conversions are mha -> gqa/mqa/mla and "
                "adding a ctxkv layer 0", path, name, m->tensors[i].rows, m->tensors[i].cols);
    }
    free(copied);
    const int C = c->n_embd, H = c->n_head, D = head_dim(c);
    if (c->model_type == MODEL_CTXPYTHIA) die("--init-from cannot start a ctxpythia model: its layers have another width");
    if (c->layer0_type == LAYER0_CTXKV && src.cfg.attn_type == ATTN_MHA) {
        // W_q and its bias start from layer 0's query rows (dense is copied by name); W_k, W_v fresh
        float *q_w = host_tensor(m, 0, "q_w"), *q_b = host_tensor(m, 0, "q_b");
        const float *qkv_w = host_tensor(&src, 0, "qkv_w"), *qkv_b = host_tensor(&src, 0, "qkv_b");
        for (int h = 0; h < H; h++) {
            memcpy(q_w + (size_t)h * D * C, qkv_w + (size_t)h * 3 * D * C, (size_t)D * C * sizeof(float));
            memcpy(q_b + h * D, qkv_b + h * 3 * D, D * sizeof(float));
        }
    }
    if (src.cfg.attn_type != c->attn_type && src.cfg.attn_type != ATTN_MHA)
        die("--init-from converts mha checkpoints to gqa, mqa or mla; '%s' is %s and --attn is %s", path,
            ATTN_NAMES[src.cfg.attn_type], ATTN_NAMES[c->attn_type]);
    if (converting_mla) {
        const int R = src.cfg.rotary_dims;
        if (c->q_rank > 0) die("--init-from into mla needs --q-rank 0 (the query is converted, not compressed)");
        if (R < 2 || c->mla_rope_dim != H * R || c->mla_rope_split != H)
            die("--init-from into mla keeps each head's %d rotary dims: it needs --rope-dim %d (= %d heads x %d) and "
                "--rope-split %d (the defaults when converting); got %d and %d", R, H * R, H, R, H, c->mla_rope_dim,
                c->mla_rope_split);
        float dropped = 0.0f;
        for (int l = c->layer0_type == LAYER0_CTXKV ? 1 : 0; l < c->n_layer; l++) {
            double kept;
            dropped = fmaxf(dropped, mla_from_mha_layer(m, &src, c, l, &kept));
            printf("init-from: layer %d -> mla, kv rank %d keeps %.4f of the keys' and values' energy\n", l, c->kv_rank, kept);
        }
        printf("init-from: largest query bias or rotary key bias dropped (MLA has none): %.3g%s\n", dropped,
               c->mla_linear_latent ? "" : "; the latent RMSNorm also changes the function (--latent-norm 0 keeps it linear)");
    } else if (converting_heads) {
        const int G = c->n_kv_head, group = H / G;
        for (int l = c->layer0_type == LAYER0_CTXKV ? 1 : 0; l < c->n_layer; l++) {
            const float *qkv_w = host_tensor(&src, l, "qkv_w"), *qkv_b = host_tensor(&src, l, "qkv_b");
            float *q_w = host_tensor(m, l, "q_w"), *q_b = host_tensor(m, l, "q_b");
            float *kv_w = host_tensor(m, l, "kv_w"), *kv_b = host_tensor(m, l, "kv_b");
            for (int h = 0; h < H; h++) { // q rows: s = 0 of each head's [q | k | v]
                memcpy(q_w + (size_t)h * D * C, qkv_w + (size_t)h * 3 * D * C, (size_t)D * C * sizeof(float));
                memcpy(q_b + h * D, qkv_b + h * 3 * D, D * sizeof(float));
            }
            memset(kv_w, 0, (size_t)2 * G * D * C * sizeof(float));
            memset(kv_b, 0, (size_t)2 * G * D * sizeof(float));
            for (int h = 0; h < H; h++) {
                const int g = h / group;
                for (int s = 1; s <= 2; s++) { // 1 = k -> rows g*D, 2 = v -> rows (G+g)*D
                    const int dst = (s == 1 ? g : G + g) * D;
                    for (int j = 0; j < D; j++) {
                        const float *row = qkv_w + (size_t)(h * 3 * D + s * D + j) * C;
                        for (int i = 0; i < C; i++) kv_w[(size_t)(dst + j) * C + i] += row[i] / group;
                        kv_b[dst + j] += qkv_b[h * 3 * D + s * D + j] / group;
                    }
                }
            }
        }
    }
    model_free(&src);
    model_to_device(m); // the host copy was edited after model_init_random uploaded it
}

// The model config the flags ask for, without building the model (--kv-report needs no weights).
static Config config_from_args(const Args *a) {
    if (a->resume) {
        char path[4200];
        TrainState st;
        path_join(path, sizeof path, a->resume, TRAIN_STATE_FILE);
        Config c = train_state_load(path, NULL, &st);
        check_variant_flags_match(&c, a, path);
        return c;
    }
    const char *name = model_name(a);
    const Preset *p = a->init_from ? NULL : find_preset(name);
    Config c;
    if (p) {
        c = config_from_preset(p);
        apply_variant_flags(&c, a, NULL);
        apply_context_flags(&c, a);
    } else {
        if (access(name, F_OK) != 0)
            die("%s '%s' is neither a preset (pythia-14m, pythia-70m, pythia-160m, pythia-mqar, tiny) nor an existing checkpoint file",
                a->init_from ? "--init-from" : "--model", name);
        c = checkpoint_open(name, NULL);
        if (a->init_from) {
            if (has_context_block(&c)) die("--init-from starts from a plain Pythia checkpoint; '%s' already has a context block", name);
            const Config source = c;
            apply_variant_flags(&c, a, &source);
            apply_context_flags(&c, a);
        } else {
            check_variant_flags_match(&c, a, name);
        }
    }
    return c;
}

static Model model_from_args(const Args *a, const Config *c) {
    Model m;
    if (a->resume) {
        char path[4200];
        TrainState st;
        path_join(path, sizeof path, a->resume, TRAIN_STATE_FILE);
        train_state_load(path, &m, &st);
    } else if (a->init_from) model_init_from(&m, c, a->init_from, a->init_std, (uint64_t)a->seed);
    else if (find_preset(model_name(a))) model_init_random(&m, c, a->init_std, (uint64_t)a->seed);
    else model_load(&m, a->model);
    return m;
}
#endif
