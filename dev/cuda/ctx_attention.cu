/*
Context-KV attention, forward and backward (train_ctxkv.c ctx_attention_forward / _backward):
layer 0 of a ctxkv model. Query t attends over M slots; slot k holds the key/value of the
context at s = t − k·I while s >= 0, empty slots are masked out (probability 0). No positional
encoding. q, kc, vc (B,T,H*D), kc/vc indexed by the source position s.

    nvcc -O3 -std=c++17 dev/cuda/ctx_attention.cu -o /tmp/ctx_attention && /tmp/ctx_attention [1|2]

version 1: forward a block per query row (t, h, b), slot scores in shared memory, writing the
probabilities att (B,H,T,M); backward as attention_backward's version 1: the query side per
query row (dS into datt, dq), the source side per source row (s, h, b), which gathers the query
rows t = s + k·I (k < M) that read it through slot k. One writer per output row, no atomics.
The kernels train_ctxkv.cu used before version 2, kept as its reference.
version 2 (train_ctxkv.cu's): nothing of size M per row is kept. The forward writes each row's
logsumexp lse (B,H,T); the backward recomputes P from it and takes rowsum(dP⊙P) as
D = rowsum(dO⊙O): the query side per query row (dS in shared memory), the source side a warp
per source row (two warp reductions per slot).
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

__global__ void ctx_attention_forward_kernel2(float *out, float *lse, const float *q, const float *kc, const float *vc, int T,
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
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += qs[j] * kc[((size_t)b * T + t - k * I) * C + h * D + j];
        p[k] = scale * d;
        mx = fmaxf(mx, p[k]);
    }
    mx = block_reduce_max(mx);
    float sum = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) { p[k] = expf(p[k] - mx); sum += p[k]; }
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) lse[((size_t)b * H + h) * T + t] = mx + logf(sum);
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += p[k] * vc[((size_t)b * T + t - k * I) * C + h * D + j];
        out[((size_t)b * T + t) * C + h * D + j] = acc / sum;
    }
}
__global__ void ctx_attention_backward_query_kernel2(float *dq, const float *dout, const float *lse, const float *Drow, const float *q,
                                                     const float *kc, const float *vc, int T, int H, int D, int I, int M) {
    extern __shared__ float sm[];
    float *qs = sm, *dos = sm + D, *ds = sm + 2 * D;
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t row = ((size_t)b * H + h) * T + t, at_t = ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { qs[j] = q[at_t + j]; dos[j] = dout[at_t + j]; }
    __syncthreads();
    const int n = min(M, t / I + 1);
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const size_t src = ((size_t)b * T + t - k * I) * C + h * D;
        float sc = 0.0f, dp = 0.0f;
        for (int j = 0; j < D; j++) { sc += qs[j] * kc[src + j]; dp += dos[j] * vc[src + j]; }
        ds[k] = expf(scale * sc - lse[row]) * (dp - Drow[row]) * scale;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += ds[k] * kc[((size_t)b * T + t - k * I) * C + h * D + j];
        dq[at_t + j] += acc;
    }
}
__global__ void ctx_attention_backward_source_kernel2(float *dkc, float *dvc, const float *dout, const float *lse, const float *Drow,
                                                      const float *q, const float *kc, const float *vc, int T, int H, int D, int I, int M) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int s = blockIdx.x * (blockDim.x / 32) + warp, h = blockIdx.y, b = blockIdx.z, C = H * D;
    if (s >= T) return;
    const float scale = 1.0f / sqrtf((float)D);
    float *ak = sm + (size_t)warp * 2 * D, *av = ak + D;
    const size_t at_s = ((size_t)b * T + s) * C + h * D;
    for (int j = lane; j < D; j += 32) ak[j] = av[j] = 0.0f;
    for (int k = 0; k < M && s + k * I < T; k++) {
        const int t = s + k * I;
        const size_t row = ((size_t)b * H + h) * T + t, at_t = ((size_t)b * T + t) * C + h * D;
        float sc = 0.0f, dp = 0.0f;
        for (int j = lane; j < D; j += 32) { sc += q[at_t + j] * kc[at_s + j]; dp += dout[at_t + j] * vc[at_s + j]; }
        sc = warp_reduce_sum(sc);
        dp = warp_reduce_sum(dp);
        const float p = expf(scale * sc - lse[row]), ds = p * (dp - Drow[row]) * scale;
        for (int j = lane; j < D; j += 32) { ak[j] += ds * q[at_t + j]; av[j] += p * dout[at_t + j]; }
    }
    for (int j = lane; j < D; j += 32) { dkc[at_s + j] += ak[j]; dvc[at_s + j] += av[j]; }
}

int main(int argc, char **argv) {
    const int B = SIZE(2, 1), T = 512, H = 8, D = 64, I = 32, M = 16, C = H * D; // pythia-70m width, slots reaching 480 back (the emulator: B 1)
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
    int ok = 1;
    if (version_wanted(argc, argv, 1)) {
        fwd();
        bwd();
        printf("version 1\n");
        ok &= validate_result(d_out, out, "out", n, 1e-4f);
        ok &= validate_result(d_att, att, "att", natt, 1e-5f);
        ok &= validate_result(d_dq, dq, "dq", n, 1e-4f);
        ok &= validate_result(d_dkc, dkc, "dkc", n, 1e-4f);
        ok &= validate_result(d_dvc, dvc, "dvc", n, 1e-4f);
        printf("  forward %.4f ms, backward %.4f ms\n", benchmark_kernel(fwd), benchmark_kernel(bwd));
    }
    if (version_wanted(argc, argv, 2)) {
        // lse from the CPU's probabilities: log Σ exp(score) = score_k − log p_k for any filled slot (k = 0)
        float *lse = (float *)malloc((size_t)B * H * T * sizeof(float));
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++)
                for (int t = 0; t < T; t++) {
                    float d = 0.0f;
                    for (int j = 0; j < D; j++) d += q[((size_t)b * T + t) * C + h * D + j] * kc[((size_t)b * T + t) * C + h * D + j];
                    lse[((size_t)b * H + h) * T + t] = d / sqrtf((float)D) - logf(att[(((size_t)b * H + h) * T + t) * M]);
                }
        float *d_lse = device_zeros((size_t)B * H * T), *d_D = device_zeros((size_t)B * H * T);
        float *d_out2 = device_zeros(n), *d_dq2 = device_zeros(n), *d_dkc2 = device_zeros(n), *d_dvc2 = device_zeros(n);
        auto fwd2 = [&]() {
            ctx_attention_forward_kernel2<<<dim3(T, H, B), 128, smem>>>(d_out2, d_lse, d_q, d_kc, d_vc, T, H, D, I, M);
            cudaCheck(cudaGetLastError());
        };
        auto bwd2 = [&]() {
            attention_row_dot_kernel<<<ceil_div((long)B * T * H, 4), 128>>>(d_D, d_dout, d_out2, T, H, D, B * T * H);
            ctx_attention_backward_query_kernel2<<<dim3(T, H, B), 128, (size_t)(2 * D + M) * sizeof(float)>>>(d_dq2, d_dout, d_lse, d_D, d_q, d_kc, d_vc, T, H, D, I, M);
            ctx_attention_backward_source_kernel2<<<dim3(ceil_div(T, 4), H, B), 128, (size_t)8 * D * sizeof(float)>>>(d_dkc2, d_dvc2, d_dout, d_lse, d_D, d_q, d_kc, d_vc, T, H, D, I, M);
            cudaCheck(cudaGetLastError());
        };
        fwd2();
        bwd2();
        printf("version 2\n");
        ok &= validate_result(d_out2, out, "out", n, 1e-4f);
        ok &= validate_result(d_lse, lse, "lse", (size_t)B * H * T, 1e-5f);
        ok &= validate_result(d_dq2, dq, "dq", n, 1e-4f);
        ok &= validate_result(d_dkc2, dkc, "dkc", n, 1e-4f);
        ok &= validate_result(d_dvc2, dvc, "dvc", n, 1e-4f);
        printf("  forward %.4f ms, backward %.4f ms\n", benchmark_kernel(fwd2), benchmark_kernel(bwd2));
        free(lse);
    }
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
