/*
cuda_emu.h: just enough of CUDA, emulated on the CPU, to run train_ctxkv.cu's kernels and its
harness on a machine without a GPU. It checks the LOGIC of the CUDA program (indexing, the
cuBLASLt arguments, the reductions, barriers, the host/device choreography); it says nothing
about speed and cannot show races between blocks (blocks run one after another).

How: dev/cuda/emu/emulate.py rewrites a .cu file into C++ (kernel launches become
emu_launch(grid, block, smem, lambda), `__shared__` becomes `static`, dynamic shared memory a
buffer) and includes this header, which provides:
  - threads of a block as coroutines (ucontext) on one OS thread, scheduled round robin;
    __syncthreads and the warp shuffles are real barriers, and a barrier that some threads
    of a block (or warp) never reach aborts with a message, as a hang on a GPU would be;
  - the CUDA runtime calls the program makes (malloc-backed "device" memory, filled with
    all-ones bytes: NaN as float and as bf16, so reading memory nobody wrote shows);
  - cuBLASLt's matmul (column-major, op(A)·op(B), beta, the bias epilogue), checking that the
    matrix layouts it is given agree with each other; CUDA_EMU_LT_REFUSE=M makes the
    heuristic find no algorithm for m = M (the program's error path).
bf16 comes from the real cuda_bf16.h (its conversions are host code).

Build (the Makefile's cuda-emu target does this): python3 dev/cuda/emu/emulate.py X.cu X.emu.cpp
then g++ -std=c++17 -I/usr/local/cuda/include -Idev/cuda/emu X.emu.cpp.
*/
#pragma once
#include <cuda_bf16.h> // also brings cuda_runtime_api.h's types and declarations (host compiler)
#include <library_types.h>
#include <vector_functions.h> // make_float4
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <math.h>

#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __host__
#define __host__
#endif

static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }

// ----------------------------------------------------------------------------
// threads as coroutines. Each of up to 1024 coroutines gets its own stack once (makecontext);
// after that every switch is _setjmp/_longjmp, which makes no system call (swapcontext saves
// the signal mask with one each time). A coroutine loops: run the kernel body for the thread
// the scheduler assigned, report done, wait to be resumed for the next block.
// (Build with -U_FORTIFY_SOURCE: glibc's fortified longjmp refuses to switch stacks.)

#include <setjmp.h>
enum { EMU_RUNNABLE, EMU_WAIT_BLOCK, EMU_WAIT_WARP, EMU_DONE };
struct EmuThread {
    ucontext_t uc;    // used once, to start the coroutine on its stack
    jmp_buf jb;       // where it continues
    int started;
    dim3 tid;
    int linear, state;
};
#define EMU_MAX_THREADS 1024
#define EMU_STACK (64 * 1024)
static EmuThread emu_threads[EMU_MAX_THREADS];
static char *emu_stacks;
static jmp_buf emu_sched_jb;
static ucontext_t emu_sched_uc;
static EmuThread *emu_cur;
static dim3 emu_block_idx, emu_block_dim, emu_grid_dim;
static void *emu_dyn_smem;
static size_t emu_dyn_cap;
static float emu_slots_f[EMU_MAX_THREADS];
static double emu_slots_d[EMU_MAX_THREADS];
static void (*emu_invoke)(void *);
static void *emu_arg;
static const char *emu_kernel_name = "";

#define threadIdx (emu_cur->tid)
#define blockIdx emu_block_idx
#define blockDim emu_block_dim
#define gridDim emu_grid_dim

static void emu_yield(int state) {
    emu_cur->state = state;
    if (!_setjmp(emu_cur->jb)) _longjmp(emu_sched_jb, 1);
}
static inline void __syncthreads(void) { emu_yield(EMU_WAIT_BLOCK); }
static inline void emu_warp_barrier(void) { emu_yield(EMU_WAIT_WARP); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)mask; emu_warp_barrier(); }

static inline float __shfl_xor_sync(unsigned mask, float v, int o) {
    (void)mask;
    const int me = emu_cur->linear, partner = (me & ~31) | ((me & 31) ^ o);
    emu_slots_f[me] = v;
    emu_warp_barrier();
    float r = emu_slots_f[partner];
    emu_warp_barrier();
    return r;
}
static inline double __shfl_xor_sync(unsigned mask, double v, int o) {
    (void)mask;
    const int me = emu_cur->linear, partner = (me & ~31) | ((me & 31) ^ o);
    emu_slots_d[me] = v;
    emu_warp_barrier();
    double r = emu_slots_d[partner];
    emu_warp_barrier();
    return r;
}

static void emu_coroutine(void) {
    for (;;) {
        emu_invoke(emu_arg);
        emu_yield(EMU_DONE);
    }
}

// runs the thread until it finishes or waits at a barrier
static void emu_resume(EmuThread *t) {
    emu_cur = t;
    if (_setjmp(emu_sched_jb)) return;
    if (t->started) _longjmp(t->jb, 1);
    t->started = 1;
    getcontext(&t->uc);
    t->uc.uc_stack.ss_sp = emu_stacks + (size_t)(t - emu_threads) * EMU_STACK;
    t->uc.uc_stack.ss_size = EMU_STACK;
    t->uc.uc_link = NULL; // never returns: it loops
    makecontext(&t->uc, emu_coroutine, 0);
    swapcontext(&emu_sched_uc, &t->uc);
}

static void emu_run_block(int n) {
    for (int i = 0; i < n; i++) {
        EmuThread *t = &emu_threads[i];
        t->linear = i;
        t->tid = dim3(i % emu_block_dim.x, (i / emu_block_dim.x) % emu_block_dim.y, i / (emu_block_dim.x * emu_block_dim.y));
        t->state = EMU_RUNNABLE;
    }
    for (;;) {
        for (int i = 0; i < n; i++)
            if (emu_threads[i].state == EMU_RUNNABLE) emu_resume(&emu_threads[i]);
        int done = 0, wait_block = 0, released = 0;
        for (int i = 0; i < n; i++) {
            done += emu_threads[i].state == EMU_DONE;
            wait_block += emu_threads[i].state == EMU_WAIT_BLOCK;
        }
        if (done == n) return;
        for (int w = 0; w < n; w += 32) { // a warp barrier opens when every live thread of the warp waits at it
            int live = 0, waiting = 0;
            for (int i = w; i < w + 32 && i < n; i++) {
                live += emu_threads[i].state != EMU_DONE;
                waiting += emu_threads[i].state == EMU_WAIT_WARP;
            }
            if (live && waiting == live) {
                for (int i = w; i < w + 32 && i < n; i++)
                    if (emu_threads[i].state == EMU_WAIT_WARP) emu_threads[i].state = EMU_RUNNABLE;
                released = 1;
            }
        }
        if (!released && wait_block + done == n) { // the block barrier: every live thread is there
            for (int i = 0; i < n; i++)
                if (emu_threads[i].state == EMU_WAIT_BLOCK) emu_threads[i].state = EMU_RUNNABLE;
            released = 1;
        }
        if (!released) {
            fprintf(stderr, "cuda_emu: kernel %s, block (%u,%u,%u): threads wait at different barriers (divergent "
                    "__syncthreads or shuffle): this would hang or misbehave on a GPU\n", emu_kernel_name, emu_block_idx.x,
                    emu_block_idx.y, emu_block_idx.z);
            abort();
        }
    }
}

template <class F> static void emu_invoke_fn(void *p) { (*(F *)p)(); }

template <class F> static void emu_launch(const char *name, dim3 grid, dim3 block, size_t smem, F fn) {
    const int n = (int)(block.x * block.y * block.z);
    if (n < 1 || n > EMU_MAX_THREADS || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr, "cuda_emu: kernel %s: bad launch (grid %u,%u,%u block %u,%u,%u)\n", name, grid.x, grid.y, grid.z,
                block.x, block.y, block.z);
        abort();
    }
    if (!emu_stacks) emu_stacks = (char *)malloc((size_t)EMU_MAX_THREADS * EMU_STACK);
    if (smem > emu_dyn_cap) {
        free(emu_dyn_smem);
        emu_dyn_smem = malloc(smem);
        emu_dyn_cap = smem;
    }
    emu_kernel_name = name;
    emu_invoke = emu_invoke_fn<F>;
    emu_arg = &fn;
    emu_block_dim = block;
    emu_grid_dim = grid;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                emu_block_idx = dim3(x, y, z);
                if (emu_dyn_smem) memset(emu_dyn_smem, 0xff, emu_dyn_cap); // garbage (NaN), as on a GPU
                emu_run_block(n);
            }
}

// ----------------------------------------------------------------------------
// the CUDA runtime calls the program makes

extern "C" {
cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int) {
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "cuda_emu (CPU emulation)");
    p->major = 9; p->minor = 0;
    p->multiProcessorCount = 132; // an H100 / H200: what the decode splits (flash-decoding) are sized for
    p->sharedMemPerBlockOptin = 227 * 1024;
    p->totalGlobalMem = (size_t)16 << 30;
    return cudaSuccess;
}
cudaError_t cudaMalloc(void **p, size_t n) {
    *p = malloc(n);
    // all-ones bytes: NaN as float and as bf16, so a read of memory never written (a += into a
    // buffer nobody zeroed) poisons the result instead of adding a tiny number
    if (*p) memset(*p, 0xff, n);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
cudaError_t cudaMemset(void *p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
cudaError_t cudaMemcpy(void *d, const void *s, size_t n, enum cudaMemcpyKind) { memmove(d, s, n); return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *f, size_t *t) { *f = *t = (size_t)16 << 30; return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char *cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
}
template <class K> static cudaError_t cudaFuncSetAttribute(K, enum cudaFuncAttribute, int) { return cudaSuccess; }
// events keep the host clock (the timings of an emulation mean nothing; dev/cuda prints them anyway)
#include <time.h>
extern "C" {
cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = (cudaEvent_t)calloc(1, sizeof(double)); return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    *(double *)e = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
    return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) { *ms = (float)(*(double *)b - *(double *)a); return cudaSuccess; }
cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
}
// one OS thread runs every emulated thread: an atomic is a plain read-modify-write
static inline float atomicAdd(float *p, float v) { float old = *p; *p = old + v; return old; }
static inline double atomicAdd(double *p, double v) { double old = *p; *p = old + v; return old; }
#define CUDA_EMU 1

// ----------------------------------------------------------------------------
// cuBLASLt: the calls train_ctxkv.cu makes, computed by a plain loop in fp32

typedef enum { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_NOT_SUPPORTED = 15, CUBLAS_STATUS_INVALID_VALUE = 7 } cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 } cublasOperation_t;
typedef enum { CUBLAS_COMPUTE_32F = 68 } cublasComputeType_t;
typedef enum { CUBLASLT_EPILOGUE_DEFAULT = 1, CUBLASLT_EPILOGUE_BIAS = 4 } cublasLtEpilogue_t;
typedef enum {
    CUBLASLT_MATMUL_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSB, CUBLASLT_MATMUL_DESC_EPILOGUE,
    CUBLASLT_MATMUL_DESC_BIAS_POINTER, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE
} cublasLtMatmulDescAttributes_t;
typedef enum {
    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES
} cublasLtMatmulPreferenceAttributes_t;
struct EmuLtDesc { int transa, transb, epilogue; const void *bias; int bias_type; };
struct EmuLtLayout { int type; uint64_t rows, cols; int64_t ld; };
struct EmuLtPref { int unused; };
typedef EmuLtDesc *cublasLtMatmulDesc_t;
typedef EmuLtLayout *cublasLtMatrixLayout_t;
typedef EmuLtPref *cublasLtMatmulPreference_t;
typedef struct EmuLtHandle *cublasLtHandle_t;
typedef struct { int id; } cublasLtMatmulAlgo_t;
typedef struct { cublasLtMatmulAlgo_t algo; size_t workspaceSize; cublasStatus_t state; float wavesCount; int reserved[4]; } cublasLtMatmulHeuristicResult_t;

static const char *cublasGetStatusString(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS ? "success" : "emulated cuBLAS error"; }
static cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) { *h = NULL; return CUBLAS_STATUS_SUCCESS; }
static cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t ct, cudaDataType_t st) {
    if (ct != CUBLAS_COMPUTE_32F || st != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = new EmuLtDesc{0, 0, CUBLASLT_EPILOGUE_DEFAULT, NULL, -1};
    return CUBLAS_STATUS_SUCCESS;
}
static cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const void *v, size_t n) {
    switch (a) {
    case CUBLASLT_MATMUL_DESC_TRANSA: if (n != sizeof(cublasOperation_t)) return CUBLAS_STATUS_INVALID_VALUE; d->transa = *(const int *)v; break;
    case CUBLASLT_MATMUL_DESC_TRANSB: if (n != sizeof(cublasOperation_t)) return CUBLAS_STATUS_INVALID_VALUE; d->transb = *(const int *)v; break;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: if (n != sizeof(cublasLtEpilogue_t)) return CUBLAS_STATUS_INVALID_VALUE; d->epilogue = *(const int *)v; break;
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER: if (n != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE; d->bias = *(const void *const *)v; break;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: if (n != sizeof(cudaDataType_t)) return CUBLAS_STATUS_INVALID_VALUE; d->bias_type = *(const int *)v; break;
    }
    return CUBLAS_STATUS_SUCCESS;
}
static cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) { delete d; return CUBLAS_STATUS_SUCCESS; }
static cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld) {
    if ((int64_t)rows > ld || rows == 0 || cols == 0) return CUBLAS_STATUS_INVALID_VALUE; // column-major: ld >= rows
    *l = new EmuLtLayout{(int)t, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}
static cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) { delete l; return CUBLAS_STATUS_SUCCESS; }
static cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *p) { *p = new EmuLtPref{0}; return CUBLAS_STATUS_SUCCESS; }
static cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t, cublasLtMatmulPreferenceAttributes_t a, const void *, size_t n) {
    return (a == CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES ? n == 8 : n == 4) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}
static cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t p) { delete p; return CUBLAS_STATUS_SUCCESS; }

// op(A) (m×k) and op(B) (k×n) must agree with D (m×n): the emulator refuses what cuBLASLt would
static int emu_lt_shapes(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A, cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C,
                         cublasLtMatrixLayout_t D, uint64_t *m, uint64_t *n, uint64_t *k) {
    *m = D->rows; *n = D->cols;
    uint64_t am = d->transa ? A->cols : A->rows, ak = d->transa ? A->rows : A->cols;
    uint64_t bk = d->transb ? B->cols : B->rows, bn = d->transb ? B->rows : B->cols;
    *k = ak;
    return am == *m && bn == *n && bk == ak && C->rows == D->rows && C->cols == D->cols && C->ld == D->ld && A->type == B->type &&
           A->type == D->type;
}
static cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t, cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t A,
                                                     cublasLtMatrixLayout_t B, cublasLtMatrixLayout_t C, cublasLtMatrixLayout_t D,
                                                     cublasLtMatmulPreference_t, int, cublasLtMatmulHeuristicResult_t *r, int *found) {
    uint64_t m, n, k;
    *found = emu_lt_shapes(d, A, B, C, D, &m, &n, &k);
    // CUDA_EMU_LT_REFUSE=M: no algorithm for products with m = M (tests the program's error path)
    const char *refuse = getenv("CUDA_EMU_LT_REFUSE");
    if (refuse && (uint64_t)strtoull(refuse, NULL, 10) == m) *found = 0;
    memset(r, 0, sizeof *r);
    return *found ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_NOT_SUPPORTED;
}
static float emu_get(const void *p, int type, size_t i) {
    return type == CUDA_R_32F ? ((const float *)p)[i] : __bfloat162float(((const __nv_bfloat16 *)p)[i]);
}
static void emu_set(void *p, int type, size_t i, float v) {
    if (type == CUDA_R_32F) ((float *)p)[i] = v;
    else ((__nv_bfloat16 *)p)[i] = __float2bfloat16(v);
}
static cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t d, const void *alpha, const void *A, cublasLtMatrixLayout_t Al,
                                     const void *B, cublasLtMatrixLayout_t Bl, const void *beta, const void *C, cublasLtMatrixLayout_t Cl,
                                     void *D, cublasLtMatrixLayout_t Dl, const cublasLtMatmulAlgo_t *, void *, size_t, cudaStream_t) {
    uint64_t m, n, k;
    if (!emu_lt_shapes(d, Al, Bl, Cl, Dl, &m, &n, &k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS && (!d->bias || d->bias_type != Dl->type)) return CUBLAS_STATUS_INVALID_VALUE;
    const float a = *(const float *)alpha, b = *(const float *)beta;
    const int t = Dl->type;
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            float s = 0.0f;
            for (uint64_t p = 0; p < k; p++) {
                float x = d->transa ? emu_get(A, t, p + i * Al->ld) : emu_get(A, t, i + p * Al->ld);
                float y = d->transb ? emu_get(B, t, j + p * Bl->ld) : emu_get(B, t, p + j * Bl->ld);
                s += x * y;
            }
            float v = a * s;
            if (b != 0.0f) v += b * emu_get(C, t, i + j * Cl->ld);
            if (d->epilogue == CUBLASLT_EPILOGUE_BIAS) v += emu_get(d->bias, d->bias_type, i);
            emu_set(D, t, i + j * Dl->ld, v);
        }
    return CUBLAS_STATUS_SUCCESS;
}
