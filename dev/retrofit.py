"""Retrofit a trained mha model: convert it to each KV-efficient variant, fine-tune each for the
same token budget, and tabulate the loss right after conversion, after fine-tuning, and the
original's (doc/retrofit.md).

    python dev/retrofit.py                 # cpu scale: pretrain an mha base here, then 7 targets (~30 min)
    python dev/retrofit.py --base M.bin    # start from any mha checkpoint (e.g. prepro/import_hf.py of a Pythia)
    python dev/retrofit.py --quick         # smoke test on Tiny Shakespeare, ~2 min
    python dev/retrofit.py --table-only    # rebuild the table and figure from OUT/<target>.json
    python dev/retrofit.py --dry-run       # the commands only
Options: --out DIR (default results/retrofit), --targets mha,gqa,..., --ft-steps N, --threads N.
`make retrofit` runs the cpu scale with the prepro venv; the figure needs matplotlib.

Targets (flags on top of --init-from BASE; doc/retrofit.md has each conversion's equations):
  mha          the original, fine-tuned for the same tokens: the control
  gqa          K/V heads mean-pooled per group (Ainslie et al.), G = H/2 (H = 4) or H/4
  mqa          all K/V heads mean-pooled into one
  mla-full     MLA at kv_rank = C by the SVD of the stacked K/V projection (MHA2MLA); each head's
               rotary dims become its own RoPE group, linear latent: exact but for the q bias and
               the rotary k bias (MLA has none)
  mla-quarter  the same at kv_rank = C/4
  ctxkv-mha    layer 0 over ContextBlock contexts: phase 1 trains the block on the base's
               embeddings, then layer 0's K/V start fresh and everything but the block fine-tunes
  ctxkv-gqa    the same with gqa in layers 1..L-1
Each target: OUT/runs/<target>/{converted,ft}/ (metrics.json, log.jsonl; ft/model.bin), phase1/
for the ctx targets, and OUT/<target>.json. Runs with an OUT/<target>.json are reused, so an
interrupted run resumes where it stopped. Writes OUT/retrofit.md and OUT/retrofit.png (val loss
against fine-tuning tokens per target, the original's as a line).
"""
import argparse
import json
import os
import re
import shlex
import struct
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "dev"))
from kv_table import DATA, HELDOUT, SHAPES, fmt_time, num, prepare_data, run_quiet, stream  # noqa: E402

SCALES = {
    # base_*: the mha model pretrained here when --base is not given; ft_*: every target's fine-tuning
    "cpu": dict(model="pythia-14m", B=4, T=256, base_steps=600, base_lr=2e-3, ft_steps=150, ft_lr=3e-4,
                vals=6, val_batches=20, heldout=65536, data="gutenberg", p1=["-b", "8", "--p1-rounds", "6"]),
    "quick": dict(model="pythia-14m", B=2, T=64, base_steps=24, base_lr=2e-3, ft_steps=8, ft_lr=3e-4,
                  vals=2, val_batches=2, heldout=512, data="tinyshakespeare",
                  p1=["-b", "2", "--p1-rounds", "1", "--p1-iters", "5"]),
}
FT_SEED = 4242
TARGETS = ["mha", "gqa", "mqa", "mla-full", "mla-quarter", "ctxkv-mha", "ctxkv-gqa"]


def base_shape(path):
    """(L, H, C) from a checkpoint's header (doc/formats.md: int32 4, 5, 6)."""
    with open(os.path.join(REPO, path), "rb") as f:
        h = struct.unpack("<8i", f.read(32))
    if h[0] != 20261124:
        sys.exit(f"error: --base {path} is not a ctxkv checkpoint (magic {h[0]})")
    return h[4], h[5], h[6]


def target_flags(name, shape):
    _, H, C = shape
    gqa = ["--attn", "gqa", "--n-kv-head", str(H // 2 if H == 4 else H // 4)]
    ctx = ["--layer0", "ctxkv", "--context-dim", str(C // 2)]
    return {"mha": [], "gqa": gqa, "mqa": ["--attn", "mqa"],
            "mla-full": ["--attn", "mla", "--kv-rank", str(C)],
            "mla-quarter": ["--attn", "mla", "--kv-rank", str(C // 4)],
            "ctxkv-mha": ctx, "ctxkv-gqa": gqa + ctx}[name]


def is_ctx(name):
    return name.startswith("ctxkv")


def common_flags(cfg, steps, lr, out, heldout, seed=1337):
    train, val = DATA[cfg["data"]]
    f = ["-b", str(cfg["B"]), "-t", str(cfg["T"]), "--steps", str(steps), "--lr", str(lr),
         "--warmup", str(max(1, steps // 10)), "--val-every", str(max(1, steps // cfg["vals"])),
         "--val-batches", str(cfg["val_batches"]), "--sample-every", "0", "--seed", str(seed), "--shuffle",
         "--train", train, "--val", val, "--out", out]
    if heldout:
        f += ["--eval-heldout", HELDOUT, "--heldout-max-tokens", str(cfg["heldout"])]
    return f


def run(cmd, env, prefix, steps, dry):
    print(f"{prefix} $ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    if dry:
        return
    t0 = time.time()
    rc, tail = stream(cmd, env, prefix, max(1, steps))
    if rc != 0:
        sys.exit(f"error: {prefix} failed (exit {rc}):\n" + "\n".join(tail[-15:]))
    return time.time() - t0


def metrics(run_dir):
    with open(os.path.join(REPO, run_dir, "metrics.json")) as f:
        return json.load(f)


def val_curve(run_dir):
    """[(tokens seen, val loss)] of a run's log.jsonl."""
    pts = []
    with open(os.path.join(REPO, run_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("type") == "val":
                pts.append((r["tokens_seen"], r["val_loss"]))
    return pts


def pretrain_base(cfg, out, env, heldout, dry):
    base_dir = os.path.join(out, "base")
    if os.path.isfile(os.path.join(REPO, base_dir, "model.bin")) and \
            os.path.isfile(os.path.join(REPO, base_dir, "metrics.json")):
        print(f"[base] reusing {base_dir}/model.bin", flush=True)
        return os.path.join(base_dir, "model.bin"), 0.0
    cmd = ["./train_ctxkv", "--model", cfg["model"]] + common_flags(cfg, cfg["base_steps"], cfg["base_lr"], base_dir,
                                                                    heldout)
    return os.path.join(base_dir, "model.bin"), run(cmd, env, "[base]", cfg["base_steps"], dry)


def retrofit(name, base, cfg, out, env, heldout, ft_steps, dry):
    """Convert, evaluate the conversion, fine-tune; writes OUT/<name>.json."""
    rd = os.path.join(out, "runs", name)
    flags = ["--init-from", base] + target_flags(name, cfg["shape"])
    t0, p1_s = time.time(), None
    train, val = DATA[cfg["data"]]
    if is_ctx(name):  # phase 1: the ContextBlock alone, on the base's embeddings
        p1 = ["./train_ctxkv"] + flags + cfg["p1"] + ["-t", str(cfg["T"]), "--seed", "1337", "--shuffle",
                                                       "--train", train, "--val", val, "--phase", "1",
                                                       "--out", os.path.join(rd, "phase1")]
        p1_s = run(p1, env, f"[{name} phase 1]", 1, dry)
        flags += ["--context-block", os.path.join(rd, "phase1", "context_block.bin")]
    conv = ["./train_ctxkv"] + flags + common_flags(cfg, 0, cfg["ft_lr"], os.path.join(rd, "converted"), heldout)
    run(conv, env, f"[{name} converted]", 1, dry)
    # another seed than the base's 1337: the fine-tuning batches are other blocks than the base's first ones
    ft = ["./train_ctxkv"] + flags + common_flags(cfg, ft_steps, cfg["ft_lr"], os.path.join(rd, "ft"), heldout, FT_SEED)
    run(ft, env, f"[{name} fine-tune]", ft_steps, dry)
    if dry:
        return
    kv = json.loads(run_quiet(["./train_ctxkv", "--init-from", base] + target_flags(name, cfg["shape"]) +
                              ["--kv-report"]).strip().splitlines()[-1])
    c, f = metrics(os.path.join(rd, "converted")), metrics(os.path.join(rd, "ft"))
    res = dict(target=name, flags=target_flags(name, cfg["shape"]), base=base, ft_steps=ft_steps,
               ft_tokens=f["tokens_seen"], params=f["params"],
               kv_bytes_per_token_bf16=kv["kv_bytes_per_token_bf16"],
               kv_bytes_per_token_per_layer_bf16=kv["kv_bytes_per_token_per_layer_bf16"],
               converted_val_loss=c["val_loss"], converted_heldout=c["heldout_loss_wikitext2"],
               ft_val_loss=f["val_loss"], ft_heldout=f["heldout_loss_wikitext2"],
               curve=val_curve(os.path.join(rd, "ft")), wall_s=time.time() - t0, phase1_wall_s=p1_s)
    path = os.path.join(REPO, out, f"{name}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(res, fh, indent=1)
    os.replace(path + ".tmp", path)


def write_table(out, names, settings):
    res = []
    for n in names:
        p = os.path.join(REPO, out, f"{n}.json")
        if os.path.isfile(p):
            with open(p) as f:
                res.append(json.load(f))
    if not res:
        sys.exit(f"error: no <target>.json in {out}")
    with open(os.path.join(REPO, out, "original.json")) as f:
        orig = json.load(f)
    mha_kv = orig["kv_bytes_per_token_bf16"]
    s = settings
    L, H, C = s["shape"]
    lines = [f"# Retrofit: an mha model converted to each variant, then fine-tuned ({s['scale']} scale)", "",
             f"- base: `{s['base']}` ({L} layers, width {C}, {H} heads)"
             + (f", pretrained here for {s['base_steps']} steps of B {s['B']} x T {s['T']} on {s['data']}, "
                f"lr {s['base_lr']:g}" if s.get("base_pretrained") else ""),
             f"- fine-tuning: {res[0]['ft_steps']} steps = {res[0]['ft_tokens']:,} tokens per target of {s['data']} "
             f"(--shuffle, seed {FT_SEED}: other blocks than the base's first), lr {s['ft_lr']:g} (warmup "
             f"{max(1, res[0]['ft_steps'] // 10)}, cosine to 0.1x), fresh AdamW; the ctx targets' phase 1 is outside the budget",
             f"- val loss: {s['val_batches']} batches of {s['data']} val; held-out: WikiText-2 test, "
             f"{s['heldout']:,} tokens (window {s['T']}, stride {s['T'] // 2}); KV: bf16 bytes per token, all layers "
             f"(--kv-report)",
             f"- run {s.get('date', 'n/a')} on {s['threads']} threads: targets {fmt_time(s['wall_s'] - s['base_wall_s'])}"
             + (f", base {fmt_time(s['base_wall_s'])}" if s.get("base_wall_s") else ""), "",
             "| target | KV bytes/token | KV vs mha | val loss: original | converted | fine-tuned | "
             "held-out: original | converted | fine-tuned |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        kv = r["kv_bytes_per_token_bf16"]
        lines.append(f"| {r['target']} | {kv} | {kv / mha_kv:.2f}x | {num(orig['val_loss'], '.4f')} | "
                     f"{num(r['converted_val_loss'], '.4f')} | {num(r['ft_val_loss'], '.4f')} | "
                     f"{num(orig['heldout_loss_wikitext2'], '.4f')} | {num(r['converted_heldout'], '.4f')} | "
                     f"{num(r['ft_heldout'], '.4f')} |")
    lines += ["", "Flags on top of `--init-from BASE` and wall time (phase 1 included):"]
    for r in res:
        p1 = f", of which phase 1 {fmt_time(r['phase1_wall_s'])}" if r.get("phase1_wall_s") else ""
        lines.append(f"- {r['target']}: `{' '.join(r['flags']) or '(none: the control)'}`; {fmt_time(r['wall_s'])}{p1}")
    md = os.path.join(REPO, out, "retrofit.md")
    with open(md + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    print("\n".join(lines))
    print(f"\nwrote {os.path.join(out, 'retrofit.md')}")
    plot(res, orig, os.path.join(REPO, out, "retrofit.png"), s)


def plot(res, orig, png, s):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no matplotlib, no figure (make retrofit installs it in .venv)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in res:
        xs, ys = zip(*r["curve"])
        ax.plot([x / 1e3 for x in xs], ys, marker="o", ms=3,
                label=f"{r['target']} ({r['kv_bytes_per_token_bf16']} B/token)")
    ax.axhline(orig["val_loss"], color="black", ls="--", lw=1, label="original (before fine-tuning)")
    ax.set_xlabel("fine-tuning tokens (thousands); 0 = right after conversion")
    ax.set_ylabel("val loss")
    L, H, C = s["shape"]
    ax.set_title(f"Retrofit of an mha model ({L} layers, width {C}; fine-tuned on {s['data']})")
    ys = [y for r in res for _, y in r["curve"]] + [orig["val_loss"]]
    pad = 0.08 * (max(ys) - min(ys) or 1.0)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {os.path.relpath(png, REPO)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--base", help="an mha checkpoint to start from [pretrained here]")
    ap.add_argument("--out", default="results/retrofit")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--ft-steps", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    scale = "quick" if args.quick else "cpu"
    cfg = dict(SCALES[scale])
    names = [t for t in args.targets.split(",") if t]
    bad = [t for t in names if t not in TARGETS]
    if bad:
        sys.exit(f"error: unknown targets {bad}; choose from {','.join(TARGETS)}")
    ft_steps = args.ft_steps or cfg["ft_steps"]
    out = args.out
    settings_path = os.path.join(REPO, out, "settings.json")
    if args.table_only:
        with open(settings_path) as f:
            write_table(out, names, json.load(f))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if not os.path.exists(os.path.join(REPO, "train_ctxkv")):
        sys.exit("error: ./train_ctxkv not built (make train_ctxkv)")
    heldout = prepare_data(cfg, "required" if scale == "cpu" else True)
    os.makedirs(os.path.join(REPO, out), exist_ok=True)
    t_start = time.time()
    cfg["shape"] = list(base_shape(args.base) if args.base else SHAPES[cfg["model"]])
    if args.base:
        base, base_s = args.base, 0.0
        hd = run_quiet(["./train_ctxkv", "--model", base, "--kv-report"])
        if json.loads(hd.strip().splitlines()[-1])["attn"] != "mha":
            sys.exit(f"error: --base {base} is not an mha checkpoint")
    else:
        base, base_s = pretrain_base(cfg, out, env, heldout, args.dry_run)
    orig_dir = os.path.join(out, "original")
    if not args.dry_run and not os.path.isfile(os.path.join(REPO, out, "original.json")):
        run(["./train_ctxkv", "--model", base] + common_flags(cfg, 0, cfg["ft_lr"], orig_dir, heldout), env,
            "[original]", 1, False)
        o = metrics(orig_dir)
        kv = json.loads(run_quiet(["./train_ctxkv", "--model", base, "--kv-report"]).strip().splitlines()[-1])
        o["kv_bytes_per_token_bf16"] = kv["kv_bytes_per_token_bf16"]
        with open(os.path.join(REPO, out, "original.json"), "w") as f:
            json.dump(o, f, indent=1)
    todo = [n for n in names if args.dry_run or not os.path.isfile(os.path.join(REPO, out, f"{n}.json"))]
    for n in names:
        if n not in todo:
            print(f"[{n}] reusing {out}/{n}.json", flush=True)
    t_targets = time.time()
    for i, name in enumerate(todo):
        eta = "" if i == 0 else f", ETA {fmt_time((time.time() - t_targets) / i * (len(todo) - i))}"
        print(f"== target {i + 1}/{len(todo)}: {name} (elapsed {fmt_time(time.time() - t_start)}{eta})", flush=True)
        retrofit(name, base, cfg, out, env, heldout, ft_steps, args.dry_run)
    if args.dry_run:
        return
    settings = dict(cfg, scale=scale, base=base, base_pretrained=not args.base, ft_steps=ft_steps,
                    threads=args.threads, base_wall_s=base_s or 0.0, wall_s=time.time() - t_start,
                    date=time.strftime("%Y-%m-%d"))
    with open(settings_path, "w") as f:
        json.dump(settings, f, indent=1)
    write_table(out, names, settings)
    print(f"total {fmt_time(time.time() - t_start)}")


if __name__ == "__main__":
    main()
