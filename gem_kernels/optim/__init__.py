"""SparseAdamW in parts: ``sparse_adamw`` (the class, which routes), ``phases`` (what a step
does in calibration, unmasking and training), ``layout`` (the O(k) state and its flat
buffers), ``grads`` (the selected-gradient hook, its ownership, clipping), ``checkpoint``
(state-dict hooks) and ``sharded`` (what differs for FSDP2 params)."""
from .sparse_adamw import DEFAULT_CALIBRATION_STEPS, SparseAdamW

__all__ = ["SparseAdamW", "DEFAULT_CALIBRATION_STEPS"]
