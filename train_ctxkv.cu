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
