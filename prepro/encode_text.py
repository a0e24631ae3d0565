"""Text -> comma-separated GPT-NeoX token ids, for train_ctxkv --prompt-ids.

    python prepro/encode_text.py "Once upon a time"        # prints 10758,2220,247,673
    echo "Once upon a time" | python prepro/encode_text.py -

Uses the vendored tokenizer (data/vendor/20B_tokenizer.json) unless --tokenizer is given.
`make generate PROMPT="..." CKPT=model.bin` wires it to the trainer's --generate.
"""
import argparse
import sys

from common import PreproError, load_tokenizer, run_cli


def main():
    ap = argparse.ArgumentParser(description="Text -> comma-separated token ids (for --prompt-ids).")
    ap.add_argument("text", help="the prompt, or - to read it from stdin")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json [data/vendor/20B_tokenizer.json]")
    args = ap.parse_args()
    text = sys.stdin.read().rstrip("\n") if args.text == "-" else args.text
    ids = load_tokenizer(args.tokenizer).encode(text, add_special_tokens=False).ids
    if not ids:
        raise PreproError("the prompt is empty: it encodes to no tokens")
    print(",".join(map(str, ids)))


if __name__ == "__main__":
    run_cli(main)
