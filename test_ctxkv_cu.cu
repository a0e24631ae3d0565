/*
test_ctxkv_cu.cu: the CUDA harness. It includes train_ctxkv.cu under TESTING (as test_ctxkv.c
includes train_ctxkv.c) and links the CPU program itself through test_ctxkv_cpu.c (the cpu_*
functions), so "CPU" below is train_ctxkv.c, built from the same source as ./train_ctxkv.

  ./test_ctxkv_cu                       every check below
  ./test_ctxkv_cu MODEL.bin STATE.bin   only the reference check of that pair

Checks:
  1. Reference states on the GPU: dev/ref/NAME_model.bin + NAME_state.bin (Hugging Face / PyTorch
     in float64, dev/reference.py): logits, loss, every parameter gradient, the losses of the
     optimizer steps. The same files and checks as test_ctxkv's check_reference.
  2. CUDA vs CPU on the same weights and batch, for every variant (mha, gqa, mqa, mla, mla with
     q-rank, mla with grouped rope and a linear latent, ctxkv + gqa, ctxkv + mla, ctxpythia):
     logits, loss, every gradient, and 10 AdamW steps (the loss before each, and the weights
     after the last). Then the real shapes: pythia-14m with every variant and pythia-160m with
     mha and mla at B 2, T 1024, 3 steps (on a GPU; under the emulator only with REAL_SHAPES=1,
     REAL_SHAPES_T=8 for a run of minutes).
  3. Phase 1 (the ContextBlock, OACD, Jacobi iteration, Adam) CUDA vs CPU: the OACD loss, the
     block's gradients and weights after 1 and 3 iterations.
  4. KV-cached decoding (batch 2) on the GPU: equals the GPU's full forward, equals the CPU's
     cached decoding on the same tokens, and the cache holds the analytic number of bytes.
     Under StreamingLLM and SnapKV (ctxkv/kvpolicy.h) every variant's logits, cache bytes and
     kept positions equal the CPU's, and dev/ref/kv_eviction.bin's (PyTorch) are met.
  5. --kv-report and --generate: ./train_ctxkv_cu prints the same figures as ./train_ctxkv; a
     masked (recall) shard trains to the same answer-only loss and --eval-recall counts alike.
Ends with "N passed, N failed"; exits non-zero on any failure.

Tolerances. With PRECISION=FP32 everything is fp32 and the checks use test_ctxkv's tolerances
(logits 1e-4 abs, loss 1e-5, gradients 1e-4 relative to max(1, max|ref|), step losses 1e-4):
the GPU differs from the CPU only in summation order.
The default bf16 build stores parameters and activations in bf16: 8 significant bits, each
rounding off by up to 2^-9 ≈ 2e-3 relative. A value reaching the logits has been rounded some
ten times (weights, LN output, q/k/v, attention probabilities, head outputs, MLP activations,
residual, final LN, the logits), so logits land within a few % of their scale, and a context
recurrence (ctxpythia decoding 80 steps) compounds further: 6e-2 · max(1, max|logit|). The mean
loss averages B·T such errors: 3e-2. A gradient goes through the forward's roundings and as
many in the backward (bf16 activation gradients, dS, bf16 weights): 1e-1 of the tensor's
largest entry, floored at 1e-2 because a gradient that is zero by symmetry (ctxkv's k_b:
softmax ignores a shift shared by all slots) comes out as bf16 noise of order
sqrt(B·T)·2^-9·(term size) ≈ 1e-4..1e-3. Step losses: 5e-2. These bounds were argued from
bf16's precision and then checked against the CPU emulation of the bf16 build (make cuda-emu:
exact bf16 rounding, fp32 accumulation), whose worst cases were 3.5% (logits, ctxpythia
decoding), 7e-3 (loss), 7.5% (a gradient), 9e-3 (a step loss). They have not been checked
against a run on a GPU (README, GPU section).
*/
#define TESTING
#define CTXKV_STB_EXTERNAL // the CPU object (test_ctxkv_cpu.o) carries stb_ds's implementation
#include "train_ctxkv.cu"
#include <sys/wait.h>
#include <vector>
#include "test_configs.h"

extern "C" {
size_t cpu_run_training(const char *model_path, const int *inputs, const int *targets, int B, int T, float lr,
                        float beta1, float beta2, float eps, float weight_decay, float grad_clip, int steps,
                        float *logits, float *loss, float *grads, float *losses, float *params_after);
size_t cpu_run_phase1(const char *model_path, const int *tokens, int B, int T, int iters, float noise,
                      unsigned long long seed, float *loss, float *converged, float *grads, float *params_after);
void cpu_run_decode(const char *model_path, const int *prompts, int B, int n_prompt, int n_decode, int *seq,
                    float *logits_out, size_t *cache_bytes);
void cpu_run_decode_under(const char *model_path, const int policy[5], const int *x, int B, int T, int P,
                          float *logits_out, size_t *cache_bytes, int *kept_out);
}

#ifdef ENABLE_FP32
static const float TOL_LOGITS = 1e-4f, TOL_LOSS = 1e-5f, TOL_GRAD = 1e-4f, TOL_STEP = 1e-4f;
static const int FP32_TOLERANCES = 1; // absolute logits; gradients relative to max(1, max|ref|)
#else
static const float TOL_LOGITS = 6e-2f, TOL_LOSS = 3e-2f, TOL_GRAD = 1e-1f, TOL_STEP = 5e-2f;
static const int FP32_TOLERANCES = 0; // logits relative to max(1, max|logit|); gradients to max(1e-2, max|ref|)
#endif

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

// max |a − b| over n entries; NaN-safe (a NaN becomes the max)
static float max_abs_diff(const float *a, const float *b, size_t n) {
    float md = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= md)) md = d;
    }
    return md;
}
static float max_abs(const float *a, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i]));
    return m;
}
static float logits_tol(float max_ref) { return FP32_TOLERANCES ? TOL_LOGITS : TOL_LOGITS * fmaxf(1.0f, max_ref); }
static float grad_scale(float max_ref) { return FP32_TOLERANCES ? fmaxf(1.0f, max_ref) : fmaxf(1e-2f, max_ref); }

// the GPU's gradients (floatX, GPU layout) as fp32 in checkpoint order
static void grads_to_host(const Model *m, float *dst) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i];
        download_floats(dst + t->offset, m->grads_memory + t->dev_offset, t->rows * t->cols);
    }
}

// Compares every gradient tensor of m (GPU) with ref (checkpoint order); prints one line per
// tensor; returns the number of tensors out of tolerance.
static int compare_grads(const Model *m, const float *ref, const char *label) {
    float *g = (float *)malloc_check(m->num_params * sizeof(float), "grads");
    grads_to_host(m, g);
    int bad = 0;
    float worst_rel = 0.0f;
    const char *worst_name = "";
    for (ptrdiff_t ti = 0; ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        const size_t n = t->rows * t->cols;
        float maxref = max_abs(ref + t->offset, n), md = max_abs_diff(g + t->offset, ref + t->offset, n);
        float rel = md / grad_scale(maxref);
        printf("   grad %-18s max|ref| %.3e  max diff %.3e  rel %.3e%s\n", t->name, maxref, md, rel, rel <= TOL_GRAD ? "" : "  <-- FAIL");
        if (!(rel <= TOL_GRAD)) bad++;
        if (!(rel <= worst_rel)) { worst_rel = rel; worst_name = t->name; }
    }
    check(bad == 0, "%s: gradients of all %d tensors within %g (worst %s, %.3e)", label, (int)arrlen(m->tensors), TOL_GRAD,
          worst_name, worst_rel);
    free(g);
    return bad;
}

// ----------------------------------------------------------------------------
// 1. reference states (format: doc/formats.md), as test_ctxkv.c

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
    r->inputs = (int *)malloc_check(BT * sizeof(int), "ref");
    r->targets = (int *)malloc_check(BT * sizeof(int), "ref");
    r->logits = (float *)malloc_check(BT * r->V * sizeof(float), "ref");
    r->grads = (float *)malloc_check((size_t)r->P * sizeof(float), "ref");
    r->losses = (float *)malloc_check((r->S + 1) * sizeof(float), "ref");
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

static void check_reference(const char *model_path, const char *state_path) {
    printf("-- reference parity on the GPU (%s): %s + %s\n", PRECISION_NAME, model_path, state_path);
    RefState r;
    if (!file_exists(model_path) || !refstate_load(&r, state_path)) {
        check(0, "reference files readable (%s, %s)", model_path, state_path);
        return;
    }
    Model m;
    model_load(&m, model_path);
    if ((size_t)r.P != m.num_params || r.V != m.cfg.vocab_size) {
        check(0, "reference state matches the checkpoint (P %d vs %zu, V %d vs %d)", r.P, m.num_params, r.V, m.cfg.vocab_size);
        model_free(&m); refstate_free(&r);
        return;
    }
    const int BT = r.B * r.T, V = r.V, Vp = m.cfg.padded_vocab_size;
    float loss = model_forward(&m, r.inputs, r.targets, r.B, r.T);
    const float *logits = model_logits_host(&m, 0, BT);
    float maxdiff = 0.0f, maxref = max_abs(r.logits, (size_t)BT * V);
    for (int i = 0; i < BT; i++)
        for (int j = 0; j < V; j++) {
            float d = fabsf(logits[(size_t)i * Vp + j] - r.logits[(size_t)i * V + j]);
            if (!(d <= maxdiff)) maxdiff = d;
        }
    check(maxdiff <= logits_tol(maxref), "logits max abs diff %.3e (tol %.1e)", maxdiff, logits_tol(maxref));
    check(fabsf(loss - r.loss) <= TOL_LOSS, "loss %.7f vs ref %.7f, diff %.3e (tol %.0e)", loss, r.loss, fabsf(loss - r.loss), TOL_LOSS);

    model_zero_grad(&m);
    model_backward(&m);
    compare_grads(&m, r.grads, "reference");

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
    if (r.S > 0) check(worst_step <= TOL_STEP, "%d AdamW step losses within %.0e (worst %.3e)", r.S, TOL_STEP, worst_step);
    model_free(&m);
    refstate_free(&r);
}

// ----------------------------------------------------------------------------
// 2. CUDA vs CPU on the same weights and batch

// A random model of config c with every tensor perturbed (so no term hides behind a 1 or a 0,
// as test_ctxkv's finite differences), saved to tmpdir/NAME.bin for the CPU to load.
// With perturb 0 (the real shapes): GPT-NeoX's init alone (std 0.02), as a model starts training.
static void make_test_model(Model *m, Config c, const char *name, char *path, size_t path_n, int perturb = 1) {
    model_init_random(m, &c, perturb ? 0.3f : 0.02f, 42);
    uint64_t rng = 7;
    for (ptrdiff_t ti = 0; perturb && ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        float *w = m->params_memory + t->offset;
        size_t n = t->rows * t->cols;
        if (!strcmp(t->name, "embed_in") || !strcmp(t->name, "embed_out")) n = (size_t)c.vocab_size * t->cols; // keep padding rows 0
        for (size_t i = 0; i < n; i++) w[i] += 0.2f * random_normal(&rng);
    }
    model_to_device(m);
    snprintf(path, path_n, "%s/%s.bin", tmpdir, name);
    for (char *p = path + strlen(tmpdir) + 1; *p; p++)
        if (*p == ' ' || *p == '+' || *p == '=') *p = '_';
    model_save(m, path);
}

// B x T tokens, S AdamW steps; real 0: the tiny preset, perturbed weights; 1: a real shape at init
static void check_against_cpu(const char *label, Config c, int B = 2, int T = 16, int S = 10, int real = 0) {
    printf("-- CUDA vs CPU, same weights and batch: %s, %s (B %d, T %d)\n", real ? "real shape" : "tiny", label, B, T);
    Model m;
    char path[512];
    make_test_model(&m, c, label, path, sizeof path, !real);
    const int BT = B * T, V = c.vocab_size, Vp = c.padded_vocab_size;
    std::vector<int> xv(BT), yv(BT);
    int *x = xv.data(), *y = yv.data();
    uint64_t rng = 13;
    for (int i = 0; i < BT; i++) { x[i] = random_u32(&rng) % V; y[i] = random_u32(&rng) % V; }
    y[5] = IGNORE_INDEX;
    const float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, clip = 1.0f;
    const size_t P = m.num_params;
    float *cpu_logits = (float *)malloc_check((size_t)BT * Vp * sizeof(float), "cpu"), cpu_loss, cpu_losses[16];
    float *cpu_grads = (float *)malloc_check(P * sizeof(float), "cpu");
    if (S > 16) die("check_against_cpu: at most 16 steps");
    float *cpu_params = (float *)malloc_check(P * sizeof(float), "cpu");
    size_t Pc = cpu_run_training(path, x, y, B, T, lr, beta1, beta2, eps, wd, clip, S, cpu_logits, &cpu_loss, cpu_grads,
                                 cpu_losses, cpu_params);
    if (Pc != P) {
        check(0, "%s: the CPU program reads the GPU's checkpoint (%zu vs %zu parameters)", label, Pc, P);
        model_free(&m);
        return;
    }
    float loss = model_forward(&m, x, y, B, T);
    const float *logits = model_logits_host(&m, 0, BT);
    float md = 0.0f, maxref = 0.0f;
    for (int i = 0; i < BT; i++) {
        md = fmaxf(md, max_abs_diff(logits + (size_t)i * Vp, cpu_logits + (size_t)i * Vp, V));
        maxref = fmaxf(maxref, max_abs(cpu_logits + (size_t)i * Vp, V));
        if (md != md) break;
    }
    check(md <= logits_tol(maxref), "%s: logits max abs diff %.3e (max|logit| %.2f, tol %.1e)", label, md, maxref, logits_tol(maxref));
    check(fabsf(loss - cpu_loss) <= TOL_LOSS, "%s: loss %.7f vs CPU %.7f, diff %.3e (tol %.0e)", label, loss, cpu_loss,
          fabsf(loss - cpu_loss), TOL_LOSS);
    model_zero_grad(&m);
    model_backward(&m);
    compare_grads(&m, cpu_grads, label);
    AdamW opt = {lr, beta1, beta2, eps, wd};
    float worst = 0.0f;
    for (int s = 0; s < S; s++) {
        float l = model_forward(&m, x, y, B, T);
        float d = fabsf(l - cpu_losses[s]);
        printf("   step %2d loss %.7f CPU %.7f diff %.2e\n", s, l, cpu_losses[s], d);
        if (!(d <= worst)) worst = d;
        model_zero_grad(&m);
        model_backward(&m);
        model_clip_grad_norm(&m, clip);
        model_update(&m, &opt);
    }
    check(worst <= TOL_STEP, "%s: %d AdamW step losses within %.0e of the CPU's (worst %.3e)", label, S, TOL_STEP, worst);
    // Adam normalises each update to about lr (|m̂|/sqrt(v̂) is 1 at the first step and stays
    // near it), so a gradient entry near 0 whose sign the two programs round differently moves
    // by up to ~2·lr a step: the weights are compared at 4·lr a step (a frozen tensor updated or
    // one left out is far outside it).
    model_to_host(&m);
    float wd_diff = max_abs_diff(m.params_memory, cpu_params, P), wtol = 4.0f * lr * S;
    check(wd_diff <= wtol, "%s: weights after %d steps within %.0e of the CPU's (max diff %.3e)", label, S, wtol, wd_diff);
    free(cpu_logits); free(cpu_grads); free(cpu_params);
    model_free(&m);
}

// Real shapes (issue 16): pythia-14m with every variant and pythia-160m with mha and mla, B 2,
// T 1024, at GPT-NeoX's init: logits, loss, every gradient, 3 AdamW steps, with the tolerances
// above (argued for the tiny shapes; these longer sums have not yet met a GPU). The CPU side
// (test_ctxkv_cpu.o, OpenMP) takes seconds a step on a 16-core machine. Under the emulator they
// would take hours: skipped unless REAL_SHAPES=1.
static void check_real_shapes(void) {
    if (strstr(device_prop.name, "cuda_emu") && !getenv("REAL_SHAPES")) {
        printf("SKIP real shapes (pythia-14m every variant, pythia-160m mha and mla, B 2, T 1024): emulated, "
               "REAL_SHAPES=1 runs them\n");
        return;
    }
    const int T = getenv("REAL_SHAPES_T") ? atoi(getenv("REAL_SHAPES_T")) : 1024;
    struct { const char *preset, *label, *attn, *layer0; } rs[] = {
        {"pythia-14m", "pythia-14m mha", NULL, NULL},       {"pythia-14m", "pythia-14m gqa", "gqa", NULL},
        {"pythia-14m", "pythia-14m mqa", "mqa", NULL},      {"pythia-14m", "pythia-14m mla", "mla", NULL},
        {"pythia-14m", "pythia-14m ctxkv", NULL, "ctxkv"},  {"pythia-14m", "pythia-14m ctxkv + gqa", "gqa", "ctxkv"},
        {"pythia-160m", "pythia-160m mha", NULL, NULL},     {"pythia-160m", "pythia-160m mla", "mla", NULL},
    };
    for (size_t i = 0; i < sizeof rs / sizeof rs[0]; i++)
        check_against_cpu(rs[i].label, preset_variant(rs[i].preset, rs[i].attn, rs[i].layer0), 2, T, 3, 1);
}

// ----------------------------------------------------------------------------
// 3. phase 1, CUDA vs CPU

static void check_phase1_against_cpu(void) {
    Config c = tiny_context("ctxkv", config_from_preset(find_preset("tiny")));
    Model m;
    char path[512];
    make_test_model(&m, c, "phase1", path, sizeof path);
    model_free(&m);
    const int B = 2, T = 24, N = B * T;
    int x[N];
    uint64_t rng = 29;
    for (int i = 0; i < N; i++) x[i] = random_u32(&rng) % c.vocab_size;
    const int iters_list[2] = {1, 3};
    for (int k = 0; k < 2; k++) {
        const int iters = iters_list[k];
        printf("-- phase 1 (ContextBlock, OACD, Jacobi), CUDA vs CPU: %d iteration(s)\n", iters);
        Args a = default_args();
        a.p1_iters = iters;
        a.p1_stop = 2.0f; // never: run every iteration
        model_load(&m, path);
        model_set_phase(&m, 1);
        uint64_t r1 = 31;
        Phase1Stats st = phase1_round(&m, &a, x, B, T, &r1, 1);
        const size_t P = m.num_params;
        float *cg = (float *)malloc_check(P * sizeof(float), "phase 1"), *cp = (float *)malloc_check(P * sizeof(float), "phase 1");
        float closs, cconv;
        cpu_run_phase1(path, x, B, T, iters, a.p1_noise, 31, &closs, &cconv, cg, cp);
        const float loss_tol = TOL_LOSS * fmaxf(1.0f, fabsf(closs));
        check(fabsf(st.loss - closs) <= loss_tol, "phase 1, %d iteration(s): OACD loss %.6f vs CPU %.6f (tol %.0e)", iters,
              st.loss, closs, loss_tol);
        printf("   converged fraction %.3f, CPU %.3f\n", st.converged, cconv);
        char label[64];
        snprintf(label, sizeof label, "phase 1, %d iteration(s)", iters);
        compare_grads(&m, cg, label);
        model_to_host(&m);
        float wdiff = max_abs_diff(m.params_memory, cp, P), wtol = 4.0f * a.p1_lr * iters; // as in check_against_cpu
        check(wdiff <= wtol, "%s: weights after the Adam steps within %.0e of the CPU's (max diff %.3e)", label, wtol, wdiff);
        free(cg); free(cp);
        model_free(&m);
    }
}

// ----------------------------------------------------------------------------
// 4. cached decoding

static void check_cached_decoding(const char *label, Config c) {
    const int B = 2, n_prompt = 16, n_decode = 64, n = n_prompt + n_decode;
    Model m;
    model_init_random(&m, &c, 0.3f, 11);
    char path[512];
    snprintf(path, sizeof path, "%s/decode.bin", tmpdir);
    model_save(&m, path);
    const int V = c.vocab_size, Vp = c.padded_vocab_size;
    int prompts[B * n_prompt], seq[B * n];
    uint64_t rng = 5;
    for (int i = 0; i < B * n_prompt; i++) prompts[i] = random_u32(&rng) % V;
    // the CPU decodes greedily; the GPU is fed the CPU's tokens, so the logits compare position by position
    float *cpu = (float *)calloc_check((size_t)B * n * Vp * sizeof(float), "decode test");
    float *gpu = (float *)calloc_check((size_t)B * n * Vp * sizeof(float), "decode test");
    size_t cpu_bytes = 0;
    cpu_run_decode(path, prompts, B, n_prompt, n_decode, seq, cpu, &cpu_bytes);
    KVCache kv = kvcache_new(&c, B, n_prompt, n_decode, &KV_POLICY_FULL);
    size_t stride;
    const float *logits = model_prefill(&m, &kv, prompts, n_prompt, &stride);
    int next[B], greedy_same = 1;
    for (int i = n_prompt; i < n; i++) {
        for (int b = 0; b < B; b++) {
            greedy_same &= sample_token(logits + (size_t)b * stride, V, 0.0f, &rng, NULL) == seq[b * n + i];
            next[b] = seq[b * n + i];
        }
        logits = model_decode_step(&m, &kv, next);
        stride = Vp;
        for (int b = 0; b < B; b++) memcpy(gpu + ((size_t)b * n + i) * Vp, logits + (size_t)b * Vp, Vp * sizeof(float));
    }
    size_t per_token = kv_elements_per_token(&c), expect = (size_t)n * per_token;
    if (c.layer0_type == LAYER0_CTXKV) {
        size_t ring = (size_t)(c.max_contexts - 1) * c.context_interval + 1;
        expect = expect - (size_t)n * c.context_dim + (n < (int)ring ? (size_t)n : ring) * c.context_dim;
    }
    if (has_context_block(&c)) expect += c.context_dim;
    expect *= B;
    check(kv.bytes == expect * sizeof(float) && kv.bytes == cpu_bytes && kv.len == n,
          "%s: cache for %d x %d tokens holds %zu bytes, CPU %zu, analytic %zu", label, B, n, kv.bytes, cpu_bytes, expect * sizeof(float));
    kvcache_free(&kv);
    model_forward(&m, seq, NULL, B, n);
    const float *full = model_logits_host(&m, 0, (size_t)B * n);
    float d_full = 0.0f, d_cpu = 0.0f, maxref = 0.0f;
    for (int b = 0; b < B; b++)
        for (int i = n_prompt; i < n; i++) {
            size_t r = ((size_t)b * n + i) * Vp;
            d_full = fmaxf(d_full, max_abs_diff(gpu + r, full + r, V));
            d_cpu = fmaxf(d_cpu, max_abs_diff(gpu + r, cpu + r, V));
            maxref = fmaxf(maxref, max_abs(cpu + r, V));
        }
    const float tol = logits_tol(maxref);
    check(d_full <= tol, "%s: cached decoding of %d positions after a %d-token prompt (batch %d) equals the GPU's full forward "
          "(max diff %.2e, tol %.1e)", label, n_decode, n_prompt, B, d_full, tol);
    check(d_cpu <= tol, "%s: ... and the CPU's cached decoding (max diff %.2e, tol %.1e; greedy tokens %s)", label, d_cpu, tol,
          greedy_same ? "identical" : "differ at a near-tie");
    free(cpu); free(gpu);
    model_free(&m);
}

// ----------------------------------------------------------------------------
// 4b. decode-time KV eviction (ctxkv/kvpolicy.h) on the GPU

// Positions the GPU kept that equal the reference's, of n. fp32: all must. bf16: the attention
// that SnapKV scores is stored in bf16 (2^-9 relative), so a near-tie may fall the other way;
// at least 90% must agree, and the logits are compared only when every position does.
static int kept_agree(const int *got, const int *ref, size_t n, const char *what) {
    size_t same = 0;
    for (size_t i = 0; i < n; i++) same += got[i] == ref[i];
    check(FP32_TOLERANCES ? same == n : same * 10 >= n * 9, "%s: %zu of %zu kept positions agree%s", what, same, n,
          FP32_TOLERANCES ? "" : " (bf16: at least 90%)");
    return same == n;
}

// dev/ref/kv_eviction.bin (PyTorch float64 masks on the full forward) on the GPU
static void judge_kv_eviction(const EvictCase *e, const KVCache *kv, const float *got, int Vp) {
    char label[160];
    kv_policy_label(&e->policy, label, 64);
    snprintf(label + strlen(label), sizeof label - strlen(label), " %s", e->model);
    int compare = 1;
    if (e->K) compare = kv->kept && kept_agree(kv->kept, e->kept, (size_t)e->L * e->B * e->units * e->K, label);
    float maxref;
    const float d = evict_case_diff(e, got, Vp, &maxref), tol = logits_tol(maxref);
    if (compare) check(d <= tol, "%s: logits of positions %d..%d after a %d-token prompt equal PyTorch's masked forward (max diff %.2e, tol %.1e)", label, e->P - 1, e->T - 2, e->P, d, tol);
    else printf("(%s: logits not compared, the selection differs at a near-tie)\n", label);
}
static void check_kv_eviction_reference(const char *path) {
    printf("-- KV eviction against PyTorch on the GPU (%s)\n", path);
    evict_cases_run(path, judge_kv_eviction);
}

// The GPU against the CPU under each policy, on the same weights and tokens: the logits, the
// cache's bytes and the kept positions (every variant; layers 1.. of ctxkv)
static void check_kv_policies(const char *label, Config c) {
    const int B = 2, P = 16, T = 40;
    Model m;
    model_init_random(&m, &c, 0.3f, 21);
    char path[512];
    snprintf(path, sizeof path, "%s/policy.bin", tmpdir);
    model_save(&m, path);
    const int Vp = c.padded_vocab_size, V = c.vocab_size;
    std::vector<int> x((size_t)B * T);
    uint64_t rng = 77;
    for (auto &t : x) t = random_u32(&rng) % V;
    const KVPolicy policies[] = {{KV_STREAMING, 8, 2, 32, 5}, {KV_SNAPKV, 8, 4, 3, 5}};
    for (const KVPolicy &p : policies) {
        const int pol[5] = {p.kind, p.budget, p.sinks, p.window, p.pool};
        const size_t n = (size_t)B * (T - P) * Vp, n_kept = (size_t)(c.n_layer - (c.layer0_type == LAYER0_CTXKV)) * B * kv_units(&c, c.attn_type) * p.budget;
        std::vector<float> cpu(n), gpu(n);
        std::vector<int> cpu_kept(n_kept + 1);
        size_t cpu_bytes = 0;
        cpu_run_decode_under(path, pol, x.data(), B, T, P, cpu.data(), &cpu_bytes, cpu_kept.data());
        KVCache kv = decode_under(&m, &p, x.data(), B, T, P, gpu.data());
        char what[160];
        kv_policy_label(&p, what, 64);
        snprintf(what + strlen(what), sizeof what - strlen(what), " %s", label);
        int compare = p.kind != KV_SNAPKV || (kv.kept && kept_agree(kv.kept, cpu_kept.data(), n_kept, what));
        float d = 0.0f, maxref = 0.0f;
        for (size_t r = 0; r < (size_t)B * (T - P); r++) {
            d = fmaxf(d, max_abs_diff(gpu.data() + r * Vp, cpu.data() + r * Vp, V));
            maxref = fmaxf(maxref, max_abs(cpu.data() + r * Vp, V));
        }
        const float tol = logits_tol(maxref);
        check(kv.bytes == cpu_bytes, "%s: the cache holds %zu bytes, the CPU's %zu", what, kv.bytes, cpu_bytes);
        if (compare) check(d <= tol, "%s: logits after a %d-token prompt equal the CPU's (max diff %.2e, tol %.1e)", what, P, d, tol);
        else printf("(%s: logits not compared, the selection differs at a near-tie)\n", what);
        kvcache_free(&kv);
    }
    model_free(&m);
}

// ----------------------------------------------------------------------------
// 5. the command line: --kv-report and --generate figures

// first line of a command's stdout that contains `key`, or "" 
static void command_line_with(const char *cmd, const char *key, char *line, size_t n) {
    line[0] = 0;
    FILE *p = popen(cmd, "r");
    if (!p) return;
    char buf[4096];
    while (fgets(buf, sizeof buf, p))
        if (!line[0] && strstr(buf, key)) snprintf(line, n, "%s", buf);
    pclose(p);
}

// the text after "key": up to the next comma or brace
static void json_field(const char *line, const char *key, char *out, size_t n) {
    char pat[128];
    snprintf(pat, sizeof pat, "\"%s\": ", key);
    const char *p = strstr(line, pat);
    out[0] = 0;
    if (!p) return;
    p += strlen(pat);
    size_t k = 0;
    while (p[k] && p[k] != ',' && p[k] != '}' && k + 1 < n) { out[k] = p[k]; k++; }
    out[k] = 0;
}

static void check_command_line(const char *bin_cpu, const char *bin_cu) {
    printf("-- command line: %s vs %s\n", bin_cu, bin_cpu);
    if (!file_exists(bin_cpu) || !file_exists(bin_cu)) {
        check(0, "%s and %s exist (make train_ctxkv train_ctxkv_cu)", bin_cpu, bin_cu);
        return;
    }
    const char *reports[] = {"--model pythia-160m --attn mha", "--model pythia-160m --attn gqa --n-kv-head 3", "--model pythia-160m --attn mqa",
                             "--model pythia-160m --attn mla --kv-rank 256 --rope-dim 64", "--model pythia-70m --layer0 ctxkv",
                             "--model pythia-70m --model-type ctxpythia"};
    for (int i = 0; i < 6; i++) {
        char cmd[1024], a[4096], b[4096];
        snprintf(cmd, sizeof cmd, "%s %s --kv-report", bin_cpu, reports[i]);
        command_line_with(cmd, "kv_bytes", a, sizeof a);
        snprintf(cmd, sizeof cmd, "%s %s --kv-report", bin_cu, reports[i]);
        command_line_with(cmd, "kv_bytes", b, sizeof b);
        // the activation bytes are each program's own layout (floatX, alignment): compared apart
        char *ta = strstr(a, ", \"train_activation_bytes\""), *tb = strstr(b, ", \"train_activation_bytes\"");
        if (ta) *ta = 0;
        if (tb) *tb = 0;
        check(a[0] && ta && tb && !strcmp(a, b), "--kv-report %s: the same KV JSON as the CPU program, each with its activation bytes",
              reports[i]);
        // O(T) attention: the CUDA program's training activations (its own layout) double with T;
        // the CPU program, which keeps P (B,H,T,T), grows faster (so the measure can tell)
        double ratio[2][2]; // [program][forward, backward]: bytes at T 1024 / bytes at T 512
        for (int prog = 0; prog < 2; prog++) {
            double bytes[2][2];
            for (int k = 0; k < 2; k++) {
                snprintf(cmd, sizeof cmd, "%s %s -b 8 -t %d --kv-report", prog ? bin_cu : bin_cpu, reports[i], k ? 1024 : 512);
                command_line_with(cmd, "train_activation_bytes", a, sizeof a);
                char f[64], g[64];
                const char *act = strstr(a, "\"train_activation_bytes\"");
                json_field(act ? act : "", "forward", f, sizeof f);
                json_field(act ? act : "", "backward", g, sizeof g);
                bytes[k][0] = atof(f);
                bytes[k][1] = atof(g);
            }
            for (int d = 0; d < 2; d++) ratio[prog][d] = bytes[0][d] > 0 ? bytes[1][d] / bytes[0][d] : 0.0;
        }
        check(fabs(ratio[1][0] - 2.0) < 0.01 && fabs(ratio[1][1] - 2.0) < 0.01 && ratio[0][0] > 2.2 && ratio[0][1] > 2.2,
              "--kv-report %s -b 8: CUDA activations T 1024 / T 512 = %.4f forward, %.4f backward (linear in T); the CPU program's %.2f, %.2f",
              reports[i], ratio[1][0], ratio[1][1], ratio[0][0], ratio[0][1]);
    }
    const char *gens[] = {"", "--attn gqa --n-kv-head 2", "--attn mla --kv-rank 16 --rope-dim 4", "--layer0 ctxkv --context-dim 16 --context-interval 3 --max-contexts 4",
                          "--kv-policy streaming --kv-budget 8 --kv-sinks 2", "--attn mla --kv-rank 16 --rope-dim 4 --kv-policy snapkv --kv-budget 8 --kv-window 2",
                          "--layer0 ctxkv --context-dim 16 --kv-policy snapkv --kv-budget 6 --kv-window 3"};
    const char *fields[] = {"generated_tokens", "kv_cache_capacity_tokens", "kv_cache_bytes", "kv_bytes_per_token_fp32", "kv_policy", "kv_cache_slots_per_layer"};
    for (int i = 0; i < 7; i++) {
        char cmd[1024], a[4096], b[4096];
        snprintf(cmd, sizeof cmd, "%s --model tiny %s --generate 20 --prompt-ids 1,2,3,4,5,6,7,8,9,10,11,12 --tokenizer '' 2>/dev/null", bin_cpu, gens[i]);
        command_line_with(cmd, "generated_tokens", a, sizeof a);
        snprintf(cmd, sizeof cmd, "%s --model tiny %s --generate 20 --prompt-ids 1,2,3,4,5,6,7,8,9,10,11,12 --tokenizer '' 2>/dev/null", bin_cu, gens[i]);
        command_line_with(cmd, "generated_tokens", b, sizeof b);
        int same = a[0] && b[0];
        for (int k = 0; k < 6 && same; k++) {
            char fa[64], fb[64];
            json_field(a, fields[k], fa, sizeof fa);
            json_field(b, fields[k], fb, sizeof fb);
            same = fa[0] && !strcmp(fa, fb);
        }
        check(same, "--generate 20 after 12 (tiny %s): the same token count, cache capacity, bytes, policy and slots as the CPU program", gens[i][0] ? gens[i] : "mha");
    }
}

// the recall workload through both programs: a masked shard trains 3 steps (the loss on answers
// only), then --eval-recall; the same answers counted, the same val loss and accuracy
static void check_recall_command_line(const char *bin_cpu, const char *bin_cu) {
    printf("-- recall workload: %s vs %s\n", bin_cu, bin_cpu);
    enum { E = 8, L = 16, N = E * L + 1 };
    uint16_t tok[N];
    uint8_t mask[N] = {0};
    uint16_t dist[E * L] = {0};
    uint64_t rng = 11;
    for (int i = 0; i < N; i++) tok[i] = (uint16_t)(random_u32(&rng) % 96);
    for (int e = 0; e < E; e++)
        for (int j = 5; j < L; j += 4) mask[e * L + j] = 1, dist[e * L + j] = (uint16_t)(j - 1);
    char shard[512], rec[512];
    snprintf(shard, sizeof shard, "%s/recall_masked.bin", tmpdir);
    snprintf(rec, sizeof rec, "%s/recall_test.bin", tmpdir);
    write_masked_shard(shard, tok, mask, N, L, N);
    int len[E], pairs[E];
    for (int e = 0; e < E; e++) len[e] = L, pairs[e] = 1 + e % 2;
    write_recall(rec, RECALL_MAGIC, E, len, pairs, tok, dist, E * L, 0);
    char out[2][4096], val[2][4096];
    const char *bins[2] = {bin_cpu, bin_cu};
    for (int k = 0; k < 2; k++) {
        char cmd[2048];
        snprintf(cmd, sizeof cmd, "%s --model tiny -b 2 -t %d --steps 3 --val-every 0 --val-batches 2 --sample-every 0 --tokenizer '' "
                 "--train %s --val %s --eval-recall %s 2>&1", bins[k], L, shard, shard, rec);
        command_line_with(cmd, "recall: accuracy", out[k], sizeof out[k]);
        command_line_with(cmd, "| val loss", val[k], sizeof val[k]);
    }
    float acc[2] = {-1, -1}, vl[2] = {-1, -1};
    long long ans[2] = {-1, -2};
    int ex[2] = {-1, -2};
    for (int k = 0; k < 2; k++) {
        sscanf(out[k], "recall: accuracy %f over %lld answers of %d examples", &acc[k], &ans[k], &ex[k]);
        const char *v = strstr(val[k], "val loss ");
        if (v) sscanf(v, "val loss %f", &vl[k]);
    }
    check(ans[0] == E * 3 && ans[0] == ans[1] && ex[0] == E && ex[0] == ex[1], "--eval-recall: both programs count %lld answers of %d examples (CUDA %lld, %d)",
          ans[0], ex[0], ans[1], ex[1]);
    check(vl[0] > 0 && fabsf(vl[0] - vl[1]) <= TOL_STEP * fmaxf(1.0f, vl[0]) && fabsf(acc[0] - acc[1]) <= (FP32_TOLERANCES ? 1.5f : 6.5f) / (E * 3),
          "masked shard, 3 steps: val loss on the answers %.5f vs CPU %.5f, recall %.4f vs %.4f", vl[1], vl[0], acc[1], acc[0]);
}

int main(int argc, char **argv) {
    if (argc == 3) { // check one model/state pair only
        check_reference(argv[1], argv[2]);
        printf("%d passed, %d failed\n", n_passed, n_failed);
        return n_failed ? 1 : 0;
    }
    if (argc != 1) { fprintf(stderr, "usage: ./test_ctxkv_cu [MODEL.bin STATE.bin]\n"); return 2; }
    const char *bin_cpu = getenv("TRAIN_BIN") ? getenv("TRAIN_BIN") : "./train_ctxkv";
    const char *bin_cu = getenv("TRAIN_BIN_CU") ? getenv("TRAIN_BIN_CU") : "./train_ctxkv_cu";
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_ctxkv_cu_XXXXXX");
    if (!mkdtemp(tmpdir)) die("cannot create a temporary directory");
    cuda_init();
    printf("GPU: %s (sm_%d%d), build: %s\n", device_prop.name, device_prop.major, device_prop.minor, PRECISION_NAME);

    check_reference("dev/ref/tiny_model.bin", "dev/ref/tiny_state.bin");
    const char *variants[] = {"gqa", "mqa", "mla", "mlaq", "ctxkv", "ctxpythia"};
    for (int i = 0; i < 6; i++) {
        char mp[256], sp[256];
        snprintf(mp, sizeof mp, "dev/ref/%s_model.bin", variants[i]);
        snprintf(sp, sizeof sp, "dev/ref/%s_state.bin", variants[i]);
        check_reference(mp, sp);
    }
    // also_long: again at T 100, where the tiled attention spans several tiles, the last ones
    // partial (query tiles of 16 rows, key tiles of 32, dK/dV blocks of 64 keys); T 16 fits in one
    struct { const char *label; Config c; int also_long; } cfgs[] = {
        {"mha", config_from_preset(find_preset("tiny")), 1},
        {"gqa G=2", tiny_variant("gqa", 2, 0, 0, -1), 1},
        {"mqa", tiny_variant("mqa", 0, 0, 0, -1), 0},
        {"mla", tiny_variant("mla", 0, 16, 4, -1), 1},
        {"mla q-rank 12", tiny_variant("mla", 0, 16, 4, 12), 0},
        {"mla, rope in 4 groups, linear latent", tiny_mla_grouped(16), 0},
        {"ctxkv + gqa", tiny_context("ctxkv", tiny_variant("gqa", 2, 0, 0, -1)), 1},
        {"ctxkv + mla", tiny_context("ctxkv", tiny_variant("mla", 0, 16, 4, -1)), 0},
        {"ctxpythia", tiny_context("ctxpythia", config_from_preset(find_preset("tiny"))), 1},
    };
    const int n_cfgs = (int)(sizeof cfgs / sizeof cfgs[0]);
    for (int i = 0; i < n_cfgs; i++) check_against_cpu(cfgs[i].label, cfgs[i].c);
    for (int i = 0; i < n_cfgs; i++)
        if (cfgs[i].also_long) check_against_cpu(cfgs[i].label, cfgs[i].c, 2, 100, 3);
    check_real_shapes();
    check_phase1_against_cpu();
    printf("-- cached decoding\n");
    for (int i = 0; i < n_cfgs; i++) check_cached_decoding(cfgs[i].label, cfgs[i].c);
    printf("-- KV policies, GPU against CPU\n");
    for (int i = 0; i < n_cfgs; i++) check_kv_policies(cfgs[i].label, cfgs[i].c);
    check_kv_eviction_reference("dev/ref/kv_eviction.bin");
    check_command_line(bin_cpu, bin_cu);
    check_recall_command_line(bin_cpu, bin_cu);

    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
