"""Our model checkpoint (model.bin, doc/formats.md): a 256-int32 header, then float32 tensors.

    python prepro/ckpt.py MODEL.bin      # print the header and tensor list, check the size
"""
import os
import sys

import numpy as np

from common import HEADER_BYTES, HEADER_INTS, PreproError, atomic_write, run_cli

CKPT_MAGIC, CKPT_VERSION = 20261124, 1

# (header index, field name, kind) in header order; kind "f" = stored as float32 bits
HEADER_FIELDS = [
    (2, "vocab_size", "i"),
    (3, "padded_vocab_size", "i"),
    (4, "n_layer", "i"),
    (5, "n_head", "i"),
    (6, "n_embd", "i"),
    (7, "n_inner", "i"),
    (8, "rotary_dims", "i"),
    (9, "rope_base", "f"),
    (10, "max_seq_len", "i"),
    (11, "layer_norm_eps", "f"),
    (12, "attn_type", "i"),
    (13, "n_kv_head", "i"),
    (14, "kv_rank", "i"),
    (15, "q_rank", "i"),
    (16, "mla_rope_dim", "i"),
    (17, "layer0_type", "i"),
    (18, "model_type", "i"),
    (19, "context_dim", "i"),
    (20, "context_interval", "i"),
    (21, "max_contexts", "i"),
]
ATTN_TYPES = {"mha": 0, "gqa": 1, "mqa": 2, "mla": 3}
# fields that may be left out of cfg; they default to 0 (n_kv_head defaults to n_head)
OPTIONAL_FIELDS = {"attn_type", "n_kv_head", "kv_rank", "q_rank", "mla_rope_dim", "layer0_type",
                   "model_type", "context_dim", "context_interval", "max_contexts"}


def padded_vocab(v, multiple=128):
    return (v + multiple - 1) // multiple * multiple


def _attn_type(cfg):
    a = cfg.get("attn_type", 0)
    return ATTN_TYPES.get(a, a) if isinstance(a, str) else int(a)


def param_specs(cfg):
    """Ordered (name, shape) of every tensor in the file (attn_type mha only, as in the doc)."""
    if _attn_type(cfg) != 0:
        raise PreproError(f"attn_type {cfg.get('attn_type')}: only mha (0) checkpoints are "
                          f"handled by prepro/ckpt.py so far")
    Vp, L, d, ff = (cfg[k] for k in ("padded_vocab_size", "n_layer", "n_embd", "n_inner"))
    specs = [("embed_in", (Vp, d))]
    for l in range(L):
        p = f"layers.{l}."
        specs += [(p + "ln1_w", (d,)), (p + "ln1_b", (d,)),
                  (p + "ln2_w", (d,)), (p + "ln2_b", (d,)),
                  (p + "qkv_w", (3 * d, d)), (p + "qkv_b", (3 * d,)),
                  (p + "dense_w", (d, d)), (p + "dense_b", (d,)),
                  (p + "fc_w", (ff, d)), (p + "fc_b", (ff,)),
                  (p + "proj_w", (d, ff)), (p + "proj_b", (d,))]
    specs += [("lnf_w", (d,)), ("lnf_b", (d,)), ("embed_out", (Vp, d))]
    return specs


def num_params(cfg):
    return sum(int(np.prod(s)) for _, s in param_specs(cfg))


def check_cfg(cfg):
    """Fill the optional fields and check the shape-defining ones; returns a new dict."""
    cfg = dict(cfg)
    missing = [n for _, n, _ in HEADER_FIELDS if n not in cfg and n not in OPTIONAL_FIELDS]
    if missing:
        raise PreproError(f"checkpoint config lacks {', '.join(missing)}")
    for n in OPTIONAL_FIELDS:
        cfg.setdefault(n, 0)
    cfg["attn_type"] = _attn_type(cfg)
    if not cfg["n_kv_head"]:
        cfg["n_kv_head"] = cfg["n_head"]
    if cfg["n_embd"] % cfg["n_head"]:
        raise PreproError(f"n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
    if cfg["rotary_dims"] % 2 or cfg["rotary_dims"] > cfg["n_embd"] // cfg["n_head"]:
        raise PreproError(f"rotary_dims {cfg['rotary_dims']} must be even and at most the head size")
    if not 0 < cfg["vocab_size"] <= cfg["padded_vocab_size"]:
        raise PreproError(f"vocab_size {cfg['vocab_size']} must be in 1..padded_vocab_size "
                          f"{cfg['padded_vocab_size']}")
    return cfg


def make_ckpt_header(cfg):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = CKPT_MAGIC, CKPT_VERSION
    for i, name, kind in HEADER_FIELDS:
        h[i] = np.float32(cfg[name]).view(np.int32) if kind == "f" else int(cfg[name])
    return h


def write_checkpoint(path, cfg, tensors):
    """Write cfg (dict of header fields) and tensors (dict name -> array, names as in
    param_specs) to path, atomically (path + '.tmp', then rename)."""
    cfg = check_cfg(cfg)
    specs = param_specs(cfg)
    extra = set(tensors) - {n for n, _ in specs}
    if extra:
        raise PreproError(f"{path}: unexpected tensors {sorted(extra)[:5]}")
    arrays = []
    for name, shape in specs:
        if name not in tensors:
            raise PreproError(f"{path}: tensor {name} {list(shape)} missing")
        a = np.asarray(tensors[name])
        if a.shape != shape:
            raise PreproError(f"{path}: tensor {name} has shape {list(a.shape)}, expected {list(shape)}")
        arrays.append(np.ascontiguousarray(a, dtype="<f4"))
    atomic_write(path, [make_ckpt_header(cfg).tobytes()] + [a.tobytes() for a in arrays])
    return cfg


def read_checkpoint(path):
    """Read and validate a checkpoint; returns (cfg, dict name -> float32 array)."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise PreproError(f"{path}: {size} bytes, too short for a checkpoint header")
    h = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if h[0] != CKPT_MAGIC:
        raise PreproError(f"{path}: bad magic {h[0]} (expected {CKPT_MAGIC}); not a checkpoint")
    if h[1] != CKPT_VERSION:
        raise PreproError(f"{path}: checkpoint version {h[1]}, expected {CKPT_VERSION}")
    cfg = {name: float(h[i:i + 1].view(np.float32)[0]) if kind == "f" else int(h[i])
           for i, name, kind in HEADER_FIELDS}
    cfg = check_cfg(cfg)
    specs = param_specs(cfg)
    n = sum(int(np.prod(s)) for _, s in specs)
    if size != HEADER_BYTES + 4 * n:
        raise PreproError(f"{path}: header implies {n:,} parameters = {HEADER_BYTES + 4 * n:,} bytes, "
                          f"file has {size:,} bytes")
    flat = np.fromfile(path, dtype="<f4", count=n, offset=HEADER_BYTES)
    tensors, off = {}, 0
    for name, shape in specs:
        k = int(np.prod(shape))
        tensors[name] = flat[off:off + k].reshape(shape)
        off += k
    return cfg, tensors


def main():
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    cfg, tensors = read_checkpoint(sys.argv[1])
    for _, name, _ in HEADER_FIELDS:
        print(f"{name:18s} {cfg[name]}")
    for name, a in tensors.items():
        print(f"{name:22s} {str(list(a.shape)):14s} mean {a.mean():+.4e} std {a.std():.4e}")
    print(f"{sum(a.size for a in tensors.values()):,} parameters")


if __name__ == "__main__":
    run_cli(main)
