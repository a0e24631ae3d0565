// ctxkv/utils.h: errors that name what went wrong, checked allocation and file I/O, atomic file
// writes, the clock, the RNG and small integer helpers. Shared by train_ctxkv.c and train_ctxkv.cu
// (C gnu11 and C++ under nvcc), as llm.c's llmc/utils.h.
#ifndef CTXKV_UTILS_H
#define CTXKV_UTILS_H
#include <ctype.h>
#include <errno.h>
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <stb_ds.h> // (-isystem its folder: STB_DIR in the Makefile); the implementation is in the program (STB_DS_IMPLEMENTATION)

#define IGNORE_INDEX (-100) // target id meaning "no loss here" (HF's ignore_index)
#define HEADER_INTS 256     // every file format starts with 256 int32 (llm.c's convention)

#ifdef FUZZING
// Fuzz builds only (dev/fuzz): the fuzz entry point sets die_jump, so that die() -- a clean
// rejection of bad input -- returns there instead of exiting; only memory errors and UB count.
#include <setjmp.h>
static jmp_buf *die_jump;
#endif

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
#ifdef FUZZING
    if (die_jump) longjmp(*die_jump, 1);
#endif
    exit(EXIT_FAILURE);
}

// Every block starts on a cache line (free() releases it as any other): malloc's 16-byte
// alignment left each 16-lane (64-byte) load of the AVX-512 kernels straddling two lines, which
// made them slower than the 8-lane ones (doc/model.md, "A few rows").
#define ALLOC_ALIGN 64
static void *malloc_check(size_t n, const char *what) {
    void *p = NULL;
    if (posix_memalign(&p, ALLOC_ALIGN, n ? n : 1) != 0) die("out of memory allocating %zu bytes for %s", n, what);
    return p;
}

static void *calloc_check(size_t n, const char *what) {
    void *p = malloc_check(n, what);
    memset(p, 0, n);
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
// (A PATH.tmp left by a crash is overwritten by the next atomic_open of PATH.)
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

// wall clock; the CUDA program synchronises before it reads it (model_sync)
static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// xorshift* RNG (as llm.c): deterministic across platforms for a given seed. Host side only, so
// both programs draw the same numbers (init, phase-1 noise, sampling).
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

static int round_up(int x, int m) { return (x + m - 1) / m * m; }

// header fields: floats by their bits, 64-bit values as two ints
static int float_bits(float f) { int i; memcpy(&i, &f, 4); return i; }
static float bits_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static void split64(int *h, uint64_t v) { h[0] = (int)(uint32_t)v; h[1] = (int)(uint32_t)(v >> 32); }
static uint64_t join64(const int *h) { return (uint64_t)(uint32_t)h[0] | ((uint64_t)(uint32_t)h[1] << 32); }

// DIR/NAME into buf, or a clear error when it does not fit
static void path_join(char *buf, size_t n, const char *dir, const char *name) {
    if ((size_t)snprintf(buf, n, "%s/%s", dir, name) >= n) die("path too long: '%s/%s'", dir, name);
}

// mkdir -p DIR, then check that a file can be written there
static void mkdir_p(const char *dir) {
    char buf[4096];
    if ((size_t)snprintf(buf, sizeof buf, "%s", dir) >= sizeof buf) die("--out path too long");
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') { *p = 0; mkdir(buf, 0755); *p = '/'; }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) die("--out: cannot create directory '%s' (%s)", dir, strerror(errno));
    char probe[4200];
    path_join(probe, sizeof probe, dir, ".write_test");
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
#endif
