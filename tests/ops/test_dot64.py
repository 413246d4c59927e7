"""``dot64`` on every backend: ``A @ B.T`` in float64 against the reference (1e-12 relative:
the backends sum in different orders), and, what the tuner relies on, bit for bit the same
element whatever the shapes around it: one row, one column, odd subsets, against the full
product (a BLAS product fails this). d = 1, 7 (odd, below a vector), 385.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import assert_same_error, assert_unchanged, backend_op, copies, repeat_run, rng


@pytest.mark.parametrize("d", [1, 7, 385])
@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (1, 1), (37, 29), (301, 130)])
def test_matches_reference(backend, n, m, d):
    gen = rng("dot64", n * 1000 + m + d)
    A = gen.standard_normal((n, d)).astype(np.float32)  # float32 queries widen exactly
    B = gen.standard_normal((m, d))
    before = copies(A, B)
    got = repeat_run(backend_op(backend, "dot64"), A, B)
    assert_unchanged(before, [A, B])
    assert got.dtype == np.float64 and got.shape == (n, m)
    want = A.astype(np.float64) @ B.T
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.sqrt(d))


@pytest.mark.parametrize("d", [7, 385])
def test_every_element_independent_of_the_shape(backend, d):
    gen = rng("dot64-shape", d)
    A, B = gen.standard_normal((203, d)), gen.standard_normal((77, d))
    fn = backend_op(backend, "dot64")
    full = fn(A, B)
    for i in (0, 5, 202):
        np.testing.assert_array_equal(fn(A[i:i + 1], B)[0], full[i])
    for j in (0, 8, 76):
        np.testing.assert_array_equal(fn(A, B[j:j + 1])[:, 0], full[:, j])
    rows, cols = np.arange(3, 203, 7), np.arange(1, 77, 3)
    np.testing.assert_array_equal(fn(A[rows], B[cols]), full[np.ix_(rows, cols)])
    np.testing.assert_array_equal(fn(A[::-1], B[::-1]), full[::-1, ::-1])


def test_bad_input_raises_what_the_reference_raises(backend):
    A, B = np.ones((4, 5)), np.ones((3, 6))
    assert_same_error(backend, lambda module: module.dot64(A, B))


def test_signature(backend):
    backend_op(backend, "dot64")
