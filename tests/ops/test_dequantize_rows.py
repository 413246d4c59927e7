"""``dequantize_rows`` on every backend: the reference's float32 bits exactly (u * step + low,
two roundings), int8 and uint8 codes, awkward sizes, a read-only memmap slice, inputs unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from nudgefast._backends import numpy_backend as ref
from op_cases import assert_unchanged, backend_op, copies, poisoned


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("m,d", [(0, 5), (1, 1), (7, 37), (1237, 385)])
def test_matches_reference_bits(backend, dtype, m, d):
    op = backend_op(backend, "dequantize_rows")
    gen = np.random.default_rng(m * 1000 + d)
    info = np.iinfo(dtype)
    codes = gen.integers(info.min, info.max + 1, (m, d)).astype(dtype)
    if m:
        codes[0] = info.min
        codes[-1] = info.max
    low = gen.standard_normal(d).astype(np.float32)
    step = gen.uniform(1e-5, 1e-1, d).astype(np.float32)
    step[0] = 1.0  # a constant dimension's step
    want = np.empty((m, d), np.float32)
    ref.dequantize_rows(codes, dtype == np.int8, low, step, want)
    u = codes.astype(np.float64) + (128 if dtype == np.int8 else 0)
    np.testing.assert_array_equal(want, (u.astype(np.float32) * step + low))
    before = copies(codes, low, step)
    out = poisoned((m, d), np.float32)
    op(codes, dtype == np.int8, low, step, out)
    assert_unchanged(before, [codes, low, step])
    np.testing.assert_array_equal(out, want)


def test_memmap_slice(backend, tmp_path):
    op = backend_op(backend, "dequantize_rows")
    codes = np.random.default_rng(5).integers(-128, 128, (300, 48)).astype(np.int8)
    np.save(tmp_path / "c.npy", codes)
    mapped = np.load(tmp_path / "c.npy", mmap_mode="r")[100:250]
    low, step = np.zeros(48, np.float32), np.full(48, 0.5, np.float32)
    out = np.empty((150, 48), np.float32)
    op(mapped, True, low, step, out)
    np.testing.assert_array_equal(out, (codes[100:250].astype(np.float32) + 128) * 0.5)
