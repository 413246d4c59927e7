"""Build of nudgefast and its compiled CPU backend, the pybind11 module ``nudgefast._cpu``.

Compiler flags are chosen here per platform, with a safe fallback: ``-march=native`` when the
compiler accepts it, else ``-mavx2 -mfma -mf16c``, else none (the kernels keep a portable path).
Set ``NUDGEFAST_PORTABLE=1`` to build without ``-march=native`` (e.g. for a wheel that will run on
other machines). OpenMP is required for multi-threading; without it the kernels run on one thread.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from glob import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


def _compiles(compiler_cmd: list[str], flags: list[str]) -> bool:
    """Whether the C++ compiler accepts ``flags`` on a tiny translation unit (and can link it)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cmd = [*compiler_cmd, *flags, src, "-o", os.path.join(tmp, "probe")]
        try:
            return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        except OSError:
            return False


class BuildExt(build_ext):
    """build_ext that picks optimisation, SIMD and OpenMP flags the compiler actually accepts."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags, link = ["/O2", "/openmp", "/arch:AVX2", "/std:c++17"], []
        else:
            cxx = list(self.compiler.compiler_so[:1]) or [os.environ.get("CXX", "c++")]
            if shutil.which(cxx[0]) is None:
                cxx = [os.environ.get("CXX", "c++")]
            # No fused multiply-add contraction: the small float64 ops must round like NumPy.
            flags = ["-O3", "-ffp-contract=off"]
            link = []
            if _compiles(cxx, ["-fopenmp"]):
                flags.append("-fopenmp")
                link.append("-fopenmp")
            else:
                print("nudgefast: the compiler does not accept -fopenmp; building single-threaded", file=sys.stderr)
            if not os.environ.get("NUDGEFAST_PORTABLE") and _compiles(cxx, ["-march=native"]):
                flags.append("-march=native")
            elif _compiles(cxx, ["-mavx2", "-mfma", "-mf16c"]):
                flags += ["-mavx2", "-mfma", "-mf16c"]
        for ext in self.extensions:
            ext.extra_compile_args += flags
            ext.extra_link_args += link
        super().build_extensions()


class BuildPy(build_py):
    """Also ship the CUDA kernel sources (csrc/cuda) inside the package as ``nudgefast/_cuda``:
    the CUDA backend compiles them at run time with CuPy's RawModule (NVRTC)."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "nudgefast", "_cuda")
        os.makedirs(target, exist_ok=True)
        for src in sorted(glob("csrc/cuda/*.cu") + glob("csrc/cuda/*.cuh")):
            shutil.copy(src, target)


ext_modules = [
    Pybind11Extension(
        "nudgefast._cpu",
        sorted(glob("csrc/cpu/*.cpp")),
        include_dirs=["csrc/cpu"],
        depends=sorted(glob("csrc/cpu/*.hpp")),
        cxx_std=17,
    ),
]

setup(
    name="nudgefast",
    version="0.1.0",
    description="NUDGE embedding fine-tuning (arXiv 2409.02343) at hardware speed: CPU (OpenMP) and CUDA kernels",
    packages=find_packages(include=["nudgefast*"]),
    package_data={"nudgefast": ["data/*/*"]},
    python_requires=">=3.9",
    install_requires=["numpy>=1.24", "numba>=0.59", "tqdm", "scipy"],
    extras_require={
        "cuda12": ["cupy-cuda12x"],
        "cuda13": ["cupy-cuda13x"],
        # The reference nudge-ft (parity tests and the accuracy table) needs torch; pinned to
        # 2.13.0, the CPU build this project's machines install (an unpinned torch pulls a
        # multi-GB CUDA build). nudge-ft itself only asks for numpy and torch.
        # pybind11: the tests build the extension once more (the ASan build, the device check's
        # dry run), outside pip's isolated build environment.
        "test": ["pytest", "pytest-benchmark", "faiss-cpu", "matplotlib", "torch==2.13.0",
                 "nudge-ft==0.1.2", "pybind11>=2.12", "pyarrow"],
        # Hand-off targets (Delta.apply_to): FAISS indexes, Arrow tables / Parquet files.
        "faiss": ["faiss-cpu"],
        "arrow": ["pyarrow"],
        "bench": ["pytest-benchmark", "faiss-cpu", "matplotlib"],
    },
    entry_points={"console_scripts": ["nudgefast = nudgefast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    zip_safe=False,
)
