/*
Causal softmax attention forward (train_ctxkv.c attention_forward) with the head map of
GQA/MQA: H query heads share G key/value heads, query head h reads KV head h / (H/G), and
MLA's widths (q·k over Dqk = D + d_R, values of Dv = D). Queries, keys and values are read
through head views (row stride, head stride), as in the program, so one kernel serves MHA's
interleaved QKV and the separate Q / KV of the other variants. out (B,T,H*Dv).

    nvcc -O3 -std=c++17 dev/cuda/attention_forward.cu -o /tmp/attention_forward && /tmp/attention_forward [1|2|3]

version 1: a block per query row (t, h, b); the row's scores in shared memory in fp32, block
           reductions for max and sum; writes the probabilities att (B,H,T,T). The kernel
           train_ctxkv.cu used before version 3, kept as the reference that version 3 is
           checked against.
version 2: as 1 with a warp per query row (4 rows a block): warp reductions only.
version 3 (train_ctxkv.cu's): FlashAttention-2's forward in O(B·H·T) memory: a block per tile
           of 16 query rows, keys and values through shared memory 32 at a time (a lane per
           key), the online softmax; writes only each row's logsumexp lse (B,H,T), from which
           the backward (attention_backward.cu version 2) recomputes P.
Cases: pythia-160m's heads (H 12, D 64) at B 2, T 1024 as GQA (G 3) and as MLA (G = H, Dqk 128:
--kv-rank 256 --rope-dim 64). Under the emulator (and with DEV_CUDA_QUICK=1): B 1, and the naive
versions at T 256 (at T 1024 they take minutes there), where version 3 also runs.
*/
#include "common.h"


// also lse (B,H,T): log Σ_s exp(score) of each row
static void attention_forward_cpu(float *out, float *att, float *lse, HeadView q, HeadView k, HeadView v, int B, int T, int H,
                                  int G, int Dqk, int Dv, float scale) {
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
                lse[((size_t)b * H + h) * T + t] = mx + logf(sum);
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

#define FA_KEYS 32  // keys per tile: one per lane
#define FA_WARPS 4  // warps per block
#define FA_ROWS 16  // query rows per block: FA_ROWS / FA_WARPS per warp


// shared memory: q (FA_ROWS, Dqk), o (FA_ROWS, Dv), K tile (FA_KEYS, Dqk+1), V tile (FA_KEYS, Dv+1),
// p (FA_WARPS, FA_KEYS)
__global__ void attention_forward_kernel3(float *out, float *lse, HeadView q, HeadView k, HeadView v, int T, int H, int G,
                                          int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    const int q0 = blockIdx.x * FA_ROWS, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, KS = Dqk + 1, VS = Dv + 1;
    float *qs = sm, *os = qs + FA_ROWS * Dqk, *ks = os + FA_ROWS * Dv, *vs = ks + FA_KEYS * KS, *ps = vs + FA_KEYS * VS + warp * FA_KEYS;
    const int rows = min(FA_ROWS, T - q0), last = q0 + rows - 1;
    load_rows(qs, Dqk, q, T, b, h, q0, rows, Dqk, last);
    for (int e = threadIdx.x; e < FA_ROWS * Dv; e += blockDim.x) os[e] = 0.0f;
    float m_row[FA_ROWS / FA_WARPS], l_row[FA_ROWS / FA_WARPS];
    for (int i = 0; i < FA_ROWS / FA_WARPS; i++) { m_row[i] = -INFINITY; l_row[i] = 0.0f; }
    for (int k0 = 0; k0 <= last; k0 += FA_KEYS) {
        __syncthreads();
        load_rows(ks, KS, k, T, b, g, k0, FA_KEYS, Dqk, last);
        load_rows(vs, VS, v, T, b, g, k0, FA_KEYS, Dv, last);
        __syncthreads();
        for (int i = 0; i < FA_ROWS / FA_WARPS; i++) {
            const int r = warp + FA_WARPS * i, t = q0 + r;
            if (r >= rows || t < k0) continue;
            const int n = min(FA_KEYS, t - k0 + 1);
            float score = -INFINITY;
            if (lane < n) score = scale * smem_dot(qs + r * Dqk, ks + lane * KS, Dqk);
            const float m_new = fmaxf(m_row[i], warp_reduce_max(score));
            const float p = lane < n ? expf(score - m_new) : 0.0f, alpha = expf(m_row[i] - m_new);
            l_row[i] = l_row[i] * alpha + warp_reduce_sum(p);
            m_row[i] = m_new;
            ps[lane] = p;
            __syncwarp();
            for (int j = lane; j < Dv; j += 32) {
                float acc = os[r * Dv + j] * alpha;
                for (int u = 0; u < n; u++) acc += ps[u] * vs[u * VS + j];
                os[r * Dv + j] = acc;
            }
            __syncwarp();
        }
    }
    for (int i = 0; i < FA_ROWS / FA_WARPS; i++) {
        const int r = warp + FA_WARPS * i, t = q0 + r;
        if (r >= rows) continue;
        const float inv = 1.0f / l_row[i];
        float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
        for (int j = lane; j < Dv; j += 32) o[j] = os[r * Dv + j] * inv;
        if (lane == 0) lse[((size_t)b * H + h) * T + t] = m_row[i] + logf(l_row[i]);
    }
}

// one case: B sequences of T tokens, H query heads over G KV heads, widths Dqk and Dv; q and kv
// in separate buffers, as gqa's and mla's (kv: the G key heads, then the G value heads)
static int run_case(const char *name, int argc, char **argv, int B, int T, int T_naive, int H, int G, int Dqk, int Dv) {
    const float scale = 1.0f / sqrtf((float)Dqk);
    const int KV = G * (Dqk + Dv);
    printf("%s: B %d, T %d, H %d, G %d, Dqk %d, Dv %d\n", name, B, T, H, G, Dqk, Dv);
    float *qh = make_random_float((size_t)B * T * H * Dqk, 1.0f), *kvh = make_random_float((size_t)B * T * KV, 1.0f);
    float *d_q = to_device(qh, (size_t)B * T * H * Dqk), *d_kv = to_device(kvh, (size_t)B * T * KV);
    int ok = 1;
    float *flash_out = NULL; // version 3's result at T_naive, checked against version 1's
    for (int pass = 0; pass < 2; pass++) { // pass 0 at T_naive (every version), pass 1 at T (version 3) when longer
        const int Tp = pass == 0 ? T_naive : T;
        if (pass == 1 && T == T_naive) break;
        const size_t nout = (size_t)B * Tp * H * Dv, natt = (size_t)B * H * Tp * Tp;
        float *out = (float *)malloc(nout * sizeof(float)), *att = (float *)malloc(natt * sizeof(float));
        float *lse = (float *)malloc((size_t)B * H * Tp * sizeof(float));
        // the buffers hold B·T rows; with Tp < T their first B·Tp rows are read as B sequences of Tp
        HeadView q = {qh, H * Dqk, Dqk}, k = {kvh, KV, Dqk}, v = {kvh + G * Dqk, KV, Dv};
        attention_forward_cpu(out, att, lse, q, k, v, B, Tp, H, G, Dqk, Dv, scale);
        HeadView dq = {d_q, H * Dqk, Dqk}, dk = {d_kv, KV, Dqk}, dv = {d_kv + G * Dqk, KV, Dv};
        float *d_out = device_zeros(nout), *d_lse = device_zeros((size_t)B * H * Tp), *d_att = pass == 0 ? device_zeros(natt) : NULL;
        for (int ver = pass == 0 ? 1 : 3; ver <= 3; ver++) {
            if (!version_wanted(argc, argv, ver)) continue;
            const size_t smem = ver == 3 ? (size_t)(FA_ROWS * (Dqk + Dv) + FA_KEYS * (Dqk + 1 + Dv + 1) + FA_WARPS * FA_KEYS) * sizeof(float)
                                         : (ver == 1 ? 1 : 4) * (size_t)(Dqk + Tp) * sizeof(float);
            if (smem > 48 * 1024) cudaCheck(cudaFuncSetAttribute(ver == 1 ? attention_forward_kernel1 : ver == 2 ? attention_forward_kernel2 : attention_forward_kernel3,
                                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
            auto run = [&]() {
                if (ver == 1) attention_forward_kernel1<<<dim3(Tp, H, B), 128, smem>>>(d_out, d_att, dq, dk, dv, Tp, H, G, Dqk, Dv, scale);
                else if (ver == 2) attention_forward_kernel2<<<dim3(ceil_div(Tp, 4), H, B), 128, smem>>>(d_out, d_att, dq, dk, dv, Tp, H, G, Dqk, Dv, scale);
                else attention_forward_kernel3<<<dim3(ceil_div(Tp, FA_ROWS), H, B), FA_WARPS * 32, smem>>>(d_out, d_lse, dq, dk, dv, Tp, H, G, Dqk, Dv, scale);
                cudaCheck(cudaGetLastError());
            };
            run();
            printf("  version %d, T %d\n", ver, Tp);
            ok &= validate_result(d_out, out, "out", nout, 1e-4f);
            if (ver < 3) ok &= validate_result(d_att, att, "att", natt, 1e-5f);
            else ok &= validate_result(d_lse, lse, "lse", (size_t)B * H * Tp, 1e-5f);
            if (ver == 1 && pass == 0) { // the naive kernel's output, for version 3 to match
                flash_out = (float *)malloc(nout * sizeof(float));
                cudaCheck(cudaMemcpy(flash_out, d_out, nout * sizeof(float), cudaMemcpyDeviceToHost));
            } else if (ver == 3 && pass == 0 && flash_out) {
                ok &= validate_result(d_out, flash_out, "out against version 1", nout, 1e-5f);
            }
            printf("    %.4f ms\n", benchmark_kernel(run));
        }
        cudaCheck(cudaFree(d_out)); cudaCheck(cudaFree(d_lse)); if (d_att) cudaCheck(cudaFree(d_att));
        free(out); free(att); free(lse);
    }
    free(flash_out); free(qh); free(kvh);
    cudaCheck(cudaFree(d_q)); cudaCheck(cudaFree(d_kv));
    return ok;
}

int main(int argc, char **argv) {
    // pythia-160m's heads
    const int B = SIZE(2, 1), T = 1024, T_naive = SIZE(1024, 256);
    int ok = run_case("gqa (pythia-160m, --n-kv-head 3)", argc, argv, B, T, T_naive, 12, 3, 64, 64);
    ok &= run_case("mla (pythia-160m, --kv-rank 256 --rope-dim 64)", argc, argv, B, T, T_naive, 12, 12, 128, 64);
    printf("%s\n", ok ? "all versions match the CPU reference" : "MISMATCH");
    return ok ? 0 : 1;
}
