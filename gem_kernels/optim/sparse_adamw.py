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
  Dense groups get torch's own functional AdamW (``torch.optim.adamw.adamw``): the same bits
  as ``torch.optim.AdamW``; ``foreach`` and ``fused`` only matter for them.
* ``density`` (a fraction in (0, 1]) or ``budget`` (a count) sets how many entries of the
  sparse groups train, ``B = round(density * N)``, N the entries of the sparse params that
  require grad when the selection is made. Frozen params (``requires_grad=False``) are never
  candidates.
* ``phase`` is ``"calibration"`` then ``"training"`` (ID3: ``"unmasking"`` then ``"training"``).
  Calibration: the first ``calibration_steps`` calls to ``step()`` only add the gradients of
  the sparse tensors into an fp32 sum; no weight changes, *dense groups do not train either*.
  Then the selector picks the entries (GEM, GradMagnitude; Random needs no gradient and picks
  at construction when ``calibration_steps=0``, its default). ``calibrate()`` does the same
  over explicit batches. A sparse param that got no gradient in calibration gets no entry (a
  warning names it, ``selection_report()`` says why); the budget goes to the others.
* Training: one ``sparse_adamw_`` op call per sparse group (see ``phases``), which reads the
  dense gradients at the selected entries. Optimizer state per sparse param is O(k) (see
  ``layout``); the rest (phase, counters, budget, report) is a ``SelectionState`` (see
  ``state``); checkpoints go through torch's ``state_dict`` / ``load_state_dict`` (see
  ``checkpoint``).

torch's contract holds: the optimizer touches no module and no gradient. ``.grad`` stays the
dense tensor autograd made, so clipping, hooks, freezing, GradScaler, DDP and peft behave as
with AdamW. Sparse weight gradients are the explicit layer ``gem_kernels.sparsify_`` makes.

``step()`` reads like ``torch.optim.AdamW.step``: gather what the step reads (a
``phases.StepContext``), let the phase run once, enter the next phase if it moved on.

Every ``step()`` checks all it reads before writing, so a step that raises changes nothing.
FSDP2 (``fully_shard``) params: see ``optim/fsdp.py``.

``step()`` is excluded from ``torch.compile`` tracing (``torch.compiler.disable``): its phase
machine changes Python attributes and syncs with the host (the finite-gradient check, index
counts), which a traced graph would not replay. A compiled training step that calls it runs
it eagerly, in between two graphs, with the eager result in every phase.
"""
from __future__ import annotations

import torch

from .. import ops
from ..selectors import GEM, IncrementalSelector, Selector
from . import checkpoint, fsdp, phases
from .groups import check_budget_args, resolve_budget, split_param_group
from .state import SelectionState

Tensor = torch.Tensor

DEFAULT_CALIBRATION_STEPS = 8


def _calibration_steps(steps, selector) -> int:
    """The number of calibration steps: ``steps``, checked, or the selector's default."""
    incremental = isinstance(selector, IncrementalSelector)
    if steps is None:
        return DEFAULT_CALIBRATION_STEPS if not incremental and selector.needs_gradients else 0
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"calibration_steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise ValueError(f"calibration_steps must be >= 0, got {steps}")
    if incremental and steps:
        raise ValueError("ID3 has no calibration: leave calibration_steps unset (or 0)")
    return steps


class SparseAdamW(torch.optim.Optimizer):
    """AdamW on a selected ~0.1% of the entries of the sparse groups; see the module doc."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, density=None, budget=None, selector=None,
                 calibration_steps=None):
        for name, value in (("capturable", capturable), ("differentiable", differentiable)):
            if value:
                raise ValueError(f"{name}=True is not supported by SparseAdamW")
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        ops.check_adamw_hyper(lr, betas, eps, weight_decay)
        selector = GEM() if selector is None else selector
        if not isinstance(selector, Selector):
            raise TypeError(f"selector must be a gem_kernels.selectors selector (GEM, ID3, "
                            f"GradMagnitude, Random), got {type(selector).__name__}")
        check_budget_args(density, budget)
        incremental = isinstance(selector, IncrementalSelector)
        calibration_steps = _calibration_steps(calibration_steps, selector)

        self._selector = selector
        self._budget_args = (density, budget)
        self._calibration_steps = calibration_steps
        self.selection_state = SelectionState(phase="unmasking" if incremental else "calibration")
        self._phases = {"calibration": phases.Calibrating(selector, calibration_steps, self._budget_args),
                        "unmasking": phases.Unmasking(selector, self._budget_args),
                        "training": phases.Training()}
        self._sharding = None  # FSDP2 params: where this rank's blocks lie (optim/fsdp.py)
        self._pending_load = None  # between the load hooks: the checked sparse states and selection

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=bool(amsgrad), maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=fused, decoupled_weight_decay=True)
        super().__init__(params, defaults)
        if not self.sparse_params():
            raise ValueError("no sparse parameters: SparseAdamW needs tensors with dim >= 2 or a "
                             "group with sparse=True (for dense training use torch.optim.AdamW)")
        resolve_budget([p for _, p in self.sparse_params()], density, budget)  # bad budgets fail now
        if self.phase == "calibration" and calibration_steps == 0 and not selector.needs_gradients:
            phases.choose_entries(self._context(), self.selection_state, selector, self._budget_args, {})
        self.register_step_pre_hook(fsdp.refuse_dcp_init_step)  # DCP's first step on FSDP2 params (fsdp.py)
        self.register_state_dict_post_hook(SparseAdamW._add_checkpoint_entry)
        self.register_load_state_dict_pre_hook(SparseAdamW._check_checkpoint)
        self.register_load_state_dict_post_hook(SparseAdamW._restore_checkpoint)

    # -----------------------------------------------------------------------------------
    # Public API beyond torch's

    @property
    def phase(self) -> str:
        return self.selection_state.phase

    @property
    def selector(self) -> Selector:
        return self._selector

    @property
    def incremental(self) -> bool:
        return isinstance(self._selector, IncrementalSelector)

    def sparse_params(self) -> list:
        """``[(name, param)]`` of every sparse param in group order; name is the param's name
        when the optimizer got named parameters, else its position among the sparse params."""
        out = []
        for group in self.param_groups:
            if group["sparse"]:
                names = group.get("param_names")
                for i, p in enumerate(group["params"]):
                    out.append((names[i] if names else len(out), p))
        return out

    def selected_count(self) -> int:
        """Number of entries selected so far (0 during calibration)."""
        return sum(int(self.state[p]["indices"].numel()) for _, p in self.sparse_params()
                   if "indices" in self.state.get(p, {}))

    def selected_entries(self) -> dict:
        """``{param: (indices, original_values)}`` for every sparse param: flat int64 indices
        sorted ascending and the values there when they were selected (param dtype). Copies;
        empty before anything is selected."""
        out = {}
        for _, p in self.sparse_params():
            state = self.state.get(p, {})
            if "indices" in state:
                out[p] = (state["indices"].clone(), state["original"].clone())
            else:
                out[p] = (torch.zeros(0, dtype=torch.int64, device=p.device),
                          torch.zeros(0, dtype=p.dtype, device=p.device))
        return out

    def selection_report(self) -> list:
        """Per sparse tensor: name (or index), shape, count, GEM's entropy and score, and a
        note saying why a tensor got no entry (frozen, no gradient in calibration)."""
        rows = []
        for i, (name, p) in enumerate(self.sparse_params()):
            state = self.state.get(p, {})
            row = {"name": name, "shape": tuple(p.shape), "numel": p.numel(),
                   "count": int(state["indices"].numel()) if "indices" in state else 0,
                   "entropy": None, "score": None, "note": None}
            if i < len(self.selection_state.report):
                row.update(self.selection_state.report[i])
            rows.append(row)
        return rows

    @torch.compiler.disable
    @torch.no_grad()
    def calibrate(self, model: torch.nn.Module, batches, loss_fn) -> None:
        """Sum the gradients of ``loss_fn(model, batch)`` over ``batches``, then select.

        Adds to what earlier calibration steps summed; leaves every ``.grad`` of ``model``
        set to None. The model's train/eval mode is left as the caller set it. If it raises,
        the optimizer is as before the call.
        """
        if self.phase != "calibration":
            raise RuntimeError(f"calibrate() needs the calibration phase; the phase is {self.phase!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        ctx = self._context()
        sums, count = phases.stored_sums(ctx, copy=True), 0
        try:
            for batch in batches:
                model.zero_grad(set_to_none=True)
                self.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss_fn(model, batch).backward()
                phases.add_gradients(ctx, sums)
                count += 1
        finally:
            model.zero_grad(set_to_none=True)
            self.zero_grad(set_to_none=True)
        if count == 0:
            raise ValueError("batches gave no batch to calibrate on")
        phases.choose_entries(ctx, self.selection_state, self._selector, self._budget_args, sums)

    def replace_trained_params(self, replacements: dict) -> None:
        """Puts each ``replacements[weight]``, a tensor of the k values selected in ``weight`` (as
        ``gem_kernels.sparsify_`` makes them), in the weight's place in its group. Its state
        carries over with the index set ``0..k-1`` (the same moments, step and original values),
        so training goes on as before, and the group keeps its place for LR schedulers. Checks
        everything before it changes anything."""
        if self.phase != "training" or self.incremental:
            raise ValueError("replace_trained_params needs a one-shot selection that was made "
                             f"(phase {self.phase!r}, selector {type(self._selector).__name__})")
        where = {id(p): (gi, i) for gi, g in enumerate(self.param_groups) if g["sparse"]
                 for i, p in enumerate(g["params"])}
        for weight, values in replacements.items():
            if id(weight) not in where:
                raise ValueError(f"a weight of shape {tuple(weight.shape)} is not a sparse param of this optimizer")
            k = self.state[weight]["indices"].numel()
            if values.shape != (k,) or values.dtype != weight.dtype or values.device != weight.device:
                raise ValueError(f"the values for {self._describe(*where[id(weight)])} must be {weight.dtype} "
                                 f"of shape ({k},) on {weight.device}, got {values.dtype} of shape "
                                 f"{tuple(values.shape)} on {values.device}")
        for weight, values in replacements.items():
            gi, i = where[id(weight)]
            group = self.param_groups[gi]
            group["params"][i] = values  # its name, if named, stays the weight's: the selection's rows
            state = self.state.pop(weight)
            state["indices"] = torch.arange(values.numel(), dtype=torch.int64, device=values.device)
            self.state[values] = state
        self._context().repack(self.selection_state, incremental=False)

    # -----------------------------------------------------------------------------------
    # torch.optim.Optimizer overrides

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, plus the ``sparse`` key; without it the group is split by ``dim >= 2``.
        Adds all of it or nothing."""
        count = len(self.param_groups)
        try:
            for group in split_param_group(param_group, self.defaults, self.selection_state.selection_started):
                super().add_param_group(group)
            self._sharding = fsdp.sharding_of([p for _, p in self.sparse_params()], self._selector)
        except BaseException:
            del self.param_groups[count:]
            raise

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (calibration, unmasking or training, by phase); returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._phases[self.phase].step(self._context(), self.selection_state)
        return loss

    # -----------------------------------------------------------------------------------
    # Internals

    def _context(self) -> phases.StepContext:
        return phases.StepContext(self.param_groups, self.state, self.sparse_params(), self._describe,
                                  self._sharding)

    def _describe(self, gi: int, i: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][i]
        where = repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"
        return f"parameter {where} (shape {tuple(p.shape)})"

    def _config(self) -> dict:
        density, budget = self._budget_args
        return {"selector": repr(self._selector), "density": density, "budget": budget,
                "calibration_steps": self._calibration_steps}

    def _shard(self):
        return None if self._sharding is None else self._sharding.meta()

    # The checkpoint hooks (see ``checkpoint``).

    def _add_checkpoint_entry(self, state_dict: dict) -> dict:
        state_dict[checkpoint.STATE_KEY] = checkpoint.meta(self.selection_state, self._config(), self.param_groups,
                                                           self._shard())
        return state_dict

    def _check_checkpoint(self, state_dict: dict) -> dict:
        """Checks the whole checkpoint, then hands torch the dense part only: torch would cast the
        sparse states to the param's dtype (int64 indices of a bf16 param into bf16)."""
        dense, sparse_states, selection = checkpoint.split(
            state_dict, config=self._config(), shard=self._shard(), param_groups=self.param_groups,
            describe=self._describe, incremental=self.incremental)
        self._pending_load = (sparse_states, selection)
        return dense

    def _restore_checkpoint(self) -> None:
        sparse_states, selection = self._pending_load
        self._pending_load = None
        checkpoint.restore_sparse_states(self.state, sparse_states)
        self.selection_state = selection
        if selection.selection_started:
            self._context().repack(selection, self.incremental)
