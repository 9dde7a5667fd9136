"""sparse_weight_grad: the selected entries of each segment's dW = dYᵀ X, one launch for all.

Each program takes BLOCK_E consecutive selected entries of one segment and walks T in chunks of
BLOCK_T: a [BLOCK_E, BLOCK_T] tile of X[t, i] and one of dY[t, o] are loaded, widened to fp32
(exact), multiplied and summed over t into one fp32 accumulator per entry; nothing is narrowed.
The programs of segment l start at block_start[l], computed on the device from ``offsets``, so
the host never reads the per-segment counts (that would wait on the GPU); the program finds its
segment by a binary search of block_start. With one segment per program, its sizes, addresses
and dtypes are scalars: each tile load takes one dtype path and needs one address per element.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dtype_code, find_segment, int_table, load_f32, new_output

# Launch settings. The loads are gathers (one element per lane and t: a program's entries sit in
# scattered columns), so what matters is how many are in flight per SM. A 32 x 32 tile at 4 warps
# is 8 elements of X and 8 of dY per thread; ptxas then needs 128 registers and no stack on sm_80
# and sm_90 (64 x 32 needed 254, 16 per thread). 32 entries per program also keeps a few
# programs per segment at density 1e-3 (a 384 x 384 layer has 147 entries). Entries of one row o
# read the same dY element, which the L1 serves. Chosen from register counts; not yet timed on a GPU.
BLOCK_E = 32
BLOCK_T = 32
NUM_WARPS = 4
# Multiply-adds may fuse into FMAs (stated, as the default is changing in Triton 3.10): the sums are
# only promised to fp32 rounding, and a fused step rounds once instead of twice.
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}

TABLE_COLS = tl.constexpr(7)  # X address, dY address, X dtype code, dY dtype code, T, in, out


@triton.jit
def _sparse_weight_grad_kernel(table, offsets, block_start, num_segments, indices, out,
                               BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr):
    # Programs are cut per segment (block_start[l] = programs before segment l), so a program's
    # sizes, addresses and dtypes are scalars and each tile load takes one path.
    pid = tl.program_id(0)
    seg = find_segment(block_start, num_segments, pid)
    first = tl.load(offsets + seg) + (pid - tl.load(block_start + seg)).to(tl.int64) * BLOCK_E
    end = tl.load(offsets + seg + 1)
    if first >= end:  # the grid's spare programs (the host does not know the per-segment counts)
        return
    row = table + seg * TABLE_COLS
    x_base = tl.load(row)
    dy_base = tl.load(row + 1)
    x_code = tl.load(row + 2)
    dy_code = tl.load(row + 3)
    tokens = tl.load(row + 4)
    n_in = tl.load(row + 5)
    n_out = tl.load(row + 6)

    entry = first + tl.arange(0, BLOCK_E)
    active = entry < end
    flat = tl.load(indices + entry, mask=active, other=0)
    o = flat // n_in
    i = flat - o * n_in
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        live = active[:, None] & (t[None, :] < tokens)
        x = load_f32(x_base, t[None, :] * n_in + i[:, None], live, x_code)
        dy = load_f32(dy_base, t[None, :] * n_out + o[:, None], live, dy_code)
        acc += tl.sum(x * dy, axis=1)
    tl.store(out + entry, acc, mask=active)


def sparse_weight_grad(inputs, grad_outputs, indices, offsets):
    num_selected = indices.numel()
    device = indices.device
    out = new_output((num_selected,), torch.float32, device)
    if num_selected == 0:
        return out
    rows = [[x.data_ptr(), dy.data_ptr(), dtype_code(x), dtype_code(dy), x.shape[0], x.shape[1], dy.shape[1]]
            for x, dy in zip(inputs, grad_outputs)]
    table = int_table(rows, device)
    # Programs per segment from the device offsets, without reading them on the host: the grid
    # is sized for the worst case (every segment's last block partly filled) and spare
    # programs return at once.
    counts = offsets[1:] - offsets[:-1]
    block_start = torch.zeros(len(inputs) + 1, dtype=torch.int64, device=device)
    block_start[1:] = torch.cumsum((counts + BLOCK_E - 1) // BLOCK_E, 0)
    grid = (triton.cdiv(num_selected, BLOCK_E) + len(inputs),)
    _sparse_weight_grad_kernel[grid](table, offsets, block_start, len(inputs), indices, out,
                                     BLOCK_E=BLOCK_E, BLOCK_T=BLOCK_T, **OPTIONS)
    return out


def compile_configs():
    """Every (kernel, signature, constexprs, compile options) the host function can launch."""
    signature = {"table": "*i64", "offsets": "*i64", "block_start": "*i64", "num_segments": "i32",
                 "indices": "*i64", "out": "*fp32", "BLOCK_E": "constexpr", "BLOCK_T": "constexpr"}
    return [(_sparse_weight_grad_kernel, signature, {"BLOCK_E": BLOCK_E, "BLOCK_T": BLOCK_T}, OPTIONS)]
