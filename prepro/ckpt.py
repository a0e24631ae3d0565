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
    (22, "rms_eps", "f"),
    (23, "embed_dim", "i"),
    (24, "mla_rope_split", "i"),
    (25, "mla_linear_latent", "i"),
]
ATTN_TYPES = {"mha": 0, "gqa": 1, "mqa": 2, "mla": 3}
ATTN_NAMES = {v: k for k, v in ATTN_TYPES.items()}
MLA_RMS_EPS = 1e-6  # DeepSeek-V2's RMSNorm epsilon, the default rms_eps of an mla checkpoint
# fields that may be left out of cfg; they default to 0 (n_kv_head defaults to n_head, or 1
# for mqa; rms_eps to MLA_RMS_EPS for mla)
# embed_dim defaults to 0, which means n_embd: files written before the field existed have 0
# there (and so do the checkpoints written from configs that leave it out, e.g. import_hf.py);
# a config with a ContextBlock gets it filled in (= n_embd unless given).
OPTIONAL_FIELDS = {"attn_type", "n_kv_head", "kv_rank", "q_rank", "mla_rope_dim", "layer0_type",
                   "model_type", "context_dim", "context_interval", "max_contexts", "rms_eps",
                   "embed_dim", "mla_rope_split", "mla_linear_latent"}
LAYER0_TYPES = {"same": 0, "ctxkv": 1}
MODEL_TYPES = {"pythia": 0, "ctxpythia": 1}
# the ContextBlock tensors, in file order (doc/formats.md, "Context-KV"), right after embed_in
CONTEXT_BLOCK_NAMES = ("ctx_ln_e_w", "ctx_ln_e_b", "ctx_w", "ctx_b", "ctx_ln_c_w", "ctx_ln_c_b")


def padded_vocab(v, multiple=128):
    return (v + multiple - 1) // multiple * multiple


def _attn_type(cfg):
    a = cfg.get("attn_type", 0)
    return ATTN_TYPES.get(a, a) if isinstance(a, str) else int(a)


def embed_dim(cfg):
    """Width E of embed_in and of the ContextBlock's token input (header field 23; 0 = n_embd)."""
    return cfg.get("embed_dim") or cfg["n_embd"]


def has_context_block(cfg):
    """layer0_type 1 (ctxkv) or model_type 1 (ctxpythia): the file holds a ContextBlock."""
    return cfg.get("layer0_type", 0) == 1 or cfg.get("model_type", 0) == 1


def context_block_specs(E, dc):
    """Ordered (name, shape) of the ContextBlock (E = embed_dim, dc = context_dim); the same
    order as the context block file (context_block.bin)."""
    shapes = [(E,), (E,), (dc, dc + E), (dc,), (dc,), (dc,)]
    return list(zip(CONTEXT_BLOCK_NAMES, shapes))


def ctxkv_attn_specs(cfg):
    """Layer 0's attention tensors with layer0_type 1 (ctxkv): queries from the token, keys and
    values from the contexts (width context_dim); H heads of D = n_embd / n_head, no RoPE."""
    C, dc = cfg["n_embd"], cfg["context_dim"]
    return [("q_w", (C, C)), ("q_b", (C,)), ("k_w", (C, dc)), ("k_b", (C,)),
            ("v_w", (C, dc)), ("v_b", (C,)), ("dense_w", (C, C)), ("dense_b", (C,))]


def attn_specs(cfg):
    """Ordered (name, shape) of one layer's attention tensors (doc/formats.md, "The attention
    tensors of each layer depend on attn_type"); D = n_embd / n_head, G = n_kv_head."""
    a, d = _attn_type(cfg), cfg["n_embd"]
    if a == 0:  # mha: HF GPT-NeoX fused qkv, interleaved per head
        return [("qkv_w", (3 * d, d)), ("qkv_b", (3 * d,)), ("dense_w", (d, d)), ("dense_b", (d,))]
    H = cfg["n_head"]
    D = d // H
    if a in (1, 2):  # gqa / mqa: kv_w rows = [K of heads 0..G-1 | V of heads 0..G-1]
        G = cfg.get("n_kv_head") or (1 if a == 2 else H)
        return [("q_w", (H * D, d)), ("q_b", (H * D,)),
                ("kv_w", (2 * G * D, d)), ("kv_b", (2 * G * D,)),
                ("dense_w", (d, H * D)), ("dense_b", (d,))]
    if a == 3:  # mla (DeepSeek-V2), d_nope = d_v = D
        dc, dq, dR = cfg.get("kv_rank", 0), cfg.get("q_rank", 0), cfg.get("mla_rope_dim", 0)
        if dq > 0:
            q = [("q_a_w", (dq, d)), ("q_a_norm_w", (dq,)), ("q_b_w", (H * (D + dR), dq))]
        else:
            q = [("q_w", (H * (D + dR), d))]
        norm = [] if cfg.get("mla_linear_latent", 0) else [("kv_a_norm_w", (dc,))]  # none when linear
        return q + [("kv_a_w", (dc + dR, d))] + norm + [
                    ("kv_b_w", (H * 2 * D, dc)),
                    ("dense_w", (d, H * D)), ("dense_b", (d,))]
    raise PreproError(f"unknown attn_type {cfg.get('attn_type')} (0 mha, 1 gqa, 2 mqa, 3 mla)")


def param_specs(cfg):
    """Ordered (name, shape) of every tensor in the file (doc/formats.md, "Checkpoint");
    the attention tensors of each layer follow attn_type (attn_specs), except layer 0 with
    layer0_type 1 (ctxkv_attn_specs). A model with a ContextBlock (ctxkv or ctxpythia) has
    its tensors right after embed_in [Vp, embed_dim]; for ctxpythia n_embd = context_dim."""
    Vp, L, d, ff = (cfg[k] for k in ("padded_vocab_size", "n_layer", "n_embd", "n_inner"))
    attn = attn_specs(cfg)
    E = embed_dim(cfg)
    specs = [("embed_in", (Vp, E))]
    if has_context_block(cfg):
        specs += context_block_specs(E, cfg["context_dim"])
    for l in range(L):
        p = f"layers.{l}."
        specs += [(p + "ln1_w", (d,)), (p + "ln1_b", (d,)),
                  (p + "ln2_w", (d,)), (p + "ln2_b", (d,))]
        layer_attn = ctxkv_attn_specs(cfg) if l == 0 and cfg.get("layer0_type", 0) == 1 else attn
        specs += [(p + n, s) for n, s in layer_attn]
        specs += [(p + "fc_w", (ff, d)), (p + "fc_b", (ff,)),
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
    cfg["attn_type"] = a = _attn_type(cfg)
    if a not in ATTN_NAMES:
        raise PreproError(f"unknown attn_type {a} (0 mha, 1 gqa, 2 mqa, 3 mla)")
    if a == 3 and "rms_eps" not in cfg:
        cfg["rms_eps"] = MLA_RMS_EPS
    for n in OPTIONAL_FIELDS:
        cfg.setdefault(n, 0)
    H = cfg["n_head"]
    if not cfg["n_kv_head"]:
        cfg["n_kv_head"] = 1 if a == 2 else H
    if cfg["n_embd"] % H:
        raise PreproError(f"n_embd {cfg['n_embd']} is not a multiple of n_head {H}")
    name, G = ATTN_NAMES[a], cfg["n_kv_head"]
    if a == 1 and (G < 1 or H % G):
        raise PreproError(f"gqa: n_kv_head {G} must divide n_head {H}")
    if a == 2 and G != 1:
        raise PreproError(f"mqa: n_kv_head must be 1, not {G}")
    if a in (0, 3) and G != H:
        raise PreproError(f"{name}: n_kv_head {G} must equal n_head {H}")
    if a == 3:
        if cfg["kv_rank"] <= 0 or cfg["q_rank"] < 0:
            raise PreproError(f"mla: kv_rank {cfg['kv_rank']} must be > 0 and q_rank {cfg['q_rank']} >= 0")
        if cfg["mla_rope_dim"] <= 0 or cfg["mla_rope_dim"] % 2:
            raise PreproError(f"mla: mla_rope_dim {cfg['mla_rope_dim']} must be even and > 0")
        if not cfg["rms_eps"] > 0:
            raise PreproError(f"mla: rms_eps {cfg['rms_eps']} must be > 0")
        S = cfg["mla_rope_split"] or 1  # 0 = 1, as in files written before the field existed
        if cfg["mla_rope_dim"] % (2 * S) or cfg["mla_rope_dim"] // S > cfg["n_embd"] // H:
            raise PreproError(f"mla: mla_rope_dim {cfg['mla_rope_dim']} must split into mla_rope_split {S} "
                              "groups that are even and at most the head size")
        if cfg["mla_linear_latent"] not in (0, 1):
            raise PreproError(f"mla: mla_linear_latent {cfg['mla_linear_latent']} must be 0 or 1")
    else:
        extra = [n for n in ("kv_rank", "q_rank", "mla_rope_dim", "rms_eps", "mla_rope_split",
                             "mla_linear_latent") if cfg[n]]
        if extra:
            raise PreproError(f"{name}: {', '.join(extra)} must be 0 (used by mla only)")
    if cfg["rotary_dims"] % 2 or cfg["rotary_dims"] > cfg["n_embd"] // cfg["n_head"]:
        raise PreproError(f"rotary_dims {cfg['rotary_dims']} must be even and at most the head size")
    if not 0 < cfg["vocab_size"] <= cfg["padded_vocab_size"]:
        raise PreproError(f"vocab_size {cfg['vocab_size']} must be in 1..padded_vocab_size "
                          f"{cfg['padded_vocab_size']}")
    _check_context_fields(cfg)
    return cfg


def _check_context_fields(cfg):
    """layer0_type / model_type / context_* / embed_dim (doc/formats.md, "Context-KV"); the
    same rules as train_ctxkv.c's config_problem. Fills embed_dim = n_embd for a model with a
    ContextBlock when it was left at 0."""
    for key, names in (("layer0_type", LAYER0_TYPES), ("model_type", MODEL_TYPES)):
        v = cfg[key]
        cfg[key] = v = names.get(v, v) if isinstance(v, str) else int(v)
        if v not in names.values():
            raise PreproError(f"unknown {key} {v} ({', '.join(f'{i} {n}' for n, i in names.items())})")
    ctxkv, ctxpythia = cfg["layer0_type"] == 1, cfg["model_type"] == 1
    if ctxkv and ctxpythia:
        raise PreproError("ctxpythia has no separate ctxkv layer 0 (layer0_type must be 0)")
    if cfg["embed_dim"] < 0:
        raise PreproError(f"embed_dim {cfg['embed_dim']} must be >= 0 (0 = n_embd)")
    if ctxkv or ctxpythia:
        if cfg["context_dim"] < 1:
            raise PreproError(f"context_dim {cfg['context_dim']} must be >= 1 with a ContextBlock")
        if not cfg["embed_dim"]:
            cfg["embed_dim"] = cfg["n_embd"]
    elif cfg["context_dim"] or cfg["context_interval"] or cfg["max_contexts"]:
        raise PreproError("context_dim / context_interval / max_contexts are set, but neither "
                          "layer0_type 1 (ctxkv) nor model_type 1 (ctxpythia) is")
    if ctxkv:
        if cfg["context_interval"] < 1 or cfg["max_contexts"] < 1:
            raise PreproError(f"ctxkv: context_interval {cfg['context_interval']} and max_contexts "
                              f"{cfg['max_contexts']} must be >= 1")
        if embed_dim(cfg) != cfg["n_embd"]:
            raise PreproError(f"ctxkv: embed_dim {cfg['embed_dim']} must equal n_embd {cfg['n_embd']}")
    elif ctxpythia:
        if cfg["n_embd"] != cfg["context_dim"]:
            raise PreproError(f"ctxpythia: n_embd {cfg['n_embd']} must equal context_dim "
                              f"{cfg['context_dim']} (the layers run at the context width)")
    elif embed_dim(cfg) != cfg["n_embd"]:
        raise PreproError(f"embed_dim {cfg['embed_dim']} must equal n_embd {cfg['n_embd']} "
                          f"(or be 0) without a ContextBlock")


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
