"""``correct_rows`` on every backend against a float64 computation of the same formula, within
the contract's bound (numpy_backend's docstring): per element of y,
``(d_old + h + 16) * 2**-24 * S`` with ``S = |b0| + |xh| @ |W0| + (|b1| + |xh| @ |W1|) @ |W2|``,
carried through the normalisation ``out = y / |y|`` as ``(E_c + |out_c| |E|) / |y|`` plus 4
float32 ulps of a unit value. Awkward sizes (m = 0, 1, not a multiple of the row tile; d_old,
d_new and h odd, d_old != d_new; more than one k block), float16 and float32 rows, zero / NaN /
inf rows giving NaN rows, a memmap chunk, in place, NaN-poisoned outputs, inputs unchanged,
repeat runs and one thread bit-identical, the same error type as the reference for bad shapes,
and on the compiled backend every instruction-set level this machine runs (bit-identical: each
element is one FMA chain in k order on every level).
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import assert_same_error, assert_unchanged, backend_op, copies, poisoned, rng

DTYPES = [np.float16, np.float32]
_dtype_id = lambda t: np.dtype(t).name  # noqa: E731
#: (m, d_old, d_new, h); h = 0: the linear map. 203 rows cross the compiled row tile at d = 385,
#: 385 and 300 columns cross its k blocks (128).
SHAPES = [(0, 5, 3, 0), (1, 1, 1, 0), (1, 7, 5, 3), (37, 33, 17, 0), (203, 385, 129, 0), (211, 37, 41, 19),
          (150, 130, 97, 300), (64, 48, 48, 16)]


def _problem(m, d_old, d_new, h, dtype, seed=0):
    gen = rng("correct", m, d_old, d_new, h, seed)
    x = (gen.standard_normal((m, d_old)) * gen.uniform(0.01, 100.0, size=(m, 1))).astype(dtype)
    W0 = (gen.standard_normal((d_old, d_new)) / np.sqrt(d_old)).astype(np.float32)
    b0 = (0.1 * gen.standard_normal(d_new)).astype(np.float32)
    if not h:
        return x, W0, b0, None, None, None
    W1 = (gen.standard_normal((d_old, h)) / np.sqrt(d_old)).astype(np.float32)
    b1 = (0.1 * gen.standard_normal(h)).astype(np.float32)
    W2 = (gen.standard_normal((h, d_new)) / np.sqrt(h)).astype(np.float32)
    return x, W0, b0, W1, b1, W2


def _exact(x, W0, b0, W1, b1, W2):
    """(out, bound, bad) in float64: the formula, the contract's per-element bound on out, and
    the rows that must be NaN."""
    x = np.asarray(x, np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    bad = ~np.isfinite(norms) | (norms == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xh = np.where(bad[:, None], 0.0, x / norms[:, None])
    y = xh @ W0 + b0
    S = np.abs(b0) + np.abs(xh) @ np.abs(W0)
    h = 0
    if W1 is not None:
        h = W1.shape[1]
        pre = xh @ W1 + b1
        y += np.maximum(pre, 0) @ W2
        S += (np.abs(b1) + np.abs(xh) @ np.abs(W1)) @ np.abs(W2)
    E = (x.shape[1] + h + 16) * 2.0**-24 * S
    ny = np.linalg.norm(y, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = y / ny
        bound = (E + np.abs(out) * np.linalg.norm(E, axis=1, keepdims=True)) / ny + 4 * 2.0**-24
    return out, bound, bad


def _check(out, x, weights):
    want, bound, bad = _exact(x, *weights)
    assert np.isnan(out[bad]).all(), "a zero / NaN / inf row must give a NaN row"
    ok = ~bad
    assert not np.isnan(out[ok]).any(), "an output element was never written (or a valid row went NaN)"
    err = np.abs(out[ok] - want[ok])
    assert np.all(err <= bound[ok]), f"max error {err.max():.3g} over the bound (max ratio {(err / bound[ok]).max():.3g})"


def _run(op, x, weights, threads=None):
    out = poisoned((x.shape[0], weights[0].shape[1]), np.float32)
    assert op(x, *weights, out, n_threads=threads) is None
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-{}x{}-h{}".format(*s))
def test_matches_float64(backend, dtype, shape):
    op = backend_op(backend, "correct_rows")
    x, *weights = _problem(*shape, dtype)
    before = copies(x, *weights)
    outs = [_run(op, x, weights, threads) for threads in (None, None, 1)]
    assert_unchanged(before, [x, *weights])
    _check(outs[0], x, weights)
    for again in outs[1:]:
        np.testing.assert_array_equal(again, outs[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("h", [0, 23])
def test_bad_rows_give_nan_rows(backend, dtype, h):
    x, *weights = _problem(301, 37, 29, h, dtype, seed=1)
    x[0] = np.nan        # the first row
    x[5] = 0             # a zero row
    x[100, 3] = np.inf   # one inf value
    x[200, 7] = np.nan   # one NaN value
    x[300] = 0           # the last row
    _check(_run(backend_op(backend, "correct_rows"), x, weights), x, weights)


def test_only_bad_rows(backend):
    x, *weights = _problem(3, 9, 4, 5, np.float32, seed=2)
    x[:] = 0
    assert np.isnan(_run(backend_op(backend, "correct_rows"), x, weights)).all()


def test_memmap_chunk_and_in_place(backend, tmp_path):
    """A read-only float16 memmap slice is read in place; out may be x itself (float32,
    d_old == d_new)."""
    op = backend_op(backend, "correct_rows")
    x, *weights = _problem(500, 40, 40, 11, np.float16, seed=3)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")[100:400]
    got = _run(op, mapped, weights)
    _check(got, x[100:400], weights)
    np.testing.assert_array_equal(got, _run(op, np.array(x[100:400]), weights))
    x32 = x[100:400].astype(np.float32)
    want = _run(op, x32, weights)
    op(x32, *weights, x32)
    np.testing.assert_array_equal(x32, want)


@pytest.mark.parametrize("case", ["out-columns", "out-rows", "W0-rows", "b0", "W2-columns"])
def test_bad_shapes_raise_what_the_reference_raises(backend, case):
    x, W0, b0, W1, b1, W2 = _problem(6, 8, 5, 3, np.float32, seed=4)
    out_shape = {"out-columns": (6, 4), "out-rows": (5, 5)}.get(case, (6, 5))
    if case == "W0-rows":
        W0 = W0[:7]
    elif case == "b0":
        b0 = b0[:4]
    elif case == "W2-columns":
        W2 = W2[:, :4]
    assert_same_error(backend, lambda module: module.correct_rows(x, W0, b0, W1, b1, W2,
                                                                  np.empty(out_shape, np.float32)))


# ---------------------------------------------------------------------------------------------
# The compiled backend: every instruction-set level, the binding's own checks


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", [(203, 385, 129, 0), (211, 37, 41, 19), (97, 130, 97, 300), (9, 1, 3, 1)],
                         ids=lambda s: "m{}-{}x{}-h{}".format(*s))
def test_every_isa_level(dtype, shape):
    _cpu = pytest.importorskip("nudgefast._cpu", reason="the compiled CPU backend is not built")
    x, *weights = _problem(*shape, dtype, seed=5)
    x[shape[0] // 2] = 0
    before = _cpu.isa()
    outs = {}
    try:
        for level in _cpu.isa_levels():
            _cpu.set_isa(level)
            outs[level] = out = poisoned((shape[0], shape[2]), np.float32)
            _cpu.correct_rows(x, *weights, out, None)
    finally:
        _cpu.set_isa(before)
    first, *rest = outs
    _check(outs[first], x, weights)
    for level in rest:
        np.testing.assert_array_equal(outs[level], outs[first], err_msg=f"level {level} differs from {first}")


def test_binding_refuses_what_it_cannot_read():
    _cpu = pytest.importorskip("nudgefast._cpu", reason="the compiled CPU backend is not built")
    x, W0, b0, W1, b1, W2 = _problem(6, 8, 5, 3, np.float32, seed=6)
    out = np.empty((6, 5), np.float32)
    with pytest.raises(TypeError, match="x must be"):
        _cpu.correct_rows(x.astype(np.float64), W0, b0, W1, b1, W2, out, None)
    with pytest.raises(TypeError, match="W0 must be"):
        _cpu.correct_rows(x, W0.astype(np.float64), b0, W1, b1, W2, out, None)
    with pytest.raises(ValueError, match="together"):
        _cpu.correct_rows(x, W0, b0, W1, None, W2, out, None)
    buf = np.ones(100, np.float32)
    with pytest.raises(ValueError, match="overlaps"):  # out shares memory with x, but is not x
        _cpu.correct_rows(buf[:48].reshape(6, 8), W0, b0, None, None, None, buf[10:40].reshape(6, 5), None)
    for bad in (0, -1, _cpu.MAX_THREADS + 1):
        with pytest.raises(ValueError, match="n_threads"):
            _cpu.correct_rows(x, W0, b0, W1, b1, W2, out, bad)
