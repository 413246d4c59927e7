"""Corrector (issue 14): old-model embeddings mapped to a new model's space, applied inside the
streaming passes. Against float64 NumPy references on awkward random data (N not a multiple
of any chunk, d_old != d_new, odd d, float16 memmaps), every backend, dask corpora, and the
real model-change datasets (``*-ft``, ``*-e5``: folders with ``stale_corpus.npy``)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import BACKENDS, REAL
from nudgefast import Corrector, NudgeM, NudgeN, QuerySet, choose_sample, metrics, search
from nudgefast import corrector as corrector_mod

CPU = [b for b in BACKENDS if b != "cuda"]
MODEL_CHANGE = [p for p in REAL if (p / "stale_corpus.npy").exists()]


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(seed=0, n=1237, d_old=37, d_new=29, noise=0.05):
    """A stale corpus and its 'fresh' embeddings: a random nonlinear map plus noise."""
    rng = np.random.default_rng(seed)
    stale = _unit(rng.standard_normal((n, d_old)))
    A = rng.standard_normal((d_old, d_new))
    fresh = _unit(stale @ A + 0.3 * np.tanh(stale @ A) + noise * rng.standard_normal((n, d_new)))
    return stale.astype(np.float32), fresh.astype(np.float32), rng


def _reference_rows(c, stale, index=None, fresh=None):
    """float64 corrected rows from the fitted parameters (the module docstring's formula)."""
    x = _unit(stale)
    y = x @ c.W0.astype(np.float64) + c.b0
    if c.W1 is not None:
        y += np.maximum(x @ c.W1.astype(np.float64) + c.b1, 0) @ c.W2.astype(np.float64)
    y = _unit(y)
    if index is not None:
        y[index] = _unit(fresh)
    return y


def _reference_topk(q, rows, k):
    s = q.astype(np.float64) @ rows.T
    order = np.lexsort((np.broadcast_to(np.arange(rows.shape[0]), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


def _same_up_to_ties(got, ref_scores, ref_index, tol=2e-5):
    """Scores within float32 rounding of the float64 reference; indices equal wherever the
    reference's neighbours are not within ``tol`` (a tie may swap)."""
    np.testing.assert_allclose(got.scores, ref_scores, atol=tol, rtol=0)
    gap = np.minimum(np.abs(np.diff(ref_scores, axis=1, prepend=np.inf)),
                     np.abs(np.diff(ref_scores, axis=1, append=-np.inf)))
    clear = gap > tol
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got.indices[clear], ref_index[clear])


def test_ridge_matches_closed_form():
    stale, fresh, _ = _pairs()
    c = Corrector(alpha=0.01).fit(stale[:400], fresh[:400])
    x, y = _unit(stale[:400]), _unit(fresh[:400])
    xc, yc = x - x.mean(0), y - y.mean(0)
    lam = 0.01 * np.trace(xc.T @ xc) / x.shape[1]
    big_x = np.vstack([xc, np.sqrt(lam) * np.eye(x.shape[1])])
    big_y = np.vstack([yc, np.zeros((x.shape[1], y.shape[1]))])
    W = np.linalg.lstsq(big_x, big_y, rcond=None)[0]
    np.testing.assert_allclose(c.W0, W, atol=2e-6)
    np.testing.assert_allclose(c.b0, y.mean(0) - x.mean(0) @ W, atol=2e-6)
    assert c.W1 is None and c.info["alpha"] == 0.01


def test_alpha_chosen_on_held_out_pairs():
    stale, fresh, _ = _pairs(seed=1)
    c = Corrector().fit(stale[:300], fresh[:300])
    scores = c.info["ridge_heldout_cos"]
    assert c.info["alpha"] == max(map(float, scores), key=lambda a: scores[str(a)])


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("kind", ["ridge", "mlp"])
def test_search_with_corrector_matches_reference(backend, kind, tmp_path):
    """search(q, stale, k, corrector=c) against the float64 reference on the corrected rows,
    with chunks smaller than the corpus and not dividing it; a float16 memmap corpus."""
    stale, fresh, rng = _pairs(seed=2)
    sample = np.sort(rng.choice(stale.shape[0], 150, replace=False))
    c = Corrector(kind, hidden=64, epochs=30).fit(stale[sample], fresh[sample], index=sample)
    np.save(tmp_path / "stale.npy", stale.astype(np.float16))
    corpus = np.load(tmp_path / "stale.npy", mmap_mode="r")
    q = _unit(rng.standard_normal((23, 29))).astype(np.float32)
    ref = _reference_rows(c, corpus, sample, fresh[sample])
    got = search(q, corpus, 13, corrector=c, backend=backend, chunk_rows=100)
    _same_up_to_ties(got, *_reference_topk(q, ref, 13))
    # the sampled records are scored by their fresh rows, exactly
    np.testing.assert_allclose(c.apply(corpus)[sample], _unit(fresh[sample]), atol=1e-6)
    np.testing.assert_allclose(c.apply(corpus), ref, atol=2e-6)


@pytest.mark.parametrize("backend", CPU)
def test_fit_with_corrector_is_fit_on_corrected_corpus(backend):
    """NudgeN/NudgeM.fit(stale, ..., corrector=c) equals the fit on c.apply(stale): same
    touched records and gamma, vectors within float32 rounding (the corrected rows differ in
    the last bit between a pass's chunk and apply's chunk: BLAS blocking)."""
    from conftest import awkward
    ds = awkward(n=1237, d=37, seed=3)
    stale = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    rng = np.random.default_rng(3)
    fresh = _unit(stale @ rng.standard_normal((37, 37)) + stale).astype(np.float32)
    sample = np.sort(rng.choice(1237, 200, replace=False))
    c = Corrector().fit(stale[sample], fresh[sample], index=sample)
    train = QuerySet(_unit(ds.train.embeddings @ np.eye(37)).astype(np.float32),
                     ds.train.answers)
    corrected = c.apply(stale)
    for est in (NudgeN(backend=backend, k_val=3), NudgeM(backend=backend)):
        a = est.fit(stale, train, ds.dev, corrector=c)
        b = est.fit(corrected, train, ds.dev)
        np.testing.assert_array_equal(a.indices, b.indices)
        assert a.gamma == pytest.approx(b.gamma, rel=1e-6, abs=1e-9)
        np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
        got = search(ds.dev.embeddings, stale, 9, delta=a, corrector=c, backend=backend)
        want = search(ds.dev.embeddings, corrected, 9, delta=b, backend=backend)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
        assert (got.indices == want.indices).mean() > 0.97


def test_dask_corpus_with_corrector(tmp_path):
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("dask.array")
    from nudgefast import _dask
    stale, fresh, rng = _pairs(seed=4)
    sample = np.sort(rng.choice(stale.shape[0], 180, replace=False))
    c = Corrector().fit(stale[sample], fresh[sample], index=sample)
    np.save(tmp_path / "stale.npy", stale)
    q = _unit(rng.standard_normal((17, 29))).astype(np.float32)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cl, distributed.Client(cl):
        x = _dask.npy_corpus([tmp_path / "stale.npy"], block_rows=301)
        got = search(q, x, 11, corrector=c)
        _same_up_to_ties(got, *_reference_topk(q, _reference_rows(c, stale, sample,
                                                                  fresh[sample]), 11))


def test_save_load_round_trip(tmp_path):
    stale, fresh, rng = _pairs(seed=5, d_old=31, d_new=40)
    sample = np.sort(rng.choice(stale.shape[0], 120, replace=False))
    for kind in ("ridge", "mlp"):
        c = Corrector(kind, hidden=32, epochs=5, old_model="old-m", new_model="new-m").fit(
            stale[sample], fresh[sample], index=sample)
        c.save(tmp_path / f"{kind}.npz")
        back = Corrector.load(tmp_path / f"{kind}.npz")
        assert (back.kind, back.d_old, back.d_new, back.old_model, back.new_model) == \
            (kind, 31, 40, "old-m", "new-m")
        np.testing.assert_array_equal(back.apply(stale), c.apply(stale))
        np.testing.assert_array_equal(back.index, sample)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable corrector"):
        Corrector.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        Corrector.load(tmp_path / "missing.npz")


def test_bad_inputs_name_the_argument():
    stale, fresh, rng = _pairs(seed=6)
    with pytest.raises(ValueError, match="kind: must be 'ridge' or 'mlp'"):
        Corrector("linear")
    with pytest.raises(ValueError, match="alpha: must be a positive number"):
        Corrector(alpha=-1.0)
    with pytest.raises(ValueError, match=r"corrector: the Corrector is not fitted; call "
                                         r"corrector\.fit"):
        search(fresh[:3], stale, 3, corrector=Corrector())
    with pytest.raises(ValueError, match="fresh: 99 rows for 100 stale rows"):
        Corrector().fit(stale[:100], fresh[:99])
    bad = stale[:100].copy()
    bad[7] = 0
    with pytest.raises(ValueError, match="stale: row 7 is a zero vector; drop or re-embed that record"):
        Corrector().fit(bad, fresh[:100])
    with pytest.raises(ValueError, match="index: corpus rows must be >= 0 and distinct"):
        Corrector().fit(stale[:100], fresh[:100], index=np.r_[0, np.arange(99)])
    c = Corrector().fit(stale[:100], fresh[:100], index=np.arange(1000, 1100))
    with pytest.raises(ValueError, match="corpus: 37 columns|corpus: 29 columns"):
        search(fresh[:3], fresh, 3, corrector=c)
    with pytest.raises(ValueError, match=r"queries: .*29|queries.*dimension|queries"):
        search(stale[:3], stale, 3, corrector=c)  # old-model queries on the corrected corpus
    with pytest.raises(ValueError, match="the corrector's sample names row 1099"):
        search(fresh[:3], stale[:500], 3, corrector=c)
    with pytest.raises(TypeError, match="corrector: expected a fitted nudgefast.Corrector"):
        search(fresh[:3], stale, 3, corrector="ridge")
    z = stale.copy()
    z[555] = 0
    with pytest.raises(ValueError, match="corpus: row 555 is a zero vector"):
        search(fresh[:3], z, 3, corrector=c)
    z[555] = np.nan
    with pytest.raises(ValueError, match="corpus: row 555 contains NaN or inf"):
        NudgeN().fit(z, (fresh[:5], [[1], [2], [3], [4], [5]]), (fresh[5:8], [[6], [7], [8]]),
                     corrector=c)
    before = stale.copy()
    c.apply(stale)
    np.testing.assert_array_equal(stale, before)  # the caller's corpus is not modified
    with pytest.raises(ValueError, match="out: expected a writable C-contiguous float32"):
        c.apply(stale, out=np.empty((10, 29), np.float32))


def test_choose_sample():
    n = 1000
    u = choose_sample(n, 0.1, seed=1)
    assert u.size == 100 and np.unique(u).size == 100 and u.min() >= 0 and u.max() < n
    assert np.array_equal(choose_sample(n, 100, seed=1), u)
    rng = np.random.default_rng(0)
    answers = [list(rng.choice(n, 3, replace=False)) for _ in range(20)] + [[5], [5], [5]]
    train = QuerySet(np.ones((23, 4), np.float32), answers)
    answered = np.unique(np.concatenate(answers))
    qa = choose_sample(n, answered.size + 5, "query-aware", train=train)
    assert set(answered) <= set(qa)  # every answer first
    small = choose_sample(n, 1, "query-aware", train=train)
    assert small.tolist() == [5]  # the record answering the most queries first
    corpus = _unit(rng.standard_normal((n, 4))).astype(np.float32)
    q = corpus[[7, 7, 7, 8]]
    rest = np.setdiff1d([7, 8], answered)
    got = choose_sample(n, answered.size + 1, "query-aware", train=train, old_queries=q,
                        corpus=corpus, k=1)
    if rest.size:  # the record the old queries retrieve most comes right after the answers
        assert rest[0] in got and set(answered) <= set(got)
    with pytest.raises(ValueError, match="budget: a fraction must be in"):
        choose_sample(n, 1.5)
    with pytest.raises(ValueError, match="budget: 2000 records of a corpus of 1000"):
        choose_sample(n, 2000)
    with pytest.raises(ValueError, match="strategy: must be 'uniform' or 'query-aware'"):
        choose_sample(n, 10, "smart")
    with pytest.raises(TypeError, match="train: the query-aware sample needs"):
        choose_sample(n, 10, "query-aware")


@pytest.mark.parametrize("folder", MODEL_CHANGE or [pytest.param(None, marks=pytest.mark.skip(
    reason="no model-change dataset (stale_corpus.npy) under ../shared/data"))],
    ids=lambda p: getattr(p, "name", "none"))
def test_real_model_change(folder):
    """On the real model changes: the corrected corpus (ridge, 10% uniform sample) beats the
    uncorrected stale corpus for the new queries where the map is learnable (-ft), and
    check() says when it loses to the old model end to end (-e5), with the two scores."""
    stale = np.load(folder / "stale_corpus.npy", mmap_mode="r")
    fresh = np.load(folder / "corpus.npy", mmap_mode="r")
    dev = QuerySet.load(folder, "dev")
    dev_old = np.load(folder / "stale_queries_dev.npy")
    sample = choose_sample(stale.shape[0], 0.1, seed=0)
    c = Corrector(old_model="all-MiniLM-L6-v2", new_model=folder.name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.fit(stale[sample], fresh[sample], index=sample, corpus=stale, dev=dev,
              dev_old=dev_old)
    s = c.dev_scores
    assert set(s) == {"old_model", "corrected", "k"} and 0 < s["old_model"] < 1
    loses = s["corrected"] < s["old_model"]
    said = [w for w in caught if "makes retrieval worse" in str(w.message)]
    assert bool(said) == loses
    if folder.name.endswith("-e5"):
        assert loses  # the README's hard case: a different model family
    if folder.name.endswith("-ft"):
        assert not loses
        plain = metrics(search(dev.embeddings, stale, 10).indices, dev, 10)["ndcg@10"]
        assert s["corrected"] > plain + 0.02


def _loss(tr, pairs, qi):
    """The trainer's objective in float64: mean pair (1 - cos) + mean multi-positive InfoNCE."""
    u = tr.forward(tr.x[pairs])[0]
    loss = np.mean(1 - np.sum(u * tr.y[pairs], axis=1))
    mi = tr.mined
    z = mi.corrected(tr.forward)
    for i in qi:
        c = mi.cand[i][mi.cand[i] >= 0]
        s = z[c] @ mi.tq[i] / tr.c.tau
        pos = mi.pos[i][:c.size]
        loss += (np.log(np.exp(s).sum()) - np.log(np.exp(s[pos]).sum())) / qi.size
    return loss


@pytest.mark.parametrize("hidden", [0, 7])
def test_trainer_gradients_match_finite_differences(hidden):
    """The MLP's backward pass (pairs + InfoNCE through the normalisation and the relu) against
    central differences of the objective, in float64."""
    from conftest import awkward
    ds = awkward(n=211, d=9, seed=7, n_train=40, n_dev=12)
    stale = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    rng = np.random.default_rng(7)
    fresh = _unit(np.tanh(stale @ rng.standard_normal((9, 11)))).astype(np.float32)
    sample = np.sort(rng.choice(211, 40, replace=False))
    train = QuerySet(_unit(rng.standard_normal((40, 11))).astype(np.float32), ds.train.answers[:40])
    c = Corrector("mlp", hidden=hidden, candidates=12, epochs=1)
    c.fit(stale[sample], fresh[sample], index=sample, train=train, corpus=stale)
    mined = corrector_mod._Mined(c, stale, train, None)
    mined.pool = mined.pool[:0]  # no random negatives: the objective below is deterministic
    for name in ("x", "fixed", "tq"):
        setattr(mined, name, getattr(mined, name).astype(np.float64))
    x, y = _unit(stale[sample]), _unit(fresh[sample])
    tr = corrector_mod._Trainer(c, x, y, c.W0.astype(np.float64), c.b0.astype(np.float64),
                                None, mined, np.random.default_rng(0))
    tr.x, tr.y = x, y
    for k in tr.p:
        tr.p[k] = tr.p[k].astype(np.float64) + 0.05 * rng.standard_normal(tr.p[k].shape)
    pairs, qi = np.arange(0, 40, 3), np.flatnonzero(mined.has_answer)[:9]
    grads = {k: np.zeros_like(v) for k, v in tr.p.items()}
    tr.pair_grads(pairs, grads)
    tr.query_grads(qi, grads)
    for k, g in grads.items():
        flat = tr.p[k].reshape(-1)
        for j in rng.choice(flat.size, min(6, flat.size), replace=False):
            keep = flat[j]
            flat[j] = keep + 1e-6
            up = _loss(tr, pairs, qi)
            flat[j] = keep - 1e-6
            down = _loss(tr, pairs, qi)
            flat[j] = keep
            assert g.reshape(-1)[j] == pytest.approx((up - down) / 2e-6, rel=1e-4, abs=1e-7), k


def test_query_loss_mines_answers_first_and_learns():
    """Mined candidates: each train query's answers first (positives), then its top records;
    sampled records are constants (their fresh rows). Training on queries raises the dev
    re-ranking score over the ridge map it starts from."""
    from conftest import awkward
    ds = awkward(n=1237, d=37, seed=8)
    stale = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    rng = np.random.default_rng(8)
    fresh = _unit(np.tanh(3 * stale @ rng.standard_normal((37, 37)))).astype(np.float32)
    sample = np.sort(rng.choice(1237, 150, replace=False))
    # the new model's queries: their answers' fresh rows, blurred
    def queries(qs):
        emb = np.stack([fresh[a].mean(0) for a in qs.answers])
        return QuerySet(_unit(emb + 0.05 * rng.standard_normal(emb.shape)).astype(np.float32),
                        qs.answers)
    train, dev = queries(ds.train), queries(ds.dev)
    ridge = Corrector().fit(stale[sample], fresh[sample], index=sample)
    c = Corrector("mlp", hidden=32, candidates=20)
    c.fit(stale[sample], fresh[sample], index=sample, train=train, corpus=stale, dev=dev)
    mined = corrector_mod._Mined(ridge, stale, train, dev)
    for i, ans in enumerate(train.answers):
        a = np.unique(ans)
        np.testing.assert_array_equal(mined.rows[mined.cand[i, :a.size]], a)
        assert mined.pos[i, :a.size].all() and not mined.pos[i, a.size:].any()
    assert mined.known.sum() > 0
    k = np.searchsorted(sample, mined.rows[mined.known])
    np.testing.assert_allclose(mined.fixed[mined.known], _unit(fresh[sample[k]]), atol=1e-6)
    start = mined.dev_ndcg(lambda x: (ridge.transform(x), None))
    assert c.info["best_score"] > start + 0.01, (c.info, start)
    got = metrics(search(dev.embeddings, stale, 10, corrector=c).indices, dev, 10)["ndcg@10"]
    base = metrics(search(dev.embeddings, stale, 10, corrector=ridge).indices, dev, 10)["ndcg@10"]
    assert got > base


def test_dask_fit_with_corrector_equals_host_fit(tmp_path):
    """A fit on a dask corpus through a corrector is the host fit, bit for bit on cpp (its
    correct_rows gives a row the same bits in any chunk): the workers correct their blocks,
    the client the touched rows it receives, with the same backend."""
    distributed = pytest.importorskip("distributed")
    pytest.importorskip("dask.array")
    if "cpp" not in BACKENDS:
        pytest.skip("cpp backend not built")
    from conftest import awkward
    from nudgefast import _dask
    ds = awkward(n=1237, d=37, seed=9)
    stale = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    rng = np.random.default_rng(9)
    fresh = _unit(np.tanh(stale @ rng.standard_normal((37, 37)))).astype(np.float32)
    sample = np.sort(rng.choice(1237, 200, replace=False))
    c = Corrector().fit(stale[sample], fresh[sample], index=sample)
    np.save(tmp_path / "stale.npy", stale)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cl, distributed.Client(cl):
        x = _dask.npy_corpus([tmp_path / "stale.npy"], block_rows=333)
        for est in (NudgeN(backend="cpp", k_val=3), NudgeM(backend="cpp")):
            a = est.fit(x, ds.train, ds.dev, corrector=c)
            b = est.fit(stale, ds.train, ds.dev, corrector=c)
            assert a.gamma == b.gamma
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.vectors, b.vectors)
        # rows numbered from an offset: the sample's fresh rows stay on their corpus rows
        rows = _dask.as_corpus("corpus", x, "cpp", corrector=c)
        q = np.ascontiguousarray(ds.dev.embeddings, dtype=np.float32)
        s, i = _dask.topk_pass(None, q, rows, 7, row_offset=1000)
        one = search(q, stale, 7, corrector=c, backend="cpp")
        np.testing.assert_array_equal(i, one.indices + 1000)
        np.testing.assert_array_equal(s, one.scores)


def test_mlp_keeps_its_start_when_training_never_improves():
    """One epoch with dev early stopping (checked every 2 epochs) still evaluates; a model
    that never beats its start returns the start (the ridge map), not an error."""
    from conftest import awkward
    ds = awkward(n=400, d=11, seed=10, n_train=60, n_dev=20)
    stale = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    rng = np.random.default_rng(10)
    fresh = _unit(stale @ rng.standard_normal((11, 11))).astype(np.float32)
    sample = np.sort(rng.choice(400, 80, replace=False))
    c = Corrector("mlp", hidden=8, epochs=1, candidates=10)
    c.fit(stale[sample], fresh[sample], index=sample, train=ds.train, corpus=stale, dev=ds.dev)
    assert c.info["epochs"] == 1 and c.info["best_epoch"] in (0, 1)
    ridge = Corrector(alpha=c.info["alpha"]).fit(stale[sample], fresh[sample], index=sample)
    if c.info["best_epoch"] == 0:
        np.testing.assert_array_equal(c.W0, ridge.W0)
    with pytest.raises(ValueError, match="lr: must be a positive number"):
        Corrector("mlp", lr=float("nan"))
