"""Measuring and reporting: dev metrics (accuracy, Matthews correlation), the process's memory
from /proc, per-method summaries, the Markdown table and the plots."""
from __future__ import annotations

import hashlib
import itertools
import math
import statistics
import sys
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


def reset_peak_memory(device: torch.device) -> bool:
    """Start a peak-memory measurement (see PEAK_MEMORY); False where it cannot be made."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def peak_memory_mib(device: torch.device) -> float | None:
    """The peak since ``reset_peak_memory(device)``, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mib("VmHWM")


# What the peak memory of a run measures, by device type.
PEAK_MEMORY = {"cpu": "peak resident set size (VmHWM) of the process, reset at the start of the run via "
                      "/proc/self/clear_refs; includes the data and the Python runtime",
               "cuda": "torch.cuda.max_memory_allocated, reset at the start of the run: tensors only, "
                       "not the CUDA context or the allocator's cache"}


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


def evaluate(model, dev_batches: list[dict], num_labels: int, device: torch.device = torch.device("cpu"),
             precision: str = "fp32") -> dict:
    from .models import autocast, to_device
    model.eval()
    labels, predictions = [], []
    with torch.no_grad():
        for batch in dev_batches:
            batch = to_device(batch, device)
            with autocast(device, precision):
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            predictions += logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    model.train()
    accuracy = sum(int(y == p) for y, p in zip(labels, predictions)) / len(labels)
    return {"accuracy": accuracy, "mcc": matthews(labels, predictions, num_labels)}


def per_tensor_budget(optimizer) -> dict[str, int]:
    """Selected entries per target tensor, by parameter name."""
    return {str(row["name"]): int(row["count"]) for row in optimizer.selection_report()}


def selection_sha256(optimizer) -> str:
    """sha256 of what the optimizer selected: each sparse tensor's name and sorted flat indices, in
    its order. Equal digests, the same entries: how the drop-in path's row shows that it trained
    what the explicit layer did."""
    entries = optimizer.selected_entries()
    digest = hashlib.sha256()
    for name, param in optimizer.sparse_params():
        digest.update(f"{name}:".encode())
        digest.update(entries[param][0].cpu().numpy().tobytes())
    return digest.hexdigest()


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    acc = mean_std([r["accuracy"] for r in runs])
    mcc = mean_std([r["mcc"] for r in runs])
    peaks = [r["peak_memory_mib"] for r in runs if r["peak_memory_mib"] is not None]
    return {"method": runs[0]["method"], "budget_fraction": runs[0]["budget_fraction"],
            "lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs],
            # a resumed comparison may have run its seeds on different devices: the table says so
            "device": "+".join(sorted({r["device"] for r in runs})),
            "accuracy_mean": acc[0], "accuracy_std": acc[1], "mcc_mean": mcc[0], "mcc_std": mcc[1],
            "trainable_entries": runs[0]["trainable_entries"],
            "optimizer_state_bytes": runs[0]["optimizer_state_bytes"],
            "peak_memory_mib": max(peaks) if peaks else None,
            "median_step_seconds": statistics.median(r["median_step_seconds"] for r in runs),
            "wall_seconds_mean": statistics.fmean(r["wall_seconds"] for r in runs)}


def table(summaries: dict[str, dict]) -> str:
    """The Markdown table of ``summaries`` (label -> summarize()). Peak memory is VmHWM on CPU and
    CUDA's allocator peak on CUDA (PEAK_MEMORY). Summaries written before the device, the wall
    time and the peak on CUDA were recorded show n/a there."""
    head = ("| method | lr | dev acc % (mean ± std) | dev MCC (mean ± std) | trainable entries "
            "| optimizer state | device | peak memory MiB | step ms (median) | s per run (mean) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, s in summaries.items():
        peak = s.get("peak_memory_mib", s.get("peak_rss_mib"))
        wall = s.get("wall_seconds_mean")
        lines.append(f"| {label} | {s['lr']:g} | {100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f} "
                     f"| {s['mcc_mean']:.3f} ± {s['mcc_std']:.3f} | {s['trainable_entries']:,} "
                     f"| {_bytes(s['optimizer_state_bytes'])} | {s.get('device', 'n/a')} "
                     f"| {'n/a' if peak is None else f'{peak:.0f}'} | {1000 * s['median_step_seconds']:.0f} "
                     f"| {'n/a' if wall is None else f'{wall:.1f}'} |")
    return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def dev_panel_title(settings: dict, metric: str) -> str:
    """What the dev panel of curves-TASK.png shows: the dev curve's examples (settings'
    ``dev_curve_examples``; files from before it existed scored all of dev after every epoch)."""
    n, curve = settings["eval_examples"], settings.get("dev_curve_examples", settings["eval_examples"])
    if curve == 0:
        return f"dev {metric} after the last epoch\n(all {n} dev examples; mean ± std over seeds)"
    if curve >= n:
        return f"dev {metric} after each epoch (all {n}\ndev examples; mean over seeds)"
    return f"dev {metric} after each epoch, on a fixed {curve} of\nthe {n} dev examples (mean over seeds)"


def plot(results: dict, path: Path, metric: str) -> None:
    """curves-TASK.png: each row's training loss; its dev metric, per epoch where the runs scored
    a dev curve, else after the last epoch as one point a row (sorted, so that a table of twenty
    rows reads at a glance); GEM's budget per tensor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gem_budget = next((r["per_tensor_budget"] for r in results["runs"] if r["method"] == "gem"), None)
    panels = 3 if gem_budget else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5.5))
    # more rows than the colour cycle has colours: the line style tells the repeated colours apart
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [(colour, dash) for dash in ("-", "--", ":") for colour in colours]
    scale = 100 if metric == "accuracy" else 1
    has_curve = all(r["dev_curve"] for r in results["runs"])
    for (label, summary), (colour, dash) in zip(results["summary"].items(), itertools.cycle(styles)):
        # a label: the method, or METHOD@FRACTION with several budgets
        runs = [r for r in results["runs"] if r.get("label", r["method"]) == label and r["lr"] == summary["lr"]]
        steps = min(len(r["losses"]) for r in runs)
        mean_loss = [statistics.fmean(r["losses"][i] for r in runs) for i in range(steps)]
        window = max(1, steps // 20)  # a running mean so the curves can be told apart
        smooth = [statistics.fmean(mean_loss[max(0, i - window + 1):i + 1]) for i in range(steps)]
        axes[0].plot(range(1, steps + 1), smooth, color=colour, linestyle=dash, label=label)
        if has_curve:
            points = min(len(r["dev_curve"]) for r in runs)
            axes[1].plot([c["step"] for c in runs[0]["dev_curve"][:points]],
                         [scale * statistics.fmean(r["dev_curve"][i][metric] for r in runs) for i in range(points)],
                         color=colour, linestyle=dash, marker="o", label=label)
    axes[0].set(title="training loss (mean over seeds, running mean)", xlabel="step", ylabel="loss")
    axes[0].legend(fontsize=6, ncol=2)
    unit = " %" if metric == "accuracy" else ""
    if has_curve:
        axes[1].set(title=dev_panel_title(results["settings"], metric), xlabel="step", ylabel=metric + unit)
        axes[1].legend(fontsize=6, ncol=2)
    else:  # dev after the last epoch: one point a row, best at the top
        rows = sorted(results["summary"].items(), key=lambda item: item[1][f"{metric}_mean"])
        axes[1].errorbar([scale * s[f"{metric}_mean"] for _, s in rows], range(len(rows)),
                         xerr=[scale * s[f"{metric}_std"] for _, s in rows], fmt="o", capsize=3)
        axes[1].set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
        axes[1].set_ylim(-1, len(rows))
        axes[1].grid(axis="x", linewidth=0.5)
        axes[1].set(title=dev_panel_title(results["settings"], metric), xlabel=metric + unit)
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


def plot_budget_curve(results: dict, path: Path, metric: str) -> None:
    """The dev metric (mean ± std over seeds) against the budget fraction, one line per budgeted
    method; the other methods of the same run, which no budget changes, as horizontal references."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scale = 100 if metric == "accuracy" else 1
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    curves: dict[str, list] = {}
    fixed = 0
    for label, s in results["summary"].items():
        mean, std = scale * s[f"{metric}_mean"], scale * s[f"{metric}_std"]
        if s["budget_fraction"] is None:
            # black, told apart by the dash: the colour cycle is the curves' (up to 8 of them)
            style = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))[fixed % 4]
            fixed += 1
            ax.axhline(mean, linestyle=style, linewidth=1, color="black", label=f"{label} (no budget)")
        else:
            curves.setdefault(s["method"], []).append((s["budget_fraction"], mean, std))
    for i, (method, points) in enumerate(curves.items()):
        points.sort()
        dodge = 1.04 ** (i - (len(curves) - 1) / 2)  # side by side, so that the error bars do not hide each other
        ax.errorbar([100 * f * dodge for f, _, _ in points], [m for _, m, _ in points],
                    yerr=[sd for _, _, sd in points], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ticks = sorted({100 * f for points in curves.values() for f, _, _ in points})
    ax.set_xticks(ticks, [f"{t:g} %" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel="budget (share of all model parameters)",
           ylabel=f"dev {metric}" + (" %" if metric == "accuracy" else ""),
           title=f"{results['task']}: dev {metric} against the budget (mean ± std over seeds)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, directory: Path) -> list[Path]:
    """curves-TASK.png and, where a method ran at several budget fractions, budget-curve-TASK.png."""
    metric, task = results["settings"]["select_metric"], results["task"]
    wrote = []
    if results["summary"]:
        plot(results, directory / f"curves-{task}.png", metric)
        wrote.append(directory / f"curves-{task}.png")
    if len({s["budget_fraction"] for s in results["summary"].values()} - {None}) > 1:
        plot_budget_curve(results, directory / f"budget-curve-{task}.png", metric)
        wrote.append(directory / f"budget-curve-{task}.png")
    return wrote


def lr_selection(settings: dict) -> str:
    """How an lr grid is decided, in words."""
    if not settings["heldout_examples"]:
        return "one lr per method: nothing is chosen"
    return (f"each lr grid is decided by the mean held-out {settings['select_metric']} of seeds "
            f"{settings['grid_seeds']} on {settings['heldout_examples']} examples of the training file "
            "apart from the training ones; dev is reported only")


def at_grid_edge(chosen: float, lrs: list[float]) -> bool:
    """Whether a grid of several lrs chose one of its ends: a best lr there may not be the best
    lr at all (the grid is widened beyond it)."""
    return len(lrs) > 1 and chosen in (min(lrs), max(lrs))


def markdown(results: dict) -> str:
    """Results (``results.load``) as Markdown: settings, the commands, the table, each lr grid with
    its held-out scores (flagging a choice at the edge of its grid) and the chosen lrs."""
    s, metric = results["settings"], results["settings"]["select_metric"]
    lines = [f"## {results['task']}", ""]
    if not results["complete"]:
        lines += ["**Incomplete**: some runs are missing; below is what is finished.", ""]
    lines += [f"{s['train_examples']} training examples, {s['heldout_examples']} held-out, "
              f"dev n={s['eval_examples']} (the reported set), {s['epochs']} epochs, batch {s['batch_size']}, "
              f"max length {s['max_length']}, {s['precision']}, seeds {s['seeds']}; {lr_selection(s)}.", ""]
    # Folded: the commands are the record of what wrote the file, several lines of several
    # hundred characters each that the settings line above already sums up.
    count = len(results["commands"])
    written_by = "The command" if count == 1 else f"The {count} commands"
    lines += [f"<details><summary>{written_by} that wrote this file</summary>",
              "", *(f"`{' '.join(command)}`\n" for command in results["commands"]), "</details>"]
    lines += ["", table(results["summary"]), ""]
    grid = {label: rows for label, rows in results["lr_grid"].items() if label in results["summary"]}
    if grid:
        value = (lambda v: f"{100 * v:.1f}") if metric == "accuracy" else (lambda v: f"{v:.3f}")
        lines += [f"lr grids: held-out {metric} (mean over the grid seeds) of each lr; the chosen one in bold.", "",
                  f"| method | lr → held-out {metric} | note |", "|---|---|---|"]
        for label, rows in grid.items():
            chosen, lrs = results["summary"][label]["lr"], [r["lr"] for r in rows]
            cells = [f"{r['lr']:g} → {value(r[f'heldout_{metric}'])}" for r in rows]
            cells = [f"**{c}**" if r["lr"] == chosen else c for c, r in zip(cells, rows)]
            note = "chosen at the edge of the grid: widen it" if at_grid_edge(chosen, lrs) else ""
            lines.append(f"| {label} | {', '.join(cells)} | {note} |")
        lines.append("")
    lines += ["Chosen lrs: " + ", ".join(f"{label} {v['lr']:g}" for label, v in results["summary"].items()), ""]
    return "\n".join(lines)


def _variant(settings: dict) -> str:
    """What sets a results file's runs apart from the table's plain ones: a 4-bit base, a path."""
    parts = []
    if settings.get("quantize_base"):
        parts.append(f"{settings['quantize_base'].upper()} base")
    if settings.get("sparse_path"):
        parts.append(f"{settings['sparse_path']} path")
    return ", ".join(parts)


def tasks_table(loaded: list[dict]) -> str:
    """One Markdown table of several results files (``results.load``), a column per task: each
    row's dev accuracy (mean ± std over its seeds) at the lr its grid chose. Rows: the methods
    without a budget, then each budget, in ``METHODS``' order; a file's settings that change how
    its runs train (a 4-bit base, a path) name its rows. A row a file lists but has not finished
    says so; a choice at an end of its grid is marked "edge", since it may not be the best lr. With
    several tasks, a last column gives the mean of a row's accuracies once every task has one: the
    number the defaults are chosen by (benchmarks/reproduce.md, "Defaults from the table")."""
    from .methods import METHODS
    tasks = list(dict.fromkeys(r["task"] for r in loaded))
    rows: dict[tuple, dict] = {}
    for results in loaded:
        variant = _variant(results["settings"])
        for label, s in results["summary"].items():
            edge = at_grid_edge(s["lr"], [g["lr"] for g in results["lr_grid"].get(label, [])])
            cell = (f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f} "
                    f"({s['lr']:g}{', edge' if edge else ''})")
            row = rows.setdefault((s["method"], s["budget_fraction"], variant), {})
            row[results["task"]] = cell
            row.setdefault("accuracy", {})[results["task"]] = s["accuracy_mean"]
            row.setdefault("entries", s["trainable_entries"])
            row.setdefault("state", s["optimizer_state_bytes"])
        for method, fraction in results["pending"]:
            rows.setdefault((method, fraction, variant), {}).setdefault(results["task"], "not finished")
    order = sorted(rows, key=lambda k: (k[1] is not None, k[1] or 0, METHODS.index(k[0]), k[2]))
    columns = [f"{t} dev acc % (lr)" for t in tasks] + (["mean of tasks"] if len(tasks) > 1 else [])
    lines = ["| method | budget | " + " | ".join(columns) + " | trainable entries | optimizer state |",
             "|" + "---|" * (len(columns) + 4)]
    for method, fraction, variant in order:
        row = rows[(method, fraction, variant)]
        name = f"{method} ({variant})" if variant else method
        budget = "—" if fraction is None else f"{100 * fraction:g} %"
        cells = [row.get(t, "—") for t in tasks]
        if len(tasks) > 1:
            accuracy = row.get("accuracy", {})
            cells.append(f"{100 * sum(accuracy.values()) / len(tasks):.1f}" if len(accuracy) == len(tasks) else "—")
        size = f"{row['entries']:,} | {_bytes(row['state'])}" if "entries" in row else " | "
        lines.append(f"| {name} | {budget} | " + " | ".join(cells) + f" | {size} |")
    return "\n".join(lines)


def paths_table(layer: dict, drop_in: dict) -> str:
    """The drop-in path's runs (``results.load`` of its file) beside the same runs (method, budget,
    lr, seed) through the explicit layer: whether each selected the same entries, and the dev and
    held-out accuracy of both (— where a run has none). A Markdown table, a row per run and one of
    the means."""
    key = lambda run: (run["method"], run["budget_fraction"], run["lr"], run["seed"])  # noqa: E731
    layer_runs = {key(run): run for run in layer["runs"]}
    pairs = [(layer_runs.get(key(run)), run) for run in drop_in["runs"]]
    dev = lambda run: run["accuracy"]  # noqa: E731
    heldout = lambda run: run["heldout"]["accuracy"] if run["heldout"] else None  # noqa: E731

    def percent(runs: list, pick) -> str:  # the mean of pick over runs, "—" where one is missing
        values = [value for value in (pick(run) for run in runs if run is not None) if value is not None]
        return f"{100 * statistics.fmean(values):.1f}" if values and len(values) == len(runs) else "—"

    lines = [f"| {drop_in['task']} run | seed | same selection | dev acc % (layer) | dev acc % (drop-in) "
             "| held-out acc % (layer) | held-out acc % (drop-in) |", "|---|---|---|---|---|---|---|"]
    for by_layer, by_drop_in in pairs:
        digests = (by_layer or {}).get("selection_sha256"), by_drop_in.get("selection_sha256")
        same = ("no layer run" if by_layer is None else "not recorded" if None in digests
                else "yes" if digests[0] == digests[1] else "**no**")
        lines.append(f"| {by_drop_in['method']}@{by_drop_in['budget_fraction']:g}, lr {by_drop_in['lr']:g} "
                     f"| {by_drop_in['seed']} | {same} | {percent([by_layer], dev)} | {percent([by_drop_in], dev)} "
                     f"| {percent([by_layer], heldout)} | {percent([by_drop_in], heldout)} |")
    both = [(by_layer, by_drop_in) for by_layer, by_drop_in in pairs if by_layer is not None]
    if both:
        by_layer, by_drop_in = [a for a, _ in both], [b for _, b in both]
        lines.append(f"| mean of {len(both)} | | | {percent(by_layer, dev)} | {percent(by_drop_in, dev)} "
                     f"| {percent(by_layer, heldout)} | {percent(by_drop_in, heldout)} |")
    return "\n".join(lines)


# benchmarks/reproduce.md, "Defaults from the table": the rows that may become gem-finetune's
# defaults, and how close a score must be to the best for the smaller optimizer state to win.
DEFAULT_CANDIDATES = ("gem", "gem-all", "gem-uniform", "gem-all-uniform", "id3")
CLOSE_POINTS = 0.5


def defaults_from(loaded: list[dict]) -> tuple[dict | None, list[str]]:
    """The rule of benchmarks/reproduce.md's "Defaults from the table" applied to results files
    (``results.load``; a 4-bit base's or a path's files are not candidates). Returns the winner
    (method, budget fraction, score, the rows within ``CLOSE_POINTS`` of the best, default lr with
    each lr's mean held-out accuracy over the tasks), or None and why it cannot be decided yet."""
    plain = [r for r in loaded if not _variant(r["settings"])]
    tasks = list(dict.fromkeys(r["task"] for r in plain))
    rows: dict[tuple, dict] = {}  # (method, fraction) -> {task: (summary, lr grid)}, None while not finished
    undecided = []
    for results in plain:
        task = results["task"]
        for label, s in results["summary"].items():
            if s["method"] not in DEFAULT_CANDIDATES:
                continue
            name, grid = f"{s['method']}@{s['budget_fraction']:g} on {task}", results["lr_grid"].get(label)
            rows.setdefault((s["method"], s["budget_fraction"]), {})[task] = (s, grid)
            if grid is None:
                undecided.append(f"{name} trained one lr: no grid chose it")
            elif at_grid_edge(s["lr"], [g["lr"] for g in grid]):
                undecided.append(f"{name} chose an end of its grid ({s['lr']:g})")
        for method, fraction in results["pending"]:
            if method in DEFAULT_CANDIDATES:
                rows.setdefault((method, fraction), {})[task] = None
                undecided.append(f"{method}@{fraction:g} on {task} is not finished")
    undecided += [f"{method}@{fraction:g} is not run on {task}" for (method, fraction), row in rows.items()
                  for task in tasks if task not in row]
    if undecided or not rows:
        return None, undecided or ["no candidate row in these files"]
    score = {key: statistics.fmean(100 * s["accuracy_mean"] for s, _ in row.values()) for key, row in rows.items()}
    best = max(score.values())
    close = sorted((key for key in rows if score[key] >= best - CLOSE_POINTS), key=lambda key: -score[key])
    # the optimizer state is the same on every task (one model): the first task's
    method, fraction = min(close, key=lambda key: next(iter(rows[key].values()))[0]["optimizer_state_bytes"])
    grids = [grid for _, grid in rows[(method, fraction)].values()]
    heldout = {lr: statistics.fmean(next(g["heldout_accuracy"] for g in grid if g["lr"] == lr) for grid in grids)
               for lr in sorted(set.intersection(*({g["lr"] for g in grid} for grid in grids)))}
    return {"method": method, "budget_fraction": fraction, "score": score[(method, fraction)],
            "close": [(key, score[key]) for key in close], "lr": max(heldout, key=heldout.get),
            "heldout_by_lr": heldout}, []


def _print_paths_table(argv: list[str]) -> int:
    """``--compare-paths RESULTS.jsonl DROP-IN/RESULTS.jsonl``: ``paths_table`` of the two files."""
    from .results import ResultsFileError, load
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        layer, drop_in = (load(Path(path)) for path in argv)
    except ResultsFileError as error:
        print(f"gem_finetune.report: error: {error}", file=sys.stderr)
        return 2
    print(paths_table(layer, drop_in))
    return 0


def _print_defaults(argv: list[str]) -> int:
    """``--defaults RESULTS.jsonl...``: the winner and its lr, or what is missing (exit 1)."""
    from .results import ResultsFileError, load
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        winner, undecided = defaults_from([load(Path(path)) for path in argv])
    except ResultsFileError as error:
        print(f"gem_finetune.report: error: {error}", file=sys.stderr)
        return 2
    if winner is None:
        print("gem_finetune.report: the defaults are not decided yet: " + "; ".join(undecided), file=sys.stderr)
        return 1
    name = lambda key: f"{key[0]} at {100 * key[1]:g} %"  # noqa: E731
    print(f"winner: {name((winner['method'], winner['budget_fraction']))} (mean of tasks {winner['score']:.1f})")
    print(f"within {CLOSE_POINTS:g} points of the best, the least optimizer state wins among: "
          + ", ".join(f"{name(key)} {score:.1f}" for key, score in winner["close"]))
    print(f"default lr: {winner['lr']:g} (mean held-out accuracy over the tasks: "
          + ", ".join(f"{lr:g} {100 * v:.1f}" for lr, v in winner["heldout_by_lr"].items()) + ")")
    return 0


USAGE = ("usage: python -m gem_finetune.report RESULTS.jsonl [RESULTS.jsonl ...]\n"
         "       python -m gem_finetune.report --tasks-table RESULTS.jsonl [RESULTS.jsonl ...]\n"
         "       python -m gem_finetune.report --chosen-lr METHOD FRACTION|none RESULTS.jsonl\n"
         "       python -m gem_finetune.report --defaults RESULTS.jsonl [RESULTS.jsonl ...]\n"
         "       python -m gem_finetune.report --compare-paths RESULTS.jsonl DROP-IN/RESULTS.jsonl")


def chosen_lr(results: dict, method: str, budget_fraction: float | None) -> float | None:
    """The lr whose runs ``results`` (``results.load``) reports for ``method`` at ``budget_fraction``:
    the one its grid chose; None while a run of the grid or of the chosen lr is missing."""
    return next((s["lr"] for s in results["summary"].values()
                 if s["method"] == method and s["budget_fraction"] == budget_fraction), None)


def _print_chosen_lr(argv: list[str]) -> int:
    """``--chosen-lr METHOD FRACTION|none RESULTS.jsonl``: prints the lr, or says why there is none (exit 1)."""
    from .results import ResultsFileError, load
    if len(argv) != 3:
        print(USAGE, file=sys.stderr)
        return 2
    method, fraction, path = argv
    try:
        lr = chosen_lr(load(Path(path)), method, None if fraction == "none" else float(fraction))
    except (ResultsFileError, ValueError) as error:
        print(f"gem_finetune.report: error: {error}", file=sys.stderr)
        return 2
    if lr is None:
        print(f"gem_finetune.report: {method} at {fraction} has no chosen lr in {path} yet (runs missing)",
              file=sys.stderr)
        return 1
    print(f"{lr:g}")
    return 0


def main(argv: list[str]) -> int:
    """``python -m gem_finetune.report RESULTS.jsonl [...] > table.md``: the Markdown of each results
    file, from all of its runs (every lane that wrote to it), and its plots redrawn beside it.
    ``--chosen-lr METHOD FRACTION|none RESULTS.jsonl`` prints the lr a grid chose instead, and
    ``--defaults RESULTS.jsonl...`` the row and lr the defaults take (``defaults_from``), and
    ``--compare-paths RESULTS.jsonl DROP-IN/RESULTS.jsonl`` the drop-in path's runs beside the layer's."""
    from .results import ResultsFileError, load
    if argv[:1] == ["--chosen-lr"]:
        return _print_chosen_lr(argv[1:])
    if argv[:1] == ["--defaults"]:
        return _print_defaults(argv[1:])
    if argv[:1] == ["--compare-paths"]:
        return _print_paths_table(argv[1:])
    tasks = argv[:1] == ["--tasks-table"]
    argv = argv[1:] if tasks else argv
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        everything = [(Path(name), load(Path(name))) for name in argv]
    except ResultsFileError as error:
        print(f"gem_finetune.report: error: {error}", file=sys.stderr)
        return 2
    if tasks:
        print(tasks_table([results for _, results in everything]))
        return 0
    for path, results in everything:
        print(markdown(results))
        write_plots(results, path.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
