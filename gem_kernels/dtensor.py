"""DTensor (FSDP2) helpers any layer may use: whether a tensor is a DTensor, and its local block."""
from __future__ import annotations

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t):
    """The plain local block of a DTensor (a view of it, not a copy), else ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
