"""Kernel benchmark of the compiled quantized top-k ops against the float32 pass and FAISS.

One search of ``--queries`` queries (k = ``--k``) over ``--rows`` random records of ``--dim``
dimensions, each timed ``--repeat`` times (best reported; other processes share the cores):

* ``topk_update``     the float32 pass (cpp backend) over the float32 corpus, in chunks
* ``qtopk_int8``      int8 queries against the int8 codes of the same corpus (signed, no normalize)
* ``qtopk_hamming``   packed sign bits (``--dim`` / 8 bytes per record)
* FAISS ``IndexScalarQuantizer(QT_8bit, METRIC_INNER_PRODUCT)`` on the float32 corpus (search only)
* FAISS ``IndexBinaryFlat`` on the same packed bits (search only)

    python bench/bench_qtopk_cpp.py                       # 2M x 384, 1000 queries, k=10
    python bench/bench_qtopk_cpp.py --rows 200000 --no-faiss

The data are random (generated in chunks); this times the kernels, not retrieval quality.
``NUDGEFAST_CPU_ISA`` forces a lower instruction-set level (the paths are printed).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from nudgefast import _cpu
from nudgefast._backends import cpp_backend as cb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=500_000, help="rows per op call (the search loop's chunk)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--no-float", action="store_true", help="skip the float32 topk_update pass")
    args = ap.parse_args(argv)
    N, d, nq, k, C = args.rows, args.dim, args.queries, args.k, args.chunk
    w = (d + 7) // 8

    gen = np.random.default_rng(0)
    x = np.empty((N, d), np.float32)
    codes = np.empty((N, d), np.int8)
    bits = np.empty((N, w), np.uint8)
    # A per-dimension scalar quantizer over [-4, 4): u = round((x - low) / step), code = u - 128.
    low = np.full(d, -4.0, np.float32)
    step = np.full(d, 8.0 / 255, np.float32)
    for s in range(0, N, 200_000):
        part = gen.standard_normal((min(200_000, N - s), d), dtype=np.float32)
        x[s:s + len(part)] = part
        u = np.clip(np.rint((part - low) / step), 0, 255).astype(np.int16)
        codes[s:s + len(part)] = (u - 128).astype(np.int8)
        bits[s:s + len(part)] = np.packbits(part > 0, axis=1)
    q = gen.standard_normal((nq, d), dtype=np.float32)
    # Integer queries: q * step rounded per query to [-127, 127]; qoffset = q . low.
    qs = q * step
    qscale = (np.abs(qs).max(axis=1) / 127).astype(np.float32)
    qcodes = np.rint(qs / qscale[:, None]).astype(np.int8)
    qoffset = (q @ low).astype(np.float32)
    qbits = np.packbits(q > 0, axis=1)
    ex = np.zeros(0, np.int64)

    print(f"rows={N} dim={d} queries={nq} k={k} chunk={C} threads={args.threads or 'all'}; "
          f"isa={_cpu.isa()} qtopk paths={_cpu.qtopk_paths()}")

    def state():
        return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)

    def run_float():
        s, i = state()
        for r0 in range(0, N, C):
            cb.topk_update(q, x[r0:r0 + C], r0, ex, False, s, i, n_threads=args.threads)

    def run_int8():
        s, i = state()
        for r0 in range(0, N, C):
            cb.qtopk_int8(qcodes, qscale, qoffset, codes[r0:r0 + C], r0, ex, True, low, step, False, s, i,
                          n_threads=args.threads)

    def run_hamming():
        s, i = state()
        for r0 in range(0, N, C):
            cb.qtopk_hamming(qbits, bits[r0:r0 + C], r0, ex, d, s, i, n_threads=args.threads)

    runs = {}
    if not args.no_float:
        runs["float32 topk_update"] = run_float
    runs["qtopk_int8"] = run_int8
    runs["qtopk_hamming"] = run_hamming

    if not args.no_faiss:
        try:
            import faiss
        except ImportError:
            print("faiss not installed: FAISS rows skipped")
        else:
            if args.threads:
                faiss.omp_set_num_threads(args.threads)
            sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            sq.train(x[: min(N, 100_000)])
            sq.add(x)
            bf = faiss.IndexBinaryFlat(8 * w)
            bf.add(bits)
            runs["faiss SQ8 (IP)"] = lambda: sq.search(q, k)
            runs["faiss IndexBinaryFlat"] = lambda: bf.search(qbits, k)

    # Repeats interleaved (every method once per round), so a burst of load from other
    # processes hits them alike; the best of the rounds is reported.
    times = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    results = {name: (min(ts), ts) for name, ts in times.items()}

    base = results.get("float32 topk_update", (None,))[0]
    for name, (best, times) in results.items():
        ratio = f"  {base / best:6.1f}x vs float32" if base else ""
        print(f"{name:24s} best {best:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times)}){ratio}")
    return results


if __name__ == "__main__":
    main()
