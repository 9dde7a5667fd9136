"""SparseAdamW: a drop-in ``torch.optim.AdamW`` that trains only a chosen set of weight entries.

Use it as AdamW::

    opt = SparseAdamW(model.parameters(), lr=1e-4, density=1e-3)   # GEM by default
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

Groups and phases
-----------------
* A param group is *sparse* or *dense* (key ``sparse``). Without the key, tensors with
  ``dim >= 2`` go to a sparse group and the others to a dense one (the group is split in two).
  Dense groups get torch's own AdamW (``torch.optim.adam.adam`` with decoupled decay): the
  same bits as ``torch.optim.AdamW``; ``foreach`` and ``fused`` only matter for them.
* ``density`` (a fraction in (0, 1]) or ``budget`` (a count) sets how many entries of the
  sparse groups train, ``B = round(density * N)``, N counted when the selection is made.
* ``phase`` is ``"calibration"`` then ``"training"`` (ID3: ``"unmasking"`` then ``"training"``).
  Calibration: the first ``calibration_steps`` calls to ``step()`` only add the gradients of
  the sparse tensors into an fp32 sum; no weight changes, *dense groups do not train either*.
  Then the selector picks the entries (GEM, GradMagnitude; Random needs no gradient and picks
  at construction when ``calibration_steps=0``, its default). ``calibrate()`` does the same
  over explicit batches. The default ``calibration_steps`` is 8 for gradient selectors: the
  paper sums over a full pass of the training data, so set ``len(loader)`` (or call
  ``calibrate``) to reproduce it; 8 batches is a cheap default that averages out one batch's
  noise. ``calibration_steps=0`` with GEM means "I will call ``calibrate()``".
* Training: one ``ops.sparse_adamw_`` call per sparse group. A post-accumulate-grad hook on
  every sparse param replaces the dense gradient by a coalesced sparse COO gradient holding
  only the selected entries, so no dense gradient outlives its backward, ``GradScaler``
  unscales and inf-checks it (it unscales ``_values()`` in place), and gradient accumulation
  over several backward calls still sums (autograd adds the next dense grad to it).
  Optimizer state per sparse param is O(k): int64 ``indices``, fp32 ``exp_avg``/``exp_avg_sq``
  (views into one buffer per group), the ``original`` values (param dtype), ID3's ``age``.
  ``torch.nn.utils.clip_grad_norm_`` does not take sparse gradients: use ``clip_grad_norm_``.

Params without a gradient at a step are skipped, as torch does. During calibration a sparse
tensor that never got a gradient makes the selection raise a ValueError naming it (freeze
it by leaving it out of the optimizer, or put it in a ``sparse=False`` group).
Non-finite gradients make ``step()`` raise a ValueError naming the parameter, before any
weight or state changes.
"""
from __future__ import annotations

import functools
import math
import weakref
from collections import defaultdict
from copy import deepcopy

import torch
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from . import ops
from .selection import GEM, ID3, Selector

Tensor = torch.Tensor

DEFAULT_CALIBRATION_STEPS = 8
STATE_KEY = "sparse_adamw"
_MOMENT_KEYS = ("indices", "exp_avg", "exp_avg_sq")


def _gather_selected_grad(optimizer_ref, param: Tensor) -> None:
    """Post-accumulate-grad hook: keep only the selected entries of the fresh dense gradient."""
    optimizer = optimizer_ref()
    if optimizer is None or optimizer._phase != "training":
        return
    coords = optimizer._coords.get(param)
    grad = param.grad
    if coords is None or grad is None or grad.is_sparse:
        return
    values = grad.reshape(-1)[optimizer.state[param]["indices"]]
    # Coalesced COO order is ascending flat index, which is how our indices are kept. Sharing
    # the cached coords also marks the gradient as ours (see _compact_grad).
    param.grad = torch.sparse_coo_tensor(coords, values, param.shape, is_coalesced=True,
                                         check_invariants=False)


def _flat_positions(grad: Tensor) -> Tensor:
    """Flat (row-major) positions of a coalesced sparse COO tensor's entries."""
    coords = grad._indices()
    flat = torch.zeros(coords.shape[1], dtype=torch.int64, device=coords.device)
    for dim, size in enumerate(grad.shape):
        flat = flat * size + coords[dim]
    return flat


class SparseAdamW(torch.optim.Optimizer):
    """AdamW on a selected ~0.1% of the entries of the sparse groups; see the module doc."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, density=None, budget=None, selector=None,
                 calibration_steps=None):
        for name, value in (("amsgrad", amsgrad), ("capturable", capturable),
                            ("differentiable", differentiable)):
            if value:
                raise ValueError(f"{name}=True is not supported by SparseAdamW")
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        ops.check_adamw_hyper(lr, betas, eps, weight_decay)
        selector = GEM() if selector is None else selector
        if not isinstance(selector, Selector):
            raise TypeError(f"selector must be a gem_kernels.selection selector (GEM, ID3, "
                            f"GradMagnitude, Random), got {type(selector).__name__}")
        if (density is None) == (budget is None):
            raise ValueError("give exactly one of density (a fraction) and budget (a count)")
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)):
                raise TypeError(f"density must be a number, got {type(density).__name__}")
            if not (math.isfinite(density) and 0 < density <= 1):
                raise ValueError(f"density must be in (0, 1], got {density!r}")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int):
                raise TypeError(f"budget must be an int, got {type(budget).__name__}")
            if budget < 1:
                raise ValueError(f"budget must be >= 1, got {budget}")
        if calibration_steps is None:
            calibration_steps = DEFAULT_CALIBRATION_STEPS if selector.needs_calibration else 0
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int):
            raise TypeError(f"calibration_steps must be an int, got {type(calibration_steps).__name__}")
        if calibration_steps < 0:
            raise ValueError(f"calibration_steps must be >= 0, got {calibration_steps}")
        if selector.incremental and calibration_steps:
            raise ValueError("ID3 has no calibration: leave calibration_steps unset (or 0)")

        self._selector = selector
        self._density = density
        self._budget_arg = budget
        self._calibration_steps = calibration_steps
        self._phase = "unmasking" if selector.incremental else "calibration"
        self._selection_started = False  # True once any entry is selected: no sparse group may join
        self._calibration_done = 0
        self._unmask_done = 0
        self._budget = None  # resolved when the selection starts
        self._report = []
        self._flat = {}
        self._hook_handles = []
        self._coords = {}  # per hooked param: its indices as COO coordinates, made once

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(SparseAdamW._add_sparse_meta)

        if self._sparse_numel() == 0:
            raise ValueError("no sparse parameters: SparseAdamW needs tensors with dim >= 2 or a "
                             "group with sparse=True (for dense training use torch.optim.AdamW)")
        self._resolve_budget()  # bad budgets fail now, not after calibration
        if self._phase == "calibration" and calibration_steps == 0 and not selector.needs_calibration:
            self._select()

    # -----------------------------------------------------------------------------------
    # Public API beyond torch's

    @property
    def phase(self) -> str:
        return self._phase

    @property
    def selector(self) -> Selector:
        return self._selector

    def selected_count(self) -> int:
        """Number of entries selected so far (0 during calibration)."""
        return sum(int(self.state[p]["indices"].numel()) for _, p in self._sparse_params()
                   if "indices" in self.state.get(p, {}))

    def selected_entries(self) -> dict:
        """``{param: (indices, original_values)}`` for every sparse param: flat int64 indices
        sorted ascending and the values there when they were selected (param dtype). Copies;
        empty before anything is selected."""
        out = {}
        for _, p in self._sparse_params():
            state = self.state.get(p, {})
            if "indices" in state:
                out[p] = (state["indices"].clone(), state["original"].clone())
            else:
                out[p] = (torch.zeros(0, dtype=torch.int64, device=p.device),
                          torch.zeros(0, dtype=p.dtype, device=p.device))
        return out

    def selection_report(self) -> list:
        """Per sparse tensor: name (or index), shape, count, and GEM's entropy and score."""
        rows = []
        for i, (name, p) in enumerate(self._sparse_params()):
            state = self.state.get(p, {})
            row = {"name": name, "shape": tuple(p.shape), "numel": p.numel(),
                   "count": int(state["indices"].numel()) if "indices" in state else 0,
                   "entropy": None, "score": None}
            if i < len(self._report):
                row.update(self._report[i])
            rows.append(row)
        return rows

    @torch.no_grad()
    def calibrate(self, model: torch.nn.Module, batches, loss_fn) -> None:
        """Sum the gradients of ``loss_fn(model, batch)`` over ``batches``, then select.

        Adds to what earlier calibration steps summed; leaves every ``.grad`` of ``model``
        set to None. The model's train/eval mode is left as the caller set it.
        """
        if self._phase != "calibration":
            raise RuntimeError(f"calibrate() needs the calibration phase; the phase is {self._phase!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        count = 0
        for batch in batches:
            model.zero_grad(set_to_none=True)
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                loss.backward()
            self._accumulate(require_all=False)
            count += 1
        model.zero_grad(set_to_none=True)
        self.zero_grad(set_to_none=True)
        if count == 0:
            raise ValueError("batches gave no batch to calibrate on")
        self._select()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's grads, sparse ones included
        (torch's cannot read sparse gradients). Returns the total norm before clipping."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        values = [g.coalesce()._values() if g.is_sparse else g for g in grads]
        if not values:
            return torch.tensor(0.0)
        norms = torch.stack([torch.linalg.vector_norm(v.float(), norm_type) for v in values])
        total = torch.linalg.vector_norm(norms, norm_type)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for v in values:
            v.mul_(scale.to(v.dtype))
        return total

    # -----------------------------------------------------------------------------------
    # torch.optim.Optimizer overrides

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, plus the ``sparse`` key; without it the group is split by ``dim >= 2``."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            items = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, not sets")
        else:
            items = list(params)

        def tensor_of(item):
            return item[1] if isinstance(item, tuple) else item

        if "sparse" in param_group:
            if not isinstance(param_group["sparse"], bool):
                raise TypeError(f"sparse must be True or False, got {param_group['sparse']!r}")
            parts = [(param_group["sparse"], items)]
        else:
            is_sparse = [isinstance(tensor_of(it), torch.Tensor) and tensor_of(it).dim() >= 2 for it in items]
            parts = [(True, [it for it, s in zip(items, is_sparse) if s]),
                     (False, [it for it, s in zip(items, is_sparse) if not s])]
            parts = [part for part in parts if part[1]] or [(False, items)]

        for sparse, part in parts:
            group = {**param_group, "params": part, "sparse": sparse}
            merged = {**self.defaults, **group}
            ops.check_adamw_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
            for name in ("amsgrad", "capturable", "differentiable"):
                if merged.get(name):
                    raise ValueError(f"{name}=True is not supported by SparseAdamW")
            if sparse:
                self._check_sparse_group(part, tensor_of)
            super().add_param_group(group)

    def _check_sparse_group(self, items, tensor_of) -> None:
        if self._selection_started:
            raise ValueError("a sparse param group can only be added before the selection; "
                             "add it with sparse=False, or before the first step")
        seen = set()
        for item in items:
            p = tensor_of(item)
            if not isinstance(p, torch.Tensor):
                continue  # torch's add_param_group raises its TypeError
            if p.dtype not in ops.FLOAT_DTYPES:
                raise TypeError(f"sparse params must be float32, bfloat16 or float16, got {p.dtype}")
            if p.dim() == 0 or not p.is_contiguous():
                raise ValueError(f"sparse params must be contiguous with dim >= 1, got shape "
                                 f"{tuple(p.shape)} (put it in a sparse=False group)")
            if p in seen:
                raise ValueError("a sparse param group lists the same tensor twice")
            seen.add(p)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (calibration, unmasking or training, by phase); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._phase == "calibration":
            if self._calibration_steps == 0:
                raise RuntimeError("calibration_steps=0: call opt.calibrate(model, batches, loss_fn) "
                                   "before the first step()")
            last = self._calibration_done + 1 == self._calibration_steps
            self._accumulate(require_all=last)
            self._calibration_done += 1
            if last:
                self._select()
        elif self._phase == "unmasking":
            self._unmask_step()
        else:
            self._training_step()
        return loss

    # -----------------------------------------------------------------------------------
    # Helpers

    def _sparse_params(self):
        """``[(name, param)]`` of every sparse param in group order; name is the param's name
        when the optimizer got named parameters, else its position among the sparse params."""
        out = []
        for group in self.param_groups:
            if group["sparse"]:
                names = group.get("param_names")
                for i, p in enumerate(group["params"]):
                    out.append((names[i] if names else len(out), p))
        return out

    def _describe(self, gi: int, i: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][i]
        where = repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"
        return f"parameter {where} (shape {tuple(p.shape)})"

    def _sparse_numel(self) -> int:
        return sum(p.numel() for _, p in self._sparse_params())

    def _resolve_budget(self) -> int:
        total = self._sparse_numel()
        if self._budget_arg is not None:
            if self._budget_arg > total:
                raise ValueError(f"budget={self._budget_arg} is larger than the {total} entries of "
                                 "the sparse params")
            return self._budget_arg
        budget = round(self._density * total)
        if budget < 1:
            raise ValueError(f"density={self._density} selects no entry of the {total} sparse entries")
        return budget

    def _check_finite(self, described_grads) -> None:
        if not described_grads:
            return
        finite = [torch.isfinite(g._values() if g.is_sparse else g).all() for _, g in described_grads]
        device = finite[0].device
        if bool(torch.stack([f.to(device) for f in finite]).all()):  # one host sync per step
            return
        describe = next(d for (d, _), ok in zip(described_grads, finite) if not bool(ok))
        raise ValueError(f"the gradient of {describe()} has NaN or inf entries; nothing was "
                         "changed (with a GradScaler such steps are skipped for you)")

    def _dense_grads_described(self, sparse: bool):
        """``[(describe, grad)]`` of the params with a gradient in the sparse or dense groups."""
        out = []
        for gi, group in enumerate(self.param_groups):
            if group["sparse"] != sparse:
                continue
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    out.append((functools.partial(self._describe, gi, i), p.grad))
        return out

    def _accumulate(self, require_all: bool) -> None:
        """Calibration: add each sparse param's gradient into its fp32 sum (checked first)."""
        described = self._dense_grads_described(sparse=True)
        for describe, grad in described:
            if grad.is_sparse:
                raise ValueError(f"the gradient of {describe()} is sparse; calibration needs dense gradients")
        self._check_finite(described)
        if require_all:
            self._check_all_have_grads(lambda p: p.grad is not None or "grad_sum" in self.state.get(p, {}))
        for _, p in self._sparse_params():
            if p.grad is not None:
                state = self.state[p]
                if "grad_sum" not in state:
                    state["grad_sum"] = torch.zeros_like(p, dtype=torch.float32,
                                                         memory_format=torch.contiguous_format)
                state["grad_sum"].add_(p.grad)

    def _check_all_have_grads(self, has_grad) -> None:
        for gi, group in enumerate(self.param_groups):
            if group["sparse"]:
                for i, p in enumerate(group["params"]):
                    if not has_grad(p):
                        raise ValueError(f"{self._describe(gi, i)} got no gradient; the selection "
                                         "needs one for every sparse param (leave frozen tensors out of "
                                         "the optimizer or put them in a sparse=False group)")

    def _select(self) -> None:
        """Calibration → training: choose the entries, create O(k) state, free the sums."""
        named = self._sparse_params()
        if self._selector.needs_calibration:
            self._check_all_have_grads(lambda p: "grad_sum" in self.state.get(p, {}))
        budget = self._resolve_budget()
        weights = [p.detach() for _, p in named]
        grads = [self.state.get(p, {}).get("grad_sum", w) for (_, p), w in zip(named, weights)]
        selection = self._selector.select(grads, weights, budget)
        offsets = selection.offsets.tolist()
        for i, (_, p) in enumerate(named):
            indices = selection.indices[offsets[i]:offsets[i + 1]].clone()
            self.state[p] = {
                "step": torch.tensor(0, dtype=torch.int64),
                "indices": indices,
                "original": p.detach().reshape(-1)[indices].clone(),
                "exp_avg": torch.zeros(indices.numel(), dtype=torch.float32, device=p.device),
                "exp_avg_sq": torch.zeros(indices.numel(), dtype=torch.float32, device=p.device),
            }
        self._report = [
            {"entropy": None if selection.entropy is None else selection.entropy[i],
             "score": None if selection.score is None else selection.score[i]}
            for i in range(len(named))]
        self._budget = budget
        self._selection_started = True
        self._phase = "training"
        self._pack_groups()
        self._install_hooks()

    def _state_keys(self):
        return _MOMENT_KEYS + (("age",) if self._selector.incremental else ())

    def _pack_groups(self) -> None:
        """One flat buffer per state key and sparse group; each param's state is a view of it,
        so a group's step is one op call with no copies."""
        self._flat = {}
        for gi, group in enumerate(self.param_groups):
            if not group["sparse"]:
                continue
            params = group["params"]
            counts = [self.state[p]["indices"].numel() for p in params]
            flat = {key: torch.cat([self.state[p][key] for p in params]) for key in self._state_keys()}
            offsets = torch.zeros(len(params) + 1, dtype=torch.int64, device=flat["indices"].device)
            offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
            flat["offsets"] = offsets
            bounds = offsets.tolist()
            for i, p in enumerate(params):
                for key in self._state_keys():
                    self.state[p][key] = flat[key][bounds[i]:bounds[i + 1]]
            self._flat[gi] = flat

    def _install_hooks(self) -> None:
        self._remove_hooks()
        hook = functools.partial(_gather_selected_grad, weakref.ref(self))
        for _, p in self._sparse_params():
            if p.requires_grad:
                self._coords[p] = torch.stack(torch.unravel_index(self.state[p]["indices"], p.shape))
                self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._coords = {}

    def _compact_grad(self, p: Tensor):
        """The gradient of sparse param ``p`` at its selected entries (param dtype), or None."""
        grad = p.grad
        if grad is None:
            return None
        indices = self.state[p]["indices"]
        if not grad.is_sparse:
            return grad.reshape(-1)[indices]
        grad = grad.coalesce()
        coords = self._coords.get(p)
        if coords is not None and grad._indices().data_ptr() == coords.data_ptr():
            return grad._values()  # made by our hook: no need to compare positions
        if grad._nnz() == indices.numel() and torch.equal(_flat_positions(grad), indices):
            return grad._values()
        # Someone else's sparse gradient (or one zeroed by zero_grad(set_to_none=False)).
        return grad.to_dense().reshape(-1)[indices]

    def _dense_step(self, group) -> None:
        """torch.optim.AdamW's step for a dense group, through torch's own functional AdamW."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("dense param groups do not take sparse gradients (as AdamW)")
            state = self.state[p]
            if len(state) == 0:
                state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
                                 if group["fused"] else torch.tensor(0.0, dtype=_get_scalar_dtype()))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _torch_adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                    has_complex=any(torch.is_complex(p) for p in params), beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"], foreach=group["foreach"], capturable=False,
                    differentiable=False, fused=group["fused"], grad_scale=None, found_inf=None,
                    decoupled_weight_decay=True)

    def _check_hypers(self) -> None:
        for group in self.param_groups:
            ops.check_adamw_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _sparse_group_step(self, gi: int, group, grads, dense_grads: bool) -> None:
        """One ``ops.sparse_adamw_`` call for the params of a sparse group that have a gradient.

        ``grads[i]``: param i's dense gradient (``dense_grads``) or its compact values, or None.
        """
        params = group["params"]
        have = [i for i, g in enumerate(grads) if g is not None]
        if not have:
            return
        flat = self._flat[gi]
        incremental = self._selector.incremental
        for i in have:
            self.state[params[i]]["step"] += 1
        if len(have) == len(params):
            # The common case: the group's flat buffers are the op's arguments, no copies.
            sub_params = params
            indices, offsets = flat["indices"], flat["offsets"]
            exp_avg, exp_avg_sq = flat["exp_avg"], flat["exp_avg_sq"]
            age = flat["age"] if incremental else None
        else:
            sub_params = [params[i] for i in have]
            states = [self.state[p] for p in sub_params]
            indices = torch.cat([s["indices"] for s in states])
            offsets = torch.zeros(len(have) + 1, dtype=torch.int64, device=indices.device)
            offsets[1:] = torch.tensor([s["indices"].numel() for s in states]).cumsum(0)
            exp_avg = torch.cat([s["exp_avg"] for s in states])
            exp_avg_sq = torch.cat([s["exp_avg_sq"] for s in states])
            age = torch.cat([s["age"] for s in states]) if incremental else None
        sub_grads = [grads[i] for i in have]
        if dense_grads:
            op_grads = [g.contiguous() for g in sub_grads]
        else:
            op_grads = torch.cat([g.float() for g in sub_grads])
        if incremental:
            age += 1
            schedule = {"age": age}
        else:
            steps = [int(self.state[p]["step"]) for p in sub_params]
            schedule = {"step": steps[0] if len(set(steps)) == 1 else
                        torch.tensor(steps, dtype=torch.int64, device=indices.device)}
        ops.sparse_adamw_(sub_params, op_grads, indices, offsets, exp_avg, exp_avg_sq,
                          lr=float(group["lr"]), betas=group["betas"], eps=group["eps"],
                          weight_decay=group["weight_decay"], maximize=group["maximize"],
                          check_indices=False, **schedule)  # checked when selected or loaded
        if len(have) != len(params):
            bounds = offsets.tolist()
            for j, p in enumerate(sub_params):
                for key, buffer in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("age", age)):
                    if buffer is not None:
                        self.state[p][key].copy_(buffer[bounds[j]:bounds[j + 1]])

    def _training_step(self) -> None:
        self._check_hypers()
        compact = {}
        described = []
        for gi, group in enumerate(self.param_groups):
            if group["sparse"]:
                grads = [self._compact_grad(p) for p in group["params"]]
                compact[gi] = grads
                described += [(functools.partial(self._describe, gi, i), g)
                              for i, g in enumerate(grads) if g is not None]
        described += self._dense_grads_described(sparse=False)
        self._check_finite(described)
        for gi, group in enumerate(self.param_groups):
            if group["sparse"]:
                self._sparse_group_step(gi, group, compact[gi], dense_grads=False)
            else:
                self._dense_step(group)

    def _unmask_step(self) -> None:
        """ID³: unmask this step's new entries (global top-k outside the set), then train all."""
        self._check_hypers()
        named = self._sparse_params()
        self._check_all_have_grads(lambda p: p.grad is not None)
        described = self._dense_grads_described(sparse=True)
        for describe, grad in described:
            if grad.is_sparse:
                raise ValueError(f"the gradient of {describe()} is sparse; ID3 needs dense gradients")
        self._check_finite(described + self._dense_grads_described(sparse=False))

        if not self._selection_started:
            budget = self._resolve_budget()
            for _, p in named:
                self.state[p] = {
                    "step": torch.tensor(0, dtype=torch.int64),
                    "indices": torch.zeros(0, dtype=torch.int64, device=p.device),
                    "original": torch.zeros(0, dtype=p.dtype, device=p.device),
                    "exp_avg": torch.zeros(0, dtype=torch.float32, device=p.device),
                    "exp_avg_sq": torch.zeros(0, dtype=torch.float32, device=p.device),
                    "age": torch.zeros(0, dtype=torch.int64, device=p.device),
                }
            self._budget = budget
            self._selection_started = True
            self._report = [{} for _ in named]

        step = self._unmask_done + 1
        count = self._selector.unmask_count(step, self._budget)
        params = [p for _, p in named]
        current = torch.cat([self.state[p]["indices"] for p in params])
        current_offsets = torch.zeros(len(params) + 1, dtype=torch.int64, device=current.device)
        current_offsets[1:] = torch.tensor([self.state[p]["indices"].numel() for p in params]).cumsum(0)
        new = self._selector.select_new([p.grad.contiguous() for p in params], [p.detach() for p in params],
                                        count, (current, current_offsets))
        bounds = new.offsets.tolist()
        for i, p in enumerate(params):
            self._merge_entries(p, new.indices[bounds[i]:bounds[i + 1]])
        self._pack_groups()

        for gi, group in enumerate(self.param_groups):
            if group["sparse"]:
                self._sparse_group_step(gi, group, [p.grad for p in group["params"]], dense_grads=True)
            else:
                self._dense_step(group)
        self._unmask_done = step
        if step == self._selector.total_steps:
            self._phase = "training"
            self._install_hooks()

    def _merge_entries(self, p: Tensor, new_indices: Tensor) -> None:
        """Add never-selected entries to p's set, keeping it sorted; new moments and ages are 0."""
        if new_indices.numel() == 0:
            return
        state = self.state[p]
        n_new = new_indices.numel()
        merged = torch.cat([state["indices"], new_indices])
        order = torch.argsort(merged)
        fresh = {
            "exp_avg": torch.zeros(n_new, dtype=torch.float32, device=p.device),
            "exp_avg_sq": torch.zeros(n_new, dtype=torch.float32, device=p.device),
            "age": torch.zeros(n_new, dtype=torch.int64, device=p.device),
            # Never-selected entries were never written: these are still the original values.
            "original": p.detach().reshape(-1)[new_indices].clone(),
        }
        state["indices"] = merged[order]
        for key, values in fresh.items():
            state[key] = torch.cat([state[key], values])[order]

    # -----------------------------------------------------------------------------------
    # Checkpointing

    def _config(self) -> dict:
        return {"selector": repr(self._selector), "density": self._density,
                "budget": self._budget_arg, "calibration_steps": self._calibration_steps}

    @staticmethod
    def _add_sparse_meta(optimizer, state_dict):
        state_dict[STATE_KEY] = {
            "config": optimizer._config(),
            "phase": optimizer._phase,
            "selection_started": optimizer._selection_started,
            "calibration_done": optimizer._calibration_done,
            "unmask_done": optimizer._unmask_done,
            "resolved_budget": optimizer._budget,
            "report": deepcopy(optimizer._report),
            "shapes": [[tuple(p.shape) for p in g["params"]] for g in optimizer.param_groups],
        }
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but sparse state keeps its dtypes (int64 indices, fp32 moments) and the
        checkpoint must come from the same model layout and SparseAdamW configuration."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        meta = state_dict.get(STATE_KEY)
        if meta is None:
            raise ValueError("state_dict was not written by SparseAdamW (no 'sparse_adamw' entry)")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                             f"has {len(groups)}")
        for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"param group {gi} has {len(group['params'])} params, the "
                                 f"checkpoint's has {len(saved['params'])}")
            if bool(saved.get("sparse")) != group["sparse"]:
                raise ValueError(f"param group {gi} is sparse={group['sparse']} here but "
                                 f"sparse={saved.get('sparse')} in the checkpoint")
            for i, (p, shape) in enumerate(zip(group["params"], meta["shapes"][gi])):
                if tuple(p.shape) != tuple(shape):
                    raise ValueError(f"{self._describe(gi, i)} does not match the checkpoint's "
                                     f"shape {tuple(shape)}: the checkpoint is from another model")
        if meta["config"] != self._config():
            raise ValueError(f"the checkpoint was written with {meta['config']}, this optimizer has "
                             f"{self._config()}")

        id_map = dict(zip((i for g in saved_groups for i in g["params"]),
                          (p for g in groups for p in g["params"])))
        sparse_ids = {i for g in saved_groups if g.get("sparse") for i in g["params"]}
        state = defaultdict(dict)
        for key, value in state_dict["state"].items():
            if key not in id_map:
                state[key] = value
                continue
            p = id_map[key]
            if key in sparse_ids:
                # No dtype cast: torch's would turn int64 indices and fp32 moments into bf16.
                state[p] = {k: v.to(device=p.device) if k != "step" else v.clone()
                            for k, v in value.items()}
                self._check_loaded_sparse_state(p, state[p])
            else:
                state[p] = {k: torch.optim.Optimizer._process_value_according_to_param_policy(
                    p, v, key, state_dict["param_groups"], k) if isinstance(v, torch.Tensor) else v
                    for k, v in value.items()}

        def update_group(group, new_group):
            new_group["params"] = group["params"]
            if "param_names" in group and "param_names" not in new_group:
                new_group["param_names"] = group["param_names"]
            return new_group

        self._remove_hooks()
        self.__setstate__({"state": state, "param_groups": [update_group(g, ng) for g, ng in
                                                           zip(groups, saved_groups)]})
        self._phase = meta["phase"]
        self._selection_started = meta["selection_started"]
        self._calibration_done = meta["calibration_done"]
        self._unmask_done = meta["unmask_done"]
        self._budget = meta["resolved_budget"]
        self._report = deepcopy(meta["report"])
        self._flat = {}
        if self._selection_started:
            self._pack_groups()
        if self._phase == "training":
            self._install_hooks()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loaded_sparse_state(self, p: Tensor, state: dict) -> None:
        if "indices" not in state:
            return
        indices = state["indices"]
        n = indices.numel()
        try:  # every later step trusts these indices (sparse_adamw_ with check_indices=False)
            ops.check_index_set("checkpoint", indices, torch.tensor([0, n], device=indices.device),
                                [p.numel()], p.device)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the checkpoint's indices for a tensor of shape {tuple(p.shape)} are "
                             f"invalid ({error}): the checkpoint is from another model") from None
        for key in ("exp_avg", "exp_avg_sq", "original") + (("age",) if "age" in state else ()):
            if state[key].numel() != n:
                raise ValueError(f"the checkpoint's {key} has {state[key].numel()} entries for {n} indices")
