"""Property test: random bad input to the four ops and to SparseAdamW always gets a
TypeError/ValueError, and leaves params, grads and optimizer state bit-identical to before.

A seeded loop (a few hundred cases, reproducible from the case number) draws a valid call,
spoils one argument at random, runs it, and compares everything it could have written.
"""
import copy
import random

import pytest
import torch

from gem_kernels import ops
from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM, ID3, Random

CASES = 400


def _wrong_dtype(t):
    return t.double() if t.is_floating_point() else t.to(torch.int32)


def _wrong_shape(t):
    return t.reshape(-1)[:-1] if t.numel() else torch.zeros(1, dtype=t.dtype)


def _non_contiguous(t):
    if t.numel() <= 1:  # a tensor of 0 or 1 elements is always contiguous
        return t.to("meta")
    return torch.stack([t, t], dim=-1)[..., 0]  # same shape and values, stride 2


SPOILERS = [_wrong_dtype, _wrong_shape, _non_contiguous, lambda t: t.to("meta"),
            lambda t: t.to_sparse(), lambda t: "not a tensor", lambda t: [t]]


def _segments(rng, dtype):
    shapes = [(rng.randint(1, 7), rng.randint(2, 9)) for _ in range(rng.randint(1, 3))]
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    weights = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return grads, weights


def _index_set(rng, numels):
    chosen = [sorted(rng.sample(range(n), rng.randint(0, min(n, 4)))) for n in numels]
    indices = torch.tensor([i for c in chosen for i in c], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(c) for c in chosen], dtype=torch.int64).cumsum(0)
    return indices, offsets


def _spoil_list(rng, values, name):
    """Spoils one element of a list of tensors (or the list itself)."""
    if rng.random() < 0.2:
        return rng.choice([values[:-1] if len(values) > 1 else values + values, values[0], "oops"]), name
    i = rng.randrange(len(values))
    out = list(values)
    out[i] = rng.choice(SPOILERS)(values[i])
    return out, f"{name}[{i}]"


def _clone_all(tensors):
    return [t.clone() for t in tensors]


def _equal_all(a, b):
    return all(_same(x, y) for x, y in zip(a, b))


def _bad_value(rng, name):
    return rng.choice({
        "eps": [-1.0, float("nan"), float("inf"), "1e-8"],
        "exponent": [float("nan"), float("inf"), None],
        "k": [-1, 10**9, 1.5, True, "3", [1, 2, 3, 4, 5]],
        "lr": [-1e-3, float("nan"), float("inf"), "1e-3", None],
        "betas": [(0.9,), (1.0, 0.999), (0.9, -0.1), "0.9", None],
        "weight_decay": [-0.1, float("nan")],
        "step": [0, -2, 1.5, "1", True],
    }[name])


def _score_op_case(rng):
    grads, weights = _segments(rng, rng.choice([torch.float32, torch.bfloat16, torch.float16]))
    op = rng.choice(["layer_stats", "ratio_topk"])
    kwargs = {"eps": 1e-8, "exponent": 1.0}
    args = {"grads": grads, "weights": weights}
    what = rng.choice(["grads", "weights", "eps", "exponent"] + (["k", "exclude"] if op == "ratio_topk" else []))
    if what in ("grads", "weights"):
        args[what], _ = _spoil_list(rng, args[what], what)
    elif what == "exclude":
        numels = [w.numel() for w in weights]
        indices, offsets = _index_set(rng, numels)
        bad = rng.choice(["range", "order", "offsets", "dtype"])
        if bad == "range" or indices.numel() < 2:
            indices = torch.cat([indices, torch.tensor([10**6])])
            offsets = offsets.clone()
            offsets[-1] += 1
        elif bad == "order":
            indices = indices.flip(0)
            offsets = torch.tensor([0] + [indices.numel()] * len(numels))
        elif bad == "offsets":
            offsets = offsets.flip(0)
        else:
            indices = indices.int()
        kwargs["exclude"] = (indices, offsets)
    else:
        kwargs[what] = _bad_value(rng, what)
    snapshot = _clone_all(grads + weights)
    if op == "layer_stats":
        call = lambda: ops.layer_stats(args["grads"], args["weights"], **kwargs)  # noqa: E731
    else:
        k = _bad_value(rng, "k") if what == "k" else 1
        call = lambda: ops.ratio_topk(args["grads"], args["weights"], k, **kwargs)  # noqa: E731
    return call, lambda: _equal_all(snapshot, grads + weights), f"{op}: bad {what}"


def _adamw_case(rng):
    grads, params = _segments(rng, rng.choice([torch.float32, torch.bfloat16]))
    indices, offsets = _index_set(rng, [p.numel() for p in params])
    n = indices.numel()
    args = {"params": params, "grads": grads, "indices": indices, "offsets": offsets,
            "exp_avg": torch.rand(n), "exp_avg_sq": torch.rand(n)}
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "step": 3}
    what = rng.choice(list(args) + ["lr", "betas", "weight_decay", "step", "age"])
    if what in ("params", "grads"):
        args[what], _ = _spoil_list(rng, args[what], what)
    elif what in ("exp_avg", "exp_avg_sq", "indices", "offsets"):
        out_of_range = {"indices": lambda t: t + 10**6 if t.numel() else torch.tensor([10**6]),
                        "offsets": lambda t: t + 1}.get(what, _wrong_shape)
        args[what] = rng.choice(SPOILERS + [out_of_range])(args[what])
    elif what == "age":
        del kwargs["step"]
        kwargs["age"] = rng.choice([torch.zeros(n + 1, dtype=torch.int64), torch.ones(n + 1, dtype=torch.int64),
                                    torch.ones(n + 1)])
        if n and rng.random() < 0.5:
            kwargs["age"] = torch.zeros(n, dtype=torch.int64)  # right shape, but step 0
    else:
        kwargs[what] = _bad_value(rng, what)
    state = [args["exp_avg"], args["exp_avg_sq"]] if all(
        isinstance(args[k], torch.Tensor) and args[k].device.type == "cpu" and args[k].layout == torch.strided
        for k in ("exp_avg", "exp_avg_sq")) else []
    watched = params + grads + state
    snapshot = _clone_all(watched)
    call = lambda: ops.sparse_adamw_(args["params"], args["grads"], args["indices"], args["offsets"],  # noqa: E731
                                     [args["exp_avg"], args["exp_avg_sq"]], **kwargs)
    return call, lambda: _equal_all(snapshot, watched), f"sparse_adamw_: bad {what}"


def _weight_grad_case(rng):
    """sparse_weight_grad writes nothing; a bad call must raise and leave its inputs alone."""
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    gen = torch.Generator().manual_seed(rng.randint(0, 10**6))
    shapes = [(rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 5)) for _ in range(rng.randint(1, 3))]
    args = {"inputs": [torch.randn(t, i, generator=gen).to(dtype) for t, i, _ in shapes],
            "grad_outputs": [torch.randn(t, o, generator=gen).to(dtype) for t, _, o in shapes]}
    args["indices"], args["offsets"] = _index_set(rng, [i * o for _, i, o in shapes])
    watched = args["inputs"] + args["grad_outputs"]  # before spoiling: what a call could touch
    snapshot = _clone_all(watched)
    what = rng.choice(list(args) + ["rows"])
    if what in ("inputs", "grad_outputs"):
        args[what], _ = _spoil_list(rng, args[what], what)
    elif what == "rows":  # X and dY of one segment with different token counts
        j = rng.randrange(len(shapes))
        args["inputs"][j] = torch.cat([args["inputs"][j], args["inputs"][j][:1]])
    else:
        out_of_range = {"indices": lambda t: t + 10**6 if t.numel() else torch.tensor([10**6]),
                        "offsets": lambda t: t + 1}[what]
        args[what] = rng.choice(SPOILERS + [out_of_range, lambda t: t.flip(0) if t.numel() > 1 else t + 10**6])(
            args[what])
    call = lambda: ops.sparse_weight_grad(args["inputs"], args["grad_outputs"], args["indices"],  # noqa: E731
                                          args["offsets"])
    return call, lambda: _equal_all(snapshot, watched), f"sparse_weight_grad: bad {what}"


def _optimizer_case(rng):
    torch.manual_seed(rng.randint(0, 10**6))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    kind = rng.choice(["gem", "id3", "random"])
    selector = {"gem": GEM(), "id3": ID3(total_steps=3), "random": Random(rng.randint(0, 9))}[kind]
    extra = {"calibration_steps": 1} if kind == "gem" else {}
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.2, selector=selector, **extra)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    for _ in range(rng.randint(0, 3)):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    p = rng.choice(params)
    what = rng.choice(["nan grad", "inf grad", "lr", "betas", "weight_decay", "sparse grad"])
    if what in ("nan grad", "inf grad"):
        # Calibration reads only the sparse params' gradients (dense groups wait), and after
        # the selection only the selected entries of a sparse param's gradient are read.
        if opt.phase == "calibration":
            p = rng.choice([q for q in params if q.dim() == 2])
        selected = opt.selected_entries().get(p, (None,))[0] if opt.phase == "training" else None
        if selected is not None and selected.numel() == 0:
            p, selected = params[-1], None  # the dense head's bias
        grad = p.grad.clone()
        position = rng.randrange(grad.numel()) if selected is None else int(rng.choice(selected.tolist()))
        grad.reshape(-1)[position] = float("nan") if what == "nan grad" else float("-inf")
        p.grad = grad
    elif what == "sparse grad":  # refused, as torch's AdamW refuses it, in every phase
        # A sparse param's: a dense group's sparse gradient is not refused cleanly yet in
        # unmasking and training (tests/test_misuse.py marks that case xfail).
        p = rng.choice([q for q in params if q.dim() == 2])
        p.grad = p.grad.to_sparse()
    else:
        opt.param_groups[rng.randrange(len(opt.param_groups))][what] = _bad_value(rng, what)
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
              [None if q.grad is None else q.grad.clone() for q in params])

    def unchanged():
        after = (model.state_dict(), opt.state_dict(), [q.grad for q in params])
        return _same(before, after)
    return opt.step, unchanged, f"SparseAdamW ({kind}, phase {opt.phase}): {what}"


def _bits(t):
    """A tensor's bits, so that NaN compares equal to the same NaN."""
    t = t.to_dense() if t.is_sparse else t
    if t.is_floating_point():
        return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _same(a, b):
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.is_sparse != b.is_sparse:
            return False
        return a.shape == b.shape and torch.equal(_bits(a), _bits(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)  # NaN hyper-parameters compare equal to themselves


@pytest.mark.parametrize("block", range(6))
def test_random_bad_input_raises_and_changes_nothing(block):
    makers = [_score_op_case, _adamw_case, _weight_grad_case, _optimizer_case]
    for case in range(block * CASES // 6, (block + 1) * CASES // 6):
        rng = random.Random(case)
        call, unchanged, what = makers[case % len(makers)](rng)
        try:
            call()
        except (TypeError, ValueError):
            pass
        else:
            pytest.fail(f"case {case} ({what}) did not raise")
        assert unchanged(), f"case {case} ({what}) changed something before raising"
