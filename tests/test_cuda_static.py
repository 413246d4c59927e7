"""What of the CUDA backend can be checked without a GPU or CuPy: the kernels compile for
sm_80/sm_90 with the runtime's options and the top-k kernels neither spill nor exceed their
register budget (.ci/cuda_check.sh), and the pure-Python policy of the corpus pass (out-of-memory
classification, chunk caps, stopping at a bad row) run against a stub ``cupy`` module.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


class _FakeOOM(MemoryError):
    pass


class _FakeRuntimeError(RuntimeError):
    """Shaped like cupy_backends' CUDARuntimeError: the cudaError_t code in ``status``."""

    def __init__(self, status):
        self.status = status
        super().__init__(f"cudaError {status}")


class _FakePool:
    def __init__(self):
        self.freed = 0

    def free_all_blocks(self):
        self.freed += 1

    def free_bytes(self):
        return 0


def _stub_cupy(free_bytes=1 << 30):
    pools = {"device": _FakePool(), "pinned": _FakePool()}
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=_FakeRuntimeError,
                                    memGetInfo=lambda: (free_bytes, 2 * free_bytes))
    cuda = types.SimpleNamespace(runtime=runtime, memory=types.SimpleNamespace(OutOfMemoryError=_FakeOOM),
                                 get_current_stream=lambda: None)
    cp = types.ModuleType("cupy")
    cp.cuda = cuda
    cp.float16, cp.float32 = np.float16, np.float32
    cp.get_default_memory_pool = lambda: pools["device"]
    cp.get_default_pinned_memory_pool = lambda: pools["pinned"]
    return cp, pools


@pytest.fixture
def backend(monkeypatch):
    """cuda_backend loaded under a private name over a stub cupy (sys.modules restored after)."""
    cp, pools = _stub_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    spec = importlib.util.spec_from_file_location("_nudgefast_cuda_backend_static",
                                                  ROOT / "nudgefast" / "_backends" / "cuda_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._test_pools = pools
    return module


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_check_script_passes():
    res = subprocess.run(["bash", str(ROOT / ".ci" / "cuda_check.sh")], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "cuda_check: passed" in res.stdout
    for kernel in ("topk_select_f32", "topk_select_f16_vec", "topk_keys_f16", "query_gradient_f64",
                   "qtopk_int8_scores", "qtopk_hamming_scores", "qtopk_select"):
        assert kernel in res.stdout


def test_out_of_memory_classification(backend):
    assert backend._is_oom(_FakeOOM())
    assert backend._is_oom(_FakeRuntimeError(2))  # cudaErrorMemoryAllocation: failed cudaHostAlloc
    assert not backend._is_oom(_FakeRuntimeError(1))  # cudaErrorInvalidValue: a bug, not memory
    assert not backend._is_oom(_FakeRuntimeError(700))  # illegal address: sticky, must surface
    assert not backend._is_oom(MemoryError())  # host MemoryError outside CUDA: not ours to retry
    assert not backend._is_oom(ValueError("x"))


def test_shrink_halves_frees_both_pools_and_stops_at_the_floor(backend):
    floor = backend.STREAM["min_chunk_rows"]
    assert backend._shrink(8 * floor, _FakeRuntimeError(2)) == 4 * floor
    assert backend._test_pools["device"].freed == 1 and backend._test_pools["pinned"].freed == 1
    assert backend._shrink(floor + 1, _FakeOOM()) == floor
    exc = _FakeRuntimeError(2)
    with pytest.raises(_FakeRuntimeError) as info:
        backend._shrink(floor, exc)
    assert info.value is exc


def test_callers_chunk_rows_is_capped_by_the_budget(backend):
    assert backend._chunk_rows(None, 5000) == 5000
    assert backend._chunk_rows(400, 5000) == 400
    assert backend._chunk_rows(10**8, 5000) == 5000
    # The device chunk for a copied (converted) chunk: within free_fraction of free memory.
    d = 1 << 12
    rows = backend._device_chunk_rows(d)
    assert rows * 4 * d <= backend.STREAM["free_fraction"] * (1 << 30)
    assert rows >= backend.STREAM["min_chunk_rows"]


class _FakeFlag:
    """_BadRowFlag without a device: the snapshot is the value at the end of the chunk."""

    def __init__(self):
        self.value = None

    def snapshot(self, first_bad, stream):
        self.value = int(first_bad[0])

    def seen(self, wait=True):
        return self.value is not None and self.value != -1


class _FakeRun:
    def __init__(self, bad_row):
        self.bad_row = bad_row
        self.first_bad = np.array([-1])
        self.chunks = []

    def add(self, chunk, row0):
        self.chunks.append((row0, chunk.shape[0]))
        if row0 <= self.bad_row < row0 + chunk.shape[0] and self.first_bad[0] == -1:
            self.first_bad[0] = self.bad_row


@pytest.mark.parametrize("bad_row", [0, 3500, 9999, None])
def test_device_pass_stops_within_a_chunk_of_a_bad_row(backend, monkeypatch, bad_row):
    monkeypatch.setattr(backend, "_BadRowFlag", _FakeFlag)
    n, chunk = 10_000, 1000
    run = _FakeRun(-1 if bad_row is None else bad_row)
    backend._stream_device(run, np.zeros((n, 8), np.float32), 0, chunk, None)
    starts = [r0 for r0, _ in run.chunks]
    if bad_row is None:
        assert starts == list(range(0, n, chunk))
        return
    bad_chunk = bad_row // chunk * chunk
    assert bad_chunk in starts  # the chunk holding it was scored (its row is the one reported)
    assert starts == list(range(0, starts[-1] + chunk, chunk))  # in order, none skipped
    assert starts[-1] <= bad_chunk + chunk  # at most one chunk past it, not the whole corpus


@pytest.mark.parametrize("n_qtiles", [1, 3, 16, 157, 2000])
@pytest.mark.parametrize("m", [1, 127, 400, 2500, 1_611_392, 1 << 22])
@pytest.mark.parametrize("slots", [1, 108, 132])
def test_row_splits_cover_the_rows_and_fill_the_waves(backend, n_qtiles, m, slots):
    """Every row in exactly one split (splits of whole tiles, none empty), within the grid's
    limits; no split count up to the wave cap gives fewer waves x rows per block."""
    tile = backend.LAUNCH["TOPK"]["RT"]
    splits, rows = backend._row_splits(n_qtiles, m, slots, tile)
    assert rows % tile == 0 and 1 <= splits <= 65535
    assert (splits - 1) * rows < m <= splits * rows
    cost = -(-(n_qtiles * splits) // slots) * rows
    ideal = n_qtiles * m / slots  # every slot busy all the time
    assert cost >= ideal
    for want in range(1, min(splits + 64, -(-m // tile)) + 1):
        r = -(-(-(-m // want)) // tile) * tile
        other = -(-(n_qtiles * -(-m // r)) // slots) * r
        if want <= backend.STREAM["waves"] * -(-slots // n_qtiles):
            assert cost <= other
    if n_qtiles == 16 and m == 1 << 22 and slots == 132:  # the H100 case of the first device run
        assert cost <= 1.01 * ideal


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_device_check_launch_variants_compile(backend):
    """The device check's launch sweep (bench/device_check.py LAUNCH_VARIANTS) spends GPU time
    on each variant: each must pass topk.cu's static_asserts and fit static shared memory, which
    nvcc checks here without a GPU (a cubin for sm_90 with the runtime's -D options)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import device_check
    finally:
        sys.path.pop(0)
    for label, change in device_check.LAUNCH_VARIANTS:
        launch = {group: dict(table) for group, table in backend.LAUNCH.items()}
        assert set(change) <= set(launch["TOPK"]), label
        launch["TOPK"].update(change)
        defines = [f"-DNF_{g}_{k}={int(v)}" for g, table in launch.items() for k, v in table.items()]
        res = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-std=c++17", f"-I{ROOT / 'csrc' / 'cuda'}",
                              *defines, "-o", os.devnull, str(ROOT / "csrc" / "cuda" / "topk.cu")],
                             capture_output=True, text=True)
        assert res.returncode == 0, f"{label}: {res.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# NVRTC (the compiler CuPy's RawModule uses at run time), without nvcc: every csrc/cuda/*.cu as
# the runtime hands it over (headers pasted by _source, the LAUNCH table's -D options). The
# nvidia-cuda-nvrtc wheel provides libnvrtc; NUDGEFAST_REQUIRE_NVRTC=1 fails instead of skipping.

def _find_nvrtc():
    candidates = []
    for site in sys.path:
        for sub in ("cuda_nvrtc", "cu12", "cu13"):
            candidates += sorted(glob.glob(os.path.join(site, "nvidia", sub, "lib", "libnvrtc.so*")))
    for root in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        candidates += sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")))
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


_NVRTC = _find_nvrtc()


def _nvrtc_ptx(lib, name, source, options, arch="compute_90"):
    """(ptx, None) on success, (None, log) on a compile error."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) == 0
    try:
        opts = [o.encode() for o in (*options, f"--gpu-architecture={arch}")]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        assert lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0
        log = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetProgramLog(prog, log) == 0
        if rc:
            return None, log.value.decode(errors="replace") or f"NVRTC error {rc}"
        assert lib.nvrtcGetPTXSize(prog, ctypes.byref(size)) == 0
        ptx = ctypes.create_string_buffer(size.value)
        assert lib.nvrtcGetPTX(prog, ptx) == 0
        return ptx.value.decode(errors="replace"), None
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _require_nvrtc():
    if _NVRTC is None:
        if os.environ.get("NUDGEFAST_REQUIRE_NVRTC") == "1":
            pytest.fail("NUDGEFAST_REQUIRE_NVRTC=1 but no libnvrtc found (pip install nvidia-cuda-nvrtc-cu12)")
        pytest.skip("no libnvrtc (pip install nvidia-cuda-nvrtc-cu12)")
    return _NVRTC


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_source_compiles_with_nvrtc(backend, source, arch):
    lib = _require_nvrtc()
    ptx, log = _nvrtc_ptx(lib, source, backend._source(source), backend._options(), arch)
    assert log is None, f"{source} ({arch}):\n{log}"
    assert ".entry" in ptx


def test_qtopk_kernels_compile_with_nvrtc_and_use_dp4a_and_popc(backend):
    """The entry points cuda_backend launches exist, the int8 scores use the mixed-sign dp4a
    (signed query bytes x unsigned corpus bytes) and the Hamming scores a 32-bit popcount."""
    lib = _require_nvrtc()
    ptx, log = _nvrtc_ptx(lib, "qtopk.cu", backend._source("qtopk.cu"), backend._options())
    assert log is None, log
    entries = {}
    for name in ("qtopk_int8_scores", "qtopk_hamming_scores", "qtopk_int8_norms", "qtopk_select", "qtopk_keys"):
        assert f".entry {name}(" in ptx, name
        start = ptx.index(f".entry {name}(")
        nxt = ptx.find(".entry ", start + 1)
        entries[name] = ptx[start:nxt if nxt > 0 else len(ptx)]
    assert "dp4a.s32.u32" in entries["qtopk_int8_scores"]
    assert "popc.b32" in entries["qtopk_hamming_scores"]
    # No FMA contraction in the int8 epilogue: the score is the reference's float32 roundings.
    assert "mul.rn.f32" in entries["qtopk_int8_scores"] and "add.rn.f32" in entries["qtopk_int8_scores"]
    assert "fma.rn.f32" not in entries["qtopk_int8_scores"]


# ---------------------------------------------------------------------------------------------
# The quantized top-k ops' host-side policy (no device needed)

def test_qtopk_signatures_are_the_contracts(backend):
    from nudgefast._backends import numpy_backend as ref
    for name in ("qtopk_int8", "qtopk_hamming"):
        assert inspect.signature(getattr(backend, name)) == inspect.signature(getattr(ref, name)), name


@pytest.mark.parametrize("n_qblocks", [1, 3, 250, 10**6])
@pytest.mark.parametrize("rows", [1, 5, 31, 32, 33, 255, 1237, 100_000, 1 << 30])
@pytest.mark.parametrize("sms", [1, 132])
def test_qtopk_select_splits_cover_the_rows(backend, n_qblocks, rows, sms):
    splits, per = backend._qtopk_splits(n_qblocks, rows, sms)
    assert 1 <= splits <= 65535 and per % 32 == 0
    assert (splits - 1) * per < rows <= splits * per  # every row in exactly one split, none empty
    assert splits == 1 or per >= 256


def test_qtopk_rows_per_launch_fit_the_budget(backend):
    # The stub reports 1 GiB free: a quarter of it for the scores (and keys) of the launch block.
    budget = backend.STREAM["free_fraction"] * (1 << 30)
    kmax = backend.LAUNCH["QTOPK"]["KMAX"]
    for n_q, ncols, k, m in [(1000, 384, 10, 10**7), (1000, 48, kmax + 1, 10**7), (1, 4096, 1, 10**9),
                             (7, 37, 5, 100)]:
        rows = backend._qtopk_rows(n_q, ncols, k, m)
        assert 1 <= rows <= min(m, 1 << 30)
        per_row = n_q * 4 + ncols + 8 + (n_q * 24 if k > kmax else 0)
        assert rows == m or rows <= max(backend.STREAM["min_chunk_rows"], budget // per_row)
    assert backend._qtopk_rows(7, 37, 5, 100) == 100
    qt, rt = backend._qtopk_tile()
    assert qt == 4 * backend.LAUNCH["QTOPK"]["THREADS"] // 16 and rt == 64
