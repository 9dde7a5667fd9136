"""gem-finetune reads GLUE's and SuperGLUE's task files as they are distributed.

Each fixture is a made-up task in one distributed layout (header, file names, label spelling),
written here; none is copied data. The real SST-2, CoLA and MRPC copies are read too, where present.
"""
import json
from pathlib import Path

import pytest
from test_finetune import tiny_model, write_tsv  # noqa: F401  (tiny_model is a fixture)

from gem_finetune import cli, data
from gem_finetune.results import load as load_results

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
# Texts with bare quotes and parentheses, as GLUE's have: read with quoting off, they stay text.
TEXTS = ['the "good" film', "a bad plot ( sat )", "the cat ran", 'yes "no', "the dog sat", "a fine movie"]


def texts(i):
    return TEXTS[i % len(TEXTS)], TEXTS[(i + 1) % len(TEXTS)]


def glue_mrpc(directory, split, n):
    rows = [[i % 2, 1000 + i, 2000 + i, *texts(i)] for i in range(n)]
    write_tsv(directory / f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], rows)
    path = directory / f"{split}.tsv"  # Microsoft's original file opens with a byte-order mark
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")


def glue_qqp(directory, split, n):
    write_tsv(directory / f"{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
              [[i, 2 * i, 2 * i + 1, *texts(i), i % 2] for i in range(n)])


def glue_qnli(directory, split, n):
    write_tsv(directory / f"{split}.tsv", ["index", "question", "sentence", "label"],
              [[i, *texts(i), ["entailment", "not_entailment"][i % 2]] for i in range(n)])


def glue_mnli(directory, split, n):
    names = ["contradiction", "entailment", "neutral"]
    parses = ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
    # label1 is one annotator's label; gold_label, the consensus, differs here so a wrong pick shows.
    annotators = ["label1"] if split == "train" else ["label1", "label2", "label3", "label4", "label5"]
    header = ["index", "promptID", "pairID", "genre", *parses, "sentence1", "sentence2", *annotators, "gold_label"]
    rows = [[i, 10 + i, f"{10 + i}e", "fiction", "( ( a b ) c )", "( d e )", "(ROOT (S a))", "(ROOT (S b))",
             *texts(i), *["neutral"] * len(annotators), names[i % 3]] for i in range(n)]
    file = {"train": "train", "dev": "dev_matched"}[split]  # MNLI has no dev.tsv
    write_tsv(directory / f"{file}.tsv", header, rows)
    if split == "dev":  # the mismatched dev set ships beside it and is not read
        write_tsv(directory / "dev_mismatched.tsv", header, [[*row[:-1], "bogus"] for row in rows])


def glue_rte(directory, split, n):
    write_tsv(directory / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
              [[i, *texts(i), ["entailment", "not_entailment"][i % 2]] for i in range(n)])


def glue_wnli(directory, split, n):
    write_tsv(directory / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
              [[i, *texts(i), i % 2] for i in range(n)])


def superglue_boolq(directory, split, n):
    file = {"train": "train", "dev": "val"}[split]
    lines = [json.dumps({"question": texts(i)[0], "passage": texts(i)[1], "idx": i, "label": i % 2 == 1})
             for i in range(n)]
    (directory / f"{file}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# layout: (writer, text columns found, label names in class-id order)
LAYOUTS = {
    "MRPC": (glue_mrpc, ("#1 String", "#2 String"), ["0", "1"]),
    "QQP": (glue_qqp, ("question1", "question2"), ["0", "1"]),
    "QNLI": (glue_qnli, ("question", "sentence"), ["entailment", "not_entailment"]),
    "MNLI": (glue_mnli, ("sentence1", "sentence2"), ["contradiction", "entailment", "neutral"]),
    "RTE": (glue_rte, ("sentence1", "sentence2"), ["entailment", "not_entailment"]),
    "WNLI": (glue_wnli, ("sentence1", "sentence2"), ["0", "1"]),
    "BoolQ": (superglue_boolq, ("question", "passage"), ["false", "true"]),
}


def make_layout(directory, layout, n_train=24, n_dev=12):
    directory.mkdir(parents=True, exist_ok=True)
    writer = LAYOUTS[layout][0]
    writer(directory, "train", n_train)
    writer(directory, "dev", n_dev)
    return directory


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_distributed_layout_is_read(tmp_path, layout):
    _, text_columns, label_names = LAYOUTS[layout]
    task = data.read_task(make_layout(tmp_path / layout, layout))
    assert task.name == layout and task.text_columns == text_columns and task.label_names == label_names
    assert len(task.train.labels) == 24 and len(task.dev.labels) == 12
    for split, n in ((task.train, 24), (task.dev, 12)):
        assert [(a, b) for a, b in zip(split.first, split.second)] == [texts(i) for i in range(n)]
        # Every writer gives row i the class i mod (number of classes).
        assert split.labels == [i % len(label_names) for i in range(n)]


@pytest.mark.parametrize("name, size, text_columns", [("SST-2", 67349, ("sentence", None)),
                                                     ("CoLA", 8551, ("sentence", None)),
                                                     ("MRPC", 3668, ("#1 String", "#2 String"))])
def test_the_shared_glue_copies_are_read(name, size, text_columns):
    if not (SHARED_GLUE / name).is_dir():
        pytest.skip(f"no {SHARED_GLUE / name} next to the repository")
    task = data.read_task(SHARED_GLUE / name)
    assert task.text_columns == text_columns and task.label_names == ["0", "1"]
    assert len(task.train.labels) == size and (task.train.second is None) == (text_columns[1] is None)


def write_custom(directory):
    """A layout no name list knows fully: the text column "sentence" is known, the label is not."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 6), ("dev", 4)):
        write_tsv(directory / f"{split}.tsv", ["claim", "sentence", "verdict"],
                  [[*texts(i), ["no", "yes"][i % 2]] for i in range(n)])
    return directory


def test_columns_can_be_named(tmp_path):
    task_dir = write_custom(tmp_path)
    pair = data.read_task(task_dir, ["claim", "sentence"], "verdict")
    assert pair.text_columns == ("claim", "sentence") and pair.label_names == ["no", "yes"]
    assert pair.dev.first == [texts(i)[0] for i in range(4)] and pair.dev.labels == [0, 1, 0, 1]
    single = data.read_task(task_dir, ["sentence"], "verdict")
    assert single.text_columns == ("sentence", None) and single.train.first[0] == texts(0)[1]
    # Naming only the label keeps the text column found by name.
    assert data.read_task(task_dir, label_column="verdict").text_columns == ("sentence", None)


def _bad_layouts(tmp_path):
    """(read_task arguments, the words the one-line error must hold)."""
    custom = write_custom(tmp_path / "custom")
    no_dev = make_layout(tmp_path / "no-dev", "MNLI")
    (no_dev / "dev_matched.tsv").unlink()
    dev_lacks = make_layout(tmp_path / "dev-lacks", "QQP")
    write_tsv(dev_lacks / "dev.tsv", ["id", "question1", "question2", "label"], [[0, "a", "b", 1]])
    jsonl_no_label = make_layout(tmp_path / "jsonl-no-label", "BoolQ")
    (jsonl_no_label / "val.jsonl").write_text('{"question": "q", "passage": "p", "label": true}\n'
                                              '{"question": "q", "passage": "p"}\n')
    jsonl_broken = make_layout(tmp_path / "jsonl-broken", "BoolQ")
    (jsonl_broken / "train.jsonl").write_text('{"question": "q", "passage": "p", "label": true}\n{"question"\n')
    no_files = tmp_path / "no-files"
    no_files.mkdir()
    return [
        ((custom,), ["unknown columns ['claim', 'sentence', 'verdict']", "no known label column",
                     "--text-columns A [B] --label-column C"]),
        ((custom, ["claim"], "outcome"),
         ["no column ['outcome']", "its columns are ['claim', 'sentence', 'verdict']"]),
        ((custom, ["claim", "sentence", "verdict"], None), ["--text-columns names one or two columns, not 3"]),
        ((custom, ["verdict"], "verdict"), ["'verdict' cannot be both a text and the label column"]),
        ((no_dev,), ["dev.tsv: file not found (nor dev_matched.tsv)"]),
        ((dev_lacks,), ["dev.tsv: no column ['is_duplicate'] of train.tsv's"]),
        ((jsonl_no_label,), ["val.jsonl: line 2 has no 'label' field"]),
        ((jsonl_broken,), ["train.jsonl: line 2 is not JSON"]),
        ((no_files,), ["train.tsv: file not found (nor train.jsonl)"]),
    ]


def test_bad_layouts_name_the_problem(tmp_path):
    for arguments, expected in _bad_layouts(tmp_path):
        with pytest.raises(data.TaskDataError) as error:
            data.read_task(*arguments)
        message = str(error.value)
        assert "\n" not in message and all(words in message for words in expected), (expected, message)


def run_cli(tiny_model, task_dir, out, *extra):
    return cli.main(["--task-dir", str(task_dir), "--model", str(tiny_model), "--out", str(out),
                     "--method", "gem", "--seeds", "0", "--epochs", "1", "--batch-size", "8",
                     "--max-length", "16", "--budget-fraction", "0.01", "--calibration-batches", "1", *extra])


@pytest.mark.parametrize("layout", ["MNLI", "BoolQ"])
def test_distributed_layouts_fine_tune_end_to_end(tmp_path, tiny_model, layout, capsys):
    assert run_cli(tiny_model, make_layout(tmp_path / layout, layout), tmp_path / "out") == 0
    _, text_columns, label_names = LAYOUTS[layout]
    assert f"{len(label_names)} classes {label_names}, text columns {text_columns}" in capsys.readouterr().out
    results = load_results(tmp_path / "out" / f"results-{layout}.jsonl")
    (run,) = results["runs"]
    assert len(run["losses"]) == 3 and results["settings"]["eval_examples"] == 12


def test_named_columns_through_the_command(tmp_path, tiny_model, capsys):
    task_dir = write_custom(tmp_path / "custom")
    assert run_cli(tiny_model, task_dir, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gem-finetune: error: ") and "unknown columns" in err
    assert "--label-column C" in err and "Traceback" not in err
    code = run_cli(tiny_model, task_dir, tmp_path / "out", "--text-columns", "claim", "sentence",
                   "--label-column", "verdict")
    assert code == 0
    assert "2 classes ['no', 'yes'], text columns ('claim', 'sentence')" in capsys.readouterr().out
