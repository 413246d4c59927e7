"""NUDGE-M and NUDGE-N: validate inputs, call the backend ops, build a sparse result.

The result of NUDGE is a sparse delta: only the touched records T (those answering a train
query) move. The corpus is read once, by one streaming top-k pass of the validation queries
over the untouched records; every gamma is then scored against that plus the t touched
records only (see DESIGN.md §1).

A device corpus (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` / DLPack) is read in
place by the GPU backend: the pass streams it on the device, and the rows the fit needs (the
touched records, the exact scores of the selected candidates) are gathered there, so only
O(t) rows ever reach the host. The result (a small delta) is host NumPy arrays; ``apply``
returns the tuned corpus in the caller's array library.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from . import _arrays, _backends, _validate
from ._defaults import NUDGE_N_GAMMAS, VAL_BLOCK
from .queryset import AnswerCSR, as_queryset, check_answers
from .search import as_corrected, normalize_pass, rank_rows, topk_pass

log = logging.getLogger("nudgefast")


@dataclass
class NudgeResult:
    """The fitted delta.

    gamma: the chosen step. indices: (t,) int64 sorted touched record rows. vectors: (t, d)
    float32 tuned embeddings of those rows (every other record's tuned embedding is its
    normalised base embedding). gammas / val_accuracy: the candidates evaluated on the
    validation queries and their accuracy (NUDGE-N: the grid, accuracy@k_val; NUDGE-M: the
    left end of every segment of the sweep, fraction of validation pairs ranked top-1 there).
    n_records: N of the corpus it was fitted on. timings: seconds per stage. Host NumPy arrays
    whatever the corpus was (the delta is O(t d)).
    """

    variant: str
    gamma: float
    indices: np.ndarray
    vectors: np.ndarray
    gammas: np.ndarray
    val_accuracy: np.ndarray
    n_records: int
    timings: dict = field(default_factory=dict)
    #: Fitted on a :class:`~nudgefast.QuantizedCorpus`: its precision, and ``vectors``
    #: re-quantized with the corpus's ranges ((t, d) or (t, ceil(d/8)) codes; None otherwise).
    precision: str | None = None
    codes: np.ndarray | None = None

    def apply(self, corpus, out=None, *, touched_only=False, chunk_rows=None, backend="auto",
              n_threads=None):
        """The tuned corpus (N, d) float32: every row normalised, touched rows replaced.

        ``touched_only=True``: only the touched rows change; every other row stays as stored
        (its dtype, its norm: search normalises rows as it scores them, so for a corpus of
        unit rows the answers are those of the full apply up to the normalisation's
        rounding). Nothing but those rows is read or written: ``out`` (the corpus itself, or
        storage holding its rows: a float16/float32 array or memmap of its shape, a Zarr
        array, ``.npy`` shard paths) gets ``vectors`` written into the touched rows, rounded
        to its dtype; without ``out``, a copy of the corpus in its dtype (for a dask corpus a
        lazy dask array) with those rows replaced. A dask corpus's storage is written by one
        task per Zarr chunk or ``.npy`` shard holding touched rows; the other chunks and shards
        are not touched. Not for a quantized corpus (its ``apply`` only re-codes the touched
        rows already).

        Streams ``corpus`` through the backend's ``normalize_rows`` (one read, one write: it
        runs at memory bandwidth); writes into ``out`` when given (a C-contiguous float32
        (N, d) array or memmap; it may be ``corpus`` itself to tune in place), else allocates.
        A device ``corpus`` (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` / DLPack)
        is tuned on the device by the GPU backend (``backend="auto"`` picks it), into a new
        device array of the caller's library (CuPy; torch for a torch tensor) or into a device
        ``out``; it never crosses to the host. A row with NaN/inf or of norm zero raises, as in
        ``fit`` (what ``out`` holds then is unspecified; ``corpus`` is unchanged unless it is
        ``out``).

        A :class:`~nudgefast.QuantizedCorpus` gives a QuantizedCorpus (same precision and
        ranges) whose touched rows hold ``vectors``, each scaled to its record's dequantized
        norm (the scale the ranges fit), quantized with its ranges; ``out``: a codes array of
        the same shape and dtype to write into (``corpus.codes`` itself tunes it in place;
        another array sharing its memory is refused), else a new one. The other rows' codes
        are copied in chunks.

        A row-chunked ``dask.array`` gives a lazy dask array of the tuned corpus (same row
        blocks, float32; each block normalised and its touched rows replaced on the worker
        that reads it), or, with ``out`` a float32 Zarr array of the corpus's shape whose
        chunks the blocks align with, or a list of float32 ``.npy`` shard paths (the corpus's
        own storage tunes it in place), writes it there block by block and returns ``out``.
        See :func:`nudgefast._dask.apply`.
        """
        from .quantize import QuantizedCorpus
        if isinstance(corpus, QuantizedCorpus):
            if touched_only:
                raise ValueError("touched_only: a quantized corpus's apply re-codes only the "
                                 "touched rows already; leave touched_only False")
            return self._apply_codes(corpus, out, chunk_rows)
        if _arrays.is_dask(corpus):
            from . import _dask
            if touched_only:
                return _dask.apply_touched(self, corpus, out)
            return _dask.apply(self, corpus, out, chunk_rows=chunk_rows, backend=backend,
                               n_threads=n_threads)
        if touched_only:
            return self._apply_touched(corpus, out)
        caller = corpus
        on_device = _arrays.is_device(corpus)
        backend = _backends.resolve(backend, device_input="corpus" if on_device else None)
        corpus = _validate.as_corpus("corpus", corpus, backend=backend)
        chunk_rows = _validate.as_size("chunk_rows", chunk_rows)
        n_threads = _validate.as_threads("n_threads", n_threads)
        impl = _backends.get(backend)
        n, d = corpus.shape
        self._check_shape(corpus.shape)
        if out is None:
            target = _arrays.xp(corpus).empty((n, d), dtype=np.float32)
        else:
            target = _out_array(out, (n, d), on_device)
        normalize_pass(impl, corpus, target, chunk_rows=chunk_rows, n_threads=n_threads)
        _arrays.put_rows(target, self.indices, self.vectors)
        return out if out is not None else _arrays.like(target, caller)

    def _apply_touched(self, corpus, out):
        """``apply(touched_only=True)`` for a host or device array: ``vectors`` written into
        the touched rows of ``out`` (or of a copy of the corpus)."""
        on_device = _arrays.is_device(corpus)
        corpus = _validate.as_corpus("corpus", corpus, backend="cuda" if on_device else None)
        self._check_shape(corpus.shape)
        if out is None:
            target = _arrays.xp(corpus).array(corpus, copy=True)
        else:
            target = _arrays.device_view(out, "out") if on_device and _arrays.is_device(out) \
                else out
            shape = tuple(corpus.shape)
            if (_arrays.is_device(target) != on_device
                    or tuple(getattr(target, "shape", ())) != shape
                    or getattr(target, "dtype", None) not in (np.float16, np.float32)
                    or (not on_device and not (isinstance(target, np.ndarray)
                                               and target.flags.writeable))):
                raise ValueError(f"out: expected a writable float16/float32 array of shape "
                                 f"{shape} where the corpus lives, holding its rows (the "
                                 f"corpus itself to tune in place), got "
                                 f"{getattr(out, 'dtype', type(out).__name__)} "
                                 f"{tuple(getattr(out, 'shape', ()))}; or pass None for a copy")
        _arrays.put_rows(target, self.indices, self.vectors.astype(target.dtype))
        return out if out is not None else target

    def _check_shape(self, shape):
        n, d = shape
        if n != self.n_records or d != self.vectors.shape[1]:
            hint = (" (a result fitted with a corrector is in the new model's space: apply it "
                    "to corrector.apply(corpus))" if n == self.n_records else "")
            raise ValueError(f"corpus: shape {tuple(shape)} differs from the fitted corpus "
                             f"({self.n_records}, {self.vectors.shape[1]}); apply the result "
                             f"to the corpus it was fitted on{hint}")

    def _apply_codes(self, qc, out, chunk_rows):
        from ._quantized import requantize
        from .quantize import QuantizedCorpus, _chunk_rows
        if len(qc) != self.n_records or qc.d != self.vectors.shape[1]:
            raise ValueError(f"corpus: a quantized corpus of ({len(qc)}, {qc.d}) differs from "
                             f"the fitted corpus ({self.n_records}, {self.vectors.shape[1]}); "
                             f"apply the result to the corpus it was fitted on")
        codes = qc.codes
        if out is None:
            target = np.empty(codes.shape, codes.dtype)
        elif (not isinstance(out, np.ndarray) or out.shape != codes.shape
              or out.dtype != codes.dtype):
            raise ValueError(f"out: expected a writable {codes.dtype} array of shape "
                             f"{codes.shape} (the codes), got "
                             f"{getattr(out, 'dtype', type(out).__name__)} "
                             f"{tuple(getattr(out, 'shape', ()))}; pass None or corpus.codes")
        elif not out.flags.writeable:
            raise ValueError("out: is read-only; open the codes' memmap with mode 'r+' to tune "
                             "them in place, or pass None for a new array")
        elif out is not codes and np.may_share_memory(out, codes):
            raise ValueError("out: shares memory with corpus.codes without being it; pass "
                             "corpus.codes itself to tune in place, or a separate array")
        else:
            target = out
        tuned = requantize(self.vectors, qc, self.indices)
        if target is not codes:
            step = _chunk_rows(chunk_rows, codes.shape[1])
            for lo in range(0, codes.shape[0], step):
                target[lo:lo + step] = codes[lo:lo + step]
        target[self.indices] = tuned
        return QuantizedCorpus(target, qc.precision, qc.d, qc.ranges)

    def __repr__(self) -> str:
        best = float(np.nanmax(self.val_accuracy)) if self.val_accuracy.size else float("nan")
        seconds = sum(self.timings.values())
        return (f"NudgeResult({self.variant}, gamma={self.gamma:.6g}, touched "
                f"{self.indices.size} of {self.n_records} records, d={self.vectors.shape[1]}, "
                f"best validation accuracy {best:.4f} over {self.gammas.size} gammas, "
                f"fit {seconds:.3g} s)")


def _out_array(out, shape, on_device):
    """``apply``'s ``out``: a writable C-contiguous float32 array of ``shape`` where the corpus
    lives (host, or device for a device corpus); returns the array to write (a CuPy view of a
    device ``out``)."""
    where = "device" if on_device else "host"
    if not on_device:
        fix = f"allocate np.empty({shape}, np.float32)"
    elif _arrays._is_torch(out):
        fix = f"allocate torch.empty({shape}, dtype=torch.float32, device='cuda')"
    else:
        fix = f"allocate cupy.empty({shape}, cupy.float32)"
    arr = None
    if on_device == _arrays.is_device(out):
        arr = _arrays.device_view(out, "out") if on_device else out
    ok = arr is not None and (on_device or isinstance(arr, np.ndarray)) \
        and tuple(arr.shape) == shape and arr.dtype == np.float32 and arr.flags.c_contiguous \
        and (on_device or arr.flags.writeable)
    if not ok:
        raise ValueError(f"out: expected a writable C-contiguous float32 {where} array of shape "
                         f"{shape} (the corpus is a {where} array), got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}; {fix} or pass None")
    return arr


# ----------------------------------------------------------------------------------------
# Shared preparation


@dataclass
class _Prepared:
    corpus: np.ndarray
    backend: object
    val_q: np.ndarray  # (n_val, d) queries actually used (non-empty answers)
    val_csr: AnswerCSR
    touched: np.ndarray  # (t,) sorted int64
    grad: np.ndarray  # (t, d) float64 query gradient c_j
    base: np.ndarray  # (t, d) float64 normalised base rows e_j
    timings: dict
    backend_name: str = ""  # the resolved backend (its name)
    quantized: object = None  # the QuantizedCorpus behind ``corpus`` (a DequantizedRows view)


def _prepare(corpus, train, val, backend, dtype, *, unique_train, unique_val, skip_empty_val,
             n_threads, device_ok=False, quantized_ok=False, dask_ok=False,
             defer_base=False, corrector=None) -> _Prepared:
    """Validated inputs, the query gradients and the touched base rows. ``device_ok``: a
    device corpus is read in place by the GPU backend (``prep.corpus`` is then a CuPy view);
    without it (callers that need host rows) a device corpus is an error. ``quantized_ok``: a
    :class:`QuantizedCorpus` is read through its dequantized rows (``prep.corpus`` is then a
    ``DequantizedRows`` view: the pass streams the codes, the touched rows are dequantized).
    ``dask_ok``: a row-chunked dask array is read on its cluster (``prep.corpus`` is then a
    ``_dask.DaskRows``); without it a dask corpus is an error. ``defer_base``: a dask
    corpus's touched rows are read by the fit's pass (``prep.base`` is None until
    ``_untouched_topk`` sets it), not by a gather of their own before it. ``corrector``: the
    corpus holds stale embeddings, read through the corrector (``prep.corpus`` is then its
    corrected view; see :mod:`nudgefast.corrector`)."""
    from ._quantized import DequantizedRows
    from .quantize import QuantizedCorpus
    qc = corpus if isinstance(corpus, QuantizedCorpus) else None
    if qc is not None and not quantized_ok:
        raise TypeError("corpus: a QuantizedCorpus is searched and fitted by search / NudgeN / "
                        "NudgeM; here pass float rows (corpus.dequantize(), or the float "
                        "corpus the codes came from)")
    on_device = device_ok and qc is None and _arrays.is_device(corpus)
    requested = backend  # a dask corpus's workers resolve "auto" themselves
    backend = _backends.resolve(backend, device_input="corpus" if on_device else None)
    if qc is not None:
        if corrector is not None:
            raise ValueError("corrector: corrects float embeddings; pass the stale float "
                             "corpus (or corpus.dequantize()), not a QuantizedCorpus")
        corpus = DequantizedRows(qc, _backends.get(backend), n_threads)
    elif dask_ok and _arrays.is_dask(corpus):
        # Scanned on its workers (search.topk_pass), its rows gathered by index (take_rows).
        from . import _dask
        corpus = _dask.as_corpus("corpus", corpus, requested, corrector=corrector)
    else:
        corpus = _validate.as_corpus("corpus", corpus, backend=backend if device_ok else None)
        if corrector is not None:
            corpus = as_corrected("corpus", corpus, corrector, _backends.get(backend), n_threads)
    n, d = corpus.shape
    impl = _backends.get(backend)
    train, train_q = as_queryset("train", train, d, dtype)
    val, val_q = as_queryset("val", val, d, dtype)
    train_csr = train.csr(unique=unique_train)
    val_csr = val.csr(unique=unique_val)
    check_answers("train", train_csr, n)
    check_answers("val", val_csr, n)
    if train_csr.index.size == 0:
        raise ValueError("train: has no (query, answer) pairs; NUDGE needs at least one train "
                         "query with an answer")
    if len(val) == 0:
        raise ValueError("val: has no queries; gamma is chosen on validation queries, pass some")
    timings = {}
    empty = val_csr.counts == 0
    if empty.any() and skip_empty_val:
        warnings.warn(f"val: {int(empty.sum())} validation queries have no answers and are "
                      f"skipped", stacklevel=3)
        keep = np.flatnonzero(~empty)
        if keep.size == 0:
            raise ValueError("val: no validation query has an answer; give answer lists")
        val_q = val_q[keep]
        val_csr = AnswerCSR(np.r_[0, np.cumsum(val_csr.counts[keep])].astype(np.int64),
                            np.concatenate([val_csr.index[val_csr.ptr[i]:val_csr.ptr[i + 1]]
                                            for i in keep]),
                            np.concatenate([val_csr.relevance[val_csr.ptr[i]:val_csr.ptr[i + 1]]
                                            for i in keep]))
    t0 = time.perf_counter()
    records = train_csr.index
    touched, grad = query_gradients(
        impl, train_q, np.repeat(np.arange(len(train), dtype=np.int64), train_csr.counts),
        records, n_threads=n_threads)
    if defer_base and getattr(corpus, "DASK_ROWS", False):
        corpus.want(touched)  # read with the pass's blocks; the base rows follow the pass
        base = None
    else:
        base = touched_base(corpus, touched)
    timings["query_gradient"] = time.perf_counter() - t0
    log.info("NUDGE: N=%d d=%d, %d train pairs touch t=%d records, %d validation queries",
             n, d, records.size, touched.size, val_q.shape[0])
    return _Prepared(corpus, impl, val_q, val_csr, touched, grad, base, timings, backend, qc)


def touched_base(corpus, touched):
    """The touched records' normalised float64 rows (a zero or NaN/inf row raises, naming
    it)."""
    return unit_rows(_arrays.take_rows(corpus, touched), touched,
                     lambda row: _validate.corpus_row_error("corpus", corpus, row, True))


def query_gradients(impl, queries, pair_query, pair_record, *, n_threads=None):
    """The touched records (sorted) and their query gradients ``c_j``: the (query, record)
    pairs grouped by record, queries in arrival order inside a group, the order every fit
    sums in (so a fit and the tuner's updates get the same bits). Only the queries the pairs
    name are read."""
    order = np.lexsort((pair_query, pair_record))
    pr, pq = pair_record[order], pair_query[order]
    if pr.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, queries.shape[1]))
    first = np.r_[True, pr[1:] != pr[:-1]]
    seg_ptr = np.r_[np.flatnonzero(first), pr.size].astype(np.int64)
    rows, local = np.unique(pq, return_inverse=True)
    grad = impl.query_gradient(queries[rows], local.astype(np.int64), seg_ptr,
                               n_threads=n_threads)
    return pr[first], grad


def unit_rows(rows, positions, error):
    """float64 ``rows`` divided by their norms, in place; ``error(position)`` is raised for the
    first row of norm zero or not finite (``positions`` name the rows)."""
    norms = np.linalg.norm(rows, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise error(int(np.asarray(positions)[np.argmax(bad)]))
    rows /= norms[:, None]
    return rows


def score_eps(queries) -> np.ndarray:
    """Per query, a bound on |float32 pass score - float64 score| of any record: a float32 dot
    product over d terms in any order errs by at most about d u |q| |x| (u = 2^-24), and the
    normalisation by a few u more; (d + 16) u |q| covers both, with room."""
    d = queries.shape[1]
    return (d + 16) * 2.0 ** -24 * np.linalg.norm(np.asarray(queries, np.float64), axis=1)


def certified_topk(scan, queries, rows_of, need, width):
    """Each query's exact float64 top of the untouched records: ``(scores, index, complete)``,
    (n_q, width) sorted by (score desc, index asc).

    ``scan(rows, k)`` is the float32 pass for queries ``rows`` (its top-k state, and
    optionally a third array: the float64 scores of the kept records, as :func:`exact_scores`
    computes them); the float64 scores of what it kept re-rank them. A kept record is certain when its float64 score beats
    every record the pass dropped: those scored at most the lowest kept float32 score, so at
    most that plus ``score_eps`` in float64. Lists hold their certain prefix only (``-inf`` /
    ``-1`` after it); a query with fewer than ``need`` certain records is scanned again with 4x
    the width (logged), until it has them or the pass kept every candidate (``complete``).
    Without this a float32 near-tie at the edge of the kept set would decide which record a
    fit sees, and a fit and the tuner (which keeps more) would disagree.
    """
    n_q = queries.shape[0]
    eps = score_eps(queries)
    out_s, out_i = np.full((n_q, width), -np.inf), np.full((n_q, width), -1, np.int64)
    complete = np.zeros(n_q, bool)
    todo, k = np.arange(n_q), width
    while todo.size:
        found = scan(todo, k)
        s32, idx = found[0], found[1]
        kept = idx >= 0
        # A scan that scored its records in float64 where they live (a dask corpus's
        # workers) returns them as a third array: the same numbers exact_scores gives.
        f64 = found[2] if len(found) > 2 else exact_scores(queries[todo], idx, rows_of)
        f64, idx = rank_rows(f64, idx)
        full = kept.all(axis=1)
        low = np.where(kept, s32, np.inf).min(axis=1) + eps[todo]
        certain = np.where(full[:, None], f64 > low[:, None], idx >= 0)
        count = certain.sum(axis=1)
        done = ~full | (count >= need)
        w = min(width, k)
        keep = certain[done][:, :w]
        out_s[todo[done], :w] = np.where(keep, f64[done][:, :w], -np.inf)
        out_i[todo[done], :w] = np.where(keep, idx[done][:, :w], -1)
        complete[todo[done]] = ~full[done] & (kept[done].sum(axis=1) <= width)
        todo, k = todo[~done], 4 * k
        if todo.size:
            log.info("NUDGE: %d validation queries have float32 near-ties at the edge of their "
                     "kept candidates; scanning them again with %d", todo.size, k)
    return out_s, out_i, complete


#: Candidates a fit keeps beyond what the gamma choice needs, so that its float64 re-ranking
#: can certify the top (``certified_topk``); a near-tie wider than this costs a rescan.
FIT_EXTRA = 8


def _untouched_topk(prep: _Prepared, need, *, extra_corpus, chunk_rows, n_threads, progress):
    t0 = time.perf_counter()
    n = prep.corpus.shape[0]

    def scan(rows, k):
        q = prep.val_q[rows]
        show = progress if rows.size == prep.val_q.shape[0] else False
        if on_cluster:
            # Scored in float64 on the workers (no candidate rows to gather); the rows the
            # fit named (DaskRows.want) come back with the lists.
            from . import _dask
            return _dask.topk_pass(prep.backend, q, prep.corpus, k, exclude=prep.touched,
                                   chunk_rows=chunk_rows, n_threads=n_threads, exact=True)
        state = topk_pass(prep.backend, q, prep.corpus, k, exclude=prep.touched,
                          chunk_rows=chunk_rows, n_threads=n_threads, progress=show,
                          desc="NUDGE corpus pass")
        if extra_corpus is not None:
            state = topk_pass(prep.backend, q, extra_corpus, k, chunk_rows=chunk_rows,
                              n_threads=n_threads, progress=show, state=state, row_offset=n,
                              name="nontrain_embeddings", desc="NUDGE corpus pass (non-train)")
        if getattr(prep.corpus, "DASK_ROWS", False):
            # The candidates' rows in one gather from the cluster, not one per query block.
            prep.corpus.prefetch(state[1][state[1] < n])
        return state

    on_cluster = getattr(prep.corpus, "DASK_ROWS", False) and extra_corpus is None

    def rows_of(rows):
        # Gathered where the corpus lives: a device corpus sends back these rows only.
        vec = np.empty((rows.size, prep.corpus.shape[1]))
        main = rows < n
        vec[main] = _arrays.take_rows(prep.corpus, rows[main])
        if not main.all():
            vec[~main] = _arrays.take_rows(extra_corpus, rows[~main] - n)
        return vec

    # The pass selects; the scores that enter the gamma math are recomputed in float64 from
    # the selected rows, so they are exactly comparable with the touched records' float64
    # scores (mixing float32 and float64 scores of tied answers would split intervals that
    # meet at one point by rounding noise), and certified (see certified_topk).
    scores, index, _ = certified_topk(scan, prep.val_q, rows_of, need, need + FIT_EXTRA)
    if prep.base is None:  # a dask corpus: the touched rows came back with the pass
        prep.base = touched_base(prep.corpus, prep.touched)
    prep.timings["corpus_pass"] = time.perf_counter() - t0
    return scores, index


def exact_scores(queries, index, rows_of, block=VAL_BLOCK):
    """float64 ``v . x / |x|`` of each listed record (``index`` (n_q, k), -1: -inf), the rows
    gathered by ``rows_of(positions) -> float64 (m, d)``. One einsum over contiguous gathered
    operands per block: the same value for the same (query, record) wherever it is computed
    (the fit, the tuner), which the tuner's exactness relies on."""
    out = np.full(index.shape, -np.inf)
    for s in range(0, index.shape[0], block):
        idx = index[s:s + block]
        qi, ki = np.nonzero(idx >= 0)
        if qi.size == 0:
            continue
        rows, inv = np.unique(idx[qi, ki], return_inverse=True)
        vec = rows_of(rows)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        q = queries[s:s + block].astype(np.float64)
        out[s + qi, ki] = np.einsum("ij,ij->i", q[qi], vec[inv])
    return out


def _result(variant, prep, gamma, alpha, beta, gammas, acc, n_threads):
    t0 = time.perf_counter()
    vectors = prep.backend.project(prep.base, prep.grad, alpha, beta, n_threads=n_threads)
    precision = codes = None
    if prep.quantized is not None:
        from ._quantized import requantize
        qc = prep.quantized
        precision, codes = qc.precision, requantize(vectors, qc, prep.touched, prep.backend)
    prep.timings["project"] = time.perf_counter() - t0
    return NudgeResult(variant, float(gamma), prep.touched, vectors, np.asarray(gammas, float),
                       np.asarray(acc, float), prep.corpus.shape[0], prep.timings, precision,
                       codes)


# ----------------------------------------------------------------------------------------
# NUDGE-N


def nudge_n_coefficients(a, b, cnorm, gamma):
    """Per touched record, ``x'(gamma) = alpha * e + beta * c`` (the reference's rules).

    a = e.c, b = |c|^2 - a^2, cnorm = |c|. gamma == 0: no change. e.c/|c| >= 1 - gamma/2:
    x' = c/|c| (this rule wins, as in the reference). b <= 0 or a < 0: no change (the
    reference's rule, kept for parity; b < 0 only by rounding). Otherwise the sphere step
    x' = e + gamma (c - mu e) / (2 (mu - a)) with mu = a + sqrt(gamma/(4-gamma) b).

    ``gamma`` a number: (t,) arrays. A 1-D grid: (n_gamma, t) arrays, one row per gamma, each
    element computed exactly as for that gamma alone.
    """
    g = np.asarray(gamma, dtype=np.float64)
    grid = g.ndim == 1
    g = g.reshape(-1, 1)
    move = (b > 0) & (a >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.sqrt(g / (4.0 - g) * np.where(move, b, 1.0))
        alpha = np.where(move, 1.0 - g * (a + w) / (2.0 * w), 1.0)
        beta = np.where(move, g / (2.0 * w), 0.0)
        snap = (cnorm > 0) & (a / np.where(cnorm > 0, cnorm, 1.0) >= 1.0 - g / 2.0)
    alpha = np.where(snap, 0.0, alpha)
    beta = np.where(snap, 1.0 / np.where(cnorm > 0, cnorm, 1.0), beta)
    alpha = np.where(g == 0, 1.0, alpha)
    beta = np.where(g == 0, 0.0, beta)
    return (alpha, beta) if grid else (alpha[0], beta[0])


def _fit_n(prep: _Prepared, k_val, gammas, *, extra_corpus, chunk_rows, n_threads, progress,
           val_block):
    gammas = np.asarray(gammas, dtype=np.float64)
    n_val = prep.val_q.shape[0]
    unt_s, unt_i = _untouched_topk(prep, k_val, extra_corpus=extra_corpus,
                                   chunk_rows=chunk_rows, n_threads=n_threads, progress=progress)
    t0 = time.perf_counter()
    a = np.einsum("ij,ij->i", prep.base, prep.grad)
    cnorm2 = np.einsum("ij,ij->i", prep.grad, prep.grad)
    b = cnorm2 - a * a
    cnorm = np.sqrt(cnorm2)
    alpha, beta = nudge_n_coefficients(a, b, cnorm, gammas)
    counts = prep.val_csr.counts
    # Accuracy sums h_i / min(|B(i)|, k_val). With a common denominator the sums are integers,
    # so equal accuracies compare equal and the first gamma wins ties exactly.
    denom = int(np.lcm.reduce(np.arange(1, k_val + 1))) if k_val <= 20 else 0
    hits = np.zeros(gammas.size, dtype=np.int64 if denom else np.float64)
    for s in range(0, n_val, val_block):
        e = min(s + val_block, n_val)
        v = prep.val_q[s:e].astype(np.float64)
        S = prep.backend.dot64(v, prep.base, n_threads=n_threads)  # shape-independent sums:
        H = prep.backend.dot64(v, prep.grad, n_threads=n_threads)  # the tuner's equal these
        csr = prep.val_csr.rows(s, e)
        h = prep.backend.nudge_n_sweep(S, H, alpha, beta, prep.touched, unt_s[s:e], unt_i[s:e],
                                       csr.ptr, csr.index, k_val, n_threads=n_threads)
        m = np.minimum(counts[s:e], k_val)[:, None]
        if denom and m.min() > 0:
            hits += (h * (denom // m)).sum(axis=0)
        else:  # an empty answer list (the reference's NaN, compat only) or a large k_val
            with np.errstate(divide="ignore", invalid="ignore"):
                hits = hits.astype(np.float64) + (h / m * max(denom, 1)).sum(axis=0)
    acc = hits / max(denom, 1) / n_val
    # First gamma wins ties (the reference's strict '>'); a NaN accuracy never wins.
    best = 0
    if np.isfinite(acc).any():
        best = int(np.nanargmax(np.where(np.isfinite(acc), acc, -np.inf)))
    gamma = gammas[best] if np.isfinite(acc[best]) else 0.0
    if not np.isfinite(acc[best]):
        alpha_b, beta_b = nudge_n_coefficients(a, b, cnorm, 0.0)
    else:
        alpha_b, beta_b = alpha[best], beta[best]
    prep.timings["gamma_sweep"] = time.perf_counter() - t0
    log.info("NUDGE-N: gamma=%.3f, validation accuracy@%d %.4f (gamma=0: %.4f)", gamma, k_val,
             acc[best], acc[0] if gammas[0] == 0 else float("nan"))
    return _result("nudge-n", prep, gamma, alpha_b, beta_b, gammas, acc, n_threads)


# ----------------------------------------------------------------------------------------
# NUDGE-M


def most_covered_gamma(low, high, rule="midpoint"):
    """The smallest gamma >= 0 covered by the most closed intervals ``[low, high]``.

    Returns ``(gamma, segment_starts, counts)``: the counts are those of the open segment to
    the right of each distinct endpoint. ``rule="left"`` returns the left end of the best
    segment, where the answer only ties its competitor (the reference's choice);
    ``"midpoint"`` returns its middle, or twice its left end when it is unbounded above.
    A point interval never counts (as in the reference); no interval gives gamma = 0.
    """
    if low.size == 0:
        return 0.0, np.zeros(0), np.zeros(0, np.int64)
    values = np.concatenate([low, high])
    signs = np.concatenate([np.ones(low.size), -np.ones(high.size)])
    starts, inverse = np.unique(values, return_inverse=True)
    counts = np.cumsum(np.bincount(inverse, weights=signs, minlength=starts.size)).astype(np.int64)
    if counts.max() <= 0:
        return 0.0, starts, counts
    best = int(np.argmax(counts))  # first maximum: the smallest gamma
    left = float(starts[best])
    if rule == "left":
        return left, starts, counts
    right = float(starts[best + 1]) if best + 1 < starts.size else np.inf
    gamma = 2.0 * left if not np.isfinite(right) else 0.5 * (left + right)
    return gamma, starts, counts


def _fit_m(prep: _Prepared, rule, eps, *, extra_corpus, chunk_rows, n_threads, progress,
           val_block):
    n_val = prep.val_q.shape[0]
    if getattr(prep.corpus, "DASK_ROWS", False):
        prep.corpus.want(prep.val_csr.index)  # the untouched answers' rows, with the pass
    unt_s, unt_i = _untouched_topk(prep, 2, extra_corpus=extra_corpus, chunk_rows=chunk_rows,
                                   n_threads=n_threads, progress=progress)
    t0 = time.perf_counter()
    cnorm = np.linalg.norm(prep.grad, axis=1)
    direction = prep.grad / np.where(cnorm > 0, cnorm, 1.0)[:, None]
    csr = prep.val_csr
    pair_query = np.repeat(np.arange(n_val, dtype=np.int64), csr.counts)
    x = csr.index
    pos = np.searchsorted(prep.touched, x)
    pos_c = np.minimum(pos, max(prep.touched.size - 1, 0))
    is_touched = (prep.touched.size > 0) & (prep.touched[pos_c] == x)
    pair_pos = np.where(is_touched, pos_c, -1)
    # Scores of untouched answers, from their own rows (t-sized gathers, never the corpus).
    s_x = np.zeros(x.size)
    unt_pairs = np.flatnonzero(~is_touched)
    if unt_pairs.size:
        rows, inv = np.unique(x[unt_pairs], return_inverse=True)
        e = _arrays.take_rows(prep.corpus, rows)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        s_x[unt_pairs] = np.einsum("ij,ij->i", prep.val_q[pair_query[unt_pairs]].astype(np.float64),
                                   e[inv])
    # Best untouched competitor other than x (the top-2 are sorted, x is at most one of them).
    first_is_x = unt_i[pair_query, 0] == x
    u_score = np.where(first_is_x, unt_s[pair_query, 1], unt_s[pair_query, 0])
    lows, highs = [], []
    for s in range(0, n_val, val_block):
        e_ = min(s + val_block, n_val)
        lo, hi = csr.ptr[s], csr.ptr[e_]
        if lo == hi:
            continue
        v = prep.val_q[s:e_].astype(np.float64)
        S = prep.backend.dot64(v, prep.base, n_threads=n_threads)
        G = prep.backend.dot64(v, direction, n_threads=n_threads)
        pq = pair_query[lo:hi] - s
        pp = pair_pos[lo:hi]
        sx = np.where(pp >= 0, S[pq, np.maximum(pp, 0)], s_x[lo:hi]) if S.shape[1] else s_x[lo:hi]
        gx = np.where(pp >= 0, G[pq, np.maximum(pp, 0)], 0.0) if S.shape[1] else np.zeros(hi - lo)
        low, high, feasible = prep.backend.nudge_m_intervals(
            S, G, pq, pp, sx, gx, u_score[lo:hi], eps, n_threads=n_threads)
        lows.append(low[feasible])
        highs.append(high[feasible])
    low = np.concatenate(lows) if lows else np.zeros(0)
    high = np.concatenate(highs) if highs else np.zeros(0)
    gamma, starts, counts = most_covered_gamma(low, high, rule)
    prep.timings["gamma_sweep"] = time.perf_counter() - t0
    acc = counts / max(1, x.size)
    log.info("NUDGE-M: gamma=%.6g (%s rule), %d of %d validation pairs feasible", gamma, rule,
             low.size, x.size)
    beta = np.where(cnorm > 0, gamma / np.where(cnorm > 0, cnorm, 1.0), 0.0)
    return _result("nudge-m", prep, gamma, np.ones(prep.touched.size), beta, starts, acc,
                   n_threads)


# ----------------------------------------------------------------------------------------
# Public estimators


class _Nudge:
    def __init__(self, *, backend="auto", precision="float32", chunk_rows=None, n_threads=None,
                 progress=None, val_block=VAL_BLOCK):
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision: must be 'float32' or 'float64', got {precision!r}")
        if precision == "float64" and backend != "numpy":
            raise ValueError("precision='float64' (the reference mode) needs backend='numpy'")
        _backends.get(backend)  # fail early with the install hint
        self.backend = backend
        self.dtype = np.float64 if precision == "float64" else np.float32
        self.chunk_rows = _validate.as_size("chunk_rows", chunk_rows)
        self.n_threads = _validate.as_threads("n_threads", n_threads)
        self.progress = progress
        self.val_block = _validate.as_size("val_block", val_block, allow_none=False)

    def _prepare(self, corpus, train, val, **kw):
        return _prepare(corpus, train, val, self.backend, self.dtype, n_threads=self.n_threads,
                        device_ok=True, quantized_ok=True, dask_ok=True, defer_base=True, **kw)


class NudgeN(_Nudge):
    """NUDGE-N: move each touched record on the unit sphere, at most sqrt(gamma) away.

    gamma is chosen on the grid ``gammas`` (default {0, 0.02, ..., 0.48}) by validation
    accuracy@``k_val``, the first gamma winning ties. Validation queries without answers are
    skipped with a warning; duplicate answers count once.
    """

    def __init__(self, k_val=1, gammas=None, **kw):
        super().__init__(**kw)
        if isinstance(k_val, bool) or not isinstance(k_val, (int, np.integer)) or k_val < 1:
            raise ValueError(f"k_val: must be an int >= 1, got {k_val!r}")
        self.k_val = int(k_val)
        self.gammas = NUDGE_N_GAMMAS if gammas is None else _validate.as_gammas("gammas", gammas)

    def fit(self, corpus, train, val, *, corrector=None) -> NudgeResult:
        """Fit on ``corpus`` (N, d) float32/float16 array or memmap, streamed once; or a
        device array (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` / DLPack), read in
        place by the GPU backend (``backend="auto"`` picks it; a CPU backend raises); or a
        :class:`~nudgefast.QuantizedCorpus`: the pass reads the codes (exact dequantized
        scores), the touched rows are tuned from their dequantized rows (binary: +-1 signs),
        and the result also carries the tuned rows re-quantized (``codes``); or a row-chunked
        ``dask.array``: the pass runs block by block on the current Dask scheduler's workers,
        the touched and candidate rows are gathered by index (see :mod:`nudgefast._dask`).

        train, val: :class:`QuerySet` (or ``(embeddings, answers)``). Returns a
        :class:`NudgeResult` holding only the touched records (host arrays).

        corrector: a fitted :class:`~nudgefast.Corrector`: ``corpus`` holds the old model's
        embeddings, the queries the new model's; the fit is the fit on the corrected corpus,
        each chunk corrected inside the pass (never written), the result in the new space
        (search it with ``search(q, corpus, k, delta=result, corrector=corrector)``).
        """
        prep = self._prepare(corpus, train, val, unique_train=True, unique_val=True,
                             skip_empty_val=True, corrector=corrector)
        _validate.as_k("k_val", self.k_val, prep.corpus.shape[0])
        return _fit_n(prep, self.k_val, self.gammas, extra_corpus=None,
                      chunk_rows=self.chunk_rows, n_threads=self.n_threads,
                      progress=self.progress, val_block=self.val_block)


class NudgeM(_Nudge):
    """NUDGE-M: move each touched record by gamma along its normalised query gradient.

    gamma is chosen exactly: the point covered by the most validation intervals (see
    :func:`most_covered_gamma`). ``gamma_rule="midpoint"`` (default) takes the middle of the
    best segment, so the chosen answers strictly beat their competitors;
    ``"left"`` is the reference's choice, where they only tie. Tuned vectors are not unit
    length: score them by dot product (``search`` with the result does).
    """

    def __init__(self, gamma_rule="midpoint", **kw):
        super().__init__(**kw)
        if gamma_rule not in ("midpoint", "left"):
            raise ValueError(f"gamma_rule: must be 'midpoint' or 'left', got {gamma_rule!r}")
        self.gamma_rule = gamma_rule

    def fit(self, corpus, train, val, *, corrector=None) -> NudgeResult:
        """Fit on ``corpus`` (N, d) float32/float16 array or memmap, streamed once; or a
        device array (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` / DLPack), read in
        place by the GPU backend (``backend="auto"`` picks it; a CPU backend raises); or a
        :class:`~nudgefast.QuantizedCorpus`: the pass reads the codes (exact dequantized
        scores), the touched rows are tuned from their dequantized rows (binary: +-1 signs),
        and the result also carries the tuned rows re-quantized (``codes``); or a row-chunked
        ``dask.array``: the pass runs block by block on the current Dask scheduler's workers,
        the touched and candidate rows are gathered by index (see :mod:`nudgefast._dask`).

        train, val: :class:`QuerySet` (or ``(embeddings, answers)``). Returns a
        :class:`NudgeResult` holding only the touched records (host arrays).

        corrector: a fitted :class:`~nudgefast.Corrector`: ``corpus`` holds the old model's
        embeddings, the queries the new model's; the fit is the fit on the corrected corpus,
        each chunk corrected inside the pass (never written), the result in the new space
        (search it with ``search(q, corpus, k, delta=result, corrector=corrector)``).
        """
        prep = self._prepare(corpus, train, val, unique_train=True, unique_val=True,
                             skip_empty_val=True, corrector=corrector)
        if prep.corpus.shape[0] < 2:
            raise ValueError("corpus: NUDGE-M needs at least 2 records")
        return _fit_m(prep, self.gamma_rule, 0.0, extra_corpus=None, chunk_rows=self.chunk_rows,
                      n_threads=self.n_threads, progress=self.progress, val_block=self.val_block)
