"""Retrieval metrics: recall@k, ndcg@k (graded relevance), mrr@k."""
from __future__ import annotations

import warnings

import numpy as np

from . import _arrays, _backends
from .queryset import QuerySet, as_queryset, check_answers


def _check_retrieved(retrieved, k, n_records):
    """Each row a ranking: record ids >= 0 (``-1`` pads a short list), each at most once."""
    top = retrieved[:, :k]
    if (top < -1).any():
        i, j = map(int, np.argwhere(top < -1)[0])
        raise ValueError(f"retrieved: row {i} holds record {int(top[i, j])}; ids are record rows "
                         f">= 0 (-1 only as padding)")
    if n_records is not None and (top >= n_records).any():
        i, j = map(int, np.argwhere(top >= n_records)[0])
        raise ValueError(f"retrieved: row {i} holds record {int(top[i, j])}, which is >= "
                         f"n_records={n_records}")
    s = np.sort(top, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        i, j = map(int, np.argwhere(dup)[0])
        raise ValueError(f"retrieved: row {i} lists record {int(s[i, j])} more than once in its "
                         f"top {k}; a ranking holds each record once (deduplicate it first)")


def metrics(retrieved, queries: QuerySet, k: int = 10, *, backend="auto", per_query=False,
            n_records=None):
    """Mean recall@k, ndcg@k and mrr@k of ``retrieved`` against the answers of ``queries``.

    retrieved: (n, >=k) int record indices, best first (e.g. ``search(...).indices``); a
    device array (CuPy, torch CUDA tensor) is copied to the host (it is O(n k)).
    queries: the :class:`QuerySet` whose answers (and graded relevance) are the truth.
    recall@k = |top-k ∩ answers| / min(|answers|, k); ndcg@k uses the graded relevance with
    ideal DCG from the sorted grades; mrr@k = 1 / rank of the first answer (0 if none).
    Queries without answers are skipped with a warning. Returns a dict of floats, plus
    ``per_query`` (n, 3) array when asked (in the array library of ``retrieved``). A record listed twice in a row of ``retrieved``, an
    id below -1 (``-1`` pads), or (with ``n_records``) an id or answer >= N is an error.
    """
    caller = retrieved
    retrieved = _arrays.to_host(retrieved, "retrieved") if _arrays.is_device(retrieved) \
        else np.asarray(retrieved)
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
    _check_retrieved(retrieved, int(k), n_records)
    csr = queries.csr(unique=True)
    # Negative answers are always wrong; answers >= N only when N is known.
    check_answers("queries", csr, np.iinfo(np.int64).max if n_records is None
                  else int(n_records))
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
        out["per_query"] = _arrays.like(per, caller)
    return out
