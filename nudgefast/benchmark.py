"""Benchmark workloads and measurements shared by ``nudgefast bench`` and ``bench/`` suites.

Every run puts the backends and the peers side by side on the same data: NUDGE fit time per
backend and variant, top-k throughput (one ``search`` pass of the validation queries), the
reference ``nudge-ft`` (torch CPU) while its dense matrices fit in memory, and one FAISS
``IndexFlatIP`` search (the floor: a NUDGE fit is essentially that one pass). Figures are the
median and min-max of repeated runs after a warm-up; GPU runs are timed with CUDA events after
synchronisation. Nothing here prints: the CLI does.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _backends
from .nudge import NudgeM, NudgeN
from .compat import queries_answers_dict
from .queryset import QuerySet
from .search import search

log = logging.getLogger("nudgefast")

#: nudge-ft holds ~28 bytes x n_val x N per record-query pair in dense float32 matrices
#: (measured: ~28 GB per million records at 1k validation queries); skip it beyond this.
REFERENCE_BYTES_PER_RECORD_QUERY = 28.0


def reference_memory(corpus, n_val: int) -> float:
    """Bytes nudge-ft needs on ``corpus`` with ``n_val`` validation queries: its dense
    n_val x N matrices plus three float32 (N, d) copies of the corpus."""
    n, d = corpus.shape
    return REFERENCE_BYTES_PER_RECORD_QUERY * n * n_val + 3 * 4 * n * d


# ---- workloads -----------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    corpus: np.ndarray
    train: QuerySet
    val: QuerySet
    synthetic: bool = True
    path: Path | None = None  # the .npy file when the corpus is a memmap

    @property
    def n(self):
        return self.corpus.shape[0]


def synthetic_workload(n, d=384, n_train=5000, n_val=1000, *, seed=0, memmap_dir=None,
                       dtype=np.float32, chunk=200_000) -> Workload:
    """Seeded unit-vector corpus with train / validation queries near their 1-3 answers.

    With ``memmap_dir`` the corpus is written there as ``.npy`` and memory-mapped read-only,
    so it is streamed from the page cache like a user's on-disk corpus.
    """
    rng = np.random.default_rng(seed)
    path = None
    if memmap_dir is None:
        corpus = np.empty((n, d), dtype)
    else:
        path = Path(memmap_dir) / f"synthetic_{n}x{d}_{np.dtype(dtype).name}_seed{seed}.npy"
        corpus = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        corpus[s:s + chunk] = x
    if path is not None:
        corpus.flush()
        del corpus
        corpus = np.load(path, mmap_mode="r")

    def queries(m):
        answers = [rng.choice(n, int(rng.integers(1, 4)), replace=False).tolist()
                   for _ in range(m)]
        emb = np.stack([np.asarray(corpus[a], np.float64).mean(0) for a in answers])
        emb += 0.08 * rng.standard_normal(emb.shape)
        return QuerySet(emb.astype(np.float32), answers)

    return Workload(f"synthetic N={n} d={d}", corpus, queries(n_train), queries(n_val),
                    True, path)


def packaged_workload() -> Workload:
    from . import datasets
    ds = datasets.packaged()
    return Workload(ds.name, ds.corpus, ds.train, ds.dev, ds.synthetic)


# ---- measurement ---------------------------------------------------------------------------


@dataclass
class Timing:
    runs: list = field(default_factory=list)
    #: What the last timed run returned (a fitted result, say), so it need not run again.
    result: object = None

    @property
    def median(self):
        return float(np.median(self.runs))

    @property
    def spread(self):
        return float(np.min(self.runs)), float(np.max(self.runs))

    def __str__(self):
        lo, hi = self.spread
        return f"{self.median:.4g} s ({lo:.3g}-{hi:.3g})"


def _cuda_events():
    try:
        import cupy
        return cupy
    except ImportError:
        return None


def measure(fn, repeat=3, warmup=1, gpu=False) -> Timing:
    """Median/min-max of ``repeat`` runs after ``warmup``; CUDA events when ``gpu``."""
    cp = _cuda_events() if gpu else None
    for _ in range(warmup):
        fn()
    t = Timing()
    for _ in range(repeat):
        if cp is not None:
            cp.cuda.Device().synchronize()
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            t.result = fn()
            stop.record()
            stop.synchronize()
            t.runs.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
        else:
            t0 = time.perf_counter()
            t.result = fn()
            t.runs.append(time.perf_counter() - t0)
    return t


class PeakRss:
    """Peak growth of RssAnon (memory beyond file-backed pages) while the block runs, bytes."""

    def __init__(self, interval=0.005):
        self.interval = interval

    @staticmethod
    def read():
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _release_free_heap():
        # glibc keeps freed memory mapped; without trimming, a second fit reuses it and shows
        # no growth at all. Trimming first makes the growth the fit's own peak.
        with contextlib.suppress(OSError, AttributeError):
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    def __enter__(self):
        import gc
        gc.collect()
        self._release_free_heap()
        self.base = self.peak = self.read()
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


def device_info(n_threads=None) -> dict:
    """CPU model, cores used, GPU model (when CuPy sees one), commit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads_used": n_threads or os.cpu_count(),
            "gpu": None, "commit": "unknown"}
    with contextlib.suppress(Exception):
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    with contextlib.suppress(OSError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1])
        info["commit"] = out.stdout.strip() or "unknown"
    return info


# ---- runners -------------------------------------------------------------------------------


def faiss_search(corpus, queries, k=10, n_threads=None):
    """A callable running one FAISS IndexFlatIP search (the corpus is copied into the index)."""
    import faiss
    faiss.omp_set_num_threads(n_threads or os.cpu_count())
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus, dtype=np.float32))
    return lambda: index.search(queries, k)


def reference_fit(variant, corpus, train, val):
    """A callable running nudge-ft's NUDGEN / NUDGEM on the same data (ImportError if absent)."""
    import torch  # noqa: F401
    from nudge import NUDGEM, NUDGEN
    cls = NUDGEN if variant == "NudgeN" else NUDGEM
    tr, va = queries_answers_dict(train), queries_answers_dict(val)
    data = np.asarray(corpus, dtype=np.float32)

    def run():
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints
            cls(device="cpu").finetune_embeddings(data, tr, va)
    return run


@dataclass
class Row:
    workload: str
    n: int
    what: str  # "fit NudgeN", "fit NudgeM", "topk"
    who: str  # backend name, "nudge-ft", "faiss"
    timing: Timing | None
    peak_rss: int | None = None
    note: str = ""
    n_queries: int = 0


def run(workloads, *, backends=None, peers=("nudge-ft", "faiss"), repeat=3, warmup=1,
        n_threads=None, k=10, memory_limit=None, reference_repeat=1):
    """Run every workload on every backend and peer; returns a list of :class:`Row`."""
    names = backends or [n for n, b in _backends.backends().items() if b.available]
    memory_limit = memory_limit or _available_memory() // 2
    rows = []
    for w in workloads:
        q = w.val.embeddings
        log.info("bench: %s", w.name)
        first = len(rows)
        for name in names:
            gpu = name == "cuda"
            t = measure(lambda: search(q, w.corpus, k, backend=name, n_threads=n_threads,
                                       progress=False), repeat, warmup, gpu)
            rows.append(Row(w.name, w.n, "topk", name, t))
            for cls in (NudgeN, NudgeM):
                est = cls(backend=name, n_threads=n_threads, progress=False)
                t = measure(lambda: est.fit(w.corpus, w.train, w.val), repeat, warmup, gpu)
                with PeakRss() as rss:
                    est.fit(w.corpus, w.train, w.val)
                rows.append(Row(w.name, w.n, f"fit {cls.__name__}", name, t, rss.growth))
            if not gpu:
                rows.append(_apply_row(w, est.fit(w.corpus, w.train, w.val), name, repeat,
                                       warmup, n_threads))
        rows += _apply_floor_rows(w, repeat, warmup)
        if "faiss" in peers:
            try:
                fn = faiss_search(w.corpus, q, k, n_threads)
                rows.append(Row(w.name, w.n, "topk", "faiss", measure(fn, repeat, warmup)))
                del fn
            except ImportError as exc:
                rows.append(Row(w.name, w.n, "topk", "faiss", None, note=f"not installed: {exc}"))
        if "nudge-ft" in peers:
            need = reference_memory(w.corpus, len(w.val))
            for variant in ("NudgeN", "NudgeM"):
                if need > memory_limit:
                    rows.append(Row(w.name, w.n, f"fit {variant}", "nudge-ft", None,
                                    note=f"skipped: needs ~{need / 2**30:.0f} GiB"))
                    continue
                try:
                    fn = reference_fit(variant, w.corpus, w.train, w.val)
                except ImportError as exc:
                    rows.append(Row(w.name, w.n, f"fit {variant}", "nudge-ft", None,
                                    note=f"not installed: {exc}"))
                    continue
                with PeakRss() as rss:
                    t = measure(fn, reference_repeat, 0)
                rows.append(Row(w.name, w.n, f"fit {variant}", "nudge-ft", t, rss.growth))
        for r in rows[first:]:
            r.n_queries = len(w.val)
    return rows


def _apply_bytes(w) -> int:
    """Bytes ``apply`` must move: read the corpus once, write the float32 output once."""
    n, d = w.corpus.shape
    return n * d * (w.corpus.dtype.itemsize + 4)


def _apply_row(w, res, name, repeat, warmup, n_threads) -> Row:
    """``NudgeResult.apply`` into a preallocated float32 buffer: a memory-bound pass."""
    out = np.empty(w.corpus.shape, np.float32)
    out[:] = 0  # fault the pages in before timing
    # Milliseconds per call: more runs than the fits get, or thread wake-ups decide the median.
    t = measure(lambda: res.apply(w.corpus, out=out, backend=name, n_threads=n_threads),
                max(repeat, 15), warmup)
    return Row(w.name, w.n, "apply", name, t,
               note=f"{_apply_bytes(w) / t.median / 1e9:.1f} GB/s")


def _apply_floor_rows(w, repeat, warmup) -> list[Row]:
    """The floor of ``apply`` (the same bytes through a copy: ``np.copyto`` of the corpus
    into a float32 buffer) and what a user would write instead (``x / |x|`` in NumPy)."""
    out = np.empty(w.corpus.shape, np.float32)
    out[:] = 0
    copy = measure(lambda: np.copyto(out, w.corpus), max(repeat, 15), warmup)

    def plain():
        x = np.asarray(w.corpus)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    naive = measure(plain, max(repeat, 15), warmup)
    gbs = _apply_bytes(w) / copy.median / 1e9
    return [Row(w.name, w.n, "apply", "copy floor", copy, note=f"{gbs:.1f} GB/s"),
            Row(w.name, w.n, "apply", "numpy x/|x|", naive,
                note=f"{_apply_bytes(w) / naive.median / 1e9:.1f} GB/s")]


def _available_memory():
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


# ---- outputs -------------------------------------------------------------------------------


def markdown(rows, info, flops_of=None) -> str:
    """One table: time, speed-up over nudge-ft and over the FAISS pass, peak memory."""
    out = [f"device: CPU {info['cpu']} ({info['threads_used']} of {info['cores']} cores used)"
           + (f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU")
           + f"; commit {info['commit']}", "",
           "| workload | N | what | who | median (min-max) | speed-up vs nudge-ft "
           "| time / floor (FAISS pass; apply: copy) | time / own search pass | GPU speed-up over cpp | peak RSS growth "
           "| note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r.workload, r.what, r.who): r for r in rows}
    for r in rows:
        ref = by_key.get((r.workload, r.what, "nudge-ft"))
        floor = by_key.get((r.workload, "topk", "faiss") if r.what != "apply"
                           else (r.workload, "apply", "copy floor"))
        speed_ref = (f"{ref.timing.median / r.timing.median:.1f}" if r.timing and ref and
                     ref.timing and r.who != "nudge-ft" else "")
        vs_floor = (f"{r.timing.median / floor.timing.median:.2f}" if r.timing and
                    floor and floor.timing else "")
        own = by_key.get((r.workload, "topk", r.who))
        vs_own = (f"{r.timing.median / own.timing.median:.2f}" if r.what != "topk" and r.timing
                  and own and own.timing else "")
        cpu = by_key.get((r.workload, r.what, "cpp"))
        vs_cpu = (f"{cpu.timing.median / r.timing.median:.1f}" if r.who == "cuda" and r.timing
                  and cpu and cpu.timing else "")
        mem = f"{r.peak_rss / 2**20:.0f} MiB" if r.peak_rss is not None else ""
        out.append(f"| {r.workload} | {r.n} | {r.what} | {r.who} | "
                   f"{r.timing if r.timing else '-'} | {speed_ref} | {vs_floor} | {vs_own} | {vs_cpu} | {mem} | "
                   f"{r.note} |")
    return "\n".join(out)


def plots(rows, folder, info) -> list[Path]:
    """Log-log plots against N: fit time, top-k throughput, speed-ups, peak memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    title = f"{info['cpu']} ({info['threads_used']} threads)" + (
        f" + {info['gpu']}" if info.get("gpu") else "")
    made = []
    rows = [r for r in rows if r.workload.startswith("synthetic N=")]  # the size sweep only

    def series(what, who, value):
        pts = sorted((r.n, value(r)) for r in rows if r.what == what and r.who == who
                     and r.timing is not None and value(r) is not None)
        return [p[0] for p in pts], [p[1] for p in pts]

    whos = sorted({r.who for r in rows})
    specs = [
        ("fit_time.png", "fit time (s)", [(f"fit {v}", v) for v in ("NudgeN", "NudgeM")],
         lambda r: r.timing.median),
        ("topk_throughput.png", "top-k throughput (queries x records / s)", [("topk", "")],
         lambda r: r.n * r.n_queries / r.timing.median),
        ("peak_memory.png", "peak RSS growth (MiB)", [(f"fit {v}", v) for v in ("NudgeN", "NudgeM")],
         lambda r: r.peak_rss / 2**20 if r.peak_rss is not None else None),
    ]
    for fname, ylabel, whats, value in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for what, label in whats:
            for who in whos:
                xs, ys = series(what, who, value)
                if xs:
                    ax.plot(xs, ys, marker="o", label=f"{who} {label}".strip())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (records)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        made.append(folder / fname)
    # Speed-ups: one panel per peer, colour per backend, line style per variant.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    by_key = {(r.workload, r.what, r.who): r for r in rows}
    colours = {w: f"C{i}" for i, w in enumerate(whos)}
    for ax, peer in zip(axes, ("nudge-ft", "faiss")):
        for variant, style in (("NudgeN", "-"), ("NudgeM", "--")):
            for who in whos:
                if who in ("nudge-ft", "faiss"):
                    continue
                pts = []
                for r in rows:
                    if r.what != f"fit {variant}" or r.who != who or r.timing is None:
                        continue
                    p = by_key.get((r.workload, f"fit {variant}" if peer == "nudge-ft"
                                    else "topk", peer))
                    if p is not None and p.timing is not None:
                        pts.append((r.n, p.timing.median / r.timing.median))
                if pts:
                    pts.sort()
                    ax.plot(*zip(*pts), style, marker="o", color=colours[who],
                            label=f"{who} {variant}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("N (records)")
        ax.set_ylabel(f"{peer} time / nudgefast fit time" if peer == "nudge-ft"
                      else "FAISS flat pass time / nudgefast fit time")
        ax.set_title(f"speed-up over {peer}" + (" (same fit)" if peer == "nudge-ft" else
                                                 " (one search of the val queries)"), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # no peer in this run: nothing to label
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "speedup.png", dpi=110)
    plt.close(fig)
    made.append(folder / "speedup.png")
    return made


def temp_dir():
    return tempfile.mkdtemp(prefix="nudgefast-bench-")
