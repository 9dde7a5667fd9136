"""Numerics of the Triton kernels under TRITON_INTERPRET=1, against the reference
(docs/ARCHITECTURE.md, "How GPU kernels are checked without a GPU").

Triton chooses interpreter or compiler when a kernel is decorated, so the cases run in a fresh
process with the variable set (tests/triton_cases.py); each case is reported here as a test.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import triton_cases  # noqa: E402  (only the case names; it imports no kernels at module level)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_interpret") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "triton_cases.py"), "--device", "cpu",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if not out.exists():
        pytest.fail(f"the interpreter run wrote no results (exit {proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", list(triton_cases.CASES))
def test_kernel_matches_reference_under_interpreter(interpreter_results, case):
    assert case in interpreter_results, f"case {case} did not run"
    result = interpreter_results[case]
    assert result["ok"], result["summary"]
