"""The ``triton`` backend: Triton kernels of the ops (docs/ARCHITECTURE.md, "The ops"), one launch per
op stage over all segments, registered as every op's kernel for CUDA tensors.

Importing this package raises ImportError when Triton is missing (``gem_kernels.backends`` then
leaves CUDA tensors to the reference). Under ``TRITON_INTERPRET=1`` the same functions run on CPU
tensors; tests register them for the CPU that way (tests/conftest.py).
"""
import triton  # noqa: F401  (absolute: the real Triton, so a missing install fails the import)

from ...library import register_kernel
from .layer_stats import layer_stats
from .ratio_topk import RATIO_TOPK_PASSES, ratio_topk
from .sparse_adamw import sparse_adamw_
from .sparse_weight_grad import sparse_weight_grad

KERNELS = (layer_stats, ratio_topk, sparse_adamw_, sparse_weight_grad)
for _kernel in KERNELS:
    register_kernel(_kernel.__name__, "cuda")(_kernel)

__all__ = ["layer_stats", "ratio_topk", "sparse_adamw_", "sparse_weight_grad", "RATIO_TOPK_PASSES", "KERNELS"]
