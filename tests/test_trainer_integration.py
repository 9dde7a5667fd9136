"""SparseAdamW in transformers.Trainer: param groups from patterns, resume == no stop, and
Trainer's own gradient clipping on the dense gradients (as with AdamW)."""
import importlib.util
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, TrainerCallback

from gem_kernels.integrations.transformers import matching_parameters, param_groups

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trainer_example.py"
WORDS = ["good", "great", "bad", "awful", "movie", "film", "plot", "cast"]


def load_example():
    spec = importlib.util.spec_from_file_location("trainer_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})


def dataset(tokenizer, n=64):
    rng = random.Random(0)
    rows = []
    for i in range(n):
        label = i % 2
        text = " ".join([rng.choice(WORDS[:2] if label else WORDS[2:4]), *rng.sample(WORDS[4:], 2)])
        rows.append({**tokenizer(text), "labels": label})
    return rows


def test_patterns_pick_modules_like_peft():
    model = tiny_model()
    names = matching_parameters(model, ["query"])
    assert sorted(names) == sorted(f"bert.encoder.layer.{i}.attention.self.query.{k}"
                                   for i in range(2) for k in ("weight", "bias"))
    with pytest.raises(ValueError, match="matches \\['keys'\\]"):
        matching_parameters(model, ["query", "keys"])
    with pytest.raises(TypeError, match="not the string"):
        param_groups(model, sparse="query")


def test_param_groups_freeze_the_rest():
    model = tiny_model()
    groups = param_groups(model, sparse=["query", "value"], dense=["classifier"], weight_decay=0.1)
    sparse_names = [n for n, _ in groups[0]["params"]]
    dense_names = [n for n, _ in groups[1]["params"]]
    assert groups[0]["sparse"] and not groups[1]["sparse"] and groups[1]["weight_decay"] == 0.1
    assert len(sparse_names) == 4 and all(n.endswith(".weight") for n in sparse_names)
    assert dense_names == ["classifier.weight", "classifier.bias"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sparse_names) | set(dense_names)
    with pytest.raises(ValueError, match="both sparse and dense"):
        param_groups(model, sparse=["query"], dense=["query"])
    with pytest.raises(ValueError, match="no weight matrix"):
        param_groups(model, sparse=["LayerNorm"])


class DenseGradients(TrainerCallback):
    """After Trainer's clipping, before each step: the norm of the whole dense gradient, and
    whether a sparse param's gradient has entries outside the selection."""

    def __init__(self):
        self.norms, self.outside, self.selected_norms = {}, {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert all(g.layout == torch.strided for g in grads)
        step = state.global_step + 1
        self.norms[step] = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])))
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.phase == "training":
            outside, read = 0, []
            entries = inner.selected_entries()
            for p in model.parameters():
                if p.grad is None:
                    continue
                if p not in entries:  # a dense param: read whole
                    read.append(p.grad.reshape(-1))
                    continue
                assert p.grad.shape == p.shape
                mask = torch.ones(p.numel(), dtype=torch.bool)
                mask[entries[p][0]] = False
                outside += int((p.grad.reshape(-1)[mask] != 0).sum())
                read.append(p.grad.reshape(-1)[entries[p][0]])
            self.outside[step] = outside
            self.selected_norms[step] = float(torch.linalg.vector_norm(torch.cat(read)))


def test_trainer_resume_matches_an_uninterrupted_run(tmp_path, tokenizer):
    example = load_example()
    data = dataset(tokenizer)
    settings = dict(max_steps=8, save_steps=4, lr=1e-2, density=2e-3, calibration_steps=2, batch_size=8)
    before = tiny_model().state_dict()

    straight = example.make_trainer(tiny_model(), tokenizer, data, tmp_path / "run", **settings)
    watch = DenseGradients()
    straight.add_callback(watch)
    straight.train()
    # Trainer measures (and clips, max_grad_norm=1.0) the whole dense gradient, as with AdamW:
    # the logged norm is that of every entry, not only of the entries the optimizer reads.
    logged = {row["step"]: row["grad_norm"] for row in straight.state.log_history if "grad_norm" in row}
    assert sorted(logged) == [2, 4, 6, 8] and sorted(watch.norms) == list(range(1, 9))
    for step, norm in logged.items():
        assert watch.norms[step] == pytest.approx(min(norm, 1.0), rel=1e-4), step
    assert sorted(watch.outside) == list(range(3, 9)) and all(n > 0 for n in watch.outside.values())
    for step in (4, 6, 8):  # in training: far closer to the dense norm than to the selected entries'
        norm = logged[step]
        assert norm < 1.0 and 10 * abs(norm - watch.norms[step]) < abs(norm - watch.selected_norms[step]), step
    optimizer = straight.optimizer.optimizer  # the SparseAdamW inside accelerate's wrapper
    assert optimizer.phase == "training" and optimizer.state_dict()["sparse_adamw"]["calibration_done"] == 2
    budget = round(2e-3 * sum(t.numel() for t in before.values()))
    assert 0 < optimizer.selected_count() <= budget
    after = straight.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".query." in n or ".value." in n or n.startswith("classifier") for n in changed)
    moved = sum(int((before[n] != after[n]).sum()) for n in changed if not n.startswith("classifier"))
    assert 0 < moved <= optimizer.selected_count()

    resumed = example.make_trainer(tiny_model(), tokenizer, data, tmp_path / "run", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    assert resumed.state.global_step == 8
    final = resumed.model.state_dict()
    mismatched = [n for n in after if not torch.equal(after[n], final[n])]
    assert not mismatched, f"resumed weights differ from the uninterrupted run in {mismatched[:3]}"
    assert torch.equal(resumed.optimizer.optimizer.state_dict()["state"][0]["indices"],
                       optimizer.state_dict()["state"][0]["indices"])

    # A checkpoint without optimizer.pt: refused before anything loads (a fresh SparseAdamW
    # would calibrate again and silently train other entries).
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tmp_path / "run" / "checkpoint-4", bare)
    (bare / "optimizer.pt").unlink()
    model = tiny_model()
    start = {n: t.clone() for n, t in model.state_dict().items()}
    refused = example.make_trainer(model, tokenizer, data, tmp_path / "run2", **settings)
    with pytest.raises(ValueError, match="no optimizer state"):
        refused.train(resume_from_checkpoint=str(bare))
    assert all(torch.equal(start[n], t) for n, t in refused.model.state_dict().items())
