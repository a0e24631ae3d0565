// test_configs.h: the tiny configs both harnesses (test_ctxkv.c, test_ctxkv_cu.cu) test every
// variant with, built as the command line builds them (apply_variant_flags, apply_context_flags),
// the smallest config (the fuzz targets score with it and dev/fuzz/make_seeds.c writes its seeds
// from it), the writers of the small masked shards and recall files the harnesses and the seeds
// feed their programs, and decode_under (decoding given tokens under a KV policy).
#ifndef TEST_CONFIGS_H
#define TEST_CONFIGS_H

// the smallest shapes: vocabulary 5, width 4 (2 heads of 2, rotary 2), MLP 4, one layer, length 8
static Config fuzz_small_config(void) {
    Config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = 5; c.padded_vocab_size = round_up(5, VOCAB_PAD);
    c.n_layer = 1; c.n_head = 2; c.n_embd = 4; c.n_inner = 4; c.rotary_dims = 2;
    c.rope_base = 10000.0f; c.max_seq_len = 8; c.ln_eps = 1e-5f;
    c.attn_type = ATTN_MHA; c.n_kv_head = 2; c.embed_dim = 4;
    return c;
}

// the tiny preset with an attention variant, as the command line would build it
static Config tiny_variant(const char *attn, int n_kv_head, int kv_rank, int rope_dim, int q_rank) {
    Config c = config_from_preset(find_preset("tiny"));
    Args a = default_args();
    a.attn = attn;
    a.n_kv_head = n_kv_head;
    a.kv_rank = kv_rank;
    a.rope_dim = rope_dim;
    if (q_rank >= 0) a.q_rank = q_rank, a.given[arg_index("--q-rank")] = 1; // -1: not given
    apply_variant_flags(&c, &a, NULL);
    return c;
}

// the MLA shape a conversion from tiny's mha makes: d_R = H x R rotated as H groups, a linear latent
static Config tiny_mla_grouped(int kv_rank) {
    Config c = tiny_variant("mla", 0, kv_rank, 0, -1);
    c.mla_rope_dim = c.n_head * c.rotary_dims;
    c.mla_rope_split = c.n_head;
    c.mla_linear_latent = 1;
    if (config_problem(&c)) die("tiny_mla_grouped: %s", config_problem(&c));
    return c;
}

// a Context-KV version of a tiny config: interval 3 and 4 slots, so the ring (10 contexts)
// wraps within the decoding test's 80 tokens
static Config tiny_context(const char *kind, Config c) {
    Args a = default_args();
    if (!strcmp(kind, "ctxkv")) { a.layer0 = "ctxkv"; a.context_interval = 3; a.max_contexts = 4; }
    else a.model_type = "ctxpythia";
    a.context_dim = 16;
    apply_context_flags(&c, &a);
    return c;
}

// a preset with an attention variant (NULL: mha) and a layer 0 (NULL or "ctxkv"), the flags'
// defaults for everything else
static Config preset_variant(const char *preset, const char *attn, const char *layer0) {
    Config c = config_from_preset(find_preset(preset));
    Args a = default_args();
    a.attn = attn;
    apply_variant_flags(&c, &a, NULL);
    a.layer0 = layer0;
    apply_context_flags(&c, &a);
    return c;
}

// masked shards (version 2) and recall eval files, doc/formats.md
static void write_masked_shard(const char *path, const uint16_t *tok, const uint8_t *mask, int ntok, int example_len, int header_ntok) {
    FILE *f = fopen_check(path, "wb");
    int h[HEADER_INTS] = {0};
    h[0] = SHARD_MAGIC; h[1] = SHARD_VERSION_MASKED; h[2] = header_ntok; h[3] = example_len;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    fwrite_check(tok, sizeof(uint16_t), ntok, f, path);
    fwrite_check(mask, 1, ntok, f, path);
    fclose(f);
}

// a recall eval file of n examples (len[i], pairs[i]) over tok and dist (sum of len tokens each)
static void write_recall(const char *path, int magic, int n, const int *len, const int *pairs, const uint16_t *tok, const uint16_t *dist, int ntok, int truncate) {
    FILE *f = fopen_check(path, "wb");
    int h[HEADER_INTS] = {0};
    h[0] = magic; h[1] = RECALL_VERSION; h[2] = n; h[3] = ntok;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    for (int i = 0; i < n; i++) { int m[2] = {len[i], pairs[i]}; fwrite_check(m, sizeof(int), 2, f, path); }
    fwrite_check(tok, sizeof(uint16_t), ntok, f, path);
    fwrite_check(dist, sizeof(uint16_t), ntok - truncate, f, path);
    fclose(f);
}

// Decodes B sequences x (B,T) with decode_score (ctxkv/eval.h): prefill of P tokens under the
// policy, then x[:, P..T−2] one at a time; logits (B, T−P, Vp) receives rows P−1..T−2. Returns the
// cache (for its bytes and kept positions; the caller frees it).
typedef struct { float *logits; int T, P, Vp; } LogitsCopy;
static void copy_logits(void *ctx, int b, int j, const float *z) {
    const LogitsCopy *lc = (const LogitsCopy *)ctx;
    memcpy(lc->logits + ((size_t)b * (lc->T - lc->P) + j - lc->P + 1) * lc->Vp, z, lc->Vp * sizeof(float));
}
static KVCache decode_under(Model *m, const KVPolicy *policy, const int *x, int B, int T, int P, float *logits) {
    LogitsCopy lc = {logits, T, P, m->cfg.padded_vocab_size};
    KVCache kv;
    decode_score(m, policy, x, B, T, P, copy_logits, &lc, &kv);
    return kv;
}

// One case of dev/ref/kv_eviction.bin (dev/reference.py kv_eviction_reference): the model, the
// policy, tokens x (B,T), the kept positions (L, B, units, K; K = 0: none recorded) and the
// logits of rows P−1..T−2 (B, T−P, V), all read from f. Returns 0 at the end of the cases.
typedef struct { char model[33]; KVPolicy policy; int B, T, P, L, units, K, V; int *x, *kept; float *logits; } EvictCase;
static void evict_case_read(FILE *f, const char *path, EvictCase *e) {
    int q[12];
    memset(e, 0, sizeof *e);
    fread_check(e->model, 1, 32, f, path);
    fread_check(q, sizeof(int), 12, f, path);
    const KVPolicy p = {q[0], q[1], q[2], q[3], q[4]};
    e->policy = p;
    e->B = q[5]; e->T = q[6]; e->P = q[7]; e->L = q[8]; e->units = q[9]; e->K = q[10]; e->V = q[11];
    e->x = (int *)malloc_check((size_t)e->B * e->T * sizeof(int), "evict ref");
    e->kept = (int *)malloc_check((size_t)e->L * e->B * e->units * e->K * sizeof(int) + 1, "evict ref");
    e->logits = (float *)malloc_check((size_t)e->B * (e->T - e->P) * e->V * sizeof(float), "evict ref");
    fread_check(e->x, sizeof(int), (size_t)e->B * e->T, f, path);
    fread_check(e->kept, sizeof(int), (size_t)e->L * e->B * e->units * e->K, f, path);
    fread_check(e->logits, sizeof(float), (size_t)e->B * (e->T - e->P) * e->V, f, path);
}
static void evict_case_free(EvictCase *e) { free(e->x); free(e->kept); free(e->logits); }
// max |got − reference| over the case's logits (got: rows of Vp), and *max_ref = max |reference|
static float evict_case_diff(const EvictCase *e, const float *got, int Vp, float *max_ref) {
    float d = 0.0f, mr = 0.0f;
    for (size_t r = 0; r < (size_t)e->B * (e->T - e->P); r++)
        for (int v = 0; v < e->V; v++) {
            const float x = got[r * Vp + v], y = e->logits[r * e->V + v], ad = fabsf(x - y);
            if (!(ad <= d)) d = ad;
            if (fabsf(y) > mr) mr = fabsf(y);
        }
    *max_ref = mr;
    return d;
}
// the number of cases, after checking the magic and version
static int evict_file_open(const char *path, FILE **f) {
    *f = fopen_check(path, "rb");
    int h[3];
    fread_check(h, sizeof(int), 3, *f, path);
    if (h[0] != 20261202 || h[1] != 1) die("'%s' is not a KV-eviction reference (magic %d, version %d): rerun dev/reference.py --variants kv_eviction", path, h[0], h[1]);
    return h[2];
}

// Each case of the file decoded under its policy on its model; judge(e, kv, got, Vp) judges the
// cache (its kept positions) and the logits got (B, T−P, Vp) against the case. A model whose
// selection units differ from the case's fails here (its kept positions cannot compare).
typedef void (*EvictCheck)(const EvictCase *e, const KVCache *kv, const float *got, int Vp);
static void evict_cases_run(const char *path, EvictCheck judge) {
    FILE *f;
    const int n_cases = evict_file_open(path, &f);
    for (int k = 0; k < n_cases; k++) {
        EvictCase e;
        evict_case_read(f, path, &e);
        Model m;
        model_load(&m, e.model);
        const int Vp = m.cfg.padded_vocab_size;
        float *got = (float *)malloc_check((size_t)e.B * (e.T - e.P) * Vp * sizeof(float), "evict ref");
        KVCache kv = decode_under(&m, &e.policy, e.x, e.B, e.T, e.P, got);
        if (kv_units(&m.cfg, m.cfg.attn_type) != e.units) die("%s: %d selection units, the reference has %d", e.model, kv_units(&m.cfg, m.cfg.attn_type), e.units);
        judge(&e, &kv, got, Vp);
        kvcache_free(&kv);
        model_free(&m);
        evict_case_free(&e);
        free(got);
    }
    fclose(f);
}

#endif
