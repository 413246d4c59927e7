"""The CUDA backend (``cuda_backend``, CuPy kernels from csrc/cuda) against the NumPy float64
reference, and against the compiled CPU backend when it is built, op by op, on awkward sizes.

Every test carries the ``gpu`` mark and the module skips cleanly without CuPy or a visible CUDA
device. Tolerances, stated once: top-k scores are float32 sums of float32 products (float16
corpora: tensor-core products of float16 rows with split float16 queries, float32 accumulation),
``TOPK_ATOL`` on unit-scale scores; the small ops use the reference's IEEE operations in the same
order and are compared exactly, except ``metrics`` (``METRICS_RTOL``: NumPy sums pairwise).
Top-k comparisons with the reference allow ties between different records whose float32 scores
round differently; within this backend the tie rule (score desc, index asc) must hold exactly,
which exact duplicate rows check. Output buffers come from a device memory pool poisoned with NaN
first, so an unwritten element shows.
"""
from __future__ import annotations

import inspect
import zlib

import numpy as np
import pytest

cp = pytest.importorskip("cupy", reason="the CUDA backend needs CuPy (cupy-cuda12x / cupy-cuda13x)")


def _visible_devices() -> int:
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:  # no driver, driver too old, ...
        return 0


if _visible_devices() == 0:
    pytest.skip("no CUDA device is visible", allow_module_level=True)

from nudgefast._backends import cuda_backend as cuda  # noqa: E402  (after the skips)
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import _assert_unchanged, _copies, _corpus, _empty_state, _segments

try:
    from nudgefast._backends import cpp_backend as cpp
except ImportError:  # the extension is not built here
    cpp = None

pytestmark = pytest.mark.gpu

TOPK_ATOL = 2e-5  # float32 accumulation over d <= 1000 of unit-norm rows
METRICS_RTOL = 1e-12
CHUNK_DTYPES = [np.float16, np.float32, np.float64]
KMAX = cuda.LAUNCH["TOPK"]["KMAX"]


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _poison_pool():
    """Fill free device-pool memory with NaN, so outputs allocated next start as NaN."""
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.full(16 << 20, cp.nan, dtype=cp.float64)  # 128 MiB, returned to the pool below
    cp.cuda.get_current_stream().synchronize()
    del junk


@pytest.fixture(autouse=True)
def poisoned_pool():
    _poison_pool()
    yield


# ---------------------------------------------------------------------------------------------
# Data


def _queries(n_q, d, seed):
    rng = np.random.default_rng(seed + 1)
    q = rng.standard_normal((n_q, d))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q


def _twin_queries(q64, x, n=3):
    """Point the first n queries at duplicated rows, so exact ties reach the top-k."""
    rows, counts = np.unique(np.asarray(x, np.float64), axis=0, return_counts=True)
    twins = rows[(counts > 1) & np.isfinite(rows).all(axis=1) & (np.abs(rows).sum(axis=1) > 0)]
    twins = twins[: min(n, q64.shape[0])]
    q64 = q64.copy()
    q64[: len(twins)] = twins / np.linalg.norm(twins, axis=1, keepdims=True)
    return q64


def _reference(q64, x, row_offset, exclude_local, normalize, k):
    rs, ri = np.full((q64.shape[0], k), -np.inf), np.full((q64.shape[0], k), -1, dtype=np.int64)
    bad = ref.topk_update(q64, np.asarray(x, np.float64), row_offset, exclude_local, normalize, rs, ri)
    return rs, ri, bad


def _true_scores(q64, x64, normalize):
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = q64 @ np.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0).T
        if normalize:
            s = s / np.linalg.norm(x64, axis=1)[None, :]
    return s


def _check_topk(q64, x, row_offset, exclude, normalize, k, scores, index, first_bad, ref_scores, ref_first_bad):
    """Our state is a valid top-k: same scores as the reference (to TOPK_ATOL), indices whose
    true scores match, the tie rule exactly, no excluded or bad row."""
    assert scores.dtype == np.float32 and index.dtype == np.int64
    assert scores.shape == index.shape == (q64.shape[0], k)
    assert first_bad == ref_first_bad
    x64 = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x64, axis=1)
    bad = ~np.isfinite(norms) | ((norms == 0) if normalize else False)
    allowed = ~bad
    allowed[exclude] = False
    n_cand = int(allowed.sum())
    true = _true_scores(q64, x64, normalize)
    finite_norms = norms[np.isfinite(norms)]
    atol = TOPK_ATOL * (1.0 if normalize else max(1.0, float(finite_norms.max(initial=1.0))))
    assert not np.isnan(scores).any(), "an output score was never written"
    for i in range(q64.shape[0]):
        valid = index[i] >= 0
        assert valid.sum() == min(k, n_cand)
        assert np.all(valid[: valid.sum()]), "valid entries come first"
        assert np.all(np.isneginf(scores[i][~valid]))
        idx = index[i][valid] - row_offset
        assert np.all((idx >= 0) & (idx < x64.shape[0])), "an index out of range (unwritten?)"
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


def _check_duplicate_rule(x, index, row_offset, exclude):
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


def _stream(q, corpus, k, **kw):
    return cuda.topk_stream(q, corpus, k, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# top-k: the per-chunk op of the contract


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", [1, 37, 384, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_topk_update_matches_reference(dtype, d, normalize):
    n, n_q, k, row_offset = 1237, 7, 10, 5000
    x = _corpus(n, d, dtype, seed=d)
    exclude = np.sort(np.random.default_rng(3).choice(n, 40, replace=False)).astype(np.int64)
    q64 = _twin_queries(_queries(n_q, d, seed=d), x) if d > 1 else _queries(n_q, d, seed=d)
    q = q64.astype(np.float32)
    before = _copies(q, x, exclude)

    scores, index = _empty_state(n_q, k)
    first_bad = cuda.topk_update(q, x, row_offset, exclude, normalize, scores, index)
    rs, ri, ref_bad = _reference(q64, x, row_offset, exclude, normalize, k)

    _assert_unchanged(before, [q, x, exclude])
    _check_topk(q64, x, row_offset, exclude, normalize, k, scores, index, first_bad, rs, ref_bad)
    if d > 1:
        assert _check_duplicate_rule(x, index, row_offset, exclude) >= (3 if normalize else 1)


@pytest.mark.parametrize("k", [1, 3, 50, KMAX, KMAX + 1, 300, 1300], ids=lambda k: f"k{k}")
def test_topk_k_larger_than_candidates(k):
    # A chunk of 45 rows, 20 excluded, one NaN and one zero row: k can exceed the rows, the
    # candidates, or neither; k > KMAX takes the two-phase path.
    n, d, n_q = 45, 37, 5
    x = _corpus(n, d, np.float32, seed=k, n_dup=4)
    q64 = _queries(n_q, d, seed=k)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    scores, index = _empty_state(n_q, k)
    first_bad = cuda.topk_update(q64.astype(np.float32), x, 0, exclude, True, scores, index)
    rs, ri, ref_bad = _reference(q64, x, 0, exclude, True, k)
    _check_topk(q64, x, 0, exclude, True, k, scores, index, first_bad, rs, ref_bad)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("k", [1, 17, KMAX, KMAX + 1, 257], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("n_q", [1, 64, 150], ids=lambda n: f"nq{n}")
def test_topk_fused_and_two_phase_paths(dtype, k, n_q):
    """Several query tiles (n_q > QT), several row splits, both paths, against the reference."""
    n, d = 3001, 129
    x = _corpus(n, d, dtype, seed=k + n_q, n_dup=40)
    q64 = _twin_queries(_queries(n_q, d, seed=k), x)
    exclude = np.arange(5, n, 17, dtype=np.int64)
    s, i, bad = _stream(q64.astype(np.float32), x, k, exclude=exclude, normalize=True)
    rs, ri, ref_bad = _reference(q64, x, 0, exclude, True, k)
    _check_topk(q64, x, 0, exclude, True, k, s, i, bad, rs, ref_bad)
    _check_duplicate_rule(x, i, 0, exclude)


def test_topk_merges_into_existing_state_with_tie_rule():
    """State entries and new rows with equal scores: the lower index wins wherever it comes from."""
    d, n_q, k = 16, 3, 4
    q = np.zeros((n_q, d), np.float32)
    q[:, 0] = 1.0
    x = np.zeros((6, d), np.float32)
    x[:, 0] = [0.5, 0.9, 0.5, 0.7, 0.9, 0.1]
    x[:, 1] = 1.0  # finite, nonzero
    s, i = _empty_state(n_q, k)
    cuda.topk_update(q, x[:3], 0, None, False, s, i)
    cuda.topk_update(q, x[3:], 3, None, False, s, i)
    np.testing.assert_array_equal(i, np.tile([1, 4, 3, 0], (n_q, 1)))
    np.testing.assert_array_equal(s, np.tile(np.float32([0.9, 0.9, 0.7, 0.5]), (n_q, 1)))
    # A row tying the k-th entry but with a higher index does not enter; one already held is not
    # duplicated (nor does it push another entry out).
    for row in (2, 1, 0):
        s2, i2 = s.copy(), i.copy()
        cuda.topk_update(q, x[[row]], row, None, False, s2, i2)
        np.testing.assert_array_equal(i2, i)
        np.testing.assert_array_equal(s2, s)
    s2, i2 = s.copy(), i.copy()
    cuda.topk_update(q, x[[4]], 2, None, False, s2, i2)  # score 0.9 as global row 2
    np.testing.assert_array_equal(i2, np.tile([1, 2, 4, 3], (n_q, 1)))


def test_topk_empty_chunk_and_zero_k():
    q = np.ones((2, 8), np.float32)
    s, i = _empty_state(2, 3)
    assert cuda.topk_update(q, np.ones((0, 8), np.float32), 0, None, True, s, i) == -1
    assert np.all(i == -1)
    s0, i0 = _empty_state(2, 0)
    assert cuda.topk_update(q, np.ones((5, 8), np.float32), 0, None, True, s0, i0) == -1


def test_topk_float64_state_is_updated_through_a_copy():
    n, d, n_q, k = 200, 37, 3, 5
    x = _corpus(n, d, np.float32, seed=9, bad_rows=False)
    q = _queries(n_q, d, seed=9)
    s64, i64 = np.full((n_q, k), -np.inf), np.full((n_q, k), -1, dtype=np.int64)
    cuda.topk_update(q, x, 0, None, True, s64, i64)
    s, i = _empty_state(n_q, k)
    cuda.topk_update(q.astype(np.float32), x, 0, None, True, s, i)
    np.testing.assert_array_equal(i64, i)
    np.testing.assert_array_equal(s64, s.astype(np.float64))


# ---------------------------------------------------------------------------------------------
# top-k: the corpus pass (host streaming, device in place)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("k", [10, KMAX + 3], ids=["fused", "two-phase"])
def test_topk_stream_host_device_memmap_and_chunking_agree(dtype, k, tmp_path):
    """Every way of feeding the same corpus gives bit-identical results: a row's score does not
    depend on the chunking, the buffer or the loader, and merges apply the tie rule."""
    n, d, n_q = 2500, 48, 9
    x = _corpus(n, d, dtype, seed=11, n_dup=30)
    q = _twin_queries(_queries(n_q, d, seed=11), x).astype(np.float32)
    exclude = np.concatenate([np.arange(0, 40), np.arange(399, 402), np.arange(1000, n, 7)]).astype(np.int64)
    path = tmp_path / "corpus.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    assert not mm.flags.writeable
    dev = cp.asarray(x)
    dev_before = dev.copy()

    want = _stream(q, x, k, exclude=exclude)
    runs = {
        "host chunks of 400": _stream(q, x, k, exclude=exclude, chunk_rows=400),
        "host chunks of 1024": _stream(q, x, k, exclude=exclude, chunk_rows=1024, n_threads=3),
        "memmap": _stream(q, mm, k, exclude=exclude),
        "memmap chunks of 777": _stream(q, mm, k, exclude=exclude, chunk_rows=777),
        "device": _stream(q, dev, k, exclude=exclude),
        "device chunks of 333": _stream(q, dev, k, exclude=exclude, chunk_rows=333),
        "repeat": _stream(q, x, k, exclude=exclude),
    }
    for name, got in runs.items():
        np.testing.assert_array_equal(got[0], want[0], err_msg=name)
        np.testing.assert_array_equal(got[1], want[1], err_msg=name)
        assert got[2] == want[2], name
    assert bool(cp.all((dev == dev_before) | (cp.isnan(dev) & cp.isnan(dev_before))))
    rs, ri, ref_bad = _reference(q.astype(np.float64), x, 0, exclude, True, k)
    _check_topk(q.astype(np.float64), x, 0, exclude, True, k, want[0], want[1], want[2], rs, ref_bad)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
def test_topk_vector_and_element_loaders_agree(dtype):
    """d a multiple of the 16-byte width, rows aligned: 16-byte loads; the same rows in a
    misaligned strided view: element loads. Bit-identical results."""
    n, d, n_q, k = 1500, 64, 5, 12
    x = _corpus(n, d, dtype, seed=4)
    q = _queries(n_q, d, seed=4).astype(np.float32)
    aligned = cp.asarray(x)
    wide = cp.zeros((n, d + 3), dtype=dtype)
    wide[:, 1:d + 1] = aligned
    misaligned = wide[:, 1:d + 1]  # row stride d + 3, base off by one element
    a = _stream(q, aligned, k)
    b = _stream(q, misaligned, k)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_topk_stream_continues_state_across_corpora():
    """Two corpora in two passes (state + row_offset) equal one pass over their concatenation."""
    d, n_q, k = 40, 6, 7
    x = _corpus(1800, d, np.float32, seed=21, n_dup=25, bad_rows=False)
    q = _queries(n_q, d, seed=21).astype(np.float32)
    exclude = np.arange(3, 1800, 11, dtype=np.int64)
    one = _stream(q, x, k, exclude=exclude)
    first = _stream(q, x[:1000], k, exclude=exclude[exclude < 1000])
    two = _stream(q, cp.asarray(x[1000:]), k, exclude=exclude, row_offset=1000, state=first[:2])
    np.testing.assert_array_equal(two[0], one[0])
    np.testing.assert_array_equal(two[1], one[1])
    assert two[2] == one[2] == -1


def test_topk_bad_rows():
    d, n_q, k = 33, 4, 6
    x = _corpus(900, d, np.float32, seed=8, bad_rows=False)
    x[700] = 0.0
    x[650, 3] = np.inf
    x[800, 0] = np.nan
    x[100] *= 1e-30  # tiny but nonzero: float32 sums of squares underflow, the norm does not
    x[200] *= 1e20   # huge but finite: float32 sums of squares overflow, the norm does not
    q64 = _queries(n_q, d, seed=8)
    q = q64.astype(np.float32)
    for normalize, first in ((True, 650), (False, 650)):
        s, i, bad = _stream(q, x, k, normalize=normalize, chunk_rows=256)
        assert bad == first
        assert not np.isin(i, [650, 800] + ([700] if normalize else [])).any()
    # The zero row is reported only with normalize; an excluded bad row is still reported.
    y = x.copy()
    y[650, 3] = 1.0
    y[800, 0] = 1.0
    assert _stream(q, y, k, normalize=True)[2] == 700
    assert _stream(q, y, k, normalize=False)[2] == -1
    assert _stream(q, y, k, normalize=True, exclude=np.array([700]))[2] == 700
    # Tiny and huge rows are valid candidates, with the reference's scores.
    rs, ri, ref_bad = _reference(q64, y, 0, np.zeros(0, np.int64), True, k)
    s, i, bad = _stream(q, y, k, normalize=True)
    _check_topk(q64, y, 0, np.zeros(0, np.int64), True, k, s, i, bad, rs, ref_bad)
    # Every row bad: empty results.
    z = np.full((50, d), np.nan, np.float32)
    s, i, bad = _stream(q, z, k)
    assert bad == 0 and np.all(i == -1) and np.all(np.isneginf(s))


def test_topk_exclude_everything_and_repeated_entries():
    d, n_q, k = 20, 3, 5
    x = _corpus(300, d, np.float32, seed=2, bad_rows=False)
    q = _queries(n_q, d, seed=2).astype(np.float32)
    s, i, bad = _stream(q, x, k, exclude=np.arange(300, dtype=np.int64))
    assert np.all(i == -1) and bad == -1
    # Repeated exclude entries (more than a block's threads in one tile) are harmless.
    ex = np.sort(np.concatenate([np.repeat(np.arange(10, 20), 60), np.arange(100, 300)])).astype(np.int64)
    got = _stream(q, x, k, exclude=ex)
    want = _stream(q, x, k, exclude=np.unique(ex))
    np.testing.assert_array_equal(got[1], want[1])


def test_topk_device_corpus_kinds():
    """float64 and column-strided device corpora are converted per chunk; torch tensors are read
    through __cuda_array_interface__ / DLPack."""
    n, d, n_q, k = 700, 24, 4, 9
    x = _corpus(n, d, np.float32, seed=13, bad_rows=False)
    q = _queries(n_q, d, seed=13).astype(np.float32)
    want = _stream(q, x, k)
    for corpus in (cp.asarray(x, dtype=cp.float64), cp.asfortranarray(cp.asarray(x))):
        got = _stream(q, corpus, k)
        np.testing.assert_array_equal(got[1], want[1])
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    got = _stream(q, torch.as_tensor(x, device="cuda"), k)
    np.testing.assert_array_equal(got[1], want[1])


def test_topk_out_of_memory_shrinks_the_chunk():
    n, d, n_q, k = 20000, 64, 4, 5
    x = _corpus(n, d, np.float32, seed=5, bad_rows=False)
    q = _queries(n_q, d, seed=5).astype(np.float32)
    want = _stream(q, x, k, chunk_rows=n)
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    try:
        pool.set_limit(size=6 << 20)  # two 20000-row buffers (10 MiB) do not fit
        got = _stream(q, x, k, chunk_rows=n)
    finally:
        pool.set_limit(size=0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_topk_float16_accuracy_on_large_d():
    """Split float16 queries keep the tensor-core scores within float32 tolerance at d = 1000."""
    n, d, n_q, k = 600, 1000, 70, 20
    x = _corpus(n, d, np.float16, seed=30, bad_rows=False)
    q64 = _queries(n_q, d, seed=30)
    s, i, bad = _stream(q64.astype(np.float32), x, k)
    rs, ri, ref_bad = _reference(q64, x, 0, np.zeros(0, np.int64), True, k)
    _check_topk(q64, x, 0, np.zeros(0, np.int64), True, k, s, i, bad, rs, ref_bad)


@pytest.mark.skipif(cpp is None, reason="the CPU extension nudgefast._cpu is not built")
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
def test_topk_agrees_with_cpp_backend(dtype):
    n, d, n_q, k = 3000, 100, 11, 25
    x = _corpus(n, d, dtype, seed=17, n_dup=50)
    q64 = _twin_queries(_queries(n_q, d, seed=17), x)
    q = q64.astype(np.float32)
    exclude = np.arange(0, n, 9, dtype=np.int64)
    s, i = _empty_state(n_q, k)
    cpp_bad = cpp.topk_update(q, x, 0, exclude, True, s, i)
    got = _stream(q, x, k, exclude=exclude)
    assert got[2] == cpp_bad
    np.testing.assert_allclose(got[0], s, atol=TOPK_ATOL, rtol=0)
    # Same records except where two different records tie within rounding.
    x64 = np.asarray(x, np.float64)
    true = _true_scores(q64, x64, True)
    for r in range(n_q):
        diff = set(got[1][r]) ^ set(i[r])
        for idx in diff:
            assert abs(true[r, idx] - s[r, -1]) <= 2 * TOPK_ATOL, f"query {r}: record {idx} differs"


# ---------------------------------------------------------------------------------------------
# query_gradient


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("t", [0, 1, 301])
def test_query_gradient(dtype, t):
    rng = _rng("qg", t)
    queries = rng.standard_normal((53, 385)).astype(dtype)
    order, seg_ptr = _segments(53, t, rng)
    before = _copies(queries, order, seg_ptr)
    got = cuda.query_gradient(queries, order, seg_ptr)
    want = ref.query_gradient(queries, order, seg_ptr)
    _assert_unchanged(before, [queries, order, seg_ptr])
    assert got.dtype == np.float64 and got.shape == want.shape == (t, 385)
    # Sequential sums in double; NumPy's reduceat associates differently: rounding only.
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(got, cuda.query_gradient(queries, order, seg_ptr))


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
    got = cuda.nudge_m_intervals(*args, eps)
    _assert_unchanged(before, args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)  # same IEEE operations: bit-identical, NaN included
    assert got[2].dtype == np.bool_


def test_nudge_m_intervals_random_values_and_nan():
    rng = _rng("m-rand")
    S, G = rng.standard_normal((9, 300)), rng.standard_normal((9, 300))
    S[2, 5] = np.nan
    pair_query = rng.integers(0, 9, size=200).astype(np.int64)
    pair_pos = np.full(200, -1, np.int64)
    s_x, g_x, u_score = rng.standard_normal(200), rng.standard_normal(200), rng.standard_normal(200)
    args = (S, G, pair_query, pair_pos, s_x, g_x, u_score)
    with np.errstate(all="ignore"):
        want = ref.nudge_m_intervals(*args, 1e-8)
    got = cuda.nudge_m_intervals(*args, 1e-8)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_nudge_m_intervals_empty():
    e = np.empty(0)
    low, high, feasible = cuda.nudge_m_intervals(np.zeros((3, 0)), np.zeros((3, 0)), np.empty(0, np.int64),
                                                 np.empty(0, np.int64), e, e, e, 1e-8)
    assert low.shape == high.shape == feasible.shape == (0,)
    # No touched records: only the untouched competitor bounds gamma.
    args = (np.zeros((2, 0)), np.zeros((2, 0)), np.array([0, 1, 1]), np.full(3, -1), np.array([0.5, 0.1, 0.2]),
            np.zeros(3), np.array([0.4, 0.3, -np.inf]))
    for g, w in zip(cuda.nudge_m_intervals(*args, 1e-8), ref.nudge_m_intervals(*args, 1e-8)):
        np.testing.assert_array_equal(g, w)


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
    for i in range(0, n_b, 4):  # some queries with empty untouched slots
        cut = rng.integers(0, k_unt)
        unt_scores[i, cut:] = -np.inf
        unt_index[i, cut:] = -1
    ans_ptr = [0]
    ans = []
    for i in range(n_b):
        pool = np.concatenate([touched, unt_index[i][unt_index[i] >= 0]])
        ans.append(np.unique(rng.choice(pool, size=rng.integers(0, 8))))  # some queries with no answer
        ans_ptr.append(ans_ptr[-1] + len(ans[-1]))
    ans_index = np.concatenate(ans).astype(np.int64)
    return S, H, alpha, beta, touched, unt_scores, unt_index, np.array(ans_ptr, np.int64), ans_index


@pytest.mark.parametrize("k_val", [1, 5, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_nudge_n_sweep(k_val, seed):
    args = _n_problem(seed)
    before = _copies(*args)
    want = ref.nudge_n_sweep(*args, k_val)
    got = cuda.nudge_n_sweep(*args, k_val)
    _assert_unchanged(before, args)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got, cuda.nudge_n_sweep(*args, k_val))


def test_nudge_n_sweep_more_touched_than_a_warp_and_no_untouched():
    S, H, alpha, beta, touched, _, _, ans_ptr, ans_index = _n_problem(3, t=300, k_unt=1)
    n_b = S.shape[0]
    lists = [a[np.isin(a, touched)] for a in np.split(ans_index, ans_ptr[1:-1])]
    ans_index = np.concatenate(lists).astype(np.int64)
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    unt_s = np.full((n_b, 3), -np.inf, np.float32)
    unt_i = np.full((n_b, 3), -1, np.int64)
    args = (S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index)
    for k_val in (7, 40):
        np.testing.assert_array_equal(cuda.nudge_n_sweep(*args, k_val), ref.nudge_n_sweep(*args, k_val))


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
    got = cuda.project(E, C, alpha, beta)
    want = ref.project(E, C, alpha, beta)
    _assert_unchanged(before, [E, C, alpha, beta])
    assert got.dtype == np.float32 and got.shape == (t, 385)
    np.testing.assert_array_equal(got, want)  # float64 math in the same order, one rounding


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("k", [1, 5, 10, 14])
def test_metrics(k):
    rng = _rng("metrics", k)
    n, width = 57, 10
    retrieved = rng.integers(0, 40, size=(n, width)).astype(np.int64)
    retrieved[rng.random((n, width)) < 0.1] = -1
    ans_ptr, ans_index, ans_rel = [0], [], []
    for _ in range(n):
        a = np.unique(rng.integers(0, 40, size=rng.integers(0, 12)))  # some empty
        ans_index.append(a)
        ans_rel.append(rng.integers(0, 4, size=len(a)).astype(np.float64))  # graded, zeros included
        ans_ptr.append(ans_ptr[-1] + len(a))
    args = (retrieved, np.array(ans_ptr, np.int64), np.concatenate(ans_index).astype(np.int64),
            np.concatenate(ans_rel))
    before = _copies(*args)
    with np.errstate(all="ignore"):
        want = ref.metrics(*args, k)
    got = cuda.metrics(*args, k)
    _assert_unchanged(before, args)
    assert got.shape == (n, 3) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=METRICS_RTOL, atol=0, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(want))  # NaN only where a query has no answer


# ---------------------------------------------------------------------------------------------
# Against the CPU backend, small ops (exact)


@pytest.mark.skipif(cpp is None, reason="the CPU extension nudgefast._cpu is not built")
def test_small_ops_agree_with_cpp_backend():
    rng = _rng("cpp")
    queries = rng.standard_normal((53, 385)).astype(np.float32)
    order, seg_ptr = _segments(53, 77, rng)
    np.testing.assert_array_equal(cuda.query_gradient(queries, order, seg_ptr),
                                  cpp.query_gradient(queries, order, seg_ptr))
    args = _m_problem(5)
    for g, w in zip(cuda.nudge_m_intervals(*args, 1e-8), cpp.nudge_m_intervals(*args, 1e-8)):
        np.testing.assert_array_equal(g, w)
    args = _n_problem(4)
    np.testing.assert_array_equal(cuda.nudge_n_sweep(*args, 10), cpp.nudge_n_sweep(*args, 10))
    E, C = rng.standard_normal((40, 37)).astype(np.float32), rng.standard_normal((40, 37))
    alpha, beta = rng.standard_normal(40), rng.standard_normal(40)
    np.testing.assert_array_equal(cuda.project(E, C, alpha, beta), cpp.project(E, C, alpha, beta))


# ---------------------------------------------------------------------------------------------
# The module: contract, compilation, registry


def test_backend_name_and_signatures():
    assert cuda.NAME == "cuda"
    for op in ("query_gradient", "topk_update", "nudge_m_intervals", "nudge_n_sweep", "project", "metrics"):
        assert inspect.signature(getattr(cuda, op)) == inspect.signature(getattr(ref, op)), op
    params = inspect.signature(cuda.topk_stream).parameters
    assert list(params)[:3] == ["queries", "corpus", "k"]
    for name in ("exclude", "normalize", "chunk_rows", "n_threads", "progress", "row_offset", "state"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name


def test_registry_reports_cuda_available():
    import nudgefast

    info = nudgefast.backends()["cuda"]
    assert info.available, info.reason


def _run_every_op():
    rng = _rng("every-op")
    queries = rng.standard_normal((20, 33)).astype(np.float32)
    order, seg_ptr = _segments(20, 9, rng)
    cuda.query_gradient(queries, order, seg_ptr)
    cuda.nudge_m_intervals(*_m_problem(0), 1e-8)
    cuda.nudge_n_sweep(*_n_problem(0), 5)
    cuda.project(queries, queries, np.ones(20), np.ones(20))
    cuda.metrics(np.zeros((2, 3), np.int64), np.array([0, 1, 1]), np.array([0]), np.array([1.0]), 3)
    x = _corpus(500, 33, np.float32, seed=1, bad_rows=False)
    for dtype in (np.float32, np.float16):
        for k in (5, KMAX + 1):
            _stream(queries, x.astype(dtype), k)


def test_modules_compile_once_per_process():
    _run_every_op()
    count = cuda._COMPILE_COUNT
    assert count == len(cuda._MODULES) <= len(list(cuda._SOURCE_DIR.glob("*.cu")))
    _run_every_op()
    assert cuda._COMPILE_COUNT == count, "a module was compiled again"
