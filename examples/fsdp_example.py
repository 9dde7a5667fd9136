"""SparseAdamW on an FSDP2 (``fully_shard``) model: each rank keeps the optimizer state of the
selected entries in its own row blocks.

    torchrun --nproc_per_node 2 examples/fsdp_example.py                  # a small MLP, GEM
    torchrun --nproc_per_node 2 examples/fsdp_example.py --selector id3

CPU and gloo (``--backend nccl`` with one GPU per rank works the same way). Data is synthetic:
each step draws one global batch from a seeded generator and each rank takes its rows. At the
end every rank reports its optimizer state bytes next to those of ``torch.optim.AdamW`` on the
same FSDP2 model, and the checkpoint is written the supported way: the model through
``torch.distributed.checkpoint``, the optimizer as one ``opt.state_dict()`` per rank.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import gem_kernels


def mlp(mesh):
    """128 -> 512 -> 512 -> 512 -> 10, each Linear sharded by rows: the hidden weights are
    sparse (590k entries), the biases and the new head dense (6.7k)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 512),
                                torch.nn.GELU(), torch.nn.Linear(512, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 10))
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for m in linears:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    groups = [{"params": [m.weight for m in linears[:-1]], "sparse": True},
              {"params": [m.bias for m in linears] + [linears[-1].weight], "sparse": False}]
    return model, groups


def batch(step: int, rank: int, world: int, rows: int = 16):
    g = torch.Generator().manual_seed(10_000 + step)
    x, y = torch.randn(rows * world, 128, generator=g), torch.randint(0, 10, (rows * world,), generator=g)
    return x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]


def state_bytes(opt) -> int:
    """This rank's optimizer state (the local blocks of DTensor states)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if isinstance(v, DTensor) else v
                total += v.numel() * v.element_size()
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--selector", choices=["gem", "id3"], default="gem")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--density", type=float, default=1e-3)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--save", default=None, help="a folder for the checkpoint")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    model, groups = mlp(mesh)
    selector = gem_kernels.ID3(total_steps=4) if args.selector == "id3" else gem_kernels.GEM()
    opt = gem_kernels.SparseAdamW(groups, lr=1e-3, density=args.density, selector=selector,
                                  calibration_steps=None if args.selector == "id3" else 4)
    for step in range(args.steps):
        x, y = batch(step, rank, world)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        phase = opt.phase
        opt.step()
        opt.zero_grad()
        if rank == 0:
            print(f"step {step:2d}  {phase:11s}  loss {loss.item():.4f}")

    adamw_model, _ = mlp(mesh)  # torch's AdamW on the same FSDP2 model, one step for its state
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=1e-3)
    x, y = batch(0, rank, world)
    torch.nn.functional.cross_entropy(adamw_model(x), y).backward()
    adamw.step()
    sparse_bytes = sum(state_bytes_of(opt.state[p]) for g in opt.param_groups if g["sparse"] for p in g["params"])
    row = torch.tensor([opt.selected_count(), sparse_bytes, state_bytes(opt), state_bytes(adamw)])
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row)
    if rank == 0:
        k = sum(int(r[0]) for r in rows)
        print(f"k = {k} selected entries over {world} ranks")
        for r, (kr, s, o, a) in enumerate(r.tolist() for r in rows):
            print(f"rank {r}: k_rank {kr}, sparse state {s:,} B, all optimizer state {o:,} B "
                  f"(dense groups included); AdamW under FSDP2 {a:,} B: {a / o:.0f}x less")

    if args.save:
        import torch.distributed.checkpoint as dcp
        dcp.save({"model": model.state_dict()}, checkpoint_id=args.save)
        torch.save(opt.state_dict(), os.path.join(args.save, f"optimizer-rank{rank}.pt"))
    dist.destroy_process_group()


def state_bytes_of(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


if __name__ == "__main__":
    main()
