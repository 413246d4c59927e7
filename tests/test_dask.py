"""Dask corpora on a 2-process LocalCluster: the same answers as one machine.

Every comparison is against the single-machine path on the same rows (a NumPy array, or the
Zarr / .npy data read back), never against a tolerance where the backend promises bits: the
cpp and numba ``topk_update`` give a record the same float32 score whatever chunk holds it.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from conftest import BACKENDS, awkward, real_dataset_params  # noqa: E402
from nudgefast import NudgeM, NudgeN, Tuner, _backends, datasets, quantize, search  # noqa: E402
from nudgefast import _dask  # noqa: E402
from nudgefast.search import topk_pass  # noqa: E402

#: The backends whose block scores equal the one-machine chunk loop's bit for bit.
EXACT = [b for b in ("cpp", "numba") if b in BACKENDS]
#: Row blocks not a multiple of any tile (4, 8, 16, 64, 256...), one block of 1 row.
AWKWARD_BLOCKS = (300, 1, 517, 419)  # 1237 rows, awkward()'s default


@pytest.fixture(scope="module")
def client():
    """Two worker processes of one thread each (what the issue's CI runs); module scope, as
    starting it costs seconds. Every compute in this module runs on it (the default client)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, worker_dashboard_address=None) as cl, \
            distributed.Client(cl) as c:
        import nudgefast
        where = set(c.run(lambda: __import__("nudgefast").__file__).values())
        assert where == {nudgefast.__file__}, f"workers import another nudgefast: {where}"
        yield c


def _data(seed=0, n=1237, d=37):
    ds = awkward(n=n, d=d, seed=seed)
    corpus = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    return ds, corpus, np.ascontiguousarray(ds.dev.embeddings, dtype=np.float32)


def _blocks(corpus, blocks=AWKWARD_BLOCKS):
    assert sum(blocks) == corpus.shape[0]
    return da.from_array(corpus, chunks=(blocks, (corpus.shape[1],)))


def _zarr(tmp_path, corpus, rows_per_chunk):
    zarr = pytest.importorskip("zarr")
    z = zarr.open_array(str(tmp_path / "corpus.zarr"), mode="w", shape=corpus.shape,
                        chunks=(rows_per_chunk, corpus.shape[1]), dtype=corpus.dtype)
    z[...] = corpus
    return da.from_zarr(str(tmp_path / "corpus.zarr"))


def _npy_shards(tmp_path, corpus, sizes, block_rows):
    """.npy shards of ``sizes`` rows, each read as a memmap, cut in blocks of ``block_rows``."""
    parts, lo = [], 0
    for s, size in enumerate(sizes):
        path = tmp_path / f"shard{s}.npy"
        np.save(path, corpus[lo:lo + size])
        lo += size
        parts.append(da.from_array(np.load(path, mmap_mode="r"), chunks=(block_rows, -1)))
    assert lo == corpus.shape[0]
    return da.concatenate(parts, axis=0)


def _same_search(a, b):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def _same_fit(a, b):
    assert a.gamma == b.gamma
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    np.testing.assert_array_equal(a.gammas, b.gammas)
    np.testing.assert_array_equal(a.val_accuracy, b.val_accuracy)
    assert a.n_records == b.n_records


# ----------------------------------------------------------------------------------------
# Arguments (no cluster needed: they fail before any task runs)


def test_column_chunked_corpus_names_the_rechunk():
    _, corpus, q = _data()
    x = da.from_array(corpus, chunks=(500, 20))
    with pytest.raises(ValueError, match=r"corpus: .*chunked along its columns.*"
                                         r"corpus\.rechunk\(\{1: -1\}\)"):
        search(q, x, 3)
    ds = awkward()
    with pytest.raises(ValueError, match=r"rechunk\(\{1: -1\}\)"):
        NudgeN().fit(x, ds.train, ds.dev)


def test_bad_dask_corpora_name_the_fix():
    _, corpus, q = _data()
    with pytest.raises(TypeError, match=r"corpus: dtype int32 .*astype\(np.float32\)"):
        search(q, da.from_array(corpus.astype(np.int32), chunks=(400, -1)), 3)
    with pytest.raises(ValueError, match=r"corpus: expected a 2-D dask array"):
        search(q, da.from_array(corpus[:, 0], chunks=400), 3)
    x = da.from_array(corpus, chunks=(400, -1))
    unknown = x[x[:, 0] > -np.inf]  # boolean mask: block sizes unknown until computed
    with pytest.raises(ValueError, match=r"compute_chunk_sizes\(\)"):
        search(q, unknown, 3)


def test_functions_without_dask_support_refuse_to_gather():
    """A corpus argument that has no dask path (quantize, compat, the rows the Tuner's
    add_records keeps) must not np.asarray a dask array into the client: it says so and names
    the explicit fix. (The Tuner's corpus is read on its cluster: tests/test_dask_tuner.py.)"""
    ds, corpus, _ = _data()
    with pytest.raises(TypeError, match=r"x: a dask array .*x\.compute\(\)"):
        quantize(_blocks(corpus), "int8")
    tuner = Tuner(NudgeN(progress=False))
    tuner.fit(corpus, ds.train, ds.dev)
    with pytest.raises(TypeError, match=r"rows: a dask array .*rows\.compute\(\)"):
        tuner.add_records(_blocks(corpus[:5], (5,)))


# ----------------------------------------------------------------------------------------
# The pass


@pytest.mark.parametrize("backend", EXACT)
def test_search_identical_awkward_blocks(client, backend):
    _, corpus, q = _data()
    one = search(q, corpus, 9, backend=backend)
    _same_search(search(q, _blocks(corpus), 9, backend=backend), one)
    # Blocks smaller than k, an empty block, and blocks smaller than the loop's chunks.
    _same_search(search(q, _blocks(corpus, (5, 1, 0, 3, 1228)), 9, backend=backend), one)
    _same_search(search(q, _blocks(corpus), 9, backend=backend, chunk_rows=64), one)


def test_local_scheduler_without_cluster():
    """Without a cluster (Dask's synchronous scheduler) the same pass gives the same answers."""
    ds, corpus, q = _data()
    with dask.config.set(scheduler="synchronous"):
        _same_search(search(q, _blocks(corpus), 9), search(q, corpus, 9))
        _same_fit(NudgeN(k_val=3).fit(_blocks(corpus), ds.train, ds.dev),
                  NudgeN(k_val=3).fit(corpus, ds.train, ds.dev))


def test_search_numpy_backend_within_rounding(client):
    """numpy's BLAS product rounds differently with the block's shape: the same records up to
    ties of the last bits, scores within a float32 rounding."""
    _, corpus, q = _data()
    one = search(q, corpus, 9, backend="numpy")
    got = search(q, _blocks(corpus), 9, backend="numpy")
    np.testing.assert_allclose(got.scores, one.scores, rtol=0, atol=4e-6)
    assert (got.indices == one.indices).mean() > 0.99


@pytest.mark.parametrize("backend", EXACT)
def test_search_dot_metric_and_float16(client, backend):
    _, corpus, q = _data(seed=1, n=997, d=64)
    half = corpus.astype(np.float16)
    blocks = (333, 1, 600, 63)
    _same_search(search(q, _blocks(half, blocks), 7, backend=backend),
                 search(q, half, 7, backend=backend))
    _same_search(search(q, _blocks(corpus, blocks), 7, metric="dot", backend=backend),
                 search(q, corpus, 7, metric="dot", backend=backend))


def test_ties_across_blocks_keep_lower_index(client):
    """Equal records in different blocks: the lower index first, as on one machine, whatever
    order the merge tree meets them in."""
    rng = np.random.default_rng(5)
    corpus = np.repeat(rng.standard_normal((1, 16)).astype(np.float32), 50, axis=0)
    corpus[7] *= 2.0  # same direction: the same cosine up to rounding, still a candidate
    q = rng.standard_normal((4, 16)).astype(np.float32)
    x = _blocks(corpus, (3, 1, 17, 9, 20))
    got = search(q, x, 6, backend=EXACT[0] if EXACT else "numpy")
    _same_search(got, search(q, corpus, 6, backend=EXACT[0] if EXACT else "numpy"))
    plain = np.delete(np.arange(50), 7)[:6]
    assert (np.sort(got.indices, axis=1)[:, :5] <= plain[5]).all()


@pytest.mark.parametrize("backend", EXACT)
def test_exclusions_across_block_boundaries(client, backend):
    """Excluded rows at the first/last row of blocks, the 1-row block, and spanning blocks:
    the same top-k as the one-machine pass with the same exclusions."""
    _, corpus, q = _data()
    offsets = np.cumsum((0,) + AWKWARD_BLOCKS)  # 0, 300, 301, 818, 1237
    exclude = np.unique(np.r_[0, 299, 300, 301, 817, 818, 1236, np.arange(290, 310),
                              np.arange(810, 830)]).astype(np.int64)
    assert np.isin(offsets[1:-1], exclude).all()
    impl = _backends.get(backend)
    x = _dask.as_corpus("corpus", _blocks(corpus), backend)
    got = topk_pass(impl, q, x, 11, exclude=exclude)
    one = topk_pass(impl, q, corpus, 11, exclude=exclude)
    np.testing.assert_array_equal(got[1], one[1])
    np.testing.assert_array_equal(got[0], one[0])
    assert not np.isin(got[1], exclude).any()
    # Excluding all but 3 rows: k=5 leaves -inf / -1 padding, as on one machine.
    keep = np.array([0, 300, 1236])
    everything = np.setdiff1d(np.arange(corpus.shape[0]), keep)
    got = topk_pass(impl, q, x, 5, exclude=everything)
    one = topk_pass(impl, q, corpus, 5, exclude=everything)
    np.testing.assert_array_equal(got[1], one[1])
    np.testing.assert_array_equal(got[0], one[0])
    assert (got[1][:, 3:] == -1).all() and np.isneginf(got[0][:, 3:]).all()


def _error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("what", ["nan", "inf", "zero"])
def test_bad_row_in_third_block_names_global_row(client, what):
    ds, corpus, q = _data()
    # Untouched rows (they reach the fit's pass, not its gradient step): one in the 3rd block
    # (rows 301..817), and a later one in the 4th: the first is the one reported.
    untouched = np.setdiff1d(np.arange(corpus.shape[0]), ds.train.csr().index)
    row = int(untouched[untouched >= 301 + 200][0])
    later = int(untouched[untouched >= 1000][0])
    assert row < 818 <= later
    for r in (row, later):
        corpus[r] = {"nan": np.nan, "inf": np.inf, "zero": 0.0}[what]
        if what != "zero":
            corpus[r, 1:] = 1.0  # one bad value in an otherwise ordinary row
    x = _blocks(corpus)
    one = _error(lambda: search(q, corpus, 5))
    assert f"row {row} " in one
    assert _error(lambda: search(q, x, 5)) == one
    assert _error(lambda: NudgeN().fit(x, ds.train, ds.dev)) == \
        _error(lambda: NudgeN().fit(corpus, ds.train, ds.dev))
    if what == "zero":  # a zero row is a fine record for the dot metric
        _same_search(search(q, x, 5, metric="dot"), search(q, corpus, 5, metric="dot"))


# ----------------------------------------------------------------------------------------
# Per-worker backends: backend="auto" resolves on each worker


@pytest.fixture
def worker_auto(client):
    """``set_order({worker address: order})`` sets ``_backends.AUTO_ORDER`` in those worker
    processes (what "auto" tries there: a stand-in for a worker with another install); every
    worker's order is restored afterwards."""
    def set_order(orders):
        for addr, order in orders.items():
            client.run(lambda: setattr(__import__("nudgefast._backends")._backends,
                                       "AUTO_ORDER", tuple(order)), workers=[addr])
        got = client.run(lambda: __import__("nudgefast._backends")._backends.resolve("auto"))
        assert {a: got[a] for a in orders} == {a: o[0] for a, o in orders.items()}

    yield set_order
    default = _backends.AUTO_ORDER
    client.run(lambda: setattr(__import__("nudgefast._backends")._backends, "AUTO_ORDER",
                               default))


def _workers(client):
    return sorted(client.scheduler_info()["workers"])


@pytest.mark.skipif(not {"cpp", "numba"} <= set(BACKENDS), reason="needs cpp and numba")
def test_auto_resolves_on_each_worker(client, worker_auto, caplog):
    """backend="auto" is each worker's own choice, not the client's: workers whose best is
    numba give numba's bits (which differ from cpp's in the last place), while the client's
    "auto" is cpp; an explicit name is used on every worker."""
    ds, corpus, q = _data()
    x = _blocks(corpus)
    assert _backends.resolve("auto") == "cpp"
    caplog.set_level(logging.INFO, logger="nudgefast")
    # Every worker with the client's backend: the one-machine answers, bit for bit.
    _same_search(search(q, x, 9), search(q, corpus, 9))
    assert "scanned with backend(s) cpp (requested 'auto')" in caplog.text
    numba_one, cpp_one = (search(q, corpus, 9, backend=b) for b in ("numba", "cpp"))
    assert not np.array_equal(numba_one.scores, cpp_one.scores)  # the test can tell them apart
    worker_auto({a: ("numba", "numpy") for a in _workers(client)})
    caplog.clear()
    _same_search(search(q, x, 9), numba_one)
    assert "scanned with backend(s) numba (requested 'auto')" in caplog.text
    caplog.clear()
    _same_search(search(q, x, 9, backend="cpp"), cpp_one)  # explicit: honoured everywhere
    assert "scanned with backend(s) cpp (requested 'cpp')" in caplog.text
    # The fits re-rank in float64: the same fit whichever backend the workers ran.
    _same_fit(NudgeN(k_val=3).fit(x, ds.train, ds.dev),
              NudgeN(k_val=3).fit(corpus, ds.train, ds.dev))
    res = NudgeM().fit(corpus, ds.train, ds.dev)
    np.testing.assert_array_equal(res.apply(x).compute(), res.apply(corpus, backend="numba"))


@pytest.mark.skipif(not {"cpp", "numba"} <= set(BACKENDS), reason="needs cpp and numba")
def test_mixed_worker_backends(client, worker_auto, caplog):
    """One worker's best is numba, the other's cpp: each block runs on its worker's backend;
    the search agrees with one machine to float32 rounding, the fits bit for bit."""
    ds, corpus, q = _data()
    a, b = _workers(client)
    worker_auto({a: ("numba", "numpy"), b: ("cpp", "numba", "numpy")})
    x = _blocks(corpus, (100,) * 12 + (37,))  # 13 blocks: both (idle) workers take some
    caplog.set_level(logging.INFO, logger="nudgefast")
    got = search(q, x, 9)
    assert "scanned with backend(s) cpp, numba (requested 'auto')" in caplog.text
    one = search(q, corpus, 9)
    np.testing.assert_allclose(got.scores, one.scores, rtol=0, atol=4e-6)
    assert (got.indices == one.indices).mean() > 0.99
    for cls, kw in ((NudgeN, {"k_val": 3}), (NudgeM, {})):
        _same_fit(cls(**kw).fit(x, ds.train, ds.dev), cls(**kw).fit(corpus, ds.train, ds.dev))


@pytest.mark.skipif(not {"cpp", "numba"} <= set(BACKENDS), reason="needs cpp and numba")
def test_explicit_backend_missing_on_a_worker(client):
    """An explicit backend a worker lacks is an error naming it and the fix, raised from the
    worker: no silent fall back to that worker's "auto"."""
    _, corpus, q = _data()
    a = _workers(client)[0]
    broken = (None, "ImportError: no numba here; fix: pip install numba")
    client.run(lambda: __import__("nudgefast._backends")._backends._cache.__setitem__(
        "numba", broken), workers=[a])
    try:
        with pytest.raises(RuntimeError, match=r"backend='numba' is not available here: "
                                               r"ImportError: no numba here; fix: pip install"):
            search(q, _blocks(corpus, (100,) * 12 + (37,)), 9, backend="numba")
    finally:
        client.run(lambda: __import__("nudgefast._backends")._backends._cache.pop("numba"),
                   workers=[a])
    _same_search(search(q, _blocks(corpus), 9, backend="numba"),
                 search(q, corpus, 9, backend="numba"))


# ----------------------------------------------------------------------------------------
# Sources: Zarr, .npy memmaps


@pytest.mark.parametrize("backend", EXACT)
def test_zarr_corpus(client, tmp_path, backend):
    ds, corpus, q = _data()
    x = _zarr(tmp_path, corpus, 250)  # 5 blocks, the last of 237 rows
    assert x.chunks[0] == (250, 250, 250, 250, 237)
    _same_search(search(q, x, 9, backend=backend), search(q, corpus, 9, backend=backend))
    _same_fit(NudgeN(backend=backend, k_val=3).fit(x, ds.train, ds.dev),
              NudgeN(backend=backend, k_val=3).fit(corpus, ds.train, ds.dev))


@pytest.mark.parametrize("backend", EXACT)
def test_npy_shard_corpus(client, tmp_path, backend):
    ds, corpus, q = _data()
    x = _npy_shards(tmp_path, corpus, (600, 1, 636), 211)
    assert 1 in x.chunks[0] and len(x.chunks[0]) > 3
    _same_search(search(q, x, 9, backend=backend), search(q, corpus, 9, backend=backend))
    _same_fit(NudgeM(backend=backend).fit(x, ds.train, ds.dev),
              NudgeM(backend=backend).fit(corpus, ds.train, ds.dev))


@pytest.mark.parametrize("backend", EXACT)
def test_npy_corpus_opened_on_workers(client, tmp_path, backend):
    """_dask.npy_corpus: the graph holds paths and row ranges, not the data; the same answers."""
    import pickle

    ds, corpus, q = _data()
    paths = []
    for s, (lo, hi) in enumerate([(0, 700), (700, 701), (701, 1237)]):
        paths.append(tmp_path / f"shard{s}.npy")
        np.save(paths[-1], corpus[lo:hi])
    x = _dask.npy_corpus(paths, block_rows=333)
    assert x.chunks[0] == (333, 333, 34, 1, 333, 203)
    assert len(pickle.dumps(dict(x.__dask_graph__()))) < 16_000  # corpus: 183 kB
    _same_search(search(q, x, 9, backend=backend), search(q, corpus, 9, backend=backend))
    _same_fit(NudgeN(backend=backend, k_val=3).fit(x, ds.train, ds.dev),
              NudgeN(backend=backend, k_val=3).fit(corpus, ds.train, ds.dev))


def test_npy_corpus_arguments(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((5, 4), np.float32))
    np.save(tmp_path / "b.npy", np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"paths: .*b\.npy holds a float32 array of shape "
                                         r"\(5, 3\); every shard must be 2-D \(4 columns\)"):
        _dask.npy_corpus([tmp_path / "a.npy", tmp_path / "b.npy"])
    with pytest.raises(ValueError, match=r"block_rows: must be an int >= 1"):
        _dask.npy_corpus([tmp_path / "a.npy"], block_rows=0)
    with pytest.raises(ValueError, match=r"paths: no \.npy shard given"):
        _dask.npy_corpus([])
    x = _dask.npy_corpus(tmp_path / "a.npy")
    assert x.chunks == ((5,), (4,))


def _wire_bytes(client):
    """Bytes the workers wrote answering data requests (to each other, the scheduler, the
    client) since their ``transfer_outgoing_log`` was cleared: what ``comm.write`` reports,
    not dask's ``sizeof`` estimate (``transfer_outgoing_bytes_total``), which takes a block's
    (1, 1) object array of lists for 8 bytes."""
    return sum(sum(e["compressed"] for e in log) for log in client.run(
        lambda dask_worker: list(dask_worker.transfer_outgoing_log)).values())


def test_gathered_rows_cross_once(client, tmp_path):
    """gather_rows: each block's rows go from the worker that read the block to the client:
    no block moves to another worker to be sliced there, and no worker concatenates the rows
    first (dask.compute's finalize task: twice the bytes). Before the fix 1.6-1.9 MB moved
    here for 768 kB of rows."""
    rng = np.random.default_rng(4)
    corpus = rng.standard_normal((40_000, 64)).astype(np.float32)
    np.save(tmp_path / "c.npy", corpus)
    x = _dask.npy_corpus([tmp_path / "c.npy"], block_rows=3_000)
    offsets = np.r_[0, np.cumsum(x.chunks[0])]
    wanted = np.unique(rng.choice(40_000, 3_000, replace=False))
    client.run(lambda dask_worker: dask_worker.transfer_outgoing_log.clear())
    np.testing.assert_array_equal(_dask.gather_rows(x, offsets, wanted), corpus[wanted])
    rows = wanted.size * 64 * 4  # 768 kB
    moved = _wire_bytes(client)
    assert rows <= moved < 1.1 * rows + 64 * 1024, f"{moved} bytes for {rows} bytes of rows"


@pytest.mark.parametrize("source", ["zarr", "npy"])
def test_corpus_stays_on_the_workers(client, tmp_path, source):
    """A corpus the workers read themselves (Zarr, .npy shards): what leaves them during a
    search (to each other and to the client) is the (n_q, k) lists, not the corpus."""
    rng = np.random.default_rng(9)
    corpus = rng.standard_normal((40_000, 64)).astype(np.float32)  # 10 MB
    q = rng.standard_normal((20, 64)).astype(np.float32)
    if source == "zarr":
        x = _zarr(tmp_path, corpus, 3_000)  # 14 blocks
    else:
        np.save(tmp_path / "c.npy", corpus)
        x = _dask.npy_corpus([tmp_path / "c.npy"], block_rows=3_000)

    client.run(lambda dask_worker: dask_worker.transfer_outgoing_log.clear())
    got = search(q, x, 10)
    moved = _wire_bytes(client)
    _same_search(got, search(q, corpus, 10))
    print(f"{source}: {moved} bytes left the workers")
    per_block = 20 * 10 * (4 + 8)  # one (n_q, k) float32 + int64 list
    assert moved < 14 * per_block * 4 + 64 * 1024, f"{moved} bytes left the workers"
    assert moved < corpus.nbytes / 50


def test_lists_merge_per_worker(client, tmp_path):
    """Each worker merges the lists of the blocks it scanned before anything leaves it: what
    crosses the network is one (n_q, k) list per worker, whatever the number of blocks
    (issue 13: O(n_val k workers)), plus the queries to the workers. (The binary merge tree
    this replaced moved more with more blocks: 3.0 MB for 16 blocks, 3.6 MB for 32, in the
    2M report.)"""
    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((40_000, 32)).astype(np.float32)
    q = rng.standard_normal((500, 32)).astype(np.float32)
    np.save(tmp_path / "c.npy", corpus)
    one = search(q, corpus, 10)
    per_list = 500 * 10 * (4 + 8)  # float32 scores + int64 rows: 60 kB
    workers = len(_workers(client))
    for block_rows in (10_000, 1_000):  # 4 and 40 blocks
        x = _dask.npy_corpus([tmp_path / "c.npy"], block_rows=block_rows)
        client.run(lambda dask_worker: dask_worker.transfer_outgoing_log.clear())
        got = search(q, x, 10)
        moved = _wire_bytes(client)
        _same_search(got, one)
        # + the queries, which one worker fetches from the other (one graph key)
        assert moved < workers * per_list * 1.2 + q.nbytes * (workers - 1) + 32 * 1024, \
            f"{moved} bytes for {x.numblocks[0]} blocks"


# ----------------------------------------------------------------------------------------
# Fits


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize("seed,n,d,blocks", [(0, 1237, 37, AWKWARD_BLOCKS),
                                             (3, 503, 9, (1, 250, 251, 1))])
def test_fits_identical(client, backend, seed, n, d, blocks):
    ds, corpus, q = _data(seed, n, d)
    x = _blocks(corpus, blocks)
    n_one = NudgeN(backend=backend, k_val=3).fit(corpus, ds.train, ds.dev)
    n_dask = NudgeN(backend=backend, k_val=3).fit(x, ds.train, ds.dev)
    _same_fit(n_dask, n_one)
    assert n_one.gamma > 0  # the comparison covers tuned vectors that moved
    _same_fit(NudgeM(backend=backend).fit(x, ds.train, ds.dev),
              NudgeM(backend=backend).fit(corpus, ds.train, ds.dev))
    # Searching the tuned corpus: the touched rows (in every block) are excluded from the
    # distributed pass and merged from the delta on the client.
    assert len(np.unique(np.searchsorted(np.cumsum(blocks), n_one.indices, side="right"))) > 1
    got = search(q, x, 9, delta=n_dask, backend=backend)
    one = search(q, corpus, 9, delta=n_one, backend=backend)
    if backend in EXACT:
        _same_search(got, one)
    else:  # numpy: the untouched records' float32 scores within rounding (see above)
        np.testing.assert_allclose(got.scores, one.scores, rtol=0, atol=4e-6)


def test_fit_reads_its_rows_with_its_pass(client, monkeypatch):
    """A fit's rows come back with its one pass (the touched records, NUDGE-M's untouched
    answers) and its candidates are scored in float64 on the workers: no gather of its own
    (each is a round trip and, on Zarr, a read of every chunk holding a wanted row), and the
    answers equal one machine's."""
    ds = awkward(n_dev=600)  # the float64 re-scoring takes 256 validation queries at a time
    corpus = np.ascontiguousarray(ds.corpus, dtype=np.float32)
    gathered, passes = [], []
    gather, scan = _dask.gather_rows, _dask.topk_pass
    monkeypatch.setattr(_dask, "gather_rows",
                        lambda a, o, rows: gathered.append(rows) or gather(a, o, rows))
    monkeypatch.setattr(_dask, "topk_pass",
                        lambda *a, **kw: passes.append(kw) or scan(*a, **kw))
    x = _blocks(corpus)
    for cls in (NudgeN, NudgeM):
        gathered.clear()
        passes.clear()
        _same_fit(cls().fit(x, ds.train, ds.dev), cls().fit(corpus, ds.train, ds.dev))
        assert len(passes) == 1 and passes[0]["exact"] and not gathered


def test_reference_mode_float64(client):
    """precision="float64" (numpy backend): the float64 pass state travels and merges too."""
    ds, corpus, q = _data(seed=3, n=503, d=9)
    x = _blocks(corpus, (1, 250, 251, 1))
    for cls in (NudgeN, NudgeM):
        _same_fit(cls(backend="numpy", precision="float64").fit(x, ds.train, ds.dev),
                  cls(backend="numpy", precision="float64").fit(corpus, ds.train, ds.dev))


@pytest.mark.parametrize("folder", real_dataset_params())
def test_real_data_nudge_n_identical(client, folder):
    ds = datasets.load(folder)
    corpus = ds.corpus  # a memmap of folder/corpus.npy (float16)
    x = _dask.npy_corpus([folder / "corpus.npy"], block_rows=20_001)
    assert x.dtype == corpus.dtype and x.shape == corpus.shape
    one = NudgeN().fit(corpus, ds.train, ds.dev)
    got = NudgeN().fit(x, ds.train, ds.dev)
    _same_fit(got, one)
    assert one.gamma > 0


# ----------------------------------------------------------------------------------------
# apply: the tuned corpus, lazily or into Zarr


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
def test_apply_lazy_identical(client, backend):
    ds, corpus, _ = _data()
    x = _blocks(corpus)
    for cls in (NudgeN, NudgeM):
        res = cls(backend=backend).fit(corpus, ds.train, ds.dev)
        assert len(np.unique(np.searchsorted(np.cumsum(AWKWARD_BLOCKS), res.indices,
                                             side="right"))) > 1
        tuned = res.apply(x, backend=backend)
        assert isinstance(tuned, da.Array) and tuned.chunks == x.chunks  # nothing computed yet
        assert tuned.dtype == np.float32
        np.testing.assert_array_equal(tuned.compute(), res.apply(corpus, backend=backend))
        np.testing.assert_array_equal(res.apply(x, chunk_rows=100, backend=backend).compute(),
                                      res.apply(corpus, chunk_rows=100, backend=backend))
    half = _blocks(corpus.astype(np.float16))
    np.testing.assert_array_equal(res.apply(half).compute(),
                                  res.apply(corpus.astype(np.float16)))


def test_apply_into_zarr_and_in_place(client, tmp_path):
    zarr = pytest.importorskip("zarr")
    ds, corpus, _ = _data()
    res = NudgeN(k_val=3).fit(corpus, ds.train, ds.dev)
    want = res.apply(corpus)
    x = _zarr(tmp_path, corpus, 250)
    out = zarr.open_array(str(tmp_path / "tuned.zarr"), mode="w", shape=corpus.shape,
                          chunks=(125, corpus.shape[1]), dtype="float32")
    assert res.apply(x, out) is out
    np.testing.assert_array_equal(out[...], want)
    # In place: the Zarr array the corpus reads, each block read before its region is written.
    store = zarr.open_array(str(tmp_path / "corpus.zarr"), mode="r+")
    assert res.apply(x, store) is store
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "corpus.zarr"))[...], want)


def test_apply_into_npy_shards_in_place(client, tmp_path):
    ds, corpus, _ = _data()
    res = NudgeM().fit(corpus, ds.train, ds.dev)
    want = res.apply(corpus)
    cuts = [(0, 700), (700, 701), (701, 1237)]
    paths = []
    for s, (lo, hi) in enumerate(cuts):
        paths.append(tmp_path / f"shard{s}.npy")
        np.save(paths[-1], corpus[lo:hi])
    x = _dask.npy_corpus(paths, block_rows=333)
    assert res.apply(x, paths) is paths
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), want)
    # A new set of shards, from an array with other blocks (each inside one shard).
    fresh = [tmp_path / "t0.npy", tmp_path / "t1.npy"]
    np.save(fresh[0], np.zeros((300, 37), np.float32))
    np.save(fresh[1], np.zeros((937, 37), np.float32))
    res.apply(_blocks(corpus), fresh)
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in fresh]), want)
    with pytest.raises(ValueError, match=r"out: shard boundary at row 700 falls inside a "
                                         r"block of the corpus"):
        res.apply(_blocks(corpus), paths)
    with pytest.raises(ValueError, match=r"out: the shards hold 1236 rows, the corpus 1237"):
        res.apply(_blocks(corpus), paths[:1] + paths[2:])
    np.save(tmp_path / "f16.npy", np.zeros((1237, 37), np.float16))
    with pytest.raises(ValueError, match=r"out: .*f16\.npy holds a float16 array of shape "
                                         r"\(1237, 37\); every shard must be float32"):
        res.apply(_blocks(corpus), [tmp_path / "f16.npy"])


def _touched_only_want(corpus, res):
    want = np.array(corpus, copy=True)
    want[res.indices] = res.vectors.astype(corpus.dtype)
    return want


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_apply_touched_only_into_zarr_writes_only_their_chunks(client, tmp_path, dtype):
    """touched_only: the vectors go into the touched rows of the corpus's own Zarr store, one
    task per Zarr chunk holding any; the chunks without touched rows are not rewritten (their
    files keep their bytes and modification times); the untouched rows keep their values."""
    zarr = pytest.importorskip("zarr")
    ds, corpus, _ = _data()
    corpus = corpus.astype(dtype)
    res = NudgeN(k_val=3).fit(corpus, ds.train, ds.dev)
    x = _zarr(tmp_path, corpus, 100)  # 13 chunks; the corpus's blocks are its chunks
    # A result touching rows in chunks 1, 4 and 12 only (its first rows in those chunks).
    keep = np.concatenate([res.indices[(res.indices >= lo) & (res.indices < lo + 100)][:3]
                           for lo in (100, 400, 1200)])
    sel = np.searchsorted(res.indices, keep)
    part = type(res)(res.variant, res.gamma, keep, res.vectors[sel], res.gammas, res.val_accuracy,
                     res.n_records)
    want = _touched_only_want(corpus, part)
    np.testing.assert_array_equal(part.apply(x, touched_only=True).compute(), want)
    np.testing.assert_array_equal(part.apply(corpus, touched_only=True), want)
    root = tmp_path / "corpus.zarr"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*")
              if p.is_file() and "zarr.json" not in p.name}
    store = zarr.open_array(str(root), mode="r+")
    assert part.apply(x, store, touched_only=True) is store
    np.testing.assert_array_equal(zarr.open_array(str(root))[...], want)
    changed = sorted(str(p.relative_to(root)) for p, (t, b) in before.items()
                     if p.stat().st_mtime_ns != t or p.read_bytes() != b)
    assert sorted(int(c.split("/")[1]) for c in changed) == [1, 4, 12], changed


def test_apply_touched_only_npy_shards_in_place(client, tmp_path):
    """touched_only into the corpus's own float16 .npy shards (in place; any block layout):
    the touched rows hold the vectors rounded to float16, every other row as it was; a shard
    without touched rows is not opened for writing."""
    ds, corpus, _ = _data()
    corpus = corpus.astype(np.float16)
    res = NudgeM().fit(corpus, ds.train, ds.dev)
    cuts = [(0, 700), (700, 701), (701, 1237)]
    if 700 in res.indices:  # the one-row shard must hold no touched row for the mtime check
        pytest.skip("row 700 touched")
    paths = []
    for s, (lo, hi) in enumerate(cuts):
        paths.append(tmp_path / f"shard{s}.npy")
        np.save(paths[-1], corpus[lo:hi])
    mtime = paths[1].stat().st_mtime_ns
    want = _touched_only_want(corpus, res)
    x = _dask.npy_corpus(paths, block_rows=333)
    assert res.apply(x, paths, touched_only=True) is paths
    np.testing.assert_array_equal(np.concatenate([np.load(p) for p in paths]), want)
    assert paths[1].stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match=r"out: the shards hold 1236 rows, the corpus 1237"):
        res.apply(x, paths[:1] + paths[2:], touched_only=True)
    # Host: in place into a writable float16 memmap; a read-only one is refused.
    np.save(tmp_path / "all.npy", corpus)
    mm = np.load(tmp_path / "all.npy", mmap_mode="r+")
    assert res.apply(mm, mm, touched_only=True) is mm
    np.testing.assert_array_equal(np.load(tmp_path / "all.npy"), want)
    ro = np.load(tmp_path / "all.npy", mmap_mode="r")
    with pytest.raises(ValueError, match=r"out: expected a writable float16/float32 array"):
        res.apply(ro, ro, touched_only=True)


def test_apply_touched_only_sharded_zarr(client, tmp_path):
    """A sharded Zarr array (zarr 3) is written one shard per task: two tasks writing inner
    chunks of one shard would each rewrite the whole shard, and one write would be lost."""
    zarr = pytest.importorskip("zarr")
    if not hasattr(zarr, "create_array"):
        pytest.skip("zarr 2: no sharding")
    ds, corpus, _ = _data()
    res = NudgeN(k_val=3).fit(corpus, ds.train, ds.dev)
    out = zarr.create_array(str(tmp_path / "s.zarr"), shape=corpus.shape, dtype="float32",
                            chunks=(50, corpus.shape[1]), shards=(500, corpus.shape[1]))
    out[...] = corpus
    res.apply(_blocks(corpus), out, touched_only=True)
    np.testing.assert_array_equal(out[...], _touched_only_want(corpus, res))
    with pytest.raises(TypeError, match="a boolean mask would read the whole corpus"):
        _dask.as_corpus("corpus", _blocks(corpus))[np.ones(corpus.shape[0], bool)]


def test_apply_arguments(client, tmp_path):
    zarr = pytest.importorskip("zarr")
    ds, corpus, _ = _data()
    res = NudgeN().fit(corpus, ds.train, ds.dev)
    x = _blocks(corpus)  # a block boundary at row 300: not a multiple of 250
    misaligned = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=corpus.shape,
                                 chunks=(250, corpus.shape[1]), dtype="float32")
    with pytest.raises(ValueError, match=r"out: its Zarr chunks \(250, 37\) do not line up "
                                         r".*row 300.*corpus\.rechunk\(\{0: 250, 1: -1\}\)"):
        res.apply(x, misaligned)
    with pytest.raises(ValueError, match=r"out: expected a float32 Zarr array of shape "
                                         r"\(1237, 37\)"):
        res.apply(x, np.empty(corpus.shape, np.float32))
    with pytest.raises(ValueError, match=r"corpus: shape \(1236, 37\) differs from the "
                                         r"fitted corpus \(1237, 37\)"):
        res.apply(x[1:])
    with pytest.raises(ValueError, match=r"rechunk\(\{1: -1\}\)"):
        res.apply(da.from_array(corpus, chunks=(500, 20)))


def test_apply_bad_row_names_global_row(client):
    ds, corpus, _ = _data()
    res = NudgeN().fit(corpus, ds.train, ds.dev)
    untouched = np.setdiff1d(np.arange(corpus.shape[0]), res.indices)
    row = int(untouched[untouched >= 301 + 200][0])  # the 3rd block
    corpus[row, 3] = np.nan
    one = _error(lambda: res.apply(corpus))
    assert f"row {row} " in one
    assert _error(lambda: res.apply(_blocks(corpus)).compute()) == one


# ----------------------------------------------------------------------------------------
# Faults: a worker process killed mid-pass (the NaN row's error: see
# test_bad_row_in_third_block_names_global_row)


def test_worker_killed_mid_fit_completes_with_same_result():
    """A worker process SIGKILLed while it scans a block of the fit's top-k pass: its nanny
    restarts it, Dask recomputes the tasks it ran and the results it held, and the fit returns
    the one-machine result. Its own
    cluster (the kill must not disturb the shared one); every block read sleeps, so a pass
    takes seconds."""
    ds, corpus, _ = _data()
    one = NudgeN(k_val=3).fit(corpus, ds.train, ds.dev)

    def slow(block):  # defined here: pickled by value to the workers
        time.sleep(0.25)
        return block

    x = _blocks(corpus, (62,) * 19 + (59,)).map_blocks(slow, dtype=corpus.dtype)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", worker_dashboard_address=None) as cl, \
            distributed.Client(cl, set_as_default=False) as c:
        before = c.run(os.getpid)
        killed = {}

        def kill_when_busy():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not killed:
                # A worker scanning a block of the fit's top-k pass, with some of the pass's
                # partial lists already held (they are lost with it, and recomputed).
                busy = [a for a, keys in c.processing().items()
                        if any("block_topk" in str(key) for key in keys)]
                held = [key for keys in c.has_what().values() for key in keys
                        if "block_topk" in str(key) or "merge" in str(key)]
                if busy and len(held) >= 2:
                    killed["addr"], killed["pid"] = busy[0], before[busy[0]]
                    killed["at"] = time.monotonic()
                    os.kill(before[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_when_busy, daemon=True)
        with c.as_current():
            killer.start()
            got = NudgeN(k_val=3).fit(x, ds.train, ds.dev)
            done = time.monotonic()
        killer.join()
        assert killed and killed["at"] < done, "the worker was not killed during the fit"
        c.wait_for_workers(2, timeout=60)
        after = c.run(os.getpid)
        assert killed["pid"] not in after.values() and len(after) == 2  # restarted by its nanny
    _same_fit(got, one)
    assert one.gamma > 0
