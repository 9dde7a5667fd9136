"""SparseAdamW on ``torch.distributed``: DDP with only the selected values on the wire, and the
selection over sharded (FSDP2-style) tensors. See ``docs/distributed.md``.

DDP
---
Plain DDP works with ``SparseAdamW`` as with AdamW: it all-reduces every gradient entry.
``attach(ddp_model, optimizer)`` is the opt-in for a compact wire: it registers a DDP comm hook
that, per bucket:

* before and during the selection (phases ``"calibration"`` and ``"unmasking"``) all-reduces the
  whole bucket and averages it, so GEM's calibration sums and ID3's per-step picks are the same
  on every rank;
* in the ``"training"`` phase packs ONE flat buffer per bucket with the selected entries of the
  sparse params in the bucket plus the whole gradients of the other params (dense groups, params
  of no SparseAdamW), all-reduces it asynchronously (the returned future lets DDP overlap it with
  the rest of the backward), divides by the world size and writes the averages back into the
  bucket. The other entries of a sparse param's gradient are set to 0: the optimizer never reads
  them, and a zero there keeps every rank's ``.grad`` identical (so a norm clip, a GradScaler's
  inf check or a user's look at ``.grad`` agree across ranks). So under ``attach`` a norm
  clip measures the selected entries only, not the whole gradient plain DDP would give.

``attach`` returns the hook's state, whose ``stats`` (a ``CommStats``) count the bytes handed to
``all_reduce`` per backward, and what plain DDP would have all-reduced for the same buckets.

Sharded selection (FSDP2)
-------------------------
``sharded_layer_stats``, ``sharded_ratio_topk`` and ``sharded_select`` are the distributed
versions of ``layer_stats``, ``ratio_topk`` and a selector's choice when each rank holds one
row-block (``Shard(0)``) of every tensor: their answer is the single-process answer on the full
tensors, cut to each rank's shard. ``SparseAdamW`` uses them for FSDP2 (``fully_shard``) params
(``gem_kernels/optim/fsdp.py``, ``docs/distributed.md``). They live in ``gem_kernels/sharded.py``,
below the optimizer (which imports nothing from this package), and are re-exported here.
"""
from ..sharded import ShardedOps, local_shards, shard_offsets, sharded_layer_stats, sharded_ratio_topk, sharded_select
from .ddp import CommStats, SelectedAllReduce, attach

__all__ = ["attach", "CommStats", "SelectedAllReduce", "sharded_layer_stats", "sharded_ratio_topk",
           "sharded_select", "shard_offsets", "local_shards", "ShardedOps"]
