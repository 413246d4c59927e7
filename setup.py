"""Build of nudgefast and its compiled CPU backend, the pybind11 module ``nudgefast._cpu``.

The build is portable (no ``-march=native``): a wheel runs on any x86-64 CPU. The kernels' inner
loops (``csrc/cpu/kernels/*.cpp``) are compiled once per instruction-set level, each with its own
flags (``ISA_LEVELS``), and the module picks the best level the CPU and OS support at import
(``csrc/cpu/dispatch.hpp``; ``NUDGEFAST_CPU_ISA`` forces a lower one). A level whose flags the
compiler refuses (another architecture, an old compiler) is left out; MSVC builds the baseline only.
Everything else is compiled for the baseline. OpenMP is required for multi-threading; without it
the kernels run on one thread.
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


#: Instruction-set levels above the baseline: (name, GCC/Clang flags). Each compiles
#: csrc/cpu/kernels/*.cpp once more with -DNUDGEFAST_LEVEL=<name>, and the driver learns of it
#: through -DNUDGEFAST_HAVE_<NAME>.
ISA_LEVELS = [
    ("avx2", ["-mavx2", "-mfma", "-mf16c"]),
    ("avx512", ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"]),
]
KERNEL_SOURCES = sorted(glob("csrc/cpu/kernels/*.cpp"))


def _weak_symbols(objects: list[str]) -> list[str]:
    """Weak (COMDAT) symbols defined by level objects: the linker keeps one copy of each for the
    whole module, possibly an AVX-512 one where baseline code calls it. Empty when ``nm`` is
    missing."""
    nm = shutil.which("nm")
    if nm is None:
        return []
    out = subprocess.run([nm, "--defined-only", "-C", *objects], capture_output=True, text=True).stdout
    return sorted({line.split(" ", 2)[2] for line in out.splitlines()
                   if line.count(" ") >= 2 and line.split(" ", 2)[1] in ("W", "V", "u")})


class BuildExt(build_ext):
    """build_ext that picks optimisation, SIMD and OpenMP flags the compiler actually accepts,
    and compiles the kernels once per instruction-set level."""

    levels: list[tuple[str, list[str]]] = []

    def build_extension(self, ext):
        # Each level's kernels go to their own folder (same sources, other flags and macros).
        objects = []
        for name, level_flags in self.levels:
            level_objects = self.compiler.compile(
                KERNEL_SOURCES, output_dir=os.path.join(self.build_temp, "isa", name),
                macros=[*ext.define_macros, ("NUDGEFAST_LEVEL", name)], include_dirs=ext.include_dirs,
                extra_postargs=[*ext.extra_compile_args, *level_flags], depends=ext.depends)
            objects += level_objects
            # Inline functions must stay in the level's own namespace (common.hpp): a weak symbol
            # outside it (a standard-library template, say) may be the copy baseline code runs.
            if name != "baseline" and self.compiler.compiler_type != "msvc":
                # (A name that mentions the level's namespace, even as a template argument or
                # a return type, is that level's own.)
                shared = [s for s in _weak_symbols(level_objects) if f"nudgefast::{name}::" not in s]
                if shared:
                    raise RuntimeError(f"nudgefast: the {name} kernels define weak symbols outside "
                                       f"nudgefast::{name}, which the linker may share with baseline code: "
                                       + ", ".join(shared[:10]))
        ext.extra_objects = [*objects, *ext.extra_objects]
        super().build_extension(ext)

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            flags, link = ["/O2", "/openmp", "/std:c++17"], []  # portable: no /arch
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
        levels = [("baseline", [])]
        if self.compiler.compiler_type != "msvc":
            levels += [(name, level_flags) for name, level_flags in ISA_LEVELS if _compiles(cxx, level_flags)]
        self.levels = levels
        for ext in self.extensions:
            ext.extra_compile_args += flags
            ext.extra_link_args += link
            ext.define_macros += [(f"NUDGEFAST_HAVE_{name.upper()}", "1") for name, _ in levels[1:]]
            ext.depends += KERNEL_SOURCES
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
        sorted(glob("csrc/cpu/*.cpp")),  # the driver, baseline; the kernels: BuildExt.build_extension
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
        # dry run), outside pip's isolated build environment. sentence-transformers: parity of
        # nf.quantize's codes with its quantize_embeddings (it runs on the pinned CPU torch).
        # dask / zarr: tests/test_dask.py (a 2-process LocalCluster; skipped without them).
        "test": ["pytest", "pytest-benchmark", "faiss-cpu", "matplotlib", "torch==2.13.0",
                 "nudge-ft==0.1.2", "pybind11>=2.12", "pyarrow", "sentence-transformers==6.2.0",
                 "dask[distributed]", "zarr"],
        # Corpora as row-chunked dask arrays (Zarr, .npy shards) read on a cluster:
        # search / NudgeN.fit / NudgeM.fit / NudgeResult.apply (nudgefast._dask).
        "dask": ["dask[distributed]", "zarr"],
        # Hand-off targets (Delta.apply_to): FAISS indexes, Arrow tables / Parquet files.
        "faiss": ["faiss-cpu"],
        "arrow": ["pyarrow"],
        # usearch: the exact int8 / binary search bench/quant_report.py compares against
        # (what Sentence-Transformers' semantic_search_usearch runs); sentence-transformers:
        # its semantic_search_faiss peer.
        "bench": ["pytest-benchmark", "faiss-cpu", "matplotlib", "usearch",
                  "sentence-transformers==6.2.0"],
    },
    entry_points={"console_scripts": ["nudgefast = nudgefast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    zip_safe=False,
)
