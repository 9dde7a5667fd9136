"""The ops as ``torch.library`` operators, and how a backend gives them kernels.

Each op is defined here once: its schema (the signature below), a fake kernel (dtypes and shapes
only, which ``torch.compile`` and FakeTensor tracing run) and, as the kernel of every device that
has none of its own, the reference (``gem_kernels.reference``, written in the same signature: the
specification). A backend gives an op a kernel for one device type with ``register_kernel``, in the
schema's signature, for any subset of the ops:

    from gem_kernels.library import register_kernel

    @register_kernel("sparse_weight_grad", "cpu")
    def sparse_weight_grad(inputs, grad_outputs, indices, offsets): ...

torch's dispatcher is the only dispatch. The package's own backends live in
``gem_kernels/backends/`` (``cpu``: the C++ kernels; ``triton``: the Triton kernels for CUDA) and
register themselves when imported; a new backend is one new module of the same kind. Every
registered kernel first refuses tensors it cannot read through ``data_ptr()`` (``check_strided``).
``gem_kernels.ops`` holds the public functions: they check what needs the data (index ranges,
``k`` bounds) and normalise their arguments to these schemas.

``sparse_adamw_`` declares the tensors it writes, so autograd bumps their version counters on
every backend and ``torch.compile`` functionalises the mutation.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import reference

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------
# The ops (the body of each is its default kernel: the reference)


@torch.library.custom_op("gem_kernels::layer_stats", mutates_args=())
def layer_stats(grads: list[Tensor], weights: list[Tensor], eps: float, exponent: float) -> Tensor:
    """Per-segment ``[Σs, Σs², Σ s·ln s, max s]`` (float64 ``[L, 4]``); see the reference."""
    return reference.layer_stats(grads, weights, eps, exponent)


@layer_stats.register_fake
def _(grads, weights, eps, exponent):
    _fake_check_segments(grads, weights)
    device = weights[0].device if len(weights) else torch.device("cpu")
    return torch.empty(len(weights), 4, dtype=torch.float64, device=device)


@torch.library.custom_op("gem_kernels::ratio_topk", mutates_args=())
def ratio_topk(grads: list[Tensor], weights: list[Tensor], k: list[int], per_segment: bool,
               eps: float, exponent: float, exclude_indices: Optional[Tensor],
               exclude_offsets: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Exact top-k of the ratio score: one ``k`` per segment (``per_segment``) or ``k[0]`` overall."""
    return reference.ratio_topk(grads, weights, k, per_segment, eps, exponent, exclude_indices, exclude_offsets)


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


@torch.library.custom_op("gem_kernels::sparse_adamw_", mutates_args=("params", "state"))
def sparse_adamw_(params: list[Tensor], dense_grads: list[Tensor], compact_grads: Optional[Tensor],
                  indices: Tensor, offsets: Tensor, state: list[Tensor], lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, step: Optional[Tensor], age: Optional[Tensor],
                  maximize: bool) -> None:
    """torch AdamW's update on the selected entries, in place. Grads are ``dense_grads`` (one per
    param) or ``compact_grads`` (one value per entry); ``state`` the per-entry fp32 buffers
    (``reference.ADAMW_STATE``); ``step`` is int64 ``[L]`` or ``age`` per entry."""
    reference.sparse_adamw_(params, dense_grads, compact_grads, indices, offsets, state, lr, beta1, beta2, eps,
                            weight_decay, step, age, maximize)


@sparse_adamw_.register_fake
def _(params, dense_grads, compact_grads, indices, offsets, state, lr, beta1, beta2, eps, weight_decay, step, age,
      maximize):
    n = indices.shape[0]
    if (compact_grads is None) == (len(dense_grads) == 0) and len(params):
        raise ValueError("give either dense_grads (one per param) or compact_grads, not both")
    if compact_grads is None and len(dense_grads) != len(params):
        raise ValueError(f"dense_grads has {len(dense_grads)} tensors but params has {len(params)}")
    for i, (g, p) in enumerate(zip(dense_grads, params)):
        _fake_check("dense_grads", i, g, p.shape)
    if compact_grads is not None:
        _fake_check("compact_grads", None, compact_grads, (n,))
    check_adamw_state_count(len(state))
    for name, t in zip(reference.ADAMW_STATE, state):
        if t.dtype != torch.float32 or tuple(t.shape) != (n,):
            raise ValueError(f"{name} must be float32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if (step is None) == (age is None):
        raise ValueError("give exactly one of step (per segment) and age (per entry)")
    if tuple(offsets.shape) != (len(params) + 1,):
        raise ValueError(f"offsets must have shape ({len(params) + 1},), got {tuple(offsets.shape)}")


def check_adamw_state_count(count: int) -> None:
    """``sparse_adamw_``'s state holds AdamW's moments and at most every optional buffer."""
    if not reference.ADAMW_MOMENTS <= count <= len(reference.ADAMW_STATE):
        raise ValueError(f"state has {count} tensors; sparse_adamw_ takes "
                         f"{', '.join(reference.ADAMW_STATE[:reference.ADAMW_MOMENTS])} and optionally "
                         f"{', '.join(reference.ADAMW_STATE[reference.ADAMW_MOMENTS:])}, in that order")


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


OPS = {"layer_stats": layer_stats, "ratio_topk": ratio_topk, "sparse_adamw_": sparse_adamw_,
       "sparse_weight_grad": sparse_weight_grad}


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
# Kernels per device


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



# (op name, device type) -> the function a backend registered, as it gave it
_REGISTERED = {}


def register_kernel(op_name: str, device_type: str):
    """Decorator: makes ``fn`` (in the schema's signature) ``op_name``'s kernel for ``device_type``
    tensors, in place of the reference or an earlier registration; returns ``fn`` unchanged."""
    if op_name not in OPS:
        raise ValueError(f"{op_name!r} is not an op of gem_kernels; the ops are {sorted(OPS)}")
    names = list(inspect.signature(reference.__dict__[op_name]).parameters)

    def decorator(fn):
        def kernel(*args):
            for name, value in zip(names, args):  # before any pointer is read
                for i, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                    if isinstance(t, Tensor):
                        check_strided(f"{name}[{i}]" if isinstance(value, (list, tuple)) else name, t)
            return fn(*args)
        OPS[op_name].register_kernel(device_type)(kernel)
        _REGISTERED[(op_name, device_type)] = fn
        return fn
    return decorator


def registered_kernel(op_name: str, device_type: str):
    """The function registered for ``op_name`` on ``device_type``; the reference's where none was."""
    return _REGISTERED.get((op_name, device_type), reference.__dict__[op_name])


def live_backends() -> list[str]:
    """Names of the backends whose kernels serve a device of this process (the reference always):
    a backend's name is its module's below ``gem_kernels.backends`` (``cpu``, ``triton``)."""
    devices = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    live = {"reference"}
    for (_, device_type), fn in _REGISTERED.items():
        if device_type in devices:
            live.add(backend_name(fn))
    return sorted(live, key=lambda name: (name != "reference", name))


def backend_name(fn) -> str:
    """``cpu`` for ``gem_kernels.backends.cpu.f``, ``triton`` for ``gem_kernels.backends.triton.x.f``,
    ``reference`` for the reference; else the function's module."""
    module = fn.__module__
    if module == reference.__name__:
        return "reference"
    prefix = __name__.rpartition(".")[0] + ".backends."
    return module[len(prefix):].split(".")[0] if module.startswith(prefix) else module


