"""``project`` on every backend against the float64 reference: float16 / float32 / float64
base rows, float32 / float64 gradients, no / one / 123 records, d = 385. The float64 math is the
reference's, in its order, with one rounding to float32: compared exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import assert_same_error, assert_unchanged, backend_op, copies, known_defect, repeat_run, rng

_NO_SHAPE_CHECKS = "project does not check that E and C agree (reads C with E's shape)"


@pytest.mark.parametrize("e_dtype", [np.float16, np.float32, np.float64], ids=lambda t: "E" + np.dtype(t).name)
@pytest.mark.parametrize("c_dtype", [np.float32, np.float64], ids=lambda t: "C" + np.dtype(t).name)
@pytest.mark.parametrize("t", [0, 1, 123])
def test_matches_reference(backend, e_dtype, c_dtype, t):
    gen = rng("p", t)
    E = gen.standard_normal((t, 385)).astype(e_dtype)
    C = gen.standard_normal((t, 385)).astype(c_dtype)
    alpha, beta = gen.standard_normal(t), gen.standard_normal(t)
    before = copies(E, C, alpha, beta)
    got = repeat_run(backend_op(backend, "project"), E, C, alpha, beta)
    assert_unchanged(before, [E, C, alpha, beta])
    assert got.dtype == np.float32 and got.shape == (t, 385)
    np.testing.assert_array_equal(got, ref.project(E, C, alpha, beta))


def test_bad_input_raises_what_the_reference_raises(backend, request):
    known_defect(request, backend, {"numba": _NO_SHAPE_CHECKS, "cuda": _NO_SHAPE_CHECKS})
    E, C, a = np.ones((4, 5), np.float32), np.ones((4, 6)), np.ones(4)
    assert_same_error(backend, lambda module: module.project(E, C, a, a))


def test_signature(backend):
    backend_op(backend, "project")
