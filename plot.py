"""
Figures of the report, from what the stage scripts write:

    python plot.py --out_dir=out

finds every pre-training log (log.jsonl) and evaluation results file (results.jsonl) under out_dir
and writes out_dir/fig2_loss.png (pre-training loss per epoch), out_dir/fig3_accuracy.png (top-1
against pre-training epoch, one line per pre-training run, method and recipe; a fine-tuning from scratch
as a dashed level) and prints the results as a Markdown table. pretrain.py also calls plot_loss and
save_reconstructions at each checkpoint.
"""
import glob
import json
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
import torch

from data import MEAN, STD


def read_jsonl(path, needed=()):
    """The rows of a JSON-lines file, each with the keys in needed; anything else is one line naming it."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except ValueError:
                raise SystemExit(f"error: {path}, line {number}, is not JSON: {line.strip()[:80]!r}")
            if line.strip() and not all(key in rows[-1] for key in needed):
                raise SystemExit(f"error: {path}, line {number}, lacks one of {', '.join(needed)}")
    return rows


def write_png(fig, path):
    tmp = f"{path}.tmp{os.getpid()}.png"  # matplotlib picks the format from the extension
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(f"error: cannot write {path}: {e.strerror}")
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_loss(log_paths, png_path):
    """Figure 2: mean pre-training loss per epoch, one line per log."""
    log_paths = [log_paths] if isinstance(log_paths, str) else log_paths
    fig, ax = plt.subplots(figsize=(6, 4))
    for path in log_paths:
        rows = read_jsonl(path, ("epoch", "loss"))
        ax.plot([r["epoch"] for r in rows], [r["loss"] for r in rows],
                marker="o" if len(rows) <= 20 else None, markersize=3,  # a log of one epoch is one point
                label=os.path.dirname(path))
    ax.set(xlabel="epoch", ylabel="training loss (masked patches)", title="MAE pre-training loss")
    ax.grid(alpha=0.3)
    if len(log_paths) > 1:
        ax.legend()
    write_png(fig, png_path)


def save_reconstructions(rows, png_path, title):
    """A grid of images: one row per tensor in rows (each (B, 3, H, W), normalised as the network's
    input): original, masked, reconstruction, reconstruction with the visible patches pasted back."""
    names = ["original", "masked", "reconstruction", "+ visible"]
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    B = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), B, figsize=(1.2 * B, 1.3 * len(rows)), squeeze=False)
    for r, batch in enumerate(rows):
        pictures = (batch.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for b in range(B):
            axes[r, b].imshow(pictures[b])
            axes[r, b].set_xticks([])
            axes[r, b].set_yticks([])
        axes[r, 0].set_ylabel(names[r], fontsize=8)
    fig.suptitle(textwrap.fill(title, max(40, 16 * B)), fontsize=9)  # a long title would widen a narrow grid
    write_png(fig, png_path)


def accuracy_lines(results):
    """Figure 3's lines: {(pre-training run, method, recipe): [(pre-training epoch, top-1), ...]}. A
    run is the checkpoints' folder; a checkpoint evaluated again the same way shows its latest result."""
    lines = {}
    for r in results:
        if r["pretrain_epoch"] is not None:  # not from scratch
            line = (os.path.dirname(r["checkpoint"]), r["method"], r["recipe"])
            lines.setdefault(line, {})[r["pretrain_epoch"]] = r["top1"]
    return {line: sorted(points.items()) for line, points in sorted(lines.items())}


def scratch_baselines(results):
    """{"method (recipe)": top-1} of the runs without pre-training (finetune.py --init=scratch), the latest
    of each."""
    return {f"{r['method']} ({r['recipe']})": r["top1"] for r in results if r["pretrain_epoch"] is None}


def plot_accuracy(results, png_path):
    """Figure 3: top-1 against pre-training epoch, one line per pre-training run, method and recipe;
    a fine-tuning from scratch is a dashed level: what pre-training has to beat."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = accuracy_lines(results)
    for (run, method, recipe), points in lines.items():
        ax.plot(*zip(*points), marker="o", label=f"{run}: {method} ({recipe})")
    for i, (what, top1) in enumerate(scratch_baselines(results).items(), start=len(lines)):
        ax.axhline(top1, linestyle="--", color=f"C{i % 10}", label=f"no pre-training: {what}")
    ax.set(xlabel="pre-training epoch", ylabel="validation top-1 (%)", title="Tiny ImageNet, ViT-Lite MAE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the plot: it never hides a point
    write_png(fig, png_path)


RESULT_KEYS = ("checkpoint", "pretrain_epoch", "method", "recipe", "top1", "wall_s", "hardware")


def markdown_table(results):
    lines = ["| checkpoint | pre-training epoch | method | recipe | top-1 | best epoch's top-1 | top-5 | wall time | "
             "hardware |", "|---|---|---|---|---|---|---|---|---|"]
    optional = lambda r, key: "" if r.get(key) is None else f"{r[key]:.2f}"  # knn has no best epoch
    for r in sorted(results, key=lambda r: (r["method"], r["recipe"], r["pretrain_epoch"] or 0)):
        epoch = "none" if r["pretrain_epoch"] is None else f"{r['pretrain_epoch']:g}"
        lines.append(f"| {r['checkpoint']} | {epoch} | {r['method']} | {r['recipe']} | {r['top1']:.2f} | "
                     f"{optional(r, 'best_top1')} | {optional(r, 'top5')} | {r['wall_s']:.0f} s | {r['hardware']} |")
    return "\n".join(lines)


def main(argv):
    out_dir = "out"
    for arg in argv:
        if not arg.startswith("--out_dir="):
            raise SystemExit(f"error: unknown argument {arg!r}; usage: python plot.py --out_dir=DIR")
        out_dir = arg.split("=", 1)[1]
    if not os.path.isdir(out_dir):
        raise SystemExit(f"error: out_dir {out_dir} is not a folder")
    logs = sorted(glob.glob(os.path.join(out_dir, "**", "log.jsonl"), recursive=True))
    result_files = sorted(glob.glob(os.path.join(out_dir, "**", "results.jsonl"), recursive=True))
    if not logs and not result_files:
        raise SystemExit(f"error: no log.jsonl or results.jsonl under {out_dir}")
    if logs:
        plot_loss(logs, os.path.join(out_dir, "fig2_loss.png"))
        print(f"wrote {os.path.join(out_dir, 'fig2_loss.png')} from {len(logs)} log(s)")
    results = [r for path in result_files for r in read_jsonl(path, RESULT_KEYS)]
    if accuracy_lines(results) or scratch_baselines(results):
        plot_accuracy(results, os.path.join(out_dir, "fig3_accuracy.png"))
        print(f"wrote {os.path.join(out_dir, 'fig3_accuracy.png')} from {len(results)} result(s)\n")
    if results:
        print(markdown_table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
