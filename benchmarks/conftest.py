"""pytest setup for the benchmark suites: collects bench_*.py here, picks the mode, and
parametrises the suites over cases, densities, devices and live backends.

This conftest only applies under benchmarks/, so `pytest tests/` is unaffected.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the suites import _common by name
import _common  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-mode", choices=_common.MODES, default=None,
                     help="benchmark sizes: smoke (tiny, correctness), quick or full; default "
                          "GEM_BENCH_MODE, else smoke with --benchmark-disable, else full")


def pytest_collect_file(file_path, parent):
    # The suites are named bench_*.py so that `pytest tests/` never picks them up. A file named
    # on the command line is collected by pytest itself already.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") \
            and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def bench_mode(config) -> str:
    mode = config.getoption("--bench-mode", default=None) or os.environ.get("GEM_BENCH_MODE")
    if mode is None:
        mode = "smoke" if config.getoption("benchmark_disable", default=False) else "full"
    if mode not in _common.MODES:
        raise pytest.UsageError(f"GEM_BENCH_MODE={mode!r} is not one of {_common.MODES}")
    return mode


def pytest_report_header(config):
    return f"gem_kernels benchmarks: mode={bench_mode(config)}"


def pytest_generate_tests(metafunc):
    mode = bench_mode(metafunc.config)
    names = metafunc.fixturenames
    if "case" in names:
        metafunc.parametrize("case", _common.MODE_CASES[mode])
    if "density" in names:
        metafunc.parametrize("density", _common.MODE_DENSITIES[mode], ids=lambda d: f"d{d:g}")
    if "device" in names:
        metafunc.parametrize("device", _common.devices())
    if "device_backend" in names:
        live = _common.live_backends()
        if live:
            metafunc.parametrize("device_backend", live, ids=[f"{d}-{b}" for d, b in live])
        else:
            import gem_kernels
            metafunc.parametrize("device_backend", [pytest.param(
                None, marks=pytest.mark.skip(reason="no compiled backend is live here "
                                             f"(gem_kernels.live_backends() = {gem_kernels.live_backends()})"))])


@pytest.fixture
def backend(device_backend):
    """The backend module under test (called directly, past ops.py's validation)."""
    return _common.backend_module(device_backend[1])


@pytest.fixture
def backend_device(device_backend):
    return device_backend[0]


@pytest.fixture
def backend_name(device_backend):
    return device_backend[1]


@pytest.fixture
def rounds(request):
    return _common.MODE_ROUNDS[bench_mode(request.config)]
