"""torch.compile against eager, across every phase: a compiled model with SparseAdamW, a
compiled training step that calls opt.step(), and opt.step itself compiled. step() is
excluded from tracing on purpose (torch.compiler.disable), so each phase change happens
eagerly and is never lost from a traced graph. The optimizer touches no module and no
gradient, so a compiled model's dense gradients are what eager autograd gives."""
import pytest
import torch

from gem_kernels import SparseAdamW
from gem_kernels.selectors import GEM, ID3

STEPS = 5
# inductor reorders fp32 sums inside the model's graph, so its weights differ from eager by
# rounding; aot_eager runs the same kernels and must agree exactly.
BACKENDS = {"aot_eager": 0.0, "inductor": 1e-5}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 12, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(STEPS)]


def _optimizer(model, kind):
    if kind == "gem":  # calibration for 2 steps, then training
        return SparseAdamW(model.parameters(), lr=1e-2, density=0.1, calibration_steps=2, selector=GEM())
    return SparseAdamW(model.parameters(), lr=1e-2, density=0.1, selector=ID3(total_steps=2))


def train_step(model, opt, batch):
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def _run(kind, how, backend="aot_eager"):
    torch._dynamo.reset()
    model = _model()
    opt = _optimizer(model, kind)
    step_fn = train_step
    if how == "model":
        model = torch.compile(model, backend=backend)
    elif how == "step":
        step_fn = torch.compile(train_step, backend=backend)
    elif how == "opt.step":
        opt.step = torch.compile(opt.step, backend=backend)
    phases = []
    for batch in _batches():
        step_fn(model, opt, batch)
        phases.append(opt.phase)
    return model, opt, phases


def _assert_close(eager, compiled, atol):
    for (name, a), b in zip(eager[0].named_parameters(), compiled[0].parameters()):
        assert torch.allclose(a, b, rtol=0, atol=atol), (name, (a - b).abs().max().item())
    ea, ca = eager[1].selected_entries(), compiled[1].selected_entries()
    for (ia, _), (ib, _) in zip(ea.values(), ca.values()):
        assert torch.equal(ia, ib)


@pytest.mark.parametrize("kind", ["gem", "id3"])
@pytest.mark.parametrize("how", ["model", "step", "opt.step"])
def test_compiled_matches_eager_across_phases(kind, how):
    eager = _run(kind, "eager")
    compiled = _run(kind, how)
    assert compiled[2] == eager[2]
    expected_first = "calibration" if kind == "gem" else "unmasking"
    assert eager[2][0] == expected_first and eager[2][-1] == "training"
    start = _model()
    moved = [not torch.equal(a, b) for a, b in zip(start.parameters(), compiled[0].parameters())]
    assert any(moved), "the compiled run trained nothing"
    _assert_close(eager, compiled, BACKENDS["aot_eager"])


def test_inductor_training_step_matches_eager():
    eager = _run("gem", "eager")
    compiled = _run("gem", "step", backend="inductor")
    assert compiled[2] == eager[2]
    _assert_close(eager, compiled, BACKENDS["inductor"])


@pytest.mark.parametrize("kind", ["gem", "id3"])
def test_graph_breaks_per_phase(kind):
    """In every phase a compiled training step is one graph (forward and loss); its only break
    is torch's own at loss.backward(). opt.step() is excluded from tracing
    (torch.compiler.disable) and runs eagerly, so it adds no graph and no break; the optimizer
    installs no module or gradient hook, so the first training step is one graph too."""
    model = _model()
    opt = _optimizer(model, kind)
    seen = {}
    for batch in _batches():
        phase = opt.phase
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(train_step)(model, opt, batch)  # runs the step for real
        reasons = sorted({str(r.reason).split("\n")[0] for r in explanation.break_reasons})
        assert reasons == ["Unsupported Tensor.backward() call"], reasons
        seen.setdefault(phase, []).append(explanation.graph_count)
    assert opt.phase == "training" and opt.selected_count() > 0
    assert set(seen) == {"calibration" if kind == "gem" else "unmasking", "training"}
    for phase, counts in seen.items():
        assert counts and set(counts) == {1}, (phase, counts)
