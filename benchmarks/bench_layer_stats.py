"""layer_stats: our backends against the torch expression a user would write."""
import _common as C
import torch

from gem_kernels import reference


def torch_layer_stats(grads, weights, eps=C.EPS):
    """The statistics as plain torch ops: score, then four reductions per tensor."""
    rows = []
    for g, w in zip(grads, weights):
        s = g.float().abs() / (w.float().abs() + eps)
        rows.append(torch.stack([s.sum(), (s * s).sum(), torch.special.xlogy(s, s).sum(), s.max()]))
    return torch.stack(rows).double()


def assert_stats_close(got, want, rtol):
    # Σ s·ln s can sit near zero, so the absolute slack scales with each column's largest value.
    scale = want.abs().amax(dim=0, keepdim=True).clamp_min(1e-30)
    worst = ((got.cpu() - want.cpu()).abs() / (scale.cpu() * rtol)).max()
    assert worst <= 1.0, f"layer_stats off by {float(worst):.3g}x the tolerance\n{got}\n{want}"


def test_layer_stats_ours(benchmark, case, backend, backend_device, backend_name, rounds):
    grads, weights = C.segments(case, backend_device)
    out = C.timed(benchmark, lambda: backend.layer_stats(grads, weights, C.EPS, 1.0),
                  device=backend_device, rounds=rounds)
    C.describe(benchmark, op="layer_stats", case=case, device=backend_device, impl=backend_name,
               role="ours", bytes_moved=C.bytes_score_pass(grads, weights), baselines=["torch_expr"])
    want = reference.layer_stats(grads, weights, C.EPS, 1.0)
    assert_stats_close(out, want, rtol=1e-5)
    # The max is one fp32 score: it must be the very same number.
    assert torch.equal(out[:, 3].cpu(), want[:, 3].cpu())


def test_layer_stats_torch(benchmark, case, device, rounds):
    grads, weights = C.segments(case, device)
    out = C.timed(benchmark, lambda: torch_layer_stats(grads, weights),
                  device=device, rounds=rounds)
    C.describe(benchmark, op="layer_stats", case=case, device=device, impl="torch_expr",
               role="baseline", bytes_moved=C.bytes_score_pass(grads, weights))
    # fp32 sums: a looser tolerance, but the baseline must compute the same statistics.
    assert_stats_close(out, reference.layer_stats(grads, weights, C.EPS, 1.0), rtol=1e-4)
