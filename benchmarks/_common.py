"""Sizes, data, byte counts and timing shared by the benchmark suites (and read by report.py).

Three modes pick how much work a run does:

* ``smoke``: tiny awkward shapes, one call each; the correctness run CI makes with
  ``--benchmark-disable`` (the default in that mode).
* ``quick``: the sizes the targets are stated at (small and medium, density 1e-3), few rounds.
* ``full``: every size and density (the default when timing).

Pick one with ``--bench-mode`` or ``GEM_BENCH_MODE``.
"""
from __future__ import annotations

import torch

MODES = ("smoke", "quick", "full")

# Each case is a list of segment (tensor) shapes.
CASES = {
    "smoke": [(300, 257), (1, 1000), (64, 63)],
    "small": [(1024, 1024)],                        # 1M entries
    "medium": [(1250, 1250)] * 32,                  # 32 tensors, 50M entries
    "proj_2048x2048": [(2048, 2048)],               # attention projection of a 1B-class decoder
    "proj_2048x8192": [(2048, 8192)],               # MLP projection of a 1B-class decoder
}
MODE_CASES = {
    "smoke": ["smoke"],
    "quick": ["small", "medium"],
    "full": ["small", "medium", "proj_2048x2048", "proj_2048x8192"],
}
MODE_DENSITIES = {"smoke": [1e-2], "quick": [1e-3], "full": [1e-4, 1e-3, 1e-2]}
# Timed rounds per benchmark (after one warm-up round); smoke runs disabled, so one call.
MODE_ROUNDS = {"smoke": 1, "quick": 3, "full": 10}

# Our compiled backends and the device each runs on; "reference" is a baseline, not a contender.
BACKEND_DEVICE = {"cpu": "cpu", "triton": "cuda"}

EPS = 1e-8
LR, BETAS, ADAM_EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 1e-2
# A mid-training step number, so the bias corrections are not the trivial first-step ones.
STEP = 10


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def live_backends() -> list[tuple[str, str]]:
    """(device, backend) pairs for our non-reference backends that can run here."""
    import gem_kernels
    live = gem_kernels.live_backends()
    return [(dev, name) for name, dev in BACKEND_DEVICE.items()
            if name in live and dev in devices()]


def backend_module(name: str):
    """A backend's module (its kernels in the ops' schema signatures, gem_kernels.library)."""
    from gem_kernels.backends import cpu
    if name == "cpu":
        return cpu
    from gem_kernels.backends import triton
    return triton


def k_per_segment(case: str, density: float) -> list[int]:
    """GEM-style per-tensor budget: round(density * numel), at least one entry."""
    return [max(1, round(density * h * w)) for h, w in CASES[case]]


def numel(case: str) -> int:
    return sum(h * w for h, w in CASES[case])


_DATA: dict = {}


def segments(case: str, device: str, dtype=torch.float32):
    """(grads, weights) lists for a case, generated once per process from a fixed seed.

    Weights look like a pretrained layer's (about N(0, 0.02)), gradients are smaller; the
    ratio |g|/|w| then has the heavy tail real scores have.
    """
    key = (case, device, dtype)
    if key not in _DATA:
        gen = torch.Generator().manual_seed(1234)
        grads, weights = [], []
        for shape in CASES[case]:
            weights.append((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
            grads.append((torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype))
        _DATA[key] = (grads, weights)
    return _DATA[key]


def random_index_set(case: str, density: float, device: str):
    """Sorted distinct indices per segment (k_per_segment of them) and their offsets."""
    gen = torch.Generator().manual_seed(99)
    parts = []
    for (h, w), k in zip(CASES[case], k_per_segment(case, density)):
        parts.append(torch.randperm(h * w, generator=gen)[:k].sort().values)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([p.numel() for p in parts]).cumsum(0)
    return torch.cat(parts).to(device), offsets.to(device)


# ---------------------------------------------------------------------------------------
# Bytes moved, counted as DESIGN.md §5 says (element sizes, not cache lines).


def bytes_score_pass(grads, weights) -> int:
    """One read of g and w: the floor of layer_stats and of each ratio_topk pass."""
    return sum(g.numel() * g.element_size() + w.numel() * w.element_size()
               for g, w in zip(grads, weights))


def bytes_sparse_adamw(params, grads, n_selected: int) -> int:
    """Per selected entry: its int64 index, the gathered grad, m and v read and written
    (fp32), the param read and written."""
    return n_selected * (8 + grads[0].element_size() + 4 * 4 + 2 * params[0].element_size())


def bytes_dense_adamw(params) -> int:
    """torch AdamW over whole tensors: p, g, m, v read, p, m, v written (fp32 state)."""
    return sum(p.numel() * (3 * p.element_size() + 4 * 4) for p in params)


# ---------------------------------------------------------------------------------------
# Timing


def synchronized(fn, device: str):
    """fn, followed by a device synchronise when the work is asynchronous (CUDA)."""
    if device != "cuda":
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return run


def timed(benchmark, fn, *, device: str, rounds: int, setup=None):
    """Times fn (one call per round, one warm-up round); returns the last call's result."""
    return benchmark.pedantic(synchronized(fn, device), setup=setup, rounds=rounds,
                              warmup_rounds=1, iterations=1)


def describe(benchmark, *, op: str, case: str, device: str, impl: str, role: str,
             bytes_moved: int, density=None, k=None, dtype=torch.float32, numel_total=None,
             n_segments=None, **more) -> None:
    """extra_info read by report.py: what ran, on how much, the bytes it must move and (for
    ours) the names of the baselines it is compared with.

    role is "ours" or "baseline"; a baseline with density None serves every density of
    its case (whole-tensor work does not depend on how many entries are selected), and one
    with no ``variant`` (e.g. "cold cache") serves every variant.
    """
    benchmark.group = f"{op} {case}" + (f" d={density:g}" if density is not None else "") \
        + (f" {more['variant']}" if more.get("variant") else "")
    benchmark.extra_info.update(
        op=op, case=case, device=device, impl=impl, role=role, bytes=int(bytes_moved),
        numel=numel_total if numel_total is not None else numel(case),
        segments=n_segments if n_segments is not None else len(CASES[case]),
        density=density, k=k, dtype=str(dtype).replace("torch.", ""), **more)
