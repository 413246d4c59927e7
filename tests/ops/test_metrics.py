"""``metrics`` on every backend against the float64 reference: 57 queries with -1 holes in the
retrieved lists, answer lists (some empty: NaN rows) with graded relevances (zeros included),
k below, at and beyond the retrieved width.

No bad-input case: a pointer array of the wrong length is where the backends part (the reference
raises IndexError, the compiled CPU backend ValueError, numba reads out of bounds and may crash
the process); nothing safe to compare yet.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL
from nudgefast._backends import numpy_backend as ref
from op_cases import assert_unchanged, backend_op, copies, metrics_problem, repeat_run


@pytest.mark.parametrize("k", [1, 5, 10, 14])
def test_matches_reference(backend, k):
    args = metrics_problem(k)
    before = copies(*args)
    got = repeat_run(backend_op(backend, "metrics"), *args, k)
    assert_unchanged(before, args)
    with np.errstate(all="ignore"):
        want = ref.metrics(*args, k)
    assert got.shape == (args[0].shape[0], 3) and got.dtype == np.float64
    # NaN exactly where a query has no answer (poisoned outputs would show as NaN elsewhere).
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).any()
    # NumPy sums the ideal DCG pairwise, the kernels in order: rounding only.
    np.testing.assert_allclose(got, want, rtol=TOL[np.float64], atol=0, equal_nan=True)


def test_signature(backend):
    backend_op(backend, "metrics")
