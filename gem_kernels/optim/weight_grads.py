"""Sparse weight gradients: once the entries are selected, an ``nn.Linear`` (or transformers'
``Conv1D``) whose weight is a trained sparse param computes only the selected entries of its
weight gradient, with the ``sparse_weight_grad`` op, instead of the dense ``dW = dYᵀX``.

How: the module's ``forward`` is replaced (an instance attribute, removed to undo) by one that
runs ``_SparseWeightGradLinear``. Its backward returns ``dX`` densely, ``db`` as usual, nothing
for the weight, and the k selected values as the gradient of a small *proxy* leaf (one value
per selected entry). A post-accumulate-grad hook on the proxy moves those values into
``weight.grad`` as the same coalesced sparse COO tensor the optimizer's gradient hook makes,
so GradScaler, clipping, gradient accumulation and ``step()`` see no difference; no dense
``dW`` is ever allocated. Everything in the graph is dense, so ``torch.compile`` traces it.

Which modules: the optimizer sees params, not modules. ``SparseAdamW.register_modules(model)``
names them; otherwise, until the end of its first training step, the optimizer watches module
calls (a global forward hook, removed after that step) and records the modules whose weight it
trains. Modules are patched when the training phase starts (those registered or seen in
calibration or unmasking) or, if first seen after it, at the end of the first training step
(never between a forward and its backward, which may recompute checkpointed regions). So where the
selection comes before any forward (Random at construction, a checkpoint loaded into a fresh
optimizer) the first training step takes the dense path unless the model was registered: the
same result to fp32 rounding, not bit for bit.
Only plain ``nn.Linear`` (``forward`` not overridden) and ``Conv1D`` are patched.
"""
from __future__ import annotations

import functools
import sys
import weakref

import torch
import torch.nn.functional as F
from torch.nn.modules.module import register_module_forward_hook

from .. import library  # noqa: F401  (registers torch.ops.gem_kernels)

Tensor = torch.Tensor


class _SparseWeightGradLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` (``x W + b`` for Conv1D) whose weight gradient goes to ``proxy``: the
    values at ``indices`` only."""

    @staticmethod
    def forward(x, weight, bias, proxy, indices, offsets, conv1d: bool):
        if conv1d:
            y = x.reshape(-1, x.shape[-1]) @ weight
            y = y if bias is None else y + bias
            return y.reshape(*x.shape[:-1], weight.shape[1])
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, proxy, indices, offsets, conv1d = inputs
        ctx.save_for_backward(x, weight, indices, offsets)
        ctx.conv1d = conv1d
        ctx.proxy_dtype = proxy.dtype

    @staticmethod
    def backward(ctx, dy):
        x, weight, indices, offsets = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()
        # Under autocast the forward ran in dy's dtype: read x as autocast cast it.
        x2 = x.reshape(-1, x.shape[-1]).to(dy2.dtype).contiguous()
        w = weight.to(dy2.dtype)
        dx = (dy2 @ w.t() if ctx.conv1d else dy2 @ w).reshape(x.shape).to(x.dtype) \
            if ctx.needs_input_grad[0] else None
        db = dy2.sum(0) if ctx.needs_input_grad[2] else None
        pair = ([dy2], [x2]) if ctx.conv1d else ([x2], [dy2])  # Conv1D's weight is [in, out]
        # The operator itself: its inputs are ours (checked when selected), and the Python checks
        # of ops.sparse_weight_grad would only add guards to a compiled backward.
        values = torch.ops.gem_kernels.sparse_weight_grad(*pair, indices, offsets)
        # Rounded once to dY's dtype, as the dense product dYᵀX (a bf16 GEMM under autocast) is.
        return dx, None, db, values.to(dy2.dtype).to(ctx.proxy_dtype), None, None, None


def _is_conv1d(module) -> bool:
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")  # never imported by us
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def _patchable(module) -> bool:
    return (isinstance(module, torch.nn.Linear) and type(module).forward is torch.nn.Linear.forward) \
        or _is_conv1d(module)


class _Target:
    """One trained weight: its proxy leaf and index set, shared by every module using it."""

    def __init__(self, weight: Tensor, indices: Tensor, coords: Tensor):
        self.weight_ref = weakref.ref(weight)
        self.indices = indices
        self.offsets = torch.tensor([0, indices.numel()], dtype=torch.int64, device=indices.device)
        self.coords = coords
        self.proxy = torch.zeros(indices.numel(), dtype=weight.dtype, device=weight.device, requires_grad=True)
        self.proxy.register_post_accumulate_grad_hook(self._move_to_weight)

    @torch.compiler.disable
    def _move_to_weight(self, proxy: Tensor) -> None:
        values, proxy.grad = proxy.grad, None
        weight = self.weight_ref()
        if weight is None:
            return
        grad = weight.grad
        if grad is not None and grad.is_sparse and grad._indices().data_ptr() == self.coords.data_ptr():
            grad._values().add_(values)  # accumulation over several backward calls
            return
        mine = torch.sparse_coo_tensor(self.coords, values, weight.shape, is_coalesced=True,
                                       check_invariants=False)
        weight.grad = mine if grad is None else grad + mine


@torch.compiler.disable
def _on_call(owner_ref, module, args, output) -> None:
    """Global forward hook: records our modules. Never patches: between a forward and its
    backward a checkpointed region is recomputed, and must run the same code again."""
    owner = owner_ref()
    if owner is not None:
        owner.register([module], patch=False)


class SparseWeightGrads:
    """The patched modules of one optimizer and the watch that finds them. Undone by
    ``remove()`` or when this object (owned by the optimizer) is collected."""

    def __init__(self):
        self.targets = {}   # id(weight) -> _Target
        self.seen = weakref.WeakValueDictionary()  # id(module) -> module whose weight we train
        self.patched = weakref.WeakValueDictionary()
        self.active = False
        self._weights = {}  # id(weight) -> weakref(weight): the params we train
        self._handles = []  # the watch: one global forward hook while it is on
        weakref.finalize(self, SparseWeightGrads._undo, self._handles, self.patched)

    @staticmethod
    def _undo(handles, patched) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()
        for module in list(patched.values()):
            module.__dict__.pop("forward", None)

    def watch(self, weights) -> None:
        """Note calls of modules whose weight is one of ``weights``, until ``stop_watching``."""
        self._weights = {id(w): weakref.ref(w) for w in weights}
        if not self._handles:  # weak: the global hook must not keep this object (and itself) alive
            self._handles.append(register_module_forward_hook(functools.partial(_on_call, weakref.ref(self))))

    def stop_watching(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def register(self, modules, patch: bool = True) -> None:
        """Records the patchable ``modules`` whose weight we train; patches them in training."""
        for module in modules:
            weight = getattr(module, "weight", None)
            ref = self._weights.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            if ref is None or ref() is not weight or not _patchable(module):
                continue
            self.seen[id(module)] = module
            if patch and self.active and id(module) not in self.patched:
                self._patch(module)

    def finish_watching(self) -> None:
        """After the first training step (its backward is done): patch what the watch saw."""
        self.stop_watching()
        if self.active:
            for module in list(self.seen.values()):
                if id(module) not in self.patched:
                    self._patch(module)

    def install(self, weights_and_indices, coords: dict) -> None:
        """Training starts: make the proxies and patch every module seen so far."""
        self.remove_patches()
        self.targets = {id(w): _Target(w, indices, coords[w]) for w, indices in weights_and_indices
                        if w.requires_grad and indices.numel() and w in coords}
        self.active = True
        for module in list(self.seen.values()):
            self._patch(module)

    def _patch(self, module) -> bool:
        target = self.targets.get(id(module.weight))
        if target is None or target.weight_ref() is not module.weight:
            return False
        conv1d = _is_conv1d(module)

        def forward(x):
            return _SparseWeightGradLinear.apply(x, module.weight, module.bias, target.proxy,
                                                 target.indices, target.offsets, conv1d)

        module.forward = forward
        self.patched[id(module)] = module
        return True

    def remove_patches(self) -> None:
        for module in list(self.patched.values()):
            module.__dict__.pop("forward", None)
        self.patched.clear()
        self.targets = {}
        self.active = False

    def remove(self) -> None:
        self.remove_patches()
        self.stop_watching()
        self.seen.clear()
