"""``normalize_rows`` on every backend against the float64 reference: float16 and float32 rows of
odd widths (d = 1, 3, 37, 385), no / one / many rows (3001 rows at d = 385 cross the reference's
8 MiB blocks), norms from 0.01 to 100, rows whose float32 sums of squares underflow or overflow
(the contract accumulates in float64), float16 subnormals, a memmap output, and the first zero /
NaN / inf row reported. Every output starts NaN-poisoned: a row left unwritten shows. The
contract allows one float32 ulp (a backend may multiply by the float64 reciprocal).
"""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import assert_same_error, assert_unchanged, backend_op, copies, poisoned, rng

DTYPES = [np.float16, np.float32]
MAX_ULP = 1  # the contract's bound
_dtype_id = lambda t: np.dtype(t).name  # noqa: E731


def _rows(m, d, dtype, seed=0):
    gen = rng("rows", m, d, seed)
    return (gen.standard_normal((m, d)) * gen.uniform(0.01, 100.0, size=(m, 1))).astype(dtype)


def _reference(chunk):
    want = poisoned(chunk.shape, np.float32)
    assert ref.normalize_rows(chunk, want) == -1
    return want


def _check_valid(backend, chunk):
    """All rows valid: -1, every element written, within MAX_ULP of the reference, the chunk
    unchanged, bit-identical on a repeat run and on one thread."""
    normalize_rows = backend_op(backend, "normalize_rows")
    before = copies(chunk)
    outs = []
    for threads in (None, None, 1):
        out = poisoned(chunk.shape, np.float32)
        assert normalize_rows(chunk, out, n_threads=threads) == -1
        outs.append(out)
    assert_unchanged(before, [chunk])
    assert not np.isnan(outs[0]).any(), "an output element was never written"
    np.testing.assert_array_max_ulp(outs[0], _reference(chunk), maxulp=MAX_ULP)
    for again in outs[1:]:
        np.testing.assert_array_equal(again, outs[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("m,d", [(0, 37), (1, 1), (5, 3), (1237, 37), (3001, 385)],
                         ids=lambda v: str(v))
def test_matches_reference(backend, dtype, m, d):
    _check_valid(backend, _rows(m, d, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_tiny_and_huge_rows_are_valid(backend, dtype):
    x = _rows(200, 37, np.float64, seed=1)
    if dtype == np.float32:
        x[10] *= 1e-32  # float32 sums of squares underflow to 0, float64 ones do not
        x[20] *= 1e18   # float32 sums of squares overflow to inf, float64 ones do not
    else:
        x[10] = 0.0
        x[10, 3] = 6e-8   # a float16 subnormal, the only nonzero element
        x[20] = 6e4 * np.sign(x[20])  # near float16's largest finite value
    _check_valid(backend, x.astype(dtype))


BAD_ROWS = {  # name: {row: what it holds}; the first bad row (the smallest) is reported
    "zero": {700: "zero"},
    "nan": {700: "nan"},
    "inf": {700: "inf"},
    "first-row": {0: "nan"},
    "last-row": {1236: "zero"},
    "zero-before-nan": {700: "zero", 900: "nan"},
    "nan-before-zero": {700: "nan", 900: "zero"},
    "only-row": {0: "zero"},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_first_bad_row(backend, dtype, case):
    x = _rows(1 if case == "only-row" else 1237, 37, dtype, seed=2)
    for row, what in BAD_ROWS[case].items():
        if what == "zero":
            x[row] = 0
        else:
            x[row, 5] = np.nan if what == "nan" else np.inf
    before = copies(x)
    out = poisoned(x.shape, np.float32)
    assert backend_op(backend, "normalize_rows")(x, out) == min(BAD_ROWS[case])
    assert_unchanged(before, [x])


def test_memmap_output_rows(backend, tmp_path):
    """Into rows 100:1100 of a float32 .npy memmap: the rows an ndarray output gets, and
    nothing written outside them."""
    x = _rows(1000, 37, np.float16, seed=3)
    want = poisoned(x.shape, np.float32)
    normalize_rows = backend_op(backend, "normalize_rows")
    assert normalize_rows(x, want) == -1
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=(1237, 37))
    mm[...] = np.nan
    assert normalize_rows(x, mm[100:1100]) == -1
    mm.flush()
    np.testing.assert_array_equal(mm[100:1100], want)
    assert np.isnan(mm[:100]).all() and np.isnan(mm[1100:]).all()


@pytest.mark.parametrize("shape", [(4, 6), (3, 5)], ids=["d-differs", "fewer-rows"])
def test_bad_output_raises_what_the_reference_raises(backend, shape):
    chunk = _rows(4, 5, np.float32, seed=4)
    assert_same_error(backend, lambda module: module.normalize_rows(chunk, np.empty(shape, np.float32)))


def test_signature(backend):
    backend_op(backend, "normalize_rows")
