/*
train_ctxkv.c: Pythia (GPT-NeoX) in one readable fp32 CPU file.

The model is Hugging Face's GPTNeoXForCausalLM, exactly (see doc/model.md):
  h0      = embed_in[ids]                                  no positional embedding
  x_{l+1} = x_l + Attn(LN_1(x_l)) + MLP(LN_2(x_l))         parallel residual, both LNs read x_l
  Attn    = fused QKV (interleaved per head), rotate-half RoPE on the first
            rotary_dims of each head, causal softmax, dense
  MLP     = dense_4h_to_h(GELU_erf(dense_h_to_4h(x)))
  logits  = embed_out · LN_f(x_L)                          untied, no bias

Every layer is a pair foo_forward / foo_backward. Backward functions ACCUMULATE (+=)
into their gradient buffers, so a tensor that is read twice (x_l feeds both LNs) needs
no special case. All parameters live in one allocation described by a table
(layout_params); so do the activations (layout_acts).

Shapes in comments: B batch, T time, C = n_embd, H heads, D head dim, R rotary dims,
F = n_inner (MLP width), V vocab, Vp padded vocab, L layers.

Build: make train_ctxkv.  Usage: ./train_ctxkv -h
*/
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
#ifdef _OPENMP
#include <omp.h>
#endif
#define STB_DS_IMPLEMENTATION
#include <stb/stb_ds.h>

// ----------------------------------------------------------------------------
// utilities: errors that name what went wrong, checked allocation and I/O

#define IGNORE_INDEX (-100)      // target id meaning "no loss here" (HF's ignore_index)

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

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// xorshift* RNG (as llm.c): deterministic across platforms for a given seed
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
// small vector helpers. GCC/Clang vector extensions give 8-wide SIMD without
// -ffast-math (which breaks exact GELU, see doc/model.md); loads are unaligned.

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
    Config c = {0};
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
// Parameters: one table of tensors, in checkpoint order (doc/formats.md)

typedef struct {
    float *ln1_w, *ln1_b;      // (C) input_layernorm
    float *ln2_w, *ln2_b;      // (C) post_attention_layernorm
    // attention: which of these exist depends on attn_type (doc/formats.md); the rest are NULL
    float *qkv_w, *qkv_b;      // mha (3C, C), (3C): row h*3D + s*D + j, s = 0 q, 1 k, 2 v (HF interleaved per head)
    float *q_w, *q_b;          // gqa/mqa (H*D, C), (H*D);  mla without q_rank: q_w (H*(D+dR), C), no bias
    float *kv_w, *kv_b;        // gqa/mqa (2*G*D, C), (2*G*D): K heads, then V heads
    float *q_a_w, *q_a_norm_w, *q_b_w; // mla with q_rank: (q_rank, C), (q_rank), (H*(D+dR), q_rank)
    float *kv_a_w, *kv_a_norm_w;       // mla: (kv_rank+dR, C) latent rows then k_R rows, (kv_rank)
    float *kv_b_w;                     // mla: (H*2D, kv_rank), per head [W_UK (D rows) | W_UV (D rows)]
    float *k_w, *k_b, *v_w, *v_b;      // ctxkv layer 0: (C, d_c), (C) each; its q_w/q_b are (C, C), (C)
    float *dense_w, *dense_b;  // (C, H*D), (C)
    float *fc_w, *fc_b;        // (F, C), (F) dense_h_to_4h
    float *proj_w, *proj_b;    // (C, F), (C) dense_4h_to_h
} LayerParams;

typedef struct {
    float *embed_in;           // (Vp, E), E = embed_dim
    // ContextBlock (ctxkv / ctxpythia): c_t = LN_c(c_{t-1} + GELU(W_c [c_{t-1}; LN_e(e_t)] + b_c))
    float *ctx_ln_e_w, *ctx_ln_e_b;    // (E)
    float *ctx_w, *ctx_b;              // (d_c, d_c + E), (d_c)
    float *ctx_ln_c_w, *ctx_ln_c_b;    // (d_c)
    LayerParams *layer;        // [L]
    float *lnf_w, *lnf_b;      // (C)
    float *embed_out;          // (Vp, C) untied head, no bias
} Params;

typedef struct {
    char name[48];
    size_t rows, cols;         // a 1-D tensor has rows == 1
    size_t offset;             // in floats, from the start of the parameter block
    int frozen;                // not updated (and not decayed) by the optimizer
} ParamTensor;

static int has_context_block(const Config *c) { return c->layer0_type == LAYER0_CTXKV || c->model_type == MODEL_CTXPYTHIA; }

// the attention kind of layer l: attn_type, except a ctxkv layer 0
static int layer_kind(const Config *c, int l) { return (l == 0 && c->layer0_type == LAYER0_CTXKV) ? ATTN_CTX : c->attn_type; }

// Walks the parameter order once. With base == NULL it only counts; otherwise it points
// every tensor of P into base. If table != NULL, appends a descriptor per tensor.
// This is the one place that defines the checkpoint order.
static size_t layout_params(const Config *c, float *base, Params *P, ParamTensor **table) {
    size_t off = 0;
    const size_t C = c->n_embd, F = c->n_inner, Vp = c->padded_vocab_size;
#define TENSOR(field, label, r, k)                                                                         \
    do {                                                                                                   \
        if (P) field = base ? base + off : NULL;                                                           \
        if (table) {                                                                                       \
            ParamTensor t_ = {.rows = (r), .cols = (k), .offset = off};                                    \
            snprintf(t_.name, sizeof t_.name, "%s", label);                                                \
            arrput(*table, t_);                                                                            \
        }                                                                                                  \
        off += (size_t)(r) * (k);                                                                          \
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
    return off;
}

// ----------------------------------------------------------------------------
// Activations: one allocation, sized for B*T, pointers set by layout_acts

// The attention's own activations. Which exist depends on attn_type; the others are NULL.
// Dq = D for mha/gqa/mqa, D + dR for mla (the query/key width of one head).
typedef struct {
    float *qkv;                        // mha (B,T,3C): q and k after RoPE, v as projected
    float *q;                          // gqa/mqa/mla (B,T,H*Dq): after RoPE (mla: on the last dR of each head)
    float *kv;                         // gqa/mqa (B,T,2*G*D): K heads (after RoPE) then V heads
    float *q_lat, *q_lat_norm, *q_lat_rstd; // mla with q_rank: (B,T,q_rank) x2, (B,T)
    float *kv_a;                       // mla (B,T,kv_rank+dR): raw latent | k_R after RoPE
    float *c_norm, *c_rstd;            // mla (B,T,kv_rank) the cached latent ĉ, (B,T)
    float *kvb;                        // mla (B,T,H*2D): per head [k_nope | v]
    float *k;                          // mla (B,T,H*Dq): per head [k_nope | k_pe], gathered for the core
    float *kc, *vc;                    // ctxkv (B,T,C): W_k c_s + b_k and W_v c_s + b_v for every position s
    float *att;                        // (B,H,T,T) softmax probabilities, zero above the diagonal;
                                       // ctxkv (B,H,T,M): one per context slot, zero for empty slots
    float *atty;                       // (B,T,H*D) attention output, heads merged, before dense
} AttnActs;

typedef struct {
    float *ln1, *ln1_mean, *ln1_rstd;  // (B,T,C), (B,T), (B,T)
    float *ln2, *ln2_mean, *ln2_rstd;  // (B,T,C), (B,T), (B,T)
    AttnActs at;
    float *fc, *fc_gelu;               // (B,T,F) before and after GELU
} LayerActs;

typedef struct {
    float *resid;                      // (L+1, B,T,C): resid[l] is the input of layer l
    LayerActs *layer;                  // [L]
    float *attn_out, *mlp_out;         // (B,T,C) scratch, not needed by backward
    float *lnf, *lnf_mean, *lnf_rstd;  // (B,T,C), (B,T), (B,T)
    float *logits;                     // (B,T,Vp); backward overwrites it with dlogits
    float *losses;                     // (B,T) per-position loss (0 where ignored)
    float *lse;                        // (B,T) logsumexp of each row of logits
    float *contexts;                   // (B,T,d_c) the ContextBlock's c_t (ctxkv / ctxpythia), constants
} Acts;

// gradients of activations: reused by every layer during backward
typedef struct {
    float *dresid;                     // (B,T,C) running gradient of the residual stream
    float *dln1, *dln2;                // (B,T,C)
    AttnActs dat;                      // same shapes as AttnActs (the rstd/att fields: datt only),
    float *dat_base;                   // laid out per layer kind at this address (layer_backward)
    float *dfc_gelu, *dfc;             // (B,T,F)
    float *dlnf;                       // (B,T,C)
} GradActs;

static int head_dim(const Config *c) { return c->n_embd / c->n_head; }
static int qk_head_dim(const Config *c, int kind) { return head_dim(c) + (kind == ATTN_MLA ? c->mla_rope_dim : 0); }

// Lays out one AttnActs of a layer of the given kind for (B,T). With grads != 0 the per-row
// statistics are skipped.
static size_t layout_attn_acts(const Config *c, int kind, size_t B, size_t T, float *base, size_t off, AttnActs *at, int grads) {
    const size_t BT = B * T, C = c->n_embd, H = c->n_head, D = head_dim(c), Dq = qk_head_dim(c, kind);
    const size_t G = c->n_kv_head, dR = c->mla_rope_dim, KVA = c->kv_rank + dR;
    memset(at, 0, sizeof *at);
#define BUF(ptr, n) do { ptr = base ? base + off : NULL; off += (n); } while (0)
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
#undef BUF
    return off;
}

static size_t layout_acts(const Config *c, size_t B, size_t T, float *base, Acts *A, GradActs *G) {
    size_t off = 0;
    const size_t C = c->n_embd, F = c->n_inner, L = c->n_layer, Vp = c->padded_vocab_size;
    const size_t BT = B * T;
#define BUF(ptr, n) do { ptr = base ? base + off : NULL; off += (n); } while (0)
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
#undef BUF
    return off;
}

// ----------------------------------------------------------------------------
// Layers: forward/backward pairs

// embedding: out[b,t,:] = table[ids[b,t], :]                          table (Vp,C), out (B,T,C)
static void embedding_forward(float *out, const int *ids, const float *table, int BT, int C) {
    for (int i = 0; i < BT; i++) memcpy(out + (size_t)i * C, table + (size_t)ids[i] * C, C * sizeof(float));
}

// serial on purpose: repeated ids add into the same row
static void embedding_backward(float *dtable, const float *dout, const int *ids, int BT, int C) {
    for (int i = 0; i < BT; i++) axpy(dtable + (size_t)ids[i] * C, 1.0f, dout + (size_t)i * C, C);
}

// LayerNorm over the last dim (biased variance, as nn.LayerNorm).  inp/out (N,C), mean/rstd (N)
// Small loops (decoding touches one row) stay serial: a parallel region costs more than they do.
#define PAR_MIN 4096

static void layernorm_forward(float *out, float *mean, float *rstd, const float *inp, const float *w,
                              const float *b, int N, int C, float eps) {
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= C;
        float v = 0.0f;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        v /= C;
        float r = 1.0f / sqrtf(v + eps);
        for (int i = 0; i < C; i++) y[i] = (x[i] - m) * r * w[i] + b[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

// dx = r·(g − mean(g) − x̂·mean(g⊙x̂)), g = dy⊙w;  dw += Σ dy⊙x̂;  db += Σ dy
static void layernorm_backward(float *dinp, float *dw, float *db, const float *dout, const float *inp,
                               const float *w, const float *mean, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *dy = dout + (size_t)n * C, *x = inp + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float m = mean[n], r = rstd[n];
        float g_mean = 0.0f, gx_mean = 0.0f;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - m) * r, g = dy[i] * w[i];
            g_mean += g;
            gx_mean += g * xhat;
        }
        g_mean /= C;
        gx_mean /= C;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - m) * r;
            dx[i] += r * (dy[i] * w[i] - g_mean - xhat * gx_mean);
        }
    }
    // weight grads reduce over N: parallel over channels so no two threads write one entry
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float sw = 0.0f, sb = 0.0f;
        for (int n = 0; n < N; n++) {
            float dy = dout[(size_t)n * C + i];
            sw += dy * (inp[(size_t)n * C + i] - mean[n]) * rstd[n];
            sb += dy;
        }
        dw[i] += sw;
        db[i] += sb;
    }
}

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

// Linear layer, PyTorch layout: out (N,OC) = inp (N,C) · wᵀ + bias (OC, or NULL for none).
// The GEMM wants Bm rows contiguous along the output, so w is transposed into a scratch
// buffer first (cheap next to the product: OC·C copies against N·OC·C multiply-adds).
static float *matmul_scratch;
static size_t matmul_scratch_cap;

static void matmul_forward(float *out, const float *inp, const float *w, const float *bias, int N, int C, int OC) {
    if (N <= 16) { // a few rows (decoding, up to batch 16): dot products, no transpose
#pragma omp parallel for schedule(static) if ((size_t)N * C * OC >= 16 * PAR_MIN)
        for (int o = 0; o < OC; o++)
            for (int n = 0; n < N; n++)
                out[(size_t)n * OC + o] = dot(inp + (size_t)n * C, w + (size_t)o * C, C) + (bias ? bias[o] : 0.0f);
        return;
    }
    size_t need = (size_t)C * OC;
    if (need > matmul_scratch_cap) {
        free(matmul_scratch);
        matmul_scratch = malloc_check(need * sizeof(float), "matmul scratch");
        matmul_scratch_cap = need;
    }
    transpose(matmul_scratch, w, OC, C);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *o = out + (size_t)n * OC;
        if (bias) memcpy(o, bias, OC * sizeof(float));
        else memset(o, 0, OC * sizeof(float));
    }
    gemm_acc(out, inp, C, 1, matmul_scratch, N, C, OC);
}

// dinp (N,C) += dout·w;  dw (OC,C) += doutᵀ·inp;  dbias (OC) += Σ_n dout.   dinp/dbias may be NULL.
static void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout, const float *inp,
                            const float *w, int N, int C, int OC) {
    if (dinp) gemm_acc(dinp, dout, OC, 1, w, N, OC, C);
    gemm_acc(dw, dout, 1, OC, inp, OC, N, C); // doutᵀ read through strides
    if (dbias) {
#pragma omp parallel for schedule(static)
        for (int o0 = 0; o0 < OC; o0 += 64) {
            int ko = OC - o0 < 64 ? OC - o0 : 64;
            for (int n = 0; n < N; n++) axpy(dbias + o0, 1.0f, dout + (size_t)n * OC + o0, ko);
        }
    }
}

// RoPE table for R rotated dims: cos/sin (max_seq_len, R/2), θ[p][i] = p · base^(−2i/R),
// formed in fp32 as HF does. The model has one for its rotary_dims and, for MLA, one for d_R.
typedef struct { int R; float *cos, *sin; } Rope;

static Rope rope_init(int max_seq_len, int R, float base) {
    Rope rp = {R, NULL, NULL};
    size_t n = (size_t)max_seq_len * (R / 2 > 0 ? R / 2 : 1);
    rp.cos = malloc_check(n * sizeof(float), "rope table");
    rp.sin = malloc_check(n * sizeof(float), "rope table");
    for (int i = 0; i < R / 2; i++) {
        float inv_freq = 1.0f / powf(base, (float)(2 * i) / (float)R);
        for (int p = 0; p < max_seq_len; p++) {
            float theta = (float)p * inv_freq;
            rp.cos[p * (R / 2) + i] = cosf(theta);
            rp.sin[p * (R / 2) + i] = sinf(theta);
        }
    }
    return rp;
}

static void rope_free(Rope *rp) { free(rp->cos); free(rp->sin); }

// Rotate-half RoPE in place on the first R dims of n_heads heads per row, pairs (i, i + R/2):
//   x'[i] = x[i]c − x[i+R/2]s,  x'[i+R/2] = x[i+R/2]c + x[i]s.
// Rows are (B,T) positions, pos = pos0 + t. sign = −1 applies the inverse rotation.
static void rope_rotate(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride,
                        const Rope *rp, float sign) {
    const int half = rp->R / 2;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * T * n_heads * rp->R >= PAR_MIN)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = rp->cos + (size_t)(pos0 + t) * half, *s = rp->sin + (size_t)(pos0 + t) * half;
            float *row = x + ((size_t)b * T + t) * row_stride;
            for (int h = 0; h < n_heads; h++) {
                float *v = row + (size_t)h * head_stride;
                for (int i = 0; i < half; i++) {
                    float x1 = v[i], x2 = v[i + half], si = sign * s[i];
                    v[i] = x1 * c[i] - x2 * si;
                    v[i + half] = x2 * c[i] + x1 * si;
                }
            }
        }
}

static void rope_forward(float *x, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(x, B, T, pos0, row_stride, n_heads, head_stride, rp, 1.0f);
}

// the rotation is orthogonal, so its backward is the inverse rotation of the gradient
static void rope_backward(float *dx, int B, int T, int pos0, int row_stride, int n_heads, int head_stride, const Rope *rp) {
    rope_rotate(dx, B, T, pos0, row_stride, n_heads, head_stride, rp, -1.0f);
}

// RMSNorm (MLA's latent norms): y = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps). Weight only.
// inp rows are in_stride apart (MLA normalises the first kv_rank columns of a wider row).
static void rmsnorm_forward(float *out, float *rstd, const float *inp, int in_stride, const float *w, int N, int C,
                            float eps) {
#pragma omp parallel for schedule(static) if ((size_t)N * C >= PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * in_stride;
        float ss = 0.0f;
        for (int i = 0; i < C; i++) ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / C + eps);
        for (int i = 0; i < C; i++) out[(size_t)n * C + i] = x[i] * r * w[i];
        rstd[n] = r;
    }
}

// dx += r·g − x·r³·mean(g⊙x), g = dy⊙w;  dw += Σ dy⊙x·r
static void rmsnorm_backward(float *dinp, int in_stride, float *dw, const float *dout, const float *inp,
                             const float *w, const float *rstd, int N, int C) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * in_stride, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * in_stride;
        float r = rstd[n], gx = 0.0f;
        for (int i = 0; i < C; i++) gx += dy[i] * w[i] * x[i];
        gx /= C;
        for (int i = 0; i < C; i++) dx[i] += r * dy[i] * w[i] - x[i] * r * r * r * gx;
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < C; i++) {
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += dout[(size_t)n * C + i] * inp[(size_t)n * in_stride + i] * rstd[n];
        dw[i] += s;
    }
}

// A view of per-head vectors inside a (B,T,row) buffer: head h of token (b,t) starts at
// base + (b*T + t)*row_stride + h*head_stride. Lets one attention core read the fused QKV
// of MHA and the separate Q / KV projections of the other variants.
typedef struct { float *base; int row_stride, head_stride; } HeadView;

static inline float *head_at(HeadView v, int T, int b, int t, int h) {
    return v.base + ((size_t)b * T + t) * v.row_stride + (size_t)h * v.head_stride;
}

// Causal softmax attention. H query heads share G key/value heads: query head h reads
// KV head h / (H/G) (G = H for MHA). out (B,T,H*Dv), att (B,H,T,T).
static void attention_forward(float *out, float *att, HeadView q, HeadView k, HeadView v, int B, int T, int H,
                              int G, int Dqk, int Dv, float scale) {
    const int group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / group;
            for (int t = 0; t < T; t++) {
                const float *qt = head_at(q, T, b, t, h);
                float *p = att + (((size_t)b * H + h) * T + t) * T;
                for (int s = 0; s <= t; s++) p[s] = scale * dot(qt, head_at(k, T, b, s, g), Dqk);
                float inv = 1.0f / exp_shift_sum(p, t + 1, max_of(p, t + 1));
                for (int s = 0; s <= t; s++) p[s] *= inv;
                for (int s = t + 1; s < T; s++) p[s] = 0.0f;
                float *o = out + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                memset(o, 0, Dv * sizeof(float));
                for (int s = 0; s <= t; s++) axpy(o, p[s], head_at(v, T, b, s, g), Dv);
            }
        }
}

// dV_g += Σ_h Pᵀ·dO,  dP = dO·Vᵀ,  dS = P⊙(dP − rowsum(dP⊙P)),  dQ += scale·dS·K,  dK_g += scale·dSᵀ·Q.
// Parallel over (b, g) so the heads that share a KV head accumulate into it from one thread.
static void attention_backward(HeadView dq, HeadView dk, HeadView dv, float *datt, const float *dout,
                               const float *att, HeadView q, HeadView k, HeadView v, int B, int T, int H, int G,
                               int Dqk, int Dv, float scale) {
    const int group = H / G;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int g = 0; g < G; g++)
            for (int h = g * group; h < (g + 1) * group; h++)
                for (int t = 0; t < T; t++) {
                    const float *p = att + (((size_t)b * H + h) * T + t) * T;
                    float *dp = datt + (((size_t)b * H + h) * T + t) * T;
                    const float *dot_ = dout + ((size_t)b * T + t) * H * Dv + (size_t)h * Dv;
                    float rowsum = 0.0f;
                    for (int s = 0; s <= t; s++) {
                        dp[s] = dot(dot_, head_at(v, T, b, s, g), Dv);
                        axpy(head_at(dv, T, b, s, g), p[s], dot_, Dv);
                        rowsum += dp[s] * p[s];
                    }
                    const float *qt = head_at(q, T, b, t, h);
                    float *dqt = head_at(dq, T, b, t, h);
                    for (int s = 0; s <= t; s++) {
                        float ds = p[s] * (dp[s] - rowsum) * scale;
                        axpy(dqt, ds, head_at(k, T, b, s, g), Dqk);
                        axpy(head_at(dk, T, b, s, g), ds, qt, Dqk);
                    }
                }
}

// Context-KV attention (layer 0, doc/context_kv.md). Query t attends over M slots: slot k
// holds the key/value of the context at s = t − k·I when s >= 0; empty slots are masked out.
// No positional encoding: the slot order and the recurrence carry position.
// q, kc, vc (B,T,H*D) (kc/vc indexed by the source position s), out (B,T,H*D), att (B,H,T,M).
static void ctx_attention_forward(float *out, float *att, const float *q, const float *kc, const float *vc, int B,
                                  int T, int H, int D, int interval, int M) {
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((size_t)b * T + t) * C + h * D;
                float *p = att + (((size_t)b * H + h) * T + t) * M;
                int n = 0; // filled slots: s = t, t−I, … while s >= 0
                for (int k = 0; k < M && t - k * interval >= 0; k++, n++)
                    p[k] = scale * dot(qt, kc + ((size_t)b * T + t - k * interval) * C + h * D, D);
                float inv = 1.0f / exp_shift_sum(p, n, max_of(p, n));
                for (int k = 0; k < M; k++) p[k] = k < n ? p[k] * inv : 0.0f;
                float *o = out + ((size_t)b * T + t) * C + h * D;
                memset(o, 0, D * sizeof(float));
                for (int k = 0; k < n; k++) axpy(o, p[k], vc + ((size_t)b * T + t - k * interval) * C + h * D, D);
            }
}

// dV_s += P·dO, dP = dO·V_s, dS = P⊙(dP − Σ P⊙dP), dq += scale·Σ dS·K_s, dK_s += scale·dS·q.
// Parallel over (b, h): the slots of different t share source positions, so t stays serial.
static void ctx_attention_backward(float *dq, float *dkc, float *dvc, float *datt, const float *dout, const float *att,
                                   const float *q, const float *kc, const float *vc, int B, int T, int H, int D,
                                   int interval, int M) {
    const int C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *p = att + (((size_t)b * H + h) * T + t) * M;
                float *dp = datt + (((size_t)b * H + h) * T + t) * M;
                const float *dot_ = dout + ((size_t)b * T + t) * C + h * D, *qt = q + ((size_t)b * T + t) * C + h * D;
                float *dqt = dq + ((size_t)b * T + t) * C + h * D;
                float rowsum = 0.0f;
                int n = 0;
                for (int k = 0; k < M && t - k * interval >= 0; k++, n++) {
                    size_t src = ((size_t)b * T + t - k * interval) * C + h * D;
                    dp[k] = dot(dot_, vc + src, D);
                    axpy(dvc + src, p[k], dot_, D);
                    rowsum += dp[k] * p[k];
                }
                for (int k = 0; k < n; k++) {
                    size_t src = ((size_t)b * T + t - k * interval) * C + h * D;
                    float ds = p[k] * (dp[k] - rowsum) * scale;
                    axpy(dqt, ds, kc + src, D);
                    axpy(dkc + src, ds, qt, D);
                }
            }
}

// exact GELU, 0.5·x·(1 + erf(x/√2)), as HF's "gelu" (not the tanh form)
static void gelu_forward(float *out, const float *inp, size_t N) {
#pragma omp parallel for schedule(static) if (N >= PAR_MIN)
    for (size_t i = 0; i < N; i++) out[i] = 0.5f * inp[i] * (1.0f + erff(inp[i] * (float)M_SQRT1_2));
}

// GELU'(x) = 0.5(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π)
static void gelu_backward(float *dinp, const float *inp, const float *dout, size_t N) {
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        float x = inp[i];
        float grad = 0.5f * (1.0f + erff(x * (float)M_SQRT1_2)) + x * expf(-0.5f * x * x) * inv_sqrt_2pi;
        dinp[i] += grad * dout[i];
    }
}

// out = a + b + c (the parallel residual); its backward is the identity into each branch,
// which is why model_backward hands the same dresid to both branches.
static void residual3_forward(float *out, const float *a, const float *b, const float *c, size_t N) {
#pragma omp parallel for schedule(static) if (N >= PAR_MIN)
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i] + c[i];
}

// Cross-entropy over the first V columns of logits (N,Vp); padding columns never count.
// losses[n] = lse[n] − logits[n][target], lse = logsumexp of the row (kept for backward);
// ignored rows get loss 0. Returns the mean over non-ignored rows and sets *n_valid.
static float crossentropy_forward(float *losses, float *lse, const float *logits, const int *targets, int N, int V,
                                  int Vp, int *n_valid) {
    double total = 0.0;
    int valid = 0;
#pragma omp parallel
    {
        float *row = malloc_check(V * sizeof(float), "softmax row");
#pragma omp for schedule(static) reduction(+ : total, valid)
        for (int n = 0; n < N; n++) {
            losses[n] = 0.0f;
            const float *z = logits + (size_t)n * Vp;
            float maxv = max_of(z, V);
            memcpy(row, z, V * sizeof(float));
            lse[n] = maxv + logf(exp_shift_sum(row, V, maxv));
            if (targets[n] == IGNORE_INDEX) continue;
            losses[n] = lse[n] - z[targets[n]];
            total += losses[n];
            valid++;
        }
        free(row);
    }
    *n_valid = valid;
    return valid ? (float)(total / valid) : 0.0f;
}

// dlogits = (softmax(logits) − onehot(target)) / n_valid, written IN PLACE over logits
// (saves a (B,T,Vp) buffer). Ignored rows and padding columns get 0.
static void crossentropy_backward(float *logits_to_dlogits, const float *lse, const int *targets, int N, int V,
                                  int Vp, int n_valid) {
    const float scale = 1.0f / (float)n_valid;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float *z = logits_to_dlogits + (size_t)n * Vp;
        if (targets[n] == IGNORE_INDEX) { memset(z, 0, Vp * sizeof(float)); continue; }
        exp_shift_sum(z, V, lse[n]); // z = softmax
        for (int i = 0; i < V; i++) z[i] *= scale;
        z[targets[n]] -= scale;
        for (int i = V; i < Vp; i++) z[i] = 0.0f;
    }
}

// ----------------------------------------------------------------------------
// ContextBlock (doc/context_kv.md): one ContextLayer on N rows at once,
//   O = LN_c(S + GELU(W_c [S ; LN_e(E)] + b_c))
// S (N,d_c) plays c_{t-1}, E (N,E) the token embeddings. Phase 1 runs it on every position
// in parallel (S = shifted previous iterate); the exact recurrence runs it on the B rows of
// one time step after another (S = the previous step's output).

typedef struct {
    int cap;                          // rows allocated
    float *u, *u_mean, *u_rstd;       // (N,E), (N), (N) LN_e(E)
    float *z;                         // (N,d_c+E) [S ; u]
    float *pre, *g;                   // (N,d_c) before / after GELU
    float *r, *r_mean, *r_rstd;       // (N,d_c) S + g, and LN_c's statistics
    float *out;                       // (N,d_c)
    float *dr, *dpre, *dz, *du, *dE;  // backward scratch
} BlockActs;

static void blockacts_ensure(BlockActs *cb, int N, int E, int dc) {
    if (N <= cb->cap) return;
    free(cb->u); // one allocation, u is its start
    size_t per_row = (size_t)E * 4 + (size_t)(dc + E) * 2 + (size_t)dc * 6 + 4;
    float *p = malloc_check((size_t)N * per_row * sizeof(float), "context block");
#define TAKE(ptr, n) do { cb->ptr = p; p += (size_t)N * (n); } while (0)
    TAKE(u, E); TAKE(u_mean, 1); TAKE(u_rstd, 1); TAKE(z, dc + E); TAKE(pre, dc); TAKE(g, dc);
    TAKE(r, dc); TAKE(r_mean, 1); TAKE(r_rstd, 1); TAKE(out, dc);
    TAKE(dr, dc); TAKE(dpre, dc); TAKE(dz, dc + E); TAKE(du, E); TAKE(dE, E);
#undef TAKE
    cb->cap = N;
}

static void contextblock_forward(BlockActs *cb, const Params *p, const float *S, const float *E, int N, int Ed, int dc,
                                 float eps) {
    layernorm_forward(cb->u, cb->u_mean, cb->u_rstd, E, p->ctx_ln_e_w, p->ctx_ln_e_b, N, Ed, eps);
    for (int n = 0; n < N; n++) { // z = [S ; u]
        memcpy(cb->z + (size_t)n * (dc + Ed), S + (size_t)n * dc, dc * sizeof(float));
        memcpy(cb->z + (size_t)n * (dc + Ed) + dc, cb->u + (size_t)n * Ed, Ed * sizeof(float));
    }
    matmul_forward(cb->pre, cb->z, p->ctx_w, p->ctx_b, N, dc + Ed, dc);
    gelu_forward(cb->g, cb->pre, (size_t)N * dc);
    for (size_t i = 0; i < (size_t)N * dc; i++) cb->r[i] = S[i] + cb->g[i];
    layernorm_forward(cb->out, cb->r_mean, cb->r_rstd, cb->r, p->ctx_ln_c_w, p->ctx_ln_c_b, N, dc, eps);
}

// Gradients of the block's parameters only (into g): S is a constant (detached iterate) and
// E belongs to the frozen embeddings, so their gradients are not formed.
static void contextblock_backward(BlockActs *cb, const Params *p, Params *g, const float *dout, const float *E, int N,
                                  int Ed, int dc) {
    memset(cb->dr, 0, (size_t)N * dc * sizeof(float));
    layernorm_backward(cb->dr, g->ctx_ln_c_w, g->ctx_ln_c_b, dout, cb->r, p->ctx_ln_c_w, cb->r_mean, cb->r_rstd, N, dc);
    memset(cb->dpre, 0, (size_t)N * dc * sizeof(float));
    gelu_backward(cb->dpre, cb->pre, cb->dr, (size_t)N * dc); // dr reaches g through the residual
    memset(cb->dz, 0, (size_t)N * (dc + Ed) * sizeof(float));
    matmul_backward(cb->dz, g->ctx_w, g->ctx_b, cb->dpre, cb->z, p->ctx_w, N, dc + Ed, dc);
    for (int n = 0; n < N; n++) memcpy(cb->du + (size_t)n * Ed, cb->dz + (size_t)n * (dc + Ed) + dc, Ed * sizeof(float));
    memset(cb->dE, 0, (size_t)N * Ed * sizeof(float));
    layernorm_backward(cb->dE, g->ctx_ln_e_w, g->ctx_ln_e_b, cb->du, E, p->ctx_ln_e_w, cb->u_mean, cb->u_rstd, N, Ed);
}

// OACD diversity loss on rows X (N,d), per slice of `slice` consecutive rows, averaged:
//   L_slice = −||X − 1μᵀ||_F / n + λ·||μ||²,   μ = mean of the slice's n rows
// The Frobenius norm is not squared: it rewards spread without letting one direction dominate.
static float oacd_forward(const float *X, int N, int d, int slice, float lambda) {
    double total = 0.0;
    int n_slices = 0;
    for (int s0 = 0; s0 < N; s0 += slice, n_slices++) {
        int n = N - s0 < slice ? N - s0 : slice;
        double mu_sq = 0.0, dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            double mu = 0.0;
            for (int i = 0; i < n; i++) mu += X[(size_t)(s0 + i) * d + j];
            mu /= n;
            mu_sq += mu * mu;
            for (int i = 0; i < n; i++) { double e = X[(size_t)(s0 + i) * d + j] - mu; dev_sq += e * e; }
        }
        total += -sqrt(dev_sq) / n + lambda * mu_sq;
    }
    return (float)(total / n_slices);
}

// dX_t = (−(X_t − μ)/||X − 1μᵀ||_F + 2λμ) / n per slice, / number of slices. (The centring
// drops out of the first term because the deviations of a slice sum to zero.)
static void oacd_backward(float *dX, const float *X, int N, int d, int slice, float lambda) {
    int n_slices = (N + slice - 1) / slice;
    float *mu = malloc_check(d * sizeof(float), "oacd");
    for (int s0 = 0; s0 < N; s0 += slice) {
        int n = N - s0 < slice ? N - s0 : slice;
        double dev_sq = 0.0;
        for (int j = 0; j < d; j++) {
            double m_ = 0.0;
            for (int i = 0; i < n; i++) m_ += X[(size_t)(s0 + i) * d + j];
            mu[j] = (float)(m_ / n);
            for (int i = 0; i < n; i++) { double e = X[(size_t)(s0 + i) * d + j] - mu[j]; dev_sq += e * e; }
        }
        float F = (float)sqrt(dev_sq), inv_F = F > 1e-12f ? 1.0f / F : 0.0f;
        float scale = 1.0f / ((float)n * n_slices);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < d; j++) {
                size_t idx = (size_t)(s0 + i) * d + j;
                dX[idx] = scale * (-(X[idx] - mu[j]) * inv_F + 2.0f * lambda * mu[j]);
            }
    }
    free(mu);
}

// ----------------------------------------------------------------------------
// The model

typedef struct {
    Config cfg;
    ParamTensor *tensors;       // stb_ds array: checkpoint order, names, shapes
    size_t num_params;
    float *params_memory; Params p;
    float *grads_memory;  Params g;       // allocated on first backward
    float *m_memory, *v_memory;           // AdamW moments, allocated on first update
    int adam_step;
    Rope rope;                            // rotary_dims of each head (Pythia's partial RoPE)
    Rope mla_rope;                        // MLA's decoupled d_R dims (R = 0 otherwise)
    float *acts_memory; Acts a; size_t acts_cap;       // activations, capacity in floats
    float *gacts_memory; GradActs ga; size_t gacts_cap; // their gradients
    size_t batch_cap;
    int B, T;                   // shape of the last forward
    int *inputs, *targets;      // copies of the last forward's batch
    float mean_loss;            // of the last forward with targets, else -1
    int n_valid;                // non-ignored targets in the last forward
    BlockActs cb;               // ContextBlock scratch (phase 1 and the exact recurrence)
    int head_from;              // B = 1 inference: logits only for rows >= head_from (0 = all)
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
    memset(m, 0, sizeof *m);
    m->cfg = *c;
    m->p.layer = calloc_check(c->n_layer * sizeof(LayerParams), "layer params");
    m->g.layer = calloc_check(c->n_layer * sizeof(LayerParams), "layer grads");
    m->num_params = layout_params(c, NULL, NULL, &m->tensors);
    m->params_memory = malloc_check(m->num_params * sizeof(float), "parameters");
    layout_params(c, m->params_memory, &m->p, NULL);
    m->rope = rope_init(c->max_seq_len, c->rotary_dims, c->rope_base);
    m->mla_rope = rope_init(c->max_seq_len, c->attn_type == ATTN_MLA ? c->mla_rope_dim : 0, c->rope_base);
    m->a.layer = calloc_check(c->n_layer * sizeof(LayerActs), "layer acts");
    m->mean_loss = -1.0f;
    model_set_phase(m, 2);
}

// Random init as HF GPTNeoX (_init_weights): N(0, init_std) for matrices and embeddings,
// LayerNorm 1/0, biases 0; the two residual-output matrices (dense, proj) are scaled by
// 1/sqrt(2L) as in GPT-2, which keeps the residual stream's variance flat with depth.
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

static void train_state_save(const Model *m, const char *path, const TrainState *st) {
    int h[HEADER_INTS] = {0}, ch[HEADER_INTS];
    h[0] = TRAIN_STATE_MAGIC; h[1] = TRAIN_STATE_VERSION; h[2] = st->step; h[3] = m->adam_step;
    h[4] = st->shard_index; split64(h + 5, (uint64_t)st->pos); split64(h + 7, st->rng);
    h[9] = st->B; h[10] = st->T; split64(h + 11, (uint64_t)st->tokens_seen);
    h[13] = st->epoch; h[14] = st->shuffle;
    config_to_header(&m->cfg, ch);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(ch, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    for (int k = 0; k < 2; k++) { // AdamW m and v (zeros before the first update)
        const float *mv = k == 0 ? m->m_memory : m->v_memory;
        if (mv) fwrite_check(mv, sizeof(float), m->num_params, af.f, af.tmp);
        else for (size_t i = 0; i < m->num_params; i++) { float z = 0.0f; fwrite_check(&z, sizeof z, 1, af.f, af.tmp); }
    }
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
    // tokens_seen is step * B * T in every state the program writes; bound it so += cannot overflow
    if (st->B < 1 || st->T < 1 || st->tokens_seen < 0 || st->tokens_seen > (long long)st->step * st->B * st->T)
        die("'%s': bad batch shape or token count", path);
    // AdamW's count (h[3]) is the step count: one update per step, so it can never pass the step
    if (st->step < 0 || h[3] < 0 || h[3] > st->step || st->shard_index < 0 || st->pos < 0) die("'%s': bad step or data position", path);
    // every epoch takes at least one batch, so the epoch can't pass the step; shuffle is a flag
    if (st->epoch < 0 || st->epoch > st->step || (st->shuffle != 0 && st->shuffle != 1)) die("'%s': bad data epoch or shuffle flag", path);
    if (m) {
        model_alloc_params(m, &c);
        fread_check(m->params_memory, sizeof(float), n, f, path);
        m->m_memory = malloc_check(n * sizeof(float), "AdamW m");
        m->v_memory = malloc_check(n * sizeof(float), "AdamW v");
        fread_check(m->m_memory, sizeof(float), n, f, path);
        fread_check(m->v_memory, sizeof(float), n, f, path);
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
}

static void model_save(const Model *m, const char *path) {
    int h[HEADER_INTS];
    config_to_header(&m->cfg, h);
    AtomicFile af = atomic_open(path);
    fwrite_check(h, sizeof(int), HEADER_INTS, af.f, af.tmp);
    fwrite_check(m->params_memory, sizeof(float), m->num_params, af.f, af.tmp);
    atomic_commit(&af);
}

static void model_free(Model *m) {
    free(m->params_memory); free(m->grads_memory); free(m->m_memory); free(m->v_memory);
    free(m->acts_memory); free(m->gacts_memory); rope_free(&m->rope); rope_free(&m->mla_rope);
    free(m->p.layer); free(m->g.layer); free(m->a.layer);
    free(m->inputs); free(m->targets); free(m->cb.u);
    arrfree(m->tensors);
    memset(m, 0, sizeof *m);
}

// Points the activations at memory for a (B,T) batch, growing the block when this batch
// needs more than any earlier one.
static void model_ensure_acts(Model *m, int B, int T) {
    size_t need = layout_acts(&m->cfg, B, T, NULL, &m->a, NULL);
    if (need > m->acts_cap) {
        free(m->acts_memory);
        m->acts_memory = malloc_check(need * sizeof(float), "activations");
        m->acts_cap = need;
    }
    layout_acts(&m->cfg, B, T, m->acts_memory, &m->a, NULL);
    size_t BT = (size_t)B * T;
    if (BT > m->batch_cap) {
        free(m->inputs); free(m->targets);
        m->inputs = malloc_check(BT * sizeof(int), "batch");
        m->targets = malloc_check(BT * sizeof(int), "batch");
        m->batch_cap = BT;
    }
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
        *q = (HeadView){at->q, C, D};
        *k = (HeadView){at->kc, C, D};
        *v = (HeadView){at->vc, C, D};
        break;
    case ATTN_MHA: // fused, interleaved per head: [q | k | v] of head h at h*3D
        *q = (HeadView){at->qkv, 3 * C, 3 * D};
        *k = (HeadView){at->qkv + D, 3 * C, 3 * D};
        *v = (HeadView){at->qkv + 2 * D, 3 * C, 3 * D};
        break;
    case ATTN_GQA:
    case ATTN_MQA: // q (H heads), then kv = [K of G heads | V of G heads]
        *q = (HeadView){at->q, H * D, D};
        *k = (HeadView){at->kv, 2 * G * D, D};
        *v = (HeadView){at->kv + G * D, 2 * G * D, D};
        break;
    case ATTN_MLA: // q and k per head [nope (D) | rope (dR)]; v is the second half of kvb's head
        *q = (HeadView){at->q, H * Dq, Dq};
        *k = (HeadView){at->k, H * Dq, Dq};
        *v = (HeadView){at->kvb + D, H * 2 * D, 2 * D};
        break;
    }
}

// key/value heads the core sees: MLA materialises one key per query head for training
static int attn_core_kv_heads(const Config *c, int kind) {
    return (kind == ATTN_MLA || kind == ATTN_CTX) ? c->n_head : c->n_kv_head;
}

// MLA: k[bt][h] = [k_nope_h (from kvb) | k_pe (shared by all heads)]
static void mla_gather_keys(float *k, const float *kvb, const float *kpe, int kpe_stride, int BT, int H, int D, int dR) {
    const int Dq = D + dR;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < BT; n++)
        for (int h = 0; h < H; h++) {
            float *dst = k + ((size_t)n * H + h) * Dq;
            memcpy(dst, kvb + ((size_t)n * H + h) * 2 * D, D * sizeof(float));
            memcpy(dst + D, kpe + (size_t)n * kpe_stride, dR * sizeof(float));
        }
}

// its backward: dk_nope to its head in dkvb, dk_pe summed over the heads that share it
static void mla_gather_keys_backward(float *dkvb, float *dkpe, int kpe_stride, const float *dk, int BT, int H, int D, int dR) {
    const int Dq = D + dR;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < BT; n++)
        for (int h = 0; h < H; h++) {
            const float *src = dk + ((size_t)n * H + h) * Dq;
            axpy(dkvb + ((size_t)n * H + h) * 2 * D, 1.0f, src, D);
            axpy(dkpe + (size_t)n * kpe_stride, 1.0f, src + D, dR);
        }
}

// q, k, v from x = LN_1(x_l) (B,T,C), positions pos0.., RoPE applied
static void attn_project_forward(const Model *m, int kind, const LayerParams *lp, AttnActs *at, const float *x, int B,
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
                                  AttnActs *dat, float *dx, const float *x, int B, int T) {
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
static void attention_block_forward(const Model *m, int kind, const LayerParams *lp, AttnActs *at, float *out,
                                    const float *x, int B, int T) {
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
                                     AttnActs *dat, float *dx, const float *dout, const float *x, int B, int T) {
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
static void attention_block_decode(const Model *m, const LayerParams *lp, AttnActs *at, float *out, const float *x,
                                   KVCache *kv, int l);

// One Pythia layer: x_out = x + Attn(LN_1(x)) + MLP(LN_2(x)), the parallel residual.
// With a KV cache (decoding, B = T = 1) the attention reads the cached tokens instead.
static void layer_forward(Model *m, int l, float *x_out, const float *x, int B, int T, KVCache *kv) {
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
static void layer_backward(Model *m, int l, const float *x, int B, int T) {
    const Config *c = &m->cfg;
    const int BT = B * T, C = c->n_embd, F = c->n_inner;
    const LayerParams *lp = &m->p.layer[l];
    LayerParams *lg = &m->g.layer[l];
    LayerActs *la = &m->a.layer[l];
    GradActs *ga = &m->ga;
    // every per-layer gradient buffer (dln1 .. dfc) is contiguous: zero them together
    memset(ga->dln1, 0, (size_t)(ga->dlnf - ga->dln1) * sizeof(float));
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

// The exact recurrence c_t = ContextBlock(c_{t-1}, e_t), c_{-1} = 0 at each sequence start,
// from the current embed_in: one time step after another, the B sequences of a step at once.
// Writes m->a.contexts (B,T,d_c). No gradient is ever formed through it (constants).
static void compute_contexts(Model *m, const int *inputs, int B, int T) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim;
    blockacts_ensure(&m->cb, B, Ed, dc);
    float *prev = malloc_check((size_t)B * dc * sizeof(float), "contexts"), *emb = malloc_check((size_t)B * Ed * sizeof(float), "contexts");
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < B; b++) {
            const float *cp = t > 0 ? m->a.contexts + ((size_t)b * T + t - 1) * dc : NULL;
            if (cp) memcpy(prev + (size_t)b * dc, cp, dc * sizeof(float));
            else memset(prev + (size_t)b * dc, 0, dc * sizeof(float));
            memcpy(emb + (size_t)b * Ed, m->p.embed_in + (size_t)inputs[b * T + t] * Ed, Ed * sizeof(float));
        }
        contextblock_forward(&m->cb, &m->p, prev, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) memcpy(m->a.contexts + ((size_t)b * T + t) * dc, m->cb.out + (size_t)b * dc, dc * sizeof(float));
    }
    free(prev);
    free(emb);
}

// final LayerNorm and the untied head: logits (BT, Vp) from resid[L]
static void head_forward(Model *m, int BT) {
    const Config *c = &m->cfg;
    Acts *a = &m->a;
    const float *xL = a->resid + (size_t)c->n_layer * BT * c->n_embd;
    layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, xL, m->p.lnf_w, m->p.lnf_b, BT, c->n_embd, c->ln_eps);
    // evaluation that needs a few rows' logits (LAMBADA's last word) skips the others: the
    // vocabulary head is most of the cost
    int from = m->head_from > 0 && m->head_from < BT ? m->head_from : 0;
    matmul_forward(a->logits + (size_t)from * c->padded_vocab_size, a->lnf + (size_t)from * c->n_embd, m->p.embed_out,
                   NULL, BT - from, c->n_embd, c->padded_vocab_size);
}

// Forward pass. inputs/targets (B,T); targets may be NULL (inference). Returns the mean loss
// (or -1 without targets). Logits are left in m->a.logits (B,T,Vp).
static float model_forward(Model *m, const int *inputs, const int *targets, int B, int T) {
    const Config *c = &m->cfg;
    const int C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size, BT = B * T;
    check_batch(c, inputs, targets, B, T);
    model_ensure_acts(m, B, T);
    m->B = B;
    m->T = T;
    memcpy(m->inputs, inputs, BT * sizeof(int));
    if (targets) memcpy(m->targets, targets, BT * sizeof(int));
    Acts *a = &m->a;
    if (has_context_block(c)) compute_contexts(m, inputs, B, T);
    if (c->model_type == MODEL_CTXPYTHIA) memcpy(a->resid, a->contexts, (size_t)BT * C * sizeof(float)); // x_0 = contexts
    else embedding_forward(a->resid, inputs, m->p.embed_in, BT, C);
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, a->resid + (size_t)(l + 1) * BT * C, a->resid + (size_t)l * BT * C, B, T, NULL);
    head_forward(m, BT);
    m->mean_loss = -1.0f;
    if (targets) m->mean_loss = crossentropy_forward(a->losses, a->lse, a->logits, targets, BT, V, Vp, &m->n_valid);
    return m->mean_loss;
}

static void model_zero_grad(Model *m) {
    if (m->grads_memory) memset(m->grads_memory, 0, m->num_params * sizeof(float));
}

// Backward of the last forward (which must have had targets). Accumulates into m->g.
// Overwrites the logits with dlogits.
static void model_backward(Model *m) {
    const Config *c = &m->cfg;
    if (m->mean_loss < 0.0f) die("model_backward called without a forward pass with targets");
    const int B = m->B, T = m->T, BT = B * T, C = c->n_embd, V = c->vocab_size, Vp = c->padded_vocab_size;
    if (!m->grads_memory) {
        m->grads_memory = calloc_check(m->num_params * sizeof(float), "gradients");
        layout_params(c, m->grads_memory, &m->g, NULL);
    }
    size_t need = layout_acts(c, B, T, NULL, NULL, &m->ga);
    if (need > m->gacts_cap) {
        free(m->gacts_memory);
        m->gacts_memory = malloc_check(need * sizeof(float), "activation gradients");
        m->gacts_cap = need;
    }
    layout_acts(c, B, T, m->gacts_memory, NULL, &m->ga);
    Acts *a = &m->a;
    GradActs *ga = &m->ga;
    if (m->n_valid == 0) return; // every target ignored: the loss is a constant

    float *dlogits = a->logits;
    crossentropy_backward(dlogits, a->lse, m->targets, BT, V, Vp, m->n_valid);
    memset(ga->dlnf, 0, (size_t)BT * C * sizeof(float));
    matmul_backward(ga->dlnf, m->g.embed_out, NULL, dlogits, a->lnf, m->p.embed_out, BT, C, Vp);
    memset(ga->dresid, 0, (size_t)BT * C * sizeof(float));
    float *xL = a->resid + (size_t)c->n_layer * BT * C;
    layernorm_backward(ga->dresid, m->g.lnf_w, m->g.lnf_b, ga->dlnf, xL, m->p.lnf_w, a->lnf_mean, a->lnf_rstd, BT, C);
    for (int l = c->n_layer - 1; l >= 0; l--) layer_backward(m, l, a->resid + (size_t)l * BT * C, B, T);
    // ctxpythia's input is the contexts, constants: embed_in gets no gradient (it stays frozen)
    if (c->model_type != MODEL_CTXPYTHIA) embedding_backward(m->g.embed_in, ga->dresid, m->inputs, BT, C);
}

// Global gradient-norm clipping, as torch.nn.utils.clip_grad_norm_: scale all grads by
// min(1, max_norm / (norm + 1e-6)). Returns the norm before clipping. max_norm <= 0: no clip.
static float model_clip_grad_norm(Model *m, float max_norm) {
    double sq = 0.0;
    const float *g = m->grads_memory;
#pragma omp parallel for schedule(static) reduction(+ : sq)
    for (size_t i = 0; i < m->num_params; i++) sq += (double)g[i] * g[i];
    float norm = (float)sqrt(sq);
    if (max_norm > 0.0f && isfinite(norm)) {
        float coef = max_norm / (norm + 1e-6f);
        if (coef < 1.0f) {
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < m->num_params; i++) m->grads_memory[i] *= coef;
        }
    }
    return norm;
}

typedef struct { float lr, beta1, beta2, eps, weight_decay; } AdamW;

// AdamW exactly as torch.optim.AdamW: decoupled decay p *= 1 − lr·wd (2-D tensors only),
// then p −= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps).
static void model_update(Model *m, const AdamW *opt) {
    if (!m->m_memory) {
        m->m_memory = calloc_check(m->num_params * sizeof(float), "AdamW m");
        m->v_memory = calloc_check(m->num_params * sizeof(float), "AdamW v");
    }
    m->adam_step++;
    const float bc1 = 1.0f - powf(opt->beta1, (float)m->adam_step);
    const float bc2_sqrt = sqrtf(1.0f - powf(opt->beta2, (float)m->adam_step));
    const float step_size = opt->lr / bc1;
    for (ptrdiff_t ti = 0; ti < arrlen(m->tensors); ti++) {
        const ParamTensor *t = &m->tensors[ti];
        if (t->frozen) continue;
        const float decay = (t->rows > 1) ? 1.0f - opt->lr * opt->weight_decay : 1.0f;
        float *p = m->params_memory + t->offset, *g = m->grads_memory + t->offset;
        float *mm = m->m_memory + t->offset, *vv = m->v_memory + t->offset;
        const size_t n = t->rows * t->cols;
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++) {
            p[i] *= decay;
            mm[i] = opt->beta1 * mm[i] + (1.0f - opt->beta1) * g[i];
            vv[i] = opt->beta2 * vv[i] + (1.0f - opt->beta2) * g[i] * g[i];
            p[i] -= step_size * mm[i] / (sqrtf(vv[i]) / bc2_sqrt + opt->eps);
        }
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
    uint16_t *tok = malloc_check(n * sizeof(uint16_t), "shard tokens");
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
        d->block_order = malloc_check(d->n_blocks * sizeof(int), "block order");
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
    d->inputs = malloc_check((size_t)B * T * sizeof(int), "batch");
    d->targets = malloc_check((size_t)B * T * sizeof(int), "batch");
    d->shard_order = malloc_check(arrlen(d->files) * sizeof(int), "shard order");
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
    if (h[3] < 0 || h[3] >= h[2]) die("'%s': end-of-text id %d is not among its %d tokens", path, h[3], h[2]);
    tk->eot = h[3];
    for (int i = 0; i < h[2]; i++) {
        TokenBytes t;
        unsigned char len[2];
        fread_check(len, 1, 2, f, path);
        t.len = len[0] | (len[1] << 8); // uint16 little-endian
        t.bytes = malloc_check(t.len + 1, "token");
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
    float *mem;         // (L − first_layer, B, capacity, per_token)
    int ring_len;       // ctxkv: contexts kept, min(capacity, (M−1)·I+1); context s at s % ring_len
    float *ring;        // (B, ring_len, d_c)
    float *running;     // (B, d_c) c_{len−1}, the input of the next ContextBlock step
    size_t bytes;       // bytes of mem + ring + running
    float *scratch;     // per head: scores + 2 latent vectors (MLA) / keys and values (ctxkv)
};

// decode scratch per (sequence, head): scores, MLA's two latent vectors, ctxkv's slot keys/values
static size_t kv_scratch_per_head(const Config *c, int capacity) {
    return (size_t)capacity + 2 * (size_t)c->kv_rank + 2 * (size_t)c->max_contexts * head_dim(c);
}

static KVCache kvcache_new(const Config *c, int B, int capacity) {
    if (capacity > c->max_seq_len) die("generation needs %d positions, past the model's max_seq_len %d", capacity, c->max_seq_len);
    KVCache kv = {0};
    kv.batch = B;
    kv.capacity = capacity;
    kv.first_layer = c->layer0_type == LAYER0_CTXKV ? 1 : 0;
    kv.per_token = attn_kv_elements(c, c->attn_type);
    size_t n_mem = (size_t)(c->n_layer - kv.first_layer) * B * capacity * kv.per_token;
    kv.ring_len = c->layer0_type == LAYER0_CTXKV ? (capacity < ctx_ring_len(c) ? capacity : ctx_ring_len(c)) : 0;
    size_t n_ctx = has_context_block(c) ? (size_t)B * ((size_t)kv.ring_len + 1) * c->context_dim : 0;
    kv.mem = malloc_check((n_mem + n_ctx) * sizeof(float), "KV cache");
    kv.ring = kv.mem + n_mem;
    kv.running = kv.ring + (size_t)B * kv.ring_len * c->context_dim;
    kv.bytes = (n_mem + n_ctx) * sizeof(float);
    kv.scratch = malloc_check((size_t)B * c->n_head * kv_scratch_per_head(c, capacity) * sizeof(float), "decode scratch");
    return kv;
}

static void kvcache_free(KVCache *kv) { free(kv->mem); free(kv->scratch); memset(kv, 0, sizeof *kv); }

static float *kv_slot(const KVCache *kv, int l, int b, int pos) {
    return kv->mem + (((size_t)(l - kv->first_layer) * kv->batch + b) * kv->capacity + pos) * kv->per_token;
}

// Copies token `row` of a layer's projected activations into a cache slot.
// mha/gqa/mqa slot: [K of G heads | V of G heads]; mla slot: [ĉ (kv_rank) | k_pe (dR)].
static void attn_cache_write(const Config *c, const AttnActs *at, int row, float *dst) {
    const int H = c->n_head, D = head_dim(c), G = c->n_kv_head;
    switch (c->attn_type) {
    case ATTN_MHA: {
        const float *r = at->qkv + (size_t)row * 3 * H * D;
        for (int g = 0; g < H; g++) {
            memcpy(dst + g * D, r + g * 3 * D + D, D * sizeof(float));
            memcpy(dst + (H + g) * D, r + g * 3 * D + 2 * D, D * sizeof(float));
        }
        break;
    }
    case ATTN_GQA:
    case ATTN_MQA:
        memcpy(dst, at->kv + (size_t)row * 2 * G * D, 2 * G * D * sizeof(float));
        break;
    case ATTN_MLA: {
        const int KVA = c->kv_rank + c->mla_rope_dim;
        memcpy(dst, at->c_norm + (size_t)row * c->kv_rank, c->kv_rank * sizeof(float));
        memcpy(dst + c->kv_rank, at->kv_a + (size_t)row * KVA + c->kv_rank, c->mla_rope_dim * sizeof(float));
        break;
    }
    }
}

// Attention of each sequence's new token (row b of at, projected at position n-1) over its n
// cached tokens; writes at->atty row b (H*D). MLA uses the absorbed form: W_UK is folded into the
// query and W_UV applied after attending, so only the latent ĉ and k_pe are ever read.
// ctxkv recomputes the slots' keys and values from the contexts in the ring.
static void attn_decode(const Model *m, int kind, const LayerParams *lp, AttnActs *at, const KVCache *kv, int l, int n) {
    const Config *c = &m->cfg;
    const int H = c->n_head, D = head_dim(c), G = c->n_kv_head, Dq = qk_head_dim(c, kind);
    const float scale = 1.0f / sqrtf((float)Dq);
    const size_t per_head = kv_scratch_per_head(c, kv->capacity);
    HeadView q, k_unused, v_unused;
    attn_views(c, kind, at, &q, &k_unused, &v_unused);
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)kv->batch * n * (kv->per_token + c->context_dim) >= PAR_MIN)
    for (int b = 0; b < kv->batch; b++)
    for (int h = 0; h < H; h++) {
        float *scores = kv->scratch + ((size_t)b * H + h) * per_head;
        float *o = at->atty + ((size_t)b * H + h) * D;
        const float *qh = head_at(q, 1, b, 0, h);
        if (kind == ATTN_CTX) { // slots k: the context of position n−1 − k·I, while it exists
            const int I = c->context_interval, dc = c->context_dim;
            float *keys = scores + kv->capacity + 2 * c->kv_rank, *vals = keys + (size_t)c->max_contexts * D;
            int slots = 0;
            for (int k = 0; k < c->max_contexts && n - 1 - k * I >= 0; k++, slots++) {
                const float *ctx = kv->ring + ((size_t)b * kv->ring_len + (n - 1 - k * I) % kv->ring_len) * dc;
                for (int j = 0; j < D; j++) { // this head's rows of W_k and W_v
                    keys[k * D + j] = dot(lp->k_w + (size_t)(h * D + j) * dc, ctx, dc) + lp->k_b[h * D + j];
                    vals[k * D + j] = dot(lp->v_w + (size_t)(h * D + j) * dc, ctx, dc) + lp->v_b[h * D + j];
                }
                scores[k] = scale * dot(qh, keys + k * D, D);
            }
            float inv = 1.0f / exp_shift_sum(scores, slots, max_of(scores, slots));
            memset(o, 0, D * sizeof(float));
            for (int k = 0; k < slots; k++) axpy(o, scores[k] * inv, vals + k * D, D);
        } else if (kind == ATTN_MLA) {
            const int R = c->kv_rank, dR = c->mla_rope_dim;
            float *q_abs = scores + kv->capacity, *o_lat = q_abs + R;
            memset(q_abs, 0, R * sizeof(float)); // q̃ = W_UK_hᵀ q_nope   (R)
            for (int j = 0; j < D; j++) axpy(q_abs, qh[j], lp->kv_b_w + ((size_t)h * 2 * D + j) * R, R);
            for (int s = 0; s < n; s++) {
                const float *slot = kv_slot(kv, l, b, s);
                scores[s] = scale * (dot(q_abs, slot, R) + dot(qh + D, slot + R, dR));
            }
            float inv = 1.0f / exp_shift_sum(scores, n, max_of(scores, n));
            memset(o_lat, 0, R * sizeof(float)); // ō = Σ P ĉ   (R)
            for (int s = 0; s < n; s++) axpy(o_lat, scores[s] * inv, kv_slot(kv, l, b, s), R);
            for (int j = 0; j < D; j++) o[j] = dot(lp->kv_b_w + ((size_t)h * 2 * D + D + j) * R, o_lat, R); // W_UV_h ō
        } else {
            const int g = h / (H / G);
            for (int s = 0; s < n; s++) scores[s] = scale * dot(qh, kv_slot(kv, l, b, s) + g * D, D);
            float inv = 1.0f / exp_shift_sum(scores, n, max_of(scores, n));
            memset(o, 0, D * sizeof(float));
            for (int s = 0; s < n; s++) axpy(o, scores[s] * inv, kv_slot(kv, l, b, s) + (G + g) * D, D);
        }
    }
}

static void attention_block_decode(const Model *m, const LayerParams *lp, AttnActs *at, float *out, const float *x,
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

// stores context c_pos of sequence b in the ring and as its running context
static void kvcache_push_context(const Config *c, KVCache *kv, int b, int pos, const float *ctx) {
    const int dc = c->context_dim;
    if (kv->ring_len) memcpy(kv->ring + ((size_t)b * kv->ring_len + pos % kv->ring_len) * dc, ctx, dc * sizeof(float));
    memcpy(kv->running + (size_t)b * dc, ctx, dc * sizeof(float));
}

// Prefill: the B prompts (B,n) in one forward pass, then their keys/values (or latents, or
// contexts) into the cache. Returns the logits of the last prompt tokens: row b at
// b*n*Vp (stride n*Vp between sequences).
static const float *model_prefill(Model *m, KVCache *kv, const int *prompts, int n) {
    const Config *c = &m->cfg;
    const int B = kv->batch;
    if (n < 1 || n > kv->capacity) die("prompt of %d tokens does not fit a cache of %d", n, kv->capacity);
    model_forward(m, prompts, NULL, B, n);
    for (int l = kv->first_layer; l < c->n_layer; l++)
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) attn_cache_write(c, &m->a.layer[l].at, b * n + t, kv_slot(kv, l, b, t));
    if (has_context_block(c))
        for (int b = 0; b < B; b++)
            for (int t = 0; t < n; t++) kvcache_push_context(c, kv, b, t, m->a.contexts + ((size_t)b * n + t) * c->context_dim);
    kv->len = n;
    return m->a.logits + (size_t)(n - 1) * c->padded_vocab_size;
}

// One token per sequence (tokens[B]) at position kv->len through the model, reading the
// cache. Returns the logits (B,Vp).
static const float *model_decode_step(Model *m, KVCache *kv, const int *tokens) {
    const Config *c = &m->cfg;
    const int B = kv->batch, C = c->n_embd, dc = c->context_dim, Ed = c->embed_dim;
    if (kv->len >= kv->capacity) die("KV cache full (%d tokens)", kv->capacity);
    check_batch(c, tokens, NULL, B, 1);
    model_ensure_acts(m, B, 1);
    if (has_context_block(c)) { // c_t = ContextBlock(c_{t−1}, e_t), c_{−1} = 0
        blockacts_ensure(&m->cb, B, Ed, dc);
        if (kv->len == 0) memset(kv->running, 0, (size_t)B * dc * sizeof(float));
        float *emb = malloc_check((size_t)B * Ed * sizeof(float), "decode");
        embedding_forward(emb, tokens, m->p.embed_in, B, Ed);
        contextblock_forward(&m->cb, &m->p, kv->running, emb, B, Ed, dc, c->ln_eps);
        for (int b = 0; b < B; b++) kvcache_push_context(c, kv, b, kv->len, m->cb.out + (size_t)b * dc);
        free(emb);
    }
    if (c->model_type == MODEL_CTXPYTHIA) memcpy(m->a.resid, kv->running, (size_t)B * C * sizeof(float));
    else embedding_forward(m->a.resid, tokens, m->p.embed_in, B, C);
    for (int l = 0; l < c->n_layer; l++)
        layer_forward(m, l, m->a.resid + (size_t)(l + 1) * B * C, m->a.resid + (size_t)l * B * C, B, 1, kv);
    head_forward(m, B);
    kv->len++;
    return m->a.logits;
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

// Generates n_new tokens after the prompt with the KV cache; out receives prompt + new ids.
// Prints the new tokens as they come when tk is given. Returns the number of ids in out.
// Generates n_new tokens after B prompts (B, n_prompt) with the KV cache; out (B, n_prompt
// + n_new) receives prompts and new ids. Prints sequence 0's new tokens as they come when tk
// is given. Returns the length of each sequence.
static int model_generate(Model *m, int B, const int *prompts, int n_prompt, int n_new, float temperature,
                          uint64_t *rng, int *out, const Tokenizer *tk, GenStats *st) {
    const int Vp = m->cfg.padded_vocab_size, len = n_prompt + n_new;
    KVCache kv = kvcache_new(&m->cfg, B, len);
    int *next = malloc_check(B * sizeof(int), "generate");
    double t0 = now_seconds();
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * len, prompts + (size_t)b * n_prompt, n_prompt * sizeof(int));
    const float *logits = model_prefill(m, &kv, prompts, n_prompt);
    size_t row_stride = (size_t)n_prompt * Vp; // prefill logits: one row per sequence, n rows apart
    for (int i = 0; i < n_new; i++) {
        for (int b = 0; b < B; b++) {
            next[b] = sample_token(logits + b * row_stride, m->cfg.vocab_size, temperature, rng);
            out[(size_t)b * len + n_prompt + i] = next[b];
        }
        if (tk) { tokenizer_print(tk, next[0]); fflush(stdout); }
        if (i + 1 < n_new) { logits = model_decode_step(m, &kv, next); row_stride = Vp; }
    }
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
    Args a = {0};
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
        "usage: ./train_ctxkv [options]\n"
        "Trains a Pythia (GPT-NeoX) model on token shards, fp32 on the CPU.\n\n"
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
        "Threads: OMP_NUM_THREADS. Example: ./train_ctxkv --model pythia-14m --steps 300 --out out/run1\n",
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

// --init-from: every tensor the two models share (same name and shape) is copied; an mha
// checkpoint becomes gqa/mqa by mean-pooling the K and V heads of each group (Ainslie et al.).
static void model_init_from(Model *m, const Config *c, const char *path, float init_std, uint64_t seed) {
    Model src;
    model_load(&src, path);
    model_init_random(m, c, init_std, seed);
    int *copied = calloc_check(arrlen(m->tensors) * sizeof(int), "init-from");
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
            memcpy(m->p.layer[0].q_w + (size_t)h * D * C, src.p.layer[0].qkv_w + (size_t)h * 3 * D * C, (size_t)D * C * sizeof(float));
            memcpy(m->p.layer[0].q_b + h * D, src.p.layer[0].qkv_b + h * 3 * D, D * sizeof(float));
        }
    }
    int target = c->attn_type, source = src.cfg.attn_type;
    if (source != target) {
        if (source != ATTN_MHA || (target != ATTN_GQA && target != ATTN_MQA))
            die("--init-from converts mha checkpoints to gqa or mqa; '%s' is %s and --attn is %s", path,
                ATTN_NAMES[source], ATTN_NAMES[target]);
        const int G = c->n_kv_head, group = H / G;
        for (int l = c->layer0_type == LAYER0_CTXKV ? 1 : 0; l < c->n_layer; l++) {
            const LayerParams *sp = &src.p.layer[l];
            LayerParams *tp = &m->p.layer[l];
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
                        axpy(tp->kv_w + (size_t)(dst + j) * C, 1.0f / group, sp->qkv_w + (size_t)(h * 3 * D + s * D + j) * C, C);
                        tp->kv_b[dst + j] += sp->qkv_b[h * 3 * D + s * D + j] / group;
                    }
                }
            }
        }
    }
    model_free(&src);
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
    int *out = malloc_check((size_t)(n_prompt + a->generate) * sizeof(int), "generate");
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
}

// The parallel fixed-point (Jacobi) iteration of the recurrence over every position at once:
//   S = shift(P) (+ noise), O = ContextBlock(S, E), P <- O.
// Position t is exact after t+1 iterations without noise, so T iterations give the exact
// recurrence (the harness checks this). E (B,T,Ed) embeddings, P (B,T,d_c) in/out.
static void jacobi_shift(float *S, const float *P, int B, int T, int dc, float noise, uint64_t *rng) {
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            float *dst = S + ((size_t)b * T + t) * dc;
            if (t == 0) memset(dst, 0, dc * sizeof(float)); // each sequence starts from c_{-1} = 0
            else memcpy(dst, P + ((size_t)b * T + t - 1) * dc, dc * sizeof(float));
            if (noise > 0.0f)
                for (int j = 0; j < dc; j++) dst[j] += noise * random_normal(rng);
        }
}

typedef struct { float loss, converged; int iters; } Phase1Stats;

// Phase 1 on one batch: Jacobi iterations, each one OACD loss and one Adam step on the block
// (everything else frozen), until the converged fraction reaches p1_stop or p1_iters run out.
static Phase1Stats phase1_round(Model *m, const Args *a, const int *tokens, int B, int T, uint64_t *rng, int round) {
    const Config *c = &m->cfg;
    const int dc = c->context_dim, Ed = c->embed_dim, N = B * T;
    blockacts_ensure(&m->cb, N, Ed, dc);
    float *E = malloc_check((size_t)N * Ed * sizeof(float), "phase 1"), *P = malloc_check((size_t)N * dc * sizeof(float), "phase 1");
    float *S = malloc_check((size_t)N * dc * sizeof(float), "phase 1"), *dO = malloc_check((size_t)N * dc * sizeof(float), "phase 1");
    embedding_forward(E, tokens, m->p.embed_in, N, Ed);
    for (size_t i = 0; i < (size_t)N * dc; i++) P[i] = 0.01f * random_normal(rng);
    if (!m->grads_memory) {
        m->grads_memory = calloc_check(m->num_params * sizeof(float), "gradients");
        layout_params(c, m->grads_memory, &m->g, NULL);
    }
    AdamW opt = {a->p1_lr, a->beta1, a->beta2, a->eps, 0.0f}; // Adam: no weight decay
    Phase1Stats st = {0};
    for (int it = 0; it < a->p1_iters; it++) {
        jacobi_shift(S, P, B, T, dc, a->p1_noise, rng);
        contextblock_forward(&m->cb, &m->p, S, E, N, Ed, dc, c->ln_eps);
        const float *O = m->cb.out;
        st.loss = oacd_forward(O, N, dc, a->oacd_slice, a->oacd_lambda);
        model_zero_grad(m);
        oacd_backward(dO, O, N, dc, a->oacd_slice, a->oacd_lambda);
        contextblock_backward(&m->cb, &m->p, &m->g, dO, E, N, Ed, dc);
        float norm = model_clip_grad_norm(m, a->p1_clip);
        if (!isfinite(st.loss) || !isfinite(norm)) die("phase 1 round %d iteration %d: loss %g / grad norm %g is not finite", round, it, st.loss, norm);
        model_update(m, &opt);
        int conv = 0;
        for (int n = 0; n < N; n++) {
            float d2 = 0.0f;
            for (int j = 0; j < dc; j++) { float d = O[(size_t)n * dc + j] - P[(size_t)n * dc + j]; d2 += d * d; }
            conv += d2 / dc < a->p1_tol;
        }
        st.converged = (float)conv / N;
        st.iters = it + 1;
        memcpy(P, O, (size_t)N * dc * sizeof(float)); // detached: the next iterate
        printf("phase 1 round %d iter %d | oacd loss %.5f | converged %.3f | norm %.3f\n", round, it + 1, st.loss, st.converged, norm);
        fflush(stdout);
        if (st.converged >= a->p1_stop) break;
    }
    free(E); free(P); free(S); free(dO);
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
    int *x = malloc_check(T * sizeof(int), "heldout"), *y = malloc_check(T * sizeof(int), "heldout");
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
            if (y[i] != IGNORE_INDEX) { total += m->a.losses[i]; count++; }
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
    uint16_t *tok = malloc_check(off * sizeof(uint16_t), "lambada");
    fread_check(tok, sizeof(uint16_t), off, f, path);
    fclose(f);
    const int V = m->cfg.vocab_size, Vp = m->cfg.padded_vocab_size;
    // every token, the last target token too: it is read as a logits column, never fed to the model
    for (size_t i = 0; i < off; i++)
        if (tok[i] >= V) die("'%s': token %u at index %zu is outside the model's vocabulary (%d)", path, tok[i], i, V);
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
            const float *z = m->a.logits + (size_t)(ex[i].n_ctx - 1 + j) * Vp;
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
    int *prompts = malloc_check((size_t)B * n_prompt * sizeof(int), "eval gen");
    for (size_t i = 0; i < (size_t)B * n_prompt; i++) prompts[i] = tokens[i % ntok];
    int *out = malloc_check((size_t)B * (n_prompt + n_new) * sizeof(int), "eval gen");
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
    int *x = malloc_check(BT * sizeof(int), "bench"), *y = malloc_check(BT * sizeof(int), "bench");
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
    int threads = 1;
#ifdef _OPENMP
    threads = omp_get_max_threads();
#endif
    config_print(&model.cfg);
    printf("parameters: %zu | B %d | T %d | threads %d\n", model.num_params, a.B, a.T, threads);
    if (a.context_block) context_block_load(&model, a.context_block);
    if (a.phase && !has_context_block(&model.cfg)) die("--phase needs a model with a context block (--layer0 ctxkv or --model-type ctxpythia)");
    if (a.bench) return run_bench(&model, &a);
    // the memory a training step needs, before any of it is touched
    if (a.steps > 0) {
        double need = 4.0 * ((double)layout_acts(&model.cfg, a.B, a.T, NULL, &model.a, NULL) +
                             (double)layout_acts(&model.cfg, a.B, a.T, NULL, NULL, &model.ga) + 4.0 * model.num_params);
        double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
        if (have > 0 && need > 0.9 * have)
            die("-b %d -t %d need about %.1f GiB (activations, gradients, AdamW state), more than this machine's %.1f GiB; lower -b or -t",
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
    TrainState rs = {0};
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
        Phase1Stats st = {0};
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
    int *sample_buf = malloc_check((a.sample_len + 1) * sizeof(int), "sample");
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
