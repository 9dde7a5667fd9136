"""sparse_adamw_: our backends against the reference (index ops in torch) and against
torch.optim.AdamW stepping the whole tensors (foreach, and fused where the device has it)."""
import _common as C
import pytest
import torch

from gem_kernels import reference


class SparseStepState:
    """Params, dense grads, an index set and compact moments; reset() restores the start so
    every timed round does the same step from the same state.

    ``cache="cold"`` restores the whole params, which evicts the caches as a backward pass over
    a large model does: every scattered entry is then a trip to memory. ``cache="warm"``
    restores only the selected entries, which stay cached: the kernel's own speed.
    """

    def __init__(self, case, density, device):
        grads, weights = C.segments(case, device)
        self.grads = grads
        self.start_params = weights
        self.params = [w.clone() for w in weights]
        self.indices, self.offsets = C.random_index_set(case, density, device)
        gen = torch.Generator().manual_seed(7)
        k = self.indices.numel()
        self.start_m = (torch.randn(k, generator=gen) * 1e-4).to(device)
        self.start_v = (torch.rand(k, generator=gen) * 1e-6).to(device)
        self.exp_avg, self.exp_avg_sq = self.start_m.clone(), self.start_v.clone()
        self.steps = torch.full((len(weights),), C.STEP, dtype=torch.int64, device=device)

    def reset(self, cache="cold"):
        for seg, (p, p0) in enumerate(zip(self.params, self.start_params)):
            if cache == "cold":
                p.copy_(p0)
            else:
                idx = self.indices[self.offsets[seg]:self.offsets[seg + 1]]
                p.view(-1)[idx] = p0.view(-1)[idx]
        self.exp_avg.copy_(self.start_m)
        self.exp_avg_sq.copy_(self.start_v)

    def step_with(self, impl):
        # The kernel alone, in the op's schema signature (gem_kernels.library), past ops.py's checks.
        impl.sparse_adamw_(self.params, self.grads, None, self.indices, self.offsets,
                           [self.exp_avg, self.exp_avg_sq], C.LR, *C.BETAS, C.ADAM_EPS, C.WEIGHT_DECAY,
                           self.steps, None, False)


BASELINES = ["reference", "torch_adamw_foreach", "torch_adamw_fused"]


def run_sparse(benchmark, impl, impl_name, role, case, density, device, cache, rounds):
    state = SparseStepState(case, density, device)
    C.timed(benchmark, lambda: state.step_with(impl), setup=lambda: state.reset(cache),
            device=device, rounds=rounds)
    k = state.indices.numel()
    C.describe(benchmark, op="sparse_adamw_", case=case, device=device, impl=impl_name,
               role=role, density=density, k=k, variant=f"{cache} cache",
               baselines=BASELINES if role == "ours" else None,
               bytes_moved=C.bytes_sparse_adamw(state.params, state.grads, k))
    return state


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_sparse_adamw_ours(benchmark, case, density, backend, backend_device, backend_name, cache,
                           rounds):
    ours = run_sparse(benchmark, backend, backend_name, "ours", case, density, backend_device,
                      cache, rounds)
    # The same step by the reference, from the same start.
    want = SparseStepState(case, density, backend_device)
    want.step_with(reference)
    torch.testing.assert_close(ours.exp_avg, want.exp_avg)
    torch.testing.assert_close(ours.exp_avg_sq, want.exp_avg_sq)
    for seg, (got, exp, start) in enumerate(zip(ours.params, want.params, ours.start_params)):
        torch.testing.assert_close(got, exp, msg=lambda m: f"params[{seg}]: {m}")
        # Entries outside the index set are never written: bit-for-bit the start.
        untouched = torch.ones(got.numel(), dtype=torch.bool, device=got.device)
        untouched[ours.indices[ours.offsets[seg]:ours.offsets[seg + 1]]] = False
        assert torch.equal(got.view(-1)[untouched], start.view(-1)[untouched])


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_sparse_adamw_reference(benchmark, case, density, device, cache, rounds):
    state = run_sparse(benchmark, reference, "reference", "baseline", case, density, device,
                       cache, rounds)
    # It did the step: entries outside the set untouched, nearly all selected ones moved (an
    # update can round to nothing when it just cancels the decay, so not quite all).
    changed = torch.cat([(p != p0).view(-1) for p, p0 in zip(state.params, state.start_params)])
    selected = torch.zeros_like(changed)
    starts = torch.tensor([0] + [p.numel() for p in state.params], device=device).cumsum(0)
    seg_of = torch.repeat_interleave(torch.arange(len(state.params), device=device),
                                     state.offsets.diff())
    selected[state.indices + starts[seg_of]] = True
    assert not bool((changed & ~selected).any())
    assert int(changed.sum()) >= 0.99 * state.indices.numel()


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_sparse_adamw_torch_adamw(benchmark, case, device, variant, rounds):
    """torch.optim.AdamW over the whole tensors: the work does not depend on the density."""
    grads, weights = C.segments(case, device)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads):
        p.grad = g
    try:
        opt = torch.optim.AdamW(params, lr=C.LR, betas=C.BETAS, eps=C.ADAM_EPS,
                                weight_decay=C.WEIGHT_DECAY, **{variant: True})
        opt.step()  # the first step also allocates the state; the timed steps do the same work
    except RuntimeError as error:
        pytest.skip(f"torch.optim.AdamW({variant}=True) does not run on {device}: {error}")

    # On selected entries, its first step must equal the reference's first step from zero state.
    indices, offsets = C.random_index_set(case, C.MODE_DENSITIES["full"][-1], device)
    zeros = torch.zeros(indices.numel(), device=device)
    want = [w.clone() for w in weights]
    reference.sparse_adamw_(want, grads, None, indices, offsets, [zeros, zeros.clone()], C.LR, *C.BETAS,
                            C.ADAM_EPS, C.WEIGHT_DECAY, torch.ones(len(want), dtype=torch.int64), None, False)
    for seg, (p, w) in enumerate(zip(params, want)):
        idx = indices[offsets[seg]:offsets[seg + 1]]
        torch.testing.assert_close(p.detach().view(-1)[idx], w.view(-1)[idx])

    with torch.no_grad():
        C.timed(benchmark, opt.step, device=device, rounds=rounds)
    C.describe(benchmark, op="sparse_adamw_", case=case, device=device,
               impl=f"torch_adamw_{variant}", role="baseline",
               bytes_moved=C.bytes_dense_adamw(params))
