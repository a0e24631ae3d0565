"""Shared helpers for the data-preparation scripts (formats: doc/formats.md).

Needs only numpy and tokenizers (prepro/requirements.txt).
"""
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TOKENIZER = os.path.join(REPO_ROOT, "data", "vendor", "20B_tokenizer.json")

HEADER_INTS = 256               # every file starts with 256 int32 = 1024 bytes
HEADER_BYTES = HEADER_INTS * 4
SHARD_MAGIC, SHARD_VERSION = 20240520, 1
SHARD_VERSION_MASKED = 2        # tokens, then one loss-mask byte per token (recall shards)
RECALL_MAGIC, RECALL_VERSION = 20261201, 1
TABLE_MAGIC, TABLE_VERSION = 20240328, 3
EOT_ID = 0                      # <|endoftext|> in the GPT-NeoX tokenizer


class PreproError(Exception):
    """Bad input (wrong magic, truncated file, ...): reported as 'error: ...', exit 1."""


def run_cli(main):
    """Run main(); turn expected failures into one 'error:' line and a non-zero exit."""
    try:
        main()
    except BrokenPipeError:  # e.g. piped into head: not an error worth a message
        sys.stdout = open(os.devnull, "w")
        sys.exit(1)
    except (PreproError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def atomic_write(path, chunks):
    """Write byte chunks to path+'.tmp' then rename, so a crash never leaves a half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
    os.replace(tmp, path)


def make_header(magic, version, *fields):
    h = np.zeros(HEADER_INTS, dtype="<i4")
    h[0], h[1] = magic, version
    h[2:2 + len(fields)] = fields
    return h


def read_header(path, magic, what):
    """Read and check the 256-int32 header of path; returns it as an int32 array."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise PreproError(f"{path}: {size} bytes, too short for the {HEADER_BYTES}-byte header of a {what}")
    h = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if h[0] != magic:
        raise PreproError(f"{path}: bad magic {h[0]} (expected {magic}); not a {what}")
    return h


# ---------------------------------------------------------------- token shards

def write_shard(path, tokens):
    """Write an llm.c token shard: header [20240520, 1, N, 0...] then N uint16 ids."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token id out of uint16 range "
                         f"(min {tokens.min()}, max {tokens.max()})")
    h = make_header(SHARD_MAGIC, SHARD_VERSION, tokens.size)
    atomic_write(path, [h.tobytes(), tokens.astype("<u2").tobytes()])


def write_masked_shard(path, tokens, mask, example_len):
    """Write a version-2 shard: header [20240520, 2, N, example_len, 0...], N uint16 ids, then N
    uint8 loss-mask bytes (1: the token is a scored target). The trainer reads B*T blocks of it with
    -t example_len, so that each row is one example."""
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.shape != mask.shape or tokens.ndim != 1:
        raise ValueError(f"{path}: tokens {tokens.shape} and mask {mask.shape} must be 1-D and equal")
    if (tokens.size - 1) % example_len:
        raise ValueError(f"{path}: {tokens.size} tokens are not whole examples of {example_len} and one more")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16 or not np.isin(mask, (0, 1)).all()):
        raise ValueError(f"{path}: token id out of uint16 range, or a mask byte not 0/1")
    h = make_header(SHARD_MAGIC, SHARD_VERSION_MASKED, tokens.size, example_len)
    atomic_write(path, [h.tobytes(), tokens.astype("<u2").tobytes(), mask.astype("u1").tobytes()])


def read_shard(path):
    """Read and validate a token shard; returns a uint16 array of the ids."""
    h = read_header(path, SHARD_MAGIC, "token shard")
    if h[1] != SHARD_VERSION:
        raise PreproError(f"{path}: token shard version {h[1]}, expected {SHARD_VERSION}")
    n = int(h[2])
    size = os.path.getsize(path)
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise PreproError(f"{path}: header says {n} tokens = {HEADER_BYTES + 2 * n} bytes, "
                          f"file has {size} bytes (truncated or corrupt)")
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


# ---------------------------------------------------------------- tokenizer

def load_tokenizer(path=None):
    """The GPT-NeoX tokenizer (default: the vendored data/vendor/20B_tokenizer.json)."""
    # encode_batch runs on rayon's thread pool. On some machines (seen here: 2 cores, cgroup
    # v1) its default size comes out as 1 and encoding is serial; set it explicitly before
    # the pool is first used.
    if hasattr(os, "sched_getaffinity"):
        os.environ.setdefault("RAYON_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from tokenizers import Tokenizer  # imported here so shard/ckpt helpers work without it
    path = path or DEFAULT_TOKENIZER
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(path)


def _byte_decoder():
    """Inverse of GPT-2's bytes_to_unicode(): vocab character -> raw byte.

    Byte-level BPE stores each byte as a printable unicode character: the 188 printable
    latin-1 bytes stand for themselves, the other 68 (controls, space, ...) are shifted to
    U+0100 and up (so space is 'Ġ' = U+0120 and newline is 'Ċ' = U+010A).
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer):
    """List, indexed by id, of the raw bytes each token stands for (b'' for unused ids)."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    dec = _byte_decoder()
    out = [b""] * n
    for tok, i in tokenizer.get_vocab(with_added_tokens=False).items():
        out[i] = bytes(dec[c] for c in tok)
    # Added tokens (<|endoftext|>, <|padding|>, and NeoX's runs of 2..24 spaces) are matched
    # on the raw text before byte-level BPE, so their content is literal text, not byte-mapped.
    for i, tok in tokenizer.get_added_tokens_decoder().items():
        out[i] = tok.content.encode("utf-8")
    return out


def write_token_table(path, tokenizer, eot_id=EOT_ID, verbose=True):
    """Write the id -> bytes table: header [20240328, 3, N, eot], then per id a uint16
    little-endian length and the bytes.

    llm.c's version 2 uses a uint8 length, but GPT-NeoX has 5 tokens longer than 255 bytes
    (runs of 256/512 spaces, 256 dashes, ...: ids 7421, 16525, 19979, 32399, 44919), so
    version 3 widens the length and every token is stored exactly.
    """
    table = token_bytes(tokenizer)
    body = bytearray()
    for b in table:
        assert len(b) < 65536
        body += len(b).to_bytes(2, "little")
        body += b
    h = make_header(TABLE_MAGIC, TABLE_VERSION, len(table), eot_id)
    atomic_write(path, [h.tobytes(), bytes(body)])
    if verbose:
        print(f"wrote {path}: {len(table)} tokens")
    return len(table)


def read_token_table(path):
    """Read a token table; returns (list of bytes per id, eot_id)."""
    h = read_header(path, TABLE_MAGIC, "token table")
    if h[1] != TABLE_VERSION:
        raise PreproError(f"{path}: token table version {h[1]}, expected {TABLE_VERSION}")
    with open(path, "rb") as f:
        data = f.read()[HEADER_BYTES:]
    out, pos = [], 0
    for i in range(int(h[2])):
        n = int.from_bytes(data[pos:pos + 2], "little") if pos + 2 <= len(data) else -1
        if n < 0 or pos + 2 + n > len(data):
            raise PreproError(f"{path}: truncated at token {i} of {h[2]}")
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    if pos != len(data):
        raise PreproError(f"{path}: {len(data) - pos} trailing bytes after {h[2]} tokens")
    return out, int(h[3])
