"""The GPU suite: every check and timing that needs a CUDA device, in one call, time-boxed.

    python benchmarks/gpu_check.py --all [--results DIR] [--data DIR] [--model DIR]
                                         [--only STAGE ...] [--budget STAGE=SECONDS ...] [--total SECONDS]
    make gpu-check

Runs from a source checkout with torch, triton, transformers and peft alone (nothing is built:
CUDA tensors use the Triton kernels). Stages, in this order, each in its own process with its
own time budget in seconds (``--budget``); a stage is also cut at the suite's deadline
(``--total``, default 330 s, so that the whole call ends within 6 minutes; not yet timed on a GPU),
and one that runs out is stopped, recorded as ``timed_out``, and the suite goes on:

* ``cases`` (90): the numerics cases of tests/triton_cases.py on CUDA tensors, the
  sparse_weight_grad cases against float64 included (GPU_CASES), and the AdamW step's GPU contract
  (docs/gpu.md);
* ``kernel_timings`` (45): the device-to-device copy bandwidth, then each kernel against what a
  user would run instead (``gpu_check.timings``, medians of ``triton.testing.do_bench``) with the
  ideal time its bytes take at that bandwidth;
* ``weight_grad_timings`` (30): ``sparse_weight_grad`` against dense ``dYᵀX`` + gather on the
  953M Llama's layer shapes at T = 4096, density 1e-3, bf16 and fp32;
* ``step_eager`` (90): ``benchmarks/step_cost.py``'s measure on ``llama-953m`` (bf16 autocast,
  batch 8 x 512): SparseAdamW as it comes (``gem``: the drop-in path, dense ``dW`` and ``.grad``),
  then the baselines LoRA r=8 and full AdamW (fused);
* ``finetune`` (80): ``python -m gem_finetune --task-dir DATA/SST-2 --method gem full --device cuda``,
  one epoch of ``--finetune-examples`` examples, seed 0;
* ``step_compiled`` (150): the step cost with ``torch.compile``: SparseAdamW (``gem``), full,
  LoRA (as many as the time left allows).

Results: every record is appended at once, as one JSON line, to ``RESULTS/gpu-runs.jsonl`` (one
file holds many runs; each line names its run); at the end the run's records are gathered into
``RESULTS/gpu-<device>.json`` and a markdown table ``RESULTS/gpu-<device>.md``, which is printed.
Each stage's output goes to ``RESULTS/gpu-<device>.log``. Without CUDA, a one-line error (exit 2).
Exit status 0 when every stage ran to its end and every case passed, else 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

# name -> budget in seconds. The order is the order they run in.
STAGES = {"cases": 90, "kernel_timings": 45, "weight_grad_timings": 30, "step_eager": 90, "finetune": 80,
          "step_compiled": 150}
TOTAL = 330        # seconds for all stages: with start-up and the report, the call ends within 6 minutes
MIN_START = 15     # a stage is not started with less time left than this
STEP_EAGER_METHODS = ("gem", "lora", "full")  # step_cost's methods: SparseAdamW, then the baselines
STEP_COMPILED_METHODS = ("gem", "full", "lora")
FINETUNE_EXAMPLES = 2000
STEP_MODEL = "llama-953m"


def default_data() -> Path:
    carried = ROOT / "device_carry" / "data" / "glue"
    return carried if carried.is_dir() else ROOT.parent / "shared" / "data" / "glue"


def default_model() -> Path | None:
    carried = ROOT / "device_carry" / "minilm-fp16"
    return carried if (carried / "config.json").is_file() else None


def _budget_item(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in STAGES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return name, seconds


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py --all", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for gpu-runs.jsonl, gpu-<device>.json/.md/.log (default benchmarks/results)")
    p.add_argument("--data", type=Path, default=default_data(),
                   help="GLUE folder holding SST-2/ (default device_carry/data/glue if present, "
                        "else ../shared/data/glue)")
    p.add_argument("--model", type=Path, default=default_model(),
                   help="model folder for gem-finetune (default device_carry/minilm-fp16 if present, else "
                        "gem-finetune's own default)")
    p.add_argument("--only", nargs="+", choices=list(STAGES), metavar="STAGE", help="run these stages only")
    p.add_argument("--skip", nargs="+", choices=list(STAGES), metavar="STAGE", default=[], help="leave these out")
    p.add_argument("--budget", nargs="+", type=_budget_item, default=[], metavar="STAGE=SECONDS",
                   help="a stage's time budget (defaults: " + ", ".join(f"{k} {v}" for k, v in STAGES.items()) + ")")
    p.add_argument("--total", type=float, default=TOTAL, help=f"seconds for all stages together (default {TOTAL})")
    p.add_argument("--finetune-examples", type=int, default=FINETUNE_EXAMPLES,
                   help=f"SST-2 training examples of the one-epoch fine-tuning (default {FINETUNE_EXAMPLES})")
    p.add_argument("--step-steps", type=int, default=10, help="timed steps per step-cost row (default 10)")
    # A stage's own process (started by the suite):
    p.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--jsonl", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--run", help=argparse.SUPPRESS)
    return p


def stage_plan(args) -> list[tuple[str, float]]:
    """(stage, budget) in running order, after --only, --skip and --budget."""
    budgets = dict(STAGES, **dict(args.budget))
    chosen = args.only or list(STAGES)
    return [(name, budgets[name]) for name in STAGES if name in chosen and name not in args.skip]


def budget_left(budget: float, deadline: float, now: float, min_start: float = MIN_START) -> float | None:
    """The seconds a stage may run: its budget, cut at the suite's deadline; None when fewer than
    ``min_start`` seconds are left (the stage is then skipped)."""
    left = min(budget, deadline - now)
    return left if left >= min_start else None


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "device"


# ---------------------------------------------------------------------------------------
# Records


def append_jsonl(path: Path, record: dict) -> None:
    """One record, one line, in one write, synced at once (a stage killed later keeps it). After a
    torn last line (a writer killed mid-line) the record starts a new line, so only the torn one is lost."""
    line = (json.dumps(record, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_run(path: Path, run: str) -> list[dict]:
    """The records of one run, in order; a torn last line (a writer killed mid-line) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("run") == run:
            records.append(record)
    return records


def collect(records: list[dict]) -> dict:
    """One run's records as {run, environment, settings, stages: {name: {status, seconds, budget_s,
    items}}, seconds}."""
    report = {"stages": {}}
    for r in records:
        kind = r.get("kind")
        if kind == "start":
            report.update(run=r["run"], environment=r.get("environment", {}), settings=r.get("settings", {}))
        elif kind == "item":
            report["stages"].setdefault(r["stage"], {"items": []})["items"].append(
                {k: v for k, v in r.items() if k not in ("run", "kind", "stage")})
        elif kind == "stage":
            entry = report["stages"].setdefault(r["stage"], {"items": []})
            entry.update({k: v for k, v in r.items() if k not in ("run", "kind", "stage")})
        elif kind == "end":
            report["seconds"] = r.get("seconds")
    return report


def suite_ok(report: dict) -> bool:
    stages = report.get("stages", {})
    ran = all(s.get("status") == "ok" for s in stages.values())
    cases = [i for i in stages.get("cases", {}).get("items", []) if "ok" in i]
    return ran and all(i["ok"] for i in cases)


# ---------------------------------------------------------------------------------------
# The markdown table


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{1e3 * seconds:.1f}"


def _num(x, fmt=".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _cases_section(stages: dict) -> list[str]:
    """The kernel cases: pass or fail, with each one's summary."""
    out = []
    cases = [i for i in stages.get("cases", {}).get("items", []) if "ok" in i]
    if cases:
        passed = sum(i["ok"] for i in cases)
        out += ["", f"## Kernel cases: {passed} of {len(cases)} passed", "",
                "| case | result | seconds | summary |", "|---|---|---|---|"]
        for i in cases:
            first = str(i.get("summary", "")).strip().splitlines()
            summary = (first[-1] if not i["ok"] and first else (first[0] if first else "")).replace("|", "/")
            out.append(f"| {i['item']} | {'pass' if i['ok'] else 'FAIL'} | {_num(i.get('seconds'), '.2f')} | "
                       f"{summary[:300]} |")

    return out


def _timings_section(stages: dict) -> list[str]:
    """The kernels against torch, and against the copy bandwidth."""
    out = []
    timings = stages.get("kernel_timings", {}).get("items", [])
    if any("triton_ms" in i or "bytes_per_s" in i for i in timings):
        out += ["", "## Kernels against torch (median ms)", ""]
        bw = next((i for i in timings if i.get("item") == "copy_bandwidth"), None)
        if bw:
            out.append(f"Device-to-device copy: {bw['bytes_per_s'] / 1e12:.2f} TB/s (bytes read + written), "
                       "the bandwidth of the ideal times.")
            out.append("")
        out += ["| op | ours ms | torch ms | torch / ours | ideal ms | ideal / ours | torch baseline |",
                "|---|---|---|---|---|---|---|"]
        for i in timings:
            if "triton_ms" not in i:
                continue
            out.append(f"| {i['item']} | {i['triton_ms']:.3f} | {i['torch_ms']:.3f} | "
                       f"{i['torch_ms'] / i['triton_ms']:.2f} | {_num(i.get('ideal_ms'))} | "
                       f"{_num(i.get('fraction_of_ideal'), '.2f')} | {i.get('torch_baseline', '')} |")

    return out


def _weight_grad_section(stages: dict) -> list[str]:
    """sparse_weight_grad against dense dYᵀX + gather."""
    out = []
    grads = [i for i in stages.get("weight_grad_timings", {}).get("items", []) if "triton_ms" in i]
    if grads:
        out += ["", "## sparse_weight_grad against dense dYᵀX + gather (median ms)", "",
                "| T | out x in | dtype | density | k | ours ms | dense + gather ms | dense / ours | read-once ms |",
                "|---|---|---|---|---|---|---|---|---|"]
        for i in grads:
            out.append(f"| {i['T']} | {i['out']} x {i['in']} | {i['dtype']} | {i['density']:g} | {i['k']:,} | "
                       f"{i['triton_ms']:.3f} | {i['dense_ms']:.3f} | {i['dense_ms'] / i['triton_ms']:.2f} | "
                       f"{_num(i.get('ideal_ms'))} |")

    return out


def _steps_section(stages: dict) -> list[str]:
    """The training step, eager and compiled, against LoRA and full fine-tuning."""
    out = []
    for stage, title in (("step_eager", "eager"), ("step_compiled", "torch.compile")):
        rows = [i for i in stages.get(stage, {}).get("items", []) if "median_step_s" in i]
        errors = [i for i in stages.get(stage, {}).get("items", []) if "error" in i]
        if not rows and not errors:
            continue
        out += ["", f"## Training step, {STEP_MODEL}, {title} (bf16 autocast, fp32 weights, batch 8 x 512)", "",
                "| method | step ms | x LoRA | x full | peak GB | x LoRA | trained entries | first step s |",
                "|---|---|---|---|---|---|---|---|"]
        lora = next((r for r in rows if r["method"] == "lora"), None)
        full = next((r for r in rows if r["method"] == "full"), None)
        for r in rows:
            def ratio(key, base):
                return "n/a" if base is None else f"{r[key] / base[key]:.2f}"
            out.append(f"| {r['method']} | {_ms(r['median_step_s'])} | {ratio('median_step_s', lora)} | "
                       f"{ratio('median_step_s', full)} | {r['peak_step_bytes'] / 1e9:.1f} | "
                       f"{ratio('peak_step_bytes', lora)} | {r['trained_entries']:,} | {r['first_step_s']:.1f} |")
        for e in errors:
            out.append(f"| {e['item']} | error: {str(e['error']).splitlines()[-1][:200]} | | | | | | |")

    return out


def _finetune_section(stages: dict) -> list[str]:
    """The short gem-finetune run."""
    out = []
    runs = [i for i in stages.get("finetune", {}).get("items", []) if i.get("item") == "run"]
    if runs:
        out += ["", "## gem-finetune on SST-2, one epoch, CUDA", "",
                "| method | seed | dev accuracy % | step ms (median) | peak memory MiB | s per run |",
                "|---|---|---|---|---|---|"]
        for r in runs:
            acc = r.get("accuracy")
            out.append(f"| {r.get('method')} | {r.get('seed')} | {_num(None if acc is None else 100 * acc, '.1f')} | "
                       f"{_ms(r.get('median_step_seconds'))} | {_num(r.get('peak_memory_mib'), '.0f')} | "
                       f"{_num(r.get('wall_seconds'), '.1f')} |")
    return out

def markdown(report: dict) -> str:
    env = report.get("environment", {})
    stages = report.get("stages", {})
    out = [f"# GPU suite: {env.get('device', 'unknown device')}", "",
           f"Run {report.get('run')}: torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, "
           f"transformers {env.get('transformers')}, peft {env.get('peft')}, Python {env.get('python')}, "
           f"checkout {env.get('commit') or 'unknown'}; {_num(report.get('seconds'), '.0f')} s in all.", "",
           "| stage | status | seconds | budget s |", "|---|---|---|---|"]
    for name, s in stages.items():
        out.append(f"| {name} | {s.get('status', 'no status (the suite was stopped)')} | "
                   f"{_num(s.get('seconds'), '.1f')} | {_num(s.get('budget_s'), '.0f')} |")

    for section in (_cases_section, _timings_section, _weight_grad_section, _steps_section, _finetune_section):
        out += section(stages)
    return "\n".join(out) + "\n"

# ---------------------------------------------------------------------------------------
# Running a stage in its own process, time-boxed


def run_stage(cmd: list[str], budget: float, log, env=None) -> dict:
    """Runs ``cmd`` (its output appended to the open file ``log``) for at most ``budget`` seconds.
    On time-out its whole process group is stopped (SIGTERM, then SIGKILL after 10 s). Returns
    {status: ok | failed | timed_out, rc, seconds}."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        rc, status = proc.returncode, "timed_out"
    return {"status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1)}


def _environment() -> dict:
    import torch
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    for name in ("triton", "transformers", "peft"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (a missing package is recorded, the stage that needs it fails)
            env[name] = None
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def run_suite(args) -> int:
    import torch
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("gpu_check: error: --all: unset TRITON_INTERPRET; the suite checks the compiled kernels", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(f"gpu_check: error: --all needs a CUDA device; torch {torch.__version__} sees none", file=sys.stderr)
        return 2
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    environment = _environment()
    slug = device_slug(environment["device"])
    jsonl, log_path = results / "gpu-runs.jsonl", results / f"gpu-{slug}.log"
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    plan = stage_plan(args)
    settings = {"budgets": dict(plan), "total_s": args.total, "data": str(args.data),
                "model": None if args.model is None else str(args.model), "finetune_examples": args.finetune_examples,
                "step_steps": args.step_steps}
    append_jsonl(jsonl, {"run": run, "kind": "start", "environment": environment, "settings": settings})
    print(f"GPU suite {run} on {environment['device']}: stages {', '.join(n for n, _ in plan)}; "
          f"{args.total:.0f} s in all; records to {jsonl}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.monotonic()
    deadline = start + args.total
    common = ["--data", str(args.data.resolve()), "--finetune-examples", str(args.finetune_examples),
              "--step-steps", str(args.step_steps)]
    if args.model is not None:
        common += ["--model", str(args.model.resolve())]
    with open(log_path, "a") as log:
        for name, budget in plan:
            left = budget_left(budget, deadline, time.monotonic())
            if left is None:
                record = {"status": "skipped", "reason": "too little of the suite's time left", "budget_s": budget}
            else:
                log.write(f"\n===== {run} stage {name} (budget {left:.0f} s)\n")
                log.flush()
                offset = log.tell()
                cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, "--jsonl", str(jsonl),
                       "--run", run] + common
                record = dict(run_stage(cmd, left, log, env), budget_s=round(left))
            append_jsonl(jsonl, {"run": run, "kind": "stage", "stage": name, **record})
            print(f"[{name}] {record['status']}" + (f" in {record['seconds']} s (budget {record['budget_s']} s)"
                                                     if "seconds" in record else f": {record['reason']}"), flush=True)
            if record["status"] in ("failed", "timed_out"):
                tail = Path(log_path).read_bytes()[offset:].decode(errors="replace").splitlines()[-15:]
                print("\n".join("    " + line for line in tail), flush=True)
    append_jsonl(jsonl, {"run": run, "kind": "end", "seconds": round(time.monotonic() - start, 1)})
    report = collect(read_run(jsonl, run))
    (results / f"gpu-{slug}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (results / f"gpu-{slug}.md").write_text(text)
    print("\n" + text)
    print(f"wrote {results / f'gpu-{slug}.json'}, {results / f'gpu-{slug}.md'}; log {log_path}")
    return 0 if suite_ok(report) else 1


# ---------------------------------------------------------------------------------------
# The stages (each runs in its own process; ``emit`` appends one record)


def stage_cases(emit, args) -> None:
    import triton_cases
    triton_cases.run_all("cuda", on_result=lambda name, r: emit({"item": name, **r}))


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 2 GiB device-to-device copy (median of do_bench)."""
    import torch
    import triton
    src = torch.randn(2**29, device="cuda")  # 2 GiB of fp32: far beyond the L2
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms / 1e3)


def stage_kernel_timings(emit, args) -> None:
    import gpu_check
    bandwidth = copy_bandwidth()
    emit({"item": "copy_bandwidth", "bytes_per_s": bandwidth})
    model = gpu_check.traffic_model(bandwidth=bandwidth)
    for name, t in gpu_check.timings().items():
        ideal = model["kernels"][name]["ideal_ms"]
        emit({"item": name, **t, "bytes": model["kernels"][name]["bytes"], "ideal_ms": ideal,
              "fraction_of_ideal": ideal / t["triton_ms"]})


def stage_weight_grad_timings(emit, args) -> None:
    import torch
    import triton
    from triton_cases import LLAMA_953M_LAYERS

    import gem_kernels.backends.triton as tk
    bandwidth = copy_bandwidth()
    density = 1e-3
    for dtype in (torch.bfloat16, torch.float32):
        for t, n_out, n_in in LLAMA_953M_LAYERS:
            gen = torch.Generator(device="cuda").manual_seed(n_out * n_in)
            x = torch.randn(t, n_in, device="cuda", generator=gen).to(dtype)
            dy = torch.randn(t, n_out, device="cuda", generator=gen).to(dtype)
            k = round(density * n_out * n_in)
            idx = torch.randperm(n_out * n_in, device="cuda", generator=gen)[:k].sort().values
            off = torch.tensor([0, k], dtype=torch.int64, device="cuda")
            ours = triton.testing.do_bench(lambda: tk.sparse_weight_grad([x], [dy], idx, off), return_mode="median")
            dense = triton.testing.do_bench(lambda: torch.mm(dy.t(), x).view(-1).index_select(0, idx),
                                            return_mode="median")
            read_once = t * (n_in + n_out) * x.element_size()
            emit({"item": f"{n_out}x{n_in} {str(dtype)[6:]}", "T": t, "out": n_out, "in": n_in,
                  "dtype": str(dtype)[6:], "density": density, "k": k, "triton_ms": ours, "dense_ms": dense,
                  "dense_baseline": "torch.mm(dY.t(), X) in the inputs' dtype, then index_select",
                  "bytes_read_once": read_once, "ideal_ms": read_once / bandwidth * 1e3})


def _step_stage(emit, args, methods, compile) -> None:
    import traceback

    import step_cost
    import torch
    for method in methods:
        error = None
        try:
            row = step_cost.measure(STEP_MODEL, method, args.step_steps, device="cuda", compile=compile)
            emit({"item": method, **row})
        except Exception:  # one method's failure (out of memory, a compile error) does not stop the others
            error = traceback.format_exc(limit=6)
        if error is not None:  # outside the except block, whose traceback holds the failed row's tensors
            emit({"item": method, "method": method, "error": error})
            step_cost.release("cuda", compile)
            torch.cuda.empty_cache()


def stage_step_eager(emit, args) -> None:
    _step_stage(emit, args, STEP_EAGER_METHODS, compile=False)


def stage_step_compiled(emit, args) -> None:
    _step_stage(emit, args, STEP_COMPILED_METHODS, compile=True)


def finetune_command(data: Path, out: Path, examples: int, model: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "gem_finetune", "--task-dir", str(data / "SST-2"), "--method", "gem", "full",
           "--device", "cuda", "--epochs", "1", "--seeds", "0", "--train-examples", str(examples),
           "--batch-size", "32", "--max-length", "64", "--calibration-batches", "8", "--out", str(out)]
    return cmd + ([] if model is None else ["--model", str(model)])


def finetune_runs(out: Path) -> list[dict]:
    """The finished runs gem-finetune wrote in ``out``: results-*.jsonl "run" records, or the runs
    of an older results-*.json."""
    keys = ("method", "seed", "lr", "accuracy", "mcc", "median_step_seconds", "peak_memory_mib", "wall_seconds",
            "device", "trainable_entries", "optimizer_state_bytes")
    runs = []
    for path in sorted(out.glob("results-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("kind") == "run":
                runs.append(record)
    if not runs:
        for path in sorted(out.glob("results-*.json")):
            runs += json.loads(path.read_text()).get("runs", [])
    return [{k: r.get(k) for k in keys} for r in runs]


def stage_finetune(emit, args) -> None:
    import tempfile
    if not (args.data / "SST-2" / "train.tsv").is_file():
        raise SystemExit(f"finetune: {args.data / 'SST-2'} has no train.tsv (see --data)")
    with tempfile.TemporaryDirectory(prefix="gpu-finetune-") as tmp:
        cmd = finetune_command(args.data, Path(tmp), args.finetune_examples, args.model)
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)  # its output goes to the suite's log as it comes
        for run in finetune_runs(Path(tmp)):
            emit({"item": "run", **run})
        emit({"item": "command", "argv": cmd[1:], "rc": proc.returncode})
        if proc.returncode != 0:
            raise SystemExit(f"finetune: gem-finetune exited with {proc.returncode}")


STAGE_FUNCTIONS = {"cases": stage_cases, "kernel_timings": stage_kernel_timings,
                   "weight_grad_timings": stage_weight_grad_timings, "step_eager": stage_step_eager,
                   "finetune": stage_finetune, "step_compiled": stage_step_compiled}


def run_one_stage(args) -> int:
    def emit(record: dict) -> None:
        append_jsonl(args.jsonl, {"run": args.run, "kind": "item", "stage": args.stage, **record})
    STAGE_FUNCTIONS[args.stage](emit, args)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage:
        if args.jsonl is None or args.run is None:
            print("gpu_suite: error: --stage needs --jsonl and --run", file=sys.stderr)
            return 2
        return run_one_stage(args)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
