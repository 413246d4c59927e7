"""The compiled CPU backend refuses bad arguments before any native work, and ``normalize_rows``.

Every index argument of every ``nudgefast._cpu`` op is checked in the binding (the kernels trust
their indices: one bad value is a read or write outside a buffer, as ``exclude=[900, 5,
-7000000]`` once was). Each case below breaks one argument of a good call and asserts a
``ValueError`` naming it, with the inputs and the output buffers (NaN-poisoned ``out=``, the
in-place top-k state) left exactly as they were; the good call itself is checked against the
NumPy reference. ``n_threads`` is one clear line for any bad value. ``.ci/sanitize.sh`` runs this
file under ASan/UBSan.

``normalize_rows`` is compared with ``numpy_backend.normalize_rows`` to one float32 ulp (the
contract: the kernel multiplies by the float64 reciprocal of the norm).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

pytest.importorskip("nudgefast._cpu")

from nudgefast import _cpu  # noqa: E402
from nudgefast._backends import cpp_backend as cpp  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402


def _corpus(n, d, dtype, seed):
    """Rows of varied norms, none zero or NaN."""
    gen = np.random.default_rng(seed)
    return (gen.standard_normal((n, d)) * gen.uniform(0.5, 3.0, size=(n, 1))).astype(dtype)


def _segments(n_queries, t, gen):
    counts = gen.integers(1, 6, size=t)
    order = gen.integers(0, n_queries, size=counts.sum()).astype(np.int64)
    return order, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _poisoned(shape, dtype):
    a = np.empty(shape, dtype)
    if a.dtype == np.bool_:
        a.view(np.uint8)[...] = 0x55
    elif a.dtype.kind == "f":
        a[...] = np.nan
    else:
        a[...] = -7_777_777
    return a


def _snapshot(kwargs):
    """Byte copies of every array argument (and of the arrays inside a tuple ``out``)."""
    snap = {}
    for name, v in kwargs.items():
        if isinstance(v, np.ndarray):
            snap[name] = v.copy()
        elif isinstance(v, tuple):
            snap[name] = tuple(a.copy() for a in v)
    return snap


def _assert_same(snap, kwargs):
    for name, before in snap.items():
        after = kwargs[name]
        pairs = zip(before, after) if isinstance(before, tuple) else [(before, after)]
        for b, a in pairs:
            # Byte equality: NaN poison included.
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), f"{name} was modified"


# ---------------------------------------------------------------------------------------------
# Good calls of every binding (keyword arguments of nudgefast._cpu) and their reference results.


def _query_gradient_call():
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((53, 37))
    order, seg_ptr = _segments(53, 41, rng)
    kwargs = dict(queries=queries, order=order, seg_ptr=seg_ptr, out=_poisoned((41, 37), np.float64))
    return kwargs, ref.query_gradient(queries, order, seg_ptr)


def _topk_call():
    n, d, n_q, k = 1000, 16, 5, 7
    x = _corpus(n, d, np.float32, seed=4)
    q = np.random.default_rng(4).standard_normal((n_q, d)).astype(np.float32)
    exclude = np.arange(3, n, 11, dtype=np.int64)
    s, i = np.full((n_q, k), -np.inf, np.float32), np.full((n_q, k), -1, np.int64)
    kwargs = dict(queries=q, chunk=x, row_offset=100, exclude=exclude, normalize=True, best_scores=s,
                  best_index=i)
    rs, ri = np.full((n_q, k), -np.inf), np.full((n_q, k), -1, np.int64)
    ref.topk_update(q.astype(np.float64), x.astype(np.float64), 100, exclude, True, rs, ri)
    return kwargs, ri


def _m_call():
    rng = np.random.default_rng(2)
    n_b, t, P = 9, 13, 31
    S, G = rng.standard_normal((n_b, t)), rng.standard_normal((n_b, t))
    pair_query = rng.integers(0, n_b, P).astype(np.int64)
    s_x, g_x, u_score = rng.standard_normal(P), rng.standard_normal(P), rng.standard_normal(P)
    out = (_poisoned(P, np.float64), _poisoned(P, np.float64), _poisoned(P, np.bool_))
    kwargs = dict(S=S, G=G, pair_query=pair_query, s_x=s_x, g_x=g_x, u_score=u_score, eps=1e-8, out=out)
    pair_pos = np.full(P, -1, np.int64)
    return kwargs, ref.nudge_m_intervals(S, G, pair_query, pair_pos, s_x, g_x, u_score, 1e-8)


def _n_args(seed=3, n_b=11, t=17, n_gamma=5, k_unt=4):
    rng = np.random.default_rng(seed)
    S, H = rng.integers(-8, 9, (n_b, t)) / 8.0, rng.integers(-8, 9, (n_b, t)) / 8.0
    alpha, beta = rng.integers(0, 4, (n_gamma, t)) / 4.0, rng.integers(0, 4, (n_gamma, t)) / 4.0
    ids = rng.permutation(1000)[: t + n_b * k_unt]
    touched = np.sort(ids[:t]).astype(np.int64)
    unt_index = ids[t:].reshape(n_b, k_unt).astype(np.int64)
    unt_scores = np.sort(rng.integers(-8, 9, (n_b, k_unt)) / 8.0, axis=1)[:, ::-1].copy()
    unt_scores[0, 2:], unt_index[0, 2:] = -np.inf, -1
    lists = [np.unique(rng.choice(np.concatenate([touched, unt_index[i][unt_index[i] >= 0]]),
                                  rng.integers(0, 5))) for i in range(n_b)]
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    ans_index = np.concatenate(lists).astype(np.int64)
    return dict(S=S, H=H, alpha=alpha, beta=beta, touched=touched, unt_scores=unt_scores, unt_index=unt_index,
                ans_ptr=ans_ptr, ans_index=ans_index)


def _n_call():
    args = _n_args()
    want = ref.nudge_n_sweep(*args.values(), 6)
    return dict(args, k_val=6, out=_poisoned(want.shape, np.int64)), want


def _project_call():
    rng = np.random.default_rng(5)
    E, C = rng.standard_normal((12, 9)).astype(np.float32), rng.standard_normal((12, 9))
    alpha, beta = rng.standard_normal(12), rng.standard_normal(12)
    return dict(E=E, C=C, alpha=alpha, beta=beta, out=_poisoned((12, 9), np.float32)), ref.project(E, C, alpha, beta)


def _metrics_args(seed=6, n=23, width=8):
    rng = np.random.default_rng(seed)
    retrieved = rng.integers(-1, 30, (n, width)).astype(np.int64)
    lists = [np.unique(rng.integers(0, 30, rng.integers(0, 12))) for _ in range(n)]
    ans_ptr = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).astype(np.int64)
    ans_index = np.concatenate(lists).astype(np.int64)
    ans_rel = rng.integers(0, 4, len(ans_index)).astype(np.float64)
    return dict(retrieved=retrieved, ans_ptr=ans_ptr, ans_index=ans_index, ans_rel=ans_rel)


def _metrics_call():
    args = _metrics_args()
    with np.errstate(all="ignore"):
        want = ref.metrics(*args.values(), 5)
    return dict(args, k=5, out=_poisoned(want.shape, np.float64)), want


def _normalize_call():
    x = _corpus(301, 37, np.float16, seed=7)
    out = _poisoned(x.shape, np.float32)
    want = np.empty(x.shape, np.float32)
    ref.normalize_rows(x, want)
    return dict(chunk=x, out=out), want


CALLS = {
    "query_gradient": _query_gradient_call,
    "topk_update": _topk_call,
    "nudge_m_intervals": _m_call,
    "nudge_n_sweep": _n_call,
    "project": _project_call,
    "metrics": _metrics_call,
    "normalize_rows": _normalize_call,
}


def _result(op, kwargs):
    """What a good call wrote, comparable with the reference's result."""
    return kwargs["best_index"] if op == "topk_update" else kwargs["out"]


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("n_threads", [None, 1, 3])
def test_good_calls_work(op, n_threads):
    kwargs, want = CALLS[op]()
    returned = getattr(_cpu, op)(**kwargs, n_threads=n_threads)
    got = _result(op, kwargs)
    if op == "nudge_m_intervals":
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    elif op == "normalize_rows":
        assert returned == -1
        np.testing.assert_array_less(np.abs(got - want), np.spacing(np.abs(want)) * 1.0001 + 1e-45)
    elif op == "metrics":
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, equal_nan=True)
    elif op == "query_gradient":
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    else:
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# One bad argument at a time: (op, the argument named in the error, how to break it).


def _set(name, value):
    def apply(kw):
        kw[name] = np.asarray(value, dtype=np.int64) if isinstance(value, list) else value
    return apply


def _edit(name, fn):
    def apply(kw):
        a = kw[name].copy()
        fn(a)
        kw[name] = a
    return apply


def _bump_ptr_end(kw_name, by):
    return _edit(kw_name, lambda a: a.__setitem__(-1, a[-1] + by))


BAD = [
    # query_gradient: order rows of queries; seg_ptr a CSR pointer into order.
    ("query_gradient", "order", _edit("order", lambda a: a.__setitem__(3, -1))),
    ("query_gradient", "order", _edit("order", lambda a: a.__setitem__(7, 53))),
    ("query_gradient", "order", _edit("order", lambda a: a.__setitem__(0, -(2**62)))),
    ("query_gradient", "seg_ptr", _edit("seg_ptr", lambda a: a.__setitem__(0, 1))),
    ("query_gradient", "seg_ptr", _edit("seg_ptr", lambda a: a.__setitem__(5, a[4] - 1))),
    ("query_gradient", "seg_ptr", _bump_ptr_end("seg_ptr", 1_000_000)),
    ("query_gradient", "seg_ptr", _bump_ptr_end("seg_ptr", -1)),
    ("query_gradient", "seg_ptr", _set("seg_ptr", np.empty(0, np.int64))),
    # topk_update: exclude sorted, unique, chunk-local; row_offset >= 0; state shapes agree.
    ("topk_update", "exclude", _set("exclude", [900, 5, -7000000])),  # the reported overflow
    ("topk_update", "exclude", _set("exclude", [5, 900, -7000000])),
    # Unchecked, this one writes 13 floats below the kernel's per-tile buffer (row 3 is marked
    # while the tile of rows 16..31 is packed): ASan's heap-buffer-overflow, see .ci/sanitize.sh.
    ("topk_update", "exclude", _set("exclude", [20, 3])),
    ("topk_update", "exclude", _set("exclude", [5, 3])),
    ("topk_update", "exclude", _set("exclude", [5, 5])),
    ("topk_update", "exclude", _set("exclude", [-1])),
    ("topk_update", "exclude", _set("exclude", [1000])),
    ("topk_update", "exclude", _set("exclude", [2**62])),
    ("topk_update", "row_offset", _set("row_offset", -1)),
    ("topk_update", "row_offset", _set("row_offset", 2**63 - 10)),
    ("topk_update", "best_index", _set("best_index", np.full((5, 6), -1, np.int64))),
    ("topk_update", "best_index", _set("best_index", np.full((4, 7), -1, np.int64))),
    ("topk_update", "best_scores", _set("best_scores", np.full((4, 7), -np.inf, np.float32))),
    ("topk_update", "chunk", _set("chunk", np.ones((10, 15), np.float32))),
    # nudge_m_intervals: pair_query rows of S; per-pair arrays agree.
    ("nudge_m_intervals", "pair_query", _edit("pair_query", lambda a: a.__setitem__(4, 9))),
    ("nudge_m_intervals", "pair_query", _edit("pair_query", lambda a: a.__setitem__(0, -1))),
    ("nudge_m_intervals", "s_x", lambda kw: kw.__setitem__("s_x", kw["s_x"][:-1])),
    ("nudge_m_intervals", "G", lambda kw: kw.__setitem__("G", kw["G"][:, :-1].copy())),
    ("nudge_m_intervals", "out[2] (feasible)", lambda kw: kw.__setitem__(
        "out", (kw["out"][0], kw["out"][1], _poisoned(30, np.bool_)))),
    # nudge_n_sweep: record ids >= 0 (-1 marks an empty untouched slot); CSR answers.
    ("nudge_n_sweep", "touched", _edit("touched", lambda a: a.__setitem__(2, -5))),
    ("nudge_n_sweep", "unt_index", _edit("unt_index", lambda a: a.__setitem__((3, 1), -2))),
    ("nudge_n_sweep", "ans_ptr", _edit("ans_ptr", lambda a: a.__setitem__(0, 1))),
    ("nudge_n_sweep", "ans_ptr", _edit("ans_ptr", lambda a: a.__setitem__(slice(3, None), a[3:] + 10**6))),
    ("nudge_n_sweep", "ans_ptr", _bump_ptr_end("ans_ptr", 1)),
    ("nudge_n_sweep", "ans_ptr", lambda kw: kw.__setitem__("ans_ptr", kw["ans_ptr"][:-1])),
    ("nudge_n_sweep", "ans_index", _edit("ans_index", lambda a: a.__setitem__(0, -3))),
    ("nudge_n_sweep", "ans_index", _edit("ans_index", lambda a: a.__setitem__(slice(None), a[::-1]))),
    ("nudge_n_sweep", "k_val", _set("k_val", -1)),
    ("nudge_n_sweep", "k_val", _set("k_val", 2**64)),
    ("nudge_n_sweep", "beta", lambda kw: kw.__setitem__("beta", kw["beta"][:-1])),
    ("nudge_n_sweep", "unt_index", lambda kw: kw.__setitem__("unt_index", kw["unt_index"][:, :-1].copy())),
    # project: per-record arrays agree.
    ("project", "alpha", lambda kw: kw.__setitem__("alpha", kw["alpha"][:-1])),
    ("project", "C", lambda kw: kw.__setitem__("C", kw["C"][:-1])),
    # metrics: CSR answers sorted per query; ans_rel aligned; k >= 0.
    ("metrics", "ans_ptr", _edit("ans_ptr", lambda a: a.__setitem__(0, -1))),
    ("metrics", "ans_ptr", _edit("ans_ptr", lambda a: a.__setitem__(4, a[3] - 1))),
    ("metrics", "ans_ptr", _bump_ptr_end("ans_ptr", 5)),
    ("metrics", "ans_index", _edit("ans_index", lambda a: a.__setitem__(slice(None), a[::-1]))),
    ("metrics", "ans_index", _edit("ans_index", lambda a: a.__setitem__(-1, -1))),
    ("metrics", "ans_rel", lambda kw: kw.__setitem__("ans_rel", kw["ans_rel"][:-1])),
    ("metrics", "k", _set("k", -2)),
    # normalize_rows: out matches chunk's shape and does not partly overlap it.
    ("normalize_rows", "out", lambda kw: kw.__setitem__("out", _poisoned((300, 37), np.float32))),
    ("normalize_rows", "out", lambda kw: kw.__setitem__("out", _poisoned((301, 36), np.float32))),
]


@pytest.mark.parametrize("op,arg,breaks", BAD, ids=[f"{op}-{arg}-{i}" for i, (op, arg, _) in enumerate(BAD)])
def test_bad_argument_is_refused_and_nothing_is_written(op, arg, breaks):
    kwargs, _ = CALLS[op]()
    breaks(kwargs)
    snap = _snapshot(kwargs)
    with pytest.raises(ValueError) as info:
        getattr(_cpu, op)(**kwargs)
    msg = str(info.value)
    assert arg.split(" ")[0].split("[")[0] in msg, msg
    assert "\n" not in msg and "incompatible function arguments" not in msg
    _assert_same(snap, kwargs)


def test_the_reported_exclude_overflow_is_refused_by_the_wrapper_too():
    kwargs, _ = _topk_call()
    s, i = kwargs["best_scores"], kwargs["best_index"]
    before = s.copy(), i.copy()
    for ex in ([900, 5, -7000000], [5, 900, 1000], np.array([3.0, 4.5])):
        with pytest.raises((ValueError, TypeError), match="exclude"):
            cpp.topk_update(kwargs["queries"], kwargs["chunk"], 0, ex, True, s, i)
    np.testing.assert_array_equal(s, before[0])
    np.testing.assert_array_equal(i, before[1])
    # A float64 state goes through a copy: still untouched on error.
    s64 = np.full(s.shape, -np.inf)
    with pytest.raises(ValueError, match="exclude"):
        cpp.topk_update(kwargs["queries"], kwargs["chunk"], 0, [7, 7], True, s64, i)
    assert np.all(np.isneginf(s64))


def test_pair_pos_is_checked_by_the_wrapper():
    kwargs, want = _m_call()
    args = [kwargs[k] for k in ("S", "G", "pair_query")]
    rest = [kwargs[k] for k in ("s_x", "g_x", "u_score")]
    P, t = len(kwargs["pair_query"]), kwargs["S"].shape[1]
    good = np.random.default_rng(0).integers(-1, t, P)
    for g, w in zip(cpp.nudge_m_intervals(*args, good, *rest, 1e-8), want):
        np.testing.assert_array_equal(g, w)
    for bad in (np.full(P, -2), np.full(P, t), good[:-1]):
        with pytest.raises(ValueError, match="pair_pos"):
            cpp.nudge_m_intervals(*args, bad, *rest, 1e-8)
    with pytest.raises(TypeError, match="pair_pos"):
        cpp.nudge_m_intervals(*args, good.astype(np.float64), *rest, 1e-8)


def test_index_arrays_must_hold_integers():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((5, 3))
    with pytest.raises(TypeError, match="order"):
        cpp.query_gradient(queries, np.array([0.0, 1.7]), np.array([0, 2]))
    with pytest.raises(TypeError, match="seg_ptr"):
        cpp.query_gradient(queries, np.array([0, 1]), np.array([0.0, 2.0]))
    # An empty list is an empty index array whatever NumPy makes of it.
    np.testing.assert_array_equal(cpp.query_gradient(queries, [], [0]), np.zeros((0, 3)))


# ---------------------------------------------------------------------------------------------
# n_threads: None or an int in [1, MAX_THREADS], one clear line otherwise.


def _wrapper_calls():
    """Each cpp_backend op as f(n_threads) on a small good problem."""
    qg, _ = _query_gradient_call()
    tk, _ = _topk_call()
    m, _ = _m_call()
    n = _n_args()
    pj, _ = _project_call()
    mt = _metrics_args()
    nr, _ = _normalize_call()
    P = len(m["pair_query"])
    return {
        "query_gradient": lambda nt: cpp.query_gradient(qg["queries"], qg["order"], qg["seg_ptr"], n_threads=nt),
        "topk_update": lambda nt: cpp.topk_update(tk["queries"], tk["chunk"], 0, tk["exclude"], True,
                                                  tk["best_scores"], tk["best_index"], n_threads=nt),
        "nudge_m_intervals": lambda nt: cpp.nudge_m_intervals(m["S"], m["G"], m["pair_query"], np.full(P, -1),
                                                              m["s_x"], m["g_x"], m["u_score"], 0.0, n_threads=nt),
        "nudge_n_sweep": lambda nt: cpp.nudge_n_sweep(*n.values(), 5, n_threads=nt),
        "project": lambda nt: cpp.project(pj["E"], pj["C"], pj["alpha"], pj["beta"], n_threads=nt),
        "metrics": lambda nt: cpp.metrics(*mt.values(), 5, n_threads=nt),
        "normalize_rows": lambda nt: cpp.normalize_rows(nr["chunk"], nr["out"], n_threads=nt),
    }


@pytest.mark.parametrize("op", sorted(CALLS))
def test_n_threads_is_checked(op):
    call = _wrapper_calls()[op]
    for good in (None, 1, 2, np.int64(3), _cpu.MAX_THREADS // 1024):
        call(good)
    for bad in (0, -1, _cpu.MAX_THREADS + 1, 2**40, 2**70, -(2**70)):
        with pytest.raises(ValueError, match="n_threads") as info:
            call(bad)
        assert "\n" not in str(info.value) and "incompatible" not in str(info.value)
        assert str(bad) in str(info.value)
    for bad in (True, 2.5, "4", [2]):
        with pytest.raises(TypeError, match="n_threads") as info:
            call(bad)
        assert "\n" not in str(info.value)


def test_large_k_is_clamped_not_allocated():
    """k_val / k far past every candidate give the same result as the largest meaningful value
    (the kernels size their heaps/discount tables by it)."""
    n = _n_args()
    t, n_unt = n["S"].shape[1], n["unt_scores"].shape[1]
    want = ref.nudge_n_sweep(*n.values(), t + n_unt)
    np.testing.assert_array_equal(cpp.nudge_n_sweep(*n.values(), 2**62), want)
    np.testing.assert_array_equal(cpp.nudge_n_sweep(*n.values(), 2**63 - 1), want)
    mt = _metrics_args()
    longest = int(np.diff(mt["ans_ptr"]).max())
    with np.errstate(all="ignore"):
        want = ref.metrics(*mt.values(), max(8, longest))
    np.testing.assert_allclose(cpp.metrics(*mt.values(), 2**62), want, rtol=1e-12, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# normalize_rows


def _ulps(got, want):
    """|got - want| in units of want's float32 ulp (0 where both are equal)."""
    want = want.astype(np.float32)
    return np.abs(got.astype(np.float64) - want.astype(np.float64)) / np.spacing(np.abs(want)).astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", [(1, 1), (1, 385), (37, 3), (1237, 385), (3001, 384)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_normalize_rows_matches_reference(dtype, shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100.0, size=(shape[0], 1))).astype(dtype)
    before = x.copy()
    out = _poisoned(shape, np.float32)
    want = np.empty(shape, np.float32)
    assert ref.normalize_rows(x, want) == -1
    assert cpp.normalize_rows(x, out) == -1
    np.testing.assert_array_equal(x, before)
    assert not np.isnan(out).any(), "every element of out is written"
    assert _ulps(out, want).max() <= 1.0
    assert np.mean(out == want) > 0.999  # the reciprocal rarely changes the float32 rounding
    one = _poisoned(shape, np.float32)
    cpp.normalize_rows(x, one, n_threads=1)
    np.testing.assert_array_equal(one, out)  # rows are independent: no dependence on threads


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
def test_normalize_rows_reports_the_first_bad_row(dtype):
    # Large enough for the threaded, streaming path; bad rows in both threads' ranges.
    m, d = 4001, 385
    x = np.random.default_rng(9).standard_normal((m, d)).astype(dtype)
    x[3000, 7] = np.nan
    x[2999] = 0.0
    x[3500, 0] = np.inf
    for n_threads in (None, 1, 2, 3):
        out = _poisoned((m, d), np.float32)
        want = _poisoned((m, d), np.float32)
        assert cpp.normalize_rows(x, out, n_threads=n_threads) == 2999
        assert ref.normalize_rows(x, want) == 2999
        good = np.ones(m, bool)
        good[[2999, 3000, 3500]] = False
        ok = np.empty((good.sum(), d), np.float32)
        ref.normalize_rows(x[good], ok)
        assert _ulps(out[good], ok).max() <= 1.0  # every other row is still written
    y = x.copy()
    y[2999] = 1.0
    assert cpp.normalize_rows(y, _poisoned((m, d), np.float32)) == 3000
    y[3000] = 1.0
    assert cpp.normalize_rows(y, _poisoned((m, d), np.float32)) == 3500
    z = np.zeros((1, 5), dtype)
    assert cpp.normalize_rows(z, _poisoned((1, 5), np.float32)) == 0 == ref.normalize_rows(z, np.empty((1, 5), np.float32))


def test_normalize_rows_edge_shapes():
    assert cpp.normalize_rows(np.ones((0, 8), np.float32), np.empty((0, 8), np.float32)) == -1
    # d = 0: every row has norm zero, as in the reference.
    assert cpp.normalize_rows(np.ones((3, 0), np.float32), np.empty((3, 0), np.float32)) == 0
    assert ref.normalize_rows(np.ones((3, 0), np.float32), np.empty((3, 0), np.float32)) == 0
    # Extremes of float32 and float16: subnormal and near-max rows normalise without overflow.
    x = np.array([[1e-45, 0.0, 1e-45], [3e38, 3e38, -3e38]], np.float32)
    out = np.empty_like(x)
    assert cpp.normalize_rows(x, out) == -1
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1.0, rtol=1e-6)
    h = np.array([[6e-8, 6e-8], [65504, -65504]], np.float16)
    out = np.empty(h.shape, np.float32)
    assert cpp.normalize_rows(h, out) == -1
    np.testing.assert_allclose(out, np.full(h.shape, np.sqrt(0.5)) * np.sign(h.astype(np.float32)), rtol=1e-7)


def test_normalize_rows_out_layouts(tmp_path):
    m, d = 3001, 384  # 4.6 MB of output: the non-temporal path
    x = np.random.default_rng(3).standard_normal((m, d)).astype(np.float32)
    want = np.empty((m, d), np.float32)
    cpp.normalize_rows(x, want)
    # An out misaligned for vector stores (offset by one float).
    buf = np.empty(m * d + 1, np.float32)
    shifted = buf[1:].reshape(m, d)
    assert cpp.normalize_rows(x, shifted) == -1
    np.testing.assert_array_equal(shifted, want)
    # An np.memmap out.
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(m, d))
    assert cpp.normalize_rows(x[100:2100], mm[100:2100]) == -1
    mm.flush()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy")[100:2100], want[100:2100])
    # In place: out is chunk itself.
    y = x.copy()
    assert cpp.normalize_rows(y, y) == -1
    np.testing.assert_array_equal(y, want)
    # A float16 memmap chunk, read-only.
    np.save(tmp_path / "x16.npy", x.astype(np.float16))
    x16 = np.load(tmp_path / "x16.npy", mmap_mode="r")
    out = np.empty((m, d), np.float32)
    assert cpp.normalize_rows(x16, out) == -1
    ref16 = np.empty_like(out)
    ref.normalize_rows(x16, ref16)
    assert _ulps(out, ref16).max() <= 1.0


def test_normalize_rows_refuses_what_it_cannot_write():
    x = np.ones((6, 4), np.float32)
    with pytest.raises(TypeError, match="out"):
        _cpu.normalize_rows(x, np.empty((6, 4), np.float64))
    with pytest.raises(TypeError, match="out"):
        _cpu.normalize_rows(x, np.empty((4, 6), np.float32).T)
    ro = np.empty((6, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        _cpu.normalize_rows(x, ro)
    with pytest.raises(TypeError, match="chunk"):
        _cpu.normalize_rows(np.ones((6, 4)), np.empty((6, 4), np.float32))
    # out overlapping chunk other than exactly (float32, in place) is refused.
    buf = np.ones(6 * 4 + 4, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        _cpu.normalize_rows(buf[:24].reshape(6, 4), buf[4:].reshape(6, 4))
    # A float16 chunk and a float32 out starting at the same byte: out row r covers chunk rows
    # 2r and 2r + 1, so in place is only allowed for float32.
    halves = np.ones(2 * 24, np.float16)
    with pytest.raises(ValueError, match="overlaps"):
        _cpu.normalize_rows(halves[:24].reshape(6, 4), halves.view(np.float32).reshape(6, 4))
    # The wrapper converts other chunk dtypes and layouts (float64, strided) once.
    out = np.empty((6, 4), np.float32)
    assert cpp.normalize_rows(np.ones((4, 6)).T, out) == -1
    np.testing.assert_allclose(out, 0.5)


def test_signatures_match_the_reference():
    for op in CALLS:
        assert inspect.signature(getattr(cpp, op)) == inspect.signature(getattr(ref, op)), op
