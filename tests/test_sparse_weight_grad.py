"""sparse_weight_grad in every backend: the reference against dense-then-gather, the C++ kernel and
the Triton kernel (under TRITON_INTERPRET=1, in a subprocess, every configuration) against the
reference, a real transformers Conv1D and nn.Linear. The Triton kernel's compilation for sm_80 /
sm_90: tests/test_triton_compile.py.

Tolerance: inputs of any dtype are widened exactly and every backend sums in fp32, so one bound
serves all dtypes. A sum of T products, in any order, is within (T + 1) * 2^-24 * sum|dY * X| of
the exact value; two backends may each be that far off, so they may differ by twice that. (A
wrong index or a missed token moves an entry by about sum|dY * X| / sqrt(T), far above it.)

``python tests/test_sparse_weight_grad.py --interpret-json OUT`` runs the Triton cases and writes
one result per case; the interpreter test below runs it with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gem_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
U = 2.0 ** -24  # fp32 unit roundoff

# Cases: one (T, out, in) per segment, a dtype per segment and a density per segment (the share
# of W's entries selected; 0 gives a segment with no entries).
CASES = {
    "one": ([(1, 1, 1)], [torch.float32], [1.0]),
    "awkward": ([(37, 123, 431)], [torch.float32], [0.02]),
    "k0_and_t0": ([(5, 7, 3), (0, 6, 9), (4, 3, 8), (9, 11, 13)], [torch.float32] * 4, [0.5, 0.5, 0.0, 1.0]),
    "many_spans": ([(5000, 40, 24), (600, 31, 17)], [torch.float32] * 2, [0.3, 1.0]),
    "mixed_dtypes": ([(37, 123, 431), (64, 20, 30), (0, 4, 4), (130, 50, 9)],
                     [torch.bfloat16, torch.float16, torch.bfloat16, torch.float32], [0.01, 0.2, 0.5, 0.3]),
}
for _dt in DTYPES:  # every dtype on the awkward sizes, with a T = 0 and a k = 0 segment beside them
    CASES[f"awkward_{str(_dt)[6:]}"] = ([(37, 123, 431), (0, 5, 5), (50, 8, 8), (3, 2, 9)], [_dt] * 4,
                                        [0.02, 0.5, 0.0, 1.0])


def make_case(shapes, dtypes, densities, seed=0, integer=False):
    """X, dY (random normal, never zero) and sorted random indices per segment. With integer,
    X and dY are drawn from {-3, -2, -1, 1, 2, 3}: every product and every partial sum is then an
    integer below 2^24, exact in fp32 whatever the order, so every backend must give exactly the
    true sums, and a token or entry read wrongly shows, however long the sum."""
    gen = torch.Generator().manual_seed(seed)

    def draw(rows, cols):
        if not integer:
            return torch.randn(rows, cols, generator=gen)
        values = torch.tensor([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
        return values[torch.randint(0, 6, (rows, cols), generator=gen)]

    xs, dys, parts = [], [], []
    for (t, n_out, n_in), dtype, density in zip(shapes, dtypes, densities):
        xs.append(draw(t, n_in).to(dtype))
        dys.append(draw(t, n_out).to(dtype))
        k = round(density * n_out * n_in)
        parts.append(torch.randperm(n_out * n_in, generator=gen)[:k].sort().values)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor([p.numel() for p in parts], dtype=torch.int64).cumsum(0)
    return xs, dys, torch.cat(parts), offsets


def dense_then_gather(xs, dys, indices, offsets) -> torch.Tensor:
    """What autograd does today: the whole dW = dY^T X in fp32, then the selected entries."""
    parts = [(dy.float().T @ x.float()).reshape(-1)[indices[offsets[seg]:offsets[seg + 1]]]
             for seg, (x, dy) in enumerate(zip(xs, dys))]
    return torch.cat(parts) if parts else torch.zeros(0)


def tolerance(xs, dys, indices, offsets) -> torch.Tensor:
    """2 (T + 1) u sum_t |dY[t, o] X[t, i]| per entry, in fp64 (see the module docstring)."""
    tols = []
    for seg, (x, dy) in enumerate(zip(xs, dys)):
        idx = indices[offsets[seg]:offsets[seg + 1]]
        o, i = idx // x.shape[1], idx % x.shape[1]
        scale = (dy.double().abs()[:, o] * x.double().abs()[:, i]).sum(0)
        tols.append(2 * (x.shape[0] + 1) * U * scale)
    return torch.cat(tols) if tols else torch.zeros(0, dtype=torch.float64)


def compare(got, want, tol, what) -> str:
    """Raises AssertionError naming the worst entry unless every |got - want| <= tol; returns a
    one-line summary with the worst error and its share of the tolerance."""
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    if got.numel() == 0:
        return f"{what}: no entries"
    got, want = got.double().cpu(), want.double().cpu()
    err = (got - want).abs()
    err = torch.where(torch.isnan(got), torch.full_like(err, float("inf")), err)  # poison left behind
    share = err / tol.clamp_min(1e-300)
    worst = int(torch.argmax(share))
    summary = (f"{what}: worst |err| {float(err.max()):.3g}, worst err/tol {float(share[worst]):.3g} at entry "
               f"{worst} (got {float(got[worst])!r}, want {float(want[worst])!r}, tol {float(tol[worst]):.3g})")
    print(summary)
    assert bool((err <= tol).all()), summary
    return summary


def exact_sums(xs, dys, indices, offsets) -> torch.Tensor:
    """The selected entries in fp64, then rounded once: exact for integer cases."""
    parts = [(dy.double().T @ x.double()).reshape(-1)[indices[offsets[seg]:offsets[seg + 1]]]
             for seg, (x, dy) in enumerate(zip(xs, dys))]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)).float()


def assert_exact(got, want, what) -> str:
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    got = got.cpu()
    if not torch.equal(got, want):
        bad = int((got != want).nonzero()[0])
        raise AssertionError(f"{what}: entry {bad} is {float(got[bad])!r}, the exact sum is {float(want[bad])!r}")
    summary = f"{what}: all {got.numel()} entries exact"
    print(summary)
    return summary


def run_case(backend, name, seed=0):
    """The backend on a case against the reference (random data) and the exact sums (integers)."""
    shapes, dtypes, densities = CASES[name]
    xs, dys, idx, off = make_case(shapes, dtypes, densities, seed)
    got = backend.sparse_weight_grad(xs, dys, idx, off)
    want = reference.sparse_weight_grad(xs, dys, idx, off)
    summary = compare(got, want, tolerance(xs, dys, idx, off), f"{name} ({len(idx)} entries)")
    xs, dys, idx, off = make_case(shapes, dtypes, densities, seed, integer=True)
    return summary + "; " + assert_exact(backend.sparse_weight_grad(xs, dys, idx, off),
                                         exact_sums(xs, dys, idx, off), f"{name} on integers")


# ---------------------------------------------------------------------------------------------
# The reference


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("block", [None, 1000], ids=["default_blocks", "16_row_blocks"])
def test_reference_is_bit_identical_to_dense_then_gather(name, threads, block, monkeypatch):
    """On CPU, each block dY[:, r0:r0+R]^T @ X is the dense product's GEMM with fewer rows, and
    MKL's sgemm gives a row the same bits whatever the row count (from ~8 rows up: fewer take
    another kernel, hence blocks of >= 16 rows). 1000 elements per block forces 16-row blocks, so
    most segments take several, the last one moved up to stay inside dW."""
    if block is not None:
        monkeypatch.setattr(reference, "_WEIGHT_GRAD_BLOCK", block)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        xs, dys, idx, off = make_case(*CASES[name])
        got = reference.sparse_weight_grad(xs, dys, idx, off)
        want = dense_then_gather(xs, dys, idx, off)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if not torch.equal(got, want):
        bad = int((got != want).nonzero()[0])
        compare(got, want, tolerance(xs, dys, idx, off), name)  # how far, if within fp32 rounding
        pytest.fail(f"entry {bad} differs from dense-then-gather: {float(got[bad])!r} vs {float(want[bad])!r} "
                    "(this BLAS gives a row other bits when the row count changes)")


@pytest.mark.parametrize("name", list(CASES))
def test_reference_exact_on_integers(name):
    xs, dys, idx, off = make_case(*CASES[name], integer=True)
    assert_exact(reference.sparse_weight_grad(xs, dys, idx, off), exact_sums(xs, dys, idx, off), name)


def test_reference_never_forms_the_dense_gradient(monkeypatch):
    """A 4096 x 1024 layer: every product it forms has at most 2**20 // 1024 = 1024 rows."""
    shapes, dtypes, densities = [(8, 4096, 1024)], [torch.float32], [1e-3]
    xs, dys, idx, off = make_case(shapes, dtypes, densities)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(tuple(out.shape))
        return out
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    got = reference.sparse_weight_grad(xs, dys, idx, off)
    monkeypatch.undo()
    assert seen and max(rows for rows, _ in seen) == 1024, seen
    assert torch.equal(got, dense_then_gather(xs, dys, idx, off))


def test_reference_empty():
    xs, dys, idx, off = make_case([(3, 4, 5)], [torch.float32], [0.0])
    assert reference.sparse_weight_grad(xs, dys, idx, off).shape == (0,)
    assert reference.sparse_weight_grad([], [], torch.zeros(0, dtype=torch.int64),
                                        torch.zeros(1, dtype=torch.int64)).shape == (0,)


# ---------------------------------------------------------------------------------------------
# transformers' Conv1D and nn.Linear, through the public contract (no flag: roles swapped)


def _layer_grads(kind, t, n_in, n_out, dtype, seed=3):
    """A layer, an input X [2, t, n_in] and an upstream gradient; returns (X, dY, W.grad) with X
    and dY flattened to [2t, features], as a hook would see them."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "conv1d":
        pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
        layer = pytorch_utils.Conv1D(n_out, n_in)  # Conv1D(nf, nx): weight [nx, nf] = [in, out]
    else:
        layer = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    layer = layer.to(dtype)
    x = torch.randn(2, t, n_in, generator=gen).to(dtype)
    dy = torch.randn(2, t, n_out, generator=gen).to(dtype)
    layer(x).backward(dy)
    return x.reshape(-1, n_in), dy.reshape(-1, n_out), layer.weight.grad.float()


def _layer_case(kind, dtype):
    x, dy, grad = _layer_grads(kind, 19, 37, 23, dtype)
    gen = torch.Generator().manual_seed(5)
    idx = torch.randperm(grad.numel(), generator=gen)[:97].sort().values
    off = torch.tensor([0, idx.numel()])
    # Conv1D: W is [in, out], so dW = X^T dY is this op with inputs=dY, grad_outputs=X.
    inputs, grad_outputs = ([dy], [x]) if kind == "conv1d" else ([x], [dy])
    return inputs, grad_outputs, idx, off, grad.reshape(-1)[idx]


def _backends():
    from gem_kernels.backends import cpu
    return [reference] + ([cpu] if cpu.available() else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["conv1d", "linear"])
def test_layer_weight_grad(kind, dtype):
    inputs, grad_outputs, idx, off, autograd = _layer_case(kind, dtype)
    tol = tolerance(inputs, grad_outputs, idx, off)
    if dtype != torch.float32:
        # autograd's own dW is a bf16/fp16 tensor: rounded once more, half an ulp of its dtype.
        tol = tol + autograd.abs().double() * torch.finfo(dtype).eps
    for backend in _backends():
        got = backend.sparse_weight_grad(inputs, grad_outputs, idx, off)
        compare(got, autograd, tol, f"{kind} {backend.__name__}")


# ---------------------------------------------------------------------------------------------
# The C++ kernel


def _cpu():
    from gem_kernels.backends import cpu
    if not cpu.available():
        pytest.skip("gem_kernels._C is not built (pip install -e .)")
    if not hasattr(cpu._C, "sparse_weight_grad"):
        pytest.skip("gem_kernels._C predates sparse_weight_grad: rebuild (pip install -e .)")
    return cpu


def cpu_poisoned(xs, dys, idx, off, threads):
    """The C++ kernel into a NaN-filled buffer, so an entry it forgets to write stays NaN."""
    cpu = _cpu()
    out = torch.full((idx.numel(),), float("nan"))
    codes = cpu._C.dtype_codes
    cpu._C.sparse_weight_grad([x.data_ptr() for x in xs], [codes[str(x.dtype)[6:]] for x in xs],
                              [d.data_ptr() for d in dys], [codes[str(d.dtype)[6:]] for d in dys],
                              [x.shape[0] for x in xs], [x.shape[1] for x in xs], [d.shape[1] for d in dys],
                              idx.data_ptr(), off.data_ptr(), out.data_ptr(), threads)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_matches_reference_and_is_thread_count_independent(name):
    xs, dys, idx, off = make_case(*CASES[name])
    want = reference.sparse_weight_grad(xs, dys, idx, off)
    tol = tolerance(xs, dys, idx, off)
    one = cpu_poisoned(xs, dys, idx, off, 1)
    compare(one, want, tol, f"{name} cpu, 1 thread")
    compare(one, dense_then_gather(xs, dys, idx, off), tol, f"{name} cpu vs dense-then-gather")
    two = cpu_poisoned(xs, dys, idx, off, 2)
    assert torch.equal(one, two), "the bits depend on the thread count"
    xs, dys, idx, off = make_case(*CASES[name], integer=True)
    assert_exact(cpu_poisoned(xs, dys, idx, off, 2), exact_sums(xs, dys, idx, off), f"{name} cpu on integers")


def test_cpu_wrapper():
    cpu = _cpu()
    xs, dys, idx, off = make_case(*CASES["mixed_dtypes"])
    compare(cpu.sparse_weight_grad(xs, dys, idx, off), reference.sparse_weight_grad(xs, dys, idx, off),
            tolerance(xs, dys, idx, off), "cpu wrapper")
    empty = cpu.sparse_weight_grad(xs, dys, idx[:0], torch.zeros(len(xs) + 1, dtype=torch.int64))
    assert empty.shape == (0,)


def test_cpu_bad_dtype_code_is_a_value_error():
    cpu = _cpu()
    x = torch.ones(2, 2)
    idx, off, out = torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1]), torch.empty(1)
    with pytest.raises(ValueError, match="dtype code"):
        cpu._C.sparse_weight_grad([x.data_ptr()], [9], [x.data_ptr()], [0], [2], [2], [2], idx.data_ptr(),
                                  off.data_ptr(), out.data_ptr(), 1)


# ---------------------------------------------------------------------------------------------
# The Triton kernel: numerics under the interpreter (a fresh process: Triton picks interpreter or
# compiler when a kernel is decorated), every configuration of CONFIGS. Its compilation for sm_80 /
# sm_90, every configuration, without spills: tests/test_triton_compile.py.

# The configuration the op uses runs every case and both layer kinds; the others every case but the
# slow many_spans (T = 5000; the others reach several chunks too); the op's configuration runs two
# cases with forced T slices (several partial rows added by the host, and one slice).
SPLIT_CASES = {"many_spans_7_splits": ("many_spans", 7), "mixed_dtypes_1_split": ("mixed_dtypes", 1)}
# CONFIGS' names, the op's own first (no kernel import here: Triton must not be imported before
# TRITON_INTERPRET is set; interpreter_cases checks that these are CONFIGS).
CONFIG_NAMES = ("xt_e128_t32_w8", "xt_e64_t32_w4", "xt_e32_t64_w4", "both_e64_t32_w4", "gather_e32_t32_w4")


def _triton_module():
    import gem_kernels.backends.triton  # noqa: F401  (the package registers the op's kernel)
    return sys.modules["gem_kernels.backends.triton.sparse_weight_grad"]


def interpreter_case_names() -> list:
    """"config/case" for every configuration and case the interpreter run checks."""
    names = [f"{c}/{case}" for c in CONFIG_NAMES for case in CASES if c == CONFIG_NAMES[0] or case != "many_spans"]
    return names + [f"{CONFIG_NAMES[0]}/{case}" for case in ("conv1d", "linear", *SPLIT_CASES)]


class _Config:
    """A backend object whose sparse_weight_grad is one configuration with fixed T slices."""

    def __init__(self, module, config, splits=None):
        self.module, self.config, self.splits = module, config, splits

    def sparse_weight_grad(self, *args):
        return self.module.sparse_weight_grad_with(self.config, *args, splits=self.splits)


def _interpreter_case(module, config, case):
    if case in SPLIT_CASES:
        name, splits = SPLIT_CASES[case]
        return run_case(_Config(module, config, splits), name)
    if case in CASES:
        return run_case(_Config(module, config), case)
    inputs, grad_outputs, idx, off, autograd = _layer_case(case, torch.float32)
    got = module.sparse_weight_grad(inputs, grad_outputs, idx, off)  # the op's own entry point
    return compare(got, autograd, tolerance(inputs, grad_outputs, idx, off), f"{case} triton")


def interpreter_cases() -> dict:
    """Runs every interpreter case on the Triton backend; {"config/case": {ok, summary}}."""
    from gem_kernels.backends.triton import _common
    module = _triton_module()
    assert (tuple(module.CONFIGS), module.DEFAULT_CONFIG) == (CONFIG_NAMES, CONFIG_NAMES[0]), "update CONFIG_NAMES"
    _common.poison_outputs = True  # an entry the kernel forgets to write stays NaN
    results = {}
    for name in interpreter_case_names():
        config, case = name.split("/")
        try:
            results[name] = {"ok": True, "summary": _interpreter_case(module, config, case)}
        except Exception as error:  # reported per case by the test
            results[name] = {"ok": False, "summary": f"{type(error).__name__}: {error}"}
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("swg_interpret") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, __file__, "--interpret-json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"the interpreter run wrote no results (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", interpreter_case_names())
def test_triton_matches_reference_under_interpreter(interpreter_results, case):
    result = interpreter_results[case]
    print(result["summary"])
    assert result["ok"], result["summary"]


def test_triton_slices_and_defaults():
    """The host's choice of T slices: enough programs for the SMs, slices of whole chunks, bounded."""
    triton = pytest.importorskip("triton")  # noqa: F841
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("checked in the normal run")
    module = _triton_module()
    xt = module.CONFIGS["xt_e64_t32_w4"]
    assert module.choose_splits(xt, 11534, 4096, 132) == 3  # 181 blocks of 64 -> 3 slices fill 528 programs
    assert module.choose_splits(xt, 4194, 4096, 132) == 8  # 66 blocks
    assert module.choose_splits(xt, 115343, 4096, 132) == 1  # enough blocks already
    assert module.choose_splits(module.CONFIGS["xt_e128_t32_w8"], 11534, 4096, 132) == 6  # 91 blocks
    assert module.choose_splits(xt, 1, 4096, 132) == module.MAX_SPLITS
    assert module.choose_splits(xt, 1, 37, 132) == 1  # too few tokens for two slices
    assert module.DEFAULT_CONFIG in module.CONFIGS


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret-json":
        found = interpreter_cases()
        for case, result in found.items():
            print(("ok   " if result["ok"] else "FAIL ") + result["summary"])
        Path(sys.argv[2]).write_text(json.dumps(found))
        sys.exit(0 if all(r["ok"] for r in found.values()) else 1)
    sys.exit(f"usage: {sys.argv[0]} --interpret-json OUT")
