"""The results file of gem-finetune (results-TASK.jsonl): JSON lines, appended, never rewritten.

  {"kind": "settings", ...}  written by a command with its first finished run: what its runs
                             depend on ("settings"), its lr grids, methods, budget fractions
  {"kind": "run", ...}       one finished run (methods.run_once's record), appended as it ends

A run is known by (method, budget fraction, lr, seed). A command that finds one of its runs in the
file reuses it instead of training it again, so a stopped comparison goes on where it stopped
when the same command runs again, and several commands (scripts/reproduce.sh's lanes, each with
its own methods) can append to one file at once. Every settings record of the file must hold
the command's "settings", and a method's lr grid may only widen: a command's grid holds every lr
a record of the file lists for that method (so a grid whose edge won gains lrs beyond it, and
the runs made keep counting; the table decides on the widest grid). A file written with other
numbers is refused, never mixed in; so is a file of another device type (CPU runs and CUDA runs
round differently, and the table compares timings too: a lent GPU's runs go to their own file).

Each append is one O_APPEND write, then fsync. A process killed while writing leaves at most a
torn last line: the reader skips it with a warning (its run, if it was one, runs again), and the
next append starts on a new line.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .methods import BUDGETED_METHODS, METHODS
from .report import summarize


class ResultsFileError(ValueError):
    """The results file cannot be used; the message says why, in one line."""


# The fields each kind of record must have: those the reader uses.
FIELDS = {"settings": {"settings", "lr_plan", "methods", "budget_fractions", "command"},
          "run": {"method", "budget_fraction", "lr", "seed"}}


def run_key(run: dict) -> tuple:
    return run["method"], run["budget_fraction"], run["lr"], run["seed"]


def _read(path: Path) -> tuple[list[dict], list[dict]]:
    """The settings records and the run records of ``path`` (none if it does not exist)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return [], []
    except OSError as error:
        raise ResultsFileError(f"{path}: cannot be read ({error.strerror})") from None
    except UnicodeDecodeError:
        raise ResultsFileError(f"{path}: not UTF-8, so not a gem-finetune results file") from None
    headers, runs = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            print(f"gem-finetune: warning: {path}: line {number} is not a whole JSON record (a write cut "
                  "short?): skipped; if it was a run, that run runs again", file=sys.stderr)
            continue
        kind = record.get("kind") if isinstance(record, dict) else None
        if kind not in FIELDS or not FIELDS[kind] <= record.keys():
            raise ResultsFileError(f"{path}: line {number} is not a gem-finetune results record")
        (headers if kind == "settings" else runs).append(record)
    if runs and not headers:
        raise ResultsFileError(f"{path}: runs without a settings record: their settings cannot be checked")
    return headers, runs


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(path: Path, stored: dict, header: dict) -> None:
    """Refuse ``header`` where a settings record ``stored`` (written before it) holds other
    settings, or an lr of a shared method's grid that ``header``'s grid leaves out."""
    ours, theirs = header["settings"], stored["settings"]
    differ = [f"{key} {_short(theirs.get(key))} there, {_short(ours.get(key))} here"
              for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    if stored.get("device") != header.get("device"):
        differ.append(f"device {_short(stored.get('device'))} there, {_short(header.get('device'))} here")
    differ += [f"lr grid of {method} {_short(grid)} there, {_short(header['lr_plan'][method])} here "
               "(a grid may only widen)"
               for method, grid in stored["lr_plan"].items()
               if method in header["lr_plan"] and not set(grid) <= set(header["lr_plan"][method])]
    if differ:
        raise ResultsFileError(f"{path} holds runs made with other settings ({'; '.join(differ[:3])}"
                               f"{'; ...' if len(differ) > 3 else ''}); they are not mixed with these: "
                               "give another --out, or delete the file to start again")


def _append(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(record) + "\n" for record in records).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A file that does not end in a newline ends in a torn record: start a line of our own,
        # or this record would be glued to it and lost with it.
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:  # one write in practice; O_APPEND keeps other appenders' records whole
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultsFile:
    """The results file of one command: checked against ``header`` when opened; its runs found
    by key; a finished run appended at once (after ``header``, with the command's first run)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, {"kind": "settings", **header}
        headers, runs = _read(path)
        for stored in headers:
            check(path, stored, self.header)
        self.runs = {}
        for run in runs:  # a run written twice (two commands at once) counts once: the first
            self.runs.setdefault(run_key(run), run)
        self.stored = len(self.runs)
        self._header_written = False

    def find(self, method: str, budget_fraction: float | None, lr: float, seed: int) -> dict | None:
        return self.runs.get((method, budget_fraction, lr, seed))

    def add(self, run: dict) -> None:
        _append(self.path, ([] if self._header_written else [self.header]) + [{"kind": "run", **run}])
        self._header_written = True
        self.runs[run_key(run)] = run


# ---------------------------------------------------------------------------------------
# From runs to the table: the lr grid decisions and the summaries


@dataclass
class Decision:
    """One row of the table: a method at one budget fraction (None where no budget applies)."""
    label: str
    method: str
    budget_fraction: float | None
    lrs: list[float]
    grid_seeds: list[int]  # the seeds every lr of a grid trains on
    tried: dict[float, list[dict]] | None  # each lr's runs on the grid seeds; None while one is missing
    best_lr: float | None
    runs: list[dict] | None  # the chosen lr's runs, one per seed; None while one is missing


def label_of(method: str, budget_fraction: float | None, several_fractions: bool) -> str:
    return f"{method}@{budget_fraction:g}" if budget_fraction is not None and several_fractions else method


def choose(tried: dict[float, list[dict]], metric: str) -> float:
    """The lr with the best mean held-out ``metric`` over its runs; the first listed wins a tie
    (max keeps the first maximum)."""
    return max(tried, key=lambda lr: statistics.fmean(r["heldout"][metric] for r in tried[lr]))


def decide(work: list[tuple[str, float | None]], lr_plan: dict[str, list[float]], seeds: list[int],
           grid_seeds: list[int], metric: str,
           find: Callable[[str, float | None, float, int], dict | None]) -> Iterator[Decision]:
    """For each (method, budget fraction) of ``work``: every lr of its grid on the grid seeds, the
    lr chosen on held-out, then the other seeds at it; ``find`` gives each run (None: not there),
    in the order they are needed. A single lr is not a grid: it runs on the first seed, then the rest."""
    several = len({fraction for _, fraction in work} - {None}) > 1
    for method, fraction in work:
        lrs = lr_plan[method]
        first_seeds = grid_seeds if len(lrs) > 1 else seeds[:1]
        decision = Decision(label_of(method, fraction, several), method, fraction, lrs, first_seeds, None, None, None)
        tried = {lr: [find(method, fraction, lr, seed) for seed in first_seeds] for lr in lrs}
        if all(run is not None for runs in tried.values() for run in runs):
            decision.tried = tried
            decision.best_lr = choose(tried, metric) if len(lrs) > 1 else lrs[0]
            runs = tried[decision.best_lr] + [find(method, fraction, decision.best_lr, seed)
                                              for seed in seeds[len(first_seeds):]]
            decision.runs = runs if None not in runs else None
        yield decision


def work_of(methods: list[str], budget_fractions: list[float]) -> list[tuple[str, float | None]]:
    """The (method, budget fraction) pairs of a command: each budgeted method at each fraction,
    the others once."""
    return [(method, fraction) for method in methods
            for fraction in (budget_fractions if method in BUDGETED_METHODS else [None])]


def assemble(task: str, headers: list[dict], decisions: list[Decision]) -> dict:
    """The results of ``decisions`` as report.markdown and report.plot read them."""
    grid, summary, runs = {}, {}, []
    for d in decisions:
        if d.runs is None:
            continue
        if len(d.lrs) > 1:
            grid[d.label] = [{"lr": lr, "seeds": d.grid_seeds,
                              **{f"heldout_{k}": statistics.fmean(r["heldout"][k] for r in d.tried[lr])
                                 for k in ("accuracy", "mcc")}} for lr in d.lrs]
        summary[d.label] = summarize(d.runs)
        runs += [{**run, "label": d.label}
                 for run in [r for lr in d.lrs if lr != d.best_lr for r in d.tried[lr]] + d.runs]
    commands = []
    for header in headers:
        if header["command"] not in commands:
            commands.append(header["command"])
    return {"task": task, "commands": commands, "settings": headers[0]["settings"],
            "complete": all(d.runs is not None for d in decisions),
            "pending": [(d.method, d.budget_fraction) for d in decisions if d.runs is None],
            "lr_grid": grid, "summary": summary, "runs": runs}


def load(path: Path) -> dict:
    """Every finished (method, budget fraction) of a results file, whichever commands wrote it."""
    if path.suffix != ".jsonl":  # the results-TASK.json of older versions is one JSON document
        raise ResultsFileError(f"{path}: not a results-TASK.jsonl file (one JSON record a line)")
    headers, runs = _read(path)
    if not headers:
        raise ResultsFileError(f"{path}: no settings record (not a results file, or no run has finished)")
    for i, header in enumerate(headers):
        for stored in headers[:i]:
            check(path, stored, header)
    found = {}
    for run in runs:
        found.setdefault(run_key(run), run)
    fractions = {method: [] for method in METHODS}
    for header in headers:
        for method in header["methods"]:
            fractions[method] += [f for f in header["budget_fractions"] if f not in fractions[method]]
    work = [(method, fraction) for method in METHODS if any(method in h["methods"] for h in headers)
            for fraction in (sorted(fractions[method]) if method in BUDGETED_METHODS else [None])]
    lr_plan = {}  # each method's widest grid: every lr any record lists, ascending
    for header in headers:
        for method, grid in header["lr_plan"].items():
            lr_plan[method] = sorted(set(lr_plan.get(method, [])) | set(grid))
    settings = headers[0]["settings"]
    decisions = list(decide(work, lr_plan, settings["seeds"], settings["grid_seeds"], settings["select_metric"],
                            lambda *key: found.get(key)))
    return assemble(settings["task"], headers, decisions)
