"""The ops as torch.library operators: opcheck on each, version counters bumped by every
backend, and tensors the kernels cannot read refused before any pointer leaves Python."""
import pytest
import torch

import gem_kernels
from gem_kernels import ops


def _segments(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=gen).to(dtype), torch.randn(9, generator=gen).to(dtype)]
    grads = [torch.randn(w.shape, generator=gen).to(dtype) for w in weights]
    return grads, weights


def _adamw_args(grads_kind="dense", amsgrad=False):
    grads, params = _segments()
    indices, offsets = torch.tensor([1, 4, 29, 0, 8]), torch.tensor([0, 3, 5])
    op_grads = grads if grads_kind == "dense" else torch.randn(5)
    return [params, op_grads if grads_kind == "dense" else [], None if grads_kind == "dense" else op_grads,
            indices, offsets, [torch.rand(5) for _ in range(3 if amsgrad else 2)], 1e-2, 0.9, 0.999, 1e-8, 0.01,
            torch.tensor([3, 1]), None, False]


@pytest.fixture(params=["reference", "cpu"])
def backend(request, use_backend):
    if request.param not in gem_kernels.live_backends():
        pytest.skip(f"{request.param} backend not built")
    use_backend(request.param)
    return request.param


def test_opcheck_layer_stats(backend):
    grads, weights = _segments()
    torch.library.opcheck(torch.ops.gem_kernels.layer_stats.default, (grads, weights, 1e-8, 1.0))


@pytest.mark.parametrize("k,per_segment", [([7, 2], True), ([11], False)])
def test_opcheck_ratio_topk(backend, k, per_segment):
    grads, weights = _segments()
    exclude = (torch.tensor([0, 3, 2]), torch.tensor([0, 2, 3]))
    torch.library.opcheck(torch.ops.gem_kernels.ratio_topk.default,
                          (grads, weights, k, per_segment, 1e-8, 1.0, None, None))
    torch.library.opcheck(torch.ops.gem_kernels.ratio_topk.default,
                          (grads, weights, k, per_segment, 1e-3, 0.5, *exclude))


@pytest.mark.parametrize("grads_kind", ["dense", "compact"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck_sparse_adamw(backend, grads_kind, amsgrad):
    torch.library.opcheck(torch.ops.gem_kernels.sparse_adamw_.default, _adamw_args(grads_kind, amsgrad))


def test_sparse_adamw_bumps_version_counters(backend):
    args = _adamw_args(amsgrad=True)
    written = [*args[0], *args[5]]  # the params and every state buffer
    before = [t._version for t in written]
    torch.ops.gem_kernels.sparse_adamw_(*args)
    after = [t._version for t in written]
    assert all(a > b for a, b in zip(after, before)), (before, after)


def test_version_bump_trips_autograd_saved_tensor_check(backend):
    # A weight saved for backward and then updated in place: autograd must notice on every
    # backend, as it does for torch's own in-place ops.
    grads, params = _segments()
    w = params[0].clone().requires_grad_()
    y = (w * w).sum()  # saves w for backward
    with torch.no_grad():
        ops.sparse_adamw_([w], [grads[0]], torch.tensor([0, 2]), torch.tensor([0, 2]),
                          [torch.zeros(2), torch.zeros(2)], lr=1e-2, step=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def _sparse_like(t):
    return t.to_sparse()


@pytest.mark.parametrize("make,kind", [
    (lambda t: t.to("meta"), "meta tensor"),
    (_sparse_like, "layout"),
])
def test_unreadable_tensors_are_refused_on_every_op(backend, make, kind):
    grads, weights = _segments()
    bad_weights = [make(weights[0]), weights[1]]
    with pytest.raises(TypeError, match=kind):
        ops.layer_stats(grads, bad_weights)
    with pytest.raises(TypeError, match=kind):
        ops.ratio_topk(grads, bad_weights, 3)
    params = [make(weights[0]), weights[1]]
    snapshot = weights[1].clone()
    with pytest.raises(TypeError, match=kind):
        ops.sparse_adamw_(params, grads, torch.tensor([1, 0]), torch.tensor([0, 1, 2]),
                          [torch.zeros(2), torch.zeros(2)], lr=1e-2, step=1)
    assert torch.equal(weights[1], snapshot)
    # The registered kernels check again, for callers of torch.ops.gem_kernels directly
    # (meta tensors go to the fake kernel instead, which reads no data).
    if kind == "layout":
        with pytest.raises((TypeError, NotImplementedError, RuntimeError)):
            torch.ops.gem_kernels.layer_stats(grads, bad_weights, 1e-8, 1.0)


def test_tensor_subclasses_are_refused(backend):
    class Wrapped(torch.Tensor):
        pass
    grads, weights = _segments()
    sub = weights[0].as_subclass(Wrapped)
    with pytest.raises(TypeError, match="Wrapped"):
        ops.layer_stats(grads, [sub, weights[1]])
    with pytest.raises(TypeError, match="Wrapped"):
        torch.ops.gem_kernels.layer_stats(grads, [sub, weights[1]], 1e-8, 1.0)


def test_fake_kernels_give_output_shapes_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        grads = [torch.empty(6, 5), torch.empty(9)]
        weights = [torch.empty(6, 5), torch.empty(9)]
        stats = torch.ops.gem_kernels.layer_stats(grads, weights, 1e-8, 1.0)
        indices, offsets = torch.ops.gem_kernels.ratio_topk(grads, weights, [4, 2], True, 1e-8, 1.0, None, None)
        assert stats.shape == (2, 4) and stats.dtype == torch.float64
        assert indices.shape == (6,) and offsets.shape == (3,)
        with pytest.raises(ValueError, match="grads\\[1\\] has shape"):
            torch.ops.gem_kernels.layer_stats([grads[0], torch.empty(8)], weights, 1e-8, 1.0)


def test_a_backend_for_one_op_is_one_file():
    """tests/toy_backend.py registers a kernel for sparse_weight_grad on CPU tensors and nothing
    else: importing it is all it takes, and no file of gem_kernels names it."""
    import importlib
    import sys

    from gem_kernels import library
    before = library.registered_kernel("sparse_weight_grad", "cpu")
    try:
        toy = importlib.reload(sys.modules["toy_backend"]) if "toy_backend" in sys.modules else \
            importlib.import_module("toy_backend")
        assert "toy_backend" in gem_kernels.live_backends()
        gen = torch.Generator().manual_seed(0)
        x, dy = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
        indices, offsets = torch.tensor([0, 5]), torch.tensor([0, 2])
        got = ops.sparse_weight_grad([x], [dy], indices, offsets)
        torch.testing.assert_close(got, (dy.T @ x).reshape(-1)[indices])
        assert toy.CALLS == [2]
        ops.layer_stats([dy], [dy])  # the other ops keep their kernels
        assert library.backend_name(library.registered_kernel("layer_stats", "cpu")) in ("cpu", "reference")
    finally:
        library.register_kernel("sparse_weight_grad", "cpu")(before)
    assert "toy_backend" not in gem_kernels.live_backends()
