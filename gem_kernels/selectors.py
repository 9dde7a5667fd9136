"""Selectors: turn gradients and weights into the index sets SparseAdamW trains (docs/ARCHITECTURE.md, "The methods").

Each selector is a small object that only calls the ops (``layer_stats``, ``ratio_topk``);
it never stores a score per entry. Index sets are ``(indices, offsets)`` as in
``gem_kernels.reference``: flat indices per tensor, sorted ascending.

* ``GEM``: one calibration sum of gradients, a per-tensor budget from entropy, top-k inside
  each tensor. A one-shot selector (``OneShotSelector``: ``select`` once, after calibration).
* ``ID3``: incremental unmasking, one global top-k per step for ``total_steps`` steps
  (``IncrementalSelector``: ``unmask_count`` and ``select_new`` at each step).
* ``GradMagnitude`` and ``Random``: baselines at the same budget.

Every selector computes through the ops object it is given (``on``): ``LOCAL`` (this module's,
the ops over whole tensors) or ``gem_kernels.distributed.ShardedOps`` (each rank holds row blocks
of the tensors; the same answer, cut to its rows). So each method is written once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import ops
from .reference import entropy_from_stats

Tensor = torch.Tensor

ALLOCATIONS = ("entropy", "uniform")
ROUNDINGS = ("largest_remainder", "floor")


@dataclass
class Choice:
    """What a selector chose: an index set, plus per-tensor figures for the report (or None)."""
    indices: Tensor
    offsets: Tensor
    entropy: Optional[list] = None
    score: Optional[list] = None


def _check_number(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def split_budget(weights: Sequence[float], numels: Sequence[int], budget: int,
                 rounding: str = "largest_remainder") -> list[int]:
    """Splits ``budget`` over tensors in proportion to ``weights``: ``n_l = floor(B * w_l / Σw)``,
    with ``n_l`` clamped to the tensor's size.

    What a clamped tensor cannot take is redistributed over the other tensors by the same rule
    (repeated until nothing overflows), so the budget is not lost to small tensors. The floors
    leave fewer than one entry per tensor unassigned: ``rounding="largest_remainder"`` gives
    those to the tensors with the largest fractional parts (ties to the first tensor), so the
    counts add up to exactly ``B`` when the tensors with weight > 0 can hold it;
    ``rounding="floor"`` leaves them out, as the GEM paper's formula does. Tensors with weight 0
    get nothing.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    counts = [0] * len(numels)
    active = [i for i, w in enumerate(weights) if w > 0]
    remaining = budget
    while active and remaining > 0:
        total = math.fsum(weights[i] for i in active)
        exact = {i: remaining * weights[i] / total for i in active}
        full = [i for i in active if math.floor(exact[i]) >= numels[i]]
        if not full:
            for i in active:
                counts[i] = math.floor(exact[i])
            if rounding == "largest_remainder":
                left = remaining - sum(counts[i] for i in active)
                by_remainder = sorted(active, key=lambda i: (-(exact[i] - counts[i]), i))
                for i in [i for i in by_remainder if counts[i] < numels[i]][:left]:
                    counts[i] += 1
            break
        for i in full:
            counts[i] = numels[i]
            remaining -= numels[i]
        active = [i for i in active if i not in full]
    return counts


class LocalOps:
    """The ops a selector calls, over whole tensors in this process."""

    @staticmethod
    def numels(weights: Sequence[Tensor]) -> list[int]:
        return [w.numel() for w in weights]

    layer_stats = staticmethod(ops.layer_stats)
    ratio_topk = staticmethod(ops.ratio_topk)

    @staticmethod
    def random_keys(weights: Sequence[Tensor], seed: int) -> list[Tensor]:
        """One fp32 key per entry, drawn on the CPU (the same on every device) from ``seed``."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]


LOCAL = LocalOps()


class Selector:
    """Base of every selector (what ``SparseAdamW(selector=...)`` accepts). ``shardable``:
    whether it can select over FSDP2 row blocks (``ShardedOps``)."""
    shardable = True


class OneShotSelector(Selector):
    """Chooses the whole set at once, after calibration (``needs_gradients``: whether
    ``select`` reads the summed calibration gradients; Random does not)."""
    needs_gradients = True

    def select(self, grads: Sequence[Tensor], weights: Sequence[Tensor], budget: int, on=LOCAL) -> Choice:
        raise NotImplementedError


class IncrementalSelector(Selector):
    """Grows the set over ``total_steps`` training steps, from each step's gradient."""
    total_steps: int

    def unmask_count(self, step: int, budget: int) -> int:
        raise NotImplementedError

    def select_new(self, grads: Sequence[Tensor], weights: Sequence[Tensor], count: int,
                   exclude, on=LOCAL) -> Choice:
        raise NotImplementedError


class GEM(OneShotSelector):
    """Gradient-to-weight ratio and entropy-guided masking (arXiv 2508.16191).

    ``s = |G| / (|W0| + eps)``; per tensor ``H_l`` (entropy of ``s / Σs``) and
    ``score_l = ‖s‖₂ · H_l``; ``n_l = floor(B · score_l / Σ score)`` (see ``split_budget`` for
    clamping); the top ``n_l`` entries by ``s`` inside each tensor.
    ``allocation="uniform"`` is the ablation: ``n_l = floor(B · numel_l / Σ numel)``.
    ``rounding``: ``"largest_remainder"`` (default) hands the entries the floors leave over to
    the largest fractional parts, so exactly ``B`` entries train; ``"floor"`` is the paper's
    formula as written, a few entries short of ``B``.
    """

    def __init__(self, eps: float = 1e-8, allocation: str = "entropy", rounding: str = "largest_remainder"):
        self.eps = _check_number("eps", eps, positive=False)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.allocation = allocation
        self.rounding = rounding

    def __repr__(self) -> str:
        return f"GEM(eps={self.eps!r}, allocation={self.allocation!r}, rounding={self.rounding!r})"

    def allocate(self, stats: Tensor, numels: Sequence[int], budget: int):
        """Per-tensor counts from ``layer_stats`` rows; also returns entropy and score lists."""
        entropy = entropy_from_stats(stats)
        score = stats[:, 1].sqrt() * entropy
        if self.allocation == "uniform":
            weights = [float(n) for n in numels]
        else:
            weights = score.tolist()
            if not math.fsum(weights) > 0:
                raise ValueError("GEM cannot split the budget: every tensor scores 0 (all calibration "
                                 "gradients are zero, or each tensor has at most one non-zero score)")
        return split_budget(weights, numels, budget, self.rounding), entropy.tolist(), score.tolist()

    def select(self, grads, weights, budget, on=LOCAL):
        stats = on.layer_stats(grads, weights, self.eps, 1.0)
        counts, entropy, score = self.allocate(stats, on.numels(weights), int(budget))
        indices, offsets = on.ratio_topk(grads, weights, counts, self.eps, 1.0)
        return Choice(indices, offsets, entropy, score)


class GradMagnitude(OneShotSelector):
    """Baseline: the global top-B of ``|G|`` (``ratio_topk`` with exponent 0 scores exactly |g|)."""

    def __repr__(self) -> str:
        return "GradMagnitude()"

    def select(self, grads, weights, budget, on=LOCAL):
        indices, offsets = on.ratio_topk(grads, weights, int(budget), 0.0, 0.0)
        return Choice(indices, offsets)


class Random(OneShotSelector):
    """Baseline: B entries drawn uniformly over all sparse entries, reproducible from ``seed``.

    Draws one fp32 key per entry on the CPU (the same on every device) and keeps the global
    top-B keys; needs no gradient, so it selects at construction when ``calibration_steps=0``.
    """
    needs_gradients = False
    shardable = False  # one key per entry of the full tensors, which no rank holds

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed

    def __repr__(self) -> str:
        return f"Random(seed={self.seed!r})"

    def select(self, grads, weights, budget, on=LOCAL):
        keys = on.random_keys(weights, self.seed)
        indices, offsets = on.ratio_topk(keys, [w.detach() for w in weights], int(budget), 0.0, 0.0)
        return Choice(indices, offsets)


class ID3(IncrementalSelector):
    """Incremental dynamic unmasking (arXiv 2408.14470) over ``total_steps`` steps.

    At unmasking step ``t`` (1-based): ``D³ = |g| / (eps + |θ|)^exponent`` from the current
    gradient and weights; ``unmask_count(t, B)`` new entries, the global top-k among entries not
    yet unmasked. Entries are never removed. No calibration.
    """
    def __init__(self, total_steps: int, eps: float = 1e-3, exponent: float = 1.0):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int):
            raise TypeError(f"total_steps must be an int, got {type(total_steps).__name__}")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.eps = _check_number("eps", eps, positive=False)
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not math.isfinite(exponent):
            raise ValueError(f"exponent must be a finite number, got {exponent!r}")
        self.exponent = float(exponent)

    def __repr__(self) -> str:
        return f"ID3(total_steps={self.total_steps!r}, eps={self.eps!r}, exponent={self.exponent!r})"

    def unmask_count(self, step: int, budget: int) -> int:
        """How many entries step ``step`` (1..T) unmasks: B // T, plus one in the first B mod T steps."""
        if not 1 <= step <= self.total_steps:
            return 0
        return budget // self.total_steps + (1 if step <= budget % self.total_steps else 0)

    def select_new(self, grads, weights, count: int, exclude, on=LOCAL) -> Choice:
        indices, offsets = on.ratio_topk(grads, weights, int(count), self.eps, self.exponent, exclude)
        return Choice(indices, offsets)
