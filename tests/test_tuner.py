"""The tuner: after any sequence of operations, the same gamma and tuned vectors (1e-6) as a
fresh fit on the final inputs, on every backend; forced rescans; state save/load; bad input."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import nudgefast as nf
from nudgefast import datasets
from nudgefast.search import rank_rows
from conftest import REAL, awkward

pytestmark = pytest.mark.filterwarnings("ignore:.*have no answers and are skipped")


class FinalInputs:
    """What a fresh fit would be given after the same operations: the corpus without deleted
    rows (positions compacted in order), live train queries, validation queries with answers."""

    def __init__(self, corpus, train, val):
        self.rows = [np.asarray(corpus)]
        self.deleted = set()
        self.train = [(q, list(a), True) for q, a in zip(train.embeddings, train.answers)]
        self.val = [(q, list(a)) for q, a in zip(val.embeddings, val.answers)]

    @property
    def n(self):
        return sum(r.shape[0] for r in self.rows)

    def fit(self, estimator):
        corpus = np.concatenate([r.astype(np.float32) for r in self.rows])
        keep = np.array([p for p in range(self.n) if p not in self.deleted], np.int64)
        remap = np.full(self.n, -1)
        remap[keep] = np.arange(keep.size)

        def qset(items):
            q = np.array([it[0] for it in items], np.float32)
            a = [[int(remap[x]) for x in it[1] if remap[x] >= 0] for it in items]
            return nf.QuerySet(q, a)
        train = qset([it for it in self.train if it[2]])
        val = qset(self.val)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = estimator.fit(corpus[keep], train, val)
        return result, keep


def check_state(tuner):
    """The kept lists are exact prefixes of each validation query's untouched ranking, and the
    hits / intervals kept for the unchanged queries equal a full re-score."""
    n, t = tuner.n_records, tuner._t
    pool = np.setdiff1d(np.arange(n), tuner._excluded())
    every = np.broadcast_to(pool, (tuner._vq.shape[0], pool.size))
    scores = tuner._exact(tuner._vq, np.ascontiguousarray(every))
    _, ranked = rank_rows(scores, np.ascontiguousarray(every))
    for q in np.flatnonzero(tuner._valive):
        kept = tuner._Li[q][tuner._Li[q] >= 0]
        np.testing.assert_array_equal(kept, ranked[q, :kept.size])
        assert kept.size >= min(tuner.need, pool.size)
        if tuner._Lcomplete[q]:
            assert kept.size == pool.size
    if tuner.variant == "nudge-n":
        hits = tuner._hits.copy()
        tuner._rescore_n(np.arange(tuner._vq.shape[0]))
        alive = tuner._valive
        np.testing.assert_array_equal(hits[alive], tuner._hits[alive])
    else:
        low, high, ok = tuner._low.copy(), tuner._high.copy(), tuner._feasible.copy()
        tuner._rescore_m(np.arange(tuner._px.size))
        np.testing.assert_array_equal(ok, tuner._feasible)
        np.testing.assert_array_equal(low[ok], tuner._low[ok])
        np.testing.assert_array_equal(high[ok], tuner._high[ok])
    assert t == tuner._slot_rec[:t].size == len(tuner._slot_of)


def check_same(tuner, model, estimator, *, state=True):
    if state:  # brute force over the whole pool: small corpora only
        check_state(tuner)
    fresh, keep = model.fit(estimator)
    got = tuner.result()
    assert got.gamma == fresh.gamma
    np.testing.assert_array_equal(got.indices, keep[fresh.indices])
    np.testing.assert_allclose(got.vectors, fresh.vectors, rtol=0, atol=1e-6)
    return fresh


def estimators(backend):
    return [nf.NudgeN(backend=backend, progress=False),
            nf.NudgeN(backend=backend, k_val=3, progress=False),
            nf.NudgeM(backend=backend, progress=False)]


def near_queries(rng, corpus, n, deleted=(), spread=0.35):
    """Queries near random live records, answered by them (so gamma moves)."""
    live = np.setdiff1d(np.arange(corpus.shape[0]), np.asarray(list(deleted), np.int64))
    ans = rng.choice(live, n)
    x = np.asarray(corpus[ans], np.float64)
    q = x / np.linalg.norm(x, axis=1, keepdims=True) + spread * rng.standard_normal(x.shape) \
        / np.sqrt(x.shape[1])
    return q.astype(np.float32), [[int(a)] for a in ans]


def run_ops(tuner, model, rng, n_ops, estimator, *, check_every=1):
    """Random operations on tuner and model alike, compared with a fresh fit as it goes."""
    for step in range(n_ops):
        op = rng.choice(["feedback", "feedback", "remove", "validation", "records", "delete"])
        corpus_now = np.concatenate([r.astype(np.float32) for r in model.rows])
        if op == "feedback":
            q, a = near_queries(rng, corpus_now, int(rng.integers(1, 6)), model.deleted)
            if rng.random() < 0.3:  # a second answer, and a duplicate of it (counted once)
                a[0] = a[0] + [a[-1][0], a[-1][0]]
            delta = tuner.add_feedback(q, a)
            assert delta.summary["feedback_ids"] == list(range(len(model.train),
                                                                len(model.train) + len(a)))
            model.train += [(qq, aa, True) for qq, aa in zip(q, a)]
        elif op == "remove":
            alive = [i for i, it in enumerate(model.train) if it[2]]
            drop = rng.choice(alive, min(len(alive) - 1, int(rng.integers(1, 6))), replace=False)
            left = {x for i in alive if i not in set(drop.tolist()) for x in model.train[i][1]}
            if drop.size == 0 or not left - model.deleted:
                continue  # a fresh fit needs a train pair
            tuner.remove_feedback(drop)
            for i in drop:
                model.train[i] = (*model.train[i][:2], False)
        elif op == "validation":
            q, a = near_queries(rng, corpus_now, int(rng.integers(1, 5)), model.deleted)
            tuner.add_validation(q, a)
            model.val += list(zip(q, a))
        elif op == "records":
            m = int(rng.integers(1, 40))
            src = rng.choice(corpus_now.shape[0], m)
            rows = (corpus_now[src] + 0.05 * rng.standard_normal((m, corpus_now.shape[1]))
                    ).astype(model.rows[0].dtype)
            delta = tuner.add_records(rows)
            assert delta.new.sum() == m and delta.indices[-1] == model.n + m - 1
            model.rows.append(rows)
        else:
            live_train = {x for it in model.train if it[2] for x in it[1]}
            cand = [p for p in range(model.n) if p not in model.deleted]
            pos = rng.choice(cand, int(rng.integers(1, 4)), replace=False)
            left = live_train - set(pos.tolist()) - model.deleted
            val_left = [x for it in model.val for x in it[1]
                        if x not in model.deleted and x not in set(pos.tolist())]
            if not left or not val_left:
                continue  # a fresh fit needs a train pair and a validation answer
            delta = tuner.delete_records(pos)
            np.testing.assert_array_equal(delta.deleted, np.sort(pos))
            model.deleted |= set(pos.tolist())
        if step % check_every == 0:
            check_same(tuner, model, estimator)
    return check_same(tuner, model, estimator)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["nudge-n", "nudge-n-k3", "nudge-m"])
def test_random_sequences_equal_a_fresh_fit(backend, which):
    ds = awkward(n=1237, d=37, seed=which)
    est = estimators(backend)[which]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        tuner = nf.Tuner(est, margin=int(rng.integers(1, 6)))
        tuner.fit(ds.corpus, ds.train, ds.dev)
        model = FinalInputs(ds.corpus, ds.train, ds.dev)
        check_same(tuner, model, est)
        fresh = run_ops(tuner, model, rng, 14, est)
        assert fresh.gamma > 0 or which == 2  # the data make NUDGE-N move


def test_gamma_moves_and_deltas_compose():
    """Writing every delta into a served copy gives the fresh fit's tuned corpus."""
    ds = awkward(n=2011, d=29, seed=5)
    est = nf.NudgeN(progress=False)
    tuner = nf.Tuner(est, margin=2)
    model = FinalInputs(ds.corpus, ds.train, ds.dev)
    served = nf.NudgeResult.apply(est.fit(ds.corpus, ds.train, ds.dev), ds.corpus)
    served[:] = np.asarray(ds.corpus, np.float32)
    served /= np.linalg.norm(served, axis=1, keepdims=True)
    tuner.fit(ds.corpus, ds.train, ds.dev).apply_to(served)
    rng = np.random.default_rng(7)
    gammas = {tuner.gamma}
    for _ in range(12):
        q, a = near_queries(rng, ds.corpus, int(rng.integers(5, 40)))
        tuner.add_feedback(q, a).apply_to(served)
        model.train += [(qq, aa, True) for qq, aa in zip(q, a)]
        alive = [i for i, it in enumerate(model.train) if it[2]]
        drop = rng.choice(alive, 10, replace=False)
        tuner.remove_feedback(drop).apply_to(served)
        for i in drop:
            model.train[i] = (*model.train[i][:2], False)
        gammas.add(tuner.gamma)
    fresh, _ = model.fit(est)
    want = fresh.apply(ds.corpus)
    np.testing.assert_allclose(served, want, rtol=0, atol=1e-6)
    assert len(gammas) > 1, "the stream should move gamma at least once"


@pytest.mark.parametrize("variant", ["nudge-n", "nudge-m"])
def test_exhausted_margin_rescans(variant, caplog):
    """Feedback that touches every kept candidate of some validation queries forces a rescan;
    the summary says so and the result still equals a fresh fit."""
    ds = awkward(n=1500, d=24, seed=3)
    est = nf.NudgeN(progress=False) if variant == "nudge-n" else nf.NudgeM(progress=False)
    tuner = nf.Tuner(est, margin=1)
    tuner.fit(ds.corpus, ds.train, ds.dev)
    model = FinalInputs(ds.corpus, ds.train, ds.dev)
    kept = tuner._Li[:5]
    answers = [[int(x)] for x in np.unique(kept[kept >= 0])]
    q = np.asarray(ds.corpus[[a[0] for a in answers]], np.float32)
    with caplog.at_level("INFO", logger="nudgefast"):
        delta = tuner.add_feedback(q, answers)
    assert delta.summary["rescanned"] >= 5
    assert "rescanning the corpus" in caplog.text
    model.train += [(qq, aa, True) for qq, aa in zip(q, answers)]
    check_same(tuner, model, est)


def test_feedback_reads_only_the_rows_it_touches(monkeypatch):
    ds = awkward(n=1800, d=20, seed=4)
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    tuner.fit(ds.corpus, ds.train, ds.dev)
    read = []

    class Spy(np.ndarray):
        def __getitem__(self, item):
            read.append(item)
            return np.asarray(super().__getitem__(item))
    tuner._corpus = np.asarray(ds.corpus).view(Spy)
    rng = np.random.default_rng(1)
    q, a = near_queries(rng, ds.corpus, 20)
    tuner.add_feedback(q, a)
    rows = sum(np.size(i) for i in read)
    assert rows <= 20, f"feedback read {rows} corpus rows for 20 answers"


# ----------------------------------------------------------------------------------------
# State on disk


def test_save_load_round_trip_continues_exactly(tmp_path):
    ds = awkward(n=1400, d=31, seed=6)
    est = nf.NudgeM(progress=False)
    tuner = nf.Tuner(est, margin=3)
    tuner.fit(ds.corpus, ds.train, ds.dev, ids=[f"r{i}" for i in range(1400)])
    rng = np.random.default_rng(2)
    tuner.add_records(np.asarray(ds.corpus[:7], np.float32) * 1.5 + 0.01,
                      ids=[f"n{i}" for i in range(7)])
    tuner.delete_records(ids=["r3", "r700"])
    path = tmp_path / "state.npz"
    tuner.save(path)
    again = nf.Tuner.load(path, ds.corpus)
    assert again.gamma == tuner.gamma and again.n_records == tuner.n_records
    q, a = near_queries(rng, ds.corpus, 9)
    d1, d2 = tuner.add_feedback(q, a), again.add_feedback(q, a)
    assert d1.gamma == d2.gamma
    np.testing.assert_array_equal(d1.indices, d2.indices)
    np.testing.assert_array_equal(d1.ids, d2.ids)
    np.testing.assert_array_equal(d1.vectors, d2.vectors)


def test_load_refuses_bad_files(tmp_path):
    ds = awkward(n=900, d=16, seed=8)
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    tuner.fit(ds.corpus, ds.train, ds.dev)
    path = tmp_path / "state.npz"
    tuner.save(path)
    blob = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        nf.Tuner.load(tmp_path / "cut.npz", ds.corpus)
    np.savez(tmp_path / "foreign.npz", meta=np.array('{"format": "other"}'))
    with pytest.raises(ValueError, match="not a nudgefast tuner state"):
        nf.Tuner.load(tmp_path / "foreign.npz", ds.corpus)
    np.savez(tmp_path / "plain.npz", x=np.arange(3))
    with pytest.raises(ValueError, match="not a readable tuner state"):
        nf.Tuner.load(tmp_path / "plain.npz", ds.corpus)
    with pytest.raises(ValueError, match="saved for a float32 corpus of shape"):
        nf.Tuner.load(path, np.asarray(ds.corpus)[:, :15])
    other = np.array(ds.corpus)
    other[0] += 1
    with pytest.raises(ValueError, match="other values"):
        nf.Tuner.load(path, other)
    with pytest.raises(FileNotFoundError):
        nf.Tuner.load(tmp_path / "missing.npz", ds.corpus)


def test_interrupted_save_keeps_the_previous_state(tmp_path, monkeypatch):
    ds = awkward(n=900, d=16, seed=9)
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    tuner.fit(ds.corpus, ds.train, ds.dev)
    path = tmp_path / "state.npz"
    tuner.save(path)
    before = path.read_bytes()
    rng = np.random.default_rng(0)
    tuner.add_feedback(*near_queries(rng, ds.corpus, 30))
    real_savez = np.savez

    def dies_half_way(fh, **arrays):
        real_savez(fh, **dict(list(arrays.items())[:3]))
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(np, "savez", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        tuner.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["state.npz"]
    nf.Tuner.load(path, ds.corpus)


# ----------------------------------------------------------------------------------------
# Bad input: a clear error, and the state unchanged


def test_bad_operations_leave_the_state_alone():
    ds = awkward(n=1000, d=18, seed=10)
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    with pytest.raises(RuntimeError, match="call fit"):
        tuner.add_feedback(np.zeros((1, 18)), [[0]])
    tuner.fit(ds.corpus, ds.train, ds.dev)
    before = tuner.result()
    q = np.ones((1, 18), np.float32)
    cases = [
        (lambda: tuner.add_feedback(q, [[1000]]), ValueError, "not a record position"),
        (lambda: tuner.add_feedback(q, [[-1]]), ValueError, "not a record position"),
        (lambda: tuner.add_feedback(q, [[]]), ValueError, "no \\(query, answer\\) pairs"),
        (lambda: tuner.add_feedback(np.ones((1, 17)), [[1]]), ValueError, "17"),
        (lambda: tuner.add_feedback(q * np.nan, [[1]]), ValueError, "NaN"),
        (lambda: tuner.remove_feedback([10 ** 6]), ValueError, "out of range"),
        (lambda: tuner.remove_feedback([0.5]), TypeError, "int"),
        (lambda: tuner.add_records(np.ones((2, 5))), ValueError, "shape"),
        (lambda: tuner.add_records(np.zeros((2, 18))), ValueError, "zero"),
        (lambda: tuner.add_records(np.ones((2, 18)), ids=["a", "b"]), ValueError, "without ids"),
        (lambda: tuner.delete_records([5000]), ValueError, "out of range"),
        (lambda: tuner.delete_records(), ValueError, "positions or ids"),
        (lambda: tuner.delete_records(ids=["x"]), ValueError, "without ids"),
        (lambda: tuner.add_validation(q, [[]]), ValueError, "no validation query"),
        (lambda: nf.Tuner(nf.NudgeN(), margin=0), ValueError, "margin"),
        (lambda: nf.Tuner("nudge"), TypeError, "estimator"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    after = tuner.result()
    assert after.gamma == before.gamma and tuner.n_records == 1000
    np.testing.assert_array_equal(after.indices, before.indices)
    np.testing.assert_array_equal(after.vectors, before.vectors)
    tuner.delete_records([5])
    with pytest.raises(ValueError, match="already deleted"):
        tuner.delete_records([5])
    with pytest.raises(ValueError, match="was deleted"):
        tuner.add_feedback(q, [[5]])


# ----------------------------------------------------------------------------------------
# Real data


@pytest.mark.parametrize("folder", [pytest.param(p, id=p.name) for p in REAL] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no real dataset under ../shared/data"))])
def test_feedback_stream_on_real_data_equals_a_fresh_fit(folder):
    """Start from half of the train queries, stream the rest in batches of 100 (with some
    withdrawn on the way): the tuner ends where a fresh fit on the final inputs is."""
    ds = datasets.load(folder)
    train = ds.train
    n = len(train)
    half = n // 2
    emb = np.asarray(train.embeddings, np.float32)
    for est in (nf.NudgeN(progress=False), nf.NudgeM(progress=False)):
        tuner = nf.Tuner(est)
        tuner.fit(ds.corpus, nf.QuerySet(emb[:half], train.answers[:half]), ds.dev)
        model = FinalInputs(ds.corpus, nf.QuerySet(emb[:half], train.answers[:half]), ds.dev)
        rescanned = 0
        for s in range(half, n, 100):
            delta = tuner.add_feedback(emb[s:s + 100], train.answers[s:s + 100])
            rescanned += delta.summary["rescanned"]
            model.train += [(q, list(a), True) for q, a in zip(emb[s:s + 100],
                                                              train.answers[s:s + 100])]
        drop = np.arange(0, n, 17)
        tuner.remove_feedback(drop)
        for i in drop:
            model.train[i] = (*model.train[i][:2], False)
        check_same(tuner, model, est, state=False)


def test_packaged_dataset_stream():
    """The packaged 6k subset (in every install) streamed in batches of 50."""
    ds = datasets.packaged()
    emb = np.asarray(ds.train.embeddings, np.float32)
    est = nf.NudgeN(progress=False)
    tuner = nf.Tuner(est)
    half = len(ds.train) // 2
    tuner.fit(ds.corpus, nf.QuerySet(emb[:half], ds.train.answers[:half]), ds.dev)
    model = FinalInputs(ds.corpus, nf.QuerySet(emb[:half], ds.train.answers[:half]), ds.dev)
    for s in range(half, len(ds.train), 50):
        tuner.add_feedback(emb[s:s + 50], ds.train.answers[s:s + 50])
        model.train += [(q, list(a), True) for q, a in zip(emb[s:s + 50],
                                                          ds.train.answers[s:s + 50])]
    check_same(tuner, model, est, state=False)


def test_nudge_m_pair_freed_when_its_blocking_record_turns_away():
    """A validation pair with no interval (a touched competitor beats its answer at every
    gamma) gets one when new feedback turns that competitor's gradient away from the query
    (its untouched competitor unchanged): the tuner must see it."""
    rng = np.random.default_rng(11)
    corpus = rng.standard_normal((400, 8)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    v = corpus[7] + 0.3 * corpus[9]
    j, x = np.argsort(-(corpus @ v))[:2]  # j beats x at gamma = 0
    train = nf.QuerySet(np.stack([corpus[x], v]).astype(np.float32), [[int(x)], [int(j)]])
    val = nf.QuerySet(v[None].astype(np.float32), [[int(x)]])
    est = nf.NudgeM(progress=False)
    tuner = nf.Tuner(est, margin=2)
    tuner.fit(corpus, train, val)
    assert not tuner._feasible[0]
    away = (-0.97 * v + 0.4 * corpus[3]).astype(np.float32)[None]
    delta = tuner.add_feedback(away, [[int(j)]])
    assert tuner._feasible[0] and delta.summary["rescored"] >= 1
    model = FinalInputs(corpus, train, val)
    model.train.append((away[0], [int(j)], True))
    check_same(tuner, model, est)


@pytest.mark.parametrize("variant", ["nudge-n", "nudge-m"])
def test_added_records_that_win_validation_queries(variant):
    """New records equal to validation queries take their top spot: the hits / intervals of
    those queries must be re-scored (the kept lists change under them)."""
    ds = awkward(n=1237, d=37, seed=2)
    est = nf.NudgeN(progress=False) if variant == "nudge-n" else nf.NudgeM(progress=False)
    tuner = nf.Tuner(est, margin=3)
    tuner.fit(ds.corpus, ds.train, ds.dev)
    model = FinalInputs(ds.corpus, ds.train, ds.dev)
    rows = np.asarray(ds.dev.embeddings[:40], np.float32)
    delta = tuner.add_records(rows)
    assert delta.summary["rescored"] >= 20
    model.rows.append(rows)
    check_same(tuner, model, est)


def test_failures_leave_the_state_as_it_was_or_say_reload():
    ds = awkward(n=900, d=16, seed=12)
    corpus = np.array(ds.corpus)
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    tuner.fit(corpus, ds.train, ds.dev)
    before = tuner.result()
    with pytest.raises(ValueError, match="one id per record"):
        tuner.fit(corpus, ds.train, ds.dev, ids=["a", "b"])  # a failed refit
    untouched = int(np.setdiff1d(np.arange(900), tuner.touched)[0])
    corpus[untouched] = 0.0  # the caller broke a row the next feedback touches
    with pytest.raises(ValueError, match=f"record {untouched} has a zero norm"):
        tuner.add_feedback(np.ones((1, 16), np.float32), [[untouched]])
    after = tuner.result()
    assert tuner.n_records == 900 and after.gamma == before.gamma
    np.testing.assert_array_equal(after.indices, before.indices)
    np.testing.assert_array_equal(after.vectors, before.vectors)
    delta = tuner.add_feedback(np.ones((1, 16), np.float32), [[int(before.indices[0])]])
    assert delta.summary["feedback_ids"] == [len(ds.train)]  # no id was used up

    def interrupted(*args):
        raise KeyboardInterrupt
    tuner._dirty_n = interrupted  # dies inside the in-place phase
    with pytest.raises(KeyboardInterrupt):
        tuner.add_feedback(np.ones((1, 16), np.float32), [[int(before.indices[1])]])
    with pytest.raises(RuntimeError, match="Tuner.load the last saved state"):
        tuner.result()


def test_a_deleted_id_can_come_back():
    ds = awkward(n=700, d=12, seed=13)
    ids = [f"r{i}" for i in range(700)]
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    tuner.fit(ds.corpus, ds.train, ds.dev, ids=ids)
    free = [i for i in range(700) if i not in set(tuner.touched.tolist())][:2]
    tuner.delete_records(ids=[ids[free[0]]])
    with pytest.raises(ValueError, match="already deleted"):
        tuner.delete_records(ids=[ids[free[0]]])
    tuner.add_records(np.asarray(ds.corpus[free[1]:free[1] + 1], np.float32), ids=[ids[free[0]]])
    assert tuner.positions_of([ids[free[0]]]).tolist() == [700]
    assert tuner.delete_records(ids=[ids[free[0]]]).deleted.tolist() == [700]


@pytest.mark.parametrize("seed", range(6))
def test_tiny_corpora_with_complete_lists(seed):
    """N of 6 to 11 with margins 1-3: lists that hold the whole pool, every record touched at
    times, near-ties rescanned with a wider pass; every step against a fresh fit."""
    rng = np.random.default_rng(seed)
    n, d = 6 + seed, 6
    corpus = rng.standard_normal((n, d)).astype(np.float32)
    corpus[-1] = corpus[0] * 4  # an exact duplicate direction
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)

    def qset(m):
        ans = rng.integers(0, n, m)
        q = corpus[ans] + 0.3 * rng.standard_normal((m, d)).astype(np.float32)
        return nf.QuerySet(q.astype(np.float32), [[int(a)] for a in ans])
    train, val = qset(4), qset(5)
    for est in (nf.NudgeN(progress=False), nf.NudgeN(k_val=2, progress=False),
                nf.NudgeM(progress=False)):
        tuner = nf.Tuner(est, margin=1 + seed % 3)
        tuner.fit(corpus, train, val)
        model = FinalInputs(corpus, train, val)
        check_same(tuner, model, est)
        run_ops(tuner, model, np.random.default_rng(seed + 50), 8, est)


def test_record_ids_are_unique_and_of_one_kind():
    ds = awkward(n=600, d=10, seed=14)
    ids = [f"r{i}" for i in range(600)]
    tuner = nf.Tuner(nf.NudgeN(progress=False))
    with pytest.raises(ValueError, match="'r3' names more than one record"):
        tuner.fit(ds.corpus, ds.train, ds.dev, ids=ids[:599] + ["r3"])
    with pytest.raises(TypeError, match="all strings, got None"):
        tuner.fit(ds.corpus, ds.train, ds.dev, ids=ids[:599] + [None])
    with pytest.raises(ValueError, match="does not fit in int64"):
        tuner.fit(ds.corpus, ds.train, ds.dev,
                  ids=np.arange(600, dtype=np.uint64) + np.uint64(2 ** 63))
    tuner.fit(ds.corpus, ds.train, ds.dev, ids=ids)
    row = np.asarray(ds.corpus[:1], np.float32)
    with pytest.raises(ValueError, match="'r0' already names a record"):
        tuner.add_records(row, ids=["r0"])
    with pytest.raises(ValueError, match="names more than one record"):
        tuner.add_records(np.repeat(row, 2, axis=0), ids=["x", "x"])
    assert tuner.n_records == 600


def test_combine_refuses_deltas_of_other_tuners():
    a = nf.Tuner(nf.NudgeN(progress=False)).fit(*_small(600, 12, 1))
    b = nf.Tuner(nf.NudgeN(progress=False)).fit(*_small(600, 16, 2))
    c = nf.Tuner(nf.NudgeN(progress=False)).fit(*_small(500, 12, 3))
    with pytest.raises(ValueError, match="vectors of d"):
        nf.Delta.combine([a, b])
    with pytest.raises(ValueError, match="n_records 500 after 600"):
        nf.Delta.combine([a, c])


def _small(n, d, seed):
    ds = awkward(n=n, d=d, seed=seed)
    return ds.corpus, ds.train, ds.dev
