/*
LayerNorm backward (train_ctxkv.c layernorm_backward), accumulating as every backward does:
  dx += r·(g − mean(g) − x̂·mean(g⊙x̂)), g = dy⊙w;   dw += Σ_n dy⊙x̂;   db += Σ_n dy

    nvcc -O3 -std=c++17 dev/cuda/layernorm_backward.cu -o /tmp/layernorm_backward && /tmp/layernorm_backward [1|2]

version 1: dx one warp per row; dw, db as column sums in two deterministic stages (each block
           sums a fixed strided set of rows for 32 columns, a second kernel adds the partials
           in order): train_ctxkv.cu's (its column_sum_add)
version 2: one kernel; each warp adds its row's dw, db terms with atomicAdd: fewer launches,
           but the order of the additions (so the last bits) changes from run to run
*/
#include "common.h"

static void layernorm_backward_cpu(float *dinp, float *dw, float *db, const float *dout, const float *inp, const float *w,
                                   const float *mean, const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float m = mean[n], r = rstd[n], g_mean = 0.0f, gx_mean = 0.0f;
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
    for (int i = 0; i < C; i++) {
        double sw = 0.0, sb = 0.0; // double: the reference for sums over many rows
        for (int n = 0; n < N; n++) {
            float dy = dout[(size_t)n * C + i];
            sw += dy * (inp[(size_t)n * C + i] - mean[n]) * rstd[n];
            sb += dy;
        }
        dw[i] += (float)sw;
        db[i] += (float)sb;
    }
}

__global__ void layernorm_backward_dx_kernel(float *dinp, const float *dout, const float *inp, const float *w,
                                             const float *mean, const float *rstd, int N, int C) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
    float *dx = dinp + (size_t)n * C;
    const float m = mean[n], r = rstd[n];
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float xhat = (x[i] - m) * r, g = dy[i] * w[i];
        g_mean += g;
        gx_mean += g * xhat;
    }
    g_mean = warp_reduce_sum(g_mean) / C;
    gx_mean = warp_reduce_sum(gx_mean) / C;
    for (int i = lane; i < C; i += 32) dx[i] += r * (dy[i] * w[i] - g_mean - ((x[i] - m) * r) * gx_mean);
}

// version 1's column sums: partial[split][i] over rows split*8+y, strided; then the splits in order
template <class F> __global__ void colsum_partial_kernel(float *partial, int N, int C, F f) {
    __shared__ float sh[8][33];
    const int i = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    if (i < C)
        for (int n = blockIdx.y * 8 + threadIdx.y; n < N; n += gridDim.y * 8) s += f(n, i);
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && i < C) {
        float t = 0.0f;
        for (int y = 0; y < 8; y++) t += sh[y][threadIdx.x];
        partial[(size_t)blockIdx.y * C + i] = t;
    }
}
__global__ void colsum_finish_kernel(float *dst, const float *partial, int splits, int C) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    float s = 0.0f;
    for (int y = 0; y < splits; y++) s += partial[(size_t)y * C + i];
    dst[i] += s;
}
struct LayerNormDW {
    const float *dout, *inp, *mean, *rstd; int C;
    __device__ float operator()(int n, int i) const { return dout[(size_t)n * C + i] * (inp[(size_t)n * C + i] - mean[n]) * rstd[n]; }
};
struct RowSum {
    const float *x; int C;
    __device__ float operator()(int n, int i) const { return x[(size_t)n * C + i]; }
};
template <class F> static void column_sum_add(float *dst, float *partial, int N, int C, F f) {
    int splits = ceil_div(N, 256);
    if (splits > 128) splits = 128;
    colsum_partial_kernel<<<dim3(ceil_div(C, 32), splits), dim3(32, 8)>>>(partial, N, C, f);
    colsum_finish_kernel<<<ceil_div(C, 256), 256>>>(dst, partial, splits, C);
}

__global__ void layernorm_backward_kernel2(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                                           const float *w, const float *mean, const float *rstd, int N, int C) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
    float *dx = dinp + (size_t)n * C;
    const float m = mean[n], r = rstd[n];
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float xhat = (x[i] - m) * r, g = dy[i] * w[i];
        g_mean += g;
        gx_mean += g * xhat;
        atomicAdd(&dw[i], dy[i] * xhat);
        atomicAdd(&db[i], dy[i]);
    }
    g_mean = warp_reduce_sum(g_mean) / C;
    gx_mean = warp_reduce_sum(gx_mean) / C;
    for (int i = lane; i < C; i += 32) dx[i] += r * (dy[i] * w[i] - g_mean - ((x[i] - m) * r) * gx_mean);
}

int main(int argc, char **argv) {
    const int N = SIZE(8 * 1024, 300), C = SIZE(768, 96);
    float *x = make_random_float((size_t)N * C, 2.0f), *w = make_random_float(C, 1.0f), *dy = make_random_float((size_t)N * C, 1.0f);
    float *mean = (float *)malloc(N * sizeof(float)), *rstd = (float *)malloc(N * sizeof(float));
    for (int n = 0; n < N; n++) { // the statistics the forward would have kept
        double s = 0, s2 = 0;
        for (int i = 0; i < C; i++) s += x[(size_t)n * C + i];
        mean[n] = (float)(s / C);
        for (int i = 0; i < C; i++) { double d = x[(size_t)n * C + i] - mean[n]; s2 += d * d; }
        rstd[n] = (float)(1.0 / sqrt(s2 / C + 1e-5));
    }
    float *dx0 = make_random_float((size_t)N * C, 0.1f), *dw0 = make_random_float(C, 0.1f), *db0 = make_random_float(C, 0.1f);
    float *dx = (float *)malloc((size_t)N * C * sizeof(float)), *dw = (float *)malloc(C * sizeof(float)), *db = (float *)malloc(C * sizeof(float));
    memcpy(dx, dx0, (size_t)N * C * sizeof(float)); memcpy(dw, dw0, C * sizeof(float)); memcpy(db, db0, C * sizeof(float));
    layernorm_backward_cpu(dx, dw, db, dy, x, w, mean, rstd, N, C);
    float *d_x = to_device(x, (size_t)N * C), *d_w = to_device(w, C), *d_dy = to_device(dy, (size_t)N * C);
    float *d_mean = to_device(mean, N), *d_rstd = to_device(rstd, N), *d_partial = device_zeros((size_t)128 * C);
    float *d_dx = to_device(dx0, (size_t)N * C), *d_dw = to_device(dw0, C), *d_db = to_device(db0, C);
    int ok = 1;
    for (int v = 1; v <= 2; v++) {
        if (!version_wanted(argc, argv, v)) continue;
        auto run = [&]() {
            if (v == 1) {
                layernorm_backward_dx_kernel<<<ceil_div(N, 8), 256>>>(d_dx, d_dy, d_x, d_w, d_mean, d_rstd, N, C);
                column_sum_add(d_dw, d_partial, N, C, LayerNormDW{d_dy, d_x, d_mean, d_rstd, C});
                column_sum_add(d_db, d_partial, N, C, RowSum{d_dy, C});
            } else {
                layernorm_backward_kernel2<<<ceil_div(N, 8), 256>>>(d_dx, d_dw, d_db, d_dy, d_x, d_w, d_mean, d_rstd, N, C);
            }
            cudaCheck(cudaGetLastError());
        };
        cudaCheck(cudaMemcpy(d_dx, dx0, (size_t)N * C * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_dw, dw0, C * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(d_db, db0, C * sizeof(float), cudaMemcpyHostToDevice));
        run();
        printf("version %d\n", v);
        ok &= validate_result(d_dx, dx, "dinp", (size_t)N * C, 1e-4f);
        ok &= validate_result(d_dw, dw, "dw", C, 2e-3f); // sums over 8192 rows in fp32
        ok &= validate_result(d_db, db, "db", C, 2e-3f);
        float ms = benchmark_kernel(run); // (accumulates further: only the time matters here)
        printf("  %.4f ms\n", ms);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
