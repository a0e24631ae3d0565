// ctxkv/simd.h: performance-only code of the CPU program: 8-lane float vectors (GCC/Clang vector
// extensions, so -march=native picks AVX2 or AVX-512 and no intrinsics are needed), exp on 8
// lanes, dot/axpy, and the GEMM micro-kernel with its transpose. Nothing here is needed to
// understand the model: each function equals a plain loop, and test_ctxkv.c checks it against
// that loop ("simd kernels").
#ifndef CTXKV_SIMD_H
#define CTXKV_SIMD_H
#include <math.h>
#include <string.h>

// GCC/Clang vector extensions give 8-wide SIMD without -ffast-math (which breaks exact GELU,
// see doc/model.md); loads are unaligned.

typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline v8 splat8(float a) { return (v8){a, a, a, a, a, a, a, a}; }
static inline float hsum8(v8 a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

typedef int v8i __attribute__((vector_size(32)));

// per lane: mask ? a : b (a comparison of two v8 gives the mask)
static inline v8 select8(v8i mask, v8 a, v8 b) {
    v8i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    v8i r = (ai & mask) | (bi & ~mask);
    v8 out;
    memcpy(&out, &r, sizeof out);
    return out;
}

// exp on 8 lanes (Cephes expf: 2^n · p(r) with |r| <= ln2/2, about 1 ulp). The vocabulary
// softmax calls exp B·T·V times per step, and libm's scalar exp dominated the profile.
static inline v8 exp8(v8 x) {
    const v8 hi = splat8(88.3762626647949f), lo = splat8(-87.3365447504f);
    const v8i nan_lanes = x != x; // NaN must stay NaN (the integer exponent below would hide it)
    const v8 x_in = x;
    x = select8(x > hi, hi, x);
    x = select8(x < lo, lo, x);
    v8 t = x * splat8(1.44269504088896341f) + splat8(0.5f);
    v8i n = __builtin_convertvector(t, v8i);          // truncates toward zero...
    n += (v8i)(__builtin_convertvector(n, v8) > t);   // ...so step down where that rounded up: floor
    v8 fn = __builtin_convertvector(n, v8);
    x = x - fn * splat8(0.693359375f) - fn * splat8(-2.12194440e-4f);
    v8 p = splat8(1.9875691500e-4f);
    p = p * x + splat8(1.3981999507e-3f);
    p = p * x + splat8(8.3334519073e-3f);
    p = p * x + splat8(4.1665795894e-2f);
    p = p * x + splat8(1.6666665459e-1f);
    p = p * x + splat8(5.0000001201e-1f);
    p = p * (x * x) + x + splat8(1.0f);
    v8i bits = (n + 127) << 23;                       // 2^n as a float's exponent field
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return select8(nan_lanes, x_in, p * scale);
}

// x[i] = exp(x[i] − shift) for n entries; returns their sum. Tails go through the same
// 8-lane code (padded) so every entry is computed identically.
static inline float exp_shift_sum(float *x, int n, float shift) {
    v8 acc = splat8(0.0f), sh = splat8(shift);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8 e = exp8(load8(x + i) - sh);
        store8(x + i, e);
        acc += e;
    }
    float sum = hsum8(acc);
    if (i < n) {
        float tmp[8];
        for (int j = 0; j < 8; j++) tmp[j] = i + j < n ? x[i + j] - shift : -INFINITY;
        v8 e = exp8(load8(tmp));
        store8(tmp, e);
        for (int j = 0; i + j < n; j++) { x[i + j] = tmp[j]; sum += tmp[j]; }
    }
    return sum;
}

static inline float max_of(const float *x, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline float dot(const float *a, const float *b, int n) {
    v8 acc = splat8(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int n) { // y += a*x
    v8 av = splat8(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + av * load8(x + i));
    for (; i < n; i++) y[i] += a * x[i];
}

// Small loops (decoding touches one row) stay serial: a parallel region costs more than they do.
#define PAR_MIN 4096

// One GEMM serves all three products of a linear layer:
//   out (N,M) += A (N,K) · Bm (K,M)
// A is read through strides (a_rs, a_cs), so it can be a transposed view; rows of Bm are
// contiguous. The micro-kernel keeps a 6x16 block of out in registers and, for each k,
// broadcasts 6 entries of A against 16 of Bm. K and M are blocked so a KBxMB panel of Bm
// stays in cache while every row block passes over it.
#define GEMM_RB 6    // rows of out per micro-kernel
#define GEMM_KB 256  // k-block
#define GEMM_MB 256  // column block
static void gemm_acc(float *out, const float *A, size_t a_rs, size_t a_cs, const float *Bm, int N, int K, int M) {
#pragma omp parallel
    for (int kb = 0; kb < K; kb += GEMM_KB) {
        const int ke = kb + GEMM_KB < K ? kb + GEMM_KB : K;
#pragma omp for collapse(2) schedule(static)
        for (int mb = 0; mb < M; mb += GEMM_MB) {
            for (int n0 = 0; n0 < N; n0 += GEMM_RB) {
                const int me = mb + GEMM_MB < M ? mb + GEMM_MB : M;
                for (int m0 = mb; m0 < me; m0 += 16) {
                    if (n0 + GEMM_RB <= N && m0 + 16 <= me) {
                        v8 c[GEMM_RB][2];
                        for (int r = 0; r < GEMM_RB; r++) {
                            c[r][0] = load8(out + (size_t)(n0 + r) * M + m0);
                            c[r][1] = load8(out + (size_t)(n0 + r) * M + m0 + 8);
                        }
                        for (int k = kb; k < ke; k++) {
                            const v8 b0 = load8(Bm + (size_t)k * M + m0), b1 = load8(Bm + (size_t)k * M + m0 + 8);
                            const float *ak = A + (size_t)n0 * a_rs + (size_t)k * a_cs;
                            for (int r = 0; r < GEMM_RB; r++) {
                                const v8 a = splat8(ak[(size_t)r * a_rs]);
                                c[r][0] += a * b0;
                                c[r][1] += a * b1;
                            }
                        }
                        for (int r = 0; r < GEMM_RB; r++) {
                            store8(out + (size_t)(n0 + r) * M + m0, c[r][0]);
                            store8(out + (size_t)(n0 + r) * M + m0 + 8, c[r][1]);
                        }
                    } else { // ragged edge
                        for (int n = n0; n < N && n < n0 + GEMM_RB; n++)
                            for (int m = m0; m < me && m < m0 + 16; m++) {
                                float s = out[(size_t)n * M + m];
                                for (int k = kb; k < ke; k++) s += A[(size_t)n * a_rs + (size_t)k * a_cs] * Bm[(size_t)k * M + m];
                                out[(size_t)n * M + m] = s;
                            }
                    }
                }
            }
        }
    }
}

// dst (C,OC) = srcᵀ, src (OC,C); blocked so both sides stay in cache
static void transpose(float *dst, const float *src, int rows, int cols) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int r0 = 0; r0 < rows; r0 += 32)
        for (int c0 = 0; c0 < cols; c0 += 32)
            for (int r = r0; r < rows && r < r0 + 32; r++)
                for (int c = c0; c < cols && c < c0 + 32; c++) dst[(size_t)c * rows + r] = src[(size_t)r * cols + c];
}
#endif
