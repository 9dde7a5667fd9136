"""ratio_topk: exact top-k of the ratio score by radix select on its float bits.

Each segment (or, for a global k, all segments together) is one *group*. Four histogram
passes of 8 bits each find, per group, the threshold key T and how many entries equal to T
are still needed; a count pass and a write pass then keep every key > T and the first
"needed" keys == T in (segment, index) order, writing indices ascending per segment.
Every pass recomputes the score from g and w (nothing of size N is stored, except a 1-byte
mask when ``exclude`` is given). Each pass is one launch over all segments; the few small
steps between passes run on the device too, so the op never waits on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import block_starts, dtype_code, find_segment, int_table, load_f32, new_output, ratio_score, select_key

# Launch settings, shared by the three big passes so they split the segments into the same
# programs (the write pass relies on the count pass's per-program counts). TILE=1024 at 4 warps
# is 8 elements per thread; 8 tiles per program make one 256-bin histogram flush (atomics)
# per 8192 elements.
TILE = 1024
TILES = 8
CHUNK = TILE * TILES
NUM_WARPS = 4
PICK_WARPS = 4  # the per-group digit pick reads 256 counts
DIGIT_BITS = 8
SHIFTS = (24, 16, 8, 0)  # keys fit in 31 bits: four 8-bit digits, most significant first
RATIO_TOPK_PASSES = len(SHIFTS) + 2  # full reads of g and w: the histograms, count, write

TABLE_COLS = tl.constexpr(6)  # g address, w address, numel, g dtype code, w dtype code, first flat element


@triton.jit
def _segment_of_program(table, block_start, num_segments, pid, CHUNK: tl.constexpr):
    seg = find_segment(block_start, num_segments, pid)
    row = table + seg * TABLE_COLS
    first = (pid - tl.load(block_start + seg)).to(tl.int64) * CHUNK
    return (seg, tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), first)


@triton.jit
def _tile_keys(g_base, w_base, numel, g_code, w_code, elem_start, excluded, offs, eps, exponent,
               HAS_EXPONENT: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    """Keys of one tile and whether each entry takes part (in range and not excluded)."""
    in_range = offs < numel
    g = load_f32(g_base, offs, in_range, g_code)
    w = load_f32(w_base, offs, in_range, w_code)
    key = select_key(ratio_score(g, w, eps, exponent, HAS_EXPONENT))
    counted = in_range
    if HAS_EXCLUDE:
        counted = counted & (tl.load(excluded + elem_start + offs, mask=in_range, other=1) == 0)
    return key, counted


@triton.jit
def _histogram_kernel(table, block_start, num_segments, excluded, prefix, hist, shift, is_global,
                      eps, exponent: tl.float64, TILE: tl.constexpr, TILES: tl.constexpr,
                      HAS_EXPONENT: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    pid = tl.program_id(0)
    seg, g_base, w_base, numel, g_code, w_code, elem_start, first = _segment_of_program(
        table, block_start, num_segments, pid, TILE * TILES)
    group = tl.where(is_global != 0, 0, seg)
    high = shift + 8
    decided = tl.load(prefix + group) >> high  # the digits above this pass, already chosen
    counts = tl.zeros([256], dtype=tl.int32)
    for t in range(TILES):
        offs = first + t * TILE + tl.arange(0, TILE)
        key, counted = _tile_keys(g_base, w_base, numel, g_code, w_code, elem_start, excluded, offs,
                                  eps, exponent, HAS_EXPONENT, HAS_EXCLUDE)
        match = counted & ((key >> high) == decided)
        digit = ((key >> shift) & 255).to(tl.int32)
        counts += tl.histogram(digit, 256, mask=match)
    # Integer atomics: the sum does not depend on the order programs finish in.
    tl.atomic_add(hist + group * 256 + tl.arange(0, 256), counts.to(tl.int64))


@triton.jit
def _pick_digit_kernel(hist, prefix, need, shift):
    """Per group: the digit holding the need-th largest key among the matching entries."""
    group = tl.program_id(0)
    bins = tl.arange(0, 256)
    counts = tl.load(hist + group * 256 + bins)
    wanted = tl.load(need + group)
    at_or_above = tl.sum(counts, axis=0) - (tl.cumsum(counts, 0) - counts)
    # at_or_above falls as the digit rises and is >= wanted at digit 0 (k <= available).
    digit = tl.max(tl.where(at_or_above >= wanted, bins, 0), axis=0)
    above = tl.sum(tl.where(bins > digit, counts, 0), axis=0)
    tl.store(need + group, wanted - above)
    tl.store(prefix + group, tl.load(prefix + group) | (digit.to(tl.int64) << shift))


@triton.jit
def _count_kernel(table, block_start, num_segments, excluded, threshold, block_counts, is_global,
                  eps, exponent: tl.float64, TILE: tl.constexpr, TILES: tl.constexpr,
                  HAS_EXPONENT: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    pid = tl.program_id(0)
    seg, g_base, w_base, numel, g_code, w_code, elem_start, first = _segment_of_program(
        table, block_start, num_segments, pid, TILE * TILES)
    cut = tl.load(threshold + tl.where(is_global != 0, 0, seg))
    above = tl.zeros([TILE], dtype=tl.int32)
    equal = tl.zeros([TILE], dtype=tl.int32)
    for t in range(TILES):
        offs = first + t * TILE + tl.arange(0, TILE)
        key, counted = _tile_keys(g_base, w_base, numel, g_code, w_code, elem_start, excluded, offs,
                                  eps, exponent, HAS_EXPONENT, HAS_EXCLUDE)
        above += (counted & (key > cut)).to(tl.int32)
        equal += (counted & (key == cut)).to(tl.int32)
    tl.store(block_counts + pid * 2, tl.sum(above, axis=0).to(tl.int64))
    tl.store(block_counts + pid * 2 + 1, tl.sum(equal, axis=0).to(tl.int64))


@triton.jit
def _write_kernel(table, block_start, num_segments, excluded, threshold, ties, ties_before, out_base,
                  out, is_global, eps, exponent: tl.float64, TILE: tl.constexpr, TILES: tl.constexpr,
                  HAS_EXPONENT: tl.constexpr, HAS_EXCLUDE: tl.constexpr):
    pid = tl.program_id(0)
    seg, g_base, w_base, numel, g_code, w_code, elem_start, first = _segment_of_program(
        table, block_start, num_segments, pid, TILE * TILES)
    group = tl.where(is_global != 0, 0, seg)
    cut = tl.load(threshold + group)
    ties_wanted = tl.load(ties + group)
    ties_seen = tl.load(ties_before + pid)  # keys == cut in this group before this program
    dest_next = tl.load(out_base + pid)
    for t in range(TILES):
        offs = first + t * TILE + tl.arange(0, TILE)
        key, counted = _tile_keys(g_base, w_base, numel, g_code, w_code, elem_start, excluded, offs,
                                  eps, exponent, HAS_EXPONENT, HAS_EXCLUDE)
        equal = (counted & (key == cut)).to(tl.int32)
        tie_rank = ties_seen + (tl.cumsum(equal, 0) - equal)
        take = (counted & (key > cut)) | ((equal != 0) & (tie_rank < ties_wanted))
        take_i = take.to(tl.int32)
        dest = dest_next + (tl.cumsum(take_i, 0) - take_i)  # order kept: a prefix sum
        tl.store(out + dest, offs, mask=take)
        ties_seen += tl.sum(equal, axis=0)
        dest_next += tl.sum(take_i, axis=0)


def _excluded_mask(ex_idx, ex_off, elem_start: torch.Tensor, total: int, device) -> torch.Tensor:
    """A byte per element of all segments, 1 where excluded (built on the device, no sync)."""
    mask = torch.zeros(max(total, 1), dtype=torch.uint8, device=device)
    if ex_idx.numel():
        seg_of = torch.searchsorted(ex_off[1:], torch.arange(ex_idx.numel(), device=device), right=True)
        mask[ex_idx + elem_start[seg_of]] = 1
    return mask


def ratio_topk(grads, weights, k, per_segment, eps, exponent, exclude_indices, exclude_offsets):
    device = weights[0].device if len(weights) else torch.device("cpu")
    num_segments = len(weights)
    is_global = not per_segment
    numels = [w.numel() for w in weights]
    total_k = sum(k)
    out = new_output((total_k,), torch.int64, device)
    if total_k == 0:
        return out, torch.zeros(num_segments + 1, dtype=torch.int64, device=device)

    starts = block_starts(numels, CHUNK)
    num_programs = starts[-1]
    elem_starts = [0]
    for n in numels:
        elem_starts.append(elem_starts[-1] + n)
    table = int_table([[g.data_ptr(), w.data_ptr(), n, dtype_code(g), dtype_code(w), e]
                       for g, w, n, e in zip(grads, weights, numels, elem_starts)], device)
    block_start = torch.tensor(starts, dtype=torch.int64, device=device)
    if exclude_indices is not None:
        excluded = _excluded_mask(exclude_indices, exclude_offsets, torch.tensor(elem_starts, device=device),
                                  elem_starts[-1], device)
    else:
        excluded = torch.zeros(1, dtype=torch.uint8, device=device)  # never read
    num_groups = 1 if is_global else num_segments
    prefix = torch.zeros(num_groups, dtype=torch.int64, device=device)
    need = torch.tensor(list(k), dtype=torch.int64, device=device)
    hist = torch.zeros(len(SHIFTS), num_groups * 256, dtype=torch.int64, device=device)
    flags = dict(TILE=TILE, TILES=TILES, HAS_EXPONENT=exponent != 1.0, HAS_EXCLUDE=exclude_indices is not None,
                 num_warps=NUM_WARPS)
    grid = (num_programs,)
    for i, shift in enumerate(SHIFTS):
        _histogram_kernel[grid](table, block_start, num_segments, excluded, prefix, hist[i], shift,
                                int(is_global), eps, exponent, **flags)
        _pick_digit_kernel[(num_groups,)](hist[i], prefix, need, shift, num_warps=PICK_WARPS)
    # prefix is now the threshold key and need the number of keys equal to it to take.
    block_counts = torch.empty(num_programs, 2, dtype=torch.int64, device=device)
    _count_kernel[grid](table, block_start, num_segments, excluded, prefix, block_counts,
                        int(is_global), eps, exponent, **flags)

    # Per program: ties before it in its group, and where its first chosen index goes.
    above, equal = block_counts[:, 0], block_counts[:, 1]
    equal_before = torch.zeros(num_programs + 1, dtype=torch.int64, device=device)
    equal_before[1:] = equal.cumsum(0)
    if is_global:
        ties_before = equal_before[:-1]
        ties_wanted = need.expand(num_programs)
    else:
        programs_per_seg = block_start.diff()
        seg_of_program = torch.repeat_interleave(torch.arange(num_segments, device=device),
                                                 programs_per_seg, output_size=num_programs)
        ties_before = equal_before[:-1] - equal_before[block_start[seg_of_program]]
        ties_wanted = need[seg_of_program]
    chosen = above + torch.minimum((ties_wanted - ties_before).clamp_min(0), equal)
    out_base = torch.zeros(num_programs + 1, dtype=torch.int64, device=device)
    out_base[1:] = chosen.cumsum(0)
    offsets = out_base[block_start]  # programs are in segment order, so are the outputs

    _write_kernel[grid](table, block_start, num_segments, excluded, prefix, need,
                        ties_before.contiguous(), out_base, out, int(is_global), eps, exponent, **flags)
    return out, offsets


def compile_configs():
    """Every (kernel, signature, constexprs, compile options) the host function can launch."""
    common = {"table": "*i64", "block_start": "*i64", "num_segments": "i32", "excluded": "*u8"}
    tail = {"is_global": "i32", "eps": "fp32", "exponent": "fp64", "TILE": "constexpr",
            "TILES": "constexpr", "HAS_EXPONENT": "constexpr", "HAS_EXCLUDE": "constexpr"}
    signatures = {
        _histogram_kernel: {**common, "prefix": "*i64", "hist": "*i64", "shift": "i32", **tail},
        _count_kernel: {**common, "threshold": "*i64", "block_counts": "*i64", **tail},
        _write_kernel: {**common, "threshold": "*i64", "ties": "*i64", "ties_before": "*i64",
                        "out_base": "*i64", "out": "*i64", **tail},
    }
    configs = [(_pick_digit_kernel, {"hist": "*i64", "prefix": "*i64", "need": "*i64", "shift": "i32"},
                {}, {"num_warps": PICK_WARPS})]
    for kernel, signature in signatures.items():
        for has_exponent in (False, True):
            for has_exclude in (False, True):
                configs.append((kernel, signature, {"TILE": TILE, "TILES": TILES, "HAS_EXPONENT": has_exponent,
                                                    "HAS_EXCLUDE": has_exclude}, {"num_warps": NUM_WARPS}))
    return configs
