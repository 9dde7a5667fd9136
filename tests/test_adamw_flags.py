"""AdamW's flags (amsgrad, maximize) on every backend: SparseAdamW with every entry selected is
``torch.optim.AdamW`` with the same flags, step for step. The reference follows torch's CPU op
order and is bit-identical; the C++ kernel rounds its square root correctly where torch's
vectorised one may not, so it stays within one fp32 ulp per step (docs/ARCHITECTURE.md, "AdamW's
flags"). The Triton kernels are held to the same under TRITON_INTERPRET=1 (tests/triton_cases.py,
case ``adamw_density_one_vs_torch``)."""
import io

import pytest
import torch
from backend_kernels import adamw_density_one, backend_module, worst_relative_ulps

import gem_kernels
from gem_kernels import GEM, Random, SparseAdamW

FLAGS = [(a, m) for a in (False, True) for m in (False, True)]
STEPS = 5


@pytest.mark.parametrize("amsgrad, maximize", FLAGS)
def test_reference_is_torch_adamw_bit_for_bit(amsgrad, maximize):
    ours, torchs = adamw_density_one(backend_module("reference"), amsgrad=amsgrad, maximize=maximize, steps=STEPS)
    assert torch.equal(ours, torchs)


@pytest.mark.parametrize("amsgrad, maximize", FLAGS)
def test_cpu_kernel_is_torch_adamw_within_an_ulp_a_step(amsgrad, maximize):
    if "cpu" not in gem_kernels.live_backends():
        pytest.skip("gem_kernels._C is not built")
    ours, torchs = adamw_density_one(backend_module("cpu"), amsgrad=amsgrad, maximize=maximize, steps=STEPS)
    worst = worst_relative_ulps(ours, torchs)
    print(f"amsgrad={amsgrad} maximize={maximize}: worst {worst:.3g} ulps after {STEPS} steps")
    assert worst <= STEPS


def test_amsgrad_keeps_the_running_maximum_and_its_state_bytes():
    """The state per selected entry: indices (8 bytes), exp_avg and exp_avg_sq (4 each), original
    (the param's dtype), and with AMSGrad max_exp_avg_sq (4 more)."""
    sizes = {}
    for amsgrad in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=50, selector=Random(0), amsgrad=amsgrad)
        for step in range(4):
            x = torch.randn(8, 16) * (10.0 if step == 1 else 1.0)  # a large gradient once, then small ones
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        state = opt.state[model[0].weight]
        if amsgrad:
            assert bool((state["max_exp_avg_sq"] >= state["exp_avg_sq"]).all())
            assert bool((state["max_exp_avg_sq"] > state["exp_avg_sq"]).any())  # it remembers the large step
        sizes[amsgrad] = sum(t.numel() * t.element_size() for _, p in opt.sparse_params()
                             for k, t in opt.state[p].items() if k != "step")
    k = 50
    assert sizes == {False: k * (8 + 4 + 4 + 4), True: k * (8 + 4 + 4 + 4 + 4)}


@pytest.mark.parametrize("amsgrad", [False, True])
def test_amsgrad_checkpoint_resumes_bit_identically(amsgrad):
    def run(steps, resume_from=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = SparseAdamW(model.parameters(), lr=1e-2, budget=50, selector=GEM(), calibration_steps=1,
                          amsgrad=amsgrad)
        first = 0
        if resume_from is not None:
            model.load_state_dict(resume_from[0])
            opt.load_state_dict(resume_from[1])
            first = resume_from[2]
        for step in range(first, steps):
            g = torch.Generator().manual_seed(step)
            model(torch.randn(8, 16, generator=g)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return model, opt
    whole, _ = run(5)
    half, half_opt = run(3)
    buffer = io.BytesIO()
    torch.save((half.state_dict(), half_opt.state_dict(), 3), buffer)
    buffer.seek(0)
    resumed, _ = run(5, torch.load(buffer))
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_switching_amsgrad_after_the_selection_is_refused():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=50, selector=Random(0))
    for group in opt.param_groups:
        group["amsgrad"] = True
    model(torch.randn(8, 16)).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="amsgrad"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
