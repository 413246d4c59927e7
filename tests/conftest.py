"""Shared fixtures: the available backends, real datasets found on disk, awkward synthetic data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from nudgefast import _backends, datasets

BACKENDS = [name for name, info in _backends.backends().items() if info.available]
#: The backends whose ops run on ``n_threads`` CPU threads (numpy and cuda ignore the argument).
THREADED = [name for name in BACKENDS if name in ("cpp", "numba")]
#: Tolerances stated once per dtype: float32 production paths vs the float64 reference.
TOL = {np.float64: 1e-10, np.float32: 2e-5, np.float16: 2e-5}

#: The shared datasets beside this checkout (tests/../../shared/data), else wherever
#: ``datasets.find()`` looks ($NUDGEFAST_DATA first).
_BESIDE = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = datasets.find(None if os.environ.get("NUDGEFAST_DATA") or not _BESIDE.is_dir()
                     else _BESIDE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_report_header(config):
    names = ", ".join(p.name for p in REAL) or "none found (set NUDGEFAST_DATA or add ../shared/data)"
    return [f"nudgefast backends: {', '.join(BACKENDS)}", f"real datasets: {names}"]


def poison_device_pool():
    """Fill the free CuPy memory pool with NaN, so device outputs allocated next start as NaN
    and an element a kernel never writes shows."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.full(16 << 20, cp.nan, dtype=cp.float64)  # 128 MiB, returned to the pool below
    cp.cuda.get_current_stream().synchronize()
    del junk


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.gpu) if name == "cuda" else name
                        for name in BACKENDS])
def backend(request):
    """Every available backend (cuda only where CuPy sees a device, with the ``gpu`` mark);
    the cuda case starts from a NaN-poisoned device pool."""
    if request.param == "cuda":
        poison_device_pool()
    return request.param


def real_dataset_params():
    if not REAL:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason="no real dataset under ../shared/data (none prepared yet)"))]
    return [pytest.param(p, id=p.name) for p in REAL]


def awkward(n=1237, d=37, seed=0, n_train=240, n_dev=90, n_dup=12):
    """Synthetic data of awkward sizes with exact duplicate records (ties)."""
    ds = datasets.synthetic(n_records=n, d=d, n_train=n_train, n_dev=n_dev, n_test=60,
                            n_clusters=23, seed=seed)
    rng = np.random.default_rng(seed + 100)
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    corpus = np.array(ds.corpus)
    corpus[dst] = corpus[src]
    # Rows that are not unit length: the kernels normalise on the fly.
    corpus[::7] *= 3.0
    ds.corpus = corpus
    return ds
