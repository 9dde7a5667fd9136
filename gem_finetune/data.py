"""Task data: read a GLUE or SuperGLUE classification task as distributed, take seeded samples,
tokenize, batch."""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# The files of a task, tried in this order: GLUE's tab-separated files (MNLI has no dev.tsv but
# dev_matched.tsv and dev_mismatched.tsv; GLUE reports the matched one first) and SuperGLUE's
# JSON lines.
FILES = (("train.tsv", ("dev.tsv", "dev_matched.tsv")), ("train.jsonl", ("val.jsonl",)))
# Column names as the GLUE and SuperGLUE files spell them, tried in this order; any other layout
# is named on the command line (--text-columns, --label-column).
TEXT_COLUMNS = (("sentence1", "sentence2"),  # MNLI, RTE, WNLI
                ("question1", "question2"),  # QQP
                ("#1 String", "#2 String"),  # MRPC
                ("question", "sentence"),  # QNLI
                ("question", "passage"),  # BoolQ
                ("premise", "hypothesis"),  # CB, SuperGLUE's RTE
                ("sentence", None))  # SST-2, CoLA
LABEL_COLUMNS = ("label", "gold_label", "is_duplicate", "Quality")  # most; MNLI; QQP; MRPC


class TaskDataError(ValueError):
    """The task directory cannot be used; the message says why, in one line."""


@dataclass
class Split:
    first: list[str]
    second: list[str] | None
    labels: list[int]  # class ids, 0 .. num_labels-1


@dataclass
class Task:
    name: str
    text_columns: tuple[str, str | None]
    label_names: list[str]  # class id -> label as written in the files
    train: Split
    dev: Split
    sha256: dict[str, str]  # file name -> digest of its bytes: what a results file is checked against


@dataclass
class Table:
    """The rows of one task file, TSV or JSON lines alike."""
    path: Path
    columns: list[str]  # TSV: the header; JSON lines: the keys of the first record
    rows: list[tuple[int, dict]]  # (line number in the file, {column: value})
    sha256: str  # of the file's bytes

    def column(self, name: str) -> list[str]:
        values = []
        for number, row in self.rows:
            if name not in row:  # a JSON record may lack a key; a TSV row never does
                raise TaskDataError(f"{self.path}: line {number} has no {name!r} field")
            value = row[name]
            if isinstance(value, (bool, int, float)):  # JSON labels: BoolQ's true/false, integers
                value = json.dumps(value)  # spelt as in the file: true, 1
            if not isinstance(value, str):
                raise TaskDataError(f"{self.path}: line {number}: {name!r} is {value!r}, not text")
            values.append(value)
        return values


def _read_text(path: Path) -> tuple[str, str]:
    """The file as text and the sha256 of its bytes. A byte-order mark (some tools write one;
    MRPC's header line carries it) is dropped, so that it never becomes part of a column name.
    Decoded here rather than by open() so that a byte that is not UTF-8 is named with its line."""
    try:
        raw = path.read_bytes()
    except OSError as error:  # unreadable: permissions, a directory, an I/O error
        raise TaskDataError(f"{path}: cannot be read ({error.strerror})") from None
    digest = hashlib.sha256(raw).hexdigest()
    body = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    try:
        return body.decode("utf-8"), digest
    except UnicodeDecodeError as error:
        line = body.count(b"\n", 0, error.start) + 1
        raise TaskDataError(f"{path}: line {line}: byte 0x{body[error.start]:02x} is not UTF-8 "
                            "(task files must be UTF-8 text)") from None


def _read_tsv(path: Path) -> Table:
    text, digest = _read_text(path)
    # newline="": csv sees the line ends as written. QUOTE_NONE: GLUE's text holds bare quotes.
    lines = list(csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not lines or not any(cell.strip() for cell in lines[0]):
        raise TaskDataError(f"{path}: empty file (expected a header line)")
    header = lines[0]
    rows = [(number, row) for number, row in enumerate(lines[1:], start=2) if row != []]
    if not rows:
        raise TaskDataError(f"{path}: no data rows after the header")
    for number, row in rows:
        if len(row) != len(header):
            raise TaskDataError(f"{path}: line {number} has {len(row)} fields, the header has "
                                f"{len(header)} (the file must be tab-separated with no quoting)")
    return Table(path, header, [(number, dict(zip(header, row))) for number, row in rows], digest)


def _read_jsonl(path: Path) -> Table:
    rows = []
    text, digest = _read_text(path)
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() splits at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskDataError(f"{path}: line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise TaskDataError(f"{path}: line {number} is not a JSON object")
        rows.append((number, record))
    if not rows:
        raise TaskDataError(f"{path}: empty file (expected one JSON object a line)")
    return Table(path, list(rows[0][1]), rows, digest)


def _task_files(task_dir: Path) -> tuple[Path, Path]:
    for train_name, dev_names in FILES:
        if (task_dir / train_name).is_file():
            dev = next((task_dir / name for name in dev_names if (task_dir / name).is_file()), None)
            if dev is None:
                raise TaskDataError(f"{task_dir / dev_names[0]}: file not found"
                                    + "".join(f" (nor {name})" for name in dev_names[1:]))
            return task_dir / train_name, dev
    raise TaskDataError(f"{task_dir / FILES[0][0]}: file not found (nor {FILES[1][0]})")


def _columns(table: Table, text_columns: list[str] | None,
             label_column: str | None) -> tuple[tuple[str, str | None], str]:
    """The text and label columns: those named on the command line, else the first known ones."""
    if text_columns is not None and not 1 <= len(text_columns) <= 2:
        raise TaskDataError(f"--text-columns names one or two columns, not {len(text_columns)}")
    named = [*(text_columns or []), *([label_column] if label_column else [])]
    missing = [name for name in named if name not in table.columns]
    if missing:
        raise TaskDataError(f"{table.path}: no column {missing}; its columns are {table.columns}")
    if text_columns:
        text = (text_columns[0], text_columns[1] if len(text_columns) > 1 else None)
    else:
        text = next(((a, b) for a, b in TEXT_COLUMNS
                     if a in table.columns and (b is None or b in table.columns)), None)
    label = label_column or next((name for name in LABEL_COLUMNS if name in table.columns), None)
    if text is None or label is None:
        known_text = ", ".join(" + ".join(c for c in pair if c) for pair in TEXT_COLUMNS)
        need = [f"text columns ({known_text})"] if text is None else []
        need += [f"label column ({', '.join(LABEL_COLUMNS)})"] if label is None else []
        raise TaskDataError(f"{table.path}: unknown columns {table.columns}: no known {' and no '.join(need)}; "
                            "name them with --text-columns A [B] --label-column C")
    if label in text:
        raise TaskDataError(f"{table.path}: column {label!r} cannot be both a text and the label column")
    return text, label


def _label_names(path: Path, raw: list[str]) -> list[str]:
    """Class names in class-id order: integers sorted by value, other labels sorted as text."""
    values = sorted(set(raw))
    if "" in values:
        raise TaskDataError(f"{path}: a row has an empty label")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return values
    if any(not n.is_integer() for n in numbers):
        raise TaskDataError(f"{path}: labels {values[:5]} are not integers or class names "
                            "(regression tasks such as STS-B are not supported)")
    # "1" and "1.0" are one number but two strings: as strings they would be two classes.
    spellings: dict[float, list[str]] = {}
    for value, number in zip(values, numbers):
        spellings.setdefault(number, []).append(value)
    clash = next((group for group in spellings.values() if len(group) > 1), None)
    if clash:
        raise TaskDataError(f"{path}: labels {clash} are the same number written differently; "
                            "write each class one way")
    return sorted(values, key=float)


def read_task(task_dir: str | Path, text_columns: list[str] | None = None,
              label_column: str | None = None) -> Task:
    """Read the training and dev files of a GLUE or SuperGLUE classification task (see FILES),
    with the columns named here or, where not named, the first known ones (TEXT_COLUMNS,
    LABEL_COLUMNS)."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise TaskDataError(f"{task_dir}: task directory not found")
    train_path, dev_path = _task_files(task_dir)
    read = _read_tsv if train_path.suffix == ".tsv" else _read_jsonl
    train, dev = read(train_path), read(dev_path)
    text, label = _columns(train, text_columns, label_column)
    # The dev file is read with the training file's columns (MNLI's dev has more label columns).
    missing = [name for name in (*text, label) if name and name not in dev.columns]
    if missing:
        raise TaskDataError(f"{dev_path}: no column {missing} of {train_path.name}'s; "
                            f"its columns are {dev.columns}")
    label_names = _label_names(train_path, train.column(label))
    if len(label_names) < 2:
        raise TaskDataError(f"{train_path}: only one label ({label_names[0]!r}); need two or more classes")
    class_id = {name: i for i, name in enumerate(label_names)}

    def split(table: Table) -> Split:
        raw = table.column(label)
        unseen = sorted(set(raw) - set(class_id))
        if unseen:
            raise TaskDataError(f"{table.path}: labels {unseen[:5]} do not occur in {train_path.name}")
        return Split(table.column(text[0]), table.column(text[1]) if text[1] else None,
                     [class_id[v] for v in raw])

    return Task(task_dir.resolve().name, text, label_names, split(train), split(dev),
                {train_path.name: train.sha256, dev_path.name: dev.sha256})


def take(split: Split, count: int | None, seed: int, skip: int = 0) -> Split:
    """The first ``count`` examples of a seeded shuffle (all of them, shuffled, if None), after
    its first ``skip``: ``take(s, n, seed)`` and ``take(s, m, seed, skip=n)`` never share an
    example, which is how the held-out split stays apart from the training examples."""
    order = list(range(len(split.labels)))
    random.Random(seed).shuffle(order)
    order = order[skip:skip + count] if count is not None else order[skip:]
    pick = lambda values: [values[i] for i in order]  # noqa: E731
    return Split(pick(split.first), pick(split.second) if split.second else None, pick(split.labels))


@dataclass
class Encoded:
    """Token ids of a split, unpadded; ``make_batch`` pads them."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    args = (split.first, split.second) if split.second else (split.first,)
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") or [[0] * len(ids) for ids in enc["input_ids"]]
    return Encoded(enc["input_ids"], types, split.labels)


def make_batch(data: Encoded, rows: list[int], pad_id: int, pad_to: int | None = None) -> dict:
    """Rows padded to the longest of them, or to ``pad_to`` tokens where every batch must have
    one shape (benchmarks/minilm_memory.py measures memory at a fixed sequence length)."""
    longest = max(len(data.input_ids[i]) for i in rows)
    if pad_to is not None and longest > pad_to:
        raise ValueError(f"a row has {longest} tokens, more than pad_to={pad_to}; "
                         "encode with max_length <= pad_to")
    width = longest if pad_to is None else pad_to
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(data.input_ids[i])
        ids[r, :n] = torch.tensor(data.input_ids[i])
        types[r, :n] = torch.tensor(data.token_type_ids[i])
        mask[r, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "labels": torch.tensor([data.labels[i] for i in rows])}


def batches(data: Encoded, batch_size: int, pad_id: int, rng: random.Random | None,
            pad_to: int | None = None) -> list[dict]:
    """All of ``data`` in batches, shuffled by ``rng`` (in file order if None)."""
    order = list(range(len(data.labels)))
    if rng is not None:
        rng.shuffle(order)
    return [make_batch(data, order[i:i + batch_size], pad_id, pad_to) for i in range(0, len(order), batch_size)]


def eval_batches(data: Encoded, batch_size: int, pad_id: int) -> list[dict]:
    """All of ``data`` for scoring, in batches of similar length (rows sorted by token count, ties
    in file order), so that little of a batch is padding; accuracy and MCC do not depend on the
    order of the examples."""
    order = sorted(range(len(data.labels)), key=lambda i: len(data.input_ids[i]))
    return [make_batch(data, order[i:i + batch_size], pad_id) for i in range(0, len(order), batch_size)]
