"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), as training shards and a
recall eval file for train_ctxkv (formats: doc/formats.md).

    .venv/bin/python prepro/mqar.py [--out data/mqar] [--vocab 8192] [-t 128] [--pairs 4,8,16]

Each example is T tokens: N key-value pairs k1 v1 .. kN vN (keys from 1..V/2-1, values from
V/2..V-1, distinct keys), then a query region where each key is asked once: at a slot 2g past the
pairs its key appears, followed by its value, the answer. The slots g are drawn without
replacement with p(g) ~ (g+1)^(a-1) (a = --power-a, 0.01 as Zoology: most queries come soon after
the pairs, a few far). Every other position holds a random token from the values' half (Zoology's
random non-queries come from the whole vocabulary, which at its 8,192 tokens rarely repeats a
key; at a small vocabulary a filler key would contradict the pair about once per example). The answer tokens are the only scored targets:
  OUT/train_000.bin  version-2 shard (loss mask on the answers), --n-train examples
  OUT/val_000.bin    the same, --n-val examples (the trainer's val loss = loss on answers)
  OUT/test.bin       recall eval file (--eval-recall), --n-test examples per pair count of
                     --test-pairs (default --pairs)
Pair counts (--pairs) are mixed evenly in every file: each is a difficulty level, and
--eval-recall reports accuracy for each and by distance (query key - its pair's key).
Deterministic for a --seed; the three files use separate streams.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (HEADER_BYTES, RECALL_MAGIC, RECALL_VERSION, atomic_write, make_header,  # noqa: E402
                    run_cli, write_masked_shard)


def make_examples(rng, n, T, pairs, V, power_a):
    """(tokens, answer distance) of n examples of T tokens with `pairs` pairs, both (n, T); the
    distance is 0 except at answers."""
    half = V // 2
    if T < 4 * pairs:
        raise ValueError(f"T {T} is too short for {pairs} pairs: the queries need T >= 4 * pairs")
    if pairs > half - 1:
        raise ValueError(f"{pairs} pairs need {pairs} distinct keys; the vocabulary {V} has {half - 1}")
    ctx, space = 2 * pairs, (T - 2 * pairs) // 2
    # the random non-queries, drawn from the values' half: a key drawn as filler would be a second,
    # contradicting occurrence of that key (at a small vocabulary, about one per example)
    tok = rng.integers(half, V, size=(n, T))
    dist = np.zeros((n, T), dtype=np.int64)
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :pairs] + 1   # distinct, in 1..half-1
    vals = rng.integers(half, V, size=(n, pairs))
    tok[:, 0:ctx:2], tok[:, 1:ctx:2] = keys, vals
    p = (np.arange(1, space + 1, dtype=np.float64)) ** (power_a - 1)
    p /= p.sum()
    rows = np.arange(n)[:, None]
    # slots without replacement, by p: Gumbel top-k
    gaps = np.argsort(-(np.log(p)[None, :] - np.log(-np.log(rng.random((n, space))))), axis=1)[:, :pairs]
    qpos = ctx + 2 * gaps                                       # (n, pairs): where key i is asked
    tok[rows, qpos], tok[rows, qpos + 1] = keys, vals
    dist[rows, qpos + 1] = qpos - 2 * np.arange(pairs)[None, :]
    return tok, dist


def make_split(seed, n, T, pair_list, V, power_a):
    """n examples per pair count, interleaved in a shuffled order: (tokens, dist, pairs per example)."""
    rng = np.random.default_rng(seed)
    parts = [make_examples(rng, n, T, k, V, power_a) for k in pair_list]
    tok = np.concatenate([t for t, _ in parts])
    dist = np.concatenate([d for _, d in parts])
    npairs = np.repeat(pair_list, n)
    order = rng.permutation(len(npairs))
    return tok[order], dist[order], npairs[order]


def write_recall_file(path, tok, dist, npairs):
    """Recall eval file: header [20261201, 1, n examples, n tokens], then per example (int32 length,
    int32 pairs), the tokens (uint16), then each token's answer distance (uint16, 0: not an answer)."""
    n, T = tok.shape
    if dist.max() >= 2**16:
        raise ValueError(f"{path}: a distance {dist.max()} does not fit uint16")
    meta = np.stack([np.full(n, T), npairs], axis=1).astype("<i4")
    h = make_header(RECALL_MAGIC, RECALL_VERSION, n, n * T)
    atomic_write(path, [h.tobytes(), meta.tobytes(), tok.astype("<u2").tobytes(), dist.astype("<u2").tobytes()])


def read_recall_file(path):
    """(tokens, dist, npairs) of a recall eval file, checked as the trainer checks it."""
    h = np.fromfile(path, dtype="<i4", count=256)
    n, ntok = int(h[2]), int(h[3])
    if h[0] != RECALL_MAGIC or h[1] != RECALL_VERSION or os.path.getsize(path) != HEADER_BYTES + 8 * n + 4 * ntok:
        raise ValueError(f"{path}: not a recall eval file of version {RECALL_VERSION}, or truncated")
    meta = np.fromfile(path, dtype="<i4", count=2 * n, offset=HEADER_BYTES).reshape(n, 2)
    tok = np.fromfile(path, dtype="<u2", count=ntok, offset=HEADER_BYTES + 8 * n)
    dist = np.fromfile(path, dtype="<u2", count=ntok, offset=HEADER_BYTES + 8 * n + 2 * ntok)
    return tok, dist, meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/mqar", help="output folder [data/mqar]")
    ap.add_argument("--vocab", type=int, default=8192, help="V: keys 1..V/2-1, values V/2..V-1; the model's vocabulary [8192]")
    ap.add_argument("-t", type=int, default=128, help="T: tokens per example (train with -t T) [128]")
    ap.add_argument("--pairs", default="4,8,16", help="pair counts, the difficulty levels [4,8,16]")
    ap.add_argument("--test-pairs", help="pair counts of the test file [--pairs]; counts past the trained ones ask "
                    "whether recall holds with more pairs than training had")
    ap.add_argument("--n-train", type=int, default=100_000, help="training examples, over all pair counts [100000]")
    ap.add_argument("--n-val", type=int, default=1_000, help="validation examples [1000]")
    ap.add_argument("--n-test", type=int, default=1_000, help="test examples per pair count [1000]")
    ap.add_argument("--power-a", type=float, default=0.01, help="query-slot power law p(g) ~ (g+1)^(a-1) [0.01]")
    ap.add_argument("--seed", type=int, default=0, help="[0]")
    a = ap.parse_args()
    try:
        pair_list = [int(x) for x in a.pairs.split(",") if x]
    except ValueError:
        ap.error(f"--pairs {a.pairs!r}: not a comma list of integers")
    try:
        test_pairs = [int(x) for x in (a.test_pairs or a.pairs).split(",") if x]
    except ValueError:
        ap.error(f"--test-pairs {a.test_pairs!r}: not a comma list of integers")
    if not pair_list or min(pair_list) < 1 or not test_pairs or min(test_pairs) < 1:
        ap.error("--pairs, --test-pairs: give at least one count >= 1")
    if not 4 <= a.vocab <= 65536:
        ap.error(f"--vocab {a.vocab}: must be in 4..65536")
    for name in ("n_train", "n_val", "n_test"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    T, V, k = a.t, a.vocab, len(pair_list)
    for name, n, seed in (("train_000.bin", -(-a.n_train // k), 3 * a.seed), ("val_000.bin", -(-a.n_val // k), 3 * a.seed + 1)):
        tok, dist, _ = make_split(seed, n, T, pair_list, V, a.power_a)
        flat = np.append(tok.ravel(), 0)                     # one more token: the last row's next
        mask = np.append((dist.ravel() > 0).astype(np.uint8), 0)
        write_masked_shard(os.path.join(a.out, name), flat, mask, T)
    tok, dist, npairs = make_split(3 * a.seed + 2, a.n_test, T, test_pairs, V, a.power_a)
    write_recall_file(os.path.join(a.out, "test.bin"), tok, dist, npairs)
    print(f"wrote {a.out}/train_000.bin, val_000.bin, test.bin: T {T}, vocab {V}, pairs {pair_list}, "
          f"{-(-a.n_train // k) * k:,} / {-(-a.n_val // k) * k:,} / {a.n_test * len(test_pairs):,} examples "
          f"(test pairs {test_pairs})")


if __name__ == "__main__":
    run_cli(main)
