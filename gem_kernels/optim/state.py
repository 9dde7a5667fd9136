"""The selection state of a SparseAdamW: its phase, counters, budget, report and, once entries
are chosen, the flat buffers of each sparse group. Per-param tensors (indices, moments) live in
torch's ``optimizer.state``; this is the rest, and what a checkpoint's ``sparse_adamw`` entry
holds of it (``to_dict`` / ``from_dict``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

PHASES = ("calibration", "unmasking", "training")
COUNTERS = ("calibration_done", "unmask_done")


def bad_checkpoint(message: str) -> ValueError:
    return ValueError(f"cannot load this checkpoint: {message}; nothing was changed")


@dataclass
class SelectionState:
    phase: str
    calibration_done: int = 0   # calibration steps taken
    unmask_done: int = 0        # ID3 unmasking steps taken
    selection_started: bool = False  # any entry chosen: no sparse group may join any more
    budget: Optional[int] = None     # entries to train, resolved when the selection starts
    report: list = field(default_factory=list)  # per sparse param: entropy, score, note
    layouts: dict = field(default_factory=dict)  # sparse group index -> GroupLayout (not saved)

    def to_dict(self) -> dict:
        return {"phase": self.phase, "selection_started": self.selection_started,
                "calibration_done": self.calibration_done, "unmask_done": self.unmask_done,
                "resolved_budget": self.budget, "report": [dict(row) for row in self.report]}

    @classmethod
    def from_dict(cls, meta: dict) -> "SelectionState":
        """The state a checkpoint's entry describes; raises naming what is wrong."""
        if meta.get("phase") not in PHASES:
            raise bad_checkpoint(f"unknown phase {meta.get('phase')!r}")
        for key in COUNTERS:
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad_checkpoint(f"{key} must be an int >= 0, got {value!r}")
        budget = meta.get("resolved_budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise bad_checkpoint(f"resolved_budget must be None or an int >= 1, got {budget!r}")
        report = meta.get("report")
        if not isinstance(report, list) or not all(isinstance(row, dict) for row in report):
            raise bad_checkpoint("report must be a list of dicts")
        return cls(phase=meta["phase"], calibration_done=meta["calibration_done"],
                   unmask_done=meta["unmask_done"], selection_started=bool(meta.get("selection_started")),
                   budget=budget, report=[dict(row) for row in report])
