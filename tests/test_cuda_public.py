"""Device arrays through the public API on a real GPU (issue 9 §2): a CuPy array or a torch
CUDA tensor as the corpus of ``search``, ``NudgeN/NudgeM.fit``, ``NudgeResult.apply``,
``metrics`` and ``compat``, against the same calls on the host copy of the corpus with the same
(cuda) backend. Results come back in the caller's library; the caller's corpus is unchanged.
The dispatch itself is covered on the CPU by tests/test_device_arrays.py.

Every test carries the ``gpu`` mark and the module skips cleanly without CuPy or a visible CUDA
device (the registry's reason); the torch tests skip without a CUDA-enabled torch.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast import _backends

if not _backends.backends()["cuda"].available:
    pytest.skip(_backends.backends()["cuda"].reason, allow_module_level=True)

import cupy as cp  # noqa: E402  (after the skip)

from conftest import awkward, poison_device_pool  # noqa: E402
from nudgefast import NudgeM, NudgeN, _validate, metrics, search  # noqa: E402
from nudgefast.compat import NUDGEM, NUDGEN, queries_answers_dict  # noqa: E402

pytestmark = pytest.mark.gpu

K = 10


@pytest.fixture(autouse=True)
def poisoned_pool():
    poison_device_pool()
    yield


@pytest.fixture(scope="module")
def ds():
    return awkward(n=2503, d=37, seed=9)


@pytest.fixture
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


def _same_fit(got, want):
    assert got.gamma == want.gamma
    for name in ("indices", "vectors", "gammas", "val_accuracy"):
        value = getattr(got, name)
        assert isinstance(value, np.ndarray), name  # the delta is host data
        np.testing.assert_array_equal(value, getattr(want, name), err_msg=name)


def _unchanged(dev, before):
    assert bool(cp.array_equal(dev, before)), "the caller's device corpus was modified"


def test_auto_picks_cuda():
    assert _backends.resolve("auto") == "cuda"
    assert _backends.resolve("auto", device_input="corpus") == "cuda"


def test_a_device_corpus_is_viewed_not_copied(ds):
    xd = cp.asarray(ds.corpus)
    assert _validate.as_corpus("corpus", xd, backend="cuda").data.ptr == xd.data.ptr
    with pytest.raises(TypeError, match=r"corpus: a GPU array was given to a CPU backend"):
        search(ds.test.embeddings, xd, 5, backend="numpy")


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda t: np.dtype(t).name)
def test_search_cupy_corpus(ds, dtype):
    x = ds.corpus.astype(dtype)
    xd = cp.asarray(x)
    before = xd.copy()
    q = ds.test.embeddings
    want = search(q, x, K, backend="cuda")
    got = search(q, xd, K)  # auto: cuda, reading xd in place
    assert isinstance(got.scores, cp.ndarray) and isinstance(got.indices, cp.ndarray)
    assert got.scores.dtype == np.float32 and got.indices.dtype == np.int64
    np.testing.assert_array_equal(got.indices.get(), want.indices)
    np.testing.assert_allclose(got.scores.get(), want.scores, rtol=1e-6, atol=1e-6)
    res = NudgeN(backend="cuda", k_val=3).fit(x, ds.train, ds.dev)
    want = search(q, x, K, res, backend="cuda")
    got = search(q, xd, K, res)
    np.testing.assert_array_equal(got.indices.get(), want.indices)
    np.testing.assert_allclose(got.scores.get(), want.scores, rtol=1e-6, atol=1e-6)
    _unchanged(xd, before)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("cls,kw", [(NudgeN, {"k_val": 3}), (NudgeM, {})],
                         ids=["nudge-n", "nudge-m"])
def test_fit_cupy_corpus_matches_the_host_corpus(ds, cls, kw, dtype):
    x = ds.corpus.astype(dtype)
    xd = cp.asarray(x)
    before = xd.copy()
    want = cls(backend="cuda", **kw).fit(x, ds.train, ds.dev)
    got = cls(**kw).fit(xd, ds.train, ds.dev)  # auto
    _same_fit(got, want)
    _unchanged(xd, before)


def test_apply_cupy_corpus_stays_on_the_device(ds):
    xd = cp.asarray(ds.corpus)
    before = xd.copy()
    res = NudgeM(backend="cuda").fit(ds.corpus, ds.train, ds.dev)
    want = res.apply(ds.corpus, backend="cuda")  # host corpus: the host normalisation
    got = res.apply(xd)
    assert isinstance(got, cp.ndarray) and got.dtype == np.float32 and got.shape == want.shape
    host = got.get()
    # Device normalisation: within the normalize_rows contract's one float32 ulp.
    np.testing.assert_array_max_ulp(host, want, maxulp=1)
    np.testing.assert_array_equal(host[res.indices], res.vectors)
    out = cp.full(xd.shape, cp.nan, dtype=cp.float32)
    assert res.apply(xd, out) is out
    np.testing.assert_array_equal(out.get(), host)
    # Strided and float64 device corpora are converted chunk by chunk, on the device.
    for other in (cp.asfortranarray(xd), xd.astype(cp.float64)):
        np.testing.assert_array_max_ulp(res.apply(other).get(), want, maxulp=1)
    _unchanged(xd, before)


def test_metrics_of_device_rankings(ds):
    top = search(ds.test.embeddings, cp.asarray(ds.corpus), K).indices
    assert isinstance(top, cp.ndarray)
    want = metrics(top.get(), ds.test, K, backend="cuda", per_query=True)
    got = metrics(top, ds.test, K, per_query=True)
    assert isinstance(got["per_query"], cp.ndarray)
    np.testing.assert_array_equal(got.pop("per_query").get(), want.pop("per_query"))
    assert got == want


@pytest.mark.parametrize("cls", [NUDGEN, NUDGEM])
def test_compat_cupy_embeddings(ds, cls):
    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    extra = np.random.default_rng(2).standard_normal((301, ds.corpus.shape[1])).astype(np.float32)
    xd, ed = cp.asarray(ds.corpus), cp.asarray(extra)
    before = xd.copy()
    want = cls(backend="cuda").finetune_embeddings(ds.corpus, train, val,
                                                    nontrain_embeddings=extra)
    got = cls().finetune_embeddings(xd, train, val, nontrain_embeddings=ed)
    assert isinstance(got, cp.ndarray) and got.dtype == np.float32
    np.testing.assert_array_max_ulp(got.get(), want, maxulp=1)
    _unchanged(xd, before)


def test_torch_cuda_tensor_in_torch_tensor_out(ds, torch):
    t = torch.as_tensor(ds.corpus, device="cuda")
    before = t.clone()
    q = ds.test.embeddings
    view = _validate.as_corpus("corpus", t, backend="cuda")
    assert view.data.ptr == t.data_ptr()  # read in place

    want = search(q, ds.corpus, K, backend="cuda")
    got = search(q, t, K)
    assert isinstance(got.indices, torch.Tensor) and got.indices.is_cuda
    assert got.indices.dtype == torch.int64 and got.scores.dtype == torch.float32
    np.testing.assert_array_equal(got.indices.cpu().numpy(), want.indices)
    np.testing.assert_allclose(got.scores.cpu().numpy(), want.scores, rtol=1e-6, atol=1e-6)

    res_want = NudgeN(backend="cuda", k_val=3).fit(ds.corpus, ds.train, ds.dev)
    res = NudgeN(k_val=3).fit(t, ds.train, ds.dev)
    _same_fit(res, res_want)

    tuned = res.apply(t)
    assert isinstance(tuned, torch.Tensor) and tuned.is_cuda and tuned.dtype == torch.float32
    np.testing.assert_array_max_ulp(tuned.cpu().numpy(), res_want.apply(ds.corpus,
                                                                        backend="cuda"), maxulp=1)
    m = metrics(got.indices, ds.test, K, per_query=True)
    assert isinstance(m["per_query"], torch.Tensor) and m["per_query"].is_cuda
    assert m[f"recall@{K}"] == metrics(want.indices, ds.test, K)[f"recall@{K}"]

    # A tensor that requires grad is read through detach(), not refused.
    g = t.clone().requires_grad_(True)
    np.testing.assert_array_equal(search(q, g, K).indices.cpu().numpy(), want.indices)
    assert torch.equal(t, before), "the caller's tensor was modified"

    train, val = queries_answers_dict(ds.train), queries_answers_dict(ds.dev)
    out = NUDGEN().finetune_embeddings(t, train, val)
    assert isinstance(out, torch.Tensor) and out.is_cuda
    with pytest.raises(TypeError, match=r"corpus\.cpu\(\)\.numpy\(\)"):
        NudgeN(backend="numpy").fit(t, ds.train, ds.dev)
