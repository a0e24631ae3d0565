"""Tests of the data scripts; need only numpy and tokenizers (the prepro venv):
    .venv/bin/python prepro/test_prepro.py
Prints PASS/FAIL lines and 'N passed, N failed'; exits 1 on any failure. The Gutenberg
checks run when the shared data folder is there (../shared/data).
"""
import contextlib
import gzip
import io
import os
import random
import re
import subprocess
import sys
import tempfile
import unicodedata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ckpt  # noqa: E402
import mqar  # noqa: E402
import export_hf  # noqa: E402
import import_hf  # noqa: E402
import tokenize_text as tt  # noqa: E402
from common import (REPO_ROOT, PreproError, load_tokenizer, read_shard, read_token_table,  # noqa: E402
                    token_bytes, write_shard, write_token_table)

results = []
TMP = tempfile.mkdtemp(prefix="test_prepro_")
tok = load_tokenizer()


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}: {name}{'' if ok else '  -- ' + str(detail)}", flush=True)


def raises(fn, *words):
    """True if fn() raises PreproError/ValueError whose message has all the words."""
    try:
        fn()
    except (PreproError, ValueError) as e:
        return all(w in str(e) for w in words)
    return False


def tmp(name):
    return os.path.join(TMP, name)


def encode_docs(docs):
    """Reference: <|endoftext|> then each whole document encoded in one go."""
    out = []
    for d in docs:
        out.append(0)
        out += tok.encode(d, add_special_tokens=False).ids
    return np.array(out, dtype=np.uint16)


def split_after(text, pattern):
    """Reference document split: each document ends right after a (non-empty) match."""
    docs, start = [], 0
    for m in re.finditer(pattern, text):
        if m.end() > m.start():
            docs.append(text[start:m.end()])
            start = m.end()
    return docs + ([text[start:]] if text[start:] else [])


def run_tokenize(args):
    """tokenize_text.main() in this process (so its chunk sizes can be shrunk)."""
    argv, sys.argv = sys.argv, ["tokenize_text.py"] + args
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tt.main()
    finally:
        sys.argv = argv


def shards(prefix):
    """The shards of a prefix in token order: PREFIX_val.bin first, then PREFIX_000000.bin, ..."""
    files = sorted((not f.endswith("_val.bin"), f) for f in os.listdir(os.path.dirname(prefix))
                   if f.startswith(os.path.basename(prefix) + "_"))
    return [os.path.join(os.path.dirname(prefix), f) for _, f in files]


def random_text(rng, n):
    """Text that hits the tokenizer's corners: newline and space runs, NFD accents, CJK."""
    atoms = ["the", " cat", "Hello", ",", ".", " ", "  ", "     ", "\t", "\n", "\n\n", "\n\n\n",
             " \n", "\n ", "don't", "123", " 4.5", "é", "e\u0301", "日本語", "😀", "--", "'s"]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_shards():
    p = tmp("s.bin")
    ids = np.array([0, 1, 50276, 65535, 7], dtype=np.int64)
    write_shard(p, ids)
    check("shard round trip", np.array_equal(read_shard(p), ids) and os.path.getsize(p) == 1024 + 10
          and not os.path.exists(p + ".tmp"))
    check("shard rejects id 65536", raises(lambda: write_shard(tmp("t.bin"), [1, 65536]), "t.bin", "uint16"))
    with open(p, "rb") as f:
        data = f.read()
    with open(tmp("trunc.bin"), "wb") as f:
        f.write(data[:-1])
    check("truncated shard", raises(lambda: read_shard(tmp("trunc.bin")), "trunc.bin", "truncated"))
    with open(tmp("magic.bin"), "wb") as f:
        f.write(b"\x01" + data[1:])
    check("wrong magic", raises(lambda: read_shard(tmp("magic.bin")), "magic.bin", "magic"))


def test_token_table(texts):
    p = tmp("tokenizer.bin")
    with contextlib.redirect_stdout(io.StringIO()):
        n = write_token_table(p, tok)
    table, eot = read_token_table(p)
    full = token_bytes(tok)
    long_ids = [i for i, b in enumerate(full) if len(b) > 255]
    check("token table has all 50277 ids, eot 0", n == len(table) == 50277 and eot == 0)
    check("every token stored exactly, including the 5 longer than 255 bytes",
          long_ids == [7421, 16525, 19979, 32399, 44919]
          and all(table[i] == full[i] for i in range(n)))
    check("token table: special and space tokens literal",
          table[0] == b"<|endoftext|>" and table[1] == b"<|padding|>" and table[50276] == b"  "
          and table[50254] == b" " * 24 and table[187] == b"\n")
    for name, text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        got = b"".join(table[i] for i in ids)
        check(f"token table bytes reproduce {name}", got == unicodedata.normalize("NFC", text).encode())


def test_tinyshakespeare():
    out = tmp("ts/shards")
    r = subprocess.run([sys.executable, os.path.join(HERE, "tinyshakespeare.py"), "--out-dir", out],
                       capture_output=True, text=True)
    if r.returncode:
        return check("tinyshakespeare.py runs", False, r.stderr)
    val = read_shard(os.path.join(out, "tiny_shakespeare_val.bin"))
    train = read_shard(os.path.join(out, "tiny_shakespeare_train.bin"))
    with open(os.path.join(REPO_ROOT, "data", "vendor", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    sections = text.split("\n\n")  # llm.c's recipe
    ref = encode_docs([s + "\n\n" for s in sections[:-1]] + sections[-1:])
    check("tinyshakespeare: 32768 val tokens, rest train, as llm.c's recipe",
          len(val) == 32768 and np.array_equal(np.concatenate([val, train]), ref),
          f"val {len(val)} train {len(train)} ref {len(ref)}")
    check("tinyshakespeare writes the table beside the shard folder",
          os.path.isfile(tmp("ts/tokenizer.bin")))
    r = subprocess.run([sys.executable, os.path.join(HERE, "tinyshakespeare.py"), "--input", tmp("nope.txt"),
                        "--out-dir", out], capture_output=True, text=True)
    check("tinyshakespeare: missing input exits 1 naming it", r.returncode == 1 and "nope.txt" in r.stderr, r.stderr)


def test_tokenize_text():
    rng = random.Random(1)
    docs_text = random_text(rng, 3000)
    with open(tmp("a.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(docs_text)
    with gzip.open(tmp("b.txt.gz"), "wt", encoding="utf-8", newline="") as f:
        f.write(docs_text[::-1])
    saved = tt.READ_CHARS, tt.PIECE_CHARS, tt.SEP_TAIL
    for read, piece, tail in ((7, 13, 8), (101, 64, 16), saved):
        tt.READ_CHARS, tt.PIECE_CHARS, tt.SEP_TAIL = read, piece, tail
        tag = f"(read {read}, piece {piece})"
        for sep, pattern in (("blank", r"\n\n"), ("regex:\\n{3,}", r"\n{3,}"), ("regex:(?m)^", None),
                             ("file", None)):
            prefix = tmp(f"tt_{read}/{sep.replace(':', '').replace('{', '').replace('}', '')}")
            run_tokenize(["--input", tmp("a.txt"), tmp("b.txt.gz"), "--out", prefix, "--doc-sep", sep,
                          "--shard-size", "500", "--batch-chars", "300"])
            if sep == "file" or pattern is None:  # (?m)^ only matches empty strings: no split
                docs = [docs_text, docs_text[::-1]]
            else:
                docs = split_after(docs_text, pattern) + split_after(docs_text[::-1], pattern)
            files = shards(prefix)
            got = np.concatenate([read_shard(f) for f in files])
            check(f"tokenize_text --doc-sep {sep} {tag}",
                  np.array_equal(got, encode_docs(docs)) and all(len(read_shard(f)) == 500 for f in files[:-1]),
                  f"{len(got)} tokens vs {len(encode_docs(docs))}")
    tt.READ_CHARS, tt.PIECE_CHARS, tt.SEP_TAIL = saved

    # books: a made-up gutenberg_valid.txt and its manifest
    books = [random_text(rng, k).strip("\n") + "\n" for k in (50, 400, 3, 900)]
    d = tmp("gut")
    os.makedirs(d)
    with open(os.path.join(d, "gutenberg_valid.txt"), "w", encoding="utf-8", newline="") as f:
        f.write("".join(b + "\n" for b in books))
    with open(os.path.join(d, "manifest.tsv"), "w") as f:
        f.write("split\tclean_chars\n" + "".join(f"valid\t{len(b)}\n" for b in books) + "train\t5\n")
    tt.READ_CHARS, tt.PIECE_CHARS = 11, 17
    run_tokenize(["--input", os.path.join(d, "gutenberg_valid.txt"), "--out", tmp("gut/out"), "--val-tokens", "100"])
    tt.READ_CHARS, tt.PIECE_CHARS = saved[:2]
    got = np.concatenate([read_shard(f) for f in shards(tmp("gut/out"))])
    check("tokenize_text books from manifest.tsv (auto), --val-tokens",
          np.array_equal(got, encode_docs([b + "\n" for b in books]))
          and len(read_shard(tmp("gut/out_val.bin"))) == 100)
    with open(os.path.join(d, "manifest.tsv"), "a") as f:
        f.write("valid\t10\n")
    check("books: manifest not matching the file is an error",
          raises(lambda: run_tokenize(["--input", os.path.join(d, "gutenberg_valid.txt"), "--out", tmp("gut/x")]),
                 "gutenberg_valid.txt", "manifest.tsv"))

    r = subprocess.run([sys.executable, os.path.join(HERE, "tokenize_text.py"), "--input", tmp("none.txt"),
                        "--out", tmp("x")], capture_output=True, text=True)
    check("tokenize_text: missing input exits 1 naming it", r.returncode == 1 and "none.txt" in r.stderr, r.stderr)
    with open(tmp("bad.txt"), "wb") as f:
        f.write(b"abc\xff\xfe")
    r = subprocess.run([sys.executable, os.path.join(HERE, "tokenize_text.py"), "--input", tmp("bad.txt"),
                        "--out", tmp("x")], capture_output=True, text=True)
    check("tokenize_text: non-UTF-8 input exits 1 naming it", r.returncode == 1 and "bad.txt" in r.stderr, r.stderr)


def test_ckpt():
    cfg = dict(vocab_size=120, padded_vocab_size=128, n_layer=2, n_head=4, n_embd=64, n_inner=256,
               rotary_dims=4, rope_base=10000.0, max_seq_len=256, layer_norm_eps=1e-5)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in ckpt.param_specs(cfg)}
    p = tmp("model.bin")
    ckpt.write_checkpoint(p, cfg, tensors)
    cfg2, t2 = ckpt.read_checkpoint(p)
    h = np.fromfile(p, dtype="<i4", count=256)
    check("checkpoint round trip", all(np.array_equal(tensors[n], t2[n]) for n in tensors)
          and list(t2) == [n for n, _ in ckpt.param_specs(cfg)]
          and os.path.getsize(p) == 1024 + 4 * ckpt.num_params(cfg) and not os.path.exists(p + ".tmp"))
    check("checkpoint header: magic, floats as float32 bits, n_kv_head = n_head",
          h[0] == 20261124 and h[1] == 1 and h[9] == np.float32(10000.0).view(np.int32)
          and h[11] == np.float32(1e-5).view(np.int32) and h[13] == 4 and cfg2["rope_base"] == 10000.0)
    check("pythia-70m parameter count 70,426,624", ckpt.num_params(dict(
        padded_vocab_size=50304, n_layer=6, n_embd=512, n_inner=2048)) == 70426624)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 4)
    check("truncated checkpoint", raises(lambda: ckpt.read_checkpoint(p), "model.bin", "bytes"))
    bad = dict(tensors, **{"layers.1.fc_w": tensors["layers.1.fc_w"][:, :3]})
    check("checkpoint writer names a wrong-shaped tensor",
          raises(lambda: ckpt.write_checkpoint(tmp("m2.bin"), cfg, bad), "layers.1.fc_w", "[256, 3]"))


def test_export_hf():
    """prepro/export_hf.py against the HF folder dev/ref/tiny_model.bin was imported from
    (dev/ref/hf_tiny, written by transformers' save_pretrained in dev/reference.py)."""
    ref = os.path.join(REPO_ROOT, "dev", "ref")
    out = tmp("hf_export")
    export_hf.export(os.path.join(ref, "tiny_model.bin"), out, verbose=False)
    import_hf.convert(out, tmp("reimported.bin"), verbose=False)
    with open(os.path.join(ref, "tiny_model.bin"), "rb") as f, open(tmp("reimported.bin"), "rb") as g:
        check("export_hf then import_hf gives back dev/ref/tiny_model.bin byte for byte", f.read() == g.read())
    ours = import_hf.read_safetensors(os.path.join(out, "model.safetensors"))
    theirs = {k: v for k, v in import_hf.read_safetensors(os.path.join(ref, "hf_tiny", "model.safetensors")).items()}
    theirs = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in theirs.items()}
    check("export_hf: the same tensor names, shapes and values as the HF original (padding rows dropped)",
          set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours),
          sorted(set(ours) ^ set(theirs))[:4])
    check("export_hf: config.json reads back as the original's config",
          import_hf.read_config(out) == import_hf.read_config(os.path.join(ref, "hf_tiny")))
    for name, words in (("gqa", ["gqa", "only mha"]), ("mla", ["mla", "only mha"]), ("ctxkv", ["ctxkv layer 0", "only mha"])):
        check(f"export_hf refuses a {name} checkpoint, saying why",
              raises(lambda: export_hf.export(os.path.join(ref, f"{name}_model.bin"), tmp("no"), verbose=False), *words))
    # a head size whose rotary fraction is not exact in binary (2/6): HF must read back 2 dims
    cfg = dict(vocab_size=100, padded_vocab_size=128, n_layer=1, n_head=4, n_embd=24, n_inner=48,
               rotary_dims=2, rope_base=10000.0, max_seq_len=32, layer_norm_eps=1e-5)
    rng = np.random.default_rng(1)
    tensors = {n: rng.standard_normal(sh).astype(np.float32) for n, sh in ckpt.param_specs(cfg)}
    for n in ("embed_in", "embed_out"):
        tensors[n][100:] = 0
    ckpt.write_checkpoint(tmp("odd.bin"), cfg, tensors)
    export_hf.export(tmp("odd.bin"), tmp("odd_hf"), verbose=False)
    import_hf.convert(tmp("odd_hf"), tmp("odd_back.bin"), verbose=False)
    with open(tmp("odd.bin"), "rb") as f, open(tmp("odd_back.bin"), "rb") as g:
        check("export_hf round trip with rotary dims 2 of a head of 6 (rotary_pct 1/3)", f.read() == g.read())
    tensors["embed_out"][120] = 1.0
    ckpt.write_checkpoint(tmp("padded.bin"), cfg, tensors)
    check("export_hf refuses nonzero vocabulary padding rows (they would be lost)",
          raises(lambda: export_hf.export(tmp("padded.bin"), tmp("no2"), verbose=False), "embed_out", "padding"))


def test_mqar():
    """prepro/mqar.py: every answer is the value paired earlier with the key just before it, keys are
    distinct, the distance is from that pair's key to the query, and the loss mask marks exactly the
    answers; checked by scanning the tokens, not with the generator's own bookkeeping."""
    out = tmp("mqar")
    r = subprocess.run([sys.executable, os.path.join(HERE, "mqar.py"), "--out", out, "--vocab", "64", "-t", "32",
                        "--pairs", "2,6", "--n-train", "40", "--n-val", "4", "--n-test", "10"], capture_output=True, text=True)
    check("mqar.py writes its three files", r.returncode == 0 and all(
        os.path.isfile(os.path.join(out, f)) for f in ("train_000.bin", "val_000.bin", "test.bin")), r.stderr)
    if r.returncode:
        return
    tok, dist, meta = mqar.read_recall_file(os.path.join(out, "test.bin"))
    bad, npairs_seen = [], set()
    for i, (T, npairs) in enumerate(meta):
        x, d = tok[i * T:(i + 1) * T].astype(int), dist[i * T:(i + 1) * T].astype(int)
        keys, vals = list(x[0:2 * npairs:2]), list(x[1:2 * npairs:2])
        answers = [j for j in range(T) if d[j]]
        ok = (len(set(keys)) == npairs and all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in vals)
              and len(answers) == npairs and sorted(x[j - 1] for j in answers) == sorted(keys)
              and all(j - 1 >= 2 * npairs for j in answers))
        for j in answers:
            at = keys.index(x[j - 1]) if x[j - 1] in keys else -1
            ok = ok and at >= 0 and x[j] == vals[at] and d[j] == (j - 1) - 2 * at
        ok = ok and int((x < 32).sum()) == 2 * npairs  # key-range tokens: the pairs' keys and the queries only
        npairs_seen.add(int(npairs))
        if not ok:
            bad.append(i)
    check("mqar test file: each answer is the value of the key before it, keys distinct, distances from the pair",
          not bad and npairs_seen == {2, 6} and len(meta) == 20, bad[:5])
    h = np.fromfile(os.path.join(out, "train_000.bin"), dtype="<i4", count=256)
    n = int(h[2])
    ids = np.fromfile(os.path.join(out, "train_000.bin"), dtype="<u2", count=n, offset=1024)
    mask = np.fromfile(os.path.join(out, "train_000.bin"), dtype="u1", count=n, offset=1024 + 2 * n)
    rows, bad = ids[:-1].reshape(-1, 32).astype(int), []
    for i, x in enumerate(rows):  # the row's answers: its mask count k is its pair count
        m = mask[i * 32:(i + 1) * 32]
        k = int(m.sum())
        pairs = {x[2 * j]: x[2 * j + 1] for j in range(k)}
        if not (k in (2, 6) and len(pairs) == k and all(x[j - 1] in pairs and x[j] == pairs[x[j - 1]] and j - 1 >= 2 * k
                                                        for j in np.flatnonzero(m))):
            bad.append(i)
    check("mqar train shard: the mask marks answers only, each the value of the key before it", not bad, bad[:5])
    check("mqar train shard: version 2, example length 32, 40 examples and one token, mask bytes 0/1 with answers only",
          h[1] == 2 and h[3] == 32 and n == 40 * 32 + 1 and os.path.getsize(os.path.join(out, "train_000.bin")) == 1024 + 3 * n
          and set(np.unique(mask)) <= {0, 1} and mask[-1] == 0 and int(mask.sum()) == 20 * 2 + 20 * 6, (h[:4], int(mask.sum())))
    r = subprocess.run([sys.executable, os.path.join(HERE, "mqar.py"), "--out", out, "-t", "16", "--pairs", "8"],
                       capture_output=True, text=True)
    check("mqar.py: T too short for the pairs exits 1 saying so", r.returncode == 1 and "too short" in r.stderr, r.stderr)


def main():
    texts = [("tinyshakespeare", open(os.path.join(REPO_ROOT, "data", "vendor", "tinyshakespeare.txt"),
                                      encoding="utf-8").read())]
    shared = next((d for d in (os.path.join(REPO_ROOT, "..", "shared", "data"),)
                   if os.path.isdir(os.path.join(d, "gutenberg"))), None)
    if shared:
        with gzip.open(os.path.join(shared, "gutenberg", "gutenberg_valid.txt.gz"), "rt",
                       encoding="utf-8", newline="") as f:
            texts.append(("gutenberg_valid (NFC)", f.read()))
    else:
        print("note: no shared data folder, Gutenberg checks skipped")
    test_shards()
    test_token_table(texts)
    test_tinyshakespeare()
    test_tokenize_text()
    test_ckpt()
    test_export_hf()
    test_mqar()
    import shutil
    shutil.rmtree(TMP)
    n_ok = sum(results)
    print(f"{n_ok} passed, {len(results) - n_ok} failed")
    sys.exit(0 if n_ok == len(results) else 1)


if __name__ == "__main__":
    main()
