"""The state of a fit, kept so that feedback re-tunes in milliseconds (DESIGN.md §5).

A fit reads the corpus once, for each validation query's best *untouched* records. The tuner
keeps those with a margin (top-(need + margin), need = k_val for NUDGE-N, 2 for NUDGE-M), and
everything the gamma choice is made of: per touched record its normalised base row, its query
gradient, and the two validation products (S = V e_j, H = V c_j), per validation query its
hits at every gamma (NUDGE-N) or per validation pair its interval (NUDGE-M).

An operation changes a few records; only the validation queries those records can reach are
re-scored:

- a touched record's score at any gamma is bounded by the norm of the query's projection on
  the plane of ``e_j`` and ``c_j`` (NUDGE-N moves it inside that plane); a query whose
  top-``k_val`` threshold (bounded below by its ``k_val``-th untouched score) is above every
  changed record's old and new bound, and whose untouched top-``k_val`` did not change, keeps
  its hits at every gamma;
- a NUDGE-M interval only changes when a changed record's old constraint was binding or its
  new one cuts it, or when the pair's answer or its best untouched competitor changed.

Feedback never reads the corpus beyond the rows it newly touches. Records that leave the
touched set go back into the kept candidate lists; records that join it (or are deleted) leave
them, and a list that falls below ``need`` is rescanned (one batched pass for those queries
only, logged and reported in the delta's summary).

Exactness: after any sequence of operations the gamma and the tuned vectors are those of a
fresh fit on the final inputs (same validation products, same kernels); the property test
``tests/test_tuner.py`` drives random sequences on every backend against fresh fits.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import warnings

import numpy as np

from . import _arrays, _backends, _validate
from .handoff import Delta, _replace_atomically
from .nudge import (NudgeM, NudgeN, NudgeResult, _prepare, certified_topk, exact_scores,
                    most_covered_gamma, nudge_n_coefficients, query_gradients, touched_base,
                    unit_rows)
from .queryset import _answer_lists, as_queryset
from .search import rank_rows, topk_pass

log = logging.getLogger("nudgefast")

STATE_FORMAT = "nudgefast.tuner"
STATE_VERSION = 1
#: Relative slack of the dirty-query tests: a candidate within it of a threshold counts as
#: reaching it (re-scoring a query too many is only time; one too few would be wrong).
_SLACK = 1e-9


#: Below this many element operations a kernel runs on the calling thread alone.
_SMALL_WORK = 1 << 22


def _all_or_nothing(method):
    """An operation either completes or leaves the tuner as it was: the attributes it replaces
    and the small arrays it edits in place are put back when it raises before the update's
    in-place phase (every input check, every pass over new rows). One that fails inside that
    phase (an interrupt, a corpus row that changed under the tuner) leaves the tuner marked
    unusable, with the error saying to reload the last saved state."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.__dict__.get("_broken"):
            raise RuntimeError(f"Tuner: {self._broken}")
        saved = dict(self.__dict__)
        edited = {name: getattr(self, name).copy() for name in
                  ("_tq_alive", "_valive", "_vans", "_added") if hasattr(self, name)}
        try:
            return method(self, *args, **kwargs)
        except BaseException as exc:
            if self.__dict__.get("_mutating"):
                self._broken = (f"{method.__name__} failed half-way ({type(exc).__name__}: "
                                f"{exc}); Tuner.load the last saved state")
                self._mutating = False
                raise
            self.__dict__.clear()
            self.__dict__.update(saved)
            for name, value in edited.items():
                setattr(self, name, value)
            raise
    return run


class Tuner:
    """A NUDGE fit that can be updated: feedback, validation queries, records in and out.

    ``estimator``: a configured :class:`NudgeN` (default) or :class:`NudgeM`; its settings
    (backend, k_val, gammas, gamma_rule, chunk_rows, n_threads, progress, val_block) are used
    throughout. ``margin``: untouched candidates kept per validation query beyond what the
    gamma choice needs; a query whose list runs out is rescanned (one corpus pass for the
    queries that ran out, batched).

    Records are corpus positions: rows ``0 .. N-1`` of the corpus given to :meth:`fit`, then
    rows added by :meth:`add_records` in order. A deleted position stays a position (it is
    never a candidate or an answer again), so positions never shift. ``ids`` (optional, one per
    record: ints or strings, e.g. ``corpus_ids.txt``) travel with every :class:`Delta`.

    Every operation returns a :class:`Delta`: the rows whose served vector changed (tuned
    rows, rows reverted to their base embedding, new records) and the deleted positions, with
    what the operation did in ``delta.summary``.

    The corpus may be a row-chunked ``dask.array`` (Zarr, ``.npy`` shards via
    :func:`nudgefast._dask.npy_corpus`, ...): every pass over it (the fit's, a rescan, a new
    validation query's) runs block by block on the current Dask scheduler's workers, which
    send back the lists with their float64 scores (the candidates' rows stay there); the
    rows the tuner reads (touched records, NUDGE-M's validation answers) come back with a
    pass or are gathered by index, each once (see :mod:`nudgefast._dask`); the corpus never
    comes to this process.
    Rows added with :meth:`add_records` are host arrays kept by the tuner. The results are
    those of the same tuner on the rows as a NumPy array.
    """

    def __init__(self, estimator=None, *, margin=32):
        estimator = NudgeN() if estimator is None else estimator
        if not isinstance(estimator, (NudgeN, NudgeM)):
            raise TypeError(f"estimator: expected a NudgeN or NudgeM instance, got "
                            f"{type(estimator).__name__}")
        if estimator.dtype != np.float32:
            raise ValueError("estimator: the tuner runs in precision='float32' (the reference "
                             "float64 mode is for parity checks of one fit)")
        self.estimator = estimator
        self.margin = _validate.as_size("margin", margin, allow_none=False)
        self.variant = "nudge-n" if isinstance(estimator, NudgeN) else "nudge-m"
        self.need = estimator.k_val if self.variant == "nudge-n" else 2
        self._fitted = False

    # ------------------------------------------------------------------------------------
    # Corpus: the caller's rows, then the rows added since, by position

    @property
    def n_records(self) -> int:
        """Positions that exist (deleted ones included)."""
        return self._n

    @property
    def gamma(self) -> float:
        return self._gamma

    @property
    def d(self) -> int:
        """The embedding dimension."""
        return self._d

    @property
    def ids(self):
        """The record ids by position (read-only view), or None when fitted without ids."""
        if self._ids is None:
            return None
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def touched(self) -> np.ndarray:
        """Sorted positions of the records the current delta tunes."""
        return np.sort(self._slot_rec[:self._t])

    def positions_of(self, ids, *, strict=True, chunk=1 << 20) -> np.ndarray:
        """The position of each record id (in the order given). An unknown id, or one that
        names several records, is an error (``strict=False``: -1 / -2 in its place). Streams
        the id list in chunks: no index of all ids is built (at 10^8 records it would be
        gigabytes)."""
        self._check_fitted()
        if self._ids is None:
            raise ValueError("ids: the tuner was fitted without ids; give record positions")
        want = np.asarray(ids).reshape(-1)
        if want.size == 0:
            raise ValueError("ids: is empty; give at least one record id")
        if want.dtype.kind != self._ids.dtype.kind and not (
                want.dtype.kind in "iu" and self._ids.dtype.kind in "iu"):
            kind = "strings" if self._ids.dtype.kind == "U" else "integers"
            raise TypeError(f"ids: the record ids are {kind}, got {want.dtype}")
        uniq, inverse = np.unique(want, return_inverse=True)
        pos = np.full(uniq.size, -1, np.int64)
        deleted = np.zeros(uniq.size, bool)
        for start in range(0, self._ids.size, chunk):
            part = self._ids[start:start + chunk]
            hit = np.flatnonzero(np.isin(part, uniq))
            dead = np.isin(start + hit, self._deleted)  # a deleted id may come back
            deleted[np.searchsorted(uniq, part[hit[dead]])] = True
            hit = hit[~dead]
            if hit.size == 0:
                continue
            where = np.searchsorted(uniq, part[hit])
            seen, count = np.unique(where, return_counts=True)
            again = np.r_[where[pos[where] != -1], seen[count > 1]]
            pos[where] = start + hit
            pos[again] = -2
        bad = np.flatnonzero(pos < 0)
        if strict and bad.size:
            what = ("names more than one record; give positions" if pos[bad[0]] == -2 else
                    "was already deleted" if deleted[bad[0]] else "is not a record id")
            raise ValueError(f"ids: {uniq[bad[0]].item()!r} {what}")
        return pos[inverse.reshape(-1)]

    def _check_fitted(self):
        if self.__dict__.get("_broken"):
            raise RuntimeError(f"Tuner: {self._broken}")
        if not self._fitted:
            raise RuntimeError("Tuner: call fit(corpus, train, val) (or Tuner.load) first")

    def _segments(self):
        yield 0, self._corpus
        offset = self._corpus.shape[0]
        for rows in self._added:
            yield offset, rows
            offset += rows.shape[0]

    def _prefetch(self, positions):
        """Gather the rows at ``positions`` (any shape; -1 skipped) that a dask corpus holds,
        in one compute, for the ``_raw_rows`` calls that follow (a no-op on host rows)."""
        part = self._corpus
        if getattr(part, "DASK_ROWS", False):
            positions = np.asarray(positions, np.int64).reshape(-1)
            part.prefetch(positions[(positions >= 0) & (positions < part.shape[0])])

    def _raw_rows(self, positions):
        """float64 rows at ``positions`` (any order), gathered from the segments."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((positions.size, self._d))
        for offset, rows in self._segments():
            sel = np.flatnonzero((positions >= offset) & (positions < offset + rows.shape[0]))
            if sel.size:
                out[sel] = rows[positions[sel] - offset]
        return out

    def _base_rows(self, positions):
        """Normalised float64 rows, as a fit computes them (errors name the record)."""
        return unit_rows(self._raw_rows(positions), positions, lambda p: ValueError(
            f"corpus: record {p} has a zero norm or NaN/inf values; a record that answers a "
            f"query must have a finite, nonzero embedding"))

    def _served_rows(self, positions):
        """float32 served vectors of untouched records (the backend's normalisation)."""
        raw = np.ascontiguousarray(self._raw_rows(positions), dtype=np.float32)
        out = np.empty_like(raw)
        if raw.shape[0]:
            self._impl.normalize_rows(raw, out, n_threads=self._threads_for(raw.size))
        return out

    def _threads_for(self, work):
        """Threads for a kernel call of ``work`` element operations: the caller's thread alone
        for an update's small calls. Waking the OpenMP team for 1 ms of work costs more than it
        gains, and on a few cores its spinning workers fight the BLAS threads of the next
        product (measured on 2 cores: 27 ms per feedback batch with both pools, 12 ms with
        the small kernels on one thread)."""
        return 1 if work < _SMALL_WORK else self._threads

    def _v64(self):
        """The validation queries in float64 (exact widening), kept between updates (reset
        wherever ``_vq`` is set)."""
        if self._vq64 is None:
            self._vq64 = self._vq.astype(np.float64)
        return self._vq64

    def _excluded(self):
        return np.union1d(self._slot_rec[:self._t], self._deleted)

    def _pass(self, queries, k, *, start=0, desc="tuner pass"):
        """Each query's exact top-k untouched, undeleted records over positions >= ``start``
        (the certain prefix, as a fit selects: ``certified_topk``). Returns (scores, index,
        complete): complete where the list holds every such record.

        A dask corpus is scanned on its workers, which also score the records they list in
        float64 (``exact_scores``' arithmetic: the same bits as here), so the candidates'
        rows are never gathered (n_val x (need + margin) rows); the rows :meth:`_want` named
        come back with the pass. The added segments (host rows) are merged in here and their
        listed records scored here."""
        est = self.estimator
        exclude = self._excluded()

        def scan(rows, width):
            q, state, exact = queries[rows], None, None
            for offset, part in self._segments():
                if offset + part.shape[0] <= start:
                    continue
                assert offset >= start, "passes start at a segment boundary"
                if getattr(part, "DASK_ROWS", False) and state is None:
                    from . import _dask
                    s32, index, f64 = _dask.topk_pass(
                        self._impl, q, part, width, exclude=exclude, chunk_rows=est.chunk_rows,
                        n_threads=self._threads, row_offset=offset, name="corpus", exact=True)
                    state, exact = (s32, index), (offset, part.shape[0], index.copy(), f64)
                    continue
                state = topk_pass(self._impl, q, part, width, exclude=exclude,
                                  chunk_rows=est.chunk_rows, n_threads=self._threads,
                                  progress=est.progress if rows.size == queries.shape[0]
                                  else False, row_offset=offset, state=state,
                                  name="corpus" if offset == 0 else "rows", desc=desc)
            if exact is None:
                return state
            return state[0], state[1], self._merged_f64(q, state[1], *exact)
        return certified_topk(scan, queries, self._raw_rows, self.need, k)

    def _merged_f64(self, q, index, offset, size, dask_index, dask_f64):
        """float64 scores of the records in ``index``: the dask segment's list
        (``dask_index``, rows ``offset .. offset + size``) merged with host segments' rows.
        The dask segment's records take the workers' scores, the others are scored here
        (``exact_scores``: the same numbers wherever computed)."""
        if np.array_equal(index, dask_index):  # no added row made the list
            return dask_f64
        on_dask = (index >= offset) & (index < offset + size)
        # Each listed dask record's place in its query's dask list: one sort of (query, row).
        span = np.int64(self._n + 1)
        rows = np.arange(index.shape[0], dtype=np.int64)[:, None] * span
        keys = (rows + dask_index + 1).reshape(-1)
        order = np.argsort(keys, kind="stable")
        want = (rows + index + 1).reshape(-1)
        found = order[np.minimum(np.searchsorted(keys, want, sorter=order), keys.size - 1)]
        out = np.where(on_dask, dask_f64.reshape(-1)[found].reshape(index.shape), -np.inf)
        host = (index >= 0) & ~on_dask
        if host.any():
            out = np.where(host, exact_scores(q, np.where(host, index, -1), self._raw_rows),
                           out)
        return out

    def _want(self, positions):
        """Rows a dask corpus brings back with its next pass (``DaskRows.want``), so they need
        no gather of their own (a no-op on host rows)."""
        part = self._corpus
        if getattr(part, "DASK_ROWS", False):
            positions = np.asarray(positions, np.int64).reshape(-1)
            part.want(positions[(positions >= 0) & (positions < part.shape[0])])

    def _exact(self, queries, index):
        """float64 score of each listed record (-inf for -1), as a fit computes it."""
        return exact_scores(queries, index, self._raw_rows)

    # ------------------------------------------------------------------------------------
    # fit

    @_all_or_nothing
    def fit(self, corpus, train, val, *, ids=None) -> Delta:
        """Fit on ``corpus`` as :meth:`NudgeN.fit` / :meth:`NudgeM.fit` do, keeping the state.

        The corpus is referenced, not copied: it must stay as it is while the tuner is used
        (rows added later go through :meth:`add_records`). Returns the first delta: every
        touched row.

        A row-chunked ``dask.array`` corpus is read on its cluster: the passes run on the
        workers (one task per block; the (n_q, k) lists come back with their float64
        scores, so no candidate row is gathered), the touched rows (and NUDGE-M's validation
        answers) come back with the fit's pass, and the rows later operations touch are
        gathered by index (:class:`nudgefast._dask.DaskRows`); the same state, gamma and
        deltas as for the rows as a NumPy array.
        """
        t0 = time.perf_counter()
        est = self.estimator
        prep = _prepare(corpus, train, val, est.backend, np.float32, unique_train=True,
                        unique_val=True, skip_empty_val=True, n_threads=est.n_threads,
                        dask_ok=True, defer_base=True)
        n, d = prep.corpus.shape
        if self.variant == "nudge-n":
            _validate.as_k("k_val", est.k_val, n)
        elif n < 2:
            raise ValueError("corpus: NUDGE-M needs at least 2 records")
        self._corpus, self._impl, self._threads = prep.corpus, prep.backend, est.n_threads
        self._d, self._n, self._added = d, n, []
        self._ids = None if ids is None else self._as_ids("ids", ids, n)
        self._deleted = np.zeros(0, np.int64)
        # Train feedback: every (query, record) pair, queries in arrival order.
        train_qs, train_q = as_queryset("train", train, d)
        csr = train_qs.csr(unique=True)
        self._tq = np.array(train_q, dtype=np.float32)
        self._tq_alive = np.ones(len(train_qs), bool)
        self._pair_q = np.repeat(np.arange(len(train_qs), dtype=np.int64), csr.counts)
        self._pair_r = csr.index.copy()
        # Touched records in slots (columns of S/H), in the fit's sorted order to begin with.
        t = prep.touched.size
        self._t = t
        self._slot_rec = prep.touched.copy()
        self._slot_of = {int(r): s for s, r in enumerate(prep.touched)}
        self._grad = prep.grad
        # Validation: queries, answers, untouched candidate lists, products.
        self._vq = prep.val_q
        self._vq64 = None
        self._vans = [prep.val_csr.index[prep.val_csr.ptr[i]:prep.val_csr.ptr[i + 1]].copy()
                      for i in range(prep.val_q.shape[0])]
        self._valive = np.ones(prep.val_q.shape[0], bool)
        self._m = self._weights()
        K = self.need + self.margin
        if self.variant == "nudge-m":
            self._want(prep.val_csr.index)  # a dask corpus: the answers' rows, with the pass
        self._Ls, self._Li, self._Lcomplete = self._pass(self._vq, K, desc="NUDGE corpus pass")
        # A dask corpus's touched rows came back with the pass (``_prepare(defer_base=True)``).
        self._base = touched_base(prep.corpus, prep.touched) if prep.base is None else prep.base
        self._init_coefficients()
        self._derive()
        gamma_prev = float("nan")
        vectors = self._project(np.arange(t))
        log.info("Tuner: fitted %s, gamma=%.6g, t=%d, %d validation queries", self.variant,
                 self._gamma, t, self._vq.shape[0])
        return self._delta("fit", gamma_prev, prep.touched, vectors, np.ones(t, bool),
                           np.zeros(t, bool), np.zeros(0, np.int64), t0, rescanned=0)

    @staticmethod
    def _as_ids(name, ids, n):
        """One id per record, all int64 or all str, each once."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"{name}: expected one id per record ({n}), got shape {arr.shape}")
        if arr.dtype.kind == "O":
            bad = [x for x in arr.tolist() if not isinstance(x, str)]
            if bad:
                raise TypeError(f"{name}: ids must be all integers (int64) or all strings, got "
                                f"{bad[0]!r} ({type(bad[0]).__name__})")
            arr = arr.astype(str)
        elif arr.dtype.kind == "S":
            arr = arr.astype(str)
        if arr.dtype.kind not in "iuU":
            raise TypeError(f"{name}: ids must be integers or strings, got {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}: {int(arr.max())} does not fit in int64; map the ids first")
        arr = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr
        uniq, counts = np.unique(arr, return_counts=True)
        if uniq.size != arr.size:
            dup = uniq[counts > 1][0]
            raise ValueError(f"{name}: {dup.item()!r} names more than one record; record ids "
                             f"must be unique (a keyed target would get the wrong vector)")
        return arr

    # ------------------------------------------------------------------------------------
    # Per touched record: coefficients, products, tuned vectors

    def _derive(self):
        """Everything the primary state determines: the validation products, the headroom
        that spares the first updates a copy, the hits or intervals, gamma (a fit and a load
        end here alike)."""
        self._S, self._H = self._products(self._vq, np.arange(self._t))
        self._grow(max(1024, self._t // 4))
        self._init_scores()
        self._fitted = True
        self._gamma = self._choose_gamma()

    def _init_coefficients(self):
        t = self._t
        self._cnorm = np.linalg.norm(self._grad[:t], axis=1) if t else np.zeros(0)
        if self.variant == "nudge-n":
            g = self.estimator.gammas
            a = np.einsum("ij,ij->i", self._base[:t], self._grad[:t])
            cnorm2 = np.einsum("ij,ij->i", self._grad[:t], self._grad[:t])
            self._a, self._b = a, cnorm2 - a * a
            self._cnorm = np.sqrt(cnorm2)
            self._alpha, self._beta = nudge_n_coefficients(self._a, self._b, self._cnorm, g)

    def _direction(self, slots):
        c = self._cnorm[slots]
        return self._grad[slots] / np.where(c > 0, c, 1.0)[:, None]

    def _products(self, queries, slots, *, which="SH"):
        """Products of validation ``queries`` with touched ``slots`` through the backend's
        ``dot64`` (every element the same bits whatever the shapes, so equal to a fresh fit's):
        "S" = V e_j, "H" = V c_j (NUDGE-N) or V c_j/|c_j| (NUDGE-M). Returns one
        (n_q, len(slots)) array per letter of ``which``."""
        slots = np.asarray(slots, np.int64)
        mats = [self._base[slots] if x == "S" else self._grad[slots]
                if self.variant == "nudge-n" else self._direction(slots) for x in which]
        both = np.concatenate(mats) if len(mats) > 1 else mats[0]  # one call: wider tiles
        out = self._impl.dot64(queries, both,
                               n_threads=self._threads_for(queries.shape[0] * both.size))
        return np.split(out, len(mats), axis=1)

    def _project(self, slots):
        slots = np.asarray(slots, np.int64)
        if self.variant == "nudge-n":
            best = self._best
            alpha, beta = self._alpha[best, slots], self._beta[best, slots]
            if not np.isfinite(self._acc[best]):
                alpha, beta = np.ones(slots.size), np.zeros(slots.size)
        else:
            c = self._cnorm[slots]
            alpha = np.ones(slots.size)
            beta = np.where(c > 0, self._gamma / np.where(c > 0, c, 1.0), 0.0)
        return self._impl.project(self._base[slots], self._grad[slots], alpha, beta,
                                  n_threads=self._threads_for(slots.size * self._d))

    # ------------------------------------------------------------------------------------
    # Scores of the gamma choice

    def _init_scores(self):
        n_val = self._vq.shape[0]
        if self.variant == "nudge-n":
            k = self.need
            self._denom = int(np.lcm.reduce(np.arange(1, k + 1))) if k <= 20 else 0
            self._hits = np.zeros((n_val, self.estimator.gammas.size), np.int64)
            self._kth = np.full((n_val, self.estimator.gammas.size), -np.inf)
            self._rescore_n(np.arange(n_val))
        else:
            self._build_pairs()

    def _weights(self):
        return np.minimum(np.array([a.size for a in self._vans], np.int64), self.need)

    def _rescore_n(self, queries):
        """Hits of validation ``queries`` at every gamma, from the kept lists and S/H."""
        queries = np.asarray(queries, np.int64)
        t, k = self._t, self.need
        touched = self._slot_rec[:t]
        for s in range(0, queries.size, self.estimator.val_block):
            q = queries[s:s + self.estimator.val_block]
            ans = [self._vans[i] for i in q]
            ptr = np.r_[0, np.cumsum([a.size for a in ans])].astype(np.int64)
            idx = np.concatenate(ans) if ans else np.zeros(0, np.int64)
            S = np.ascontiguousarray(self._S[q][:, :t]) if t else np.zeros((q.size, 0))
            H = np.ascontiguousarray(self._H[q][:, :t]) if t else np.zeros((q.size, 0))
            kth = np.empty((q.size, self._kth.shape[1]))
            self._hits[q] = self._impl.nudge_n_sweep(
                S, H, np.ascontiguousarray(self._alpha[:, :t]),
                np.ascontiguousarray(self._beta[:, :t]), touched,
                np.ascontiguousarray(self._Ls[q, :k]), np.ascontiguousarray(self._Li[q, :k]),
                ptr, idx.astype(np.int64), k, kth=kth,
                n_threads=self._threads_for(q.size * t * self._alpha.shape[0]))
            self._kth[q] = kth

    def _build_pairs(self):
        """NUDGE-M: one interval per validation pair (query, answer), all queries."""
        counts = np.array([a.size if alive else 0 for a, alive in
                           zip(self._vans, self._valive)], np.int64)
        self._pq = np.repeat(np.arange(len(self._vans), dtype=np.int64), counts)
        self._px = (np.concatenate([a for a, alive in zip(self._vans, self._valive) if alive])
                    if counts.sum() else np.zeros(0, np.int64)).astype(np.int64)
        self._prefetch(self._px)  # a dask corpus: the answers' rows in one gather
        self._sx_unt = self._exact(self._vq[self._pq], self._px[:, None])[:, 0] \
            if self._px.size else np.zeros(0)
        P = self._px.size
        self._low, self._high = np.zeros(P), np.zeros(P)
        self._feasible = np.zeros(P, bool)
        self._u = np.zeros(P)
        self._rescore_m(np.arange(P))

    def _u_score(self, pairs):
        q, x = self._pq[pairs], self._px[pairs]
        first_is_x = self._Li[q, 0] == x
        return np.where(first_is_x, self._Ls[q, 1], self._Ls[q, 0])

    def _answer_lines(self, pairs):
        """Per validation pair, its answer's slot (-1: untouched) and line ``s_x + gamma g_x``:
        from S/G when the answer is touched, else its untouched score and a flat line."""
        q, slot = self._pq[pairs], self._slots_of(self._px[pairs])
        if not self._t:
            return slot, self._sx_unt[pairs].copy(), np.zeros(slot.size)
        at = np.maximum(slot, 0)
        return (slot, np.where(slot >= 0, self._S[q, at], self._sx_unt[pairs]),
                np.where(slot >= 0, self._H[q, at], 0.0))

    def _rescore_m(self, pairs):
        pairs = np.asarray(pairs, np.int64)
        if pairs.size == 0:
            return
        t = self._t
        queries, local = np.unique(self._pq[pairs], return_inverse=True)
        slot, sx, gx = self._answer_lines(pairs)
        S = np.ascontiguousarray(self._S[queries][:, :t]) if t else np.zeros((queries.size, 0))
        G = np.ascontiguousarray(self._H[queries][:, :t]) if t else np.zeros((queries.size, 0))
        u = self._u_score(pairs)
        low, high, feasible = self._impl.nudge_m_intervals(
            S, G, local.astype(np.int64), slot, sx, gx, u, 0.0,
            n_threads=self._threads_for(pairs.size * t))
        self._low[pairs], self._high[pairs], self._feasible[pairs] = low, high, feasible
        self._u[pairs] = u

    def _choose_gamma(self) -> float:
        if self.variant == "nudge-n":
            gammas = self.estimator.gammas
            alive = self._valive
            m = self._m[alive]
            h = self._hits[alive]
            n_val = int(alive.sum())
            if self._denom and (m.size == 0 or m.min() > 0):
                hits = (h * (self._denom // np.maximum(m, 1))[:, None]).sum(axis=0)
            else:
                with np.errstate(divide="ignore", invalid="ignore"):
                    hits = (h / m[:, None] * max(self._denom, 1)).sum(axis=0)
            acc = hits / max(self._denom, 1) / max(n_val, 1)
            best = 0
            if np.isfinite(acc).any():
                best = int(np.nanargmax(np.where(np.isfinite(acc), acc, -np.inf)))
            self._best, self._acc = best, acc
            return float(gammas[best]) if np.isfinite(acc[best]) else 0.0
        ok = self._feasible
        gamma, starts, counts = most_covered_gamma(self._low[ok], self._high[ok],
                                                   self.estimator.gamma_rule)
        self._starts, self._acc = starts, counts / max(1, self._px.size)
        return float(gamma)

    def result(self) -> NudgeResult:
        """The current fit as a :class:`NudgeResult` (sorted touched rows, tuned vectors)."""
        self._check_fitted()
        order = np.argsort(self._slot_rec[:self._t], kind="stable")
        gammas = self.estimator.gammas if self.variant == "nudge-n" else self._starts
        return NudgeResult(self.variant, self._gamma, self._slot_rec[order],
                           self._project(order), np.asarray(gammas, float),
                           np.asarray(self._acc, float), self._n)

    # ------------------------------------------------------------------------------------
    # The delta

    def _delta(self, op, gamma_prev, indices, vectors, tuned, new, deleted, t0, **summary):
        indices = np.asarray(indices, np.int64)
        order = np.argsort(indices, kind="stable")
        indices = indices[order]
        ids = None if self._ids is None else self._ids[indices]
        deleted = np.sort(np.asarray(deleted, np.int64))
        summary.update(op=op, tuned=int(np.asarray(tuned)[order].sum()),
                       reverted=int((~np.asarray(tuned) & ~np.asarray(new)).sum()),
                       new=int(np.asarray(new).sum()), deleted=int(deleted.size),
                       touched=int(self._t), gamma=self._gamma,
                       seconds=time.perf_counter() - t0)
        return Delta(self.variant, self._gamma, indices,
                     np.asarray(vectors, np.float32).reshape(-1, self._d)[order],
                     np.asarray(tuned, bool)[order], np.asarray(new, bool)[order], deleted,
                     self._n, previous_gamma=gamma_prev, ids=ids,
                     deleted_ids=None if self._ids is None else self._ids[deleted],
                     summary=summary)

    # ------------------------------------------------------------------------------------
    # Touched slots: columns of S/H, rows of base/grad; a removed slot takes the last one

    def _grow(self, extra):
        need = self._t + extra
        cap = self._base.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap, 1024)

        def grown(a, axis):  # slots >= t are never read
            shape = list(a.shape)
            shape[axis] = cap
            out = np.empty(shape, a.dtype)
            out[(slice(None),) * axis + (slice(0, a.shape[axis]),)] = a
            return out
        self._base, self._grad = grown(self._base, 0), grown(self._grad, 0)
        self._S, self._H = grown(self._S, 1), grown(self._H, 1)
        self._cnorm = grown(self._cnorm, 0)
        if self.variant == "nudge-n":
            self._a, self._b = grown(self._a, 0), grown(self._b, 0)
            self._alpha, self._beta = grown(self._alpha, 1), grown(self._beta, 1)

    def _slot_arrays(self):
        """(array, axis) of every per-slot array."""
        arrays = [("_base", 0), ("_grad", 0), ("_S", 1), ("_H", 1), ("_cnorm", 0)]
        if self.variant == "nudge-n":
            arrays += [("_a", 0), ("_b", 0), ("_alpha", 1), ("_beta", 1)]
        return arrays

    def _slots_of(self, records):
        """The slot of each record, -1 for an untouched one (vectorised: one sort of the
        touched set, a binary search per record)."""
        rec = self._slot_rec[:self._t]
        if rec.size == 0:
            return np.full(np.shape(records), -1, np.int64)
        order = np.argsort(rec, kind="stable")
        pos = np.minimum(np.searchsorted(rec[order], records), rec.size - 1)
        return np.where(rec[order][pos] == records, order[pos], -1).astype(np.int64)

    def _remove_slot(self, slot):
        last = self._t - 1
        rec = int(self._slot_rec[slot])
        if slot != last:
            for name, axis in self._slot_arrays():
                a = getattr(self, name)
                if axis == 0:
                    a[slot] = a[last]
                else:
                    a[:, slot] = a[:, last]
            moved = int(self._slot_rec[last])
            self._slot_rec[slot] = moved
            self._slot_of[moved] = slot
        del self._slot_of[rec]
        self._t = last

    def _set_gradients(self, slots, grad, joined):
        """New gradients (and everything derived) for ``slots``; ``joined`` (bool per slot):
        new in the touched set, so its S column is computed too."""
        self._grad[slots] = grad
        base = self._base[slots]
        if self.variant == "nudge-n":
            a = np.einsum("ij,ij->i", base, grad)
            cnorm2 = np.einsum("ij,ij->i", grad, grad)
            self._a[slots], self._b[slots] = a, cnorm2 - a * a
            self._cnorm[slots] = np.sqrt(cnorm2)
            self._alpha[:, slots], self._beta[:, slots] = nudge_n_coefficients(
                self._a[slots], self._b[slots], self._cnorm[slots], self.estimator.gammas)
        else:
            self._cnorm[slots] = np.linalg.norm(grad, axis=1)
        if joined.all():  # the usual feedback: new records, S and H in one product
            S, H = self._products(self._v64(), slots)
            self._S[:, slots] = S
        else:
            if joined.any():
                self._S[:, slots[joined]] = self._products(self._v64(), slots[joined], which="S")[0]
            S = self._S[:, slots]
            H = self._products(self._v64(), slots, which="H")[0]
        self._H[:, slots] = H
        return S, H

    def _regrad(self, records):
        """The query gradient of each of ``records`` that still has live pairs, summed as a
        fit sums it. Returns (records with pairs, their gradients)."""
        live = np.isin(self._pair_r, records) & self._tq_alive[self._pair_q]
        return query_gradients(self._impl, self._tq, self._pair_q[live], self._pair_r[live],
                               n_threads=self._threads_for(int(live.sum()) * self._d))

    # ------------------------------------------------------------------------------------
    # Kept candidate lists

    def _drop_from_lists(self, records):
        """Remove ``records`` (newly touched or deleted) from every kept list."""
        if len(records) == 0:
            return
        gone = np.isin(self._Li, records)
        if not gone.any():
            return
        order = np.argsort(gone, axis=1, kind="stable")
        self._Ls = np.take_along_axis(np.where(gone, -np.inf, self._Ls), order, axis=1)
        self._Li = np.take_along_axis(np.where(gone, -1, self._Li), order, axis=1)

    def _insert_into_lists(self, records, base):
        """Records back in the untouched pool (reverted): each list takes those ranking above
        its last kept entry (every one, when the list holds the whole pool)."""
        if len(records) == 0:
            return
        n_val, K = self._Li.shape
        cand_i = np.broadcast_to(np.asarray(records, np.int64), (n_val, len(records)))
        q = self._v64()
        valid = self._Li >= 0
        last = np.maximum(valid.sum(axis=1) - 1, 0)
        last_s = np.where(valid.any(axis=1), self._Ls[np.arange(n_val), last], -np.inf)
        last_i = np.where(valid.any(axis=1), self._Li[np.arange(n_val), last], -1)
        # Screen with one product; the pairs that may enter get the fit's exact float64 score
        # (``_exact``: one einsum over contiguous gathered rows), and the rule is applied to it.
        approx = q @ base.T
        slack = _SLACK * (1.0 + np.abs(np.where(np.isfinite(last_s), last_s, 0.0)))
        qi, ri = np.nonzero(self._Lcomplete[:, None] | (approx >= (last_s - slack)[:, None]))
        cand_s = np.full(approx.shape, -np.inf)
        cand_s[qi, ri] = np.einsum("ij,ij->i", q[qi], base[ri])
        ranks_above = (cand_s > last_s[:, None]) | ((cand_s == last_s[:, None])
                                                     & (cand_i < last_i[:, None]))
        ranks_above &= valid.any(axis=1)[:, None] | self._Lcomplete[:, None]
        take = (ranks_above | self._Lcomplete[:, None]) & np.isfinite(cand_s)
        rows = np.flatnonzero(take.any(axis=1))  # the lists that change
        if rows.size == 0:
            return
        take = take[rows]
        s, i = rank_rows(
            np.concatenate([self._Ls[rows], np.where(take, cand_s[rows], -np.inf)], axis=1),
            np.concatenate([self._Li[rows], np.where(take, cand_i[rows], -1)], axis=1))
        self._Lcomplete[rows] &= (i >= 0).sum(axis=1) <= K
        self._Ls[rows], self._Li[rows] = s[:, :K], i[:, :K]

    def _merge_lists(self, s_new, i_new, complete_new):
        """Merge the lists of a pass over new rows. The merged list is exact down to the
        higher-ranked of the two lists' last entries (a list that is not complete may miss
        records ranked below its last one); it is cut there."""
        n_val, K = self._Li.shape
        s, i = rank_rows(np.concatenate([self._Ls, s_new], axis=1),
                           np.concatenate([self._Li, i_new], axis=1))
        cut = np.full(n_val, 2 * K)
        for s_l, i_l, complete in ((self._Ls, self._Li, self._Lcomplete),
                                   (s_new, i_new, complete_new)):
            n_l = (i_l >= 0).sum(axis=1)
            for q in np.flatnonzero(~complete & (n_l > 0)):
                last = i_l[q, n_l[q] - 1]
                cut[q] = min(cut[q], int(np.flatnonzero(i[q] == last)[0]) + 1)
            cut = np.where(~complete & (n_l == 0), 0, cut)
        keep = np.arange(2 * K)[None, :] < cut[:, None]
        s, i = np.where(keep, s, -np.inf), np.where(keep, i, -1)
        self._Lcomplete = self._Lcomplete & complete_new & ((i >= 0).sum(axis=1) <= K)
        self._Ls, self._Li = s[:, :K], i[:, :K]

    def _rescan_exhausted(self):
        """Rescan the queries whose list fell below ``need`` (logged, counted)."""
        have = (self._Li >= 0).sum(axis=1)
        short = np.flatnonzero(self._valive & ~self._Lcomplete & (have < self.need))
        if short.size:
            K = self._Li.shape[1]
            log.info("Tuner: %d validation queries ran out of kept candidates (margin %d); "
                     "rescanning the corpus for them", short.size, self.margin)
            s, i, complete = self._pass(self._vq[short], K, desc="tuner rescan")
            self._Ls[short], self._Li[short], self._Lcomplete[short] = s, i, complete
        return short

    # ------------------------------------------------------------------------------------
    # One update: new gradients, slots in and out, lists, dirty queries, gamma, the delta

    def _commit(self, op, t0, records, *, deleted=(), new_positions=(), old_top=None,
                val_changed=False, **summary):
        """Bring the state up to date after the pairs of ``records`` changed (and ``deleted``
        went, ``new_positions`` came), and return the delta."""
        if old_top is None:  # the lists as the hits were last scored from
            old_top = self._top()
        old_u = self._u.copy() if self.variant == "nudge-m" else None
        old_gamma = self._gamma
        records = np.unique(np.asarray(records, np.int64))
        with_pairs, grad = self._regrad(records)
        has = dict(zip(with_pairs.tolist(), range(with_pairs.size)))
        deleted = np.asarray(deleted, np.int64)
        # Old versions of every slot that changes or goes (for the dirty tests).
        old_slots = np.array([self._slot_of[r] for r in records.tolist() if r in self._slot_of],
                             np.int64)
        old_cols = self._columns(old_slots)
        # Slots that go: records left without pairs. Reverted unless deleted.
        leaving = [r for r in records.tolist() if r in self._slot_of and r not in has]
        gone = set(deleted.tolist())
        revert = np.array([r for r in leaving if r not in gone], np.int64)
        revert_base = self._base[[self._slot_of[r] for r in revert.tolist()]].copy()
        joining = np.array([r for r in with_pairs.tolist() if r not in self._slot_of], np.int64)
        joining_base = self._base_rows(joining)  # raises (zero norm, NaN) before any change
        self._mutating = True  # from here on the state is edited in place
        for r in leaving:
            self._remove_slot(self._slot_of[r])
        # Slots that come or change.
        self._grow(joining.size)
        if joining.size:
            slots = np.arange(self._t, self._t + joining.size)
            self._base[slots] = joining_base
            self._slot_rec = np.concatenate([self._slot_rec[:self._t], joining])
            for s, r in zip(slots.tolist(), joining.tolist()):
                self._slot_of[r] = s
            self._t += joining.size
        changed = np.array([self._slot_of[r] for r in with_pairs.tolist()], np.int64)
        new_sh = None
        if changed.size:
            new_sh = self._set_gradients(changed, grad, np.isin(with_pairs, joining))
        # Kept lists: joiners and deleted records leave, reverted records come back.
        self._drop_from_lists(np.union1d(joining, deleted))
        self._insert_into_lists(revert, revert_base)
        rescanned = self._rescan_exhausted()
        new_cols = self._columns(changed, new_sh)
        # Dirty validation queries / pairs, re-scored.
        if val_changed and self.variant == "nudge-m":
            self._build_pairs()
            dirty = self._px.size
        elif self.variant == "nudge-n":
            dirty_q = self._dirty_n(old_top, old_cols, new_cols, rescanned)
            if val_changed:
                dirty_q = np.flatnonzero(self._valive)
            self._rescore_n(dirty_q)
            dirty = dirty_q.size
        else:
            dirty_p = self._dirty_m(old_u, old_cols, new_cols, records)
            self._rescore_m(dirty_p)
            dirty = dirty_p.size
        self._gamma = self._choose_gamma()
        # The delta: changed slots (every slot when gamma moved), reverted rows, new records.
        gamma_moved = not (old_gamma == self._gamma)
        slots = np.arange(self._t) if gamma_moved else changed
        new_positions = np.asarray(new_positions, np.int64)
        new_positions = new_positions[~np.isin(new_positions, self._slot_rec[:self._t])]
        plain = np.concatenate([revert, new_positions])
        indices = np.concatenate([self._slot_rec[slots], plain])
        vectors = np.concatenate([self._project(slots).reshape(-1, self._d),
                                  self._served_rows(plain).reshape(-1, self._d)])
        tuned = np.r_[np.ones(slots.size, bool), np.zeros(plain.size, bool)]
        new = np.isin(indices, new_positions)
        self._mutating = False
        log.info("Tuner %s: gamma %.6g -> %.6g, %d rows tuned, %d reverted, %d re-scored, "
                 "%d rescanned", op, old_gamma, self._gamma, slots.size, revert.size, dirty,
                 rescanned.size)
        return self._delta(op, old_gamma, indices, vectors, tuned, new, deleted, t0,
                           rescanned=int(rescanned.size), rescored=int(dirty),
                           gamma_moved=gamma_moved, **summary)

    def _top(self):
        k = self.need
        return self._Ls[:, :k].copy(), self._Li[:, :k].copy()

    def _columns(self, slots, sh=None):
        """What the dirty tests need of ``slots``: records and their S/H columns (``sh`` when
        just computed, else copied out) (+ a, b, alpha, beta)."""
        S, H = sh if sh is not None else (self._S[:, slots].copy(), self._H[:, slots].copy())
        cols = {"rec": self._slot_rec[slots].copy(), "S": S, "H": H}
        if self.variant == "nudge-n":
            cols["a"], cols["b"] = self._a[slots].copy(), self._b[slots].copy()
            cols["alpha"], cols["beta"] = self._alpha[:, slots].copy(), self._beta[:, slots].copy()
        return cols

    def _dirty_n(self, old_top, old_cols, new_cols, rescanned):
        """Validation queries whose hits may have changed: their untouched top-``k_val``
        changed, or a changed record's old or new score reaches their ``k_val``-th best score
        at some gamma (kept from their last sweep: unchanged while nothing reaches it)."""
        k = self.need
        dirty = ((self._Li[:, :k] != old_top[1]).any(axis=1)
                 | (self._Ls[:, :k] != old_top[0]).any(axis=1))
        dirty[rescanned] = True
        kth = self._kth
        kth = kth - _SLACK * (1.0 + np.abs(np.where(np.isfinite(kth), kth, 0.0)))
        low = kth.min(axis=1)
        for cols in (old_cols, new_cols):
            if cols["rec"].size == 0:
                continue
            s, h, a, b = cols["S"], cols["H"], cols["a"], cols["b"]
            # NUDGE-N keeps x'(gamma) a unit vector in the plane of e and c: v . x' is at most
            # the norm of v's projection on that plane (a cheap screen over every pair).
            with np.errstate(divide="ignore", invalid="ignore"):
                w2 = np.where(b > 0, (h - a * s) ** 2 / np.where(b > 0, b, 1.0), 0.0)
            bound = np.sqrt(s * s + w2) * (1.0 + _SLACK)
            # The pairs the screen keeps: their scores at every gamma, as the sweep computes
            # them (two roundings, then the sum), against that gamma's k_val-th best.
            qi, ji = np.nonzero((bound >= low[:, None]) & ~dirty[:, None])
            if qi.size:
                score = cols["alpha"][:, ji] * s[qi, ji] + cols["beta"][:, ji] * h[qi, ji]
                dirty[qi[(score >= kth[qi].T).any(axis=0)]] = True
        return np.flatnonzero(dirty & self._valive)

    def _dirty_m(self, old_u, old_cols, new_cols, records):
        """Validation pairs whose interval may have changed: the answer itself changed, or its
        best untouched competitor, or a changed record's line ``s_j + gamma g_j`` (old or new)
        reaches the answer's line somewhere on the pair's interval (a feasible pair; both are
        lines, so at an end); for a pair with no interval, only the removal of a constraint
        that bound it can change that (its bound at ``low`` / ``high``, or a level line above).
        Slack makes every test conservative."""
        P = self._px.size
        self._u = self._u_score(np.arange(P)) if P else np.zeros(0)
        dirty = (self._u != old_u) | np.isin(self._px, records)
        if P == 0 or (old_cols["rec"].size == 0 and new_cols["rec"].size == 0):
            return np.flatnonzero(dirty)
        q = self._pq
        _, sx, gx = self._answer_lines(np.arange(P))
        low, high, ok = self._low, self._high, self._feasible
        tol = _SLACK * (1.0 + np.abs(sx) + np.abs(gx))
        feas = np.flatnonzero(ok & ~dirty)
        stuck = np.flatnonzero(~ok & ~dirty)
        lo_f, hi_f = low[feas], high[feas]
        # x's line at the ends of its interval; an unbounded one is judged by slopes.
        at_lo = sx[feas] + lo_f * gx[feas]
        finite = np.isfinite(hi_f)
        hi_e = np.where(finite, hi_f, 0.0)
        at_hi = sx[feas] + hi_e * gx[feas]
        for cols in (old_cols, new_cols):
            if cols["rec"].size == 0:
                continue
            sj, gj = cols["S"][q[feas]], cols["H"][q[feas]]
            # Slack per pair from the largest terms of its row (conservative, and one vector
            # instead of another P x C array): at gamma ~ 1e10, gamma * g rounds by ~1e-6.
            s_big, g_big = np.abs(sj).max(axis=1), np.abs(gj).max(axis=1)
            base = 1.0 + np.abs(sx[feas]) + s_big
            gxf = np.abs(gx[feas]) + g_big
            line = gj * lo_f[:, None]
            line += sj
            reach = line >= (at_lo - _SLACK * (base + lo_f * gxf))[:, None]
            np.multiply(gj, hi_e[:, None], out=line)
            line += sj
            at_end = np.where(finite, at_hi - _SLACK * (base + hi_e * gxf), np.inf)
            reach |= line >= at_end[:, None]
            # Unbounded above: a steeper competitor line overtakes x's eventually.
            open_end = np.flatnonzero(~finite)
            if open_end.size:
                reach[open_end] |= gj[open_end] > (gx[feas][open_end]
                                                   - tol[feas][open_end])[:, None]
            dirty[feas[reach.any(axis=1)]] = True
        if stuck.size and old_cols["rec"].size:
            sj, gj = old_cols["S"][q[stuck]], old_cols["H"][q[stuck]]
            D = gx[stuck][:, None] - gj
            s_dif = sj - sx[stuck][:, None]
            ts = tol[stuck][:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                bound = s_dif / D
            binding = (D > ts) & (bound >= (low[stuck] - _SLACK * (1 + np.abs(low[stuck])))[:, None])
            hs = high[stuck]
            binding |= (D < -ts) & (bound <= np.where(np.isfinite(hs), hs + _SLACK * (1 + np.abs(hs)),
                                                      np.inf)[:, None])
            binding |= (np.abs(D) <= ts) & (s_dif >= -ts)
            dirty[stuck[binding.any(axis=1)]] = True
        return np.flatnonzero(dirty)

    # ------------------------------------------------------------------------------------
    # Operations

    def _answers(self, queries, answers, *, allow_empty):
        """Validated query embeddings and their answers as CSR (each record once per query,
        sorted: ``QuerySet.csr(unique=True)``, built in one sort)."""
        q = _validate.as_queries("queries", queries, self._d)
        lists = _answer_lists("answers", answers, q.shape[0])
        counts = np.array([a.size for a in lists], np.int64)
        index = np.concatenate(lists) if counts.sum() else np.zeros(0, np.int64)
        owner = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
        if index.size:
            bad = (index < 0) | (index >= self._n)
            why = "is not a record position (0 <= position < {}); add new records with " \
                  "add_records first".format(self._n)
            if not bad.any():
                bad, why = np.isin(index, self._deleted), "was deleted; drop it from the answers"
            if bad.any():
                p = int(np.flatnonzero(bad)[0])
                raise ValueError(f"answers: answers[{int(owner[p])}] contains record "
                                 f"{int(index[p])}, which {why}")
            order = np.lexsort((index, owner))
            owner, index = owner[order], index[order]
            keep = np.r_[True, (owner[1:] != owner[:-1]) | (index[1:] != index[:-1])]
            owner, index = owner[keep], index[keep]
        if not allow_empty and index.size == 0:
            raise ValueError("answers: has no (query, answer) pairs; give answer lists")
        ptr = np.r_[0, np.cumsum(np.bincount(owner, minlength=counts.size))].astype(np.int64)
        return q, ptr, index

    @_all_or_nothing
    def add_feedback(self, queries, answers) -> Delta:
        """New train queries (a click, a label: the query embedding and the records that
        answered it). Reads only the rows it newly touches. ``delta.summary["feedback_ids"]``
        holds the ids :meth:`remove_feedback` takes (numbered in arrival order from 0, the
        fit's train queries first)."""
        self._check_fitted()
        t0 = time.perf_counter()
        q, ptr, index = self._answers(queries, answers, allow_empty=False)
        first = self._tq.shape[0]
        ids = np.arange(first, first + q.shape[0], dtype=np.int64)
        self._tq = np.concatenate([self._tq, q])
        self._tq_alive = np.r_[self._tq_alive, np.ones(q.shape[0], bool)]
        self._pair_q = np.r_[self._pair_q, np.repeat(ids, np.diff(ptr))]
        self._pair_r = np.r_[self._pair_r, index]
        return self._commit("add_feedback", t0, index, feedback_ids=ids.tolist())

    @_all_or_nothing
    def remove_feedback(self, ids) -> Delta:
        """Withdraw train queries by feedback id (the fit's train queries are 0 .. n-1)."""
        self._check_fitted()
        t0 = time.perf_counter()
        ids = np.unique(self._as_positions("ids", ids, self._tq.shape[0], "feedback ids"))
        dead = ids[~self._tq_alive[ids]]
        if dead.size:
            raise ValueError(f"ids: feedback {int(dead[0])} was already removed")
        self._tq_alive[ids] = False
        records = self._pair_r[np.isin(self._pair_q, ids)]
        return self._commit("remove_feedback", t0, records, feedback_ids=ids.tolist())

    @_all_or_nothing
    def add_validation(self, queries, answers) -> Delta:
        """New validation queries: one corpus pass for them only (batched), then gamma is
        chosen again. Queries without answers are skipped with a warning, as in a fit."""
        self._check_fitted()
        t0 = time.perf_counter()
        q, ptr, index = self._answers(queries, answers, allow_empty=True)
        counts = np.diff(ptr)
        keep = np.flatnonzero(counts > 0)
        if keep.size < counts.size:
            warnings.warn(f"queries: {counts.size - keep.size} validation queries have no "
                          f"answers and are skipped", stacklevel=2)
        if keep.size == 0:
            raise ValueError("answers: no validation query has an answer; give answer lists")
        q = q[keep]
        answers = [index[ptr[i]:ptr[i + 1]].copy() for i in keep]
        if self.variant == "nudge-m":
            self._want(np.concatenate(answers))  # a dask corpus: their rows, with the pass
        s, i, complete = self._pass(q, self._Li.shape[1], desc="tuner validation pass")
        t = self._t
        S, H = self._products(q, np.arange(t))
        cap = self._S.shape[1]
        self._S = np.concatenate([self._S, np.pad(S, ((0, 0), (0, cap - t)))])
        self._H = np.concatenate([self._H, np.pad(H, ((0, 0), (0, cap - t)))])
        first = self._vq.shape[0]
        self._vq = np.concatenate([self._vq, q])
        self._vq64 = None
        self._vans += answers
        self._valive = np.r_[self._valive, np.ones(keep.size, bool)]
        self._m = self._weights()
        self._Ls, self._Li = np.concatenate([self._Ls, s]), np.concatenate([self._Li, i])
        self._Lcomplete = np.r_[self._Lcomplete, complete]
        new_q = np.arange(first, first + keep.size)
        if self.variant == "nudge-n":
            self._hits = np.concatenate([self._hits, np.zeros((keep.size,
                                                               self._hits.shape[1]), np.int64)])
            self._kth = np.concatenate([self._kth, np.full((keep.size, self._kth.shape[1]),
                                                           -np.inf)])
            self._rescore_n(new_q)
            return self._commit("add_validation", t0, [], validation_queries=keep.size)
        return self._commit("add_validation", t0, [], val_changed=True,
                            validation_queries=keep.size)

    @_all_or_nothing
    def add_records(self, rows, ids=None) -> Delta:
        """Append records (rows (m, d) float16/float32): one pass over the new rows only,
        against the validation queries. They take positions ``n_records ..``; the tuner
        keeps them (and saves them with its state)."""
        self._check_fitted()
        t0 = time.perf_counter()
        rows = _validate.as_corpus("rows", rows)
        if rows.shape[1] != self._d or rows.shape[0] == 0:
            raise ValueError(f"rows: expected shape (m >= 1, {self._d}), got {rows.shape}")
        if (ids is None) != (self._ids is None):
            raise ValueError("ids: the corpus has ids, give one per new row" if ids is None
                             else "ids: the tuner was fitted without ids; leave ids None")
        rows = np.array(rows, dtype=np.float32 if rows.dtype == np.float64 else rows.dtype)
        first = self._n
        if ids is not None:
            new_ids = self._as_ids("ids", ids, rows.shape[0])
            if new_ids.dtype.kind != self._ids.dtype.kind:
                raise TypeError(f"ids: the corpus ids are {self._ids.dtype}, got {new_ids.dtype}")
            taken = self.positions_of(new_ids, strict=False) != -1
            if taken.any():
                raise ValueError(f"ids: {new_ids[taken][0].item()!r} already names a record; "
                                 f"record ids must be unique (delete that record first)")
            self._ids = np.concatenate([self._ids, new_ids])
        self._added.append(rows)
        self._n += rows.shape[0]
        s, i, complete = self._pass(self._vq, self._Li.shape[1], start=first,
                                    desc="tuner new-records pass")
        old_top = self._top()
        self._merge_lists(s, i, complete)
        return self._commit("add_records", t0, [], new_positions=np.arange(first, self._n),
                            old_top=old_top,
                            records_added=rows.shape[0])

    @_all_or_nothing
    def delete_records(self, positions=None, *, ids=None) -> Delta:
        """Delete records by position or by id: their feedback pairs and validation answers
        go with them (a validation query left without answers is skipped)."""
        self._check_fitted()
        t0 = time.perf_counter()
        if (positions is None) == (ids is None):
            raise ValueError("delete_records: give positions or ids (one of them)")
        if ids is not None:
            positions = self.positions_of(ids)
        pos = np.unique(self._as_positions("positions", positions, self._n, "record positions"))
        again = pos[np.isin(pos, self._deleted)]
        if again.size:
            raise ValueError(f"positions: record {int(again[0])} was already deleted")
        self._deleted = np.union1d(self._deleted, pos)
        drop = np.isin(self._pair_r, pos)
        records = self._pair_r[drop]
        self._pair_q, self._pair_r = self._pair_q[~drop], self._pair_r[~drop]
        val_changed = False
        for q, a in enumerate(self._vans):
            gone = np.isin(a, pos)
            if gone.any():
                self._vans[q] = a[~gone]
                val_changed = True
                if self._vans[q].size == 0 and self._valive[q]:
                    self._valive[q] = False
                    log.info("Tuner: validation query %d lost its last answer; skipped", q)
        self._m = self._weights()
        return self._commit("delete_records", t0, records, deleted=pos,
                            val_changed=val_changed)

    @staticmethod
    def _as_positions(name, values, n, what):
        arr = np.asarray(values)
        if arr.size == 0:
            raise ValueError(f"{name}: is empty; give at least one of the {what}")
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            raise TypeError(f"{name}: expected a list of int {what}, got {arr.dtype} "
                            f"{arr.shape}")
        arr = arr.reshape(-1).astype(np.int64)
        if arr.size == 0:
            raise ValueError(f"{name}: is empty; give at least one of the {what}")
        bad = (arr < 0) | (arr >= n)
        if bad.any():
            raise ValueError(f"{name}: {int(arr[bad][0])} is out of range; {what} are "
                             f"0 <= value < {n}")
        return arr

    # ------------------------------------------------------------------------------------
    # State on disk

    def _fingerprint(self, corpus):
        """Shape, dtype and a hash of 64 spread rows: enough to refuse another corpus. The
        rows are read in one index-array access (a dask corpus: one gather on its workers);
        their bytes in row order are hashed, so the value does not depend on how they were
        read (a host array, a memmap, a dask corpus of the same rows give the same)."""
        n = corpus.shape[0]
        h = hashlib.sha256(f"{tuple(corpus.shape)}{corpus.dtype}".encode())
        rows = np.unique(np.linspace(0, n - 1, 64).astype(np.int64))
        h.update(np.ascontiguousarray(np.asarray(corpus[rows], dtype=corpus.dtype)).tobytes())
        return h.hexdigest()

    def save(self, path) -> None:
        """Write the state to ``path`` (.npz): atomic (a temp file in the same folder, then a
        rename), so an interrupted save leaves the previous file as it was. The corpus is not
        saved (only a fingerprint of it); rows added with :meth:`add_records` are."""
        self._check_fitted()
        est = self.estimator
        meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "variant": self.variant,
                "margin": self.margin, "backend": est.backend, "chunk_rows": est.chunk_rows,
                "n_threads": est.n_threads, "val_block": est.val_block,
                "k_val": getattr(est, "k_val", None),
                "gammas": est.gammas.tolist() if self.variant == "nudge-n" else None,
                "gamma_rule": getattr(est, "gamma_rule", None),
                "n_base": int(self._corpus.shape[0]), "d": self._d, "n": self._n,
                "corpus_dtype": str(self._corpus.dtype),
                "fingerprint": self._fingerprint(self._corpus), "gamma": self._gamma,
                "n_added": len(self._added), "ids": None if self._ids is None else
                self._ids.dtype.kind, "corpus_path": self._corpus_path(),
                "corpus_kind": "dask" if getattr(self._corpus, "DASK_ROWS", False)
                else "array"}
        t = self._t
        vcount = np.array([a.size for a in self._vans], np.int64)
        arrays = dict(
            meta=np.array(json.dumps(meta)), deleted=self._deleted, tq=self._tq,
            tq_alive=self._tq_alive, pair_q=self._pair_q, pair_r=self._pair_r,
            slot_rec=self._slot_rec[:t], base=self._base[:t], grad=self._grad[:t],
            vq=self._vq, vcount=vcount,
            vindex=np.concatenate(self._vans) if vcount.sum() else np.zeros(0, np.int64),
            valive=self._valive, Ls=self._Ls, Li=self._Li, Lcomplete=self._Lcomplete)
        if self._ids is not None:
            arrays["ids"] = self._ids
        for j, rows in enumerate(self._added):
            arrays[f"added_{j}"] = rows
        try:
            _replace_atomically(path, lambda fh: np.savez(fh, **arrays))
        except OSError as exc:
            raise OSError(f"path: cannot write the tuner state to {os.fspath(path)!r} "
                          f"({exc.strerror or exc})") from exc
        log.info("Tuner: state saved to %s", path)

    def _corpus_path(self):
        """The .npy file behind a memory-mapped corpus (so ``load`` can reopen it), or None
        (an in-memory corpus, a dask corpus: ``load`` needs it passed)."""
        base = self._corpus
        if getattr(base, "DASK_ROWS", False):
            return None
        while base is not None and not isinstance(base, np.memmap):
            base = getattr(base, "base", None)
        name = getattr(base, "filename", None)
        return os.path.abspath(name) if name else None

    @classmethod
    def load(cls, path, corpus=None, *, backend=None, n_threads=None,
             progress=None) -> "Tuner":
        """Read a state :meth:`save` wrote, for the same ``corpus`` (checked by shape, dtype
        and a fingerprint). Without ``corpus``, the .npy file the state was fitted on is
        memory-mapped again (when it was a memmap); a state fitted on an in-memory or a dask
        corpus needs it passed. ``corpus`` may be a row-chunked ``dask.array`` (whatever the
        state was fitted on, if it holds the same rows): later passes run on its workers,
        rows are gathered by index, as after :meth:`fit`. ``backend`` and ``n_threads``
        override the saved ones.
        Derived values (validation products, hits or intervals) are recomputed; the corpus is
        not read beyond the fingerprint's rows and, for NUDGE-M, the validation answers' rows
        (a dask corpus: one gather each)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such tuner state file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(str(data.pop("meta")))
        except Exception as exc:  # truncated zip, corrupt member, not JSON, not an npz
            raise ValueError(f"{path}: not a readable tuner state (truncated or corrupt: "
                             f"{type(exc).__name__}: {exc}); save it again") from exc
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path}: not a nudgefast tuner state (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: tuner state version {meta.get('version')}, this "
                             f"nudgefast reads version {STATE_VERSION}; upgrade nudgefast")
        if corpus is None:
            where = meta.get("corpus_path")
            if not where and meta.get("corpus_kind") == "dask":
                raise ValueError(f"corpus: the state in {path} was fitted on a dask corpus; "
                                 f"pass that dask array (e.g. da.from_zarr(...) or "
                                 f"nudgefast._dask.npy_corpus(...) of the same rows)")
            if not where:
                raise ValueError(f"corpus: the state in {path} was fitted on an in-memory "
                                 f"corpus; pass the corpus it was fitted on")
            if not os.path.exists(where):
                raise ValueError(f"corpus: the state in {path} was fitted on {where}, which is "
                                 f"gone; pass the corpus it was fitted on")
            corpus = np.load(where, mmap_mode="r")
        if _arrays.is_dask(corpus):
            from . import _dask
            corpus = _dask.as_corpus("corpus", corpus, backend or meta["backend"])
        else:
            corpus = _validate.as_corpus("corpus", corpus)
        want = (meta["n_base"], meta["d"])
        if corpus.shape != want or str(corpus.dtype) != meta["corpus_dtype"]:
            raise ValueError(f"corpus: the state in {path} was saved for a {meta['corpus_dtype']}"
                             f" corpus of shape {want}, got {corpus.dtype} {corpus.shape}; "
                             f"load it with the corpus it was fitted on")
        common = dict(backend=backend or meta["backend"], chunk_rows=meta["chunk_rows"],
                      n_threads=meta["n_threads"] if n_threads is None else n_threads,
                      val_block=meta["val_block"],
                      progress=progress)
        est = (NudgeN(k_val=meta["k_val"], gammas=meta["gammas"], **common)
               if meta["variant"] == "nudge-n" else
               NudgeM(gamma_rule=meta["gamma_rule"], **common))
        self = cls(est, margin=meta["margin"])
        if self._fingerprint(corpus) != meta["fingerprint"]:
            raise ValueError(f"corpus: differs from the one the state in {path} was fitted on "
                             f"(same shape, other values); load it with that corpus")
        try:
            self._restore(corpus, meta, data)
        except KeyError as exc:
            raise ValueError(f"{path}: tuner state is missing {exc}; save it again") from exc
        return self

    def _restore(self, corpus, meta, data):
        self._corpus, self._impl = corpus, _backends.get(self.estimator.backend)
        self._threads = self.estimator.n_threads
        self._d, self._n = meta["d"], meta["n"]
        self._added = [data[f"added_{j}"] for j in range(meta["n_added"])]
        self._ids = data["ids"] if meta["ids"] else None
        self._deleted = data["deleted"]
        self._tq, self._tq_alive = data["tq"], data["tq_alive"]
        self._pair_q, self._pair_r = data["pair_q"], data["pair_r"]
        self._slot_rec = data["slot_rec"]
        self._t = self._slot_rec.size
        self._slot_of = {int(r): s for s, r in enumerate(self._slot_rec)}
        self._base, self._grad = data["base"], data["grad"]
        self._vq = data["vq"]
        self._vq64 = None
        ptr = np.r_[0, np.cumsum(data["vcount"])]
        self._vans = [data["vindex"][ptr[i]:ptr[i + 1]] for i in range(ptr.size - 1)]
        self._valive = data["valive"]
        self._m = self._weights()
        self._Ls, self._Li, self._Lcomplete = data["Ls"], data["Li"], data["Lcomplete"]
        self._init_coefficients()
        self._derive()
