"""Train the attention variants at one budget, over several seeds, on two workloads, and tabulate
quality, recall, speed and KV-cache size.

    make table                # the cpu-scale table (below), everything set up on a fresh clone
    make table-quick          # smoke test, ~2 min
    .venv/bin/python dev/kv_table.py --scale cpu [--seeds 3]   # what make table runs
    .venv/bin/python dev/kv_table.py --scale gpu               # ./train_ctxkv_cu, pythia-160m shape
    .venv/bin/python dev/kv_table.py --table-only              # rebuild table and figures from OUT
    .venv/bin/python dev/kv_table.py --dry-run                 # the time estimate and the commands
    .venv/bin/python dev/kv_table.py --table-only --compare doc/results/cpu   # your run vs the README's
Options: --out DIR (default results), --variants mha,gqa,..., --workloads lm,recall, --seeds N,
--steps N (lm) / --recall-steps N, --binary PATH, --threads N. The figures need matplotlib (make
table installs it into .venv); without it they are skipped with a message.

Workloads (every variant gets the same tokens, lr schedule and seeds within a workload):
  lm      language modelling on Gutenberg (--shuffle: blocks drawn across all the shards); val
          loss, WikiText-2 held-out loss, LAMBADA.
  recall  multi-query associative recall (MQAR, prepro/mqar.py, Zoology's task): key-value pairs,
          then each key asked again; the loss is on the answers only (the shards carry a loss
          mask), and --eval-recall scores exact-match accuracy on the answers of a test file, by
          number of pairs (the difficulty levels) and by distance.
Seeds: run k of a variant uses --seed 1337+k (init, data order) for k = 0..N-1. Each cell is the
mean +- std (sample) over seeds; * marks a variant whose mean differs from mha's by more than two
standard errors of the difference (Welch: sqrt(s1^2/n1 + s2^2/n2)).
Generation speed (tok/s at batch 1 and 8) is measured once per variant after all training, on the
first seed's lm model, so that it is timed on cores the training runs are not using.

Scales (the cpu one is what the README's table is; see SCALES for every number):
  cpu    lm: pythia-14m shape, B 4 x T 256, 200 steps = 204,800 tokens, lr 2e-3; recall:
         pythia-mqar (2 layers, width 128, 4 heads, vocab 256), B 32 x T 64, 1000 steps, trained
         on 2, 4 and 8 pairs and tested on 2, 4, 8 and 16 (more pairs than training had: the level
         mha does not saturate); 3 seeds. About 1h30 on 2 quiet cores (the estimate is printed
         first). Where the time goes: the lm runs are mostly the 50k-row head. Recall is learned
         suddenly, after 300 to 400 steps in the seeds tried (mha reached 0.98 at 2 pairs and
         0.57-0.63 at 16 after 900); 1000 steps leave room for a slower seed.
  gpu    ./train_ctxkv_cu, lm: pythia-160m shape, B 16 x T 1024, 2000 steps; recall: T 256 with
         8..32 pairs (tested to 64). Documented, not run on the machine this was written on.
  quick  a few steps of each, 2 seeds, 1 thread: ~2 min; for tests (dev/test_kv_table.py), its
         numbers mean nothing.

Variants (sizes follow the model shape, H heads of D):
  mha         multi-head attention (the Pythia baseline)
  gqa         grouped-query, G = H/4 KV heads (H/2 when H = 4)
  mqa         multi-query, one KV head
  mla         multi-head latent attention, kv-rank 4*D, rope-dim D
  ctxkv-mha   layer 0 attends over ContextBlock contexts, mha elsewhere
  ctxkv-gqa   the same with gqa elsewhere
  ctxpythia   every layer at the context width, fed by the contexts
The context width is half the model width. The ctx variants first train their ContextBlock
alone (--phase 1, RUN/phase1), then the rest with the block frozen (phase 2); phase 1 is outside
the step budget and its time is reported.

Decode-time eviction rows (doc/kv_eviction.md; --evict-rows, default all, 'none' to skip): after
training, the base variant's models (every seed, both workloads: their model.bin is kept) are
evaluated by decoding under a KV policy -- the context prefilled and compressed, the rest scored
token by token. Rows: mha, gqa and mla decoded with the full cache (each policy's baseline),
mha+streaming and mha+snapkv at 50% and 25% of the prompt, gqa+snapkv and mla+snapkv at 50%. The
prompt is the longest one decoded: lm, a held-out window's context (T - T/2 + 1 tokens); recall,
the key-value part of the most pairs tested. SnapKV's window is a quarter of the budget;
StreamingLLM keeps 4 sinks. A finished base run whose model.bin is gone is trained again when a
row still needs it.

Files (OUT = --out):
  OUT/runs/<workload>/<variant>/s<k>/   the run: log.jsonl, metrics.json (model.bin for k = 0)
  OUT/<workload>/<variant>_s<k>.json    its metrics plus variant, seed, flags, settings, wall time;
                                        a finished one whose settings match is reused, so the table
                                        can be built in pieces and resumed
  OUT/speed/<variant>.json              the generation speed pass
  OUT/kv_table.md                       the table
  OUT/kv_pareto.png                     KV bytes/token against val loss and recall, Pareto front
  OUT/kv_losses.png                     lm train and val loss curves (first seed)
  OUT/<workload>/evict/<row>_s<k>.json  an eviction row's decode-mode metrics (its run in
                                        OUT/runs/<workload>/evict/<row>/s<k>/)
  OUT/kv_eviction.png                   recall by pairs per eviction row; decoded held-out loss
                                        against the KV bytes kept per prompt token
Data made when missing: data/gutenberg/ (prepro/tokenize_text.py, ~1 min), data/eval/
(prepro/eval_data.py), data/mqar/<scale>/ (prepro/mqar.py, seconds), data/tinyshakespeare/.
"""
import argparse
import collections
import glob
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

SHAPES = {"pythia-14m": (6, 4, 128), "pythia-70m": (6, 8, 512), "pythia-160m": (12, 12, 768),
          "pythia-mqar": (2, 4, 128)}  # L, H, C
GEN = (128, 256)  # generation speed: new tokens after a prompt of ...
SCALES = {
    # lm: steps of B x T tokens; vals: val-loss points; heldout: tokens scored (0 = all); lambada:
    # examples (0 = all). recall: the same, with mqar = prepro/mqar.py's arguments.
    "cpu": dict(binary="./train_ctxkv", seeds=3, bench=2, gen=GEN,
                lm=dict(model="pythia-14m", B=4, T=256, steps=200, lr=2e-3, vals=4, val_batches=10,
                        heldout=16384, lambada=500, data="gutenberg", p1=["-b", "8", "--p1-rounds", "6"]),
                recall=dict(model="pythia-mqar", B=32, T=64, steps=1000, lr=3e-3, vals=5, val_batches=8,
                            mqar=dict(vocab=256, t=64, pairs="2,4,8", test_pairs="2,4,8,16", n_train=100_000,
                                      n_val=1024, n_test=1000),
                            p1=["-b", "32", "--p1-rounds", "4"])),
    "gpu": dict(binary="./train_ctxkv_cu", seeds=3, bench=3, gen=GEN,
                lm=dict(model="pythia-160m", B=16, T=1024, steps=2000, lr=6e-4, vals=10, val_batches=20,
                        heldout=0, lambada=0, data="gutenberg", p1=["-b", "8", "--p1-rounds", "6"]),
                recall=dict(model="pythia-mqar", B=64, T=256, steps=4000, lr=3e-3, vals=8, val_batches=8,
                            mqar=dict(vocab=256, t=256, pairs="8,16,32", test_pairs="8,16,32,64", n_train=200_000,
                                      n_val=1024, n_test=1000),
                            p1=["-b", "32", "--p1-rounds", "4"])),
    "quick": dict(binary="./train_ctxkv", seeds=2, bench=1, gen=(16, 32),
                  lm=dict(model="pythia-14m", B=2, T=64, steps=12, lr=2e-3, vals=2, val_batches=2,
                          heldout=512, lambada=32, data="tinyshakespeare",
                          p1=["-b", "2", "--p1-rounds", "1", "--p1-iters", "5"]),
                  recall=dict(model="pythia-mqar", B=8, T=32, steps=12, lr=3e-3, vals=2, val_batches=2,
                              mqar=dict(vocab=256, t=32, pairs="2,4", test_pairs="2,4", n_train=1024, n_val=128,
                                        n_test=64),
                              p1=["-b", "8", "--p1-rounds", "1", "--p1-iters", "5"])),
}
DATA = {
    "gutenberg": ("data/gutenberg/train_*.bin", "data/gutenberg/val_*.bin"),
    "tinyshakespeare": ("data/tinyshakespeare/tiny_shakespeare_train.bin",
                        "data/tinyshakespeare/tiny_shakespeare_val.bin"),
}
HELDOUT, LAMBADA = "data/eval/wikitext2_test.bin", "data/eval/lambada_test.bin"
VARIANTS = ["mha", "gqa", "mqa", "mla", "ctxkv-mha", "ctxkv-gqa", "ctxpythia"]
WORKLOADS = ["lm", "recall"]
SEED0 = 1337
# Decode-time eviction rows (doc/kv_eviction.md): a trained base variant evaluated by decoding
# under a KV policy, on the same models as its structural row. The budget is a fraction of the
# longest prompt a workload decodes from (evict_prompt); the rows ".full" are the decode-mode
# baselines, the full cache scored the same way. name: (base variant, policy, budget fraction)
EVICT_ROWS = {
    "mha.full": ("mha", "full", None),
    "mha.streaming50": ("mha", "streaming", 0.5),
    "mha.streaming25": ("mha", "streaming", 0.25),
    "mha.snapkv50": ("mha", "snapkv", 0.5),
    "mha.snapkv25": ("mha", "snapkv", 0.25),
    "gqa.full": ("gqa", "full", None),
    "gqa.snapkv50": ("gqa", "snapkv", 0.5),
    "mla.full": ("mla", "full", None),
    "mla.snapkv50": ("mla", "snapkv", 0.5),
}


def variant_flags(name, model):
    """train_ctxkv flags of a variant for a model shape."""
    _, H, C = SHAPES[model]
    D = C // H
    gqa = ["--attn", "gqa", "--n-kv-head", str(H // 2 if H == 4 else H // 4)]
    ctx = ["--context-dim", str(C // 2)]
    return {"mha": [], "gqa": gqa, "mqa": ["--attn", "mqa"],
            "mla": ["--attn", "mla", "--kv-rank", str(4 * D), "--rope-dim", str(D)],
            "ctxkv-mha": ["--layer0", "ctxkv"] + ctx, "ctxkv-gqa": gqa + ["--layer0", "ctxkv"] + ctx,
            "ctxpythia": ["--model-type", "ctxpythia"] + ctx}[name]


def evict_label(row):
    base, policy, frac = EVICT_ROWS[row]
    return f"{base}, decoded" if policy == "full" else f"{base}+{policy} {round(100 * frac)}%"


def evict_prompt(cfg, wl):
    """The longest prompt a workload's decode-mode evaluation prefills: lm, a held-out window's
    context (T - T/2 + 1 tokens; LAMBADA's contexts are shorter); recall, the key-value part of
    the most pairs tested (2 tokens a pair)."""
    if wl == "lm":
        T = cfg["lm"]["T"]
        return T - T // 2 + 1
    return 2 * max(int(p) for p in cfg["recall"]["mqar"]["test_pairs"].split(","))


def evict_policy(cfg, wl, row):
    """{policy, budget, sinks, window} of a row on a workload, and its train_ctxkv flags. The
    SnapKV window is a quarter of the budget (SnapKV's own settings keep it at or under that);
    StreamingLLM keeps 4 sinks, fewer when the budget is smaller."""
    _, policy, frac = EVICT_ROWS[row]
    if policy == "full":
        return {"policy": "full"}, ["--eval-decode"]
    budget = max(2, round(frac * evict_prompt(cfg, wl)))
    p = {"policy": policy, "budget": budget, "prompt": evict_prompt(cfg, wl)}
    if policy == "streaming":
        p["sinks"] = min(4, budget - 1)
        return p, ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-sinks", str(p["sinks"])]
    p["window"] = max(1, budget // 4)
    return p, ["--kv-policy", policy, "--kv-budget", str(budget), "--kv-window", str(p["window"])]


def evict_cmd(scale, cfg, wl, row, model_bin, run_dir):
    """The decode-mode evaluation of a trained model under a row's policy."""
    w = cfg[wl]
    cmd = [cfg["binary"], "--model", model_bin, "--steps", "0", "--val", "", "-b", str(w["B"]), "-t", str(w["T"]),
           "--sample-every", "0", "--out", run_dir] + evict_policy(cfg, wl, row)[1]
    if wl == "recall":
        return cmd + ["--eval-recall", f"{mqar_dir(scale)}/test.bin"]
    return cmd + ["--eval-heldout", HELDOUT, "--heldout-max-tokens", str(w["heldout"]),
                  "--eval-lambada", LAMBADA, "--lambada-max", str(w["lambada"])]


def is_ctx(name):
    return name.startswith("ctx")


def run_quiet(cmd, env=None):
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout


def kv_report(binary, model, flags):
    out = run_quiet([binary, "--model", model] + flags + ["--kv-report"])
    return json.loads(out.strip().splitlines()[-1])


def prepro_python():
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def mqar_dir(scale):
    return f"data/mqar/{scale}"


def prepare_data(scale, cfg, workloads, want_eval):
    """Make the shards and eval files the workloads need when missing; returns whether the lm
    evaluation files are there."""
    py = prepro_python()
    have_eval = False
    if "recall" in workloads:
        d, q = mqar_dir(scale), cfg["recall"]["mqar"]
        stamp = os.path.join(REPO, d, "args.json")  # the arguments and the generator that made the files
        with open(os.path.join(REPO, "prepro", "mqar.py"), "rb") as f:
            made_by = {"args": q, "mqar.py sha1": hashlib.sha1(f.read()).hexdigest()}
        if not (os.path.isfile(stamp) and json.load(open(stamp)) == made_by):
            cmd = [py, "prepro/mqar.py", "--out", d]
            for k, v in q.items():
                cmd += ["-t" if k == "t" else "--" + k.replace("_", "-"), str(v)]
            print(run_quiet(cmd).rstrip(), flush=True)
            with open(stamp, "w") as f:
                json.dump(made_by, f)
    if "lm" not in workloads:
        return False
    train, val = DATA[cfg["lm"]["data"]]
    if not glob.glob(os.path.join(REPO, train)) or not glob.glob(os.path.join(REPO, val)):
        t0 = time.time()
        if cfg["lm"]["data"] == "tinyshakespeare":
            run_quiet([py, "prepro/tinyshakespeare.py"])
        else:
            print("tokenizing the Gutenberg books into data/gutenberg/ (about a minute on 2 cores)", flush=True)
            for split, prefix in (("train", "train"), ("valid", "val")):
                src = os.path.join(SHARED, "gutenberg", f"gutenberg_{split}.txt.gz")
                if not os.path.isfile(src):
                    sys.exit(f"error: {src} not found (the Gutenberg corpus, ../shared/data/SOURCES.md)")
                run_quiet([py, "prepro/tokenize_text.py", "--input", src, "--out", f"data/gutenberg/{prefix}"])
        print(f"data prepared in {time.time() - t0:.0f} s", flush=True)
    if all(os.path.isfile(os.path.join(REPO, p)) for p in (HELDOUT, LAMBADA)):
        have_eval = True
    else:
        srcs = [os.path.join(SHARED, "wikitext-2", "wiki.test.raw"), os.path.join(SHARED, "lambada_test.jsonl")]
        if all(os.path.isfile(s) for s in srcs):
            print(run_quiet([py, "prepro/eval_data.py"]).rstrip(), flush=True)
            have_eval = True
        elif want_eval == "required":
            sys.exit(f"error: {' or '.join(srcs)} missing: cannot make the eval files (prepro/eval_data.py)")
        else:
            print(f"note: {srcs[0]} or {srcs[1]} missing: no held-out or LAMBADA evaluation", flush=True)
    return have_eval


def workload_files(scale, cfg, wl):
    """(train glob, val glob) of a workload."""
    if wl == "lm":
        return DATA[cfg["lm"]["data"]]
    d = mqar_dir(scale)
    return f"{d}/train_000.bin", f"{d}/val_000.bin"


def train_cmd(scale, cfg, wl, name, seed, run_dir, with_eval):
    """(phase-1 command or None, training command) of one run."""
    w = cfg[wl]
    B, T, steps = w["B"], w["T"], w["steps"]
    train, val = workload_files(scale, cfg, wl)
    flags = variant_flags(name, w["model"])
    cmd = [cfg["binary"], "--model", w["model"]] + flags + [
        "-b", str(B), "-t", str(T), "--steps", str(steps), "--lr", str(w["lr"]),
        "--warmup", str(max(1, steps // 10)), "--val-every", str(max(1, steps // w["vals"])),
        "--val-batches", str(w["val_batches"]), "--sample-every", "0", "--seed", str(seed),
        "--shuffle", "--train", train, "--val", val, "--out", run_dir]
    if wl == "recall":
        cmd += ["--eval-recall", f"{mqar_dir(scale)}/test.bin"]
    elif with_eval:
        cmd += ["--eval-heldout", HELDOUT, "--heldout-max-tokens", str(w["heldout"]),
                "--eval-lambada", LAMBADA, "--lambada-max", str(w["lambada"])]
    p1 = [cfg["binary"], "--model", w["model"]] + flags + w["p1"] + [
        "-t", str(T), "--seed", str(seed), "--shuffle", "--train", train, "--val", val,
        "--phase", "1", "--out", os.path.join(run_dir, "phase1")]
    if is_ctx(name):
        cmd += ["--context-block", os.path.join(run_dir, "phase1", "context_block.bin")]
    return (p1 if is_ctx(name) else None), cmd


def speed_cmd(cfg, model_bin, train_glob):
    return [cfg["binary"], "--model", model_bin, "--steps", "0", "--val", "", "--train", train_glob,
            "--eval-gen", "--gen-prompt", str(cfg["gen"][0]), "--gen-new", str(cfg["gen"][1])]


def stream(cmd, env, prefix, steps):
    """Run cmd, print its progress lines with prefix; returns (exit code, last lines)."""
    every = max(1, steps // 5)
    tail = collections.deque(maxlen=40)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace")
    for line in p.stdout:
        line = line.rstrip()
        tail.append(line)
        m = re.match(r"step (\d+)/\d+ \| loss", line)
        if (m and (int(m.group(1)) % every == 0 or int(m.group(1)) == steps)) or \
                re.match(r"(step \d+/\d+ \| val loss|phase 1 done|held-out|LAMBADA|recall: acc|generation)", line) \
                or re.search(r"error|warning", line, re.I):
            print(f"{prefix} {line}", flush=True)
    return p.wait(), list(tail)


def estimate(cfg, runs, with_eval, env):
    """Seconds per (workload, variant) run from a short --bench of each, plus its evaluation."""
    est = {}
    for wl, name in dict.fromkeys((wl, n) for wl, n, _ in runs):
        w = cfg[wl]
        B, T = w["B"], w["T"]
        out = run_quiet([cfg["binary"], "--model", w["model"]] + variant_flags(name, w["model"]) +
                        ["-b", str(B), "-t", str(T), "--bench", str(cfg["bench"])], env)
        ms = json.loads(out.strip().splitlines()[-1])["ms_per_step"] / 1e3
        # ratios measured with pythia-14m on 2 cores (B 4, T 256): a val batch takes ~0.6 of a
        # step, a T-token forward at batch 1 ~0.55 of ms/B, a LAMBADA example (~81 tokens, the
        # head only on its last word) ~0.2 of 81 tokens' share of a step
        fwd, per_token = ms * 0.55 / B, ms / (B * T)
        s = w["steps"] * ms + (w["vals"] + 1) * w["val_batches"] * 0.6 * ms + 3
        if wl == "recall":  # the test file: forward passes of B examples
            q = w["mqar"]
            s += q["n_test"] * len(q["test_pairs"].split(",")) / B * 0.6 * ms
        elif with_eval:
            s += (w["heldout"] or 290_000) / (T // 2) * fwd  # windows of T, stride T/2
            s += (w["lambada"] or 5153) * 81 * per_token * 0.2
        if is_ctx(name):  # phase 1: up to rounds x iters Jacobi iterations, ~0.02 step each
            p1 = dict(zip(w["p1"][::2], w["p1"][1::2]))
            s += int(p1.get("--p1-rounds", 4)) * int(p1.get("--p1-iters", 60)) * 0.02 * ms \
                * int(p1.get("-b", B)) / B
        est[wl, name] = s
    return est


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ---------------------------------------------------------------------------------------------
# The table: means, spreads and marks over seeds

def mean_std(xs):
    """(mean, sample std or None, n) of the finite values in xs."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return m, s, len(xs)


def differs(a, b):
    """Welch: |mean_a - mean_b| > 2 standard errors of the difference (needs 2+ seeds each)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return False
    se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
    return abs(ma - mb) > 2 * se if se > 0 else ma != mb


def cell(stat, fmt, base=None):
    m, s, n = stat
    if n == 0:
        return "n/a"
    text = format(m, fmt) + (f" ± {format(s, fmt)}" if s is not None else "")
    return text + (" *" if base is not None and differs(stat, base) else "")


def load_results(out, names, workloads):
    """{(workload, variant): [result, ...] in seed order} from OUT/<workload>/<variant>_s<k>.json."""
    res = {}
    for wl in workloads:
        for name in names:
            paths = glob.glob(os.path.join(out, wl, f"{name}_s*.json"))
            rs = [json.load(open(p)) for p in paths]
            rs = sorted((r for r in rs if not r.get("failed")), key=lambda r: r["seed"])
            if rs:
                res[wl, name] = rs
    return res


def metric(rs, key):
    return [r.get(key) for r in rs]


def header(res, speed):
    """The table's header lines, from the settings stored in the runs."""
    lines = ["# KV-cache table: attention variants at one budget, over seeds", ""]
    seeds = sorted({r["seed"] for rs in res.values() for r in rs})
    some = next(iter(res.values()))[0]["settings"]
    lines.append(f"- {some['scale']} scale; seeds {', '.join(map(str, seeds))} (--seed; init and data order); "
                 f"`{some['binary']}`, {some['threads']} threads. Cells: mean ± std over the seeds a variant has; "
                 "* = differs from mha by more than 2 standard errors (Welch); n/a = not run.")
    for wl in WORKLOADS:
        st = next((rs[0]["settings"] for (w, _), rs in res.items() if w == wl), None)
        if not st:
            continue
        L, H, C = SHAPES[st["model"]]
        base = (f"- {wl}: {st['model']} shape ({L} layers, width {C}, {H} heads), B {st['B']} x T {st['T']}, "
                f"{st['steps']} steps = {st['B'] * st['T'] * st['steps']:,} tokens per run, lr {st['lr']:g} "
                f"(warmup {st['warmup']}, cosine to 0.1x)")
        if wl == "lm":
            base += (f", {st['data']} (--shuffle); val loss on {st['val_batches']} batches of its val split; held-out: "
                     f"WikiText-2 test, {st['heldout_cap'] or 'all'} tokens (window {st['T']}, stride {st['T'] // 2}); "
                     f"LAMBADA: {st['lambada_cap'] or 'all 5,153'} examples")
        else:
            q = st["mqar"]
            base += (f"; MQAR (prepro/mqar.py) vocab {q['vocab']}, T {q['t']}, trained on pairs {q['pairs']} mixed "
                     f"evenly ({q['n_train']:,} examples), tested on pairs {q['test_pairs']} ({q['n_test']:,} examples "
                     "each); loss on the answers only; recall = exact-match accuracy on the test answers")
        lines.append(base)
    if speed:
        s0 = next(iter(speed.values()))
        lines.append(f"- generation: {s0['gen_new']} new tokens after {s0['gen_prompt']}, batch 1 and 8, KV cache, "
                     "fp32, the first seed's lm model, timed after all training")
    lines.append("- KV bytes: the bf16 cache per token (per layer; and all layers, ctx variants' contexts "
                 "included), from the trainer's --kv-report accounting for the lm shape; reduction = mha's "
                 "all-layer bytes / the variant's")
    return lines


def recall_levels(res):
    """The pair counts of the recall runs, in increasing order."""
    return sorted({int(p) for (w, _), rs in res.items() if w == "recall" for r in rs
                   for p in (r.get("recall") or {}).get("by_pairs", {})})


def load_evict(out, rows, workloads):
    """{(workload, row): [result, ...] in seed order} from OUT/<workload>/evict/<row>_s<k>.json."""
    res = {}
    for wl in workloads:
        for row in rows:
            rs = [json.load(open(p)) for p in glob.glob(os.path.join(out, wl, "evict", f"{row}_s*.json"))]
            rs = sorted((r for r in rs if not r.get("failed")), key=lambda r: r["seed"])
            if rs:
                res[wl, row] = rs
    return res


def kept_text(rs):
    """"32 of 129 (25%)": the prompt slots a row's policy keeps, from its stored settings."""
    if not rs:
        return "n/a"
    p = rs[0]["settings"]["policy"]
    if p["policy"] == "full":
        return "all"
    extra = f", window {p['window']}" if "window" in p else f", sinks {p['sinks']}"
    return f"{p['budget']} of {p['prompt']} ({100 * p['budget'] / p['prompt']:.0f}%{extra})"


def evict_stats(ev, rows, levels):
    st = {}
    for row in rows:
        lm, rc = ev.get(("lm", row), []), ev.get(("recall", row), [])
        st[row, "heldout"] = mean_std(metric(lm, "heldout_loss_wikitext2"))
        st[row, "lambada"] = mean_std(metric(lm, "lambada_acc"))
        st[row, "recall"] = mean_std([(r.get("recall") or {}).get("acc") for r in rc])
        for p in levels:
            st[row, f"recall{p}"] = mean_std([(r.get("recall") or {}).get("by_pairs", {}).get(str(p)) for r in rc])
    return st


def evict_bytes(rs):
    """(KV bytes/token of the lm model, bf16, all layers; the same per prompt token kept at the lm
    prompt: bytes x kept / prompt), from the base run's --kv-report and the row's policy."""
    kv = rs[0]["kv_lm"]["kv_bytes_per_token_bf16"]
    p = rs[0]["settings"]["policy"]
    return kv, kv * (min(p["budget"], p["prompt"]) / p["prompt"] if p["policy"] != "full" else 1.0)


def write_evict_table(out, rows, workloads, levels):
    """The eviction section of kv_table.md (lines) and OUT/kv_eviction.png."""
    ev = load_evict(out, rows, workloads)
    if not ev:
        return []
    st = evict_stats(ev, rows, levels)
    cols = [("heldout", "held-out loss, decoded", ".4f"), ("lambada", "LAMBADA acc, decoded", ".4f"),
            ("recall", "recall acc, decoded", ".3f")] + [(f"recall{p}", f"recall {p} pairs", ".3f") for p in levels]
    head = ["row", "kept of the lm prompt", "kept of the recall prompt"] + [c[1] for c in cols] + [
        "KV bytes/token (bf16, lm)", "KV bytes per lm prompt token kept"]
    lines = ["", "## Decode-time eviction (doc/kv_eviction.md)", "",
             "Each row evaluates the models of its base variant's runs (the same seeds as above) by decoding: "
             "the context is prefilled, the policy compresses the cache, the rest is scored token by token. "
             "The rows `X, decoded` are the full cache scored the same way, the baseline of X's policies (* here: "
             "differs from it by more than 2 standard errors). Budgets are fractions of the longest prompt decoded: "
             "lm, a held-out window's context; recall, the key-value part of the most pairs tested (so fewer pairs "
             "fit the budget better). SnapKV's window is a quarter of the budget; StreamingLLM keeps 4 sinks.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lm, rc = ev.get(("lm", row), []), ev.get(("recall", row), [])
        if not lm and not rc:
            continue
        baseline = f"{EVICT_ROWS[row][0]}.full"
        cells = [cell(st[row, k], f, None if row == baseline or baseline not in rows else st[baseline, k]) for k, _, f in cols]
        kv, eff = evict_bytes(lm or rc)
        eff = f"{eff:.0f}" if lm else "n/a"
        lines.append("| " + " | ".join([evict_label(row), kept_text(lm), kept_text(rc)] + cells + [str(kv), eff]) + " |")
    walls = [r["wall_s"] for rs in ev.values() for r in rs]
    lines += ["", f"{len(walls)} decode-mode evaluations, {fmt_time(sum(walls))} in all. Commands: "
              f"`{shlex.join(next(iter(ev.values()))[0]['command'])}` and likewise (OUT/<workload>/evict/<row>_s<k>.json)."]
    plot_evict(ev, st, rows, levels, os.path.join(out, "kv_eviction.png"))
    return lines


def plot_evict(ev, st, rows, levels, png):
    """Recall by number of pairs, one line per row, and decoded held-out loss against the KV bytes
    kept per lm prompt token."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png} (make table installs it into .venv)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for i, row in enumerate(r for r in rows if ("recall", r) in ev):
        ys = [st[row, f"recall{p}"] for p in levels]
        style = "-" if EVICT_ROWS[row][1] == "full" else ("--" if EVICT_ROWS[row][1] == "streaming" else ":")
        ax.errorbar(levels, [y[0] for y in ys], yerr=[y[1] or 0 for y in ys], linestyle=style, marker="o", capsize=3,
                    color=f"C{i % 10}", label=f"{evict_label(row)} (kept {kept_text(ev['recall', row])})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(p) for p in levels])
    ax.set_xlabel("key-value pairs in the example (its prompt is 2 tokens a pair)")
    ax.set_ylabel("recall accuracy, decoded (higher is better)")
    ax.set_title("recall: eviction drops the pairs the queries will ask for", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    ax = axes[1]
    for i, row in enumerate(r for r in rows if ("lm", r) in ev):
        m, s, n = st[row, "heldout"]
        if n == 0:
            continue
        x = evict_bytes(ev["lm", row])[1]
        ax.errorbar([x], [m], yerr=[s or 0], fmt="o", color=f"C{i % 10}", capsize=4)
        ax.annotate(evict_label(row), (x, m), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KV bytes kept per token of the lm prompt (bf16, all layers, log scale)")
    ax.set_ylabel("WikiText-2 held-out loss, decoded (lower is better)")
    ax.set_title("lm: what eviction costs in loss", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    save_figure(fig, png, "Decode-time eviction on top of the structural variants", ev)


def write_table(out, names, workloads, evict_rows=()):
    """Write OUT/kv_table.md and the figures from the run JSONs of names (and the eviction rows)."""
    res = load_results(out, names, workloads)
    if not res:
        sys.exit(f"error: no finished run in {out}/{{{','.join(workloads)}}}/ for {','.join(names)}")
    speed = {}
    for name in names:
        p = os.path.join(out, "speed", f"{name}.json")
        if os.path.isfile(p):
            speed[name] = json.load(open(p))
    levels = recall_levels(res)
    stats = {}  # (variant, column) -> (mean, std, n)
    for name in names:
        lm, rc = res.get(("lm", name), []), res.get(("recall", name), [])
        stats[name, "val"] = mean_std(metric(lm, "val_loss"))
        stats[name, "heldout"] = mean_std(metric(lm, "heldout_loss_wikitext2"))
        stats[name, "lambada"] = mean_std(metric(lm, "lambada_acc"))
        stats[name, "recall"] = mean_std([(r.get("recall") or {}).get("acc") for r in rc])
        for p in levels:
            stats[name, f"recall{p}"] = mean_std([(r.get("recall") or {}).get("by_pairs", {}).get(str(p)) for r in rc])
    cols = [("val", "val loss", ".4f"), ("heldout", "held-out loss (WikiText-2)", ".4f"),
            ("lambada", "LAMBADA acc", ".4f"), ("recall", "recall acc", ".3f")] + \
           [(f"recall{p}", f"recall {p} pairs", ".3f") for p in levels]
    head = ["variant", "params"] + [c[1] for c in cols] + [
        "gen tok/s b1", "gen tok/s b8", "KV bytes/token/layer (bf16)", "KV bytes/token (bf16, all layers)",
        "KV reduction vs mha"]
    rows, notes = [], []
    base_kv = None
    for name in names:
        first = (res.get(("lm", name)) or res.get(("recall", name)) or [None])[0]
        if first is None:
            continue
        kvr = first["kv_lm"]
        base_kv = base_kv or first["kv_mha_bytes_per_token_bf16"]
        kv = kvr["kv_bytes_per_token_bf16"]
        sp = speed.get(name, {})
        row = [name, f"{kvr['params'] / 1e6:.2f}M"]
        row += [cell(stats[name, k], f, None if name == "mha" else stats.get(("mha", k))) for k, _, f in cols]
        row += [format(sp["generation_toks_per_s"], ".0f") if sp else "n/a",
                format(sp["generation_toks_per_s_b8"], ".0f") if sp else "n/a",
                str(kvr["kv_bytes_per_token_per_layer_bf16"]), str(kv),
                f"{base_kv / kv:.2f}x ({100 * (kv / base_kv - 1):+.1f}%)"]
        rows.append(row)
        walls = []
        for wl in WORKLOADS:
            rs = res.get((wl, name), [])
            if rs:
                w = sum(r["wall_s"] for r in rs) / len(rs)
                p1 = [r["phase1_wall_s"] for r in rs if r.get("phase1_wall_s") is not None]
                walls.append(f"{wl} {len(rs)} run(s), {fmt_time(w)} each" +
                             (f" (phase 1 {fmt_time(sum(p1) / len(p1))})" if p1 else ""))
        notes.append(f"- {name}: `{' '.join(first['flags']) or '(defaults)'}`; " + "; ".join(walls))
    lines = header(res, speed)
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    total = sum(r["wall_s"] for rs in res.values() for r in rs)
    lines += ["", f"Flags (on top of the shared ones above) and mean wall time per run, phase 1 included "
              f"(phase 1 trains the ContextBlock alone, outside the step budget); {fmt_time(total)} of runs in all:"] + notes
    lines += write_evict_table(out, list(evict_rows), workloads, levels)
    md = os.path.join(out, "kv_table.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    print("\n".join(lines))
    print(f"\nwrote {md}")
    # each panel's x is the KV bytes of the model its runs trained (lm: the lm shape; recall: pythia-mqar)
    points = {wl: [(name, res[wl, name][0]["kv_run"]["kv_bytes_per_token_bf16"], stats[name, col])
                   for name in names if (wl, name) in res] for wl, col in (("lm", "val"), ("recall", "recall"))}
    plot_pareto(points, os.path.join(out, "kv_pareto.png"), levels, res)
    from plot_losses import plot
    runs = [(n, os.path.join(out, rs[0]["run_dir"], "log.jsonl")) for (wl, n), rs in res.items() if wl == "lm"]
    runs = [(n, p) for n, p in runs if os.path.isfile(p)]
    if runs:
        st = next(rs[0]["settings"] for (wl, _), rs in res.items() if wl == "lm")
        plot(runs, os.path.join(out, "kv_losses.png"),
             title=f"lm: {st['model']} shape, B {st['B']} x T {st['T']}, {st['steps']} steps of {st['data']} (seed {SEED0})")


def save_figure(fig, png, title, res):
    """The title with the seeds the results {key: [run]} span, then png written."""
    import matplotlib.pyplot as plt
    seeds = sorted({r["seed"] for rs in res.values() for r in rs})
    fig.suptitle(f"{title}: mean ± std over {len(seeds)} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


def pareto(points, better):
    """Indices of the points (x, y) no other point beats: x no larger and y no worse, one strictly."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and better(y2, y) and (x2 < x or y2 != y)) or (x2 < x and y2 == y)
                   for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(points, png, levels, res):
    """KV bytes/token (log x) against val loss and recall accuracy, error bars over seeds, the
    Pareto front drawn (fewer bytes and better quality). points: {workload: [(variant, x, stat)]}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png} (make table installs it into .venv)")
        return
    model = {wl: next((rs[0]["settings"]["model"] for (w, _), rs in res.items() if w == wl), "") for wl in WORKLOADS}
    panels = [("lm", "val loss (lower is better)", f"lm: {model['lm']}", lambda a, b: a < b),
              ("recall", "recall accuracy (higher is better)",
               f"recall: MQAR on {model['recall']}, test pairs {','.join(map(str, levels))}", lambda a, b: a > b)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (wl, label, title, better) in zip(axes, panels):
        pts = [p for p in points.get(wl, []) if p[2][2] > 0]
        if not pts:
            ax.text(0.5, 0.5, f"no {wl} runs", ha="center", transform=ax.transAxes)
            continue
        for name, x, (m, s, n) in pts:
            ax.errorbar([x], [m], yerr=[s or 0], fmt="o", color=f"C{VARIANTS.index(name) % 10}", capsize=4)
            ax.annotate(name, (x, m), textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = pareto([(x, st[0]) for _, x, st in pts], better)
        xs, ys = [pts[i][1] for i in front], [pts[i][2][0] for i in front]
        ax.step(xs, ys, where="post", color="0.4", linestyle="--", linewidth=1, marker="o", markerfacecolor="none",
                markersize=12, label="Pareto front: no variant has fewer bytes and better quality")
        ax.set_xscale("log")
        ax.set_xlabel(f"KV cache bytes per token, all layers of the {wl} model (bf16, log scale)")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    save_figure(fig, png, "Quality against KV-cache size", res)


# --compare: how far a rerun may land from the published numbers. On the machine that made them,
# reruns with 1 or 2 threads gave the same losses to the last digit (OpenMP splits independent
# rows, not sums); another CPU or compiler (FMA, vector width) changes roundings, which training
# amplifies by an amount not measured here. A broken run (a sign error, a wrong schedule, other
# data) moves the losses by tenths. Recall accuracy is checked more loosely: a run near the
# point where recall is learned moves by more for the same rounding change.
COMPARE_EXACT = ["params", "tokens_seen", "kv_bytes_per_token_per_layer_bf16", "kv_bytes_per_token_bf16"]
COMPARE_ABS = {"val_loss": 0.05, "heldout_loss_wikitext2": 0.05, "lambada_acc": 0.01, "recall_acc": 0.10}


def compare(out, ref, names, workloads):
    """Compare each run OUT/<workload>/<variant>_s<k>.json with REF's; print a line per number;
    return the number of mismatches."""
    bad, seen = 0, 0
    for wl in workloads:
        for name in names:
            for p in sorted(glob.glob(os.path.join(ref, wl, f"{name}_s*.json"))):
                mine = os.path.join(out, wl, os.path.basename(p))
                if not os.path.isfile(mine):
                    continue
                seen += 1
                new, old = json.load(open(mine)), json.load(open(p))
                for r in (new, old):
                    r["recall_acc"] = (r.get("recall") or {}).get("acc")
                tag = f"{wl}/{os.path.basename(p)[:-5]}"
                for key in COMPARE_EXACT + list(COMPARE_ABS):
                    a, b = new.get(key), old.get(key)
                    if a is None and b is None:
                        continue
                    if a is None or b is None:
                        ok, why = False, "missing"
                    elif key in COMPARE_EXACT:
                        ok, why = a == b, "must be equal"
                    else:
                        ok, why = abs(a - b) <= COMPARE_ABS[key], f"|diff| {abs(a - b):.4f} (tol {COMPARE_ABS[key]})"
                    bad += not ok
                    print(f"{'ok  ' if ok else 'DIFF'} {tag:22s} {key:34s} {a!s:>12} vs {b!s:>12}  {why}")
    if seen == 0:
        sys.exit(f"error: no run has a .json in both {out} and {ref}")
    print(f"compare: {seen} run(s) against {ref}: {bad} number(s) outside tolerance")
    return bad


# ---------------------------------------------------------------------------------------------

def settings_of(scale, cfg, wl, threads):
    """What a run's result must match to be reused."""
    w = cfg[wl]
    st = {"scale": scale, "workload": wl, "model": w["model"], "B": w["B"], "T": w["T"], "steps": w["steps"],
          "lr": w["lr"], "warmup": max(1, w["steps"] // 10), "binary": cfg["binary"], "threads": threads,
          "val_batches": w["val_batches"], "p1": w["p1"]}
    if wl == "lm":
        st.update(data=w["data"], heldout_cap=w["heldout"], lambada_cap=w["lambada"])
    else:
        st.update(mqar=w["mqar"])
    return st


def run_one(scale, cfg, wl, name, k, out, with_eval, env, base_kv, prefix, keep_model):
    """Train and evaluate one (workload, variant, seed); write and return its result. keep_model:
    leave its model.bin (the speed pass and the eviction rows evaluate it)."""
    seed = SEED0 + k
    run_dir = os.path.join(out, "runs", wl, name, f"s{k}")
    # the commands run in REPO and name the run by a relative path: no machine's path in results
    p1_cmd, cmd = train_cmd(scale, cfg, wl, name, seed, os.path.relpath(run_dir, REPO), with_eval)
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics):
        os.remove(metrics)  # a stale one must not pass for this run's
    t0 = time.time()
    rc, tail, p1_s, p1 = 0, [], None, None
    if p1_cmd:
        print(f"{prefix} phase 1: {shlex.join(p1_cmd)}", flush=True)
        rc, tail = stream(p1_cmd, env, prefix, 0)
        p1_s = time.time() - t0
        p1_metrics = os.path.join(run_dir, "phase1", "metrics.json")
        if rc == 0 and os.path.isfile(p1_metrics):
            p1 = json.load(open(p1_metrics))
    if rc == 0:
        print(f"{prefix} {shlex.join(cmd)}", flush=True)
        rc, tail = stream(cmd, env, prefix, cfg[wl]["steps"])
    wall = time.time() - t0
    lm_model = cfg["lm"]["model"]
    result = {"variant": name, "workload": wl, "seed": seed, "flags": variant_flags(name, cfg[wl]["model"]),
              "command": cmd, "wall_s": round(wall, 1), "run_dir": os.path.relpath(run_dir, out),
              "phase1_wall_s": None if p1_s is None else round(p1_s, 1), "phase1": p1,
              "kv_mha_bytes_per_token_bf16": base_kv,
              "kv_lm": kv_report(cfg["binary"], lm_model, variant_flags(name, lm_model)),
              "kv_run": kv_report(cfg["binary"], cfg[wl]["model"], variant_flags(name, cfg[wl]["model"])),
              "settings": settings_of(scale, cfg, wl, int(env["OMP_NUM_THREADS"]))}
    if rc != 0 or not os.path.isfile(metrics):
        print(f"{prefix} FAILED (exit {rc}); last lines:\n  " + "\n  ".join(tail), flush=True)
        result["failed"] = True
    else:
        result = {**json.load(open(metrics)), **result}
        for d in (run_dir, os.path.join(run_dir, "phase1")):  # AdamW state, 3x the model: not needed
            for f in ["train_state.bin"] + ([] if keep_model else ["model.bin"]):
                if os.path.exists(os.path.join(d, f)):
                    os.remove(os.path.join(d, f))
    os.makedirs(os.path.join(out, wl), exist_ok=True)
    with open(os.path.join(out, wl, f"{name}_s{k}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def evict_path(out, wl, row, k):
    return os.path.join(out, wl, "evict", f"{row}_s{k}.json")


def evict_settings(scale, cfg, wl, row, base):
    """What an eviction row's result must match to be reused: its policy and evaluation, and the
    base run it evaluated (its settings and final training loss: a retrained base redoes it)."""
    w = cfg[wl]
    return {"policy": evict_policy(cfg, wl, row)[0], "base": base.get("settings"), "base_train_loss": base.get("train_loss"),
            "eval": {"heldout": w.get("heldout"), "lambada": w.get("lambada"), "B": w["B"], "T": w["T"]}}


def evict_pending(scale, cfg, out, rows, workloads, seeds):
    """[(workload, row, k)] whose result is missing or stale against the base run on disk."""
    todo = []
    for k in range(seeds):
        for wl in workloads:
            for row in rows:
                bp = os.path.join(out, wl, f"{EVICT_ROWS[row][0]}_s{k}.json")
                base = json.load(open(bp)) if os.path.isfile(bp) else {}
                p = evict_path(out, wl, row, k)
                old = json.load(open(p)) if os.path.isfile(p) else None
                if not (old and not old.get("failed") and old.get("settings") == evict_settings(scale, cfg, wl, row, base)):
                    todo.append((wl, row, k))
    return todo


def run_evict(scale, cfg, wl, row, k, out, env, prefix):
    """Evaluate the base run's model of (wl, row, k) by decoding under the row's policy."""
    base_name = EVICT_ROWS[row][0]
    base = json.load(open(os.path.join(out, wl, f"{base_name}_s{k}.json")))
    model_bin = os.path.join(out, "runs", wl, base_name, f"s{k}", "model.bin")
    run_dir = os.path.join(out, "runs", wl, "evict", row, f"s{k}")
    cmd = evict_cmd(scale, cfg, wl, row, os.path.relpath(model_bin, REPO), os.path.relpath(run_dir, REPO))
    metrics = os.path.join(run_dir, "metrics.json")
    if os.path.exists(metrics):
        os.remove(metrics)
    print(f"{prefix} {shlex.join(cmd)}", flush=True)
    t0 = time.time()
    rc, tail = stream(cmd, env, prefix, 0)
    result = {"row": row, "label": evict_label(row), "base": base_name, "workload": wl, "seed": SEED0 + k,
              "command": cmd, "wall_s": round(time.time() - t0, 1),
              "kv_lm": base.get("kv_lm"), "kv_run": base.get("kv_run"),
              "settings": evict_settings(scale, cfg, wl, row, base)}
    if rc != 0 or not os.path.isfile(metrics):
        print(f"{prefix} FAILED (exit {rc}); last lines:\n  " + "\n  ".join(tail), flush=True)
        result["failed"] = True
    else:
        result = {**json.load(open(metrics)), **result}
    os.makedirs(os.path.dirname(evict_path(out, wl, row, k)), exist_ok=True)
    with open(evict_path(out, wl, row, k), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps, small eval caps (~2 min)")
    ap.add_argument("--out", default="results", help="output folder (default results)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list (default {','.join(VARIANTS)})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list (default lm,recall)")
    ap.add_argument("--evict-rows", default=",".join(EVICT_ROWS),
                    help=f"decode-time eviction rows, comma list or 'none' (default {','.join(EVICT_ROWS)}); "
                         "a row needs its base variant among --variants")
    ap.add_argument("--seeds", type=int, help="runs per variant and workload (default: the scale's, 3 at cpu)")
    ap.add_argument("--steps", type=int, help="lm optimizer steps per run (default: the scale's)")
    ap.add_argument("--recall-steps", type=int, help="recall optimizer steps per run (default: the scale's)")
    ap.add_argument("--binary", help="trainer binary (default ./train_ctxkv, ./train_ctxkv_cu for gpu)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: 1 with "
                    "--quick, which keeps it fast on a busy machine; else $OMP_NUM_THREADS or 2)")
    ap.add_argument("--no-estimate", action="store_true", help="skip the --bench time estimate")
    ap.add_argument("--dry-run", action="store_true", help="print the estimate and the commands, run nothing")
    ap.add_argument("--table-only", action="store_true", help="rebuild table and figures from OUT's runs")
    ap.add_argument("--compare", metavar="REF_DIR", help="after the table, compare OUT's runs with "
                    "REF_DIR's (e.g. doc/results/cpu, the README's run); exit 1 on a number out of tolerance")
    args = ap.parse_args()
    scale = "quick" if args.quick else args.scale
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SCALES[scale].items()}
    if args.binary:
        cfg["binary"] = args.binary
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {','.join(bad)}; choose from {','.join(VARIANTS)}")
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        ap.error(f"--workloads {args.workloads}: choose from {','.join(WORKLOADS)}")
    for flag, wl in ((args.steps, "lm"), (args.recall_steps, "recall")):
        if flag is not None:
            if flag < 1:
                ap.error("--steps and --recall-steps must be >= 1")
            cfg[wl]["steps"] = flag
    seeds = args.seeds or cfg["seeds"]
    if seeds < 1:
        ap.error("--seeds must be >= 1")
    rows = [] if args.evict_rows == "none" else [r for r in args.evict_rows.split(",") if r]
    bad = [r for r in rows if r not in EVICT_ROWS]
    if bad:
        ap.error(f"unknown eviction row(s) {','.join(bad)}; choose from {','.join(EVICT_ROWS)} or none")
    rows = [r for r in rows if EVICT_ROWS[r][0] in names]
    evict_bases = {EVICT_ROWS[r][0] for r in rows}
    out = os.path.abspath(args.out)
    if args.compare and not os.path.isdir(args.compare):
        ap.error(f"--compare {args.compare}: no such folder")
    if args.threads is None:
        args.threads = 1 if args.quick else int(os.environ.get("OMP_NUM_THREADS") or 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.table_only:
        write_table(out, names, workloads, rows)
        if args.compare and compare(out, args.compare, names, workloads):
            sys.exit(1)
        return
    if not os.access(os.path.join(REPO, cfg["binary"]), os.X_OK) and not os.access(cfg["binary"], os.X_OK):
        sys.exit(f"error: trainer {cfg['binary']} not found (make train_ctxkv; or --binary PATH)")
    help_text = subprocess.run([cfg["binary"], "-h"], cwd=REPO, capture_output=True, text=True).stdout
    if "--eval-recall" not in help_text:
        sys.exit(f"error: {cfg['binary']} has no --eval-recall: rebuild it (make train_ctxkv)")

    t_start = time.time()
    with_eval = prepare_data(scale, cfg, workloads, "optional" if args.quick else "required")
    # lm's eviction rows are its decoded evaluations: none without the evaluation files
    evict_wls = [wl for wl in workloads if wl != "lm" or with_eval]
    if rows and len(evict_wls) < len(workloads):
        print("no data/eval files: the eviction rows are evaluated on recall only", flush=True)
    base_kv = kv_report(cfg["binary"], cfg["lm"]["model"], [])["kv_bytes_per_token_bf16"]
    # seeds outermost, so that a table cut short has every variant at its first seeds
    runs = [(wl, name, k) for k in range(seeds) for wl in workloads for name in names]
    todo = []
    for wl, name, k in runs:
        p = os.path.join(out, wl, f"{name}_s{k}.json")
        old = json.load(open(p)) if os.path.isfile(p) else None
        if old and not old.get("failed") and old.get("settings") == settings_of(scale, cfg, wl, args.threads):
            continue
        todo.append((wl, name, k))
    # a finished base run whose model.bin is gone is trained again when an eviction row still needs it
    evict_todo = evict_pending(scale, cfg, out, rows, evict_wls, seeds)
    for wl, row, k in evict_todo:
        run = (wl, EVICT_ROWS[row][0], k)
        if run not in todo and not os.path.isfile(os.path.join(out, "runs", wl, run[1], f"s{k}", "model.bin")):
            todo.append(run)
    todo.sort(key=runs.index)
    if len(todo) < len(runs):
        print(f"reusing {len(runs) - len(todo)} finished run(s) in {out} with the same settings", flush=True)
    est = {}
    if todo and not args.no_estimate:
        print(f"measuring ms/step of each variant (--bench {cfg['bench']}) for a time estimate ...", flush=True)
        est = estimate(cfg, todo, with_eval, env)
        total = sum(est[wl, n] for wl, n, _ in todo) + 15 * len(names) * ("lm" in workloads)
        print(f"estimate: {fmt_time(total)} for {len(todo)} run(s) (per run: " +
              ", ".join(f"{wl} {n} {fmt_time(s)}" for (wl, n), s in est.items()) + ")", flush=True)
    if args.dry_run:
        for wl, name, k in todo:
            for cmd in train_cmd(scale, cfg, wl, name, SEED0 + k, os.path.relpath(os.path.join(out, "runs", wl, name, f"s{k}"), REPO), with_eval):
                if cmd:
                    print(shlex.join(cmd))
        for wl, row, k in evict_todo:
            rel = lambda *p: os.path.relpath(os.path.join(out, "runs", wl, *p), REPO)
            print(shlex.join(evict_cmd(scale, cfg, wl, row, rel(EVICT_ROWS[row][0], f"s{k}", "model.bin"), rel("evict", row, f"s{k}"))))
        return
    os.makedirs(out, exist_ok=True)
    failed, done_s, done_est = [], 0.0, 0.0
    for i, (wl, name, k) in enumerate(todo, 1):
        prefix = f"[{i}/{len(todo)} {wl} {name} s{k}]"
        print(f"\n=== run {i}/{len(todo)}: {wl}, {name} ({' '.join(variant_flags(name, cfg[wl]['model'])) or 'mha'}), "
              f"seed {SEED0 + k}", flush=True)
        t0 = time.time()
        r = run_one(scale, cfg, wl, name, k, out, with_eval, env, base_kv, prefix,
                    keep_model=(k == 0 and wl == "lm") or name in evict_bases)
        if r.get("failed"):
            failed.append(f"{wl}/{name}_s{k}")
        wall = time.time() - t0
        done_s += wall
        msg = f"{prefix} done in {fmt_time(wall)}"
        if est:
            done_est += est[wl, name]
            left = sum(est[w, n] for w, n, _ in todo[i:]) * done_s / done_est
            msg += f" (estimated {fmt_time(est[wl, name])}); elapsed {fmt_time(time.time() - t_start)}, " \
                   f"about {fmt_time(left)} left"
        print(msg, flush=True)
    if "lm" in workloads:  # generation speed, on cores no training uses
        print("\n=== generation speed (the first seed's lm model of each variant)", flush=True)
        os.makedirs(os.path.join(out, "speed"), exist_ok=True)
        train_glob = workload_files(scale, cfg, "lm")[0]
        for name in names:
            model_bin = os.path.join(out, "runs", "lm", name, "s0", "model.bin")
            speed_json = os.path.join(out, "speed", f"{name}.json")
            if not os.path.isfile(model_bin) or (os.path.isfile(speed_json) and ("lm", name, 0) not in todo):
                continue  # kept: its model was not retrained
            sdir = os.path.join(out, "runs", "speed", name)
            rc, tail = stream(speed_cmd(cfg, os.path.relpath(model_bin, REPO), train_glob) +
                              ["--out", os.path.relpath(sdir, REPO)], env, f"[speed {name}]", 0)
            if rc != 0:
                failed.append(f"speed/{name}")
                continue
            m = json.load(open(os.path.join(sdir, "metrics.json")))
            m.update(variant=name, gen_prompt=cfg["gen"][0], gen_new=cfg["gen"][1], threads=args.threads)
            with open(speed_json, "w") as f:
                json.dump(m, f, indent=1)
    evict_todo = evict_pending(scale, cfg, out, rows, evict_wls, seeds)
    if evict_todo:
        print(f"\n=== decode-time eviction: {len(evict_todo)} evaluation(s) by decoding of the base runs' models", flush=True)
        t_ev = time.time()
        for i, (wl, row, k) in enumerate(evict_todo, 1):
            prefix = f"[evict {i}/{len(evict_todo)} {wl} {row} s{k}]"
            if not os.path.isfile(os.path.join(out, wl, f"{EVICT_ROWS[row][0]}_s{k}.json")):
                print(f"{prefix} skipped: no base run", flush=True)
                continue
            r = run_evict(scale, cfg, wl, row, k, out, env, prefix)
            if r.get("failed"):
                failed.append(f"{wl}/evict/{row}_s{k}")
            spent = time.time() - t_ev
            print(f"{prefix} done in {fmt_time(r['wall_s'])}; about {fmt_time(spent / i * (len(evict_todo) - i))} left", flush=True)
    print()
    write_table(out, names, workloads, rows)
    print(f"total {fmt_time(time.time() - t_start)}")
    if failed:
        sys.exit(f"error: run(s) failed: {', '.join(failed)}")
    if args.compare and compare(out, args.compare, names, workloads):
        sys.exit(1)


if __name__ == "__main__":
    main()
