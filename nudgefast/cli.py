"""Console entry points: ``nudgefast demo``, ``nudgefast backends``. The only module that prints."""
from __future__ import annotations

import argparse
import logging
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
    p = sub.add_parser("backends", help="which backends are available here, and why not")
    p.set_defaults(func=show_backends)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    return args.func(args)
