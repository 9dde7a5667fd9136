"""The reference ops against independent statements of their contracts (docs/ARCHITECTURE.md, "The ops")."""
import math

import pytest
import torch
from backend_kernels import Kernels

from gem_kernels import reference as reference_module

reference = Kernels(reference_module)  # the reference's kernels, called with the public ops' arguments


def _brute_topk(grads, weights, k, eps=1e-8, exponent=1.0, exclude=None):
    """Top-k by Python sorting of (rank, segment, index) tuples: the contract, written naively."""
    entries = []
    for seg, (g, w) in enumerate(zip(grads, weights)):
        s = reference.ratio_score(g, w, eps, exponent).tolist()
        banned = set()
        if exclude is not None:
            banned = set(exclude[0][int(exclude[1][seg]):int(exclude[1][seg + 1])].tolist())
        for i, v in enumerate(s):
            if i not in banned:
                entries.append(((v if math.isfinite(v) else -1.0), seg, i))
    chosen = []
    if isinstance(k, int):
        chosen = sorted(entries, key=lambda e: (-e[0], e[1], e[2]))[:k]
    else:
        for seg, kk in enumerate(k):
            mine = [e for e in entries if e[1] == seg]
            chosen += sorted(mine, key=lambda e: (-e[0], e[2]))[:kk]
    per_seg = [sorted(e[2] for e in chosen if e[1] == seg) for seg in range(len(grads))]
    offsets = [0]
    for lst in per_seg:
        offsets.append(offsets[-1] + len(lst))
    return [i for lst in per_seg for i in lst], offsets


def _case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (0,), (13, 5), (1,)]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads[2].view(-1)[:10] = 0.5  # ties
    weights[2].view(-1)[:10] = 1.0
    grads[0][3] = float("nan")
    grads[2].view(-1)[20] = float("inf")
    return grads, weights


@pytest.mark.parametrize("k", [[3, 0, 12, 1], [0, 0, 0, 0], [7, 0, 65, 1], 0, 9, 73])
def test_ratio_topk_matches_brute_force(k):
    grads, weights = _case()
    idx, off = reference.ratio_topk(grads, weights, k)
    want_idx, want_off = _brute_topk(grads, weights, k)
    assert idx.tolist() == want_idx
    assert off.tolist() == want_off


def test_ratio_topk_exclude_and_exponent():
    grads, weights = _case(1)
    exclude = (torch.tensor([0, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=torch.int64),
               torch.tensor([0, 2, 2, 12, 12], dtype=torch.int64))
    for k in ([2, 0, 20, 1], 15):
        idx, off = reference.ratio_topk(grads, weights, k, eps=1e-3, exponent=0.5, exclude=exclude)
        want = _brute_topk(grads, weights, k, eps=1e-3, exponent=0.5, exclude=exclude)
        assert (idx.tolist(), off.tolist()) == want
        chosen = set(idx[off[2]:off[3]].tolist())
        assert not chosen & set(range(10))


def test_layer_stats_and_entropy_match_definitions():
    grads, weights = _case(2)
    grads = [torch.where(torch.isfinite(g), g, torch.ones_like(g)) for g in grads]
    stats = reference.layer_stats(grads, weights, eps=1e-8)
    for row, g, w in zip(stats, grads, weights):
        s = [abs(a) / (abs(b) + 1e-8) for a, b in zip(g.view(-1).double().tolist(), w.view(-1).tolist())]
        if not s:
            assert row.tolist() == [0.0, 0.0, 0.0, 0.0]
            continue
        assert row[0].item() == pytest.approx(sum(s), rel=1e-6)
        assert row[1].item() == pytest.approx(sum(x * x for x in s), rel=1e-6)
        assert row[2].item() == pytest.approx(sum(x * math.log(x) for x in s if x > 0), rel=1e-5, abs=1e-6)
        assert row[3].item() == pytest.approx(max(s), rel=1e-6)
        total = sum(s)
        entropy = -sum((x / total) * math.log(x / total) for x in s if x > 0)
        assert reference.entropy_from_stats(row[None])[0].item() == pytest.approx(entropy, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("compact", [False, True])
def test_sparse_adamw_equals_torch_adamw_on_selected_entries(maximize, compact):
    torch.manual_seed(0)
    shapes = [(40, 30), (17,)]
    params = [torch.randn(s) for s in shapes]
    originals = [p.clone() for p in params]
    twins = [torch.nn.Parameter(p.clone()) for p in params]
    idx = [torch.tensor([0, 5, 599, 1199]), torch.tensor([16])]
    indices, offsets = torch.cat(idx), torch.tensor([0, 4, 5])
    exp_avg, exp_avg_sq = torch.zeros(5), torch.zeros(5)
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, maximize=maximize)
    torch_opt = torch.optim.AdamW(twins, foreach=False, **hyper)
    for step in range(1, 21):
        grads = [torch.randn(s) for s in shapes]
        g_in = torch.cat([g.view(-1)[i] for g, i in zip(grads, idx)]) if compact else grads
        reference.sparse_adamw_(params, g_in, indices, offsets, [exp_avg, exp_avg_sq], step=step, **hyper)
        for t, g, i in zip(twins, grads, idx):
            masked = torch.zeros_like(g)
            masked.view(-1)[i] = g.view(-1)[i]
            t.grad = masked
        torch_opt.step()
    for p, t, o, i in zip(params, twins, originals, idx):
        assert torch.equal(p.view(-1)[i], t.detach().view(-1)[i])  # same fp32 ops, same order
        untouched = torch.ones(p.numel(), dtype=torch.bool)
        untouched[i] = False
        assert torch.equal(p.view(-1)[untouched], o.view(-1)[untouched])
        assert not torch.equal(p.view(-1)[i], o.view(-1)[i])


def test_sparse_adamw_age_equals_step_when_uniform():
    torch.manual_seed(1)
    params_a = [torch.randn(50)]
    params_b = [params_a[0].clone()]
    indices, offsets = torch.tensor([1, 7, 30]), torch.tensor([0, 3])
    state_a = [torch.zeros(3), torch.zeros(3)]
    state_b = [torch.zeros(3), torch.zeros(3)]
    for step in range(1, 6):
        g = [torch.randn(50)]
        reference.sparse_adamw_(params_a, g, indices, offsets, state_a, lr=1e-2, step=step)
        reference.sparse_adamw_(params_b, g, indices, offsets, state_b, lr=1e-2,
                                age=torch.full((3,), step, dtype=torch.int64))
    assert torch.allclose(params_a[0], params_b[0], rtol=0, atol=1e-7)
