#!/usr/bin/env python3
"""
Reference-state generator for test_ctxkv (dev only; needs dev/requirements-dev.txt).

    devvenv/bin/python dev/reference.py                    # writes all of dev/ref/*
    devvenv/bin/python dev/reference.py --variants mha     # only tiny_*.bin (+ hf_tiny/)
    devvenv/bin/python dev/reference.py --variants gqa,mla # only those variants
    devvenv/bin/python dev/reference.py --variants ctxkv,ctxpythia,ctxblock  # Context-KV only
    (names: mha gqa mqa mla mlaq ctxkv ctxpythia ctxblock; dev/ref/variants.json and
    dev/ref/ctx_variants.json are rewritten on every run)

mha (tiny_model.bin, tiny_state.bin): the ground truth is Hugging Face `transformers`
GPTNeoXForCausalLM. This job:
  1. builds a tiny random model, re-randomises every parameter (so a swapped or missing
     term cannot hide behind an init value of 0 or 1) and rounds it to float16, so the
     model is exactly representable in fp16;
  2. saves it with save_pretrained (fp16 safetensors) and converts that folder with
     prepro/import_hf.py into a ctxkv checkpoint (also checking that fp32 and
     pytorch_model.bin saves convert to byte-identical files);
  3. computes logits, loss and d loss / d params in float64 with autograd;
  4. runs S AdamW steps (torch.optim.AdamW, grad clipping) on the same batch, recording
     the loss before each update;
  5. writes the reference state (doc/formats.md, "Reference state") and reads it back.

gqa, mqa, mla, mlaq (<name>_model.bin, <name>_state.bin): transformers has no Pythia with
these attentions, so the ground truth is `VariantModel`, a plain float64 PyTorch Pythia
skeleton (architecture-spec A) with the attention of doc/formats.md / spec B and C, and
one shared config (VARIANT_TINY, VARIANTS). Its checkpoint is written with prepro/ckpt.py
write_checkpoint; steps 3-5 are shared with mha (make_reference). Checks: the skeleton
with G = H equals HF GPTNeoX (re-laid-out weights); grouped GQA/MQA attention equals
HF's repeat_kv expansion; MLA attention equals HF DeepseekV2Attention (rope rows permuted
to interleaved pairs, ~1e-7: HF's RMSNorm/RoPE run in float32); the MLA absorbed
latent-cache decode equals the plain form at every position; and a list of layout /
convention mistakes (VARIANT_MUTATIONS) must each move the logits.

ctxkv, ctxpythia (<name>_model.bin, <name>_state.bin): Context-KV (layer0_type 1: layer 0
attends from the token to the contexts c_t, c_{t-I}, ..., c_{t-(M-1)I}; layer 1 gqa) and
Context-Pythia (model_type 1: the layers run at width d_c on the contexts), ground truth
`CtxModel` (float64, same parameter recipe), in phase-2 semantics: the contexts come from the
exact sequential ContextBlock recurrence (c_{-1} = 0 per row) on the current embed_in and
are constants, so the ContextBlock's gradients are exact zeros (and embed_in's, for
ctxpythia). The 10 AdamW steps leave the frozen tensors (CTX_FROZEN) out of the optimizer
and the gradient norm. Checks: see the "Context-KV" section below.

ctxblock (ctxblock_state.bin): phase 1, the parallel (Jacobi) step O = ContextBlock(S, E)
for all positions at once, its OACD loss (slices of 12 rows of the 32, the last one partial)
and the gradients of the six block tensors, plus the sequential contexts; layout in
write_ctxblock_state. Also asserts that the noiseless Jacobi iteration from P = 0 reproduces
the sequential recurrence after T iterations.

Everything is seeded (each variant has its own parameter seed; one batch is shared by the
variants), so two runs, or runs of different --variants subsets, give byte-identical files.

Notes on transformers 5.x (what the numbers depend on):
  * the stock "eager" attention does its softmax in float32 even for a float64 model, so
    the float64 reference registers an "eager_fp64" attention (same code, softmax in the
    model dtype); stock eager/sdpa are cross-checked against it;
  * RoPE cos/sin are computed in float32 (position * inv_freq in fp32) and then cast to
    the model dtype, also in float64;
  * the head is called lm_head in memory; save_pretrained writes it as embed_out.weight,
    and config.json carries rope_parameters {partial_rotary_factor, rope_theta} instead of
    rotary_pct / rotary_emb_base.
"""

import argparse
import copy
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
REF_DIR = REPO / "dev" / "ref"
sys.dont_write_bytecode = True  # no __pycache__ in dev/ or prepro/
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STATE_MAGIC, STATE_VERSION = 20261125, 1
CKPT_MAGIC, CKPT_VERSION = 20261124, 1
HEADER_INTS = 256
SEED = 1337
IGNORE = -100

# Default optimiser settings for the reference states. grad_clip was chosen so that
# clipping is active for some of the steps but not all of them (checked at run time).
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, steps=10)


# --------------------------------------------------------------------------------------
# small helpers


def f32bits(x):
    """float -> int32 holding its IEEE-754 float32 bits (how floats live in the headers)."""
    return int(np.array([x], dtype=np.float32).view(np.int32)[0])


def bits2f32(i):
    return float(np.array([i], dtype=np.int32).view(np.float32)[0])


def round_up(x, m):
    return (x + m - 1) // m * m


def fp16_round_(model):
    """Round every parameter to the nearest float16 value, keeping the dtype."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().to(p.dtype))


def rerandomise_(model, gen, emb_std=0.5, mat_gain=0.5, ln_std=0.2, bias_std=0.1, gains=None):
    """Overwrite every parameter with a value that cannot be mistaken for an init value.

    matrices [out, in]: N(0, gain / sqrt(in)) (gain = gains[name-suffix] or mat_gain)
    embeddings:         N(0, emb_std)
    LayerNorm weights:  1 + N(0, ln_std)
    biases:             N(0, bias_std)
    """
    gains = gains or {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "embed_in" in name or "wte" in name:
                v = emb_std * r
            elif name.endswith("bias"):
                v = bias_std * r
            elif p.dim() == 1:  # norm weights
                v = 1.0 + ln_std * r
            elif p.dim() == 2:
                g = next((g for k, g in gains.items() if k in name), mat_gain)
                v = g / np.sqrt(p.shape[1]) * r
            else:
                raise ValueError(f"do not know how to randomise {name} {tuple(p.shape)}")
            p.copy_(v.to(p.dtype))


def make_batch(gen, B, T, V):
    """inputs = seq[:, :T], targets = seq[:, 1:], with targets[:, T-1] and one random middle
    position of row 0 set to IGNORE."""
    seq = torch.randint(0, V, (B, T + 1), generator=gen)
    inputs = seq[:, :T].clone()
    targets = seq[:, 1:].clone()
    targets[:, T - 1] = IGNORE
    mid = int(torch.randint(1, T - 2, (1,), generator=gen))
    targets[0, mid] = IGNORE
    return inputs, targets


def ce_loss(logits, targets):
    """Mean cross-entropy over the non-ignored targets (HF ignore_index = -100)."""
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE)


def flat_ckpt_order(entries, use_grad):
    """Concatenate tensors in checkpoint order/layout as float64 numpy.

    entries: list of (ckpt_name, parameter, padded_rows). padded_rows > rows means the
    checkpoint stores the tensor with extra zero rows (embed_in / embed_out vocab padding).
    """
    out = []
    for _, p, prow in entries:
        t = p.grad if use_grad else p
        if t is None:  # parameter that did not take part in the loss
            t = torch.zeros_like(p)
        a = t.detach().to(torch.float64).cpu().numpy()
        if prow is not None and prow != a.shape[0]:
            pad = np.zeros((prow - a.shape[0],) + a.shape[1:], dtype=np.float64)
            a = np.concatenate([a, pad], axis=0)
        out.append(a.reshape(-1))
    return np.concatenate(out)


# --------------------------------------------------------------------------------------
# reference-state file (doc/formats.md, "Reference state")


def write_state(path, inputs, targets, logits, loss, grads_in_ckpt_order, losses, hyper):
    """Write a reference state. grads_in_ckpt_order: flat [P] (padding rows included)."""
    inputs = np.ascontiguousarray(np.asarray(inputs, dtype=np.int32))
    targets = np.ascontiguousarray(np.asarray(targets, dtype=np.int32))
    logits = np.ascontiguousarray(np.asarray(logits, dtype=np.float32))
    grads = np.ascontiguousarray(np.asarray(grads_in_ckpt_order, dtype=np.float32).reshape(-1))
    losses = np.ascontiguousarray(np.asarray(losses, dtype=np.float32).reshape(-1))
    B, T = inputs.shape
    assert targets.shape == (B, T) and logits.shape[:2] == (B, T), (targets.shape, logits.shape)
    V = logits.shape[2]
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0:7] = [STATE_MAGIC, STATE_VERSION, B, T, V, grads.size, losses.size]
    for i, k in enumerate(["lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"]):
        header[16 + i] = f32bits(hyper[k])
    with open(path, "wb") as f:
        f.write(header.astype("<i4").tobytes())
        f.write(inputs.astype("<i4").tobytes())
        f.write(targets.astype("<i4").tobytes())
        f.write(logits.astype("<f4").tobytes())
        f.write(np.array([loss], dtype="<f4").tobytes())
        f.write(grads.astype("<f4").tobytes())
        f.write(losses.astype("<f4").tobytes())


def read_state(path):
    """Read a reference state back with numpy, validating magic, version and size."""
    raw = np.fromfile(path, dtype=np.uint8)
    h = raw[: HEADER_INTS * 4].view("<i4")
    assert h[0] == STATE_MAGIC and h[1] == STATE_VERSION, f"{path}: bad magic/version {h[:2]}"
    B, T, V, P, S = (int(x) for x in h[2:7])
    assert not h[7:16].any() and not h[22:].any(), f"{path}: nonzero reserved header ints"
    expect = HEADER_INTS * 4 + 4 * (2 * B * T + B * T * V + 1 + P + S)
    assert raw.size == expect, f"{path}: size {raw.size} != {expect}"
    o = HEADER_INTS * 4
    def take(n, dt):
        nonlocal o
        a = raw[o : o + 4 * n].view(dt)
        o += 4 * n
        return a
    st = dict(B=B, T=T, V=V, P=P, S=S)
    st["hyper"] = {k: bits2f32(h[16 + i]) for i, k in
                   enumerate(["lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"])}
    st["inputs"] = take(B * T, "<i4").reshape(B, T)
    st["targets"] = take(B * T, "<i4").reshape(B, T)
    st["logits"] = take(B * T * V, "<f4").reshape(B, T, V)
    st["loss"] = float(take(1, "<f4")[0])
    st["grads"] = take(P, "<f4")
    st["losses"] = take(S, "<f4")
    assert o == raw.size
    return st


# --------------------------------------------------------------------------------------
# checkpoint header / parameter count (doc/formats.md, "Checkpoint")

CKPT_FIELDS = ["magic", "version", "vocab_size", "padded_vocab_size", "n_layer", "n_head",
               "n_embd", "n_inner", "rotary_dims", "rope_base", "max_seq_len", "layer_norm_eps",
               "attn_type", "n_kv_head", "kv_rank", "q_rank", "mla_rope_dim", "layer0_type",
               "model_type", "context_dim", "context_interval", "max_contexts", "rms_eps",
               "embed_dim", "mla_rope_split", "mla_linear_latent"]
CKPT_FLOAT_FIELDS = {"rope_base", "layer_norm_eps", "rms_eps"}


def read_ckpt(path):
    """Return (header dict, float32 parameter array) of a ctxkv checkpoint."""
    raw = np.fromfile(path, dtype=np.uint8)
    h = raw[: HEADER_INTS * 4].view("<i4")
    hd = {}
    for i, k in enumerate(CKPT_FIELDS):
        hd[k] = bits2f32(h[i]) if k in CKPT_FLOAT_FIELDS else int(h[i])
    assert hd["magic"] == CKPT_MAGIC and hd["version"] == CKPT_VERSION, f"{path}: bad magic {h[:2]}"
    assert not h[len(CKPT_FIELDS):].any(), f"{path}: nonzero reserved header ints"
    assert (raw.size - HEADER_INTS * 4) % 4 == 0
    return hd, raw[HEADER_INTS * 4 :].view("<f4")


def mha_param_count(hd):
    """Parameters implied by an mha (attn_type 0) Pythia checkpoint header."""
    assert hd["attn_type"] == 0 and hd["model_type"] == 0 and hd["layer0_type"] == 0
    Vp, d, I, L = hd["padded_vocab_size"], hd["n_embd"], hd["n_inner"], hd["n_layer"]
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (I * d + I) + (d * I + d)
    return 2 * Vp * d + L * per_layer + 2 * d


def ckpt_param_count(hd, path):
    """Parameter count of a checkpoint, from prepro/ckpt.py's reader (which also checks the
    file size against the header), cross-checked against the formula above for mha."""
    ck = import_prepro("ckpt")
    cfg, tensors = ck.read_checkpoint(str(path))
    n = ck.num_params(cfg)
    assert n == sum(a.size for a in tensors.values())
    if hd["layer0_type"] or hd["model_type"]:
        own = ctx_param_count(hd)
        assert own == n, f"param count: reference.py {own} vs prepro/ckpt.py {n}"
    elif hd["attn_type"] == 0 and hd["model_type"] == 0:
        own = mha_param_count(hd)
        assert own == n, f"param count: reference.py {own} vs prepro/ckpt.py {n}"
    elif hd["model_type"] == 0 and hd["layer0_type"] == 0:
        own = variant_param_count(hd)
        assert own == n, f"param count: reference.py {own} vs prepro/ckpt.py {n}"
    return n


def import_prepro(module):
    """Import a prepro/ script as a module (they import each other as top-level modules)."""
    import importlib
    pre = str(REPO / "prepro")
    if pre not in sys.path:
        sys.path.insert(0, pre)
    return importlib.import_module(module)


# --------------------------------------------------------------------------------------
# AdamW steps (shared by all variants)


def run_adamw(model, params_in_order, loss_fn, hyper, frozen=()):
    """S steps of torch.optim.AdamW on loss_fn(model); returns (losses, grad_norms, clipped).

    losses[s] is the loss before update s. Weight decay only on tensors with dim() == 2.
    Gradients are clipped with clip_grad_norm_(params, grad_clip) before each step when
    grad_clip > 0 (torch: g *= min(1, clip / (norm + 1e-6))). `model` is modified.
    frozen: parameters (of params_in_order) that do not train. They are left out of the
    optimizer's param groups altogether (no update, no weight decay, no Adam state) and out
    of the gradient norm / clipping (their gradient is zero in every reference that freezes
    them, so the norm is the same either way).
    """
    fz = {id(p) for p in frozen}
    assert fz <= {id(p) for p in params_in_order}, "frozen parameters must be among params_in_order"
    params_in_order = [p for p in params_in_order if id(p) not in fz]
    decay = [p for p in params_in_order if p.dim() == 2]
    no_decay = [p for p in params_in_order if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hyper["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
        foreach=False)
    losses, norms, clipped = [], [], []
    for _ in range(hyper["steps"]):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        loss.backward()
        losses.append(loss.item())
        if hyper["grad_clip"] > 0:
            n = float(torch.nn.utils.clip_grad_norm_(params_in_order, hyper["grad_clip"]))
        else:
            n = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params_in_order)))
        norms.append(n)
        clipped.append(hyper["grad_clip"] > 0 and n > hyper["grad_clip"])
        opt.step()
    return losses, norms, clipped


# --------------------------------------------------------------------------------------
# float64-exact eager attention (stock "eager" does its softmax in float32 even for a
# float64 model: softmax(..., dtype=torch.float32).to(query.dtype))


def eager_fp64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1)  # in the query dtype (float64 here)
    w = F.dropout(w, p=dropout, training=module.training)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


def register_fp64_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register("eager_fp64", eager_fp64_attention)
    AttentionMaskInterface.register("eager_fp64", eager_mask)


def set_attn(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    assert model.config._attn_implementation == impl, model.config._attn_implementation


# --------------------------------------------------------------------------------------
# Pythia / GPT-NeoX (attn_type 0, mha)

PYTHIA_TINY = dict(vocab_size=120, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                   intermediate_size=128, rotary_pct=0.25, rotary_emb_base=10000,
                   max_position_embeddings=64, use_parallel_residual=True, hidden_act="gelu",
                   tie_word_embeddings=False, layer_norm_eps=1e-5, attention_dropout=0.0,
                   hidden_dropout=0.0)


def build_pythia(cfg_kwargs, gen, attn="eager"):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    try:
        cfg = GPTNeoXConfig(**cfg_kwargs, attn_implementation=attn)
    except TypeError:  # older transformers
        cfg = GPTNeoXConfig(**cfg_kwargs)
        cfg._attn_implementation = attn
    model = GPTNeoXForCausalLM(cfg).float().eval()  # eval(): dropout off (p=0 anyway)
    out = model.get_output_embeddings().weight
    assert out is not model.gpt_neox.embed_in.weight, "embed_out must be untied"
    # qkv gain 1 gives attention scores of O(1) (a non-trivial softmax); lm head gain 1
    # gives logits of O(1). Everything else 0.5/sqrt(fan_in).
    rerandomise_(model, gen, gains={"query_key_value": 1.0, "lm_head": 1.0, "embed_out": 1.0})
    fp16_round_(model)
    return model


def pythia_ckpt_entries(model):
    """(ckpt name, parameter, padded rows) in checkpoint order (doc/formats.md)."""
    V = model.config.vocab_size
    Vp = round_up(V, 128)
    g = model.gpt_neox
    e = [("embed_in", g.embed_in.weight, Vp)]
    for l, lay in enumerate(g.layers):
        a, m = lay.attention, lay.mlp
        e += [(f"l{l}.ln1_w", lay.input_layernorm.weight, None),
              (f"l{l}.ln1_b", lay.input_layernorm.bias, None),
              (f"l{l}.ln2_w", lay.post_attention_layernorm.weight, None),
              (f"l{l}.ln2_b", lay.post_attention_layernorm.bias, None),
              (f"l{l}.qkv_w", a.query_key_value.weight, None),
              (f"l{l}.qkv_b", a.query_key_value.bias, None),
              (f"l{l}.dense_w", a.dense.weight, None),
              (f"l{l}.dense_b", a.dense.bias, None),
              (f"l{l}.fc_w", m.dense_h_to_4h.weight, None),
              (f"l{l}.fc_b", m.dense_h_to_4h.bias, None),
              (f"l{l}.proj_w", m.dense_4h_to_h.weight, None),
              (f"l{l}.proj_b", m.dense_4h_to_h.bias, None)]
    e += [("lnf_w", g.final_layer_norm.weight, None),
          ("lnf_b", g.final_layer_norm.bias, None),
          ("embed_out", model.get_output_embeddings().weight, Vp)]
    names = {id(p) for _, p, _ in e}
    missing = [n for n, p in model.named_parameters() if id(p) not in names]
    assert not missing and len(names) == len(list(model.parameters())), missing
    return e


def pythia_expected_header(cfg):
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    return dict(magic=CKPT_MAGIC, version=CKPT_VERSION, vocab_size=cfg["vocab_size"],
                padded_vocab_size=round_up(cfg["vocab_size"], 128), n_layer=cfg["num_hidden_layers"],
                n_head=H, n_embd=d, n_inner=cfg["intermediate_size"],
                rotary_dims=int(d // H * cfg["rotary_pct"]), rope_base=float(cfg["rotary_emb_base"]),
                max_seq_len=cfg["max_position_embeddings"], layer_norm_eps=bits2f32(f32bits(cfg["layer_norm_eps"])),
                attn_type=0, n_kv_head=H, kv_rank=0, q_rank=0, mla_rope_dim=0, layer0_type=0,
                model_type=0, context_dim=0, context_interval=0, max_contexts=0)


def legacy_neox_config(cfg):
    """config.json as the EleutherAI/pythia-* Hub repos have it (pre-v5 key names)."""
    return {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": cfg["hidden_act"], "hidden_size": cfg["hidden_size"],
            "initializer_range": 0.02, "intermediate_size": cfg["intermediate_size"],
            "layer_norm_eps": cfg["layer_norm_eps"],
            "max_position_embeddings": cfg["max_position_embeddings"], "model_type": "gpt_neox",
            "num_attention_heads": cfg["num_attention_heads"],
            "num_hidden_layers": cfg["num_hidden_layers"], "rotary_emb_base": cfg["rotary_emb_base"],
            "rotary_pct": cfg["rotary_pct"], "tie_word_embeddings": cfg["tie_word_embeddings"],
            "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
            "use_parallel_residual": cfg["use_parallel_residual"], "vocab_size": cfg["vocab_size"]}


def save_pythia_variants(model, cfg, hf_dir, tmp):
    """fp16 safetensors into hf_dir (kept); fp32 safetensors and an fp16 pytorch_model.bin
    (legacy config.json + the causal-mask / masked_bias / inv_freq buffers the released
    Pythia .bin files carry) into tmp. Returns the list of folders to convert."""
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    copy.deepcopy(model).half().save_pretrained(hf_dir)
    from safetensors.torch import load_file
    sd16 = load_file(str(hf_dir / "model.safetensors"))
    expect = {n for n, _ in model.named_parameters()}
    expect = {("embed_out.weight" if n == "lm_head.weight" else n) for n in expect}
    assert set(sd16) == expect, f"saved keys differ: {sorted(set(sd16) ^ expect)}"
    assert all(t.dtype == torch.float16 for t in sd16.values())

    d32 = tmp / "hf_fp32"
    copy.deepcopy(model).float().save_pretrained(d32)
    sd32 = load_file(str(d32 / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in sd32.values()) and set(sd32) == set(sd16)

    dbin = tmp / "hf_bin"
    dbin.mkdir()
    sd = dict(sd16)
    S = cfg["max_position_embeddings"]
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    R = int(head * cfg["rotary_pct"])
    inv_freq = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, R, 2).float() / R))
    for l in range(cfg["num_hidden_layers"]):
        pre = f"gpt_neox.layers.{l}.attention."
        sd[pre + "bias"] = torch.tril(torch.ones(S, S, dtype=torch.uint8)).view(1, 1, S, S)
        sd[pre + "masked_bias"] = torch.tensor(-1e9)
        sd[pre + "rotary_emb.inv_freq"] = inv_freq.clone()
    torch.save(sd, dbin / "pytorch_model.bin")
    (dbin / "config.json").write_text(json.dumps(legacy_neox_config(cfg), indent=2) + "\n")
    return [hf_dir, d32, dbin]


def wait_for_converter(poll_s=60, max_wait_s=4 * 3600):
    import time
    t0 = time.time()
    path = REPO / "prepro" / "import_hf.py"
    while True:
        if path.exists():
            try:
                return import_prepro("import_hf").convert
            except Exception as ex:  # half-written file: retry
                print(f"  prepro/import_hf.py not importable yet ({type(ex).__name__}: {ex}); waiting")
                for m in ("import_hf", "ckpt", "common"):
                    sys.modules.pop(m, None)
        else:
            print(f"  waiting for {path.relative_to(REPO)} ...")
        if time.time() - t0 > max_wait_s:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(poll_s)


def forward_loss(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return logits, ce_loss(logits, targets)


def make_reference(name, model, entries_fn, ckpt_path, inputs, targets, hyper, state_path, frozen=()):
    """Shared part: float64 logits/loss/grads, AdamW steps, state file, checks.

    model:      float32 PyTorch model (fp16-exact parameters), attention set to fp64-exact
    entries_fn: model -> [(ckpt_name, param, padded_rows)] in checkpoint order
    ckpt_path:  the converted checkpoint of this model (checked against the parameters)
    frozen:     entry names of tensors that do not train in the AdamW steps (run_adamw);
                they are checked to stay bit-identical
    """
    m64 = copy.deepcopy(model).double()
    m64.zero_grad(set_to_none=True)
    logits, loss = forward_loss(m64, inputs, targets)
    loss.backward()
    entries = entries_fn(m64)
    grads = flat_ckpt_order(entries, use_grad=True)

    # the checkpoint must hold exactly these parameters in exactly this order
    hd, cparams = read_ckpt(ckpt_path)
    P = ckpt_param_count(hd, ckpt_path)
    assert cparams.size == P, f"{ckpt_path}: {cparams.size} floats, header implies {P}"
    assert grads.size == P, f"grads {grads.size} != checkpoint parameter count {P}"
    ours = flat_ckpt_order(entries, use_grad=False).astype(np.float32)
    if not np.array_equal(ours, cparams):
        off = 0
        for n, p, prow in entries:
            k = (prow or p.shape[0]) * int(np.prod(p.shape[1:], dtype=np.int64))
            if not np.array_equal(ours[off:off + k], cparams[off:off + k]):
                raise AssertionError(f"{ckpt_path}: tensor {n} (offset {off}) differs from the model")
            off += k
        raise AssertionError(f"{ckpt_path}: parameters differ from the model")

    # per-tensor summary
    print(f"[{name}] parameters P = {P:,}  loss = {loss.item():.10f}  "
          f"(non-ignored targets {(targets != IGNORE).sum().item()}/{targets.numel()})")
    gnorm = float(np.sqrt((grads ** 2).sum()))
    print(f"[{name}] initial grad norm = {gnorm:.6f}")
    print(f"[{name}] per-tensor max |grad|:")
    off = 0
    for n, p, prow in entries:
        k = (prow or p.shape[0]) * int(np.prod(p.shape[1:], dtype=np.int64))
        g = grads[off:off + k]
        print(f"    {n:<12} {str(tuple(p.shape)):<12} max|g| {np.abs(g).max():.4e}  norm {np.linalg.norm(g):.4e}")
        off += k

    # AdamW steps (float64, on a fresh copy)
    m_opt = copy.deepcopy(model).double()
    opt_entries = entries_fn(m_opt)
    params = [p for _, p, _ in opt_entries]
    frozen_p = [p for n, p, _ in opt_entries if n in frozen]
    assert len(frozen_p) == len(frozen), f"unknown frozen tensors {sorted(set(frozen) - {n for n, _, _ in opt_entries})}"
    frozen_before = [p.detach().clone() for p in frozen_p]
    losses, norms, clipped = run_adamw(
        m_opt, params, lambda m: forward_loss(m, inputs, targets)[1], hyper, frozen=frozen_p)
    if frozen:
        assert all(torch.equal(a, p.detach()) for a, p in zip(frozen_before, frozen_p)), "a frozen tensor moved"
        start = {n: q.detach().double() for n, q, _ in entries_fn(model)}
        still = [n for n, p, _ in opt_entries if n not in frozen and torch.equal(p.detach(), start[n])]
        assert not still, f"trainable tensors that did not move: {still}"
        print(f"[{name}] frozen in the AdamW steps (left out of the optimizer and the grad norm; "
              f"checked unchanged): {', '.join(frozen)}")
    assert abs(losses[0] - loss.item()) < 1e-12
    print(f"[{name}] AdamW lr={hyper['lr']} betas=({hyper['beta1']}, {hyper['beta2']}) eps={hyper['eps']} "
          f"wd={hyper['weight_decay']} clip={hyper['grad_clip']}")
    for s, (l, n, c) in enumerate(zip(losses, norms, clipped)):
        print(f"    step {s}: loss {l:.8f}  grad norm {n:.6f}{'  (clipped)' if c else ''}")
    if hyper["grad_clip"] > 0:
        assert any(clipped), f"grad_clip {hyper['grad_clip']} never active; lower it"
        print(f"[{name}] clipping active on {sum(clipped)}/{len(clipped)} steps")
    assert losses[-1] < losses[0], "AdamW did not reduce the loss"

    write_state(state_path, inputs.numpy(), targets.numpy(), logits.detach().numpy(),
                loss.item(), grads, losses, hyper)

    # read back and verify
    st = read_state(state_path)
    B, T = inputs.shape
    assert (st["B"], st["T"], st["V"], st["P"], st["S"]) == (B, T, logits.shape[-1], P, hyper["steps"])
    assert np.array_equal(st["inputs"], inputs.numpy()) and np.array_equal(st["targets"], targets.numpy())
    assert np.array_equal(st["logits"], logits.detach().numpy().astype(np.float32))
    assert np.array_equal(st["grads"], grads.astype(np.float32))
    assert np.array_equal(st["losses"], np.array(losses, dtype=np.float32))
    assert st["loss"] == np.float32(loss.item())
    for k in ["lr", "beta1", "beta2", "eps", "weight_decay", "grad_clip"]:
        assert st["hyper"][k] == np.float32(hyper[k]), k
    return dict(loss=loss.item(), grad_norm=gnorm, losses=losses, norms=norms, clipped=clipped,
                logits=logits.detach(), grads=grads, P=P)


def crosscheck_hf_paths(model, entries_fn, inputs, targets, ref):
    """Stock HF attention paths vs the fp64-exact one, and the fp32 error for scale."""
    rows = []
    for impl, dt in [("eager", torch.float64), ("sdpa", torch.float64), ("eager", torch.float32)]:
        m = copy.deepcopy(model).to(dt)
        set_attn(m, impl)
        m.zero_grad(set_to_none=True)
        logits, loss = forward_loss(m, inputs, targets)
        loss.backward()
        g = flat_ckpt_order(entries_fn(m), use_grad=True)
        dl = (logits.double() - ref["logits"]).abs().max().item()
        dg = np.abs(g - ref["grads"]).max()
        rel = dg / np.abs(ref["grads"]).max()
        rows.append((f"{impl}/{str(dt).split('.')[-1]}", dl, abs(loss.item() - ref["loss"]), dg, rel))
    print("cross-check vs fp64-exact reference:   max|dlogit|    |dloss|     max|dgrad|  (rel to max|grad|)")
    for r in rows:
        print(f"    {r[0]:<16} {r[1]:12.3e} {r[2]:12.3e} {r[3]:12.3e}  ({r[4]:.2e})")
    assert rows[0][1] < 1e-5 and rows[1][1] < 1e-5, "HF eager/sdpa disagree with the reference"
    return rows


def pythia_tiny(args):
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cfg = PYTHIA_TINY
    model = build_pythia(cfg, gen, attn="eager")
    B, T = 2, 16
    inputs, targets = make_batch(gen, B, T, cfg["vocab_size"])
    assert len(set(inputs.flatten().tolist())) < inputs.numel(), "want a repeated input id"

    REF_DIR.mkdir(parents=True, exist_ok=True)
    hf_dir = REF_DIR / "hf_tiny"
    ckpt = REF_DIR / "tiny_model.bin"
    convert = wait_for_converter(args.poll)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        dirs = save_pythia_variants(model, cfg, hf_dir, td)
        outs = [ckpt, td / "fp32.bin", td / "torchbin.bin"]
        for d, o in zip(dirs, outs):
            convert(str(d), str(o), verbose=(o == ckpt))
        ref_bytes = ckpt.read_bytes()
        for d, o in zip(dirs[1:], outs[1:]):
            assert o.read_bytes() == ref_bytes, f"converting {d.name} differs from the fp16 safetensors one"
    print("converter: fp16 safetensors, fp32 safetensors and fp16 pytorch_model.bin (legacy config, "
          "with mask/inv_freq buffers) give byte-identical checkpoints")
    hd, _ = read_ckpt(ckpt)
    exp = pythia_expected_header(cfg)
    bad = {k: (hd[k], v) for k, v in exp.items() if hd[k] != v}
    assert not bad, f"{ckpt}: header fields (got, want): {bad}"

    # HF reload round trip (names as saved on disk map back onto the model)
    from transformers import GPTNeoXForCausalLM
    re = GPTNeoXForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    for (n, p), (n2, p2) in zip(model.named_parameters(), re.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n

    register_fp64_attention()
    set_attn(model, "eager_fp64")
    ref = make_reference("pythia-tiny", model, pythia_ckpt_entries, ckpt, inputs, targets,
                         dict(HYPER), REF_DIR / "tiny_state.bin")
    set_attn(model, "eager")
    crosscheck_hf_paths(model, pythia_ckpt_entries, inputs, targets, ref)

    # an independent float64 forward written from doc/architecture-spec A (no HF code):
    # catches a transformers version whose GPTNeoX drifted from the spec
    lg = spec_forward_pythia(model, cfg, inputs)
    d = (lg - ref["logits"]).abs().max().item()
    print(f"spec forward (rotate-half pairs (i, i+R/2), erf GELU, parallel residual) vs HF: max|dlogit| {d:.3e}")
    assert d < 1e-10
    # common mistakes must move the logits far beyond fp32 noise (~1e-6, see cross-check)
    print("mutations of the spec forward (each must be caught by the logits check):")
    for what, kw in MUTATIONS.items():
        dm = (spec_forward_pythia(model, cfg, inputs, **kw) - ref["logits"]).abs().max().item()
        print(f"    {what:<32} max|dlogit| {dm:.3e}")
        assert dm > 1e-4, f"the reference would not catch: {what}"
    return ref


MUTATIONS = {
    "adjacent RoPE pairs (2i, 2i+1)": dict(rope="adjacent"),
    "no RoPE": dict(rope="none"),
    "RoPE on v too": dict(rope_v=True),
    "qkv as [q|k|v] blocks": dict(qkv="blocks"),
    "tanh GELU": dict(gelu="tanh"),
    "ln1/ln2 swapped": dict(swap_ln=True),
    "sequential residual": dict(sequential=True),
    "scale 1/head_dim": dict(scale="1/D"),
}


def spec_forward_pythia(model, cfg, inputs, rope="halves", rope_v=False, qkv="heads", gelu="erf",
                        swap_ln=False, sequential=False, scale="1/sqrt(D)"):
    """Plain float64 forward per architecture-spec A.3 using the model's parameters.
    The keyword arguments switch in common mistakes (MUTATIONS) to show the reference state
    would catch them."""
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    D = d // H
    R = int(D * cfg["rotary_pct"])
    B, T = inputs.shape
    eps = cfg["layer_norm_eps"]
    def ln(x, w, b):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + b
    inv = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = (torch.arange(T, dtype=torch.float32)[:, None] * inv[None]).double()  # fp32 product, as HF
    c, s = torch.cos(ang.float()).double(), torch.sin(ang.float()).double()
    def rope_fn(x):  # x [B,H,T,D]; pairs (i, i+R/2)
        x = x.clone()
        if rope == "none":
            return x
        if rope == "adjacent":
            i1, i2 = list(range(0, R, 2)), list(range(1, R, 2))
        else:
            i1, i2 = list(range(R // 2)), list(range(R // 2, R))
        x1, x2 = x[..., i1].clone(), x[..., i2].clone()
        x[..., i1] = x1 * c - x2 * s
        x[..., i2] = x2 * c + x1 * s
        return x
    x = sd["gpt_neox.embed_in.weight"][inputs]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    for l in range(cfg["num_hidden_layers"]):
        p = lambda k: sd[f"gpt_neox.layers.{l}.{k}"]
        n1, n2 = "input_layernorm", "post_attention_layernorm"
        if swap_ln:
            n1, n2 = n2, n1
        h1 = ln(x, p(n1 + ".weight"), p(n1 + ".bias"))
        qkv_ = h1 @ p("attention.query_key_value.weight").T + p("attention.query_key_value.bias")
        if qkv == "blocks":
            q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv_.split(d, dim=-1))
        else:
            qkv_ = qkv_.view(B, T, H, 3, D)
            q, k, v = (qkv_[:, :, :, i].transpose(1, 2) for i in range(3))
        q, k = rope_fn(q), rope_fn(k)
        if rope_v:
            v = rope_fn(v)
        att = (q @ k.transpose(-1, -2)) * (1.0 / D if scale == "1/D" else 1.0 / np.sqrt(D))
        att = torch.softmax(att.masked_fill(mask, float("-inf")), -1)
        a = (att @ v).transpose(1, 2).reshape(B, T, d)
        a = a @ p("attention.dense.weight").T + p("attention.dense.bias")
        h2 = ln(x + a if sequential else x, p(n2 + ".weight"), p(n2 + ".bias"))
        u = h2 @ p("mlp.dense_h_to_4h.weight").T + p("mlp.dense_h_to_4h.bias")
        if gelu == "tanh":
            g = 0.5 * u * (1 + torch.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        else:
            g = 0.5 * u * (1 + torch.erf(u / np.sqrt(2)))
        m = g @ p("mlp.dense_4h_to_h.weight").T + p("mlp.dense_4h_to_h.bias")
        x = x + a + m
    hf = ln(x, sd["gpt_neox.final_layer_norm.weight"], sd["gpt_neox.final_layer_norm.bias"])
    return hf @ sd["lm_head.weight"].T


# --------------------------------------------------------------------------------------
# Attention variants (attn_type 1 gqa, 2 mqa, 3 mla): a plain float64 PyTorch model.
#
# transformers has no Pythia with GQA/MQA/MLA attention, so the ground truth for these is
# the small model below, written from doc/architecture-spec.md A (the Pythia skeleton),
# B (GQA/MQA) and C (MLA) and doc/formats.md. It is pinned to HF where HF has the same
# computation: with G = H its gqa path equals HF GPTNeoX given re-laid-out weights, its
# grouped attention equals HF's repeat_kv expansion, and its MLA attention equals HF
# DeepseekV2Attention (up to the float32 that HF uses inside RMSNorm and RoPE) once the
# rope rows are permuted from rotate-half to interleaved pairs. The MLA absorbed (latent
# cache) decode form is checked against the plain form at every position.

VARIANT_TINY = dict(vocab_size=120, padded_vocab_size=128, n_layer=2, n_head=4, n_embd=32,
                    n_inner=64, rotary_dims=4, rope_base=10000.0, max_seq_len=64,
                    layer_norm_eps=1e-5)
VARIANT_BT = (2, 16)
# name -> (header fields on top of VARIANT_TINY, parameter seed); files dev/ref/<name>_{model,state}.bin
VARIANTS = {
    "gqa": (dict(attn_type=1, n_kv_head=2), SEED + 1),
    "mqa": (dict(attn_type=2, n_kv_head=1), SEED + 2),
    "mla": (dict(attn_type=3, n_kv_head=4, kv_rank=32, q_rank=0, mla_rope_dim=8, rms_eps=1e-6), SEED + 3),
    "mlaq": (dict(attn_type=3, n_kv_head=4, kv_rank=32, q_rank=24, mla_rope_dim=8, rms_eps=1e-6), SEED + 4),
}
VARIANT_BATCH_SEED = SEED  # one batch, shared by all variants
ATTN_NAMES = {0: "mha", 1: "gqa", 2: "mqa", 3: "mla"}
# matrices whose gain is 1 (as qkv and the head of the mha reference: O(1) attention scores
# and logits); every other matrix gets 0.5 / sqrt(fan_in)
VARIANT_GAIN1 = ("q_w", "kv_w", "q_a_w", "q_b_w", "kv_a_w", "kv_b_w", "embed_out")


def variant_cfg(name):
    extra, _ = VARIANTS[name]
    return dict(VARIANT_TINY, **extra)


def variant_attn_shapes(cfg):
    """One layer's attention tensors (name, shape), written here from doc/formats.md
    independently of prepro/ckpt.py (the two are compared)."""
    a, C, H = cfg["attn_type"], cfg["n_embd"], cfg["n_head"]
    D = C // H
    if a in (1, 2):
        G = cfg["n_kv_head"]
        return [("q_w", (H * D, C)), ("q_b", (H * D,)), ("kv_w", (2 * G * D, C)), ("kv_b", (2 * G * D,)),
                ("dense_w", (C, H * D)), ("dense_b", (C,))]
    assert a == 3, a
    dc, dq, dR = cfg["kv_rank"], cfg["q_rank"], cfg["mla_rope_dim"]
    q = ([("q_a_w", (dq, C)), ("q_a_norm_w", (dq,)), ("q_b_w", (H * (D + dR), dq))] if dq > 0
         else [("q_w", (H * (D + dR), C))])
    return q + [("kv_a_w", (dc + dR, C)), ("kv_a_norm_w", (dc,)), ("kv_b_w", (2 * H * D, dc)),
                ("dense_w", (C, H * D)), ("dense_b", (C,))]


def variant_param_count(hd):
    """Parameters implied by a variant checkpoint header (own formula, doc/formats.md)."""
    Vp, C, I, L = hd["padded_vocab_size"], hd["n_embd"], hd["n_inner"], hd["n_layer"]
    attn = sum(int(np.prod(s)) for _, s in variant_attn_shapes(hd))
    per_layer = 4 * C + attn + (I * C + I) + (C * I + C)
    return 2 * Vp * C + L * per_layer + 2 * C


class VariantLayer(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        for n, s in shapes:
            self.register_parameter(n, torch.nn.Parameter(torch.zeros(s, dtype=torch.float32)))


class VariantModel(torch.nn.Module):
    """Pythia skeleton (embed_in, parallel-residual layers, final LN, untied head) with the
    attention of cfg["attn_type"]. Parameters are named and shaped as in the checkpoint
    (embed_in / embed_out hold the V real rows; the checkpoint pads them to Vp).
    forward(input_ids) returns an object with .logits, like the HF model."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        C, V, I = cfg["n_embd"], cfg["vocab_size"], cfg["n_inner"]
        self.embed_in = torch.nn.Parameter(torch.zeros(V, C))
        shapes = ([("ln1_w", (C,)), ("ln1_b", (C,)), ("ln2_w", (C,)), ("ln2_b", (C,))]
                  + variant_attn_shapes(cfg)
                  + [("fc_w", (I, C)), ("fc_b", (I,)), ("proj_w", (C, I)), ("proj_b", (C,))])
        self.layers = torch.nn.ModuleList(VariantLayer(shapes) for _ in range(cfg["n_layer"]))
        self.lnf_w = torch.nn.Parameter(torch.zeros(C))
        self.lnf_b = torch.nn.Parameter(torch.zeros(C))
        self.embed_out = torch.nn.Parameter(torch.zeros(V, C))

    def params(self):
        return dict(self.named_parameters())

    def forward(self, input_ids, **kw):
        from types import SimpleNamespace
        return SimpleNamespace(logits=variant_forward(self.params(), self.cfg, input_ids, **kw))


def variant_ckpt_entries(model):
    """(name, parameter, padded rows) in checkpoint order; names as in pythia_ckpt_entries
    ("l0.q_w"); ckpt_name() gives prepro/ckpt.py's ("layers.0.q_w")."""
    Vp = model.cfg["padded_vocab_size"]
    e = [("embed_in", model.embed_in, Vp)]
    for l, lay in enumerate(model.layers):
        e += [(f"l{l}.{n}", p, None) for n, p in lay.named_parameters()]
    e += [("lnf_w", model.lnf_w, None), ("lnf_b", model.lnf_b, None), ("embed_out", model.embed_out, Vp)]
    named = dict(model.named_parameters())
    assert len({id(p) for _, p, _ in e}) == len(named) == len(e)
    assert all(named[ckpt_name(n)] is p for n, p, _ in e)
    return e


def short_name(n):
    return "l" + n[len("layers."):] if n.startswith("layers.") else n


def ckpt_name(n):
    return "layers." + n[1:] if n[0] == "l" and n[1].isdigit() else n


def randomise_variant_(model, gen, emb_std=0.5, mat_gain=0.5, ln_std=0.2, bias_std=0.1, gain1=None):
    """As rerandomise_ for the HF model: matrices N(0, gain/sqrt(fan_in)) (gain 1 for
    gain1, default VARIANT_GAIN1, else mat_gain), embed_in N(0, emb_std), norm weights
    1 + N(0, ln_std), biases N(0, bias_std); then rounded to float16 values."""
    gain1 = VARIANT_GAIN1 if gain1 is None else gain1
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            short = name.split(".")[-1]
            if short == "embed_in":
                v = emb_std * r
            elif short.endswith("_b") and p.dim() == 1:
                v = bias_std * r
            elif p.dim() == 1:  # LayerNorm / RMSNorm weights
                v = 1.0 + ln_std * r
            elif p.dim() == 2:
                v = (1.0 if short in gain1 else mat_gain) / np.sqrt(p.shape[1]) * r
            else:
                raise ValueError(name)
            p.copy_(v.to(p.dtype))
    fp16_round_(model)


def rope_tables(R, T, base, offset=0):
    """cos, sin [T, R/2] as HF: inv_freq = 1/base^(arange(0,R,2)/R) in float32,
    theta = float32(p) * inv_freq in float32, cos/sin in float32, then float64."""
    inv = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.float32) / R))
    ang = torch.arange(offset, offset + T, dtype=torch.float32)[:, None] * inv[None]
    return torch.cos(ang).double(), torch.sin(ang).double()


def rope(x, cos, sin, R, adjacent=False):
    """Rotate-half RoPE on the first R dims of x [..., T, n]: pairs (i, i + R/2), i < R/2
    (adjacent=True: the wrong pairs (2i, 2i+1), for the mutation checks)."""
    if adjacent:
        i1, i2 = list(range(0, R, 2)), list(range(1, R, 2))
        y = x.clone()
        x1, x2 = x[..., i1], x[..., i2]
        y[..., i1] = x1 * cos - x2 * sin
        y[..., i2] = x2 * cos + x1 * sin
        return y
    h = R // 2
    x1, x2 = x[..., :h], x[..., h:R]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], dim=-1)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    """y = w * x / sqrt(mean(x^2) + eps) (weight only)."""
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def causal_softmax(s):
    T = s.shape[-1]
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    return torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)


def attn_gqa(p, cfg, h, mut, impl="grouped"):
    """gqa / mqa attention of one layer on h = LN1(x) [B, T, C].
    impl "grouped": query heads viewed as [G, H/G] so head h = g*(H/G) + r reads KV head g;
    impl "repeat_kv": K/V expanded to H heads with HF's llama repeat_kv (cross-check)."""
    B, T, C = h.shape
    H, G, R = cfg["n_head"], cfg["n_kv_head"], cfg["rotary_dims"]
    D, rep = C // H, H // G
    q = (h @ p["q_w"].T + p["q_b"]).view(B, T, H, D).transpose(1, 2)          # [B, H, T, D]
    kv = h @ p["kv_w"].T + p["kv_b"]
    if mut.get("kv_interleaved"):  # wrong: rows [K_g | V_g] per KV head
        kv = kv.view(B, T, G, 2, D)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    else:
        k, v = kv[..., :G * D].view(B, T, G, D), kv[..., G * D:].view(B, T, G, D)
    k, v = k.transpose(1, 2), v.transpose(1, 2)                                # [B, G, T, D]
    cos, sin = rope_tables(R, T, cfg["rope_base"])
    adj = mut.get("rope_adjacent", False)
    q = rope(q, cos, sin, R, adj)
    if not mut.get("no_rope_k"):
        k = rope(k, cos, sin, R, adj)
    scale = 1.0 / np.sqrt(D)
    if impl == "repeat_kv":
        from transformers.models.llama.modeling_llama import repeat_kv
        kx, vx = repeat_kv(k, rep), repeat_kv(v, rep)                           # [B, H, T, D]
        o = causal_softmax((q @ kx.transpose(-1, -2)) * scale) @ vx
    elif mut.get("head_map_mod"):  # wrong: query head h reads KV head h % G
        idx = torch.arange(H) % G
        o = causal_softmax((q @ k[:, idx].transpose(-1, -2)) * scale) @ v[:, idx]
    else:
        q5 = q.reshape(B, G, rep, T, D)
        att = causal_softmax(torch.einsum("bgrtd,bgsd->bgrts", q5, k) * scale)
        o = torch.einsum("bgrts,bgsd->bgrtd", att, v).reshape(B, H, T, D)
    a = o.transpose(1, 2).reshape(B, T, H * D)
    return a @ p["dense_w"].T + p["dense_b"]


def mla_project(p, cfg, h, mut):
    """The MLA projections of one layer on h [B, T, C]:
    q_nope [B,H,T,D], q_rope [B,H,T,dR] (before RoPE), c [B,T,dc] (normed latent),
    k_R [B,T,dR] (before RoPE), and cq (the normed query latent, or h when q_rank = 0)."""
    B, T, C = h.shape
    H, dc, dq, dR = cfg["n_head"], cfg["kv_rank"], cfg["q_rank"], cfg["mla_rope_dim"]
    D, eps = C // H, cfg["rms_eps"]
    if dq > 0:
        ca = h @ p["q_a_w"].T
        cq = ca if mut.get("no_q_norm") else rms_norm(ca, p["q_a_norm_w"], eps)
        q = cq @ p["q_b_w"].T
    else:
        cq = h
        q = h @ p["q_w"].T
    if mut.get("q_blocks"):  # wrong: rows [q_nope of all heads | q_rope of all heads]
        q_nope = q[..., :H * D].view(B, T, H, D).transpose(1, 2)
        q_rope = q[..., H * D:].view(B, T, H, dR).transpose(1, 2)
    else:
        q = q.view(B, T, H, D + dR).transpose(1, 2)
        q_nope, q_rope = q[..., :D], q[..., D:]
    ckv = h @ p["kv_a_w"].T
    c_raw, k_R = ckv[..., :dc], ckv[..., dc:]
    c = c_raw if mut.get("no_kv_norm") else rms_norm(c_raw, p["kv_a_norm_w"], eps)
    return q_nope, q_rope, c, k_R, cq


def attn_mla(p, cfg, h, mut):
    """mla attention of one layer (plain / training form), h = LN1(x) [B, T, C]."""
    B, T, C = h.shape
    H, dR = cfg["n_head"], cfg["mla_rope_dim"]
    D = C // H
    q_nope, q_rope, c, k_R, _ = mla_project(p, cfg, h, mut)
    cos, sin = rope_tables(dR, T, cfg["rope_base"])
    adj = mut.get("rope_adjacent", False)
    q_pe = rope(q_rope, cos, sin, dR, adj)                                      # [B, H, T, dR]
    k_pe = rope(k_R, cos, sin, dR, adj)                                         # [B, T, dR], all heads
    kvb = c @ p["kv_b_w"].T
    if mut.get("kv_b_blocks"):  # wrong: rows [W_UK of all heads | W_UV of all heads]
        k_nope = kvb[..., :H * D].view(B, T, H, D).transpose(1, 2)
        v = kvb[..., H * D:].view(B, T, H, D).transpose(1, 2)
    else:
        kvb = kvb.view(B, T, H, 2 * D).transpose(1, 2)
        k_nope, v = kvb[..., :D], kvb[..., D:]                                  # [B, H, T, D]
    scale = 1.0 / np.sqrt(D if mut.get("scale_D") else D + dR)
    s = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)) * scale
    o = causal_softmax(s) @ v
    a = o.transpose(1, 2).reshape(B, T, H * D)
    return a @ p["dense_w"].T + p["dense_b"]


def variant_forward(p, cfg, inputs, collect=None, attn_impl="grouped", **mut):
    """float64-safe forward of VariantModel parameters p (name -> tensor): logits [B, T, V].
    collect: a list that receives each layer's attention output [B, T, C]."""
    eps = cfg["layer_norm_eps"]
    x = p["embed_in"][inputs]
    for l in range(cfg["n_layer"]):
        q = lambda n: p[f"layers.{l}.{n}"]
        lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith(f"layers.{l}.")}
        h1 = layer_norm(x, q("ln1_w"), q("ln1_b"), eps)
        if cfg["attn_type"] == 3:
            a = attn_mla(lp, cfg, h1, mut)
        else:
            a = attn_gqa(lp, cfg, h1, mut, impl=attn_impl)
        if collect is not None:
            collect.append(a)
        h2 = layer_norm(x, q("ln2_w"), q("ln2_b"), eps)
        u = h2 @ q("fc_w").T + q("fc_b")
        g = 0.5 * u * (1.0 + torch.erf(u / np.sqrt(2.0)))                       # exact GELU
        m = g @ q("proj_w").T + q("proj_b")
        x = x + a + m                                                           # parallel residual
    xf = layer_norm(x, p["lnf_w"], p["lnf_b"], eps)
    return xf @ p["embed_out"].T


def mla_absorbed_decode(p, cfg, inputs, collect=None):
    """MLA inference form: tokens one at a time, each layer caching only the normed latent
    c (kv_rank) and the roped shared key k_pe (mla_rope_dim) per token, with W_UK folded
    into the query weights (W_UK_h^T W_q_nope_h) and W_UV into the output weights
    (W_O_h W_UV_h); per-head K and V are never formed. Returns logits [B, T, V]."""
    B, T = inputs.shape
    C, H, dc, dq, dR = cfg["n_embd"], cfg["n_head"], cfg["kv_rank"], cfg["q_rank"], cfg["mla_rope_dim"]
    D, eps = C // H, cfg["layer_norm_eps"]
    scale = 1.0 / np.sqrt(D + dR)
    cos, sin = rope_tables(dR, T, cfg["rope_base"])
    folds = []
    for l in range(cfg["n_layer"]):
        lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith(f"layers.{l}.")}
        Wq = (lp["q_b_w"] if dq > 0 else lp["q_w"]).view(H, D + dR, -1)       # [H, D+dR, in]
        Wkv = lp["kv_b_w"].view(H, 2 * D, dc)
        W_UK, W_UV = Wkv[:, :D], Wkv[:, D:]                                     # [H, D, dc]
        W_O = lp["dense_w"].view(C, H, D)
        folds.append(dict(lp=lp,
                          Wq_abs=torch.einsum("hdc,hdi->hci", W_UK, Wq[:, :D]),  # [H, dc, in]
                          Wq_rope=Wq[:, D:],                                     # [H, dR, in]
                          Wo_abs=torch.einsum("chd,hdk->chk", W_O, W_UV)))       # [C, H, dc]
    cache = [dict(c=[], k_pe=[]) for _ in range(cfg["n_layer"])]
    logits, attn_outs = [], [[] for _ in range(cfg["n_layer"])]
    for t in range(T):
        x = p["embed_in"][inputs[:, t]]                                          # [B, C]
        for l, f in enumerate(folds):
            lp = f["lp"]
            h = layer_norm(x, lp["ln1_w"], lp["ln1_b"], eps)
            if dq > 0:
                qin = rms_norm(h @ lp["q_a_w"].T, lp["q_a_norm_w"], cfg["rms_eps"])
            else:
                qin = h
            ckv = h @ lp["kv_a_w"].T
            cache[l]["c"].append(rms_norm(ckv[:, :dc], lp["kv_a_norm_w"], cfg["rms_eps"]))
            cache[l]["k_pe"].append(rope(ckv[:, dc:], cos[t], sin[t], dR))
            cc = torch.stack(cache[l]["c"], 1)                                   # [B, t+1, dc]
            kp = torch.stack(cache[l]["k_pe"], 1)                                # [B, t+1, dR]
            q_abs = torch.einsum("hci,bi->bhc", f["Wq_abs"], qin)               # [B, H, dc]
            q_pe = rope(torch.einsum("hri,bi->bhr", f["Wq_rope"], qin), cos[t], sin[t], dR)
            s = (torch.einsum("bhc,bsc->bhs", q_abs, cc) + torch.einsum("bhr,bsr->bhs", q_pe, kp)) * scale
            o_lat = torch.einsum("bhs,bsc->bhc", torch.softmax(s, -1), cc)      # [B, H, dc]
            a = torch.einsum("chk,bhk->bc", f["Wo_abs"], o_lat) + lp["dense_b"]
            attn_outs[l].append(a)
            h2 = layer_norm(x, lp["ln2_w"], lp["ln2_b"], eps)
            u = h2 @ lp["fc_w"].T + lp["fc_b"]
            m = (0.5 * u * (1.0 + torch.erf(u / np.sqrt(2.0)))) @ lp["proj_w"].T + lp["proj_b"]
            x = x + a + m
        logits.append(layer_norm(x, p["lnf_w"], p["lnf_b"], eps) @ p["embed_out"].T)
    if collect is not None:
        collect.extend(torch.stack(a, 1) for a in attn_outs)
    return torch.stack(logits, 1)


VARIANT_MUTATIONS = {
    "gqa": {"adjacent RoPE pairs (2i, 2i+1)": dict(rope_adjacent=True),
            "no RoPE on k": dict(no_rope_k=True),
            "query head h reads KV head h % G": dict(head_map_mod=True),
            "kv_w rows [K_g | V_g] per KV head": dict(kv_interleaved=True)},
    "mla": {"adjacent RoPE pairs (2i, 2i+1)": dict(rope_adjacent=True),
            "no RMSNorm on the kv latent": dict(no_kv_norm=True),
            "scale 1/sqrt(D) (without d_R)": dict(scale_D=True),
            "q rows [nope all heads | rope all]": dict(q_blocks=True),
            "kv_b rows [W_UK all | W_UV all]": dict(kv_b_blocks=True)},
}


def check_gqa_repeat_kv(model, inputs, targets):
    """The grouped attention equals the one that expands K/V with HF's repeat_kv (logits,
    every layer's attention output and all gradients, float64)."""
    m = copy.deepcopy(model).double()
    out = {}
    for impl in ("grouped", "repeat_kv"):
        m.zero_grad(set_to_none=True)
        col = []
        lg = variant_forward(m.params(), m.cfg, inputs, collect=col, attn_impl=impl)
        ce_loss(lg, targets).backward()
        out[impl] = (lg.detach(), [a.detach() for a in col],
                     flat_ckpt_order(variant_ckpt_entries(m), use_grad=True))
    dl = (out["grouped"][0] - out["repeat_kv"][0]).abs().max().item()
    da = max((a - b).abs().max().item() for a, b in zip(out["grouped"][1], out["repeat_kv"][1]))
    dg = np.abs(out["grouped"][2] - out["repeat_kv"][2]).max()
    print(f"    repeat_kv (transformers.models.llama) cross-check: max|d attn out| {da:.3e}  "
          f"max|dlogit| {dl:.3e}  max|dgrad| {dg:.3e}")
    assert max(da, dl, dg) < 1e-12, "grouped GQA attention differs from repeat_kv expansion"
    return max(da, dl, dg)


def check_gqa_vs_hf_neox(inputs):
    """With G = H, the gqa path of the skeleton equals HF GPTNeoXForCausalLM (fp64-exact
    attention) given the qkv weights re-laid out as q_w / kv_w. Checks the whole Pythia
    skeleton (LN, parallel residual, RoPE tables, GELU, head) against HF."""
    cfg = dict(VARIANT_TINY, attn_type=1, n_kv_head=VARIANT_TINY["n_head"])
    C, H = cfg["n_embd"], cfg["n_head"]
    D = C // H
    hf_cfg = dict(PYTHIA_TINY, vocab_size=cfg["vocab_size"], hidden_size=C, num_attention_heads=H,
                  num_hidden_layers=cfg["n_layer"], intermediate_size=cfg["n_inner"],
                  rotary_pct=cfg["rotary_dims"] / D, rotary_emb_base=cfg["rope_base"],
                  max_position_embeddings=cfg["max_seq_len"], layer_norm_eps=cfg["layer_norm_eps"])
    gen = torch.Generator().manual_seed(SEED + 100)
    hf = build_pythia(hf_cfg, gen, attn="eager")
    assert int(D * hf_cfg["rotary_pct"]) == cfg["rotary_dims"]
    register_fp64_attention()
    set_attn(hf, "eager_fp64")
    hf = hf.double()
    ours = VariantModel(cfg).double()
    sd = hf.state_dict()
    g = "gpt_neox."
    with torch.no_grad():
        pp = ours.params()
        pp["embed_in"].copy_(sd[g + "embed_in.weight"])
        pp["embed_out"].copy_(sd["embed_out.weight"] if "embed_out.weight" in sd else sd["lm_head.weight"])
        pp["lnf_w"].copy_(sd[g + "final_layer_norm.weight"])
        pp["lnf_b"].copy_(sd[g + "final_layer_norm.bias"])
        for l in range(cfg["n_layer"]):
            s = lambda n: sd[f"{g}layers.{l}.{n}"]
            o = lambda n: pp[f"layers.{l}.{n}"]
            for a, b in [("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")]:
                o(a + "_w").copy_(s(b + ".weight"))
                o(a + "_b").copy_(s(b + ".bias"))
            for a, b in [("fc", "mlp.dense_h_to_4h"), ("proj", "mlp.dense_4h_to_h"), ("dense", "attention.dense")]:
                o(a + "_w").copy_(s(b + ".weight"))
                o(a + "_b").copy_(s(b + ".bias"))
            for suf, ax in (("_w", "weight"), ("_b", "bias")):
                qkv = s("attention.query_key_value." + ax)
                qkv = qkv.view(H, 3, D, *qkv.shape[1:])       # HF rows h*3D + s*D + j
                o("q" + suf).copy_(qkv[:, 0].reshape(H * D, *qkv.shape[3:]))
                o("kv" + suf).copy_(torch.cat([qkv[:, 1].reshape(H * D, *qkv.shape[3:]),
                                               qkv[:, 2].reshape(H * D, *qkv.shape[3:])]))
    with torch.no_grad():
        d = (hf(input_ids=inputs).logits - ours(inputs).logits).abs().max().item()
    print(f"    skeleton (gqa, G = H) vs HF GPTNeoXForCausalLM, re-laid-out weights: max|dlogit| {d:.3e}")
    assert d < 1e-12, "variant skeleton differs from HF GPT-NeoX"
    return d


def check_mla_vs_hf_deepseek(model, inputs):
    """Each layer's MLA attention equals HF DeepseekV2Attention on the same input, after
    permuting the rope rows of q and kv_a (our rotate-half pairs (i, i+dR/2) -> HF's
    interleaved pairs (2i, 2i+1); dot products are unchanged). HF does RMSNorm and RoPE
    in float32, so the agreement is ~1e-6, not 1e-12; layout/semantic mistakes are O(0.1)."""
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (DeepseekV2Attention,
                                                                       DeepseekV2RotaryEmbedding)
    cfg = model.cfg
    C, H, dc, dq, dR = cfg["n_embd"], cfg["n_head"], cfg["kv_rank"], cfg["q_rank"], cfg["mla_rope_dim"]
    D = C // H
    hc = DeepseekV2Config(hidden_size=C, num_attention_heads=H, num_key_value_heads=H,
                          q_lora_rank=dq if dq > 0 else None, kv_lora_rank=dc, qk_nope_head_dim=D,
                          qk_rope_head_dim=dR, v_head_dim=D, attention_bias=False,
                          max_position_embeddings=cfg["max_seq_len"], rms_norm_eps=cfg["rms_eps"],
                          rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_base"]},
                          vocab_size=cfg["vocab_size"], num_hidden_layers=1)
    register_fp64_attention()
    hc._attn_implementation = "eager_fp64"
    perm = torch.tensor([j for i in range(dR // 2) for j in (i, i + dR // 2)])  # new[2i]=old[i], new[2i+1]=old[i+dR/2]
    p = {k: v.detach().double() for k, v in model.params().items()}
    B, T = inputs.shape
    pos = torch.arange(T)[None].expand(B, T)
    mask = torch.triu(torch.full((T, T), float("-inf"), dtype=torch.float64), 1)[None, None]
    worst = 0.0
    x = p["embed_in"][inputs]
    for l in range(cfg["n_layer"]):
        lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith(f"layers.{l}.")}
        att = DeepseekV2Attention(hc, layer_idx=0).double().eval()
        for m in att.modules():  # HF RMSNorm eps
            if hasattr(m, "variance_epsilon"):
                m.variance_epsilon = cfg["rms_eps"]
        qw = lp["q_b_w" if dq > 0 else "q_w"].view(H, D + dR, -1)
        qw = torch.cat([qw[:, :D], qw[:, D:][:, perm]], 1).reshape(H * (D + dR), -1)
        kva = torch.cat([lp["kv_a_w"][:dc], lp["kv_a_w"][dc:][perm]])
        with torch.no_grad():
            if dq > 0:
                att.q_a_proj.weight.copy_(lp["q_a_w"])
                att.q_a_layernorm.weight.copy_(lp["q_a_norm_w"])
                att.q_b_proj.weight.copy_(qw)
            else:
                att.q_proj.weight.copy_(qw)
            att.kv_a_proj_with_mqa.weight.copy_(kva)
            att.kv_a_layernorm.weight.copy_(lp["kv_a_norm_w"])
            att.kv_b_proj.weight.copy_(lp["kv_b_w"])
            att.o_proj.weight.copy_(lp["dense_w"])
            h = layer_norm(x, lp["ln1_w"], lp["ln1_b"], cfg["layer_norm_eps"])
            pe = DeepseekV2RotaryEmbedding(hc)(h, pos)
            hf_out = att(h, attention_mask=mask, position_embeddings=pe)[0] + lp["dense_b"]
            ours = attn_mla(lp, cfg, h, {})
            d = (hf_out - ours).abs().max().item() / ours.abs().max().item()
            worst = max(worst, d)
            # next layer's input, from our own forward
            h2 = layer_norm(x, lp["ln2_w"], lp["ln2_b"], cfg["layer_norm_eps"])
            u = h2 @ lp["fc_w"].T + lp["fc_b"]
            x = x + ours + (0.5 * u * (1 + torch.erf(u / np.sqrt(2.0)))) @ lp["proj_w"].T + lp["proj_b"]
    print(f"    MLA attention vs HF DeepseekV2Attention (rope rows permuted to interleaved): "
          f"max rel diff {worst:.3e} (HF RMSNorm/RoPE in float32)")
    assert worst < 1e-5, "MLA attention differs from HF DeepseekV2Attention"
    return worst


def check_mla_absorbed(model, inputs):
    """Absorbed latent-cache decode == plain form, at every position (float64)."""
    p = {k: v.detach().double() for k, v in model.params().items()}
    col_plain, col_abs = [], []
    with torch.no_grad():
        lp = variant_forward(p, model.cfg, inputs, collect=col_plain)
        la = mla_absorbed_decode(p, model.cfg, inputs, collect=col_abs)
    dl = (lp - la).abs().max().item()
    da = max((a - b).abs().max().item() for a, b in zip(col_plain, col_abs))
    cfg = model.cfg
    print(f"    absorbed decode (latent cache {cfg['kv_rank']}+{cfg['mla_rope_dim']} floats/token/layer, "
          f"W_UK folded into q, W_UV into the output) vs plain: max|d attn out| {da:.3e}  "
          f"max|dlogit| {dl:.3e}  (all {inputs.shape[1]} positions)")
    assert max(dl, da) < 1e-10, "absorbed MLA differs from the plain form"
    return max(dl, da)


def variant_header_json(cfg, last=22):
    """Header fields of a checkpoint config, as stored: name -> value (floats as the
    shortest decimal that gives the same float32), plus the raw int32 header words 0..last
    (variants.json keeps words 0..22, as before embed_dim (word 23) existed; 0 there = n_embd)."""
    ck = import_prepro("ckpt")
    c = ck.check_cfg(cfg)
    h = ck.make_ckpt_header(c)
    fields = {"magic": int(h[0]), "version": int(h[1])}
    for i, name, kind in ck.HEADER_FIELDS:
        if i <= last:
            fields[name] = float(str(np.float32(bits2f32(h[i])))) if kind == "f" else int(h[i])
    assert not h[last + 1:].any(), f"header words after {last} are not 0"
    return fields, [int(v) for v in h[: last + 1]]


def write_variants_json():
    """dev/ref/variants.json: each reference checkpoint's header fields as stored."""
    ck = import_prepro("ckpt")
    mha = pythia_expected_header(PYTHIA_TINY)
    mha_cfg = {k: v for k, v in mha.items() if k not in ("magic", "version")}
    B, T = VARIANT_BT
    out = {"about": "Header fields (doc/formats.md, Checkpoint) of the reference checkpoints in "
                    "dev/ref, as stored; float fields are float32 (written as the shortest decimal "
                    "that rounds to the same float32); header_int32 = header words 0..22. "
                    "Generated by dev/reference.py.",
           "variants": {}}
    entries = [("mha", mha_cfg, "tiny", (2, 16))] + [(n, variant_cfg(n), n, VARIANT_BT) for n in VARIANTS]
    for name, cfg, stem, (b, t) in entries:
        fields, words = variant_header_json(cfg)
        model_path = REF_DIR / f"{stem}_model.bin"
        if model_path.exists():  # the file on disk must carry exactly this header
            disk = np.fromfile(model_path, dtype="<i4", count=HEADER_INTS)
            assert list(disk[: len(words)]) == words and not disk[len(words):].any(), \
                f"{model_path}: header differs from variants.json (stale file? rerun with --variants {name})"
        H, G, D = fields["n_head"], fields["n_kv_head"], fields["n_embd"] // fields["n_head"]
        a = fields["attn_type"]
        cache = fields["kv_rank"] + fields["mla_rope_dim"] if a == 3 else 2 * G * D
        out["variants"][name] = dict(
            model=f"dev/ref/{stem}_model.bin", state=f"dev/ref/{stem}_state.bin",
            attn=ATTN_NAMES[a], params=ck.num_params(ck.check_cfg(cfg)), B=b, T=t,
            head_dim=D, kv_cache_floats_per_token_per_layer=cache,
            header=fields, header_int32=words)
    text = json.dumps(out, indent=2)
    # one line per header_int32 list
    text = re.sub(r'("header_int32": )\[([^\]]*)\]',
                  lambda m: m.group(1) + "[" + ", ".join(m.group(2).split()).replace(",,", ",") + "]", text)
    assert json.loads(text) == out
    path = REF_DIR / "variants.json"
    path.write_text(text + "\n")
    return out


def write_model_checkpoint(name, cfg, entries, label):
    """Checks that a PyTorch model's tensors (entries: (name, param, padded_rows)) follow
    prepro/ckpt.py's param_specs in names, order and padded shapes, writes REF_DIR/<name>_model.bin
    through prepro/ckpt.py, reads its header back, and returns the path."""
    ck = import_prepro("ckpt")
    specs = ck.param_specs(cfg)
    # run_adamw decays p.dim() == 2; here that is exactly "rows > 1 and cols > 1"
    assert all((p.dim() == 2) == (p.dim() == 2 and min(p.shape) > 1) for _, p, _ in entries)
    ours = [(ckpt_name(n), (prow,) + tuple(p.shape[1:]) if prow else tuple(p.shape)) for n, p, prow in entries]
    assert ours == [(n, tuple(s)) for n, s in specs], f"{label} layout != prepro/ckpt.py param_specs"
    REF_DIR.mkdir(parents=True, exist_ok=True)
    ckpt_path = REF_DIR / f"{name}_model.bin"
    tensors = {sn: flat_ckpt_order([(n, p, prow)], use_grad=False).astype(np.float32).reshape(s)
               for (n, p, prow), (sn, s) in zip(entries, specs)}
    ck.write_checkpoint(str(ckpt_path), cfg, tensors)
    hd, _ = read_ckpt(ckpt_path)
    for k in CKPT_FIELDS[2:]:
        want = bits2f32(f32bits(cfg.get(k, 0))) if k in CKPT_FLOAT_FIELDS else cfg.get(k, 0)
        assert hd[k] == want, (k, hd[k], want)
    return ckpt_path


def variant_reference(name, args):
    """Build, check and write dev/ref/<name>_model.bin and <name>_state.bin."""
    ck = import_prepro("ckpt")
    cfg = ck.check_cfg(variant_cfg(name))
    _, seed = VARIANTS[name]
    print(f"=== variant {name}: attn {ATTN_NAMES[cfg['attn_type']]}, "
          + ", ".join(f"{k} {cfg[k]}" for k in ("n_kv_head", "kv_rank", "q_rank", "mla_rope_dim", "rms_eps")))
    model = VariantModel(cfg)
    randomise_variant_(model, torch.Generator().manual_seed(seed))
    B, T = VARIANT_BT
    inputs, targets = make_batch(torch.Generator().manual_seed(VARIANT_BATCH_SEED), B, T, cfg["vocab_size"])
    assert len(set(inputs.flatten().tolist())) < inputs.numel(), "want a repeated input id"

    entries = variant_ckpt_entries(model)
    ckpt_path = write_model_checkpoint(name, cfg, entries, "VariantModel")

    # checks of the attention code
    checks = {}
    if cfg["attn_type"] in (1, 2):
        checks["repeat_kv"] = check_gqa_repeat_kv(model, inputs, targets)
        if name == "gqa":
            checks["hf_neox"] = check_gqa_vs_hf_neox(inputs)
        muts = VARIANT_MUTATIONS["gqa"]
    else:
        checks["absorbed"] = check_mla_absorbed(model, inputs)
        checks["hf_deepseek_v2"] = check_mla_vs_hf_deepseek(model, inputs)
        muts = dict(VARIANT_MUTATIONS["mla"])
        if cfg["q_rank"] > 0:
            muts["no RMSNorm on the q latent"] = dict(no_q_norm=True)
    p64 = {k: v.detach().double() for k, v in model.params().items()}
    with torch.no_grad():
        base = variant_forward(p64, cfg, inputs)
        print("    mutations (each must move the logits by > 1e-4):")
        for what, kw in muts.items():
            if (kw.get("head_map_mod") or kw.get("kv_interleaved")) and cfg["n_kv_head"] == 1:
                continue  # the same computation when G = 1
            dm = (variant_forward(p64, cfg, inputs, **kw) - base).abs().max().item()
            print(f"        {what:<36} max|dlogit| {dm:.3e}")
            assert dm > 1e-4, f"the reference would not catch: {what}"

    ref = make_reference(name, model, variant_ckpt_entries, ckpt_path, inputs, targets,
                         dict(HYPER), REF_DIR / f"{name}_state.bin")
    ref["cfg"], ref["checks"] = cfg, checks
    return ref


# --------------------------------------------------------------------------------------
# Context-KV: layer0_type 1 (ctxkv), model_type 1 (ctxpythia), and the ContextBlock / OACD
# phase-1 reference (ctxblock). The method is the Context-KV spec (context-kv-spec.md:
# ContextBlock, OACD, Jacobi iteration, Context-KV attention, Context-Pythia); the layouts are
# doc/formats.md "Context-KV" and "Context block". Like the attention variants, the ground
# truth is a plain float64 PyTorch model (CtxModel) with one shared parameter recipe
# (randomise_variant_, fp16-rounded); the checks pin each new piece to an independent form:
#   * ContextBlock == the same block from torch.nn.functional (layer_norm, linear, erf gelu);
#   * ctxkv layer 0 (context slots gathered per query) == one dense masked attention over
#     all T contexts (F.scaled_dot_product_attention, mask t - s = k·I, 0 <= k < M) ==
#     a token-by-token decode that keeps only a ring of the last (M-1)·I + 1 contexts;
#   * ctxpythia's layers on the contexts == HF GPTNeoXForCausalLM(inputs_embeds=contexts);
#   * the noiseless Jacobi iteration from P = 0 reaches the sequential recurrence after T
#     iterations; the OACD gradient == its closed form; block gradients pass gradcheck;
#   * a list of convention mistakes (CTX_MUTATIONS) must each move the logits, and letting
#     the gradient through the recurrence (instead of constants) must move the gradients.
#
# Phase 2 (what the ctxkv / ctxpythia states hold): the contexts are computed exactly and
# sequentially (c_{-1} = 0 at the start of every batch row) from the current embed_in,
# under torch.no_grad: constants. So the ContextBlock's gradients are exact zeros, and so is
# embed_in's for ctxpythia (it feeds only the block). In the AdamW steps the frozen tensors
# (CTX_FROZEN) are left out of the optimizer's param groups and of the gradient norm
# (run_adamw(frozen=...)); the contexts are recomputed at every step from the current
# embed_in (which trains, for ctxkv).

CTX_BLOCK_NAMES = ("ctx_ln_e_w", "ctx_ln_e_b", "ctx_w", "ctx_b", "ctx_ln_c_w", "ctx_ln_c_b")
# name -> (checkpoint config, parameter seed); files dev/ref/<name>_{model,state}.bin.
# ctxkv: layer 0 Context-KV (d_c 16, interval 3, 4 slots: with T = 16 the oldest contexts are
# dropped from t = 12 on), layers 1.. gqa with 2 KV heads. ctxpythia: embed_in [Vp, 32] ->
# ContextBlock -> two mha layers at width d_c = 16 (2 heads of 8, rotary 2 = a quarter).
CTX_VARIANTS = {
    "ctxkv": (dict(VARIANT_TINY, attn_type=1, n_kv_head=2, layer0_type=1, model_type=0, context_dim=16,
                   context_interval=3, max_contexts=4, embed_dim=32), SEED + 5),
    "ctxpythia": (dict(VARIANT_TINY, n_embd=16, n_head=2, rotary_dims=2, attn_type=0, n_kv_head=2,
                       layer0_type=0, model_type=1, context_dim=16, context_interval=0, max_contexts=0,
                       embed_dim=32), SEED + 6),
}
# tensors that do not train in phase 2 (no gradient, no AdamW update, no weight decay)
CTX_FROZEN = {"ctxkv": CTX_BLOCK_NAMES, "ctxpythia": ("embed_in",) + CTX_BLOCK_NAMES}
# gain-1 matrices: as the other references (O(1) attention scores and logits)
CTX_GAIN1 = VARIANT_GAIN1 + ("qkv_w", "k_w", "v_w")
# the phase-1 reference (dev/ref/ctxblock_state.bin)
CTXBLOCK = dict(B=2, T=16, E=32, d_c=16, vocab_size=120, padded_vocab_size=128, slice=12,
                centroid_weight=0.1, noise_std=0.1, ln_eps=1e-5, seed=SEED + 7)
CTXBLOCK_MAGIC, CTXBLOCK_VERSION = 20261127, 1
CTX_NAMES = ["ctxkv", "ctxpythia", "ctxblock"]


def ctx_embed_dim(cfg):
    """embed_dim (header word 23); 0 means n_embd."""
    return cfg.get("embed_dim") or cfg["n_embd"]


def ctx_block_shapes(E, dc):
    """The ContextBlock tensors (name, shape) in file order, written here from doc/formats.md
    independently of prepro/ckpt.py (the two are compared)."""
    return [("ctx_ln_e_w", (E,)), ("ctx_ln_e_b", (E,)), ("ctx_w", (dc, dc + E)), ("ctx_b", (dc,)),
            ("ctx_ln_c_w", (dc,)), ("ctx_ln_c_b", (dc,))]


def ctx_layer_attn_shapes(cfg, l):
    """Layer l's attention tensors: the Context-KV ones for layer 0 with layer0_type 1, else
    those of attn_type (mha: HF's fused qkv)."""
    C, dc = cfg["n_embd"], cfg["context_dim"]
    if l == 0 and cfg["layer0_type"] == 1:
        return [("q_w", (C, C)), ("q_b", (C,)), ("k_w", (C, dc)), ("k_b", (C,)),
                ("v_w", (C, dc)), ("v_b", (C,)), ("dense_w", (C, C)), ("dense_b", (C,))]
    if cfg["attn_type"] == 0:
        return [("qkv_w", (3 * C, C)), ("qkv_b", (3 * C,)), ("dense_w", (C, C)), ("dense_b", (C,))]
    return variant_attn_shapes(cfg)


def ctx_layer_shapes(cfg, l):
    C, I = cfg["n_embd"], cfg["n_inner"]
    return ([("ln1_w", (C,)), ("ln1_b", (C,)), ("ln2_w", (C,)), ("ln2_b", (C,))]
            + ctx_layer_attn_shapes(cfg, l)
            + [("fc_w", (I, C)), ("fc_b", (I,)), ("proj_w", (C, I)), ("proj_b", (C,))])


def ctx_param_count(hd):
    """Parameters implied by a ctxkv / ctxpythia header (own formula, doc/formats.md)."""
    Vp, C, E = hd["padded_vocab_size"], hd["n_embd"], ctx_embed_dim(hd)
    n = Vp * E + sum(int(np.prod(s)) for _, s in ctx_block_shapes(E, hd["context_dim"]))
    n += sum(int(np.prod(s)) for l in range(hd["n_layer"]) for _, s in ctx_layer_shapes(hd, l))
    return n + 2 * C + Vp * C


class CtxModel(torch.nn.Module):
    """embed_in [V, E], the ContextBlock, L parallel-residual layers (layer 0 Context-KV when
    layer0_type is 1; width n_embd = d_c for ctxpythia), final LN, untied head [V, n_embd].
    Parameters named and shaped as in the checkpoint (the checkpoint pads embed_in / embed_out
    to Vp rows). forward(input_ids) returns an object with .logits."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = dict(cfg)
        C, V, E, dc = cfg["n_embd"], cfg["vocab_size"], ctx_embed_dim(cfg), cfg["context_dim"]
        self.embed_in = torch.nn.Parameter(torch.zeros(V, E))
        for n, s in ctx_block_shapes(E, dc):
            self.register_parameter(n, torch.nn.Parameter(torch.zeros(s)))
        self.layers = torch.nn.ModuleList(VariantLayer(ctx_layer_shapes(cfg, l)) for l in range(cfg["n_layer"]))
        self.lnf_w = torch.nn.Parameter(torch.zeros(C))
        self.lnf_b = torch.nn.Parameter(torch.zeros(C))
        self.embed_out = torch.nn.Parameter(torch.zeros(V, C))

    def params(self):
        return dict(self.named_parameters())

    def forward(self, input_ids, **kw):
        from types import SimpleNamespace
        return SimpleNamespace(logits=ctx_forward(self.params(), self.cfg, input_ids, **kw))


def ctx_ckpt_entries(model):
    """(name, parameter, padded rows) in checkpoint order: embed_in, the ContextBlock, the
    layers ("l0.q_w"; ckpt_name() gives "layers.0.q_w"), lnf, embed_out."""
    Vp = model.cfg["padded_vocab_size"]
    e = [("embed_in", model.embed_in, Vp)] + [(n, getattr(model, n), None) for n in CTX_BLOCK_NAMES]
    for l, lay in enumerate(model.layers):
        e += [(f"l{l}.{n}", p, None) for n, p in lay.named_parameters()]
    e += [("lnf_w", model.lnf_w, None), ("lnf_b", model.lnf_b, None), ("embed_out", model.embed_out, Vp)]
    named = dict(model.named_parameters())
    assert len({id(p) for _, p, _ in e}) == len(named) == len(e)
    assert all(named[ckpt_name(n)] is p for n, p, _ in e)
    return e


def gelu_erf(u):
    return 0.5 * u * (1.0 + torch.erf(u / np.sqrt(2.0)))


def context_block(p, prev, emb, eps, mut=None):
    """One ContextBlock step on any leading dims: prev = c_{t-1} [..., d_c], emb = e_t [..., E].
    u = LN_e(e); z = [c_{t-1} ; u]; delta = GELU_erf(W_c z + b_c); c_t = LN_c(c_{t-1} + delta).
    mut switches in mistakes (CTX_MUTATIONS)."""
    mut = mut or {}
    u = emb if mut.get("no_ln_e") else layer_norm(emb, p["ctx_ln_e_w"], p["ctx_ln_e_b"], eps)
    z = torch.cat([u, prev] if mut.get("z_u_first") else [prev, u], dim=-1)
    a = z @ p["ctx_w"].T + p["ctx_b"]
    if mut.get("gelu_tanh"):
        d = 0.5 * a * (1 + torch.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    else:
        d = gelu_erf(a)
    r = d if mut.get("no_block_residual") else prev + d
    return layer_norm(r, p["ctx_ln_c_w"], p["ctx_ln_c_b"], eps)


def contexts_sequential(p, emb, eps, mut=None):
    """The exact recurrence over emb [B, T, E] -> contexts [B, T, d_c], c_{-1} = 0 at the start
    of every row (mut no_restart: one stream through row 0, then row 1, ...)."""
    mut = dict(mut or {})
    B, T, E = emb.shape
    if mut.pop("no_restart", False):
        return contexts_sequential(p, emb.reshape(1, B * T, E), eps, mut).reshape(B, T, -1)
    c = emb.new_zeros(B, p["ctx_b"].shape[0])
    out = []
    for t in range(T):
        c = context_block(p, c, emb[:, t], eps, mut)
        out.append(c)
    return torch.stack(out, 1)


def shift_contexts(P):
    """S_t = P_{t-1}, S_0 = 0, in every row of P [B, T, d_c]."""
    return torch.cat([torch.zeros_like(P[:, :1]), P[:, :-1]], 1)


def phase2_contexts(p, cfg, inputs, mut):
    """Phase-2 contexts from the current embed_in: sequential, exact, constants (no_grad),
    unless mut grad_through_contexts (a mistake: back-propagate through the recurrence)."""
    emb = p["embed_in"][inputs]
    if mut.get("grad_through_contexts"):
        return contexts_sequential(p, emb, cfg["layer_norm_eps"], mut)
    with torch.no_grad():
        return contexts_sequential(p, emb, cfg["layer_norm_eps"], mut)


def ctx_slots(T, I, M):
    """For query t and slot k: the source position s = t - k·I, clamped to >= 0, and whether
    the slot is filled (t - k·I >= 0). Both [T, M]."""
    s = torch.arange(T)[:, None] - I * torch.arange(M)[None]
    return s.clamp(min=0), s >= 0


def attn_ctxkv(lp, cfg, h, ctx, mut, impl="slots"):
    """Context-KV attention of layer 0: h = LN_in(x_0) [B, T, C], ctx = contexts [B, T, d_c].
    q_t = W_q h_t + b_q; slot k of query t holds K/V of c_{t-k·I} (W_k c + b_k, W_v c + b_v)
    when t - k·I >= 0, else it is masked out; scores q·K/sqrt(D) per head, no RoPE; output
    W_o concat_h(softmax · V) + b_o.
    impl "slots": gather the M slots per query; "dense": one masked attention over all T
    contexts (F.scaled_dot_product_attention with the mask t - s = k·I, 0 <= k < M)."""
    B, T, C = h.shape
    H = cfg["n_head"]
    D = C // H
    I, M = cfg["context_interval"], cfg["max_contexts"]
    if mut.get("interval_plus_one"):
        I += 1
    if mut.get("no_max_contexts"):  # wrong: every t - k·I >= 0 takes part (nothing dropped)
        M = (T - 1) // I + 1
    q = (h @ lp["q_w"].T + lp["q_b"]).view(B, T, H, D)
    kc = (ctx @ lp["k_w"].T + lp["k_b"]).view(B, T, H, D)
    vc = (ctx @ lp["v_w"].T + lp["v_b"]).view(B, T, H, D)
    if mut.get("ctx_rope"):  # wrong: RoPE on q (at t) and on the context keys (at s)
        R = cfg["rotary_dims"]
        cos, sin = rope_tables(R, T, cfg["rope_base"])
        q = rope(q.transpose(1, 2), cos, sin, R).transpose(1, 2)
        kc = rope(kc.transpose(1, 2), cos, sin, R).transpose(1, 2)
    scale = 1.0 / np.sqrt(C if mut.get("scale_C") else D)
    if impl == "dense":
        dt = torch.arange(T)[:, None] - torch.arange(T)[None]                   # t - s
        allowed = (dt >= 0) & (dt % I == 0) & (dt < I * M)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                           attn_mask=allowed, scale=scale).transpose(1, 2)
    else:
        s, valid = ctx_slots(T, I, M)
        K, V = kc[:, s], vc[:, s]                                               # [B, T, M, H, D]
        sc = torch.einsum("bthd,btkhd->bhtk", q, K) * scale
        if mut.get("zero_empty_slots"):  # the prototype: empty slots are zero contexts and take part
            v4 = valid[None, :, :, None, None]
            K = torch.where(v4, K, lp["k_b"].view(H, D))
            V = torch.where(v4, V, lp["v_b"].view(H, D))
            sc = torch.einsum("bthd,btkhd->bhtk", q, K) * scale
        else:
            sc = sc.masked_fill(~valid[None, None], float("-inf"))
        o = torch.einsum("bhtk,btkhd->bthd", torch.softmax(sc, -1), V)
    return o.reshape(B, T, C) @ lp["dense_w"].T + lp["dense_b"]


def ctxkv_ring_decode(lp, cfg, h, ctx):
    """Layer 0's attention one query at a time, reading the contexts only from a ring of the
    last (M-1)·I + 1 (what a decoder keeps): shows the ring length suffices."""
    B, T, C = h.shape
    H, I, M = cfg["n_head"], cfg["context_interval"], cfg["max_contexts"]
    D, Rl = C // H, (M - 1) * I + 1
    ring = h.new_zeros(B, Rl, ctx.shape[-1])
    out = []
    for t in range(T):
        ring[:, t % Rl] = ctx[:, t]
        cs = ring[:, [(t - k * I) % Rl for k in range(M) if t - k * I >= 0]]     # [B, n, d_c]
        q = (h[:, t] @ lp["q_w"].T + lp["q_b"]).view(B, H, D)
        K = (cs @ lp["k_w"].T + lp["k_b"]).view(B, -1, H, D)
        V = (cs @ lp["v_w"].T + lp["v_b"]).view(B, -1, H, D)
        w = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, K) / np.sqrt(D), -1)
        out.append(torch.einsum("bhn,bnhd->bhd", w, V).reshape(B, C) @ lp["dense_w"].T + lp["dense_b"])
    return torch.stack(out, 1)


def attn_mha(lp, cfg, h, mut):
    """mha attention with HF GPT-NeoX's fused qkv (rows h·3D + s·D + j), RoPE on the first R
    dims of each head of q and k (rotate-half)."""
    B, T, C = h.shape
    H, R = cfg["n_head"], cfg["rotary_dims"]
    D = C // H
    qkv = h @ lp["qkv_w"].T + lp["qkv_b"]
    if mut.get("qkv_blocks"):  # wrong: [q | k | v] blocks
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=-1))
    else:
        qkv = qkv.view(B, T, H, 3, D)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))            # [B, H, T, D]
    cos, sin = rope_tables(R, T, cfg["rope_base"])
    q = rope(q, cos, sin, R)
    if not mut.get("no_rope_k"):
        k = rope(k, cos, sin, R)
    o = causal_softmax((q @ k.transpose(-1, -2)) / np.sqrt(D)) @ v
    return o.transpose(1, 2).reshape(B, T, C) @ lp["dense_w"].T + lp["dense_b"]


def ctx_forward(p, cfg, inputs, collect=None, attn_impl="slots", **mut):
    """float64-safe forward of CtxModel parameters p: logits [B, T, V]. x_0 = embed_in[tokens]
    (ctxkv) or the contexts (ctxpythia). collect receives each layer's attention output."""
    eps = cfg["layer_norm_eps"]
    ctx = phase2_contexts(p, cfg, inputs, mut)
    x = ctx if cfg["model_type"] == 1 else p["embed_in"][inputs]
    for l in range(cfg["n_layer"]):
        lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith(f"layers.{l}.")}
        h1 = layer_norm(x, lp["ln1_w"], lp["ln1_b"], eps)
        if l == 0 and cfg["layer0_type"] == 1:
            a = attn_ctxkv(lp, cfg, h1, ctx, mut, impl=attn_impl)
        elif cfg["attn_type"] == 0:
            a = attn_mha(lp, cfg, h1, mut)
        elif cfg["attn_type"] == 3:
            a = attn_mla(lp, cfg, h1, mut)
        else:
            a = attn_gqa(lp, cfg, h1, mut)
        if collect is not None:
            collect.append(a)
        h2 = layer_norm(x, lp["ln2_w"], lp["ln2_b"], eps)
        m = gelu_erf(h2 @ lp["fc_w"].T + lp["fc_b"]) @ lp["proj_w"].T + lp["proj_b"]
        x = x + a + m                                                           # parallel residual
    return layer_norm(x, p["lnf_w"], p["lnf_b"], eps) @ p["embed_out"].T


CTX_MUTATIONS = {
    "block": {"contexts do not restart per row": dict(no_restart=True),
              "z = [u ; c] (c last)": dict(z_u_first=True),
              "tanh GELU in the block": dict(gelu_tanh=True),
              "LN_c(delta) (no c_{t-1} residual)": dict(no_block_residual=True),
              "no LN_e on the embedding": dict(no_ln_e=True)},
    "ctxkv": {"empty slots = zero contexts (prototype)": dict(zero_empty_slots=True),
              "no max_contexts cap": dict(no_max_contexts=True),
              "RoPE on q and the context keys": dict(ctx_rope=True),
              "interval I+1": dict(interval_plus_one=True),
              "scale 1/sqrt(C)": dict(scale_C=True)},
    "ctxpythia": {"no RoPE on k": dict(no_rope_k=True),
                  "qkv as [q|k|v] blocks": dict(qkv_blocks=True)},
}


def check_block_vs_functional(p, eps, gen):
    """context_block == the same block from torch.nn.functional (random c_{t-1}, e_t)."""
    E, dc = p["ctx_ln_e_w"].shape[0], p["ctx_b"].shape[0]
    prev = torch.randn(5, dc, generator=gen, dtype=torch.float64)
    emb = torch.randn(5, E, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        u = F.layer_norm(emb, (E,), p["ctx_ln_e_w"], p["ctx_ln_e_b"], eps)
        d = F.gelu(F.linear(torch.cat([prev, u], -1), p["ctx_w"], p["ctx_b"]), approximate="none")
        want = F.layer_norm(prev + d, (dc,), p["ctx_ln_c_w"], p["ctx_ln_c_b"], eps)
        dd = (context_block(p, prev, emb, eps) - want).abs().max().item()
    print(f"    ContextBlock vs torch.nn.functional (layer_norm, linear, erf gelu): max diff {dd:.3e}")
    assert dd < 1e-12
    return dd


def jacobi_check(p, emb, eps, label):
    """Noiseless parallel (Jacobi) iteration from P = 0: P <- ContextBlock(shift(P), E), all
    positions at once. After k iterations positions 0..k-1 are exact, so after T iterations P
    is the sequential recurrence (c_{-1} = 0). Returns max |P - Cseq| after T iterations."""
    T = emb.shape[1]
    with torch.no_grad():
        cseq = contexts_sequential(p, emb, eps)
        P = torch.zeros_like(cseq)
        exact = []
        for _ in range(T):
            P = context_block(p, shift_contexts(P), emb, eps)
            err = (P - cseq).abs().amax(dim=(0, 2))                                # per position
            exact.append(int((err < 1e-12).long().cumprod(0).sum()))
        d = (P - cseq).abs().max().item()
    print(f"    {label}: noiseless Jacobi from P = 0, {T} iterations vs the sequential recurrence: "
          f"max diff {d:.3e}; exact leading positions after each iteration {exact}")
    assert d < 1e-12, "the Jacobi iteration does not reach the sequential recurrence"
    assert exact == list(range(1, T + 1)), "position t should become exact at iteration t + 1"
    return d


def check_ctxkv_attention(p, cfg, inputs, targets):
    """Layer 0: slots == dense masked SDPA == ring decode (attention output, logits, grads)."""
    eps = cfg["layer_norm_eps"]
    lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith("layers.0.")}
    with torch.no_grad():
        ctx = contexts_sequential(p, p["embed_in"][inputs], eps)
        h = layer_norm(p["embed_in"][inputs], lp["ln1_w"], lp["ln1_b"], eps)
        a_slots = attn_ctxkv(lp, cfg, h, ctx, {})
        da = (a_slots - attn_ctxkv(lp, cfg, h, ctx, {}, impl="dense")).abs().max().item()
        dr = (a_slots - ctxkv_ring_decode(lp, cfg, h, ctx)).abs().max().item()
    out = {}
    for impl in ("slots", "dense"):
        q = {k: v.detach().clone().requires_grad_(True) for k, v in p.items()}
        lg = ctx_forward(q, cfg, inputs, attn_impl=impl)
        g = torch.autograd.grad(ce_loss(lg, targets), [v for k, v in q.items() if not k.startswith("ctx_")],
                                allow_unused=True)
        out[impl] = (lg.detach(), [torch.zeros(1) if x is None else x for x in g])
    dl = (out["slots"][0] - out["dense"][0]).abs().max().item()
    dg = max((a - b).abs().max().item() for a, b in zip(out["slots"][1], out["dense"][1]))
    I, M = cfg["context_interval"], cfg["max_contexts"]
    print(f"    layer 0 slots vs dense masked SDPA (t - s = k*{I}, k < {M}): max|d attn out| {da:.3e}  "
          f"max|dlogit| {dl:.3e}  max|dgrad| {dg:.3e}")
    print(f"    layer 0 slots vs decode with a ring of (M-1)*I+1 = {(M - 1) * I + 1} contexts: "
          f"max|d attn out| {dr:.3e}")
    assert max(da, dl, dg, dr) < 1e-12
    return max(da, dl, dg, dr)


def check_ctxpythia_vs_hf_neox(p, cfg, inputs):
    """ctxpythia's layers, final LN and head == HF GPTNeoXForCausalLM run on
    inputs_embeds = the contexts (same weights; fp64-exact attention)."""
    C, H, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    D = C // H
    hf_cfg = dict(PYTHIA_TINY, vocab_size=cfg["vocab_size"], hidden_size=C, num_attention_heads=H,
                  num_hidden_layers=L, intermediate_size=cfg["n_inner"],
                  rotary_pct=cfg["rotary_dims"] / D, rotary_emb_base=cfg["rope_base"],
                  max_position_embeddings=cfg["max_seq_len"], layer_norm_eps=cfg["layer_norm_eps"])
    hf = build_pythia(hf_cfg, torch.Generator().manual_seed(SEED + 101), attn="eager")
    assert int(D * hf_cfg["rotary_pct"]) == cfg["rotary_dims"]
    register_fp64_attention()
    set_attn(hf, "eager_fp64")
    hf = hf.double()
    g = hf.gpt_neox
    with torch.no_grad():
        for l, lay in enumerate(g.layers):
            q = lambda n: p[f"layers.{l}.{n}"]
            for mod, a in [(lay.input_layernorm, "ln1"), (lay.post_attention_layernorm, "ln2")]:
                mod.weight.copy_(q(a + "_w"))
                mod.bias.copy_(q(a + "_b"))
            for mod, a in [(lay.attention.query_key_value, "qkv"), (lay.attention.dense, "dense"),
                           (lay.mlp.dense_h_to_4h, "fc"), (lay.mlp.dense_4h_to_h, "proj")]:
                mod.weight.copy_(q(a + "_w"))
                mod.bias.copy_(q(a + "_b"))
        g.final_layer_norm.weight.copy_(p["lnf_w"])
        g.final_layer_norm.bias.copy_(p["lnf_b"])
        hf.get_output_embeddings().weight.copy_(p["embed_out"])
        ctx = contexts_sequential(p, p["embed_in"][inputs], cfg["layer_norm_eps"])
        d = (hf(inputs_embeds=ctx).logits - ctx_forward(p, cfg, inputs)).abs().max().item()
    print(f"    layers on the contexts vs HF GPTNeoXForCausalLM(inputs_embeds=contexts): max|dlogit| {d:.3e}")
    assert d < 1e-12, "ctxpythia layers differ from HF GPT-NeoX"
    return d


def ctx_reference(name, args):
    """Build, check and write dev/ref/<name>_model.bin and <name>_state.bin (ctxkv, ctxpythia)."""
    ck = import_prepro("ckpt")
    raw, seed = CTX_VARIANTS[name]
    cfg = ck.check_cfg(raw)
    assert tuple(ck.CONTEXT_BLOCK_NAMES) == CTX_BLOCK_NAMES
    print(f"=== {name}: layer0_type {cfg['layer0_type']}, model_type {cfg['model_type']}, attn "
          f"{ATTN_NAMES[cfg['attn_type']]}, " + ", ".join(f"{k} {cfg[k]}" for k in (
              "n_embd", "n_head", "n_kv_head", "rotary_dims", "embed_dim", "context_dim",
              "context_interval", "max_contexts")))
    model = CtxModel(cfg)
    randomise_variant_(model, torch.Generator().manual_seed(seed), gain1=CTX_GAIN1)
    B, T = VARIANT_BT
    inputs, targets = make_batch(torch.Generator().manual_seed(VARIANT_BATCH_SEED), B, T, cfg["vocab_size"])

    entries = ctx_ckpt_entries(model)
    ckpt_path = write_model_checkpoint(name, cfg, entries, "CtxModel")

    checks = {}
    p64 = {k: v.detach().double() for k, v in model.params().items()}
    eps = cfg["layer_norm_eps"]
    checks["block_F"] = check_block_vs_functional(p64, eps, torch.Generator().manual_seed(seed + 1000))
    checks["jacobi"] = jacobi_check(p64, p64["embed_in"][inputs], eps, name)
    if cfg["layer0_type"] == 1:
        checks["slots_dense_ring"] = check_ctxkv_attention(p64, cfg, inputs, targets)
        muts = dict(CTX_MUTATIONS["block"], **CTX_MUTATIONS["ctxkv"])
    else:
        checks["hf_neox"] = check_ctxpythia_vs_hf_neox(p64, cfg, inputs)
        muts = dict(CTX_MUTATIONS["block"], **CTX_MUTATIONS["ctxpythia"])
    with torch.no_grad():
        base = ctx_forward(p64, cfg, inputs)
        print("    mutations (each must move the logits by > 1e-4):")
        for what, kw in muts.items():
            dm = (ctx_forward(p64, cfg, inputs, **kw) - base).abs().max().item()
            print(f"        {what:<40} max|dlogit| {dm:.3e}")
            assert dm > 1e-4, f"the reference would not catch: {what}"
    # the contexts are constants: back-propagating through the recurrence must change the grads
    gr = {}
    for through in (False, True):
        q = {k: v.clone().requires_grad_(True) for k, v in p64.items()}
        loss = ce_loss(ctx_forward(q, cfg, inputs, grad_through_contexts=through), targets)
        g = torch.autograd.grad(loss, list(q.values()), allow_unused=True)
        gr[through] = {k: (torch.zeros_like(v) if x is None else x) for (k, v), x in zip(q.items(), g)}
    dg = max((gr[True][k] - gr[False][k]).abs().max().item() for k in p64)
    gb = max(gr[True][k].abs().max().item() for k in CTX_BLOCK_NAMES)
    print(f"    gradient through the recurrence instead of constants: max|dgrad| {dg:.3e} "
          f"(block grads would be up to {gb:.3e} instead of 0)")
    assert dg > 1e-4 and gb > 1e-4

    ref = make_reference(name, model, ctx_ckpt_entries, ckpt_path, inputs, targets, dict(HYPER),
                         REF_DIR / f"{name}_state.bin", frozen=CTX_FROZEN[name])
    # exact zeros exactly for the frozen tensors
    off = 0
    for n, p, prow in entries:
        k = (prow or p.shape[0]) * int(np.prod(p.shape[1:], dtype=np.int64))
        g = ref["grads"][off:off + k]
        assert (not g.any()) == (n in CTX_FROZEN[name]), f"{n}: zero gradient iff frozen"
        off += k
    print(f"[{name}] gradients exactly 0 for (and only for): {', '.join(CTX_FROZEN[name])}")
    ref["cfg"], ref["checks"] = cfg, checks
    return ref


# ---- phase 1: the ContextBlock and the OACD loss (dev/ref/ctxblock_state.bin)

def oacd_loss(X, slice_rows, lam, squared=False):
    """OACD loss of the rows of X [N, d_c], per slice of slice_rows consecutive rows (the last
    one may be shorter), averaged over the slices (each slice weighs the same):
        L_slice = -||X_s - 1 mu^T||_F / n + lam * ||mu||^2,  mu = mean of the n rows of X_s
    (Frobenius norm, not squared; squared=True is the mistake, for the checks)."""
    terms = []
    for a in range(0, X.shape[0], slice_rows):
        Xs = X[a:a + slice_rows]
        n = Xs.shape[0]
        mu = Xs.mean(0)
        dev2 = ((Xs - mu) ** 2).sum()
        terms.append(-(dev2 if squared else torch.sqrt(dev2)) / n + lam * (mu * mu).sum())
    return torch.stack(terms).mean()


def oacd_grad_closed_form(X, slice_rows, lam):
    """d L / d X: per slice (n rows, deviation Dv = X_s - 1 mu^T, F = ||Dv||_F) the rows get
    (-Dv / (n F) + 2 lam mu / n) / n_slices."""
    G = torch.zeros_like(X)
    ns = (X.shape[0] + slice_rows - 1) // slice_rows
    for a in range(0, X.shape[0], slice_rows):
        Xs = X[a:a + slice_rows]
        n = Xs.shape[0]
        mu = Xs.mean(0)
        Dv = Xs - mu
        G[a:a + slice_rows] = (-Dv / (n * torch.sqrt((Dv ** 2).sum())) + 2 * lam * mu / n) / ns
    return G


class CtxBlockParams(torch.nn.Module):
    """The ContextBlock tensors (file order) and the embed_in [V, E] it reads (frozen)."""

    def __init__(self, E, dc, V):
        super().__init__()
        for n, s in ctx_block_shapes(E, dc):
            self.register_parameter(n, torch.nn.Parameter(torch.zeros(s)))
        self.embed_in = torch.nn.Parameter(torch.zeros(V, E))


def write_ctxblock_state(path, cb, block, embed_in, tokens, S, O, loss, grads, cseq):
    """dev/ref/ctxblock_state.bin, the phase-1 reference. Little-endian; floats are float32.

    header, 256 int32:
        0 magic 20261127, 1 version 1, 2 B, 3 T, 4 E (embed_dim), 5 d_c (context_dim),
        6 Vp (rows of the embed_in below), 7 V (real vocabulary rows), 8 slice (OACD slice
        rows), 9 lambda (centroid weight, float32 bits), 10..255 zero
    then, in this order:
        ctx_ln_e_w [E], ctx_ln_e_b [E], ctx_w [d_c, d_c+E], ctx_b [d_c], ctx_ln_c_w [d_c],
        ctx_ln_c_b [d_c]                 the ContextBlock (the context block file's order)
        embed_in   [Vp, E]               rows V..Vp-1 zero (frozen in phase 1: no gradient)
        tokens     int32 [B, T]
        S          [B, T, d_c]           the shifted-context input (stands for shift(P) + noise)
        O          [B, T, d_c]           ContextBlock(S, E) for all positions at once:
                                         O_t = LN_c(S_t + GELU(W_c [S_t ; LN_e(e_t)] + b_c))
        loss       [1]                   OACD(O): rows r = b*T + t, slices of `slice` consecutive
                                         rows [0, slice), [slice, 2 slice), ... (the last may be
                                         shorter; slices run across batch rows), each
                                         -||X - 1mu^T||_F / n + lambda ||mu||^2, mean over slices
        grads      d loss / d (ctx_ln_e_w, ctx_ln_e_b, ctx_w, ctx_b, ctx_ln_c_w, ctx_ln_c_b),
                   shapes as above
        Cseq       [B, T, d_c]           the sequential recurrence c_t = ContextBlock(c_{t-1}, e_t)
                                         with c_{-1} = 0 at the start of every row b
    """
    B, T, E, dc = cb["B"], cb["T"], cb["E"], cb["d_c"]
    Vp, V = cb["padded_vocab_size"], cb["vocab_size"]
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[:10] = [CTXBLOCK_MAGIC, CTXBLOCK_VERSION, B, T, E, dc, Vp, V, cb["slice"], f32bits(cb["centroid_weight"])]
    parts = [h.tobytes()]
    shapes = ctx_block_shapes(E, dc)
    for (n, s), a in zip(shapes, block):
        assert a.shape == s, (n, a.shape, s)
        parts.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
    assert embed_in.shape == (Vp, E) and not embed_in[V:].any()
    parts.append(np.ascontiguousarray(embed_in, dtype="<f4").tobytes())
    assert tokens.shape == (B, T)
    parts.append(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
    for a in (S, O):
        assert a.shape == (B, T, dc)
        parts.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
    parts.append(np.array([loss], dtype="<f4").tobytes())
    for (n, s), a in zip(shapes, grads):
        assert a.shape == s, (n, a.shape, s)
        parts.append(np.ascontiguousarray(a, dtype="<f4").tobytes())
    assert cseq.shape == (B, T, dc)
    parts.append(np.ascontiguousarray(cseq, dtype="<f4").tobytes())
    with open(path, "wb") as f:
        for b in parts:
            f.write(b)


def read_ctxblock_state(path):
    """Read dev/ref/ctxblock_state.bin (layout: write_ctxblock_state), validating its size."""
    raw = np.fromfile(path, dtype=np.uint8)
    h = raw[: HEADER_INTS * 4].view("<i4")
    assert h[0] == CTXBLOCK_MAGIC and h[1] == CTXBLOCK_VERSION, f"{path}: bad magic/version {h[:2]}"
    assert not h[10:].any(), f"{path}: nonzero reserved header ints"
    B, T, E, dc, Vp, V, sl = (int(x) for x in h[2:9])
    shapes = ctx_block_shapes(E, dc)
    nb = sum(int(np.prod(s)) for _, s in shapes)
    expect = HEADER_INTS * 4 + 4 * (nb + Vp * E + B * T + 2 * B * T * dc + 1 + nb + B * T * dc)
    assert raw.size == expect, f"{path}: size {raw.size} != {expect}"
    o = HEADER_INTS * 4
    def take(shape, dt="<f4"):
        nonlocal o
        n = int(np.prod(shape))
        a = raw[o:o + 4 * n].view(dt).reshape(shape)
        o += 4 * n
        return a
    st = dict(B=B, T=T, E=E, d_c=dc, Vp=Vp, V=V, slice=sl, lam=bits2f32(h[9]))
    st["block"] = {n: take(s) for n, s in shapes}
    st["embed_in"] = take((Vp, E))
    st["tokens"] = take((B, T), "<i4")
    st["S"] = take((B, T, dc))
    st["O"] = take((B, T, dc))
    st["loss"] = float(take((1,))[0])
    st["grads"] = {n: take(s) for n, s in shapes}
    st["Cseq"] = take((B, T, dc))
    assert o == raw.size
    return st


def ctxblock_reference(args):
    """Phase-1 reference: the parallel (Jacobi) step O = ContextBlock(S, E) and its OACD loss
    and gradients w.r.t. the block; plus the sequential contexts; dev/ref/ctxblock_state.bin."""
    cb = CTXBLOCK
    B, T, E, dc, V, Vp = cb["B"], cb["T"], cb["E"], cb["d_c"], cb["vocab_size"], cb["padded_vocab_size"]
    eps, sl = cb["ln_eps"], cb["slice"]
    lam = bits2f32(f32bits(cb["centroid_weight"]))  # as stored (float32)
    print(f"=== ctxblock: B {B}, T {T}, E {E}, d_c {dc}, OACD slice {sl} rows, lambda {cb['centroid_weight']}")
    gen = torch.Generator().manual_seed(cb["seed"])
    mod = CtxBlockParams(E, dc, V)
    randomise_variant_(mod, gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    P = torch.randn(B, T, dc, generator=gen, dtype=torch.float64)
    noise = torch.randn(B, T, dc, generator=gen, dtype=torch.float64)
    S = (shift_contexts(P) + cb["noise_std"] * noise).float().double()       # float32-exact input
    p = {n: t.detach().double().requires_grad_(n != "embed_in") for n, t in mod.named_parameters()}
    emb = p["embed_in"][tokens]

    O = context_block(p, S, emb, eps)                                         # all positions at once
    X = O.reshape(B * T, dc)                                                  # row r = b*T + t
    loss = oacd_loss(X, sl, lam)
    names = list(CTX_BLOCK_NAMES)
    grads = torch.autograd.grad(loss, [p[n] for n in names], retain_graph=True)
    gX = torch.autograd.grad(loss, X)[0]
    with torch.no_grad():
        cseq = contexts_sequential(p, emb, eps)
        dX = (gX - oacd_grad_closed_form(X.detach(), sl, lam)).abs().max().item()
        sq = oacd_loss(X, sl, lam, squared=True).item()
        whole = oacd_loss(X, B * T, lam).item()
    slices = [(a, min(a + sl, B * T)) for a in range(0, B * T, sl)]
    print(f"    OACD loss {loss.item():.10f} over slices {slices} (mean of {len(slices)}); "
          f"squared norm would give {sq:.6f}, one slice of all {B * T} rows {whole:.6f}")
    print(f"    d loss / d O vs closed form: max diff {dX:.3e}")
    assert dX < 1e-14 and abs(sq - loss.item()) > 1e-3 and abs(whole - loss.item()) > 1e-4

    # gradcheck of the block gradients (finite differences, float64)
    def f(*ts):
        q = dict(p, **dict(zip(names, ts)))
        return oacd_loss(context_block(q, S, emb, eps).reshape(B * T, dc), sl, lam)
    ok = torch.autograd.gradcheck(f, tuple(p[n] for n in names), eps=1e-6, atol=1e-8, rtol=1e-6)
    print(f"    torch.autograd.gradcheck of the 6 block gradients: {ok}")
    chk = check_block_vs_functional({k: v.detach() for k, v in p.items()}, eps, torch.Generator().manual_seed(cb["seed"] + 1000))
    jd = jacobi_check({k: v.detach() for k, v in p.items()}, emb.detach(), eps, "ctxblock")
    print("    per-tensor gradients:")
    for n, g in zip(names, grads):
        print(f"        {n:<12} {str(tuple(g.shape)):<10} max|g| {g.abs().max().item():.4e}  norm {g.norm().item():.4e}")
        assert g.abs().max().item() > 0

    emb_pad = np.zeros((Vp, E), dtype=np.float64)
    emb_pad[:V] = p["embed_in"].detach().numpy()
    path = REF_DIR / "ctxblock_state.bin"
    REF_DIR.mkdir(parents=True, exist_ok=True)
    block = [p[n].detach().numpy() for n in names]
    write_ctxblock_state(path, cb, block, emb_pad, tokens.numpy(), S.numpy(), O.detach().numpy(),
                         loss.item(), [g.numpy() for g in grads], cseq.numpy())
    st = read_ctxblock_state(path)
    assert (st["B"], st["T"], st["E"], st["d_c"], st["Vp"], st["V"], st["slice"]) == (B, T, E, dc, Vp, V, sl)
    assert st["lam"] == np.float32(cb["centroid_weight"])
    assert all(np.array_equal(st["block"][n], a.astype(np.float32)) for n, a in zip(names, block))
    assert all(np.array_equal(st["grads"][n], g.numpy().astype(np.float32)) for n, g in zip(names, grads))
    assert np.array_equal(st["embed_in"], emb_pad.astype(np.float32)) and np.array_equal(st["tokens"], tokens.numpy())
    assert np.array_equal(st["S"].astype(np.float64), S.numpy())              # S is float32-exact
    assert np.array_equal(st["O"], O.detach().numpy().astype(np.float32))
    assert np.array_equal(st["Cseq"], cseq.numpy().astype(np.float32))
    assert st["loss"] == np.float32(loss.item())
    # the block parameters are fp16-exact: the stored float32 values are the ones used
    assert all(np.array_equal(st["block"][n].astype(np.float64), p[n].detach().numpy()) for n in names)
    nb = sum(a.size for a in block)
    print(f"[ctxblock] block parameters {nb:,} (+ embed_in {Vp}x{E}), loss {loss.item():.10f}, "
          f"grad norm {float(np.sqrt(sum((g.numpy() ** 2).sum() for g in grads))):.6f}")
    return dict(loss=loss.item(), block_params=nb, checks=dict(block_F=chk, jacobi=jd, oacd_grad=dX),
                grad_norm=float(np.sqrt(sum((g.numpy() ** 2).sum() for g in grads))))


def write_ctx_json():
    """dev/ref/ctx_variants.json: the Context-KV reference files, their header fields as
    stored (header words 0..23: embed_dim is word 23), frozen tensors, and the ctxblock layout."""
    ck = import_prepro("ckpt")
    B, T = VARIANT_BT
    out = {"about": "Context-KV reference files in dev/ref (doc/formats.md, Checkpoint / Context-KV; "
                    "ctxblock_state.bin: see dev/reference.py write_ctxblock_state). Float header "
                    "fields are float32 (the shortest decimal that rounds to the same float32); "
                    "header_int32 = header words 0..23. Generated by dev/reference.py.",
           "variants": {}}
    for name, (raw, _) in CTX_VARIANTS.items():
        cfg = ck.check_cfg(raw)
        fields, words = variant_header_json(cfg, last=23)
        model_path = REF_DIR / f"{name}_model.bin"
        if model_path.exists():
            disk = np.fromfile(model_path, dtype="<i4", count=HEADER_INTS)
            assert list(disk[: len(words)]) == words and not disk[len(words):].any(), \
                f"{model_path}: header differs from ctx_variants.json (stale file? rerun with --variants {name})"
        C, H, G = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
        D = C // H
        per_layer = [cfg["context_dim"] if l == 0 and cfg["layer0_type"] == 1 else 2 * G * D
                     for l in range(cfg["n_layer"])]
        out["variants"][name] = dict(
            model=f"dev/ref/{name}_model.bin", state=f"dev/ref/{name}_state.bin",
            layer0="ctxkv" if cfg["layer0_type"] == 1 else "same",
            model_type="ctxpythia" if cfg["model_type"] == 1 else "pythia",
            attn=ATTN_NAMES[cfg["attn_type"]], params=ck.num_params(cfg), B=B, T=T, head_dim=D,
            frozen_in_phase2=list(CTX_FROZEN[name]),
            kv_cache_floats_per_token_per_layer=per_layer,
            tensors=[n for n, _ in ck.param_specs(cfg)],
            header=fields, header_int32=words)
    cb = CTXBLOCK
    E, dc = cb["E"], cb["d_c"]
    out["ctxblock"] = dict(
        state="dev/ref/ctxblock_state.bin", magic=CTXBLOCK_MAGIC, version=CTXBLOCK_VERSION,
        B=cb["B"], T=cb["T"], E=E, d_c=dc, Vp=cb["padded_vocab_size"], V=cb["vocab_size"],
        slice=cb["slice"], centroid_weight=float(str(np.float32(cb["centroid_weight"]))),
        ln_eps=cb["ln_eps"], noise_std_of_S=cb["noise_std"],
        layout=[f"{n} float32 {list(s)}" for n, s in ctx_block_shapes(E, dc)]
        + [f"embed_in float32 [{cb['padded_vocab_size']}, {E}]", f"tokens int32 [{cb['B']}, {cb['T']}]",
           f"S float32 [{cb['B']}, {cb['T']}, {dc}]", f"O float32 [{cb['B']}, {cb['T']}, {dc}]", "loss float32 [1]"]
        + [f"d_{n} float32 {list(s)}" for n, s in ctx_block_shapes(E, dc)]
        + [f"Cseq float32 [{cb['B']}, {cb['T']}, {dc}]"])
    text = json.dumps(out, indent=2)
    text = re.sub(r'("(?:header_int32|tensors|frozen_in_phase2|kv_cache_floats_per_token_per_layer)": )\[([^\]]*)\]',
                  lambda m: m.group(1) + "[" + ", ".join(x.strip() for x in m.group(2).split(",")) + "]", text)
    assert json.loads(text) == out
    (REF_DIR / "ctx_variants.json").write_text(text + "\n")
    return out


# --------------------------------------------------------------------------------------
# Decode-time KV eviction (doc/kv_eviction.md): StreamingLLM and SnapKV as attention masks on
# the full forward, written here independently of the program. With original positions a
# policy is exactly a mask on the rows the decoder computes (t >= P, the prompt being P tokens):
#   streaming  row t sees s < sinks, and s > t - (budget - sinks)
#   snapkv     row t sees its unit's kept prompt positions and P..t; the kept positions are
#              chosen from the prefill's attention (rows < P are never masked, so one
#              unmasked pass gives them): score_u(s) = sum over the unit's heads and the last w
#              prompt queries of att[t, s], s < P - w; F.avg_pool1d(kernel, stride 1,
#              padding kernel // 2); topk(budget - w); then the window P - w .. P - 1.
# Units: mha each head, gqa each KV head (its query group summed), mla the token (all heads).

KV_EVICT_MAGIC, KV_EVICT_VERSION = 20261202, 1
KV_EVICT_POLICY = {"streaming": 1, "snapkv": 2}  # ctxkv/kvpolicy.h KVPolicyKind


def evict_load(path):
    """A ctxkv checkpoint as float64 tensors keyed as prepro/ckpt.py names them, embed rows cut to V."""
    ck = import_prepro("ckpt")
    cfg, t = ck.read_checkpoint(str(path))
    assert cfg["layer0_type"] == 0 and cfg["model_type"] == 0 and cfg.get("mla_rope_split", 1) in (0, 1)
    p = {n: torch.from_numpy(a.astype(np.float64)) for n, a in t.items()}
    V = cfg["vocab_size"]
    p["embed_in"], p["embed_out"] = p["embed_in"][:V], p["embed_out"][:V]
    return cfg, p


def evict_units(cfg):
    return {0: cfg["n_head"], 3: 1}.get(cfg["attn_type"], cfg["n_kv_head"])


def evict_attention(lp, cfg, h, allow):
    """One layer's attention on h [B, T, C] with the boolean mask allow [B, H, T, T] (True: may
    attend; causal already in it). Returns the output [B, T, C] and the probabilities."""
    B, T, C = h.shape
    a, H = cfg["attn_type"], cfg["n_head"]
    D = C // H
    if a == 3:
        dR, dc, eps = cfg["mla_rope_dim"], cfg["kv_rank"], cfg["rms_eps"]
        q = (h @ lp["q_w"].T if cfg["q_rank"] == 0 else
             rms_norm(h @ lp["q_a_w"].T, lp["q_a_norm_w"], eps) @ lp["q_b_w"].T).view(B, T, H, D + dR).transpose(1, 2)
        ckv = h @ lp["kv_a_w"].T
        lat = rms_norm(ckv[..., :dc], lp["kv_a_norm_w"], eps) if "kv_a_norm_w" in lp else ckv[..., :dc]
        cos, sin = rope_tables(dR, T, cfg["rope_base"])
        q_pe, k_pe = rope(q[..., D:], cos, sin, dR), rope(ckv[..., dc:], cos, sin, dR)
        kvb = (lat @ lp["kv_b_w"].T).view(B, T, H, 2 * D).transpose(1, 2)
        s = (q[..., :D] @ kvb[..., :D].transpose(-1, -2) + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)) / np.sqrt(D + dR)
        v = kvb[..., D:]
    else:
        R = cfg["rotary_dims"]
        if a == 0:
            qkv = (h @ lp["qkv_w"].T + lp["qkv_b"]).view(B, T, H, 3, D)
            q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        else:
            G = cfg["n_kv_head"]
            q = (h @ lp["q_w"].T + lp["q_b"]).view(B, T, H, D).transpose(1, 2)
            kv = h @ lp["kv_w"].T + lp["kv_b"]
            idx = torch.arange(H) // (H // G)                                   # query head -> KV head
            k = kv[..., :G * D].view(B, T, G, D).transpose(1, 2)[:, idx]
            v = kv[..., G * D:].view(B, T, G, D).transpose(1, 2)[:, idx]
        cos, sin = rope_tables(R, T, cfg["rope_base"])
        q, k = rope(q, cos, sin, R), rope(k, cos, sin, R)
        s = q @ k.transpose(-1, -2) / np.sqrt(D)
    att = torch.softmax(s.masked_fill(~allow, float("-inf")), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, T, H * D)
    return o @ lp["dense_w"].T + lp["dense_b"], att


def evict_forward(p, cfg, x, allow_fn):
    """Logits [B, T, V] and each layer's probabilities; allow_fn(l, att_unmasked) -> mask or
    None (causal). Each layer runs unmasked first, to give the policy its prefill attention."""
    B, T = x.shape
    eps, H = cfg["layer_norm_eps"], cfg["n_head"]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool)).expand(B, H, T, T)
    h = p["embed_in"][x]
    for l in range(cfg["n_layer"]):
        lp = {n.split(".", 2)[2]: t for n, t in p.items() if n.startswith(f"layers.{l}.")}
        h1 = layer_norm(h, lp["ln1_w"], lp["ln1_b"], eps)
        a, att = evict_attention(lp, cfg, h1, causal)
        allow = allow_fn(l, att)
        if allow is not None:
            a, _ = evict_attention(lp, cfg, h1, causal & allow)
        h2 = layer_norm(h, lp["ln2_w"], lp["ln2_b"], eps)
        u = h2 @ lp["fc_w"].T + lp["fc_b"]
        h = h + a + (0.5 * u * (1.0 + torch.erf(u / np.sqrt(2.0)))) @ lp["proj_w"].T + lp["proj_b"]
    return layer_norm(h, p["lnf_w"], p["lnf_b"], eps) @ p["embed_out"].T


def snapkv_keep(att, cfg, P, budget, window, pool):
    """The kept prompt positions [B, units, budget] (sorted) from one layer's probabilities,
    and the smallest gap between the last kept and the first dropped pooled score."""
    B, H = att.shape[:2]
    U, w = evict_units(cfg), min(window, P)
    n = P - w
    votes = att[:, :, P - w:P, :n].sum(-2)                                      # [B, H, n]
    votes = votes.view(B, U, H // U, n).sum(2)                                  # summed over each unit's heads
    pooled = F.avg_pool1d(votes.reshape(B * U, 1, n), pool, stride=1, padding=pool // 2).view(B, U, n)
    top = pooled.topk(budget - w, dim=-1)
    srt = pooled.sort(dim=-1, descending=True).values
    gap = (srt[..., budget - w - 1] - srt[..., budget - w]).min().item()
    keep = torch.cat([top.indices.sort(-1).values, torch.arange(n, P).expand(B, U, w)], -1)
    return keep, gap


def evict_case(model, policy, P, budget, sinks, window, pool, T, gen):
    cfg, p = evict_load(REF_DIR / model)
    B, H, U = 2, cfg["n_head"], evict_units(cfg)
    x = torch.randint(0, cfg["vocab_size"], (B, T), generator=gen)
    rows = torch.arange(T)[:, None] >= P                                       # the decoded rows
    kept = []
    if policy == "streaming":
        W, s, t = budget - sinks, torch.arange(T)[None, :], torch.arange(T)[:, None]
        allow = ~rows | (s < sinks) | (s > t - W)
        fn = lambda l, att: allow.expand(B, H, T, T)
    else:
        gaps = []

        def fn(l, att):
            keep, gap = snapkv_keep(att, cfg, P, budget, window, pool)
            kept.append(keep)
            gaps.append(gap)
            mine = torch.zeros(B, U, T, dtype=torch.bool)
            mine.scatter_(2, keep, True)
            mine[:, :, P:] = True                                               # the decoded tokens are appended
            mine = mine[:, torch.arange(H) // (H // U)]                          # [B, H, T] per query head
            return ~rows[None, None] | mine[:, :, None, :]
    with torch.no_grad():
        logits = evict_forward(p, cfg, x, fn)
        full = evict_forward(p, cfg, x, lambda l, att: None)
    if policy == "snapkv":
        assert min(gaps) > 1e-5, f"{model}: a selection tie within {min(gaps):.2e}; choose another seed"
    diff = (logits[:, P:] - full[:, P:]).abs().max().item()
    assert diff > 1e-3, f"{model} {policy}: eviction left the logits unchanged ({diff:.1e}); the test could not fail"
    print(f"    {model:<16} {policy:<9} P {P:2d} T {T} budget {budget} sinks {sinks} window {window} pool {pool}: "
          f"logits differ from the full cache by {diff:.3f}" + (f", selection gap {min(gaps):.2e}" if kept else ""))
    return dict(model=f"dev/ref/{model}", policy=policy, budget=budget, sinks=sinks, window=window, pool=pool,
                B=B, T=T, P=P, L=cfg["n_layer"], units=U, V=cfg["vocab_size"], tokens=x,
                kept=torch.stack(kept, 0) if kept else None, logits=logits[:, P - 1:T - 1])


def kv_eviction_reference(args):
    """dev/ref/kv_eviction.bin: per case, the tokens, the SnapKV kept positions per layer,
    sequence and unit, and the logits of rows P-1 .. T-2 (what prefill and decoding give)."""
    print("=== kv eviction: StreamingLLM and SnapKV as masks on the full forward (float64)")
    gen = torch.Generator().manual_seed(SEED + 7)
    cases = []
    for model in ("tiny_model.bin", "gqa_model.bin", "mla_model.bin"):
        cases.append(evict_case(model, "snapkv", 16, 8, 4, 3, 5, 24, gen))
        cases.append(evict_case(model, "streaming", 3, 8, 2, 32, 5, 24, gen))   # the pure sink + window mask
        cases.append(evict_case(model, "streaming", 16, 8, 2, 32, 5, 24, gen))  # the prefill evicts too
    out = bytearray(np.array([KV_EVICT_MAGIC, KV_EVICT_VERSION, len(cases)], "<i4").tobytes())
    for c in cases:
        name = c["model"].encode()
        assert len(name) < 32
        out += name + b"\0" * (32 - len(name))
        K = c["budget"] if c["kept"] is not None else 0
        out += np.array([KV_EVICT_POLICY[c["policy"]], c["budget"], c["sinks"], c["window"], c["pool"], c["B"],
                         c["T"], c["P"], c["L"], c["units"], K, c["V"]], "<i4").tobytes()
        out += c["tokens"].numpy().astype("<i4").tobytes()
        if K:
            out += c["kept"].numpy().astype("<i4").tobytes()                    # [L, B, units, budget]
        out += c["logits"].numpy().astype("<f4").tobytes()                       # [B, T - P, V]
    (REF_DIR / "kv_eviction.bin").write_bytes(bytes(out))
    print(f"[kv eviction] {len(cases)} cases, {len(out):,} B")


def main():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    names = ["mha"] + list(VARIANTS) + CTX_NAMES + ["kv_eviction"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poll", type=int, default=60, help="seconds between checks for prepro/import_hf.py")
    ap.add_argument("--variants", default="all",
                    help=f"comma-separated subset of {','.join(names)} to regenerate (default all; "
                         f"mha = the HF GPT-NeoX reference tiny_*.bin; ctxkv, ctxpythia = "
                         f"<name>_{{model,state}}.bin; ctxblock = ctxblock_state.bin)")
    args = ap.parse_args()
    todo = names if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in todo if v not in names]
    if bad or not todo:
        ap.error(f"--variants: unknown {bad} (choose from {','.join(names)} or all)")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-reproducible reductions
    if "mha" in todo:
        pythia_tiny(args)

    refs = {}
    for name in VARIANTS:
        if name in todo:
            refs[name] = variant_reference(name, args)
    ctx_refs = {}
    for name in CTX_NAMES:
        if name in todo:
            ctx_refs[name] = ctxblock_reference(args) if name == "ctxblock" else ctx_reference(name, args)
    if "kv_eviction" in todo:
        kv_eviction_reference(args)
    write_variants_json()
    write_ctx_json()
    if refs:
        print("variant summary (B, T = %d, %d):" % VARIANT_BT)
        print(f"    {'name':<6} {'attn':<4} {'params':>7} {'loss':>13} {'grad norm':>10} "
              f"{'loss step 9':>13}  clipping active on")
        for name, r in refs.items():
            print(f"    {name:<6} {ATTN_NAMES[r['cfg']['attn_type']]:<4} {r['P']:>7,} {r['loss']:>13.9f} "
                  f"{r['grad_norm']:>10.6f} {r['losses'][-1]:>13.9f}  "
                  f"{sum(r['clipped'])}/{len(r['clipped'])} steps (norms "
                  + " ".join(f"{n:.3f}" for n in r["norms"]) + ")")
        print("    checks (max abs diff; hf_deepseek_v2 relative): " + "; ".join(
            f"{name} " + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()) for name, r in refs.items()))

    if ctx_refs:
        print("Context-KV summary (B, T = %d, %d):" % VARIANT_BT)
        for name, r in ctx_refs.items():
            if name == "ctxblock":
                print(f"    ctxblock  block params {r['block_params']:,}  OACD loss {r['loss']:.9f}  "
                      f"grad norm {r['grad_norm']:.6f}  checks " + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()))
                continue
            print(f"    {name:<9} params {r['P']:,}  loss {r['loss']:.9f}  grad norm {r['grad_norm']:.6f}  "
                  f"loss step 9 {r['losses'][-1]:.9f}  clipping {sum(r['clipped'])}/{len(r['clipped'])} steps  checks "
                  + ", ".join(f"{k} {v:.1e}" for k, v in r["checks"].items()))

    total = 0
    print("files in dev/ref:")
    for p in sorted(REF_DIR.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"    {p.relative_to(REPO)}  {p.stat().st_size:,} B")
    print(f"    total {total:,} B")
    assert total < 2_500_000, "dev/ref must stay under 2.5 MB"
    print("all reference checks passed")


if __name__ == "__main__":
    main()
