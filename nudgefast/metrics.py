"""Retrieval metrics: recall@k, ndcg@k (graded relevance), mrr@k."""
from __future__ import annotations

import warnings

import numpy as np

from . import _backends
from .queryset import as_queryset, QuerySet


def metrics(retrieved, queries: QuerySet, k: int = 10, *, backend="auto", per_query=False):
    """Mean recall@k, ndcg@k and mrr@k of ``retrieved`` against the answers of ``queries``.

    retrieved: (n, >=k) int record indices, best first (e.g. ``search(...).indices``).
    queries: the :class:`QuerySet` whose answers (and graded relevance) are the truth.
    recall@k = |top-k ∩ answers| / min(|answers|, k); ndcg@k uses the graded relevance with
    ideal DCG from the sorted grades; mrr@k = 1 / rank of the first answer (0 if none).
    Queries without answers are skipped with a warning. Returns a dict of floats, plus
    ``per_query`` (n, 3) arrays when asked.
    """
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2 or retrieved.dtype.kind not in "iu":
        raise ValueError(f"retrieved: expected a 2-D integer array (n, k), got "
                         f"{retrieved.dtype} {retrieved.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= retrieved.shape[1]:
        raise ValueError(f"k: must be an int in [1, {retrieved.shape[1]}] (the columns of "
                         f"retrieved), got {k!r}")
    if not isinstance(queries, QuerySet):
        queries, _ = as_queryset("queries", queries, None)
    if len(queries) != retrieved.shape[0]:
        raise ValueError(f"retrieved: has {retrieved.shape[0]} rows for {len(queries)} queries")
    csr = queries.csr(unique=True)
    per = _backends.get(backend).metrics(retrieved.astype(np.int64, copy=False), csr.ptr,
                                         csr.index, csr.relevance, int(k))
    valid = ~np.isnan(per[:, 0])
    if not valid.all():
        warnings.warn(f"queries: {int((~valid).sum())} queries have no answers and are skipped",
                      stacklevel=2)
    if not valid.any():
        raise ValueError("queries: no query has an answer; metrics are undefined")
    mean = per[valid].mean(axis=0)
    out = {f"recall@{k}": float(mean[0]), f"ndcg@{k}": float(mean[1]), f"mrr@{k}": float(mean[2])}
    if per_query:
        out["per_query"] = per
    return out
