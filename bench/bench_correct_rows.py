"""correct_rows (a Corrector applied to a chunk of stale rows, issue 14) per instruction-set level
of the compiled backend, against NumPy on the same shapes in the same run: the numpy backend's op
(the reference: float32 matmuls plus both normalisations) and the bare matmuls alone
(``x @ W0`` [+ ``relu(x @ W1) @ W2``], OpenBLAS sgemm: the GEMM floor a BLAS-based corrector
cannot beat). Shapes: m = 65,536 rows, d_old = d_new = 384, the linear map (h = 0) and the MLP
(h = 1024); float32 and float16 rows.

Floors: the machine's peak at each level (cores x clock x float32 lanes x 2 flops x FMA units;
the clock as bench_isa.py measures it) and NumPy's sgemm. Flops: 2 m (d_old d_new + h (d_old +
d_new)).

    pytest bench/bench_correct_rows.py --benchmark-columns=median,min,max   # pytest-benchmark
    python bench/bench_correct_rows.py [--out report.md]                      # the report (Markdown)

Sizes: NUDGEFAST_BENCH_CORRECT_M (65536), NUDGEFAST_BENCH_D (384), NUDGEFAST_BENCH_HIDDEN
(1024). The baseline level (a float32 FMA emulated in double, scalar) runs on m / 100 rows.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pytest

from bench_isa import LANES, clock_ghz, cpu_name
from nudgefast._backends import numpy_backend

try:
    from nudgefast import _cpu
except ImportError:  # the compiled backend is not built: nothing to measure
    _cpu = None

LEVELS = _cpu.isa_levels() if _cpu is not None else []
BASELINE_SHRINK = 100


def _env(name, default):
    return int(float(os.environ.get(name, default)))


def problem(h, dtype, m=None, d=None, seed=0):
    """(x, W0, b0, W1, b1, W2): unit-scale weights, Gaussian rows."""
    m = _env("NUDGEFAST_BENCH_CORRECT_M", 65536) if m is None else m
    d = _env("NUDGEFAST_BENCH_D", 384) if d is None else d
    gen = np.random.default_rng(seed)
    x = gen.standard_normal((m, d), dtype=np.float32).astype(dtype)
    W0 = (gen.standard_normal((d, d), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    b0 = np.zeros(d, np.float32)
    if not h:
        return x, W0, b0, None, None, None
    W1 = (gen.standard_normal((d, h), dtype=np.float32) / np.sqrt(d)).astype(np.float32)
    W2 = (gen.standard_normal((h, d), dtype=np.float32) / np.sqrt(h)).astype(np.float32)
    return x, W0, b0, W1, np.zeros(h, np.float32), W2


def flops(m, d_old, d_new, h):
    return 2.0 * m * (d_old * d_new + h * (d_old + d_new))


def bare_matmul(x, W0, b0, W1, b1, W2):
    """The GEMMs alone, as NumPy runs them (float32 rows)."""
    x = np.asarray(x, np.float32)
    y = np.empty((x.shape[0], W0.shape[1]), np.float32)
    hid = None if W1 is None else np.empty((x.shape[0], W1.shape[1]), np.float32)

    def run():
        np.matmul(x, W0, out=y)
        if W1 is not None:
            np.matmul(x, W1, out=hid)
            np.maximum(hid, 0, out=hid)
            np.add(y, hid @ W2, out=y)
    return run


# ---------------------------------------------------------------------------------------------
# pytest-benchmark

HIDDEN = [0, _env("NUDGEFAST_BENCH_HIDDEN", 1024)]


@pytest.fixture(scope="module", params=HIDDEN, ids=lambda h: f"h{h}")
def shape_h(request):
    return request.param


@pytest.fixture(params=LEVELS)
def level(request):
    before = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(before)


def _record(benchmark, args, **info):
    x, W0, _, W1, _, _ = args
    h = 0 if W1 is None else W1.shape[1]
    benchmark.extra_info.update(m=x.shape[0], d_old=x.shape[1], d_new=W0.shape[1], h=h,
                                gflop=flops(x.shape[0], x.shape[1], W0.shape[1], h) / 1e9, **info)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda t: np.dtype(t).name)
def test_cpp_per_level(benchmark, shape_h, level, dtype):
    args = problem(shape_h, dtype)
    if level == "baseline":
        args = (args[0][:max(1, args[0].shape[0] // BASELINE_SHRINK)],) + args[1:]
    out = np.empty((args[0].shape[0], args[1].shape[1]), np.float32)
    _record(benchmark, args, level=level)
    benchmark.pedantic(lambda: _cpu.correct_rows(*args, out, None), rounds=3, iterations=1, warmup_rounds=1)


def test_numpy_op(benchmark, shape_h):
    args = problem(shape_h, np.float32)
    out = np.empty((args[0].shape[0], args[1].shape[1]), np.float32)
    _record(benchmark, args)
    benchmark.pedantic(lambda: numpy_backend.correct_rows(*args, out), rounds=3, iterations=1, warmup_rounds=1)


def test_numpy_matmul(benchmark, shape_h):
    args = problem(shape_h, np.float32)
    _record(benchmark, args)
    benchmark.pedantic(bare_matmul(*args), rounds=3, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# The report


def best_of(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def report(repeat=3):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz, how = clock_ghz()
    fma_units = _env("NUDGEFAST_FMA_UNITS", 2)
    lines = [f"# correct_rows: compiled levels vs NumPy ({time.strftime('%Y-%m-%d')})", "",
             f"- CPU: {cpu_name()}, {cores} cores used; NumPy {np.__version__}",
             f"- clock: {ghz:.2f} GHz ({how}); peak = cores x clock x float32 lanes x 2 x {fma_units} FMA units",
             "- GFLOP/s = 2 m (d_old d_new + h (d_old + d_new)) / time; best of "
             f"{repeat} after a warm-up (baseline: m / {BASELINE_SHRINK} rows)", "",
             "| h | rows | what | ms | GFLOP/s | % of level peak | / NumPy matmul |",
             "|---|---|---|---|---|---|---|"]
    before = _cpu.isa()
    try:
        for h in HIDDEN:
            args32 = problem(h, np.float32)
            m, d = args32[0].shape
            fl = flops(m, d, d, h)
            gemm = fl / best_of(bare_matmul(*args32), repeat) / 1e9
            out = np.empty((m, d), np.float32)
            ref = fl / best_of(lambda: numpy_backend.correct_rows(*args32, out), repeat) / 1e9
            lines.append(f"| {h} | float32 | NumPy matmul only | {fl / gemm / 1e6:.1f} | {gemm:.0f} | | 1.00 |")
            lines.append(f"| {h} | float32 | numpy backend (full op) | {fl / ref / 1e6:.1f} | {ref:.0f} | "
                         f"| {ref / gemm:.2f} |")
            for dt in (np.float32, np.float16):
                args = args32 if dt == np.float32 else problem(h, dt)
                for level in LEVELS:
                    _cpu.set_isa(level)
                    rows = max(1, m // BASELINE_SHRINK) if level == "baseline" else m
                    a = (args[0][:rows],) + args[1:]
                    t = best_of(lambda: _cpu.correct_rows(*a, out[:rows], None), repeat)
                    gf = flops(rows, d, d, h) / t / 1e9
                    peak = cores * ghz * LANES[level] * 2 * fma_units
                    lines.append(f"| {h} | {np.dtype(dt).name} | cpp {level} | {t * 1e3:.1f} | {gf:.0f} "
                                 f"| {100 * gf / peak:.0f}% | {gf / gemm:.2f} |")
                    print(lines[-1], file=sys.stderr, flush=True)
    finally:
        _cpu.set_isa(before)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="write the Markdown report here too")
    args = parser.parse_args(argv)
    if _cpu is None:
        sys.exit("bench_correct_rows: nudgefast._cpu is not built (pip install -e .)")
    text = report(args.repeat)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
