"""search / NudgeN / NudgeM over a QuantizedCorpus, every backend, through the public API.

What must hold (nudgefast/_quantized.py says why):
- ``query_precision="float32"`` ranks exactly as a float search over the dequantized rows (the
  ``DequantizedRows`` view), whatever the chunking, and within float32 rounding of
  ``QuantizedCorpus.dequantize()``'s float64 values.
- ``"int8"`` and ``"binary"`` passes equal a brute-force float64 computation of their scores
  (the int8 query weights and the Hamming distance), tie rule included; rescoring with every
  candidate kept (``k * r >= N``) equals the exact float64 top-k of the rescoring rows.
- a fit on the codes is the fit on the dequantized rows, bit for bit; its codes are the tuned
  vectors quantized with the corpus's ranges; ``apply`` writes them into the codes.
- on the real data, int8 (with rescoring) keeps >= 0.99 of float32's top-10.
"""
from __future__ import annotations

import numpy as np
import pytest

import nudgefast as nf
from conftest import BACKENDS, awkward, real_dataset_params
from nudgefast import _quantized, datasets

PRECISIONS = ["int8", "uint8", "binary", "ubinary"]
CPU = [b for b in BACKENDS if b != "cuda"]


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _codes(precision, n=1237, d=37, seed=0, n_dup=12):
    """A quantized corpus of awkward size with exact duplicate rows (ties), from rows of
    varied norms, and float queries."""
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, d)) * gen.uniform(0.5, 2.0, (n, 1))
    src = gen.choice(n, n_dup, replace=False)
    dst = gen.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    x[dst] = x[src]
    x = x.astype(np.float32)
    qc = nf.quantize(x, precision, calibration=x[: n // 2] if precision in ("int8", "uint8")
                     else None)
    q = gen.standard_normal((11, d)).astype(np.float32)
    q[:3] = x[dst[:3]]  # queries on duplicated rows: ties at the top
    return x, qc, q


def _float_rows(qc):
    """float64 rows the codes stand for: dequantize() (int8/uint8), +-1 signs (binary)."""
    if qc.precision in ("int8", "uint8"):
        return qc.dequantize(dtype=np.float64)
    bits = np.unpackbits(qc.codes.view(np.uint8) ^ np.uint8(0x80 if qc.precision == "binary"
                                                               else 0), axis=1, count=qc.d)
    return bits.astype(np.float64) * 2 - 1


def _brute(scores, k, exclude=()):
    """(scores, index) of the top-k by (score desc, index asc) of a (n_q, N) float64 matrix."""
    s = np.array(scores, dtype=np.float64)
    s[:, list(exclude)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def _check_valid_topk(result, true, k, atol):
    """``result``'s indices are a valid top-k of ``true`` (n_q, N) float64 scores: each listed
    score matches, nothing outside beats the k-th (to ``atol``), the tie rule holds."""
    idx, s = np.asarray(result.indices), np.asarray(result.scores, np.float64)
    for i in range(idx.shape[0]):
        np.testing.assert_allclose(s[i], true[i, idx[i]], atol=atol, rtol=0)
        outside = np.setdiff1d(np.arange(true.shape[1]), idx[i])
        assert true[i, outside].max() <= s[i, -1] + atol
        assert np.all((s[i, :-1] > s[i, 1:]) | ((s[i, :-1] == s[i, 1:]) & (idx[i, :-1] < idx[i, 1:])))


# ---------------------------------------------------------------------------------------------
# The three passes


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_float32_queries_rank_as_the_dequantized_corpus(backend, precision, metric):
    x, qc, q = _codes(precision)
    view = _quantized.DequantizedRows(qc)
    want = nf.search(q, view[:], 10, metric=metric, backend=backend)
    got = nf.search(q, qc, 10, metric=metric, backend=backend, query_precision="float32")
    # The same chunks as the float search over the same float32 rows: the same bits.
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(got.scores), np.asarray(want.scores))
    rows = _float_rows(qc)
    true = q.astype(np.float64) @ (_unit(rows) if metric == "cosine" else rows).T
    atol = 1e-5 * np.abs(true).max()
    # Other chunkings: a valid top-k (numpy's BLAS sums, so its ties, depend on the chunk).
    for chunk_rows in (None, 100, 1):
        got = nf.search(q, qc, 10, metric=metric, backend=backend, query_precision="float32",
                        chunk_rows=chunk_rows)
        _check_valid_topk(got, true, 10, atol)


@pytest.mark.parametrize("precision", ["int8", "uint8"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_int8_queries_pass(backend, precision, metric):
    x, qc, q = _codes(precision, d=385, n=1237)
    got = nf.search(q, qc, 10, metric=metric, backend=backend, query_precision="int8",
                    chunk_rows=300)
    # The pass's own score, brute force: integer sums of the query weights' codes and u.
    rows = _float_rows(qc)
    w = q.astype(np.float64) * qc.ranges.step.astype(np.float64)
    qcodes, qscale = _quantized.quantize_query_weights(w)
    u = qc.codes.astype(np.int64) + (128 if precision == "int8" else 0)
    true = (qcodes.astype(np.int64) @ u.T) * qscale[:, None].astype(np.float64) \
        + (q.astype(np.float64) @ qc.ranges.min.astype(np.float64))[:, None]
    if metric == "cosine":
        true = true / np.linalg.norm(rows, axis=1)[None, :]
    _check_valid_topk(got, true, 10, atol=2e-5 * np.abs(true).max())
    # ... and it approximates the exact score of the dequantized rows.
    exact = q.astype(np.float64) @ (_unit(rows) if metric == "cosine" else rows).T
    assert np.abs(true - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
@pytest.mark.parametrize("d", [37, 384, 5])
def test_hamming_pass(backend, precision, d):
    x, qc, q = _codes(precision, d=d)
    got = nf.search(q, qc, 25, backend=backend, chunk_rows=200)
    signs_q = np.where(q > 0, 1.0, -1.0)
    true = signs_q @ _float_rows(qc).T  # d - 2 * Hamming
    want_s, want_i = _brute(true, 25)
    np.testing.assert_array_equal(np.asarray(got.indices), want_i)  # integer scores: exact
    np.testing.assert_array_equal(np.asarray(got.scores), want_s.astype(np.float32))
    other = nf.quantize(x, "ubinary" if precision == "binary" else "binary")
    again = nf.search(q, other, 25, backend=backend)
    np.testing.assert_array_equal(np.asarray(again.indices), want_i)


@pytest.mark.parametrize("precision,query_precision", [("int8", "float32"), ("int8", "int8"),
                                                       ("uint8", "int8"), ("binary", "binary"),
                                                       ("ubinary", "float32")])
def test_rescoring_everything_is_the_exact_ranking(backend, precision, query_precision):
    x, qc, q = _codes(precision, n=301)
    k, n = 7, 301
    true = q.astype(np.float64) @ _unit(_float_rows(qc)).T
    got = nf.search(q, qc, k, backend=backend, query_precision=query_precision,
                    rescore_multiplier=n)  # k * r >= N: every row is rescored
    want_s, want_i = _brute(true, k)
    np.testing.assert_array_equal(np.asarray(got.indices), want_i)
    np.testing.assert_allclose(np.asarray(got.scores), want_s, rtol=1e-6, atol=1e-6)
    # Against the float corpus instead.
    got = nf.search(q, qc, k, backend=backend, query_precision=query_precision,
                    rescore_multiplier=n, rescore_corpus=x, metric="dot")
    want_s, want_i = _brute(q.astype(np.float64) @ x.astype(np.float64).T, k)
    np.testing.assert_array_equal(np.asarray(got.indices), want_i)


def test_rescoring_reads_only_candidates_and_improves_int8():
    x, qc, q = _codes("int8", n=2000, d=64)
    true = q.astype(np.float64) @ _unit(_float_rows(qc)).T
    plain = nf.search(q, qc, 10, query_precision="int8", backend="numpy")
    rescored = nf.search(q, qc, 10, query_precision="int8", rescore_multiplier=4,
                         backend="numpy")
    want = _brute(true, 10)[1]
    hit = lambda r: np.mean([len(set(a) & set(b)) for a, b in zip(np.asarray(r.indices), want)])
    assert hit(rescored) >= hit(plain)
    # Rescored scores are the exact cosine scores of the dequantized rows.
    idx = np.asarray(rescored.indices)
    np.testing.assert_allclose(np.asarray(rescored.scores), np.take_along_axis(true, idx, 1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_memmap_codes_and_exclusions(tmp_path, precision):
    x, qc, q = _codes(precision)
    path = tmp_path / "codes.npz"
    qc.save(path)
    mapped = nf.QuantizedCorpus.load(path, mmap_mode="r")
    for qp in _quantized.QUERY_PRECISIONS[precision]:
        a = nf.search(q, qc, 10, query_precision=qp, backend="cpp" if "cpp" in CPU else "numpy")
        b = nf.search(q, mapped, 10, query_precision=qp, chunk_rows=97,
                      backend="cpp" if "cpp" in CPU else "numpy")
        np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
        np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))


def test_int8_queries_with_a_constant_dimension():
    """A dimension with max == min (ST's step of 1) must not set the query's int8 scale."""
    x, _, q = _codes("int8", n=3000, d=64)
    x[:, 0] = 0.25  # constant in the corpus and so in its ranges
    qc = nf.quantize(x, "int8")
    assert qc.ranges.step[0] == 1
    backend = "cpp" if "cpp" in CPU else "numpy"
    want = np.asarray(nf.search(q, qc, 10, backend=backend).indices)
    got = np.asarray(nf.search(q, qc, 10, backend=backend, query_precision="int8").indices)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= 0.95, recall


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_rescoring_some_candidates_keeps_the_tie_rule(precision):
    """k * r < N with exact duplicates at the boundary: the rescored top-k is the exact
    ranking of the pass's candidates, ties by lower index, in float32 scores too."""
    x, qc, q = _codes(precision, n=500, d=16, n_dup=60)
    k, r = 5, 3
    passed = nf.search(q, qc, k * r, backend="numpy")
    got = nf.search(q, qc, k, backend="numpy", rescore_multiplier=r)
    rows = _float_rows(qc)
    for i in range(q.shape[0]):
        cand = np.asarray(passed.indices[i])
        exact = _unit(rows[cand]) @ q[i].astype(np.float64)
        order = np.lexsort((cand, -exact))[:k]
        np.testing.assert_array_equal(np.asarray(got.indices[i]), cand[order])
        s, idx = np.asarray(got.scores[i]), np.asarray(got.indices[i])
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (idx[:-1] < idx[1:])))


# ---------------------------------------------------------------------------------------------
# NUDGE on codes


def _fit_data(precision, seed=0):
    ds = awkward(seed=seed)
    qc = nf.quantize(ds.corpus, precision, calibration=ds.corpus if precision in ("int8", "uint8")
                     else None)
    return ds, qc


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", ["n", "m"])
def test_fit_on_codes_is_the_fit_on_dequantized_rows(backend, precision, variant):
    ds, qc = _fit_data(precision)
    est = (nf.NudgeN if variant == "n" else nf.NudgeM)(backend=backend, chunk_rows=300)
    a = est.fit(qc, ds.train, ds.dev)
    b = est.fit(_quantized.DequantizedRows(qc)[:], ds.train, ds.dev)
    assert a.gamma == b.gamma
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.val_accuracy, b.val_accuracy)
    assert b.codes is None and a.precision == precision
    # The tuned rows re-quantized at their records' scale (awkward() has rows of norm 3).
    base = _quantized.DequantizedRows(qc)[a.indices].astype(np.float64)
    scaled = a.vectors * np.linalg.norm(base, axis=1)[:, None]
    np.testing.assert_array_equal(a.codes, nf.quantize(scaled.astype(np.float32), precision,
                                                       qc.ranges).codes)
    if precision in ("int8", "uint8") and variant == "n":  # NUDGE-M's longer rows may clip
        back = nf.QuantizedCorpus(a.codes, precision, qc.d, qc.ranges).dequantize()
        cos = np.einsum("ij,ij->i", _unit(back), _unit(a.vectors))
        assert cos.min() > 0.99, cos.min()
    # Searching the codes with the delta = searching the dequantized rows with it.
    qt = ds.test.embeddings
    got = nf.search(qt, qc, 10, a, backend=backend, query_precision="float32")
    want = nf.search(qt, _quantized.DequantizedRows(qc)[:], 10, b, backend=backend)
    np.testing.assert_array_equal(np.asarray(got.indices), np.asarray(want.indices))
    np.testing.assert_array_equal(np.asarray(got.scores), np.asarray(want.scores))
    # The other pass, every row rescored (in float64, from float64 dequantized rows), merges
    # the delta too: the same top-10 up to near-ties between the two roundings.
    other = _quantized.QUERY_PRECISIONS[precision][-1]
    got = nf.search(qt, qc, 10, a, backend=backend, query_precision=other,
                    rescore_multiplier=len(qc))
    overlap = np.mean([len(set(g) & set(w)) / 10 for g, w in
                       zip(np.asarray(got.indices), np.asarray(want.indices))])
    assert overlap >= 0.98, overlap


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_apply_writes_tuned_codes(tmp_path, precision):
    ds, qc = _fit_data(precision)
    res = nf.NudgeN(backend="numpy").fit(qc, ds.train, ds.dev)
    before = qc.codes.copy()
    tuned = res.apply(qc)
    np.testing.assert_array_equal(qc.codes, before)  # the caller's codes are not touched
    assert isinstance(tuned, nf.QuantizedCorpus) and tuned.precision == precision
    untouched = np.setdiff1d(np.arange(len(qc)), res.indices)
    np.testing.assert_array_equal(tuned.codes[untouched], before[untouched])
    np.testing.assert_array_equal(tuned.codes[res.indices], res.codes)
    # out= sharing the codes' memory without being them would overwrite unread rows.
    with pytest.raises(ValueError, match="shares memory"):
        res.apply(qc, out=qc.codes[::-1])
    ro = qc.codes.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        res.apply(qc, out=ro)
    np.testing.assert_array_equal(qc.codes, before)
    # In place, into a .npy memmap of the codes.
    path = tmp_path / "codes.npy"
    np.save(path, qc.codes)
    mapped = nf.QuantizedCorpus(np.load(path, mmap_mode="r+"), precision, qc.d, qc.ranges)
    out = res.apply(mapped, out=mapped.codes, chunk_rows=100)
    assert out.codes is mapped.codes
    mapped.codes.flush()
    np.testing.assert_array_equal(np.load(path), tuned.codes)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_quantized_search_inputs():
    x, qc, q = _codes("int8")
    _, bc, _ = _codes("binary")
    cases = [
        (lambda: nf.search(q, qc, 5, query_precision="binary"), "query_precision"),
        (lambda: nf.search(q, bc, 5, query_precision="int8"), "query_precision"),
        (lambda: nf.search(q, qc, 5, rescore_multiplier=0), "rescore_multiplier"),
        (lambda: nf.search(q, qc, 5, rescore_multiplier=True), "rescore_multiplier"),
        (lambda: nf.search(q, qc, 5, rescore_multiplier=2, rescore_corpus=x[:-1]),
         "rescore_corpus"),
        (lambda: nf.search(q, qc, 5, rescore_corpus=x), "rescore_multiplier"),
        (lambda: nf.search(q, x, 5, query_precision="int8"), "query_precision"),
        (lambda: nf.search(q, x, 5, rescore_multiplier=2), "rescore_multiplier"),
        (lambda: nf.search(q[:, :-1], qc, 5), "queries"),
        (lambda: nf.search(q, qc, len(qc) + 1), "k"),
    ]
    for call, name in cases:
        with pytest.raises((ValueError, TypeError), match=name):
            call()
    ds, bq = _fit_data("binary")
    res = nf.NudgeN(backend="numpy").fit(bq, ds.train, ds.dev)
    with pytest.raises(ValueError, match="rescore_multiplier"):
        nf.search(ds.test.embeddings, bq, 5, res)
    with pytest.raises(TypeError, match="QuantizedCorpus"):
        nf.Tuner(nf.NudgeN(backend="numpy")).fit(bq, ds.train, ds.dev)


def test_bad_rescore_rows_are_named():
    x, qc, q = _codes("int8", n=200)
    for row, what in ((7, "NaN or inf"), (9, "a zero vector")):
        bad = x.copy()
        if row == 7:
            bad[row, 3] = np.nan
        else:
            bad[row] = 0.0
        with pytest.raises(ValueError, match=f"rescore_corpus: row {row} .*{what}"):
            nf.search(q, qc, 3, rescore_multiplier=200, rescore_corpus=bad, backend="numpy")


def test_query_precision_case_hint():
    _, qc, q = _codes("int8", n=50)
    with pytest.raises(ValueError, match="query_precision.*lower case"):
        nf.search(q, qc, 3, query_precision="INT8")


def test_zero_dequantized_row_is_named():
    x = np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32)
    ranges = np.vstack([np.zeros(8), np.ones(8)])
    qc = nf.quantize(np.abs(x), "uint8", ranges)
    codes = qc.codes.copy()
    codes[17] = 0  # dequantizes to min = 0: a zero vector
    qc = nf.QuantizedCorpus(codes, "uint8", 8, ranges)
    q = np.ones((2, 8), np.float32)
    for qp in ("float32", "int8"):
        with pytest.raises(ValueError, match="row 17 is a zero vector"):
            nf.search(q, qc, 3, query_precision=qp, backend="numpy")
        nf.search(q, qc, 3, query_precision=qp, metric="dot", backend="numpy")


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.parametrize("path", real_dataset_params())
def test_real_data_int8_keeps_float_top10(path):
    ds = datasets.load(path)
    q = np.asarray(ds.test.embeddings, np.float32)[:400]
    backend = "cpp" if "cpp" in CPU else "numpy"
    want = np.asarray(nf.search(q, ds.corpus, 10, backend=backend).indices)
    qc = nf.quantize(ds.corpus, "int8", calibration=ds.corpus[:: max(1, len(ds.corpus) // 5000)])
    for qp in ("float32", "int8"):
        got = np.asarray(nf.search(q, qc, 10, backend=backend, query_precision=qp,
                                   rescore_multiplier=4).indices)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
        assert recall >= 0.99, (qp, recall)
