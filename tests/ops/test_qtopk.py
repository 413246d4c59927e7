"""``qtopk_int8`` and ``qtopk_hamming`` on every backend against the float64 reference (the
contract is ``numpy_backend``'s docstring): awkward sizes (d = 1 / 7 / 37 / 384 / 385, N = 1 / 5 /
1237, n_q = 1 / 9 / 33), signed and unsigned codes, exact duplicate rows and tied scores (the
tie rule: lower index first; for Hamming ties are everywhere), zero-norm rows with
``normalize``, exclude lists (all rows included), k beyond the rows and the candidates, chunks
merged in sequence, extreme codes (no overflow up to d = 4096), a read-only memmap chunk, pad
bits, int8 and uint8 views of the same bytes, inputs unchanged, repeat runs bit-identical.

The reference runs with a float64 state, the backends with float32. What a valid int8 top-k is
(``_check``): the reference's first bad row; every kept row allowed (not excluded, not bad)
and once; its score within ``tol`` of its true score; the reference's k scores within the
query's largest ``tol``; the tie rule exactly; no row left out whose true score beats the k-th
by more than its ``tol``; a row tying a kept row's exact integer sum (dot mode) or a duplicate
of it (cosine) with a lower index kept too. ``tol`` is what float32 rounding allows (see
``_int8_truth``). Hamming scores are exact integers: results must equal the reference's bit for
bit, and the scores must equal the +-1 sign vectors' dot products.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import THREADED
from nudgefast._backends import numpy_backend as ref
from op_cases import assert_unchanged, backend_op, copies, empty_state, poisoned_allocations, rng

NO_EXCLUDE = np.zeros(0, np.int64)
U32 = 2.0 ** -24  # float32 unit roundoff
CHUNKS = [(0, 300), (300, 301), (301, 700), (700, 1100), (1100, 1237)]


@pytest.fixture
def qint8(backend):
    return backend_op(backend, "qtopk_int8")


@pytest.fixture
def qham(backend):
    return backend_op(backend, "qtopk_hamming")


# ---------------------------------------------------------------------------------------------
# Builders


def int8_problem(m, d, n_q, seed, signed=True, n_dup=12, zero_rows=True, n_twin=3):
    """A quantized corpus as the search layer builds it: ``step`` dyadic (k / 1024) and ``low =
    -step * u0`` exactly, so a row of codes ``u0`` dequantizes to zero (rows m // 3 and m // 2
    with ``zero_rows``); ``n_dup`` exact duplicate rows; queries quantized per query
    (``qcodes = round(q * step / qscale)``, ``qoffset = q . low``), the first ``n_twin`` aimed
    at duplicated rows so that exact ties reach the top-k. Returns a dict of the op's
    arguments (less row_offset, exclude, normalize, state)."""
    gen = rng("qint8", m, d, n_q, seed, signed)
    step = (gen.integers(1, 64, d) / 1024).astype(np.float32)
    u0 = gen.integers(0, 256, d)
    low = (-step.astype(np.float64) * u0).astype(np.float32)  # k * u0 / 1024: exact in float32
    assert np.all(low.astype(np.float64) + step.astype(np.float64) * u0 == 0)
    u = gen.integers(0, 256, (m, d))
    src = np.zeros(0, np.int64)
    if m > 1 and n_dup:
        n_dup = min(n_dup, m // 2)
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        u[dst] = u[src]
    if zero_rows and m > 2:
        u[[m // 3, m // 2]] = u0
    q = gen.standard_normal((n_q, d))
    x_src = low.astype(np.float64) + step.astype(np.float64) * u[src[:n_twin]]
    x_src = x_src[np.linalg.norm(x_src, axis=1) > 0]
    q[: len(x_src)] = x_src[: n_q] + 0.01 * gen.standard_normal((min(len(x_src), n_q), d))
    w = q * step
    qscale = np.maximum(np.abs(w).max(axis=1), 1e-30) / 127
    qcodes = np.clip(np.rint(w / qscale[:, None]), -127, 127).astype(np.int8)
    codes = (u - 128).astype(np.int8) if signed else u.astype(np.uint8)
    return dict(qcodes=qcodes, qscale=qscale.astype(np.float32),
                qoffset=(q @ low.astype(np.float64)).astype(np.float32), codes=codes,
                signed=signed, low=low, step=step)


def _u(codes, signed):
    return codes.astype(np.int64) + (128 if signed else 0)


def _int8_truth(p, normalize):
    """(key, true scores T, tol, allowed) over the problem's rows: the integer sums are exact
    (int64), the scores in float64. The float32 path rounds acc to float32 (u), multiplies by
    qscale (u), adds qoffset (u, relative to |P| + |qoffset|), then with ``normalize`` takes the
    float32 reciprocal of the norm (u) and multiplies (u): at most about 5u (|P| + |qoffset|) /
    |x|; ``tol`` allows 8u. A backend may accumulate the norm in float32 (the contract): a sum
    of d positive terms is within (d - 1) u relative, its square root half that, the float32
    x = low + step * u and its square adding ~2u per term; ``tol`` adds (d + 4) u / 2 * |T|.
    ``key``: what a float32 score is a function of (dot: the integer sum; cosine: the row too,
    through its norm), for the rule that equal keys rank by index."""
    u = _u(p["codes"], p["signed"])
    acc = p["qcodes"].astype(np.int64) @ u.T
    P = acc * p["qscale"].astype(np.float64)[:, None]
    qo = p["qoffset"].astype(np.float64)[:, None]
    T = P + qo
    mag = np.abs(P) + np.abs(qo)
    allowed = np.ones(u.shape[0], bool)
    if normalize:
        x = p["low"].astype(np.float64) + p["step"].astype(np.float64) * u
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))
        allowed = norms > 0
        safe = np.where(allowed, norms, 1.0)[None, :]
        T = T / safe
        mag = mag / safe
    tol = 8 * U32 * mag
    if normalize:
        tol += (u.shape[1] + 4) / 2 * U32 * np.abs(T)
    if normalize:  # equal keys: the same integer sum and the same row
        _, row_id = np.unique(u, axis=0, return_inverse=True)
        key = acc * (row_id.max(initial=0) + 1) + row_id.reshape(1, -1)
    else:
        key = acc
    return key, T, tol, allowed


def ham_problem(m, n_bits, n_q, seed, n_dup=12, n_twin=3):
    """Random sign vectors of ``n_bits`` packed by np.packbits (pad bits 0), ``n_dup`` exact
    duplicate rows, the first ``n_twin`` queries equal to duplicated rows (score n_bits).
    Returns (qbits, codes, signs of the queries, signs of the rows) as uint8 / +-1 int64."""
    gen = rng("qham", m, n_bits, n_q, seed)
    bits = gen.integers(0, 2, (m, n_bits)).astype(np.uint8)
    if m > 1 and n_dup:
        n_dup = min(n_dup, m // 2)
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        bits[dst] = bits[src]
        qsrc = src[:n_twin]
    else:
        qsrc = np.zeros(0, np.int64)
    qb = gen.integers(0, 2, (n_q, n_bits)).astype(np.uint8)
    qb[: min(len(qsrc), n_q)] = bits[qsrc[:n_q]]
    return (np.packbits(qb, axis=1), np.packbits(bits, axis=1),
            2 * qb.astype(np.int64) - 1, 2 * bits.astype(np.int64) - 1)


def _exclude(m, n, seed, extra=()):
    gen = rng("exclude", m, n, seed)
    ex = gen.choice(m, min(n, m), replace=False) if m else np.zeros(0, np.int64)
    return np.unique(np.concatenate([ex, np.asarray(extra, np.int64)])).astype(np.int64)


def _local(exclude, start, stop):
    return exclude[(exclude >= start) & (exclude < stop)] - start


# ---------------------------------------------------------------------------------------------
# Reference runs and checks


def ref_int8(p, row_offset, exclude, normalize, k, state=None):
    """The float64 reference's (scores, index, first_bad), merged into ``state``."""
    rs, ri = empty_state(p["qcodes"].shape[0], k, np.float64) if state is None else state
    with np.errstate(all="ignore"):
        bad = ref.qtopk_int8(p["qcodes"], p["qscale"], p["qoffset"], p["codes"], row_offset,
                             exclude, p["signed"], p["low"], p["step"], normalize, rs, ri)
    return rs, ri, bad


def run_int8(op, p, row_offset, exclude, normalize, k, codes=None, **kw):
    """The backend with a fresh float32 state; the inputs must come back unchanged."""
    codes = p["codes"] if codes is None else codes
    args = [p["qcodes"], p["qscale"], p["qoffset"], codes, p["low"], p["step"], exclude]
    before = copies(*args)
    s, i = empty_state(p["qcodes"].shape[0], k)
    bad = op(p["qcodes"], p["qscale"], p["qoffset"], codes, row_offset, exclude, p["signed"],
             p["low"], p["step"], normalize, s, i, **kw)
    assert_unchanged(before, args)
    return s, i, bad


def ref_ham(qbits, codes, row_offset, exclude, n_bits, k, state=None):
    rs, ri = empty_state(qbits.shape[0], k, np.float64) if state is None else state
    bad = ref.qtopk_hamming(qbits, codes, row_offset, exclude, n_bits, rs, ri)
    return rs, ri, bad


def run_ham(op, qbits, codes, row_offset, exclude, n_bits, k, **kw):
    args = [qbits, codes, exclude]
    before = copies(*args)
    s, i = empty_state(qbits.shape[0], k)
    bad = op(qbits, codes, row_offset, exclude, n_bits, s, i, **kw)
    assert_unchanged(before, args)
    return s, i, bad


def _check(key, T, tol, allowed, row_offset, exclude, scores, index, first_bad, want):
    """``scores``/``index`` (a backend's float32 state) are a valid top-k of the rows whose
    true scores are ``T`` (see the module docstring); ``want`` is the reference's result."""
    n_q, k = scores.shape
    assert scores.dtype == np.float32 and index.dtype == np.int64 and index.shape == (n_q, k)
    assert first_bad == want[2]
    allowed = allowed.copy()
    allowed[exclude] = False
    m = T.shape[1]
    n_valid = min(k, int(allowed.sum()))
    assert not np.isnan(scores).any(), "an output score was never written"
    for i in range(n_q):
        assert np.all(index[i, :n_valid] >= 0) and np.all(index[i, n_valid:] == -1)
        assert np.all(np.isneginf(scores[i, n_valid:]))
        idx = index[i, :n_valid] - row_offset
        s = scores[i, :n_valid].astype(np.float64)
        assert np.all((idx >= 0) & (idx < m)), "an index out of range (unwritten?)"
        assert len(np.unique(idx)) == n_valid and np.all(allowed[idx]), "a row excluded, bad or twice"
        assert np.all(np.abs(s - T[i, idx]) <= tol[i, idx]), (s, T[i, idx], tol[i, idx])
        worst = tol[i, allowed].max(initial=0.0)
        np.testing.assert_allclose(scores[i], want[0][i], atol=worst, rtol=0)
        assert np.array_equal(want[1][i] >= 0, index[i] >= 0)
        # The tie rule, exactly: score descending, then index ascending.
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (idx[:-1] < idx[1:])))
        outside = np.setdiff1d(np.flatnonzero(allowed), idx)
        if n_valid == k and outside.size:  # nothing left out beats the k-th beyond rounding
            assert np.all(T[i, outside] - tol[i, outside] <= s[-1])
        # Equal keys give bit-identical float32 scores: a kept row's equal-key rows of lower
        # index are kept too.
        for r in idx:
            lower = np.flatnonzero(allowed[:r] & (key[i, :r] == key[i, r]))
            assert np.isin(lower, idx).all(), f"query {i}: row {r} kept, its equal {lower} not"


def check_int8(p, normalize, row_offset, exclude, got, want):
    key, T, tol, allowed = _int8_truth(p, normalize)
    _check(key, T, tol, allowed, row_offset, exclude, *got, want)


def check_ham(qsign, xsign, n_bits, row_offset, exclude, got, want):
    """Exact: the reference's result bit for bit, and the scores are the sign vectors' dot
    products (n_bits - 2 * Hamming distance, pad bits contributing nothing)."""
    s, i, bad = got
    assert bad == want[2] == -1
    np.testing.assert_array_equal(i, want[1])
    np.testing.assert_array_equal(s, want[0].astype(np.float32))
    T = (qsign @ xsign.T).astype(np.float64)
    assert np.all(np.abs(T) <= n_bits)
    _check(T, T, np.zeros_like(T), np.ones(T.shape[1], bool), row_offset, exclude, s, i, bad, want)


# ---------------------------------------------------------------------------------------------
# qtopk_int8


@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
@pytest.mark.parametrize("d", [1, 7, 37, 384, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_int8_matches_reference(qint8, d, signed, normalize):
    m, n_q, k, row_offset = 1237, 9, 10, 5000
    p = int8_problem(m, d, n_q, seed=d, signed=signed)
    exclude = _exclude(m, 40, d, extra=[m // 2])  # an excluded zero row is still reported
    got = run_int8(qint8, p, row_offset, exclude, normalize, k)
    want = ref_int8(p, row_offset, exclude, normalize, k)
    check_int8(p, normalize, row_offset, exclude, got, want)
    zero = np.flatnonzero(~_int8_truth(p, True)[3])
    assert zero[0] == m // 3 or d == 1  # at d = 1 random rows hit u0 too
    assert got[2] == (row_offset + zero[0] if normalize else -1)
    # Repeat runs are bit-identical (and need nothing of np.empty's contents).
    with poisoned_allocations():
        again = run_int8(qint8, p, row_offset, exclude, normalize, k)
    np.testing.assert_array_equal(again[0], got[0])
    np.testing.assert_array_equal(again[1], got[1])
    assert again[2] == got[2]


@pytest.mark.parametrize("m", [1, 5, 1237])
@pytest.mark.parametrize("n_q", [1, 9, 33])
def test_int8_sizes(qint8, m, n_q):
    d, k = 37, 7
    exclude = _exclude(m, m // 10, n_q)
    for signed in (True, False):
        p = int8_problem(m, d, n_q, seed=m + n_q, signed=signed)
        for normalize in (True, False):
            got = run_int8(qint8, p, 3, exclude, normalize, k)
            check_int8(p, normalize, 3, exclude, got, ref_int8(p, 3, exclude, normalize, k))


@pytest.mark.parametrize("k", [1, 3, 50, 300, 1300], ids=lambda k: f"k{k}")
def test_int8_k_beyond_the_candidates(qint8, k):
    # 45 rows, 20 excluded, 2 zero rows: k exceeds the rows, the candidates, or neither.
    m, d, n_q = 45, 37, 5
    p = int8_problem(m, d, n_q, seed=k, n_dup=4)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    for normalize in (True, False):
        got = run_int8(qint8, p, 0, exclude, normalize, k)
        check_int8(p, normalize, 0, exclude, got, ref_int8(p, 0, exclude, normalize, k))


def test_int8_exact_scores_equal_the_reference(qint8):
    """qscale a power of two, qoffset a small integer, dot mode: every score is exact in
    float32, so the result is the reference's bit for bit (ties everywhere at d = 7)."""
    m, n_q, k = 1237, 9, 40
    for d in (7, 385):
        p = int8_problem(m, d, n_q, seed=70 + d)
        p["qscale"] = np.full(n_q, 0.25, np.float32)
        p["qoffset"] = np.arange(n_q, dtype=np.float32) - 4
        exclude = _exclude(m, 40, d)
        got = run_int8(qint8, p, 11, exclude, False, k)
        want = ref_int8(p, 11, exclude, False, k)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0].astype(np.float32))
        assert got[2] == want[2] == -1


def test_int8_duplicates_and_ties_follow_the_index_rule(qint8):
    # Copies of one row at awkward places (both rows of a 2-row tile, a 256-row block
    # boundary, the last rows); query aimed at it: every copy ties and ranks by index.
    m, d = 1237, 385
    for signed in (True, False):
        p = int8_problem(m, d, 4, seed=4, signed=signed, zero_rows=False)
        at = np.array([3, 254, 255, 256, 257, 700, 1235, 1236])
        p["codes"][at] = p["codes"][3]
        u = _u(p["codes"][3:4], signed)
        x = p["low"].astype(np.float64) + p["step"].astype(np.float64) * u
        # Query 0 is the row itself, quantized as the search layer does.
        w = x * p["step"]
        p["qscale"][0] = np.abs(w).max() / 127
        p["qcodes"][0] = np.clip(np.rint(w / p["qscale"][0]), -127, 127).astype(np.int8)
        p["qoffset"][0] = (x @ p["low"].astype(np.float64))[0]
        kept = at[at != 255]
        for normalize in (True, False):
            s, i, _ = run_int8(qint8, p, 0, np.array([255], np.int64), normalize, 12)
            if normalize:  # cosine: the copies rank first
                np.testing.assert_array_equal(i[0, : len(kept)], kept)
                assert np.all(s[0, : len(kept)] == s[0, 0]) and s[0, len(kept)] < s[0, 0]
            check_int8(p, normalize, 0, np.array([255], np.int64), (s, i, -1),
                       ref_int8(p, 0, np.array([255], np.int64), normalize, 12))


def test_int8_zero_norm_rows(qint8):
    """With normalize, a zero-norm row is never a candidate and the first one's global index
    is returned (excluded or not); without, it is an ordinary row."""
    m, d, n_q, k = 300, 20, 3, 300
    p = int8_problem(m, d, n_q, seed=8, zero_rows=False)
    u0 = np.rint(-p["low"].astype(np.float64) / p["step"]).astype(np.int64)
    zero = (u0 - 128).astype(np.int8)
    for r in (17, 150, 299):
        p["codes"][r] = zero
    s, i, bad = run_int8(qint8, p, 1000, NO_EXCLUDE, True, k)
    assert bad == 1017 and not np.isin(i, [1017, 1150, 1299]).any() and (i >= 0).sum() == n_q * (m - 3)
    assert run_int8(qint8, p, 1000, np.array([17], np.int64), True, k)[2] == 1017
    s, i, bad = run_int8(qint8, p, 1000, NO_EXCLUDE, False, k)
    assert bad == -1 and np.isin([1017, 1150, 1299], i[0]).all()
    # Every row zero: nothing kept, row 0 reported.
    p["codes"][:] = zero
    for ex in (NO_EXCLUDE, np.arange(m, dtype=np.int64)):
        s, i, bad = run_int8(qint8, p, 40, ex, True, 5)
        assert bad == 40 and np.all(i == -1) and np.all(np.isneginf(s))


def test_int8_exclude_everything(qint8):
    m, d, n_q, k = 300, 20, 3, 5
    p = int8_problem(m, d, n_q, seed=2)
    for normalize in (True, False):
        s, i, bad = run_int8(qint8, p, 7, np.arange(m, dtype=np.int64), normalize, k)
        assert bad == (7 + m // 3 if normalize else -1)
        assert np.all(i == -1) and np.all(np.isneginf(s))


def test_int8_chunks_merged_in_sequence(backend, qint8):
    """Chunk by chunk (row_offset, local exclude lists, a one-row chunk) equals the reference's
    stream and, bit for bit, the backend's one pass: a row's score does not depend on where the
    chunk boundaries fall (integer sums are exact, the epilogue elementwise)."""
    m, d, n_q, k = 1237, 37, 9, 25
    for signed, normalize in ((True, True), (False, False)):
        p = int8_problem(m, d, n_q, seed=11, signed=signed)
        exclude = _exclude(m, 60, 11)
        one = run_int8(qint8, p, 0, exclude, normalize, k)
        s, i = empty_state(n_q, k)
        state = empty_state(n_q, k, np.float64)
        bads = []
        for start, stop in CHUNKS:
            local = _local(exclude, start, stop)
            sub = dict(p, codes=p["codes"][start:stop])
            bads.append(qint8(p["qcodes"], p["qscale"], p["qoffset"], sub["codes"], start, local,
                              signed, p["low"], p["step"], normalize, s, i))
            state = ref_int8(sub, start, local, normalize, k, state=state)[:2]
        np.testing.assert_array_equal(s, one[0])
        np.testing.assert_array_equal(i, one[1])
        assert one[2] == min((b for b in bads if b >= 0), default=-1) == (m // 3 if normalize else -1)
        check_int8(p, normalize, 0, exclude, one, (*state, one[2]))


@pytest.mark.parametrize("d", [512, 513, 4096])
def test_int8_extremes_do_not_overflow(qint8, d):
    """Codes at -128 / 127 (u = 0 / 255) and query codes at +-127: sums up to d * 127 * 255
    (4096: 1.3e8, past float32's exact integers and far past int16) stay exact."""
    m, n_q, k = 64, 4, 8
    gen = rng("extremes", d)
    for signed in (True, False):
        lo_hi = np.array([-128, 127] if signed else [0, 255])
        codes = lo_hi[gen.integers(0, 2, (m, d))].astype(np.int8 if signed else np.uint8)
        codes[5] = lo_hi[1]  # u = 255 everywhere
        codes[6] = lo_hi[0]  # u = 0 everywhere
        qcodes = np.where(gen.integers(0, 2, (n_q, d)) == 1, 127, -127).astype(np.int8)
        qcodes[0] = 127
        qcodes[1] = -127
        step = np.full(d, 1 / 128, np.float32)
        p = dict(qcodes=qcodes, qscale=np.float32([1.0, 1.0, 0.5, 2.0 ** -20]),
                 qoffset=np.float32([0.0, 0.0, -3.0, 1.0]), codes=codes, signed=signed,
                 low=np.full(d, -1.0, np.float32), step=step)
        for normalize in (True, False):
            got = run_int8(qint8, p, 0, NO_EXCLUDE, normalize, k)
            check_int8(p, normalize, 0, NO_EXCLUDE, got, ref_int8(p, 0, NO_EXCLUDE, normalize, k))
            if not normalize:
                top = float(np.float32(d * 127 * 255))
                assert got[1][0, 0] == 5 and got[0][0, 0] == top  # +127 . 255: the largest sum
                assert got[0][1, 0] == 0.0  # -127 . u: the row of zeros scores 0, the rest below
                assert got[0][1, -1] < 0


def test_int8_read_only_memmap_chunk(qint8, tmp_path):
    m, d, n_q, k = 1237, 37, 5, 12
    p = int8_problem(m, d, n_q, seed=2)
    np.save(tmp_path / "codes.npy", p["codes"])
    mm = np.load(tmp_path / "codes.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    for normalize in (True, False):
        want = run_int8(qint8, p, 100, NO_EXCLUDE, normalize, k, codes=p["codes"][100:1100])
        got = run_int8(qint8, p, 100, NO_EXCLUDE, normalize, k, codes=mm[100:1100])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2] == want[2] == (m // 3 if normalize else -1)
        sub = dict(p, codes=p["codes"][100:1100])
        check_int8(sub, normalize, 100, NO_EXCLUDE, got, ref_int8(sub, 100, NO_EXCLUDE, normalize, k))


@pytest.mark.parametrize("backend", THREADED)
def test_int8_thread_count_does_not_change_the_result(backend):
    qint8 = backend_op(backend, "qtopk_int8")
    m, d, n_q, k = 3001, 385, 11, 17
    p = int8_problem(m, d, n_q, seed=5, n_dup=60)
    exclude = np.arange(7, m, 13, dtype=np.int64)
    runs = [run_int8(qint8, p, 77, exclude, True, k, n_threads=t) for t in (1, 2, 3, None, 1)]
    for s, i, bad in runs[1:]:
        np.testing.assert_array_equal(s, runs[0][0])
        np.testing.assert_array_equal(i, runs[0][1])
        assert bad == runs[0][2] == 77 + m // 3


def test_int8_bad_rows_reported_without_queries(qint8):
    """No queries: nothing to keep, yet every row is checked (a bad row past the first row
    block is still found)."""
    m, d = 1237, 16
    p = int8_problem(m, d, 0, seed=6)
    s, i, bad = run_int8(qint8, p, 30, NO_EXCLUDE, True, 4)
    assert bad == ref_int8(p, 30, NO_EXCLUDE, True, 4)[2] == 30 + m // 3 and s.shape == (0, 4)


def test_int8_empty_chunk(qint8):
    p = int8_problem(0, 8, 2, seed=0, zero_rows=False, n_dup=0)
    s, i, bad = run_int8(qint8, p, 0, NO_EXCLUDE, True, 3)
    assert bad == -1 and np.all(i == -1) and np.all(np.isneginf(s))


# ---------------------------------------------------------------------------------------------
# qtopk_hamming


@pytest.mark.parametrize("n_bits", [1, 7, 37, 384, 385])
def test_hamming_matches_reference(qham, n_bits):
    m, n_q, k, row_offset = 1237, 9, 10, 5000
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=n_bits)
    exclude = _exclude(m, 40, n_bits)
    got = run_ham(qham, qbits, codes, row_offset, exclude, n_bits, k)
    check_ham(qsign, xsign, n_bits, row_offset, exclude, got,
              ref_ham(qbits, codes, row_offset, exclude, n_bits, k))
    with poisoned_allocations():
        again = run_ham(qham, qbits, codes, row_offset, exclude, n_bits, k)
    np.testing.assert_array_equal(again[0], got[0])
    np.testing.assert_array_equal(again[1], got[1])


@pytest.mark.parametrize("m", [1, 5, 1237])
@pytest.mark.parametrize("n_q", [1, 9, 33])
def test_hamming_sizes(qham, m, n_q):
    n_bits, k = 61, 7
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=m + n_q)
    exclude = _exclude(m, m // 10, n_q)
    got = run_ham(qham, qbits, codes, 3, exclude, n_bits, k)
    check_ham(qsign, xsign, n_bits, 3, exclude, got, ref_ham(qbits, codes, 3, exclude, n_bits, k))


@pytest.mark.parametrize("k", [1, 3, 50, 300, 1300], ids=lambda k: f"k{k}")
def test_hamming_k_beyond_the_candidates(qham, k):
    m, n_bits, n_q = 45, 37, 5
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=k, n_dup=4)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    got = run_ham(qham, qbits, codes, 0, exclude, n_bits, k)
    check_ham(qsign, xsign, n_bits, 0, exclude, got, ref_ham(qbits, codes, 0, exclude, n_bits, k))


def test_hamming_ties_everywhere(qham):
    """Few bits, many rows: every score is shared by hundreds of rows, the index decides;
    across several chunks the merge keeps the rule."""
    m, n_bits, n_q, k = 1237, 3, 9, 300
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=3)
    exclude = _exclude(m, 100, 3)
    got = run_ham(qham, qbits, codes, 0, exclude, n_bits, k)
    want = ref_ham(qbits, codes, 0, exclude, n_bits, k)
    check_ham(qsign, xsign, n_bits, 0, exclude, got, want)
    s, i = empty_state(n_q, k)
    for start, stop in CHUNKS:
        assert qham(qbits, codes[start:stop], start, _local(exclude, start, stop), n_bits, s, i) == -1
    np.testing.assert_array_equal(s, got[0])
    np.testing.assert_array_equal(i, got[1])


def test_hamming_int8_and_uint8_views_agree(qham):
    m, n_bits, n_q, k = 1237, 385, 9, 20
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=9)
    want = run_ham(qham, qbits, codes, 0, NO_EXCLUDE, n_bits, k)
    for qv, cv in ((np.int8, np.int8), (np.int8, np.uint8), (np.uint8, np.int8)):
        got = run_ham(qham, qbits.view(qv), codes.view(cv), 0, NO_EXCLUDE, n_bits, k)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    check_ham(qsign, xsign, n_bits, 0, NO_EXCLUDE, want,
              ref_ham(qbits.view(np.int8), codes.view(np.int8), 0, NO_EXCLUDE, n_bits, k))


@pytest.mark.parametrize("n_bits", [1, 9, 63, 65, 4095])
def test_hamming_pad_bits(qham, n_bits):
    """n_bits not a multiple of 8 (or of 64): the pad bits are zero on both sides and add
    nothing; the score is the +-1 dot product over the n_bits real bits."""
    m, n_q, k = 300, 5, 9
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=n_bits)
    assert codes.shape[1] == -(-n_bits // 8)
    got = run_ham(qham, qbits, codes, 0, NO_EXCLUDE, n_bits, k)
    check_ham(qsign, xsign, n_bits, 0, NO_EXCLUDE, got, ref_ham(qbits, codes, 0, NO_EXCLUDE, n_bits, k))


def test_hamming_exclude_everything_and_empty(qham):
    qbits, codes, _, _ = ham_problem(300, 40, 3, seed=1)
    s, i, bad = run_ham(qham, qbits, codes, 0, np.arange(300, dtype=np.int64), 40, 5)
    assert bad == -1 and np.all(i == -1) and np.all(np.isneginf(s))
    s, i, bad = run_ham(qham, qbits, codes[:0], 0, NO_EXCLUDE, 40, 5)
    assert bad == -1 and np.all(i == -1) and np.all(np.isneginf(s))


def test_hamming_read_only_memmap_chunk(qham, tmp_path):
    m, n_bits, n_q, k = 1237, 385, 5, 12
    qbits, codes, qsign, xsign = ham_problem(m, n_bits, n_q, seed=2)
    np.save(tmp_path / "bits.npy", codes.view(np.int8))
    mm = np.load(tmp_path / "bits.npy", mmap_mode="r")
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    got = run_ham(qham, qbits, mm[100:1100], 100, NO_EXCLUDE, n_bits, k)
    check_ham(qsign, xsign[100:1100], n_bits, 100, NO_EXCLUDE, got,
              ref_ham(qbits, codes[100:1100], 100, NO_EXCLUDE, n_bits, k))


@pytest.mark.parametrize("backend", THREADED)
def test_hamming_thread_count_does_not_change_the_result(backend):
    qham = backend_op(backend, "qtopk_hamming")
    m, n_bits, n_q, k = 3001, 96, 11, 17
    qbits, codes, _, _ = ham_problem(m, n_bits, n_q, seed=5, n_dup=60)
    exclude = np.arange(7, m, 13, dtype=np.int64)
    runs = [run_ham(qham, qbits, codes, 77, exclude, n_bits, k, n_threads=t) for t in (1, 2, 3, None, 1)]
    for s, i, bad in runs[1:]:
        np.testing.assert_array_equal(s, runs[0][0])
        np.testing.assert_array_equal(i, runs[0][1])
        assert bad == -1


def test_signatures(backend):
    backend_op(backend, "qtopk_int8")
    backend_op(backend, "qtopk_hamming")
