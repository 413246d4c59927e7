"""The linear-adapter baseline: its analytic gradient against finite differences, the gain
on real data, bad input, caller arrays, determinism and the transforms' contracts."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import REAL, awkward
from nudgefast import QuerySet, datasets, metrics, search
from nudgefast.baselines import LinearAdapter, adapter_loss_and_grad

SIDES = ["query", "records"]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def small():
    return awkward(n=400, d=13, seed=5, n_train=300, n_dev=60)


# ----------------------------------------------------------------------------------------
# The loss and its gradient


def _reference_loss(W, Q, R, side, scale, mask):
    """The loss written plainly, one query at a time (float64)."""
    total = 0.0
    for i in range(Q.shape[0]):
        if side == "query":
            a = W @ Q[i]
            logits = scale * (R @ (a / np.linalg.norm(a)))
        else:
            V = _unit(R @ W.T)
            logits = scale * (V @ Q[i])
        keep = ~mask[i] | (np.arange(Q.shape[0]) == i)
        total += np.log(np.exp(logits[keep]).sum()) - logits[i]
    return total / Q.shape[0]


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradient_matches_finite_differences(side, masked):
    rng = np.random.default_rng(7)
    B, d, scale, h = 9, 6, 5.0, 1e-6
    Q, R = _unit(rng.standard_normal((B, d))), _unit(rng.standard_normal((B, d)))
    R[4] = R[1]  # the same record drawn twice: a false negative of query 1 and 4
    W = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    mask = rng.random((B, B)) < 0.3 if masked else np.zeros((B, B), bool)
    if masked:
        mask[1, 4] = mask[4, 1] = True
    loss, grad = adapter_loss_and_grad(W, Q, R, side, scale, mask if masked else None)
    assert grad.shape == (d, d) and grad.dtype == np.float64
    assert loss == pytest.approx(_reference_loss(W, Q, R, side, scale, mask), rel=1e-12)
    fd = np.empty_like(W)
    for i in range(d):
        for j in range(d):
            step = np.zeros_like(W)
            step[i, j] = h
            fd[i, j] = (adapter_loss_and_grad(W + step, Q, R, side, scale, mask)[0]
                        - adapter_loss_and_grad(W - step, Q, R, side, scale, mask)[0]) / (2 * h)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(fd) < 1e-5


def test_mask_never_drops_the_target():
    rng = np.random.default_rng(3)
    Q, R = _unit(rng.standard_normal((4, 5))), _unit(rng.standard_normal((4, 5)))
    everything = np.ones((4, 4), bool)
    loss, grad = adapter_loss_and_grad(np.eye(5), Q, R, "query", 20.0, everything)
    # Only the target is left in every row: loss 0, nothing to learn.
    assert loss == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(grad, 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Real data


def _smallest_real():
    if not REAL:
        return None
    named = [p for p in REAL if p.name == "pkg-search-20k-ft"]
    if named:
        return named[0]
    return min(REAL, key=lambda p: np.load(p / "corpus.npy", mmap_mode="r").shape[0])


@pytest.fixture(scope="module")
def real():
    folder = _smallest_real()
    if folder is None:
        pytest.skip("no real dataset under ../shared/data (set NUDGEFAST_DATA)")
    return datasets.load(folder)


#: How much test NDCG@10 may drop below no fine-tuning while dev improves (a few epochs on
#: 5k pairs; measured on pkg-search-20k-ft with epochs=3: +0.023 (query), +0.014 (records)).
TEST_NDCG_MARGIN = 0.01


@pytest.mark.parametrize("side", SIDES)
def test_adapter_improves_real_data(real, side):
    if real.name == "pkg-search" and side == "query":
        # Measured: on the full pkg-search the query adapter never beats the identity on dev
        # (every lr in 1e-4..1e-2, 3 seeds); the 20k sets are the ones where it does.
        pytest.xfail("the query adapter does not improve dev NDCG@10 on pkg-search")
    adapter = LinearAdapter(side, epochs=3, patience=3).fit(real.corpus, real.train, real.dev)
    identity_dev = adapter.history_[0]["dev_ndcg"]
    base = metrics(search(real.dev.embeddings, real.corpus, 10).indices, real.dev, 10)
    assert identity_dev == pytest.approx(base["ndcg@10"], abs=1e-9)
    best = adapter.history_[adapter.best_epoch_]["dev_ndcg"]
    assert adapter.best_epoch_ >= 1 and best > identity_dev + 1e-3, adapter.history_
    # The kept W_ is the best epoch's: re-evaluate it on dev.
    dev_found = adapter.search(real.dev.embeddings, real.corpus, 10)
    assert metrics(dev_found.indices, real.dev, 10)["ndcg@10"] == pytest.approx(best, abs=1e-9)
    test_base = metrics(search(real.test.embeddings, real.corpus, 10).indices, real.test, 10)
    test_tuned = metrics(adapter.search(real.test.embeddings, real.corpus, 10).indices,
                         real.test, 10)
    assert test_tuned["ndcg@10"] >= test_base["ndcg@10"] - TEST_NDCG_MARGIN


# ----------------------------------------------------------------------------------------
# Bad input, caller arrays, determinism


def test_bad_input_errors(small):
    c, tr, dev = small.corpus, small.train, small.dev
    with pytest.raises(ValueError, match=r"side: must be 'query' or 'records', got 'both'"):
        LinearAdapter("both")
    for kw, msg in [({"lr": -1.0}, r"lr: must be a finite number > 0"),
                    ({"batch_size": 1}, r"batch_size: must be an int >= 2"),
                    ({"patience": 0}, r"patience: must be an int >= 1"),
                    ({"epochs": 2.5}, r"epochs: must be an int >= 0")]:
        with pytest.raises(ValueError, match=msg):
            LinearAdapter(**kw)
    a = LinearAdapter(epochs=1)
    with pytest.raises(RuntimeError, match=r"not fitted yet; call fit"):
        a.transform_queries(tr.embeddings)
    with pytest.raises(ValueError, match=r"train.embeddings: has d=13 but the corpus has d=12"):
        a.fit(c[:, :12], tr, dev)
    with pytest.raises(ValueError, match=r"dev.embeddings: has d=12 but the corpus has d=13"):
        a.fit(c, tr, QuerySet(dev.embeddings[:, :12], dev.answers))
    with pytest.raises(ValueError, match=r"train: has no \(query, answer\) pairs"):
        a.fit(c, QuerySet(tr.embeddings, [[]] * len(tr)), dev)
    with pytest.raises(ValueError, match=r"dev: no dev query has an answer"):
        a.fit(c, tr, QuerySet(dev.embeddings, [[]] * len(dev)))
    with pytest.raises(ValueError, match=r"train: answers\[0\] contains record 400"):
        a.fit(c, QuerySet(tr.embeddings, [[400]] + list(tr.answers[1:])), dev)
    zero = np.array(c)
    zero[tr.answers[0][0]] = 0
    with pytest.raises(ValueError, match=rf"corpus: row {tr.answers[0][0]} is a zero vector"):
        a.fit(zero, tr, dev)
    a.fit(c, tr, dev)
    with pytest.raises(ValueError, match=r"queries: has d=12 but the corpus has d=13"):
        a.transform_queries(tr.embeddings[:, :12])
    with pytest.raises(ValueError, match=r"corpus: has d=12 but the adapter was fitted with d=13"):
        a.transform_corpus(c[:, :12])
    with pytest.raises(ValueError, match=r"out: expected a float32 array of shape \(400, 13\)"):
        a.transform_corpus(c, out=np.empty((400, 13), np.float64))


def test_caller_arrays_unchanged(small):
    corpus = np.array(small.corpus, dtype=np.float16)
    emb = {name: np.array(getattr(small, name).embeddings) for name in ("train", "dev")}
    before = corpus.copy(), {k: v.copy() for k, v in emb.items()}
    train = QuerySet(emb["train"], small.train.answers, small.train.relevance)
    dev = QuerySet(emb["dev"], small.dev.answers, small.dev.relevance)
    for side in SIDES:
        a = LinearAdapter(side, epochs=2).fit(corpus, train, dev)
        a.transform_queries(emb["dev"])
        a.transform_corpus(corpus)
        a.search(emb["dev"], corpus, 5)
    np.testing.assert_array_equal(corpus, before[0])
    for k in emb:
        np.testing.assert_array_equal(emb[k], before[1][k])


@pytest.mark.parametrize("side", SIDES)
def test_same_seed_same_W(small, side):
    fit = lambda seed: LinearAdapter(side, epochs=3, patience=3, lr=3e-3, seed=seed).fit(
        small.corpus, small.train, small.dev)
    a, b, other = fit(0), fit(0), fit(1)
    assert a.W_.dtype == np.float32 and a.W_.shape == (13, 13)
    np.testing.assert_array_equal(a.W_, b.W_)
    assert a.history_ == b.history_
    # The seed reaches the shuffling: another seed trains another W (the identity epoch aside).
    losses = lambda fitted: [h["train_loss"] for h in fitted.history_[1:]]
    assert losses(a) != losses(other)


# ----------------------------------------------------------------------------------------
# Contracts of the fitted adapter


def test_pairs_take_highest_relevance_first_on_ties():
    q = QuerySet(np.eye(4, dtype=np.float32),
                 [[5, 2, 9], [7], [], [3, 8, 1]], [[1, 2, 2], [1], [], [1, 3, 3]])
    query_of, positive = LinearAdapter._pairs(q.csr(unique=True))
    np.testing.assert_array_equal(query_of, [0, 1, 3])
    np.testing.assert_array_equal(positive, [2, 7, 1])  # ties: lowest record row


def test_early_stopping_keeps_the_best_epoch(small):
    a = LinearAdapter("query", epochs=0).fit(small.corpus, small.train, small.dev)
    np.testing.assert_array_equal(a.W_, np.eye(13, dtype=np.float32))
    assert a.best_epoch_ == 0 and len(a.history_) == 1
    b = LinearAdapter("query", epochs=6, patience=2, lr=1e-2).fit(small.corpus, small.train,
                                                                    small.dev)
    dev = [h["dev_ndcg"] for h in b.history_]
    assert [h["epoch"] for h in b.history_] == list(range(len(dev)))
    assert b.best_epoch_ == int(np.argmax(dev))  # first best on ties
    stopped = len(dev) - 1
    assert stopped == 6 or stopped - b.best_epoch_ == 2


@pytest.mark.parametrize("side", SIDES)
def test_transforms_and_search_agree(small, side):
    a = LinearAdapter(side, epochs=2, lr=1e-2).fit(small.corpus, small.train, small.dev)
    n, d = small.corpus.shape
    poisoned = np.full((n, d), np.nan, np.float32)  # catches rows left unwritten
    out = a.transform_corpus(small.corpus, out=poisoned, chunk_rows=37)
    assert out is poisoned and np.isfinite(out).all()
    whole = a.transform_corpus(small.corpus)
    np.testing.assert_allclose(out, whole, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
    q = a.transform_queries(small.dev.embeddings)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    x = _unit(np.asarray(small.corpus, np.float64))
    W = a.W_.astype(np.float64)
    if side == "query":
        np.testing.assert_allclose(q, _unit(small.dev.embeddings.astype(np.float64) @ W.T),
                                   atol=1e-5)
        np.testing.assert_allclose(whole, x, atol=1e-6)
    else:
        np.testing.assert_allclose(q, _unit(small.dev.embeddings.astype(np.float64)), atol=1e-6)
        np.testing.assert_allclose(whole, _unit(x @ W.T), atol=1e-5)
    found = a.search(small.dev.embeddings, small.corpus, 5)
    scores = q.astype(np.float64) @ whole.T.astype(np.float64)
    np.testing.assert_allclose(found.scores, np.sort(scores, axis=1)[:, ::-1][:, :5], atol=1e-5)
