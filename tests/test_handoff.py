"""The hand-off: Delta.apply_to on every target kind, save/load, from_result.

Real data: a NUDGE-N fit on the packaged pkg-search-6k subset, handed off with
``Delta.from_result``. Constructed deltas cover reverted, new and deleted rows, awkward d,
float16 and empty deltas. Every error case checks that the target is byte for byte unchanged.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import nudgefast
from nudgefast import datasets
from nudgefast.handoff import Delta


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def keys(kind, positions):
    """Record ids of ``positions``: None (key by position), ints or strings."""
    positions = np.asarray(positions, np.int64)
    if kind == "int":
        return 1000 + 3 * positions
    if kind == "str":
        return np.array([f"rec-{p}" for p in positions], dtype=str)
    return None


def make_delta(n=50, d=37, write=(0, 7, 20), n_new=2, deleted=(3, 30), ids=None, seed=0):
    """A delta over an n-record corpus: rows ``write`` (tuned and reverted alternately),
    ``n_new`` new records at the end, ``deleted`` positions."""
    rng = np.random.default_rng(seed)
    indices = np.r_[np.asarray(write, np.int64), n + np.arange(n_new)].astype(np.int64)
    new = indices >= n
    tuned = ~new & (np.arange(indices.size) % 2 == 0)
    deleted = np.asarray(deleted, np.int64)
    return Delta("nudge-n", 0.2, indices, unit(rng.standard_normal((indices.size, d))), tuned,
                 new, deleted, n + n_new, previous_gamma=0.1, ids=keys(ids, indices),
                 deleted_ids=keys(ids, deleted), summary={"op": "test", "new": int(n_new)})


def corpus(n=50, d=37, seed=1):
    return unit(np.random.default_rng(seed).standard_normal((n, d)))


def grown(base, n_records):
    out = np.zeros((n_records, base.shape[1]), base.dtype)
    out[:base.shape[0]] = base
    return out


def expected_state(base, delta):
    """The served vectors after ``delta``, by position (deleted positions kept)."""
    out = grown(base.astype(np.float32), delta.n_records)
    out[delta.indices] = delta.vectors
    return out


def assert_only_rows_changed(before, after, rows):
    changed = np.flatnonzero((before != after).any(axis=1))
    assert np.isin(changed, rows).all()
    others = np.setdiff1d(np.arange(before.shape[0]), rows)
    assert before[others].tobytes() == after[others].tobytes()


def arrow_table(vectors, ids, vtype=None, extra=True):
    pa = pytest.importorskip("pyarrow")
    d = vectors.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), d)
    cols = {"id": pa.array(ids)}
    if extra:
        cols["text"] = pa.array([f"text {i}" for i in range(len(ids))])
    cols["vector"] = column.cast(vtype) if vtype is not None else column
    return pa.table(cols)


def table_vectors(table):
    d = len(table["vector"][0]) if table.num_rows else 0
    return np.asarray(table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      np.float32).reshape(-1, d)


# ----------------------------------------------------------------------------------------
# A real fit handed off


@pytest.fixture(scope="module")
def fit():
    ds = datasets.packaged()
    result = nudgefast.NudgeN().fit(ds.corpus, ds.train, ds.dev)
    ids = ds.record_ids()
    return SimpleNamespace(ds=ds, result=result, base=unit(ds.corpus.astype(np.float32)),
                           ids=np.array(ids), delta=Delta.from_result(result, corpus_ids=ids),
                           queries=unit(ds.test.embeddings.astype(np.float32)))


def assert_search_matches(index, queries, written, k=10, to_rows=None):
    """FAISS top-k equals brute force on ``written`` (ties allowed: compare scores)."""
    _, found = index.search(queries, k)
    scores = queries @ written.T
    rows = found if to_rows is None else to_rows(found)
    top = -np.sort(-scores, axis=1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(scores, rows, 1), top, atol=1e-5)
    return found


def test_from_result_matches_the_fit(fit):
    delta, result = fit.delta, fit.result
    assert delta.indices is result.indices and delta.vectors is result.vectors
    assert delta.tuned.all() and not delta.new.any() and delta.deleted.size == 0
    assert delta.n_records == result.n_records and delta.gamma == result.gamma
    assert list(delta.ids) == list(fit.ids[result.indices]) and delta.deleted_ids.size == 0
    assert delta.summary["op"] == "fit" and delta.summary["tuned"] == result.indices.size
    with pytest.raises(ValueError, match="corpus_ids: expected one id per record"):
        Delta.from_result(result, corpus_ids=fit.ids[:-1])
    assert Delta.from_result(result).ids is None


def test_real_fit_into_array(fit):
    target = fit.base.copy()
    assert fit.delta.apply_to(target) is target
    assert_only_rows_changed(fit.base, target, fit.delta.indices)
    assert np.array_equal(target[fit.delta.indices], fit.delta.vectors)
    tuned = fit.result.apply(fit.ds.corpus)
    np.testing.assert_allclose(target, tuned, atol=2e-6)


@pytest.mark.parametrize("metric", ["IP", "L2"])
def test_real_fit_into_faiss_flat(fit, metric):
    faiss = pytest.importorskip("faiss")
    index = getattr(faiss, f"IndexFlat{metric}")(fit.base.shape[1])
    index.add(fit.base)
    before = index.search(fit.queries, 10)[1]
    assert fit.delta.apply_to(index) is index
    written = fit.delta.apply_to(fit.base.copy())
    # The write went through a view of the index's storage, not a copy.
    assert index.ntotal == written.shape[0]
    assert np.array_equal(index.reconstruct_n(0, index.ntotal), written)
    after = assert_search_matches(index, fit.queries, written)
    assert not np.array_equal(before, after)


def test_real_fit_into_idmap2(fit):
    faiss = pytest.importorskip("faiss")
    n, d = fit.base.shape
    id_of = 7 * np.arange(n, dtype=np.int64) + 11
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    index.add_with_ids(fit.base, id_of)
    snapshot = faiss.serialize_index(index).tobytes()
    # String ids (package names) cannot key FAISS: refused, index unchanged.
    with pytest.raises(TypeError, match="FAISS needs int64 ids"):
        fit.delta.apply_to(index)
    assert faiss.serialize_index(index).tobytes() == snapshot
    assert fit.delta.apply_to(index, ids=id_of) is index
    written = fit.delta.apply_to(fit.base.copy())
    assert index.ntotal == n
    rows = fit.delta.indices[::97]
    assert np.array_equal(np.stack([index.reconstruct(int(id_of[p])) for p in rows]),
                          written[rows])
    assert_search_matches(index, fit.queries, written, to_rows=lambda ids: (ids - 11) // 7)


def test_real_fit_into_parquet(fit, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "served.parquet"
    pq.write_table(arrow_table(fit.base, fit.ids), path)
    assert fit.delta.apply_to(path) == path
    assert sorted(os.listdir(tmp_path)) == ["served.parquet"]
    table = pq.read_table(path)
    assert table["id"].to_pylist() == list(fit.ids)
    assert table["text"].to_pylist()[:2] == ["text 0", "text 1"]
    assert table.schema.field("vector").type == arrow_table(fit.base[:1], fit.ids[:1]).schema \
        .field("vector").type
    assert np.array_equal(table_vectors(table), fit.delta.apply_to(fit.base.copy()))


# ----------------------------------------------------------------------------------------
# Constructed deltas: reverted, new and deleted rows


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("d", [37, 1])
def test_array_writes_only_delta_rows(dtype, d):
    delta = make_delta(d=d)
    base = corpus(d=d)
    target = grown(base, delta.n_records).astype(dtype)
    before = target.copy()
    assert delta.apply_to(target) is target
    assert_only_rows_changed(before, target, delta.indices)
    assert np.array_equal(target[delta.indices], delta.vectors.astype(dtype))
    # Deleted positions are left as they are.
    assert np.array_equal(target[delta.deleted], before[delta.deleted])


def test_npy_path_is_written_through_a_memmap(tmp_path):
    delta = make_delta()
    base = grown(corpus(), delta.n_records)
    for path in (tmp_path / "a.npy", str(tmp_path / "b.npy")):
        np.save(path, base)
        assert delta.apply_to(path) == path
        assert np.array_equal(np.load(path), expected_state(corpus(), delta))
    mm = np.load(tmp_path / "a.npy", mmap_mode="r+")
    assert make_delta(seed=5).apply_to(mm) is mm
    assert np.array_equal(np.load(tmp_path / "a.npy"), expected_state(corpus(), make_delta(seed=5)))


def test_grow_then_write_as_the_error_says(tmp_path):
    delta = make_delta()
    path = tmp_path / "served.npy"
    np.save(path, corpus())
    with pytest.raises(ValueError, match="has 50 rows but the delta covers 52 records"):
        delta.apply_to(path)
    old = np.load(path, mmap_mode="r")
    bigger = np.lib.format.open_memmap(tmp_path / "bigger.npy", "w+", np.float32,
                                       (delta.n_records, old.shape[1]))
    bigger[:old.shape[0]] = old
    delta.apply_to(bigger)
    assert np.array_equal(np.asarray(bigger), expected_state(corpus(), delta))


def test_flat_index_appends_new_rows():
    faiss = pytest.importorskip("faiss")
    delta = make_delta(deleted=())
    index = faiss.IndexFlatIP(37)
    index.add(corpus())
    delta.apply_to(index)
    assert np.array_equal(index.reconstruct_n(0, index.ntotal), expected_state(corpus(), delta))


@pytest.mark.parametrize("kind", ["IndexIDMap", "IndexIDMap2"])
@pytest.mark.parametrize("ids", [None, "int"])
def test_idmap_updates_by_id(kind, ids):
    faiss = pytest.importorskip("faiss")
    delta = make_delta(ids=ids)
    base = corpus()
    index = getattr(faiss, kind)(faiss.IndexFlatIP(37))
    index.add_with_ids(base, keys(ids, np.arange(50)) if ids else np.arange(50))
    assert delta.apply_to(index) is index
    assert index.ntotal == delta.n_records - delta.deleted.size
    want = expected_state(base, delta)
    # Read back through search: every live row is its own best match, under its id.
    live = np.setdiff1d(np.arange(delta.n_records), delta.deleted)
    scores, found = index.search(want[live], 1)
    assert np.array_equal(found[:, 0], keys(ids, live) if ids else live)
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_ivf_updates_by_id():
    faiss = pytest.importorskip("faiss")
    base = corpus(n=400, seed=3)
    delta = make_delta(n=400, write=(0, 5, 399), ids="int")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(37), 37, 4, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    index.add_with_ids(base, keys("int", np.arange(400)))
    delta.apply_to(index)
    want = expected_state(base, delta)
    assert index.ntotal == 400 + 2 - delta.deleted.size
    for p in np.r_[delta.indices, 1, 2]:
        assert np.array_equal(index.reconstruct(int(keys("int", [p])[0])), want[p])
    for p in delta.deleted:
        with pytest.raises(RuntimeError):
            index.reconstruct(int(keys("int", [p])[0]))


@pytest.mark.parametrize("vtype", ["fixed32", "list32", "list64"])
@pytest.mark.parametrize("ids", [None, "int", "str"])
def test_arrow_upsert(vtype, ids):
    pa = pytest.importorskip("pyarrow")
    vtype = {"fixed32": None, "list32": pa.list_(pa.float32()),
             "list64": pa.list_(pa.float64())}[vtype]
    delta = make_delta(ids=ids)
    base = corpus()
    table = arrow_table(base, keys(ids, np.arange(50)) if ids else np.arange(50), vtype)
    original = table.to_pylist()
    out = delta.apply_to(table)
    assert table.to_pylist() == original  # Arrow is immutable: a new table
    assert out.schema == table.schema
    live = np.setdiff1d(np.arange(delta.n_records), delta.deleted)
    expected_ids = keys(ids, live) if ids else live
    assert out["id"].to_pylist() == list(expected_ids)
    got = table_vectors(out)
    want = expected_state(base, delta)[live]
    assert np.array_equal(got, want)
    texts = out["text"].to_pylist()
    assert texts[-2:] == [None, None] and texts[0] == "text 0"


def test_arrow_delete_then_readd_same_id():
    pa = pytest.importorskip("pyarrow")
    delta = make_delta(write=(7,), n_new=1, deleted=(3,), ids="str")
    delta.ids[-1] = delta.deleted_ids[0]  # record "rec-3" deleted and added again at the end
    out = delta.apply_to(arrow_table(corpus(), keys("str", np.arange(50))))
    assert out.num_rows == 50 and out["id"].to_pylist().count("rec-3") == 1
    row = out["id"].to_pylist().index("rec-3")
    assert np.array_equal(table_vectors(out)[row], delta.vectors[-1])
    assert isinstance(out, pa.Table)


def test_arrow_ids_override():
    delta = make_delta()  # keyed by position: ids= names the records
    names = keys("str", np.arange(52))
    out = delta.apply_to(arrow_table(corpus(), names[:50]), ids=names)
    assert out["id"].to_pylist() == list(names[np.setdiff1d(np.arange(52), delta.deleted)])


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        make_delta().apply_to(tmp_path / "served.parquet")


def test_empty_delta_changes_nothing(tmp_path):
    faiss = pytest.importorskip("faiss")
    empty = make_delta(write=(), n_new=0, deleted=(), ids="int")
    base = corpus()
    target = base.copy()
    assert empty.apply_to(target) is target and target.tobytes() == base.tobytes()
    for index in (_flat(), _flat(wrap="flat")):
        snapshot = faiss.serialize_index(index).tobytes()
        empty.apply_to(index)
        assert faiss.serialize_index(index).tobytes() == snapshot
    table = arrow_table(base, keys("int", np.arange(50)))
    assert empty.apply_to(table).equals(table)


def test_every_target_ends_in_the_same_state():
    """Two deltas in a row: array, IndexIDMap2 and Arrow agree (and FAISS searches match)."""
    faiss = pytest.importorskip("faiss")
    base = corpus(n=50)
    first = make_delta(n=50, n_new=2, deleted=(3,), ids="int", seed=1)
    second = make_delta(n=52, write=(0, 1, 51), n_new=1, deleted=(30,), ids="int", seed=2)
    array = grown(base, 53)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(37))
    index.add_with_ids(base, keys("int", np.arange(50)))
    table = arrow_table(base, keys("int", np.arange(50)), extra=False)
    for delta in (first, second):
        delta.apply_to(array)
        delta.apply_to(index)
        table = delta.apply_to(table)
    live = np.setdiff1d(np.arange(53), [3, 30])
    assert np.array_equal(array, expected_state(expected_state(base, first), second))
    order = np.argsort(table["id"].to_numpy())
    assert np.array_equal(table["id"].to_numpy()[order], keys("int", live))
    assert np.array_equal(table_vectors(table)[order], array[live])
    assert np.array_equal(np.stack([index.reconstruct(int(i)) for i in keys("int", live)]),
                          array[live])


# ----------------------------------------------------------------------------------------
# Errors: clear, and the target unchanged


def _snapshot(target):
    if isinstance(target, np.ndarray):
        return target.tobytes()
    if isinstance(target, (str, Path)):
        return Path(target).read_bytes()
    if type(target).__module__.startswith("faiss"):
        import faiss
        return faiss.serialize_index(target).tobytes()
    return target


def _flat(rows=50, d=37, wrap=None):
    """IndexFlatIP of ``corpus(rows, d)``; wrap="flat" / "hnsw": IndexIDMap2 over IndexFlatIP /
    IndexHNSWFlat, ids = positions; wrap="bare hnsw": the IndexHNSWFlat alone."""
    import faiss
    index = faiss.IndexHNSWFlat(d, 8) if "hnsw" in str(wrap) else faiss.IndexFlatIP(d)
    if wrap in ("flat", "hnsw"):
        index = faiss.IndexIDMap2(index)
        index.add_with_ids(corpus(rows, d), np.arange(rows))
    else:
        index.add(corpus(rows, d))
    return index


def _ivf_array_map():
    import faiss
    base = corpus(200)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(37), 37, 2)
    index.train(base)
    index.add(base)
    index.make_direct_map()
    return index


def _read_only():
    base = grown(corpus(), 52)
    base.setflags(write=False)
    return base


def _parquet(tmp_path, ids):
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(arrow_table(corpus(), ids), path)
    return path


def _npy(tmp_path, rows):
    path = tmp_path / "t.npy"
    np.save(path, corpus(rows))
    return str(path)


ERRORS = {
    # name: (target builder, delta, apply_to kwargs, needs, error, message)
    "array too short": (lambda t: corpus(), make_delta(), {}, None, ValueError,
                        "has 50 rows but the delta covers 52 records .* grow it first"),
    "array read-only": (lambda t: _read_only(), make_delta(), {}, None, ValueError, "read-only"),
    "array wrong d": (lambda t: grown(corpus(d=36), 52), make_delta(), {}, None, ValueError,
                      "d=36 but the delta's vectors have d=37"),
    "array int dtype": (lambda t: np.zeros((52, 37), np.int32), make_delta(), {}, None,
                        TypeError, "expected a 2-D float32 or float16 array"),
    "array with ids=": (lambda t: grown(corpus(), 52), make_delta(), {"ids": np.arange(52)},
                        None, ValueError, "written by position"),
    "npy path too short": (lambda t: _npy(t, 50), make_delta(), {}, None, ValueError,
                           "grow it first"),
    "flat gap": (lambda t: _flat(49), make_delta(deleted=()), {}, "faiss", ValueError,
                 "must continue at position 49, 50, ... but the delta writes position 50 "
                 "without 49"),
    "flat deleted": (lambda t: _flat(), make_delta(), {}, "faiss", ValueError,
                     "cannot delete 2 rows .*IndexIDMap2"),
    "flat wrong d": (lambda t: _flat(d=36), make_delta(deleted=()), {}, "faiss", ValueError,
                     "d=36 but the delta's vectors have d=37"),
    "idmap string ids": (lambda t: _flat(wrap="flat"), make_delta(ids="str"), {}, "faiss",
                         TypeError, "FAISS needs int64 ids"),
    "idmap short ids=": (lambda t: _flat(wrap="flat"), make_delta(), {"ids": np.arange(51)},
                         "faiss", ValueError, r"one id per corpus position \(at least 52\)"),
    "idmap over hnsw": (lambda t: _flat(wrap="hnsw"), make_delta(), {}, "faiss", TypeError,
                        "IndexIDMap2 over IndexHNSWFlat cannot remove ids"),
    "hnsw": (lambda t: _flat(wrap="bare hnsw"), make_delta(), {}, "faiss", TypeError,
             "IndexHNSWFlat cannot be updated in place; supported: IndexFlatIP"),
    "ivf array direct map": (lambda t: _ivf_array_map(), make_delta(n=200), {}, "faiss",
                             TypeError, "IndexIVFFlat cannot remove ids"),
    "arrow str ids, int column": (lambda t: arrow_table(corpus(), np.arange(50)),
                                  make_delta(ids="str"), {}, "pyarrow", TypeError,
                                  "id column is int64 but the keys are <U"),
    "arrow positions, str column": (lambda t: arrow_table(corpus(), keys("str", range(50))),
                                    make_delta(), {}, "pyarrow", TypeError,
                                    r"id column is string .* \(positions\)"),
    "arrow no vector": (lambda t: arrow_table(corpus(), np.arange(50)).drop_columns("vector"),
                        make_delta(), {}, "pyarrow", ValueError, "no column 'vector'"),
    "arrow wrong d": (lambda t: arrow_table(corpus(d=36), np.arange(50)), make_delta(), {},
                      "pyarrow", ValueError, "does not hold 37 values in every row"),
    "parquet type mismatch": (lambda t: _parquet(t, np.arange(50)), make_delta(ids="str"), {},
                              "pyarrow", TypeError, "id column is int64"),
    "unknown target": (lambda t: corpus().tolist(), make_delta(), {}, None, TypeError,
                       "cannot write a delta into list; supported: a writable"),
    "unknown suffix": (lambda t: str(t / "vectors.bin"), make_delta(), {}, None, ValueError,
                       r"must end in \.npy .* or \.parquet"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_leave_target_unchanged(case, tmp_path):
    build, delta, kwargs, needs, error, message = ERRORS[case]
    if needs:
        pytest.importorskip(needs)
    target = build(tmp_path)
    before = _snapshot(target) if not str(target).endswith(".bin") else None
    with pytest.raises(error, match=message):
        delta.apply_to(target, **kwargs)
    if before is not None:
        assert _snapshot(target) == before
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# ----------------------------------------------------------------------------------------
# save / load


@pytest.mark.parametrize("case", ["positions", "int ids", "str ids", "empty", "real fit"])
def test_save_load_round_trip(case, tmp_path, fit):
    delta = {"positions": make_delta(), "int ids": make_delta(ids="int"),
             "str ids": make_delta(ids="str"),
             "empty": make_delta(write=(), n_new=0, deleted=(), ids="str"),
             "real fit": fit.delta}[case]
    # NumPy scalars go through JSON as numbers; a copy, the real fit's delta is shared.
    delta = dataclasses.replace(delta, summary={**delta.summary, "count": np.int64(3)})
    path = tmp_path / "delta.npz"
    delta.save(path)
    assert os.listdir(tmp_path) == ["delta.npz"]
    loaded = Delta.load(path)
    assert loaded == delta and loaded is not delta
    for name in ("indices", "vectors", "tuned", "new", "deleted"):
        assert getattr(loaded, name).dtype == getattr(delta, name).dtype
        assert getattr(loaded, name).shape == getattr(delta, name).shape
    assert (loaded.ids is None) == (delta.ids is None)
    assert loaded.summary["count"] == 3 and repr(loaded) == repr(delta)
    with np.load(path, allow_pickle=False) as data:  # no pickle anywhere
        assert data["format"] == "nudgefast.delta" and data["version"] == 1


def test_equality():
    a, b = make_delta(ids="str"), make_delta(ids="str")
    a.previous_gamma = b.previous_gamma = float("nan")  # before the first fit
    assert a == b
    assert a != make_delta(ids="str", seed=1) and a != make_delta() and a != "delta"


def test_save_is_atomic(tmp_path):
    path = tmp_path / "delta.npz"
    make_delta().save(path)
    old = path.read_bytes()
    bad = make_delta()
    bad.summary["what"] = object()
    with pytest.raises(TypeError, match="summary"):
        bad.save(path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["delta.npz"]
    make_delta(ids="int").save(str(path))
    assert Delta.load(path) == make_delta(ids="int")


def _savez(path, save=np.savez, **arrays):
    with open(path, "wb") as fh:  # exactly this name (np.save would add .npy)
        save(fh, *arrays.values()) if save is np.save else save(fh, **arrays)


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


LOAD_ERRORS = {
    "missing": (lambda p: None, "does not exist"),
    "empty file": (lambda p: p.write_bytes(b""), "not a readable delta file"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                  "not a readable delta file .* truncated or damaged"),
    "corrupt": (_corrupt, "not a readable delta file"),
    "foreign npz": (lambda p: _savez(p, a=np.arange(3)), "not a nudgefast delta"),
    "npy file": (lambda p: _savez(p, np.save, a=np.arange(3)), "not an .npz archive"),
    "newer version": (lambda p: _savez(p, format=np.array("nudgefast.delta"),
                                       version=np.array(2)), "newer nudgefast .* version 2"),
    "missing key": (lambda p: _savez(p, format=np.array("nudgefast.delta"),
                                     version=np.array(1)), "damaged delta file"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_name_the_path(case, tmp_path):
    path = tmp_path / "delta.npz"
    spoil, message = LOAD_ERRORS[case]
    if case != "missing":
        make_delta(ids="str").save(path)
        spoil(path)
    with pytest.raises(ValueError, match=message) as info:
        Delta.load(path)
    assert str(path) in str(info.value)
