"""Pieces shared by the Triton kernels: the per-segment pointer table, dtype codes, loads
that widen any supported dtype to fp32, the ratio score and its radix-select key."""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# One code per storage dtype; a kernel branches on it per segment, so segments of different
# dtypes still share one launch (the branch is uniform across a program, so it costs nothing).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Tests set this to True so every output buffer starts as garbage-looking values and an
# element a kernel forgets to write is caught. Off in normal use (it would cost a fill).
poison_outputs = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if not poison_outputs:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def int_table(rows, device) -> torch.Tensor:
    """Rows of Python ints (pointers, sizes, codes) as a device int64 tensor [L, C]."""
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(rows), -1)


def _interpreter_pow_f64(x, exponent):
    """fp64 ``x ** exponent`` for the interpreter, which has no libdevice: the interpreter runs
    kernels as Python on numpy arrays, so numpy's pow (C ``pow``, as the reference's CPU
    double pow) stands in for libdevice's ``__nv_pow``. Triton offers no public way to run an
    fp64 pow under its interpreter, so this, the one place that needs it, builds the
    interpreter's own ``TensorHandle``."""
    from triton.runtime.interpreter import TensorHandle
    e = exponent.handle.data if hasattr(exponent, "handle") else exponent
    data = np.power(x.handle.data.astype(np.float64), np.asarray(e, dtype=np.float64))
    return tl.tensor(TensorHandle(data, tl.float64), x.type)


# Decided once at import, as Triton decides interpreter-or-compiled at decoration time.
pow_f64 = _interpreter_pow_f64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else libdevice.pow


@triton.jit
def load_f32(base, offs, mask, code):
    """Loads ``base[offs]`` (``base`` an int64 address) as fp32 for dtype code 0/1/2."""
    if code == 0:
        x = tl.load(base.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif code == 1:
        x = tl.load(base.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def gather_f32(bases, offs, mask, codes):
    """Loads ``bases[i][offs[i]]`` as fp32, each lane with its own address and dtype code: one
    masked load per dtype, of which only the lane's own is live, so no extra memory traffic."""
    as_f32 = tl.load(bases.to(tl.pointer_type(tl.float32)) + offs, mask=mask & (codes == 0), other=0.0)
    as_bf16 = tl.load(bases.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask & (codes == 1), other=0.0)
    as_f16 = tl.load(bases.to(tl.pointer_type(tl.float16)) + offs, mask=mask & (codes == 2), other=0.0)
    return tl.where(codes == 0, as_f32, tl.where(codes == 1, as_bf16.to(tl.float32), as_f16.to(tl.float32)))


@triton.jit
def f32_to_bf16_rtne(x):
    """fp32 -> bf16, rounded to nearest even, as integer arithmetic on the bits (torch's
    ``c10::BFloat16`` conversion, NaN -> 0x7FC0 included). Not ``x.to(tl.bfloat16)``: the GPU
    rounds that to nearest even, but the interpreter truncates it, even when asked for
    ``fp_downcast_rounding="rtne"`` (triton 3.9), so it would check other numbers than the GPU
    writes. Written out, both run the same integer steps; a few ops in a memory-bound store."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # a carry into the exponent is the rounding up
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def scatter_f32(bases, offs, mask, codes, x):
    """Stores fp32 ``x`` to ``bases[i][offs[i]]`` in each lane's dtype, rounded to nearest even
    (fp16: the interpreter's numpy cast and the GPU's cvt.rn both round so)."""
    tl.store(bases.to(tl.pointer_type(tl.float32)) + offs, x, mask=mask & (codes == 0))
    tl.store(bases.to(tl.pointer_type(tl.bfloat16)) + offs, f32_to_bf16_rtne(x), mask=mask & (codes == 1))
    tl.store(bases.to(tl.pointer_type(tl.float16)) + offs, x.to(tl.float16, fp_downcast_rounding="rtne"),
             mask=mask & (codes == 2))


@triton.jit
def ratio_score(g, w, eps, exponent, HAS_EXPONENT: tl.constexpr):
    """``|g| / (|w| + eps) ** exponent`` bit-identical to ``reference.ratio_score``: fp32 add,
    round-to-nearest division (Triton's ``/`` on fp32 is approximate on NVIDIA), and the
    power taken in fp64 then rounded, as the reference does."""
    d = tl.abs(w) + eps
    if HAS_EXPONENT:
        d = pow_f64(d.to(tl.float64), exponent).to(tl.float32, fp_downcast_rounding="rtne")
    return tl.math.div_rn(tl.abs(g), d)


@triton.jit
def select_key(s):
    """Radix-select key of a score, as int64: finite ``s`` (always >= +0) -> its bits + 1,
    which orders like ``s`` and fits in 31 bits; NaN or inf -> 0, below every finite score."""
    bits = s.to(tl.int32, bitcast=True)
    finite = (bits >= 0) & (bits < 0x7F800000)
    return tl.where(finite, bits + 1, 0).to(tl.int64)


@triton.jit
def find_segment(block_start, num_segments, block):
    """The segment whose block range holds ``block``: the largest ``seg`` with
    ``block_start[seg] <= block`` (empty segments share a start and are skipped)."""
    lo = 0
    hi = num_segments
    while hi - lo > 1:
        mid = (lo + hi) // 2
        go_right = tl.load(block_start + mid) <= block
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


def block_starts(numels, chunk: int) -> list[int]:
    """Cumulative count of ``chunk``-sized programs per segment: ``[0, n0, n0+n1, ...]``."""
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + triton.cdiv(n, chunk))
    return starts
