"""The Numba backend against the NumPy float64 reference, op by op, on random data of awkward
sizes (N = 1237, d = 37 / 385, k beyond the candidates, exact duplicate rows, a NaN row and a
zero row, float16/float32/float64 and read-only memmap chunks, chunks merged in sequence).

Tolerances, stated once: ``topk_update`` scores are float32 sums of float32 products, compared
to ``TOPK_RTOL[chunk dtype] * |q| * |x|`` (float16 rows are exact in float32, float64 rows are
rounded to float32 first: the same bound serves all three). Top-k comparisons allow ties between
different records that the two sides round differently; within this backend the tie rule
(score desc, index asc) must hold exactly, which exact duplicate records check, and results must
be bit-identical whatever the thread count or the chunking. The small ops compute in float64 in
the reference's operation order and are compared exactly (``metrics`` to ``METRICS_RTOL`` and
``query_gradient`` to ``GRADIENT_RTOL``: NumPy sums pairwise, this backend in row order). Exact comparisons of freshly returned arrays also prove every element was
written.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("numba")

from nudgefast._backends import numba_backend as nb  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import _assert_unchanged, _copies, _corpus

TOPK_RTOL = {np.float16: 2e-5, np.float32: 2e-5, np.float64: 2e-5}
METRICS_RTOL = 1e-12
GRADIENT_RTOL = 1e-13
CHUNK_DTYPES = [np.float16, np.float32, np.float64]
_dtype_id = lambda t: np.dtype(t).name  # noqa: E731


# ---------------------------------------------------------------------------------------------
# topk_update


def _queries(n_q, d, seed):
    q = np.random.default_rng(seed + 1).standard_normal((n_q, d))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _state(n_q, k, dtype=np.float32):
    return np.full((n_q, k), -np.inf, dtype=dtype), np.full((n_q, k), -1, dtype=np.int64)


def _reference(q64, x, row_offset, exclude, normalize, k, state=None):
    rs, ri = _state(q64.shape[0], k, np.float64) if state is None else state
    with np.errstate(all="ignore"):
        bad = ref.topk_update(q64, np.asarray(x, np.float64), row_offset,
                              np.zeros(0, np.int64) if exclude is None else exclude,
                              normalize, rs, ri)
    return rs, ri, bad


def _check_topk(q64, x, row_offset, exclude, normalize, scores, index, ref_scores, dtype):
    """``scores``/``index`` are a valid top-k of ``x``: the reference's scores to tolerance,
    indices whose true scores match, the tie rule exactly, no excluded or bad row."""
    k = scores.shape[1]
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        norms = np.linalg.norm(x64, axis=1)
        allowed = np.isfinite(norms) & ((norms > 0) if normalize else True)
        true = q64 @ np.where(allowed[:, None], x64, 0.0).T
        if normalize:
            true = true / np.where(allowed, norms, 1.0)[None, :]
    if exclude is not None:
        allowed[exclude] = False
    n_cand = int(allowed.sum())
    scale = 1.0 if normalize else float(norms[allowed].max())
    atol = TOPK_RTOL[dtype] * scale * float(np.linalg.norm(q64, axis=1).max())
    for i in range(q64.shape[0]):
        n_valid = min(k, n_cand)
        assert np.all(index[i, :n_valid] >= 0) and np.all(index[i, n_valid:] == -1)
        assert np.all(np.isneginf(scores[i, n_valid:]))
        idx = index[i, :n_valid] - row_offset
        s = scores[i, :n_valid]
        assert len(np.unique(idx)) == n_valid and np.all(allowed[idx])
        np.testing.assert_allclose(s, true[i, idx], atol=atol, rtol=0)
        np.testing.assert_allclose(scores[i], ref_scores[i], atol=atol, rtol=0)
        # The tie rule, exactly: score descending, then index ascending.
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (idx[:-1] < idx[1:])))
        if n_valid == k and n_cand > k:  # nothing left out beats the k-th kept (to rounding)
            outside = np.setdiff1d(np.flatnonzero(allowed), idx)
            assert true[i, outside].max() <= s[-1] + atol


def _twin_queries(x, q64, n):
    """Point the first ``n`` queries at duplicated finite rows, so exact ties reach the top."""
    x64 = np.asarray(x, np.float64)
    rows, counts = np.unique(x64, axis=0, return_counts=True)
    twins = rows[(counts > 1) & np.isfinite(rows).all(axis=1) & (np.abs(rows).sum(axis=1) > 0)][:n]
    q64 = q64.copy()
    q64[: len(twins)] = twins / np.linalg.norm(twins, axis=1, keepdims=True)
    return q64, twins


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d", [37, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_topk_update_matches_reference(dtype, d, normalize):
    n, n_q, k, row_offset = 1237, 9, 10, 5000
    x = _corpus(n, d, dtype, seed=d)
    q64, _ = _twin_queries(x, _queries(n_q, d, seed=d), 3)
    q = q64.astype(np.float32)
    exclude = np.sort(np.random.default_rng(3).choice(n, 40, replace=False)).astype(np.int64)
    before = _copies(q, x, exclude)
    scores, index = _state(n_q, k)
    bad = nb.topk_update(q, x, row_offset, exclude, normalize, scores, index)
    rs, _, ref_bad = _reference(q64, x, row_offset, exclude, normalize, k)
    _assert_unchanged(before, [q, x, exclude])
    assert bad == ref_bad == row_offset + n // 3  # NaN row first; the zero row is later
    _check_topk(q64, x, row_offset, exclude, normalize, scores, index, rs, dtype)


def test_topk_exact_duplicates_follow_the_index_rule():
    # Copies of one row at awkward places: both rows of a 2-row tile, a 256-row sub-block
    # boundary, the last row. Every copy must score bit-identically and rank by index.
    n, d = 1237, 385
    x = _corpus(n, d, np.float32, seed=4, bad_rows=False)
    copies = np.array([3, 254, 255, 256, 257, 700, 1235, 1236])
    x[copies] = x[3]
    q = np.vstack([x[3] / np.linalg.norm(x[3]), _queries(3, d, seed=4)]).astype(np.float32)
    for threads in (1, 2):
        s, i = _state(4, 12)
        nb.topk_update(q, x, 0, np.array([255]), True, s, i, n_threads=threads)
        kept = copies[copies != 255]
        np.testing.assert_array_equal(i[0, : len(kept)], kept)
        assert np.all(s[0, : len(kept)] == s[0, 0]) and s[0, len(kept)] < s[0, 0]


@pytest.mark.parametrize("k", [1, 3, 50, 1300], ids=lambda k: f"k{k}")
def test_topk_k_larger_than_candidates(k):
    # 45 rows, 20 excluded, one NaN row and one zero row: k exceeds the rows, the candidates,
    # or neither.
    n, d, n_q = 45, 37, 5
    x = _corpus(n, d, np.float32, seed=k, n_dup=4)
    q64 = _queries(n_q, d, seed=k)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    s, i = _state(n_q, k)
    bad = nb.topk_update(q64.astype(np.float32), x, 0, exclude, True, s, i)
    rs, _, ref_bad = _reference(q64, x, 0, exclude, True, k)
    assert bad == ref_bad
    _check_topk(q64, x, 0, exclude, True, s, i, rs, np.float32)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
def test_topk_chunks_merged_in_sequence(dtype):
    """Chunk by chunk (row_offset, local exclude lists) equals the reference's stream and,
    bit for bit, this backend's one-pass result: a row's score does not depend on where the
    chunk or sub-block boundaries fall."""
    n, d, n_q, k = 1237, 37, 9, 25
    x = _corpus(n, d, dtype, seed=11)
    q64, _ = _twin_queries(x, _queries(n_q, d, seed=11), 2)
    q = q64.astype(np.float32)
    exclude = np.sort(np.random.default_rng(5).choice(n, 60, replace=False)).astype(np.int64)
    one_s, one_i = _state(n_q, k)
    one_bad = nb.topk_update(q, x, 0, exclude, True, one_s, one_i)
    s, i = _state(n_q, k)
    rs, ri = _state(n_q, k, np.float64)
    bads = []
    for start, stop in [(0, 300), (300, 301), (301, 700), (700, 1237)]:
        local = exclude[(exclude >= start) & (exclude < stop)] - start
        bads.append(nb.topk_update(q, x[start:stop], start, local, True, s, i))
        _reference(q64, x[start:stop], start, local, True, k, state=(rs, ri))
    np.testing.assert_array_equal(s, one_s)
    np.testing.assert_array_equal(i, one_i)
    assert one_bad == min(b for b in bads if b >= 0) == n // 3
    _check_topk(q64, x, 0, exclude, True, s, i, rs, dtype)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
def test_topk_thread_count_does_not_change_result(dtype, monkeypatch):
    n, d, n_q, k = 3001, 385, 11, 17
    x = _corpus(n, d, dtype, seed=5, n_dup=60)
    q = _queries(n_q, d, seed=5).astype(np.float32)
    exclude = np.arange(7, n, 13, dtype=np.int64)
    runs = []
    for threads in (1, 2, None, 1):
        s, i = _state(n_q, k)
        bad = nb.topk_update(q, x, 77, exclude, True, s, i, n_threads=threads)
        runs.append((s, i, bad))
    # A tiny state budget makes the workers split the queries instead of the rows.
    monkeypatch.setattr(nb, "_STATE_BUDGET", 1)
    s, i = _state(n_q, k)
    runs.append((s, i, nb.topk_update(q, x, 77, exclude, True, s, i, n_threads=2)))
    for s, i, bad in runs[1:]:
        np.testing.assert_array_equal(s, runs[0][0])
        np.testing.assert_array_equal(i, runs[0][1])
        assert bad == runs[0][2] == 77 + n // 3


def test_topk_readonly_memmap_and_strided_chunks(tmp_path):
    n, d, n_q, k = 1237, 37, 5, 12
    x = _corpus(n, d, np.float16, seed=2)
    path = tmp_path / "corpus.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    q = _queries(n_q, d, seed=2).astype(np.float32)
    want_s, want_i = _state(n_q, k)
    want_bad = nb.topk_update(q, x[100:1100], 100, None, True, want_s, want_i)
    assert want_bad == n // 3  # global index: the chunk starts at row 100 = row_offset
    variants = {
        "memmap": mm[100:1100],
        "strided rows": np.hstack([x, np.zeros((n, 11), np.float16)])[100:1100, :d],
        "fortran": np.asfortranarray(x[100:1100]),
    }
    for name, chunk in variants.items():
        s, i = _state(n_q, k)
        assert nb.topk_update(q, chunk, 100, None, True, s, i) == want_bad, name
        np.testing.assert_array_equal(s, want_s, err_msg=name)
        np.testing.assert_array_equal(i, want_i, err_msg=name)
    rs, _, _ = _reference(q.astype(np.float64), x[100:1100], 100, None, True, k)
    _check_topk(q.astype(np.float64), x[100:1100], 100, None, True, want_s, want_i, rs, np.float16)


def test_topk_float16_every_bit_pattern():
    """float16 travels as bits through a lookup table: every pattern (subnormals, +-0, inf,
    NaN) must decode exactly. d = 1 and q = +-1 make the scores the decoded values."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 1)
    subnormal = x[np.r_[1:1024, 0x8001:0x8400]]
    q = np.array([[1.0], [-1.0]], np.float32)
    for chunk, k in [(x, 40), (subnormal, 40)]:
        s, i = _state(2, k)
        bad = nb.topk_update(q, chunk, 0, None, False, s, i)
        rs, ri, ref_bad = _reference(q.astype(np.float64), chunk, 0, None, False, k)
        assert bad == ref_bad
        np.testing.assert_array_equal(s, rs.astype(np.float32))
        np.testing.assert_array_equal(i, ri)
    assert bad == -1 and nb.topk_update(q, x, 0, None, False, *_state(2, 1)) == 0x7C00


def test_topk_merges_into_existing_state_with_tie_rule():
    """Held entries and new rows with equal scores: the lower index wins wherever it comes
    from; a row fed again is not held twice."""
    d, n_q, k = 16, 3, 4
    q = np.zeros((n_q, d), np.float32)
    q[:, 0] = 1.0
    x = np.zeros((6, d), np.float32)
    x[:, 0] = [0.5, 0.9, 0.5, 0.7, 0.9, 0.1]
    x[:, 1] = 1.0
    s, i = _state(n_q, k)
    nb.topk_update(q, x[:3], 0, None, False, s, i)
    nb.topk_update(q, x[3:], 3, None, False, s, i)
    np.testing.assert_array_equal(i, np.tile([1, 4, 3, 0], (n_q, 1)))
    np.testing.assert_array_equal(s, np.tile(np.float32([0.9, 0.9, 0.7, 0.5]), (n_q, 1)))
    for row in (2, 1, 0):  # ties the k-th with a higher index / already held / already held
        s2, i2 = s.copy(), i.copy()
        nb.topk_update(q, x[[row]], row, None, False, s2, i2, n_threads=1)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_array_equal(s2, s)
    s2, i2 = s.copy(), i.copy()
    nb.topk_update(q, x[[4]], 2, None, False, s2, i2)  # score 0.9 as global row 2
    np.testing.assert_array_equal(i2, np.tile([1, 2, 4, 3], (n_q, 1)))


def test_topk_empty_chunk_zero_k_and_float64_state():
    q = np.ones((2, 8), np.float32)
    s, i = _state(2, 3)
    assert nb.topk_update(q, np.ones((0, 8), np.float32), 0, None, True, s, i) == -1
    assert np.all(i == -1) and np.all(np.isneginf(s))
    s0, i0 = _state(2, 0)
    x = np.ones((5, 8), np.float32)
    x[3] = 0.0
    assert nb.topk_update(q, x, 10, None, True, s0, i0) == 13
    # float64 queries and state: scores are the float32 scores, stored exactly.
    x = _corpus(200, 37, np.float32, seed=9, bad_rows=False)
    q64 = _queries(3, 37, seed=9)
    s64, i64 = _state(3, 5, np.float64)
    nb.topk_update(q64, x, 0, None, True, s64, i64)
    s, i = _state(3, 5)
    nb.topk_update(q64.astype(np.float32), x, 0, None, True, s, i)
    np.testing.assert_array_equal(i64, i)
    np.testing.assert_array_equal(s64, s.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# query_gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=_dtype_id)
@pytest.mark.parametrize("t", [0, 1, 301])
def test_query_gradient(dtype, t):
    rng = np.random.default_rng(t)
    queries = rng.standard_normal((53, 385)).astype(dtype)
    counts = rng.integers(1, 7, size=t)
    order = rng.integers(0, 53, size=counts.sum()).astype(np.int64)
    seg_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    before = _copies(queries, order, seg_ptr)
    got = nb.query_gradient(queries, order, seg_ptr)
    want = ref.query_gradient(queries, order, seg_ptr)
    _assert_unchanged(before, [queries, order, seg_ptr])
    assert got.dtype == np.float64 and got.shape == want.shape == (t, 385)
    # Sums in row order; NumPy's reduceat adds the tail of a segment pairwise: ulp-level.
    np.testing.assert_allclose(got, want, rtol=GRADIENT_RTOL, atol=GRADIENT_RTOL)
    np.testing.assert_array_equal(got, nb.query_gradient(queries, order, seg_ptr, n_threads=1))


# ---------------------------------------------------------------------------------------------
# nudge_m_intervals


def _m_problem(seed, n_b=23, t=41, n_pairs=97):
    rng = np.random.default_rng(100 + seed)
    # Coarse grids make exact ties (D == 0, s_dif == 0, D + eps == 0) common.
    S = rng.integers(-8, 9, size=(n_b, t)) / 8.0
    G = rng.integers(-8, 9, size=(n_b, t)) / 8.0
    pair_query = rng.integers(0, n_b, size=n_pairs).astype(np.int64)
    pair_pos = rng.integers(-1, t, size=n_pairs).astype(np.int64)
    touched = pair_pos >= 0
    s_x = np.where(touched, S[pair_query, np.maximum(pair_pos, 0)], rng.integers(-8, 9, n_pairs) / 8.0)
    g_x = np.where(touched, G[pair_query, np.maximum(pair_pos, 0)], 0.0)
    u_score = rng.integers(-8, 9, size=n_pairs) / 8.0
    u_score[rng.random(n_pairs) < 0.2] = -np.inf
    return S, G, pair_query, pair_pos, s_x, g_x, u_score


@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.125, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nudge_m_intervals(eps, seed):
    args = _m_problem(seed)
    before = _copies(*args)
    with np.errstate(all="ignore"):
        want = ref.nudge_m_intervals(*args, eps)
    got = nb.nudge_m_intervals(*args, eps)
    _assert_unchanged(before, args)
    assert got[0].dtype == got[1].dtype == np.float64 and got[2].dtype == np.bool_
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # same IEEE operations: bit-identical, NaN included
    for g, g1 in zip(got, nb.nudge_m_intervals(*args, eps, n_threads=1)):
        np.testing.assert_array_equal(g, g1)


def test_nudge_m_intervals_edge_cases():
    e = np.empty(0)
    low, high, feasible = nb.nudge_m_intervals(np.zeros((3, 0)), np.zeros((3, 0)), np.empty(0, np.int64),
                                               np.empty(0, np.int64), e, e, e, 1e-8)
    assert low.shape == high.shape == feasible.shape == (0,)
    # No touched records: only the untouched competitor bounds gamma (or nothing: high = 1/eps,
    # inf when eps == 0).
    args = (np.zeros((2, 0)), np.zeros((2, 0)), np.array([0, 1]), np.array([-1, -1]),
            np.array([0.5, 0.5]), np.array([0.25, -0.25]), np.array([-np.inf, 0.75]))
    for eps in (0.0, 1e-6):
        with np.errstate(all="ignore"):
            want = ref.nudge_m_intervals(*args, eps)
        for g, w in zip(nb.nudge_m_intervals(*args, eps), want):
            np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------
# nudge_n_sweep


def _n_problem(seed, n_b=31, t=57, n_gamma=25, k_unt=12):
    rng = np.random.default_rng(200 + seed)
    # Coarse grids: touched and untouched scores tie often, so the index rule decides.
    S = rng.integers(-16, 17, size=(n_b, t)) / 16.0
    H = rng.integers(-16, 17, size=(n_b, t)) / 16.0
    alpha = rng.integers(0, 5, size=(n_gamma, t)) / 4.0
    beta = rng.integers(0, 5, size=(n_gamma, t)) / 4.0
    alpha[0], beta[0] = 1.0, 0.0  # gamma = 0: the base scores
    ids = rng.permutation(100_000)[: t + n_b * k_unt]
    touched = np.sort(ids[:t]).astype(np.int64)
    unt_index = ids[t:].reshape(n_b, k_unt).astype(np.int64)
    unt_scores = np.sort(rng.integers(-16, 17, size=(n_b, k_unt)) / 16.0, axis=1)[:, ::-1].astype(np.float32)
    for i in range(0, n_b, 4):  # some queries with empty untouched slots
        cut = rng.integers(0, k_unt)
        unt_scores[i, cut:] = -np.inf
        unt_index[i, cut:] = -1
    ans_ptr, ans = [0], []
    for i in range(n_b):
        pool = np.concatenate([touched, unt_index[i][unt_index[i] >= 0]])
        ans.append(np.unique(rng.choice(pool, size=rng.integers(0, 8))))  # some without answers
        ans_ptr.append(ans_ptr[-1] + len(ans[-1]))
    ans_index = np.concatenate(ans).astype(np.int64)
    return S, H, alpha, beta, touched, unt_scores, unt_index, np.array(ans_ptr, np.int64), ans_index


@pytest.mark.parametrize("k_val", [1, 5, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_nudge_n_sweep(k_val, seed):
    args = _n_problem(seed)
    before = _copies(*args)
    want = ref.nudge_n_sweep(*args, k_val)
    got = nb.nudge_n_sweep(*args, k_val)
    _assert_unchanged(before, args)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, nb.nudge_n_sweep(*args, k_val, n_threads=1))


def test_nudge_n_sweep_only_touched_candidates():
    S, H, alpha, beta, touched, _, _, ans_ptr, ans_index = _n_problem(3, k_unt=1)
    n_b = S.shape[0]
    unt_s = np.full((n_b, 3), -np.inf, np.float32)
    unt_i = np.full((n_b, 3), -1, np.int64)
    args = (S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index)
    np.testing.assert_array_equal(nb.nudge_n_sweep(*args, 7), ref.nudge_n_sweep(*args, 7))


# ---------------------------------------------------------------------------------------------
# project


@pytest.mark.parametrize("e_dtype", [np.float16, np.float32, np.float64], ids=lambda t: "E" + _dtype_id(t))
@pytest.mark.parametrize("c_dtype", [np.float32, np.float64], ids=lambda t: "C" + _dtype_id(t))
@pytest.mark.parametrize("t", [0, 1, 123])
def test_project(e_dtype, c_dtype, t):
    rng = np.random.default_rng(t)
    E = rng.standard_normal((t, 385)).astype(e_dtype)
    C = rng.standard_normal((t, 385)).astype(c_dtype)
    alpha, beta = rng.standard_normal(t), rng.standard_normal(t)
    before = _copies(E, C, alpha, beta)
    got = nb.project(E, C, alpha, beta)
    want = ref.project(E, C, alpha, beta)
    _assert_unchanged(before, [E, C, alpha, beta])
    assert got.dtype == np.float32 and got.shape == (t, 385)
    np.testing.assert_array_equal(got, want)  # float64 math in the same order, one rounding
    np.testing.assert_array_equal(got, nb.project(E, C, alpha, beta, n_threads=1))


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("k", [1, 5, 10, 14])
def test_metrics(k):
    rng = np.random.default_rng(300 + k)
    n, width = 57, 10
    retrieved = rng.integers(0, 40, size=(n, width)).astype(np.int64)
    retrieved[rng.random((n, width)) < 0.1] = -1
    ans_ptr, ans_index, ans_rel = [0], [], []
    for i in range(n):
        a = np.unique(rng.integers(0, 40, size=rng.integers(0, 12)))  # some empty
        ans_index.append(a)
        ans_rel.append(rng.integers(0, 4, size=len(a)).astype(np.float64))  # graded, zeros too
        ans_ptr.append(ans_ptr[-1] + len(a))
    args = (retrieved, np.array(ans_ptr, np.int64), np.concatenate(ans_index).astype(np.int64),
            np.concatenate(ans_rel))
    before = _copies(*args)
    with np.errstate(all="ignore"):
        want = ref.metrics(*args, k)
    got = nb.metrics(*args, k)
    _assert_unchanged(before, args)
    assert got.shape == (n, 3) and got.dtype == np.float64
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()
    np.testing.assert_allclose(got, want, rtol=METRICS_RTOL, atol=0, equal_nan=True)
    np.testing.assert_array_equal(got, nb.metrics(*args, k, n_threads=1))


# ---------------------------------------------------------------------------------------------
# the backend as a whole


def test_name_signatures_and_thread_count_restored():
    import numba

    assert nb.NAME == "numba"
    for op in ("query_gradient", "topk_update", "nudge_m_intervals", "nudge_n_sweep", "project", "metrics"):
        assert inspect.signature(getattr(nb, op)) == inspect.signature(getattr(ref, op)), op
    previous = numba.get_num_threads()
    nb.project(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), np.ones(2), n_threads=1)
    assert numba.get_num_threads() == previous
