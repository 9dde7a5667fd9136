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
from .models import classification_loss, load_model
from .report import evaluate, per_tensor_budget, reset_peak_rss, rss_mib

METHODS = ("gem", "gem-uniform", "gem-all", "id3", "grad-magnitude", "random", "full", "bitfit", "lora")
SPARSE_METHODS = ("gem", "gem-uniform", "gem-all", "id3", "grad-magnitude", "random")
# selectors that score a calibration gradient
CALIBRATED_METHODS = ("gem", "gem-uniform", "gem-all", "grad-magnitude")
# The defaults are still those of the 1-epoch reduced reproduction; scripts/reproduce.sh's
# tuned protocol lists the lrs its held-out grid chooses, to replace these once it has run.
DEFAULT_LR = {"gem": 1e-3, "gem-uniform": 1e-3, "gem-all": 1e-3, "id3": 1e-3, "grad-magnitude": 1e-3,
              "random": 1e-3, "full": 5e-5, "bitfit": 1e-3, "lora": 5e-4}
SPARSE_TARGETS = ("query", "value")  # the GEM paper's target modules; LoRA's too
LORA_RANK, LORA_ALPHA = 8, 16


def target_modules(model, method: str = "gem") -> list[str]:
    """Module-name patterns (``param_groups``'s) of what a sparse method trains: query and value,
    or for ``gem-all`` every ``nn.Linear`` of the encoder but its pooler. The pooler is left
    out because the classifier mean-pools ``last_hidden_state``: the pooler gets no gradient,
    and a budget share given to it would be wasted."""
    if method != "gem-all":
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
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                            target_modules=list(SPARSE_TARGETS))
        model.encoder = get_peft_model(model.encoder, config)  # freezes the encoder's own weights
        params = [p for p in model.parameters() if p.requires_grad]
        return Setup(model, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay), numel(params))
    if method in SPARSE_METHODS:
        from gem_kernels.optim import SparseAdamW
        from gem_kernels.selection import GEM, ID3, GradMagnitude, Random
        # (name, tensor) pairs, so that selection_report() rows carry the tensor names.
        groups = param_groups(model, sparse=target_modules(model, method), dense=["head"],
                              weight_decay=weight_decay)
        if len(groups[1]["params"]) != len(head):  # "head" matches any module whose name ends in it
            raise ValueError(f"the dense pattern 'head' matched {[n for n, _ in groups[1]['params']]}, "
                             "more than the classifier's head: the encoder has a module named head too")
        selector = {"gem": lambda: GEM(), "gem-uniform": lambda: GEM(allocation="uniform"),
                    "gem-all": lambda: GEM(), "id3": lambda: ID3(total_steps),
                    "grad-magnitude": lambda: GradMagnitude(), "random": lambda: Random(seed)}[method]()
        # calibration_steps=0: GEM and grad-magnitude select in the explicit calibrate() pass
        # of run_once; Random selects here; ID3 takes none.
        optimizer = SparseAdamW(groups, lr=lr, weight_decay=weight_decay, budget=budget, selector=selector,
                                calibration_steps=None if method == "id3" else 0)
        optimizer.register_modules(model)  # sparse weight gradients from the first training step
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
    density: float | None = None  # the --density that gave ``budget``, recorded with sparse runs


def run_once(method: str, lr: float, seed: int, config: RunConfig, train: Encoded,
             dev_batches: list[dict], heldout_batches: list[dict] | None = None) -> dict:
    """Load a fresh model, train it with ``method`` for ``config.epochs``, evaluate on dev after
    each epoch and on ``heldout_batches`` (if any) after the last; returns the run's row of the
    results JSON. The held-out score is what an lr grid chooses by; dev is only reported."""
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
              "heldout": evaluate(model, heldout_batches, config.num_labels) if heldout_batches else None,
              "trainable_entries": setup.trainable_entries,
              "optimizer_state_bytes": optimizer_state_bytes(optimizer),
              "peak_rss_mib": rss_mib("VmHWM") if peak_known else None,
              "rss_at_start_mib": rss_start,
              "median_step_seconds": statistics.median(step_seconds),
              "calibration_seconds": calibration_seconds,
              "losses": losses, "dev_curve": dev_curve}
    if method in SPARSE_METHODS:
        # Report what was selected, not the budget: with rounding="floor" GEM selects a few
        # entries under it, and a tensor without gradient gets none.
        result["density"] = config.density
        result["selected_count"] = optimizer.selected_count()
        result["trainable_entries"] = result["selected_count"] + sum(p.numel() for p in model.head.parameters())
        result["per_tensor_budget"] = per_tensor_budget(optimizer)
    return result
