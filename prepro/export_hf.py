"""Convert our mha model.bin to a Hugging Face GPT-NeoX (Pythia) folder: the inverse of import_hf.py.

    python prepro/export_hf.py MODEL.bin OUT_DIR

OUT_DIR receives config.json and model.safetensors (float32), loadable with
GPTNeoXForCausalLM.from_pretrained(OUT_DIR). The vocabulary padding rows of embed_in and
embed_out are dropped (they must be zero, as training leaves them); import_hf.py of the folder
gives back MODEL.bin byte for byte. Only plain Pythia models have a GPT-NeoX equivalent: gqa,
mqa, mla, a ctxkv layer 0 and ctxpythia are refused. Needs numpy only.
"""
import json
import os
import sys

import numpy as np

from ckpt import ATTN_NAMES, read_checkpoint
from common import PreproError, atomic_write, run_cli
from import_hf import LAYER_NAMES


def shortest(x):
    """The shortest decimal that reads back as the header's float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def hf_config(cfg):
    """Our checkpoint cfg -> config.json of a GPTNeoXForCausalLM (the keys import_hf.read_config reads)."""
    D = cfg["n_embd"] // cfg["n_head"]
    rotary_pct = cfg["rotary_dims"] / D
    if int(D * rotary_pct) != cfg["rotary_dims"]:  # HF takes int(head_size * rotary_pct)
        rotary_pct = np.nextafter(rotary_pct, 1.0)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["n_embd"],
        "num_hidden_layers": cfg["n_layer"],
        "num_attention_heads": cfg["n_head"],
        "intermediate_size": cfg["n_inner"],
        "hidden_act": "gelu",
        "rotary_pct": float(rotary_pct),
        "rotary_emb_base": shortest(cfg["rope_base"]),
        "max_position_embeddings": cfg["max_seq_len"],
        "layer_norm_eps": shortest(cfg["layer_norm_eps"]),
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    }


def hf_tensors(cfg, tensors):
    """Our tensors -> HF state dict names (padding rows dropped), in checkpoint order."""
    V = cfg["vocab_size"]
    out = {}
    for name, a in tensors.items():
        if name in ("embed_in", "embed_out"):
            pad = a[V:]
            if pad.size and np.any(pad != 0):
                raise PreproError(f"{name} has nonzero padding rows {V}..{a.shape[0] - 1}: they would be lost "
                                  "(the checkpoint was not written by training from a zero-padded start)")
            a = a[:V]
        if name == "embed_out":
            hf = "embed_out.weight"
        elif name == "embed_in":
            hf = "gpt_neox.embed_in.weight"
        elif name == "lnf_w":
            hf = "gpt_neox.final_layer_norm.weight"
        elif name == "lnf_b":
            hf = "gpt_neox.final_layer_norm.bias"
        else:  # layers.N.leaf
            _, l, leaf = name.split(".")
            hf = f"gpt_neox.layers.{l}.{LAYER_NAMES[leaf]}"
        out[hf] = np.ascontiguousarray(a, dtype="<f4")
    return out


def safetensors_bytes(tensors, metadata):
    """The safetensors layout: 8-byte little-endian header length, the JSON header
    {name: {dtype, shape, data_offsets}}, padded with spaces to a multiple of 8, then the data."""
    header, chunks, off = {"__metadata__": metadata}, [], 0
    for name, a in tensors.items():
        b = a.tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return [len(h).to_bytes(8, "little"), h] + chunks


def export(model_path, out_dir, verbose=True):
    cfg, tensors = read_checkpoint(model_path)
    why = []
    if cfg["attn_type"] != 0:
        why.append(f"attention {ATTN_NAMES[cfg['attn_type']]}")
    if cfg["layer0_type"] != 0:
        why.append("a ctxkv layer 0")
    if cfg["model_type"] != 0:
        why.append("the ctxpythia model type")
    if why:
        raise PreproError(f"{model_path} has {' and '.join(why)}: GPT-NeoX has no equivalent; only mha "
                          "checkpoints export to Hugging Face")
    hf = hf_tensors(cfg, tensors)
    os.makedirs(out_dir, exist_ok=True)
    config = json.dumps(hf_config(cfg), indent=2) + "\n"
    atomic_write(os.path.join(out_dir, "config.json"), [config.encode()])
    atomic_write(os.path.join(out_dir, "model.safetensors"), safetensors_bytes(hf, {"format": "pt"}))
    if verbose:
        n = sum(a.size for a in hf.values())
        print(f"{model_path}: {cfg['n_layer']} layers, width {cfg['n_embd']}, {cfg['n_head']} heads, "
              f"vocab {cfg['vocab_size']} (padding rows dropped)")
        print(f"wrote {out_dir}/config.json and model.safetensors: {n:,} parameters, "
              f"{os.path.getsize(os.path.join(out_dir, 'model.safetensors')):,} bytes")


def main():
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    export(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    run_cli(main)
