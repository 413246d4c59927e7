"""What only the compiled CPU backend has: the pybind11 module ``nudgefast._cpu`` itself. The ops
against the reference, over every backend, are in tests/ops/ (``pytest tests/ops -k cpp``).

The binding reads the corpus chunk in place (it refuses what it would have to copy) and writes
into the caller's ``out=`` buffers, checked first; poisoned buffers show any element a kernel
leaves unwritten.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nudgefast._cpu")

from conftest import TOL  # noqa: E402
from nudgefast import _cpu  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import empty_state, m_problem, metrics_problem, n_problem, poisoned, rng, segments  # noqa: E402


def test_topk_chunk_is_not_copied():
    """The kernel reads float16/32/64 chunks in place: the binding refuses what it would have to copy."""
    q = np.ones((2, 8), np.float32)
    s, i = empty_state(2, 3)
    ex = np.empty(0, np.int64)
    with pytest.raises(TypeError):
        _cpu.topk_update(q, np.ones((4, 8), np.int32), 0, ex, True, s, i)
    with pytest.raises(TypeError):
        _cpu.topk_update(q.astype(np.float64), np.ones((4, 8), np.float32), 0, ex, True, s, i)
    with pytest.raises(TypeError):
        _cpu.topk_update(q, np.ones((8, 4), np.float32).T, 0, ex, True, s, i)
    with pytest.raises(ValueError):
        _cpu.topk_update(q, np.ones((4, 9), np.float32), 0, ex, True, s, i)


def test_outputs_fully_written():
    """Every ``out=`` buffer, NaN-poisoned (bools neither False nor True), is filled and returned
    as it is: no element left unwritten, no copy."""
    gen = rng("poison")
    queries = gen.standard_normal((53, 37))
    order, seg_ptr = segments(53, 101, gen)
    out = poisoned((101, 37), np.float64)
    assert _cpu.query_gradient(queries, order, seg_ptr, out=out) is out
    np.testing.assert_allclose(out, ref.query_gradient(queries, order, seg_ptr),
                               rtol=TOL[np.float64], atol=TOL[np.float64])

    args = m_problem(7)
    S, G, pair_query, _, s_x, g_x, u_score = args
    outs = (poisoned(len(s_x), np.float64), poisoned(len(s_x), np.float64), poisoned(len(s_x), np.bool_))
    got = _cpu.nudge_m_intervals(S, G, pair_query, s_x, g_x, u_score, 1e-8, out=outs)
    assert all(g is o for g, o in zip(got, outs))
    assert set(np.unique(outs[2].view(np.uint8)).tolist()) <= {0, 1}
    for g, w in zip(outs, ref.nudge_m_intervals(*args, 1e-8)):
        np.testing.assert_array_equal(g, w)

    S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans_index = n_problem(5)
    out = poisoned((S.shape[0], alpha.shape[0]), np.int64)
    assert _cpu.nudge_n_sweep(S, H, alpha, beta, touched, unt_s.astype(np.float64), unt_i, ans_ptr,
                              ans_index, 10, out=out) is out
    np.testing.assert_array_equal(out, ref.nudge_n_sweep(S, H, alpha, beta, touched, unt_s, unt_i,
                                                         ans_ptr, ans_index, 10))

    E, C = gen.standard_normal((45, 37)).astype(np.float32), gen.standard_normal((45, 37))
    alpha, beta = gen.standard_normal(45), gen.standard_normal(45)
    out = poisoned((45, 37), np.float32)
    assert _cpu.project(E, C, alpha, beta, out=out) is out
    np.testing.assert_array_equal(out, ref.project(E, C, alpha, beta))

    args = metrics_problem("poison", n=40)
    out = poisoned((40, 3), np.float64)
    assert _cpu.metrics(*args, 10, out=out) is out
    want = ref.metrics(*args, 10)
    np.testing.assert_allclose(out, want, rtol=TOL[np.float64], atol=0, equal_nan=True)
    assert np.array_equal(np.isnan(out), np.isnan(want))  # NaN only where a query has no answer


def test_out_buffer_is_checked():
    E = np.ones((4, 5), np.float32)
    a = np.ones(4)
    with pytest.raises(ValueError):
        _cpu.project(E, E, a, a, out=np.empty((4, 6), np.float32))
    with pytest.raises(TypeError):
        _cpu.project(E, E, a, a, out=np.empty((4, 5), np.float64))
