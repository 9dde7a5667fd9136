"""The two modes, tried as users use them around a training loop.

* The drop-in path: ``SparseAdamW(model.parameters())`` changes no module and no gradient, so
  whatever works with ``torch.optim.AdamW`` works with it (freezing, clipping, hooks, peft,
  parametrizations, dtype casts, ``torch.func``, pickling, ``fullgraph`` compilation).
* The explicit layer: ``gem_kernels.sparsify_`` turns the selected ``nn.Linear`` modules into
  ``SparseDeltaLinear`` (a visible module), whose values any optimizer trains.

Each case behaves as with a plain ``nn.Linear`` under AdamW, or raises a clear error at the call.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
from gloo_harness import WORLD, spawn

import gem_kernels
from gem_kernels import GEM, ID3, Random, SparseAdamW, SparseDeltaLinear, merge_, sparsify_

BUDGET = 40


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6))


def _batch(step=0, rows=16):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(rows, 12, generator=g), torch.randn(rows, 6, generator=g)


def _loss(model, step=0):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def _selected(model, selector=None, **kwargs):
    """A SparseAdamW over ``model`` that has made its selection (GEM calibrated on two batches)."""
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=BUDGET, selector=selector or GEM(),
                      calibration_steps=0, **kwargs)
    if opt.phase == "calibration":
        opt.calibrate(model, [0, 1], _loss)
    return opt


def _train(model, opt, steps=3, first=0, clip=None):
    for step in range(first, first + steps):
        _loss(model, step).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()


def _changed(before, model) -> int:
    return sum(int((a != b).sum()) for a, b in zip(before, model.state_dict().values()))


# ---------------------------------------------------------------------------------------
# The drop-in path: torch's contract


def test_drop_in_changes_no_module_and_leaves_dense_grads():
    model = _model()
    opt = _selected(model)
    _loss(model).backward()
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    for p in model.parameters():
        assert p.grad.layout == torch.strided and p.grad.shape == p.shape
    opt.step()
    assert opt.selected_count() == BUDGET


def test_drop_in_freezing_a_weight_stops_its_training():
    model = _model()
    opt = _selected(model)
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    _train(model, opt)
    assert torch.equal(model[0].weight, before)
    assert opt.state[model[2].weight]["step"] == 3  # the other weight trained


def test_drop_in_clipping_measures_the_dense_gradient_as_adamw():
    model = _model()
    opt = _selected(model)
    _loss(model).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(clipped, torch.tensor(1e-3), rtol=1e-3, atol=0)
    opt.step()


def test_drop_in_param_hooks_see_the_dense_gradient():
    model = _model()
    opt = _selected(model)
    seen = []
    model[0].weight.register_hook(lambda g: seen.append(("hook", tuple(g.shape))))
    model[0].weight.register_post_accumulate_grad_hook(lambda p: seen.append(("post", tuple(p.grad.shape))))
    _train(model, opt, steps=1)
    assert seen == [("hook", (24, 12)), ("post", (24, 12))]


def test_drop_in_peft_lora_on_top_freezes_the_base():
    peft = pytest.importorskip("peft")
    model = _model()
    opt = _selected(model)
    before = [p.detach().clone() for p in model.parameters()]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        _loss(lora, step).backward()
        torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
        opt.step()
        lora_opt.step()
        opt.zero_grad()
        lora_opt.zero_grad()
    base = [lora.base_model.model[0].base_layer.weight, lora.base_model.model[2].base_layer.weight]
    assert torch.equal(base[0], before[0]) and torch.equal(base[1], before[2])


def test_drop_in_parametrizations_and_weight_norm():
    model = _model()
    opt = _selected(model)
    torch.nn.utils.parametrize.register_parametrization(model[0], "weight", _Scale())
    torch.nn.utils.parametrizations.weight_norm(model[2])
    original = model[0].parametrizations.weight.original  # the same tensor the optimizer trains
    before = original.detach().clone()
    _loss(model).backward()  # no recursion, no class of ours in the way
    opt.step()
    changed = (original != before).reshape(-1).nonzero().reshape(-1)
    assert 0 < changed.numel() and set(changed.tolist()) <= set(opt.state[original]["indices"].tolist())


class _Scale(torch.nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
def test_drop_in_dtype_cast_after_the_selection(cast):
    model = _model()
    opt = _selected(model)
    getattr(model, cast)()
    x, y = _batch()
    dtype = model[0].weight.dtype
    before = model[0].weight.detach().clone()
    torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
    opt.step()  # the kernels take bf16/fp16 params with fp32 moments
    changed = int((model[0].weight != before).sum())
    assert 0 < changed <= opt.state[model[0].weight]["indices"].numel()


def test_drop_in_torch_func_and_jit_trace():
    model = _model()
    _selected(model)
    x, _ = _batch()
    params = dict(model.named_parameters())
    out = torch.func.functional_call(model, params, (x,))
    torch.testing.assert_close(out, model(x))
    jac = torch.func.jacrev(lambda inp: model(inp))(x[:2])
    assert jac.shape == (2, 6, 2, 12)
    per_sample = torch.func.vmap(lambda row: model(row))(x)
    torch.testing.assert_close(per_sample, model(x))
    _, tangent = torch.func.jvp(lambda inp: model(inp), (x,), (torch.ones_like(x),))
    assert tangent.shape == (16, 6)
    traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))


def test_drop_in_model_pickles_with_weights_only():
    model = _model()
    opt = _selected(model)
    _train(model, opt, steps=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Linear, torch.nn.Tanh]):
        loaded = torch.load(buffer, weights_only=True)
    x, _ = _batch()
    torch.testing.assert_close(loaded(x), model(x))


def test_drop_in_compile_fullgraph_of_any_model_while_the_optimizer_lives():
    model = _model()
    opt = _selected(model, Random(0))  # selected at construction
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    compiled = torch.compile(other, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 4)
    torch.testing.assert_close(compiled(x), other(x))
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    _loss(compiled_model).backward()
    opt.step()


# ---------------------------------------------------------------------------------------
# The explicit layer


def _sparsified():
    """A model whose Linear layers sparsify_ converted, and the SparseAdamW that now trains them."""
    model = _model()
    opt = _selected(model)
    assert sparsify_(model, opt) == ["0", "2"]
    return model, opt


def test_sparsify_is_visible_and_trains_only_the_values():
    model, opt = _sparsified()
    assert isinstance(model[0], SparseDeltaLinear) and "trained_entries=" in repr(model)
    assert not model[0].weight.requires_grad and model[0].values.requires_grad
    assert model[0].values.numel() + model[2].values.numel() == BUDGET
    base = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    _train(model, opt)
    assert torch.equal(model[0].weight, base[0]) and torch.equal(model[2].weight, base[1])
    assert model[0].weight.grad is None
    merged = model[0].merged_weight()
    changed = (merged != base[0]).reshape(-1).nonzero().reshape(-1)
    assert 0 < changed.numel() and set(changed.tolist()) <= set(model[0].indices.tolist())


def test_the_layer_equals_the_drop_in_path():
    """Same selection, same optimizer: the layer's training ends where the drop-in path's does,
    to fp32 rounding (the values' gradient is summed in another order than the dense dYᵀX)."""
    drop_in = _model()
    opt = _selected(drop_in)
    _train(drop_in, opt, steps=4)
    layered, layered_opt = _sparsified()
    _train(layered, layered_opt, steps=4)
    x, _ = _batch(9)
    torch.testing.assert_close(layered(x), drop_in(x), rtol=1e-5, atol=1e-6)
    merge_(layered)
    changed = 0
    for a, b, start in zip(layered.parameters(), drop_in.parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        changed += int((b != start).sum())
    assert changed > BUDGET // 2  # the selected entries and the biases trained


def test_the_values_gradient_is_the_dense_gradient_at_the_indices():
    model, _ = _sparsified()
    twin = _model()
    _loss(model).backward()
    _loss(twin).backward()
    for layer, plain in ((model[0], twin[0]), (model[2], twin[2])):
        torch.testing.assert_close(layer.values.grad, plain.weight.grad.reshape(-1)[layer.indices],
                                   rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.bias.grad, plain.bias.grad)


def test_sparsify_hands_the_optimizer_its_moments():
    model = _model()
    opt = _selected(model)
    _train(model, opt, steps=2)  # trained on the drop-in path first
    state = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    trained = model[0].weight.detach().reshape(-1)[state["indices"]].clone()
    sparsify_(model, opt)
    moved = opt.state[model[0].values]
    torch.testing.assert_close(moved["exp_avg"], state["exp_avg"], rtol=0, atol=0)
    assert int(moved["step"]) == 2 and torch.equal(model[0].values.detach(), trained)
    assert torch.equal(model[0].weight.detach().reshape(-1)[state["indices"]], state["original"])
    _train(model, opt, steps=1, first=2)
    assert int(opt.state[model[0].values]["step"]) == 3


def test_torch_adamw_fused_trains_the_layer():
    model, opt = _sparsified()
    fused_model, _ = _sparsified()
    fused = torch.optim.AdamW([p for p in fused_model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    _train(fused_model, fused, steps=3)
    state_entries = sum(t.numel() for s in fused.state.values() for t in s.values() if t.dim())
    assert state_entries == 2 * (BUDGET + 24 + 6)  # two moments of the k values and of the biases
    _train(model, opt, steps=3)
    x, _ = _batch(9)
    torch.testing.assert_close(fused_model(x), model(x), rtol=1e-4, atol=1e-5)


def test_layer_freezing_the_values_stops_training():
    model, opt = _sparsified()
    model[0].values.requires_grad_(False)
    before = model[0].values.detach().clone()
    _train(model, opt)
    assert torch.equal(model[0].values, before)
    assert model[0].values.grad is None


def test_layer_clip_grad_norm():
    model, opt = _sparsified()
    _loss(model).backward()
    assert model[0].weight.grad is None  # the frozen base: no dense gradient to clip or keep
    expected = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()
                                                   if p.grad is not None]))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected)
    opt.step()


def test_layer_peft_lora_on_top_and_merge_and_unload():
    peft = pytest.importorskip("peft")
    model, _ = _sparsified()
    x, _ = _batch(3)
    expected = model(x).detach()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    assert not any(p.requires_grad for n, p in lora.named_parameters() if "lora_" not in n)
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    _train(lora, lora_opt, steps=2, clip=1.0)
    with_lora = lora(x).detach()
    assert not torch.allclose(with_lora, expected)
    merged = lora.merge_and_unload()
    assert isinstance(merged[0], SparseDeltaLinear)
    torch.testing.assert_close(merged(x), with_lora, rtol=1e-5, atol=1e-6)


def test_layer_deepcopy_and_weights_only_load():
    model, opt = _sparsified()
    _train(model, opt, steps=2)
    x, _ = _batch(4)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    with torch.no_grad():
        twin[0].values.zero_()
    assert not torch.equal(twin(x), model(x))  # the copy holds its own values
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([torch.nn.Sequential, torch.nn.Tanh, SparseDeltaLinear]):
        loaded = torch.load(buffer, weights_only=True)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_layer_state_dict_loads_into_a_rebuilt_layer():
    model, opt = _sparsified()
    _train(model, opt, steps=2)
    layer = model[0]
    rebuilt = SparseDeltaLinear(12, 24, torch.arange(layer.indices.numel()))
    rebuilt.load_state_dict(layer.state_dict())
    x, _ = _batch(4)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
    bad = dict(layer.state_dict(), indices=layer.indices.flip(0))
    with pytest.raises(ValueError, match="strictly ascending|ascending"):
        rebuilt.load_state_dict(bad)


def test_layer_to_bfloat16():
    model, _ = _sparsified()
    model.to(torch.bfloat16)
    assert model[0].values.dtype == torch.bfloat16 and model[0].indices.dtype == torch.int64
    x, y = _batch()
    torch.nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
    assert model[0].values.grad.dtype == torch.bfloat16


def test_layer_under_autocast_matches_linear_under_autocast():
    model, _ = _sparsified()
    plain = copy.deepcopy(model)
    merge_(plain)
    x, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = model(x), plain(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.float().sum().backward()
    assert model[0].values.grad.dtype == torch.float32


def test_layer_compile_fullgraph_against_eager():
    model, _ = _sparsified()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    _loss(model).backward()
    _loss(compiled).backward()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_layer_torch_func():
    """grad, vjp, jacrev and vmap as for nn.Linear; forward mode (jvp) is refused by torch, as the
    layer's autograd.Function has no jvp (Dynamo cannot trace one under fullgraph)."""
    model, _ = _sparsified()
    plain = copy.deepcopy(model)
    merge_(plain)
    x, y = _batch()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, (p, buffers), (x,)), y)
    grads = torch.func.grad(loss)(params)
    _loss(model).backward()
    torch.testing.assert_close(grads["0.values"], model[0].values.grad, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.vmap(model)(x), plain(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.func.jacrev(model)(x[:2]), torch.func.jacrev(plain)(x[:2]),
                               rtol=1e-5, atol=1e-6)
    out, pullback = torch.func.vjp(model, x)
    torch.testing.assert_close(pullback(torch.ones_like(out))[0], torch.func.vjp(plain, x)[1](torch.ones_like(out))[0],
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="jvp"):
        torch.func.jvp(model, (x,), (torch.ones_like(x),))


def test_layer_hooks_and_parametrizations():
    model, opt = _sparsified()
    seen = []
    model[0].values.register_hook(lambda g: seen.append(tuple(g.shape)))
    model[0].values.register_post_accumulate_grad_hook(lambda p: seen.append(("post", tuple(p.grad.shape))))
    torch.nn.utils.parametrize.register_parametrization(model[2], "weight", _Scale())
    x, _ = _batch()
    # The parametrized base (2 W0) with the values' change added at the selected entries.
    effective = 2 * model[2].parametrizations.weight.original.detach().clone()
    flat = effective.view(-1)
    flat[model[2].indices] += model[2].values.detach() - model[2].original
    torch.testing.assert_close(model[2].merged_weight(), effective, rtol=0, atol=0)
    expected = torch.nn.functional.linear(torch.tanh(model[0](x)), effective, model[2].bias)
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    _train(model, opt, steps=1)
    k = model[0].indices.numel()
    assert seen == [(k,), ("post", (k,))]


def test_merge_gives_the_same_outputs():
    model, opt = _sparsified()
    _train(model, opt, steps=3)
    x, _ = _batch(7)
    before = model(x).detach()
    assert merge_(model) == ["0", "2"]
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.Tanh, torch.nn.Linear]
    assert model[0].weight.requires_grad
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_save_delta_is_the_same_from_either_path(tmp_path):
    drop_in = _model()
    opt = _selected(drop_in)
    _train(drop_in, opt, steps=2)
    layered = _model()
    layered_opt = _selected(layered)
    _train(layered, layered_opt, steps=2)
    sparsify_(layered, layered_opt)  # after the same steps: the same values, now in the layers
    kwargs = dict(exclude_dense=True)
    gem_kernels.save_delta(drop_in, tmp_path / "a.safetensors", opt, **kwargs)
    gem_kernels.save_delta(layered, tmp_path / "b.safetensors", layered_opt, **kwargs)
    gem_kernels.save_delta(layered, tmp_path / "c.safetensors", **kwargs)  # the layers alone
    a = gem_kernels.delta.load_delta(tmp_path / "a.safetensors")
    for other in ("b", "c"):
        b = gem_kernels.delta.load_delta(tmp_path / f"{other}.safetensors")
        assert a.keys() == b.keys() == {"0.weight", "2.weight"}
        for name in a:
            for part in ("indices", "new", "original"):
                assert torch.equal(a[name][part], b[name][part])
    base = _model()
    gem_kernels.apply_delta(base, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="SparseDeltaLinear layers"):  # it would add to the trained values
        gem_kernels.apply_delta(layered, tmp_path / "c.safetensors")
    merge_(layered)
    assert torch.equal(base[0].weight, layered[0].weight) and torch.equal(base[2].weight, layered[2].weight)


def test_peft_export_from_the_layers(tmp_path):
    peft = pytest.importorskip("peft")
    model, opt = _sparsified()
    _train(model, opt, steps=2)
    gem_kernels.export_peft_supertuning(model, None, tmp_path, exclude_dense=True)
    loaded = peft.PeftModel.from_pretrained(_model(), tmp_path).merge_and_unload()
    merge_(model)
    assert torch.equal(loaded[0].weight, model[0].weight) and torch.equal(loaded[2].weight, model[2].weight)


def test_other_sparse_params_stay_on_the_drop_in_path():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 12), torch.nn.Linear(12, 6))
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=20, selector=Random(0))
    assert sparsify_(model, opt) == ["1"]
    before = model[0].weight.detach().clone()
    for step in range(2):
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
        opt.zero_grad()
    assert isinstance(model[0], torch.nn.Embedding)
    changed = (model[0].weight != before).reshape(-1).nonzero().reshape(-1)
    assert set(changed.tolist()) <= set(opt.state[model[0].weight]["indices"].tolist())


# ---------------------------------------------------------------------------------------
# sparsify_ and merge_ refuse, changing nothing


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), [type(m) for m in model.modules()],
            [list(g["params"]) for g in opt.param_groups])


@pytest.mark.parametrize("case", ["not selected", "id3", "torch adamw", "not a model", "not in the model",
                                  "shared weight"])
def test_sparsify_refuses_with_one_line(case):
    model = _model()
    if case == "not selected":
        opt, match = SparseAdamW(model.parameters(), budget=BUDGET), "calibration"
    elif case == "id3":
        opt, match = SparseAdamW(model.parameters(), budget=BUDGET, selector=ID3(total_steps=2)), "ID3"
    elif case == "torch adamw":
        opt, match = torch.optim.AdamW(model.parameters()), "SparseAdamW"
    else:
        opt = _selected(model)
        match = {"not a model": "torch.nn.Module", "not in the model": "no nn.Linear",
                 "shared weight": "shared by 2 modules"}[case]
    target = model
    if case == "not a model":
        target = [model]
    elif case == "not in the model":
        target = _model()
    elif case == "shared weight":
        model.add_module("tied", torch.nn.Linear(12, 24))
        model.tied.weight = model[0].weight
    before = _snapshot(model, opt)
    error = TypeError if case in ("torch adamw", "not a model") else ValueError
    with pytest.raises(error, match=match) as info:
        sparsify_(target, opt)
    assert "\n" not in str(info.value)
    after = _snapshot(model, opt)
    assert after[1] == before[1] and after[2] == before[2]
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key])


def test_layer_input_of_the_wrong_width_fails_like_linear():
    model, _ = _sparsified()
    with pytest.raises(RuntimeError):
        torch.nn.Linear(12, 24)(torch.randn(2, 13))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 13))


# ---------------------------------------------------------------------------------------
# Plain DDP over the layer: only the values (and the trained biases) travel


def _ddp_worker(rank, tmpdir):
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    opt = _selected(model)  # every rank calibrates on the same batches: the same selection
    sparsify_(model, opt)
    single = copy.deepcopy(model)
    single_opt = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-2)
    ddp_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ddp = DistributedDataParallel(model)
    sent = []

    def counting_allreduce(state, bucket):
        sent.append(bucket.buffer().numel())
        tensor = bucket.buffer().div_(WORLD)
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    ddp.register_comm_hook(None, counting_allreduce)
    for step in range(3):
        x, y = _batch(step, rows=8)
        half = slice(rank * 4, rank * 4 + 4)
        torch.nn.functional.mse_loss(ddp(x[half]), y[half]).backward()
        ddp_opt.step()
        ddp_opt.zero_grad()
        torch.nn.functional.mse_loss(single(x), y).backward()
        single_opt.step()
        single_opt.zero_grad()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(sent) == 3 * trainable == 3 * (BUDGET + 24 + 6)
    for a, b in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_plain_ddp_over_the_layer_reduces_only_the_values():
    spawn(_ddp_worker)


def test_the_layer_takes_the_weight_gradient_path_the_table_gives(monkeypatch):
    """CPU layers compute the selected entries with the sparse op; where the measured table says
    dense (a GPU, or one nobody measured), the backward takes dYᵀX and gathers: the same values."""
    from gem_kernels import nn as gnn
    from gem_kernels.weight_grad_dispatch import table, weight_grad_path
    assert weight_grad_path(torch.device("cpu"), torch.float32, 1e-3) == "sparse"
    assert table()["unmeasured"] == "dense"
    model, _ = _sparsified()
    _loss(model).backward()
    sparse = [model[i].values.grad.clone() for i in (0, 2)]
    model.zero_grad()
    paths = []
    monkeypatch.setattr(gnn, "weight_grad_path", lambda device, dtype, density: paths.append(density) or "dense")
    _loss(model).backward()
    assert paths and all(0 < d < 1 for d in paths)
    for i, want in zip((0, 2), sparse):
        torch.testing.assert_close(model[i].values.grad, want, rtol=1e-5, atol=1e-7)
