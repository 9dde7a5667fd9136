"""The fine-tuning methods: what each trains, its optimizer, and one training run of it.

Every method trains the classifier's head densely. The sparse methods build their param
groups with ``gem_kernels.integrations.transformers.param_groups``, the one place that says
which parameters are sparse, which dense, and freezes the rest.
"""
from __future__ import annotations

import gc
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gem_kernels.integrations.transformers import matching_parameters, param_groups

from .data import Encoded, batches
from .models import autocast, classification_loss, load_model, quantize_linear_bases_, to_device
from .report import evaluate, peak_memory_mib, per_tensor_budget, reset_peak_memory, rss_mib, selection_sha256

METHODS = ("gem", "gem-uniform", "gem-all", "gem-all-uniform", "id3", "grad-magnitude", "random",
           "full", "bitfit", "lora", "lora-all", "qlora")
SPARSE_METHODS = ("gem", "gem-uniform", "gem-all", "gem-all-uniform", "id3", "grad-magnitude", "random")
# methods whose runs depend on --budget-fraction: the sparse ones, and LoRA sized to the budget
BUDGETED_METHODS = (*SPARSE_METHODS, "lora-all")
# methods that train every linear layer of the encoder but its pooler; the others query and value
ALL_LINEAR_METHODS = ("gem-all", "gem-all-uniform", "lora-all")
# sparse methods that can train on a 4-bit base (--quantize-base): the explicit layer's; not ID3
QUANTIZABLE_METHODS = tuple(m for m in SPARSE_METHODS if m != "id3")
# selectors that score a calibration gradient
CALIBRATED_METHODS = ("gem", "gem-uniform", "gem-all", "gem-all-uniform", "grad-magnitude")
# The defaults are still those of the 1-epoch reduced reproduction; scripts/reproduce.sh's
# tuned protocol lists the lrs its held-out grid chooses, to replace these once it has run.
DEFAULT_LR = {"gem": 1e-3, "gem-uniform": 1e-3, "gem-all": 1e-3, "gem-all-uniform": 1e-3, "id3": 1e-3,
              "grad-magnitude": 1e-3, "random": 1e-3, "full": 5e-5, "bitfit": 1e-3, "lora": 5e-4,
              "lora-all": 5e-4, "qlora": 5e-4}
SPARSE_PATHS = ("auto", "layer", "drop-in")  # --sparse-path: see uses_layer
SPARSE_TARGETS = ("query", "value")  # the GEM paper's target modules; LoRA's too
LORA_RANK, LORA_ALPHA = 8, 16  # lora-all keeps the same alpha / rank = 2


def target_modules(model, method: str = "gem") -> list[str]:
    """Module-name patterns (``param_groups``'s) of what a sparse method trains: query and value,
    or for the all-linear methods every ``nn.Linear`` of the encoder but its pooler. The pooler
    is left out because the classifier mean-pools ``last_hidden_state``: the pooler gets no
    gradient, and a budget share given to it would be wasted."""
    if method not in ALL_LINEAR_METHODS:
        return list(SPARSE_TARGETS)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder.")
            and "pooler" not in name.split(".")]


def target_weight_names(model, method: str = "gem") -> list[str]:
    """The weight matrices a sparse method trains (the same ``dim >= 2`` rule as
    ``param_groups``); empty for a model without such modules."""
    patterns = target_modules(model, method)
    try:
        found = matching_parameters(model, patterns) if patterns else {}
    except ValueError:  # no query/value module: the command refuses the sparse methods (cli._run)
        return []
    return [name for name, p in found.items() if p.dim() >= 2]


def lora_all_rank(model, budget: int) -> int:
    """The LoRA rank, on every linear layer of the encoder but the pooler, whose trainable
    count, rank x (in + out) summed over those layers, is nearest ``budget`` (at least 1)."""
    per_rank = sum(sum(model.get_submodule(name).weight.shape) for name in target_modules(model, "lora-all"))
    return max(1, round(budget / per_rank))


@dataclass
class Setup:
    model: object
    optimizer: object
    trainable_entries: int  # entries the optimizer may change (sparse: the budget + the head)
    lora_rank: int | None = None


def _freeze_all_but(model, keep) -> list:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(keep(name, p))
        if p.requires_grad:
            params.append(p)
    return params


def set_up(method: str, model, lr: float, weight_decay: float, budget: int, total_steps: int,
           seed: int) -> Setup:
    """Freeze what ``method`` leaves alone and build its optimizer (``model`` is a SentenceClassifier)."""
    head = list(model.head.parameters())
    numel = lambda params: sum(p.numel() for p in params)  # noqa: E731
    if method == "full":
        params = _freeze_all_but(model, lambda n, p: True)
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method == "bitfit":
        params = _freeze_all_but(model, lambda n, p: n.startswith("head.") or n.endswith(".bias"))
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method in ("lora", "lora-all", "qlora"):
        from peft import LoraConfig, get_peft_model
        if method == "qlora":  # QLoRA: every linear layer of the encoder (but the pooler) in NF4, LoRA on q/v
            quantize_linear_bases_(model, target_modules(model, "lora-all"))
        if method in ("lora", "qlora"):
            rank, targets = LORA_RANK, list(SPARSE_TARGETS)
        else:  # names inside the encoder, which is what peft wraps
            rank = lora_all_rank(model, budget)
            targets = [name.removeprefix("encoder.") for name in target_modules(model, method)]
        config = LoraConfig(r=rank, lora_alpha=rank * LORA_ALPHA // LORA_RANK, lora_dropout=0.0,
                            target_modules=targets)
        model.encoder = get_peft_model(model.encoder, config)  # freezes the encoder's own weights
        params = [p for p in model.parameters() if p.requires_grad]
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params), rank)
    if method in SPARSE_METHODS:
        from gem_kernels.optim import SparseAdamW
        from gem_kernels.selectors import GEM, ID3, GradMagnitude, Random
        # (name, tensor) pairs, so that selection_report() rows carry the tensor names.
        groups = param_groups(model, sparse=target_modules(model, method), dense=["head"],
                              weight_decay=weight_decay)
        if len(groups[1]["params"]) != len(head):  # "head" matches any module whose name ends in it
            raise ValueError(f"the dense pattern 'head' matched {[n for n, _ in groups[1]['params']]}, "
                             "more than the classifier's head: the encoder has a module named head too")
        selector = {"gem": lambda: GEM(), "gem-uniform": lambda: GEM(allocation="uniform"),
                    "gem-all": lambda: GEM(), "gem-all-uniform": lambda: GEM(allocation="uniform"),
                    "id3": lambda: ID3(total_steps),
                    "grad-magnitude": lambda: GradMagnitude(), "random": lambda: Random(seed)}[method]()
        # calibration_steps=0: GEM and grad-magnitude select in the explicit calibrate() pass
        # of run_once; Random selects here; ID3 takes none.
        optimizer = SparseAdamW(groups, lr=lr, weight_decay=weight_decay, budget=budget, selector=selector,
                                calibration_steps=None if method == "id3" else 0)
        return Setup(model, optimizer, budget + numel(head))
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def optimizer_state_tensors(optimizer):
    """Every tensor in ``optimizer.state`` (moments, indices, step counts), however nested."""
    pending = list(optimizer.state.values())
    while pending:
        value = pending.pop()
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state."""
    return sum(t.numel() * t.element_size() for t in optimizer_state_tensors(optimizer))


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
    budget_fraction: float | None = None  # the --budget-fraction that gave ``budget``
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"  # or "bf16": see models.autocast
    quantize_base: str | None = None  # "nf4": the sparse methods train on a 4-bit base
    # Batches scored after every epoch for the dev curve (a fixed subset of dev, or dev itself);
    # None: no curve, dev is scored once, after the last epoch (the reported numbers either way).
    curve_batches: list[dict] | None = None
    sparse_path: str = "auto"  # or "layer", "drop-in": see uses_layer


def uses_layer(method: str, config: RunConfig) -> bool:
    """Whether ``method`` trains through the explicit layer (``sparsify_``) rather than SparseAdamW
    alone. ``config.sparse_path`` "auto": where the layer measured faster, on CPU (its sparse weight
    gradient takes a fifth off a step: benchmarks/results/step_cost.md; on CUDA dense dW through
    cuBLAS wins so far), and wherever a 4-bit base needs it. ID3 adds entries at every step: always
    the drop-in path."""
    if method not in QUANTIZABLE_METHODS:
        return False
    if config.sparse_path == "auto":
        return config.device.type == "cpu" or config.quantize_base is not None
    return config.sparse_path == "layer"


def _clock(device: torch.device) -> float:
    """Wall time once the device has done the work queued so far: CUDA kernels run
    asynchronously, so reading the clock without a synchronize times only their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Phases:
    """Wall seconds per phase of a run (``phase_seconds`` in its record)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def add(self, name: str, start: float) -> float:
        now = _clock(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        return now


def _calibrate(method: str, seed: int, config: RunConfig, train: Encoded, model, optimizer, loss_fn) -> None:
    """GEM's (and grad-magnitude's) calibration pass over the first ``config.calibration_batches``
    batches of the seed's shuffle of the training examples (all of them if None)."""
    calibration = batches(train, config.batch_size, config.pad_id, random.Random(seed))
    calibration = calibration[:config.calibration_batches] if config.calibration_batches else calibration
    optimizer.calibrate(model, [to_device(batch, config.device) for batch in calibration], loss_fn)


def _curve_point(epoch: int, step: int, metrics: dict, batch_list: list[dict]) -> dict:
    return {"epoch": epoch, "step": step, **metrics, "examples": sum(len(b["labels"]) for b in batch_list)}


def _train(model, optimizer, loss_fn, train: Encoded, config: RunConfig, rng, bar, phases: _Phases,
           step_seconds: list, losses: list) -> list[dict]:
    """The epochs of training; returns the dev curve (``config.curve_batches`` after each epoch)."""
    device, curve = config.device, []
    for epoch in range(config.epochs):
        start = _clock(device)
        for batch in batches(train, config.batch_size, config.pad_id, rng):
            batch = to_device(batch, device)
            step_start = _clock(device)
            loss = loss_fn(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_seconds.append(_clock(device) - step_start)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        start = phases.add("training", start)
        if config.curve_batches is not None and epoch + 1 < config.epochs:
            metrics = evaluate(model, config.curve_batches, config.num_labels, device, config.precision)
            curve.append(_curve_point(epoch + 1, len(losses), metrics, config.curve_batches))
            phases.add("dev_curve", start)
    return curve


def run_once(method: str, lr: float, seed: int, config: RunConfig, train: Encoded,
             dev_batches: list[dict], heldout_batches: list[dict] | None = None) -> dict:
    """Load a fresh model, train it with ``method`` for ``config.epochs``, evaluate on dev after
    the last epoch (and on ``config.curve_batches``, if any, after each epoch) and on
    ``heldout_batches`` (if any) after the last; returns the run's record of the results file.
    The held-out score is what an lr grid chooses by; dev is only reported."""
    from tqdm import tqdm
    device, precision = config.device, config.precision
    gc.collect()
    peak_known = reset_peak_memory(device)
    rss_start = rss_mib("VmRSS")
    run_start = _clock(device)
    phases = _Phases(device)
    torch.manual_seed(seed)  # dropout
    rng = random.Random(seed)  # batch order
    steps_per_epoch = math.ceil(len(train.labels) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    model = load_model(config.model_dir, config.num_labels, seed).to(device)
    model.train()
    setup = set_up(method, model, lr, config.weight_decay, config.budget, total_steps, seed)
    optimizer = setup.optimizer

    def loss_fn(model, batch):
        with autocast(device, precision):
            return classification_loss(model, batch)

    start = phases.add("load", run_start)
    selection = None
    if method in CALIBRATED_METHODS:
        _calibrate(method, seed, config, train, model, optimizer, loss_fn)
        start = phases.add("calibration", start)
        selection = selection_sha256(optimizer)  # now: sparsify_ renumbers the optimizer's indices
    layer = uses_layer(method, config)
    if layer:
        from gem_kernels import sparsify_
        sparsify_(model, optimizer, quantize_base=config.quantize_base)
        start = phases.add("sparsify", start)

    losses, step_seconds = [], []
    bar = tqdm(total=total_steps, desc=f"{method} lr={lr:g} seed={seed}", unit="step", leave=False)
    dev_curve = _train(model, optimizer, loss_fn, train, config, rng, bar, phases, step_seconds, losses)
    bar.close()
    start = _clock(device)
    dev, dev_curve = _final_dev(model, config, dev_batches, dev_curve, len(losses))
    start = phases.add("dev", start)
    heldout = evaluate(model, heldout_batches, config.num_labels, device, precision) if heldout_batches else None
    if heldout_batches:
        phases.add("heldout", start)

    result = {"method": method, "lr": lr, "seed": seed,
              "budget_fraction": config.budget_fraction if method in BUDGETED_METHODS else None,
              **{k: dev[k] for k in ("accuracy", "mcc")}, "heldout": heldout,
              "device": device.type, "precision": precision, "sparse_delta_layer": layer,
              "quantize_base": "nf4" if method == "qlora" else (config.quantize_base if layer else None),
              "trainable_entries": setup.trainable_entries,
              "optimizer_state_bytes": optimizer_state_bytes(optimizer),
              "peak_memory_mib": peak_memory_mib(device) if peak_known else None,
              "rss_at_start_mib": rss_start,
              "median_step_seconds": statistics.median(step_seconds),
              "wall_seconds": _clock(device) - run_start,
              "phase_seconds": phases.seconds,
              "losses": losses, "dev_curve": dev_curve}
    if selection is not None:
        result["selection_sha256"] = selection
    _add_method_fields(result, method, setup, optimizer, model)
    return result


def _final_dev(model, config: RunConfig, dev_batches: list[dict], curve: list[dict], step: int):
    """Dev's metrics after the last epoch and the dev curve with its last point: dev's own where
    the curve is on the whole dev set, else the curve's subset scored again."""
    dev = evaluate(model, dev_batches, config.num_labels, config.device, config.precision)
    if config.curve_batches is None:
        return dev, curve
    last = dev if config.curve_batches is dev_batches else evaluate(
        model, config.curve_batches, config.num_labels, config.device, config.precision)
    return dev, [*curve, _curve_point(config.epochs, step, last, config.curve_batches)]


def _add_method_fields(result: dict, method: str, setup: Setup, optimizer, model) -> None:
    if setup.lora_rank is not None:
        result["lora_rank"] = setup.lora_rank
    if method in SPARSE_METHODS:
        # Report what was selected, not the budget: with rounding="floor" GEM selects a few
        # entries under it, and a tensor without gradient gets none.
        result["selected_count"] = optimizer.selected_count()
        result["trainable_entries"] = result["selected_count"] + sum(p.numel() for p in model.head.parameters())
        result["per_tensor_budget"] = per_tensor_budget(optimizer)
