/*
LayerNorm forward (train_ctxkv.c layernorm_forward): y = (x − mean)·rstd·w + b over the last dim,
biased variance, and the per-row mean and rstd kept for backward.

    nvcc -O3 -std=c++17 dev/cuda/layernorm_forward.cu -o /tmp/layernorm_forward && /tmp/layernorm_forward [1|2]

version 1: one warp per row, three passes over the row (mean, variance, output): train_ctxkv.cu's
version 2: one warp per row, mean and mean of squares in one pass (var = E[x²] − mean²): one read
           fewer, but it loses digits when |mean| >> std (the reason version 1 is the one used)
*/
#include "common.h"

// CPU reference: train_ctxkv.c's loop nest
static void layernorm_forward_cpu(float *out, float *mean, float *rstd, const float *inp, const float *w, const float *b,
                                  int N, int C, float eps) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        float v = 0.0f;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        v /= C;
        float r = 1.0f / sqrtf(v + eps);
        for (int i = 0; i < C; i++) out[(size_t)n * C + i] = (x[i] - m) * r * w[i] + b[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

__global__ void layernorm_forward_kernel1(float *out, float *mean, float *rstd, const float *inp, const float *w,
                                          const float *b, int N, int C, float eps) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float *x = inp + (size_t)n * C;
    float m = 0.0f;
    for (int i = lane; i < C; i += 32) m += x[i];
    m = warp_reduce_sum(m) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += 32) { float d = x[i] - m; v += d * d; }
    v = warp_reduce_sum(v) / C;
    const float r = 1.0f / sqrtf(v + eps);
    for (int i = lane; i < C; i += 32) out[(size_t)n * C + i] = (x[i] - m) * r * w[i] + b[i];
    if (lane == 0) { mean[n] = m; rstd[n] = r; }
}

__global__ void layernorm_forward_kernel2(float *out, float *mean, float *rstd, const float *inp, const float *w,
                                          const float *b, int N, int C, float eps) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float *x = inp + (size_t)n * C;
    float s = 0.0f, s2 = 0.0f;
    for (int i = lane; i < C; i += 32) { s += x[i]; s2 += x[i] * x[i]; }
    const float m = warp_reduce_sum(s) / C, v = fmaxf(warp_reduce_sum(s2) / C - m * m, 0.0f);
    const float r = 1.0f / sqrtf(v + eps);
    for (int i = lane; i < C; i += 32) out[(size_t)n * C + i] = (x[i] - m) * r * w[i] + b[i];
    if (lane == 0) { mean[n] = m; rstd[n] = r; }
}

int main(int argc, char **argv) {
    const int B = SIZE(8, 2), T = SIZE(1024, 64), C = SIZE(768, 96), N = B * T;
    const float eps = 1e-5f;
    float *x = make_random_float((size_t)N * C, 2.0f), *w = make_random_float(C, 1.0f), *b = make_random_float(C, 1.0f);
    for (size_t i = 0; i < (size_t)N * C; i++) x[i] += 0.5f; // a nonzero mean, as residual streams have
    float *out = (float *)malloc((size_t)N * C * sizeof(float)), *mean = (float *)malloc(N * sizeof(float)),
          *rstd = (float *)malloc(N * sizeof(float));
    layernorm_forward_cpu(out, mean, rstd, x, w, b, N, C, eps);
    float *d_x = to_device(x, (size_t)N * C), *d_w = to_device(w, C), *d_b = to_device(b, C);
    float *d_out = device_zeros((size_t)N * C), *d_mean = device_zeros(N), *d_rstd = device_zeros(N);
    int ok = 1;
    for (int v = 1; v <= 2; v++) {
        if (!version_wanted(argc, argv, v)) continue;
        auto run = [&]() {
            if (v == 1) layernorm_forward_kernel1<<<ceil_div(N, 8), 256>>>(d_out, d_mean, d_rstd, d_x, d_w, d_b, N, C, eps);
            else layernorm_forward_kernel2<<<ceil_div(N, 8), 256>>>(d_out, d_mean, d_rstd, d_x, d_w, d_b, N, C, eps);
            cudaCheck(cudaGetLastError());
        };
        run();
        printf("version %d\n", v);
        ok &= validate_result(d_out, out, "out", (size_t)N * C, 1e-4f);
        ok &= validate_result(d_mean, mean, "mean", N, 1e-5f);
        ok &= validate_result(d_rstd, rstd, "rstd", N, 1e-4f);
        float ms = benchmark_kernel(run);
        printf("  %.4f ms, %.1f GB/s\n", ms, 2.0 * N * C * sizeof(float) / ms / 1e6);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
