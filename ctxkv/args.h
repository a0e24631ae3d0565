// ctxkv/args.h: the command line of both programs. One table (ARG_SPECS) gives each flag's name,
// type, field, accepted range, default and help; it drives parsing, the defaults and -h, so each
// default is written once. Then the checks across flags, and the flags that shape the model
// config (attention variant, Context-KV) applied to a preset or a checkpoint's config.
#ifndef CTXKV_ARGS_H
#define CTXKV_ARGS_H
#include "config.h"

#define DEFAULT_MODEL "pythia-14m"
#define ARGS_MAX 96 // room for the table below

typedef struct {
    const char *model, *train, *val, *tokenizer, *out;
    const char *attn, *init_from, *prompt_ids; // attention variant flags (NULL = not given)
    int n_kv_head, kv_rank, rope_dim, q_rank;  // 0 = not given (q_rank: see arg_given)
    int rope_split, latent_norm;               // mla (latent_norm: see arg_given)
    int generate, kv_report;
    const char *resume;                        // DIR with a train_state.bin to continue from
    int checkpoint_every, stop_at;
    int shuffle;                               // --shuffle: random shard and block order (training data)
    const char *eval_heldout, *eval_lambada, *eval_recall; // evaluation (doc/formats.md "Evaluation files")
    int heldout_max_tokens, lambada_max, eval_gen, gen_prompt, gen_new;
    const char *kv_policy;                     // decode-time KV eviction (ctxkv/kvpolicy.h)
    int kv_budget, kv_sinks, kv_window, kv_pool, eval_decode;
    // Context-KV
    const char *layer0, *model_type, *context_block;
    int context_dim, context_interval, max_contexts, phase;
    int p1_iters, p1_rounds, oacd_slice;
    float p1_noise, p1_lr, p1_clip, p1_tol, p1_stop, oacd_lambda;
    int B, T, steps, warmup, val_every, val_batches, sample_every, sample_len, bench;
    float lr, min_lr_frac, weight_decay, beta1, beta2, eps, grad_clip, init_std, temperature;
    long long seed;
    unsigned char given[ARGS_MAX];             // given[i]: ARG_SPECS[i] was on the command line
} Args;

typedef enum { ARG_SECTION, ARG_STR, ARG_INT, ARG_INT64, ARG_FLOAT, ARG_SWITCH } ArgType;

typedef struct {
    const char *name;   // "--lr"; for ARG_SECTION the heading printed by -h
    ArgType type;
    size_t offset;      // of the field in Args
    double lo, hi;      // accepted range of a number
    const char *def;    // the default, parsed as if given; NULL: not set (help says what that means)
    const char *meta;   // the value's name in -h
    const char *help;
} ArgSpec;

#define SECTION(title) {title, ARG_SECTION, 0, 0, 0, NULL, NULL, NULL}
#define ARG(name, type, field, lo, hi, def, meta, help) {name, type, offsetof(Args, field), lo, hi, def, meta, help}
static const ArgSpec ARG_SPECS[] = {
    SECTION("model"),
    ARG("--model", ARG_STR, model, 0, 0, NULL, "NAME|FILE", "preset for random init (pythia-14m, pythia-70m, pythia-160m, pythia-mqar, tiny) or a checkpoint file [" DEFAULT_MODEL "]"),
    SECTION("attention variant (stored in the checkpoint; with a checkpoint they must match it)"),
    ARG("--attn", ARG_STR, attn, 0, 0, NULL, "mha|gqa|mqa|mla", "attention variant [mha]"),
    ARG("--n-kv-head", ARG_INT, n_kv_head, 1, 1 << 16, NULL, "INT", "gqa: KV heads G, must divide the heads [H/4; H/2 if H = 4 or 4 does not divide H]"),
    ARG("--kv-rank", ARG_INT, kv_rank, 1, 1 << 16, NULL, "INT", "mla: latent width d_c [4 * head dim]"),
    ARG("--rope-dim", ARG_INT, rope_dim, 1, 1 << 16, NULL, "INT", "mla: decoupled RoPE dims d_R (even) [head dim]"),
    ARG("--q-rank", ARG_INT, q_rank, 0, 1 << 16, "0", "INT", "mla: query latent width, 0 = none"),
    ARG("--rope-split", ARG_INT, rope_split, 1, 1 << 16, NULL, "INT", "mla: the d_R dims rotate as S groups of d_R/S [1; H when converting from mha]"),
    ARG("--latent-norm", ARG_INT, latent_norm, 0, 1, NULL, "0|1", "mla: RMSNorm on the KV latent [1; 0 when converting from mha]"),
    ARG("--init-from", ARG_STR, init_from, 0, 0, NULL, "FILE", "start from an mha checkpoint, converted to the --attn variant (gqa/mqa: K and V heads mean-pooled per group; mla: an SVD of K and V, doc/retrofit.md)"),
    SECTION("Context-KV (doc/context_kv.md)"),
    ARG("--layer0", ARG_STR, layer0, 0, 0, NULL, "ctxkv", "layer 0 attends over ContextBlock contexts; the others use --attn"),
    ARG("--model-type", ARG_STR, model_type, 0, 0, NULL, "ctxpythia", "every layer at the context width, fed by the contexts"),
    ARG("--context-dim", ARG_INT, context_dim, 1, 1 << 16, NULL, "INT", "context width d_c [width / 2]"),
    ARG("--context-interval", ARG_INT, context_interval, 1, 1 << 20, "32", "INT", "I: slot k holds the context at t - k*I"),
    ARG("--max-contexts", ARG_INT, max_contexts, 1, 1 << 20, "32", "INT", "M: slots per query"),
    ARG("--phase", ARG_INT, phase, 1, 2, NULL, "1|2", "1: train only the ContextBlock (OACD, parallel Jacobi iteration), save DIR/context_block.bin; 2: block frozen, train the rest [2]"),
    ARG("--context-block", ARG_STR, context_block, 0, 0, NULL, "FILE", "phase 2: load the block (and the embeddings it was trained on)"),
    ARG("--p1-iters", ARG_INT, p1_iters, 1, 1 << 20, "60", "INT", "phase 1: max Jacobi iterations per round"),
    ARG("--p1-rounds", ARG_INT, p1_rounds, 1, 1 << 20, "4", "INT", "phase 1: rounds, each on the next batch"),
    ARG("--p1-noise", ARG_FLOAT, p1_noise, 0, 10, "0.1", "FLOAT", "phase 1: noise std on the shifted contexts"),
    ARG("--p1-lr", ARG_FLOAT, p1_lr, 0, 10, "2e-3", "FLOAT", "phase 1: Adam lr"),
    ARG("--p1-clip", ARG_FLOAT, p1_clip, 0, 1e9, "2", "FLOAT", "phase 1: grad-norm clip"),
    ARG("--p1-tol", ARG_FLOAT, p1_tol, 0, 1e9, "0.03", "FLOAT", "phase 1: a position has converged if its mean squared change < tol"),
    ARG("--p1-stop", ARG_FLOAT, p1_stop, 0, 1, "0.9", "FLOAT", "phase 1: stop a round at this converged fraction"),
    ARG("--oacd-lambda", ARG_FLOAT, oacd_lambda, 0, 1e6, "0.1", "FLOAT", "OACD centroid weight"),
    ARG("--oacd-slice", ARG_INT, oacd_slice, 2, 1 << 30, "5000", "INT", "OACD slice of consecutive positions"),
    SECTION("evaluation (after training; with --steps 0 on a checkpoint, evaluation only)"),
    ARG("--eval-heldout", ARG_STR, eval_heldout, 0, 0, NULL, "FILE", "held-out loss, sliding window T, stride T/2 (data/eval/wikitext2_test.bin)"),
    ARG("--heldout-max-tokens", ARG_INT, heldout_max_tokens, 0, INT32_MAX, "0", "INT", "score at most this many tokens, 0 = all"),
    ARG("--eval-lambada", ARG_STR, eval_lambada, 0, 0, NULL, "FILE", "LAMBADA last-word accuracy and perplexity (data/eval/lambada_test.bin)"),
    ARG("--lambada-max", ARG_INT, lambada_max, 0, INT32_MAX, "0", "INT", "examples to score, 0 = all"),
    ARG("--eval-recall", ARG_STR, eval_recall, 0, 0, NULL, "FILE", "associative-recall accuracy on the answers, by pairs and distance (a test.bin of prepro/mqar.py)"),
    ARG("--eval-gen", ARG_SWITCH, eval_gen, 0, 0, NULL, NULL, "generation tokens/s with the KV cache at batch 1 and 8"),
    ARG("--gen-prompt", ARG_INT, gen_prompt, 1, 1 << 20, "128", "INT", "prompt tokens for --eval-gen"),
    ARG("--gen-new", ARG_INT, gen_new, 1, 1 << 20, "256", "INT", "new tokens for --eval-gen"),
    SECTION("decode-time KV eviction (doc/kv_eviction.md; decoding and decode-mode evaluation)"),
    ARG("--kv-policy", ARG_STR, kv_policy, 0, 0, "full", "full|streaming|snapkv", "which cached tokens the decoder keeps: all; StreamingLLM's sinks + recent window; SnapKV's prompt selection + appended new tokens"),
    ARG("--kv-budget", ARG_INT, kv_budget, 1, 1 << 30, NULL, "INT", "tokens kept per sequence per layer (streaming: all of them; snapkv: of the prompt)"),
    ARG("--kv-sinks", ARG_INT, kv_sinks, 0, 1 << 30, "4", "INT", "streaming: attention-sink tokens kept from the start"),
    ARG("--kv-window", ARG_INT, kv_window, 1, 1 << 30, "32", "INT", "snapkv: observation window, the last prompt queries whose attention scores the prompt"),
    ARG("--kv-pool", ARG_INT, kv_pool, 1, 1 << 20, "5", "INT", "snapkv: average-pooling kernel over positions (odd)"),
    ARG("--eval-decode", ARG_SWITCH, eval_decode, 0, 0, NULL, NULL, "evaluate by decoding: prefill each context, apply the policy, score the rest token by token (implied by a --kv-policy other than full)"),
    SECTION("data and training"),
    ARG("--train", ARG_STR, train, 0, 0, "data/tinyshakespeare/tiny_shakespeare_train.bin", "GLOB", "training shards"),
    ARG("--val", ARG_STR, val, 0, 0, "data/tinyshakespeare/tiny_shakespeare_val.bin", "GLOB", "validation shards ('' for none)"),
    ARG("--tokenizer", ARG_STR, tokenizer, 0, 0, "data/tokenizer.bin", "FILE", "token table for printing samples"),
    ARG("-b", ARG_INT, B, 1, 1 << 16, "4", "INT", "batch size B"),
    ARG("-t", ARG_INT, T, 1, 1 << 20, "256", "INT", "sequence length T"),
    ARG("--steps", ARG_INT, steps, 0, 1 << 30, "200", "INT", "optimizer steps (0: evaluation only)"),
    ARG("--lr", ARG_FLOAT, lr, 0, 10, "1e-3", "FLOAT", "peak learning rate"),
    ARG("--warmup", ARG_INT, warmup, 0, 1 << 30, "20", "INT", "linear warmup steps"),
    ARG("--min-lr-frac", ARG_FLOAT, min_lr_frac, 0, 1, "0.1", "FLOAT", "cosine decays to lr * this"),
    ARG("--wd", ARG_FLOAT, weight_decay, 0, 10, "0.1", "FLOAT", "AdamW weight decay (2-D tensors only)"),
    ARG("--beta1", ARG_FLOAT, beta1, 0, 0.999999, "0.9", "FLOAT", "AdamW beta1"),
    ARG("--beta2", ARG_FLOAT, beta2, 0, 0.999999, "0.95", "FLOAT", "AdamW beta2"),
    ARG("--eps", ARG_FLOAT, eps, 1e-30, 1, "1e-8", "FLOAT", "AdamW epsilon"),
    ARG("--clip", ARG_FLOAT, grad_clip, 0, 1e9, "1", "FLOAT", "global grad-norm clip, 0 = off"),
    ARG("--init-std", ARG_FLOAT, init_std, 0, 10, "0.02", "FLOAT", "std of the random init"),
    ARG("--seed", ARG_INT64, seed, 0, 9.2e18, "1337", "INT", "seed for init, sampling and --shuffle"),
    ARG("--shuffle", ARG_SWITCH, shuffle, 0, 0, NULL, NULL, "read the training shards, and the B*T blocks in each, in a random order each epoch (as llm.c); default: in file order"),
    ARG("--val-every", ARG_INT, val_every, 0, 1 << 30, "50", "INT", "val loss every N steps, 0 = only at the end"),
    ARG("--val-batches", ARG_INT, val_batches, 1, 1 << 20, "20", "INT", "batches per val estimate"),
    ARG("--sample-every", ARG_INT, sample_every, 0, 1 << 30, "100", "INT", "print a sample every N steps, 0 = never"),
    ARG("--sample-len", ARG_INT, sample_len, 1, 1 << 20, "64", "INT", "tokens per sample"),
    ARG("--temperature", ARG_FLOAT, temperature, 1e-3, 100, "1", "FLOAT", "sampling temperature"),
    ARG("--out", ARG_STR, out, 0, 0, NULL, "DIR", "write DIR/log.jsonl, DIR/model.bin, DIR/metrics.json, DIR/train_state.bin"),
    ARG("--checkpoint-every", ARG_INT, checkpoint_every, 0, 1 << 30, "0", "INT", "save DIR/train_state.bin every N steps (atomic), 0 = only at the end"),
    ARG("--stop-at", ARG_INT, stop_at, 1, 1 << 30, NULL, "INT", "save the training state after step N and exit (an interruption, for tests)"),
    ARG("--resume", ARG_STR, resume, 0, 0, NULL, "DIR", "continue exactly from DIR/train_state.bin (weights, AdamW state, step, data position, RNG); give the same flags as the original run"),
    SECTION("other modes (each prints its result and exits)"),
    ARG("--bench", ARG_INT, bench, 1, 1 << 20, NULL, "INT", "time N training steps on random tokens, print JSON"),
    ARG("--generate", ARG_INT, generate, 1, 1 << 20, NULL, "INT", "generate N tokens with the KV cache, print them and tokens/s"),
    ARG("--prompt-ids", ARG_STR, prompt_ids, 0, 0, "0", "LIST", "comma-separated prompt token ids for --generate"),
    ARG("--kv-report", ARG_SWITCH, kv_report, 0, 0, NULL, NULL, "print the KV-cache accounting as JSON"),
};
#undef SECTION
#undef ARG
#define N_ARG_SPECS ((int)(sizeof ARG_SPECS / sizeof ARG_SPECS[0]))
typedef char arg_specs_fit_in_args[N_ARG_SPECS <= ARGS_MAX ? 1 : -1];

// index of the flag NAME in ARG_SPECS, or -1
static int arg_index(const char *name) {
    for (int i = 0; i < N_ARG_SPECS; i++)
        if (ARG_SPECS[i].type != ARG_SECTION && !strcmp(ARG_SPECS[i].name, name)) return i;
    return -1;
}

// was the flag NAME on the command line?
static int arg_given(const Args *a, const char *name) {
    int i = arg_index(name);
    if (i < 0) die("internal: no flag %s", name);
    return a->given[i];
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

// sets the field of spec in a from the text v (NULL for a switch)
static void arg_set(Args *a, const ArgSpec *spec, const char *v) {
    char *field = (char *)a + spec->offset;
    switch (spec->type) {
    case ARG_STR: *(const char **)field = v; break;
    case ARG_INT: *(int *)field = (int)parse_int(spec->name, v, (long long)spec->lo, (long long)spec->hi); break;
    case ARG_INT64: *(long long *)field = parse_int(spec->name, v, (long long)spec->lo, INT64_MAX); break;
    case ARG_FLOAT: *(float *)field = parse_float(spec->name, v, (float)spec->lo, (float)spec->hi); break;
    case ARG_SWITCH: *(int *)field = 1; break;
    case ARG_SECTION: break;
    }
}

static Args default_args(void) {
    Args a;
    memset(&a, 0, sizeof a);
    for (int i = 0; i < N_ARG_SPECS; i++)
        if (ARG_SPECS[i].def) arg_set(&a, &ARG_SPECS[i], ARG_SPECS[i].def);
    return a;
}

// -h: the table, with each default in brackets
static void usage(FILE *f, const char *program, const char *what) {
    fprintf(f, "usage: %s [options]\n%s\n\n  %-24s this text\n", program, what, "-h, --help");
    for (int i = 0; i < N_ARG_SPECS; i++) {
        const ArgSpec *s = &ARG_SPECS[i];
        if (s->type == ARG_SECTION) { fprintf(f, "%s:\n", s->name); continue; }
        char lhs[64], text[512];
        snprintf(lhs, sizeof lhs, "%s%s%s", s->name, s->meta ? " " : "", s->meta ? s->meta : "");
        snprintf(text, sizeof text, "%s%s%s%s", s->help, s->def ? " [" : "", s->def ? (s->def[0] ? s->def : "''") : "",
                 s->def ? "]" : "");
        fprintf(f, "  %-24s", lhs);
        int col = 26; // the help wraps at 100 columns, continuing under itself
        for (const char *w = text; *w;) {
            int len = (int)strcspn(w, " ");
            if (col + 1 + len > 100 && col > 27) { fprintf(f, "\n%27s", ""); col = 27; }
            else { fputc(' ', f); col++; }
            fprintf(f, "%.*s", len, w);
            col += len;
            w += len;
            while (*w == ' ') w++;
        }
        fprintf(f, "\n");
    }
    fprintf(f, "\nThreads (CPU): OMP_NUM_THREADS. Example: %s --model pythia-14m --steps 300 --out out/run1\n", program);
}

// FLAG VALUE as on the command line (value NULL for a switch)
static void arg_give(Args *a, const char *flag, const char *value) {
    int k = arg_index(flag);
    if (k < 0) die("unknown flag %s (see -h)", flag);
    arg_set(a, &ARG_SPECS[k], value);
    a->given[k] = 1;
}

static Args parse_args(int argc, char **argv, const char *what) {
    Args a = default_args();
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "-h") || !strcmp(f, "--help")) { usage(stdout, argv[0], what); exit(0); }
        int k = arg_index(f);
        if (k < 0) die("unknown flag %s (see -h)", f);
        if (ARG_SPECS[k].type != ARG_SWITCH && i + 1 >= argc) die("flag %s needs a value (see -h)", f);
        arg_give(&a, f, ARG_SPECS[k].type == ARG_SWITCH ? NULL : argv[++i]);
    }
    if (a.model && a.init_from) die("--model and --init-from conflict: --init-from FILE already names the starting checkpoint");
    if (a.resume && (a.model || a.init_from || a.context_block))
        die("--resume conflicts with --model / --init-from / --context-block: the run's state already holds the model");
    if (a.resume && a.phase == 1) die("--resume conflicts with --phase 1 (phase 1 is short and not resumable)");
    if ((a.checkpoint_every || a.stop_at) && !a.out) die("--checkpoint-every / --stop-at need --out DIR (where the checkpoint goes)");
    if (a.stop_at && a.stop_at >= a.steps) die("--stop-at %d must be before --steps %d", a.stop_at, a.steps);
    return a;
}

// the name --kv-report and the logs give the model: the preset or file it came from
static const char *model_name(const Args *a) { return a->init_from ? a->init_from : (a->model ? a->model : DEFAULT_MODEL); }

// lr at step (0-based): linear warmup to lr, then cosine down to lr*min_lr_frac at the last step
static float lr_at(const Args *a, int step) {
    if (step < a->warmup) return a->lr * (float)(step + 1) / (float)a->warmup;
    if (a->steps <= a->warmup + 1) return a->lr;
    float progress = (float)(step - a->warmup) / (float)(a->steps - a->warmup - 1);
    float min_lr = a->lr * a->min_lr_frac;
    return min_lr + 0.5f * (a->lr - min_lr) * (1.0f + cosf(3.14159265f * progress));
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

// ----------------------------------------------------------------------------
// Flags that shape the model config

// Sets the attention variant of c from --attn and its flags (a preset, or a checkpoint being
// converted by --init-from: converting_from is its config, else NULL). Flags that belong to
// another variant are an error.
static void apply_variant_flags(Config *c, const Args *a, const Config *converting_from) {
    const int mla_flags = a->kv_rank || a->rope_dim || arg_given(a, "--q-rank") || a->rope_split || arg_given(a, "--latent-norm");
    if (!a->attn) {
        if (a->n_kv_head || mla_flags)
            die("--n-kv-head / --kv-rank / --rope-dim / --q-rank / --rope-split / --latent-norm need --attn (gqa for the first, mla for the others)");
        return;
    }
    const int H = c->n_head, D = head_dim(c), t = attn_type_from_name(a->attn);
    if (a->n_kv_head && t != ATTN_GQA && t != ATTN_MQA) die("--n-kv-head conflicts with --attn %s (it is a gqa flag)", a->attn);
    if (mla_flags && t != ATTN_MLA)
        die("--kv-rank / --rope-dim / --q-rank / --rope-split / --latent-norm conflict with --attn %s (they are mla flags)", a->attn);
    if (t == ATTN_MQA && a->n_kv_head && a->n_kv_head != 1) die("--attn mqa means one KV head; --n-kv-head %d conflicts", a->n_kv_head);
    c->attn_type = t;
    c->n_kv_head = H;
    c->kv_rank = c->q_rank = c->mla_rope_dim = c->mla_rope_split = c->mla_linear_latent = 0;
    c->rms_eps = 0.0f;
    // default G: H/4 (H/2 when H = 4, as the published table scales it), else H/2, else 1
    if (t == ATTN_GQA) c->n_kv_head = a->n_kv_head ? a->n_kv_head : (H == 4 ? 2 : (H % 4 == 0 ? H / 4 : (H % 2 == 0 ? H / 2 : 1)));
    if (t == ATTN_MQA) c->n_kv_head = 1;
    if (t == ATTN_MLA) {
        c->kv_rank = a->kv_rank ? a->kv_rank : 4 * D;
        c->q_rank = a->q_rank;
        c->rms_eps = 1e-6f; // DeepSeek's RMSNorm epsilon
        // a conversion from mha keeps each head's rotary dims as its own group, with a linear
        // latent (doc/retrofit.md); a model trained from scratch has DeepSeek's defaults
        const int converting = converting_from != NULL && converting_from->attn_type == ATTN_MHA;
        c->mla_rope_dim = a->rope_dim ? a->rope_dim : (converting ? H * converting_from->rotary_dims : D);
        c->mla_rope_split = a->rope_split ? a->rope_split : (converting ? H : 1);
        c->mla_linear_latent = arg_given(a, "--latent-norm") ? !a->latent_norm : converting;
    }
    const char *problem = config_problem(c);
    if (problem) {
        if (t == ATTN_GQA && c->n_head % c->n_kv_head) die("--n-kv-head %d does not divide the %d heads", c->n_kv_head, H);
        if (t == ATTN_MLA && (c->mla_rope_dim % (2 * c->mla_rope_split) || c->mla_rope_dim / c->mla_rope_split > D)) {
            if (c->mla_rope_split == 1) die("--rope-dim %d must be even and at most the head dim %d", c->mla_rope_dim, D);
            die("--rope-dim %d must split into --rope-split %d groups that are even and each at most the head dim %d",
                c->mla_rope_dim, c->mla_rope_split, D);
        }
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
        if (a->context_dim || arg_given(a, "--context-interval") || arg_given(a, "--max-contexts"))
            die("--context-dim / --context-interval / --max-contexts need --layer0 ctxkv or --model-type ctxpythia");
        return;
    }
    if (ctxpythia && (arg_given(a, "--context-interval") || arg_given(a, "--max-contexts")))
        die("--context-interval / --max-contexts belong to --layer0 ctxkv, not --model-type ctxpythia");
    const int dc = a->context_dim ? a->context_dim : c->n_embd / 2;
    c->context_dim = dc;
    if (ctxkv) {
        c->layer0_type = LAYER0_CTXKV;
        c->context_interval = a->context_interval;
        c->max_contexts = a->max_contexts;
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
#define SAME(flag, value, field, label) \
    if (arg_given(a, flag) && (value) != (field)) die("'%s' has %s %d, but %s %d was given", path, label, field, flag, value)
    SAME("--n-kv-head", a->n_kv_head, c->n_kv_head, "n_kv_head");
    SAME("--kv-rank", a->kv_rank, c->kv_rank, "kv_rank");
    SAME("--rope-dim", a->rope_dim, c->mla_rope_dim, "mla_rope_dim");
    SAME("--q-rank", a->q_rank, c->q_rank, "q_rank");
    SAME("--rope-split", a->rope_split, c->mla_rope_split, "mla_rope_split");
    SAME("--latent-norm", a->latent_norm, !c->mla_linear_latent, "latent norm");
    if (a->layer0 && (!strcmp(a->layer0, "ctxkv")) != (c->layer0_type == LAYER0_CTXKV))
        die("'%s' has layer 0 %s, but --layer0 %s was given", path, c->layer0_type ? "ctxkv" : "same", a->layer0);
    if (a->model_type && (!strcmp(a->model_type, "ctxpythia")) != (c->model_type == MODEL_CTXPYTHIA))
        die("'%s' is a %s model, but --model-type %s was given", path, c->model_type ? "ctxpythia" : "pythia", a->model_type);
    SAME("--context-dim", a->context_dim, c->context_dim, "context_dim");
    SAME("--context-interval", a->context_interval, c->context_interval, "context_interval");
    SAME("--max-contexts", a->max_contexts, c->max_contexts, "max_contexts");
#undef SAME
}

#endif
