"""What only the Numba backend has: its state budget and its thread-count handling. The ops
against the reference, over every backend, are in tests/ops/ (``pytest tests/ops -k numba``).
"""
from __future__ import annotations

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from nudgefast._backends import numba_backend as nb  # noqa: E402
from op_cases import corpus, empty_state, unit_queries  # noqa: E402


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda t: np.dtype(t).name)
def test_topk_queries_split_under_a_small_state_budget(dtype, monkeypatch):
    """With a tiny state budget the workers split the queries instead of the rows: the same
    result, bit for bit."""
    n, d, n_q, k = 3001, 385, 11, 17
    x = corpus(n, d, dtype, seed=5, n_dup=60)
    q = unit_queries(n_q, d, seed=5).astype(np.float32)
    exclude = np.arange(7, n, 13, dtype=np.int64)
    want_s, want_i = empty_state(n_q, k)
    want_bad = nb.topk_update(q, x, 77, exclude, True, want_s, want_i, n_threads=2)
    monkeypatch.setattr(nb, "_STATE_BUDGET", 1)
    s, i = empty_state(n_q, k)
    assert nb.topk_update(q, x, 77, exclude, True, s, i, n_threads=2) == want_bad == 77 + n // 3
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(i, want_i)


def test_thread_count_restored():
    previous = numba.get_num_threads()
    other = 1 if previous > 1 else 2
    if other > numba.config.NUMBA_NUM_THREADS:
        pytest.skip("numba has a single thread here: no other count to set and restore")
    nb.project(np.ones((2, 3)), np.ones((2, 3)), np.ones(2), np.ones(2), n_threads=other)
    assert numba.get_num_threads() == previous
