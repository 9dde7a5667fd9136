"""Sparse deltas: save / apply / remove are exact, O(k) in size, and every bad file or model is
rejected with a ValueError that leaves the model bit for bit as it was."""
import json
import struct

import pytest
import torch

from gem_kernels import delta
from gem_kernels.optim import SparseAdamW
from gem_kernels.selectors import GEM

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _toy_model(dtype=torch.float32, width=24, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
    for module in model:
        if isinstance(module, torch.nn.Linear):
            module.bias.requires_grad_(False)  # only the weight matrices train (sparsely)
    return model.to(dtype)


def _batches(n, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=gen).to(dtype), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def _train(model, batches, budget, calibration_steps=2):
    """Sparse fine-tunes ``model`` in place; returns the optimizer."""
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, budget=budget,
                      selector=GEM(), calibration_steps=calibration_steps, weight_decay=0.0)
    for batch in batches:
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
    # GEM floors each tensor's share of the budget, so a few entries may go unused.
    assert opt.phase == "training" and 0 < opt.selected_count() <= budget
    return opt


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _count_changed(a, b):
    return int((a.reshape(-1).view(_INT_VIEW[a.dtype]) != b.reshape(-1).view(_INT_VIEW[b.dtype])).sum())


def _assert_bitwise_equal(model, snapshot):
    params = dict(model.named_parameters())
    assert params.keys() == snapshot.keys()
    for name, p in params.items():
        assert p.dtype == snapshot[name].dtype, name
        assert torch.equal(p.detach().view(torch.uint8), snapshot[name].view(torch.uint8)), name


@pytest.fixture(scope="module")
def trained_fp32(tmp_path_factory):
    """(base snapshot, trained model, delta path, optimizer) for the fp32 toy model."""
    model = _toy_model()
    base = _snapshot(model)
    opt = _train(model, _batches(6, torch.float32), budget=40)
    path = tmp_path_factory.mktemp("delta") / "toy.safetensors"
    delta.save_delta(model, path, opt)
    return base, model, path, opt


def _fresh_base():
    return _toy_model()


# ---------------------------------------------------------------------------------------
# Round trip and size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_then_remove_is_bitwise_exact(dtype, tmp_path):
    model = _toy_model(dtype)
    base = _snapshot(model)
    opt = _train(model, _batches(6, dtype), budget=40)
    trained = _snapshot(model)
    path = tmp_path / "d.safetensors"
    summary = delta.save_delta(model, path, opt)

    n_changed = sum(_count_changed(base[n], trained[n]) for n in base)
    assert n_changed > 0, "training changed nothing; the round trip would prove nothing"
    # The file holds exactly the changed entries, and only selected entries can change.
    assert summary["entries"] == n_changed <= opt.selected_count()

    fresh = _toy_model(dtype)
    _assert_bitwise_equal(fresh, base)
    assert delta.apply_delta(fresh, path) == n_changed
    _assert_bitwise_equal(fresh, trained)
    assert delta.remove_delta(fresh, path) == n_changed
    _assert_bitwise_equal(fresh, base)


def test_file_size_is_order_k(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256, bias=False))
    budget = 200
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 256, generator=gen), torch.randint(0, 256, (8,), generator=gen))
               for _ in range(4)]
    opt = _train(model, batches, budget=budget)
    path = tmp_path / "big.safetensors"
    summary = delta.save_delta(model, path, opt)
    size = path.stat().st_size
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    per_entry = 8 + 2 * 4  # int64 index + new and original fp32 values
    # The header (JSON table and checksums) is a fixed cost of a few hundred bytes per tensor.
    assert summary["bytes"] == size
    assert size <= budget * per_entry + 2048, size
    assert size * 100 < full, (size, full)


def test_bert_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48,
                                     max_position_embeddings=32, num_labels=2)

    def make():
        torch.manual_seed(0)
        m = transformers.BertForSequenceClassification(config).eval()  # no dropout: repeatable
        for name, p in m.named_parameters():
            p.requires_grad_(name.endswith(("query.weight", "value.weight")))
        return m

    model = make()
    base = _snapshot(model)
    gen = torch.Generator().manual_seed(0)
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, budget=30,
                      selector=GEM(), calibration_steps=2)
    for _ in range(5):
        ids = torch.randint(0, 64, (4, 10), generator=gen)
        labels = torch.randint(0, 2, (4,), generator=gen)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    trained = _snapshot(model)
    path = tmp_path / "bert.safetensors"
    summary = delta.save_delta(model, path, opt)
    assert 0 < summary["entries"] <= opt.selected_count() <= 30
    names = set(delta.load_delta(path))
    assert names and all(n.endswith(("query.weight", "value.weight")) for n in names)

    fresh = make()
    _assert_bitwise_equal(fresh, base)
    delta.apply_delta(fresh, path)
    _assert_bitwise_equal(fresh, trained)
    delta.remove_delta(fresh, path)
    _assert_bitwise_equal(fresh, base)


def test_metadata_records_version_and_checksums(trained_fp32):
    import gem_kernels
    _, _, path, _ = trained_fp32
    metadata = delta._read_metadata(path.read_bytes(), path)
    assert metadata["gem_kernels_version"] == gem_kernels.__version__
    table = json.loads(metadata["tensors"])
    assert table and all(len(info["base_sha256"]) == 64 for info in table.values())
    assert len(metadata["payload_sha256"]) == 64


# ---------------------------------------------------------------------------------------
# Error paths: each raises ValueError naming the problem and leaves the model unchanged.


def _expect_rejected(model, call, match):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        call()
    _assert_bitwise_equal(model, before)


def _rewrite(path, out, edit, text=None):
    """Copies a delta with ``edit(tensors, table)`` (and ``text`` on the table's JSON) applied and a
    freshly computed checksum, so a test reaches the checks behind the checksum (as a deliberately
    forged file would)."""
    from safetensors.torch import load, save
    tensors = load(path.read_bytes())
    metadata = delta._read_metadata(path.read_bytes(), path)
    table = json.loads(metadata["tensors"])
    edit(tensors, table)
    metadata["tensors"] = json.dumps(table, sort_keys=True)
    if text is not None:
        metadata["tensors"] = text(metadata["tensors"])
    metadata["payload_sha256"] = delta._payload_sha256(tensors, metadata)
    out.write_bytes(save(tensors, metadata=metadata))
    return out


def _last_name(path):
    return sorted(delta.load_delta(path))[-1]


def test_different_base_model_is_rejected(trained_fp32):
    _, _, path, _ = trained_fp32
    other = _toy_model(seed=1)
    _expect_rejected(other, lambda: delta.apply_delta(other, path), "different base model")


def test_one_mismatching_tensor_blocks_all_writes(trained_fp32):
    """The mismatch sits in the last tensor checked: nothing of the earlier ones is written."""
    _, _, path, _ = trained_fp32
    entries = delta.load_delta(path)
    assert len(entries) >= 2
    model = _fresh_base()
    last = _last_name(path)
    with torch.no_grad():
        flat = dict(model.named_parameters())[last].view(-1)
        flat[entries[last]["indices"][-1]] += 1.0
    _expect_rejected(model, lambda: delta.apply_delta(model, path), "different base model")


def test_apply_twice_is_rejected(trained_fp32):
    _, trained, path, _ = trained_fp32
    model = _fresh_base()
    delta.apply_delta(model, path)
    _expect_rejected(model, lambda: delta.apply_delta(model, path), "already applied")
    _assert_bitwise_equal(model, _snapshot(trained))


def test_remove_when_not_applied_is_rejected(trained_fp32):
    _, _, path, _ = trained_fp32
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.remove_delta(model, path), "not applied")


def test_missing_tensor_name_is_rejected(trained_fp32):
    _, _, path, _ = trained_fp32
    base = _fresh_base()
    renamed = torch.nn.ModuleDict({"encoder": base})  # same tensors, every name prefixed
    _expect_rejected(renamed, lambda: delta.apply_delta(renamed, path), "not a parameter of this model")


def test_shape_mismatch_is_rejected(trained_fp32):
    _, _, path, _ = trained_fp32
    wider = _toy_model(width=25)
    _expect_rejected(wider, lambda: delta.apply_delta(wider, path), "shape")


def test_dtype_mismatch_is_rejected(trained_fp32):
    _, _, path, _ = trained_fp32
    half = _toy_model(torch.float16)
    _expect_rejected(half, lambda: delta.apply_delta(half, path), "dtype")


def test_truncated_file_is_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    blob = path.read_bytes()
    model = _fresh_base()
    for cut in (4, 100, len(blob) - 3):
        short = tmp_path / f"cut{cut}.safetensors"
        short.write_bytes(blob[:cut])
        _expect_rejected(model, lambda: delta.apply_delta(model, short), "truncated")


def test_tampered_file_is_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    blob = bytearray(path.read_bytes())
    blob[-2] ^= 0x01  # one bit of the last tensor's data
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(blob))
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "checksum")


def test_tampered_metadata_is_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    blob = path.read_bytes()
    # Same-length edit of the version string inside the header keeps the file parseable.
    import gem_kernels
    old = f'"gem_kernels_version":"{gem_kernels.__version__}"'.encode()
    assert old in blob
    new = old.replace(gem_kernels.__version__.encode(), b"9" * len(gem_kernels.__version__))
    bad = tmp_path / "meta.safetensors"
    bad.write_bytes(blob.replace(old, new))
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "checksum")


def test_out_of_range_indices_are_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    name = _last_name(path)

    def edit(tensors, table):
        tensors[f"{name}::indices"][-1] = 10 ** 6
    bad = _rewrite(path, tmp_path / "range.safetensors", edit)
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "out of range")


def test_unsorted_indices_are_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    name = max(delta.load_delta(path).items(), key=lambda kv: kv[1]["indices"].numel())[0]

    def edit(tensors, table):
        tensors[f"{name}::indices"] = tensors[f"{name}::indices"].flip(0).contiguous()
    bad = _rewrite(path, tmp_path / "unsorted.safetensors", edit)
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "not strictly ascending")


def test_value_dtype_inconsistent_with_table_is_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    name = _last_name(path)

    def edit(tensors, table):
        tensors[f"{name}::new"] = tensors[f"{name}::new"].half()
    bad = _rewrite(path, tmp_path / "dtype.safetensors", edit)
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "new values are float16")


def test_missing_tensor_part_is_rejected(trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    name = _last_name(path)
    bad = _rewrite(path, tmp_path / "part.safetensors",
                   lambda tensors, table: tensors.pop(f"{name}::original"))
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "missing")


def test_not_a_delta_file_is_rejected(tmp_path):
    from safetensors.torch import save_file
    model = _fresh_base()
    other = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(other))
    _expect_rejected(model, lambda: delta.apply_delta(model, other), "not a gem_kernels delta")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 16)
    _expect_rejected(model, lambda: delta.apply_delta(model, garbage), "corrupt header")


@pytest.mark.parametrize("header", [b"[]", b"[1, 2]", b"7", b'"text"', b"null", b'{"__metadata__": [1]}'])
def test_header_that_is_not_a_json_object_is_rejected(header, tmp_path):
    """Parseable JSON of the wrong shape is as corrupt as unparseable JSON (it was an AttributeError)."""
    model = _fresh_base()
    bad = tmp_path / "not_an_object.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "corrupt header")


def test_tensor_table_that_is_not_an_object_is_rejected(trained_fp32, tmp_path):
    """A forged file (checksum recomputed) whose table is a JSON list of the tensor names."""
    from safetensors.torch import load, save
    _, _, path, _ = trained_fp32
    tensors = load(path.read_bytes())
    metadata = delta._read_metadata(path.read_bytes(), path)
    metadata["tensors"] = json.dumps(sorted(json.loads(metadata["tensors"])))
    metadata["payload_sha256"] = delta._payload_sha256(tensors, metadata)
    bad = tmp_path / "table_list.safetensors"
    bad.write_bytes(save(tensors, metadata=metadata))
    model = _fresh_base()
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), "no readable tensor table")


# A user who edits the table and recomputes the checksum: each field the code reads is checked
# first (these were a KeyError, a TypeError, an OverflowError and a TypeError).
FORGED_TABLE_ENTRIES = {
    "no shape": (lambda info: info.pop("shape"), None),
    "shape null": (lambda info: info.update(shape=None), None),
    "shape 1e400": (lambda info: info.update(shape="INF"), lambda text: text.replace('"INF"', "[1e400]")),
    "dtype a list": (lambda info: info.update(dtype=[info["dtype"]]), None),
}


@pytest.mark.parametrize("forged", FORGED_TABLE_ENTRIES)
def test_forged_table_entry_is_rejected(forged, trained_fp32, tmp_path):
    _, _, path, _ = trained_fp32
    name = _last_name(path)
    edit_info, text = FORGED_TABLE_ENTRIES[forged]
    bad = _rewrite(path, tmp_path / "forged.safetensors", lambda tensors, table: edit_info(table[name]), text)
    model = _fresh_base()
    field = "dtype" if "dtype" in forged else "shape"
    match = rf"table entry '{name}' has (unsupported )?{field}"
    _expect_rejected(model, lambda: delta.apply_delta(model, bad), match)
    with pytest.raises(ValueError, match=match):
        delta.load_delta(bad)
    delta.apply_delta(model, path)
    _expect_rejected(model, lambda: delta.remove_delta(model, bad), match)


def test_bad_argument_types(trained_fp32, tmp_path):
    _, trained, path, opt = trained_fp32
    with pytest.raises(TypeError, match="model"):
        delta.apply_delta("not a model", path)
    with pytest.raises(TypeError, match="path"):
        delta.apply_delta(_fresh_base(), 3)
    with pytest.raises(TypeError, match="path"):
        delta.save_delta(trained, None, opt)
    with pytest.raises(TypeError, match="optimizer"):
        delta.save_delta(trained, tmp_path / "x.safetensors",
                         torch.optim.AdamW(trained.parameters()))
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_unknown_or_dense_parameters(trained_fp32, tmp_path):
    _, trained, _, opt = trained_fp32
    with pytest.raises(ValueError, match="does not contain"):
        delta.save_delta(_fresh_base(), tmp_path / "x.safetensors", opt)
    model = _toy_model()
    for p in model.parameters():
        p.requires_grad_(True)
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "sparse": False}]
    dense_opt = SparseAdamW(groups, lr=1e-2, budget=20, selector=GEM(), calibration_steps=1)
    for batch in _batches(3, torch.float32):
        dense_opt.zero_grad()
        _loss(model, batch).backward()
        dense_opt.step()
    with pytest.raises(ValueError, match="densely"):
        delta.save_delta(model, tmp_path / "dense.safetensors", dense_opt)
    assert not (tmp_path / "dense.safetensors").exists()
    summary = delta.save_delta(model, tmp_path / "dense.safetensors", dense_opt, exclude_dense=True)
    names = set(delta.load_delta(tmp_path / "dense.safetensors"))
    assert summary["entries"] > 0 and names <= {"0.weight", "2.weight"}


def test_only_changed_entries_are_stored(tmp_path):
    """Selected entries that hold their original value again are left out of the file."""
    model = _toy_model()
    opt = _train(model, _batches(6, torch.float32), budget=40)
    selected = opt.selected_entries()
    first = next(p for p in model.parameters() if p in selected and selected[p][0].numel())
    with torch.no_grad():
        indices, original = selected[first]
        first.view(-1)[indices] = original  # undo the training of one tensor
    path = tmp_path / "partial.safetensors"
    summary = delta.save_delta(model, path, opt)
    stored = delta.load_delta(path)
    name = next(n for n, p in model.named_parameters() if p is first)
    assert name not in stored
    assert summary["entries"] == sum(e["indices"].numel() for e in stored.values())
    assert summary["entries"] == opt.selected_count() - indices.numel()


def test_save_before_selection_is_rejected(tmp_path):
    model = _toy_model()
    opt = SparseAdamW([model[0].weight, model[2].weight], lr=1e-2, budget=10, selector=GEM(),
                      calibration_steps=2)
    assert opt.phase == "calibration"
    with pytest.raises(ValueError, match="selected no entries"):
        delta.save_delta(model, tmp_path / "early.safetensors", opt)
    assert not (tmp_path / "early.safetensors").exists()
