/*
The global gradient norm (train_ctxkv.c model_clip_grad_norm): sqrt(Σ g²) over every gradient,
accumulated in double as the CPU program does; clip_grad_norm_ then scales by max_norm/(norm + 1e-6).

    nvcc -O3 -std=c++17 dev/cuda/global_norm.cu -o /tmp/global_norm && /tmp/global_norm [1|2]

version 1: a fixed grid of 512 blocks, grid-stride loops, per-thread double sums, a block tree
           in shared memory, 512 partials summed on the host in order: deterministic, bit for
           bit the same every run: train_ctxkv.cu's
version 2: the same per-block sums, combined with atomicAdd on one double: one kernel, no copy
           of partials, but the order of the atomics (so the last bits) changes between runs
*/
#include "common.h"
#define NORM_BLOCKS 512

__global__ void grad_sq_partial_kernel(double *partial, const float *g, size_t n) {
    __shared__ double sh[256];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) s += (double)g[i] * g[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}
__global__ void grad_sq_atomic_kernel(double *total, const float *g, size_t n) {
    __shared__ double sh[256];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) s += (double)g[i] * g[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(total, sh[0]);
}

int main(int argc, char **argv) {
    const size_t n = SIZE((size_t)162 * 1000 * 1000 / 4, 300000);
    float *g = make_random_float(n, 1e-2f);
    double sq = 0.0;
    for (size_t i = 0; i < n; i++) sq += (double)g[i] * g[i];
    const float ref = (float)sqrt(sq);
    float *d_g = to_device(g, n);
    double *d_partial;
    cudaCheck(cudaMalloc((void **)&d_partial, NORM_BLOCKS * sizeof(double)));
    int ok = 1;
    for (int v = 1; v <= 2; v++) {
        if (!version_wanted(argc, argv, v)) continue;
        float norm = 0.0f;
        auto run = [&]() {
            double host[NORM_BLOCKS], s = 0.0;
            if (v == 1) {
                grad_sq_partial_kernel<<<NORM_BLOCKS, 256>>>(d_partial, d_g, n);
                cudaCheck(cudaMemcpy(host, d_partial, sizeof host, cudaMemcpyDeviceToHost));
                for (int i = 0; i < NORM_BLOCKS; i++) s += host[i];
            } else {
                cudaCheck(cudaMemset(d_partial, 0, sizeof(double)));
                grad_sq_atomic_kernel<<<NORM_BLOCKS, 256>>>(d_partial, d_g, n);
                cudaCheck(cudaMemcpy(&s, d_partial, sizeof(double), cudaMemcpyDeviceToHost));
            }
            norm = (float)sqrt(s);
        };
        run();
        const float d = fabsf(norm - ref);
        printf("version %d\n  norm %.9g, CPU %.9g, diff %.3e %s\n", v, norm, ref, d, d <= 1e-6f * ref ? "ok" : "MISMATCH");
        ok &= d <= 1e-6f * ref;
        float ms = benchmark_kernel(run);
        printf("  %.4f ms, %.1f GB/s\n", ms, 4.0 * n / ms / 1e6);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
