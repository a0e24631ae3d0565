"""Smoke test of dev/kv_table.py --quick and of the evaluation files it uses.

    .venv/bin/python dev/test_kv_table.py [--binary ./train_ctxkv] [--keep DIR]

Runs `dev/kv_table.py --quick` into a temporary folder (two workloads, 2 seeds, one thread: about
2 minutes), then checks that kv_table.md has one row per variant with finite numbers, mean +- std
cells that are the mean and sample std (statistics module) of the runs' own JSON, and recall
columns; that its KV columns and params match `train_ctxkv --kv-report` for each variant's flags
(written out here from the spec, not taken from kv_table.py); that every run of a workload saw the
same tokens; that Welch's two-standard-error mark is set on numbers worked by hand; that a second
run reuses every finished run and rebuilds the same table; that --table-only rebuilds it too;
that --compare passes against a copy of the run and fails on a moved number; that data/eval/*.bin
follow doc/formats.md; and that the README's table is the one the committed doc/results/cpu
JSON give. Needs only the standard library (the prepro venv is
enough; the PNG is checked only when matplotlib is there). Prints PASS/FAIL lines and
'N passed, N failed'; exits 1 on any failure.
"""
import argparse
import glob
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pythia-14m: H = 4 heads of D = 32, width 128
EXPECTED = {
    "mha": [], "gqa": ["--attn", "gqa", "--n-kv-head", "2"], "mqa": ["--attn", "mqa"],
    "mla": ["--attn", "mla", "--kv-rank", "128", "--rope-dim", "32"],
    "ctxkv-mha": ["--layer0", "ctxkv", "--context-dim", "64"],
    "ctxkv-gqa": ["--attn", "gqa", "--n-kv-head", "2", "--layer0", "ctxkv", "--context-dim", "64"],
    "ctxpythia": ["--model-type", "ctxpythia", "--context-dim", "64"],
}
EVAL_COLS = ("held-out loss (WikiText-2)", "LAMBADA acc")
EVAL_DECODED = ("held-out loss, decoded", "LAMBADA acc, decoded")
WORKLOADS = ("lm", "recall")
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}: {name}{'' if ok else '  -- ' + str(detail)}", flush=True)


def parse_table(path, which=0):
    """{first cell: {column: cell}} from the which-th markdown table in path (0: the variants,
    1: the decode-time eviction rows)."""
    tables, cur = [], None
    with open(path) as f:
        for line in f:
            if line.startswith("|"):
                if cur is None:
                    cur = []
                    tables.append(cur)
                if not line.startswith("|---"):
                    cur.append([c.strip() for c in line.strip().strip("|").split("|")])
            else:
                cur = None
    if which >= len(tables):
        return {}
    header, body = tables[which][0], tables[which][1:]
    return {r[0]: dict(zip(header, r)) for r in body}


def finite(cell):
    try:
        return all(math.isfinite(float(part.strip(" *").rstrip("M").split("x")[0])) for part in cell.split("±"))
    except ValueError:
        return False


def check_eval_files():
    wt, lb = (os.path.join(REPO, "data", "eval", n) for n in ("wikitext2_test.bin", "lambada_test.bin"))
    if not (os.path.isfile(wt) and os.path.isfile(lb)):
        print("SKIP: data/eval/*.bin absent (no ../shared/data): eval file checks", flush=True)
        return False
    with open(wt, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
        toks = struct.unpack(f"<{h[2]}H", f.read())
    check("wikitext2_test.bin: shard header, size, <|endoftext|> first and nowhere else",
          h[:2] == (20240520, 1) and len(toks) == h[2] > 250_000 and toks[0] == 0 and 0 not in toks[1:],
          f"header {h[:3]}, {len(toks)} tokens")
    with open(lb, "rb") as f:
        h = struct.unpack("<256i", f.read(1024))
        pairs = struct.unpack(f"<{2 * h[2]}i", f.read(8 * h[2]))
        rest = f.read()
    n_ctx, n_tgt = pairs[0::2], pairs[1::2]
    check("lambada_test.bin: magic, 5153 examples, lengths add up to the tokens and the file",
          h[:3] == (20261128, 1, 5153) and sum(n_ctx) + sum(n_tgt) == h[3] == len(rest) // 2
          and len(rest) == 2 * h[3] and min(n_ctx) >= 1 and min(n_tgt) >= 1, f"header {h[:4]}")
    return True


def run_files(out, wl, name):
    """The run JSONs of a (workload, variant) in seed order."""
    paths = sorted(glob.glob(os.path.join(out, wl, f"{name}_s*.json")))
    return [json.load(open(p)) for p in paths]


def check_cells(out, table):
    """Cells are mean +- sample std of the runs' JSON numbers, worked here with statistics."""
    bad = []
    for name, row in table.items():
        for col, wl, get, fmt in (("val loss", "lm", lambda r: r["val_loss"], ".4f"),
                                  ("recall acc", "recall", lambda r: r["recall"]["acc"], ".3f"),
                                  ("recall 2 pairs", "recall", lambda r: r["recall"]["by_pairs"]["2"], ".3f")):
            xs = [get(r) for r in run_files(out, wl, name)]
            want = f"{statistics.mean(xs):{fmt}} ± {statistics.stdev(xs):{fmt}}" if len(xs) > 1 else "?"
            if row.get(col, "").rstrip(" *") != want:
                bad.append(f"{name} {col}: {row.get(col)!r}, runs give {want!r}")
    check("table cells are mean ± std (sample) over the seeds' JSON, for val loss and recall", not bad, bad)


def check_welch():
    """The significance mark, on numbers worked by hand."""
    sys.path.insert(0, os.path.join(REPO, "dev"))
    import kv_table
    # a: mean 1.1, s 0.1; b: mean 1.4, s 0.1; SE = sqrt(0.01/3 + 0.01/3) = 0.0816; |diff| 0.3 > 0.163
    a = kv_table.mean_std([1.0, 1.1, 1.2])
    b = kv_table.mean_std([1.3, 1.4, 1.5])
    # c: mean 1.2, s 0.1: |diff| 0.1 < 0.163; d: one seed: never marked
    c = kv_table.mean_std([1.1, 1.2, 1.3])
    d = kv_table.mean_std([5.0])
    ok = abs(a[0] - 1.1) < 1e-12 and abs(a[1] - 0.1) < 1e-12 and a[2] == 3
    check("Welch mark: 0.3 apart at s 0.1 (3 seeds each) marked; 0.1 apart not; a single seed never",
          ok and kv_table.differs(a, b) and not kv_table.differs(a, c) and not kv_table.differs(a, d),
          (a, b, c, d))
    # unequal variances: s 0.5 vs 0.01 over 2 seeds: SE = sqrt(0.25/2 + 0.0001/2) = 0.3536
    e, f = kv_table.mean_std([1.0, 1.7071]), kv_table.mean_std([2.0, 2.01])
    check("Welch mark uses each side's own variance (diff 0.65 < 2 SE 0.71: not marked)", not kv_table.differs(e, f),
          (e, f))


def check_compare(out):
    """--compare: the run against a copy of itself passes; a copy with a moved loss and KV figure fails,
    naming both numbers."""
    ref = tempfile.mkdtemp(prefix="test_kv_compare_")
    try:
        for wl in WORKLOADS:
            shutil.copytree(os.path.join(out, wl), os.path.join(ref, wl))
        cmd = [sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--table-only", "--compare", ref]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        check("--compare against an identical copy: exit 0, 0 numbers outside tolerance",
              r.returncode == 0 and "0 number(s) outside tolerance" in r.stdout, r.stdout[-1500:] + r.stderr)
        for wl, name, key, delta in (("lm", "mha", "val_loss", 0.2), ("lm", "gqa", "kv_bytes_per_token_bf16", 2)):
            path = os.path.join(ref, wl, f"{name}_s1.json")
            with open(path) as f:
                res = json.load(f)
            res[key] += delta
            with open(path, "w") as f:
                json.dump(res, f)
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        diffs = [line.split()[1:3] for line in r.stdout.splitlines() if line.startswith("DIFF")]
        check("--compare with mha val_loss +0.2 and gqa KV bytes +2: exit 1, exactly those two DIFF lines",
              r.returncode == 1 and sorted(diffs) == [["lm/gqa_s1", "kv_bytes_per_token_bf16"], ["lm/mha_s1", "val_loss"]],
              f"exit {r.returncode}, {diffs}")
    finally:
        shutil.rmtree(ref, ignore_errors=True)


def check_published():
    """The README's table is the one --table-only builds from the committed doc/results/cpu JSON."""
    pub = os.path.join(REPO, "doc", "results", "cpu")
    tmp = tempfile.mkdtemp(prefix="test_kv_published_")
    try:
        for d in WORKLOADS + ("speed",):
            if os.path.isdir(os.path.join(pub, d)):
                shutil.copytree(os.path.join(pub, d), os.path.join(tmp, d))
        r = subprocess.run([sys.executable, "dev/kv_table.py", "--out", tmp, "--table-only"],
                           cwd=REPO, capture_output=True, text=True)
        rebuilt = open(os.path.join(tmp, "kv_table.md")).read() if r.returncode == 0 else r.stderr
        with open(os.path.join(pub, "kv_table.md")) as f:
            committed = f.read()
        check("doc/results/cpu/kv_table.md is what --table-only builds from its JSON files",
              rebuilt == committed, rebuilt[-1000:])
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        rows = [line for line in committed.splitlines() if line.startswith("|")]
        missing = [row.split("|")[1].strip() for row in rows if row not in readme]
        n_evict = len(parse_table(os.path.join(pub, "kv_table.md"), 1))
        check(f"README.md carries the published tables' {len(rows)} lines verbatim (7 variants, {n_evict} eviction rows)",
              len(rows) == 9 + (n_evict + 2 if n_evict else 0) and not missing, f"rows not in README: {missing}")
        seeds = {json.load(open(p))["seed"] for p in glob.glob(os.path.join(pub, "recall", "mha_s*.json"))}
        check("the published table has at least 3 seeds of mha's recall runs", len(seeds) >= 3, seeds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# the quick scale's eviction rows, written out here: lm decodes windows of T = 64 (a context of
# 64 - 32 + 1 = 33 tokens), recall the key-value part of 4 pairs (8 tokens)
EVICT_EXPECTED = {  # label: (base, policy, lm budget, recall budget)
    "mha, decoded": ("mha", "full", None, None), "mha+streaming 50%": ("mha", "streaming", 16, 4),
    "mha+streaming 25%": ("mha", "streaming", 8, 2), "mha+snapkv 50%": ("mha", "snapkv", 16, 4),
    "mha+snapkv 25%": ("mha", "snapkv", 8, 2), "gqa, decoded": ("gqa", "full", None, None),
    "gqa+snapkv 50%": ("gqa", "snapkv", 16, 4), "mla, decoded": ("mla", "full", None, None),
    "mla+snapkv 50%": ("mla", "snapkv", 16, 4),
}


def check_evict(out, md, have_eval):
    """The eviction rows: one per row with its budget, decoded under its policy; with the full cache
    decoding gives each base run's own recall counts (the parallel evaluation's). Without the
    evaluation files (no ../shared) the lm rows are not evaluated, and their cells are n/a."""
    table = parse_table(md, 1) if os.path.isfile(md) else {}
    check("kv_table.md has a decode-time eviction row for each row", sorted(table) == sorted(EVICT_EXPECTED), sorted(table))
    for label, (base, policy, b_lm, b_rc) in EVICT_EXPECTED.items():
        row = table.get(label, {})
        want = ("all", "all") if policy == "full" else (f"{b_lm} of 33 ", f"{b_rc} of 8 ")
        want = want if have_eval else ("n/a", want[1])
        got = (row.get("kept of the lm prompt", ""), row.get("kept of the recall prompt", ""))
        check(f"{label}: keeps {want[0].strip()} of the lm prompt and {want[1].strip()} of the recall prompt",
              got[0].startswith(want[0]) and got[1].startswith(want[1]), got)
        bad = [c for c in row if c.endswith("decoded") and (have_eval or c not in EVAL_DECODED) and not finite(row[c])]
        check(f"{label}: finite decoded numbers", row and not bad, bad)
    for wl in WORKLOADS:
        evs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, wl, "evict", "*.json")))]
        modes = {(r["label"], r.get("eval_mode"), r.get("kv_policy")) for r in evs}
        n = 18 if have_eval or wl == "recall" else 0
        ok = all(m == "decoding" and (p == "full") == lab.endswith("decoded") for lab, m, p in modes) and len(evs) == n
        check(f"{wl}: {n} eviction evaluations (9 rows x 2 seeds), all by decoding, under their policies", ok, sorted(modes))
    same = []
    for base in ("mha", "gqa", "mla"):
        for r in run_files(out, "recall", base):
            p = os.path.join(out, "recall", "evict", f"{base}.full_s{r['seed'] - 1337}.json")
            e = json.load(open(p)) if os.path.isfile(p) else {}
            same.append((base, r["seed"], (r.get("recall") or {}).get("acc"), (e.get("recall") or {}).get("acc")))
    check("recall decoded with the full cache = the parallel recall of the same model, run by run (within 0.01: "
          "the quick models are near chance, where a 1e-6 logit difference can flip an argmax)",
          len(same) == 6 and all(a is not None and b is not None and abs(a - b) <= 0.01 for _, _, a, b in same), same)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="./train_ctxkv")
    ap.add_argument("--keep", help="write the quick run here and keep it (default: a temp folder)")
    args = ap.parse_args()
    out = args.keep or tempfile.mkdtemp(prefix="test_kv_table_")
    t0 = time.time()
    cmd = [sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--binary", args.binary]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.time() - t0
    check(f"kv_table.py --quick exits 0 ({dt:.0f} s)", r.returncode == 0,
          (r.stdout[-3000:] + r.stderr[-3000:]).strip())
    check("kv_table.py --quick under 5 minutes", dt < 300, f"{dt:.0f} s")
    have_eval = check_eval_files()
    check_published()
    check_welch()
    md = os.path.join(out, "kv_table.md")
    table = parse_table(md) if os.path.isfile(md) else {}
    check("kv_table.md has a row per variant", sorted(table) == sorted(EXPECTED), sorted(table))
    cols = next(iter(table.values()), {})
    check("kv_table.md has recall columns: overall and per pair count (2, 4)",
          all(c in cols for c in ("recall acc", "recall 2 pairs", "recall 4 pairs")), list(cols))
    check_cells(out, table)
    tokens = {wl: set() for wl in WORKLOADS}
    for name, flags in EXPECTED.items():
        row = table.get(name)
        if not row:
            continue
        bad = [f"{c}={row[c]}" for c in row if c != "variant" and (have_eval or c not in EVAL_COLS) and not finite(row[c])]
        check(f"{name}: finite numbers in every column", not bad, bad)
        rep = subprocess.run([args.binary, "--model", "pythia-14m"] + flags + ["--kv-report"],
                             cwd=REPO, capture_output=True, text=True)
        try:
            kv = json.loads(rep.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            check(f"{name}: --kv-report runs", False, rep.stderr)
            continue
        got = (row["KV bytes/token/layer (bf16)"], row["KV bytes/token (bf16, all layers)"], row["params"])
        want = (str(kv["kv_bytes_per_token_per_layer_bf16"]), str(kv["kv_bytes_per_token_bf16"]),
                f"{kv['params'] / 1e6:.2f}M")
        check(f"{name}: KV bytes and params match --kv-report {' '.join(flags)}", got == want, f"{got} vs {want}")
        runs = {wl: run_files(out, wl, name) for wl in WORKLOADS}
        for wl, rs in runs.items():
            tokens[wl].update(r.get("tokens_seen") for r in rs)
        check(f"{name}: 2 seeds per workload, each JSON with its variant, seed, wall time and a log",
              all(len(rs) == 2 and [r["seed"] for r in rs] == [1337, 1338] for rs in runs.values()) and
              all(r.get("variant") == name and r.get("wall_s", 0) > 0 and not os.path.isabs(r["run_dir"])
                  and os.path.isfile(os.path.join(out, r["run_dir"], "log.jsonl")) for rs in runs.values() for r in rs),
              {wl: [(r.get("variant"), r.get("seed")) for r in rs] for wl, rs in runs.items()})
    for wl in WORKLOADS:
        check(f"{wl}: every run saw the same tokens", len(tokens[wl]) == 1 and None not in tokens[wl], tokens[wl])
    check_evict(out, md, have_eval)
    mha = table.get("mha", {}).get("KV reduction vs mha", "")
    mqa = table.get("mqa", {}).get("KV reduction vs mha", "")
    check("KV reduction column: mha 1.00x, mqa 4.00x", mha.startswith("1.00x") and mqa.startswith("4.00x"), (mha, mqa))
    if os.path.isfile(md):
        with open(md) as f:
            before = f.read()
        t1 = time.time()
        r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        with open(md) as f:
            check(f"a second run reuses all 28 finished runs and rebuilds the same table ({time.time() - t1:.0f} s)",
                  r2.returncode == 0 and "reusing 28 finished run(s)" in r2.stdout and "=== run" not in r2.stdout
                  and "=== decode-time eviction" not in r2.stdout and f.read() == before, r2.stdout[-1500:] + r2.stderr[-1500:])
        r2 = subprocess.run([sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--table-only"],
                            cwd=REPO, capture_output=True, text=True)
        with open(md) as f:
            check("--table-only rebuilds the same table", r2.returncode == 0 and f.read() == before, r2.stderr)
        check_compare(out)
    try:
        import matplotlib  # noqa: F401
        check("kv_pareto.png, kv_losses.png and kv_eviction.png written",
              all(os.path.getsize(os.path.join(out, p)) > 10_000 for p in ("kv_pareto.png", "kv_losses.png", "kv_eviction.png")))
    except ImportError:
        check("without matplotlib the PNGs are skipped with a message", "matplotlib is not installed" in r.stdout)
    if not args.keep and all(results):
        shutil.rmtree(out, ignore_errors=True)
    elif not all(results):
        print(f"(run kept in {out})")
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
