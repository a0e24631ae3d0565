/*
train_ctxkv.cu: the CUDA mirror of train_ctxkv.c. Same program, same order, same function
names, same command line, checkpoint and shard formats, logs and --out files: read the two
side by side. What differs is where the numbers live and who computes them:

  - Parameters, activations, gradients and optimizer state are on the GPU. The parameters
    the layers read (params_dev) and the activations are floatX: bf16 by default, float
    with PRECISION=FP32 (make train_ctxkv_cu PRECISION=FP32), which is the build to compare
    with the CPU bit for bit up to summation order. AdamW updates fp32 master weights
    (master_dev) and writes the bf16 copy; reductions, softmax and statistics run in fp32.
  - params_memory is, as in the CPU program, the fp32 host copy in checkpoint order: the
    host-side code (init, load, save, --init-from, the context-block file) works on it and
    model_to_device / model_to_host move it. On the GPU each tensor starts on a 256-byte
    boundary (ParamTensor.dev_offset), which every cuBLASLt algorithm accepts.
  - Every matmul is cuBLASLt (fp32 accumulation, the bias epilogue in the forward); the
    other layers are the kernels below, one simple kernel (or two) per CPU loop nest. No
    atomics: every reduction has a fixed order, so a run is deterministic.
  - Backward functions ACCUMULATE (+=) as on the CPU. Attention backward is split in two
    kernels (the query side per query row, the key/value side per key row) so that no two
    threads add into one element.
  - Host-side code that is not numerics (config, headers, presets, flags, shards, token
    table, atomic writes, --kv-report) is the CPU program's, transcribed to C++.

Build: make train_ctxkv_cu [PRECISION=FP32] [GPU_COMPUTE_CAPABILITY=90].  Usage: ./train_ctxkv_cu -h
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
        if (c->context_interval < 1) return "context interval must be >= 1";
        if (c->max_contexts < 1) return "max contexts must be >= 1";
        if (c->embed_dim != c->n_embd) return "with layer0 ctxkv embed_dim must equal n_embd";
    } else if (c->model_type == MODEL_CTXPYTHIA) {
        if (c->n_embd != c->context_dim) return "ctxpythia runs its layers at the context width: n_embd must equal context_dim";
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
