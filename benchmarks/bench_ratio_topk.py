"""ratio_topk (k per tensor, as GEM uses it): our backends against score + torch.topk."""
import _common as C
import torch

from gem_kernels import reference


def torch_score_topk(grads, weights, ks, eps=C.EPS):
    """What a user would run: the score in torch, then torch.topk on it, per tensor. Unsorted
    indices (our op sorts its own), so the baseline does no more than it must."""
    return [torch.topk((g.float().abs() / (w.float().abs() + eps)).view(-1), k, sorted=False).indices
            for g, w, k in zip(grads, weights, ks)]


def expected_topk(score, k):
    """The op's answer for finite scores: everything above the k-th largest score, then the
    entries equal to it with the smallest indices (the tie rule), sorted ascending."""
    threshold = torch.topk(score, k).values[-1]
    above = torch.nonzero(score > threshold).view(-1)
    tied = torch.nonzero(score == threshold).view(-1)
    return torch.cat([above, tied[:k - above.numel()]]).sort().values


def test_ratio_topk_ours(benchmark, case, density, backend, backend_device, backend_name, rounds):
    grads, weights = C.segments(case, backend_device)
    ks = C.k_per_segment(case, density)
    indices, offsets = C.timed(
        benchmark, lambda: backend.ratio_topk(grads, weights, ks, True, C.EPS, 1.0, None, None),
        device=backend_device, rounds=rounds)
    passes = getattr(backend, "RATIO_TOPK_PASSES", None)
    C.describe(benchmark, op="ratio_topk", case=case, device=backend_device, impl=backend_name,
               role="ours", density=density, k=sum(ks),
               bytes_moved=C.bytes_score_pass(grads, weights) + 8 * sum(ks),
               bytes_per_pass=C.bytes_score_pass(grads, weights), passes=passes,
               baselines=["torch_score_topk"])
    assert offsets.tolist() == [0] + torch.tensor(ks).cumsum(0).tolist()
    for seg, (g, w, k) in enumerate(zip(grads, weights, ks)):
        got = indices[offsets[seg]:offsets[seg + 1]].cpu()
        want = expected_topk(reference.ratio_score(g, w, C.EPS).cpu(), k)
        assert torch.equal(got, want), f"segment {seg}: {(got != want).sum()} of {k} indices differ"


def test_ratio_topk_torch(benchmark, case, density, device, rounds):
    grads, weights = C.segments(case, device)
    ks = C.k_per_segment(case, density)
    chosen = C.timed(benchmark, lambda: torch_score_topk(grads, weights, ks),
                     device=device, rounds=rounds)
    C.describe(benchmark, op="ratio_topk", case=case, device=device, impl="torch_score_topk",
               role="baseline", density=density, k=sum(ks),
               bytes_moved=C.bytes_score_pass(grads, weights) + 8 * sum(ks))
    # The baseline must pick the same entries (its order is unspecified, ties aside).
    for g, w, k, got in zip(grads, weights, ks, chosen):
        score = reference.ratio_score(g, w, C.EPS)
        assert torch.equal(score[got].sort().values, score[expected_topk(score, k)].sort().values)
