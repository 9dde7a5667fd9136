"""state_dict → torch.save → torch.load → load_state_dict on a fresh optimizer over a fresh model
continues bit-identically in every phase, with bf16 params; wrong checkpoints are refused."""
import io

import pytest
import torch

from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM, ID3, GradMagnitude


def _mlp(seed, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).to(dtype)


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen).bfloat16(), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
        opt.zero_grad()


def _make(model, selector):
    kwargs = {} if isinstance(selector, ID3) else {"calibration_steps": 3}
    return SparseAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, budget=40, selector=selector, **kwargs)


def _round_trip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu")


@pytest.mark.parametrize("selector, before, phase", [
    (GEM(), 2, "calibration"),
    (GEM(), 5, "training"),
    (GradMagnitude(), 4, "training"),
    (ID3(total_steps=5), 2, "unmasking"),
    (ID3(total_steps=5), 6, "training"),
])
def test_round_trip_continues_bit_identically(selector, before, phase):
    batches = _batches(before + 4)
    model = _mlp(0)
    opt = _make(model, selector)
    _train(model, opt, batches[:before])
    assert opt.phase == phase
    saved = _round_trip(opt)
    fresh_model = _mlp(7)  # other weights, then the checkpoint's
    fresh_model.load_state_dict(model.state_dict())
    fresh = _make(fresh_model, type(selector)(**vars(selector)))
    fresh.load_state_dict(saved)
    assert fresh.phase == phase and fresh.selected_count() == opt.selected_count()
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        state_p, state_q = opt.state.get(p, {}), fresh.state.get(q, {})
        assert state_p.keys() == state_q.keys()
        for key in state_p:
            assert state_q[key].dtype == state_p[key].dtype, key  # int64 indices, fp32 moments
            assert torch.equal(state_p[key], state_q[key]), key
    _train(model, opt, batches[before:])
    _train(fresh_model, fresh, batches[before:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)
    for (ia, oa), (ib, ob) in zip(opt.selected_entries().values(), fresh.selected_entries().values()):
        assert torch.equal(ia, ib) and torch.equal(oa, ob)
    assert fresh.selection_report() == opt.selection_report()


def test_after_loading_a_training_checkpoint_grads_stay_dense_and_only_the_selection_trains():
    model = _mlp(0)
    opt = _make(model, GEM())
    _train(model, opt, _batches(3))
    assert opt.phase == "training"
    fresh_model = _mlp(0)
    fresh_model.load_state_dict(model.state_dict())
    twin = _mlp(0)
    twin.load_state_dict(model.state_dict())
    fresh = _make(fresh_model, GEM())
    fresh.load_state_dict(_round_trip(opt))
    start = {n: p.detach().clone() for n, p in fresh_model.named_parameters()}
    x, y = _batches(1, seed=5)[0]
    for m in (fresh_model, twin):
        torch.nn.functional.cross_entropy(m(x).float(), y).backward()
    for p, q in zip(fresh_model.parameters(), twin.parameters()):  # autograd's dense gradient
        assert p.grad.layout == torch.strided and torch.equal(p.grad, q.grad)
    fresh.step()
    for name, p in fresh_model.named_parameters():
        changed = torch.nonzero(p.detach().reshape(-1) != start[name].reshape(-1)).reshape(-1)
        assert changed.numel() > 0, name
        if p in fresh.state and "indices" in fresh.state[p]:
            assert bool(torch.isin(changed, fresh.state[p]["indices"]).all()), name


def test_checkpoint_from_another_model_is_refused():
    model = _mlp(0)
    opt = _make(model, GEM())
    _train(model, opt, _batches(4))
    saved = _round_trip(opt)
    torch.manual_seed(0)
    other = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)).bfloat16()
    other_opt = _make(other, GEM())
    with pytest.raises(ValueError, match="another model"):
        other_opt.load_state_dict(saved)
    assert other_opt.phase == "calibration" and len(other_opt.state) == 0


def test_checkpoint_with_other_groups_or_config_is_refused():
    model = _mlp(0)
    opt = _make(model, GEM())
    _train(model, opt, _batches(4))
    saved = _round_trip(opt)
    one_group = SparseAdamW([{"params": model.parameters(), "sparse": True}], budget=40, calibration_steps=3)
    with pytest.raises(ValueError, match="param groups"):
        one_group.load_state_dict(saved)
    other_budget = SparseAdamW(_mlp(0).parameters(), budget=41, calibration_steps=3)
    with pytest.raises(ValueError, match="budget"):
        other_budget.load_state_dict(saved)
    with pytest.raises(ValueError, match="not written by SparseAdamW"):
        other_budget.load_state_dict(torch.optim.AdamW(_mlp(0).parameters()).state_dict())
