"""The ops as ``torch.library`` operators: one definition each, a kernel per device.

``gem_kernels::layer_stats``, ``gem_kernels::ratio_topk``, ``gem_kernels::sparse_adamw_`` and
``gem_kernels::sparse_weight_grad`` are defined here with their schemas (``sparse_adamw_`` declares
the tensors it writes, so autograd bumps their version counters on every backend and
``torch.compile`` functionalises the mutation). Each op has

* a fake (meta) kernel that checks dtypes and shapes and makes outputs of the right size,
  which is what ``torch.compile`` and FakeTensor tracing run;
* the reference (``gem_kernels.reference``) as the default kernel, for any device;
* a kernel per device: the functions of that device's backend module, ``cpu.py`` (the C++
  kernels) for CPU tensors and ``triton/`` for CUDA tensors, registered with torch by
  ``register_backend``. torch's dispatcher is the only dispatch.

The schemas take normalised arguments (``k`` always a list plus a flag, ``exclude`` as two
optional tensors, ``step`` as one int64 per segment); every backend module offers the
reference's signatures, and the ``_*_kernel`` functions below are the one place that maps the
schema's arguments onto them. ``gem_kernels.ops`` holds the public functions, which check
everything that needs the data (index ranges, ``k`` bounds) and call these.

``force_backend(name)`` (or ``GEM_KERNELS_BACKEND=reference|cpu|triton`` at import) makes every op
run one backend's kernels, for tests and debugging; on a device it cannot run on, the ops then
raise instead of falling back.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

from . import reference

Tensor = torch.Tensor

BACKEND_NAMES = ("reference", "cpu", "triton")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICE_TYPES = ("cpu", "cuda")


# ---------------------------------------------------------------------------------------
# Backends


def _load_backend(name: str):
    """The backend module, or None when it cannot be imported here."""
    if name == "reference":
        return reference
    try:
        module = importlib.import_module(f"gem_kernels.{name}")
    except ImportError:
        return None
    if name == "cpu" and not module.available():
        return None
    return module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _can_run(name: str, device_type: str) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu" and _load_backend("cpu") is not None
    if name == "triton":  # CUDA tensors, or CPU tensors under Triton's interpreter
        on_device = device_type == "cpu" if _interpreting() else device_type == "cuda" and torch.cuda.is_available()
        return on_device and _load_backend("triton") is not None
    return False


def backends() -> list[str]:
    """Names of the backends that can run in this process."""
    live = ["reference"]
    if _can_run("cpu", "cpu"):
        live.append("cpu")
    if _can_run("triton", "cpu" if _interpreting() else "cuda"):
        live.append("triton")
    return live


def check_strided(name: str, t) -> None:
    """Refuses what the kernels cannot read through ``data_ptr()``: tensor subclasses (DTensor
    reports a null pointer for its local shard), non-strided layouts and meta tensors.

    Every public op runs this on every tensor before a pointer leaves Python; the device
    kernels below run it again, for callers of ``torch.ops.gem_kernels.*`` directly.
    """
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        raise TypeError(f"{name} is a {type(t).__name__}; the gem_kernels ops take plain dense "
                        "tensors (for FSDP2/DTensor parameters pass their local shards)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; the gem_kernels ops take dense (strided) tensors")
    if t.device.type == "meta":
        raise TypeError(f"{name} is a meta tensor: it has no data for the kernels to read")


def _check_all_strided(**named) -> None:
    for name, value in named.items():
        if isinstance(value, (list, tuple)):
            for i, t in enumerate(value):
                check_strided(f"{name}[{i}]", t)
        elif value is not None:
            check_strided(name, value)



# ---------------------------------------------------------------------------------------
# layer_stats


@torch.library.custom_op("gem_kernels::layer_stats", mutates_args=())
def layer_stats(grads: list[Tensor], weights: list[Tensor], eps: float, exponent: float) -> Tensor:
    """Per-segment ``[Σs, Σs², Σ s·ln s, max s]`` (float64 ``[L, 4]``); see the reference."""
    return reference.layer_stats(grads, weights, eps, exponent)


@layer_stats.register_fake
def _(grads, weights, eps, exponent):
    _fake_check_segments(grads, weights)
    device = weights[0].device if len(weights) else torch.device("cpu")
    return torch.empty(len(weights), 4, dtype=torch.float64, device=device)


# ---------------------------------------------------------------------------------------
# ratio_topk


@torch.library.custom_op("gem_kernels::ratio_topk", mutates_args=())
def ratio_topk(grads: list[Tensor], weights: list[Tensor], k: list[int], per_segment: bool,
               eps: float, exponent: float, exclude_indices: Optional[Tensor],
               exclude_offsets: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact top-k of the ratio score: one ``k`` per segment (``per_segment``) or ``k[0]`` overall."""
    return _ratio_topk_with(reference, grads, weights, k, per_segment, eps, exponent,
                            exclude_indices, exclude_offsets)


def _ratio_topk_with(module, grads, weights, k, per_segment, eps, exponent, exclude_indices,
                     exclude_offsets):
    exclude = None if exclude_indices is None else (exclude_indices, exclude_offsets)
    k_arg = [int(kk) for kk in k] if per_segment else int(k[0])
    return module.ratio_topk(list(grads), list(weights), k_arg, eps, exponent, exclude)


@ratio_topk.register_fake
def _(grads, weights, k, per_segment, eps, exponent, exclude_indices, exclude_offsets):
    _fake_check_segments(grads, weights)
    if len(k) != (len(weights) if per_segment else 1):
        raise ValueError(f"k has {len(k)} entries for {len(weights)} segments (per_segment={per_segment})")
    if (exclude_indices is None) != (exclude_offsets is None):
        raise ValueError("exclude_indices and exclude_offsets go together")
    device = weights[0].device if len(weights) else torch.device("cpu")
    total = sum(k) if per_segment else k[0]
    return (torch.empty(total, dtype=torch.int64, device=device),
            torch.empty(len(weights) + 1, dtype=torch.int64, device=device))


# ---------------------------------------------------------------------------------------
# sparse_adamw_


@torch.library.custom_op("gem_kernels::sparse_adamw_", mutates_args=("params", "exp_avg", "exp_avg_sq"))
def sparse_adamw_(params: list[Tensor], dense_grads: list[Tensor], compact_grads: Optional[Tensor],
                  indices: Tensor, offsets: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: float,
                  beta1: float, beta2: float, eps: float, weight_decay: float, step: Optional[Tensor],
                  age: Optional[Tensor], maximize: bool) -> None:
    """torch AdamW's update on the selected entries, in place. Grads are ``dense_grads`` (one per
    param) or ``compact_grads`` (one value per entry); ``step`` is int64 ``[L]`` or ``age`` per entry."""
    _sparse_adamw_with(reference, params, dense_grads, compact_grads, indices, offsets, exp_avg,
                       exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, age, maximize)


def _sparse_adamw_with(module, params, dense_grads, compact_grads, indices, offsets, exp_avg,
                       exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, age, maximize):
    grads = compact_grads if compact_grads is not None else list(dense_grads)
    module.sparse_adamw_(list(params), grads, indices, offsets, exp_avg, exp_avg_sq, lr=lr,
                         betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, step=step, age=age,
                         maximize=maximize)


@sparse_adamw_.register_fake
def _(params, dense_grads, compact_grads, indices, offsets, exp_avg, exp_avg_sq, lr, beta1, beta2,
      eps, weight_decay, step, age, maximize):
    n = indices.shape[0]
    if (compact_grads is None) == (len(dense_grads) == 0) and len(params):
        raise ValueError("give either dense_grads (one per param) or compact_grads, not both")
    if compact_grads is None and len(dense_grads) != len(params):
        raise ValueError(f"dense_grads has {len(dense_grads)} tensors but params has {len(params)}")
    for i, (g, p) in enumerate(zip(dense_grads, params)):
        _fake_check("dense_grads", i, g, p.shape)
    if compact_grads is not None:
        _fake_check("compact_grads", None, compact_grads, (n,))
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be float32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if (step is None) == (age is None):
        raise ValueError("give exactly one of step (per segment) and age (per entry)")
    if tuple(offsets.shape) != (len(params) + 1,):
        raise ValueError(f"offsets must have shape ({len(params) + 1},), got {tuple(offsets.shape)}")


# ---------------------------------------------------------------------------------------
# sparse_weight_grad


@torch.library.custom_op("gem_kernels::sparse_weight_grad", mutates_args=())
def sparse_weight_grad(inputs: list[Tensor], grad_outputs: list[Tensor], indices: Tensor,
                       offsets: Tensor) -> Tensor:
    """The selected entries of each segment's ``dW = dYᵀ X`` (fp32 ``[len(indices)]``)."""
    return reference.sparse_weight_grad(inputs, grad_outputs, indices, offsets)


@sparse_weight_grad.register_fake
def _(inputs, grad_outputs, indices, offsets):
    if len(inputs) != len(grad_outputs):
        raise ValueError(f"inputs has {len(inputs)} tensors but grad_outputs has {len(grad_outputs)}")
    for i, (x, dy) in enumerate(zip(inputs, grad_outputs)):
        if x.dim() != 2 or dy.dim() != 2 or x.shape[0] != dy.shape[0]:
            raise ValueError(f"segment {i}: inputs [T, in] and grad_outputs [T, out] must share T, got "
                             f"{tuple(x.shape)} and {tuple(dy.shape)}")
        _fake_check("inputs", i, x, x.shape)
        _fake_check("grad_outputs", i, dy, dy.shape)
    return torch.empty(indices.shape[0], dtype=torch.float32, device=indices.device)


# ---------------------------------------------------------------------------------------
# Fake-kernel checks: dtypes and shapes only (no data under tracing)


def _fake_check(name: str, i, t: Tensor, shape) -> None:
    where = name if i is None else f"{name}[{i}]"
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where} has dtype {t.dtype}; expected float32, bfloat16 or float16")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(t.shape)}; expected {tuple(shape)}")


def _fake_check_segments(grads, weights) -> None:
    if len(grads) != len(weights):
        raise ValueError(f"grads has {len(grads)} tensors but weights has {len(weights)}")
    for i, (g, w) in enumerate(zip(grads, weights)):
        _fake_check("weights", i, w, w.shape)
        _fake_check("grads", i, g, w.shape)


# ---------------------------------------------------------------------------------------
# Device kernels: a backend module's functions behind the schemas


def _layer_stats_kernel(module):
    def kernel(grads, weights, eps, exponent):
        _check_all_strided(grads=grads, weights=weights)
        return module.layer_stats(list(grads), list(weights), eps, exponent)
    return kernel


def _ratio_topk_kernel(module):
    def kernel(grads, weights, k, per_segment, eps, exponent, exclude_indices, exclude_offsets):
        _check_all_strided(grads=grads, weights=weights, exclude_indices=exclude_indices,
                           exclude_offsets=exclude_offsets)
        return _ratio_topk_with(module, grads, weights, k, per_segment, eps, exponent, exclude_indices,
                                exclude_offsets)
    return kernel


def _sparse_adamw_kernel(module):
    def kernel(params, dense_grads, compact_grads, indices, offsets, exp_avg, exp_avg_sq, lr, beta1, beta2,
               eps, weight_decay, step, age, maximize):
        _check_all_strided(params=params, dense_grads=dense_grads, compact_grads=compact_grads,
                           indices=indices, offsets=offsets, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                           step=step, age=age)
        _sparse_adamw_with(module, params, dense_grads, compact_grads, indices, offsets, exp_avg, exp_avg_sq,
                           lr, beta1, beta2, eps, weight_decay, step, age, maximize)
    return kernel


def _sparse_weight_grad_kernel(module):
    def kernel(inputs, grad_outputs, indices, offsets):
        _check_all_strided(inputs=inputs, grad_outputs=grad_outputs, indices=indices, offsets=offsets)
        return module.sparse_weight_grad(list(inputs), list(grad_outputs), indices, offsets)
    return kernel


_KERNELS = {layer_stats: _layer_stats_kernel, ratio_topk: _ratio_topk_kernel,
            sparse_adamw_: _sparse_adamw_kernel, sparse_weight_grad: _sparse_weight_grad_kernel}


class _Unrunnable:
    """Stands for a forced backend on a device it cannot run on: every op raises."""

    def __init__(self, name: str, device_type: str):
        self.message = (f"GEM_KERNELS_BACKEND={name!r} was forced but cannot run on {device_type} tensors "
                        f"here (live backends: {backends()})")

    def __getattr__(self, op_name):
        raise RuntimeError(self.message)


def register_backend(module, device_type: str) -> None:
    """Registers ``module``'s functions (the reference's signatures) as every op's kernel for
    ``device_type``. They are looked up at each call, so a patched module function is what runs."""
    for op, kernel_of in _KERNELS.items():
        op.register_kernel(device_type)(kernel_of(module))


def force_backend(name: Optional[str]) -> None:
    """Makes every op run backend ``name``'s kernels on every device (tests, debugging); None
    gives each device its own kernels again. A device the backend cannot run on raises."""
    if name is not None and name not in BACKEND_NAMES:
        raise ValueError(f"GEM_KERNELS_BACKEND={name!r} is not one of {BACKEND_NAMES}")
    for device_type in DEVICE_TYPES:
        if name is None:
            native = "cpu" if device_type == "cpu" else "triton"
            module = _load_backend(native) if _can_run(native, device_type) else reference
        else:
            module = _load_backend(name) if _can_run(name, device_type) else _Unrunnable(name, device_type)
        register_backend(module, device_type)


def backend_from_environment() -> None:
    """Each device's own kernels, or the backend ``GEM_KERNELS_BACKEND`` forces (at import)."""
    force_backend(os.environ.get("GEM_KERNELS_BACKEND", "").strip() or None)


backend_from_environment()
