"""Benchmark report: NUDGE fit per backend side by side with nudge-ft and FAISS, one run, one table.

    python bench/report.py peers --n 200000 --d 384 --train 5000 --val 1000
    python bench/report.py scale --n 2000000 --d 384 --train 5000 --val 1000

``peers``: in-memory corpus; NudgeN / NudgeM fit per available backend, nudge-ft's NUDGEN /
NUDGEM (torch CPU), and one FAISS IndexFlatIP search of the validation queries: the floor,
since a NUDGE fit is essentially that one pass. ``scale``: the corpus is a ``.npy`` memmap
streamed from disk (page cache), with the peak anonymous RSS of each fit (memory beyond the
mapped file's pages) and the ratio of ``NudgeN.fit`` to one ``search`` pass of the validation
queries over the same corpus. Every figure is the median of ``--repeat`` runs after a warm-up.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import nudgefast as nf
from nudgefast import QuerySet


# ---- data ----------------------------------------------------------------------------------


def make_task(n, d, n_train, n_val, seed=0, path=None, chunk=200_000):
    """Unit-vector corpus (in memory, or written to ``path`` as .npy and memory-mapped) with
    train / validation queries near their answers (1-3 answers each)."""
    rng = np.random.default_rng(seed)
    if path is None:
        corpus = np.empty((n, d), np.float32)
    else:
        corpus = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        corpus[s:s + chunk] = x
    if path is not None:
        corpus.flush()
        del corpus
        corpus = np.load(path, mmap_mode="r")

    def queries(m):
        answers = [list(rng.choice(n, int(rng.integers(1, 4)), replace=False)) for _ in range(m)]
        emb = np.stack([np.asarray(corpus[a], np.float64).mean(0) for a in answers])
        emb += 0.08 * rng.standard_normal(emb.shape)
        return QuerySet(emb.astype(np.float32), answers)

    return corpus, queries(n_train), queries(n_val)


# ---- measurement ---------------------------------------------------------------------------


class PeakRss:
    """Peak of RssAnon (memory beyond file-backed pages) while the block runs, in bytes."""

    def __init__(self, interval=0.005):
        self.interval = interval

    @staticmethod
    def read():
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.base = self.read()
        self.peak = self.base
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.read())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())

    @property
    def growth(self):
        return self.peak - self.base


def timed(fn, repeat, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times)), float(np.max(times))


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    return f"{cpu}, {os.cpu_count()} cores; commit {commit or 'unknown'}"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(t):
    med, lo, hi = t
    return f"{med:.3f} s ({lo:.3f}-{hi:.3f})"


# ---- peers ---------------------------------------------------------------------------------


def faiss_pass(corpus, queries, k=10):
    import faiss
    faiss.omp_set_num_threads(os.cpu_count())
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    return lambda: index.search(queries, k)


def reference_fit(variant, corpus, train, val):
    import torch  # noqa: F401  (nudge-ft needs it)
    from nudge import NUDGEM, NUDGEN
    cls = NUDGEN if variant == "n" else NUDGEM
    tr = {"q_embs": train.embeddings, "q_ans_indx": [list(map(int, a)) for a in train.answers]}
    va = {"q_embs": val.embeddings, "q_ans_indx": [list(map(int, a)) for a in val.answers]}

    def run():
        with contextlib.redirect_stdout(io.StringIO()):
            cls(device="cpu").finetune_embeddings(np.asarray(corpus), tr, va)
    return run


def run_peers(args):
    corpus, train, val = make_task(args.n, args.d, args.train, args.val, seed=args.seed)
    names = [n for n, b in nf.backends().items() if b.available]
    rows = []
    floor = timed(faiss_pass(corpus, val.embeddings), args.repeat)
    rows.append(["FAISS IndexFlatIP search (val queries, k=10): floor", fmt(floor), "1.00"])
    for name in names:
        t = timed(lambda: nf.search(val.embeddings, corpus, 10, backend=name, progress=False),
                  args.repeat)
        rows.append([f"nudgefast search ({name})", fmt(t), f"{t[0] / floor[0]:.2f}"])
    for variant, cls in (("n", nf.NudgeN), ("m", nf.NudgeM)):
        for name in names:
            t = timed(lambda: cls(backend=name, progress=False).fit(corpus, train, val),
                      args.repeat)
            rows.append([f"nudgefast {cls.__name__}.fit ({name})", fmt(t),
                         f"{t[0] / floor[0]:.2f}"])
        if not args.no_reference:
            try:
                t = timed(reference_fit(variant, corpus, train, val), max(1, args.ref_repeat),
                          warmup=0)
                rows.append([f"nudge-ft NUDGE{variant.upper()} (torch CPU)", fmt(t),
                             f"{t[0] / floor[0]:.2f}"])
            except ImportError as exc:
                rows.append([f"nudge-ft NUDGE{variant.upper()}", f"not installed ({exc})", "-"])
    header = (f"peers: N={args.n} d={args.d} float32 in memory, {args.train} train / {args.val} "
              f"validation queries; {machine()}; median (min-max) of {args.repeat} runs after "
              f"a warm-up (nudge-ft: {args.ref_repeat} run(s), no warm-up)")
    return header + "\n\n" + table(["what", "time", "x floor"], rows)


def run_scale(args):
    folder = Path(args.path or tempfile.mkdtemp(prefix="nudgefast-scale-"))
    path = folder / f"corpus_{args.n}x{args.d}.npy"
    t0 = time.perf_counter()
    corpus, train, val = make_task(args.n, args.d, args.train, args.val, seed=args.seed,
                                   path=path)
    gen = time.perf_counter() - t0
    names = [n for n, b in nf.backends().items() if b.available and n in args.backends]
    rows = []
    for name in names:
        search_t = timed(lambda: nf.search(val.embeddings, corpus, 10, backend=name,
                                           progress=False), args.repeat)
        for cls in (nf.NudgeN, nf.NudgeM):
            est = cls(backend=name, progress=False)
            est.fit(corpus, train, val)  # warm-up (JIT, page cache)
            times, peaks = [], []
            for _ in range(args.repeat):
                with PeakRss() as rss:
                    t1 = time.perf_counter()
                    est.fit(corpus, train, val)
                    times.append(time.perf_counter() - t1)
                peaks.append(rss.growth)
            t = (float(np.median(times)), min(times), max(times))
            rows.append([name, f"{cls.__name__}.fit", fmt(t), fmt(search_t),
                         f"{t[0] / search_t[0]:.2f}", f"{max(peaks) / 2**20:.0f} MiB"])
    floor = None
    if not args.no_faiss:
        arr_bytes = args.n * args.d * 4
        floor = timed(faiss_pass(corpus, val.embeddings), args.repeat)
        floor_txt = (f"FAISS IndexFlatIP search of the validation queries (corpus copied into the "
                     f"index, {arr_bytes / 2**30:.1f} GiB in RAM): {fmt(floor)}")
    else:
        floor_txt = "FAISS not run"
    header = (f"scale: N={args.n} d={args.d} float32 .npy memmap ({path.stat().st_size / 2**30:.2f}"
              f" GiB, generated in {gen:.0f} s), {args.train} train / {args.val} validation "
              f"queries; {machine()}; median (min-max) of {args.repeat} runs after a warm-up. "
              f"'RSS growth' is the peak of RssAnon during the fit minus before it: memory "
              f"beyond the mapped file's pages. nudge-ft is not run at this size: it builds "
              f"dense n_val x N matrices (~28 GB per million records at these sizes).")
    text = header + "\n\n" + table(["backend", "what", "fit time", "one search pass (k=10)",
                                    "fit / search", "RSS growth"], rows) + "\n\n" + floor_txt
    if not args.path:
        path.unlink()
        folder.rmdir()
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["peers", "scale"])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--train", type=int, default=5_000)
    p.add_argument("--val", type=int, default=1_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--ref-repeat", type=int, default=1)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--no-faiss", action="store_true")
    p.add_argument("--backends", default="cpp,numba,numpy")
    p.add_argument("--path", help="scale: folder for the .npy corpus (kept); default a temp dir")
    p.add_argument("--out", help="append the Markdown to this file")
    args = p.parse_args(argv)
    text = run_peers(args) if args.mode == "peers" else run_scale(args)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = f"### {args.mode} ({stamp})\n\ncommand: `python bench/report.py {' '.join(argv or sys.argv[1:])}`\n\n{text}\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
