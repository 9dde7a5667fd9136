"""Triton kernels of the ops (docs/ARCHITECTURE.md, "The ops"): one launch per op stage over all segments.

Importing this package raises ImportError when Triton is missing, which ``gem_kernels.ops``
reads as "this backend is not live".
"""
import triton  # noqa: F401  (absolute: the real Triton, so a missing install fails the import)

from .layer_stats import layer_stats
from .ratio_topk import RATIO_TOPK_PASSES, ratio_topk
from .sparse_adamw import sparse_adamw_
from .sparse_weight_grad import sparse_weight_grad

__all__ = ["layer_stats", "ratio_topk", "sparse_adamw_", "sparse_weight_grad", "RATIO_TOPK_PASSES"]
