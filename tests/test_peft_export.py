"""export_peft_shira: the adapter it writes loads with peft's own PeftModel.from_pretrained and
gives the trained model exactly (logits and weights, before and after merge_and_unload)."""
import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import gem_kernels  # noqa: E402
from gem_kernels.integrations.transformers import param_groups  # noqa: E402
from gem_kernels.selection import GEM  # noqa: E402

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
    opt.close()  # unpatches the Linear forwards: what follows compares plain modules
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


@pytest.fixture(scope="module")
def trained_fp32():
    model = tiny_bert()
    opt = train(model)
    return model, opt


def test_bert_export_loads_in_peft_and_equals_the_trained_model(tmp_path, trained_fp32):
    model, opt = trained_fp32
    summary = gem_kernels.export_peft_shira(model, opt, tmp_path)
    params = dict(model.named_parameters())
    selected = {p: idx for p, (idx, _) in opt.selected_entries().items()}
    chosen = {name: selected[params[f"{name}.weight"]] for name in QV}
    assert summary["entries"] == sum(idx.numel() for idx in chosen.values())

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    r = config["r"]
    assert config["peft_type"] == "SHIRA" and r == summary["r"] and config["mask_type"] != "random"
    assert sorted(config["target_modules"]) == sorted(n for n in QV if chosen[n].numel())
    file = load_file(tmp_path / "adapter_model.safetensors")
    needed = 0
    for name in config["target_modules"]:
        indices = file[f"base_model.model.{name}.shira_indices"]
        weight = file[f"base_model.model.{name}.shira_weight"]
        assert indices.dtype == torch.int32 and indices.shape == (2, r * 64)
        assert weight.dtype == torch.float32 and weight.shape == (r * 64,)
        flat = indices[0].long() * 32 + indices[1].long()
        assert bool((flat[1:] >= flat[:-1]).all())  # row-major; a remainder right after its first delta
        trained = torch.isin(flat, chosen[name])
        positions = flat[trained]
        assert torch.equal(positions.unique(), chosen[name])  # every trained entry, and nothing else
        needed = max(needed, math.ceil(positions.numel() / 64))
        padding = weight[~trained]
        assert flat[~trained].unique().numel() == padding.numel()  # padding: distinct untrained positions
        assert torch.equal(padding.view(torch.int32), torch.full_like(padding, -0.0).view(torch.int32))
    assert r == needed and summary["stored"] == r * 64 * len(config["target_modules"])
    # An ordinary fp32 run leaves some entries one float32 delta cannot reach (see peft_export):
    # this run has some, so the exact comparison below covers the remainders too.
    assert summary["remainders"] > 0

    before = logits(tiny_bert())
    loaded = load(tiny_bert(), tmp_path)
    for name in config["target_modules"]:  # no random mask was drawn: the indices are the file's
        layer = loaded.get_submodule(f"base_model.model.{name}")
        assert torch.equal(layer.shira_indices["default"], file[f"base_model.model.{name}.shira_indices"])
    want = logits(model)
    assert not torch.equal(want, before)  # training changed the outputs, so equality below means something
    assert torch.equal(logits(loaded), want)
    merged = loaded.merge_and_unload()
    assert torch.equal(logits(merged), want)
    assert_same_weights(merged, model)


def test_export_from_a_delta_file(tmp_path, trained_fp32):
    model, opt = trained_fp32
    gem_kernels.save_delta(model, tmp_path / "delta.safetensors", opt)
    summary = gem_kernels.export_peft_shira(tiny_bert(), tmp_path / "delta.safetensors", tmp_path / "adapter")
    assert summary["entries"] <= opt.selected_count()  # the delta holds the changed entries only
    merged = load(tiny_bert(), tmp_path / "adapter").merge_and_unload()
    assert_same_weights(merged, model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_exact(tmp_path, dtype):
    # The deltas are float32, as peft keeps SHiRA weights by default: one holds the difference of
    # two bf16/fp16 values exactly.
    model = tiny_bert(dtype)
    opt = train(model, lr=1e-2)
    summary = gem_kernels.export_peft_shira(model, opt, tmp_path)
    assert summary["remainders"] == 0
    file = load_file(tmp_path / "adapter_model.safetensors")
    weights = [t for k, t in file.items() if k.endswith("shira_weight")]
    assert weights and all(t.dtype == torch.float32 for t in weights)
    loaded = load(tiny_bert(dtype), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    assert_same_weights(loaded.merge_and_unload(), model)


def test_dense_head_needs_modules_to_save_or_exclude_dense(tmp_path):
    model = tiny_bert()
    opt = train(model, dense=["classifier"])
    with pytest.raises(ValueError, match=r"densely.*modules_to_save=\['classifier'\].*exclude_dense=True"):
        gem_kernels.export_peft_shira(model, opt, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    gem_kernels.export_peft_shira(model, opt, tmp_path / "with_head", modules_to_save=["classifier"])
    config = json.loads((tmp_path / "with_head" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    loaded = load(tiny_bert(), tmp_path / "with_head")
    assert torch.equal(logits(loaded), logits(model))
    assert_same_weights(loaded.merge_and_unload(), model)

    gem_kernels.export_peft_shira(model, opt, tmp_path / "no_head", exclude_dense=True)
    no_head = load_file(tmp_path / "no_head" / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" not in no_head
    with pytest.raises(ValueError, match="overlaps the SHiRA target"):
        gem_kernels.export_peft_shira(model, opt, tmp_path / "x", modules_to_save=["attention"])


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


def test_an_entry_one_delta_cannot_reach_gets_a_remainder(tmp_path):
    # 1.0 + d for a float32 d lands on multiples of 2**-24 near zero, never on 2**-30: the first
    # delta (-1.0) reaches 0.0 and a second entry at the same position adds 2**-30.
    model = two_linears()
    with torch.no_grad():
        model[0].weight.view(-1)[5] = 1.0
    source = Selection({model[0].weight: torch.tensor([5, 6])})
    with torch.no_grad():
        model[0].weight.view(-1)[5] = 2.0 ** -30
        model[0].weight.view(-1)[6] += 0.5
    summary = gem_kernels.export_peft_shira(model, source, tmp_path)
    assert summary["entries"] == 2 and summary["remainders"] == 1
    file = load_file(tmp_path / "adapter_model.safetensors")
    indices, weight = file["base_model.model.0.shira_indices"], file["base_model.model.0.shira_weight"]
    assert indices[:, :8].tolist() == [[0] * 8, [0, 1, 2, 3, 4, 5, 5, 6]]  # 0-4 padding; 5 twice
    assert weight[5:7].tolist() == [-1.0, 2.0 ** -30]
    base = two_linears()
    with torch.no_grad():
        base[0].weight.view(-1)[5] = 1.0
    loaded = load(base, tmp_path)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert_same_weights(loaded.merge_and_unload(), model)

    # An entry that shrinks from 0.75 to 0.001: the float32 sum reaches a bf16/fp16 value with one
    # delta, not the float32 one.
    for dtype, remainders in ((torch.float32, 1), (torch.bfloat16, 0), (torch.float16, 0)):
        small = two_linears().to(dtype)
        with torch.no_grad():
            small[0].weight.view(-1)[5] = 0.75
        shrunk = Selection({small[0].weight: torch.tensor([5])})
        with torch.no_grad():
            small[0].weight.view(-1)[5] = 0.001
        assert gem_kernels.export_peft_shira(small, shrunk, tmp_path / str(dtype))["remainders"] == remainders
        base = two_linears().to(dtype)
        with torch.no_grad():
            base[0].weight.view(-1)[5] = 0.75
        assert_same_weights(load(base, tmp_path / str(dtype)).merge_and_unload(), small)

    with torch.no_grad():
        model[0].weight.view(-1)[6] = float("nan")
    with pytest.raises(ValueError, match=r"1 entries of '0.weight' cannot be reproduced.*save_delta"):
        gem_kernels.export_peft_shira(model, source, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_params_shira_cannot_hold_are_refused(tmp_path):
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "conv": Conv1D(6, 8),
                                 "lin": torch.nn.Linear(8, 8)})
    idx = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"'emb.weight' is the 'weight' of 'emb' \(Embedding\); peft"):
        gem_kernels.export_peft_shira(model, Selection({model["emb"].weight: idx}), tmp_path)
    with pytest.raises(ValueError, match=r"\(Conv1D\)"):
        gem_kernels.export_peft_shira(model, Selection({model["conv"].weight: idx}), tmp_path)
    with pytest.raises(ValueError, match=r"'lin.bias' is the 'bias' of 'lin'"):
        gem_kernels.export_peft_shira(model, Selection({model["lin"].bias: idx}), tmp_path)
    model["tied"] = torch.nn.Linear(8, 10)
    model["tied"].weight = model["emb"].weight
    with pytest.raises(ValueError, match=r"shared by \['emb.weight', 'tied.weight'\]"):
        gem_kernels.export_peft_shira(model, Selection({model["tied"].weight: idx}), tmp_path)
    with pytest.raises(TypeError, match="SparseAdamW or the path"):
        gem_kernels.export_peft_shira(model, object(), tmp_path)
    opt = gem_kernels.SparseAdamW(model["lin"].parameters(), lr=1e-3, budget=4)
    with pytest.raises(ValueError, match="selected no entries yet"):
        gem_kernels.export_peft_shira(model, opt, tmp_path)
    opt.close()
    assert not any(tmp_path.iterdir())
