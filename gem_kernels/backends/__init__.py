"""The package's own backends. Each module registers its kernels with
``gem_kernels.library.register_kernel`` when imported, for the ops and the device it serves:

* ``cpu``: the compiled C++/OpenMP kernels (``gem_kernels._C``), for CPU tensors;
* ``triton``: the Triton kernels, for CUDA tensors.

A device (or an op) no backend serves runs the reference (``gem_kernels.reference``). A backend
that cannot load here (no ``_C`` build, no Triton) registers nothing.
"""
from . import cpu  # noqa: F401  (registers what _C offers; nothing without a build)

try:
    from . import triton  # noqa: F401
except ImportError:  # no Triton installed: CUDA tensors run the reference
    pass
