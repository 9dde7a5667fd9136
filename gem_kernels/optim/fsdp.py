"""SparseAdamW on FSDP2 (``torch.distributed.fsdp.fully_shard``) params: what differs from one
process. See docs/distributed.md, "FSDP2".

An FSDP2 param is a DTensor placed ``Shard(0)`` on a 1-D mesh: each rank holds a contiguous
block of rows, and ``to_local()`` is that block itself (a view: an in-place write through it
changes the param). After backward FSDP2 has reduce-scattered the gradients, so ``p.grad`` is a
DTensor whose local block is the averaged gradient of the rank's rows. So:

* the kernels only ever see ``local(p)`` and ``local(p.grad)``, plain tensors (DTensors are
  still refused by every op: their ``data_ptr()`` is not their data);
* the selection is the single-process one on the full tensors, cut to each rank's rows
  (``gem_kernels.sharded``, as ``sharded_select``: the layer statistics all-reduced, the budget
  counted over the full tensors, an exact global top-k); each rank keeps local indices and
  O(k_rank) state;
* collectives where one rank's view is not enough: the finite-gradient check (all ranks raise
  or go on together), the count of entries selected so far (ID3), and whether a first step is
  the one torch.distributed.checkpoint's optimizer helpers run (``refuse_dcp_init_step``).

Every sparse param of an optimizer is an FSDP2 param on the same mesh, or none is.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..dtensor import is_dtensor, local
from ..library import check_strided
from ..selectors import LOCAL
from ..sharded import ShardedOps, shard_offsets

try:
    from torch.distributed.tensor import Shard
except ImportError:  # torch built without distributed
    Shard = None

Tensor = torch.Tensor


def check_param(name: str, p) -> None:
    """Refuses a DTensor that is not an FSDP2 ``Shard(0)`` param (by name), and a local block
    the kernels could not read in place."""
    if not is_dtensor(p):
        return
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise TypeError(f"{name} is a DTensor placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                        "mesh; SparseAdamW takes plain tensors or FSDP2 (fully_shard) params, placed "
                        "Shard(0) on a 1-D mesh")
    block = p.to_local()
    check_strided(f"{name}'s local shard", block)
    (_, numel), = shard_offsets([tuple(p.shape)], p.device_mesh.size(), p.device_mesh.get_local_rank())
    if block.numel() != numel or not block.is_contiguous():
        raise TypeError(f"{name}'s local shard ({tuple(block.shape)}) is not the contiguous torch.chunk "
                        "row block FSDP2 makes; SparseAdamW reads it in place")


class Sharding:
    """Where this rank's blocks lie: the mesh's process group, world size and rank, and the
    device of the local blocks (NCCL's collectives take only CUDA tensors)."""

    def __init__(self, mesh, device):
        self.mesh = mesh
        self.device = device
        self.group = mesh.get_group()
        self.world = mesh.size()
        self.rank = mesh.get_local_rank()

    def meta(self) -> dict:
        return {"world_size": self.world, "rank": self.rank}

    def where(self, params) -> tuple:
        """``(offsets, full numels)`` of ``params``' local blocks in their full tensors."""
        offsets = [off for off, _ in shard_offsets([tuple(p.shape) for p in params], self.world, self.rank)]
        return offsets, [p.numel() for p in params]

    def total(self, count: int) -> int:
        """``count`` summed over the ranks."""
        t = torch.tensor([count], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return int(t)


def sharding_of(sparse_params: list, selector):
    """The ``Sharding`` of an optimizer's sparse params, or None when none is a DTensor.
    Raises for a mix of FSDP2 and plain params, for several meshes and for a selector the
    sharded path does not have."""
    flags = [is_dtensor(p) for p in sparse_params]
    if not any(flags):
        return None
    if not all(flags):
        raise ValueError("some sparse params are FSDP2 (DTensor) params and some are plain tensors; "
                         "under FSDP2 every sparse param must be sharded by fully_shard (put the others "
                         "in a sparse=False group, or shard their module too)")
    mesh = sparse_params[0].device_mesh
    if any(p.device_mesh != mesh for p in sparse_params):
        raise ValueError("the sparse FSDP2 params lie on different device meshes; SparseAdamW takes one mesh")
    if not selector.shardable:
        raise NotImplementedError(f"{type(selector).__name__} cannot select over FSDP2 params (their full "
                                  "tensors lie on no rank); use GEM, GradMagnitude or ID3")
    return Sharding(mesh, sparse_params[0].to_local().device)


def selector_ops(sharding, params):
    """The ops the selector computes through (``gem_kernels.selectors``): over the tensors
    themselves, or for FSDP2 over the full tensors from each rank's local blocks (collectives)."""
    if sharding is None:
        return LOCAL
    offsets, numels = sharding.where(params)
    return ShardedOps(offsets, numels, sharding.group)


def agree_finite(sharding, ok: bool) -> bool:
    """Whether every rank's gradients are finite (a collective), so that all ranks raise or
    go on together: one rank skipping a step the others take would train them apart."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=sharding.device)
    dist.all_reduce(flag, group=sharding.group)
    return int(flag) == 0


# torch.distributed.checkpoint's optimizer helpers (get/set_optimizer_state_dict, get/set_state_dict)
# treat a state tensor that is not a DTensor as replicated (saved from one rank) and keep only
# "state" and "param_groups" of a state dict, dropping the "sparse_adamw" entry: they cannot carry
# a rank's own sparse state (local indices, its k_rank entries), which goes through
# opt.state_dict() per rank. What they do to an optimizer, and what refuses each part:
#
# * on an optimizer with no state and no gradients, they first set every group's lr to 0 and
#   every trainable param's grad to zeros and call step(), to create the state. That step would
#   count as a calibration step (ID3: unmask entries chosen from zeros). ``refuse_dcp_init_step``,
#   a step pre-hook, recognises it by exactly these public signs and raises before the step runs;
# * set_optimizer_state_dict then hands load_state_dict a dict without the "sparse_adamw" entry:
#   the load pre-hook refuses it (checkpoint.split) before anything changes;
# * get_optimizer_state_dict on an optimizer that has state only calls opt.state_dict(), as a
#   user does: nothing public tells the two apart, so it is not refused; what it returns has no
#   "sparse_adamw" entry, which no load accepts.

def _is_zero_lr(lr) -> bool:
    try:
        return bool(lr == 0)
    except (TypeError, ValueError, RuntimeError):  # not a number: the step's own checks refuse it
        return False


def _is_zero_grad(grad) -> bool:
    if grad is None:
        return False
    block = local(grad)
    return block.layout == torch.strided and not bool(block.any())


def refuse_dcp_init_step(optimizer, args, kwargs) -> None:
    """A step pre-hook of every SparseAdamW (``register_step_pre_hook``): raises, before the step
    runs, for the step DCP's optimizer helpers run on an FSDP2 SparseAdamW that has no state yet:
    ``optimizer.state`` empty, every group's lr 0, every trainable param's gradient all zeros on
    every rank. A step with any of these otherwise passes (the check costs nothing once the
    optimizer has state, or while an lr is not 0)."""
    sharding = getattr(optimizer, "_sharding", None)
    if not isinstance(sharding, Sharding) or optimizer.state:
        return
    if not all(_is_zero_lr(group["lr"]) for group in optimizer.param_groups):
        return
    trainable = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    zero = bool(trainable) and all(_is_zero_grad(p.grad) for p in trainable)
    # Every rank gets here in the same step (the same empty state, the same lrs): agree, so that
    # all raise or none does.
    if sharding.total(0 if zero else 1):
        return
    raise NotImplementedError(
        "torch.distributed.checkpoint's get_optimizer_state_dict/set_optimizer_state_dict do not "
        "support SparseAdamW on FSDP2 params (each rank's sparse state is its own, not a DTensor). "
        "On an optimizer with no state yet they first run step() with every lr set to 0 and every "
        "gradient set to zeros (this step), which would count as a selection step: refused, and the "
        "optimizer's state was not changed (but DCP has already set every group's lr to 0 and the "
        "grads to zeros: build the optimizer again). Save each rank's opt.state_dict() with "
        "torch.save and load it on the same rank and world size; the model's state can go through "
        "torch.distributed.checkpoint (docs/distributed.md)")

