"""Bad input: a clear error naming the argument and the fix, the same from every backend,
and nothing the caller passed is modified."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import REAL, awkward
from nudgefast import NudgeM, NudgeN, QuerySet, backends, search
from nudgefast import _backends


@pytest.fixture(scope="module")
def ds():
    return awkward(n=300, d=11, seed=21, n_train=60, n_dev=30)


def _fit(backend, corpus, train, val, cls=NudgeN):
    return cls(backend=backend).fit(corpus, train, val)


@pytest.mark.parametrize("cls", [NudgeN, NudgeM])
def test_corpus_errors(backend, ds, cls):
    c = np.array(ds.corpus, dtype=np.float32)
    cases = [
        (c[None], ValueError, r"corpus: expected a 2-D"),
        (c.astype(np.int32), TypeError, r"corpus: dtype int32 is not supported"),
        (c[:, :5], ValueError, r"train.embeddings: has d=11 but the corpus has d=5"),
        (c[:0], ValueError, r"corpus: is empty"),
    ]
    bad_nan = c.copy(); bad_nan[123, 4] = np.nan
    bad_inf = c.copy(); bad_inf[45, 0] = np.inf
    bad_zero = c.copy(); bad_zero[77] = 0
    cases += [(bad_nan, ValueError, r"corpus: row 123 contains NaN or inf"),
              (bad_inf, ValueError, r"corpus: row 45 contains NaN or inf"),
              (bad_zero, ValueError, r"corpus: row 77 is a zero vector")]
    for corpus, err, msg in cases:
        before = np.array(corpus, copy=True)
        with pytest.raises(err, match=msg):
            _fit(backend, corpus, ds.train, ds.dev, cls)
        np.testing.assert_array_equal(corpus, before)


def test_query_and_answer_errors(backend, ds):
    c, tr, dev = ds.corpus, ds.train, ds.dev
    emb = tr.embeddings
    nan_q = emb.copy(); nan_q[3, 2] = np.nan
    zero_q = emb.copy(); zero_q[5] = 0
    cases = [
        (QuerySet(nan_q, tr.answers), ValueError, r"train.embeddings: row 3 contains NaN"),
        (QuerySet(zero_q, tr.answers), ValueError, r"train.embeddings: row 5 is a zero vector"),
        (QuerySet(emb.astype(np.int64), tr.answers), TypeError, r"train.embeddings: dtype int64"),
        (QuerySet(emb, [[c.shape[0]]] + list(tr.answers[1:])), ValueError,
         r"train: answers\[0\] contains record 300, which is >= N=300"),
        (QuerySet(emb, [[-1]] + list(tr.answers[1:])), ValueError,
         r"train: answers\[0\] contains record -1, which is negative"),
        (QuerySet(emb, [[]] * len(tr)), ValueError, r"train: has no \(query, answer\) pairs"),
        ("not a query set", TypeError, r"train: expected a QuerySet"),
    ]
    for train, err, msg in cases:
        with pytest.raises(err, match=msg):
            _fit(backend, c, train, dev)
    with pytest.raises(ValueError, match=r"QuerySet.answers: has 2 lists for"):
        QuerySet(emb, [[1], [2]])
    # Answer types are checked when the QuerySet is built, before any fit.
    with pytest.raises(TypeError, match=r"answers\[0\]: record indices must be integers"):
        QuerySet(emb, [[0.5]] + list(tr.answers[1:]))


def test_validation_query_without_answers_is_skipped(backend, ds):
    answers = [list(a) for a in ds.dev.answers]
    answers[0] = []
    val = QuerySet(ds.dev.embeddings, answers)
    with pytest.warns(UserWarning, match=r"val: 1 validation queries have no answers"):
        res = NudgeN(backend=backend).fit(ds.corpus, ds.train, val)
    assert np.isfinite(res.val_accuracy).all()
    with pytest.warns(UserWarning, match=r"val: 1 validation queries have no answers"):
        NudgeM(backend=backend).fit(ds.corpus, ds.train, val)


def test_k_errors(backend, ds):
    with pytest.raises(ValueError, match=r"k=301 exceeds the number of records N=300"):
        search(ds.test.embeddings, ds.corpus, 301, backend=backend)
    with pytest.raises(ValueError, match=r"k: must be >= 1"):
        search(ds.test.embeddings, ds.corpus, 0, backend=backend)
    with pytest.raises(ValueError, match=r"k_val=301 exceeds"):
        NudgeN(backend=backend, k_val=301).fit(ds.corpus, ds.train, ds.dev)
    with pytest.raises(ValueError, match=r"queries: expected a 2-D array"):
        search(ds.test.embeddings[0], ds.corpus, 3, backend=backend)


def test_backend_errors():
    with pytest.raises(ValueError, match=r"backend='nope' is not known"):
        NudgeN(backend="nope")
    with pytest.raises(ValueError, match=r"precision='float64' .* needs backend='numpy'"):
        NudgeN(backend="cpp", precision="float64")
    info = backends()
    assert set(info) == set(_backends.KNOWN)
    for b in info.values():
        assert b.available or "fix:" in b.reason


def test_missing_backend_names_the_fix(monkeypatch):
    monkeypatch.setitem(_backends._cache, "cpp", (None, "ImportError: no _cpu; fix: pip install ."))
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available here: .*pip install"):
        NudgeN(backend="cpp")


def test_ci_builds_every_cpu_backend():
    """In CI a backend that failed to build must fail the run, not silently skip its tests."""
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI (CI=true)")
    missing = {n: b.reason for n, b in backends().items()
               if n in ("cpp", "numba", "numpy") and not b.available}
    assert not missing, missing


def test_ci_sees_the_real_datasets():
    """In CI shared/ lies beside the checkout: the real-data tests must run, not skip."""
    if os.environ.get("CI") != "true":
        pytest.skip("only enforced in CI (CI=true)")
    assert REAL, "no dataset under ../shared/data: the real-data tests would all skip"
