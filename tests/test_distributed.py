"""SparseAdamW on torch.distributed: plain DDP (as with AdamW) and DDP with
gem_kernels.distributed.attach (the compact wire), checkpoints under DDP, and the sharded
(FSDP2-style) selection. Two gloo processes on CPU per test.

Each worker asserts and raises; ``mp.spawn`` re-raises a worker's error here with its traceback.
"""
from __future__ import annotations

import copy
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
BUCKET_MB = 0.002  # ~2 KB buckets: the test model spreads over several, as a large model would


# ---------------------------------------------------------------------------------------
# Models and data


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _groups(model):
    """Hidden weights sparse; biases and the head dense (a new head trains fully)."""
    return [{"params": [model[0].weight, model[2].weight], "sparse": True},
            {"params": [model[0].bias, model[2].bias, model[4].weight, model[4].bias], "sparse": False}]


def _optimizer(model, method):
    if method == "gem":
        return gem_kernels.SparseAdamW(_groups(model), lr=1e-2, density=0.05, calibration_steps=3)
    return gem_kernels.SparseAdamW(_groups(model), lr=1e-2, budget=40, selector=gem_kernels.ID3(total_steps=3))


def _batch(step, rank=None):
    """The global batch of a step (all ranks) or rank ``rank``'s rows of it."""
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(WORLD * PER_RANK, 12, generator=g), torch.randn(WORLD * PER_RANK, 3, generator=g)
    if rank is None:
        return x, y
    return x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]


def _train(model, opt, steps, rank=None, log=None):
    for step in steps:
        x, y = _batch(step, rank)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if log is not None:
            log(step)
        opt.step()
        opt.zero_grad()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _same_on_all_ranks(tensor, what):
    gathered = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(gathered, tensor)
    for rank, other in enumerate(gathered[1:], 1):
        assert torch.equal(other, gathered[0]), f"{what} differ between rank 0 and rank {rank}"


def _plain_ddp_bytes(model):
    """Bytes plain DDP all-reduces in one backward of ``model`` (a copy, so nothing trains):
    DDP's own allreduce_hook, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    counted = []

    def counting(state, bucket):
        counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(state, bucket)
    ddp = DDP(copy.deepcopy(model), bucket_cap_mb=BUCKET_MB)
    ddp.register_comm_hook(None, counting)
    x, y = _batch(0, dist.get_rank())
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    return sum(counted)


# ---------------------------------------------------------------------------------------
# DDP training, GEM and ID3


def _check_ddp_grads(grads, single, single_opt, phase, attach, step) -> bool:
    """Each rank's averaged gradient against the single process's: under attach, in training, a
    sparse param's is that gradient at the selected entries and 0 elsewhere; under plain DDP the
    whole gradient. Returns whether a non-zero gradient outside the selection was seen."""
    selected = single_opt.selected_entries() if phase == "training" else {}
    seen = False
    for g, q in zip(grads, single.parameters()):
        expected = q.grad
        if q in selected:
            outside = torch.ones(q.numel(), dtype=torch.bool)
            outside[selected[q][0]] = False
            if attach:
                expected = expected.clone()
                expected.view(-1)[outside] = 0.0
            else:
                seen |= bool((g.reshape(-1)[outside] != 0).any())
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"step {step} ({phase}): {m}")
    return seen


def _ddp_worker(rank, tmpdir, method, bucket_view, steps, attach=True):
    """DDP against one process on the concatenated batch, in lockstep. With ``attach`` the comm
    hook all-reduces the selected values only (and zeroes the rest of a sparse param's
    gradient); without it, plain DDP all-reduces every entry, as for AdamW."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    start = _flat(model).clone()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB, gradient_as_bucket_view=bucket_view)
    opt = _optimizer(model, method)
    if attach:
        sync = gd.attach(ddp, opt)
        assert gd.attach(ddp, opt) is sync  # again: the same hook, not a second one
    single = _model()  # one process on the concatenated batch, in lockstep
    single_opt = _optimizer(single, method)
    phases = []
    unselected_grad_seen = False
    for step in range(steps):
        x, y = _batch(step, rank)
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        x, y = _batch(step)
        torch.nn.functional.mse_loss(single(x), y).backward()
        # Every rank holds the same averaged dense gradient: the single-process one. Under
        # attach, in training, a sparse param's is that gradient at the selected entries and 0
        # elsewhere; under plain DDP it is the whole gradient.
        phases.append(opt.phase)
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.layout == torch.strided for g in grads)
        _same_on_all_ranks(torch.cat([g.reshape(-1) for g in grads]), f"gradients at step {step}")
        unselected_grad_seen |= _check_ddp_grads(grads, single, single_opt, opt.phase, attach, step)
        opt.step()
        single_opt.step()
        opt.zero_grad()
        single_opt.zero_grad()
    assert opt.phase == "training" and phases[-1] == "training" and phases[0] != "training"
    assert attach or unselected_grad_seen  # plain DDP: the whole gradient, as AdamW would get it

    # Same selection and bit-identical weights on every rank.
    selected = opt.selected_entries()
    for p, (indices, _) in selected.items():
        _same_on_all_ranks(indices, "selected indices")
    _same_on_all_ranks(_flat(model), "weights")

    # Entries that were not selected are the starting bits.
    offset = 0
    untouched = torch.ones_like(start, dtype=torch.bool)
    for p in model.parameters():
        if p in selected:
            untouched[offset + selected[p][0]] = False
        else:
            untouched[offset:offset + p.numel()] = False  # dense params train fully
        offset += p.numel()
    assert torch.equal(_flat(model)[untouched], start[untouched])
    assert sum(int(i.numel()) for i, _ in selected.values()) == opt.selected_count() > 0

    # The same as one process on the concatenated batch.
    for (indices, _), (single_indices, _) in zip(selected.values(), single_opt.selected_entries().values()):
        assert torch.equal(indices, single_indices), "the selection differs from the single-process one"
    torch.testing.assert_close(_flat(model), _flat(single), rtol=1e-5, atol=1e-6)
    assert not torch.equal(_flat(model), start)
    if not attach:
        return

    # Bytes: dense while selecting, k + dense params once training.
    assert sync.stats.steps == steps
    dense_numel = sum(p.numel() for g in opt.param_groups if not g["sparse"] for p in g["params"])
    trainable = sum(p.numel() for p in model.parameters())
    plain = _plain_ddp_bytes(model)
    assert plain == 4 * trainable
    assert sync.stats.last_phase == "training"
    assert sync.stats.last_bytes == 4 * (opt.selected_count() + dense_numel)
    assert sync.stats.last_dense_bytes == plain
    select_phase = "calibration" if method == "gem" else "unmasking"
    count, sent, dense = sync.stats.by_phase[select_phase]
    assert sent == dense == count * plain
    assert sync.stats.check_bytes > 0
    if rank == 0:
        print(f"\n{method}: bytes all-reduced per training step {sync.stats.last_bytes} "
              f"(k={opt.selected_count()}, dense params {dense_numel}), plain DDP {plain}: "
              f"{plain / sync.stats.last_bytes:.1f}x fewer")


def test_ddp_gem_calibration_then_training():
    spawn(_ddp_worker, "gem", True, 7)


def test_ddp_id3_unmasking_then_training():
    spawn(_ddp_worker, "id3", False, 6)


def test_plain_ddp_trains_like_one_process():
    """No attach: plain DDP all-reduces the whole dense gradients, as for AdamW; GEM's
    calibration and training give the single-process selection and weights."""
    spawn(_ddp_worker, "gem", False, 7, False)


def _plain_ddp_resume_worker(rank, tmpdir):
    """A training-phase checkpoint of one process, loaded into a fresh optimizer over plain DDP,
    goes on as the single process does."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    trained = _model()
    trained_opt = _optimizer(trained, "id3")
    _train(trained, trained_opt, range(4))
    assert trained_opt.phase == "training"
    checkpoint = {"model": copy.deepcopy(trained.state_dict()), "opt": copy.deepcopy(trained_opt.state_dict())}
    _train(trained, trained_opt, range(4, 7))
    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    ddp = DDP(resumed, bucket_cap_mb=BUCKET_MB)
    resumed_opt = _optimizer(resumed, "id3")
    resumed_opt.load_state_dict(checkpoint["opt"])
    _train(ddp, resumed_opt, range(4, 7), rank)
    _same_on_all_ranks(_flat(resumed), "resumed weights")
    torch.testing.assert_close(_flat(resumed), _flat(trained), rtol=1e-5, atol=1e-6)


def test_plain_ddp_resumes_a_training_checkpoint():
    spawn(_plain_ddp_resume_worker)


def _misuse_worker(rank, tmpdir):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = _optimizer(model, "gem")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        gd.attach(model, opt)
    with pytest.raises(TypeError, match="SparseAdamW"):
        gd.attach(ddp, torch.optim.AdamW(model.parameters()))
    outside = torch.nn.Linear(4, 4)
    other = gem_kernels.SparseAdamW([{"params": [model[0].weight, outside.weight], "sparse": True}],
                                    density=0.1)
    with pytest.raises(ValueError, match="does not synchronise"):
        gd.attach(ddp, other)
    opt = _optimizer(model, "gem")
    sync = gd.attach(ddp, opt)
    replacement = _optimizer(model, "gem")  # a second optimizer over the same params: both live
    assert gd.attach(ddp, replacement) is sync and sync.optimizer is replacement
    _train(ddp, replacement, range(5), rank)
    assert replacement.phase == "training" and sync.stats.last_phase == "training"
    assert sync.stats.last_bytes < sync.stats.last_dense_bytes
    _same_on_all_ranks(_flat(model), "weights")

    # opt.calibrate() on the DDP model: averaged sums, the same selection everywhere. On the
    # module inside it: no averaging, so the ranks select differently, which the first training
    # backward reports clearly instead of mixing entries or hanging.
    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])
    for calibrated_on, fine in (("ddp", True), ("module", False)):
        model = _model()
        ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
        opt = gem_kernels.SparseAdamW(_groups(model), lr=1e-2, density=0.05, calibration_steps=0)
        gd.attach(ddp, opt)
        opt.calibrate(ddp if fine else model, [_batch(step, rank) for step in range(3)], loss_fn)
        x, y = _batch(3, rank)
        if fine:
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
            for indices, _ in opt.selected_entries().values():
                _same_on_all_ranks(indices, "indices selected by calibrate(ddp_model)")
        else:
            with pytest.raises(RuntimeError, match="ranks selected different entries"):
                torch.nn.functional.mse_loss(ddp(x), y).backward()


def test_attach_misuse_raises_clear_errors():
    spawn(_misuse_worker)


# ---------------------------------------------------------------------------------------
# Checkpoints under DDP: saved on rank 0, loaded on every rank, continue bit-identically


def _ddp_run(method, rank, steps, load=None):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    if load is not None:
        model.load_state_dict(load["model"])
    ddp = DDP(model, bucket_cap_mb=BUCKET_MB)
    opt = _optimizer(model, method)
    gd.attach(ddp, opt)
    if load is not None:
        opt.load_state_dict(load["opt"])
    _train(ddp, opt, steps, rank)
    return model, opt


def _checkpoint_worker(rank, tmpdir, cases):
    for method, total, cut in cases:
        full, full_opt = _ddp_run(method, rank, range(total))
        first, first_opt = _ddp_run(method, rank, range(cut))
        path = os.path.join(tmpdir, f"{method}-{cut}.pt")
        if rank == 0:
            torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, path)
        dist.barrier()
        saved_phase = first_opt.phase
        resumed, resumed_opt = _ddp_run(method, rank, range(cut, total), torch.load(path, weights_only=True))
        assert torch.equal(_flat(resumed), _flat(full)), f"{method}: resumed after {cut} steps ({saved_phase}) differs"
        assert resumed_opt.phase == full_opt.phase == "training"
        _same_on_all_ranks(_flat(resumed), "resumed weights")


def test_checkpoint_save_on_rank0_load_everywhere():
    """GEM cut in calibration and in training, ID3 in unmasking: bit-identical continuation."""
    spawn(_checkpoint_worker, [("gem", 6, 2), ("gem", 6, 4), ("id3", 6, 2)])


# ---------------------------------------------------------------------------------------
# Sharded selection (FSDP2's Shard(0) row blocks)


SHAPES = [(7, 5), (4, 3), (1, 6), (9,)]  # uneven rows; (1, 6) leaves rank 1 an empty shard


def _full_tensors():
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(s, generator=g) for s in SHAPES]
    # Few distinct values, so ties decide many places (ties go to the smaller flat index).
    grads = [torch.randint(-3, 4, s, generator=g).float() * 0.5 for s in SHAPES]
    weights[1] = torch.ones(SHAPES[1])
    return grads, weights


def _local(tensors, where):
    return [t.reshape(-1)[off:off + n].clone() for t, (off, n) in zip(tensors, where)]


def _mine(indices, offsets, where):
    """The part of a full-tensor selection in this rank's shards, as local indices."""
    bounds = offsets.tolist()
    out, counts = [], []
    for seg, (off, n) in enumerate(where):
        idx = indices[bounds[seg]:bounds[seg + 1]]
        idx = idx[(idx >= off) & (idx < off + n)] - off
        out.append(idx)
        counts.append(idx.numel())
    return torch.cat(out), counts


def _sharded_worker(rank, tmpdir):
    grads, weights = _full_tensors()
    where = gd.shard_offsets(SHAPES, WORLD, rank)
    assert where[2] == ((0, 6) if rank == 0 else (6, 0))
    local_g, local_w = _local(grads, where), _local(weights, where)
    offsets_only = [off for off, _ in where]
    numels = [w.numel() for w in weights]

    stats = gd.sharded_layer_stats(local_g, local_w)
    torch.testing.assert_close(stats, gem_kernels.layer_stats(grads, weights), rtol=1e-12, atol=0)
    _same_on_all_ranks(stats, "combined layer_stats")

    cases = [(gem_kernels.GEM(), 20, None), (gem_kernels.GradMagnitude(), 15, None),
             (gem_kernels.ID3(total_steps=2), 10, None)]
    full_exclude = gem_kernels.ratio_topk(grads, weights, 6)  # an already-unmasked set for ID3
    cases.append((gem_kernels.ID3(total_steps=2), 10, full_exclude))
    for selector, budget, exclude in cases:
        if isinstance(selector, gem_kernels.ID3):
            expected = selector.select_new(grads, weights, budget, exclude)
        else:
            expected = selector.select(grads, weights, budget)
        local_exclude = None
        if exclude is not None:
            ex, ex_counts = _mine(exclude[0], exclude[1], where)
            local_exclude = (ex, torch.tensor([0] + ex_counts).cumsum(0))
        got = gd.sharded_select(selector, local_g, local_w, offsets_only, numels, budget, local_exclude)
        want, counts = _mine(expected.indices, expected.offsets, where)
        assert torch.equal(got.indices, want), f"{selector!r}: rank {rank} got {got.indices.tolist()}"
        assert got.offsets.diff().tolist() == counts
        if expected.entropy is not None:
            assert got.entropy == pytest.approx(expected.entropy, rel=1e-12)
        total = torch.tensor([got.indices.numel()])
        dist.all_reduce(total)
        assert int(total) == expected.indices.numel()

    # With real FSDP2 shards: fully_shard's params and gradients (DTensors, Shard(0)).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1),
                                torch.nn.Linear(1, 9))  # (1, 7): rank 1 holds no row
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))  # the same on both ranks
    model(x).square().mean().backward()
    weights = [p for p in model.parameters() if p.dim() == 2]
    local_w, offsets, numels = gd.local_shards(weights)
    local_g, grad_offsets, _ = gd.local_shards([p.grad for p in weights])
    assert offsets == grad_offsets and numels == [35, 7, 9]
    full_w = [p.full_tensor() for p in weights]
    full_g = [p.grad.full_tensor() for p in weights]
    expected = gem_kernels.GEM().select(full_g, full_w, 12)
    got = gd.sharded_select(gem_kernels.GEM(), local_g, local_w, offsets, numels, 12)
    want, counts = _mine(expected.indices, expected.offsets, list(zip(offsets, [w.numel() for w in local_w])))
    assert torch.equal(got.indices, want) and got.offsets.diff().tolist() == counts
    with pytest.raises(TypeError, match="not a DTensor"):
        gd.local_shards(full_w)


def test_sharded_selection_equals_single_process():
    spawn(_sharded_worker)
