"""SparseAdamW under misuse: never half-applied, never silently wrong (issue: a second
optimizer on the same params, clipping uncoalesced grads, DTensor params, a step or a
checkpoint load or an add_param_group that raises halfway)."""
import copy
import os

import pytest
import torch

import gem_kernels
from gem_kernels import SparseAdamW
from gem_kernels.selection import GEM, ID3, Random


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def _backward(model, seed=1):
    x, y = _batch(seed)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---------------------------------------------------------------------------------------
# A second SparseAdamW on the same params


def test_second_optimizer_takes_over_and_trains_on_real_gradients():
    model = _mlp()
    twin = copy.deepcopy(model)
    first = SparseAdamW(model.parameters(), lr=1e-2, budget=51, selector=Random(0))
    scheduler = torch.optim.lr_scheduler.StepLR(first, 1)  # keeps the first one alive
    with pytest.warns(UserWarning, match="took over"):
        second = SparseAdamW(model.parameters(), lr=1e-2, budget=51, selector=Random(7))
    _backward(model)
    _backward(twin)
    for (p, (indices, _)), q in zip(second.selected_entries().items(), [twin[0].weight, twin[2].weight]):
        # Only the second optimizer's hook ran: the gradient holds the real values at its own
        # entries (the first one's hook would have left zeros at most of them).
        assert p.grad.is_sparse  # (the sparse_weight_grad op: equal to fp32 rounding)
        torch.testing.assert_close(p.grad.coalesce()._values(), q.grad.reshape(-1)[indices],
                                   rtol=1e-5, atol=1e-7)
    second.step()
    with pytest.raises(RuntimeError, match="closed"):
        first.step()
    assert scheduler.optimizer is first


def test_close_and_context_manager_free_the_params():
    model = _mlp()
    with SparseAdamW(model.parameters(), budget=20, selector=Random(0)) as opt:
        pass
    assert opt.closed
    _backward(model)
    assert not any(p.grad.is_sparse for p in model.parameters())  # no hook left behind
    with pytest.raises(RuntimeError, match="closed"):
        opt.step()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the closed one is not taken over: no warning
        SparseAdamW(model.parameters(), budget=20, selector=Random(0))


def test_failed_construction_leaves_the_earlier_optimizer_working():
    model = _mlp()
    first = SparseAdamW(model.parameters(), lr=1e-2, budget=20, selector=Random(0))
    with pytest.raises(ValueError, match="budget"):
        SparseAdamW(model.parameters(), budget=10**6, selector=Random(0))
    assert not first.closed
    _backward(model)
    first.step()


# ---------------------------------------------------------------------------------------
# Clipping


def test_clip_grad_norm_scales_an_uncoalesced_sparse_gradient():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), budget=20, selector=Random(0))
    w = model[0].weight
    indices = torch.tensor([[0, 0, 3], [1, 1, 2]])
    w.grad = torch.sparse_coo_tensor(indices, torch.tensor([3.0, 4.0, 0.0]), w.shape)  # duplicate (0, 1)
    assert not w.grad.is_coalesced()
    total = opt.clip_grad_norm_(1.0)
    assert total.item() == pytest.approx(7.0)  # (0, 1) holds 3 + 4
    assert w.grad.to_dense()[0, 1].item() == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------------------------
# Params the kernels cannot read


def test_dtensor_params_are_refused_before_any_pointer_is_read(tmp_path):
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, init_device_mesh
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/init")
    try:
        mesh = init_device_mesh("cpu", (1,))
        weight = torch.nn.Parameter(DTensor.from_local(torch.randn(8, 4), mesh, [Replicate()]))
        with pytest.raises(TypeError, match="DTensor"):
            SparseAdamW([weight, torch.nn.Parameter(torch.randn(8, 4))], budget=4, selector=Random(0))
        holder = torch.nn.Module()
        holder.weight = weight
        with pytest.raises(TypeError, match="DTensor"):  # a delta addresses whole tensors
            gem_kernels.apply_delta(holder, tmp_path / "none.safetensors")
    finally:
        dist.destroy_process_group()


def test_meta_params_are_refused():
    with pytest.raises(TypeError, match="meta"):
        SparseAdamW([torch.nn.Parameter(torch.empty(4, 4, device="meta"))], budget=2, selector=Random(0))


# ---------------------------------------------------------------------------------------
# A step that raises changes nothing


@pytest.mark.parametrize("selector", [GEM(), ID3(total_steps=3)])
def test_step_with_a_non_contiguous_param_changes_nothing(selector):
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, selector=selector,
                      **({"calibration_steps": 1} if isinstance(selector, GEM) else {}))
    _backward(model)
    opt.step()
    opt.zero_grad()
    _backward(model, seed=2)
    w = model[2].weight
    w.data = w.data.t().contiguous().t()  # same values and shape, no longer contiguous
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="not contiguous"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


def test_step_with_wrong_dtype_moments_changes_nothing():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0))
    _backward(model)
    model[0].weight.grad = None  # a subset call: the moments are gathered per param
    p = model[2].weight
    opt.state[p]["exp_avg"] = opt.state[p]["exp_avg"].double()
    before = _snapshot(model, opt)
    with pytest.raises(TypeError, match="exp_avg"):
        opt.step()
    assert _same(before, _snapshot(model, opt))


# ---------------------------------------------------------------------------------------
# load_state_dict checks the whole checkpoint first


def _trained(selector=None):
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=selector or Random(0))
    for seed in (1, 2):
        _backward(model, seed)
        opt.step()
        opt.zero_grad()
    return model, opt


def _corrupt(kind, sd):
    sparse_id = sd["param_groups"][0]["params"][0]
    if kind == "missing param state":
        del sd["state"][sparse_id]
    elif kind == "missing meta key":
        del sd["sparse_adamw"]["phase"]
    elif kind == "float64 moments":
        sd["state"][sparse_id]["exp_avg"] = sd["state"][sparse_id]["exp_avg"].double()
    elif kind == "negative step":
        sd["state"][sparse_id]["step"] = torch.tensor(-3)
    elif kind == "NaN lr":
        sd["param_groups"][1]["lr"] = float("nan")
    elif kind == "indices out of range":
        sd["state"][sparse_id]["indices"] = sd["state"][sparse_id]["indices"] + 10**6
    elif kind == "dense moments of another shape":
        dense_id = sd["param_groups"][1]["params"][0]
        sd["state"][dense_id]["exp_avg"] = torch.zeros(5)
    return sd


@pytest.mark.parametrize("kind", ["missing param state", "missing meta key", "float64 moments",
                                  "negative step", "NaN lr", "indices out of range",
                                  "dense moments of another shape"])
def test_bad_checkpoint_is_refused_before_anything_changes(kind):
    model, opt = _trained()
    sd = _corrupt(kind, copy.deepcopy(opt.state_dict()))
    before = _snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert _same(before, _snapshot(model, opt))
    _backward(model, 5)
    opt.step()  # still a working optimizer


# ---------------------------------------------------------------------------------------
# add_param_group adds all or nothing


def test_add_param_group_whose_dense_half_fails_adds_nothing():
    model = _mlp()
    extra = torch.nn.Linear(4, 4)
    opt = SparseAdamW([model[0].weight, model[0].bias], budget=10, calibration_steps=1)
    groups = len(opt.param_groups)
    # The sparse half (extra.weight) is fine; the dense half holds a param the optimizer
    # already has, which torch refuses.
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra.weight, model[0].bias]})
    assert len(opt.param_groups) == groups
    assert all(p is not extra.weight for g in opt.param_groups for p in g["params"])
