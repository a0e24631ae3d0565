"""Train the attention variants at one budget and tabulate quality, speed and KV-cache size.

    python dev/kv_table.py --scale cpu    # the table on 2 CPU cores, ~50 min (see Scales)
    python dev/kv_table.py --quick        # smoke test, ~1 min
    python dev/kv_table.py --scale gpu    # ./train_ctxkv_cu, pythia-160m shape
    python dev/kv_table.py --table-only   # rebuild the table and PNG from OUT/<variant>.json
    python dev/kv_table.py --dry-run      # print the time estimate and the commands only
    python dev/kv_table.py --table-only --compare doc/results/cpu   # your run vs the README's
Options: --out DIR (default results), --variants mha,gqa,..., --steps N, --binary PATH,
--threads N. Use a Python with matplotlib (e.g. devvenv/bin/python) to get the PNG.

Scales (every variant gets the same B x T x steps tokens, cosine lr, warmup steps/10, seed 1337,
and --shuffle: batches are blocks drawn across all the shards, in the same order for every variant,
where reading in file order would show a short run only the first few books):
  cpu    pythia-14m shape (6 layers, width 128, 4 heads), B 4, T 256, 600 steps = 614,400 tokens
         of Gutenberg, lr 2e-3; held-out capped at 65,536 WikiText-2 tokens; all 5,153 LAMBADA
         examples. On 2 quiet cores a variant takes 600 x ~0.55 s of steps plus ~2 min of val
         and evaluation (ctxpythia ~4 min in all; phase 1 ~5 s): 49 min from a fresh clone,
         build and data prep included (2026-11-24; README), within a 90-minute budget. Other
         load on the cores slows OpenMP several-fold.
  gpu    ./train_ctxkv_cu, pythia-160m shape, B 16, T 1024, 2000 steps = 32.8 M tokens, lr 6e-4,
         all of WikiText-2 and LAMBADA. Documented, not run on the machine this was written on.
  quick  pythia-14m shape on Tiny Shakespeare (tokenized in seconds, where Gutenberg takes a
         minute), B 2, T 64, 16 steps, held-out 512 tokens, LAMBADA 32 examples, 1 thread:
         ~1 min; for tests (dev/test_kv_table.py), its numbers mean nothing.

Variants (same token budget, lr schedule and seed; sizes follow the model shape, H heads of D):
  mha         multi-head attention (the Pythia baseline)
  gqa         grouped-query, G = H/4 KV heads (H/2 when H = 4)
  mqa         multi-query, one KV head
  mla         multi-head latent attention, kv-rank 4*D, rope-dim D
  ctxkv-mha   layer 0 attends over ContextBlock contexts, mha elsewhere
  ctxkv-gqa   the same with gqa elsewhere
  ctxpythia   every layer at the context width, fed by the contexts
The context width is half the model width. The ctx variants first train their ContextBlock
alone (--phase 1, OUT/runs/<variant>/phase1), then the rest with the block frozen (phase 2);
phase 1 is outside the step budget and its time is reported.

Each run trains, evaluates (val loss; WikiText-2 held-out loss; LAMBADA; generation tok/s at
batch 1 and 8) and writes OUT/runs/<variant>/{log.jsonl,metrics.json,model.bin}. Then:
  OUT/<variant>.json   its metrics.json plus variant, flags, wall time, phase 1
  OUT/kv_table.md      the table, with the run's settings and caps in its header
  OUT/kv_losses.png    train and val loss curves (needs matplotlib; skipped without it)
Data made when missing: data/gutenberg/{train,val}_*.bin (prepro/tokenize_text.py, ~1 min),
data/eval/*.bin (prepro/eval_data.py), data/tinyshakespeare/ (--quick).
Runs only the standard library (plus matplotlib if present); the prepro scripts run with .venv.
"""
import argparse
import collections
import glob
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

SHAPES = {"pythia-14m": (6, 4, 128), "pythia-70m": (6, 8, 512), "pythia-160m": (12, 12, 768)}  # L, H, C
SCALES = {
    # steps: optimizer steps of B x T tokens; vals: val-loss points; heldout: tokens scored (0 = all)
    "cpu": dict(binary="./train_ctxkv", model="pythia-14m", B=4, T=256, steps=600, lr=2e-3,
                vals=6, val_batches=20, heldout=65536, lambada=0, gen=(128, 256), data="gutenberg",
                p1=["-b", "8", "--p1-rounds", "6"], bench=2),
    "gpu": dict(binary="./train_ctxkv_cu", model="pythia-160m", B=16, T=1024, steps=2000, lr=6e-4,
                vals=10, val_batches=20, heldout=0, lambada=0, gen=(128, 256), data="gutenberg",
                p1=["-b", "8", "--p1-rounds", "6"], bench=3),
    "quick": dict(binary="./train_ctxkv", model="pythia-14m", B=2, T=64, steps=16, lr=2e-3,
                  vals=2, val_batches=2, heldout=512, lambada=32, gen=(16, 32), data="tinyshakespeare",
                  p1=["-b", "2", "--p1-rounds", "1", "--p1-iters", "5"], bench=1),
}
DATA = {
    "gutenberg": ("data/gutenberg/train_*.bin", "data/gutenberg/val_*.bin"),
    "tinyshakespeare": ("data/tinyshakespeare/tiny_shakespeare_train.bin",
                        "data/tinyshakespeare/tiny_shakespeare_val.bin"),
}
HELDOUT, LAMBADA = "data/eval/wikitext2_test.bin", "data/eval/lambada_test.bin"
VARIANTS = ["mha", "gqa", "mqa", "mla", "ctxkv-mha", "ctxkv-gqa", "ctxpythia"]
COLUMNS = ["variant", "params", "val loss", "held-out loss (WikiText-2)", "LAMBADA acc",
           "LAMBADA ppl", "gen tok/s b1", "gen tok/s b8", "KV bytes/token/layer (bf16)",
           "KV bytes/token (bf16, all layers)", "KV reduction vs mha"]


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


def prepare_data(cfg, want_eval):
    """Make the training shards and eval files when missing; returns the eval files present."""
    py = prepro_python()
    train, val = DATA[cfg["data"]]
    if not glob.glob(os.path.join(REPO, train)) or not glob.glob(os.path.join(REPO, val)):
        t0 = time.time()
        if cfg["data"] == "tinyshakespeare":
            run_quiet([py, "prepro/tinyshakespeare.py"])
        else:
            print("tokenizing the Gutenberg books into data/gutenberg/ (about a minute on 2 cores)", flush=True)
            for split, prefix in (("train", "train"), ("valid", "val")):
                src = os.path.join(SHARED, "gutenberg", f"gutenberg_{split}.txt.gz")
                if not os.path.isfile(src):
                    sys.exit(f"error: {src} not found (the Gutenberg corpus, ../shared/data/SOURCES.md)")
                run_quiet([py, "prepro/tokenize_text.py", "--input", src, "--out", f"data/gutenberg/{prefix}"])
        print(f"data prepared in {time.time() - t0:.0f} s", flush=True)
    if not want_eval:
        return False
    if all(os.path.isfile(os.path.join(REPO, p)) for p in (HELDOUT, LAMBADA)):
        return True
    srcs = [os.path.join(SHARED, "wikitext-2", "wiki.test.raw"), os.path.join(SHARED, "lambada_test.jsonl")]
    if not all(os.path.isfile(s) for s in srcs):
        if want_eval == "required":
            sys.exit(f"error: {' or '.join(srcs)} missing: cannot make the eval files (prepro/eval_data.py)")
        print(f"note: {srcs[0]} or {srcs[1]} missing: no held-out or LAMBADA evaluation", flush=True)
        return False
    print(run_quiet([py, "prepro/eval_data.py"]).rstrip(), flush=True)
    return True


def train_cmd(cfg, name, run_dir, steps, with_eval):
    B, T = cfg["B"], cfg["T"]
    train, val = DATA[cfg["data"]]
    flags = variant_flags(name, cfg["model"])
    cmd = [cfg["binary"], "--model", cfg["model"]] + flags + [
        "-b", str(B), "-t", str(T), "--steps", str(steps), "--lr", str(cfg["lr"]),
        "--warmup", str(max(1, steps // 10)), "--val-every", str(max(1, steps // cfg["vals"])),
        "--val-batches", str(cfg["val_batches"]), "--sample-every", "0", "--seed", "1337",
        "--shuffle", "--train", train, "--val", val, "--out", run_dir, "--eval-gen",
        "--gen-prompt", str(cfg["gen"][0]), "--gen-new", str(cfg["gen"][1])]
    if with_eval:
        cmd += ["--eval-heldout", HELDOUT, "--heldout-max-tokens", str(cfg["heldout"]),
                "--eval-lambada", LAMBADA, "--lambada-max", str(cfg["lambada"])]
    p1 = [cfg["binary"], "--model", cfg["model"]] + flags + cfg["p1"] + [
        "-t", str(T), "--seed", "1337", "--shuffle", "--train", train, "--val", val,
        "--phase", "1", "--out", os.path.join(run_dir, "phase1")]
    if is_ctx(name):
        cmd += ["--context-block", os.path.join(run_dir, "phase1", "context_block.bin")]
    return (p1 if is_ctx(name) else None), cmd


def stream(cmd, env, prefix, steps):
    """Run cmd, print its progress lines with prefix; returns (exit code, last lines)."""
    every = max(1, steps // 10)
    tail = collections.deque(maxlen=40)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, errors="replace")
    for line in p.stdout:
        line = line.rstrip()
        tail.append(line)
        m = re.match(r"step (\d+)/\d+ \| loss", line)
        if (m and (int(m.group(1)) % every == 0 or int(m.group(1)) == steps)) or \
                re.match(r"(step \d+/\d+ \| val loss|phase 1 (round \d+/|done)|held-out|LAMBADA|generation)", line) \
                or re.search(r"error|warning", line, re.I):
            print(f"{prefix} {line}", flush=True)
    return p.wait(), list(tail)


def estimate(cfg, names, steps, with_eval, env):
    """Seconds per variant from a short --bench of each, plus the evaluation's forward passes."""
    est, bench = {}, {}
    B, T = cfg["B"], cfg["T"]
    for name in names:
        out = run_quiet([cfg["binary"], "--model", cfg["model"]] + variant_flags(name, cfg["model"]) +
                        ["-b", str(B), "-t", str(T), "--bench", str(cfg["bench"])], env)
        ms = json.loads(out.strip().splitlines()[-1])["ms_per_step"] / 1e3
        bench[name] = ms
        # ratios measured with pythia-14m on 2 cores (B 4, T 256): a val batch takes ~0.6 of a
        # step, a T-token forward at batch 1 ~0.55 of ms/B, a LAMBADA example (~81 tokens, the
        # head only on its last word) ~0.2 of 81 tokens' share of a step; decoding ~800 tok/s
        fwd, per_token = ms * 0.55 / B, ms / (B * T)
        s = steps * ms + (cfg["vals"] + 1) * cfg["val_batches"] * 0.6 * ms + 5
        s += cfg["gen"][1] * 9 / 800
        if with_eval:
            s += (cfg["heldout"] or 290_000) / (T // 2) * fwd  # windows of T, stride T/2
            s += (cfg["lambada"] or 5153) * 81 * per_token * 0.2
        if is_ctx(name):  # phase 1: up to rounds x iters Jacobi iterations, ~0.02 step each
            p1 = dict(zip(cfg["p1"][::2], cfg["p1"][1::2]))
            s += int(p1.get("--p1-rounds", 4)) * int(p1.get("--p1-iters", 60)) * 0.02 * ms \
                * int(p1.get("-b", B)) / B
        est[name] = s
    print("ms/step: " + ", ".join(f"{n} {1e3 * ms:.0f}" for n, ms in bench.items()), flush=True)
    return est


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def num(x, f):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, f)


def header(st, heldout_tokens, lambada_examples):
    """The table's header lines, from the settings a run stored in each OUT/<variant>.json."""
    L, H, C = SHAPES[st["model"]]
    B, T, steps = st["B"], st["T"], st["steps"]
    ev = f"{heldout_tokens:,} tokens scored" if heldout_tokens is not None else "not run"
    ex = f"{lambada_examples:,} examples" if lambada_examples is not None else "not run"
    return [
        f"# KV-cache table: attention variants at one budget ({st['scale']} scale)", "",
        f"- {st['model']} shape ({L} layers, width {C}, {H} heads), B {B} x T {T}, {steps} steps = "
        f"{B * T * steps:,} tokens per variant of {st['data']} (--shuffle), lr {st['lr']:g} (warmup {st['warmup']}, "
        f"cosine to 0.1x), seed 1337, {st['threads']} threads, `{st['binary']}`",
        f"- val loss: {st['val_batches']} batches of {st['data']} val; held-out (WikiText-2 test): {ev} "
        f"(cap {st['heldout_cap'] or 'none'}; window {T}, stride {T // 2}; WikiText-103's test articles "
        f"are WikiText-2's, so one number); LAMBADA: {ex} (cap {st['lambada_cap'] or 'none'}); "
        f"generation: {st['gen_new']} new tokens after {st['gen_prompt']}, batch 1 and 8, KV cache, fp32",
        "- KV bytes: the bf16 cache per token (per layer; and all layers, ctx variants' contexts "
        "included), from the trainer's --kv-report accounting; reduction = mha's all-layer bytes / "
        "the variant's"]


def write_table(out, names):
    """Write OUT/kv_table.md and OUT/kv_losses.png from OUT/<variant>.json of names."""
    res = []
    for name in names:
        path = os.path.join(out, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                res.append(json.load(f))
    if not res:
        sys.exit(f"error: no <variant>.json in {out}")
    first = lambda key: next((r[key] for r in res if r.get(key) is not None), None)
    st = res[0]["settings"]
    rows, runs, notes = [], [], []
    for r in res:
        name, base, kv = r["variant"], r.get("kv_mha_bytes_per_token_bf16"), r.get("kv_bytes_per_token_bf16")
        red = "n/a" if not (kv and base) else f"{base / kv:.2f}x ({100 * (kv / base - 1):+.1f}%)"
        if r.get("failed"):
            rows.append([name, "failed"] + ["n/a"] * (len(COLUMNS) - 2))
        else:
            rows.append([name, f"{r['params'] / 1e6:.2f}M", num(r.get("val_loss"), ".4f"),
                         num(r.get("heldout_loss_wikitext2"), ".4f"), num(r.get("lambada_acc"), ".4f"),
                         num(r.get("lambada_ppl"), ".1f"), num(r.get("generation_toks_per_s"), ".0f"),
                         num(r.get("generation_toks_per_s_b8"), ".0f"),
                         str(r.get("kv_bytes_per_token_per_layer_bf16")), str(kv), red])
        runs.append((name, os.path.join(out, r["run_dir"], "log.jsonl")))  # run_dir is relative to OUT
        note = f"- {name}: `{' '.join(r['flags']) or '(defaults)'}`; run {fmt_time(r['wall_s'])}"
        if r.get("phase1_wall_s") is not None:
            p1 = r.get("phase1") or {}
            note += (f", of which phase 1 {fmt_time(r['phase1_wall_s'])} "
                     f"(converged {p1.get('converged', 'n/a')}, OACD loss {p1.get('oacd_loss', 'n/a')})")
        notes.append(note)
    lines = header(st, first("heldout_tokens"), first("lambada_examples"))
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Flags (on top of the shared ones above) and wall time, phase 1 included; phase 1 "
              "trains the ContextBlock alone and is not in the step budget:"] + notes
    md = os.path.join(out, "kv_table.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    print("\n".join(lines))
    print(f"\nwrote {md}")
    from plot_losses import plot
    runs = [(n, p) for n, p in runs if os.path.isfile(p)]
    if runs:
        plot(runs, os.path.join(out, "kv_losses.png"),
             title=f"{st['model']} shape, B {st['B']} x T {st['T']}, {st['steps']} steps of {st['data']}")


# --compare: how far a rerun may land from the published numbers. On the machine that made them,
# reruns with 1 or 2 threads gave the same losses to the last digit (OpenMP splits independent
# rows, not sums); another CPU or compiler (FMA, vector width) changes roundings, which 600 steps
# amplify by an amount not measured here. A broken run (a sign error, a wrong schedule, other
# data) moves the losses by tenths; 0.05 is also about twice the spread between the full-width
# variants, so a rerun that passes can still order them differently.
COMPARE_EXACT = ["params", "tokens_seen", "kv_bytes_per_token_per_layer_bf16", "kv_bytes_per_token_bf16"]
COMPARE_ABS = {"val_loss": 0.05, "heldout_loss_wikitext2": 0.05, "lambada_acc": 0.01}
COMPARE_REL = {"lambada_ppl": 0.10}
COMPARE_SPEED = ["generation_toks_per_s", "generation_toks_per_s_b8"]  # machine-dependent: shown, not checked


def compare(out, ref, names):
    """Compare OUT/<variant>.json with REF/<variant>.json; print a line per number; return mismatches."""
    bad, seen = 0, 0
    for name in names:
        paths = [os.path.join(d, f"{name}.json") for d in (out, ref)]
        if not all(os.path.isfile(p) for p in paths):
            continue
        seen += 1
        new, old = (json.load(open(p)) for p in paths)
        for key in COMPARE_EXACT + list(COMPARE_ABS) + list(COMPARE_REL) + COMPARE_SPEED:
            a, b = new.get(key), old.get(key)
            if key in COMPARE_SPEED:
                ok, why = True, f"ratio {a / b:.2f} (speed: not checked)" if a and b else "n/a"
            elif a is None or b is None:
                ok, why = a is None and b is None, "missing"
            elif key in COMPARE_EXACT:
                ok, why = a == b, "must be equal"
            elif key in COMPARE_ABS:
                ok, why = abs(a - b) <= COMPARE_ABS[key], f"|diff| {abs(a - b):.4f} (tol {COMPARE_ABS[key]})"
            else:
                d = abs(a - b) / max(abs(b), 1e-12)
                ok, why = d <= COMPARE_REL[key], f"rel diff {d:.3f} (tol {COMPARE_REL[key]})"
            bad += not ok
            print(f"{'ok  ' if ok else 'DIFF'} {name:10s} {key:34s} {a!s:>12} vs {b!s:>12}  {why}")
    if seen == 0:
        sys.exit(f"error: no variant has a .json in both {out} and {ref}")
    print(f"compare: {seen} variant(s) against {ref}: {bad} number(s) outside tolerance")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="smoke test: a few steps, small eval caps (< 5 min)")
    ap.add_argument("--out", default="results", help="output folder (default results)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list (default {','.join(VARIANTS)})")
    ap.add_argument("--steps", type=int, help="optimizer steps per variant (default: the scale's)")
    ap.add_argument("--binary", help="trainer binary (default ./train_ctxkv, ./train_ctxkv_cu for gpu)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: 1 with "
                    "--quick, which keeps it fast on a busy machine; else $OMP_NUM_THREADS or 2)")
    ap.add_argument("--no-estimate", action="store_true", help="skip the --bench time estimate")
    ap.add_argument("--dry-run", action="store_true", help="print the estimate and the commands, run nothing")
    ap.add_argument("--table-only", action="store_true", help="rebuild table and PNG from OUT/<variant>.json")
    ap.add_argument("--compare", metavar="REF_DIR", help="after the table, compare OUT/<variant>.json with "
                    "REF_DIR's (e.g. doc/results/cpu, the README's run); exit 1 on a number out of tolerance")
    args = ap.parse_args()
    scale = "quick" if args.quick else args.scale
    cfg = dict(SCALES[scale])
    if args.binary:
        cfg["binary"] = args.binary
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {','.join(bad)}; choose from {','.join(VARIANTS)}")
    steps = args.steps or cfg["steps"]
    if steps < 1:
        ap.error("--steps must be >= 1")
    out = os.path.abspath(args.out)
    if args.compare and not os.path.isdir(args.compare):
        ap.error(f"--compare {args.compare}: no such folder")
    if args.threads is None:
        args.threads = 1 if args.quick else int(os.environ.get("OMP_NUM_THREADS") or 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.table_only:
        names = names if args.variants != ",".join(VARIANTS) else \
            [v for v in VARIANTS if os.path.isfile(os.path.join(out, f"{v}.json"))]
        write_table(out, names)
        if args.compare and compare(out, args.compare, names):
            sys.exit(1)
        return
    if not os.access(os.path.join(REPO, cfg["binary"]), os.X_OK) and not os.access(cfg["binary"], os.X_OK):
        sys.exit(f"error: trainer {cfg['binary']} not found (make train_ctxkv; or --binary PATH)")
    help_text = subprocess.run([cfg["binary"], "-h"], cwd=REPO, capture_output=True, text=True).stdout
    if "--eval-heldout" not in help_text:
        sys.exit(f"error: {cfg['binary']} has no --eval-heldout: rebuild it (make train_ctxkv)")

    t_start = time.time()
    with_eval = prepare_data(cfg, "optional" if args.quick else "required")
    base_kv = kv_report(cfg["binary"], cfg["model"], [])["kv_bytes_per_token_bf16"]
    est = {}
    if not args.no_estimate:
        print(f"measuring ms/step of each variant (--bench {cfg['bench']}) for a time estimate ...", flush=True)
        est = estimate(cfg, names, steps, with_eval, env)
        print(f"estimate: {fmt_time(sum(est.values()))} for {len(names)} variants (" +
              ", ".join(f"{n} {fmt_time(s)}" for n, s in est.items()) + ")", flush=True)
    if args.dry_run:
        for name in names:
            for cmd in train_cmd(cfg, name, os.path.join(out, "runs", name), steps, with_eval):
                if cmd:
                    print(shlex.join(cmd))
        return
    settings = {"scale": scale, "model": cfg["model"], "B": cfg["B"], "T": cfg["T"], "steps": steps,
                "lr": cfg["lr"], "warmup": max(1, steps // 10), "data": cfg["data"], "threads": args.threads,
                "binary": cfg["binary"], "val_batches": cfg["val_batches"], "heldout_cap": cfg["heldout"],
                "lambada_cap": cfg["lambada"], "gen_prompt": cfg["gen"][0], "gen_new": cfg["gen"][1]}
    os.makedirs(out, exist_ok=True)
    failed, done_s, done_est = [], 0.0, 0.0
    for i, name in enumerate(names, 1):
        prefix = f"[{i}/{len(names)} {name}]"
        run_dir = os.path.join(out, "runs", name)
        p1_cmd, cmd = train_cmd(cfg, name, run_dir, steps, with_eval)
        print(f"\n=== variant {i}/{len(names)} {name}: {' '.join(variant_flags(name, cfg['model'])) or 'mha'}", flush=True)
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
                with open(p1_metrics) as f:
                    p1 = json.load(f)
        if rc == 0:
            print(f"{prefix} {shlex.join(cmd)}", flush=True)
            rc, tail = stream(cmd, env, prefix, steps)
        wall = time.time() - t0
        result = {"variant": name, "scale": scale, "flags": variant_flags(name, cfg["model"]),
                  "command": cmd, "wall_s": round(wall, 1), "run_dir": os.path.relpath(run_dir, out),
                  "phase1_wall_s": None if p1_s is None else round(p1_s, 1), "phase1": p1,
                  "kv_mha_bytes_per_token_bf16": base_kv, "settings": settings}
        if rc != 0 or not os.path.isfile(metrics):
            print(f"{prefix} FAILED (exit {rc}); last lines:\n  " + "\n  ".join(tail), flush=True)
            failed.append(name)
            result["failed"] = True
        else:
            with open(metrics) as f:
                result = {**json.load(f), **result}
            for d in (run_dir, os.path.join(run_dir, "phase1")):  # AdamW state, 3x the model: not needed
                if os.path.exists(os.path.join(d, "train_state.bin")):
                    os.remove(os.path.join(d, "train_state.bin"))
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        done_s += wall
        msg = f"{prefix} done in {fmt_time(wall)}"
        if est:
            done_est += est[name]
            left = sum(est[n] for n in names[i:]) * done_s / done_est
            msg += f" (estimated {fmt_time(est[name])}); elapsed {fmt_time(time.time() - t_start)}, " \
                   f"about {fmt_time(left)} left"
        print(msg, flush=True)
    print()
    write_table(out, names)
    print(f"total {fmt_time(time.time() - t_start)}")
    if failed:
        sys.exit(f"error: variant(s) failed: {', '.join(failed)}")
    if args.compare and compare(out, args.compare, names):
        sys.exit(1)


if __name__ == "__main__":
    main()
