"""Reading the gradients of the sparse params: the selected entries of a dense gradient, and
the finite check. The optimizer never writes a gradient: ``.grad`` is what autograd made."""
from __future__ import annotations

import torch

from ..dtensor import local
from .fsdp import agree_finite

Tensor = torch.Tensor


def compact_grad(p: Tensor, indices: Tensor):
    """The gradient of sparse param ``p`` at ``indices`` (param dtype, one per index), or None."""
    if p.grad is None:
        return None
    return local(p.grad).reshape(-1)[indices]  # an FSDP2 gradient: this rank's block, as the local indices


def check_finite(described_grads, sharding=None) -> None:
    """Raises naming the first param whose gradient has NaN or inf; one host sync in all.
    With ``sharding`` (FSDP2: local blocks) the verdict is agreed by every rank (a collective),
    so that all raise or none does."""
    finite = [torch.isfinite(g).all() for _, g in described_grads]
    ok = not finite or bool(torch.stack([f.to(finite[0].device) for f in finite]).all())
    if sharding is not None and not agree_finite(sharding, ok) and ok:
        raise ValueError("a gradient on another rank has NaN or inf entries; nothing was changed "
                         "(with a GradScaler such steps are skipped for you)")
    if ok:
        return
    describe = next(d for (d, _), ok in zip(described_grads, finite) if not bool(ok))
    raise ValueError(f"the gradient of {describe()} has NaN or inf entries; nothing was "
                     "changed (with a GradScaler such steps are skipped for you)")
