"""Every Triton kernel, in every launch configuration its host function can pick, compiles to
a cubin for sm_80 and sm_90 on this GPU-less machine, and ptxas gives it no stack and no local
memory (no spills), as reported by the cuobjdump shipped with Triton (docs/ARCHITECTURE.md,
"How GPU kernels are checked without a GPU")."""
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import gem_kernels.backends.triton  # noqa: E402,F401

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
MODULES = ["layer_stats", "ratio_topk", "sparse_adamw", "sparse_weight_grad"]


def _configs():
    """Each module's compile_configs(): (kernel, signature, constexprs, options[, attrs]); attrs are
    ASTSource's, the launcher's specialisations (e.g. tt.divisibility) the launch would have."""
    for name in MODULES:
        module = sys.modules[f"gem_kernels.backends.triton.{name}"]  # the attribute of the same name is the op
        for kernel, signature, constexprs, options, *attrs in module.compile_configs():
            label = f"{name}.{kernel.__name__}[{','.join(f'{k}={v}' for k, v in constexprs.items())},"
            label += f"{','.join(v for v in signature.values() if v.startswith('*'))},w{options['num_warps']}"
            label += ",aligned]" if attrs else "]"
            yield pytest.param(kernel, signature, constexprs, options, attrs[0] if attrs else None, id=label)


def resource_usage(cubin: bytes, tmp_path) -> dict:
    path = tmp_path / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                          check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    assert {"REG", "STACK", "LOCAL"} <= usage.keys(), f"unexpected cuobjdump output:\n{text}"
    return {k: int(v) for k, v in usage.items()}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                    reason="kernels decorated under the interpreter cannot be compiled")
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize("kernel, signature, constexprs, options, attrs", list(_configs()))
def test_compiles_without_spills(kernel, signature, constexprs, options, attrs, target, tmp_path):
    # The options the host function launches with (num_warps, and fp fusion where it is set).
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    cubin = compiled.asm["cubin"]
    assert cubin[:4] == b"\x7fELF", "no cubin produced"
    usage = resource_usage(cubin, tmp_path)
    print(f"{kernel.__name__} sm{target.arch}: {usage}")
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{kernel.__name__} spills on sm{target.arch}: {usage}"
    assert usage["REG"] <= 255
