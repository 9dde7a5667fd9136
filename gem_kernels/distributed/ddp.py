"""DDP with only the selected values on the wire: ``attach`` and its comm hook (see the
package doc and docs/distributed.md)."""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# DDP


@dataclass
class CommStats:
    """Bytes handed to ``all_reduce`` by the comm hook (payload bytes; a ring all-reduce moves
    about ``2 (W-1)/W`` times that per rank, for plain DDP as for us).

    A *step* is one synchronised backward (one pass over every bucket; backwards under
    ``no_sync()`` do not count). ``last_bytes`` is what the last step all-reduced,
    ``last_dense_bytes`` what plain DDP would have all-reduced for the same buckets (every
    gradient entry), ``last_phase`` the optimizer's phase during that step. ``by_phase`` maps a
    phase to ``[steps, bytes, dense_bytes]``. ``check_bytes``: the one-off check that every rank
    selected the same entries (sent once when training starts), not counted in the steps.
    """
    steps: int = 0
    last_bytes: int = 0
    last_dense_bytes: int = 0
    last_phase: Optional[str] = None
    total_bytes: int = 0
    total_dense_bytes: int = 0
    check_bytes: int = 0
    by_phase: dict = field(default_factory=dict)
    _bytes: int = 0
    _dense_bytes: int = 0

    @property
    def last_ratio(self) -> float:
        """Plain DDP's bytes over ours for the last step."""
        return self.last_dense_bytes / self.last_bytes if self.last_bytes else float("inf")

    def _add(self, nbytes: int, dense_bytes: int, phase: Optional[str], last: bool) -> None:
        self._bytes += nbytes
        self._dense_bytes += dense_bytes
        if last:
            self.steps += 1
            self.last_bytes, self.last_dense_bytes, self.last_phase = self._bytes, self._dense_bytes, phase
            self.total_bytes += self._bytes
            self.total_dense_bytes += self._dense_bytes
            row = self.by_phase.setdefault(phase, [0, 0, 0])
            row[0] += 1
            row[1] += self._bytes
            row[2] += self._dense_bytes
            self._bytes = self._dense_bytes = 0


class SelectedAllReduce:
    """The state of the comm hook ``attach`` registers: the optimizer it reads (weakly), the
    process group, and ``stats``. ``attach`` on the same DDP model again points it at another
    optimizer (DDP takes one comm hook per model, for good)."""

    def __init__(self, optimizer, process_group):
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.stats = CommStats()
        self._optimizer_ref = None
        self._verified = False
        self._sparse = None  # ids of the optimizer's sparse params, refreshed per backward
        self.set_optimizer(optimizer)

    @property
    def optimizer(self):
        return self._optimizer_ref() if self._optimizer_ref is not None else None

    def set_optimizer(self, optimizer) -> None:
        self._optimizer_ref = weakref.ref(optimizer)
        self._verified = False

    # -- the hook -------------------------------------------------------------------------

    def _phase(self):
        opt = self.optimizer
        if opt is None:
            return None  # no live optimizer: plain DDP
        return opt.phase

    def reduce(self, bucket) -> torch.futures.Future:
        buffer = bucket.buffer()
        if buffer.layout != torch.strided:
            raise TypeError("gem_kernels.distributed: a DDP bucket holds sparse gradients (an "
                            "nn.Embedding(sparse=True)?); the SparseAdamW comm hook reduces dense "
                            "buckets only")
        phase = self._phase()
        if phase == "training":
            self._refresh_sparse(bucket)
            plan = self._plan(bucket)
            payload = torch.cat([flat if idx is None else flat[idx] for flat, idx in plan])
        else:
            self._verified = False  # a selection that starts later is checked again
            plan, payload = None, buffer
        last = bucket.is_last()
        if last:
            self._sparse = None
        self.stats._add(payload.numel() * payload.element_size(),
                        buffer.numel() * buffer.element_size(), phase, last)
        payload.div_(self.world_size)  # before the sum, as DDP's allreduce_hook (fp16 range)
        future = self._all_reduce(payload)
        if plan is None:
            return future.then(lambda fut: fut.value()[0])
        return future.then(functools.partial(_scatter, plan, buffer))

    def _refresh_sparse(self, bucket) -> None:
        """At the first bucket of a backward: the ids of the optimizer's sparse params, whose
        selection is checked once, when training starts, to be the same on every rank."""
        if self._sparse is None or bucket.index() == 0:  # DDP launches bucket 0 first
            opt = self.optimizer
            if not self._verified:
                self._verify_selection(opt)
                self._verified = True
            self._sparse = {id(p) for _, p in opt.sparse_params()}

    def _all_reduce(self, payload: Tensor) -> torch.futures.Future:
        """The asynchronous sum of ``payload`` over the ranks (in place), as a future of ``[payload]``."""
        if payload.numel() == 0:  # only sparse params with no entry: nothing to send
            future = torch.futures.Future()
            future.set_result([payload])
            return future
        return dist.all_reduce(payload, group=self.process_group, async_op=True).get_future()

    def _plan(self, bucket) -> list:
        """``[(flat gradient view in the bucket, selected indices or None for all)]``."""
        plan = []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            flat = grad.view(-1)  # a view of the bucket's buffer
            if id(p) in self._sparse:
                plan.append((flat, self.optimizer.state[p]["indices"]))
            else:
                plan.append((flat, None))
        return plan

    def _verify_selection(self, opt) -> None:
        """Once when training starts: every rank must have selected the same entries, or the
        flat buffers would not line up (a silent mix of different entries, or a hang)."""
        rows = []
        for _, p in opt.sparse_params():
            idx = opt.state[p]["indices"]
            rows.append(torch.stack([torch.tensor(idx.numel(), device=idx.device), idx.sum(),
                                     (idx * idx).sum(), (idx * torch.arange(idx.numel(), device=idx.device)).sum()]))
        summary = torch.stack(rows).to(torch.int64) if rows else torch.zeros(0, 4, dtype=torch.int64)
        gathered = [torch.empty_like(summary) for _ in range(self.world_size)]
        dist.all_gather(gathered, summary, group=self.process_group)
        self.stats.check_bytes += summary.numel() * summary.element_size() * self.world_size
        for rank, theirs in enumerate(gathered):
            if not torch.equal(theirs, gathered[0]):
                raise RuntimeError(
                    f"gem_kernels.distributed: the ranks selected different entries (rank {rank}: "
                    f"{int(theirs[:, 0].sum())} entries, rank 0: {int(gathered[0][:, 0].sum())}, "
                    "or the same counts at other places). The selection must see the same averaged "
                    "gradients on every rank: call attach() before the first backward and, with "
                    "opt.calibrate(), pass it the DDP model, not the module inside it")


def _scatter(plan: list, buffer: Tensor, fut) -> Tensor:
    """Writes the reduced values back into the bucket ``buffer`` by ``plan`` (see ``_plan``): whole
    gradients as they are, a sparse param's selected entries at their indices and 0 elsewhere."""
    reduced = fut.value()[0]
    start = 0
    for flat, idx in plan:
        if idx is None:
            flat.copy_(reduced[start:start + flat.numel()])
            start += flat.numel()
        else:
            flat.zero_()
            flat.index_copy_(0, idx, reduced[start:start + idx.numel()])
            start += idx.numel()
    return buffer


# DDP model -> the state of the comm hook attach() registered on it (weak: a collected model frees it)
_ATTACHED = weakref.WeakKeyDictionary()


def _selected_values_hook(state: SelectedAllReduce, bucket):
    return state.reduce(bucket)


def attach(ddp_model, optimizer, process_group=None) -> SelectedAllReduce:
    """Makes SparseAdamW ``optimizer`` train ``ddp_model`` (a ``DistributedDataParallel``) with
    only the selected values all-reduced once training starts; returns the hook's state, whose
    ``stats`` count the bytes. Call it on every rank, before the first backward.

    ``process_group`` defaults to the DDP model's. Calling it again on the same DDP model points
    the hook at a new optimizer (DDP accepts one comm hook per model).
    """
    from torch.nn.parallel import DistributedDataParallel

    from ..optim import SparseAdamW

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                        f"{type(ddp_model).__name__}")
    if not isinstance(optimizer, SparseAdamW):
        raise TypeError(f"optimizer must be a gem_kernels.SparseAdamW, got {type(optimizer).__name__}")
    ignored = ddp_model.parameters_to_ignore  # public: the names given to params_and_buffers_to_ignore
    synced = {id(p) for name, p in ddp_model.module.named_parameters() if name not in ignored}
    outside = [tuple(p.shape) for g in optimizer.param_groups for p in g["params"]
               if p.requires_grad and id(p) not in synced]
    if outside:
        raise ValueError(f"the optimizer trains {len(outside)} param(s) that DDP does not synchronise "
                         f"(shapes {outside[:3]}): they are not in the DDP model, or are in its "
                         "params_and_buffers_to_ignore; their gradients would differ across ranks")
    state = _ATTACHED.get(ddp_model)
    if state is not None:
        state.set_optimizer(optimizer)
        return state
    group = process_group if process_group is not None else ddp_model.process_group
    state = SelectedAllReduce(optimizer, group)
    try:
        ddp_model.register_comm_hook(state, _selected_values_hook)
    except RuntimeError as error:  # DDP takes one comm hook per model, for good
        raise RuntimeError(f"this DDP model already has a comm hook; DDP takes one, and SparseAdamW needs "
                           f"its own ({error})") from None
    _ATTACHED[ddp_model] = state
    return state
