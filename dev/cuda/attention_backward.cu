/*
Causal softmax attention backward (train_ctxkv.c attention_backward), GQA head map included:
  dP = dO·Vᵀ,  dS = P⊙(dP − rowsum(dP⊙P))·scale,  dQ += dS·K,  dK_g += Σ_h dSᵀ·Q,  dV_g += Σ_h Pᵀ·dO
accumulating into dq, dk, dv (views, as in the forward).

    nvcc -O3 -std=c++17 dev/cuda/attention_backward.cu -o /tmp/attention_backward && /tmp/attention_backward

version 1 (train_ctxkv.cu's): two kernels, so that every output row has exactly one writer and
no atomics are needed (the CPU program gets the same effect by running the heads that share a
KV head in one thread):
  - query side, a block per query row (t, h, b): dP and dS for s <= t (dS kept in datt), dq_t;
  - key side, a block per key row (s, g, b): dk_s, dv_s summed over the query rows t >= s of
    the H/G heads that read KV head g.
*/
#include "common.h"

typedef struct { float *base; int row_stride, head_stride; } HeadView;
__host__ __device__ inline float *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

static void attention_backward_cpu(HeadView dq, HeadView dk, HeadView dv, const float *dout, const float *att, HeadView q,
                                   HeadView k, HeadView v, int B, int T, int H, int G, int Dqk, int Dv, float scale) {
    const int group = H / G;
    float *dp = (float *)malloc(T * sizeof(float));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * T;
                const float *dot_ = dout + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                float rowsum = 0.0f;
                for (int s = 0; s <= t; s++) {
                    float d = 0.0f;
                    for (int j = 0; j < Dv; j++) d += dot_[j] * head_at(v, T, b, s, g)[j];
                    dp[s] = d;
                    for (int j = 0; j < Dv; j++) head_at(dv, T, b, s, g)[j] += p[s] * dot_[j];
                    rowsum += dp[s] * p[s];
                }
                for (int s = 0; s <= t; s++) {
                    float ds = p[s] * (dp[s] - rowsum) * scale;
                    for (int j = 0; j < Dqk; j++) {
                        head_at(dq, T, b, t, h)[j] += ds * head_at(k, T, b, s, g)[j];
                        head_at(dk, T, b, s, g)[j] += ds * head_at(q, T, b, t, h)[j];
                    }
                }
            }
        }
    free(dp);
}

__global__ void attention_backward_query_kernel(HeadView dq, float *datt, const float *dout, const float *att, HeadView k,
                                                HeadView v, int T, int H, int G, int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    float *dos = sm, *ds = sm + Dv;
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const float *dot_ = dout + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) dos[j] = dot_[j];
    __syncthreads();
    const float *p = att + (((size_t)b * H + h) * T + t) * T;
    float *dsrow = datt + (((size_t)b * H + h) * T + t) * T;
    float rowsum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        const float *vs = head_at(v, T, b, s, g);
        float d = 0.0f;
        for (int j = 0; j < Dv; j++) d += dos[j] * vs[j];
        ds[s] = d;
        rowsum += d * p[s];
    }
    rowsum = block_reduce_sum(rowsum);
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        ds[s] = p[s] * (ds[s] - rowsum) * scale;
        dsrow[s] = ds[s];
    }
    __syncthreads();
    float *dqt = head_at(dq, T, b, t, h);
    for (int j = threadIdx.x; j < Dqk; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += ds[s] * head_at(k, T, b, s, g)[j];
        dqt[j] += acc;
    }
}
__global__ void attention_backward_kv_kernel(HeadView dk, HeadView dv, const float *datt, const float *dout, const float *att,
                                             HeadView q, int T, int H, int G, int Dqk, int Dv) {
    const int s = blockIdx.x, g = blockIdx.y, b = blockIdx.z, group = H / G;
    float *dks = head_at(dk, T, b, s, g), *dvs = head_at(dv, T, b, s, g);
    for (int j = threadIdx.x; j < Dqk || j < Dv; j += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int h = g * group; h < (g + 1) * group; h++)
            for (int t = s; t < T; t++) {
                const size_t r = (((size_t)b * H + h) * T + t) * T + s;
                if (j < Dqk) ak += datt[r] * head_at(q, T, b, t, h)[j];
                if (j < Dv) av += att[r] * dout[((size_t)b * T + t) * H * Dv + (size_t)h * Dv + j];
            }
        if (j < Dqk) dks[j] += ak;
        if (j < Dv) dvs[j] += av;
    }
}

int main(int argc, char **argv) {
    (void)argc; (void)argv;
    const int B = 2, T = SIZE(256, 40), H = SIZE(12, 6), G = 3, D = SIZE(64, 16);
    const float scale = 1.0f / sqrtf((float)D);
    const size_t nq = (size_t)B * T * H * D, nkv = (size_t)B * T * 2 * G * D, natt = (size_t)B * H * T * T;
    float *qh = make_random_float(nq, 1.0f), *kvh = make_random_float(nkv, 1.0f), *dout = make_random_float(nq, 1.0f);
    // probabilities of the causal softmax of random scores (what the forward would have kept)
    float *att = (float *)calloc(natt, sizeof(float));
    for (size_t r = 0; r < (size_t)B * H * T; r++) {
        const int t = (int)(r % T);
        float sum = 0.0f;
        for (int s = 0; s <= t; s++) { att[r * T + s] = expf(2.0f * rand_uniform()); sum += att[r * T + s]; }
        for (int s = 0; s <= t; s++) att[r * T + s] /= sum;
    }
    float *dq0 = make_random_float(nq, 0.1f), *dkv0 = make_random_float(nkv, 0.1f);
    float *dqh = (float *)malloc(nq * sizeof(float)), *dkvh = (float *)malloc(nkv * sizeof(float));
    memcpy(dqh, dq0, nq * sizeof(float));
    memcpy(dkvh, dkv0, nkv * sizeof(float));
    attention_backward_cpu(HeadView{dqh, H * D, D}, HeadView{dkvh, 2 * G * D, D}, HeadView{dkvh + G * D, 2 * G * D, D}, dout, att,
                           HeadView{qh, H * D, D}, HeadView{kvh, 2 * G * D, D}, HeadView{kvh + G * D, 2 * G * D, D}, B, T, H, G, D, D, scale);
    float *d_q = to_device(qh, nq), *d_kv = to_device(kvh, nkv), *d_dout = to_device(dout, nq), *d_att = to_device(att, natt);
    float *d_dq = to_device(dq0, nq), *d_dkv = to_device(dkv0, nkv), *d_datt = device_zeros(natt);
    HeadView q = {d_q, H * D, D}, k = {d_kv, 2 * G * D, D}, v = {d_kv + G * D, 2 * G * D, D};
    HeadView dq = {d_dq, H * D, D}, dk = {d_dkv, 2 * G * D, D}, dv = {d_dkv + G * D, 2 * G * D, D};
    const size_t smem = (size_t)(D + T) * sizeof(float);
    auto run = [&]() {
        attention_backward_query_kernel<<<dim3(T, H, B), 128, smem>>>(dq, d_datt, d_dout, d_att, k, v, T, H, G, D, D, scale);
        attention_backward_kv_kernel<<<dim3(T, G, B), 128>>>(dk, dv, d_datt, d_dout, d_att, q, T, H, G, D, D);
        cudaCheck(cudaGetLastError());
    };
    run();
    printf("version 1\n");
    int ok = validate_result(d_dq, dqh, "dq", nq, 1e-4f);
    ok &= validate_result(d_dkv, dkvh, "dk and dv", nkv, 1e-4f);
    float ms = benchmark_kernel(run);
    printf("  %.4f ms\n", ms);
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
