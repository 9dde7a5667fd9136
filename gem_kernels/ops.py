"""The public ops: each checks its inputs, normalises them to its operator's schema and calls the
``torch.library`` operator (``gem_kernels.library``), which runs the kernel registered for the
tensors' device (``gem_kernels/backends/``: ``cpu`` for CPU tensors, ``triton`` for CUDA ones) or,
where none is, the reference. ``gem_kernels.live_backends()`` lists the backends that serve a device of
this process.

The checks here need the data (index ranges, ``k`` bounds) and run before any tensor is
written, so a call that raises changes nothing.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

from . import library, reference  # library registers the torch.ops.gem_kernels operators
from .library import FLOAT_DTYPES, check_strided, live_backends  # noqa: F401

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# Validation: one helper per kind of argument, used by every op.


def _check_tensor(name: str, t, *, dtypes, device=None, shape=None, dim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_strided(name, t)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {allowed}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other tensors are on {device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} is not contiguous; call .contiguous() first")


def _first_device(name: str, tensors) -> torch.device:
    """The device of the first tensor (checked to be one), which the others must share."""
    if not len(tensors):
        return torch.device("cpu")
    _check_tensor(f"{name}[0]", tensors[0], dtypes=FLOAT_DTYPES)
    return tensors[0].device


def _check_paired_lists(name_a: str, a, name_b: str, b) -> None:
    """Two lists of tensors, one per segment each, of the same length."""
    for name, seq in ((name_a, a), (name_b, b)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of tensors, got {type(seq).__name__}")
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} tensors but {name_b} has {len(b)}")


def check_segments(grads, weights) -> torch.device:
    """Checks paired lists of gradient and weight tensors; returns their common device."""
    _check_paired_lists("grads", grads, "weights", weights)
    device = _first_device("weights", weights)
    for i, (g, w) in enumerate(zip(grads, weights)):
        _check_tensor(f"weights[{i}]", w, dtypes=FLOAT_DTYPES, device=device)
        _check_tensor(f"grads[{i}]", g, dtypes=FLOAT_DTYPES, device=device, shape=w.shape)
    return device


def _check_score_args(eps: float, exponent: float) -> None:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(exponent, (int, float)) and math.isfinite(exponent)):
        raise ValueError(f"exponent must be a finite number, got {exponent!r}")


def as_count(name: str, value) -> int:
    """``value`` as a Python int (whatever has ``__index__``, such as a one-element integer tensor,
    but not a bool); the caller checks its range."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None


def check_index_set(name: str, indices, offsets, numels: Sequence[int], device,
                    check_values: bool = True) -> None:
    """Checks an ``(indices, offsets)`` pair: int64, offsets ``[L+1]`` from 0 to ``len(indices)``
    and non-decreasing, indices in range for their segment and strictly ascending within it.

    ``check_values=False`` checks only dtypes, devices and shapes: no pass over the values and
    no device-to-host sync, for index sets that were checked (or made by ``ratio_topk``) before.
    """
    _check_tensor(f"{name} indices", indices, dtypes=(torch.int64,), device=device, dim=1)
    _check_tensor(f"{name} offsets", offsets, dtypes=(torch.int64,), device=device,
                  shape=(len(numels) + 1,))
    if not check_values:
        return
    counts = offsets.diff()
    if int(offsets[0]) != 0 or int(offsets[-1]) != indices.numel() or bool((counts < 0).any()):
        raise ValueError(f"{name} offsets must rise from 0 to len(indices)={indices.numel()} "
                         f"without decreasing, got {offsets.tolist()[:8]}...")
    if indices.numel() == 0:
        return
    numel_t = torch.tensor(list(numels), dtype=torch.int64, device=device)
    limit = numel_t.repeat_interleave(counts)
    if bool(((indices < 0) | (indices >= limit)).any()):
        bad = int(torch.nonzero((indices < 0) | (indices >= limit))[0])
        raise ValueError(f"{name} indices out of range: entry {bad} is {int(indices[bad])}, "
                         f"its segment has {int(limit[bad])} elements")
    starts = torch.zeros_like(indices, dtype=torch.bool)
    starts[offsets[:-1][counts > 0]] = True
    rising = torch.ones_like(starts)
    rising[1:] = indices[1:] > indices[:-1]
    if not bool((rising | starts).all()):
        raise ValueError(f"{name} indices must be strictly ascending within each segment")


def check_adamw_hyper(lr, betas, eps, weight_decay) -> None:
    """torch AdamW's checks on its hyper-parameters, shared by the op and the optimizer."""
    lr_value = float(lr) if isinstance(lr, torch.Tensor) and lr.numel() == 1 else lr
    if not (isinstance(lr_value, (int, float)) and math.isfinite(lr_value) and lr_value >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, Sequence) and len(betas) == 2
            and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")


# ---------------------------------------------------------------------------------------
# The ops


def layer_stats(grads: Sequence[Tensor], weights: Sequence[Tensor], eps: float = 1e-8,
                exponent: float = 1.0) -> Tensor:
    """Per-tensor ``[Σs, Σs², Σ s·ln s, max s]`` (float64 ``[L, 4]``) of ``s = |g| / (|w|+eps)^exponent``."""
    check_segments(grads, weights)
    _check_score_args(eps, exponent)
    return torch.ops.gem_kernels.layer_stats(list(grads), list(weights), float(eps), float(exponent))


def ratio_topk(grads: Sequence[Tensor], weights: Sequence[Tensor], k, eps: float = 1e-8,
               exponent: float = 1.0, exclude=None) -> tuple[Tensor, Tensor]:
    """Exact top-k of the ratio score: ``k`` a list gives k per tensor, an int gives k overall.

    Returns ``(indices, offsets)``; see ``gem_kernels.reference`` for ordering and ties.
    """
    device = check_segments(grads, weights)
    _check_score_args(eps, exponent)
    numels = [w.numel() for w in weights]
    if exclude is not None:
        if not (isinstance(exclude, (tuple, list)) and len(exclude) == 2):
            raise TypeError("exclude must be None or an (indices, offsets) pair")
        check_index_set("exclude", exclude[0], exclude[1], numels, device)
        n_excluded = exclude[1].diff().tolist()
    else:
        n_excluded = [0] * len(numels)
    per_segment = isinstance(k, (list, tuple))
    if per_segment:
        if len(k) != len(numels):
            raise ValueError(f"k has {len(k)} entries but there are {len(numels)} tensors")
        k = [as_count(f"k[{i}]", kk) for i, kk in enumerate(k)]
        for i, (kk, n, ex) in enumerate(zip(k, numels, n_excluded)):
            if not 0 <= kk <= n - ex:
                raise ValueError(f"k[{i}]={kk} must be in [0, {n - ex}] (tensor {i} has {n} "
                                 f"elements, {ex} excluded)")
    else:
        k = as_count("k", k)
        available = sum(numels) - sum(n_excluded)
        if not 0 <= k <= available:
            raise ValueError(f"k={k} must be in [0, {available}] ({sum(numels)} elements, "
                             f"{sum(n_excluded)} excluded)")
        k = [k]
    ex_indices, ex_offsets = (None, None) if exclude is None else exclude
    return torch.ops.gem_kernels.ratio_topk(list(grads), list(weights), k, per_segment, float(eps),
                                            float(exponent), ex_indices, ex_offsets)


def _check_adamw_grads(grads, params, n_selected: int, device) -> bool:
    """Dense grads (one per param) or one compact tensor (one value per entry); True if compact."""
    if isinstance(grads, torch.Tensor):
        _check_tensor("grads (compact)", grads, dtypes=FLOAT_DTYPES, device=device, shape=(n_selected,))
        return True
    if isinstance(grads, str) or not isinstance(grads, Sequence):
        raise TypeError(f"grads must be a list of tensors or one compact tensor, got {type(grads).__name__}")
    if len(grads) != len(params):
        raise ValueError(f"grads has {len(grads)} tensors but params has {len(params)}")
    for i, (g, p) in enumerate(zip(grads, params)):
        _check_tensor(f"grads[{i}]", g, dtypes=FLOAT_DTYPES, device=device, shape=p.shape)
    return False


def _check_adamw_schedule(step, age, n_params: int, n_selected: int, device, check_values: bool):
    """Exactly one of ``step`` (an int, or int64 ``[L]``) and ``age`` (one per entry), all >= 1;
    returns ``step`` as the op takes it (int64 ``[L]``, or None with ``age``)."""
    if (step is None) == (age is None):
        raise ValueError("give exactly one of step (per tensor) and age (per entry)")
    if age is not None:
        _check_tensor("age", age, dtypes=(torch.int32, torch.int64), device=device, shape=(n_selected,))
        if check_values and n_selected and int(age.min()) < 1:
            raise ValueError("age must be >= 1 for every entry (the step number of this update)")
        return None
    if isinstance(step, torch.Tensor):
        _check_tensor("step", step, dtypes=(torch.int64,), shape=(n_params,))
        if check_values and n_params and int(step.min()) < 1:
            raise ValueError("step must be >= 1 (the step number of this update)")
        return step
    if as_count("step", step) < 1:
        raise ValueError(f"step must be >= 1 (the step number of this update), got {step}")
    return torch.full((n_params,), int(step), dtype=torch.int64)


def check_sparse_adamw_args(params: Sequence[Tensor], grads, indices: Tensor, offsets: Tensor,
                            state: Sequence[Tensor], *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                            weight_decay: float = 1e-2, step=None, age=None, maximize: bool = False,
                            check_indices: bool = True, check_schedule: bool = True) -> tuple:
    """Every check of ``sparse_adamw_``, touching nothing; returns the operator's arguments.

    SparseAdamW checks all its groups this way before it writes any of them, with
    ``check_schedule=False``: its steps and ages are its own counters plus one, so reading their
    minimum on the host (a device sync for a CUDA ``age``) would check nothing.
    """
    if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"params must be a list of tensors, got {type(params).__name__}")
    device = _first_device("params", params)
    for i, p in enumerate(params):
        _check_tensor(f"params[{i}]", p, dtypes=FLOAT_DTYPES, device=device)
    check_index_set("sparse_adamw_", indices, offsets, [p.numel() for p in params], device,
                    check_values=check_indices)
    n_selected = indices.numel()
    compact = _check_adamw_grads(grads, params, n_selected, device)
    if isinstance(state, torch.Tensor) or not isinstance(state, Sequence):
        raise TypeError(f"state must be a list of tensors, got {type(state).__name__}")
    library.check_adamw_state_count(len(state))
    for name, buffer in zip(reference.ADAMW_STATE, state):
        _check_tensor(name, buffer, dtypes=(torch.float32,), device=device, shape=(n_selected,))
    check_adamw_hyper(lr, betas, eps, weight_decay)
    step = _check_adamw_schedule(step, age, len(params), n_selected, device, check_schedule)
    return (list(params), [] if compact else list(grads), grads if compact else None, indices, offsets,
            list(state), float(lr), float(betas[0]), float(betas[1]), float(eps), float(weight_decay), step, age,
            bool(maximize))


def sparse_adamw_(params: Sequence[Tensor], grads, indices: Tensor, offsets: Tensor, state: Sequence[Tensor], *,
                  lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2, step=None,
                  age=None, maximize: bool = False, check_indices: bool = True) -> None:
    """In-place AdamW step on the selected entries of ``params``, with ``state`` the per-entry
    fp32 buffers (``reference.ADAMW_STATE``: the moments, and the variants' optional buffers);
    see ``gem_kernels.reference``.

    ``check_indices=False`` skips the O(k) pass over ``indices``/``offsets`` (range, order) and
    its host syncs, for a caller that keeps an index set it checked once, as SparseAdamW does.
    Out-of-range indices would then write out of bounds: leave it True for anything else.
    """
    args = check_sparse_adamw_args(params, grads, indices, offsets, state, lr=lr, betas=betas, eps=eps,
                                   weight_decay=weight_decay, step=step, age=age, maximize=maximize,
                                   check_indices=check_indices)
    torch.ops.gem_kernels.sparse_adamw_(*args)


def sparse_weight_grad(inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], indices: Tensor,
                       offsets: Tensor) -> Tensor:
    """The selected entries of each weight gradient ``dW = dYᵀ X`` (fp32), never the dense ``dW``.

    ``inputs[l]`` is ``X`` ``[T, in]`` and ``grad_outputs[l]`` is ``dY`` ``[T, out]`` (one dtype per
    segment); ``indices`` are flat row-major indices into ``W`` ``[out, in]``. For transformers'
    ``Conv1D`` (weight ``[in, out]``) swap the two lists; see ``gem_kernels.reference``.
    """
    _check_paired_lists("inputs", inputs, "grad_outputs", grad_outputs)
    device = _first_device("inputs", inputs)
    numels = []
    for i, (x, dy) in enumerate(zip(inputs, grad_outputs)):
        _check_tensor(f"inputs[{i}]", x, dtypes=FLOAT_DTYPES, device=device, dim=2)
        _check_tensor(f"grad_outputs[{i}]", dy, dtypes=(x.dtype,), device=device, dim=2)
        if dy.shape[0] != x.shape[0]:
            raise ValueError(f"grad_outputs[{i}] has {dy.shape[0]} rows but inputs[{i}] has {x.shape[0]}")
        numels.append(dy.shape[1] * x.shape[1])
    check_index_set("sparse_weight_grad", indices, offsets, numels, device)
    return torch.ops.gem_kernels.sparse_weight_grad(list(inputs), list(grad_outputs), indices, offsets)
