"""``nudge_m_intervals`` on every backend against the float64 reference: coarse grids where
exact ties (D == 0, s_dif == 0, D + eps == 0) are common, eps from 0 to 0.5, pairs without an
untouched competitor, random values with a NaN, no pairs, no touched records. The reference's
IEEE operations in its order: compared exactly, NaN included.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import (assert_identical, assert_same_error, assert_unchanged, backend_op, copies,
                      known_defect, m_problem, repeat_run, rng)

_NO_SHAPE_CHECKS = "nudge_m_intervals does not check that G agrees with S (reads G with S's shape)"


def _check(backend, args, eps):
    before = copies(*args)
    got = repeat_run(backend_op(backend, "nudge_m_intervals"), *args, eps)
    assert_unchanged(before, args)
    with np.errstate(all="ignore"):
        want = ref.nudge_m_intervals(*args, eps)
    assert got[0].dtype == got[1].dtype == np.float64 and got[2].dtype == np.bool_
    assert_identical(want, got)


@pytest.mark.parametrize("eps", [0.0, 1e-8, 0.125, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(backend, eps, seed):
    _check(backend, m_problem(seed), eps)


def test_random_values_and_nan(backend):
    gen = rng("m-rand")
    S, G = gen.standard_normal((9, 300)), gen.standard_normal((9, 300))
    S[2, 5] = np.nan
    pair_query = gen.integers(0, 9, size=200).astype(np.int64)
    s_x, g_x, u_score = gen.standard_normal(200), gen.standard_normal(200), gen.standard_normal(200)
    _check(backend, (S, G, pair_query, np.full(200, -1, np.int64), s_x, g_x, u_score), 1e-8)


def test_no_pairs(backend):
    e = np.empty(0)
    _check(backend, (np.zeros((3, 0)), np.zeros((3, 0)), np.empty(0, np.int64), np.empty(0, np.int64), e, e, e),
           1e-8)


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-6])
def test_no_touched_records(backend, eps):
    """Only the untouched competitor bounds gamma, or nothing does: high = 1/eps (inf at 0).
    With g_x = 0 (D == 0) it blocks the pair exactly when it already scores higher."""
    args = (np.zeros((2, 0)), np.zeros((2, 0)), np.array([0, 1, 1, 0, 1]), np.full(5, -1),
            np.array([0.5, 0.5, 0.1, 0.2, 0.5]), np.array([0.25, -0.25, 0.0, 0.0, 0.0]),
            np.array([-np.inf, 0.75, 0.3, -np.inf, 0.4]))
    _check(backend, args, eps)


def test_bad_input_raises_what_the_reference_raises(backend, request):
    known_defect(request, backend, {"numba": _NO_SHAPE_CHECKS, "cuda": _NO_SHAPE_CHECKS})
    S, G, e = np.zeros((3, 4)), np.zeros((3, 5)), np.zeros(2)
    pairs = np.array([0, 1], np.int64)
    assert_same_error(backend, lambda module: module.nudge_m_intervals(S, G, pairs, np.full(2, -1), e, e, e, 1e-8))


def test_signature(backend):
    backend_op(backend, "nudge_m_intervals")
