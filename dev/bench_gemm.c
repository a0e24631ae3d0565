/*
dev/bench_gemm.c: the CPU trainer's matmuls against OpenBLAS's sgemm, on the model's own products,
in one invocation (make bench-gemm). OpenBLAS (Debian's libopenblas-dev) is linked into this
bench only, as the baseline; the trainer never uses it.

For each preset (pythia-14m, pythia-70m; B*T = 1024 rows) and each linear layer (qkv, dense,
fc, proj, the head): matmul_forward, matmul_backward's dinp and its dW, each timed as the best
of 20 calls (noise only slows a run down), taken in 4 turns of 5 that alternate with cblas_sgemm's
on the same operands and threads, so that a burst of noise from the shared machine hits both.
Prints GFLOP/s of both sides and the ratio ours/OpenBLAS (>= 1: ours is faster), then the
smallest ratio. Then decoding's products at pythia-14m, batch 1 and 8 rows (the forward only,
best of 5 turns of 11), with their own smallest ratio. Threads: OMP_NUM_THREADS (OpenBLAS gets the same count).
*/
#define TESTING
#include "../train_ctxkv.c"
#include <cblas.h>

void openblas_set_num_threads(int n);

// the best of each side over `rounds` rounds of `per` consecutive calls each, the sides taking
// turns (ours, theirs, ours, ...): noise only slows a call down, and a burst of it (the machine
// is shared) then lands on both sides rather than on one side's whole sample. Within a round the
// first calls absorb the other side's threads still spinning from its last call (make bench-gemm
// also sets OPENBLAS_THREAD_TIMEOUT=4, so that OpenBLAS's pool yields the cores at once).
static void best_of_turns(int rounds, int per, void (*a)(void *), void (*b)(void *), void *arg, double *best_a, double *best_b) {
    *best_a = *best_b = 1e30;
    for (int r = 0; r < rounds; r++)
        for (int side = 0; side < 2; side++)
            for (int k = 0; k < per; k++) {
                double t0 = now_seconds();
                (side ? b : a)(arg);
                double dt = now_seconds() - t0;
                double *best = side ? best_b : best_a;
                if (dt < *best) *best = dt;
            }
}

typedef struct { int N, C, OC, which; float *inp, *w, *out, *dout, *dinp, *dw; } Job; // which: 0 fwd, 1 dinp, 2 dW

static void ours(void *p) {
    Job *j = p;
    if (j->which == 0) matmul_forward(j->out, j->inp, j->w, NULL, j->N, j->C, j->OC);
    else if (j->which == 1) matmul_backward(j->dinp, NULL, NULL, j->dout, j->inp, j->w, j->N, j->C, j->OC);
    else matmul_backward(NULL, j->dw, NULL, j->dout, j->inp, j->w, j->N, j->C, j->OC);
}

static void blas(void *p) {
    Job *j = p;
    if (j->which == 0) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->N, j->OC, j->C, 1.0f, j->inp, j->C, j->w, j->C, 0.0f, j->out, j->OC);
    else if (j->which == 1) cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->N, j->C, j->OC, 1.0f, j->dout, j->OC, j->w, j->C, 1.0f, j->dinp, j->C);
    else cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, j->OC, j->C, j->N, 1.0f, j->dout, j->OC, j->inp, j->C, 1.0f, j->dw, j->C);
}

int main(void) {
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    openblas_set_num_threads(threads);
    printf("bench_gemm: %d thread(s); ratio = OpenBLAS time / ours (>= 1: ours is faster); best of 4 turns x 5 calls each\n", threads);
    printf("%-12s %-6s %-22s %10s %10s %7s\n", "model", "layer", "product (M x K -> N)", "ours GF/s", "BLAS GF/s", "ratio");
    const char *models[] = {"pythia-14m", "pythia-70m"};
    const char *which_name[] = {"fwd", "dinp", "dW"};
    double worst = 1e30;
    char worst_label[128] = "";
    uint64_t rng = 7;
    for (int mi = 0; mi < 2; mi++) {
        const Preset *p = find_preset(models[mi]);
        const int N = 4 * 256, C = p->n_embd, F = p->n_inner, Vp = round_up(p->vocab_size, VOCAB_PAD);
        const struct { const char *name; int C, OC; } layers[] = {{"qkv", C, 3 * C}, {"dense", C, C}, {"fc", C, F}, {"proj", F, C}, {"head", C, Vp}};
        for (int li = 0; li < 5; li++) {
            Job j = {N, layers[li].C, layers[li].OC, 0, NULL, NULL, NULL, NULL, NULL, NULL};
            size_t nin = (size_t)N * j.C, nw = (size_t)j.OC * j.C, nout = (size_t)N * j.OC;
            j.inp = malloc_check(nin * 4, "bench"); j.w = malloc_check(nw * 4, "bench"); j.out = malloc_check(nout * 4, "bench");
            j.dout = malloc_check(nout * 4, "bench"); j.dinp = calloc_check(nin * 4, "bench"); j.dw = calloc_check(nw * 4, "bench");
            for (size_t i = 0; i < nin; i++) j.inp[i] = random_f32(&rng) - 0.5f;
            for (size_t i = 0; i < nw; i++) j.w[i] = random_f32(&rng) - 0.5f;
            for (size_t i = 0; i < nout; i++) j.dout[i] = random_f32(&rng) - 0.5f;
            for (int w = 0; w < 3; w++) {
                j.which = w;
                const double flops = 2.0 * N * j.C * j.OC;
                ours(&j); blas(&j); // warm up (first touch, thread start)
                double t_ours, t_blas;
                best_of_turns(4, 5, ours, blas, &j, &t_ours, &t_blas);
                const double ratio = t_blas / t_ours;
                char prod[64];
                if (w == 0) snprintf(prod, sizeof prod, "%s %dx%d->%d", which_name[w], N, j.C, j.OC);
                else if (w == 1) snprintf(prod, sizeof prod, "%s %dx%d->%d", which_name[w], N, j.OC, j.C);
                else snprintf(prod, sizeof prod, "%s %dx%d->%d", which_name[w], j.OC, N, j.C);
                printf("%-12s %-6s %-22s %10.1f %10.1f %7.2f\n", models[mi], layers[li].name, prod, flops / t_ours * 1e-9,
                       flops / t_blas * 1e-9, ratio);
                fflush(stdout);
                if (ratio < worst) { worst = ratio; snprintf(worst_label, sizeof worst_label, "%s %s %s", models[mi], layers[li].name, which_name[w]); }
            }
            free(j.inp); free(j.w); free(j.out); free(j.dout); free(j.dinp); free(j.dw);
        }
    }
    // decoding's products: a few rows (batch 1 and 8) through matmul_forward's dot-product path,
    // each weight read once for all rows, against sgemm on the same shape (pythia-14m)
    double worst_dec = 1e30;
    const Preset *p = find_preset("pythia-14m");
    const int C = p->n_embd, Vp = round_up(p->vocab_size, VOCAB_PAD);
    const struct { const char *name; int C, OC; } dec[] = {{"qkv", C, 3 * C}, {"fc", C, p->n_inner}, {"proj", p->n_inner, C}, {"head", C, Vp}};
    for (int bi = 0; bi < 2; bi++)
        for (int li = 0; li < 4; li++) {
            const int N = bi ? 8 : 1;
            Job j = {N, dec[li].C, dec[li].OC, 0, NULL, NULL, NULL, NULL, NULL, NULL};
            j.inp = malloc_check((size_t)N * j.C * 4, "bench"); j.w = malloc_check((size_t)j.OC * j.C * 4, "bench");
            j.out = malloc_check((size_t)N * j.OC * 4, "bench");
            for (int i = 0; i < N * j.C; i++) j.inp[i] = random_f32(&rng) - 0.5f;
            for (size_t i = 0; i < (size_t)j.OC * j.C; i++) j.w[i] = random_f32(&rng) - 0.5f;
            ours(&j); blas(&j);
            double t_ours, t_blas;
            best_of_turns(5, 11, ours, blas, &j, &t_ours, &t_blas);
            const double flops = 2.0 * N * j.C * j.OC;
            char prod[64];
            snprintf(prod, sizeof prod, "decode %dx%d->%d", N, j.C, j.OC);
            printf("%-12s %-6s %-22s %10.1f %10.1f %7.2f\n", "pythia-14m", dec[li].name, prod, flops / t_ours * 1e-9, flops / t_blas * 1e-9, t_blas / t_ours);
            if (t_blas / t_ours < worst_dec) worst_dec = t_blas / t_ours;
            free(j.inp); free(j.w); free(j.out);
        }
    printf("{\"bench\": \"gemm\", \"threads\": %d, \"min_ratio_vs_openblas\": %.3f, \"at\": \"%s\", \"decode_min_ratio\": %.3f}\n",
           threads, worst, worst_label, worst_dec);
    return 0;
}
