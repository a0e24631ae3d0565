/*
Context-KV attention, forward and backward (train_ctxkv.c ctx_attention_forward / _backward):
layer 0 of a ctxkv model. Query t attends over M slots; slot k holds the key/value of the
context at s = t − k·I while s >= 0, empty slots are masked out (probability 0). No positional
encoding. q, kc, vc (B,T,H*D), kc/vc indexed by the source position s; att (B,H,T,M).

    nvcc -O3 -std=c++17 dev/cuda/ctx_attention.cu -o /tmp/ctx_attention && /tmp/ctx_attention

version 1 (train_ctxkv.cu's): forward a block per query row (t, h, b), slot scores in shared
memory; backward as attention_backward: the query side per query row (dS into datt, dq), the
source side per source row (s, h, b), which gathers the query rows t = s + k·I (k < M) that
read it through slot k. One writer per output row, no atomics.
*/
#include "common.h"

static void ctx_attention_forward_cpu(float *out, float *att, const float *q, const float *kc, const float *vc, int B, int T,
                                      int H, int D, int I, int M) {
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * C + h * D;
                float *p = att + (((size_t)b * H + h) * T + t) * M;
                int n = 0;
                float mx = -INFINITY;
                for (int k = 0; k < M && t - k * I >= 0; k++, n++) {
                    float d = 0.0f;
                    for (int j = 0; j < D; j++) d += qt[j] * kc[((size_t)b * T + t - k * I) * C + h * D + j];
                    p[k] = scale * d;
                    mx = fmaxf(mx, p[k]);
                }
                float sum = 0.0f;
                for (int k = 0; k < n; k++) { p[k] = expf(p[k] - mx); sum += p[k]; }
                for (int k = 0; k < M; k++) p[k] = k < n ? p[k] / sum : 0.0f;
                for (int j = 0; j < D; j++) {
                    float acc = 0.0f;
                    for (int k = 0; k < n; k++) acc += p[k] * vc[((size_t)b * T + t - k * I) * C + h * D + j];
                    out[((size_t)b * T + t) * C + h * D + j] = acc;
                }
            }
}

static void ctx_attention_backward_cpu(float *dq, float *dkc, float *dvc, const float *dout, const float *att, const float *q,
                                       const float *kc, const float *vc, int B, int T, int H, int D, int I, int M) {
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    float *dp = (float *)malloc(M * sizeof(float));
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * M;
                const float *dot_ = dout + ((size_t)b * T + t) * C + h * D, *qt = q + ((size_t)b * T + t) * C + h * D;
                float rowsum = 0.0f;
                int n = 0;
                for (int k = 0; k < M && t - k * I >= 0; k++, n++) {
                    size_t src = ((size_t)b * T + t - k * I) * C + h * D;
                    float d = 0.0f;
                    for (int j = 0; j < D; j++) { d += dot_[j] * vc[src + j]; dvc[src + j] += p[k] * dot_[j]; }
                    dp[k] = d;
                    rowsum += d * p[k];
                }
                for (int k = 0; k < n; k++) {
                    size_t src = ((size_t)b * T + t - k * I) * C + h * D;
                    float ds = p[k] * (dp[k] - rowsum) * scale;
                    for (int j = 0; j < D; j++) {
                        dq[((size_t)b * T + t) * C + h * D + j] += ds * kc[src + j];
                        dkc[src + j] += ds * qt[j];
                    }
                }
            }
    free(dp);
}

__global__ void ctx_attention_forward_kernel(float *out, float *att, const float *q, const float *kc, const float *vc, int T,
                                             int H, int D, int I, int M) {
    extern __shared__ float sm[];
    float *qs = sm, *p = sm + D;
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    for (int j = threadIdx.x; j < D; j += blockDim.x) qs[j] = q[((size_t)b * T + t) * C + h * D + j];
    __syncthreads();
    const int n = min(M, t / I + 1);
    float mx = -INFINITY;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const float *ks = kc + ((size_t)b * T + t - k * I) * C + h * D;
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += qs[j] * ks[j];
        p[k] = scale * d;
        mx = fmaxf(mx, p[k]);
    }
    mx = block_reduce_max(mx);
    float sum = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) { p[k] = expf(p[k] - mx); sum += p[k]; }
    const float inv = 1.0f / block_reduce_sum(sum);
    float *arow = att + (((size_t)b * H + h) * T + t) * M;
    for (int k = threadIdx.x; k < M; k += blockDim.x) {
        float pn = k < n ? p[k] * inv : 0.0f;
        if (k < n) p[k] = pn;
        arow[k] = pn;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += p[k] * vc[((size_t)b * T + t - k * I) * C + h * D + j];
        out[((size_t)b * T + t) * C + h * D + j] = acc;
    }
}

__global__ void ctx_attention_backward_query_kernel(float *dq, float *datt, const float *dout, const float *att, const float *kc,
                                                    const float *vc, int T, int H, int D, int I, int M) {
    extern __shared__ float sm[];
    float *dos = sm, *ds = sm + D;
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    for (int j = threadIdx.x; j < D; j += blockDim.x) dos[j] = dout[((size_t)b * T + t) * C + h * D + j];
    __syncthreads();
    const int n = min(M, t / I + 1);
    const float *p = att + (((size_t)b * H + h) * T + t) * M;
    float *dsrow = datt + (((size_t)b * H + h) * T + t) * M;
    float rowsum = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const float *vs = vc + ((size_t)b * T + t - k * I) * C + h * D;
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += dos[j] * vs[j];
        ds[k] = d;
        rowsum += d * p[k];
    }
    rowsum = block_reduce_sum(rowsum);
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        ds[k] = p[k] * (ds[k] - rowsum) * scale;
        dsrow[k] = ds[k];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += ds[k] * kc[((size_t)b * T + t - k * I) * C + h * D + j];
        dq[((size_t)b * T + t) * C + h * D + j] += acc;
    }
}
__global__ void ctx_attention_backward_source_kernel(float *dkc, float *dvc, const float *datt, const float *dout, const float *att,
                                                     const float *q, int T, int H, int D, int I, int M) {
    const int s = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int k = 0; k < M && s + k * I < T; k++) {
            const int t = s + k * I;
            const size_t r = (((size_t)b * H + h) * T + t) * M + k;
            ak += datt[r] * q[((size_t)b * T + t) * C + h * D + j];
            av += att[r] * dout[((size_t)b * T + t) * C + h * D + j];
        }
        dkc[((size_t)b * T + s) * C + h * D + j] += ak;
        dvc[((size_t)b * T + s) * C + h * D + j] += av;
    }
}

int main(int argc, char **argv) {
    (void)argc; (void)argv;
    const int B = SIZE(4, 2), T = SIZE(512, 60), H = SIZE(8, 4), D = SIZE(64, 16), I = SIZE(32, 3), M = SIZE(16, 5), C = H * D; // pythia-70m width, slots reaching 480 back
    const size_t n = (size_t)B * T * C, natt = (size_t)B * H * T * M;
    float *q = make_random_float(n, 1.0f), *kc = make_random_float(n, 1.0f), *vc = make_random_float(n, 1.0f), *dout = make_random_float(n, 1.0f);
    float *out = (float *)malloc(n * sizeof(float)), *att = (float *)malloc(natt * sizeof(float));
    ctx_attention_forward_cpu(out, att, q, kc, vc, B, T, H, D, I, M);
    float *dq = (float *)calloc(n, sizeof(float)), *dkc = (float *)calloc(n, sizeof(float)), *dvc = (float *)calloc(n, sizeof(float));
    ctx_attention_backward_cpu(dq, dkc, dvc, dout, att, q, kc, vc, B, T, H, D, I, M);
    float *d_q = to_device(q, n), *d_kc = to_device(kc, n), *d_vc = to_device(vc, n), *d_dout = to_device(dout, n);
    float *d_out = device_zeros(n), *d_att = device_zeros(natt), *d_datt = device_zeros(natt);
    float *d_dq = device_zeros(n), *d_dkc = device_zeros(n), *d_dvc = device_zeros(n);
    const size_t smem = (size_t)(D + M) * sizeof(float);
    auto fwd = [&]() {
        ctx_attention_forward_kernel<<<dim3(T, H, B), 128, smem>>>(d_out, d_att, d_q, d_kc, d_vc, T, H, D, I, M);
        cudaCheck(cudaGetLastError());
    };
    auto bwd = [&]() {
        ctx_attention_backward_query_kernel<<<dim3(T, H, B), 128, smem>>>(d_dq, d_datt, d_dout, d_att, d_kc, d_vc, T, H, D, I, M);
        ctx_attention_backward_source_kernel<<<dim3(T, H, B), 128>>>(d_dkc, d_dvc, d_datt, d_dout, d_att, d_q, T, H, D, I, M);
        cudaCheck(cudaGetLastError());
    };
    fwd();
    bwd();
    printf("version 1\n");
    int ok = validate_result(d_out, out, "out", n, 1e-4f);
    ok &= validate_result(d_att, att, "att", natt, 1e-5f);
    ok &= validate_result(d_dq, dq, "dq", n, 1e-4f);
    ok &= validate_result(d_dkc, dkc, "dkc", n, 1e-4f);
    ok &= validate_result(d_dvc, dvc, "dvc", n, 1e-4f);
    printf("  forward %.4f ms, backward %.4f ms\n", benchmark_kernel(fwd), benchmark_kernel(bwd));
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
