/*
train_ctxkv.cu: the CUDA mirror of train_ctxkv.c. Same program, same order, same function
names, same command line, checkpoint and shard formats, logs and --out files: read the two
side by side. What differs is where the numbers live and who computes them:

  - Parameters, activations, gradients and optimizer state are on the GPU. The parameters
    the layers read (params_dev) and the activations are floatX: bf16 by default, float
    with PRECISION=FP32 (make train_ctxkv_cu PRECISION=FP32), the build to compare with the
    CPU: it differs from it only in summation order. AdamW updates fp32 master weights
    (master_dev) and writes the bf16 copy; reductions, softmax and statistics run in fp32.
  - params_memory is, as in the CPU program, the fp32 host copy in checkpoint order: the
    host-side code (init, load, save, --init-from, the context-block file) works on it and
    model_to_device / model_to_host move it. On the GPU each tensor starts on a 256-byte
    boundary (ParamTensor.dev_offset), so cuBLASLt always gets well-aligned operands.
  - Every matmul is cuBLASLt (fp32 accumulation, the bias epilogue in the forward); the
    other layers are the kernels below, one simple kernel (or two) per CPU loop nest. The
    kernels use no atomics: every reduction has a fixed order, so they repeat bit for bit.
  - Backward functions ACCUMULATE (+=) as on the CPU. Attention backward is split in two
    kernels (the query side per query row, the key/value side per key row) so that no two
    threads add into one element.
  - Host-side code that is not numerics (config, headers, presets, flags, shards, token
    table, atomic writes, --kv-report) is the CPU program's, transcribed to C++.

Build: make train_ctxkv_cu [PRECISION=FP32] [GPU_COMPUTE_CAPABILITY=90].  Usage: ./train_ctxkv_cu -h
Checks: test_ctxkv_cu.cu (on a GPU); make cuda-emu runs it on the CPU through dev/cuda/emu.
*/
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <ctype.h>
#include <errno.h>
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <algorithm>
// test_ctxkv_cu links the CPU program too, which already holds stb_ds's implementation
#ifndef CTXKV_STB_EXTERNAL
#define STB_DS_IMPLEMENTATION
#endif
#include <stb/stb_ds.h>

// ----------------------------------------------------------------------------
// utilities: errors that name what went wrong, checked allocation and I/O

#define IGNORE_INDEX (-100)      // target id meaning "no loss here" (HF's ignore_index)

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(EXIT_FAILURE);
}

static void *malloc_check(size_t n, const char *what) {
    void *p = malloc(n ? n : 1);
    if (!p) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

static void *calloc_check(size_t n, const char *what) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

static FILE *fopen_check(const char *path, const char *mode) {
    FILE *f = fopen(path, mode);
    if (!f) die("cannot open '%s' (%s)", path, strerror(errno));
    return f;
}

// size of an open file in bytes, or -1
static long long file_size(FILE *f) {
    struct stat st;
    if (fstat(fileno(f), &st) != 0) return -1;
    return (long long)st.st_size;
}

static void fread_check(void *dst, size_t size, size_t n, FILE *f, const char *path) {
    if (fread(dst, size, n, f) != n) die("'%s' is truncated or unreadable", path);
}

static void fwrite_check(const void *src, size_t size, size_t n, FILE *f, const char *path) {
    if (fwrite(src, size, n, f) != n) die("cannot write '%s' (%s)", path, strerror(errno));
}

// Write to PATH.tmp, fsync, then rename over PATH: a crash never leaves a half-written file.
typedef struct { FILE *f; char tmp[4096]; const char *path; } AtomicFile;

static AtomicFile atomic_open(const char *path) {
    AtomicFile af;
    af.path = path;
    if ((size_t)snprintf(af.tmp, sizeof af.tmp, "%s.tmp", path) >= sizeof af.tmp) die("path too long: '%s'", path);
    af.f = fopen_check(af.tmp, "wb");
    return af;
}

static void atomic_commit(AtomicFile *af) {
    if (fflush(af->f) != 0 || fsync(fileno(af->f)) != 0) die("cannot write '%s' (%s)", af->tmp, strerror(errno));
    if (fclose(af->f) != 0) die("cannot write '%s' (%s)", af->tmp, strerror(errno));
    if (rename(af->tmp, af->path) != 0) die("cannot rename '%s' to '%s' (%s)", af->tmp, af->path, strerror(errno));
}

// wall clock; callers that time GPU work synchronise first (their results are copied back)
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// xorshift* RNG (as llm.c): deterministic across platforms for a given seed. Host side only:
// init, phase-1 noise and sampling draw the same numbers as the CPU program.
static uint32_t random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(uint64_t *state) { return (random_u32(state) >> 8) / 16777216.0f; } // [0,1)
static float random_normal(uint64_t *state) {                                              // Box-Muller
    float u1 = random_f32(state), u2 = random_f32(state);
    if (u1 < 1e-12f) u1 = 1e-12f;
    return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

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
enum { TMP_COLSUM, TMP_NORM, TMP_BUCKETS, TMP_OACD, TMP_EMB, TMP_FLAGS, TMP_UPLOAD, TMP_IDS, N_TMP };
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

// dynamic shared memory past the default 48 KB needs an opt-in per kernel
template <class K> static void set_smem(K kernel, size_t bytes) {
    if (bytes > (size_t)48 * 1024) {
        if (bytes > device_prop.sharedMemPerBlockOptin)
            die("a sequence of this length needs %zu bytes of shared memory per block; this GPU has %zu", bytes,
                (size_t)device_prop.sharedMemPerBlockOptin);
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
    }
}

// ----------------------------------------------------------------------------
// Config: everything that defines the model, stored in the checkpoint header

#define CKPT_MAGIC 20261124
#define CKPT_VERSION 1
#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define TOKTAB_MAGIC 20240328
#define TOKTAB_VERSION 3   // llm.c's 2 has uint8 lengths; 3 has uint16 (NeoX has tokens > 255 bytes)
#define HEADER_INTS 256
#define VOCAB_PAD 128   // vocab rows are padded to a multiple of this (as Pythia's 50304 = 393*128)

enum { ATTN_MHA = 0, ATTN_GQA = 1, ATTN_MQA = 2, ATTN_MLA = 3 };
// ATTN_CTX is not a value of attn_type: it is the kind of layer 0 when layer0_type is ctxkv
// (its keys and values come from the ContextBlock's contexts, doc/context_kv.md)
enum { ATTN_CTX = 4 };
enum { LAYER0_SAME = 0, LAYER0_CTXKV = 1 };
enum { MODEL_PYTHIA = 0, MODEL_CTXPYTHIA = 1 };

typedef struct {
    int vocab_size;        // V: rows that are real tokens
    int padded_vocab_size; // Vp: V rounded up to a multiple of VOCAB_PAD
    int n_layer;           // L
    int n_head;            // H
    int n_embd;            // C
    int n_inner;           // F, MLP width
    int rotary_dims;       // R, rotated dims at the start of each head (even)
    float rope_base;       // 10000
    int max_seq_len;       // longest T the RoPE table covers
    float ln_eps;          // LayerNorm epsilon, 1e-5
    // attention variant (doc/attention.md): mha, gqa/mqa (n_kv_head G), mla (kv_rank d_c,
    // q_rank d_c' (0 = no query compression), mla_rope_dim d_R, rms_eps of its RMSNorms)
    int attn_type, n_kv_head, kv_rank, q_rank, mla_rope_dim;
    float rms_eps;
    // Context-KV: layer0_type ctxkv (layer 0 attends over contexts) or model_type ctxpythia
    // (the layers run at width context_dim on the contexts); context_dim d_c, interval I,
    // max_contexts M; embed_dim E is the width of embed_in (= n_embd except ctxpythia)
    int layer0_type, model_type, context_dim, context_interval, max_contexts;
    int embed_dim;
} Config;

static const char *ATTN_NAMES[] = {"mha", "gqa", "mqa", "mla"};

typedef struct { const char *name; int n_layer, n_embd, n_head, n_inner, vocab_size; float rotary_pct; int max_seq_len; } Preset;

static const Preset PRESETS[] = {
    {"pythia-14m", 6, 128, 4, 512, 50304, 0.25f, 2048},
    {"pythia-70m", 6, 512, 8, 2048, 50304, 0.25f, 2048},
    {"pythia-160m", 12, 768, 12, 3072, 50304, 0.25f, 2048},
    // for tests: several heads, a rotary fraction of each head, a padded vocabulary
    {"tiny", 2, 32, 4, 128, 96, 0.5f, 128},
};
#define N_PRESETS ((int)(sizeof PRESETS / sizeof PRESETS[0]))

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

static const Preset *find_preset(const char *name) {
    for (int i = 0; i < N_PRESETS; i++)
        if (strcmp(PRESETS[i].name, name) == 0) return &PRESETS[i];
    return NULL;
}

static Config config_from_preset(const Preset *p) {
    Config c = {};
    c.vocab_size = p->vocab_size;
    c.padded_vocab_size = round_up(p->vocab_size, VOCAB_PAD);
    c.n_layer = p->n_layer;
    c.n_head = p->n_head;
    c.n_embd = p->n_embd;
    c.n_inner = p->n_inner;
    c.rotary_dims = (int)((p->n_embd / p->n_head) * p->rotary_pct); // HF: int(head_size * rotary_pct)
    c.rope_base = 10000.0f;
    c.max_seq_len = p->max_seq_len;
    c.ln_eps = 1e-5f;
    c.attn_type = ATTN_MHA;
    c.n_kv_head = p->n_head;
    c.embed_dim = p->n_embd;
    return c;
}

// Returns NULL if the config is consistent, else a message saying what is wrong.
static const char *config_problem(const Config *c) {
    static char msg[256];
    if (c->vocab_size < 1 || c->vocab_size > 65536) return "vocab_size must be in 1..65536 (tokens are uint16)";
    if (c->padded_vocab_size != round_up(c->vocab_size, VOCAB_PAD)) return "padded_vocab_size is not vocab_size rounded up to 128";
    if (c->n_layer < 1 || c->n_layer > 1024) return "n_layer out of range";
    if (c->n_head < 1 || c->n_embd < 1 || c->n_embd > 65536) return "n_head / n_embd out of range";
    if (c->n_embd % c->n_head != 0) {
        snprintf(msg, sizeof msg, "n_head %d does not divide n_embd %d", c->n_head, c->n_embd);
        return msg;
    }
    int D = c->n_embd / c->n_head;
    if (c->rotary_dims < 0 || c->rotary_dims > D || c->rotary_dims % 2) return "rotary_dims must be even and at most the head dim";
    if (c->n_inner < 1 || c->n_inner > 1 << 20) return "n_inner out of range";
    if (!(c->rope_base > 1.0f) || !isfinite(c->rope_base)) return "rope_base must be > 1";
    if (c->max_seq_len < 1 || c->max_seq_len > 1 << 20) return "max_seq_len out of range";
    if (!(c->ln_eps > 0.0f) || !(c->ln_eps < 1.0f)) return "layer_norm_eps must be in (0, 1)";
    switch (c->attn_type) {
    case ATTN_MHA:
        if (c->n_kv_head != c->n_head) return "mha needs n_kv_head = n_head";
        break;
    case ATTN_GQA:
    case ATTN_MQA:
        if (c->attn_type == ATTN_MQA && c->n_kv_head != 1) return "mqa needs n_kv_head = 1";
        if (c->n_kv_head < 1 || c->n_head % c->n_kv_head != 0) {
            snprintf(msg, sizeof msg, "n_kv_head %d does not divide n_head %d", c->n_kv_head, c->n_head);
            return msg;
        }
        break;
    case ATTN_MLA:
        if (c->kv_rank < 1 || c->kv_rank > 65536) return "mla needs kv_rank >= 1";
        if (c->q_rank < 0 || c->q_rank > 65536) return "mla q_rank must be >= 0 (0 = no query compression)";
        if (c->mla_rope_dim < 2 || c->mla_rope_dim % 2) {
            snprintf(msg, sizeof msg, "mla rope dim %d must be even and >= 2", c->mla_rope_dim);
            return msg;
        }
        if (c->mla_rope_dim > D) {
            snprintf(msg, sizeof msg, "mla rope dim %d is larger than the head dim %d", c->mla_rope_dim, D);
            return msg;
        }
        if (!(c->rms_eps > 0.0f) || !(c->rms_eps < 1.0f)) return "mla rms_eps must be in (0, 1)";
        break;
    default:
        return "unknown attn_type (0 mha, 1 gqa, 2 mqa, 3 mla)";
    }
    // as prepro/ckpt.py requires; kv_scratch_per_head sizes buffers by kv_rank for every variant
    if (c->attn_type != ATTN_MLA && (c->kv_rank || c->q_rank || c->mla_rope_dim || c->rms_eps != 0.0f))
        return "kv_rank, q_rank, mla_rope_dim and rms_eps must be 0 (used by mla only)";
    if (c->layer0_type != LAYER0_SAME && c->layer0_type != LAYER0_CTXKV) return "layer0_type must be 0 (same) or 1 (ctxkv)";
    if (c->model_type != MODEL_PYTHIA && c->model_type != MODEL_CTXPYTHIA) return "model_type must be 0 (pythia) or 1 (ctxpythia)";
    if (c->layer0_type == LAYER0_CTXKV && c->model_type == MODEL_CTXPYTHIA) return "ctxpythia has no separate ctxkv layer 0";
    if (c->embed_dim < 1 || c->embed_dim > 65536) return "embed_dim out of range";
    if (c->layer0_type == LAYER0_CTXKV || c->model_type == MODEL_CTXPYTHIA) {
        if (c->context_dim < 1 || c->context_dim > 65536) return "context_dim must be >= 1";
    } else if (c->context_dim || c->context_interval || c->max_contexts) {
        return "context fields are set but neither layer0 ctxkv nor ctxpythia is";
    }
    if (c->layer0_type == LAYER0_CTXKV) {
        if (c->context_interval < 1 || c->context_interval > 1 << 20) return "context interval must be in 1..1048576";
        if (c->max_contexts < 1 || c->max_contexts > 1 << 20) return "max contexts must be in 1..1048576";
        // the context ring, ctx_ring_len = (M-1)*I + 1, is an int
        if ((long long)(c->max_contexts - 1) * c->context_interval >= 1 << 30) return "(max contexts - 1) * context interval must be below 2^30";
        if (c->embed_dim != c->n_embd) return "with layer0 ctxkv embed_dim must equal n_embd";
    } else if (c->model_type == MODEL_CTXPYTHIA) {
        if (c->n_embd != c->context_dim) return "ctxpythia runs its layers at the context width: n_embd must equal context_dim";
        // as the flags require; kv_scratch_per_head sizes buffers by max_contexts for every model
        if (c->context_interval || c->max_contexts) return "context_interval and max_contexts must be 0 for ctxpythia (they belong to layer0 ctxkv)";
    } else if (c->embed_dim != c->n_embd) {
        return "embed_dim must equal n_embd";
    }
    return NULL;
}

static int float_bits(float f) { int i; memcpy(&i, &f, 4); return i; }
static float bits_float(int i) { float f; memcpy(&f, &i, 4); return f; }

static void config_to_header(const Config *c, int *h) {
    memset(h, 0, HEADER_INTS * sizeof(int));
    h[0] = CKPT_MAGIC; h[1] = CKPT_VERSION;
    h[2] = c->vocab_size; h[3] = c->padded_vocab_size; h[4] = c->n_layer; h[5] = c->n_head;
    h[6] = c->n_embd; h[7] = c->n_inner; h[8] = c->rotary_dims; h[9] = float_bits(c->rope_base);
    h[10] = c->max_seq_len; h[11] = float_bits(c->ln_eps);
    h[12] = c->attn_type; h[13] = c->n_kv_head; h[14] = c->kv_rank; h[15] = c->q_rank; h[16] = c->mla_rope_dim;
    h[17] = c->layer0_type; h[18] = c->model_type; h[19] = c->context_dim; h[20] = c->context_interval;
    h[21] = c->max_contexts; h[22] = float_bits(c->rms_eps); h[23] = c->embed_dim;
}

static Config config_from_header(const int *h) {
    Config c;
    c.vocab_size = h[2]; c.padded_vocab_size = h[3]; c.n_layer = h[4]; c.n_head = h[5];
    c.n_embd = h[6]; c.n_inner = h[7]; c.rotary_dims = h[8]; c.rope_base = bits_float(h[9]);
    c.max_seq_len = h[10]; c.ln_eps = bits_float(h[11]);
    c.attn_type = h[12]; c.n_kv_head = h[13]; c.kv_rank = h[14]; c.q_rank = h[15]; c.mla_rope_dim = h[16];
    c.layer0_type = h[17]; c.model_type = h[18]; c.context_dim = h[19]; c.context_interval = h[20];
    c.max_contexts = h[21]; c.rms_eps = bits_float(h[22]);
    c.embed_dim = h[23] ? h[23] : c.n_embd; // 0 in files written before the field existed
    return c;
}

static void config_print(const Config *c) {
    printf("config: vocab %d (padded %d) | layers %d | heads %d | width %d | mlp %d | rotary %d/%d | "
           "rope base %g | max len %d | attn %s",
           c->vocab_size, c->padded_vocab_size, c->n_layer, c->n_head, c->n_embd, c->n_inner, c->rotary_dims,
           c->n_embd / c->n_head, c->rope_base, c->max_seq_len, ATTN_NAMES[c->attn_type]);
    if (c->attn_type == ATTN_GQA || c->attn_type == ATTN_MQA) printf(" (%d kv heads)", c->n_kv_head);
    if (c->attn_type == ATTN_MLA) printf(" (kv rank %d, q rank %d, rope dim %d)", c->kv_rank, c->q_rank, c->mla_rope_dim);
    if (c->layer0_type == LAYER0_CTXKV)
        printf(" | layer 0 ctxkv (context dim %d, interval %d, max contexts %d)", c->context_dim, c->context_interval, c->max_contexts);
    if (c->model_type == MODEL_CTXPYTHIA) printf(" | ctxpythia (embed %d -> context %d)", c->embed_dim, c->context_dim);
    printf("\n");
}


// ----------------------------------------------------------------------------
// Parameters: one table of tensors, in checkpoint order (doc/formats.md). The pointers are
// into the GPU block (floatX); the host fp32 copy is Model.params_memory, in checkpoint order.

typedef struct {
    floatX *ln1_w, *ln1_b;      // (C) input_layernorm
    floatX *ln2_w, *ln2_b;      // (C) post_attention_layernorm
    // attention: which of these exist depends on attn_type (doc/formats.md); the rest are NULL
    floatX *qkv_w, *qkv_b;      // mha (3C, C), (3C): row h*3D + s*D + j, s = 0 q, 1 k, 2 v (HF interleaved per head)
    floatX *q_w, *q_b;          // gqa/mqa (H*D, C), (H*D);  mla without q_rank: q_w (H*(D+dR), C), no bias
    floatX *kv_w, *kv_b;        // gqa/mqa (2*G*D, C), (2*G*D): K heads, then V heads
    floatX *q_a_w, *q_a_norm_w, *q_b_w; // mla with q_rank: (q_rank, C), (q_rank), (H*(D+dR), q_rank)
    floatX *kv_a_w, *kv_a_norm_w;       // mla: (kv_rank+dR, C) latent rows then k_R rows, (kv_rank)
    floatX *kv_b_w;                     // mla: (H*2D, kv_rank), per head [W_UK (D rows) | W_UV (D rows)]
    floatX *k_w, *k_b, *v_w, *v_b;      // ctxkv layer 0: (C, d_c), (C) each; its q_w/q_b are (C, C), (C)
    floatX *dense_w, *dense_b;  // (C, H*D), (C)
    floatX *fc_w, *fc_b;        // (F, C), (F) dense_h_to_4h
    floatX *proj_w, *proj_b;    // (C, F), (C) dense_4h_to_h
} LayerParams;

typedef struct {
    floatX *embed_in;           // (Vp, E), E = embed_dim
    // ContextBlock (ctxkv / ctxpythia): c_t = LN_c(c_{t-1} + GELU(W_c [c_{t-1}; LN_e(e_t)] + b_c))
    floatX *ctx_ln_e_w, *ctx_ln_e_b;    // (E)
    floatX *ctx_w, *ctx_b;              // (d_c, d_c + E), (d_c)
    floatX *ctx_ln_c_w, *ctx_ln_c_b;    // (d_c)
    LayerParams *layer;        // [L]
    floatX *lnf_w, *lnf_b;      // (C)
    floatX *embed_out;          // (Vp, C) untied head, no bias
} Params;

typedef struct {
    char name[48];
    size_t rows, cols;         // a 1-D tensor has rows == 1
    size_t offset;             // in floats, from the start of the parameter block (checkpoint order)
    size_t dev_offset;         // in elements, from the start of the GPU block (256-byte aligned)
    int frozen;                // not updated (and not decayed) by the optimizer
} ParamTensor;

// each tensor of the GPU parameter block starts on a 256-byte boundary
#define PARAM_ALIGN_BYTES 256
static size_t param_align(size_t n) {
    const size_t a = PARAM_ALIGN_BYTES / sizeof(floatX);
    return (n + a - 1) / a * a;
}

static int has_context_block(const Config *c) { return c->layer0_type == LAYER0_CTXKV || c->model_type == MODEL_CTXPYTHIA; }

// the attention kind of layer l: attn_type, except a ctxkv layer 0
static int layer_kind(const Config *c, int l) { return (l == 0 && c->layer0_type == LAYER0_CTXKV) ? ATTN_CTX : c->attn_type; }

// Walks the parameter order once. With base == NULL it only counts; otherwise it points
// every tensor of P into base (the GPU block, at the aligned offsets). If table != NULL,
// appends a descriptor per tensor. Returns the number of parameters (the checkpoint's);
// *dev_size (if given) receives the GPU block's size in elements.
// This is the one place that defines the checkpoint order.
static size_t layout_params(const Config *c, floatX *base, Params *P, ParamTensor **table, size_t *dev_size = NULL) {
    size_t off = 0, dev_off = 0;
    const size_t C = c->n_embd, F = c->n_inner, Vp = c->padded_vocab_size;
#define TENSOR(field, label, r, k)                                                                         \
    do {                                                                                                   \
        if (P) field = base ? base + dev_off : NULL;                                                       \
        if (table) {                                                                                       \
            ParamTensor t_ = {};                                                                           \
            t_.rows = (r); t_.cols = (k); t_.offset = off; t_.dev_offset = dev_off;                        \
            snprintf(t_.name, sizeof t_.name, "%s", label);                                                \
            arrput(*table, t_);                                                                            \
        }                                                                                                  \
        off += (size_t)(r) * (k);                                                                          \
        dev_off += param_align((size_t)(r) * (k));                                                         \
    } while (0)
    char name[48];
    const size_t E = c->embed_dim, dc = c->context_dim;
    TENSOR(P->embed_in, "embed_in", Vp, E);
    if (has_context_block(c)) {
        TENSOR(P->ctx_ln_e_w, "ctx_ln_e_w", 1, E);
        TENSOR(P->ctx_ln_e_b, "ctx_ln_e_b", 1, E);
        TENSOR(P->ctx_w, "ctx_w", dc, dc + E);
        TENSOR(P->ctx_b, "ctx_b", 1, dc);
        TENSOR(P->ctx_ln_c_w, "ctx_ln_c_w", 1, dc);
        TENSOR(P->ctx_ln_c_b, "ctx_ln_c_b", 1, dc);
    }
    for (int l = 0; l < c->n_layer; l++) {
        LayerParams *lp = P ? &P->layer[l] : NULL;
#define LTENSOR(field, label, r, k) do { snprintf(name, sizeof name, "layer%d.%s", l, label); TENSOR(lp->field, name, r, k); } while (0)
        LTENSOR(ln1_w, "ln1_w", 1, C);
        LTENSOR(ln1_b, "ln1_b", 1, C);
        LTENSOR(ln2_w, "ln2_w", 1, C);
        LTENSOR(ln2_b, "ln2_b", 1, C);
        // the attention tensors: the only part of the order that depends on the variant
        const size_t H = c->n_head, D = C / H, G = c->n_kv_head, dR = c->mla_rope_dim;
        switch (layer_kind(c, l)) {
        case ATTN_CTX: // queries from the token, keys and values from the contexts
            LTENSOR(q_w, "q_w", C, C);
            LTENSOR(q_b, "q_b", 1, C);
            LTENSOR(k_w, "k_w", C, dc);
            LTENSOR(k_b, "k_b", 1, C);
            LTENSOR(v_w, "v_w", C, dc);
            LTENSOR(v_b, "v_b", 1, C);
            break;
        case ATTN_MHA:
            LTENSOR(qkv_w, "qkv_w", 3 * C, C);
            LTENSOR(qkv_b, "qkv_b", 1, 3 * C);
            break;
        case ATTN_GQA:
        case ATTN_MQA:
            LTENSOR(q_w, "q_w", H * D, C);
            LTENSOR(q_b, "q_b", 1, H * D);
            LTENSOR(kv_w, "kv_w", 2 * G * D, C);
            LTENSOR(kv_b, "kv_b", 1, 2 * G * D);
            break;
        case ATTN_MLA:
            if (c->q_rank > 0) {
                LTENSOR(q_a_w, "q_a_w", c->q_rank, C);
                LTENSOR(q_a_norm_w, "q_a_norm_w", 1, c->q_rank);
                LTENSOR(q_b_w, "q_b_w", H * (D + dR), c->q_rank);
            } else {
                LTENSOR(q_w, "q_w", H * (D + dR), C);
            }
            LTENSOR(kv_a_w, "kv_a_w", c->kv_rank + dR, C);
            LTENSOR(kv_a_norm_w, "kv_a_norm_w", 1, c->kv_rank);
            LTENSOR(kv_b_w, "kv_b_w", H * 2 * D, c->kv_rank);
            break;
        }
        LTENSOR(dense_w, "dense_w", C, H * D);
        LTENSOR(dense_b, "dense_b", 1, C);
        LTENSOR(fc_w, "fc_w", F, C);
        LTENSOR(fc_b, "fc_b", 1, F);
        LTENSOR(proj_w, "proj_w", C, F);
        LTENSOR(proj_b, "proj_b", 1, C);
#undef LTENSOR
    }
    TENSOR(P->lnf_w, "lnf_w", 1, C);
    TENSOR(P->lnf_b, "lnf_b", 1, C);
    TENSOR(P->embed_out, "embed_out", Vp, C);
#undef TENSOR
    if (dev_size) *dev_size = dev_off;
    return off;
}

// ----------------------------------------------------------------------------
// Activations: one GPU allocation, sized for B*T, pointers set by layout_acts. The buffers
// are floatX except the per-row statistics (float); each starts on a 256-byte boundary, so
// the offsets are in bytes.

// The attention's own activations. Which exist depends on attn_type; the others are NULL.
// Dq = D for mha/gqa/mqa, D + dR for mla (the query/key width of one head).
typedef struct {
    floatX *qkv;                        // mha (B,T,3C): q and k after RoPE, v as projected
    floatX *q;                          // gqa/mqa/mla (B,T,H*Dq): after RoPE (mla: on the last dR of each head)
    floatX *kv;                         // gqa/mqa (B,T,2*G*D): K heads (after RoPE) then V heads
    floatX *q_lat, *q_lat_norm; float *q_lat_rstd; // mla with q_rank: (B,T,q_rank) x2, (B,T)
    floatX *kv_a;                       // mla (B,T,kv_rank+dR): raw latent | k_R after RoPE
    floatX *c_norm; float *c_rstd;      // mla (B,T,kv_rank) the cached latent ĉ, (B,T)
    floatX *kvb;                        // mla (B,T,H*2D): per head [k_nope | v]
    floatX *k;                          // mla (B,T,H*Dq): per head [k_nope | k_pe], gathered for the core
    floatX *kc, *vc;                    // ctxkv (B,T,C): W_k c_s + b_k and W_v c_s + b_v for every position s
    floatX *att;                        // (B,H,T,T) softmax probabilities, zero above the diagonal;
                                        // ctxkv (B,H,T,M): one per context slot, zero for empty slots.
                                        // In the gradients: dS = P⊙(dP − rowsum) (the CPU keeps dP there)
    floatX *atty;                       // (B,T,H*D) attention output, heads merged, before dense
} AttnActs;

typedef struct {
    floatX *ln1; float *ln1_mean, *ln1_rstd;  // (B,T,C), (B,T), (B,T)
    floatX *ln2; float *ln2_mean, *ln2_rstd;  // (B,T,C), (B,T), (B,T)
    AttnActs at;
    floatX *fc, *fc_gelu;               // (B,T,F) before and after GELU
} LayerActs;

typedef struct {
    floatX *resid;                      // (L+1, B,T,C): resid[l] is the input of layer l
    LayerActs *layer;                   // [L]
    floatX *attn_out, *mlp_out;         // (B,T,C) scratch, not needed by backward
    floatX *lnf; float *lnf_mean, *lnf_rstd;  // (B,T,C), (B,T), (B,T)
    floatX *logits;                     // (B,T,Vp); backward overwrites it with dlogits
    float *losses;                      // (B,T) per-position loss (0 where ignored)
    float *lse;                         // (B,T) logsumexp of each row of logits
    floatX *contexts;                   // (B,T,d_c) the ContextBlock's c_t (ctxkv / ctxpythia), constants
} Acts;

// gradients of activations: reused by every layer during backward
typedef struct {
    floatX *dresid;                     // (B,T,C) running gradient of the residual stream
    floatX *dln1, *dln2;                // (B,T,C)
    AttnActs dat;                       // same shapes as AttnActs (the rstd/att fields: datt only),
    char *dat_base;                     // laid out per layer kind at this address (layer_backward)
    floatX *dfc_gelu, *dfc;             // (B,T,F)
    floatX *dlnf;                       // (B,T,C)
} GradActs;

static int head_dim(const Config *c) { return c->n_embd / c->n_head; }
static int qk_head_dim(const Config *c, int kind) { return head_dim(c) + (kind == ATTN_MLA ? c->mla_rope_dim : 0); }

#define ACT_ALIGN 256
static size_t act_align(size_t bytes) { return (bytes + ACT_ALIGN - 1) / ACT_ALIGN * ACT_ALIGN; }
// ptr = base + off (or NULL when only counting); off advances by n elements of ptr's type
#define BUF(ptr, n) do { ptr = base ? (decltype(ptr))(base + off) : NULL; off += act_align((size_t)(n) * sizeof(*ptr)); } while (0)

// Lays out one AttnActs of a layer of the given kind for (B,T), from byte offset off. With
// grads != 0 the per-row statistics are skipped.
static size_t layout_attn_acts(const Config *c, int kind, size_t B, size_t T, char *base, size_t off, AttnActs *at, int grads) {
    const size_t BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, kind);
    const size_t G = c->n_kv_head, dR = c->mla_rope_dim, KVA = c->kv_rank + dR;
    memset(at, 0, sizeof *at);
    size_t att_cols = T; // keys per query row in att
    switch (kind) {
    case ATTN_CTX:
        BUF(at->q, BT * C);
        BUF(at->kc, BT * C);
        BUF(at->vc, BT * C);
        att_cols = c->max_contexts;
        break;
    case ATTN_MHA:
        BUF(at->qkv, BT * 3 * C);
        break;
    case ATTN_GQA:
    case ATTN_MQA:
        BUF(at->q, BT * H * D);
        BUF(at->kv, BT * 2 * G * D);
        break;
    case ATTN_MLA:
        BUF(at->q, BT * H * Dq);
        if (c->q_rank > 0) {
            BUF(at->q_lat, BT * c->q_rank);
            BUF(at->q_lat_norm, BT * c->q_rank);
            if (!grads) BUF(at->q_lat_rstd, BT);
        }
        BUF(at->kv_a, BT * KVA);
        BUF(at->c_norm, BT * c->kv_rank);
        if (!grads) BUF(at->c_rstd, BT);
        BUF(at->kvb, BT * H * 2 * D);
        BUF(at->k, BT * H * Dq);
        break;
    }
    BUF(at->att, B * H * T * att_cols);
    BUF(at->atty, BT * H * D);
    return off;
}

// Returns the bytes the layout needs.
static size_t layout_acts(const Config *c, size_t B, size_t T, char *base, Acts *A, GradActs *G) {
    size_t off = 0;
    const size_t C = c->n_embd, F = c->n_inner, L = c->n_layer, Vp = c->padded_vocab_size;
    const size_t BT = B * T;
    if (A) {
        BUF(A->resid, (L + 1) * BT * C);
        for (size_t l = 0; l < L; l++) {
            LayerActs *la = &A->layer[l];
            BUF(la->ln1, BT * C); BUF(la->ln1_mean, BT); BUF(la->ln1_rstd, BT);
            BUF(la->ln2, BT * C); BUF(la->ln2_mean, BT); BUF(la->ln2_rstd, BT);
            off = layout_attn_acts(c, layer_kind(c, (int)l), B, T, base, off, &la->at, 0);
            BUF(la->fc, BT * F); BUF(la->fc_gelu, BT * F);
        }
        BUF(A->attn_out, BT * C); BUF(A->mlp_out, BT * C);
        BUF(A->lnf, BT * C); BUF(A->lnf_mean, BT); BUF(A->lnf_rstd, BT);
        BUF(A->logits, BT * Vp);
        BUF(A->losses, BT);
        BUF(A->lse, BT);
        BUF(A->contexts, has_context_block(c) ? BT * c->context_dim : 0);
    }
    if (G) {
        BUF(G->dresid, BT * C); BUF(G->dln1, BT * C); BUF(G->dln2, BT * C);
        // one set of attention gradients serves every layer: size it for the largest kind
        size_t off_at = off;
        for (int l = 0; l < c->n_layer; l++) {
            size_t end = layout_attn_acts(c, layer_kind(c, l), B, T, NULL, off_at, &G->dat, 1);
            if (end > off) off = end;
        }
        G->dat_base = base ? base + off_at : NULL;
        BUF(G->dfc_gelu, BT * F); BUF(G->dfc, BT * F);
        BUF(G->dlnf, BT * C);
    }
    return off;
}

// ----------------------------------------------------------------------------
// Layers: forward/backward pairs. Each host function launches the kernel(s) that do what
// the CPU function's loops do; shapes and argument order are the CPU program's.

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

// A view of per-head vectors inside a (B,T,row) buffer: head h of token (b,t) starts at
// base + (b*T + t)*row_stride + h*head_stride. Lets one attention core read the fused QKV
// of MHA and the separate Q / KV projections of the other variants.
typedef struct { floatX *base; int row_stride, head_stride; } HeadView;

__host__ __device__ inline floatX *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

#define ATT_THREADS 128

// Causal softmax attention. H query heads share G key/value heads: query head h reads
// KV head h / (H/G) (G = H for MHA). out (B,T,H*Dv), att (B,H,T,T).
// One block per query row (t, h, b): the row's scores sit in shared memory in fp32.
__global__ void attention_forward_kernel(floatX *out, floatX *att, HeadView q, HeadView k, HeadView v, int T, int H,
                                         int G, int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    float *qs = sm, *p = sm + Dqk; // q (Dqk), scores (T)
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const floatX *qt = head_at(q, T, b, t, h);
    for (int j = threadIdx.x; j < Dqk; j += blockDim.x) qs[j] = tof(qt[j]);
    __syncthreads();
    float mx = -INFINITY;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        const floatX *ks = head_at(k, T, b, s, g);
        float d = 0.0f;
        for (int j = 0; j < Dqk; j++) d += qs[j] * tof(ks[j]);
        p[s] = scale * d;
        mx = fmaxf(mx, p[s]);
    }
    mx = block_reduce_max(mx);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    const float inv = 1.0f / block_reduce_sum(sum);
    floatX *arow = att + (((size_t)b * H + h) * T + t) * T;
    for (int s = threadIdx.x; s < T; s += blockDim.x) {
        float pn = s <= t ? p[s] * inv : 0.0f;
        if (s <= t) p[s] = pn;
        arow[s] = fx(pn);
    }
    __syncthreads();
    floatX *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += p[s] * tof(head_at(v, T, b, s, g)[j]);
        o[j] = fx(acc);
    }
}
static void attention_forward(floatX *out, floatX *att, HeadView q, HeadView k, HeadView v, int B, int T, int H,
                              int G, int Dqk, int Dv, float scale) {
    const size_t smem = (size_t)(Dqk + T) * sizeof(float);
    set_smem(attention_forward_kernel, smem);
    attention_forward_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(out, att, q, k, v, T, H, G, Dqk, Dv, scale);
    launchCheck();
}

// dV_g += Σ_h Pᵀ·dO,  dP = dO·Vᵀ,  dS = P⊙(dP − rowsum(dP⊙P)),  dQ += scale·dS·K,  dK_g += scale·dSᵀ·Q.
// Two kernels so that each output row has one writer: the query side, one block per query
// row (t, h, b), forms dS (kept in datt, with the scale) and dq; the key side, one block per
// key row (s, g, b), sums dk and dv over the query rows t >= s of the heads that share g.
__global__ void attention_backward_query_kernel(HeadView dq, floatX *datt, const floatX *dout, const floatX *att,
                                                HeadView k, HeadView v, int T, int H, int G, int Dqk, int Dv, float scale) {
    extern __shared__ float sm[];
    float *dos = sm, *ds = sm + Dv; // dO row (Dv), dP then dS (T)
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (H / G);
    const floatX *dot_ = dout + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
    for (int j = threadIdx.x; j < Dv; j += blockDim.x) dos[j] = tof(dot_[j]);
    __syncthreads();
    const floatX *p = att + (((size_t)b * H + h) * T + t) * T;
    floatX *dsrow = datt + (((size_t)b * H + h) * T + t) * T;
    float rowsum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        const floatX *vs = head_at(v, T, b, s, g);
        float d = 0.0f;
        for (int j = 0; j < Dv; j++) d += dos[j] * tof(vs[j]);
        ds[s] = d;
        rowsum += d * tof(p[s]);
    }
    rowsum = block_reduce_sum(rowsum);
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        ds[s] = tof(p[s]) * (ds[s] - rowsum) * scale;
        dsrow[s] = fx(ds[s]);
    }
    __syncthreads();
    floatX *dqt = head_at(dq, T, b, t, h);
    for (int j = threadIdx.x; j < Dqk; j += blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += ds[s] * tof(head_at(k, T, b, s, g)[j]);
        dqt[j] = fx(tof(dqt[j]) + acc);
    }
}
__global__ void attention_backward_kv_kernel(HeadView dk, HeadView dv, const floatX *datt, const floatX *dout,
                                             const floatX *att, HeadView q, int T, int H, int G, int Dqk, int Dv) {
    const int s = blockIdx.x, g = blockIdx.y, b = blockIdx.z, group = H / G;
    floatX *dks = head_at(dk, T, b, s, g), *dvs = head_at(dv, T, b, s, g);
    for (int j = threadIdx.x; j < Dqk || j < Dv; j += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int h = g * group; h < (g + 1) * group; h++)
            for (int t = s; t < T; t++) {
                const size_t r = (((size_t)b * H + h) * T + t) * T + s;
                if (j < Dqk) ak += tof(datt[r]) * tof(head_at(q, T, b, t, h)[j]);
                if (j < Dv) av += tof(att[r]) * tof(dout[((size_t)b * T + t) * H * Dv + (size_t)h * Dv + j]);
            }
        if (j < Dqk) dks[j] = fx(tof(dks[j]) + ak);
        if (j < Dv) dvs[j] = fx(tof(dvs[j]) + av);
    }
}
static void attention_backward(HeadView dq, HeadView dk, HeadView dv, floatX *datt, const floatX *dout,
                               const floatX *att, HeadView q, HeadView k, HeadView v, int B, int T, int H, int G,
                               int Dqk, int Dv, float scale) {
    const size_t smem = (size_t)(Dv + T) * sizeof(float);
    set_smem(attention_backward_query_kernel, smem);
    attention_backward_query_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(dq, datt, dout, att, k, v, T, H, G, Dqk, Dv, scale);
    launchCheck();
    attention_backward_kv_kernel<<<dim3(T, G, B), ATT_THREADS>>>(dk, dv, datt, dout, att, q, T, H, G, Dqk, Dv);
    launchCheck();
}

// Context-KV attention (layer 0, doc/context_kv.md). Query t attends over M slots: slot k
// holds the key/value of the context at s = t − k·I when s >= 0; empty slots are masked out.
// No positional encoding: the slot order and the recurrence carry position.
// q, kc, vc (B,T,H*D) (kc/vc indexed by the source position s), out (B,T,H*D), att (B,H,T,M).
// One block per query row (t, h, b).
__global__ void ctx_attention_forward_kernel(floatX *out, floatX *att, const floatX *q, const floatX *kc, const floatX *vc,
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
    const float inv = 1.0f / block_reduce_sum(sum);
    floatX *arow = att + (((size_t)b * H + h) * T + t) * M;
    for (int k = threadIdx.x; k < M; k += blockDim.x) {
        float pn = k < n ? p[k] * inv : 0.0f;
        if (k < n) p[k] = pn;
        arow[k] = fx(pn);
    }
    __syncthreads();
    floatX *o = out + ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += p[k] * tof(vc[((size_t)b * T + t - k * interval) * C + h * D + j]);
        o[j] = fx(acc);
    }
}
static void ctx_attention_forward(floatX *out, floatX *att, const floatX *q, const floatX *kc, const floatX *vc, int B,
                                  int T, int H, int D, int interval, int M) {
    const size_t smem = (size_t)(D + M) * sizeof(float);
    set_smem(ctx_attention_forward_kernel, smem);
    ctx_attention_forward_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(out, att, q, kc, vc, T, H, D, interval, M);
    launchCheck();
}

// dV_s += P·dO, dP = dO·V_s, dS = P⊙(dP − Σ P⊙dP), dq += scale·Σ dS·K_s, dK_s += scale·dS·q.
// As attention_backward: the query side per query row (t, h, b) forms dS (in datt) and dq;
// the source side per source row (s, h, b) gathers the query rows t = s + k·I that read it.
__global__ void ctx_attention_backward_query_kernel(floatX *dq, floatX *datt, const floatX *dout, const floatX *att,
                                                    const floatX *kc, const floatX *vc, int T, int H, int D, int interval, int M) {
    extern __shared__ float sm[];
    float *dos = sm, *ds = sm + D; // dO row (D), dP then dS (M)
    const int t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    const floatX *dot_ = dout + ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) dos[j] = tof(dot_[j]);
    __syncthreads();
    const int n = min(M, t / interval + 1);
    const floatX *p = att + (((size_t)b * H + h) * T + t) * M;
    floatX *dsrow = datt + (((size_t)b * H + h) * T + t) * M;
    float rowsum = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const floatX *vs = vc + ((size_t)b * T + t - k * interval) * C + h * D;
        float d = 0.0f;
        for (int j = 0; j < D; j++) d += dos[j] * tof(vs[j]);
        ds[k] = d;
        rowsum += d * tof(p[k]);
    }
    rowsum = block_reduce_sum(rowsum);
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        ds[k] = tof(p[k]) * (ds[k] - rowsum) * scale;
        dsrow[k] = fx(ds[k]);
    }
    __syncthreads();
    floatX *dqt = dq + ((size_t)b * T + t) * C + h * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < n; k++) acc += ds[k] * tof(kc[((size_t)b * T + t - k * interval) * C + h * D + j]);
        dqt[j] = fx(tof(dqt[j]) + acc);
    }
}
__global__ void ctx_attention_backward_source_kernel(floatX *dkc, floatX *dvc, const floatX *datt, const floatX *dout,
                                                     const floatX *att, const floatX *q, int T, int H, int D, int interval, int M) {
    const int s = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = H * D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float ak = 0.0f, av = 0.0f;
        for (int k = 0; k < M && s + k * interval < T; k++) { // query t = s + k·I reads s through slot k
            const int t = s + k * interval;
            const size_t r = (((size_t)b * H + h) * T + t) * M + k;
            ak += tof(datt[r]) * tof(q[((size_t)b * T + t) * C + h * D + j]);
            av += tof(att[r]) * tof(dout[((size_t)b * T + t) * C + h * D + j]);
        }
        const size_t o = ((size_t)b * T + s) * C + h * D + j;
        dkc[o] = fx(tof(dkc[o]) + ak);
        dvc[o] = fx(tof(dvc[o]) + av);
    }
}
static void ctx_attention_backward(floatX *dq, floatX *dkc, floatX *dvc, floatX *datt, const floatX *dout, const floatX *att,
                                   const floatX *q, const floatX *kc, const floatX *vc, int B, int T, int H, int D,
                                   int interval, int M) {
    const size_t smem = (size_t)(D + M) * sizeof(float);
    set_smem(ctx_attention_backward_query_kernel, smem);
    ctx_attention_backward_query_kernel<<<dim3(T, H, B), ATT_THREADS, smem>>>(dq, datt, dout, att, kc, vc, T, H, D, interval, M);
    launchCheck();
    ctx_attention_backward_source_kernel<<<dim3(T, H, B), ATT_THREADS>>>(dkc, dvc, datt, dout, att, q, T, H, D, interval, M);
    launchCheck();
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
// ContextBlock (doc/context_kv.md): one ContextLayer on N rows at once,
//   O = LN_c(S + GELU(W_c [S ; LN_e(E)] + b_c))
// S (N,d_c) plays c_{t-1}, E (N,E) the token embeddings. Phase 1 runs it on every position
// in parallel (S = shifted previous iterate); the exact recurrence runs it on the B rows of
// one time step after another (S = the previous step's output).

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

// ----------------------------------------------------------------------------
// The model

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
    float *losses_host;         // (B,T) a.losses of the last forward with targets, on the host
    float *logits_host; size_t logits_host_cap; // rows of a.logits fetched by model_logits_host
} Model;

// Which tensors train. Phase 1 trains only the ContextBlock (OACD); phase 2 (and every model
// without a block) trains the rest with the block frozen; ctxpythia also freezes embed_in,
// which feeds only the block (doc/context_kv.md).
static void model_set_phase(Model *m, int phase) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        ParamTensor *t = &m->tensors[i];
        int in_block = strncmp(t->name, "ctx_", 4) == 0;
        int embed_frozen = m->cfg.model_type == MODEL_CTXPYTHIA && strcmp(t->name, "embed_in") == 0;
        t->frozen = phase == 1 ? !in_block : (in_block || embed_frozen);
    }
}

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
    layout_params(c, m->params_dev, &m->p, NULL);
    m->rope = rope_init(c->max_seq_len, c->rotary_dims, c->rope_base);
    m->mla_rope = rope_init(c->max_seq_len, c->attn_type == ATTN_MLA ? c->mla_rope_dim : 0, c->rope_base);
    m->a.layer = (LayerActs *)calloc_check(c->n_layer * sizeof(LayerActs), "layer acts");
    m->mean_loss = -1.0f;
    model_set_phase(m, 2);
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
static void model_init_random(Model *m, const Config *c, float init_std, uint64_t seed) {
    model_alloc_params(m, c);
    uint64_t rng = seed ? seed : 1;
    memset(m->params_memory, 0, m->num_params * sizeof(float));
    const float resid_std = init_std / sqrtf(2.0f * c->n_layer);
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        ParamTensor *t = &m->tensors[i];
        float *w = m->params_memory + t->offset;
        size_t n = t->rows * t->cols;
        const char *leaf = strrchr(t->name, '.') ? strrchr(t->name, '.') + 1 : t->name;
        if (strcmp(leaf, "ln1_w") == 0 || strcmp(leaf, "ln2_w") == 0 || strcmp(leaf, "lnf_w") == 0 ||
            strstr(leaf, "norm_w") || strcmp(leaf, "ctx_ln_e_w") == 0 || strcmp(leaf, "ctx_ln_c_w") == 0) {
            for (size_t j = 0; j < n; j++) w[j] = 1.0f; // LayerNorm and RMSNorm weights
        } else if (strcmp(leaf, "ctx_w") == 0 || strcmp(leaf, "ctx_b") == 0) {
            // the prototype's init: W_c ~ N(0, 0.1²), b_c ~ N(0, 0.01²); it reports that
            // Xavier-style init keeps phase 1 from converging
            float std = strcmp(leaf, "ctx_w") == 0 ? 0.1f : 0.01f;
            for (size_t j = 0; j < n; j++) w[j] = std * random_normal(&rng);
        } else if (t->rows > 1) {
            float std = (strcmp(leaf, "dense_w") == 0 || strcmp(leaf, "proj_w") == 0) ? resid_std : init_std;
            size_t real_rows = t->rows;
            if (strcmp(leaf, "embed_in") == 0 || strcmp(leaf, "embed_out") == 0) real_rows = c->vocab_size;
            for (size_t j = 0; j < real_rows * t->cols; j++) w[j] = std * random_normal(&rng);
        } // biases stay 0; padding rows of the embeddings stay 0
    }
    model_to_device(m);
}

// ----------------------------------------------------------------------------
// Training state for exact resume: one file, written atomically, so weights and optimizer
// state can never disagree. Layout: a 256-int32 header (below), then a complete checkpoint
// (its own header and the parameters), then AdamW's m and v (doc/formats.md).

#define TRAIN_STATE_MAGIC 20261129
#define TRAIN_STATE_VERSION 1

typedef struct {
    int step;                  // optimizer steps done
    int epoch;                 // data loader position: the next batch is in this epoch,
    int shard_index;           // at this slot of its shard order,
    long long pos;             // after this many tokens of that shard
    int shuffle;               // --shuffle was given (the order depends on it)
    uint64_t rng;              // sampling RNG
    int B, T;
    long long tokens_seen;
} TrainState;

static void split64(int *h, uint64_t v) { h[0] = (int)(uint32_t)v; h[1] = (int)(uint32_t)(v >> 32); }
static uint64_t join64(const int *h) { return (uint64_t)(uint32_t)h[0] | ((uint64_t)(uint32_t)h[1] << 32); }

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

static void train_state_save(const Model *m, const char *path, const TrainState *st) {
    int h[HEADER_INTS] = {}, ch[HEADER_INTS];
    h[0] = TRAIN_STATE_MAGIC; h[1] = TRAIN_STATE_VERSION; h[2] = st->step; h[3] = m->adam_step;
    h[4] = st->shard_index; split64(h + 5, (uint64_t)st->pos); split64(h + 7, st->rng);
    h[9] = st->B; h[10] = st->T; split64(h + 11, (uint64_t)st->tokens_seen);
    h[13] = st->epoch; h[14] = st->shuffle;
    config_to_header(&m->cfg, ch);
    model_to_host(m);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(ch, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    float *host = (float *)calloc_check(m->num_params * sizeof(float), "train state");
    for (int k = 0; k < 2; k++) { // AdamW m and v (zeros before the first update), in checkpoint order
        const float *mv = k == 0 ? m->m_memory : m->v_memory;
        if (mv) moments_to_host(m, mv, host);
        fwrite_check(host, sizeof(float), m->num_params, af.f, af.tmp);
    }
    free(host);
    atomic_commit(&af); // the previous state stays in place until this rename
}

// Reads the state header and the model config; with m != NULL also the weights and AdamW state.
static Config train_state_load(const char *path, Model *m, TrainState *st) {
    FILE *f = fopen_check(path, "rb");
    long long size = file_size(f);
    int h[HEADER_INTS], ch[HEADER_INTS];
    if (size < 2LL * (long long)sizeof h) die("'%s' is too small to be a training state", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != TRAIN_STATE_MAGIC || h[1] != TRAIN_STATE_VERSION) die("'%s' is not a training state (magic %d, version %d)", path, h[0], h[1]);
    fread_check(ch, sizeof(int), HEADER_INTS, f, path);
    if (ch[0] != CKPT_MAGIC || ch[1] != CKPT_VERSION) die("'%s': the embedded checkpoint header is bad", path);
    Config c = config_from_header(ch);
    const char *problem = config_problem(&c);
    if (problem) die("'%s': bad config: %s", path, problem);
    size_t n = layout_params(&c, NULL, NULL, NULL);
    if (size != 2LL * (long long)sizeof h + 3LL * 4 * (long long)n) die("'%s' has %lld bytes, not the %lld its header implies: truncated or corrupt", path, size, 2LL * (long long)sizeof h + 12LL * (long long)n);
    st->step = h[2]; st->shard_index = h[4]; st->pos = (long long)join64(h + 5); st->rng = join64(h + 7);
    st->B = h[9]; st->T = h[10]; st->tokens_seen = (long long)join64(h + 11);
    st->epoch = h[13]; st->shuffle = h[14];
    if (st->step < 0 || h[3] < 0 || st->shard_index < 0 || st->pos < 0) die("'%s': bad step or data position", path);
    // every epoch takes at least one batch, so the epoch can't pass the step; shuffle is a flag
    if (st->epoch < 0 || st->epoch > st->step || (st->shuffle != 0 && st->shuffle != 1)) die("'%s': bad data epoch or shuffle flag", path);
    if (m) {
        model_alloc_params(m, &c);
        fread_check(m->params_memory, sizeof(float), n, f, path);
        model_to_device(m);
        m->m_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW m");
        m->v_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW v");
        float *host = (float *)malloc_check(n * sizeof(float), "train state");
        fread_check(host, sizeof(float), n, f, path);
        moments_to_device(m, host, m->m_memory);
        fread_check(host, sizeof(float), n, f, path);
        moments_to_device(m, host, m->v_memory);
        free(host);
        m->adam_step = h[3];
    }
    fclose(f);
    return c;
}

static void resume_path(char *buf, size_t n, const char *dir) {
    if ((size_t)snprintf(buf, n, "%s/train_state.bin", dir) >= n) die("--resume path too long");
}

// Loads a checkpoint; refuses one whose header is inconsistent or whose size differs
// from what the header implies.
// Reads and validates a checkpoint's header and size; leaves f at the parameters.
static Config checkpoint_open(const char *path, FILE **out) {
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a checkpoint (%lld bytes)", path, size);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != CKPT_MAGIC) die("'%s' is not a ctxkv checkpoint (magic %d, expected %d)", path, h[0], CKPT_MAGIC);
    if (h[1] != CKPT_VERSION) die("'%s' has checkpoint version %d, this build reads %d", path, h[1], CKPT_VERSION);
    Config c = config_from_header(h);
    const char *problem = config_problem(&c);
    if (problem) die("'%s': bad config in header: %s", path, problem);
    size_t n = layout_params(&c, NULL, NULL, NULL);
    long long expect = (long long)sizeof h + (long long)n * (long long)sizeof(float);
    if (size != expect)
        die("'%s' has %lld bytes but its header implies %lld (%zu parameters): wrong size", path, size, expect, n);
    if (out) *out = f;
    else fclose(f);
    return c;
}

static void model_load(Model *m, const char *path) {
    FILE *f;
    Config c = checkpoint_open(path, &f);
    model_alloc_params(m, &c);
    fread_check(m->params_memory, sizeof(float), m->num_params, f, path);
    fclose(f);
    model_to_device(m);
}

static void model_save(const Model *m, const char *path) {
    int h[HEADER_INTS];
    config_to_header(&m->cfg, h);
    model_to_host(m); // the fp32 master weights are the checkpoint
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    atomic_commit(&af);
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
// program reads m->a.logits directly)
static const float *model_logits_host(Model *m, size_t row0, size_t n) {
    const size_t Vp = m->cfg.padded_vocab_size;
    if (n * Vp > m->logits_host_cap) {
        free(m->logits_host);
        m->logits_host = (float *)malloc_check(n * Vp * sizeof(float), "logits");
        m->logits_host_cap = n * Vp;
    }
    download_floats(m->logits_host, m->a.logits + row0 * Vp, n * Vp);
    return m->logits_host;
}

// ----------------------------------------------------------------------------
// Attention blocks. What differs between the variants is only how q, k and v are made
// from LN_1(x) (attn_project_*), where they sit (attn_views), and what the KV cache holds
// (attn_kv_elements, attn_cache_write, attn_decode). The causal softmax core and the
// output projection are shared. doc/attention.md has the equations.

// Head views of q, k, v inside an AttnActs (activations or their gradients: same layout).
static void attn_views(const Config *c, int kind, const AttnActs *at, HeadView *q, HeadView *k, HeadView *v) {
    const int C = c->n_embd, H = c->n_head, D = head_dim(c), G = c->n_kv_head, Dq = qk_head_dim(c, kind);
    switch (kind) {
    case ATTN_CTX: // heads of D; kc/vc rows are source positions (the slots index them)
        *q = HeadView{at->q, C, D};
        *k = HeadView{at->kc, C, D};
        *v = HeadView{at->vc, C, D};
        break;
    case ATTN_MHA: // fused, interleaved per head: [q | k | v] of head h at h*3D
        *q = HeadView{at->qkv, 3 * C, 3 * D};
        *k = HeadView{at->qkv + D, 3 * C, 3 * D};
        *v = HeadView{at->qkv + 2 * D, 3 * C, 3 * D};
        break;
    case ATTN_GQA:
    case ATTN_MQA: // q (H heads), then kv = [K of G heads | V of G heads]
        *q = HeadView{at->q, H * D, D};
        *k = HeadView{at->kv, 2 * G * D, D};
        *v = HeadView{at->kv + G * D, 2 * G * D, D};
        break;
    case ATTN_MLA: // q and k per head [nope (D) | rope (dR)]; v is the second half of kvb's head
        *q = HeadView{at->q, H * Dq, Dq};
        *k = HeadView{at->k, H * Dq, Dq};
        *v = HeadView{at->kvb + D, H * 2 * D, 2 * D};
        break;
    }
}

// key/value heads the core sees: MLA materialises one key per query head for training
static int attn_core_kv_heads(const Config *c, int kind) {
    return (kind == ATTN_MLA || kind == ATTN_CTX) ? c->n_head : c->n_kv_head;
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

// q, k, v from x = LN_1(x_l) (B,T,C), positions pos0.., RoPE applied
static void attn_project_forward(const Model *m, int kind, const LayerParams *lp, AttnActs *at, const floatX *x, int B,
                                 int T, int pos0) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), G = c->n_kv_head;
    switch (kind) {
    case ATTN_CTX: // q from the token; keys and values of every context (constants)
        matmul_forward(at->q, x, lp->q_w, lp->q_b, BT, C, C);
        matmul_forward(at->kc, m->a.contexts, lp->k_w, lp->k_b, BT, c->context_dim, C);
        matmul_forward(at->vc, m->a.contexts, lp->v_w, lp->v_b, BT, c->context_dim, C);
        break;
    case ATTN_MHA:
        matmul_forward(at->qkv, x, lp->qkv_w, lp->qkv_b, BT, C, 3 * C);
        rope_forward(at->qkv, B, T, pos0, 3 * C, H, 3 * D, &m->rope);     // q
        rope_forward(at->qkv + D, B, T, pos0, 3 * C, H, 3 * D, &m->rope); // k
        break;
    case ATTN_GQA:
    case ATTN_MQA:
        matmul_forward(at->q, x, lp->q_w, lp->q_b, BT, C, H * D);
        matmul_forward(at->kv, x, lp->kv_w, lp->kv_b, BT, C, 2 * G * D);
        rope_forward(at->q, B, T, pos0, H * D, H, D, &m->rope);
        rope_forward(at->kv, B, T, pos0, 2 * G * D, G, D, &m->rope); // the G key heads, before sharing
        break;
    case ATTN_MLA: {
        const int dR = c->mla_rope_dim, Dq = D + dR, KVA = c->kv_rank + dR;
        if (c->q_rank > 0) { // query compression: q = W_UQ · RMSNorm(W_DQ x)
            matmul_forward(at->q_lat, x, lp->q_a_w, NULL, BT, C, c->q_rank);
            rmsnorm_forward(at->q_lat_norm, at->q_lat_rstd, at->q_lat, c->q_rank, lp->q_a_norm_w, BT, c->q_rank, c->rms_eps);
            matmul_forward(at->q, at->q_lat_norm, lp->q_b_w, NULL, BT, c->q_rank, H * Dq);
        } else {
            matmul_forward(at->q, x, lp->q_w, NULL, BT, C, H * Dq);
        }
        rope_forward(at->q + D, B, T, pos0, H * Dq, H, Dq, &m->mla_rope);               // q_pe
        matmul_forward(at->kv_a, x, lp->kv_a_w, NULL, BT, C, KVA);                       // [c | k_R]
        rope_forward(at->kv_a + c->kv_rank, B, T, pos0, KVA, 1, 0, &m->mla_rope);        // k_pe
        rmsnorm_forward(at->c_norm, at->c_rstd, at->kv_a, KVA, lp->kv_a_norm_w, BT, c->kv_rank, c->rms_eps);
        matmul_forward(at->kvb, at->c_norm, lp->kv_b_w, NULL, BT, c->kv_rank, H * 2 * D); // [k_nope | v]
        mla_gather_keys(at->k, at->kvb, at->kv_a + c->kv_rank, KVA, BT, H, D, dR);
        break;
    }
    }
}

// backward of attn_project_forward: dat holds dq, dk, dv (from the core); accumulates into
// dx (B,T,C) and the layer's parameter grads lg
static void attn_project_backward(const Model *m, int kind, const LayerParams *lp, LayerParams *lg, const AttnActs *at,
                                  AttnActs *dat, floatX *dx, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), G = c->n_kv_head;
    switch (kind) {
    case ATTN_CTX: // the contexts are constants: no gradient flows into them
        matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, BT, C, C);
        matmul_backward(NULL, lg->k_w, lg->k_b, dat->kc, m->a.contexts, lp->k_w, BT, c->context_dim, C);
        matmul_backward(NULL, lg->v_w, lg->v_b, dat->vc, m->a.contexts, lp->v_w, BT, c->context_dim, C);
        break;
    case ATTN_MHA:
        rope_backward(dat->qkv, B, T, 0, 3 * C, H, 3 * D, &m->rope);
        rope_backward(dat->qkv + D, B, T, 0, 3 * C, H, 3 * D, &m->rope);
        matmul_backward(dx, lg->qkv_w, lg->qkv_b, dat->qkv, x, lp->qkv_w, BT, C, 3 * C);
        break;
    case ATTN_GQA:
    case ATTN_MQA:
        rope_backward(dat->q, B, T, 0, H * D, H, D, &m->rope);
        rope_backward(dat->kv, B, T, 0, 2 * G * D, G, D, &m->rope);
        matmul_backward(dx, lg->q_w, lg->q_b, dat->q, x, lp->q_w, BT, C, H * D);
        matmul_backward(dx, lg->kv_w, lg->kv_b, dat->kv, x, lp->kv_w, BT, C, 2 * G * D);
        break;
    case ATTN_MLA: {
        const int dR = c->mla_rope_dim, Dq = D + dR, KVA = c->kv_rank + dR;
        mla_gather_keys_backward(dat->kvb, dat->kv_a + c->kv_rank, KVA, dat->k, BT, H, D, dR);
        rope_backward(dat->kv_a + c->kv_rank, B, T, 0, KVA, 1, 0, &m->mla_rope);
        rope_backward(dat->q + D, B, T, 0, H * Dq, H, Dq, &m->mla_rope);
        matmul_backward(dat->c_norm, lg->kv_b_w, NULL, dat->kvb, at->c_norm, lp->kv_b_w, BT, c->kv_rank, H * 2 * D);
        rmsnorm_backward(dat->kv_a, KVA, lg->kv_a_norm_w, dat->c_norm, at->kv_a, lp->kv_a_norm_w, at->c_rstd, BT, c->kv_rank);
        matmul_backward(dx, lg->kv_a_w, NULL, dat->kv_a, x, lp->kv_a_w, BT, C, KVA);
        if (c->q_rank > 0) {
            matmul_backward(dat->q_lat_norm, lg->q_b_w, NULL, dat->q, at->q_lat_norm, lp->q_b_w, BT, c->q_rank, H * Dq);
            rmsnorm_backward(dat->q_lat, c->q_rank, lg->q_a_norm_w, dat->q_lat_norm, at->q_lat, lp->q_a_norm_w, at->q_lat_rstd, BT, c->q_rank);
            matmul_backward(dx, lg->q_a_w, NULL, dat->q_lat, x, lp->q_a_w, BT, C, c->q_rank);
        } else {
            matmul_backward(dx, lg->q_w, NULL, dat->q, x, lp->q_w, BT, C, H * Dq);
        }
        break;
    }
    }
}

// out (B,T,C) = dense(attention(q, k, v)) for x = LN_1(x_l). A ctxkv layer attends over its
// context slots; every other kind uses the causal core.
static void attention_block_forward(const Model *m, int kind, const LayerParams *lp, AttnActs *at, floatX *out,
                                    const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, kind);
    attn_project_forward(m, kind, lp, at, x, B, T, 0);
    if (kind == ATTN_CTX) {
        ctx_attention_forward(at->atty, at->att, at->q, at->kc, at->vc, B, T, H, D, c->context_interval, c->max_contexts);
    } else {
        HeadView q, k, v;
        attn_views(c, kind, at, &q, &k, &v);
        attention_forward(at->atty, at->att, q, k, v, B, T, H, attn_core_kv_heads(c, kind), Dq, D, 1.0f / sqrtf((float)Dq));
    }
    matmul_forward(out, at->atty, lp->dense_w, lp->dense_b, B * T, H * D, c->n_embd);
}

static void attention_block_backward(const Model *m, int kind, const LayerParams *lp, LayerParams *lg, const AttnActs *at,
                                     AttnActs *dat, floatX *dx, const floatX *dout, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, kind);
    matmul_backward(dat->atty, lg->dense_w, lg->dense_b, dout, at->atty, lp->dense_w, B * T, H * D, c->n_embd);
    if (kind == ATTN_CTX) {
        ctx_attention_backward(dat->q, dat->kc, dat->vc, dat->att, dat->atty, at->att, at->q, at->kc, at->vc, B, T, H,
                               D, c->context_interval, c->max_contexts);
    } else {
        HeadView q, k, v, dq, dk, dv;
        attn_views(c, kind, at, &q, &k, &v);
        attn_views(c, kind, dat, &dq, &dk, &dv);
        attention_backward(dq, dk, dv, dat->att, dat->atty, at->att, q, k, v, B, T, H, attn_core_kv_heads(c, kind), Dq,
                           D, 1.0f / sqrtf((float)Dq));
    }
    attn_project_backward(m, kind, lp, lg, at, dat, dx, x, B, T);
}

// ----------------------------------------------------------------------------
// Forward and backward of the whole model

// Checks a batch against the model before anything runs.
static void check_batch(const Config *c, const int *inputs, const int *targets, int B, int T) {
    const int V = c->vocab_size;
    if (T > c->max_seq_len) die("sequence length %d exceeds the model's max_seq_len %d", T, c->max_seq_len);
    for (int i = 0; i < B * T; i++)
        if (inputs[i] < 0 || inputs[i] >= V) die("input token id %d at position %d is outside the vocabulary (0..%d)", inputs[i], i, V - 1);
    if (targets)
        for (int i = 0; i < B * T; i++)
            if (targets[i] != IGNORE_INDEX && (targets[i] < 0 || targets[i] >= V))
                die("target token id %d at position %d is outside the vocabulary (0..%d)", targets[i], i, V - 1);
}

typedef struct KVCache KVCache;
static void attention_block_decode(const Model *m, const LayerParams *lp, AttnActs *at, floatX *out, const floatX *x,
                                   KVCache *kv, int l);

// One Pythia layer: x_out = x + Attn(LN_1(x)) + MLP(LN_2(x)), the parallel residual.
// With a KV cache (decoding, T = 1) the attention reads the cached tokens instead.
static void layer_forward(Model *m, int l, floatX *x_out, const floatX *x, int B, int T, KVCache *kv) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, F = c->n_inner;
    const LayerParams *lp = &m->p.layer[l];
    LayerActs *la = &m->a.layer[l];
    layernorm_forward(la->ln1, la->ln1_mean, la->ln1_rstd, x, lp->ln1_w, lp->ln1_b, BT, C, c->ln_eps);
    layernorm_forward(la->ln2, la->ln2_mean, la->ln2_rstd, x, lp->ln2_w, lp->ln2_b, BT, C, c->ln_eps);
    if (kv) attention_block_decode(m, lp, &la->at, m->a.attn_out, la->ln1, kv, l);
    else attention_block_forward(m, layer_kind(c, l), lp, &la->at, m->a.attn_out, la->ln1, B, T);
    matmul_forward(la->fc, la->ln2, lp->fc_w, lp->fc_b, BT, C, F);
    gelu_forward(la->fc_gelu, la->fc, (size_t)BT * F);
    matmul_forward(m->a.mlp_out, la->fc_gelu, lp->proj_w, lp->proj_b, BT, F, C);
    residual3_forward(x_out, x, m->a.attn_out, m->a.mlp_out, (size_t)BT * C);
}

// ga->dresid holds d loss / d x_out on entry and d loss / d x on return: the parallel
// residual passes it unchanged to x, to the attention output and to the MLP output.
static void layer_backward(Model *m, int l, const floatX *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, F = c->n_inner;
    const LayerParams *lp = &m->p.layer[l];
    LayerParams *lg = &m->g.layer[l];
    LayerActs *la = &m->a.layer[l];
    GradActs *ga = &m->ga;
    // every per-layer gradient buffer (dln1 .. dfc) is contiguous: zero them together
    cudaCheck(cudaMemset(ga->dln1, 0, (size_t)((char *)ga->dlnf - (char *)ga->dln1)));
    const int kind = layer_kind(c, l);
    layout_attn_acts(c, kind, B, T, ga->dat_base, 0, &ga->dat, 1);
    // MLP branch
    matmul_backward(ga->dfc_gelu, lg->proj_w, lg->proj_b, ga->dresid, la->fc_gelu, lp->proj_w, BT, F, C);
    gelu_backward(ga->dfc, la->fc, ga->dfc_gelu, (size_t)BT * F);
    matmul_backward(ga->dln2, lg->fc_w, lg->fc_b, ga->dfc, la->ln2, lp->fc_w, BT, C, F);
    // attention branch
    attention_block_backward(m, kind, lp, lg, &la->at, &ga->dat, ga->dln1, ga->dresid, la->ln1, B, T);
    // both LayerNorms read x: their input grads add into the residual gradient
    layernorm_backward(ga->dresid, lg->ln1_w, lg->ln1_b, ga->dln1, x, lp->ln1_w, la->ln1_mean, la->ln1_rstd, BT, C);
    layernorm_backward(ga->dresid, lg->ln2_w, lg->ln2_b, ga->dln2, x, lp->ln2_w, la->ln2_mean, la->ln2_rstd, BT, C);
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

// final LayerNorm and the untied head: logits (BT, Vp) from resid[L]
static void head_forward(Model *m, int BT) {
    const Config *c = &m->cfg;
    Acts *a = &m->a;
    const floatX *xL = a->resid + (size_t)c->n_layer * BT * c->n_embd;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, xL, m->p.lnf_w, m->p.lnf_b, BT, c->n_embd, c->ln_eps);
    // evaluation that needs a few rows' logits (LAMBADA's last word) skips the others: the
    // vocabulary head is most of the cost
    int from = m->head_from > 0 && m->head_from < BT ? m->head_from : 0;
    matmul_forward(a->logits + (size_t)from * c->padded_vocab_size, a->lnf + (size_t)from * c->n_embd, m->p.embed_out,
                   NULL, BT - from, c->n_embd, c->padded_vocab_size);
}

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

static void model_zero_grad(Model *m) {
    if (m->grads_memory) cudaCheck(cudaMemset(m->grads_memory, 0, m->num_params_dev * sizeof(floatX)));
}

// Backward of the last forward (which must have had targets). Accumulates into m->g.
// Overwrites the logits with dlogits.
static void model_backward(Model *m) {
    const Config *c = &m->cfg;
    if (m->mean_loss < 0.0f) die("model_backward called without a forward pass with targets");
    const int B = m->B, T = m->T, BT = B * T, C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size;
    if (!m->grads_memory) {
        m->grads_memory = (floatX *)cuda_calloc_check(m->num_params_dev * sizeof(floatX), "gradients");
        layout_params(c, m->grads_memory, &m->g, NULL);
    }
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
__global__ void scale_kernel(floatX *x, float coef, size_t n) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) x[i] = fx(tof(x[i]) * coef);
}

// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_: scale all grads by
// min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping. max_norm <= 0: no clip.
static float model_clip_grad_norm(Model *m, float max_norm) {
    const size_t n = m->num_params_dev;
    double *partial = (double *)dev_temp(TMP_NORM, NORM_BLOCKS * sizeof(double)), host[NORM_BLOCKS];
    grad_sq_partial_kernel<<<NORM_BLOCKS, 256>>>(partial, m->grads_memory, n);
    launchCheck();
    cudaCheck(cudaMemcpy(host, partial, sizeof host, cudaMemcpyDeviceToHost));
    double sq = 0.0;
    for (int i = 0; i < NORM_BLOCKS; i++) sq += host[i];
    float norm = (float)sqrt(sq);
    if (max_norm > 0.0f && isfinite(norm)) {
        float coef = max_norm / (norm + 1e-6f);
        if (coef < 1.0f) {
            scale_kernel<<<ceil_div(n, 256), 256>>>(m->grads_memory, coef, n);
            launchCheck();
        }
    }
    return norm;
}

typedef struct { float lr, beta1, beta2, eps, weight_decay; } AdamW;

// One tensor's AdamW update on the fp32 master weights; the bf16 copy the layers read is
// written from the updated master (with PRECISION=FP32 they are the same memory).
__global__ void adamw_kernel(floatX *params, float *master, const floatX *grads, float *mm, float *vv, size_t n,
                             float beta1, float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
    const size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = tof(grads[i]);
    float p = master[i] * decay;
    const float m_ = beta1 * mm[i] + (1.0f - beta1) * g;
    const float v_ = beta2 * vv[i] + (1.0f - beta2) * g * g;
    mm[i] = m_;
    vv[i] = v_;
    p -= step_size * m_ / (sqrtf(v_) / bc2_sqrt + eps);
    master[i] = p;
    if ((void *)params != (void *)master) params[i] = fx(p);
}

// AdamW exactly as torch.optim.AdamW: decoupled decay p *= 1 − lr·wd (2-D tensors only),
// then p −= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
static void model_update(Model *m, const AdamW *opt) {
    if (!m->m_memory) {
        m->m_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW m");
        m->v_memory = (float *)cuda_calloc_check(m->num_params_dev * sizeof(float), "AdamW v");
    }
    m->adam_step++;
    const float bc1 = 1.0f - powf(opt->beta1, (float)m->adam_step);
    const float bc2_sqrt = sqrtf(1.0f - powf(opt->beta2, (float)m->adam_step));
    const float step_size = opt->lr / bc1;
    for (ptrdiff_t ti = 0; ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        if (t->frozen) continue;
        const float decay = (t->rows > 1) ? 1.0f - opt->lr * opt->weight_decay : 1.0f;
        const size_t o = t->dev_offset, n = t->rows * t->cols;
        adamw_kernel<<<ceil_div(n, 256), 256>>>(m->params_dev + o, m->master_dev + o, m->grads_memory + o, m->m_memory + o,
                                                m->v_memory + o, n, opt->beta1, opt->beta2, opt->eps, decay,
                                                step_size, bc2_sqrt);
        launchCheck();
    }
}

// ----------------------------------------------------------------------------
// Data: llm.c token shards (doc/formats.md), validated when opened

typedef struct {
    char **files;        // stb_ds array of shard paths, sorted (glob order)
    int vocab_size;
    int B, T;
    int shuffle;         // --shuffle: shards and blocks in a random order each epoch (else in file order)
    uint64_t seed;       // the order's seed (--seed)
    int epoch;           // passes over all the shards so far
    int *shard_order;    // (n_files) the files in this epoch's order
    int shard_index;     // slot in shard_order of the current shard
    int loaded;          // index of the file in tokens (-1: none yet)
    uint16_t *tokens;    // the current shard, whole
    size_t ntok;
    size_t n_blocks;     // whole B*T-token blocks in the current shard (each read with its next token)
    int *block_order;    // (n_blocks) with --shuffle, this epoch's order of the blocks
    size_t pos;          // tokens read from the current shard, a multiple of B*T: next block = pos / (B*T)
    int *inputs, *targets; // (B,T)
} DataLoader;

// Reads and validates one shard. Every token must be < vocab_size.
static uint16_t *shard_load(const char *path, size_t *ntok_out, int vocab_size) {
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a token shard (%lld bytes, header is 1024)", path, size);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != SHARD_MAGIC) die("'%s' is not a token shard (magic %d, expected %d)", path, h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION) die("'%s' has shard version %d, expected %d", path, h[1], SHARD_VERSION);
    if (h[2] < 0) die("'%s' has a negative token count", path);
    long long expect = (long long)sizeof h + 2LL * h[2];
    if (size != expect) die("'%s' has %lld bytes but its header says %d tokens (%lld bytes): truncated or corrupt", path, size, h[2], expect);
    size_t n = (size_t)h[2];
    uint16_t *tok = (uint16_t *)malloc_check(n * sizeof(uint16_t), "shard tokens");
    fread_check(tok, sizeof(uint16_t), n, f, path);
    fclose(f);
    for (size_t i = 0; i < n; i++)
        if (tok[i] >= vocab_size) die("'%s': token %u at index %zu is outside the model's vocabulary (%d)", path, tok[i], i, vocab_size);
    *ntok_out = n;
    return tok;
}

// splitmix64's finaliser: a well-mixed 64-bit key from a seed and counters
static uint64_t mix64(uint64_t x) {
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27; x *= 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// p = a random permutation of 0..n-1 (Fisher-Yates), a function of key alone, so an order can be
// rebuilt from (seed, epoch, file) on resume instead of being saved
static void random_permutation(int *p, size_t n, uint64_t key) {
    uint64_t rng = mix64(key) | 1; // xorshift needs a nonzero state
    for (size_t i = 0; i < n; i++) p[i] = (int)i;
    for (size_t i = n; i > 1; i--) {
        size_t j = random_u32(&rng) % i;
        int t = p[i - 1]; p[i - 1] = p[j]; p[j] = t;
    }
}

// this epoch's shard order: file order, or with --shuffle a permutation of (seed, epoch)
static void dataloader_order_shards(DataLoader *d) {
    int n = (int)arrlen(d->files);
    if (d->shuffle) random_permutation(d->shard_order, n, mix64(d->seed) + (uint64_t)d->epoch);
    else for (int i = 0; i < n; i++) d->shard_order[i] = i;
}

// Makes slot `slot` of this epoch's order the current shard: reads its file (unless it is the one
// already held) and, with --shuffle, draws the order of its blocks from (seed, epoch, file).
static void dataloader_load_shard(DataLoader *d, int slot) {
    int file = d->shard_order[slot];
    if (file != d->loaded) {
        free(d->tokens);
        d->tokens = shard_load(d->files[file], &d->ntok, d->vocab_size);
        d->loaded = file;
        if (d->ntok < (size_t)d->B * d->T + 1)
            die("'%s' has %zu tokens, fewer than one batch needs (B*T+1 = %d)", d->files[file], d->ntok, d->B * d->T + 1);
    }
    d->shard_index = slot;
    d->pos = 0;
    d->n_blocks = (d->ntok - 1) / ((size_t)d->B * d->T);
    if (d->shuffle) {
        free(d->block_order);
        d->block_order = (int *)malloc_check(d->n_blocks * sizeof(int), "block order");
        random_permutation(d->block_order, d->n_blocks, mix64(mix64(d->seed) + (uint64_t)d->epoch) + (uint64_t)file);
    }
}

static void dataloader_init(DataLoader *d, const char *pattern, int B, int T, int vocab_size) {
    memset(d, 0, sizeof *d);
    glob_t g;
    int rc = glob(pattern, 0, NULL, &g);
    if (rc != 0 || g.gl_pathc == 0) die("no files match '%s' (run the prepro step: make data)", pattern);
    for (size_t i = 0; i < g.gl_pathc; i++) arrput(d->files, strdup(g.gl_pathv[i]));
    globfree(&g);
    d->B = B;
    d->T = T;
    d->vocab_size = vocab_size;
    d->loaded = -1;
    d->inputs = (int *)malloc_check((size_t)B * T * sizeof(int), "batch");
    d->targets = (int *)malloc_check((size_t)B * T * sizeof(int), "batch");
    d->shard_order = (int *)malloc_check(arrlen(d->files) * sizeof(int), "shard order");
    dataloader_order_shards(d);
    // validate every shard up front so a bad file fails before training starts
    for (int i = (int)arrlen(d->files) - 1; i >= 0; i--) dataloader_load_shard(d, i);
}

// puts the loader where a saved run left it: epoch, slot in that epoch's order, tokens read
static void dataloader_seek(DataLoader *d, int epoch, int shard_index, long long pos) {
    if (shard_index >= (int)arrlen(d->files)) die("--resume: the saved data position is shard %d, but only %d shard(s) match", shard_index, (int)arrlen(d->files));
    d->epoch = epoch;
    dataloader_order_shards(d);
    dataloader_load_shard(d, shard_index);
    size_t BT = (size_t)d->B * d->T;
    if (pos < 0 || (size_t)pos % BT != 0 || (size_t)pos / BT > d->n_blocks)
        die("--resume: the saved data position %lld does not fit '%s' (%zu blocks of B*T = %zu tokens)", pos, d->files[d->shard_order[shard_index]], d->n_blocks, BT);
    d->pos = (size_t)pos;
}

// --shuffle (training only): from here on, each epoch visits the shards in a random order and
// the B*T-token blocks of each shard in a random order, as llm.c's loader does, so a short run
// sees text from the whole corpus instead of its first few documents. Starts at epoch 0.
static void dataloader_shuffle(DataLoader *d, uint64_t seed) {
    d->shuffle = 1;
    d->seed = seed;
    dataloader_seek(d, 0, 0, 0);
}

static void dataloader_reset(DataLoader *d) {
    dataloader_load_shard(d, 0);
}

// Next (B,T) batch: the next block of B consecutive windows of T+1 tokens; moves to the next
// shard when the current one has no whole block left, and to a new epoch after the last one.
static void dataloader_next(DataLoader *d) {
    size_t BT = (size_t)d->B * d->T;
    if (d->pos / BT >= d->n_blocks) {
        int next = d->shard_index + 1;
        if (next == (int)arrlen(d->files)) {
            next = 0;
            d->epoch++;
            dataloader_order_shards(d);
        }
        dataloader_load_shard(d, next);
    }
    size_t k = d->pos / BT, block = d->shuffle ? (size_t)d->block_order[k] : k;
    const uint16_t *buf = d->tokens + block * BT;
    for (size_t i = 0; i < BT; i++) {
        d->inputs[i] = buf[i];
        d->targets[i] = buf[i + 1];
    }
    d->pos += BT;
}

// how many whole batches the first shard holds (used to cap validation)
static int dataloader_batches_in_shard(const DataLoader *d) { return (int)d->n_blocks; }

static void dataloader_free(DataLoader *d) {
    for (ptrdiff_t i = 0; i < arrlen(d->files); i++) free(d->files[i]);
    arrfree(d->files);
    free(d->tokens); free(d->inputs); free(d->targets);
    free(d->shard_order); free(d->block_order);
}

// ----------------------------------------------------------------------------
// Token table: token id -> bytes, to print samples (doc/formats.md)

typedef struct { int len; char *bytes; } TokenBytes;
typedef struct { TokenBytes *tokens; int eot; } Tokenizer; // tokens: stb_ds array

static int tokenizer_load(Tokenizer *tk, const char *path) {
    memset(tk, 0, sizeof *tk);
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    int h[HEADER_INTS];
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != TOKTAB_MAGIC || h[1] != TOKTAB_VERSION) die("'%s' is not a token table (magic %d version %d)", path, h[0], h[1]);
    if (h[2] < 1 || h[2] > 65536) die("'%s': bad token count %d", path, h[2]);
    tk->eot = h[3];
    for (int i = 0; i < h[2]; i++) {
        TokenBytes t;
        unsigned char len[2];
        fread_check(len, 1, 2, f, path);
        t.len = len[0] | (len[1] << 8); // uint16 little-endian
        t.bytes = (char *)malloc_check(t.len + 1, "token");
        if (t.len) fread_check(t.bytes, 1, t.len, f, path);
        t.bytes[t.len] = 0;
        arrput(tk->tokens, t);
    }
    fclose(f);
    return 1;
}

static void tokenizer_free(Tokenizer *tk) {
    for (ptrdiff_t i = 0; i < arrlen(tk->tokens); i++) free(tk->tokens[i].bytes);
    arrfree(tk->tokens);
}

// prints a token's bytes; tokens the table lacks print as <id>
static void tokenizer_print(const Tokenizer *tk, int id) {
    if (tk->tokens && id >= 0 && id < arrlen(tk->tokens)) fwrite(tk->tokens[id].bytes, 1, tk->tokens[id].len, stdout);
    else printf("<%d>", id);
}

// ----------------------------------------------------------------------------
// Sampling

// ----------------------------------------------------------------------------
// KV-cached decoding. The cache holds, per layer and token, exactly what the variant needs
// to attend later (attn_kv_elements); its size in bytes is what --kv-report accounts for.
// The cache is fp32 on the GPU, as the CPU program's (whatever floatX is), so the byte counts
// --generate prints are the CPU program's; a bf16 cache would be --kv-report's bf16 figure.

// values cached per token by a layer of this kind (ctxkv layer 0 keeps contexts in a ring instead)
static size_t attn_kv_elements(const Config *c, int kind) {
    switch (kind) {
    case ATTN_CTX: return 0;
    case ATTN_MLA: return (size_t)c->kv_rank + c->mla_rope_dim;   // ĉ and k_pe, shared by all heads
    default: return 2 * (size_t)c->n_kv_head * head_dim(c);       // K and V of the G kv heads (G = H for mha)
    }
}

// contexts a ctxkv decoder must keep: slots reach back (M−1)·I positions
static int ctx_ring_len(const Config *c) { return (c->max_contexts - 1) * c->context_interval + 1; }

// The KV accounting (doc/context_kv.md): values per token that grow with length. A ctxkv
// layer 0 costs d_c per token (one context), but only while the ring is not full.
static size_t kv_elements_per_token(const Config *c) {
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++)
        n += layer_kind(c, l) == ATTN_CTX ? (size_t)c->context_dim : attn_kv_elements(c, layer_kind(c, l));
    return n;
}

// Values the decoder holds after T tokens: the per-layer caches, the ring (capped at
// (M−1)·I+1 contexts) and the running context (ctxkv and ctxpythia).
static size_t kv_elements_at(const Config *c, size_t T) {
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++) n += T * attn_kv_elements(c, layer_kind(c, l));
    if (c->layer0_type == LAYER0_CTXKV) {
        size_t ring = (size_t)ctx_ring_len(c);
        n += (T < ring ? T : ring) * c->context_dim;
    }
    if (has_context_block(c)) n += c->context_dim; // the running context c_{t-1}
    return n;
}

struct KVCache {
    int batch;          // sequences decoded together (B); all have the same length
    int capacity;       // tokens each can hold
    int len;            // tokens cached so far
    size_t per_token;   // floats per token per cached layer (attn_kv_elements of layers 1..)
    int first_layer;    // first layer with a per-token cache (1 when layer 0 is ctxkv)
    float *mem;         // GPU (L − first_layer, B, capacity, per_token)
    int ring_len;       // ctxkv: contexts kept, min(capacity, (M−1)·I+1); context s at s % ring_len
    float *ring;        // GPU (B, ring_len, d_c)
    float *running;     // GPU (B, d_c) c_{len−1}, the input of the next ContextBlock step
    size_t bytes;       // bytes of mem + ring + running
    float *scratch;     // GPU per head: scores + 2 latent vectors (MLA) / keys and values (ctxkv)
};

// decode scratch per (sequence, head): scores, MLA's two latent vectors, ctxkv's slot keys/values
static size_t kv_scratch_per_head(const Config *c, int capacity) {
    return (size_t)capacity + 2 * (size_t)c->kv_rank + 2 * (size_t)c->max_contexts * head_dim(c);
}

static KVCache kvcache_new(const Config *c, int B, int capacity) {
    if (capacity > c->max_seq_len) die("generation needs %d positions, past the model's max_seq_len %d", capacity, c->max_seq_len);
    KVCache kv = {};
    kv.batch = B;
    kv.capacity = capacity;
    kv.first_layer = c->layer0_type == LAYER0_CTXKV ? 1 : 0;
    kv.per_token = attn_kv_elements(c, c->attn_type);
    size_t n_mem = (size_t)(c->n_layer - kv.first_layer) * B * capacity * kv.per_token;
    kv.ring_len = c->layer0_type == LAYER0_CTXKV ? (capacity < ctx_ring_len(c) ? capacity : ctx_ring_len(c)) : 0;
    size_t n_ctx = has_context_block(c) ? (size_t)B * ((size_t)kv.ring_len + 1) * c->context_dim : 0;
    kv.mem = (float *)cuda_calloc_check((n_mem + n_ctx) * sizeof(float), "KV cache");
    kv.ring = kv.mem + n_mem;
    kv.running = kv.ring + (size_t)B * kv.ring_len * c->context_dim;
    kv.bytes = (n_mem + n_ctx) * sizeof(float);
    kv.scratch = (float *)cuda_malloc_check((size_t)B * c->n_head * kv_scratch_per_head(c, capacity) * sizeof(float), "decode scratch");
    return kv;
}

static void kvcache_free(KVCache *kv) { cuda_free(kv->mem); cuda_free(kv->scratch); memset(kv, 0, sizeof *kv); }

__host__ __device__ inline float *kv_slot(const KVCache *kv, int l, int b, int pos) {
    return kv->mem + (((size_t)(l - kv->first_layer) * kv->batch + b) * kv->capacity + pos) * kv->per_token;
}

// Copies token `row` of a layer's projected activations into a cache slot.
// mha/gqa/mqa slot: [K of G heads | V of G heads]; mla slot: [ĉ (kv_rank) | k_pe (dR)].
__global__ void attn_cache_write_kernel(int attn_type, AttnActs at, int row, float *dst, int H, int D, int G, int R, int dR) {
    switch (attn_type) {
    case ATTN_MHA: {
        const floatX *r = at.qkv + (size_t)row * 3 * H * D;
        for (int e = threadIdx.x; e < 2 * H * D; e += blockDim.x) { // e = which*H*D + g*D + j
            const int which = e / (H * D), g = (e % (H * D)) / D, j = e % D;
            dst[e] = tof(r[g * 3 * D + (1 + which) * D + j]);
        }
        break;
    }
    case ATTN_GQA:
    case ATTN_MQA:
        for (int e = threadIdx.x; e < 2 * G * D; e += blockDim.x) dst[e] = tof(at.kv[(size_t)row * 2 * G * D + e]);
        break;
    case ATTN_MLA:
        for (int e = threadIdx.x; e < R + dR; e += blockDim.x)
            dst[e] = e < R ? tof(at.c_norm[(size_t)row * R + e]) : tof(at.kv_a[(size_t)row * (R + dR) + e]);
        break;
    }
}
static void attn_cache_write(const Config *c, const AttnActs *at, int row, float *dst) {
    attn_cache_write_kernel<<<1, 128>>>(c->attn_type, *at, row, dst, c->n_head, head_dim(c), c->n_kv_head, c->kv_rank,
                                        c->mla_rope_dim);
    launchCheck();
}

// Attention of each sequence's new token (row b of at, projected at position n-1) over its n
// cached tokens; writes at->atty row b (H*D). MLA uses the absorbed form: W_UK is folded into the
// query and W_UV applied after attending, so only the latent ĉ and k_pe are ever read.
// ctxkv recomputes the slots' keys and values from the contexts in the ring.
// One block per (head, sequence); its scratch holds the scores in fp32.
__global__ void attn_decode_kernel(int kind, KVCache kv, LayerParams lp, HeadView q, floatX *atty, int l, int n, int H, int D,
                                   int G, int R, int dR, int I, int M, int dc, float scale, size_t per_head) {
    const int h = blockIdx.x, b = blockIdx.y;
    float *scores = kv.scratch + ((size_t)b * H + h) * per_head;
    floatX *o = atty + ((size_t)b * H + h) * D;
    const floatX *qh = head_at(q, 1, b, 0, h);
    if (kind == ATTN_CTX) { // slots k: the context of position n−1 − k·I, while it exists
        float *keys = scores + kv.capacity + 2 * R, *vals = keys + (size_t)M * D;
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
        mx = block_reduce_max(mx);
        float sum = 0.0f;
        for (int k = threadIdx.x; k < slots; k += blockDim.x) { scores[k] = expf(scores[k] - mx); sum += scores[k]; }
        const float inv = 1.0f / block_reduce_sum(sum);
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            float acc = 0.0f;
            for (int k = 0; k < slots; k++) acc += scores[k] * inv * vals[k * D + j];
            o[j] = fx(acc);
        }
    } else if (kind == ATTN_MLA) {
        float *q_abs = scores + kv.capacity, *o_lat = q_abs + R;
        for (int r = threadIdx.x; r < R; r += blockDim.x) { // q̃ = W_UK_hᵀ q_nope   (R)
            float s = 0.0f;
            for (int j = 0; j < D; j++) s += tof(qh[j]) * tof(lp.kv_b_w[((size_t)h * 2 * D + j) * R + r]);
            q_abs[r] = s;
        }
        __syncthreads();
        float mx = -INFINITY;
        for (int s = threadIdx.x; s < n; s += blockDim.x) {
            const float *slot = kv_slot(&kv, l, b, s);
            float d1 = 0.0f, d2 = 0.0f;
            for (int r = 0; r < R; r++) d1 += q_abs[r] * slot[r];
            for (int i = 0; i < dR; i++) d2 += tof(qh[D + i]) * slot[R + i];
            scores[s] = scale * (d1 + d2);
            mx = fmaxf(mx, scores[s]);
        }
        mx = block_reduce_max(mx);
        float sum = 0.0f;
        for (int s = threadIdx.x; s < n; s += blockDim.x) { scores[s] = expf(scores[s] - mx); sum += scores[s]; }
        const float inv = 1.0f / block_reduce_sum(sum);
        for (int r = threadIdx.x; r < R; r += blockDim.x) { // ō = Σ P ĉ   (R)
            float acc = 0.0f;
            for (int s = 0; s < n; s++) acc += scores[s] * inv * kv_slot(&kv, l, b, s)[r];
            o_lat[r] = acc;
        }
        __syncthreads();
        for (int j = threadIdx.x; j < D; j += blockDim.x) { // W_UV_h ō
            float acc = 0.0f;
            for (int r = 0; r < R; r++) acc += tof(lp.kv_b_w[((size_t)h * 2 * D + D + j) * R + r]) * o_lat[r];
            o[j] = fx(acc);
        }
    } else {
        const int g = h / (H / G);
        float mx = -INFINITY;
        for (int s = threadIdx.x; s < n; s += blockDim.x) {
            const float *kslot = kv_slot(&kv, l, b, s) + g * D;
            float d = 0.0f;
            for (int j = 0; j < D; j++) d += tof(qh[j]) * kslot[j];
            scores[s] = scale * d;
            mx = fmaxf(mx, scores[s]);
        }
        mx = block_reduce_max(mx);
        float sum = 0.0f;
        for (int s = threadIdx.x; s < n; s += blockDim.x) { scores[s] = expf(scores[s] - mx); sum += scores[s]; }
        const float inv = 1.0f / block_reduce_sum(sum);
        for (int j = threadIdx.x; j < D; j += blockDim.x) {
            float acc = 0.0f;
            for (int s = 0; s < n; s++) acc += scores[s] * inv * kv_slot(&kv, l, b, s)[(G + g) * D + j];
            o[j] = fx(acc);
        }
    }
}
static void attn_decode(const Model *m, int kind, const LayerParams *lp, AttnActs *at, const KVCache *kv, int l, int n) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), G = c->n_kv_head, Dq = qk_head_dim(c, kind);
    const float scale = 1.0f / sqrtf((float)Dq);
    const size_t per_head = kv_scratch_per_head(c, kv->capacity);
    HeadView q, k_unused, v_unused;
    attn_views(c, kind, at, &q, &k_unused, &v_unused);
    attn_decode_kernel<<<dim3(H, kv->batch), ATT_THREADS>>>(kind, *kv, *lp, q, at->atty, l, n, H, D, G, c->kv_rank,
                                                            c->mla_rope_dim, c->context_interval, c->max_contexts,
                                                            c->context_dim, scale, per_head);
    launchCheck();
}

static void attention_block_decode(const Model *m, const LayerParams *lp, AttnActs *at, floatX *out, const floatX *x,
                                   KVCache *kv, int l) {
    const Config *c = &m->cfg;
    const int pos = kv->len, kind = layer_kind(c, l);
    const int B = kv->batch;
    if (kind == ATTN_CTX) { // only the query is projected; the slots come from the ring
        matmul_forward(at->q, x, lp->q_w, lp->q_b, B, c->n_embd, c->n_embd);
    } else {
        attn_project_forward(m, kind, lp, at, x, B, 1, pos);
        for (int b = 0; b < B; b++) attn_cache_write(c, at, b, kv_slot(kv, l, b, pos));
    }
    attn_decode(m, kind, lp, at, kv, l, pos + 1);
    matmul_forward(out, at->atty, lp->dense_w, lp->dense_b, B, c->n_head * head_dim(c), c->n_embd);
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

// Prefill: the B prompts (B,n) in one forward pass, then their keys/values (or latents, or
// contexts) into the cache. Returns the logits of the last prompt tokens on the host: row b
// at b*Vp. (The CPU program returns a pointer into its logits, rows n*Vp apart; here only
// the B rows that sampling needs are copied back.)
static const float *model_prefill(Model *m, KVCache *kv, const int *prompts, int n) {
    const Config *c = &m->cfg;
    const int B = kv->batch;
    const size_t Vp = c->padded_vocab_size;
    if (n < 1 || n > kv->capacity) die("prompt of %d tokens does not fit a cache of %d", n, kv->capacity);
    model_forward(m, prompts, NULL, B, n);
    for (int l = kv->first_layer; l < c->n_layer; l++)
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) attn_cache_write(c, &m->a.layer[l].at, b * n + t, kv_slot(kv, l, b, t));
    if (has_context_block(c))
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) kvcache_push_context(c, kv, b, t, m->a.contexts + ((size_t)b * n + t) * c->context_dim);
    kv->len = n;
    if ((size_t)B * Vp > m->logits_host_cap) {
        free(m->logits_host);
        m->logits_host = (float *)malloc_check((size_t)B * Vp * sizeof(float), "logits");
        m->logits_host_cap = (size_t)B * Vp;
    }
    for (int b = 0; b < B; b++) download_floats(m->logits_host + b * Vp, m->a.logits + ((size_t)b * n + n - 1) * Vp, Vp);
    return m->logits_host;
}

// One token per sequence (tokens[B], host) at position kv->len through the model, reading the
// cache. Returns the logits (B,Vp) on the host.
static const float *model_decode_step(Model *m, KVCache *kv, const int *tokens) {
    const Config *c = &m->cfg;
    const int B = kv->batch, C = c->n_embd, dc = c->context_dim, Ed = c->embed_dim;
    if (kv->len >= kv->capacity) die("KV cache full (%d tokens)", kv->capacity);
    check_batch(c, tokens, NULL, B, 1);
    model_ensure_acts(m, B, 1);
    cudaCheck(cudaMemcpy(m->inputs_dev, tokens, B * sizeof(int), cudaMemcpyHostToDevice));
    if (has_context_block(c)) { // c_t = ContextBlock(c_{t−1}, e_t), c_{−1} = 0
        blockacts_ensure(&m->cb, B, Ed, dc);
        if (kv->len == 0) cudaCheck(cudaMemset(kv->running, 0, (size_t)B * dc * sizeof(float)));
        floatX *prev = (floatX *)dev_temp(TMP_EMB, (size_t)B * (dc + Ed) * sizeof(floatX)), *emb = prev + (size_t)B * dc;
        cast_to_floatX_kernel<<<ceil_div((size_t)B * dc, 256), 256>>>(prev, kv->running, (size_t)B * dc);
        launchCheck();
        embedding_forward(emb, m->inputs_dev, m->p.embed_in, B, Ed);
        contextblock_forward(&m->cb, &m->p, prev, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) kvcache_push_context(c, kv, b, kv->len, m->cb.out + (size_t)b * dc);
    }
    if (c->model_type == MODEL_CTXPYTHIA) {
        cudaCheck(cudaMemcpy(m->a.resid, m->cb.out, (size_t)B * C * sizeof(floatX), cudaMemcpyDeviceToDevice)); // = running
    } else {
        embedding_forward(m->a.resid, m->inputs_dev, m->p.embed_in, B, C);
    }
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, m->a.resid + (size_t)(l + 1) * B * C, m->a.resid + (size_t)l * B * C, B, 1, kv);
    head_forward(m, B);
    kv->len++;
    return model_logits_host(m, 0, B);
}

// Picks a token from logits (V): argmax when temperature is 0, else a sample at that temperature.
static int sample_token(const float *logits, int V, float temperature, uint64_t *rng) {
    int best = 0;
    for (int i = 1; i < V; i++) if (logits[i] > logits[best]) best = i;
    if (temperature <= 0.0f) return best;
    double sum = 0.0;
    for (int i = 0; i < V; i++) sum += exp((logits[i] - logits[best]) / temperature);
    double coin = random_f32(rng) * sum, cdf = 0.0;
    for (int i = 0; i < V; i++) {
        cdf += exp((logits[i] - logits[best]) / temperature);
        if (coin < cdf) return i;
    }
    return V - 1;
}

typedef struct { double seconds; int n_new; size_t cache_bytes; } GenStats;

// Generates n_new tokens after B prompts (B, n_prompt) with the KV cache; out (B, n_prompt
// + n_new) receives prompts and new ids. Prints sequence 0's new tokens as they come when tk
// is given. Returns the length of each sequence.
static int model_generate(Model *m, int B, const int *prompts, int n_prompt, int n_new, float temperature,
                          uint64_t *rng, int *out, const Tokenizer *tk, GenStats *st) {
    const int Vp = m->cfg.padded_vocab_size, len = n_prompt + n_new;
    KVCache kv = kvcache_new(&m->cfg, B, len);
    int *next = (int *)malloc_check(B * sizeof(int), "generate");
    double t0 = now_seconds();
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * len, prompts + (size_t)b * n_prompt, n_prompt * sizeof(int));
    const float *logits = model_prefill(m, &kv, prompts, n_prompt);
    const size_t row_stride = (size_t)Vp; // host logits: one row per sequence (prefill and decode)
    for (int i = 0; i < n_new; i++) {
        for (int b = 0; b < B; b++) {
            next[b] = sample_token(logits + b * row_stride, m->cfg.vocab_size, temperature, rng);
            out[(size_t)b * len + n_prompt + i] = next[b];
        }
        if (tk) { tokenizer_print(tk, next[0]); fflush(stdout); }
        if (i + 1 < n_new) logits = model_decode_step(m, &kv, next);
    }
    cudaCheck(cudaDeviceSynchronize());
    if (st) { st->seconds = now_seconds() - t0; st->n_new = n_new; st->cache_bytes = kv.bytes; }
    kvcache_free(&kv);
    free(next);
    return len;
}

// ----------------------------------------------------------------------------
// Command line

typedef struct {
    const char *model, *train, *val, *tokenizer, *out;
    const char *attn, *init_from, *prompt_ids;       // attention variant flags (NULL = not given)
    int n_kv_head, kv_rank, rope_dim, q_rank;        // 0 (q_rank -1) = not given
    int generate, kv_report;
    const char *resume;                        // DIR with a train_state.bin to continue from
    int checkpoint_every, stop_at;
    int shuffle;                               // --shuffle: random shard and block order (training data)
    const char *eval_heldout, *eval_lambada;   // evaluation (doc/formats.md "Evaluation files")
    int heldout_max_tokens, lambada_max, eval_gen, gen_prompt, gen_new;
    // Context-KV
    const char *layer0, *model_type, *context_block;
    int context_dim, context_interval, max_contexts, phase;
    int p1_iters, p1_rounds, oacd_slice;
    float p1_noise, p1_lr, p1_clip, p1_tol, p1_stop, oacd_lambda;
    int B, T, steps, warmup, val_every, val_batches, sample_every, sample_len, bench;
    float lr, min_lr_frac, weight_decay, beta1, beta2, eps, grad_clip, init_std, temperature;
    long long seed;
} Args;

static Args default_args(void) {
    Args a = {};
    a.model = NULL; // pythia-14m unless --model or --init-from says otherwise
    a.q_rank = -1;
    a.prompt_ids = "0";
    a.gen_prompt = 128; a.gen_new = 256;
    a.p1_iters = 60; a.p1_rounds = 4; a.oacd_slice = 5000;
    a.p1_noise = 0.1f; a.p1_lr = 2e-3f; a.p1_clip = 2.0f; a.p1_tol = 0.03f; a.p1_stop = 0.9f; a.oacd_lambda = 0.1f;
    a.train = "data/tinyshakespeare/tiny_shakespeare_train.bin";
    a.val = "data/tinyshakespeare/tiny_shakespeare_val.bin";
    a.tokenizer = "data/tokenizer.bin";
    a.out = NULL;
    a.B = 4; a.T = 256; a.steps = 200; a.warmup = 20;
    a.val_every = 50; a.val_batches = 20; a.sample_every = 100; a.sample_len = 64; a.bench = 0;
    a.lr = 1e-3f; a.min_lr_frac = 0.1f; a.weight_decay = 0.1f; a.beta1 = 0.9f; a.beta2 = 0.95f; a.eps = 1e-8f;
    a.grad_clip = 1.0f; a.init_std = 0.02f; a.temperature = 1.0f;
    a.seed = 1337;
    return a;
}

static void usage(FILE *f) {
    Args d = default_args();
    fprintf(f,
        "usage: ./train_ctxkv_cu [options]\n"
        "Trains a Pythia (GPT-NeoX) model on token shards on an NVIDIA GPU (this build: " PRECISION_NAME ").\n\n"
        "  -h, --help            this text\n"
        "  --model NAME|FILE     preset for random init (pythia-14m, pythia-70m, pythia-160m, tiny)\n"
        "                        or a checkpoint file                     [pythia-14m]\n"
        "attention variant (stored in the checkpoint; with a checkpoint they must match it):\n"
        "  --attn mha|gqa|mqa|mla                                         [mha]\n"
        "  --n-kv-head INT       gqa: KV heads G, must divide the heads   [H/4; H/2 if H = 4 or 4 does not divide H]\n"
        "  --kv-rank INT         mla: latent width d_c                    [4 * head dim]\n"
        "  --rope-dim INT        mla: decoupled RoPE dims d_R (even)      [head dim]\n"
        "  --q-rank INT          mla: query latent width, 0 = none        [0]\n"
        "  --init-from FILE      start from an mha checkpoint, converted to the --attn variant\n"
        "                        (gqa/mqa: K and V heads mean-pooled per group)\n"
        "Context-KV (doc/context_kv.md):\n"
        "  --layer0 ctxkv        layer 0 attends over ContextBlock contexts; others use --attn\n"
        "  --model-type ctxpythia  every layer at the context width, fed by the contexts\n"
        "  --context-dim INT     context width d_c                        [width / 2]\n"
        "  --context-interval INT  I: slot k holds the context at t - k*I [32]\n"
        "  --max-contexts INT    M: slots per query                       [32]\n"
        "  --phase 1|2           1: train only the ContextBlock (OACD, parallel Jacobi iteration),\n"
        "                        save DIR/context_block.bin; 2: block frozen, train the rest [2]\n"
        "  --context-block FILE  phase 2: load the block (and the embeddings it was trained on)\n"
        "  --p1-iters INT        phase 1: max Jacobi iterations per round [60]\n"
        "  --p1-rounds INT       phase 1: rounds, each on the next batch  [4]\n"
        "  --p1-noise FLOAT      phase 1: noise std on the shifted contexts [0.1]\n"
        "  --p1-lr FLOAT         phase 1: Adam lr                          [0.002]\n"
        "  --p1-clip FLOAT       phase 1: grad-norm clip                   [2]\n"
        "  --p1-tol FLOAT        phase 1: converged if mean sq. change < tol [0.03]\n"
        "  --p1-stop FLOAT       phase 1: stop a round at this converged fraction [0.9]\n"
        "  --oacd-lambda FLOAT   OACD centroid weight                      [0.1]\n"
        "  --oacd-slice INT      OACD slice of consecutive positions       [5000]\n"
        "evaluation (after training; with --steps 0 on a checkpoint, evaluation only):\n"
        "  --eval-heldout FILE   held-out loss, sliding window T, stride T/2 (data/eval/wikitext2_test.bin)\n"
        "  --heldout-max-tokens INT  score at most this many tokens, 0 = all [0]\n"
        "  --eval-lambada FILE   LAMBADA last-word accuracy and perplexity (data/eval/lambada_test.bin)\n"
        "  --lambada-max INT     examples to score, 0 = all            [0]\n"
        "  --eval-gen            generation tokens/s with the KV cache at batch 1 and 8\n"
        "  --gen-prompt INT      prompt tokens for --eval-gen            [128]\n"
        "  --gen-new INT         new tokens for --eval-gen               [256]\n"
        "data and training:\n"
        "  --train GLOB          training shards                          [%s]\n"
        "  --val GLOB            validation shards ('' for none)          [%s]\n"
        "  --tokenizer FILE      token table for printing samples         [%s]\n"
        "  -b INT                batch size B                             [%d]\n"
        "  -t INT                sequence length T                        [%d]\n"
        "  --steps INT           optimizer steps                          [%d]\n"
        "  --lr FLOAT            peak learning rate                       [%g]\n"
        "  --warmup INT          linear warmup steps                      [%d]\n"
        "  --min-lr-frac FLOAT   cosine decays to lr * this               [%g]\n"
        "  --wd FLOAT            AdamW weight decay (2-D tensors only)    [%g]\n"
        "  --beta1 FLOAT         AdamW beta1                              [%g]\n"
        "  --beta2 FLOAT         AdamW beta2                              [%g]\n"
        "  --eps FLOAT           AdamW epsilon                            [%g]\n"
        "  --clip FLOAT          global grad-norm clip, 0 = off           [%g]\n"
        "  --init-std FLOAT      std of the random init                   [%g]\n"
        "  --seed INT            seed for init, sampling and --shuffle    [%lld]\n"
        "  --shuffle             read the training shards, and the B*T blocks in each, in a random\n"
        "                        order each epoch (as llm.c); default: in file order\n"
        "  --val-every INT       val loss every N steps, 0 = only at end  [%d]\n"
        "  --val-batches INT     batches per val estimate                 [%d]\n"
        "  --sample-every INT    print a sample every N steps, 0 = never  [%d]\n"
        "  --sample-len INT      tokens per sample                        [%d]\n"
        "  --temperature FLOAT   sampling temperature                     [%g]\n"
        "  --out DIR             write DIR/log.jsonl, DIR/model.bin, DIR/metrics.json, DIR/train_state.bin\n"
        "  --checkpoint-every INT  save DIR/train_state.bin every N steps (atomic), 0 = only at the end [0]\n"
        "  --stop-at INT         save the training state after step N and exit (an interruption, for tests)\n"
        "  --resume DIR          continue exactly from DIR/train_state.bin (weights, AdamW state, step,\n"
        "                        data position, RNG); give the same flags as the original run\n"
        "  --bench INT           time N training steps on random tokens, print JSON, exit\n"
        "  --generate INT        generate N tokens with the KV cache, print them and tokens/s, exit\n"
        "  --prompt-ids LIST     comma-separated prompt token ids for --generate [0]\n"
        "  --kv-report           print the KV-cache accounting as JSON, exit\n\n"
        "GPU 0 (CUDA_VISIBLE_DEVICES picks it). Example: ./train_ctxkv_cu --model pythia-14m --steps 300 --out out/run1\n",
        d.train, d.val, d.tokenizer, d.B, d.T, d.steps, d.lr, d.warmup, d.min_lr_frac, d.weight_decay,
        d.beta1, d.beta2, d.eps, d.grad_clip, d.init_std, d.seed, d.val_every, d.val_batches, d.sample_every,
        d.sample_len, d.temperature);
}

static long long parse_int(const char *flag, const char *s, long long lo, long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || *end) die("%s expects an integer, got '%s'", flag, s);
    if (v < lo || v > hi) die("%s must be in %lld..%lld, got %lld", flag, lo, hi, v);
    return v;
}

static float parse_float(const char *flag, const char *s, float lo, float hi) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || !isfinite(v)) die("%s expects a number, got '%s'", flag, s);
    if (v < lo || v > hi) die("%s must be in [%g, %g], got %g", flag, lo, hi, v);
    return v;
}

static Args parse_args(int argc, char **argv) {
    Args a = default_args();
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) { usage(stdout); exit(0); }
        if (!strcmp(f, "--kv-report")) { a.kv_report = 1; continue; }
        if (!strcmp(f, "--eval-gen")) { a.eval_gen = 1; continue; }
        if (!strcmp(f, "--shuffle")) { a.shuffle = 1; continue; }
        if (i + 1 >= argc) die("flag %s needs a value (see -h)", f);
        const char *v = argv[++i];
        if (!strcmp(f, "--model")) a.model = v;
        else if (!strcmp(f, "--train")) a.train = v;
        else if (!strcmp(f, "--val")) a.val = v;
        else if (!strcmp(f, "--tokenizer")) a.tokenizer = v;
        else if (!strcmp(f, "--out")) a.out = v;
        else if (!strcmp(f, "--attn")) a.attn = v;
        else if (!strcmp(f, "--init-from")) a.init_from = v;
        else if (!strcmp(f, "--prompt-ids")) a.prompt_ids = v;
        else if (!strcmp(f, "--n-kv-head")) a.n_kv_head = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "--kv-rank")) a.kv_rank = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "--rope-dim")) a.rope_dim = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "--q-rank")) a.q_rank = (int)parse_int(f, v, 0, 1 << 16);
        else if (!strcmp(f, "--generate")) a.generate = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--layer0")) a.layer0 = v;
        else if (!strcmp(f, "--eval-heldout")) a.eval_heldout = v;
        else if (!strcmp(f, "--resume")) a.resume = v;
        else if (!strcmp(f, "--checkpoint-every")) a.checkpoint_every = (int)parse_int(f, v, 0, 1 << 30);
        else if (!strcmp(f, "--stop-at")) a.stop_at = (int)parse_int(f, v, 1, 1 << 30);
        else if (!strcmp(f, "--eval-lambada")) a.eval_lambada = v;
        else if (!strcmp(f, "--heldout-max-tokens")) a.heldout_max_tokens = (int)parse_int(f, v, 0, INT32_MAX);
        else if (!strcmp(f, "--lambada-max")) a.lambada_max = (int)parse_int(f, v, 0, INT32_MAX);
        else if (!strcmp(f, "--gen-prompt")) a.gen_prompt = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--gen-new")) a.gen_new = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--model-type")) a.model_type = v;
        else if (!strcmp(f, "--context-block")) a.context_block = v;
        else if (!strcmp(f, "--context-dim")) a.context_dim = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "--context-interval")) a.context_interval = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--max-contexts")) a.max_contexts = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--phase")) a.phase = (int)parse_int(f, v, 1, 2);
        else if (!strcmp(f, "--p1-iters")) a.p1_iters = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--p1-rounds")) a.p1_rounds = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--oacd-slice")) a.oacd_slice = (int)parse_int(f, v, 2, 1 << 30);
        else if (!strcmp(f, "--p1-noise")) a.p1_noise = parse_float(f, v, 0.0f, 10.0f);
        else if (!strcmp(f, "--p1-lr")) a.p1_lr = parse_float(f, v, 0.0f, 10.0f);
        else if (!strcmp(f, "--p1-clip")) a.p1_clip = parse_float(f, v, 0.0f, 1e9f);
        else if (!strcmp(f, "--p1-tol")) a.p1_tol = parse_float(f, v, 0.0f, 1e9f);
        else if (!strcmp(f, "--p1-stop")) a.p1_stop = parse_float(f, v, 0.0f, 1.0f);
        else if (!strcmp(f, "--oacd-lambda")) a.oacd_lambda = parse_float(f, v, 0.0f, 1e6f);
        else if (!strcmp(f, "-b")) a.B = (int)parse_int(f, v, 1, 1 << 16);
        else if (!strcmp(f, "-t")) a.T = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--steps")) a.steps = (int)parse_int(f, v, 0, 1 << 30);
        else if (!strcmp(f, "--warmup")) a.warmup = (int)parse_int(f, v, 0, 1 << 30);
        else if (!strcmp(f, "--val-every")) a.val_every = (int)parse_int(f, v, 0, 1 << 30);
        else if (!strcmp(f, "--val-batches")) a.val_batches = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--sample-every")) a.sample_every = (int)parse_int(f, v, 0, 1 << 30);
        else if (!strcmp(f, "--sample-len")) a.sample_len = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--bench")) a.bench = (int)parse_int(f, v, 1, 1 << 20);
        else if (!strcmp(f, "--seed")) a.seed = parse_int(f, v, 0, INT64_MAX);
        else if (!strcmp(f, "--lr")) a.lr = parse_float(f, v, 0.0f, 10.0f);
        else if (!strcmp(f, "--min-lr-frac")) a.min_lr_frac = parse_float(f, v, 0.0f, 1.0f);
        else if (!strcmp(f, "--wd")) a.weight_decay = parse_float(f, v, 0.0f, 10.0f);
        else if (!strcmp(f, "--beta1")) a.beta1 = parse_float(f, v, 0.0f, 0.999999f);
        else if (!strcmp(f, "--beta2")) a.beta2 = parse_float(f, v, 0.0f, 0.999999f);
        else if (!strcmp(f, "--eps")) a.eps = parse_float(f, v, 1e-30f, 1.0f);
        else if (!strcmp(f, "--clip")) a.grad_clip = parse_float(f, v, 0.0f, 1e9f);
        else if (!strcmp(f, "--init-std")) a.init_std = parse_float(f, v, 0.0f, 10.0f);
        else if (!strcmp(f, "--temperature")) a.temperature = parse_float(f, v, 1e-3f, 100.0f);
        else die("unknown flag %s (see -h)", f);
    }
    if (a.model && a.init_from) die("--model and --init-from conflict: --init-from FILE already names the starting checkpoint");
    if (a.resume && (a.model || a.init_from || a.context_block))
        die("--resume conflicts with --model / --init-from / --context-block: the run's state already holds the model");
    if (a.resume && a.phase == 1) die("--resume conflicts with --phase 1 (phase 1 is short and not resumable)");
    if ((a.checkpoint_every || a.stop_at) && !a.out) die("--checkpoint-every / --stop-at need --out DIR (where the checkpoint goes)");
    if (a.stop_at && a.stop_at >= a.steps) die("--stop-at %d must be before --steps %d", a.stop_at, a.steps);
    return a;
}

static int attn_type_from_name(const char *name) {
    for (int t = 0; t < (int)(sizeof ATTN_NAMES / sizeof ATTN_NAMES[0]); t++)
        if (!strcmp(name, ATTN_NAMES[t])) return t;
    die("--attn must be one of mha, gqa, mqa, mla; got '%s'", name);
}

// Sets the attention variant of c from --attn and its flags (a preset, or a checkpoint being
// converted by --init-from). Flags that belong to another variant are an error.
static void apply_variant_flags(Config *c, const Args *a) {
    if (!a->attn) {
        if (a->n_kv_head || a->kv_rank || a->rope_dim || a->q_rank >= 0)
            die("--n-kv-head / --kv-rank / --rope-dim / --q-rank need --attn (gqa for the first, mla for the others)");
        return;
    }
    const int H = c->n_head, D = head_dim(c), t = attn_type_from_name(a->attn);
    if (a->n_kv_head && t != ATTN_GQA && t != ATTN_MQA) die("--n-kv-head conflicts with --attn %s (it is a gqa flag)", a->attn);
    if ((a->kv_rank || a->rope_dim || a->q_rank >= 0) && t != ATTN_MLA)
        die("--kv-rank / --rope-dim / --q-rank conflict with --attn %s (they are mla flags)", a->attn);
    if (t == ATTN_MQA && a->n_kv_head && a->n_kv_head != 1) die("--attn mqa means one KV head; --n-kv-head %d conflicts", a->n_kv_head);
    c->attn_type = t;
    c->n_kv_head = H;
    c->kv_rank = c->q_rank = c->mla_rope_dim = 0;
    c->rms_eps = 0.0f;
    // default G: H/4 (H/2 when H = 4, as the published table scales it), else H/2, else 1
    if (t == ATTN_GQA) c->n_kv_head = a->n_kv_head ? a->n_kv_head : (H == 4 ? 2 : (H % 4 == 0 ? H / 4 : (H % 2 == 0 ? H / 2 : 1)));
    if (t == ATTN_MQA) c->n_kv_head = 1;
    if (t == ATTN_MLA) {
        c->kv_rank = a->kv_rank ? a->kv_rank : 4 * D;
        c->mla_rope_dim = a->rope_dim ? a->rope_dim : D;
        c->q_rank = a->q_rank > 0 ? a->q_rank : 0;
        c->rms_eps = 1e-6f; // DeepSeek's RMSNorm epsilon
    }
    const char *problem = config_problem(c);
    if (problem) {
        if (t == ATTN_GQA && c->n_head % c->n_kv_head) die("--n-kv-head %d does not divide the %d heads", c->n_kv_head, H);
        if (t == ATTN_MLA && (c->mla_rope_dim % 2 || c->mla_rope_dim > D))
            die("--rope-dim %d must be even and at most the head dim %d", c->mla_rope_dim, D);
        die("--attn %s: %s", a->attn, problem);
    }
}

// Sets the Context-KV options of c from --layer0 / --model-type and their flags. Flags given
// without either are an error.
static void apply_context_flags(Config *c, const Args *a) {
    int ctxkv = 0, ctxpythia = 0;
    if (a->layer0) {
        if (!strcmp(a->layer0, "ctxkv")) ctxkv = 1;
        else if (strcmp(a->layer0, "same")) die("--layer0 must be ctxkv or same; got '%s'", a->layer0);
    }
    if (a->model_type) {
        if (!strcmp(a->model_type, "ctxpythia")) ctxpythia = 1;
        else if (strcmp(a->model_type, "pythia")) die("--model-type must be pythia or ctxpythia; got '%s'", a->model_type);
    }
    if (ctxkv && ctxpythia) die("--layer0 ctxkv and --model-type ctxpythia conflict: ctxpythia feeds every layer from the contexts");
    if (!ctxkv && !ctxpythia) {
        if (a->context_dim || a->context_interval || a->max_contexts)
            die("--context-dim / --context-interval / --max-contexts need --layer0 ctxkv or --model-type ctxpythia");
        return;
    }
    if (ctxpythia && (a->context_interval || a->max_contexts))
        die("--context-interval / --max-contexts belong to --layer0 ctxkv, not --model-type ctxpythia");
    const int dc = a->context_dim ? a->context_dim : c->n_embd / 2;
    c->context_dim = dc;
    if (ctxkv) {
        c->layer0_type = LAYER0_CTXKV;
        c->context_interval = a->context_interval ? a->context_interval : 32;
        c->max_contexts = a->max_contexts ? a->max_contexts : 32;
    } else { // the layers move to the context width, keeping the heads and the rotary fraction
        const int old_D = head_dim(c);
        c->model_type = MODEL_CTXPYTHIA;
        c->embed_dim = c->n_embd;
        if (dc % c->n_head) die("--context-dim %d is not divisible by the %d heads", dc, c->n_head);
        c->n_inner = c->n_inner / c->n_embd * dc;
        c->n_embd = dc;
        c->rotary_dims = (c->rotary_dims * (dc / c->n_head) / old_D) & ~1;
        if (c->attn_type == ATTN_MLA) {
            c->kv_rank = a->kv_rank ? a->kv_rank : 4 * head_dim(c);
            c->mla_rope_dim = a->rope_dim ? a->rope_dim : head_dim(c);
        }
    }
    const char *problem = config_problem(c);
    if (problem) die("context flags: %s", problem);
}

// A checkpoint's variant is fixed: flags that say otherwise are an error, not a silent override.
static void check_variant_flags_match(const Config *c, const Args *a, const char *path) {
    if (a->attn && attn_type_from_name(a->attn) != c->attn_type)
        die("'%s' is a %s checkpoint, but --attn %s was given (to convert an mha checkpoint use --init-from)", path,
            ATTN_NAMES[c->attn_type], a->attn);
#define SAME(flag, given, field, label) \
    if (given && (given) != (field)) die("'%s' has %s %d, but %s %d was given", path, label, field, flag, given)
    SAME("--n-kv-head", a->n_kv_head, c->n_kv_head, "n_kv_head");
    SAME("--kv-rank", a->kv_rank, c->kv_rank, "kv_rank");
    SAME("--rope-dim", a->rope_dim, c->mla_rope_dim, "mla_rope_dim");
    if (a->q_rank >= 0 && a->q_rank != c->q_rank) die("'%s' has q_rank %d, but --q-rank %d was given", path, c->q_rank, a->q_rank);
    if (a->layer0 && (!strcmp(a->layer0, "ctxkv")) != (c->layer0_type == LAYER0_CTXKV))
        die("'%s' has layer 0 %s, but --layer0 %s was given", path, c->layer0_type ? "ctxkv" : "same", a->layer0);
    if (a->model_type && (!strcmp(a->model_type, "ctxpythia")) != (c->model_type == MODEL_CTXPYTHIA))
        die("'%s' is a %s model, but --model-type %s was given", path, c->model_type ? "ctxpythia" : "pythia", a->model_type);
    SAME("--context-dim", a->context_dim, c->context_dim, "context_dim");
    SAME("--context-interval", a->context_interval, c->context_interval, "context_interval");
    SAME("--max-contexts", a->max_contexts, c->max_contexts, "max_contexts");
#undef SAME
}

// The model config the flags ask for, without building the model (--kv-report needs no weights).
static Config config_from_args(const Args *a) {
    if (a->resume) {
        char path[4200];
        TrainState st;
        resume_path(path, sizeof path, a->resume);
        Config c = train_state_load(path, NULL, &st);
        check_variant_flags_match(&c, a, path);
        return c;
    }
    const char *name = a->init_from ? a->init_from : (a->model ? a->model : "pythia-14m");
    const Preset *p = a->init_from ? NULL : find_preset(name);
    Config c;
    if (p) {
        c = config_from_preset(p);
        apply_variant_flags(&c, a);
        apply_context_flags(&c, a);
    } else {
        if (access(name, F_OK) != 0)
            die("%s '%s' is neither a preset (pythia-14m, pythia-70m, pythia-160m, tiny) nor an existing checkpoint file",
                a->init_from ? "--init-from" : "--model", name);
        c = checkpoint_open(name, NULL);
        if (a->init_from) {
            if (has_context_block(&c)) die("--init-from starts from a plain Pythia checkpoint; '%s' already has a context block", name);
            apply_variant_flags(&c, a);
            apply_context_flags(&c, a);
        } else {
            check_variant_flags_match(&c, a, name);
        }
    }
    return c;
}

// Host views of one layer's tensors inside params_memory (the CPU program's m->p.layer[l]
// pointers are host pointers; here m->p points into the GPU block).
static float *host_tensor(const Model *m, int l, const char *leaf) {
    char name[48];
    snprintf(name, sizeof name, "layer%d.%s", l, leaf);
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++)
        if (!strcmp(m->tensors[i].name, name)) return m->params_memory + m->tensors[i].offset;
    die("internal: no tensor %s", name);
}
typedef struct { float *q_w, *q_b, *kv_w, *kv_b, *qkv_w, *qkv_b; } HostLayer;
static HostLayer host_layer(const Model *m, int l) {
    HostLayer h = {};
    if (m->p.layer[l].q_w) { h.q_w = host_tensor(m, l, "q_w"); h.q_b = host_tensor(m, l, "q_b"); }
    if (m->p.layer[l].kv_w) { h.kv_w = host_tensor(m, l, "kv_w"); h.kv_b = host_tensor(m, l, "kv_b"); }
    if (m->p.layer[l].qkv_w) { h.qkv_w = host_tensor(m, l, "qkv_w"); h.qkv_b = host_tensor(m, l, "qkv_b"); }
    return h;
}

// --init-from: every tensor the two models share (same name and shape) is copied; an mha
// checkpoint becomes gqa/mqa by mean-pooling the K and V heads of each group (Ainslie et al.).
static void model_init_from(Model *m, const Config *c, const char *path, float init_std, uint64_t seed) {
    Model src;
    model_load(&src, path);
    model_init_random(m, c, init_std, seed);
    int *copied = (int *)calloc_check(arrlen(m->tensors) * sizeof(int), "init-from");
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++)
        for (ptrdiff_t j = 0; j < arrlen(src.tensors); j++) {
            const ParamTensor *t = &m->tensors[i], *u = &src.tensors[j];
            if (!strcmp(t->name, u->name) && t->rows == u->rows && t->cols == u->cols) {
                memcpy(m->params_memory + t->offset, src.params_memory + u->offset, t->rows * t->cols * sizeof(float));
                copied[i] = 1;
            }
        }
    // Every tensor must come from the checkpoint, except those the conversion makes below
    // (gqa/mqa q and kv from an mha qkv) and those that start fresh by design (the context
    // block, ctxkv's k and v). Anything else would silently stay random.
    int converting_heads = src.cfg.attn_type == ATTN_MHA && (c->attn_type == ATTN_GQA || c->attn_type == ATTN_MQA);
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++) {
        const char *name = m->tensors[i].name, *leaf = strrchr(name, '.') ? strrchr(name, '.') + 1 : name;
        int fresh_by_design = !strncmp(name, "ctx_", 4) ||
                              (c->layer0_type == LAYER0_CTXKV && !strncmp(name, "layer0.", 7) &&
                               (!strcmp(leaf, "k_w") || !strcmp(leaf, "k_b") || !strcmp(leaf, "v_w") || !strcmp(leaf, "v_b") ||
                                (src.cfg.attn_type == ATTN_MHA && (!strcmp(leaf, "q_w") || !strcmp(leaf, "q_b")))));
        int made_by_conversion = converting_heads && (!strcmp(leaf, "q_w") || !strcmp(leaf, "q_b") ||
                                                      !strcmp(leaf, "kv_w") || !strcmp(leaf, "kv_b"));
        if (!copied[i] && !fresh_by_design && !made_by_conversion)
            die("--init-from: '%s' has no tensor %s of shape [%zu, %zu]; the only conversions are mha -> gqa/mqa and "
                "adding a ctxkv layer 0", path, name, m->tensors[i].rows, m->tensors[i].cols);
    }
    free(copied);
    const int C = c->n_embd, H = c->n_head, D = head_dim(c);
    if (c->model_type == MODEL_CTXPYTHIA) die("--init-from cannot start a ctxpythia model: its layers have another width");
    if (c->layer0_type == LAYER0_CTXKV && src.cfg.attn_type == ATTN_MHA) {
        // W_q and its bias start from layer 0's query rows (dense is copied by name); W_k, W_v fresh
        for (int h = 0; h < H; h++) {
            memcpy(host_tensor(m, 0, "q_w") + (size_t)h * D * C, host_tensor(&src, 0, "qkv_w") + (size_t)h * 3 * D * C, (size_t)D * C * sizeof(float));
            memcpy(host_tensor(m, 0, "q_b") + h * D, host_tensor(&src, 0, "qkv_b") + h * 3 * D, D * sizeof(float));
        }
    }
    int target = c->attn_type, source = src.cfg.attn_type;
    if (source != target) {
        if (source != ATTN_MHA || (target != ATTN_GQA && target != ATTN_MQA))
            die("--init-from converts mha checkpoints to gqa or mqa; '%s' is %s and --attn is %s", path,
                ATTN_NAMES[source], ATTN_NAMES[target]);
        const int G = c->n_kv_head, group = H / G;
        for (int l = c->layer0_type == LAYER0_CTXKV ? 1 : 0; l < c->n_layer; l++) {
            HostLayer sp_ = host_layer(&src, l), tp_ = host_layer(m, l); // host views into params_memory
            const HostLayer *sp = &sp_, *tp = &tp_;
            for (int h = 0; h < H; h++) { // q rows: s = 0 of each head's [q | k | v]
                memcpy(tp->q_w + (size_t)h * D * C, sp->qkv_w + (size_t)h * 3 * D * C, (size_t)D * C * sizeof(float));
                memcpy(tp->q_b + h * D, sp->qkv_b + h * 3 * D, D * sizeof(float));
            }
            memset(tp->kv_w, 0, (size_t)2 * G * D * C * sizeof(float));
            memset(tp->kv_b, 0, (size_t)2 * G * D * sizeof(float));
            for (int h = 0; h < H; h++) {
                const int g = h / group;
                for (int s = 1; s <= 2; s++) { // 1 = k -> rows g*D, 2 = v -> rows (G+g)*D
                    const int dst = (s == 1 ? g : G + g) * D;
                    for (int j = 0; j < D; j++) {
                        for (int i = 0; i < C; i++) tp->kv_w[(size_t)(dst + j) * C + i] += 1.0f / group * sp->qkv_w[(size_t)(h * 3 * D + s * D + j) * C + i];
                        tp->kv_b[dst + j] += sp->qkv_b[h * 3 * D + s * D + j] / group;
                    }
                }
            }
        }
    }
    model_free(&src);
    model_to_device(m); // the host copy was edited after model_init_random uploaded it
}

static Model model_from_args(const Args *a, const Config *c) {
    Model m;
    if (a->resume) {
        char path[4200];
        TrainState st;
        resume_path(path, sizeof path, a->resume);
        train_state_load(path, &m, &st);
    } else if (a->init_from) model_init_from(&m, c, a->init_from, a->init_std, (uint64_t)a->seed);
    else if (find_preset(a->model ? a->model : "pythia-14m")) model_init_random(&m, c, a->init_std, (uint64_t)a->seed);
    else model_load(&m, a->model);
    return m;
}

static void print_kv_report(const Config *c, const char *name) {
    const size_t L = c->n_layer, per_token = kv_elements_per_token(c);
    const size_t std_layer = attn_kv_elements(c, c->attn_type); // a layer that is not ctxkv
    printf("{\"model\": \"%s\", \"attn\": \"%s\", \"layer0\": \"%s\", \"model_type\": \"%s\", \"n_layer\": %zu, "
           "\"n_kv_head\": %d, \"kv_rank\": %d, \"rope_dim\": %d, \"context_dim\": %d, \"context_interval\": %d, "
           "\"max_contexts\": %d, \"params\": %zu, \"kv_elements_per_token\": %zu, "
           "\"kv_bytes_per_token_per_layer_bf16\": %zu, \"kv_bytes_per_token_bf16\": %zu, \"kv_bytes_per_token_fp32\": %zu, "
           "\"kv_cache_bytes_at\": {\"1024\": %zu, \"4096\": %zu, \"16384\": %zu}}\n",
           name, ATTN_NAMES[c->attn_type], c->layer0_type ? "ctxkv" : "same", c->model_type ? "ctxpythia" : "pythia", L,
           c->n_kv_head, c->kv_rank, c->mla_rope_dim, c->context_dim, c->context_interval, c->max_contexts,
           layout_params(c, NULL, NULL, NULL), per_token, 2 * std_layer, 2 * per_token, 4 * per_token,
           2 * kv_elements_at(c, 1024), 2 * kv_elements_at(c, 4096), 2 * kv_elements_at(c, 16384));
}

// parses "1,2,3" into an stb_ds array of ids
static int *parse_ids(const char *flag, const char *list) {
    int *ids = NULL;
    const char *p = list;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > 65535) die("%s expects comma-separated token ids, got '%s'", flag, list);
        arrput(ids, (int)v);
        p = end;
        if (*p == ',') p++;
        else if (*p) die("%s expects comma-separated token ids, got '%s'", flag, list);
    }
    if (arrlen(ids) == 0) die("%s is empty", flag);
    return ids;
}

static int run_generate(Model *m, const Args *a, const Tokenizer *tk) {
    int *prompt = parse_ids("--prompt-ids", a->prompt_ids);
    int n_prompt = (int)arrlen(prompt);
    check_batch(&m->cfg, prompt, NULL, 1, n_prompt);
    int *out = (int *)malloc_check((size_t)(n_prompt + a->generate) * sizeof(int), "generate");
    uint64_t rng = (uint64_t)a->seed ^ 0x9E3779B97F4A7C15ull;
    GenStats st;
    printf("--- %d tokens after a %d-token prompt ---\n", a->generate, n_prompt);
    model_generate(m, 1, prompt, n_prompt, a->generate, a->temperature, &rng, out, tk->tokens ? tk : NULL, &st);
    if (!tk->tokens) for (int i = n_prompt; i < n_prompt + a->generate; i++) printf("%d ", out[i]);
    printf("\n---\n");
    const int T = n_prompt + a->generate;
    printf("{\"generated_tokens\": %d, \"seconds\": %.4f, \"tokens_per_s\": %.1f, \"kv_cache_capacity_tokens\": %d, "
           "\"kv_cache_bytes\": %zu, \"kv_bytes_per_token_fp32\": %zu}\n",
           a->generate, st.seconds, a->generate / st.seconds, T, st.cache_bytes, kv_elements_per_token(&m->cfg) * sizeof(float));
    free(out);
    arrfree(prompt);
    return 0;
}
// ----------------------------------------------------------------------------
// Context-KV: the context-block file (doc/formats.md) and phase 1

#define CTXBLOCK_MAGIC 20261126
#define CTXBLOCK_VERSION 1
static const char *BLOCK_TENSORS[] = {"ctx_ln_e_w", "ctx_ln_e_b", "ctx_w", "ctx_b", "ctx_ln_c_w", "ctx_ln_c_b", "embed_in"};
#define N_BLOCK_TENSORS 7

static const ParamTensor *find_tensor(const Model *m, const char *name) {
    for (ptrdiff_t i = 0; i < arrlen(m->tensors); i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}

static void context_block_save(const Model *m, const char *path) {
    const Config *c = &m->cfg;
    int h[HEADER_INTS] = {0};
    h[0] = CTXBLOCK_MAGIC; h[1] = CTXBLOCK_VERSION; h[2] = c->embed_dim; h[3] = c->context_dim;
    h[4] = c->padded_vocab_size; h[5] = c->vocab_size;
    model_to_host(m);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        fwrite_check(m->params_memory + t->offset, sizeof(float), t->rows * t->cols, af.f, af.tmp);
    }
    atomic_commit(&af);
}

// Loads a phase-1 block (and the embeddings it was trained on) into a model whose widths match.
static void context_block_load(Model *m, const char *path) {
    const Config *c = &m->cfg;
    if (!has_context_block(c)) die("--context-block needs a model with a context block (--layer0 ctxkv or --model-type ctxpythia)");
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a context block", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != CTXBLOCK_MAGIC || h[1] != CTXBLOCK_VERSION) die("'%s' is not a context block file (magic %d, version %d)", path, h[0], h[1]);
    if (h[2] != c->embed_dim || h[3] != c->context_dim || h[4] != c->padded_vocab_size || h[5] != c->vocab_size)
        die("'%s' is a context block for embed width %d, context width %d, vocab %d, but the model has embed width %d, "
            "context width %d, vocab %d", path, h[2], h[3], h[5], c->embed_dim, c->context_dim, c->vocab_size);
    long long expect = sizeof h;
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        expect += 4LL * t->rows * t->cols;
    }
    if (size != expect) die("'%s' has %lld bytes, its header implies %lld: truncated or corrupt", path, size, expect);
    for (int i = 0; i < N_BLOCK_TENSORS; i++) {
        const ParamTensor *t = find_tensor(m, BLOCK_TENSORS[i]);
        fread_check(m->params_memory + t->offset, sizeof(float), t->rows * t->cols, f, path);
    }
    fclose(f);
    model_to_device(m);
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
    if (!m->grads_memory) {
        m->grads_memory = (floatX *)cuda_calloc_check(m->num_params_dev * sizeof(floatX), "gradients");
        layout_params(c, m->grads_memory, &m->g, NULL);
    }
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

// lr at step (0-based): linear warmup to lr, then cosine down to lr*min_lr_frac at the last step
static float lr_at(const Args *a, int step) {
    if (step < a->warmup) return a->lr * (float)(step + 1) / (float)a->warmup;
    if (a->steps <= a->warmup + 1) return a->lr;
    float progress = (float)(step - a->warmup) / (float)(a->steps - a->warmup - 1);
    float min_lr = a->lr * a->min_lr_frac;
    return min_lr + 0.5f * (a->lr - min_lr) * (1.0f + cosf(3.14159265f * progress));
}

static float evaluate(Model *m, DataLoader *val, int max_batches) {
    dataloader_reset(val);
    int n = dataloader_batches_in_shard(val);
    if (n > max_batches) n = max_batches;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        dataloader_next(val);
        sum += model_forward(m, val->inputs, val->targets, val->B, val->T);
    }
    return (float)(sum / n);
}

// ----------------------------------------------------------------------------
// Evaluation suite (doc/evaluation.md)

// Held-out loss by a sliding window of T tokens with stride T/2: each window scores only the
// targets no earlier window scored, so every token is predicted once, with at least T/2
// tokens of context after the first window. Returns the mean loss; *scored = tokens counted.
static float eval_heldout(Model *m, const char *path, int T, int max_tokens, long long *scored) {
    size_t ntok;
    uint16_t *tok = shard_load(path, &ntok, m->cfg.vocab_size);
    if (ntok < 2) die("'%s' has fewer than 2 tokens", path);
    int *x = (int *)malloc_check(T * sizeof(int), "heldout"), *y = (int *)malloc_check(T * sizeof(int), "heldout");
    double total = 0.0;
    long long count = 0;
    size_t done = 0; // targets tok[1..done] are scored
    const int stride = T / 2 > 0 ? T / 2 : 1;
    for (size_t s = 0; done < ntok - 1; s += stride) {
        int len = (int)(ntok - 1 - s < (size_t)T ? ntok - 1 - s : (size_t)T);
        for (int i = 0; i < len; i++) {
            x[i] = tok[s + i];
            y[i] = s + i + 1 > done ? tok[s + i + 1] : IGNORE_INDEX; // target index s+i+1
        }
        model_forward(m, x, y, 1, len);
        for (int i = 0; i < len; i++)
            if (y[i] != IGNORE_INDEX) { total += m->losses_host[i]; count++; }
        done = s + len;
        if (max_tokens > 0 && count >= max_tokens) break;
    }
    free(x); free(y); free(tok);
    *scored = count;
    return (float)(total / count);
}

typedef struct { int n_ctx, n_tgt; size_t offset; } LambadaExample;

// LAMBADA: an example is correct when every token of the final word is the argmax given all
// preceding text; perplexity = exp(−mean over examples of Σ log p(final-word tokens)).
static void eval_lambada(Model *m, const char *path, int max_examples, float *acc, float *ppl, int *n_scored) {
    FILE *f = fopen_check(path, "rb");
    long long size = file_size(f);
    int h[HEADER_INTS];
    if (size < (long long)sizeof h) die("'%s' is too small to be a LAMBADA file", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != 20261128 || h[1] != 1) die("'%s' is not a LAMBADA eval file (magic %d, version %d)", path, h[0], h[1]);
    if (h[2] < 1 || h[3] < 0) die("'%s': bad example/token counts", path);
    if (size != (long long)sizeof h + 8LL * h[2] + 2LL * h[3]) die("'%s' is truncated or corrupt (size %lld)", path, size);
    LambadaExample *ex = NULL; // stb_ds array
    size_t off = 0;
    for (int i = 0; i < h[2]; i++) {
        int pair[2];
        fread_check(pair, sizeof(int), 2, f, path);
        if (pair[0] < 1 || pair[1] < 1 || off + pair[0] + pair[1] > (size_t)h[3]) die("'%s': example %d has bad lengths", path, i);
        LambadaExample e = {pair[0], pair[1], off};
        arrput(ex, e);
        off += pair[0] + pair[1];
    }
    if (off != (size_t)h[3]) die("'%s': example lengths do not add up to the token count", path);
    uint16_t *tok = (uint16_t *)malloc_check(off * sizeof(uint16_t), "lambada");
    fread_check(tok, sizeof(uint16_t), off, f, path);
    fclose(f);
    const int V = m->cfg.vocab_size; // (the CPU program also reads Vp: its logits rows are Vp apart)
    int n = (int)arrlen(ex), correct = 0, used = 0;
    if (max_examples > 0 && max_examples < n) n = max_examples;
    double sum_logp = 0.0;
    int *x = NULL;
    for (int i = 0; i < n; i++) {
        int L = ex[i].n_ctx + ex[i].n_tgt - 1; // the input is everything but the last target token
        if (L > m->cfg.max_seq_len) continue;  // longer than the model sees: not scored
        arrsetlen(x, L);
        for (int j = 0; j < L; j++) x[j] = tok[ex[i].offset + j];
        m->head_from = ex[i].n_ctx - 1;
        model_forward(m, x, NULL, 1, L);
        int all_argmax = 1;
        for (int j = 0; j < ex[i].n_tgt; j++) {
            const float *z = model_logits_host(m, ex[i].n_ctx - 1 + j, 1);
            int target = tok[ex[i].offset + ex[i].n_ctx + j], best = 0;
            for (int v = 1; v < V; v++) if (z[v] > z[best]) best = v;
            all_argmax &= best == target;
            double mx = z[best], se = 0.0;
            for (int v = 0; v < V; v++) se += exp((double)z[v] - mx);
            sum_logp += z[target] - mx - log(se);
        }
        correct += all_argmax;
        used++;
    }
    m->head_from = 0;
    arrfree(x); arrfree(ex); free(tok);
    *acc = used ? (float)correct / used : 0.0f;
    *ppl = used ? (float)exp(-sum_logp / used) : 0.0f;
    *n_scored = used;
}

// Generation throughput with the KV cache: B prompts of n_prompt tokens (from `tokens`),
// n_new new tokens each; tokens/s counts new tokens over the whole call (prefill included).
static float eval_generation(Model *m, int B, const uint16_t *tokens, size_t ntok, int n_prompt, int n_new, size_t *cache_bytes) {
    int *prompts = (int *)malloc_check((size_t)B * n_prompt * sizeof(int), "eval gen");
    for (size_t i = 0; i < (size_t)B * n_prompt; i++) prompts[i] = tokens[i % ntok];
    int *out = (int *)malloc_check((size_t)B * (n_prompt + n_new) * sizeof(int), "eval gen");
    uint64_t rng = 42;
    GenStats st;
    model_generate(m, B, prompts, n_prompt, n_new, 1.0f, &rng, out, NULL, &st);
    free(prompts); free(out);
    *cache_bytes = st.cache_bytes;
    return (float)((double)B * n_new / st.seconds);
}

static void mkdir_p(const char *dir) {
    char buf[4096];
    if ((size_t)snprintf(buf, sizeof buf, "%s", dir) >= sizeof buf) die("--out path too long");
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(buf, 0755); *p = '/'; }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("--out: cannot create directory '%s' (%s)", dir, strerror(errno));
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/.write_test", dir);
    FILE *f = fopen(probe, "wb");
    if (!f) die("--out: directory '%s' is not writable (%s)", dir, strerror(errno));
    fclose(f);
    remove(probe);
}

static void format_eta(char *buf, size_t n, double seconds) {
    int s = (int)(seconds + 0.5);
    if (s >= 3600) snprintf(buf, n, "%dh%02dm", s / 3600, (s / 60) % 60);
    else snprintf(buf, n, "%dm%02ds", s / 60, s % 60);
}

static int run_bench(Model *m, const Args *a) {
    uint64_t rng = (uint64_t)a->seed + 1;
    int BT = a->B * a->T;
    int *x = (int *)malloc_check(BT * sizeof(int), "bench"), *y = (int *)malloc_check(BT * sizeof(int), "bench");
    for (int i = 0; i < BT; i++) { x[i] = random_u32(&rng) % m->cfg.vocab_size; y[i] = random_u32(&rng) % m->cfg.vocab_size; }
    AdamW opt = {a->lr, a->beta1, a->beta2, a->eps, a->weight_decay};
    double t_total = 0.0;
    for (int s = 0; s <= a->bench; s++) { // step 0 is warmup (first-touch allocation)
        double t0 = now_seconds();
        model_forward(m, x, y, a->B, a->T);
        model_zero_grad(m);
        model_backward(m);
        model_clip_grad_norm(m, a->grad_clip);
        model_update(m, &opt);
        cudaCheck(cudaDeviceSynchronize());
        double dt = now_seconds() - t0;
        if (s > 0) t_total += dt;
        fprintf(stderr, "bench step %d: %.1f ms\n", s, dt * 1e3);
    }
    double ms = t_total / a->bench * 1e3;
    printf("{\"bench_steps\": %d, \"ms_per_step\": %.3f, \"tokens_per_s\": %.1f}\n", a->bench, ms, BT / (ms / 1e3));
    free(x); free(y);
    return 0;
}

#ifndef TESTING
int main(int argc, char **argv) {
    Args a = parse_args(argc, argv);
    Config cfg = config_from_args(&a);
    if (a.kv_report) {
        print_kv_report(&cfg, a.init_from ? a.init_from : (a.model ? a.model : "pythia-14m"));
        return 0;
    }
    Model model = model_from_args(&a, &cfg);
    if (!a.generate && a.T > model.cfg.max_seq_len) die("-t %d exceeds the model's max_seq_len %d", a.T, model.cfg.max_seq_len);
    config_print(&model.cfg);
    printf("parameters: %zu | B %d | T %d | %s | %s\n", model.num_params, a.B, a.T, device_prop.name, PRECISION_NAME);
    if (a.context_block) context_block_load(&model, a.context_block);
    if (a.phase && !has_context_block(&model.cfg)) die("--phase needs a model with a context block (--layer0 ctxkv or --model-type ctxpythia)");
    if (a.bench) return run_bench(&model, &a);
    // the memory a training step needs, before any of it is touched
    if (a.steps > 0) {
        // (layout_acts counts bytes here; parameters: floatX copy and gradients, fp32 master, m and v)
        double need = (double)layout_acts(&model.cfg, a.B, a.T, NULL, &model.a, NULL) +
                      (double)layout_acts(&model.cfg, a.B, a.T, NULL, NULL, &model.ga) +
                      (2.0 * sizeof(floatX) + 12.0) * model.num_params_dev;
        size_t free_b = 0, total_b = 0;
        cudaCheck(cudaMemGetInfo(&free_b, &total_b));
        double have = (double)total_b;
        if (have > 0 && need > 0.9 * have)
            die("-b %d -t %d need about %.1f GiB (activations, gradients, AdamW state), more than this machine's %.1f GiB of GPU memory; lower -b or -t",
                a.B, a.T, need / (1 << 30), have / (1 << 30));
    }
    Tokenizer tk;
    if (!tokenizer_load(&tk, a.tokenizer)) printf("(no token table at '%s': samples print token ids)\n", a.tokenizer);
    if (a.generate) return run_generate(&model, &a, &tk);

    DataLoader train, val;
    int have_train = a.steps > 0 || a.phase == 1; // --steps 0: evaluation only
    if (have_train) dataloader_init(&train, a.train, a.B, a.T, model.cfg.vocab_size);
    if (have_train && a.shuffle) dataloader_shuffle(&train, (uint64_t)a.seed);
    int have_val = a.val && a.val[0];
    if (have_val) dataloader_init(&val, a.val, a.B, a.T, model.cfg.vocab_size);
    if (have_train) printf("train: %d shard(s) matching '%s' | val: %s\n", (int)arrlen(train.files), a.train, have_val ? a.val : "none");

    FILE *log = NULL;
    char path[4200];
    if (a.out) {
        mkdir_p(a.out);
        snprintf(path, sizeof path, "%s/log.jsonl", a.out);
        log = fopen_check(path, a.resume ? "a" : "w"); // a resumed run continues its log
    }
    TrainState rs = {};
    if (a.resume) {
        char sp[4200];
        resume_path(sp, sizeof sp, a.resume);
        train_state_load(sp, NULL, &rs);
        if (rs.B != a.B || rs.T != a.T) die("--resume: the run used -b %d -t %d, but -b %d -t %d were given", rs.B, rs.T, a.B, a.T);
        if (rs.step > a.steps) die("--resume: the run already did %d steps, more than --steps %d", rs.step, a.steps);
        if (rs.shuffle != a.shuffle) die("--resume: the run was %s --shuffle; give the same flags as the original run", rs.shuffle ? "made with" : "made without");
        if (have_train) dataloader_seek(&train, rs.epoch, rs.shard_index, rs.pos);
        printf("resuming %s at step %d\n", sp, rs.step);
    }
    if (a.phase == 1) { // train the ContextBlock alone, save it, stop
        model_set_phase(&model, 1);
        uint64_t rng = (uint64_t)a.seed * 2654435761u + 1;
        double t0 = now_seconds();
        Phase1Stats st = {};
        for (int r = 0; r < a.p1_rounds; r++) {
            dataloader_next(&train);
            st = phase1_round(&model, &a, train.inputs, a.B, a.T, &rng, r + 1);
            printf("phase 1 round %d/%d: %d iterations, converged %.3f, oacd loss %.5f\n", r + 1, a.p1_rounds, st.iters, st.converged, st.loss);
            if (log) { fprintf(log, "{\"type\": \"phase1\", \"round\": %d, \"iters\": %d, \"converged\": %.4f, \"oacd_loss\": %.6f}\n", r + 1, st.iters, st.converged, st.loss); fflush(log); }
        }
        printf("phase 1 done in %.1f s: converged fraction %.3f\n", now_seconds() - t0, st.converged);
        if (a.out) {
            snprintf(path, sizeof path, "%s/context_block.bin", a.out);
            context_block_save(&model, path);
            printf("wrote %s\n", path);
            snprintf(path, sizeof path, "%s/model.bin", a.out);
            model_save(&model, path);
            snprintf(path, sizeof path, "%s/metrics.json", a.out);
            AtomicFile af = atomic_open(path);
            fprintf(af.f, "{\"phase\": 1, \"converged\": %.4f, \"oacd_loss\": %.6f, \"iters\": %d, \"rounds\": %d}\n", st.converged, st.loss, st.iters, a.p1_rounds);
            atomic_commit(&af);
            fclose(log);
        }
        return 0;
    }
    AdamW opt = {a.lr, a.beta1, a.beta2, a.eps, a.weight_decay};
    uint64_t sample_rng = a.resume ? rs.rng : (uint64_t)a.seed ^ 0x9E3779B97F4A7C15ull;
    int *sample_buf = (int *)malloc_check((a.sample_len + 1) * sizeof(int), "sample");
    const int BT = a.B * a.T;
    double train_time = 0.0;
    float train_loss = -1.0f, val_loss = -1.0f;
    long long tokens_seen = a.resume ? rs.tokens_seen : 0;
    int last_saved = a.resume ? rs.step : -1; // step of the last good training state on disk
    char state_path[4200] = "";
    if (a.out) snprintf(state_path, sizeof state_path, "%s/train_state.bin", a.out);
    for (int step = a.resume ? rs.step : 0; step <= a.steps; step++) {
        int last = step == a.steps;
        if (have_val && (last || (a.val_every > 0 && step % a.val_every == 0))) {
            val_loss = evaluate(&model, &val, a.val_batches);
            printf("step %d/%d | val loss %.4f\n", step, a.steps, val_loss);
            if (log) { fprintf(log, "{\"type\": \"val\", \"step\": %d, \"val_loss\": %.6f, \"tokens_seen\": %lld}\n", step, val_loss, tokens_seen); fflush(log); }
        }
        if ((a.sample_every > 0 && step > 0 && step % a.sample_every == 0) || (last && a.sample_every > 0)) {
            int prompt = tk.tokens ? tk.eot : 0;
            printf("--- sample at step %d ---\n", step);
            model_generate(&model, 1, &prompt, 1, a.sample_len, a.temperature, &sample_rng, sample_buf, tk.tokens ? &tk : NULL, NULL);
            if (!tk.tokens) for (int i = 1; i <= a.sample_len; i++) printf("%d ", sample_buf[i]);
            printf("\n---\n");
        }
        if (last) break;
        double t0 = now_seconds();
        dataloader_next(&train);
        float loss = model_forward(&model, train.inputs, train.targets, a.B, a.T);
        model_zero_grad(&model);
        model_backward(&model);
        float norm = model_clip_grad_norm(&model, a.grad_clip);
        if (!isfinite(loss) || !isfinite(norm)) {
            if (last_saved >= 0) die("step %d: loss %g / grad norm %g is not finite; stopping. The last good training state "
                                     "(step %d) is in %s", step + 1, loss, norm, last_saved, a.resume && !a.out ? a.resume : state_path);
            die("step %d: loss %g / grad norm %g is not finite; stopping (no checkpoint was saved yet)", step + 1, loss, norm);
        }
        opt.lr = lr_at(&a, step);
        model_update(&model, &opt);
        cudaCheck(cudaDeviceSynchronize());
        double dt = now_seconds() - t0;
        train_time += dt;
        tokens_seen += BT;
        train_loss = loss;
        double tok_s = tokens_seen / train_time;
        char eta[32];
        format_eta(eta, sizeof eta, train_time / (step + 1) * (a.steps - step - 1));
        printf("step %d/%d | loss %.4f | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s | ETA %s\n", step + 1, a.steps,
               loss, norm, opt.lr, dt * 1e3, BT / dt, eta);
        fflush(stdout);
        if (a.out && (step + 1 == a.steps || step + 1 == a.stop_at || (a.checkpoint_every && (step + 1) % a.checkpoint_every == 0))) {
            TrainState st = {step + 1, train.epoch, train.shard_index, (long long)train.pos, a.shuffle, sample_rng, a.B, a.T, tokens_seen};
            train_state_save(&model, state_path, &st);
            last_saved = step + 1;
        }
        if (log) {
            fprintf(log, "{\"type\": \"train\", \"step\": %d, \"loss\": %.9g, \"grad_norm\": %.6f, \"lr\": %.6e, \"ms\": %.3f, \"tokens_per_s\": %.1f, \"tokens_seen\": %lld}\n",
                    step + 1, loss, norm, opt.lr, dt * 1e3, tok_s, tokens_seen);
            fflush(log);
        }
        if (step + 1 == a.stop_at) {
            printf("stopped after step %d (--stop-at); continue with --resume %s\n", step + 1, a.out);
            if (log) fclose(log);
            return 0;
        }
    }
    if (a.out && a.steps > 0) {
        snprintf(path, sizeof path, "%s/model.bin", a.out);
        model_save(&model, path);
        printf("wrote %s\n", path);
    }
    // the evaluation suite; null in metrics.json for what was not asked for
    char heldout[64] = "null", lam_acc[64] = "null", lam_ppl[64] = "null", gen1[64] = "null", gen8[64] = "null";
    char val_s[64] = "null", heldout_n[64] = "null", lam_n[64] = "null", cache_meas[64] = "null";
    char train_s[64] = "null";
    if (have_val) snprintf(val_s, sizeof val_s, "%.6f", val_loss);
    if (a.steps > 0) snprintf(train_s, sizeof train_s, "%.6f", train_loss);
    if (a.eval_heldout) {
        long long scored;
        double t0 = now_seconds();
        float l = eval_heldout(&model, a.eval_heldout, a.T, a.heldout_max_tokens, &scored);
        printf("held-out loss %.4f over %lld tokens of %s (window %d, stride %d) [%.1f s]\n", l, scored, a.eval_heldout, a.T, a.T / 2, now_seconds() - t0);
        snprintf(heldout, sizeof heldout, "%.6f", l);
        snprintf(heldout_n, sizeof heldout_n, "%lld", scored);
    }
    if (a.eval_lambada) {
        float acc, ppl;
        int n;
        double t0 = now_seconds();
        eval_lambada(&model, a.eval_lambada, a.lambada_max, &acc, &ppl, &n);
        printf("LAMBADA: accuracy %.4f, perplexity %.2f over %d examples [%.1f s]\n", acc, ppl, n, now_seconds() - t0);
        snprintf(lam_acc, sizeof lam_acc, "%.6f", acc);
        snprintf(lam_ppl, sizeof lam_ppl, "%.4f", ppl);
        snprintf(lam_n, sizeof lam_n, "%d", n);
    }
    if (a.eval_gen) {
        // prompts from the validation (or training) tokens, so the model sees real text
        const DataLoader *src = have_val ? &val : have_train ? &train : NULL;
        uint16_t fallback = 0;
        const uint16_t *ptok = src ? src->tokens : &fallback;
        size_t pn = src ? src->ntok : 1;
        size_t bytes1, bytes8;
        float t1 = eval_generation(&model, 1, ptok, pn, a.gen_prompt, a.gen_new, &bytes1);
        float t8 = eval_generation(&model, 8, ptok, pn, a.gen_prompt, a.gen_new, &bytes8);
        printf("generation: %.1f tok/s at batch 1, %.1f tok/s at batch 8 (%d new after %d) | KV cache %zu bytes at batch 1\n",
               t1, t8, a.gen_new, a.gen_prompt, bytes1);
        snprintf(gen1, sizeof gen1, "%.2f", t1);
        snprintf(gen8, sizeof gen8, "%.2f", t8);
        snprintf(cache_meas, sizeof cache_meas, "%zu", bytes1);
    }
    if (a.out) {
        const Config *c = &model.cfg;
        snprintf(path, sizeof path, "%s/metrics.json", a.out);
        AtomicFile af = atomic_open(path);
        fprintf(af.f,
                "{\"train_loss\": %s, \"val_loss\": %s, \"heldout_loss_wikitext2\": %s, \"heldout_tokens\": %s, "
                "\"lambada_acc\": %s, \"lambada_ppl\": %s, \"lambada_examples\": %s, \"generation_toks_per_s\": %s, "
                "\"generation_toks_per_s_b8\": %s, \"kv_bytes_per_token_per_layer_bf16\": %zu, \"kv_bytes_per_token_bf16\": %zu, "
                "\"kv_cache_bytes_measured_fp32\": %s, \"kv_cache_bytes_analytic_fp32\": %zu, \"params\": %zu, "
                "\"tokens_seen\": %lld, \"tokens_per_s\": %.1f, \"steps\": %d}\n",
                train_s, val_s, heldout, heldout_n, lam_acc, lam_ppl, lam_n, gen1, gen8,
                2 * attn_kv_elements(c, c->attn_type), 2 * kv_elements_per_token(c), cache_meas,
                4 * kv_elements_at(c, (size_t)a.gen_prompt + a.gen_new), model.num_params, tokens_seen,
                train_time > 0 ? tokens_seen / train_time : 0.0, a.steps);
        atomic_commit(&af);
        printf("wrote %s\n", path);
        fclose(log);
    }
    free(sample_buf);
    tokenizer_free(&tk);
    if (have_train) dataloader_free(&train);
    if (have_val) dataloader_free(&val);
    model_free(&model);
    return 0;
}
#endif
