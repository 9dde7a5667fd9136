"""export_peft_shira and export_peft_supertuning: the adapter each writes loads with peft's own
PeftModel.from_pretrained and gives the trained model exactly (logits and weights, before and after
merge_and_unload)."""
import json
import math
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save

peft = pytest.importorskip("peft")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import gem_kernels  # noqa: E402
from gem_kernels.integrations.transformers import param_groups  # noqa: E402
from gem_kernels.selectors import GEM  # noqa: E402

QV = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]


def tiny_bert(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)  # the same seed gives the same base model, classifier head included
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).to(dtype).eval()


def batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 40, (8, 12), generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(n)]


def train(model, steps=6, dense=(), lr=1e-3, density=2e-2):
    """A few steps of SparseAdamW on query/value (GEM, 2 calibration steps); returns the optimizer."""
    groups = param_groups(model, sparse=["query", "value"], dense=list(dense))
    budget = round(density * sum(p.numel() for n, p in groups[0]["params"]))
    opt = gem_kernels.SparseAdamW(groups, lr=lr, budget=budget, selector=GEM(), calibration_steps=2)
    model.train()
    for ids, labels in batches(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    assert opt.phase == "training" and opt.selected_count() > 0
    return opt


def logits(model):
    ids = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def assert_same_weights(merged, trained):
    got, want = merged.state_dict(), trained.state_dict()
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"merged weights differ from the trained ones in {differ[:3]}"


def load(base, out_dir):
    with warnings.catch_warnings():
        # peft warns (UserWarning) about missing or unexpected adapter keys and an unknown mask
        # type; transformers' own deprecation notices are not the export's business.
        warnings.simplefilter("error", UserWarning)
        return peft.PeftModel.from_pretrained(base, str(out_dir))


# Both exports, and the tensor each writes per module, for tests that hold for both.
EXPORTS = {"shira": gem_kernels.export_peft_shira, "supertuning": gem_kernels.export_peft_supertuning}
METHOD = {"shira": "SHiRA", "supertuning": "Super-Tuning"}
VALUES = {"shira": "shira_weight", "supertuning": "supertuning_values"}
INDICES = {"shira": "shira_indices", "supertuning": "supertuning_indices"}


def flat_indices(file, module, fmt, in_features):
    indices = file[f"base_model.model.{module}.{INDICES[fmt]}"]
    assert indices.dtype == torch.int32
    return indices[0].long() * in_features + indices[1].long() if fmt == "shira" else indices.long()


def wrapped(loaded):
    """The names of the modules peft wrapped with an adapter layer."""
    return sorted(name.removeprefix("base_model.model.") for name, module in loaded.named_modules()
                  if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer))


@pytest.fixture(scope="module")
def trained_fp32():
    model = tiny_bert()
    opt = train(model)
    return model, opt


@pytest.mark.parametrize("fmt", EXPORTS)
def test_bert_export_loads_in_peft_and_equals_the_trained_model(fmt, tmp_path, trained_fp32):
    model, opt = trained_fp32
    summary = EXPORTS[fmt](model, opt, tmp_path)
    params = dict(model.named_parameters())
    selected = {p: idx for p, (idx, _) in opt.selected_entries().items()}
    chosen = {name: selected[params[f"{name}.weight"]] for name in QV}
    targets = [n for n in QV if chosen[n].numel()]
    assert summary["entries"] == sum(idx.numel() for idx in chosen.values())

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == fmt.upper()
    if fmt == "shira":
        assert config["r"] == summary["r"] and config["mask_type"] != "random"
        count = config["r"] * 64  # r * (in + out)
    else:
        assert config["sparsity"] == summary["sparsity"] and config["r"] is None
        assert config["save_precomputed_indices"]  # no indices recomputed from the base weights at load
        count = int(32 * 32 * (1 - config["sparsity"]))  # peft's own count
    modules = [n for n, _ in tiny_bert().named_modules()]
    assert [n for n in modules if re.fullmatch(config["target_modules"], n)] == targets
    file = load_file(tmp_path / "adapter_model.safetensors")
    needed = 0
    for name in targets:
        flat = flat_indices(file, name, fmt, 32)
        values = file[f"base_model.model.{name}.{VALUES[fmt]}"]
        assert flat.shape == values.shape == (count,) and values.dtype == torch.float32
        assert bool((flat[1:] >= flat[:-1]).all())  # row-major; a remainder right after its first delta
        trained = torch.isin(flat, chosen[name])
        positions = flat[trained]
        assert torch.equal(positions.unique(), chosen[name])  # every trained entry, and nothing else
        needed = max(needed, positions.numel())
        padding = values[~trained]
        assert flat[~trained].unique().numel() == padding.numel()  # padding: distinct untrained positions
        assert torch.equal(padding.view(torch.int32), torch.full_like(padding, -0.0).view(torch.int32))
    # The least count that holds the module with the most entries: SHiRA's next multiple of in + out,
    # Super-Tuning's exactly (the q/v weights all have the same size).
    assert count == (math.ceil(needed / 64) * 64 if fmt == "shira" else needed)
    assert summary["stored"] == count * len(targets)
    # An ordinary fp32 run leaves some entries one float32 delta cannot reach (see peft_export):
    # this run has some, so the exact comparison below covers the remainders too.
    assert summary["remainders"] > 0

    before = logits(tiny_bert())
    loaded = load(tiny_bert(), tmp_path)
    assert wrapped(loaded) == targets
    for name in targets:  # no mask was drawn or recomputed: the indices are the file's
        layer = loaded.get_submodule(f"base_model.model.{name}")
        assert torch.equal(getattr(layer, INDICES[fmt])["default"], file[f"base_model.model.{name}.{INDICES[fmt]}"])
    want = logits(model)
    assert not torch.equal(want, before)  # training changed the outputs, so equality below means something
    assert torch.equal(logits(loaded), want)
    merged = loaded.merge_and_unload()
    assert torch.equal(logits(merged), want)
    assert_same_weights(merged, model)


@pytest.mark.parametrize("fmt", EXPORTS)
def test_export_from_a_delta_file_equals_apply_delta(fmt, tmp_path, trained_fp32):
    model, opt = trained_fp32
    gem_kernels.save_delta(model, tmp_path / "delta.safetensors", opt)
    summary = EXPORTS[fmt](tiny_bert(), tmp_path / "delta.safetensors", tmp_path / "adapter")
    assert summary["entries"] <= opt.selected_count()  # the delta holds the changed entries only
    applied = tiny_bert()
    gem_kernels.apply_delta(applied, tmp_path / "delta.safetensors")
    merged = load(tiny_bert(), tmp_path / "adapter").merge_and_unload()
    assert_same_weights(merged, applied)
    assert_same_weights(merged, model)


@pytest.mark.parametrize("fmt", EXPORTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_exact(fmt, tmp_path, dtype):
    model = tiny_bert(dtype)
    opt = train(model, lr=1e-2)
    summary = EXPORTS[fmt](model, opt, tmp_path)
    # peft keeps SHiRA weights in float32 by default: one holds the difference of two bf16/fp16
    # values exactly. Super-Tuning casts its values to the weight's dtype, where GEM's entries (small
    # weights, changed by much more than their size) often need a remainder: this run has some, so
    # the comparison below covers them.
    assert (summary["remainders"] == 0) if fmt == "shira" else (summary["remainders"] > 0)
    file = load_file(tmp_path / "adapter_model.safetensors")
    values = [t for k, t in file.items() if k.endswith(VALUES[fmt])]
    assert values and all(t.dtype == torch.float32 for t in values)
    loaded = load(tiny_bert(dtype), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert_same_weights(loaded.merge_and_unload(), model)


@pytest.mark.parametrize("fmt", EXPORTS)
def test_dense_head_needs_modules_to_save_or_exclude_dense(fmt, tmp_path):
    export = EXPORTS[fmt]
    model = tiny_bert()
    opt = train(model, dense=["classifier"])
    with pytest.raises(ValueError, match=r"densely.*modules_to_save=\['classifier'\].*exclude_dense=True"):
        export(model, opt, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    export(model, opt, tmp_path / "with_head", modules_to_save=["classifier"])
    config = json.loads((tmp_path / "with_head" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    loaded = load(tiny_bert(), tmp_path / "with_head")
    assert torch.equal(logits(loaded), logits(model))
    assert_same_weights(loaded.merge_and_unload(), model)

    export(model, opt, tmp_path / "no_head", exclude_dense=True)
    no_head = load_file(tmp_path / "no_head" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" not in no_head
    with pytest.raises(ValueError, match=f"overlaps the {METHOD[fmt]} target"):
        export(model, opt, tmp_path / "x", modules_to_save=["attention"])


class Selection:
    """A stand-in for SparseAdamW's selected_entries()/param_groups, to pin exact entry counts."""

    def __init__(self, chosen: dict):
        self.chosen = {p: (idx, p.detach().reshape(-1)[idx].clone()) for p, idx in chosen.items()}
        self.param_groups = [{"params": list(chosen)}]

    def selected_entries(self):
        return self.chosen


def two_linears(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).eval()


def test_one_r_for_modules_of_different_size(tmp_path):
    model = two_linears()
    first, second = model[0].weight, model[2].weight  # 24x12 (in+out 36) and 3x24 (in+out 27, 72 entries)
    source = Selection({first: torch.arange(0, 288, 5), second: torch.tensor([1, 30, 71])})  # k 58 and 3
    with torch.no_grad():
        for p, (idx, _) in source.chosen.items():
            p.view(-1)[idx] += 0.25
    summary = gem_kernels.export_peft_shira(model, source, tmp_path)
    assert summary["r"] == 2 and summary["stored"] == 2 * 36 + 2 * 27 and summary["entries"] == 61
    assert summary["remainders"] == 0  # +0.25 on values under 0.5 in size: one delta reaches each
    merged = load(two_linears(), tmp_path).merge_and_unload()
    assert_same_weights(merged, model)

    big = Selection({first: torch.arange(0, 288, 2), second: torch.tensor([0])})  # k 144: r 4, 4*27 > 72
    with pytest.raises(ValueError, match=r"r=4 gives 108 for '2', which has only 3x24"):
        gem_kernels.export_peft_shira(model, big, tmp_path / "x")


@pytest.mark.parametrize("fmt", EXPORTS)
def test_an_entry_one_delta_cannot_reach_gets_a_remainder(fmt, tmp_path):
    export = EXPORTS[fmt]
    # 1.0 + d for a float32 d lands on multiples of 2**-24 near zero, never on 2**-30: the first
    # delta (-1.0) reaches 0.0 and a second entry at the same position adds 2**-30.
    model = two_linears()
    with torch.no_grad():
        model[0].weight.view(-1)[5] = 1.0
    source = Selection({model[0].weight: torch.tensor([5, 6])})
    with torch.no_grad():
        model[0].weight.view(-1)[5] = 2.0 ** -30
        model[0].weight.view(-1)[6] += 0.5
    summary = export(model, source, tmp_path)
    assert summary["entries"] == 2 and summary["remainders"] == 1
    file = load_file(tmp_path / "adapter_model.safetensors")
    flat, values = flat_indices(file, "0", fmt, 12), file[f"base_model.model.0.{VALUES[fmt]}"]
    # 5 twice; SHiRA pads to r * (in + out) = 36 at positions 0-4 and on, Super-Tuning's one module not at all.
    assert flat[:8].tolist() == ([0, 1, 2, 3, 4, 5, 5, 6] if fmt == "shira" else [5, 5, 6])
    assert values[flat == 5].tolist() == [-1.0, 2.0 ** -30]
    base = two_linears()
    with torch.no_grad():
        base[0].weight.view(-1)[5] = 1.0
    loaded = load(base, tmp_path)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert_same_weights(loaded.merge_and_unload(), model)

    # An entry that shrinks from 0.75 to 0.001. SHiRA's float32 sum reaches a bf16/fp16 value with
    # one delta, not the float32 one; Super-Tuning's deltas are in the weight's dtype, where the
    # nearest to 0.001 - 0.75 is -0.75, so all three need the remainder.
    remainders = {"shira": (1, 0, 0), "supertuning": (1, 1, 1)}[fmt]
    for dtype, expected in zip((torch.float32, torch.bfloat16, torch.float16), remainders):
        small = two_linears().to(dtype)
        with torch.no_grad():
            small[0].weight.view(-1)[5] = 0.75
        shrunk = Selection({small[0].weight: torch.tensor([5])})
        with torch.no_grad():
            small[0].weight.view(-1)[5] = 0.001
        assert export(small, shrunk, tmp_path / str(dtype))["remainders"] == expected
        base = two_linears().to(dtype)
        with torch.no_grad():
            base[0].weight.view(-1)[5] = 0.75
        assert_same_weights(load(base, tmp_path / str(dtype)).merge_and_unload(), small)

    with torch.no_grad():
        model[0].weight.view(-1)[6] = float("nan")
    with pytest.raises(ValueError, match=rf"1 entries of '0.weight' cannot be reproduced as the sum peft's "
                                         rf"{METHOD[fmt]} computes.*save_delta"):
        export(model, source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("fmt", EXPORTS)
def test_signed_zeros_are_exact_or_refused(fmt, tmp_path):
    """torch.equal holds -0.0 == 0.0, apply_delta writes bits: a -0.0 trained to +0.0 needs the delta
    +0.0 (-0.0 + -0.0 stays -0.0), and a +0.0 trained to -0.0 no sum can give."""
    bits = lambda t: t.detach().view(torch.int32)  # noqa: E731
    model = two_linears()
    with torch.no_grad():
        model[0].weight.view(-1)[3] = -0.0
    source = Selection({model[0].weight: torch.tensor([3])})
    with torch.no_grad():
        model[0].weight.view(-1)[3] = 0.0
    EXPORTS[fmt](model, source, tmp_path / "ok")
    base = two_linears()
    with torch.no_grad():
        base[0].weight.view(-1)[3] = -0.0
    merged = load(base, tmp_path / "ok").merge_and_unload()
    assert torch.equal(bits(merged[0].weight), bits(model[0].weight))

    with torch.no_grad():
        model[0].weight.view(-1)[3] = 0.0
    source = Selection({model[0].weight: torch.tensor([3])})
    with torch.no_grad():
        model[0].weight.view(-1)[3] = -0.0
    with pytest.raises(ValueError, match=r"1 entries of '0.weight' cannot be reproduced.*original 0.0, trained -0.0"):
        EXPORTS[fmt](model, source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


class Nested(torch.nn.Module):
    """``fc`` beside a nested ``block.fc``: peft's suffix match of a target list takes both."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 8)
        self.block = torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 4)})

    def forward(self, x):
        return self.block["fc"](torch.tanh(self.fc(x)))


@pytest.mark.parametrize("fmt", EXPORTS)
def test_targets_are_exact_module_names(fmt, tmp_path):
    model = Nested().eval()
    source = Selection({model.fc.weight: torch.tensor([1, 9, 20])})
    with torch.no_grad():
        model.fc.weight.view(-1)[source.chosen[model.fc.weight][0]] += 0.25
    EXPORTS[fmt](model, source, tmp_path)
    loaded = load(Nested().eval(), tmp_path)
    assert wrapped(loaded) == ["fc"]  # not block.fc, which has no adapter weights (its forward failed)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert_same_weights(loaded.merge_and_unload(), model)


def test_supertuning_takes_one_sparsity_for_modules_of_different_density(tmp_path):
    model = two_linears()
    first, second = model[0].weight, model[2].weight  # 24x12 (288 entries) and 3x24 (72 entries)
    source = Selection({first: torch.arange(0, 288, 5), second: torch.tensor([1, 30, 71])})  # k 58 and 3
    with torch.no_grad():
        for p, (idx, _) in source.chosen.items():
            p.view(-1)[idx] += 0.25
    summary = gem_kernels.export_peft_supertuning(model, source, tmp_path)
    # The densest module sets peft's one sparsity: 58 of 288 there, so int(72 * 58 / 288) = 14 in the other.
    assert int(288 * (1 - summary["sparsity"])) == 58 and int(72 * (1 - summary["sparsity"])) == 14
    assert summary["stored"] == 58 + 14 and summary["entries"] == 61 and summary["remainders"] == 0
    assert_same_weights(load(two_linears(), tmp_path).merge_and_unload(), model)

    # Half of the first module: SHiRA's r * (in + out) = 4 * 27 exceeds the second's 72 entries; this fits.
    model = two_linears()
    big = Selection({model[0].weight: torch.arange(0, 288, 2), model[2].weight: torch.tensor([0])})
    with torch.no_grad():
        for p, (idx, _) in big.chosen.items():
            p.view(-1)[idx] += 0.25
    with pytest.raises(ValueError, match=r"r=4 gives 108 for '2', which has only 3x24.*export_peft_supertuning"):
        gem_kernels.export_peft_shira(model, big, tmp_path / "shira")
    assert gem_kernels.export_peft_supertuning(model, big, tmp_path / "st")["stored"] == 144 + 36
    assert_same_weights(load(two_linears(), tmp_path / "st").merge_and_unload(), model)

    # Every entry of a module and a remainder: more than peft's count, at most numel, can hold.
    whole = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with torch.no_grad():
        whole[0].weight.view(-1)[0] = 1.0
    source = Selection({whole[0].weight: torch.arange(4)})
    with torch.no_grad():
        whole[0].weight.view(-1)[0] = 2.0 ** -30
    with pytest.raises(ValueError, match=r"cannot hold '0' \(2x2\) with its 5 entries"):
        gem_kernels.export_peft_supertuning(whole, source, tmp_path / "whole")
    assert not (tmp_path / "whole").exists()


def test_forged_delta_file_is_refused(tmp_path, trained_fp32):
    """A delta whose table was edited and its checksum recomputed (it was a KeyError)."""
    from gem_kernels import delta
    model, opt = trained_fp32
    path = tmp_path / "delta.safetensors"
    gem_kernels.save_delta(model, path, opt)
    blob = path.read_bytes()
    metadata = delta._read_metadata(blob, path)
    table = json.loads(metadata["tensors"])
    name = sorted(table)[0]
    del table[name]["shape"]
    metadata["tensors"] = json.dumps(table, sort_keys=True)
    tensors = load_file(path)
    metadata["payload_sha256"] = delta._payload_sha256(tensors, metadata)
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(save(tensors, metadata=metadata))
    for fmt, export in EXPORTS.items():
        with pytest.raises(ValueError, match=rf"table entry '{re.escape(name)}' has shape None"):
            export(tiny_bert(), forged, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


@pytest.mark.parametrize("fmt", EXPORTS)
def test_params_the_adapter_cannot_hold_are_refused(fmt, tmp_path):
    export = EXPORTS[fmt]
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "conv": Conv1D(6, 8),
                                 "lin": torch.nn.Linear(8, 8)})
    idx = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=rf"'emb.weight' is the 'weight' of 'emb' \(Embedding\); peft's {METHOD[fmt]}"):
        export(model, Selection({model["emb"].weight: idx}), tmp_path)
    with pytest.raises(ValueError, match=r"\(Conv1D\)"):
        export(model, Selection({model["conv"].weight: idx}), tmp_path)
    with pytest.raises(ValueError, match=r"'lin.bias' is the 'bias' of 'lin'"):
        export(model, Selection({model["lin"].bias: idx}), tmp_path)
    model["tied"] = torch.nn.Linear(8, 10)
    model["tied"].weight = model["emb"].weight
    with pytest.raises(ValueError, match=r"shared by \['emb.weight', 'tied.weight'\]"):
        export(model, Selection({model["tied"].weight: idx}), tmp_path)
    with pytest.raises(TypeError, match="must be a SparseAdamW, the path"):
        export(model, object(), tmp_path)
    opt = gem_kernels.SparseAdamW(model["lin"].parameters(), lr=1e-3, budget=4)
    with pytest.raises(ValueError, match="selected no entries yet"):
        export(model, opt, tmp_path)
    assert not any(tmp_path.iterdir())
