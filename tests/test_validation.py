"""Bad input to the ops raises TypeError/ValueError naming the argument, and changes nothing."""
import pytest
import torch

from gem_kernels import ops


def _segments():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=gen), torch.randn(9, generator=gen)]
    grads = [torch.randn(w.shape, generator=gen) for w in weights]
    return grads, weights


def _adamw_args():
    grads, params = _segments()
    return dict(params=params, grads=grads, indices=torch.tensor([1, 4, 29, 0, 8]),
                offsets=torch.tensor([0, 3, 5]), state=[torch.zeros(5), torch.zeros(5)],
                lr=1e-3, step=1)


BAD_SCORE_INPUTS = [
    ("grads", lambda g, w: (g[:1], w), ValueError),
    ("grads[1]", lambda g, w: ([g[0], g[1][:4]], w), ValueError),
    ("weights[0]", lambda g, w: (g, [w[0].double(), w[1]]), TypeError),
    ("grads[0]", lambda g, w: ([g[0].int(), g[1]], w), TypeError),
    ("weights[0]", lambda g, w: (g, [w[0].t(), w[1]]), ValueError),  # shape first, then contiguity
    ("weights[0]", lambda g, w: ([g[0].t().contiguous(), g[1]], [w[0].t(), w[1]]), ValueError),
    ("weights", lambda g, w: (g, w[0]), TypeError),
    ("grads[1]", lambda g, w: ([g[0], g[1].to("meta")], w), TypeError),  # no data to read
]


@pytest.mark.parametrize("name,mutate,error", BAD_SCORE_INPUTS)
@pytest.mark.parametrize("op", ["layer_stats", "ratio_topk"])
def test_score_ops_reject_bad_tensors(op, name, mutate, error):
    grads, weights = mutate(*_segments())
    call = (lambda: ops.layer_stats(grads, weights)) if op == "layer_stats" else \
        (lambda: ops.ratio_topk(grads, weights, 1))
    with pytest.raises(error, match=name.replace("[", r"\[").replace("]", r"\]")):
        call()


@pytest.mark.parametrize("k,message", [
    (-1, "k=-1"), (40, "k=40"), ([1], "k has 1"), ([1, -2], r"k\[1\]"), ([31, 0], r"k\[0\]"),
    (1.5, "k must be an integer"), (True, "k must be an integer"),
])
def test_ratio_topk_rejects_bad_k(k, message):
    grads, weights = _segments()
    with pytest.raises((ValueError, TypeError), match=message):
        ops.ratio_topk(grads, weights, k)


def test_ratio_topk_counts_excluded_entries_against_k():
    grads, weights = _segments()
    exclude = (torch.tensor([0, 1, 2]), torch.tensor([0, 3, 3]))
    ops.ratio_topk(grads, weights, [27, 9], exclude=exclude)
    with pytest.raises(ValueError, match=r"k\[0\]=28"):
        ops.ratio_topk(grads, weights, [28, 9], exclude=exclude)
    with pytest.raises(ValueError, match="exclude indices must be strictly ascending"):
        ops.ratio_topk(grads, weights, 1, exclude=(torch.tensor([2, 1]), torch.tensor([0, 2, 2])))
    with pytest.raises(ValueError, match="exclude indices out of range"):
        ops.ratio_topk(grads, weights, 1, exclude=(torch.tensor([30]), torch.tensor([0, 1, 1])))


@pytest.mark.parametrize("eps,exponent,message", [(-1.0, 1.0, "eps"), (float("nan"), 1.0, "eps"),
                                                  (1e-8, float("inf"), "exponent")])
def test_score_ops_reject_bad_scalars(eps, exponent, message):
    grads, weights = _segments()
    with pytest.raises(ValueError, match=message):
        ops.layer_stats(grads, weights, eps=eps, exponent=exponent)


BAD_ADAMW_INPUTS = [
    ("sparse_adamw_ indices out of range", dict(indices=torch.tensor([1, 4, 30, 0, 8]))),
    ("sparse_adamw_ indices out of range", dict(indices=torch.tensor([1, 4, -1, 0, 8]))),
    ("strictly ascending", dict(indices=torch.tensor([1, 4, 4, 0, 8]))),
    ("sparse_adamw_ indices has dtype int32", dict(indices=torch.tensor([1, 4, 29, 0, 8], dtype=torch.int32))),
    ("sparse_adamw_ offsets", dict(offsets=torch.tensor([0, 3, 4]))),
    ("sparse_adamw_ offsets", dict(offsets=torch.tensor([0, 4, 3]))),
    (r"exp_avg has shape \(4,\)", dict(state=[torch.zeros(4), torch.zeros(5)])),
    ("exp_avg_sq has dtype float16", dict(state=[torch.zeros(5), torch.zeros(5, dtype=torch.float16)])),
    (r"max_exp_avg_sq has shape \(4,\)", dict(state=[torch.zeros(5), torch.zeros(5), torch.zeros(4)])),
    ("state has 1 tensors", dict(state=[torch.zeros(5)])),
    ("state has 4 tensors", dict(state=[torch.zeros(5)] * 4)),
    ("state must be a list", dict(state=torch.zeros(5))),
    (r"grads \(compact\) has shape", dict(grads=torch.zeros(4))),
    ("grads has 1 tensors", dict(grads=[torch.zeros(6, 5)])),
    ("lr must be", dict(lr=-1.0)),
    ("betas must be", dict(betas=(0.9, 1.0))),
    ("weight_decay must be", dict(weight_decay=-0.1)),
    ("step must be >= 1", dict(step=0)),
    ("exactly one of step", dict(step=None)),
    ("exactly one of step", dict(age=torch.ones(5, dtype=torch.int64))),
    ("age must be >= 1", dict(step=None, age=torch.tensor([1, 1, 0, 1, 1]))),
    ("step has shape", dict(step=torch.ones(3, dtype=torch.int64))),
    ("params\\[1\\] is not contiguous", dict(params=[torch.randn(6, 5), torch.randn(9, 2)[:, 0]])),
]


@pytest.mark.parametrize("message,changes", BAD_ADAMW_INPUTS)
def test_sparse_adamw_rejects_bad_input_and_changes_nothing(message, changes):
    args = _adamw_args()
    args.update(changes)
    watched = [*args["params"], *args["state"]]
    before = [t.clone() for t in watched]
    with pytest.raises((ValueError, TypeError), match=message):
        ops.sparse_adamw_(args.pop("params"), args.pop("grads"), args.pop("indices"), args.pop("offsets"),
                          args.pop("state"), **args)
    for b, a in zip(before, watched):
        assert torch.equal(a, b)


def test_good_input_passes_the_same_checks():
    # The fixtures above are valid apart from the one change each test makes.
    args = _adamw_args()
    ops.sparse_adamw_(args.pop("params"), args.pop("grads"), args.pop("indices"), args.pop("offsets"),
                      args.pop("state"), **args)
    grads, weights = _segments()
    assert ops.ratio_topk(grads, weights, [30, 9])[1].tolist() == [0, 30, 39]


def test_a_kernel_for_an_unknown_op_is_refused():
    from gem_kernels.library import register_kernel
    with pytest.raises(ValueError, match="'sparse_adam' is not an op of gem_kernels"):
        register_kernel("sparse_adam", "cpu")


def test_unchecked_indices_still_get_their_dtype_and_shape_checked():
    args = _adamw_args()
    args["indices"] = args["indices"].int()
    with pytest.raises(TypeError, match="sparse_adamw_ indices has dtype int32"):
        ops.sparse_adamw_(args.pop("params"), args.pop("grads"), args.pop("indices"), args.pop("offsets"),
                          args.pop("state"), check_indices=False, **args)
