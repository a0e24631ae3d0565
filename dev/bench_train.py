#!/usr/bin/env python3
"""
Time one training step (forward + backward + grad clip + AdamW update) of ctxkv's C trainer
and of Hugging Face GPTNeoXForCausalLM (float32 PyTorch) at the same shape, thread count
and batch, in one invocation, and print tokens/s for both and the ratio C / PyTorch.

    devvenv/bin/python dev/bench_train.py                 # pythia-14m, B=4, T=256, 2 threads
    devvenv/bin/python dev/bench_train.py --steps 20 --warmup 3 --binary ./train_ctxkv
    devvenv/bin/python dev/bench_train.py --model pythia-70m   # the 70m shape, same B, T

The C side is run as
    OMP_NUM_THREADS=<threads> <binary> --model pythia-14m -b B -t T --bench <steps>
and must print, as its last stdout line, a JSON object
    {"bench_steps": N, "ms_per_step": X, "tokens_per_s": Y}
If the binary is missing or fails, that is reported and the PyTorch side still runs.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# pythia-14m (EleutherAI/pythia-14m config.json)
PYTHIA_14M = dict(vocab_size=50304, hidden_size=128, num_attention_heads=4, num_hidden_layers=6,
                  intermediate_size=512, rotary_pct=0.25, rotary_emb_base=10000,
                  max_position_embeddings=2048, use_parallel_residual=True, hidden_act="gelu",
                  tie_word_embeddings=False, layer_norm_eps=1e-5, attention_dropout=0.0,
                  hidden_dropout=0.0)
# pythia-70m (EleutherAI/pythia-70m config.json): the same but wider
PYTHIA_70M = dict(PYTHIA_14M, hidden_size=512, num_attention_heads=8, intermediate_size=2048)
SHAPES = {"pythia-14m": PYTHIA_14M, "pythia-70m": PYTHIA_70M}


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def bench_c(args):
    """Run the C binary; returns its JSON dict or None (with the reason printed)."""
    binary = Path(args.binary)
    if not binary.is_absolute():
        binary = (Path.cwd() / binary) if (Path.cwd() / binary).exists() else REPO / binary
    if not binary.exists():
        print(f"[C] binary {args.binary} not found (build it with `make train_ctxkv`); skipping the C side")
        return None
    cmd = [str(binary), "--model", args.model, "-b", str(args.b), "-t", str(args.t),
           "--bench", str(args.steps)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print(f"[C] OMP_NUM_THREADS={args.threads} {' '.join(shlex.quote(c) for c in cmd)}")
    try:
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.c_timeout)
    except subprocess.TimeoutExpired:
        print(f"[C] timed out after {args.c_timeout}s")
        return None
    lines = [l for l in r.stdout.strip().splitlines() if l.strip()]
    if r.returncode != 0 or not lines:
        print(f"[C] exited with {r.returncode}")
        tail = (r.stdout + r.stderr).strip().splitlines()[-10:]
        for l in tail:
            print(f"[C]   {l}")
        return None
    try:
        res = json.loads(lines[-1])
        float(res["tokens_per_s"]), float(res["ms_per_step"])
    except (ValueError, KeyError, TypeError) as ex:
        print(f"[C] last stdout line is not the bench JSON ({ex}): {lines[-1]!r}")
        return None
    print(f"[C] {res}")
    return res


def bench_torch(args, attn):
    import torch
    import torch.nn.functional as F
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(**SHAPES[args.model], attn_implementation=attn)
    model = GPTNeoXForCausalLM(cfg).float().train()
    params = list(model.parameters())
    nparams = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() == 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, V, (args.b, args.t + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        return loss.item()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times) / len(times)
    tms = sorted(times)
    res = dict(attn=attn, bench_steps=args.steps, ms_per_step=ms,
               ms_median=1000 * tms[len(tms) // 2], tokens_per_s=args.b * args.t / (ms / 1000),
               params=nparams, last_loss=loss)
    print(f"[PyTorch/{attn}] {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()})}")
    return res


def main():
    ap = argparse.ArgumentParser(description="C vs PyTorch training-step benchmark (pythia-14m or pythia-70m shape)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="PyTorch warmup steps, not timed (default 2)")
    ap.add_argument("--binary", default="./train_ctxkv", help="C trainer (default ./train_ctxkv)")
    ap.add_argument("--model", default="pythia-14m", choices=sorted(SHAPES), help="the shape both sides train (default pythia-14m)")
    ap.add_argument("-b", type=int, default=4, help="batch size (default 4)")
    ap.add_argument("-t", type=int, default=256, help="sequence length (default 256)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS / torch threads (default 2)")
    ap.add_argument("--attn", default="both", choices=["eager", "sdpa", "both"],
                    help="HF attention implementation(s) to time (default both)")
    ap.add_argument("--clip", type=float, default=1.0, help="grad clip in the PyTorch step (0 = off)")
    ap.add_argument("--c-timeout", type=int, default=1800, help="seconds before the C run is abandoned")
    args = ap.parse_args()

    import torch
    import transformers
    print(f"CPU {cpu_name()} ({os.cpu_count()} logical), threads {args.threads}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    sh = SHAPES[args.model]
    print(f"shape: {args.model} (L={sh['num_hidden_layers']}, d={sh['hidden_size']}, H={sh['num_attention_heads']}, "
          f"MLP {sh['intermediate_size']}, V={sh['vocab_size']}, rotary_pct {sh['rotary_pct']}), B={args.b}, T={args.t}, "
          f"{args.steps} timed steps")

    c = bench_c(args)
    attns = ["eager", "sdpa"] if args.attn == "both" else [args.attn]
    pts = [bench_torch(args, a) for a in attns]

    print("\nsummary (tokens/s from the mean step time, higher is better; on a busy machine compare"
          " the medians too):")
    if c is not None:
        print(f"    C train_ctxkv      {float(c['tokens_per_s']):10.1f} tok/s  {float(c['ms_per_step']):9.1f} ms/step")
    else:
        print(f"    C train_ctxkv      (not run)")
    for p in pts:
        line = (f"    PyTorch {p['attn']:<10} {p['tokens_per_s']:10.1f} tok/s  {p['ms_per_step']:9.1f} ms/step"
                f" (median {p['ms_median']:.1f})")
        if c is not None:
            line += f"   C/PyTorch = {float(c['tokens_per_s']) / p['tokens_per_s']:.2f}x"
        print(line)
    out = dict(c=c, pytorch=pts, b=args.b, t=args.t, threads=args.threads)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
