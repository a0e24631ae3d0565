#!/usr/bin/env python3
"""
KV-cached generation speed of ctxkv's C trainer against Hugging Face `generate` (float32 PyTorch)
at the same shape, batch, prompt and number of new tokens, in one invocation:

    devvenv/bin/python dev/bench_decode.py                    # pythia-14m, prompt 128, 256 new, 2 threads
    devvenv/bin/python dev/bench_decode.py --model pythia-70m --prompt 64 --new 128

Both sides sample at temperature 1 (HF: do_sample, top_k 0, every new token forced, no early
stop) from randomly initialised weights, and both count new tokens over the whole call,
prefill included. The C side is `train_ctxkv --steps 0 --eval-gen` (batch 1 and 8), best of
--reps runs; PyTorch is timed as the best of --reps `generate` calls per batch size. Prints
tokens/s of both, the ratios C / generate at batch 1 and 8, and C's batch 8 / batch 1.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench_c(args):
    cmd = [str(REPO / args.binary), "--model", args.model, "--steps", "0", "--val", "", "--tokenizer", "",
           "--eval-gen", "--gen-prompt", str(args.prompt), "--gen-new", str(args.new)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    best = {1: 0.0, 8: 0.0}
    for _ in range(args.reps):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        m = re.search(r"generation: ([0-9.]+) tok/s at batch 1, ([0-9.]+) tok/s at batch 8", r.stdout)
        if r.returncode != 0 or not m:
            sys.exit(f"[C] {' '.join(cmd)} failed:\n{r.stdout[-800:]}{r.stderr[-800:]}")
        best = {1: max(best[1], float(m.group(1))), 8: max(best[8], float(m.group(2)))}
    shown = " ".join([args.binary] + [c if c else "''" for c in cmd[1:]])
    print(f"[C] OMP_NUM_THREADS={args.threads} ./{shown}: best of {args.reps}: {best[1]:.1f} / {best[8]:.1f} tok/s")
    return best


def bench_hf(args):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**SHAPES[args.model])).float().eval()
    best = {}
    for B in (1, 8):
        ids = torch.randint(0, model.config.vocab_size, (B, args.prompt), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        kw = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new,
                  min_new_tokens=args.new, pad_token_id=0, use_cache=True)
        with torch.no_grad():
            model.generate(ids, **dict(kw, max_new_tokens=4, min_new_tokens=4))  # warm-up
            t = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                out = model.generate(ids, **kw)
                t.append(time.perf_counter() - t0)
        assert out.shape[1] == args.prompt + args.new, out.shape
        best[B] = B * args.new / min(t)
        print(f"[HF generate] batch {B}: best of {args.reps}: {best[B]:.1f} tok/s")
    return best


def main():
    ap = argparse.ArgumentParser(description="C vs Hugging Face generate: KV-cached decoding tokens/s")
    ap.add_argument("--model", default="pythia-14m", choices=sorted(SHAPES))
    ap.add_argument("--binary", default="train_ctxkv")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers
    print(f"CPU {cpu_name()} ({os.cpu_count()} logical), threads {args.threads}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {args.model}, prompt {args.prompt}, {args.new} new tokens")
    c, hf = bench_c(args), bench_hf(args)
    r1, r8, scale = c[1] / hf[1], c[8] / hf[8], c[8] / c[1]
    print(f"\nsummary: C/generate = {r1:.2f}x at batch 1, {r8:.2f}x at batch 8; C batch 8 / batch 1 = {scale:.2f}x")
    print(json.dumps({"bench": "decode", "model": args.model, "c_toks_per_s": c, "hf_toks_per_s": hf,
                      "c_over_hf_b1": round(r1, 3), "c_over_hf_b8": round(r8, 3), "c_b8_over_b1": round(scale, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
