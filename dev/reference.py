#!/usr/bin/env python3
"""
Reference-state generator for test_ctxkv (dev only; needs dev/requirements-dev.txt).

    /work/devvenv/bin/python dev/reference.py            # writes dev/ref/*

Ground truth is Hugging Face `transformers` GPTNeoXForCausalLM. For each model variant
this script:
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

Everything is seeded; two runs produce byte-identical files.

Adding a variant (GQA, MQA, MLA, Context-KV): write a `build_<name>()` returning the
PyTorch model, a `<name>_ckpt_entries(model)` listing its parameters in checkpoint order
(see `pythia_ckpt_entries`), get its checkpoint from the converter / prepro/ckpt.py, and
call `make_reference(...)` from a `<name>_tiny()` job run by main(); `write_state`,
`read_state`, `run_adamw`, `ce_loss`, `make_batch` and the checks are shared.

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
               "model_type", "context_dim", "context_interval", "max_contexts"]
CKPT_FLOAT_FIELDS = {"rope_base", "layer_norm_eps"}


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
    if hd["attn_type"] == 0 and hd["model_type"] == 0:
        own = mha_param_count(hd)
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


def run_adamw(model, params_in_order, loss_fn, hyper):
    """S steps of torch.optim.AdamW on loss_fn(model); returns (losses, grad_norms, clipped).

    losses[s] is the loss before update s. Weight decay only on tensors with dim() == 2.
    Gradients are clipped with clip_grad_norm_(params, grad_clip) before each step when
    grad_clip > 0 (torch: g *= min(1, clip / (norm + 1e-6))). `model` is modified.
    """
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


def make_reference(name, model, entries_fn, ckpt_path, inputs, targets, hyper, state_path):
    """Shared part: float64 logits/loss/grads, AdamW steps, state file, checks.

    model:      float32 PyTorch model (fp16-exact parameters), attention set to fp64-exact
    entries_fn: model -> [(ckpt_name, param, padded_rows)] in checkpoint order
    ckpt_path:  the converted checkpoint of this model (checked against the parameters)
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
    params = [p for _, p, _ in entries_fn(m_opt)]
    losses, norms, clipped = run_adamw(
        m_opt, params, lambda m: forward_loss(m, inputs, targets)[1], hyper)
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


def main():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--poll", type=int, default=60, help="seconds between checks for prepro/import_hf.py")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-reproducible reductions
    pythia_tiny(args)

    total = 0
    print("files in dev/ref:")
    for p in sorted(REF_DIR.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            print(f"    {p.relative_to(REPO)}  {p.stat().st_size:,} B")
    print(f"    total {total:,} B")
    assert total < 1_000_000, "dev/ref must stay under 1 MB"
    print("all reference checks passed")


if __name__ == "__main__":
    main()
