"""What of the GPU suite (benchmarks/gpu_suite.py, docs/gpu.md) can be checked without a GPU: the
ulp helper and the AdamW step's GPU contract (tests/triton_cases.py), the suite's arguments, its
stage budgets and time-boxing, its JSON-lines and markdown writing, the weight-gradient dispatch
table (its rows, the rule, the committed placeholder, merging), the byte model, the refusals
without CUDA, a CPU smoke run of benchmarks/step_cost.py, and the whole suite's dry run on CPU
(every stage end to end, tiny shapes, Triton under its interpreter)."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402
import triton_cases as tc  # noqa: E402

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _next_up(x: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``x`` moved ``steps`` representable values up (positive finite x): integer view + steps."""
    view = tc._INT_VIEW[x.dtype]
    return (x.view(view).to(torch.int64) + steps).to(view).view(x.dtype)


# ---------------------------------------------------------------------------------------
# The ulp helper


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_ulp_distance_counts_representable_values(dtype):
    x = torch.tensor([1.0, 0.3, 1e-3, 3.0, 100.0], dtype=dtype)
    for steps in (0, 1, 2, 7):
        assert tc.ulp_distance(_next_up(x, steps), x).tolist() == [float(steps)] * 5
        assert tc.ulp_distance(x, _next_up(x, steps)).tolist() == [float(steps)] * 5
        assert tc.ulp_distance(-_next_up(x, steps), -x).tolist() == [float(steps)] * 5


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_ulp_distance_at_zero_powers_of_two_and_specials(dtype):
    info = torch.finfo(dtype)
    tiny = info.eps * info.smallest_normal  # the smallest subnormal
    below_one = torch.tensor(1.0 - info.eps / 2, dtype=dtype)  # the float just below 1
    assert float(below_one) < 1.0
    got = torch.tensor([0.0, -0.0, tiny, float("inf"), info.max, float("nan"), float("nan"), 1.0], dtype=dtype)
    want = torch.tensor([-0.0, 0.0, -tiny, float("inf"), float("inf"), float("nan"), 1.0, float(below_one)],
                        dtype=dtype)
    assert tc.ulp_distance(got, want).tolist() == [0.0, 0.0, 2.0, 0.0, 1.0, 0.0, math.inf, 1.0]


def test_ulp_distance_sees_one_fp32_ulp_that_assert_close_forgives():
    want = torch.tensor([0.010665535927], dtype=torch.float32)  # issue 16's example
    got = torch.tensor([0.010665534995], dtype=torch.float32)
    torch.testing.assert_close(got, want)
    assert tc.ulp_distance(got, want).item() == 1.0


def test_ulp_distance_with_a_scale_counts_at_that_magnitude():
    want = torch.tensor([1e-6, 0.5, 3.0])
    scale = torch.tensor([2.0, 0.5, 3.0])
    got = want + 3 * tc.spacing(scale, torch.float32).float()
    assert tc.ulp_distance(got, want, scale).tolist() == [3.0, 3.0, 3.0]
    # without the scale the first entry is many ulps of its own (tiny) value apart
    assert tc.ulp_distance(got, want)[0] > 1e6


def test_spacing():
    s = tc.spacing(torch.tensor([1.0, 1.5, 0.75, 0.0, 2.0 ** -130]), torch.float32)
    assert s.tolist() == [2.0 ** -23, 2.0 ** -23, 2.0 ** -24, 2.0 ** -149, 2.0 ** -149]
    assert tc.spacing(1.0, torch.bfloat16).item() == 2.0 ** -7
    assert tc.spacing(1.0, torch.float16).item() == 2.0 ** -10


def test_worst_ulp_reports_the_worst_entry_and_counts():
    want = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = want.clone()
    got[1] = _next_up(want[1:2], 5)
    got[3] = _next_up(want[3:4], 2)
    w = tc.worst_ulp(got, want, bound=3)
    assert (w["worst_ulp"], w["at"], w["want"], w["differ"], w["beyond"]) == (5.0, 1, 2.0, 2, 1)
    assert "entry 1" in tc.describe_worst(w) and "1 beyond 3" in tc.describe_worst(w)


def test_ulp_distance_refuses_mixed_or_unsupported_dtypes():
    with pytest.raises(TypeError):
        tc.ulp_distance(torch.zeros(2), torch.zeros(2, dtype=torch.float16))
    with pytest.raises(TypeError):
        tc.ulp_distance(torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# The AdamW step's GPU contract


def test_contract_bounds():
    assert tc.adamw_steps_bounds(1) == {"params": 1.0, "exp_avg": 6.0, "exp_avg_sq": 6.0}
    assert tc.adamw_steps_bounds(5) == {"params": 5.0, "exp_avg": 30.0, "exp_avg_sq": 22.0}


def test_torch_cuda_rounding_fails_exact_and_passes_the_gpu_contract():
    """benchmarks/cuda_rounding.py replays torch's CUDA rounding of the reference on CPU: the exact
    comparison fails as the three cases failed on the H200, the GPU contract holds."""
    import cuda_rounding
    with pytest.raises(AssertionError, match="exp_avg_sq entries differ"):
        tc.check_adamw_steps("cpu", torch.bfloat16, seed=10, backend=cuda_rounding)
    summary, details = tc.check_adamw_steps("cpu", torch.bfloat16, seed=10, backend=cuda_rounding, contract="gpu")
    worst = details["vs_reference"]
    assert worst["exp_avg_sq"]["differ_after_last_step"] == 300 and worst["exp_avg_sq"]["worst_ulp"] == 2.0
    assert worst["params"]["worst_ulp"] == 0.0 and worst["exp_avg"]["worst_ulp"] == 0.0
    assert "within the GPU contract" in summary


def _history(steps=3, n=50, seed=0):
    """A start, grads and a reference history; entry 7 mid-binade (1.25, 0.003), where a nudge by a
    few ulps stays inside its binade, and its params unchanged over the steps, so the params' scale
    is their own magnitude."""
    gen = torch.Generator().manual_seed(seed)
    params = torch.randn(n, generator=gen).to(torch.bfloat16)
    params[7] = 1.25
    start = {"params": params, "exp_avg": 0.1 * torch.randn(n, generator=gen)}
    grads = [torch.randn(n, generator=gen) for _ in range(steps)]
    hist = [{"params": params.clone(), "exp_avg": 0.1 * torch.randn(n, generator=gen),
             "exp_avg_sq": 0.01 * torch.rand(n, generator=gen) + 1e-4} for _ in range(steps)]
    for h in hist:
        h["exp_avg_sq"][7] = 0.003
    return start, grads, hist


def _nudged(hist, name, ulps_per_step, entry=7):
    out = [{k: v.clone() for k, v in h.items()} for h in hist]
    for step, h in enumerate(out, start=1):
        h[name][entry:entry + 1] = _next_up(h[name][entry:entry + 1].abs(), ulps_per_step(step)) \
            * h[name][entry:entry + 1].sign()
    return out


def test_contract_allows_what_it_promises():
    start, grads, want = _history()
    got = _nudged(_nudged(want, "exp_avg_sq", lambda k: 4 * k + 2), "params", lambda k: k)
    worst = tc.compare_contract(got, want, start, grads)
    assert worst["exp_avg_sq"]["worst_ulp"] == 14.0 and worst["params"]["worst_ulp"] == 3.0


@pytest.mark.parametrize("name, ulps, step", [("exp_avg_sq", lambda k: 4 * k + 3, 1),
                                              ("exp_avg_sq", lambda k: 0 if k < 3 else 15, 3),
                                              ("params", lambda k: 2, 1)])
def test_contract_refuses_more_and_names_the_worst_entry(name, ulps, step):
    start, grads, want = _history()
    got = _nudged(want, name, ulps)
    with pytest.raises(AssertionError, match=f"after step {step} of 3, {name}: 1 entries beyond .* at entry 7"):
        tc.compare_contract(got, want, start, grads)


def test_exp_avg_is_counted_at_the_scale_of_its_terms():
    """A cancelled exp_avg (far smaller than m and g) is compared in ulps of |m|, |g|, not its own."""
    start, grads, want = _history(steps=1)
    want[0]["exp_avg"][3] = 1e-9
    got = [{k: v.clone() for k, v in want[0].items()}]
    got[0]["exp_avg"][3] = 1e-9 + 2 * tc.spacing(grads[0][3].abs(), torch.float32).item()
    assert tc.ulp_distance(got[0]["exp_avg"][3:4], want[0]["exp_avg"][3:4]).item() > 1e6
    tc.compare_contract(got, want, start, grads)  # within 6 ulp at the terms' scale


# ---------------------------------------------------------------------------------------
# The sparse_weight_grad GPU cases' check, run here with the reference as the kernel


class _Perturbed:
    """The reference's sparse_weight_grad with entry 3 moved by ``delta`` (relative)."""

    def __init__(self, delta):
        self.delta = delta

    def sparse_weight_grad(self, *args):
        from gem_kernels import reference
        out = reference.sparse_weight_grad(*args)
        out[3] = out[3] * (1 + self.delta)
        return out


def test_weight_grad_check_against_float64():
    from gem_kernels import reference
    shapes, dtypes = [(300, 40, 24), (0, 5, 5), (64, 20, 30)], [torch.bfloat16, torch.float32, torch.float16]
    assert "integer inputs: all" in tc.check_weight_grad("cpu", shapes, dtypes, 0.2, seed=1, backend=reference)
    with pytest.raises(AssertionError, match="entry 3"):
        tc.check_weight_grad("cpu", shapes, dtypes, 0.2, seed=1, backend=_Perturbed(1e-3))


def test_gpu_cases_join_on_cuda_only():
    assert tc.case_names("cpu") == list(tc.CASES)
    assert tc.case_names("cuda") == list(tc.CASES) + list(tc.GPU_CASES)
    assert all(name.startswith("weight_grad_") for name in tc.GPU_CASES)


# ---------------------------------------------------------------------------------------
# The suite: arguments, time-boxing, records


def test_parser_defaults_and_budgets():
    args = gpu_suite.build_parser().parse_args([])
    assert [name for name, _ in gpu_suite.stage_plan(args)] == list(gpu_suite.STAGES)
    assert args.total == gpu_suite.TOTAL and args.finetune_examples == gpu_suite.FINETUNE_EXAMPLES
    args = gpu_suite.build_parser().parse_args(["--only", "cases", "step_eager", "finetune", "--skip", "finetune",
                                                "--budget", "step_eager=12.5", "--total", "100"])
    assert gpu_suite.stage_plan(args) == [("cases", gpu_suite.STAGES["cases"]), ("step_eager", 12.5)]
    for bad in (["--budget", "nope=3"], ["--budget", "cases=0"], ["--budget", "cases"], ["--only", "nope"]):
        with pytest.raises(SystemExit):
            gpu_suite.build_parser().parse_args(bad)


def test_stage_budgets_are_cut_at_the_deadline():
    assert gpu_suite.budget_left(75, deadline=1000, now=100) == 75
    assert gpu_suite.budget_left(75, deadline=1000, now=960) == 40
    assert gpu_suite.budget_left(75, deadline=1000, now=990) is None  # under MIN_START: skipped
    assert gpu_suite.budget_left(75, deadline=1000, now=1100) is None


def test_run_stage_ok_failed_and_timed_out(tmp_path):
    with open(tmp_path / "log", "a") as log:
        ok = gpu_suite.run_stage([sys.executable, "-c", "print('hello')"], 30, log)
        failed = gpu_suite.run_stage([sys.executable, "-c", "raise SystemExit(3)"], 30, log)
        # a stage whose child started a grandchild: the whole process group goes at the time-out
        child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
                 f"time.sleep(60)']); open({str(tmp_path / 'pid')!r}, 'w').write(str(p.pid)); time.sleep(60)")
        start = time.monotonic()
        timed_out = gpu_suite.run_stage([sys.executable, "-c", child], 4, log)
        elapsed = time.monotonic() - start
    assert (ok["status"], ok["rc"]) == ("ok", 0)
    assert (failed["status"], failed["rc"]) == ("failed", 3)
    assert timed_out["status"] == "timed_out" and elapsed < 25
    assert "hello" in (tmp_path / "log").read_text()
    grandchild = int((tmp_path / "pid").read_text())
    for _ in range(50):  # killed with its group; reaped by init shortly after
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with open(f"/proc/{grandchild}/stat") as f:
            assert f.read().split()[2] == "Z", "the grandchild outlived its stage's time-out"


def _fake_records(run="R1"):
    env = {"device": "NVIDIA Fake", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "transformers": "5.17.0",
           "peft": "0.21.0", "python": "3.12.3", "commit": "abc1234"}
    row = {"model": "llama-953m", "peak_step_bytes": 13.6e9, "trained_entries": 805_306, "first_step_s": 4.0}
    return [
        {"run": run, "kind": "start", "environment": env, "settings": {"total_s": 330}},
        {"run": run, "kind": "item", "stage": "cases", "item": "stats_fp32", "ok": True, "summary": "fine",
         "seconds": 1.0},
        {"run": run, "kind": "item", "stage": "cases", "item": "adamw_steps_bf16_exact", "ok": False,
         "summary": "Traceback\nAssertionError: after step 3 of 5, exp_avg_sq: 1 entries beyond 14 ulp",
         "seconds": 2.0},
        {"run": run, "kind": "stage", "stage": "cases", "status": "ok", "seconds": 40.0, "budget_s": 75},
        {"run": run, "kind": "item", "stage": "kernel_timings", "item": "copy_bandwidth", "bytes_per_s": 4.3e12},
        {"run": run, "kind": "item", "stage": "kernel_timings", "item": "sparse_adamw", "triton_ms": 0.058,
         "torch_ms": 0.86, "ideal_ms": 0.01, "fraction_of_ideal": 0.17, "torch_baseline": "fused AdamW"},
        {"run": run, "kind": "stage", "stage": "kernel_timings", "status": "ok", "seconds": 20.0, "budget_s": 45},
        {"run": run, "kind": "item", "stage": "weight_grad_timings", "item": "5632x2048 0.001 dense", "T": 4096,
         "out": 5632, "in": 2048, "dtype": "bfloat16", "density": 1e-3, "k": 11534, "impl": "dense", "ms": 0.121,
         "graph_ms": 0.118, "model_ms": 0.135},
        {"run": run, "kind": "item", "stage": "weight_grad_timings", "item": "5632x2048 0.001 xt_e128_t32_w8",
         "T": 4096, "out": 5632, "in": 2048, "dtype": "bfloat16", "density": 1e-3, "k": 11534,
         "impl": "xt_e128_t32_w8", "ms": 0.0605, "graph_ms": None, "model_ms": 0.064},
        {"run": run, "kind": "item", "stage": "weight_grad_timings", "item": "dispatch (0, 0.001]",
         "device": "NVIDIA Fake", "dtype": "bfloat16", "band": "(0, 0.001]", "density_low": 0.0,
         "density_high": 1e-3, "T": 4096, "choice": "sparse", "config": "xt_e128_t32_w8", "sparse_ms": 0.0605,
         "dense_ms": 0.121, "sparse_graph_ms": None, "dense_graph_ms": None, "basis": "eager", "shapes": {},
         "dry_run": False},
        {"run": run, "kind": "item", "stage": "step_eager", "item": "lora", **row, "method": "lora",
         "median_step_s": 0.1097},
        {"run": run, "kind": "item", "stage": "step_eager", "item": "full", **row, "method": "full",
         "median_step_s": 0.0889},
        {"run": run, "kind": "item", "stage": "step_eager", "item": "gem", **row, "method": "gem",
         "median_step_s": 0.0790},
        {"run": run, "kind": "item", "stage": "step_eager", "item": "gem-layer", "method": "gem-layer",
         "error": "Traceback\ntorch.OutOfMemoryError: CUDA out of memory"},
        {"run": run, "kind": "stage", "stage": "step_eager", "status": "timed_out", "seconds": 90.0, "budget_s": 90},
        {"run": run, "kind": "item", "stage": "finetune", "item": "run", "method": "gem", "seed": 0, "accuracy": 0.85,
         "median_step_seconds": 0.041, "peak_memory_mib": 400.0, "wall_seconds": 12.0},
        {"run": run, "kind": "stage", "stage": "step_compiled", "status": "skipped", "budget_s": 150,
         "reason": "too little of the suite's time left"},
        {"run": run, "kind": "end", "seconds": 321.0},
    ]


def test_records_round_trip_and_markdown(tmp_path):
    path = tmp_path / "gpu-runs.jsonl"
    for record in _fake_records("R0")[:3] + _fake_records("R1"):
        gpu_suite.append_jsonl(path, record)
    with open(path, "a") as f:
        f.write('{"run": "R1", "kind": "item", "stage": "cases", "item": "torn')  # a writer killed mid-line
    gpu_suite.append_jsonl(path, {"run": "R2", "kind": "end", "seconds": 1.0})  # starts a new line
    assert gpu_suite.read_run(path, "R2") == [{"run": "R2", "kind": "end", "seconds": 1.0}]
    records = gpu_suite.read_run(path, "R1")
    assert len(records) == len(_fake_records("R1")) and all(r["run"] == "R1" for r in records)
    report = gpu_suite.collect(records)
    assert report["environment"]["device"] == "NVIDIA Fake" and report["seconds"] == 321.0
    assert report["stages"]["step_eager"]["status"] == "timed_out"
    assert [i["item"] for i in report["stages"]["cases"]["items"]] == ["stats_fp32", "adamw_steps_bf16_exact"]
    assert not gpu_suite.suite_ok(report)
    text = gpu_suite.markdown(report)
    for expected in ("# GPU suite: NVIDIA Fake", "| step_eager | timed_out | 90.0 | 90 |",
                     "| step_compiled | skipped |", "## Kernel cases: 1 of 2 passed",
                     "| adamw_steps_bf16_exact | FAIL | 2.00 | AssertionError: after step 3 of 5",
                     "4.30 TB/s", "| sparse_adamw | 0.058 | 0.860 | 14.83 |",
                     "| 5632 x 2048 | 0.001 | 11,534 | dense | 121.0 | 118.0 | 1.00 | 135.0 |",
                     "| 5632 x 2048 | 0.001 | 11,534 | xt_e128_t32_w8 | 60.5 | n/a | 2.00 | 64.0 |",
                     "| NVIDIA Fake | bfloat16 | (0, 0.001] | **sparse** | xt_e128_t32_w8 | 60.5 | 121.0 | n/a |",
                     "| gem | 79.0 | 0.72 | 0.89 | 13.6 | 1.00 | 805,306 | 4.0 |",
                     "| gem-layer | error: torch.OutOfMemoryError: CUDA out of memory",
                     "| gem | 0 | 85.0 | 41.0 | 400 | 12.0 |"):
        assert expected in text, f"{expected!r} not in\n{text}"


def test_suite_ok_needs_every_stage_and_case():
    records = [r for r in _fake_records() if r.get("stage") in (None, "cases", "kernel_timings")]
    assert not gpu_suite.suite_ok(gpu_suite.collect(records))  # a failed case
    records = [r for r in records if r.get("item") != "adamw_steps_bf16_exact"]
    assert gpu_suite.suite_ok(gpu_suite.collect(records))


def test_run_suite_time_boxes_and_writes_the_files(tmp_path, monkeypatch, capsys):
    """The orchestration with the stages' processes replaced: a stage that times out is recorded and
    the next runs; one that would start past the deadline is skipped; the JSON and markdown appear."""
    seen = []

    def fake_run_stage(cmd, budget, log, env=None):
        stage, jsonl, run = (cmd[cmd.index(flag) + 1] for flag in ("--stage", "--jsonl", "--run"))
        seen.append((stage, budget))
        gpu_suite.append_jsonl(Path(jsonl), {"run": run, "kind": "item", "stage": stage, "item": "x", "ok": True})
        if stage == "weight_grad_timings":
            fake_clock[0] += 310  # leaves 10 s of the 320: under MIN_START, so the next stages are skipped
            return {"status": "timed_out", "rc": -15, "seconds": 300.0}
        return {"status": "ok", "rc": 0, "seconds": 1.0}

    fake_clock = [1000.0]
    monkeypatch.setattr(gpu_suite, "run_stage", fake_run_stage)
    monkeypatch.setattr(gpu_suite.time, "monotonic", lambda: fake_clock[0])
    monkeypatch.setattr(gpu_suite, "_environment", lambda dry_run=False: {"device": "NVIDIA Fake"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rc = gpu_suite.main(["--results", str(tmp_path), "--only", "cases", "weight_grad_timings", "step_eager",
                         "finetune", "--budget", "weight_grad_timings=300", "--total", "320"])
    assert rc == 1
    assert seen == [("cases", gpu_suite.STAGES["cases"]), ("weight_grad_timings", 300)]
    report = json.loads((tmp_path / "gpu-NVIDIA-Fake.json").read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == {
        "cases": "ok", "weight_grad_timings": "timed_out", "step_eager": "skipped", "finetune": "skipped"}
    assert (tmp_path / "gpu-NVIDIA-Fake.md").read_text() in capsys.readouterr().out
    assert (tmp_path / "gpu-runs.jsonl").read_text().count('"kind": "stage"') == 4


def test_finetune_command_and_its_runs(tmp_path):
    cmd = gpu_suite.finetune_command(Path("/d/glue"), tmp_path, 2000, Path("/m"))
    assert cmd[1:3] == ["-m", "gem_finetune"]
    for flag, value in (("--task-dir", "/d/glue/SST-2"), ("--device", "cuda"), ("--epochs", "1"),
                        ("--train-examples", "2000"), ("--model", "/m"), ("--out", str(tmp_path))):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--method") + 1: cmd.index("--method") + 3] == ["gem", "full"]
    assert "--model" not in gpu_suite.finetune_command(Path("/d"), tmp_path, 10, None)
    (tmp_path / "results-SST-2.jsonl").write_text(
        '{"kind": "settings"}\n{"kind": "run", "method": "gem", "seed": 0, "accuracy": 0.8, "extra": 1}\n{"kind": "ru')
    assert gpu_suite.finetune_runs(tmp_path) == [{"method": "gem", "seed": 0, "accuracy": 0.8, **{
        k: None for k in ("lr", "mcc", "median_step_seconds", "peak_memory_mib", "wall_seconds", "device",
                          "trainable_entries", "optimizer_state_bytes")}}]


def test_device_slug():
    assert gpu_suite.device_slug("NVIDIA H200") == "NVIDIA-H200"
    assert gpu_suite.device_slug("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"


# ---------------------------------------------------------------------------------------
# Without CUDA: one-line refusals


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_gpu_check_all_without_cuda_is_a_one_line_error(capsys):
    import gpu_check
    assert gpu_check.main(["--all"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_check: error: --all needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_step_cost_cuda_without_cuda_is_a_one_line_error(capsys):
    import step_cost
    assert step_cost.main(["--device", "cuda", "--models", "llama-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("step_cost: error: --device cuda:")


# ---------------------------------------------------------------------------------------
# step_cost on CPU: the smoke run (every method, the results format)


def test_step_cost_cpu_smoke(tmp_path, capsys):
    import step_cost
    out = tmp_path / "rows.json"
    assert step_cost.main(["--models", "llama-tiny", "--steps", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["method"] for r in rows] == list(step_cost.DEFAULT_METHODS)
    for r in rows:
        assert r["device"] == "cpu" and r["compiled"] is False and r["median_step_s"] > 0
        assert r["peak_step_bytes"] == r["resident_bytes"] + r["step_extra_peak_bytes"] > 0
    by = {r["method"]: r for r in rows}
    assert 0 < by["gem"]["trained_entries"] < by["lora"]["trained_entries"] < by["full"]["trained_entries"]
    if "gem-layer" in by:  # the same selection on the explicit layer
        assert by["gem-layer"]["trained_entries"] == by["gem"]["trained_entries"]
    assert by["full"]["trained_entries"] == sum(p.numel() for p in step_cost._llama_builder("llama-tiny", "cpu")()
                                                .parameters())
    assert re.search(r"^llama-tiny +lora ", capsys.readouterr().out, re.MULTILINE)


def test_step_stages_time_step_cost_methods():
    """The suite's step stages name methods step_cost knows, baselines first: full AdamW, then LoRA,
    then ours, the drop-in SparseAdamW (``gem``) and the explicit layer (``gem-layer``); no method
    twice (on CUDA ``default`` was ``gem`` again: a duplicate row)."""
    import step_cost
    for methods in (gpu_suite.STEP_EAGER_METHODS, gpu_suite.STEP_COMPILED_METHODS):
        assert set(methods) <= set(step_cost.METHODS), methods
        assert tuple(methods) == ("full", "lora", "gem", "gem-layer")


def test_stage_budgets_add_up_to_the_total_within_the_lend():
    """One call of at most 7 minutes (timeout_s 480): the stages' budgets are the suite's total, which
    leaves 20 s of the 420 for starting and the report; the lend's 15 minutes hold the machine's
    start (minutes) and one such call (docs/gpu.md, "The 15-minute budget")."""
    assert sum(gpu_suite.STAGES.values()) == gpu_suite.TOTAL
    assert gpu_suite.TOTAL + 20 <= 7 * 60 < 480
    assert list(gpu_suite.STAGES)[:2] == ["cases", "weight_grad_timings"]  # what matters most runs first
    assert set(gpu_suite.STAGE_FUNCTIONS) == set(gpu_suite.STAGES)


def test_llama_953m_config_has_953m_parameters():
    from transformers import LlamaConfig
    settings, batch, length, _ = step_cost_module().LLAMAS["llama-953m"]
    config = LlamaConfig(vocab_size=32000, **settings)
    h, i, n, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    params = 2 * v * h + n * (4 * h * h + 3 * h * i + 2 * h) + h  # embeddings, lm_head, layers, final norm
    assert (round(params / 1e6), batch, length) == (953, 8, 512)


def step_cost_module():
    import step_cost
    return step_cost


# ---------------------------------------------------------------------------------------
# The weight-gradient dispatch table


def _wg_item(shape, density, impl, ms, graph_ms=None):
    n_out, n_in = shape
    return {"T": 4096, "out": n_out, "in": n_in, "dtype": "bfloat16", "density": density, "k": 1, "impl": impl,
            "ms": ms, "graph_ms": graph_ms}


def _wg_items(sparse_ms, dense_ms, density=1e-3, config="xt_e128_t32_w8", graphs=None):
    shapes = [(2048, 2048), (5632, 2048)]
    graphs = graphs or [(None, None)] * len(shapes)
    items = []
    for shape, s_ms, d_ms, (s_g, d_g) in zip(shapes, sparse_ms, dense_ms, graphs):
        items += [_wg_item(shape, density, "dense", d_ms, d_g), _wg_item(shape, density, config, s_ms, s_g),
                  _wg_item(shape, density, "gather_e32_t32_w4", 10 * d_ms)]
    return items


def test_dispatch_rows_choose_sparse_only_where_it_wins_every_shape():
    rows = gpu_suite.dispatch_rows(_wg_items([0.02, 0.06], [0.05, 0.13]), "NVIDIA Fake", "R1")
    assert len(rows) == 1
    row = rows[0]
    assert (row["band"], row["choice"], row["config"], row["basis"]) == ("(0, 0.001]", "sparse", "xt_e128_t32_w8",
                                                                         "eager")
    assert row["sparse_ms"] == pytest.approx(0.08) and row["dense_ms"] == pytest.approx(0.18)
    assert (row["best_config"], row["best_config_ms"]) == ("xt_e128_t32_w8", pytest.approx(0.08))
    # the verdict is the configuration the op runs (the kernel's default), not the fastest one
    other = [{**i, "ms": i["ms"] / 100} if i["impl"] == "gather_e32_t32_w4" else i
             for i in _wg_items([0.06, 0.14], [0.05, 0.13])]
    row = gpu_suite.dispatch_rows(other, "D", "R")[0]
    assert (row["choice"], row["config"], row["best_config"]) == ("dense", "xt_e128_t32_w8", "gather_e32_t32_w4")
    assert set(row["shapes"]) == {"2048x2048", "5632x2048"} and row["dry_run"] is False
    # losing one shape, or the CUDA-graph comparison of one, makes the band dense
    assert gpu_suite.dispatch_rows(_wg_items([0.06, 0.06], [0.05, 0.13]), "D", "R")[0]["choice"] == "dense"
    graphs = [(0.03, 0.02), (0.05, 0.12)]
    row = gpu_suite.dispatch_rows(_wg_items([0.02, 0.06], [0.05, 0.13], graphs=graphs), "D", "R")[0]
    assert (row["choice"], row["basis"], row["sparse_graph_ms"]) == ("dense", "eager+graph", pytest.approx(0.08))
    # a band is written only when dense and a configuration were measured at every shape
    items = [i for i in _wg_items([0.02, 0.06], [0.05, 0.13]) if not (i["impl"] == "dense" and i["out"] == 5632)]
    assert gpu_suite.dispatch_rows(items, "D", "R") == []
    three = _wg_items([1, 1], [2, 2], 1e-3) + _wg_items([1, 1], [2, 2], 3e-3) + _wg_items([3, 3], [2, 2], 1e-2)
    assert [(r["band"], r["choice"]) for r in gpu_suite.dispatch_rows(three, "D", "R")] == [
        ("(0, 0.001]", "sparse"), ("(0.001, 0.003]", "sparse"), ("(0.003, 0.01]", "dense")]


def test_dispatch_choice_unmeasured_is_dense():
    rows = gpu_suite.dispatch_rows(_wg_items([1, 1], [2, 2], 1e-3) + _wg_items([3, 3], [2, 2], 1e-2), "H", "R")
    table = {"rows": rows}
    assert gpu_suite.dispatch_choice(table, "H", "bfloat16", 1e-3) == ("sparse", "xt_e128_t32_w8")
    assert gpu_suite.dispatch_choice(table, "H", "bfloat16", 5e-4) == ("sparse", "xt_e128_t32_w8")
    assert gpu_suite.dispatch_choice(table, "H", "bfloat16", 5e-3) == ("dense", None)  # measured: dense wins
    assert gpu_suite.dispatch_choice(table, "H", "bfloat16", 2e-3) == ("dense", None)  # band not measured
    assert gpu_suite.dispatch_choice(table, "H", "bfloat16", 0.05) == ("dense", None)  # above every band
    assert gpu_suite.dispatch_choice(table, "H", "float16", 1e-3) == ("dense", None)
    assert gpu_suite.dispatch_choice(table, "Other GPU", "bfloat16", 1e-3) == ("dense", None)


def test_committed_dispatch_table_is_a_placeholder_that_says_dense():
    table = json.loads(gpu_suite.DISPATCH_TABLE.read_text())
    assert table["rows"] == [] and table["unmeasured"] == "dense" and "dense path" in table["rule"]
    assert [(b["density_low"], b["density_high"]) for b in table["bands"]] == list(gpu_suite.DISPATCH_BANDS)
    assert [b["band"] for b in table["bands"]] == [f"({lo:g}, {hi:g}]" for lo, hi in gpu_suite.DISPATCH_BANDS]
    assert gpu_suite.dispatch_choice(table, "NVIDIA H100 80GB HBM3", "bfloat16", 1e-3) == ("dense", None)


def test_merge_dispatch_folds_measured_rows_and_skips_dry_runs(tmp_path):
    table = tmp_path / "table.json"
    table.write_text(gpu_suite.DISPATCH_TABLE.read_text())
    measured = gpu_suite.dispatch_rows(_wg_items([1, 1], [2, 2], 1e-3), "NVIDIA Fake", "R1")
    later = gpu_suite.dispatch_rows(_wg_items([3, 3], [2, 2], 1e-3), "NVIDIA Fake", "R2")
    dry = gpu_suite.dispatch_rows(_wg_items([1, 1], [2, 2], 3e-3), gpu_suite.DRY_DEVICE, "R3", dry_run=True)
    jsonl = tmp_path / "weight_grad_dispatch.jsonl"
    for row in measured + dry + later:
        gpu_suite.append_jsonl(jsonl, row)
    with open(jsonl, "a") as f:
        f.write('{"device": "torn')
    assert gpu_suite.main(["--merge-dispatch", str(jsonl), "--table", str(table)]) == 0
    merged = json.loads(table.read_text())
    assert [(r["device"], r["band"], r["choice"], r["run"]) for r in merged["rows"]] == [
        ("NVIDIA Fake", "(0, 0.001]", "dense", "R2")]  # the later run's row replaced the earlier one
    assert merged["unmeasured"] == "dense"


# ---------------------------------------------------------------------------------------
# The byte model of sparse_weight_grad's configurations


def test_weight_grad_byte_model():
    pytest.importorskip("triton")
    import gpu_check
    rows = gpu_check.weight_grad_predictions(bandwidth=4.3e12)
    assert len(rows) == 9
    by = {(r["shape"], r["density"]): r for r in rows}
    gate = by[("5632x2048", 1e-3)]
    # issue 16's H200 run of the first kernel (the gather layout): 0.68 ms a layer, which calibrates the L2 rate
    assert gate["gather_e32_t32_w4"]["predicted_ms"] == pytest.approx(0.67, abs=0.01)
    assert gate["dense_ms"] == pytest.approx(0.135, abs=0.001)
    for r in rows:  # copying X T-major moves fewer bytes than copying both; every xt tile beats gather's sectors
        assert r["xt_e64_t32_w4"]["dram_bytes"] < r["both_e64_t32_w4"]["dram_bytes"]
        assert r["xt_e128_t32_w8"]["l2_bytes"] < r["gather_e32_t32_w4"]["l2_bytes"] / 5
    # X read three times (read, write, read back) and dY once: ~97 MB for the gate projection
    assert gate["xt_e128_t32_w8"]["dram_bytes"] == pytest.approx(4096 * (3 * 2048 + 5632) * 2, rel=0.02)
    assert "| 5632 x 2048 | 0.001 | 11,534 |" in gpu_check.weight_grad_table()


# ---------------------------------------------------------------------------------------
# The dry run: every stage end to end on CPU


def test_finetune_command_dry_run(tmp_path):
    cmd = gpu_suite.finetune_command(Path("/d"), tmp_path, 2000, None, dry_run=True)
    for flag, value in (("--device", "cpu"), ("--train-examples", "32"), ("--eval-examples", "32"),
                        ("--max-length", "16")):
        assert cmd[cmd.index(flag) + 1] == value


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: run the suite itself")
def test_dry_run_runs_every_stage_and_writes_the_files(tmp_path):
    """``gpu_check.py --all --dry-run``: each stage in its own process on CPU, as on the GPU, into the
    same files; every stage ok, every case passed, no duplicate rows, dispatch rows marked dry_run."""
    pytest.importorskip("triton")
    import subprocess
    results, data = tmp_path / "out", gpu_suite.tiny_sst2(tmp_path / "glue")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--all", "--dry-run",
                           "--results", str(results), "--data", str(data)], cwd=ROOT, env=dict(env, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in results.iterdir()) == [
        "gpu-CPU-dry-run.json", "gpu-CPU-dry-run.log", "gpu-CPU-dry-run.md", "gpu-runs.jsonl", DISPATCH_JSONL]
    report = json.loads((results / "gpu-CPU-dry-run.json").read_text())
    assert report["environment"]["dry_run"] is True
    assert {name: s["status"] for name, s in report["stages"].items()} == {name: "ok" for name in gpu_suite.STAGES}
    stages = report["stages"]
    assert all(stages[name]["items"] for name in gpu_suite.STAGES), "a stage wrote no record"
    assert [i["item"] for i in stages["cases"]["items"]] == [*gpu_suite.DRY_CASES, "weight_grad_configs_tiny"]
    assert all(i["ok"] for i in stages["cases"]["items"])
    for stage in ("step_eager", "step_compiled"):
        assert [i["method"] for i in stages[stage]["items"]] == list(gpu_suite.STEP_METHODS)
        assert all("median_step_s" in i for i in stages[stage]["items"]), stages[stage]["items"]
    timed = [(i["out"], i["in"], i["density"], i["impl"])
             for i in stages["weight_grad_timings"]["items"] if "impl" in i]
    assert len(timed) == len(set(timed)) == 2 * 3 * (1 + len(_swg_config_names()))
    dispatch = [json.loads(line) for line in (results / DISPATCH_JSONL).read_text().splitlines()]
    assert [r["band"] for r in dispatch] == [f"({lo:g}, {hi:g}]" for lo, hi in gpu_suite.DISPATCH_BANDS]
    assert all(r["dry_run"] and r["device"] == gpu_suite.DRY_DEVICE for r in dispatch)
    assert [i["method"] for i in stages["finetune"]["items"] if i["item"] == "run"] == ["gem", "full"]
    text = (results / "gpu-CPU-dry-run.md").read_text()
    assert "## Weight-gradient dispatch" in text and "## Training step, llama-tiny, torch.compile" in text


DISPATCH_JSONL = "weight_grad_dispatch.jsonl"


def _swg_config_names():
    import gem_kernels.backends.triton  # noqa: F401
    return list(sys.modules["gem_kernels.backends.triton.sparse_weight_grad"].CONFIGS)
