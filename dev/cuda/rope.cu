/*
Rotate-half RoPE (train_ctxkv.c rope_rotate, behind rope_forward and rope_backward), in place on
the first R dims of n_heads heads per row, pairs (i, i + R/2):
  x'[i] = x[i]·c − x[i+R/2]·s,  x'[i+R/2] = x[i+R/2]·c + x[i]·s,   θ = (pos0 + t)·base^(−2i/R)
sign −1 is the inverse rotation, which is the backward (the rotation is orthogonal). Rows and
heads are addressed by strides, so one kernel rotates MHA's q and k inside the fused QKV, GQA's
G key heads, and MLA's decoupled d_R dims (head stride 0 for its one shared k_pe).

    nvcc -O3 -std=c++17 dev/cuda/rope.cu -o /tmp/rope && /tmp/rope

version 1 (train_ctxkv.cu's): one thread per (b, t, head, pair); the cos/sin table is made on
the host exactly as the CPU program makes it, so both programs rotate by the same numbers.
*/
#include "common.h"

static void rope_rotate_cpu(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const float *cs,
                            const float *sn, int R, float sign) {
    const int half = R / 2;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < n_heads; h++) {
                float *v = x + ((size_t)b * T + t) * row_stride + (size_t)h * head_stride;
                for (int i = 0; i < half; i++) {
                    float c = cs[(pos0 + t) * half + i], si = sign * sn[(pos0 + t) * half + i], x1 = v[i], x2 = v[i + half];
                    v[i] = x1 * c - x2 * si;
                    v[i + half] = x2 * c + x1 * si;
                }
            }
}

__global__ void rope_rotate_kernel(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride,
                                   const float *cs, const float *sn, int half, float sign) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * n_heads * half) return;
    const int i = (int)(idx % half);
    size_t r = idx / half;
    const int h = (int)(r % n_heads);
    r /= n_heads;
    const int t = (int)(r % T), b = (int)(r / T);
    const float c = cs[(size_t)(pos0 + t) * half + i], si = sign * sn[(size_t)(pos0 + t) * half + i];
    float *v = x + ((size_t)b * T + t) * row_stride + (size_t)h * head_stride;
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * c - x2 * si;
    v[i + half] = x2 * c + x1 * si;
}

int main(int argc, char **argv) {
    (void)argc; (void)argv;
    // pythia-160m's fused QKV: 12 heads of 64, rotary 16 dims; rotate q (offset 0) with pos0 = 7
    const int B = SIZE(8, 2), T = SIZE(1024, 40), H = 12, D = 64, R = 16, C = H * D, max_len = 2048, pos0 = 7;
    const float base = 10000.0f;
    float *cs = (float *)malloc((size_t)max_len * (R / 2) * sizeof(float)), *sn = (float *)malloc((size_t)max_len * (R / 2) * sizeof(float));
    for (int i = 0; i < R / 2; i++) {
        float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)R);
        for (int p = 0; p < max_len; p++) { cs[p * (R / 2) + i] = cosf(p * inv_freq); sn[p * (R / 2) + i] = sinf(p * inv_freq); }
    }
    const size_t n = (size_t)B * T * 3 * C;
    float *qkv = make_random_float(n, 1.0f), *ref = (float *)malloc(n * sizeof(float));
    memcpy(ref, qkv, n * sizeof(float));
    rope_rotate_cpu(ref, B, T, pos0, 3 * C, H, 3 * D, cs, sn, R, 1.0f);
    float *d_x = to_device(qkv, n), *d_cos = to_device(cs, (size_t)max_len * (R / 2)), *d_sin = to_device(sn, (size_t)max_len * (R / 2));
    const size_t work = (size_t)B * T * H * (R / 2);
    auto fwd = [&](float sign) {
        rope_rotate_kernel<<<ceil_div(work, 256), 256>>>(d_x, B, T, pos0, 3 * C, H, 3 * D, d_cos, d_sin, R / 2, sign);
        cudaCheck(cudaGetLastError());
    };
    fwd(1.0f);
    printf("version 1\n");
    int ok = validate_result(d_x, ref, "rotated", n, 1e-6f);
    fwd(-1.0f); // the backward undoes it
    ok &= validate_result(d_x, qkv, "rotated back (backward)", n, 1e-6f);
    printf("  %.4f ms\n", benchmark_kernel([&]() { fwd(1.0f); }));
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
