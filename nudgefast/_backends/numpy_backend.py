"""NumPy reference implementation of every op.

This module is the specification the compiled backends are tested against. Every op takes
arrays that the API layer has already validated (shapes, dtypes, finiteness of the small
inputs); the ops trust their inputs. ``float64`` inputs give the float64 reference mode used
by the tests; ``float32`` queries give the float32 production path.

Op contract (identical signatures in every backend; every op also takes a keyword
``n_threads=None``: the number of CPU threads, ``None`` for all cores; ignored here):

``query_gradient(queries, order, seg_ptr) -> (t, d) float64``
    Segmented sum: row ``j`` is ``sum(queries[order[seg_ptr[j]:seg_ptr[j+1]]])``.

``topk_update(queries, chunk, row_offset, exclude, normalize, best_scores, best_index) -> int``
    Merge the corpus rows ``chunk`` (global rows ``row_offset + r``) into the running top-k
    ``best_scores``/``best_index`` ((n_q, k), updated in place, kept sorted by score descending
    then index ascending; empty slots hold ``-inf`` / ``-1``). Rows listed in ``exclude``
    (sorted int64, local to the chunk) are not candidates. With ``normalize`` the score is
    ``q . x / |x|`` (cosine up to the query norm), else ``q . x``. Returns the global index of
    the first row whose norm is not finite (or zero when ``normalize``), else ``-1``; such rows
    are never candidates.

``qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
best_scores, best_index) -> int``
    ``topk_update`` over int8/uint8 codes with integer queries. ``codes`` (m, d) int8
    (``signed``: the value is ``u = code + 128``) or uint8 (``u = code``), C-contiguous rows;
    ``qcodes`` (n_q, d) int8 in [-127, 127], ``qscale``/``qoffset`` (n_q,) float32. The score of
    row ``r`` for query ``i`` is ``qscale[i] * sum_j qcodes[i, j] * u[r, j] + qoffset[i]``: the
    sum exact in int32 (|qcodes| <= 127 and u <= 255, so no overflow for d < 66,000), then in
    the state's float dtype (compiled backends: float32, one fused multiply-add allowed). With
    ``normalize`` it is divided by the norm of the dequantized row ``low + step * u``
    (``low``/``step`` (d,) float32; the norm accumulated in float64 here, compiled backends may
    accumulate in float32). The search layer builds ``qcodes`` from ``q * step`` rounded per
    query and ``qoffset = q . low``, so the score approximates ``q . dequantized row``. Returns
    the global index of the first row of zero norm when ``normalize``, else ``-1`` (codes are
    always finite); such rows are never candidates. Merge and tie rule as ``topk_update``.

``dequantize_rows(codes, signed, low, step, out) -> None``
    ``out[r] = u[r] * step + low`` in float32, two roundings (no fused multiply-add), for
    ``codes`` (m, d) int8 (``signed``: ``u = code + 128``) or uint8 with contiguous rows,
    ``low``/``step`` (d,) float32, ``out`` (m, d) float32 C-contiguous: the rows the exact pass
    over a quantized corpus scores, bit for bit the same on every backend. Memory-bound.

``qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, best_scores, best_index) -> int``
    ``topk_update`` over packed binary codes: ``codes`` (m, w) and ``qbits`` (n_q, w) uint8 or
    int8 (read as bytes; binary's flipped top bit cancels in the XOR), C-contiguous rows. The
    score is ``n_bits - 2 * popcount(qbits[i] ^ codes[r])``, the dot product of the two +-1 sign
    vectors (pad bits are 0 on both sides): a smaller Hamming distance is a higher score, exact
    in float32 (n_bits <= 2**24). Always returns ``-1``. Merge and tie rule as ``topk_update``.

``nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, eps) -> (low, high, feasible)``
    Per validation pair ``p`` (query ``i = pair_query[p]``, answer ``x``): the closed interval
    of gamma >= 0 on which ``x`` is top-1. ``S``, ``G`` (n_b, t) are ``v . e_j`` and
    ``v . c_j/|c_j|`` over the touched records; ``pair_pos`` is the position of ``x`` among the
    touched records (``-1`` when untouched), ``s_x``/``g_x`` its score and gradient score,
    ``u_score`` the best untouched score other than ``x`` (``-inf`` when none; its ``g`` is 0).
    With ``D = g_x - g_j`` and ``alpha = (s_j - s_x) / (D + eps)``: ``D > 0`` bounds gamma from
    below, ``D < 0`` from above, ``D == 0`` demands ``s_j <= s_x``. ``high`` is ``1/eps`` when
    unbounded (``inf`` for ``eps == 0``), ``low`` is clamped at 0.

``nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val,
kth=None) -> (n_b, n_gamma) int64``
    For each query and gamma ``g``: touched record ``j`` scores ``alpha[g, j] * S[i, j] +
    beta[g, j] * H[i, j]`` (``H = v . c_j``), untouched candidates are ``unt_scores`` /
    ``unt_index`` (top-k_val untouched, ``-inf`` / ``-1`` padded). Returns how many of the
    top-``k_val`` (score desc, index asc) are answers (``ans_index[ans_ptr[i]:ans_ptr[i+1]]``,
    sorted, unique). ``kth`` (optional, (n_b, n_gamma) float64, written): the score of the
    ``k_val``-th best candidate, ``-inf`` when fewer than ``k_val`` have a score above
    ``-inf`` (the threshold a new candidate must reach; the tuner's dirty test).

``dot64(A, B) -> (n, m) float64``
    ``A @ B.T`` for (n, d) and (m, d) float arrays, in float64, each element computed from its
    two rows alone in a fixed order: the same value whatever the shapes around it (a BLAS
    product's last bits depend on its blocking). The validation products of a fit and of the
    tuner's updates go through it, so they agree bit for bit. Backends may differ from each
    other in the last bits (their orders differ), never from themselves.

``project(E, C, alpha, beta) -> (t, d) float32``
    ``alpha[:, None] * E + beta[:, None] * C`` computed in float64.

``normalize_rows(chunk, out) -> int``
    ``out[r] = chunk[r] / |chunk[r]|`` for every row of ``chunk`` ((m, d) float16 or float32,
    C-contiguous), the squared norm accumulated in float64 (float32 values widen exactly),
    ``x / |x|`` in float64 rounded once to float32 into ``out`` (compiled backends may multiply
    by the float64 reciprocal: within one float32 ulp) ((m, d) float32, C-contiguous; may be an
    ``np.memmap`` view). Returns the local index of the first row whose norm is not finite or
    is zero, else ``-1``; what such a row's ``out`` holds is unspecified (the caller raises).
    Memory-bound: one read of ``chunk``, one write of ``out``.

``correct_rows(x, W0, b0, W1, b1, W2, out) -> None``
    A fitted corrector (nudgefast.corrector) applied to a chunk of stale corpus rows: with
    ``xh = x / |x|`` (the norm accumulated in float64, the quotient rounded once to float32),
    ``y = xh @ W0 + b0``, plus ``relu(xh @ W1 + b1) @ W2`` when ``W1`` is given, and
    ``out = y / |y|`` (float64 norm, one rounding). ``x`` (m, d_old) float16 or float32 with
    C-contiguous rows (a memmap chunk included); ``W0`` (d_old, d_new), ``b0`` (d_new,), ``W1``
    (d_old, h), ``b1`` (h,), ``W2`` (h, d_new) float32 (``W1``/``b1``/``W2`` all None for the
    linear map); ``out`` (m, d_new) float32 C-contiguous, every element written. A row of ``x``
    whose norm is zero or not finite, or whose ``y`` has such a norm, gives a NaN row (the
    top-k kernel that reads ``out`` flags it); nothing is raised. The products are float32:
    here NumPy's matmul (BLAS order); the compiled backend computes each element of ``y`` and of
    the hidden layer as one float32 FMA chain (the bias, then k = 0 .. K-1 in order), the same
    bits on every instruction-set level and thread count. Either is within
    ``(d_old + h + 16) * 2**-24 * (|b0| + |xh| @ |W0| + (|b1| + |xh| @ |W1|) @ |W2|)`` of the
    exact ``y`` per element (for unit ``xh`` and ``|y|`` of order 1: about 1e-5 after the
    normalisation; tests/ops/test_correct_rows.py checks that bound against float64).
    Compute-bound: ``2 m (d_old d_new + h (d_old + d_new))`` flops.

``metrics(retrieved, ans_ptr, ans_index, ans_rel, k) -> (n, 3) float64``
    Per query recall@k, ndcg@k (graded), mrr@k over the first ``k`` columns of ``retrieved``
    (answers sorted unique, ``ans_rel`` aligned). Queries without answers get NaN.
"""
from __future__ import annotations

import numpy as np

NAME = "numpy"


def query_gradient(queries, order, seg_ptr, *, n_threads=None):
    t = len(seg_ptr) - 1
    d = queries.shape[1]
    if t == 0:
        return np.zeros((0, d), dtype=np.float64)
    gathered = np.asarray(queries, dtype=np.float64)[order]
    # Segments are never empty (a touched record has at least one query), so reduceat is exact.
    return np.add.reduceat(gathered, seg_ptr[:-1], axis=0)


def _chunk_scores(queries, chunk, normalize):
    x = np.asarray(chunk, dtype=queries.dtype)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    bad = ~np.isfinite(norms)
    if normalize:
        bad |= norms == 0
    scores = queries @ x.T
    if normalize:
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = scores / norms.astype(scores.dtype)[None, :]
    return scores, bad


def topk_update(queries, chunk, row_offset, exclude, normalize, best_scores, best_index, *, n_threads=None):
    m = chunk.shape[0]
    if m == 0:
        return -1
    scores, bad = _chunk_scores(queries, chunk, normalize)
    first_bad = int(np.flatnonzero(bad)[0]) + row_offset if bad.any() else -1
    _merge_chunk(scores, bad, row_offset, exclude, best_scores, best_index)
    return first_bad


def _merge_chunk(scores, bad, row_offset, exclude, best_scores, best_index):
    """Merge a chunk's (n_q, m) ``scores`` (rows ``bad`` or in ``exclude`` are no candidates)
    into the running top-k, keeping (score desc, index asc)."""
    m = scores.shape[1]
    k = best_scores.shape[1]
    drop = bad.copy()
    if exclude is not None:  # None: nothing excluded (drop[None] would index every row)
        drop[exclude] = True
    scores = scores.astype(best_scores.dtype, copy=False)
    scores[:, drop] = -np.inf
    kk = min(k, m)
    # Every row keeps its candidates >= its kk-th largest chunk score: that set holds the
    # chunk's top-kk including every tie at the boundary, so the index tie rule can be applied.
    kth = np.partition(scores, m - kk, axis=1)[:, m - kk]
    rows, cols = np.nonzero(scores >= kth[:, None])
    vals = scores[rows, cols]
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    starts = np.searchsorted(rows, np.arange(scores.shape[0]))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < kk
    cand_s = np.full((scores.shape[0], kk), -np.inf, dtype=best_scores.dtype)
    cand_i = np.full((scores.shape[0], kk), -1, dtype=np.int64)
    cand_s[rows[keep], rank[keep]] = vals[keep]
    cand_i[rows[keep], rank[keep]] = cols[keep] + row_offset
    # State indices are all < row_offset <= chunk indices, and both halves are already in
    # (score desc, index asc) order, so a stable sort on the score alone keeps the tie rule.
    all_s = np.concatenate([best_scores, cand_s], axis=1)
    all_i = np.concatenate([best_index, cand_i], axis=1)
    top = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
    best_scores[...] = np.take_along_axis(all_s, top, axis=1)
    best_index[...] = np.take_along_axis(all_i, top, axis=1)
    best_index[np.isneginf(best_scores)] = -1


def _dequantized_norms(codes, signed, low, step):
    """|low + step * u| per row (u = code + 128 when ``signed``), accumulated in float64."""
    u = codes.astype(np.float64)
    if signed:
        u += 128
    x = low.astype(np.float64) + step.astype(np.float64) * u
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
               best_scores, best_index, *, n_threads=None):
    m = codes.shape[0]
    if m == 0:
        return -1
    # Row blocks keep the int64 / float64 temporaries small (the chunk is sized for 1-byte codes).
    block = max(1, (8 << 20) // (8 * max(1, codes.shape[1])))
    qc64 = qcodes.astype(np.int64)
    acc = np.empty((qcodes.shape[0], m), np.int64)
    for s in range(0, m, block):
        u = codes[s:s + block].astype(np.int64)
        if signed:
            u += 128
        acc[:, s:s + block] = qc64 @ u.T  # exact: the kernels' int32 sums cannot overflow
    dt = best_scores.dtype
    scores = acc.astype(dt) * qscale.astype(dt)[:, None] + qoffset.astype(dt)[:, None]
    bad = np.zeros(m, dtype=bool)
    if normalize:
        norms = np.concatenate([_dequantized_norms(codes[s:s + block], signed, low, step)
                                for s in range(0, m, block)])
        bad = norms == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = scores / norms.astype(dt)[None, :]
    first_bad = int(np.flatnonzero(bad)[0]) + row_offset if bad.any() else -1
    _merge_chunk(scores, bad, row_offset, exclude, best_scores, best_index)
    return first_bad


def dequantize_rows(codes, signed, low, step, out, *, n_threads=None):
    step_rows = max(1, (8 << 20) // max(1, 4 * codes.shape[1]))
    for s in range(0, codes.shape[0], step_rows):
        x = out[s:s + step_rows]
        x[...] = codes[s:s + step_rows]
        if signed:
            x += np.float32(128)
        x *= step
        x += low


_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)


def qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, best_scores, best_index, *,
                  n_threads=None):
    m = codes.shape[0]
    if m == 0:
        return -1
    q = np.asarray(qbits).view(np.uint8)
    c = np.asarray(codes).view(np.uint8)
    # (n_q, m) distances, one byte column at a time: no (n_q, m, w) temporary.
    dist = np.zeros((q.shape[0], m), dtype=np.int64)
    for j in range(q.shape[1]):
        dist += _POPCOUNT[q[:, j, None] ^ c[None, :, j]]
    scores = (n_bits - 2 * dist).astype(best_scores.dtype)
    _merge_chunk(scores, np.zeros(m, dtype=bool), row_offset, exclude, best_scores, best_index)
    return -1


def nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, eps, *, n_threads=None):
    large = np.inf if eps == 0 else 1.0 / eps
    Sp = S[pair_query]  # (P, t)
    Gp = G[pair_query]
    D = g_x[:, None] - Gp
    s_dif = Sp - s_x[:, None]
    # The untouched competitor: g = 0.
    D = np.concatenate([D, g_x[:, None]], axis=1)
    s_dif = np.concatenate([s_dif, (u_score - s_x)[:, None]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = s_dif / (D + eps)
    low = np.max(np.where(D > 0, alpha, 0.0), axis=1, initial=0.0)
    low = np.maximum(low, 0.0)
    high = np.min(np.where(D < 0, alpha, large), axis=1, initial=large)
    # A competitor with the same gradient score must not already beat x (u_score=-inf never does).
    tie_block = np.any((D == 0) & (s_dif > 0), axis=1)
    feasible = ~tie_block & (high >= low)
    return low, high, feasible


def nudge_n_sweep(S, H, alpha, beta, touched, unt_scores, unt_index, ans_ptr, ans_index, k_val, *, n_threads=None,
                  kth=None):
    n_b = S.shape[0]
    n_gamma = alpha.shape[0]
    hits = np.zeros((n_b, n_gamma), dtype=np.int64)
    if kth is not None:
        kth[...] = -np.inf
    span = max(int(touched.max(initial=0)), int(unt_index.max(initial=0)),
               int(ans_index.max(initial=0))) + 2
    rows = np.arange(n_b, dtype=np.int64)[:, None]
    answer_keys = np.repeat(np.arange(n_b, dtype=np.int64), np.diff(ans_ptr)) * span + ans_index
    for g in range(n_gamma):
        scores = alpha[g][None, :] * S + beta[g][None, :] * H  # (n_b, t)
        all_s = np.concatenate([scores, unt_scores.astype(np.float64)], axis=1)
        all_i = np.concatenate([np.broadcast_to(touched, scores.shape), unt_index], axis=1)
        order = np.lexsort((all_i, -all_s), axis=1)[:, :k_val]
        top_i = np.take_along_axis(all_i, order, axis=1)
        top_s = np.take_along_axis(all_s, order, axis=1)
        # Membership of (query, record) in the answer lists through one sorted key array.
        hit = np.isin(rows * span + top_i, answer_keys) & np.isfinite(top_s)
        hits[:, g] = hit.sum(axis=1)
        if kth is not None and 0 < k_val <= top_s.shape[1]:
            kth[:, g] = top_s[:, k_val - 1]
    return hits


def dot64(A, B, *, n_threads=None):
    # einsum's own loop (no BLAS: optimize is off): one sum per element over its two rows.
    return np.einsum("ik,jk->ij", np.asarray(A, np.float64), np.asarray(B, np.float64))


def project(E, C, alpha, beta, *, n_threads=None):
    out = alpha[:, None] * np.asarray(E, dtype=np.float64) + beta[:, None] * np.asarray(C, dtype=np.float64)
    return out.astype(np.float32)


def normalize_rows(chunk, out, *, n_threads=None):
    # Blocks of rows keep the float64 temporaries small (the chunk itself may be large).
    step = max(1, (8 << 20) // max(1, 8 * chunk.shape[1]))
    for s in range(0, chunk.shape[0], step):
        x = np.asarray(chunk[s:s + step], dtype=np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            return s + int(np.argmax(bad))
        np.divide(x, norms[:, None], out=x)
        out[s:s + step] = x
    return -1


def _unit_rows(rows):
    """(float32 unit rows, bad) with the norms in float64; bad rows are zero."""
    x = np.asarray(rows, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~np.isfinite(norms) | (norms == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        unit = (x / norms[:, None]).astype(np.float32)
    unit[bad] = 0
    return unit, bad


def correct_rows(x, W0, b0, W1, b1, W2, out, *, n_threads=None):
    # Blocks of rows keep the temporaries (float64 rows, the hidden layer) near 8 MiB each.
    width = max(x.shape[1], W0.shape[1], 0 if W1 is None else W1.shape[1], 1)
    step = max(1, (8 << 20) // (8 * width))
    for s in range(0, x.shape[0], step):
        xh, bad = _unit_rows(x[s:s + step])
        y = xh @ W0
        y += b0
        if W1 is not None:
            hid = xh @ W1
            hid += b1
            np.maximum(hid, 0, out=hid)
            y += hid @ W2
        unit, bad_y = _unit_rows(y)
        unit[bad | bad_y] = np.nan
        out[s:s + step] = unit


def metrics(retrieved, ans_ptr, ans_index, ans_rel, k, *, n_threads=None):
    n = retrieved.shape[0]
    out = np.full((n, 3), np.nan)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    for i in range(n):
        answers = ans_index[ans_ptr[i]:ans_ptr[i + 1]]
        if len(answers) == 0:
            continue
        rel = ans_rel[ans_ptr[i]:ans_ptr[i + 1]]
        top = retrieved[i, :k]
        pos = np.searchsorted(answers, top)
        pos = np.minimum(pos, len(answers) - 1)
        hit = (top >= 0) & (answers[pos] == top)
        gains = np.where(hit, rel[pos], 0.0)
        ideal = np.sort(rel)[::-1][:k]
        idcg = float(np.sum(ideal * discount[: len(ideal)]))
        out[i, 0] = np.count_nonzero(hit) / min(len(answers), k)
        out[i, 1] = float(np.sum(gains * discount[: len(top)])) / idcg if idcg > 0 else 0.0
        first = np.flatnonzero(hit)
        out[i, 2] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out
