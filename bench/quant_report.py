"""Quantized corpora, one run, side by side with the peers (issue 11 §4-§5): the passes over a
synthetic float32 ``.npy`` memmap and its int8 / ubinary codes (also memmaps), then recall and
NDCG on the shared real data, then NUDGE-N fitted on float, int8 and binary codes.

    python bench/quant_report.py --out bench/results/<date>_<machine>_quantized
    python bench/quant_report.py --rows 200000 --repeat 1 --out /tmp/q   # a quick look

Peers: FAISS ``IndexFlatIP`` (float32), ``IndexScalarQuantizer(QT_8bit)`` (its own int8 codes,
trained on the same calibration rows) and ``IndexBinaryFlat`` (our ubinary codes);
Sentence-Transformers' ``semantic_search_faiss`` (uint8 codes in an IndexFlatIP, ubinary in an
IndexBinaryFlat) and usearch's exact search (int8 / ubinary, queries quantized as ST's
``semantic_search_usearch`` does) on the same codes, when installed. Every timing is the median of ``--repeat`` runs after one warm-up, on this machine's
cores; ratios are within this run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

import nudgefast as nf
from nudgefast import benchmark, datasets

log = logging.getLogger("quant_report")
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data"


def _recall(got, want):
    """Mean fraction of each query's reference top-k found in ``got``'s first k."""
    k = want.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(got, want)]))


def _codes_memmap(x, precision, calibration, folder):
    """``x`` quantized into a .npy memmap under ``folder``; the QuantizedCorpus maps it
    read-only."""
    width = x.shape[1] if precision in ("int8", "uint8") else (x.shape[1] + 7) // 8
    dtype = np.int8 if precision in ("int8", "binary") else np.uint8
    path = Path(folder) / f"codes_{precision}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(x.shape[0], width))
    qc = nf.quantize(x, precision, calibration=calibration, out=out)
    out.flush()
    del out
    return nf.QuantizedCorpus(np.load(path, mmap_mode="r"), precision, x.shape[1], qc.ranges)


# ---- peers -------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(os.cpu_count())
    return faiss


def faiss_sq8(x, calibration, queries, k):
    faiss = _faiss()
    index = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_8bit,
                                       faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(calibration, np.float32))
    for s in range(0, x.shape[0], 200_000):
        index.add(np.ascontiguousarray(x[s:s + 200_000], np.float32))
    return lambda: index.search(queries, k)[1]


def faiss_binary(codes, d, queries, k):
    faiss = _faiss()
    index = faiss.IndexBinaryFlat(d)
    for s in range(0, codes.shape[0], 500_000):
        index.add(np.ascontiguousarray(codes[s:s + 500_000]).view(np.uint8))
    q = np.packbits(queries > 0, axis=1)
    return lambda: index.search(q, k)[1]


def st_faiss(codes, precision, ranges, queries, k, rescore):
    from sentence_transformers.util.quantization import semantic_search_faiss
    _, _, index = semantic_search_faiss(queries[:1], corpus_embeddings=np.asarray(codes),
                                        corpus_precision=precision, top_k=k, ranges=ranges,
                                        rescore=False, output_index=True)

    def run():
        hits, _ = semantic_search_faiss(queries, corpus_index=index, corpus_precision=precision,
                                        top_k=k, ranges=ranges, rescore=rescore is not None,
                                        rescore_multiplier=rescore or 1)
        return np.array([[h["corpus_id"] for h in row] for row in hits])
    return run


def usearch_exact(codes, precision, ranges, queries, k):
    """usearch's exact (brute-force) search over the same codes, the queries quantized as
    Sentence-Transformers' ``semantic_search_usearch`` quantizes them (its index would also
    build an HNSW graph, which an exact pass does not need)."""
    from usearch.index import MetricKind, search
    if precision == "int8":
        q = nf.quantize(queries, "int8", ranges).codes
        metric = MetricKind.IP
    else:
        q = np.packbits(queries > 0, axis=1)
        metric = MetricKind.Hamming
    data = np.asarray(codes).view(np.int8 if precision == "int8" else np.uint8)

    def run():  # 100 queries a call: usearch's exact search holds a queries x N distance matrix
        return np.vstack([search(data, q[s:s + 100], k, metric, exact=True,
                                 threads=os.cpu_count()).keys for s in range(0, len(q), 100)])
    return run


# ---- speed ---------------------------------------------------------------------------------


def speed(rows, d, n_q, k, repeat, folder, partial=None):
    t0 = time.perf_counter()
    work = benchmark.synthetic_workload(rows, d, n_train=1, n_val=n_q, memmap_dir=folder)
    x, q = work.corpus, np.ascontiguousarray(work.val.embeddings, np.float32)
    cal = np.asarray(x[np.sort(np.random.default_rng(1).choice(rows, min(rows, 20_000),
                                                                replace=False))])
    i8 = _codes_memmap(x, "int8", cal, folder)
    ub = _codes_memmap(x, "ubinary", None, folder)
    log.info("speed: corpus and codes written in %.1f s", time.perf_counter() - t0)
    # (what, who, factory): a factory builds its index only when its turn comes, and the
    # index is dropped after it is timed, so at most one peer's copy of the corpus is held.
    runs = [
        ("float32", "nudgefast cpp", lambda: lambda: nf.search(q, x, k, backend="cpp").indices),
        ("int8, float32 queries (exact)", "nudgefast cpp",
         lambda: lambda: nf.search(q, i8, k, backend="cpp").indices),
        ("int8, int8 queries", "nudgefast cpp",
         lambda: lambda: nf.search(q, i8, k, backend="cpp", query_precision="int8").indices),
        ("int8, int8 queries, rescore x4", "nudgefast cpp",
         lambda: lambda: nf.search(q, i8, k, backend="cpp", query_precision="int8",
                                   rescore_multiplier=4).indices),
        ("binary", "nudgefast cpp", lambda: lambda: nf.search(q, ub, k, backend="cpp").indices),
        ("binary, rescore x4 (float rows)", "nudgefast cpp",
         lambda: lambda: nf.search(q, ub, k, backend="cpp", rescore_multiplier=4,
                                   rescore_corpus=x).indices),
    ]
    if _faiss() is not None:
        def flat():
            fn = benchmark.faiss_search(x, q, k)
            return lambda: fn()[1]
        runs += [("float32", "FAISS IndexFlatIP", flat),
                 ("int8", "FAISS SQ8 (QT_8bit)", lambda: faiss_sq8(x, cal, q, k)),
                 ("binary", "FAISS IndexBinaryFlat", lambda: faiss_binary(ub.codes, d, q, k))]
        try:
            import sentence_transformers  # noqa: F401
            runs += [("uint8 codes in a float index", "ST semantic_search_faiss",
                      lambda: st_faiss(nf.quantize(x, "uint8", i8.ranges).codes, "uint8",
                                       i8.ranges.to_array(), q, k, None)),
                     ("uint8, rescore x4", "ST semantic_search_faiss",
                      lambda: st_faiss(nf.quantize(x, "uint8", i8.ranges).codes, "uint8",
                                       i8.ranges.to_array(), q, k, 4)),
                     ("binary", "ST semantic_search_faiss",
                      lambda: st_faiss(ub.codes, "ubinary", None, q, k, None))]
        except ImportError as exc:
            log.warning("sentence-transformers peer skipped: %s", exc)
    try:
        import usearch  # noqa: F401
        runs += [("int8", "usearch exact (ST's int8 queries)",
                  lambda: usearch_exact(i8.codes, "int8", i8.ranges, q, k)),
                 ("binary", "usearch exact", lambda: usearch_exact(ub.codes, "ubinary", None, q, k))]
    except ImportError as exc:
        log.warning("usearch peer skipped: %s", exc)
    out, want = [], None
    for what, who, factory in runs:
        log.info("speed: %s / %s", what, who)
        try:
            fn = factory()
            t = benchmark.measure(fn, repeat=repeat, warmup=1)
        except Exception as exc:  # a peer that fails here is reported, not fatal
            out.append({"what": what, "who": who, "error": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            fn = None  # the peer's index goes before the next one is built
        got = np.asarray(t.result)
        if want is None:
            want = got
        out.append({"what": what, "who": who, "median_s": t.median, "min_s": t.spread[0],
                    "max_s": t.spread[1], "recall_vs_float32": _recall(got, want)})
        t = None
        if partial is not None:
            partial.write_text(json.dumps(out, indent=1))
    return out


# ---- accuracy ------------------------------------------------------------------------------


def accuracy(path, k=10):
    ds = datasets.load(path)
    x = ds.corpus
    q = np.ascontiguousarray(ds.test.embeddings, np.float32)
    cal = x  # the corpus's own ranges (ST's default when no calibration set is given)
    i8 = nf.quantize(x, "int8", calibration=cal)
    ub = nf.quantize(x, "ubinary")
    xf = np.asarray(x, np.float32)
    variants = [
        ("float32", lambda: nf.search(q, x, k)),
        ("int8, float32 queries (exact)", lambda: nf.search(q, i8, k)),
        ("int8, int8 queries", lambda: nf.search(q, i8, k, query_precision="int8")),
        ("int8, int8 queries, rescore x4",
         lambda: nf.search(q, i8, k, query_precision="int8", rescore_multiplier=4)),
        ("binary", lambda: nf.search(q, ub, k)),
        ("binary, rescore x4 (sign vectors)", lambda: nf.search(q, ub, k, rescore_multiplier=4)),
        ("binary, rescore x4 (float rows)",
         lambda: nf.search(q, ub, k, rescore_multiplier=4, rescore_corpus=xf)),
        ("binary, rescore x10 (float rows)",
         lambda: nf.search(q, ub, k, rescore_multiplier=10, rescore_corpus=xf)),
    ]
    rows, want = [], None
    for name, fn in variants:
        got = np.asarray(fn().indices)
        want = got if want is None else want
        m = nf.metrics(got, ds.test, k)
        rows.append({"dataset": ds.name, "what": name, "recall_vs_float32": _recall(got, want),
                     "ndcg@10": m["ndcg@10"], "recall@10": m["recall@10"]})
    if _faiss() is not None:
        got = faiss_sq8(x, cal, q, k)()
        m = nf.metrics(got, ds.test, k)
        rows.append({"dataset": ds.name, "what": "int8, FAISS SQ8 (QT_8bit)",
                     "recall_vs_float32": _recall(got, want), "ndcg@10": m["ndcg@10"],
                     "recall@10": m["recall@10"]})
    return rows


def nudge_accuracy(path, k=10):
    ds = datasets.load(path)
    x = ds.corpus
    q = np.ascontiguousarray(ds.test.embeddings, np.float32)
    corpora = [("float32", x, {}), ("int8", nf.quantize(x, "int8", calibration=x), {}),
               ("binary, rescore x4 (sign vectors)", nf.quantize(x, "ubinary"),
                {"rescore_multiplier": 4})]
    rows = []
    for name, corpus, kw in corpora:
        base = nf.metrics(np.asarray(nf.search(q, corpus, k, **kw).indices), ds.test, k)
        t0 = time.perf_counter()
        res = nf.NudgeN().fit(corpus, ds.train, ds.dev)
        fit_s = time.perf_counter() - t0
        tuned = nf.metrics(np.asarray(nf.search(q, corpus, k, res, **kw).indices), ds.test, k)
        rows.append({"dataset": ds.name, "corpus": name, "ndcg@10": base["ndcg@10"],
                     "ndcg@10 NUDGE-N": tuned["ndcg@10"], "gamma": res.gamma, "fit_s": fit_s})
    return rows


# ---- report --------------------------------------------------------------------------------


def _table(rows, cols):
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=SHARED)
    ap.add_argument("--skip", default="", help="comma list of: speed,accuracy,nudge")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    info = benchmark.device_info()
    from nudgefast._backends import cpp_backend
    info["cpp_path"] = cpp_backend.describe()
    result = {"info": info, "args": {k: str(v) for k, v in vars(args).items()}}
    found = datasets.find(args.data) if args.data.is_dir() else []
    if "speed" not in skip:
        with tempfile.TemporaryDirectory(dir=os.environ.get("NUDGEFAST_BENCH_TMP")) as tmp:
            result["speed"] = speed(args.rows, args.d, args.queries, args.k, args.repeat, tmp,
                                    args.out / "speed_partial.json")
    if "accuracy" not in skip:
        result["accuracy"] = [r for p in found for r in accuracy(p, args.k)]
    if "nudge" not in skip:
        result["nudge"] = [r for p in found for r in nudge_accuracy(p, args.k)]
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    md = [f"# Quantized corpora: passes, recall, NUDGE ({datetime.date.today()})\n",
          f"command: `python bench/quant_report.py {' '.join(argv or __import__('sys').argv[1:])}`\n",
          f"machine: {info['cpu']}, {info['cores']} cores, commit {info['commit']}; "
          f"cpp {info['cpp_path']}\n"]
    if "speed" in result:
        base = next((r["median_s"] for r in result["speed"] if r.get("what") == "float32"
                     and r["who"] == "nudgefast cpp"), None)
        for r in result["speed"]:
            if "median_s" in r and base:
                r["float32 pass / this"] = base / r["median_s"]
        md.append(f"\n## Passes: {args.rows:,} x {args.d} memmap, {args.queries} queries, "
                  f"k = {args.k}\n\n")
        md.append(_table(result["speed"], ["what", "who", "median_s", "min_s", "max_s",
                                           "float32 pass / this", "recall_vs_float32", "error"]))
    if result.get("accuracy"):
        md.append("\n## Recall and NDCG on the real data (test queries, k = 10)\n\n")
        md.append(_table(result["accuracy"], ["dataset", "what", "recall_vs_float32",
                                              "recall@10", "ndcg@10"]))
    if result.get("nudge"):
        md.append("\n## NUDGE-N on quantized corpora (test NDCG@10)\n\n")
        md.append(_table(result["nudge"], ["dataset", "corpus", "ndcg@10", "ndcg@10 NUDGE-N",
                                           "gamma", "fit_s"]))
    (args.out / "report.md").write_text("".join(md))
    print((args.out / "report.md").read_text())


if __name__ == "__main__":
    main()
