"""Convert a Hugging Face transformers GPT-NeoX (Pythia) checkpoint folder to our model.bin.

    python prepro/import_hf.py HF_DIR OUT.bin

HF_DIR holds config.json and the weights: model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (read with torch, which is then needed).
Safetensors are read with numpy alone (F32, F16, BF16). All tensors become float32; the
embedding and head rows are zero-padded to a multiple of 128 (doc/formats.md).
"""
import json
import os
import sys

import numpy as np

from ckpt import num_params, padded_vocab, param_specs, write_checkpoint
from common import PreproError, run_cli

# HF buffers, not parameters; old checkpoints store them, we recompute them
SKIP_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")

# our per-layer name -> HF name inside gpt_neox.layers.N.
LAYER_NAMES = {
    "ln1_w": "input_layernorm.weight", "ln1_b": "input_layernorm.bias",
    "ln2_w": "post_attention_layernorm.weight", "ln2_b": "post_attention_layernorm.bias",
    "qkv_w": "attention.query_key_value.weight", "qkv_b": "attention.query_key_value.bias",
    "dense_w": "attention.dense.weight", "dense_b": "attention.dense.bias",
    "fc_w": "mlp.dense_h_to_4h.weight", "fc_b": "mlp.dense_h_to_4h.bias",
    "proj_w": "mlp.dense_4h_to_h.weight", "proj_b": "mlp.dense_4h_to_h.bias",
}


# ------------------------------------------------------------------ config

def read_config(hf_dir):
    """config.json -> our checkpoint cfg dict; refuses variants our model does not implement."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise PreproError(f"{path} not found (is {hf_dir} a Hugging Face model folder?)")
    with open(path, encoding="utf-8") as f:
        c = json.load(f)

    def bad(why):
        raise PreproError(f"{path}: {why}; ctxkv implements only the Pythia GPT-NeoX layout")

    if c.get("model_type") != "gpt_neox":
        bad(f"model_type is {c.get('model_type')!r}, not 'gpt_neox'")
    if not c.get("use_parallel_residual", True):
        bad("use_parallel_residual is false (sequential residual)")
    if c.get("tie_word_embeddings", False):
        bad("tie_word_embeddings is true (we need a separate embed_out)")
    if c.get("hidden_act", "gelu") != "gelu":
        bad(f"hidden_act is {c.get('hidden_act')!r}, not 'gelu' (exact erf GELU)")
    if not c.get("attention_bias", True):
        bad("attention_bias is false (we need the qkv and dense biases)")

    # RoPE settings moved over transformers versions: rotary_pct/rotary_emb_base (Pythia's
    # own config.json, 4.x), partial_rotary_factor/rope_theta (4.4x), and inside a
    # rope_parameters dict (5.x). Only plain (unscaled) RoPE is supported.
    rope = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling")
    if scaling or rope.get("rope_type", "default") != "default":
        bad(f"RoPE scaling {scaling or rope} is not supported")

    def first(*keys, default):
        for src in (rope, c):
            for k in keys:
                if src.get(k) is not None:
                    return src[k]
        return default

    rotary_pct = float(first("partial_rotary_factor", "rotary_pct", default=0.25))
    rope_base = float(first("rope_theta", "rotary_emb_base", default=10000.0))
    try:
        d, H = int(c["hidden_size"]), int(c["num_attention_heads"])
        L, ff, V = int(c["num_hidden_layers"]), int(c["intermediate_size"]), int(c["vocab_size"])
    except KeyError as e:
        raise PreproError(f"{path}: no {e.args[0]!r}")
    if d % H:
        bad(f"hidden_size {d} is not a multiple of num_attention_heads {H}")
    rotary_dims = int((d // H) * rotary_pct)
    if rotary_dims % 2:
        bad(f"rotary dims int({d // H} * {rotary_pct}) = {rotary_dims} is odd")
    return {
        "vocab_size": V, "padded_vocab_size": padded_vocab(V),
        "n_layer": L, "n_head": H, "n_embd": d, "n_inner": ff,
        "rotary_dims": rotary_dims, "rope_base": rope_base,
        "max_seq_len": int(c.get("max_position_embeddings", 2048)),
        "layer_norm_eps": float(c.get("layer_norm_eps", 1e-5)),
        "attn_type": 0, "n_kv_head": H,
    }


# ------------------------------------------------------------------ weights

SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors(path):
    """Pure-numpy safetensors reader: name -> float32 array (only float tensors are read).

    Layout: 8-byte little-endian header length n, n bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data;
    offsets count from the end of the header.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise PreproError(f"{path}: too short for a safetensors file")
        n = int.from_bytes(raw, "little")
        if n > size - 8:
            raise PreproError(f"{path}: header length {n} exceeds the file ({size} bytes); "
                              f"not a safetensors file or truncated")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise PreproError(f"{path}: bad safetensors JSON header: {e}")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if name.endswith(SKIP_SUFFIXES):
            continue  # buffers (bool/uint8 masks etc.): never needed
        if dt not in SAFETENSORS_DTYPES:
            raise PreproError(f"{path}: tensor {name} has dtype {dt}; supported: F32, F16, BF16")
        item = np.dtype(SAFETENSORS_DTYPES[dt]).itemsize
        count = int(np.prod(shape))
        if e - b != count * item or base + e > size:
            raise PreproError(f"{path}: tensor {name} {dt}{list(shape)} has bad offsets "
                              f"[{b}, {e}] (file truncated?)")
        a = np.fromfile(path, dtype=SAFETENSORS_DTYPES[dt], count=count, offset=base + b)
        if dt == "BF16":  # bfloat16 is the top half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.astype(np.float32).reshape(shape)
    return out


def read_torch_bin(path):
    """pytorch_model.bin (a pickled state dict) -> name -> float32 array. Needs torch."""
    try:
        import torch
    except ImportError:
        raise PreproError(f"{path}: reading pytorch_model.bin needs torch, which is not "
                          f"installed (pip install torch, or save the model as safetensors)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        sd = torch.load(path, map_location="cpu")
    return {k: v.float().numpy() for k, v in sd.items()
            if not k.endswith(SKIP_SUFFIXES) and v.is_floating_point()}


def read_weights(hf_dir):
    """Find and read the weight files of hf_dir; returns (name -> float32 array, files)."""
    for index, reader in (("model.safetensors.index.json", read_safetensors),
                          ("pytorch_model.bin.index.json", read_torch_bin)):
        p = os.path.join(hf_dir, index)
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            weights = {}
            for fn in files:
                weights.update(reader(os.path.join(hf_dir, fn)))
            return weights, files
    for fn, reader in (("model.safetensors", read_safetensors),
                       ("pytorch_model.bin", read_torch_bin)):
        p = os.path.join(hf_dir, fn)
        if os.path.isfile(p):
            return reader(p), [fn]
    raise PreproError(f"{hf_dir}: no model.safetensors, model.safetensors.index.json or "
                      f"pytorch_model.bin")


def map_tensors(weights, cfg, where):
    """HF state dict -> our tensor dict (names of ckpt.param_specs), padded to Vp rows."""
    w, file_name = {}, {}  # short name -> tensor / -> the name in the file (for errors)
    for k, v in weights.items():
        short = k[len("gpt_neox."):] if k.startswith("gpt_neox.") else k
        if short == "lm_head.weight":
            # transformers 5 calls the head lm_head in memory (save_pretrained writes
            # embed_out unless save_original_format=False)
            short = "embed_out.weight"
        w[short], file_name[short] = v, k
    prefix = "gpt_neox." if any(k.startswith("gpt_neox.") for k in weights) else ""
    hf_names = {"embed_in": "embed_in.weight", "lnf_w": "final_layer_norm.weight",
                "lnf_b": "final_layer_norm.bias", "embed_out": "embed_out.weight"}
    for l in range(cfg["n_layer"]):
        for ours, theirs in LAYER_NAMES.items():
            hf_names[f"layers.{l}.{ours}"] = f"layers.{l}.{theirs}"
    V, Vp = cfg["vocab_size"], cfg["padded_vocab_size"]

    unexpected = sorted(file_name[k] for k in set(w) - set(hf_names.values()))
    if unexpected:
        raise PreproError(f"{where}: unexpected tensors {unexpected[:6]}"
                          f"{' ...' if len(unexpected) > 6 else ''} (not a Pythia GPTNeoXForCausalLM?)")
    tensors = {}
    for name, shape in param_specs(cfg):
        hf = hf_names[name]
        if hf not in w:
            hint = " (a GPTNeoXModel without its LM head?)" if name == "embed_out" else ""
            full = hf if name == "embed_out" else prefix + hf
            raise PreproError(f"{where}: tensor {full} missing{hint}")
        a = w[hf]
        want = (V,) + shape[1:] if name in ("embed_in", "embed_out") else shape
        if a.shape != want:
            raise PreproError(f"{where}: tensor {file_name[hf]} has shape {list(a.shape)}, "
                              f"config.json implies {list(want)}")
        if a.shape != shape:  # pad the vocabulary rows with zeros
            a = np.concatenate([a, np.zeros((shape[0] - a.shape[0],) + shape[1:], np.float32)])
        tensors[name] = a
    return tensors


def convert(hf_dir, out_path, verbose=True):
    """Convert hf_dir to our checkpoint at out_path; returns the cfg dict written."""
    cfg = read_config(hf_dir)
    weights, files = read_weights(hf_dir)
    tensors = map_tensors(weights, cfg, f"{hf_dir} ({', '.join(files)})")
    cfg = write_checkpoint(out_path, cfg, tensors)
    if verbose:
        hf_params = sum(a.size for k, a in weights.items())
        print(f"{hf_dir}: {', '.join(files)}")
        print("  " + ", ".join(f"{k}={cfg[k]}" for k in (
            "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "n_inner",
            "rotary_dims", "rope_base", "max_seq_len", "layer_norm_eps")))
        print(f"  {hf_params:,} HF parameters -> {num_params(cfg):,} with vocab padding")
        print(f"wrote {out_path}: {os.path.getsize(out_path):,} bytes")
    return cfg


def main():
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    convert(sys.argv[1], sys.argv[2])


if __name__ == "__main__":
    run_cli(main)
