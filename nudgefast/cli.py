"""Console entry points (``nudgefast demo | bench | backends | tune | update | apply``). The only
module that prints."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
import warnings

import numpy as np

from . import _backends, _validate, datasets
from .handoff import Delta, _replace_atomically
from .metrics import metrics
from .nudge import NudgeM, NudgeN
from .queryset import QuerySet, json_lines, read_qrels
from .search import search
from .tuner import Tuner


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
    if args.accuracy and args.tuner:
        raise ValueError("--accuracy and --tuner are two reports; run them one at a time")
    if args.accuracy:
        return _bench_accuracy(args, out)
    if args.tuner:
        return _bench_tuner(args, out)
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


def _bench_tuner(args, out) -> int:
    import shutil

    from . import accuracy, benchmark, tuner_bench

    backend = args.backends if args.backends not in ("all", "compiled") else "auto"
    sizes = [int(float(x)) for x in args.sizes.split(",") if x]
    scratch = benchmark.temp_dir() if args.memmap else None
    info = benchmark.device_info(args.threads)
    rows = []
    try:
        for n in sizes:
            print(f"tuner at N={n:,} ...", flush=True)
            rows += tuner_bench.scale_rows(n, args.d, args.train, args.val, backend=backend,
                                           memmap_dir=scratch, n_batches=args.batches)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if "nudge-ft" in args.peers.split(","):
        print(f"LlamaIndex-style refits (nudge-ft) at N={args.reference_size:,} ...", flush=True)
        rows += tuner_bench.reference_rows(args.reference_size, args.d, args.train, args.val,
                                           backend=backend)
    print("real data ...", flush=True)
    rows += tuner_bench.real_rows(accuracy.dataset_folders(args.dataset), backend=backend)
    cmd = "nudgefast " + " ".join(args.argv)
    text = tuner_bench.markdown(rows, info, cmd)
    report = out / "report.md"
    report.write_text(text)
    print(text)
    print(f"\nwrote {report}")
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
        detail = info.reason
        if info.available and info.name == "cpp":  # which instruction-set path the kernels take
            detail += "; " + _backends.get("cpp").describe()
        print(f"{info.name:6s} {'yes' if info.available else 'no ':3s}  {detail}")
    return 0


# ----------------------------------------------------------------------------------------
# tune / update / apply: an indexing pipeline's steps, with a tuner state and deltas on disk

#: Errors the pipeline commands report as one line, exit status 2: bad arguments, unreadable or
#: mismatched files (the library raises ValueError / TypeError naming the argument).
_USER_ERRORS = (ValueError, TypeError, OSError, EOFError, ImportError)

FEEDBACK_FORMAT = """\
--feedback FILE: JSON lines, one feedback query per line (blank lines skipped):
  {"embedding": [d floats], "answers": [record positions]}
  {"embedding": [d floats], "answer_ids": [record ids]}
exactly one of "answers" (ints, 0 <= position < the state's record count) and "answer_ids"
(record ids as the state has them: strings, or ints when the ids file was all integers),
non-empty; other fields (e.g. "qid", "text") are ignored. Answers name records that exist
before this update (feedback is applied first). Each line becomes a feedback id, numbered
on from the last one (the fit's train queries are 0 .. n-1): the ids --remove-feedback
takes, printed after the update."""


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _input_file(flag, path):
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ValueError(f"{flag}: {path!r} {what}; give an existing file")
    return path


def _output_file(flag, path):
    """Checked before any work: a missing folder should not cost a fit."""
    if path is None:
        return None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: folder {folder!r} does not exist; create it first")
    if os.path.isdir(path):
        raise ValueError(f"{flag}: {path!r} is a folder; give a file name")
    return path


def _npy(flag, path):
    """A .npy file memory-mapped read-only (never read whole here)."""
    _input_file(flag, path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{flag}: {path!r} is not a .npy file (no NumPy header); write it with "
                         f"np.save")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{flag}: {path!r} is not a readable .npy file ({type(exc).__name__}: "
                         f"{exc})") from exc
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise ValueError(f"{flag}: {path!r} is an .npz archive; give a .npy array")
    return arr


def _corpus(flag, path):
    arr = _npy(flag, path)
    try:
        return _validate.as_corpus("corpus", arr)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{flag}: {path!r}: {exc}") from exc


def _queries(flag, path, d):
    arr = _npy(flag, path)
    if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[1] != d:
        raise ValueError(f"{flag}: {path!r} holds {arr.dtype} of shape {arr.shape}; expected "
                         f"float query embeddings of shape (n, {d}) (the corpus d)")
    return np.asarray(arr, np.float32)


def _json_lines(flag, path):
    _input_file(flag, path)
    return json_lines(path, flag)


def _read_qrels(flag, path):
    _input_file(flag, path)
    return read_qrels(path, flag)


def _query_set(flag, path, qrels_flag, qrels_path, d) -> QuerySet:
    emb = _queries(flag, path, d)
    answers, relevance = _read_qrels(qrels_flag, qrels_path)
    if len(answers) != emb.shape[0]:
        raise ValueError(f"{qrels_flag}: {qrels_path!r} has {len(answers)} query lines but "
                         f"{path!r} has {emb.shape[0]} rows; one line per row, in row order")
    return QuerySet(emb, answers, relevance)


def _read_ids(flag, path, n=None, kind=None):
    """One id per line. kind None: ints when every line is an integer (FAISS needs ints), else
    strings; "i" / "U": as the state's ids are. ``n``: the number of lines expected."""
    _input_file(flag, path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    if n is not None and len(lines) != n:
        raise ValueError(f"{flag}: {path!r} has {len(lines)} lines for {n} records; one id per "
                         f"record, in row order")
    if kind is not None and kind not in "iu":
        return np.array(lines, dtype=str)
    try:
        return np.array([int(x) for x in lines], np.int64)
    except OverflowError:
        if kind is None:
            return np.array(lines, dtype=str)  # beyond int64: strings, as non-numeric ids
        raise ValueError(f"{flag}: {path!r} holds an integer beyond int64; the state's record "
                         f"ids are int64") from None
    except ValueError:
        if kind is None:
            return np.array(lines, dtype=str)
        no = next(i for i, x in enumerate(lines, 1) if not x.strip().lstrip("+-").isdigit())
        raise ValueError(f"{flag}: {path!r} line {no}: {lines[no - 1]!r} is not an integer; "
                         f"the state's record ids are integers") from None


def _json_value(value):
    """Summaries as strict JSON: NumPy scalars and arrays as numbers and lists, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _print_json(obj):
    print(json.dumps(_json_value(obj), allow_nan=False))


@contextlib.contextmanager
def _warnings_as_lines(command):
    """Library warnings (e.g. validation queries without answers, skipped) as one stderr
    line each, not Python's two-line form with a source path."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                print(f"nudgefast {command}: warning: {_one_line(w.message)}", file=sys.stderr)


def _counts(delta):
    return {"rows": int(delta.indices.size), "tuned": int(delta.tuned.sum()),
            "reverted": int(delta.reverted.sum()), "new": int(delta.new.sum()),
            "deleted": int(delta.deleted.size)}


def _rows_text(delta):
    c = _counts(delta)
    return (f"{c['rows']} rows to write ({c['tuned']} tuned, {c['reverted']} reverted, "
            f"{c['new']} new), {c['deleted']} deleted")


def _ranges(values):
    """[3, 4, 5, 9] -> '3-5, 9'."""
    values = sorted(int(v) for v in values)
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(v) if v == start else f"{start}-{v}")
            start = None
    return ", ".join(out)


def _save_together(outputs):
    """Write every ``(path, flag, save)`` (path None: skipped) or none: each into a temporary
    file beside its path first, then all renamed; on any failure the temporaries go and the
    old files stay. An error names the flag and the path."""
    written = []
    try:
        for path, flag, save in outputs:
            if path is None:
                continue
            tmp = f"{path}.part-{os.getpid()}"
            try:
                save(tmp)
            except OSError as exc:
                raise OSError(f"{flag}: cannot write {path!r} ({exc.strerror or exc})") from exc
            written.append((tmp, path))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        raise


def _tune_inputs(args):
    """(corpus memmap, train QuerySet, validation QuerySet, ids or None, corpus path)."""
    files = {"--train": args.train, "--train-qrels": args.train_qrels, "--val": args.val,
             "--val-qrels": args.val_qrels, "--ids": args.ids}
    if args.data is not None:
        given = [flag for flag, value in files.items() if value is not None]
        if given:
            raise ValueError(f"{given[0]}: not with --data (the folder names every file); give "
                             f"--corpus and the query files instead of --data")
        folder, split = args.data, args.val_split
        if not os.path.isdir(folder):
            raise ValueError(f"--data: {folder!r} is not a folder; give a dataset folder in the "
                             f"shared format (corpus.npy, queries_<split>.npy, "
                             f"qrels_<split>.jsonl)")
        need = ["corpus.npy", "queries_train.npy", "qrels_train.jsonl", f"queries_{split}.npy",
                f"qrels_{split}.jsonl"]
        missing = [f for f in need if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            only_split = set(missing) <= set(need[3:])
            raise ValueError(f"--data: {folder!r} is not a dataset folder in the shared format "
                             f"(missing {', '.join(missing)})"
                             + (f"; is --val-split {split} a split there?" if only_split
                                else ""))
        path = lambda name: os.path.join(folder, name)
        corpus_path = path("corpus.npy")
        corpus = _corpus("--data", corpus_path)
        d = corpus.shape[1]
        train = _query_set("--data", path("queries_train.npy"), "--data",
                           path("qrels_train.jsonl"), d)
        val = _query_set("--data", path(f"queries_{split}.npy"), "--data",
                         path(f"qrels_{split}.jsonl"), d)
        ids_path = path("corpus_ids.txt")
        ids = (_read_ids("--data", ids_path, corpus.shape[0]) if os.path.isfile(ids_path)
               else None)
        return corpus, train, val, ids, corpus_path
    missing = [flag for flag, value in files.items() if value is None and flag != "--ids"]
    if missing:
        raise ValueError(f"{', '.join(missing)}: required with --corpus (or give --data DIR)")
    corpus = _corpus("--corpus", args.corpus)
    d = corpus.shape[1]
    train = _query_set("--train", args.train, "--train-qrels", args.train_qrels, d)
    val = _query_set("--val", args.val, "--val-qrels", args.val_qrels, d)
    ids = None if args.ids is None else _read_ids("--ids", args.ids, corpus.shape[0])
    return corpus, train, val, ids, args.corpus


def _estimator(args):
    progress = False if args.no_progress else None  # None: bars only on a terminal
    common = dict(backend=args.backend, n_threads=args.threads, progress=progress)
    if args.method == "n":
        return NudgeN(k_val=1 if args.k_val is None else args.k_val, **common)
    if args.k_val is not None:
        raise ValueError("--k-val: NUDGE-M has no k_val (it scores validation pairs); leave it "
                         "out, or use --method n")
    return NudgeM(**common)


def tune(args) -> int:
    t0 = time.perf_counter()
    if args.out is None and args.state is None:
        raise ValueError("--out / --state: give at least one (the delta to apply, the state "
                         "that 'nudgefast update' continues from)")
    if args.out and args.state and os.path.abspath(args.out) == os.path.abspath(args.state):
        raise ValueError(f"--out / --state: both name {args.out!r}; give two files")
    _output_file("--out", args.out)
    _output_file("--state", args.state)
    corpus, train, val, ids, corpus_path = _tune_inputs(args)
    tuner = Tuner(_estimator(args), margin=args.margin)
    with _warnings_as_lines("tune"):
        delta = tuner.fit(corpus, train, val, ids=ids)
    _save_together(((args.out, "--out", delta.save), (args.state, "--state", tuner.save)))
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"command": "tune", **delta.summary, "variant": delta.variant,
                     "n_records": delta.n_records, "rows": int(delta.indices.size),
                     "corpus": os.path.abspath(corpus_path), "ids": ids is not None,
                     "out": args.out and os.path.abspath(args.out),
                     "state": args.state and os.path.abspath(args.state),
                     "total_seconds": seconds})
        return 0
    n, d = corpus.shape
    print(f"tuned {delta.variant} on {corpus_path}: {n} records (d={d}, {corpus.dtype}), "
          f"{len(train)} train / {len(val)} validation queries")
    print(f"gamma {delta.gamma:.6g}, {int(delta.summary['touched'])} touched rows; fit "
          f"{delta.summary['seconds']:.2f} s, {seconds:.2f} s in all")
    if args.out:
        print(f"delta ({delta.indices.size} rows) -> {args.out} "
              f"(nudgefast apply {args.out} --to ...)")
    if args.state:
        print(f"state -> {args.state} (nudgefast update --state {args.state} ...)")
    return 0


def _update_operations(args, tuner):
    """(flag, call) per operation in the documented order, every input file read and checked
    before the first one runs."""
    d, ids = tuner.d, tuner.ids
    kind = None if ids is None else ids.dtype.kind
    ops = []
    if args.feedback:
        q, answers = _read_feedback("--feedback", args.feedback, tuner)
        ops.append(("--feedback", lambda: tuner.add_feedback(q, answers)))
    if args.feedback_queries:
        fb = _query_set("--feedback-queries", args.feedback_queries, "--feedback-qrels",
                        args.feedback_qrels, d)
        ops.append(("--feedback-queries", lambda: tuner.add_feedback(fb.embeddings,
                                                                      fb.answers)))
    if args.remove_feedback:
        ops.append(("--remove-feedback", lambda: tuner.remove_feedback(args.remove_feedback)))
    if args.add_validation:
        vq = _query_set("--add-validation", args.add_validation, "--add-validation-qrels",
                        args.add_validation_qrels, d)
        ops.append(("--add-validation", lambda: tuner.add_validation(vq.embeddings,
                                                                      vq.answers)))
    if args.add_records:
        rows = _npy("--add-records", args.add_records)
        if rows.ndim != 2 or rows.shape[1] != d:
            raise ValueError(f"--add-records: {args.add_records!r} holds shape {rows.shape}; "
                             f"expected (m, {d}) rows (the corpus d)")
        new_ids = (None if args.record_ids is None else
                   _read_ids("--record-ids", args.record_ids, rows.shape[0], kind or "U"))
        ops.append(("--add-records", lambda: tuner.add_records(rows, ids=new_ids)))
    if args.delete_records:
        ops.append(("--delete-records", lambda: tuner.delete_records(args.delete_records)))
    if args.delete_ids:
        want = args.delete_ids
        if kind is not None and kind in "iu":
            bad = [x for x in want if not x.strip().lstrip("+-").isdigit()]
            if bad:
                raise ValueError(f"--delete-ids: {bad[0]!r} is not an integer; the state's "
                                 f"record ids are integers")
            want = [int(x) for x in want]
        ops.append(("--delete-ids", lambda: tuner.delete_records(ids=want)))
    return ops


def _read_feedback(flag, path, tuner):
    """(embeddings (m, d) float32, answer position lists) of a feedback JSON-lines file
    (FEEDBACK_FORMAT), checked line by line; ids are resolved in one pass over the tuner's."""
    d, n_records, ids = tuner.d, tuner.n_records, tuner.ids
    emb, answers, by_id = [], [], []  # by_id: (line number, answer list index, the ids)
    want_int = ids is not None and ids.dtype.kind in "iu"
    for no, rec in _json_lines(flag, path):
        where = f"{flag}: {path!r} line {no}"
        vec = rec.get("embedding")
        if not isinstance(vec, list):
            got = "nothing" if "embedding" not in rec else type(vec).__name__
            raise ValueError(f'{where}: "embedding" must be a list of {d} numbers, got {got}')
        if len(vec) != d:
            raise ValueError(f'{where}: "embedding" has {len(vec)} values; the corpus has d={d}')
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vec) \
                or not np.isfinite(np.asarray(vec, np.float64)).all():
            raise ValueError(f'{where}: "embedding" holds a value that is not a finite number')
        if ("answers" in rec) == ("answer_ids" in rec):
            raise ValueError(f'{where}: give "answers" (record positions) or "answer_ids" '
                             f'(record ids), exactly one')
        key = "answers" if "answers" in rec else "answer_ids"
        given = rec[key]
        if not isinstance(given, list) or not given:
            raise ValueError(f'{where}: "{key}" must be a non-empty list, got '
                             f'{_short(json.dumps(given), 40)}')
        if key == "answers":
            bad = [x for x in given if not (_is_int(x) and 0 <= x < n_records)]
            if bad:
                raise ValueError(f'{where}: "answers": {json.dumps(bad[0])} is not a record '
                                 f'position (an int, 0 <= position < {n_records})')
        else:
            if ids is None:
                raise ValueError(f'{where}: "answer_ids" needs record ids and this state has '
                                 f'none (tune with --ids, or --data with corpus_ids.txt); give '
                                 f'"answers" (record positions)')
            typed = [_is_int(x) if want_int else isinstance(x, str) for x in given]
            if not all(typed):
                x = given[typed.index(False)]
                kind = "integers" if want_int else "strings"
                raise ValueError(f'{where}: "answer_ids": {json.dumps(x)} is not a record id '
                                 f"(the state's record ids are {kind})")
            by_id.append((no, len(answers), given))
        emb.append(vec)
        answers.append(given)
    if not emb:
        raise ValueError(f"{flag}: {path!r} has no feedback lines; one JSON object per line "
                         f"(nudgefast update --help)")
    if by_id:
        flat = [x for _, _, given in by_id for x in given]
        pos = tuner.positions_of(np.array(flat, np.int64 if want_int else str), strict=False)
        at = 0
        for no, i, given in by_id:
            got = pos[at:at + len(given)]
            at += len(given)
            if (got < 0).any():
                first = int(np.argmax(got < 0))
                x = given[first]
                what = "is not a record id" if got[first] == -1 else \
                    'names more than one record; give "answers" (record positions)'
                raise ValueError(f'{flag}: {path!r} line {no}: "answer_ids": {json.dumps(x)} '
                                 f'{what}')
            answers[i] = got.tolist()
    with np.errstate(over="ignore"):
        emb = np.array(emb, np.float32)
    if not np.isfinite(emb).all():
        no = int(np.flatnonzero(~np.isfinite(emb).all(axis=1))[0])
        raise ValueError(f"{flag}: {path!r}: feedback {no + 1} (in file order) has an "
                         f'"embedding" value beyond the float32 range')
    return emb, answers


def update(args) -> int:
    t0 = time.perf_counter()
    for a, b in (("feedback_queries", "feedback_qrels"),
                 ("add_validation", "add_validation_qrels")):
        if (getattr(args, a) is None) != (getattr(args, b) is None):
            flags = "--" + a.replace("_", "-"), "--" + b.replace("_", "-")
            raise ValueError(f"{flags[0]} / {flags[1]}: give both (the embeddings and their "
                             f"qrels) or neither")
    if args.record_ids is not None and args.add_records is None:
        raise ValueError("--record-ids: only with --add-records (the ids of the new rows)")
    if not any((args.feedback, args.feedback_queries, args.remove_feedback,
                args.add_validation, args.add_records, args.delete_records, args.delete_ids)):
        raise ValueError("give at least one operation: --feedback, --feedback-queries, "
                         "--remove-feedback, --add-validation, --add-records, "
                         "--delete-records or --delete-ids")
    _input_file("--state", args.state)
    state_out = _output_file("--state-out", args.state_out or args.state)
    _output_file("--out", args.out)
    if args.out and os.path.abspath(args.out) == os.path.abspath(state_out):
        raise ValueError(f"--out: {args.out!r} is also where the state goes; give another file")
    corpus = None if args.corpus is None else _corpus("--corpus", args.corpus)
    try:
        tuner = Tuner.load(args.state, corpus, backend=args.backend, n_threads=args.threads,
                           progress=False if args.no_progress else None)
    except ValueError as exc:
        raise ValueError(str(exc).replace("pass the corpus", "give --corpus X.npy")) from exc
    gamma_before = tuner.gamma
    ops = _update_operations(args, tuner)
    deltas = []
    with _warnings_as_lines("update"):
        for flag, op in ops:
            try:
                deltas.append(op())
            except (ValueError, TypeError) as exc:
                # Nothing is written: the state file stays as it was before this update.
                raise ValueError(f"{flag}: {exc}") from exc
    combined = Delta.combine(deltas)
    # Both or neither: a state saved without its delta would lose the rows to serve.
    _save_together(((args.out, "--out", combined.save), (state_out, "--state", tuner.save)))
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"command": "update", "state": os.path.abspath(state_out),
                     "out": args.out and os.path.abspath(args.out), "variant": combined.variant,
                     "gamma": combined.gamma, "previous_gamma": gamma_before,
                     "touched": int(tuner.touched.size), "n_records": tuner.n_records,
                     **_counts(combined), "total_seconds": seconds,
                     "operations": [{"flag": flag, **_counts(dl), **dl.summary}
                                    for (flag, _), dl in zip(ops, deltas)]})
        return 0
    print(f"{args.state}: {tuner.variant}, {len(ops)} operation{'s' * (len(ops) > 1)}")
    for (flag, _), dl in zip(ops, deltas):
        s = dl.summary
        extra = ""
        if s.get("feedback_ids"):
            verb = "removed" if s["op"] == "remove_feedback" else "feedback ids"
            extra = f" [{verb} {_ranges(s['feedback_ids'])}]"
        print(f"  {flag}: {s['op']}{extra}: {_rows_text(dl)}; gamma {dl.previous_gamma:.6g} -> "
              f"{dl.gamma:.6g}; {1e3 * s['seconds']:.1f} ms")
    print(f"delta: {_rows_text(combined)}; gamma {gamma_before:.6g} -> {combined.gamma:.6g}, "
          f"{tuner.touched.size} touched rows"
          + (f" -> {args.out}" if args.out else " (not written: no --out)"))
    print(f"state -> {state_out} ({seconds:.2f} s in all)")
    return 0


_FAISS_EXTENSIONS = (".faiss", ".index")


def apply(args) -> int:
    t0 = time.perf_counter()
    _input_file("DELTA", args.delta)
    target = args.to
    ext = os.path.splitext(target)[1].lower()
    if ext not in (".npy", ".parquet", *_FAISS_EXTENSIONS):
        raise ValueError(f"--to: {target!r}: expected a .npy file, a .parquet file or a FAISS "
                         f"index file (.faiss / .index)")
    _input_file("--to", target)
    if args.ids is not None and ext == ".npy":
        raise ValueError("--ids: a .npy file is written by position; leave --ids out (ids are "
                         "for targets keyed by id: Parquet, FAISS IndexIDMap/IndexIVF)")
    delta = Delta.load(args.delta)
    ids = None if args.ids is None else _read_ids("--ids", args.ids)
    if ext in _FAISS_EXTENSIONS:  # the index type decides positions or ids (apply_to)
        kind = "faiss"
        try:
            _apply_faiss_file(delta, target, ids)
        except (ValueError, TypeError) as exc:
            raise type(exc)(str(exc).replace("pass ids=", "give --ids with")) from exc
    else:
        kind = ext[1:]
        delta.apply_to(target, ids=ids)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"command": "apply", "delta": os.path.abspath(args.delta),
                     "target": os.path.abspath(target), "kind": kind, **_counts(delta),
                     "gamma": delta.gamma, "n_records": delta.n_records, "seconds": seconds})
        return 0
    c = _counts(delta)
    note = ""
    if kind == "npy" and c["deleted"]:
        note = " (a .npy file is by position: deleted rows stay, your id map drops them)"
    print(f"{target}: wrote {c['rows']} rows ({c['tuned']} tuned, {c['reverted']} reverted, "
          f"{c['new']} new), deleted {c['deleted']}{note}; gamma {delta.gamma:.6g}; "
          f"{seconds:.2f} s")
    return 0


def _apply_faiss_file(delta, path, ids):
    """Read the index, write the delta into it, write it to a temp file beside ``path`` and
    rename it over ``path``: a reader sees the old index or the new one, never a torn one."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("--to: FAISS index files need faiss; pip install faiss-cpu") from exc
    try:
        index = faiss.read_index(path)
    except RuntimeError as exc:
        raise ValueError(f"--to: {path!r} is not a readable FAISS index "
                         f"({_one_line(exc)})") from exc
    delta.apply_to(index, ids=ids)
    _replace_atomically(path, lambda tmp: faiss.write_index(index, tmp), by_name=True)


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


def _one_backend(text):
    choices = ["auto", *_backends.KNOWN]
    if text not in choices:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from "
                                         f"{', '.join(choices)}")
    return text


def _int_list(text):
    """'3,7,9' -> [3, 7, 9]."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,7,9, got "
                                         f"{text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def _str_list(text):
    """'a,b' -> ['a', 'b'] (record ids; integers when the state's ids are)."""
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated ids like a,b, got {text!r}")
    return values


class _PipelineFormatter(_Formatter):
    """Defaults shown only where there is one (not "default: None" on every optional file)."""

    def _get_help_string(self, action):
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def _wrap(*paragraphs):
    """Prose paragraphs filled to 88 columns (descriptions are printed as written)."""
    import textwrap
    return "\n\n".join(textwrap.fill(" ".join(p.split()), 88) for p in paragraphs)


def _one_line_errors(parser):
    """argparse errors of ``parser`` as one line (no usage block), exit status 2: what a
    pipeline's log should show."""
    def error(message):
        parser.exit(2, f"{parser.prog}: error: {_one_line(message)} ('{parser.prog} --help' "
                       f"lists the options)\n")
    parser.error = error
    return parser


def _add_pipeline_commands(sub):
    """tune, update, apply; returns their parsers by name."""
    p = _one_line_errors(sub.add_parser(
        "tune", formatter_class=_PipelineFormatter,
        help="Fit a tuner on a corpus (memory-mapped) and train/validation queries; write the "
             "delta to serve and the state to update later.",
        description=_wrap(
            "Fit NUDGE-N or NUDGE-M once over the corpus (streamed through a memory "
            "map, never loaded whole) and write the delta (every tuned row, for "
            "'nudgefast apply') and/or the tuner state (for 'nudgefast update').",
            "Inputs: --data DIR, a dataset folder in the shared format (corpus.npy, "
                    "queries_<split>.npy, qrels_<split>.jsonl; corpus_ids.txt as record ids "
                    "when present), or the files one by one (--corpus ... --val-qrels). qrels: "
                    "one JSON line per query row, {\"answers\": [record positions], "
            "\"relevance\": [grades]}. Ids files: one id per line, ints when every "
            "line is an integer.")))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="DIR", help="a dataset folder in the shared format")
    src.add_argument("--corpus", metavar="X.npy", help="corpus embeddings (N, d) float16/32")
    p.add_argument("--val-split", default="dev", metavar="SPLIT",
                   help="with --data: the validation split (train is always 'train')")
    p.add_argument("--train", metavar="Q.npy", help="with --corpus: train query embeddings")
    p.add_argument("--train-qrels", metavar="Q.jsonl", help="with --corpus: their answers")
    p.add_argument("--val", metavar="V.npy", help="with --corpus: validation query embeddings")
    p.add_argument("--val-qrels", metavar="V.jsonl", help="with --corpus: their answers")
    p.add_argument("--ids", metavar="IDS.txt",
                   help="with --corpus: one record id per corpus row (kept in the deltas)")
    p.add_argument("--method", choices=("n", "m"), default="n",
                   help="n: NUDGE-N (gamma on a grid, by validation accuracy@k-val); m: NUDGE-M")
    p.add_argument("--k-val", type=_positive_int, default=None, metavar="K",
                   help="NUDGE-N: the k of the validation accuracy that chooses gamma (1 if "
                        "not given)")
    p.add_argument("--backend", type=_one_backend, default="auto",
                   help="compute backend ('nudgefast backends' lists them)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: all cores)")
    p.add_argument("--margin", type=_positive_int, default=32, metavar="M",
                   help="untouched candidates kept per validation query beyond what gamma needs "
                        "(more: fewer corpus rescans during updates, a larger state)")
    p.add_argument("--out", metavar="DELTA.npz", help="write the delta here")
    p.add_argument("--state", metavar="STATE.npz", help="write the tuner state here")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (the delta summary and the paths) instead")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (shown by default when stderr is a terminal)")
    p.set_defaults(func=tune, user_errors=_USER_ERRORS)

    p = _one_line_errors(sub.add_parser(
        "update", formatter_class=_PipelineFormatter,
        help="Load a tuner state, apply feedback / validation / record changes, write one "
             "delta and save the state back.",
        description=_wrap(
            "Load a tuner state (reopening the memory-mapped corpus it was fitted on, "
                    "or --corpus), apply the operations given, in this order: --feedback, "
                    "--feedback-queries, --remove-feedback, --add-validation, --add-records, "
                    "--delete-records, --delete-ids. The operations' deltas are combined into "
                    "one (--out; later writes of a position win, deletions accumulate) and the "
                    "state is saved atomically (to --state, or --state-out). If any operation "
            "fails nothing is written.")
        + "\n\n" + FEEDBACK_FORMAT + "\n\n" + _wrap(
            "--feedback-queries / --add-validation: .npy embeddings with a qrels file "
            "in the shared format. Positions: the corpus rows, then added records in "
            "order; a deleted position is never reused.")))
    p.add_argument("--state", required=True, metavar="STATE.npz",
                   help="the state 'nudgefast tune --state' wrote")
    p.add_argument("--corpus", metavar="X.npy",
                   help="the corpus the state was fitted on (default: the file it was "
                        "memory-mapped from)")
    p.add_argument("--feedback", metavar="NEW.jsonl", help="feedback queries, see above")
    p.add_argument("--feedback-queries", metavar="Q.npy",
                   help="feedback query embeddings (with --feedback-qrels)")
    p.add_argument("--feedback-qrels", metavar="Q.jsonl", help="their answers (shared format)")
    p.add_argument("--remove-feedback", type=_int_list, metavar="3,7,9",
                   help="withdraw feedback queries by feedback id")
    p.add_argument("--add-validation", metavar="V.npy",
                   help="new validation query embeddings (with --add-validation-qrels)")
    p.add_argument("--add-validation-qrels", metavar="V.jsonl",
                   help="their answers (shared format)")
    p.add_argument("--add-records", metavar="R.npy",
                   help="new records (m, d), at positions n_records, n_records + 1, ...")
    p.add_argument("--record-ids", metavar="IDS.txt",
                   help="with --add-records: one id per new row (required when the state has "
                        "record ids)")
    p.add_argument("--delete-records", type=_int_list, metavar="5,9",
                   help="delete records by position")
    p.add_argument("--delete-ids", type=_str_list, metavar="a,b", help="delete records by id")
    p.add_argument("--out", metavar="DELTA.npz", help="write the combined delta here")
    p.add_argument("--state-out", metavar="STATE.npz",
                   help="save the state here instead of over --state")
    p.add_argument("--backend", type=_one_backend, default=None,
                   help="compute backend (default: the one saved with the state)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: the number saved with the state)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (per-operation summaries, the combined delta's "
                        "counts, the paths) instead")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (rescans; shown by default on a terminal)")
    p.set_defaults(func=update, user_errors=_USER_ERRORS)

    p = _one_line_errors(sub.add_parser(
        "apply", formatter_class=_PipelineFormatter,
        help="Write a delta into the served vectors: a .npy file, a .parquet file or a FAISS "
             "index file.",
        description=_wrap(
            "Write a delta's rows where the vectors are served, touching only those "
                    "rows: a .npy file (in place through a memory map; by position), a "
                    ".parquet file with columns 'id' and 'vector' (upsert by id, rewritten "
                    "atomically), or a FAISS index file (.faiss / .index: IndexFlat by "
                    "position, IndexIDMap/IndexIDMap2/IndexIVF by id; rewritten atomically). "
            "Ids: the delta's record ids, or --ids.")))
    p.add_argument("delta", metavar="DELTA", help="the delta file ('tune --out', 'update --out')")
    p.add_argument("--to", required=True, metavar="TARGET",
                   help="the served vectors: .npy, .parquet, .faiss or .index")
    p.add_argument("--ids", metavar="IDS.txt",
                   help="one id per corpus position, instead of the delta's ids (FAISS needs "
                        "integers)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=apply, user_errors=_USER_ERRORS)
    return {name: sub.choices[name] for name in ("tune", "update", "apply")}


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
                            "accuracy table on the real datasets, or (--tuner) the tuner's "
                            "updates against refits.",
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
    p.add_argument("--tuner", action="store_true",
                   help="instead: the tuner's updates (feedback, validation, records in and "
                        "out) against full refits at each of --sizes, nudge-ft refits "
                        "(LlamaIndex-style) at --reference-size, and feedback streams on every "
                        "dataset (--dataset), compared with fresh fits")
    p.add_argument("--reference-size", type=_positive_int, default=50_000,
                   help="with --tuner: N where the nudge-ft refits run (default 50000)")
    p.add_argument("--batches", type=_positive_int, default=10,
                   help="with --tuner: feedback batches of 100 queries (default 10)")
    p.set_defaults(func=bench)
    p = sub.add_parser("backends", help="Which backends are available here; for the others, why not and the fix.",
                       description="Every backend, whether it is available here, and for the "
                                   "others why not and how to fix it.")
    p.set_defaults(func=show_backends)
    pipeline = _add_pipeline_commands(sub)
    args, extra = parser.parse_known_args(argv)
    if extra:  # as parse_args, but a pipeline command's parser says it on one line
        pipeline.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, RuntimeError, *getattr(args, "user_errors", ())) as exc:
        # A missing dataset or backend, or (pipeline commands) a bad file or argument, is the
        # user's to fix: one line, not a traceback.
        print(f"nudgefast {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
