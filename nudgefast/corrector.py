"""After a model change: map stale embeddings to the new model's space (Monath et al., arXiv
2409.01890, "corrector networks"), fitted on a re-embedded sample, applied chunk by chunk
inside the streaming passes.

When the embedding model changes, the queries switch to the new model at once, but
re-embedding 10^8 records takes days. A :class:`Corrector` fitted on the pairs (stale row,
fresh row) of a re-embedded sample maps every other record's stale row into the new space:

    y(x) = normalize(x W0 + b0 [+ relu(x W1 + b1) W2])        x: the unit stale row

``kind="ridge"`` (the default): the linear map alone, closed-form ridge regression on the
pairs (exact, under a second; the penalty chosen on held-out pairs). ``kind="mlp"``: the
ridge map plus a residual two-layer network (``hidden=0``: the linear map alone), trained with
Adam in NumPy from the ridge solution (the residual starts at zero) on the pairs' cosine loss
and, given the new model's train queries, the corrector paper's task loss (InfoNCE over each
query's answers, its mined candidates and random records), early-stopped on dev (or held-out
pairs). ``d_old != d_new`` is allowed.

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
    X^T X); None: the best of :data:`RIDGE_GRID` on the held-out pairs. hidden: the MLP's
    hidden width (0: a linear map trained like the MLP). epochs, lr, batch: the most epochs,
    the Adam step, the pairs per minibatch (each step also takes 64 train queries when it
    learns from queries). patience: epochs without a held-out gain before it stops (early
    stopping on the pairs; on dev it checks every 2 epochs and stops after 4 checks without
    a gain); the best weights are kept. holdout: the fraction of pairs held out for the
    penalty's choice (and the pairs' early stopping). tau: the InfoNCE temperature;
    candidates: records mined per query for it. old_model / new_model: the names of the
    models it maps between (kept with it). seed: the holdout split, the MLP's init and
    minibatches.
    """

    def __init__(self, kind="ridge", *, alpha=None, hidden=1024, epochs=40, lr=1e-3, batch=128,
                 patience=10, holdout=0.1, tau=0.05, candidates=100, old_model=None,
                 new_model=None, seed=0):
        if kind not in ("ridge", "mlp"):
            raise ValueError(f"kind: must be 'ridge' or 'mlp', got {kind!r}")
        if alpha is not None and (isinstance(alpha, bool) or not (
                isinstance(alpha, (int, float)) and alpha > 0 and np.isfinite(alpha))):
            raise ValueError(f"alpha: must be a positive number or None (chosen on held-out "
                             f"pairs), got {alpha!r}")
        if not (isinstance(holdout, float) and 0 < holdout < 0.5):
            raise ValueError(f"holdout: must be a float in (0, 0.5), got {holdout!r}")
        self.kind = kind
        self.alpha = alpha
        if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 0:
            raise ValueError(f"hidden: must be an int >= 0 (0: a linear map), got {hidden!r}")
        self.hidden = int(hidden)
        self.epochs = _validate.as_size("epochs", epochs, allow_none=False)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (
                np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr: must be a positive number, got {lr!r}")
        self.lr = float(lr)
        self.batch = _validate.as_size("batch", batch, allow_none=False)
        self.patience = _validate.as_size("patience", patience, allow_none=False)
        self.holdout = holdout
        if isinstance(tau, bool) or not (isinstance(tau, (int, float)) and tau > 0):
            raise ValueError(f"tau: must be a positive number, got {tau!r}")
        self.tau = float(tau)
        self.candidates = _validate.as_size("candidates", candidates, allow_none=False)
        for name, value in (("old_model", old_model), ("new_model", new_model)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: a model name (str) or None, got {type(value).__name__}")
        self.old_model, self.new_model = old_model, new_model
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed: must be an int, got {seed!r}")
        self.seed = int(seed)
        self.W0 = self.b0 = self.W1 = self.b1 = self.W2 = None
        #: sorted corpus rows whose fresh embedding is known, and those rows (unit, float32)
        self.index = np.zeros(0, np.int64)
        self.fresh = None
        #: what the fit measured: chosen alpha, held-out cosine (ridge, final), epochs, seconds
        self.info = {}
        #: :meth:`check`'s dev scores ({"old_model": ..., "corrected": ...}) once it ran
        self.dev_scores = None
        self._token = None  # a Dask token, renewed by fit and load

    # ------------------------------------------------------------------------------------
    # fit

    @property
    def d_old(self):
        return None if self.W0 is None else self.W0.shape[0]

    @property
    def d_new(self):
        return None if self.W0 is None else self.W0.shape[1]

    def fit(self, stale, fresh, index=None, *, train=None, corpus=None, dev=None, dev_old=None
            ) -> "Corrector":
        """Fit on the pairs ``stale[i] -> fresh[i]`` ((m, d_old) and (m, d_new) arrays, the
        same records embedded by the old and the new model). ``index``: those records' rows
        in the corpus (distinct); the corrected corpus then uses their true fresh rows (kept
        as float32 unit rows, O(m d_new)).

        ``kind="mlp"`` also learns from queries when ``train`` is given (a
        :class:`~nudgefast.QuerySet` of the new model's train query embeddings, answers =
        corpus rows; needs ``corpus``, the stale corpus): the task loss of the corrector
        paper, a multi-positive InfoNCE of each query over its answers and its top
        ``candidates`` records on the ridge-corrected corpus (one search pass mines them; the
        sampled records score with their fresh rows), added to the pairs' cosine loss. It is
        early-stopped on ``dev`` (the new model's dev queries), NDCG@10 of their mined
        candidates re-ranked, when given; else on the held-out pairs.

        With ``corpus``, ``dev`` and ``dev_old`` (the dev queries embedded by the old model),
        :meth:`check` runs after fitting (recommended: it is what warns when the correction is
        worse than staying on the old model). Returns self."""
        from .queryset import QuerySet
        if train is not None and self.kind != "mlp":
            raise ValueError("train: queries are learned from by kind='mlp' only; the ridge "
                             "map is fitted on the pairs (Corrector('mlp') to use them)")
        if train is not None and corpus is None:
            raise ValueError("corpus: learning from train queries mines their candidates in "
                             "the stale corpus; pass it")
        for name, value in (("train", train), ("dev", dev)):
            if value is not None and not isinstance(value, QuerySet):
                raise TypeError(f"{name}: expected a QuerySet of the new model's query "
                                f"embeddings, got {type(value).__name__}")
        if dev_old is not None and (dev is None or corpus is None):
            raise ValueError("dev_old: the check against the old model needs corpus and dev "
                             "too")
        t0 = time.perf_counter()
        self.info = {}
        self._token = os.urandom(16).hex()
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
        hold, rest = perm[:n_hold], perm[n_hold:]
        alpha = self.alpha
        if alpha is None:
            scores = {a: _heldout_cos(_ridge(x[rest], y[rest], a), x[hold], y[hold])
                      for a in RIDGE_GRID}
            alpha = max(scores, key=lambda a: (scores[a], a))
            self.info["ridge_heldout_cos"] = {str(a): float(s) for a, s in scores.items()}
            held_out = scores[alpha]
        else:
            held_out = _heldout_cos(_ridge(x[rest], y[rest], alpha), x[hold], y[hold])
        self.info["alpha"] = float(alpha)
        W, b = _ridge(x, y, alpha)
        self.W0, self.b0 = W.astype(np.float32), b.astype(np.float32)
        self.W1 = self.b1 = self.W2 = None
        if index is not None:
            order = np.argsort(index)
            self.index = index[order].astype(np.int64)
            self.fresh = y[order].astype(np.float32)
        else:
            self.index, self.fresh = np.zeros(0, np.int64), None
        self.info["heldout_cos"] = float(held_out)  # the ridge map fitted without them
        if self.kind == "mlp":
            mined = _Mined(self, corpus, train, dev, rng) if train is not None else None
            on_pairs = mined is None or mined.dev is None
            if on_pairs:  # early-stopped on the held-out pairs: trained without them
                W, b = _ridge(x[rest], y[rest], alpha)
            _Trainer(self, x, y, W, b, hold if on_pairs else None, mined, rng).run()
            self.info["heldout_cos"] = float(_heldout_cos(self, x[hold], y[hold])) \
                if on_pairs else None  # (trained on every pair: no held-out pairs left)
        self.info["pairs"] = int(x.shape[0])
        self.info["fit_seconds"] = time.perf_counter() - t0
        log.info("Corrector(%s): %d pairs, %d -> %d dims, alpha=%.3g, held-out cosine %.4f, "
                 "%.2f s", self.kind, x.shape[0], x.shape[1], y.shape[1], alpha,
                 self.info["heldout_cos"], self.info["fit_seconds"])
        if dev_old is not None:
            self.check(corpus, dev, dev_old)
        return self

    # ------------------------------------------------------------------------------------
    # apply

    def _check_fitted(self):
        if self.W0 is None:
            raise RuntimeError("Corrector: call fit(stale, fresh, index) (or Corrector.load) "
                               "first")

    def transform(self, rows, out=None, *, backend=None, n_threads=None) -> np.ndarray:
        """The corrected rows of ``rows`` ((m, d_old) stale embeddings; float16/32/64): float32
        unit rows (m, d_new), into ``out`` when given, computed by ``backend``'s
        ``correct_rows`` (a backend module; None: the NumPy reference). A zero or NaN/inf row
        gives NaN (the passes flag it, naming the record)."""
        from ._backends import numpy_backend
        self._check_fitted()
        x = np.asarray(rows)
        if x.ndim != 2 or x.shape[1] != self.d_old:
            raise ValueError(f"rows: expected (m, {self.d_old}) stale embeddings, got shape "
                             f"{x.shape}")
        if x.dtype not in (np.float16, np.float32) or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if out is None:
            out = np.empty((x.shape[0], self.d_new), np.float32)
        (backend or numpy_backend).correct_rows(x, self.W0, self.b0, self.W1, self.b1, self.W2,
                                               out, n_threads=n_threads)
        return out

    def corrected_rows(self, stale, positions, out=None, *, backend=None, n_threads=None
                       ) -> np.ndarray:
        """The corrected rows of the stale rows ``stale`` (m, d_old), which are the corpus's
        rows ``positions`` (m,): the map's output (``backend``'s ``correct_rows``), and each
        sampled record's fresh row."""
        y = self.transform(stale, out=out, backend=backend, n_threads=n_threads)
        if self.index.size and positions.size:
            hit = np.minimum(np.searchsorted(self.index, positions), self.index.size - 1)
            known = self.index[hit] == positions
            if known.any():
                y[known] = self.fresh[hit[known]]
        return y

    def view(self, corpus, backend=None, n_threads=None) -> "CorrectedRows":
        """The corrected corpus as a read-only (N, d_new) float32 view of the stale
        ``corpus`` (host array or memmap), corrected where it is read by ``backend``'s
        ``correct_rows`` (see :class:`CorrectedRows`)."""
        self._check_fitted()
        self._check_corpus(corpus.shape)
        return CorrectedRows(corpus, self, backend=backend, n_threads=n_threads)

    def apply(self, corpus, out=None, *, chunk_rows=None, backend="auto", n_threads=None):
        """The corrected corpus (N, d_new) float32 unit rows, streamed in row chunks from the
        stale ``corpus`` (an (N, d_old) array or memmap, float16/32; each chunk corrected by
        ``backend``'s ``correct_rows``): into ``out`` (a writable float32 (N, d_new) array or
        memmap) when given, else a new array. Returns it."""
        from . import _backends
        self._check_fitted()
        impl = _backends.get(_backends.resolve(backend))
        n_threads = _validate.as_threads("n_threads", n_threads)
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
        view = CorrectedRows(corpus, self, backend=impl, n_threads=n_threads)
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
                "tau": self.tau, "candidates": self.candidates,
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
                   patience=meta["patience"], holdout=meta["holdout"], tau=meta["tau"],
                   candidates=meta["candidates"],
                   old_model=meta["old_model"], new_model=meta["new_model"], seed=meta["seed"])
        self.W0, self.b0 = data["W0"], data["b0"]
        if "W1" in data:
            self.W1, self.b1, self.W2 = data["W1"], data["b1"], data["W2"]
        self.index = data["index"]
        self.fresh = data.get("fresh")
        self.info, self.dev_scores = meta["info"], meta["dev_scores"]
        self._token = os.urandom(16).hex()
        if self.W0.shape != (meta["d_old"], meta["d_new"]):
            raise ValueError(f"{path}: its map is {self.W0.shape}, its header says "
                             f"({meta['d_old']}, {meta['d_new']}); save it again")
        return self

    def __dask_tokenize__(self):
        """A cheap token for Dask graphs (hashing the maps and the sample's fresh rows on every
        pass would cost O(m d)): a random id renewed by every fit and load."""
        return ("nudgefast.Corrector", self._token)

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
    if value.W0 is None:
        raise ValueError(f"{name}: the Corrector is not fitted; call {name}.fit(stale, fresh, "
                         f"index) (or Corrector.load(path)) first")
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

    def __init__(self, source, corrector, row_offset=0, *, backend=None, n_threads=None):
        self.source = source
        self.corrector = corrector
        self.row_offset = int(row_offset)
        self.backend, self.n_threads = backend, n_threads  # whose correct_rows (None: NumPy)
        self.shape = (source.shape[0], corrector.d_new)

    def __len__(self):
        return self.shape[0]

    def stored_row(self, row) -> np.ndarray:
        """Row ``row`` as stored (stale), for an error message."""
        return np.asarray(self.source[row])

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
        return self.corrector.corrected_rows(stale, rows + self.row_offset, backend=self.backend,
                                             n_threads=self.n_threads)

    def rows_into(self, start, stop, out) -> np.ndarray:
        """Corrected rows ``start:stop`` (into ``out`` when given)."""
        return self.corrector.corrected_rows(
            self.source[start:stop], np.arange(start, stop, dtype=np.int64) + self.row_offset,
            out=out, backend=self.backend, n_threads=self.n_threads)

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


#: Random corpus records every query is also contrasted with (and dev re-ranks against): the
#: map must not lift records outside the mined candidates (without them a map trained on a
#: different model family re-ranked its candidates well and lost the rest of the corpus).
RANDOM_POOL = 4096
#: Of the pool, the records each training step adds to every query's candidates.
RANDOM_NEGATIVES = 256


class _Mined:
    """What the query loss reads: each train query's candidates (its answers first, then its
    top ``candidates`` records on the ridge-corrected corpus, one search pass for train and
    dev queries together), the dev queries' candidates (their top records only: re-ranked to
    score an epoch), a pool of random records (:data:`RANDOM_POOL`: extra negatives for both),
    and the stale rows of every one of them (O((n_train + n_dev) K + pool) rows, whatever N),
    those of sampled records replaced by their fresh rows (constants)."""

    def __init__(self, c: Corrector, corpus, train, dev, rng=None):
        from .search import search
        from .queryset import check_answers
        k = int(c.candidates)
        for name, qs in (("train", train), ("dev", dev)):
            if qs is not None and qs.embeddings.shape[1] != c.d_new:
                raise ValueError(f"{name}: queries of d={qs.embeddings.shape[1]}, the new "
                                 f"model's embeddings have d={c.d_new}; pass the new model's "
                                 f"query embeddings")
        n = corpus.shape[0]
        n_train = len(train)
        csr = train.csr(unique=True)
        check_answers("train", csr, n)
        queries = [train.embeddings] + ([dev.embeddings] if dev is not None else [])
        q = np.ascontiguousarray(np.vstack(queries), dtype=np.float32)
        top = search(q, corpus, min(k, n), corrector=c, progress=False).indices
        width = min(k, n) + int(csr.counts.max(initial=0))
        cand = np.full((n_train, width), -1, np.int64)
        pos = np.zeros((n_train, width), bool)
        for i in range(n_train):
            ans = csr.index[csr.ptr[i]:csr.ptr[i + 1]]
            rest = top[i][(top[i] >= 0) & ~np.isin(top[i], ans)]
            cand[i, :ans.size + rest.size] = np.concatenate([ans, rest])
            pos[i, :ans.size] = True
        dev_top = top[n_train:]
        rng = np.random.default_rng(c.seed) if rng is None else rng
        pool = rng.choice(n, min(n, RANDOM_POOL), replace=False)
        rows = np.unique(np.concatenate([cand[cand >= 0], dev_top[dev_top >= 0], pool]))
        self.rows = rows
        self.pool = np.searchsorted(rows, np.sort(pool))
        self.cand = np.where(cand >= 0, np.searchsorted(rows, cand), -1)
        self.pos = pos
        self.tq = np.ascontiguousarray(train.embeddings, dtype=np.float32)
        self.has_answer = pos.any(axis=1)
        self.dev = dev
        self.dev_cand = np.where(dev_top >= 0, np.searchsorted(rows, dev_top), -1)
        self.dq = None if dev is None else np.ascontiguousarray(dev.embeddings, np.float32)
        stale = _take_stale(corpus, rows)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.x = (stale / np.linalg.norm(stale, axis=1, keepdims=True)).astype(np.float32)
        self.known = np.zeros(rows.size, bool)
        self.fixed = np.zeros((rows.size, c.d_new), np.float32)
        if c.index.size:
            hit = np.minimum(np.searchsorted(c.index, rows), c.index.size - 1)
            self.known = c.index[hit] == rows
            self.fixed[self.known] = c.fresh[hit[self.known]]
        log.info("Corrector: %d train queries, %d candidate records mined (%d with fresh rows)",
                 n_train, rows.size, int(self.known.sum()))

    def dev_ndcg(self, forward) -> float:
        """NDCG@10 of the dev queries re-ranking their mined candidates with ``forward``."""
        from .metrics import metrics
        z = self.corrected(forward)
        cand = self.with_pool(self.dev_cand, self.pool)
        idx = np.maximum(cand, 0)
        s = np.einsum("qd,qkd->qk", self.dq, z[idx])
        s[cand < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :10]
        ranked = np.take_along_axis(cand, order, axis=1)
        ranked = np.where(ranked >= 0, self.rows[np.maximum(ranked, 0)], -1)
        return metrics(ranked, self.dev, 10)["ndcg@10"]

    @staticmethod
    def with_pool(cand, extra):
        """``cand`` (n, K) local rows (-1 padding) with the ``extra`` rows appended to every
        row, those already in the row masked (-1): no record twice in a ranking."""
        more = np.broadcast_to(extra, (cand.shape[0], extra.size)).copy()
        for i in range(cand.shape[0]):
            more[i, np.isin(extra, cand[i])] = -1
        return np.concatenate([cand, more], axis=1)

    def corrected(self, forward) -> np.ndarray:
        z = np.empty_like(self.fixed)
        free = ~self.known
        if free.any():
            z[free] = forward(self.x[free])[0]
        z[self.known] = self.fixed[self.known]
        return z


def _take_stale(corpus, rows):
    """float32 stale rows ``rows`` of a host or dask corpus."""
    from . import _arrays
    if _arrays.is_dask(corpus):
        from . import _dask
        return _dask.as_corpus("corpus", corpus).take(rows).astype(np.float32)
    corpus = _validate.as_corpus("corpus", corpus)
    return np.asarray(corpus[rows], dtype=np.float32)


class _Trainer:
    """Adam on y(x) = normalize(x W0 + b0 + relu(x W1 + b1) W2) from the ridge map (W2 = 0:
    the residual network starts at zero): the pairs' mean (1 - cosine) and, with mined
    queries, their InfoNCE (weight 1); early-stopped on the dev re-ranking (every 2 epochs,
    4 checks without a gain) or the held-out pairs (``patience`` epochs); the best weights
    are kept."""

    BETA1, BETA2, EPS = 0.9, 0.999, 1e-8
    QUERY_BATCH = 64

    def __init__(self, c, x, y, W, b, hold, mined, rng):
        self.c, self.mined, self.rng = c, mined, rng
        keep = np.ones(x.shape[0], bool)
        if hold is not None:
            keep[hold] = False
            self.xh, self.yh = x[hold].astype(np.float32), y[hold].astype(np.float32)
        self.x, self.y = x[keep].astype(np.float32), y[keep].astype(np.float32)
        h = c.hidden
        d_old = x.shape[1]
        self.p = {"W0": W.astype(np.float32), "b0": b.astype(np.float32)}
        if h:
            self.p.update(W1=(rng.standard_normal((d_old, h)) * np.sqrt(2.0 / d_old)
                              ).astype(np.float32),
                          b1=np.zeros(h, np.float32), W2=np.zeros((h, W.shape[1]), np.float32))
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.t = 0

    def forward(self, x):
        z = x @ self.p["W0"] + self.p["b0"]
        pre = hid = None
        if "W1" in self.p:
            pre = x @ self.p["W1"] + self.p["b1"]
            hid = np.maximum(pre, 0)
            z += hid @ self.p["W2"]
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        u = z / norm
        return u, (x, pre, hid, norm, u)

    def backward(self, du, cache, grads, weight=1.0):
        x, pre, hid, norm, u = cache
        dz = (du - u * np.sum(u * du, axis=1, keepdims=True)) / norm * weight
        grads["W0"] += x.T @ dz
        grads["b0"] += dz.sum(axis=0)
        if pre is not None:
            grads["W2"] += hid.T @ dz
            dpre = (dz @ self.p["W2"].T) * (pre > 0)
            grads["W1"] += x.T @ dpre
            grads["b1"] += dpre.sum(axis=0)

    def step(self, grads):
        self.t += 1
        lr = self.c.lr
        for k, g in grads.items():
            self.m[k] = self.BETA1 * self.m[k] + (1 - self.BETA1) * g
            self.v[k] = self.BETA2 * self.v[k] + (1 - self.BETA2) * g * g
            mh = self.m[k] / (1 - self.BETA1 ** self.t)
            vh = self.v[k] / (1 - self.BETA2 ** self.t)
            self.p[k] -= lr * mh / (np.sqrt(vh) + self.EPS)

    def pair_grads(self, sel, grads):
        u, cache = self.forward(self.x[sel])
        self.backward(-self.y[sel] / sel.size, cache, grads)  # d mean(1 - u.y) / du

    def query_grads(self, qi, grads):
        mi = self.mined
        negatives = self.rng.choice(mi.pool, min(RANDOM_NEGATIVES, mi.pool.size),
                                    replace=False)
        cand = mi.with_pool(mi.cand[qi], negatives)
        pos = np.concatenate([mi.pos[qi], np.zeros((qi.size, negatives.size), bool)], axis=1)
        valid = cand >= 0
        uniq, inv = np.unique(cand[valid], return_inverse=True)
        z = np.empty((uniq.size, mi.fixed.shape[1]), np.float32)
        free = ~mi.known[uniq]
        cache = None
        if free.any():
            z[free], cache = self.forward(mi.x[uniq[free]])
        z[~free] = mi.fixed[uniq[~free]]
        full = np.zeros(cand.shape, np.int64)
        full[valid] = inv
        q = mi.tq[qi]
        tau = self.c.tau
        s = np.where(valid, np.einsum("qd,qkd->qk", q, z[full]) / tau, -np.inf)
        s -= s.max(axis=1, keepdims=True)
        e = np.exp(s)
        p_all = e / e.sum(axis=1, keepdims=True)
        e_pos = e * pos
        p_pos = e_pos / np.maximum(e_pos.sum(axis=1, keepdims=True), 1e-30)
        ds = (p_all - p_pos) / tau / qi.size  # d mean(-log sum_pos / sum_all) / d (q . z)
        dz = np.zeros_like(z)
        np.add.at(dz, full[valid], (ds[..., None] * q[:, None, :])[valid])
        if cache is not None:
            self.backward(dz[free], cache, grads)

    def run(self):
        c, mi, rng = self.c, self.mined, self.rng
        n_pairs = self.x.shape[0]
        pair_steps = max(1, -(-n_pairs // c.batch))
        queries = np.flatnonzero(mi.has_answer) if mi is not None else np.zeros(0, np.int64)
        query_steps = -(-queries.size // self.QUERY_BATCH)
        steps = max(pair_steps, query_steps)
        use_dev = mi is not None and mi.dev is not None
        every, patience = (2, 4) if use_dev else (1, c.patience)
        def evaluate():
            if use_dev:
                return mi.dev_ndcg(self.forward)
            return float(np.mean(np.sum(self.forward(self.xh)[0] * self.yh, axis=1)))

        # The start (the ridge map, the residual at zero) is a candidate too: training never
        # returns weights that score worse than where it began.
        best, best_score, waits, epoch = None, evaluate(), 0, -1
        best = {k: v.copy() for k, v in self.p.items()}
        c.info["best_epoch"] = 0
        if not np.isfinite(best_score):
            best_score = -np.inf
        for epoch in range(c.epochs):
            pairs = rng.permutation(n_pairs)
            qorder = rng.permutation(queries)
            for s in range(steps):
                grads = {k: np.zeros_like(v) for k, v in self.p.items()}
                sel = pairs[(s % pair_steps) * c.batch:(s % pair_steps + 1) * c.batch]
                if sel.size:
                    self.pair_grads(sel, grads)
                if query_steps:
                    qs = (s % query_steps) * self.QUERY_BATCH
                    self.query_grads(qorder[qs:qs + self.QUERY_BATCH], grads)
                self.step(grads)
            if (epoch + 1) % every and epoch + 1 < c.epochs:
                continue
            score = evaluate()
            log.debug("Corrector epoch %d: %s %.4f", epoch + 1,
                      "dev NDCG@10 (mined)" if use_dev else "held-out cosine", score)
            if score > best_score + 1e-5:
                best = {k: v.copy() for k, v in self.p.items()}
                best_score, waits = score, 0
                c.info["best_epoch"] = epoch + 1
            else:
                waits += 1
                if waits >= patience:
                    break
        c.info["epochs"] = epoch + 1
        c.info["early_stop"] = "dev NDCG@10 of mined candidates" if use_dev else \
            "held-out pairs' cosine"
        c.info["best_score"] = float(best_score)
        c.W0, c.b0 = best["W0"], best["b0"]
        if "W1" in best:
            c.W1, c.b1, c.W2 = best["W1"], best["b1"], best["W2"]
