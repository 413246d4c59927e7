"""Builders and checks shared by the op tests (tests/ops/, one file per op over every backend)
and the backend-specific files (test_cpp_ops.py, test_numba_ops.py, test_cuda.py).

Every seed is an explicit integer or the crc32 of a key (``rng("qg", t)``): the same data in
every process, so a failure reproduces. Tolerances come from ``conftest.TOL`` (one per dtype).
"""
from __future__ import annotations

import contextlib
import inspect
import zlib

import numpy as np
import pytest

from conftest import TOL
from nudgefast import _backends
from nudgefast._backends import numpy_backend as ref


def rng(*key):
    """A generator seeded from ``key`` by crc32 (``hash()`` of a string changes per process)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def backend_op(backend, name):
    """Backend ``backend``'s op ``name``; its signature must be the reference's (the contract)."""
    module = _backends.get(backend)
    assert module.NAME == backend
    fn = getattr(module, name)
    assert inspect.signature(fn) == inspect.signature(getattr(ref, name)), f"{backend}.{name}"
    return fn


def known_defect(request, backend, reasons):
    """Mark this case an expected failure on the backends named in ``reasons`` (strict: once
    fixed it fails, so the entry has to go)."""
    if backend in reasons:
        request.applymarker(pytest.mark.xfail(reason=reasons[backend], strict=True))


# ---------------------------------------------------------------------------------------------
# Caller arrays unchanged, outputs fully written, repeat runs identical


def copies(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after):
    for b, a in zip(before, after):
        if b is not None:
            np.testing.assert_array_equal(np.asarray(a), b)


def poison(a):
    """Fill ``a`` with what no op writes: NaN, else bytes 0xA5 (a bool that is neither False
    nor True, a large negative int64); returns ``a``."""
    if a.dtype.kind in "fc":
        a[...] = np.nan
    elif a.dtype.kind in "biu":
        a.reshape(-1, order="A").view(np.uint8)[...] = 0xA5  # a view: np.empty is contiguous
    return a


def poisoned(shape, dtype):
    return poison(np.empty(shape, dtype))


@contextlib.contextmanager
def poisoned_allocations():
    """``np.empty`` hands out poisoned memory meanwhile: an op that allocates its output with it
    and leaves an element unwritten shows. (Compiled code that allocates natively is checked
    through its own ``out=`` buffers in its backend's file; cuda starts from a NaN device pool.)
    Call the op once before, so that no jit compilation happens in here."""
    real = np.empty

    def empty(*args, **kwargs):
        return poison(real(*args, **kwargs))

    np.empty = empty
    try:
        yield
    finally:
        np.empty = real


def assert_identical(a, b):
    """Bit-identical results (NaN where the other has NaN), tuples element by element."""
    if isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == np.bool_:
        assert set(np.unique(b.view(np.uint8)).tolist()) <= {0, 1}, "a bool output was never written"
    np.testing.assert_array_equal(a, b)


def repeat_run(fn, *args):
    """``fn(*args)``, then again on one thread with poisoned allocations: the two must be
    bit-identical (repeat runs, the thread count, unwritten elements). Returns the second."""
    first = fn(*args)
    with poisoned_allocations():
        again = fn(*args, n_threads=1)
    assert_identical(first, again)
    return again


def assert_same_error(backend, call):
    """``call(op_module)`` raises on ``backend`` the error type the reference raises."""
    with pytest.raises(Exception) as want:
        call(ref)
    with pytest.raises(want.type):
        call(_backends.get(backend))


# ---------------------------------------------------------------------------------------------
# topk_update


def corpus(n, d, dtype, seed, n_dup=15, bad_rows=True):
    """Rows of varied norms with exact duplicates (ties), a NaN row (n // 3) and a zero row
    (n // 2)."""
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((n, d)) * gen.uniform(0.5, 3.0, size=(n, 1))
    src = gen.choice(n, n_dup, replace=False)
    dst = gen.choice(np.setdiff1d(np.arange(n), src), n_dup, replace=False)
    x[dst] = x[src]
    if bad_rows:
        x[n // 3, d // 2] = np.nan
        x[n // 2] = 0.0
    return x.astype(dtype)


def unit_queries(n_q, d, seed):
    q = np.random.default_rng(seed + 1).standard_normal((n_q, d))
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def twin_queries(q64, x, n=3):
    """Point the first ``n`` queries at duplicated finite nonzero rows of ``x``, so exact ties
    reach the top-k."""
    rows, counts = np.unique(np.asarray(x, np.float64), axis=0, return_counts=True)
    twins = rows[(counts > 1) & np.isfinite(rows).all(axis=1) & (np.abs(rows).sum(axis=1) > 0)]
    twins = twins[: min(n, q64.shape[0])]
    q64 = q64.copy()
    q64[: len(twins)] = twins / np.linalg.norm(twins, axis=1, keepdims=True)
    return q64


def empty_state(n_q, k, dtype=np.float32):
    return np.full((n_q, k), -np.inf, dtype=dtype), np.full((n_q, k), -1, dtype=np.int64)


def reference_topk(q64, x, row_offset, exclude, normalize, k, state=None):
    """The float64 reference's (scores, index, first_bad) for one chunk (merged into ``state``)."""
    rs, ri = empty_state(q64.shape[0], k, np.float64) if state is None else state
    ex = np.zeros(0, np.int64) if exclude is None else exclude
    with np.errstate(all="ignore"):
        bad = ref.topk_update(q64, np.asarray(x, np.float64), row_offset, ex, normalize, rs, ri)
    return rs, ri, bad


def check_topk(q64, x, row_offset, exclude, normalize, scores, index, first_bad, want):
    """``scores``/``index`` are a valid top-k of ``x``: the reference's first bad row and scores
    (``want`` from ``reference_topk``) to ``TOL[float32]`` (scores are float32 sums of float32
    products whatever the chunk dtype), indices whose true scores match, the tie rule exactly,
    no excluded or bad row, every slot written. Ties between different records that round
    differently are allowed: only scores are compared with the reference, not indices."""
    n_q, k = scores.shape
    assert index.shape == (n_q, k) and index.dtype == np.int64
    assert first_bad == want[2]
    x64 = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        norms = np.linalg.norm(x64, axis=1)
        allowed = np.isfinite(norms) & ((norms > 0) if normalize else True)
        true = q64 @ np.where(allowed[:, None], x64, 0.0).T
        if normalize:
            true = true / np.where(allowed, norms, 1.0)[None, :]
    scale = 1.0 if normalize else max(1.0, float(norms[allowed].max(initial=1.0)))
    atol = TOL[np.float32] * scale * max(1.0, float(np.linalg.norm(q64, axis=1).max(initial=1.0)))
    if exclude is not None:
        allowed[exclude] = False
    n_valid = min(k, int(allowed.sum()))
    assert not np.isnan(scores).any(), "an output score was never written"
    for i in range(n_q):
        assert np.all(index[i, :n_valid] >= 0) and np.all(index[i, n_valid:] == -1)
        assert np.all(np.isneginf(scores[i, n_valid:]))
        idx = index[i, :n_valid] - row_offset
        s = scores[i, :n_valid]
        assert np.all((idx >= 0) & (idx < x64.shape[0])), "an index out of range (unwritten?)"
        assert len(np.unique(idx)) == n_valid and np.all(allowed[idx])
        np.testing.assert_allclose(s, true[i, idx], atol=atol, rtol=0)
        np.testing.assert_allclose(scores[i], want[0][i], atol=atol, rtol=0)
        # The tie rule, exactly: score descending, then index ascending.
        assert np.all((s[:-1] > s[1:]) | ((s[:-1] == s[1:]) & (idx[:-1] < idx[1:])))
        if n_valid == k and allowed.sum() > k:  # nothing left out beats the k-th (to rounding)
            outside = np.setdiff1d(np.flatnonzero(allowed), idx)
            assert true[i, outside].max() <= s[-1] + atol


def check_duplicate_rule(x, index, row_offset, exclude):
    """With exact duplicate rows, a later duplicate is kept only if the earlier one is (or is
    excluded). Returns how many kept rows had an earlier twin."""
    _, first, inverse = np.unique(np.asarray(x), axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    excluded = set() if exclude is None else set(np.asarray(exclude).tolist())
    n_twins = 0
    for i in range(index.shape[0]):
        kept = set((index[i][index[i] >= 0] - row_offset).tolist())
        for r in kept:
            twin = first[inverse[r]]
            if twin != r and twin not in excluded:
                n_twins += 1
                assert twin in kept, f"query {i}: row {r} kept but its earlier duplicate {twin} is not"
    return n_twins


# ---------------------------------------------------------------------------------------------
# The small ops


def segments(n_queries, t, gen):
    """``order``/``seg_ptr`` of ``t`` nonempty segments over ``n_queries`` queries."""
    counts = gen.integers(1, 6, size=t)
    order = gen.integers(0, n_queries, size=counts.sum()).astype(np.int64)
    seg_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return order, seg_ptr


def m_problem(seed, n_b=23, t=41, n_pairs=97):
    """nudge_m_intervals arguments (less eps) on coarse grids: exact ties (D == 0, s_dif == 0,
    D + eps == 0) are common; a fifth of the pairs have no untouched competitor."""
    gen = rng("m", seed)
    S = gen.integers(-8, 9, size=(n_b, t)) / 8.0
    G = gen.integers(-8, 9, size=(n_b, t)) / 8.0
    pair_query = gen.integers(0, n_b, size=n_pairs).astype(np.int64)
    pair_pos = gen.integers(-1, t, size=n_pairs).astype(np.int64)
    touched = pair_pos >= 0
    s_x = np.where(touched, S[pair_query, np.maximum(pair_pos, 0)], gen.integers(-8, 9, n_pairs) / 8.0)
    g_x = np.where(touched, G[pair_query, np.maximum(pair_pos, 0)], 0.0)
    u_score = gen.integers(-8, 9, size=n_pairs) / 8.0
    u_score[gen.random(n_pairs) < 0.2] = -np.inf
    return S, G, pair_query, pair_pos, s_x, g_x, u_score


def n_problem(seed, n_b=31, t=57, n_gamma=25, k_unt=12):
    """nudge_n_sweep arguments (less k_val) on coarse grids: touched and untouched scores tie
    often, so the index rule decides; gamma 0 is the base scores; some queries have padded
    untouched slots and some no answers."""
    gen = rng("n", seed)
    S = gen.integers(-16, 17, size=(n_b, t)) / 16.0
    H = gen.integers(-16, 17, size=(n_b, t)) / 16.0
    alpha = gen.integers(0, 5, size=(n_gamma, t)) / 4.0
    beta = gen.integers(0, 5, size=(n_gamma, t)) / 4.0
    alpha[0], beta[0] = 1.0, 0.0
    ids = gen.permutation(100_000)[: t + n_b * k_unt]
    touched = np.sort(ids[:t]).astype(np.int64)
    unt_index = ids[t:].reshape(n_b, k_unt).astype(np.int64)
    unt_scores = np.sort(gen.integers(-16, 17, size=(n_b, k_unt)) / 16.0, axis=1)[:, ::-1].astype(np.float32)
    for i in range(0, n_b, 4):
        cut = gen.integers(0, k_unt)
        unt_scores[i, cut:] = -np.inf
        unt_index[i, cut:] = -1
    ans_ptr, ans = [0], []
    for i in range(n_b):
        pool = np.concatenate([touched, unt_index[i][unt_index[i] >= 0]])
        ans.append(np.unique(gen.choice(pool, size=gen.integers(0, 8))))
        ans_ptr.append(ans_ptr[-1] + len(ans[-1]))
    ans_index = np.concatenate(ans).astype(np.int64)
    return S, H, alpha, beta, touched, unt_scores, unt_index, np.array(ans_ptr, np.int64), ans_index


def metrics_problem(seed, n=57, width=10, n_records=40):
    """metrics arguments (less k): retrieved lists with -1 holes, answer lists (some empty) with
    graded relevances (zeros included)."""
    gen = rng("metrics", seed)
    retrieved = gen.integers(0, n_records, size=(n, width)).astype(np.int64)
    retrieved[gen.random((n, width)) < 0.1] = -1
    lists = [np.unique(gen.integers(0, n_records, size=gen.integers(0, 12))) for _ in range(n)]
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    ans_index = np.concatenate(lists).astype(np.int64)
    ans_rel = gen.integers(0, 4, size=len(ans_index)).astype(np.float64)
    return retrieved, ans_ptr, ans_index, ans_rel

