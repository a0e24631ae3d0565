/*
Fused softmax / cross-entropy over the vocabulary (train_ctxkv.c crossentropy_forward and
crossentropy_backward), for logits (N, Vp) of which the first V columns are real tokens:
  forward:  lse[n] = logsumexp(z[n][:V]), loss[n] = lse[n] − z[n][target] (0 for ignored rows, -100)
  backward: dz = (softmax(z) − onehot(target)) / n_valid, IN PLACE over the logits; ignored rows
            and padding columns 0.
No probability buffer: the backward recomputes exp(z − lse) from the kept lse.

    nvcc -O3 -std=c++17 dev/cuda/crossentropy.cu -o /tmp/crossentropy && /tmp/crossentropy [1|2]

version 1: a block per row, two passes (max, then Σ exp(z − max)): train_ctxkv.cu's
version 2: a block per row, one pass with an online softmax (each thread keeps a running max
           and rescales its running sum when the max grows; the partials merge the same way)
*/
#include "common.h"
#define IGNORE_INDEX (-100)

static void crossentropy_forward_cpu(float *losses, float *lse, const float *logits, const int *targets, int N, int V, int Vp) {
    for (int n = 0; n < N; n++) {
        const float *z = logits + (size_t)n * Vp;
        float mx = -INFINITY;
        for (int i = 0; i < V; i++) mx = fmaxf(mx, z[i]);
        double s = 0.0;
        for (int i = 0; i < V; i++) s += exp((double)z[i] - mx);
        lse[n] = mx + (float)log(s);
        losses[n] = targets[n] == IGNORE_INDEX ? 0.0f : lse[n] - z[targets[n]];
    }
}
static void crossentropy_backward_cpu(float *z_all, const float *lse, const int *targets, int N, int V, int Vp, int n_valid) {
    const float scale = 1.0f / n_valid;
    for (int n = 0; n < N; n++) {
        float *z = z_all + (size_t)n * Vp;
        for (int i = 0; i < Vp; i++) {
            float d = 0.0f;
            if (targets[n] != IGNORE_INDEX && i < V) d = expf(z[i] - lse[n]) * scale - (i == targets[n] ? scale : 0.0f);
            z[i] = d;
        }
    }
}

__global__ void crossentropy_forward_kernel1(float *losses, float *lse, const float *logits, const int *targets, int V, int Vp) {
    const int n = blockIdx.x;
    const float *z = logits + (size_t)n * Vp;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, z[i]);
    mx = block_reduce_max(mx);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(z[i] - mx);
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) {
        const float l = mx + logf(s);
        lse[n] = l;
        losses[n] = targets[n] == IGNORE_INDEX ? 0.0f : l - z[targets[n]];
    }
}

__global__ void crossentropy_forward_kernel2(float *losses, float *lse, const float *logits, const int *targets, int V, int Vp) {
    const int n = blockIdx.x;
    const float *z = logits + (size_t)n * Vp;
    float mx = -INFINITY, s = 0.0f; // running max and Σ exp(z − mx)
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = z[i];
        if (x > mx) { s = s * expf(mx - x) + 1.0f; mx = x; }
        else s += expf(x - mx);
    }
    const float bmx = block_reduce_max(mx);
    const float bs = block_reduce_sum(mx == -INFINITY ? 0.0f : s * expf(mx - bmx)); // each thread's sum at the block's max
    if (threadIdx.x == 0) {
        const float l = bmx + logf(bs);
        lse[n] = l;
        losses[n] = targets[n] == IGNORE_INDEX ? 0.0f : l - z[targets[n]];
    }
}

__global__ void crossentropy_backward_kernel(float *z_all, const float *lse, const int *targets, int V, int Vp, float scale) {
    const int n = blockIdx.x, target = targets[n];
    float *z = z_all + (size_t)n * Vp;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float d = 0.0f;
        if (target != IGNORE_INDEX && i < V) {
            d = expf(z[i] - lse[n]) * scale;
            if (i == target) d -= scale;
        }
        z[i] = d;
    }
}

int main(int argc, char **argv) {
    const int N = SIZE(4 * 256, 16), V = SIZE(50277, 1000), Vp = SIZE(50304, 1024); // GPT-NeoX's vocabulary, padded
    float *logits = make_random_float((size_t)N * Vp, 8.0f);
    int *targets = make_random_int(N, V);
    targets[3] = IGNORE_INDEX;
    int n_valid = 0;
    for (int n = 0; n < N; n++) n_valid += targets[n] != IGNORE_INDEX;
    float *losses = (float *)malloc(N * sizeof(float)), *lse = (float *)malloc(N * sizeof(float));
    crossentropy_forward_cpu(losses, lse, logits, targets, N, V, Vp);
    float *dlogits = (float *)malloc((size_t)N * Vp * sizeof(float));
    memcpy(dlogits, logits, (size_t)N * Vp * sizeof(float));
    crossentropy_backward_cpu(dlogits, lse, targets, N, V, Vp, n_valid);
    float *d_logits = to_device(logits, (size_t)N * Vp), *d_losses = device_zeros(N), *d_lse = device_zeros(N);
    int *d_targets = to_device_int(targets, N);
    int ok = 1;
    for (int v = 1; v <= 2; v++) {
        if (!version_wanted(argc, argv, v)) continue;
        auto run = [&]() {
            if (v == 1) crossentropy_forward_kernel1<<<N, 512>>>(d_losses, d_lse, d_logits, d_targets, V, Vp);
            else crossentropy_forward_kernel2<<<N, 512>>>(d_losses, d_lse, d_logits, d_targets, V, Vp);
            cudaCheck(cudaGetLastError());
        };
        run();
        printf("version %d (forward)\n", v);
        ok &= validate_result(d_losses, losses, "losses", N, 1e-5f);
        ok &= validate_result(d_lse, lse, "lse", N, 1e-5f);
        float ms = benchmark_kernel(run);
        printf("  %.4f ms, %.1f GB/s\n", ms, (double)N * Vp * sizeof(float) / ms / 1e6);
    }
    auto bwd = [&]() {
        crossentropy_backward_kernel<<<N, 512>>>(d_logits, d_lse, d_targets, V, Vp, 1.0f / n_valid);
        cudaCheck(cudaGetLastError());
    };
    crossentropy_forward_kernel1<<<N, 512>>>(d_losses, d_lse, d_logits, d_targets, V, Vp);
    bwd();
    printf("backward (in place)\n");
    ok &= validate_result(d_logits, dlogits, "dlogits", (size_t)N * Vp, 1e-5f);
    cudaCheck(cudaMemcpy(d_logits, logits, (size_t)N * Vp * sizeof(float), cudaMemcpyHostToDevice));
    printf("  %.4f ms\n", benchmark_kernel(bwd)); // (overwrites its input: only the time matters here)
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
