"""Edge cases of the device-array dispatch found by a review (of commit 314378e), on the CPU,
reusing the fakes of tests/test_device_arrays.py (fake CuPy / torch, the stub cuda backend).
Each test that names a defect in its docstring failed before the fix that followed the review."""
from __future__ import annotations

import types

import numpy as np
import pytest

from nudgefast import NudgeM, NudgeN, QuantizedCorpus, _arrays, _backends, metrics, search
from nudgefast.compat import NUDGEN, queries_answers_dict
from test_device_arrays import (  # noqa: F401  (fixtures)
    FakeCupyArray, FakeTensor, _same_result, ds, fake_cupy, gpu, no_gpu)


def _no_cupy():
    raise ImportError("a GPU array was given, and reading one needs CuPy: pip install ...")


@pytest.fixture
def torch_only(monkeypatch):
    """torch with CUDA, no CuPy (so no cuda backend): the common setup of a torch user."""
    monkeypatch.setitem(_backends._cache, "cuda",
                        (None, "ImportError: No module named 'cupy'; fix: install CuPy"))
    monkeypatch.setattr(_arrays, "_cupy", _no_cupy)
    monkeypatch.setattr(_arrays, "_torch", lambda: types.SimpleNamespace(
        from_dlpack=lambda a: FakeTensor(a._host),
        as_tensor=lambda a, device=None: FakeTensor(np.array(a))))


# ---------------------------------------------------------------------------------------------
# Small device arguments with a host corpus, CuPy absent


def test_torch_cuda_queries_with_a_host_corpus_need_no_cupy(torch_only, ds):
    """The queries are copied to the host through torch (no CuPy needed), the corpus pass runs
    on a CPU backend, and the results come back as torch tensors through torch alone (the
    defect: ``_arrays.like`` imported CuPy there and failed after the whole pass)."""
    q = FakeTensor(np.array(ds.test.embeddings))
    want = search(ds.test.embeddings, ds.corpus, 4, backend="numpy")
    got = search(q, ds.corpus, 4, backend="numpy")
    np.testing.assert_array_equal(got.indices._host, want.indices)


def test_metrics_of_torch_cuda_rankings_need_no_cupy(torch_only, ds):
    top = search(ds.test.embeddings, ds.corpus, 10, backend="numpy").indices
    want = metrics(top, ds.test, 10, backend="numpy", per_query=True)
    got = metrics(FakeTensor(top.copy()), ds.test, 10, backend="numpy", per_query=True)
    np.testing.assert_array_equal(got["per_query"]._host, want["per_query"])


# ---------------------------------------------------------------------------------------------
# compat: nontrain_embeddings on the device, corpus on the host


def test_compat_device_nontrain_without_a_gpu_backend_says_so(no_gpu, ds):
    """'auto' follows a device nontrain_embeddings too: without a GPU backend the error says
    so (the defect: 'auto' followed the corpus only, became cpp, and the device array was then
    told to "use backend='cuda' (or 'auto')", which is what was passed)."""
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    extra = np.random.default_rng(3).standard_normal((57, ds.corpus.shape[1])).astype(np.float32)
    with pytest.raises(RuntimeError, match="nontrain_embeddings: is a GPU array but no GPU "
                                           "backend is available"):
        NUDGEN().finetune_embeddings(ds.corpus, train, val,
                                     nontrain_embeddings=FakeCupyArray(extra))


def test_compat_device_nontrain_with_a_host_corpus_on_the_gpu(gpu, ds):
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    extra = np.random.default_rng(3).standard_normal((57, ds.corpus.shape[1])).astype(np.float32)
    want = NUDGEN(backend="numpy").finetune_embeddings(ds.corpus, train, val,
                                                       nontrain_embeddings=extra)
    e = extra.copy()
    got = NUDGEN().finetune_embeddings(ds.corpus, train, val, nontrain_embeddings=FakeCupyArray(e))
    assert isinstance(got, np.ndarray)  # the library of `embeddings`
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(e, extra)
    assert FakeCupyArray.fetched and max(FakeCupyArray.fetched) < extra.shape[0]


# ---------------------------------------------------------------------------------------------
# Silent whole-array copies


def test_quantized_corpus_does_not_copy_device_codes_to_the_host(gpu):
    """QuantizedCorpus keeps its codes as given: device codes are refused, naming ``codes``,
    never copied to the host whole (the defect: _host_array copied any device array)."""
    codes = FakeCupyArray(np.zeros((5000, 4), np.int8))
    try:
        QuantizedCorpus(codes, "binary", d=32)
    except TypeError as exc:
        assert "codes" in str(exc)
    assert FakeCupyArray.fetched == []  # the 5000 rows did not cross to the host


# ---------------------------------------------------------------------------------------------
# Devices: an argument on another GPU is named


class _OnGpu1(FakeCupyArray):
    device = types.SimpleNamespace(id=1)


@pytest.fixture
def two_gpus(gpu, monkeypatch):
    cp = types.SimpleNamespace(**vars(fake_cupy))
    cp.cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0))
    monkeypatch.setattr(_arrays, "_cupy", lambda: cp)
    return gpu


def test_queries_on_another_gpu_are_named(two_gpus, ds):
    with pytest.raises(ValueError, match="^queries: .*GPU 1"):
        search(_OnGpu1(np.array(ds.test.embeddings)), ds.corpus, 4)


def test_corpus_on_another_gpu_is_named(two_gpus, ds):
    with pytest.raises(ValueError, match="^corpus: .*GPU 1"):
        search(ds.test.embeddings, _OnGpu1(ds.corpus.copy()), 4)


# ---------------------------------------------------------------------------------------------
# Layouts, dtypes, bad rows, shapes (expected to pass)


@pytest.mark.parametrize("layout", ["fortran", "float64", "float16", "strided"])
def test_fit_and_search_on_odd_device_layouts(gpu, ds, layout):
    base = {"fortran": np.asfortranarray(ds.corpus), "float64": ds.corpus.astype(np.float64),
            "float16": ds.corpus.astype(np.float16),
            "strided": np.repeat(ds.corpus, 2, axis=1)[:, ::2]}[layout]
    want = NudgeM(backend="numpy", chunk_rows=400).fit(base, ds.train, ds.dev)
    x = base.copy(order="K")
    got = NudgeM(chunk_rows=400).fit(FakeCupyArray(x), ds.train, ds.dev)
    _same_result(got, want)
    ws = search(ds.test.embeddings, base, 5, want, backend="numpy", chunk_rows=400)
    gs = search(ds.test.embeddings, FakeCupyArray(x), 5, got, chunk_rows=400)
    np.testing.assert_array_equal(gs.indices._host, ws.indices)
    np.testing.assert_array_equal(x, base)


def test_a_nan_row_of_a_device_corpus_is_named_globally(gpu, ds):
    x = ds.corpus.copy()
    x[2345, 0] = np.nan
    with pytest.raises(ValueError, match="corpus: row 2345 contains NaN"):
        NudgeN(chunk_rows=300, k_val=2).fit(FakeCupyArray(x), ds.train, ds.dev)
    res = NudgeN(backend="numpy").fit(ds.corpus, ds.train, ds.dev)
    with pytest.raises(ValueError, match="corpus: row 2345 contains NaN"):
        res.apply(FakeCupyArray(x), chunk_rows=300)


@pytest.mark.parametrize("shape", [(10,), (0, 37), (5, 0)])
def test_bad_shapes_of_a_device_corpus_are_named(gpu, ds, shape):
    with pytest.raises(ValueError, match="^corpus: "):
        search(ds.test.embeddings[:, :1] if shape == (5, 0) else ds.test.embeddings,
               FakeCupyArray(np.zeros(shape, np.float32)), 3)


def test_device_queries_auto_host_corpus_gpu_present(gpu, ds):
    q = np.array(ds.test.embeddings)
    want = search(q, ds.corpus, 4, backend="numpy")
    dq = FakeCupyArray(q.copy())
    got = search(dq, ds.corpus, 4)
    assert isinstance(got.indices, FakeCupyArray)
    np.testing.assert_array_equal(got.indices._host, want.indices)
    np.testing.assert_array_equal(dq._host, q)


def test_metrics_of_device_rankings_with_padding(gpu, ds):
    top = search(ds.test.embeddings, ds.corpus, 10, backend="numpy").indices.copy()
    top[:, 7:] = -1
    want = metrics(top, ds.test, 10, backend="numpy", per_query=True)
    got = metrics(FakeCupyArray(top.copy()), ds.test, 10, per_query=True)
    np.testing.assert_array_equal(got.pop("per_query")._host, want.pop("per_query"))
    assert got == want


def test_device_corpus_with_cpu_backend_in_apply_out_and_metrics(gpu, ds):
    res = NudgeN(backend="numpy").fit(ds.corpus, ds.train, ds.dev)
    x = ds.corpus.copy()
    out = np.full(x.shape, 7.0, np.float32)
    with pytest.raises(TypeError, match="corpus: a GPU array was given to a CPU backend"):
        res.apply(FakeCupyArray(x), out, backend="numpy")
    assert (out == 7.0).all()  # nothing written before the refusal
    np.testing.assert_array_equal(x, ds.corpus)


def test_a_torch_corpus_of_another_dtype_is_told_to_call_float(gpu):
    """The dtype hint speaks the caller's library: .float() for torch, astype for NumPy."""
    q = np.ones((2, 4), np.float32)
    with pytest.raises(TypeError, match=r"corpus: dtype int32 .*corpus\.float\(\)"):
        search(q, FakeTensor(np.ones((5, 4), np.int32)), 1)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"corpus: dtype int32 .*corpus\.float\(\)"):
        search(q, torch.ones((5, 4), dtype=torch.int32), 1, backend="numpy")
    with pytest.raises(TypeError, match=r"corpus\.astype\(np\.float32\)"):
        search(q, np.ones((5, 4), np.int32), 1, backend="numpy")
