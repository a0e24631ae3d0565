// test_configs.h: the tiny configs both harnesses (test_ctxkv.c, test_ctxkv_cu.cu) test every
// variant with, built as the command line builds them (apply_variant_flags, apply_context_flags),
// and the writers of the small masked shards and recall files both feed their programs.
#ifndef TEST_CONFIGS_H
#define TEST_CONFIGS_H

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

#endif
