"""``topk_update`` on every backend against the float64 reference (the contract is
``numpy_backend``'s docstring): awkward sizes (N = 1237, d = 1 / 37 / 384 / 385), float16,
float32 and float64 chunks, exact duplicate rows, NaN / inf / zero / tiny / huge rows, k beyond
the candidates, chunks merged in sequence, memmap / strided / Fortran chunks, every float16 bit
pattern. ``op_cases.check_topk`` says what a valid top-k is (ties between different records
allowed, the tie rule exact); results must be bit-identical on a repeat run.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import BACKENDS, THREADED
from nudgefast import _backends
from op_cases import (assert_same_error, assert_unchanged, backend_op, check_duplicate_rule,
                      check_topk, copies, corpus, empty_state, known_defect, reference_topk,
                      twin_queries, unit_queries)

CHUNK_DTYPES = [np.float16, np.float32, np.float64]
NO_EXCLUDE = np.zeros(0, np.int64)
# cuda keeps a top-k of k <= KMAX on chip and takes a two-phase path beyond: both sides of it.
KMAX = _backends.get("cuda").LAUNCH["TOPK"]["KMAX"] if "cuda" in BACKENDS else 128
_dtype_id = lambda t: np.dtype(t).name  # noqa: E731


@pytest.fixture
def topk(backend):
    return backend_op(backend, "topk_update")


def _in_chunks(topk, q, x, k, normalize, exclude=NO_EXCLUDE, rows=256):
    """One pass over ``x`` in chunks of ``rows``: (scores, index, first bad row or -1)."""
    s, i = empty_state(q.shape[0], k)
    bads = []
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        local = exclude[(exclude >= start) & (exclude < stop)] - start
        bads.append(topk(q, x[start:stop], start, local, normalize, s, i))
    return s, i, min((b for b in bads if b >= 0), default=-1)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d", [1, 37, 384, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_matches_reference(topk, dtype, d, normalize):
    n, n_q, k, row_offset = 1237, 9, 10, 5000
    x = corpus(n, d, dtype, seed=d)
    q64 = twin_queries(unit_queries(n_q, d, seed=d), x)
    q = q64.astype(np.float32)
    exclude = np.sort(np.random.default_rng(3).choice(n, 40, replace=False)).astype(np.int64)
    before = copies(q, x, exclude)
    scores, index = empty_state(n_q, k)
    bad = topk(q, x, row_offset, exclude, normalize, scores, index)
    assert_unchanged(before, [q, x, exclude])
    check_topk(q64, x, row_offset, exclude, normalize, scores, index, bad,
               reference_topk(q64, x, row_offset, exclude, normalize, k))
    assert bad == row_offset + n // 3  # the NaN row; the zero row comes later
    if d > 1:  # cosine: each twin query ranks its duplicate pair first; dot: longer rows may win
        assert check_duplicate_rule(x, index, row_offset, exclude) >= (3 if normalize else 1)
    again_s, again_i = empty_state(n_q, k)
    assert topk(q, x, row_offset, exclude, normalize, again_s, again_i) == bad
    np.testing.assert_array_equal(again_s, scores)
    np.testing.assert_array_equal(again_i, index)


@pytest.mark.parametrize("k", sorted({1, 3, 50, KMAX, KMAX + 1, 300, 1300}), ids=lambda k: f"k{k}")
def test_k_beyond_the_candidates(topk, k):
    # 45 rows, 20 excluded, a NaN and a zero row: k exceeds the rows, the candidates, or neither.
    n, d, n_q = 45, 37, 5
    x = corpus(n, d, np.float32, seed=k, n_dup=4)
    q64 = unit_queries(n_q, d, seed=k)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    s, i = empty_state(n_q, k)
    bad = topk(q64.astype(np.float32), x, 0, exclude, True, s, i)
    check_topk(q64, x, 0, exclude, True, s, i, bad, reference_topk(q64, x, 0, exclude, True, k))


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
def test_chunks_merged_in_sequence(backend, topk, dtype):
    """Chunk by chunk (row_offset, local exclude lists, a one-row chunk) equals the reference's
    stream and, on the compiled backends, bit for bit their one pass: a row's score does not
    depend on where the chunk boundaries fall. (numpy's float32 path scores through BLAS, whose
    summation order follows the matrix shape: equal to rounding only.)"""
    n, d, n_q, k = 1237, 37, 9, 25
    x = corpus(n, d, dtype, seed=11)
    q64 = twin_queries(unit_queries(n_q, d, seed=11), x, 2)
    q = q64.astype(np.float32)
    exclude = np.sort(np.random.default_rng(5).choice(n, 60, replace=False)).astype(np.int64)
    one_s, one_i = empty_state(n_q, k)
    one_bad = topk(q, x, 0, exclude, True, one_s, one_i)
    s, i = empty_state(n_q, k)
    state = empty_state(n_q, k, np.float64)
    bads = []
    for start, stop in [(0, 300), (300, 301), (301, 700), (700, 1100), (1100, 1237)]:
        local = exclude[(exclude >= start) & (exclude < stop)] - start
        bads.append(topk(q, x[start:stop], start, local, True, s, i))
        state = reference_topk(q64, x[start:stop], start, local, True, k, state=state)[:2]
    if backend != "numpy":
        np.testing.assert_array_equal(s, one_s)
        np.testing.assert_array_equal(i, one_i)
    assert one_bad == min(b for b in bads if b >= 0) == n // 3
    check_topk(q64, x, 0, exclude, True, s, i, one_bad, (*state, n // 3))


@pytest.mark.parametrize("backend", THREADED)
@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=_dtype_id)
def test_thread_count_does_not_change_the_result(backend, dtype):
    n, d, n_q, k = 3001, 385, 11, 17
    topk = backend_op(backend, "topk_update")
    x = corpus(n, d, dtype, seed=5, n_dup=60)
    q = unit_queries(n_q, d, seed=5).astype(np.float32)
    exclude = np.arange(7, n, 13, dtype=np.int64)
    runs = []
    for threads in (1, 2, 3, None, 1):
        s, i = empty_state(n_q, k)
        runs.append((s, i, topk(q, x, 77, exclude, True, s, i, n_threads=threads)))
    for s, i, bad in runs[1:]:
        np.testing.assert_array_equal(s, runs[0][0])
        np.testing.assert_array_equal(i, runs[0][1])
        assert bad == runs[0][2] == 77 + n // 3


def test_exact_duplicates_follow_the_index_rule(topk):
    # Copies of one row at awkward places: both rows of a 2-row tile, a 256-row sub-block
    # boundary, the last row. Every copy scores bit-identically and ranks by index.
    n, d = 1237, 385
    x = corpus(n, d, np.float32, seed=4, bad_rows=False)
    copies_at = np.array([3, 254, 255, 256, 257, 700, 1235, 1236])
    x[copies_at] = x[3]
    q = np.vstack([x[3] / np.linalg.norm(x[3]), unit_queries(3, d, seed=4)]).astype(np.float32)
    kept = copies_at[copies_at != 255]
    for threads in (1, 2):
        s, i = empty_state(4, 12)
        topk(q, x, 0, np.array([255], np.int64), True, s, i, n_threads=threads)
        np.testing.assert_array_equal(i[0, : len(kept)], kept)
        assert np.all(s[0, : len(kept)] == s[0, 0]) and s[0, len(kept)] < s[0, 0]


def _tie_state(topk):
    """Queries along axis 0 and six rows scoring 0.5, 0.9, 0.5, 0.7, 0.9, 0.1, fed as two
    chunks: the state holds rows 1, 4, 3, 0 (equal scores: the lower index first, wherever it
    came from)."""
    d, n_q, k = 16, 3, 4
    q = np.zeros((n_q, d), np.float32)
    q[:, 0] = 1.0
    x = np.zeros((6, d), np.float32)
    x[:, 0] = [0.5, 0.9, 0.5, 0.7, 0.9, 0.1]
    x[:, 1] = 1.0  # finite, nonzero
    s, i = empty_state(n_q, k)
    topk(q, x[:3], 0, NO_EXCLUDE, False, s, i)
    topk(q, x[3:], 3, NO_EXCLUDE, False, s, i)
    return q, x, s, i


def test_merges_into_the_state_with_the_tie_rule(topk):
    _, _, s, i = _tie_state(topk)
    np.testing.assert_array_equal(i, np.tile([1, 4, 3, 0], (3, 1)))
    np.testing.assert_array_equal(s, np.tile(np.float32([0.9, 0.9, 0.7, 0.5]), (3, 1)))


def test_rows_fed_again_or_out_of_order(backend, topk, request):
    """A row already held is not held twice (nor pushes another out); one tying the k-th with
    a higher index does not enter; an earlier index fed late ranks before equal held scores."""
    known_defect(request, backend, {
        "numpy": "the reference assumes chunks arrive in row order (held indices < row_offset): "
                 "a row fed again is held twice, an earlier index fed late ranks after equal scores"})
    q, x, s, i = _tie_state(topk)
    for row in (2, 1, 0):  # ties the k-th with a higher index / already held / already held
        s2, i2 = s.copy(), i.copy()
        topk(q, x[[row]], row, NO_EXCLUDE, False, s2, i2, n_threads=1)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_array_equal(s2, s)
    s2, i2 = s.copy(), i.copy()
    topk(q, x[[4]], 2, NO_EXCLUDE, False, s2, i2)  # score 0.9 as global row 2
    np.testing.assert_array_equal(i2, np.tile([1, 2, 4, 3], (3, 1)))


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # numpy: inf/NaN rows
def test_float16_every_bit_pattern(topk):
    """Every float16 pattern (subnormals, +-0, inf, NaN) decodes exactly: with d = 1 and
    q = +-1 the scores are the decoded values."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(-1, 1)
    subnormal = x[np.r_[1:1024, 0x8001:0x8400]]
    q = np.array([[1.0], [-1.0]], np.float32)
    for chunk, k in [(x, 40), (subnormal, 40)]:
        s, i = empty_state(2, k)
        bad = topk(q, chunk, 0, NO_EXCLUDE, False, s, i)
        rs, ri, ref_bad = reference_topk(q.astype(np.float64), chunk, 0, NO_EXCLUDE, False, k)
        assert bad == ref_bad
        np.testing.assert_array_equal(s, rs.astype(np.float32))
        np.testing.assert_array_equal(i, ri)
    assert bad == -1 and topk(q, x, 0, NO_EXCLUDE, False, *empty_state(2, 1)) == 0x7C00  # +inf


def test_empty_chunk(topk):
    q = np.ones((2, 8), np.float32)
    s, i = empty_state(2, 3)
    assert topk(q, np.ones((0, 8), np.float32), 0, NO_EXCLUDE, True, s, i) == -1
    assert np.all(i == -1) and np.all(np.isneginf(s))


@pytest.mark.parametrize("n_q,k", [(2, 0), (0, 4)], ids=["k0", "no-queries"])
def test_bad_rows_reported_when_nothing_is_kept(backend, topk, n_q, k, request):
    known_defect(request, backend, {
        "cuda": "cuda_backend.topk_update returns -1 before reading the chunk when k == 0 or "
                "there are no queries",
        **({"numpy": "the reference raises ValueError on k == 0 (np.partition kth == m)"}
           if k == 0 else {})})
    x = np.ones((5, 8), np.float32)
    x[3] = 0.0
    assert topk(np.ones((n_q, 8), np.float32), x, 10, NO_EXCLUDE, True, *empty_state(n_q, k)) == 13
    # Past the first group of rows a worker takes (numba missed this without queries).
    x = np.ones((1237, 8), np.float32)
    x[412] = 0.0
    assert topk(np.ones((n_q, 8), np.float32), x, 10, NO_EXCLUDE, True,
                *empty_state(n_q, k)) == 422


def test_float64_state_and_queries(topk):
    n, d, n_q, k = 200, 37, 3, 5
    x = corpus(n, d, np.float32, seed=9, bad_rows=False)
    q64 = unit_queries(n_q, d, seed=9)
    s, i = empty_state(n_q, k)
    topk(q64.astype(np.float32), x, 0, NO_EXCLUDE, True, s, i)
    s64, i64 = empty_state(n_q, k, np.float64)
    topk(q64.astype(np.float32), x, 0, NO_EXCLUDE, True, s64, i64)
    np.testing.assert_array_equal(i64, i)  # a float64 state holds the float32 scores exactly
    np.testing.assert_array_equal(s64, s.astype(np.float64))
    # float64 queries: numpy's reference mode, float32 scores elsewhere; a valid top-k either way.
    s64, i64 = empty_state(n_q, k, np.float64)
    bad = topk(q64, x, 0, NO_EXCLUDE, True, s64, i64)
    check_topk(q64, x, 0, NO_EXCLUDE, True, s64, i64, bad, reference_topk(q64, x, 0, NO_EXCLUDE, True, k))


def test_memmap_strided_and_fortran_chunks(topk, tmp_path):
    n, d, n_q, k = 1237, 37, 5, 12
    x = corpus(n, d, np.float16, seed=2)
    np.save(tmp_path / "corpus.npy", x)
    mm = np.load(tmp_path / "corpus.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    q64 = unit_queries(n_q, d, seed=2)
    q = q64.astype(np.float32)
    want_s, want_i = empty_state(n_q, k)
    want_bad = topk(q, x[100:1100], 100, NO_EXCLUDE, True, want_s, want_i)
    assert want_bad == n // 3  # a global index: the chunk starts at row 100 = row_offset
    variants = {
        "read-only memmap slice": mm[100:1100],
        "strided rows": np.hstack([x, np.zeros((n, 11), np.float16)])[100:1100, :d],
        "fortran": np.asfortranarray(x[100:1100]),
    }
    for name, chunk in variants.items():
        s, i = empty_state(n_q, k)
        assert topk(q, chunk, 100, NO_EXCLUDE, True, s, i) == want_bad, name
        np.testing.assert_array_equal(s, want_s, err_msg=name)
        np.testing.assert_array_equal(i, want_i, err_msg=name)
    check_topk(q64, x[100:1100], 100, NO_EXCLUDE, True, want_s, want_i, want_bad,
               reference_topk(q64, x[100:1100], 100, NO_EXCLUDE, True, k))


def test_bad_tiny_and_huge_rows(topk):
    d, n_q, k = 33, 4, 6
    x = corpus(900, d, np.float32, seed=8, bad_rows=False)
    x[700] = 0.0
    x[650, 3] = np.inf
    x[800, 0] = np.nan
    x[100] *= 1e-30  # tiny but nonzero: float32 sums of squares underflow, the norm does not
    x[200] *= 1e20   # huge but finite: float32 sums of squares overflow, the norm does not
    q64 = unit_queries(n_q, d, seed=8)
    q = q64.astype(np.float32)
    for normalize in (True, False):
        for s, i, bad in (_in_chunks(topk, q, x, k, normalize), _in_chunks(topk, q, x, k, normalize, rows=900)):
            assert bad == 650
            assert not np.isin(i, [650, 800] + ([700] if normalize else [])).any()
    # The zero row is bad only with normalize; an excluded bad row is still reported.
    y = x.copy()
    y[650, 3] = 1.0
    y[800, 0] = 1.0
    assert _in_chunks(topk, q, y, k, True)[2] == 700
    assert _in_chunks(topk, q, y, k, False)[2] == -1
    assert _in_chunks(topk, q, y, k, True, exclude=np.array([700], np.int64))[2] == 700
    # Tiny and huge rows are valid candidates, with the reference's scores.
    s, i, bad = _in_chunks(topk, q, y, k, True)
    check_topk(q64, y, 0, NO_EXCLUDE, True, s, i, bad, reference_topk(q64, y, 0, NO_EXCLUDE, True, k))
    # Every row bad: nothing kept.
    s, i, bad = _in_chunks(topk, q, np.full((50, d), np.nan, np.float32), k, True)
    assert bad == 0 and np.all(i == -1) and np.all(np.isneginf(s))


def test_exclude_everything(topk):
    d, n_q, k = 20, 3, 5
    x = corpus(300, d, np.float32, seed=2, bad_rows=False)
    q = unit_queries(n_q, d, seed=2).astype(np.float32)
    s, i = empty_state(n_q, k)
    assert topk(q, x, 0, np.arange(300, dtype=np.int64), True, s, i) == -1
    assert np.all(i == -1) and np.all(np.isneginf(s))


def test_float16_at_large_d(topk):
    """float16 rows at d = 1000 stay within the float32 tolerance (cuda: split float16
    queries on tensor cores)."""
    n, d, n_q, k = 600, 1000, 70, 20
    x = corpus(n, d, np.float16, seed=30, bad_rows=False)
    q64 = unit_queries(n_q, d, seed=30)
    s, i = empty_state(n_q, k)
    bad = topk(q64.astype(np.float32), x, 0, NO_EXCLUDE, True, s, i)
    check_topk(q64, x, 0, NO_EXCLUDE, True, s, i, bad, reference_topk(q64, x, 0, NO_EXCLUDE, True, k))


_NO_SHAPE_CHECKS = "numba's topk_update does not check that the state's arrays agree"
BAD_INPUTS = {
    # name: (queries, chunk, best_scores, best_index), and the backends known to differ
    "chunk-d-differs": (lambda: (np.ones((2, 8), np.float32), np.ones((4, 9), np.float32), *empty_state(2, 3)), {}),
    "state-rows-differ": (lambda: (np.ones((2, 8), np.float32), np.ones((4, 8), np.float32), *empty_state(3, 3)), {}),
    "index-shape-differs": (lambda: (np.ones((2, 8), np.float32), np.ones((4, 8), np.float32),
                                     empty_state(2, 3)[0], empty_state(2, 4)[1]), {"numba": _NO_SHAPE_CHECKS}),
    "read-only-state": (lambda: (np.ones((2, 8), np.float32), np.ones((4, 8), np.float32),
                                 *[np.lib.stride_tricks.as_strided(a, writeable=False) for a in empty_state(2, 3)]),
                        {"numba": "numba's topk_update raises a numba TypingError on a read-only state"}),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_what_the_reference_raises(backend, case, request):
    build, defects = BAD_INPUTS[case]
    known_defect(request, backend, defects)

    def call(module):
        q, x, s, i = build()
        return module.topk_update(q, x, 0, NO_EXCLUDE, True, s, i)

    assert_same_error(backend, call)


def test_signature(backend):
    backend_op(backend, "topk_update")
