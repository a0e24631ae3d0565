/*
train_ctxkv.cu: the CUDA mirror of train_ctxkv.c (cuBLASLt, bf16 + fp32 master weights). The same
model in the same sections, in the same order, under the same function names: read the two side
by side. Everything around the model (command line, config, checkpoints, data, evaluation, the
training driver and main) is the shared code in ctxkv/, so both programs take the same flags,
give the same errors, and read and write the same files.

What differs is where the numbers live and who computes them:
  - Parameters, activations, gradients and optimizer state are on the GPU. The parameters
    the layers read (params_dev) and the activations are floatX: bf16 by default, float
    with PRECISION=FP32 (make train_ctxkv_cu PRECISION=FP32), the build to compare with the
    CPU: it differs from it only in summation order. AdamW updates fp32 master weights
    (master_dev) and writes the bf16 copy; reductions, softmax and statistics run in fp32.
  - params_memory is, as in the CPU program, the fp32 host copy in checkpoint order: the
    shared host code (init, load, save, --init-from, the context-block file) works on it and
    model_to_device / model_to_host move it. On the GPU each tensor starts on a 256-byte
    boundary (ParamTensor.dev_offset), so cuBLASLt always gets well-aligned operands.
  - Every matmul is cuBLASLt (fp32 accumulation, the bias epilogue in the forward); the
    other layers are the kernels below, one simple kernel (or two) per CPU loop nest. The
    kernels use no atomics: every reduction has a fixed order, so they repeat bit for bit.
  - Backward functions ACCUMULATE (+=) as on the CPU. Attention backward is split in two
    kernels (the query side per query row, the key/value side per key row) so that no two
    threads add into one element.

Sections (as train_ctxkv.c's): CUDA helpers (this file only), Layers, The model, The attention
core, Attention variants (MHA, GQA/MQA, MLA, Context-KV, then ATTN_VARIANTS), The whole model,
KV-cached decoding (the KV policies' logic is shared, ctxkv/kvpolicy.h and ctxkv/decode.h; here
kv_gather_kernel moves the slots a policy keeps).

Build: make train_ctxkv_cu [PRECISION=FP32] [GPU_COMPUTE_CAPABILITY=90].  Usage: ./train_ctxkv_cu -h
Checks: test_ctxkv_cu.cu (on a GPU); make cuda-emu runs it on the CPU through dev/cuda/emu.
*/
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <algorithm>
// test_ctxkv_cu links the CPU program too, which already holds stb_ds's implementation
#ifndef CTXKV_STB_EXTERNAL
#define STB_DS_IMPLEMENTATION
#endif
#include "ctxkv/utils.h"
#include "ctxkv/config.h"

// ----------------------------------------------------------------------------
// CUDA: precision, error checks, device memory, reductions. (The CPU program's v8 SIMD
// helpers have no counterpart: a kernel's threads are its vector lanes.)

#ifdef ENABLE_FP32
typedef float floatX;                 // PRECISION=FP32: everything fp32, for exact comparison
#define PRECISION_NAME "fp32"
#define CUDA_LOWP CUDA_R_32F
#else
typedef __nv_bfloat16 floatX;         // default: bf16 parameters and activations, fp32 master weights
#define PRECISION_NAME "bf16 (fp32 master weights)"
#define CUDA_LOWP CUDA_R_16BF
#endif

__host__ __device__ inline float tof(float x) { return x; }
__host__ __device__ inline float tof(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline floatX fx(float x) {
#ifdef ENABLE_FP32
    return x;
#else
    return __float2bfloat16(x); // round to nearest even
#endif
}

#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)
static void cuda_check(cudaError_t e, const char *what, const char *file, int line) {
    if (e != cudaSuccess) die("CUDA error '%s' at %s:%d in %s", cudaGetErrorString(e), file, line, what);
}
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)
static void cublas_check(cublasStatus_t s, const char *what, const char *file, int line) {
    if (s != CUBLAS_STATUS_SUCCESS) die("cuBLAS error '%s' at %s:%d in %s", cublasGetStatusString(s), file, line, what);
}
// after every kernel launch: a bad launch configuration fails here, naming the line
#define launchCheck() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

static void *cuda_malloc_check(size_t n, const char *what) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, n ? n : 1);
    if (e != cudaSuccess) die("out of GPU memory allocating %zu bytes for %s (%s)", n, what, cudaGetErrorString(e));
    return p;
}

static void *cuda_calloc_check(size_t n, const char *what) {
    void *p = cuda_malloc_check(n, what);
    cudaCheck(cudaMemset(p, 0, n ? n : 1));
    return p;
}

static void cuda_free(void *p) { if (p) cudaCheck(cudaFree(p)); }

// Grow-only device scratch, one per use, for the temporaries the CPU program keeps on its
// stack or mallocs per call (column-sum partials, the grad-norm partials, ...).
enum { TMP_COLSUM, TMP_NORM, TMP_BUCKETS, TMP_OACD, TMP_EMB, TMP_FLAGS, TMP_UPLOAD, TMP_IDS, TMP_KEEP, TMP_SPLITS, TMP_ATT_ROWS, N_TMP };
static void *tmp_ptr[N_TMP];
static size_t tmp_cap[N_TMP];
static void *dev_temp(int slot, size_t bytes) {
    if (bytes > tmp_cap[slot]) {
        cuda_free(tmp_ptr[slot]); // cudaFree waits for the kernels that still use it
        tmp_ptr[slot] = cuda_malloc_check(bytes, "GPU scratch");
        tmp_cap[slot] = bytes;
    }
    return tmp_ptr[slot];
}

static int ceil_div(size_t a, size_t b) { return (int)((a + b - 1) / b); }

// cuBLASLt state: one handle, one workspace (32 MiB, what Hopper's kernels ask for)
static cublasLtHandle_t cublaslt_handle;
static void *cublaslt_workspace;
static const size_t CUBLASLT_WORKSPACE = (size_t)32 << 20;
static int cuda_ready;
static cudaDeviceProp device_prop;

// First use of the GPU: everything that needs no GPU (flags, --kv-report, header checks)
// has run by then, so those behave exactly as on the CPU even on a machine without one.
static void cuda_init(void) {
    if (cuda_ready) return;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        die("no CUDA device (%s): train_ctxkv_cu needs an NVIDIA GPU; ./train_ctxkv is the CPU program",
            e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    cudaCheck(cudaSetDevice(0));
    cudaCheck(cudaGetDeviceProperties(&device_prop, 0));
    cublasCheck(cublasLtCreate(&cublaslt_handle));
    cublaslt_workspace = cuda_malloc_check(CUBLASLT_WORKSPACE, "cuBLASLt workspace");
    cuda_ready = 1;
}

// host fp32 -> device floatX (through an fp32 staging buffer on the device)
__global__ void cast_to_floatX_kernel(floatX *dst, const float *src, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = fx(src[i]);
}
static void upload_floats(floatX *dst, const float *src_host, size_t n) {
    if (n == 0) return;
    float *stage = (float *)dev_temp(TMP_UPLOAD, n * sizeof(float));
    cudaCheck(cudaMemcpy(stage, src_host, n * sizeof(float), cudaMemcpyHostToDevice));
    cast_to_floatX_kernel<<<ceil_div(n, 256), 256>>>(dst, stage, n);
    launchCheck();
}
// device floatX -> host fp32
static void download_floats(float *dst_host, const floatX *src, size_t n) {
    if (n == 0) return;
#ifdef ENABLE_FP32
    cudaCheck(cudaMemcpy(dst_host, src, n * sizeof(float), cudaMemcpyDeviceToHost));
#else
    floatX *tmp = (floatX *)malloc_check(n * sizeof(floatX), "download");
    cudaCheck(cudaMemcpy(tmp, src, n * sizeof(floatX), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) dst_host[i] = tof(tmp[i]);
    free(tmp);
#endif
}
static int *upload_ids(int slot, const int *ids_host, size_t n) {
    int *d = (int *)dev_temp(slot, n * sizeof(int));
    cudaCheck(cudaMemcpy(d, ids_host, n * sizeof(int), cudaMemcpyHostToDevice));
    return d;
}

// Reductions over a warp and over a block (blockDim.x a multiple of 32). Every thread of the
// block must call the block versions; they return the result to all of them.
__device__ inline float warp_reduce_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ inline float warp_reduce_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ float block_reduce_sum(float v) {
    __shared__ float sh[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_reduce_sum(v);
    __syncthreads(); // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_reduce_sum(lane < nw ? sh[lane] : 0.0f);
}
__device__ float block_reduce_max(float v) {
    __shared__ float sh[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    v = warp_reduce_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_reduce_max(lane < nw ? sh[lane] : -INFINITY);
}

// Sums over rows of something (N,C) per column i, added into dst (C): the weight gradients of
// LayerNorm/RMSNorm and the bias gradients. Deterministic: each block sums a fixed strided set
// of rows for 32 columns into a partial, and a second kernel adds the partials in order. F is a
// functor: f(n, i) is the term of row n, column i.
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
__global__ void colsum_finish_kernel(floatX *dst, const float *partial, int splits, int C) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= C) return;
    float s = 0.0f;
    for (int y = 0; y < splits; y++) s += partial[(size_t)y * C + i];
    dst[i] = fx(tof(dst[i]) + s);
}
template <class F> static void column_sum_add(floatX *dst, int N, int C, F f) {
    int splits = ceil_div(N, 256); // ~256 rows per split, at most 128 splits
    if (splits > 128) splits = 128;
    if (splits < 1) splits = 1;
    float *partial = (float *)dev_temp(TMP_COLSUM, (size_t)splits * C * sizeof(float));
    colsum_partial_kernel<<<dim3(ceil_div(C, 32), splits), dim3(32, 8)>>>(partial, N, C, f);
    launchCheck();
    colsum_finish_kernel<<<ceil_div(C, 256), 256>>>(dst, partial, splits, C);
    launchCheck();
}

// dynamic shared memory past the default 48 KB needs an opt-in per kernel; `what` names the kernel
// and the setting its size grows with, for the error
template <class K> static void set_smem(K kernel, size_t bytes, const char *what) {
    if (bytes > (size_t)48 * 1024) {
        if (bytes > device_prop.sharedMemPerBlockOptin)
            die("%s needs %zu bytes of shared memory per block; this GPU has %zu", what, bytes,
                (size_t)device_prop.sharedMemPerBlockOptin);
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    }
}

#define PARAM_ALIGN_BYTES 256 // each parameter tensor starts on a 256-byte boundary: cuBLASLt wants aligned operands
#define ATT_KEEPS_PROBS 0 // the attention keeps each row's logsumexp, not P: activations O(T), not O(T²)
#include "ctxkv/layout.h"
#include "ctxkv/args.h"
#include "ctxkv/kvcache.h" // KVCache, the decoder's cache, and its eviction policy (KV-cached decoding, below)

// ----------------------------------------------------------------------------
// Layers: forward/backward pairs. Each host function launches the kernel(s) that do what the CPU
// function's loops do; shapes and argument order are the CPU program's. Backward functions
// ACCUMULATE (+=), as on the CPU.

// embedding: out[b,t,:] = table[ids[b,t], :]                 table (Vp,C), out (B,T,C), ids on the GPU
__global__ void embedding_forward_kernel(floatX *out, const int *ids, const floatX *table, int C) {
    const int i = blockIdx.x;
    const floatX *row = table + (size_t)ids[i] * C;
    for (int j = threadIdx.x; j < C; j += blockDim.x) out[(size_t)i * C + j] = row[j];
}
static void embedding_forward(floatX *out, const int *ids, const floatX *table, int BT, int C) {
    embedding_forward_kernel<<<BT, 128>>>(out, ids, table, C);
    launchCheck();
}

// Repeated ids add into the same row. The CPU program does it serially; here the positions
// of each distinct id are grouped on the host (ids are host data: ids_host), and one block per
// distinct id sums its positions in a fixed order, in fp32, then adds once into the table.
__global__ void embedding_backward_kernel(floatX *dtable, const floatX *dout, const int *uniq, const int *starts,
                                          const int *positions, int C) {
    const int u = blockIdx.x, id = uniq[u];
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        float s = 0.0f;
        for (int k = starts[u]; k < starts[u + 1]; k++) s += tof(dout[(size_t)positions[k] * C + j]);
        dtable[(size_t)id * C + j] = fx(tof(dtable[(size_t)id * C + j]) + s);
    }
}
static void embedding_backward(floatX *dtable, const floatX *dout, const int *ids_host, int BT, int C) {
    // buckets: order = positions sorted by (id, position); uniq[u], starts[u]..starts[u+1]
    int *order = (int *)malloc_check((size_t)BT * sizeof(int), "embedding backward");
    for (int i = 0; i < BT; i++) order[i] = i;
    std::sort(order, order + BT, [&](int a, int b) { return ids_host[a] != ids_host[b] ? ids_host[a] < ids_host[b] : a < b; });
    int *buf = (int *)malloc_check((size_t)(3 * BT + 1) * sizeof(int), "embedding backward");
    int *uniq = buf, *starts = buf + BT, nu = 0; // starts has nu+1 entries
    for (int i = 0; i < BT; i++)
        if (i == 0 || ids_host[order[i]] != ids_host[order[i - 1]]) { uniq[nu] = ids_host[order[i]]; starts[nu] = i; nu++; }
    starts[nu] = BT;
    int *positions = starts + nu + 1;
    memcpy(positions, order, (size_t)BT * sizeof(int));
    const size_t n = (size_t)nu + (nu + 1) + BT;
    int *d = (int *)dev_temp(TMP_BUCKETS, n * sizeof(int));
    cudaCheck(cudaMemcpy(d, uniq, (size_t)nu * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d + nu, starts, (size_t)(nu + 1 + BT) * sizeof(int), cudaMemcpyHostToDevice));
    embedding_backward_kernel<<<nu, 128>>>(dtable, dout, d, d + nu, d + nu + nu + 1, C);
    launchCheck();
    free(order);
    free(buf);
}

// LayerNorm over the last dim (biased variance, as nn.LayerNorm).  inp/out (N,C), mean/rstd (N)
// One warp per row; statistics in fp32.
__global__ void layernorm_forward_kernel(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w,
                                         const floatX *b, int N, int C, float eps) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const floatX *x = inp + (size_t)n * C;
    floatX *y = out + (size_t)n * C;
    float m = 0.0f;
    for (int i = lane; i < C; i += 32) m += tof(x[i]);
    m = warp_reduce_sum(m) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += 32) { float d = tof(x[i]) - m; v += d * d; }
    v = warp_reduce_sum(v) / C;
    const float r = 1.0f / sqrtf(v + eps);
    for (int i = lane; i < C; i += 32) y[i] = fx((tof(x[i]) - m) * r * tof(w[i]) + tof(b[i]));
    if (lane == 0) { mean[n] = m; rstd[n] = r; }
}
static void layernorm_forward(floatX *out, float *mean, float *rstd, const floatX *inp, const floatX *w,
                              const floatX *b, int N, int C, float eps) {
    layernorm_forward_kernel<<<ceil_div(N, 8), 256>>>(out, mean, rstd, inp, w, b, N, C, eps);
    launchCheck();
}

// dx += r·(g − mean(g) − x̂·mean(g⊙x̂)), g = dy⊙w;  dw += Σ dy⊙x̂;  db += Σ dy
__global__ void layernorm_backward_kernel(floatX *dinp, const floatX *dout, const floatX *inp, const floatX *w,
                                          const float *mean, const float *rstd, int N, int C) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const floatX *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
    floatX *dx = dinp + (size_t)n * C;
    const float m = mean[n], r = rstd[n];
    float g_mean = 0.0f, gx_mean = 0.0f;
    for (int i = lane; i < C; i += 32) {
        float xhat = (tof(x[i]) - m) * r, g = tof(dy[i]) * tof(w[i]);
        g_mean += g;
        gx_mean += g * xhat;
    }
    g_mean = warp_reduce_sum(g_mean) / C;
    gx_mean = warp_reduce_sum(gx_mean) / C;
    for (int i = lane; i < C; i += 32) {
        float xhat = (tof(x[i]) - m) * r;
        dx[i] = fx(tof(dx[i]) + r * (tof(dy[i]) * tof(w[i]) - g_mean - xhat * gx_mean));
    }
}
struct LayerNormDW { // dy⊙x̂
    const floatX *dout, *inp; const float *mean, *rstd; int C;
    __device__ float operator()(int n, int i) const {
        return tof(dout[(size_t)n * C + i]) * (tof(inp[(size_t)n * C + i]) - mean[n]) * rstd[n];
    }
};
struct RowSum { // the entry itself (bias gradients: Σ_n dout)
    const floatX *x; int C;
    __device__ float operator()(int n, int i) const { return tof(x[(size_t)n * C + i]); }
};
static void layernorm_backward(floatX *dinp, floatX *dw, floatX *db, const floatX *dout, const floatX *inp,
                               const floatX *w, const float *mean, const float *rstd, int N, int C) {
    layernorm_backward_kernel<<<ceil_div(N, 8), 256>>>(dinp, dout, inp, w, mean, rstd, N, C);
    launchCheck();
    // weight grads reduce over N: a column sum per channel
    column_sum_add(dw, N, C, LayerNormDW{dout, inp, mean, rstd, C});
    column_sum_add(db, N, C, RowSum{dout, C});
}

// Linear layers are cuBLASLt. Row-major X (r,c) is column-major Xᵀ, so with m, n, k in
// cuBLAS's column-major terms:
//   forward   out (N,OC) = inp·wᵀ + bias :  outᵀ (OC×N)  = w[T] (C×OC stored) · inpᵀ (C×N),   bias epilogue
//   dinp      (N,C)  += dout·w           :  dinpᵀ (C×N)  = w (C×OC stored) · doutᵀ (OC×N),    beta 1
//   dw        (OC,C) += doutᵀ·inp        :  dwᵀ (C×OC)   = inpᵀ (C×N) · dout[T] (OC×N stored), beta 1
// Compute type fp32 (no TF32): with PRECISION=FP32 this is an ordinary SGEMM.
static int ptr_alignment(const void *p) { // largest power of two <= 256 that divides the address
    uintptr_t a = (uintptr_t)p;
    int al = 256;
    while (al > 1 && a % al) al /= 2;
    return al;
}

static void matmul_cublaslt(floatX *d, const floatX *a, const floatX *b, const floatX *bias, int m, int n, int k,
                            int transA, int transB, int lda, int ldb, int ldd, float beta) {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof opA));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof opB));
    if (bias) {
        cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        cudaDataType_t bias_type = CUDA_LOWP;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    }
    cublasCheck(cublasLtMatrixLayoutCreate(&la, CUDA_LOWP, transA ? k : m, transA ? m : k, lda));
    cublasCheck(cublasLtMatrixLayoutCreate(&lb, CUDA_LOWP, transB ? n : k, transB ? k : n, ldb));
    cublasCheck(cublasLtMatrixLayoutCreate(&ld, CUDA_LOWP, m, n, ldd));
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    uint64_t ws = CUBLASLT_WORKSPACE;
    uint32_t al_a = ptr_alignment(a), al_b = ptr_alignment(b), al_d = ptr_alignment(d);
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, sizeof al_d));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, sizeof al_d));
    cublasLtMatmulHeuristicResult_t heur;
    int found = 0;
    cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(cublaslt_handle, desc, la, lb, ld, ld, pref, 1, &heur, &found);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
        die("cuBLASLt has no algorithm for m %d n %d k %d (trans %d%d, ld %d %d %d, bias %s, alignment %u %u %u): %s", m, n,
            k, transA, transB, lda, ldb, ldd, bias ? "yes" : "no", al_a, al_b, al_d, cublasGetStatusString(st));
    const float alpha = 1.0f;
    cublasCheck(cublasLtMatmul(cublaslt_handle, desc, &alpha, a, la, b, lb, &beta, d, ld, d, ld, &heur.algo,
                               cublaslt_workspace, CUBLASLT_WORKSPACE, 0));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    cublasCheck(cublasLtMatrixLayoutDestroy(la));
    cublasCheck(cublasLtMatrixLayoutDestroy(lb));
    cublasCheck(cublasLtMatrixLayoutDestroy(ld));
    cublasCheck(cublasLtMatmulDescDestroy(desc));
}

// Linear layer, PyTorch layout: out (N,OC) = inp (N,C) · wᵀ + bias (OC, or NULL for none).
static void matmul_forward(floatX *out, const floatX *inp, const floatX *w, const floatX *bias, int N, int C, int OC) {
    matmul_cublaslt(out, w, inp, bias, OC, N, C, 1, 0, C, C, OC, 0.0f);
}

// dinp (N,C) += dout·w;  dw (OC,C) += doutᵀ·inp;  dbias (OC) += Σ_n dout.   dinp/dbias may be NULL.
static void matmul_backward(floatX *dinp, floatX *dw, floatX *dbias, const floatX *dout, const floatX *inp,
                            const floatX *w, int N, int C, int OC) {
    if (dinp) matmul_cublaslt(dinp, w, dout, NULL, C, N, OC, 0, 0, C, OC, C, 1.0f);
    matmul_cublaslt(dw, inp, dout, NULL, C, OC, N, 0, 1, C, OC, C, 1.0f);
    if (dbias) column_sum_add(dbias, N, OC, RowSum{dout, OC});
}

// RoPE table for R rotated dims: cos/sin (max_seq_len, R/2), θ[p][i] = p · base^(−2i/R),
// formed in fp32 on the host as the CPU program does (so the tables are identical), then
// copied to the GPU. The model has one for its rotary_dims and, for MLA, one for d_R.
typedef struct { int R; float *cos, *sin; } Rope; // cos/sin on the GPU

static Rope rope_init(int max_seq_len, int R, float base) {
    Rope rp = {R, NULL, NULL};
    size_t n = (size_t)max_seq_len * (R / 2 > 0 ? R / 2 : 1);
    float *cs = (float *)calloc_check(2 * n * sizeof(float), "rope table"), *sn = cs + n;
    for (int i = 0; i < R / 2; i++) {
        float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)R);
        for (int p = 0; p < max_seq_len; p++) {
            float theta = (float)p * inv_freq;
            cs[p * (R / 2) + i] = cosf(theta);
            sn[p * (R / 2) + i] = sinf(theta);
        }
    }
    rp.cos = (float *)cuda_malloc_check(2 * n * sizeof(float), "rope table");
    rp.sin = rp.cos + n;
    cudaCheck(cudaMemcpy(rp.cos, cs, 2 * n * sizeof(float), cudaMemcpyHostToDevice));
    free(cs);
    return rp;
}

static void rope_free(Rope *rp) { cuda_free(rp->cos); rp->cos = rp->sin = NULL; }

// Rotate-half RoPE in place on the first R dims of n_heads heads per row, pairs (i, i + R/2):
//   x'[i] = x[i]c − x[i+R/2]s,  x'[i+R/2] = x[i+R/2]c + x[i]s.
// Rows are (B,T) positions, pos = pos0 + t. sign = −1 applies the inverse rotation.
// One thread per (b, t, head, pair).
__global__ void rope_rotate_kernel(floatX *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride,
                                   const float *cs, const float *sn, int half, float sign) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)B * T * n_heads * half) return;
    const int i = (int)(idx % half);
    size_t r = idx / half;
    const int h = (int)(r % n_heads);
    r /= n_heads;
    const int t = (int)(r % T), b = (int)(r / T);
    const float c = cs[(size_t)(pos0 + t) * half + i], si = sign * sn[(size_t)(pos0 + t) * half + i];
    floatX *v = x + ((size_t)b * T + t) * row_stride + (size_t)h * head_stride;
    const float x1 = tof(v[i]), x2 = tof(v[i + half]);
    v[i] = fx(x1 * c - x2 * si);
    v[i + half] = fx(x2 * c + x1 * si);
}
static void rope_rotate(floatX *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride,
                        const Rope *rp, float sign) {
    const int half = rp->R / 2;
    const size_t n = (size_t)B * T * n_heads * half;
    if (n == 0) return;
    rope_rotate_kernel<<<ceil_div(n, 256), 256>>>(x, B, T, pos0, row_stride, n_heads, head_stride, rp->cos, rp->sin, half, sign);
    launchCheck();
}

static void rope_forward(floatX *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(x, B, T, pos0, row_stride, n_heads, head_stride, rp, 1.0f);
}

// the rotation is orthogonal, so its backward is the inverse rotation of the gradient
static void rope_backward(floatX *dx, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(dx, B, T, pos0, row_stride, n_heads, head_stride, rp, -1.0f);
}

// exact GELU, 0.5·x·(1 + erf(x/√2)), as HF's "gelu" (not the tanh form). Built without
// --use_fast_math, so erff is the accurate one.
#define GELU_SQRT1_2 0.70710678118654752440f
__global__ void gelu_forward_kernel(floatX *out, const floatX *inp, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= N) return;
    const float x = tof(inp[i]);
    out[i] = fx(0.5f * x * (1.0f + erff(x * GELU_SQRT1_2)));
}
static void gelu_forward(floatX *out, const floatX *inp, size_t N) {
    if (N == 0) return;
    gelu_forward_kernel<<<ceil_div(N, 256), 256>>>(out, inp, N);
    launchCheck();
}

// GELU'(x) = 0.5(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π)
__global__ void gelu_backward_kernel(floatX *dinp, const floatX *inp, const floatX *dout, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= N) return;
    const float inv_sqrt_2pi = 0.3989422804014327f;
    const float x = tof(inp[i]);
    const float grad = 0.5f * (1.0f + erff(x * GELU_SQRT1_2)) + x * expf(-0.5f * x * x) * inv_sqrt_2pi;
    dinp[i] = fx(tof(dinp[i]) + grad * tof(dout[i]));
}
static void gelu_backward(floatX *dinp, const floatX *inp, const floatX *dout, size_t N) {
    if (N == 0) return;
    gelu_backward_kernel<<<ceil_div(N, 256), 256>>>(dinp, inp, dout, N);
    launchCheck();
}

// out = a + b + c (the parallel residual); its backward is the identity into each branch,
// which is why model_backward hands the same dresid to both branches.
__global__ void residual3_forward_kernel(floatX *out, const floatX *a, const floatX *b, const floatX *c, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < N) out[i] = fx(tof(a[i]) + tof(b[i]) + tof(c[i]));
}
static void residual3_forward(floatX *out, const floatX *a, const floatX *b, const floatX *c, size_t N) {
    if (N == 0) return;
    residual3_forward_kernel<<<ceil_div(N, 256), 256>>>(out, a, b, c, N);
    launchCheck();
}

// Fused softmax / cross-entropy over the first V columns of logits (N,Vp); padding columns
// never count. One block per row, in fp32: lse = logsumexp of the row (kept for backward),
// losses[n] = lse − logits[n][target]; ignored rows get loss 0. No probability buffer.
#define CE_THREADS 512
__global__ void crossentropy_forward_kernel(float *losses, float *lse, const floatX *logits, const int *targets, int V, int Vp) {
    const int n = blockIdx.x;
    const floatX *z = logits + (size_t)n * Vp;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, tof(z[i]));
    mx = block_reduce_max(mx);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(tof(z[i]) - mx);
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) {
        const float l = mx + logf(s);
        lse[n] = l;
        losses[n] = targets[n] == IGNORE_INDEX ? 0.0f : l - tof(z[targets[n]]);
    }
}
// Returns the mean over non-ignored rows and sets *n_valid. The per-row losses come back to
// losses_host (the CPU program's a.losses); targets_host counts the valid rows.
static float crossentropy_forward(float *losses, float *lse, const floatX *logits, const int *targets, int N, int V,
                                  int Vp, int *n_valid, const int *targets_host, float *losses_host) {
    crossentropy_forward_kernel<<<N, CE_THREADS>>>(losses, lse, logits, targets, V, Vp);
    launchCheck();
    cudaCheck(cudaMemcpy(losses_host, losses, (size_t)N * sizeof(float), cudaMemcpyDeviceToHost));
    double total = 0.0;
    int valid = 0;
    for (int n = 0; n < N; n++) {
        if (targets_host[n] == IGNORE_INDEX) continue;
        total += losses_host[n];
        valid++;
    }
    *n_valid = valid;
    return valid ? (float)(total / valid) : 0.0f;
}

// dlogits = (softmax(logits) − onehot(target)) / n_valid, written IN PLACE over logits
// (saves a (B,T,Vp) buffer). Ignored rows and padding columns get 0.
__global__ void crossentropy_backward_kernel(floatX *z_all, const float *lse, const int *targets, int V, int Vp, float scale) {
    const int n = blockIdx.x, target = targets[n];
    floatX *z = z_all + (size_t)n * Vp;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float d = 0.0f;
        if (target != IGNORE_INDEX && i < V) {
            d = expf(tof(z[i]) - lse[n]) * scale;
            if (i == target) d -= scale;
        }
        z[i] = fx(d);
    }
}
static void crossentropy_backward(floatX *logits_to_dlogits, const float *lse, const int *targets, int N, int V,
                                  int Vp, int n_valid) {
    const float scale = 1.0f / (float)n_valid;
    crossentropy_backward_kernel<<<N, CE_THREADS>>>(logits_to_dlogits, lse, targets, V, Vp, scale);
    launchCheck();
}

// ----------------------------------------------------------------------------
// The model: parameters, activations and optimizer state, and the KV cache decoding keeps

// ContextBlock scratch (Context-KV, below): one ContextLayer on N rows

typedef struct {
    int cap;                          // rows allocated
    char *mem;                        // one GPU allocation
    floatX *u; float *u_mean, *u_rstd;        // (N,E), (N), (N) LN_e(E)
    floatX *z;                                // (N,d_c+E) [S ; u]
    floatX *pre, *g;                          // (N,d_c) before / after GELU
    floatX *r; float *r_mean, *r_rstd;        // (N,d_c) S + g, and LN_c's statistics
    floatX *out;                              // (N,d_c)
    floatX *dr, *dpre, *dz, *du, *dE;         // backward scratch
} BlockActs;

typedef struct {
    Config cfg;
    ParamTensor *tensors;       // stb_ds array: checkpoint order, names, shapes
    size_t num_params;          // in the checkpoint
    size_t num_params_dev;      // elements of the GPU blocks (tensors 256-byte aligned)
    float *params_memory;       // host fp32 copy, checkpoint order (init, load, save, --init-from)
    floatX *params_dev; Params p;         // GPU: what the layers read
    float *master_dev;                    // GPU fp32 master weights (= params_dev with PRECISION=FP32)
    floatX *grads_memory; Params g;       // GPU, allocated on first backward
    float *m_memory, *v_memory;           // GPU AdamW moments, allocated on first update
    int adam_step;
    float grad_scale;                     // the clip's factor, applied by the next AdamW update (1: none)
    Rope rope;                            // rotary_dims of each head (Pythia's partial RoPE)
    Rope mla_rope;                        // MLA's decoupled d_R dims (R = 0 otherwise)
    char *acts_memory; Acts a; size_t acts_cap;       // GPU activations, capacity in bytes
    char *gacts_memory; GradActs ga; size_t gacts_cap; // their gradients
    size_t batch_cap;
    int B, T;                   // shape of the last forward
    int *inputs, *targets;      // host copies of the last forward's batch
    int *inputs_dev, *targets_dev;        // the same on the GPU
    float mean_loss;            // of the last forward with targets, else -1
    int n_valid;                // non-ignored targets in the last forward
    BlockActs cb;               // ContextBlock scratch (phase 1 and the exact recurrence)
    int head_from;              // B = 1 inference: logits only for rows >= head_from (0 = all)
    int head_last_of;           // prefill of sequences of this length: logits only of each one's last row, as rows 0..B-1
    KVPolicy kv_policy;         // which tokens the decoder keeps (ctxkv/kvpolicy.h); zero: full
    float *losses_host;         // (B,T) a.losses of the last forward with targets, on the host
    float *logits_host; size_t logits_host_cap; // rows of a.logits fetched by model_logits_host
} Model;


static void model_alloc_params(Model *m, const Config *c) {
    cuda_init();
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->p.layer = (LayerParams *)calloc_check(c->n_layer * sizeof(LayerParams), "layer params");
    m->g.layer = (LayerParams *)calloc_check(c->n_layer * sizeof(LayerParams), "layer grads");
    m->num_params = layout_params(c, NULL, NULL, &m->tensors, &m->num_params_dev);
    m->params_memory = (float *)malloc_check(m->num_params * sizeof(float), "parameters");
    m->params_dev = (floatX *)cuda_calloc_check(m->num_params_dev * sizeof(floatX), "parameters");
#ifdef ENABLE_FP32
    m->master_dev = m->params_dev;
#else
    m->master_dev = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "fp32 master weights");
#endif
    layout_params(c, m->params_dev, &m->p, NULL, NULL);
    m->rope = rope_init(c->max_seq_len, c->rotary_dims, c->rope_base);
    m->mla_rope = rope_init(c->max_seq_len, c->attn_type == ATTN_MLA ? c->mla_rope_dim / c->mla_rope_split : 0, c->rope_base);
    m->a.layer = (LayerActs *)calloc_check(c->n_layer * sizeof(LayerActs), "layer acts");
    m->mean_loss = -1.0f;
    m->grad_scale = 1.0f;
    tensors_set_phase(m->tensors, c, 2);
}

// params_memory (host, fp32, checkpoint order) -> master weights and params_dev (GPU)
static void model_to_device(Model *m) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i];
        cudaCheck(cudaMemcpy(m->master_dev + t->dev_offset, m->params_memory + t->offset, t->rows * t->cols * sizeof(float),
                             cudaMemcpyHostToDevice));
    }
#ifndef ENABLE_FP32
    cast_to_floatX_kernel<<<ceil_div(m->num_params_dev, 256), 256>>>(m->params_dev, m->master_dev, m->num_params_dev);
    launchCheck();
#endif
}

// the fp32 master weights (GPU) -> params_memory (host), before anything on the host reads it
static void model_to_host(const Model *m) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i];
        cudaCheck(cudaMemcpy(m->params_memory + t->offset, m->master_dev + t->dev_offset, t->rows * t->cols * sizeof(float),
                             cudaMemcpyDeviceToHost));
    }
}

// Random init as HF GPTNeoX (_init_weights): N(0, init_std) for matrices and embeddings,
// LayerNorm 1/0, biases 0; the two residual-output matrices (dense, proj) are scaled by
// 1/sqrt(2L) as in GPT-2, which keeps the residual stream's variance flat with depth.
// On the host with the CPU program's RNG, so both programs start from the same weights.

// AdamW moments between the GPU layout (dev_offset) and checkpoint order (offset)
static void moments_to_host(const Model *m, const float *dev, float *host) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i];
        cudaCheck(cudaMemcpy(host + t->offset, dev + t->dev_offset, t->rows * t->cols * sizeof(float), cudaMemcpyDeviceToHost));
    }
}
static void moments_to_device(const Model *m, const float *host, float *dev) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const ParamTensor *t = &m->tensors[i];
        cudaCheck(cudaMemcpy(dev + t->dev_offset, host + t->offset, t->rows * t->cols * sizeof(float), cudaMemcpyHostToDevice));
    }
}

// AdamW's m and v in checkpoint order, zeros before the first update (the training state)
static void model_get_moments(const Model *m, float *mh, float *vh) {
    if (!m->m_memory) {
        memset(mh, 0, m->num_params * sizeof(float));
        memset(vh, 0, m->num_params * sizeof(float));
        return;
    }
    moments_to_host(m, m->m_memory, mh);
    moments_to_host(m, m->v_memory, vh);
}
static void model_set_moments(Model *m, const float *mh, const float *vh, int adam_step) {
    if (!m->m_memory) {
        m->m_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW m");
        m->v_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW v");
    }
    moments_to_device(m, mh, m->m_memory);
    moments_to_device(m, vh, m->v_memory);
    m->adam_step = adam_step;
}

static void model_free(Model *m) {
    free(m->params_memory); cuda_free(m->params_dev);
    if ((void *)m->master_dev != (void *)m->params_dev) cuda_free(m->master_dev);
    cuda_free(m->grads_memory); cuda_free(m->m_memory); cuda_free(m->v_memory);
    cuda_free(m->acts_memory); cuda_free(m->gacts_memory); rope_free(&m->rope); rope_free(&m->mla_rope);
    free(m->p.layer); free(m->g.layer); free(m->a.layer);
    free(m->inputs); free(m->targets); cuda_free(m->inputs_dev); cuda_free(m->targets_dev); cuda_free(m->cb.mem);
    free(m->losses_host); free(m->logits_host);
    arrfree(m->tensors);
    memset(m, 0, sizeof *m);
}

// Points the activations at GPU memory for a (B,T) batch, growing the block when this batch
// needs more than any earlier one.
static void model_ensure_acts(Model *m, int B, int T) {
    size_t need = layout_acts(&m->cfg, B, T, NULL, &m->a, NULL);
    if (need > m->acts_cap) {
        cuda_free(m->acts_memory);
        m->acts_memory = (char *)cuda_malloc_check(need, "activations");
        m->acts_cap = need;
    }
    layout_acts(&m->cfg, B, T, m->acts_memory, &m->a, NULL);
    size_t BT = (size_t)B * T;
    if (BT > m->batch_cap) {
        free(m->inputs); free(m->targets); free(m->losses_host);
        cuda_free(m->inputs_dev); cuda_free(m->targets_dev);
        m->inputs = (int *)malloc_check(BT * sizeof(int), "batch");
        m->targets = (int *)malloc_check(BT * sizeof(int), "batch");
        m->losses_host = (float *)malloc_check(BT * sizeof(float), "losses");
        m->inputs_dev = (int *)cuda_malloc_check(BT * sizeof(int), "batch");
        m->targets_dev = (int *)cuda_malloc_check(BT * sizeof(int), "batch");
        m->batch_cap = BT;
    }
}

// rows [row0, row0 + n) of the last forward's logits (Vp each), as fp32 on the host (the CPU
// program reads m->a.logits directly); the buffer is the caller's until the next call
static float *model_logits_host(Model *m, size_t row0, size_t n) {
    const size_t Vp = m->cfg.padded_vocab_size;
    if (n * Vp > m->logits_host_cap) {
        free(m->logits_host);
        m->logits_host = (float *)malloc_check(n * Vp * sizeof(float), "logits");
        m->logits_host_cap = n * Vp;
    }
    download_floats(m->logits_host, m->a.logits + row0 * Vp, n * Vp);
    return m->logits_host;
}

// gradients of the parameters, laid out as the GPU parameter block: allocated on first use
static void model_ensure_grads(Model *m) {
    if (m->grads_memory) return;
    m->grads_memory = (floatX *)cuda_calloc_check(m->num_params_dev * sizeof(floatX), "gradients");
    layout_params(&m->cfg, m->grads_memory, &m->g, NULL, NULL);
}

// zeroes / moves device memory: what ctxkv/pythia.h calls
static void device_zero(void *p, size_t bytes) { cudaCheck(cudaMemset(p, 0, bytes)); }

static void device_move(void *dst, const void *src, size_t bytes) {
    if (dst != src) cudaCheck(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice)); // rows that never overlap but at one place
}

static void model_zero_grad(Model *m) {
    if (m->grads_memory) cudaCheck(cudaMemset(m->grads_memory, 0, m->num_params_dev * sizeof(floatX)));
    m->grad_scale = 1.0f;
}

// Σ g² over the whole gradient block: per-block partials in double, summed on the host in
// block order (deterministic). The alignment padding between tensors holds zeros.
#define NORM_BLOCKS 512
__global__ void grad_sq_partial_kernel(double *partial, const floatX *g, size_t n) {
    __shared__ double sh[256];
    double s = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        double v = tof(g[i]);
        s += v * v;
    }
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}
// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_: the grads are scaled by
// min(1, max_norm / (norm + 1e-6)), inside the next model_update (grad_scale: in fp32 in the
// AdamW kernel, not a rescale of the bf16 gradients, which would round them once more).
// Returns the norm before clipping. max_norm <= 0: no clip.
static float model_clip_grad_norm(Model *m, float max_norm) {
    const size_t n = m->num_params_dev;
    double *partial = (double *)dev_temp(TMP_NORM, NORM_BLOCKS * sizeof(double)), host[NORM_BLOCKS];
    grad_sq_partial_kernel<<<NORM_BLOCKS, 256>>>(partial, m->grads_memory, n);
    launchCheck();
    cudaCheck(cudaMemcpy(host, partial, sizeof host, cudaMemcpyDeviceToHost));
    double sq = 0.0;
    for (int i = 0; i < NORM_BLOCKS; i++) sq += host[i];
    float norm = (float)sqrt(sq);
    m->grad_scale = clip_scale(norm, max_norm);
    return norm;
}

// One tensor's AdamW update on the fp32 master weights; the bf16 copy the layers read is
// written from the updated master (with PRECISION=FP32 they are the same memory).
__global__ void adamw_kernel(floatX *params, float *master, const floatX *grads, float *mm, float *vv, size_t n,
                             float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt,
                             float grad_scale) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = tof(grads[i]) * grad_scale;
    float p = master[i] * decay;
    const float m_ = beta1 * mm[i] + (1.0f - beta1) * g;
    const float v_ = beta2 * vv[i] + (1.0f - beta2) * g * g;
    mm[i] = m_;
    vv[i] = v_;
    p -= step_size * m_ / (sqrtf(v_) / bc2_sqrt + eps);
    master[i] = p;
    if ((void *)params != (void *)master) params[i] = fx(p);
}

// AdamW (ctxkv/layout.h has the update and its constants) over every tensor not frozen
static void model_update(Model *m, const AdamW *opt) {
    if (!m->m_memory) {
        m->m_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW m");
        m->v_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW v");
    }
    const AdamWStep st = adamw_step(opt, ++m->adam_step);
    for (ptrdiff_t ti = 0; ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        if (t->frozen) continue;
        const size_t o = t->dev_offset, n = t->rows * t->cols;
        adamw_kernel<<<ceil_div(n, 256), 256>>>(m->params_dev + o, m->master_dev + o, m->grads_memory + o, m->m_memory + o,
                                                m->v_memory + o, n, opt->beta1, opt->beta2, opt->eps, adamw_decay(opt, t),
                                                st.step_size, st.bc2_sqrt, m->grad_scale);
        launchCheck();
    }
    m->grad_scale = 1.0f;
}

// ----------------------------------------------------------------------------
// The attention core: causal softmax attention over the sequence (training, prefill) and over
// the cache (decoding). H query heads share G key/value heads: query head h reads KV head
// h / (H/G) (G = H for MHA).

// A view of per-head vectors inside a (B,T,row) buffer: head h of token (b,t) starts at
// base + (b*T + t)*row_stride + h*head_stride. Lets one attention core read the fused QKV
// of MHA and the separate Q / KV projections of the other variants.
typedef struct { floatX *base; int row_stride, head_stride; } HeadView;

__host__ __device__ inline floatX *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

// where the causal core finds one layer's q, k and v, how many key/value heads there are, and
// the q·k width (D, or D + d_R for MLA)
typedef struct { HeadView q, k, v; int kv_heads, dqk; } CoreViews;

#define ATT_THREADS 128
#define DECODE_MIN_CHUNK 16 // cached slots per block at least, when decoding splits them (flash-decoding)

// Causal softmax attention in O(B·H·T) memory, after FlashAttention-2 (Dao 2023): P is never
// stored. The forward keeps each query row's logsumexp; the backward recomputes P from q, k and
// it, tile by tile. Keys and values move through shared memory in tiles of FA_KEYS (one per lane
// of a warp, coalesced loads); every reduction has a fixed order, so results do not depend on
// timing. dev/cuda/attention_forward.cu and attention_backward.cu keep the kernels that stored
// P (B,H,T,T), as the reference these are validated against.
#define FA_KEYS 32  // keys per tile: one per lane
#define FA_WARPS 4  // warps per forward / dQ block
#define FA_ROWS 16  // query rows per forward / dQ block: FA_ROWS / FA_WARPS per warp
#define FA_BWD_KEYS 64 // keys per dK/dV block (one per thread), halved while its shared memory does not fit
#define FA_BWD_ROWS 8  // query rows the dK/dV block stages at a time

// a · b over n fp32 entries in shared memory (one thread's dot: a tile row against a key or value)
__device__ inline float smem_dot(const float *a, const float *b, int n) {
    float d = 0.0f;
    for (int j = 0; j < n; j++) d += a[j] * b[j];
    return d;
}

// The rows of a tile of n vectors of width d, rows r0.. of head view x (head hh, sequence b), into
// shared memory at row stride ld, as fp32; rows past `last` are zero (so a masked p = 0 never
// meets stale memory). All threads of the block take part.
__device__ void load_rows(float *dst, int ld, HeadView x, int T, int b, int hh, int r0, int n, int d, int last) {
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
        const int r = e / d, j = e % d;
        dst[r * ld + j] = r0 + r <= last ? tof(head_at(x, T, b, r0 + r, hh)[j]) : 0.0f;
    }
}

// Forward. out (B,T,H*Dv) = softmax(scale·q·kᵀ, causal)·v; lse (B,H,T) = m + log l per row.
// One block per tile of FA_ROWS query rows (q0, h, b); warp w owns rows w, w + FA_WARPS, ...
// For each key tile a row's lane s scores key k0 + s; the row's running max m and sum l are
// updated once per tile (the online softmax) and its output, in shared memory, is rescaled by
// exp(m_old − m_new) and gains Σ_s p_s·v_s (lane j owns columns j, j + 32, ...).
// Shared memory (fp32): q (FA_ROWS, Dqk), o (FA_ROWS, Dv), K tile (FA_KEYS, Dqk+1),
// V tile (FA_KEYS, Dv+1), p (FA_WARPS, FA_KEYS). The +1 keeps lanes that read one column of
// different rows on different banks.
__global__ void attention_forward_kernel(floatX *out, float *lse, HeadView q, HeadView k, HeadView v, int T, int H, int G,
                                         int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    const int q0 = blockIdx.x * FA_ROWS, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, KS = Dqk + 1, VS = Dv + 1;
    float *qs = sm, *os = qs + FA_ROWS * Dqk, *ks = os + FA_ROWS * Dv, *vs = ks + FA_KEYS * KS, *ps = vs + FA_KEYS * VS + warp * FA_KEYS;
    const int rows = min(FA_ROWS, T - q0), last = q0 + rows - 1; // the last key any row of the tile sees
    load_rows(qs, Dqk, q, T, b, h, q0, rows, Dqk, last);
    for (int e = threadIdx.x; e < FA_ROWS * Dv; e += blockDim.x) os[e] = 0.0f;
    float m_row[FA_ROWS / FA_WARPS], l_row[FA_ROWS / FA_WARPS];
    for (int i = 0; i < FA_ROWS / FA_WARPS; i++) { m_row[i] = -INFINITY; l_row[i] = 0.0f; }
    for (int k0 = 0; k0 <= last; k0 += FA_KEYS) {
        __syncthreads(); // every warp is done with the previous tile
        load_rows(ks, KS, k, T, b, g, k0, FA_KEYS, Dqk, last);
        load_rows(vs, VS, v, T, b, g, k0, FA_KEYS, Dv, last);
        __syncthreads();
        for (int i = 0; i < FA_ROWS / FA_WARPS; i++) {
            const int r = warp + FA_WARPS * i, t = q0 + r;
            if (r >= rows || t < k0) continue; // the whole warp: this tile holds none of row t's keys
            const int n = min(FA_KEYS, t - k0 + 1); // keys k0 .. k0+n−1 are visible; lane s scores k0 + s
            float score = -INFINITY;
            if (lane < n) score = scale * smem_dot(qs + r * Dqk, ks + lane * KS, Dqk);
            // key k0 <= t is visible, so m_new is finite; the first tile's m_row = −inf gives alpha 0
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
            __syncwarp(); // ps is rewritten by the next row
        }
    }
    for (int i = 0; i < FA_ROWS / FA_WARPS; i++) {
        const int r = warp + FA_WARPS * i, t = q0 + r;
        if (r >= rows) continue;
        const float inv = 1.0f / l_row[i];
        floatX *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
        for (int j = lane; j < Dv; j += 32) o[j] = fx(os[r * Dv + j] * inv);
        if (lane == 0) lse[((size_t)b * H + h) * T + t] = m_row[i] + logf(l_row[i]);
    }
}
static size_t attention_forward_smem(int Dqk, int Dv) {
    return (size_t)(FA_ROWS * (Dqk + Dv) + FA_KEYS * (Dqk + 1 + Dv + 1) + FA_WARPS * FA_KEYS) * sizeof(float);
}
// at->atty (B,T,H*D) from one layer's views; at->lse (B,H,T) for the backward
static void attention_forward(AttnActs *at, CoreViews cv, int B, int T, int H, int Dv, float scale) {
    const size_t smem = attention_forward_smem(cv.dqk, Dv);
    set_smem(attention_forward_kernel, smem, "the attention forward (it grows with the head width)");
    attention_forward_kernel<<<dim3(ceil_div(T, FA_ROWS), H, B), FA_WARPS * 32, smem>>>(at->atty, at->lse, cv.q, cv.k, cv.v, T, H,
                                                                                         cv.kv_heads, cv.dqk, Dv, scale);
    launchCheck();
}

// Backward: with P = exp(scale·q·kᵀ − lse) recomputed and D = rowsum(dO ⊙ O) (= rowsum(P ⊙ dP)),
//   dP = dO·Vᵀ,  dS = P⊙(dP − D)·scale,  dQ += dS·K,  dK_g += Σ_h dSᵀ·Q,  dV_g += Σ_h Pᵀ·dO.
// Three kernels, so that every output row has one writer and no atomics are needed:
// D per row; dQ per tile of query rows (as the forward); dK and dV per tile of key rows, summed
// over the query rows t >= s of the H/G heads that share KV head g.

// D (B,H,T) = Σ_j dO·O over each row's Dv values (rows (b, t, h) in out's order): a warp per row
__global__ void attention_row_dot_kernel(float *Drow, const floatX *dout, const floatX *out, int T, int H, int Dv, int n_rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n_rows) return; // the whole warp
    float acc = 0.0f;
    for (int j = lane; j < Dv; j += 32) acc += tof(dout[(size_t)row * Dv + j]) * tof(out[(size_t)row * Dv + j]);
    acc = warp_reduce_sum(acc);
    const int b = row / (T * H), t = row / H % T, h = row % H;
    if (lane == 0) Drow[((size_t)b * H + h) * T + t] = acc;
}
static void attention_row_dot(float *Drow, const floatX *dout, const floatX *out, int B, int T, int H, int Dv) {
    attention_row_dot_kernel<<<ceil_div((size_t)B * T * H, 4), 128>>>(Drow, dout, out, T, H, Dv, B * T * H);
    launchCheck();
}

// dQ += scale·Σ_s dS_ts k_s: a block per tile of FA_ROWS query rows, key tiles as in the
// forward. Lane s recomputes p and dp for key k0 + s; lane j sums column j of dq (shared memory).
// Shared memory: q (FA_ROWS, Dqk), dO (FA_ROWS, Dv), dq (FA_ROWS, Dqk), K tile (FA_KEYS, Dqk+1),
// V tile (FA_KEYS, Dv+1), dS (FA_WARPS, FA_KEYS).
__global__ void attention_backward_query_kernel(HeadView dq, const floatX *dout, const float *lse, const float *Drow, HeadView q,
                                                HeadView k, HeadView v, int T, int H, int G, int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    const int q0 = blockIdx.x * FA_ROWS, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, KS = Dqk + 1, VS = Dv + 1;
    float *qs = sm, *dos = qs + FA_ROWS * Dqk, *dqs = dos + FA_ROWS * Dv, *ks = dqs + FA_ROWS * Dqk, *vs = ks + FA_KEYS * KS;
    float *dss = vs + FA_KEYS * VS + warp * FA_KEYS;
    const int rows = min(FA_ROWS, T - q0), last = q0 + rows - 1;
    const HeadView dov = {(floatX *)dout, H * Dv, Dv};
    load_rows(qs, Dqk, q, T, b, h, q0, rows, Dqk, last);
    load_rows(dos, Dv, dov, T, b, h, q0, rows, Dv, last);
    for (int e = threadIdx.x; e < FA_ROWS * Dqk; e += blockDim.x) dqs[e] = 0.0f;
    for (int k0 = 0; k0 <= last; k0 += FA_KEYS) {
        __syncthreads();
        load_rows(ks, KS, k, T, b, g, k0, FA_KEYS, Dqk, last);
        load_rows(vs, VS, v, T, b, g, k0, FA_KEYS, Dv, last);
        __syncthreads();
        for (int i = 0; i < FA_ROWS / FA_WARPS; i++) {
            const int r = warp + FA_WARPS * i, t = q0 + r;
            if (r >= rows || t < k0) continue;
            const int n = min(FA_KEYS, t - k0 + 1);
            const size_t row = ((size_t)b * H + h) * T + t;
            float ds = 0.0f;
            if (lane < n) {
                const float sc = smem_dot(qs + r * Dqk, ks + lane * KS, Dqk), dp = smem_dot(dos + r * Dv, vs + lane * VS, Dv);
                ds = expf(scale * sc - lse[row]) * (dp - Drow[row]) * scale;
            }
            dss[lane] = ds;
            __syncwarp();
            for (int j = lane; j < Dqk; j += 32) {
                float acc = dqs[r * Dqk + j];
                for (int u = 0; u < n; u++) acc += dss[u] * ks[u * KS + j];
                dqs[r * Dqk + j] = acc;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * Dqk; e += blockDim.x) {
        floatX *d = head_at(dq, T, b, q0 + e / Dqk, h) + e % Dqk;
        *d = fx(tof(*d) + dqs[e]);
    }
}

// dK_s += scale·Σ dS_ts q_t, dV_s += Σ P_ts dO_t: a block per tile of blockDim.x key rows
// (k0, g, b), thread i owning key s = k0 + i (its k and v rows and its dk and dv sums, in shared
// memory). The query rows t >= k0 of each head of the group come through FA_BWD_ROWS at a time.
// Shared memory: K, V, dK, dV (blockDim.x, width + 1 each), q (FA_BWD_ROWS, Dqk),
// dO (FA_BWD_ROWS, Dv), lse and D (FA_BWD_ROWS each).
__global__ void attention_backward_kv_kernel(HeadView dk, HeadView dv, const floatX *dout, const float *lse, const float *Drow,
                                             HeadView q, HeadView k, HeadView v, int T, int H, int G, int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    const int keys = blockDim.x, k0 = blockIdx.x * keys, g = blockIdx.y, b = blockIdx.z, group = H / G, i = threadIdx.x, s = k0 + i;
    const int KS = Dqk + 1, VS = Dv + 1, nk = min(keys, T - k0);
    float *ks = sm, *vs = ks + keys * KS, *dks = vs + keys * VS, *dvs = dks + keys * KS;
    float *qs = dvs + keys * VS, *dos = qs + FA_BWD_ROWS * Dqk, *lses = dos + FA_BWD_ROWS * Dv, *Ds = lses + FA_BWD_ROWS;
    load_rows(ks, KS, k, T, b, g, k0, nk, Dqk, T - 1);
    load_rows(vs, VS, v, T, b, g, k0, nk, Dv, T - 1);
    for (int e = threadIdx.x; e < keys * KS; e += blockDim.x) dks[e] = 0.0f;
    for (int e = threadIdx.x; e < keys * VS; e += blockDim.x) dvs[e] = 0.0f;
    for (int h = g * group; h < (g + 1) * group; h++) {
        const HeadView dov = {(floatX *)dout, H * Dv, Dv};
        for (int t0 = k0; t0 < T; t0 += FA_BWD_ROWS) {
            const int rows = min(FA_BWD_ROWS, T - t0);
            __syncthreads(); // the previous rows are consumed
            load_rows(qs, Dqk, q, T, b, h, t0, rows, Dqk, T - 1);
            load_rows(dos, Dv, dov, T, b, h, t0, rows, Dv, T - 1);
            for (int r = threadIdx.x; r < rows; r += blockDim.x) {
                lses[r] = lse[((size_t)b * H + h) * T + t0 + r];
                Ds[r] = Drow[((size_t)b * H + h) * T + t0 + r];
            }
            __syncthreads();
            if (i >= nk) continue; // past the sequence: this thread only helps load
            for (int r = 0; r < rows; r++) {
                if (s > t0 + r) continue; // causal: query t0 + r does not see key s
                const float sc = smem_dot(qs + r * Dqk, ks + i * KS, Dqk), dp = smem_dot(dos + r * Dv, vs + i * VS, Dv);
                const float p = expf(scale * sc - lses[r]), ds = p * (dp - Ds[r]) * scale;
                for (int j = 0; j < Dqk; j++) dks[i * KS + j] += ds * qs[r * Dqk + j];
                for (int j = 0; j < Dv; j++) dvs[i * VS + j] += p * dos[r * Dv + j];
            }
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nk * Dqk; e += blockDim.x) {
        floatX *d = head_at(dk, T, b, k0 + e / Dqk, g) + e % Dqk;
        *d = fx(tof(*d) + dks[(e / Dqk) * KS + e % Dqk]);
    }
    for (int e = threadIdx.x; e < nk * Dv; e += blockDim.x) {
        floatX *d = head_at(dv, T, b, k0 + e / Dv, g) + e % Dv;
        *d = fx(tof(*d) + dvs[(e / Dv) * VS + e % Dv]);
    }
}
static size_t attention_backward_query_smem(int Dqk, int Dv) {
    return (size_t)(FA_ROWS * (2 * Dqk + Dv) + FA_KEYS * (Dqk + 1 + Dv + 1) + FA_WARPS * FA_KEYS) * sizeof(float);
}
static size_t attention_backward_kv_smem(int keys, int Dqk, int Dv) {
    return (size_t)(2 * keys * (Dqk + 1 + Dv + 1) + FA_BWD_ROWS * (Dqk + Dv + 2)) * sizeof(float);
}
// the gradients of one layer's core into the views dv (+=); dat->lse holds D
static void attention_backward(AttnActs *dat, CoreViews dcv, const AttnActs *at, CoreViews cv, int B, int T, int H, int Dv,
                               float scale) {
    const int G = cv.kv_heads, Dqk = cv.dqk;
    attention_row_dot(dat->lse, dat->atty, at->atty, B, T, H, Dv);
    int keys = FA_BWD_KEYS; // wide heads (D 256: pythia-1b) take 32 keys a block
    while (keys > 32 && attention_backward_kv_smem(keys, Dqk, Dv) > device_prop.sharedMemPerBlockOptin) keys /= 2;
    const size_t smem_q = attention_backward_query_smem(Dqk, Dv), smem_kv = attention_backward_kv_smem(keys, Dqk, Dv);
    set_smem(attention_backward_query_kernel, smem_q, "the attention backward's query side (it grows with the head width)");
    set_smem(attention_backward_kv_kernel, smem_kv, "the attention backward's key side (it grows with the head width)");
    attention_backward_query_kernel<<<dim3(ceil_div(T, FA_ROWS), H, B), FA_WARPS * 32, smem_q>>>(
        dcv.q, dat->atty, at->lse, dat->lse, cv.q, cv.k, cv.v, T, H, G, Dqk, Dv, scale);
    launchCheck();
    attention_backward_kv_kernel<<<dim3(ceil_div(T, keys), G, B), keys, smem_kv>>>(
        dcv.k, dcv.v, dat->atty, at->lse, dat->lse, cv.q, cv.k, cv.v, T, H, G, Dqk, Dv, scale);
    launchCheck();
}

// The softmax of a block's scores[0..n), each thread holding the max of the entries it wrote
// (local_max): scores become exp(score − max) in place, and the return value is 1 / their sum.
// Every thread of the block calls it; the reductions' barriers make all scores visible after.
__device__ float block_exp_scores(float *scores, int n, float local_max) {
    const float mx = block_reduce_max(local_max);
    float sum = 0.0f;
    for (int s = threadIdx.x; s < n; s += blockDim.x) { scores[s] = expf(scores[s] - mx); sum += scores[s]; }
    return 1.0f / block_reduce_sum(sum);
}

// Decoding is split across blocks (flash-decoding, Dao et al. 2023): one block per (head,
// sequence) is B·H blocks, under one wave of a 132-SM GPU at batch 1, so each (head, sequence)'s
// n cached slots are cut into `splits` chunks, a block each. A chunk keeps its own max m, sum
// l = Σ exp(score − m) and unnormalised output o = Σ exp(score − m)·v, as part[..] = [m, l, o];
// decode_combine_kernel then gives o = Σ_j e^{m_j − M} o_j / Σ_j e^{m_j − M} l_j, M = max_j m_j.
// Every reduction has a fixed order, so the result does not depend on timing.
static int decode_splits(int blocks, int n) {
    const int sms = device_prop.multiProcessorCount > 0 ? device_prop.multiProcessorCount : 1;
    int splits = (2 * sms + blocks - 1) / blocks; // about two waves
    const int most = (n + DECODE_MIN_CHUNK - 1) / DECODE_MIN_CHUNK;
    return splits < 1 ? 1 : splits > most ? most : splits;
}

// the scores of chunk [s0, s1) (already in scores[s0..s1)) become exp(score − m) in place;
// returns m and sets *l = their sum. Every thread of the block calls it.
__device__ float chunk_exp_scores(float *scores, int s0, int s1, float local_max, float *l) {
    const float mx = block_reduce_max(local_max);
    float sum = 0.0f;
    for (int s = s0 + threadIdx.x; s < s1; s += blockDim.x) { scores[s] = expf(scores[s] - mx); sum += scores[s]; }
    *l = block_reduce_sum(sum); // its barriers make the scores visible to the whole block
    return mx;
}

// part (B, H, splits, 2 + W) -> the weight of each chunk, w_j = e^{m_j − M} / Σ_i e^{m_i − M} l_i,
// in w[0..splits) (shared memory); every thread of the block calls it
__device__ void combine_weights(const float *pt, int splits, int W, float *w) {
    if (threadIdx.x == 0) {
        float M = -INFINITY, L = 0.0f;
        for (int j = 0; j < splits; j++) M = fmaxf(M, pt[(size_t)j * (2 + W)]);
        for (int j = 0; j < splits; j++) { w[j] = expf(pt[(size_t)j * (2 + W)] - M); L += w[j] * pt[(size_t)j * (2 + W) + 1]; }
        for (int j = 0; j < splits; j++) w[j] /= L;
    }
    __syncthreads();
}

// o (B, H*W) = the combined chunks of part (B, H, splits, 2 + W); one block per (head, sequence)
__global__ void decode_combine_kernel(const float *part, floatX *out, int splits, int W) {
    extern __shared__ float w[];
    const int h = blockIdx.x, b = blockIdx.y, H = gridDim.x;
    const float *pt = part + ((size_t)b * H + h) * splits * (2 + W);
    combine_weights(pt, splits, W, w);
    for (int j = threadIdx.x; j < W; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < splits; k++) acc += w[k] * pt[(size_t)k * (2 + W) + 2 + j];
        out[((size_t)b * H + h) * W + j] = fx(acc);
    }
}

// Each sequence's new token (query heads q, one row per sequence) attends over its n = kv->n_attend
// cached slots in layer l, whose slots are [K of G heads | V of G heads]; out (B, H*D). One block per
// (head, sequence, chunk of `chunk` slots); its scratch holds the chunk's scores in fp32.
__global__ void cached_attention_kernel(KVCache kv, HeadView q, float *part, int l, int n, int chunk, int H, int D, int G,
                                        float scale, size_t per_head) {
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z, g = h / (H / G);
    const int s0 = split * chunk, s1 = min(n, s0 + chunk);
    float *scores = kv.scratch + ((size_t)b * H + h) * per_head;
    float *pt = part + (((size_t)b * H + h) * gridDim.z + split) * (2 + D); // [m, l, o (D)]
    const floatX *qh = head_at(q, 1, b, 0, h);
    float mx = -INFINITY;
    for (int s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
        const float *kslot = kv_slot(&kv, l, b, s) + g * D;
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += tof(qh[j]) * kslot[j];
        scores[s] = scale * d;
        mx = fmaxf(mx, scores[s]);
    }
    float sum;
    mx = chunk_exp_scores(scores, s0, s1, mx, &sum);
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = s0; s < s1; s++) acc += scores[s] * kv_slot(&kv, l, b, s)[(G + g) * D + j];
        pt[2 + j] = acc;
    }
    if (threadIdx.x == 0) { pt[0] = mx; pt[1] = sum; }
}
static void cached_attention(const Model *m, HeadView q, floatX *out, const KVCache *kv, int l, int G) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), n = kv->n_attend, splits = decode_splits(H * kv->batch, n);
    const int chunk = (n + splits - 1) / splits;
    float *part = (float *)dev_temp(TMP_SPLITS, (size_t)kv->batch * H * splits * (2 + D) * sizeof(float));
    cached_attention_kernel<<<dim3(H, kv->batch, splits), ATT_THREADS>>>(*kv, q, part, l, n, chunk, H, D, G, 1.0f / sqrtf((float)D),
                                                                        kv_scratch_per_head(c, kv->capacity));
    launchCheck();
    decode_combine_kernel<<<dim3(H, kv->batch), ATT_THREADS, splits * sizeof(float)>>>(part, out, splits, D);
    launchCheck();
}

// ----------------------------------------------------------------------------
// Attention variants (doc/attention.md), as in train_ctxkv.c: each variant is one stretch of
// code and one row of ATTN_VARIANTS (views, project_forward/backward, cache_write, decode).

// ---- MHA: Pythia's own attention. Fused QKV, interleaved per head: [q | k | v] of head h at h*3D.

static CoreViews mha_views(const Config *c, const AttnActs *at) {
    const int C = c->n_embd, H = c->n_head, D = head_dim(c);
    CoreViews v = {{at->qkv, 3 * C, 3 * D}, {at->qkv + D, 3 * C, 3 * D}, {at->qkv + 2 * D, 3 * C, 3 * D}, H, D};
    return v;
}

static void mha_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, int B, int T, int pos0) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg);
    matmul_forward(at->qkv, x, lp->qkv_w, lp->qkv_b, B * T, C, 3 * C);
    rope_forward(at->qkv, B, T, pos0, 3 * C, H, 3 * D, &m->rope);     // q
    rope_forward(at->qkv + D, B, T, pos0, 3 * C, H, 3 * D, &m->rope); // k
}

static void mha_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 floatX *dx, const floatX *x, int B, int T) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg);
    (void)at;
    rope_backward(dat->qkv, B, T, 0, 3 * C, H, 3 * D, &m->rope);
    rope_backward(dat->qkv + D, B, T, 0, 3 * C, H, 3 * D, &m->rope);
    matmul_backward(dx, lg->qkv_w, lg->qkv_b, dat->qkv, x, lp->qkv_w, B * T, C, 3 * C);
}

// slot: [K of the H heads | V of the H heads] (the GQA layout with G = H). One block per token.
// one block per token: row b·n + t into slot dst + b·seq_stride + t·2HD (one launch per layer)
__global__ void mha_cache_write_kernel(float *dst, const floatX *qkv, int n, size_t seq_stride, int H, int D) {
    const int row = blockIdx.x, b = row / n, t = row % n;
    const floatX *r = qkv + (size_t)row * 3 * H * D;
    float *slot = dst + b * seq_stride + (size_t)t * 2 * H * D;
    for (int e = threadIdx.x; e < 2 * H * D; e += blockDim.x) { // e = which*H*D + g*D + j
        const int which = e / (H * D), g = (e % (H * D)) / D, j = e % D;
        slot[e] = tof(r[g * 3 * D + (1 + which) * D + j]);
    }
}
static void mha_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    mha_cache_write_kernel<<<B * n, 128>>>(dst, at->qkv, n, seq_stride, c->n_head, head_dim(c));
    launchCheck();
}

static void mha_decode(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, KVCache *kv, int l) {
    mha_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    mha_cache_write(&m->cfg, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    const CoreViews v = mha_views(&m->cfg, at);
    cached_attention(m, v.q, at->atty, kv, l, v.kv_heads);
}

// ---- GQA / MQA (Ainslie et al. 2023; Shazeer 2019): G key/value heads, each shared by a group
// of H/G query heads (MQA: G = 1). q (H heads), then kv = [K of G heads | V of G heads].

static CoreViews gqa_views(const Config *c, const AttnActs *at) {
    const int H = c->n_head, D = head_dim(c), G = c->n_kv_head;
    CoreViews v = {{at->q, H * D, D}, {at->kv, 2 * G * D, D}, {at->kv + G * D, 2 * G * D, D}, G, D};
    return v;
}

static void gqa_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, int B, int T, int pos0) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg), G = m->cfg.n_kv_head;
    matmul_forward(at->q, x, lp->q_w, lp->q_b, B * T, C, H * D);
    matmul_forward(at->kv, x, lp->kv_w, lp->kv_b, B * T, C, 2 * G * D);
    rope_forward(at->q, B, T, pos0, H * D, H, D, &m->rope);
    rope_forward(at->kv, B, T, pos0, 2 * G * D, G, D, &m->rope); // the G key heads, before sharing
}

static void gqa_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 floatX *dx, const floatX *x, int B, int T) {
    const int C = m->cfg.n_embd, H = m->cfg.n_head, D = head_dim(&m->cfg), G = m->cfg.n_kv_head;
    (void)at;
    rope_backward(dat->q, B, T, 0, H * D, H, D, &m->rope);
    rope_backward(dat->kv, B, T, 0, 2 * G * D, G, D, &m->rope);
    matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, B * T, C, H * D);
    matmul_backward(dx, lg->kv_w, lg->kv_b, dat->kv, x, lp->kv_w, B * T, C, 2 * G * D);
}

// slot: [K of the G heads | V of the G heads], as projected
__global__ void gqa_cache_write_kernel(float *dst, const floatX *kv, int n, size_t seq_stride, int w) {
    const int row = blockIdx.x, b = row / n, t = row % n;
    float *slot = dst + b * seq_stride + (size_t)t * w;
    for (int e = threadIdx.x; e < w; e += blockDim.x) slot[e] = tof(kv[(size_t)row * w + e]);
}
static void gqa_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    gqa_cache_write_kernel<<<B * n, 128>>>(dst, at->kv, n, seq_stride, 2 * c->n_kv_head * head_dim(c));
    launchCheck();
}

static void gqa_decode(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, KVCache *kv, int l) {
    gqa_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    gqa_cache_write(&m->cfg, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    const CoreViews v = gqa_views(&m->cfg, at);
    cached_attention(m, v.q, at->atty, kv, l, v.kv_heads);
}

// ---- MLA (DeepSeek-V2, doc/attention.md): keys and values come from one latent per token,
//   ĉ = RMSNorm(W_DKV x) (kv_rank), [k_nope_h | v_h] = W_UK/UV_h ĉ,
// plus a decoupled RoPE key k_pe = RoPE(W_KR x) (d_R) shared by all heads; the query of head h is
// [q_nope_h | q_pe_h] (D + d_R), optionally from its own latent (q_rank). The cache keeps only ĉ
// and k_pe; decoding absorbs W_UK into the query and W_UV after the attention.

// RMSNorm (MLA's latent norms): y = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps). Weight only.
// inp rows are in_stride apart (MLA normalises the first kv_rank columns of a wider row).
__global__ void rmsnorm_forward_kernel(floatX *out, float *rstd, const floatX *inp, int in_stride, const floatX *w, int N,
                                       int C, float eps) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const floatX *x = inp + (size_t)n * in_stride;
    float ss = 0.0f;
    for (int i = lane; i < C; i += 32) ss += tof(x[i]) * tof(x[i]);
    ss = warp_reduce_sum(ss);
    const float r = 1.0f / sqrtf(ss / C + eps);
    for (int i = lane; i < C; i += 32) out[(size_t)n * C + i] = fx(tof(x[i]) * r * tof(w[i]));
    if (lane == 0) rstd[n] = r;
}
static void rmsnorm_forward(floatX *out, float *rstd, const floatX *inp, int in_stride, const floatX *w, int N, int C,
                            float eps) {
    rmsnorm_forward_kernel<<<ceil_div(N, 8), 256>>>(out, rstd, inp, in_stride, w, N, C, eps);
    launchCheck();
}

// dx += r·g − x·r³·mean(g⊙x), g = dy⊙w;  dw += Σ dy⊙x·r
__global__ void rmsnorm_backward_kernel(floatX *dinp, int in_stride, const floatX *dout, const floatX *inp,
                                        const floatX *w, const float *rstd, int N, int C) {
    const int lane = threadIdx.x % 32, n = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (n >= N) return;
    const floatX *x = inp + (size_t)n * in_stride, *dy = dout + (size_t)n * C;
    floatX *dx = dinp + (size_t)n * in_stride;
    const float r = rstd[n];
    float gx = 0.0f;
    for (int i = lane; i < C; i += 32) gx += tof(dy[i]) * tof(w[i]) * tof(x[i]);
    gx = warp_reduce_sum(gx) / C;
    for (int i = lane; i < C; i += 32) dx[i] = fx(tof(dx[i]) + r * tof(dy[i]) * tof(w[i]) - tof(x[i]) * r * r * r * gx);
}
struct RmsNormDW { // dy⊙x·r
    const floatX *dout, *inp; int in_stride; const float *rstd; int C;
    __device__ float operator()(int n, int i) const {
        return tof(dout[(size_t)n * C + i]) * tof(inp[(size_t)n * in_stride + i]) * rstd[n];
    }
};
static void rmsnorm_backward(floatX *dinp, int in_stride, floatX *dw, const floatX *dout, const floatX *inp,
                             const floatX *w, const float *rstd, int N, int C) {
    rmsnorm_backward_kernel<<<ceil_div(N, 8), 256>>>(dinp, in_stride, dout, inp, w, rstd, N, C);
    launchCheck();
    column_sum_add(dw, N, C, RmsNormDW{dout, inp, in_stride, rstd, C});
}

// A linear latent (mla_linear_latent, doc/retrofit.md): ĉ = c, the first R of each kv_a row
// (rows kva_stride apart) copied to latent (BT, R); backward: the rows' gradients added back.
__global__ void mla_copy_latent_kernel(floatX *latent, floatX *kv_a, int kva_stride, int BT, int R, int backward) {
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * R) return;
    floatX *a = kv_a + (idx / R) * kva_stride + idx % R;
    if (backward) *a = fx(tof(*a) + tof(latent[idx]));
    else latent[idx] = *a;
}
static void mla_copy_latent(floatX *latent, floatX *kv_a, int kva_stride, int BT, int R, int backward) {
    mla_copy_latent_kernel<<<ceil_div((size_t)BT * R, 256), 256>>>(latent, kv_a, kva_stride, BT, R, backward);
    launchCheck();
}

// MLA: k[bt][h] = [k_nope_h (from kvb) | k_pe (shared by all heads)]. One thread per entry.
__global__ void mla_gather_keys_kernel(floatX *k, const floatX *kvb, const floatX *kpe, int kpe_stride, int BT, int H, int D, int dR) {
    const int Dq = D + dR;
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * H * Dq) return;
    const int j = (int)(idx % Dq);
    const size_t nh = idx / Dq, n = nh / H; // nh = n*H + h
    k[idx] = j < D ? kvb[nh * 2 * D + j] : kpe[n * kpe_stride + j - D];
}
static void mla_gather_keys(floatX *k, const floatX *kvb, const floatX *kpe, int kpe_stride, int BT, int H, int D, int dR) {
    mla_gather_keys_kernel<<<ceil_div((size_t)BT * H * (D + dR), 256), 256>>>(k, kvb, kpe, kpe_stride, BT, H, D, dR);
    launchCheck();
}

// its backward: dk_nope to its head in dkvb, dk_pe summed over the heads that share it.
// One thread per (token, column): the k_pe columns loop over the heads in order.
__global__ void mla_gather_keys_backward_kernel(floatX *dkvb, floatX *dkpe, int kpe_stride, const floatX *dk, int BT, int H,
                                                int D, int dR) {
    const int Dq = D + dR;
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)BT * (H * D + dR)) return;
    const size_t n = idx / (H * D + dR);
    const int col = (int)(idx % (H * D + dR));
    if (col < H * D) { // k_nope of head h, dim j
        const int h = col / D, j = col % D;
        floatX *dst = dkvb + (n * H + h) * 2 * D + j;
        *dst = fx(tof(*dst) + tof(dk[(n * H + h) * Dq + j]));
    } else { // k_pe dim j, shared
        const int j = col - H * D;
        float s = 0.0f;
        for (int h = 0; h < H; h++) s += tof(dk[(n * H + h) * Dq + D + j]);
        floatX *dst = dkpe + n * kpe_stride + j;
        *dst = fx(tof(*dst) + s);
    }
}
static void mla_gather_keys_backward(floatX *dkvb, floatX *dkpe, int kpe_stride, const floatX *dk, int BT, int H, int D, int dR) {
    mla_gather_keys_backward_kernel<<<ceil_div((size_t)BT * (H * D + dR), 256), 256>>>(dkvb, dkpe, kpe_stride, dk, BT, H, D, dR);
    launchCheck();
}

// q and k per head [nope (D) | rope (dR)]; v is the second half of kvb's head. The core sees H
// key heads: training materialises one key per query head (mla_gather_keys).
static CoreViews mla_views(const Config *c, const AttnActs *at) {
    const int H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, ATTN_MLA);
    CoreViews v = {{at->q, H * Dq, Dq}, {at->k, H * Dq, Dq}, {at->kvb + D, H * 2 * D, 2 * D}, H, Dq};
    return v;
}

static void mla_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, int B, int T, int pos0) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), R = c->kv_rank, dR = c->mla_rope_dim;
    const int Dq = D + dR, KVA = R + dR;
    if (c->q_rank > 0) { // query compression: q = W_UQ · RMSNorm(W_DQ x)
        matmul_forward(at->q_lat, x, lp->q_a_w, NULL, BT, C, c->q_rank);
        rmsnorm_forward(at->q_lat_norm, at->q_lat_rstd, at->q_lat, c->q_rank, lp->q_a_norm_w, BT, c->q_rank, c->rms_eps);
        matmul_forward(at->q, at->q_lat_norm, lp->q_b_w, NULL, BT, c->q_rank, H * Dq);
    } else {
        matmul_forward(at->q, x, lp->q_w, NULL, BT, C, H * Dq);
    }
    const int S = c->mla_rope_split, Rs = dR / S; // RoPE groups of Rs dims
    for (int s = 0; s < S; s++) rope_forward(at->q + D + s * Rs, B, T, pos0, H * Dq, H, Dq, &m->mla_rope); // q_pe
    matmul_forward(at->kv_a, x, lp->kv_a_w, NULL, BT, C, KVA);               // [c | k_R]
    rope_forward(at->kv_a + R, B, T, pos0, KVA, S, Rs, &m->mla_rope);        // k_pe
    if (c->mla_linear_latent) mla_copy_latent(at->c_norm, at->kv_a, KVA, BT, R, 0);
    else rmsnorm_forward(at->c_norm, at->c_rstd, at->kv_a, KVA, lp->kv_a_norm_w, BT, R, c->rms_eps);
    matmul_forward(at->kvb, at->c_norm, lp->kv_b_w, NULL, BT, R, H * 2 * D); // [k_nope | v]
    mla_gather_keys(at->k, at->kvb, at->kv_a + R, KVA, BT, H, D, dR);
}

static void mla_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 floatX *dx, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), R = c->kv_rank, dR = c->mla_rope_dim;
    const int Dq = D + dR, KVA = R + dR;
    mla_gather_keys_backward(dat->kvb, dat->kv_a + R, KVA, dat->k, BT, H, D, dR);
    const int S = c->mla_rope_split, Rs = dR / S;
    rope_backward(dat->kv_a + R, B, T, 0, KVA, S, Rs, &m->mla_rope);
    for (int s = 0; s < S; s++) rope_backward(dat->q + D + s * Rs, B, T, 0, H * Dq, H, Dq, &m->mla_rope);
    matmul_backward(dat->c_norm, lg->kv_b_w, NULL, dat->kvb, at->c_norm, lp->kv_b_w, BT, R, H * 2 * D);
    if (c->mla_linear_latent) mla_copy_latent(dat->c_norm, dat->kv_a, KVA, BT, R, 1);
    else rmsnorm_backward(dat->kv_a, KVA, lg->kv_a_norm_w, dat->c_norm, at->kv_a, lp->kv_a_norm_w, at->c_rstd, BT, R);
    matmul_backward(dx, lg->kv_a_w, NULL, dat->kv_a, x, lp->kv_a_w, BT, C, KVA);
    if (c->q_rank > 0) {
        matmul_backward(dat->q_lat_norm, lg->q_b_w, NULL, dat->q, at->q_lat_norm, lp->q_b_w, BT, c->q_rank, H * Dq);
        rmsnorm_backward(dat->q_lat, c->q_rank, lg->q_a_norm_w, dat->q_lat_norm, at->q_lat, lp->q_a_norm_w, at->q_lat_rstd, BT, c->q_rank);
        matmul_backward(dx, lg->q_a_w, NULL, dat->q_lat, x, lp->q_a_w, BT, C, c->q_rank);
    } else {
        matmul_backward(dx, lg->q_w, NULL, dat->q, x, lp->q_w, BT, C, H * Dq);
    }
}

// slot: [ĉ (kv_rank) | k_pe (dR)]
__global__ void mla_cache_write_kernel(float *dst, const floatX *c_norm, const floatX *kv_a, int n, size_t seq_stride, int R,
                                       int dR) {
    const int row = blockIdx.x, b = row / n, t = row % n;
    float *slot = dst + b * seq_stride + (size_t)t * (R + dR);
    for (int e = threadIdx.x; e < R + dR; e += blockDim.x)
        slot[e] = e < R ? tof(c_norm[(size_t)row * R + e]) : tof(kv_a[(size_t)row * (R + dR) + e]);
}
static void mla_cache_write(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride) {
    mla_cache_write_kernel<<<B * n, 128>>>(dst, at->c_norm, at->kv_a, n, seq_stride, c->kv_rank, c->mla_rope_dim);
    launchCheck();
}

// The absorbed form: score_s = q_nope·W_UK ĉ_s + q_pe·k_pe_s = (W_UKᵀ q_nope)·ĉ_s + q_pe·k_pe_s,
// and o = W_UV Σ_s P_s ĉ_s, so only the cached latents and rope keys are ever read. Split as
// cached_attention is (flash-decoding): one block per (head, sequence, chunk) forms q̃ in shared
// memory and its chunk's [m, l, Σ exp(score − m) ĉ] (R); mla_combine_kernel combines the chunks
// into ō and applies W_UV.
__global__ void mla_decode_kernel(KVCache kv, LayerParams lp, HeadView q, float *part, int l, int n, int chunk, int H, int D,
                                  int R, int dR, float scale, size_t per_head) {
    extern __shared__ float q_abs[]; // q̃ = W_UK_hᵀ q_nope   (R)
    const int h = blockIdx.x, b = blockIdx.y, split = blockIdx.z;
    const int s0 = split * chunk, s1 = min(n, s0 + chunk);
    float *scores = kv.scratch + ((size_t)b * H + h) * per_head;
    float *pt = part + (((size_t)b * H + h) * gridDim.z + split) * (2 + R); // [m, l, Σ exp(score − m) ĉ (R)]
    const floatX *qh = head_at(q, 1, b, 0, h);
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < D; j++) s += tof(qh[j]) * tof(lp.kv_b_w[((size_t)h * 2 * D + j) * R + r]);
        q_abs[r] = s;
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int s = s0 + threadIdx.x; s < s1; s += blockDim.x) {
        const float *slot = kv_slot(&kv, l, b, s);
        float d1 = 0.0f, d2 = 0.0f;
        for (int r = 0; r < R; r++) d1 += q_abs[r] * slot[r];
        for (int i = 0; i < dR; i++) d2 += tof(qh[D + i]) * slot[R + i];
        scores[s] = scale * (d1 + d2);
        mx = fmaxf(mx, scores[s]);
    }
    float sum;
    mx = chunk_exp_scores(scores, s0, s1, mx, &sum);
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        float acc = 0.0f;
        for (int s = s0; s < s1; s++) acc += scores[s] * kv_slot(&kv, l, b, s)[r];
        pt[2 + r] = acc;
    }
    if (threadIdx.x == 0) { pt[0] = mx; pt[1] = sum; }
}
// ō = the combined chunks (R, shared), then o_h = W_UV_h ō (D); one block per (head, sequence)
__global__ void mla_combine_kernel(const float *part, LayerParams lp, floatX *atty, int splits, int D, int R) {
    extern __shared__ float w[]; // the chunks' weights (splits), then ō (R)
    const int h = blockIdx.x, b = blockIdx.y, H = gridDim.x;
    const float *pt = part + ((size_t)b * H + h) * splits * (2 + R);
    float *o_lat = w + splits;
    combine_weights(pt, splits, R, w);
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < splits; k++) acc += w[k] * pt[(size_t)k * (2 + R) + 2 + r];
        o_lat[r] = acc;
    }
    __syncthreads();
    floatX *o = atty + ((size_t)b * H + h) * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { // W_UV_h ō
        float acc = 0.0f;
        for (int r = 0; r < R; r++) acc += tof(lp.kv_b_w[((size_t)h * 2 * D + D + j) * R + r]) * o_lat[r];
        o[j] = fx(acc);
    }
}
static void mla_decode(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, KVCache *kv, int l) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), R = c->kv_rank, n = kv->n_attend, splits = decode_splits(H * kv->batch, n);
    const int chunk = (n + splits - 1) / splits;
    mla_project_forward(m, lp, at, x, kv->batch, 1, kv->pos);
    mla_cache_write(c, at, kv->batch, 1, kv_slot(kv, l, 0, kv->write_slot), kv_seq_stride(kv));
    float *part = (float *)dev_temp(TMP_SPLITS, (size_t)kv->batch * H * splits * (2 + R) * sizeof(float));
    set_smem(mla_decode_kernel, R * sizeof(float), "MLA's decode (it grows with kv_rank)");
    mla_decode_kernel<<<dim3(H, kv->batch, splits), ATT_THREADS, R * sizeof(float)>>>(*kv, *lp, mla_views(c, at).q, part, l, n, chunk, H, D,
                                                                                    R, c->mla_rope_dim, 1.0f / sqrtf((float)(D + c->mla_rope_dim)),
                                                                                    kv_scratch_per_head(c, kv->capacity));
    launchCheck();
    set_smem(mla_combine_kernel, (splits + R) * sizeof(float), "MLA's decode combine (it grows with kv_rank)");
    mla_combine_kernel<<<dim3(H, kv->batch), ATT_THREADS, (splits + R) * sizeof(float)>>>(part, *lp, at->atty, splits, D, R);
    launchCheck();
}

// ---- Context-KV (doc/context_kv.md): layer 0 attends over contexts instead of tokens. A
// ContextBlock runs the recurrence c_t = LN_c(c_{t-1} + GELU(W_c [c_{t-1}; LN_e(e_t)] + b_c)) over the
// token embeddings; query t attends over M slots, slot k holding the key/value of the context at
// t − k·I. The block is trained first and alone (phase 1: OACD, by parallel Jacobi iteration) and
// then frozen, so its contexts are constants for the rest of the model (phase 2).

// Context-KV attention (layer 0, doc/context_kv.md). Query t attends over M slots: slot k
// holds the key/value of the context at s = t − k·I when s >= 0; empty slots are masked out.
// No positional encoding: the slot order and the recurrence carry position.
// q, kc, vc (B,T,H*D) (kc/vc indexed by the source position s), out (B,T,H*D). As the causal
// core, it keeps only each row's logsumexp, lse (B,H,T): backward recomputes the slots' P.
// One block per query row (t, h, b), the row's slot scores in shared memory.
__global__ void ctx_attention_forward_kernel(floatX *out, float *lse, const floatX *q, const floatX *kc, const floatX *vc,
                                             int T, int H, int D, int interval, int M) {
    extern __shared__ float sm[];
    float *qs = sm, *p = sm + D; // q (D), slot scores (M)
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    const floatX *qt = q + ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) qs[j] = tof(qt[j]);
    __syncthreads();
    const int n = min(M, t / interval + 1); // filled slots: s = t, t−I, … while s >= 0
    float mx = -INFINITY;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const floatX *ks = kc + ((size_t)b * T + t - k * interval) * C + h * D;
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += qs[j] * tof(ks[j]);
        p[k] = scale * d;
        mx = fmaxf(mx, p[k]);
    }
    mx = block_reduce_max(mx);
    float sum = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        p[k] = expf(p[k] - mx);
        sum += p[k];
    }
    sum = block_reduce_sum(sum); // its barriers also make every p[k] visible
    const float inv = 1.0f / sum;
    if (threadIdx.x == 0) lse[((size_t)b * H + h) * T + t] = mx + logf(sum);
    floatX *o = out + ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += p[k] * tof(vc[((size_t)b * T + t - k * interval) * C + h * D + j]);
        o[j] = fx(acc * inv);
    }
}
static void ctx_attention_forward(AttnActs *at, int B, int T, int H, int D, int interval, int M) {
    const size_t smem = (size_t)(D + M) * sizeof(float);
    set_smem(ctx_attention_forward_kernel, smem, "Context-KV's attention forward (it grows with max contexts)");
    ctx_attention_forward_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(at->atty, at->lse, at->q, at->kc, at->vc, T, H, D,
                                                                       interval, M);
    launchCheck();
}

// With P recomputed from lse and D = rowsum(dO ⊙ O) (attention_row_dot):
// dP = dO·V_s, dS = P⊙(dP − D)·scale, dq += Σ dS·K_s, dK_s += dS·q, dV_s += P·dO.
// As attention_backward, one writer per output row: the query side per query row (t, h, b)
// forms its slots' dS (shared memory) and dq; the source side, a warp per source row
// (s, h, b), gathers the query rows t = s + k·I that read it through slot k.
__global__ void ctx_attention_backward_query_kernel(floatX *dq, const floatX *dout, const float *lse, const float *Drow,
                                                    const floatX *q, const floatX *kc, const floatX *vc, int T, int H, int D,
                                                    int interval, int M) {
    extern __shared__ float sm[];
    float *qs = sm, *dos = sm + D, *ds = sm + 2 * D; // q row (D), dO row (D), dS (M)
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t row = ((size_t)b * H + h) * T + t, at_t = ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { qs[j] = tof(q[at_t + j]); dos[j] = tof(dout[at_t + j]); }
    __syncthreads();
    const int n = min(M, t / interval + 1);
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const size_t src = ((size_t)b * T + t - k * interval) * C + h * D;
        float sc = 0.0f, dp = 0.0f;
        for (int j = 0; j < D; j++) { sc += qs[j] * tof(kc[src + j]); dp += dos[j] * tof(vc[src + j]); }
        ds[k] = expf(scale * sc - lse[row]) * (dp - Drow[row]) * scale;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += ds[k] * tof(kc[((size_t)b * T + t - k * interval) * C + h * D + j]);
        dq[at_t + j] = fx(tof(dq[at_t + j]) + acc);
    }
}
// CTX_SRC_WARPS warps a block, one source row each; lane j owns columns j, j + 32, ... of dk_s
// and dv_s, summed in shared memory (2·D floats per warp)
#define CTX_SRC_WARPS 4
__global__ void ctx_attention_backward_source_kernel(floatX *dkc, floatX *dvc, const floatX *dout, const float *lse,
                                                     const float *Drow, const floatX *q, const floatX *kc, const floatX *vc,
                                                     int T, int H, int D, int interval, int M) {
    extern __shared__ float sm[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int s = blockIdx.x * (blockDim.x / 32) + warp, h = blockIdx.y, b = blockIdx.z, C = H * D;
    if (s >= T) return; // the whole warp
    const float scale = 1.0f / sqrtf((float)D);
    float *ak = sm + (size_t)warp * 2 * D, *av = ak + D;
    const size_t at_s = ((size_t)b * T + s) * C + h * D;
    for (int j = lane; j < D; j += 32) ak[j] = av[j] = 0.0f;
    for (int k = 0; k < M && s + k * interval < T; k++) { // query t = s + k·I reads s through slot k
        const int t = s + k * interval;
        const size_t row = ((size_t)b * H + h) * T + t, at_t = ((size_t)b * T + t) * C + h * D;
        float sc = 0.0f, dp = 0.0f;
        for (int j = lane; j < D; j += 32) { sc += tof(q[at_t + j]) * tof(kc[at_s + j]); dp += tof(dout[at_t + j]) * tof(vc[at_s + j]); }
        sc = warp_reduce_sum(sc);
        dp = warp_reduce_sum(dp);
        const float p = expf(scale * sc - lse[row]), ds = p * (dp - Drow[row]) * scale;
        for (int j = lane; j < D; j += 32) { ak[j] += ds * tof(q[at_t + j]); av[j] += p * tof(dout[at_t + j]); }
    }
    for (int j = lane; j < D; j += 32) {
        dkc[at_s + j] = fx(tof(dkc[at_s + j]) + ak[j]);
        dvc[at_s + j] = fx(tof(dvc[at_s + j]) + av[j]);
    }
}
static void ctx_attention_backward(AttnActs *dat, const AttnActs *at, int B, int T, int H, int D, int interval, int M) {
    attention_row_dot(dat->lse, dat->atty, at->atty, B, T, H, D);
    const size_t smem = (size_t)(2 * D + M) * sizeof(float);
    set_smem(ctx_attention_backward_query_kernel, smem, "Context-KV's attention backward (it grows with max contexts)");
    ctx_attention_backward_query_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(dat->q, dat->atty, at->lse, dat->lse, at->q, at->kc,
                                                                              at->vc, T, H, D, interval, M);
    launchCheck();
    ctx_attention_backward_source_kernel<<<dim3(ceil_div(T, CTX_SRC_WARPS), H, B), CTX_SRC_WARPS * 32,
                                           (size_t)CTX_SRC_WARPS * 2 * D * sizeof(float)>>>(
        dat->kc, dat->vc, dat->atty, at->lse, dat->lse, at->q, at->kc, at->vc, T, H, D, interval, M);
    launchCheck();
}
// q from the token; keys and values of every context (constants: no gradient flows into them)
static void ctx_project_forward(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, int B, int T, int pos0) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd;
    (void)pos0; // no positional encoding: the slot order and the recurrence carry position
    matmul_forward(at->q, x, lp->q_w, lp->q_b, BT, C, C);
    matmul_forward(at->kc, m->a.contexts, lp->k_w, lp->k_b, BT, c->context_dim, C);
    matmul_forward(at->vc, m->a.contexts, lp->v_w, lp->v_b, BT, c->context_dim, C);
}

static void ctx_project_backward(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                                 floatX *dx, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd;
    (void)at;
    matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, BT, C, C);
    matmul_backward(NULL, lg->k_w, lg->k_b, dat->kc, m->a.contexts, lp->k_w, BT, c->context_dim, C);
    matmul_backward(NULL, lg->v_w, lg->v_b, dat->vc, m->a.contexts, lp->v_w, BT, c->context_dim, C);
}

// Slot k of the new token at n−1 = kv->pos is the context of position n−1 − k·I, while it exists; its key
// and value are recomputed from the ring (kvcache_push_context keeps the contexts there).
// One block per (head, sequence); its scratch holds the slots' keys, values and scores in fp32.
__global__ void ctx_decode_kernel(KVCache kv, LayerParams lp, const floatX *q, floatX *atty, int n, int H, int D, int R, int I,
                                  int M, int dc, float scale, size_t per_head) {
    const int h = blockIdx.x, b = blockIdx.y;
    float *scores = kv.scratch + ((size_t)b * H + h) * per_head;
    float *keys = scores + kv.capacity + 2 * R, *vals = keys + (size_t)M * D;
    floatX *o = atty + ((size_t)b * H + h) * D;
    const floatX *qh = q + (size_t)b * H * D + h * D;
    const int slots = min(M, (n - 1) / I + 1);
    for (int e = threadIdx.x; e < slots * D; e += blockDim.x) { // this head's rows of W_k and W_v
        const int k = e / D, j = e % D;
        const float *ctx = kv.ring + ((size_t)b * kv.ring_len + (n - 1 - k * I) % kv.ring_len) * dc;
        const floatX *wk = lp.k_w + (size_t)(h * D + j) * dc, *wv = lp.v_w + (size_t)(h * D + j) * dc;
        float sk = 0.0f, sv = 0.0f;
        for (int i = 0; i < dc; i++) { sk += tof(wk[i]) * ctx[i]; sv += tof(wv[i]) * ctx[i]; }
        keys[e] = sk + tof(lp.k_b[h * D + j]);
        vals[e] = sv + tof(lp.v_b[h * D + j]);
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int k = threadIdx.x; k < slots; k += blockDim.x) {
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += tof(qh[j]) * keys[k * D + j];
        scores[k] = scale * d;
        mx = fmaxf(mx, scores[k]);
    }
    const float inv = block_exp_scores(scores, slots, mx);
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < slots; k++) acc += scores[k] * inv * vals[k * D + j];
        o[j] = fx(acc);
    }
}
static void ctx_decode(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, KVCache *kv, int l) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), C = c->n_embd;
    (void)l;
    matmul_forward(at->q, x, lp->q_w, lp->q_b, kv->batch, C, C); // only the query: the slots come from the ring
    ctx_decode_kernel<<<dim3(H, kv->batch), ATT_THREADS>>>(*kv, *lp, at->q, at->atty, kv->pos + 1, H, D, c->kv_rank,
                                                          c->context_interval, c->max_contexts, c->context_dim,
                                                          1.0f / sqrtf((float)D), kv_scratch_per_head(c, kv->capacity));
    launchCheck();
}

static size_t blockacts_layout(BlockActs *cb, char *base, size_t N, size_t E, size_t dc) {
    size_t off = 0;
    BUF(cb->u, N * E); BUF(cb->u_mean, N); BUF(cb->u_rstd, N); BUF(cb->z, N * (dc + E)); BUF(cb->pre, N * dc);
    BUF(cb->g, N * dc); BUF(cb->r, N * dc); BUF(cb->r_mean, N); BUF(cb->r_rstd, N); BUF(cb->out, N * dc);
    BUF(cb->dr, N * dc); BUF(cb->dpre, N * dc); BUF(cb->dz, N * (dc + E)); BUF(cb->du, N * E); BUF(cb->dE, N * E);
    return off;
}

static void blockacts_ensure(BlockActs *cb, int N, int E, int dc) {
    if (N <= cb->cap) return;
    cuda_free(cb->mem);
    cb->mem = (char *)cuda_malloc_check(blockacts_layout(cb, NULL, N, E, dc), "context block");
    blockacts_layout(cb, cb->mem, N, E, dc);
    cb->cap = N;
}

// z[n] = [S[n] ; u[n]]
__global__ void concat_rows_kernel(floatX *z, const floatX *S, const floatX *u, int N, int dc, int Ed) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * (dc + Ed)) return;
    const size_t n = idx / (dc + Ed);
    const int j = (int)(idx % (dc + Ed));
    z[idx] = j < dc ? S[n * dc + j] : u[n * Ed + j - dc];
}
// dst[n] = src[n][col0 .. col0+width)   (src rows of src_width)
__global__ void copy_cols_kernel(floatX *dst, const floatX *src, int N, int src_width, int col0, int width) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * width) return;
    dst[idx] = src[(idx / width) * src_width + col0 + idx % width];
}
// out = a + b
__global__ void add_kernel(floatX *out, const floatX *a, const floatX *b, size_t N) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < N) out[i] = fx(tof(a[i]) + tof(b[i]));
}

static void contextblock_forward(BlockActs *cb, const Params *p, const floatX *S, const floatX *E, int N, int Ed, int dc,
                                 float eps) {
    layernorm_forward(cb->u, cb->u_mean, cb->u_rstd, E, p->ctx_ln_e_w, p->ctx_ln_e_b, N, Ed, eps);
    concat_rows_kernel<<<ceil_div((size_t)N * (dc + Ed), 256), 256>>>(cb->z, S, cb->u, N, dc, Ed); // z = [S ; u]
    launchCheck();
    matmul_forward(cb->pre, cb->z, p->ctx_w, p->ctx_b, N, dc + Ed, dc);
    gelu_forward(cb->g, cb->pre, (size_t)N * dc);
    add_kernel<<<ceil_div((size_t)N * dc, 256), 256>>>(cb->r, S, cb->g, (size_t)N * dc);
    launchCheck();
    layernorm_forward(cb->out, cb->r_mean, cb->r_rstd, cb->r, p->ctx_ln_c_w, p->ctx_ln_c_b, N, dc, eps);
}

// Gradients of the block's parameters only (into g): S is a constant (detached iterate) and
// E belongs to the frozen embeddings, so their gradients are not formed.
static void contextblock_backward(BlockActs *cb, const Params *p, Params *g, const floatX *dout, const floatX *E, int N,
                                  int Ed, int dc) {
    cudaCheck(cudaMemset(cb->dr, 0, (size_t)N * dc * sizeof(floatX)));
    layernorm_backward(cb->dr, g->ctx_ln_c_w, g->ctx_ln_c_b, dout, cb->r, p->ctx_ln_c_w, cb->r_mean, cb->r_rstd, N, dc);
    cudaCheck(cudaMemset(cb->dpre, 0, (size_t)N * dc * sizeof(floatX)));
    gelu_backward(cb->dpre, cb->pre, cb->dr, (size_t)N * dc); // dr reaches g through the residual
    cudaCheck(cudaMemset(cb->dz, 0, (size_t)N * (dc + Ed) * sizeof(floatX)));
    matmul_backward(cb->dz, g->ctx_w, g->ctx_b, cb->dpre, cb->z, p->ctx_w, N, dc + Ed, dc);
    copy_cols_kernel<<<ceil_div((size_t)N * Ed, 256), 256>>>(cb->du, cb->dz, N, dc + Ed, dc, Ed);
    launchCheck();
    cudaCheck(cudaMemset(cb->dE, 0, (size_t)N * Ed * sizeof(floatX)));
    layernorm_backward(cb->dE, g->ctx_ln_e_w, g->ctx_ln_e_b, cb->du, E, p->ctx_ln_e_w, cb->u_mean, cb->u_rstd, N, Ed);
}

// compute_contexts' per-step gather: prev[b] = contexts[b, t-1] (0 at t = 0), emb[b] = embed_in[ids[b, t]]
__global__ void contexts_gather_kernel(floatX *prev, floatX *emb, const floatX *contexts, const floatX *embed_in,
                                       const int *inputs, int B, int T, int t, int dc, int Ed) {
    const int b = blockIdx.x;
    for (int j = threadIdx.x; j < dc; j += blockDim.x)
        prev[(size_t)b * dc + j] = t > 0 ? contexts[((size_t)b * T + t - 1) * dc + j] : fx(0.0f);
    for (int j = threadIdx.x; j < Ed; j += blockDim.x)
        emb[(size_t)b * Ed + j] = embed_in[(size_t)inputs[b * T + t] * Ed + j];
}
// and its scatter: contexts[b, t] = out[b]
__global__ void contexts_scatter_kernel(floatX *contexts, const floatX *out, int T, int t, int dc) {
    const int b = blockIdx.x;
    for (int j = threadIdx.x; j < dc; j += blockDim.x) contexts[((size_t)b * T + t) * dc + j] = out[(size_t)b * dc + j];
}

// The exact recurrence c_t = ContextBlock(c_{t-1}, e_t), c_{-1} = 0 at each sequence start,
// from the current embed_in: one time step after another, the B sequences of a step at once.
// Writes m->a.contexts (B,T,d_c). No gradient is ever formed through it (constants).
// inputs are on the GPU.
static void compute_contexts(Model *m, const int *inputs, int B, int T) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim;
    blockacts_ensure(&m->cb, B, Ed, dc);
    floatX *prev = (floatX *)dev_temp(TMP_EMB, (size_t)B * (dc + Ed) * sizeof(floatX)), *emb = prev + (size_t)B * dc;
    for (int t = 0; t < T; t++) {
        contexts_gather_kernel<<<B, 128>>>(prev, emb, m->a.contexts, m->p.embed_in, inputs, B, T, t, dc, Ed);
        launchCheck();
        contextblock_forward(&m->cb, &m->p, prev, emb, B, Ed, dc, c->ln_eps);
        contexts_scatter_kernel<<<B, 128>>>(m->a.contexts, m->cb.out, T, t, dc);
        launchCheck();
    }
}
__global__ void cast_to_float_kernel(float *dst, const floatX *src, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = tof(src[i]);
}

// stores context c_pos of sequence b (ctx: floatX on the GPU) in the ring and as its running context
static void kvcache_push_context(const Config *c, KVCache *kv, int b, int pos, const floatX *ctx) {
    const int dc = c->context_dim;
    if (kv->ring_len) {
        cast_to_float_kernel<<<ceil_div(dc, 256), 256>>>(kv->ring + ((size_t)b * kv->ring_len + pos % kv->ring_len) * dc, ctx, dc);
        launchCheck();
    }
    cast_to_float_kernel<<<ceil_div(dc, 256), 256>>>(kv->running + (size_t)b * dc, ctx, dc);
    launchCheck();
}
// Per slice of `slice` consecutive rows of X (N,d) and column j: the column mean μ_j and
// Σ_i (X_ij − μ_j)², in double as the CPU program. One thread per (slice, column).
__global__ void oacd_stats_kernel(double *mu, double *dev, const floatX *X, int N, int d, int slice) {
    const int s = blockIdx.x, s0 = s * slice, n = min(slice, N - s0);
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        double m_ = 0.0;
        for (int i = 0; i < n; i++) m_ += tof(X[(size_t)(s0 + i) * d + j]);
        m_ /= n;
        double e2 = 0.0;
        for (int i = 0; i < n; i++) { double e = tof(X[(size_t)(s0 + i) * d + j]) - m_; e2 += e * e; }
        mu[(size_t)s * d + j] = m_;
        dev[(size_t)s * d + j] = e2;
    }
}
// the statistics of every slice, on the host: mu, dev (n_slices, d) doubles
static void oacd_stats(double *mu, double *dev, const floatX *X, int N, int d, int slice) {
    const int n_slices = (N + slice - 1) / slice;
    double *dm = (double *)dev_temp(TMP_OACD, 2 * (size_t)n_slices * d * sizeof(double));
    oacd_stats_kernel<<<n_slices, 256>>>(dm, dm + (size_t)n_slices * d, X, N, d, slice);
    launchCheck();
    cudaCheck(cudaMemcpy(mu, dm, (size_t)n_slices * d * sizeof(double), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(dev, dm + (size_t)n_slices * d, (size_t)n_slices * d * sizeof(double), cudaMemcpyDeviceToHost));
}
// OACD diversity loss on rows X (N,d), per slice of `slice` consecutive rows, averaged:
//   L_slice = −||X − 1μᵀ||_F / n + λ·||μ||²,   μ = mean of the slice's n rows
// The Frobenius norm is not squared: it rewards spread without letting one direction dominate.
static float oacd_forward(const floatX *X, int N, int d, int slice, float lambda) {
    const int n_slices_all = (N + slice - 1) / slice;
    double *mu = (double *)malloc_check(2 * (size_t)n_slices_all * d * sizeof(double), "oacd"), *dev = mu + (size_t)n_slices_all * d;
    oacd_stats(mu, dev, X, N, d, slice);
    double total = 0.0;
    int n_slices = 0;
    for (int s0 = 0; s0 < N; s0 += slice, n_slices++) {
        int n = N - s0 < slice ? N - s0 : slice;
        double mu_sq = 0.0, dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            double m_ = mu[(size_t)n_slices * d + j];
            mu_sq += m_ * m_;
            dev_sq += dev[(size_t)n_slices * d + j];
        }
        total += -sqrt(dev_sq) / n + lambda * mu_sq;
    }
    free(mu);
    return (float)(total / n_slices);
}

// dX_t = (−(X_t − μ)/||X − 1μᵀ||_F + 2λμ) / n per slice, / number of slices. (The centring
// drops out of the first term because the deviations of a slice sum to zero.)
__global__ void oacd_backward_kernel(floatX *dX, const floatX *X, const float *mu, const float *inv_F, int N, int d,
                                     int slice, int n_slices, float lambda) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= (size_t)N * d) return;
    const int row = (int)(idx / d), j = (int)(idx % d), s = row / slice, n = min(slice, N - s * slice);
    const float scale = 1.0f / ((float)n * n_slices), m_ = mu[(size_t)s * d + j];
    dX[idx] = fx(scale * (-(tof(X[idx]) - m_) * inv_F[s] + 2.0f * lambda * m_));
}
static void oacd_backward(floatX *dX, const floatX *X, int N, int d, int slice, float lambda) {
    int n_slices = (N + slice - 1) / slice;
    double *mu = (double *)malloc_check(2 * (size_t)n_slices * d * sizeof(double), "oacd"), *dev = mu + (size_t)n_slices * d;
    oacd_stats(mu, dev, X, N, d, slice);
    // per slice: μ as float and 1/||X − 1μᵀ||_F, to the GPU
    float *host = (float *)malloc_check(((size_t)n_slices * d + n_slices) * sizeof(float), "oacd");
    for (int s = 0; s < n_slices; s++) {
        double dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            host[(size_t)s * d + j] = (float)mu[(size_t)s * d + j];
            dev_sq += dev[(size_t)s * d + j];
        }
        float F = (float)sqrt(dev_sq);
        host[(size_t)n_slices * d + s] = F > 1e-12f ? 1.0f / F : 0.0f;
    }
    float *dh = (float *)dev_temp(TMP_UPLOAD, ((size_t)n_slices * d + n_slices) * sizeof(float));
    cudaCheck(cudaMemcpy(dh, host, ((size_t)n_slices * d + n_slices) * sizeof(float), cudaMemcpyHostToDevice));
    oacd_backward_kernel<<<ceil_div((size_t)N * d, 256), 256>>>(dX, X, dh, dh + (size_t)n_slices * d, N, d, slice, n_slices, lambda);
    launchCheck();
    free(host);
    free(mu);
}
// The parallel fixed-point (Jacobi) iteration of the recurrence over every position at once:
//   S = shift(P) (+ noise), O = ContextBlock(S, E), P <- O.
// Position t is exact after t+1 iterations without noise, so T iterations give the exact
// recurrence (the harness checks this). E (B,T,Ed) embeddings, P (B,T,d_c) in/out.
// S, P on the GPU. The noise is drawn on the host, in the CPU program's order (b, t, j), so
// both programs add the same numbers for a given seed.
__global__ void jacobi_shift_kernel(floatX *S, const floatX *P, const float *noise, int T, int dc, size_t n) {
    const size_t idx = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const size_t row = idx / dc; // b*T + t
    const int t = (int)(row % T), j = (int)(idx % dc);
    float v = t == 0 ? 0.0f : tof(P[(row - 1) * dc + j]); // each sequence starts from c_{-1} = 0
    if (noise) v += noise[idx];
    S[idx] = fx(v);
}
static void jacobi_shift(floatX *S, const floatX *P, int B, int T, int dc, float noise, uint64_t *rng) {
    const size_t n = (size_t)B * T * dc;
    float *dnoise = NULL;
    if (noise > 0.0f) {
        float *h = (float *)malloc_check(n * sizeof(float), "phase 1 noise");
        for (size_t i = 0; i < n; i++) h[i] = noise * random_normal(rng);
        dnoise = (float *)dev_temp(TMP_UPLOAD, n * sizeof(float));
        cudaCheck(cudaMemcpy(dnoise, h, n * sizeof(float), cudaMemcpyHostToDevice));
        free(h);
    }
    jacobi_shift_kernel<<<ceil_div(n, 256), 256>>>(S, P, dnoise, T, dc, n);
    launchCheck();
}

// per row: 1 if the mean squared change O − P is below tol
__global__ void converged_rows_kernel(int *flags, const floatX *O, const floatX *P, int N, int dc, float tol) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float d2 = 0.0f;
    for (int j = 0; j < dc; j++) { float d = tof(O[(size_t)n * dc + j]) - tof(P[(size_t)n * dc + j]); d2 += d * d; }
    flags[n] = d2 / dc < tol;
}

typedef struct { float loss, converged; int iters; } Phase1Stats;

// Phase 1 on one batch: Jacobi iterations, each one OACD loss and one Adam step on the block
// (everything else frozen), until the converged fraction reaches p1_stop or p1_iters run out.
static Phase1Stats phase1_round(Model *m, const Args *a, const int *tokens, int B, int T, uint64_t *rng, int round) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim, N = B * T;
    blockacts_ensure(&m->cb, N, Ed, dc);
    floatX *E = (floatX *)cuda_malloc_check((size_t)N * (Ed + 3 * dc) * sizeof(floatX), "phase 1");
    floatX *P = E + (size_t)N * Ed, *S = P + (size_t)N * dc, *dO = S + (size_t)N * dc;
    int *flags = (int *)dev_temp(TMP_FLAGS, (size_t)N * sizeof(int)), *flags_host = (int *)malloc_check((size_t)N * sizeof(int), "phase 1");
    embedding_forward(E, upload_ids(TMP_IDS, tokens, N), m->p.embed_in, N, Ed);
    float *P0 = (float *)malloc_check((size_t)N * dc * sizeof(float), "phase 1");
    for (size_t i = 0; i < (size_t)N * dc; i++) P0[i] = 0.01f * random_normal(rng);
    upload_floats(P, P0, (size_t)N * dc);
    free(P0);
    model_ensure_grads(m);
    AdamW opt = {a->p1_lr, a->beta1, a->beta2, a->eps, 0.0f}; // Adam: no weight decay
    Phase1Stats st = {};
    for (int it = 0; it < a->p1_iters; it++) {
        jacobi_shift(S, P, B, T, dc, a->p1_noise, rng);
        contextblock_forward(&m->cb, &m->p, S, E, N, Ed, dc, c->ln_eps);
        const floatX *O = m->cb.out;
        st.loss = oacd_forward(O, N, dc, a->oacd_slice, a->oacd_lambda);
        model_zero_grad(m);
        oacd_backward(dO, O, N, dc, a->oacd_slice, a->oacd_lambda);
        contextblock_backward(&m->cb, &m->p, &m->g, dO, E, N, Ed, dc);
        float norm = model_clip_grad_norm(m, a->p1_clip);
        if (!isfinite(st.loss) || !isfinite(norm)) die("phase 1 round %d iteration %d: loss %g / grad norm %g is not finite", round, it, st.loss, norm);
        model_update(m, &opt);
        converged_rows_kernel<<<ceil_div(N, 256), 256>>>(flags, O, P, N, dc, a->p1_tol);
        launchCheck();
        cudaCheck(cudaMemcpy(flags_host, flags, (size_t)N * sizeof(int), cudaMemcpyDeviceToHost));
        int conv = 0;
        for (int n = 0; n < N; n++) conv += flags_host[n];
        st.converged = (float)conv / N;
        st.iters = it + 1;
        cudaCheck(cudaMemcpy(P, O, (size_t)N * dc * sizeof(floatX), cudaMemcpyDeviceToDevice)); // detached: the next iterate
        printf("phase 1 round %d iter %d | oacd loss %.5f | converged %.3f | norm %.3f\n", round, it + 1, st.loss, st.converged, norm);
        fflush(stdout);
        if (st.converged >= a->p1_stop) break;
    }
    cuda_free(E); free(flags_host);
    return st;
}

// ---- The variants, indexed by layer kind (attn_type, or ATTN_CTX for a ctxkv layer 0)

typedef struct {
    CoreViews (*views)(const Config *c, const AttnActs *at); // NULL: Context-KV attends over its slots
    void (*project_forward)(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, int B, int T, int pos0);
    void (*project_backward)(const Model *m, const LayerParams *lp, LayerParams *lg, const AttnActs *at, AttnActs *dat,
                             floatX *dx, const floatX *x, int B, int T);
    // rows b·n + t (b < B, t < n) into the slots dst + b·seq_stride + t·attn_kv_elements; NULL: contexts go to the ring
    void (*cache_write)(const Config *c, const AttnActs *at, int B, int n, float *dst, size_t seq_stride);
    void (*decode)(const Model *m, const LayerParams *lp, AttnActs *at, const floatX *x, KVCache *kv, int l);
} AttnVariant;

static const AttnVariant ATTN_VARIANTS[] = {
    {mha_views, mha_project_forward, mha_project_backward, mha_cache_write, mha_decode}, // ATTN_MHA
    {gqa_views, gqa_project_forward, gqa_project_backward, gqa_cache_write, gqa_decode}, // ATTN_GQA
    {gqa_views, gqa_project_forward, gqa_project_backward, gqa_cache_write, gqa_decode}, // ATTN_MQA: G = 1
    {mla_views, mla_project_forward, mla_project_backward, mla_cache_write, mla_decode}, // ATTN_MLA
    {NULL, ctx_project_forward, ctx_project_backward, NULL, ctx_decode},                 // ATTN_CTX
};

// ----------------------------------------------------------------------------
// The whole model: the attention block, the Pythia layer and the head (ctxkv/pythia.h, shared
// with the mirror), then forward and backward

#include "ctxkv/pythia.h"

// Forward pass. inputs/targets (B,T) on the host; targets may be NULL (inference). Returns
// the mean loss (or -1 without targets). Logits are left in m->a.logits (B,T,Vp) on the GPU
// (model_logits_host fetches rows); the per-position losses in m->losses_host.
static float model_forward(Model *m, const int *inputs, const int *targets, int B, int T) {
    const Config *c = &m->cfg;
    const int C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size, BT = B * T;
    check_batch(c, inputs, targets, B, T);
    model_ensure_acts(m, B, T);
    m->B = B;
    m->T = T;
    memcpy(m->inputs, inputs, BT * sizeof(int));
    cudaCheck(cudaMemcpy(m->inputs_dev, inputs, BT * sizeof(int), cudaMemcpyHostToDevice));
    if (targets) {
        memcpy(m->targets, targets, BT * sizeof(int));
        cudaCheck(cudaMemcpy(m->targets_dev, targets, BT * sizeof(int), cudaMemcpyHostToDevice));
    }
    Acts *a = &m->a;
    if (has_context_block(c)) compute_contexts(m, m->inputs_dev, B, T);
    if (c->model_type == MODEL_CTXPYTHIA) cudaCheck(cudaMemcpy(a->resid, a->contexts, (size_t)BT * C * sizeof(floatX), cudaMemcpyDeviceToDevice)); // x_0 = contexts
    else embedding_forward(a->resid, m->inputs_dev, m->p.embed_in, BT, C);
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, a->resid + (size_t)(l + 1) * BT * C, a->resid + (size_t)l * BT * C, B, T, NULL);
    head_forward(m, BT);
    m->mean_loss = -1.0f;
    if (targets)
        m->mean_loss = crossentropy_forward(a->losses, a->lse, a->logits, m->targets_dev, BT, V, Vp, &m->n_valid, m->targets,
                                            m->losses_host);
    return m->mean_loss;
}

// Backward of the last forward (which must have had targets). Accumulates into m->g.
// Overwrites the logits with dlogits.
static void model_backward(Model *m) {
    const Config *c = &m->cfg;
    if (m->mean_loss < 0.0f) die("model_backward called without a forward pass with targets");
    const int B = m->B, T = m->T, BT = B * T, C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size;
    model_ensure_grads(m);
    size_t need = layout_acts(c, B, T, NULL, NULL, &m->ga);
    if (need > m->gacts_cap) {
        cuda_free(m->gacts_memory);
        m->gacts_memory = (char *)cuda_malloc_check(need, "activation gradients");
        m->gacts_cap = need;
    }
    layout_acts(c, B, T, m->gacts_memory, NULL, &m->ga);
    Acts *a = &m->a;
    GradActs *ga = &m->ga;
    if (m->n_valid == 0) return; // every target ignored: the loss is a constant

    floatX *dlogits = a->logits;
    crossentropy_backward(dlogits, a->lse, m->targets_dev, BT, V, Vp, m->n_valid);
    cudaCheck(cudaMemset(ga->dlnf, 0, (size_t)BT * C * sizeof(floatX)));
    matmul_backward(ga->dlnf, m->g.embed_out, NULL, dlogits, a->lnf, m->p.embed_out, BT, C, Vp);
    cudaCheck(cudaMemset(ga->dresid, 0, (size_t)BT * C * sizeof(floatX)));
    floatX *xL = a->resid + (size_t)c->n_layer * BT * C;
    layernorm_backward(ga->dresid, m->g.lnf_w, m->g.lnf_b, ga->dlnf, xL, m->p.lnf_w, a->lnf_mean, a->lnf_rstd, BT, C);
    for (int l = c->n_layer - 1; l >= 0; l--) layer_backward(m, l, a->resid + (size_t)l * BT * C, B, T);
    // ctxpythia's input is the contexts, constants: embed_in gets no gradient (it stays frozen)
    if (c->model_type != MODEL_CTXPYTHIA) embedding_backward(m->g.embed_in, ga->dresid, m->inputs, BT, C);
}

// ----------------------------------------------------------------------------
// KV-cached decoding: prefill the prompts in one forward pass, then one token per sequence at a
// time through every layer's variant decode. The policy (ctxkv/kvpolicy.h) says which slots hold
// which tokens; the variants only see slots.

// what ctxkv/decode.h needs: the prefill's attention rows, and moving kept slots
static void *device_alloc(size_t bytes, const char *what) { return cuda_calloc_check(bytes, what); }
static void device_release(void *p) { cuda_free(p); }

// The prefill kept no probabilities (ATT_KEEPS_PROBS 0), so SnapKV's window rows are recomputed
// from q, k and the row's logsumexp: P_ts = exp(scale·q_t·k_s − lse_t) for s <= t, else 0.
// P (rows, T) for rows t0.. of head h, sequence b; one block per row.
__global__ void attention_probs_kernel(float *P, HeadView q, HeadView k, const float *lse, int T, int H, int G, int Dqk,
                                       float scale, int b, int h, int t0) {
    const int t = t0 + blockIdx.x, g = h / (H / G);
    const floatX *qt = head_at(q, T, b, t, h);
    const float l = lse[((size_t)b * H + h) * T + t];
    for (int s = threadIdx.x; s < T; s += blockDim.x) {
        float p = 0.0f;
        if (s <= t) {
            const floatX *ks = head_at(k, T, b, s, g);
            float d = 0.0f;
            for (int j = 0; j < Dqk; j++) d += tof(qt[j]) * tof(ks[j]);
            p = expf(scale * d - l);
        }
        P[(size_t)blockIdx.x * T + s] = p;
    }
}
static void model_att_rows(const Model *m, int l, int b, int h, int t0, int rows, int n, float *out) {
    const Config *c = &m->cfg;
    const AttnVariant *v = &ATTN_VARIANTS[layer_kind(c, l)];
    if (!v->views) die("model_att_rows: layer %d attends over context slots, not tokens", l);
    const AttnActs *at = &m->a.layer[l].at;
    const CoreViews cv = v->views(c, at);
    float *P = (float *)dev_temp(TMP_ATT_ROWS, (size_t)rows * n * sizeof(float));
    attention_probs_kernel<<<rows, ATT_THREADS>>>(P, cv.q, cv.k, at->lse, n, c->n_head, cv.kv_heads, cv.dqk,
                                                  1.0f / sqrtf((float)cv.dqk), b, h, t0);
    launchCheck();
    cudaCheck(cudaMemcpy(out, P, (size_t)rows * n * sizeof(float), cudaMemcpyDeviceToHost));
}

// slot i of unit u := unit u of the staged token keep[u·budget + i]; one block per (i, u). A
// unit is run floats at u·run, and with `two` another run at (units + u)·run (kv_unit_runs).
__global__ void kv_gather_kernel(float *dst, const float *stage, const int *keep, int budget, size_t pt, int units, int run, int two) {
    const int i = blockIdx.x, u = blockIdx.y;
    const float *src = stage + (size_t)keep[u * budget + i] * pt;
    float *d = dst + (size_t)i * pt;
    for (int e = threadIdx.x; e < run * (two ? 2 : 1); e += blockDim.x) {
        const size_t off = (size_t)(e < run ? u : units + u) * run + e % run;
        d[off] = src[off];
    }
}
static void kvcache_gather(const Config *c, KVCache *kv, int l, int b, const float *stage, const int *keep) {
    const int units = kv_units(c, c->attn_type), budget = kv->policy.budget;
    size_t off[2];
    const int run = kv_unit_runs(c, c->attn_type, 0, off);
    const int *keep_dev = upload_ids(TMP_KEEP, keep, (size_t)units * budget);
    kv_gather_kernel<<<dim3(budget, units), 128>>>(kv_slot(kv, l, b, 0), stage, keep_dev, budget, kv->per_token, units, run, off[1] != off[0]);
    launchCheck();
}

#include "ctxkv/decode.h"

// Prefill: the B prompts (B,n) in one forward pass, then their keys/values (or latents, or
// contexts) into the cache, compressed when the policy says so. Returns the logits of the last
// prompt tokens on the host: row b at b * *row_stride (Vp: only the B rows that sampling needs
// are copied back). The logits (here and from model_decode_step) are the caller's until the next
// call: sampling overwrites them in place.
static float *model_prefill(Model *m, KVCache *kv, const int *prompts, int n, size_t *row_stride) {
    const Config *c = &m->cfg;
    const int B = kv->batch;
    const size_t Vp = c->padded_vocab_size;
    m->head_last_of = n; // only the last prompt token's logits are read
    model_forward(m, prompts, NULL, B, n);
    m->head_last_of = 0;
    kvcache_fill_prompt(m, kv, n);
    if ((size_t)B * Vp > m->logits_host_cap) {
        free(m->logits_host);
        m->logits_host = (float *)malloc_check((size_t)B * Vp * sizeof(float), "logits");
        m->logits_host_cap = (size_t)B * Vp;
    }
    download_floats(m->logits_host, m->a.logits, (size_t)B * Vp); // rows 0..B-1: the head ran on the last rows only
    *row_stride = Vp;
    return m->logits_host;
}

// One token per sequence (tokens[B], host) at position kv->pos through the model, reading the
// cache. Returns the logits (B,Vp) on the host.
static float *model_decode_step(Model *m, KVCache *kv, const int *tokens) {
    const Config *c = &m->cfg;
    const int B = kv->batch, C = c->n_embd, dc = c->context_dim, Ed = c->embed_dim;
    kvcache_step_begin(kv);
    check_batch(c, tokens, NULL, B, 1);
    model_ensure_acts(m, B, 1);
    cudaCheck(cudaMemcpy(m->inputs_dev, tokens, B * sizeof(int), cudaMemcpyHostToDevice));
    if (has_context_block(c)) { // c_t = ContextBlock(c_{t−1}, e_t), c_{−1} = 0
        blockacts_ensure(&m->cb, B, Ed, dc);
        if (kv->pos == 0) cudaCheck(cudaMemset(kv->running, 0, (size_t)B * dc * sizeof(float)));
        floatX *prev = (floatX *)dev_temp(TMP_EMB, (size_t)B * (dc + Ed) * sizeof(floatX)), *emb = prev + (size_t)B * dc;
        cast_to_floatX_kernel<<<ceil_div((size_t)B * dc, 256), 256>>>(prev, kv->running, (size_t)B * dc);
        launchCheck();
        embedding_forward(emb, m->inputs_dev, m->p.embed_in, B, Ed);
        contextblock_forward(&m->cb, &m->p, prev, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) kvcache_push_context(c, kv, b, kv->pos, m->cb.out + (size_t)b * dc);
    }
    if (c->model_type == MODEL_CTXPYTHIA) {
        cudaCheck(cudaMemcpy(m->a.resid, m->cb.out, (size_t)B * C * sizeof(floatX), cudaMemcpyDeviceToDevice)); // = running
    } else {
        embedding_forward(m->a.resid, m->inputs_dev, m->p.embed_in, B, C);
    }
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, m->a.resid + (size_t)(l + 1) * B * C, m->a.resid + (size_t)l * B * C, B, 1, kv);
    head_forward(m, B);
    kvcache_step_end(kv);
    return model_logits_host(m, 0, B);
}

// ----------------------------------------------------------------------------
// What ctxkv/eval.h and ctxkv/train.h need from this program, then the shared driver and main

static const float *model_losses(const Model *m) { return m->losses_host; }
static void model_sync(void) { cudaCheck(cudaDeviceSynchronize()); }
// Sampling's three passes over a row of logits, on the host (the CPU program's are vectorised,
// in ctxkv/simd.h): dst[i] = exp((x[i] − shift) · scale) with their sum; the largest entry (NaN
// passed over); the sum of a block
static float exp_scaled_sum(float *dst, const float *x, int n, float shift, float scale) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) { dst[i] = expf((x[i] - shift) * scale); sum += dst[i]; }
    return sum;
}
static float max_of(const float *x, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static float sum_of(const float *x, int n) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += x[i];
    return s;
}

#define PROGRAM_WHAT "Trains a Pythia (GPT-NeoX) model on token shards on an NVIDIA GPU (" PRECISION_NAME ")."
static void device_banner(char *buf, size_t n) { snprintf(buf, n, "%.200s | %s", device_prop.name, PRECISION_NAME); }

// the GPU memory a training step needs: activations and their gradients (bytes), the floatX
// parameters and gradients, the fp32 master weights and AdamW's m and v
static void check_training_memory(Model *m, int B, int T) {
    double need = (double)layout_acts(&m->cfg, B, T, NULL, &m->a, NULL) + (double)layout_acts(&m->cfg, B, T, NULL, NULL, &m->ga) +
                  (2.0 * sizeof(floatX) + 12.0) * m->num_params_dev;
    size_t free_b = 0, total_b = 0;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    double have = (double)total_b;
    if (have > 0 && need > 0.9 * have)
        die("-b %d -t %d need about %.1f GiB (activations, gradients, AdamW state), more than this machine's %.1f GiB of GPU memory; lower -b or -t",
            B, T, need / (1 << 30), have / (1 << 30));
}

#include "ctxkv/train.h"
