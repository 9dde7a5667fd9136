"""The state of a param and its group's flat buffers.

Per sparse param, once the selection has started, ``state`` holds ``step`` (int64, CPU),
``indices`` (int64 flat indices, ascending), ``original`` (the values there when selected,
param dtype), the group's moments (``moment_keys``: fp32, one per index) and, for incremental
selectors, ``age`` (int64: each entry's own step count). Within a group, ``indices``, the
moments and ``age`` are views into one flat buffer per key, so a group's update is one op call
with no copies; ``GroupLayout`` owns those buffers. A dense param's state is torch AdamW's:
``step`` and the same moments, each shaped like the param.
"""
from __future__ import annotations

import torch

from ..dtensor import local

Tensor = torch.Tensor

AGE_KEY = "age"


def moment_keys(group: dict) -> tuple:
    """The moments each param of ``group`` keeps, in the order ``sparse_adamw_`` takes them
    (``reference.ADAMW_STATE``): AdamW's two, and AMSGrad's running maximum of exp_avg_sq."""
    return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())


def flat_keys(moments: tuple, incremental: bool) -> tuple:
    """The keys of a sparse param's state that are flat buffers of its group."""
    return ("indices",) + moments + ((AGE_KEY,) if incremental else ())


def new_state(p: Tensor, indices: Tensor, moments: tuple, incremental: bool) -> dict:
    """The state of a param whose entries ``indices`` were just selected (moments 0)."""
    n = indices.numel()
    state = {
        "step": torch.tensor(0, dtype=torch.int64),
        "indices": indices,
        "original": local(p).detach().reshape(-1)[indices].clone(),  # FSDP2: local indices
        **{key: torch.zeros(n, dtype=torch.float32, device=p.device) for key in moments},
    }
    if incremental:
        state[AGE_KEY] = torch.zeros(n, dtype=torch.int64, device=p.device)
    return state


def merged_state(state: dict, p: Tensor, new_indices: Tensor, moments: tuple) -> dict:
    """A new state with never-selected entries ``new_indices`` added, kept sorted; their moments
    and ages start at 0. ``state`` itself is not changed."""
    if new_indices.numel() == 0:
        return dict(state)
    incremental = AGE_KEY in state
    fresh = new_state(p, new_indices, moments, incremental)  # never written: the original values
    order = torch.argsort(torch.cat([state["indices"], new_indices]))
    merged = {"step": state["step"]}
    for key in ("original",) + flat_keys(moments, incremental):
        merged[key] = torch.cat([state[key], fresh[key]])[order]
    return merged


class GroupLayout:
    """The flat buffers of one sparse group; each param's state tensors become views of them."""

    def __init__(self, params: list, states: list, moments: tuple, incremental: bool):
        self.moments = moments
        self.keys = flat_keys(moments, incremental)
        self.shapes = [local(p).shape for p in params]  # the index sets address these shapes
        device = params[0].device if params else torch.device("cpu")
        self.flat = {key: torch.cat([s[key] for s in states]) if states else
                     torch.zeros(0, dtype=torch.int64 if key in ("indices", AGE_KEY) else torch.float32)
                     for key in self.keys}
        self.offsets = _offsets(states, device)
        bounds = self.offsets.tolist()
        for i, state in enumerate(states):
            for key in self.keys:
                state[key] = self.flat[key][bounds[i]:bounds[i + 1]]

    def buffers(self, positions: list, states: list) -> tuple:
        """``(indices, offsets, moments, age)`` of the params at ``positions`` in the group, as
        ``sparse_adamw_`` takes them (``age`` None unless incremental): the flat buffers themselves
        when that is every param, else concatenated copies (``write_back`` then)."""
        if len(positions) == len(states):
            flat, offsets = self.flat, self.offsets
        else:
            sub = [states[i] for i in positions]
            flat = {key: torch.cat([s[key] for s in sub]) for key in self.keys}
            offsets = _offsets(sub, self.offsets.device)
        return flat["indices"], offsets, [flat[key] for key in self.moments], flat.get(AGE_KEY)

    def write_back(self, positions: list, states: list, buffers: tuple) -> None:
        """Copies updated moments (and ages) of a subset call back into the params' views."""
        if len(positions) == len(states):
            return
        _, offsets, moments, age = buffers
        bounds = offsets.tolist()
        updated = dict(zip(self.moments, moments), **({AGE_KEY: age} if age is not None else {}))
        for j, i in enumerate(positions):
            for key, flat in updated.items():  # indices never change in an update
                states[i][key].copy_(flat[bounds[j]:bounds[j + 1]])


def _offsets(states: list, device) -> Tensor:
    """Where each state's entries start in its group's flat buffers, and the total: ``[L + 1]``."""
    offsets = torch.zeros(len(states) + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.tensor([s["indices"].numel() for s in states], dtype=torch.int64).cumsum(0)
    return offsets
