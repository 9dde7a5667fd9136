"""GPU check of the Triton kernels: the numerics cases of tests/triton_cases.py on CUDA tensors,
then a short timing of each kernel against what a user would run instead, with the bytes each
kernel must move and the time that implies at a given bandwidth.

    python benchmarks/gpu_check.py --all          # the whole GPU suite, time-boxed, one call
                                                  # (benchmarks/gpu_suite.py; docs/gpu.md)
    python benchmarks/gpu_check.py                # on a CUDA machine, the kernels alone: writes
                                                  # benchmarks/results/gpu_check-<device>.json
    python benchmarks/gpu_check.py --model-only   # anywhere: just the byte/time arithmetic (and
                                                  # sparse_weight_grad's, each configuration, at the
                                                  # 953M Llama's shapes: weight_grad_model)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# The realistic size of the report: 32 tensors, 100M entries in all, fp32 g and w, 0.1 % chosen.
NUM_SEGMENTS = 32
TOTAL_ELEMENTS = 100_000_000
DENSITY = 1e-3
BANDWIDTH = 3.0e12  # bytes/s, an H100-class HBM3 figure
SECTOR = 32  # bytes: the smallest DRAM transaction, what a scattered 2- or 4-byte access costs


def segment_sizes(total=TOTAL_ELEMENTS, count=NUM_SEGMENTS):
    """Unequal sizes, like a model's layers: proportional to 1..count, summing to ``total``."""
    weights = range(1, count + 1)
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def traffic_model(total=TOTAL_ELEMENTS, density=DENSITY, g_bytes=4, w_bytes=4, bandwidth=BANDWIDTH):
    """Bytes each kernel must move and the time that implies at ``bandwidth`` (ideal: every byte
    once per pass; the small per-program partials, histograms and tables are left out)."""
    k = int(total * density)
    per_pass = total * (g_bytes + w_bytes)
    from gem_kernels.backends.triton import ratio_topk as _  # noqa: F401  (the pass count lives there)
    topk_module = sys.modules["gem_kernels.backends.triton.ratio_topk"]
    topk_passes = len(topk_module.SHIFTS) + 2  # histogram passes, count pass, write pass
    # sparse AdamW on k entries: index (8), grad (4, gathered), m and v read+written (16),
    # param read+written (8). Scattered param/grad accesses cost a whole sector each.
    adamw_useful = k * (8 + g_bytes + 16 + 2 * w_bytes)
    adamw_sectors = k * (8 + SECTOR + 16 + 2 * SECTOR)
    model = {
        "layer_stats": {"bytes": per_pass, "note": "one read of g and w"},
        "ratio_topk": {"bytes": topk_passes * per_pass + k * 8,
                       "note": f"{topk_passes} reads of g and w ({len(topk_module.SHIFTS)} radix "
                               "passes, count, write) + the k indices written"},
        "sparse_adamw": {"bytes": adamw_useful, "bytes_with_sectors": adamw_sectors,
                         "note": "k entries: index, gathered grad, m and v read+written, param "
                                 "read+written; bytes_with_sectors charges each scattered access 32 B"},
    }
    for entry in model.values():
        entry["ideal_ms"] = entry["bytes"] / bandwidth * 1e3
        if "bytes_with_sectors" in entry:
            entry["ideal_ms_with_sectors"] = entry["bytes_with_sectors"] / bandwidth * 1e3
    return {"total_elements": total, "segments": NUM_SEGMENTS, "density": density, "k": k,
            "bandwidth_bytes_per_s": bandwidth, "kernels": model}


# sparse_weight_grad's byte model (docs/gpu.md, "sparse_weight_grad: the design and its byte model").
DENSE_FLOPS = 700e12  # bf16 tensor-core flop/s a large GEMM reaches on an H100/H200 (about 70 % of peak):
#                       an assumption, to predict the dense dYᵀX; the suite measures it
L2_BANDWIDTH = 2.4e12  # bytes/s the SMs drew from the L2 in issue 16's H200 run of the gather kernel (1.6 GB of
#                         sectors in 0.68 ms per 5632 x 2048 layer): the rate assumed for l2_bytes
LLAMA_953M_SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]  # (out, in): q/k/v/o, gate/up, down
WEIGHT_GRAD_TOKENS = 4096
WEIGHT_GRAD_DENSITIES = (1e-3, 3e-3, 1e-2)


def _touched(n: float, k: float) -> float:
    """Expected distinct values among k uniform draws from n (rows or columns or sectors touched)."""
    return n * -math.expm1(k * math.log1p(-1 / n)) if n > 1 else min(n, k)


def weight_grad_model(config, tokens, n_out, n_in, k, itemsize, splits, bandwidth=BANDWIDTH, l2=L2_BANDWIDTH):
    """Bytes one sparse_weight_grad call with ``config`` (a Config of the Triton kernel) moves for one
    segment of k random entries, and the time they take: the larger of its DRAM bytes at
    ``bandwidth`` and its L2→SM bytes at ``l2``.

    dram_bytes: the T-major copies (read T rows, write Tp), then each Xᵀ (dYᵀ) row an entry needs read
    once (so a slice of the copy, in·Tp·s / splits, must stay in the L2 while its entries run), or, read in
    place, each token's touched sectors once (the programs run through T together, sharing token rows in
    the L2); indices, partial sums. l2_bytes: what the SMs ask of the L2: per entry its run of the T-major
    copy, or one 32-byte sector per value read in place along a scattered column, or per block and token
    the sectors of dY's row band (BLOCK_E entries span about BLOCK_E·out/k rows)."""
    padded = -(-tokens // 64) * 64
    blocks = -(-k // config.block_e)
    dram = 8 * k + 4 * k * (splits if splits == 1 else 2 * splits + 1)
    l2_bytes = 0.0
    for t_major, feats in ((config.x_t, n_in), (config.dy_t, n_out)):
        if t_major:
            dram += tokens * feats * itemsize + padded * feats * itemsize + _touched(feats, k) * padded * itemsize
            l2_bytes += k * padded * itemsize
        else:
            dram += tokens * SECTOR * _touched(feats * itemsize / SECTOR, k)
    if not config.x_t:
        l2_bytes += k * tokens * SECTOR
    if not config.dy_t:
        band = min(n_out, config.block_e * n_out / k) * itemsize
        l2_bytes += blocks * tokens * SECTOR * (math.ceil(band / SECTOR) + 1)
    return {"dram_bytes": dram, "l2_bytes": l2_bytes, "dram_ms": dram / bandwidth * 1e3, "l2_ms": l2_bytes / l2 * 1e3,
            "predicted_ms": max(dram / bandwidth, l2_bytes / l2) * 1e3}


def dense_weight_grad_model(tokens, n_out, n_in, itemsize, flops=DENSE_FLOPS, bandwidth=BANDWIDTH):
    """The dense dYᵀX (2·T·out·in flops at ``flops``) and its DRAM bytes (X, dY read, dW written)."""
    flop = 2 * tokens * n_out * n_in
    dram = (tokens * (n_in + n_out) + n_out * n_in) * itemsize
    return {"flop": flop, "dram_bytes": dram, "predicted_ms": max(flop / flops, dram / bandwidth) * 1e3}


def weight_grad_predictions(bandwidth=BANDWIDTH, sms=132, tokens=WEIGHT_GRAD_TOKENS, itemsize=2):
    """Each configuration's byte model and predicted time at the 953M shapes and densities, and the
    dense baseline's, as rows."""
    from gem_kernels.backends.triton import sparse_weight_grad as _  # noqa: F401
    swg = sys.modules["gem_kernels.backends.triton.sparse_weight_grad"]
    rows = []
    for n_out, n_in in LLAMA_953M_SHAPES:
        dense = dense_weight_grad_model(tokens, n_out, n_in, itemsize, bandwidth=bandwidth)
        for density in WEIGHT_GRAD_DENSITIES:
            k = round(density * n_out * n_in)
            row = {"shape": f"{n_out}x{n_in}", "density": density, "k": k, "dense_ms": dense["predicted_ms"]}
            for name, config in swg.CONFIGS.items():
                splits = swg.choose_splits(config, k, tokens, sms)
                model = weight_grad_model(config, tokens, n_out, n_in, k, itemsize, splits, bandwidth)
                row[name] = {"splits": splits, **model}
            rows.append(row)
    return rows


def weight_grad_table(bandwidth=BANDWIDTH) -> str:
    """weight_grad_predictions as a markdown table: predicted µs and DRAM MB per configuration."""
    rows = weight_grad_predictions(bandwidth)
    names = [k for k in rows[0] if isinstance(rows[0][k], dict)]
    out = [f"DRAM at {bandwidth / 1e12:.1f} TB/s, L2→SM at {L2_BANDWIDTH / 1e12:.1f} TB/s, T = {WEIGHT_GRAD_TOKENS}, "
           f"bf16; dense at {DENSE_FLOPS / 1e12:.0f} TFLOP/s. Each cell: predicted µs = max(DRAM MB / DRAM rate, "
           "L2→SM MB / L2 rate), then (DRAM MB, L2→SM MB).", "",
           "| out x in | density | k | dense µs | " + " | ".join(names) + " |",
           "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{1e3 * r[n]['predicted_ms']:.0f} ({r[n]['dram_bytes'] / 1e6:.0f}, {r[n]['l2_bytes'] / 1e6:.0f})"
                 for n in names]
        out.append(f"| {r['shape'].replace('x', ' x ')} | {r['density']:g} | {r['k']:,} | {1e3 * r['dense_ms']:.0f} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def cuda_bench(fn) -> float:
    """Median ms of ``fn`` (triton.testing.do_bench, which clears the L2 between calls)."""
    import triton
    return triton.testing.do_bench(fn, return_mode="median")


def cpu_bench(fn, reps=3) -> float:
    """Median ms of ``fn`` on the host clock: the CPU dry run's stand-in for do_bench."""
    import statistics
    import time
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timings(device="cuda", total=TOTAL_ELEMENTS, count=NUM_SEGMENTS, bench=None):
    """Median times (ms; ``bench``, default do_bench) of each kernel and its torch baseline, over
    ``count`` tensors of ``total`` entries in all."""
    import torch

    import gem_kernels.backends.triton as tk

    bench = bench or cuda_bench
    sizes = segment_sizes(total, count)
    gen = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(n, device=device, generator=gen) for n in sizes]
    weights = [torch.randn(n, device=device, generator=gen) for n in sizes]
    ks = [max(1, int(n * DENSITY)) for n in sizes]
    eps = 1e-8

    def torch_stats():
        rows = []
        for g, w in zip(grads, weights):
            s = g.abs() / (w.abs() + eps)
            rows.append(torch.stack([s.sum(), (s * s).sum(), torch.where(s > 0, s * s.log(), 0).sum(), s.max()]))
        return torch.stack(rows)

    def torch_topk():
        return [torch.topk(g.abs() / (w.abs() + eps), k, sorted=False).indices for g, w, k in zip(grads, weights, ks)]

    indices, offsets = tk.ratio_topk(grads, weights, ks, True, eps, 1.0, None, None)
    n_sel = indices.numel()
    exp_avg = torch.zeros(n_sel, device=device)
    exp_avg_sq = torch.zeros(n_sel, device=device)
    params = [w.clone() for w in weights]
    steps = torch.full((len(params),), 10, dtype=torch.int64, device=device)

    def triton_adamw():
        tk.sparse_adamw_(params, grads, None, indices, offsets, [exp_avg, exp_avg_sq], 1e-4, 0.9, 0.999,
                         1e-8, 0.01, steps, None, False)

    dense = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(dense, grads):
        p.grad = g
    fused = torch.optim.AdamW(dense, lr=1e-4, fused=True)
    fused.step()  # creates the state

    results = {
        "layer_stats": {"triton_ms": bench(lambda: tk.layer_stats(grads, weights, eps)),
                        "torch_ms": bench(torch_stats),
                        "torch_baseline": "per-tensor torch expression of the four sums"},
        "ratio_topk": {"triton_ms": bench(lambda: tk.ratio_topk(grads, weights, ks, True, eps, 1.0, None, None)),
                       "torch_ms": bench(torch_topk),
                       "torch_baseline": "torch.topk on the torch-computed score, per tensor"},
        "sparse_adamw": {"triton_ms": bench(triton_adamw),
                         "torch_ms": bench(fused.step),
                         "torch_baseline": "torch.optim.AdamW(fused=True) over the whole tensors",
                         "selected": n_sel},
    }
    return results


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--all" in argv:  # the suite parses the rest (so `--all --help` is its help)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import gpu_suite
        return gpu_suite.main([a for a in argv if a != "--all"])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-only", action="store_true", help="print the byte model and stop")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH, help="bytes/s for the ideal times")
    parser.add_argument("--all", action="store_true",
                        help="run the whole GPU suite instead (benchmarks/gpu_suite.py; "
                             "`--all --help` lists its options)")
    args = parser.parse_args(argv)
    model = traffic_model(bandwidth=args.bandwidth)
    if args.model_only:
        print(json.dumps(model, indent=1))
        print("\nsparse_weight_grad, each configuration, at the 953M Llama's layer shapes:\n")
        print(weight_grad_table(args.bandwidth))
        return 0

    import torch
    import triton
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_check: unset TRITON_INTERPRET; this checks the compiled kernels", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; it needs a GPU (use --model-only for the byte model)",
              file=sys.stderr)
        return 2

    import triton_cases
    cases = triton_cases.run_all("cuda")
    device_name = torch.cuda.get_device_name()
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cases": cases,
        "cases_passed": all(r["ok"] for r in cases.values()),
        "model": model,
        "timings": timings(),
    }
    for name, t in report["timings"].items():
        ideal = model["kernels"][name]["ideal_ms"]
        t["ideal_ms"] = ideal
        t["fraction_of_ideal"] = ideal / t["triton_ms"]
        print(f"{name}: triton {t['triton_ms']:.3f} ms, torch {t['torch_ms']:.3f} ms, "
              f"ideal {ideal:.3f} ms at {args.bandwidth / 1e12:.1f} TB/s")
    out = ROOT / "benchmarks" / "results" / f"gpu_check-{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0 if report["cases_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
