"""Checkpoints written by an earlier version of SparseAdamW (tests/fixtures, made by
tests/fixtures/make_checkpoints.py at commit 14fca26) still load into today's, in every phase,
and continue as that version did."""
import sys
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import make_checkpoints as made  # noqa: E402


@pytest.mark.parametrize("name", list(made.CASES))
def test_a_stored_checkpoint_loads_and_continues(name):
    kind, steps = made.CASES[name]
    saved = torch.load(FIXTURES / f"checkpoint-{name}.pt", weights_only=True)
    m = made.model()
    m.load_state_dict(saved["model"])
    opt = made.optimizer(m, kind)
    opt.load_state_dict(saved["optimizer"])
    assert opt.phase == saved["phase"]
    made.train(m, opt, [steps])
    for key, value in m.state_dict().items():
        torch.testing.assert_close(value, saved["next"][key], rtol=0, atol=1e-6)
    if kind == "gem" and saved["phase"] == "calibration":  # that step selected
        assert opt.phase == "training" and opt.selected_count() == 12
    else:
        assert any(not torch.equal(v, saved["model"][k]) for k, v in m.state_dict().items())
