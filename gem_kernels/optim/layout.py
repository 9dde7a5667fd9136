"""The sparse state of a param and its group's flat buffers.

Per sparse param, once the selection has started, ``state`` holds ``step`` (int64, CPU),
``indices`` (int64 flat indices, ascending), ``original`` (the values there when selected,
param dtype), ``exp_avg``/``exp_avg_sq`` (fp32, one per index), for AMSGrad
``max_exp_avg_sq`` (fp32, one per index) and, for incremental selectors, ``age`` (int64: each
entry's own step count). Within a group, ``indices``, the moments and
``age`` are views into one flat buffer per key, so a group's update is one op call with no
copies; ``GroupLayout`` owns those buffers.
"""
from __future__ import annotations

import torch

from ..dtensor import local

Tensor = torch.Tensor

FLAT_KEYS = ("indices", "exp_avg", "exp_avg_sq")
MAX_KEY = "max_exp_avg_sq"  # AMSGrad's running maximum of exp_avg_sq
AGE_KEY = "age"


def flat_keys(incremental: bool, amsgrad: bool) -> tuple:
    return FLAT_KEYS + ((MAX_KEY,) if amsgrad else ()) + ((AGE_KEY,) if incremental else ())


def new_state(p: Tensor, indices: Tensor, incremental: bool, amsgrad: bool) -> dict:
    """The state of a param whose entries ``indices`` were just selected (moments 0)."""
    n = indices.numel()
    state = {
        "step": torch.tensor(0, dtype=torch.int64),
        "indices": indices,
        "original": local(p).detach().reshape(-1)[indices].clone(),  # FSDP2: local indices
        "exp_avg": torch.zeros(n, dtype=torch.float32, device=p.device),
        "exp_avg_sq": torch.zeros(n, dtype=torch.float32, device=p.device),
    }
    if amsgrad:
        state[MAX_KEY] = torch.zeros(n, dtype=torch.float32, device=p.device)
    if incremental:
        state[AGE_KEY] = torch.zeros(n, dtype=torch.int64, device=p.device)
    return state


def merged_state(state: dict, p: Tensor, new_indices: Tensor) -> dict:
    """A new state with never-selected entries ``new_indices`` added, kept sorted; their moments
    and ages start at 0. ``state`` itself is not changed."""
    if new_indices.numel() == 0:
        return dict(state)
    keys = flat_keys(AGE_KEY in state, MAX_KEY in state)
    fresh = new_state(p, new_indices, AGE_KEY in state, MAX_KEY in state)  # never written: the original values
    order = torch.argsort(torch.cat([state["indices"], new_indices]))
    merged = {"step": state["step"]}
    for key in ("indices", "original") + keys[1:]:
        merged[key] = torch.cat([state[key], fresh[key]])[order]
    return merged


class GroupLayout:
    """The flat buffers of one sparse group; each param's state tensors become views of them."""

    def __init__(self, params: list, states: list, incremental: bool, amsgrad: bool):
        self.keys = flat_keys(incremental, amsgrad)
        self.shapes = [local(p).shape for p in params]  # the index sets address these shapes
        device = params[0].device if params else torch.device("cpu")
        counts = [s["indices"].numel() for s in states]
        self.flat = {key: torch.cat([s[key] for s in states]) if states else
                     torch.zeros(0, dtype=torch.int64 if key in ("indices", AGE_KEY) else torch.float32)
                     for key in self.keys}
        self.offsets = torch.zeros(len(params) + 1, dtype=torch.int64, device=device)
        self.offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        self.bounds = self.offsets.tolist()
        for i, state in enumerate(states):
            for key in self.keys:
                state[key] = self.flat[key][self.bounds[i]:self.bounds[i + 1]]

    def arguments(self, positions: list, states: list) -> dict:
        """Index set and state buffers of the params at ``positions`` in the group: the flat buffers
        themselves when that is every param, else concatenated copies (``write_back`` then)."""
        if len(positions) == len(states):
            return {"offsets": self.offsets, **self.flat}
        sub = [states[i] for i in positions]
        offsets = torch.zeros(len(positions) + 1, dtype=torch.int64, device=self.offsets.device)
        offsets[1:] = torch.tensor([s["indices"].numel() for s in sub], dtype=torch.int64).cumsum(0)
        return {"offsets": offsets, **{key: torch.cat([s[key] for s in sub]) for key in self.keys}}

    def write_back(self, positions: list, states: list, buffers: dict) -> None:
        """Copies updated moments (and ages) of a subset call back into the params' views."""
        if len(positions) == len(states):
            return
        bounds = buffers["offsets"].tolist()
        for j, i in enumerate(positions):
            for key in self.keys[1:]:  # indices never change in an update
                states[i][key].copy_(buffers[key][bounds[j]:bounds[j + 1]])
