/*
Causal softmax attention forward (train_ctxkv.c attention_forward) with the head map of
GQA/MQA: H query heads share G key/value heads, query head h reads KV head h / (H/G). Queries,
keys and values are read through head views (row stride, head stride), as in the program, so
one kernel serves MHA's interleaved QKV and the separate Q / KV of the other variants. Writes
the probabilities att (B,H,T,T) (zero above the diagonal, kept for backward) and out (B,T,H*Dv).

    nvcc -O3 -std=c++17 dev/cuda/attention_forward.cu -o /tmp/attention_forward && /tmp/attention_forward [1|2]

version 1: a block per query row (t, h, b); the row's scores in shared memory in fp32, block
           reductions for max and sum: train_ctxkv.cu's
version 2: a warp per query row (4 rows a block): warp reductions only, no __syncthreads
           between the steps of a row
Both are deliberately simple (no tiling of K/V through shared memory, no flash-style online
softmax): the scores of a row are materialised because backward needs them anyway.
*/
#include "common.h"

typedef struct { float *base; int row_stride, head_stride; } HeadView;
__host__ __device__ inline float *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

static void attention_forward_cpu(float *out, float *att, HeadView q, HeadView k, HeadView v, int B, int T, int H, int G,
                                  int Dqk, int Dv, float scale) {
    const int group = H / G;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            for (int t = 0; t < T; t++) {
                const float *qt = head_at(q, T, b, t, h);
                float *p = att + (((size_t)b * H + h) * T + t) * T;
                float mx = -INFINITY;
                for (int s = 0; s <= t; s++) {
                    float d = 0.0f;
                    for (int j = 0; j < Dqk; j++) d += qt[j] * head_at(k, T, b, s, g)[j];
                    p[s] = scale * d;
                    mx = fmaxf(mx, p[s]);
                }
                float sum = 0.0f;
                for (int s = 0; s <= t; s++) { p[s] = expf(p[s] - mx); sum += p[s]; }
                for (int s = 0; s < T; s++) p[s] = s <= t ? p[s] / sum : 0.0f;
                float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                for (int j = 0; j < Dv; j++) {
                    float acc = 0.0f;
                    for (int s = 0; s <= t; s++) acc += p[s] * head_at(v, T, b, s, g)[j];
                    o[j] = acc;
                }
            }
        }
}

__global__ void attention_forward_kernel1(float *out, float *att, HeadView q, HeadView k, HeadView v, int T, int H, int G,
                                          int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    float *qs = sm, *p = sm + Dqk;
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const float *qt = head_at(q, T, b, t, h);
    for (int j = threadIdx.x; j < Dqk; j += blockDim.x) qs[j] = qt[j];
    __syncthreads();
    float mx = -INFINITY;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        const float *ks = head_at(k, T, b, s, g);
        float d = 0.0f;
        for (int j = 0; j < Dqk; j++) d += qs[j] * ks[j];
        p[s] = scale * d;
        mx = fmaxf(mx, p[s]);
    }
    mx = block_reduce_max(mx);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) { p[s] = expf(p[s] - mx); sum += p[s]; }
    const float inv = 1.0f / block_reduce_sum(sum);
    float *arow = att + (((size_t)b * H + h) * T + t) * T;
    for (int s = threadIdx.x; s < T; s += blockDim.x) {
        float pn = s <= t ? p[s] * inv : 0.0f;
        if (s <= t) p[s] = pn;
        arow[s] = pn;
    }
    __syncthreads();
    float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += p[s] * head_at(v, T, b, s, g)[j];
        o[j] = acc;
    }
}

// 4 warps a block, one query row each; shared memory: 4 × (Dqk + T) floats
__global__ void attention_forward_kernel2(float *out, float *att, HeadView q, HeadView k, HeadView v, int T, int H, int G,
                                          int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = blockIdx.x * 4 + warp, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    if (t >= T) return; // whole warps only: no block barrier below
    float *qs = sm + (size_t)warp * (Dqk + T), *p = qs + Dqk;
    const float *qt = head_at(q, T, b, t, h);
    for (int j = lane; j < Dqk; j += 32) qs[j] = qt[j];
    __syncwarp();
    float mx = -INFINITY;
    for (int s = lane; s <= t; s += 32) {
        const float *ks = head_at(k, T, b, s, g);
        float d = 0.0f;
        for (int j = 0; j < Dqk; j++) d += qs[j] * ks[j];
        p[s] = scale * d;
        mx = fmaxf(mx, p[s]);
    }
    mx = warp_reduce_max(mx);
    float sum = 0.0f;
    for (int s = lane; s <= t; s += 32) { p[s] = expf(p[s] - mx); sum += p[s]; }
    const float inv = 1.0f / warp_reduce_sum(sum);
    float *arow = att + (((size_t)b * H + h) * T + t) * T;
    for (int s = lane; s < T; s += 32) {
        float pn = s <= t ? p[s] * inv : 0.0f;
        if (s <= t) p[s] = pn;
        arow[s] = pn;
    }
    __syncwarp();
    float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
    for (int j = lane; j < Dv; j += 32) {
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += p[s] * head_at(v, T, b, s, g)[j];
        o[j] = acc;
    }
}

int main(int argc, char **argv) {
    // pythia-160m-like heads with GQA (G = 3), T = 512; q and kv in separate buffers as gqa's
    const int B = SIZE(4, 2), T = SIZE(512, 40), H = 12, G = 3, D = SIZE(64, 16);
    const float scale = 1.0f / sqrtf((float)D);
    float *qh = make_random_float((size_t)B * T * H * D, 1.0f), *kvh = make_random_float((size_t)B * T * 2 * G * D, 1.0f);
    float *out = (float *)malloc((size_t)B * T * H * D * sizeof(float)), *att = (float *)malloc((size_t)B * H * T * T * sizeof(float));
    HeadView q = {qh, H * D, D}, k = {kvh, 2 * G * D, D}, v = {kvh + G * D, 2 * G * D, D};
    attention_forward_cpu(out, att, q, k, v, B, T, H, G, D, D, scale);
    float *d_q = to_device(qh, (size_t)B * T * H * D), *d_kv = to_device(kvh, (size_t)B * T * 2 * G * D);
    float *d_out = device_zeros((size_t)B * T * H * D), *d_att = device_zeros((size_t)B * H * T * T);
    HeadView dq = {d_q, H * D, D}, dk = {d_kv, 2 * G * D, D}, dv = {d_kv + G * D, 2 * G * D, D};
    int ok = 1;
    for (int ver = 1; ver <= 2; ver++) {
        if (!version_wanted(argc, argv, ver)) continue;
        const size_t smem = (ver == 1 ? 1 : 4) * (size_t)(D + T) * sizeof(float);
        auto run = [&]() {
            if (ver == 1) attention_forward_kernel1<<<dim3(T, H, B), 128, smem>>>(d_out, d_att, dq, dk, dv, T, H, G, D, D, scale);
            else attention_forward_kernel2<<<dim3(ceil_div(T, 4), H, B), 128, smem>>>(d_out, d_att, dq, dk, dv, T, H, G, D, D, scale);
            cudaCheck(cudaGetLastError());
        };
        run();
        printf("version %d\n", ver);
        ok &= validate_result(d_out, out, "out", (size_t)B * T * H * D, 1e-4f);
        ok &= validate_result(d_att, att, "att", (size_t)B * H * T * T, 1e-5f);
        float ms = benchmark_kernel(run);
        printf("  %.4f ms\n", ms);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
