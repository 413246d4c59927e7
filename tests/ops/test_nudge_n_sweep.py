"""``nudge_n_sweep`` on every backend against the float64 reference: coarse grids where touched
and untouched scores tie (the index rule decides), padded untouched slots, queries without
answers, k_val from 0 to beyond the candidates, no untouched candidates with more touched
records than a warp. Counts and the k_val-th scores (``kth``): compared exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import (assert_same_error, assert_unchanged, backend_op, copies, known_defect,
                      n_problem, repeat_run)

_NO_SHAPE_CHECKS = "nudge_n_sweep does not check that H agrees with S (reads H with S's shape)"


def _check(backend, args, k_val):
    before = copies(*args)
    got = repeat_run(backend_op(backend, "nudge_n_sweep"), *args, k_val)
    assert_unchanged(before, args)
    want = ref.nudge_n_sweep(*args, k_val)
    assert got.dtype == np.int64 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # kth: every k_val-th best score, into a NaN-poisoned buffer (every element written).
    want_kth, got_kth = np.full(want.shape, np.nan), np.full(want.shape, np.nan)
    ref.nudge_n_sweep(*args, k_val, kth=want_kth)
    backend_op(backend, "nudge_n_sweep")(*args, k_val, kth=got_kth)
    assert not np.isnan(want_kth).any()
    np.testing.assert_array_equal(got_kth, want_kth)


@pytest.mark.parametrize("k_val", [0, 1, 5, 10, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference(backend, k_val, seed):
    _check(backend, n_problem(seed), k_val)


@pytest.mark.parametrize("t", [57, 300])
@pytest.mark.parametrize("k_val", [7, 40])
def test_no_untouched_candidates(backend, t, k_val):
    S, H, alpha, beta, touched, _, _, ans_ptr, ans_index = n_problem(3, t=t, k_unt=1)
    n_b = S.shape[0]
    lists = [a[np.isin(a, touched)] for a in np.split(ans_index, ans_ptr[1:-1])]
    ans_index = np.concatenate(lists).astype(np.int64)
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    unt_s = np.full((n_b, 3), -np.inf, np.float32)
    unt_i = np.full((n_b, 3), -1, np.int64)
    _check(backend, (S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index), k_val)


def test_bad_input_raises_what_the_reference_raises(backend, request):
    known_defect(request, backend, {"numba": _NO_SHAPE_CHECKS, "cuda": _NO_SHAPE_CHECKS})
    S, H, a = np.zeros((3, 4)), np.zeros((3, 5)), np.ones((2, 4))
    unt_s, unt_i = np.full((3, 2), -np.inf, np.float32), np.full((3, 2), -1, np.int64)
    assert_same_error(backend, lambda module: module.nudge_n_sweep(
        S, H, a, a, np.arange(4, dtype=np.int64), unt_s, unt_i, np.zeros(4, np.int64), np.zeros(0, np.int64), 3))


def test_signature(backend):
    backend_op(backend, "nudge_n_sweep")
