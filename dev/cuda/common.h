/*
dev/cuda/common.h: helpers shared by the kernel files in dev/cuda (as llm.c's dev/cuda/common.h).

Each file in dev/cuda holds one kernel of train_ctxkv.cu: a CPU reference (the loop nest of
train_ctxkv.c), one or more kernel versions (the file's comment says which one train_ctxkv.cu
uses, written here over float instead of floatX; the others are alternatives or the reference
it replaced), a validation of every version against the reference and a timing loop. Build and run one:

    nvcc -O3 -std=c++17 dev/cuda/layernorm_forward.cu -o /tmp/layernorm_forward && /tmp/layernorm_forward [VERSION]

or all of them with `make dev-cuda` (binaries in build/cuda-check/dev). Without a GPU they run
on the CPU emulator (dev/cuda/emu): the validation means something there, the timings do not.
*/
#pragma once
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define cudaCheck(call) cuda_check_((call), #call, __FILE__, __LINE__)
static inline void cuda_check_(cudaError_t e, const char *what, const char *file, int line) {
    if (e != cudaSuccess) {
        fprintf(stderr, "CUDA error '%s' at %s:%d in %s\n", cudaGetErrorString(e), file, line, what);
        exit(EXIT_FAILURE);
    }
}

static inline int ceil_div(long a, long b) { return (int)((a + b - 1) / b); }

// xorshift* (as train_ctxkv.c): the same inputs on every machine
static uint64_t dev_rng = 1337;
static inline float rand_uniform(void) { // [-1, 1)
    dev_rng ^= dev_rng >> 12;
    dev_rng ^= dev_rng << 25;
    dev_rng ^= dev_rng >> 27;
    return (float)((uint32_t)((dev_rng * 0x2545F4914F6CDD1Dull) >> 32) >> 8) / 8388608.0f - 1.0f;
}
static inline float *make_random_float(size_t n, float scale) {
    float *x = (float *)malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = scale * rand_uniform();
    return x;
}
static inline int *make_random_int(size_t n, int hi) {
    int *x = (int *)malloc(n * sizeof(int));
    for (size_t i = 0; i < n; i++) x[i] = (int)((rand_uniform() + 1.0f) * 0.5f * hi) % hi;
    return x;
}

static inline float *to_device(const float *h, size_t n) {
    float *d;
    cudaCheck(cudaMalloc((void **)&d, n * sizeof(float)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
    return d;
}
static inline int *to_device_int(const int *h, size_t n) {
    int *d;
    cudaCheck(cudaMalloc((void **)&d, n * sizeof(int)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(int), cudaMemcpyHostToDevice));
    return d;
}
static inline float *device_zeros(size_t n) {
    float *d;
    cudaCheck(cudaMalloc((void **)&d, n * sizeof(float)));
    cudaCheck(cudaMemset(d, 0, n * sizeof(float)));
    return d;
}

// Compares a device result with the CPU reference: |gpu − cpu| <= tol·(1 + |cpu|) everywhere.
// Prints the first mismatches; returns 1 if all match.
static inline int validate_result(const float *d_result, const float *ref, const char *name, size_t n, float tol) {
    float *h = (float *)malloc(n * sizeof(float));
    cudaCheck(cudaMemcpy(h, d_result, n * sizeof(float), cudaMemcpyDeviceToHost));
    int bad = 0;
    float worst = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = fabsf(h[i] - ref[i]);
        if (!(d <= tol * (1.0f + fabsf(ref[i])))) {
            if (bad < 5) printf("  %s[%zu]: gpu %.7f cpu %.7f\n", name, i, h[i], ref[i]);
            bad++;
        }
        if (!(d <= worst)) worst = d;
    }
    printf("  %s: %s (max abs diff %.3e over %zu values, tol %.0e)\n", name, bad ? "MISMATCH" : "ok", worst, n, tol);
    free(h);
    return bad == 0;
}

// Quick mode: the emulator's problem sizes and one timed call. Always under the emulator (timings
// mean nothing there, validation does); on a GPU with DEV_CUDA_QUICK=1, which the first run's
// compute-sanitizer pass sets (the tools slow kernels by 10-100x).
static inline int dev_quick(void) {
#ifdef CUDA_EMU
    return 1;
#else
    static int quick = -1;
    if (quick < 0) {
        const char *e = getenv("DEV_CUDA_QUICK");
        quick = e && *e && strcmp(e, "0") != 0;
    }
    return quick;
#endif
}

// mean time in ms of BENCH_REPEATS calls of f() (after one warm-up call), by CUDA events
#define BENCH_REPEATS (dev_quick() ? 1 : 100)
template <class F> static inline float benchmark_kernel(F f) {
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    f();
    cudaCheck(cudaEventRecord(start, 0));
    for (int i = 0; i < BENCH_REPEATS; i++) f();
    cudaCheck(cudaEventRecord(stop, 0));
    cudaCheck(cudaEventSynchronize(stop));
    float ms = 0.0f;
    cudaCheck(cudaEventElapsedTime(&ms, start, stop));
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ms / BENCH_REPEATS;
}

// problem sizes: the real ones on a GPU, small ones on the CPU emulator and in quick mode (same code paths)
#define SIZE(gpu, emu) (dev_quick() ? (emu) : (gpu))

// which versions to run: all, or the one named on the command line
static inline int version_wanted(int argc, char **argv, int v) { return argc < 2 || atoi(argv[1]) == v; }

// warp and block reductions (blockDim.x a multiple of 32), as train_ctxkv.cu
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
    __syncthreads();
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

// ----------------------------------------------------------------------------
// The attention files' shared pieces, as in train_ctxkv.cu (over float)

// head h of token (b,t) in a (B,T,row) buffer: base + (b*T + t)*row_stride + h*head_stride
typedef struct { float *base; int row_stride, head_stride; } HeadView;
__host__ __device__ inline float *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

// a · b over n fp32 entries in shared memory (one thread's dot: a tile row against a key or value)
__device__ inline float smem_dot(const float *a, const float *b, int n) {
    float d = 0.0f;
    for (int j = 0; j < n; j++) d += a[j] * b[j];
    return d;
}

// rows r0 .. r0+n−1 of head view x (head hh, sequence b) into shared memory at row stride ld;
// rows past `last` are zero
__device__ void load_rows(float *dst, int ld, HeadView x, int T, int b, int hh, int r0, int n, int d, int last) {
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
        const int r = e / d, j = e % d;
        dst[r * ld + j] = r0 + r <= last ? head_at(x, T, b, r0 + r, hh)[j] : 0.0f;
    }
}

// D (B,H,T) = Σ_j dO·O per row (b, t, h) of out's (B,T,H*Dv) order: the backward's rowsum(dP⊙P)
// in the tiled kernels. A warp per row.
__global__ void attention_row_dot_kernel(float *Drow, const float *dout, const float *out, int T, int H, int Dv, int n_rows) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= n_rows) return;
    float acc = 0.0f;
    for (int j = lane; j < Dv; j += 32) acc += dout[(size_t)row * Dv + j] * out[(size_t)row * Dv + j];
    acc = warp_reduce_sum(acc);
    const int b = row / (T * H), t = row / H % T, h = row % H;
    if (lane == 0) Drow[((size_t)b * H + h) * T + t] = acc;
}
