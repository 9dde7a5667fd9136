"""SparseAdamW on FSDP2 (``fully_shard``) models: two gloo processes on CPU per test, each run in
lockstep with one process on the full tensors and the concatenated batch.

Each worker asserts and raises; ``mp.spawn`` re-raises a worker's error here with its traceback.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from gloo_harness import WORLD, spawn

import gem_kernels
from gem_kernels import distributed as gd

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

PER_RANK = 4  # rows of the batch per rank; the single-process run takes all 2 * 4


# ---------------------------------------------------------------------------------------
# Models and data


def _model():
    """Rows 24, 9 (split 5 + 4: uneven) and 3 (2 + 1) over two ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 9),
                               torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _sharded_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _groups(model):
    """Hidden weights sparse; biases and the head dense (a new head trains fully)."""
    return [{"params": [model[0].weight, model[2].weight], "sparse": True},
            {"params": [model[0].bias, model[2].bias, model[4].weight, model[4].bias], "sparse": False}]


def _optimizer(model, method):
    if method == "gem":
        return gem_kernels.SparseAdamW(_groups(model), lr=1e-2, density=0.05, calibration_steps=3)
    if method == "magnitude":
        return gem_kernels.SparseAdamW(_groups(model), lr=1e-2, budget=30, calibration_steps=2,
                                       selector=gem_kernels.GradMagnitude())
    return gem_kernels.SparseAdamW(_groups(model), lr=1e-2, budget=40, selector=gem_kernels.ID3(total_steps=3))


def _batch(step, rank=None):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(WORLD * PER_RANK, 12, generator=g), torch.randn(WORLD * PER_RANK, 3, generator=g)
    if rank is None:
        return x, y
    return x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]


def _backward(model, step, rank=None):
    x, y = _batch(step, rank)
    torch.nn.functional.mse_loss(model(x), y).backward()


def _train(model, opt, steps, rank):
    for step in steps:
        _backward(model, step, rank)
        opt.step()
        opt.zero_grad()


def _full(model):
    """Every param's full tensor, flattened and concatenated (a collective under FSDP2)."""
    return torch.cat([(p.full_tensor() if isinstance(p, torch.distributed.tensor.DTensor) else p)
                      .detach().reshape(-1) for p in model.parameters()])


def _global_selection(opt):
    """``{position among the sparse params: full-tensor indices}``, the union of every rank's
    local indices shifted by its shard offset (a collective)."""
    out = {}
    for i, (p, (indices, _)) in enumerate(opt.selected_entries().items()):
        (offset, _), = gd.shard_offsets([tuple(p.shape)], WORLD, dist.get_rank())
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, (indices + offset).tolist())
        out[i] = torch.tensor(sorted(sum(gathered, [])), dtype=torch.int64)
    return out


def _state_bytes(opt):
    """This rank's optimizer state bytes (local blocks of DTensor states)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if isinstance(v, torch.distributed.tensor.DTensor) else v
                total += v.numel() * v.element_size()
    return total


# ---------------------------------------------------------------------------------------
# Training: the single-process answer on the full tensors


def _lockstep_worker(rank, tmpdir, method, steps):
    model = _sharded_model()
    start = _full(model).clone()
    opt = _optimizer(model, method)
    single = _model()
    single_opt = _optimizer(single, method)
    # The kernels write through to_local(): it must be the param's own block, not a copy.
    weight, row = model[0].weight, 12 * rank  # rank r's block starts at row 12 r of 24
    kept = weight.to_local()[0, 0].clone()
    with torch.no_grad():
        weight.to_local()[0, 0] = 123.0
    assert weight.full_tensor()[row, 0] == 123.0
    with torch.no_grad():
        weight.to_local()[0, 0] = kept
    for step in range(steps):
        _backward(model, step, rank)
        _backward(single, step)
        # torch's clip_grad_norm_ measures the whole dense gradient, over every rank's blocks, as
        # with AdamW (in every phase: the unselected entries count in training too).
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        norm = norm.full_tensor() if isinstance(norm, torch.distributed.tensor.DTensor) else norm
        single_norm = torch.nn.utils.clip_grad_norm_(single.parameters(), 1e9)
        dense_norm = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in single.parameters()]))
        torch.testing.assert_close(single_norm, dense_norm)
        torch.testing.assert_close(norm, single_norm, rtol=1e-5, atol=1e-7)
        opt.step()
        single_opt.step()
        opt.zero_grad()
        single_opt.zero_grad()
        torch.testing.assert_close(_full(model), _full(single), rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{method} step {step} ({opt.phase}): {m}")
    assert opt.phase == "training"

    # The union of the ranks' local selections is the single-process selection.
    union = _global_selection(opt)
    for i, (single_indices, _) in enumerate(single_opt.selected_entries().values()):
        assert torch.equal(union[i], single_indices), f"{method}: tensor {i}'s selection differs"
    k = sum(int(v.numel()) for v in union.values())
    assert k == single_opt.selected_count() > 0
    counts = [None] * WORLD
    dist.all_gather_object(counts, opt.selected_count())
    assert sum(counts) == k

    # Entries that were not selected are the starting bits (dense params train fully).
    final = _full(model)
    untouched = torch.zeros_like(start, dtype=torch.bool)
    offset, sparse = 0, [p for g in single_opt.param_groups if g["sparse"] for p in g["params"]]
    for p in single.parameters():
        if any(p is q for q in sparse):
            mask = torch.ones(p.numel(), dtype=torch.bool)
            mask[union[[j for j, q in enumerate(sparse) if q is p][0]]] = False
            untouched[offset:offset + p.numel()] = mask
        offset += p.numel()
    assert torch.equal(final[untouched], start[untouched])
    assert not torch.equal(final[~untouched], start[~untouched])

    # Optimizer state per rank against torch's AdamW on the same FSDP2 model.
    adamw_model = _sharded_model()
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-2)
    _train(adamw_model, adamw, range(1), rank)
    sparse_state = sum(_state_bytes_of(opt, p) for _, p in opt.sparse_params())
    ours, theirs = _state_bytes(opt), _state_bytes(adamw)
    assert sparse_state < ours < theirs
    row = torch.tensor([opt.selected_count(), sparse_state, ours, theirs])
    rows = [torch.empty_like(row) for _ in range(WORLD)]
    dist.all_gather(rows, row)
    if rank == 0:
        for r, (kr, s, o, t) in enumerate(r.tolist() for r in rows):
            print(f"\n{method} rank {r}: k_rank={kr} of k={k}; sparse state {s} B, all optimizer state "
                  f"{o} B; AdamW under FSDP2 {t} B", end="")


def _state_bytes_of(opt, p):
    return sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))


def test_fsdp_gem_equals_single_process():
    spawn(_lockstep_worker, "gem", 7)


def test_fsdp_id3_equals_single_process():
    spawn(_lockstep_worker, "id3", 6)


def test_fsdp_grad_magnitude_equals_single_process():
    spawn(_lockstep_worker, "magnitude", 4)


# ---------------------------------------------------------------------------------------
# What is refused, and a step that raises changes nothing


def _refusal_worker(rank, tmpdir):
    from torch.distributed.tensor import DTensor, Replicate
    model = _sharded_model()
    with pytest.raises(NotImplementedError, match="Random"):
        gem_kernels.SparseAdamW(_groups(model), budget=10, selector=gem_kernels.Random(0))
    plain = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="plain tensors"):
        gem_kernels.SparseAdamW([{"params": [model[0].weight, plain], "sparse": True}], budget=10)
    replicated = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 4), model[0].weight.device_mesh,
                                                       [Replicate()]))
    with pytest.raises(TypeError, match="DTensor placed"):
        gem_kernels.SparseAdamW([replicated], budget=4)
    with pytest.raises(TypeError, match="DTensor"):  # the ops themselves still take no DTensor
        gem_kernels.layer_stats([model[0].weight.detach()], [model[0].weight.detach()])

    # A gradient with NaN on one rank: every rank raises, nothing changes.
    opt = _optimizer(model, "gem")
    _train(model, opt, range(4), rank)
    assert opt.phase == "training"
    before = _full(model).clone()
    moments = [opt.state[p]["exp_avg"].clone() for _, p in opt.sparse_params()]
    _backward(model, 4, rank)
    if rank == 1:
        model[2].weight.grad.to_local().fill_(float("nan"))
    with pytest.raises(ValueError, match="another rank" if rank == 0 else "NaN or inf"):
        opt.step()
    assert torch.equal(_full(model), before)
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, (_, p) in zip(moments, opt.sparse_params()))
    # The gradients stay FSDP2's dense DTensors (the optimizer writes none).
    assert all(isinstance(p.grad, DTensor) and p.grad.to_local().layout == torch.strided
               for p in model.parameters())
    if rank == 1:
        assert bool(model[2].weight.grad.to_local().isnan().all())


def _calibrate_worker(rank, tmpdir):
    """``calibrate()`` on the FSDP2 model: the selection of one process calibrated on the
    concatenated batches."""
    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])
    model, single = _sharded_model(), _model()
    opts = [gem_kernels.SparseAdamW(_groups(m), lr=1e-2, density=0.05, calibration_steps=0) for m in (model, single)]
    opts[0].calibrate(model, [_batch(step, rank) for step in range(3)], loss_fn)
    opts[1].calibrate(single, [_batch(step) for step in range(3)], loss_fn)
    assert opts[0].phase == "training"
    union = _global_selection(opts[0])
    for i, (indices, _) in enumerate(opts[1].selected_entries().values()):
        assert torch.equal(union[i], indices)


def test_fsdp_calibrate():
    spawn(_calibrate_worker)


def test_fsdp_refusals_and_failed_step():
    spawn(_refusal_worker)


# ---------------------------------------------------------------------------------------
# Checkpoints: the model through torch.distributed.checkpoint, each rank's optimizer state
# through its own state_dict(); the continuation is bit-identical


def _run(method, rank, steps, tmpdir=None, load=None):
    import torch.distributed.checkpoint as dcp
    model = _sharded_model()
    opt = _optimizer(model, method)
    if load is not None:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(tmpdir, load))
        model.load_state_dict(state["model"])
        opt.load_state_dict(torch.load(os.path.join(tmpdir, f"{load}-opt{rank}.pt"), weights_only=False))
    _train(model, opt, steps, rank)
    return model, opt


def _checkpoint_worker(rank, tmpdir, cases):
    import torch.distributed.checkpoint as dcp
    for method, total, cut in cases:
        full, full_opt = _run(method, rank, range(total))
        first, first_opt = _run(method, rank, range(cut))
        name = f"{method}-{cut}"
        dcp.save({"model": first.state_dict()}, checkpoint_id=os.path.join(tmpdir, name))
        torch.save(first_opt.state_dict(), os.path.join(tmpdir, f"{name}-opt{rank}.pt"))
        dist.barrier()
        saved_phase = first_opt.phase
        resumed, resumed_opt = _run(method, rank, range(cut, total), tmpdir, name)
        assert torch.equal(_full(resumed), _full(full)), f"{method}: resumed after {cut} steps ({saved_phase}) differs"
        assert resumed_opt.phase == full_opt.phase == "training"

    # Another rank's state is refused, and the refusal changes nothing.
    model, opt = _run("gem", rank, range(4))
    other = torch.load(os.path.join(tmpdir, f"gem-4-opt{1 - rank}.pt"), weights_only=False)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for _, p in opt.sparse_params()}
    with pytest.raises(ValueError, match="FSDP2 shard"):
        opt.load_state_dict(other)
    for p, state in before.items():
        assert all(torch.equal(v, opt.state[p][k]) for k, v in state.items())


def _snapshot(model, opt):
    return (_full(model).clone(), opt.phase, opt.selection_state.calibration_done, opt.selection_state.unmask_done,
            {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _same(a, b) -> bool:
    weights_a, *counters_a, state_a = a
    weights_b, *counters_b, state_b = b
    return (torch.equal(weights_a, weights_b) and counters_a == counters_b and state_a.keys() == state_b.keys()
            and all(torch.equal(v, state_b[p][k]) for p, s in state_a.items() for k, v in s.items()))


def _dcp_worker(rank, tmpdir):
    """torch.distributed.checkpoint's optimizer helpers on SparseAdamW under FSDP2, as
    docs/distributed.md states: their first step on an optimizer with no state is refused (the
    step pre-hook), the state dicts they make are refused by every load, the optimizer's state
    is left as it was; a real first step with lr 0, and torch's AdamW, are not refused."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # No state yet (GEM in calibration, ID3 before its first unmasking): DCP's first step raises.
    for method in ("gem", "id3"):
        for helper in (lambda m, o: get_optimizer_state_dict(m, o),
                       lambda m, o: set_optimizer_state_dict(m, o, {"state": {}, "param_groups": []})):
            model = _sharded_model()
            opt = _optimizer(model, method)
            before = _snapshot(model, opt)
            with pytest.raises(NotImplementedError, match="opt.state_dict\\(\\) with torch.save"):
                helper(model, opt)
            assert _same(_snapshot(model, opt), before), method
            assert not opt.state
            assert all(g["lr"] == 0 for g in opt.param_groups)  # what DCP did before the step (docs)

    # With state: get_optimizer_state_dict is not told from opt.state_dict() (not refused), and what
    # it returns has no "sparse_adamw" entry; set_optimizer_state_dict and load_state_dict refuse it.
    model, opt = _run("gem", rank, range(4))
    got = get_optimizer_state_dict(model, opt)
    assert "sparse_adamw" not in got and got["state"]
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="no 'sparse_adamw' entry"):
        set_optimizer_state_dict(model, opt, got)
    with pytest.raises(ValueError, match="no 'sparse_adamw' entry"):
        opt.load_state_dict(got)
    assert _same(_snapshot(model, opt), before)

    # What the pre-hook must let through: a first step with lr 0 on real gradients, a first step
    # on zero gradients with lr > 0, and DCP's helpers on torch's AdamW of an FSDP2 model.
    for lr in (0.0, 1e-2):
        model = _sharded_model()
        opt = _optimizer(model, "gem")
        for group in opt.param_groups:
            group["lr"] = lr
        _backward(model, 0, rank)
        if lr:
            for p in model.parameters():
                p.grad.zero_()
        opt.step()
        assert opt.selection_state.calibration_done == 1
    model = _sharded_model()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert get_optimizer_state_dict(model, adamw)["state"]  # made by DCP's first step


def test_fsdp_dcp_optimizer_helpers():
    spawn(_dcp_worker)


def test_fsdp_checkpoint_resumes_bit_identically():
    """GEM cut in calibration and in training, ID3 in unmasking."""
    spawn(_checkpoint_worker, [("gem", 6, 2), ("gem", 6, 4), ("id3", 5, 2)])
