"""The ``cpu`` backend: the compiled C++/OpenMP kernels in ``gem_kernels._C``, registered as every
op's kernel for CPU tensors when ``_C`` imported (else CPU tensors run the reference).

Arguments arrive checked by ``gem_kernels.ops`` (contiguous CPU tensors of supported dtypes, valid
index sets), in the ops' schema signatures (``gem_kernels.library``). Each function allocates the
outputs with torch, builds the pointer / size / dtype tables of all segments and makes one ``_C``
call, with ``torch.get_num_threads()`` threads.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..library import register_kernel

try:
    from .. import _C
except ImportError:  # CPU tensors then run the reference; available() says so
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


def ratio_topk(grads: Sequence[Tensor], weights: Sequence[Tensor], k: Sequence[int], per_segment: bool,
               eps: float, exponent: float, exclude_indices, exclude_offsets) -> tuple[Tensor, Tensor]:
    counts = [int(kk) for kk in k]
    indices = torch.empty(sum(counts), dtype=torch.int64)
    offsets = torch.empty(len(weights) + 1, dtype=torch.int64)
    ex_indices, ex_offsets = (0, 0) if exclude_indices is None else (exclude_indices.data_ptr(),
                                                                     exclude_offsets.data_ptr())
    g_ptrs, g_codes = _tables(grads)
    w_ptrs, w_codes = _tables(weights)
    _C.ratio_topk(g_ptrs, g_codes, w_ptrs, w_codes, [w.numel() for w in weights], counts, per_segment,
                  eps, exponent, ex_indices, ex_offsets, indices.data_ptr(), offsets.data_ptr(),
                  torch.get_num_threads())
    return indices, offsets


def sparse_adamw_(params: Sequence[Tensor], dense_grads: Sequence[Tensor], compact_grads, indices: Tensor,
                  offsets: Tensor, state: Sequence[Tensor], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step, age, maximize: bool) -> None:
    p_ptrs, p_codes = _tables(params)
    dense_ptrs, dense_codes = _tables(dense_grads)
    compact_ptr, compact_code = (0, 0) if compact_grads is None else (compact_grads.data_ptr(), _code(compact_grads))
    steps, age_ptr, age_code = ([], age.data_ptr(), _code(age)) if age is not None else (step.tolist(), 0, 0)
    _C.sparse_adamw(p_ptrs, p_codes, dense_ptrs, dense_codes, compact_ptr, compact_code,
                    indices.data_ptr(), offsets.data_ptr(), [t.data_ptr() for t in state], lr, beta1, beta2, eps,
                    weight_decay, steps, age_ptr, age_code, maximize, torch.get_num_threads())


def sparse_weight_grad(inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], indices: Tensor,
                       offsets: Tensor) -> Tensor:
    out = torch.empty(indices.numel(), dtype=torch.float32)
    x_ptrs, x_codes = _tables(inputs)
    dy_ptrs, dy_codes = _tables(grad_outputs)
    _C.sparse_weight_grad(x_ptrs, x_codes, dy_ptrs, dy_codes, [x.shape[0] for x in inputs],
                          [x.shape[1] for x in inputs], [dy.shape[1] for dy in grad_outputs],
                          indices.data_ptr(), offsets.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


KERNELS = (layer_stats, ratio_topk, sparse_adamw_, sparse_weight_grad)
if available():
    for _kernel in KERNELS:
        register_kernel(_kernel.__name__, "cpu")(_kernel)
