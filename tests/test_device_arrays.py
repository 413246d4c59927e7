"""Device arrays through the public API, on the CPU: the dispatch, not the kernels.

A stand-in for CuPy (``FakeCupyArray`` + ``fake_cupy``) and for torch CUDA tensors
(``FakeTensor``), and two bare device objects (``__cuda_array_interface__`` only; DLPack only
with a CUDA device type), all over NumPy memory that NumPy is not allowed to read
(``__array__`` raises, as CuPy's implicit conversion does). A stub GPU backend is registered
as ``cuda``: it runs the numpy backend's ops, on the host memory behind the stand-ins. So every
result must equal the numpy backend's on the same host data, bit for bit, and a device corpus
that reached ``np.asarray``, or crossed to the host whole, fails the test. The same checks on a
real GPU: tests/test_cuda_public.py.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from conftest import BACKENDS, awkward
from nudgefast import NudgeM, NudgeN, QuerySet, _arrays, _backends, _validate, metrics, search
from nudgefast._backends import numpy_backend
from nudgefast._defaults import chunk_rows_for
from nudgefast.nudge import FIT_EXTRA
from nudgefast.compat import NUDGEM, NUDGEN, queries_answers_dict
from nudgefast.tuner import Tuner

CPU_BACKENDS = [name for name in BACKENDS if not _backends.on_device(name)]


# ---------------------------------------------------------------------------------------------
# Stand-ins for device arrays

def _no_host_read(self, *args, **kwargs):
    raise TypeError(f"{type(self).__name__} is device memory: NumPy may not read it")


class FakeCupyArray:
    """CuPy's ndarray: device memory simulated by a NumPy array. Indexing takes only device
    index arrays and device values (CuPy would copy a NumPy one: the code must not rely on
    that); ``get()`` records how many rows crossed to the host."""

    fetched: list = []  # rows of every get(), across instances (reset by the fixture)

    def __init__(self, host):
        assert isinstance(host, np.ndarray)
        self._host = host

    __array__ = _no_host_read

    shape = property(lambda self: self._host.shape)
    ndim = property(lambda self: self._host.ndim)
    dtype = property(lambda self: self._host.dtype)
    size = property(lambda self: self._host.size)
    flags = property(lambda self: self._host.flags)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self._host.shape, "typestr": self._host.dtype.str, "version": 3,
                "data": (self._host.ctypes.data, False), "strides": self._host.strides}

    @staticmethod
    def _key(idx):
        if isinstance(idx, tuple):
            return tuple(FakeCupyArray._key(i) for i in idx)
        if isinstance(idx, np.ndarray):
            raise TypeError("a NumPy index array for a device array (use cupy.asarray first)")
        return idx._host if isinstance(idx, FakeCupyArray) else idx

    def __getitem__(self, idx):
        return FakeCupyArray(self._host[self._key(idx)])  # slices: views, as in CuPy

    def __setitem__(self, idx, value):
        if isinstance(value, np.ndarray):
            raise TypeError("a NumPy value for a device array (use cupy.asarray first)")
        self._host[self._key(idx)] = value._host if isinstance(value, FakeCupyArray) else value

    def astype(self, dtype):
        return FakeCupyArray(self._host.astype(dtype))

    def get(self):
        FakeCupyArray.fetched.append(self._host.shape[0] if self._host.ndim else 1)
        return self._host.copy()


class CAIArray:
    """Only ``__cuda_array_interface__`` (a Numba device array, say)."""

    def __init__(self, host):
        self._host = host

    __array__ = _no_host_read
    __cuda_array_interface__ = FakeCupyArray.__cuda_array_interface__


class DLPackArray:
    """Only DLPack, on a CUDA device (kDLCUDA = 2)."""

    def __init__(self, host):
        self._host = host

    __array__ = _no_host_read

    def __dlpack__(self, stream=None):
        raise AssertionError("the fake CuPy reads _host; the capsule is never taken here")

    def __dlpack_device__(self):
        return (2, 0)


class FakeTensor:
    """A torch CUDA tensor: ``torch`` module, ``is_cuda``, ``detach()``, the interface."""

    __module__ = "torch"
    is_cuda = True
    device = "cuda:0"

    def __init__(self, host):
        self._host = host

    __array__ = _no_host_read
    __cuda_array_interface__ = FakeCupyArray.__cuda_array_interface__

    def detach(self):
        return FakeTensor(self._host)

    def cpu(self):  # the small arguments (queries) are copied to the host this way
        return types.SimpleNamespace(numpy=lambda: self._host.copy())

    dtype = property(lambda self: f"torch.{self._host.dtype}")


def _asarray(x):
    if isinstance(x, FakeCupyArray):
        return x
    if isinstance(x, np.ndarray):
        return FakeCupyArray(x.copy())  # host -> device: a copy
    if hasattr(x, "__cuda_array_interface__"):
        return FakeCupyArray(x._host)  # zero-copy, as CuPy over the interface
    raise TypeError(f"fake cupy.asarray: {type(x).__name__}")


def _from_dlpack(x):
    assert x.__dlpack_device__()[0] == 2
    return FakeCupyArray(x._host)


fake_cupy = types.SimpleNamespace(
    ndarray=FakeCupyArray, asarray=_asarray, from_dlpack=_from_dlpack,
    # New device memory starts as NaN, so an element nobody writes shows.
    empty=lambda shape, dtype: FakeCupyArray(np.full(shape, np.nan, dtype=dtype)),
    ascontiguousarray=lambda a, dtype=None: FakeCupyArray(np.ascontiguousarray(a._host, dtype)))
fake_torch = types.SimpleNamespace(from_dlpack=lambda a: FakeTensor(a._host),
                                   as_tensor=lambda a, device=None: FakeTensor(np.array(a)))

#: kind -> (the caller's type, the type results come back as)
KINDS = {"cupy": (FakeCupyArray, FakeCupyArray), "cai": (CAIArray, FakeCupyArray),
         "dlpack": (DLPackArray, FakeCupyArray), "torch": (FakeTensor, FakeTensor)}


def _host(a):
    return a._host


# ---------------------------------------------------------------------------------------------
# The stub GPU backend


def _stub_backend():
    stub = types.ModuleType("stub_cuda_backend")
    for name in ("query_gradient", "topk_update", "nudge_m_intervals", "nudge_n_sweep", "dot64",
                 "project", "metrics"):
        setattr(stub, name, getattr(numpy_backend, name))
    stub.NAME = "cuda"
    stub.stream_calls = []  # the type of every corpus topk_stream was given
    stub.normalize_calls = []

    def topk_stream(queries, corpus, k, *, exclude=None, normalize=True, chunk_rows=None,
                    n_threads=None, progress=None, row_offset=0, state=None):
        """search.topk_pass's host loop, over the memory behind a device array."""
        stub.stream_calls.append(type(corpus))
        x = corpus._host if isinstance(corpus, FakeCupyArray) else corpus
        assert isinstance(x, np.ndarray)
        n_q = queries.shape[0]
        n_rows, d = x.shape
        if state is None:
            dtype = np.float64 if queries.dtype == np.float64 else np.float32
            state = (np.full((n_q, k), -np.inf, dtype), np.full((n_q, k), -1, np.int64))
        s, i = state[0].copy(), state[1].copy()
        ex = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        step = chunk_rows or chunk_rows_for(n_q, d, x.dtype.itemsize)
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            g0 = row_offset + start
            lo, hi = np.searchsorted(ex, [g0, row_offset + stop])
            bad = numpy_backend.topk_update(queries, np.ascontiguousarray(x[start:stop]), g0,
                                            ex[lo:hi] - g0, normalize, s, i)
            if bad >= 0:
                return s, i, bad
            if progress is not None:
                progress(stop - start)
        return s, i, -1

    def normalize_rows(chunk, out, *, n_threads=None):
        stub.normalize_calls.append((type(chunk), type(out)))
        if isinstance(chunk, FakeCupyArray):
            assert isinstance(out, FakeCupyArray)
            return numpy_backend.normalize_rows(chunk._host, out._host)
        return numpy_backend.normalize_rows(chunk, out)

    stub.topk_stream = topk_stream
    stub.STREAMS_CORPUS = True
    stub.normalize_rows = normalize_rows
    return stub


@pytest.fixture
def gpu(monkeypatch):
    """A "present" GPU: the stub backend registered as cuda, the fake CuPy and torch."""
    stub = _stub_backend()
    monkeypatch.setitem(_backends._cache, "cuda", (stub, "available"))
    monkeypatch.setattr(_arrays, "_cupy", lambda: fake_cupy)
    monkeypatch.setattr(_arrays, "_torch", lambda: fake_torch)
    monkeypatch.setattr(FakeCupyArray, "fetched", [])
    return stub


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setitem(_backends._cache, "cuda",
                        (None, "ImportError: no CUDA device is visible; fix: install CuPy"))
    monkeypatch.setattr(_arrays, "_cupy", lambda: fake_cupy)


@pytest.fixture(scope="module")
def ds():
    return awkward(n=3001, d=37, seed=4)


def _device(kind, host):
    return KINDS[kind][0](host)


def _same_result(got, want):
    assert got.variant == want.variant
    assert got.gamma == want.gamma
    assert got.n_records == want.n_records
    for name in ("indices", "vectors", "gammas", "val_accuracy"):
        assert isinstance(getattr(got, name), np.ndarray)
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


# ---------------------------------------------------------------------------------------------
# What is a device array


def test_is_device_reads_no_data(gpu):
    x = np.zeros((3, 2), np.float32)
    for kind, (cls, _) in KINDS.items():
        assert _arrays.is_device(cls(x)), kind
    assert not _arrays.is_device(x)
    assert not _arrays.is_device([[1.0, 2.0]])
    cpu_dlpack = DLPackArray(x)
    cpu_dlpack.__dlpack_device__ = lambda: (1, 0)  # kDLCPU
    assert not _arrays.is_device(cpu_dlpack)
    torch = pytest.importorskip("torch")
    assert not _arrays.is_device(torch.zeros(3, 2))
    assert not _arrays.is_device(torch.zeros(3, 2, requires_grad=True))


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_is_viewed_in_place_never_copied(gpu, kind):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    view = _validate.as_corpus("corpus", _device(kind, x), backend="cuda")
    assert isinstance(view, FakeCupyArray) and view._host is x


# ---------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("kind", KINDS)
def test_search_reads_a_device_corpus_on_the_gpu_backend(gpu, ds, kind, backend):
    want = search(ds.test.embeddings, ds.corpus, 7, backend="numpy", chunk_rows=300)
    x = ds.corpus.copy()
    got = search(ds.test.embeddings, _device(kind, x), 7, backend=backend, chunk_rows=300)
    assert type(got.scores) is KINDS[kind][1] and type(got.indices) is KINDS[kind][1]
    np.testing.assert_array_equal(_host(got.scores), want.scores)
    np.testing.assert_array_equal(_host(got.indices), want.indices)
    assert _host(got.scores).dtype == np.float32 and _host(got.indices).dtype == np.int64
    assert gpu.stream_calls == [FakeCupyArray]
    assert FakeCupyArray.fetched == []  # nothing crossed to the host
    np.testing.assert_array_equal(x, ds.corpus)


def test_search_with_a_delta_on_a_device_corpus(gpu, ds):
    res = NudgeN(backend="numpy", k_val=2).fit(ds.corpus, ds.train, ds.dev)
    want = search(ds.test.embeddings, ds.corpus, 9, res, backend="numpy")
    got = search(ds.test.embeddings, FakeCupyArray(ds.corpus.copy()), 9, res)
    np.testing.assert_array_equal(got.scores._host, want.scores)
    np.testing.assert_array_equal(got.indices._host, want.indices)


def test_a_bad_row_of_a_device_corpus_is_named(gpu, ds):
    x = ds.corpus.copy()
    x[700, 3] = np.nan
    with pytest.raises(ValueError, match="corpus: row 700 contains NaN"):
        search(ds.test.embeddings, FakeCupyArray(x), 5)
    assert FakeCupyArray.fetched == [1]  # that one row came back for the message


def test_device_queries_are_small_and_come_to_the_host(gpu, ds):
    want = search(ds.test.embeddings, ds.corpus, 4, backend="numpy")
    got = search(FakeCupyArray(np.array(ds.test.embeddings)), ds.corpus, 4, backend="numpy")
    # A host corpus: results follow the queries' library.
    assert isinstance(got.indices, FakeCupyArray)
    np.testing.assert_array_equal(got.indices._host, want.indices)
    qs = QuerySet(FakeTensor(np.array(ds.dev.embeddings)), ds.dev.answers)
    assert isinstance(qs.embeddings, np.ndarray)
    np.testing.assert_array_equal(qs.embeddings, ds.dev.embeddings)


# ---------------------------------------------------------------------------------------------
# fit and apply


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cls,kw", [(NudgeN, {"k_val": 3}), (NudgeM, {}),
                                    (NudgeM, {"gamma_rule": "left"})],
                         ids=["nudge-n", "nudge-m", "nudge-m-left"])
def test_fit_on_a_device_corpus_matches_the_host_fit(gpu, ds, kind, cls, kw):
    want = cls(backend="numpy", chunk_rows=250, **kw).fit(ds.corpus, ds.train, ds.dev)
    x = ds.corpus.copy()
    got = cls(chunk_rows=250, **kw).fit(_device(kind, x), ds.train, ds.dev)
    _same_result(got, want)
    assert gpu.stream_calls and set(gpu.stream_calls) == {FakeCupyArray}
    # Only gathered rows crossed: the touched records, the kept candidates (exact scores).
    bound = max(got.indices.size, len(ds.dev) * (kw.get("k_val", 2) + FIT_EXTRA))
    assert FakeCupyArray.fetched and max(FakeCupyArray.fetched) <= bound < x.shape[0]
    np.testing.assert_array_equal(x, ds.corpus)


@pytest.mark.parametrize("kind", KINDS)
def test_apply_tunes_a_device_corpus_on_the_device(gpu, ds, kind):
    res = NudgeM(backend="numpy").fit(ds.corpus, ds.train, ds.dev)
    want = res.apply(ds.corpus, backend="numpy", chunk_rows=100)
    x = ds.corpus.copy()
    got = res.apply(_device(kind, x), chunk_rows=100)
    assert type(got) is KINDS[kind][1]
    np.testing.assert_array_equal(_host(got), want)
    assert gpu.normalize_calls == [(FakeCupyArray, FakeCupyArray)] * -(-x.shape[0] // 100)
    assert FakeCupyArray.fetched == []
    np.testing.assert_array_equal(x, ds.corpus)


@pytest.mark.parametrize("layout", ["float64", "fortran", "float16"])
def test_apply_converts_device_chunks_where_they_are(gpu, ds, layout):
    res = NudgeN(backend="numpy").fit(ds.corpus, ds.train, ds.dev)
    x = {"float64": ds.corpus.astype(np.float64), "fortran": np.asfortranarray(ds.corpus),
         "float16": ds.corpus.astype(np.float16)}[layout]
    want = res.apply(x, backend="numpy", chunk_rows=500)
    got = res.apply(FakeCupyArray(x), chunk_rows=500)
    np.testing.assert_array_equal(got._host, want)


def test_apply_into_a_device_out(gpu, ds):
    res = NudgeN(backend="numpy").fit(ds.corpus, ds.train, ds.dev)
    want = res.apply(ds.corpus, backend="numpy")
    out = FakeCupyArray(np.full(ds.corpus.shape, np.nan, np.float32))
    assert res.apply(FakeCupyArray(ds.corpus.copy()), out) is out
    np.testing.assert_array_equal(out._host, want)
    with pytest.raises(ValueError, match="out: .*device array.*cupy.empty"):
        res.apply(FakeCupyArray(ds.corpus), np.empty(ds.corpus.shape, np.float32))
    with pytest.raises(ValueError, match="out: .*host array.*np.empty"):
        res.apply(ds.corpus, out)
    with pytest.raises(ValueError, match="out: "):
        res.apply(FakeCupyArray(ds.corpus), FakeCupyArray(np.empty((3, 3), np.float32)))


# ---------------------------------------------------------------------------------------------
# metrics, compat


@pytest.mark.parametrize("kind", ["cupy", "torch"])
def test_metrics_of_device_rankings(gpu, ds, kind):
    top = search(ds.test.embeddings, ds.corpus, 10, backend="numpy").indices
    want = metrics(top, ds.test, 10, backend="numpy", per_query=True)
    got = metrics(_device(kind, top.copy()), ds.test, 10, per_query=True)
    assert type(got.pop("per_query")) is KINDS[kind][1]
    want_per = want.pop("per_query")
    assert got == want
    got = metrics(_device(kind, top.copy()), ds.test, 10, per_query=True)
    np.testing.assert_array_equal(got["per_query"]._host, want_per)


@pytest.mark.parametrize("kind", ["cupy", "torch", "cai"])
@pytest.mark.parametrize("cls", [NUDGEN, NUDGEM])
def test_compat_returns_device_embeddings(gpu, ds, kind, cls):
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    extra = np.random.default_rng(3).standard_normal((57, ds.corpus.shape[1])).astype(np.float32)
    want = cls(backend="numpy").finetune_embeddings(ds.corpus, train, val,
                                                     nontrain_embeddings=extra)
    x, e = ds.corpus.copy(), extra.copy()
    est = cls()
    got = est.finetune_embeddings(_device(kind, x), train, val,
                                  nontrain_embeddings=_device(kind, e))
    assert type(got) is KINDS[kind][1]
    np.testing.assert_array_equal(_host(got), want)
    assert set(gpu.stream_calls) == {FakeCupyArray} and len(gpu.stream_calls) >= 2
    np.testing.assert_array_equal(x, ds.corpus)
    np.testing.assert_array_equal(e, extra)


# ---------------------------------------------------------------------------------------------
# CPU backends, auto


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cpu_backends_reject_a_device_corpus_naming_the_fix(gpu, ds, backend):
    dev = FakeCupyArray(ds.corpus)
    fix = (r"corpus: a GPU array was given to a CPU backend \(backend='%s'\); use "
           r"backend='cuda' .*\.get\(\) for CuPy, corpus\.cpu\(\)\.numpy\(\) for torch" % backend)
    with pytest.raises(TypeError, match=fix):
        search(ds.test.embeddings, dev, 5, backend=backend)
    with pytest.raises(TypeError, match=fix):
        NudgeN(backend=backend).fit(dev, ds.train, ds.dev)
    res = NudgeN(backend=backend).fit(ds.corpus, ds.train, ds.dev)
    with pytest.raises(TypeError, match=fix):
        res.apply(dev, backend=backend)
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    with pytest.raises(TypeError, match=fix):
        NUDGEM(backend=backend).finetune_embeddings(dev, train, val)
    with pytest.raises(TypeError, match="nontrain_embeddings: a GPU array was given to a CPU"):
        NUDGEN(backend=backend).finetune_embeddings(ds.corpus, train, val,
                                                    nontrain_embeddings=dev)
    assert gpu.stream_calls == []


def test_host_only_functions_reject_a_device_corpus(gpu, ds):
    with pytest.raises(TypeError, match="corpus: a GPU array was given to a function that "
                                        r"takes host arrays only; pass a host copy"):
        Tuner(NudgeN(backend="cuda")).fit(FakeCupyArray(ds.corpus), ds.train, ds.dev)


def test_auto_picks_the_gpu_backend_when_a_device_is_present(gpu, ds):
    assert _backends.AUTO_ORDER[0] == "cuda"
    assert _backends.resolve("auto") == "cuda"
    want = search(ds.test.embeddings, ds.corpus, 6, backend="numpy")
    got = search(ds.test.embeddings, ds.corpus, 6)  # a host corpus: streamed by the GPU
    assert gpu.stream_calls == [np.ndarray]
    np.testing.assert_array_equal(got.indices, want.indices)
    assert isinstance(got.indices, np.ndarray)  # numpy in, numpy out


def test_without_a_device_auto_is_as_before(no_gpu, ds):
    first = next(n for n in ("cpp", "numba", "numpy") if _backends.backends()[n].available)
    assert _backends.resolve("auto") == first
    got = search(ds.test.embeddings, ds.corpus, 6)
    want = search(ds.test.embeddings, ds.corpus, 6, backend=first)
    np.testing.assert_array_equal(got.indices, want.indices)
    with pytest.raises(RuntimeError, match="corpus: is a GPU array but no GPU backend is "
                                           "available here .*no CUDA device"):
        search(ds.test.embeddings, FakeCupyArray(ds.corpus), 6)
    with pytest.raises(RuntimeError, match="corpus: is a GPU array"):
        NudgeM().fit(DLPackArray(ds.corpus), ds.train, ds.dev)


def test_a_streaming_backend_reports_to_the_callers_progress_bar(gpu, monkeypatch):
    """search.topk_pass owns the progress bar for every backend: a backend that streams the
    corpus itself (STREAMS_CORPUS) reports every row to it, under the caller's description. (On
    an H100 the cuda backend drew its own bar, "top-k (cuda)", and the CLI's pass name was lost.)"""
    import importlib
    search_module = importlib.import_module("nudgefast.search")  # the module, not the function
    bars = []

    class Bar:
        def __init__(self, progress, total, desc):
            self.desc, self.total, self.done, self.closed = desc, total, 0, False
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(search_module, "_progress_bar", Bar)
    x = FakeCupyArray(np.random.default_rng(3).standard_normal((1037, 19)).astype(np.float32))
    q = np.random.default_rng(4).standard_normal((5, 19)).astype(np.float32)
    search_module.topk_pass(gpu, q, x, 4, chunk_rows=100, progress=True, desc="NUDGE corpus pass")
    assert [(b.desc, b.total, b.done, b.closed) for b in bars] == [("NUDGE corpus pass", 1037, 1037, True)]
