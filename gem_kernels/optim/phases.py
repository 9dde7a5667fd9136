"""What one ``step()`` does in each phase: ``Calibrating``, ``Unmasking`` (ID3), ``Training``.

``SparseAdamW.step`` gathers what a step reads into a ``StepContext`` (its param groups, torch's
per-param state, FSDP2's sharding) and calls the phase of its
``SelectionState`` once; the phase updates that state (counters, budget, report, layouts, and
``phase`` when it moves on) and torch's per-param state.

Every step first checks everything it will read (gradients dense where needed, finite, of the
right shape and dtype; the op's arguments), then writes. So a step that raises leaves weights,
gradient sums, moments and step counts exactly as they were.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.optim.adamw import adamw as torch_adamw

from .. import ops
from ..dtensor import local
from .fsdp import Sharding, selector_ops
from .grads import check_finite, compact_grad
from .groups import resolve_budget
from .layout import GroupLayout, merged_state, moment_keys, new_state
from .state import SelectionState

NOTE_FROZEN = "frozen (requires_grad=False) when the entries were chosen"
NOTE_NO_GRADIENT = "got no gradient during calibration"


@dataclass
class StepContext:
    """What a phase reads and writes of its optimizer."""
    param_groups: list
    state: dict                      # torch's optimizer.state: per-param tensors
    sparse_params: list              # [(name, param)] of the sparse groups, in group order
    describe: Callable[[int, int], str]  # (group index, param index) -> words for an error
    sharding: Optional[Sharding]     # FSDP2 params: where this rank's blocks lie

    def described_grads(self, sparse: bool) -> list:
        """``[(describe, grad)]`` of the params with a gradient in the sparse or dense groups
        (of FSDP2 params, the local block of the gradient)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            if group["sparse"] == sparse:
                out += [(functools.partial(self.describe, gi, i), local(p.grad))
                        for i, p in enumerate(group["params"]) if p.grad is not None]
        return out

    def repack(self, selection: SelectionState, incremental: bool) -> None:
        """One flat buffer per state key and sparse group (see ``layout``)."""
        selection.layouts = {gi: GroupLayout(g["params"], [self.state[p] for p in g["params"]], moment_keys(g),
                                             incremental)
                             for gi, g in enumerate(self.param_groups) if g["sparse"]}

    def moments_of(self, p) -> tuple:
        """The moments sparse param ``p`` keeps: its group's ``moment_keys``."""
        return next(moment_keys(g) for g in self.param_groups if g["sparse"] and any(q is p for q in g["params"]))


def _require_dense(described, why: str) -> None:
    for describe, grad in described:
        if grad.layout != torch.strided:
            raise TypeError(f"the gradient of {describe()} is {grad.layout}; {why} needs dense gradients")


# ---------------------------------------------------------------------------------------
# Calibration and the one-shot selection


def add_gradients(ctx: StepContext, sums: dict) -> None:
    """Adds each sparse param's gradient into ``sums[param]`` (fp32, made on first use), after
    checking every gradient (dense, finite), so a bad one changes no sum."""
    described = ctx.described_grads(sparse=True)
    _require_dense(described, "calibration")
    check_finite(described, ctx.sharding)
    for _, p in ctx.sparse_params:
        if p.grad is not None:
            if p not in sums:  # FSDP2: of the local block only, N / world entries per rank
                sums[p] = torch.zeros_like(local(p), dtype=torch.float32, memory_format=torch.contiguous_format)
            sums[p].add_(local(p.grad))


def stored_sums(ctx: StepContext, copy: bool) -> dict:
    """The calibration sums kept in the state so far (copies, for a call that may still fail)."""
    return {p: ctx.state[p]["grad_sum"].clone() if copy else ctx.state[p]["grad_sum"]
            for _, p in ctx.sparse_params if "grad_sum" in ctx.state.get(p, {})}


def choose_entries(ctx: StepContext, selection: SelectionState, selector, budget_args: tuple, sums: dict) -> None:
    """Calibration -> training: choose the entries from the summed gradients ``sums``, create
    the O(k) state, free the sums. Frozen params and params that got no gradient get no entry
    (a warning names the latter); the budget goes to the others."""
    named = ctx.sparse_params
    notes = {}
    for i, (_, p) in enumerate(named):
        if not p.requires_grad:
            notes[i] = NOTE_FROZEN
        elif selector.needs_gradients and p not in sums:
            notes[i] = NOTE_NO_GRADIENT
    candidates = [i for i in range(len(named)) if i not in notes]
    budget = resolve_budget([p for _, p in named], *budget_args)
    _warn_no_gradient(named, notes)
    available = sum(named[i][1].numel() for i in candidates)
    if not candidates or budget > available:
        raise ValueError(f"the budget of {budget} entries does not fit in the {available} entries of "
                         "the sparse params that can train (not frozen and, for gradient selectors, "
                         "with a calibration gradient); see selection_report()")
    weights = [local(named[i][1]).detach() for i in candidates]
    grads = [sums[named[i][1]] for i in candidates] if selector.needs_gradients else weights
    chosen = selector.select(grads, weights, budget, on=selector_ops(ctx.sharding, [named[i][1] for i in candidates]))
    bounds = chosen.offsets.tolist()
    indices = {i: chosen.indices[bounds[j]:bounds[j + 1]].clone() for j, i in enumerate(candidates)}
    empty = torch.zeros(0, dtype=torch.int64)
    for i, (_, p) in enumerate(named):
        ctx.state[p] = new_state(p, indices.get(i, empty.to(p.device)), ctx.moments_of(p), incremental=False)
    position = {i: j for j, i in enumerate(candidates)}  # in the selector's lists
    selection.report = [
        {"entropy": None if chosen.entropy is None or i not in position else chosen.entropy[position[i]],
         "score": None if chosen.score is None or i not in position else chosen.score[position[i]],
         "note": notes.get(i)} for i in range(len(named))]
    selection.budget = budget
    selection.selection_started = True
    ctx.repack(selection, incremental=False)
    selection.phase = "training"


def _warn_no_gradient(named, notes) -> None:
    missing = [str(named[i][0]) for i, note in notes.items() if note == NOTE_NO_GRADIENT]
    if missing:
        warnings.warn(f"{len(missing)} sparse param(s) got no gradient during calibration and get no "
                      f"entries ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the budget "
                      "goes to the others. Freeze them (requires_grad=False) or leave them out of the "
                      "optimizer to silence this.", UserWarning, stacklevel=5)


# ---------------------------------------------------------------------------------------
# Updates: prepared (checked) first, run after every check of the step has passed


def _precheck_sparse_inputs(group, params, grads) -> None:
    """The op's checks of params, dense grads and hyper-parameters, with an empty index set:
    for a step that changes the index set before its update."""
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    moments = [torch.zeros(0, dtype=torch.float32, device=params[0].device) for _ in moment_keys(group)]
    ops.check_sparse_adamw_args(
        params, grads, torch.zeros(0, dtype=torch.int64, device=params[0].device),
        torch.zeros(len(params) + 1, dtype=torch.int64, device=params[0].device), moments,
        lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
        step=1, maximize=group["maximize"])


def prepare_sparse_update(ctx: StepContext, layout: GroupLayout, gi: int, grads: list, compact_values=None):
    """A callable doing one ``sparse_adamw_`` for the params of sparse group ``gi`` that have a
    gradient (``grads[i]``: the dense gradient, or None); None if none has. ``compact_values``
    instead: the selected gradient values of those params, concatenated (``_compact_group``).
    Every argument is checked here; the callable then cannot fail on bad input."""
    group = ctx.param_groups[gi]
    params = group["params"]
    with_grad = [i for i, g in enumerate(grads) if g is not None]
    if not with_grad:
        return None
    states = [ctx.state[p] for p in params]
    for i in with_grad:
        if local(params[i]).shape != layout.shapes[i]:
            raise ValueError(f"{ctx.describe(gi, i)} had shape {tuple(layout.shapes[i])} when its entries "
                             "were chosen; resizing a trained param is not supported (close the optimizer "
                             "and make a new one)")
    if moment_keys(group) != layout.moments:
        raise ValueError(f"param group {gi} keeps {', '.join(moment_keys(group))} but its entries were chosen "
                         f"keeping {', '.join(layout.moments)}: switching amsgrad after the selection is not supported")
    buffers = indices, offsets, moments, age = layout.buffers(with_grad, states)
    steps = [states[i]["step"] for i in with_grad]  # int64 scalars on the CPU, as torch's AdamW keeps them
    next_age = None if age is None else age + 1
    args = ops.check_sparse_adamw_args(  # FSDP2: the local blocks, written in place through the view
        [local(params[i]) for i in with_grad],
        compact_values if compact_values is not None else [local(grads[i]) for i in with_grad],
        indices, offsets, moments, lr=group["lr"], betas=group["betas"], eps=group["eps"],
        weight_decay=group["weight_decay"], maximize=group["maximize"], age=next_age,
        step=torch.stack(steps) + 1 if age is None else None,  # no host read: the op takes the tensor
        check_indices=False, check_schedule=False)  # checked when selected or loaded

    def run():
        torch.ops.gem_kernels.sparse_adamw_(*args)
        torch._foreach_add_(steps, 1)  # one call for the group, as torch's own optimizers do
        if age is not None:
            age.copy_(next_age)
        layout.write_back(with_grad, states, buffers)
    return run


def _scalar_dtype(fused: bool) -> torch.dtype:
    """The dtype torch.optim.AdamW gives its ``step`` state."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def prepare_dense_update(ctx: StepContext, group):
    """A callable doing ``torch.optim.AdamW``'s step for a dense group (torch's own functional
    AdamW: the same bits), or None when no param of the group has a gradient."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return None
    ops.check_adamw_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    moments = moment_keys(group)
    for p in params:
        if p.grad.is_sparse:
            raise TypeError(f"a dense param of shape {tuple(p.shape)} has a sparse gradient; dense "
                            "param groups take dense gradients (as AdamW)")
        if ctx.state[p] and not set(moments) <= set(ctx.state[p]):
            raise ValueError(f"a dense param of shape {tuple(p.shape)} trained without AMSGrad before; switching "
                             "amsgrad on after the first step is not supported")
        if p.grad.shape != p.shape or p.grad.dtype != p.dtype or p.grad.device != p.device:
            raise ValueError(f"a dense param of shape {tuple(p.shape)} ({p.dtype}, {p.device}) has a "
                             f"gradient of shape {tuple(p.grad.shape)} ({p.grad.dtype}, {p.grad.device})")

    def run():
        for p in params:
            state = ctx.state[p]
            if len(state) == 0:
                fused = bool(group["fused"])
                state["step"] = (torch.zeros((), dtype=_scalar_dtype(True), device=p.device) if fused
                                 else torch.tensor(0.0, dtype=_scalar_dtype(False)))
                for key in moments:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [ctx.state[p] for p in params]
        beta1, beta2 = group["betas"]
        amsgrad = group["amsgrad"]
        torch_adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                    [s["step"] for s in states], foreach=group["foreach"], fused=group["fused"],
                    has_complex=any(torch.is_complex(p) for p in params), amsgrad=amsgrad, beta1=beta1,
                    beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
    return run


def _run_all(updates) -> None:
    for update in updates:
        if update is not None:
            update()


def _dense_updates(ctx: StepContext) -> list:
    return [prepare_dense_update(ctx, g) for g in ctx.param_groups if not g["sparse"]]


# ---------------------------------------------------------------------------------------
# The phases


class Calibrating:
    """GEM, GradMagnitude: ``steps`` steps add the gradients into sums; the last one chooses the
    entries from them (``budget_args``: the optimizer's ``(density, budget)``)."""

    def __init__(self, selector, steps: int, budget_args: tuple):
        self.selector = selector
        self.steps = steps
        self.budget_args = budget_args

    def step(self, ctx: StepContext, selection: SelectionState) -> None:
        """The last step works on copies of the sums (one more fp32 copy of the sparse params,
        still less than AdamW's two moments), so a selection that raises leaves them as they were."""
        if self.steps == 0:
            raise RuntimeError("calibration_steps=0: call opt.calibrate(model, batches, loss_fn) "
                               "before the first step()")
        for group in ctx.param_groups:  # nothing updates yet, but a bad lr fails at once, not steps later
            ops.check_adamw_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        last = selection.calibration_done + 1 == self.steps
        sums = stored_sums(ctx, copy=last)
        add_gradients(ctx, sums)
        if last:
            choose_entries(ctx, selection, self.selector, self.budget_args, sums)
        else:
            for p, total in sums.items():
                ctx.state[p]["grad_sum"] = total
        selection.calibration_done += 1


class Unmasking:
    """ID3: each step unmasks its new entries (global top-k outside the set among the params that
    have a gradient), then trains every unmasked entry with the dense gradients."""

    def __init__(self, selector, budget_args: tuple):
        self.selector = selector
        self.budget_args = budget_args

    def step(self, ctx: StepContext, selection: SelectionState) -> None:
        described, dense = ctx.described_grads(sparse=True), ctx.described_grads(sparse=False)
        _require_dense(described, "ID3")
        _require_dense(dense, "AdamW")
        check_finite(described + dense, ctx.sharding)
        for group in ctx.param_groups:
            with_grad = [p for p in group["params"] if p.grad is not None]
            if group["sparse"] and with_grad:
                _precheck_sparse_inputs(group, with_grad, [p.grad for p in with_grad])
        dense_updates = _dense_updates(ctx)

        named = ctx.sparse_params
        started = selection.selection_started
        budget = selection.budget if started else resolve_budget([p for _, p in named], *self.budget_args)
        states = {p: ctx.state[p] if started else new_state(p, torch.zeros(0, dtype=torch.int64, device=p.device),
                                                            ctx.moments_of(p), incremental=True)
                  for _, p in named}
        step = selection.unmask_done + 1
        candidates = [p for _, p in named if p.grad is not None and p.requires_grad]
        if candidates:
            current = [states[p]["indices"] for p in candidates]
            offsets = torch.zeros(len(candidates) + 1, dtype=torch.int64, device=current[0].device)
            offsets[1:] = torch.tensor([c.numel() for c in current], dtype=torch.int64).cumsum(0)
            so_far = int(offsets[-1]) if ctx.sharding is None else ctx.sharding.total(int(offsets[-1]))
            available = sum(p.numel() for p in candidates) - so_far  # full tensors' counts under FSDP2
            count = min(self.selector.unmask_count(step, budget), available)
            new = self.selector.select_new([local(p.grad).contiguous() for p in candidates],
                                           [local(p).detach() for p in candidates], count,
                                           (torch.cat(current), offsets), on=selector_ops(ctx.sharding, candidates))
            bounds = new.offsets.tolist()
            for j, p in enumerate(candidates):
                states[p] = merged_state(states[p], p, new.indices[bounds[j]:bounds[j + 1]], ctx.moments_of(p))
        for _, p in named:
            ctx.state[p] = states[p]
        if not started:
            selection.budget = budget
            selection.report = [{"entropy": None, "score": None, "note": None} for _ in named]
            selection.selection_started = True
        ctx.repack(selection, incremental=True)
        sparse_updates = [prepare_sparse_update(ctx, selection.layouts[gi], gi, [p.grad for p in g["params"]])
                          for gi, g in enumerate(ctx.param_groups) if g["sparse"]]
        _run_all(sparse_updates + dense_updates)
        selection.unmask_done = step
        if step == self.selector.total_steps:
            selection.phase = "training"


def _compact_group(ctx: StepContext, gi: int):
    """The selected gradient values of sparse group ``gi``: ``(grads, values)``, ``grads[i]`` the
    values of param i (None without a gradient) and ``values`` all of them concatenated in fp32
    (None when no param has a gradient)."""
    grads = [compact_grad(p, ctx.state[p]["indices"]) for p in ctx.param_groups[gi]["params"]]
    present = [g for g in grads if g is not None]
    return grads, torch.cat(present).float() if present else None


def _first_non_finite(ctx: StepContext, gi: int, grads: list) -> str:
    i = next(i for i, g in enumerate(grads) if g is not None and not bool(torch.isfinite(g).all()))
    return ctx.describe(gi, i)


class Training:
    """The selected entries train: one ``sparse_adamw_`` per sparse group on the compact
    gradients, torch's AdamW per dense group."""

    def step(self, ctx: StepContext, selection: SelectionState) -> None:
        _require_dense(ctx.described_grads(sparse=True), "SparseAdamW")
        _require_dense(ctx.described_grads(sparse=False), "AdamW")
        compact = {gi: _compact_group(ctx, gi) for gi, group in enumerate(ctx.param_groups) if group["sparse"]}
        # One finite check per group, on the values the op reads; the culprit is looked for only on failure.
        check_finite([(functools.partial(_first_non_finite, ctx, gi, grads), values)
                      for gi, (grads, values) in compact.items() if values is not None]
                     + ctx.described_grads(sparse=False), ctx.sharding)
        updates = [prepare_sparse_update(ctx, selection.layouts[gi], gi, grads, values)
                   for gi, (grads, values) in compact.items()]
        _run_all(updates + _dense_updates(ctx))
