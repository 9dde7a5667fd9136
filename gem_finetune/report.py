"""Measuring and reporting: dev metrics (accuracy, Matthews correlation), the process's memory
from /proc, per-method summaries, the Markdown table and the plots."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where Linux lacks it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mib(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def matthews(labels: list[int], predictions: list[int], num_labels: int) -> float:
    """Matthews correlation for any number of classes (Gorodkin's R_K); 0 when undefined."""
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for y, p in zip(labels, predictions):
        confusion[y][p] += 1
    n = len(labels)
    correct = sum(confusion[k][k] for k in range(num_labels))
    true_count = [sum(confusion[k]) for k in range(num_labels)]
    pred_count = [sum(confusion[i][k] for i in range(num_labels)) for k in range(num_labels)]
    numerator = correct * n - sum(t * p for t, p in zip(true_count, pred_count))
    denominator = math.sqrt(n * n - sum(p * p for p in pred_count)) * math.sqrt(n * n - sum(t * t for t in true_count))
    return numerator / denominator if denominator else 0.0


def evaluate(model, dev_batches: list[dict], num_labels: int) -> dict:
    model.eval()
    labels, predictions = [], []
    with torch.no_grad():
        for batch in dev_batches:
            logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    model.train()
    accuracy = sum(int(y == p) for y, p in zip(labels, predictions)) / len(labels)
    return {"accuracy": accuracy, "mcc": matthews(labels, predictions, num_labels)}


def per_tensor_budget(optimizer) -> dict[str, int]:
    """Selected entries per target tensor, by parameter name."""
    return {str(row["name"]): int(row["count"]) for row in optimizer.selection_report()}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    acc = mean_std([r["accuracy"] for r in runs])
    mcc = mean_std([r["mcc"] for r in runs])
    peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None]
    return {"method": runs[0]["method"], "density": runs[0].get("density"),
            "lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs],
            "accuracy_mean": acc[0], "accuracy_std": acc[1], "mcc_mean": mcc[0], "mcc_std": mcc[1],
            "trainable_entries": runs[0]["trainable_entries"],
            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
            "peak_rss_mib": max(peaks) if peaks else None,
            "median_step_seconds": statistics.median(r["median_step_seconds"] for r in runs)}


def table(summaries: dict[str, dict]) -> str:
    head = ("| method | lr | dev acc % (mean ± std) | dev MCC (mean ± std) | trainable entries "
            "| optimizer state | peak RSS MiB | step ms (median) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, s in summaries.items():
        peak = f"{s['peak_rss_mib']:.0f}" if s["peak_rss_mib"] is not None else "n/a"
        lines.append(f"| {method} | {s['lr']:g} | {100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f} "
                     f"| {s['mcc_mean']:.3f} ± {s['mcc_std']:.3f} | {s['trainable_entries']:,} "
                     f"| {_bytes(s['optimizer_state_bytes'])} | {peak} | {1000 * s['median_step_seconds']:.0f} |")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def plot(results: dict, path: Path, metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gem_budget = next((r["per_tensor_budget"] for r in results["runs"] if r["method"] == "gem"), None)
    panels = 3 if gem_budget else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for method in results["summary"]:  # a label: the method, or METHOD@DENSITY on a density curve
        runs = [r for r in results["runs"]
                if r.get("label", r["method"]) == method and r["lr"] == results["summary"][method]["lr"]]
        steps = min(len(r["losses"]) for r in runs)
        mean_loss = [statistics.fmean(r["losses"][i] for r in runs) for i in range(steps)]
        window = max(1, steps // 20)  # a running mean so the curves can be told apart
        smooth = [statistics.fmean(mean_loss[max(0, i - window + 1):i + 1]) for i in range(steps)]
        axes[0].plot(range(1, steps + 1), smooth, label=method)
        curve = runs[0]["dev_curve"]
        axes[1].plot([c["step"] for c in curve],
                     [statistics.fmean(r["dev_curve"][i][metric] for r in runs) for i in range(len(curve))],
                     marker="o", label=method)
    axes[0].set(title="training loss (mean over seeds, running mean)", xlabel="step", ylabel="loss")
    axes[1].set(title=f"dev {metric} (mean over seeds)", xlabel="step", ylabel=metric)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    if gem_budget:
        labels = [n.replace("encoder.", "").replace("layer.", "L").replace(".attention.self", "")
                  .replace(".weight", "") for n in gem_budget]
        axes[2].bar(range(len(labels)), list(gem_budget.values()))
        axes[2].set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        axes[2].set(title="GEM budget per tensor (first seed)", ylabel="selected entries")
    fig.suptitle(f"{results['task']}: {results['settings']['train_examples']} train examples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_density(results: dict, path: Path, metric: str) -> None:
    """The dev metric (mean ± std over seeds) against density, one line per sparse method; the
    dense methods of the same run, which no density changes, as horizontal references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = 100 if metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    curves: dict[str, list] = {}
    dense = 0
    for label, s in results["summary"].items():
        mean, std = scale * s[f"{metric}_mean"], scale * s[f"{metric}_std"]
        if s.get("density") is None:
            dense += 1  # colours from the far end of the cycle, apart from the curves'
            ax.axhline(mean, linestyle="--", linewidth=1, color=f"C{10 - dense}", label=f"{label} (dense)")
        else:
            curves.setdefault(s["method"], []).append((s["density"], mean, std))
    for method, points in curves.items():
        points.sort()
        ax.errorbar([100 * d for d, _, _ in points], [m for _, m, _ in points], yerr=[sd for _, _, sd in points],
                    marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ticks = sorted({100 * d for points in curves.values() for d, _, _ in points})
    ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="density (share of all parameters trained)", ylabel=f"dev {metric}" + (" %" if metric == "accuracy" else ""),
           title=f"{results['task']}: dev {metric} against density (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    """A results JSON as Markdown: settings, the command, the table, each lr grid with its
    held-out scores (flagging a choice at the edge of its grid) and the chosen lrs."""
    s, metric = results["settings"], results["settings"]["select_metric"]
    curve = " (density curve)" if len(s.get("densities", [])) > 1 else ""
    lines = [f"## {results['task']}{curve}", ""]
    if not results["complete"]:
        lines += ["**Incomplete**: the run stopped before its end; below is what it finished.", ""]
    lines += [f"{s['train_examples']} training examples, {s.get('heldout_examples', 0)} held-out, "
              f"dev n={s['eval_examples']} (the reported set), {s['epochs']} epochs, batch {s['batch_size']}, "
              f"max length {s['max_length']}, seeds {s['seeds']}; {s.get('lr_selection', 'lr choice not recorded')}.",
              "", f"`{' '.join(results['command'])}`", "", table(results["summary"]), ""]
    grid = {label: rows for label, rows in results["lr_grid"].items() if label in results["summary"]}
    if grid:
        value = (lambda v: f"{100 * v:.1f}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
        lines += [f"lr grids: held-out {metric} (mean over the grid seeds) of each lr; the chosen one in bold.", "",
                  f"| method | lr → held-out {metric} | note |", "|---|---|---|"]
        for label, rows in grid.items():
            chosen, lrs = results["summary"][label]["lr"], [r["lr"] for r in rows]
            cells = [f"{r['lr']:g} → {value(r[f'heldout_{metric}'])}" for r in rows]
            cells = [f"**{c}**" if r["lr"] == chosen else c for c, r in zip(cells, rows)]
            # A best lr at either end of its grid may not be the best lr at all.
            note = "chosen at the edge of the grid: widen it" if chosen in (min(lrs), max(lrs)) else ""
            lines.append(f"| {label} | {', '.join(cells)} | {note} |")
        lines.append("")
    lines += ["Chosen lrs: " + ", ".join(f"{label} {v['lr']:g}" for label, v in results["summary"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m gem_finetune.report RESULTS.json [...] > table.md
    import json
    import sys
    if len(sys.argv) < 2:
        sys.exit("usage: python -m gem_finetune.report RESULTS.json [RESULTS.json ...]")
    print("\n".join(markdown(json.loads(Path(name).read_text())) for name in sys.argv[1:]))
