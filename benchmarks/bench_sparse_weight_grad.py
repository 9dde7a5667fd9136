"""sparse_weight_grad: our backends against what autograd does today (the dense dW = dY^T X, then
the selected entries gathered) and against the chunked reference.

Work and bytes: 2 k T flops for k selected entries; the op must read X and dY once (T (in + out)
elements: at density 1e-3 every cache line of both holds a needed column) and the indices. The
dense product does 2 T in out flops on the same bytes, so at density d the op has d times its
arithmetic intensity: it is bound by the bytes, not the flops. ``python
benchmarks/bench_sparse_weight_grad.py`` prints that comparison (time, FLOP rates, share of copy
bandwidth) for 1 and 2 threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from gem_kernels import reference

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402

# One (T, out, in) per segment: dW is [out, in], X [T, in], dY [T, out].
WG_CASES = {
    "smoke": [(37, 123, 431), (1, 7, 3), (0, 5, 5), (130, 64, 63)],
    "minilm_384x384": [(2048, 384, 384)],        # a MiniLM-L6 attention projection, 2048 tokens
    "llama_1536x512": [(2048, 1536, 512)],       # a small Llama MLP up/gate projection
    "llama_512x1536": [(2048, 512, 1536)],       # ... and its down projection
    "minilm_layer": [(2048, 384, 384)] * 4 + [(2048, 1536, 384), (2048, 384, 1536)],  # one call, 6 tensors
}
WG_MODE_CASES = {
    "smoke": ["smoke"],
    "quick": ["minilm_384x384", "llama_1536x512", "llama_512x1536"],
    "full": ["minilm_384x384", "llama_1536x512", "llama_512x1536", "minilm_layer"],
}


def pytest_generate_tests(metafunc):
    if "wg_case" in metafunc.fixturenames:
        from conftest import bench_mode  # benchmarks/conftest.py, already loaded by pytest
        metafunc.parametrize("wg_case", WG_MODE_CASES[bench_mode(metafunc.config)])


def make_data(case: str, density: float, device: str, dtype=torch.float32, seed=1234):
    """X, dY (activations ~N(0, 1), gradients ~N(0, 1e-3)) and a sorted random index set of
    round(density * out * in) entries per segment (at least one where the segment has any)."""
    gen = torch.Generator().manual_seed(seed)
    xs, dys, parts = [], [], []
    for t, n_out, n_in in WG_CASES[case]:
        xs.append(torch.randn(t, n_in, generator=gen).to(device=device, dtype=dtype))
        dys.append((torch.randn(t, n_out, generator=gen) * 1e-3).to(device=device, dtype=dtype))
        k = max(1, round(density * n_out * n_in))
        parts.append(torch.randperm(n_out * n_in, generator=gen)[:k].sort().values)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([p.numel() for p in parts]).cumsum(0)
    return xs, dys, torch.cat(parts).to(device), offsets.to(device)


def dense_then_gather(xs, dys, indices, offsets):
    """What autograd computes today: the whole dW per tensor, then the selected entries."""
    starts = offsets.tolist()
    return torch.cat([(dy.float().T @ x.float()).reshape(-1)[indices[starts[s]:starts[s + 1]]]
                      for s, (x, dy) in enumerate(zip(xs, dys))])


def flops(xs, offsets) -> int:
    counts = offsets.diff().tolist()
    return sum(2 * k * x.shape[0] for k, x in zip(counts, xs))


def bytes_moved(xs, dys, indices) -> int:
    """X and dY read once, the int64 indices read, the fp32 result written."""
    return sum(x.numel() * x.element_size() + dy.numel() * dy.element_size() for x, dy in zip(xs, dys)) \
        + indices.numel() * (8 + 4)


def assert_matches(got, xs, dys, indices, offsets):
    """Within 2 (T + 1) 2^-24 sum|dY X| of the reference: the bound of any fp32 summation order
    on each side (tests/test_sparse_weight_grad.py explains it)."""
    want = reference.sparse_weight_grad(xs, dys, indices, offsets).cpu().double()
    starts = offsets.tolist()
    tols = []
    for s, (x, dy) in enumerate(zip(xs, dys)):
        idx = indices[starts[s]:starts[s + 1]].cpu()
        o, i = idx // x.shape[1], idx % x.shape[1]
        scale = (dy.cpu().double().abs()[:, o] * x.cpu().double().abs()[:, i]).sum(0)
        tols.append(2 * (x.shape[0] + 1) * 2.0 ** -24 * scale)
    err = (got.cpu().double() - want).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    share = err / torch.cat(tols).clamp_min(1e-300)
    assert bool((share <= 1).all()), f"worst error {float(share.max()):.3g}x the tolerance"


def _describe(benchmark, case, density, device, impl, role, xs, dys, indices, offsets):
    C.describe(benchmark, op="sparse_weight_grad", case=case, device=device, impl=impl, role=role,
               density=density, k=indices.numel(), bytes_moved=bytes_moved(xs, dys, indices),
               numel_total=sum(dy.shape[1] * x.shape[1] for x, dy in zip(xs, dys)), n_segments=len(xs),
               flops=flops(xs, offsets), dense_flops=sum(2 * x.shape[0] * x.shape[1] * dy.shape[1]
                                                          for x, dy in zip(xs, dys)),
               baselines=["dense_then_gather", "reference"] if role == "ours" else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_sparse_weight_grad_ours(benchmark, wg_case, density, dtype, backend, backend_device, backend_name,
                                 rounds):
    xs, dys, indices, offsets = make_data(wg_case, density, backend_device, dtype)
    got = C.timed(benchmark, lambda: backend.sparse_weight_grad(xs, dys, indices, offsets),
                  device=backend_device, rounds=rounds)
    _describe(benchmark, wg_case, density, backend_device, backend_name, "ours", xs, dys, indices, offsets)
    assert_matches(got, xs, dys, indices, offsets)


def test_sparse_weight_grad_dense_then_gather(benchmark, wg_case, density, device, rounds):
    xs, dys, indices, offsets = make_data(wg_case, density, device)
    got = C.timed(benchmark, lambda: dense_then_gather(xs, dys, indices, offsets), device=device, rounds=rounds)
    _describe(benchmark, wg_case, density, device, "dense_then_gather", "baseline", xs, dys, indices, offsets)
    assert_matches(got, xs, dys, indices, offsets)


def test_sparse_weight_grad_reference(benchmark, wg_case, density, device, rounds):
    xs, dys, indices, offsets = make_data(wg_case, density, device)
    got = C.timed(benchmark, lambda: reference.sparse_weight_grad(xs, dys, indices, offsets), device=device,
                  rounds=rounds)
    _describe(benchmark, wg_case, density, device, "reference", "baseline", xs, dys, indices, offsets)
    if device == "cpu":  # bit-identical there (see reference.sparse_weight_grad)
        assert torch.equal(got, dense_then_gather(xs, dys, indices, offsets))


# ---------------------------------------------------------------------------------------------
# The roofline comparison, run as a script (CPU).


def median_time(fn, repeats: int) -> float:
    fn()  # warm: pages faulted in, caches as in a training loop that calls it every step
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def roofline(threads: int, cases, density: float, repeats: int) -> list[str]:
    from gem_kernels.backends import cpu
    torch.set_num_threads(threads)
    lines = []
    for case in cases:
        xs, dys, indices, offsets = make_data(case, density, "cpu")
        t_op = median_time(lambda: cpu.sparse_weight_grad(xs, dys, indices, offsets), repeats)
        t_gather = median_time(lambda: dense_then_gather(xs, dys, indices, offsets), max(3, repeats // 4))
        t_dense = median_time(lambda: [dy.T @ x for x, dy in zip(xs, dys)], max(3, repeats // 4))
        # Copy bandwidth on these very tensors (read + write), so cache effects match the op's reads.
        copies = [(t.clone(), t) for t in xs + dys]
        t_copy = median_time(lambda: [dst.copy_(src) for dst, src in copies], repeats)
        op_flops, dense_flops = flops(xs, offsets), sum(2 * x.shape[0] * x.shape[1] * dy.shape[1]
                                                        for x, dy in zip(xs, dys))
        op_rate, dense_rate = op_flops / t_op, dense_flops / t_dense
        floor = t_copy / 2  # X and dY read once at the copy's bandwidth (a copy reads and writes)
        lines.append(f"| {threads} | {case} | {indices.numel()} | {t_op * 1e6:.0f} µs | {t_gather * 1e3:.2f} ms | "
                     f"{t_gather / t_op:.0f}x | {op_rate / 1e9:.2f} | {dense_rate / 1e9:.1f} | "
                     f"{100 * op_rate / dense_rate:.1f} % | {floor * 1e6:.0f} µs | {100 * floor / t_op:.0f} % |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cases", nargs="+", default=WG_MODE_CASES["quick"], choices=list(WG_CASES))
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=41)
    args = parser.parse_args(argv)
    print(f"density {args.density:g}, fp32, torch {torch.__version__}; medians of {args.repeats} calls\n")
    print("| threads | case | k | C++ op | dense dYᵀX + gather | speed-up | op GFLOP/s (2kT) | dense matmul "
          "GFLOP/s | op / dense rate | byte floor (X+dY at copy bw) | op at floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        for line in roofline(threads, args.cases, args.density, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
