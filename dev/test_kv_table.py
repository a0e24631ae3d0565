"""Smoke test of dev/kv_table.py --quick and of the evaluation files it uses.

    .venv/bin/python dev/test_kv_table.py [--binary ./train_ctxkv] [--keep DIR]

Runs `dev/kv_table.py --quick` into a temporary folder (about 1 minute, one thread), then checks
that kv_table.md has one row per variant with finite numbers, that its KV columns and params match
`train_ctxkv --kv-report` for each variant's flags (written out here from the spec, not taken from
kv_table.py), that every variant saw the same tokens, that --table-only rebuilds the same table,
that --compare passes against a copy of the run and fails on a moved number, and that
data/eval/*.bin follow doc/formats.md; and that the README's table is the one the committed
doc/results/cpu/*.json give. Needs only the standard library (the prepro venv is
enough; the PNG is checked only when matplotlib is there). Prints PASS/FAIL lines and
'N passed, N failed'; exits 1 on any failure.
"""
import argparse
import json
import math
import os
import shutil
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
EVAL_COLS = ("held-out loss (WikiText-2)", "LAMBADA acc", "LAMBADA ppl")
results = []


def check(name, ok, detail=""):
    results.append(bool(ok))
    print(f"{'PASS' if ok else 'FAIL'}: {name}{'' if ok else '  -- ' + str(detail)}", flush=True)


def parse_table(path):
    """{variant: {column: cell}} from the markdown table in path."""
    with open(path) as f:
        rows = [[c.strip() for c in line.strip().strip("|").split("|")]
                for line in f if line.startswith("|") and not line.startswith("|---")]
    header, body = rows[0], rows[1:]
    return {r[0]: dict(zip(header, r)) for r in body}


def finite(cell):
    try:
        return math.isfinite(float(cell.rstrip("M").split("x")[0]))
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


def check_compare(out):
    """--compare: the run against a copy of itself passes; a copy with a moved loss and KV figure fails,
    naming both numbers."""
    ref = tempfile.mkdtemp(prefix="test_kv_compare_")
    try:
        for name in EXPECTED:
            if os.path.isfile(os.path.join(out, f"{name}.json")):
                shutil.copy(os.path.join(out, f"{name}.json"), ref)
        cmd = [sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--table-only", "--compare", ref]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        check("--compare against an identical copy: exit 0, 0 numbers outside tolerance",
              r.returncode == 0 and "0 number(s) outside tolerance" in r.stdout, r.stdout[-1500:] + r.stderr)
        for name, key, delta in (("mha", "val_loss", 0.2), ("gqa", "kv_bytes_per_token_bf16", 2)):
            path = os.path.join(ref, f"{name}.json")
            with open(path) as f:
                res = json.load(f)
            res[key] += delta
            with open(path, "w") as f:
                json.dump(res, f)
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        diffs = [line.split()[1:3] for line in r.stdout.splitlines() if line.startswith("DIFF")]
        check("--compare with mha val_loss +0.2 and gqa KV bytes +2: exit 1, exactly those two DIFF lines",
              r.returncode == 1 and sorted(diffs) == [["gqa", "kv_bytes_per_token_bf16"], ["mha", "val_loss"]],
              f"exit {r.returncode}, {diffs}")
    finally:
        shutil.rmtree(ref, ignore_errors=True)


def check_published():
    """The README's table is the one --table-only builds from the committed doc/results/cpu/*.json."""
    pub = os.path.join(REPO, "doc", "results", "cpu")
    tmp = tempfile.mkdtemp(prefix="test_kv_published_")
    try:
        for name in EXPECTED:
            shutil.copy(os.path.join(pub, f"{name}.json"), tmp)
        r = subprocess.run([sys.executable, "dev/kv_table.py", "--out", tmp, "--table-only"],
                           cwd=REPO, capture_output=True, text=True)
        with open(os.path.join(tmp, "kv_table.md")) as f:
            rebuilt = f.read()
        with open(os.path.join(pub, "kv_table.md")) as f:
            committed = f.read()
        check("doc/results/cpu/kv_table.md is what --table-only builds from its JSON files",
              r.returncode == 0 and rebuilt == committed, r.stderr[-1000:])
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        rows = [line for line in committed.splitlines() if line.startswith("|")]
        missing = [row.split("|")[1].strip() for row in rows if row not in readme]
        check(f"README.md carries the published table's {len(rows)} lines verbatim", len(rows) == 9 and not missing,
              f"rows not in README: {missing}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="./train_ctxkv")
    ap.add_argument("--keep", help="write the quick run here and keep it (default: a temp folder)")
    args = ap.parse_args()
    out = args.keep or tempfile.mkdtemp(prefix="test_kv_table_")
    t0 = time.time()
    r = subprocess.run([sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--binary", args.binary],
                       cwd=REPO, capture_output=True, text=True)
    dt = time.time() - t0
    check(f"kv_table.py --quick exits 0 ({dt:.0f} s)", r.returncode == 0,
          (r.stdout[-3000:] + r.stderr[-3000:]).strip())
    check("kv_table.py --quick under 5 minutes", dt < 300, f"{dt:.0f} s")
    have_eval = check_eval_files()
    check_published()
    md = os.path.join(out, "kv_table.md")
    table = parse_table(md) if os.path.isfile(md) else {}
    check("kv_table.md has a row per variant", sorted(table) == sorted(EXPECTED), sorted(table))
    tokens = set()
    for name, flags in EXPECTED.items():
        row = table.get(name)
        if not row:
            continue
        cols = [c for c in row if c != "variant" and (have_eval or c not in EVAL_COLS)]
        bad = [f"{c}={row[c]}" for c in cols if not finite(row[c])]
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
        with open(os.path.join(out, f"{name}.json")) as f:
            res = json.load(f)
        tokens.add(res.get("tokens_seen"))
        check(f"{name}: {name}.json has the variant, wall time and a log",
              res.get("variant") == name and res.get("wall_s", 0) > 0
              and not os.path.isabs(res["run_dir"]) and os.path.isfile(os.path.join(out, res["run_dir"], "log.jsonl")), res.get("variant"))
    check("every variant saw the same tokens", len(tokens) == 1 and None not in tokens, tokens)
    mha = table.get("mha", {}).get("KV reduction vs mha", "")
    mqa = table.get("mqa", {}).get("KV reduction vs mha", "")
    check("KV reduction column: mha 1.00x, mqa 4.00x", mha.startswith("1.00x") and mqa.startswith("4.00x"), (mha, mqa))
    if os.path.isfile(md):
        with open(md) as f:
            before = f.read()
        r2 = subprocess.run([sys.executable, "dev/kv_table.py", "--quick", "--out", out, "--table-only"],
                            cwd=REPO, capture_output=True, text=True)
        with open(md) as f:
            check("--table-only rebuilds the same table", r2.returncode == 0 and f.read() == before, r2.stderr)
        check_compare(out)
    try:
        import matplotlib  # noqa: F401
        check("kv_losses.png written", os.path.getsize(os.path.join(out, "kv_losses.png")) > 10_000)
    except ImportError:
        check("without matplotlib the PNG is skipped with a message", "matplotlib is not installed" in r.stdout)
    if not args.keep and all(results):
        shutil.rmtree(out, ignore_errors=True)
    elif not all(results):
        print(f"(run kept in {out})")
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
