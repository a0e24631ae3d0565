"""Writes the files test_ctxkv reads for the shard / token-table round trip.

  python dev/make_test_data.py OUT_DIR

OUT_DIR/roundtrip.txt      a stretch of Tiny Shakespeare plus a line of non-ASCII text (raw bytes)
OUT_DIR/roundtrip.bin      that text tokenized with the GPT-NeoX tokenizer, as a shard (eot first)
OUT_DIR/roundtrip_ids.txt  the same ids as text, straight from the tokenizer
OUT_DIR/tokenizer.bin      the token table
The C side reads the shard, compares it with the ids, and decodes it back to the text.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepro.common import EOT_ID, REPO_ROOT, load_tokenizer, write_shard, write_token_table  # noqa: E402


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: python dev/make_test_data.py OUT_DIR")
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(REPO_ROOT, "data", "vendor", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read(6000)
    text = text[: text.rfind("\n") + 1]
    # byte-level BPE splits multi-byte characters across tokens: make sure some are here
    text += "Naïve café — “quoted”, 日本語, 🙂, and    four spaces.\n"
    tok = load_tokenizer()
    ids = [EOT_ID] + tok.encode(text).ids
    with open(os.path.join(out, "roundtrip.txt"), "wb") as f:
        f.write(text.encode("utf-8"))
    write_shard(os.path.join(out, "roundtrip.bin"), ids)
    with open(os.path.join(out, "roundtrip_ids.txt"), "w") as f:
        f.write(" ".join(map(str, ids)) + "\n")
    write_token_table(os.path.join(out, "tokenizer.bin"), tok, verbose=False)
    print(f"wrote round-trip test data to {out} ({len(ids)} tokens)")


if __name__ == "__main__":
    main()
