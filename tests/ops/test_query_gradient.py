"""``query_gradient`` on every backend against the float64 reference: float32 and float64
queries, no / one / 301 segments of one to five queries each, d = 385.

No bad-input case: the only input this op can get wrong is an index out of range (``order`` or
``seg_ptr``), where the reference raises IndexError, the compiled CPU backend ValueError, and the
kernels that trust their inputs read out of bounds; nothing safe to compare yet.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL
from nudgefast._backends import numpy_backend as ref
from op_cases import assert_unchanged, backend_op, copies, repeat_run, rng, segments


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("t", [0, 1, 301])
def test_matches_reference(backend, dtype, t):
    gen = rng("qg", t)
    queries = gen.standard_normal((53, 385)).astype(dtype)
    order, seg_ptr = segments(53, t, gen)
    before = copies(queries, order, seg_ptr)
    got = repeat_run(backend_op(backend, "query_gradient"), queries, order, seg_ptr)
    assert_unchanged(before, [queries, order, seg_ptr])
    want = ref.query_gradient(queries, order, seg_ptr)
    assert got.dtype == np.float64 and got.shape == want.shape == (t, 385)
    # float64 sums in row order; NumPy's reduceat associates differently: rounding only.
    np.testing.assert_allclose(got, want, rtol=TOL[np.float64], atol=TOL[np.float64])


def test_signature(backend):
    backend_op(backend, "query_gradient")
