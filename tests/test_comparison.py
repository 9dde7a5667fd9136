"""The tuned comparison's protocol on a tiny BERT (test_finetune's fixture): the lr grid is
decided on a held-out split of train, apart from the training examples and from dev;
gem-uniform and gem-all select what they should; the budget curve and the Markdown report."""
import itertools
import random

import pytest
from test_finetune import tiny_model, write_tsv  # noqa: F401  (tiny_model is a fixture)

from gem_finetune import cli, data, methods, models, report
from gem_finetune.methods import BUDGETED_METHODS
from gem_finetune.results import ResultsFile, ResultsFileError
from gem_finetune.results import load as load_results

POSITIVE, NEGATIVE = ["good", "great", "fine"], ["bad", "awful", "poor"]
FILLER = ["movie", "film", "the", "a", "plot", "is", "was", "yes", "no", "maybe", "cat", "dog", "sat", "ran"]


def unique_task(directory, n_train, n_dev, flip_dev=False):
    """A task whose label is carried by one sentiment word and whose sentences are all distinct,
    within and across train.tsv and dev.tsv, so that examples can be told apart by their tokens.
    ``flip_dev``: dev's labels are the opposite of what train teaches."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    fillers = list(itertools.permutations(FILLER, 3))  # 2184 distinct tails
    rng.shuffle(fillers)
    tails = iter(fillers)
    for name, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            label = i % 2
            text = " ".join([rng.choice(POSITIVE if label else NEGATIVE), *next(tails)])
            rows.append([text, 1 - label if flip_dev and name == "dev" else label])
        write_tsv(directory / f"{name}.tsv", ["sentence", "label"], rows)
    return directory


def run_cli(tiny_model, task_dir, out, *extra):
    return cli.main(["--task-dir", str(task_dir), "--model", str(tiny_model), "--out", str(out),
                     "--batch-size", "8", "--max-length", "16", "--budget-fraction", "0.01", *extra])


def token_rows(batch_list):
    """The unpadded token ids of every example in a list of batches."""
    return [tuple(ids[mask.bool()].tolist()) for b in batch_list
            for ids, mask in zip(b["input_ids"], b["attention_mask"])]


# ---------------------------------------------------------------------------------------
# The held-out split


def test_heldout_split_is_apart_from_training_and_dev(tmp_path, tiny_model, monkeypatch):
    task_dir = unique_task(tmp_path / "task", n_train=48, n_dev=16)
    seen, real_run_once = [], cli.run_once

    def spy(method, lr, seed, config, train, dev_batches, heldout_batches=None):
        seen.append((lr, seed, train, dev_batches, heldout_batches))
        return real_run_once(method, lr, seed, config, train, dev_batches, heldout_batches)

    monkeypatch.setattr(cli, "run_once", spy)
    code = run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "bitfit", "--lr", "bitfit=1e-4,3e-2",
                   "--train-examples", "24", "--heldout-examples", "12", "--seeds", "0", "1", "2",
                   "--grid-seeds", "2", "--epochs", "1")
    assert code == 0
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    task = data.read_task(task_dir)
    train_file = {tuple(ids) for ids in tokenizer(task.train.first)["input_ids"]}
    dev_file = {tuple(ids) for ids in tokenizer(task.dev.first)["input_ids"]}
    assert len(train_file) == 48 and len(dev_file) == 16 and not train_file & dev_file

    # Every lr of the grid on the 2 grid seeds, then the chosen lr on the third seed.
    assert [(lr, seed) for lr, seed, *_ in seen][:4] == [(1e-4, 0), (1e-4, 1), (3e-2, 0), (3e-2, 1)]
    assert len(seen) == 5 and seen[4][1] == 2
    for _, _, train, dev_batches, heldout_batches in seen:
        trained = {tuple(ids) for ids in train.input_ids}
        heldout, dev = set(token_rows(heldout_batches)), set(token_rows(dev_batches))
        assert len(trained) == 24 and len(heldout) == 12 and len(dev) == 16
        assert heldout <= train_file and trained <= train_file  # held out of train.tsv ...
        assert not heldout & trained  # ... never trained on ...
        assert dev == dev_file and not heldout & dev  # ... and dev is dev, untouched
    assert len({tuple(token_rows(h)) for *_, h in seen}) == 1  # one held-out split for every run

    results = load_results(tmp_path / "out" / "results-task.jsonl")
    assert results["settings"]["heldout_examples"] == 12
    grid = results["lr_grid"]["bitfit"]
    assert [row["seeds"] for row in grid] == [[0, 1], [0, 1]]
    chosen = max(grid, key=lambda row: row["heldout_accuracy"])["lr"]
    assert results["summary"]["bitfit"]["lr"] == chosen
    assert sorted(r["seed"] for r in results["runs"] if r["lr"] == chosen) == [0, 1, 2]


def test_lr_is_chosen_on_heldout_where_dev_disagrees(tmp_path, tiny_model):
    # Dev's labels are flipped: the lr that learns the task scores high on held-out (drawn from
    # train) and near 0 on dev; the lr that learns nothing scores ~50 % on both. Choosing on
    # dev would keep the useless lr.
    task_dir = unique_task(tmp_path / "flip", n_train=96, n_dev=24, flip_dev=True)
    code = run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "full", "--lr", "full=1e-7,3e-3",
                   "--train-examples", "64", "--heldout-examples", "32", "--seeds", "0", "--epochs", "3")
    assert code == 0
    results = load_results(tmp_path / "out" / "results-flip.jsonl")
    by_lr = {r["lr"]: r for r in results["runs"]}
    assert by_lr[1e-7]["accuracy"] > by_lr[3e-3]["accuracy"] + 0.3, by_lr  # dev prefers the useless lr
    assert by_lr[3e-3]["heldout"]["accuracy"] >= 0.9 > by_lr[1e-7]["heldout"]["accuracy"]
    assert results["summary"]["full"]["lr"] == 3e-3


def test_heldout_errors_name_the_problem(tmp_path, tiny_model, capsys):
    task_dir = unique_task(tmp_path / "small", n_train=40, n_dev=8)
    code = run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "bitfit", "--lr", "bitfit=1e-3,1e-2",
                   "--train-examples", "32", "--heldout-examples", "16")
    err = capsys.readouterr().err
    assert code == 2 and "too few for --train-examples 32 plus --heldout-examples 16" in err
    for extra, message in ((["--lr", "gem=1e-3,1e-3"], "listed twice"),
                           (["--seeds", "0", "--grid-seeds", "2"], "only 1 seeds"),
                           (["--budget-fraction", "0.01", "0.01"], "a value is listed twice")):
        with pytest.raises(SystemExit) as stop:
            run_cli(tiny_model, task_dir, tmp_path / "out", *extra)
        assert stop.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# gem-uniform and gem-all


def calibrated(method, tiny_model, encoded, budget):
    model = models.load_model(tiny_model, 2, seed=0)
    setup = methods.set_up(method, model, lr=1e-2, weight_decay=0.01, budget=budget, total_steps=3, seed=0)
    train = data.batches(encoded, 16, 0, random.Random(0))
    setup.optimizer.calibrate(model, train[:2], models.classification_loss)
    return model, setup.optimizer, train


@pytest.fixture
def encoded(tmp_path, tiny_model):
    from transformers import AutoTokenizer
    task = data.read_task(unique_task(tmp_path / "task", n_train=48, n_dev=8))
    return data.encode(AutoTokenizer.from_pretrained(str(tiny_model)), task.train, 16)


def test_gem_uniform_splits_the_budget_by_tensor_size(tiny_model, encoded):
    # The 4 query/value weights are all 32 x 32: a size-proportional split of 48 is 12 each,
    # which the entropy-guided split (gem) is not.
    counts = {m: report.per_tensor_budget(calibrated(m, tiny_model, encoded, 48)[1]) for m in ("gem-uniform", "gem")}
    assert set(counts["gem-uniform"]) == set(methods.target_weight_names(models.load_model(tiny_model, 2, 0)))
    assert list(counts["gem-uniform"].values()) == [12, 12, 12, 12]
    assert sum(counts["gem"].values()) == 48 and counts["gem"] != counts["gem-uniform"]


def test_gem_all_selects_in_every_linear_layer_but_the_pooler(tiny_model, encoded):
    model, optimizer, train = calibrated("gem-all", tiny_model, encoded, 300)
    counts = report.per_tensor_budget(optimizer)
    linear = [f"encoder.encoder.layer.{i}.{name}.weight" for i in range(2)
              for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                           "attention.output.dense", "intermediate.dense", "output.dense")]
    assert sorted(counts) == sorted(linear) == sorted(methods.target_weight_names(model, "gem-all"))
    assert sum(counts.values()) == 300
    assert sum(c for n, c in counts.items() if ".query." not in n and ".value." not in n) > 0
    # Training changes the selected entries of those tensors, the head, and nothing else.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in train:
        models.classification_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n: int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()}
    assert all(changed[n] == 0 for n in changed if n not in linear and not n.startswith("head."))
    assert all(0 < changed[n] <= counts[n] for n in linear if counts[n] > 0), changed
    assert changed["encoder.pooler.dense.weight"] == 0


# ---------------------------------------------------------------------------------------
# The budget curve and the report


def test_budget_curve_writes_its_plot(tmp_path, tiny_model):
    task_dir = unique_task(tmp_path / "curve", n_train=32, n_dev=8)
    code = run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "gem", "bitfit",
                   "--budget-fraction", "0.005", "0.02", "--seeds", "0", "1", "--epochs", "1")
    assert code == 0
    results = load_results(tmp_path / "out" / "results-curve.jsonl")
    assert list(results["summary"]) == ["gem@0.005", "gem@0.02", "bitfit"]
    total = results["settings"]["total_parameters"]
    for fraction in (0.005, 0.02):
        runs = [r for r in results["runs"] if r["label"] == f"gem@{fraction:g}"]
        assert [r["seed"] for r in runs] == [0, 1] and all(r["budget_fraction"] == fraction for r in runs)
        assert all(r["selected_count"] == int(fraction * total) for r in runs)
        assert results["summary"][f"gem@{fraction:g}"]["budget_fraction"] == fraction
    assert results["summary"]["bitfit"]["budget_fraction"] is None
    assert (tmp_path / "out" / "budget-curve-curve.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "curves-curve.png").stat().st_size > 10_000


def test_markdown_report_marks_the_choice_and_a_grid_edge():
    def summary(method, lr):
        return {"method": method, "budget_fraction": None, "lr": lr, "seeds": [0], "device": "cpu",
                "accuracy_mean": 0.8, "accuracy_std": 0.0, "mcc_mean": 0.6, "mcc_std": 0.0, "trainable_entries": 10,
                "optimizer_state_bytes": 80, "peak_memory_mib": None, "median_step_seconds": 0.1,
                "wall_seconds_mean": 12.0}
    results = {"task": "T", "commands": [["gem-finetune", "--x"]], "complete": False,
               "settings": {"train_examples": 1000, "heldout_examples": 200, "eval_examples": 872, "epochs": 3,
                            "batch_size": 32, "max_length": 64, "precision": "fp32", "seeds": [0], "grid_seeds": [0],
                            "select_metric": "accuracy"},
               "summary": {"gem": summary("gem", 1e-3), "full": summary("full", 1e-4)},
               "lr_grid": {"gem": [{"lr": lr, "heldout_accuracy": a} for lr, a in ((3e-4, .7), (1e-3, .9), (3e-3, .8))],
                           "full": [{"lr": lr, "heldout_accuracy": a} for lr, a in ((1e-5, .7), (1e-4, .9))]}}
    text = report.markdown(results)
    assert "**Incomplete**" in text and "| gem | 0.0003 → 70.0, **0.001 → 90.0**, 0.003 → 80.0 |  |" in text
    assert "| full | 1e-05 → 70.0, **0.0001 → 90.0** | chosen at the edge of the grid: widen it |" in text
    assert "Chosen lrs: gem 0.001, full 0.0001" in text
    assert "| gem | 0.001 | 80.0 ± 0.0 | 0.600 ± 0.000 | 10 | 80 B | cpu | n/a | 100 | 12.0 |" in text


# ---------------------------------------------------------------------------------------
# Resuming: each finished run is in the results file at once; the same command goes on from them

TIMINGS = ("peak_memory_mib", "median_step_seconds", "wall_seconds_mean", "device")


def counting_runs(monkeypatch, stop_after=None):
    """Replace the command's run_once by one that records each run it trains, and raises
    KeyboardInterrupt (a ^C) instead of training the run after the first ``stop_after``."""
    trained, real_run_once = [], methods.run_once  # not cli.run_once: that may be an earlier spy

    def spy(method, lr, seed, config, *data):
        if len(trained) == stop_after:
            raise KeyboardInterrupt
        trained.append((method, config.budget_fraction, lr, seed))
        return real_run_once(method, lr, seed, config, *data)

    monkeypatch.setattr(cli, "run_once", spy)
    return trained


def test_a_stopped_comparison_goes_on_where_it_stopped(tmp_path, tiny_model, monkeypatch, capsys):
    task_dir = unique_task(tmp_path / "task", n_train=48, n_dev=16)
    args = ("--method", "bitfit", "gem", "--lr", "bitfit=1e-4,3e-2", "gem=1e-3,1e-2", "--budget-fraction", "0.005",
            "0.02", "--train-examples", "24", "--heldout-examples", "12", "--seeds", "0", "1", "--epochs", "1",
            "--calibration-batches", "1")
    # bitfit: 2 lrs on seed 0, then seed 1 at the chosen one; gem the same at each of 2 fractions
    every_run = 9
    trained = counting_runs(monkeypatch)
    assert run_cli(tiny_model, task_dir, tmp_path / "whole", *args) == 0 and len(trained) == every_run

    trained = counting_runs(monkeypatch, stop_after=4)
    assert run_cli(tiny_model, task_dir, tmp_path / "resumed", *args) == 130
    assert "interrupted" in capsys.readouterr().err
    first = list(trained)
    path = tmp_path / "resumed" / "results-task.jsonl"
    assert sum('"kind": "run"' in line for line in path.read_text().splitlines()) == 4
    partial = load_results(path)  # bitfit's 3 runs are all there, gem@0.005 has 1 of 3
    assert not partial["complete"] and list(partial["summary"]) == ["bitfit"]

    trained = counting_runs(monkeypatch)
    assert run_cli(tiny_model, task_dir, tmp_path / "resumed", *args) == 0
    assert len(trained) == every_run - 4 and not set(trained) & set(first)
    assert "4 finished runs found" in capsys.readouterr().out
    trained = counting_runs(monkeypatch)
    assert run_cli(tiny_model, task_dir, tmp_path / "resumed", *args) == 0 and trained == []  # nothing left

    whole, resumed = (load_results(tmp_path / name / "results-task.jsonl") for name in ("whole", "resumed"))
    assert resumed["complete"] and resumed["lr_grid"] == whole["lr_grid"]
    assert list(resumed["summary"]) == list(whole["summary"]) == ["gem@0.005", "gem@0.02", "bitfit"]  # METHODS order
    for label, summary in whole["summary"].items():
        assert ({k: v for k, v in resumed["summary"][label].items() if k not in TIMINGS}
                == {k: v for k, v in summary.items() if k not in TIMINGS}), label

    # The report reads the same file: the table, the grids, both commands' runs, the plots redrawn.
    (tmp_path / "resumed" / "budget-curve-task.png").unlink()
    capsys.readouterr()
    assert report.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "**Incomplete**" not in printed and "| gem@0.02 | " in printed and "| bitfit | " in printed
    assert (tmp_path / "resumed" / "budget-curve-task.png").stat().st_size > 10_000


def test_a_results_file_of_other_settings_is_refused(tmp_path, tiny_model, monkeypatch, capsys):
    task_dir = unique_task(tmp_path / "task", n_train=24, n_dev=8)
    base = ("--method", "bitfit", "--seeds", "0", "--epochs", "1", "--train-examples", "16")
    assert run_cli(tiny_model, task_dir, tmp_path / "out", *base) == 0
    path = tmp_path / "out" / "results-task.jsonl"
    written = path.read_bytes()
    capsys.readouterr()
    trained = counting_runs(monkeypatch)
    for extra, words in ((["--epochs", "2"], "epochs 1 there, 2 here"),
                         (["--precision", "bf16"], 'precision "fp32" there, "bf16" here'),
                         (["--seeds", "0", "1"], "seeds [0] there, [0, 1] here"),
                         (["--train-examples", "12"], "train_examples 16 there, 12 here"),
                         (["--max-length", "12"], "max_length 16 there, 12 here"),
                         (["--lr", "bitfit=1e-2"], "lr grid of bitfit [0.001] there, [0.01] here (a grid may "
                                                   "only widen)")):
        assert run_cli(tiny_model, task_dir, tmp_path / "out", *base, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path} holds runs made with other settings" in err and words in err, err
    lines = (task_dir / "dev.tsv").read_text().splitlines()
    text, label = lines[1].split("\t")
    lines[1] = f"{text}\t{1 - int(label)}"  # one dev label changed: same counts, other numbers
    (task_dir / "dev.tsv").write_text("\n".join(lines) + "\n")
    assert run_cli(tiny_model, task_dir, tmp_path / "out", *base) == 2
    assert "task_files_sha256" in capsys.readouterr().err
    assert trained == [] and path.read_bytes() == written  # nothing trained, nothing mixed in


def test_a_torn_last_line_is_skipped_and_the_next_run_starts_a_line(tmp_path, tiny_model, monkeypatch, capsys):
    task_dir = unique_task(tmp_path / "task", n_train=24, n_dev=8)
    base = ("--seeds", "0", "--epochs", "1", "--train-examples", "16", "--calibration-batches", "1")
    assert run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "bitfit", *base) == 0
    path = tmp_path / "out" / "results-task.jsonl"
    with open(path, "ab") as f:  # what a kill -9 in the middle of writing a record leaves
        f.write(b'{"kind": "run", "method": "gem", "budget_fraction": 0.01, "lr": 0.0')
    capsys.readouterr()
    trained = counting_runs(monkeypatch)
    assert run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "bitfit", "gem", *base) == 0
    assert trained == [("gem", 0.01, 1e-3, 0)]
    assert "line 3 is not a whole JSON record" in capsys.readouterr().err
    trained = counting_runs(monkeypatch)
    assert run_cli(tiny_model, task_dir, tmp_path / "out", "--method", "bitfit", "gem", *base) == 0
    assert trained == []  # the gem run appended after the torn line was read back
    assert list(load_results(path)["summary"]) == ["gem", "bitfit"]


def test_commands_with_different_methods_share_a_results_file(tmp_path):
    # What scripts/reproduce.sh's lanes do: each writes its own settings record and runs.
    settings = {"task": "T", "epochs": 1, "seeds": [0]}
    path = tmp_path / "results-T.jsonl"

    def header(lr_plan):
        return {"settings": settings, "lr_plan": lr_plan, "methods": list(lr_plan), "budget_fractions": [1e-3],
                "command": ["gem-finetune"]}

    def run(method, lr):
        return {"method": method, "budget_fraction": None, "lr": lr, "seed": 0}

    full, gem = ResultsFile(path, header({"full": [1e-4]})), ResultsFile(path, header({"gem": [1e-3, 1e-2]}))
    full.add(run("full", 1e-4))
    gem.add(run("gem", 1e-3))
    gem.add(run("gem", 1e-2))
    both = ResultsFile(path, header({"full": [1e-4], "gem": [1e-3, 1e-2]}))
    assert both.find("full", None, 1e-4, 0) and both.find("gem", None, 1e-2, 0) and len(both.runs) == 3
    with pytest.raises(ResultsFileError, match=r"lr grid of gem \[0.001, 0.01\] there, \[0.001\] here"):
        ResultsFile(path, header({"gem": [1e-3]}))  # a narrower grid would choose among fewer lrs
    with pytest.raises(ResultsFileError, match='device null there, "cuda" here'):
        ResultsFile(path, {**header({"gem": [1e-3, 1e-2]}), "device": "cuda"})  # a lent GPU's runs: another file
    wider = ResultsFile(path, header({"gem": [3e-4, 1e-3, 1e-2]}))  # a grid whose edge won gains an lr
    assert wider.find("gem", None, 1e-2, 0) and len(wider.runs) == 3
    wider.add(run("gem", 3e-4))
    with pytest.raises(ResultsFileError, match=r"lr grid of gem \[0.0003, 0.001, 0.01\] there"):
        ResultsFile(path, header({"gem": [1e-3, 1e-2]}))
    with open(path, "a") as f:
        f.write('{"kind": "run", "method": "gem"}\n')  # not one of ours: refused, not half-read
    with pytest.raises(ResultsFileError, match="line 8 is not a gem-finetune results record"):
        ResultsFile(path, header({"full": [1e-4]}))


def test_the_table_decides_on_the_widest_grid(tmp_path, capsys):
    # A grid whose top lr won is widened by a later command; the table then chooses among every
    # lr of both commands, and the first command's runs still count.
    settings = {"task": "T", "seeds": [0, 1], "grid_seeds": [0], "select_metric": "accuracy"}
    path = tmp_path / "results-T.jsonl"

    def header(grid):
        return {"settings": settings, "lr_plan": {"bitfit": grid}, "methods": ["bitfit"], "budget_fractions": [],
                "command": ["gem-finetune", *map(str, grid)]}

    def run(lr, seed, heldout):
        return {"method": "bitfit", "budget_fraction": None, "lr": lr, "seed": seed, "accuracy": heldout,
                "mcc": 0.0, "heldout": {"accuracy": heldout, "mcc": 0.0}, "device": "cpu", "trainable_entries": 1,
                "optimizer_state_bytes": 8, "peak_memory_mib": None, "median_step_seconds": 1.0,
                "wall_seconds": 1.0}

    narrow = ResultsFile(path, header([1e-3, 3e-3]))
    for lr, heldout in ((1e-3, 0.6), (3e-3, 0.7)):
        narrow.add(run(lr, 0, heldout))
    narrow.add(run(3e-3, 1, 0.7))
    assert load_results(path)["lr_grid"]["bitfit"][-1]["lr"] == 3e-3  # the edge won: widen it
    wide = ResultsFile(path, header([1e-3, 3e-3, 1e-2]))
    wide.add(run(1e-2, 0, 0.65))
    results = load_results(path)
    assert [row["lr"] for row in results["lr_grid"]["bitfit"]] == [1e-3, 3e-3, 1e-2]
    assert results["summary"]["bitfit"]["lr"] == 3e-3 and results["complete"]  # now inside the grid
    # what scripts/reproduce.sh asks for the drop-in path's row: the lr a grid chose
    capsys.readouterr()
    assert report.main(["--chosen-lr", "bitfit", "none", str(path)]) == 0 and capsys.readouterr().out == "0.003\n"
    assert report.main(["--chosen-lr", "gem", "0.001", str(path)]) == 1 and "no chosen lr" in capsys.readouterr().err


def write_results(path, task, rows, methods, lr_plan=None, state_bytes=None, **settings):
    """A results file as gem-finetune writes it, of one seed a run: rows of (method, lr, accuracy),
    held-out accuracy the same; by default bitfit's grid 1e-3..1e-2, gem's (at 0.1 %) 1e-3 and 3e-3;
    every budgeted method at 0.1 %; optimizer state 64 bytes unless ``state_bytes`` says otherwise."""
    lr_plan = lr_plan or {"bitfit": [1e-3, 3e-3, 1e-2], "gem": [1e-3, 3e-3]}
    state_bytes = state_bytes or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    file = ResultsFile(path, {"settings": {"task": task, "seeds": [0], "grid_seeds": [0], "select_metric": "accuracy",
                                           "train_examples": 4, "heldout_examples": 4, "eval_examples": 4,
                                           "dev_curve_examples": 0, "epochs": 1, "batch_size": 2, "max_length": 8,
                                           "precision": "fp32", **settings},
                              "lr_plan": {m: lr_plan[m] for m in methods}, "methods": methods,
                              "budget_fractions": [1e-3], "command": ["gem-finetune"]})
    for method, lr, accuracy in rows:
        budgeted = method in BUDGETED_METHODS
        file.add({"method": method, "budget_fraction": 1e-3 if budgeted else None, "lr": lr, "seed": 0,
                  "accuracy": accuracy, "mcc": 0.0, "heldout": {"accuracy": accuracy, "mcc": 0.0}, "device": "cpu",
                  "trainable_entries": 7 if budgeted else 3, "optimizer_state_bytes": state_bytes.get(method, 64),
                  "peak_memory_mib": None, "median_step_seconds": 1.0, "wall_seconds": 1.0, "losses": [0.7, 0.6],
                  "dev_curve": [],
                  **({"per_tensor_budget": {"query": 7}} if budgeted else {})})
    return str(path)


def test_the_tasks_table_puts_each_task_in_a_column(tmp_path, capsys):
    # What the README's table is made from: both tasks' files and a 4-bit base's file in one table.
    files = [write_results(tmp_path / "results-A.jsonl", "A", [("bitfit", 1e-3, 0.5), ("bitfit", 3e-3, 0.8),
                                                               ("bitfit", 1e-2, 0.7), ("gem", 1e-3, 0.6),
                                                               ("gem", 3e-3, 0.9)], ["gem", "bitfit"]),
             write_results(tmp_path / "results-B.jsonl", "B", [("bitfit", 1e-3, 0.5), ("bitfit", 3e-3, 0.6),
                                                               ("bitfit", 1e-2, 0.55), ("gem", 1e-3, 0.5)],
                           ["gem", "bitfit"]),  # gem unfinished
             write_results(tmp_path / "nf4" / "results-A.jsonl", "A", [("gem", 1e-3, 0.75), ("gem", 3e-3, 0.5)],
                           ["gem"], quantize_base="nf4")]
    capsys.readouterr()
    assert report.main(["--tasks-table", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| method | budget | A dev acc % (lr) | B dev acc % (lr) | mean of tasks | trainable entries "
                        "| optimizer state |")
    # rows without a budget first; the grid's edge is marked; a file's variant names its rows; the
    # mean only where every task has its number
    assert lines[2:] == ["| bitfit | — | 80.0 ± 0.0 (0.003) | 60.0 ± 0.0 (0.003) | 70.0 | 3 | 64 B |",
                         "| gem | 0.1 % | 90.0 ± 0.0 (0.003, edge) | not finished | — | 7 | 64 B |",
                         "| gem (NF4 base) | 0.1 % | 75.0 ± 0.0 (0.001, edge) | — | — | 7 | 64 B |"]


def test_the_defaults_follow_the_rule_written_before_the_table(tmp_path, capsys):
    # benchmarks/reproduce.md's rule: the candidate with the best mean of tasks, the least optimizer
    # state among those within 0.5 points; its lr by the mean held-out accuracy over the tasks.
    lrs = [3e-4, 1e-3, 3e-3, 1e-2]
    grids, state = {"gem": lrs, "id3": lrs, "bitfit": lrs}, {"gem": 64, "id3": 32}
    rows = lambda method, accuracies: [(method, lr, a) for lr, a in zip(lrs, accuracies)]  # noqa: E731
    a = write_results(tmp_path / "results-A.jsonl", "A",
                      rows("gem", [0.5, 0.6, 0.9, 0.5]) + rows("id3", [0.5, 0.85, 0.9, 0.6])
                      + rows("bitfit", [0.5, 0.99, 0.5, 0.5]),  # the best row, but not a candidate
                      ["gem", "id3", "bitfit"], grids, state)
    b_gem, b_id3 = rows("gem", [0.5, 0.7, 0.8, 0.6]), rows("id3", [0.5, 0.8, 0.7, 0.5])
    b = write_results(tmp_path / "results-B.jsonl", "B", b_gem + b_id3[:3], ["gem", "id3"], grids, state)
    nf4 = write_results(tmp_path / "nf4" / "results-A.jsonl", "A", [("gem", 3e-3, 0.99)], ["gem"], {"gem": [3e-3]},
                        quantize_base="nf4")  # a variant: never a candidate
    capsys.readouterr()
    assert report.main(["--defaults", a, b, nf4]) == 1
    assert capsys.readouterr().err.endswith("not decided yet: id3@0.001 on B is not finished\n")
    b = write_results(tmp_path / "2" / "results-B.jsonl", "B", b_gem + b_id3, ["gem", "id3"], grids, state)
    assert report.main(["--defaults", a, b, nf4]) == 0
    # gem 85.0 (A 90, B 80, both at 3e-3) and id3 85.0 (A 90 at 3e-3, B 80 at 1e-3) tie: id3's
    # smaller state wins; its lr is 1e-3 (mean held-out 82.5) over 3e-3 (80.0), although A chose 3e-3
    assert capsys.readouterr().out.splitlines() == [
        "winner: id3 at 0.1 % (mean of tasks 85.0)",
        "within 0.5 points of the best, the least optimizer state wins among: gem at 0.1 % 85.0, id3 at 0.1 % 85.0",
        "default lr: 0.001 (mean held-out accuracy over the tasks: 0.0003 50.0, 0.001 82.5, 0.003 80.0, 0.01 55.0)"]
    # a candidate one task's file does not list, or a choice at an end of its grid, leaves them undecided
    b = write_results(tmp_path / "4" / "results-B.jsonl", "B", b_gem, ["gem"], grids, state)
    assert report.main(["--defaults", a, b]) == 1
    assert capsys.readouterr().err.endswith("not decided yet: id3@0.001 is not run on B\n")
    b_gem[3] = ("gem", 1e-2, 0.95)
    b = write_results(tmp_path / "5" / "results-B.jsonl", "B", b_gem + b_id3, ["gem", "id3"], grids, state)
    assert report.main(["--defaults", a, b]) == 1
    assert "gem@0.001 on B chose an end of its grid (0.01)" in capsys.readouterr().err
    # one lr and no grid: nothing chose it, so it decides nothing either
    b = write_results(tmp_path / "6" / "results-B.jsonl", "B", [("gem", 3e-3, 0.8)] + b_id3, ["gem", "id3"],
                      {"gem": [3e-3], "id3": lrs}, state)
    assert report.main(["--defaults", a, b]) == 1
    assert capsys.readouterr().err.endswith("not decided yet: gem@0.001 on B trained one lr: no grid chose it\n")


def test_reproduce_sh_report_only_writes_the_report_of_the_runs_so_far(tmp_path):
    # REPORT_ONLY=1, run beside the lanes: tuned.md and the plots from the files, nothing trained.
    import os
    import subprocess
    import sys
    from pathlib import Path
    write_results(tmp_path / "results-SST-2.jsonl", "SST-2", [("bitfit", 1e-3, 0.5), ("bitfit", 3e-3, 0.8),
                                                              ("bitfit", 1e-2, 0.7), ("gem", 1e-3, 0.6),
                                                              ("gem", 3e-3, 0.9)], ["bitfit", "gem"])
    write_results(tmp_path / "drop-in" / "results-SST-2.jsonl", "SST-2", [("gem", 3e-3, 0.85)], ["gem"],
                  {"gem": [3e-3]}, sparse_path="drop-in")
    write_results(tmp_path / "nf4" / "results-MRPC.jsonl", "MRPC", [("gem", 1e-3, 0.75)], ["gem"],
                  quantize_base="nf4")
    root = Path(__file__).parent.parent
    done = subprocess.run(["bash", "scripts/reproduce.sh"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "REPORT_ONLY": "1", "OUT": str(tmp_path), "PY": sys.executable})
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "tuned.md").read_text()
    assert "REPORT_ONLY=1" in text and "| bitfit | — | 80.0 ± 0.0 (0.003) | — | — |" in text
    assert "| gem (NF4 base) | 0.1 % | — | not finished | — |" in text and "## GEM on a 4-bit (NF4) base" in text
    # the drop-in path's runs beside the layer's (these synthetic runs record no selection digest)
    assert "## The drop-in path" in text
    assert "| gem@0.001, lr 0.003 | 0 | not recorded | 90.0 | 85.0 | 90.0 | 85.0 |" in text
    assert (tmp_path / "curves-SST-2.png").exists()
