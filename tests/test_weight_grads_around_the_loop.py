"""What users do around the training loop while sparse weight gradients route their Linear
modules: copies, whole-model saves, explicit-input gradients, keyword calls, instance forwards
and accelerate hooks, weights reassigned or resized. Each either equals the dense path
(``sparse_weight_grads=False``) or raises an error naming the module."""
import copy
import io

import pytest
import torch
from test_weight_grads import _batches, _loss, _model, _routed

from gem_kernels import SparseAdamW
from gem_kernels.selection import Random


def _trained(sparse_weight_grads=True, steps=2, register=True):
    """A model after ``steps`` training steps (Random selects at construction), routed."""
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0),
                      sparse_weight_grads=sparse_weight_grads)
    if register:
        opt.register_modules(model)
    for batch in _batches(steps):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert _routed(model[0]) == bool(sparse_weight_grads)
    return model, opt


def test_a_deepcopy_computes_with_its_own_weights():
    model, opt = _trained()
    twin = copy.deepcopy(model)
    assert type(twin[0]) is torch.nn.Linear  # a copy is a plain module
    x = _batches(1, seed=5)[0][0]
    before = twin(x)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the live model moves; the copy must not
    torch.testing.assert_close(twin(x), before, rtol=0, atol=0)
    with torch.no_grad():
        twin[0].weight.zero_()  # the copy's own weight is what it computes with
    assert (twin(x) - before).abs().max() > 1e-3
    # The copy trains with its own weights and dense gradients, under any optimizer.
    _loss(twin, _batches(1)[0]).backward()
    assert twin[0].weight.grad is not None and not twin[0].weight.grad.is_sparse


def test_torch_save_of_the_whole_model_loads_as_plain_modules():
    model, opt = _trained()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[0]) is torch.nn.Linear and type(loaded[2]) is torch.nn.Linear
    x = _batches(1, seed=5)[0][0]
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert _routed(model[0])  # the live model keeps training sparsely


def _train_with(backward, sparse_weight_grads):
    model, opt = _trained(sparse_weight_grads)
    start = [p.detach().clone() for p in model.parameters()]
    for batch in _batches(3, seed=7):
        backward(model, _loss(model, batch))
        opt.step()
        opt.zero_grad()
    return model, start


@pytest.mark.parametrize("how", ["inputs=params", "inputs=weights"])
def test_backward_with_explicit_inputs_equals_the_dense_path(how):
    def backward(model, loss):
        inputs = list(model.parameters()) if how == "inputs=params" else [model[0].weight, model[2].weight]
        loss.backward(inputs=inputs)
    sparse, start = _train_with(backward, True)
    dense, _ = _train_with(backward, False)
    changed = int((sparse[0].weight != start[0]).sum())
    assert changed == int((dense[0].weight != start[0]).sum()) and changed > 0
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_autograd_grad_of_a_trained_weight_is_the_dense_gradient():
    sparse, sparse_opt = _trained(True)  # kept: a collected optimizer takes its routes and hooks along
    dense, dense_opt = _trained(False)
    batch = _batches(1, seed=9)[0]
    got = torch.autograd.grad(_loss(sparse, batch), [sparse[0].weight, sparse[2].bias])
    want = torch.autograd.grad(_loss(dense, batch), [dense[0].weight, dense[2].bias])
    for g, w in zip(got, want):
        assert not g.is_sparse
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    # Input gradients alone (a saliency map) leave the weights' gradients unset.
    x = batch[0].clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(sparse(x).sum(), [x])
    assert dx.shape == x.shape and sparse[0].weight.grad is None
    # And the usual backward still gives the sparse weight gradient afterwards.
    _loss(sparse, batch).backward()
    assert sparse[0].weight.grad.is_sparse


def test_keyword_calls():
    model, _ = _trained()
    x = _batches(1, seed=5)[0][0]
    torch.testing.assert_close(model[0](input=x), model[0](x), rtol=0, atol=0)
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    conv = torch.nn.Sequential(Conv1D(24, 12), torch.nn.Tanh(), Conv1D(3, 24))
    opt = SparseAdamW(conv.parameters(), lr=1e-2, budget=40, selector=Random(2))
    opt.register_modules(conv)
    _loss(conv, _batches(1)[0]).backward()
    opt.step()
    assert _routed(conv[0])
    torch.testing.assert_close(conv[0](x=x), conv[0](x), rtol=0, atol=0)


def _halve_by_instance_forward(module):
    """An instance forward as a user sets it: wraps the class's forward."""
    original = module.forward

    def forward(x):
        return original(x) * 0.5
    module.forward = forward


def _halve_by_accelerate_hook(module):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Halve(ModelHook):
        def post_forward(self, module, output):
            return output * 0.5
    add_hook_to_module(module, Halve())


@pytest.mark.parametrize("halve", [_halve_by_instance_forward, _halve_by_accelerate_hook])
@pytest.mark.parametrize("when", ["before", "after"])
def test_an_instance_forward_is_kept_used_and_never_removed(halve, when):
    """Set before the selection or between training steps: used, equal to the dense path, and
    still in place after close()."""
    def run(sparse_weight_grads):
        model = _model()
        if when == "before":
            halve(model[0])
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0),
                          sparse_weight_grads=sparse_weight_grads)
        for i, batch in enumerate(_batches(4)):
            if when == "after" and i == 2:
                halve(model[0])
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        return model, opt
    dense, _ = run(False)
    sparse, opt = run(True)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    instance_forward = sparse[0].__dict__["forward"]
    opt.close()
    assert sparse[0].__dict__["forward"] is instance_forward
    x = _batches(1, seed=5)[0][0]
    torch.testing.assert_close(sparse[0](x), torch.nn.functional.linear(x, sparse[0].weight, sparse[0].bias) * 0.5)


def test_a_weight_reassigned_after_the_selection_takes_the_dense_path():
    def run(sparse_weight_grads):
        model, opt = _trained(sparse_weight_grads)
        torch.manual_seed(3)
        model[0].weight = torch.nn.Parameter(torch.randn(24, 12))  # not the optimizer's param any more
        for batch in _batches(2, seed=7):
            _loss(model, batch).backward()
            assert not model[0].weight.grad.is_sparse and model[0].weight.grad.shape == (24, 12)
            opt.step()
            opt.zero_grad()
        return model
    for a, b in zip(run(False).parameters(), run(True).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("sparse_weight_grads", [True, False])
def test_a_weight_resized_in_place_raises_naming_the_module(sparse_weight_grads):
    model, opt = _trained(sparse_weight_grads)
    with torch.no_grad():
        model[2].weight.data = torch.randn(3, 24)[:, :5].contiguous()  # fewer entries than the indices need
    states = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match="had shape|had \\(3, 24\\)") as info:
        out = model[:2](x)
        torch.nn.functional.linear(out[:, :5], model[2].weight, model[2].bias).sum().backward()
        opt.step()
    if sparse_weight_grads:
        with pytest.raises(ValueError, match="Linear '2'.*\\(3, 5\\).*\\(3, 24\\)"):
            model(x)
    assert "resiz" in str(info.value)
    for a, b in zip(states, model.parameters()):
        assert torch.equal(a, b)


def test_the_policy_by_device():
    from gem_kernels.optim.weight_grads import sparse_weight_grad_pays
    assert sparse_weight_grad_pays(torch.device("cpu"))
    assert not sparse_weight_grad_pays(torch.device("cuda"))  # the dense product measured faster there
    assert sparse_weight_grad_pays(torch.device("cuda"), True)
    assert not sparse_weight_grad_pays(torch.device("cpu"), False)
    model = _model()
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="sparse_weight_grads must be"):
            SparseAdamW(model.parameters(), budget=10, selector=Random(0), sparse_weight_grads=bad)


def test_the_policy_decides_which_weights_are_routed(monkeypatch):
    """Where the policy says the sparse op does not pay (CUDA, by default), the module keeps
    torch's forward and the optimizer's hook keeps the selected entries of the dense dW."""
    from gem_kernels.optim import weight_grads
    monkeypatch.setattr(weight_grads, "sparse_weight_grad_pays", lambda device, policy="auto": False)
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0))
    opt.register_modules(model)
    for batch in _batches(2):
        _loss(model, batch).backward()
        assert model[0].weight.grad.is_sparse  # the gradient hook's COO tensor
        opt.step()
        opt.zero_grad()
    assert type(model[0]) is torch.nn.Linear and opt.phase == "training"
