#!/usr/bin/env python3
"""prepro/export_hf.py checked against Hugging Face itself (dev only: needs torch and transformers).

    devvenv/bin/python dev/check_export_hf.py [MODEL.bin]     # default dev/ref/tiny_model.bin

Exports MODEL.bin (an mha checkpoint: one trained here, or one imported) to a temporary HF folder,
loads it with GPTNeoXForCausalLM.from_pretrained, and has dev/reference.py's make_reference
write a reference state from that HF model in float64 on a random batch: logits, loss, every
gradient, and AdamW steps (it also checks that the HF model's parameters, in checkpoint order,
are exactly MODEL.bin's). Then `./test_ctxkv MODEL.bin STATE` compares our program against it:
logits to 1e-4, gradients to 1e-4 relative, the AdamW losses. Exits non-zero on any mismatch.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
sys.path.insert(0, str(REPO / "prepro"))
import reference as ref  # noqa: E402
from export_hf import export  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(REPO / "dev" / "ref" / "tiny_model.bin"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--test-binary", default=str(REPO / "test_ctxkv"))
    args = ap.parse_args()
    from transformers import GPTNeoXForCausalLM
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        export(args.model, str(td / "hf"))
        model = GPTNeoXForCausalLM.from_pretrained(td / "hf", dtype=torch.float32).eval()
        gen = torch.Generator().manual_seed(ref.SEED)
        T = min(args.seq, model.config.max_position_embeddings)
        inputs, targets = ref.make_batch(gen, args.batch, T, model.config.vocab_size)
        ref.register_fp64_attention()
        ref.set_attn(model, "eager_fp64")
        hyper = dict(ref.HYPER, grad_clip=0.0, steps=3, lr=1e-3)
        state = td / "state.bin"
        ref.make_reference("exported", model, ref.pythia_ckpt_entries, Path(args.model), inputs, targets,
                           hyper, state)
        r = subprocess.run([args.test_binary, args.model, str(state)], capture_output=True, text=True)
        print("\n".join(l for l in r.stdout.splitlines() if l.startswith(("PASS", "FAIL")) or " passed, " in l))
        print(r.stderr[-2000:], end="")
        if r.returncode != 0:
            sys.exit(f"{args.test_binary}: our program disagrees with Hugging Face on the exported model")
        print(f"exported {args.model}: Hugging Face's logits, gradients and AdamW losses equal ours")


if __name__ == "__main__":
    main()
