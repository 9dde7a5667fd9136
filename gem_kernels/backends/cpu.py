"""The ``cpu`` backend: thin wrappers over the compiled C++/OpenMP kernels in ``gem_kernels._C``.

Arguments arrive checked by ``gem_kernels.ops`` (contiguous CPU tensors of supported dtypes, valid
index sets), in exactly ``gem_kernels.reference``'s signatures. Each wrapper allocates the outputs
with torch, builds the pointer / size / dtype tables of all segments and makes one ``_C`` call,
with ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

from typing import Sequence

import torch

try:
    from . import _C
except ImportError:  # ops.py then routes CPU tensors to the reference; available() says so
    _C = None

Tensor = torch.Tensor

# Full passes over g and w that ratio_topk makes in the common case (a histogram of the top key
# digit, then collecting the candidates); benchmarks/report.py divides bandwidth by it. Large
# threshold buckets (k a large share, many equal scores) fall back to five passes.
RATIO_TOPK_PASSES = 2


def available() -> bool:
    """True when the compiled kernels imported."""
    return _C is not None


def _code(t: Tensor) -> int:
    return _C.dtype_codes[str(t.dtype).replace("torch.", "")]


def _tables(tensors: Sequence[Tensor]):
    return [t.data_ptr() for t in tensors], [_code(t) for t in tensors]


def layer_stats(grads: Sequence[Tensor], weights: Sequence[Tensor], eps: float = 1e-8,
                exponent: float = 1.0) -> Tensor:
    out = torch.empty(len(grads), 4, dtype=torch.float64)
    g_ptrs, g_codes = _tables(grads)
    w_ptrs, w_codes = _tables(weights)
    _C.layer_stats(g_ptrs, g_codes, w_ptrs, w_codes, [w.numel() for w in weights], eps, exponent,
                   out.data_ptr(), torch.get_num_threads())
    return out


def ratio_topk(grads: Sequence[Tensor], weights: Sequence[Tensor], k, eps: float = 1e-8,
               exponent: float = 1.0, exclude=None) -> tuple[Tensor, Tensor]:
    per_segment = not isinstance(k, int)
    counts = [int(kk) for kk in k] if per_segment else [int(k)]
    indices = torch.empty(sum(counts), dtype=torch.int64)
    offsets = torch.empty(len(weights) + 1, dtype=torch.int64)
    ex_indices, ex_offsets = (0, 0) if exclude is None else (exclude[0].data_ptr(), exclude[1].data_ptr())
    g_ptrs, g_codes = _tables(grads)
    w_ptrs, w_codes = _tables(weights)
    _C.ratio_topk(g_ptrs, g_codes, w_ptrs, w_codes, [w.numel() for w in weights], counts, per_segment,
                  eps, exponent, ex_indices, ex_offsets, indices.data_ptr(), offsets.data_ptr(),
                  torch.get_num_threads())
    return indices, offsets


def sparse_adamw_(params: Sequence[Tensor], grads, indices: Tensor, offsets: Tensor,
                  exp_avg: Tensor, exp_avg_sq: Tensor, *, lr: float, betas=(0.9, 0.999),
                  eps: float = 1e-8, weight_decay: float = 1e-2, step=None, age=None,
                  maximize: bool = False) -> None:
    p_ptrs, p_codes = _tables(params)
    if isinstance(grads, torch.Tensor):  # compact: one value per selected entry
        dense_ptrs, dense_codes, compact_ptr, compact_code = [], [], grads.data_ptr(), _code(grads)
    else:
        (dense_ptrs, dense_codes), compact_ptr, compact_code = _tables(grads), 0, 0
    if age is not None:
        steps, age_ptr, age_code = [], age.data_ptr(), _code(age)
    else:
        steps = step.tolist() if isinstance(step, torch.Tensor) else [int(step)] * len(params)
        age_ptr, age_code = 0, 0
    _C.sparse_adamw(p_ptrs, p_codes, dense_ptrs, dense_codes, compact_ptr, compact_code,
                    indices.data_ptr(), offsets.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(),
                    lr, betas[0], betas[1], eps, weight_decay, steps, age_ptr, age_code, maximize,
                    torch.get_num_threads())


def sparse_weight_grad(inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], indices: Tensor,
                       offsets: Tensor) -> Tensor:
    out = torch.empty(indices.numel(), dtype=torch.float32)
    x_ptrs, x_codes = _tables(inputs)
    dy_ptrs, dy_codes = _tables(grad_outputs)
    _C.sparse_weight_grad(x_ptrs, x_codes, dy_ptrs, dy_codes, [x.shape[0] for x in inputs],
                          [x.shape[1] for x in inputs], [dy.shape[1] for dy in grad_outputs],
                          indices.data_ptr(), offsets.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out
