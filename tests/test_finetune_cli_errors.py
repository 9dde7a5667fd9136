"""gem-finetune's bad input: one line on stderr, exit status 2, no traceback, and no results file.

Each case would otherwise crash with a traceback, print argparse's many-line usage, or run with
a value that gives wrong or meaningless numbers.
"""
import pytest
import torch
from test_finetune import make_task, tiny_model, write_tsv  # noqa: F401  (tiny_model is a fixture)

from gem_finetune import cli


def exit_status(argv) -> int:
    """What the command exits with: argparse's errors exit, the others return."""
    try:
        return cli.main(argv)
    except SystemExit as stop:
        return stop.code


def assert_refused(argv, out, capsys, *expected):
    code = exit_status(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, (code, err, captured.out[-2000:])
    assert err.count("\n") == 1 and err.startswith("gem-finetune: error: "), err
    assert "Traceback" not in err and all(words in err for words in expected), (expected, err)
    assert not list(out.glob("results-*")), "a refused command wrote a results file"


@pytest.fixture
def task(tmp_path):
    return make_task(tmp_path / "task", "single")


def command(task, tiny_model, out, *extra):
    return ["--task-dir", str(task), "--model", str(tiny_model), "--out", str(out), "--seeds", "0",
            "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--method", "bitfit", *extra]


def test_a_byte_that_is_not_utf8_names_the_file_and_line(tmp_path, tiny_model, task, capsys):
    lines = (task / "train.tsv").read_bytes().split(b"\n")
    lines[2] = b"caf\xe9 film\t1"  # Latin-1, as a spreadsheet might save it
    (task / "train.tsv").write_bytes(b"\n".join(lines))
    assert_refused(command(task, tiny_model, tmp_path / "out"), tmp_path / "out", capsys,
                   f"{task / 'train.tsv'}: line 3: byte 0xe9 is not UTF-8")


def test_one_number_written_two_ways_is_not_two_classes(tmp_path, tiny_model, capsys):
    write_tsv(tmp_path / "train.tsv", ["sentence", "label"], [["good film", 1], ["bad film", 0], ["fine film", "1.0"]])
    write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [["good film", 1]])
    assert_refused(command(tmp_path, tiny_model, tmp_path / "out"), tmp_path / "out", capsys,
                   "labels ['1', '1.0'] are the same number written differently")


@pytest.mark.parametrize("extra, expected", [
    (["--weight-decay", "-1"], "argument --weight-decay: must be finite and >= 0, not -1"),
    (["--weight-decay", "nan"], "--weight-decay: must be finite and >= 0, not nan"),
    (["--weight-decay", "-inf"], "--weight-decay: must be finite and >= 0, not -inf"),
    (["--weight-decay", "inf"], "--weight-decay: must be finite and >= 0, not inf"),
    # argparse alone reads -1e-3 as an option and says "expected at least one argument"
    (["--lr", "-1e-3"], "--lr -1e-3: a learning rate must be > 0"),
    (["--lr", "bitfit=-1e-3"], "--lr bitfit=-1e-3: a learning rate must be > 0"),
    (["--lr", "bitfit=1e-3,0"], "--lr bitfit=1e-3,0: a learning rate must be > 0"),
    (["--lr", "nan"], "--lr nan: a learning rate must be > 0 and finite"),
    (["--lr", "inf"], "--lr inf: a learning rate must be > 0 and finite"),
    (["--epochs", "0"], "--epochs: must be an integer >= 1, not 0"),
    (["--epochs", "-2"], "--epochs: must be an integer >= 1, not -2"),
    (["--batch-size", "0"], "--batch-size: must be an integer >= 1, not 0"),
    (["--batch-size", "1.5"], "--batch-size: '1.5' is not an integer"),
    (["--max-length", "0"], "--max-length: must be an integer >= 1"),
    (["--train-examples", "0"], "--train-examples: must be an integer >= 1"),
    (["--heldout-examples", "-5"], "--heldout-examples: must be an integer >= 1"),
    (["--eval-examples", "0"], "--eval-examples: must be an integer >= 1"),
    (["--calibration-batches", "0"], "--calibration-batches: must be an integer >= 1"),
    (["--grid-seeds", "0"], "--grid-seeds: must be an integer >= 1"),
    (["--budget-fraction", "0"], "--budget-fraction: must be in (0, 1]"),
    (["--budget-fraction", "-1e-3"], "--budget-fraction: must be in (0, 1]"),
    (["--budget-fraction", "1.5"], "--budget-fraction: must be in (0, 1]"),
    (["--budget-fraction", "nan"], "--budget-fraction: must be in (0, 1]"),
    (["--seeds", "-1"], "--seeds: a seed must be in [0, 2**63), not -1"),
    (["--seeds", "0", "0"], "--seeds 0 0: a value is listed twice"),
    (["--method", "bitfit", "bitfit"], "--method bitfit bitfit: a value is listed twice"),
    (["--data-seed", "x"], "--data-seed: 'x' is not an integer"),
])
def test_numbers_out_of_range_are_refused(tmp_path, tiny_model, task, capsys, extra, expected):
    assert_refused(command(task, tiny_model, tmp_path / "out", *extra), tmp_path / "out", capsys, expected)


def test_out_must_not_be_a_file(tmp_path, tiny_model, task, capsys):
    out = tmp_path / "results.txt"
    out.write_text("someone's notes\n")
    assert_refused(command(task, tiny_model, out), tmp_path, capsys, f"--out {out}: is a file, not a directory")
    assert out.read_text() == "someone's notes\n"
    # Under a file: a path no directory can be made at.
    assert_refused(command(task, tiny_model, out / "sub"), tmp_path, capsys, f"{out / 'sub'}", "Not a directory")


def test_cuda_where_there_is_none(tmp_path, tiny_model, task, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert_refused(command(task, tiny_model, tmp_path / "out", "--device", "cuda"), tmp_path / "out", capsys,
                   "--device cuda: torch sees no CUDA device")
