/*
test_ctxkv.c: the test harness. It includes train_ctxkv.c under TESTING (as llm.c's
test_gpt2.c does) and calls its functions directly.

  ./test_ctxkv                       every check below
  ./test_ctxkv MODEL.bin STATE.bin   only the reference check of that pair
  ./test_ctxkv --simd                only the tiny model's Hugging Face parity and ctxkv/simd.h's
                                     kernels (make test runs it from a build without AVX-512 where
                                     -march=native has it, so that both GEMM shapes are tested)

Checks (in the order main runs them):
  1. Hugging Face parity: dev/ref/tiny_model.bin + tiny_state.bin, written by dev/reference.py
     from transformers' GPTNeoXForCausalLM (float64) and torch.optim.AdamW: logits, loss,
     every parameter gradient, and the losses of its optimizer steps; the same for each variant
     (gqa, mqa, mla, mla with q-rank, ctxkv, ctxpythia) against PyTorch autograd references.
  2. Finite differences: sampled entries of every parameter tensor of every variant, and of
     the ContextBlock under the OACD loss (phase 1); the ContextBlock/OACD reference state; the
     Jacobi iteration against the sequential recurrence.
  3. KV-cached decoding equals the full forward for every variant, with the analytic cache
     size; KV eviction (ctxkv/kvpolicy.h): a covering budget gives the full cache's logits
     exactly, StreamingLLM and SnapKV equal dev/ref/kv_eviction.bin (PyTorch masked forward,
     SnapKV's kept positions), decode-mode held-out loss equals the parallel one; --init-from
     (mha -> gqa/mqa); --kv-report's figures, under every policy equal to the measured cache.
  4. Import path: build/testdata/imported.bin (prepro/import_hf.py run on the committed
     fp16 safetensors by `make test`) is byte-identical to dev/ref/tiny_model.bin.
  5. Shard and token-table round trip: Python tokenized a text, C reads the shard and
     decodes it back to the same bytes (build/testdata, made by dev/make_test_data.py).
  6. Bad input: ./train_ctxkv (or TRAIN_BIN) exits 1 with a message naming the problem (never a
     crash) for bad shards, checkpoints, context blocks and flags; -h; --steps 0 prints no sample.
  7. Data order (file order; --shuffle), exact resume (in order and shuffled, a stale
     train_state.bin.tmp removed) and the non-finite-loss guard.
  8. ctxkv/simd.h against the plain loops it replaces.
  9. With TRAIN_BIN_CU (the emulated CUDA program, set by `make test`): the same exit status
     and error message as the CPU program for every fuzz regression and seed, a LAMBADA target
     past the vocabulary, and every bad flag.
  10. The CUDA compile check, when `make test` ran `make cuda-check` first.
Ends with "N passed, N failed"; exits non-zero on any failure.
*/
#define TESTING
#include "train_ctxkv.c"
#include <sys/wait.h>
#include "test_configs.h"

static int n_passed = 0, n_failed = 0;
static char tmpdir[256]; // scratch files, removed at the end

static void check(int ok, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void check(int ok, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("%s ", ok ? "PASS" : "FAIL");
    vprintf(fmt, ap);
    printf("\n");
    va_end(ap);
    if (ok) n_passed++;
    else n_failed++;
    fflush(stdout);
}

static int file_exists(const char *path) { return access(path, F_OK) == 0; }

// ----------------------------------------------------------------------------
// 1. reference states (format: doc/formats.md)

#define STATE_MAGIC 20261125
#define STATE_VERSION 1

typedef struct {
    int B, T, V, P, S;
    float lr, beta1, beta2, eps, weight_decay, grad_clip;
    int *inputs, *targets;
    float *logits, loss, *grads, *losses;
} RefState;

// Returns 0 (and prints why) if the file is missing or malformed.
static int refstate_load(RefState *r, const char *path) {
    memset(r, 0, sizeof *r);
    FILE *f = fopen(path, "rb");
    if (!f) { printf("cannot open reference state '%s'\n", path); return 0; }
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h || fread(h, sizeof(int), HEADER_INTS, f) != HEADER_INTS) { printf("'%s' too small\n", path); fclose(f); return 0; }
    if (h[0] != STATE_MAGIC || h[1] != STATE_VERSION) { printf("'%s': bad magic/version %d/%d\n", path, h[0], h[1]); fclose(f); return 0; }
    r->B = h[2]; r->T = h[3]; r->V = h[4]; r->P = h[5]; r->S = h[6];
    if (r->B < 1 || r->T < 1 || r->V < 1 || r->P < 1 || r->S < 0 || r->S > 10000 || (long long)r->B * r->T > (1 << 24)) {
        printf("'%s': implausible header\n", path); fclose(f); return 0;
    }
    r->lr = bits_float(h[16]); r->beta1 = bits_float(h[17]); r->beta2 = bits_float(h[18]);
    r->eps = bits_float(h[19]); r->weight_decay = bits_float(h[20]); r->grad_clip = bits_float(h[21]);
    size_t BT = (size_t)r->B * r->T;
    long long expect = sizeof h + 4LL * (2 * BT + BT * r->V + 1 + (size_t)r->P + r->S);
    if (size != expect) { printf("'%s' has %lld bytes, header implies %lld\n", path, size, expect); fclose(f); return 0; }
    r->inputs = malloc_check(BT * sizeof(int), "ref");
    r->targets = malloc_check(BT * sizeof(int), "ref");
    r->logits = malloc_check(BT * r->V * sizeof(float), "ref");
    r->grads = malloc_check((size_t)r->P * sizeof(float), "ref");
    r->losses = malloc_check((r->S + 1) * sizeof(float), "ref");
    fread_check(r->inputs, sizeof(int), BT, f, path);
    fread_check(r->targets, sizeof(int), BT, f, path);
    fread_check(r->logits, sizeof(float), BT * r->V, f, path);
    fread_check(&r->loss, sizeof(float), 1, f, path);
    fread_check(r->grads, sizeof(float), r->P, f, path);
    fread_check(r->losses, sizeof(float), r->S, f, path);
    fclose(f);
    return 1;
}

static void refstate_free(RefState *r) { free(r->inputs); free(r->targets); free(r->logits); free(r->grads); free(r->losses); }

// Compares our forward, backward and optimizer with a reference state. Tolerances (issue 2):
// logits 1e-4 abs, loss 1e-5, each gradient tensor 1e-4 relative to max(1, max|ref|),
// each optimizer-step loss 1e-4.
static void check_reference(const char *model_path, const char *state_path) {
    printf("-- reference parity: %s + %s\n", model_path, state_path);
    RefState r;
    if (!file_exists(model_path) || !refstate_load(&r, state_path)) {
        check(0, "reference files readable (%s, %s)", model_path, state_path);
        return;
    }
    Model m;
    memset(&m, 0, sizeof m);
    model_load(&m, model_path);
    if ((size_t)r.P != m.num_params || r.V != m.cfg.vocab_size) {
        check(0, "reference state matches the checkpoint (P %d vs %zu, V %d vs %d)", r.P, m.num_params, r.V, m.cfg.vocab_size);
        model_free(&m); refstate_free(&r);
        return;
    }
    const int BT = r.B * r.T, V = r.V, Vp = m.cfg.padded_vocab_size;
    float loss = model_forward(&m, r.inputs, r.targets, r.B, r.T);
    float maxdiff = 0.0f;
    for (int i = 0; i < BT; i++)
        for (int j = 0; j < V; j++) {
            float d = fabsf(m.a.logits[(size_t)i * Vp + j] - r.logits[(size_t)i * V + j]);
            if (!(d <= maxdiff)) maxdiff = d; // NaN-safe: NaN becomes the max
        }
    check(maxdiff <= 1e-4f, "logits max abs diff %.3e (tol 1e-4)", maxdiff);
    check(fabsf(loss - r.loss) <= 1e-5f, "loss %.7f vs ref %.7f, diff %.3e (tol 1e-5)", loss, r.loss, fabsf(loss - r.loss));

    model_zero_grad(&m);
    model_backward(&m);
    int bad_tensors = 0;
    float worst_rel = 0.0f;
    const char *worst_name = "";
    for (ptrdiff_t ti = 0; ti < arrlen(m.tensors); ti++) {
        const ParamTensor *t = &m.tensors[ti];
        const float *g = m.grads_memory + t->offset, *rg = r.grads + t->offset;
        size_t n = t->rows * t->cols;
        float maxref = 0.0f, md = 0.0f;
        for (size_t i = 0; i < n; i++) {
            maxref = fmaxf(maxref, fabsf(rg[i]));
            float d = fabsf(g[i] - rg[i]);
            if (!(d <= md)) md = d;
        }
        float rel = md / fmaxf(1.0f, maxref);
        printf("   grad %-18s max|ref| %.3e  max diff %.3e  rel %.3e%s\n", t->name, maxref, md, rel, rel <= 1e-4f ? "" : "  <-- FAIL");
        if (!(rel <= 1e-4f)) bad_tensors++;
        if (!(rel <= worst_rel)) { worst_rel = rel; worst_name = t->name; }
    }
    check(bad_tensors == 0, "gradients of all %d tensors within 1e-4 (worst %s, %.3e)", (int)arrlen(m.tensors), worst_name, worst_rel);

    // optimizer steps on the same batch, as torch.optim.AdamW (+ clip_grad_norm_)
    AdamW opt = {r.lr, r.beta1, r.beta2, r.eps, r.weight_decay};
    float worst_step = 0.0f;
    for (int s = 0; s < r.S; s++) {
        float l = model_forward(&m, r.inputs, r.targets, r.B, r.T);
        float d = fabsf(l - r.losses[s]);
        printf("   step %2d loss %.7f ref %.7f diff %.2e\n", s, l, r.losses[s], d);
        if (!(d <= worst_step)) worst_step = d;
        model_zero_grad(&m);
        model_backward(&m);
        model_clip_grad_norm(&m, r.grad_clip);
        model_update(&m, &opt);
    }
    if (r.S > 0) check(worst_step <= 1e-4f, "%d AdamW step losses within 1e-4 (worst %.3e)", r.S, worst_step);
    model_free(&m);
    refstate_free(&r);
}

// ----------------------------------------------------------------------------
// 2. finite differences on every parameter tensor

// mean loss summed in double from the per-position losses (more precise than the float return)
static double loss_at(Model *m, const int *x, const int *y, int B, int T) {
    model_forward(m, x, y, B, T);
    double s = 0.0;
    for (int i = 0; i < B * T; i++) s += m->a.losses[i];
    return s / m->n_valid;
}

static void check_finite_differences(const char *label, Config c) {
    printf("-- finite differences: tiny, %s\n", label);
    Model m;
    model_init_random(&m, &c, 0.3f, 42);
    // perturb everything (LayerNorm weights, biases) so no term hides behind a 1 or a 0
    uint64_t rng = 7;
    for (ptrdiff_t ti = 0; ti < arrlen(m.tensors); ti++) {
        const ParamTensor *t = &m.tensors[ti];
        float *w = m.params_memory + t->offset;
        size_t n = t->rows * t->cols;
        if (!strcmp(t->name, "embed_in") || !strcmp(t->name, "embed_out")) n = (size_t)c.vocab_size * t->cols; // keep padding rows 0
        for (size_t i = 0; i < n; i++) w[i] += 0.2f * random_normal(&rng);
    }
    const int B = 2, T = 8;
    int x[B * T], y[B * T];
    for (int i = 0; i < B * T; i++) { x[i] = random_u32(&rng) % c.vocab_size; y[i] = random_u32(&rng) % c.vocab_size; }
    y[5] = IGNORE_INDEX;
    model_forward(&m, x, y, B, T);
    model_zero_grad(&m);
    model_backward(&m);
    float *grads = malloc_check(m.num_params * sizeof(float), "fd");
    memcpy(grads, m.grads_memory, m.num_params * sizeof(float));
    const float eps = 1e-2f;
    int bad = 0;
    int checked = 0;
    for (ptrdiff_t ti = 0; ti < arrlen(m.tensors); ti++) {
        const ParamTensor *t = &m.tensors[ti];
        size_t n = t->rows * t->cols;
        // The contexts are constants in phase 2 (stop-gradient, by design): the block and the
        // embeddings that feed it have no true derivative to compare with here. The block is
        // checked on its own objective by check_phase1_finite_differences.
        if (has_context_block(&c) && (!strncmp(t->name, "ctx_", 4) || !strcmp(t->name, "embed_in"))) continue;
        checked++;
        // the 3 largest analytic entries (a sign or scale error shows there) + 3 random ones
        size_t idx[6];
        int k = 0;
        for (int pick = 0; pick < 3; pick++) {
            size_t best = 0;
            float bestv = -1.0f;
            for (size_t i = 0; i < n; i++) {
                float v = fabsf(grads[t->offset + i]);
                int taken = 0;
                for (int j = 0; j < k; j++) taken |= idx[j] == i;
                if (!taken && v > bestv) { bestv = v; best = i; }
            }
            idx[k++] = best;
        }
        for (int j = 0; j < 3; j++) idx[k++] = random_u32(&rng) % n;
        float worst = 0.0f, max_an = 0.0f;
        for (int j = 0; j < k; j++) {
            float *p = m.params_memory + t->offset + idx[j];
            float saved = *p;
            *p = saved + eps;
            double lp = loss_at(&m, x, y, B, T);
            *p = saved - eps;
            double lm = loss_at(&m, x, y, B, T);
            *p = saved;
            float fd = (float)((lp - lm) / (2.0 * eps));
            float an = grads[t->offset + idx[j]];
            float err = fabsf(fd - an) / (2e-2f * fmaxf(fabsf(an), fabsf(fd)) + 5e-5f); // <= 1 passes
            if (!(err <= worst)) worst = err;
            max_an = fmaxf(max_an, fabsf(an));
        }
        printf("   fd %-18s max|grad| %.3e  worst err/tol %.3f%s\n", t->name, max_an, worst, worst <= 1.0f ? "" : "  <-- FAIL");
        if (!(worst <= 1.0f)) bad++;
    }
    check(bad == 0 && checked > 0, "finite differences agree for all %d tensors of %s (tol 2%% relative + 5e-5)", checked, label);
    free(grads);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// 3. import path: the converter's output is byte-identical to the committed checkpoint

static int files_equal(const char *a, const char *b) {
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) same = 0;
        if (ca == EOF || cb == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

// Phase 1: finite differences of OACD(ContextBlock(S, E)) with respect to every block tensor.
static double phase1_objective(Model *m, const float *S, const float *E, int N, int slice) {
    const Config *c = &m->cfg;
    contextblock_forward(&m->cb, &m->p, S, E, N, c->embed_dim, c->context_dim, c->ln_eps);
    return oacd_forward(m->cb.out, N, c->context_dim, slice, 0.1f);
}

static void check_phase1_finite_differences(void) {
    printf("-- finite differences: ContextBlock under the OACD loss (phase 1)\n");
    Config c = config_from_preset(find_preset("tiny"));
    Args a = default_args();
    a.layer0 = "ctxkv"; a.context_dim = 16; a.context_interval = 3; a.max_contexts = 4;
    apply_context_flags(&c, &a);
    Model m;
    model_init_random(&m, &c, 0.3f, 21);
    model_set_phase(&m, 1);
    uint64_t rng = 17;
    for (ptrdiff_t i = 0; i < arrlen(m.tensors); i++) // perturb the LayerNorms too
        if (!strncmp(m.tensors[i].name, "ctx_ln", 6))
            for (size_t j = 0; j < m.tensors[i].cols; j++) m.params_memory[m.tensors[i].offset + j] += 0.2f * random_normal(&rng);
    const int N = 20, dc = c.context_dim, Ed = c.embed_dim, slice = 8; // slices of 8, 8 and a partial 4
    float S[N * 16], E[N * 32], dO[N * 16];
    for (int i = 0; i < N * dc; i++) S[i] = random_normal(&rng);
    for (int i = 0; i < N * Ed; i++) E[i] = random_normal(&rng);
    blockacts_ensure(&m.cb, N, Ed, dc);
    m.grads_memory = calloc_check(m.num_params * sizeof(float), "fd");
    layout_params(&c, m.grads_memory, &m.g, NULL, NULL);
    phase1_objective(&m, S, E, N, slice);
    oacd_backward(dO, m.cb.out, N, dc, slice, 0.1f);
    contextblock_backward(&m.cb, &m.p, &m.g, dO, E, N, Ed, dc);
    int bad = 0, checked = 0;
    const float eps = 1e-2f;
    for (ptrdiff_t ti = 0; ti < arrlen(m.tensors); ti++) {
        const ParamTensor *t = &m.tensors[ti];
        if (strncmp(t->name, "ctx_", 4)) continue;
        checked++;
        float worst = 0.0f, max_an = 0.0f;
        for (int j = 0; j < 6; j++) {
            size_t i = random_u32(&rng) % (t->rows * t->cols);
            float *p = m.params_memory + t->offset + i, saved = *p;
            *p = saved + eps;
            double lp = phase1_objective(&m, S, E, N, slice);
            *p = saved - eps;
            double lm = phase1_objective(&m, S, E, N, slice);
            *p = saved;
            float fd = (float)((lp - lm) / (2.0 * eps)), an = m.grads_memory[t->offset + i];
            worst = fmaxf(worst, fabsf(fd - an) / (2e-2f * fmaxf(fabsf(an), fabsf(fd)) + 2e-5f));
            max_an = fmaxf(max_an, fabsf(an));
        }
        printf("   fd %-18s max|grad| %.3e  worst err/tol %.3f%s\n", t->name, max_an, worst, worst <= 1.0f ? "" : "  <-- FAIL");
        bad += !(worst <= 1.0f);
    }
    check(bad == 0 && checked == 6, "OACD gradients of the %d ContextBlock tensors agree with finite differences", checked);
    model_free(&m);
}

// Phase-1 reference (dev/reference.py, PyTorch float64): the ContextBlock on a given shifted
// input S for all positions at once, its OACD loss, the gradients of the six block tensors,
// and the sequential recurrence. Layout: reference.py's write_ctxblock_state docstring.
static void check_ctxblock_reference(const char *path) {
    printf("-- ContextBlock / OACD reference: %s\n", path);
    long long size;
    FILE *f = fopen(path, "rb");
    if (!f) { check(0, "reference file readable (%s)", path); return; }
    size = file_size(f);
    int h[HEADER_INTS];
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    const int B = h[2], T = h[3], E = h[4], dc = h[5], Vp = h[6], V = h[7], slice = h[8];
    const float lambda = bits_float(h[9]);
    if (h[0] != 20261127 || h[1] != 1 || B < 1 || T < 1 || E < 1 || dc < 1 || Vp < V || V < 1 || slice < 1) {
        check(0, "'%s' has a valid header", path); fclose(f); return;
    }
    Config c = config_from_preset(find_preset("tiny"));
    c.vocab_size = V; c.padded_vocab_size = Vp; c.n_embd = E; c.embed_dim = E; c.n_head = 4; c.rotary_dims = 0;
    c.layer0_type = LAYER0_CTXKV; c.context_dim = dc; c.context_interval = 1; c.max_contexts = 1;
    Model m;
    model_init_random(&m, &c, 0.02f, 1);
    const size_t N = (size_t)B * T;
    size_t nblock = 0;
    for (int i = 0; i < N_BLOCK_TENSORS - 1; i++) { const ParamTensor *pt = find_tensor(&m, BLOCK_TENSORS[i]); nblock += pt->rows * pt->cols; }
    long long expect = sizeof h + 4LL * (nblock + (size_t)Vp * E + N + 3 * N * dc + 1 + nblock);
    if (size != expect) { check(0, "'%s' has the size its header implies (%lld vs %lld)", path, size, expect); fclose(f); model_free(&m); return; }
    for (int i = 0; i < N_BLOCK_TENSORS; i++) { const ParamTensor *pt = find_tensor(&m, BLOCK_TENSORS[i]); fread_check(m.params_memory + pt->offset, 4, pt->rows * pt->cols, f, path); }
    int *tok = malloc_check(N * sizeof(int), "ref");
    float *S = malloc_check(N * dc * 4, "ref"), *O = malloc_check(N * dc * 4, "ref"), *G = malloc_check(nblock * 4, "ref"), *Cseq = malloc_check(N * dc * 4, "ref");
    float loss_ref;
    fread_check(tok, 4, N, f, path); fread_check(S, 4, N * dc, f, path); fread_check(O, 4, N * dc, f, path);
    fread_check(&loss_ref, 4, 1, f, path); fread_check(G, 4, nblock, f, path); fread_check(Cseq, 4, N * dc, f, path);
    fclose(f);
    float *Emb = malloc_check(N * E * 4, "ref"), *dO = malloc_check(N * dc * 4, "ref");
    embedding_forward(Emb, tok, m.p.embed_in, (int)N, E);
    blockacts_ensure(&m.cb, (int)N, E, dc);
    contextblock_forward(&m.cb, &m.p, S, Emb, (int)N, E, dc, c.ln_eps);
    float dmax = 0.0f;
    for (size_t i = 0; i < N * dc; i++) dmax = fmaxf(dmax, fabsf(m.cb.out[i] - O[i]));
    check(dmax <= 1e-5f, "ContextBlock on all positions in parallel: max diff %.2e (tol 1e-5)", dmax);
    float loss = oacd_forward(m.cb.out, (int)N, dc, slice, lambda);
    check(fabsf(loss - loss_ref) <= 1e-5f, "OACD loss %.7f vs ref %.7f (tol 1e-5)", loss, loss_ref);
    m.grads_memory = calloc_check(m.num_params * 4, "ref");
    layout_params(&c, m.grads_memory, &m.g, NULL, NULL);
    oacd_backward(dO, m.cb.out, (int)N, dc, slice, lambda);
    contextblock_backward(&m.cb, &m.p, &m.g, dO, Emb, (int)N, E, dc);
    size_t off = 0;
    int bad = 0;
    for (int i = 0; i < N_BLOCK_TENSORS - 1; i++) {
        const ParamTensor *pt = find_tensor(&m, BLOCK_TENSORS[i]);
        size_t n = pt->rows * pt->cols;
        float maxref = 0.0f, md = 0.0f;
        for (size_t j = 0; j < n; j++) { maxref = fmaxf(maxref, fabsf(G[off + j])); md = fmaxf(md, fabsf(m.grads_memory[pt->offset + j] - G[off + j])); }
        float rel = md / fmaxf(1.0f, maxref);
        printf("   grad %-12s max|ref| %.3e  rel %.3e\n", pt->name, maxref, rel);
        bad += !(rel <= 1e-4f);
        off += n;
    }
    check(bad == 0, "OACD gradients of the 6 block tensors within 1e-4 of PyTorch autograd");
    int x[4096];
    for (size_t i = 0; i < N && i < 4096; i++) x[i] = tok[i];
    model_ensure_acts(&m, B, T);
    compute_contexts(&m, x, B, T);
    dmax = 0.0f;
    for (size_t i = 0; i < N * dc; i++) dmax = fmaxf(dmax, fabsf(m.a.contexts[i] - Cseq[i]));
    check(dmax <= 1e-5f, "the sequential recurrence matches the reference contexts (max diff %.2e)", dmax);
    free(tok); free(S); free(O); free(G); free(Cseq); free(Emb); free(dO);
    model_free(&m);
}

// The parallel (Jacobi) iteration without noise reaches the exact sequential recurrence
// after T iterations: position t is exact once t+1 iterations have run.
static void check_jacobi_equals_recurrence(void) {
    printf("-- Jacobi iteration vs the sequential recurrence\n");
    Config c = config_from_preset(find_preset("tiny"));
    Args a = default_args();
    a.layer0 = "ctxkv"; a.context_dim = 16; a.context_interval = 3; a.max_contexts = 4;
    apply_context_flags(&c, &a);
    Model m;
    model_init_random(&m, &c, 0.3f, 23);
    const int B = 2, T = 24, N = B * T, dc = c.context_dim, Ed = c.embed_dim;
    int x[N];
    uint64_t rng = 29;
    for (int i = 0; i < N; i++) x[i] = random_u32(&rng) % c.vocab_size;
    model_forward(&m, x, NULL, B, T); // fills m.a.contexts by the sequential recurrence
    float *seq = malloc_check((size_t)N * dc * sizeof(float), "jacobi");
    memcpy(seq, m.a.contexts, (size_t)N * dc * sizeof(float));
    float *E = malloc_check((size_t)N * Ed * sizeof(float), "jacobi"), *P = calloc_check((size_t)N * dc * sizeof(float), "jacobi");
    float *S = malloc_check((size_t)N * dc * sizeof(float), "jacobi");
    embedding_forward(E, x, m.p.embed_in, N, Ed);
    for (int i = 0; i < N * dc; i++) P[i] = random_normal(&rng); // any start
    blockacts_ensure(&m.cb, N, Ed, dc);
    float diff_before = 0.0f, diff = 0.0f;
    for (int it = 0; it < T; it++) {
        jacobi_shift(S, P, B, T, dc, 0.0f, &rng);
        contextblock_forward(&m.cb, &m.p, S, E, N, Ed, dc, c.ln_eps);
        memcpy(P, m.cb.out, (size_t)N * dc * sizeof(float));
        if (it == T / 2) for (int i = 0; i < N * dc; i++) diff_before = fmaxf(diff_before, fabsf(P[i] - seq[i]));
    }
    for (int i = 0; i < N * dc; i++) diff = fmaxf(diff, fabsf(P[i] - seq[i]));
    check(diff <= 1e-5f && diff_before > 1e-3f, "after T = %d noiseless iterations the parallel contexts equal the recurrence "
          "(max diff %.2e; halfway %.2e)", T, diff, diff_before);
    free(seq); free(E); free(P); free(S);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// cached decoding = the full forward pass

// Prefills two random prompts, then decodes both greedily with the KV cache (one batch),
// keeping the logits of every decoded position; a full forward over the whole sequences must
// give the same logits.
static void check_cached_decoding(const char *label, Config c) {
    const int B = 2, n_prompt = 16, n_decode = 64, n = n_prompt + n_decode;
    Model m;
    model_init_random(&m, &c, 0.3f, 11);
    const int V = c.vocab_size, Vp = c.padded_vocab_size;
    int prompts[B * n_prompt], seq[B * n], next[B];
    uint64_t rng = 5;
    for (int i = 0; i < B * n_prompt; i++) prompts[i] = random_u32(&rng) % V;
    for (int b = 0; b < B; b++) memcpy(seq + b * n, prompts + b * n_prompt, n_prompt * sizeof(int));
    float *cached = malloc_check((size_t)B * n * Vp * sizeof(float), "decode test");
    KVCache kv = kvcache_new(&c, B, n_prompt, n_decode, &KV_POLICY_FULL);
    size_t stride;
    const float *logits = model_prefill(&m, &kv, prompts, n_prompt, &stride);
    for (int i = n_prompt; i < n; i++) {
        for (int b = 0; b < B; b++) seq[b * n + i] = next[b] = sample_token(logits + b * stride, V, 0.0f, &rng, NULL);
        logits = model_decode_step(&m, &kv, next); // logits at position i, (B,Vp)
        stride = Vp;
        for (int b = 0; b < B; b++) memcpy(cached + ((size_t)b * n + i) * Vp, logits + (size_t)b * Vp, Vp * sizeof(float));
    }
    // analytic: T x the per-token figure; a ctxkv layer 0 instead keeps min(T, (M-1)I+1)
    // contexts, and a context block adds the running context; times B sequences
    size_t per_token = kv_elements_per_token(&c), expect = (size_t)n * per_token;
    if (c.layer0_type == LAYER0_CTXKV) {
        size_t ring = (size_t)(c.max_contexts - 1) * c.context_interval + 1;
        expect = expect - (size_t)n * c.context_dim + (n < (int)ring ? (size_t)n : ring) * c.context_dim;
    }
    if (has_context_block(&c)) expect += c.context_dim;
    expect *= B;
    check(kv.bytes == expect * sizeof(float) && kv.len == n, "%s: cache for %d x %d tokens holds %zu bytes, analytic %zu (fp32 %zu per token)",
          label, B, n, kv.bytes, expect * sizeof(float), per_token * sizeof(float));
    kvcache_free(&kv);
    model_forward(&m, seq, NULL, B, n);
    float maxdiff = 0.0f;
    for (int b = 0; b < B; b++)
        for (int i = n_prompt; i < n; i++)
            for (int j = 0; j < V; j++) {
                size_t r = ((size_t)b * n + i) * Vp + j;
                float d = fabsf(cached[r] - m.a.logits[r]);
                if (!(d <= maxdiff)) maxdiff = d;
            }
    check(maxdiff <= 1e-4f, "%s: cached decoding of %d positions after a %d-token prompt (batch %d) equals the full forward (max diff %.2e)",
          label, n_decode, n_prompt, B, maxdiff);
    free(cached);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// decode-time KV eviction (ctxkv/kvpolicy.h)

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float d = 0.0f;
    for (size_t i = 0; i < n; i++) { float e = fabsf(a[i] - b[i]); if (!(e <= d)) d = e; }
    return d;
}

// dev/ref/kv_eviction.bin (dev/reference.py kv_eviction_reference, PyTorch float64): StreamingLLM
// against the full forward under a sink + window mask, SnapKV's kept positions (exactly) and the
// logits after it (1e-5), for mha, gqa and mla
static void judge_kv_eviction(const EvictCase *e, const KVCache *kv, const float *got, int Vp) {
    float max_ref;
    const float d = evict_case_diff(e, got, Vp, &max_ref);
    char label[64];
    kv_policy_label(&e->policy, label, sizeof label);
    if (e->K) {
        int same = kv->kept != NULL;
        for (size_t i = 0; same && i < (size_t)e->L * e->B * e->units * e->K; i++) same = kv->kept[i] == e->kept[i];
        check(same, "%s %s: the positions kept after a %d-token prompt, per layer, sequence and unit (%d units), equal PyTorch's", e->model, label, e->P, e->units);
    }
    check(d <= 1e-5f, "%s %s (sinks %d, window %d, pool %d): logits of positions %d..%d after a %d-token prompt equal PyTorch's masked forward (max diff %.2e)",
          e->model, label, e->policy.sinks, e->policy.window, e->policy.pool, e->P - 1, e->T - 2, e->P, d);
}
static void check_kv_eviction_reference(const char *path) {
    printf("-- KV eviction against PyTorch (%s)\n", path);
    evict_cases_run(path, judge_kv_eviction);
}

// Per variant: a budget that covers everything gives exactly the full cache's logits; a smaller
// one changes them (the policy acts, layers 1.. for ctxkv), and the cache holds the analytic bytes
static void check_kv_policies(const char *label, Config c) {
    const int B = 2, P = 16, T = 40, Vp = c.padded_vocab_size;
    Model m;
    model_init_random(&m, &c, 0.3f, 21);
    int x[B * T];
    uint64_t rng = 77;
    for (int i = 0; i < B * T; i++) x[i] = random_u32(&rng) % c.vocab_size;
    const size_t n = (size_t)B * (T - P) * Vp;
    float *full = malloc_check(n * sizeof(float), "policy test"), *got = malloc_check(n * sizeof(float), "policy test");
    KVCache kv = decode_under(&m, &KV_POLICY_FULL, x, B, T, P, full);
    kvcache_free(&kv);
    const KVPolicy wide[] = {{KV_STREAMING, T, 4, 32, 5}, {KV_SNAPKV, P, 4, 4, 5}}, tight[] = {{KV_STREAMING, 8, 2, 32, 5}, {KV_SNAPKV, 8, 4, 3, 5}};
    for (int i = 0; i < 2; i++) {
        char name[64];
        kv = decode_under(&m, &wide[i], x, B, T, P, got);
        kv_policy_label(&wide[i], name, sizeof name);
        float d = max_abs_diff(got, full, n);
        check(d == 0.0f, "%s: %s, a budget that covers the %s, gives exactly the full cache's logits (max diff %.1e)", label, name, i ? "prompt" : "whole sequence", d);
        kvcache_free(&kv);
        kv = decode_under(&m, &tight[i], x, B, T, P, got);
        kv_policy_label(&tight[i], name, sizeof name);
        d = max_abs_diff(got, full, n);
        const size_t expect = B * kv_policy_cache_bytes(&c, &tight[i], P, T - 1 - P);
        check(d > 1e-3f && kv.bytes == expect, "%s: %s changes the logits (max diff %.2e) and its cache holds %zu bytes (analytic %zu)", label, name, d, kv.bytes, expect);
        kvcache_free(&kv);
    }
    free(full); free(got);
    model_free(&m);
}

static void write_shard_file(const char *path, int magic, int header_ntok, const uint16_t *tok, int ntok);

// decode-mode held-out loss with the full cache = the parallel forward on the same targets: each
// full window's targets past its first T − T/2 (the sliding window's, after its first window)
static void check_decode_heldout(void) {
    Config c = config_from_preset(find_preset("tiny"));
    Model m;
    model_init_random(&m, &c, 0.3f, 5);
    const int T = 20, stride = T / 2, ntok = 97;
    uint16_t tok[97];
    uint64_t rng = 3;
    for (int i = 0; i < ntok; i++) tok[i] = random_u32(&rng) % c.vocab_size;
    char path[512];
    snprintf(path, sizeof path, "%s/heldout.bin", tmpdir);
    write_shard_file(path, SHARD_MAGIC, ntok, tok, ntok);
    long long scored;
    float dec = eval_heldout(&m, path, T, 0, &scored, 3);
    double total = 0.0;
    long long count = 0;
    int x[20], y[20];
    for (int s = 0; s + T + 1 <= ntok; s += stride) {
        for (int i = 0; i < T; i++) { x[i] = tok[s + i]; y[i] = i >= T - stride ? tok[s + i + 1] : IGNORE_INDEX; }
        model_forward(&m, x, y, 1, T);
        for (int i = T - stride; i < T; i++) { total += m.a.losses[i]; count++; }
    }
    float par = (float)(total / count);
    check(scored == count && fabsf(dec - par) <= 1e-5f * fabsf(par), "decode-mode held-out loss (full cache, 3 windows a batch) %.6f over %lld targets = the parallel forward's %.6f over %lld",
          dec, scored, par, count);
    model_free(&m);
}

// --kv-report at a budget = the bytes --generate's cache holds, for every variant x policy
static void check_kv_report_policies(const char *bin) {
    printf("-- --kv-report under a KV policy = the measured cache\n");
    const char *variants[] = {"--attn mha", "--attn gqa --n-kv-head 2", "--attn mqa", "--attn mla", "--layer0 ctxkv --context-interval 2 --max-contexts 4", "--model-type ctxpythia"};
    const char *policies[] = {"", "--kv-policy streaming --kv-budget 12 --kv-sinks 2", "--kv-policy snapkv --kv-budget 12 --kv-window 4"};
    char prompt[256] = "";
    for (int i = 0; i < 20; i++) snprintf(prompt + strlen(prompt), sizeof prompt - strlen(prompt), "%s%d", i ? "," : "", i + 1);
    for (int v = 0; v < 6; v++)
        for (int p = 0; p < 3; p++) {
            char cmd[1024], line[4096];
            long long report = -1, measured = -2;
            snprintf(cmd, sizeof cmd, "%s --model tiny %s %s --kv-report -t 20 --generate 16 2>&1", bin, variants[v], policies[p]);
            FILE *pp = popen(cmd, "r");
            while (pp && fgets(line, sizeof line, pp)) { const char *k = strstr(line, "\"kv_cache_bytes_fp32\": "); if (k) report = atoll(k + 23); }
            if (pp) pclose(pp);
            snprintf(cmd, sizeof cmd, "%s --model tiny %s %s --generate 16 --prompt-ids %s 2>&1", bin, variants[v], policies[p], prompt);
            pp = popen(cmd, "r");
            while (pp && fgets(line, sizeof line, pp)) { const char *k = strstr(line, "\"kv_cache_bytes\": "); if (k) measured = atoll(k + 18); }
            if (pp) pclose(pp);
            check(report == measured, "%s %s: --kv-report %lld bytes after 20 + 16 tokens, --generate measures %lld", variants[v], p ? policies[p] : "(full)", report, measured);
        }
}

// --init-from: an mha model converted to gqa with G = H (nothing pooled) computes the same
// function; with G < H each KV head is the mean of its group's K/V heads.
static void check_init_from(void) {
    printf("-- --init-from (mha -> gqa/mqa)\n");
    char path[512];
    snprintf(path, sizeof path, "%s/mha_src.bin", tmpdir);
    Config c = config_from_preset(find_preset("tiny"));
    Model src, dst;
    model_init_random(&src, &c, 0.3f, 3);
    model_save(&src, path);
    const int B = 2, T = 12, BT = B * T, Vp = c.padded_vocab_size;
    int x[BT];
    uint64_t rng = 9;
    for (int i = 0; i < BT; i++) x[i] = random_u32(&rng) % c.vocab_size;
    model_forward(&src, x, NULL, B, T);
    float *ref = malloc_check((size_t)BT * Vp * sizeof(float), "init-from");
    memcpy(ref, src.a.logits, (size_t)BT * Vp * sizeof(float));

    Config g = tiny_variant("gqa", c.n_head, 0, 0, -1);
    model_init_from(&dst, &g, path, 0.02f, 1);
    model_forward(&dst, x, NULL, B, T);
    float md = 0.0f;
    for (size_t i = 0; i < (size_t)BT * Vp; i++) md = fmaxf(md, fabsf(dst.a.logits[i] - ref[i]));
    check(md <= 1e-5f, "mha -> gqa with G = H gives the same logits (max diff %.2e)", md);
    model_free(&dst);

    Config g2 = tiny_variant("gqa", 2, 0, 0, -1);
    model_init_from(&dst, &g2, path, 0.02f, 1);
    const int C = c.n_embd, D = C / c.n_head;
    float err = 0.0f; // KV head 1 of layer 1 = mean of heads 2 and 3 (K rows at s = 1, V rows at s = 2)
    for (int s = 1; s <= 2; s++)
        for (int j = 0; j < D; j++)
            for (int i = 0; i < C; i++) {
                float mean = 0.5f * (src.p.layer[1].qkv_w[(size_t)(2 * 3 * D + s * D + j) * C + i] +
                                     src.p.layer[1].qkv_w[(size_t)(3 * 3 * D + s * D + j) * C + i]);
                float got = dst.p.layer[1].kv_w[(size_t)((s == 1 ? 1 : 2 + 1) * D + j) * C + i];
                err = fmaxf(err, fabsf(got - mean));
            }
    check(err <= 1e-6f, "mha -> gqa with G = 2 mean-pools each group's K and V heads (max err %.2e)", err);
    model_free(&dst);
    model_free(&src);
    free(ref);
}

// --init-from into mla (doc/retrofit.md): at full rank (kv_rank = C) with a linear latent the
// converted model computes the mha model's function, the value bias folded into dense and the
// pass part of the key bias dropped; at lower ranks the error falls as the rank grows. The
// reference is the mha model's own forward (the MHA path), not the converted model.
static void check_init_from_mla(void) {
    printf("-- --init-from (mha -> mla)\n");
    char path[512];
    snprintf(path, sizeof path, "%s/mha_src_mla.bin", tmpdir);
    Config c = config_from_preset(find_preset("tiny"));
    const int C = c.n_embd, H = c.n_head, D = C / H, R = c.rotary_dims, B = 2, T = 12, BT = B * T, Vp = c.padded_vocab_size;
    Model src, dst;
    model_init_random(&src, &c, 0.3f, 5);
    uint64_t rng = 11;
    for (int l = 0; l < c.n_layer; l++) { // biases the conversion keeps exactly: v, the pass dims of k, dense
        float *b = src.p.layer[l].qkv_b;
        for (int h = 0; h < H; h++)
            for (int j = 0; j < D; j++) {
                b[h * 3 * D + D + j] = j >= R ? 0.5f * random_normal(&rng) : 0.0f;
                b[h * 3 * D + 2 * D + j] = 0.5f * random_normal(&rng);
            }
        for (int o = 0; o < C; o++) src.p.layer[l].dense_b[o] = 0.1f * random_normal(&rng);
    }
    model_save(&src, path);
    int x[BT];
    for (int i = 0; i < BT; i++) x[i] = random_u32(&rng) % c.vocab_size;
    model_forward(&src, x, NULL, B, T);
    float *ref = malloc_check((size_t)BT * Vp * sizeof(float), "init-from mla");
    memcpy(ref, src.a.logits, (size_t)BT * Vp * sizeof(float));
    float scale = 0.0f;
    for (size_t i = 0; i < (size_t)BT * Vp; i++) scale = fmaxf(scale, fabsf(ref[i]));
    const int ranks[] = {4, 8, 16, 32};
    float err[4];
    for (int k = 0; k < 4; k++) {
        Config g = tiny_mla_grouped(ranks[k]);
        model_init_from(&dst, &g, path, 0.02f, 1);
        model_forward(&dst, x, NULL, B, T);
        err[k] = 0.0f;
        for (size_t i = 0; i < (size_t)BT * Vp; i++) err[k] = fmaxf(err[k], fabsf(dst.a.logits[i] - ref[i]));
        model_free(&dst);
    }
    check(err[3] <= 1e-5f * scale && scale > 0.1f, "mha -> mla at full rank (kv_rank %d = C) gives the mha logits (max diff %.2e, logits up to %.2f)",
          ranks[3], err[3], scale);
    check(err[0] > err[1] && err[1] > err[2] && err[2] > err[3] && err[0] > 1e-3f * scale,
          "mha -> mla: the logit error falls as kv_rank grows (rank 4: %.2e, 8: %.2e, 16: %.2e, 32: %.2e)", err[0], err[1], err[2], err[3]);
    // a query bias has no place in MLA: the conversion is then no longer exact, and says so
    src.p.layer[1].qkv_b[0] = 1.0f;
    model_save(&src, path);
    model_forward(&src, x, NULL, B, T);
    memcpy(ref, src.a.logits, (size_t)BT * Vp * sizeof(float));
    Config g = tiny_mla_grouped(32);
    model_init_from(&dst, &g, path, 0.02f, 1);
    model_forward(&dst, x, NULL, B, T);
    float e = 0.0f;
    for (size_t i = 0; i < (size_t)BT * Vp; i++) e = fmaxf(e, fabsf(dst.a.logits[i] - ref[i]));
    check(e > 1e-4f * scale, "mha -> mla with a query bias differs from mha (max diff %.2e): MLA has no query bias", e);
    model_free(&dst);
    model_free(&src);
    free(ref);
}

// --kv-report against the published KV-structural table (pythia-160m shape: 12 layers, 12 heads
// of 64): per layer, K and V, bf16
static void check_kv_report(const char *bin) {
    printf("-- --kv-report\n");
    struct { const char *flags; int expect; } rows[] = {
        {"--attn mha", 3072}, {"--attn gqa --n-kv-head 3", 768}, {"--attn mqa", 256}, {"--attn mla --kv-rank 256 --rope-dim 64", 640}};
    for (int i = 0; i < 4; i++) {
        char cmd[512], line[2048] = {0};
        snprintf(cmd, sizeof cmd, "%s --model pythia-160m %s --kv-report", bin, rows[i].flags);
        FILE *p = popen(cmd, "r");
        if (p) { if (!fgets(line, sizeof line, p)) line[0] = 0; pclose(p); }
        const char *key = strstr(line, "\"kv_bytes_per_token_per_layer_bf16\": ");
        int got = key ? atoi(key + strlen("\"kv_bytes_per_token_per_layer_bf16\": ")) : -1;
        check(got == rows[i].expect, "pythia-160m %s: kv_bytes_per_token_per_layer_bf16 %d (table: %d)", rows[i].flags, got, rows[i].expect);
    }
}

// ----------------------------------------------------------------------------
// 4. shard and token-table round trip (files from dev/make_test_data.py)

static void check_roundtrip(const char *dir) {
    printf("-- shard and token table round trip: %s\n", dir);
    char shard[512], ids_path[512], text_path[512], table[512];
    snprintf(shard, sizeof shard, "%s/roundtrip.bin", dir);
    snprintf(ids_path, sizeof ids_path, "%s/roundtrip_ids.txt", dir);
    snprintf(text_path, sizeof text_path, "%s/roundtrip.txt", dir);
    snprintf(table, sizeof table, "%s/tokenizer.bin", dir);
    if (!file_exists(shard) || !file_exists(ids_path) || !file_exists(text_path) || !file_exists(table)) {
        check(0, "round-trip files exist in %s (made by `make testdata`)", dir);
        return;
    }
    size_t ntok;
    uint16_t *tok = shard_load(shard, &ntok, 65536);
    FILE *f = fopen_check(ids_path, "r");
    int *ids = NULL; // stb_ds array
    int v;
    while (fscanf(f, "%d", &v) == 1) arrput(ids, v);
    fclose(f);
    int same = (size_t)arrlen(ids) == ntok;
    for (size_t i = 0; same && i < ntok; i++) same = tok[i] == ids[i];
    check(same && ntok > 100, "shard written by Python reads back in C: %zu tokens, same ids as the tokenizer gave", ntok);

    // decode every token through the table; the bytes must equal the original text
    Tokenizer tk;
    tokenizer_load(&tk, table);
    f = fopen_check(text_path, "rb");
    long long tsize = file_size(f);
    char *text = malloc_check(tsize + 1, "text");
    fread_check(text, 1, tsize, f, text_path);
    fclose(f);
    char *dec = NULL; // stb_ds array of bytes
    for (size_t i = 0; i < ntok; i++) {
        if (tok[i] == tk.eot) continue; // document separators are not part of the text
        for (int j = 0; j < tk.tokens[tok[i]].len; j++) arrput(dec, tk.tokens[tok[i]].bytes[j]);
    }
    int ok = arrlen(dec) == tsize && memcmp(dec, text, tsize) == 0;
    check(ok, "token table decodes the shard back to the original %lld bytes of text", tsize);
    check(arrlen(tk.tokens) >= 50277 && tk.eot == 0, "token table covers the GPT-NeoX vocabulary (%d ids, eot %d)", (int)arrlen(tk.tokens), tk.eot);
    arrfree(dec);
    free(text);
    arrfree(ids);
    free(tok);
    tokenizer_free(&tk);
}

// ----------------------------------------------------------------------------
// masked shards (version 2) and the recall evaluator (doc/formats.md)

static void check_masked_loss_and_recall(void) {
    printf("-- masked shards and the recall evaluator\n");
    Config c = config_from_preset(find_preset("tiny"));
    Model m;
    model_init_random(&m, &c, 0.02f, 7);
    // 3 examples of 8 tokens and one more; the mask scores a few answers per example
    enum { E = 3, L = 8, N = E * L + 1 };
    uint16_t tok[N];
    uint8_t mask[N] = {0};
    uint64_t rng = 5;
    for (int i = 0; i < N; i++) tok[i] = (uint16_t)(random_u32(&rng) % 96);
    const int scored[] = {3, 5, 7, 8 + 2, 8 + 7, 16 + 4};
    for (int k = 0; k < 6; k++) mask[scored[k]] = 1;
    char path[512];
    snprintf(path, sizeof path, "%s/masked.bin", tmpdir);
    write_masked_shard(path, tok, mask, N, L, N);
    DataLoader d;
    dataloader_init(&d, path, E, L, 96);
    dataloader_next(&d);
    float masked = model_forward(&m, d.inputs, d.targets, E, L);
    // the same batch with every target scored: the masked loss is the mean of these at the answers
    int x[E * L], y[E * L];
    for (int i = 0; i < E * L; i++) { x[i] = tok[i]; y[i] = tok[i + 1]; }
    model_forward(&m, x, y, E, L);
    const float *losses = model_losses(&m);
    double want = 0.0;
    for (int k = 0; k < 6; k++) want += losses[scored[k] - 1]; // target i+1 is scored at position i
    want /= 6;
    check(fabs(masked - want) < 1e-6 && m.n_valid == E * L, "masked shard: the loss is the mean over the 6 answers of the unmasked losses (%.7f vs %.7f)", masked, want);
    dataloader_free(&d);

    // recall: answers made right or wrong on purpose against the model's own argmax, one at a
    // time (an answer changes the logits after it, never before)
    enum { NE = 5 };
    const int len[NE] = {12, 12, 12, 10, 10}, pairs[NE] = {1, 2, 1, 2, 2}, at[4] = {5, 7, 9, 11}; // after the pairs
    const int dists[4] = {1, 2, 5, 9}; // buckets 1-1, 2-3, 4-7, 8-15
    uint16_t rt[56], rd[56] = {0};
    int off = 0, right = 0, total = 0, by_pairs[3][2] = {{0}}, by_bucket[4][2] = {{0}};
    for (int e = 0; e < NE; e++) {
        for (int j = 0; j < len[e]; j++) rt[off + j] = (uint16_t)(random_u32(&rng) % 96);
        for (int k = 0; k < 4 && at[k] < len[e]; k++) {
            int xe[12];
            for (int j = 0; j < len[e]; j++) xe[j] = rt[off + j];
            model_forward(&m, xe, NULL, 1, len[e]);
            const float *z = model_logits_host(&m, at[k] - 1, 1);
            int best = 0;
            for (int v = 1; v < 96; v++) if (z[v] > z[best]) best = v;
            const int ok = (e + k) % 3 != 0;
            rt[off + at[k]] = (uint16_t)(ok ? best : (best + 1) % 96);
            rd[off + at[k]] = (uint16_t)dists[k];
            right += ok; total++;
            by_pairs[pairs[e]][0] += ok; by_pairs[pairs[e]][1]++;
            by_bucket[k][0] += ok; by_bucket[k][1]++;
        }
        off += len[e];
    }
    snprintf(path, sizeof path, "%s/recall.bin", tmpdir);
    write_recall(path, RECALL_MAGIC, NE, len, pairs, rt, rd, off, 0);
    RecallResult r = eval_recall(&m, path, 2, 0); // batches: 2 + 1 of length 12, 2 of length 10
    int buckets_ok = 1;
    for (int k = 0; k < 4; k++) buckets_ok &= r.dist_answers[k] == by_bucket[k][1] && r.dist_correct[k] == by_bucket[k][0];
    check(r.answers == total && r.correct == right && r.n_examples == NE && total == 18,
          "recall: %lld of %lld answers right, as made (%d of %d), over %d examples", r.correct, r.answers, right, total, r.n_examples);
    check(r.n_groups == 2 && r.group_pairs[0] == 1 && r.group_pairs[1] == 2 && r.group_correct[0] == by_pairs[1][0] &&
          r.group_answers[1] == by_pairs[2][1] && r.group_correct[1] == by_pairs[2][0] && buckets_ok,
          "recall: by pairs (1: %lld/%lld, 2: %lld/%lld) and by distance bucket as made", r.group_correct[0], r.group_answers[0], r.group_correct[1], r.group_answers[1]);
    RecallResult r1 = eval_recall(&m, path, 1, 0);
    check(r1.correct == r.correct, "recall: the same at batch 1 as at batch 2");
    RecallResult rdec = eval_recall(&m, path, 2, 1);
    check(rdec.correct == r.correct && rdec.answers == r.answers, "recall by decoding (pairs prefilled, full cache): %lld of %lld right, as in parallel",
          rdec.correct, rdec.answers);
    model_free(&m);
}

// bad masked shards and recall files (written into tmpdir): what, arguments, expected message
typedef struct { char what[96], args[1024]; const char *expect; } BadCase;
static int bad_recall_cases(BadCase *out) {
    const char *base = "--model tiny -b 2 -t 8 --steps 1 --sample-every 0 --val '' --tokenizer ''";
    uint16_t tok[17];
    uint8_t mask[17] = {0};
    for (int i = 0; i < 17; i++) tok[i] = (uint16_t)(i * 5 % 90);
    mask[5] = 1;
    char p[6][512];
    for (int i = 0; i < 6; i++) snprintf(p[i], sizeof p[i], "%s/bad_recall_%d.bin", tmpdir, i);
    write_masked_shard(p[0], tok, mask, 17, 8, 17);
    write_masked_shard(p[1], tok, mask, 17, 8, 18); // header says one more token than the file has
    mask[6] = 2;
    write_masked_shard(p[2], tok, mask, 17, 8, 17);
    const int len[2] = {8, 8}, pairs[2] = {1, 1};
    uint16_t dist[16] = {0};
    dist[3] = 2;
    write_recall(p[3], 4321, 2, len, pairs, tok, dist, 16, 0);
    write_recall(p[4], RECALL_MAGIC, 2, len, pairs, tok, dist, 16, 4);
    tok[9] = 200; // tiny's vocabulary is 0..95
    write_recall(p[5], RECALL_MAGIC, 2, len, pairs, tok, dist, 16, 0);
    int n = 0;
#define CASE(w, e, ...) do { snprintf(out[n].what, sizeof out[n].what, "%s", w); snprintf(out[n].args, sizeof out[n].args, __VA_ARGS__); out[n++].expect = e; } while (0)
    CASE("masked shard read with -t other than its example length", "-t must be 8 (it is 16)", "%s -t 16 --train %s", base, p[0]);
    CASE("masked shard, truncated", "truncated", "%s --train %s", base, p[1]);
    CASE("masked shard, a mask byte of 2", "is not 0 or 1", "%s --train %s", base, p[2]);
    CASE("recall file with a wrong magic", "not a recall eval file", "--model tiny --steps 0 --val '' -t 16 --eval-recall %s", p[3]);
    CASE("recall file, truncated", "truncated or corrupt", "--model tiny --steps 0 --val '' -t 16 --eval-recall %s", p[4]);
    CASE("recall file, a token past the vocabulary", "outside the model's vocabulary", "--model tiny --steps 0 --val '' -t 16 --eval-recall %s", p[5]);
#undef CASE
    return n;
}

// ----------------------------------------------------------------------------
// 5. bad input gives exit code 1 and a message, never a crash

static void write_shard_file(const char *path, int magic, int header_ntok, const uint16_t *tok, int ntok) {
    FILE *f = fopen_check(path, "wb");
    int h[HEADER_INTS] = {0};
    h[0] = magic; h[1] = SHARD_VERSION; h[2] = header_ntok;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    fwrite_check(tok, sizeof(uint16_t), ntok, f, path);
    fclose(f);
}

// runs a shell command with its output discarded; returns true if it exited 0
static int runs_ok(const char *cmd) {
    char full[2048];
    snprintf(full, sizeof full, "%s >/dev/null 2>&1", cmd);
    int status = system(full);
    return status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// runs a shell command; passes if it exited with status 1 and its stderr contains `expect`
static void check_fails(const char *what, const char *cmd, const char *expect) {
    char full[2048], errpath[512];
    snprintf(errpath, sizeof errpath, "%s/stderr.txt", tmpdir);
    snprintf(full, sizeof full, "%s >/dev/null 2>%s", cmd, errpath);
    int status = system(full);
    char msg[1024] = {0};
    FILE *f = fopen(errpath, "r");
    if (f) { size_t n = fread(msg, 1, sizeof msg - 1, f); msg[n] = 0; fclose(f); }
    char *nl = strchr(msg, '\n');
    if (nl) *nl = 0;
    int exited1 = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 1;
    check(exited1 && strstr(msg, expect) != NULL, "%s -> exit %d, \"%s\"", what,
          WIFEXITED(status) ? WEXITSTATUS(status) : -1, msg);
}

// bad flags (label, arguments, expected message, whether the CUDA program's message is the same:
// the memory check names the GPU's memory instead)
static const struct { const char *what, *args, *expect; int same_message; } BAD_FLAGS[] = {
    {"gqa head count that does not divide", "--model pythia-160m --attn gqa --n-kv-head 5 --kv-report", "does not divide", 1},
    {"mla odd rope dim", "--model pythia-160m --attn mla --rope-dim 7 --kv-report", "must be even", 1},
    {"mla rope dim larger than the head", "--model pythia-160m --attn mla --rope-dim 128 --kv-report", "at most the head dim", 1},
    {"mla rope groups of an odd size", "--model pythia-160m --attn mla --rope-dim 64 --rope-split 64 --kv-report", "groups that are even", 1},
    {"--rope-split with --attn gqa", "--model pythia-160m --attn gqa --rope-split 2 --kv-report", "they are mla flags", 1},
    {"--latent-norm 2", "--model pythia-160m --attn mla --latent-norm 2 --kv-report", "--latent-norm", 1},
    {"--n-kv-head with --attn mha", "--model pythia-160m --attn mha --n-kv-head 4 --kv-report", "conflicts with --attn mha", 1},
    {"context interval < 1", "--model tiny --layer0 ctxkv --context-interval 0 --kv-report", "--context-interval must be in 1..", 1},
    {"max contexts < 1", "--model tiny --layer0 ctxkv --max-contexts 0 --kv-report", "--max-contexts must be in 1..", 1},
    {"a context ring longer than an int", "--model tiny --layer0 ctxkv --context-interval 1048576 --max-contexts 1048576 --kv-report", "must be below 2^30", 1}, // was signed overflow (UB)
    {"context flag without a context model", "--model tiny --context-interval 4 --kv-report", "need --layer0 ctxkv or --model-type ctxpythia", 1},
    {"-b x -t too large for memory", "--model pythia-14m -b 60000 -t 2048 --steps 1", "more than this machine's", 0},
    {"--stop-at without --out", "--model tiny --steps 5 --stop-at 3", "need --out DIR", 1},
    {"negative -b", "-b -3", "-b must be in 1..", 1},
    {"overflowing -t", "-t 99999999999999999999", "-t expects an integer", 1},
    {"--lr nan", "--lr nan", "--lr expects a number", 1},
    {"non-numeric -b", "-b abc", "-b expects an integer", 1},
    {"-t past the model's max length", "--model tiny -t 200 --bench 1", "max_seq_len", 1},
    {"unknown flag", "--bogus 1", "unknown flag --bogus", 1},
    {"--kv-budget 0", "--model tiny --kv-policy snapkv --kv-budget 0 --kv-report", "--kv-budget must be in 1..", 1},
    {"negative --kv-budget", "--model tiny --kv-policy streaming --kv-budget -8 --kv-report", "--kv-budget must be in 1..", 1},
    {"streaming budget not above the sinks", "--model tiny --kv-policy streaming --kv-budget 4 --kv-report", "must exceed --kv-sinks 4", 1},
    {"snapkv budget below the window", "--model tiny --kv-policy snapkv --kv-budget 16 --kv-report", "smaller than --kv-window 32", 1},
    {"a policy without a budget", "--model tiny --kv-policy snapkv --kv-report", "needs --kv-budget", 1},
    {"a budget without a policy", "--model tiny --kv-budget 64 --kv-report", "needs --kv-policy streaming or snapkv", 1},
    {"unknown KV policy", "--model tiny --kv-policy h2o --kv-budget 8 --kv-report", "must be one of full, streaming, snapkv", 1},
    {"even SnapKV pooling kernel", "--model tiny --kv-policy snapkv --kv-budget 64 --kv-pool 4 --kv-report", "--kv-pool must be odd", 1},
};

static void check_bad_inputs(const char *bin) {
    printf("-- bad input (%s)\n", bin);
    if (!file_exists(bin)) { check(0, "%s exists (build it with make)", bin); return; }
    char good[512], truncated[512], magic[512], big[512], ckpt[512], ckpt_short[512], cmd[2048];
    snprintf(good, sizeof good, "%s/good.bin", tmpdir);
    snprintf(truncated, sizeof truncated, "%s/truncated.bin", tmpdir);
    snprintf(magic, sizeof magic, "%s/magic.bin", tmpdir);
    snprintf(big, sizeof big, "%s/bigtoken.bin", tmpdir);
    snprintf(ckpt, sizeof ckpt, "%s/model.bin", tmpdir);
    snprintf(ckpt_short, sizeof ckpt_short, "%s/model_short.bin", tmpdir);
    uint16_t tok[600];
    for (int i = 0; i < 600; i++) tok[i] = (uint16_t)(i % 90);
    write_shard_file(good, SHARD_MAGIC, 600, tok, 600);
    write_shard_file(truncated, SHARD_MAGIC, 600, tok, 300);
    write_shard_file(magic, 12345, 600, tok, 600);
    tok[77] = 96; // tiny's vocabulary is 0..95
    write_shard_file(big, SHARD_MAGIC, 600, tok, 600);
    const char *base = "--model tiny -b 2 -t 16 --steps 1 --sample-every 0 --val '' --tokenizer ''";

    snprintf(cmd, sizeof cmd, "%s %s --train %s", bin, base, good);
    check(runs_ok(cmd), "a good shard trains one step (exit 0)");
    snprintf(cmd, sizeof cmd, "%s %s --train %s", bin, base, truncated);
    check_fails("truncated shard", cmd, "truncated");
    snprintf(cmd, sizeof cmd, "%s %s --train %s", bin, base, magic);
    check_fails("wrong magic number", cmd, "not a token shard");
    snprintf(cmd, sizeof cmd, "%s %s --train %s", bin, base, big);
    check_fails("token id >= vocab", cmd, "outside the model's vocabulary");
    snprintf(cmd, sizeof cmd, "%s %s --train %s/nonexistent_*.bin", bin, base, tmpdir);
    check_fails("missing shard file", cmd, "no files match");
    snprintf(cmd, sizeof cmd, "%s --model %s/nonexistent.bin", bin, tmpdir);
    check_fails("missing checkpoint", cmd, "neither a preset");

    // a checkpoint of the wrong size: save tiny, then drop its last 4 bytes
    Model m;
    Config c = config_from_preset(find_preset("tiny"));
    model_init_random(&m, &c, 0.02f, 1);
    model_save(&m, ckpt);
    FILE *f = fopen_check(ckpt, "rb");
    long long n = file_size(f);
    char *bytes = malloc_check(n, "ckpt");
    fread_check(bytes, 1, n, f, ckpt);
    fclose(f);
    f = fopen_check(ckpt_short, "wb");
    fwrite_check(bytes, 1, n - 4, f, ckpt_short);
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s --model %s -b 2 -t 16 --bench 1", bin, ckpt);
    check(runs_ok(cmd), "a saved checkpoint loads (exit 0)");
    snprintf(cmd, sizeof cmd, "%s --model %s -b 2 -t 16 --bench 1", bin, ckpt_short);
    check_fails("checkpoint of the wrong size", cmd, "wrong size");
    ((int *)bytes)[0] = 777; // wrong magic
    f = fopen_check(ckpt_short, "wb");
    fwrite_check(bytes, 1, n, f, ckpt_short);
    fclose(f);
    check_fails("checkpoint with a wrong magic number", cmd, "not a ctxkv checkpoint");
    ((int *)bytes)[0] = CKPT_MAGIC;
    ((int *)bytes)[5] = 3; // n_head 3 does not divide n_embd 32
    f = fopen_check(ckpt_short, "wb");
    fwrite_check(bytes, 1, n, f, ckpt_short);
    fclose(f);
    check_fails("checkpoint whose head count does not divide the width", cmd, "does not divide");
    free(bytes);
    model_free(&m);

    snprintf(cmd, sizeof cmd, "%s --model %s --attn gqa --kv-report", bin, ckpt);
    check_fails("mha checkpoint loaded with --attn gqa", cmd, "is a mha checkpoint, but --attn gqa");
    { // a context block of width 16 loaded into a model whose contexts are 8 wide
        char blk[512];
        snprintf(blk, sizeof blk, "%s/block16.bin", tmpdir);
        Config cc = tiny_context("ctxkv", config_from_preset(find_preset("tiny")));
        Model mb;
        model_init_random(&mb, &cc, 0.02f, 1);
        context_block_save(&mb, blk);
        model_free(&mb);
        snprintf(cmd, sizeof cmd, "%s --model tiny --layer0 ctxkv --context-dim 8 --context-block %s -b 2 -t 16 --bench 1", bin, blk);
        check_fails("context block whose width does not match", cmd, "is a context block for embed width 32, context width 16");
        snprintf(cmd, sizeof cmd, "%s --model tiny --layer0 ctxkv --context-dim 16 --context-block %s -b 2 -t 16 --bench 1", bin, blk);
        check(runs_ok(cmd), "a context block of the right width loads (exit 0)");
    }
    snprintf(cmd, sizeof cmd, "%s --model tiny --train %s --val '' -b 2 -t 16 --steps 1 --out /proc/nope/out", bin, good);
    check_fails("unwritable --out", cmd, "--out: cannot create directory");
    snprintf(cmd, sizeof cmd, "%s --model tiny --resume %s", bin, tmpdir);
    check_fails("--resume with --model", cmd, "--resume conflicts with --model");
    for (size_t i = 0; i < sizeof BAD_FLAGS / sizeof BAD_FLAGS[0]; i++) {
        snprintf(cmd, sizeof cmd, "%s %s", bin, BAD_FLAGS[i].args);
        check_fails(BAD_FLAGS[i].what, cmd, BAD_FLAGS[i].expect);
    }
    BadCase rc[8];
    for (int i = 0, n_rc = bad_recall_cases(rc); i < n_rc; i++) {
        snprintf(cmd, sizeof cmd, "%s %s", bin, rc[i].args);
        check_fails(rc[i].what, cmd, rc[i].expect);
    }
    snprintf(cmd, sizeof cmd, "%s -h", bin);
    check(runs_ok(cmd), "-h prints usage and exits 0");
    snprintf(cmd, sizeof cmd, "%s -h | grep -q -- '--lr FLOAT  *peak learning rate \\[1e-3\\]'", bin);
    check(runs_ok(cmd), "-h shows each flag's default from the flag table (--lr ... [1e-3])");
    // --steps 0 evaluates a checkpoint: nothing was trained, so no sample is printed
    snprintf(cmd, sizeof cmd, "%s --model tiny --steps 0 --val '' --tokenizer '' --sample-every 1 | grep -c 'sample at step' | grep -qx 0", bin);
    check(runs_ok(cmd), "--steps 0 prints no sample");
}

// ----------------------------------------------------------------------------
// 8. ctxkv/simd.h against the plain loops it replaces

static void check_simd_kernels(void) {
    printf("-- simd kernels (ctxkv/simd.h) against plain loops\n");
    uint64_t rng = 99;
    // the 16-lane kernels read a cache line per load only from aligned blocks: every allocation is
    int aligned = 1;
    const size_t sizes[] = {1, 100, 4096 + 4, (size_t)3 << 20};
    for (int i = 0; i < 4; i++) {
        void *p = malloc_check(sizes[i], "alignment check"), *q = calloc_check(sizes[i], "alignment check");
        aligned &= (uintptr_t)p % ALLOC_ALIGN == 0 && (uintptr_t)q % ALLOC_ALIGN == 0 && ((unsigned char *)q)[sizes[i] - 1] == 0;
        free(p); free(q);
    }
    check(aligned && ALLOC_ALIGN % 64 == 0, "malloc_check and calloc_check (zeroed) return blocks aligned to %d bytes, 1 B to 3 MB", ALLOC_ALIGN);
    // exp_shift_sum: every entry exp(x − shift), and their sum, for lengths around the 8-lane width
    float worst = 0.0f;
    int sum_ok = 1;
    for (int n = 1; n <= 37; n++) {
        float x[37], ref[37];
        double ref_sum = 0.0;
        for (int i = 0; i < n; i++) x[i] = 20.0f * (random_f32(&rng) - 0.5f);
        const float shift = max_of(x, n);
        for (int i = 0; i < n; i++) { ref[i] = expf(x[i] - shift); ref_sum += ref[i]; }
        float sum = exp_shift_sum(x, n, shift);
        for (int i = 0; i < n; i++) worst = fmaxf(worst, fabsf(x[i] - ref[i]) / fmaxf(ref[i], 1e-30f));
        sum_ok &= fabs(sum - ref_sum) <= 1e-5 * ref_sum;
    }
    check(worst <= 1e-6f && sum_ok, "exp_shift_sum equals expf to %.2e relative for lengths 1..37, and so does its sum", worst);
    float nan_in[3] = {0.0f, NAN, -1.0f};
    exp_shift_sum(nan_in, 3, 0.0f);
    check(isnan(nan_in[1]) && nan_in[0] == 1.0f, "exp_shift_sum keeps a NaN a NaN (the numerical guard relies on it)");
    // dot and axpy against loops, lengths around the lane width
    float dworst = 0.0f;
    for (int n = 1; n <= 33; n++) {
        float a[33], b[33], y[33], y_ref[33];
        double d = 0.0, mag = 0.0;
        for (int i = 0; i < n; i++) { a[i] = random_normal(&rng); b[i] = random_normal(&rng); y[i] = y_ref[i] = random_normal(&rng); }
        for (int i = 0; i < n; i++) { d += (double)a[i] * b[i]; mag += fabs((double)a[i] * b[i]); }
        dworst = fmaxf(dworst, (float)(fabs(dot(a, b, n) - d) / mag));
        axpy(y, 0.5f, a, n);
        for (int i = 0; i < n; i++) dworst = fmaxf(dworst, fabsf(y[i] - (y_ref[i] + 0.5f * a[i])) / fmaxf(1.0f, fabsf(y_ref[i])));
    }
    check(dworst <= 1e-6f, "dot and axpy equal plain loops (worst %.2e relative)", dworst);
    // gemm: out (N,M) += A (N,K) · B (K,M), A or B as transposed views, and out = bias + A·B; shapes with
    // ragged edges in every dimension and more than one k- and column block
    // (M 150 and 301 pass MC, N 2100 passes NC, K 513 passes KC; the last two run on every thread;
    // one shape is exactly a micro-kernel tile, whose size is the ISA's: 6 x 16 in AVX2, 12 x 32 in AVX-512)
    const int shapes[][3] = {{1, 1, 1}, {5, 7, 9}, {GEMM_MR, 16, GEMM_NR}, {13, 300, 40}, {7, 17, 270}, {30, 513, 33}, {150, 40, 2100}, {301, 260, 37}};
    _Static_assert(GEMM_MC < 150 && GEMM_KC < 513 && GEMM_NC < 2100, "the gemm shapes above must pass every block size");
    float gworst = 0.0f;
    for (int si = 0; si < 8; si++) {
        const int N = shapes[si][0], K = shapes[si][1], M = shapes[si][2];
        float *A = malloc_check((size_t)N * K * sizeof(float), "gemm"), *At = malloc_check((size_t)N * K * sizeof(float), "gemm");
        float *Bm = malloc_check((size_t)K * M * sizeof(float), "gemm"), *out = malloc_check((size_t)N * M * sizeof(float), "gemm");
        float *out_t = malloc_check((size_t)N * M * sizeof(float), "gemm");
        for (int i = 0; i < N * K; i++) A[i] = random_normal(&rng);
        for (int i = 0; i < K * M; i++) Bm[i] = random_normal(&rng);
        for (int i = 0; i < N * M; i++) out[i] = out_t[i] = random_normal(&rng);
        for (int n = 0; n < N; n++) // At (K,N) = Aᵀ
            for (int k = 0; k < K; k++) At[(size_t)k * N + n] = A[(size_t)n * K + k];
        float *Bt = malloc_check((size_t)K * M * sizeof(float), "gemm"), *out_b = malloc_check((size_t)N * M * sizeof(float), "gemm");
        for (int k = 0; k < K; k++) // Bt (M,K) = Bᵀ
            for (int mm = 0; mm < M; mm++) Bt[(size_t)mm * K + k] = Bm[(size_t)k * M + mm];
        memcpy(out_b, out, (size_t)N * M * sizeof(float));
        float *out0 = malloc_check((size_t)N * M * sizeof(float), "gemm"); // C before
        memcpy(out0, out, (size_t)N * M * sizeof(float));
        double *ref = malloc_check((size_t)N * M * sizeof(double), "gemm"), *mag = malloc_check((size_t)N * M * sizeof(double), "gemm");
        for (int n = 0; n < N; n++)
            for (int mm = 0; mm < M; mm++) {
                double s = out[(size_t)n * M + mm], g = fabs(s);
                for (int k = 0; k < K; k++) { double t = (double)A[(size_t)n * K + k] * Bm[(size_t)k * M + mm]; s += t; g += fabs(t); }
                ref[(size_t)n * M + mm] = s;
                mag[(size_t)n * M + mm] = g;
            }
        gemm(out, A, K, 1, Bm, M, 1, N, K, M, 0, NULL);
        gemm(out_t, At, 1, N, Bm, M, 1, N, K, M, 0, NULL);  // A as a transposed view
        gemm(out_b, A, K, 1, Bt, 1, K, N, K, M, 0, NULL);   // B as a transposed view
        // overwrite with a bias: C = bias + A·B, whatever C held (NaN here)
        float *bias = malloc_check((size_t)M * sizeof(float), "gemm"), *out_o = malloc_check((size_t)N * M * sizeof(float), "gemm");
        for (int mm = 0; mm < M; mm++) bias[mm] = random_normal(&rng);
        for (int i = 0; i < N * M; i++) out_o[i] = NAN;
        gemm(out_o, A, K, 1, Bt, 1, K, N, K, M, 1, bias);
        for (int n = 0; n < N; n++)
            for (int mm = 0; mm < M; mm++) { // ref holds C0 + A·B: replace C0 by the bias
                const size_t i = (size_t)n * M + mm;
                const double want = ref[i] - out0[i] + bias[mm];
                gworst = fmaxf(gworst, (float)(fabs(out_o[i] - want) / (mag[i] - fabs(out0[i]) + fabs(bias[mm]))));
                if (isnan(out_o[i])) gworst = INFINITY;
            }
        free(bias); free(out_o);
        for (int i = 0; i < N * M; i++) {
            gworst = fmaxf(gworst, (float)(fabs(out[i] - ref[i]) / mag[i]));
            gworst = fmaxf(gworst, (float)(fabs(out_t[i] - ref[i]) / mag[i]));
            gworst = fmaxf(gworst, (float)(fabs(out_b[i] - ref[i]) / mag[i]));
        }
        free(A); free(At); free(Bm); free(Bt); free(out); free(out_t); free(out_b); free(out0); free(ref); free(mag);
    }
    check(gworst <= 1e-6f, "gemm (C += A·B with A or B as transposed views; C = bias + A·B) equals the plain loop on 8 ragged shapes (worst %.2e of sum |terms|)", gworst);
    // matmul_forward's few-row path (decoding: dot_rows, 8 then 4 then 1 rows per weight row) for
    // every row count it takes, widths a multiple of 8 and not
    float dr_worst = 0.0f;
    for (int N = 1; N <= 16; N++)
        for (int wi = 0; wi < 2; wi++) {
            const int C = wi ? 37 : 64, OC = 29;
            float *x = malloc_check((size_t)N * C * sizeof(float), "dot_rows"), *w = malloc_check((size_t)OC * C * sizeof(float), "dot_rows");
            float *b = malloc_check(OC * sizeof(float), "dot_rows"), *y = malloc_check((size_t)N * OC * sizeof(float), "dot_rows");
            for (int i = 0; i < N * C; i++) x[i] = random_normal(&rng);
            for (int i = 0; i < OC * C; i++) w[i] = random_normal(&rng);
            for (int i = 0; i < OC; i++) b[i] = random_normal(&rng);
            matmul_forward(y, x, w, b, N, C, OC);
            for (int n = 0; n < N; n++)
                for (int o = 0; o < OC; o++) {
                    double r = b[o], g = fabs(b[o]);
                    for (int c = 0; c < C; c++) { r += (double)x[n * C + c] * w[o * C + c]; g += fabs((double)x[n * C + c] * w[o * C + c]); }
                    dr_worst = fmaxf(dr_worst, (float)(fabs(y[n * OC + o] - r) / g));
                }
            free(x); free(w); free(b); free(y);
        }
    check(dr_worst <= 1e-6f, "matmul_forward with 1..16 rows (the decoding path: dot_3x8 under AVX-512 and dot_3x4 on 8 and 4 rows by 3 weight rows where they can, dot_rows for the rest) equals the plain loop, widths 64 and 37, 29 weight rows (worst %.2e of sum |terms|)", dr_worst);
    // the cached attention's two kernels over rows a slot apart (xs > C): dot_rows (one query
    // against 1..70 keys) and rows_axpy (y += Σ a_n x_n), at widths 32, 37 and 64
    float ca_worst = 0.0f;
    for (int N = 1; N <= 70; N += (N < 20 ? 1 : 7))
        for (int wi = 0; wi < 3; wi++) {
            const int C = wi == 0 ? 32 : wi == 1 ? 45 : 64; // 45: 32 in registers, then 8, then a tail of 5
            const size_t xs = (size_t)C * 2 + 5;
            float *x = malloc_check(N * xs * sizeof(float), "rows"), *q = malloc_check(C * sizeof(float), "rows");
            float *a = malloc_check(N * sizeof(float), "rows"), *sc = malloc_check(N * sizeof(float), "rows");
            float *y = malloc_check(C * sizeof(float), "rows"), *y0 = malloc_check(C * sizeof(float), "rows");
            for (size_t i = 0; i < N * xs; i++) x[i] = random_normal(&rng);
            for (int i = 0; i < C; i++) { q[i] = random_normal(&rng); y[i] = y0[i] = random_normal(&rng); }
            for (int n = 0; n < N; n++) a[n] = random_normal(&rng);
            dot_rows(sc, 1, x, xs, C, q, N, 0.0f);
            rows_axpy(y, a, x, xs, C, N);
            for (int n = 0; n < N; n++) {
                double r = 0.0, g = 0.0;
                for (int c = 0; c < C; c++) { r += (double)x[n * xs + c] * q[c]; g += fabs((double)x[n * xs + c] * q[c]); }
                ca_worst = fmaxf(ca_worst, (float)(fabs(sc[n] - r) / g));
            }
            for (int c = 0; c < C; c++) {
                double r = y0[c], g = fabs(y0[c]);
                for (int n = 0; n < N; n++) { r += (double)a[n] * x[n * xs + c]; g += fabs((double)a[n] * x[n * xs + c]); }
                ca_worst = fmaxf(ca_worst, (float)(fabs(y[c] - r) / g));
            }
            free(x); free(q); free(a); free(sc); free(y); free(y0);
        }
    check(ca_worst <= 1e-6f, "dot_rows and rows_axpy over strided rows (the cached attention's kernels) equal the plain loops, 1..70 rows, widths 32, 45, 64 (worst %.2e of sum |terms|)", ca_worst);
    // erf8 (GELU) against erf in double, in ulp of the float result, on a grid through both fits
    // and past the clamp, and its special values
    double erf_worst = 0.0;
    for (int k = -60000; k <= 60000; k++) {
        const float x = k * 1e-4f, in[8] = {x, -x, x * 0.5f, x * 1e-3f, x, x, x, x};
        float out[8];
        store8(out, erf8(load8(in)));
        for (int j = 0; j < 4; j++) {
            const double ref = erf((double)in[j]);
            const float rf = fabsf((float)ref);
            const double ulp = rf > 0.0f ? nextafterf(rf, INFINITY) - rf : 1e-45;
            erf_worst = fmax(erf_worst, fabs(out[j] - ref) / ulp);
        }
    }
    const float erf_special_in[8] = {NAN, INFINITY, -INFINITY, 0.0f, 1.0f, -1.0f, 4.0f, 9.0f};
    float erf_special[8];
    store8(erf_special, erf8(load8(erf_special_in)));
    check(erf_worst <= 2.0 && isnan(erf_special[0]) && erf_special[1] == 1.0f && erf_special[2] == -1.0f && erf_special[3] == 0.0f &&
              fabsf(erf_special[4] - erff(1.0f)) <= 1.2e-7f && erf_special[5] == -erf_special[4] && erf_special[7] == 1.0f,
          "erf8 is within 2 ulp of erf in double on [-6, 6] (worst %.2f ulp); NaN stays NaN, erf(±inf) = ±1, erf(0) = 0, odd", erf_worst);
    // max_of (passes NaN entries over) and sum_of, lengths around the 16-float stride
    int max_ok = 1;
    double sum_worst = 0.0;
    for (int n = 1; n <= 53; n++) {
        float x[53];
        for (int i = 0; i < n; i++) x[i] = random_normal(&rng);
        if (n > 3) x[n / 2] = NAN;
        float ref = -INFINITY;
        double sref = 0.0, smag = 0.0;
        for (int i = 0; i < n; i++) ref = x[i] > ref ? x[i] : ref;
        max_ok &= max_of(x, n) == ref;
        for (int i = 0; i < n; i++) x[i] = isnan(x[i]) ? 0.5f : x[i];
        for (int i = 0; i < n; i++) { sref += x[i]; smag += fabs(x[i]); }
        sum_worst = fmax(sum_worst, fabs(sum_of(x, n) - sref) / smag);
        const float mu = (float)(sref / n);
        double qref = 0.0;
        for (int i = 0; i < n; i++) qref += ((double)x[i] - mu) * ((double)x[i] - mu);
        sum_worst = fmax(sum_worst, fabs(sum_sq_dev(x, n, mu) - qref) / fmax(qref, 1e-30));
    }
    check(max_ok && sum_worst <= 1e-6, "max_of equals the plain loop (NaN entries passed over); sum_of and sum_sq_dev (LayerNorm) the double sums (worst %.2e relative), lengths 1..53", sum_worst);
    // sample_draw against the plain cumulative sum: the token k it returns has the coin between the
    // sums before and through k (to rounding: 1e-6 of the total)
    {
        const int V = 1000;
        float *probs = malloc_check(V * sizeof(float), "sampling");
        double total = 0.0;
        for (int i = 0; i < V; i++) { probs[i] = i % 7 == 3 ? 0.0f : random_f32(&rng); total += probs[i]; }
        int draw_ok = 1, spread = 0, last = -1;
        for (int r = 0; r < 2000; r++) {
            const float coin = random_f32(&rng);
            const int k = sample_draw(probs, V, total, coin);
            double before = 0.0;
            for (int i = 0; i < k; i++) before += probs[i];
            const double c = coin * total;
            draw_ok &= k >= 0 && k < V && before <= c + 1e-6 * total && before + probs[k] >= c - 1e-6 * total && probs[k] > 0.0f;
            spread += k != last;
            last = k;
        }
        check(draw_ok && spread > 1000, "sample_draw returns the token whose cumulative probability first passes the coin (2000 coins over 1000 tokens, zeros never drawn)");
        free(probs);
    }

}

// ----------------------------------------------------------------------------
// 9. the CUDA program gives the CPU program's errors: the same exit status and the same first
// line on stderr, for every fuzz regression and seed input and for bad flags. The CUDA binary is
// the emulated one (make test builds build/emu/train_ctxkv_cu_fp32 where nvcc's headers exist).

// runs cmd; *status = its exit status (-1: did not exit), msg = the first line of its stderr
static void run_capture(const char *cmd, int *status, char *msg, size_t n) {
    char full[4096], errpath[512];
    snprintf(errpath, sizeof errpath, "%s/stderr_same.txt", tmpdir);
    snprintf(full, sizeof full, "%s >/dev/null 2>%s", cmd, errpath);
    int st = system(full);
    *status = st != -1 && WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    msg[0] = 0;
    FILE *f = fopen(errpath, "r");
    if (f) { if (!fgets(msg, (int)n, f)) msg[0] = 0; fclose(f); }
    msg[strcspn(msg, "\n")] = 0;
}

// ARGS through both binaries: the same status (0, or 1 for a clean error) and, with
// same_message, the same message
static void check_same_outcome(const char *cpu, const char *cu, const char *what, const char *args, int same_message) {
    char cmd[4096], m1[1024], m2[1024];
    int s1, s2;
    snprintf(cmd, sizeof cmd, "%s %s", cpu, args);
    run_capture(cmd, &s1, m1, sizeof m1);
    snprintf(cmd, sizeof cmd, "%s %s", cu, args);
    run_capture(cmd, &s2, m2, sizeof m2);
    const int same = !strcmp(m1, m2);
    check(s1 == s2 && (s1 == 0 || s1 == 1) && (same || !same_message), "same outcome, %s: CPU exit %d \"%s\" | CUDA exit %d %s%s%s", what,
          s1, m1, s2, same ? "(the same message)" : "\"", same ? "" : m2, same ? "" : "\"");
}

// the command line that hands a fuzz input of target T to the program (as dev/fuzz/fuzz_T.c
// hands it to the loader); small.bin and small_ctxkv.bin are the models fuzz_lambada,
// fuzz_recall and fuzz_ctxblock load them into (dev/fuzz/make_seeds.c)
static int fuzz_input_args(char *buf, size_t n, const char *target, const char *file) {
    const char *small = "dev/fuzz/corpus/checkpoint/mha.bin", *small_ctx = "dev/fuzz/corpus/checkpoint/ctxkv.bin";
    const char *quiet = "--val '' --tokenizer '' --sample-every 0";
    if (!strcmp(target, "checkpoint")) snprintf(buf, n, "--model %s --steps 0 -t 4 --eval-gen --gen-prompt 2 --gen-new 2 %s", file, quiet);
    else if (!strcmp(target, "lambada")) snprintf(buf, n, "--model %s --steps 0 -t 8 --eval-lambada %s %s", small, file, quiet);
    else if (!strcmp(target, "recall")) snprintf(buf, n, "--model %s --steps 0 -t 8 -b 2 --eval-recall %s %s", small, file, quiet);
    else if (!strcmp(target, "ctxblock")) snprintf(buf, n, "--model %s --steps 0 -t 8 --context-block %s %s", small_ctx, file, quiet);
    else if (!strcmp(target, "shard")) snprintf(buf, n, "--model pythia-14m --steps 1 -b 2 -t 4 --train %s %s", file, quiet); // vocab 50304
    else if (!strcmp(target, "toktab")) snprintf(buf, n, "--model %s --steps 0 -t 4 --val '' --tokenizer %s", small, file);
    else if (!strcmp(target, "trainstate")) { // --resume takes a directory
        char dir[512], cmd[1200];
        snprintf(dir, sizeof dir, "%s/resume_%s", tmpdir, strrchr(file, '/') + 1);
        snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp '%s' '%s/train_state.bin'", dir, file, dir);
        if (system(cmd) != 0) return 0;
        snprintf(buf, n, "--resume %s --steps 1 -b 1 -t 4 --train %s/small_vocab.bin %s", dir, tmpdir, quiet);
    } else return 0; // refstate: the harness's own format, not a program input
    return 1;
}

static void check_same_errors(const char *cpu, const char *cu) {
    printf("-- the CUDA program's errors are the CPU program's (%s)\n", cu);
    if (!cu || !cu[0]) { printf("SKIP: TRAIN_BIN_CU is not set (make test sets it where the CUDA emulator builds)\n"); return; }
    if (!file_exists(cu)) { check(0, "%s exists", cu); return; }
    char shard[512];
    snprintf(shard, sizeof shard, "%s/small_vocab.bin", tmpdir); // training data for the resumed states (vocab 5)
    uint16_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = (uint16_t)(i * 3 % 5);
    write_shard_file(shard, SHARD_MAGIC, 64, ids, 64);
    glob_t g;
    const char *dirs[] = {"dev/fuzz/regressions/*/*", "dev/fuzz/corpus/*/*"};
    for (int d = 0; d < 2; d++) {
        if (glob(dirs[d], 0, NULL, &g) != 0) continue;
        for (size_t i = 0; i < g.gl_pathc; i++) {
            char target[64], args[2048];
            const char *p = g.gl_pathv[i], *end = strrchr(p, '/'), *start = end;
            while (start > p && start[-1] != '/') start--;
            snprintf(target, sizeof target, "%.*s", (int)(end - start), start);
            if (fuzz_input_args(args, sizeof args, target, p)) check_same_outcome(cpu, cu, p, args, 1);
        }
        globfree(&g);
    }
    // issue 11's case: a LAMBADA example whose target id (5000) is past the tiny model's vocabulary (96)
    char lam[512], args[1024];
    snprintf(lam, sizeof lam, "%s/lambada_5000.bin", tmpdir);
    FILE *f = fopen_check(lam, "wb");
    int h[HEADER_INTS] = {0}, lens[2] = {3, 1};
    uint16_t tok[4] = {5, 6, 7, 5000};
    h[0] = LAMBADA_MAGIC; h[1] = LAMBADA_VERSION; h[2] = 1; h[3] = 4;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, lam);
    fwrite_check(lens, sizeof(int), 2, f, lam);
    fwrite_check(tok, sizeof(uint16_t), 4, f, lam);
    fclose(f);
    snprintf(args, sizeof args, "--model tiny --val '' --steps 0 --eval-lambada %s -t 16", lam);
    check_same_outcome(cpu, cu, "a LAMBADA target id past the vocabulary", args, 1);
    for (size_t i = 0; i < sizeof BAD_FLAGS / sizeof BAD_FLAGS[0]; i++)
        check_same_outcome(cpu, cu, BAD_FLAGS[i].what, BAD_FLAGS[i].args, BAD_FLAGS[i].same_message);
    BadCase rc[8];
    for (int i = 0, n_rc = bad_recall_cases(rc); i < n_rc; i++) check_same_outcome(cpu, cu, rc[i].what, rc[i].args, 1);
    // the CUDA program alone: cuBLASLt finding no algorithm (the emulator refuses products with
    // m = 96, tiny's fused QKV width) is a clear error naming the shape, not a crash
    char cmd[1024], msg[512];
    int status;
    snprintf(cmd, sizeof cmd, "CUDA_EMU_LT_REFUSE=96 %s --model tiny -b 1 -t 8 --bench 1", cu);
    run_capture(cmd, &status, msg, sizeof msg);
    check(status == 1 && strstr(msg, "cuBLASLt has no algorithm for m 96"), "cuBLASLt without an algorithm -> exit %d, \"%s\"", status, msg);
}

// ----------------------------------------------------------------------------
// exact resume and the numerical guard

static char *read_all(const char *path, long long *n) {
    FILE *f = fopen(path, "rb");
    if (!f) { *n = -1; return NULL; }
    *n = file_size(f);
    char *buf = malloc_check(*n + 1, "read");
    if (fread(buf, 1, *n, f) != (size_t)*n) *n = -1;
    buf[*n > 0 ? *n : 0] = 0;
    fclose(f);
    return buf;
}

// the "loss" fields of a log's train lines, in order (printed with %.9g: exact floats)
static void train_losses(const char *log, char *out, size_t n) {
    out[0] = 0;
    for (const char *p = log; (p = strstr(p, "\"type\": \"train\"")) != NULL; p++) {
        const char *l = strstr(p, "\"loss\": ");
        const char *e = l ? strchr(l, ',') : NULL;
        if (!e) break;
        strncat(out, l, e - l < (long)(n - strlen(out) - 2) ? (size_t)(e - l) : 0);
        strncat(out, ";", n - strlen(out) - 1);
    }
}

// Runs `common` for 20 steps straight into DIR/runA_tag, and 10 + --stop-at + --resume + 10 into
// DIR/runB_tag; checks both give the same losses and final weights, bit for bit. The state at
// step 10 is kept in DIR/runC_tag (for the guard below).
static void check_exact_resume(const char *bin, const char *common, const char *tag) {
    char cmd[4096], a_dir[512], b_dir[512], p1[600], p2[600];
    snprintf(a_dir, sizeof a_dir, "%s/runA_%s", tmpdir, tag);
    snprintf(b_dir, sizeof b_dir, "%s/runB_%s", tmpdir, tag);
    snprintf(cmd, sizeof cmd, "%s --model tiny %s --out %s", bin, common, a_dir);
    int ok = runs_ok(cmd);
    snprintf(cmd, sizeof cmd, "%s --model tiny %s --out %s --stop-at 10", bin, common, b_dir);
    ok &= runs_ok(cmd);
    snprintf(cmd, sizeof cmd, "mkdir -p %s/runC_%s && cp %s/train_state.bin %s/runC_%s/", tmpdir, tag, b_dir, tmpdir, tag);
    ok &= system(cmd) == 0;
    // a kill -9 during a save leaves a partial train_state.bin.tmp: the next start removes it
    snprintf(cmd, sizeof cmd, "head -c 1000 %s/train_state.bin > %s/train_state.bin.tmp", b_dir, b_dir);
    ok &= system(cmd) == 0;
    snprintf(cmd, sizeof cmd, "%s %s --out %s --resume %s | grep 'removed %s/train_state.bin.tmp, left by an interrupted save' >/dev/null",
             bin, common, b_dir, b_dir, b_dir);
    ok &= runs_ok(cmd);
    snprintf(p1, sizeof p1, "%s/train_state.bin.tmp", b_dir);
    check(ok && !file_exists(p1), "%s: 20 steps straight; 10 steps, stop, resume, 10 steps (all exit 0; the resumed run "
          "removed the partial train_state.bin.tmp a killed save leaves, and said so)", tag);
    long long na, nb;
    snprintf(p1, sizeof p1, "%s/log.jsonl", a_dir);
    snprintf(p2, sizeof p2, "%s/log.jsonl", b_dir);
    char *la = read_all(p1, &na), *lb = read_all(p2, &nb);
    static char sa[8192], sb[8192];
    train_losses(la ? la : "", sa, sizeof sa);
    train_losses(lb ? lb : "", sb, sizeof sb);
    int n_losses = 0;
    for (char *p = sa; *p; p++) n_losses += *p == ';';
    check(n_losses == 20 && !strcmp(sa, sb), "%s: the %d step losses are bit-identical", tag, n_losses);
    free(la); free(lb);
    snprintf(p1, sizeof p1, "%s/model.bin", a_dir);
    snprintf(p2, sizeof p2, "%s/model.bin", b_dir);
    check(files_equal(p1, p2) && file_exists(p1), "%s: the final parameters are bit-identical (model.bin byte for byte)", tag);
}

// --shuffle: one epoch reads every block of every shard once; epochs and seeds differ;
// without it the loader reads the shards in file order (the order before --shuffle existed)
static void check_data_order(void) {
    printf("-- data order (--shuffle)\n");
    enum { B = 2, T = 4, BT = B * T, NS = 3 };
    const int ntok[NS] = {5 * BT + 1, 3 * BT + 4, 7 * BT + 1}, total = 15; // whole blocks: 5, 3, 7
    char pattern[600], path[600];
    for (int s = 0, id = 0; s < NS; s++) { // every token of a block is its id, so a batch names its block
        uint16_t tok[64];
        for (int i = 0; i < ntok[s]; i++) tok[i] = (uint16_t)(id + i / BT);
        id += ntok[s] / BT;
        snprintf(path, sizeof path, "%s/order_%d.bin", tmpdir, s);
        write_shard_file(path, SHARD_MAGIC, ntok[s], tok, ntok[s]);
    }
    snprintf(pattern, sizeof pattern, "%s/order_*.bin", tmpdir);
    int seq[3 * 15], shuf[3][3 * 15];
    DataLoader d;
    dataloader_init(&d, pattern, B, T, 64);
    for (int i = 0; i < 3 * total; i++) { dataloader_next(&d); seq[i] = d.inputs[0]; }
    dataloader_free(&d);
    int in_order = 1;
    for (int i = 0; i < 3 * total; i++) in_order &= seq[i] == i % total;
    check(in_order, "without --shuffle: blocks 0..14 in file order, three epochs");
    const uint64_t seeds[3] = {1337, 1337, 7};
    for (int r = 0; r < 3; r++) {
        dataloader_init(&d, pattern, B, T, 64);
        dataloader_shuffle(&d, seeds[r]);
        for (int i = 0; i < 3 * total; i++) {
            dataloader_next(&d);
            int whole = 1; // a batch is one block: all B*T inputs carry its id
            for (int j = 0; j < BT; j++) whole &= d.inputs[j] == d.inputs[0];
            shuf[r][i] = whole ? d.inputs[0] : -1;
        }
        dataloader_free(&d);
    }
    int each_once = 1, epochs_differ = 0, seeds_differ = 0;
    for (int e = 0; e < 3; e++) {
        int seen[15] = {0};
        for (int i = 0; i < total; i++) {
            int b = shuf[0][e * total + i];
            if (b < 0 || b >= total || seen[b]++) each_once = 0;
        }
    }
    for (int i = 0; i < total; i++) epochs_differ |= shuf[0][i] != shuf[0][total + i];
    for (int i = 0; i < 3 * total; i++) seeds_differ |= shuf[0][i] != shuf[2][i];
    check(each_once, "--shuffle: each epoch reads each of the 15 blocks exactly once, whole");
    check(!memcmp(shuf[0], shuf[1], sizeof shuf[0]) && epochs_differ && seeds_differ && memcmp(shuf[0], seq, sizeof seq),
          "--shuffle: the same seed gives the same order; epochs, seeds and file order differ");
}

static void check_resume(const char *bin) {
    printf("-- exact resume and the numerical guard\n");
    char shard[512], cmd[4096];
    snprintf(shard, sizeof shard, "%s/resume_data.bin", tmpdir);
    uint16_t tok[4000];
    uint64_t rng = 99;
    for (int i = 0; i < 4000; i++) tok[i] = random_u32(&rng) % 96;
    write_shard_file(shard, SHARD_MAGIC, 4000, tok, 4000);
    char common[2048];
    snprintf(common, sizeof common, "--train %s --val %s --val-every 5 --val-batches 2 -b 2 -t 16 --steps 20 --warmup 3 "
             "--sample-every 7 --sample-len 4 --tokenizer ''", shard, shard);
    check_exact_resume(bin, common, "in-order");
    // --shuffle over two shards of 4 and 3 blocks: the 20 steps wrap an epoch, and step 10
    // stops inside the second epoch, whose order must be rebuilt on resume
    char shards[600], shard1[600];
    snprintf(shard1, sizeof shard1, "%s/resume_two_0.bin", tmpdir);
    write_shard_file(shard1, SHARD_MAGIC, 4 * 32 + 1, tok, 4 * 32 + 1);
    snprintf(shard1, sizeof shard1, "%s/resume_two_1.bin", tmpdir);
    write_shard_file(shard1, SHARD_MAGIC, 3 * 32 + 1, tok + 1000, 3 * 32 + 1);
    snprintf(shards, sizeof shards, "%s/resume_two_*.bin", tmpdir);
    char common_shuf[2048];
    snprintf(common_shuf, sizeof common_shuf, "--train '%s' --val %s --val-every 5 --val-batches 2 -b 2 -t 16 --steps 20 "
             "--warmup 3 --sample-every 0 --tokenizer '' --shuffle", shards, shard);
    check_exact_resume(bin, common_shuf, "shuffled");
    snprintf(cmd, sizeof cmd, "%s %s --out %s/resumed_without --resume %s/runC_shuffled", bin, common, tmpdir, tmpdir);
    check_fails("--resume of a --shuffle run without --shuffle", cmd, "the run was made with --shuffle");
    char c_dir[512]; // the in-order state at step 10, for the guard
    snprintf(c_dir, sizeof c_dir, "%s/runC_in-order", tmpdir);

    // guard: a state with a NaN weight resumes into a non-finite loss; training stops naming
    // the step, and the state on disk is left as it was
    char state[600];
    snprintf(state, sizeof state, "%s/train_state.bin", c_dir);
    long long n;
    char *bytes = read_all(state, &n);
    if (bytes && n > 4096 + 2048 + 4) {
        float nan = NAN;
        memcpy(bytes + 2048 + 4 * (128 * 32), &nan, 4); // layer0.ln1_w[0], right after embed_in (128 x 32)
        FILE *f = fopen_check(state, "wb");
        fwrite_check(bytes, 1, n, f, state);
        fclose(f);
    }
    free(bytes);
    char *before = read_all(state, &n);
    snprintf(cmd, sizeof cmd, "%s %s --out %s --resume %s", bin, common, c_dir, c_dir);
    check_fails("non-finite loss after resuming from a poisoned state", cmd, "step 11: loss nan");
    long long n2;
    char *after = read_all(state, &n2);
    check(before && after && n == n2 && !memcmp(before, after, n), "the last training state (step 10) is left in place, unchanged");
    free(before); free(after);
}

int main(int argc, char **argv) {
    if (argc == 3) { // check one model/state pair only
        check_reference(argv[1], argv[2]);
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    if (argc == 2 && strcmp(argv[1], "--simd") == 0) {
        printf("-- this build: %d-lane vectors, GEMM micro-kernel %d x %d\n", VW_LANES, GEMM_MR, GEMM_NR);
        check_reference("dev/ref/tiny_model.bin", "dev/ref/tiny_state.bin");
        check_simd_kernels();
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    if (argc != 1) { fprintf(stderr, "usage: ./test_ctxkv [MODEL.bin STATE.bin | --simd]\n"); return 2; }
    const char *bin = getenv("TRAIN_BIN") ? getenv("TRAIN_BIN") : "./train_ctxkv";
    const char *testdata = getenv("TESTDATA") ? getenv("TESTDATA") : "build/testdata";
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_ctxkv_XXXXXX");
    if (!mkdtemp(tmpdir)) die("cannot create a temporary directory");

    check_reference("dev/ref/tiny_model.bin", "dev/ref/tiny_state.bin");
    // the attention variants' references (dev/reference.py, PyTorch autograd in float64)
    const char *variants[] = {"gqa", "mqa", "mla", "mlaq", "ctxkv", "ctxpythia"};
    for (int i = 0; i < 6; i++) {
        char mp[256], sp[256];
        snprintf(mp, sizeof mp, "dev/ref/%s_model.bin", variants[i]);
        snprintf(sp, sizeof sp, "dev/ref/%s_state.bin", variants[i]);
        check_reference(mp, sp);
    }
    struct { const char *label; Config c; } cfgs[] = {
        {"mha", config_from_preset(find_preset("tiny"))},
        {"gqa G=2", tiny_variant("gqa", 2, 0, 0, -1)},
        {"mqa", tiny_variant("mqa", 0, 0, 0, -1)},
        {"mla", tiny_variant("mla", 0, 16, 4, -1)},
        {"mla q-rank 12", tiny_variant("mla", 0, 16, 4, 12)},
        {"mla, rope in 4 groups, linear latent", tiny_mla_grouped(16)},
        {"ctxkv + gqa", tiny_context("ctxkv", tiny_variant("gqa", 2, 0, 0, -1))},
        {"ctxkv + mla", tiny_context("ctxkv", tiny_variant("mla", 0, 16, 4, -1))},
        {"ctxpythia", tiny_context("ctxpythia", config_from_preset(find_preset("tiny")))},
    };
    const int n_cfgs = (int)(sizeof cfgs / sizeof cfgs[0]);
    for (int i = 0; i < n_cfgs; i++) check_finite_differences(cfgs[i].label, cfgs[i].c);
    check_phase1_finite_differences();
    check_ctxblock_reference("dev/ref/ctxblock_state.bin");
    check_jacobi_equals_recurrence();
    printf("-- cached decoding\n");
    for (int i = 0; i < n_cfgs; i++) check_cached_decoding(cfgs[i].label, cfgs[i].c);
    printf("-- KV policies\n");
    for (int i = 0; i < n_cfgs; i++) check_kv_policies(cfgs[i].label, cfgs[i].c);
    check_kv_eviction_reference("dev/ref/kv_eviction.bin");
    check_decode_heldout();
    check_init_from();
    check_init_from_mla();
    check_kv_report(bin);
    check_kv_report_policies(bin);

    printf("-- import path\n");
    char imported[512];
    snprintf(imported, sizeof imported, "%s/imported.bin", testdata);
    check(files_equal(imported, "dev/ref/tiny_model.bin"),
          "prepro/import_hf.py output (%s) is byte-identical to dev/ref/tiny_model.bin", imported);

    check_roundtrip(testdata);
    check_bad_inputs(bin);
    check_masked_loss_and_recall();
    check_data_order();
    check_resume(bin);
    check_simd_kernels();
    check_same_errors(bin, getenv("TRAIN_BIN_CU"));

    // the CUDA compile check `make test` ran first (make cuda-check): counted when nvcc exists
    FILE *cf = fopen("build/cuda-check/result.txt", "r");
    char cline[512] = "";
    if (cf) { if (!fgets(cline, sizeof cline, cf)) cline[0] = 0; fclose(cf); }
    cline[strcspn(cline, "\n")] = 0;
    if (!strncmp(cline, "PASS ", 5)) check(1, "%s", cline + 5);
    else if (!strncmp(cline, "SKIP ", 5)) printf("SKIP %s\n", cline + 5);
    else printf("(no CUDA compile result: run `make test`, which runs `make cuda-check` first)\n");

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
