"""layer_stats: per-segment [Σs, Σs², Σ s·ln s, max s] in one pass over g and w.

Stage 1 (one launch, all segments): each program reduces a chunk of one segment to four fp32
partials. Stage 2 (one launch): one program per segment adds its partials in fp64 in block
order. No float atomics, so the same inputs give the same bits every run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_starts, dtype_code, find_segment, int_table, load_f32, new_output, ratio_score

# Launch settings. TILE=1024 with 4 warps gives each thread 8 contiguous elements (two 16-byte
# loads per fp32 tensor); TILES=8 tiles per program amortise the segment lookup and the partial
# store over 8192 elements while keeping ~12k programs for 100M elements (many waves).
TILE = 1024
TILES = 8
CHUNK = TILE * TILES
NUM_WARPS = 4
# Stage 2 reads partials this many rows at a time; one small program per segment.
FINISH_ROWS = 256
FINISH_WARPS = 4

TABLE_COLS = tl.constexpr(5)  # g address, w address, numel, g dtype code, w dtype code


@triton.jit
def _partials_kernel(table, block_start, num_segments, partials, eps, exponent: tl.float64,
                     TILE: tl.constexpr, TILES: tl.constexpr, HAS_EXPONENT: tl.constexpr):
    pid = tl.program_id(0)
    seg = find_segment(block_start, num_segments, pid)
    row = table + seg * TABLE_COLS
    g_base = tl.load(row)
    w_base = tl.load(row + 1)
    numel = tl.load(row + 2)
    g_code = tl.load(row + 3)
    w_code = tl.load(row + 4)
    first = (pid - tl.load(block_start + seg)).to(tl.int64) * (TILE * TILES)
    acc_s = tl.zeros([TILE], dtype=tl.float32)
    acc_s2 = tl.zeros([TILE], dtype=tl.float32)
    acc_sls = tl.zeros([TILE], dtype=tl.float32)
    acc_max = tl.zeros([TILE], dtype=tl.float32)  # scores are >= 0 (or NaN, fixed in stage 2)
    for t in range(TILES):
        offs = first + t * TILE + tl.arange(0, TILE)
        mask = offs < numel
        g = load_f32(g_base, offs, mask, g_code)
        w = load_f32(w_base, offs, mask, w_code)
        s = tl.where(mask, ratio_score(g, w, eps, exponent, HAS_EXPONENT), 0.0)
        acc_s += s
        acc_s2 += s * s
        acc_sls += tl.where(s > 0, s * tl.log(s), 0.0)
        acc_max = tl.maximum(acc_max, s)
    out = partials + pid * 4
    tl.store(out, tl.sum(acc_s, axis=0))
    tl.store(out + 1, tl.sum(acc_s2, axis=0))
    tl.store(out + 2, tl.sum(acc_sls, axis=0))
    tl.store(out + 3, tl.max(acc_max, axis=0))


@triton.jit
def _finish_kernel(partials, block_start, out, ROWS: tl.constexpr):
    seg = tl.program_id(0)
    b0 = tl.load(block_start + seg)
    b1 = tl.load(block_start + seg + 1)
    acc_s = tl.zeros([ROWS], dtype=tl.float64)
    acc_s2 = tl.zeros([ROWS], dtype=tl.float64)
    acc_sls = tl.zeros([ROWS], dtype=tl.float64)
    acc_max = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(b0, b1, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = rows < b1
        acc_s += tl.load(partials + rows * 4, mask=mask, other=0.0).to(tl.float64)
        acc_s2 += tl.load(partials + rows * 4 + 1, mask=mask, other=0.0).to(tl.float64)
        acc_sls += tl.load(partials + rows * 4 + 2, mask=mask, other=0.0).to(tl.float64)
        acc_max = tl.maximum(acc_max, tl.load(partials + rows * 4 + 3, mask=mask, other=0.0))
    total = tl.sum(acc_s, axis=0)
    # Scores are >= 0, so Σs is NaN exactly when some score is NaN; max must then be NaN too
    # (hardware max drops NaN operands).
    biggest = tl.max(acc_max, axis=0).to(tl.float64)
    biggest = tl.where(total != total, total, biggest)
    tl.store(out + seg * 4, total)
    tl.store(out + seg * 4 + 1, tl.sum(acc_s2, axis=0))
    tl.store(out + seg * 4 + 2, tl.sum(acc_sls, axis=0))
    tl.store(out + seg * 4 + 3, biggest)


def layer_stats(grads, weights, eps=1e-8, exponent=1.0):
    device = weights[0].device if len(weights) else torch.device("cpu")
    num_segments = len(weights)
    out = new_output((num_segments, 4), torch.float64, device)
    if num_segments == 0:
        return out
    starts = block_starts([w.numel() for w in weights], CHUNK)
    table = int_table([[g.data_ptr(), w.data_ptr(), w.numel(), dtype_code(g), dtype_code(w)]
                       for g, w in zip(grads, weights)], device)
    block_start = torch.tensor(starts, dtype=torch.int64, device=device)
    partials = torch.empty((max(starts[-1], 1), 4), dtype=torch.float32, device=device)
    if starts[-1] > 0:
        _partials_kernel[(starts[-1],)](table, block_start, num_segments, partials, eps, exponent,
                                        TILE=TILE, TILES=TILES, HAS_EXPONENT=exponent != 1.0,
                                        num_warps=NUM_WARPS)
    _finish_kernel[(num_segments,)](partials, block_start, out, ROWS=FINISH_ROWS, num_warps=FINISH_WARPS)
    return out


def compile_configs():
    """Every (kernel, signature, constexprs, compile options) the host function can launch."""
    configs = []
    for has_exponent in (False, True):
        configs.append((_partials_kernel,
                        {"table": "*i64", "block_start": "*i64", "num_segments": "i32", "partials": "*fp32",
                         "eps": "fp32", "exponent": "fp64", "TILE": "constexpr", "TILES": "constexpr",
                         "HAS_EXPONENT": "constexpr"},
                        {"TILE": TILE, "TILES": TILES, "HAS_EXPONENT": has_exponent}, {"num_warps": NUM_WARPS}))
    configs.append((_finish_kernel, {"partials": "*fp32", "block_start": "*i64", "out": "*fp64",
                                     "ROWS": "constexpr"}, {"ROWS": FINISH_ROWS}, {"num_warps": FINISH_WARPS}))
    return configs
