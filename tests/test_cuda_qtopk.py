"""The CUDA backend's top-k over quantized codes (``qtopk_int8``, ``qtopk_hamming``; kernels in
csrc/cuda/qtopk.cu) against the reference (numpy_backend, the spec) on awkward sizes.

What "matches" means here: non-normalized int8 scores and Hamming scores are computed with the
reference's own float32 roundings (no FMA), so the merged state (scores, indices, first bad row)
must be bit-identical to the reference's, the tie rule included. Normalized int8 scores divide by
a float64 norm whose summation order differs from NumPy's einsum, so a score may differ by one
ulp (rarely): those cases are checked as a valid top-k within a tolerance (check_valid_topk), and
the scores must still be identical almost everywhere.

Every test carries the ``gpu`` mark; the module skips cleanly without CuPy or a visible CUDA
device (the registry's reason), like tests/test_cuda.py. Device outputs come from a memory pool
poisoned with NaN first.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast import _backends

if not _backends.backends()["cuda"].available:
    pytest.skip(_backends.backends()["cuda"].reason, allow_module_level=True)

import cupy as cp  # noqa: E402  (after the skip)

from conftest import poison_device_pool  # noqa: E402
from nudgefast._backends import cuda_backend as cuda  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import empty_state, rng  # noqa: E402

pytestmark = pytest.mark.gpu

KMAX = cuda.LAUNCH["QTOPK"]["KMAX"]


@pytest.fixture(autouse=True)
def poisoned_pool():
    poison_device_pool()
    yield


# ---------------------------------------------------------------------------------------------
# Problems


def int8_problem(n_q, m, d, signed, seed, n_dup=0, n_zero=0, extreme=False):
    """Random codes with ``n_dup`` exact duplicate rows (ties) and ``n_zero`` rows whose
    dequantized row is exactly zero (``low = -step * u0`` per dimension, exact in float32 and
    float64), and queries in the search layer's form (int8 in [-127, 127], float32 scale and
    offset). Returns (qcodes, qscale, qoffset, codes, low, step, zero_rows)."""
    gen = rng("qtopk-int8", n_q, m, d, signed, seed)
    u = gen.integers(0, 256, size=(m, d))
    if extreme:
        u[:] = 255
        u[1::3] = 0
    if n_dup and m > 1:
        n_dup = min(n_dup, m // 2)
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        u[dst] = u[src]
    step = (gen.integers(1, 9, size=d) * 2.0 ** -7).astype(np.float32)
    u0 = gen.integers(0, 256, size=d)
    low = (-step.astype(np.float64) * u0).astype(np.float32)  # exact: small integer x power of two
    zero_rows = np.zeros(0, np.int64)
    if n_zero and m > 0:
        zero_rows = np.sort(gen.choice(m, min(n_zero, m), replace=False))
        u[zero_rows] = u0
    codes = (u - 128).astype(np.int8) if signed else u.astype(np.uint8)
    if extreme:
        qcodes = np.where(gen.random((n_q, d)) < 0.5, -127, 127).astype(np.int8)
        qcodes[0] = 127
    else:
        qcodes = gen.integers(-127, 128, size=(n_q, d)).astype(np.int8)
    qscale = gen.uniform(1e-3, 2e-2, size=n_q).astype(np.float32)
    qoffset = gen.normal(size=n_q).astype(np.float32)
    return qcodes, qscale, qoffset, codes, low, step, zero_rows


def hamming_problem(n_q, m, n_bits, seed, n_dup=0, packed_dtype=np.uint8):
    """Packed sign bits (np.packbits: pad bits 0) of random vectors, with duplicate rows."""
    gen = rng("qtopk-hamming", n_q, m, n_bits, seed)
    x = gen.standard_normal((m, n_bits)) > 0
    if n_dup and m > 1:
        n_dup = min(n_dup, m // 2)
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        x[dst] = x[src]
    q = gen.standard_normal((n_q, n_bits)) > 0
    codes = np.packbits(x, axis=1).view(packed_dtype)
    qbits = np.packbits(q, axis=1).view(packed_dtype)
    return np.ascontiguousarray(qbits), np.ascontiguousarray(codes)


def some_exclude(m, seed):
    gen = rng("qtopk-exclude", m, seed)
    if m <= 1:
        return np.zeros(0, np.int64)
    ex = gen.choice(m, size=max(1, m // 13), replace=True)
    return np.sort(ex).astype(np.int64)  # sorted, with repeats (harmless)


#: No exclusion. Not None: the reference reads ``drop[None] = True`` as every row (see the report
#: of 2026-11-26); the search layer always passes an array.
NONE = np.zeros(0, np.int64)


def run_int8(module, prob, k, row_offset, exclude, signed, normalize, state=None, codes=None):
    qcodes, qscale, qoffset, host_codes, low, step, _ = prob
    n_q = qcodes.shape[0]
    s, i = empty_state(n_q, k) if state is None else (state[0].copy(), state[1].copy())
    bad = module.qtopk_int8(qcodes, qscale, qoffset, host_codes if codes is None else codes, row_offset,
                            exclude, signed, low, step, normalize, s, i)
    return s, i, bad


def run_hamming(module, qbits, codes, k, row_offset, exclude, n_bits, state=None):
    s, i = empty_state(qbits.shape[0], k) if state is None else (state[0].copy(), state[1].copy())
    bad = module.qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, s, i)
    return s, i, bad


def assert_same(got, want, what=""):
    np.testing.assert_array_equal(got[0], want[0], err_msg=f"scores {what}")
    np.testing.assert_array_equal(got[1], want[1], err_msg=f"index {what}")
    assert got[2] == want[2], f"first bad row {what}: {got[2]} != {want[2]}"


def int8_true_scores(prob, signed, normalize):
    """The reference's full (n_q, m) float32 score matrix and the bad-row mask."""
    qcodes, qscale, qoffset, codes, low, step, _ = prob
    u = codes.astype(np.int64) + (128 if signed else 0)
    acc = qcodes.astype(np.int64) @ u.T
    scores = acc.astype(np.float32) * qscale[:, None] + qoffset[:, None]
    bad = np.zeros(codes.shape[0], bool)
    if normalize:
        norms = ref._dequantized_norms(codes, signed, low, step)
        bad = norms == 0
        with np.errstate(divide="ignore", invalid="ignore"):
            scores = scores / norms.astype(np.float32)[None, :]
    return scores, bad


def check_valid_topk(got, want, true, bad, exclude, row_offset, rtol=1e-6):
    """``got`` is a valid top-k of ``true`` (scores within ``rtol`` of the reference's, the tie
    rule exactly, no bad or excluded row, every slot written) and agrees with ``want`` to
    rounding; the first bad row is the reference's exactly."""
    s, i, first_bad = got
    assert first_bad == want[2]
    n_q, k = s.shape
    allowed = ~bad.copy()
    allowed[exclude] = False
    n_valid = min(k, int(allowed.sum()))
    assert not np.isnan(s).any(), "an output score was never written"
    atol = rtol * max(1.0, float(np.abs(true[:, allowed]).max(initial=1.0)))
    for q in range(n_q):
        assert np.all(i[q, :n_valid] >= 0) and np.all(i[q, n_valid:] == -1)
        assert np.all(np.isneginf(s[q, n_valid:]))
        idx = i[q, :n_valid] - row_offset
        sc = s[q, :n_valid]
        assert len(np.unique(idx)) == n_valid and np.all(allowed[idx])
        np.testing.assert_allclose(sc, true[q, idx], atol=atol, rtol=0)
        np.testing.assert_allclose(s[q], want[0][q], atol=atol, rtol=0)
        assert np.all((sc[:-1] > sc[1:]) | ((sc[:-1] == sc[1:]) & (idx[:-1] < idx[1:]))), "tie rule"
        if n_valid == k and allowed.sum() > k:
            outside = np.setdiff1d(np.flatnonzero(allowed), idx)
            assert true[q, outside].max() <= sc[-1] + atol


# ---------------------------------------------------------------------------------------------
# int8


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cos"])
@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
@pytest.mark.parametrize("d", [1, 7, 37, 384, 385])
def test_int8_matches_reference_over_d(d, signed, normalize):
    """Every d tail (d % 4 = 0..3, one slice or many), duplicate rows, zero rows, an exclude list
    with repeats, a nonzero row offset."""
    n_q, m, k, row_offset = 33, 1237, 10, 5000
    prob = int8_problem(n_q, m, d, signed, seed=d, n_dup=40, n_zero=3)
    ex = some_exclude(m, d)
    want = run_int8(ref, prob, k, row_offset, ex, signed, normalize)
    got = run_int8(cuda, prob, k, row_offset, ex, signed, normalize)
    if not normalize:
        assert_same(got, want)
        return
    true, bad = int8_true_scores(prob, signed, normalize)
    # The first zero row (d = 1: random rows are zero too, 1 in 256).
    assert got[2] == row_offset + np.flatnonzero(bad)[0] == want[2]
    check_valid_topk(got, want, true, bad, ex, row_offset)
    assert np.mean(got[0] == want[0]) > 0.99


@pytest.mark.parametrize("n_q,m,k", [(1, 1, 1), (1, 5, 10), (9, 5, 3), (9, 1237, 1), (33, 1237, 100),
                                     (1000, 1237, 10), (9, 100_000, 10), (1, 100_000, 100),
                                     (4, 1237, 2000), (9, 3000, KMAX + 1)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
def test_int8_matches_reference_over_sizes(n_q, m, k, signed):
    """k > m, k = 1, several query blocks (n_q = 1000), many row splits (m = 100,000), k above
    qtopk_select's KMAX (the sort-key path). Bit-identical (no normalize)."""
    d = 37
    prob = int8_problem(n_q, m, d, signed, seed=m + k, n_dup=min(25, m // 2))
    ex = some_exclude(m, k)
    want = run_int8(ref, prob, k, 0, ex, signed, False)
    got = run_int8(cuda, prob, k, 0, ex, signed, False)
    assert_same(got, want)


@pytest.mark.parametrize("k", [10, KMAX + 5], ids=["select", "keys"])
def test_int8_normalize_sizes_and_zero_rows(k):
    """Zero rows never candidates (excluded or not), the first one reported; k > the number of
    valid rows leaves empty slots."""
    n_q, m, d = 9, 1500, 48
    prob = int8_problem(n_q, m, d, True, seed=3, n_dup=30, n_zero=20)
    zero = prob[6]
    ex = np.sort(np.concatenate([zero[:5], some_exclude(m, 3)]))
    want = run_int8(ref, prob, k, 77, ex, True, True)
    got = run_int8(cuda, prob, k, 77, ex, True, True)
    assert got[2] == 77 + zero[0]
    true, bad = int8_true_scores(prob, True, True)
    assert set(np.flatnonzero(bad)) == set(zero.tolist())
    check_valid_topk(got, want, true, bad, ex, 77)
    assert not np.isin(got[1] - 77, zero).any()


def test_int8_all_rows_bad_or_excluded():
    prob = int8_problem(5, 40, 9, False, seed=8, n_zero=40)
    got = run_int8(cuda, prob, 7, 10, np.zeros(0, np.int64), False, True)
    assert got[2] == 10
    assert np.all(np.isneginf(got[0])) and np.all(got[1] == -1)
    prob = int8_problem(5, 40, 9, False, seed=8)
    got = run_int8(cuda, prob, 7, 10, np.arange(40, dtype=np.int64), False, False)
    assert got[2] == -1 and np.all(got[1] == -1)


def test_int8_extreme_codes_d4096_no_overflow():
    """d = 4096, |qcodes| = 127 and u in {0, 255}: sums up to 127 * 255 * 4096 = 132,648,960
    (int32 is enough, float32 rounds them): still bit-identical to the int64 reference."""
    n_q, m, d, k = 9, 300, 4096, 20
    for signed in (True, False):
        prob = int8_problem(n_q, m, d, signed, seed=4096, n_dup=10, extreme=True)
        acc = prob[0].astype(np.int64) @ (prob[3].astype(np.int64) + (128 if signed else 0)).T
        assert np.abs(acc).max() == 127 * 255 * 4096  # query 0 (all 127) against a row of 255s
        want = run_int8(ref, prob, k, 0, NONE, signed, False)
        got = run_int8(cuda, prob, k, 0, NONE, signed, False)
        assert_same(got, want, f"signed={signed}")
        want = run_int8(ref, prob, k, 0, NONE, signed, True)
        got = run_int8(cuda, prob, k, 0, NONE, signed, True)
        true, bad = int8_true_scores(prob, signed, True)
        check_valid_topk(got, want, true, bad, np.zeros(0, np.int64), 0)


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cos"])
def test_int8_host_memmap_cupy_and_misaligned_chunks_agree(normalize, tmp_path):
    """The same codes from a host array, a memmap slice, a CuPy array and a CuPy view whose rows
    are not 4-byte aligned (byte loads): identical results."""
    n_q, m, d, k = 9, 2000, 64, 12
    prob = int8_problem(n_q, m + 1, d, True, seed=64, n_dup=20, n_zero=2)
    codes = prob[3]
    ex = some_exclude(m, 64)
    path = tmp_path / "codes.npy"
    np.save(path, codes)
    mm = np.load(path, mmap_mode="r")
    sub = (*prob[:3], codes[1:], *prob[4:])
    want = run_int8(cuda, sub, k, 0, ex, True, normalize)
    wide = cp.zeros(((m + 1) * d + 1,), dtype=cp.int8)
    wide[1:] = cp.asarray(codes).reshape(-1)
    misaligned = wide[1:].reshape(m + 1, d)[1:]  # base 1 + d bytes past an allocation
    assert misaligned.data.ptr % 4 != 0 and misaligned.flags.c_contiguous
    runs = {"memmap slice": mm[1:], "cupy": cp.asarray(codes[1:]), "cupy misaligned": misaligned,
            "repeat": codes[1:]}
    for name, c in runs.items():
        assert_same(run_int8(cuda, sub, k, 0, ex, True, normalize, codes=c), want, name)
    if not normalize:
        assert_same(want, run_int8(ref, sub, k, 0, ex, True, normalize), "reference")


@pytest.mark.parametrize("normalize", [False, True], ids=["dot", "cos"])
def test_int8_chunks_in_sequence_with_row_offsets(normalize):
    """A corpus fed as chunks (row offsets, chunk-local exclude lists) through the running state,
    host and CuPy chunks mixed, equals the reference fed the same way."""
    n_q, m, d, k = 33, 3000, 37, 15
    prob = int8_problem(n_q, m, d, False, seed=31, n_dup=60, n_zero=4)
    ex = some_exclude(m, 31)
    bounds = [0, 1, 700, 701, 1900, m]
    want_state = empty_state(n_q, k)
    got_state = empty_state(n_q, k)
    want_bad = got_bad = -1
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        local = ex[(ex >= a) & (ex < b)] - a
        part = (*prob[:3], prob[3][a:b], *prob[4:])
        w = run_int8(ref, part, k, a, local, False, normalize, state=want_state)
        g = run_int8(cuda, part, k, a, local, False, normalize, state=got_state,
                     codes=cp.asarray(prob[3][a:b]) if c % 2 else None)
        want_state, got_state = w[:2], g[:2]
        assert g[2] == w[2], f"chunk {a}:{b}"
        want_bad = w[2] if want_bad < 0 else want_bad
        got_bad = g[2] if got_bad < 0 else got_bad
    if normalize:
        true, bad = int8_true_scores(prob, False, True)
        check_valid_topk((*got_state, got_bad), (*want_state, want_bad), true, bad, ex, 0)
    else:
        assert_same((*got_state, got_bad), (*want_state, want_bad))


def test_int8_several_launch_blocks(monkeypatch):
    """Rows per launch capped at 100 (as a small memory budget would): the block loop, its
    exclude slices and first-bad bases, and the state carried between blocks."""
    n_q, m, d, k = 9, 1237, 21, 10
    prob = int8_problem(n_q, m, d, True, seed=100, n_dup=30, n_zero=3)
    ex = some_exclude(m, 100)
    want = run_int8(cuda, prob, k, 3, ex, True, False)
    monkeypatch.setattr(cuda, "_qtopk_rows", lambda *a: 100)
    for normalize in (False, True):
        got = run_int8(cuda, prob, k, 3, ex, True, normalize)
        ref_got = run_int8(ref, prob, k, 3, ex, True, normalize)
        if normalize:
            true, bad = int8_true_scores(prob, True, True)
            check_valid_topk(got, ref_got, true, bad, ex, 3)
        else:
            assert_same(got, ref_got)
            assert_same(got, want)
    big_k = run_int8(cuda, prob, KMAX + 1, 3, ex, True, False)
    assert_same(big_k, run_int8(ref, prob, KMAX + 1, 3, ex, True, False), "keys path")


def test_int8_state_continues_and_inputs_are_unchanged():
    n_q, m, d, k = 9, 800, 19, 8
    prob = int8_problem(n_q, m, d, True, seed=5, n_dup=20)
    before = [np.array(a, copy=True) for a in prob[:6]]
    gen = rng("qtopk-state")
    state_s = np.sort(gen.normal(size=(n_q, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    state_i = np.tile(np.arange(k, dtype=np.int64), (n_q, 1))
    state_s[0, 3:] = -np.inf  # a partly empty state
    state_i[0, 3:] = -1
    state = (state_s, state_i)
    want = run_int8(ref, prob, k, 1000, NONE, True, False, state=state)
    got = run_int8(cuda, prob, k, 1000, NONE, True, False, state=state)
    assert_same(got, want)
    for b, a in zip(before, prob[:6]):
        np.testing.assert_array_equal(a, b)


def test_int8_degenerate_shapes():
    prob = int8_problem(3, 10, 5, True, seed=1, n_zero=2)
    empty = (*prob[:3], prob[3][:0], *prob[4:])
    assert run_int8(cuda, empty, 4, 0, NONE, True, True)[2] == -1
    no_q = (prob[0][:0], prob[1][:0], prob[2][:0], *prob[3:])
    s, i = empty_state(0, 4)
    assert cuda.qtopk_int8(*no_q[:4], 7, NONE, True, prob[4], prob[5], True, s, i) == 7 + prob[6][0]


# ---------------------------------------------------------------------------------------------
# Hamming


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["ubinary", "binary"])
@pytest.mark.parametrize("n_bits", [1, 7, 14, 23, 37, 50, 384, 385, 4096])
def test_hamming_matches_reference_over_widths(n_bits, dtype):
    """w = ceil(d / 8) bytes: 1, 1, 2, 3, 5, 7, 48, 49, 512 (every w % 4: a byte read past the
    row's end would count in the popcount), duplicates, exclude."""
    n_q, m, k = 33, 1237, 10
    qbits, codes = hamming_problem(n_q, m, n_bits, seed=n_bits, n_dup=50, packed_dtype=dtype)
    ex = some_exclude(m, n_bits)
    want = run_hamming(ref, qbits, codes, k, 42, ex, n_bits)
    got = run_hamming(cuda, qbits, codes, k, 42, ex, n_bits)
    assert_same(got, want)
    assert got[2] == -1


@pytest.mark.parametrize("n_q,m,k", [(1, 1, 1), (1, 5, 10), (9, 5, 3), (33, 1237, 100), (1000, 1237, 10),
                                     (9, 100_000, 10), (4, 1237, 2000), (9, 3000, KMAX + 1)],
                         ids=lambda v: str(v))
def test_hamming_matches_reference_over_sizes(n_q, m, k):
    """Hamming scores take few values: masses of exact ties, resolved by index."""
    n_bits = 37
    qbits, codes = hamming_problem(n_q, m, n_bits, seed=m + k, n_dup=min(25, m // 2))
    ex = some_exclude(m, k)
    want = run_hamming(ref, qbits, codes, k, 0, ex, n_bits)
    got = run_hamming(cuda, qbits, codes, k, 0, ex, n_bits)
    assert_same(got, want)


def test_hamming_extreme_and_device_chunks_in_sequence(tmp_path):
    """Rows equal to and opposite the query (scores +-n_bits), d = 4096; host, memmap and CuPy
    chunks in sequence with row offsets."""
    n_q, m, n_bits, k = 9, 900, 4096, 12
    qbits, codes = hamming_problem(n_q, m, n_bits, seed=7, n_dup=30)
    codes[5] = qbits[0]
    codes[6] = ~qbits[0]
    got = run_hamming(cuda, qbits, codes, k, 0, NONE, n_bits)
    assert got[0][0, 0] == n_bits and got[1][0, 0] == 5
    assert_same(got, run_hamming(ref, qbits, codes, k, 0, NONE, n_bits))
    path = tmp_path / "codes.npy"
    np.save(path, codes)
    mm = np.load(path, mmap_mode="r")
    ex = some_exclude(m, 7)
    bounds = [0, 250, 251, 600, m]
    ws, gs = empty_state(n_q, k), empty_state(n_q, k)
    for c, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        local = ex[(ex >= a) & (ex < b)] - a
        feed = [codes[a:b], mm[a:b], cp.asarray(codes[a:b])][c % 3]
        w = run_hamming(ref, qbits, codes[a:b], k, a, local, n_bits, state=ws)
        g = run_hamming(cuda, qbits, feed, k, a, local, n_bits, state=gs)
        assert_same(g, w, f"chunk {a}:{b}")
        ws, gs = w[:2], g[:2]


def test_hamming_misaligned_device_rows():
    n_q, m, n_bits, k = 5, 700, 128, 9  # w = 16: word loads when aligned
    qbits, codes = hamming_problem(n_q, m, n_bits, seed=16)
    w = codes.shape[1]
    wide = cp.zeros((m * w + 3,), dtype=cp.uint8)
    wide[3:] = cp.asarray(codes).reshape(-1)
    misaligned = wide[3:].reshape(m, w)
    assert misaligned.data.ptr % 4 != 0
    want = run_hamming(ref, qbits, codes, k, 0, NONE, n_bits)
    assert_same(run_hamming(cuda, qbits, misaligned, k, 0, NONE, n_bits), want)
    assert_same(run_hamming(cuda, qbits, cp.asarray(codes), k, 0, NONE, n_bits), want)


# ---------------------------------------------------------------------------------------------
# Small cases the device check also runs under compute-sanitizer (memcheck, racecheck, initcheck):
# both kinds, both selection paths, byte and word loads, normalize, exclude.


@pytest.mark.parametrize("k", [7, KMAX + 2], ids=["select", "keys"])
def test_qtopk_small_for_sanitizers(k):
    n_q, m = 70, 300
    for d, signed, normalize in [(37, True, True), (40, False, False)]:
        prob = int8_problem(n_q, m, d, signed, seed=d, n_dup=10, n_zero=2)
        ex = some_exclude(m, d)
        got = run_int8(cuda, prob, k, 9, ex, signed, normalize)
        want = run_int8(ref, prob, k, 9, ex, signed, normalize)
        if normalize:
            true, bad = int8_true_scores(prob, signed, True)
            check_valid_topk(got, want, true, bad, ex, 9)
        else:
            assert_same(got, want)
    qbits, codes = hamming_problem(n_q, m, 45, seed=45, n_dup=10)
    ex = some_exclude(m, 45)
    assert_same(run_hamming(cuda, qbits, codes, k, 9, ex, 45), run_hamming(ref, qbits, codes, k, 9, ex, 45))


def test_qtopk_kernels_compile_once():
    prob = int8_problem(3, 50, 9, True, seed=2)
    run_int8(cuda, prob, 4, 0, NONE, True, True)
    count = cuda._COMPILE_COUNT
    run_int8(cuda, prob, 4, 0, NONE, True, False)
    qbits, codes = hamming_problem(3, 50, 9, seed=2)
    run_hamming(cuda, qbits, codes, 4, 0, NONE, 9)
    assert cuda._COMPILE_COUNT == count
    assert "qtopk.cu" in cuda._MODULES
