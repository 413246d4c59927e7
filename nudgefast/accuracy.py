"""The accuracy table: NUDGE against no fine-tuning, the reference and the paper's baselines.

For each dataset in the shared format: test recall@k, NDCG@k (graded) and MRR@k, and fit
time, of
- no fine-tuning (cosine over the base embeddings);
- NUDGE-M and NUDGE-N, native (:class:`~nudgefast.NudgeM`, :class:`~nudgefast.NudgeN`) and
  compat (:mod:`nudgefast.compat`, the reference's rules);
- the reference ``nudge-ft`` itself (when installed and its dense matrices fit in memory): it
  must give the compat numbers;
- the paper's parametric baselines, trained on the same train queries and early-stopped on
  dev: a linear adapter on the query embeddings and the same adapter on the records
  (:class:`nudgefast.baselines.LinearAdapter`).
Every method sees the same train / dev / test splits; dev picks gamma (NUDGE) or the epoch
(adapters); test is scored once.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass

import numpy as np

from . import compat, datasets
from .benchmark import _available_memory, measure, reference_memory
from ._defaults import NUDGE_N_GAMMAS
from .metrics import metrics
from .nudge import NudgeM, NudgeN
from .search import search

log = logging.getLogger("nudgefast")


@dataclass
class AccuracyRow:
    dataset: str
    method: str
    scores: dict  # recall@k, ndcg@k, mrr@k on the test split
    fit_seconds: float | None
    gamma: float | None = None
    note: str = ""


def evaluate(ds, *, k=10, backend="auto", repeat=3, reference=True, adapters=True,
             progress=False) -> list[AccuracyRow]:
    """Every method of the table on the dataset ``ds``; returns one row per method."""
    corpus, test = ds.corpus, ds.test
    rows = []

    def score(indices):
        return metrics(indices, test, k, backend=backend)

    base = search(test.embeddings, corpus, k, backend=backend, progress=progress)
    rows.append(AccuracyRow(ds.name, "no fine-tuning", score(base.indices), None))

    # The paper's NUDGE-N grid {0, 0.02, ..., 0.48} is coarse for models whose cosines crowd
    # into a narrow band (e5: 0.80 +- 0.02); the same grid divided by 10 shows what that costs.
    for label, cls, kw in (("NUDGE-M (native)", NudgeM, {}), ("NUDGE-N (native)", NudgeN, {}),
                           ("NUDGE-N (native, gammas/10)", NudgeN,
                            {"gammas": NUDGE_N_GAMMAS / 10})):
        est = cls(backend=backend, progress=progress, **kw)
        t = measure(lambda: est.fit(corpus, ds.train, ds.dev), repeat)
        res, sec = t.result, t.median
        hits = search(test.embeddings, corpus, k, res, backend=backend, progress=progress)
        rows.append(AccuracyRow(ds.name, label, score(hits.indices), sec, res.gamma))

    train, dev = compat.queries_answers_dict(ds.train), compat.queries_answers_dict(ds.dev)
    compat_dense = {}
    for variant, cls in (("NUDGE-M", compat.NUDGEM), ("NUDGE-N", compat.NUDGEN)):
        est = cls(backend=backend, progress=progress)
        t = measure(lambda: est.finetune_embeddings(corpus, train, dev), repeat)
        dense, sec = t.result, t.median
        compat_dense[variant] = dense
        # NUDGE-M's tuned rows are not unit length: the reference scores them by dot product.
        hits = search(test.embeddings, dense, k, metric="dot", backend=backend,
                      progress=progress)
        rows.append(AccuracyRow(ds.name, f"{variant} (compat)", score(hits.indices), sec,
                                est.result_.gamma))

    if reference:
        rows += _reference_rows(ds, corpus, train, dev, k, backend, compat_dense, score)

    if adapters:
        from .baselines import LinearAdapter
        for side, label in (("query", "Adapter (queries)"), ("records", "Adapter (records)")):
            t0 = time.perf_counter()
            ad = LinearAdapter(side=side, backend=backend, progress=progress).fit(
                corpus, ds.train, ds.dev)
            sec = time.perf_counter() - t0
            hits = ad.search(test.embeddings, corpus, k)
            rows.append(AccuracyRow(ds.name, label, score(hits.indices), sec,
                                    note=f"best epoch {ad.best_epoch_}"))
    return rows


def _reference_rows(ds, corpus, train, dev, k, backend, compat_dense, score):
    try:
        import torch  # noqa: F401
        import nudge
    except ImportError as exc:
        log.warning("accuracy: nudge-ft not run (%s); pip install torch && pip install "
                    "--no-deps nudge-ft==0.1.2", exc)
        return []
    need = reference_memory(corpus, len(ds.dev))
    if need > _available_memory() / 2:
        return [AccuracyRow(ds.name, f"nudge-ft {v}", {}, None,
                            note=f"not run: needs about {need / 2**30:.1f} GiB")
                for v in ("NUDGEM", "NUDGEN")]
    data = np.ascontiguousarray(corpus, dtype=np.float32)  # its matmuls need float32
    rows = []
    for variant, cls in (("NUDGE-M", nudge.NUDGEM), ("NUDGE-N", nudge.NUDGEN)):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints progress
            dense = cls(device=torch.device("cpu")).finetune_embeddings(data, train, dev)
        sec = time.perf_counter() - t0
        hits = search(ds.test.embeddings, dense, k, metric="dot", backend=backend,
                      progress=False)
        diff = float(np.abs(dense - compat_dense[variant]).max())
        rows.append(AccuracyRow(ds.name, f"nudge-ft {cls.__name__}", score(hits.indices), sec,
                                note=f"max abs diff to compat {diff:.1e}"))
    return rows


def markdown(rows: list[AccuracyRow], info: dict, k: int = 10) -> str:
    """The table, one block per dataset, with the NDCG@k gain over no fine-tuning in points."""
    head = (f"CPU: {info['cpu']} ({info['threads_used']} of {info['cores']} cores used); "
            f"commit {info['commit']}. Test split; graded relevance; fit time: median of the "
            f"timed runs for nudgefast, one run for nudge-ft and the adapters.\n")
    lines = [head, f"| dataset | method | gamma | recall@{k} | NDCG@{k} | MRR@{k} | "
                   f"NDCG@{k} gain (points) | fit s | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r.dataset: r.scores.get(f"ndcg@{k}") for r in rows if r.method == "no fine-tuning"}
    for r in rows:
        s = r.scores
        fmt = lambda key: f"{s[key]:.4f}" if key in s else "-"
        gain = (f"{100 * (s[f'ndcg@{k}'] - base[r.dataset]):+.1f}"
                if f"ndcg@{k}" in s and r.method != "no fine-tuning" else "-")
        gamma = "-" if r.gamma is None else f"{r.gamma:.4g}"
        sec = "-" if r.fit_seconds is None else f"{r.fit_seconds:.3g}"
        lines.append(f"| {r.dataset} | {r.method} | {gamma} | {fmt(f'recall@{k}')} | "
                     f"{fmt(f'ndcg@{k}')} | {fmt(f'mrr@{k}')} | {gain} | {sec} | {r.note} |")
    return "\n".join(lines)


def dataset_folders(explicit=None):
    """The folders to evaluate: those given, else every dataset ``datasets.find()`` sees."""
    folders = [datasets.Path(f) for f in explicit] if explicit else datasets.find()
    if not folders:
        raise FileNotFoundError("no dataset found: pass --dataset DIR or set NUDGEFAST_DATA to "
                                "a folder of datasets in the shared format")
    return folders
