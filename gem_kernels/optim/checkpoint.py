"""SparseAdamW checkpoints through torch's own ``state_dict``/``load_state_dict`` and hooks.

``state_dict`` is torch's, plus a ``"sparse_adamw"`` entry (phase, counters, budget, the
selection report, the model's shapes and the configuration). ``load_state_dict`` is torch's,
wrapped by two hooks:

* the pre-hook checks the whole checkpoint first (format, configuration, groups, shapes,
  every sparse and dense state's keys, dtypes, sizes and index ranges, hyper-parameters), so
  a bad checkpoint raises before anything changes; then it takes the sparse params' states
  out of what torch loads, since torch would cast them to the param's dtype (int64 indices
  and fp32 moments of a bf16 param into bf16);
* the post-hook puts those states back, on the params' devices, and restores the phase.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch

from .. import ops
from .layout import AGE_KEY
from .fsdp import local, refuse_dcp

STATE_KEY = "sparse_adamw"
PHASES = ("calibration", "unmasking", "training")
_COUNTERS = ("calibration_done", "unmask_done")
_META_KEYS = ("config", "phase", "selection_started", *_COUNTERS, "resolved_budget", "report", "shapes")


def add_meta(opt, state_dict: dict) -> dict:
    """State-dict post-hook: what torch's state dict does not know about SparseAdamW."""
    refuse_dcp(opt)
    state_dict[STATE_KEY] = {
        "config": opt._config(),
        "phase": opt.phase,
        "selection_started": opt._selection_started,
        "calibration_done": opt._calibration_done,
        "unmask_done": opt._unmask_done,
        "resolved_budget": opt._budget,
        "report": deepcopy(opt._report),
        "shapes": [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups],
        "shard": _shard_meta(opt),
    }
    return state_dict


def _shard_meta(opt):
    """FSDP2: this rank's place (its state holds local indices of its own row blocks), else None."""
    return None if opt._sharding is None else opt._sharding.meta()


def _bad(message: str):
    return ValueError(f"cannot load this checkpoint: {message}; nothing was changed")


def _check_meta(opt, meta, saved_groups) -> None:
    if not isinstance(meta, dict) or any(key not in meta for key in _META_KEYS):
        missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
        raise _bad(f"its 'sparse_adamw' entry lacks {missing}")
    if meta["config"] != opt._config():
        raise ValueError(f"the checkpoint was written with {meta['config']}, this optimizer has "
                         f"{opt._config()}")
    if meta.get("shard") != _shard_meta(opt):  # absent in single-process checkpoints
        raise ValueError(f"the checkpoint holds the optimizer state of FSDP2 shard {meta.get('shard')}, "
                         f"this optimizer's is {_shard_meta(opt)}: under FSDP2 each rank loads the "
                         "state_dict() it saved itself, on the same world size")
    if meta["phase"] not in PHASES:
        raise _bad(f"unknown phase {meta['phase']!r}")
    for key in _COUNTERS:
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise _bad(f"{key} must be an int >= 0, got {meta[key]!r}")
    if len(opt.param_groups) != len(saved_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                         f"has {len(opt.param_groups)}")
    shapes = meta["shapes"]
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]) or len(shapes[gi]) != len(group["params"]):
            raise ValueError(f"param group {gi} has {len(group['params'])} params, the "
                             f"checkpoint's has {len(saved['params'])}")
        if bool(saved.get("sparse")) != group["sparse"]:
            raise ValueError(f"param group {gi} is sparse={group['sparse']} here but "
                             f"sparse={saved.get('sparse')} in the checkpoint")
        for i, (p, shape) in enumerate(zip(group["params"], shapes[gi])):
            if tuple(p.shape) != tuple(shape):
                raise ValueError(f"{opt._describe(gi, i)} does not match the checkpoint's shape "
                                 f"{tuple(shape)}: the checkpoint is from another model")
        try:
            ops.check_adamw_hyper(saved.get("lr"), saved.get("betas"), saved.get("eps"),
                                  saved.get("weight_decay"))
        except ValueError as error:
            raise _bad(f"param group {gi}: {error}") from None


def _check_step(where: str, step) -> None:
    if not isinstance(step, torch.Tensor) or step.numel() != 1:
        raise _bad(f"{where} 'step' must be a one-element tensor")
    value = float(step)
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise _bad(f"{where} 'step' must be a whole number >= 0, got {value}")


def _check_sparse_state(where: str, p, state, incremental: bool, selected: bool) -> None:
    p = local(p)  # FSDP2: the state (sums, indices) is of this rank's block
    if not selected:
        extra = set(state) - {"grad_sum"}
        if extra:
            raise _bad(f"{where} has {sorted(extra)} before the selection")
        if "grad_sum" in state:
            s = state["grad_sum"]
            if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.shape == p.shape):
                raise _bad(f"{where} 'grad_sum' must be float32 of shape {tuple(p.shape)}")
        return
    expected = {"step", "indices", "original", "exp_avg", "exp_avg_sq"} | ({AGE_KEY} if incremental else set())
    if set(state) != expected:
        raise _bad(f"{where} has keys {sorted(state)}, expected {sorted(expected)}")
    _check_step(where, state["step"])
    indices = state["indices"]
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise _bad(f"{where} 'indices' must be a 1-D int64 tensor")
    n = indices.numel()
    dtypes = {"original": (p.dtype,), "exp_avg": (torch.float32,), "exp_avg_sq": (torch.float32,),
              AGE_KEY: (torch.int64,)}
    for key in expected - {"step", "indices"}:
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes[key] or tuple(t.shape) != (n,):
            raise _bad(f"{where} {key!r} must be {dtypes[key][0]} of shape ({n},), got "
                       f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    try:  # every later step trusts these indices (sparse_adamw_ with check_indices=False)
        ops.check_index_set("checkpoint", indices.cpu(), torch.tensor([0, n]), [p.numel()], torch.device("cpu"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's indices for a tensor of shape {tuple(p.shape)} are "
                         f"invalid ({error}): the checkpoint is from another model") from None


def _check_dense_state(where: str, p, state) -> None:
    if not state:
        return
    if set(state) != {"step", "exp_avg", "exp_avg_sq"}:
        raise _bad(f"{where} has keys {sorted(state)}, expected ['exp_avg', 'exp_avg_sq', 'step']")
    _check_step(where, state["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != p.shape:
            raise _bad(f"{where} {key!r} must be a float tensor of shape {tuple(p.shape)}")


def load_pre_hook(opt, state_dict: dict) -> dict:
    """Checks the whole checkpoint, then hands torch the dense part only."""
    refuse_dcp(opt)
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise _bad("it is not an optimizer state dict (no 'state' and 'param_groups')")
    meta = state_dict.get(STATE_KEY)
    if meta is None:
        raise ValueError("state_dict was not written by SparseAdamW (no 'sparse_adamw' entry)")
    saved_groups = state_dict["param_groups"]
    _check_meta(opt, meta, saved_groups)
    incremental = opt.incremental
    selected = bool(meta["selection_started"])
    sparse_states, dense_states = {}, {}
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        for i, (p, key) in enumerate(zip(group["params"], saved["params"])):
            where = f"the checkpoint's state of {opt._describe(gi, i)}"
            state = state_dict["state"].get(key, {})
            if not isinstance(state, dict):
                raise _bad(f"{where} is a {type(state).__name__}, not a dict")
            if group["sparse"]:
                if selected and not state:
                    raise _bad(f"{where} is missing, but the selection has started")
                _check_sparse_state(where, p, state, incremental, selected)
                sparse_states[p] = state
            else:
                _check_dense_state(where, p, state)
                if state:
                    dense_states[key] = state
    opt._loading = (sparse_states, deepcopy(meta))
    return {**state_dict, "state": dense_states}


def load_post_hook(opt) -> None:
    """Puts the sparse states back (their dtypes kept, on the params' devices) and the phase."""
    sparse_states, meta = opt._loading
    del opt._loading
    for p, state in sparse_states.items():
        opt.state[p] = {k: v.clone() if k == "step" else v.to(device=p.device, copy=True)
                        for k, v in state.items()}
    opt._restore(meta)
