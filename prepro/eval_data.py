"""Make the evaluation files of train_ctxkv (doc/formats.md, "Evaluation files").

    python prepro/eval_data.py
reads ../shared/data/wikitext-2/wiki.test.raw and ../shared/data/lambada_test.jsonl and writes

  data/eval/wikitext2_test.bin  WikiText-2 raw test as ONE document: a token shard holding
                                <|endoftext|> then the whole text (no other <|endoftext|>), so
                                --eval-heldout scores every token of the text
  data/eval/lambada_test.bin    LAMBADA (lambada_openai): per example, context = the text before
                                its last space, target = " " + the last word, each tokenized on
                                its own (as lm-evaluation-harness does)

WikiText-103's test articles are WikiText-2's (only the <unk> vocabulary of the tokenized
files differs), so on the raw text with a BPE tokenizer the two held-out losses are one number:
there is no separate WikiText-103 file.
"""
import argparse
import json
import os
import time

import numpy as np

from common import (EOT_ID, HEADER_INTS, REPO_ROOT, PreproError, atomic_write, load_tokenizer,
                    make_header, run_cli, write_shard)
from tokenize_text import pieces

SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
LAMBADA_MAGIC, LAMBADA_VERSION = 20261128, 1


def need_file(path, what):
    if not os.path.isfile(path):
        raise PreproError(f"{what} not found: {path} (see ../shared/data/SOURCES.md)")


def wikitext(tok, src, dst):
    """Tokenize src as one document; returns the number of tokens of the text."""
    with open(src, encoding="utf-8", newline="") as f:
        text = f.read()
    # encode in pieces cut where the ids cannot change (tokenize_text.safe_cut), in parallel
    parts = [t for _, t in pieces([(True, text)])]
    ids = [EOT_ID]
    for enc in tok.encode_batch(parts, add_special_tokens=False):
        ids.extend(enc.ids)
    if EOT_ID in ids[1:]:
        raise PreproError(f"{src}: the text tokenizes to <|endoftext|> somewhere inside")
    write_shard(dst, np.array(ids, dtype=np.uint16))
    print(f"{src}: {len(text.encode('utf-8')):,} bytes, {text.count(chr(10)):,} lines -> "
          f"{len(ids) - 1:,} tokens")
    print(f"wrote {dst}: {len(ids):,} tokens (<|endoftext|> + the text)")
    print("  (WikiText-103's test articles are these same articles: one held-out number, not two)")
    return len(ids) - 1


def lambada(tok, src, dst):
    """Split and tokenize every example; returns (examples, total tokens)."""
    contexts, targets = [], []
    with open(src, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise PreproError(f"{src}:{i}: not a JSON object with a 'text' field ({e})")
            if " " not in text.strip():
                raise PreproError(f"{src}:{i}: no space to split the last word at")
            ctx, word = text.rsplit(" ", 1)
            contexts.append(ctx)
            targets.append(" " + word)
    enc = lambda xs: [e.ids for e in tok.encode_batch(xs, add_special_tokens=False)]
    ctx_ids, tgt_ids = enc(contexts), enc(targets)
    joint = enc([c + t for c, t in zip(contexts, targets)])
    n_joint_diff = sum(j != c + t for j, c, t in zip(joint, ctx_ids, tgt_ids))
    for i, (c, t) in enumerate(zip(ctx_ids, tgt_ids)):
        if not c or not t:
            raise PreproError(f"{src}: example {i + 1} has an empty context or target")
    n = len(ctx_ids)
    lengths = np.array([(len(c), len(t)) for c, t in zip(ctx_ids, tgt_ids)], dtype="<i4")
    tokens = np.array([x for c, t in zip(ctx_ids, tgt_ids) for x in c + t], dtype="<u2")
    header = make_header(LAMBADA_MAGIC, LAMBADA_VERSION, n, tokens.size)
    assert header.size == HEADER_INTS
    atomic_write(dst, [header.tobytes(), lengths.tobytes(), tokens.tobytes()])
    hist = ", ".join(f"{k}: {c}" for k, c in enumerate(np.bincount(lengths[:, 1])) if c)
    print(f"{src}: {n:,} examples, {int(lengths[:, 0].sum()):,} context + "
          f"{int(lengths[:, 1].sum()):,} target tokens = {tokens.size:,}")
    print(f"  examples by target tokens {{{hist}}}; longest example {int(lengths.sum(1).max())} tokens")
    print(f"  {n_joint_diff} examples tokenize differently when context and target are joined")
    print(f"wrote {dst}: {n:,} examples, {tokens.size:,} tokens")
    return n, tokens.size


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikitext", default=os.path.join(SHARED, "wikitext-2", "wiki.test.raw"),
                    help="WikiText-2 raw test file (default: ../shared/data/wikitext-2/wiki.test.raw)")
    ap.add_argument("--lambada", default=os.path.join(SHARED, "lambada_test.jsonl"),
                    help="LAMBADA jsonl (default: ../shared/data/lambada_test.jsonl)")
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "data", "eval"),
                    help="output folder (default: data/eval)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: data/vendor/20B_tokenizer.json)")
    args = ap.parse_args()
    need_file(args.wikitext, "WikiText-2 test file (--wikitext)")
    need_file(args.lambada, "LAMBADA test file (--lambada)")
    t0 = time.time()
    tok = load_tokenizer(args.tokenizer)
    wikitext(tok, args.wikitext, os.path.join(args.out_dir, "wikitext2_test.bin"))
    lambada(tok, args.lambada, os.path.join(args.out_dir, "lambada_test.bin"))
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
