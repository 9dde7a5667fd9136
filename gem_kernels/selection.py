"""Selectors: turn gradients and weights into the index sets SparseAdamW trains (DESIGN.md §1).

Each selector is a small object that only calls the ops (``layer_stats``, ``ratio_topk``);
it never stores a score per entry. Index sets are ``(indices, offsets)`` as in
``gem_kernels.reference``: flat indices per tensor, sorted ascending.

* ``GEM``: one calibration sum of gradients, a per-tensor budget from entropy, top-k inside
  each tensor. Needs calibration.
* ``ID3``: incremental unmasking, one global top-k per step for ``total_steps`` steps.
* ``GradMagnitude`` and ``Random``: baselines at the same budget.
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


@dataclass
class Selection:
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


def split_budget(weights: Sequence[float], numels: Sequence[int], budget: int) -> list[int]:
    """``n_l = floor(B * w_l / Σw)``, with ``n_l`` clamped to the tensor's size.

    What a clamped tensor cannot take is redistributed over the other tensors by the same
    rule (repeated until nothing overflows), so the budget is not lost to small tensors. The
    floor's remainder (fewer than one entry per tensor) is not redistributed, as in GEM.
    Tensors with weight 0 get nothing.
    """
    counts = [0] * len(numels)
    active = [i for i, w in enumerate(weights) if w > 0]
    remaining = budget
    while active and remaining > 0:
        total = math.fsum(weights[i] for i in active)
        share = {i: math.floor(remaining * weights[i] / total) for i in active}
        full = [i for i in active if share[i] >= numels[i]]
        if not full:
            for i in active:
                counts[i] = share[i]
            break
        for i in full:
            counts[i] = numels[i]
            remaining -= numels[i]
        active = [i for i in active if i not in full]
    return counts


class Selector:
    """Base of the selectors. ``needs_calibration``: whether ``select`` reads gradients."""
    needs_calibration = True
    incremental = False

    def select(self, grads: Sequence[Tensor], weights: Sequence[Tensor], budget: int) -> Selection:
        raise NotImplementedError


class GEM(Selector):
    """Gradient-to-weight ratio and entropy-guided masking (arXiv 2508.16191).

    ``s = |G| / (|W0| + eps)``; per tensor ``H_l`` (entropy of ``s / Σs``) and
    ``score_l = ‖s‖₂ · H_l``; ``n_l = floor(B · score_l / Σ score)`` (see ``split_budget`` for
    clamping); the top ``n_l`` entries by ``s`` inside each tensor.
    ``allocation="uniform"`` is the ablation: ``n_l = floor(B · numel_l / Σ numel)``.
    """

    def __init__(self, eps: float = 1e-8, allocation: str = "entropy"):
        self.eps = _check_number("eps", eps, positive=False)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        self.allocation = allocation

    def __repr__(self) -> str:
        return f"GEM(eps={self.eps!r}, allocation={self.allocation!r})"

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
        return split_budget(weights, numels, budget), entropy.tolist(), score.tolist()

    def select(self, grads, weights, budget):
        stats = ops.layer_stats(grads, weights, self.eps, 1.0)
        counts, entropy, score = self.allocate(stats, [w.numel() for w in weights], budget)
        indices, offsets = ops.ratio_topk(grads, weights, counts, self.eps, 1.0)
        return Selection(indices, offsets, entropy, score)


class GradMagnitude(Selector):
    """Baseline: the global top-B of ``|G|`` (``ratio_topk`` with exponent 0 scores exactly |g|)."""

    def __repr__(self) -> str:
        return "GradMagnitude()"

    def select(self, grads, weights, budget):
        indices, offsets = ops.ratio_topk(grads, weights, int(budget), 0.0, 0.0)
        return Selection(indices, offsets)


class Random(Selector):
    """Baseline: B entries drawn uniformly over all sparse entries, reproducible from ``seed``.

    Draws one fp32 key per entry on the CPU (the same on every device) and keeps the global
    top-B keys; needs no gradient, so it selects at construction when ``calibration_steps=0``.
    """
    needs_calibration = False

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed

    def __repr__(self) -> str:
        return f"Random(seed={self.seed!r})"

    def select(self, grads, weights, budget):
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        keys = [torch.rand(w.shape, generator=generator).to(w.device) for w in weights]
        indices, offsets = ops.ratio_topk(keys, [w.detach() for w in weights], int(budget), 0.0, 0.0)
        return Selection(indices, offsets)


class ID3(Selector):
    """Incremental dynamic unmasking (arXiv 2408.14470) over ``total_steps`` steps.

    At unmasking step ``t`` (1-based): ``D³ = |g| / (eps + |θ|)^exponent`` from the current
    gradient and weights; ``unmask_count(t, B)`` new entries, the global top-k among entries not
    yet unmasked. Entries are never removed. No calibration.
    """
    needs_calibration = False
    incremental = True

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

    def select_new(self, grads, weights, count: int, exclude) -> Selection:
        indices, offsets = ops.ratio_topk(grads, weights, int(count), self.eps, self.exponent, exclude)
        return Selection(indices, offsets)

    def select(self, grads, weights, budget):
        raise TypeError("ID3 unmasks step by step; SparseAdamW calls select_new")
