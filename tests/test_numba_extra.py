"""The Numba backend's own paths that the per-op tables (tests/ops/) do not reach.

``topk_update`` at large k: admitted rows go to a per-worker reservoir of rank keys that is cut
back to its best k by selection when full, its admission threshold starts at the caller's k-th
score, selection and sort are hand-written, and a chunk longer than 2**32 - 1 rows is fed in
pieces. Checked against the float64
reference (``op_cases.check_topk``: scores to ``TOL[float32]``, ties between different records
allowed, the tie rule exact) with k close to N, k = N and k beyond the candidates, exact
duplicate rows, excluded rows, NaN and zero rows, several chunks, float16 corpora, a float64
state; and bit-identical whatever the thread count or the piece length.

``normalize_rows``: the first bad row found by parallel blocks (the smallest wins whichever
block finishes first), every float16 bit pattern decoded exactly, strided chunks, and ``out``
checked before anything is written.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

import nudgefast  # noqa: E402
from nudgefast._backends import numba_backend as nb  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import (check_duplicate_rule, check_topk, corpus, empty_state, poisoned,  # noqa: E402
                      reference_topk, twin_queries, unit_queries)

_dtype_id = lambda t: np.dtype(t).name  # noqa: E731


# ---------------------------------------------------------------------------------------------
# topk_update at large k


def _in_chunks(q, x, k, exclude, rows, n_threads=None, state=None):
    """One pass over ``x`` in chunks of ``rows``: (scores, index, first bad row or -1)."""
    s, i = empty_state(q.shape[0], k) if state is None else state
    bads = []
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        local = exclude[(exclude >= start) & (exclude < stop)] - start
        bads.append(nb.topk_update(q, x[start:stop], start, local, True, s, i, n_threads=n_threads))
    return s, i, min((b for b in bads if b >= 0), default=-1)


# N = 1237 rows: 40 excluded, a NaN and a zero row -> 1195 candidates.
_N, _D, _NQ = 1237, 37, 9
_EXCLUDE = np.sort(np.random.default_rng(3).choice(_N, 40, replace=False)).astype(np.int64)
_N_CAND = _N - len(_EXCLUDE) - 2


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=_dtype_id)
@pytest.mark.parametrize("k", [_N_CAND - 7, _N_CAND, _N, _N + 50],
                         ids=["near-N", "all-candidates", "k=N", "beyond-N"])
@pytest.mark.parametrize("rows", [_N, 300], ids=["one-chunk", "chunks-of-300"])
def test_large_k_matches_reference(dtype, k, rows):
    x = corpus(_N, _D, dtype, seed=k)
    assert not np.isin([_N // 3, _N // 2], _EXCLUDE).any()  # the bad rows stay visible
    q64 = twin_queries(unit_queries(_NQ, _D, seed=k), x)
    s, i, bad = _in_chunks(q64.astype(np.float32), x, k, _EXCLUDE, rows)
    check_topk(q64, x, 0, _EXCLUDE, True, s, i, bad, reference_topk(q64, x, 0, _EXCLUDE, True, k))
    assert bad == _N // 3
    assert check_duplicate_rule(x, i, 0, _EXCLUDE) >= 3  # every twin pair is held, in order
    if k >= _N_CAND:  # every candidate held, the rest padded
        assert np.all(i[:, _N_CAND:] == -1) and np.all(np.isneginf(s[:, _N_CAND:]))
        assert all(len(np.unique(row[:_N_CAND])) == _N_CAND for row in i)


def _reservoir_problem(dtype=np.float32, n=20_000, d=24, n_q=7):
    """Enough rows per worker (n_threads=1: four row groups of 5000) that a reservoir of
    2k fills and is cut back several times for k <= 1000; many exact ties."""
    x = corpus(n, d, dtype, seed=11, n_dup=2000)
    q64 = twin_queries(unit_queries(n_q, d, seed=11), x)
    exclude = np.sort(np.random.default_rng(5).choice(n, 500, replace=False)).astype(np.int64)
    return q64, x, np.setdiff1d(exclude, [n // 3, n // 2])


@pytest.mark.parametrize("k", [10, 300, 1000])
def test_reservoir_cut_back_matches_reference_and_any_thread_count(k):
    q64, x, exclude = _reservoir_problem()
    q = q64.astype(np.float32)
    s1, i1, bad = _in_chunks(q, x, k, exclude, x.shape[0], n_threads=1)
    check_topk(q64, x, 0, exclude, True, s1, i1, bad, reference_topk(q64, x, 0, exclude, True, k))
    assert check_duplicate_rule(x, i1, 0, exclude) >= 3
    # Other thread counts and chunkings split the rows differently: the same bits.
    for threads, rows in [(None, x.shape[0]), (2, 4096), (1, 777)]:
        s2, i2, bad2 = _in_chunks(q, x, k, exclude, rows, n_threads=threads)
        assert bad2 == bad
        np.testing.assert_array_equal(s2, s1)
        np.testing.assert_array_equal(i2, i1)


def test_float64_state_from_the_reference_gates_exactly():
    """A float64 state whose k-th score is not a float32 value (the reference's) gates the next
    chunk's rows: every row above it still enters, the merge keeps the tie rule."""
    q64, x, exclude = _reservoir_problem(n=6000)
    k, half = 400, 3000
    state = reference_topk(q64, x[:half], 0, exclude[exclude < half], True, k)[:2]
    assert not np.array_equal(state[0][:, -1], state[0][:, -1].astype(np.float32))
    local = exclude[exclude >= half] - half
    bad = nb.topk_update(q64, x[half:], half, local, True, *state)
    want = reference_topk(q64, x, 0, exclude, True, k)
    check_topk(q64, x, 0, exclude, True, state[0], state[1],
               min(b for b in (want[2], bad) if b >= 0), want)


def test_a_huge_chunk_is_fed_in_pieces(monkeypatch):
    """Chunks longer than the rank keys' 32-bit row field are split: shrinking the limit to 777
    rows must give the same bits, the first bad row and the excluded rows included."""
    q64, x, exclude = _reservoir_problem(n=5000)
    q = q64.astype(np.float32)
    for k in (5, 800):
        s1, i1 = empty_state(q.shape[0], k)
        bad1 = nb.topk_update(q, x, 100, exclude, True, s1, i1)
        monkeypatch.setattr(nb, "_MAX_CHUNK_ROWS", 777)
        s2, i2 = empty_state(q.shape[0], k)
        bad2 = nb.topk_update(q, x, 100, exclude, True, s2, i2)
        monkeypatch.undo()
        assert bad1 == bad2 == 100 + x.shape[0] // 3
        np.testing.assert_array_equal(s2, s1)
        np.testing.assert_array_equal(i2, i1)
        assert not np.isin(i1, exclude + 100).any()


@pytest.mark.parametrize("order", ["random", "sorted", "reversed", "organ-pipe"])
def test_key_selection_and_sort(order):
    """The reservoir's selection and sort (hand-written introsort) on orders that defeat naive
    pivots, and the heapsort they fall back on."""
    keys = np.random.default_rng(9).choice(1 << 62, 5000, replace=False).astype(np.uint64)
    keys = {"random": keys, "sorted": np.sort(keys), "reversed": np.sort(keys)[::-1].copy(),
            "organ-pipe": np.concatenate([np.sort(keys[::2]), np.sort(keys[1::2])[::-1]])}[order]
    want = np.sort(keys)
    for n in (0, 1, 2, 17, 5000):
        a = keys.copy()
        nb._sort_keys(a, n)
        np.testing.assert_array_equal(a[:n], np.sort(keys[:n]))
        np.testing.assert_array_equal(a[n:], keys[n:])
    for kth in (0, 1, 16, 2500, 4999):
        a = keys.copy()
        nb._select_keys(a, 5000, kth)
        assert a[kth] == want[kth] and np.all(a[:kth] < a[kth]) and np.all(a[kth + 1:] > a[kth])
    a = keys.copy()
    nb._heapsort_keys(a, 100, 4000)
    np.testing.assert_array_equal(a[100:4000], np.sort(keys[100:4000]))
    np.testing.assert_array_equal(np.r_[a[:100], a[4000:]], np.r_[keys[:100], keys[4000:]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=_dtype_id)
def test_search_at_k_equal_to_n_matches_numpy(dtype):
    """Public API, several chunks: every record ranked, scores as the numpy backend's, exact
    duplicates in index order."""
    x = corpus(900, 33, dtype, seed=4, bad_rows=False)
    q = twin_queries(unit_queries(5, 33, seed=4), x).astype(np.float32)
    for k in (897, 900):
        got = nudgefast.search(q, x, k, backend="numba", chunk_rows=128)
        want = nudgefast.search(q, x, k, backend="numpy", chunk_rows=128)
        np.testing.assert_allclose(got.scores, want.scores, atol=2e-5, rtol=0)
        assert all(len(np.unique(row)) == k for row in got.indices) and got.indices.min() >= 0
        assert check_duplicate_rule(x, got.indices, 0, None) >= 3


# ---------------------------------------------------------------------------------------------
# normalize_rows


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=_dtype_id)
@pytest.mark.parametrize("threads", [1, None], ids=["1-thread", "all-threads"])
def test_first_bad_row_across_parallel_blocks(dtype, threads):
    x = (np.random.default_rng(7).standard_normal((1001, 37)) + 0.1).astype(dtype)
    out = poisoned(x.shape, np.float32)
    assert nb.normalize_rows(x, out, n_threads=threads) == -1
    assert not np.isnan(out).any(), "an output element was never written"
    np.testing.assert_array_max_ulp(out, _reference(x), maxulp=1)
    # Bad rows in several 64-row blocks, the last block first: the smallest row is reported.
    for rows, first in [([1000, 700, 131, 130], 130), ([999], 999), ([0, 500], 0)]:
        y = x.copy()
        for r in rows:
            y[r] = 0.0 if r % 2 == 0 else np.nan
        assert nb.normalize_rows(y, poisoned(y.shape, np.float32), n_threads=threads) == first


def _reference(chunk):
    want = poisoned(chunk.shape, np.float32)
    assert ref.normalize_rows(chunk, want) == -1
    return want


def test_every_float16_bit_pattern():
    """Rows (h, 1, h) for every float16 pattern h: the first non-finite one is +inf (0x7C00);
    the finite ones match the reference within the contract's float32 ulp."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = np.stack([h, np.ones_like(h), h], axis=1)
    assert nb.normalize_rows(x, poisoned(x.shape, np.float32)) == 0x7C00
    finite = x[np.isfinite(h)]
    out = poisoned(finite.shape, np.float32)
    assert nb.normalize_rows(finite, out) == -1
    np.testing.assert_array_max_ulp(out, _reference(finite), maxulp=1)


def test_strided_chunk_and_odd_width():
    x = np.random.default_rng(8).standard_normal((400, 771)).astype(np.float32)[::3, ::2]  # d = 386
    x = x[:, :385]
    out = poisoned(x.shape, np.float32)
    assert nb.normalize_rows(x, out) == -1
    np.testing.assert_array_max_ulp(out, _reference(np.ascontiguousarray(x)), maxulp=1)


@pytest.mark.parametrize("make", [
    lambda s: np.empty((s[0] - 1, s[1]), np.float32),   # fewer rows: would be written past its end
    lambda s: np.empty((s[0], s[1] + 1), np.float32),
    lambda s: np.empty(s, np.float64),
    lambda s: np.empty((s[1], s[0]), np.float32).T,     # Fortran order
    lambda s: np.broadcast_to(np.float32(0), s),         # read-only
], ids=["fewer-rows", "wider", "float64", "fortran", "read-only"])
def test_out_is_checked_before_writing(make):
    x = np.ones((5, 4), np.float32)
    out = make(x.shape)
    with pytest.raises(ValueError, match="out"):
        nb.normalize_rows(x, out)
