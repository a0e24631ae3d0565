"""Tokenize Tiny Shakespeare with the GPT-NeoX tokenizer into llm.c token shards.

Like llm.c's dev/data/tinyshakespeare.py: the text is split into documents on blank lines,
each document is preceded by <|endoftext|> (id 0) and keeps its "\\n\\n" (so the shards
decode back to the original text), the first 32768 tokens are the val split, the rest train.
Also writes the id -> bytes token table used to print samples.

    python prepro/tinyshakespeare.py
writes data/tinyshakespeare/tiny_shakespeare_{val,train}.bin and data/tokenizer.bin.
"""
import argparse
import os
import time

from common import (EOT_ID, REPO_ROOT, load_tokenizer, run_cli, write_shard,
                    write_token_table)

VAL_TOKENS = 32768


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=os.path.join(REPO_ROOT, "data", "vendor", "tinyshakespeare.txt"),
                    help="text file (default: data/vendor/tinyshakespeare.txt)")
    ap.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "data", "tinyshakespeare"),
                    help="where the two shards go (default: data/tinyshakespeare)")
    ap.add_argument("--table", default=None,
                    help="token table path (default: tokenizer.bin in the parent of --out-dir, "
                         "i.e. data/tokenizer.bin)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json (default: data/vendor/20B_tokenizer.json)")
    args = ap.parse_args()
    table = args.table or os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), "tokenizer.bin")

    t0 = time.time()
    tok = load_tokenizer(args.tokenizer)
    with open(args.input, encoding="utf-8") as f:
        text = f.read()
    sections = text.split("\n\n")
    # keep the separator on every section but the last, so the tokens decode to the input
    docs = [s + "\n\n" for s in sections[:-1]] + sections[-1:]
    tokens = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        tokens.append(EOT_ID)
        tokens.extend(enc.ids)
    if len(tokens) <= VAL_TOKENS:
        raise ValueError(f"{args.input}: only {len(tokens)} tokens, need more than {VAL_TOKENS} "
                         f"for the val split")

    val_path = os.path.join(args.out_dir, "tiny_shakespeare_val.bin")
    train_path = os.path.join(args.out_dir, "tiny_shakespeare_train.bin")
    write_shard(val_path, tokens[:VAL_TOKENS])
    write_shard(train_path, tokens[VAL_TOKENS:])
    n = write_token_table(table, tok)
    print(f"{args.input}: {len(text.encode('utf-8')):,} bytes, {len(docs):,} documents, "
          f"{len(tokens):,} tokens")
    print(f"wrote {val_path}: {VAL_TOKENS:,} tokens")
    print(f"wrote {train_path}: {len(tokens) - VAL_TOKENS:,} tokens")
    print(f"wrote {table}: {n:,} token ids")
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
