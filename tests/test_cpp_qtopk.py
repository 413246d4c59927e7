"""The compiled quantized top-k ops (csrc/cpu/qtopk.cpp, csrc/cpu/kernels/qtopk.cpp):
``qtopk_int8`` and ``qtopk_hamming`` of the cpp backend against the NumPy reference, exactly.

Both ops sum integers (exact on every path) and the float epilogue is the reference's float32
operations (float(acc) * qscale, + qoffset, / float32 norm), so with a float32 state the results
equal the reference's bit for bit: scores, indices (the tie rule) and the returned first bad
row. Every instruction-set level this machine has runs every case (in process through
``_cpu.set_isa``, and once per level in a fresh interpreter forced by ``NUDGEFAST_CPU_ISA``),
and so do the avx512 level's plain kernels where the CPU has the VNNI / VPOPCNTDQ sub-paths
(``_cpu.set_qtopk_subpaths(False)``).
"""
from __future__ import annotations

import contextlib
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_cpu = pytest.importorskip("nudgefast._cpu", reason="the compiled CPU backend is not built")

import nudgefast  # noqa: E402
from nudgefast._backends import cpp_backend  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import rng  # noqa: E402

LEVELS = _cpu.isa_levels()
FEATURES = _cpu.cpu_features()
HAS_SUBPATHS = "avx512" in LEVELS and (FEATURES["avx512_vnni"] or FEATURES["avx512_vpopcntdq"])
# Every path this machine can run: (level, sub-paths allowed).
PATHS = [(lv, True) for lv in LEVELS] + ([("avx512", False)] if HAS_SUBPATHS else [])
PATH_IDS = [f"{lv}{'' if sub else '-plain'}" for lv, sub in PATHS]


@contextlib.contextmanager
def at_path(level, subpaths=True):
    before = _cpu.isa()
    _cpu.set_isa(level)
    _cpu.set_qtopk_subpaths(subpaths)
    try:
        yield
    finally:
        _cpu.set_isa(before)
        _cpu.set_qtopk_subpaths(True)


def per_path(fn):
    out = {}
    for (level, sub), name in zip(PATHS, PATH_IDS):
        with at_path(level, sub):
            out[name] = fn()
    return out


def state(n_q, k, dtype=np.float32):
    return np.full((n_q, k), -np.inf, dtype=dtype), np.full((n_q, k), -1, dtype=np.int64)


def assert_same(got, want, what=""):
    (gs, gi, gb), (ws, wi, wb) = got, want
    assert gb == wb, f"{what}: first bad {gb} != {wb}"
    np.testing.assert_array_equal(gi, wi, err_msg=f"{what}: indices")
    np.testing.assert_array_equal(gs, ws, err_msg=f"{what}: scores")
    assert gs.dtype == ws.dtype


# ---------------------------------------------------------------------------------------------
# Problem builders


def int8_problem(m, d, n_q, signed, seed, n_dup=6, zero_rows=()):
    """Codes with exact duplicate rows (ties), queries built as the search layer builds them
    (qcodes from q * step rounded per query, qoffset = q . low), and rows listed in
    ``zero_rows`` made zero-norm (u = -low / step exactly)."""
    gen = rng("qtopk-int8", m, d, n_q, signed, seed)
    if signed:
        codes = gen.integers(-128, 128, size=(m, d)).astype(np.int8)
    else:
        codes = gen.integers(0, 256, size=(m, d)).astype(np.uint8)
    src = [0]
    if m > 2 * n_dup:
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        codes[dst] = codes[src]
    step = gen.uniform(0.01, 0.05, size=d).astype(np.float32)
    u0 = gen.integers(0, 256, size=d)
    # low = -step * u0 exactly (step * u0 is exact in float32 for a power-of-two step): the row
    # with u = u0 dequantizes to zero.
    step = (2.0 ** np.round(np.log2(step))).astype(np.float32)
    low = (-step.astype(np.float64) * u0).astype(np.float32)
    for r in zero_rows:
        codes[r] = (u0 - 128).astype(np.int8) if signed else u0.astype(np.uint8)
    q = gen.standard_normal((n_q, d))
    qs = q * step
    qscale = np.maximum(np.abs(qs).max(axis=1), 1e-30) / 127
    qcodes = np.clip(np.rint(qs / qscale[:, None]), -127, 127).astype(np.int8)
    qoffset = (q @ low.astype(np.float64)).astype(np.float32)
    if n_q > 2 and m > 0:  # a query pointing at a duplicated row, so the tie reaches the top
        qcodes[1] = np.clip(codes[src[0]].astype(np.int64) + (128 if signed else 0) - 128, -127, 127)
    return qcodes, qscale.astype(np.float32), qoffset, codes, low, step


def hamming_problem(m, w, n_q, seed, dtype=np.uint8, n_dup=6):
    gen = rng("qtopk-hamming", m, w, n_q, seed)
    bits = gen.integers(0, 256, size=(m, w)).astype(np.uint8)
    if m > 2 * n_dup:
        src = gen.choice(m, n_dup, replace=False)
        dst = gen.choice(np.setdiff1d(np.arange(m), src), n_dup, replace=False)
        bits[dst] = bits[src]
    q = gen.integers(0, 256, size=(n_q, w)).astype(np.uint8)
    if n_q > 1 and m > 0:
        q[0] = bits[0]
    return q.view(dtype), bits.view(dtype)


def ref_int8(args, row_offset, exclude, signed, normalize, k, st=None):
    qcodes, qscale, qoffset, codes, low, step = args
    s, i = state(qcodes.shape[0], k) if st is None else st
    exclude = np.zeros(0, np.int64) if exclude is None else exclude  # (the reference takes an array)
    with np.errstate(all="ignore"):
        bad = ref.qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize, s, i)
    return s, i, bad


def cpp_int8(args, row_offset, exclude, signed, normalize, k, st=None, n_threads=None):
    qcodes, qscale, qoffset, codes, low, step = args
    s, i = state(qcodes.shape[0], k) if st is None else st
    bad = cpp_backend.qtopk_int8(qcodes, qscale, qoffset, codes, row_offset, exclude, signed, low, step, normalize,
                                 s, i, n_threads=n_threads)
    return s, i, bad


def ref_hamming(q, bits, row_offset, exclude, n_bits, k, st=None):
    s, i = state(q.shape[0], k) if st is None else st
    exclude = np.zeros(0, np.int64) if exclude is None else exclude
    bad = ref.qtopk_hamming(q, bits, row_offset, exclude, n_bits, s, i)
    return s, i, bad


def cpp_hamming(q, bits, row_offset, exclude, n_bits, k, st=None, n_threads=None):
    s, i = state(q.shape[0], k) if st is None else st
    bad = cpp_backend.qtopk_hamming(q, bits, row_offset, exclude, n_bits, s, i, n_threads=n_threads)
    return s, i, bad


def excluded(m, seed, n=7):
    if m < 3:
        return np.zeros(0, np.int64)
    return np.sort(rng("qtopk-ex", m, seed).choice(m, min(n, m // 3), replace=False)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Contract


@pytest.mark.parametrize("name", ["qtopk_int8", "qtopk_hamming"])
def test_signature_is_the_references(name):
    assert inspect.signature(getattr(cpp_backend, name)) == inspect.signature(getattr(ref, name))


def test_paths_reported():
    paths = _cpu.qtopk_paths()
    kernel = _cpu.kernel_isa()
    assert paths["int8"] == ("avx512-vnni" if kernel == "avx512" and FEATURES["avx512_vnni"] else kernel)
    assert paths["hamming"] == ("avx512-vpopcntdq" if kernel == "avx512" and FEATURES["avx512_vpopcntdq"]
                                else kernel)
    text = cpp_backend.describe()
    assert f"int8 {paths['int8']}" in text and f"hamming {paths['hamming']}" in text
    for level, sub in PATHS:
        with at_path(level, sub):
            got, kernel = _cpu.qtopk_paths(), _cpu.kernel_isa()
            assert got["int8"].split("-")[0] == got["hamming"].split("-")[0] == kernel
            if not sub:
                assert got == {"int8": kernel, "hamming": kernel}


# ---------------------------------------------------------------------------------------------
# int8 against the reference, every path


@pytest.mark.parametrize("d", [1, 7, 37, 384, 385, 1024])
@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_int8_matches_reference(d, signed, normalize):
    k, row_offset = 10, 5000
    for m, n_q in [(1, 1), (45, 9), (1237, 33), (77, 13)]:
        zero_rows = (m // 2, m - 1) if m > 2 else ()
        args = int8_problem(m, d, n_q, signed, seed=1, zero_rows=zero_rows)
        ex = excluded(m, d)
        want = ref_int8(args, row_offset, ex, signed, normalize, k)
        if normalize and zero_rows:
            assert row_offset <= want[2] <= row_offset + min(zero_rows)  # (d = 1: other rows can be zero too)
        results = per_path(lambda: cpp_int8(args, row_offset, ex, signed, normalize, k))
        for path, got in results.items():
            assert_same(got, want, f"{path} m={m} n_q={n_q}")


def test_int8_every_query_tile_height():
    # Every remainder tile of the AVX-512 kernels (1 .. 12 queries) and of the AVX2 one (1 .. 6).
    for n_q in range(1, 26):
        args = int8_problem(333, 45, n_q, True, seed=n_q)
        want = ref_int8(args, 0, np.zeros(0, np.int64), True, True, 5)
        for path, got in per_path(lambda: cpp_int8(args, 0, None, True, True, 5)).items():
            assert_same(got, want, f"{path} n_q={n_q}")


@pytest.mark.parametrize("k", [1, 44, 60])
def test_int8_k_beyond_the_candidates(k):
    args = int8_problem(45, 33, 5, False, seed=k, zero_rows=(3,))
    ex = np.arange(0, 40, 2, dtype=np.int64)
    want = ref_int8(args, 0, ex, False, True, k)
    assert (want[1] == -1).any() or k < 20
    for path, got in per_path(lambda: cpp_int8(args, 0, ex, False, True, k)).items():
        assert_same(got, want, path)


def test_int8_ties_follow_the_index_rule():
    # Every row three times (far apart): the best record and its twins tie exactly on every path.
    d = 64
    gen = rng("qtopk-ties")
    base = gen.integers(-128, 128, size=(50, d)).astype(np.int8)
    codes = np.concatenate([base, base[::-1], base])
    qcodes = (base[:10].astype(np.int16) // 2).astype(np.int8)
    qscale = np.ones(10, np.float32)
    qoffset = np.zeros(10, np.float32)
    low = np.full(d, -1.0, np.float32)
    step = np.full(d, 1 / 128, np.float32)
    args = (qcodes, qscale, qoffset, codes, low, step)
    want = ref_int8(args, 0, None, True, False, 3)
    for path, (s, i, _) in per_path(lambda: cpp_int8(args, 0, None, True, False, 3)).items():
        np.testing.assert_array_equal(i, want[1], err_msg=path)
        np.testing.assert_array_equal(s, want[0], err_msg=path)
        assert (s[:, 0] == s[:, 2]).all()


def test_int8_chunks_in_sequence():
    """Three chunks merged one after another (row offsets, exclude lists local to each chunk,
    a zero-norm row in the second) equal the reference's sequence and its one-shot pass."""
    m, d, n_q, k = 900, 100, 17, 12
    args = int8_problem(m, d, n_q, True, seed=3, zero_rows=(450, 700))
    qcodes, qscale, qoffset, codes, low, step = args
    ex_all = excluded(m, 3, n=40)
    one_shot = ref_int8(args, 0, ex_all, True, True, k)
    for path, (s, i, bads) in per_path(lambda: _int8_in_chunks(args, ex_all, k)).items():
        rs, ri = state(n_q, k)
        want_bads = []
        for a, b in [(0, 300), (300, 611), (611, 900)]:
            ex = ex_all[(ex_all >= a) & (ex_all < b)] - a
            sub = (qcodes, qscale, qoffset, codes[a:b], low, step)
            want_bads.append(ref_int8(sub, a, ex, True, True, k, st=(rs, ri))[2])
        assert bads == want_bads == [-1, 450, 700]
        np.testing.assert_array_equal(i, ri, err_msg=path)
        np.testing.assert_array_equal(s, rs, err_msg=path)
        np.testing.assert_array_equal(i, one_shot[1], err_msg=path)
        np.testing.assert_array_equal(s, one_shot[0], err_msg=path)


def _int8_in_chunks(args, ex_all, k):
    qcodes, qscale, qoffset, codes, low, step = args
    s, i = state(qcodes.shape[0], k)
    bads = []
    for a, b in [(0, 300), (300, 611), (611, 900)]:
        ex = ex_all[(ex_all >= a) & (ex_all < b)] - a
        sub = (qcodes, qscale, qoffset, codes[a:b], low, step)
        bads.append(cpp_int8(sub, a, ex, True, True, k, st=(s, i))[2])
    return s, i, bads


@pytest.mark.parametrize("signed", [True, False], ids=["int8", "uint8"])
def test_int8_extreme_codes_do_not_overflow(signed):
    """d = 4096, qcodes +-127 against u = 0 / 255 rows: sums up to 127 * 255 * 4096 ~ 1.3e8,
    exact in int32 (the float32 score then rounds as the reference's)."""
    d, m = 4096, 70
    lo_code, hi_code = (-128, 127) if signed else (0, 255)
    dt = np.int8 if signed else np.uint8
    codes = np.full((m, d), lo_code, dtype=np.int64)
    codes[::2] = hi_code
    codes[5, ::3] = lo_code
    codes = codes.astype(dt)
    qcodes = np.full((4, d), 127, np.int8)
    qcodes[1] = -127
    qcodes[2, ::2] = -127
    qcodes[3, :7] = -127
    qscale = np.array([1.0, 1.0, 0.5, 3.0], np.float32)
    qoffset = np.array([0.0, 1.0, -2.0, 0.25], np.float32)
    low = np.zeros(d, np.float32)
    step = np.full(d, 1 / 255, np.float32)
    args = (qcodes, qscale, qoffset, codes, low, step)
    acc = qcodes.astype(np.int64) @ (codes.astype(np.int64) + (128 if signed else 0)).T
    assert np.abs(acc).max() == 127 * 255 * d
    for normalize in (False, True):
        want = ref_int8(args, 0, None, signed, normalize, 8)
        for path, got in per_path(lambda: cpp_int8(args, 0, None, signed, normalize, 8)).items():
            assert_same(got, want, f"{path} normalize={normalize}")


def test_int8_merges_into_a_state_and_other_dtypes():
    """A partly filled caller state (ties against its entries), a float64 state (updated through
    a float32 copy) and n_threads=1 agree with the reference's float32 run."""
    args = int8_problem(500, 48, 9, True, seed=7)
    k = 6
    want_s, want_i = state(9, k)
    ref_int8(args, 0, None, True, False, k, st=(want_s, want_i))
    seed_s, seed_i = want_s.copy(), want_i.copy()
    seed_s[:, 3:], seed_i[:, 3:] = -np.inf, -1  # 3 entries kept: the chunk competes with them
    ws, wi = seed_s.copy(), seed_i.copy()
    want = ref_int8(args, 1000, None, True, False, k, st=(ws, wi))
    gs, gi = seed_s.copy(), seed_i.copy()
    got = cpp_int8(args, 1000, None, True, False, k, st=(gs, gi), n_threads=1)
    assert_same(got, want, "state")
    s64, i64 = state(9, k, np.float64)
    cpp_int8(args, 0, None, True, False, k, st=(s64, i64))
    np.testing.assert_array_equal(i64, want_i)
    np.testing.assert_array_equal(s64, want_s.astype(np.float64))


def test_int8_memmap_chunk_is_read_in_place(tmp_path):
    args = int8_problem(400, 37, 5, True, seed=11, zero_rows=(250,))
    qcodes, qscale, qoffset, codes, low, step = args
    path = tmp_path / "codes.i8"
    codes.tofile(path)
    mm = np.memmap(path, dtype=np.int8, mode="r", shape=codes.shape)
    chunk = mm[100:300]
    assert not chunk.flags.writeable
    assert np.shares_memory(cpp_backend._codes_view(chunk), chunk)  # no copy
    want = ref_int8((qcodes, qscale, qoffset, codes[100:300], low, step), 100, None, True, True, 4)
    got = cpp_int8((qcodes, qscale, qoffset, chunk, low, step), 100, None, True, True, 4)
    assert_same(got, want, "memmap")
    assert got[2] == 250


def test_int8_column_slice_rows():
    # Rows contiguous, row stride larger than d (a column slice): read in place, no copy.
    args = int8_problem(300, 50, 7, False, seed=12)
    qcodes, qscale, qoffset, codes, low, step = args
    wide = np.zeros((300, 80), np.uint8)
    wide[:, 10:60] = codes
    view = wide[:, 10:60]
    assert np.shares_memory(cpp_backend._codes_view(view), wide)
    want = ref_int8(args, 0, None, False, True, 5)
    got = cpp_int8((qcodes, qscale, qoffset, view, low, step), 0, None, False, True, 5)
    assert_same(got, want, "column slice")


# ---------------------------------------------------------------------------------------------
# hamming against the reference, every path


@pytest.mark.parametrize("d", [1, 7, 37, 384, 385, 1024])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["uint8", "int8"])
def test_hamming_matches_reference(d, dtype):
    w = (d + 7) // 8
    k, row_offset = 10, 123
    for m, n_q in [(1, 1), (45, 9), (1237, 33), (77, 13)]:
        q, bits = hamming_problem(m, w, n_q, seed=d, dtype=dtype)
        ex = excluded(m, d)
        want = ref_hamming(q, bits, row_offset, ex, d, k)
        results = per_path(lambda: cpp_hamming(q, bits, row_offset, ex, d, k))
        for path, got in results.items():
            assert_same(got, want, f"{path} m={m} n_q={n_q}")
            assert got[2] == -1


@pytest.mark.parametrize("w", [2, 9, 17, 31, 32, 33, 63, 250])  # word tails; past 31 words (byte counters)
def test_hamming_widths(w):
    q, bits = hamming_problem(300, w, 5, seed=w)
    n_bits = 8 * w - 3
    want = ref_hamming(q, bits, 0, None, n_bits, 7)
    for path, got in per_path(lambda: cpp_hamming(q, bits, 0, None, n_bits, 7)).items():
        assert_same(got, want, path)


def test_hamming_ties_and_chunks():
    """Few bits (many exact ties at every distance) over chunks merged in sequence: the tie rule
    picks the lowest indices, as in the reference's sequence and one-shot pass."""
    m, w, n_q, k = 1000, 1, 11, 20
    q, bits = hamming_problem(m, w, n_q, seed=5)
    ex_all = excluded(m, 5, n=100)
    one_shot = ref_hamming(q, bits, 0, ex_all, 8, k)

    def run():
        s, i = state(n_q, k)
        for a, b in [(0, 333), (333, 334), (334, 1000)]:
            ex = ex_all[(ex_all >= a) & (ex_all < b)] - a
            cpp_hamming(q, bits[a:b], a, ex, 8, k, st=(s, i))
        return s, i, -1

    for path, got in per_path(run).items():
        assert_same(got, one_shot, path)


def test_hamming_k_beyond_the_rows_and_threads():
    q, bits = hamming_problem(5, 6, 3, seed=9)
    want = ref_hamming(q, bits, 40, np.array([1], np.int64), 48, 12)
    assert (want[1][:, 4:] == -1).all()
    got = cpp_hamming(q, bits, 40, np.array([1], np.int64), 48, 12, n_threads=1)
    assert_same(got, want, "k > m")
    q, bits = hamming_problem(5000, 48, 20, seed=10)
    assert_same(cpp_hamming(q, bits, 0, None, 384, 10, n_threads=1),
                cpp_hamming(q, bits, 0, None, 384, 10), "threads")


def test_hamming_memmap_chunk(tmp_path):
    q, bits = hamming_problem(600, 49, 6, seed=13)
    path = tmp_path / "bits.u8"
    bits.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=bits.shape)
    chunk = mm[200:]
    assert np.shares_memory(cpp_backend._codes_view(chunk), chunk)
    want = ref_hamming(q, bits[200:], 200, None, 385, 5)
    assert_same(cpp_hamming(q, chunk, 200, None, 385, 5), want, "memmap")


# ---------------------------------------------------------------------------------------------
# Arguments the binding checks


def test_index_arguments_are_checked():
    args = int8_problem(50, 8, 2, True, seed=1)
    qcodes, qscale, qoffset, codes, low, step = args
    q, bits = hamming_problem(50, 1, 2, seed=1)
    s, i = state(2, 3)
    calls = {
        "int8": lambda ex, off: cpp_backend.qtopk_int8(qcodes, qscale, qoffset, codes, off, ex, True, low, step, True,
                                                       s, i),
        "hamming": lambda ex, off: cpp_backend.qtopk_hamming(q, bits, off, ex, 8, s, i),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="exclude must be sorted"):
            call(np.array([5, 3]), 0)
        with pytest.raises(ValueError, match=r"exclude\[1\] = 50 is outside"):
            call(np.array([3, 50]), 0)
        with pytest.raises(ValueError, match="row_offset must be >= 0"):
            call(None, -1)
        with pytest.raises(TypeError, match="exclude"):
            call(np.array([1.0]), 0)
    assert (s == -np.inf).all() and (i == -1).all()  # nothing touched
    with pytest.raises(TypeError, match="codes"):
        cpp_backend.qtopk_int8(qcodes, qscale, qoffset, codes.astype(np.float32), 0, None, True, low, step, False, s, i)
    with pytest.raises(ValueError, match="codes.shape"):
        cpp_backend.qtopk_int8(qcodes, qscale, qoffset, codes[:, :5], 0, None, True, low, step, False, s, i)
    with pytest.raises(ValueError, match="qscale"):
        cpp_backend.qtopk_int8(qcodes, qscale[:1], qoffset, codes, 0, None, True, low, step, False, s, i)
    with pytest.raises(ValueError, match="low"):
        cpp_backend.qtopk_int8(qcodes, qscale, qoffset, codes, 0, None, True, low[:3], step, True, s, i)
    with pytest.raises(ValueError, match="n_bits"):
        cpp_backend.qtopk_hamming(q, bits, 0, None, -1, s, i)
    with pytest.raises(ValueError, match="n_threads"):
        cpp_backend.qtopk_hamming(q, bits, 0, None, 8, s, i, n_threads=0)


def test_empty_chunk_returns_minus_one():
    args = int8_problem(0, 8, 2, True, seed=1)
    s, i = state(2, 3)
    assert cpp_int8(args, 0, None, True, True, 3, st=(s, i))[2] == -1
    assert cpp_hamming(np.zeros((2, 1), np.uint8), np.zeros((0, 1), np.uint8), 0, None, 8, 3, st=(s, i))[2] == -1
    assert (i == -1).all()


# ---------------------------------------------------------------------------------------------
# NUDGEFAST_CPU_ISA in a fresh interpreter: every level, bit-identical to the in-process runs

_CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r})
import test_cpp_qtopk as t
from nudgefast import _cpu
out = {{"isa": np.array(_cpu.isa()), "paths": np.array(str(sorted(_cpu.qtopk_paths().items())))}}
for name, (s, i, b) in t.forced_cases().items():
    out[name + "_s"], out[name + "_i"], out[name + "_b"] = s, i, np.array(b)
np.savez({out!r}, **out)
"""


def forced_cases():
    """The problems the forced-level children run (and this process, at its default path)."""
    out = {}
    for d, signed, normalize in [(7, True, True), (385, False, True), (1024, True, False)]:
        args = int8_problem(700, d, 14, signed, seed=d, zero_rows=(300,))
        out[f"int8_{d}"] = cpp_int8(args, 10, excluded(700, d), signed, normalize, 9)
    for d in (37, 384, 1024):
        q, bits = hamming_problem(700, (d + 7) // 8, 14, seed=d)
        out[f"hamming_{d}"] = cpp_hamming(q, bits, 10, excluded(700, d), d, 9)
    return out


@pytest.mark.parametrize("level", LEVELS)
def test_forced_levels_are_bit_identical(level, tmp_path):
    root = str(Path(nudgefast.__file__).resolve().parents[1])
    tests = str(Path(__file__).resolve().parent)
    out = tmp_path / "out.npz"
    env = {**os.environ, "NUDGEFAST_CPU_ISA": level,
           "PYTHONPATH": os.pathsep.join([root, tests, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", _CHILD.format(tests=tests, out=str(out))], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = np.load(out)
    assert str(got["isa"]) == level
    if level == "baseline":
        assert "'baseline'" in str(got["paths"]) and "avx" not in str(got["paths"])
    want = forced_cases()
    for name, (s, i, b) in want.items():
        np.testing.assert_array_equal(got[name + "_s"], s, err_msg=f"{level} {name}")
        np.testing.assert_array_equal(got[name + "_i"], i, err_msg=f"{level} {name}")
        assert int(got[name + "_b"]) == b
    # and the reference agrees with this process's result
    args = int8_problem(700, 385, 14, False, seed=385, zero_rows=(300,))
    assert_same(want["int8_385"], ref_int8(args, 10, excluded(700, 385), False, True, 9), "reference")
