"""gem_kernels: kernels and a drop-in AdamW for sparse fine-tuning (GEM, ID³)."""
import warnings as _warnings

__version__ = "0.1.0"

try:
    from . import _C  # noqa: F401  (the compiled CPU kernels)
except ImportError as _error:  # the package still works, on the reference ops
    _warnings.warn(f"gem_kernels._C could not be imported ({_error}); CPU tensors will use the "
                   "pure-PyTorch reference ops. Reinstall with `pip install .` to build it.",
                   RuntimeWarning, stacklevel=2)

from . import backends as _backends  # noqa: E402,F401  (each registers its kernels with torch)
from .delta import apply_delta, remove_delta, save_delta  # noqa: E402
from .nn import SparseDeltaLinear, merge_, sparsify_  # noqa: E402
from .ops import layer_stats, live_backends, ratio_topk, sparse_adamw_, sparse_weight_grad  # noqa: E402
from .optim import SparseAdamW  # noqa: E402
from .peft_export import export_peft_shira, export_peft_supertuning  # noqa: E402  (imports peft only when called)
from .selectors import GEM, ID3, GradMagnitude, Random  # noqa: E402

__all__ = ["__version__", "live_backends", "layer_stats", "ratio_topk", "sparse_adamw_", "sparse_weight_grad",
           "SparseAdamW", "GEM", "ID3", "GradMagnitude", "Random", "save_delta", "apply_delta", "remove_delta",
           "export_peft_shira", "export_peft_supertuning", "SparseDeltaLinear", "sparsify_", "merge_"]
