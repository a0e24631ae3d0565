// ctxkv/decode.h: the life of the decoder's cache (ctxkv/kvcache.h), shared by both programs --
// kvcache_new / kvcache_free, the prefill's fill with its eviction (kvcache_fill_prompt), and a
// decode step's slot (kvcache_step_begin / kvcache_step_end); ctxkv/kvpolicy.h says which tokens
// a policy keeps (doc/kv_eviction.md). Included in each program's KV-cached decoding section,
// after ATTN_VARIANTS, kvcache_push_context and these, which each program implements:
//   device_alloc(bytes, what) / device_release(p)      zeroed memory where the cache lives
//   model_att_rows(m, l, b, h, t0, rows, n, out)       rows t0.. of layer l's prefill attention
//                                                      probabilities (n, n) of head h, sequence b,
//                                                      as fp32 on the host
//   kvcache_gather(c, kv, l, b, stage, keep)           slot i of unit u of sequence b in layer l
//                                                      := unit u of staged token keep[u·budget + i]
#ifndef CTXKV_DECODE_H
#define CTXKV_DECODE_H

// a cache for B sequences of n_prompt + n_new tokens under the policy
static KVCache kvcache_new(const Config *c, int B, int n_prompt, int n_new, const KVPolicy *policy) {
    const int positions = n_prompt + n_new;
    if (positions > c->max_seq_len) die("generation needs %d positions, past the model's max_seq_len %d", positions, c->max_seq_len);
    KVCache kv;
    memset(&kv, 0, sizeof kv);
    kv.batch = B;
    kv.policy = *policy;
    kv.capacity = kv_policy_slots(policy, n_prompt, n_new);
    kv.positions = positions;
    kv.first_layer = c->layer0_type == LAYER0_CTXKV ? 1 : 0;
    kv.per_token = attn_kv_elements(c, c->attn_type);
    size_t n_mem = (size_t)(c->n_layer - kv.first_layer) * B * kv.capacity * kv.per_token;
    kv.ring_len = c->layer0_type == LAYER0_CTXKV ? (positions < ctx_ring_len(c) ? positions : ctx_ring_len(c)) : 0;
    size_t n_ctx = has_context_block(c) ? (size_t)B * ((size_t)kv.ring_len + 1) * c->context_dim : 0;
    kv.mem = (float *)device_alloc((n_mem + n_ctx) * sizeof(float), "KV cache");
    kv.ring = kv.mem + n_mem;
    kv.running = kv.ring + (size_t)B * kv.ring_len * c->context_dim;
    kv.bytes = (n_mem + n_ctx) * sizeof(float);
    kv.scratch = (float *)device_alloc((size_t)B * c->n_head * kv_scratch_per_head(c, kv.capacity) * sizeof(float), "decode scratch");
    return kv;
}

static void kvcache_free(KVCache *kv) { device_release(kv->mem); device_release(kv->scratch); free(kv->kept); memset(kv, 0, sizeof *kv); }

// A prompt of n tokens that the policy compresses: each cached layer's slots go to a staging area
// of n tokens (the variant's cache_write), the policy picks the positions each selection unit
// keeps (snapkv: from the attention of the prompt's last queries), and those move into slots
// 0..budget−1. kv->kept (host) records them: (L − first_layer, B, units, budget).
static void kvcache_compress_prompt(Model *m, KVCache *kv, int n) {
    const Config *c = &m->cfg;
    const int B = kv->batch, H = c->n_head, units = kv_units(c, c->attn_type), budget = kv->policy.budget;
    const int w = kv->policy.window < n ? kv->policy.window : n;
    const size_t pt = kv->per_token;
    float *stage = (float *)device_alloc((size_t)B * n * pt * sizeof(float), "KV staging");
    const int snapkv = kv->policy.kind == KV_SNAPKV;
    float *win = snapkv ? (float *)malloc_check((size_t)H * w * n * sizeof(float), "snapkv window") : NULL;
    free(kv->kept);
    kv->kept = (int *)malloc_check((size_t)(c->n_layer - kv->first_layer) * B * units * budget * sizeof(int), "KV kept");
    for (int l = kv->first_layer; l < c->n_layer; l++) {
        ATTN_VARIANTS[c->attn_type].cache_write(c, &m->a.layer[l].at, B, n, stage, (size_t)n * pt);
        for (int b = 0; b < B; b++) {
            int *keep = kv->kept + ((size_t)(l - kv->first_layer) * B + b) * units * budget;
            if (snapkv)
                for (int h = 0; h < H; h++) model_att_rows(m, l, b, h, n - w, w, n, win + (size_t)h * w * n);
            kv_select_prompt(&kv->policy, c, c->attn_type, n, win, keep);
            kvcache_gather(c, kv, l, b, stage + (size_t)b * n * pt, keep);
        }
    }
    device_release(stage);
    free(win);
}

// After the prefill's forward over the prompts (B, n): their keys/values (or latents) into the
// cache, compressed when the policy says so, and the contexts (ctxkv, ctxpythia) into the ring
static void kvcache_fill_prompt(Model *m, KVCache *kv, int n) {
    const Config *c = &m->cfg;
    if (n < 1 || n > kv->positions) die("prompt of %d tokens does not fit a cache of %d positions", n, kv->positions);
    const int compress = kv_policy_compresses(&kv->policy, n);
    if (compress) kvcache_compress_prompt(m, kv, n);
    else
        for (int l = kv->first_layer; l < c->n_layer; l++)
            ATTN_VARIANTS[c->attn_type].cache_write(c, &m->a.layer[l].at, kv->batch, n, kv_slot(kv, l, 0, 0), kv_seq_stride(kv));
    if (has_context_block(c))
        for (int b = 0; b < kv->batch; b++)
            for (int t = 0; t < n; t++) kvcache_push_context(c, kv, b, t, m->a.contexts + ((size_t)b * n + t) * c->context_dim);
    kv->len = compress ? kv->policy.budget : n;
    kv->pos = n;
}

// Before a decode step: the slot the new token at kv->pos goes to, and the slots it attends over
static void kvcache_step_begin(KVCache *kv) {
    if (kv->pos >= kv->positions) die("KV cache full (%d positions)", kv->positions);
    kv->write_slot = kv_policy_slot_of(&kv->policy, kv->pos, kv->len);
    if (kv->write_slot >= kv->capacity) die("KV cache full (%d slots)", kv->capacity);
    kv->n_attend = kv->write_slot < kv->len ? kv->len : kv->write_slot + 1;
}
static void kvcache_step_end(KVCache *kv) { kv->len = kv->n_attend; kv->pos++; }
#endif
