"""Plot train and val loss curves of train_ctxkv runs (their DIR/log.jsonl) into one PNG.

    python dev/plot_losses.py --out losses.png out/run1 out/run2 name=out/run3/log.jsonl

Each argument is a run folder, a log.jsonl, or NAME=either. Left panel: train loss (raw, faint,
and an exponential moving average); right panel: val loss; x = optimizer step.
Needs matplotlib (dev only, e.g. a devvenv/ made from dev/requirements-dev.txt); without it, plot() prints a note and returns False.
"""
import argparse
import json
import os
import sys


def read_log(path):
    """(train [(step, loss)], val [(step, val_loss)]) from a log.jsonl."""
    train, val = [], []
    with open(path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if r.get("type") == "train" and "loss" in r:
                train.append((r["step"], r["loss"]))
            elif r.get("type") == "val" and "val_loss" in r:
                val.append((r["step"], r["val_loss"]))
    return train, val


def ema(xs, alpha):
    out, m = [], None
    for x in xs:
        m = x if m is None else alpha * x + (1 - alpha) * m
        out.append(m)
    return out


def plot(runs, png, title=""):
    """runs: list of (name, log.jsonl path). Writes png; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping {png} "
              f"(run again with a Python that has it, e.g. devvenv/bin/python)")
        return False
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(13, 5))
    tops, bottoms, vtops, vbottoms = [], [], [], []
    for i, (name, path) in enumerate(runs):
        train, val = read_log(path)
        color = f"C{i % 10}"
        if train:
            steps, losses = zip(*train)
            smooth = ema(losses, alpha=min(1.0, 20 / len(losses)))
            ax_t.plot(steps, losses, color=color, alpha=0.15, linewidth=0.7)
            ax_t.plot(steps, smooth, color=color, linewidth=1.5, label=name)
            tops.append(smooth[len(smooth) // 10])
            bottoms.append(min(smooth))
        if val:
            steps, losses = zip(*val)
            ax_v.plot(steps, losses, "o-", color=color, markersize=3, label=name)
            vtops.append(losses[1] if len(losses) >= 4 else max(losses))
            vbottoms.append(min(losses))
    # the first tenth of training (loss ~11 -> ~7) would squash the rest: leave it off-scale
    if tops:
        ax_t.set_ylim(min(bottoms) - 0.2, max(tops) + 0.2)
    if vtops:
        ax_v.set_ylim(min(vbottoms) - 0.1, max(vtops) + 0.2)
    ax_t.set_title("train loss (EMA; raw faint; the first steps are off-scale)")
    ax_v.set_title("val loss (the step-0 point is off-scale)")
    for ax in (ax_t, ax_v):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")
    return True


def parse_run(arg):
    name, _, path = arg.rpartition("=")
    if os.path.isdir(path):
        path = os.path.join(path, "log.jsonl")
    name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name, path


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folder, log.jsonl, or NAME=either")
    ap.add_argument("--out", required=True, help="PNG to write")
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    runs = [parse_run(a) for a in args.runs]
    for _, p in runs:
        if not os.path.isfile(p):
            sys.exit(f"error: no log file {p}")
    sys.exit(0 if plot(runs, args.out, args.title) else 1)


if __name__ == "__main__":
    main()
