"""Console entry points (``nudgefast demo | bench | backends``). The only module that prints."""
from __future__ import annotations

import argparse
import logging
import sys

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


def _demo_dataset(args):
    if args.synthetic:
        return datasets.synthetic()
    if args.dataset:
        return datasets.load(args.dataset)
    return datasets.packaged()


def _timed_fit(est, ds, repeat):
    """(result, median fit seconds) over ``repeat`` fits after one warm-up (JIT, page cache)."""
    from .benchmark import measure
    t = measure(lambda: est.fit(ds.corpus, ds.train, ds.dev), repeat)
    return t.result, t.median


def _short(text, width):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def _examples(ds, before, after, per_before, per_after, n=3):
    """Test queries whose best-graded answer tuning lifted to rank 1, largest NDCG@k gain
    first (ties: query order): a search that got better, to show as text."""
    csr = ds.test.csr(unique=True)
    picks = []
    gain = per_after[:, 1] - per_before[:, 1]
    for i in np.lexsort((np.arange(gain.size), -gain)):
        lo, hi = csr.ptr[i], csr.ptr[i + 1]
        if lo == hi or gain[i] <= 0:
            continue
        best = csr.index[lo + int(np.argmax(csr.relevance[lo:hi]))]
        if after[i, 0] == best and before[i, 0] != best:
            picks.append(int(i))
        if len(picks) == n:
            break
    return picks


def _print_examples(ds, base, tuned, label, per_before, per_after, width=78):
    texts, ids, queries = ds.record_texts(), ds.record_ids(), ds.query_texts("test")
    if texts is None or queries is None:
        print("\n(no record or query texts in this dataset: no examples to show)")
        return
    picks = _examples(ds, base, tuned, per_before, per_after)
    csr = ds.test.csr(unique=True)
    print(f"\nExamples: test queries whose answer {label} moved to rank 1 (top 3 shown; "
          f"'**' the answer, '*' a related record, graded 2 and 1)")
    for i in picks:
        grade = dict(zip(csr.index[csr.ptr[i]:csr.ptr[i + 1]].tolist(),
                         csr.relevance[csr.ptr[i]:csr.ptr[i + 1]].tolist()))
        print(f'\n  query: "{_short(queries[i], width - 9)}"')
        for title, rows in (("before", base[i]), (f"after {label}", tuned[i])):
            print(f"    {title}:")
            for rank, r in enumerate(rows[:3], 1):
                mark = {2.0: "**", 1.0: "* "}.get(grade.get(int(r)), "  ")
                name = ids[r] if ids else str(r)
                print(f"      {rank}. {mark} {_short(name + ': ' + texts[r], width - 12)}")


def _demo_tour(ds, args):
    """The best available backend: before/after on the test split, gamma, fit time, examples."""
    name = _backends.resolve(args.backend if args.backend != "all" else "auto")
    k = args.k
    print(f"backend: {name} (the fastest available; 'nudgefast backends' lists them)")
    print(f"tuning on train ({len(ds.train)} queries), choosing gamma on dev ({len(ds.dev)}), "
          f"scoring the test split ({len(ds.test)} queries) ...", flush=True)
    base = search(ds.test.embeddings, ds.corpus, k, backend=name, progress=False).indices
    before = metrics(base, ds.test, k, backend=name, per_query=True)
    rows = [["no fine-tuning", "-", f"{before[f'recall@{k}']:.4f}", f"{before[f'ndcg@{k}']:.4f}",
             "-"]]
    tuned = {}
    for variant, cls in (("NUDGE-M", NudgeM), ("NUDGE-N", NudgeN)):
        res, sec = _timed_fit(cls(backend=name, progress=False), ds, args.repeat)
        idx = search(ds.test.embeddings, ds.corpus, k, res, backend=name, progress=False).indices
        after = metrics(idx, ds.test, k, backend=name, per_query=True)
        tuned[variant] = (idx, after)
        rows.append([variant, f"{res.gamma:.4g}", f"{after[f'recall@{k}']:.4f}",
                     f"{after[f'ndcg@{k}']:.4f}", f"{1e3 * sec:.1f}"])
    print()
    print(_table(["method", "gamma", f"test recall@{k}", f"test NDCG@{k}", "fit ms"], rows))
    print(f"\nfit ms: median of {args.repeat} fits after a warm-up (one corpus pass + the gamma "
          f"sweep over the touched records); recall/NDCG: test split, graded relevance.")
    idx, after = tuned["NUDGE-N"]
    better = int((after["per_query"][:, 1] > before["per_query"][:, 1] + 1e-12).sum())
    worse = int((after["per_query"][:, 1] < before["per_query"][:, 1] - 1e-12).sum())
    print(f"NUDGE-N raised NDCG@{k} on {better} test queries and lowered it on {worse}.")
    _print_examples(ds, base, idx, "NUDGE-N", before["per_query"], after["per_query"])


def _demo_all_backends(ds, args):
    """Every available backend (or the one asked for) on the same task: the verification table."""
    names = [b.name for b in _backends.backends().values() if b.available]
    if args.backend != "all":
        names = [_backends.resolve(args.backend)]
    k = args.k
    base = search(ds.test.embeddings, ds.corpus, k, backend=names[0], progress=False)
    before = metrics(base.indices, ds.test, k)
    rows = [["no fine-tuning", "-", "-", f"{before[f'recall@{k}']:.4f}",
             f"{before[f'ndcg@{k}']:.4f}", "-"]]
    for variant, cls in (("NUDGE-M", NudgeM), ("NUDGE-N", NudgeN)):
        for name in names:
            print(f"  {variant} on {name} ...", flush=True)
            res, sec = _timed_fit(cls(backend=name, progress=False), ds, args.repeat)
            tuned = search(ds.test.embeddings, ds.corpus, k, res, backend=name, progress=False)
            after = metrics(tuned.indices, ds.test, k)
            rows.append([variant, name, f"{res.gamma:.4g}", f"{after[f'recall@{k}']:.4f}",
                         f"{after[f'ndcg@{k}']:.4f}", f"{1e3 * sec:.1f}"])
    print(_table(["method", "backend", "gamma", f"test recall@{k}", f"test NDCG@{k}",
                  "fit ms (median)"], rows))


def demo(args) -> int:
    ds = _demo_dataset(args)
    label = f"{ds.name} (SYNTHETIC, seeded)" if ds.synthetic else ds.name
    n, d = ds.corpus.shape
    print(f"dataset: {label}: N={n} records, d={d}, {ds.corpus.dtype}; queries: "
          f"train={len(ds.train)} dev={len(ds.dev)} test={len(ds.test)}")
    if args.all_backends:
        _demo_all_backends(ds, args)
    else:
        _demo_tour(ds, args)
    return 0


def bench(args) -> int:
    import shutil
    from pathlib import Path

    from . import benchmark

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.accuracy:
        return _bench_accuracy(args, out)
    scratch = benchmark.temp_dir() if args.memmap else None
    workloads = []
    try:
        if args.packaged:
            workloads.append(benchmark.packaged_workload())
        for n in [int(float(x)) for x in args.sizes.split(",") if x]:
            workloads.append(benchmark.synthetic_workload(
                n, args.d, args.train, args.val, seed=args.seed, memmap_dir=scratch))
        info = benchmark.device_info(args.threads)
        backends = _bench_backends(args.backends)
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


def _bench_accuracy(args, out) -> int:
    from . import accuracy, benchmark

    folders = accuracy.dataset_folders(args.dataset)
    backend = args.backends if args.backends not in ("all", "compiled") else "auto"
    info = benchmark.device_info(args.threads)
    rows = []
    for folder in folders:
        ds = datasets.load(folder)
        print(f"{ds.name}: N={ds.corpus.shape[0]}, {len(ds.train)}/{len(ds.dev)}/{len(ds.test)} "
              f"train/dev/test queries ...", flush=True)
        rows += accuracy.evaluate(ds, backend=backend, repeat=args.repeat,
                                  reference="nudge-ft" in args.peers.split(","),
                                  adapters=not args.no_adapters)
    text = accuracy.markdown(rows, info)
    cmd = "nudgefast " + " ".join(args.argv)
    report = out / "report.md"
    report.write_text(f"# nudgefast bench --accuracy\n\ncommand: `{cmd}`\n\n{text}\n")
    print(text)
    print(f"\nwrote {report}")
    return 0


def show_backends(args) -> int:
    for info in _backends.backends().values():
        print(f"{info.name:6s} {'yes' if info.available else 'no ':3s}  {info.reason}")
    return 0


DEFAULT_BENCH_SIZES = "10000,50000"


def _sizes(text):
    try:
        sizes = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 10000,1e6, got "
                                         f"{text!r}") from None
    if any(n < 2 for n in sizes):
        raise argparse.ArgumentTypeError(f"every size must be >= 2, got {text!r}")
    return text


def _bench_backends(text):
    """'all': every available backend; 'compiled': all but the numpy reference (its NUDGE-N
    sweep sorts per gamma: about 10 s a fit whatever N); else the names given."""
    if text in ("all", "compiled"):
        return [n for n, b in _backends.backends().items()
                if b.available and (text == "all" or n != "numpy")]
    return text.split(",")


def _backend_list(text):
    if text not in ("all", "compiled"):
        for name in text.split(","):
            if name not in _backends.KNOWN:
                raise argparse.ArgumentTypeError(f"unknown backend {name!r}; choose from "
                                                 f"{', '.join(_backends.KNOWN)}, 'compiled' or 'all'")
    return text


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


DESCRIPTION = ("nudgefast: NUDGE fine-tuning of retrieval embeddings (arXiv 2409.02343) at "
               "hardware speed. 'nudgefast COMMAND --help' describes each command's options.")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every option's help; descriptions printed as written."""


def _backend_name(text):
    choices = ["all", "auto", *_backends.KNOWN]
    if text not in choices:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from "
                                         f"{', '.join(choices)}")
    return text


def _folder(text):
    if not datasets.is_dataset(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a dataset folder in the shared "
                                         f"format (corpus.npy, queries_*.npy, qrels_*.jsonl)")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nudgefast", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")
    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="Tune the packaged real dataset; show test accuracy before and after, "
                            "and searches that got better.",
                       description="Tune the packaged real dataset (pkg-search-6k) with NUDGE-M "
                                   "and NUDGE-N on the fastest backend; print test recall/NDCG "
                                   "before and after, gamma, fit time and example searches.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", metavar="DIR", type=_folder,
                     help="a dataset folder in the shared format instead of the packaged one")
    src.add_argument("--synthetic", action="store_true",
                     help="the seeded synthetic task instead of the packaged real dataset")
    p.add_argument("--all-backends", action="store_true",
                   help="fit on every available backend and print the verification table")
    p.add_argument("--backend", default="all", type=_backend_name,
                   help="one backend; 'all': the fastest (with --all-backends: every one)")
    p.add_argument("--k", type=_positive_int, default=10, help="cut-off of recall and NDCG")
    p.add_argument("--repeat", type=_positive_int, default=3,
                   help="timed fits per method after one warm-up")
    p.set_defaults(func=demo)
    p = sub.add_parser("bench", formatter_class=_Formatter,
                       help="Speed against N of every backend and peer, or (--accuracy) the "
                            "accuracy table on the real datasets.",
                       description="Fit time, top-k throughput and peak memory against N for "
                                   "every backend and peer (nudge-ft, FAISS), side by side in "
                                   "one run: report.md and PNG plots. The defaults take about a "
                                   "minute on 2 cores; ask for large sizes with --sizes.")
    p.add_argument("--sizes", default=DEFAULT_BENCH_SIZES, type=_sizes,
                   help="comma-separated corpus sizes N for the synthetic workload")
    p.add_argument("--d", type=_positive_int, default=384, help="embedding dimension")
    p.add_argument("--train", type=_positive_int, default=5000, help="train queries")
    p.add_argument("--val", type=_positive_int, default=1000, help="validation queries")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--repeat", type=_positive_int, default=3, help="timed runs after one warm-up")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the cpp/numba backends and FAISS (None: all cores)")
    p.add_argument("--backends", default="compiled", type=_backend_list,
                   help="comma-separated backends; 'compiled': every available one but the "
                        "numpy reference (slow: ~10 s a NUDGE-N fit); 'all': numpy too")
    p.add_argument("--peers", default="nudge-ft,faiss", help="comma-separated peers to run")
    p.add_argument("--packaged", action="store_true", help="also the packaged dataset")
    p.add_argument("--memmap", action="store_true",
                   help="write synthetic corpora to a temp .npy and stream them as memmaps")
    p.add_argument("--out", default="bench/out", help="folder for report.md and the plots")
    p.add_argument("--accuracy", action="store_true",
                   help="instead of speed: test recall/NDCG/MRR of no fine-tuning, NUDGE-M/N "
                        "(native, compat, nudge-ft) and the linear adapters on every dataset")
    p.add_argument("--dataset", action="append", metavar="DIR", type=_folder,
                   help="with --accuracy: a dataset folder (repeatable; default: every one "
                        "under ../shared/data or $NUDGEFAST_DATA)")
    p.add_argument("--no-adapters", action="store_true",
                   help="with --accuracy: leave out the adapter baselines")
    p.set_defaults(func=bench)
    p = sub.add_parser("backends", help="Which backends are available here; for the others, why not and the fix.",
                       description="Every backend, whether it is available here, and for the "
                                   "others why not and how to fix it.")
    p.set_defaults(func=show_backends)
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, RuntimeError) as exc:
        # A missing dataset or backend is the user's to fix: one line, not a traceback.
        print(f"nudgefast {args.command}: error: {exc}", file=sys.stderr)
        return 2
