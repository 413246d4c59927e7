"""nudgefast.quantize against Sentence-Transformers' quantize_embeddings: the same codes, byte for
byte, on the real data and on random data of awkward sizes; streaming, save/load, bad inputs."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import nudgefast as nf
from nudgefast.quantize import PRECISIONS
from conftest import real_dataset_params

SCALAR = ("int8", "uint8")
#: Awkward shapes: d odd / not a multiple of 8 (binary packing pads the last byte), one
#: dimension, two rows (the fewest ST computes ranges from), a multiple of 8.
SHAPES = [(1237, 37), (2, 1), (5, 13), (300, 385), (64, 16)]
DTYPES = [np.float16, np.float32, np.float64]


def _st_module():
    """ST's quantization module (util.quantization since 5.x; quantization before), or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in ("sentence_transformers.util.quantization", "sentence_transformers.quantization"):
            try:
                module = __import__(name, fromlist=["quantize_embeddings"])
            except ImportError:
                continue
            if hasattr(module, "quantize_embeddings"):
                return module
    return None


@pytest.fixture(scope="module")
def st():
    module = _st_module()
    if module is None:
        pytest.skip("sentence-transformers is not installed (pip install '.[test]')")
    return module


def _random(n, d, dtype, seed=0):
    """Rows with a constant dimension, exact zeros and negative zeros (the x > 0 edge)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 3, d)
    x[:, d // 2] = 0.25  # constant: ST's step 0 -> 1 rule
    x[rng.random((n, d)) < 0.05] = 0.0
    x[rng.random((n, d)) < 0.05] = -0.0
    return x.astype(dtype)


def _ranges_for(x, seed=1):
    """ST-style (2, d) float64 ranges narrower than the data (codes clip at both ends), with
    one constant dimension."""
    rng = np.random.default_rng(seed)
    lo = x.min(axis=0).astype(np.float64) * rng.uniform(0.3, 0.9, x.shape[1])
    hi = x.max(axis=0).astype(np.float64) * rng.uniform(0.3, 0.9, x.shape[1])
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    hi[0] = lo[0]
    return np.vstack((lo, hi))


def _parity(st, x, precision, **kw):
    """Our codes and ST's for the same arguments (ST's calibration_embeddings is ours'
    calibration); they must be identical arrays of the same dtype."""
    ours = nf.quantize(x, precision, **kw)
    st_kw = {"ranges": kw.get("ranges"), "calibration_embeddings": kw.get("calibration")}
    theirs = st.quantize_embeddings(np.asarray(x), precision, **st_kw)
    assert ours.codes.dtype == theirs.dtype, (ours.codes.dtype, theirs.dtype)
    assert ours.codes.shape == theirs.shape
    np.testing.assert_array_equal(ours.codes, theirs)
    assert ours.d == x.shape[1] and ours.precision == precision
    return ours, theirs


# --------------------------------------------------------------------------------------------
# Parity with Sentence-Transformers

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_ranges_from_x(st, precision, shape, dtype):
    _parity(st, _random(*shape, dtype), precision)


@pytest.mark.parametrize("cal_dtype", DTYPES, ids=lambda t: "cal-" + np.dtype(t).name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES + [(1, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("precision", SCALAR)
def test_parity_calibration(st, precision, shape, dtype, cal_dtype):
    x = _random(*shape, dtype)
    cal = (_random(50, shape[1], np.float64, seed=5) * 0.5).astype(cal_dtype)  # x clips
    ours, _ = _parity(st, x, precision, calibration=cal)
    np.testing.assert_array_equal(ours.ranges.to_array(), np.vstack(
        (cal.min(axis=0), cal.max(axis=0))).astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("shape", SHAPES + [(1, 13)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("precision", SCALAR)
def test_parity_explicit_ranges(st, precision, shape, dtype):
    x = _random(*shape, dtype)
    ranges = _ranges_for(_random(max(shape[0], 2), shape[1], dtype))
    ours, theirs = _parity(st, x, precision, ranges=ranges)
    # A QuantizationRanges gives the same codes as ST's array it came from.
    again = nf.quantize(x, precision, ranges=nf.QuantizationRanges.from_array(ranges))
    np.testing.assert_array_equal(again.codes, theirs)


@pytest.mark.parametrize("precision", SCALAR)
def test_dequantize_parity(st, precision):
    dequantize = getattr(st, "_dequantize_embeddings", None)
    if dequantize is None:
        pytest.skip("this sentence-transformers has no _dequantize_embeddings")
    x = _random(301, 37, np.float32)
    ranges = _ranges_for(x)
    q = nf.quantize(x, precision, ranges=ranges)
    theirs = dequantize(q.codes, precision, ranges)
    np.testing.assert_array_equal(q.dequantize(dtype=np.float64), theirs)
    np.testing.assert_array_equal(q.dequantize(), theirs.astype(np.float32))
    rows = np.array([300, 0, 7, 7])
    np.testing.assert_array_equal(q.dequantize(rows, dtype=np.float64), theirs[rows])
    # What top-k kernels over the codes will compute: q . x = (q * step) . u + q . min.
    u = q.codes.astype(np.float64) + (128 if precision == "int8" else 0)
    np.testing.assert_allclose(u * q.ranges.step + q.ranges.min, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", real_dataset_params())
@pytest.mark.parametrize("precision", PRECISIONS)
def test_parity_real(st, path, precision):
    """The shared datasets are float16 (ST computes in float32 for them, as we do)."""
    corpus = np.load(path / "corpus.npy", mmap_mode="r")
    queries = np.load(path / "queries_train.npy")
    assert corpus.dtype == np.float16
    _parity(st, corpus, precision)
    if precision in SCALAR:
        _parity(st, corpus, precision, calibration=queries)
        _parity(st, corpus, precision, ranges=_ranges_for(queries))
        # Chunks of an odd size give the same codes.
        small = nf.quantize(corpus, precision, calibration=queries, chunk_rows=4099)
        np.testing.assert_array_equal(small.codes, nf.quantize(corpus, precision,
                                                               calibration=queries).codes)


# --------------------------------------------------------------------------------------------
# Streaming, determinism, caller arrays

@pytest.mark.parametrize("precision", PRECISIONS)
def test_chunked_memmap_equals_one_shot(tmp_path, precision):
    x = _random(1237, 37, np.float16)
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    cal = _random(97, 37, np.float32, seed=3)
    kw = {"calibration": cal} if precision in SCALAR else {}
    whole = nf.quantize(x, precision, **kw)
    width = whole.codes.shape[1]
    for chunk_rows in (1, 7, 1236, 5000):
        out = np.lib.format.open_memmap(tmp_path / f"codes{chunk_rows}.npy", mode="w+",
                                        dtype=whole.codes.dtype, shape=(1237, width))
        out[:] = 0x5A  # a stale value an unwritten row would keep
        q = nf.quantize(xm, precision, out=out, chunk_rows=chunk_rows, **kw)
        assert q.codes is out
        np.testing.assert_array_equal(out, whole.codes)
        if precision in SCALAR:  # ranges from calibration in chunks too
            r = nf.QuantizationRanges.from_calibration(cal, chunk_rows=chunk_rows)
            assert r == whole.ranges
    if precision in SCALAR:  # ranges from x itself, read in chunks
        np.testing.assert_array_equal(nf.quantize(xm, precision, chunk_rows=3).codes,
                                      nf.quantize(x, precision).codes)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_repeatable_and_inputs_unchanged(precision):
    x = _random(200, 21, np.float32)
    cal = _random(40, 21, np.float64, seed=9)
    ranges = _ranges_for(x)
    copies = [a.copy() for a in (x, cal, ranges)]
    kws = [{}] + ([{"calibration": cal}, {"ranges": ranges}] if precision in SCALAR else [])
    for kw in kws:
        a, b = nf.quantize(x, precision, **kw), nf.quantize(x, precision, **kw)
        np.testing.assert_array_equal(a.codes, b.codes)
    for before, after in zip(copies, (x, cal, ranges)):
        np.testing.assert_array_equal(before, after)


def test_binary_layout():
    """Documented layout: byte j holds dimensions 8j..8j+7, dimension 8j in the top bit, pad
    bits 0; binary is the same bytes with the top bit flipped, as int8."""
    x = np.full((1, 11), -1.0, np.float32)
    x[0, [0, 9]] = 1.0
    u = nf.quantize(x, "ubinary").codes
    b = nf.quantize(x, "binary").codes
    assert u.tolist() == [[0b10000000, 0b01000000]]
    assert b.tolist() == [[0, 0b01000000 - 128]]
    assert nf.quantize(np.zeros((1, 3), np.float32), "binary").codes.tolist() == [[-128]]


def test_torch_tensor_input():
    torch = pytest.importorskip("torch")
    x = _random(50, 9, np.float32)
    np.testing.assert_array_equal(nf.quantize(torch.from_numpy(x), "int8").codes,
                                  nf.quantize(x, "int8").codes)


# --------------------------------------------------------------------------------------------
# Save / load

@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_save_load_round_trip(tmp_path, precision, mmap_mode):
    x = _random(333, 19, np.float32)
    q = nf.quantize(x, precision)
    path = tmp_path / "codes.npz"
    (tmp_path / "codes.npz").write_bytes(b"an older file")  # replaced atomically
    q.save(path)
    assert sorted(os.listdir(tmp_path)) == ["codes.npz"]  # no temporary left behind
    back = nf.QuantizedCorpus.load(path, mmap_mode=mmap_mode)
    assert (back.precision, back.d) == (precision, 19)
    assert back.codes.dtype == q.codes.dtype
    np.testing.assert_array_equal(back.codes, q.codes)
    if mmap_mode:
        assert isinstance(back.codes, np.memmap)
    if precision in SCALAR:
        assert back.ranges == q.ranges
        np.testing.assert_array_equal(back.dequantize(), q.dequantize())
        assert nf.QuantizationRanges.load(path) == q.ranges  # the ranges alone, from it
    else:
        assert back.ranges is None


def test_ranges_save_load_and_codes_from_elsewhere(st, tmp_path):
    """A corpus quantized with ST (codes + its ranges array) is wrapped, saved and read back;
    quantizing new rows with the loaded ranges gives ST's codes for them."""
    x = _random(400, 29, np.float32)
    cal = _random(120, 29, np.float32, seed=4)
    ranges = np.vstack((cal.min(axis=0), cal.max(axis=0)))
    codes = st.quantize_embeddings(x, "int8", ranges=ranges)
    q = nf.QuantizedCorpus(codes, "int8", ranges=ranges)
    assert q.codes is codes and q.d == 29
    q.save(tmp_path / "elsewhere.npz")
    nf.QuantizationRanges.from_array(ranges).save(tmp_path / "ranges.npz")
    loaded = nf.QuantizationRanges.load(tmp_path / "ranges.npz")
    np.testing.assert_array_equal(loaded.to_array(), ranges)
    new = _random(10, 29, np.float32, seed=8)
    np.testing.assert_array_equal(nf.quantize(new, "int8", ranges=loaded).codes,
                                  st.quantize_embeddings(new, "int8", ranges=ranges))
    back = nf.QuantizedCorpus.load(tmp_path / "elsewhere.npz")
    np.testing.assert_array_equal(back.codes, codes)


def test_ranges_read_only():
    r = nf.QuantizationRanges([0.0, 1.0], [1.0, 1.0])
    np.testing.assert_array_equal(r.step, np.array([1 / 255, 1], np.float32))  # step 0 -> 1
    assert r.step.dtype == np.float32
    with pytest.raises(ValueError):
        r.min[0] = 5
    with pytest.raises(AttributeError):
        r.min = np.zeros(2)


# --------------------------------------------------------------------------------------------
# Bad inputs: each names the argument

X = _random(20, 10, np.float32)


def _nan_row(value, row=3):
    x = X.copy()
    x[row, 4] = value
    return x


BAD_QUANTIZE = [
    ("unknown-precision", dict(precision="int4"), ValueError, r"precision: 'int4'"),
    ("float32-precision", dict(precision="float32"), ValueError, r"precision: .*keep float32"),
    ("x-1d", dict(x=X[0]), ValueError, r"x: expected a 2-D"),
    ("x-int8", dict(x=X.astype(np.int8)), TypeError, r"x: dtype int8"),
    ("x-empty-rows", dict(x=X[:0]), ValueError, r"x: is empty"),
    ("x-empty-d", dict(x=X[:, :0]), ValueError, r"x: is empty"),
    ("x-nan", dict(x=_nan_row(np.nan)), ValueError, r"x: row 3 contains NaN or inf"),
    ("x-inf", dict(x=_nan_row(np.inf, 17), calibration=X), ValueError, r"x: row 17 contains"),
    ("x-nan-binary", dict(x=_nan_row(np.nan, 19), precision="binary"), ValueError,
     r"x: row 19 contains"),
    ("one-row-no-ranges", dict(x=X[:1]), ValueError, r"ranges: cannot compute int8 ranges"),
    ("ranges-wrong-d", dict(ranges=np.vstack((X.min(0), X.max(0)))[:, :9]), ValueError,
     r"ranges: has d=9 but x has d=10"),
    ("ranges-wrong-shape", dict(ranges=np.zeros((3, 10))), ValueError, r"ranges: expected .* \(2, d\)"),
    ("ranges-max-below-min", dict(ranges=np.vstack((X.max(0), X.min(0)))), ValueError,
     r"ranges: max < min in dimension 0"),
    ("ranges-nan", dict(ranges=np.vstack((np.full(10, np.nan), X.max(0)))), ValueError,
     r"ranges: min of dimension 0 is NaN"),
    ("ranges-overflow-f32", dict(ranges=np.vstack((X.min(0), np.full(10, 1e300)))), ValueError,
     r"ranges: max of dimension 0 is NaN or inf in float32"),
    ("ranges-binary", dict(precision="binary", ranges=np.vstack((X.min(0), X.max(0)))),
     ValueError, r"ranges: binary quantization .* takes no ranges"),
    ("calibration-binary", dict(precision="ubinary", calibration=X), ValueError,
     r"calibration: ubinary quantization"),
    ("ranges-and-calibration", dict(ranges=np.vstack((X.min(0), X.max(0))), calibration=X),
     ValueError, r"calibration: give ranges or calibration"),
    ("calibration-wrong-d", dict(calibration=X[:, :7]), ValueError,
     r"calibration: has d=7 but x has d=10"),
    ("calibration-nan", dict(calibration=_nan_row(np.nan, 11)), ValueError,
     r"calibration: row 11 contains NaN or inf"),
    ("calibration-empty", dict(calibration=X[:0]), ValueError, r"calibration: is empty"),
    ("calibration-int", dict(calibration=X.astype(np.int32)), TypeError, r"calibration: dtype"),
    ("out-wrong-shape", dict(out=np.zeros((20, 9), np.int8)), ValueError, r"out: expected"),
    ("out-wrong-dtype", dict(out=np.zeros((20, 10), np.uint8)), ValueError, r"out: expected"),
    ("out-binary-width", dict(precision="binary", out=np.zeros((20, 10), np.int8)), ValueError,
     r"out: .*\(20, 2\)"),
    ("chunk-rows-zero", dict(chunk_rows=0), ValueError, r"chunk_rows: must be"),
]


@pytest.mark.parametrize("case", BAD_QUANTIZE, ids=[c[0] for c in BAD_QUANTIZE])
def test_bad_quantize_inputs(case):
    _, kw, exc, match = case
    args = {"x": X, "precision": "int8", **kw}
    with pytest.raises(exc, match=match):
        nf.quantize(**args)


def test_bad_out_read_only():
    out = np.zeros((20, 10), np.int8)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out: expected a writable"):
        nf.quantize(X, "int8", out=out)


def test_bad_quantized_corpus():
    codes = nf.quantize(X, "int8").codes
    ranges = nf.quantize(X, "int8").ranges
    with pytest.raises(ValueError, match="codes: int8 codes are a 2-D int8"):
        nf.QuantizedCorpus(codes.view(np.uint8), "int8", ranges=ranges)
    with pytest.raises(ValueError, match="ranges: int8 codes need the ranges"):
        nf.QuantizedCorpus(codes, "int8")
    with pytest.raises(ValueError, match="ranges: has d=10 but the codes have d=9"):
        nf.QuantizedCorpus(codes[:, :9], "int8", ranges=ranges)
    bits = nf.quantize(X, "ubinary").codes
    with pytest.raises(ValueError, match="d: give the embedding dimension"):
        nf.QuantizedCorpus(bits, "ubinary")
    with pytest.raises(ValueError, match="codes: ubinary codes of d=17 have 3 columns"):
        nf.QuantizedCorpus(bits, "ubinary", d=17)
    with pytest.raises(ValueError, match="ranges: ubinary codes have no ranges"):
        nf.QuantizedCorpus(bits, "ubinary", d=10, ranges=ranges)
    with pytest.raises(ValueError, match="precision: ubinary codes keep only signs"):
        nf.QuantizedCorpus(bits, "ubinary", d=10).dequantize()
    q = nf.QuantizedCorpus(codes, "int8", ranges=ranges)
    with pytest.raises(TypeError, match="dtype: must be float32 or float64"):
        q.dequantize(dtype=np.float16)
    with pytest.raises(IndexError, match=r"rows: indices must be in \[0, 20\)"):
        q.dequantize([0, 20])
    with pytest.raises(ValueError, match="rows: expected 1-D integer"):
        q.dequantize([0.5])
    with pytest.raises(ValueError, match="out: expected a writable float32 array of shape"):
        q.dequantize(out=np.zeros((20, 10), np.float64))


def test_bad_files(tmp_path):
    q = nf.quantize(X, "uint8")
    with pytest.raises(ValueError, match="does not exist"):
        nf.QuantizedCorpus.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable quantized corpus file"):
        nf.QuantizedCorpus.load(tmp_path / "junk.npz")
    np.save(tmp_path / "plain.npy", X)
    with pytest.raises(ValueError, match="not a readable quantized corpus"):
        nf.QuantizedCorpus.load(tmp_path / "plain.npy")
    np.savez(tmp_path / "other.npz", codes=q.codes)
    with pytest.raises(ValueError, match="not a nudgefast quantized corpus"):
        nf.QuantizedCorpus.load(tmp_path / "other.npz")
    q.save(tmp_path / "q.npz")
    with np.load(tmp_path / "q.npz") as z:
        members = {k: z[k] for k in z.files}
    np.savez(tmp_path / "newer.npz", **{**members, "version": np.array(99)})
    with pytest.raises(ValueError, match="newer nudgefast .*upgrade nudgefast"):
        nf.QuantizedCorpus.load(tmp_path / "newer.npz")
    np.savez(tmp_path / "damaged.npz", **{k: v for k, v in members.items() if k != "ranges_max"})
    with pytest.raises(ValueError, match="damaged quantized corpus file"):
        nf.QuantizedCorpus.load(tmp_path / "damaged.npz")
    with pytest.raises(ValueError, match="mmap_mode"):
        nf.QuantizedCorpus.load(tmp_path / "q.npz", mmap_mode="w")
    nf.quantize(X, "binary").save(tmp_path / "bits.npz")
    with pytest.raises(ValueError, match="binary codes, which have no ranges"):
        nf.QuantizationRanges.load(tmp_path / "bits.npz")
    with pytest.raises(ValueError, match="not a nudgefast quantization ranges"):
        nf.QuantizationRanges.load(tmp_path / "other.npz")
