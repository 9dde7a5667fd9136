"""sparse_weight_grad: the selected entries of each segment's dW = dYᵀ X, as fp32, for CUDA tensors.

Why the layout decides the speed (docs/gpu.md, "sparse_weight_grad: the design and its byte
model"). Entry (o, i) is a dot product over T of the column dY[:, o] and the column X[:, i]. X
and dY are token-major ([T, in], [T, out]), so a column is T values one row apart: read as it
lies, each 2-byte value costs a 32-byte DRAM sector, which is why the first kernel (the
``gather`` configuration below) lost to cuBLAS's dense dW. Two facts fix it:

* indices come sorted row-major, so a block of consecutive entries covers a narrow band of rows
  ``o``: at one token, its dY values sit in one or two sectors, which the warp's lanes (laid
  along the entries) share: dY read in place is coalesced;
* the columns ``i`` of a block are scattered over all of ``in``, so X is copied once, T-major
  (``Xᵀ``, ``[in, Tp]``, Tp = T rounded up to 64, in X's dtype) by a tiled transpose; then each
  entry reads its own contiguous run of ``Xᵀ[i, t0:t0+BLOCK_T]`` (whole sectors, vector loads).

So the ``xt`` configurations (the default among them) move X three times (read, write, read back) and dY once:
about ``T·(3·in + out)·bytes`` from DRAM, against ``2·T·out·in`` flops for the dense product.

The kernel: each program takes BLOCK_E consecutive entries of one segment and one of
``num_splits`` slices of T, walks its slice in chunks of BLOCK_T, multiplies a [BLOCK_T, BLOCK_E]
tile of X values by one of dY values (both widened to fp32, exact) and adds it into an fp32
[BLOCK_T, BLOCK_E] accumulator, reduced over its BLOCK_T rows once at the end. With one slice it
writes the entries; with several it writes one partial row per slice, and the host adds the rows
in slice order (torch.sum over dim 0: a fixed order, no float atomics). Slices exist to fill the
GPU when k is small (4194 entries at density 1e-3 of a 2048 x 2048 layer are 66 blocks of 64).
One segment (what the layer's backward passes) goes by scalar arguments: a launch for the T-major
copy, one for the kernel, and the sum when T is sliced; nothing is copied from the host, so a CUDA
graph can hold the op. Several segments go in one launch through a table of their addresses,
sizes and dtypes; the programs of segment l start at block_start[l], computed on the device from
``offsets``, so the host never reads the per-segment counts, and a program finds its segment by a
binary search.

Configurations (``CONFIGS``): the layout (which operands are copied T-major), BLOCK_E, BLOCK_T and
warps. The op uses ``DEFAULT_CONFIG``; ``sparse_weight_grad_with(name, ...)`` runs any of them (the
GPU suite times each, benchmarks/gpu_suite.py). Every one compiles for sm_80 and sm_90 without
spills (``compile_configs()``, tests/test_triton_compile.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import dtype_code, find_segment, int_table, load_f32, new_output

TABLE_COLS = tl.constexpr(9)  # X address, dY address, X code, dY code, T, in, out, X stride, dY stride
T_PAD = 64  # the T-major copies' row length is T rounded up to this: 128-byte aligned rows in bf16


@dataclass(frozen=True)
class Config:
    """One launch configuration. ``x_t`` / ``dy_t``: read that operand from a T-major copy (else in
    place, token-major). The byte model of each: docs/gpu.md."""
    x_t: bool
    dy_t: bool
    block_e: int
    block_t: int
    num_warps: int

    def options(self) -> dict:
        # Multiply-adds may fuse into FMAs (stated, as the default is changing in Triton 3.10): the
        # sums are only promised to fp32 rounding, and a fused step rounds once instead of twice.
        return {"num_warps": self.num_warps, "enable_fp_fusion": True}


# The layouts and why each is here (docs/gpu.md gives the bytes each moves at the 953M shapes):
# * xt: X copied T-major, dY read in place along the entries' row band. The fewest bytes at every
#   953M shape and density, in DRAM and from the L2. Three tile shapes: 128 entries x 32 tokens on
#   8 warps (the default: a block's dY band sectors are shared by the most entries, so the least
#   L2 traffic of the three), 64 x 32 on 4 warps (twice the programs, for when few fit), and
#   32 x 64 (a whole 128-byte line of Xᵀ per entry and chunk).
# * both: X and dY copied T-major: every load a contiguous run, dY's copy costing two more passes
#   over dY. A hedge on the in-place dY loads (if their sectors do not merge as the model assumes).
# * gather: nothing copied, both read in place: the first kernel's layout (one sector per X value),
#   kept as the measured baseline of the layouts and for very small k, where copying X costs more
#   than reading k·T scattered sectors.
# Names: layout, entries per program (e), tokens per chunk (t), warps (w).
CONFIGS = {
    "xt_e128_t32_w8": Config(x_t=True, dy_t=False, block_e=128, block_t=32, num_warps=8),
    "xt_e64_t32_w4": Config(x_t=True, dy_t=False, block_e=64, block_t=32, num_warps=4),
    "xt_e32_t64_w4": Config(x_t=True, dy_t=False, block_e=32, block_t=64, num_warps=4),
    "both_e64_t32_w4": Config(x_t=True, dy_t=True, block_e=64, block_t=32, num_warps=4),
    "gather_e32_t32_w4": Config(x_t=False, dy_t=False, block_e=32, block_t=32, num_warps=4),
}
DEFAULT_CONFIG = "xt_e128_t32_w8"  # the byte model's choice; the GPU suite times them all (benchmarks/gpu_suite.py)

# Slices of T: enough programs for PROGRAMS_PER_SM per SM, each slice at least MIN_SLICE_CHUNKS
# chunks long, at most MAX_SPLITS slices. Without CUDA (the interpreter) an H100's 132 SMs stand in.
PROGRAMS_PER_SM = 4
MIN_SLICE_CHUNKS = 4
MAX_SPLITS = 16
FALLBACK_SMS = 132

TRANSPOSE_BLOCK = 64
TRANSPOSE_WARPS = 4


@triton.jit
def _load(base, offs, mask, code, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """``base[offs]`` (``base`` an int64 address) as fp32: dtype ``CODE`` (0 fp32, 1 bf16, 2 fp16), or
    the segment's ``code`` when CODE is -1 (segments of several dtypes in one launch). ALIGNED: the
    address is 16-byte aligned (a T-major copy), which lets runs along T load as vectors."""
    if CODE == -1:
        x = load_f32(base, offs, mask, code)
    else:
        if CODE == 0:
            ptr = base.to(tl.pointer_type(tl.float32))
        elif CODE == 1:
            ptr = base.to(tl.pointer_type(tl.bfloat16))
        else:
            ptr = base.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        x = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _swg_kernel(table, offsets, block_start, num_segments, indices, parts, num_selected, num_splits,
                x_addr, dy_addr, tokens, n_in, x_stride, dy_stride,
                X_T: tl.constexpr, DY_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_T: tl.constexpr,
                CODE: tl.constexpr):
    """CODE -1: several segments, each read from the table (its own dtype); else one segment of
    dtype CODE, passed as scalars (no table: nothing is copied to the device before the launch)."""
    pid = tl.program_id(0)
    if CODE == -1:
        seg = find_segment(block_start, num_segments, pid)
        first = tl.load(offsets + seg) + (pid - tl.load(block_start + seg)).to(tl.int64) * BLOCK_E
        end = tl.load(offsets + seg + 1)
        row = table + seg * TABLE_COLS
        xa = tl.load(row)
        dya = tl.load(row + 1)
        x_code = tl.load(row + 2)
        dy_code = tl.load(row + 3)
        t_all = tl.load(row + 4)
        width = tl.load(row + 5)
        xs = tl.load(row + 7)
        dys = tl.load(row + 8)
    else:
        # tl.cast, not .to: Triton passes an integer argument equal to 1 as a constant (a Python int)
        first = pid.to(tl.int64) * BLOCK_E
        end = tl.cast(num_selected, tl.int64)
        xa = tl.cast(x_addr, tl.int64)
        dya = tl.cast(dy_addr, tl.int64)
        x_code = CODE
        dy_code = CODE
        t_all = tl.cast(tokens, tl.int64)
        width = tl.cast(n_in, tl.int64)
        xs = tl.cast(x_stride, tl.int64)
        dys = tl.cast(dy_stride, tl.int64)
    # Hints here, where the values are made (in a called function they would annotate nothing).
    if X_T:
        xs = tl.multiple_of(xs, 64)  # the copy's rows are T_PAD-aligned
    if DY_T:
        dys = tl.multiple_of(dys, 64)
    if first < end:  # else one of the grid's spare programs (the host does not know per-segment counts)
        _entry_block(indices, parts, num_selected, num_splits, first, end, xa, dya, x_code, dy_code, t_all,
                     width, xs, dys, X_T, DY_T, BLOCK_E, BLOCK_T, CODE)


@triton.jit
def _entry_block(indices, parts, num_selected, num_splits, first, end, x_base, dy_base, x_code, dy_code, tokens,
                 n_in, x_stride, dy_stride, X_T: tl.constexpr, DY_T: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_T: tl.constexpr, CODE: tl.constexpr):
    """Entries [first, min(first + BLOCK_E, end)) over this program's slice of T."""
    split = tl.program_id(1)
    # This program's slice of T: whole chunks, so that chunk starts stay BLOCK_T-aligned.
    chunk = tl.cdiv(tl.cdiv(tokens, num_splits), BLOCK_T) * BLOCK_T
    t_begin = split * chunk
    t_end = tl.minimum(tokens, t_begin + chunk)

    entry = first + tl.arange(0, BLOCK_E)
    active = entry < end
    flat = tl.load(indices + entry, mask=active, other=0)
    o = flat // n_in
    i = flat - o * n_in
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        t = tl.multiple_of(t0, BLOCK_T) + tl.arange(0, BLOCK_T).to(tl.int64)
        live = (t[:, None] < t_end) & active[None, :]
        # A T-major copy is zero past T (its pad) and slices are whole chunks, so its loads need
        # only the entry mask, which is constant along T: runs along T then load as vectors.
        if X_T:  # Xᵀ[i, t]: each entry a contiguous run of BLOCK_T values
            x = _load(x_base, i[None, :] * x_stride + t[:, None], active[None, :], x_code, CODE, True)
        else:  # X[t, i]: one scattered value per entry and token
            x = _load(x_base, t[:, None] * x_stride + i[None, :], live, x_code, CODE, False)
        if DY_T:
            dy = _load(dy_base, o[None, :] * dy_stride + t[:, None], active[None, :], dy_code, CODE, True)
        else:  # dY[t, o]: the block's entries lie in a narrow band of rows o, so lanes share sectors
            dy = _load(dy_base, t[:, None] * dy_stride + o[None, :], live, dy_code, CODE, False)
        acc += x * dy
    tl.store(parts + split.to(tl.int64) * num_selected + entry, tl.sum(acc, axis=0), mask=active)


@triton.jit
def _transpose_kernel(src, dst, rows, cols, padded, BLOCK: tl.constexpr):
    """dst[c, r] = src[r, c] for src [rows, cols] contiguous and dst [cols, padded], zero for
    rows <= r < padded: a tile is read along its rows and written along its columns (Triton moves
    it through shared memory between the two layouts)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(src + r[:, None] * cols + c[None, :], mask=(r[:, None] < rows) & (c[None, :] < cols), other=0)
    tl.store(dst + c[None, :] * padded + r[:, None], tile, mask=(r[:, None] < padded) & (c[None, :] < cols))


def t_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` [T, f] as a T-major copy [f, Tp], Tp = T rounded up to T_PAD, zero past T."""
    tokens, features = x.shape
    padded = triton.cdiv(max(tokens, 1), T_PAD) * T_PAD
    out = torch.empty((features, padded), dtype=x.dtype, device=x.device)
    if features:
        grid = (triton.cdiv(padded, TRANSPOSE_BLOCK), triton.cdiv(features, TRANSPOSE_BLOCK))
        _transpose_kernel[grid](x, out, tokens, features, padded, BLOCK=TRANSPOSE_BLOCK, num_warps=TRANSPOSE_WARPS)
    return out


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return FALLBACK_SMS


def choose_splits(config: Config, num_selected: int, max_tokens: int, sms: int) -> int:
    """Slices of T: enough programs to fill ``sms`` SMs, never a slice under MIN_SLICE_CHUNKS chunks."""
    blocks = triton.cdiv(num_selected, config.block_e)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, max(blocks, 1))
    longest = max(1, max_tokens // (MIN_SLICE_CHUNKS * config.block_t))
    return max(1, min(wanted, longest, MAX_SPLITS))


def _operand(x: torch.Tensor, transposed: bool):
    """(tensor the kernel reads, its stride) for one operand."""
    if transposed:
        copy = t_major(x)
        return copy, copy.shape[1]
    return x, x.shape[1]


def _launch_one(config, x, dy, indices, parts, splits):
    """One segment: its addresses and sizes as scalars, nothing copied to the device first (so the
    op is a few launches, and a CUDA graph can hold it)."""
    xr, x_stride = _operand(x, config.x_t)
    dyr, dy_stride = _operand(dy, config.dy_t)
    num_selected = indices.numel()
    grid = (triton.cdiv(num_selected, config.block_e), splits)
    _swg_kernel[grid](indices, indices, indices, 1, indices, parts, num_selected, splits, xr.data_ptr(),
                      dyr.data_ptr(), x.shape[0], x.shape[1], x_stride, dy_stride, X_T=config.x_t, DY_T=config.dy_t,
                      BLOCK_E=config.block_e, BLOCK_T=config.block_t, CODE=dtype_code(x), **config.options())


def _launch_table(config, inputs, grad_outputs, indices, offsets, parts, splits):
    """Several segments in one launch: a table of their addresses, sizes and dtypes."""
    device = indices.device
    rows, keep = [], []  # keep: the copies stay alive until the kernel is queued
    for x, dy in zip(inputs, grad_outputs):
        xr, x_stride = _operand(x, config.x_t)
        dyr, dy_stride = _operand(dy, config.dy_t)
        keep += [xr, dyr]
        rows.append([xr.data_ptr(), dyr.data_ptr(), dtype_code(x), dtype_code(dy), x.shape[0], x.shape[1],
                     dy.shape[1], x_stride, dy_stride])
    table = int_table(rows, device)
    # Programs per segment from the device offsets, without reading them on the host: the grid
    # is sized for the worst case (every segment's last block partly filled) and spare
    # programs return at once.
    counts = offsets[1:] - offsets[:-1]
    block_start = torch.zeros(len(inputs) + 1, dtype=torch.int64, device=device)
    block_start[1:] = torch.cumsum((counts + config.block_e - 1) // config.block_e, 0)
    num_selected = indices.numel()
    grid = (triton.cdiv(num_selected, config.block_e) + len(inputs), splits)
    _swg_kernel[grid](table, offsets, block_start, len(inputs), indices, parts, num_selected, splits, 0, 0, 0, 0,
                      0, 0, X_T=config.x_t, DY_T=config.dy_t, BLOCK_E=config.block_e, BLOCK_T=config.block_t,
                      CODE=-1, **config.options())
    del keep


def sparse_weight_grad_with(config, inputs, grad_outputs, indices, offsets, splits=None):
    """The op with configuration ``config`` (a name of CONFIGS or a Config); ``splits`` forces the
    number of T slices (default: ``choose_splits``)."""
    config = CONFIGS[config] if isinstance(config, str) else config
    num_selected = indices.numel()
    if num_selected == 0:
        return new_output((0,), torch.float32, indices.device)
    max_tokens = max(x.shape[0] for x in inputs)
    splits = splits or choose_splits(config, num_selected, max_tokens, _sm_count(indices.device))
    parts = new_output((splits, num_selected), torch.float32, indices.device)
    if len(inputs) == 1:
        _launch_one(config, inputs[0], grad_outputs[0], indices, parts, splits)
    else:
        _launch_table(config, inputs, grad_outputs, indices, offsets, parts, splits)
    return parts[0] if splits == 1 else parts.sum(0)


def sparse_weight_grad(inputs, grad_outputs, indices, offsets):
    return sparse_weight_grad_with(DEFAULT_CONFIG, inputs, grad_outputs, indices, offsets)


SIGNATURE = {"table": "*i64", "offsets": "*i64", "block_start": "*i64", "num_segments": "i32", "indices": "*i64",
             "parts": "*fp32", "num_selected": "i32", "num_splits": "i32", "x_addr": "i64", "dy_addr": "i64",
             "tokens": "i32", "n_in": "i32", "x_stride": "i32", "dy_stride": "i32", "X_T": "constexpr",
             "DY_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_T": "constexpr", "CODE": "constexpr"}
TRANSPOSE_DTYPES = ("fp32", "bf16", "fp16")
ONES = ("num_selected", "num_splits", "tokens", "n_in", "dy_stride")
LAUNCH_CODES = (1, 0, 2, -1)  # one segment of bf16, fp32, fp16; -1: several segments (the table)
# What Triton's launcher assumes of the copy at the 953M shapes (every argument a multiple of 16):
# vector loads and stores on both sides, the tile moved through shared memory. The copy is
# compiled with and without it (the fifth element, ASTSource's attrs).
ALIGNED_ATTRS = {(i,): [["tt.divisibility", 16]] for i in range(5)}


def compile_configs():
    """Every (kernel, signature, constexprs, compile options[, attrs]) the host function can launch:
    each configuration's kernel for each dtype code, and the T-major copy for each dtype."""
    out = [(_swg_kernel, SIGNATURE, {"X_T": c.x_t, "DY_T": c.dy_t, "BLOCK_E": c.block_e, "BLOCK_T": c.block_t,
                                     "CODE": code}, c.options())
           for c in CONFIGS.values() for code in LAUNCH_CODES]
    # Triton passes an integer argument equal to 1 as a constant: a one-token, one-entry layer of
    # one input and one output (T = k = in = out = 1, one slice), with and without the T-major copy.
    for name in (DEFAULT_CONFIG, "gather_e32_t32_w4"):
        c = CONFIGS[name]
        ones = {arg: 1 for arg in ONES + (() if c.x_t else ("x_stride",))}
        out.append((_swg_kernel, dict(SIGNATURE, **dict.fromkeys(ones, "constexpr")),
                    {"X_T": c.x_t, "DY_T": c.dy_t, "BLOCK_E": c.block_e, "BLOCK_T": c.block_t, "CODE": 1, **ones},
                    c.options()))
    for dt in TRANSPOSE_DTYPES:
        signature = {"src": f"*{dt}", "dst": f"*{dt}", "rows": "i32", "cols": "i32", "padded": "i32",
                     "BLOCK": "constexpr"}
        for attrs in (None, ALIGNED_ATTRS):
            out.append((_transpose_kernel, signature, {"BLOCK": TRANSPOSE_BLOCK}, {"num_warps": TRANSPOSE_WARPS})
                       + ((attrs,) if attrs else ()))
    return out
