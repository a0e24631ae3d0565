// ctxkv/data.h: llm.c token shards (validated when opened), the training/validation data
// loader (file order or --shuffle, exact on resume), and the token table that prints samples.
// Formats: doc/formats.md. Shared by both programs.
#ifndef CTXKV_DATA_H
#define CTXKV_DATA_H
#include "config.h"

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
    uint8_t *mask;       // its loss mask (version 2 shards), else NULL: every target scored
    size_t ntok;
    size_t n_blocks;     // whole B*T-token blocks in the current shard (each read with its next token)
    int *block_order;    // (n_blocks) with --shuffle, this epoch's order of the blocks
    size_t pos;          // tokens read from the current shard, a multiple of B*T: next block = pos / (B*T)
    int *inputs, *targets; // (B,T)
} DataLoader;

// A shard: N token ids and, in version 2 (SHARD_VERSION_MASKED, doc/formats.md), a loss mask
// of N bytes (1: token i is a target that is scored) and the example length: the shard is whole
// examples of that many tokens, back to back, so that B*T blocks start on an example when T equals
// it. The recall workload (prepro/mqar.py) writes version 2: the loss falls on its answers only.
typedef struct {
    uint16_t *tokens;    // (N)
    uint8_t *mask;       // (N) version 2, else NULL
    size_t ntok;
    int example_len;     // version 2: tokens per example, else 0
} Shard;

// Reads and validates one shard. Every token must be < vocab_size.
static Shard shard_read(const char *path, int vocab_size) {
    FILE *f = fopen_check(path, "rb");
    int h[HEADER_INTS];
    long long size = file_size(f);
    if (size < (long long)sizeof h) die("'%s' is too small to be a token shard (%lld bytes, header is 1024)", path, size);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != SHARD_MAGIC) die("'%s' is not a token shard (magic %d, expected %d)", path, h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION && h[1] != SHARD_VERSION_MASKED)
        die("'%s' has shard version %d, expected %d (tokens) or %d (tokens and a loss mask)", path, h[1], SHARD_VERSION, SHARD_VERSION_MASKED);
    const int masked = h[1] == SHARD_VERSION_MASKED;
    if (h[2] < 0) die("'%s' has a negative token count", path);
    long long expect = (long long)sizeof h + (masked ? 3LL : 2LL) * h[2];
    if (size != expect) die("'%s' has %lld bytes but its header says %d tokens (%lld bytes): truncated or corrupt", path, size, h[2], expect);
    Shard s = {NULL, NULL, (size_t)h[2], 0};
    if (masked) {
        s.example_len = h[3];
        if (h[3] < 1 || (s.ntok > 0 && (s.ntok - 1) % (size_t)h[3] != 0))
            die("'%s': example length %d does not divide its %zu tokens (whole examples and one more token)", path, h[3], s.ntok);
    }
    s.tokens = (uint16_t *)malloc_check(s.ntok * sizeof(uint16_t) + 1, "shard tokens");
    fread_check(s.tokens, sizeof(uint16_t), s.ntok, f, path);
    if (masked) {
        s.mask = (uint8_t *)malloc_check(s.ntok + 1, "shard mask");
        fread_check(s.mask, 1, s.ntok, f, path);
        for (size_t i = 0; i < s.ntok; i++)
            if (s.mask[i] > 1) die("'%s': loss mask byte %u at index %zu is not 0 or 1", path, s.mask[i], i);
    }
    fclose(f);
    for (size_t i = 0; i < s.ntok; i++)
        if (s.tokens[i] >= vocab_size) die("'%s': token %u at index %zu is outside the model's vocabulary (%d)", path, s.tokens[i], i, vocab_size);
    return s;
}

// the token ids of a shard (any version), for readers that score every token
static uint16_t *shard_load(const char *path, size_t *ntok_out, int vocab_size) {
    Shard s = shard_read(path, vocab_size);
    free(s.mask);
    *ntok_out = s.ntok;
    return s.tokens;
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
        free(d->mask);
        Shard s = shard_read(d->files[file], d->vocab_size);
        d->tokens = s.tokens;
        d->mask = s.mask;
        d->ntok = s.ntok;
        d->loaded = file;
        if (s.mask && s.example_len != d->T)
            die("'%s' holds examples of %d tokens with a loss mask: -t must be %d (it is %d), so that each row is one example", d->files[file], s.example_len, s.example_len, d->T);
        if (d->ntok < (size_t)d->B * d->T + 1)
            die("'%s' has %zu tokens, fewer than one batch needs (B*T+1 = %d)", d->files[file], d->ntok, d->B * d->T + 1);
    }
    d->shard_index = slot;
    d->pos = 0;
    d->n_blocks = (d->ntok - 1) / ((size_t)d->B * d->T);
    if (d->shuffle) {
        free(d->block_order);
        d->block_order = (int *)malloc_check(d->n_blocks * sizeof(int), "block order");
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
    d->inputs = (int *)malloc_check((size_t)B * T * sizeof(int), "batch");
    d->targets = (int *)malloc_check((size_t)B * T * sizeof(int), "batch");
    d->shard_order = (int *)malloc_check(arrlen(d->files) * sizeof(int), "shard order");
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

// Next (B,T) batch: the next block of B consecutive windows of T+1 tokens (targets the mask does
// not score are IGNORE_INDEX); moves to the next
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
    const uint8_t *scored = d->mask ? d->mask + block * BT + 1 : NULL; // scored[i]: target i has loss
    for (size_t i = 0; i < BT; i++) {
        d->inputs[i] = buf[i];
        d->targets[i] = !scored || scored[i] ? buf[i + 1] : IGNORE_INDEX;
    }
    d->pos += BT;
}

// how many whole batches the first shard holds (used to cap validation)
static int dataloader_batches_in_shard(const DataLoader *d) { return (int)d->n_blocks; }

static void dataloader_free(DataLoader *d) {
    for (ptrdiff_t i = 0; i < arrlen(d->files); i++) free(d->files[i]);
    arrfree(d->files);
    free(d->tokens); free(d->mask); free(d->inputs); free(d->targets);
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
        t.bytes = (char *)malloc_check(t.len + 1, "token");
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

#endif
