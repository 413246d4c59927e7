"""Compiled CPU backend: a thin wrapper over the pybind11 module ``nudgefast._cpu``.

Same ops and signatures as ``numpy_backend`` (whose docstring is the contract). Native work
runs on ``n_threads`` OpenMP threads (``None``: all cores) with the GIL released. This module
only converts dtypes and layouts the kernels do not take directly; the corpus chunk of
``topk_update`` is never copied when it is float16, float32 or float64 with contiguous rows
(a read-only ``np.memmap`` slice included). Top-k scores are computed in float32 (queries are
cast to float32); the small ops compute in float64.

The compiled module checks every index argument (ranges, sort order, pointer arrays) and
``n_threads`` before any native work and raises ``ValueError`` naming the argument; this module
checks what never reaches it (``pair_pos``) and that index arrays hold integers.

The kernels' inner loops exist once per instruction-set level (baseline, avx2, avx512); the
compiled module picks the best this CPU supports at import, or the one ``NUDGEFAST_CPU_ISA``
names (``describe()`` says which). ``qtopk_int8`` / ``qtopk_hamming`` (quantized corpora: exact
integer sums) also have sub-paths of the avx512 level, AVX512-VNNI (``vpdpbusd``) and
AVX512-VPOPCNTDQ, used when the CPU has the feature (``_cpu.qtopk_paths()``, ``describe()``);
their int8/uint8 code chunks are never copied when rows are contiguous (a read-only
``np.memmap`` slice included).
"""
from __future__ import annotations

import os

import numpy as np

from nudgefast import _cpu

NAME = "cpp"

_CHUNK_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def describe() -> str:
    """One line for ``nudgefast backends``: the instruction-set path in use, what else this CPU
    offers, and the AMX state (detected or not; no AMX kernel exists yet)."""
    f = _cpu.cpu_features()
    isa, kernel = _cpu.isa(), _cpu.kernel_isa()
    extras = [name for name, key in (("avx512-vnni", "avx512_vnni"), ("avx512-bf16", "avx512_bf16"),
                                     ("vpopcntdq", "avx512_vpopcntdq")) if f[key]]
    amx = [name for name, key in (("amx-bf16", "amx_bf16"), ("amx-int8", "amx_int8")) if f[key]]
    if not amx:
        amx_note = "no AMX on this CPU"
    elif not f["amx_permitted"]:
        amx_note = f"{'/'.join(amx)} present but the OS does not grant its tile state: not used"
    else:
        amx_note = f"{'/'.join(amx)} available, no AMX kernel yet: the avx512 kernels run"
    forced = f", forced by {_cpu.ISA_ENV}" if os.environ.get(_cpu.ISA_ENV) else ""
    paths = _cpu.qtopk_paths()
    return (f"path: {kernel}{forced} (levels here: {', '.join(_cpu.isa_levels())}"
            f"{'; also ' + ', '.join(extras) if extras else ''}; {amx_note})"
            + (f"; level {isa}" if isa != kernel else "")
            + f"; quantized top-k: int8 {paths['int8']}, hamming {paths['hamming']}")


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


def _i64(a, name):
    """An index array as C-contiguous int64; a float or bool array is refused, not truncated
    (an empty one of any dtype, e.g. ``np.array([])``, is taken)."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu" and a.size:
        raise TypeError(f"{name}: must be an integer array (record/row indices), got dtype {a.dtype}; "
                        f"pass it as np.int64")
    return np.ascontiguousarray(a, dtype=np.int64)


def query_gradient(queries, order, seg_ptr, *, n_threads=None):
    if queries.dtype not in (np.float32, np.float64):
        queries = queries.astype(np.float64)
    return _cpu.query_gradient(np.ascontiguousarray(queries), _i64(order, "order"), _i64(seg_ptr, "seg_ptr"),
                               n_threads)


def _chunk_view(chunk):
    """The chunk as the kernel takes it: rows contiguous, any row stride; else one float32 copy."""
    chunk = np.asarray(chunk)
    native = chunk.dtype.newbyteorder("=") == chunk.dtype
    if (chunk.dtype in _CHUNK_DTYPES and native and chunk.ndim == 2 and chunk.size == 0):
        return chunk
    if (chunk.dtype in _CHUNK_DTYPES and native and chunk.ndim == 2
            and (chunk.shape[1] <= 1 or chunk.strides[1] == chunk.itemsize)
            and (chunk.shape[0] <= 1 or (chunk.strides[0] > 0 and chunk.strides[0] % chunk.itemsize == 0))):
        return chunk
    # Another dtype (int8, bfloat16 through ml_dtypes, ...) or a transposed/strided view.
    return np.ascontiguousarray(chunk, dtype=np.float32)


def topk_update(queries, chunk, row_offset, exclude, normalize, best_scores, best_index, *, n_threads=None):
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ex = np.empty(0, dtype=np.int64) if exclude is None else _i64(exclude, "exclude")
    # The kernel keeps float32 scores; a state of another dtype/layout is updated through a copy.
    direct = (best_scores.dtype == np.float32 and best_scores.flags.c_contiguous and best_scores.flags.writeable)
    direct_i = (best_index.dtype == np.int64 and best_index.flags.c_contiguous and best_index.flags.writeable)
    scores = best_scores if direct else np.ascontiguousarray(best_scores, dtype=np.float32)
    index = best_index if direct_i else np.ascontiguousarray(best_index, dtype=np.int64)
    first_bad = _cpu.topk_update(q, _chunk_view(chunk), int(row_offset), ex, bool(normalize), scores, index,
                                 n_threads)
    if not direct:
        best_scores[...] = scores
    if not direct_i:
        best_index[...] = index
    return int(first_bad)


def _state(best_scores, best_index):
    """The float32 / int64 state the kernels update in place: the caller's arrays, or copies
    written back by ``_write_back``."""
    direct = (best_scores.dtype == np.float32 and best_scores.flags.c_contiguous and best_scores.flags.writeable)
    direct_i = (best_index.dtype == np.int64 and best_index.flags.c_contiguous and best_index.flags.writeable)
    scores = best_scores if direct else np.ascontiguousarray(best_scores, dtype=np.float32)
    index = best_index if direct_i else np.ascontiguousarray(best_index, dtype=np.int64)
    return scores, index


def _write_back(best_scores, best_index, scores, index):
    if scores is not best_scores:
        best_scores[...] = scores
    if index is not best_index:
        best_index[...] = index


def _codes_view(codes):
    """int8/uint8 codes as the kernels take them: rows contiguous, any positive row stride (a
    read-only np.memmap slice included) without a copy; a strided view of bytes as one copy."""
    codes = np.asarray(codes)
    if codes.dtype in (np.int8, np.uint8) and codes.ndim == 2 and (
            codes.size == 0 or ((codes.shape[1] <= 1 or codes.strides[1] == 1)
                                and (codes.shape[0] <= 1 or codes.strides[0] > 0))):
        return codes
    if codes.dtype.itemsize == 1 and codes.dtype.kind in "iub":
        return np.ascontiguousarray(codes).view(np.uint8)
    return codes  # another dtype: the compiled module refuses it (TypeError naming codes)


def qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
               best_scores, best_index, *, n_threads=None):
    q = np.ascontiguousarray(qcodes, dtype=np.int8)
    d = q.shape[1] if q.ndim == 2 else 0
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    lo = np.zeros(d, np.float32) if low is None else f32(low)
    st = np.zeros(d, np.float32) if step is None else f32(step)
    ex = np.empty(0, dtype=np.int64) if exclude is None else _i64(exclude, "exclude")
    scores, index = _state(best_scores, best_index)
    first_bad = _cpu.qtopk_int8(q, f32(qscale), f32(qoffset), _codes_view(codes), int(row_offset), ex, bool(signed),
                                lo, st, bool(normalize), scores, index, n_threads)
    _write_back(best_scores, best_index, scores, index)
    return int(first_bad)


def qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, best_scores, best_index, *, n_threads=None):
    q = np.asarray(qbits)
    q = q.view(np.uint8) if q.dtype == np.int8 and q.flags.c_contiguous else np.ascontiguousarray(q, np.uint8)
    ex = np.empty(0, dtype=np.int64) if exclude is None else _i64(exclude, "exclude")
    scores, index = _state(best_scores, best_index)
    first_bad = _cpu.qtopk_hamming(q, _codes_view(codes), int(row_offset), ex, int(n_bits), scores, index,
                                   n_threads)
    _write_back(best_scores, best_index, scores, index)
    return int(first_bad)


def nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, eps, *, n_threads=None):
    # pair_pos is part of the contract but not needed: x is among the touched competitors with
    # D = 0 and s_dif = 0, which bounds nothing (as in the reference). Checked all the same: a
    # bad one means the caller's pairs and columns disagree.
    pair_query = _i64(pair_query, "pair_query")
    pair_pos = _i64(pair_pos, "pair_pos")
    if pair_pos.shape != pair_query.shape:
        raise ValueError(f"pair_pos: shape {pair_pos.shape} differs from pair_query's {pair_query.shape}; "
                         f"pass one position per validation pair")
    t = S.shape[1] if np.ndim(S) == 2 else 0
    bad = np.flatnonzero((pair_pos < -1) | (pair_pos >= t))
    if bad.size:
        raise ValueError(f"pair_pos[{bad[0]}] = {pair_pos[bad[0]]} is outside [-1, {t}) (the column of the "
                         f"answer among the t touched records of S, -1 when untouched)")
    return _cpu.nudge_m_intervals(_f64(S), _f64(G), pair_query, _f64(s_x), _f64(g_x), _f64(u_score),
                                  float(eps), n_threads)


def nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, *, n_threads=None,
                  kth=None):
    return _cpu.nudge_n_sweep(_f64(S), _f64(H), _f64(alpha), _f64(beta), _i64(touched, "touched"),
                              _f64(unt_scores), _i64(unt_index, "unt_index"), _i64(ans_ptr, "ans_ptr"),
                              _i64(ans_index, "ans_index"), int(k_val), n_threads, kth=kth)


def dot64(A, B, *, n_threads=None):
    return _cpu.dot64(_f64(A), _f64(B), n_threads)


def project(E, C, alpha, beta, *, n_threads=None):
    def native(a):  # float32 and float64 go in as they are; anything else (float16) as float64
        return np.ascontiguousarray(a) if a.dtype in (np.float32, np.float64) else _f64(a)

    return _cpu.project(native(E), native(C), _f64(alpha), _f64(beta), n_threads)


def normalize_rows(chunk, out, *, n_threads=None):
    # float16/float32 rows are read in place; anything else is converted once (this chunk only).
    # out is written in place, so it is never converted: the binding checks it (float32,
    # C-contiguous, writeable, (m, d)).
    chunk = np.asarray(chunk)
    if chunk.dtype not in (np.float16, np.float32) or not chunk.flags.c_contiguous:
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
    return int(_cpu.normalize_rows(chunk, out, n_threads))


def metrics(retrieved, ans_ptr, ans_index, ans_rel, k, *, n_threads=None):
    return _cpu.metrics(_i64(retrieved, "retrieved"), _i64(ans_ptr, "ans_ptr"), _i64(ans_index, "ans_index"),
                        _f64(ans_rel), int(k), n_threads)


def correct_rows(x, W0, b0, W1, b1, W2, out, *, n_threads=None):
    # float16/float32 rows are read in place (a memmap chunk included); anything else is converted
    # once (this chunk only). out is written in place, so never converted: the binding checks it.
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)

    def f32(a):
        return None if a is None else np.ascontiguousarray(a, dtype=np.float32)

    _cpu.correct_rows(x, f32(W0), f32(b0), f32(W1), f32(b1), f32(W2), out, n_threads)


def dequantize_rows(codes, signed, low, step, out, *, n_threads=None):
    _cpu.dequantize_rows(codes, bool(signed), np.ascontiguousarray(low, np.float32),
                         np.ascontiguousarray(step, np.float32), out, n_threads)
