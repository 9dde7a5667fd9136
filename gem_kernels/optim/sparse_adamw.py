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
* Training: one ``sparse_adamw_`` op call per sparse group (see ``phases``); a hook keeps only
  the selected entries of each fresh gradient (see ``grads``). Optimizer state per sparse
  param is O(k) (see ``layout``); the rest (phase, counters, budget, report) is a
  ``SelectionState`` (see ``state``); checkpoints go through torch's ``state_dict`` /
  ``load_state_dict`` (see ``checkpoint``).

``step()`` reads like ``torch.optim.AdamW.step``: gather what the step reads (a
``phases.StepContext``), let the phase run once, enter the next phase if it moved on.

A param is trained sparsely by one SparseAdamW at a time: ``close()`` (or leaving a ``with``
block) removes the hooks; a new SparseAdamW on the same params closes the old one, with a
warning. Every ``step()`` checks all it reads before writing, so a step that raises changes
nothing. FSDP2 (``fully_shard``) params: see ``optim/fsdp.py``.

``step()`` is excluded from ``torch.compile`` tracing (``torch.compiler.disable``): its phase
machine changes Python attributes and syncs with the host (the finite-gradient check, index
counts), which a traced graph would not replay. A compiled training step that calls it runs
it eagerly, in between two graphs, with the eager result in every phase.
"""
from __future__ import annotations

import warnings

import torch

from .. import ops
from ..selection import GEM, IncrementalSelector, Selector
from . import checkpoint, fsdp, grads, phases
from .groups import check_budget_args, resolve_budget, split_param_group
from .state import SelectionState
from .weight_grads import PLAIN_DDP_MESSAGE, SparseWeightGrads

Tensor = torch.Tensor

DEFAULT_CALIBRATION_STEPS = 8


class SparseAdamW(torch.optim.Optimizer):
    """AdamW on a selected ~0.1% of the entries of the sparse groups; see the module doc."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, density=None, budget=None, selector=None,
                 calibration_steps=None, sparse_weight_grads="auto"):
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
        check_budget_args(density, budget)
        incremental = isinstance(selector, IncrementalSelector)
        if calibration_steps is None:
            calibration_steps = DEFAULT_CALIBRATION_STEPS if not incremental and selector.needs_gradients else 0
        if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int):
            raise TypeError(f"calibration_steps must be an int, got {type(calibration_steps).__name__}")
        if calibration_steps < 0:
            raise ValueError(f"calibration_steps must be >= 0, got {calibration_steps}")
        if incremental and calibration_steps:
            raise ValueError("ID3 has no calibration: leave calibration_steps unset (or 0)")

        self._selector = selector
        self._budget_args = (density, budget)
        self._calibration_steps = calibration_steps
        self.selection = SelectionState(phase="unmasking" if incremental else "calibration")
        self._phases = {"calibration": phases.Calibrating(selector, calibration_steps, self._budget_args),
                        "unmasking": phases.Unmasking(selector, self._budget_args),
                        "training": phases.Training()}
        self._hooks = grads.SelectedGradHooks()
        self._gradient_hooks_enabled = True  # off where a DDP comm hook reduces the selected values
        self._sharding = None  # FSDP2 params: where this rank's blocks lie (optim/fsdp.py)
        self._weight_grads = SparseWeightGrads(sparse_weight_grads)  # raises on a bad policy
        self._constructed = False  # add_param_group claims params only once the constructor did
        self._pending_load = None  # between the load hooks: the checked sparse states and selection
        self.closed = False

        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=maximize, foreach=foreach, capturable=False,
                        differentiable=False, fused=fused, decoupled_weight_decay=True)
        try:
            super().__init__(params, defaults)
            if not self.sparse_params():
                raise ValueError("no sparse parameters: SparseAdamW needs tensors with dim >= 2 or a "
                                 "group with sparse=True (for dense training use torch.optim.AdamW)")
            resolve_budget([p for _, p in self.sparse_params()], density, budget)  # bad budgets fail now
            self._watch_modules()
            if self.phase == "calibration" and calibration_steps == 0 and not selector.needs_gradients:
                phases.choose_entries(self._context(), self.selection, selector, self._budget_args, {})
                self._enter_phase()
        except BaseException:
            self._hooks.remove()  # a half-built optimizer leaves no hook behind
            if self._weight_grads is not None:
                self._weight_grads.remove()
            raise
        grads.claim([p for _, p in self.sparse_params()], self)
        self._constructed = True
        self.register_state_dict_post_hook(SparseAdamW._add_checkpoint_entry)
        self.register_load_state_dict_pre_hook(SparseAdamW._check_checkpoint)
        self.register_load_state_dict_post_hook(SparseAdamW._restore_checkpoint)

    # -----------------------------------------------------------------------------------
    # Public API beyond torch's

    @property
    def phase(self) -> str:
        return self.selection.phase

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
            if i < len(self.selection.report):
                row.update(self.selection.report[i])
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
        self.check_open()
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
        phases.choose_entries(ctx, self.selection, self._selector, self._budget_args, sums)
        self._enter_phase()

    def register_modules(self, model: torch.nn.Module) -> None:
        """Tells the optimizer which ``nn.Linear``/``Conv1D`` modules hold the weights it trains, so
        that their weight gradients are sparse from the first training step on (see
        ``optim/weight_grads.py``), and error messages name them. Without it they are found on
        their first call, and a checkpoint loaded into a fresh optimizer continues the
        uninterrupted run to fp32 rounding rather than bit for bit."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._weight_grads is not None:
            self._weight_grads.register(model.named_modules())

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's grads, sparse ones included
        (torch's cannot read sparse gradients). Returns the total norm before clipping. After
        the selection a sparse param's gradient holds only its selected entries, so the norm is
        that of the gradients that train, not of the dense gradients AdamW would see."""
        if self._sharding is not None:  # FSDP2: over every rank's blocks, a collective
            return fsdp.clip_grad_norm_(self.param_groups, self.state, self.phase == "training",
                                        self._sharding, max_norm, norm_type)
        return grads.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], max_norm, norm_type)

    def use_gradient_hooks(self, enabled: bool) -> None:
        """Whether trained sparse params get the hook that turns their gradient into a sparse
        COO tensor (the default). ``gem_kernels.distributed.attach`` turns it off: DDP's reducer
        needs dense gradients in its buckets, where its comm hook reduces the selected values and
        ``step()`` reads the dense gradient at the indices."""
        self._gradient_hooks_enabled = bool(enabled)
        self._enter_phase()

    def check_open(self) -> None:
        """Raises when this optimizer was closed."""
        if self.closed:
            raise RuntimeError("this SparseAdamW was closed (by close(), or because a newer SparseAdamW "
                               "took over its params); make a new one to train again")

    def close(self) -> None:
        """Removes the gradient hooks and frees the params for another SparseAdamW; ``step()``
        raises afterwards. Idempotent."""
        self._hooks.remove()
        if self._weight_grads is not None:
            self._weight_grads.remove()
        grads.release_all(self)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    # -----------------------------------------------------------------------------------
    # torch.optim.Optimizer overrides

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, plus the ``sparse`` key; without it the group is split by ``dim >= 2``.
        Adds all of it or nothing."""
        count = len(self.param_groups)
        try:
            for group in split_param_group(param_group, self.defaults, self.selection.selection_started):
                super().add_param_group(group)
            self._attach_sharding()  # FSDP2 or not, checked anew as the sparse params change
        except BaseException:
            del self.param_groups[count:]
            raise
        if self._constructed:  # the constructor claims once all its checks passed
            grads.claim([p for g in self.param_groups[count:] if g["sparse"] for p in g["params"]], self)
            self._watch_modules()

    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (calibration, unmasking or training, by phase); returns the closure's loss."""
        self.check_open()
        fsdp.refuse_dcp(self._sharding)  # DCP's state-dict helpers run a step on zero grads: refuse first
        if self._weight_grads is not None and self._weight_grads.plain_ddp is not None \
                and self._gradient_hooks_enabled:
            raise RuntimeError(PLAIN_DDP_MESSAGE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # in every phase: a bad lr fails at once, not steps later
            ops.check_adamw_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        phase = self.phase
        self._phases[phase].step(self._context(), self.selection)
        if self.phase != phase:
            self._enter_phase()
        if phase == "training" and self._weight_grads is not None:  # every module in use has been seen
            self._weight_grads.finish_watching()
        return loss

    # -----------------------------------------------------------------------------------
    # Internals

    def _context(self) -> phases.StepContext:
        return phases.StepContext(self.param_groups, self.state, self.sparse_params(), self._describe,
                                  self._hooks, self._sharding)

    def _describe(self, gi: int, i: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        p = group["params"][i]
        where = repr(names[i]) if names else f"param_groups[{gi}]['params'][{i}]"
        return f"parameter {where} (shape {tuple(p.shape)})"

    def _attach_sharding(self) -> None:
        """FSDP2 params or not; under FSDP2 the sparse weight gradients go: FSDP2's modules
        compute on unsharded copies of the params, which the optimizer never sees, and
        reduce-scatter dense gradients."""
        self._sharding = fsdp.sharding_of([p for _, p in self.sparse_params()], self._selector)
        if self._sharding is not None and self._weight_grads is not None:
            self._weight_grads.remove()
            self._weight_grads = None

    def _enter_phase(self) -> None:
        """Installs (training) or removes (before it) the gradient hooks and the sparse weight
        gradients for the phase the selection state is in."""
        if self.phase == "training" and self._gradient_hooks_enabled and self._sharding is None:  # FSDP2: dense
            if torch.distributed.is_available() and torch.distributed.is_initialized() \
                    and torch.distributed.get_world_size() > 1:
                warnings.warn("SparseAdamW now turns the sparse params' gradients into sparse COO tensors "
                              "while torch.distributed runs; if the model is wrapped in DistributedDataParallel, "
                              "call gem_kernels.distributed.attach(ddp_model, optimizer) before training, or the "
                              "next backward fails inside DDP ('Cannot access storage of SparseTensorImpl')",
                              UserWarning, stacklevel=3)
            selected = [(p, self.state[p]["indices"]) for _, p in self.sparse_params()]
            self._hooks.install(selected)
            if self._weight_grads is not None:
                self._weight_grads.install(selected, self._hooks.coords)
        else:
            self._hooks.remove()
            if self._weight_grads is not None:
                self._weight_grads.remove_routes()

    def _watch_modules(self) -> None:
        """Until the first training step, note the Linear/Conv1D modules whose weight we train."""
        if self._weight_grads is not None:
            self._weight_grads.watch([p for _, p in self.sparse_params()])

    def _config(self) -> dict:
        density, budget = self._budget_args
        return {"selector": repr(self._selector), "density": density, "budget": budget,
                "calibration_steps": self._calibration_steps}

    def _shard(self):
        return None if self._sharding is None else self._sharding.meta()

    # The checkpoint hooks (see ``checkpoint``).

    def _add_checkpoint_entry(self, state_dict: dict) -> dict:
        fsdp.refuse_dcp(self._sharding)
        state_dict[checkpoint.STATE_KEY] = checkpoint.meta(self.selection, self._config(), self.param_groups,
                                                           self._shard())
        return state_dict

    def _check_checkpoint(self, state_dict: dict) -> dict:
        """Checks the whole checkpoint, then hands torch the dense part only: torch would cast the
        sparse states to the param's dtype (int64 indices of a bf16 param into bf16)."""
        fsdp.refuse_dcp(self._sharding)
        dense, sparse_states, selection = checkpoint.split(
            state_dict, config=self._config(), shard=self._shard(), param_groups=self.param_groups,
            describe=self._describe, incremental=self.incremental)
        self._pending_load = (sparse_states, selection)
        return dense

    def _restore_checkpoint(self) -> None:
        sparse_states, selection = self._pending_load
        self._pending_load = None
        checkpoint.restore_sparse_states(self.state, sparse_states)
        self.selection = selection
        if selection.selection_started:
            self._context().repack(selection, self.incremental)
        self._enter_phase()
