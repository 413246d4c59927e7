"""Corpora on a Dask cluster: a row-chunked ``dask.array`` read where its blocks live.

A corpus of 10^8 - 10^9 records is a set of shards (a Zarr array, ``.npy`` files) read by a
cluster. The top-k pass distributes as NUDGE's cost does: each block of rows is scanned by the
backend's ``topk_update`` in a task on the worker that reads it (mapped over the blocks, the
scan fuses with the task that reads the block, so a block is never a separate result the
scheduler could move to another worker), giving an (n_q, k) partial top-k. On a distributed
client each worker then merges the lists of the blocks it holds (one task pinned to it) with
the single-machine tie rule (score desc, index asc; ``-inf`` / ``-1`` padding), and the client
merges the W lists: O(n_q k) per worker crosses the network, whatever the number of blocks
(on Dask's local scheduler: a binary tree of merges). The queries and the excluded rows enter
the graph once each (one key a worker fetches once; each block takes its own range of the
exclusions).

A fit reads the corpus once: its touched records (and NUDGE-M's validation answers) are named
before its pass (:meth:`DaskRows.want`) and come back with the lists from the tasks that scan
their blocks, and each block scores its listed candidates in float64 (``nudge.exact_scores``'s
arithmetic, the same bits as on one machine), so the candidates' rows never travel. Rows
needed otherwise (rows a tuner's later operation touches, one bad row for its error) are
gathered by index, one task per block that holds any of them. O(t) rows reach the client, never the corpus.

``NudgeResult.apply`` writes a tuned corpus block by block, or (``touched_only``) only the
touched rows into the Zarr chunks or ``.npy`` shards that hold them (:func:`apply_touched`).

A corpus whose blocks are in the graph itself (``da.from_array`` of a NumPy array or of a
memmap: dask pickles the data into the graph) is read by the client and shipped to the
workers with the graph; the answers are the same, but at scale build the corpus so that the
workers read it: ``da.from_zarr``, or :func:`npy_corpus` for ``.npy`` shards.

The graph runs on the current Dask scheduler: a ``distributed.Client`` when one is active
(the default client), else Dask's local scheduler. Dask is imported only when a dask array is
given, so the package imports without it.

Each worker runs its own best backend: ``backend="auto"`` (the default) is resolved on the
worker that scans a block (:func:`worker_backend`: cuda on a GPU worker, else cpp > numba >
numpy), not on the client; an explicit name is used on every worker (and on the client, for
the small work it does). Workers with the same backend give the answers below; workers with
different backends score a record with different float32 rounding (cpp and numba differ in
the last bits), so a search's scores agree only to float32 rounding (and records tied within
it may swap), while the fits, which re-rank certified candidates in float64, stay the same.

Results equal the single-machine path's: a block's scores are the same float32 bits as the
same rows in the one-machine chunk loop for the cpp and numba backends (one fixed-order dot
product per score, independent of the chunk's shape); the numpy backend's BLAS product is not
(its last bits depend on the matrix shape), so its search scores agree within rounding only.
The fits rank by the float64 scores of certified candidates (``nudge.certified_topk``,
re-scored from their gathered rows), so they agree bit for bit on every backend, numpy
included (tested: tests/test_dask.py).
"""
from __future__ import annotations

import logging

import numpy as np

from . import _backends, _validate
from .search import chunk_loop, normalize_pass, rank_order

#: corpus dtypes the pass reads, as on one machine (``_validate.CORPUS_DTYPES``).
CORPUS_DTYPES = _validate.CORPUS_DTYPES

log = logging.getLogger("nudgefast")


class DaskRows:
    """A validated row-chunked dask corpus: ``shape``/``dtype`` like an array, rows numbered
    across blocks by ``offsets`` (``offsets[b]`` is block ``b``'s first global row; the last
    entry is N). Never materialised on the client: the rows :meth:`want` names come back
    with the next pass, :meth:`take` gathers others by index, and both are kept (a fit's
    touched records and NUDGE-M's answers; a tuner's later rows: O(touched rows)), each read
    once. With a ``corrector`` the view is of the corrected rows: ``take`` / ``[]`` return
    them (d_new wide), while the kept values are the stored stale rows."""

    DASK_ROWS = True

    def __init__(self, array, name="corpus", backend="auto", corrector=None):
        self.array = array
        self.name = name
        #: a fitted Corrector the rows are read through (stale corpus, corrected where each
        #: block is read; ``shape`` is then (N, d_new)), or None
        self.corrector = corrector
        #: the backend the workers use, as the caller named it: ``"auto"`` resolves on each
        #: worker (its own fastest: cuda on a GPU worker, else cpp > numba > numpy).
        self.backend = backend
        #: the backends the workers ran in the last pass (sorted names), for the log/tests.
        self.last_backends = ()
        self.shape = tuple(int(s) for s in array.shape)
        self.dtype = np.dtype(array.dtype)
        if corrector is not None:
            self.shape, self.dtype = (self.shape[0], corrector.d_new), np.dtype(np.float32)
        self.ndim = 2
        self.offsets = np.r_[0, np.cumsum(array.chunks[0])].astype(np.int64)
        self._rows = np.zeros(0, np.int64)  # sorted rows gathered so far
        self._values = np.zeros((0, array.shape[1]), array.dtype)  # their stored values
        self._pending = np.zeros(0, np.int64)  # rows the next pass brings along (want)

    def want(self, rows) -> None:
        """Rows the next pass over the corpus brings back with its lists (read by the tasks
        that scan their blocks, no pass of their own), for the :meth:`take` calls after it;
        a fit names its touched records (and NUDGE-M its validation answers) before its
        pass."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        rows = rows[(rows >= 0) & (rows < self.shape[0])]
        self._pending = np.union1d(self._pending, np.setdiff1d(rows, self._rows))

    def take_pending(self) -> np.ndarray:
        """The rows :meth:`want` named (sorted, unique), now handed to a pass."""
        rows, self._pending = self._pending, np.zeros(0, np.int64)
        return rows

    def keep(self, rows, values) -> None:
        """Rows a pass brought back (``rows`` corpus row numbers, ``values`` stored)."""
        new = ~np.isin(rows, self._rows)
        if new.any():
            rows = np.concatenate([self._rows, rows[new]])
            order = np.argsort(rows, kind="stable")
            self._rows = rows[order]
            self._values = np.concatenate([self._values, values[new]])[order]

    def prefetch(self, index) -> None:
        """Gather the rows of ``index`` (any shape; ``-1`` and rows already held skipped) in
        one pass over the blocks holding them, for the :meth:`take` calls that follow."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        self._gather(index[(index >= 0) & (index < self.shape[0])])

    def take(self, rows) -> np.ndarray:
        """Rows ``rows`` (int64, any order, repeats allowed) as a host float64 (m, d) array;
        the rows not held yet are gathered by one task per block holding any of them (fused
        with the task that reads the block), which sends back those rows only."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: row index out of range [0, {self.shape[0]})")
        return self._stored(rows).astype(np.float64)

    def __getitem__(self, key):
        """``rows[i]`` / ``rows[index_array]``: rows gathered by index (as :meth:`take`, in the
        corpus's dtype; an int gives one (d,) row). Slices are not supported: a range of rows
        is a pass, not a gather."""
        if isinstance(key, (int, np.integer)):
            return self._stored(np.array([key], np.int64))[0]
        if isinstance(key, (slice, tuple)) or key is Ellipsis:
            raise TypeError(f"{self.name}: a dask corpus is indexed by row numbers only (got "
                            f"{key!r}); scan it with search, gather rows with an index array")
        key = np.asarray(key)
        if key.dtype == bool:
            raise TypeError(f"{self.name}: a boolean mask would read the whole corpus; pass "
                            f"row numbers (np.flatnonzero(mask))")
        return self._stored(key.astype(np.int64))

    def stored_row(self, row) -> np.ndarray:
        """Row ``row`` as stored (the stale row under a corrector), for an error message."""
        self._gather(np.array([row], np.int64))
        return self._values[np.searchsorted(self._rows, row)]

    def _stored(self, rows):
        shape = rows.shape
        rows = rows.reshape(-1)
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: row index out of range [0, {self.shape[0]})")
        self._gather(rows)
        # float16/float32 widen exactly to float64: the same values as a host gather.
        values = self._values[np.searchsorted(self._rows, rows)]
        if self.corrector is not None:  # the stale rows, corrected here as on one machine
            values = self.corrector.corrected_rows(values, rows, backend=_backends.get(
                _backends.resolve(self.backend)))
        return values.reshape(shape + (self.shape[1],))

    def _gather(self, rows):
        missing = np.setdiff1d(rows, self._rows)
        if missing.size == 0:
            return
        self.keep(missing, gather_rows(self.array, self.offsets, missing))


def gather_rows(array, offsets, wanted) -> np.ndarray:
    """Rows ``wanted`` (sorted, unique) of a row-chunked dask ``array`` (block starts
    ``offsets``) in its dtype: one compute, one task per block holding any of them, fused
    with the task that reads the block (mapped over every block, only the blocks holding
    rows computed: ``array.blocks[...]`` first would make each block a separate result the
    scheduler could move to another worker), each block's rows sent straight to the client
    (not concatenated on a worker first, which would move them twice)."""
    import dask

    nb = len(offsets) - 1
    block_of = np.searchsorted(offsets, wanted, side="right") - 1
    held = np.unique(block_of)
    cuts = np.searchsorted(block_of, np.r_[held, held[-1] + 1])
    local = [np.zeros(0, np.int64)] * nb
    counts = np.zeros(nb, np.int64)
    for b, lo, hi in zip(held, cuts[:-1], cuts[1:]):
        local[b], counts[b] = wanted[lo:hi] - offsets[b], hi - lo
    parts = array.map_blocks(
        _take_block, dask.delayed(local, pure=True), dtype=array.dtype,
        chunks=(tuple(int(c) for c in counts), (array.shape[1],))
    ).to_delayed().ravel()[held].tolist()
    return np.concatenate(_compute_each(parts), axis=0)


def _compute_each(parts):
    """The results of the delayed ``parts`` on the current scheduler; on a distributed
    client, each sent from its worker to the client (``dask.compute`` of several would
    gather them into one finalize task on one worker first: the data would cross twice)."""
    import dask

    client = _client()
    if client is not None:
        return client.gather(client.compute(parts))
    return dask.compute(*parts)


def npy_corpus(paths, block_rows=None):
    """A row-chunked dask array over ``.npy`` shards (each (n_i, d), one dtype), whose blocks
    are read by the worker that scans them, as memmap slices: the graph holds paths and row
    ranges only, and each read fuses with the task that scans the block. (``da.from_array`` of
    a memmap pickles the memmap's data into the graph: the client would read and send every
    shard.) ``block_rows``: rows per block, blocks never spanning two shards; None: a block
    per shard. Only the headers are read here. The paths must name the same files on every
    worker."""
    import dask.array as da

    paths = [str(p) for p in ([paths] if isinstance(paths, (str, bytes)) or
                              hasattr(paths, "__fspath__") else paths)]
    if not paths:
        raise ValueError("paths: no .npy shard given; pass a list of .npy file paths")
    block_rows = _validate.as_size("block_rows", block_rows)
    parts, first = [], None
    for path in paths:
        shard = NpyShard(path)
        if shard.ndim != 2 or (first is not None and (shard.shape[1] != first.shape[1]
                                                      or shard.dtype != first.dtype)):
            width = f"{first.shape[1]} columns" if first is not None else "(n, d)"
            kind = f"of {first.dtype}" if first is not None else "of one dtype"
            raise ValueError(f"paths: {path} holds a {shard.dtype} array of shape "
                             f"{shard.shape}; every shard must be 2-D ({width}) {kind}")
        first = shard if first is None else first
        parts.append(da.from_array(shard, chunks=(block_rows or max(1, shard.shape[0]), -1),
                                   asarray=False))
    return da.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]


class NpyShard:
    """A ``.npy`` file as an array-like for ``da.from_array``: shape and dtype from its header,
    pickled as its path, each read a memmap slice opened where it runs (no copy, no data in
    the graph). Tokenized by path, size and modification time."""

    def __init__(self, path):
        self.path = str(path)
        head = np.load(self.path, mmap_mode="r")  # the header only; the data stays on disk
        self.shape, self.dtype, self.ndim = head.shape, head.dtype, head.ndim
        del head

    def __getitem__(self, key):
        return np.load(self.path, mmap_mode="r")[key]

    def __dask_tokenize__(self):
        import os
        st = os.stat(self.path)
        return ("nudgefast.NpyShard", self.path, st.st_size, st.st_mtime_ns, self.shape,
                str(self.dtype))


def _take_block(block, local, block_info=None):
    """Runs on a worker: the rows ``local[b]`` of block ``b``, in the corpus's dtype (a copy
    of those rows only)."""
    return np.asarray(block)[local[block_info[0]["chunk-location"][0]]]


def as_corpus(name: str, corpus, backend="auto", corrector=None) -> DaskRows:
    """A :class:`DaskRows` view of a dask array ``corpus``, checked like ``_validate.as_corpus``
    (2-D, float16/32/64, not empty) and for Dask's own constraints: blocks span every column
    (one block per row range) and their row counts are known. ``backend``: what the caller
    asked for (``"auto"``, or a name the client has already checked), which each worker
    resolves for itself (see :func:`worker_backend`). ``corrector``: a fitted Corrector
    whose view of the stale rows is the corpus (one graph key: its maps and its sample's
    fresh rows reach each worker once)."""
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
    if corrector is not None:
        from .corrector import as_corrector
        as_corrector("corrector", corrector)._check_corpus(tuple(int(s) for s in corpus.shape))
    return DaskRows(corpus, name, backend, corrector)


def worker_backend(backend):
    """Runs on a worker: the backend module for the caller's ``backend`` request, resolved
    here: ``"auto"`` is this worker's own fastest backend (``_backends.resolve("auto")``: cuda
    where CuPy sees a GPU, else cpp > numba > numpy), so a cluster of mixed workers uses each
    one's best; an explicit name loads that backend (raising, with the install hint, on a
    worker that lacks it)."""
    return _backends.get(backend)


def _block_topk(block, queries, exclude, wanted, corrector, *, k, row_offset, normalize,
                backend, chunk_rows, n_threads, exact, block_info=None):
    """Runs on a worker, fused with the task that reads the block: one block's part (see
    :func:`_part`), its rows numbered from ``row_offset`` plus the block's first row;
    ``exclude``: every sorted global excluded row (the block takes its own range);
    ``wanted``: sorted corpus rows (numbered from 0, not ``row_offset``) whose stored values
    ride along with the list (the rows a fit needs, read here instead of by a second pass over
    the blocks); ``exact``: also the
    float64 score of each listed record (``nudge.exact_scores``'s arithmetic, so the client
    need not gather the candidates' rows). The block is scanned in chunks as on one machine;
    its first bad row (global) ends the scan: the client raises for the corpus's first
    anyway. ``corrector``: a fitted Corrector the block's stale rows are read through (the
    wanted rows still travel as stored), or None."""
    impl = worker_backend(backend)  # resolved here: "auto" is this worker's best
    block = stored = np.asarray(block)
    first = int(block_info[0]["array-location"][0][0])  # the block's first corpus row
    offset = row_offset + first  # ... as numbered in the lists
    if corrector is not None:  # corrected chunk by chunk inside the scan (CorrectedRows)
        from .corrector import CorrectedRows  # the corpus was checked on the client
        block = CorrectedRows(stored, corrector, first, backend=impl, n_threads=n_threads)
    scores, index, bad = _scan(impl, block, queries, exclude, k, offset, normalize, chunk_rows,
                               n_threads)
    f64 = None
    if exact and bad < 0:
        from .nudge import exact_scores
        f64 = exact_scores(queries, index, lambda rows: np.asarray(
            block[rows - offset], dtype=np.float64))
    lo, hi = np.searchsorted(wanted, [first, first + block.shape[0]])
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = _part(scores, index, f64, bad, (impl.NAME,), wanted[lo:hi],
                      np.array(stored[wanted[lo:hi] - first]))
    return out


def _part(scores, index, f64, bad, used, rows, values):
    """What a block (or a merge of blocks) sends on: its (n_q, k) list (float32 scores and
    global rows; ``f64`` the float64 scores of those rows or None), its first bad global row
    (-1: none), the backends that scanned it (sorted names), and the wanted rows it holds
    (corpus row numbers and stored values)."""
    return dict(scores=scores, index=index, f64=f64, bad=int(bad), used=tuple(used),
                rows=rows, values=values)


def _scan(impl, block, queries, exclude, k, row_offset, normalize, chunk_rows, n_threads):
    """One block's ``(scores, index, first bad global row or -1)``, its rows numbered from
    ``row_offset``: the one-machine chunk loop (``search.chunk_loop``), or the GPU backend's
    own streaming of a host block (pinned buffers, its own chunk size)."""
    if getattr(impl, "STREAMS_CORPUS", False) and block.shape[0] \
            and not getattr(block, "HOST_ROWS", False):  # a corrected view: the chunk loop
        lo, hi = np.searchsorted(exclude, [row_offset, row_offset + block.shape[0]])
        scores, index, bad = impl.topk_stream(queries, block, k, exclude=exclude[lo:hi],
                                              normalize=normalize, chunk_rows=chunk_rows,
                                              n_threads=n_threads, progress=None,
                                              row_offset=row_offset, state=None)
        return scores, index, int(bad)

    def update(chunk, g0, local, best_scores, best_index, threads):
        return impl.topk_update(queries, chunk, g0, local, normalize, best_scores, best_index,
                                n_threads=threads)
    return chunk_loop(update, queries, block, k, exclude, chunk_rows, n_threads, row_offset,
                      None)


def _merge(*parts):
    """Partial results as one (:func:`_part`): the lists ranked by (score desc, index asc),
    ``-inf``/``-1`` padding, the float64 scores riding along; the first bad row; the union of
    the backends; the wanted rows concatenated. A block's part comes in its (1, 1) object
    array."""
    parts = [p[0, 0] if isinstance(p, np.ndarray) else p for p in parts]
    if len(parts) == 1:
        return parts[0]
    k = parts[0]["scores"].shape[1]
    scores = np.concatenate([p["scores"] for p in parts], axis=1)
    index = np.concatenate([p["index"] for p in parts], axis=1)
    order = rank_order(scores, index, k)  # rank_rows' order, applied to f64 too
    scores = np.take_along_axis(scores, order, axis=1)
    index = np.take_along_axis(index, order, axis=1)
    index[np.isneginf(scores)] = -1
    f64 = None
    if all(p["f64"] is not None for p in parts):
        f64 = np.take_along_axis(np.concatenate([p["f64"] for p in parts], axis=1), order,
                                 axis=1)
        f64[index < 0] = -np.inf
    bads = [p["bad"] for p in parts if p["bad"] >= 0]
    return _part(scores, index, f64, min(bads) if bads else -1,
                 sorted(set().union(*(p["used"] for p in parts))),
                 np.concatenate([p["rows"] for p in parts]),
                 np.concatenate([p["values"] for p in parts]))


def _client():
    """The active ``distributed.Client`` Dask would run a graph on, else None (the local
    scheduler)."""
    from dask.base import get_scheduler

    client = getattr(get_scheduler(), "__self__", None)
    if type(client).__name__ == "Client" and hasattr(client, "gather"):
        return client
    return None


#: Lists a worker merges at a time (the pass holds at most about this many per worker).
MERGE_FAN_IN = 8


def _reduce(parts):
    """The blocks' parts merged into one, on the current scheduler. On a distributed client:
    as blocks complete, the lists each worker holds are merged there, ``MERGE_FAN_IN`` at a
    time (a task pinned to that worker; it runs elsewhere only if the worker died), so a
    worker holds a bounded number of lists whatever its number of blocks; the client merges
    the last list of each worker: O(n_q k) per worker crosses the network, whatever the number
    of blocks. On the local scheduler: a binary tree of merges."""
    import dask

    client = _client()
    if client is None:
        while len(parts) > 1:  # pairs: depth log2(blocks), each merge O(n_q k)
            parts = [dask.delayed(_merge, pure=True)(parts[i], parts[i + 1])
                     if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
        return _merge(dask.compute(parts[0])[0])
    from distributed import as_completed

    def submit(fs, worker):
        return client.submit(_merge, *fs, workers=None if worker is None else [worker],
                             allow_other_workers=True, pure=False)

    held = {}  # worker -> finished lists there, not merged yet

    def place(fs, merge):
        """Group finished lists by the worker holding them (one ``who_has`` for all); with
        ``merge``, a worker's group reaching the fan-in is merged there."""
        holders = client.who_has(fs)
        for f in fs:
            worker = (tuple(holders.get(f.key, ())) or (None,))[0]  # None: lost, recomputed
            held.setdefault(worker, []).append(f)
            if merge and len(held[worker]) >= MERGE_FAN_IN:
                done.add(submit(held.pop(worker), worker))

    # Lists are placed in batches of about MERGE_FAN_IN per worker (one who_has round trip
    # per batch, not per block): a worker holds O(MERGE_FAN_IN) lists, not its every block's.
    batch_size = MERGE_FAN_IN * max(1, len(client.scheduler_info().get("workers", {})))
    done = as_completed(client.compute(parts))
    waiting = []
    for batch in done.batches():
        for f in batch:
            if f.status == "error":
                f.result()  # raises the worker's error (a bad backend request, a read error)
        waiting += batch
        if len(waiting) >= batch_size:
            place(waiting, merge=True)
            waiting = []
    place(waiting, merge=False)
    last = [submit(fs, w) if len(fs) > 1 else fs[0] for w, fs in held.items()]
    return _merge(*client.gather(last))


def topk_pass(backend, queries, corpus: DaskRows, k, *, exclude=None, normalize=True,
              chunk_rows=None, n_threads=None, row_offset=0, state=None, name=None,
              exact=False):
    """``search.topk_pass`` over a :class:`DaskRows` corpus, on the cluster: one task per
    block, the lists merged per worker (:func:`_reduce`), one (n_q, k) result on the client;
    rows numbered from ``row_offset``. ``backend``: the module the client resolved (for the
    client's own work); the workers use ``corpus.backend``, the caller's request, each
    resolving ``"auto"`` for itself (:func:`worker_backend`). ``state`` (the running top-k,
    updated in place) is merged with the corpus's when given. The rows :meth:`DaskRows.want`
    named ride along and are kept by ``corpus``. ``exact``: also return the float64 scores of
    the listed records (as ``nudge.exact_scores`` computes them), as a third array; not with
    ``state``. Raises the one-machine error, naming the global row, for the first NaN/inf
    (or, with ``normalize``, zero) row."""
    import dask

    if exact and state is not None:
        raise ValueError("exact: a pass merged into a running state has no float64 scores")
    name = name or corpus.name
    queries = np.ascontiguousarray(queries)
    exclude = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
    wanted = corpus.take_pending()
    nb = len(corpus.offsets) - 1
    # The queries, the exclusions and the wanted rows are one key each: a worker fetches each
    # once. Mapped over the blocks, the scan fuses with the task that reads each block (Zarr,
    # .npy, ...), so no block exists apart from it to be moved to another worker: only the
    # lists (and the wanted rows) travel.
    parts = corpus.array.map_blocks(
        _block_topk, dask.delayed(queries, pure=True), dask.delayed(exclude, pure=True),
        dask.delayed(wanted, pure=True), dask.delayed(corpus.corrector, pure=True),
        k=int(k), row_offset=int(row_offset),
        normalize=bool(normalize), backend=corpus.backend, chunk_rows=chunk_rows,
        n_threads=n_threads, exact=bool(exact), dtype=object, chunks=((1,) * nb, (1,)),
        meta=np.empty((0, 0), dtype=object),
    ).to_delayed().ravel().tolist()
    result = _reduce(parts)
    corpus.last_backends = result["used"]
    log.info("dask pass: %d blocks of %s scanned with backend(s) %s (requested %r)", nb, name,
             ", ".join(result["used"]), corpus.backend)
    corpus.keep(result["rows"], result["values"])  # corpus rows, as want() named them
    if result["bad"] >= 0:
        # The row's values decide the message (NaN/inf or zero): fetch that one row.
        raise _validate.corpus_row_error(name, corpus, result["bad"] - row_offset, normalize)
    scores, index = result["scores"], result["index"]
    if exact:
        return scores, index, result["f64"]
    if state is not None:
        merged = _merge(_part(state[0], state[1], None, -1, (), wanted[:0], wanted[:0]),
                        _part(scores, index, None, -1, (), wanted[:0], wanted[:0]))
        state[0][...] = merged["scores"]
        state[1][...] = merged["index"]
        return state
    return scores, index


def apply(result, corpus, out=None, *, chunk_rows=None, backend="auto", n_threads=None):
    """``NudgeResult.apply`` for a dask ``corpus``: the tuned corpus as a lazy dask array of
    the corpus's row blocks (float32: every row normalised by the backend's ``normalize_rows``,
    the touched rows replaced by ``result.vectors``), each block made by the worker that reads
    it, the delta one key in the graph; nothing is computed here when ``out`` is None.
    ``out``: a writable float32 Zarr array of shape (N, d), whose chunk rows every block
    boundary is a multiple of (so no two tasks write one Zarr chunk), or a list of float32
    ``.npy`` shard paths holding the N rows in order, each block inside one shard (as
    :func:`npy_corpus` cuts them); the blocks are computed and written to their regions
    (``da.store``; ``.npy`` shards through memmaps), and ``out`` is returned. It may be the
    storage ``corpus`` reads (in place): each task reads its block before writing it. A row
    with NaN/inf or of norm zero raises the one-machine error, naming its global row."""
    import dask
    import dask.array as da

    rows = as_corpus("corpus", corpus, backend)
    chunk_rows = _validate.as_size("chunk_rows", chunk_rows)
    n_threads = _validate.as_threads("n_threads", n_threads)
    _backends.resolve(backend)  # an unknown name fails here; "auto" resolves on each worker
    n, d = rows.shape
    if n != result.n_records or d != result.vectors.shape[1]:
        raise ValueError(f"corpus: shape {rows.shape} differs from the fitted corpus "
                         f"({result.n_records}, {result.vectors.shape[1]}); apply the result to "
                         f"the corpus it was fitted on")
    tuned = corpus.map_blocks(
        _apply_block, dask.delayed(np.asarray(result.indices, np.int64), pure=True),
        dask.delayed(np.asarray(result.vectors, np.float32), pure=True), backend=backend,
        chunk_rows=chunk_rows, n_threads=n_threads, dtype=np.float32,
        meta=np.empty((0, 0), dtype=np.float32))
    if out is None:
        return tuned
    if isinstance(out, (list, tuple)):
        target = _NpyWriter(out, rows)
    else:
        _check_zarr_out(out, rows)
        target = out
    da.store(tuned, target, lock=False)
    return out


def apply_touched(result, corpus, out=None):
    """``NudgeResult.apply(touched_only=True)`` for a dask ``corpus``: only the touched rows
    change, every other row stays as stored. ``out`` None: a lazy dask array (the corpus's
    blocks and dtype, the touched rows replaced in the tasks that read their blocks).
    ``out`` a Zarr array of the corpus's shape (float16/float32, any chunks), or a list of
    ``.npy`` shard paths holding the corpus's rows in order (float16/float32; the corpus's own
    shards tune it in place): the vectors are written by one task per Zarr chunk or shard
    holding touched rows, each sent its own rows' vectors only; the corpus is not read and no
    other chunk or shard is opened for writing. Returns ``out`` (or the lazy array)."""
    import dask

    rows = as_corpus("corpus", corpus)
    result._check_shape(rows.shape)
    indices = np.asarray(result.indices, np.int64)
    vectors = np.asarray(result.vectors, np.float32)
    if out is None:
        return corpus.map_blocks(_replace_rows, dask.delayed(indices, pure=True),
                                 dask.delayed(vectors, pure=True), dtype=corpus.dtype,
                                 meta=np.empty((0, 0), dtype=corpus.dtype))
    if isinstance(out, (list, tuple)):
        paths, offsets = _shards(out, rows, dtypes=(np.float16, np.float32))
        starts = offsets
        write = _write_npy_rows
        targets = paths
    else:
        _check_zarr_out(out, rows, dtypes=(np.float16, np.float32), aligned=False)
        starts = np.r_[np.arange(0, rows.shape[0], _write_unit(out)), rows.shape[0]]
        write = _write_zarr_rows
        targets = None
    which = np.searchsorted(starts, indices, side="right") - 1
    tasks = []
    for part in np.unique(which):
        sel = np.flatnonzero(which == part)
        target = out if targets is None else targets[part]
        tasks.append(dask.delayed(write, pure=False)(target, int(starts[part]), indices[sel],
                                                     vectors[sel]))
    if tasks:
        _compute_each(tasks)
    log.info("apply (touched rows only): %d rows written into %d of %d %s", indices.size,
             len(tasks), len(starts) - 1, "shards" if targets is not None else "Zarr chunks")
    return out


def _replace_rows(block, indices, vectors, block_info=None):
    """Runs on a worker: a copy of the block (its dtype) with its touched rows replaced."""
    block = np.array(block)
    offset = int(block_info[0]["array-location"][0][0])
    lo, hi = np.searchsorted(indices, [offset, offset + block.shape[0]])
    block[indices[lo:hi] - offset] = vectors[lo:hi]
    return block


def _write_npy_rows(path, first, rows, vectors):
    """Runs on a worker: ``vectors`` into the global ``rows`` of the shard at ``path`` (whose
    first global row is ``first``), through a memmap (only those rows' pages are written)."""
    shard = np.load(path, mmap_mode="r+")
    shard[rows - first] = vectors.astype(shard.dtype)
    shard.flush()
    del shard
    return rows.size


def _write_zarr_rows(array, first, rows, vectors):
    """Runs on a worker: ``vectors`` into ``rows`` of the Zarr ``array`` (all inside one of
    its write units (chunk or shard), which starts at ``first``: no other task writes it)."""
    # One region from the first to the last touched row (inside the unit, which Zarr reads and
    # rewrites whole anyway): a plain slice write, which every Zarr layout supports
    # (zarr 3.1's orthogonal selection mis-shapes row lists on sharded arrays).
    lo, hi = int(rows.min()), int(rows.max()) + 1
    region = array[lo:hi]
    region[rows - lo] = vectors.astype(array.dtype)
    array[lo:hi] = region
    return rows.size


def _shards(paths, rows, dtypes=(np.float32,)):
    """The ``.npy`` shard paths of an ``apply`` target and their first global rows (+ N):
    each 2-D, ``rows.shape[1]`` columns, one of ``dtypes``, the N rows in order."""
    paths = [str(p) for p in paths]
    sizes = []
    names = "/".join(np.dtype(t).name for t in dtypes)
    for path in paths:
        head = np.load(path, mmap_mode="r")
        if head.ndim != 2 or head.dtype not in dtypes or head.shape[1] != rows.shape[1]:
            raise ValueError(f"out: {path} holds a {head.dtype} array of shape "
                             f"{head.shape}; every shard must be {names} with "
                             f"{rows.shape[1]} columns (np.save(path, np.empty((n, "
                             f"{rows.shape[1]}), np.{np.dtype(dtypes[-1]).name})))")
        sizes.append(head.shape[0])
        del head
    offsets = np.r_[0, np.cumsum(sizes)].astype(np.int64)
    if offsets[-1] != rows.shape[0]:
        raise ValueError(f"out: the shards hold {int(offsets[-1])} rows, the corpus "
                         f"{rows.shape[0]}; pass shards of the corpus's rows, in order")
    return paths, offsets


class _NpyWriter:
    """``.npy`` shards (float32, (n_i, d), in row order) as the target of ``da.store``: a
    block's region is written into the one shard that holds it, through a memmap opened by
    the worker that made the block (pickled as paths and row offsets)."""

    def __init__(self, paths, rows):
        self.paths, self.offsets = _shards(paths, rows)
        split = np.setdiff1d(self.offsets[1:-1], rows.offsets)
        if split.size:
            raise ValueError(f"out: shard boundary at row {int(split[0])} falls inside a block "
                             f"of the corpus; a block must lie in one shard: rechunk the "
                             f"corpus at the shard boundaries (npy_corpus does)")

    def __setitem__(self, key, value):
        lo, hi = key[0].start, key[0].stop
        s = int(np.searchsorted(self.offsets, lo, side="right") - 1)
        shard = np.load(self.paths[s], mmap_mode="r+")
        shard[lo - self.offsets[s]:hi - self.offsets[s]] = value
        shard.flush()
        del shard


def _write_unit(out) -> int:
    """Rows of the unit a Zarr write rewrites: its shard (zarr 3 sharding: ``chunks`` are then
    the inner chunks, read and written together within one shard), else its chunk."""
    shards = getattr(out, "shards", None)
    return int((shards or out.chunks)[0])


def _check_zarr_out(out, rows, dtypes=(np.float32,), aligned=True):
    """``out`` is a Zarr array of the corpus's shape, of one of ``dtypes``, chunked by whole
    rows; ``aligned``: every block boundary of the corpus is a multiple of its chunk rows."""
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    chunks = getattr(out, "chunks", None)
    is_zarr = type(out).__module__.split(".", 1)[0] == "zarr"
    names = "/".join(np.dtype(t).name for t in dtypes)
    if not is_zarr or tuple(shape) != rows.shape or np.dtype(dtype) not in dtypes:
        raise ValueError(f"out: expected a {names} Zarr array of shape {rows.shape} (e.g. "
                         f"zarr.open_array(path, mode='w', shape={rows.shape}, "
                         f"chunks=(rows, {rows.shape[1]}), dtype='float32')), got "
                         f"{type(out).__name__} {dtype} {tuple(shape) if shape else ''}; or "
                         f"pass None for a lazy dask array")
    if len(chunks) != 2 or int(chunks[1]) != rows.shape[1]:
        raise ValueError(f"out: its Zarr chunks {tuple(chunks)} split the rows; chunk it "
                         f"({int(chunks[0])}, {rows.shape[1]}) with whole rows")
    if not aligned:
        return
    step = _write_unit(out)
    inner = rows.offsets[1:-1]
    if (inner % step).any():
        bad = inner[inner % step != 0]
        raise ValueError(f"out: its Zarr chunks {tuple(chunks)} do not line up with the "
                         f"corpus's row blocks (block boundary at row "
                         f"{int(bad[0]) if bad.size else '?'}); two tasks would write one "
                         f"Zarr chunk: pass corpus.rechunk({{0: {step}, 1: -1}}) or a Zarr "
                         f"array chunked ({step}, {rows.shape[1]}) with whole rows")


def _apply_block(block, indices, vectors, *, backend, chunk_rows, n_threads, block_info=None):
    """Runs on a worker, fused with the read of the block: the block's tuned rows (float32),
    normalised in chunks as on one machine, its touched rows replaced; ``backend`` resolved
    here (:func:`worker_backend`)."""
    impl = worker_backend(backend)
    block = np.asarray(block)
    offset = int(block_info[0]["array-location"][0][0])
    m, d = block.shape
    out = normalize_pass(impl, block, np.empty((m, d), dtype=np.float32), chunk_rows=chunk_rows,
                         n_threads=n_threads, row_offset=offset)
    lo, hi = np.searchsorted(indices, [offset, offset + m])
    out[indices[lo:hi] - offset] = vectors[lo:hi]
    return out
