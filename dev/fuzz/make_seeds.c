/*
dev/fuzz/make_seeds.c: writes the seed corpora dev/fuzz/corpus/<target>/ (`make fuzz-seeds`).
Small valid files, each a few KB, so the fuzzers start from inputs that load and mutate
into every branch of the loaders. Checkpoints are written by model_save from configs with
the smallest shapes each variant allows (vocabulary 5, padded to 128), so their layout is
the program's own. The committed seeds came from this program; rerun it after a format change.

  make_seeds DIR [TOKENIZER.bin]   (the token table, if given, is cut to its first 300 tokens)
*/
#define TESTING
#include "../../train_ctxkv.c"
#include "../../test_configs.h" // fuzz_small_config, write_masked_shard, write_recall

static char out_dir[1024];

static FILE *seed_open(const char *target, const char *name, char *path, size_t n) {
    char dir[1200];
    snprintf(dir, sizeof dir, "%s/%s", out_dir, target);
    mkdir_p(dir);
    snprintf(path, n, "%s/%s", dir, name);
    return fopen_check(path, "wb");
}

static void seed_shard(const char *name, const uint16_t *tok, int n) {
    char path[1400];
    FILE *f = seed_open("shard", name, path, sizeof path);
    int h[HEADER_INTS] = {0};
    h[0] = SHARD_MAGIC; h[1] = SHARD_VERSION; h[2] = n;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    fwrite_check(tok, sizeof(uint16_t), n, f, path);
    fclose(f);
}

// a version-2 shard (doc/formats.md): whole examples of example_len tokens, one more, a loss mask
static void seed_masked_shard(const char *name, const uint16_t *tok, int n, int example_len) {
    char path[1400];
    fclose(seed_open("shard", name, path, sizeof path));
    uint8_t *mask = malloc_check((size_t)n + 1, "seed");
    for (int i = 0; i < n; i++) mask[i] = (uint8_t)(i % 3 == 1);
    write_masked_shard(path, tok, mask, n, example_len, n);
    free(mask);
}

// recall eval files: examples of the given lengths (tokens below vocab 5), an answer at every
// third token of each
static void seed_recall(const char *name, const int *lens, int n) {
    char path[1400];
    fclose(seed_open("recall", name, path, sizeof path));
    int total = 0, pairs[16];
    for (int i = 0; i < n; i++) { total += lens[i]; pairs[i] = 1 + i % 2; }
    uint16_t *tok = malloc_check((size_t)total * sizeof(uint16_t), "seed"), *dist = malloc_check((size_t)total * sizeof(uint16_t), "seed");
    for (int i = 0; i < total; i++) tok[i] = (uint16_t)((i * 3 + 1) % 5);
    for (int i = 0, off = 0; i < n; off += lens[i++])
        for (int j = 0; j < lens[i]; j++) dist[off + j] = (uint16_t)(j % 3 == 2 ? j : 0);
    write_recall(path, RECALL_MAGIC, n, lens, pairs, tok, dist, total, 0);
    free(tok); free(dist);
}

static void seed_checkpoint(const char *name, Config c) {
    const char *problem = config_problem(&c);
    if (problem) die("seed %s: %s", name, problem);
    Model m;
    model_init_random(&m, &c, 0.5f, 7);
    char path[1400];
    fclose(seed_open("checkpoint", name, path, sizeof path));
    model_save(&m, path);
    model_free(&m);
}

// context blocks: the block (and embed_in) of a model of config c, as --phase 1 writes it
static void seed_ctxblock(const char *name, Config c) {
    const char *problem = config_problem(&c);
    if (problem) die("seed %s: %s", name, problem);
    Model m;
    model_init_random(&m, &c, 0.5f, 11);
    char path[1400];
    fclose(seed_open("ctxblock", name, path, sizeof path));
    context_block_save(&m, path);
    model_free(&m);
}

// training states: a model of config c after one step on a 4-token batch, so that the
// AdamW moments are not all zero, saved as --out saves it
static void seed_trainstate(const char *name, Config c) {
    const char *problem = config_problem(&c);
    if (problem) die("seed %s: %s", name, problem);
    Model m;
    model_init_random(&m, &c, 0.5f, 7);
    int in[4], tg[4];
    for (int t = 0; t < 4; t++) { in[t] = (t * 7 + 1) % c.vocab_size; tg[t] = (t * 7 + 8) % c.vocab_size; }
    model_forward(&m, in, tg, 1, 4);
    model_zero_grad(&m);
    model_backward(&m);
    AdamW opt = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f};
    model_update(&m, &opt);
    TrainState st = {.step = 1, .epoch = 0, .shard_index = 0, .pos = 4, .shuffle = 0, .rng = 0x9E3779B97F4A7C15ull, .B = 1, .T = 4, .tokens_seen = 4};
    char path[1400];
    fclose(seed_open("trainstate", name, path, sizeof path));
    train_state_save(&m, path, &st);
    model_free(&m);
}

// LAMBADA files: examples as (n_ctx, n_tgt) pairs, tokens below vocab 5
static void seed_lambada(const char *name, const int (*pairs)[2], int n) {
    char path[1400];
    FILE *f = seed_open("lambada", name, path, sizeof path);
    int h[HEADER_INTS] = {0}, total = 0;
    for (int i = 0; i < n; i++) total += pairs[i][0] + pairs[i][1];
    h[0] = 20261128; h[1] = 1; h[2] = n; h[3] = total;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    fwrite_check(pairs, sizeof(int), 2 * (size_t)n, f, path);
    for (int i = 0; i < total; i++) { uint16_t t = (uint16_t)((i * 3 + 1) % 5); fwrite_check(&t, sizeof t, 1, f, path); }
    fclose(f);
}

static void put_token(FILE *f, const char *path, const void *bytes, int len) {
    unsigned char l[2] = {(unsigned char)(len & 255), (unsigned char)(len >> 8)};
    fwrite_check(l, 1, 2, f, path);
    fwrite_check(bytes, 1, len, f, path);
}

static void seed_refstate(const char *name, int B, int T, int V, int P, int S) {
    char path[1400];
    FILE *f = seed_open("refstate", name, path, sizeof path);
    int h[HEADER_INTS] = {0};
    h[0] = 20261125; h[1] = 1; h[2] = B; h[3] = T; h[4] = V; h[5] = P; h[6] = S;
    const float hp[6] = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f};
    for (int i = 0; i < 6; i++) h[16 + i] = float_bits(hp[i]);
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < B * T; i++) { int id = k == 1 && i == B * T - 1 ? IGNORE_INDEX : (i + k) % V; fwrite_check(&id, sizeof id, 1, f, path); }
    uint64_t rng = 3;
    for (int i = 0; i < B * T * V + 1 + P + S; i++) { float x = random_normal(&rng); fwrite_check(&x, sizeof x, 1, f, path); }
    fclose(f);
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) { fprintf(stderr, "usage: make_seeds DIR [TOKENIZER.bin]\n"); return 2; }
    snprintf(out_dir, sizeof out_dir, "%s", argv[1]);

    // shards: a few documents (<|endoftext|> = 0 before each), the largest id, too few tokens
    uint16_t tok[64];
    for (int i = 0; i < 64; i++) tok[i] = i % 16 == 0 ? 0 : (uint16_t)(i * 997 % 50304);
    tok[63] = 50303;
    seed_shard("docs.bin", tok, 64);
    seed_shard("short.bin", tok, 9); // exactly one batch of the target's B*T+1
    seed_shard("empty.bin", tok, 0);
    seed_masked_shard("masked.bin", tok, 13, 4); // three examples of the target's T = 4, and one token

    // checkpoints: one per attention variant and Context-KV layout
    Config c = fuzz_small_config();
    seed_checkpoint("mha.bin", c);
    c.attn_type = ATTN_GQA; c.n_head = 4; c.n_embd = 8; c.n_kv_head = 2; c.embed_dim = 8;
    seed_checkpoint("gqa.bin", c);
    c = fuzz_small_config(); c.attn_type = ATTN_MQA; c.n_kv_head = 1;
    seed_checkpoint("mqa.bin", c);
    c = fuzz_small_config(); c.attn_type = ATTN_MLA; c.n_kv_head = 2; c.kv_rank = 2; c.mla_rope_dim = 2; c.mla_rope_split = 1; c.rms_eps = 1e-6f;
    seed_checkpoint("mla.bin", c);
    c.q_rank = 2;
    seed_checkpoint("mla_qrank.bin", c);
    c = fuzz_small_config(); c.n_layer = 2; c.layer0_type = LAYER0_CTXKV; c.context_dim = 2; c.context_interval = 2; c.max_contexts = 2;
    seed_checkpoint("ctxkv.bin", c);
    c = fuzz_small_config(); c.model_type = MODEL_CTXPYTHIA; c.n_embd = 2; c.n_head = 1; c.n_kv_head = 1; c.context_dim = 2; c.embed_dim = 4;
    seed_checkpoint("ctxpythia.bin", c);

    // a context block for the layer-0 ctxkv model above (fuzz_ctxblock loads it into that model)
    c = fuzz_small_config(); c.n_layer = 2; c.layer0_type = LAYER0_CTXKV; c.context_dim = 2; c.context_interval = 2; c.max_contexts = 2;
    seed_ctxblock("ctxkv.bin", c);

    // training states (parameters, m and v: three copies), at width 2 so they stay under 16 KB
    c = fuzz_small_config(); c.n_embd = 2; c.n_head = 1; c.n_kv_head = 1; c.embed_dim = 2;
    seed_trainstate("mha.bin", c);
    c.n_layer = 2; c.layer0_type = LAYER0_CTXKV; c.context_dim = 2; c.context_interval = 2; c.max_contexts = 2;
    seed_trainstate("ctxkv.bin", c);

    // LAMBADA: short examples, one of 8 input tokens (the model's max_seq_len), one of 9 (skipped)
    const int lam[][2] = {{3, 1}, {2, 2}, {7, 2}, {9, 1}, {1, 1}};
    seed_lambada("small.bin", lam, 5);
    seed_lambada("one.bin", lam + 4, 1);

    // recall: examples of 8 (the model's max_seq_len), 8, 5 and 3 tokens: batches of 2, 1, 1
    const int rec[] = {8, 8, 5, 3};
    seed_recall("small.bin", rec, 4);

    // token tables: hand-made (an empty token, UTF-8, a 300-byte token), and a cut of the real one
    char path[1400];
    FILE *f = seed_open("toktab", "small.bin", path, sizeof path);
    int h[HEADER_INTS] = {0};
    h[0] = TOKTAB_MAGIC; h[1] = TOKTAB_VERSION; h[2] = 6; h[3] = 0;
    fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
    char spaces[300];
    memset(spaces, ' ', sizeof spaces);
    put_token(f, path, "<|endoftext|>", 13);
    put_token(f, path, "", 0);
    put_token(f, path, "a", 1);
    put_token(f, path, " the", 4);
    put_token(f, path, "\xc3\xa9\xe2\x82", 4); // é, then a partial sequence
    put_token(f, path, spaces, 300);
    fclose(f);
    if (argc == 3) {
        FILE *in = fopen_check(argv[2], "rb");
        fread_check(h, sizeof(int), HEADER_INTS, in, argv[2]);
        const int n = h[2] < 300 ? h[2] : 300;
        h[2] = n;
        f = seed_open("toktab", "neox_300.bin", path, sizeof path);
        fwrite_check(h, sizeof(int), HEADER_INTS, f, path);
        for (int i = 0; i < n; i++) {
            unsigned char l[2], bytes[65536];
            fread_check(l, 1, 2, in, argv[2]);
            int len = l[0] | l[1] << 8;
            fread_check(bytes, 1, len, in, argv[2]);
            put_token(f, path, bytes, len);
        }
        fclose(f);
        fclose(in);
    }

    // reference states: the smallest, and one with optimizer steps and an ignored target
    seed_refstate("min.bin", 1, 1, 1, 1, 0);
    seed_refstate("steps.bin", 2, 3, 5, 7, 3);
    printf("wrote seeds under %s\n", out_dir);
    return 0;
}
