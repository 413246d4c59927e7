"""After a model change: map stale embeddings to the new model's space (Monath et al., arXiv
2409.01890, "corrector networks"), fitted on a re-embedded sample, applied chunk by chunk
inside the streaming passes.

When the embedding model changes, the queries switch to the new model at once, but
re-embedding 10^8 records takes days. A :class:`Corrector` fitted on the pairs (stale row,
fresh row) of a re-embedded sample maps every other record's stale row into the new space:

    y(x) = normalize(x W0 + b0 [+ relu(x W1 + b1) W2])        x: the unit stale row

``kind="ridge"`` (the default): the linear map alone, closed-form ridge regression (exact,
seconds; the penalty chosen on held-out pairs). ``kind="mlp"``: the ridge map plus a residual
two-layer network, trained with Adam in NumPy from the ridge solution (the residual starts at
zero), early-stopped on held-out pairs. ``d_old != d_new`` is allowed.

The corrected corpus uses each sampled record's true fresh row (:meth:`Corrector.fit`'s
``index``), and the map everywhere else. It is never materialised unless asked:
``search(q, stale_corpus, k, corrector=c)`` and ``NudgeN/NudgeM(...).fit(stale_corpus, train,
val, corrector=c)`` read the stale corpus in row chunks and correct each chunk (one GEMM per
layer and the activation, into one reused buffer) right before the backend's top-k kernel, on
every backend and for memmaps, float16 and dask corpora; :meth:`Corrector.apply` writes the
corrected corpus when it is wanted.

Which records to re-embed for a budget: :func:`choose_sample` (uniform, or query-aware:
records that answer train queries first, then the records the train queries retrieve most).

A corrector can make things worse than staying on the old model (a different model family,
a tiny sample): :meth:`Corrector.check` scores the corrected corpus with the new model's dev
queries against the old model end to end (old queries on the stale corpus), keeps both
scores, and warns when the correction loses.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings

import numpy as np

from . import _validate

log = logging.getLogger("nudgefast")

FORMAT = "nudgefast.corrector"
VERSION = 1
#: Ridge penalties tried when ``alpha`` is None (relative to the mean diagonal of X^T X).
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
#: Rows corrected at a time by :meth:`Corrector.apply` (the passes use their own chunks).
CHUNK_ROWS = 16384


def _unit(rows):
    """float64 unit rows of checked (finite, nonzero) rows."""
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class Corrector:
    """A map from the old model's embeddings to the new model's (see the module docstring).

    kind: ``"ridge"`` or ``"mlp"``. alpha: the ridge penalty (relative to the mean diagonal of
    X^T X); None: the best of :data:`RIDGE_GRID` on the held-out pairs. hidden, epochs, lr,
    batch, patience: the MLP's width, most epochs, Adam step, minibatch rows, and the epochs
    without a held-out improvement before it stops (the best epoch's weights are kept).
    holdout: the fraction of pairs held out for those choices (the final ridge map is refitted
    on every pair). old_model / new_model: the names of the models it maps between (kept with
    it, checked by nothing but the caller). seed: the holdout split and the MLP's init and
    minibatches.
    """

    def __init__(self, kind="ridge", *, alpha=None, hidden=1024, epochs=200, lr=1e-3, batch=256,
                 patience=15, holdout=0.1, old_model=None, new_model=None, seed=0):
        if kind not in ("ridge", "mlp"):
            raise ValueError(f"kind: must be 'ridge' or 'mlp', got {kind!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0
                                      and np.isfinite(alpha)):
            raise ValueError(f"alpha: must be a positive number or None (chosen on held-out "
                             f"pairs), got {alpha!r}")
        if not (isinstance(holdout, float) and 0 < holdout < 0.5):
            raise ValueError(f"holdout: must be a float in (0, 0.5), got {holdout!r}")
        self.kind = kind
        self.alpha = alpha
        self.hidden = _validate.as_size("hidden", hidden, allow_none=False)
        self.epochs = _validate.as_size("epochs", epochs, allow_none=False)
        self.lr = float(lr)
        self.batch = _validate.as_size("batch", batch, allow_none=False)
        self.patience = _validate.as_size("patience", patience, allow_none=False)
        self.holdout = holdout
        self.old_model, self.new_model = old_model, new_model
        self.seed = seed
        self.W0 = self.b0 = self.W1 = self.b1 = self.W2 = None
        #: sorted corpus rows whose fresh embedding is known, and those rows (unit, float32)
        self.index = np.zeros(0, np.int64)
        self.fresh = None
        #: what the fit measured: chosen alpha, held-out cosine (ridge, final), epochs, seconds
        self.info = {}
        #: :meth:`check`'s dev scores ({"old_model": ..., "corrected": ...}) once it ran
        self.dev_scores = None

    # ------------------------------------------------------------------------------------
    # fit

    @property
    def d_old(self):
        return None if self.W0 is None else self.W0.shape[0]

    @property
    def d_new(self):
        return None if self.W0 is None else self.W0.shape[1]

    def fit(self, stale, fresh, index=None, *, corpus=None, dev=None, dev_old=None
            ) -> "Corrector":
        """Fit on the pairs ``stale[i] -> fresh[i]`` ((m, d_old) and (m, d_new) arrays, the
        same records embedded by the old and the new model). ``index``: those records' rows
        in the corpus (distinct); the corrected corpus then uses their true fresh rows (kept
        as float32 unit rows, O(m d_new)). With ``corpus`` (the stale corpus), ``dev`` and
        ``dev_old``, runs :meth:`check` after fitting (recommended: it is what warns when the
        correction is worse than staying on the old model). Returns self."""
        if (corpus is None) != (dev is None) or (dev is None) != (dev_old is None):
            raise ValueError("corpus, dev, dev_old: pass all three (the check against the old "
                             "model) or none")
        t0 = time.perf_counter()
        x = _unit(_validate.as_queries("stale", stale, dtype=np.float64, what="record"))
        y = _unit(_validate.as_queries("fresh", fresh, dtype=np.float64, what="record"))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"fresh: {y.shape[0]} rows for {x.shape[0]} stale rows; pass the "
                             f"same records, in the same order, embedded by both models")
        if x.shape[0] < 10:
            raise ValueError(f"stale: {x.shape[0]} pairs; a corrector needs at least 10 "
                             f"re-embedded records (a few hundred for a useful one)")
        if index is not None:
            index = np.asarray(index)
            if index.shape != (x.shape[0],) or not np.issubdtype(index.dtype, np.integer):
                raise ValueError(f"index: expected {x.shape[0]} integer corpus rows (one per "
                                 f"pair), got {index.dtype} of shape {index.shape}")
            if index.min() < 0 or np.unique(index).size != index.size:
                raise ValueError("index: corpus rows must be >= 0 and distinct")
        rng = np.random.default_rng(self.seed)
        perm = rng.permutation(x.shape[0])
        n_hold = max(1, int(round(self.holdout * x.shape[0])))
        hold, train = perm[:n_hold], perm[n_hold:]
        alpha = self.alpha
        if alpha is None:
            scores = {a: _heldout_cos(_ridge(x[train], y[train], a), x[hold], y[hold])
                      for a in RIDGE_GRID}
            alpha = max(scores, key=lambda a: (scores[a], a))
            self.info["ridge_heldout_cos"] = {str(a): float(s) for a, s in scores.items()}
        self.info["alpha"] = float(alpha)
        if self.kind == "ridge":
            W, b = _ridge(x, y, alpha)
            self.W0, self.b0 = W.astype(np.float32), b.astype(np.float32)
        else:
            W, b = _ridge(x[train], y[train], alpha)
            self._fit_mlp(x[train], y[train], x[hold], y[hold], W, b, rng)
        if index is not None:
            order = np.argsort(index)
            self.index = index[order].astype(np.int64)
            self.fresh = y[order].astype(np.float32)
        else:
            self.index, self.fresh = np.zeros(0, np.int64), None
        self.info["heldout_cos"] = float(_heldout_cos(self, x[hold], y[hold]))
        self.info["pairs"] = int(x.shape[0])
        self.info["fit_seconds"] = time.perf_counter() - t0
        log.info("Corrector(%s): %d pairs, %d -> %d dims, alpha=%.3g, held-out cosine %.4f, "
                 "%.2f s", self.kind, x.shape[0], x.shape[1], y.shape[1], alpha,
                 self.info["heldout_cos"], self.info["fit_seconds"])
        if dev is not None:
            self.check(corpus, dev, dev_old)
        return self

    def _fit_mlp(self, x, y, xh, yh, W, b, rng):
        """Adam on the residual network from the ridge map: mean (1 - cosine) of the
        prediction with the fresh row; the epoch with the best held-out cosine is kept."""
        d_old, d_new, h = x.shape[1], y.shape[1], self.hidden
        params = {"W0": W.astype(np.float32), "b0": b.astype(np.float32),
                  "W1": (rng.standard_normal((d_old, h)) * np.sqrt(2.0 / d_old)
                         ).astype(np.float32),
                  "b1": np.zeros(h, np.float32), "W2": np.zeros((h, d_new), np.float32)}
        m = {k: np.zeros_like(v) for k, v in params.items()}
        v = {k: np.zeros_like(v) for k, v in params.items()}
        x32, y32 = x.astype(np.float32), y.astype(np.float32)
        best, best_cos, stale_epochs, step = None, -np.inf, 0, 0
        b1_, b2_, eps = 0.9, 0.999, 1e-8
        for epoch in range(self.epochs):
            for s in range(0, x32.shape[0], self.batch):  # minibatches of this epoch's order
                grads = _mlp_grads(params, x32[s:s + self.batch], y32[s:s + self.batch])
                step += 1
                for k in params:
                    m[k] = b1_ * m[k] + (1 - b1_) * grads[k]
                    v[k] = b2_ * v[k] + (1 - b2_) * grads[k] ** 2
                    mh = m[k] / (1 - b1_ ** step)
                    vh = v[k] / (1 - b2_ ** step)
                    params[k] -= (self.lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
            order = rng.permutation(x32.shape[0])
            x32, y32 = x32[order], y32[order]
            cos = float(np.mean(np.sum(_normalize(_mlp_forward(params, xh.astype(np.float32))[0])
                                       * yh, axis=1)))
            if cos > best_cos:
                best, best_cos, stale_epochs = {k: p.copy() for k, p in params.items()}, cos, 0
            else:
                stale_epochs += 1
                if stale_epochs >= self.patience:
                    break
        self.info["epochs"] = epoch + 1
        self.info["best_heldout_cos"] = best_cos
        self.W0, self.b0, self.W1, self.b1, self.W2 = (best[k] for k in
                                                       ("W0", "b0", "W1", "b1", "W2"))

    # ------------------------------------------------------------------------------------
    # apply

    def _check_fitted(self):
        if self.W0 is None:
            raise RuntimeError("Corrector: call fit(stale, fresh, index) (or Corrector.load) "
                               "first")

    def transform(self, rows, out=None) -> np.ndarray:
        """The corrected rows of ``rows`` ((m, d_old) stale embeddings; float16/32/64): float32
        unit rows (m, d_new), into ``out`` when given. A zero or NaN/inf row gives NaN (the
        passes flag it, naming the record)."""
        self._check_fitted()
        x = np.asarray(rows, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d_old:
            raise ValueError(f"rows: expected (m, {self.d_old}) stale embeddings, got shape "
                             f"{x.shape}")
        with np.errstate(invalid="ignore", divide="ignore"):
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = np.matmul(x, self.W0, out=out)
        y += self.b0
        if self.W1 is not None:
            hid = x @ self.W1
            hid += self.b1
            np.maximum(hid, 0, out=hid)
            y += hid @ self.W2
        with np.errstate(invalid="ignore", divide="ignore"):
            y /= np.linalg.norm(y, axis=1, keepdims=True)
        return y

    def corrected_rows(self, stale, positions, out=None) -> np.ndarray:
        """The corrected rows of the stale rows ``stale`` (m, d_old), which are the corpus's
        rows ``positions`` (m,): the map's output, and each sampled record's fresh row."""
        y = self.transform(stale, out=out)
        if self.index.size and positions.size:
            hit = np.minimum(np.searchsorted(self.index, positions), self.index.size - 1)
            known = self.index[hit] == positions
            if known.any():
                y[known] = self.fresh[hit[known]]
        return y

    def view(self, corpus) -> "CorrectedRows":
        """The corrected corpus as a read-only (N, d_new) float32 view of the stale
        ``corpus`` (host array or memmap), corrected where it is read (see
        :class:`CorrectedRows`)."""
        self._check_fitted()
        self._check_corpus(corpus.shape)
        return CorrectedRows(corpus, self)

    def apply(self, corpus, out=None, *, chunk_rows=None):
        """The corrected corpus (N, d_new) float32 unit rows, streamed in row chunks from the
        stale ``corpus`` (an (N, d_old) array or memmap, float16/32): into ``out`` (a writable
        float32 (N, d_new) array or memmap) when given, else a new array. Returns it."""
        self._check_fitted()
        corpus = _validate.as_corpus("corpus", corpus)
        n, d = corpus.shape
        self._check_corpus(corpus.shape)
        shape = (n, self.d_new)
        if out is None:
            out = np.empty(shape, np.float32)
        elif not (isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32
                  and out.flags.c_contiguous and out.flags.writeable):
            raise ValueError(f"out: expected a writable C-contiguous float32 array of shape "
                             f"{shape}, got {getattr(out, 'dtype', type(out).__name__)} "
                             f"{tuple(getattr(out, 'shape', ()))}; or pass None")
        step = _validate.as_size("chunk_rows", chunk_rows) or CHUNK_ROWS
        view = CorrectedRows(corpus, self)
        for s in range(0, n, step):
            e = min(s + step, n)
            view.rows_into(s, e, out[s:e])
            bad = ~np.isfinite(out[s:e]).all(axis=1)
            if bad.any():
                row = s + int(np.argmax(bad))
                raise _validate.row_error("corpus", row, corpus[row], True)
        return out

    def _check_corpus(self, shape):
        n, d = shape
        if d != self.d_old:
            raise ValueError(f"corpus: {d} columns, the corrector maps {self.d_old}-d stale "
                             f"embeddings ({self.old_model or 'old model'} -> "
                             f"{self.new_model or 'new model'}); pass the stale corpus")
        if self.index.size and self.index[-1] >= n:
            raise ValueError(f"corpus: {n} rows, but the corrector's sample names row "
                             f"{int(self.index[-1])}; pass the corpus the sample came from")

    # ------------------------------------------------------------------------------------
    # does it help?

    def check(self, corpus, dev, dev_old, *, k=10, backend="auto", chunk_rows=None,
              n_threads=None) -> dict:
        """Score the correction on validation queries against staying on the old model:
        NDCG@k of ``dev`` (a :class:`~nudgefast.QuerySet` of the new model's query
        embeddings) on the corrected ``corpus`` (the stale corpus, corrected inside the
        pass), and of the same queries embedded by the old model (``dev_old``: a QuerySet,
        or its (n, d_old) embeddings; the answers are ``dev``'s) on the stale corpus, end to
        end. Keeps ``{"old_model": ..., "corrected": ..., "k": k}`` in :attr:`dev_scores`
        (saved with the corrector) and returns it. When the corrected corpus scores lower,
        says so: a ``UserWarning`` and a log warning recommending re-embedding (or a larger
        sample) or staying on the old model."""
        from .metrics import metrics
        from .queryset import QuerySet
        from .search import search
        self._check_fitted()
        k = _validate.as_size("k", k, allow_none=False)
        if not isinstance(dev, QuerySet):
            raise TypeError(f"dev: expected a QuerySet of the new model's query embeddings, "
                            f"got {type(dev).__name__}")
        old_q = dev_old.embeddings if isinstance(dev_old, QuerySet) else dev_old
        old_q = _validate.as_queries("dev_old", old_q, self.d_old)
        if old_q.shape[0] != len(dev):
            raise ValueError(f"dev_old: {old_q.shape[0]} queries for {len(dev)} in dev; pass "
                             f"the same queries, in the same order, embedded by the old model")
        kw = dict(backend=backend, chunk_rows=chunk_rows, n_threads=n_threads, progress=False)
        corrected = metrics(search(dev.embeddings, corpus, k, corrector=self, **kw).indices,
                            dev, k)[f"ndcg@{k}"]
        old = metrics(search(old_q, corpus, k, **kw).indices, dev, k)[f"ndcg@{k}"]
        self.dev_scores = {"old_model": float(old), "corrected": float(corrected), "k": k}
        log.info("Corrector check: dev NDCG@%d corrected %.4f, old model end to end %.4f", k,
                 corrected, old)
        if corrected < old:
            msg = (f"Corrector: on the {len(dev)} dev queries the corrected corpus scores "
                   f"NDCG@{k} {corrected:.4f}, the old model end to end {old:.4f}: the "
                   f"correction makes retrieval worse. Re-embed the corpus with the new model "
                   f"(or re-embed a larger sample), or stay on the old model until then")
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
        return self.dev_scores

    # ------------------------------------------------------------------------------------
    # save / load

    def save(self, path) -> None:
        """Write the fitted corrector (its maps, the sample's rows and fresh embeddings, the
        model names, shapes and fit info) to ``path`` (.npz), atomically."""
        from .handoff import _replace_atomically
        self._check_fitted()
        meta = {"format": FORMAT, "version": VERSION, "kind": self.kind,
                "d_old": self.d_old, "d_new": self.d_new, "hidden": self.hidden,
                "old_model": self.old_model, "new_model": self.new_model,
                "alpha": self.alpha, "epochs": self.epochs, "lr": self.lr, "batch": self.batch,
                "patience": self.patience, "holdout": self.holdout, "seed": self.seed,
                "info": self.info, "dev_scores": self.dev_scores}
        arrays = {"meta": np.array(json.dumps(meta)), "W0": self.W0, "b0": self.b0,
                  "index": self.index}
        if self.W1 is not None:
            arrays.update(W1=self.W1, b1=self.b1, W2=self.W2)
        if self.fresh is not None:
            arrays["fresh"] = self.fresh
        _replace_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path) -> "Corrector":
        """A corrector :meth:`save` wrote."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such corrector file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            meta = json.loads(str(data.pop("meta")))
        except Exception as exc:
            raise ValueError(f"{path}: not a readable corrector (truncated or corrupt: "
                             f"{type(exc).__name__}: {exc}); save it again") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a nudgefast corrector")
        if meta.get("version") != VERSION:
            raise ValueError(f"{path}: corrector version {meta.get('version')}, this nudgefast "
                             f"reads version {VERSION}; upgrade nudgefast")
        self = cls(meta["kind"], alpha=meta["alpha"], hidden=meta["hidden"],
                   epochs=meta["epochs"], lr=meta["lr"], batch=meta["batch"],
                   patience=meta["patience"], holdout=meta["holdout"],
                   old_model=meta["old_model"], new_model=meta["new_model"], seed=meta["seed"])
        self.W0, self.b0 = data["W0"], data["b0"]
        if "W1" in data:
            self.W1, self.b1, self.W2 = data["W1"], data["b1"], data["W2"]
        self.index = data["index"]
        self.fresh = data.get("fresh")
        self.info, self.dev_scores = meta["info"], meta["dev_scores"]
        if self.W0.shape != (meta["d_old"], meta["d_new"]):
            raise ValueError(f"{path}: its map is {self.W0.shape}, its header says "
                             f"({meta['d_old']}, {meta['d_new']}); save it again")
        return self

    def __repr__(self):
        if self.W0 is None:
            return f"Corrector({self.kind!r}, unfitted)"
        return (f"Corrector({self.kind!r}, {self.d_old} -> {self.d_new}, "
                f"{self.old_model or '?'} -> {self.new_model or '?'}, "
                f"{self.index.size} fresh rows)")


def choose_sample(n_records, budget, strategy="uniform", *, train=None, old_queries=None,
                  corpus=None, k=10, seed=0, backend="auto"):
    """The records to re-embed for a budget: sorted int64 corpus rows.

    budget: a fraction of the corpus in (0, 1], or a number of records (int >= 1).
    strategy: ``"uniform"``: at random. ``"query-aware"``: the records that answer ``train``
    queries first (a :class:`~nudgefast.QuerySet`; only its answers are read: the records
    answering the most queries first), then, when ``old_queries`` (the train queries
    embedded by the old model, (n, d_old)) and the stale ``corpus`` are given, the records
    those queries retrieve most often in their top ``k`` (one search pass), then at random.
    Ties are broken at random (``seed``)."""
    n = _validate.as_size("n_records", n_records, allow_none=False)
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"budget: a fraction must be in (0, 1], got {budget!r}")
        m = max(1, int(round(budget * n)))
    else:
        m = _validate.as_size("budget", budget, allow_none=False)
        if m > n:
            raise ValueError(f"budget: {m} records of a corpus of {n}; pass at most {n}")
    rng = np.random.default_rng(seed)
    if strategy == "uniform":
        return np.sort(rng.choice(n, m, replace=False)).astype(np.int64)
    if strategy != "query-aware":
        raise ValueError(f"strategy: must be 'uniform' or 'query-aware', got {strategy!r}")
    from .queryset import QuerySet, check_answers
    if not isinstance(train, QuerySet):
        raise TypeError(f"train: the query-aware sample needs the train QuerySet (its answers), "
                        f"got {type(train).__name__}")
    csr = train.csr(unique=True)
    check_answers("train", csr, n)
    tie = rng.random(n)  # a random order among equals
    answered = np.bincount(csr.index, minlength=n).astype(np.float64)
    retrieved = np.zeros(n)
    if old_queries is not None:
        if corpus is None:
            raise ValueError("corpus: the stale corpus is needed to rank records by how often "
                             "old_queries retrieve them; pass it, or leave old_queries None")
        from .search import search
        top = search(old_queries, corpus, min(k, n), backend=backend, progress=False).indices
        retrieved = np.bincount(top[top >= 0].ravel(), minlength=n).astype(np.float64)
    # answer count first, then retrieval count, then the random tie-break
    order = np.lexsort((tie, -retrieved, -answered))
    return np.sort(order[:m]).astype(np.int64)


def as_corrector(name, value) -> Corrector:
    """``value`` checked to be a fitted :class:`Corrector`."""
    if not isinstance(value, Corrector):
        raise TypeError(f"{name}: expected a fitted nudgefast.Corrector, got "
                        f"{type(value).__name__}")
    value._check_fitted()
    return value


class CorrectedRows:
    """A read-only (N, d_new) float32 view of a stale corpus through a fitted
    :class:`Corrector`: a slice or a list of rows reads those stale rows only and corrects
    them (sampled records: their fresh rows). The streaming passes read it like a host array
    (``HOST_ROWS``: :meth:`chunk` corrects into one reused buffer), so every backend's top-k
    kernel scores corrected rows without the corrected corpus ever existing. ``source``: the
    stale corpus (a flagged row's error is about its stale values). ``row_offset``: the
    corpus row of this view's first row (a Dask block), for the sample's rows."""

    HOST_ROWS = True
    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, source, corrector, row_offset=0):
        self.source = source
        self.corrector = corrector
        self.row_offset = int(row_offset)
        self.shape = (source.shape[0], corrector.d_new)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.rows(np.array([key], np.int64))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:
                return self.rows_into(start, stop, None)
            key = np.arange(start, stop, step)
        return self.rows(np.asarray(key, np.int64))

    def rows(self, rows) -> np.ndarray:
        """Corrected rows ``rows`` (local numbers, any order)."""
        rows = np.where(rows < 0, rows + self.shape[0], rows)
        stale = np.asarray(self.source[rows])
        return self.corrector.corrected_rows(stale, rows + self.row_offset)

    def rows_into(self, start, stop, out) -> np.ndarray:
        """Corrected rows ``start:stop`` (into ``out`` when given)."""
        return self.corrector.corrected_rows(
            self.source[start:stop], np.arange(start, stop, dtype=np.int64) + self.row_offset,
            out=out)

    def chunk(self, start, stop) -> np.ndarray:
        """Rows ``start:stop`` corrected into this view's one reused buffer: valid until the
        next call (the streaming pass consumes each chunk before reading the next)."""
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[0] < stop - start:
            buf = self._buf = np.empty((stop - start, self.shape[1]), np.float32)
        return self.rows_into(start, stop, buf[:stop - start])


def _normalize(y):
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def _ridge(x, y, alpha):
    """Ridge regression y ~ x W + b (bias unpenalised), float64; ``alpha`` relative to the
    mean diagonal of the centred x^T x."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    g = xc.T @ xc
    lam = alpha * np.trace(g) / g.shape[0]
    W = np.linalg.solve(g + lam * np.eye(g.shape[0]), xc.T @ yc)
    return W, my - mx @ W


def _heldout_cos(model, x, y):
    if isinstance(model, Corrector):
        pred = model.transform(x).astype(np.float64)
    else:
        W, b = model
        pred = _normalize(x @ W + b)
    return float(np.mean(np.sum(pred * y, axis=1)))


def _mlp_forward(p, x):
    hid_pre = x @ p["W1"] + p["b1"]
    hid = np.maximum(hid_pre, 0)
    return x @ p["W0"] + p["b0"] + hid @ p["W2"], hid_pre, hid


def _mlp_grads(p, x, y):
    """Gradients of mean(1 - cos(pred, y)) (y unit rows)."""
    pred, hid_pre, hid = _mlp_forward(p, x)
    norm = np.linalg.norm(pred, axis=1, keepdims=True)
    u = pred / norm
    cos = np.sum(u * y, axis=1, keepdims=True)
    g = -(y - cos * u) / norm / x.shape[0]  # d(1 - cos)/d pred, averaged
    g_hid = (g @ p["W2"].T) * (hid_pre > 0)
    return {"W0": x.T @ g, "b0": g.sum(axis=0), "W2": hid.T @ g,
            "W1": x.T @ g_hid, "b1": g_hid.sum(axis=0)}
