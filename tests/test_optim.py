"""SparseAdamW as a drop-in AdamW: phases, exactness against torch AdamW, hooks, GradScaler,
schedulers, and every bad input rejected before anything changes."""
import copy

import pytest
import torch

from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM, ID3, Random


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).to(dtype)


def _batches(n, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def _train(model, opt, batches, scheduler=None):
    for batch in batches:
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def _snapshot(opt):
    """Deep copy of everything an optimizer step may change."""
    return copy.deepcopy({k: v for k, v in opt.state_dict().items()})


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_drop_in_loop_gem_changes_only_selected_entries():
    model = _mlp()
    start = copy.deepcopy(model.state_dict())
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.05, calibration_steps=2)
    assert opt.phase == "calibration" and opt.selected_count() == 0
    batches = _batches(8)
    _train(model, opt, batches[:2])
    assert opt.phase == "training"
    assert torch.equal(model[0].weight, start["0.weight"]) and torch.equal(model[0].bias, start["0.bias"])
    n_sparse = 12 * 24 + 24 * 3
    assert n_sparse * 0.05 - 2 < opt.selected_count() <= round(n_sparse * 0.05)
    _train(model, opt, batches[2:])
    entries = opt.selected_entries()
    assert set(entries) == {model[0].weight, model[2].weight}
    for name, p in (("0.weight", model[0].weight), ("2.weight", model[2].weight)):
        indices, original = entries[p]
        assert indices.dtype == torch.int64 and bool((indices.diff() > 0).all())
        assert torch.equal(original, start[name].reshape(-1)[indices])
        changed = torch.nonzero(p.detach().reshape(-1) != start[name].reshape(-1)).reshape(-1)
        assert changed.numel() > 0 and bool(torch.isin(changed, indices).all())
        assert p.grad is None
        k = indices.numel()  # optimizer state is O(k): nothing dense survives the selection
        assert {key: v.numel() for key, v in opt.state[p].items() if key != "step"} == dict.fromkeys(
            ("indices", "original", "exp_avg", "exp_avg_sq"), k)
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert not torch.equal(model[0].bias, start["0.bias"])  # the dense group trains
    report = opt.selection_report()
    assert [row["count"] for row in report] == [entries[p][0].numel() for p in entries]
    assert all(row["entropy"] > 0 and row["score"] > 0 for row in report)


@pytest.mark.parametrize("with_scheduler", [False, True])
def test_matches_torch_adamw_with_masked_grads(with_scheduler):
    """50 training steps: selected entries and dense params as torch AdamW on a copy whose sparse
    grads are masked; unselected entries bit-identical to the start."""
    model = _mlp()
    twin = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    hyper = dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
    opt = SparseAdamW(model.parameters(), density=0.1, calibration_steps=1, **hyper)
    batches = _batches(51)
    _train(model, opt, batches[:1])
    masks = {}
    for p_twin, (p, (indices, _)) in zip((twin[0].weight, twin[2].weight), opt.selected_entries().items()):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[indices] = True
        masks[p_twin] = mask.reshape(p.shape)
    torch_opt = torch.optim.AdamW(twin.parameters(), **hyper)
    twin_start = {p: p.detach().clone() for p in masks}
    schedulers = [None, None]
    if with_scheduler:
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (opt, torch_opt)]
    _train(model, opt, batches[1:], schedulers[0])
    for batch in batches[1:]:
        _loss(twin, batch).backward()
        for p, mask in masks.items():
            p.grad.mul_(mask)
        torch_opt.step()
        torch_opt.zero_grad()
        with torch.no_grad():  # AdamW decays every entry; undo it where SparseAdamW never writes
            for p, mask in masks.items():
                p[~mask] = twin_start[p][~mask]
        if schedulers[1] is not None:
            schedulers[1].step()
    for (name, p), p_twin in zip(model.named_parameters(), twin.parameters()):
        if p_twin in masks:
            mask = masks[p_twin]
            assert torch.equal(p.detach()[~mask], start[name][~mask]), name
            torch.testing.assert_close(p.detach()[mask], p_twin.detach()[mask], rtol=1e-5, atol=1e-7)
            assert not torch.equal(p.detach()[mask], start[name][mask])
        else:
            # Dense groups run torch's AdamW, but their inputs differ by the sparse op's rounding
            # (backends agree within tolerance); test_dense_groups_match_torch_adamw_exactly
            # checks the bits with the sparse weights held still.
            torch.testing.assert_close(p, p_twin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_dense_groups_match_torch_adamw_exactly(foreach):
    model = _mlp()
    twin = copy.deepcopy(model)
    hyper = dict(lr=1e-2, weight_decay=0.05, foreach=foreach, maximize=True)
    # lr 0 in the sparse group keeps the forward pass the same as the twin's (frozen) weight.
    groups = [{"params": [model[0].weight], "sparse": True, "lr": 0.0},
              {"params": [model[0].bias, model[2].weight, model[2].bias], "sparse": False}]
    opt = SparseAdamW(groups, budget=10, selector=Random(0), **hyper)
    assert opt.phase == "training"
    twin[0].weight.requires_grad_(False)
    torch_opt = torch.optim.AdamW([twin[0].bias, twin[2].weight, twin[2].bias], **hyper)
    _train(model, opt, _batches(5))
    _train(twin, torch_opt, _batches(5))
    for p, q in zip(list(model.parameters())[1:], list(twin.parameters())[1:]):
        assert torch.equal(p, q)


def test_default_split_and_sparse_override():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), budget=5)
    assert [(g["sparse"], len(g["params"])) for g in opt.param_groups] == [(True, 2), (False, 2)]
    opt = SparseAdamW([{"params": model.parameters(), "sparse": True}], budget=5)
    assert [(g["sparse"], len(g["params"])) for g in opt.param_groups] == [(True, 4)]
    named = SparseAdamW(model.named_parameters(), budget=5, selector=Random(0))
    assert [row["name"] for row in named.selection_report()] == ["0.weight", "2.weight"]


def test_gradient_accumulation_sums_and_the_step_reads_the_sum():
    # .grad is autograd's dense gradient, accumulated as with AdamW; the step reads the sum.
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(1))
    twin = copy.deepcopy(model)
    twin_opt = SparseAdamW(twin.parameters(), lr=1e-2, budget=30, selector=Random(1))
    a, b = _batches(2)
    _loss(model, a).backward()
    _loss(model, b).backward()
    twin_grads = {n: [] for n, _ in twin.named_parameters()}
    for batch in (a, b):
        twin.zero_grad()
        _loss(twin, batch).backward()
        for n, p in twin.named_parameters():
            twin_grads[n].append(p.grad.clone())
    for n, p in model.named_parameters():
        assert p.grad.layout == torch.strided and p.grad.shape == p.shape, n
        assert torch.equal(p.grad, twin_grads[n][0] + twin_grads[n][1]), n
    indices = opt.selected_entries()[model[0].weight][0]
    unselected = torch.ones(model[0].weight.numel(), dtype=torch.bool)
    unselected[indices] = False
    assert bool((model[0].weight.grad.reshape(-1)[unselected] != 0).any())  # the whole gradient is kept
    # The twin steps on the summed gradient set by hand: the same step.
    for p, q in zip(twin.parameters(), model.parameters()):
        p.grad = q.grad.clone()
    opt.step()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_optimizer_leaves_modules_and_gradients_as_torch_adamw_does():
    """No class swap, no forward hook, no gradient hook: after the selection .grad is the dense
    gradient autograd made (the same bits as on a copy of the model no optimizer knows), and
    step() reads it without writing it."""
    from torch.nn.modules import module as module_mod
    global_hooks = (len(module_mod._global_forward_hooks), len(module_mod._global_forward_pre_hooks))
    model = _mlp()
    classes = [type(m) for m in model.modules()]
    opt = SparseAdamW(model.parameters(), lr=1e-2, density=0.05, calibration_steps=1)
    batches = _batches(3)
    _train(model, opt, batches[:1])
    assert opt.phase == "training"
    for batch in batches[1:]:
        twin = copy.deepcopy(model)
        _loss(model, batch).backward()
        _loss(twin, batch).backward()
        assert [type(m) for m in model.modules()] == classes
        assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
                   for m in model.modules())
        assert (len(module_mod._global_forward_hooks), len(module_mod._global_forward_pre_hooks)) == global_hooks
        for p, q in zip(model.parameters(), twin.parameters()):
            assert p.grad.layout == torch.strided and p.grad.shape == p.shape
            assert torch.equal(p.grad, q.grad)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        assert not torch.equal(model[0].weight, twin[0].weight)  # it did step
        opt.zero_grad()


def test_calibrate_matches_calibration_steps():
    batches = _batches(3)
    model_a, model_b = _mlp(), _mlp()
    opt_a = SparseAdamW(model_a.parameters(), budget=40, calibration_steps=3)
    _train(model_a, opt_a, batches)
    opt_b = SparseAdamW(model_b.parameters(), budget=40, calibration_steps=0)
    with pytest.raises(RuntimeError, match="calibrate"):
        opt_b.step()
    opt_b.calibrate(model_b, batches, _loss)
    assert opt_b.phase == "training" and all(p.grad is None for p in model_b.parameters())
    for (ia, oa), (ib, ob) in zip(opt_a.selected_entries().values(), opt_b.selected_entries().values()):
        assert torch.equal(ia, ib) and torch.equal(oa, ob)
    with pytest.raises(RuntimeError, match="calibration phase"):
        opt_b.calibrate(model_b, batches, _loss)


def test_id3_unmasks_schedule_and_never_removes():
    model = _mlp()
    budget, total = 23, 5
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=budget, selector=ID3(total_steps=total))
    assert opt.phase == "unmasking"
    previous = {p: torch.zeros(0, dtype=torch.int64) for p in (model[0].weight, model[2].weight)}
    for t, batch in enumerate(_batches(8), start=1):
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        entries = opt.selected_entries()
        expected = sum(budget // total + (1 if s <= budget % total else 0) for s in range(1, min(t, total) + 1))
        assert opt.selected_count() == expected
        for p, (indices, _) in entries.items():
            assert bool(torch.isin(previous[p], indices).all())
            previous[p] = indices
        assert opt.phase == ("training" if t >= total else "unmasking")
    assert opt.selected_count() == budget
    ages = torch.cat([opt.state[p]["age"] for p in previous])
    assert int(ages.max()) == 8 and int(ages.min()) == 8 - total + 1


def test_grad_scaler_power_of_two_is_exact_and_inf_skips():
    batches = _batches(6)
    plain, scaled = _mlp(), _mlp()
    opt_plain = SparseAdamW(plain.parameters(), lr=1e-2, budget=40, calibration_steps=2)
    opt_scaled = SparseAdamW(scaled.parameters(), lr=1e-2, budget=40, calibration_steps=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    _train(plain, opt_plain, batches)
    for batch in batches:
        scaler.scale(_loss(scaled, batch)).backward()
        scaler.step(opt_scaled)
        scaler.update()
        opt_scaled.zero_grad()
    for p, q in zip(plain.parameters(), scaled.parameters()):
        assert torch.equal(p, q)
    before_weights = copy.deepcopy(scaled.state_dict())
    before_state = _snapshot(opt_scaled)
    scaler.scale(_loss(scaled, batches[0]) * float("inf")).backward()
    scaler.step(opt_scaled)
    scaler.update()
    opt_scaled.zero_grad()
    assert scaler.get_scale() == 2.0 ** 11
    assert _same(before_weights, scaled.state_dict()) and _same(before_state, _snapshot(opt_scaled))


def test_tensor_lr_and_scheduler_are_read_every_step():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=torch.tensor(1e-2), budget=40, selector=Random(0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 2 else 1.0)
    batches = _batches(4)
    _train(model, opt, batches[:2], scheduler)
    frozen = copy.deepcopy(model.state_dict())
    _train(model, opt, batches[2:], scheduler)  # lr 0 from here: no change at all
    assert _same(frozen, model.state_dict())


def test_torch_clip_grad_norm_measures_the_whole_dense_gradient():
    # As with AdamW: torch's clip_grad_norm_ reads every entry of every gradient (the sparse
    # params' unselected entries too), and the step reads the clipped values.
    model = _mlp()
    twin = copy.deepcopy(model)
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=40, selector=Random(0))
    twin_opt = SparseAdamW(twin.parameters(), lr=1e-2, budget=40, selector=Random(0))
    batch = _batches(1)[0]
    _loss(model, batch).backward()
    _loss(twin, batch).backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    entries = opt.selected_entries()
    selected = torch.cat([p.grad.reshape(-1)[entries[p][0]] for p in (model[0].weight, model[2].weight)]
                         + [model[0].bias.grad, model[2].bias.grad])
    assert float(torch.linalg.vector_norm(selected)) < 0.9 * float(expected)  # the two norms differ
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    torch.testing.assert_close(total, expected)
    clipped = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(torch.linalg.vector_norm(clipped), torch.tensor(1e-3), rtol=1e-3, atol=0)
    scale = torch.clamp(1e-3 / (expected + 1e-6), max=1.0)  # torch's formula
    for p in twin.parameters():
        p.grad.mul_(scale)
    opt.step()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_tiny_bert_bf16_drop_in():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(torch.bfloat16)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier")]
    opt = SparseAdamW([{"params": body}, {"params": [("classifier." + n, p) for n, p in
                                                     model.classifier.named_parameters()], "sparse": False}],
                      lr=1e-2, density=1e-2, calibration_steps=2)
    assert len(head) == 2
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(0, 50, (4, 8), generator=gen)
        labels = torch.randint(0, 2, (4,), generator=gen)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    entries = {n: entries for n, entries in zip([n for n, p in body if p.dim() >= 2],
                                                 opt.selected_entries().values())}
    for name, p in model.named_parameters():
        if name in entries:
            indices, original = entries[name]
            assert original.dtype == torch.bfloat16 and torch.equal(original, start[name].reshape(-1)[indices])
            changed = torch.nonzero(p.detach().reshape(-1) != start[name].reshape(-1)).reshape(-1)
            assert bool(torch.isin(changed, indices).all()), name
    assert not torch.equal(model.classifier.weight, start["classifier.weight"])


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(density=0.0), ValueError, "density"),
    (dict(density=-0.1), ValueError, "density"),
    (dict(density=1.5), ValueError, "density"),
    (dict(density=float("nan")), ValueError, "density"),
    (dict(density=True), TypeError, "density"),
    (dict(density=1e-9), ValueError, "density"),
    (dict(budget=0), ValueError, "budget"),
    (dict(budget=10 ** 6), ValueError, "budget"),
    (dict(budget=2.0), TypeError, "budget"),
    (dict(), ValueError, "exactly one"),
    (dict(density=0.1, budget=3), ValueError, "exactly one"),
    (dict(budget=3, capturable=True), ValueError, "capturable"),
    (dict(budget=3, differentiable=True), ValueError, "differentiable"),
    (dict(budget=3, foreach=True, fused=True), ValueError, "foreach"),
    (dict(budget=3, lr=-1.0), ValueError, "lr"),
    (dict(budget=3, betas=(0.9, 1.0)), ValueError, "betas"),
    (dict(budget=3, weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(budget=3, selector="gem"), TypeError, "selector"),
    (dict(budget=3, calibration_steps=-1), ValueError, "calibration_steps"),
    (dict(budget=3, selector=ID3(4), calibration_steps=2), ValueError, "calibration"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        SparseAdamW(_mlp().parameters(), **kwargs)


def test_no_sparse_params_is_rejected():
    model = _mlp()
    with pytest.raises(ValueError, match="no sparse parameters"):
        SparseAdamW([model[0].bias], budget=1)


def test_sparse_group_after_selection_is_rejected():
    model, other = _mlp(), _mlp(1)
    opt = SparseAdamW(model.parameters(), budget=5, selector=Random(0))
    with pytest.raises(ValueError, match="before the selection"):
        opt.add_param_group({"params": [other[0].weight]})
    opt.add_param_group({"params": [other[0].bias]})  # dense groups may join at any time
    assert opt.param_groups[-1]["sparse"] is False


@pytest.mark.parametrize("phase_steps, selector", [(0, GEM()), (1, GEM()), (3, GEM()), (1, ID3(4)),
                                                   (5, ID3(4))])
def test_nonfinite_grad_raises_and_changes_nothing(phase_steps, selector):
    model = _mlp()
    kwargs = {} if isinstance(selector, ID3) else {"calibration_steps": 2}
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=selector, **kwargs)
    batches = _batches(phase_steps + 1)
    _train(model, opt, batches[:phase_steps])
    _loss(model, batches[-1]).backward()
    weights = copy.deepcopy(model.state_dict())
    state = _snapshot(opt)
    target = model[2].weight
    # In training the step reads the selected entries only (as the op does): put the NaN in one.
    where = opt.selected_entries()[target][0][0] if opt.phase == "training" else 0
    target.grad.view(-1)[where] = float("nan")
    with pytest.raises(ValueError, match=r"params'\]\[1\].*\(shape \(3, 24\)\).*NaN or inf"):
        opt.step()
    assert _same(weights, model.state_dict()) and _same(state, _snapshot(opt))


def test_frozen_and_unused_params_get_no_entries_and_the_budget_goes_elsewhere():
    # Frozen: never a candidate. Unused (requires grad, but no gradient in calibration, like
    # BertModel's pooler under a loss on last_hidden_state): a warning, a note, no entries.
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
    unused = torch.nn.Linear(5, 7)
    model[0].weight.requires_grad_(False)
    params = list(model.parameters()) + [unused.weight]
    opt = SparseAdamW(params, budget=40, calibration_steps=2)
    batches = _batches(2)
    _train(model, opt, batches[:1])
    _loss(model, batches[1]).backward()
    with pytest.warns(UserWarning, match="got no gradient during calibration"):
        opt.step()
    rows = opt.selection_report()
    assert [row["count"] for row in rows] == [0, 40, 0]
    assert "frozen" in rows[0]["note"] and "no gradient" in rows[2]["note"] and rows[1]["note"] is None


def test_params_without_grad_are_skipped_in_training():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0))
    _train(model, opt, _batches(2))
    frozen = model[0].weight.detach().clone()
    state_before = copy.deepcopy(opt.state[model[0].weight])
    x, y = _batches(1, seed=9)[0]
    # Only the last layer gets a gradient: its input is detached.
    torch.nn.functional.cross_entropy(model[2](model[1](model[0](x)).detach()), y).backward()
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert _same(state_before, opt.state[model[0].weight])
    assert int(opt.state[model[2].weight]["step"]) == 3 and int(opt.state[model[0].weight]["step"]) == 2


def test_nonfinite_grad_in_dense_group_names_it_and_changes_nothing():
    model = _mlp()
    opt = SparseAdamW(model.parameters(), lr=1e-2, budget=30, selector=Random(0))
    _train(model, opt, _batches(1))
    _loss(model, _batches(1, seed=3)[0]).backward()
    model[2].bias.grad[1] = float("inf")
    weights, state = copy.deepcopy(model.state_dict()), _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] \(shape \(3,\)\).*NaN or inf"):
        opt.step()
    assert _same(weights, model.state_dict()) and _same(state, _snapshot(opt))


def test_gradients_are_read_at_the_selected_entries_only():
    # autograd's gradient, one zeroed outside the selection and one with garbage there (a user's
    # own .grad) all give the same step: only the selected entries are read.
    models = [_mlp() for _ in range(3)]
    opts = [SparseAdamW(m.parameters(), lr=1e-2, density=0.05, calibration_steps=1) for m in models]
    batches = _batches(4)
    for m, o in zip(models, opts):
        _train(m, o, batches[:1])
        assert o.phase == "training"
    gen = torch.Generator().manual_seed(5)
    for batch in batches[1:]:
        for i, (m, o) in enumerate(zip(models, opts)):
            _loss(m, batch).backward()
            if i > 0:
                for p, (indices, _) in o.selected_entries().items():
                    outside = torch.ones(p.numel(), dtype=torch.bool)
                    outside[indices] = False
                    flat = p.grad.view(-1)
                    flat[outside] = 0.0 if i == 1 else 1e3 * torch.randn(int(outside.sum()), generator=gen)
            o.step()
            o.zero_grad()
    for other in models[1:]:
        for a, b in zip(models[0].parameters(), other.parameters()):
            assert torch.equal(a, b)
    assert not torch.equal(models[0][0].weight, _mlp()[0].weight)


def test_random_never_spends_budget_on_frozen_params():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = SparseAdamW(model.parameters(), budget=64, selector=Random(0))
    counts = [row["count"] for row in opt.selection_report()]
    assert counts == [0, 64] and "frozen" in opt.selection_report()[0]["note"]
