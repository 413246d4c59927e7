"""pytest-benchmark suites (not part of ``pytest tests``): run them with

    pytest bench/ --benchmark-columns=median,iqr,min,max --benchmark-sort=name

Sizes come from the environment: NUDGEFAST_BENCH_N (default 200000), NUDGEFAST_BENCH_D (384),
NUDGEFAST_BENCH_TRAIN (5000), NUDGEFAST_BENCH_VAL (1000). The workloads are the ones
``nudgefast bench`` uses (``nudgefast.benchmark``).
"""
from __future__ import annotations

import os

import pytest

from nudgefast import _backends, benchmark

BACKENDS = [n for n, b in _backends.backends().items() if b.available]


def _env(name, default):
    return int(float(os.environ.get(name, default)))


@pytest.fixture(scope="session")
def workload():
    return benchmark.synthetic_workload(_env("NUDGEFAST_BENCH_N", 200_000),
                                        _env("NUDGEFAST_BENCH_D", 384),
                                        _env("NUDGEFAST_BENCH_TRAIN", 5000),
                                        _env("NUDGEFAST_BENCH_VAL", 1000))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def run(bench, fn, rounds=3):
    """One warm-up, then ``rounds`` timed runs (pedantic: no calibration loops)."""
    return bench.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
