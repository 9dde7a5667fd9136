"""What a gem-finetune run costs, and what GEM's calibration needs (benchmarks/reproduce.md,
"Cheaper runs"). Two commands:

  python -m gem_finetune.cost profile --task-dir DIR --method gem --lr 3e-3 --seeds 0 1 2 [...]
      trains the runs as gem-finetune does (the same data, run_once) and prints each run's
      seconds per phase (load, calibration, sparsify, training, dev_curve, dev, heldout) and the
      dev and held-out scores, then the mean per method. ``--old`` runs as gem-finetune did before
      the cheaper defaults: the whole dev set scored after every epoch, in file order (not by
      length), and the calibration pass over every training batch.

  python -m gem_finetune.cost overlap --task-dir DIR [--batches 4 8 16] [--seeds 0]
      sums the calibration gradient over the seed's shuffle of the training batches, as
      run_once does, and compares the selection made from the first k batches with the one made
      from all of them, for GEM on query/value (gem) and on every linear layer (gem-all) at each
      --budget-fraction: the fraction of the full pass's selected entries that the k-batch
      selection also selects.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
from pathlib import Path

import torch

from .cli import parse_lr_plan
from .data import batches, encode, eval_batches, read_task, take
from .methods import METHODS, RunConfig, run_once, set_up, target_weight_names
from .models import classification_loss, default_model_dir, load_model

PHASES = ("load", "calibration", "sparsify", "training", "dev_curve", "dev", "heldout")


@dataclasses.dataclass
class Data:
    train: object
    dev_batches: list
    heldout_batches: list | None
    num_labels: int
    pad_id: int
    total_params: int
    model_dir: Path


def _data(args, old: bool = False) -> Data:
    from transformers import AutoTokenizer
    task = read_task(args.task_dir)
    model_dir = Path(args.model) if args.model else default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    score = (lambda enc: batches(enc, 128, pad_id, None)) if old else (lambda enc: eval_batches(enc, 128, pad_id))
    train_split = take(task.train, args.train_examples, 0)
    train = encode(tokenizer, train_split, args.max_length)
    dev = score(encode(tokenizer, take(task.dev, None, 0), args.max_length))
    heldout = None
    if getattr(args, "heldout_examples", 0):
        split = take(task.train, args.heldout_examples, 0, skip=len(train_split.labels))
        heldout = score(encode(tokenizer, split, args.max_length))
    total = sum(p.numel() for p in load_model(model_dir, len(task.label_names), 0).parameters())
    return Data(train, dev, heldout, len(task.label_names), pad_id, total, model_dir)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-dir", required=True)
    p.add_argument("--model", help="local model directory (default: the installed MiniLM-L6)")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--budget-fraction", type=float, nargs="+", default=[1e-3])


# ---------------------------------------------------------------------------------------
# profile


def profile(args) -> int:
    data = _data(args, old=args.old)
    config = RunConfig(data.model_dir, data.num_labels, args.epochs, args.batch_size, 0.01,
                       int(args.budget_fraction[0] * data.total_params),
                       None if args.old else args.calibration_batches, data.pad_id, args.budget_fraction[0],
                       curve_batches=data.dev_batches if args.old else None)
    print(f"threads {torch.get_num_threads()}; {'old' if args.old else 'new'} defaults; calibration batches "
          f"{config.calibration_batches or 'all'}; dev curve {'all of dev every epoch' if args.old else 'none'}")
    print("| method | lr | seed | " + " | ".join(PHASES) + " | total s | dev acc % | held-out acc % |")
    print("|" + "---|" * (len(PHASES) + 6))
    rows = {}
    for method in args.method:
        for seed in args.seeds:
            run = run_once(method, args.lr[method], seed, config, data.train, data.dev_batches, data.heldout_batches)
            rows.setdefault(method, []).append(run)
            _print_row(method, str(seed), run)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({k: v for k, v in run.items() if k != "losses"}) + "\n")
    for method, runs in rows.items():
        _print_mean(method, runs)
    return 0


def _print_row(method: str, seed: str, run: dict) -> None:
    phases = " | ".join(f"{run['phase_seconds'].get(p, 0.0):.1f}" for p in PHASES)
    heldout = f"{100 * run['heldout']['accuracy']:.1f}" if run["heldout"] else "-"
    print(f"| {method} | {run['lr']:g} | {seed} | {phases} | {run['wall_seconds']:.1f} "
          f"| {100 * run['accuracy']:.1f} | {heldout} |", flush=True)


def _print_mean(method: str, runs: list[dict]) -> None:
    mean = {"phase_seconds": {p: statistics.fmean(r["phase_seconds"].get(p, 0.0) for r in runs) for p in PHASES},
            "wall_seconds": statistics.fmean(r["wall_seconds"] for r in runs), "lr": runs[0]["lr"],
            "accuracy": statistics.fmean(r["accuracy"] for r in runs),
            "heldout": ({"accuracy": statistics.fmean(r["heldout"]["accuracy"] for r in runs)}
                        if runs[0]["heldout"] else None)}
    std = statistics.stdev(r["accuracy"] for r in runs) if len(runs) > 1 else 0.0
    _print_row(method, f"mean of {len(runs)} (dev std {100 * std:.1f})", mean)


# ---------------------------------------------------------------------------------------
# overlap


def _gradient_sums(data: Data, seed: int, batch_size: int, names: list[str], ks: list[int]) -> dict:
    """{k: {weight name: the fp32 sum of its gradient over the first k calibration batches}},
    k = len(batches) included: the batches, dropout and head of run_once's calibration for ``seed``."""
    torch.manual_seed(seed)
    model = load_model(data.model_dir, data.num_labels, seed)
    model.train()
    params = dict(model.named_parameters())
    calibration = batches(data.train, batch_size, data.pad_id, random.Random(seed))
    sums = {name: torch.zeros_like(params[name]) for name in names}
    snapshots = {}
    for count, batch in enumerate(calibration, start=1):
        model.zero_grad(set_to_none=True)
        classification_loss(model, batch).backward()
        for name in names:
            sums[name].add_(params[name].grad)
        if count in ks or count == len(calibration):
            snapshots[count] = {name: s.clone() for name, s in sums.items()}
    return snapshots


def _selection(data: Data, method: str, budget: int, sums: dict) -> dict[str, set[int]]:
    """The entries GEM (``method``'s targets) selects from the gradient sums ``sums``, through
    SparseAdamW.calibrate: a 'batch' whose loss has exactly ``sums`` as its gradient."""
    model = load_model(data.model_dir, data.num_labels, 0)
    setup = set_up(method, model, 1e-3, 0.01, budget, 1, 0)
    params = dict(model.named_parameters())
    targets = target_weight_names(model, method)
    setup.optimizer.calibrate(model, [sums], lambda m, s: sum((params[n] * s[n]).sum() for n in targets))
    return {name: set(setup.optimizer.state[params[name]]["indices"].tolist()) for name in targets}


def _overlap(chosen: dict[str, set[int]], reference: dict[str, set[int]]) -> float:
    common = sum(len(chosen[name] & reference[name]) for name in reference)
    return common / sum(len(s) for s in reference.values())


def overlap(args) -> int:
    data = _data(args)
    probe = load_model(data.model_dir, data.num_labels, 0)
    names = target_weight_names(probe, "gem-all")  # query/value among them
    print(f"{args.task_dir}: {len(data.train.labels)} training examples, batch {args.batch_size}; overlap = "
          "share of the full pass's selected entries that the first k batches' selection also selects; "
          f"last column: the full pass of seed {args.seeds[0]} against this seed's full pass (another seed: "
          "other dropout masks and head, the same examples)")
    print("| method | budget | seed | " + " | ".join(f"k={k}" for k in args.batches) + " | full pass, seed "
          f"{args.seeds[0]} |")
    print("|" + "---|" * (len(args.batches) + 4))
    first = {}
    for seed in args.seeds:
        snapshots = _gradient_sums(data, seed, args.batch_size, names, args.batches)
        for method in ("gem", "gem-all"):
            for fraction in args.budget_fraction:
                _overlap_row(data, method, fraction, seed, snapshots, args.batches, first)
    return 0


def _overlap_row(data: Data, method: str, fraction: float, seed: int, snapshots: dict, ks: list[int],
                 first: dict) -> None:
    budget = int(fraction * data.total_params)
    reference = _selection(data, method, budget, snapshots[max(snapshots)])
    first.setdefault((method, fraction), reference)
    cells = [f"{100 * _overlap(_selection(data, method, budget, snapshots[k]), reference):.1f} %"
             for k in ks if k in snapshots]
    cells.append(f"{100 * _overlap(first[(method, fraction)], reference):.1f} %")
    print(f"| {method} | {100 * fraction:g} % | {seed} | {' | '.join(cells)} |", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gem_finetune.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("profile", help="seconds per phase of runs")
    _common(p)
    p.add_argument("--method", nargs="+", choices=METHODS, default=["gem", "full"])
    p.add_argument("--lr", nargs="+", metavar="[METHOD=]LR", help="as gem-finetune's --lr, one lr a method")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--heldout-examples", type=int, default=500)
    p.add_argument("--calibration-batches", type=int, help="default: all")
    p.add_argument("--old", action="store_true", help="gem-finetune's behaviour before the cheaper defaults")
    p.add_argument("--out", help="append each run's record (without its losses) to this JSON-lines file")
    p = commands.add_parser("overlap", help="selection from k calibration batches against all of them")
    _common(p)
    p.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    if args.command == "profile":
        try:
            plan = parse_lr_plan(args.lr, args.method)  # gem-finetune's parsing, checks and default lrs
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
        if any(len(lrs) > 1 for lrs in plan.values()):
            parser.error("--lr: profile trains one lr a method, not a grid")
        args.lr = {method: lrs[0] for method, lrs in plan.items()}
        return profile(args)
    return overlap(args)


if __name__ == "__main__":
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
