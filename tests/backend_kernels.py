"""A backend's kernels in tests and benchmarks: what used to be forcing a backend, now a fixture.

``kernels_of(module, device_type)`` registers ``module``'s function of each op's name (the
reference, ``gem_kernels.backends.cpu``, ``gem_kernels.backends.triton`` or any module of the
kind) as that op's kernel for ``device_type`` tensors, and puts back the kernels registered
before when the block ends. ``Kernels(module)`` calls them with the public ops' arguments
(``Kernels(cpu).ratio_topk(grads, weights, k)``): each call goes through ``gem_kernels.ops`` (its
checks and normalisation) and torch's dispatcher to that module's kernel; other attributes are
the module's own.
"""
from __future__ import annotations

import contextlib

from gem_kernels import library, ops


@contextlib.contextmanager
def kernels_of(module, device_type: str = "cpu"):
    before = {name: library.registered_kernel(name, device_type) for name in library.OPS}
    try:
        for name in library.OPS:
            if hasattr(module, name):
                library.register_kernel(name, device_type)(getattr(module, name))
        yield
    finally:
        for name, fn in before.items():
            library.register_kernel(name, device_type)(fn)


class Kernels:
    def __init__(self, module, device_types=("cpu", "cuda")):
        self.module = module
        self.device_types = device_types

    def __getattr__(self, name):
        if name not in library.OPS:
            return getattr(self.module, name)

        def call(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                for device_type in self.device_types:
                    stack.enter_context(kernels_of(self.module, device_type))
                return getattr(ops, name)(*args, **kwargs)
        return call


def backend_module(name: str):
    """The module of backend ``name`` (``reference``, ``cpu``, ``triton``)."""
    if name == "reference":
        from gem_kernels import reference
        return reference
    if name == "cpu":
        from gem_kernels.backends import cpu
        return cpu
    from gem_kernels.backends import triton
    return triton


def adamw_density_one(module, *, amsgrad: bool, maximize: bool, steps: int = 5, device: str = "cpu"):
    """SparseAdamW at density 1.0 (every entry selected) with ``module``'s kernels on ``device`` tensors,
    and torch.optim.AdamW (single-tensor, its CPU default) with the same flags, from the same start
    on the same gradients. Returns the two final weights and the two ``exp_avg_sq`` (and, for
    AMSGrad, ``max_exp_avg_sq``) states, flattened: ``(ours, torch's)``."""
    import torch

    from gem_kernels import Random, SparseAdamW

    gen = torch.Generator().manual_seed(5)
    start = torch.randn(12, 9, generator=gen).to(device)
    grads = [(torch.randn(12, 9, generator=gen) * 10 ** (i % 3 - 1)).to(device) for i in range(steps)]  # v rises, falls
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize)
    sparse = SparseAdamW([ours], density=1.0, selector=Random(0), **hyper)
    dense = torch.optim.AdamW([theirs], foreach=False, **hyper)
    with kernels_of(module, device):
        for g in grads:
            ours.grad, theirs.grad = g.clone(), g.clone()
            sparse.step()
            dense.step()
    keys = ("exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg_sq",)
    mine = torch.cat([ours.detach().reshape(-1)] + [sparse.state[ours][k] for k in keys])
    torchs = torch.cat([theirs.detach().reshape(-1)] + [dense.state[theirs][k].reshape(-1) for k in keys])
    return mine, torchs


def worst_relative_ulps(ours, torchs) -> float:
    """The largest difference, in fp32 ulps at the size of torch's value."""
    import torch
    return float(((ours - torchs).abs() / (torchs.abs().clamp_min(1e-30) * torch.finfo(torch.float32).eps)).max())
