"""SparseAdamW under misuse: never half-applied, never silently wrong (issue: a second
optimizer on the same params, sparse COO gradients, DTensor params, a step or a checkpoint
load or an add_param_group that raises halfway)."""
import copy
import os

import pytest
import torch

import gem_kernels
from gem_kernels import SparseAdamW
from gem_kernels.selectors import GEM, ID3, Random


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


def test_two_optimizers_on_the_same_params_behave_like_two_adamws():
    """No take-over and no warning: each optimizer reads the same dense gradient and writes its
    own entries, as two torch AdamWs over the same params would each apply their update."""
    import warnings
    model = _mlp()
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = SparseAdamW(model.parameters(), lr=1e-2, budget=51, selector=Random(0))
        second = SparseAdamW(model.parameters(), lr=1e-2, budget=51, selector=Random(7))
    # The same two optimizers, one model each, give the same two updates.
    alone_first, alone_second = copy.deepcopy(model), copy.deepcopy(model)
    opt_first = SparseAdamW(alone_first.parameters(), lr=1e-2, budget=51, selector=Random(0))
    opt_second = SparseAdamW(alone_second.parameters(), lr=1e-2, budget=51, selector=Random(7))
    start = copy.deepcopy(model.state_dict())
    for m in (model, twin, alone_first, alone_second):
        _backward(m)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad.layout == torch.strided and torch.equal(p.grad, q.grad)  # autograd's, untouched
    entries_first, entries_second = first.selected_entries(), second.selected_entries()
    assert any(not torch.equal(entries_first[p][0], entries_second[p][0]) for p in entries_first)
    second.step()
    first.step()  # not closed: it trains too
    opt_first.step()
    opt_second.step()
    for name, p in model.named_parameters():
        if p.dim() < 2:  # a dense param gets both AdamW updates, as from two torch AdamWs
            continue
        in_first = torch.zeros(p.numel(), dtype=torch.bool)
        in_first[entries_first[p][0]] = True
        in_second = torch.zeros(p.numel(), dtype=torch.bool)
        in_second[entries_second[p][0]] = True
        flat, begin = p.detach().reshape(-1), start[name].reshape(-1)
        only_first, only_second, neither = in_first & ~in_second, in_second & ~in_first, ~(in_first | in_second)
        assert bool(only_first.any()) and bool(only_second.any())
        # Each optimizer wrote its own entries from the real gradient, as it would alone.
        assert torch.equal(flat[only_first], alone_first.state_dict()[name].reshape(-1)[only_first])
        assert torch.equal(flat[only_second], alone_second.state_dict()[name].reshape(-1)[only_second])
        assert not torch.equal(flat[only_first], begin[only_first])
        assert torch.equal(flat[neither], begin[neither])


def test_failed_construction_leaves_the_earlier_optimizer_working():
    model = _mlp()
    first = SparseAdamW(model.parameters(), lr=1e-2, budget=20, selector=Random(0))
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match="budget"):
        SparseAdamW(model.parameters(), budget=10**6, selector=Random(0))
    _backward(model)
    first.step()
    assert not torch.equal(model[0].weight, before)


# ---------------------------------------------------------------------------------------
# Sparse (COO) gradients: refused, as torch's AdamW refuses them


@pytest.mark.parametrize("selector, steps, target", [
    (GEM(), 0, "0.weight"),  # calibration (it reads the sparse params' gradients only)
    (GEM(), 1, "0.weight"),  # training
    (Random(0), 0, "0.weight"),  # training, selected at construction
    (ID3(total_steps=3), 0, "0.weight"),  # unmasking
    (ID3(total_steps=3), 0, "0.bias"),  # unmasking, a dense group
    (Random(0), 0, "0.bias"),  # training, a dense group
])
def test_sparse_coo_gradient_is_refused_and_changes_nothing(selector, steps, target):
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=20, selector=selector,
                      **({"calibration_steps": 1} if isinstance(selector, GEM) else {}))
    for seed in range(1, steps + 1):
        _backward(model, seed)
        opt.step()
        opt.zero_grad()
    _backward(model, 9)
    p = dict(model.named_parameters())[target]
    p.grad = p.grad.to_sparse()
    before = _snapshot(model, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert _same(before, _snapshot(model, opt))
    p.grad = p.grad.to_dense()  # the same gradient, dense: accepted
    opt.step()


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
