"""Dev-only check of prepro/import_hf.py against real transformers checkpoints.

Needs torch and transformers (not in prepro/requirements.txt):
    devvenv/bin/python prepro/test_import_hf.py
Builds a small random GPTNeoXForCausalLM, saves it in several ways (safetensors fp32, fp16,
bf16, sharded, Pythia-style pytorch_model.bin with the old config keys and buffers), converts
each and checks every tensor against the HF state dict; then checks that bad folders are
refused with a clear error. Prints PASS/FAIL lines and 'N passed, N failed'.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
import torch  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from ckpt import read_checkpoint  # noqa: E402
from common import PreproError  # noqa: E402
from import_hf import LAYER_NAMES, convert  # noqa: E402

warnings.filterwarnings("ignore")
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}: {name}{'' if ok else '  -- ' + detail}", flush=True)


def make_model(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    args = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                vocab_size=120, rotary_pct=0.25, max_position_embeddings=256)
    args.update(kw)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**args))
    with torch.no_grad():  # random everything, so a swapped LN weight/bias would show
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(dtype)


def hf_state(model):
    """HF state dict with the saved ('original format') names, as float32 numpy."""
    out = {}
    for k, v in model.state_dict().items():
        k = "embed_out.weight" if k == "lm_head.weight" else k
        if v.is_floating_point() and not k.endswith(("attention.bias", "masked_bias", "inv_freq")):
            out[k] = v.float().numpy()
    return out


def compare(name, model, out_path, expect):
    """Check the converted checkpoint against the model's tensors and expected cfg values."""
    cfg, t = read_checkpoint(out_path)
    sd = hf_state(model)
    V = cfg["vocab_size"]
    pairs = [("embed_in", "gpt_neox.embed_in.weight"), ("embed_out", "embed_out.weight"),
             ("lnf_w", "gpt_neox.final_layer_norm.weight"), ("lnf_b", "gpt_neox.final_layer_norm.bias")]
    for l in range(cfg["n_layer"]):
        pairs += [(f"layers.{l}.{a}", f"gpt_neox.layers.{l}.{b}") for a, b in LAYER_NAMES.items()]
    bad = []
    for ours, theirs in pairs:
        a, b = t[ours], sd.pop(theirs)
        if ours in ("embed_in", "embed_out"):
            if np.any(a[V:] != 0):
                bad.append(f"{ours} padding rows not zero")
            a = a[:V]
        if a.shape != b.shape or not np.array_equal(a, b):
            bad.append(f"{ours} != {theirs}")
    if sd:
        bad.append(f"HF tensors not compared: {sorted(sd)}")
    for k, v in expect.items():
        if not np.isclose(cfg[k], v, rtol=1e-6, atol=0):
            bad.append(f"cfg {k} = {cfg[k]}, expected {v}")
    check(name, not bad, "; ".join(bad[:5]))


def expect_error(name, hf_dir, words):
    """convert() must raise PreproError mentioning every word in words."""
    try:
        convert(hf_dir, os.path.join(hf_dir, "out.bin"), verbose=False)
        check(name, False, "no error raised")
    except PreproError as e:
        check(name, all(w in str(e) for w in words), f"message lacks {words}: {e}")


def edit_config(hf_dir, drop=(), **set_):
    p = os.path.join(hf_dir, "config.json")
    with open(p) as f:
        c = json.load(f)
    for k in drop:
        c.pop(k, None)
    c.update(set_)
    with open(p, "w") as f:
        json.dump(c, f, indent=2)


def main():
    tmp = tempfile.mkdtemp(prefix="test_import_hf_")
    base = dict(vocab_size=120, padded_vocab_size=128, n_layer=2, n_head=4, n_embd=64, n_inner=128,
                rotary_dims=4, rope_base=10000.0, max_seq_len=256, layer_norm_eps=1e-5)

    # 1-3: safetensors in fp32, fp16 (values must equal the fp16 ones exactly), bf16
    for tag, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m = make_model(dtype)
        d = os.path.join(tmp, "st_" + tag)
        m.save_pretrained(d)
        convert(d, os.path.join(d, "out.bin"), verbose=(tag == "fp32"))  # prints one summary
        compare(f"safetensors {tag}", m, os.path.join(d, "out.bin"), base)

    # 4: sharded safetensors (model.safetensors.index.json)
    m = make_model()
    d = os.path.join(tmp, "st_sharded")
    m.save_pretrained(d, max_shard_size="40KB")
    n_shards = len([f for f in os.listdir(d) if f.endswith(".safetensors")])
    convert(d, os.path.join(d, "out.bin"), verbose=False)
    compare(f"sharded safetensors ({n_shards} files)", m, os.path.join(d, "out.bin"), base)

    # 5: the in-memory names of transformers 5 (lm_head.weight instead of embed_out.weight)
    d = os.path.join(tmp, "st_lm_head")
    try:
        m.save_pretrained(d, save_original_format=False)
    except TypeError:  # transformers 4 has no such option and always writes embed_out
        m.save_pretrained(d)
    convert(d, os.path.join(d, "out.bin"), verbose=False)
    compare("safetensors with lm_head name", m, os.path.join(d, "out.bin"), base)

    # 6: Pythia-style: pytorch_model.bin in fp16 with the causal-mask/inv_freq buffers, and
    # the old config keys (rotary_pct, rotary_emb_base), here with other values
    m = make_model(torch.float16, rotary_pct=0.5, rope_theta=500.0)
    d = os.path.join(tmp, "bin_pythia")
    m.save_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors"))
    sd = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in m.state_dict().items()}
    for l in range(2):
        p = f"gpt_neox.layers.{l}.attention."
        sd[p + "bias"] = torch.tril(torch.ones(256, 256, dtype=torch.bool)).view(1, 1, 256, 256)
        sd[p + "masked_bias"] = torch.tensor(-1e9)
        sd[p + "rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    edit_config(d, drop=("rope_parameters",), rotary_pct=0.5, rotary_emb_base=500,
                torch_dtype="float16")
    convert(d, os.path.join(d, "out.bin"), verbose=False)
    compare("pytorch_model.bin fp16, old config keys, buffers", m, os.path.join(d, "out.bin"),
            dict(base, rotary_dims=8, rope_base=500.0))

    # 7: the CLI
    d = os.path.join(tmp, "st_fp32")
    r = subprocess.run([sys.executable, os.path.join(HERE, "import_hf.py"), d, os.path.join(tmp, "cli.bin")],
                       capture_output=True, text=True)
    check("CLI converts", r.returncode == 0 and os.path.isfile(os.path.join(tmp, "cli.bin")), r.stderr)
    r = subprocess.run([sys.executable, os.path.join(HERE, "import_hf.py"), os.path.join(tmp, "nope"),
                        os.path.join(tmp, "x.bin")], capture_output=True, text=True)
    check("CLI: missing folder exits 1 with 'error:'",
          r.returncode == 1 and "error:" in r.stderr and "nope" in r.stderr, r.stderr)

    # 8: refused configs and broken weights
    m = make_model()
    cases = [("tie_word_embeddings", dict(tie_word_embeddings=True)),
             ("use_parallel_residual", dict(use_parallel_residual=False)),
             ("hidden_act", dict(hidden_act="gelu_new")),
             ("attention_bias", dict(attention_bias=False)),
             ("model_type", dict(model_type="llama"))]
    for key, change in cases:
        d = os.path.join(tmp, "bad_" + key)
        m.save_pretrained(d)
        edit_config(d, **change)
        expect_error(f"refuses {key}={list(change.values())[0]}", d, [key, "config.json"])

    d = os.path.join(tmp, "bad_shape")
    m.save_pretrained(d)
    edit_config(d, vocab_size=130)
    expect_error("wrong shape names the tensor", d, ["gpt_neox.embed_in.weight", "[120, 64]", "[130, 64]"])

    from safetensors.torch import save_file
    d = os.path.join(tmp, "bad_missing")
    m.save_pretrained(d)
    sd = {k: v for k, v in hf_state_torch(m).items() if "layers.1.mlp.dense_4h_to_h.bias" not in k}
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    expect_error("missing tensor is named", d, ["gpt_neox.layers.1.mlp.dense_4h_to_h.bias", "missing"])

    d = os.path.join(tmp, "bad_truncated")
    m.save_pretrained(d)
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    expect_error("truncated safetensors", d, ["model.safetensors", "truncated"])

    d = os.path.join(tmp, "bad_noweights")
    m.save_pretrained(d)
    os.remove(os.path.join(d, "model.safetensors"))
    expect_error("no weight file", d, ["no model.safetensors"])

    shutil.rmtree(tmp)
    n_ok = sum(results)
    print(f"{n_ok} passed, {len(results) - n_ok} failed")
    sys.exit(0 if n_ok == len(results) else 1)


def hf_state_torch(model):
    return {("embed_out.weight" if k == "lm_head.weight" else k): v.contiguous()
            for k, v in model.state_dict().items()}


if __name__ == "__main__":
    main()
