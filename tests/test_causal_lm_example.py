"""examples/causal_lm_example.py: answer-only labels, GEM in SparseTrainer on a Llama built from
a config, resume == no stop, and the all-linear variant exported to peft."""
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "causal_lm_example.py"
SETTINGS = dict(max_steps=6, save_steps=3, lr=1e-2, density=1e-2, calibration_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("causal_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(example):
    rows = example.read_jsonl(example.DATA)
    tokenizer = example.build_tokenizer(rows)
    encoded = [example.encode_example(tokenizer, r["question"], r["answer"], 96) for r in rows]
    return rows, tokenizer, encoded


def test_labels_cover_the_answer_only(example, data):
    _, tokenizer, _ = data
    short = example.encode_example(tokenizer, "What is 2 plus 3?", "5", 96)
    long = example.encode_example(tokenizer, "Reverse the word lamp.", "pmal", 96)
    prompt = 1 + len(example.PROMPT.format(question="What is 2 plus 3?"))  # bos + prompt characters
    assert short["labels"][:prompt] == [-100] * prompt
    answer_ids = [*tokenizer.encode("5"), tokenizer.eos_id]
    assert short["labels"][prompt:] == short["input_ids"][prompt:] == answer_ids

    batch = example.Collator(tokenizer.pad_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape[1] == len(long["input_ids"]) > n
    assert (batch["labels"][0, n:] == -100).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert (batch["input_ids"][0, n:] == tokenizer.pad_id).all()
    counted = batch["labels"] != -100
    assert int(counted.sum()) == len("5") + len("pmal") + 2  # each answer and its eos, nothing else

    # The model's loss is the cross-entropy of the answer tokens only (each predicted from the
    # position before it): prompt and padding do not count.
    model = example.tiny_llama(len(tokenizer))
    with torch.no_grad():
        out = model(**batch)
    logits, targets = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    answer = targets != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[answer], targets[answer]))
    every_token = F.cross_entropy(logits.flatten(0, 1), batch["input_ids"][:, 1:].flatten())
    assert not torch.isclose(out.loss, every_token)


def test_bad_jsonl_lines_are_named(example, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with string \"question\""):
        example.read_jsonl(path)
    path.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        example.read_jsonl(path)
    with pytest.raises(ValueError, match="no room for its answer"):
        tokenizer = example.build_tokenizer([{"question": "q" * 50, "answer": "a"}])
        example.encode_example(tokenizer, "q" * 50, "a", 20)


def test_resume_matches_an_uninterrupted_run(example, data, tmp_path):
    _, tokenizer, encoded = data
    before = example.tiny_llama(len(tokenizer)).state_dict()
    def trainer():
        return example.make_trainer(example.tiny_llama(len(tokenizer)), encoded, tokenizer.pad_id, tmp_path,
                                    **SETTINGS)

    straight = trainer()
    straight.train()
    optimizer = straight.optimizer.optimizer  # the SparseAdamW inside accelerate's wrapper
    assert optimizer.phase == "training" and optimizer.selected_count() > 0
    after = straight.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    # Trainer's own norm (torch's clip_grad_norm_ on the dense gradients) in every logged step.
    norms = [row["grad_norm"] for row in straight.state.log_history if "grad_norm" in row]
    assert len(norms) == 6 // max(1, SETTINGS["save_steps"] // 2) and all(0 < n < float("inf") for n in norms)

    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.state.global_step == 6
    final = resumed.model.state_dict()
    mismatched = [n for n in after if not torch.equal(after[n], final[n])]
    assert not mismatched, f"resumed weights differ from the uninterrupted run in {mismatched[:3]}"


def test_all_linear_run_and_its_peft_export(example, tmp_path):
    peft = pytest.importorskip("peft")
    result = example.main(["--targets", "all-linear", "--max-steps", "4", "--stop-at", "2",
                           "--calibration-steps", "2", "--out", str(tmp_path / "run"),
                           "--export-peft", str(tmp_path / "shira")])
    assert result["same"]
    model, tokenizer = result["trainer"].model, result["tokenizer"]
    before = example.tiny_llama(len(tokenizer)).state_dict()
    changed = {n.rsplit(".", 2)[-2] for n, t in model.state_dict().items() if not torch.equal(before[n], t)}
    assert changed - {"q_proj", "v_proj"} and changed <= {"q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"}

    loaded = peft.PeftModel.from_pretrained(example.tiny_llama(len(tokenizer)), str(tmp_path / "shira"))
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode("Question: What is 4 plus 4?\nAnswer: ")])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    merged = loaded.merge_and_unload().state_dict()
    assert all(torch.equal(merged[n], t) for n, t in model.state_dict().items())
