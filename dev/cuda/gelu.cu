/*
Exact GELU, forward and backward (train_ctxkv.c gelu_forward / gelu_backward), HF's "gelu":
  y = 0.5·x·(1 + erf(x/√2)),   dx += (0.5(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π))·dy
Exact (erf), not the tanh form: build without --use_fast_math.

    nvcc -O3 -std=c++17 dev/cuda/gelu.cu -o /tmp/gelu && /tmp/gelu [1|2]

version 1: one thread per element: train_ctxkv.cu's
version 2: a grid-stride loop over float4, 4 elements per thread per iteration (needs N % 4 == 0
           and 16-byte aligned buffers; the MLP widths are multiples of 128)
*/
#include "common.h"
#define SQRT1_2 0.70710678118654752440f
#define INV_SQRT_2PI 0.3989422804014327f

static void gelu_forward_cpu(float *out, const float *inp, size_t N) {
    for (size_t i = 0; i < N; i++) out[i] = 0.5f * inp[i] * (1.0f + erff(inp[i] * SQRT1_2));
}
static void gelu_backward_cpu(float *dinp, const float *inp, const float *dout, size_t N) {
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        dinp[i] += (0.5f * (1.0f + erff(x * SQRT1_2)) + x * expf(-0.5f * x * x) * INV_SQRT_2PI) * dout[i];
    }
}

__global__ void gelu_forward_kernel1(float *out, const float *inp, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < N) out[i] = 0.5f * inp[i] * (1.0f + erff(inp[i] * SQRT1_2));
}
__global__ void gelu_backward_kernel1(float *dinp, const float *inp, const float *dout, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= N) return;
    const float x = inp[i];
    dinp[i] += (0.5f * (1.0f + erff(x * SQRT1_2)) + x * expf(-0.5f * x * x) * INV_SQRT_2PI) * dout[i];
}

__device__ inline float gelu1(float x) { return 0.5f * x * (1.0f + erff(x * SQRT1_2)); }
__global__ void gelu_forward_kernel2(float4 *out, const float4 *inp, size_t N4) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < N4; i += (size_t)gridDim.x * blockDim.x) {
        float4 x = inp[i];
        out[i] = make_float4(gelu1(x.x), gelu1(x.y), gelu1(x.z), gelu1(x.w));
    }
}
__device__ inline float dgelu1(float x) { return 0.5f * (1.0f + erff(x * SQRT1_2)) + x * expf(-0.5f * x * x) * INV_SQRT_2PI; }
__global__ void gelu_backward_kernel2(float4 *dinp, const float4 *inp, const float4 *dout, size_t N4) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < N4; i += (size_t)gridDim.x * blockDim.x) {
        float4 x = inp[i], g = dout[i], d = dinp[i];
        dinp[i] = make_float4(d.x + dgelu1(x.x) * g.x, d.y + dgelu1(x.y) * g.y, d.z + dgelu1(x.z) * g.z, d.w + dgelu1(x.w) * g.w);
    }
}

int main(int argc, char **argv) {
    const size_t N = SIZE((size_t)8 * 1024 * 3072, 40000); // B·T × the MLP width of pythia-160m
    float *x = make_random_float(N, 4.0f), *dy = make_random_float(N, 1.0f), *dx0 = make_random_float(N, 0.1f);
    float *y = (float *)malloc(N * sizeof(float)), *dx = (float *)malloc(N * sizeof(float));
    gelu_forward_cpu(y, x, N);
    memcpy(dx, dx0, N * sizeof(float));
    gelu_backward_cpu(dx, x, dy, N);
    float *d_x = to_device(x, N), *d_dy = to_device(dy, N), *d_y = device_zeros(N), *d_dx = to_device(dx0, N);
    int ok = 1;
    for (int v = 1; v <= 2; v++) {
        if (!version_wanted(argc, argv, v)) continue;
        auto fwd = [&]() {
            if (v == 1) gelu_forward_kernel1<<<ceil_div(N, 256), 256>>>(d_y, d_x, N);
            else gelu_forward_kernel2<<<1024, 256>>>((float4 *)d_y, (const float4 *)d_x, N / 4);
            cudaCheck(cudaGetLastError());
        };
        auto bwd = [&]() {
            if (v == 1) gelu_backward_kernel1<<<ceil_div(N, 256), 256>>>(d_dx, d_x, d_dy, N);
            else gelu_backward_kernel2<<<1024, 256>>>((float4 *)d_dx, (const float4 *)d_x, (const float4 *)d_dy, N / 4);
            cudaCheck(cudaGetLastError());
        };
        cudaCheck(cudaMemcpy(d_dx, dx0, N * sizeof(float), cudaMemcpyHostToDevice));
        fwd();
        bwd();
        printf("version %d\n", v);
        ok &= validate_result(d_y, y, "forward", N, 1e-6f);
        ok &= validate_result(d_dx, dx, "backward", N, 1e-6f);
        float ms_f = benchmark_kernel(fwd), ms_b = benchmark_kernel(bwd);
        printf("  forward %.4f ms (%.1f GB/s), backward %.4f ms\n", ms_f, 2.0 * N * sizeof(float) / ms_f / 1e6, ms_b);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
