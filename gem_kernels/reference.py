"""Every op in plain PyTorch: the specification and the test oracle (docs/ARCHITECTURE.md, "The ops").

Every backend must give these answers: top-k indices identical, floats within the
tolerance of their dtype. Each function has its op's schema signature (``gem_kernels.library``),
which every backend's kernel has too. Inputs are assumed valid here; `gem_kernels.ops` checks
them and normalises the public arguments (``k`` an int or a list, ``exclude`` a pair, ``betas``)
to these.

Conventions shared by all backends
----------------------------------
* A *segment* is one tensor; ops take lists of segments and index them by their flat
  (row-major) position.
* The score of an entry is ``s = |g| / d`` in fp32, with ``d = |w| + eps`` (``eps``
  rounded to fp32 first) and, when ``exponent != 1``, ``d = fp32(fp64(d) ** exponent)``.
  Division and addition are IEEE fp32 in every backend, so scores are bit-identical
  and so are the chosen indices.
* Selection orders entries by score, larger first; non-finite scores (NaN, inf) rank
  below every finite one; equal scores go to the smaller flat index (across segments,
  the smaller segment first).
* Index sets are ``(indices, offsets)``: ``indices`` int64 holds the flat indices of
  segment ``l`` in ``indices[offsets[l]:offsets[l+1]]``, sorted ascending.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor


def ratio_score(g: Tensor, w: Tensor, eps: float = 1e-8, exponent: float = 1.0) -> Tensor:
    """Flat fp32 score ``|g| / (|w| + eps) ** exponent`` of one segment."""
    d = w.reshape(-1).float().abs() + torch.tensor(eps, dtype=torch.float32, device=w.device)
    if exponent != 1.0:
        d = d.double().pow(exponent).float()
    return g.reshape(-1).float().abs() / d


def layer_stats(grads: Sequence[Tensor], weights: Sequence[Tensor], eps: float = 1e-8,
                exponent: float = 1.0) -> Tensor:
    """Per-segment ``[Σs, Σs², Σ s·ln s, max s]`` as float64 ``[L, 4]``.

    ``0·ln 0`` counts as 0 and an empty segment gives zeros. Non-finite scores propagate
    into ``Σs``, ``Σs²`` and ``max s``; in ``Σ s·ln s`` an infinite score gives inf and a NaN
    one counts as 0 (callers reject non-finite gradients before asking for statistics).
    The entropy of ``p = s / Σs`` follows without storing ``p``: ``H = ln S − (Σ s ln s) / S``.
    """
    device = weights[0].device if len(weights) else "cpu"
    out = torch.zeros(len(grads), 4, dtype=torch.float64, device=device)
    for i, (g, w) in enumerate(zip(grads, weights)):
        if g.numel() == 0:
            continue
        s = ratio_score(g, w, eps, exponent).double()
        s_ln_s = torch.where(s > 0, s * torch.log(s), torch.zeros_like(s))
        out[i, 0] = s.sum()
        out[i, 1] = (s * s).sum()
        out[i, 2] = s_ln_s.sum()
        out[i, 3] = s.max()
    return out


def entropy_from_stats(stats: Tensor) -> Tensor:
    """Entropy ``H = ln S − (Σ s ln s) / S`` per row of ``layer_stats``; 0 where ``S == 0``."""
    total, s_ln_s = stats[:, 0], stats[:, 2]
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, torch.log(safe) - s_ln_s / safe, torch.zeros_like(total))


def _rank_key(score: Tensor) -> Tensor:
    """Scores with non-finite values pushed below every finite one (finite scores are >= 0)."""
    return torch.where(torch.isfinite(score), score, torch.full_like(score, -1.0))


def _excluded_mask(numel: int, exclude_indices, exclude_offsets, seg: int, device) -> Tensor:
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if exclude_indices is not None:
        mask[exclude_indices[int(exclude_offsets[seg]):int(exclude_offsets[seg + 1])]] = True
    return mask


def _top_by_key(key: Tensor, count: int) -> Tensor:
    """Positions of the ``count`` largest keys, ties to the smaller position."""
    # A stable sort on the negated key keeps equal keys in position order.
    order = torch.sort(-key, stable=True).indices
    return order[:count]


def ratio_topk(grads: Sequence[Tensor], weights: Sequence[Tensor], k: Sequence[int], per_segment: bool,
               eps: float, exponent: float, exclude_indices, exclude_offsets) -> tuple[Tensor, Tensor]:
    """Exact top-k of the ratio score, per segment (``per_segment``: ``k[l]`` in segment ``l``) or
    across segments (``k[0]`` in all).

    ``exclude_indices``/``exclude_offsets`` (both None, or an index set) are entries never to choose.
    Returns ``(indices, offsets)`` with indices sorted ascending inside each segment.
    """
    device = weights[0].device if len(weights) else "cpu"
    keys = []
    for seg, (g, w) in enumerate(zip(grads, weights)):
        key = _rank_key(ratio_score(g, w, eps, exponent)).double()
        # Excluded entries sort below everything, including non-finite scores.
        key[_excluded_mask(w.numel(), exclude_indices, exclude_offsets, seg, device)] = -2.0
        keys.append(key)

    if not per_segment:
        flat = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.float64, device=device)
        chosen = _top_by_key(flat, int(k[0]))  # concatenation order = (segment, index) order
        starts = torch.tensor([0] + [t.numel() for t in keys], device=device).cumsum(0)
        chosen_sorted = torch.sort(chosen).values
        seg_of = torch.searchsorted(starts[1:], chosen_sorted, right=True)
        local = chosen_sorted - starts[seg_of]
        counts = torch.bincount(seg_of, minlength=len(keys))
    else:
        per_seg = [torch.sort(_top_by_key(key, int(kk))).values for key, kk in zip(keys, k)]
        local = torch.cat(per_seg) if per_seg else torch.zeros(0, dtype=torch.int64, device=device)
        counts = torch.tensor([t.numel() for t in per_seg], dtype=torch.int64, device=device)
    offsets = torch.zeros(len(keys) + 1, dtype=torch.int64, device=device)
    offsets[1:] = counts.cumsum(0)
    return local.to(torch.int64), offsets


def adamw_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, step):
    """Host-side scalars of torch AdamW's update for one step number (as torch computes them)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    return 1 - lr * weight_decay, lr / bias_correction1, math.sqrt(bias_correction2)


# The per-entry fp32 state of sparse_adamw_, in the order its ``state`` list holds it: AdamW's two
# moments, then AMSGrad's running maximum of exp_avg_sq, whose presence makes the step AMSGrad's.
ADAMW_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
ADAMW_MOMENTS = 2  # the state every step needs; the rest is optional


def sparse_adamw_(params: Sequence[Tensor], dense_grads: Sequence[Tensor], compact_grads, indices: Tensor,
                  offsets: Tensor, state: Sequence[Tensor], lr: float, beta1: float, beta2: float, eps: float,
                  weight_decay: float, step, age, maximize: bool) -> None:
    """torch AdamW's update on the selected entries only, in fp32, in place.

    * Grads: ``dense_grads``, one tensor shaped like each param (read at the indices), or
      ``compact_grads``, one 1-D tensor with a value per selected entry, aligned with ``indices``
      (then ``dense_grads`` is empty).
    * ``state``: ``[exp_avg, exp_avg_sq]``, or ``[exp_avg, exp_avg_sq, max_exp_avg_sq]`` for
      AMSGrad (``ADAMW_STATE``); fp32, one value per selected entry.
    * exactly one of ``step`` (int64 ``[L]``, the step number of this update per segment) and
      ``age`` (an integer tensor, one step number per entry). Step numbers count this update, so
      they are >= 1, as after torch's ``step += 1``.
    Order of operations, as ``torch.optim.AdamW`` (single tensor): decoupled decay
    ``p *= 1 - lr*wd``; ``m += (1-β1)(g-m)``; ``v = β2 v + (1-β2) g²``; AMSGrad: ``v̂ = max(v̂, v)``
    and ``v̂`` in place of ``v`` below; ``p -= lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps)``. Other
    entries are never touched.
    """
    for p, idx, g, w, (m, v, *v_max), decay, step_size, bc2_sqrt in adamw_segments(
            params, dense_grads, compact_grads, indices, offsets, state, lr, beta1, beta2, weight_decay, step,
            age, maximize):
        w = w * decay
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if v_max:  # AMSGrad
            torch.maximum(v_max[0], v, out=v_max[0])
            v = v_max[0]
        denom = (v.sqrt() / bc2_sqrt) + eps
        w = w + (-step_size * m) / denom  # addcdiv's order: (value * t1) / t2
        p.view(-1)[idx] = w.to(p.dtype)


def adamw_segments(params, dense_grads, compact_grads, indices, offsets, state, lr, beta1, beta2, weight_decay,
                   step, age, maximize):
    """Per segment with selected entries: ``(param, indices, g, w, state, decay, step_size,
    bc2_sqrt)``: the fp32 gradient (negated for ``maximize``) and weights at the indices, views of
    the segment's part of each ``state`` buffer, and this step's scalars (tensors per entry for
    ``age``)."""
    for seg, p in enumerate(params):
        lo, hi = int(offsets[seg]), int(offsets[seg + 1])
        if hi == lo:
            continue
        idx = indices[lo:hi]
        g = (compact_grads[lo:hi] if compact_grads is not None else dense_grads[seg].reshape(-1)[idx]).float()
        if maximize:
            g = -g
        if age is not None:
            n = age[lo:hi].double()
            decay = torch.tensor(1 - lr * weight_decay, dtype=torch.float32)
            step_size = (lr / (1 - beta1 ** n)).float()
            bc2_sqrt = torch.sqrt(1 - beta2 ** n).float()
        else:
            decay, step_size, bc2_sqrt = adamw_scalars(lr, beta1, beta2, weight_decay, int(step[seg]))
        yield (p, idx, g, p.view(-1)[idx].float(), [t[lo:hi] for t in state], decay, step_size, bc2_sqrt)


# sparse_weight_grad computes dW a block of rows at a time: [rows, in] fp32, with rows =
# max(_WEIGHT_GRAD_MIN_ROWS, _WEIGHT_GRAD_BLOCK // in), capped at out. MKL's sgemm gives a row
# of dY^T X the same bits whatever the row count, but only from about 8 rows up (fewer take a
# different kernel), so blocks never have fewer than _WEIGHT_GRAD_MIN_ROWS rows.
_WEIGHT_GRAD_BLOCK = 1 << 20
_WEIGHT_GRAD_MIN_ROWS = 16


def sparse_weight_grad(inputs: Sequence[Tensor], grad_outputs: Sequence[Tensor], indices: Tensor,
                       offsets: Tensor) -> Tensor:
    """The selected entries of each segment's weight gradient ``dW = dYᵀ X``, as fp32 ``[len(indices)]``.

    * ``inputs[l]``: ``X``, ``[T_l, in_l]``; ``grad_outputs[l]``: ``dY``, ``[T_l, out_l]``, both
      contiguous, of one dtype per segment (fp32, bf16 or fp16; segments may differ). For an
      ``nn.Linear`` fed ``[..., in]`` activations, flatten the leading dimensions into ``T``.
    * ``indices[offsets[l]:offsets[l+1]]``: flat row-major indices ``o * in_l + i`` into
      ``W_l`` of shape ``[out_l, in_l]``, sorted ascending.
    * Entry ``j`` is ``Σ_t dY[t, o] · X[t, i]`` in fp32 (inputs widened exactly first). A
      segment with ``T = 0`` gives zeros; one with no indices gives nothing.

    transformers' ``Conv1D`` stores its weight as ``[in, out]`` (``y = x @ W + b``), so its
    ``dW[i, o] = Σ_t X[t, i] · dY[t, o]`` is this op with the roles swapped: pass
    ``inputs=dY, grad_outputs=X``, and the flat index of ``dW[i, o]`` is ``i * out + o``, which
    is row-major in ``W``'s own ``[in, out]`` shape. No flag is needed.

    Memory: never the dense ``dW``. Per segment, ``X`` widened to fp32 (a copy only when it is
    not fp32), and per block of rows ``[r0, r0 + R)`` of ``dW`` that holds selected entries, the
    fp32 ``dY[:, r0:r0+R]`` (``T·R``) and the block ``[R, in]``, with
    ``R = min(out, max(16, 2**20 // in))``: at most ``T·in + (T + in)·R`` floats.

    Each block is ``dY[:, r0:r0+R]ᵀ @ X``, the same GEMM as the dense product with fewer rows; on
    CPU fp32 (MKL) its rows come out bit-identical to the dense ``dYᵀ X`` (tests check it),
    elsewhere (other BLAS, CUDA) they agree to fp32 rounding.
    """
    device = indices.device
    out = torch.zeros(indices.numel(), dtype=torch.float32, device=device)
    for seg, (x, dy) in enumerate(zip(inputs, grad_outputs)):
        lo, hi = int(offsets[seg]), int(offsets[seg + 1])
        if hi == lo:
            continue
        n_in, n_out = x.shape[1], dy.shape[1]
        idx = indices[lo:hi]
        rows = idx // n_in  # sorted, as idx is
        x32 = x.float()
        block = min(n_out, max(_WEIGHT_GRAD_MIN_ROWS, _WEIGHT_GRAD_BLOCK // max(1, n_in)))
        pos = 0
        while pos < hi - lo:
            # The block that starts at the next entry's row, moved up to stay inside dW.
            r0 = min(int(rows[pos]), n_out - block)
            end = int(torch.searchsorted(rows, r0 + block))
            part = dy[:, r0:r0 + block].float().T @ x32
            out[lo + pos:lo + end] = part.reshape(-1)[idx[pos:end] - r0 * n_in]
            pos = end
    return out
