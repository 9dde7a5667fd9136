"""Param groups of SparseAdamW: a group is sparse or dense (key ``sparse``); without the key
a group is split in two, tensors with ``dim >= 2`` sparse and the others dense. And the budget
arguments (``density`` or ``budget``): their checks and the count they resolve to."""
from __future__ import annotations

import math

import torch

from .. import ops
from ..dtensor import local
from .fsdp import check_param


def _tensor_of(item):
    return item[1] if isinstance(item, tuple) else item  # (name, param) pairs or params


def split_param_group(param_group: dict, defaults: dict, selection_started: bool) -> list:
    """The groups to add for ``param_group``, each checked (hyper-parameters, sparse params);
    raises before returning anything if one part is bad."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
    params = param_group["params"]
    if isinstance(params, torch.Tensor):
        items = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, not sets")
    else:
        items = list(params)
    if "sparse" in param_group:
        if not isinstance(param_group["sparse"], bool):
            raise TypeError(f"sparse must be True or False, got {param_group['sparse']!r}")
        parts = [(param_group["sparse"], items)]
    else:
        is_sparse = [isinstance(_tensor_of(it), torch.Tensor) and _tensor_of(it).dim() >= 2 for it in items]
        parts = [(True, [it for it, s in zip(items, is_sparse) if s]),
                 (False, [it for it, s in zip(items, is_sparse) if not s])]
        parts = [part for part in parts if part[1]] or [(False, items)]
    groups = []
    for sparse, part in parts:
        group = {**param_group, "params": part, "sparse": sparse}
        merged = {**defaults, **group}
        ops.check_adamw_hyper(merged["lr"], merged["betas"], merged["eps"], merged["weight_decay"])
        for name in ("capturable", "differentiable"):
            if merged.get(name):
                raise ValueError(f"{name}=True is not supported by SparseAdamW")
        if sparse:
            _check_sparse_params([_tensor_of(it) for it in part], selection_started)
        groups.append(group)
    return groups


def _check_sparse_params(tensors, selection_started: bool) -> None:
    if selection_started:
        raise ValueError("a sparse param group can only be added before the selection; "
                         "add it with sparse=False, or before the first step")
    seen = []
    for p in tensors:
        if not isinstance(p, torch.Tensor):
            continue  # torch's add_param_group raises its TypeError
        check_param("a sparse param", p)  # FSDP2 params pass: the kernels read their local blocks
        ops.check_strided("a sparse param", local(p))
        if p.dtype not in ops.FLOAT_DTYPES:
            raise TypeError(f"sparse params must be float32, bfloat16 or float16, got {p.dtype}")
        if p.dim() == 0 or not local(p).is_contiguous():
            raise ValueError(f"sparse params must be contiguous with dim >= 1, got shape "
                             f"{tuple(p.shape)} (put it in a sparse=False group)")
        if any(p is t for t in seen):
            raise ValueError("a sparse param group lists the same tensor twice")
        seen.append(p)


def check_budget_args(density, budget) -> None:
    if (density is None) == (budget is None):
        raise ValueError("give exactly one of density (a fraction) and budget (a count)")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise TypeError(f"density must be a number, got {type(density).__name__}")
        if not (math.isfinite(density) and 0 < density <= 1):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise TypeError(f"budget must be an int, got {type(budget).__name__}")
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")


def resolve_budget(sparse_params, density, budget) -> int:
    """How many entries train: ``budget``, or ``round(density * N)`` with N the entries of the
    sparse params that require grad (now, when the selection starts)."""
    trainable = sum(p.numel() for p in sparse_params if p.requires_grad)
    if trainable == 0:
        raise ValueError("every sparse param is frozen (requires_grad=False): nothing to select")
    if budget is not None:
        if budget > trainable:
            raise ValueError(f"budget={budget} is larger than the {trainable} entries of the sparse "
                             "params that require grad")
        return budget
    count = round(density * trainable)
    if count < 1:
        raise ValueError(f"density={density} selects no entry of the {trainable} sparse entries")
    return count
