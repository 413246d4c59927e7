"""Input builders and checks shared by the per-backend op tests (cpp, numba, cuda)."""
from __future__ import annotations

import numpy as np


def _copies(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def _assert_unchanged(before, after):
    for b, a in zip(before, after):
        if b is not None:
            np.testing.assert_array_equal(np.asarray(a), b)


def _corpus(n, d, dtype, seed, n_dup=15, bad_rows=True):
    """Rows of varied norms with exact duplicates (ties), a NaN row and a zero row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 3.0, size=(n, 1))
    src = rng.choice(n, n_dup, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    x[dst] = x[src]
    if bad_rows:
        x[n // 3, d // 2] = np.nan
        x[n // 2] = 0.0
    return x.astype(dtype)


def _empty_state(n_q, k):
    return np.full((n_q, k), -np.inf, dtype=np.float32), np.full((n_q, k), -1, dtype=np.int64)


def _segments(n_queries, t, rng):
    counts = rng.integers(1, 6, size=t)
    order = rng.integers(0, n_queries, size=counts.sum()).astype(np.int64)
    seg_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return order, seg_ptr
