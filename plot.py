"""
The report's figures, from what the stage scripts write:

    python plot.py --out_dir=out

finds every pre-training log (log.jsonl) and results file (results.jsonl) under out_dir, writes
out_dir/fig2_loss.png (each run's loss per epoch, and its k-NN top-1 where the log has it),
out_dir/fig3_accuracy.png (top-1 against pre-training epoch, one line per pre-training run, method and
recipe; a fine-tuning from scratch is a dashed level) and prints the results as a Markdown table.
pretrain.py draws its own loss.png with plot_loss.
"""
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt

from configurator import configure

# -----------------------------------------------------------------------------
out_dir = "out"  # the folder searched for log.jsonl and results.jsonl, and where the figures go
# -----------------------------------------------------------------------------

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
    """Figure 2: each run's mean pre-training loss per epoch and, beside it if a log has any, k-NN top-1."""
    paths = [log_paths] if isinstance(log_paths, str) else log_paths
    logs = {os.path.dirname(p): read_jsonl(p, ("epoch", "loss")) for p in paths}
    knn = {run: [r for r in rows if r.get("knn_top1") is not None] for run, rows in logs.items()}
    fig, axes = plt.subplots(1, 2 if any(knn.values()) else 1, figsize=(11 if any(knn.values()) else 6, 4),
                             squeeze=False)
    for run, rows in logs.items():
        marker = "o" if len(rows) <= 20 else None  # a log of one epoch is one point
        axes[0, 0].plot([r["epoch"] for r in rows], [r["loss"] for r in rows], marker=marker, markersize=3,
                        label=run)
        if knn[run]:
            axes[0, 1].plot([r["epoch"] for r in knn[run]], [r["knn_top1"] for r in knn[run]], marker="o",
                            markersize=3, label=run)
    axes[0, 0].set(xlabel="epoch", ylabel="training loss: mean squared error on the masked patches")
    if any(knn.values()):
        axes[0, 1].set(xlabel="epoch", ylabel="k-NN top-1 on the validation images (%)")
    last = max((rows[-1]["epoch"] for rows in logs.values() if rows), default=0)
    fig.suptitle(f"MAE pre-training of {', '.join(logs)}, epoch {last}" if len(logs) == 1 else
                 f"MAE pre-training, {len(logs)} runs")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if len(logs) > 1:
            ax.legend(fontsize=7)
    write_png(fig, png_path)

def accuracy_lines(results):
    """Figure 3's lines: {(pre-training run, method, recipe): [(pre-training epoch, top-1), ...]}. A run is
    the checkpoints' folder; a checkpoint evaluated again the same way shows its latest result."""
    lines = {}
    for r in results:
        if r["pretrain_epoch"] is not None:  # not from scratch
            line = lines.setdefault((os.path.dirname(r["checkpoint"]), r["method"], r["recipe"]), {})
            line[r["pretrain_epoch"]] = r["top1"]
    return {line: sorted(points.items()) for line, points in sorted(lines.items())}

def scratch_baselines(results):
    """{"method (recipe)": top-1} of the latest runs without pre-training (finetune.py --init=scratch)."""
    return {f"{r['method']} ({r['recipe']})": r["top1"] for r in results if r["pretrain_epoch"] is None}

def plot_accuracy(results, png_path):
    """Figure 3: top-1 against pre-training epoch, one line per pre-training run, method and recipe; a
    fine-tuning from scratch is a dashed level: what pre-training has to beat."""
    fig, ax = plt.subplots(figsize=(6, 4))
    lines = accuracy_lines(results)
    for (run, method, recipe), points in lines.items():
        ax.plot(*zip(*points), marker="o", label=f"{run}: {method} ({recipe})")
    for i, (what, top1) in enumerate(scratch_baselines(results).items(), start=len(lines)):
        ax.axhline(top1, linestyle="--", color=f"C{i % 10}", label=f"no pre-training: {what}")
    ax.set(xlabel="pre-training epoch", ylabel="validation top-1 (%)",
           title=f"Tiny ImageNet, ViT-Lite MAE: {out_dir}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the plot: it hides no point
    write_png(fig, png_path)

RESULT_KEYS = ("checkpoint", "pretrain_epoch", "method", "recipe", "top1", "wall_s", "hardware")

def markdown_table(results):
    lines = ["| checkpoint | pre-training epoch | method | recipe | top-1 | best epoch's top-1 | top-5 | "
             "wall time | hardware |", "|---|---|---|---|---|---|---|---|---|"]
    optional = lambda r, key: "" if r.get(key) is None else f"{r[key]:.2f}"  # knn has no best epoch
    for r in sorted(results, key=lambda r: (r["method"], r["recipe"], r["pretrain_epoch"] or 0)):
        epoch = "none" if r["pretrain_epoch"] is None else f"{r['pretrain_epoch']:g}"
        lines.append(f"| {r['checkpoint']} | {epoch} | {r['method']} | {r['recipe']} | {r['top1']:.2f} | "
                     f"{optional(r, 'best_top1')} | {optional(r, 'top5')} | {r['wall_s']:.0f} s | "
                     f"{r['hardware']} |")
    return "\n".join(lines)

if __name__ == "__main__":
    configure(globals(), sys.argv[1:])
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
