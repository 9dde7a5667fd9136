"""Which weight gradient a ``SparseDeltaLinear`` computes: the selected entries by
``gem_kernels::sparse_weight_grad`` ("sparse") or the dense ``dYᵀX`` then a gather ("dense").

On CPU the sparse op was measured faster on every shape (benchmarks/results/step_cost.md). On a
GPU the answer is the committed table ``weight_grad_dispatch.json`` beside this file: rows of the
GPU suite's measurements (benchmarks/gpu_suite.py, stage ``weight_grad_timings``; docs/gpu.md),
keyed by device name, dtype and density band. A case the table has no row for, measured nowhere,
takes the dense path: a GPU's matmul library is the safe default there.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("weight_grad_dispatch.json")


@functools.lru_cache(maxsize=None)
def table() -> dict:
    return json.loads(TABLE.read_text())


def table_choice(rows: list, device_name: str, dtype: str, density: float) -> tuple:
    """``("sparse", configuration)`` where a row of ``rows`` has this device name, dtype and a band
    holding ``density`` and says sparse; else ``("dense", None)``: unmeasured means dense."""
    for row in rows:
        in_band = row["density_low"] < density <= row["density_high"]
        if (row["device"], row["dtype"]) == (device_name, dtype) and in_band:
            return (row["choice"], row["config"]) if row["choice"] == "sparse" else ("dense", None)
    return "dense", None


def weight_grad_path(device: torch.device, dtype: torch.dtype, density: float) -> str:
    """"sparse" or "dense" for a layer of ``density`` (selected entries over weight entries)
    computing in ``dtype`` on ``device``."""
    if device.type == "cpu":
        return "sparse"
    if device.type != "cuda":
        return "dense"
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _device_name(index)
    return table_choice(table().get("rows", []), name, str(dtype).replace("torch.", ""), density)[0]


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    """Asked once per device: every layer's backward looks it up."""
    return torch.cuda.get_device_name(index)
