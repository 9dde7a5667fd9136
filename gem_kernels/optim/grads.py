"""Gradients of the sparse params: who owns a param's hook, the hook that keeps only the
selected entries, reading a compact gradient back, the finite check, and norm clipping.

After the selection, a post-accumulate-grad hook on every trained sparse param replaces the
fresh dense gradient by a coalesced sparse COO tensor of the selected entries. So no dense
gradient outlives its backward, ``GradScaler`` unscales and inf-checks it (it unscales
``_values()`` in place), and gradient accumulation still sums (autograd adds the next dense
gradient to it). A param's hook belongs to exactly one live SparseAdamW: a second optimizer
on the same params takes them over: the first one is closed (hooks removed, ``step()``
raises) with a warning.
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .fsdp import agree_finite, local

Tensor = torch.Tensor

# param -> weakref of the SparseAdamW that trains it sparsely. Weak both ways: a param or an
# optimizer that is garbage collected frees its entry.
_OWNERS = WeakIdKeyDictionary()


def claim(params, optimizer) -> None:
    """Makes ``optimizer`` the owner of ``params``. Another live SparseAdamW that owned one of
    them is closed first, with a warning: its hooks would otherwise rewrite the gradients the
    new optimizer reads (and its ``step()`` now raises instead of training stale state)."""
    previous = []
    for p in params:
        owner_ref = _OWNERS.get(p)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not optimizer and not owner.closed and owner not in previous:
            previous.append(owner)
    for owner in previous:
        owner.close()
        warnings.warn("a new SparseAdamW took over params of an earlier one, which is now closed "
                      "(its hooks are removed and its step() raises); call close() on the old "
                      "optimizer yourself to silence this", UserWarning, stacklevel=4)
    for p in params:
        _OWNERS[p] = weakref.ref(optimizer)


def release_all(optimizer) -> None:
    """Frees every param ``optimizer`` owns (when it is closed)."""
    for p in [p for p, ref in _OWNERS.items() if ref() is optimizer]:
        del _OWNERS[p]


@torch.compiler.disable  # dict lookups and a COO constructor: eager, in compiled steps too
def _keep_selected(hooks_ref, param: Tensor) -> None:
    """Post-accumulate-grad hook: keep only the selected entries of the fresh dense gradient."""
    hooks = hooks_ref()
    coords = None if hooks is None else hooks.coords.get(param)
    grad = param.grad
    if coords is None or grad is None or grad.is_sparse:
        return
    if grad.shape != hooks.shapes[param]:
        raise ValueError(f"a trained sparse param now has shape {tuple(grad.shape)} but had "
                         f"{tuple(hooks.shapes[param])} when its entries were chosen; resizing a trained "
                         "param is not supported (close the optimizer and make a new one)")
    values = grad.reshape(-1)[hooks.indices[param]]
    # Coalesced COO order is ascending flat index, which is how our indices are kept. Sharing
    # the cached coords also marks the gradient as ours (see compact_grad).
    param.grad = torch.sparse_coo_tensor(coords, values, param.shape, is_coalesced=True,
                                         check_invariants=False)


class SelectedGradHooks:
    """The hooks of one optimizer, with each hooked param's indices and their COO coordinates
    (made once per selection). Removed by ``remove()`` or when this object is collected."""

    def __init__(self):
        self.indices = {}
        self.coords = {}
        self.shapes = {}
        self._handles = []
        weakref.finalize(self, SelectedGradHooks._remove_handles, self._handles)

    @staticmethod
    def _remove_handles(handles) -> None:
        for handle in handles:
            handle.remove()
        handles.clear()

    def install(self, params_and_indices) -> None:
        self.remove()
        hook = functools.partial(_keep_selected, weakref.ref(self))  # weak: the hook keeps nothing alive
        for p, indices in params_and_indices:
            if p.requires_grad and indices.numel():
                self.indices[p] = indices
                self.shapes[p] = p.shape
                self.coords[p] = torch.stack(torch.unravel_index(indices, p.shape))
                self._handles.append(p.register_post_accumulate_grad_hook(hook))

    def remove(self) -> None:
        self._remove_handles(self._handles)
        self.indices = {}
        self.coords = {}
        self.shapes = {}


def _flat_positions(grad: Tensor) -> Tensor:
    """Flat (row-major) positions of a coalesced sparse COO tensor's entries."""
    coords = grad._indices()
    flat = torch.zeros(coords.shape[1], dtype=torch.int64, device=coords.device)
    for dim, size in enumerate(grad.shape):
        flat = flat * size + coords[dim]
    return flat


def compact_grad(p: Tensor, indices: Tensor, hooks: SelectedGradHooks):
    """The gradient of sparse param ``p`` at ``indices`` (param dtype, one per index), or None."""
    grad = p.grad
    if grad is None:
        return None
    grad = local(grad)  # an FSDP2 gradient: this rank's block, which the local indices address
    if not grad.is_sparse:
        return grad.reshape(-1)[indices]
    grad = grad.coalesce()
    coords = hooks.coords.get(p)
    if coords is not None and grad._indices().data_ptr() == coords.data_ptr():
        return grad._values()  # made by our hook: no need to compare positions
    if grad._nnz() == indices.numel() and torch.equal(_flat_positions(grad), indices):
        return grad._values()
    # Someone else's sparse gradient (or one zeroed by zero_grad(set_to_none=False)).
    return grad.to_dense().reshape(-1)[indices]


def check_finite(described_grads, sharding=None) -> None:
    """Raises naming the first param whose gradient has NaN or inf; one host sync in all.
    With ``sharding`` (FSDP2: local blocks) the verdict is agreed by every rank (a collective),
    so that all raise or none does."""
    finite = [torch.isfinite(g._values() if g.is_sparse else g).all() for _, g in described_grads]
    ok = not finite or bool(torch.stack([f.to(finite[0].device) for f in finite]).all())
    if sharding is not None and not agree_finite(sharding, ok) and ok:
        raise ValueError("a gradient on another rank has NaN or inf entries; nothing was changed "
                         "(with a GradScaler such steps are skipped for you)")
    if ok:
        return
    describe = next(d for (d, _), ok in zip(described_grads, finite) if not bool(ok))
    raise ValueError(f"the gradient of {describe()} has NaN or inf entries; nothing was "
                     "changed (with a GradScaler such steps are skipped for you)")


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for grads that may be sparse COO tensors: the norm
    of every stored value, and the same in-place scaling. An uncoalesced sparse gradient is
    coalesced first (and put back as ``p.grad``) so that each entry is counted once and the
    scaling reaches the gradient itself, not a copy."""
    values = []
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            if not grad.is_coalesced():
                grad = p.grad = grad.coalesce()
            values.append(grad._values())
        else:
            values.append(grad)
    if not values:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(v.float(), norm_type) for v in values])
    total = torch.linalg.vector_norm(norms, norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for v in values:
        v.mul_(scale.to(v.dtype))
    return total
