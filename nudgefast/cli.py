"""Console entry points: ``nudgefast demo``, ``nudgefast backends``. The only module that prints."""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from . import _backends, datasets
from .metrics import metrics
from .nudge import NudgeM, NudgeN
from .search import search


def _table(headers, rows):
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def demo(args) -> int:
    if args.dataset:
        ds = datasets.load(args.dataset)
    else:
        ds = datasets.packaged()
    label = f"{ds.name} (SYNTHETIC, seeded)" if ds.synthetic else ds.name
    n, d = ds.corpus.shape
    print(f"dataset: {label}: N={n} d={d}, train={len(ds.train)} dev={len(ds.dev)} "
          f"test={len(ds.test)} queries")
    names = [b.name for b in _backends.backends().values() if b.available]
    if args.backend != "all":
        names = [args.backend]
    k = args.k
    base = search(ds.test.embeddings, ds.corpus, k, backend=names[0], progress=False)
    before = metrics(base.indices, ds.test, k)
    rows = [["no fine-tuning", "-", "-", f"{before[f'recall@{k}']:.4f}",
             f"{before[f'ndcg@{k}']:.4f}", "-"]]
    for variant, cls in (("NUDGE-M", NudgeM), ("NUDGE-N", NudgeN)):
        for name in names:
            est = cls(backend=name, progress=False)
            est.fit(ds.corpus, ds.train, ds.dev)  # warm-up: JIT compile, page cache
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                res = est.fit(ds.corpus, ds.train, ds.dev)
                times.append(time.perf_counter() - t0)
            tuned = search(ds.test.embeddings, ds.corpus, k, res, backend=name, progress=False)
            after = metrics(tuned.indices, ds.test, k)
            rows.append([variant, name, f"{res.gamma:.4g}", f"{after[f'recall@{k}']:.4f}",
                         f"{after[f'ndcg@{k}']:.4f}", f"{1e3 * np.median(times):.1f}"])
    print(_table(["method", "backend", "gamma", f"recall@{k}", f"NDCG@{k}", "fit ms (median)"],
                 rows))
    return 0


def bench(args) -> int:
    import shutil
    from pathlib import Path

    from . import benchmark

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = benchmark.temp_dir() if args.memmap else None
    workloads = []
    try:
        if args.packaged:
            workloads.append(benchmark.packaged_workload())
        for n in [int(float(x)) for x in args.sizes.split(",") if x]:
            workloads.append(benchmark.synthetic_workload(
                n, args.d, args.train, args.val, seed=args.seed, memmap_dir=scratch))
        info = benchmark.device_info(args.threads)
        backends = args.backends.split(",") if args.backends != "all" else None
        peers = [p for p in args.peers.split(",") if p]
        rows = benchmark.run(workloads, backends=backends, peers=peers, repeat=args.repeat,
                             n_threads=args.threads)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    text = benchmark.markdown(rows, info)
    made = benchmark.plots(rows, out, info)
    report = out / "report.md"
    cmd = "nudgefast " + " ".join(args.argv)
    report.write_text(f"# nudgefast bench\n\ncommand: `{cmd}`\n\n{text}\n\n"
                      + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n")
    print(text)
    print(f"\nwrote {report} and {len(made)} plots")
    return 0


def show_backends(args) -> int:
    for info in _backends.backends().values():
        print(f"{info.name:6s} {'yes' if info.available else 'no ':3s}  {info.reason}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nudgefast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="tune the packaged dataset with NUDGE-M and NUDGE-N on "
                                    "every available backend and print a table")
    p.add_argument("--dataset", help="a dataset folder in the shared format instead")
    p.add_argument("--backend", default="all", help="one backend, or 'all' (default)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3, help="timed fits per backend after warm-up")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", help="fit time, top-k throughput and memory against N for every "
                                     "backend and peer (nudge-ft, FAISS): Markdown + PNG plots")
    p.add_argument("--sizes", default="10000,100000,1000000",
                   help="comma-separated corpus sizes N for the synthetic workload")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the cpp/numba backends and FAISS (default: all cores)")
    p.add_argument("--backends", default="all", help="comma-separated, or 'all' available")
    p.add_argument("--peers", default="nudge-ft,faiss", help="comma-separated peers to run")
    p.add_argument("--packaged", action="store_true", help="also the packaged dataset")
    p.add_argument("--memmap", action="store_true",
                   help="write synthetic corpora to a temp .npy and stream them as memmaps")
    p.add_argument("--out", default="bench/out", help="folder for report.md and the plots")
    p.set_defaults(func=bench)
    p = sub.add_parser("backends", help="which backends are available here, and why not")
    p.set_defaults(func=show_backends)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return args.func(args)
