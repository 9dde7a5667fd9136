"""The GPU suite: every check and timing that needs a CUDA device, in one call, time-boxed.

    python benchmarks/gpu_check.py --all [--results DIR] [--data DIR] [--model DIR]
                                         [--only STAGE ...] [--budget STAGE=SECONDS ...] [--total SECONDS]
    python benchmarks/gpu_check.py --all --dry-run [--results DIR]   # every stage on CPU, tiny shapes
    python benchmarks/gpu_suite.py --merge-dispatch RESULTS/weight_grad_dispatch.jsonl
    make gpu-check [RESULTS=DIR]                                      # RESULTS defaults to $OUT if set

Runs from a source checkout with torch, triton, transformers and peft alone (nothing is built:
CUDA tensors use the Triton kernels). Stages, in this order, each in its own process with its
own time budget in seconds (``--budget``); the budgets add up to the suite's total (``--total``,
400 s: with start-up and the report the call ends within 7 minutes, so ``timeout_s`` 480 leaves a
margin); a stage is also cut at the suite's deadline, and one that runs out is stopped, recorded as
``timed_out``, and the suite goes on:

* ``cases`` (70): the numerics cases of tests/triton_cases.py on CUDA tensors, the
  sparse_weight_grad cases against float64 included (GPU_CASES: the op, and every configuration
  of its kernel), and the AdamW step's GPU contract (docs/gpu.md);
* ``weight_grad_timings`` (75): every configuration of ``sparse_weight_grad``'s kernel against
  dense ``dYᵀX`` + gather on the 953M Llama's layer shapes, T = 4096, bf16, at densities 1e-3, 3e-3
  and 1e-2 (median of do_bench, and of do_bench_cudagraph: no host overhead); then the rows of the
  dispatch table (``RESULTS/weight_grad_dispatch.jsonl``, see ``dispatch_rows``);
* ``step_eager`` (60): ``benchmarks/step_cost.py``'s measure on ``llama-953m`` (bf16 autocast,
  batch 8 x 512), baselines first: full AdamW (fused), LoRA r=8, then ours: ``gem`` (the drop-in
  SparseAdamW: dense ``dW`` and ``.grad``) and ``gem-layer`` (``sparsify_``: sparse weight gradients);
* ``kernel_timings`` (35): the device-to-device copy bandwidth, then each kernel against what a
  user would run instead (``gpu_check.timings``) with the ideal time its bytes take at that bandwidth;
* ``finetune`` (55): ``python -m gem_finetune --task-dir DATA/SST-2 --method gem full --device cuda``,
  one epoch of ``--finetune-examples`` examples, seed 0;
* ``step_compiled`` (105): the step cost with ``torch.compile``, the same methods in the same order
  (as many as the time left allows).

``--dry-run`` runs every stage end to end on CPU (no CUDA needed) with tiny shapes: a few cases
and every weight-gradient configuration under ``TRITON_INTERPRET=1``, ``llama-tiny`` steps
(compiled with the ``aot_eager`` backend), a 32-example fine-tuning; it writes the same files
(device ``CPU dry run``; default folder build/gpu-dry-run). Its rows are marked ``dry_run`` and
never merged into the dispatch table.

Results: every record is appended at once, as one JSON line, to ``RESULTS/gpu-runs.jsonl`` (one
file holds many runs; each line names its run); at the end the run's records are gathered into
``RESULTS/gpu-<device>.json`` and a markdown table ``RESULTS/gpu-<device>.md``, which is printed.
Each stage's output goes to ``RESULTS/gpu-<device>.log``. Without CUDA (and without --dry-run), a
one-line error (exit 2). Exit status 0 when every stage ran to its end and every case passed, else 1.
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

# name -> budget in seconds. The order is the order they run in; the budgets add up to TOTAL.
STAGES = {"cases": 70, "weight_grad_timings": 75, "step_eager": 60, "step_nf4": 30, "kernel_timings": 35,
          "finetune": 55, "step_compiled": 75}
TOTAL = 400        # seconds for all stages: with start-up and the report, the call ends within 7 minutes
MIN_START = 15     # a stage is not started with less time left than this
STEP_METHODS = ("full", "lora", "gem", "gem-layer")  # step_cost's methods: the baselines first, then ours
STEP_EAGER_METHODS = STEP_METHODS
STEP_COMPILED_METHODS = STEP_METHODS
# The 4-bit comparison (step_cost's): the model in bf16; full fine-tuning and QLoRA first, then GEM on NF4.
NF4_METHODS = ("full-bf16", "qlora", "gem-nf4")
DRY_NF4_MODEL = "llama-tiny-nf4"
TORCHAO_WHEELS = ROOT / "device_carry" / "wheels"  # prepare_device_carry.py puts torchao's wheel there
FINETUNE_EXAMPLES = 2000
STEP_MODEL = "llama-953m"
DRY_STEP_MODEL = "llama-tiny"
STEP_SETTINGS = {STEP_MODEL: "bf16 autocast, fp32 weights, batch 8 x 512",
                 DRY_STEP_MODEL: "the dry run: fp32 on CPU, batch 2 x 32"}
DRY_DEVICE = "CPU dry run"
# The dry run's cases: one of each kernel's kinds, under the interpreter (the whole list is
# tests/test_triton_interpret.py's), and every weight-gradient configuration on tiny shapes.
DRY_CASES = ("stats_fp32", "topk_per_segment_ties_fp32", "adamw_fp32_step")
DRY_WEIGHT_GRAD_CASE = ([(70, 40, 24), (0, 5, 5), (64, 20, 30)], ["bfloat16", "float32", "float16"], 0.05)

# The weight-gradient timings: the 953M Llama's layers (out, in) at T = 4096, bf16 (gpu_check's).
WEIGHT_GRAD_TOKENS = 4096
WEIGHT_GRAD_SHAPES = [(2048, 2048), (5632, 2048), (2048, 5632)]
WEIGHT_GRAD_DENSITIES = (1e-3, 3e-3, 1e-2)
DRY_WEIGHT_GRAD_TOKENS = 64
DRY_WEIGHT_GRAD_SHAPES = [(96, 48), (48, 96)]
# Density bands of the dispatch table: (low, high], each measured at its upper edge. The sparse
# kernel's time grows with the entries, the dense product's does not, so a win at the upper edge
# holds across the band. Above the last band nothing is measured: dense.
DISPATCH_BANDS = ((0.0, 1e-3), (1e-3, 3e-3), (3e-3, 1e-2))
DISPATCH_FILE = "weight_grad_dispatch.jsonl"
DISPATCH_TABLE = ROOT / "gem_kernels" / "weight_grad_dispatch.json"  # what SparseDeltaLinear reads


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
    p.add_argument("--results", type=Path, default=None,
                   help="folder for gpu-runs.jsonl, gpu-<device>.json/.md/.log and weight_grad_dispatch.jsonl "
                        "(default benchmarks/results; with --dry-run build/gpu-dry-run)")
    p.add_argument("--dry-run", action="store_true",
                   help="every stage on CPU with tiny shapes (Triton under its interpreter); no CUDA needed")
    p.add_argument("--merge-dispatch", type=Path, metavar="JSONL",
                   help="fold a run's weight_grad_dispatch.jsonl rows into --table and stop")
    p.add_argument("--table", type=Path, default=DISPATCH_TABLE, help=argparse.SUPPRESS)
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


def results_dir(args) -> Path:
    if args.results is not None:
        return args.results
    return ROOT / "build" / "gpu-dry-run" if args.dry_run else ROOT / "benchmarks" / "results"


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


def _us(ms) -> str:
    return "n/a" if ms is None else f"{1e3 * ms:.1f}"


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
    """sparse_weight_grad, each configuration, against dense dYᵀX + gather."""
    items = [i for i in stages.get("weight_grad_timings", {}).get("items", []) if "impl" in i]
    if not items:
        return []
    out = ["", "## sparse_weight_grad against dense dYᵀX + gather (median µs)", "",
           "µs: do_bench (host included, L2 cleared between calls); graph µs: do_bench_cudagraph (no host "
           "overhead, warm L2); model µs: the byte model at the measured copy bandwidth (docs/gpu.md).", "",
           "| out x in | density | k | implementation | µs | graph µs | dense / this | model µs |",
           "|---|---|---|---|---|---|---|---|"]
    dense = {(i["out"], i["in"], i["density"]): i for i in items if i["impl"] == "dense"}
    for i in items:
        base = dense.get((i["out"], i["in"], i["density"]))
        ratio = "n/a" if base is None or not i.get("ms") else f"{base['ms'] / i['ms']:.2f}"
        out.append(f"| {i['out']} x {i['in']} | {i['density']:g} | {i['k']:,} | {i['impl']} | {_us(i.get('ms'))} | "
                   f"{_us(i.get('graph_ms'))} | {ratio} | {_us(i.get('model_ms'))} |")
    return out


def _dispatch_section(stages: dict) -> list[str]:
    """The dispatch table's rows this run measured."""
    rows = [i for i in stages.get("weight_grad_timings", {}).get("items", []) if "choice" in i]
    if not rows:
        return []
    out = ["", "## Weight-gradient dispatch (gem_kernels/weight_grad_dispatch.json)", "",
           "| device | dtype | density band | choice | configuration | sparse µs | dense µs | sparse graph µs | "
           "dense graph µs | basis |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['device']} | {r['dtype']} | {r['band']} | **{r['choice']}** | {r['config']} | "
                   f"{_us(r['sparse_ms'])} | {_us(r['dense_ms'])} | {_us(r.get('sparse_graph_ms'))} | "
                   f"{_us(r.get('dense_graph_ms'))} | {r['basis']} |")
    return out


def _steps_section(stages: dict) -> list[str]:
    """The training step, eager and compiled, against LoRA and full fine-tuning."""
    out = []
    for stage, title in (("step_eager", "eager"), ("step_nf4", "eager, bf16 model, NF4 bases"),
                         ("step_compiled", "torch.compile")):
        rows = [i for i in stages.get(stage, {}).get("items", []) if "median_step_s" in i]
        errors = [i for i in stages.get(stage, {}).get("items", []) if "error" in i]
        if not rows and not errors:
            continue
        model = rows[0].get("model", STEP_MODEL) if rows else STEP_MODEL
        setting = STEP_SETTINGS.get(model, "")
        out += ["", f"## Training step, {model}, {title} ({setting})", "",
                "| method | step ms | x LoRA | x full | peak GB | x LoRA | trained entries | first step s |",
                "|---|---|---|---|---|---|---|---|"]
        lora = next((r for r in rows if r["method"] in ("lora", "qlora")), None)  # QLoRA for the 4-bit rows
        full = next((r for r in rows if r["method"] in ("full", "full-bf16")), None)
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
        device = runs[0].get("device") or "cuda"
        out += ["", f"## gem-finetune on SST-2, one epoch, {device}", "",
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

    for section in (_cases_section, _weight_grad_section, _dispatch_section, _steps_section, _timings_section,
                    _finetune_section):
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


def _environment(dry_run: bool = False) -> dict:
    import torch
    env = {"device": DRY_DEVICE if dry_run else torch.cuda.get_device_name(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "dry_run": dry_run}
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


def _refusal(args) -> str | None:
    """Why the suite cannot run here, or None."""
    import torch
    if args.dry_run:
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "--all: unset TRITON_INTERPRET; the suite checks the compiled kernels (or use --dry-run)"
    if not torch.cuda.is_available():
        return f"--all needs a CUDA device; torch {torch.__version__} sees none (--dry-run runs it on CPU)"
    return None


def _stage_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    if dry_run:  # the Triton kernels run on CPU tensors under the interpreter
        env.update(TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    return env


def _stage_common(args) -> list[str]:
    common = ["--data", str(args.data.resolve()), "--finetune-examples", str(args.finetune_examples),
              "--step-steps", str(args.step_steps)]
    if args.model is not None:
        common += ["--model", str(args.model.resolve())]
    return common + (["--dry-run"] if args.dry_run else [])


def _run_stages(args, plan, run, jsonl, log_path, env) -> None:
    """Each stage of ``plan`` in its own process, cut at the suite's deadline; one record each."""
    deadline = time.monotonic() + args.total
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
                       "--run", run] + _stage_common(args)
                record = dict(run_stage(cmd, left, log, env), budget_s=round(left))
            append_jsonl(jsonl, {"run": run, "kind": "stage", "stage": name, **record})
            print(f"[{name}] {record['status']}" + (f" in {record['seconds']} s (budget {record['budget_s']} s)"
                                                     if "seconds" in record else f": {record['reason']}"), flush=True)
            if record["status"] in ("failed", "timed_out"):
                tail = Path(log_path).read_bytes()[offset:].decode(errors="replace").splitlines()[-15:]
                print("\n".join("    " + line for line in tail), flush=True)


def run_suite(args) -> int:
    refusal = _refusal(args)
    if refusal:
        print(f"gpu_check: error: {refusal}", file=sys.stderr)
        return 2
    results = results_dir(args).resolve()
    results.mkdir(parents=True, exist_ok=True)
    environment = _environment(args.dry_run)
    slug = device_slug(environment["device"])
    jsonl, log_path = results / "gpu-runs.jsonl", results / f"gpu-{slug}.log"
    run = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    plan = stage_plan(args)
    settings = {"budgets": dict(plan), "total_s": args.total, "data": str(args.data),
                "model": None if args.model is None else str(args.model), "finetune_examples": args.finetune_examples,
                "step_steps": args.step_steps, "dry_run": args.dry_run}
    append_jsonl(jsonl, {"run": run, "kind": "start", "environment": environment, "settings": settings})
    print(f"GPU suite {run} on {environment['device']}: stages {', '.join(n for n, _ in plan)}; "
          f"{args.total:.0f} s in all; records to {jsonl}", flush=True)
    start = time.monotonic()
    _run_stages(args, plan, run, jsonl, log_path, _stage_env(args.dry_run))
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
    if not args.dry_run:
        triton_cases.run_all("cuda", on_result=lambda name, r: emit({"item": name, **r}))
        return
    triton_cases.run_all("cpu", names=list(DRY_CASES), on_result=lambda name, r: emit({"item": name, **r}))
    start = time.perf_counter()
    shapes, dtypes, density = DRY_WEIGHT_GRAD_CASE
    try:
        import torch
        summary = triton_cases.check_weight_grad_configs("cpu", shapes, [getattr(torch, d) for d in dtypes],
                                                         density, seed=1)
        ok = True
    except Exception:  # reported as the case's result, as run_all does
        import traceback
        summary, ok = traceback.format_exc(limit=4), False
    emit({"item": "weight_grad_configs_tiny", "ok": ok, "summary": summary,
          "seconds": round(time.perf_counter() - start, 2)})


def copy_bandwidth(device: str = "cuda") -> float:
    """Bytes read + written per second of a device-to-device copy (median): 2 GiB of fp32 on CUDA,
    far beyond the L2; 64 MiB on the dry run's CPU."""
    import gpu_check
    import torch
    src = torch.randn(2**29 if device == "cuda" else 2**24, device=device)
    dst = torch.empty_like(src)
    bench = gpu_check.cuda_bench if device == "cuda" else gpu_check.cpu_bench
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms / 1e3)


def stage_kernel_timings(emit, args) -> None:
    import gpu_check
    device = "cpu" if args.dry_run else "cuda"
    bandwidth = copy_bandwidth(device)
    emit({"item": "copy_bandwidth", "bytes_per_s": bandwidth})
    total, count = (20_000, 4) if args.dry_run else (gpu_check.TOTAL_ELEMENTS, gpu_check.NUM_SEGMENTS)
    model = gpu_check.traffic_model(total=total, bandwidth=bandwidth)
    bench = gpu_check.cpu_bench if args.dry_run else gpu_check.cuda_bench
    for name, t in gpu_check.timings(device, total, count, bench).items():
        ideal = model["kernels"][name]["ideal_ms"]
        emit({"item": name, **t, "bytes": model["kernels"][name]["bytes"], "ideal_ms": ideal,
              "fraction_of_ideal": ideal / t["triton_ms"]})


def _swg_module():
    import gem_kernels.backends.triton  # noqa: F401  (the package imports the op's module)
    return sys.modules["gem_kernels.backends.triton.sparse_weight_grad"]


def _weight_grad_inputs(device, tokens, n_out, n_in, density):
    """bf16 X [T, in] and dY [T, out], k = density·out·in sorted random indices, one segment."""
    import torch
    gen = torch.Generator(device=device).manual_seed(n_out * n_in)
    x = torch.randn(tokens, n_in, device=device, generator=gen).to(torch.bfloat16)
    dy = torch.randn(tokens, n_out, device=device, generator=gen).to(torch.bfloat16)
    k = max(1, round(density * n_out * n_in))
    idx = torch.randperm(n_out * n_in, device=device, generator=gen)[:k].sort().values
    return x, dy, idx, torch.tensor([0, k], dtype=torch.int64, device=device)


def graph_bench(fn):
    """Median ms of ``fn`` replayed in a CUDA graph (no host overhead), or None if it cannot be captured."""
    import triton
    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    except Exception as error:  # noqa: BLE001  (recorded as missing; the eager time still decides)
        print(f"do_bench_cudagraph failed: {type(error).__name__}: {error}", flush=True)
        return None


def _weight_grad_fns(x, dy, idx, off) -> dict:
    """impl -> callable: the dense baseline, then each configuration of the kernel."""
    import torch
    swg = _swg_module()
    fns = {"dense": lambda: torch.mm(dy.t(), x).view(-1).index_select(0, idx)}
    for name in swg.CONFIGS:
        fns[name] = (lambda n=name: swg.sparse_weight_grad_with(n, [x], [dy], idx, off))
    return fns


def _weight_grad_model_ms(impl, tokens, n_out, n_in, k, bandwidth, sms):
    import gpu_check
    if impl == "dense":
        return gpu_check.dense_weight_grad_model(tokens, n_out, n_in, 2, bandwidth=bandwidth)["predicted_ms"]
    swg = _swg_module()
    config = swg.CONFIGS[impl]
    splits = swg.choose_splits(config, k, tokens, sms)
    return gpu_check.weight_grad_model(config, tokens, n_out, n_in, k, 2, splits, bandwidth)["predicted_ms"]


def stage_weight_grad_timings(emit, args) -> None:
    """Each configuration and the dense baseline at each density and shape (density by density,
    so that a stage cut short still leaves the dispatch rows of the bands it finished)."""
    import gpu_check
    import torch
    device = "cpu" if args.dry_run else "cuda"
    tokens, shapes = ((DRY_WEIGHT_GRAD_TOKENS, DRY_WEIGHT_GRAD_SHAPES) if args.dry_run
                      else (WEIGHT_GRAD_TOKENS, WEIGHT_GRAD_SHAPES))
    bench, graph = (gpu_check.cpu_bench, None) if args.dry_run else (gpu_check.cuda_bench, graph_bench)
    sms = _swg_module().FALLBACK_SMS if args.dry_run else torch.cuda.get_device_properties(0).multi_processor_count
    bandwidth = copy_bandwidth(device)
    emit({"item": "copy_bandwidth", "bytes_per_s": bandwidth, "sms": sms})
    device_name = DRY_DEVICE if args.dry_run else torch.cuda.get_device_name()
    items = []
    for density in WEIGHT_GRAD_DENSITIES:
        for n_out, n_in in shapes:
            x, dy, idx, off = _weight_grad_inputs(device, tokens, n_out, n_in, density)
            k = idx.numel()
            for impl, fn in _weight_grad_fns(x, dy, idx, off).items():
                item = {"item": f"{n_out}x{n_in} {density:g} {impl}", "T": tokens, "out": n_out, "in": n_in,
                        "dtype": "bfloat16", "density": density, "k": k, "impl": impl, "ms": bench(fn),
                        "graph_ms": graph(fn) if graph else None,
                        "model_ms": _weight_grad_model_ms(impl, tokens, n_out, n_in, k, bandwidth, sms)}
                emit(item)
                items.append(item)
        for row in dispatch_rows(items, device_name, args.run, dry_run=args.dry_run):
            if row["density_high"] == density:
                emit({"item": f"dispatch {row['band']}", **row})
                append_jsonl(args.jsonl.parent / DISPATCH_FILE, row)


# ---------------------------------------------------------------------------------------
# The dispatch table: sparse_weight_grad or dense dYᵀX + gather, per device, dtype, density band


def _shape_verdict(sparse: dict, dense: dict) -> dict:
    """Sparse wins a shape when it is faster eager and, where both were captured, in a CUDA graph."""
    graphs = sparse.get("graph_ms") is not None and dense.get("graph_ms") is not None
    wins = sparse["ms"] < dense["ms"] and (not graphs or sparse["graph_ms"] < dense["graph_ms"])
    return {"config": sparse["impl"], "sparse_ms": sparse["ms"], "dense_ms": dense["ms"],
            "sparse_graph_ms": sparse.get("graph_ms"), "dense_graph_ms": dense.get("graph_ms"),
            "sparse_wins": bool(wins), "basis": "eager+graph" if graphs else "eager"}


def _total(verdicts, key):
    values = [v[key] for v in verdicts]
    return None if any(v is None for v in values) else sum(values)


def _dispatch_row(items, band, device, run, dry_run, op_config):
    low, high = band
    by = {(i["out"], i["in"], i["impl"]): i for i in items if i["density"] == high and i.get("ms") is not None}
    shapes = sorted({(o, n) for o, n, _ in by})
    configs = sorted({impl for _, _, impl in by} - {"dense"})
    complete = [c for c in configs if all((o, n, c) in by for o, n in shapes)]
    if not shapes or op_config not in complete or not all((o, n, "dense") in by for o, n in shapes):
        return None
    total = {c: sum(by[(o, n, c)]["ms"] for o, n in shapes) for c in complete}
    best = min(complete, key=total.get)
    verdicts = {f"{o}x{n}": _shape_verdict(by[(o, n, op_config)], by[(o, n, "dense")]) for o, n in shapes}
    wins = all(v["sparse_wins"] for v in verdicts.values())
    first = by[(shapes[0][0], shapes[0][1], op_config)]
    return {"device": device, "dtype": first["dtype"], "band": f"({low:g}, {high:g}]", "density_low": low,
            "density_high": high, "T": first["T"], "choice": "sparse" if wins else "dense", "config": op_config,
            "best_config": best, "best_config_ms": total[best],
            **{key: _total(verdicts.values(), key) for key in ("sparse_ms", "dense_ms", "sparse_graph_ms",
                                                                "dense_graph_ms")},
            "basis": "eager+graph" if all(v["basis"] == "eager+graph" for v in verdicts.values()) else "eager",
            "shapes": verdicts, "run": run, "dry_run": dry_run}


def dispatch_rows(items, device, run, dry_run=False, op_config=None) -> list[dict]:
    """One row per density band that was measured at its upper edge on every shape, dense and the
    configuration the op runs (``op_config``, default the kernel's ``DEFAULT_CONFIG``): "sparse"
    only if that configuration beat dense on every shape (eager and, where captured, in a CUDA
    graph); the times are totals over the shapes, each shape's in ``shapes``. ``best_config`` is
    the configuration with the least total time: one other than the op's is a reason to change
    the kernel's default, not a verdict the layer could act on."""
    op_config = op_config or _swg_module().DEFAULT_CONFIG
    rows = [_dispatch_row(items, band, device, run, dry_run, op_config) for band in DISPATCH_BANDS]
    return [r for r in rows if r is not None]


def dispatch_choice(table: dict, device: str, dtype: str, density: float) -> tuple[str, str | None]:
    """The layer's own lookup (gem_kernels.weight_grad_dispatch) on ``table``."""
    from gem_kernels.weight_grad_dispatch import table_choice
    return table_choice(table.get("rows", []), device, dtype, density)


def merge_dispatch(table_path: Path, jsonl_path: Path) -> int:
    """Folds the measured rows of ``jsonl_path`` (dry-run rows and torn lines skipped) into the table
    at ``table_path``: a row replaces the one of the same device, dtype and band. Returns the count."""
    table = json.loads(Path(table_path).read_text())
    keyed = {(r["device"], r["dtype"], r["band"]): r for r in table.get("rows", [])}
    merged = 0
    for line in Path(jsonl_path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("dry_run", True) or "choice" not in row:
            continue
        keyed[(row["device"], row["dtype"], row["band"])] = row
        merged += 1
    table["rows"] = sorted(keyed.values(), key=lambda r: (r["device"], r["dtype"], r["density_high"]))
    Path(table_path).write_text(json.dumps(table, indent=1) + "\n")
    return merged


# ---------------------------------------------------------------------------------------
# The training step and the fine-tuning


def _dry_compile_backend() -> None:
    """The dry run compiles with aot_eager: dynamo's capture and AOT autograd, without inductor's
    code generation, which would take minutes per method on two CPU cores."""
    import functools

    import torch
    torch.compile = functools.partial(torch.compile, backend="aot_eager")


def _step_stage(emit, args, methods, compile, dry_model=DRY_STEP_MODEL) -> None:
    import traceback

    import step_cost
    import torch
    model, device, steps = (dry_model, "cpu", 1) if args.dry_run else (STEP_MODEL, "cuda", args.step_steps)
    if compile and args.dry_run:
        _dry_compile_backend()
    for method in methods:
        error = None
        try:
            row = step_cost.measure(model, method, steps, device=device, compile=compile,
                                    warmup=1 if args.dry_run else None)
            emit({"item": method, **row})
        except Exception:  # one method's failure (out of memory, a compile error) does not stop the others
            error = traceback.format_exc(limit=6)
        if error is not None:  # outside the except block, whose traceback holds the failed row's tensors
            emit({"item": method, "method": method, "error": error})
            step_cost.release(device, compile)
            if device == "cuda":
                torch.cuda.empty_cache()


def stage_step_eager(emit, args) -> None:
    _step_stage(emit, args, STEP_EAGER_METHODS, compile=False)


def stage_step_compiled(emit, args) -> None:
    _step_stage(emit, args, STEP_COMPILED_METHODS, compile=True)


def _torchao_importable() -> bool:
    """torchao (the NF4 base) importable, installed from the carried wheel where it is missing (the
    lent machine has no torchao and no internet: device_carry/wheels holds it)."""
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        wheels = sorted(TORCHAO_WHEELS.glob("torchao-*.whl"))
        if not wheels:
            return False
        target = ROOT / "build" / "torchao"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        str(wheels[-1])], check=True)
        sys.path.insert(0, str(target))
    return importlib.util.find_spec("torchao") is not None


def stage_step_nf4(emit, args) -> None:
    """The 953M step on a 4-bit base: bf16 full fine-tuning, QLoRA, GEM on NF4 (step_cost's)."""
    if not _torchao_importable():
        emit({"item": "torchao", "error": f"torchao is not installed and no wheel is in {TORCHAO_WHEELS}"})
        return
    _step_stage(emit, args, NF4_METHODS, compile=False, dry_model=DRY_NF4_MODEL)


DRY_FINETUNE = ["--batch-size", "16", "--max-length", "16", "--calibration-batches", "1", "--eval-examples", "32"]


def finetune_command(data: Path, out: Path, examples: int, model: Path | None, dry_run: bool = False) -> list[str]:
    """gem-finetune on SST-2, gem and full, one epoch, seed 0: on CUDA, or on CPU with tiny batches
    (32 examples, 32 evaluated) for the dry run."""
    cmd = [sys.executable, "-m", "gem_finetune", "--task-dir", str(data / "SST-2"), "--method", "gem", "full",
           "--device", "cpu" if dry_run else "cuda", "--epochs", "1", "--seeds", "0", "--train-examples",
           str(32 if dry_run else examples), "--out", str(out)]
    cmd += DRY_FINETUNE if dry_run else ["--batch-size", "32", "--max-length", "64", "--calibration-batches", "8"]
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


def tiny_sst2(folder: Path) -> Path:
    """A made-up SST-2 folder (train.tsv, dev.tsv, as GLUE ships them): the dry run's data where no
    GLUE folder is at hand."""
    words = "good bad great awful fine terrible movie film plot actors boring lovely".split()
    (folder / "SST-2").mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", 96), ("dev.tsv", 48)):
        lines = ["sentence\tlabel"] + [" ".join(words[(7 * r + 3 * j) % len(words)] for j in range(6)) + f"\t{r % 2}"
                                       for r in range(rows)]
        (folder / "SST-2" / name).write_text("\n".join(lines) + "\n")
    return folder


def stage_finetune(emit, args) -> None:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="gpu-finetune-") as tmp:
        data = args.data
        if args.dry_run and not (data / "SST-2" / "train.tsv").is_file():
            data = tiny_sst2(Path(tmp) / "glue")
            print(f"finetune: no SST-2 in {args.data}; the dry run makes up {data / 'SST-2'}", flush=True)
        if not (data / "SST-2" / "train.tsv").is_file():
            raise SystemExit(f"finetune: {data / 'SST-2'} has no train.tsv (see --data)")
        cmd = finetune_command(data, Path(tmp) / "out", args.finetune_examples, args.model, args.dry_run)
        print("$ " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT)  # its output goes to the suite's log as it comes
        for run in finetune_runs(Path(tmp) / "out"):
            emit({"item": "run", **run})
        emit({"item": "command", "argv": cmd[1:], "rc": proc.returncode})
        if proc.returncode != 0:
            raise SystemExit(f"finetune: gem-finetune exited with {proc.returncode}")


STAGE_FUNCTIONS = {"cases": stage_cases, "weight_grad_timings": stage_weight_grad_timings,
                   "step_eager": stage_step_eager, "step_nf4": stage_step_nf4,
                   "kernel_timings": stage_kernel_timings, "finetune": stage_finetune,
                   "step_compiled": stage_step_compiled}


def run_one_stage(args) -> int:
    def emit(record: dict) -> None:
        append_jsonl(args.jsonl, {"run": args.run, "kind": "item", "stage": args.stage, **record})
    STAGE_FUNCTIONS[args.stage](emit, args)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.merge_dispatch is not None:
        merged = merge_dispatch(args.table, args.merge_dispatch)
        print(f"merged {merged} measured rows of {args.merge_dispatch} into {args.table}")
        return 0
    if args.stage:
        if args.jsonl is None or args.run is None:
            print("gpu_suite: error: --stage needs --jsonl and --run", file=sys.stderr)
            return 2
        return run_one_stage(args)
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
