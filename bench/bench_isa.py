"""Instruction-set levels of the compiled CPU backend (csrc/cpu/dispatch.hpp): one top-k pass per
level (``search``: 1,000 queries x 200,000 records x 384, k = 10, float32 and float16 corpora),
NumPy's sgemm on the same shapes (scores only: no normalisation, no selection) in the same run,
and, with the report, NudgeN.fit per level over its own search pass.

Floors: the machine's peak at each level (cores x clock x float32 lanes x 2 flops x FMA units),
and OpenBLAS sgemm through NumPy (issue 12's goal: a float32 pass at >= 90% of its GFLOP/s).

    pytest bench/bench_isa.py --benchmark-columns=median,iqr,min,max   # pytest-benchmark
    python bench/bench_isa.py [--fit] [--out report.md]               # the report (Markdown)

Sizes: NUDGEFAST_BENCH_N (200000), NUDGEFAST_BENCH_D (384), NUDGEFAST_BENCH_VAL (1000). The
baseline level (a float32 FMA emulated in double, scalar) runs on N / 100 records. The clock is
measured with a chain of dependent 1-cycle integer adds (a 10-line C probe compiled with ``cc``),
else read from /proc/cpuinfo (under a hypervisor: the nominal clock, not the boost);
NUDGEFAST_CLOCK_GHZ overrides it, NUDGEFAST_FMA_UNITS (2) gives the FMA pipes per core.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from nudgefast import NudgeN, search
from nudgefast import benchmark as nfb

try:
    from nudgefast import _cpu
except ImportError:  # the compiled backend is not built: nothing to measure
    _cpu = None

LEVELS = _cpu.isa_levels() if _cpu is not None else []
LANES = {"baseline": 4, "avx2": 8, "avx512": 16, "amx": 16}  # float32 lanes of the kernels' vectors
BASELINE_SHRINK = 100


def _env(name, default):
    return int(float(os.environ.get(name, default)))


def sizes():
    return _env("NUDGEFAST_BENCH_N", 200_000), _env("NUDGEFAST_BENCH_D", 384), _env("NUDGEFAST_BENCH_VAL", 1000)


def corpus_rows(level, n):
    return max(1, n // BASELINE_SHRINK) if level == "baseline" else n


def pass_flops(n_q, n, d):
    return 2.0 * n_q * n * d


def sgemm_scores(queries, corpus, rows=20_000):
    """The scores of a pass by NumPy's matmul (BLAS sgemm), in blocks of ``rows`` records written
    into one reused buffer: what a BLAS-based exhaustive search computes before it selects."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    out = np.empty((q.shape[0], min(rows, corpus.shape[0])), np.float32)

    def run():
        for s in range(0, corpus.shape[0], rows):
            block = corpus[s:s + rows]
            np.matmul(q, block.T, out=out[:, :block.shape[0]])
    return run


# ---------------------------------------------------------------------------------------------
# pytest-benchmark


@pytest.fixture(scope="module")
def isa_workloads():
    n, d, n_val = sizes()
    return {dt: nfb.synthetic_workload(n, d, n_train=10, n_val=n_val, dtype=dt) for dt in (np.float32, np.float16)}


@pytest.fixture(params=LEVELS)
def level(request):
    before = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda t: np.dtype(t).name)
def test_pass_per_level(benchmark, isa_workloads, level, dtype):
    w = isa_workloads[dtype]
    x = w.corpus[:corpus_rows(level, w.n)]
    q = w.val.embeddings
    benchmark.extra_info.update(level=level, n=x.shape[0], d=x.shape[1], n_queries=len(q), k=10,
                                gflop=pass_flops(len(q), x.shape[0], x.shape[1]) / 1e9)
    benchmark.pedantic(lambda: search(q, x, 10, backend="cpp", progress=False), rounds=3, iterations=1,
                       warmup_rounds=1)


def test_numpy_sgemm(benchmark, isa_workloads):
    w = isa_workloads[np.float32]
    q = w.val.embeddings
    benchmark.extra_info.update(n=w.n, d=w.corpus.shape[1], n_queries=len(q),
                                gflop=pass_flops(len(q), w.n, w.corpus.shape[1]) / 1e9)
    benchmark.pedantic(sgemm_scores(q, w.corpus), rounds=3, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# The report

_CLOCK_PROBE = r"""
#include <stdio.h>
#include <time.h>
int main(void) {
    long n = 1000000000L, x = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < n; i += 8)
        __asm__ volatile("add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\t"
                         "add $1,%0\n\tadd $1,%0\n\tadd $1,%0\n\tadd $1,%0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", n / ((b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec)) / 1e9 + 0 * x);
    return 0;
}
"""


def clock_ghz():
    """(GHz, how it was obtained)."""
    if os.environ.get("NUDGEFAST_CLOCK_GHZ"):
        return float(os.environ["NUDGEFAST_CLOCK_GHZ"]), "NUDGEFAST_CLOCK_GHZ"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc and platform.machine() in ("x86_64", "AMD64"):
        with tempfile.TemporaryDirectory() as tmp:
            src, exe = os.path.join(tmp, "clock.c"), os.path.join(tmp, "clock")
            with open(src, "w") as f:
                f.write(_CLOCK_PROBE)
            if subprocess.run([cc, "-O2", src, "-o", exe], capture_output=True).returncode == 0:
                best = max(float(subprocess.run([exe], capture_output=True, text=True).stdout) for _ in range(3))
                return best, "measured: 10^9 dependent 1-cycle integer adds on one core (best of 3)"
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
        return mhz / 1000, "/proc/cpuinfo 'cpu MHz' (nominal; boost clocks may be higher)"
    except (OSError, StopIteration):
        return float("nan"), "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
    except OSError:
        return platform.processor() or platform.machine()


def best_of(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def report(repeat=3, fit=False):
    n, d, n_val = sizes()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ghz, how = clock_ghz()
    fma_units = _env("NUDGEFAST_FMA_UNITS", 2)
    features = [k for k, v in _cpu.cpu_features().items() if v and not k.startswith("os_")]
    work = {dt: nfb.synthetic_workload(n, d, n_train=5000 if fit else 10, n_val=n_val, dtype=dt)
            for dt in (np.float32, np.float16)}
    q = work[np.float32].val.embeddings
    sgemm = pass_flops(n_val, n, d) / best_of(sgemm_scores(q, work[np.float32].corpus), repeat) / 1e9

    lines = [f"# Instruction-set levels: top-k pass vs NumPy sgemm ({time.strftime('%Y-%m-%d')})", "",
             f"- CPU: {cpu_name()}, {cores} cores used; instruction sets: {', '.join(features)}",
             f"- clock: {ghz:.2f} GHz ({how}); peak = cores x clock x float32 lanes x 2 x {fma_units} FMA units"
             " (NUDGEFAST_FMA_UNITS)",
             f"- pass: search(k = 10, cosine, default chunking), {n_val} queries x {n} x {d}"
             f" (baseline: {corpus_rows('baseline', n)} records); NumPy sgemm: scores only, float32,"
             f" {np.__version__}, {sgemm:.1f} GFLOP/s",
             f"- default path: {_cpu.isa()} ({_cpu.kernel_isa()} kernels)", "",
             "| level | peak GFLOP/s | corpus | pass s | GFLOP/s | % of peak | / NumPy sgemm |"
             + (" NudgeN.fit s | fit / pass |" if fit else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|" if fit else "")]
    before = _cpu.isa()
    try:
        for level in LEVELS:
            _cpu.set_isa(level)
            peak = cores * ghz * LANES[level] * 2 * fma_units
            for dt, w in work.items():
                x = w.corpus[:corpus_rows(level, n)]
                t = best_of(lambda: search(w.val.embeddings, x, 10, backend="cpp", progress=False), repeat)
                gf = pass_flops(n_val, x.shape[0], d) / t / 1e9
                row = (f"| {level} | {peak:.0f} | {np.dtype(dt).name} | {t:.3f} | {gf:.1f} | {100 * gf / peak:.0f}% "
                       f"| {gf / sgemm:.2f} |")
                if fit:
                    if level == "baseline":
                        row += " (skipped) | |"
                    else:
                        est = NudgeN(backend="cpp", progress=False)
                        tf = best_of(lambda: est.fit(w.corpus, w.train, w.val), 1)
                        row += f" {tf:.3f} | {tf / t:.2f} |"
                lines.append(row)
                print(row, file=sys.stderr, flush=True)
    finally:
        _cpu.set_isa(before)
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fit", action="store_true", help="also NudgeN.fit per level (5000 train queries, the validation queries above)")
    parser.add_argument("--out", help="write the Markdown report here too")
    args = parser.parse_args(argv)
    if _cpu is None:
        sys.exit("bench_isa: nudgefast._cpu is not built (pip install -e .)")
    text = report(args.repeat, args.fit)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
