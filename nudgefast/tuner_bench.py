"""The tuner's benchmark: updates against full refits, side by side in one run.

Three parts, one report (``nudgefast bench --tuner``):

- scale: a seeded memmap corpus (default 2M x 384, 5k train / 1k validation). Per variant: a
  full fit (what re-running NUDGE on every change costs: LlamaIndex's
  ``insert_data_and_finetune``), the tuner's fit, then batches of feedback added and withdrawn,
  validation queries added, records added (against the floor: the top-k kernel over those rows
  alone) and deleted; at the end the tuner's state is compared with a fresh fit;
- reference: a corpus small enough for nudge-ft's dense matrices, where the LlamaIndex-style
  update (a full nudge-ft refit) runs in the same process as the tuner's update;
- real data: every shared dataset found, half the train queries fitted and the rest streamed
  as feedback batches, compared with a fresh fit at the end.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from . import _backends, datasets
from .benchmark import (Timing, _available_memory, measure, reference_fit, reference_memory,
                        synthetic_workload)
from .nudge import NudgeM, NudgeN
from .queryset import QuerySet
from .search import topk_pass
from .tuner import Tuner

log = logging.getLogger("nudgefast")
VARIANTS = {"NudgeN": NudgeN, "NudgeM": NudgeM}


@dataclass
class TunerRow:
    workload: str
    n: int
    variant: str
    what: str
    timing: Timing | None
    versus: str = ""  # the ratio to what it replaces, as text
    note: str = ""


def _batches(qs: QuerySet, start: int, size: int):
    emb = np.asarray(qs.embeddings, np.float32)
    return [(emb[s:s + size], list(qs.answers[s:s + size])) for s in range(start, len(qs), size)]


def _stream(tuner, batches) -> tuple[Timing, list]:
    """Each batch through ``add_feedback``, timed; returns the timings and the summaries."""
    timing, summaries = Timing(), []
    for q, a in batches:
        t0 = time.perf_counter()
        delta = tuner.add_feedback(q, a)
        timing.runs.append(time.perf_counter() - t0)
        summaries.append(delta.summary)
    return timing, summaries


def _ms(t: Timing) -> str:
    return f"{t.median * 1e3:.1f} ms"


def _compare(tuner, fresh) -> tuple[bool, float]:
    got = tuner.result()
    same = got.gamma == fresh.gamma and np.array_equal(got.indices, fresh.indices)
    diff = float(np.abs(got.vectors - fresh.vectors).max()) if same and got.vectors.size else 0.0
    return same, diff


def scale_rows(n, d=384, n_train=5000, n_val=1000, *, batch=100, n_batches=10,
               new_records=10_000, backend="auto", memmap_dir=None, variants=VARIANTS,
               margin=32, check=True):
    """The scale part (see the module docstring). Returns TunerRow list."""
    extra_val = 100
    w = synthetic_workload(n, d, n_train + batch * n_batches, n_val + extra_val,
                           memmap_dir=memmap_dir)
    name = f"synthetic N={n:,} d={d}" + (" memmap" if w.path is not None else "")
    train0 = QuerySet(np.asarray(w.train.embeddings[:n_train]), w.train.answers[:n_train])
    val0 = QuerySet(np.asarray(w.val.embeddings[:n_val]), w.val.answers[:n_val])
    val_extra = (np.asarray(w.val.embeddings[n_val:]), list(w.val.answers[n_val:]))
    feedback = _batches(w.train, n_train, batch)
    rng = np.random.default_rng(1)
    rows = []
    impl = _backends.get(backend)
    for vname in variants:
        est = VARIANTS[vname](backend=backend, progress=False)
        full = measure(lambda: est.fit(w.corpus, train0, val0), repeat=1, warmup=0)
        rows.append(TunerRow(name, n, vname, "full fit (a refit per change)", full))
        tuner = Tuner(est, margin=margin)
        tfit = measure(lambda: tuner.fit(w.corpus, train0, val0), repeat=1, warmup=0)
        rows.append(TunerRow(name, n, vname, "Tuner.fit (keeps top-(need+margin))", tfit,
                             f"{tfit.median / full.median:.2f}x the fit"))
        adds, summaries = _stream(tuner, feedback)
        ids = [x["feedback_ids"] for x in summaries]
        rescans = sum(x["rescanned"] for x in summaries)
        rescored = [x["rescored"] for x in summaries]
        removes = Timing()
        rows.append(TunerRow(name, n, vname, f"add_feedback({batch} queries)", adds,
                             f"{full.median / adds.median:,.0f}x faster than a full fit",
                             f"{len(feedback)} batches; validation queries re-scored per batch "
                             f"median {int(np.median(rescored))}; rescans {rescans}"))
        withdrawn = ids[len(ids) // 2:]
        for batch_ids in withdrawn:
            t0 = time.perf_counter()
            tuner.remove_feedback(batch_ids)
            removes.runs.append(time.perf_counter() - t0)
        rows.append(TunerRow(name, n, vname, f"remove_feedback({batch} queries)", removes,
                             f"{full.median / removes.median:,.0f}x faster than a full fit"))
        t0 = time.perf_counter()
        tuner.add_validation(*val_extra)
        addval = Timing([time.perf_counter() - t0])
        rows.append(TunerRow(name, n, vname, f"add_validation({extra_val} queries)", addval,
                             f"{full.median / addval.median:.1f}x faster than a full fit",
                             "one corpus pass for the new queries only"))
        if check:
            kept = [i for i, b in enumerate(ids) if b not in withdrawn]
            fq = np.concatenate([np.asarray(train0.embeddings)] + [feedback[i][0] for i in kept])
            fa = list(train0.answers) + [x for i in kept for x in feedback[i][1]]
            fv = QuerySet(np.concatenate([np.asarray(val0.embeddings), val_extra[0]]),
                          list(val0.answers) + val_extra[1])
            t0 = time.perf_counter()
            fresh = est.fit(w.corpus, QuerySet(fq, fa), fv)
            same, diff = _compare(tuner, fresh)
            rows.append(TunerRow(name, n, vname, "fresh fit on the final inputs",
                                 Timing([time.perf_counter() - t0]),
                                 note=f"tuner == fresh fit: {'yes' if same else 'NO'} (gamma "
                                      f"{tuner.gamma:.6g} vs {fresh.gamma:.6g}, max |diff| "
                                      f"{diff:.1e})"))
        new = rng.standard_normal((new_records, d), dtype=np.float32)
        new /= np.linalg.norm(new, axis=1, keepdims=True)
        K = tuner.need + tuner.margin
        floor = measure(lambda: topk_pass(impl, tuner._vq, new, K), repeat=3, warmup=1)
        t0 = time.perf_counter()
        tuner.add_records(new)
        addrec = Timing([time.perf_counter() - t0])
        rows.append(TunerRow(name, n, vname, f"add_records({new_records:,} rows)", addrec,
                             f"{addrec.median / floor.median:.2f}x the kernel pass over them",
                             f"floor: top-{K} kernel over the new rows only, {_ms(floor)}; "
                             f"a full fit {full.median:.1f} s"))
        gone = rng.choice(n, 100, replace=False)
        t0 = time.perf_counter()
        tuner.delete_records(gone)
        deleted = Timing([time.perf_counter() - t0])
        rows.append(TunerRow(name, n, vname, "delete_records(100)", deleted,
                             f"{full.median / deleted.median:,.0f}x faster than a full fit"))
    return rows


def reference_rows(n=50_000, d=384, n_train=5000, n_val=1000, *, batch=100, n_batches=5,
                   backend="auto", variants=VARIANTS):
    """LlamaIndex-style updates (a full nudge-ft refit) against the tuner, one process."""
    w = synthetic_workload(n, d, n_train + batch * n_batches, n_val, seed=2)
    name = f"synthetic N={n:,} d={d}"
    train0 = QuerySet(np.asarray(w.train.embeddings[:n_train]), w.train.answers[:n_train])
    feedback = _batches(w.train, n_train, batch)
    rows = []
    for vname in variants:
        need = reference_memory(w.corpus, n_val)
        ref = None
        if need > _available_memory() // 2:
            note = f"skipped: needs ~{need / 2**30:.0f} GiB"
        else:
            try:
                fn = reference_fit(vname, w.corpus, w.train, w.val)
                ref = measure(fn, repeat=1, warmup=0)
                note = "nudge-ft refit with every train query so far"
            except ImportError:
                note = "skipped: nudge-ft / torch not installed (pip install '.[test]')"
        rows.append(TunerRow(name, n, vname, "LlamaIndex-style update: nudge-ft refit", ref,
                             note=note))
        est = VARIANTS[vname](backend=backend, progress=False)
        tuner = Tuner(est)
        tuner.fit(w.corpus, train0, w.val)
        adds, _ = _stream(tuner, feedback)
        versus = f"{ref.median / adds.median:,.0f}x faster than nudge-ft" if ref else ""
        rows.append(TunerRow(name, n, vname, f"Tuner.add_feedback({batch} queries)", adds,
                             versus))
    return rows


def real_rows(folders=None, *, batch=100, backend="auto", variants=VARIANTS):
    """Every shared dataset: fit on half the train queries, stream the rest as feedback."""
    rows = []
    for folder in (datasets.find() if folders is None else folders):
        ds = datasets.load(folder)
        half = len(ds.train) // 2
        train0 = QuerySet(np.asarray(ds.train.embeddings[:half]), ds.train.answers[:half])
        stream = _batches(ds.train, half, batch)
        for vname in variants:
            est = VARIANTS[vname](backend=backend, progress=False)
            tuner = Tuner(est)
            tuner.fit(ds.corpus, train0, ds.dev)
            adds, _ = _stream(tuner, stream)
            full = measure(lambda: est.fit(ds.corpus, ds.train, ds.dev), repeat=1, warmup=0)
            same, diff = _compare(tuner, full.result)
            rows.append(TunerRow(
                f"{ds.name} (real)", ds.corpus.shape[0], vname,
                f"add_feedback({batch}) x {len(stream)}", adds,
                f"{full.median / adds.median:,.0f}x faster than a full fit",
                f"tuner == fresh fit: {'yes' if same else 'NO'} (gamma {tuner.gamma:.6g}, max "
                f"|diff| {diff:.1e}); full fit {full.median * 1e3:.0f} ms"))
    return rows


def markdown(rows, info, command) -> str:
    head = (f"# nudgefast bench --tuner ({time.strftime('%Y-%m-%d')}, CPU {info['cpu']}, "
            f"{info['threads_used']} of {info['cores']} cores, "
            f"{'GPU ' + info['gpu'] if info.get('gpu') else 'no GPU'})\n\n"
            f"command: `{command}`\n\ncommit {info['commit']}\n\n"
            "| workload | N | variant | operation | median (min-max) | versus | note |\n"
            "|---|---|---|---|---|---|---|\n")
    body = []
    for r in rows:
        if r.timing is None or not r.timing.runs:
            t = "-"
        elif r.timing.median < 1:
            lo, hi = r.timing.spread
            t = f"{r.timing.median * 1e3:.2f} ms ({lo * 1e3:.2f}-{hi * 1e3:.2f})"
        else:
            t = str(r.timing)
        body.append(f"| {r.workload} | {r.n:,} | {r.variant} | {r.what} | {t} | {r.versus} | "
                    f"{r.note} |")
    return head + "\n".join(body) + "\n"
