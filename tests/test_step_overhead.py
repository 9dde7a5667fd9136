"""Host work per training step (benchmarks/step_overhead.py), counted, not timed: one host sync
per step (the finite check) and no per-parameter ops beyond reading each gradient's values."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
step_overhead = pytest.importorskip("step_overhead")


@pytest.mark.parametrize("targets", ["qv"])
def test_one_host_sync_and_few_ops_per_training_step(targets):
    row = step_overhead.measure(targets, steps=1, batch=2, length=8)
    assert row["step_syncs"] == 1, row
    # 590fce0 dispatched 154 ops for the 12 query/value weights (12.8 a param) and synced 14 times.
    assert row["step_ops"] <= 7 * row["sparse_params"], row
