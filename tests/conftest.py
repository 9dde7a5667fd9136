"""Shared fixtures of the test suite."""
import contextlib

import pytest
from backend_kernels import backend_module, kernels_of


@pytest.fixture
def use_backend():
    """``use_backend(name)`` makes every op run backend ``name``'s kernels on CPU tensors (the Triton
    kernels under ``TRITON_INTERPRET=1``) until the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda name: stack.enter_context(kernels_of(backend_module(name), "cpu"))
