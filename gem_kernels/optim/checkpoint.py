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

SparseAdamW's hooks call these functions with what they need; nothing here reads the optimizer.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch

from .. import ops
from ..dtensor import local
from .layout import AGE_KEY, flat_keys, moment_keys
from .state import SelectionState, bad_checkpoint

STATE_KEY = "sparse_adamw"
_META_KEYS = ("config", "phase", "selection_started", "calibration_done", "unmask_done", "resolved_budget",
              "report", "shapes")


def meta(selection: SelectionState, config: dict, param_groups: list, shard) -> dict:
    """The ``sparse_adamw`` entry: what torch's state dict does not know about SparseAdamW
    (``shard``: FSDP2, this rank's place, since its state holds local indices of its own rows)."""
    return {"config": config, **deepcopy(selection.to_dict()),
            "shapes": [[tuple(p.shape) for p in g["params"]] for g in param_groups], "shard": shard}


def _check_meta(entry, saved_groups, *, config, shard, param_groups, describe) -> SelectionState:
    _check_entry(entry, config, shard)
    selection = SelectionState.from_dict(entry)
    if len(param_groups) != len(saved_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, this optimizer "
                         f"has {len(param_groups)}")
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        _check_group(gi, group, saved, entry["shapes"], describe)
    return selection


def _check_entry(entry, config: dict, shard) -> None:
    """The ``sparse_adamw`` entry has every key, and was written by an optimizer of this
    configuration on this FSDP2 shard (or none)."""
    if not isinstance(entry, dict) or any(key not in entry for key in _META_KEYS):
        missing = [k for k in _META_KEYS if not isinstance(entry, dict) or k not in entry]
        raise bad_checkpoint(f"its 'sparse_adamw' entry lacks {missing}")
    if entry["config"] != config:
        raise ValueError(f"the checkpoint was written with {entry['config']}, this optimizer has {config}")
    if entry.get("shard") != shard:  # absent in single-process checkpoints
        raise ValueError(f"the checkpoint holds the optimizer state of FSDP2 shard {entry.get('shard')}, "
                         f"this optimizer's is {shard}: under FSDP2 each rank loads the "
                         "state_dict() it saved itself, on the same world size")


def _check_group(gi: int, group: dict, saved: dict, shapes: list, describe) -> None:
    """Param group ``gi`` matches the checkpoint's ``saved`` group: its params (count, shapes
    as recorded in ``shapes[gi]``), sparse flag and hyper-parameters."""
    if len(group["params"]) != len(saved["params"]) or len(shapes[gi]) != len(group["params"]):
        raise ValueError(f"param group {gi} has {len(group['params'])} params, the "
                         f"checkpoint's has {len(saved['params'])}")
    if bool(saved.get("sparse")) != group["sparse"]:
        raise ValueError(f"param group {gi} is sparse={group['sparse']} here but "
                         f"sparse={saved.get('sparse')} in the checkpoint")
    for i, (p, shape) in enumerate(zip(group["params"], shapes[gi])):
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"{describe(gi, i)} does not match the checkpoint's shape "
                             f"{tuple(shape)}: the checkpoint is from another model")
    try:
        ops.check_adamw_hyper(saved.get("lr"), saved.get("betas"), saved.get("eps"),
                              saved.get("weight_decay"))
    except ValueError as error:
        raise bad_checkpoint(f"param group {gi}: {error}") from None


def _check_step(where: str, step) -> None:
    if not isinstance(step, torch.Tensor) or step.numel() != 1:
        raise bad_checkpoint(f"{where} 'step' must be a one-element tensor")
    value = float(step)
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise bad_checkpoint(f"{where} 'step' must be a whole number >= 0, got {value}")


def _check_sparse_state(where: str, p, state, incremental: bool, selected: bool, moments: tuple) -> None:
    p = local(p)  # FSDP2: the state (sums, indices) is of this rank's block
    if not selected:
        extra = set(state) - {"grad_sum"}
        if extra:
            raise bad_checkpoint(f"{where} has {sorted(extra)} before the selection")
        if "grad_sum" in state:
            s = state["grad_sum"]
            if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.shape == p.shape):
                raise bad_checkpoint(f"{where} 'grad_sum' must be float32 of shape {tuple(p.shape)}")
        return
    expected = set(("step", "original") + flat_keys(moments, incremental))
    if set(state) != expected:
        raise bad_checkpoint(f"{where} has keys {sorted(state)}, expected {sorted(expected)}")
    _check_step(where, state["step"])
    indices = state["indices"]
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        raise bad_checkpoint(f"{where} 'indices' must be a 1-D int64 tensor")
    n = indices.numel()
    dtypes = {"original": (p.dtype,), AGE_KEY: (torch.int64,), **{key: (torch.float32,) for key in moments}}
    for key in expected - {"step", "indices"}:
        t = state[key]
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes[key] or tuple(t.shape) != (n,):
            raise bad_checkpoint(f"{where} {key!r} must be {dtypes[key][0]} of shape ({n},), got "
                       f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    try:  # every later step trusts these indices (sparse_adamw_ with check_indices=False)
        ops.check_index_set("checkpoint", indices.cpu(), torch.tensor([0, n]), [p.numel()], torch.device("cpu"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"the checkpoint's indices for a tensor of shape {tuple(p.shape)} are "
                         f"invalid ({error}): the checkpoint is from another model") from None


def _check_dense_state(where: str, p, state, moments: tuple) -> None:
    if not state:
        return
    if set(state) != {"step", *moments}:
        raise bad_checkpoint(f"{where} has keys {sorted(state)}, expected {sorted(['step', *moments])}")
    _check_step(where, state["step"])
    for key in moments:
        t = state[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != p.shape:
            raise bad_checkpoint(f"{where} {key!r} must be a float tensor of shape {tuple(p.shape)}")


def split(state_dict: dict, *, config: dict, shard, param_groups: list, describe, incremental: bool) -> tuple:
    """Checks the whole checkpoint; returns ``(dense state dict for torch, sparse states by
    param, the SelectionState it holds)``."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise bad_checkpoint("it is not an optimizer state dict (no 'state' and 'param_groups')")
    entry = state_dict.get(STATE_KEY)
    if entry is None:
        raise ValueError("state_dict was not written by SparseAdamW (no 'sparse_adamw' entry; "
                         "torch.distributed.checkpoint's optimizer helpers leave it out: save and load "
                         "opt.state_dict() itself); nothing was changed")
    saved_groups = state_dict["param_groups"]
    selection = _check_meta(entry, saved_groups, config=config, shard=shard, param_groups=param_groups,
                            describe=describe)
    sparse_states, dense_states = {}, {}
    for gi, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        for i, (p, key) in enumerate(zip(group["params"], saved["params"])):
            where = f"the checkpoint's state of {describe(gi, i)}"
            state = state_dict["state"].get(key, {})
            if not isinstance(state, dict):
                raise bad_checkpoint(f"{where} is a {type(state).__name__}, not a dict")
            if group["sparse"]:
                if selection.selection_started and not state:
                    raise bad_checkpoint(f"{where} is missing, but the selection has started")
                _check_sparse_state(where, p, state, incremental, selection.selection_started, moment_keys(saved))
                sparse_states[p] = state
            else:
                _check_dense_state(where, p, state, moment_keys(saved))
                if state:
                    dense_states[key] = state
    return {**state_dict, "state": dense_states}, sparse_states, selection


def restore_sparse_states(state: dict, sparse_states: dict) -> None:
    """Puts the sparse states into torch's ``state``: their dtypes kept, on the params' devices."""
    for p, saved in sparse_states.items():
        state[p] = {k: v.clone() if k == "step" else v.to(device=p.device, copy=True) for k, v in saved.items()}
