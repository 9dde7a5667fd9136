"""The explicit layer on a 4-bit base: ``sparsify_(model, opt, quantize_base="nf4")`` stores each
converted layer's frozen base in NF4 (torchao), trains the same values at the same indices, and
exports a delta for the full-precision base."""
from __future__ import annotations

import copy
import sys

import pytest
import torch

import gem_kernels
from gem_kernels import GEM, SparseAdamW, merge_, sparsify_

pytest.importorskip("torchao.quantization")
from torchao.quantization import NF4Tensor  # noqa: E402

SIZE = 128  # 128 x 128 = 16384 entries: one NF4 scale block of 256 blocks of 64
BUDGET = 160


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(SIZE, SIZE), torch.nn.Tanh(), torch.nn.Linear(SIZE, SIZE))
    return model.to(dtype)


def _batch(step=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, SIZE, generator=g).to(dtype), torch.randn(16, SIZE, generator=g).to(dtype)


def _loss(model, step=0):
    x, y = _batch(step, model[0].bias.dtype)
    return torch.nn.functional.mse_loss(model(x), y)


def _selected(model):
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=BUDGET, selector=GEM(), calibration_steps=0)
    opt.calibrate(model, [0, 1], _loss)
    return opt


def _train(model, opt, steps=3):
    for step in range(steps):
        _loss(model, step).backward()
        opt.step()
        opt.zero_grad()


def test_the_base_is_nf4_and_the_selection_is_the_full_precision_one():
    full = _model()
    full_opt = _selected(full)
    quantized = _model()
    opt = _selected(quantized)
    before = {name: p.detach().clone() for name, p in quantized.named_parameters()}
    assert sparsify_(quantized, opt, quantize_base="nf4") == ["0", "2"]
    assert "base=nf4" in repr(quantized)
    for i in (0, 2):
        layer = quantized[i]
        assert isinstance(layer.weight, NF4Tensor) and not layer.weight.requires_grad
        # Selected on the full-precision weights, as the same optimizer without quantizing selects.
        assert torch.equal(layer.indices, full_opt.state[full[i].weight]["indices"])
        assert torch.equal(layer.original, before[f"{i}.weight"].reshape(-1)[layer.indices])
        inner = [getattr(layer.weight, name) for name in layer.weight.__tensor_flatten__()[0]]
        nf4_bytes = sum(t.numel() * t.element_size() for t in inner)
        assert nf4_bytes < 0.3 * SIZE * SIZE * 2  # under a third of a bf16 copy: 4 bits and the scales


def test_the_layer_equals_its_dequantized_base_plus_the_delta():
    model = _model()
    opt = _selected(model)
    sparsify_(model, opt, quantize_base="nf4")
    _train(model, opt, steps=2)
    layer = model[0]
    dense = layer.weight.get_original_weight().clone()
    dense.view(-1)[layer.indices] = layer.values.detach()
    plain = torch.nn.Linear(SIZE, SIZE)
    with torch.no_grad():
        plain.weight.copy_(dense)
        plain.bias.copy_(layer.bias)
    x, _ = _batch(5)
    x_layer, x_plain = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = layer(x_layer), plain(x_plain)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x_layer.grad, x_plain.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.values.grad, plain.weight.grad.reshape(-1)[layer.indices], rtol=1e-5, atol=1e-6)


def test_training_on_the_nf4_base_learns_and_merges():
    model = _model()
    opt = _selected(model)
    sparsify_(model, opt, quantize_base="nf4")
    first = _loss(model, 0).item()
    for _ in range(20):
        _train(model, opt, steps=1)
    assert _loss(model, 0).item() < first
    x, _ = _batch(7)
    before = model(x).detach()
    assert merge_(model) == ["0", "2"]
    assert type(model[0]) is torch.nn.Linear and model[0].weight.dtype == torch.float32
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_under_bf16_autocast():
    model = _model()
    opt = _selected(model)
    sparsify_(model, opt, quantize_base="nf4")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model)
    loss.backward()
    assert model[0].values.grad.dtype == torch.float32 and torch.isfinite(model[0].values.grad).all()


def test_the_delta_applies_to_the_full_precision_base(tmp_path):
    model = _model()
    opt = _selected(model)
    sparsify_(model, opt, quantize_base="nf4")
    _train(model, opt, steps=3)
    gem_kernels.save_delta(model, tmp_path / "d.safetensors", exclude_dense=True)
    base = _model()  # the full-precision model the 4-bit base was made from
    gem_kernels.apply_delta(base, tmp_path / "d.safetensors")
    for i in (0, 2):
        layer = model[i]
        assert torch.equal(base[i].weight.detach().reshape(-1)[layer.indices], layer.values.detach())
        untouched = torch.ones(SIZE * SIZE, dtype=torch.bool)
        untouched[layer.indices] = False
        pretrained = _model()[i].weight.detach().reshape(-1)
        assert torch.equal(base[i].weight.detach().reshape(-1)[untouched], pretrained[untouched])


# ---------------------------------------------------------------------------------------
# Bad input: one line naming the module, the model unchanged


def _snapshot(model):
    return [type(m) for m in model.modules()], copy.deepcopy({k: v for k, v in model.state_dict().items()})


def _unchanged(model, snapshot):
    types, state = snapshot
    assert [type(m) for m in model.modules()] == types

    def dense(t):
        return t.get_original_weight() if isinstance(t, NF4Tensor) else t
    for key, value in model.state_dict().items():
        assert type(value) is type(state[key]) and torch.equal(dense(value), dense(state[key]))


@pytest.mark.parametrize("case", ["embedding", "fp16", "size"])
def test_sparsify_refuses_what_cannot_be_nf4(case):
    torch.manual_seed(0)
    if case == "embedding":
        model = torch.nn.Sequential(torch.nn.Embedding(128, SIZE), torch.nn.Linear(SIZE, SIZE))
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=400, selector=gem_kernels.Random(0))
        match = "module '0' \\(Embedding\\)"
    elif case == "fp16":
        model = _model()
        opt = _selected(model)
        model.half()
        match = "module '0': its weight is torch.float16"
    else:
        model = torch.nn.Sequential(torch.nn.Linear(SIZE, 96), torch.nn.Tanh(), torch.nn.Linear(96, SIZE))
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=100, selector=gem_kernels.Random(0))
        match = "module '0': its weight has 12288 entries"
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        sparsify_(model, opt, quantize_base="nf4")
    assert "\n" not in str(info.value)
    _unchanged(model, snapshot)


def test_a_model_quantized_already_is_refused():
    from gem_kernels.nn import check_nf4_base
    model = _model()
    nf4 = torch.nn.Parameter(NF4Tensor.from_tensor(model[0].weight.detach(), 64, 256), requires_grad=False)
    with pytest.raises(ValueError, match="module '0': its weight is already quantized by torchao"):
        check_nf4_base("module '0'", nf4)
    model[0].weight = nf4  # torchao's quantize_ does this; the optimizer cannot train such a tensor
    with pytest.raises(TypeError, match="NF4Tensor") as info:
        SparseAdamW(model.parameters(), budget=BUDGET)
    assert "\n" not in str(info.value)


def test_a_bad_quantize_base_value_is_refused():
    model = _model()
    opt = _selected(model)
    with pytest.raises(ValueError, match="quantize_base must be None or 'nf4'"):
        sparsify_(model, opt, quantize_base="int4")


def test_merge_into_a_dtype_that_loses_the_delta_is_refused():
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-6, budget=BUDGET, selector=gem_kernels.Random(0))
    sparsify_(model, opt, quantize_base="nf4")
    _train(model, opt, steps=1)  # tiny steps: the changes are far below a bf16 ulp
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="would lose the delta of module '0'"):
        merge_(model, dtype=torch.bfloat16)
    _unchanged(model, snapshot)
    merge_(model, dtype=torch.float32)


def test_without_torchao_the_error_names_the_extra(monkeypatch):
    model = _model()
    opt = _selected(model)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    snapshot = _snapshot(model)
    with pytest.raises(ImportError, match=r"gem_kernels\[quant\]"):
        sparsify_(model, opt, quantize_base="nf4")
    _unchanged(model, snapshot)
