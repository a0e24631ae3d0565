// ctxkv/train.h: the program around the model -- --kv-report, --generate, --bench, Context-KV
// phase 1, the training loop (progress, JSON-lines log, validation, samples, checkpoints, exact
// resume, the numerical guard), the evaluation suite and metrics.json -- and main, shared by
// both programs. Included last, after the model and ctxkv/checkpoint.h and ctxkv/eval.h.
//
// Besides the interfaces those two headers name, it uses from the program:
//   model_zero_grad, model_backward, model_clip_grad_norm, model_update (AdamW), phase1_round
//   PROGRAM_WHAT                        one line for -h: what this program is
//   device_banner(buf, n)               the compute it runs on, for the start-up line
//   check_training_memory(m, B, T)      dies with a clear message when a step cannot fit
#ifndef CTXKV_TRAIN_H
#define CTXKV_TRAIN_H
#include "checkpoint.h"
#include "eval.h"

// --kv-report: the KV accounting, and the activation bytes a training step of B x T needs in this
// program's own layout (floatX: fp32 on the CPU, bf16 in the default CUDA build) -- of which the
// attention scores, (B, H, T, T) per layer, are the part that grows as T²
// Under a policy it adds the cache that --generate N after a -t T-token prompt holds.
static void print_kv_report(const Config *c, const char *name, int B, int T, const KVPolicy *p, int n_new) {
    Acts acts;
    memset(&acts, 0, sizeof acts);
    acts.layer = (LayerActs *)calloc_check(c->n_layer * sizeof(LayerActs), "kv report");
    GradActs grads;
    memset(&grads, 0, sizeof grads);
    const size_t fwd = layout_acts(c, B, T, NULL, &acts, NULL), bwd = layout_acts(c, B, T, NULL, NULL, &grads);
    free(acts.layer);
    const size_t L = c->n_layer, per_token = kv_elements_per_token(c);
    const size_t std_layer = attn_kv_elements(c, c->attn_type); // a layer that is not ctxkv
    printf("{\"model\": \"%s\", \"attn\": \"%s\", \"layer0\": \"%s\", \"model_type\": \"%s\", \"n_layer\": %zu, "
           "\"n_kv_head\": %d, \"kv_rank\": %d, \"rope_dim\": %d, \"context_dim\": %d, \"context_interval\": %d, "
           "\"max_contexts\": %d, \"params\": %zu, \"kv_elements_per_token\": %zu, "
           "\"kv_bytes_per_token_per_layer_bf16\": %zu, \"kv_bytes_per_token_bf16\": %zu, \"kv_bytes_per_token_fp32\": %zu, "
           "\"kv_cache_bytes_at\": {\"1024\": %zu, \"4096\": %zu, \"16384\": %zu}, "
           "\"train_activation_bytes\": {\"B\": %d, \"T\": %d, \"forward\": %zu, \"backward\": %zu}, "
           "\"kv_policy\": {\"name\": \"%s\", \"budget\": %d, \"sinks\": %d, \"window\": %d, \"pool\": %d, \"prompt\": %d, \"new\": %d, "
           "\"slots_per_layer\": %d, \"kv_cache_bytes_fp32\": %zu}}\n",
           name, ATTN_NAMES[c->attn_type], c->layer0_type ? "ctxkv" : "same", c->model_type ? "ctxpythia" : "pythia", L,
           c->n_kv_head, c->kv_rank, c->mla_rope_dim, c->context_dim, c->context_interval, c->max_contexts,
           layout_params(c, NULL, NULL, NULL, NULL), per_token, 2 * std_layer, 2 * per_token, 4 * per_token,
           2 * kv_elements_at(c, 1024), 2 * kv_elements_at(c, 4096), 2 * kv_elements_at(c, 16384), B, T, fwd, bwd,
           KV_POLICY_NAMES[p->kind], p->budget, p->sinks, p->window, p->pool, T, n_new, kv_policy_slots(p, T, n_new),
           kv_policy_cache_bytes(c, p, T, n_new));
}

// --generate N: N tokens after --prompt-ids with the KV cache, then the speed and cache size
static int run_generate(Model *m, const Args *a, const Tokenizer *tk) {
    int *prompt = parse_ids("--prompt-ids", a->prompt_ids);
    int n_prompt = (int)arrlen(prompt);
    check_batch(&m->cfg, prompt, NULL, 1, n_prompt);
    int *out = (int *)malloc_check((size_t)(n_prompt + a->generate) * sizeof(int), "generate");
    uint64_t rng = (uint64_t)a->seed ^ 0x9E3779B97F4A7C15ull;
    GenStats st;
    printf("--- %d tokens after a %d-token prompt ---\n", a->generate, n_prompt);
    if (tk->tokens) { // the prompt, then its continuation as it comes
        for (int i = 0; i < n_prompt; i++) tokenizer_print(tk, prompt[i]);
        fflush(stdout);
    }
    model_generate(m, 1, prompt, n_prompt, a->generate, a->temperature, &rng, out, tk->tokens ? tk : NULL, &st);
    if (!tk->tokens) for (int i = n_prompt; i < n_prompt + a->generate; i++) printf("%d ", out[i]);
    printf("\n---\n");
    const int T = n_prompt + a->generate;
    char policy[64];
    kv_policy_label(&m->kv_policy, policy, sizeof policy);
    printf("{\"generated_tokens\": %d, \"seconds\": %.4f, \"tokens_per_s\": %.1f, \"kv_cache_capacity_tokens\": %d, "
           "\"kv_cache_bytes\": %zu, \"kv_bytes_per_token_fp32\": %zu, \"kv_policy\": \"%s\", \"kv_cache_slots_per_layer\": %d}\n",
           a->generate, st.seconds, a->generate / st.seconds, T, st.cache_bytes, kv_elements_per_token(&m->cfg) * sizeof(float),
           policy, kv_policy_slots(&m->kv_policy, n_prompt, a->generate));
    free(out);
    arrfree(prompt);
    return 0;
}

// --bench N: N timed training steps on random tokens (after one untimed warmup step)
static int run_bench(Model *m, const Args *a) {
    uint64_t rng = (uint64_t)a->seed + 1;
    int BT = a->B * a->T;
    int *x = (int *)malloc_check(BT * sizeof(int), "bench"), *y = (int *)malloc_check(BT * sizeof(int), "bench");
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
        model_sync();
        double dt = now_seconds() - t0;
        if (s > 0) t_total += dt;
        fprintf(stderr, "bench step %d: %.1f ms\n", s, dt * 1e3);
    }
    double ms = t_total / a->bench * 1e3;
    printf("{\"bench_steps\": %d, \"ms_per_step\": %.3f, \"tokens_per_s\": %.1f}\n", a->bench, ms, BT / (ms / 1e3));
    free(x); free(y);
    return 0;
}

// Context-KV phase 1: train the ContextBlock alone (OACD, Jacobi iteration), one round per
// batch, then write DIR/context_block.bin, DIR/model.bin and DIR/metrics.json
static void run_phase1(Model *m, const Args *a, DataLoader *train, FILE *log) {
    model_set_phase(m, 1);
    uint64_t rng = (uint64_t)a->seed * 2654435761u + 1;
    double t0 = now_seconds();
    Phase1Stats st = {0, 0, 0};
    for (int r = 0; r < a->p1_rounds; r++) {
        dataloader_next(train);
        st = phase1_round(m, a, train->inputs, a->B, a->T, &rng, r + 1);
        printf("phase 1 round %d/%d: %d iterations, converged %.3f, oacd loss %.5f\n", r + 1, a->p1_rounds, st.iters, st.converged, st.loss);
        if (log) { fprintf(log, "{\"type\": \"phase1\", \"round\": %d, \"iters\": %d, \"converged\": %.4f, \"oacd_loss\": %.6f}\n", r + 1, st.iters, st.converged, st.loss); fflush(log); }
    }
    printf("phase 1 done in %.1f s: converged fraction %.3f\n", now_seconds() - t0, st.converged);
    if (!a->out) return;
    char path[4200];
    path_join(path, sizeof path, a->out, "context_block.bin");
    context_block_save(m, path);
    printf("wrote %s\n", path);
    path_join(path, sizeof path, a->out, "model.bin");
    model_save(m, path);
    path_join(path, sizeof path, a->out, "metrics.json");
    AtomicFile af = atomic_open(path);
    fprintf(af.f, "{\"phase\": 1, \"converged\": %.4f, \"oacd_loss\": %.6f, \"iters\": %d, \"rounds\": %d}\n", st.converged, st.loss, st.iters, a->p1_rounds);
    atomic_commit(&af);
}

typedef struct {
    float train_loss, val_loss; // last values (-1: none)
    long long tokens_seen;
    double train_time;          // seconds spent in training steps
    int stopped;                // --stop-at ended the run
} TrainResult;

static void print_sample(Model *m, const Args *a, const Tokenizer *tk, uint64_t *rng, int *buf, int step) {
    int prompt = tk->tokens ? tk->eot : 0;
    printf("--- sample at step %d ---\n", step);
    model_generate(m, 1, &prompt, 1, a->sample_len, a->temperature, rng, buf, tk->tokens ? tk : NULL, NULL);
    if (!tk->tokens) for (int i = 1; i <= a->sample_len; i++) printf("%d ", buf[i]);
    printf("\n---\n");
}

// The training loop: steps rs->step+1 .. a->steps (rs: the resumed state, or zeros), with
// validation, samples and training-state saves on the way.
static TrainResult train_loop(Model *m, const Args *a, DataLoader *train, DataLoader *val, const Tokenizer *tk,
                              const TrainState *rs, FILE *log) {
    AdamW opt = {a->lr, a->beta1, a->beta2, a->eps, a->weight_decay};
    uint64_t sample_rng = a->resume ? rs->rng : (uint64_t)a->seed ^ 0x9E3779B97F4A7C15ull;
    int *sample_buf = (int *)malloc_check((a->sample_len + 1) * sizeof(int), "sample");
    const int BT = a->B * a->T;
    TrainResult r = {-1.0f, -1.0f, rs->tokens_seen, 0.0, 0};
    int last_saved = a->resume ? rs->step : -1; // step of the last good training state on disk
    char state_path[4200] = "";
    if (a->out) path_join(state_path, sizeof state_path, a->out, TRAIN_STATE_FILE);
    for (int step = rs->step; step <= a->steps; step++) {
        int last = step == a->steps;
        if (val && (last || (a->val_every > 0 && step % a->val_every == 0))) {
            r.val_loss = evaluate(m, val, a->val_batches);
            printf("step %d/%d | val loss %.4f\n", step, a->steps, r.val_loss);
            if (log) { fprintf(log, "{\"type\": \"val\", \"step\": %d, \"val_loss\": %.6f, \"tokens_seen\": %lld}\n", step, r.val_loss, r.tokens_seen); fflush(log); }
        }
        // samples while training (--steps 0 evaluates a checkpoint: nothing trained, no sample)
        if (a->sample_every > 0 && step > 0 && (step % a->sample_every == 0 || last)) print_sample(m, a, tk, &sample_rng, sample_buf, step);
        if (last) break;
        double t0 = now_seconds();
        dataloader_next(train);
        float loss = model_forward(m, train->inputs, train->targets, a->B, a->T);
        model_zero_grad(m);
        model_backward(m);
        float norm = model_clip_grad_norm(m, a->grad_clip);
        if (!isfinite(loss) || !isfinite(norm)) {
            // a NaN's sign bit depends on the kernels that made it: print "nan" either way
            if (isnan(loss)) loss = fabsf(loss);
            if (isnan(norm)) norm = fabsf(norm);
            if (last_saved >= 0) die("step %d: loss %g / grad norm %g is not finite; stopping. The last good training state "
                                     "(step %d) is in %s", step + 1, loss, norm, last_saved, a->resume && !a->out ? a->resume : state_path);
            die("step %d: loss %g / grad norm %g is not finite; stopping (no checkpoint was saved yet)", step + 1, loss, norm);
        }
        opt.lr = lr_at(a, step);
        model_update(m, &opt);
        model_sync();
        double dt = now_seconds() - t0;
        r.train_time += dt;
        r.tokens_seen += BT;
        r.train_loss = loss;
        char eta[32];
        format_eta(eta, sizeof eta, r.train_time / (step + 1 - rs->step) * (a->steps - step - 1));
        printf("step %d/%d | loss %.4f | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s | ETA %s\n", step + 1, a->steps,
               loss, norm, opt.lr, dt * 1e3, BT / dt, eta);
        fflush(stdout);
        if (a->out && (step + 1 == a->steps || step + 1 == a->stop_at || (a->checkpoint_every && (step + 1) % a->checkpoint_every == 0))) {
            TrainState st = {step + 1, train->epoch, train->shard_index, (long long)train->pos, a->shuffle, sample_rng, a->B, a->T, r.tokens_seen};
            train_state_save(m, state_path, &st);
            last_saved = step + 1;
        }
        if (log) {
            fprintf(log, "{\"type\": \"train\", \"step\": %d, \"loss\": %.9g, \"grad_norm\": %.6f, \"lr\": %.6e, \"ms\": %.3f, \"tokens_per_s\": %.1f, \"tokens_seen\": %lld}\n",
                    step + 1, loss, norm, opt.lr, dt * 1e3, (r.tokens_seen - rs->tokens_seen) / r.train_time, r.tokens_seen);
            fflush(log);
        }
        if (step + 1 == a->stop_at) {
            printf("stopped after step %d (--stop-at); continue with --resume %s\n", step + 1, a->out);
            r.stopped = 1;
            break;
        }
    }
    free(sample_buf);
    return r;
}

// The evaluation suite after training, and DIR/metrics.json (null for what was not asked for).
// prompts: tokens the generation benchmark takes its prompts from.
static void run_evaluation(Model *m, const Args *a, const TrainResult *r, const DataLoader *prompts) {
    char heldout[64] = "null", lam_acc[64] = "null", lam_ppl[64] = "null", gen1[64] = "null", gen8[64] = "null";
    char val_s[64] = "null", heldout_n[64] = "null", lam_n[64] = "null", cache_meas[64] = "null", train_s[64] = "null";
    if (r->val_loss >= 0.0f) snprintf(val_s, sizeof val_s, "%.6f", r->val_loss);
    if (a->steps > 0) snprintf(train_s, sizeof train_s, "%.6f", r->train_loss);
    // by decoding when asked, or when a policy evicts (it only acts on the decoder)
    const int decode = a->eval_decode || m->kv_policy.kind != KV_FULL;
    char policy[64];
    kv_policy_label(&m->kv_policy, policy, sizeof policy);
    const char *mode = decode ? "decoding" : "parallel";
    if (decode && (a->eval_heldout || a->eval_lambada || a->eval_recall)) printf("evaluation by decoding, KV policy %s\n", policy);
    if (a->eval_heldout) {
        long long scored;
        double t0 = now_seconds();
        float l = eval_heldout(m, a->eval_heldout, a->T, a->heldout_max_tokens, &scored, decode ? a->B : 0);
        printf("held-out loss %.4f over %lld tokens of %s (window %d, stride %d, %s) [%.1f s]\n", l, scored, a->eval_heldout, a->T, a->T / 2, mode, now_seconds() - t0);
        snprintf(heldout, sizeof heldout, "%.6f", l);
        snprintf(heldout_n, sizeof heldout_n, "%lld", scored);
    }
    if (a->eval_lambada) {
        float acc, ppl;
        int n;
        double t0 = now_seconds();
        eval_lambada(m, a->eval_lambada, a->lambada_max, &acc, &ppl, &n, decode);
        printf("LAMBADA: accuracy %.4f, perplexity %.2f over %d examples [%.1f s]\n", acc, ppl, n, now_seconds() - t0);
        snprintf(lam_acc, sizeof lam_acc, "%.6f", acc);
        snprintf(lam_ppl, sizeof lam_ppl, "%.4f", ppl);
        snprintf(lam_n, sizeof lam_n, "%d", n);
    }
    char recall[4096] = "null"; // the JSON of --eval-recall's result
    if (a->eval_recall) {
        double t0 = now_seconds();
        RecallResult rr = eval_recall(m, a->eval_recall, a->B, decode);
        recall_json(&rr, recall, sizeof recall);
        printf("recall: accuracy %.4f over %lld answers of %d examples of %s [%.1f s]\n", (double)rr.correct / rr.answers, rr.answers, rr.n_examples, a->eval_recall, now_seconds() - t0);
        printf("recall: %s\n", recall);
    }
    if (a->eval_gen) { // prompts from real text when there is some
        uint16_t fallback = 0;
        const uint16_t *ptok = prompts ? prompts->tokens : &fallback;
        size_t pn = prompts ? prompts->ntok : 1, bytes1, bytes8;
        float t1 = eval_generation(m, 1, ptok, pn, a->gen_prompt, a->gen_new, &bytes1);
        float t8 = eval_generation(m, 8, ptok, pn, a->gen_prompt, a->gen_new, &bytes8);
        printf("generation: %.1f tok/s at batch 1, %.1f tok/s at batch 8 (%d new after %d) | KV cache %zu bytes at batch 1\n",
               t1, t8, a->gen_new, a->gen_prompt, bytes1);
        snprintf(gen1, sizeof gen1, "%.2f", t1);
        snprintf(gen8, sizeof gen8, "%.2f", t8);
        snprintf(cache_meas, sizeof cache_meas, "%zu", bytes1);
    }
    if (!a->out) return;
    const Config *c = &m->cfg;
    char path[4200];
    path_join(path, sizeof path, a->out, "metrics.json");
    AtomicFile af = atomic_open(path);
    fprintf(af.f,
            "{\"train_loss\": %s, \"val_loss\": %s, \"heldout_loss_wikitext2\": %s, \"heldout_tokens\": %s, "
            "\"lambada_acc\": %s, \"lambada_ppl\": %s, \"lambada_examples\": %s, \"generation_toks_per_s\": %s, "
            "\"generation_toks_per_s_b8\": %s, \"recall\": %s, \"kv_bytes_per_token_per_layer_bf16\": %zu, \"kv_bytes_per_token_bf16\": %zu, "
            "\"kv_cache_bytes_measured_fp32\": %s, \"kv_cache_bytes_analytic_fp32\": %zu, \"params\": %zu, "
            "\"tokens_seen\": %lld, \"tokens_per_s\": %.1f, \"steps\": %d, \"eval_mode\": \"%s\", \"kv_policy\": \"%s\", "
            "\"kv_cache_bytes_policy_fp32\": %zu}\n",
            train_s, val_s, heldout, heldout_n, lam_acc, lam_ppl, lam_n, gen1, gen8, recall,
            2 * attn_kv_elements(c, c->attn_type), 2 * kv_elements_per_token(c), cache_meas,
            4 * kv_elements_at(c, (size_t)a->gen_prompt + a->gen_new), m->num_params, r->tokens_seen,
            r->train_time > 0 ? r->tokens_seen / r->train_time : 0.0, a->steps, mode, policy,
            kv_policy_cache_bytes(c, &m->kv_policy, a->gen_prompt, a->gen_new));
    atomic_commit(&af);
    printf("wrote %s\n", path);
}

// A kill -9 during a save leaves NAME.tmp beside NAME (NAME itself is the previous good file);
// say so and remove it, so that DIR holds only complete files.
static void remove_stale_tmp(const char *dir) {
    static const char *names[] = {TRAIN_STATE_FILE, "model.bin", "metrics.json", "context_block.bin"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
        char path[4200];
        if ((size_t)snprintf(path, sizeof path, "%s/%s.tmp", dir, names[i]) >= sizeof path) continue;
        if (access(path, F_OK) == 0 && remove(path) == 0) printf("removed %s, left by an interrupted save\n", path);
    }
}

#ifndef TESTING
int main(int argc, char **argv) {
    Args a = parse_args(argc, argv, PROGRAM_WHAT);
    Config cfg = config_from_args(&a);
    const KVPolicy policy = kv_policy_from_args(&a);
    if (a.kv_report) { print_kv_report(&cfg, model_name(&a), a.B, a.T, &policy, a.generate); return 0; }
    Model model = model_from_args(&a, &cfg);
    model.kv_policy = policy;
    if (!a.generate && a.T > model.cfg.max_seq_len) die("-t %d exceeds the model's max_seq_len %d", a.T, model.cfg.max_seq_len);
    char device[256];
    device_banner(device, sizeof device);
    config_print(&model.cfg);
    printf("parameters: %zu | B %d | T %d | %s\n", model.num_params, a.B, a.T, device);
    if (a.context_block) context_block_load(&model, a.context_block);
    if (a.phase && !has_context_block(&model.cfg)) die("--phase needs a model with a context block (--layer0 ctxkv or --model-type ctxpythia)");
    if (a.bench) return run_bench(&model, &a);
    if (a.steps > 0) check_training_memory(&model, a.B, a.T); // before any of it is touched
    Tokenizer tk;
    if (!tokenizer_load(&tk, a.tokenizer)) printf("(no token table at '%s': samples print token ids)\n", a.tokenizer);
    if (a.generate) return run_generate(&model, &a, &tk);

    DataLoader train, val;
    int have_train = a.steps > 0 || a.phase == 1, have_val = a.val && a.val[0]; // --steps 0: evaluation only
    if (have_train) dataloader_init(&train, a.train, a.B, a.T, model.cfg.vocab_size);
    if (have_train && a.shuffle) dataloader_shuffle(&train, (uint64_t)a.seed);
    if (have_val) dataloader_init(&val, a.val, a.B, a.T, model.cfg.vocab_size);
    if (have_train) printf("train: %d shard(s) matching '%s' | val: %s\n", (int)arrlen(train.files), a.train, have_val ? a.val : "none");
    FILE *log = NULL;
    if (a.out) {
        char path[4200];
        mkdir_p(a.out);
        remove_stale_tmp(a.out);
        path_join(path, sizeof path, a.out, "log.jsonl");
        log = fopen_check(path, a.resume ? "a" : "w"); // a resumed run continues its log
    }
    TrainState rs;
    memset(&rs, 0, sizeof rs);
    if (a.resume) {
        char sp[4200];
        path_join(sp, sizeof sp, a.resume, TRAIN_STATE_FILE);
        train_state_load(sp, NULL, &rs);
        if (rs.B != a.B || rs.T != a.T) die("--resume: the run used -b %d -t %d, but -b %d -t %d were given", rs.B, rs.T, a.B, a.T);
        if (rs.step > a.steps) die("--resume: the run already did %d steps, more than --steps %d", rs.step, a.steps);
        if (rs.shuffle != a.shuffle) die("--resume: the run was %s --shuffle; give the same flags as the original run", rs.shuffle ? "made with" : "made without");
        if (have_train) dataloader_seek(&train, rs.epoch, rs.shard_index, rs.pos);
        printf("resuming %s at step %d\n", sp, rs.step);
    }
    if (a.phase == 1) {
        run_phase1(&model, &a, &train, log);
    } else {
        TrainResult r = train_loop(&model, &a, &train, have_val ? &val : NULL, &tk, &rs, log);
        if (!r.stopped) {
            if (a.out && a.steps > 0) {
                char path[4200];
                path_join(path, sizeof path, a.out, "model.bin");
                model_save(&model, path);
                printf("wrote %s\n", path);
            }
            run_evaluation(&model, &a, &r, have_val ? &val : have_train ? &train : NULL);
        }
    }
    if (log) fclose(log);
    tokenizer_free(&tk);
    if (have_train) dataloader_free(&train);
    if (have_val) dataloader_free(&val);
    model_free(&model);
    return 0;
}
#endif
#endif
