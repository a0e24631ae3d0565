// ctxkv/eval.h: validation loss, the evaluation suite (held-out loss by sliding window, LAMBADA
// accuracy and perplexity, generation throughput) and KV-cached generation with sampling.
// Shared by both programs; doc/evaluation.md says what each number means.
//
// It reaches the model through this interface, which each program implements:
//   model_forward(m, inputs, targets, B, T)  mean loss (-1 without targets); host ids
//   model_losses(m)                          the last forward's per-position losses (B*T), host
//   model_logits_host(m, row0, n)            rows row0.. of the last forward's logits (Vp each), host
//   m->head_from                             forward computes logits only for rows >= head_from
//   kvcache_new(cfg, B, n_prompt, n_new, policy) / kvcache_free(kv), KVCache.bytes; m->kv_policy
//   model_prefill(m, kv, prompts, n, &row_stride)  the logits of each prompt's last token, host,
//                                                  row b at b * row_stride
//   model_decode_step(m, kv, tokens)         one token per sequence; the logits (B, Vp), host
//                                            (both: the caller may overwrite them until its next call)
//   model_sync()                             waits for the device (timing)
//   exp_scaled_sum(dst, x, n, shift, scale)  dst = exp((x − shift)·scale), returns the sum (sampling)
//   max_of(x, n), sum_of(x, n)               the largest entry (NaN passed over), the float sum (sampling)
#ifndef CTXKV_EVAL_H
#define CTXKV_EVAL_H
#include "data.h"

// the index of the largest of x[0..n) (the first, on ties): the greedy token, and what LAMBADA
// and recall count as the prediction
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

// mean loss over up to max_batches batches of the first validation shard
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

// log p(target) under the logits z (V), in double
static double logprob_of(const float *z, int V, int target) {
    const double mx = z[argmax(z, V)];
    double se = 0.0;
    for (int v = 0; v < V; v++) se += exp((double)z[v] - mx);
    return z[target] - mx - log(se);
}

// Evaluation by decoding (doc/evaluation.md "Decode mode"): eviction only changes what is scored
// through the cache, never the parallel forward. decode_score prefills the first n_ctx tokens of
// the B sequences x (B, L), under the policy, then feeds x[:, n_ctx .. L−2] one token per
// sequence at a time; score(ctx, b, j, z) receives the logits z (Vp) that predict x[b, j+1],
// for j = n_ctx−1 .. L−2 (the last token is only a target). keep: NULL, or where the cache goes
// afterwards (the caller frees it; the tests read its bytes and kept positions).
typedef void (*DecodeScoreFn)(void *ctx, int b, int j, const float *z);
static void decode_score(Model *m, const KVPolicy *policy, const int *x, int B, int L, int n_ctx, DecodeScoreFn score,
                         void *ctx, KVCache *keep) {
    KVCache kv = kvcache_new(&m->cfg, B, n_ctx, L - 1 - n_ctx, policy);
    int *prompts = (int *)malloc_check((size_t)B * n_ctx * sizeof(int), "decode eval"), *next = (int *)malloc_check(B * sizeof(int), "decode eval");
    for (int b = 0; b < B; b++) memcpy(prompts + (size_t)b * n_ctx, x + (size_t)b * L, n_ctx * sizeof(int));
    size_t stride;
    const float *z = model_prefill(m, &kv, prompts, n_ctx, &stride);
    for (int j = n_ctx - 1; j < L - 1; j++) {
        if (j >= n_ctx) {
            for (int b = 0; b < B; b++) next[b] = x[(size_t)b * L + j];
            z = model_decode_step(m, &kv, next);
            stride = m->cfg.padded_vocab_size;
        }
        for (int b = 0; b < B; b++) score(ctx, b, j, z + b * stride);
    }
    if (keep) *keep = kv;
    else kvcache_free(&kv);
    free(prompts);
    free(next);
}

typedef struct { const int *x; int L, V; double total; long long count; } LossSum;
static void loss_sum_score(void *ctx, int b, int j, const float *z) {
    LossSum *ls = (LossSum *)ctx;
    ls->total -= logprob_of(z, ls->V, ls->x[(size_t)b * ls->L + j + 1]);
    ls->count++;
}

// Held-out loss by a sliding window of T tokens with stride T/2: each window scores only the
// targets no earlier window scored, so every token is predicted once, with at least T/2
// tokens of context after the first window. Returns the mean loss; *scored = tokens counted.
// decode_batch > 0: by decoding, that many windows at a time: each full window prefills its
// first T − T/2 + 1 tokens and scores the rest, so the targets are those the parallel mode
// scores after its first window (the same contexts), and a tail shorter than T is not scored.
static float eval_heldout(Model *m, const char *path, int T, int max_tokens, long long *scored, int decode_batch) {
    size_t ntok;
    uint16_t *tok = shard_load(path, &ntok, m->cfg.vocab_size);
    if (ntok < 2) die("'%s' has fewer than 2 tokens", path);
    const int stride = T / 2 > 0 ? T / 2 : 1;
    if (decode_batch > 0) {
        if (ntok < (size_t)T + 1) die("'%s' has %zu tokens: decode-mode held-out needs a full window of -t %d + 1", path, ntok, T);
        int *x = (int *)malloc_check((size_t)decode_batch * (T + 1) * sizeof(int), "heldout");
        LossSum ls = {x, T + 1, m->cfg.vocab_size, 0.0, 0};
        for (size_t s = 0; s + T + 1 <= ntok && !(max_tokens > 0 && ls.count >= max_tokens);) {
            int n = 0;
            for (; n < decode_batch && s + T + 1 <= ntok; n++, s += stride)
                for (int i = 0; i <= T; i++) x[(size_t)n * (T + 1) + i] = tok[s + i];
            decode_score(m, &m->kv_policy, x, n, T + 1, T - stride + 1, loss_sum_score, &ls, NULL);
        }
        free(x); free(tok);
        *scored = ls.count;
        return (float)(ls.total / ls.count);
    }
    int *x = (int *)malloc_check(T * sizeof(int), "heldout"), *y = (int *)malloc_check(T * sizeof(int), "heldout");
    double total = 0.0;
    long long count = 0;
    size_t done = 0; // targets tok[1..done] are scored
    for (size_t s = 0; done < ntok - 1; s += stride) {
        int len = (int)(ntok - 1 - s < (size_t)T ? ntok - 1 - s : (size_t)T);
        for (int i = 0; i < len; i++) {
            x[i] = tok[s + i];
            y[i] = s + i + 1 > done ? tok[s + i + 1] : IGNORE_INDEX; // target index s+i+1
        }
        model_forward(m, x, y, 1, len);
        const float *losses = model_losses(m);
        for (int i = 0; i < len; i++)
            if (y[i] != IGNORE_INDEX) { total += losses[i]; count++; }
        done = s + len;
        if (max_tokens > 0 && count >= max_tokens) break;
    }
    free(x); free(y); free(tok);
    *scored = count;
    return (float)(total / count);
}

#define LAMBADA_MAGIC 20261128
#define LAMBADA_VERSION 1
typedef struct { int n_ctx, n_tgt; size_t offset; } LambadaExample;

// LAMBADA: an example is correct when every token of the final word is the argmax given all
// preceding text; perplexity = exp(−mean over examples of Σ log p(final-word tokens)).
typedef struct { const int *x; int L, V, all_argmax; double logp; } LambadaScore;
static void lambada_score(void *ctx, int b, int j, const float *z) {
    LambadaScore *sc = (LambadaScore *)ctx;
    const int target = sc->x[(size_t)b * sc->L + j + 1];
    sc->all_argmax &= argmax(z, sc->V) == target;
    sc->logp += logprob_of(z, sc->V, target);
}

// decode: by decoding (the context prefilled under m->kv_policy, the final word token by token)
static void eval_lambada(Model *m, const char *path, int max_examples, float *acc, float *ppl, int *n_scored, int decode) {
    FILE *f = fopen_check(path, "rb");
    long long size = file_size(f);
    int h[HEADER_INTS];
    if (size < (long long)sizeof h) die("'%s' is too small to be a LAMBADA file", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != LAMBADA_MAGIC || h[1] != LAMBADA_VERSION) die("'%s' is not a LAMBADA eval file (magic %d, version %d)", path, h[0], h[1]);
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
    uint16_t *tok = (uint16_t *)malloc_check(off * sizeof(uint16_t), "lambada");
    fread_check(tok, sizeof(uint16_t), off, f, path);
    fclose(f);
    const int V = m->cfg.vocab_size;
    // every token, the last target token too: it is read as a logits column, never fed to the model
    for (size_t i = 0; i < off; i++)
        if (tok[i] >= V) die("'%s': token %u at index %zu is outside the model's vocabulary (%d)", path, tok[i], i, V);
    int n = (int)arrlen(ex), correct = 0, used = 0;
    if (max_examples > 0 && max_examples < n) n = max_examples;
    double sum_logp = 0.0;
    int *x = NULL;
    LambadaScore sc = {NULL, 0, V, 0, 0.0};
    for (int i = 0; i < n; i++) {
        int L = ex[i].n_ctx + ex[i].n_tgt - 1; // the input is everything but the last target token
        if (L > m->cfg.max_seq_len) continue;  // longer than the model sees: not scored
        arrsetlen(x, L + 1);
        for (int j = 0; j <= L; j++) x[j] = tok[ex[i].offset + j];
        sc.x = x; sc.L = L + 1; sc.all_argmax = 1; sc.logp = 0.0;
        if (decode) decode_score(m, &m->kv_policy, x, 1, L + 1, ex[i].n_ctx, lambada_score, &sc, NULL);
        else {
            m->head_from = ex[i].n_ctx - 1;
            model_forward(m, x, NULL, 1, L);
            for (int j = ex[i].n_ctx - 1; j < L; j++) lambada_score(&sc, 0, j, model_logits_host(m, j, 1));
        }
        correct += sc.all_argmax;
        sum_logp += sc.logp;
        used++;
    }
    m->head_from = 0;
    arrfree(x); arrfree(ex); free(tok);
    *acc = used ? (float)correct / used : 0.0f;
    *ppl = used ? (float)exp(-sum_logp / used) : 0.0f;
    *n_scored = used;
}

// Associative recall (MQAR, prepro/mqar.py; doc/formats.md "Evaluation files"): each example is
// key-value pairs, then queries of earlier keys, each followed by its value. An answer is right
// when the value is the argmax after its query key (exact match, answer tokens only). Accuracy
// overall, by the example's number of pairs, and by the distance from the key's pair to the query
// in power-of-two buckets [2^k, 2^(k+1)). Examples of one length run B at a time.
#define RECALL_MAGIC 20261201
#define RECALL_VERSION 1
#define RECALL_BUCKETS 17 // distances 1 .. 65535
typedef struct {
    long long answers, correct;
    int n_examples;
    int n_groups, group_pairs[64];                       // distinct pair counts, in order of appearance
    long long group_answers[64], group_correct[64];
    long long dist_answers[RECALL_BUCKETS], dist_correct[RECALL_BUCKETS];
} RecallResult;

static int recall_bucket(int d) { int k = 0; while (d >>= 1) k++; return k; }

// scores the answer tokens x[b, j+1] (dist > 0) of a batch; groups[b]: the pair-count group of row b
typedef struct { RecallResult *r; const int *x; const uint16_t *dist; int L, V; const int *groups; } RecallScore;
static void recall_score(void *ctx, int b, int j, const float *z) {
    RecallScore *sc = (RecallScore *)ctx;
    const size_t at = (size_t)b * sc->L + j + 1;
    if (!sc->dist[at]) return;
    RecallResult *r = sc->r;
    const int ok = argmax(z, sc->V) == sc->x[at], k = recall_bucket(sc->dist[at]), g = sc->groups[b];
    r->answers++; r->correct += ok;
    r->group_answers[g]++; r->group_correct[g] += ok;
    r->dist_answers[k]++; r->dist_correct[k] += ok;
}

// decode: by decoding, each example's key-value pairs (its first 2·pairs tokens) prefilled under
// m->kv_policy, then the queries token by token
static RecallResult eval_recall(Model *m, const char *path, int B, int decode) {
    FILE *f = fopen_check(path, "rb");
    long long size = file_size(f);
    int h[HEADER_INTS];
    if (size < (long long)sizeof h) die("'%s' is too small to be a recall eval file", path);
    fread_check(h, sizeof(int), HEADER_INTS, f, path);
    if (h[0] != RECALL_MAGIC || h[1] != RECALL_VERSION) die("'%s' is not a recall eval file (magic %d, version %d; expected %d, %d: prepro/mqar.py writes it)", path, h[0], h[1], RECALL_MAGIC, RECALL_VERSION);
    if (h[2] < 1 || h[3] < 0) die("'%s': bad example/token counts", path);
    if (size != (long long)sizeof h + 8LL * h[2] + 4LL * h[3]) die("'%s' is truncated or corrupt (size %lld)", path, size);
    int *meta = (int *)malloc_check(8 * (size_t)h[2], "recall");
    fread_check(meta, sizeof(int), 2 * (size_t)h[2], f, path);
    const size_t ntok = (size_t)h[3];
    uint16_t *tok = (uint16_t *)malloc_check(ntok * sizeof(uint16_t) + 1, "recall"), *dist = (uint16_t *)malloc_check(ntok * sizeof(uint16_t) + 1, "recall");
    fread_check(tok, sizeof(uint16_t), ntok, f, path);
    fread_check(dist, sizeof(uint16_t), ntok, f, path);
    fclose(f);
    const int V = m->cfg.vocab_size;
    RecallResult r;
    memset(&r, 0, sizeof r);
    size_t off = 0;
    for (int i = 0; i < h[2]; i++) {
        const int len = meta[2 * i], pairs = meta[2 * i + 1];
        if (len < 2 || pairs < 1 || off + len > ntok) die("'%s': example %d has bad length %d or pair count %d", path, i, len, pairs);
        if (len > m->cfg.max_seq_len) die("'%s': example %d has %d tokens, more than the model's %d", path, i, len, m->cfg.max_seq_len);
        if (dist[off] != 0) die("'%s': example %d: its first token cannot be an answer", path, i);
        if (decode) { // the prefill is the pairs: every answer comes after them
            if (2 * pairs >= len) die("'%s': example %d: %d pairs leave no queries in %d tokens", path, i, pairs, len);
            for (int j = 0; j < 2 * pairs; j++)
                if (dist[off + j]) die("'%s': example %d: an answer at %d is inside its %d pairs (decode mode prefills them)", path, i, j, pairs);
        }
        off += len;
    }
    if (off != ntok) die("'%s': example lengths do not add up to the token count", path);
    for (size_t i = 0; i < ntok; i++)
        if (tok[i] >= V) die("'%s': token %u at index %zu is outside the model's vocabulary (%d)", path, tok[i], i, V);
    int *x = NULL; // stb_ds array
    int *g = (int *)malloc_check((size_t)B * sizeof(int), "recall"); // the pair-count group of each row of a batch
    RecallScore sc = {&r, NULL, NULL, 0, V, g};
    off = 0;
    for (int i = 0; i < h[2];) {
        const int len = meta[2 * i], pairs = meta[2 * i + 1];
        int n = 1; // examples i .. i+n-1: one batch of equal length (and, decoding, of equal pairs)
        while (n < B && i + n < h[2] && meta[2 * (i + n)] == len && (!decode || meta[2 * (i + n) + 1] == pairs)) n++;
        arrsetlen(x, (size_t)n * len);
        for (size_t j = 0; j < (size_t)n * len; j++) x[j] = tok[off + j];
        for (int b = 0; b < n; b++) {
            int k = 0;
            while (k < r.n_groups && r.group_pairs[k] != meta[2 * (i + b) + 1]) k++;
            if (k == r.n_groups) {
                if (k == 64) die("'%s': more than 64 distinct pair counts", path);
                r.group_pairs[r.n_groups++] = meta[2 * (i + b) + 1];
            }
            g[b] = k;
        }
        sc.x = x; sc.dist = dist + off; sc.L = len;
        if (decode) decode_score(m, &m->kv_policy, x, n, len, 2 * pairs, recall_score, &sc, NULL); // the pairs prefilled, then the queries
        else {
            model_forward(m, x, NULL, n, len);
            for (int b = 0; b < n; b++) {
                const float *z = model_logits_host(m, b * len, len); // row j predicts token j + 1
                for (int j = 0; j < len - 1; j++) recall_score(&sc, b, j, z + (size_t)j * m->cfg.padded_vocab_size);
            }
        }
        r.n_examples += n;
        i += n;
        off += (size_t)n * len;
    }
    arrfree(x); free(g); free(meta); free(tok); free(dist);
    if (r.answers == 0) die("'%s' has no answer tokens to score", path);
    return r;
}

// the result as JSON: {"acc": a, "answers": n, "by_pairs": {"4": a, ...}, "by_distance": {"1-1": a, "2-3": a, ...}}
static void recall_json(const RecallResult *r, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "{\"acc\": %.6f, \"answers\": %lld, \"examples\": %d, \"by_pairs\": {",
                                (double)r->correct / r->answers, r->answers, r->n_examples);
    for (int g = 0; g < r->n_groups && n < cap; g++)
        n += (size_t)snprintf(buf + n, cap - n, "%s\"%d\": %.6f", g ? ", " : "", r->group_pairs[g], (double)r->group_correct[g] / r->group_answers[g]);
    if (n < cap) n += (size_t)snprintf(buf + n, cap - n, "}, \"by_distance\": {");
    for (int k = 0, first = 1; k < RECALL_BUCKETS && n < cap; k++) {
        if (!r->dist_answers[k]) continue;
        n += (size_t)snprintf(buf + n, cap - n, "%s\"%d-%d\": %.6f", first ? "" : ", ", 1 << k, (2 << k) - 1, (double)r->dist_correct[k] / r->dist_answers[k]);
        first = 0;
    }
    if (n < cap) snprintf(buf + n, cap - n, "}}");
}

// ----------------------------------------------------------------------------
// Generation

// Sampling at a temperature, in two halves, so that a batch draws its coins in sequence order (the
// same RNG stream at any thread count) and then samples its rows in parallel:
//   sample_prepare: probs = exp((logits − max) / temperature) (V floats), returns their sum;
//                   probs may be logits itself (generation samples in place: a second buffer of
//                   B·V floats cost batch-8 decoding about 4% in memory traffic)
//   sample_draw:    the token whose cumulative probability first passes coin · sum, coin in [0, 1)
// Decoding samples every sequence at every step, so the passes over V are short: a vectorised
// max (max_of) and exp (exp_scaled_sum), and the coin located by block sums (sum_of).
static double sample_prepare(const float *logits, int V, float temperature, float *probs) {
    return exp_scaled_sum(probs, logits, V, max_of(logits, V), 1.0f / temperature);
}

static int sample_draw(const float *probs, int V, double sum, float coin01) {
    const double coin = coin01 * sum; // it falls in the first block of 256 whose running sum passes it
    double cdf = 0.0;
    for (int b0 = 0; b0 < V; b0 += 256) {
        const int b1 = b0 + 256 < V ? b0 + 256 : V;
        const double block = sum_of(probs + b0, b1 - b0);
        if (coin < cdf + block || b1 == V) {
            for (int k = b0; k < b1; k++) {
                cdf += probs[k];
                if (coin < cdf) return k;
            }
            return b1 - 1; // rounding left the coin past the last block's sum
        }
        cdf += block;
    }
    return V - 1;
}

// Picks a token from logits (V): argmax when temperature is 0, else a sample at that temperature.
// probs (V floats; NULL when temperature is 0) is scratch for the unnormalised probabilities.
static int sample_token(const float *logits, int V, float temperature, uint64_t *rng, float *probs) {
    if (temperature <= 0.0f) return argmax(logits, V);
    const double sum = sample_prepare(logits, V, temperature, probs);
    return sample_draw(probs, V, sum, random_f32(rng));
}

typedef struct { double seconds; int n_new; size_t cache_bytes; } GenStats;

// Generates n_new tokens after B prompts (B, n_prompt) with the KV cache; out (B, n_prompt
// + n_new) receives prompts and new ids. Prints sequence 0's new tokens as they come when tk
// is given. Returns the length of each sequence.
static int model_generate(Model *m, int B, const int *prompts, int n_prompt, int n_new, float temperature,
                          uint64_t *rng, int *out, const Tokenizer *tk, GenStats *st) {
    const int Vp = m->cfg.padded_vocab_size, len = n_prompt + n_new;
    KVCache kv = kvcache_new(&m->cfg, B, n_prompt, n_new, &m->kv_policy);
    int *next = (int *)malloc_check(B * sizeof(int), "generate");
    const int V = m->cfg.vocab_size;
    float *coins = (float *)malloc_check(B * sizeof(float), "sampling");
    double t0 = now_seconds();
    for (int b = 0; b < B; b++) memcpy(out + (size_t)b * len, prompts + (size_t)b * n_prompt, n_prompt * sizeof(int));
    size_t row_stride;
    float *logits = model_prefill(m, &kv, prompts, n_prompt, &row_stride);
    for (int i = 0; i < n_new; i++) {
        if (temperature > 0.0f) {
            for (int b = 0; b < B; b++) coins[b] = random_f32(rng); // in sequence order
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (B > 1)
#endif
            for (int b = 0; b < B; b++) {
                float *row = logits + b * row_stride; // its probabilities replace its logits
                next[b] = sample_draw(row, V, sample_prepare(row, V, temperature, row), coins[b]);
            }
        } else {
            for (int b = 0; b < B; b++) next[b] = sample_token(logits + b * row_stride, V, 0.0f, rng, NULL); // argmax
        }
        for (int b = 0; b < B; b++) out[(size_t)b * len + n_prompt + i] = next[b];
        if (tk) { tokenizer_print(tk, next[0]); fflush(stdout); }
        if (i + 1 < n_new) { logits = model_decode_step(m, &kv, next); row_stride = Vp; }
    }
    model_sync();
    if (st) { st->seconds = now_seconds() - t0; st->n_new = n_new; st->cache_bytes = kv.bytes; }
    kvcache_free(&kv);
    free(next);
    free(coins);
    return len;
}

// Generation throughput with the KV cache: B prompts of n_prompt tokens (from `tokens`),
// n_new new tokens each; tokens/s counts new tokens over the whole call (prefill included).
static float eval_generation(Model *m, int B, const uint16_t *tokens, size_t ntok, int n_prompt, int n_new, size_t *cache_bytes) {
    int *prompts = (int *)malloc_check((size_t)B * n_prompt * sizeof(int), "eval gen");
    for (size_t i = 0; i < (size_t)B * n_prompt; i++) prompts[i] = tokens[i % ntok];
    int *out = (int *)malloc_check((size_t)B * (n_prompt + n_new) * sizeof(int), "eval gen");
    uint64_t rng = 42;
    GenStats st;
    model_generate(m, B, prompts, n_prompt, n_new, 1.0f, &rng, out, NULL, &st);
    free(prompts); free(out);
    *cache_bytes = st.cache_bytes;
    return (float)((double)B * n_new / st.seconds);
}
#endif
