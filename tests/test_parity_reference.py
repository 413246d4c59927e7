"""Parity with the reference package ``nudge-ft`` 0.1.2 (PyTorch, CPU) through ``nudgefast.compat``.

Same gamma, tuned embeddings within 1e-5, and the same test-split recall@10 / NDCG@10 through
the whole pipeline (tune, retrieve, score), on seeded synthetic data and on every real dataset
found under ``../shared/data``.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from conftest import BACKENDS, awkward, real_dataset_params
from nudgefast import datasets, metrics, search
from nudgefast.compat import NUDGEM, NUDGEN, queries_answers_dict

torch = pytest.importorskip("torch")
nudge = pytest.importorskip("nudge", reason="install the reference: pip install --no-deps nudge-ft==0.1.2")

EMB_TOL = 1e-5


def _reference(cls, corpus, train, val, **kw):
    # The reference's torch matmuls need float32 on both sides: a float16 corpus (as the
    # shared datasets store it) is widened for it, exactly; our own code reads it as it is.
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    if kw.get("nontrain_embeddings") is not None:
        kw["nontrain_embeddings"] = np.ascontiguousarray(kw["nontrain_embeddings"], np.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints progress
        return cls(device=torch.device("cpu")).finetune_embeddings(corpus, train, val, **kw)


def _reference_gamma_m(ref, corpus, touched):
    """NUDGE-M moves a touched row by exactly gamma: read gamma back from the output."""
    j = touched[0]
    e = corpus[j].astype(np.float64) / np.linalg.norm(corpus[j].astype(np.float64))
    return float(np.linalg.norm(ref[j].astype(np.float64) - e))


def _check(variant, corpus, train, val, backend, nontrain=None, **kw):
    ref_cls, ours_cls = (nudge.NUDGEM, NUDGEM) if variant == "m" else (nudge.NUDGEN, NUDGEN)
    extra = {} if nontrain is None else {"nontrain_embeddings": nontrain}
    ref = _reference(ref_cls, corpus, train, val, **extra, **kw)
    est = ours_cls(backend=backend)
    ours = est.finetune_embeddings(corpus, train, val, **extra, **kw)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    res = est.result_
    if variant == "m":
        # The reference's interval ends are quotients of float32 score differences; on real
        # data with near-tied scores (e5: every cosine near 0.8) their relative error reaches
        # 1e-4 when gamma is small. A touched row moves by exactly gamma, so an absolute error
        # below EMB_TOL / 10 in gamma is well inside the embedding tolerance checked below.
        ref_gamma = _reference_gamma_m(ref, corpus, res.indices)
        assert res.gamma == pytest.approx(ref_gamma, rel=1e-5, abs=EMB_TOL / 10)
    # NUDGE-N: neighbouring grid gammas move touched rows by far more than EMB_TOL, so the
    # embedding check below is also the gamma check.
    np.testing.assert_allclose(ours, ref, atol=EMB_TOL, rtol=0)
    return est, ref


SYNTHETIC_CASES = {
    # name: (dataset kwargs, finetune kwargs)
    "awkward-N1237-d37": ({}, {}),
    "d385-valk5": (dict(n=2003, d=385, n_train=300, n_dev=80), {"val_k": 5}),
    "small-d3": (dict(n=301, d=3, n_train=120, n_dev=40, n_dup=5), {}),
}


@pytest.mark.parametrize("variant", ["m", "n"])
@pytest.mark.parametrize("case", list(SYNTHETIC_CASES))
def test_parity_synthetic(case, variant, backend):
    data_kw, kw = SYNTHETIC_CASES[case]
    if variant == "m":
        kw = {}
    ds = awkward(**data_kw)
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    # Records answering many queries, and a duplicated answer inside one train list (the
    # reference counts it twice in the query gradient; compat does too).
    train["q_ans_indx"][0] = train["q_ans_indx"][0] + train["q_ans_indx"][0][:1]
    _check(variant, ds.corpus, train, val, backend, **kw)


@pytest.mark.parametrize("variant", ["m", "n"])
def test_parity_nontrain_embeddings(variant, backend):
    ds = awkward(n=1500, d=29, seed=4)
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    # Put the answered records first (as the reference's README does), the rest is non-train.
    answered = sorted({a for lists in (train["q_ans_indx"], val["q_ans_indx"])
                       for l in lists for a in l})
    rest = np.setdiff1d(np.arange(ds.corpus.shape[0]), answered)
    new_row = {old: new for new, old in enumerate(answered)}
    for qs in (train, val):
        qs["q_ans_indx"] = [[new_row[a] for a in l] for l in qs["q_ans_indx"]]
    corpus = np.ascontiguousarray(ds.corpus[answered])
    nontrain = np.ascontiguousarray(ds.corpus[rest])
    assert nontrain.shape[0] > 100
    _check(variant, corpus, train, val, backend, nontrain=nontrain)


@pytest.mark.parametrize("variant", ["m", "n"])
def test_parity_fixed_gamma(variant, backend):
    ds = awkward(seed=5)
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    ref_cls, ours_cls = (nudge.NUDGEM, NUDGEM) if variant == "m" else (nudge.NUDGEN, NUDGEN)
    gamma = 0.3
    ref = _reference(ref_cls, ds.corpus, train, val, gamma=gamma)
    ours = ours_cls(backend=backend).finetune_embeddings(ds.corpus, train, val, gamma=gamma)
    np.testing.assert_allclose(ours, ref, atol=EMB_TOL, rtol=0)


# ---- the whole pipeline: tune, retrieve the test split, score ------------------------------


def _reference_retrieve(tuned, queries, k, metric):
    """The reference's retrieval (torch float32), with ties ranked by record index ascending
    (nudgefast's rule; ``torch.topk`` orders exact ties arbitrarily, and the real datasets hold
    exact duplicate records)."""
    e = torch.from_numpy(np.ascontiguousarray(tuned, dtype=np.float32))
    if metric == "cos":
        e = torch.nn.functional.normalize(e)
    q = torch.from_numpy(np.array(queries, dtype=np.float32))  # writable
    return torch.sort(q @ e.T, dim=1, descending=True, stable=True).indices[:, :k].numpy()


def _reference_metrics(retrieved, answers, relevance, k):
    """Per-query recall@k and ndcg@k as the NUDGE paper's evaluation code defines them."""
    recall, ndcg = [], []
    for top, ans, rel in zip(retrieved, answers, relevance):
        grades = dict(zip(ans, rel))
        hits = {int(x) for x in top[:k] if int(x) in set(ans)}
        recall.append(len(hits) / min(len(ans), k))
        ideal = sorted(grades.values(), reverse=True)[:k]
        idcg = sum(g / np.log2(i + 2) for i, g in enumerate(ideal))
        dcg = sum(grades.get(int(x), 0.0) / np.log2(i + 2) for i, x in enumerate(top[:k]))
        ndcg.append(dcg / idcg)
    return np.array(recall), np.array(ndcg)


def _near_tie_queries(ours, ref, embeddings, queries, metric, tol):
    """Queries whose two rankings differ; every difference must be a near-tie: at each position
    where they disagree the two records score within ``tol`` (float64 scores over
    ``embeddings``, the reference's tuned output), i.e. float32 rounding decided the order."""
    differ = np.flatnonzero((ours != ref).any(axis=1))
    if differ.size == 0:
        return differ
    e = np.asarray(embeddings, dtype=np.float64)
    if metric == "cos":
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
    q = np.asarray(queries, dtype=np.float64)[differ]
    gap = (np.take_along_axis(q @ e.T, ours[differ], axis=1)
           - np.take_along_axis(q @ e.T, ref[differ], axis=1))
    assert np.abs(gap).max() <= tol, (differ, gap)
    return differ


def _pipeline(ds, backend, k=10):
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    test = ds.test
    rel = test.relevance or [[1.0] * len(a) for a in test.answers]
    corpus = np.asarray(ds.corpus)
    ours_base = search(test.embeddings, ds.corpus, k, backend=backend)
    runs = [("none", ours_base.indices, corpus, "cos", 2e-6)]
    for variant, ref_cls, ours_cls, metric in (("nudge-m", nudge.NUDGEM, NUDGEM, "dot"),
                                               ("nudge-n", nudge.NUDGEN, NUDGEN, "cos")):
        ref = _reference(ref_cls, corpus, train, val)
        est = ours_cls(backend=backend)
        est.finetune_embeddings(ds.corpus, train, val)
        ours = search(test.embeddings, ds.corpus, k, est.result_, backend=backend)
        # Tuned embeddings agree to EMB_TOL, so scores of unit queries to 2 EMB_TOL.
        runs.append((variant, ours.indices, ref, metric, 2 * EMB_TOL + 2e-6))
    rows = []
    for name, ours_idx, ref_emb, metric, tol in runs:
        ref_idx = _reference_retrieve(ref_emb, test.embeddings, k, metric)
        ref_recall, ref_ndcg = _reference_metrics(ref_idx, test.answers, rel, k)
        ours = metrics(ours_idx, test, k, backend=backend, per_query=True)
        # Our metric kernels against the paper's formulas, on our own ranking: exact.
        own_recall, own_ndcg = _reference_metrics(ours_idx, test.answers, rel, k)
        assert ours[f"recall@{k}"] == pytest.approx(own_recall.mean(), abs=1e-9), name
        assert ours[f"ndcg@{k}"] == pytest.approx(own_ndcg.mean(), abs=1e-9), name
        # Our ranking against the reference's: identical but for near-ties, on few queries.
        differ = _near_tie_queries(ours_idx, ref_idx, ref_emb, test.embeddings, metric, tol)
        assert differ.size <= max(2, len(test) // 100), (name, differ.size)
        same = np.setdiff1d(np.arange(len(test)), differ)
        np.testing.assert_allclose(ours["per_query"][same, 0], ref_recall[same], atol=1e-12)
        np.testing.assert_allclose(ours["per_query"][same, 1], ref_ndcg[same], atol=1e-12)
        bound = differ.size / len(test) + 1e-9
        assert abs(ours[f"ndcg@{k}"] - ref_ndcg.mean()) <= bound, name
        rows.append((name, ours, (ref_recall.mean(), ref_ndcg.mean()), differ.size))
    return rows


def test_pipeline_synthetic(backend):
    ds = datasets.synthetic(n_records=4001, d=48, n_train=800, n_dev=200, n_test=200, seed=7)
    rows = _pipeline(ds, backend)
    assert rows[2][1]["ndcg@10"] > rows[0][1]["ndcg@10"]  # NUDGE-N helps on this task


@pytest.mark.parametrize("folder", real_dataset_params())
@pytest.mark.parametrize("variant", ["m", "n"])
def test_parity_real(folder, variant):
    ds = datasets.load(folder)
    _check(variant, np.asarray(ds.corpus), queries_answers_dict(ds.train), queries_answers_dict(ds.dev), BACKENDS[0])


@pytest.mark.parametrize("folder", real_dataset_params())
def test_pipeline_real(folder):
    rows = _pipeline(datasets.load(folder), BACKENDS[0])
    assert rows[2][1]["ndcg@10"] > rows[0][1]["ndcg@10"]  # NUDGE-N helps on real data


# ---- the reference's NaN trap ----------------------------------------------------------------


def _parallel_gradient_task():
    """A task where NUDGE-N should move records, plus one extra train query equal to an
    untouched record's own row: that record's query gradient c is parallel to it, so the
    reference's float32 ``c.c - (e.c)^2`` is rounding noise, negative for the chosen row."""
    ds = datasets.synthetic(n_records=3001, d=48, n_train=600, n_dev=150, n_test=150, seed=7)
    corpus = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    touched = {a for ans in ds.train.answers for a in ans}
    # The reference's arithmetic, as it runs it on the whole corpus.
    e = torch.nn.functional.normalize(torch.from_numpy(corpus))
    c = torch.from_numpy(corpus)
    b = ((c * c).sum(dim=-1) - (c * e).sum(dim=-1) ** 2).numpy()
    row = next(int(r) for r in np.flatnonzero(b < 0) if int(r) not in touched)
    train = queries_answers_dict(ds.train)
    train["q_embs"] = np.vstack([train["q_embs"], corpus[row:row + 1]])
    train["q_ans_indx"] = train["q_ans_indx"] + [[row]]
    return ds, corpus, train, queries_answers_dict(ds.dev), row


def test_reference_nan_trap_is_avoided(backend):
    ds, corpus, train, val, row = _parallel_gradient_task()
    ref = _reference(nudge.NUDGEN, corpus, train, val)
    unit = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    # The reference falls in: its sqrt of a negative number makes that row NaN for every
    # gamma > 0, torch.topk ranks the NaN row first for every validation query, and it
    # returns gamma = 0, the untuned embeddings.
    np.testing.assert_allclose(ref, unit, atol=1e-6)
    est = NUDGEN(backend=backend)
    ours = est.finetune_embeddings(corpus, train, val)
    assert np.isfinite(ours).all()
    assert est.result_.gamma > 0 and est.result_.val_accuracy.max() > est.result_.val_accuracy[0]
    # The parallel record snaps to c/|c|, which is its own direction: it does not move.
    np.testing.assert_allclose(ours[row], unit[row], atol=1e-6)
    # That extra train query moves nothing, so compat's answer is the reference's answer on
    # the task without it, where the reference does not fall in.
    clean = _reference(nudge.NUDGEN, corpus, queries_answers_dict(ds.train), val)
    assert not np.allclose(clean, unit, atol=1e-6)
    np.testing.assert_allclose(ours, clean, atol=EMB_TOL, rtol=0)
