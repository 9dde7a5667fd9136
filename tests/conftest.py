"""Shared fixtures of the test suite."""
import pytest


@pytest.fixture
def force_backend():
    """``force_backend(name)`` makes every op run one backend (gem_kernels.library.force_backend)
    until the test ends."""
    from gem_kernels import library
    yield library.force_backend
    library.backend_from_environment()
