"""The selection over sharded (FSDP2-style, ``Shard(0)``) tensors: the single-process answer
on the full tensors, cut to each rank's shard (docs/distributed.md, "How it works").

It sits with ``selection`` (``ShardedOps`` is the sharded counterpart of ``selection.LocalOps``),
below ``optim``, whose FSDP2 path (``optim/fsdp.py``) selects through it;
``gem_kernels.distributed`` re-exports its public names."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from . import ops
from .reference import ratio_score
from .selectors import Choice, IncrementalSelector

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# Sharded selection: each rank holds a row-block of every tensor


def _group_size(group) -> tuple:
    return dist.get_world_size(group), dist.get_rank(group)


def _check_shards(local_grads, local_weights, shard_offsets, full_numels=None) -> None:
    ops.check_segments(local_grads, local_weights)
    if len(shard_offsets) != len(local_weights):
        raise ValueError(f"shard_offsets has {len(shard_offsets)} entries but there are "
                         f"{len(local_weights)} tensors")
    for i, off in enumerate(shard_offsets):
        off = ops.as_count(f"shard_offsets[{i}]", off)
        if off < 0:
            raise ValueError(f"shard_offsets[{i}] must be >= 0, got {off}")
        if full_numels is not None and off + local_weights[i].numel() > full_numels[i]:
            raise ValueError(f"shard {i} ({local_weights[i].numel()} entries at {off}) does not fit "
                             f"in its full tensor of {full_numels[i]} entries")


def sharded_layer_stats(local_grads: Sequence[Tensor], local_weights: Sequence[Tensor], eps: float = 1e-8,
                        exponent: float = 1.0, group=None) -> Tensor:
    """``layer_stats`` of the full tensors from each rank's shards: the per-shard rows are
    gathered and combined in rank order (sums added, maxima taken), so every rank gets the
    same bits. A collective: every rank of ``group`` calls it with the same tensors' shards."""
    local = ops.layer_stats(local_grads, local_weights, eps, exponent)
    world, _ = _group_size(group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    out = gathered[0].clone()
    for rows in gathered[1:]:
        out[:, :3] += rows[:, :3]
        out[:, 3] = torch.maximum(out[:, 3], rows[:, 3])
    return out


def _gather_varying(tensor: Tensor, group) -> list:
    """all_gather of a 1-D or 2-D tensor whose first dimension differs across ranks."""
    world, _ = _group_size(group)
    size = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    padded = torch.zeros((most,) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[:tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [t[:n] for t, n in zip(out, sizes)]


def sharded_ratio_topk(local_grads: Sequence[Tensor], local_weights: Sequence[Tensor], k,
                       shard_offsets: Sequence[int], eps: float = 1e-8, exponent: float = 1.0,
                       exclude=None, group=None) -> tuple:
    """``ratio_topk`` over full tensors that each rank holds a contiguous flat slice of
    (``shard_offsets[l]``: where this rank's slice of tensor ``l`` starts; a ``Shard(0)`` row
    block). ``k`` is per tensor (a list) or overall (an int), counted over the full tensors;
    ``exclude`` holds local indices. Returns this rank's part of the single-process answer:
    ``(indices, offsets)`` with indices local to the shards, ascending.

    How: each rank takes its own exact top-k (never more than the global k can use from it),
    the candidates (score, tensor, global index) are gathered, and every rank orders them by the
    same key as ``ratio_topk`` (score, larger first; non-finite last; then tensor, then global
    index), keeping the entries in its own range. Sends ``world * k`` candidates, not the scores.
    """
    _check_shards(local_grads, local_weights, shard_offsets)
    numels = [w.numel() for w in local_weights]
    device = local_weights[0].device if len(local_weights) else torch.device("cpu")
    excluded = exclude[1].diff().tolist() if exclude is not None else [0] * len(numels)
    per_segment = isinstance(k, (list, tuple))
    if per_segment:
        if len(k) != len(numels):
            raise ValueError(f"k has {len(k)} entries but there are {len(numels)} tensors")
        k = [ops.as_count(f"k[{i}]", kk) for i, kk in enumerate(k)]
        local_k = [min(kk, n - ex) for kk, n, ex in zip(k, numels, excluded)]
    else:
        k = ops.as_count("k", k)
        local_k = min(k, sum(numels) - sum(excluded))
    indices, offsets = ops.ratio_topk(local_grads, local_weights, local_k, eps, exponent, exclude)

    # Candidates: rank key (as in reference.ratio_topk), tensor, global flat index.
    bounds = offsets.tolist()
    keys, segs, glob = [], [], []
    for seg, (g, w) in enumerate(zip(local_grads, local_weights)):
        idx = indices[bounds[seg]:bounds[seg + 1]]
        score = ratio_score(g.reshape(-1)[idx], w.reshape(-1)[idx], eps, exponent).double()
        keys.append(torch.where(torch.isfinite(score), score, torch.full_like(score, -1.0)))
        segs.append(torch.full_like(idx, seg))
        glob.append(idx + int(shard_offsets[seg]))
    empty_i = torch.zeros(0, dtype=torch.int64, device=device)
    key = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.float64, device=device)
    ints = torch.stack([torch.cat(segs) if segs else empty_i, torch.cat(glob) if glob else empty_i], 1)
    all_keys = torch.cat(_gather_varying(key, group))
    all_ints = torch.cat(_gather_varying(ints, group))

    # Order: global index, then tensor, then key descending; each sort stable.
    order = torch.sort(all_ints[:, 1], stable=True).indices
    order = order[torch.sort(all_ints[order, 0], stable=True).indices]
    order = order[torch.sort(-all_keys[order], stable=True).indices]
    ranked_seg, ranked_glob = all_ints[order, 0], all_ints[order, 1]
    chosen = torch.zeros_like(ranked_seg, dtype=torch.bool)
    if per_segment:
        for seg, kk in enumerate(k):
            where = torch.nonzero(ranked_seg == seg).reshape(-1)
            if where.numel() < kk:  # the same candidates on every rank: all raise together
                raise ValueError(f"k[{seg}]={kk} is more than the {where.numel()} entries tensor {seg} "
                                 "can give (over all shards, less the excluded ones)")
            chosen[where[:kk]] = True
    else:
        if ranked_seg.numel() < k:
            raise ValueError(f"k={k} is more than the {ranked_seg.numel()} entries the shards can give")
        chosen[:k] = True
    out, counts = [], []
    for seg, n in enumerate(numels):
        lo = int(shard_offsets[seg])
        in_shard = ranked_glob[chosen & (ranked_seg == seg) & (ranked_glob >= lo) & (ranked_glob < lo + n)]
        out.append(torch.sort(in_shard - lo).values)
        counts.append(in_shard.numel())
    result_offsets = torch.zeros(len(numels) + 1, dtype=torch.int64, device=device)
    result_offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return (torch.cat(out) if out else empty_i), result_offsets


class ShardedOps:
    """The ops a selector calls (see ``gem_kernels.selectors.LocalOps``), over full tensors that
    each rank of ``group`` holds a contiguous flat slice of (``shard_offsets[l]``: where this
    rank's slice of tensor ``l`` starts; ``full_numels[l]``: the full tensor's size). Each call is
    a collective and answers with this rank's part of the single-process answer."""

    def __init__(self, shard_offsets: Sequence[int], full_numels: Sequence[int], group=None):
        self.shard_offsets = list(shard_offsets)
        self.full_numels = list(full_numels)
        self.group = group

    def numels(self, weights) -> list:
        return self.full_numels

    def layer_stats(self, grads, weights, eps=1e-8, exponent=1.0):
        return sharded_layer_stats(grads, weights, eps, exponent, self.group)

    def ratio_topk(self, grads, weights, k, eps=1e-8, exponent=1.0, exclude=None):
        return sharded_ratio_topk(grads, weights, k, self.shard_offsets, eps, exponent, exclude, self.group)

    def random_keys(self, weights, seed):
        raise NotImplementedError("Random draws one key per entry of the full tensors, which no rank holds; "
                                  "on sharded tensors use GEM, GradMagnitude or ID3")


def sharded_select(selector, local_grads: Sequence[Tensor], local_weights: Sequence[Tensor],
                   shard_offsets: Sequence[int], full_numels: Sequence[int], budget: int,
                   exclude=None, group=None) -> Choice:
    """What ``selector`` would choose on the full tensors, cut to this rank's shards (local
    indices): one-shot selectors ``budget`` entries from the calibration sums (``grads``), an
    incremental one (ID3) ``budget`` new entries outside ``exclude``. A collective."""
    _check_shards(local_grads, local_weights, shard_offsets, full_numels)
    on = ShardedOps(shard_offsets, full_numels, group)
    if isinstance(selector, IncrementalSelector):
        return selector.select_new(local_grads, local_weights, int(budget), exclude, on=on)
    return selector.select(local_grads, local_weights, int(budget), on=on)


def shard_offsets(full_shapes: Sequence[Sequence[int]], world_size: int, rank: int) -> list:
    """Where rank ``rank``'s ``Shard(0)`` block of each tensor starts (flat index) and how many
    entries it holds, as FSDP2 cuts them (``torch.chunk`` of the rows: ``ceil(rows / world)``
    per rank, the last ranks shorter or empty). Returns ``[(offset, numel)]``."""
    out = []
    for shape in full_shapes:
        rows = int(shape[0]) if len(shape) else 1
        row_numel = 1
        for s in shape[1:]:
            row_numel *= int(s)
        per = -(-rows // world_size)
        start, stop = min(rank * per, rows), min((rank + 1) * per, rows)
        out.append((start * row_numel, (stop - start) * row_numel))
    return out


def local_shards(tensors: Sequence[Tensor]) -> tuple:
    """For FSDP2 params or their gradients (DTensors placed ``Shard(0)`` on a 1-D mesh):
    ``(local tensors, shard offsets, full numels)``, the arguments the sharded functions take.
    Collectives then go to the mesh's group (``tensors[0].device_mesh.get_group()``)."""
    from torch.distributed.tensor import DTensor, Shard
    local, offsets, numels = [], [], []
    for i, t in enumerate(tensors):
        if not isinstance(t, DTensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, not a DTensor (an FSDP2 param or grad)")
        if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
            raise ValueError(f"tensors[{i}] is placed {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh; "
                             "the sharded selection takes Shard(0) on a 1-D mesh (FSDP2's default)")
        mesh = t.device_mesh
        (offset, numel), = shard_offsets([tuple(t.shape)], mesh.size(), mesh.get_local_rank())
        shard = t.to_local()
        if shard.numel() != numel:
            raise ValueError(f"tensors[{i}]'s local shard has {shard.numel()} entries, {numel} expected "
                             "for torch.chunk row blocks")
        local.append(shard.contiguous())
        offsets.append(offset)
        numels.append(t.numel())
    return local, offsets, numels
