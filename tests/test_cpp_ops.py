"""The compiled CPU backend (``nudgefast._cpu`` through ``cpp_backend``) against the NumPy float64
reference, op by op, on random data of awkward sizes.

Tolerances, stated once: top-k scores are float32 sums of float32 products (``TOPK_ATOL`` on
unit-scale scores); the small ops compute in float64 with the reference's operation order, so
they are compared exactly (``metrics`` to ``1e-12``: NumPy sums pairwise). Top-k comparisons
allow ties between *different* records whose float32 scores the two sides round differently,
but within this backend the tie rule (score desc, index asc) must hold exactly, which exact
duplicate records check.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nudgefast._cpu")

from nudgefast import _cpu  # noqa: E402
from nudgefast._backends import cpp_backend as cpp  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import _assert_unchanged, _copies, _corpus, _empty_state, _segments

TOPK_ATOL = 2e-5  # float32 accumulation over d <= 385 of unit-norm rows
METRICS_RTOL = 1e-12


def _rng(*key):
    return np.random.default_rng(abs(hash(key)) % (2**32))


# ---------------------------------------------------------------------------------------------
# topk_update


def _queries(n_q, d, seed):
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((n_q, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def _true_scores(q64, x64, normalize):
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = q64 @ np.nan_to_num(x64, nan=0.0).T
        if normalize:
            s = s / np.linalg.norm(x64, axis=1)[None, :]
    return s


def _check_topk(q64, x, row_offset, exclude, normalize, k, scores, index, first_bad, ref_scores, ref_first_bad):
    """Our state is a valid top-k: same scores as the reference (to TOPK_ATOL), indices whose
    true scores match, the tie rule exactly, no excluded or bad row."""
    assert first_bad == ref_first_bad
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x64, axis=1)
    bad = ~np.isfinite(norms) | ((norms == 0) if normalize else False)
    allowed = ~bad
    allowed[exclude] = False
    n_cand = int(allowed.sum())
    true = _true_scores(q64, x64, normalize)
    atol = TOPK_ATOL * (1.0 if normalize else max(1.0, float(norms[np.isfinite(norms)].max())))
    for i in range(q64.shape[0]):
        valid = index[i] >= 0
        assert valid.sum() == min(k, n_cand)
        assert np.all(valid[: valid.sum()]), "valid entries come first"
        assert np.all(np.isneginf(scores[i][~valid]))
        idx = index[i][valid] - row_offset
        assert len(np.unique(idx)) == len(idx)
        assert np.all(allowed[idx])
        np.testing.assert_allclose(scores[i][valid], true[i, idx], atol=atol, rtol=0)
        np.testing.assert_allclose(scores[i], ref_scores[i], atol=atol, rtol=0)
        s = scores[i][valid]
        # The tie rule, exactly: score descending, then index ascending.
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (idx[:-1] < idx[1:])))
        # Nothing left out beats the k-th kept score (up to rounding).
        if valid.sum() == k and n_cand > k:
            outside = np.setdiff1d(np.flatnonzero(allowed), idx)
            assert true[i, outside].max() <= s[-1] + atol


def _check_duplicate_rule(x, scores, index, row_offset, exclude):
    """With exact duplicate rows, a later duplicate is kept only if the earlier one is."""
    x = np.asarray(x)
    _, first, inverse = np.unique(x, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_twins = 0
    for i in range(index.shape[0]):
        kept = set((index[i][index[i] >= 0] - row_offset).tolist())
        for r in kept:
            twin = first[inverse[r]]
            if twin != r and twin not in exclude:
                n_twins += 1
                assert twin in kept, f"query {i}: row {r} kept but its earlier duplicate {twin} is not"
    return n_twins


CHUNK_DTYPES = [np.float16, np.float32, np.float64]


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", [37, 384, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_topk_update_matches_reference(dtype, d, normalize):
    n, n_q, k, row_offset = 1237, 7, 10, 5000
    x = _corpus(n, d, dtype, seed=d)
    q64 = _queries(n_q, d, seed=d)
    exclude = np.sort(np.random.default_rng(3).choice(n, 40, replace=False)).astype(np.int64)
    # Point three queries at duplicated rows, so exact ties reach the top-k.
    rows, counts = np.unique(np.asarray(x, np.float64), axis=0, return_counts=True)
    twins = rows[(counts > 1) & np.isfinite(rows).all(axis=1)][:3]
    q64[:3] = twins / np.linalg.norm(twins, axis=1, keepdims=True)
    q = q64.astype(np.float32)
    before = _copies(q, x, exclude)

    scores, index = _empty_state(n_q, k)
    first_bad = cpp.topk_update(q, x, row_offset, exclude, normalize, scores, index)
    rs, ri = np.full((n_q, k), -np.inf), np.full((n_q, k), -1, dtype=np.int64)
    ref_bad = ref.topk_update(q64, np.asarray(x, np.float64), row_offset, exclude, normalize, rs, ri)

    _assert_unchanged(before, [q, x, exclude])
    _check_topk(q64, x, row_offset, exclude, normalize, k, scores, index, first_bad, rs, ref_bad)
    # Cosine: each twin query ranks its duplicate pair first; dot: longer rows may outrank them.
    assert _check_duplicate_rule(x, scores, index, row_offset, exclude) >= (3 if normalize else 1)


@pytest.mark.parametrize("k", [1, 3, 50, 1300], ids=lambda k: f"k{k}")
def test_topk_k_larger_than_candidates(k):
    # A chunk of 45 rows, 20 excluded, one NaN and one zero row: k can exceed the rows, the
    # candidates, or neither.
    n, d, n_q = 45, 37, 5
    x = _corpus(n, d, np.float32, seed=k, n_dup=4)
    q64 = _queries(n_q, d, seed=k)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    scores, index = _empty_state(n_q, k)
    first_bad = cpp.topk_update(q64.astype(np.float32), x, 0, exclude, True, scores, index)
    rs, ri = np.full((n_q, k), -np.inf), np.full((n_q, k), -1, dtype=np.int64)
    ref_bad = ref.topk_update(q64, x.astype(np.float64), 0, exclude, True, rs, ri)
    _check_topk(q64, x, 0, exclude, True, k, scores, index, first_bad, rs, ref_bad)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=lambda t: np.dtype(t).name)
def test_topk_streamed_chunks_equal_one_pass(dtype):
    """Chunk by chunk (row_offset) gives bit-identically the one-pass result: per-row scores do
    not depend on the chunking and the merge applies the tie rule."""
    n, d, n_q, k = 1237, 37, 9, 25
    x = _corpus(n, d, dtype, seed=11)
    q = _queries(n_q, d, seed=11).astype(np.float32)
    one_s, one_i = _empty_state(n_q, k)
    one_bad = cpp.topk_update(q, x, 0, np.empty(0, np.int64), True, one_s, one_i)
    s, i = _empty_state(n_q, k)
    bads = []
    for start in range(0, n, 400):
        bads.append(cpp.topk_update(q, x[start:start + 400], start, None, True, s, i))
    np.testing.assert_array_equal(s, one_s)
    np.testing.assert_array_equal(i, one_i)
    assert one_bad == min(b for b in bads if b >= 0)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=lambda t: np.dtype(t).name)
def test_topk_thread_count_does_not_change_result(dtype):
    n, d, n_q, k = 3001, 385, 6, 17
    x = _corpus(n, d, dtype, seed=5, n_dup=60)
    q = _queries(n_q, d, seed=5).astype(np.float32)
    exclude = np.arange(7, n, 13, dtype=np.int64)
    out = []
    for threads in (1, 2, 3, None):
        s, i = _empty_state(n_q, k)
        bad = cpp.topk_update(q, x, 77, exclude, True, s, i, n_threads=threads)
        out.append((s, i, bad))
    for s, i, bad in out[1:]:
        np.testing.assert_array_equal(s, out[0][0])
        np.testing.assert_array_equal(i, out[0][1])
        assert bad == out[0][2]
    # And a repeat run is identical.
    s, i = _empty_state(n_q, k)
    cpp.topk_update(q, x, 77, exclude, True, s, i, n_threads=2)
    np.testing.assert_array_equal(i, out[0][1])


def test_topk_merges_into_existing_state_with_tie_rule():
    """State entries and new rows with equal scores: the lower index wins wherever it comes from."""
    d, n_q, k = 16, 3, 4
    q = np.zeros((n_q, d), np.float32)
    q[:, 0] = 1.0
    x = np.zeros((6, d), np.float32)
    x[:, 0] = [0.5, 0.9, 0.5, 0.7, 0.9, 0.1]
    x[:, 1] = 1.0  # finite, nonzero
    s, i = _empty_state(n_q, k)
    cpp.topk_update(q, x[:3], 0, None, False, s, i)
    cpp.topk_update(q, x[3:], 3, None, False, s, i)
    np.testing.assert_array_equal(i, np.tile([1, 4, 3, 0], (n_q, 1)))
    np.testing.assert_array_equal(s, np.tile(np.float32([0.9, 0.9, 0.7, 0.5]), (n_q, 1)))
    # A row tying the k-th entry but with a higher index does not enter; one already held is not
    # duplicated (nor does it push another entry out); an earlier index tying a held score wins.
    for row in (2, 1, 0):
        s2, i2 = s.copy(), i.copy()
        cpp.topk_update(q, x[[row]], row, None, False, s2, i2, n_threads=1)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_array_equal(s2, s)
    s2, i2 = s.copy(), i.copy()
    cpp.topk_update(q, x[[4]], 2, None, False, s2, i2)  # score 0.9 as global row 2
    np.testing.assert_array_equal(i2, np.tile([1, 2, 4, 3], (n_q, 1)))


def test_topk_readonly_memmap_and_strided_chunks(tmp_path):
    n, d, n_q, k = 1237, 37, 5, 12
    x = _corpus(n, d, np.float16, seed=2)
    path = tmp_path / "corpus.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    assert not mm.flags.writeable
    q = _queries(n_q, d, seed=2).astype(np.float32)
    expect_s, expect_i = _empty_state(n_q, k)
    cpp.topk_update(q, x[100:1100], 100, None, True, expect_s, expect_i)

    s, i = _empty_state(n_q, k)
    cpp.topk_update(q, mm[100:1100], 100, None, True, s, i)  # read-only memmap slice, no copy
    np.testing.assert_array_equal(s, expect_s)
    np.testing.assert_array_equal(i, expect_i)

    wide = np.zeros((n, d + 11), np.float16)
    wide[:, :d] = x
    s, i = _empty_state(n_q, k)
    cpp.topk_update(q, wide[100:1100, :d], 100, None, True, s, i)  # rows contiguous, strided
    np.testing.assert_array_equal(i, expect_i)

    s, i = _empty_state(n_q, k)
    cpp.topk_update(q, np.asfortranarray(x[100:1100]), 100, None, True, s, i)  # converted once
    np.testing.assert_array_equal(i, expect_i)


def test_topk_chunk_is_not_copied():
    """The kernel reads float16/32/64 chunks in place: the binding refuses what it would have to copy."""
    q = np.ones((2, 8), np.float32)
    s, i = _empty_state(2, 3)
    ex = np.empty(0, np.int64)
    with pytest.raises(TypeError):
        _cpu.topk_update(q, np.ones((4, 8), np.int32), 0, ex, True, s, i)
    with pytest.raises(TypeError):
        _cpu.topk_update(q.astype(np.float64), np.ones((4, 8), np.float32), 0, ex, True, s, i)
    with pytest.raises(TypeError):
        _cpu.topk_update(q, np.ones((8, 4), np.float32).T, 0, ex, True, s, i)
    with pytest.raises(ValueError):
        _cpu.topk_update(q, np.ones((4, 9), np.float32), 0, ex, True, s, i)


def test_topk_empty_chunk_and_zero_k():
    q = np.ones((2, 8), np.float32)
    s, i = _empty_state(2, 3)
    assert cpp.topk_update(q, np.ones((0, 8), np.float32), 0, None, True, s, i) == -1
    assert np.all(i == -1)
    s0, i0 = _empty_state(2, 0)
    assert cpp.topk_update(q, np.ones((5, 8), np.float32), 0, None, True, s0, i0) == -1
    x = np.ones((5, 8), np.float32)
    x[3] = 0.0
    s_none, i_none = _empty_state(0, 4)
    assert cpp.topk_update(q[:0], x, 10, None, True, s_none, i_none) == 13  # no queries: still reports bad rows


def test_topk_float64_state_is_updated_through_a_copy():
    n, d, n_q, k = 200, 37, 3, 5
    x = _corpus(n, d, np.float32, seed=9, bad_rows=False)
    q = _queries(n_q, d, seed=9)
    s64, i64 = np.full((n_q, k), -np.inf), np.full((n_q, k), -1, dtype=np.int64)
    cpp.topk_update(q, x, 0, None, True, s64, i64)
    s, i = _empty_state(n_q, k)
    cpp.topk_update(q.astype(np.float32), x, 0, None, True, s, i)
    np.testing.assert_array_equal(i64, i)
    np.testing.assert_array_equal(s64, s.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# query_gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("t", [0, 1, 301])
def test_query_gradient(dtype, t):
    rng = _rng("qg", t)
    queries = rng.standard_normal((53, 385)).astype(dtype)
    order, seg_ptr = _segments(53, t, rng)
    before = _copies(queries, order, seg_ptr)
    got = cpp.query_gradient(queries, order, seg_ptr)
    want = ref.query_gradient(queries, order, seg_ptr)
    _assert_unchanged(before, [queries, order, seg_ptr])
    assert got.dtype == np.float64 and got.shape == want.shape == (t, 385)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(got, cpp.query_gradient(queries, order, seg_ptr, n_threads=1))


# ---------------------------------------------------------------------------------------------
# nudge_m_intervals


def _m_problem(seed, n_b=23, t=41, n_pairs=97):
    rng = _rng("m", seed)
    # Coarse grids make exact ties (D == 0, s_dif == 0) common.
    S = rng.integers(-8, 9, size=(n_b, t)) / 8.0
    G = rng.integers(-8, 9, size=(n_b, t)) / 8.0
    pair_query = rng.integers(0, n_b, size=n_pairs).astype(np.int64)
    pair_pos = rng.integers(-1, t, size=n_pairs).astype(np.int64)
    s_x = np.where(pair_pos >= 0, S[pair_query, np.maximum(pair_pos, 0)], rng.integers(-8, 9, n_pairs) / 8.0)
    g_x = np.where(pair_pos >= 0, G[pair_query, np.maximum(pair_pos, 0)], 0.0)
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
    got = cpp.nudge_m_intervals(*args, eps)
    _assert_unchanged(before, args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # same IEEE operations: bit-identical, NaN included
    assert got[2].dtype == np.bool_
    got1 = cpp.nudge_m_intervals(*args, eps, n_threads=1)
    for g, g1 in zip(got, got1):
        np.testing.assert_array_equal(g, g1)


def test_nudge_m_intervals_empty():
    S = np.zeros((3, 0))
    e = np.empty(0)
    low, high, feasible = cpp.nudge_m_intervals(S, S, np.empty(0, np.int64), np.empty(0, np.int64), e, e, e, 1e-8)
    assert low.shape == high.shape == feasible.shape == (0,)


# ---------------------------------------------------------------------------------------------
# nudge_n_sweep


def _n_problem(seed, n_b=31, t=57, n_gamma=25, k_unt=12):
    rng = _rng("n", seed)
    S = rng.integers(-16, 17, size=(n_b, t)) / 16.0
    H = rng.integers(-16, 17, size=(n_b, t)) / 16.0
    alpha = rng.integers(0, 5, size=(n_gamma, t)) / 4.0
    beta = rng.integers(0, 5, size=(n_gamma, t)) / 4.0
    alpha[0], beta[0] = 1.0, 0.0  # gamma = 0: the base scores
    ids = rng.permutation(100_000)[: t + n_b * k_unt]
    touched = np.sort(ids[:t]).astype(np.int64)
    unt_index = ids[t:].reshape(n_b, k_unt).astype(np.int64)
    unt_scores = np.sort(rng.integers(-16, 17, size=(n_b, k_unt)) / 16.0, axis=1)[:, ::-1].astype(np.float32)
    # Pad some queries with empty untouched slots.
    for i in range(0, n_b, 4):
        cut = rng.integers(0, k_unt)
        unt_scores[i, cut:] = -np.inf
        unt_index[i, cut:] = -1
    ans_ptr = [0]
    ans = []
    for i in range(n_b):
        pool = np.concatenate([touched, unt_index[i][unt_index[i] >= 0]])
        n_ans = rng.integers(0, 8)  # some queries with no answer
        ans.append(np.unique(rng.choice(pool, size=n_ans)))
        ans_ptr.append(ans_ptr[-1] + len(ans[-1]))
    ans_index = np.concatenate(ans).astype(np.int64)
    return S, H, alpha, beta, touched, unt_scores, unt_index, np.array(ans_ptr, np.int64), ans_index


@pytest.mark.parametrize("k_val", [1, 5, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_nudge_n_sweep(k_val, seed):
    args = _n_problem(seed)
    before = _copies(*args)
    want = ref.nudge_n_sweep(*args, k_val)
    got = cpp.nudge_n_sweep(*args, k_val)
    _assert_unchanged(before, args)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, cpp.nudge_n_sweep(*args, k_val, n_threads=1))


def test_nudge_n_sweep_no_untouched_candidates():
    S, H, alpha, beta, touched, _, _, ans_ptr, ans_index = _n_problem(3, k_unt=1)
    n_b = S.shape[0]
    lists = [a[np.isin(a, touched)] for a in np.split(ans_index, ans_ptr[1:-1])]
    ans_index = np.concatenate(lists).astype(np.int64)
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    unt_s = np.full((n_b, 3), -np.inf, np.float32)
    unt_i = np.full((n_b, 3), -1, np.int64)
    args = (S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index)
    np.testing.assert_array_equal(cpp.nudge_n_sweep(*args, 7), ref.nudge_n_sweep(*args, 7))


# ---------------------------------------------------------------------------------------------
# project


@pytest.mark.parametrize("e_dtype", [np.float16, np.float32, np.float64], ids=lambda t: "E" + np.dtype(t).name)
@pytest.mark.parametrize("c_dtype", [np.float32, np.float64], ids=lambda t: "C" + np.dtype(t).name)
@pytest.mark.parametrize("t", [0, 1, 123])
def test_project(e_dtype, c_dtype, t):
    rng = _rng("p", t)
    E = rng.standard_normal((t, 385)).astype(e_dtype)
    C = rng.standard_normal((t, 385)).astype(c_dtype)
    alpha, beta = rng.standard_normal(t), rng.standard_normal(t)
    before = _copies(E, C, alpha, beta)
    got = cpp.project(E, C, alpha, beta)
    want = ref.project(E, C, alpha, beta)
    _assert_unchanged(before, [E, C, alpha, beta])
    assert got.dtype == np.float32 and got.shape == (t, 385)
    np.testing.assert_array_equal(got, want)  # float64 math in the same order, one rounding
    np.testing.assert_array_equal(got, cpp.project(E, C, alpha, beta, n_threads=1))


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("k", [1, 5, 10, 14])
def test_metrics(k):
    rng = _rng("metrics", k)
    n, width = 57, 10
    retrieved = rng.integers(0, 40, size=(n, width)).astype(np.int64)
    retrieved[rng.random((n, width)) < 0.1] = -1
    ans_ptr, ans_index, ans_rel = [0], [], []
    for i in range(n):
        a = np.unique(rng.integers(0, 40, size=rng.integers(0, 12)))  # some empty
        ans_index.append(a)
        ans_rel.append(rng.integers(0, 4, size=len(a)).astype(np.float64))  # graded, zeros included
        ans_ptr.append(ans_ptr[-1] + len(a))
    args = (retrieved, np.array(ans_ptr, np.int64), np.concatenate(ans_index).astype(np.int64),
            np.concatenate(ans_rel))
    before = _copies(*args)
    with np.errstate(all="ignore"):
        want = ref.metrics(*args, k)
    got = cpp.metrics(*args, k)
    _assert_unchanged(before, args)
    assert got.shape == (n, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=METRICS_RTOL, atol=0, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got, cpp.metrics(*args, k, n_threads=1))


def test_backend_name_and_signatures():
    import inspect

    assert cpp.NAME == "cpp"
    for op in ("query_gradient", "topk_update", "nudge_m_intervals", "nudge_n_sweep", "project", "metrics"):
        assert inspect.signature(getattr(cpp, op)) == inspect.signature(getattr(ref, op)), op


# ---------------------------------------------------------------------------------------------
# Every output element is written: the binding's out= buffers, poisoned first.


def _poisoned(shape, dtype):
    a = np.empty(shape, dtype)
    if a.dtype == np.bool_:
        a.view(np.uint8)[...] = 0x55  # neither False nor True
    elif a.dtype.kind == "f":
        a[...] = np.nan
    else:
        a[...] = -7_777_777
    return a


def test_outputs_fully_written():
    rng = _rng("poison")
    queries = rng.standard_normal((53, 37))
    order, seg_ptr = _segments(53, 101, rng)
    out = _poisoned((101, 37), np.float64)
    assert _cpu.query_gradient(queries, order, seg_ptr, out=out) is not None
    np.testing.assert_allclose(out, ref.query_gradient(queries, order, seg_ptr), rtol=1e-13, atol=1e-13)

    args = _m_problem(7)
    S, G, pair_query, _, s_x, g_x, u_score = args
    outs = (_poisoned(len(s_x), np.float64), _poisoned(len(s_x), np.float64), _poisoned(len(s_x), np.bool_))
    _cpu.nudge_m_intervals(S, G, pair_query, s_x, g_x, u_score, 1e-8, out=outs)
    assert set(np.unique(outs[2].view(np.uint8))) <= {0, 1}
    for g, w in zip(outs, ref.nudge_m_intervals(*args, 1e-8)):
        np.testing.assert_array_equal(g, w)

    S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index = _n_problem(5)
    out = _poisoned((S.shape[0], alpha.shape[0]), np.int64)
    _cpu.nudge_n_sweep(S, H, alpha, beta, touched, unt_s.astype(np.float64), unt_i, ans_ptr, ans_index, 10, out=out)
    want = ref.nudge_n_sweep(S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index, 10)
    np.testing.assert_array_equal(out, want)

    E, C = rng.standard_normal((45, 37)).astype(np.float32), rng.standard_normal((45, 37))
    alpha, beta = rng.standard_normal(45), rng.standard_normal(45)
    out = _poisoned((45, 37), np.float32)
    _cpu.project(E, C, alpha, beta, out=out)
    np.testing.assert_array_equal(out, ref.project(E, C, alpha, beta))

    retrieved = rng.integers(-1, 30, size=(40, 10)).astype(np.int64)
    lists = [np.unique(rng.integers(0, 30, size=rng.integers(0, 6))) for _ in range(40)]
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    ans_index = np.concatenate(lists).astype(np.int64)
    rel = rng.integers(1, 4, size=len(ans_index)).astype(np.float64)
    out = _poisoned((40, 3), np.float64)
    _cpu.metrics(retrieved, ans_ptr, ans_index, rel, 10, out=out)
    want = ref.metrics(retrieved, ans_ptr, ans_index, rel, 10)
    np.testing.assert_allclose(out, want, rtol=METRICS_RTOL, atol=0, equal_nan=True)
    assert np.array_equal(np.isnan(out), np.isnan(want))  # NaN only where a query has no answer


def test_out_buffer_is_checked():
    E = np.ones((4, 5), np.float32)
    a = np.ones(4)
    with pytest.raises(ValueError):
        _cpu.project(E, E, a, a, out=np.empty((4, 6), np.float32))
    with pytest.raises(TypeError):
        _cpu.project(E, E, a, a, out=np.empty((4, 5), np.float64))
