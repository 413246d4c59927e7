"""The compiled CPU backend's instruction-set levels (csrc/cpu/dispatch.hpp): every level this
machine supports runs topk_update, normalize_rows and dot64 against the float64 reference with
awkward sizes, and all levels give bit-identical results (each score is one FMA chain in t order,
each norm one order of additions, on every level). NUDGEFAST_CPU_ISA forces a level at import;
an unknown or unsupported value fails the import naming the variable and the allowed values.

Whichever machine runs this tests the levels it has: an AVX-512 machine all three, an AVX2 one
two, any other the baseline only.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_cpu = pytest.importorskip("nudgefast._cpu", reason="the compiled CPU backend is not built")

import nudgefast  # noqa: E402
from conftest import TOL  # noqa: E402
from nudgefast._backends import cpp_backend  # noqa: E402
from nudgefast._backends import numpy_backend as ref  # noqa: E402
from op_cases import (assert_identical, check_duplicate_rule, check_topk, corpus, empty_state,  # noqa: E402
                      reference_topk, rng, twin_queries, unit_queries)

LEVELS = _cpu.isa_levels()
KNOWN = ["baseline", "avx2", "avx512", "amx"]


@contextlib.contextmanager
def at_level(level):
    before = _cpu.isa()
    _cpu.set_isa(level)
    try:
        yield
    finally:
        _cpu.set_isa(before)


def per_level(fn):
    """{level: fn()} with fn run at every supported level."""
    out = {}
    for level in LEVELS:
        with at_level(level):
            out[level] = fn()
    return out


def assert_levels_agree(results):
    first, *rest = results
    for level in rest:
        try:
            assert_identical(results[first], results[level])
        except AssertionError as exc:
            raise AssertionError(f"level {level} differs from {first}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# The levels themselves


def test_levels_reported():
    assert LEVELS[0] == "baseline" and set(LEVELS) <= set(KNOWN)
    assert LEVELS == [lv for lv in KNOWN if lv in LEVELS]  # lowest first
    assert _cpu.isa() in LEVELS
    assert _cpu.kernel_isa() in ("baseline", "avx2", "avx512")
    features = _cpu.cpu_features()
    if "avx512" in LEVELS:
        assert features["avx512f"] and features["os_avx512"]
    if "amx" in LEVELS:
        assert features["amx_tile"] and features["amx_permitted"]
    with at_level(LEVELS[-1]):
        assert _cpu.isa() == LEVELS[-1]


def test_backends_line_names_the_path():
    text = cpp_backend.describe()
    assert f"path: {_cpu.kernel_isa()}" in text
    if "amx" not in LEVELS:
        assert "AMX" in text  # says there is no AMX path rather than staying silent


@pytest.mark.parametrize("bad", ["avx9", "AVX2", "native", " avx2"])
def test_set_isa_refuses_unknown_levels(bad):
    with pytest.raises(ValueError, match="allowed values are baseline, avx2, avx512, amx"):
        _cpu.set_isa(bad)


def test_set_isa_refuses_unsupported_levels():
    missing = [lv for lv in KNOWN if lv not in LEVELS]
    if not missing:
        pytest.skip("this machine supports every level")
    with pytest.raises(ValueError, match="not supported here"):
        _cpu.set_isa(missing[0])
    assert _cpu.isa() in LEVELS


def _import_with(value):
    """Imports the compiled module in a fresh interpreter with NUDGEFAST_CPU_ISA=value."""
    root = str(Path(nudgefast.__file__).resolve().parents[1])
    env = {**os.environ, "NUDGEFAST_CPU_ISA": value,
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = "import nudgefast._cpu as c; print(c.isa(), c.kernel_isa())"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("level", LEVELS)
def test_environment_forces_a_level(level):
    run = _import_with(level)
    assert run.returncode == 0, run.stderr
    isa, kernel = run.stdout.split()
    assert isa == level and kernel == ("avx512" if level == "amx" else level)


def test_environment_unset_or_empty_means_the_best():
    run = _import_with("")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == LEVELS[-1]


@pytest.mark.parametrize("bad", ["avx9", "sse2"] + [lv for lv in KNOWN if lv not in LEVELS][:1])
def test_environment_bad_value_fails_the_import(bad):
    run = _import_with(bad)
    assert run.returncode != 0
    assert "ImportError" in run.stderr and f"NUDGEFAST_CPU_ISA={bad}" in run.stderr
    assert ("allowed values are baseline, avx2, avx512, amx" in run.stderr
            or f"support {', '.join(LEVELS)}" in run.stderr)


# ---------------------------------------------------------------------------------------------
# topk_update: every level against the reference, and the levels against each other

CHUNK_DTYPES = [np.float16, np.float32, np.float64]


def _topk(q, x, row_offset, exclude, normalize, k):
    s, i = empty_state(q.shape[0], k)
    bad = _cpu.topk_update(q, x, row_offset, exclude, normalize, s, i, None)
    return s, i, np.array(bad)


@pytest.mark.parametrize("dtype", CHUNK_DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("d", [1, 7, 37, 385])
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "dot"])
def test_topk_every_level(dtype, d, normalize):
    # N = 1237: no multiple of a record tile (16, 32) nor of a block; 17 queries: a whole AVX-512
    # tile of 12 plus a 5-row one, two AVX2 tiles of 6 plus a padded one.
    n, n_q, k, row_offset = 1237, 17, 10, 7000
    x = corpus(n, d, dtype, seed=d)
    q64 = twin_queries(unit_queries(n_q, d, seed=d), x)
    q = q64.astype(np.float32)
    exclude = np.sort(rng("isa-exclude", d).choice(n, 40, replace=False)).astype(np.int64)
    want = reference_topk(q64, x, row_offset, exclude, normalize, k)
    results = per_level(lambda: _topk(q, x, row_offset, exclude, normalize, k))
    for level, (s, i, bad) in results.items():
        check_topk(q64, x, row_offset, exclude, normalize, s, i, int(bad), want)
        if d > 1 and normalize:
            assert check_duplicate_rule(x, i, row_offset, exclude) >= 3, level
    assert_levels_agree(results)


@pytest.mark.parametrize("n_q", range(1, 16))
def test_topk_every_query_tile_height(n_q):
    # Every remainder tile of the AVX-512 kernel (1 .. 12 rows) and of the AVX2 one (1 .. 6).
    n, d, k = 333, 45, 5
    x = corpus(n, d, np.float32, seed=n_q)
    q64 = twin_queries(unit_queries(n_q, d, seed=n_q), x)
    q = q64.astype(np.float32)
    ex = np.zeros(0, np.int64)
    want = reference_topk(q64, x, 0, None, True, k)
    results = per_level(lambda: _topk(q, x, 0, ex, True, k))
    for s, i, bad in results.values():
        check_topk(q64, x, 0, None, True, s, i, int(bad), want)
    assert_levels_agree(results)


@pytest.mark.parametrize("k", [1, 44, 60])
def test_topk_k_beyond_the_candidates(k):
    n, d, n_q = 45, 33, 5
    x = corpus(n, d, np.float16, seed=k, n_dup=4)
    q64 = unit_queries(n_q, d, seed=k)
    exclude = np.arange(0, 40, 2, dtype=np.int64)
    want = reference_topk(q64, x, 0, exclude, True, k)
    results = per_level(lambda: _topk(q64.astype(np.float32), x, 0, exclude, True, k))
    for s, i, bad in results.values():
        check_topk(q64, x, 0, exclude, True, s, i, int(bad), want)
    assert_levels_agree(results)


def test_topk_duplicates_tie_on_every_level():
    # Every row duplicated 3 times at spread-out positions: each query's best record and its
    # twins have bit-identical scores, whatever their slots in the tiles, on every level.
    d = 384
    base = rng("isa-dup").standard_normal((100, d)).astype(np.float32)
    x = np.concatenate([base, base[::-1], base])
    q = base[:20] / np.linalg.norm(base[:20], axis=1, keepdims=True)
    results = per_level(lambda: _topk(q.astype(np.float32), x, 0, np.zeros(0, np.int64), True, 3))
    for s, i, _ in results.values():
        for r in range(20):
            assert s[r, 0] == s[r, 1] == s[r, 2]
            assert sorted(i[r].tolist()) == i[r].tolist() == [r, 199 - r, 200 + r]
    assert_levels_agree(results)


def test_topk_one_rounding_per_step():
    # Steps where rounding twice (through double, as a level without FMA instructions might)
    # differs from one fused multiply-add: q . x = fma(q1, x1, fma(q0, x0, 0)) with
    # q0 * x0 = 1 + 2^-23 and q1 * x1 = -2^-24 + 2^-70: exactly 1 + 2^-23 rounded once, 1.0 if
    # the sum is rounded to double first (a tie, to even). Then products among float subnormals.
    e = 2.0 ** -23
    q = np.array([[1 + e, 2.0 ** -12 * (1 + e)], [1e-20, 1e-20]], np.float32)
    x = np.array([[1.0, -(2.0 ** -12) * (1 - e)], [3e-19, 7e-20], [1.0, 0.0]], np.float32)
    results = per_level(lambda: _topk(q, x, 0, np.zeros(0, np.int64), False, 3))
    for s, i, _ in results.values():
        assert s[0, 0] == np.float32(1 + e) and i[0, 0] == 0
        assert s[1, 0] == np.float32(1e-20)  # record 2; record 1's score is subnormal
    assert_levels_agree(results)


# ---------------------------------------------------------------------------------------------
# normalize_rows and dot64


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("m,d", [(1237, 1), (1237, 7), (1237, 31), (1237, 33), (1237, 41), (401, 385),
                                 (2800, 385)])  # the last: > 4 MiB of output, streaming stores
def test_normalize_rows_every_level(dtype, m, d):
    gen = rng("isa-rows", m, d)
    chunk = (gen.standard_normal((m, d)) * gen.uniform(0.01, 100.0, size=(m, 1))).astype(dtype)
    want = np.full(chunk.shape, np.nan, np.float32)
    assert ref.normalize_rows(chunk, want) == -1
    chunk[m // 2] = 0  # reported, its output row left as it was (the reference stops there)
    want[m // 2] = np.nan

    def run():
        out = np.full(chunk.shape, np.nan, np.float32)
        bad = _cpu.normalize_rows(chunk, out, None)
        return out, np.array(bad)

    results = per_level(run)
    for out, bad in results.values():
        assert bad == m // 2
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))  # the zero row left as it was
        ok = ~np.isnan(want)
        ulp = np.spacing(np.abs(want[ok]))
        assert np.all(np.abs(out[ok] - want[ok]) <= ulp)
    assert_levels_agree(results)


@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 13, 37), (23, 9, 385), (19, 37, 50)])
def test_dot64_every_level(n, m, d):
    gen = rng("isa-dot64", n, m, d)
    A, B = gen.standard_normal((n, d)), gen.standard_normal((m, d))
    want = A @ B.T
    results = per_level(lambda: _cpu.dot64(A, B, None))
    for out in results.values():
        np.testing.assert_allclose(out, want, rtol=0, atol=TOL[np.float64] * d)
    assert_levels_agree(results)


@pytest.mark.parametrize("values", ["grid", "random"])
@pytest.mark.parametrize("t", [1, 15, 57, 300])
def test_nudge_n_sweep_every_level(t, values):
    """The sweep's score loop (csrc/cpu/kernels/sweep.cpp): vector bodies, tails and blocks of
    256 touched records; ties decided by the index rule (coarse grid values); random values
    catch a fused multiply-add where NumPy rounds the two products. Hits and k-th scores equal
    the reference's and agree bit for bit across levels."""
    from op_cases import n_problem
    S, H, alpha, beta, touched, unt_s, unt_i, ans_ptr, ans = n_problem(7 + t, t=t)
    if values == "random":
        gen = rng("isa-sweep", t)
        S, H = gen.standard_normal(S.shape), gen.standard_normal(H.shape)
        alpha, beta = gen.uniform(0.5, 1.5, alpha.shape), gen.uniform(0, 1, beta.shape)
    args = (S, H, alpha, beta, touched, unt_s.astype(np.float64), unt_i, ans_ptr, ans, 5)
    want_kth = np.empty((S.shape[0], alpha.shape[0]))
    want = ref.nudge_n_sweep(*args, kth=want_kth)

    def run():
        kth = np.empty_like(want_kth)
        return cpp_backend.nudge_n_sweep(*args, kth=kth), kth
    results = per_level(run)
    for hits, kth in results.values():
        np.testing.assert_array_equal(hits, want)
        np.testing.assert_array_equal(kth, want_kth)
    assert_levels_agree(results)


# ---------------------------------------------------------------------------------------------
# Review additions


def test_topk_rows_of_tiny_norm_stay_candidates():
    # A row whose float32 norm is below 1 / FLT_MAX (~2.9e-39) has inv_norm = 1 / norm = +inf in
    # the admission test: a negative dot gives -inf * slack + -inf = NaN and a zero dot gives
    # 0 * inf = NaN, so the row is never offered, although its exact score (dot / norm, as in
    # the reference) is finite (-1 and 0 here) and ranks inside the top 3. Every level drops it.
    x = np.array([[1.0, 0.0], [-2e-39, 0.0], [0.0, 1.0]], np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    want_s, want_i = empty_state(1, 3)
    assert ref.topk_update(q, x, 0, np.zeros(0, np.int64), True, want_s, want_i) == -1
    assert want_i.tolist() == [[0, 2, 1]]
    for level, (s, i, bad) in per_level(lambda: _topk(q, x, 0, np.zeros(0, np.int64), True, 3)).items():
        assert int(bad) == -1, level
        assert i.tolist() == want_i.tolist(), f"level {level}: {i.tolist()} {s.tolist()}"


def test_no_vector_instructions_outside_the_level_namespaces():
    # What setup.py's nm check is meant to guarantee, checked on the module that was actually
    # built (setup.py or CMake): no function outside nudgefast::avx2 / nudgefast::avx512 holds a
    # VEX/EVEX instruction, so nothing the baseline runs can fault on a CPU without AVX.
    import platform
    import re
    import shutil
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("ELF x86-64 only")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _cpu.__file__], capture_output=True,
                          text=True, check=True).stdout
    head = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    vector = re.compile(r"^(v[a-z0-9]+|k(mov|or|and|xor|not|test|shift|add|unpck)[a-z0-9]*)\b|%[yz]mm|%k[0-7]")
    level_functions, offenders, current = 0, {}, None
    for line in text.splitlines():
        m = head.match(line)
        if m:
            current = m.group(1)
            level_functions += "nudgefast::avx2::" in current or "nudgefast::avx512::" in current
            continue
        insn = line.split("\t")[-1].strip()
        if current is None or not vector.search(insn):
            continue
        if "nudgefast::avx2::" in current or "nudgefast::avx512::" in current:
            continue
        offenders.setdefault(current, insn)
    if len(LEVELS) > 1 and level_functions == 0:
        pytest.skip("the module has no symbols (stripped): cannot tell the levels' functions apart")
    assert not offenders, f"vector instructions outside the level namespaces: {list(offenders.items())[:10]}"


def test_backends_line_for_a_bad_isa_names_the_variable_not_a_reinstall():
    # A bad NUDGEFAST_CPU_ISA fails the import of the compiled module; `nudgefast backends` must
    # then point at the variable, not tell the user to rebuild the package.
    root = str(Path(nudgefast.__file__).resolve().parents[1])
    env = {**os.environ, "NUDGEFAST_CPU_ISA": "avx9",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "nudgefast", "backends"], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    line = next(ln for ln in run.stdout.splitlines() if ln.startswith("cpp"))
    assert "NUDGEFAST_CPU_ISA=avx9" in line
    assert "reinstall" not in line and "pip install ." not in line, line


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nm") is None or shutil.which("c++") is None,
                    reason="needs cmake, nm and a C++ compiler")
def test_cmake_guard_refuses_weak_symbols_outside_the_level(tmp_path):
    """cmake/check_weak_symbols.cmake (run by CMakeLists.txt before linking, as setup.py checks
    its own builds): an inline function emitted outside nudgefast::<level> by a level's object
    fails the build; one inside the namespace passes."""
    script = Path(__file__).resolve().parents[1] / "cmake" / "check_weak_symbols.cmake"
    sources = {
        "leak": "inline int twice(int x) { return 2 * x; }\nint use(int x) { return twice(x); }\n",
        "own": "namespace nudgefast { namespace avx2 { inline int twice(int x) { return 2 * x; }\n"
               "int use(int x) { return twice(x); } } }\n",
    }
    results = {}
    for name, text in sources.items():
        src, obj = tmp_path / f"{name}.cpp", tmp_path / f"{name}.o"
        src.write_text(text)
        subprocess.run(["c++", "-O0", "-c", str(src), "-o", str(obj)], check=True)
        results[name] = subprocess.run(
            ["cmake", f"-DNM={shutil.which('nm')}", "-DLEVEL=avx2", f"-DOBJECTS={obj}", "-P", str(script)],
            capture_output=True, text=True)
    assert results["leak"].returncode != 0 and "twice(int)" in results["leak"].stderr
    assert results["own"].returncode == 0, results["own"].stderr
