"""gem-finetune end to end on a tiny BERT built from a config (no download), and its errors."""
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from gem_finetune import cli, data, methods, models, report
from gem_finetune.results import load as load_results

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "film", "the", "a", "plot", "is",
         "was", "yes", "no", "maybe", "cat", "dog", "sat", "ran"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


def _save_bert(directory, **sizes):
    """A BERT with random weights and a word-level vocab, saved like a hub model."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', *WORDS]
    # transformers 5 takes the vocab itself (`vocab=`); its old `vocab_file=` is silently ignored.
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    assert tokenizer("good film")["input_ids"] == [2, vocab.index("good"), vocab.index("film"), 3]
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **sizes)
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT."""
    return _save_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    """A 1-layer BERT whose linear layers NF4 can store (multiples of 64 x 256 entries)."""
    return _save_bert(tmp_path_factory.mktemp("nf4-bert"), hidden_size=128, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=512)


def sentence(rng, label):
    return " ".join([rng.choice(POSITIVE if label else NEGATIVE), *rng.sample(WORDS[6:], 3)])


def write_tsv(path, header, rows):
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def make_task(directory, kind, n_train=48, n_dev=24):
    """A task whose label is carried by one sentiment word: learnable in a few steps."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for name, n in (("train", n_train), ("dev", n_dev)):
        labels = [i % 2 for i in range(n)]
        if kind == "single":
            write_tsv(directory / f"{name}.tsv", ["sentence", "label"], [[sentence(rng, y), y] for y in labels])
        elif kind == "cola":  # our CoLA copy's header; the judgment column holds a bare quote
            write_tsv(directory / f"{name}.tsv", ["source", "label", "original_judgment", "sentence"],
                      [["src", y, '"' if y else "*", '"' + sentence(rng, y)] for y in labels])
        elif kind == "pair-strings":  # premise/hypothesis with three string labels
            names = ["contradiction", "entailment", "neutral"]
            write_tsv(directory / f"{name}.tsv", ["index", "premise", "hypothesis", "label"],
                      [[i, sentence(rng, i % 2), sentence(rng, (i // 2) % 2), names[i % 3]] for i in range(n)])
        elif kind == "pair-ints":
            write_tsv(directory / f"{name}.tsv", ["question1", "question2", "label"],
                      [[sentence(rng, y), sentence(rng, 1 - y), y] for y in labels])
    return directory


def run_main(tiny_model, task_dir, out, *extra):
    return cli.main(["--task-dir", str(task_dir), "--model", str(tiny_model), "--out", str(out),
                          "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                          "--budget-fraction", "0.01", *extra])


# ---------------------------------------------------------------------------------------
# Reading tasks


def test_columns_and_labels_are_detected(tmp_path):
    single = data.read_task(make_task(tmp_path / "s", "single"))
    assert single.text_columns == ("sentence", None) and single.label_names == ["0", "1"]
    assert single.train.second is None and len(single.train.labels) == 48
    pair = data.read_task(make_task(tmp_path / "p", "pair-strings"))
    assert pair.text_columns == ("premise", "hypothesis")
    assert pair.label_names == ["contradiction", "entailment", "neutral"]
    assert pair.dev.labels[:3] == [0, 1, 2] and len(pair.dev.second) == 24
    assert data.read_task(make_task(tmp_path / "q", "pair-ints")).text_columns == ("question1", "question2")


def test_quotes_are_text_not_quoting(tmp_path):
    # With csv quoting on, the bare '"' fields would swallow the tab and the following rows.
    task = data.read_task(make_task(tmp_path / "c", "cola"))
    assert task.text_columns == ("sentence", None)
    assert len(task.train.labels) == 48 and all(text.startswith('"') for text in task.train.first)


def test_integer_labels_sort_by_value(tmp_path):
    write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["a", 10], ["b", 2], ["c", 1]])
    write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [["a", 2]])
    task = data.read_task(tmp_path)
    assert task.label_names == ["1", "2", "10"] and task.dev.labels == [1]


def test_take_is_a_seeded_prefix(tmp_path):
    split = data.read_task(make_task(tmp_path / "s", "single")).train
    a, b = data.take(split, 10, seed=3), data.take(split, 20, seed=3)
    assert a.first == b.first[:10] and sorted(b.first) != b.first
    assert data.take(split, 10, seed=4).first != a.first


def test_matthews_matches_the_binary_formula():
    labels = [1, 1, 1, 0, 0, 0, 0, 1, 0, 1]
    predictions = [1, 0, 1, 0, 0, 1, 0, 1, 1, 1]
    tp, tn, fp, fn = 4, 3, 2, 1
    expected = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert report.matthews(labels, predictions, 2) == pytest.approx(expected)
    assert report.matthews(labels, [1] * 10, 2) == 0.0  # undefined: one class predicted


# ---------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2


def _bad_tasks(tmp_path):
    missing_dev = make_task(tmp_path / "missing", "single")
    (missing_dev / "dev.tsv").unlink()
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    write_tsv(unknown / "train.tsv", ["text", "target"], [["a", 0]])
    write_tsv(unknown / "dev.tsv", ["text", "target"], [["a", 0]])
    empty = make_task(tmp_path / "empty", "single")
    (empty / "train.tsv").write_text("")
    unseen = make_task(tmp_path / "unseen", "single")
    write_tsv(unseen / "dev.tsv", ["sentence", "label"], [["good film", 0], ["bad film", 7]])
    ragged = make_task(tmp_path / "ragged", "single")
    (ragged / "dev.tsv").write_text("sentence\tlabel\ngood film\t1\textra\n")
    return {"file not found": missing_dev, "unknown columns": unknown, "empty file": empty,
            "do not occur in train.tsv": unseen, "has 3 fields": ragged,
            "task directory not found": tmp_path / "nowhere"}


def test_bad_task_dirs_give_one_line_and_exit_2(tmp_path, tiny_model, capsys):
    for expected, task_dir in _bad_tasks(tmp_path).items():
        code = run_main(tiny_model, task_dir, tmp_path / "out")
        err = capsys.readouterr().err
        assert code == 2, expected
        assert err.count("\n") == 1 and err.startswith("gem-finetune: error: "), err
        assert expected in err and "Traceback" not in err


def test_bad_model_dir_and_bad_lr(tmp_path, tiny_model, capsys):
    task = make_task(tmp_path / "s", "single")
    assert cli.main(["--task-dir", str(task), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["--task-dir", str(task), "--lr", "sgd=1e-3"])
    assert stop.value.code == 2 and "'sgd' is not a method" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# End to end


FULL_PRECISION_METHODS = [m for m in methods.METHODS if m != "qlora"]  # qlora: test_the_4bit_base_runs


def test_every_method_runs_end_to_end(tmp_path, tiny_model, capsys):
    task = make_task(tmp_path / "single", "single")
    code = run_main(tiny_model, task, tmp_path / "out", "--method", *FULL_PRECISION_METHODS,
                    "--calibration-batches", "2")
    assert code == 0
    printed = capsys.readouterr().out
    results = load_results(tmp_path / "out" / "results-single.jsonl")
    assert (tmp_path / "out" / "curves-single.png").stat().st_size > 10_000
    budget = int(0.01 * results["settings"]["total_parameters"])
    head = 32 * 2 + 2
    for method in FULL_PRECISION_METHODS:
        assert f"| {method} |" in printed
        (run,) = [r for r in results["runs"] if r["method"] == method]
        assert len(run["losses"]) == 6 and run["dev_curve"] == []  # no --dev-curve-examples: no curve
        assert set(run["phase_seconds"]) >= {"load", "training", "dev"} and "heldout" not in run["phase_seconds"]
        assert ("calibration" in run["phase_seconds"]) == (method in methods.CALIBRATED_METHODS)
        assert run["median_step_seconds"] > 0 and run["optimizer_state_bytes"] > 0 and run["wall_seconds"] > 0
        # --device auto (the default): CUDA where torch sees it
        assert (run["device"], run["precision"]) == ("cuda" if torch.cuda.is_available() else "cpu", "fp32")
        assert run["budget_fraction"] == (0.01 if method in methods.BUDGETED_METHODS else None)
        if method == "lora-all":
            # LoRA parameters per rank: 2 layers x (4 x (32 + 32) + 2 x (32 + 64)) = 896
            assert run["lora_rank"] == max(1, round(budget / 896))
            assert run["trainable_entries"] == run["lora_rank"] * 896 + head
        if method in methods.SPARSE_METHODS:
            # Every selector fills the budget exactly (GEM hands out its floors' remainders).
            assert run["selected_count"] == budget
            assert run["trainable_entries"] == run["selected_count"] + head
            assert sum(run["per_tensor_budget"].values()) == run["selected_count"]
            in_qv = [".query." in n or ".value." in n for n in run["per_tensor_budget"]]
            assert all(in_qv) != (method in methods.ALL_LINEAR_METHODS), (method, run["per_tensor_budget"])
            assert run["heldout"] is None  # one lr per method: no held-out split is taken
    full = results["summary"]["full"]
    assert full["trainable_entries"] == results["settings"]["total_parameters"]
    assert results["summary"]["gem"]["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 20


@pytest.mark.parametrize("kind", ["pair-strings", "cola"])
def test_pair_and_string_label_tasks_run(tmp_path, tiny_model, kind):
    code = run_main(tiny_model, make_task(tmp_path / kind, kind), tmp_path / "out", "--method", "gem",
                    "--seeds", "0", "1", "--eval-examples", "10")
    assert code == 0
    results = load_results(tmp_path / "out" / f"results-{kind}.jsonl")
    assert results["settings"]["eval_examples"] == 10
    assert [r["seed"] for r in results["runs"]] == [0, 1]
    assert results["summary"]["gem"]["accuracy_std"] >= 0


@pytest.mark.parametrize("examples", [0, 10, 1000])
def test_dev_curve_examples(tmp_path, tiny_model, examples):
    """--dev-curve-examples: no curve (0), a fixed subset of dev scored after every epoch, or all of
    dev (a number at least dev's size); dev's own scores, the reported ones, come from all of dev
    either way, and the plot's dev panel says which it shows."""
    from gem_finetune.report import dev_panel_title
    task = make_task(tmp_path / "task", "single")
    code = run_main(tiny_model, task, tmp_path / "out", "--method", "bitfit", "--epochs", "2",
                    "--dev-curve-examples", str(examples))
    assert code == 0
    results = load_results(tmp_path / "out" / "results-task.jsonl")
    (run,) = results["runs"]
    dev_n = results["settings"]["eval_examples"]
    shown = min(examples, dev_n)
    assert results["settings"]["dev_curve_examples"] == shown
    assert [c["epoch"] for c in run["dev_curve"]] == ([1, 2] if examples else [])
    assert all(c["examples"] == shown for c in run["dev_curve"])
    if shown == dev_n:  # the curve's last point is dev's own score
        assert run["dev_curve"][-1]["accuracy"] == run["accuracy"]
    assert ("dev_curve" in run["phase_seconds"]) == bool(examples)
    title = dev_panel_title(results["settings"], "accuracy")
    assert {0: "after the last epoch", 10: "fixed 10 of", 1000: "after each epoch (all"}[examples] in title
    assert (tmp_path / "out" / "curves-task.png").stat().st_size > 10_000


def test_eval_batches_sort_by_length_and_keep_every_example():
    enc = data.Encoded([[1] * n for n in (5, 2, 9, 2, 4)], [[0] * n for n in (5, 2, 9, 2, 4)], [0, 1, 0, 1, 1])
    got = data.eval_batches(enc, 2, 0)
    assert [b["input_ids"].shape[1] for b in got] == [2, 5, 9]
    assert sorted(sum((b["labels"].tolist() for b in got), [])) == sorted(enc.labels)


def test_lr_grid_keeps_the_best_on_the_first_seed(tmp_path, tiny_model):
    code = run_main(tiny_model, make_task(tmp_path / "grid", "single"), tmp_path / "out",
                    "--method", "bitfit", "--lr", "bitfit=1e-6,3e-2", "--seeds", "0", "1", "--epochs", "3",
                    "--train-examples", "32", "--heldout-examples", "16")
    assert code == 0
    results = load_results(tmp_path / "out" / "results-grid.jsonl")
    grid = results["lr_grid"]["bitfit"]
    best = max(grid, key=lambda row: row["heldout_accuracy"])
    assert [row["lr"] for row in grid] == [1e-6, 3e-2] and all(row["seeds"] == [0] for row in grid)
    assert results["summary"]["bitfit"]["lr"] == best["lr"]
    assert sorted((r["lr"], r["seed"]) for r in results["runs"]) == sorted(
        [(1e-6, 0), (3e-2, 0), (best["lr"], 1)])


def test_full_finetuning_learns_the_synthetic_task(tmp_path, tiny_model):
    # The label is carried by one word, so a working training loop gets the dev set right.
    code = run_main(tiny_model, make_task(tmp_path / "learn", "single", n_train=96), tmp_path / "out",
                    "--method", "full", "--lr", "3e-3", "--epochs", "4")
    assert code == 0
    results = load_results(tmp_path / "out" / "results-learn.jsonl")
    (run,) = results["runs"]
    assert run["accuracy"] >= 0.9, run["dev_curve"]
    assert run["losses"][-1] < run["losses"][0]


def test_cpu_and_bf16_autocast_are_used_and_recorded(tmp_path, tiny_model, monkeypatch):
    seen = []
    real_loss = methods.classification_loss

    def spy(model, batch):  # the forward and loss as each run's training and calibration make them
        seen.append((batch["input_ids"].device.type, next(model.parameters()).dtype,
                     torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
        return real_loss(model, batch)

    monkeypatch.setattr(methods, "classification_loss", spy)
    code = run_main(tiny_model, make_task(tmp_path / "bf16", "single"), tmp_path / "out", "--method", "gem", "full",
                    "--device", "cpu", "--precision", "bf16", "--calibration-batches", "1")
    assert code == 0
    results = load_results(tmp_path / "out" / "results-bf16.jsonl")
    assert results["settings"]["precision"] == "bf16"
    assert {(r["device"], r["precision"]) for r in results["runs"]} == {("cpu", "bf16")}
    assert all(len(r["losses"]) == 6 and all(map(math.isfinite, r["losses"])) for r in results["runs"])
    # 1 calibration batch + 6 steps per gem run, 6 steps for full: fp32 weights, bf16 autocast
    assert len(seen) == 13 and set(seen) == {("cpu", torch.float32, torch.bfloat16)}


def test_sparse_methods_touch_only_their_budget(tiny_model, tmp_path):
    task = data.read_task(make_task(tmp_path / "s", "single"))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    encoded = data.encode(tokenizer, task.train, 16)
    for method in ("gem", "random", "id3"):
        model = models.load_model(tiny_model, 2, seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        setup = methods.set_up(method, model, lr=1e-2, weight_decay=0.01, budget=50, total_steps=3, seed=0)
        train = data.batches(encoded, 16, tokenizer.pad_token_id, random.Random(0))
        if method == "gem":
            setup.optimizer.calibrate(model, train[:1], models.classification_loss)
        for batch in train:
            models.classification_loss(model, batch).backward()
            setup.optimizer.step()
            setup.optimizer.zero_grad()
        changed = {n: int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()}
        targets = set(methods.target_weight_names(model))
        assert all(count == 0 for n, count in changed.items() if n not in targets and not n.startswith("head"))
        assert 0 < sum(changed[n] for n in targets) <= 50, (method, changed)
        assert changed["head.weight"] == 64


def test_module_runs_as_a_script():
    done = subprocess.run([sys.executable, "-m", "gem_finetune", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--calibration-batches" in done.stdout


def test_the_4bit_base_runs(tmp_path, nf4_model):
    """qlora (LoRA r=8 on q/v over an NF4 encoder) and GEM with --quantize-base nf4, end to end;
    --quantize-base is refused for what cannot train on a 4-bit base."""
    pytest.importorskip("torchao.quantization")
    task = make_task(tmp_path / "single", "single")
    assert run_main(nf4_model, task, tmp_path / "q", "--method", "qlora", "--calibration-batches", "2") == 0
    assert run_main(nf4_model, task, tmp_path / "g", "--method", "gem-all", "--quantize-base", "nf4",
                    "--calibration-batches", "2") == 0
    (qlora,) = load_results(tmp_path / "q" / "results-single.jsonl")["runs"]
    gem = load_results(tmp_path / "g" / "results-single.jsonl")
    assert gem["settings"]["quantize_base"] == "nf4"
    (gem,) = gem["runs"]
    assert qlora["quantize_base"] == gem["quantize_base"] == "nf4" and gem["sparse_delta_layer"]
    assert qlora["lora_rank"] == 8 and len(qlora["losses"]) == len(gem["losses"]) == 6
    with pytest.raises(SystemExit):
        run_main(nf4_model, task, tmp_path / "x", "--method", "id3", "--quantize-base", "nf4")


def test_sparse_path_chooses_the_layer_or_the_drop_in_path(tmp_path, tiny_model, capsys):
    """--sparse-path drop-in trains GEM on SparseAdamW alone on CPU (where auto takes the layer),
    from the same selection, to the same numbers within rounding; it is a setting of the file;
    layer is refused for id3, drop-in with a 4-bit base."""
    task = make_task(tmp_path / "single", "single")
    common = ("--method", "gem", "--calibration-batches", "2")
    assert run_main(tiny_model, task, tmp_path / "auto", *common) == 0
    assert run_main(tiny_model, task, tmp_path / "drop", *common, "--sparse-path", "drop-in") == 0
    (layer,) = load_results(tmp_path / "auto" / "results-single.jsonl")["runs"]
    drop = load_results(tmp_path / "drop" / "results-single.jsonl")
    assert drop["settings"]["sparse_path"] == "drop-in"
    (drop,) = drop["runs"]
    assert layer["sparse_delta_layer"] and not drop["sparse_delta_layer"]
    assert layer["per_tensor_budget"] == drop["per_tensor_budget"]
    assert layer["selection_sha256"] == drop["selection_sha256"]  # the same entries, taken before sparsify_
    assert drop["losses"] == pytest.approx(layer["losses"], rel=1e-4)  # dW's entries summed in another order
    # tuned.md's drop-in section: the two files side by side
    capsys.readouterr()
    assert report.main(["--compare-paths", str(tmp_path / "auto" / "results-single.jsonl"),
                        str(tmp_path / "drop" / "results-single.jsonl")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| gem@0.01, lr 0.001 | 0 | yes | ") and table[3].startswith("| mean of 1 |")
    # another seed's selection differs: the digest tells them apart
    assert run_main(tiny_model, task, tmp_path / "seed1", *common, "--seeds", "1") == 0
    (other,) = load_results(tmp_path / "seed1" / "results-single.jsonl")["runs"]
    assert other["selection_sha256"] != layer["selection_sha256"]
    capsys.readouterr()
    assert run_main(tiny_model, task, tmp_path / "auto", *common, "--sparse-path", "drop-in") == 2
    assert "sparse_path" in capsys.readouterr().err
    for bad, words in ((("--method", "id3", "--sparse-path", "layer"), "not for id3"),
                       (("--method", "gem", "--sparse-path", "drop-in", "--quantize-base", "nf4"), "a 4-bit base")):
        with pytest.raises(SystemExit):
            run_main(tiny_model, task, tmp_path / "x", *bad)
        assert words in capsys.readouterr().err


def test_cost_profile_and_overlap_run(tmp_path, tiny_model, capsys):
    """gem_finetune.cost, which measured benchmarks/reproduce.md's profile and overlap table: the
    profile prints every phase of a run; a selection overlaps the full pass's by a share in
    [0, 1], and the full pass's own row shows 100 % in its last column."""
    from gem_finetune import cost
    task = make_task(tmp_path / "task", "single")
    common = ["--task-dir", str(task), "--model", str(tiny_model), "--train-examples", "32", "--batch-size", "8",
              "--max-length", "16", "--budget-fraction", "0.01"]
    assert cost.main(["profile", *common, "--method", "gem", "--lr", "gem=1e-3", "--epochs", "1",
                      "--heldout-examples", "8", "--out", str(tmp_path / "p.jsonl")]) == 0
    run = json.loads((tmp_path / "p.jsonl").read_text())
    assert {"calibration", "training", "dev", "heldout"} <= set(run["phase_seconds"])
    assert cost.main(["profile", *common, "--method", "gem", "--lr", "gem=1e-3", "--epochs", "2", "--old",
                      "--heldout-examples", "8", "--out", str(tmp_path / "old.jsonl")]) == 0
    old = json.loads((tmp_path / "old.jsonl").read_text())
    assert [c["examples"] for c in old["dev_curve"]] == [24, 24] and "dev_curve" in old["phase_seconds"]
    capsys.readouterr()
    assert cost.main(["overlap", *common, "--batches", "1", "2", "--seeds", "0", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gem")]
    assert len(rows) == 4
    shares = [float(cell.strip(" %")) for row in rows for cell in row.strip("|").split("|")[3:]]
    assert all(0 <= share <= 100 for share in shares)
    assert [row.strip("|").split("|")[-1].strip() for row in rows[:2]] == ["100.0 %", "100.0 %"]
    # --lr is gem-finetune's, one lr a method: bad input is one line, before anything trains
    for lr, words in (("gem=abc", "not a number"), ("gem=1e-3,3e-3", "one lr a method, not a grid"),
                      ("gem=-1", "must be > 0")):
        with pytest.raises(SystemExit):
            cost.main(["profile", *common, "--method", "gem", "--lr", lr])
        assert words in capsys.readouterr().err
