"""Corpora on a Dask cluster: a row-chunked ``dask.array`` read where its blocks live.

A corpus of 10^8 - 10^9 records is a set of shards (a Zarr array, ``.npy`` files) read by a
cluster. The top-k pass distributes as NUDGE's cost does: each block of rows is scanned by the
backend's ``topk_update`` in a task on the worker that holds (or loads) it, giving an (n_q, k)
partial top-k; the partial lists merge in a binary tree of tasks with the single-machine tie
rule (score desc, index asc; ``-inf`` / ``-1`` padding), so the client receives one (n_q, k)
list. Only O(n_q k) per block crosses the network; the queries enter the graph once (one key
that the workers fetch), the excluded rows are sliced per block. The rows a fit needs (the
touched records, the selected candidates, one bad row for its error) are gathered by index,
one task per block that holds any of them: O(t) rows reach the client, never the corpus.

The graph runs on the current Dask scheduler: a ``distributed.Client`` when one is active
(the default client), else Dask's local scheduler. Dask is imported only when a dask array is
given, so the package imports without it.

Results equal the single-machine path's: a block's scores are the same float32 bits as the
same rows in the one-machine chunk loop for the cpp and numba backends (one fixed-order dot
product per score, independent of the chunk's shape); the numpy backend's BLAS product is not
(its last bits depend on the matrix shape), so its search scores agree within rounding only.
The fits re-score the selected candidates in float64 from their gathered rows, so they agree
bit for bit on every backend unless a float32 near-tie sits at the edge of the kept set.
"""
from __future__ import annotations

import numpy as np

from . import _backends, _validate
from ._arrays import is_dask  # noqa: F401  (re-exported: the one test, which imports nothing)
from ._defaults import chunk_rows_for
from .search import rank_rows

#: corpus dtypes the pass reads, as on one machine (``_validate.CORPUS_DTYPES``).
CORPUS_DTYPES = _validate.CORPUS_DTYPES


class DaskRows:
    """A validated row-chunked dask corpus: ``shape``/``dtype`` like an array, rows numbered
    across blocks by ``offsets`` (``offsets[b]`` is block ``b``'s first global row; the last
    entry is N). Never materialised on the client: :meth:`take` gathers rows by index."""

    DASK_ROWS = True

    def __init__(self, array, name="corpus"):
        self.array = array
        self.name = name
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 2
        self.offsets = np.r_[0, np.cumsum(array.chunks[0])].astype(np.int64)

    def blocks(self):
        """One ``dask.delayed`` object per block of rows, in row order."""
        return list(self.array.to_delayed().ravel())

    def take(self, rows) -> np.ndarray:
        """Rows ``rows`` (int64, any order, repeats allowed) as a host float64 (m, d) array.
        One task per block holding any of them, which sends back those rows only."""
        import dask

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((rows.size, self.shape[1]), dtype=np.float64)
        if rows.size == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"{self.name}: row index out of range [0, {self.shape[0]})")
        wanted, inverse = np.unique(rows, return_inverse=True)
        block_of = np.searchsorted(self.offsets, wanted, side="right") - 1
        blocks = self.blocks()
        parts, spans = [], []
        for b in np.unique(block_of):
            lo, hi = np.searchsorted(block_of, [b, b + 1])
            local = wanted[lo:hi] - self.offsets[b]
            parts.append(dask.delayed(_take_block, pure=True)(blocks[b], local))
            spans.append((lo, hi))
        got = np.empty((wanted.size, self.shape[1]), dtype=np.float64)
        for (lo, hi), part in zip(spans, dask.compute(*parts)):
            # float16/float32 rows widen exactly: the same float64 values as a host gather.
            got[lo:hi] = np.asarray(part, dtype=np.float64)
        out[...] = got[inverse.reshape(-1)]
        return out


def _take_block(block, local):
    """Runs on a worker: the rows ``local`` of one block, in its dtype (a copy)."""
    return np.asarray(block)[local]


def as_corpus(name: str, corpus) -> DaskRows:
    """A :class:`DaskRows` view of a dask array ``corpus``, checked like ``_validate.as_corpus``
    (2-D, float16/32/64, not empty) and for Dask's own constraints: blocks span every column
    (one block per row range) and their row counts are known."""
    if corpus.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D dask array of shape (N, d), got "
                         f"{corpus.ndim}-D shape {tuple(corpus.shape)}; reshape it to (N, d)")
    if np.dtype(corpus.dtype).type not in CORPUS_DTYPES:
        raise TypeError(f"{name}: dtype {corpus.dtype} is not supported; use float32 or float16 "
                        f"(e.g. {name}.astype(np.float32))")
    if any(np.isnan(c) for c in corpus.chunks[0]) or np.isnan(corpus.shape[1]):
        raise ValueError(f"{name}: the dask array's block sizes are unknown (NaN in "
                         f"{name}.chunks); global row numbers need them: call "
                         f"{name}.compute_chunk_sizes() first")
    if len(corpus.chunks[1]) != 1:
        raise ValueError(f"{name}: the dask array is chunked along its columns "
                         f"({len(corpus.chunks[1])} column blocks {corpus.chunks[1]}); each "
                         f"block must hold whole rows: pass {name}.rechunk({{1: -1}})")
    if corpus.shape[0] == 0 or corpus.shape[1] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(corpus.shape)}); pass at least one "
                         f"record with d >= 1")
    return DaskRows(corpus, name)


def _block_topk(block, queries, k, row_offset, exclude, normalize, backend, chunk_rows,
                n_threads):
    """Runs on a worker: one block's top-k ``(scores, index, first_bad)``, its rows numbered
    from ``row_offset``; ``exclude``: the sorted global excluded rows inside this block. The
    block is scanned in chunks as on one machine; the first bad row (global) stops it, since
    the client raises for the first bad row of the whole corpus anyway."""
    impl = _backends.get(backend)  # the worker's own module; raises with the install hint
    block = np.asarray(block)
    n_q = queries.shape[0]
    m, d = block.shape
    score_dtype = np.float64 if queries.dtype == np.float64 else np.float32
    best_scores = np.full((n_q, k), -np.inf, dtype=score_dtype)
    best_index = np.full((n_q, k), -1, dtype=np.int64)
    if m == 0:
        return best_scores, best_index, -1
    if getattr(impl, "STREAMS_CORPUS", False):
        # The GPU backend streams a host block itself (pinned buffers, its own chunk size).
        _, _, bad = impl.topk_stream(queries, block, k, exclude=exclude, normalize=normalize,
                                     chunk_rows=chunk_rows, n_threads=n_threads, progress=None,
                                     row_offset=row_offset, state=(best_scores, best_index))
        return best_scores, best_index, int(bad)
    step = chunk_rows or chunk_rows_for(n_q, d, block.dtype.itemsize)
    for start in range(0, m, step):
        stop = min(start + step, m)
        chunk = block[start:stop]
        if not chunk.flags.c_contiguous:
            chunk = np.ascontiguousarray(chunk)
        g0, g1 = row_offset + start, row_offset + stop
        lo, hi = np.searchsorted(exclude, [g0, g1])
        bad = impl.topk_update(queries, chunk, g0, exclude[lo:hi] - g0, normalize, best_scores,
                               best_index, n_threads=n_threads)
        if bad >= 0:
            return best_scores, best_index, int(bad)
    return best_scores, best_index, -1


def _merge(a, b):
    """Two partial top-k lists as one: (score desc, index asc), ``-inf``/``-1`` padding; the
    first bad row of the two (``-1``: none)."""
    k = a[0].shape[1]
    scores, index = rank_rows(np.concatenate([a[0], b[0]], axis=1),
                              np.concatenate([a[1], b[1]], axis=1), k)
    index[np.isneginf(scores)] = -1
    bads = [x for x in (a[2], b[2]) if x >= 0]
    return scores, index, min(bads) if bads else -1


def topk_pass(backend, queries, corpus: DaskRows, k, *, exclude=None, normalize=True,
              chunk_rows=None, n_threads=None, row_offset=0, state=None, name=None):
    """``search.topk_pass`` over a :class:`DaskRows` corpus, on the cluster: one task per
    block, a binary merge tree, one (n_q, k) result on the client; rows numbered from
    ``row_offset``. ``backend``: the module the
    client resolved; every worker loads the backend of that name. ``state`` (the running
    top-k, updated in place) is merged with the corpus's when given. Raises the one-machine
    error, naming the global row, for the first NaN/inf (or, with ``normalize``, zero) row."""
    import dask

    name = name or corpus.name
    queries = np.ascontiguousarray(queries)
    exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    q_key = dask.delayed(queries, pure=True)  # one key: the workers fetch it, once each
    backend_name = getattr(backend, "NAME", backend)
    parts = []
    for b, block in enumerate(corpus.blocks()):
        g0, g1 = row_offset + corpus.offsets[b], row_offset + corpus.offsets[b + 1]
        lo, hi = np.searchsorted(exclude, [g0, g1])
        parts.append(dask.delayed(_block_topk, pure=True)(
            block, q_key, int(k), int(g0), exclude[lo:hi].copy(), bool(normalize), backend_name,
            chunk_rows, n_threads))
    while len(parts) > 1:  # pairs: depth log2(blocks), each merge O(n_q k)
        parts = [dask.delayed(_merge, pure=True)(parts[i], parts[i + 1]) if i + 1 < len(parts)
                 else parts[i] for i in range(0, len(parts), 2)]
    scores, index, bad = dask.compute(parts[0])[0]
    if bad >= 0:
        # The row's values decide the message (NaN/inf or zero): fetch that one row.
        raise _validate.corpus_row_error(name, corpus, int(bad) - row_offset, normalize)
    if state is not None:
        merged = _merge((state[0], state[1], -1), (scores, index, -1))
        state[0][...] = merged[0]
        state[1][...] = merged[1]
        return state
    return scores, index
