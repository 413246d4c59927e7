"""The Tuner on a dask corpus (2-process LocalCluster): the same deltas, gamma, vectors and
kept lists as the same Tuner on the rows as a NumPy array, through feedback, validation,
records in and out, rescans and a save/load round trip.

Every comparison is against a Tuner on the host array. On cpp and numba every number is the
same bits (the float32 pass scores a record the same whatever block holds it, the float64
re-scoring is the same code); on numpy the pass's last bits depend on the block shape, so the
kept lists may be certified to a different length and rescans come at other times, while
gamma, the deltas' rows and vectors (exact float64 re-ranking) stay the same.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

from conftest import BACKENDS, awkward, real_dataset_params  # noqa: E402
from nudgefast import NudgeM, NudgeN, QuerySet, Tuner, _backends, _dask, datasets  # noqa: E402
from test_dask import AWKWARD_BLOCKS, EXACT, _blocks, _data, _npy_shards, _zarr  # noqa: E402
from test_tuner import near_queries  # noqa: E402

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread each, as in tests/test_dask.py (module scope)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, worker_dashboard_address=None) as cl, \
            distributed.Client(cl) as c:
        yield c


pytestmark = pytest.mark.filterwarnings("ignore:.*have no answers and are skipped")

#: What the summaries may differ in on numpy (see the module docstring): rescan timing.
_TIMING = {"seconds", "rescanned", "rescored"}


def _same_delta(a, b, exact=True):
    assert a.variant == b.variant
    assert a.gamma == b.gamma
    np.testing.assert_array_equal(a.previous_gamma, b.previous_gamma)  # NaN after a fit
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.tuned, b.tuned)
    np.testing.assert_array_equal(a.new, b.new)
    np.testing.assert_array_equal(a.deleted, b.deleted)
    assert a.n_records == b.n_records
    skip = {"seconds"} if exact else _TIMING
    assert ({k: v for k, v in a.summary.items() if k not in skip}
            == {k: v for k, v in b.summary.items() if k not in skip})


def _same_state(host, dask_tuner, exact=True):
    assert isinstance(dask_tuner._corpus, _dask.DaskRows)  # read on the cluster
    assert host.gamma == dask_tuner.gamma
    a, b = host.result(), dask_tuner.result()
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.val_accuracy, b.val_accuracy)
    np.testing.assert_array_equal(host.touched, dask_tuner.touched)
    if exact:
        np.testing.assert_array_equal(host._Li, dask_tuner._Li)
        np.testing.assert_array_equal(host._Ls, dask_tuner._Ls)
        np.testing.assert_array_equal(host._Lcomplete, dask_tuner._Lcomplete)
    else:  # the certified prefixes: the same records with the same float64 scores
        need = host.need
        for q in np.flatnonzero(host._valive):
            m = min((host._Li[q] >= 0).sum(), (dask_tuner._Li[q] >= 0).sum(), need)
            np.testing.assert_array_equal(host._Li[q, :m], dask_tuner._Li[q, :m])
            np.testing.assert_array_equal(host._Ls[q, :m], dask_tuner._Ls[q, :m])


def _reload(both, tmp_path, corpus, x, exact):
    both.host.save(tmp_path / "host.npz")
    both.dask.save(tmp_path / "dask.npz")
    with np.load(tmp_path / "host.npz") as a, np.load(tmp_path / "dask.npz") as b:
        assert a.files == b.files
        for name in a.files:
            if name != "meta" and (exact or name not in ("Ls", "Li", "Lcomplete")):
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    both.host = Tuner.load(tmp_path / "dask.npz", corpus)
    both.dask = Tuner.load(tmp_path / "host.npz", x)
    _same_state(both.host, both.dask, exact)


class Both:
    """One Tuner on the host array, one on the dask corpus: every operation on both, the
    deltas and the states compared after each."""

    def __init__(self, est, corpus, x, train, val, *, margin=2, exact=True, **fit):
        self.host, self.dask = Tuner(est, margin=margin), Tuner(est, margin=margin)
        self.exact = exact
        self.rescanned = 0
        self.do("fit", (corpus, train, val), (x, train, val), **fit)

    def do(self, op, args, dask_args=None, **kw):
        a = getattr(self.host, op)(*args, **kw)
        b = getattr(self.dask, op)(*(args if dask_args is None else dask_args), **kw)
        _same_delta(a, b, self.exact)
        _same_state(self.host, self.dask, self.exact)
        self.rescanned += b.summary.get("rescanned", 0)
        return b


def _operations(both, corpus, rng, *, blocks=AWKWARD_BLOCKS):
    """A fixed mix of every operation, touching records in several blocks (the 1-row one
    too), forcing a rescan."""
    n = corpus.shape[0]
    one_row = int(np.cumsum(blocks)[np.flatnonzero(np.asarray(blocks) == 1)[0]] - 1) \
        if 1 in blocks else 0
    both.do("add_feedback", near_queries(rng, corpus, 12))
    q, a = near_queries(rng, corpus, 3)
    a[0] = [one_row]  # a record alone in its block
    q[0] = corpus[one_row] / np.linalg.norm(corpus[one_row])
    both.do("add_feedback", (q, a))
    # Every kept candidate of a few validation queries joins the touched set: their lists
    # run out (margin 2) and are rescanned (on the cluster, for the dask tuner).
    kept = both.host._Li[:4]
    answers = [[int(x)] for x in np.unique(kept[kept >= 0])]
    both.do("add_feedback", (np.asarray(corpus[[r[0] for r in answers]], np.float32),
                             answers))
    both.do("remove_feedback", (np.arange(0, 40, 3),))
    both.do("add_validation", near_queries(rng, corpus, 25))
    rows = (corpus[rng.choice(n, 9)] + 0.05 * rng.standard_normal((9, corpus.shape[1]))
            ).astype(corpus.dtype)
    ids = None if both.host.ids is None else [f"new{i}" for i in range(rows.shape[0])]
    both.do("add_records", (rows,), ids=ids)
    both.do("add_feedback", near_queries(rng, np.concatenate([corpus, rows]), 6))
    touched = both.host.touched
    both.do("delete_records", (np.r_[touched[:2], n + 3, one_row + 1],))
    alive = np.flatnonzero(both.host._tq_alive)
    both.do("remove_feedback", (alive[1:40:4],))  # reverts: rows back in the lists
    # Validation queries near the added rows: their passes merge the cluster's list with
    # the added rows (scored here) and the added rows make the lists.
    q, a = near_queries(rng, rows, 6, spread=0.05)
    both.do("add_validation", (q, [[n + x for x in ans if n + x not in both.host._deleted]
                                   or [0] for ans in a]))
    assert (both.host._Li[-6:] >= n).any()


@pytest.mark.parametrize("variant", ["nudge-n", "nudge-m"])
@pytest.mark.parametrize("backend", [b for b in ("cpp", "numba", "numpy") if b in BACKENDS])
def test_tuner_on_awkward_blocks_equals_host(client, tmp_path, backend, variant):
    ds, corpus, _ = _data()
    est = (NudgeN(backend=backend, k_val=3, progress=False) if variant == "nudge-n"
           else NudgeM(backend=backend, progress=False))
    exact = backend in EXACT
    both = Both(est, corpus, _blocks(corpus), ds.train, ds.dev, exact=exact,
                ids=[f"r{i}" for i in range(corpus.shape[0])])
    assert both.dask._corpus.last_backends == (backend,)  # the workers ran the pass
    rng = np.random.default_rng(11)
    _operations(both, corpus, rng)
    assert both.rescanned > 0, "the sequence should force a rescan on the cluster"
    assert both.host.gamma > 0
    # Save both; load each state on the other's corpus (the dask one chunked otherwise),
    # continue: still the same (a load re-derives the screening thresholds, so both sides
    # are loaded states).
    _reload(both, tmp_path, corpus, _blocks(corpus, (1, 600, 636)), exact)
    both.do("add_feedback", near_queries(rng, corpus, 7, both.host._deleted))
    live = np.setdiff1d(np.arange(corpus.shape[0]), both.host._deleted)
    both.do("delete_records", (None,), ids=[f"r{p}" for p in live[[5, 900]]])
    both.do("add_validation", near_queries(rng, corpus, 8, both.host._deleted))


@pytest.mark.parametrize("source", ["zarr", "npy"])
def test_tuner_on_zarr_and_npy_shards(client, tmp_path, source):
    backend = EXACT[0] if EXACT else "numpy"
    ds, corpus, _ = _data(seed=3, n=503, d=9)
    if source == "zarr":
        x = _zarr(tmp_path, corpus, 64)
    else:
        x = _npy_shards(tmp_path, corpus, (1, 250, 252), 100)
    both = Both(NudgeN(backend=backend, k_val=2, progress=False), corpus, x, ds.train,
                ds.dev, margin=1, exact=backend in EXACT)
    rng = np.random.default_rng(5)
    both.do("add_feedback", near_queries(rng, corpus, 20))
    both.do("add_validation", near_queries(rng, corpus, 6))
    both.do("delete_records", (both.host.touched[:3],))
    _reload(both, tmp_path, corpus, x, both.exact)
    both.do("add_records", (corpus[:4] * 1.25,))
    both.do("remove_feedback", (np.arange(0, 60, 2),))


def test_tuner_reads_rows_with_its_passes(client, tmp_path, monkeypatch):
    """A fit gathers no row by itself: the touched rows (and NUDGE-M's validation answers)
    come back with its pass, and the workers score the candidates in float64 (not one gather
    per block of validation queries, no candidate rows at all); a new validation query's
    pass brings its answers along too. Feedback gathers the rows it newly touches in one
    compute; a load gathers the fingerprint's 64 rows (and NUDGE-M's answers) once each."""
    ds = awkward(n_dev=600)  # the float64 re-scoring takes 256 validation queries at a time
    corpus = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    gathered, passes = [], []
    gather, scan = _dask.gather_rows, _dask.topk_pass
    monkeypatch.setattr(_dask, "gather_rows",
                        lambda a, o, rows: gathered.append(rows) or gather(a, o, rows))
    monkeypatch.setattr(_dask, "topk_pass",
                        lambda *a, **kw: passes.append(kw.get("exact")) or scan(*a, **kw))
    rng = np.random.default_rng(3)
    for est, extra in ((NudgeN(progress=False), 0), (NudgeM(progress=False), 1)):
        gathered.clear()
        passes.clear()
        both = Both(est, corpus, _blocks(corpus), ds.train, ds.dev, margin=4)
        assert passes and all(passes) and not gathered
        both.do("add_validation", near_queries(rng, corpus, 20))
        assert len(passes) >= 2 and not gathered
        passes.clear()
        delta = both.do("add_feedback", near_queries(rng, corpus, 30))
        assert delta.summary["rescanned"] == 0 and not passes
        assert len(gathered) <= 1 and sum(r.size for r in gathered) <= 30
        gathered.clear()
        both.dask.save(tmp_path / "state.npz")
        # The fingerprint's rows, in one gather (those not held already).
        assert len(gathered) == 1 and gathered[0].size <= 64
        gathered.clear()
        both.dask = Tuner.load(tmp_path / "state.npz", _blocks(corpus))
        assert len(gathered) == 1 + extra and gathered[0].size == 64
        both.host.save(tmp_path / "host.npz")
        both.host = Tuner.load(tmp_path / "host.npz", corpus)
        assert both.dask._fingerprint(_dask.as_corpus("corpus", _blocks(corpus))) \
            == both.host._fingerprint(corpus)  # the same rows hash alike
        both.do("remove_feedback", (np.arange(0, 200, 3),))


def test_load_with_dask_corpus_checks_it(client, tmp_path):
    ds, corpus, _ = _data(seed=3, n=503, d=9)
    x = _blocks(corpus, (1, 250, 251, 1))
    tuner = Tuner(NudgeN(progress=False))
    tuner.fit(x, ds.train, ds.dev)
    path = tmp_path / "state.npz"
    tuner.save(path)
    with pytest.raises(ValueError, match=r"fitted on a dask corpus; pass that dask array"):
        Tuner.load(path)
    other = corpus.copy()
    other[-1] += 1  # a fingerprinted row (the last one, alone in its block)
    with pytest.raises(ValueError, match="other values"):
        Tuner.load(path, _blocks(other, (1, 250, 251, 1)))
    with pytest.raises(ValueError, match="saved for a float32 corpus of shape"):
        Tuner.load(path, _blocks(corpus[:500], (250, 250)))
    with pytest.raises(ValueError, match=r"rechunk\(\{1: -1\}\)"):
        Tuner.load(path, da.from_array(corpus, chunks=(100, 4)))
    # The same rows, whatever holds them: a host state loads on the dask rows and back.
    assert Tuner.load(path, corpus).gamma == tuner.gamma
    host = Tuner(NudgeN(progress=False))
    host.fit(corpus, ds.train, ds.dev)
    host.save(tmp_path / "host.npz")
    again = Tuner.load(tmp_path / "host.npz", x)
    assert isinstance(again._corpus, _dask.DaskRows) and again.gamma == host.gamma


@pytest.mark.parametrize("folder", real_dataset_params()[:1])
def test_real_data_feedback_stream_identical(client, folder):
    """The real corpus (float16) as .npy blocks read by the workers: half of the train
    feedback at fit, the rest streamed, some withdrawn: the host tuner's every delta."""
    ds = datasets.load(folder)
    x = _dask.npy_corpus([folder / "corpus.npy"], block_rows=20_001)
    emb = np.asarray(ds.train.embeddings, np.float32)
    n = len(ds.train)
    half = n // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = Both(NudgeN(progress=False), ds.corpus, x,
                    QuerySet(emb[:half], ds.train.answers[:half]), ds.dev,
                    exact=_backends.resolve("auto") in EXACT)
    step = -(-(n - half) // 3)
    for s in range(half, n, step):
        both.do("add_feedback", (emb[s:s + step], ds.train.answers[s:s + step]))
    both.do("remove_feedback", (np.arange(0, n, 17),))
    assert both.host.gamma > 0
