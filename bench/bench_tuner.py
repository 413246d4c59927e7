"""Tuner updates against a full fit, per backend (pytest-benchmark; sizes as in conftest.py).

The report with ratios, floors and the nudge-ft (LlamaIndex-style) refit side by side is
``nudgefast bench --tuner``; this suite times the same operations under pytest-benchmark.
"""
import numpy as np
import pytest

from conftest import run
from nudgefast import NudgeM, NudgeN, QuerySet, Tuner


def _split(w, first=None):
    emb = np.asarray(w.train.embeddings, np.float32)
    first = first or len(w.train) - 100
    return QuerySet(emb[:first], w.train.answers[:first]), (emb[first:], w.train.answers[first:])


@pytest.mark.parametrize("cls", [NudgeN, NudgeM], ids=["NudgeN", "NudgeM"])
def test_full_fit(benchmark, workload, backend, cls):
    train0, _ = _split(workload)
    est = cls(backend=backend, progress=False)
    run(benchmark, lambda: est.fit(workload.corpus, train0, workload.val), rounds=1)


@pytest.mark.parametrize("cls", [NudgeN, NudgeM], ids=["NudgeN", "NudgeM"])
def test_add_then_remove_100_feedback(benchmark, workload, backend, cls):
    """One round: add 100 feedback queries, then withdraw them (the state returns to the fit)."""
    train0, (q, a) = _split(workload)
    tuner = Tuner(cls(backend=backend, progress=False))
    tuner.fit(workload.corpus, train0, workload.val)

    def round_trip():
        delta = tuner.add_feedback(q, a)
        tuner.remove_feedback(delta.summary["feedback_ids"])
    benchmark.extra_info.update(n=workload.n, t=int(tuner._t), val=len(workload.val))
    run(benchmark, round_trip, rounds=10)


def test_add_10k_records(benchmark, workload, backend):
    train0, _ = _split(workload)
    tuner = Tuner(NudgeN(backend=backend, progress=False))
    tuner.fit(workload.corpus, train0, workload.val)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((10_000, workload.corpus.shape[1]), dtype=np.float32)
    run(benchmark, lambda: tuner.add_records(rows), rounds=3)
