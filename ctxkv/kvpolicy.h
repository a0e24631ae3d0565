// ctxkv/kvpolicy.h: decode-time KV eviction (doc/kv_eviction.md) -- which cached tokens the
// decoder keeps, on top of whatever each token stores (the structural variants). Shared by both
// programs; they only move the kept slots (their model_prefill and model_decode_step).
//
//   full       every token
//   streaming  StreamingLLM (Xiao et al. 2023): the first `sinks` tokens and the most recent
//              budget − sinks; the recent part is a ring, so a new token overwrites the oldest
//   snapkv     SnapKV (Li et al. 2024): after the prefill, the budget − window prompt positions
//              the last `window` prompt queries attend to most (summed over those queries, then
//              average-pooled over `pool` neighbours), plus the window; new tokens are appended
//
// Positions are the original ones: a cached key keeps the RoPE of the position it was written
// at, and a new token is rotated by its true position, so a policy is exactly a mask on the full
// forward (dev/reference.py kv_eviction_reference checks that).
//
// A selection unit is the part of a slot that is kept or dropped as one (kv_units):
//   mha       each head (units = H; its K at h·D, its V at (H+h)·D)
//   gqa/mqa   each KV head, scored by the sum over its group of query heads (units = G)
//   mla       the token: the latent ĉ and the rope key k_pe serve every head, so the scores are
//             summed over all heads (units = 1)
// Every unit keeps the same number of slots, so the cache stays (B, slots, per_token) per layer.
// A Context-KV layer 0 keeps its ring of contexts, already bounded by (M−1)·I+1: the policy
// applies to layers 1..L−1. Context-Pythia's layers are ordinary attention: it applies to all.
#ifndef CTXKV_KVPOLICY_H
#define CTXKV_KVPOLICY_H
#include "args.h"

typedef enum { KV_FULL, KV_STREAMING, KV_SNAPKV } KVPolicyKind;
static const char *const KV_POLICY_NAMES[] = {"full", "streaming", "snapkv"};

typedef struct {
    int kind;    // KVPolicyKind
    int budget;  // slots per sequence per cached layer for the prompt (snapkv) or for everything (streaming)
    int sinks;   // streaming: first tokens always kept
    int window;  // snapkv: the observation window, the last prompt queries (kept too)
    int pool;    // snapkv: average-pooling kernel over positions (odd)
} KVPolicy;

static const KVPolicy KV_POLICY_FULL = {KV_FULL, 0, 0, 0, 0};

// the policy of --kv-policy / --kv-budget / --kv-sinks / --kv-window / --kv-pool, checked
static KVPolicy kv_policy_from_args(const Args *a) {
    KVPolicy p = {KV_FULL, a->kv_budget, a->kv_sinks, a->kv_window, a->kv_pool};
    const char *name = a->kv_policy ? a->kv_policy : "full";
    int k = 0;
    while (k < 3 && strcmp(name, KV_POLICY_NAMES[k])) k++;
    if (k == 3) die("--kv-policy must be one of full, streaming, snapkv; got '%s'", name);
    p.kind = k;
    const int budget_given = arg_given(a, "--kv-budget");
    if (p.kind == KV_FULL) {
        if (budget_given) die("--kv-budget %d needs --kv-policy streaming or snapkv (full keeps every token)", a->kv_budget);
        return p;
    }
    if (!budget_given) die("--kv-policy %s needs --kv-budget N (cached tokens per layer)", name);
    if (p.budget < 1) die("--kv-budget must be at least 1, got %d", p.budget);
    if (p.kind == KV_STREAMING && p.budget <= p.sinks)
        die("--kv-budget %d must exceed --kv-sinks %d: streaming keeps the sinks and budget - sinks recent tokens", p.budget, p.sinks);
    if (p.kind == KV_SNAPKV && p.budget < p.window)
        die("--kv-budget %d is smaller than --kv-window %d: snapkv keeps the observation window and budget - window selected tokens",
            p.budget, p.window);
    if (p.kind == KV_SNAPKV && p.pool % 2 == 0) die("--kv-pool must be odd (a centred kernel), got %d", p.pool);
    return p;
}

// a label for logs and metrics: "full", "streaming:64", "snapkv:64"
static void kv_policy_label(const KVPolicy *p, char *buf, size_t n) {
    if (p->kind == KV_FULL) snprintf(buf, n, "full");
    else snprintf(buf, n, "%s:%d", KV_POLICY_NAMES[p->kind], p->budget);
}

// does a prompt of n tokens lose tokens at the prefill? (streaming also evicts while decoding)
static int kv_policy_compresses(const KVPolicy *p, int n) { return p->kind != KV_FULL && n > p->budget; }

// slots per sequence per cached layer for a prompt of n_prompt tokens and n_new decoded after it
static int kv_policy_slots(const KVPolicy *p, int n_prompt, int n_new) {
    switch (p->kind) {
    case KV_STREAMING: return n_prompt + n_new < p->budget ? n_prompt + n_new : p->budget;
    case KV_SNAPKV: return (n_prompt < p->budget ? n_prompt : p->budget) + n_new;
    default: return n_prompt + n_new;
    }
}

// the slot the token at position pos is written to, when len slots are filled: streaming keeps
// the sinks at 0..S−1 and position p >= S at S + (p − S) mod (budget − S), so the newest
// overwrites the oldest recent token; the others append
static int kv_policy_slot_of(const KVPolicy *p, int pos, int len) {
    if (p->kind != KV_STREAMING) return len;
    if (pos < p->sinks) return pos;
    return p->sinks + (pos - p->sinks) % (p->budget - p->sinks);
}

// selection units of a layer of this kind (see the top of this file)
static int kv_units(const Config *c, int kind) {
    switch (kind) {
    case ATTN_MLA: return 1;
    case ATTN_MHA: return c->n_head;
    default: return c->n_kv_head;
    }
}

// the floats of unit u in a slot: two runs, [off[0], off[0]+len) and [off[1], off[1]+len)
// (K and V of a head; mla: the whole slot, as one run and an empty one)
static int kv_unit_runs(const Config *c, int kind, int u, size_t off[2]) {
    const int D = head_dim(c), units = kv_units(c, kind);
    if (kind == ATTN_MLA) { off[0] = 0; off[1] = 0; return c->kv_rank + c->mla_rope_dim; }
    off[0] = (size_t)u * D;
    off[1] = (size_t)(units + u) * D;
    return D;
}

// qsort order of scored positions: the higher score first, the lower position on ties
typedef struct { double score; int pos; } KVScored;
static int kv_scored_cmp(const void *a, const void *b) {
    const KVScored *x = (const KVScored *)a, *y = (const KVScored *)b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->pos - y->pos;
}
static int int_cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

// The prefill's choice for one sequence of one layer of this kind: keep (units, slots) receives,
// for each unit and slot, the prompt position the slot holds, for a prompt of P tokens
// compressed to slots = budget. win (H, w, P), w = min(window, P): the attention probabilities of
// the last w prompt queries (rows P−w..P−1) over the P prompt keys; snapkv only (NULL otherwise).
//   streaming  slot s < S: position s; slot S + j: the recent position p with (p − S) mod W = j
//   snapkv     score_u(s) = Σ_{h in unit u} Σ_{t in window} att[h][t][s] for s < P − w,
//              pooled: avg over s−k/2 .. s+k/2 with zero padding (F.avg_pool1d, stride 1),
//              the top budget − w positions in increasing order, then the window P−w..P−1
static void kv_select_prompt(const KVPolicy *p, const Config *c, int kind, int P, const float *win, int *keep) {
    const int units = kv_units(c, kind), slots = p->budget;
    if (p->kind == KV_STREAMING) {
        const int W = p->budget - p->sinks;
        for (int s = 0; s < p->sinks; s++) keep[s] = s;
        for (int pos = P - W; pos < P; pos++) keep[kv_policy_slot_of(p, pos, 0)] = pos;
        for (int u = 1; u < units; u++) memcpy(keep + (size_t)u * slots, keep, slots * sizeof(int));
        return;
    }
    const int w = p->window < P ? p->window : P, n = P - w, top = slots - w, H = c->n_head, per_unit = H / units, half = p->pool / 2;
    double *raw = (double *)malloc_check((size_t)n * sizeof(double) + 1, "snapkv scores");
    KVScored *sc = (KVScored *)malloc_check((size_t)n * sizeof(KVScored) + 1, "snapkv scores");
    for (int u = 0; u < units; u++) {
        int *k = keep + (size_t)u * slots;
        for (int s = 0; s < n; s++) raw[s] = 0.0;
        for (int h = u * per_unit; h < (u + 1) * per_unit; h++)
            for (int t = 0; t < w; t++) {
                const float *row = win + ((size_t)h * w + t) * P;
                for (int s = 0; s < n; s++) raw[s] += row[s];
            }
        for (int s = 0; s < n; s++) {
            double sum = 0.0;
            for (int j = s - half; j <= s + half; j++) if (j >= 0 && j < n) sum += raw[j];
            sc[s].score = sum / p->pool; // the padding counts as zeros (count_include_pad)
            sc[s].pos = s;
        }
        qsort(sc, n, sizeof *sc, kv_scored_cmp);
        for (int i = 0; i < top; i++) k[i] = sc[i].pos;
        qsort(k, top, sizeof(int), int_cmp);
        for (int i = 0; i < w; i++) k[top + i] = n + i;
    }
    free(raw);
    free(sc);
}

// --kv-report under the policy: the fp32 bytes of the decoder's cache after a prompt of
// n_prompt tokens and n_new decoded tokens, batch 1 (what --generate measures)
static size_t kv_policy_cache_bytes(const Config *c, const KVPolicy *p, int n_prompt, int n_new) {
    return 4 * kv_elements_for(c, (size_t)kv_policy_slots(p, n_prompt, n_new), (size_t)n_prompt + n_new);
}
#endif
