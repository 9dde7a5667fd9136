"""Host work of SparseAdamW per training step: ops dispatched, host syncs and time in ``step()``,
and ops dispatched in the backward (autograd's alone: the optimizer installs no hook), on MiniLM-L6.

    python benchmarks/step_overhead.py [--steps 3] [--batch 8] [--length 32] [--json out.json]

On a GPU every dispatched op is a kernel launch and every sync stalls the host, so these counts
are what makes a small model host-bound; on CPU they are counted exactly, whatever the machine's
load. Configurations: GEM at density 1e-3 of the targeted weights, on query/value (``qv``) or on
every linear layer of the encoder (``all-linear``), after a one-step calibration; the counted
steps are training steps after one warm-up step.

* ``ops``: aten ops dispatched (a ``TorchDispatchMode`` counts each call);
* ``syncs``: the calls that read a tensor's value on the host (``aten._local_scalar_dense``, as
  ``.item()``, ``bool(t)`` and ``int(t)`` do; ``Tensor.tolist``; ``aten.nonzero``), each a
  device-to-host wait on CUDA;
* ``step_ms``: wall time of ``opt.step()`` (CPU: host work plus the small update kernel).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from its package, never a download

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gem_kernels import SparseAdamW
from gem_kernels.integrations.transformers import param_groups

TARGETS = {"qv": ["query", "value"],
           "all-linear": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                          "output.dense"]}
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}


class HostWork(TorchDispatchMode):
    """Counts dispatched ops and host syncs while active."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func in SYNC_OPS
        return func(*args, **(kwargs or {}))


class ToList(TorchFunctionMode):
    """Counts ``Tensor.tolist`` calls, which read values on the host without dispatching an op."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.Tensor.tolist
        return func(*args, **(kwargs or {}))


def _model():
    from transformers import AutoModel

    from gem_finetune.models import default_model_dir
    torch.manual_seed(0)
    return AutoModel.from_pretrained(default_model_dir(), dtype=torch.float32)


def _batch(model, batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=gen)


def _loss(model, ids):
    return model(input_ids=ids).last_hidden_state.float().pow(2).mean()


def measure(targets: str, steps: int, batch: int, length: int) -> dict:
    model = _model()
    opt = SparseAdamW(param_groups(model, sparse=TARGETS[targets]), lr=1e-3, density=1e-3,
                      calibration_steps=1)
    for seed in range(2):  # calibration (selects), then one warm-up training step
        _loss(model, _batch(model, batch, length, seed)).backward()
        opt.step()
        opt.zero_grad()
    assert opt.phase == "training"
    rows = []
    for seed in range(2, 2 + steps):
        loss = _loss(model, _batch(model, batch, length, seed))
        backward, step, tolist = HostWork(), HostWork(), ToList()
        with backward:
            loss.backward()
        with step, tolist:
            start = time.perf_counter()
            opt.step()
            elapsed = time.perf_counter() - start
        opt.zero_grad()
        rows.append({"backward_ops": backward.ops, "backward_syncs": backward.syncs, "step_ops": step.ops,
                     "step_syncs": step.syncs + tolist.calls, "step_ms": elapsed * 1e3})
    out = {"targets": targets, "sparse_params": sum(1 for _ in opt.selected_entries()),
           "selected": opt.selected_count()}
    for key in rows[0]:
        out[key] = statistics.median(r[key] for r in rows)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(t, args.steps, args.batch, args.length) for t in TARGETS]
    print("| targets | sparse params | selected | step ops | step syncs | step ms | backward ops | backward syncs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['targets']} | {r['sparse_params']} | {r['selected']:,} | {r['step_ops']:.0f} | "
              f"{r['step_syncs']:.0f} | {r['step_ms']:.1f} | {r['backward_ops']:.0f} | {r['backward_syncs']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
