"""The small ops on the touched records, per backend, at the workload's sizes.

Floors: query_gradient reads nnz(A) * d floats; nudge_n_sweep does n_val * t * n_gamma
multiply-adds plus selection; nudge_m_intervals n_pairs * t; project t * d.
"""
import numpy as np
import pytest

from conftest import run
from nudgefast import _backends
from nudgefast._defaults import NUDGE_N_GAMMAS


@pytest.fixture(scope="module")
def touched(workload):
    w = workload
    csr = w.train.csr()
    order = np.argsort(csr.index, kind="stable")
    recs = csr.index[order]
    first = np.r_[True, recs[1:] != recs[:-1]]
    qry = np.repeat(np.arange(len(w.train)), csr.counts)[order]
    seg = np.r_[np.flatnonzero(first), recs.size].astype(np.int64)
    t = int(first.sum())
    rng = np.random.default_rng(0)
    d = w.corpus.shape[1]
    b = min(256, len(w.val))  # one validation block
    S = rng.standard_normal((b, t))
    H = rng.standard_normal((b, t))
    alpha = rng.random((NUDGE_N_GAMMAS.size, t))
    beta = rng.random((NUDGE_N_GAMMAS.size, t))
    return dict(q=w.train.embeddings, qry=qry, seg=seg, touched=recs[first], S=S, H=H,
                alpha=alpha, beta=beta, E=rng.standard_normal((t, d)),
                C=rng.standard_normal((t, d)), val=w.val.csr().rows(0, b), b=b)


def test_query_gradient(benchmark, backend, touched):
    ops = _backends.get(backend)
    run(benchmark, lambda: ops.query_gradient(touched["q"], touched["qry"], touched["seg"]))


def test_nudge_n_sweep(benchmark, backend, touched):
    ops = _backends.get(backend)
    x = touched
    unt_s = np.random.default_rng(1).standard_normal((x["b"], 1))
    unt_i = np.full((x["b"], 1), 10**9, np.int64)
    run(benchmark, lambda: ops.nudge_n_sweep(x["S"], x["H"], x["alpha"], x["beta"], x["touched"],
                                             unt_s, unt_i, x["val"].ptr, x["val"].index, 1))


def test_nudge_m_intervals(benchmark, backend, touched):
    ops = _backends.get(backend)
    x = touched
    p = x["val"].index.size
    pq = np.repeat(np.arange(x["b"]), x["val"].counts)
    pos = np.full(p, -1, np.int64)
    run(benchmark, lambda: ops.nudge_m_intervals(x["S"], x["H"], pq, pos, np.zeros(p),
                                                 np.zeros(p), np.zeros(p), 0.0))


def test_project(benchmark, backend, touched):
    ops = _backends.get(backend)
    t = touched["E"].shape[0]
    run(benchmark, lambda: ops.project(touched["E"], touched["C"], np.ones(t), np.ones(t)))


def test_normalize_rows(benchmark, workload, backend):
    """The dense tuned corpus (NudgeResult.apply): floor = N d (itemsize + 4) bytes over the
    memory bandwidth, the same bytes as a copy of the corpus into a float32 buffer."""
    w = workload
    out = np.empty(w.corpus.shape, np.float32)
    out[:] = 0
    fn = _backends.get(backend).normalize_rows
    benchmark.extra_info.update(bytes=w.corpus.nbytes + out.nbytes)
    run(benchmark, lambda: fn(w.corpus, out))
