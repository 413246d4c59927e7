"""Numba implementation of every op: the fallback when the compiled extension is absent.

Same op contract as ``numpy_backend`` (read its docstring); every public function here has the
same signature and is a thin wrapper that fixes dtypes/layouts, sets the thread count for the
call and runs ``@njit(cache=True, nogil=True)`` kernels.

``topk_update`` is the hot op. The chunk is cut into sub-blocks of ``_BLOCK`` rows at fixed
offsets (independent of the thread count); each sub-block is converted to float32 into a
per-worker buffer (float16 decoded from its bits, so a float16 or read-only memmap chunk is
never copied whole), its row norms are taken in float64, and a 6-query x 2-row register tile
computes scores that go straight to a per-worker, per-query admission test. Admitted
candidates are appended, as one uint64 rank key each (order-reversed float32 score bits, then
the chunk-local row: the tie rule is integer order), to an unsorted reservoir of ``2k`` (at
least ``k + 64``) keys; a full reservoir is cut back to its best k by selection and its k-th
key becomes the threshold. The threshold starts at the caller's k-th best score, so after the
first chunks almost every row is rejected by one compare. Cost: O(1) amortised per admitted
candidate, then per query O(k + s log s) to sort the s survivors and merge them with the
caller's state (a sorted insertion would cost O(k) per admitted row: O(k^2) per chunk while a
large k fills). Workers own disjoint (row group, query block) pairs. Every (query, row) score
is produced by the same tile code, so equal rows give bit-identical scores, and the (score
desc, index asc) order is a strict total order: the result does not depend on the thread
count.

Differences from the NumPy reference, all within float32 rounding: scores are always computed
in float32 (float64 queries are rounded to float32), the dot product is accumulated in a
different order (SIMD partial sums), and with ``normalize`` the score is multiplied by the
float32 reciprocal of the norm instead of divided by the float32 norm.

``qtopk_int8`` and ``qtopk_hamming`` share that work split, reservoirs and merge
(``_run_topk``); only the tiles differ. int8: each sub-block of codes is copied to a buffer
of u (signed codes: ``code ^ 0x80``), the 6 x 2 tile sums ``qcodes * u`` exactly (d <= 512:
float32 buffers through ``_tile``, every partial sum an integer below 2**24; else uint8 and
int32 sums; past 2**16 columns int32 segments added in int64), then
``float32(acc) * qscale + qoffset``, with
``normalize`` times the float32 reciprocal of the dequantized row's float64 norm. Hamming:
rows packed into uint64 words (zero padded), popcount of the XOR, ``n_bits - 2 * popcount``
exact in float32.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

NAME = "numba"

# Rows per sub-block: a 256 x 384 float32 buffer (384 KiB) stays in a core's L2 while every
# query tile streams over it.
_BLOCK = 256
# Register tile: 6 queries x 2 rows. The d loop vectorises (8 float32 lanes on AVX2) into 12
# independent FMA chains (enough to hide the FMA latency) + 2 row registers, query loads folded
# into the FMAs: no spill in 16 ymm registers. Measured: 6x2 >= 5x2 > 4x2 >> 4x4 (spills).
_QT = 6
_RT = 2
# Bound on the per-worker top-k state (bytes) before workers split the queries instead of
# the rows; keeps memory O(chunk + n_q k) with a small constant.
_STATE_BUDGET = 256 << 20
# Rank keys hold the chunk-local row in their low 32 bits: longer chunks are fed in pieces.
_MAX_CHUNK_ROWS = (1 << 32) - 1

# Only the reassociation (SIMD partial sums) and FMA contraction are allowed: never
# 'nnan'/'ninf', the non-finite norm check must stay meaningful.
_FAST = {"reassoc", "contract"}

_jit = dict(cache=True, nogil=True, error_model="numpy")

_CHUNK_KIND = {np.dtype(np.float16): 0, np.dtype(np.float32): 1, np.dtype(np.float64): 2}


# --------------------------------------------------------------------------- helpers

@contextmanager
def _threads(n_threads):
    """Use ``n_threads`` (None: all) numba threads for the call, restore the previous value."""
    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if n_threads is None else max(1, min(int(n_threads), limit))
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(previous)


def _ro(a, dtype=None):
    """A read-only, C-contiguous plain-ndarray view of ``a`` (a copy only when the dtype or
    layout has to change): one numba specialisation whatever the caller's flags."""
    a = np.asarray(a, dtype=dtype)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    v = a.view()
    v.flags.writeable = False
    return v


@njit(**_jit)
def _f16_bits_to_f32(h):
    """The float32 value of a float16 bit pattern (uint16), exact for all 65536 patterns (NaN
    payloads included). Numba has no CPU float16 type; integer ops and selects vectorise,
    where a 65536-entry table lookup is a gather (3x slower)."""
    w = np.uint32(h)
    e = np.uint32(w & np.uint32(0x7FFF))
    sign = np.uint32((w & np.uint32(0x8000)) << np.uint32(16))
    # Subnormal or zero: the integer mantissa times 2**-24, a product of normal float32 values
    # (immune to flush-to-zero modes); else re-bias the exponent (+112), inf/NaN keep all ones.
    small = np.float32(np.float32(e) * np.float32(5.9604644775390625e-08))
    normal = np.uint32((e << np.uint32(13)) + np.uint32(0x38000000))
    special = np.uint32((e << np.uint32(13)) | np.uint32(0x7F800000))
    big = special if e >= np.uint32(0x7C00) else normal
    bits = np.uint32(small.view(np.uint32)) if e < np.uint32(0x0400) else big
    return np.uint32(bits | sign).view(np.float32)


def _as_f32(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(_as_f32, inline="always")
def _as_f32_impl(x):
    if isinstance(x, types.Integer):  # uint16 bit pattern of a float16
        return lambda x: _f16_bits_to_f32(x)
    return lambda x: np.float32(x)


@njit(**_jit)
def _beats(s, i, ws, wi):
    """Rank order: score descending, then index ascending."""
    return s > ws or (s == ws and i < wi)


# --------------------------------------------------------------------------- query_gradient

@njit(parallel=True, **_jit)
def _query_gradient_kernel(queries, order, seg_ptr, out):
    t, d = out.shape
    for j in prange(t):
        a = seg_ptr[j]
        b = seg_ptr[j + 1]
        if b <= a:
            for c in range(d):
                out[j, c] = 0.0
            continue
        r = order[a]
        # Rows added in order (NumPy's reduceat sums a long segment pairwise: ulp-level
        # differences, well inside float32 rounding).
        for c in range(d):
            out[j, c] = np.float64(queries[r, c])
        for p in range(a + 1, b):
            r = order[p]
            for c in range(d):
                out[j, c] += np.float64(queries[r, c])


def query_gradient(queries, order, seg_ptr, *, n_threads=None):
    """Segmented sum of train queries into their answer records.

    queries (n, d) float32/float64, order (nnz,) int, seg_ptr (t+1,) int -> (t, d) float64.
    """
    queries = np.asarray(queries)
    if queries.dtype != np.float32:
        queries = queries.astype(np.float64, copy=False)
    queries = _ro(queries)
    order = _ro(order, np.int64)
    seg_ptr = _ro(seg_ptr, np.int64)
    t = len(seg_ptr) - 1
    out = np.empty((max(t, 0), queries.shape[1]), dtype=np.float64)
    if t <= 0:
        return out
    with _threads(n_threads):
        _query_gradient_kernel(queries, order, seg_ptr, out)
    return out


# --------------------------------------------------------------------------- topk_update

@njit(fastmath=_FAST, **_jit)
def _convert_rows(rows, buf, norms):
    """rows (nr, d) -> float32 buffer rows 0:nr, squared row norms in float64."""
    nr, d = rows.shape
    for r in range(nr):
        acc = 0.0
        for c in range(d):
            v = _as_f32(rows[r, c])
            buf[r, c] = v
            acc += np.float64(v) * np.float64(v)
        norms[r] = acc


@njit(**_jit)
def _load_block(chunk, kind, r0, nr, buf, norms):
    """Rows r0:r0+nr of the chunk's bytes, decoded by ``kind`` (0: float16, 1: float32,
    2: float64). The chunk travels as uint8 bytes so that one compiled kernel serves every
    dtype (each parallel specialisation costs seconds of compile time)."""
    rows = chunk[r0:r0 + nr]
    if kind == 0:
        _convert_rows(rows.view(np.uint16), buf, norms)
    elif kind == 1:
        _convert_rows(rows.view(np.float32), buf, norms)
    else:
        _convert_rows(rows.view(np.float64), buf, norms)


@njit(fastmath=_FAST, **_jit)
def _tile(q, i0, b, r0, d):
    """6 x 2 dot products in float32; the accumulation over d is vectorised (reassociated),
    identically for every accumulator, so equal inputs give equal scores. Not inlined at the
    Numba IR level: the fast-math flags must stay on this function's instructions."""
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = s50 = s51 = np.float32(0.0)
    for c in range(d):
        a0 = q[i0, c]
        a1 = q[i0 + 1, c]
        a2 = q[i0 + 2, c]
        a3 = q[i0 + 3, c]
        a4 = q[i0 + 4, c]
        a5 = q[i0 + 5, c]
        b0 = b[r0, c]
        b1 = b[r0 + 1, c]
        s00 += a0 * b0
        s01 += a0 * b1
        s10 += a1 * b0
        s11 += a1 * b1
        s20 += a2 * b0
        s21 += a2 * b1
        s30 += a3 * b0
        s31 += a3 * b1
        s40 += a4 * b0
        s41 += a4 * b1
        s50 += a5 * b0
        s51 += a5 * b1
    return s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51


@njit(**_jit)
def _rank_key(s, local):
    """The rank order (score descending, then row ascending) as one unsigned integer,
    ascending: the float32 bits of ``s`` mapped to an order-reversing uint32 (high half) and
    the chunk-local row (low half). ``s`` is finite or +inf; -0.0 is keyed as +0.0 because
    the two compare equal and must tie on the row."""
    if s == 0:
        s = np.float32(0.0)
    b = np.uint64(np.float32(s).view(np.uint32))
    flip = np.uint64(0x7FFFFFFF) if b < np.uint64(0x80000000) else np.uint64(0)
    return ((b ^ flip) << np.uint64(32)) | np.uint64(local)


@njit(**_jit)
def _key_score(key):
    """The float32 score a rank key was made from (exact)."""
    b = np.uint32(key >> np.uint64(32))
    flip = np.uint32(0x7FFFFFFF) if b < np.uint32(0x80000000) else np.uint32(0)
    return np.uint32(b ^ flip).view(np.float32)


# Hand-written selection and sort of rank keys: np.partition and np.sort would each add
# seconds of compile time to the kernels that call them (measured: np.partition alone ~6 s).
# Keys are distinct (distinct rows), so Lomuto partitioning does not degrade on duplicates;
# a depth limit falls back to heapsort (introsort), so no input is quadratic.

@njit(**_jit)
def _split_keys(a, lo, hi):
    """Partition a[lo:hi] (at least 3 keys) around the median of its first, middle and last
    keys; returns the pivot's final position p: a[lo:p] < a[p] < a[p + 1:hi]."""
    mid = (lo + hi - 1) >> 1
    x, y, z = a[lo], a[mid], a[hi - 1]
    m = mid if (x < y) == (y < z) else (lo if (y < x) == (x < z) else hi - 1)
    a[m], a[hi - 1] = a[hi - 1], a[m]
    pivot = a[hi - 1]
    p = lo
    for i in range(lo, hi - 1):
        if a[i] < pivot:
            a[i], a[p] = a[p], a[i]
            p += 1
    a[p], a[hi - 1] = a[hi - 1], a[p]
    return p


@njit(**_jit)
def _insertion_sort_keys(a, lo, hi):
    for i in range(lo + 1, hi):
        v = a[i]
        j = i
        while j > lo and a[j - 1] > v:
            a[j] = a[j - 1]
            j -= 1
        a[j] = v


@njit(**_jit)
def _heapsort_keys(a, lo, hi):
    n = hi - lo
    for start in range(n // 2 - 1, -1, -1):
        _sift_down_keys(a, lo, start, n)
    for end in range(n - 1, 0, -1):
        a[lo], a[lo + end] = a[lo + end], a[lo]
        _sift_down_keys(a, lo, 0, end)


@njit(**_jit)
def _sift_down_keys(a, lo, root, n):
    while True:
        child = 2 * root + 1
        if child >= n:
            return
        if child + 1 < n and a[lo + child + 1] > a[lo + child]:
            child += 1
        if a[lo + root] >= a[lo + child]:
            return
        a[lo + root], a[lo + child] = a[lo + child], a[lo + root]
        root = child


@njit(**_jit)
def _depth_limit(n):
    depth = 8
    while n > 1:
        n >>= 1
        depth += 2
    return depth


@njit(**_jit)
def _select_keys(a, n, kth):
    """Reorder a[:n] so that a[kth] is its kth smallest key, smaller keys before it."""
    lo = 0
    hi = n
    depth = _depth_limit(n)
    while hi - lo > 16:
        if depth == 0:
            _heapsort_keys(a, lo, hi)
            return
        depth -= 1
        p = _split_keys(a, lo, hi)
        if p == kth:
            return
        if kth < p:
            hi = p
        else:
            lo = p + 1
    _insertion_sort_keys(a, lo, hi)


@njit(**_jit)
def _sort_keys(a, n):
    """Sort a[:n] ascending (introsort: the smaller side is deferred, so the stack holds at
    most log2(n) segments)."""
    stack = np.empty((64, 3), dtype=np.int64)
    stack[0, 0] = 0
    stack[0, 1] = n
    stack[0, 2] = _depth_limit(n)
    top = 1
    while top > 0:
        top -= 1
        lo = stack[top, 0]
        hi = stack[top, 1]
        depth = stack[top, 2]
        while hi - lo > 16:
            if depth == 0:
                _heapsort_keys(a, lo, hi)
                lo = hi
                break
            depth -= 1
            p = _split_keys(a, lo, hi)
            if p - lo > hi - p - 1:  # defer the larger side, go on with the smaller
                stack[top, 0] = lo
                stack[top, 1] = p
                lo = p + 1
            else:
                stack[top, 0] = p + 1
                stack[top, 1] = hi
                hi = p
            stack[top, 2] = depth
            top += 1
        _insertion_sort_keys(a, lo, hi)


@njit(**_jit)
def _shrink(res, cnt, thr_s, thr_k, g, q, k):
    """Keep the k best keys of a full reservoir; the k-th becomes the admission threshold.
    Between two shrinks at least ``cap - k >= k`` candidates are admitted, so the selection
    costs O(1) per admitted candidate."""
    keys = res[g, q]
    _select_keys(keys, cnt[g, q], k - 1)
    kth = keys[k - 1]
    thr_k[g, q] = kth
    thr_s[g, q] = _key_score(kth)
    cnt[g, q] = k
    return k


@njit(**_jit)
def _admit(res, cnt, thr_s, thr_k, g, q, k, s, local):
    """Candidate (score s, chunk row ``local``) of row group g, query q, that passed the score
    test: keep it unless it loses the tie rule to the threshold key."""
    if s > -np.inf:  # -inf and NaN: non-candidates
        key = _rank_key(s, local)
        if key < thr_k[g, q]:
            c = cnt[g, q]
            if c == res.shape[2]:
                # cap > k here: a cap bounded by the group's rows is never reached before them.
                c = _shrink(res, cnt, thr_s, thr_k, g, q, k)
            res[g, q, c] = key
            cnt[g, q] = c + 1


@njit(**_jit)
def _admit_tile(tile, res, cnt, thr_s, thr_k, g, i0, k, x0):
    """Offer a tile's scores (queries i0 + a, chunk rows x0 + b) to the reservoirs."""
    for a in range(_QT):
        for b in range(_RT):
            v = tile[a, b]
            if v >= thr_s[g, i0 + a]:
                _admit(res, cnt, thr_s, thr_k, g, i0 + a, k, v, x0 + b)


@njit(**_jit)
def _topk_worker(w, q, chunk, kind, exclude, normalize, n_row_groups, q_block, k,
                 res, cnt, thr_s, thr_k, first_bad):
    """Work item w = (row group g, query block qb): offers rows of group g, scored against the
    queries of block qb, to the reservoirs res[g, queries of qb]."""
    m = chunk.shape[0]
    d = q.shape[1]
    nq = q.shape[0]  # padded to a multiple of _QT with zero queries
    n_blocks = (m + _BLOCK - 1) // _BLOCK
    per_group = (n_blocks + n_row_groups - 1) // n_row_groups
    n_qblocks = max(1, (nq + q_block - 1) // q_block)  # no queries: one block, rows still checked
    g = w // n_qblocks
    qb = w - g * n_qblocks
    q0 = qb * q_block
    q1 = min(q0 + q_block, nq)
    buf = np.zeros((_BLOCK + _RT, d), dtype=np.float32)
    norms = np.empty(_BLOCK, dtype=np.float64)
    scale = np.empty(_BLOCK + _RT, dtype=np.float32)
    bias = np.empty(_BLOCK + _RT, dtype=np.float32)
    tile = np.empty((_QT, _RT), dtype=np.float32)
    fb = -1
    for blk in range(g * per_group, min((g + 1) * per_group, n_blocks)):
        r0 = blk * _BLOCK
        nr = min(_BLOCK, m - r0)
        _load_block(chunk, kind, r0, nr, buf, norms)
        for r in range(nr):
            nrm = np.sqrt(norms[r])
            bad = not np.isfinite(nrm) or (normalize and nrm == 0.0)
            if bad and fb < 0:
                fb = r0 + r
            # bias = -inf turns a non-candidate's score into -inf (or NaN), which is never
            # admitted: no branch in the scoring loop.
            bias[r] = -np.inf if bad else np.float32(0.0)
            scale[r] = np.float32(1.0 / nrm) if (normalize and not bad) else np.float32(1.0)
        nr_pad = (nr + _RT - 1) // _RT * _RT
        for r in range(nr, nr_pad):
            for c in range(d):
                buf[r, c] = 0.0
            bias[r] = -np.inf
            scale[r] = 1.0
        e = np.searchsorted(exclude, r0)
        while e < exclude.shape[0] and exclude[e] < r0 + nr:
            bias[exclude[e] - r0] = -np.inf
            e += 1
        if k == 0:
            continue
        for i0 in range(q0, q1, _QT):
            for rr in range(0, nr_pad, _RT):
                s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51 = _tile(q, i0, buf, rr, d)
                c0 = scale[rr]
                c1 = scale[rr + 1]
                z0 = bias[rr]
                z1 = bias[rr + 1]
                v00 = s00 * c0 + z0
                v01 = s01 * c1 + z1
                v10 = s10 * c0 + z0
                v11 = s11 * c1 + z1
                v20 = s20 * c0 + z0
                v21 = s21 * c1 + z1
                v30 = s30 * c0 + z0
                v31 = s31 * c1 + z1
                v40 = s40 * c0 + z0
                v41 = s41 * c1 + z1
                v50 = s50 * c0 + z0
                v51 = s51 * c1 + z1
                t0 = thr_s[g, i0]
                t1 = thr_s[g, i0 + 1]
                t2 = thr_s[g, i0 + 2]
                t3 = thr_s[g, i0 + 3]
                t4 = thr_s[g, i0 + 4]
                t5 = thr_s[g, i0 + 5]
                # One branch per tile (non-short-circuit |): once the thresholds are set almost
                # every tile admits nothing.
                if ((v00 >= t0) | (v01 >= t0) | (v10 >= t1) | (v11 >= t1)
                        | (v20 >= t2) | (v21 >= t2) | (v30 >= t3) | (v31 >= t3)
                        | (v40 >= t4) | (v41 >= t4) | (v50 >= t5) | (v51 >= t5)):
                    tile[0, 0], tile[0, 1], tile[1, 0], tile[1, 1] = v00, v01, v10, v11
                    tile[2, 0], tile[2, 1], tile[3, 0], tile[3, 1] = v20, v21, v30, v31
                    tile[4, 0], tile[4, 1], tile[5, 0], tile[5, 1] = v40, v41, v50, v51
                    _admit_tile(tile, res, cnt, thr_s, thr_k, g, i0, k, r0 + rr)
    first_bad[w] = fb


@njit(parallel=True, **_jit)
def _topk_kernel(q, chunk, kind, exclude, normalize, n_row_groups, q_block, k,
                 res, cnt, thr_s, thr_k, first_bad):
    # The parallel loop body is one call: a small parfor keeps the compile time down.
    for w in prange(first_bad.shape[0]):
        _topk_worker(w, q, chunk, kind, exclude, normalize, n_row_groups, q_block, k,
                     res, cnt, thr_s, thr_k, first_bad)


@njit(**_jit)
def _merge_query(res, cnt, row_offset, best_scores, best_index, q):
    """The best k of every group's reservoir for query q, sorted, merged with the caller's
    sorted state (on equal keys the caller's entry comes first; a row held twice is kept
    once). O(k + s log s) for s admitted candidates; a query with none is left untouched."""
    n_groups = res.shape[0]
    k = best_scores.shape[1]
    total = 0
    for g in range(n_groups):
        total += cnt[g, q]
    if total == 0:
        return
    cand = np.empty(total, dtype=np.uint64)
    p = 0
    for g in range(n_groups):
        for j in range(cnt[g, q]):
            cand[p] = res[g, q, j]
            p += 1
    n_c = min(total, k)
    if total > k:
        _select_keys(cand, total, k - 1)
    _sort_keys(cand, n_c)
    low = np.uint64(0xFFFFFFFF)
    out_s = np.empty(k, dtype=np.float64)
    out_i = np.empty(k, dtype=np.int64)
    a = 0
    b = 0
    j = 0
    while j < k:
        have_a = a < k and best_scores[q, a] > -np.inf
        have_b = b < n_c
        sa = -np.inf
        ia = np.int64(-1)
        sb = -np.inf
        ib = np.int64(-1)
        if have_a:
            sa = np.float64(best_scores[q, a])
            ia = np.int64(best_index[q, a])
        if have_b:
            sb = np.float64(_key_score(cand[b]))
            ib = row_offset + np.int64(cand[b] & low)
        if have_a and (not have_b or not _beats(sb, ib, sa, ia)):
            s, i = sa, ia
            a += 1
        elif have_b:
            s, i = sb, ib
            b += 1
        else:
            for jj in range(j, k):
                out_s[jj] = -np.inf
                out_i[jj] = -1
            break
        if j > 0 and i == out_i[j - 1]:
            continue  # a row already held, fed again: equal score, so adjacent; keep one
        out_s[j] = s
        out_i[j] = i
        j += 1
    for j in range(k):
        best_scores[q, j] = out_s[j]
        best_index[q, j] = out_i[j]


@njit(parallel=True, **_jit)
def _topk_merge(res, cnt, row_offset, best_scores, best_index):
    for q in prange(best_scores.shape[0]):
        _merge_query(res, cnt, row_offset, best_scores, best_index, q)


def _run_topk(kernel, args, m, n_q, nq_pad, row_offset, best_scores, best_index, n_threads):
    """Run a top-k ``kernel(*args, n_row_groups, q_block, k, res, cnt, thr_s, thr_k,
    first_bad)`` over a chunk of ``m`` rows and ``nq_pad`` (a multiple of ``_QT``) queries, the
    first ``n_q`` real, then merge its reservoirs into the caller's state. Shared by
    ``topk_update``, ``qtopk_int8`` and ``qtopk_hamming``: same work split, same reservoirs,
    same merge. Returns the global index of the first bad row the workers saw, else -1."""
    k = best_scores.shape[1]
    with _threads(n_threads) as nt:
        n_blocks = (m + _BLOCK - 1) // _BLOCK
        # Reservoir capacity: room for k kept + max(k, 64) admitted between two selections,
        # never more than the rows a group can admit.
        cap = min(k + max(k, 64), n_blocks * _BLOCK) if k else 0
        state_bytes = max(1, nq_pad * cap * 8)
        # Row groups: several per thread for load balance, bounded by the state memory.
        n_groups = max(1, min(n_blocks, 4 * nt, _STATE_BUDGET // state_bytes))
        cap = min(cap, -(-n_blocks // n_groups) * _BLOCK)
        # When the state is too large for a group per thread, workers split the queries too.
        n_qsplit = max(1, min(nq_pad // _QT, -(-nt // n_groups)))
        q_block = -(-(nq_pad // _QT) // n_qsplit) * _QT if nq_pad else _QT
        n_qblocks = max(1, -(-nq_pad // q_block)) if nq_pad else 1
        res = np.empty((n_groups, nq_pad, cap), dtype=np.uint64)
        cnt = np.zeros((n_groups, nq_pad), dtype=np.int64)
        thr_k = np.full((n_groups, nq_pad), np.iinfo(np.uint64).max, dtype=np.uint64)
        # Admission starts at the caller's k-th best score: a row scoring below it cannot
        # enter. The test is s >= gate, so a float64 state rounded to nearest float32 is safe:
        # a float32 s above the float64 k-th is >= that k-th rounded to nearest. Padding
        # queries admit nothing.
        thr_s = np.full((n_groups, nq_pad), np.inf, dtype=np.float32)
        if k and n_q:
            thr_s[:, :n_q] = best_scores[:, k - 1]
        first_bad = np.full(n_groups * n_qblocks, -1, dtype=np.int64)
        previous_chunk = numba.set_parallel_chunksize(1)
        try:
            kernel(*args, n_groups, q_block, k, res, cnt, thr_s, thr_k, first_bad)
            if k > 0 and n_q > 0:
                _topk_merge(res, cnt, np.int64(row_offset), best_scores, best_index)
        finally:
            numba.set_parallel_chunksize(previous_chunk)
    found = first_bad[first_bad >= 0]
    return int(found.min()) + int(row_offset) if found.size else -1


def topk_update(queries, chunk, row_offset, exclude, normalize, best_scores, best_index, *, n_threads=None):
    """Merge corpus rows ``chunk`` (global rows ``row_offset + r``) into the running top-k.

    queries (n_q, d) float, chunk (m, d) float16/float32/float64 (a read-only memmap slice is
    fine, it is never copied whole), exclude sorted int64 local rows, best_scores (n_q, k)
    float32 (or float64) and best_index (n_q, k) int64 updated in place. Returns the global
    index of the first row with a non-finite (or, with ``normalize``, zero) norm, else -1.
    """
    chunk = np.asarray(chunk)
    m, d = chunk.shape
    if m == 0:
        return -1
    exclude = np.empty(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    if m > _MAX_CHUNK_ROWS:
        # Rank keys hold the chunk-local row in 32 bits: feed a huge chunk in pieces.
        first = -1
        for s in range(0, m, _MAX_CHUNK_ROWS):
            lo, hi = np.searchsorted(exclude, [s, s + _MAX_CHUNK_ROWS])
            bad = topk_update(queries, chunk[s:s + _MAX_CHUNK_ROWS], row_offset + s,
                              exclude[lo:hi] - s, normalize, best_scores, best_index,
                              n_threads=n_threads)
            if first < 0:
                first = bad
        return first
    if chunk.dtype not in _CHUNK_KIND:
        chunk = chunk.astype(np.float32)
    kind = _CHUNK_KIND[chunk.dtype]
    if not chunk.flags.c_contiguous:
        chunk = np.ascontiguousarray(chunk)  # only strided views pay a copy
    chunk = chunk.view(np.uint8)  # no copy: a C-contiguous memmap slice is read in place
    chunk.flags.writeable = False

    n_q, k = best_scores.shape
    nq_pad = (n_q + _QT - 1) // _QT * _QT
    q = np.zeros((nq_pad, d), dtype=np.float32)
    q[:n_q] = queries
    exclude = _ro(exclude)

    return _run_topk(_topk_kernel, (q, chunk, kind, exclude, bool(normalize)), m, n_q, nq_pad,
                     row_offset, best_scores, best_index, n_threads)


# --------------------------------------------------------------------------- qtopk_int8, _hamming
#
# topk_update over quantized corpora, with its work split, reservoirs and merge (_run_topk):
# only the scoring differs. Integer sums are exact whatever their order, so no fast-math flag
# is needed for them, and the float32 epilogue is plain IEEE arithmetic (no contraction): a
# (query, row) pair's score is the same bit pattern wherever the row sits.

# Exact integer sums of qtopk_int8 (|q| <= 127, u <= 255, so |q u| <= 32385), by d:
# - d <= _FSEG: u and the query codes as float32 (exact), through topk_update's float32 tile.
#   Every partial sum, in any order, is an integer of magnitude <= 512 * 32385 < 2**24, so
#   each float32 product, addition or fused multiply-add is exact and the fast-math
#   reassociation (SIMD partial sums) changes nothing; the fastest path.
# - d <= _ISEG: int32 accumulators, at most 2**16 * 32385 < 2**31.
# - beyond: int32 sums over segments of _ISEG columns, added in int64 (slow: Numba does not
#   vectorise the inner loop of the segment loop; such d are not embeddings).
_FSEG = 512
_ISEG = 1 << 16


@intrinsic
def _popcount64(typingctx, x):
    """The number of set bits of a uint64 (LLVM ctpop: one popcnt instruction, or a vector
    popcount where the loop vectorises)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")
        return builder.call(fn, args)

    return types.uint64(types.uint64), codegen


def _make_itile(acc_t, fastmath):
    """A 6 x 2 tile of dot products over columns c0:c1 (q int8, b uint8) accumulated in
    ``acc_t``; see _ISEG for when it is exact."""

    @njit(fastmath=fastmath, **_jit)
    def tile(q, i0, b, r0, c0, c1):
        s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = s50 = s51 = acc_t(0)
        for c in range(c0, c1):
            a0 = acc_t(q[i0, c])
            a1 = acc_t(q[i0 + 1, c])
            a2 = acc_t(q[i0 + 2, c])
            a3 = acc_t(q[i0 + 3, c])
            a4 = acc_t(q[i0 + 4, c])
            a5 = acc_t(q[i0 + 5, c])
            b0 = acc_t(b[r0, c])
            b1 = acc_t(b[r0 + 1, c])
            s00 += a0 * b0
            s01 += a0 * b1
            s10 += a1 * b0
            s11 += a1 * b1
            s20 += a2 * b0
            s21 += a2 * b1
            s30 += a3 * b0
            s31 += a3 * b1
            s40 += a4 * b0
            s41 += a4 * b1
            s50 += a5 * b0
            s51 += a5 * b1
        return s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51

    return tile


_itile_i32 = _make_itile(np.int32, False)


@njit(**_jit)
def _itile(q, i0, b, r0, d, out):
    """The exact 6 x 2 integer sums over all d columns (d > _FSEG), rounded to float32."""
    if d <= _ISEG:
        s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51 = _itile_i32(q, i0, b, r0, 0, d)
        out[0, 0], out[0, 1], out[1, 0], out[1, 1] = s00, s01, s10, s11
        out[2, 0], out[2, 1], out[3, 0], out[3, 1] = s20, s21, s30, s31
        out[4, 0], out[4, 1], out[5, 0], out[5, 1] = s40, s41, s50, s51
    else:
        _itile_long(q, i0, b, r0, d, out)


@njit(**_jit)
def _itile_long(q, i0, b, r0, d, out):
    x00 = x01 = x10 = x11 = x20 = x21 = x30 = x31 = x40 = x41 = x50 = x51 = np.int64(0)
    for c0 in range(0, d, _ISEG):
        s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51 = _itile_i32(
            q, i0, b, r0, c0, min(c0 + _ISEG, d))
        x00 += s00
        x01 += s01
        x10 += s10
        x11 += s11
        x20 += s20
        x21 += s21
        x30 += s30
        x31 += s31
        x40 += s40
        x41 += s41
        x50 += s50
        x51 += s51
    # int64 -> float32: one correctly rounded conversion, as the int32 and float32 paths.
    out[0, 0], out[0, 1], out[1, 0], out[1, 1] = x00, x01, x10, x11
    out[2, 0], out[2, 1], out[3, 0], out[3, 1] = x20, x21, x30, x31
    out[4, 0], out[4, 1], out[5, 0], out[5, 1] = x40, x41, x50, x51


@njit(fastmath=_FAST, **_jit)
def _dequantized_norm2(buf, r, low, step):
    """|low + step * u|^2 of buffer row r in float64 (low/step widened from float32: step * u
    is exact, so a contracted multiply-add gives the same x). Every term is >= 0 and none
    underflows to 0 or overflows, so the sum is 0 exactly when every x is: reassociation
    cannot change which rows are bad."""
    acc = 0.0
    for c in range(buf.shape[1]):
        x = low[c] + step[c] * np.float64(buf[r, c])
        acc += x * x
    return acc


@njit(**_jit)
def _exclude_rows(exclude, r0, nr, bias):
    """bias[r - r0] = -inf for the excluded rows r of block r0:r0 + nr."""
    e = np.searchsorted(exclude, r0)
    while e < exclude.shape[0] and exclude[e] < r0 + nr:
        bias[exclude[e] - r0] = -np.inf
        e += 1


@njit(**_jit)
def _load_codes(chunk, r0, nr, flip, buf):
    """buf[r] = u of chunk row r0 + r (signed: code ^ 0x80 = code + 128), as buf's dtype."""
    d = chunk.shape[1]
    for r in range(nr):
        for c in range(d):
            buf[r, c] = chunk[r0 + r, c] ^ flip


@njit(**_jit)
def _qint8_worker(w, q, qf, qscale, qoffset, chunk, signed, low, step, exclude, normalize,
                  n_row_groups, q_block, k, res, cnt, thr_s, thr_k, first_bad):
    """Work item w = (row group g, query block qb), as ``_topk_worker``: each sub-block of
    codes is copied to a buffer as u (float32 for d <= _FSEG, else uint8), its dequantized
    norms taken in float64, and 6 x 2 exact tiles (``qf`` float32 or ``q`` int8 queries, see
    _FSEG) scored as ``(float32(acc) * qscale + qoffset) * (1/|x|) + bias``."""
    m, d = chunk.shape
    nq = qscale.shape[0]
    n_blocks = (m + _BLOCK - 1) // _BLOCK
    per_group = (n_blocks + n_row_groups - 1) // n_row_groups
    n_qblocks = max(1, (nq + q_block - 1) // q_block)  # no queries: one block, rows still checked
    g = w // n_qblocks
    qb = w - g * n_qblocks
    q0 = qb * q_block
    q1 = min(q0 + q_block, nq)
    flip = np.uint8(0x80) if signed else np.uint8(0)
    fast = d <= _FSEG
    fbuf = np.zeros((_BLOCK + _RT, d if fast else 0), dtype=np.float32)
    buf = np.zeros((_BLOCK + _RT, 0 if fast else d), dtype=np.uint8)
    scale = np.empty(_BLOCK + _RT, dtype=np.float32)
    bias = np.empty(_BLOCK + _RT, dtype=np.float32)
    acc = np.empty((_QT, _RT), dtype=np.float32)
    tile = np.empty((_QT, _RT), dtype=np.float32)
    fb = -1
    for blk in range(g * per_group, min((g + 1) * per_group, n_blocks)):
        r0 = blk * _BLOCK
        nr = min(_BLOCK, m - r0)
        if fast:
            _load_codes(chunk, r0, nr, flip, fbuf)
        else:
            _load_codes(chunk, r0, nr, flip, buf)
        for r in range(nr):
            bias[r] = np.float32(0.0)
            scale[r] = np.float32(1.0)
            if normalize:
                n2 = (_dequantized_norm2(fbuf, r, low, step) if fast
                      else _dequantized_norm2(buf, r, low, step))
                if n2 == 0.0:
                    if fb < 0:
                        fb = r0 + r
                    bias[r] = -np.inf
                else:
                    scale[r] = np.float32(1.0 / np.sqrt(n2))
        nr_pad = (nr + _RT - 1) // _RT * _RT
        for r in range(nr, nr_pad):
            for c in range(fbuf.shape[1]):
                fbuf[r, c] = 0
            for c in range(buf.shape[1]):
                buf[r, c] = 0
            bias[r] = -np.inf
            scale[r] = 1.0
        _exclude_rows(exclude, r0, nr, bias)
        if k == 0:
            continue
        for i0 in range(q0, q1, _QT):
            for rr in range(0, nr_pad, _RT):
                if fast:
                    (s00, s01, s10, s11, s20, s21,
                     s30, s31, s40, s41, s50, s51) = _tile(qf, i0, fbuf, rr, d)
                    acc[0, 0], acc[0, 1], acc[1, 0], acc[1, 1] = s00, s01, s10, s11
                    acc[2, 0], acc[2, 1], acc[3, 0], acc[3, 1] = s20, s21, s30, s31
                    acc[4, 0], acc[4, 1], acc[5, 0], acc[5, 1] = s40, s41, s50, s51
                else:
                    _itile(q, i0, buf, rr, d, acc)
                hit = False
                for a in range(_QT):
                    qs = qscale[i0 + a]
                    qo = qoffset[i0 + a]
                    t = thr_s[g, i0 + a]
                    for b in range(_RT):
                        v = (acc[a, b] * qs + qo) * scale[rr + b] + bias[rr + b]
                        tile[a, b] = v
                        hit |= v >= t
                if hit:
                    _admit_tile(tile, res, cnt, thr_s, thr_k, g, i0, k, r0 + rr)
    first_bad[w] = fb


@njit(parallel=True, **_jit)
def _qint8_kernel(q, qf, qscale, qoffset, chunk, signed, low, step, exclude, normalize,
                  n_row_groups, q_block, k, res, cnt, thr_s, thr_k, first_bad):
    for w in prange(first_bad.shape[0]):
        _qint8_worker(w, q, qf, qscale, qoffset, chunk, signed, low, step, exclude, normalize,
                      n_row_groups, q_block, k, res, cnt, thr_s, thr_k, first_bad)


@njit(**_jit)
def _htile(q, i0, b, r0, nw):
    """6 x 2 popcounts of q ^ b over nw uint64 words."""
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = s50 = s51 = np.uint64(0)
    for c in range(nw):
        b0 = b[r0, c]
        b1 = b[r0 + 1, c]
        a = q[i0, c]
        s00 += _popcount64(a ^ b0)
        s01 += _popcount64(a ^ b1)
        a = q[i0 + 1, c]
        s10 += _popcount64(a ^ b0)
        s11 += _popcount64(a ^ b1)
        a = q[i0 + 2, c]
        s20 += _popcount64(a ^ b0)
        s21 += _popcount64(a ^ b1)
        a = q[i0 + 3, c]
        s30 += _popcount64(a ^ b0)
        s31 += _popcount64(a ^ b1)
        a = q[i0 + 4, c]
        s40 += _popcount64(a ^ b0)
        s41 += _popcount64(a ^ b1)
        a = q[i0 + 5, c]
        s50 += _popcount64(a ^ b0)
        s51 += _popcount64(a ^ b1)
    return s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51


@njit(**_jit)
def _pack_row(src, dst):
    """Bytes src (w,) into little-endian uint64 words dst (ceil(w / 8),), zero padded: the same
    packing on both sides of the XOR, so the byte order inside a word does not matter."""
    for j in range(dst.shape[0]):
        dst[j] = 0
    for j in range(src.shape[0]):
        dst[j >> 3] |= np.uint64(src[j]) << np.uint64(8 * (j & 7))


@njit(**_jit)
def _qham_worker(w, q, chunk, n_bits, exclude, n_row_groups, q_block, k,
                 res, cnt, thr_s, thr_k, first_bad):
    """Work item w = (row group g, query block qb), as ``_topk_worker``: each sub-block of
    codes is packed into uint64 words, then 6 x 2 tiles of popcounts scored as
    ``float32(n_bits - 2 * popcount) + bias`` (exact)."""
    m = chunk.shape[0]
    nq, nw = q.shape
    n_blocks = (m + _BLOCK - 1) // _BLOCK
    per_group = (n_blocks + n_row_groups - 1) // n_row_groups
    n_qblocks = max(1, (nq + q_block - 1) // q_block)  # no queries: one block, rows still checked
    g = w // n_qblocks
    qb = w - g * n_qblocks
    q0 = qb * q_block
    q1 = min(q0 + q_block, nq)
    buf = np.zeros((_BLOCK + _RT, nw), dtype=np.uint64)
    bias = np.empty(_BLOCK + _RT, dtype=np.float32)
    tile = np.empty((_QT, _RT), dtype=np.float32)
    nb = np.int64(n_bits)
    for blk in range(g * per_group, min((g + 1) * per_group, n_blocks)):
        r0 = blk * _BLOCK
        nr = min(_BLOCK, m - r0)
        for r in range(nr):
            _pack_row(chunk[r0 + r], buf[r])
            bias[r] = np.float32(0.0)
        nr_pad = (nr + _RT - 1) // _RT * _RT
        for r in range(nr, nr_pad):
            for c in range(nw):
                buf[r, c] = 0
            bias[r] = -np.inf
        _exclude_rows(exclude, r0, nr, bias)
        if k == 0:
            continue
        for i0 in range(q0, q1, _QT):
            for rr in range(0, nr_pad, _RT):
                p = _htile(q, i0, buf, rr, nw)
                hit = False
                for a in range(_QT):
                    t = thr_s[g, i0 + a]
                    for b in range(_RT):
                        v = np.float32(nb - 2 * np.int64(p[a * _RT + b])) + bias[rr + b]
                        tile[a, b] = v
                        hit |= v >= t
                if hit:
                    _admit_tile(tile, res, cnt, thr_s, thr_k, g, i0, k, r0 + rr)
    first_bad[w] = -1


@njit(parallel=True, **_jit)
def _qham_kernel(q, chunk, n_bits, exclude, n_row_groups, q_block, k,
                 res, cnt, thr_s, thr_k, first_bad):
    for w in prange(first_bad.shape[0]):
        _qham_worker(w, q, chunk, n_bits, exclude, n_row_groups, q_block, k,
                     res, cnt, thr_s, thr_k, first_bad)


def _codes_view(codes, name):
    """(m, w) codes as a read-only C-contiguous uint8 view (no copy for contiguous rows, a
    read-only memmap slice included); int8 and uint8 share the bytes."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype not in (np.int8, np.uint8):
        raise ValueError(f"{name}: expected a 2-d int8 or uint8 array, got {codes.dtype} "
                         f"with shape {codes.shape}")
    if not codes.flags.c_contiguous:
        codes = np.ascontiguousarray(codes)
    v = codes.view(np.uint8)
    v.flags.writeable = False
    return v


def _check_state(n_q, best_scores, best_index):
    if (best_scores.ndim != 2 or best_scores.shape[0] != n_q
            or best_index.shape != best_scores.shape):
        raise ValueError(f"best_scores {best_scores.shape} and best_index {best_index.shape} must "
                         f"both be (n_q, k) with n_q = {n_q}")


def _exclude(exclude):
    return _ro(np.empty(0, np.int64) if exclude is None else exclude, np.int64)


def _in_pieces(m, exclude, row_offset, call):
    """Feed a chunk longer than the rank keys' 32-bit row field in pieces:
    ``call(lo, hi, local_exclude, offset)`` per piece; the first bad row of all."""
    first = -1
    for s in range(0, m, _MAX_CHUNK_ROWS):
        lo, hi = np.searchsorted(exclude, [s, s + _MAX_CHUNK_ROWS])
        bad = call(s, min(s + _MAX_CHUNK_ROWS, m), exclude[lo:hi] - s, row_offset + s)
        if first < 0:
            first = bad
    return first


def qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
               best_scores, best_index, *, n_threads=None):
    """``topk_update`` over int8/uint8 codes with int8 queries (see numpy_backend).

    qcodes (n_q, d) int8 in [-127, 127], qscale/qoffset (n_q,) float32, codes (m, d) int8
    (``signed``: u = code + 128) or uint8 (u = code), read in place (a read-only memmap slice
    is fine), low/step (d,) float32, exclude sorted int64 local rows, best_scores (n_q, k)
    float32 (or float64) and best_index (n_q, k) int64 updated in place. Scores are exact
    integer sums then ``float32(acc) * qscale + qoffset``, with ``normalize`` times the float32
    reciprocal of the dequantized row's float64 norm. Returns the global index of the first
    zero-norm row when ``normalize``, else -1.
    """
    codes = _codes_view(codes, "codes")
    m, d = codes.shape
    if m == 0:
        return -1
    exclude = _exclude(exclude)
    if m > _MAX_CHUNK_ROWS:
        return _in_pieces(m, exclude, row_offset, lambda lo, hi, ex, off: qtopk_int8(
            qcodes, qscale, qoffset, codes[lo:hi], off, ex, signed, low, step, normalize,
            best_scores, best_index, n_threads=n_threads))
    qcodes = np.asarray(qcodes)
    n_q, k = best_scores.shape
    if qcodes.ndim != 2 or qcodes.shape != (n_q, d):
        raise ValueError(f"qcodes: expected shape ({n_q}, {d}) (n_q from the state, d from the "
                         f"codes), got {qcodes.shape}")
    _check_state(n_q, best_scores, best_index)
    nq_pad = (n_q + _QT - 1) // _QT * _QT
    q = np.zeros((nq_pad, d), dtype=np.int8)
    q[:n_q] = qcodes
    # The float32 path's queries (exact), the int path's int8; the other is empty.
    qf = q.astype(np.float32) if d <= _FSEG else np.zeros((0, 0), np.float32)
    if d <= _FSEG:
        q = np.zeros((0, 0), np.int8)
    qs = np.zeros(nq_pad, dtype=np.float32)
    qs[:n_q] = qscale
    qo = np.zeros(nq_pad, dtype=np.float32)
    qo[:n_q] = qoffset
    if normalize:
        low64 = _ro(np.broadcast_to(np.asarray(low, np.float32), (d,)), np.float64)
        step64 = _ro(np.broadcast_to(np.asarray(step, np.float32), (d,)), np.float64)
    else:
        low64 = step64 = _ro(np.zeros(d, np.float64))  # read-only too: one specialisation
    return _run_topk(_qint8_kernel, (q, qf, qs, qo, codes, bool(signed), low64, step64, exclude,
                                     bool(normalize)),
                     m, n_q, nq_pad, row_offset, best_scores, best_index, n_threads)


def qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, best_scores, best_index, *,
                  n_threads=None):
    """``topk_update`` over packed binary codes (see numpy_backend): qbits (n_q, w) and codes
    (m, w) uint8 or int8 (read as bytes; codes in place), score ``n_bits - 2 * popcount(qbits
    ^ codes)``, exact in float32. Always returns -1."""
    codes = _codes_view(codes, "codes")
    m, w = codes.shape
    if m == 0:
        return -1
    exclude = _exclude(exclude)
    if m > _MAX_CHUNK_ROWS:
        return _in_pieces(m, exclude, row_offset, lambda lo, hi, ex, off: qtopk_hamming(
            qbits, codes[lo:hi], off, ex, n_bits, best_scores, best_index, n_threads=n_threads))
    qb = _codes_view(qbits, "qbits")
    n_q, k = best_scores.shape
    if qb.shape != (n_q, w):
        raise ValueError(f"qbits: expected shape ({n_q}, {w}) (n_q from the state, w from the "
                         f"codes), got {qb.shape}")
    _check_state(n_q, best_scores, best_index)
    nq_pad = (n_q + _QT - 1) // _QT * _QT
    nw = max(1, (w + 7) // 8)
    packed = np.zeros((nq_pad, nw * 8), dtype=np.uint8)
    packed[:n_q, :w] = qb
    # Little-endian words, as _pack_row builds the codes' words.
    q = packed.view("<u8").astype(np.uint64)
    return _run_topk(_qham_kernel, (q, codes, np.int64(n_bits), exclude),
                     m, n_q, nq_pad, row_offset, best_scores, best_index, n_threads)


# --------------------------------------------------------------------------- nudge_m_intervals

@njit(parallel=True, **_jit)
def _nudge_m_kernel(S, G, pair_query, s_x, g_x, u_score, eps, large, low, high, feasible):
    t = S.shape[1]
    for p in prange(pair_query.shape[0]):
        i = pair_query[p]
        sx = s_x[p]
        gx = g_x[p]
        lo = 0.0
        hi = large
        block = False
        for j in range(t + 1):
            if j < t:
                D = gx - G[i, j]
                s_dif = S[i, j] - sx
            else:  # the best untouched competitor: g = 0
                D = gx
                s_dif = u_score[p] - sx
            alpha = s_dif / (D + eps)
            # np.max / np.min propagate NaN, and so do these: once NaN, a bound stays NaN.
            if D > 0:
                if not np.isnan(lo) and (np.isnan(alpha) or alpha > lo):
                    lo = alpha
            elif D < 0:
                if not np.isnan(hi) and (np.isnan(alpha) or alpha < hi):
                    hi = alpha
            elif D == 0 and s_dif > 0:
                block = True
        if lo < 0.0:
            lo = 0.0
        low[p] = lo
        high[p] = hi
        feasible[p] = (not block) and hi >= lo


def nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, eps, *, n_threads=None):
    """Per validation pair, the gamma interval on which its answer is top-1.

    S, G (n_b, t) float, pair_query/pair_pos (P,) int, s_x/g_x/u_score (P,) float
    -> low (P,) float64, high (P,) float64, feasible (P,) bool. See numpy_backend.
    """
    S = _ro(S, np.float64)
    G = _ro(G, np.float64)
    pair_query = _ro(pair_query, np.int64)
    s_x = _ro(s_x, np.float64)
    g_x = _ro(g_x, np.float64)
    u_score = _ro(u_score, np.float64)
    eps = float(eps)
    large = np.inf if eps == 0 else 1.0 / eps
    P = pair_query.shape[0]
    low = np.empty(P, dtype=np.float64)
    high = np.empty(P, dtype=np.float64)
    feasible = np.empty(P, dtype=np.bool_)
    if P:
        with _threads(n_threads):
            _nudge_m_kernel(S, G, pair_query, s_x, g_x, u_score, eps, large, low, high, feasible)
    return low, high, feasible


# --------------------------------------------------------------------------- nudge_n_sweep

@njit(**_jit)
def _sweep_offer(top_s, top_i, k, s, idx):
    # -inf and NaN candidates can only fill slots that are never counted: skip them.
    if not (s > -np.inf):
        return
    if _beats(s, idx, top_s[k - 1], top_i[k - 1]):
        j = k - 1
        while j > 0 and _beats(s, idx, top_s[j - 1], top_i[j - 1]):
            top_s[j] = top_s[j - 1]
            top_i[j] = top_i[j - 1]
            j -= 1
        top_s[j] = s
        top_i[j] = idx


@njit(**_jit)
def _lower_bound(ans_index, a, b, x):
    """The first position in the sorted ans_index[a:b] whose value is >= x (b if none)."""
    lo = a
    hi = b
    while lo < hi:
        mid = (lo + hi) >> 1
        if ans_index[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(**_jit)
def _is_answer(ans_index, a, b, x):
    """Binary search of x in the sorted ans_index[a:b]."""
    lo = _lower_bound(ans_index, a, b, x)
    return lo < b and ans_index[lo] == x


@njit(parallel=True, **_jit)
def _nudge_n_kernel(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, hits, kth):
    n_b, t = S.shape
    n_gamma = alpha.shape[0]
    n_u = unt_scores.shape[1]
    for i in prange(n_b):
        top_s = np.empty(k_val, dtype=np.float64)
        top_i = np.empty(k_val, dtype=np.int64)
        a = ans_ptr[i]
        b = ans_ptr[i + 1]
        for g in range(n_gamma):
            # Empty slots: -inf, which every kept candidate beats.
            for j in range(k_val):
                top_s[j] = -np.inf
                top_i[j] = -1
            for j in range(t):
                _sweep_offer(top_s, top_i, k_val, alpha[g, j] * S[i, j] + beta[g, j] * H[i, j], touched[j])
            for j in range(n_u):
                _sweep_offer(top_s, top_i, k_val, unt_scores[i, j], unt_index[i, j])
            h = 0
            for j in range(k_val):
                if np.isfinite(top_s[j]) and _is_answer(ans_index, a, b, top_i[j]):
                    h += 1
            hits[i, g] = h
            kth[i, g] = top_s[k_val - 1]


def nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, *, n_threads=None,
                  kth=None):
    """Answers among each validation query's top-``k_val`` for every gamma on the grid.

    S, H (n_b, t) float, alpha/beta (n_gamma, t) float, touched (t,) int, unt_scores/unt_index
    (n_b, n_u), ans_ptr (n_b+1,) int, ans_index sorted unique int -> (n_b, n_gamma) int64;
    ``kth`` (optional (n_b, n_gamma) float64) gets each k_val-th best score (-inf if none).
    """
    S = _ro(S, np.float64)
    H = _ro(H, np.float64)
    alpha = _ro(alpha, np.float64)
    beta = _ro(beta, np.float64)
    touched = _ro(touched, np.int64)
    unt_scores = _ro(unt_scores, np.float64)
    unt_index = _ro(unt_index, np.int64)
    ans_ptr = _ro(ans_ptr, np.int64)
    ans_index = _ro(ans_index, np.int64)
    n_b = S.shape[0]
    n_gamma = alpha.shape[0]
    hits = np.zeros((n_b, n_gamma), dtype=np.int64)
    kth_out = np.full((n_b, n_gamma), -np.inf)
    k_val = int(k_val)
    if n_b and n_gamma and k_val > 0:
        with _threads(n_threads):
            _nudge_n_kernel(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, hits,
                            kth_out)
    if kth is not None:
        kth[...] = kth_out
    return hits


# --------------------------------------------------------------------------- dot64

@njit(parallel=True, **_jit)
def _dot64_kernel(A, BT, out):
    n, d = A.shape
    m = BT.shape[1]
    for i in prange(n):
        for j in range(m):
            out[i, j] = 0.0
        # k outer, j inner: every element is one chain of products added over k in order (no
        # reassociation without fastmath), and the j loop vectorises across elements.
        for k in range(d):
            a = A[i, k]
            for j in range(m):
                out[i, j] += a * BT[k, j]


def dot64(A, B, *, n_threads=None):
    """(n, m) float64 ``A @ B.T``, each element its own ordered sum (shape-independent)."""
    A = _ro(A, np.float64)
    BT = np.ascontiguousarray(np.asarray(B, np.float64).T)
    if A.ndim != 2 or BT.ndim != 2 or A.shape[1] != BT.shape[0]:
        raise ValueError(f"dot64: A {A.shape} and B {BT.T.shape} must be (n, d) and (m, d)")
    out = np.empty((A.shape[0], BT.shape[1]))
    if out.size:
        with _threads(n_threads):
            _dot64_kernel(A, BT, out)
    return out


# --------------------------------------------------------------------------- project

@njit(parallel=True, **_jit)
def _project_kernel(E, C, alpha, beta, out):
    t, d = out.shape
    for j in prange(t):
        a = alpha[j]
        b = beta[j]
        for c in range(d):
            out[j, c] = np.float32(a * np.float64(E[j, c]) + b * np.float64(C[j, c]))


def project(E, C, alpha, beta, *, n_threads=None):
    """``alpha[:, None] * E + beta[:, None] * C`` in float64, returned as (t, d) float32."""
    E = np.asarray(E)
    # E (base rows) may be a large float32 gather: read in place. C is the float64 gradient.
    E = _ro(E if E.dtype == np.float32 else E.astype(np.float64, copy=False))
    C = _ro(C, np.float64)
    alpha = _ro(alpha, np.float64)
    beta = _ro(beta, np.float64)
    out = np.empty(E.shape, dtype=np.float32)
    if out.size:
        with _threads(n_threads):
            _project_kernel(E, C, alpha, beta, out)
    return out


# --------------------------------------------------------------------------- normalize_rows

# Rows per parallel work item: each finds its own first bad row, the smallest one is returned.
_NORM_BLOCK = 64


@njit(fastmath=_FAST, **_jit)
def _normalize_typed(rows, out, r0):
    """rows (nr, d) -> out[r0:r0 + nr]; the first bad row (local to ``rows``) or -1."""
    nr, d = rows.shape
    first = -1
    for r in range(nr):
        acc = 0.0
        for c in range(d):
            v = np.float64(_as_f32(rows[r, c]))  # float16/float32 widen exactly
            acc += v * v
        nrm = np.sqrt(acc)
        if first < 0 and not (np.isfinite(nrm) and nrm > 0.0):
            first = r
        # The contract allows the float64 reciprocal: within one float32 ulp of x / |x|.
        inv = 1.0 / nrm
        for c in range(d):
            out[r0 + r, c] = np.float32(np.float64(_as_f32(rows[r, c])) * inv)
    return first


@njit(**_jit)
def _normalize_block(chunk, kind, r0, r1, out):
    """Rows r0:r1 of the chunk's bytes (kind 0: float16, else float32), see ``_load_block``."""
    rows = chunk[r0:r1]
    if kind == 0:
        return _normalize_typed(rows.view(np.uint16), out, r0)
    return _normalize_typed(rows.view(np.float32), out, r0)


@njit(parallel=True, **_jit)
def _normalize_kernel(chunk, kind, out, first_bad):
    m = out.shape[0]
    for blk in prange(first_bad.shape[0]):
        r0 = blk * _NORM_BLOCK
        b = _normalize_block(chunk, kind, r0, min(r0 + _NORM_BLOCK, m), out)
        first_bad[blk] = r0 + b if b >= 0 else -1


def normalize_rows(chunk, out, *, n_threads=None):
    """``out[r] = chunk[r] / |chunk[r]|``: chunk (m, d) float16/float32 (other dtypes are
    read as float32), out (m, d) float32 C-contiguous (an ``np.memmap`` view is fine), the
    norm in float64, each value rounded once to float32. Returns the local index of the first
    row whose norm is not finite or is zero, else -1 (that row's ``out`` is unspecified).
    One read of ``chunk``, one write of ``out``; a read-only memmap chunk is read in place.
    """
    chunk = np.asarray(chunk)
    target = np.asarray(out)  # a plain ndarray view of a memmap: writes go to the map
    # Checked, not trusted: the kernel writes out[r, c] for every element of chunk, and a
    # smaller out would be written past its end.
    if target.shape != chunk.shape:
        raise ValueError(f"out: expected shape {chunk.shape} (the chunk's), got {target.shape}; "
                         f"pass a float32 array of the chunk's shape")
    if target.dtype != np.float32 or not target.flags.c_contiguous or not target.flags.writeable:
        raise ValueError(f"out: expected a writable C-contiguous float32 array, got {target.dtype}"
                         f" (C-contiguous: {target.flags.c_contiguous}, writeable: "
                         f"{target.flags.writeable}); pass np.empty(chunk.shape, np.float32)")
    m = chunk.shape[0]
    if m == 0 or chunk.shape[1] == 0:
        return 0 if m else -1  # d = 0: every norm is zero
    if chunk.dtype not in (np.float16, np.float32):
        chunk = chunk.astype(np.float32)
    kind = 0 if chunk.dtype == np.float16 else 1
    if not chunk.flags.c_contiguous:
        chunk = np.ascontiguousarray(chunk)
    chunk = chunk.view(np.uint8)  # one compiled kernel for both dtypes, no copy
    chunk.flags.writeable = False
    first_bad = np.empty(-(-m // _NORM_BLOCK), dtype=np.int64)
    with _threads(n_threads):
        _normalize_kernel(chunk, kind, target, first_bad)
    found = first_bad[first_bad >= 0]
    return int(found.min()) if found.size else -1


# --------------------------------------------------------------------------- metrics

# O(n k) work: a parallel loop would cost more to compile than it could ever save.
@njit(**_jit)
def _metrics_kernel(retrieved, ans_ptr, ans_index, ans_rel, k, out):
    n = retrieved.shape[0]
    kk = min(k, retrieved.shape[1])
    for i in range(n):
        a = ans_ptr[i]
        b = ans_ptr[i + 1]
        if b <= a:
            out[i, 0] = np.nan
            out[i, 1] = np.nan
            out[i, 2] = np.nan
            continue
        n_hit = 0
        dcg = 0.0
        first = -1
        for p in range(kk):
            x = retrieved[i, p]
            if x < 0:
                continue
            lo = _lower_bound(ans_index, a, b, x)  # position of x among the sorted answers
            if lo < b and ans_index[lo] == x:
                n_hit += 1
                dcg += ans_rel[lo] * (1.0 / np.log2(p + 2.0))
                if first < 0:
                    first = p
        # Ideal DCG: the min(k, n_answers) largest relevances, by insertion (answer lists
        # are short; np.sort would double this function's compile time).
        m = min(k, b - a)
        ideal = np.full(m, -np.inf)
        for p in range(a, b):
            v = ans_rel[p]
            if m > 0 and v > ideal[m - 1]:
                j = m - 1
                while j > 0 and v > ideal[j - 1]:
                    ideal[j] = ideal[j - 1]
                    j -= 1
                ideal[j] = v
        idcg = 0.0
        for p in range(m):
            idcg += ideal[p] * (1.0 / np.log2(p + 2.0))
        out[i, 0] = n_hit / min(b - a, k)
        out[i, 1] = dcg / idcg if idcg > 0 else 0.0
        out[i, 2] = 1.0 / (first + 1) if first >= 0 else 0.0


def metrics(retrieved, ans_ptr, ans_index, ans_rel, k, *, n_threads=None):
    """Per query recall@k, ndcg@k (graded), mrr@k -> (n, 3) float64; NaN without answers.

    retrieved (n, >=k or fewer) int, ans_ptr (n+1,) int, ans_index sorted unique int,
    ans_rel aligned float.
    """
    retrieved = _ro(retrieved, np.int64)
    ans_ptr = _ro(ans_ptr, np.int64)
    ans_index = _ro(ans_index, np.int64)
    ans_rel = _ro(ans_rel, np.float64)
    n = retrieved.shape[0]
    out = np.empty((n, 3), dtype=np.float64)
    if n:
        with _threads(n_threads):
            _metrics_kernel(retrieved, ans_ptr, ans_index, ans_rel, int(k), out)
    return out


def correct_rows(x, W0, b0, W1, b1, W2, out, *, n_threads=None):
    """The reference's computation (NumPy's float32 matmul: a BLAS GEMM, which a numba loop
    would not beat)."""
    from . import numpy_backend
    numpy_backend.correct_rows(x, W0, b0, W1, b1, W2, out)


@njit(parallel=True, **_jit)
def _dequantize_rows(codes, flip, low, step, out):
    for r in prange(codes.shape[0]):
        for j in range(codes.shape[1]):
            # No fastmath: the product and the sum round separately, as NumPy's expression.
            out[r, j] = np.float32(np.uint8(codes[r, j]) ^ flip) * step[j] + low[j]


def dequantize_rows(codes, signed, low, step, out, *, n_threads=None):
    """``out = u * step + low`` in float32 (``u = code + 128``: the byte's top bit flipped, for
    int8 codes), two roundings, the bits of the reference."""
    codes = np.asarray(codes).view(np.uint8)
    if codes.ndim != 2 or out.shape != codes.shape or out.dtype != np.float32:
        raise ValueError(f"out: expected float32 of shape {codes.shape}, got {out.dtype} "
                         f"{out.shape}")
    with _threads(n_threads):
        _dequantize_rows(codes, np.uint8(0x80 if signed else 0),
                         np.ascontiguousarray(low, np.float32),
                         np.ascontiguousarray(step, np.float32), out)
