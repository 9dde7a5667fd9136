"""Numerics cases of the Triton kernels against gem_kernels.reference, on any device.

Not a pytest module by itself: ``tests/test_triton_interpret.py`` runs it in a subprocess
with ``TRITON_INTERPRET=1`` (Triton picks interpreter or compiler when the kernels are
decorated, so this must be a fresh process), and ``benchmarks/gpu_check.py`` runs it on
CUDA tensors. ``python tests/triton_cases.py --device cpu --json out.json`` runs every case,
prints one line per case (with the worst mismatch) and exits non-zero if any case fails.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

SIZES = [(1,), (7,), (4097,), (0,), (123, 431)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TIE_G, TIE_W = 0.5, 0.25  # exact in every dtype, so the tied score 2.0 is the same everywhere


def _backend():
    import gem_kernels.triton as backend
    from gem_kernels.triton import _common
    _common.poison_outputs = True  # an element a kernel forgets to write shows up as NaN / -7
    return backend


def make_segments(device, dtypes, seed, nonfinite=True):
    """Random g, w per size (never zeros), dtype cycling through ``dtypes`` (g and w offset
    so they differ), tied entries in every segment and NaN/inf grads in the big ones."""
    gen = torch.Generator().manual_seed(seed)
    grads, weights = [], []
    for i, shape in enumerate(SIZES):
        g = torch.randn(shape, generator=gen)
        w = torch.randn(shape, generator=gen)
        flat_g, flat_w = g.view(-1), w.view(-1)
        flat_g[::37] = TIE_G  # ties inside a segment and, for global k, across segments
        flat_w[::37] = TIE_W
        if nonfinite and flat_g.numel() > 10:
            flat_g[3] = float("nan")
            flat_g[9] = float("inf")
        grads.append(g.to(dtypes[i % len(dtypes)]).to(device))
        weights.append(w.to(dtypes[(i + 1) % len(dtypes)]).to(device))
    return grads, weights


def make_exclude(weights, seed, fraction=0.1):
    gen = torch.Generator().manual_seed(seed)
    parts, counts = [], []
    for w in weights:
        n = w.numel()
        chosen = torch.randperm(n, generator=gen)[: int(n * fraction)].sort().values
        parts.append(chosen)
        counts.append(chosen.numel())
    device = weights[0].device
    offsets = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return torch.cat(parts).to(device), offsets.to(device)


def _available(weights, exclude):
    n = [w.numel() for w in weights]
    if exclude is None:
        return n
    ex = exclude[1].diff().tolist()
    return [a - b for a, b in zip(n, ex)]


def _tie_split_k(weights, grads, exclude, eps, exponent):
    """Per segment, a k that cuts through the tied group: everything scoring above the tie,
    plus half of the ties."""
    from gem_kernels import reference
    ks = []
    for seg, (g, w) in enumerate(zip(grads, weights)):
        s = reference.ratio_score(g, w, eps, exponent)
        keep = torch.isfinite(s) & ~reference._excluded_mask(w.numel(), exclude, seg, w.device)
        tie = float(reference.ratio_score(torch.tensor([TIE_G]), torch.tensor([TIE_W]), eps, exponent))
        above = int((keep & (s > tie)).sum())
        ties = int((keep & (s == tie)).sum())
        ks.append(above + ties // 2)
    return ks


# ---------------------------------------------------------------------------------------
# Checks: each raises AssertionError with the worst mismatch.


def check_topk(grads, weights, k, eps=1e-8, exponent=1.0, exclude=None):
    from gem_kernels import reference
    got_idx, got_off = _backend().ratio_topk(grads, weights, k, eps, exponent, exclude)
    want_idx, want_off = reference.ratio_topk(grads, weights, k, eps, exponent, exclude)
    assert torch.equal(got_off.cpu(), want_off.cpu()), f"offsets {got_off.tolist()} != {want_off.tolist()}"
    if not torch.equal(got_idx.cpu(), want_idx.cpu()):
        bad = int((got_idx.cpu() != want_idx.cpu()).nonzero()[0])
        raise AssertionError(f"indices differ first at position {bad} of {want_idx.numel()}: "
                             f"got {int(got_idx[bad])}, want {int(want_idx[bad])}")
    return f"{want_idx.numel()} indices identical"


def check_stats(grads, weights, eps=1e-8, exponent=1.0):
    from gem_kernels import reference
    got = _backend().layer_stats(grads, weights, eps, exponent).cpu()
    want = reference.layer_stats(grads, weights, eps, exponent).cpu()
    assert got.dtype == torch.float64 and got.shape == want.shape
    # Σ s·ln s can cancel: scale its tolerance by Σ s·|ln s| (fp32 accumulation, ~1e-6 relative).
    scale = torch.zeros_like(want)
    for i, (g, w) in enumerate(zip(grads, weights)):
        s = reference.ratio_score(g, w, eps, exponent).double().cpu()
        s = s[torch.isfinite(s)]
        if s.numel():
            abs_sls = torch.where(s > 0, s * s.log().abs(), torch.zeros_like(s)).sum()
            scale[i] = torch.stack([s.sum(), (s * s).sum(), abs_sls, s.max()])
    tol = 2e-5 * scale + 1e-30
    same_nan = torch.equal(got.isnan(), want.isnan())
    both_finite = torch.isfinite(got) & torch.isfinite(want)
    same_inf = torch.equal(got[~both_finite].nan_to_num(0.0), want[~both_finite].nan_to_num(0.0))
    err = torch.where(both_finite, (got - want).abs() - tol, torch.zeros_like(got))
    assert same_nan and same_inf, f"non-finite pattern differs:\n got {got}\n want {want}"
    worst = float(((got - want).abs() / want.abs().clamp_min(1e-30))[both_finite].max()) if both_finite.any() else 0.0
    assert bool((err <= 0).all()), f"stats differ beyond tolerance (worst relative {worst:.3g}):\n got {got}\n want {want}"
    return f"worst relative error {worst:.3g}"


def _adamw_inputs(device, param_dtypes, seed, counts):
    gen = torch.Generator().manual_seed(seed)
    params, grads, parts = [], [], []
    for i, shape in enumerate(SIZES):
        p = torch.randn(shape, generator=gen).to(param_dtypes[i % len(param_dtypes)])
        g = torch.randn(shape, generator=gen).to(param_dtypes[(i + 1) % len(param_dtypes)])
        n = p.numel()
        parts.append(torch.randperm(n, generator=gen)[: min(counts[i], n)].sort().values)
        params.append(p.to(device))
        grads.append(g.to(device))
    indices = torch.cat(parts).to(device)
    offsets = torch.tensor([0] + [t.numel() for t in parts], dtype=torch.int64).cumsum(0).to(device)
    n = indices.numel()
    exp_avg = (0.1 * torch.randn(n, generator=gen)).to(device)
    exp_avg_sq = (0.01 * torch.rand(n, generator=gen) + 1e-4).to(device)
    return params, grads, indices, offsets, exp_avg, exp_avg_sq


def check_adamw(device, param_dtypes, seed, *, compact=False, step=None, age_dtype=None, maximize=False,
                nan_grad=False, counts=(1, 5, 300, 0, 2000)):
    from gem_kernels import reference
    inputs = _adamw_inputs(device, param_dtypes, seed, counts)
    n = inputs[2].numel()
    gen = torch.Generator().manual_seed(seed + 1)
    compact_grads = torch.randn(n, generator=gen).to(param_dtypes[0]).to(device) if compact else None
    age = torch.randint(1, 50, (n,), generator=gen).to(age_dtype).to(device) if age_dtype else None
    if step == "tensor":
        step = torch.arange(1, len(SIZES) + 1, dtype=torch.int64, device=device) * 3
    if nan_grad:  # a NaN gradient at a selected entry of segment 2
        inputs[1][2].view(-1)[inputs[2][int(inputs[3][2])]] = float("nan")
    results = []
    for impl in (_backend(), reference):
        params, grads, indices, offsets, exp_avg, exp_avg_sq = [x.clone() if isinstance(x, torch.Tensor)
                                                                else [t.clone() for t in x] for x in inputs]
        impl.sparse_adamw_(params, compact_grads if compact else grads, indices, offsets, exp_avg, exp_avg_sq,
                           lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                           step=None if age is not None else step, age=age, maximize=maximize)
        results.append((params, exp_avg, exp_avg_sq))
    (got_p, got_m, got_v), (want_p, want_m, want_v) = results
    worst = 0.0
    for seg, (gp, wp, p0) in enumerate(zip(got_p, want_p, inputs[0])):
        untouched = torch.ones(p0.numel(), dtype=torch.bool, device=p0.device)
        untouched[inputs[2][int(inputs[3][seg]):int(inputs[3][seg + 1])]] = False
        assert torch.equal(gp.view(-1)[untouched], p0.view(-1)[untouched]), f"segment {seg}: unselected entries changed"
        torch.testing.assert_close(gp, wp, equal_nan=nan_grad, msg=lambda m: f"params[{seg}] ({gp.dtype}): {m}")
        if gp.numel():
            worst = max(worst, float((gp.float() - wp.float()).abs().nan_to_num(0.0).max()))
    torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-7, equal_nan=nan_grad)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-9, equal_nan=nan_grad)
    return f"{n} entries, worst param difference {worst:.3g}"


def check_adamw_steps(device, param_dtype, seed, *, steps=5, compact=False, age_dtype=None,
                      betas=(0.9, 0.999), counts=(1, 5, 300, 0, 2000)):
    """Several steps in a row, new gradients each step, params and state compared bit for bit
    with the reference (torch.equal): the kernel rounds where torch does (fp32 math, its fused
    lerp and addcmul, round to nearest even into bf16/fp16), so nothing may differ. A store
    that truncates, or a multiply-add fused where torch rounds twice, moves entries by an ulp
    that the one-step cases' tolerances would let through. Not for fp32 params: those can
    differ from the reference by an ulp, as the C++ backend's do (csrc/sparse_adamw.cpp)."""
    from gem_kernels import reference
    inputs = _adamw_inputs(device, [param_dtype], seed, counts)
    n = inputs[2].numel()
    gen = torch.Generator().manual_seed(seed + 1)
    step_grads = [torch.randn(n, generator=gen).to(param_dtype).to(device) if compact else
                  [torch.randn(p.shape, generator=gen).to(param_dtype).to(device) for p in inputs[0]]
                  for _ in range(steps)]
    first_age = torch.randint(1, 50, (n,), generator=gen).to(device) if age_dtype else None
    results = []
    for impl in (_backend(), reference):
        params, _, indices, offsets, exp_avg, exp_avg_sq = [x.clone() if isinstance(x, torch.Tensor)
                                                            else [t.clone() for t in x] for x in inputs]
        for step, grads in enumerate(step_grads, start=1):
            age = (first_age + step - 1).to(age_dtype) if age_dtype else None
            impl.sparse_adamw_(params, grads, indices, offsets, exp_avg, exp_avg_sq, lr=3e-3,
                               betas=betas, eps=1e-8, weight_decay=0.05,
                               step=None if age_dtype else step, age=age)
        results.append((params, exp_avg, exp_avg_sq))
    (got_p, got_m, got_v), (want_p, want_m, want_v) = results
    indices, offsets = inputs[2], inputs[3]

    def selected(params):  # the selected entries of all segments, in the order of indices
        return torch.cat([p.view(-1)[indices[int(offsets[i]):int(offsets[i + 1])]] for i, p in enumerate(params)])
    for name, got, want in [("params", selected(got_p), selected(want_p)), ("exp_avg", got_m, want_m),
                            ("exp_avg_sq", got_v, want_v)]:
        if not torch.equal(got.cpu(), want.cpu()):
            bad = (got.cpu() != want.cpu()).nonzero().view(-1)
            first = int(bad[0])
            raise AssertionError(f"after {steps} steps, {bad.numel()} of {got.numel()} {name} entries differ "
                                 f"from the reference; first at {first}: got {float(got[first])!r}, "
                                 f"want {float(want[first])!r}")
    for seg, (gp, p0) in enumerate(zip(got_p, inputs[0])):  # and nothing else was written
        untouched = torch.ones(p0.numel(), dtype=torch.bool, device=p0.device)
        untouched[indices[int(offsets[seg]):int(offsets[seg + 1])]] = False
        assert torch.equal(gp.view(-1)[untouched], p0.view(-1)[untouched]), f"segment {seg}: unselected entries changed"
    return f"{n} entries x {steps} steps, params and state bit-identical"


# ---------------------------------------------------------------------------------------
# The cases: name -> function(device) returning a one-line summary.


def _case_stats(dtypes, exponent, nonfinite):
    def case(device):
        grads, weights = make_segments(device, dtypes, seed=1, nonfinite=nonfinite)
        return check_stats(grads, weights, exponent=exponent)
    return case


def _case_topk(mode, dtypes, exponent=1.0, use_exclude=False):
    def case(device):
        grads, weights = make_segments(device, dtypes, seed=2)
        exclude = make_exclude(weights, seed=3) if use_exclude else None
        available = _available(weights, exclude)
        if mode == "per_segment_ties":
            k = _tie_split_k(weights, grads, exclude, 1e-8, exponent)
        elif mode == "per_segment_edges":  # k = 0, k = everything, and k into the non-finite tail
            k = [0, available[1], available[2] - 1, 0, available[4] - 1]
        elif mode == "global_ties":
            k = sum(_tie_split_k(weights, grads, exclude, 1e-8, exponent)) + 1
        elif mode == "global_all":
            k = sum(available)
        else:
            raise ValueError(mode)
        return check_topk(grads, weights, k, exponent=exponent, exclude=exclude)
    return case


def _case_adamw(**kwargs):
    def case(device):
        return check_adamw(device, **kwargs)
    return case


CASES = {
    "stats_fp32": _case_stats([torch.float32], 1.0, nonfinite=False),
    "stats_mixed_dtypes": _case_stats(DTYPES, 1.0, nonfinite=False),
    "stats_exponent": _case_stats(DTYPES, 0.7, nonfinite=False),
    "stats_nonfinite": _case_stats([torch.float32], 1.0, nonfinite=True),
    "topk_per_segment_ties_fp32": _case_topk("per_segment_ties", [torch.float32]),
    "topk_per_segment_ties_mixed": _case_topk("per_segment_ties", DTYPES),
    "topk_per_segment_edges": _case_topk("per_segment_edges", DTYPES),
    "topk_global_ties": _case_topk("global_ties", DTYPES),
    "topk_global_all": _case_topk("global_all", [torch.float16]),
    "topk_exclude_per_segment": _case_topk("per_segment_ties", DTYPES, use_exclude=True),
    "topk_exclude_global": _case_topk("global_ties", [torch.bfloat16], use_exclude=True),
    "topk_exponent": _case_topk("per_segment_ties", DTYPES, exponent=0.6),
    "adamw_fp32_step": _case_adamw(param_dtypes=[torch.float32], seed=4, step=7),
    "adamw_mixed_step_tensor": _case_adamw(param_dtypes=DTYPES, seed=5, step="tensor"),
    "adamw_mixed_age_int32": _case_adamw(param_dtypes=DTYPES, seed=6, age_dtype=torch.int32, maximize=True),
    "adamw_compact_bf16_age_int64": _case_adamw(param_dtypes=[torch.bfloat16, torch.float32], seed=7,
                                                compact=True, age_dtype=torch.int64),
    "adamw_compact_fp16_step1": _case_adamw(param_dtypes=[torch.float16], seed=8, compact=True, step=1),
    "adamw_nan_grad": _case_adamw(param_dtypes=[torch.float32], seed=9, step=3, nan_grad=True),
    "adamw_steps_bf16_exact": lambda device: check_adamw_steps(device, torch.bfloat16, seed=10),
    "adamw_steps_fp16_compact_age_exact": lambda device: check_adamw_steps(
        device, torch.float16, seed=11, compact=True, age_dtype=torch.int32),
    # beta1 <= 0.5: torch's lerp then fuses from the other end (weight - 1, from g).
    "adamw_steps_bf16_low_beta1_exact": lambda device: check_adamw_steps(device, torch.bfloat16, seed=12,
                                                                         betas=(0.3, 0.99)),
}


def run_case(name: str, device: str) -> dict:
    start = time.perf_counter()
    try:
        summary = CASES[name](device)
        ok = True
    except Exception:  # report every failure, keep running the other cases
        summary, ok = traceback.format_exc(limit=4), False
    return {"ok": ok, "summary": summary, "seconds": round(time.perf_counter() - start, 2)}


def run_all(device: str, names=None) -> dict:
    results = {}
    for name in names or CASES:
        results[name] = run_case(name, device)
        r = results[name]
        print(f"{'PASS' if r['ok'] else 'FAIL'} {name} ({r['seconds']} s): {r['summary']}", flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write {case: {ok, summary, seconds}} here")
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    args = parser.parse_args(argv)
    results = run_all(args.device, args.cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
