"""Bad input to nudgefast.quantize, QuantizedCorpus and QuantizationRanges, from a probe of the
new API: every case gets an error naming the argument and the fix, or a documented result, and
nothing the caller owns is modified (inputs, out= memmaps, an existing file at a save's path)."""
from __future__ import annotations

import copy
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import nudgefast as nf
import sys
from nudgefast.quantize import QuantizationRanges, QuantizedCorpus

# nudgefast.quantize (the attribute) is the function; the module is only in sys.modules
qmod = sys.modules["nudgefast.quantize"]

RNG = np.random.default_rng(0)
X = RNG.standard_normal((50, 13)).astype(np.float32)
RANGES = np.vstack((X.min(0), X.max(0))).astype(np.float32)


# ---------------------------------------------------------------- x

@pytest.mark.parametrize("bad, exc, word", [
    (X[0], ValueError, "2-D"),
    (X[None], ValueError, "2-D"),
    (np.empty((0, 13), np.float32), ValueError, "empty"),
    (np.empty((5, 0), np.float32), ValueError, "empty"),
    (X.astype(np.int32), TypeError, "dtype"),
    (X > 0, TypeError, "dtype"),
    (X.astype(object), TypeError, "dtype"),
    (X.astype(np.complex64), TypeError, "dtype"),
    (X.astype(np.longdouble), TypeError, "dtype"),
])
@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_x_bad_shape_dtype_named(bad, exc, word, precision):
    with pytest.raises(exc, match=rf"^x: .*{word}"):
        nf.quantize(bad, precision, ranges=RANGES if precision == "int8" else None)


def test_x_python_list_accepted_and_int_list_names_x():
    ref = nf.quantize(X.astype(np.float64), "int8", RANGES).codes  # a list is float64
    assert np.array_equal(nf.quantize(X.tolist(), "int8", RANGES).codes, ref)
    with pytest.raises(TypeError, match="^x: "):
        nf.quantize([[1, 2], [3, 4]], "int8")


def test_x_readonly_memmap_fortran_noncontiguous(tmp_path):
    ref = nf.quantize(X, "uint8", RANGES, chunk_rows=7).codes
    p = tmp_path / "x.npy"
    np.save(p, X)
    mm = np.load(p, mmap_mode="r")
    assert np.array_equal(nf.quantize(mm, "uint8", RANGES, chunk_rows=7).codes, ref)
    assert np.array_equal(nf.quantize(np.asfortranarray(X), "uint8", RANGES, chunk_rows=7).codes, ref)
    wide = np.zeros((50, 26), np.float32)
    wide[:, ::2] = X
    assert np.array_equal(nf.quantize(wide[:, ::2], "uint8", RANGES, chunk_rows=7).codes, ref)
    big = X.astype(">f4")
    assert np.array_equal(nf.quantize(big, "uint8", RANGES).codes, ref)


def test_x_torch_grad_and_bfloat16():
    t = torch.tensor(X, requires_grad=True)
    assert np.array_equal(nf.quantize(t, "int8", RANGES).codes, nf.quantize(X, "int8", RANGES).codes)
    tb = torch.tensor(X).bfloat16()
    ref = nf.quantize(tb.float().numpy(), "binary").codes
    assert np.array_equal(nf.quantize(tb, "binary").codes, ref)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("precision, ranges", [("int8", None), ("int8", RANGES), ("binary", None)])
def test_x_nonfinite_row_named_in_later_chunk(value, precision, ranges):
    x = X.copy()
    x[37, 4] = value
    with pytest.raises(ValueError, match=r"^x: row 37 contains NaN or inf"):
        nf.quantize(x, precision, ranges, chunk_rows=5)


def test_x_float64_overflowing_float32_self_ranges_named():
    x = X.astype(np.float64)
    x[3, 2] = 1e300
    with pytest.raises(ValueError, match=r"^x: max of dimension 2 .*inf in float32"):
        nf.quantize(x, "int8")
    # with given ranges it clips, as ST does
    codes = nf.quantize(x, "uint8", RANGES).codes
    assert codes[3, 2] == 255


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("p", ["INT8", None, "float32", "int4", "Binary"])
def test_precision_bad_named(p):
    with pytest.raises(ValueError, match=r"^precision: "):
        nf.quantize(X, p, RANGES)


def test_precision_wrong_case_hints_lowercase():
    """'INT8' is refused, but the message should say the names are lowercase ('int8')."""
    with pytest.raises(ValueError, match=r"lower"):
        nf.quantize(X, "INT8", RANGES)


# ---------------------------------------------------------------- ranges / calibration

@pytest.mark.parametrize("bad, word", [
    (RANGES[:, :5], "d=5"),
    (RANGES.T, r"\(2, d\)"),
    (RANGES[::-1], "max < min"),
    (np.where(np.eye(2, 13, dtype=bool), np.nan, RANGES), "NaN"),
    (QuantizationRanges.from_array(RANGES[:, :4]), "d=4"),
])
def test_ranges_bad_named(bad, word):
    with pytest.raises(ValueError, match=rf"^ranges: .*{word}"):
        nf.quantize(X, "int8", bad)


def test_ranges_with_binary_refused():
    with pytest.raises(ValueError, match=r"^ranges: "):
        nf.quantize(X, "binary", RANGES)
    with pytest.raises(ValueError, match=r"^calibration: "):
        nf.quantize(X, "ubinary", calibration=X)


@pytest.mark.parametrize("bad, exc, word", [
    (X[:, :5], ValueError, "d=5"),
    (np.empty((0, 13), np.float32), ValueError, "empty"),
    (np.where(np.arange(13) == 3, np.nan, X), ValueError, "row 0 contains NaN"),
])
def test_calibration_bad_named(bad, exc, word):
    with pytest.raises(exc, match=rf"^calibration: .*{word}"):
        nf.quantize(X, "int8", calibration=bad)


def test_calibration_one_row_allowed_as_st():
    c = nf.quantize(X, "uint8", calibration=X[:1])
    assert np.array_equal(c.ranges.min, X[0]) and np.array_equal(c.ranges.max, X[0])


def test_ranges_deepcopy_and_pickle():
    """A read-only QuantizationRanges should survive copy.deepcopy / pickle (multiprocessing)."""
    r = QuantizationRanges.from_array(RANGES)
    assert copy.deepcopy(r) == r
    assert pickle.loads(pickle.dumps(r)) == r


# ---------------------------------------------------------------- out=

@pytest.mark.parametrize("make", [
    lambda: np.empty((50, 13), np.uint8),
    lambda: np.empty((50, 12), np.int8),
    lambda: np.empty((49, 13), np.int8),
    lambda: np.empty((50, 13), np.float32),
])
def test_out_wrong_dtype_shape_named(make):
    with pytest.raises(ValueError, match=r"^out: "):
        nf.quantize(X, "int8", RANGES, out=make())


def test_out_readonly_and_memmap_r_refused(tmp_path):
    o = np.empty((50, 13), np.int8)
    o.flags.writeable = False
    with pytest.raises(ValueError, match=r"^out: .*writable"):
        nf.quantize(X, "int8", RANGES, out=o)
    p = tmp_path / "o.npy"
    np.save(p, np.zeros((50, 13), np.int8))
    mm = np.load(p, mmap_mode="r")
    with pytest.raises(ValueError, match=r"^out: .*writable"):
        nf.quantize(X, "int8", RANGES, out=mm)
    assert not np.load(p).any()


def test_out_noncontiguous_works():
    o = np.zeros((50, 26), np.int8)[:, ::2]
    c = nf.quantize(X, "int8", RANGES, out=o, chunk_rows=7)
    assert c.codes is o
    assert np.array_equal(o, nf.quantize(X, "int8", RANGES).codes)


def test_out_the_same_buffer_as_x_refused():
    """out aliasing x's memory: the caller's x would be overwritten; should be refused."""
    x = X.copy()
    out = x.view(np.int8)[:, :13]
    with pytest.raises(ValueError, match=r"^out: .*(overlap|share|same)"):
        nf.quantize(x, "int8", RANGES, out=out)


def test_out_overlapping_x_shifted_gives_wrong_codes_silently():
    """out's row i on x's row i+1: writing chunk k corrupts chunk k+1 before it is read."""
    buf = X.copy()
    buf = np.vstack((buf, buf[:1]))
    x = buf[:-1]
    out = buf.view(np.int8)[1:, :13]
    want = nf.quantize(X, "int8", RANGES).codes
    try:
        got = nf.quantize(x, "int8", RANGES, out=out, chunk_rows=5).codes.copy()
    except ValueError:
        return  # refusing overlap is the fix
    assert np.array_equal(got, want), "silently wrong codes from an out= that overlaps x"


def test_a_nan_in_a_later_chunk_names_its_row_and_out_is_documented_unspecified(tmp_path):
    """A NaN row found in a later chunk is named; the rows before it may already be in out=
    (a pre-pass for NaN would read a 10^8-row memmap twice): the docstring says what out=
    holds after an error is unspecified, as NudgeResult.apply does."""
    p = tmp_path / "codes.npy"
    np.save(p, np.full((50, 13), 7, np.int8))
    out = np.load(p, mmap_mode="r+")
    x = X.copy()
    x[45, 0] = np.nan
    with pytest.raises(ValueError, match="row 45"):
        nf.quantize(x, "int8", RANGES, out=out, chunk_rows=5)
    assert "unspecified" in nf.quantize.__doc__


def test_out_checked_before_the_ranges_pass_over_x(monkeypatch):
    """A bad out= should be refused before a full calibration pass over a huge x."""
    calls = []
    orig = QuantizationRanges.from_calibration.__func__

    def spy(cls, *a, **k):
        calls.append(1)
        return orig(cls, *a, **k)
    monkeypatch.setattr(QuantizationRanges, "from_calibration", classmethod(spy))
    with pytest.raises(ValueError, match="^out: "):
        nf.quantize(X, "int8", out=np.empty((1, 1), np.int8))
    assert not calls, "x was read in full before out= was checked"


# ---------------------------------------------------------------- chunk_rows

@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (True, TypeError),
                                      (2.0, TypeError), ("8", TypeError)])
def test_chunk_rows_bad_named(bad, exc):
    with pytest.raises(exc, match=r"^chunk_rows: "):
        nf.quantize(X, "int8", RANGES, chunk_rows=bad)


def test_chunk_rows_huge_and_numpy_int():
    ref = nf.quantize(X, "int8", RANGES).codes
    assert np.array_equal(nf.quantize(X, "int8", RANGES, chunk_rows=1 << 60).codes, ref)
    assert np.array_equal(nf.quantize(X, "int8", RANGES, chunk_rows=np.int64(3)).codes, ref)


# ---------------------------------------------------------------- QuantizedCorpus

def test_corpus_codes_wrong_dtype_named():
    codes = nf.quantize(X, "int8", RANGES).codes
    with pytest.raises(ValueError, match=r"^codes: "):
        QuantizedCorpus(codes.view(np.uint8), "int8", ranges=RANGES)
    with pytest.raises(ValueError, match=r"^codes: "):
        QuantizedCorpus(codes.astype(np.int16), "int8", ranges=RANGES)


@pytest.mark.parametrize("d", [8, 17, 100])
def test_corpus_binary_d_not_matching_width(d):
    codes = nf.quantize(X, "binary").codes  # width 2
    with pytest.raises(ValueError, match=r"^codes: .*pass the d"):
        QuantizedCorpus(codes, "binary", d)


def test_corpus_binary_needs_d_and_bad_d_types():
    codes = nf.quantize(X, "ubinary").codes
    with pytest.raises(ValueError, match=r"^d: "):
        QuantizedCorpus(codes, "ubinary")
    for bad in (0, -1, 13.0, True):
        with pytest.raises((TypeError, ValueError), match=r"^d: "):
            QuantizedCorpus(codes, "ubinary", bad)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_corpus_binary_padding_bits_set_refused(precision):
    """ST's codes have zero pad bits; set pad bits change Hamming distances, so wrapping such
    codes (wrong d, or other bit order) should be refused, checked on the last column only."""
    codes = nf.quantize(X, precision).codes.copy()  # d=13: low 3 bits of byte 1 are padding
    codes.view(np.uint8)[:, -1] |= 0b101
    with pytest.raises(ValueError, match=r"^codes: .*pad"):
        QuantizedCorpus(codes, precision, 13)


def test_corpus_ranges_rules():
    codes = nf.quantize(X, "uint8", RANGES).codes
    with pytest.raises(ValueError, match=r"^ranges: .*need"):
        QuantizedCorpus(codes, "uint8")
    with pytest.raises(ValueError, match=r"^ranges: .*d=4"):
        QuantizedCorpus(codes, "uint8", ranges=RANGES[:, :4])
    bcodes = nf.quantize(X, "binary").codes
    with pytest.raises(ValueError, match=r"^ranges: "):
        QuantizedCorpus(bcodes, "binary", 13, RANGES)


@pytest.fixture
def c8():
    return nf.quantize(X, "int8", RANGES)


def test_dequantize_rows_out_of_range(c8):
    with pytest.raises(IndexError, match=r"^rows: "):
        c8.dequantize([0, 50])
    with pytest.raises(IndexError, match=r"^rows: "):
        c8.dequantize([-51])


def test_dequantize_rows_minus_one_sentinel_refused(c8):
    """FAISS pads missing neighbours with -1; rows=-1 silently rescoring the LAST row is a trap."""
    with pytest.raises(IndexError, match=r"^rows: "):
        c8.dequantize(np.array([3, -1]))


@pytest.mark.parametrize("bad", [np.array([0.0, 1.0]), np.zeros((2, 2), int),
                                 np.zeros(50, bool)])
def test_dequantize_rows_bad_dtype_named(c8, bad):
    with pytest.raises(ValueError, match=r"^rows: "):
        c8.dequantize(bad)


def test_dequantize_bool_mask_hint(c8):
    """A boolean mask is refused; the message should name the fix (np.flatnonzero)."""
    with pytest.raises(ValueError, match=r"flatnonzero|nonzero"):
        c8.dequantize(np.ones(50, bool))


def test_dequantize_dtype_garbage_named(c8):
    with pytest.raises(TypeError, match=r"^dtype: "):
        c8.dequantize(dtype="bogus")  # NumPy's "data type 'bogus' not understood" escapes


def test_dequantize_dtype_none_refused(c8):
    with pytest.raises(TypeError, match=r"^dtype: "):
        c8.dequantize(dtype=None)  # np.dtype(None) is float64: silently accepted


def test_dequantize_out_checks(c8, tmp_path):
    with pytest.raises(ValueError, match=r"^out: "):
        c8.dequantize([1, 2], out=np.empty((2, 13), np.float64))
    p = tmp_path / "o.npy"
    np.save(p, np.zeros((50, 13), np.float32))
    with pytest.raises(ValueError, match=r"^out: "):
        c8.dequantize(out=np.load(p, mmap_mode="r"))


def test_dequantize_binary_refused():
    with pytest.raises(ValueError, match="unpackbits"):
        nf.quantize(X, "binary").dequantize()


# ---------------------------------------------------------------- save / load

def test_save_into_missing_directory_names_path(c8, tmp_path):
    path = tmp_path / "nope" / "c.npz"
    with pytest.raises(ValueError, match=r"^path: "):
        c8.save(path)


def test_save_onto_a_directory_names_path_and_leaves_nothing(c8, tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises((ValueError, OSError)) as info:
        c8.save(d)
    assert sorted(os.listdir(tmp_path)) == ["dir"]
    assert str(info.value).startswith("path: "), str(info.value)


def test_load_bad_files_named(c8, tmp_path):
    delta_like = tmp_path / "delta.npz"
    np.savez(delta_like, format=np.array("nudgefast.delta"), version=np.array(1))
    rnd = tmp_path / "rnd.npz"
    np.savez(rnd, a=np.arange(3))
    good = tmp_path / "good.npz"
    c8.save(good)
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:200])
    future = tmp_path / "future.npz"
    with np.load(good) as f:
        arrays = dict(f)
    arrays["version"] = np.array(99)
    np.savez(future, **arrays)
    npy = tmp_path / "a.npy"
    np.save(npy, np.arange(3))
    for p, word in [(delta_like, "not a nudgefast"), (rnd, "not a nudgefast"),
                    (trunc, "truncated"), (future, "newer"), (npy, "truncated or damaged"),
                    (tmp_path / "missing.npz", "does not exist"), (tmp_path, "not a file")]:
        for mm in (None, "r"):
            with pytest.raises(ValueError, match=rf"^path: .*{word}"):
                QuantizedCorpus.load(p, mmap_mode=mm)
        with pytest.raises(ValueError, match=rf"^path: "):
            QuantizationRanges.load(p)


def test_load_real_delta_file(tmp_path):
    """A Delta .npz from nudgefast.handoff."""
    from nudgefast import handoff
    src = open(handoff.__file__).read()
    fmt = [ln for ln in src.splitlines() if ln.startswith("FORMAT")][0].split("=")[1].strip()
    p = tmp_path / "d.npz"
    np.savez(p, format=np.array(eval(fmt)), version=np.array(1), variant=np.array("m"))
    with pytest.raises(ValueError, match=r"^path: .*not a nudgefast quantized corpus"):
        QuantizedCorpus.load(p)


def test_load_crafted_version_array_is_valueerror(c8, tmp_path):
    p = tmp_path / "v.npz"
    c8.save(p)
    with np.load(p) as f:
        arrays = dict(f)
    arrays["version"] = np.array([1, 1])
    np.savez(p, **arrays)
    with pytest.raises(ValueError, match=r"^path: "):
        QuantizedCorpus.load(p)


def test_ranges_load_damaged_ranges_file_is_valueerror(tmp_path):
    p = tmp_path / "r.npz"
    np.savez(p, format=np.array(qmod.RANGES_FORMAT), version=np.array(1))
    with pytest.raises(ValueError, match=r"^path: "):
        QuantizationRanges.load(p)


@pytest.mark.parametrize("mm", ["w+", "R", 1, "readonly"])
def test_load_bad_mmap_mode(c8, tmp_path, mm):
    p = tmp_path / "c.npz"
    c8.save(p)
    with pytest.raises(ValueError, match=r"^mmap_mode: "):
        QuantizedCorpus.load(p, mmap_mode=mm)


def test_roundtrip_mmap_fortran_and_binary(tmp_path):
    c = QuantizedCorpus(np.asfortranarray(nf.quantize(X, "int8", RANGES).codes), "int8",
                        ranges=RANGES)
    p = tmp_path / "f.npz"
    c.save(p)
    back = QuantizedCorpus.load(p, mmap_mode="r")
    assert np.array_equal(back.codes, c.codes) and back.ranges == c.ranges
    b = nf.quantize(X, "binary")
    b.save(p)
    back = QuantizedCorpus.load(p, mmap_mode="c")
    assert np.array_equal(back.codes, b.codes) and back.d == 13
    with pytest.raises(ValueError, match="no ranges"):
        QuantizationRanges.load(p)


@pytest.mark.parametrize("which", ["corpus", "ranges"])
@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_save_keeps_old_file_and_leaves_no_temp(c8, tmp_path, monkeypatch, which, exc):
    p = tmp_path / "c.npz"
    obj = c8 if which == "corpus" else c8.ranges
    obj.save(p)
    before = p.read_bytes()
    real = np.savez

    def broken(fh, **arrays):
        fh.write(b"PK\x03\x04 half written")
        assert any(".tmp" in n for n in os.listdir(tmp_path))
        raise exc
    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(type(exc)):
        obj.save(p)
    monkeypatch.setattr(np, "savez", real)
    assert p.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def test_concurrent_saves_to_one_path_stay_atomic(tmp_path, monkeypatch):
    """Two saves of the same path interleaving (two threads, or a save from a callback): with a
    temporary name of path + pid alone both wrote the SAME temp file and the result was torn.
    Simulated deterministically: save B runs to completion inside save A's write; A, renamed
    last, wins whole."""
    p = tmp_path / "c.npz"
    a = nf.quantize(X, "int8", RANGES)
    b = nf.quantize(X[:20], "uint8", RANGES)
    real = np.savez
    state = {"inner": False}

    def interleaved(fh, **arrays):
        if state["inner"]:
            return real(fh, **arrays)
        state["inner"] = True
        b.save(p)              # B: same temp name, finishes and renames it onto p
        state["inner"] = False
        return real(fh, **arrays)  # A goes on writing into the inode now at p
    monkeypatch.setattr(np, "savez", interleaved)
    try:
        a.save(p)
    except OSError:
        pass
    monkeypatch.setattr(np, "savez", real)
    back = QuantizedCorpus.load(p)  # must be A or B whole, never a torn file
    assert back.precision == "int8" and np.array_equal(back.codes, a.codes)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


# ---------------------------------------------------------------- caller's arrays unchanged

def test_inputs_unchanged():
    x = X.copy()
    x64 = X.astype(np.float64)
    cal = (X * 1.5).copy()
    rng = RANGES.copy()
    keep = [a.copy() for a in (x, x64, cal, rng)]
    for p in qmod.PRECISIONS:
        for kw in ({}, {"ranges": rng}, {"calibration": cal}):
            if p in ("binary", "ubinary") and kw:
                continue
            for arr in (x, x64):
                nf.quantize(arr, p, chunk_rows=7, **kw)
    c = nf.quantize(x, "int8", rng)
    c.dequantize([1, 2])
    c.dequantize()
    for a, k in zip((x, x64, cal, rng), keep):
        assert np.array_equal(a, k)
    assert not c.ranges.min.flags.writeable
