"""Selectors: GEM's allocation against a direct implementation of the rule, the baselines, ID³'s
schedule, and the same selection on every backend."""
import math

import pytest
import torch

from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM, ID3, GradMagnitude, Random, split_budget


def _hand_made_case():
    gen = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (4, 8), (10,)]
    grads = [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    grads[1][0, :3] = 0.0  # zero scores exercise 0·ln 0
    return grads, weights


def _direct_gem(grads, weights, budget):
    """GEM written out from docs/ARCHITECTURE.md ("The methods") with plain float64 tensor ops."""
    chosen = []
    scores = [(g.double().abs() / (w.double().abs() + 1e-8)).reshape(-1) for g, w in zip(grads, weights)]
    layer_scores = []
    for s in scores:
        p = s / s.sum()
        entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum()
        layer_scores.append(float(s.norm() * entropy))
    # n_l = floor(B · score_l / Σ score); a tensor asked for more than it has is filled and
    # the rest of the budget is split the same way over the other tensors.
    full, remaining = set(), budget
    while True:
        total = sum(sc for i, sc in enumerate(layer_scores) if i not in full)
        counts = [s.numel() if i in full else math.floor(remaining * sc / total)
                  for i, (s, sc) in enumerate(zip(scores, layer_scores))]
        over = [i for i, (n, s) in enumerate(zip(counts, scores)) if i not in full and n >= s.numel()]
        if not over:
            break
        full.update(over)
        remaining = budget - sum(scores[i].numel() for i in full)
    for s, n in zip(scores, counts):
        order = torch.sort(-s, stable=True).indices[:n]
        chosen.append(torch.sort(order).values)
    return counts, chosen, layer_scores


@pytest.mark.parametrize("budget", [7, 20, 41])  # 41: the 10-entry tensor is asked for 12
def test_gem_allocation_matches_direct_rule(budget):
    grads, weights = _hand_made_case()
    selection = GEM(rounding="floor").select(grads, weights, budget)
    counts, chosen, layer_scores = _direct_gem(grads, weights, budget)
    assert selection.offsets.diff().tolist() == counts
    off = selection.offsets.tolist()
    for i, expected in enumerate(chosen):
        assert torch.equal(selection.indices[off[i]:off[i + 1]], expected)
    assert selection.score == pytest.approx(layer_scores, rel=1e-5)


@pytest.mark.parametrize("budget", [7, 20, 41, 71])
def test_gem_gives_exactly_the_budget_by_largest_remainder(budget):
    # The paper's floors leave up to one entry per tensor unassigned; the default hands them to
    # the tensors with the largest fractional shares, so the count is exactly the budget.
    grads, weights = _hand_made_case()
    counts = GEM().select(grads, weights, budget).offsets.diff().tolist()
    floors, _, _ = _direct_gem(grads, weights, budget)
    assert sum(counts) == budget
    assert all(f <= c <= f + 1 for f, c in zip(floors, counts))
    assert split_budget([1.0, 1.0, 1.0], [10, 10, 10], 8) == [3, 3, 2]  # ties: the first tensor
    assert split_budget([1.0, 1.0, 1.0], [10, 10, 10], 8, rounding="floor") == [2, 2, 2]


def test_gem_uniform_allocation_gives_equal_density():
    grads, weights = _hand_made_case()
    selection = GEM(allocation="uniform", rounding="floor").select(grads, weights, 36)
    assert selection.offsets.diff().tolist() == [math.floor(36 * n / 72) for n in (30, 32, 10)]


def test_split_budget_clamps_and_redistributes():
    # Tensor 0 would get floor(100 * 0.9) = 90 but has 10 entries: the 80 left go to the others.
    assert split_budget([0.9, 0.05, 0.05], [10, 100, 100], 100) == [10, 45, 45]
    assert split_budget([1.0, 0.0], [5, 5], 3) == [3, 0]
    assert split_budget([1.0, 1.0], [2, 2], 10) == [2, 2]


def test_gem_rejects_all_zero_gradients():
    _, weights = _hand_made_case()
    with pytest.raises(ValueError, match="scores 0"):
        GEM().select([torch.zeros_like(w) for w in weights], weights, 5)


def test_grad_magnitude_is_global_top_abs_grad():
    grads, weights = _hand_made_case()
    selection = GradMagnitude().select(grads, weights, 15)
    flat = torch.cat([g.reshape(-1).abs() for g in grads])
    expected = torch.sort(torch.sort(-flat, stable=True).indices[:15]).values
    starts = torch.tensor([0, 30, 62])
    seg = torch.repeat_interleave(torch.arange(3), selection.offsets.diff())
    assert torch.equal(selection.indices + starts[seg], expected)


def test_random_is_reproducible_and_respects_budget():
    grads, weights = _hand_made_case()
    a = Random(seed=5).select(grads, weights, 20)
    b = Random(seed=5).select(grads, weights, 20)
    c = Random(seed=6).select(grads, weights, 20)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.offsets, b.offsets)
    assert int(a.offsets[-1]) == 20
    assert not (torch.equal(a.indices, c.indices) and torch.equal(a.offsets, c.offsets))


def test_id3_unmask_schedule():
    id3 = ID3(total_steps=4)
    assert [id3.unmask_count(t, 10) for t in range(1, 5)] == [3, 3, 2, 2]
    assert sum(id3.unmask_count(t, 3) for t in range(1, 5)) == 3
    assert id3.unmask_count(5, 10) == 0


@pytest.mark.parametrize("bad", [dict(eps=-1.0), dict(eps=float("nan")), dict(allocation="log")])
def test_gem_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        GEM(**bad)


def test_id3_rejects_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        ID3(0)
    with pytest.raises(TypeError, match="total_steps"):
        ID3(2.5)
    with pytest.raises(ValueError, match="exponent"):
        ID3(3, exponent=float("inf"))
    with pytest.raises(TypeError, match="seed"):
        Random(seed="a")


def _train_and_select(selector, steps, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3))
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=24, selector=selector, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(8, 10, generator=gen)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return [idx for idx, _ in opt.selected_entries().values()]


@pytest.mark.parametrize("make", [lambda: (GEM(), 3, {"calibration_steps": 2}),
                                  lambda: (GradMagnitude(), 3, {"calibration_steps": 2}),
                                  lambda: (ID3(total_steps=4), 5, {})])
def test_selection_identical_across_backends(use_backend, make):
    selector, steps, kwargs = make()
    default = _train_and_select(selector, steps, **kwargs)
    use_backend("reference")
    reference = _train_and_select(selector, steps, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(default, reference))
    total = sum(a.numel() for a in default)
    # GEM floors each tensor's share, so it may leave up to one entry per tensor unused.
    assert 24 - len(default) < total <= 24 if isinstance(selector, GEM) else total == 24
