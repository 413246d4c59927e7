"""Top-k search over a streamed corpus, optionally with a NUDGE delta on top.

The corpus is never loaded whole and never copied: it is read in chunks of rows (a slice of
an ``np.memmap`` is a view), each chunk merged into a running (n_q, k) top-k by the backend's
fused ``topk_update``. Memory is O(chunk + n_q k), independent of N. A device corpus (CuPy,
torch CUDA tensor, ``__cuda_array_interface__`` / DLPack) goes to the GPU backend, which reads
it in place (``topk_stream``); it never crosses to the host.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np

from . import _arrays, _backends, _validate
from ._defaults import chunk_rows_for

log = logging.getLogger("nudgefast")


@dataclass(frozen=True)
class SearchResult:
    """Top-k per query: ``scores`` (n_q, k) float32 descending, ``indices`` (n_q, k) int64
    record rows (ties: lower index first; ``-1`` where fewer than k records exist). NumPy
    arrays, or arrays of the caller's device library when the corpus (else the queries) was a
    device array (CuPy, or torch CUDA tensors for a torch input)."""

    scores: np.ndarray
    indices: np.ndarray


def _progress_bar(progress, total, desc, unit="rows"):
    """A tqdm bar, or None: ``progress=None`` shows one only when stderr is a terminal."""
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; without it just stay quiet
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "rows", leave=False)


def topk_pass(backend, queries, corpus, k, *, exclude=None, normalize=True, chunk_rows=None,
              n_threads=None, progress=None, row_offset=0, state=None, name="corpus",
              desc="top-k", scorer=None):
    """Stream ``corpus`` once, merging it into the running top-k ``state`` (created when None).

    ``exclude``: sorted global record indices that are not candidates (the touched records).
    Rows are numbered from ``row_offset``. ``scorer``: a quantized corpus's per-chunk update
    (``_quantized.Scorer``; ``corpus`` is then its codes) instead of the float
    ``topk_update``. Returns ``(scores, indices)``.
    """
    if getattr(corpus, "DASK_ROWS", False):
        # A dask corpus (``_dask.DaskRows``) is scanned on its workers, one task per block;
        # Dask reports progress itself (the dashboard, ``distributed.progress``).
        from . import _dask
        return _dask.topk_pass(backend, queries, corpus, k, exclude=exclude, normalize=normalize,
                               chunk_rows=chunk_rows, n_threads=n_threads,
                               row_offset=row_offset, state=state, name=name)
    bar = _progress_bar(progress, corpus.shape[0], desc)  # one bar, for every backend
    try:
        if getattr(backend, "STREAMS_CORPUS", False) and scorer is None \
                and not getattr(corpus, "HOST_ROWS", False):
            # A backend that moves data itself (the GPU: pinned buffers, two streams, chunk
            # size from free memory) streams the corpus in one call, reporting rows to the bar;
            # same contract as the loop.
            scores, index, bad = backend.topk_stream(
                queries, corpus, k, exclude=exclude, normalize=normalize, chunk_rows=chunk_rows,
                n_threads=n_threads, progress=None if bar is None else bar.update,
                row_offset=row_offset, state=state)
            if bad >= 0:
                raise _validate.corpus_row_error(name, corpus, bad - row_offset, normalize)
            return scores, index
        if scorer is None:
            def scorer(chunk, g0, local, best_scores, best_index, n_threads):
                return backend.topk_update(queries, chunk, g0, local, normalize, best_scores,
                                           best_index, n_threads=n_threads)
        return _topk_loop(scorer, queries, corpus, k, exclude, normalize, chunk_rows, n_threads,
                          row_offset, state, name, bar)
    finally:
        if bar is not None:
            bar.close()


def _topk_loop(scorer, queries, corpus, k, exclude, normalize, chunk_rows, n_threads, row_offset,
               state, name, bar):
    """topk_pass for a backend without its own streaming: chunks through ``scorer`` (the
    backend's ``topk_update``, or a quantized corpus's op); a flagged row raises."""
    best_scores, best_index, bad = chunk_loop(scorer, queries, corpus, k, exclude, chunk_rows,
                                              n_threads, row_offset, state, bar)
    if bad >= 0:
        raise _validate.corpus_row_error(name, getattr(scorer, "rows", corpus),
                                         bad - row_offset, normalize)
    return best_scores, best_index


def chunk_loop(scorer, queries, corpus, k, exclude, chunk_rows, n_threads, row_offset, state,
               bar=None):
    """Merge ``corpus`` (host rows numbered from ``row_offset``) chunk by chunk into the top-k
    ``state`` (created when None) through ``scorer(chunk, first_row, local_exclude,
    best_scores, best_index, n_threads) -> first bad global row or -1``; ``exclude``: sorted
    global rows. Stops at the first chunk with a flagged row. Returns ``(scores, index, bad)``.
    The one chunk loop: here, and per block on a Dask worker (``_dask``)."""
    n_q = queries.shape[0]
    n_rows, d = corpus.shape
    if state is None:
        score_dtype = np.float64 if queries.dtype == np.float64 else np.float32
        state = (np.full((n_q, k), -np.inf, dtype=score_dtype), np.full((n_q, k), -1, np.int64))
    best_scores, best_index = state
    exclude = np.zeros(0, np.int64) if exclude is None else exclude
    step = chunk_rows or chunk_rows_for(n_q, d, corpus.dtype.itemsize)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        # A quantized corpus's dequantizing view fills one buffer for every chunk of the pass
        # (a fresh 64 MiB array per chunk would cost its page faults each time).
        chunk = corpus.chunk(start, stop) if getattr(corpus, "HOST_ROWS", False) \
            else corpus[start:stop]
        if not chunk.flags.c_contiguous:
            chunk = np.ascontiguousarray(chunk)  # a strided view: copy this chunk only
        g0, g1 = row_offset + start, row_offset + stop
        lo, hi = np.searchsorted(exclude, [g0, g1])
        bad = scorer(chunk, g0, exclude[lo:hi] - g0, best_scores, best_index, n_threads)
        if bad >= 0:
            return best_scores, best_index, int(bad)
        if bar is not None:
            bar.update(stop - start)
    return best_scores, best_index, -1


def normalize_pass(backend, corpus, out, *, chunk_rows=None, n_threads=None, name="corpus",
                   row_offset=0):
    """Stream ``corpus`` once into ``out`` (N, d) float32, every row normalised by the backend's
    ``normalize_rows`` (one read, one write). A row with NaN/inf or of norm zero raises, as in
    the top-k pass, naming it as row ``row_offset + r`` (a Dask block's first global row).
    ``corpus`` and ``out`` are both host arrays, or both CuPy arrays (the GPU backend
    normalises those on the device). Returns ``out``."""
    n, d = corpus.shape
    xp = _arrays.xp(corpus)
    step = chunk_rows or chunk_rows_for(1, d, corpus.dtype.itemsize)
    for start in range(0, n, step):
        chunk = corpus[start:start + step]
        if not chunk.flags.c_contiguous or chunk.dtype == np.float64:
            chunk = xp.ascontiguousarray(chunk, dtype=np.float32)  # this chunk only
        bad = backend.normalize_rows(chunk, out[start:start + step], n_threads=n_threads)
        if bad >= 0:
            raise _validate.row_error(name, row_offset + start + bad,
                                      _arrays.take_rows(corpus, [start + bad])[0], True)
    return out


def as_corrected(name, corpus, corrector, backend=None, n_threads=None):
    """The corrected view of a validated host ``corpus`` (:meth:`Corrector.view`, corrected by
    the ``backend`` module's ``correct_rows``); a device corpus is refused (the corrector's
    GEMMs run on the host)."""
    from .corrector import as_corrector
    corrector = as_corrector("corrector", corrector)
    if not _arrays.is_host(corpus):
        raise TypeError(f"{name}: a corrector is applied to host corpora (arrays, memmaps) "
                        f"and dask corpora; for a GPU array pass a host copy, or "
                        f"corrector.apply() it first")
    return corrector.view(corpus, backend, n_threads)


def rank_rows(scores, index, k=None):
    """Each row sorted by (score desc, index asc), -1 padding after every real candidate of
    equal (-inf) score; the first ``k`` columns (all without ``k``)."""
    order = rank_order(scores, index, k)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(index, order, axis=1)


def rank_order(scores, index, k=None):
    """The column order :func:`rank_rows` sorts each row by (for arrays riding along)."""
    key = np.where(index < 0, np.iinfo(np.int64).max, index)
    return np.lexsort((key, -scores), axis=1)[:, :k]


def merge_candidates(scores, indices, cand_scores, cand_indices, k):
    """Merge extra candidates into a top-k, keeping (score desc, index asc)."""
    return rank_rows(np.concatenate([scores.astype(np.float64), cand_scores.astype(np.float64)],
                                    axis=1), np.concatenate([indices, cand_indices], axis=1), k)


def search(queries, corpus, k, delta=None, *, metric="cosine", backend="auto", chunk_rows=None,
           n_threads=None, progress=None, query_block=4096, query_precision=None,
           rescore_multiplier=None, rescore_corpus=None, corrector=None) -> SearchResult:
    """Top-``k`` records for each query over ``corpus``, or over the tuned corpus ``delta``
    describes, without materialising a tuned copy.

    queries: (n_q, d) float array (a device array is copied to the host: it is small).
    corpus: (N, d) float32/float16 array or ``np.memmap``, or a device array (CuPy, torch CUDA
    tensor, anything with ``__cuda_array_interface__`` or DLPack), which the GPU backend reads
    in place (``backend="auto"`` picks it; a CPU backend raises); or a
    :class:`~nudgefast.QuantizedCorpus` (host codes, a memmap included), searched on its codes;
    or a row-chunked ``dask.array`` (from Zarr, ``.npy`` shards, ...), scanned block by block
    on the current Dask scheduler's workers, each resolving ``backend="auto"`` to its own
    fastest backend (an explicit name is used everywhere; see :mod:`nudgefast._dask`; only
    (n_q, k) lists come back).
    delta: a :class:`NudgeResult`; its touched records are scored by dot product with their
    tuned vectors, every other record by cosine (the tuned corpus is the normalised base plus
    the delta). metric: ``"cosine"`` (default) or ``"dot"`` for the base records without a
    delta.

    Quantized corpora (see :mod:`nudgefast._quantized` for the exact scores):
    query_precision: int8/uint8 codes: ``"float32"`` (default; exact dequantized scores) or
    ``"int8"`` (an integer inner product per row: faster, scores approximate); binary codes:
    ``"binary"`` (default; Hamming distance of the query's signs, score ``d - 2 * Hamming``)
    or ``"float32"`` (exact cosine of the float query with the +-1 sign vectors).
    rescore_multiplier: ``r``: the pass keeps ``k * r`` candidates (at most N), which are
    ranked again by the exact float64 score of the float query against their dequantized rows
    (binary: their sign vectors), or their rows of ``rescore_corpus`` (the float (N, d) corpus
    the codes came from, e.g. a memmap; only those rows are read) when given.
    Where Sentence-Transformers differs: its int8 pass ranks by the raw code inner product
    (queries quantized with the corpus's ranges, the per-dimension steps ignored), ours by
    ``(q * step) . u`` plus the per-query offset, which is the dequantized score. Its
    rescoring (6.2.0, read here) dequantizes uint8 candidates as ours does, and scores binary
    candidates against their 0/1 bits, which ranks them as our +-1 sign vectors do
    (``q . bits = (q . signs + sum(q)) / 2``).

    corrector: a fitted :class:`~nudgefast.Corrector`: ``corpus`` holds the old model's
    (stale) embeddings, ``queries`` the new model's; each chunk of the corpus is corrected
    (the map's GEMMs, its sampled records' fresh rows) right before the top-k kernel, so the
    corrected corpus is searched without being written (host arrays, memmaps and dask
    corpora; a ``delta`` fitted with the same corrector applies).

    Returns a :class:`SearchResult` with float32 scores and int64 indices, in the caller's
    array library (see :class:`SearchResult`).
    """
    from . import _quantized
    from .quantize import QuantizedCorpus

    quantized = isinstance(corpus, QuantizedCorpus)
    if not quantized and (query_precision is not None or rescore_multiplier is not None
                          or rescore_corpus is not None):
        arg = ("query_precision" if query_precision is not None else "rescore_multiplier"
               if rescore_multiplier is not None else "rescore_corpus")
        raise ValueError(f"{arg}: applies to a quantized corpus (nudgefast.quantize / "
                         f"QuantizedCorpus) only; leave it None for a float corpus")
    caller = corpus if not quantized and _arrays.is_device(corpus) else queries
    requested = backend  # a dask corpus's workers resolve "auto" themselves
    backend = _backends.resolve(
        backend, device_input="corpus" if not quantized and _arrays.is_device(corpus) else None)
    qc = corpus if quantized else None
    n_threads = _validate.as_threads("n_threads", n_threads)
    if quantized:
        if corrector is not None:
            raise ValueError("corrector: corrects float embeddings; pass the stale float "
                             "corpus (or qc.dequantize()), not a QuantizedCorpus")
        corpus = _quantized.DequantizedRows(qc, _backends.get(backend), n_threads)
    elif _arrays.is_dask(corpus):
        from . import _dask
        corpus = _dask.as_corpus("corpus", corpus, requested, corrector=corrector)
    else:
        corpus = _validate.as_corpus("corpus", corpus, backend=backend)
        if corrector is not None:
            corpus = as_corrected("corpus", corpus, corrector, _backends.get(backend), n_threads)
    n, d = corpus.shape
    q = _validate.as_queries("queries", queries, d)
    k = _validate.as_k("k", k, n)
    chunk_rows = _validate.as_size("chunk_rows", chunk_rows)
    query_block = _validate.as_size("query_block", query_block, allow_none=False)
    if metric not in ("cosine", "dot"):
        raise ValueError(f"metric: must be 'cosine' or 'dot', got {metric!r}")
    if quantized:
        query_precision, multiplier, rescore_corpus = _quantized.as_quantized_options(
            qc, query_precision, rescore_multiplier, rescore_corpus)
    impl = _backends.get(backend)
    exclude = None
    if delta is not None:
        if delta.n_records != n or delta.vectors.shape[1] != d:
            raise ValueError(f"delta: was fitted on a corpus of shape ({delta.n_records}, "
                             f"{delta.vectors.shape[1]}), not {tuple(corpus.shape)}; fit it on "
                             f"this corpus")
        if metric != "cosine":
            raise ValueError("metric: the tuned corpus scores untouched records by cosine; "
                             "leave metric='cosine' when passing delta")
        exclude = delta.indices
        if quantized and query_precision == "binary" and multiplier is None:
            raise ValueError("rescore_multiplier: the tuned records score by cosine, the binary "
                             "pass by Hamming distance; rescore the candidates (e.g. "
                             "rescore_multiplier=4) or pass query_precision='float32'")
    normalize = metric == "cosine"
    if not quantized:
        scores, index = topk_pass(impl, q, corpus, k, exclude=exclude, normalize=normalize,
                                  chunk_rows=chunk_rows, n_threads=n_threads, progress=progress)
    else:
        width = k if multiplier is None else min(n, k * multiplier)
        if query_precision == "float32":
            scores, index = topk_pass(impl, q, corpus, width, exclude=exclude,
                                      normalize=normalize, chunk_rows=chunk_rows,
                                      n_threads=n_threads, progress=progress)
        else:
            scorer = _quantized.Scorer(impl, qc, q, query_precision, normalize)
            scores, index = topk_pass(impl, q, qc.codes, width, exclude=exclude,
                                      normalize=normalize, chunk_rows=chunk_rows,
                                      n_threads=n_threads, progress=progress, scorer=scorer)
        if multiplier is not None:
            scores, index = _quantized.rescore(
                q, index, _quantized.rescore_rows(qc, rescore_corpus), normalize, k,
                name="corpus" if rescore_corpus is None else "rescore_corpus")
    if delta is not None and len(delta.indices):
        vec = delta.vectors.astype(np.float64)
        out_s = np.empty_like(scores)
        out_i = np.empty_like(index)
        for s in range(0, q.shape[0], query_block):
            e = min(s + query_block, q.shape[0])
            touched = q[s:e].astype(np.float64) @ vec.T
            kk = min(k, touched.shape[1])
            part = np.argpartition(-touched, kk - 1, axis=1)[:, :kk] if kk < touched.shape[1] \
                else np.broadcast_to(np.arange(touched.shape[1]), touched.shape)
            # Ties at the partition boundary must keep the lower record index: take every
            # candidate >= the kk-th score so the merge below applies the tie rule.
            kth = np.take_along_axis(touched, part, axis=1).min(axis=1, keepdims=True)
            cand = np.where(touched >= kth, touched, -np.inf)
            ms, mi = merge_candidates(scores[s:e], index[s:e], cand,
                                      np.broadcast_to(delta.indices, cand.shape), k)
            mi[np.isneginf(ms)] = -1
            out_s[s:e], out_i[s:e] = ms, mi
        scores, index = out_s, out_i
    if scores.dtype != np.float32:
        # Ranked in float64 (a delta's touched records, rescored candidates): two scores may
        # meet in float32, so the tie rule is applied again to the scores returned.
        scores, index = rank_rows(scores.astype(np.float32), index)
    return SearchResult(_arrays.like(scores, caller), _arrays.like(index, caller))
