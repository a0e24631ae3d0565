// ctxkv/simd.h: performance-only code of the CPU program: 8-lane float vectors and the widest
// the ISA has (GCC/Clang vector extensions, so -march=native picks AVX2 or AVX-512 and no
// intrinsics are needed), exp on 8 lanes, dot/axpy, and the packed GEMM with its micro-kernel.
// Nothing here is needed to understand the model: each function equals a plain loop, and
// test_ctxkv.c checks it against that loop ("simd kernels").
#ifndef CTXKV_SIMD_H
#define CTXKV_SIMD_H
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

// GCC/Clang vector extensions give 8-wide SIMD without -ffast-math (which breaks exact GELU,
// see doc/model.md); loads are unaligned.

typedef float v8 __attribute__((vector_size(32)));
static inline v8 load8(const float *p) { v8 r; memcpy(&r, p, sizeof r); return r; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline v8 splat8(float a) { return (v8){a, a, a, a, a, a, a, a}; }
// the first n <= 8 floats, the rest of the lanes 0 (a loop's tail through the same lanes), and back
static inline v8 load8_n(const float *p, int n) {
    if (n >= 8) return load8(p);
    float t[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    memcpy(t, p, (size_t)n * sizeof(float));
    return load8(t);
}
static inline void store8_n(float *p, v8 x, int n) {
    if (n >= 8) { store8(p, x); return; }
    float t[8];
    store8(t, x);
    memcpy(p, t, (size_t)n * sizeof(float));
}
typedef float v4 __attribute__((vector_size(16)));
// ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)), in three vector adds
static inline float hsum8(v8 a) {
    v4 t = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    t = t + __builtin_shufflevector(t, t, 1, 1, 3, 3);
    return t[0] + t[2];
}

// lane j = the sum of a_j's eight lanes, for eight vectors at once (a transpose by pairwise adds:
// the sum of x_j is ((x_j0 + x_j1) + (x_j2 + x_j3)) + ((x_j4 + x_j5) + (x_j6 + x_j7)))
static inline v8 hadd8(v8 x, v8 y) { // [x0+x1, x2+x3, y0+y1, y2+y3, x4+x5, x6+x7, y4+y5, y6+y7]
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
}
static inline v8 hsum8x8(v8 a0, v8 a1, v8 a2, v8 a3, v8 a4, v8 a5, v8 a6, v8 a7) {
    const v8 q0 = hadd8(hadd8(a0, a1), hadd8(a2, a3)), q1 = hadd8(hadd8(a4, a5), hadd8(a6, a7));
    return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// The widest vector -march=native offers: 16 lanes under AVX-512, else the 8 above. The GEMM's
// micro-kernel is written in it, and so is dot_3x8 (batched decoding's products under AVX-512).
// A 16-lane load reads one cache line only from an aligned address: every allocation is
// (ALLOC_ALIGN, ctxkv/utils.h).
#ifdef __AVX512F__
typedef float vw __attribute__((vector_size(64)));
static inline vw splatw(float a) { return (vw){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a}; }
#else
typedef v8 vw;
static inline vw splatw(float a) { return splat8(a); }
#endif
#define VW_LANES ((int)(sizeof(vw) / sizeof(float)))
static inline vw loadw(const float *p) { vw r; memcpy(&r, p, sizeof r); return r; }
static inline void storew(float *p, vw x) { memcpy(p, &x, sizeof x); }

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
// softmax calls exp B·T·V times per step, and libm's scalar exp dominated the profile; decoding
// samples with it V times per sequence per step, so its operations are counted:
//   n = round(x·log2 e) by adding 1.5·2^23, which leaves n in the low bits of the sum (|x·log2 e|
//   <= 128 after the clamp, far below 2^22), and 2^n is n + 127 put into the exponent field.
//   A NaN passes both clamps (each comparison is false), so p and the result are NaN.
static inline v8 exp8(v8 x) {
    const v8 hi = splat8(88.3762626647949f), lo = splat8(-87.3365447504f), magic = splat8(12582912.0f); // 1.5·2^23
    x = select8(x > hi, hi, x);
    x = select8(x < lo, lo, x);
    const v8 t = x * splat8(1.44269504088896341f) + magic;
    const v8 fn = t - magic; // round(x·log2 e), as a float
    v8i n, magic_bits;
    memcpy(&n, &t, sizeof n);
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    n -= magic_bits; // ... and as an integer
    x = x - fn * splat8(0.693359375f) - fn * splat8(-2.12194440e-4f);
    v8 p = splat8(1.9875691500e-4f);
    p = p * x + splat8(1.3981999507e-3f);
    p = p * x + splat8(8.3334519073e-3f);
    p = p * x + splat8(4.1665795894e-2f);
    p = p * x + splat8(1.6666665459e-1f);
    p = p * x + splat8(5.0000001201e-1f);
    p = p * (x * x) + x + splat8(1.0f);
    v8i bits = (n + 127) << 23; // 2^n as a float's exponent field
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// erf on 8 lanes, within about 2 ulp of erf in double (test_ctxkv.c checks it), for GELU, whose
// F·B·T scalar erff calls per layer were a fifth of a pythia-14m prefill. Two fits, made for this
// (least squares in relative error on Chebyshev nodes: .venv/bin/python dev/fit_erf.py):
//   |x| < 1:      erf(x) = x · P(x²), P of degree 6, summed as x + x·(P − 1)
//   1 <= |x| < 4: erf(x) = ±(1 − exp(−x²) · R(1/(1 + |x|))), R of degree 8 (erfc · exp(x²) is smooth)
//   |x| >= 4:     ±1 (erfc(4) = 1.5e-8 rounds away next to 1)
// NaN stays NaN (the clamp is written so that a NaN passes it).
static inline v8 erf8(v8 x) {
    v8i bits;
    memcpy(&bits, &x, sizeof bits);
    const v8i sign = bits & (int)0x80000000, abits = bits & 0x7fffffff;
    v8 ax;
    memcpy(&ax, &abits, sizeof ax);
    const v8 s = x * x;
    v8 p = splat8(7.898210208e-05f);
    p = p * s + splat8(-8.024354129e-04f);
    p = p * s + splat8(5.190053578e-03f);
    p = p * s + splat8(-2.685480854e-02f);
    p = p * s + splat8(1.128361243e-01f);
    p = p * s + splat8(-3.761262884e-01f);
    p = p * s + splat8(1.283791665e-01f); // 2/√π − 1: erf(x) = x + x·p rounds better than x · (2/√π + ...)
    const v8 small = x + x * p;
    const v8 a = select8(ax > splat8(4.0f), splat8(4.0f), ax);
    const v8 t = splat8(1.0f) / (splat8(1.0f) + a);
    v8 r = splat8(1.034081484e+00f);
    r = r * t + splat8(-3.497110786e+00f);
    r = r * t + splat8(4.798867069e+00f);
    r = r * t + splat8(-2.997122264e+00f);
    r = r * t + splat8(3.672319373e-01f);
    r = r * t + splat8(1.637470446e-01f);
    r = r * t + splat8(5.778180570e-01f);
    r = r * t + splat8(5.632833336e-01f);
    r = r * t + splat8(2.658856063e-05f);
    const v8 big = splat8(1.0f) - exp8(-(a * a)) * r; // erf(|x|)
    v8i bigbits;
    memcpy(&bigbits, &big, sizeof bigbits);
    bigbits |= sign;
    v8 signed_big;
    memcpy(&signed_big, &bigbits, sizeof signed_big);
    return select8(ax < splat8(1.0f), small, signed_big);
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

// Σ exp(x[i] − shift) without storing the exps: the same sum as exp_shift_sum (the same lanes
// in the same order), for a logsumexp that leaves x as it is
static inline float sum_exp_shift(const float *x, int n, float shift) {
    v8 acc = splat8(0.0f), sh = splat8(shift);
    int i = 0;
    for (; i + 8 <= n; i += 8) acc += exp8(load8(x + i) - sh);
    float sum = hsum8(acc);
    if (i < n) {
        float tmp[8];
        for (int j = 0; j < 8; j++) tmp[j] = i + j < n ? x[i + j] - shift : -INFINITY;
        v8 e = exp8(load8(tmp));
        store8(tmp, e);
        for (int j = 0; i + j < n; j++) sum += tmp[j];
    }
    return sum;
}

// dst[i] = exp((x[i] − shift) · scale) for n entries; returns their sum (sampling at a temperature)
static inline float exp_scaled_sum(float *dst, const float *x, int n, float shift, float scale) {
    v8 acc = splat8(0.0f);
    const v8 sh = splat8(shift), sc = splat8(scale);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        v8 e = exp8((load8(x + i) - sh) * sc);
        store8(dst + i, e);
        acc += e;
    }
    float sum = hsum8(acc);
    for (; i < n; i++) { dst[i] = expf((x[i] - shift) * scale); sum += dst[i]; }
    return sum;
}

// the largest of x[0..n) (NaN entries are passed over, as by `x > m ? x : m`): two 8-lane running
// maxima, so that the compare-and-select chains of a vocabulary row overlap
static inline float max_of(const float *x, int n) {
    v8 m0 = splat8(-INFINITY), m1 = m0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const v8 a = load8(x + i), b = load8(x + i + 8);
        m0 = select8(a > m0, a, m0);
        m1 = select8(b > m1, b, m1);
    }
    m0 = select8(m1 > m0, m1, m0);
    float m = -INFINITY;
    for (int j = 0; j < 8; j++) m = m0[j] > m ? m0[j] : m;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

// Σ x[0..n) in float: four 8-lane sums, then across lanes (sampling's block sums)
static inline float sum_of(const float *x, int n) {
    v8 s0 = splat8(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 += load8(x + i);
        s1 += load8(x + i + 8);
        s2 += load8(x + i + 16);
        s3 += load8(x + i + 24);
    }
    for (; i + 8 <= n; i += 8) s0 += load8(x + i);
    float s = hsum8((s0 + s1) + (s2 + s3));
    for (; i < n; i++) s += x[i];
    return s;
}

// Σ (x[i] − m)² over x[0..n), in float: the same lanes as sum_of (LayerNorm's variance)
static inline float sum_sq_dev(const float *x, int n, float m) {
    const v8 mv = splat8(m);
    v8 s0 = splat8(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        const v8 d0 = load8(x + i) - mv, d1 = load8(x + i + 8) - mv, d2 = load8(x + i + 16) - mv, d3 = load8(x + i + 24) - mv;
        s0 += d0 * d0;
        s1 += d1 * d1;
        s2 += d2 * d2;
        s3 += d3 * d3;
    }
    for (; i + 8 <= n; i += 8) {
        const v8 d = load8(x + i) - mv;
        s0 += d * d;
    }
    float s = hsum8((s0 + s1) + (s2 + s3));
    for (; i < n; i++) s += (x[i] - m) * (x[i] - m);
    return s;
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

// Reads one float of every cache line of N rows of C floats (rows xs apart), so that rows which
// a kernel would visit in a scattered order come from memory in one sequential sweep. (Software
// prefetches of the same lines did not help: the loads must complete.)
static inline void touch_rows(const float *x, size_t xs, int C, int N) {
    float sum = 0.0f;
    for (int n = 0; n < N; n++) {
        const float *r = x + (size_t)n * xs;
        for (int i = 0; i < C; i += 16) sum += r[i];
        sum += r[C - 1]; // the last line, when the row does not start on one
    }
    volatile float keep = sum; // the loads must happen
    (void)keep;
}

// Asks for n floats from p into the cache, one request per 64-byte line (a hint: never faults)
static inline void prefetch_floats(const float *p, int n) {
    for (int i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

// out[n*out_stride] = bias + x_n · w (C floats) for the N rows x_n of x (rows xs floats apart):
// one weight row against eight (then four) rows at a time, from registers, so that decoding's
// products load each weight once from memory (the rest of the rows find it in L1); eight
// independent sums keep both FMA pipes busy. (The cached attention uses it the other way round:
// one query against eight cached keys, xs = a cache slot apart.)
static inline void dot_rows(float *out, size_t out_stride, const float *x, size_t xs, int C, const float *w, int N, float bias) {
    int n = 0;
    if (C % 8 == 0)
        for (; n + 8 <= N; n += 8) {
            const float *x0 = x + (size_t)n * xs;
            v8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int i = 0; i < C; i += 8) {
                const v8 wv = load8(w + i);
                a0 += wv * load8(x0 + i);
                a1 += wv * load8(x0 + xs + i);
                a2 += wv * load8(x0 + 2 * xs + i);
                a3 += wv * load8(x0 + 3 * xs + i);
                a4 += wv * load8(x0 + 4 * xs + i);
                a5 += wv * load8(x0 + 5 * xs + i);
                a6 += wv * load8(x0 + 6 * xs + i);
                a7 += wv * load8(x0 + 7 * xs + i);
            }
            const v8 sum = hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7) + splat8(bias);
            for (int j = 0; j < 8; j++) out[(size_t)(n + j) * out_stride] = sum[j];
        }
    for (; n + 4 <= N; n += 4) {
        const float *x0 = x + (size_t)n * xs, *x1 = x0 + xs, *x2 = x1 + xs, *x3 = x2 + xs;
        v8 a0 = splat8(0.0f), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 8 <= C; i += 8) {
            const v8 wv = load8(w + i);
            a0 += wv * load8(x0 + i);
            a1 += wv * load8(x1 + i);
            a2 += wv * load8(x2 + i);
            a3 += wv * load8(x3 + i);
        }
        float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
        for (; i < C; i++) { s0 += w[i] * x0[i]; s1 += w[i] * x1[i]; s2 += w[i] * x2[i]; s3 += w[i] * x3[i]; }
        out[(size_t)n * out_stride] = s0 + bias;
        out[(size_t)(n + 1) * out_stride] = s1 + bias;
        out[(size_t)(n + 2) * out_stride] = s2 + bias;
        out[(size_t)(n + 3) * out_stride] = s3 + bias;
    }
    for (; n < N; n++) out[(size_t)n * out_stride] = dot(x + (size_t)n * xs, w, C) + bias;
}

// Keeps v in a register from here on (an empty asm that "changes" it): without it GCC folds
// dot_3x4's weight loads (dot_3x8's input loads) into the FMAs, loading each once per use, not
// once. (x86 with AVX: "v" is any vector register, the 32 of AVX-512 included; elsewhere a no-op)
#if defined(__GNUC__) && defined(__AVX__)
#define KEEP_IN_REGISTER(v) __asm__("" : "+v"(v))
#else
#define KEEP_IN_REGISTER(v) ((void)0)
#endif

// out[n*out_stride + j] = b[j] + x_n · w_j for three weight rows w_j (C floats apart) and four
// input rows x_n (xs apart), C a multiple of 8: twelve independent sums (an FMA takes 4 cycles
// and two issue per cycle, so 8 must be in flight) from 3 + 4 loads per 12 FMAs, where dot_rows
// takes 9 loads per 8. The few-row products with four rows or more (batched decoding) use it.
static inline void dot_3x4(float *out, size_t out_stride, const float *x, size_t xs, int C, const float *w, const float b[3]) {
    const float *w0 = w, *w1 = w + C, *w2 = w + 2 * (size_t)C;
    const float *x0 = x, *x1 = x + xs, *x2 = x1 + xs, *x3 = x2 + xs;
    v8 s00 = splat8(0.0f), s01 = s00, s02 = s00, s03 = s00; // s_jn: weight row j, input row n
    v8 s10 = s00, s11 = s00, s12 = s00, s13 = s00, s20 = s00, s21 = s00, s22 = s00, s23 = s00;
    for (int i = 0; i < C; i += 8) {
        v8 u0 = load8(w0 + i), u1 = load8(w1 + i), u2 = load8(w2 + i), t;
        KEEP_IN_REGISTER(u0);
        KEEP_IN_REGISTER(u1);
        KEEP_IN_REGISTER(u2);
        t = load8(x0 + i); KEEP_IN_REGISTER(t); s00 += u0 * t; s10 += u1 * t; s20 += u2 * t;
        t = load8(x1 + i); KEEP_IN_REGISTER(t); s01 += u0 * t; s11 += u1 * t; s21 += u2 * t;
        t = load8(x2 + i); KEEP_IN_REGISTER(t); s02 += u0 * t; s12 += u1 * t; s22 += u2 * t;
        t = load8(x3 + i); KEEP_IN_REGISTER(t); s03 += u0 * t; s13 += u1 * t; s23 += u2 * t;
    }
    const v8 r01 = hsum8x8(s00, s01, s02, s03, s10, s11, s12, s13), r2 = hsum8x8(s20, s21, s22, s23, s20, s21, s22, s23);
    for (int n = 0; n < 4; n++) {
        out[n * out_stride] = r01[n] + b[0];
        out[n * out_stride + 1] = r01[4 + n] + b[1];
        out[n * out_stride + 2] = r2[n] + b[2];
    }
}

#ifdef __AVX512F__
// The same in 16 lanes against eight input rows (C a multiple of 16): 24 sums, 3 + 8 loads per
// 24 FMAs, in 28 of the 32 vector registers AVX-512 has (8 lanes have 16: that is why dot_3x4
// stops at four rows). Lane sums fold to 8 lanes, then go through hsum8x8.
static inline v8 fold16(vw a) {
    return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
}
static inline v8 hsum16x8(const vw s[8]) {
    return hsum8x8(fold16(s[0]), fold16(s[1]), fold16(s[2]), fold16(s[3]), fold16(s[4]), fold16(s[5]), fold16(s[6]), fold16(s[7]));
}
static inline void dot_3x8(float *out, size_t out_stride, const float *x, size_t xs, int C, const float *w, const float b[3]) {
    const float *w0 = w, *w1 = w + C, *w2 = w + 2 * (size_t)C;
    vw s0[8], s1[8], s2[8]; // s_j[n]: weight row j, input row n
#pragma GCC unroll 8
    for (int n = 0; n < 8; n++) s0[n] = s1[n] = s2[n] = splatw(0.0f);
    for (int i = 0; i < C; i += 16) {
        const vw u0 = loadw(w0 + i), u1 = loadw(w1 + i), u2 = loadw(w2 + i);
#pragma GCC unroll 8
        for (int n = 0; n < 8; n++) {
            vw t = loadw(x + n * xs + i);
            KEEP_IN_REGISTER(t);
            s0[n] += u0 * t;
            s1[n] += u1 * t;
            s2[n] += u2 * t;
        }
    }
    const v8 r0 = hsum16x8(s0), r1 = hsum16x8(s1), r2 = hsum16x8(s2);
    for (int n = 0; n < 8; n++) {
        out[n * out_stride] = r0[n] + b[0];
        out[n * out_stride + 1] = r1[n] + b[1];
        out[n * out_stride + 2] = r2[n] + b[2];
    }
}
#endif

// out (N,OC) = bias + x (N,C) · wᵀ for a few rows N (decoding's products, up to batch 16): the
// weights stream from memory once for all N rows, three rows at a time against eight input rows
// (dot_3x8, AVX-512 only) and four (dot_3x4) where there are that many, else one row at a time
// (dot_rows). dot_3x8 with aligned allocations took batch 8's generation from 4414 to 4982
// tok/s (medians of 8 runs alternating with the dot_3x4-only build; pythia-14m, 2 threads, Zen
// 5). The memory is asked for each triple of weight rows (or single row) whole, FEW_ROWS_AHEAD
// rows before its sums start, so that its lines arrive together and in time: the hardware
// prefetcher alone left batch 8's generation 1.5x slower, batch 1's 1.1x. Threads split the
// weight rows of large products.
#define FEW_ROWS_PAR (1u << 16) // N·C·OC from which threads pay (pythia-14m at batch 1: the MLP's products)
// pythia-14m on the Zen 5, medians of 20-30 runs alternating in one process: batch 8's generation
// at 0, 12, 18 and 24 rows ahead took 370, 327, 326, 339 ms (the AVX2 build there 402, 376, 391
// at 0, 12, 24); batch 1's with none, 12 and 24 ahead 223, 199, 202 ms. (The triple about to be
// summed had been best with the slower 8-lane kernel alone, on a Zen 4.)
#define FEW_ROWS_AHEAD 12
static void few_rows_matmul(float *out, const float *x, const float *w, const float *bias, int N, int C, int OC) {
    const int triples = N >= 4 && C % 8 == 0 ? OC / 3 : 0, N4 = N / 4 * 4;
#pragma omp parallel if ((size_t)N * C * OC >= FEW_ROWS_PAR)
    {
#pragma omp for schedule(static) nowait
        for (int g = 0; g < triples; g++) {
            const int o = 3 * g;
            const float b[3] = {bias ? bias[o] : 0.0f, bias ? bias[o + 1] : 0.0f, bias ? bias[o + 2] : 0.0f};
            if (o + FEW_ROWS_AHEAD + 3 <= 3 * triples) prefetch_floats(w + (size_t)(o + FEW_ROWS_AHEAD) * C, 3 * C);
            int n = 0;
#ifdef __AVX512F__
            if (C % 16 == 0)
                for (; n + 8 <= N; n += 8) dot_3x8(out + (size_t)n * OC + o, OC, x + (size_t)n * C, C, C, w + (size_t)o * C, b);
#endif
            for (; n < N4; n += 4) dot_3x4(out + (size_t)n * OC + o, OC, x + (size_t)n * C, C, C, w + (size_t)o * C, b);
            for (int j = 0; j < 3 && N4 < N; j++)
                dot_rows(out + (size_t)N4 * OC + o + j, OC, x + (size_t)N4 * C, C, C, w + (size_t)(o + j) * C, N - N4, b[j]);
        }
#pragma omp for schedule(static)
        for (int o = 3 * triples; o < OC; o++) {
            if (o + FEW_ROWS_AHEAD < OC) prefetch_floats(w + (size_t)(o + FEW_ROWS_AHEAD) * C, C);
            dot_rows(out + o, OC, x, C, C, w + (size_t)o * C, N, bias ? bias[o] : 0.0f);
        }
    }
}

// y (C floats) += Σ_n a[n] · x_n over the N rows x_n of x (rows xs floats apart): 32 floats of
// y at a time stay in registers over all rows (two sums each, for even and odd n, so that the
// FMA chains overlap), so each row's half-KB is read in one go; then 8 at a time, then the rest.
// The cached attention's Σ_s p_s · v_s.
static inline void rows_axpy(float *y, const float *a, const float *x, size_t xs, int C, int N) {
    int i = 0;
    for (; i + 32 <= C; i += 32) {
        v8 e0 = splat8(0.0f), e1 = e0, e2 = e0, e3 = e0, o0 = e0, o1 = e0, o2 = e0, o3 = e0;
        int n = 0;
        for (; n + 2 <= N; n += 2) {
            const float *r = x + (size_t)n * xs + i, *q = r + xs;
            const v8 pe = splat8(a[n]), po = splat8(a[n + 1]);
            e0 += pe * load8(r);
            e1 += pe * load8(r + 8);
            e2 += pe * load8(r + 16);
            e3 += pe * load8(r + 24);
            o0 += po * load8(q);
            o1 += po * load8(q + 8);
            o2 += po * load8(q + 16);
            o3 += po * load8(q + 24);
        }
        if (n < N) {
            const float *r = x + (size_t)n * xs + i;
            const v8 pe = splat8(a[n]);
            e0 += pe * load8(r);
            e1 += pe * load8(r + 8);
            e2 += pe * load8(r + 16);
            e3 += pe * load8(r + 24);
        }
        store8(y + i, load8(y + i) + (e0 + o0));
        store8(y + i + 8, load8(y + i + 8) + (e1 + o1));
        store8(y + i + 16, load8(y + i + 16) + (e2 + o2));
        store8(y + i + 24, load8(y + i + 24) + (e3 + o3));
    }
    for (; i + 8 <= C; i += 8) {
        v8 e = splat8(0.0f), o = e;
        int n = 0;
        for (; n + 2 <= N; n += 2) {
            e += splat8(a[n]) * load8(x + (size_t)n * xs + i);
            o += splat8(a[n + 1]) * load8(x + (size_t)(n + 1) * xs + i);
        }
        if (n < N) e += splat8(a[n]) * load8(x + (size_t)n * xs + i);
        store8(y + i, load8(y + i) + (e + o));
    }
    for (int n = 0; n < N && i < C; n++) axpy(y + i, a[n], x + (size_t)n * xs + i, C - i);
}

// Small loops (decoding touches one row) stay serial: a parallel region costs more than they do.
#define PAR_MIN 4096

// One GEMM serves all three products of a linear layer, BLIS-style:
//   C (M,N) += A (M,K) · B (K,N)     (or C = bias + A·B, see gemm)
// A[i][k] is at A + i*a_rs + k*a_cs and B[k][j] at B + k*b_rs + j*b_cs, so either can be a
// transposed view (the weight as wᵀ, dout as doutᵀ) without a copy; C is row-major, N wide.
// Blocks of A (MC x KC) and B (KC x NC) are packed into contiguous panels of MR rows and NR
// columns (zero-padded at the edges), sized for the caches: a B micro-panel (KC x NR, 32 KB)
// stays in L1 while the A panels of the block (MC x KC, in L2) pass over it. The micro-kernel
// keeps an MR x NR tile of C in registers as MR x 2 vectors and, for each k, broadcasts MR
// entries of A against NR of B. Its shape is the ISA's, chosen at compile time by -march=native:
//   AVX2/FMA (16 vector registers):     6 x 16, twelve 8-lane accumulators;
//   AVX-512 (32 registers, 16 lanes):  12 x 32, twenty-four 16-lane accumulators.
// Both sum each C entry over k in order in one lane within a KC block, block after block.
// (Block sizes, AVX2: the fastest tried with dev/bench_gemm.c on a 2-core AMD EPYC, Zen 3.
// AVX-512: KC 256 keeps the 32-wide B micro-panel at 32 KB; on a 2-core Zen 5, KC 128-512 and
// MR 8-14 all measured within the noise, 12 x 32 at 290-330 GFLOP/s.) Threads split the larger
// of M and N into contiguous ranges; each packs its own panels. Packing reads the panel's
// source rows (or columns) side by side and writes the panel in order: writing it one source
// row at a time, every 6th (16th) float, made packing 29% of the head's dinp product
// (dev/bench_gemm.c, AVX2: 105-112 -> 123 GFLOP/s there, and the geometric mean of the 30
// ratios 1.03-1.14 -> 1.09-1.20 in two runs).
#ifdef __AVX512F__
#ifndef GEMM_MR
#define GEMM_MR 12
#endif
#ifndef GEMM_KC
#define GEMM_KC 256
#endif
#ifndef GEMM_MC
#define GEMM_MC 144
#endif
#else
#ifndef GEMM_MR
#define GEMM_MR 6
#endif
#ifndef GEMM_KC // block sizes (the -D overrides are for tuning with dev/bench_gemm.c)
#define GEMM_KC 512
#endif
#ifndef GEMM_MC
#define GEMM_MC 72
#endif
#endif
#define GEMM_NR (2 * VW_LANES)
#ifndef GEMM_NC
#define GEMM_NC 2048
#endif

// rows [i0, i0+mc) x k [k0, k0+kc) of A into panels of MR rows: panel p, step k holds MR floats
static void gemm_pack_a(float *dst, const float *A, size_t a_rs, size_t a_cs, int i0, int mc, int k0, int kc) {
    const int MR = GEMM_MR;
    if (a_rs == 1) { // A is a transposed view: at each k a panel's MR rows are contiguous
        int p = 0;
        for (; p + MR <= mc; p += MR) { // a panel at a time, written in order (k-major over the block was slower)
            float *d = dst + (size_t)p * kc;
            const float *src = A + (size_t)i0 + p + (size_t)k0 * a_cs;
            for (int k = 0; k < kc; k++, d += MR, src += a_cs)
                for (int r = 0; r < MR; r++) d[r] = src[r];
        }
        if (p < mc) { // the last, partial panel, zero-padded (one loop for both, with r < rows, made the dW products 1-8% slower)
            float *d = dst + (size_t)p * kc;
            const float *src = A + (size_t)i0 + p + (size_t)k0 * a_cs;
            for (int k = 0; k < kc; k++, d += MR, src += a_cs)
                for (int r = 0; r < MR; r++) d[r] = p + r < mc ? src[r] : 0.0f;
        }
        return;
    }
    for (int p = 0; p < mc; p += MR) {
        const int rows = mc - p < MR ? mc - p : MR;
        float *d = dst + (size_t)p * kc;
        if (rows == MR && a_cs == 1) { // the panel's rows read side by side, the panel written in order
            const float *src[GEMM_MR];
            for (int r = 0; r < MR; r++) src[r] = A + (size_t)(i0 + p + r) * a_rs + k0;
            for (int k = 0; k < kc; k++, d += MR)
                for (int r = 0; r < MR; r++) d[r] = src[r][k];
            continue;
        }
        for (int r = 0; r < MR; r++) {
            const float *src = A + (size_t)(i0 + p + r) * a_rs + (size_t)k0 * a_cs;
            for (int k = 0; k < kc; k++) d[(size_t)k * MR + r] = r < rows ? src[(size_t)k * a_cs] : 0.0f;
        }
    }
}

// k [k0, k0+kc) x columns [j0, j0+nc) of B into panels of NR columns: panel p, step k holds NR floats
static void gemm_pack_b(float *dst, const float *B, size_t b_rs, size_t b_cs, int k0, int kc, int j0, int nc) {
    const int NR = GEMM_NR;
    for (int p = 0; p < nc; p += NR) {
        const int cols = nc - p < NR ? nc - p : NR;
        float *d = dst + (size_t)p * kc;
        if (b_cs == 1) {
            for (int k = 0; k < kc; k++) {
                const float *src = B + (size_t)(k0 + k) * b_rs + j0 + p;
                if (cols == NR) {
                    memcpy(d + (size_t)k * NR, src, NR * sizeof(float));
                } else {
                    for (int j = 0; j < NR; j++) d[(size_t)k * NR + j] = j < cols ? src[j] : 0.0f;
                }
            }
        } else { // B is a transposed view (the weight): each column is a contiguous run of k
            if (cols == NR && b_rs == 1) { // the panel's columns read side by side, the panel written in order
                const float *src[GEMM_NR];
                for (int j = 0; j < NR; j++) src[j] = B + (size_t)(j0 + p + j) * b_cs + k0;
                for (int k = 0; k < kc; k++)
                    for (int j = 0; j < NR; j++) d[(size_t)k * NR + j] = src[j][k];
                continue;
            }
            for (int j = 0; j < NR; j++) {
                const float *src = B + (size_t)(j0 + p + j) * b_cs + (size_t)k0 * b_rs;
                for (int k = 0; k < kc; k++) d[(size_t)k * NR + j] = j < cols ? src[(size_t)k * b_rs] : 0.0f;
            }
        }
    }
}

// C[0..rows)[0..cols) (rows ldc apart) += a (kc x MR, packed) · b (kc x NR, packed); with
// overwrite, C = bias (the tile's columns, or 0 when NULL) + a · b instead: C is not read
static inline void gemm_micro(int kc, const float *a, const float *b, float *c, size_t ldc, int rows, int cols, int overwrite,
                              const float *bias) {
    const int L = VW_LANES;
    vw acc[GEMM_MR][2];
    for (int r = 0; r < GEMM_MR; r++) acc[r][0] = acc[r][1] = splatw(0.0f);
    for (int k = 0; k < kc; k++, a += GEMM_MR, b += GEMM_NR) {
        const vw b0 = loadw(b), b1 = loadw(b + L);
#pragma GCC unroll 16
        for (int r = 0; r < GEMM_MR; r++) {
            const vw av = splatw(a[r]);
            acc[r][0] += av * b0;
            acc[r][1] += av * b1;
        }
    }
    if (rows == GEMM_MR && cols == GEMM_NR) {
        const vw z = splatw(0.0f), b0 = bias ? loadw(bias) : z, b1 = bias ? loadw(bias + L) : z;
        for (int r = 0; r < GEMM_MR; r++) {
            storew(c + r * ldc, (overwrite ? b0 : loadw(c + r * ldc)) + acc[r][0]);
            storew(c + r * ldc + L, (overwrite ? b1 : loadw(c + r * ldc + L)) + acc[r][1]);
        }
    } else { // an edge tile: only the part inside C
        float tile[GEMM_MR][GEMM_NR];
        for (int r = 0; r < GEMM_MR; r++) { storew(tile[r], acc[r][0]); storew(tile[r] + L, acc[r][1]); }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < cols; j++) c[r * ldc + j] = (overwrite ? (bias ? bias[j] : 0.0f) : c[r * ldc + j]) + tile[r][j];
    }
}

// Each thread keeps its panels between calls: freeing multi-MB blocks every call made the
// allocator return them to the kernel and fault them back in (page faults and TLB shootdowns
// were ~15% of a pythia-70m step). Grown as needed; gemm_release_panels frees them (model_free).
#define GEMM_MAX_THREADS 256
static float *gemm_panel_mem[GEMM_MAX_THREADS];
static size_t gemm_panel_cap[GEMM_MAX_THREADS];

static float *gemm_panels(int thread, size_t floats) {
    if (floats > gemm_panel_cap[thread]) {
        free(gemm_panel_mem[thread]);
        gemm_panel_mem[thread] = (float *)malloc_check(floats * sizeof(float), "gemm panels");
        gemm_panel_cap[thread] = floats;
    }
    return gemm_panel_mem[thread];
}

static void gemm_release_panels(void) {
    for (int t = 0; t < GEMM_MAX_THREADS; t++) {
        free(gemm_panel_mem[t]);
        gemm_panel_mem[t] = NULL;
        gemm_panel_cap[t] = 0;
    }
}

// (fuzz builds: after die() the harness has freed every block, these too)
__attribute__((unused)) static void gemm_forget_panels(void) {
    memset(gemm_panel_mem, 0, sizeof gemm_panel_mem);
    memset(gemm_panel_cap, 0, sizeof gemm_panel_cap);
}

// the sequential GEMM on rows [i0, i1) and columns [j0, j1) of C
static void gemm_range(float *C, const float *A, size_t a_rs, size_t a_cs, const float *B, size_t b_rs, size_t b_cs, int K,
                       int N, int i0, int i1, int j0, int j1, int overwrite, const float *bias, int thread) {
    const int MR = GEMM_MR, NR = GEMM_NR;
    const int mc_max = i1 - i0 < GEMM_MC ? (i1 - i0 + MR - 1) / MR * MR : GEMM_MC;
    const int nc_max = j1 - j0 < GEMM_NC ? (j1 - j0 + NR - 1) / NR * NR : GEMM_NC;
    const int kc_max = K < GEMM_KC ? K : GEMM_KC;
    const int own = thread < GEMM_MAX_THREADS; // else (a very wide machine) this call's own blocks
    const size_t n_ap = (size_t)mc_max * kc_max, n_all = n_ap + (size_t)nc_max * kc_max;
    float *Ap = own ? gemm_panels(thread, n_all) : (float *)malloc_check(n_all * sizeof(float), "gemm panels"), *Bp = Ap + n_ap;
    for (int jc = j0; jc < j1; jc += GEMM_NC) {
        const int nc = j1 - jc < GEMM_NC ? j1 - jc : GEMM_NC;
        for (int pc = 0; pc < K; pc += GEMM_KC) {
            const int kc = K - pc < GEMM_KC ? K - pc : GEMM_KC;
            gemm_pack_b(Bp, B, b_rs, b_cs, pc, kc, jc, nc);
            for (int ic = i0; ic < i1; ic += GEMM_MC) {
                const int mc = i1 - ic < GEMM_MC ? i1 - ic : GEMM_MC;
                gemm_pack_a(Ap, A, a_rs, a_cs, ic, mc, pc, kc);
                for (int jr = 0; jr < nc; jr += NR)
                    for (int ir = 0; ir < mc; ir += MR)
                        gemm_micro(kc, Ap + (size_t)ir * kc, Bp + (size_t)jr * kc, C + (size_t)(ic + ir) * N + jc + jr, (size_t)N,
                                   mc - ir < MR ? mc - ir : MR, nc - jr < NR ? nc - jr : NR, overwrite && pc == 0,
                                   bias ? bias + jc + jr : NULL);
            }
        }
    }
    if (!own) free(Ap);
}

// C += A·B (overwrite 0), or C = bias + A·B (overwrite 1; bias (N) or NULL for none): then C is
// only written, never read, which saves a pass over a large output (the vocabulary head's)
static void gemm(float *C, const float *A, size_t a_rs, size_t a_cs, const float *B, size_t b_rs, size_t b_cs, int M, int K, int N,
                 int overwrite, const float *bias) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { // nothing to add; an overwrite still sets C
        if (overwrite)
            for (int i = 0; i < M; i++)
                for (int j = 0; j < N; j++) C[(size_t)i * N + j] = bias ? bias[j] : 0.0f;
        return;
    }
    // small products stay on one thread: a parallel region costs more than they do
    const int parallel = (double)M * N * K >= (double)(1 << 18);
    (void)parallel; // (read only by the pragma: unused without OpenMP)
    // split the larger dimension, in whole panels, so that each thread has contiguous work
    const int by_rows = (M + GEMM_MR - 1) / GEMM_MR >= (N + GEMM_NR - 1) / GEMM_NR;
#pragma omp parallel if (parallel)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int unit = by_rows ? GEMM_MR : GEMM_NR, len = by_rows ? M : N;
        const int units = (len + unit - 1) / unit, per = (units + nt - 1) / nt;
        const int lo = t * per * unit < len ? t * per * unit : len, hi = (t + 1) * per * unit < len ? (t + 1) * per * unit : len;
        if (lo < hi) {
            if (by_rows) gemm_range(C, A, a_rs, a_cs, B, b_rs, b_cs, K, N, lo, hi, 0, N, overwrite, bias, t);
            else gemm_range(C, A, a_rs, a_cs, B, b_rs, b_cs, K, N, 0, M, lo, hi, overwrite, bias, t);
        }
    }
}
#endif
