"""The compiled CPU kernels (gem_kernels.backends.cpu / gem_kernels._C) against gem_kernels.reference."""
import pytest
import torch
from backend_kernels import Kernels, kernels_of

import gem_kernels
from gem_kernels import library, ops
from gem_kernels import reference as reference_module

reference = Kernels(reference_module)
cpu = Kernels(pytest.importorskip("gem_kernels.backends.cpu"))
if not cpu.available():
    pytest.skip("gem_kernels._C is not built (pip install -e .)", allow_module_level=True)
_C = cpu._C

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (7,), (4097,), (0,), (123, 431)]


def random_segments(shapes, dtype, seed, nonfinite=False):
    """(grads, weights), random and never zero; with nonfinite, some grads are NaN / ±inf."""
    gen = torch.Generator().manual_seed(seed)
    grads, weights = [], []
    for shape in shapes:
        g = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).add(0.01) * 3
        w = torch.randn(shape, generator=gen)
        if nonfinite and g.numel() > 3:
            flat = g.view(-1)
            flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)] = float("nan")
            flat[0], flat[-1] = float("inf"), -float("inf")
        grads.append(g.to(dtype))
        weights.append(w.to(dtype))
    return grads, weights


def random_index_set(numels, fraction, seed):
    """A random (indices, offsets) pair with about `fraction` (one, or one per segment) of each
    segment, sorted per segment."""
    gen = torch.Generator().manual_seed(seed)
    fractions = fraction if isinstance(fraction, list) else [fraction] * len(numels)
    parts = [torch.nonzero(torch.rand(n, generator=gen) < f).view(-1) for n, f in zip(numels, fractions)]
    offsets = torch.tensor([0] + [p.numel() for p in parts], dtype=torch.int64).cumsum(0)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64), offsets


def assert_same_selection(got, want):
    (gi, go), (wi, wo) = got, want
    assert torch.equal(go, wo), f"offsets differ: {go.tolist()[:10]} vs {wo.tolist()[:10]}"
    if not torch.equal(gi, wi):
        bad = int(torch.nonzero(gi != wi)[0])
        raise AssertionError(f"indices differ first at {bad}: {int(gi[bad])} vs {int(wi[bad])}")


# ---------------------------------------------------------------------------------------------
# Dispatch


def test_cpu_tensors_run_the_cpu_kernels_and_a_test_can_swap_them():
    assert "cpu" in gem_kernels.live_backends()
    assert library.registered_kernel("layer_stats", "cpu") is cpu.module.layer_stats
    calls = []

    class Counting:
        def layer_stats(self, *args):
            calls.append(args)
            return reference.module.layer_stats(*args)
    grads, weights = random_segments([(5,)], torch.float32, 0)
    with kernels_of(Counting()):
        ops.layer_stats(grads, weights)
    assert len(calls) == 1
    ops.layer_stats(grads, weights)  # the cpu kernels again
    assert len(calls) == 1 and library.registered_kernel("layer_stats", "cpu") is cpu.module.layer_stats


def test_bad_dtype_code_is_a_value_error():
    g = torch.ones(3)
    out = torch.empty(1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype code"):
        _C.layer_stats([g.data_ptr()], [9], [g.data_ptr()], [0], [3], 1e-8, 1.0, out.data_ptr(), 1)


# ---------------------------------------------------------------------------------------------
# layer_stats


def assert_stats_close(got, want):
    scale = want.abs().clamp_min(1.0)
    worst = float(((got - want).abs() / scale).nan_to_num(0.0).max()) if want.numel() else 0.0
    assert torch.equal(got.isnan(), want.isnan()), f"NaN pattern differs:\n{got}\n{want}"
    assert torch.equal(got.isinf(), want.isinf()), f"inf pattern differs:\n{got}\n{want}"
    assert worst < 1e-11, f"worst relative mismatch {worst:.3g}:\n{got}\n{want}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [1.0, 0.7])
def test_layer_stats_matches_reference(dtype, exponent):
    grads, weights = random_segments(SHAPES, dtype, seed=1)
    grads[2].view(-1)[::3] = 0  # exact zeros: 0 ln 0 counts as 0
    got = cpu.layer_stats(grads, weights, 1e-8, exponent)
    want = reference.layer_stats(grads, weights, 1e-8, exponent)
    assert_stats_close(got, want)
    assert torch.equal(got[3], torch.zeros(4, dtype=torch.float64))  # the empty segment


def test_layer_stats_nonfinite_grads_propagate_like_reference():
    grads, weights = random_segments(SHAPES, torch.float32, seed=2, nonfinite=True)
    assert_stats_close(cpu.layer_stats(grads, weights), reference.layer_stats(grads, weights))


def test_layer_stats_one_million_is_deterministic_across_thread_counts():
    grads, weights = random_segments([(1 << 20,), (3, 5)], torch.bfloat16, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = cpu.layer_stats(grads, weights)
        torch.set_num_threads(max(2, threads))
        multi = cpu.layer_stats(grads, weights)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)
    assert_stats_close(multi, reference.layer_stats(grads, weights))


# ---------------------------------------------------------------------------------------------
# ratio_topk


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_topk_per_segment_and_global_match_reference(dtype):
    grads, weights = random_segments(SHAPES, dtype, seed=4)
    numels = [w.numel() for w in weights]
    for k in ([1, 3, 100, 0, 5000], [0, 0, 0, 0, 0], numels, [1, 7, 0, 0, 1]):  # k = 0 and k = numel
        assert_same_selection(cpu.ratio_topk(grads, weights, k), reference.ratio_topk(grads, weights, k))
    for k in (0, 1, 2000, sum(numels) - 1, sum(numels)):
        assert_same_selection(cpu.ratio_topk(grads, weights, k), reference.ratio_topk(grads, weights, k))


@pytest.mark.parametrize("exponent", [0.5, 0.7, 2.0])
def test_ratio_topk_exponent(exponent):
    grads, weights = random_segments(SHAPES, torch.float32, seed=5)
    for k in ([1, 2, 500, 0, 3000], 777):
        assert_same_selection(cpu.ratio_topk(grads, weights, k, 1e-3, exponent),
                              reference.ratio_topk(grads, weights, k, 1e-3, exponent))


def test_ratio_topk_ties_go_to_smaller_segment_then_smaller_index():
    # Scores from a handful of values, some only one fp32 ulp apart: the threshold is decided in
    # the last radix digit and its ties must be split by position.
    gen = torch.Generator().manual_seed(6)
    values = torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(3)
    values = values + torch.tensor([0, 1, 2] * 3) * torch.finfo(torch.float32).eps * values
    grads = [values[torch.randint(0, 9, (n,), generator=gen)] for n in (7, 4097, 5000)]
    weights = [torch.ones(n) for n in (7, 4097, 5000)]  # 1 + 1e-8 rounds to 1: s = |g| exactly
    for k in ([3, 1000, 2500], 4000, 9000):
        want = reference.ratio_topk(grads, weights, k)
        assert_same_selection(cpu.ratio_topk(grads, weights, k), want)
    # The test can fail: at k=4000 the threshold score has more entries than it needs, so taking
    # the larger indices among ties would give another answer.
    scores = torch.cat(grads)
    threshold = scores.sort(descending=True).values[3999]
    assert int((scores > threshold).sum()) < 4000 < int((scores >= threshold).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_ratio_topk_nonfinite_grads_rank_last(dtype):
    grads, weights = random_segments(SHAPES, dtype, seed=7, nonfinite=True)
    numels = [w.numel() for w in weights]
    for k in (numels, [1, 6, 4090, 0, 40000], sum(numels) - 3):  # reaches into the non-finite ones
        assert_same_selection(cpu.ratio_topk(grads, weights, k), reference.ratio_topk(grads, weights, k))


def test_ratio_topk_exclude():
    grads, weights = random_segments(SHAPES, torch.float16, seed=8, nonfinite=True)
    numels = [w.numel() for w in weights]
    exclude = random_index_set(numels, 0.3, seed=9)
    available = [n - int(c) for n, c in zip(numels, exclude[1].diff())]
    for k in ([1, 2, 100, 0, 1000], available, sum(available), 500):
        got = cpu.ratio_topk(grads, weights, k, exclude=exclude)
        assert_same_selection(got, reference.ratio_topk(grads, weights, k, exclude=exclude))
    # Nothing excluded is chosen (here every available entry is).
    chosen, offsets = cpu.ratio_topk(grads, weights, available, exclude=exclude)
    for seg in range(len(numels)):
        ex = set(exclude[0][exclude[1][seg]:exclude[1][seg + 1]].tolist())
        assert not ex & set(chosen[offsets[seg]:offsets[seg + 1]].tolist())


def test_ratio_topk_one_million():
    grads, weights = random_segments([(1 << 20,), (4097,)], torch.float32, seed=10)
    for k in ([1000, 10], 1000, [1 << 20, 0]):
        assert_same_selection(cpu.ratio_topk(grads, weights, k), reference.ratio_topk(grads, weights, k))


def test_ratio_topk_candidate_path_ties_exclusions_nonfinite():
    # Small k over large segments: the compact candidate path (pass 2 collects the threshold
    # bucket). Scores come from 3000 values, so the threshold ties across chunks and segments,
    # and some entries are NaN / inf or excluded.
    gen = torch.Generator().manual_seed(12)
    values = torch.rand(3000, generator=gen) + 0.5
    sizes = (300000, 5, 200001)
    grads = [values[torch.randint(0, 3000, (n,), generator=gen)] for n in sizes]
    grads[0][::997] = float("nan")
    grads[2][::1009] = float("inf")
    weights = [torch.ones(n) for n in sizes]  # 1 + 1e-8 rounds to 1: s = |g| exactly
    exclude = random_index_set(list(sizes), 0.1, seed=13)
    for k in ([1000, 2, 999], [1, 0, 1], 2500, 1):
        for ex in (None, exclude):
            want = reference.ratio_topk(grads, weights, k, exclude=ex)
            assert_same_selection(cpu.ratio_topk(grads, weights, k, exclude=ex), want)
    keys = torch.cat(grads).nan_to_num(-1.0, -1.0)  # non-finite ranks last
    threshold = keys.sort(descending=True).values[2499]
    assert int((keys > threshold).sum()) < 2500 < int((keys >= threshold).sum())  # a real tie


def test_ratio_topk_passes_constant():
    assert cpu.RATIO_TOPK_PASSES == 2


def test_ratio_topk_writes_every_output_slot():
    grads, weights = random_segments(SHAPES, torch.float32, seed=11)
    k = [1, 7, 300, 0, 4000]
    indices = torch.full((sum(k),), -7, dtype=torch.int64)  # poison
    offsets = torch.full((len(k) + 1,), -7, dtype=torch.int64)
    _C.ratio_topk([g.data_ptr() for g in grads], [0] * 5, [w.data_ptr() for w in weights], [0] * 5,
                  [w.numel() for w in weights], k, True, 1e-8, 1.0, 0, 0, indices.data_ptr(),
                  offsets.data_ptr(), torch.get_num_threads())
    assert_same_selection((indices, offsets), reference.ratio_topk(grads, weights, k))


# ---------------------------------------------------------------------------------------------
# sparse_adamw_


def adamw_problem(dtype, seed, compact, step_kind):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]
    numels = [p.numel() for p in params]
    # Segments fully selected, partly selected, and empty.
    indices, offsets = random_index_set(numels, [1.0, 1.0, 0.2, 0.0, 0.2], seed + 1)
    n = indices.numel()
    if compact:
        grads = (torch.randn(n, generator=gen) * 0.1).to(dtype)
    else:
        grads = [(torch.randn(shape, generator=gen) * 0.1).to(dtype) for shape in SHAPES]
    exp_avg = torch.randn(n, generator=gen) * 0.01
    exp_avg_sq = torch.rand(n, generator=gen) * 1e-3 + 1e-6
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    if step_kind == "int":
        kwargs["step"] = 3
    elif step_kind == "tensor":
        kwargs["step"] = torch.tensor([1, 2, 5, 7, 11], dtype=torch.int64)
    else:
        kwargs["age"] = torch.randint(1, 30, (n,), generator=gen, dtype=getattr(torch, step_kind))
    return params, grads, indices, offsets, exp_avg, exp_avg_sq, kwargs


def clone_all(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    return [clone_all(t) for t in x]


def selected_mask(numel, indices):
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[indices] = True
    return mask


def assert_params_close(got, want, dtype):
    """Selected entries within one unit of the param dtype's last place (fp32 rounding of the
    fused lerp may differ from torch's), worst mismatch printed."""
    if got.numel() == 0:
        return
    got, want = got.double(), want.double()
    eps = torch.finfo(dtype).eps  # one ulp at 1; 2 eps relative bounds a one-ulp difference
    worst = float(((got - want).abs() / want.abs().clamp_min(1e-3)).max())
    assert worst <= 2 * eps + 1e-6, f"worst relative mismatch {worst:.3g} (dtype eps {eps:.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("step_kind", ["int", "tensor", "int32", "int64"])
def test_sparse_adamw_matches_reference(dtype, compact, step_kind):
    params, grads, indices, offsets, m, v, kw = adamw_problem(dtype, 12, compact, step_kind)
    for maximize in (False, True):
        ours = [clone_all(params), clone_all(grads), clone_all(m), clone_all(v)]
        theirs = [clone_all(params), clone_all(grads), clone_all(m), clone_all(v)]
        if not compact:  # unselected grads and params are never read: poison them in our copy
            for seg, (p, g) in enumerate(zip(ours[0], ours[1])):
                unselected = ~selected_mask(p.numel(), indices[offsets[seg]:offsets[seg + 1]])
                p.view(-1)[unselected] = float("nan")
                g.view(-1)[unselected] = float("nan")
        cpu.sparse_adamw_(ours[0], ours[1], indices, offsets, ours[2:], maximize=maximize, **kw)
        reference.sparse_adamw_(theirs[0], theirs[1], indices, offsets, theirs[2:], maximize=maximize, **kw)
        torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=1e-12)
        for seg, (p, want, before) in enumerate(zip(ours[0], theirs[0], params)):
            sel = selected_mask(p.numel(), indices[offsets[seg]:offsets[seg + 1]])
            assert_params_close(p.view(-1)[sel], want.view(-1)[sel], dtype)
            # Unselected entries still hold exactly the poison we wrote (or the original values).
            original = before.view(-1)[~sel]
            left = p.view(-1)[~sel]
            assert left.isnan().all() if not compact else torch.equal(left, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decay", [0.5, 0.75])
def test_sparse_adamw_rounds_to_nearest_even_like_torch(dtype, decay):
    # Every finite value of the dtype, scaled by the decay with no Adam step (zero grad and
    # state): the products land on many exact ties, and on fp16 subnormals.
    top = 0x7C00 if dtype == torch.float16 else 0x7F80
    bits = torch.arange(0, top, dtype=torch.int32)
    p = torch.cat([bits, bits | 0x8000]).to(torch.int16).view(dtype).clone()
    n = p.numel()
    indices, offsets = torch.arange(n), torch.tensor([0, n])
    ours, theirs = p.clone(), p.clone()
    kw = dict(lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=1.0 - decay, step=1)
    zeros = [torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=dtype)]
    cpu.sparse_adamw_([ours], zeros[2].clone(), indices, offsets, [zeros[0].clone(), zeros[1].clone()], **kw)
    reference.sparse_adamw_([theirs], zeros[2].clone(), indices, offsets, [zeros[0].clone(), zeros[1].clone()],
                            **kw)
    assert not torch.equal(theirs, p)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def test_sparse_adamw_twenty_steps_match_torch_adamw():
    gen = torch.Generator().manual_seed(13)
    shapes = [(123, 431), (4097,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    indices, offsets = random_index_set([p.numel() for p in params], 0.05, seed=14)
    masks = [selected_mask(p.numel(), indices[offsets[i]:offsets[i + 1]]).view(p.shape)
             for i, p in enumerate(params)]
    dense = [p.clone().requires_grad_(True) for p in params]
    kw = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(dense, **kw)
    ours = clone_all(params)
    m, v = torch.zeros(indices.numel()), torch.zeros(indices.numel())
    for step in range(1, 21):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for d, g, mask in zip(dense, grads, masks):
            d.grad = g * mask
        torch_opt.step()
        cpu.sparse_adamw_(ours, grads, indices, offsets, [m, v], step=step, **kw)
    for p, d, before, mask in zip(ours, dense, params, masks):
        torch.testing.assert_close(p[mask], d.detach()[mask], rtol=1e-5, atol=1e-6)
        assert torch.equal(p[~mask], before[~mask])
        assert not torch.equal(p[mask], before[mask])
