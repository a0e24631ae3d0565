"""Tokenize plain text (.txt or .txt.gz) with the GPT-NeoX tokenizer into llm.c token shards.

Streams the input, encodes in parallel batches (tokenizers' encode_batch) and writes shards
as it goes: PREFIX_000000.bin, PREFIX_000001.bin, ... of at most --shard-size tokens each.
Every document is preceded by <|endoftext|> (id 0) and keeps its separator text, so the
shards decode back to the input (after the tokenizer's NFC normalisation).

Document separators (--doc-sep):
  blank         split on blank lines ("\\n\\n"), as llm.c does for Tiny Shakespeare
  file          one document per input file
  books         one document per book of a gutenberg_<split>.txt[.gz] file: its books'
                lengths come from the manifest.tsv beside it (or --manifest)
  regex:PAT     split after each (non-empty) match of the Python regex PAT,
                e.g. 'regex:\\n{3,}'
  auto          (default) books when a manifest.tsv beside the input lists that file's
                books, else blank

Example (the Gutenberg books, one document per book):
  python prepro/tokenize_text.py --input ../shared/data/gutenberg/gutenberg_train.txt.gz \\
      --out data/gutenberg/gutenberg_train
"""
import argparse
import csv
import gzip
import io
import os
import re
import sys
import time

import numpy as np

from common import EOT_ID, PreproError, load_tokenizer, run_cli, write_shard

READ_CHARS = 1 << 20        # characters read from the input at a time
PIECE_CHARS = 1 << 16       # long documents are encoded in pieces of about this size
SEP_TAIL = 4096             # longest --doc-sep match that is sure to be found
MANIFEST_RE = re.compile(r"gutenberg_(\w+?)\.txt(\.gz)?$")


# ------------------------------------------------------------------ reading

class Input:
    """A text file, gzipped or not, that reports how far through the raw file it is."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        self.raw = open(path, "rb")
        binary = gzip.GzipFile(fileobj=self.raw) if path.endswith(".gz") else self.raw
        self.text = io.TextIOWrapper(binary, encoding="utf-8", newline="")  # keep \r as is

    def read(self, n=None):
        try:
            return self.text.read(n or READ_CHARS)
        except (UnicodeDecodeError, OSError, EOFError) as e:
            kind = "gzipped UTF-8 text" if self.path.endswith(".gz") else "UTF-8 text"
            raise PreproError(f"{self.path}: cannot read as {kind}: {e}")

    def done_bytes(self):
        return self.raw.tell()

    def close(self):
        self.text.close()


def split_stream(inp, sep_re):
    """Yield (starts_doc, text): documents end right after each separator match."""
    buf, first = "", True
    while True:
        chunk = inp.read()
        buf += chunk
        start = 0
        for m in sep_re.finditer(buf):
            if m.end() == m.start():
                continue  # an empty match separates nothing
            # a match touching the end of the buffer might grow with more text; wait for it
            if chunk and m.end() == len(buf):
                break
            yield first, buf[start:m.end()]
            start, first = m.end(), True
        buf = buf[start:]
        if not chunk:  # end of file; a file ending in a separator gets no empty last doc
            if buf:
                yield first, buf
            return
        if len(buf) > 2 * max(READ_CHARS, SEP_TAIL):
            # a long document: pass its text on, but keep a tail in which a separator
            # (of up to SEP_TAIL characters) may have begun
            yield first, buf[:-SEP_TAIL]
            buf, first = buf[-SEP_TAIL:], False


def whole_file(inp):
    """Yield (starts_doc, text): the whole file is one document."""
    first = True
    while True:
        chunk = inp.read()
        if not chunk and not first:
            return
        yield first, chunk
        first = False


def manifest_books(path, manifest=None):
    """Character counts of the books in a gutenberg_<split>.txt[.gz] file, from manifest.tsv.

    The file is the books' cleaned texts, each ending in "\\n", joined by "\\n" (so books are
    separated by a blank line, which is no different from a paragraph break: only the
    manifest's clean_chars column tells where one book ends).
    Returns None when there is no manifest or it does not list this file.
    """
    m = MANIFEST_RE.search(os.path.basename(path))
    manifest = manifest or os.path.join(os.path.dirname(path), "manifest.tsv")
    if not m or not os.path.isfile(manifest):
        return None
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t") if r.get("split") == m.group(1)]
    if rows and "clean_chars" not in rows[0]:
        raise PreproError(f"{manifest}: no clean_chars column")
    return [int(r["clean_chars"]) for r in rows] or None


def books_stream(inp, books, manifest_name):
    """Yield (starts_doc, text) with one document per book (its text plus the "\\n" after it)."""
    for i, n in enumerate(books):
        first = True
        left = n + 1
        while left:
            text = inp.read(min(left, READ_CHARS))
            if not text:
                raise PreproError(f"{inp.path}: ends inside book {i + 1} of {len(books)}; "
                                  f"{manifest_name} does not describe it (try --doc-sep blank)")
            left -= len(text)
            if not left and not text.endswith("\n"):
                raise PreproError(f"{inp.path}: book {i + 1} is not followed by a newline at the "
                                  f"length {manifest_name} gives (try --doc-sep blank)")
            yield first, text
            first = False
    if inp.read(1):
        raise PreproError(f"{inp.path}: text left after the {len(books)} books {manifest_name} "
                          f"lists (try --doc-sep blank)")


def safe_cut(s, limit):
    """An index where s can be cut without changing its tokens, near limit, or None.

    The GPT-NeoX pre-tokenizer (GPT-2's regex, plus added tokens that are runs of spaces,
    plus NFC) never joins a non-whitespace character to a following newline, and a
    whitespace run that starts with a newline is split the same whatever came before it.
    So cutting at a newline that follows a non-whitespace character gives the same ids as
    encoding the whole text at once (checked by prepro/test_prepro.py).
    """
    i = limit
    while True:
        i = s.rfind("\n", 1, i)
        if i <= 0:
            break
        if not s[i - 1].isspace():
            return i
    for m in re.finditer(r"\S\n", s[limit:]):
        return limit + m.start() + 1
    return None


def pieces(segments, max_chars=None):
    """(starts_doc, text) segments -> pieces of about max_chars, cut only at safe points.

    encode_batch runs its inputs in parallel but each one on a single thread, and a
    long document would also be one long string in memory: encode it in pieces.
    """
    max_chars = max_chars or PIECE_CHARS
    start, buf = False, ""
    for starts_doc, text in segments:
        if starts_doc:
            if buf or start:
                yield start, buf
            start, buf = True, text
        else:
            buf += text
        while len(buf) > max_chars:
            cut = safe_cut(buf, max_chars)
            if cut is None:
                break  # no safe point yet: wait for more text
            yield start, buf[:cut]
            start, buf = False, buf[cut:]
    if buf or start:
        yield start, buf


# ------------------------------------------------------------------ writing

class ShardWriter:
    """Collects token ids; writes the first val_tokens to PREFIX_val.bin, then full shards."""

    def __init__(self, prefix, shard_size, val_tokens=0):
        self.prefix, self.shard_size, self.val_left = prefix, shard_size, val_tokens
        self.parts, self.n, self.index, self.written = [], 0, 0, []

    def add(self, ids):
        self.parts.append(ids)
        self.n += len(ids)
        if self.val_left and self.n >= self.val_left:
            self._write(self.prefix + "_val.bin", self.val_left)
            self.val_left = 0
        while not self.val_left and self.n >= self.shard_size:
            self._write(f"{self.prefix}_{self.index:06d}.bin", self.shard_size)
            self.index += 1

    def close(self):
        if self.val_left:
            print(f"warning: only {self.n:,} tokens in all, all of them go to val", file=sys.stderr)
            self._write(self.prefix + "_val.bin", self.n)
        elif self.n or not self.written:
            self._write(f"{self.prefix}_{self.index:06d}.bin", self.n)
        return self.written

    def _write(self, path, n):
        allids = np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint16)
        write_shard(path, allids[:n])
        self.parts, self.n = [allids[n:]], len(allids) - n
        self.written.append((path, n))


# ------------------------------------------------------------------ main

def doc_sep_arg(s):
    if s in ("auto", "blank", "file", "books"):
        return s
    if s.startswith("regex:"):
        try:
            return re.compile(s[len("regex:"):])
        except re.error as e:
            raise argparse.ArgumentTypeError(f"bad regex {s[6:]!r}: {e}")
    raise argparse.ArgumentTypeError(f"{s!r}: use auto, blank, file, books or regex:PATTERN")


def segments_for(inp, args):
    """Pick the document splitter for one input file; returns (description, segments)."""
    mode = args.doc_sep
    if mode in ("auto", "books"):
        books = manifest_books(inp.path, args.manifest)
        if books:
            name = args.manifest or os.path.join(os.path.dirname(inp.path), "manifest.tsv")
            return f"books ({len(books)} from {name})", books_stream(inp, books, name)
        if mode == "books":
            raise PreproError(f"{inp.path}: --doc-sep books needs a gutenberg_<split>.txt[.gz] "
                              f"file and a manifest.tsv listing its books")
        mode = "blank"
    if mode == "blank":
        return "blank lines", split_stream(inp, re.compile(r"\n\n"))
    if mode == "file":
        return "one per file", whole_file(inp)
    return f"regex {mode.pattern!r}", split_stream(inp, mode)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .txt.gz files")
    ap.add_argument("--out", required=True, metavar="PREFIX",
                    help="output prefix: writes PREFIX_000000.bin, ... (directories are created)")
    ap.add_argument("--shard-size", type=int, default=10_000_000, help="tokens per shard (default 10M)")
    ap.add_argument("--doc-sep", type=doc_sep_arg, default="auto",
                    help="auto (default), blank, file, books or regex:PATTERN (see above)")
    ap.add_argument("--manifest", help="manifest.tsv for --doc-sep books/auto "
                    "(default: manifest.tsv beside each input)")
    ap.add_argument("--val-tokens", type=int, default=0, metavar="N",
                    help="send the first N tokens to PREFIX_val.bin instead (default 0)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: data/vendor/20B_tokenizer.json)")
    ap.add_argument("--batch-chars", type=int, default=4_000_000,
                    help="characters per encode_batch call (default 4M)")
    args = ap.parse_args()
    if args.shard_size <= 0 or args.val_tokens < 0:
        ap.error("--shard-size must be > 0 and --val-tokens >= 0")
    for path in args.input:
        if not os.path.isfile(path):
            raise PreproError(f"input file not found: {path}")

    tok = load_tokenizer(args.tokenizer)
    if tok.get_vocab_size(with_added_tokens=True) > 2**16:
        raise PreproError(f"{args.tokenizer}: more than 65536 token ids do not fit uint16 shards")
    out = ShardWriter(args.out, args.shard_size, args.val_tokens)
    t0 = time.time()
    total_bytes = sum(os.path.getsize(p) for p in args.input)
    done_before = ndocs = ntok = nchars = 0
    last_report = t0

    def encode(batch):
        nonlocal ndocs, ntok
        ids = []
        for (starts_doc, _), enc in zip(batch, tok.encode_batch([t for _, t in batch],
                                                                add_special_tokens=False)):
            if starts_doc:
                ids.append(EOT_ID)
                ndocs += 1
            ids.extend(enc.ids)
        out.add(np.array(ids, dtype=np.uint16))  # vocab size checked above
        ntok += len(ids)

    for path in args.input:
        inp = Input(path)
        how, segs = segments_for(inp, args)
        print(f"{path}: {inp.size / 1e6:.1f} MB, documents: {how}")
        batch, batch_chars = [], 0
        for piece in pieces(segs):
            batch.append(piece)
            batch_chars += len(piece[1])
            nchars += len(piece[1])
            if batch_chars >= args.batch_chars:
                encode(batch)
                batch, batch_chars = [], 0
                now = time.time()
                if now - last_report >= 5:
                    last_report = now
                    done = done_before + inp.done_bytes()
                    print(f"  {done / 1e6:7.1f} / {total_bytes / 1e6:.1f} MB read ({100 * done / total_bytes:3.0f}%), "
                          f"{nchars / 1e6:7.1f} M chars, {ntok / 1e6:7.2f} M tokens, "
                          f"{ntok / (now - t0) / 1e3:5.0f} k tokens/s", flush=True)
        if batch:
            encode(batch)
        done_before += inp.size
        inp.close()

    written = out.close()
    dt = time.time() - t0
    for p, n in written:
        print(f"wrote {p}: {n:,} tokens")
    print(f"{len(args.input)} file(s), {nchars:,} chars, {ndocs:,} documents, {ntok:,} tokens "
          f"in {len(written)} shard(s), {dt:.1f}s, {ntok / max(dt, 1e-9) / 1e3:.0f} k tokens/s")


if __name__ == "__main__":
    run_cli(main)
