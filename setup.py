"""Builds gem_kernels._C with CMake + Ninja + pybind11 (no torch needed at build time).

Metadata lives in pyproject.toml; this file only wires the CMake build into setuptools.
Environment:
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (CMake's own variable).
"""
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])  # CMakeLists.txt lists the sources


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import cmake  # the build requirements from pyproject.toml
        import ninja
        import pybind11

        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # Configure afresh each time, keeping the objects so unchanged sources are not recompiled:
        # a cached configuration keeps what an earlier run found (compiler, Python, OpenMP) even
        # after the environment changed.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        cmake_exe = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        configure = [
            cmake_exe, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGEM_KERNELS_OUTPUT_DIR={output_dir}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run([cmake_exe, "--build", str(build_dir)], check=True)


setup(ext_modules=[CMakeExtension("gem_kernels._C")], cmdclass={"build_ext": CMakeBuild})
