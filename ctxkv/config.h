// ctxkv/config.h: the model config (everything that defines a model, stored in every checkpoint
// header), the presets, its validation and header I/O, the per-layer attention kind, the KV
// accounting behind --kv-report, and the batch check. Shared by both programs.
#ifndef CTXKV_CONFIG_H
#define CTXKV_CONFIG_H
#include "utils.h"

#define CKPT_MAGIC 20261124
#define CKPT_VERSION 1
#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_VERSION_MASKED 2 // tokens, then a loss-mask byte per token (doc/formats.md)
#define TOKTAB_MAGIC 20240328
#define TOKTAB_VERSION 3   // llm.c's 2 has uint8 lengths; 3 has uint16 (NeoX has tokens > 255 bytes)
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
    // mla: the d_R RoPE dims are mla_rope_split groups of d_R/S, each rotated as one head's
    // rotary dims (1: DeepSeek's one shared key; H: one group per head, as a model converted
    // from mha has, doc/retrofit.md); mla_linear_latent 1: no RMSNorm on the latent (ĉ = W_DKV x)
    int mla_rope_split, mla_linear_latent;
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
    // the recall workload (prepro/mqar.py, dev/kv_table.py): two layers of pythia-14m's width and a
    // vocabulary of MQAR's keys (1..127) and values (128..255). Two layers learn recall in a few
    // hundred steps; six (pythia-14m with this vocabulary) were still near chance after 300
    {"pythia-mqar", 2, 128, 4, 512, 256, 0.25f, 2048},
    // for tests: several heads, a rotary fraction of each head, a padded vocabulary
    {"tiny", 2, 32, 4, 128, 96, 0.5f, 128},
};
#define N_PRESETS ((int)(sizeof PRESETS / sizeof PRESETS[0]))


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
        if (c->mla_rope_split < 1 || c->mla_rope_dim % (2 * c->mla_rope_split)) {
            snprintf(msg, sizeof msg, "mla rope split %d must be >= 1 and cut rope dim %d into groups of an even size",
                     c->mla_rope_split, c->mla_rope_dim);
            return msg;
        }
        if (c->mla_rope_dim / c->mla_rope_split > D) {
            snprintf(msg, sizeof msg, "mla rope dim %d / split %d is larger than the head dim %d", c->mla_rope_dim,
                     c->mla_rope_split, D);
            return msg;
        }
        if (c->mla_linear_latent != 0 && c->mla_linear_latent != 1) return "mla_linear_latent must be 0 or 1";
        if (!(c->rms_eps > 0.0f) || !(c->rms_eps < 1.0f)) return "mla rms_eps must be in (0, 1)";
        break;
    default:
        return "unknown attn_type (0 mha, 1 gqa, 2 mqa, 3 mla)";
    }
    // as prepro/ckpt.py requires; kv_scratch_per_head sizes buffers by kv_rank for every variant
    if (c->attn_type != ATTN_MLA &&
        (c->kv_rank || c->q_rank || c->mla_rope_dim || c->rms_eps != 0.0f || c->mla_rope_split || c->mla_linear_latent))
        return "kv_rank, q_rank, mla_rope_dim, rms_eps, mla_rope_split and mla_linear_latent must be 0 (used by mla only)";
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


static void config_to_header(const Config *c, int *h) {
    memset(h, 0, HEADER_INTS * sizeof(int));
    h[0] = CKPT_MAGIC; h[1] = CKPT_VERSION;
    h[2] = c->vocab_size; h[3] = c->padded_vocab_size; h[4] = c->n_layer; h[5] = c->n_head;
    h[6] = c->n_embd; h[7] = c->n_inner; h[8] = c->rotary_dims; h[9] = float_bits(c->rope_base);
    h[10] = c->max_seq_len; h[11] = float_bits(c->ln_eps);
    h[12] = c->attn_type; h[13] = c->n_kv_head; h[14] = c->kv_rank; h[15] = c->q_rank; h[16] = c->mla_rope_dim;
    h[17] = c->layer0_type; h[18] = c->model_type; h[19] = c->context_dim; h[20] = c->context_interval;
    h[21] = c->max_contexts; h[22] = float_bits(c->rms_eps); h[23] = c->embed_dim;
    h[24] = c->mla_rope_split; h[25] = c->mla_linear_latent;
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
    // 0 in mla files written before the field existed: one shared rope key
    c.mla_rope_split = h[24] ? h[24] : (c.attn_type == ATTN_MLA ? 1 : 0);
    c.mla_linear_latent = h[25];
    return c;
}

static void config_print(const Config *c) {
    printf("config: vocab %d (padded %d) | layers %d | heads %d | width %d | mlp %d | rotary %d/%d | "
           "rope base %g | max len %d | attn %s",
           c->vocab_size, c->padded_vocab_size, c->n_layer, c->n_head, c->n_embd, c->n_inner, c->rotary_dims,
           c->n_embd / c->n_head, c->rope_base, c->max_seq_len, ATTN_NAMES[c->attn_type]);
    if (c->attn_type == ATTN_GQA || c->attn_type == ATTN_MQA) printf(" (%d kv heads)", c->n_kv_head);
    if (c->attn_type == ATTN_MLA)
        printf(" (kv rank %d, q rank %d, rope dim %d in %d group%s%s)", c->kv_rank, c->q_rank, c->mla_rope_dim,
               c->mla_rope_split, c->mla_rope_split > 1 ? "s" : "", c->mla_linear_latent ? ", linear latent" : "");
    if (c->layer0_type == LAYER0_CTXKV)
        printf(" | layer 0 ctxkv (context dim %d, interval %d, max contexts %d)", c->context_dim, c->context_interval, c->max_contexts);
    if (c->model_type == MODEL_CTXPYTHIA) printf(" | ctxpythia (embed %d -> context %d)", c->embed_dim, c->context_dim);
    printf("\n");
}

// ----------------------------------------------------------------------------

static int has_context_block(const Config *c) { return c->layer0_type == LAYER0_CTXKV || c->model_type == MODEL_CTXPYTHIA; }

// the attention kind of layer l: attn_type, except a ctxkv layer 0
static int layer_kind(const Config *c, int l) { return (l == 0 && c->layer0_type == LAYER0_CTXKV) ? ATTN_CTX : c->attn_type; }

static int head_dim(const Config *c) { return c->n_embd / c->n_head; }
// the query/key width of one head: D, or D + d_R for MLA (its decoupled RoPE part)
static int qk_head_dim(const Config *c, int kind) { return head_dim(c) + (kind == ATTN_MLA ? c->mla_rope_dim : 0); }

static int attn_type_from_name(const char *name) {
    for (int t = 0; t < (int)(sizeof ATTN_NAMES / sizeof ATTN_NAMES[0]); t++)
        if (!strcmp(name, ATTN_NAMES[t])) return t;
    die("--attn must be one of mha, gqa, mqa, mla; got '%s'", name);
}

// ----------------------------------------------------------------------------
// KV accounting (doc/attention.md, doc/context_kv.md): what the decoder keeps per token. The
// decoders of both programs allocate exactly this (their caches are fp32; --kv-report also
// gives the bf16 figure).

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

// Values per token that grow with length. A ctxkv layer 0 costs d_c per token (one context),
// but only while the ring is not full.
static size_t kv_elements_per_token(const Config *c) {
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++)
        n += layer_kind(c, l) == ATTN_CTX ? (size_t)c->context_dim : attn_kv_elements(c, layer_kind(c, l));
    return n;
}

// Values the decoder holds with `slots` cached tokens per layer after `positions` tokens: the
// per-layer caches, the ring (capped at (M−1)·I+1 contexts) and the running context (ctxkv and
// ctxpythia). Without eviction slots = positions (kv_elements_at); ctxkv/kvpolicy.h gives the
// slots of a policy.
static size_t kv_elements_for(const Config *c, size_t slots, size_t positions) {
    size_t n = 0;
    for (int l = 0; l < c->n_layer; l++) n += slots * attn_kv_elements(c, layer_kind(c, l));
    if (c->layer0_type == LAYER0_CTXKV) {
        size_t ring = (size_t)ctx_ring_len(c);
        n += (positions < ring ? positions : ring) * c->context_dim;
    }
    if (has_context_block(c)) n += c->context_dim; // the running context c_{t-1}
    return n;
}
static size_t kv_elements_at(const Config *c, size_t T) { return kv_elements_for(c, T, T); }

// decode scratch per (sequence, head): scores, MLA's two latent vectors, ctxkv's slot keys/values
static size_t kv_scratch_per_head(const Config *c, int capacity) {
    return (size_t)capacity + 2 * (size_t)c->kv_rank + 2 * (size_t)c->max_contexts * head_dim(c);
}

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
#endif
