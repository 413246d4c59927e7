"""The estimators and search on every backend against the NumPy float64 reference."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import THREADED, awkward, real_dataset_params
from nudgefast import NudgeM, NudgeN, QuerySet, datasets, metrics, search
from nudgefast.nudge import most_covered_gamma


def _reference(cls, ds, **kw):
    return cls(backend="numpy", precision="float64", **kw).fit(ds.corpus, ds.train, ds.dev)


def _assert_same_result(ours, ref, rtol_gamma):
    assert ours.gamma == pytest.approx(ref.gamma, rel=rtol_gamma, abs=1e-7)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    assert ours.vectors.dtype == np.float32 and ours.vectors.shape == ref.vectors.shape
    np.testing.assert_allclose(ours.vectors, ref.vectors, atol=2e-5 * max(1.0, ref.gamma))


@pytest.mark.parametrize("seed,n,d", [(0, 1237, 37), (1, 997, 64), (2, 311, 5)])
def test_nudge_n_matches_reference(backend, seed, n, d):
    ds = awkward(n=n, d=d, seed=seed)
    ref = _reference(NudgeN, ds, k_val=3)
    ours = NudgeN(backend=backend, k_val=3, chunk_rows=200).fit(ds.corpus, ds.train, ds.dev)
    _assert_same_result(ours, ref, 0)
    np.testing.assert_allclose(ours.val_accuracy, ref.val_accuracy, atol=1e-12)


@pytest.mark.parametrize("rule", ["midpoint", "left"])
@pytest.mark.parametrize("seed,n,d", [(0, 1237, 37), (3, 503, 9)])
def test_nudge_m_matches_reference(backend, rule, seed, n, d):
    ds = awkward(n=n, d=d, seed=seed)
    ref = _reference(NudgeM, ds, gamma_rule=rule)
    ours = NudgeM(backend=backend, gamma_rule=rule, chunk_rows=333).fit(ds.corpus, ds.train,
                                                                         ds.dev)
    _assert_same_result(ours, ref, 1e-6)


@pytest.mark.parametrize("cls", [NudgeN, NudgeM])
def test_fit_is_deterministic_and_leaves_inputs_alone(backend, cls, tmp_path):
    ds = awkward(n=800, d=21, seed=9)
    path = tmp_path / "corpus.npy"
    np.save(path, ds.corpus.astype(np.float32))
    corpus = np.load(path, mmap_mode="r")  # read-only memmap: any write would raise
    train_emb = ds.train.embeddings.copy()
    answers = [list(a) for a in ds.train.answers]
    first = cls(backend=backend).fit(corpus, ds.train, ds.dev)
    again = cls(backend=backend).fit(corpus, ds.train, ds.dev)
    assert first.gamma == again.gamma
    np.testing.assert_array_equal(first.vectors, again.vectors)
    np.testing.assert_array_equal(ds.train.embeddings, train_emb)
    assert [list(a) for a in ds.train.answers] == answers
    np.testing.assert_array_equal(np.load(path), ds.corpus.astype(np.float32))


def test_float16_corpus(backend):
    ds = awkward(n=600, d=24, seed=11)
    half = ds.corpus.astype(np.float16)
    ds.corpus = half.astype(np.float64)  # the reference sees the same values
    ref = _reference(NudgeN, ds)
    ours = NudgeN(backend=backend).fit(half, ds.train, ds.dev)
    _assert_same_result(ours, ref, 0)


@pytest.mark.parametrize("backend", THREADED)  # numpy and cuda ignore n_threads
def test_threads_do_not_change_results(backend):
    ds = awkward(n=900, d=19, seed=12)
    one = NudgeN(backend=backend, n_threads=1).fit(ds.corpus, ds.train, ds.dev)
    two = NudgeN(backend=backend, n_threads=2).fit(ds.corpus, ds.train, ds.dev)
    assert one.gamma == two.gamma
    np.testing.assert_array_equal(one.vectors, two.vectors)
    np.testing.assert_array_equal(one.val_accuracy, two.val_accuracy)


def test_apply_and_search_with_delta_agree(backend):
    """search(..., delta) over base + delta equals a brute force over apply()'s tuned copy."""
    ds = awkward(n=700, d=17, seed=13)
    for cls in (NudgeN, NudgeM):
        res = cls(backend=backend).fit(ds.corpus, ds.train, ds.dev)
        tuned = res.apply(ds.corpus)
        assert tuned.shape == ds.corpus.shape and tuned.dtype == np.float32
        q = ds.test.embeddings
        got = search(q, ds.corpus, 12, res, backend=backend)
        scores = q.astype(np.float64) @ tuned.astype(np.float64).T
        want = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores),
                          axis=1)[:, :12]
        np.testing.assert_allclose(got.scores, np.take_along_axis(scores, want, 1), atol=2e-5)
        # Ties allowed: every returned record scores what the reference's record at that rank does.
        np.testing.assert_allclose(np.take_along_axis(scores, got.indices, 1),
                                   np.take_along_axis(scores, want, 1), atol=2e-5)


def test_search_ties_and_k_beyond_answers(backend):
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((301, 7)).astype(np.float32)
    corpus[200:] = corpus[:101]  # exact duplicates: equal scores, lower index first
    q = rng.standard_normal((13, 7)).astype(np.float32)
    res = search(q, corpus, 301, backend=backend, chunk_rows=64)
    ref = search(q, corpus, 301, backend="numpy", chunk_rows=301)
    np.testing.assert_allclose(res.scores, ref.scores, atol=1e-5)
    assert np.all(np.sort(res.indices, axis=1) == np.arange(301))
    for row_s, row_i in zip(res.scores, res.indices):
        for a, b in zip(range(300), range(1, 301)):
            if row_s[a] == row_s[b]:
                assert row_i[a] < row_i[b]


def test_search_excluded_rows_pad_with_minus_one():
    from nudgefast.search import topk_pass
    from nudgefast._backends import get
    corpus = np.eye(5, dtype=np.float32)
    q = np.ones((2, 5), np.float32)
    s, i = topk_pass(get("numpy"), q, corpus, 5, exclude=np.array([0, 2, 4]))
    assert list(i[0]) == [1, 3, -1, -1, -1] and np.isneginf(s[0, 2:]).all()


def test_most_covered_gamma_rules():
    low = np.array([0.0, 0.2, 0.5, 0.5])
    high = np.array([1.0, 0.6, 0.8, 0.5])  # the point interval [0.5, 0.5] never counts
    gamma, starts, counts = most_covered_gamma(low, high, "left")
    assert gamma == 0.5 and counts.max() == 3
    gamma, _, _ = most_covered_gamma(low, high, "midpoint")
    assert gamma == pytest.approx(0.55)
    assert most_covered_gamma(np.zeros(0), np.zeros(0))[0] == 0.0
    assert most_covered_gamma(np.array([0.3]), np.array([np.inf]))[0] == pytest.approx(0.6)


def test_metrics_hand_checked(backend):
    qs = QuerySet(np.ones((3, 2), np.float32), [[1, 2], [5], []], [[2.0, 1.0], [1.0], []])
    retrieved = np.array([[2, 9, 1], [7, 8, 9], [1, 2, 3]])
    with pytest.warns(UserWarning, match="no answers"):
        got = metrics(retrieved, qs, 3, backend=backend, per_query=True)
    per = got["per_query"]
    idcg = 2 + 1 / np.log2(3)
    np.testing.assert_allclose(per[0], [1.0, (1 + 2 / np.log2(4)) / idcg, 1.0])
    np.testing.assert_allclose(per[1], [0.0, 0.0, 0.0])
    assert np.isnan(per[2]).all()
    assert got["recall@3"] == pytest.approx(0.5)


def test_nudge_improves_synthetic_task(backend):
    ds = datasets.synthetic(n_records=3000, d=32, n_train=600, n_dev=150, n_test=150, seed=2)
    base = metrics(search(ds.test.embeddings, ds.corpus, 10, backend=backend).indices, ds.test)
    for cls in (NudgeN, NudgeM):
        res = cls(backend=backend).fit(ds.corpus, ds.train, ds.dev)
        tuned = metrics(search(ds.test.embeddings, ds.corpus, 10, res, backend=backend).indices,
                        ds.test)
        assert tuned["ndcg@10"] > base["ndcg@10"] + 0.02


@pytest.mark.parametrize("folder", real_dataset_params())
@pytest.mark.parametrize("cls", [NudgeN, NudgeM])
def test_real_data_matches_reference(folder, cls, backend):
    ds = datasets.load(folder)
    ref = cls(backend="numpy", precision="float64").fit(ds.corpus, ds.train, ds.dev)
    ours = cls(backend=backend).fit(ds.corpus, ds.train, ds.dev)
    _assert_same_result(ours, ref, 1e-6)


@pytest.mark.parametrize("sign", ["negative", "zero"])
def test_nudge_n_parallel_gradient_stays_finite(backend, sign):
    """A train query equal to its record's own row: c is parallel to e, and c.c - (e.c)^2 is
    rounding noise (below 0 or exactly 0 in float64). The record must not move, nothing may be
    NaN, and gamma must be what the task without that query gives (nudge-ft returns gamma 0
    there: its sqrt of a negative number is NaN; see compat's docstring)."""
    ds = datasets.synthetic(n_records=3001, d=48, n_train=600, n_dev=150, n_test=150, seed=7)
    corpus = np.asarray(ds.corpus, dtype=np.float32)
    c = corpus.astype(np.float64)
    e = c / np.linalg.norm(c, axis=1, keepdims=True)
    b = (c * c).sum(axis=1) - (e * c).sum(axis=1) ** 2
    touched = {a for ans in ds.train.answers for a in ans}
    pick = b < 0 if sign == "negative" else b == 0
    row = next(int(r) for r in np.flatnonzero(pick) if int(r) not in touched)
    train = QuerySet(np.vstack([ds.train.embeddings, corpus[row:row + 1]]),
                     list(ds.train.answers) + [[row]])
    clean = NudgeN(backend=backend).fit(corpus, ds.train, ds.dev)
    res = NudgeN(backend=backend).fit(corpus, train, ds.dev)
    assert clean.gamma > 0
    assert np.isfinite(res.vectors).all() and np.isfinite(res.val_accuracy).all()
    assert res.gamma == clean.gamma
    np.testing.assert_allclose(res.val_accuracy, clean.val_accuracy, atol=1e-12)
    pos = int(np.searchsorted(res.indices, row))
    np.testing.assert_allclose(res.vectors[pos], e[row], atol=1e-6)
