"""CUDA backend: CuPy ``RawModule`` kernels compiled from ``csrc/cuda/*.cu``.

Same ops and signatures as ``numpy_backend`` (whose docstring is the contract): host NumPy
arrays in, host NumPy arrays out, the dtypes of the CPU backend (top-k scores float32; the small
ops float64, ``project`` float32). One more op, ``topk_stream``, runs a whole corpus pass on the
device; ``search.topk_pass`` delegates to it.

Kernels: one ``.cu`` per op, compiled once per process on first use (NVRTC through CuPy, which
also caches the binary on disk) and kept in ``_MODULES``. Launch widths come from ``LAUNCH``
below, the one table, and reach the ``.cu`` files as ``-DNF_<GROUP>_<KEY>=<value>``; the files
hold ``#ifndef`` defaults so ``nvcc -ptx`` compiles them alone (CI does). Edit the table before
the first call: modules are not rebuilt afterwards.

Corpus pass (``topk_stream``):

- a host corpus (NumPy array, ``np.memmap``) is streamed in chunks through two pinned host
  buffers: the host fills one while the copy stream uploads the other, and the copy of chunk
  i + 1 overlaps the compute of chunk i on the compute stream (events order the reuse);
- a device corpus (a CuPy array, or anything with ``__cuda_array_interface__`` or DLPack on this
  device, e.g. a torch CUDA tensor) is read in place, no copy (a chunk is copied only when its
  rows are not contiguous or its dtype is not float16/float32);
- chunk size follows free device memory (a caller's ``chunk_rows`` is capped by the same budget);
  running out of memory (``cupy.cuda.memory.OutOfMemoryError``, or a failed pinned host
  allocation: ``CUDARuntimeError`` with ``cudaErrorMemoryAllocation``) halves it and retries;
- a bad row stops the pass within a chunk of the one that holds it (the host reads a pinned copy
  of the device's first-bad-row word one chunk behind, so the pipeline never stalls on it);
- k <= ``LAUNCH["TOPK"]["KMAX"]``: the fused kernel keeps every query's top-k on chip (scores
  never reach global memory); larger k: the two-phase path (one sort key per (query, row) in
  global memory, a device sort, then the same merge).

Quantized corpora (``qtopk_int8``, ``qtopk_hamming``; csrc/cuda/qtopk.cu): per chunk, an integer
score matrix (int8: mixed-sign ``dp4a``; binary: ``popc`` of XORed 32-bit words) converted to the
reference's float32 scores, then selected into the running top-k with the float path's lists,
merges and state (``_TopkPass``); see the section at the end of this file.

Precision: float32 corpora are scored with FP32 FMA; float16 corpora on tensor cores (sm_80+)
with float32 accumulation, each query split into float16 hi + lo parts so the product keeps
float32-level accuracy (``F16_SPLIT``; 0 halves the tensor work and costs ~1e-4 in the scores).
Norms come from the same tiles (float32 sum of squares, float64 for rows where float32 under- or
overflows), so bad rows (NaN/inf, zero with ``normalize``) are those of the reference.

STATUS: written on a machine without a GPU; nothing here has run on a device yet. The kernels
compile to PTX for sm_80/sm_90 with nvcc and with NVRTC (as this module hands them to CuPy), and
the whole of ``tests/test_cuda.py`` plus the backend-parametrised suite passed on a CPU emulation
of the CUDA subset the kernels use (one fiber per thread, barriers resumed in random orders over
several seeds, guard pages after every buffer, mma.sync per the PTX fragment layouts). That
checks indexing, synchronisation and this module's plumbing; it cannot check the hardware (the
real mma layouts, timing, streams overlapping). ``tests/test_cuda.py`` on a device is the check.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("nudgefast")

NAME = "cuda"
#: This backend streams a whole corpus itself (``topk_stream``: pinned buffers, two streams,
#: chunk size from free device memory); ``search.topk_pass`` hands it the corpus in one call.
STREAMS_CORPUS = True

try:
    import cupy as cp
except ImportError as exc:  # the registry reports this with the install hint
    raise ImportError("the CUDA backend needs CuPy (pip install cupy-cuda12x or cupy-cuda13x, "
                      "matching your CUDA driver)") from exc


def _visible_devices() -> int:
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
        raise ImportError(f"CuPy is installed but CUDA is not usable here: {exc}") from exc


if _visible_devices() < 1:
    raise ImportError("CuPy is installed but no CUDA device is visible (check the driver and "
                      "CUDA_VISIBLE_DEVICES)")


# ---------------------------------------------------------------------------------------------
# The one table of launch widths. Each entry reaches every .cu file as -DNF_<GROUP>_<KEY>=<value>.

LAUNCH = {
    # Fused top-k: a block scores QT queries x RT rows per tile over d in slices of BK_F32 /
    # BK_F16 (float16: a multiple of 16), F16_WARPS_Q of its THREADS / 32 warps along the queries.
    # KMAX: the largest k kept on chip (the lists take QT * k * 8 bytes of shared memory).
    # MIN_BLOCKS: __launch_bounds__' minimum resident blocks per multiprocessor (caps registers).
    # 1, not 2: at 256 threads, 2 caps the kernels at 128 registers, and ptxas (sm_80/sm_90) then
    # spills the element-load select/keys kernels (154-180 registers uncapped). The grid follows
    # the occupancy the compiled kernel really gets (``_resident_blocks``), so the two agree.
    "TOPK": {"THREADS": 256, "QT": 64, "RT": 128, "BK_F32": 16, "BK_F16": 32, "F16_WARPS_Q": 2,
             "F16_SPLIT": 1, "KMAX": 128, "MIN_BLOCKS": 1},
    "MERGE": {"THREADS": 256},      # topk_merge_pairs / topk_merge_state / topk_keys_decode
    "QG": {"THREADS": 128},         # query_gradient
    "NUDGE_M": {"THREADS": 256},    # nudge_m_intervals (one warp per pair)
    "SWEEP": {"WARPS": 4},          # nudge_n_sweep (one warp per (query, gamma))
    "PROJECT": {"THREADS": 256},
    "DOT64": {"THREADS": 256},
    "METRICS": {"THREADS": 128},
    # Top-k over quantized codes (qtopk.cu): score blocks of THREADS threads, QT = THREADS / 4
    # queries x 64 rows, d in slices of KW 32-bit words; qtopk_select: SEL_WARPS warps (one query
    # each) and k <= KMAX (larger k: sort keys); qtopk_int8_norms: NORM_THREADS (a warp per row).
    "QTOPK": {"THREADS": 256, "KW": 16, "SEL_WARPS": 4, "KMAX": 1024, "NORM_THREADS": 256},
}

#: Corpus-pass policy: chunks of a host corpus take at most ``max_chunk_bytes`` (each of the two
#: pinned and two device buffers) and ``free_fraction`` of free device memory together; a device
#: corpus is scored ``device_chunk_rows`` rows per launch; ``waves``: the most waves of resident
#: blocks (query tiles x row splits; residency from the occupancy API) a launch is split into
#: (``_row_splits`` picks the count that wastes least of the last wave); an out-of-memory error halves the chunk down to ``min_chunk_rows``.
STREAM = {"max_chunk_bytes": 256 << 20, "free_fraction": 0.25, "device_chunk_rows": 1 << 22,
          "min_chunk_rows": 1024, "waves": 8}

_NULL = np.uint64(0)  # a null pointer argument (same size and alignment as a device pointer)
_EMPTY_INDEX = np.iinfo(np.int64).max
_NO_BAD_ROW = np.uint64(np.iinfo(np.uint64).max)
#: cudaErrorMemoryAllocation: what a failed cudaHostAlloc (pinned buffers) or cudaMalloc outside
#: CuPy's pool raises as ``CUDARuntimeError``; not sticky, so the context stays usable.
_CUDA_ERROR_MEMORY_ALLOCATION = 2
_KERNEL_ERRORS = {1: "k outside 1..KMAX reached the fused top-k (or qtopk_select) kernel",
                  2: "a kernel got less dynamic shared memory than it needs"}


def _raise_kernel_error(what: str, error) -> None:
    """Kernels report launch-contract violations through a device int (0: none)."""
    code = int(error.get()[0])
    if code:
        raise RuntimeError(f"nudgefast CUDA {what}: {_KERNEL_ERRORS.get(code, f'kernel error {code}')} "
                           f"(a bug in cuda_backend: please report it)")


def _find_sources() -> Path:
    """csrc/cuda: $NUDGEFAST_CUDA_SRC, the copy installed next to the package, or the checkout."""
    here = Path(__file__).resolve()
    candidates = [here.parent.parent / "_cuda", here.parents[2] / "csrc" / "cuda"]
    if os.environ.get("NUDGEFAST_CUDA_SRC"):
        candidates.insert(0, Path(os.environ["NUDGEFAST_CUDA_SRC"]))
    for path in candidates:
        if (path / "topk.cu").is_file() and (path / "topk_common.cuh").is_file():
            return path
    raise ImportError("the CUDA kernel sources (topk.cu, ...) were not found in "
                      + ", ".join(str(c) for c in candidates)
                      + "; reinstall nudgefast or set NUDGEFAST_CUDA_SRC to csrc/cuda")


_SOURCE_DIR = _find_sources()

# ---------------------------------------------------------------------------------------------
# Modules: compiled once per process.

_MODULES: dict[str, "cp.RawModule"] = {}
_KERNELS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()
#: How many times a module was compiled in this process (tests check it stays at one per file).
_COMPILE_COUNT = 0

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def _source(name: str) -> str:
    """The .cu text with its local headers pasted in: CuPy's disk cache keys on the source
    string, so a header edit must change it (an -I include would be served stale)."""
    def expand(match):
        return f"// ---- {match.group(1)}\n" + (_SOURCE_DIR / match.group(1)).read_text()
    return _INCLUDE.sub(expand, (_SOURCE_DIR / name).read_text())


def _options() -> tuple[str, ...]:
    defines = [f"-DNF_{group}_{key}={int(value)}" for group, table in LAUNCH.items()
               for key, value in table.items()]
    return ("--std=c++17", *defines)


def _module(name: str):
    global _COMPILE_COUNT
    module = _MODULES.get(name)
    if module is None:
        with _LOCK:
            module = _MODULES.get(name)
            if module is None:
                module = cp.RawModule(code=_source(name), options=_options())
                module.compile()  # now, so a compile error surfaces here with its log
                _COMPILE_COUNT += 1
                _MODULES[name] = module
    return module


def _kernel(file: str, name: str):
    kernel = _KERNELS.get((file, name))
    if kernel is None:
        kernel = _module(file).get_function(name)
        _KERNELS[(file, name)] = kernel
    return kernel


def _device_props() -> dict:
    dev = cp.cuda.Device()
    return _props_of(dev.id)


_PROPS: dict[int, dict] = {}


def _props_of(device_id: int) -> dict:
    if device_id not in _PROPS:
        p = cp.cuda.runtime.getDeviceProperties(device_id)
        _PROPS[device_id] = {"sms": int(p["multiProcessorCount"]),
                             "smem_optin": int(p.get("sharedMemPerBlockOptin", 48 << 10)),
                             "cc": int(p["major"]) * 10 + int(p["minor"])}
    return _PROPS[device_id]


def _with_dynamic_smem(kernel, nbytes: int) -> None:
    """Lets `kernel` take `nbytes` of dynamic shared memory (above 48 KiB needs an opt-in)."""
    if nbytes + kernel.shared_size_bytes > (48 << 10) and kernel.max_dynamic_shared_size_bytes < nbytes:
        kernel.max_dynamic_shared_size_bytes = nbytes


def _fused_fits(k: int) -> bool:
    """Whether the fused top-k (lists of QT * k entries on chip) takes this k on this device."""
    t = LAUNCH["TOPK"]
    if not 1 <= k <= t["KMAX"]:
        return False
    static = max(_kernel("topk.cu", f"topk_select_{kind}").shared_size_bytes
                 for kind in ("f32", "f32_vec", "f16", "f16_vec"))
    return static + t["QT"] * k * 8 <= _device_props()["smem_optin"]


_RESIDENT: dict[tuple[int, str, int], int] = {}


def _resident_blocks(name: str, kernel, threads: int, smem: int) -> int:
    """Blocks of `kernel` one multiprocessor holds at once (its registers, shared memory and
    threads), from the driver's occupancy calculator; 1 if it cannot be asked. A grid sized for
    more than this runs in partial waves (the top-k kernels: one block of 256 threads at
    154-180 registers, see LAUNCH)."""
    key = (cp.cuda.Device().id, name, smem)
    if key not in _RESIDENT:
        try:
            n = int(cp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, threads, smem))
        except Exception as exc:  # a CuPy without the binding: one block is always resident
            log.debug("occupancy query for %s failed (%s); assuming one block per SM", name, exc)
            n = 1
        _RESIDENT[key] = max(1, n)
    return _RESIDENT[key]


def _blocks(total: int, threads: int) -> int:
    """Grid of a grid-stride kernel: enough blocks for every element, capped at a few waves."""
    return max(1, min(-(-total // threads), _device_props()["sms"] * 32))


def _row_splits(n_qtiles: int, m: int, slots: int, tile: int, max_waves: int = STREAM["waves"]):
    """(n_splits, rows_per_split) of a top-k launch: grid (n_qtiles, n_splits) over m rows,
    rows_per_split a multiple of ``tile``, with ``slots`` blocks resident at once.

    A launch lasts about (waves) x (the rows of one block), waves = ceil(blocks / slots): the
    split count minimising that product, fewest splits on a tie (fewer lists to merge), up to
    ``max_waves`` full waves. The first device run (H100, 132 SMs x 1 block) took ceil(132 / 16)
    = 9 splits for 1,000 queries: 144 blocks, a second wave of 12, half the device idle."""
    max_splits = max(1, min(-(-m // tile), 65535, max_waves * -(-slots // max(1, n_qtiles))))
    best = None
    for want in range(1, max_splits + 1):
        rows = _round_up(-(-m // want), tile)
        splits = -(-m // rows)
        cost = -(-(n_qtiles * splits) // slots) * rows
        if best is None or cost < best[0]:
            best = (cost, splits, rows)
    return best[1], best[2]


def _i64(v) -> np.int64:
    return np.int64(v)


def _dev(a, dtype) -> "cp.ndarray":
    """A host array on the device, C-contiguous, in `dtype`; an empty one as a 1-element
    placeholder (kernels never read it, and a zero-size allocation may have no address)."""
    if np.size(a) == 0:
        return cp.zeros(1, dtype=dtype)
    return cp.asarray(np.ascontiguousarray(a, dtype=dtype))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# Small ops

def query_gradient(queries, order, seg_ptr, *, n_threads=None):
    t = len(seg_ptr) - 1
    d = queries.shape[1]
    if t <= 0 or d == 0:
        return np.zeros((max(t, 0), d), dtype=np.float64)
    dtype = np.float64 if queries.dtype == np.float64 else np.float32
    q = _dev(queries, dtype)
    out = cp.empty((t, d), dtype=cp.float64)
    threads = LAUNCH["QG"]["THREADS"]
    name = "query_gradient_f64" if dtype == np.float64 else "query_gradient_f32"
    _kernel("query_gradient.cu", name)(
        (_blocks(t * d, threads),), (threads,),
        (q, _i64(d), _dev(order, np.int64), _dev(seg_ptr, np.int64), _i64(t), out))
    return out.get()


def nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, eps, *, n_threads=None):
    # pair_pos is not needed: x is among the touched competitors with D = 0 and s_dif = 0, which
    # bounds nothing (as in the reference and the CPU backend).
    n_pairs = len(pair_query)
    if n_pairs == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=bool)
    t = S.shape[1]
    low = cp.empty(n_pairs, dtype=cp.float64)
    high = cp.empty(n_pairs, dtype=cp.float64)
    feasible = cp.empty(n_pairs, dtype=cp.uint8)
    threads = LAUNCH["NUDGE_M"]["THREADS"]
    _kernel("nudge_m_intervals.cu", "nudge_m_intervals")(
        (_blocks(n_pairs * 32, threads),), (threads,),
        (_dev(S, np.float64), _dev(G, np.float64), _i64(t), _dev(pair_query, np.int64), _dev(s_x, np.float64),
         _dev(g_x, np.float64), _dev(u_score, np.float64), _i64(n_pairs), np.float64(eps),
         low, high, feasible))
    return low.get(), high.get(), feasible.get().astype(bool)


def nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, *,
                  n_threads=None, kth=None):
    n_b, t = S.shape
    n_gamma = alpha.shape[0]
    k_val = int(k_val)
    if n_b == 0 or n_gamma == 0 or k_val <= 0:
        if kth is not None:
            kth[...] = -np.inf
        return np.zeros((n_b, n_gamma), dtype=np.int64)
    warps = LAUNCH["SWEEP"]["WARPS"]
    smem = warps * k_val * 16
    kernel = _kernel("nudge_n_sweep.cu", "nudge_n_sweep")
    if smem + kernel.shared_size_bytes > _device_props()["smem_optin"]:
        # The per-warp lists do not fit on chip: k_val in the thousands. Rare enough to leave to
        # the reference implementation (exact, on the host) rather than keep a second kernel.
        from . import numpy_backend
        log.warning("nudge_n_sweep: k_val=%d needs %d bytes of shared memory per block; "
                    "computing on the host", k_val, smem)
        return numpy_backend.nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index,
                                           ans_ptr, ans_index, k_val, kth=kth)
    _with_dynamic_smem(kernel, smem)
    n_unt = unt_scores.shape[1]
    hits = cp.empty((n_b, n_gamma), dtype=cp.int64)
    kth_dev = cp.empty((n_b, n_gamma), dtype=cp.float64)
    error = cp.zeros(1, dtype=cp.int32)
    blocks = max(1, min(-(-(n_b * n_gamma) // warps), _device_props()["sms"] * 16))
    kernel((blocks,), (warps * 32,),
           (_dev(S, np.float64), _dev(H, np.float64), _i64(n_b), _i64(t), _dev(alpha, np.float64),
            _dev(beta, np.float64), _i64(n_gamma), _dev(touched, np.int64),
            _dev(unt_scores, np.float64), _dev(unt_index, np.int64), _i64(n_unt),
            _dev(ans_ptr, np.int64), _dev(ans_index, np.int64), _i64(k_val), hits, kth_dev, error),
           shared_mem=smem)
    _raise_kernel_error("nudge_n_sweep", error)
    if kth is not None:
        kth[...] = kth_dev.get()
    return hits.get()


def dot64(A, B, *, n_threads=None):
    n, d = A.shape
    m = B.shape[0]
    if B.shape[1] != d:
        raise ValueError(f"dot64: A has d={d}, B has d={B.shape[1]}")
    if n == 0 or m == 0:
        return np.zeros((n, m))
    out = cp.empty((n, m), dtype=cp.float64)
    threads = LAUNCH["DOT64"]["THREADS"]
    _kernel("dot64.cu", "dot64")((_blocks(n * m, threads),), (threads,),
                                 (_dev(A, np.float64), _dev(B, np.float64), _i64(n), _i64(m),
                                  _i64(d), out))
    return out.get()


def project(E, C, alpha, beta, *, n_threads=None):
    t, d = E.shape
    if t == 0 or d == 0:
        return np.zeros((t, d), dtype=np.float32)
    out = cp.empty((t, d), dtype=cp.float32)
    threads = LAUNCH["PROJECT"]["THREADS"]
    # float32 inputs widen to float64 exactly: the kernel computes in double either way.
    _kernel("project.cu", "project")(
        (_blocks(t * d, threads),), (threads,),
        (_dev(E, np.float64), _dev(C, np.float64), _dev(alpha, np.float64), _dev(beta, np.float64),
         _i64(t), _i64(d), out))
    return out.get()


def normalize_rows(chunk, out, *, n_threads=None):
    # A host chunk into a host output is a host memory-bound pass: a round trip over PCIe
    # would only add the transfer. Device arrays (CuPy) are normalised where they are.
    if not isinstance(chunk, cp.ndarray):
        from . import numpy_backend
        return numpy_backend.normalize_rows(chunk, out)
    x = chunk.astype(cp.float64)
    norms = cp.sqrt(cp.einsum("ij,ij->i", x, x))
    bad = ~cp.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        return int(cp.argmax(bad))
    out[...] = (x / norms[:, None]).astype(cp.float32)
    return -1


def metrics(retrieved, ans_ptr, ans_index, ans_rel, k, *, n_threads=None):
    retrieved = np.ascontiguousarray(retrieved, dtype=np.int64)
    n, width = retrieved.shape
    k = int(k)
    if n == 0:
        return np.zeros((0, 3))
    ans_ptr = np.ascontiguousarray(ans_ptr, dtype=np.int64)
    ans_rel = np.ascontiguousarray(ans_rel, dtype=np.float64)
    # The ideal ordering and the discounts on the host, with NumPy: the reference's own values.
    query_of = np.repeat(np.arange(n), np.diff(ans_ptr))
    ideal = ans_rel[np.lexsort((-ans_rel, query_of))] if ans_rel.size else ans_rel
    discount = 1.0 / np.log2(np.arange(max(k, 1)) + 2.0)
    out = cp.empty((n, 3), dtype=cp.float64)
    threads = LAUNCH["METRICS"]["THREADS"]
    _kernel("metrics.cu", "metrics")(
        (_blocks(n, threads),), (threads,),
        (_dev(retrieved, np.int64), _i64(n), _i64(width), _dev(ans_ptr, np.int64),
         _dev(ans_index, np.int64), _dev(ans_rel, np.float64), _dev(ideal, np.float64),
         _dev(discount, np.float64), _i64(k), out))
    return out.get()


# ---------------------------------------------------------------------------------------------
# Top-k

class _Queries:
    """The queries in the layout of one corpus kind, prepared once per pass (host NumPy, then
    uploaded): zero-padded to a multiple of QT queries and of the slice width in d.

    float32 corpus: transposed (d_pad, n_q_pad) float32. float16 corpus: each query scaled by a
    power of two (exact) so its largest |value| lies in [2^14, 2^15), then split into float16
    hi = fp16(q) and lo = fp16(q - hi); ``qscale`` undoes the scaling exactly.
    """

    def __init__(self, queries: np.ndarray, kind: str):
        t = LAUNCH["TOPK"]
        self.kind = kind
        self.n_q, self.d = queries.shape
        self.n_q_pad = _round_up(max(self.n_q, 1), t["QT"])
        self.d_pad = _round_up(self.d, t["BK_F32"] if kind == "f32" else t["BK_F16"])
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if kind == "f32":
            qT = np.zeros((self.d_pad, self.n_q_pad), dtype=np.float32)
            qT[: self.d, : self.n_q] = q.T
            self.qT, self.qhi, self.qlo, self.qscale = cp.asarray(qT), _NULL, _NULL, _NULL
            return
        biggest = np.abs(q).max(axis=1) if self.d else np.ones(self.n_q, np.float32)
        biggest = np.where(biggest > 0, biggest, 1.0)
        _, e = np.frexp(biggest)  # biggest < 2^e
        e = np.clip(e, -100, 100)
        scale = np.ldexp(np.float32(1.0), 15 - e).astype(np.float32)
        scaled = q * scale[:, None]
        hi = scaled.astype(np.float16)
        lo = (scaled - hi.astype(np.float32)).astype(np.float16)
        qhi = np.zeros((self.n_q_pad, self.d_pad), dtype=np.float16)
        qlo = np.zeros_like(qhi)
        qhi[: self.n_q, : self.d] = hi
        qlo[: self.n_q, : self.d] = lo
        qscale = np.ones(self.n_q_pad, dtype=np.float32)
        qscale[: self.n_q] = np.ldexp(np.float32(1.0), e - 15).astype(np.float32)
        self.qT, self.qhi, self.qlo, self.qscale = _NULL, cp.asarray(qhi), cp.asarray(qlo), cp.asarray(qscale)


class _TopkPass:
    """A running top-k on the device: chunks (device arrays) are merged in with ``add``.

    State: (n_q, k) float32 scores / int64 global indices, sorted (tie rule), empties (-inf, -1).
    ``exclude`` (host, sorted global rows) is uploaded once; each launch gets the slice of it in
    its row range. ``first_bad`` is the smallest bad global row seen, ``error`` a kernel error.
    Everything runs on the current stream.
    """

    def __init__(self, queries: np.ndarray, k: int, normalize: bool, state, exclude: np.ndarray):
        self.n_q, self.d = queries.shape
        self.k = k
        self.normalize = normalize
        self.queries = queries
        self._prepared: dict[str, _Queries] = {}
        props = _device_props()
        self.sms = props["sms"]
        self.f16_tensor_cores = props["cc"] >= 80
        self.fused = _fused_fits(k)
        self.ex_host = exclude
        self.ex_dev = cp.asarray(exclude) if exclude.size else cp.zeros(1, dtype=cp.int64)
        if state is None:
            self.s = cp.full((self.n_q, k), -np.inf, dtype=cp.float32)
            self.i = cp.full((self.n_q, k), -1, dtype=cp.int64)
        else:
            s, i = state
            if s.shape != (self.n_q, k) or i.shape != (self.n_q, k):
                raise ValueError(f"state: expected two ({self.n_q}, {k}) arrays, got {s.shape} and {i.shape}")
            self.s = cp.asarray(np.ascontiguousarray(s, dtype=np.float32))
            self.i = cp.asarray(np.ascontiguousarray(i, dtype=np.int64))
            # Empty slots as the kernels expect them: (-inf, -1).
            self.i = cp.where(cp.isneginf(self.s), -1, self.i)
        self.first_bad = cp.full(1, _NO_BAD_ROW, dtype=cp.uint64)
        self.error = cp.zeros(1, dtype=cp.int32)

    def queries_for(self, kind: str) -> _Queries:
        if kind not in self._prepared:
            self._prepared[kind] = _Queries(self.queries, kind)
        return self._prepared[kind]

    def _floor(self):
        """Per query, the state's worst entry when the state is full, else (-inf, EMPTY): a row
        must rank before it to matter."""
        full = cp.all(self.i >= 0, axis=1)
        worst_s = self.s.min(axis=1)
        worst_i = cp.where(self.s == worst_s[:, None], self.i, -1).max(axis=1)
        floor_s = cp.where(full, worst_s, -np.inf).astype(cp.float32)
        floor_i = cp.where(full, worst_i, _EMPTY_INDEX).astype(cp.int64)
        return floor_s, floor_i

    def rows_per_launch(self) -> int:
        """Fused path: launch rows are int32 in the kernel. Two-phase path: the keys (n_q x rows
        x 8 bytes) and the sort's scratch within a fraction of free memory."""
        if self.fused:
            return (1 << 31) - LAUNCH["TOPK"]["RT"]
        per_row = max(1, self.n_q) * 8 * 3
        rows = int(_free_device_bytes() * STREAM["free_fraction"]) // per_row
        return int(min(1 << 31, max(STREAM["min_chunk_rows"], rows)))

    def add(self, x, row0: int) -> None:
        """Merges the rows of the device array ``x`` (global rows row0 + r) into the state."""
        m = x.shape[0]
        if m == 0 or self.n_q == 0 or self.k == 0:
            return
        if x.dtype == cp.float16 and not self.f16_tensor_cores:
            x = x.astype(cp.float32)  # mma.m16n8k16 needs sm_80
        rows_ok = m <= 1 or (x.strides[0] > 0 and x.strides[0] % x.itemsize == 0)
        cols_ok = x.shape[1] <= 1 or x.strides[1] == x.itemsize
        if x.dtype not in (cp.float16, cp.float32) or not rows_ok or not cols_ok:
            x = cp.ascontiguousarray(x, dtype=cp.float16 if x.dtype == cp.float16 else cp.float32)
        step = self.rows_per_launch()
        for s in range(0, m, step):
            self._add_block(x[s:s + step], row0 + s)

    def _add_block(self, x, row0: int) -> None:
        t = LAUNCH["TOPK"]
        m, d = x.shape
        kind = "f16" if x.dtype == cp.float16 else "f32"
        q = self.queries_for(kind)
        row_stride = x.strides[0] // x.itemsize if m > 1 else d
        width = 8 if kind == "f16" else 4  # elements per 16-byte load
        vec = x.data.ptr % 16 == 0 and row_stride % width == 0 and d % width == 0
        suffix = f"{kind}_vec" if vec else kind
        n_qtiles = q.n_q_pad // t["QT"]
        name = f"topk_{'select' if self.fused else 'keys'}_{suffix}"
        kernel = _kernel("topk.cu", name)
        smem = t["QT"] * self.k * 8 if self.fused else 0
        _with_dynamic_smem(kernel, smem)  # before the occupancy query, which checks the opt-in
        slots = self.sms * _resident_blocks(name, kernel, t["THREADS"], smem)
        n_splits, rows_per_split = _row_splits(n_qtiles, m, slots, t["RT"])
        lo, hi = (int(v) for v in np.searchsorted(self.ex_host, [row0, row0 + m]))
        ex = self.ex_dev[lo:hi] if hi > lo else self.ex_dev[:1]
        # Launch row r is global row row0 + r; exclude entries are global rows (base row0).
        common = (q.qT, q.qhi, q.qlo, q.qscale, _i64(self.n_q), _i64(q.n_q_pad), _i64(d), _i64(q.d_pad),
                  x, _i64(m), _i64(row_stride), ex, _i64(hi - lo), _i64(row0),
                  _i64(self.normalize), _i64(row0), _i64(rows_per_split))
        grid = (n_qtiles, n_splits)
        if self.fused:
            k = self.k
            out_s = cp.empty((n_splits, self.n_q, k), dtype=cp.float32)
            out_i = cp.empty((n_splits, self.n_q, k), dtype=cp.int64)
            floor_s, floor_i = self._floor()
            kernel(grid, (t["THREADS"],),
                   common + (floor_s, floor_i, _i64(k), out_s, out_i, _NULL, _i64(0),
                             self.first_bad, self.error),
                   shared_mem=smem)
            lists_s, lists_i = self._merge_lists(out_s, out_i)
        else:
            keys = cp.empty((self.n_q, m), dtype=cp.uint64)
            kernel(grid, (t["THREADS"],),
                   common + (_NULL, _NULL, _i64(0), _NULL, _NULL, keys, _i64(m),
                             self.first_bad, self.error))
            keys.sort(axis=1)  # the tie rule is the keys' ascending order
            lists_s = cp.empty((self.n_q, self.k), dtype=cp.float32)
            lists_i = cp.empty((self.n_q, self.k), dtype=cp.int64)
            threads = LAUNCH["MERGE"]["THREADS"]
            _kernel("topk.cu", "topk_keys_decode")(
                (_blocks(self.n_q * self.k, threads),), (threads,),
                (keys, _i64(self.n_q), _i64(m), _i64(min(self.k, m)), _i64(self.k), _i64(row0),
                 lists_s, lists_i))
            del keys
        self._merge_state(lists_s, lists_i)

    def _merge_lists(self, s, i):
        """(n_lists, n_q, k) per-split lists -> (n_q, k), pairwise (merge path)."""
        threads = LAUNCH["MERGE"]["THREADS"]
        kernel = _kernel("topk.cu", "topk_merge_pairs")
        while s.shape[0] > 1:
            n_lists = s.shape[0]
            n_out = (n_lists + 1) // 2
            out_s = cp.empty((n_out, self.n_q, self.k), dtype=cp.float32)
            out_i = cp.empty((n_out, self.n_q, self.k), dtype=cp.int64)
            kernel((_blocks(out_s.size, threads),), (threads,),
                   (s, i, _i64(n_lists), _i64(self.n_q), _i64(self.k), out_s, out_i))
            s, i = out_s, out_i
        return s[0], i[0]

    def _merge_state(self, s, i):
        threads = LAUNCH["MERGE"]["THREADS"]
        new_s = cp.empty_like(self.s)
        new_i = cp.empty_like(self.i)
        _kernel("topk.cu", "topk_merge_state")(
            (_blocks(self.n_q, threads),), (threads,),
            (self.s, self.i, s, i, _i64(self.n_q), _i64(self.k), new_s, new_i))
        self.s, self.i = new_s, new_i  # only now: an out-of-memory error above leaves the state intact

    def result(self):
        """(scores float32, index int64, first bad global row or -1) on the host."""
        _raise_kernel_error("top-k", self.error)
        bad = int(self.first_bad.get()[0])
        return self.s.get(), self.i.get(), (-1 if bad == int(_NO_BAD_ROW) else bad)


def _free_device_bytes() -> int:
    free, _ = cp.cuda.runtime.memGetInfo()
    return int(free) + int(cp.get_default_memory_pool().free_bytes())


def _as_device_array(corpus):
    """The corpus as a CuPy array when it lives on the GPU (no copy), else None."""
    if isinstance(corpus, cp.ndarray):
        arr = corpus
    elif hasattr(corpus, "__cuda_array_interface__"):
        arr = cp.asarray(corpus)
    elif hasattr(corpus, "__dlpack__") and hasattr(corpus, "__dlpack_device__") \
            and int(corpus.__dlpack_device__()[0]) in (2, 13):  # kDLCUDA, kDLCUDAManaged
        arr = cp.from_dlpack(corpus)
    else:
        return None
    if arr.device.id != cp.cuda.Device().id:
        raise ValueError(f"corpus: is on GPU {arr.device.id} but the current device is "
                         f"{cp.cuda.Device().id}; use `with cupy.cuda.Device({arr.device.id}):`")
    return arr


class _Slot:
    """One stage of the host pipeline: a pinned buffer, a device buffer and the two events that
    order their reuse."""

    def __init__(self, rows: int, d: int, dtype):
        self.rows = rows
        nbytes = max(1, rows * d * np.dtype(dtype).itemsize)
        self.pinned_mem = cp.cuda.alloc_pinned_memory(nbytes)
        self.pinned = np.frombuffer(self.pinned_mem, dtype=dtype, count=rows * d).reshape(rows, d)
        self.dev = cp.empty((rows, d), dtype=dtype)
        self.copied = cp.cuda.Event(disable_timing=True)    # the upload that read `pinned` is done
        self.consumed = cp.cuda.Event(disable_timing=True)  # the compute that read `dev` is done


def _fill(dst: np.ndarray, src, pool, workers: int) -> None:
    """dst[...] = src (a memmap slice, any float dtype): row blocks on `workers` pool threads
    (NumPy releases the GIL while copying), since one thread cannot keep up with PCIe."""
    m = dst.shape[0]
    if pool is None or m < 4096:
        np.copyto(dst, src, casting="unsafe")
        return
    bounds = np.linspace(0, m, workers + 1).astype(int)
    futures = [pool.submit(np.copyto, dst[a:b], src[a:b], casting="unsafe")
               for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for f in futures:
        f.result()


def _host_chunk_rows(d: int, itemsize: int, run: _TopkPass) -> int:
    per_row = d * itemsize
    by_bytes = STREAM["max_chunk_bytes"] // max(1, per_row)
    by_free = int(_free_device_bytes() * STREAM["free_fraction"]) // max(1, 2 * per_row)
    rows = min(by_bytes, by_free)
    rows = min(rows, run.rows_per_launch())
    return max(STREAM["min_chunk_rows"], rows)


def _device_chunk_rows(d: int) -> int:
    """Rows of a device corpus per chunk: a chunk that needs a float32 copy (another dtype, or
    strided rows) takes at most ``free_fraction`` of free device memory for it."""
    by_free = int(_free_device_bytes() * STREAM["free_fraction"]) // max(1, 4 * d)
    return max(STREAM["min_chunk_rows"], min(STREAM["device_chunk_rows"], by_free))


def _chunk_rows(asked, budget: int) -> int:
    """A caller's chunk_rows, capped by the memory budget (never raised to it)."""
    if asked is None:
        return budget
    if int(asked) > budget:
        log.info("nudgefast CUDA top-k: chunk_rows=%d capped at %d by the device memory budget",
                 int(asked), budget)
    return max(1, min(int(asked), budget))


def _is_oom(exc: BaseException) -> bool:
    """Out of memory: CuPy's pool, or a CUDA allocation outside it (pinned host buffers come
    from cudaHostAlloc, whose failure is a CUDARuntimeError with cudaErrorMemoryAllocation)."""
    if isinstance(exc, cp.cuda.memory.OutOfMemoryError):
        return True
    return (isinstance(exc, cp.cuda.runtime.CUDARuntimeError)
            and getattr(exc, "status", None) == _CUDA_ERROR_MEMORY_ALLOCATION)


def _shrink(rows: int, exc) -> int:
    if rows <= STREAM["min_chunk_rows"]:
        raise exc
    # The traceback's frames (e.g. a half-built _Slot) would keep their buffers out of the pools.
    traceback.clear_frames(exc.__traceback__)
    cp.get_default_memory_pool().free_all_blocks()
    cp.get_default_pinned_memory_pool().free_all_blocks()
    new = max(STREAM["min_chunk_rows"], rows // 2)
    log.warning("nudgefast CUDA top-k: out of memory (%s) with %d-row chunks; retrying with %d",
                type(exc).__name__, rows, new)
    return new


class _BadRowFlag:
    """A pinned host copy of the pass's first-bad-row word, taken on a stream after a chunk: the
    host learns of a bad row without a device-wide wait (``seen`` waits for that chunk only)."""

    def __init__(self):
        self._mem = cp.cuda.alloc_pinned_memory(8)
        self.value = np.frombuffer(self._mem, dtype=np.uint64, count=1)
        self.value[0] = _NO_BAD_ROW
        self.event = cp.cuda.Event(disable_timing=True)

    def snapshot(self, first_bad, stream) -> None:
        cp.cuda.runtime.memcpyAsync(self.value.ctypes.data, first_bad.data.ptr, 8,
                                    cp.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        self.event.record(stream)

    def seen(self, wait: bool = True) -> bool:
        """Whether the snapshot shows a bad row (False while it is pending and not `wait`)."""
        if not wait and not self.event.done:
            return False
        self.event.synchronize()  # returns at once for a never-recorded event
        return int(self.value[0]) != int(_NO_BAD_ROW)


def _stream_device(run: _TopkPass, corpus, row_offset, chunk_rows, report):
    n = corpus.shape[0]
    rows = _chunk_rows(chunk_rows, _device_chunk_rows(corpus.shape[1]))
    stream = cp.cuda.get_current_stream()
    # Chunk c's snapshot goes to flags[c % 2]; before chunk c the host waits for chunk c - 2's
    # (chunk c - 1 is still queued, so the device does not idle): a bad row in chunk j stops the
    # pass after chunk j + 1 at the latest, often after j (the non-blocking look at c - 1).
    flags = [_BadRowFlag(), _BadRowFlag()]
    chunk_no = 0
    start = 0
    while start < n:
        if flags[(chunk_no + 1) % 2].seen(wait=False) or flags[chunk_no % 2].seen():
            break
        stop = min(n, start + rows)
        try:
            chunk = corpus[start:stop]
            if chunk.dtype not in (cp.float16, cp.float32):
                chunk = chunk.astype(cp.float32)  # this chunk only
            run.add(chunk, row_offset + start)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            rows = _shrink(rows, exc)
            continue
        flags[chunk_no % 2].snapshot(run.first_bad, stream)
        if report is not None:
            report(stop - start)
        chunk_no += 1
        start = stop


def _stream_host(run: _TopkPass, corpus, row_offset, chunk_rows, n_threads, report):
    n, d = corpus.shape
    dtype = np.float16 if corpus.dtype == np.float16 else np.float32
    rows = _chunk_rows(chunk_rows, _host_chunk_rows(d, np.dtype(dtype).itemsize, run))
    rows = min(rows, n)
    workers = n_threads if n_threads is not None else min(8, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    copy_stream = cp.cuda.Stream(non_blocking=True)
    compute_stream = cp.cuda.get_current_stream()
    slots = slot = None
    # flags[c % 2]: the first bad row as of the end of chunk c's compute (see _BadRowFlag). It is
    # read before chunk c + 2 is uploaded, which waits for chunk c's compute anyway: a bad row in
    # chunk j stops the pass after chunk j + 1 at the latest, and costs the pipeline nothing.
    flags = None
    chunk_no = 0
    start = 0
    try:
        while start < n:
            stop = min(n, start + rows)
            try:
                if flags is None:
                    flags = [_BadRowFlag(), _BadRowFlag()]
                if flags[(chunk_no + 1) % 2].seen(wait=False):
                    break
                if slots is None:
                    slots = [_Slot(rows, d, dtype), _Slot(rows, d, dtype)]
                slot = slots[chunk_no % 2]
                m = stop - start
                slot.copied.synchronize()  # the upload of chunk_no - 2 has read the pinned buffer
                _fill(slot.pinned[:m], corpus[start:stop], pool, workers)
                if flags[chunk_no % 2].seen():  # waits for the compute of chunk_no - 2
                    break
                copy_stream.wait_event(slot.consumed)  # the compute of chunk_no - 2 has read dev
                slot.dev[:m].set(slot.pinned[:m], stream=copy_stream)
                slot.copied.record(copy_stream)
                compute_stream.wait_event(slot.copied)
                run.add(slot.dev[:m], row_offset + start)
                slot.consumed.record(compute_stream)
                flags[chunk_no % 2].snapshot(run.first_bad, compute_stream)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                compute_stream.synchronize()
                copy_stream.synchronize()
                slots = slot = None
                rows = _shrink(rows, exc)
                continue
            if report is not None:
                report(stop - start)
            chunk_no += 1
            start = stop
        compute_stream.synchronize()
    finally:
        copy_stream.synchronize()
        if pool is not None:
            pool.shutdown(wait=True)


def topk_stream(queries, corpus, k, *, exclude=None, normalize=True, chunk_rows=None, n_threads=None,
                progress=None, row_offset=0, state=None):
    """One pass over ``corpus``: the top-``k`` rows per query merged into ``state``.

    queries: (n_q, d) float array (scored in float32). corpus: (N, d) float16/float32 (float64 is
    scored as float32) host array or ``np.memmap`` (streamed), or a device array (read in place).
    exclude: sorted global row indices that are not candidates. Rows are numbered from
    ``row_offset``. state: optional (scores, index) (n_q, k) to continue from (sorted, empties
    (-inf, -1)). chunk_rows: rows per chunk (default from free device memory). n_threads: host
    threads filling the pinned buffers. progress: None/False, or a callable given the number of
    rows each finished chunk held (``search.topk_pass`` passes its progress bar's ``update``).
    Returns ``(scores float32, index int64, first bad global row or -1)``; a bad row (NaN/inf,
    or zero with ``normalize``) is never a candidate.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    n_q = q.shape[0]
    k = int(k)
    if state is None and (n_q == 0 or k == 0):
        return np.full((n_q, k), -np.inf, np.float32), np.full((n_q, k), -1, np.int64), -1
    device_corpus = _as_device_array(corpus)
    host_corpus = None if device_corpus is not None else np.asarray(corpus)
    rows_of = device_corpus if device_corpus is not None else host_corpus
    if rows_of.ndim != 2 or rows_of.shape[1] != q.shape[1]:
        raise ValueError(f"corpus: expected rows of d={q.shape[1]} (the queries' width), got shape "
                         f"{tuple(rows_of.shape)}")
    n_rows = rows_of.shape[0]
    ex_host = np.zeros(0, np.int64) if exclude is None else np.ascontiguousarray(exclude, dtype=np.int64)
    # Only the entries in this pass's range matter.
    lo, hi = np.searchsorted(ex_host, [row_offset, row_offset + n_rows])
    ex_host = ex_host[lo:hi]
    report = progress if callable(progress) else None
    run = _TopkPass(q, k, bool(normalize), state, ex_host)
    if n_q and k and n_rows:
        if device_corpus is not None:
            _stream_device(run, device_corpus, row_offset, chunk_rows, report)
        else:
            _stream_host(run, host_corpus, row_offset, chunk_rows, n_threads, report)
    return run.result()


def topk_update(queries, chunk, row_offset, exclude, normalize, best_scores, best_index, *, n_threads=None):
    k = best_scores.shape[1]
    if chunk.shape[0] == 0 or k == 0 or queries.shape[0] == 0:
        return -1
    ex = None if exclude is None else np.asarray(exclude, dtype=np.int64) + int(row_offset)
    scores, index, bad = topk_stream(queries, chunk, k, exclude=ex, normalize=normalize,
                                     chunk_rows=None, n_threads=n_threads, progress=False,
                                     row_offset=int(row_offset), state=(best_scores, best_index))
    best_scores[...] = scores
    best_index[...] = index
    return bad


# ---------------------------------------------------------------------------------------------
# Top-k over quantized codes (qtopk.cu): qtopk_int8 and qtopk_hamming.
#
# Per launch block of corpus rows (as many as the memory budget allows, usually the whole chunk):
# upload the block's codes when they are on the host, the int8 norms (normalize), the candidate
# flags (bad and excluded rows: 0), the (n_q, rows) float32 score matrix (-inf for non-candidates),
# then the selection into the running top-k, whose state, floor, merges and first bad row are
# _TopkPass's (the float top-k's, so the tie rule and the empty slots are the same code).
# Selection: qtopk_select (k <= LAUNCH["QTOPK"]["KMAX"]; per-(query, split) lists in shared memory,
# merged by topk_merge_pairs) or, for larger k, sort keys + a CuPy sort + topk_keys_decode.
# Non-normalized int8 scores and Hamming scores are bit-identical to the reference's float32 path
# (same roundings, no FMA); normalized int8 scores differ only where the float64 norm's summation
# order moves its float32 rounding (rare, one ulp).

_QTOPK_TX = 16  # qtopk.cu: TX, the threads along the rows of a score block (RT = 4 * TX rows)


def _qtopk_tile() -> tuple[int, int]:
    """(QT, RT): queries and rows of one qtopk score block (qtopk.cu derives the same)."""
    return 4 * (LAUNCH["QTOPK"]["THREADS"] // _QTOPK_TX), 4 * _QTOPK_TX


def _qtopk_rows(n_q: int, ncols: int, k: int, m: int) -> int:
    """Rows per launch block: the (n_q, rows) float32 scores, the codes (when uploaded) and, for
    k > KMAX, the sort keys with the sort's scratch, within ``free_fraction`` of free memory.
    Launch rows are int32 in qtopk_select and uint32 in the sort keys: at most 2^30."""
    per_row = n_q * 4 + ncols + 8
    if k > LAUNCH["QTOPK"]["KMAX"]:
        per_row += n_q * 8 * 3
    rows = int(_free_device_bytes() * STREAM["free_fraction"]) // per_row
    return int(max(1, min(m, 1 << 30, max(STREAM["min_chunk_rows"], rows))))


def _qtopk_splits(n_qblocks: int, rows: int, sms: int) -> tuple[int, int]:
    """(n_splits, rows_per_split) of qtopk_select over ``rows``: about 8 blocks per SM in all,
    splits of whole 32-row steps and at least 256 rows (fewer lists to merge), at most 65535."""
    want = max(1, -(-8 * sms // max(1, n_qblocks)))
    n = max(1, min(want, 65535, -(-rows // 256)))
    per = _round_up(-(-rows // n), 32)
    return -(-rows // per), per


def _query_words(qbytes: np.ndarray):
    """(n_q, ncols) query bytes as (n_q, ceil(ncols / 4)) little-endian uint32 words on the
    device, zero-padded (a pad byte times anything adds 0; XOR with a zero pad byte gives 0)."""
    n_q, ncols = qbytes.shape
    n_words = -(-ncols // 4)
    buf = np.zeros((n_q, max(1, n_words) * 4), dtype=np.uint8)
    buf[:, :ncols] = qbytes
    return cp.asarray(buf.view("<u4")), n_words


def _codes_block(dev, host, s: int, e: int):
    """Rows s:e of the codes as a C-contiguous uint8 device array (uploaded from the host)."""
    blk = cp.ascontiguousarray(dev[s:e]) if dev is not None else cp.asarray(np.ascontiguousarray(host[s:e]))
    return blk if blk.dtype == cp.uint8 else blk.view(cp.uint8)


def _qtopk_select(run: _TopkPass, scores, nb: int, row0: int) -> None:
    """Merges the (n_q, nb) score matrix (launch row r = global row row0 + r) into run's state."""
    n_q, k = run.n_q, run.k
    t = LAUNCH["QTOPK"]
    if k <= t["KMAX"]:
        warps = t["SEL_WARPS"]
        smem = warps * k * 8
        kernel = _kernel("qtopk.cu", "qtopk_select")
        _with_dynamic_smem(kernel, smem)
        n_qblocks = -(-n_q // warps)
        n_splits, per = _qtopk_splits(n_qblocks, nb, _device_props()["sms"])
        out_s = cp.empty((n_splits, n_q, k), dtype=cp.float32)
        out_i = cp.empty((n_splits, n_q, k), dtype=cp.int64)
        floor_s, floor_i = run._floor()
        kernel((n_qblocks, n_splits), (warps * 32,),
               (scores, _i64(n_q), _i64(nb), _i64(nb), _i64(per), _i64(row0), floor_s, floor_i, _i64(k),
                out_s, out_i, run.error),
               shared_mem=smem)
        lists_s, lists_i = run._merge_lists(out_s, out_i)
    else:
        keys = cp.empty((n_q, nb), dtype=cp.uint64)
        _kernel("qtopk.cu", "qtopk_keys")((_blocks(n_q * nb, 256),), (256,), (scores, _i64(n_q), _i64(nb), keys))
        keys.sort(axis=1)  # the tie rule is the keys' ascending order
        lists_s = cp.empty((n_q, k), dtype=cp.float32)
        lists_i = cp.empty((n_q, k), dtype=cp.int64)
        threads = LAUNCH["MERGE"]["THREADS"]
        _kernel("topk.cu", "topk_keys_decode")(
            (_blocks(n_q * k, threads),), (threads,),
            (keys, _i64(n_q), _i64(nb), _i64(min(k, nb)), _i64(k), _i64(row0), lists_s, lists_i))
        del keys
    run._merge_state(lists_s, lists_i)


def _qtopk_pass(kind: str, qw, n_words: int, codes, row_offset, exclude, best_scores, best_index, *,
                qscale=None, qoffset=None, signed=False, low=None, step=None, normalize=False, n_bits=0) -> int:
    n_q, k = best_scores.shape
    dev = _as_device_array(codes)
    host = codes if dev is None else None
    m, ncols = (dev if dev is not None else host).shape
    row_offset = int(row_offset)
    ex = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(-1)
    ex = np.sort(ex[(ex >= 0) & (ex < m)])
    run = _TopkPass(np.zeros((n_q, 0), np.float32), k, False, (best_scores, best_index), np.zeros(0, np.int64))
    t = LAUNCH["QTOPK"]
    _, rt = _qtopk_tile()
    n_qtiles = -(-n_q // _qtopk_tile()[0])
    score_kernel = _kernel("qtopk.cu", f"qtopk_{kind}_scores")
    placeholder = cp.zeros(1, dtype=cp.float32)
    qscale_d = _dev(qscale, np.float32) if kind == "int8" else placeholder
    qoffset_d = _dev(qoffset, np.float32) if kind == "int8" else placeholder
    if normalize:
        low_d, step_d = _dev(low, np.float32), _dev(step, np.float32)
    flip = np.uint32(0x80808080 if kind == "int8" and signed else 0)
    rows = _qtopk_rows(n_q, ncols, k, m)
    for s in range(0, m, rows):
        e = min(m, s + rows)
        nb = e - s
        x = _codes_block(dev, host, s, e)
        ok = cp.ones(nb, dtype=cp.uint8)
        div = placeholder
        if normalize:
            div = cp.empty(nb, dtype=cp.float32)
            threads = t["NORM_THREADS"]
            _kernel("qtopk.cu", "qtopk_int8_norms")(
                (_blocks(nb * 32, threads),), (threads,),
                (x, _i64(nb), _i64(ncols), _i64(bool(signed)), low_d, step_d, _i64(row_offset + s), div, ok,
                 run.first_bad))
        lo, hi = (int(v) for v in np.searchsorted(ex, [s, e]))
        if hi > lo:
            ok[cp.asarray(ex[lo:hi] - s)] = 0
        scores = cp.empty((n_q, nb), dtype=cp.float32)
        word_loads = ncols % 4 == 0 and x.data.ptr % 4 == 0
        score_kernel((-(-nb // rt), min(n_qtiles, 65535)), (t["THREADS"],),
                     (qw, _i64(n_q), _i64(n_words), x, _i64(nb), _i64(ncols), flip, _i64(word_loads),
                      qscale_d, qoffset_d, div, _i64(bool(normalize)), _i64(n_bits), ok, scores, _i64(nb)))
        del x
        _qtopk_select(run, scores, nb, row_offset + s)
        del scores
    out_s, out_i, bad = run.result()
    best_scores[...] = out_s
    best_index[...] = out_i
    return bad


def _host_codes(codes):
    dev = _as_device_array(codes)
    return dev.get() if dev is not None else np.asarray(codes)


def qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
               best_scores, best_index, *, n_threads=None):
    m = codes.shape[0]
    if m == 0:
        return -1
    n_q, k = best_scores.shape
    if n_q == 0 or k == 0:  # no state to update; the first bad row is still the answer
        if not normalize:
            return -1
        from . import numpy_backend
        bad = np.flatnonzero(numpy_backend._dequantized_norms(_host_codes(codes), bool(signed), low, step) == 0)
        return int(bad[0]) + int(row_offset) if bad.size else -1
    qw, n_words = _query_words(np.ascontiguousarray(qcodes, dtype=np.int8).view(np.uint8))
    return _qtopk_pass("int8", qw, n_words, codes, row_offset, exclude, best_scores, best_index,
                       qscale=qscale, qoffset=qoffset, signed=bool(signed), low=low, step=step,
                       normalize=bool(normalize))


def qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, best_scores, best_index, *,
                  n_threads=None):
    m = codes.shape[0]
    n_q, k = best_scores.shape
    if m == 0 or n_q == 0 or k == 0:
        return -1
    qw, n_words = _query_words(np.ascontiguousarray(qbits).view(np.uint8))
    return _qtopk_pass("hamming", qw, n_words, codes, row_offset, exclude, best_scores, best_index,
                       n_bits=int(n_bits))


def correct_rows(x, W0, b0, W1, b1, W2, out, *, n_threads=None):
    # Host chunks of a stale corpus (corrected right before the top-k kernel receives them):
    # the reference's float32 GEMMs on the host; a round trip over PCIe per chunk would cost
    # more than it saves.
    from . import numpy_backend
    numpy_backend.correct_rows(x, W0, b0, W1, b1, W2, out)


def dequantize_rows(codes, signed, low, step, out, *, n_threads=None):
    # Host rows for the per-chunk float pass (a quantized corpus lives on the host); the
    # reference's float32 arithmetic, so the rows are the same bits as on every backend.
    from . import numpy_backend
    numpy_backend.dequantize_rows(codes, signed, low, step, out)
