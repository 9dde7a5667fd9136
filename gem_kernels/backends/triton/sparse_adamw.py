"""sparse_adamw_: torch AdamW's update on the selected entries of all segments, one launch.

Programs run over the concatenated selected entries; each lane finds its segment by a binary
search of ``offsets`` (L+1 values, cached), so the host never needs the per-segment counts
(reading them would wait on the GPU). Params may be fp32/bf16/fp16 per segment; the state is
fp32 and compact (one value per selected entry).
"""
from __future__ import annotations

import itertools

import triton
import triton.language as tl

from ._common import dtype_code, gather_f32, int_table, pow_f64, scatter_f32

# Launch settings: the work is scattered loads and stores of single elements, so what matters is
# how many are in flight per SM. 1024 entries per program at 8 warps is 4 per thread; ptxas then
# needs ~100 registers (at 4 warps, 8 per thread, it needed ~160-196: the fp64 bias corrections),
# so more warps fit on an SM. Chosen from register counts only; not yet timed on a GPU.
BLOCK = 1024
NUM_WARPS = 8
# No implicit fusion: by default Triton lets LLVM and ptxas fuse any multiply into a following
# add, and they fused ``w * decay`` into the update's add, which torch rounds on its own (and
# the interpreter never fuses, so it could not see it). The fused steps torch does take (its
# x86 lerp and addcmul, as csrc/sparse_adamw.cpp) are written as tl.fma, so the GPU, the
# interpreter and the reference round at the same places.
OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

TABLE_COLS = tl.constexpr(5)  # param address, dense grad address, param dtype code, grad dtype code, step


@triton.jit
def _sparse_adamw_kernel(table, offsets, num_segments, search_steps, indices, compact_grads, age,
                         exp_avg, exp_avg_sq, max_exp_avg_sq, num_selected, lr: tl.float64, beta1: tl.float64,
                         beta2: tl.float64, one_minus_beta1, one_minus_beta2, beta2_f32, eps, decay,
                         maximize, BLOCK: tl.constexpr, COMPACT: tl.constexpr, USE_AGE: tl.constexpr,
                         AMSGRAD: tl.constexpr):
    entry = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    active = entry < num_selected
    # Largest seg with offsets[seg] <= entry: the segment that owns this entry.
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + num_segments
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(offsets + mid, mask=active, other=0) <= entry
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    row = table + lo * TABLE_COLS
    p_base = tl.load(row, mask=active, other=0)
    p_code = tl.load(row + 2, mask=active, other=0)
    idx = tl.load(indices + entry, mask=active, other=0)

    if COMPACT:
        g = tl.load(compact_grads + entry, mask=active, other=0.0).to(tl.float32)
    else:
        g = gather_f32(tl.load(row + 1, mask=active, other=0), idx, active,
                       tl.load(row + 3, mask=active, other=0))
    g = tl.where(maximize != 0, -g, g)
    if USE_AGE:
        n = tl.load(age + entry, mask=active, other=1).to(tl.float64)
    else:
        n = tl.load(row + 4, mask=active, other=1).to(tl.float64)
    # Bias corrections in fp64 then rounded, as torch computes them in Python doubles.
    ones = tl.zeros([BLOCK], dtype=tl.float64) + 1.0
    step_size = (lr / (1.0 - pow_f64(ones * beta1, n))).to(tl.float32, fp_downcast_rounding="rtne")
    bc2_sqrt = tl.sqrt(1.0 - pow_f64(ones * beta2, n))  # fp64 sqrt is IEEE
    bc2_sqrt = bc2_sqrt.to(tl.float32, fp_downcast_rounding="rtne")

    w = gather_f32(p_base, idx, active, p_code)
    m = tl.load(exp_avg + entry, mask=active, other=0.0)
    v = tl.load(exp_avg_sq + entry, mask=active, other=0.0)
    w = w * decay                                     # decoupled weight decay first
    # lerp_(g, 1-beta1) as torch's vectorised lerp: one fma from the end nearer the weight.
    m = tl.where(tl.abs(one_minus_beta1) < 0.5, tl.fma(one_minus_beta1, g - m, m),
                 tl.fma(one_minus_beta1 - 1.0, g - m, g))
    v = tl.fma(one_minus_beta2 * g, g, v * beta2_f32)  # mul_(beta2).addcmul_(g, g, 1-beta2), fused
    v_hat = v
    if AMSGRAD:  # torch.maximum(max_exp_avg_sq, exp_avg_sq): NaN propagates
        v_hat = tl.maximum(tl.load(max_exp_avg_sq + entry, mask=active, other=0.0), v,
                           propagate_nan=tl.PropagateNan.ALL)
        tl.store(max_exp_avg_sq + entry, v_hat, mask=active)
    denom = tl.math.div_rn(tl.sqrt_rn(v_hat), bc2_sqrt) + eps
    w = w + tl.math.div_rn(-step_size * m, denom)     # addcdiv: (value * m) / denom
    tl.store(exp_avg + entry, m, mask=active)
    tl.store(exp_avg_sq + entry, v, mask=active)
    scatter_f32(p_base, idx, active, p_code, w)


def sparse_adamw_(params, dense_grads, compact_grads, indices, offsets, state, lr, beta1, beta2, eps, weight_decay,
                  step, age, maximize):
    exp_avg, exp_avg_sq, *max_exp_avg_sq = state  # reference.ADAMW_STATE's order; AMSGrad's maximum is optional
    amsgrad = bool(max_exp_avg_sq)
    num_selected = indices.numel()
    if num_selected == 0:
        return
    device = indices.device
    compact = compact_grads is not None
    rows = []
    for i, p in enumerate(params):
        g = p if compact else dense_grads[i]  # compact: the dense grad column is never read
        rows.append([p.data_ptr(), g.data_ptr(), dtype_code(p), dtype_code(g), 1])
    table = int_table(rows, device)
    if age is None:
        table[:, 4] = step  # a device copy: the step numbers never visit the host
    grid = (triton.cdiv(num_selected, BLOCK),)
    _sparse_adamw_kernel[grid](
        table, offsets, len(params), len(params).bit_length(), indices,
        compact_grads if compact else exp_avg, age if age is not None else indices,
        exp_avg, exp_avg_sq, max_exp_avg_sq[0] if amsgrad else exp_avg_sq, num_selected,
        lr, beta1, beta2, 1 - beta1, 1 - beta2, beta2, eps, 1 - lr * weight_decay, int(maximize), BLOCK=BLOCK,
        COMPACT=compact, USE_AGE=age is not None, AMSGRAD=amsgrad, **OPTIONS)


def compile_configs():
    """Every (kernel, signature, constexprs, compile options) the host function can launch."""
    configs = []
    grad_kinds = [(False, "*fp32")] + [(True, t) for t in ("*fp32", "*bf16", "*fp16")]
    age_kinds = [(False, "*i64"), (True, "*i32"), (True, "*i64")]
    for (compact, grad_type), (use_age, age_type), amsgrad in itertools.product(grad_kinds, age_kinds, (False, True)):
        signature = {
            "table": "*i64", "offsets": "*i64", "num_segments": "i32", "search_steps": "i32",
            "indices": "*i64", "compact_grads": grad_type, "age": age_type, "exp_avg": "*fp32",
            "exp_avg_sq": "*fp32", "max_exp_avg_sq": "*fp32", "num_selected": "i64", "lr": "fp64",
            "beta1": "fp64", "beta2": "fp64", "one_minus_beta1": "fp32", "one_minus_beta2": "fp32",
            "beta2_f32": "fp32", "eps": "fp32", "decay": "fp32", "maximize": "i32",
            "BLOCK": "constexpr", "COMPACT": "constexpr", "USE_AGE": "constexpr", "AMSGRAD": "constexpr"}
        configs.append((_sparse_adamw_kernel, signature,
                        {"BLOCK": BLOCK, "COMPACT": compact, "USE_AGE": use_age, "AMSGRAD": amsgrad}, OPTIONS))
    return configs
