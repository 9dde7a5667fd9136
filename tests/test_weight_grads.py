"""Sparse weight gradients after the selection: the Linear/Conv1D weights SparseAdamW trains
get only their selected gradient entries from the sparse_weight_grad op, never a dense dW,
with the same results as the dense path (to fp32 rounding; bit-identical on the reference)."""
import copy

import pytest
import torch

from gem_kernels import SparseAdamW
from gem_kernels.selection import GEM, ID3, Random


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 12, generator=gen).to(dtype), torch.randint(0, 3, (4, 5), generator=gen))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float().reshape(-1, 3), y.reshape(-1))


def _run(sparse_weight_grads, selector=None, steps=5, dtype=torch.float32, scaler=None, **kwargs):
    model = _model(dtype=dtype)
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, calibration_steps=2,
                      selector=selector or GEM(), sparse_weight_grads=sparse_weight_grads, **kwargs)
    for batch in _batches(steps, dtype=dtype):
        loss = _loss(model, batch)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return model, opt


def _routed(module) -> bool:
    """Whether the module's class is the swapped one with the routed forward."""
    return "_routed_from" in type(module).__dict__


def _no_dense_weight_grad(model):
    """Counts dense gradients autograd computes for the weights (a tensor hook sees each)."""
    seen = []
    for m in (model[0], model[2]):
        m.weight.register_hook(lambda g: seen.append(g.shape) if g is not None else None)
    return seen


def test_modules_are_patched_in_training_only_and_no_dense_dw_is_made():
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, calibration_steps=2)
    dense_grads = _no_dense_weight_grad(model)
    batches = _batches(4)
    for i, batch in enumerate(batches):
        _loss(model, batch).backward()
        assert len(dense_grads) == (2 if i < 2 else 0), (i, dense_grads)  # calibration reads dense
        dense_grads.clear()
        opt.step()
        opt.zero_grad()
        routed = [_routed(m) for m in (model[0], model[2])]
        assert routed == ([False, False] if i == 0 else [True, True])
    opt.close()
    assert type(model[0]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_equals_the_dense_path(backend, force_backend):
    force_backend(backend)
    dense, _ = _run(False)
    sparse, _ = _run(True)
    for (name, a), b in zip(dense.named_parameters(), sparse.parameters()):
        if backend == "reference":  # chunked GEMMs of the dense product: the same bits on CPU
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_gradient_accumulation_and_grad_scaler():
    dense_model, _ = _run(False, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    model, _ = _run(True, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for a, b in zip(dense_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Two backward calls before one step sum the selected values.
    model = _model()
    opt = SparseAdamW(model.parameters(), budget=30, selector=Random(1))
    twin = copy.deepcopy(model)
    a, b = _batches(2)
    _loss(model, a).backward()  # first call after the selection: patched and recomputed
    _loss(model, b).backward()
    _loss(twin, a).backward()
    _loss(twin, b).backward()
    indices = opt.selected_entries()[model[0].weight][0]
    grad = model[0].weight.grad
    assert grad.is_sparse and grad._nnz() == indices.numel()
    torch.testing.assert_close(grad._values(), twin[0].weight.grad.reshape(-1)[indices], rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing():
    from torch.utils.checkpoint import checkpoint

    def run(sparse_weight_grads):
        model = _model()
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(3),
                          sparse_weight_grads=sparse_weight_grads)
        for x, y in _batches(3):
            out = checkpoint(model, x, use_reentrant=False)
            torch.nn.functional.cross_entropy(out.reshape(-1, 3), y.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        return model
    for a, b in zip(run(False).parameters(), run(True).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bf16_under_autocast_and_bf16_params():
    dense, _ = _run(False, dtype=torch.bfloat16)
    sparse, _ = _run(True, dtype=torch.bfloat16)
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=2e-2)

    def autocast_run(flag):
        model = _model()
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0), sparse_weight_grads=flag)
        for batch in _batches(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = _loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return model
    for a, b in zip(autocast_run(False).parameters(), autocast_run(True).parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_transformers_conv1d():
    from transformers.pytorch_utils import Conv1D

    def run(flag):
        torch.manual_seed(0)
        model = torch.nn.Sequential(Conv1D(24, 12), torch.nn.Tanh(), Conv1D(3, 24))
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=40, selector=Random(2), sparse_weight_grads=flag)
        for batch in _batches(3):
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        return model, opt
    dense, _ = run(False)
    sparse, opt = run(True)
    assert _routed(sparse[0])
    for a, b in zip(dense.parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_id3_patches_only_when_training_starts():
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, selector=ID3(total_steps=2))
    for i, batch in enumerate(_batches(3)):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        assert _routed(model[0]) == (opt.phase == "training"), i


@pytest.mark.parametrize("register", [True, False])
def test_checkpoint_into_a_fresh_optimizer_continues_like_the_uninterrupted_run(register):
    """The promise as the README states it: bit-identical when the fresh optimizer knows the
    modules (register_modules); without it the first step after the load computes the dense
    weight gradient (fp32 rounding off the uninterrupted run), and the modules are routed from
    the next step on."""
    batches = _batches(6)
    model = _model()
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.1, calibration_steps=2)
    for batch in batches[:3]:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for batch in batches[3:]:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()

    resumed = _model()
    resumed.load_state_dict(saved_model)
    fresh = SparseAdamW(resumed.parameters(), lr=1e-2, density=0.1, calibration_steps=2)
    if register:
        fresh.register_modules(resumed)
    fresh.load_state_dict(saved_opt)
    routed = []
    for batch in batches[3:]:
        routed.append(_routed(resumed[0]))
        _loss(resumed, batch).backward()
        assert resumed[0].weight.grad.is_sparse
        fresh.step()
        fresh.zero_grad()
    assert routed == [True, True, True] if register else [False, True, True]
    for a, b in zip(model.parameters(), resumed.parameters()):
        if register:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_flag_off_and_close_leave_modules_alone():
    model, opt = _run(False)
    assert not _routed(model[0])
    model, opt = _run(True)
    assert _routed(model[0])
    with pytest.warns(UserWarning, match="took over"):
        SparseAdamW(model.parameters(), budget=10, selector=Random(0), sparse_weight_grads=False)
    assert type(model[0]) is torch.nn.Linear and opt.closed
