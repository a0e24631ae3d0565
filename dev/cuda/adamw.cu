/*
AdamW (train_ctxkv.c model_update), exactly torch.optim.AdamW's single-tensor path, on fp32
master weights; with bf16 parameters the kernel also writes the rounded copy the layers read.
The gradient-norm clip's factor s comes in as an argument (g = s·grad, in fp32), not as a
rescale of the gradients beforehand:
  p *= 1 − lr·wd (2-D tensors only);  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;
  p −= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)

    nvcc -O3 -std=c++17 dev/cuda/adamw.cu -o /tmp/adamw && /tmp/adamw [1|2]

version 1: one launch per tensor, one thread per entry, fp32 parameters: train_ctxkv.cu's launch
           (its kernel, built with PRECISION=FP32)
version 2: the same update with bf16 parameters next to the fp32 master (train_ctxkv.cu's
           default build): validated on the master weights and on the bf16 copy, which must be
           the master rounded to nearest
*/
#include "common.h"
#include <cuda_bf16.h>

static void adamw_cpu(float *p, const float *grad, float *m, float *v, size_t n, int t, float lr, float b1, float b2, float eps, float wd,
                      float gs) {
    const float bc1 = 1.0f - powf(b1, (float)t), bc2_sqrt = sqrtf(1.0f - powf(b2, (float)t)), step_size = lr / bc1, decay = 1.0f - lr * wd;
    for (size_t i = 0; i < n; i++) {
        const float g = grad[i] * gs;
        p[i] *= decay;
        m[i] = b1 * m[i] + (1.0f - b1) * g;
        v[i] = b2 * v[i] + (1.0f - b2) * g * g;
        p[i] -= step_size * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
    }
}

__global__ void adamw_kernel1(float *master, const float *grads, float *mm, float *vv, size_t n, float beta1, float beta2,
                              float eps, float decay, float step_size, float bc2_sqrt, float grad_scale) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = grads[i] * grad_scale;
    float p = master[i] * decay;
    const float m_ = beta1 * mm[i] + (1.0f - beta1) * g, v_ = beta2 * vv[i] + (1.0f - beta2) * g * g;
    mm[i] = m_;
    vv[i] = v_;
    master[i] = p - step_size * m_ / (sqrtf(v_) / bc2_sqrt + eps);
}

__global__ void adamw_kernel2(__nv_bfloat16 *params, float *master, const __nv_bfloat16 *grads, float *mm, float *vv, size_t n,
                              float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt,
                              float grad_scale) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = __bfloat162float(grads[i]) * grad_scale;
    float p = master[i] * decay;
    const float m_ = beta1 * mm[i] + (1.0f - beta1) * g, v_ = beta2 * vv[i] + (1.0f - beta2) * g * g;
    mm[i] = m_;
    vv[i] = v_;
    p -= step_size * m_ / (sqrtf(v_) / bc2_sqrt + eps);
    master[i] = p;
    params[i] = __float2bfloat16(p);
}

__global__ void bf16_to_float_kernel(float *dst, const __nv_bfloat16 *src, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __bfloat162float(src[i]);
}
__global__ void float_to_bf16_kernel(__nv_bfloat16 *dst, const float *src, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = __float2bfloat16(src[i]);
}

int main(int argc, char **argv) {
    const size_t n = SIZE((size_t)162 * 1000 * 1000 / 4, 100000); // a quarter of pythia-160m's parameters
    const int steps = 3;
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, gs = 0.375f; // gs: a clip factor
    float *p = make_random_float(n, 0.05f), *g = make_random_float(n, 1e-2f);
    float *m = (float *)calloc(n, sizeof(float)), *v = (float *)calloc(n, sizeof(float)), *p_ref = (float *)malloc(n * sizeof(float));
    int ok = 1;
    for (int ver = 1; ver <= 2; ver++) {
        if (!version_wanted(argc, argv, ver)) continue;
        // the reference: `steps` updates with the same gradient; version 2's gradient is bf16
        float *g_used = (float *)malloc(n * sizeof(float));
        for (size_t i = 0; i < n; i++) g_used[i] = ver == 1 ? g[i] : __bfloat162float(__float2bfloat16(g[i]));
        memcpy(p_ref, p, n * sizeof(float));
        memset(m, 0, n * sizeof(float));
        memset(v, 0, n * sizeof(float));
        for (int t = 1; t <= steps; t++) adamw_cpu(p_ref, g_used, m, v, n, t, lr, b1, b2, eps, wd, gs);
        float *d_master = to_device(p, n), *d_g = to_device(g, n), *d_m = device_zeros(n), *d_v = device_zeros(n);
        __nv_bfloat16 *d_p16, *d_g16;
        cudaCheck(cudaMalloc((void **)&d_p16, n * sizeof(__nv_bfloat16)));
        cudaCheck(cudaMalloc((void **)&d_g16, n * sizeof(__nv_bfloat16)));
        float_to_bf16_kernel<<<ceil_div(n, 256), 256>>>(d_g16, d_g, n);
        int t = 0;
        auto step = [&]() {
            t++;
            const float bc1 = 1.0f - powf(b1, (float)t), bc2_sqrt = sqrtf(1.0f - powf(b2, (float)t));
            if (ver == 1) adamw_kernel1<<<ceil_div(n, 256), 256>>>(d_master, d_g, d_m, d_v, n, b1, b2, eps, 1.0f - lr * wd, lr / bc1, bc2_sqrt, gs);
            else adamw_kernel2<<<ceil_div(n, 256), 256>>>(d_p16, d_master, d_g16, d_m, d_v, n, b1, b2, eps, 1.0f - lr * wd, lr / bc1, bc2_sqrt, gs);
            cudaCheck(cudaGetLastError());
        };
        for (int s = 0; s < steps; s++) step();
        printf("version %d\n", ver);
        ok &= validate_result(d_master, p_ref, "master weights", n, 1e-6f);
        if (ver == 2) { // the bf16 copy is the master rounded
            float *d_p16f = device_zeros(n), *rounded = (float *)malloc(n * sizeof(float));
            bf16_to_float_kernel<<<ceil_div(n, 256), 256>>>(d_p16f, d_p16, n);
            for (size_t i = 0; i < n; i++) rounded[i] = __bfloat162float(__float2bfloat16(p_ref[i]));
            ok &= validate_result(d_p16f, rounded, "bf16 parameters", n, 1e-2f);
            cudaCheck(cudaFree(d_p16f));
            free(rounded);
        }
        float ms = benchmark_kernel(step);
        printf("  %.4f ms, %.1f GB/s\n", ms, (ver == 1 ? 20.0 : 16.0) * n / ms / 1e6);
        cudaCheck(cudaFree(d_master)); cudaCheck(cudaFree(d_g)); cudaCheck(cudaFree(d_m)); cudaCheck(cudaFree(d_v));
        cudaCheck(cudaFree(d_p16)); cudaCheck(cudaFree(d_g16));
        free(g_used);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
