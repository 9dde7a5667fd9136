"""Roofline report: runs the benchmark suites (or reads their JSON), measures this machine's
copy bandwidth in the same run, and writes one table per op to benchmarks/results/<device>.md.

    python benchmarks/report.py            # full sizes (every case and density)
    python benchmarks/report.py --quick    # the target sizes only, few rounds (< 3 min on 2 cores)
    python benchmarks/report.py --json run.json   # tables from an earlier --benchmark-json
    python benchmarks/report.py --threads 1       # pin torch and the C++ kernels to 1 thread

The file is benchmarks/results/<device>[-quick][-<N>thread].md, so a quick or pinned run never
overwrites the full table. On a machine shared with other busy processes, OpenMP regions wait
for a time slice on every core they use (milliseconds per region); --threads 1 avoids that.

Achieved bandwidth is bytes moved (counted as docs/ARCHITECTURE.md, "How work is counted", says;
see _common.py) over the
median time, shown as a share of the measured copy bandwidth (read + write of a large fp32
buffer), so a figure near 100 % means the op runs at the memory's speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

CACHE_VARIANTS = ("cold cache", "warm cache")  # sparse_adamw_'s variants (bench_sparse_adamw.py)
OP_ORDER = ("layer_stats", "ratio_topk", "sparse_adamw_", "optimizer_step")
COPY_BUFFER_BYTES = 256 << 20  # far beyond any last-level cache, so the copy streams from memory


# ---------------------------------------------------------------------------------------
# Machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def file_stem(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def copy_bandwidth(device: str, repeats: int = 15) -> float:
    """Median bytes/s of dst.copy_(src) on a large fp32 buffer; bytes = one read + one write."""
    n = COPY_BUFFER_BYTES // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # the first copies fault the pages in
            times.append(time.perf_counter() - start)
    times.sort()
    return 2 * n * 4 / times[len(times) // 2]


# ---------------------------------------------------------------------------------------
# Running the suites


def run_suites(mode: str, json_path: Path) -> float:
    """Runs every suite under pytest-benchmark; returns the wall time. Raises if any fails,
    since a benchmark whose result is wrong has no time worth reporting."""
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "--benchmark-only", f"--bench-mode={mode}",
           f"--benchmark-json={json_path}", "-p", "no:cacheprovider"]
    print("running:", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the benchmark suites failed (pytest exit code {done.returncode})")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------
# Tables


def fmt_time(seconds) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def size_label(info) -> str:
    n = info["numel"]
    count = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"
    return f"{info['case']} ({info['segments']}×, {count})"


def load_rows(data) -> list[dict]:
    rows = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info") or {})
        if "op" not in info:
            continue
        info["median"] = bench["stats"]["median"]
        info["rounds"] = bench["stats"]["rounds"]
        rows.append(info)
    return rows


def pairs(rows, op, device):
    """(case, density, variant, ours or None, baseline or None) rows of an op's table. A
    baseline with density None serves every density of its case, and one with no variant
    (e.g. "cold cache") every variant."""
    ours = [r for r in rows if r["op"] == op and r["device"] == device and r["role"] == "ours"]
    bases = [r for r in rows if r["op"] == op and r["device"] == device and r["role"] == "baseline"]
    every = ours + bases
    out = []
    for case in dict.fromkeys(r["case"] for r in every):
        here = [r for r in every if r["case"] == case]
        densities = sorted({r["density"] for r in here if r["density"] is not None}) or [None]
        variants = list(dict.fromkeys(r.get("variant") for r in here if r.get("variant"))) or [None]
        for density in densities:
            for variant in variants:
                ours_here = [r for r in ours if r["case"] == case and r["density"] == density
                             and r.get("variant") == variant] or [None]
                bases_here = [b for b in bases if b["case"] == case and b["density"] in (density, None)
                              and b.get("variant") in (variant, None)] or [None]
                out += [(case, density, variant, o, b) for o in ours_here for b in bases_here
                        if o is not None or b is not None]
    return out


def op_table(rows, op, device, copy_bw) -> list[str]:
    lines = [f"### {op} ({device})", "",
             "| size | density | ours | ours median | baseline | baseline median | speed-up "
             "| bytes moved (ours) | ours GB/s | % of copy BW |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    found = pairs(rows, op, device)
    for case, density, variant, o, b in found:
        info = o or b
        speedup = f"{b['median'] / o['median']:.1f}x" if o and b else "—"
        if o:
            gbs = o["bytes"] / o["median"]
            achieved = f"{gbs / 1e9:.1f}", f"{100 * gbs / copy_bw:.0f} %"
            if op == "ratio_topk":
                passes = o.get("passes")
                achieved = (achieved[0], achieved[1] + (f" ({100 * gbs * passes / copy_bw:.0f} % per pass, "
                                                        f"{passes} passes)" if passes else " (1-pass floor)"))
        else:
            achieved = "—", "—"
        lines.append(" | ".join([
            f"| {size_label(info)}" + (f", {variant}" if variant else ""),
            f"{density:g}" if density is not None else "—",
            o["impl"] if o else "(none live)", fmt_time(o and o["median"]),
            b["impl"] if b else "—", fmt_time(b and b["median"]), speedup,
            fmt_bytes(o["bytes"]) if o else "—", achieved[0], achieved[1]]) + " |")
    if not found:
        lines.append("| (not measured) | | | | | | | | | |")
    return lines + [""]


def find(rows, *, op, device, case, density, role, impl, variant=None):
    for r in rows:
        if (r["op"], r["device"], r["case"], r["role"], r["impl"]) == (op, device, case, role, impl) \
                and r["density"] in (density, None) and r.get("variant") in (variant, None):
            return r
    return None


class _Targets:
    """Measurements of one device's rows at the medium size, density 1e-3, checked against targets:
    each method returns ``(status, measured value or None)``."""
    case, density = "medium", 1e-3

    def __init__(self, rows, copy_bw, device):
        self.rows, self.copy_bw, self.device = rows, copy_bw, device
        self.ours_impl = {"cpu": "cpu", "cuda": "triton"}[device]

    def get(self, op, role, impl, variant=None):
        return find(self.rows, op=op, device=self.device, case=self.case, density=self.density, role=role,
                    impl=impl, variant=variant)

    def speedup(self, op, baseline, at_least, variant=None):
        o, b = self.get(op, "ours", self.ours_impl, variant), self.get(op, "baseline", baseline, variant)
        if not (o and b):
            return "not measured", None
        ratio = b["median"] / o["median"]
        return ("met" if ratio >= at_least else "MISSED"), f"{ratio:.1f}x"

    def bandwidth(self, op, at_least_pct, per_pass=False):
        o = self.get(op, "ours", self.ours_impl)
        if not o:
            return "not measured", None
        share = 100 * o["bytes"] / o["median"] / self.copy_bw
        if per_pass:
            if not o.get("passes"):
                return "unknown", f"{share:.0f} % of the 1-pass floor; the backend states no pass count"
            share *= o["passes"]
        return ("met" if share >= at_least_pct else "MISSED"), f"{share:.0f} % of copy BW"

    def floor_ratio(self, op, at_most, variant=None):
        o = self.get(op, "ours", self.ours_impl, variant)
        if not o:
            return "not measured", None
        ratio = o["median"] / (o["bytes"] / self.copy_bw)
        return ("met" if ratio <= at_most else "MISSED"), f"{ratio:.1f}x its byte floor"


def targets(rows, copy_bw, device) -> list[str]:
    """The stated targets at the medium size, density 1e-3, and whether each is met."""
    t = _Targets(rows, copy_bw, device)
    case, density, ours_impl = t.case, t.density, t.ours_impl
    speedup, bandwidth, floor_ratio = t.speedup, t.bandwidth, t.floor_ratio

    if device == "cpu":
        checks = []
        for cache in CACHE_VARIANTS:
            checks += [
                (f"C++ sparse_adamw_ ≥ 5x faster than the torch reference ({cache})",
                 speedup("sparse_adamw_", "reference", 5, cache)),
                (f"C++ sparse_adamw_ ≥ 100x faster than torch.optim.AdamW (foreach) over the whole "
                 f"tensors ({cache})", speedup("sparse_adamw_", "torch_adamw_foreach", 100, cache))]
        checks += [
            ("ratio_topk ≥ 2x faster than score + torch.topk", speedup("ratio_topk", "torch_score_topk", 2)),
            ("layer_stats ≥ 50 % of copy bandwidth", bandwidth("layer_stats", 50)),
        ]
    else:
        checks = [
            ("layer_stats ≥ 70 % of copy bandwidth", bandwidth("layer_stats", 70)),
            ("ratio_topk ≥ 70 % of copy bandwidth per pass", bandwidth("ratio_topk", 70, per_pass=True)),
            *[(f"sparse_adamw_ within 3x of its byte floor ({cache})",
               floor_ratio("sparse_adamw_", 3, cache)) for cache in CACHE_VARIANTS],
        ]
    lines = [f"### Targets ({device}, {case} size, density {density:g}, backend {ours_impl})", "",
             "| target | measured | status |", "|---|---|---|"]
    for name, (status, value) in checks:
        lines.append(f"| {name} | {value or '—'} | **{status}** |")
    return lines + [""]


MEMORY_COLUMNS = (  # (row key, column title, formatter) of minilm_memory.run_benchmark's rows
    ("method", "method", str),
    ("trained_entries", "trained entries", lambda n: f"{n:,}"),
    ("optimizer_state_bytes", "optimizer state MiB", lambda n: f"{n / 2**20:.2f}"),
    ("resident_bytes", "resident MiB", lambda n: f"{n / 2**20:.1f}"),
    ("step_extra_peak_bytes", "step extra MiB", lambda n: f"{n / 2**20:.1f}"),
    ("peak_step_bytes", "peak MiB", lambda n: f"{n / 2**20:.1f}"),
    ("median_step_s", "median step", fmt_time),
    ("delta_file_bytes", "delta file KiB", lambda n: "—" if n is None else f"{n / 1024:.1f}"),
)


def memory_section(quick: bool) -> list[str]:
    """The MiniLM memory table from benchmarks/minilm_memory.py (its module doc says what each
    column measures), when that module is there."""
    # Quick: one calibration batch instead of four; the budget, hence the memory, is the same.
    steps, warmup, calibration = (1, 1, 1) if quick else (5, 2, 4)
    lines = ["## Memory: MiniLM-L6 fine-tuning (benchmarks/minilm_memory.py)", "",
             f"`minilm_memory.run_benchmark(steps={steps}, warmup={warmup}, "
             f"calibration_batches={calibration})`: full AdamW vs "
             "SparseAdamW (GEM, 0.1 %) vs LoRA r=8 on real SST-2 batches; see that file for what "
             "each column counts.", ""]
    if not (HERE / "minilm_memory.py").exists():
        return lines + ["Not available: benchmarks/minilm_memory.py is not in this checkout.", ""]
    try:
        import minilm_memory
        start = time.perf_counter()
        rows = minilm_memory.run_benchmark(steps=steps, warmup=warmup, calibration_batches=calibration)
        seconds = time.perf_counter() - start
    except Exception as error:  # reported in the file, not hidden: the op tables still stand
        return lines + [f"Not available: minilm_memory failed with {type(error).__name__}: {error}", ""]
    lines += ["| " + " | ".join(title for _, title, _ in MEMORY_COLUMNS) + " |",
              "|" + "---|" * len(MEMORY_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _, fmt in MEMORY_COLUMNS) + " |")
    return lines + ["", f"(memory benchmark wall time: {seconds:.0f} s)", ""]


def render(rows, device, copy_bw, *, mode, command, suite_seconds, memory) -> str:
    import gem_kernels
    lines = [
        f"# gem_kernels benchmarks on {device_name(device)} ({device})", "",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- command: `{command}` (mode {mode})",
        f"- torch {torch.__version__}, python {platform.python_version()}, "
        f"gem_kernels backends {gem_kernels.live_backends()}",
        f"- threads: torch.get_num_threads() = {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}, CPUs = {os.cpu_count()}",
        f"- measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (median of `dst.copy_(src)`, "
        f"{COPY_BUFFER_BYTES >> 20} MiB fp32, bytes = read + write)",
        f"- suites' wall time: {suite_seconds:.0f} s" if suite_seconds is not None
        else "- suites: read from an earlier JSON (the copy bandwidth above is measured now)",
        "- medians over the timed rounds; speed-up = baseline median / ours; fp32 tensors; "
        "`ours` are the backend modules called directly (ops.py's input checks excluded)",
        "- bytes moved (docs/ARCHITECTURE.md, 'How work is counted'): layer_stats one read of g and w; "
        "ratio_topk one read of g and "
        "w plus the index writes (its floor; a backend making several passes reads more); "
        "sparse_adamw_ per entry the index, gathered grad, m and v read + written, param read + written; "
        "optimizer_step the same for every selected entry (plus dense AdamW on the 1-D tensors). "
        "Scattered accesses really move whole 64-byte cache lines, so with cold caches "
        "sparse_adamw_'s true traffic is several times the counted bytes", "",
    ]
    lines += targets(rows, copy_bw, device)
    for op in OP_ORDER:
        if any(r["op"] == op and r["device"] == device for r in rows):
            lines += op_table(rows, op, device, copy_bw)
    if memory is not None:
        lines += memory
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="target sizes only, few rounds")
    parser.add_argument("--json", type=Path, help="read this pytest-benchmark JSON instead of running")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder for <device>.md")
    parser.add_argument("--no-memory", action="store_true", help="skip the MiniLM memory table")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the C++ kernels "
                        "(OMP_NUM_THREADS for the suites); default: torch's default")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the suites' subprocess inherits it
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/report.py", *(argv if argv is not None else sys.argv[1:])])
    mode = "quick" if args.quick else "full"

    suite_seconds = None
    if args.json:
        data = json.loads(args.json.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            json_path = Path(tmp) / "bench.json"
            suite_seconds = run_suites(mode, json_path)
            data = json.loads(json_path.read_text())
    rows = load_rows(data)
    memory = None if args.no_memory else memory_section(args.quick)

    args.out.mkdir(parents=True, exist_ok=True)
    for device in dict.fromkeys(r["device"] for r in rows):
        if device == "cuda" and not torch.cuda.is_available():
            # The copy bandwidth must come from the machine that ran the suites.
            print("skipping the cuda rows: no CUDA device here to measure copy bandwidth on")
            continue
        bw = copy_bandwidth(device)
        text = render(rows, device, bw, mode=mode, command=command, suite_seconds=suite_seconds,
                      memory=memory)
        print(text)
        path = args.out / (file_stem(device_name(device)) + ("-quick" if args.quick else "")
                           + (f"-{args.threads}thread" if args.threads else "") + ".md")
        path.write_text(text + "\n")
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
