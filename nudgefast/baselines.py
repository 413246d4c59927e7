"""The parametric baseline of the NUDGE paper: a linear adapter, on the queries or the records.

"Adapter" (arXiv 2409.02343) learns a d x d matrix ``W`` applied to query embeddings,
trained with a contrastive loss on the train (query, answer) pairs and early-stopped on the
dev queries. :class:`LinearAdapter` implements it (``side="query"``) and the same map applied
to every record instead (``side="records"``). NumPy only.

Model. Scores are cosines between an adapted and a plain side:

- ``side="query"``: ``score(q, x) = <normalize(W q), normalize(x)>``;
- ``side="records"``: ``score(q, x) = <normalize(q), normalize(W normalize(x))>``.

Loss. Multiple-negatives ranking (InfoNCE with in-batch negatives), as Sentence-Transformers'
``MultipleNegativesRankingLoss`` and LlamaIndex's linear adapter: for a batch of B train
pairs (q_i, p_i), ``logits_ij = scale * score(q_i, p_j)`` and the loss is the mean
cross-entropy with target ``i``. Column ``j != i`` is masked out when ``p_j`` is itself an
answer of ``q_i`` (a false negative; this includes the same record drawn twice in a batch).
The gradient is derived by hand (see :func:`adapter_loss_and_grad`); Adam updates ``W``.

Early stopping. ``W`` starts at the identity, which is "epoch 0": its dev NDCG@k is measured
before any update, and the best ``W`` over epochs is kept, so on dev the adapter is never
worse than no fine-tuning. Training stops after ``patience`` epochs without improvement.
"""
from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from . import _backends, _validate
from ._defaults import chunk_rows_for
from .metrics import metrics
from .queryset import QuerySet, as_queryset, check_answers
from .search import SearchResult, _progress_bar, normalize_pass, search

log = logging.getLogger("nudgefast")

SIDES = ("query", "records")
#: Adam's moment decays and epsilon (Kingma & Ba defaults, as torch.optim.Adam).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def _unit_rows(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows of ``x`` scaled to unit length, norms taken in float64. Trusts rows to be non-zero."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return (x / norms[:, None]).astype(dtype, copy=False)


def adapter_loss_and_grad(W, queries, records, side, scale, mask=None):
    """Multiple-negatives ranking loss of one batch and its gradient with respect to ``W``.

    W: (d, d) float. queries: (B, d) unit rows q_i. records: (B, d) unit rows p_i, the
    positive of query i (the in-batch negatives of query i are the other rows). side:
    ``"query"`` (W adapts the queries) or ``"records"`` (W adapts the records). scale: the
    logit scale (inverse temperature). mask: optional (B, B) bool, True where column j is no
    negative for query i (a false negative); the diagonal is ignored (the target always counts).

    The matrix products run in the inputs' dtype (float32 in training, float64 for gradient
    checks); the softmax and the loss in float64. The gradient goes through the L2
    normalisation: for ``z = u / |u|``, ``dz/du = (I - z z^T) / |u|``.

    Returns ``(loss, grad)``: a float and a (d, d) float64 array.
    """
    dtype = np.result_type(W, queries, records)
    W = np.asarray(W, dtype=dtype)
    Q = np.asarray(queries, dtype=dtype)
    R = np.asarray(records, dtype=dtype)
    B = Q.shape[0]
    if side == "query":
        U = Q @ W.T
        norms = np.sqrt(np.einsum("ij,ij->i", U, U, dtype=np.float64))
        A = (U / norms[:, None]).astype(dtype, copy=False)  # adapted queries
        logits = scale * (A @ R.T).astype(np.float64)
    else:
        V = R @ W.T
        norms = np.sqrt(np.einsum("ij,ij->i", V, V, dtype=np.float64))
        A = (V / norms[:, None]).astype(dtype, copy=False)  # adapted records
        logits = scale * (Q @ A.T).astype(np.float64)
    diag = np.arange(B)
    target = logits[diag, diag].copy()
    if mask is not None:
        mask = np.array(mask, dtype=bool)
        mask[diag, diag] = False
        logits[mask] = -np.inf
    top = logits.max(axis=1, keepdims=True)
    expd = np.exp(logits - top)
    total = expd.sum(axis=1, keepdims=True)
    loss = float(np.mean(np.log(total[:, 0]) + top[:, 0] - target))
    # dloss/dlogits = (softmax - onehot) / B; masked columns have softmax 0.
    G = expd / total
    G[diag, diag] -= 1.0
    G *= scale / B
    G = G.astype(dtype, copy=False)
    if side == "query":
        dA = G @ R  # (B, d): dloss/d(adapted query i)
        inputs = Q
    else:
        dA = G.T @ Q  # (B, d): dloss/d(adapted record j)
        inputs = R
    radial = np.einsum("ij,ij->i", A, dA, dtype=np.float64)
    dU = (dA - A * radial[:, None].astype(dtype)) / norms[:, None].astype(dtype)
    grad = (dU.T @ inputs).astype(np.float64)
    return loss, grad


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}: must be an int >= {low}, got {value!r}")
    return int(value)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
    return float(value)


class LinearAdapter:
    """A d x d linear map on the query (or record) embeddings, trained contrastively.

    side: ``"query"`` (the paper's "Adapter": only queries are transformed, the corpus stays
    as it is) or ``"records"`` (the same map on every record; queries stay as they are).
    epochs: at most this many passes over the train pairs. batch_size: pairs per step (the
    in-batch negatives of each pair are the other B - 1 positives). lr: Adam step size (3e-3:
    the best mean dev NDCG@10 over {1e-4, 3e-4, 1e-3, 3e-3} on the pkg-search datasets, both
    sides, 3 seeds; 1e-3 is a close second; 1e-2 loses the gain on pkg-search-20k-e5).
    scale: logit scale of the loss (20, as Sentence-Transformers). patience: stop after this
    many epochs without a dev improvement. seed: seeds the shuffling (identical seeds give
    identical ``W_`` on the same machine and BLAS). eval_k: the k of the dev NDCG@k that
    early-stops training. backend: the nudgefast backend of the dev searches and metrics.
    progress: show a tqdm bar over epochs (None: only when stderr is a terminal).

    After :meth:`fit`: ``W_`` (d, d) float32; ``best_epoch_`` (0 = the identity was best);
    ``history_`` a list of ``{"epoch", "train_loss", "dev_ndcg"}`` (epoch 0: the loss of the
    identity over the train batches in order, no update); ``fit_seconds_``.
    """

    def __init__(self, side="query", *, epochs=30, batch_size=256, lr=3e-3, scale=20.0,
                 patience=3, seed=0, eval_k=10, backend="auto", progress=None):
        if side not in SIDES:
            raise ValueError(f"side: must be 'query' or 'records', got {side!r}")
        self.side = side
        self.epochs = _check_int("epochs", epochs, 0)
        self.batch_size = _check_int("batch_size", batch_size, 2)
        self.lr = _check_positive("lr", lr)
        self.scale = _check_positive("scale", scale)
        self.patience = _check_int("patience", patience, 1)
        self.seed = seed
        self.eval_k = _check_int("eval_k", eval_k, 1)
        self.backend = backend
        self.progress = progress

    # ------------------------------------------------------------------------------------
    # Fitting

    def fit(self, corpus, train, dev) -> "LinearAdapter":
        """Train ``W`` on the train pairs, early-stopped on dev NDCG@``eval_k``.

        corpus: (N, d) float16/float32 array or ``np.memmap`` (read, never modified; the
        ``side="records"`` dev evaluation materialises one (N, d) float32 adapted copy).
        train, dev: :class:`QuerySet` (or what ``QuerySet`` accepts) with answers into the
        corpus. Each train query with an answer gives one pair: its highest-relevance answer
        (ties: the lowest record row). Returns ``self``.
        """
        t_start = time.perf_counter()
        _backends.get(self.backend)  # an unknown or missing backend fails before any work
        corpus = _validate.as_corpus("corpus", corpus)
        n, d = corpus.shape
        train, train_q = as_queryset("train", train, d)
        dev, dev_q = as_queryset("dev", dev, d)
        train_csr = train.csr(unique=True)
        check_answers("train", train_csr, n)
        check_answers("dev", dev.csr(unique=True), n)
        if train_csr.index.size == 0:
            raise ValueError("train: has no (query, answer) pairs; the adapter needs at least "
                             "one train query with an answer")
        if self.eval_k > n:
            raise ValueError(f"eval_k={self.eval_k} exceeds the number of records N={n}; "
                             f"use eval_k <= N")
        dev, dev_q = self._dev_with_answers(dev, dev_q)

        query_of, positive = self._pairs(train_csr)
        pairs_q = _unit_rows(train_q[query_of])
        pairs_r = np.asarray(corpus[positive], dtype=np.float32)  # a gather: copies the rows
        norms = np.linalg.norm(pairs_r.astype(np.float64), axis=1)
        bad = ~np.isfinite(norms) | (norms == 0)
        if bad.any():
            raise _validate.corpus_row_error("corpus", corpus, int(positive[np.argmax(bad)]),
                                             True)
        pairs_r = (pairs_r / norms[:, None]).astype(np.float32)
        # Every train (query, answer) as one sortable key, for the false-negative mask.
        answer_keys = np.repeat(np.arange(len(train), dtype=np.int64), train_csr.counts) * n \
            + train_csr.index
        answer_keys.sort()
        n_pairs = query_of.size
        log.info("LinearAdapter(side=%s): N=%d d=%d, %d train pairs, %d dev queries, "
                 "batch %d, lr %g", self.side, n, d, n_pairs, dev_q.shape[0],
                 min(self.batch_size, n_pairs), self.lr)

        scratch = np.empty((n, d), np.float32) if self.side == "records" else None
        dev_unit = _unit_rows(dev_q)

        def batches(order):
            for s in range(0, n_pairs, self.batch_size):
                b = order[s:s + self.batch_size]
                if b.size < 2:  # a single pair has no in-batch negative: nothing to learn
                    continue
                keys = query_of[b][:, None] * n + positive[b][None, :]
                pos = np.minimum(np.searchsorted(answer_keys, keys), answer_keys.size - 1)
                yield b, answer_keys[pos] == keys

        def evaluate(W32):
            if self.side == "query":
                found = search(self._adapt(dev_q, W32), corpus, self.eval_k,
                               backend=self.backend, progress=False)
            else:
                # The same arithmetic as search(): unit queries over the adapted records.
                adapted = self._adapt_corpus(corpus, W32, scratch, None)
                found = search(dev_unit, adapted, self.eval_k, backend=self.backend,
                               progress=False)
            return metrics(found.indices, dev, self.eval_k,
                           backend=self.backend)[f"ndcg@{self.eval_k}"]

        W = np.eye(d, dtype=np.float64)  # the master copy; steps are float32 products
        first_moment = np.zeros_like(W)
        second_moment = np.zeros_like(W)
        beta1, beta2 = ADAM_BETAS
        step = 0
        rng = np.random.default_rng(self.seed)

        W32 = W.astype(np.float32)
        losses = [adapter_loss_and_grad(W32, pairs_q[b], pairs_r[b], self.side, self.scale,
                                        mask)[0] for b, mask in batches(np.arange(n_pairs))]
        best_ndcg = evaluate(W32)
        best_W, best_epoch, since_best = W32, 0, 0
        history = [{"epoch": 0, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                    "dev_ndcg": best_ndcg}]
        log.info("LinearAdapter epoch 0 (identity): train loss %.4f, dev ndcg@%d %.4f",
                 history[0]["train_loss"], self.eval_k, best_ndcg)
        bar = _progress_bar(self.progress, self.epochs, f"adapter ({self.side})", unit="epoch")
        try:
            for epoch in range(1, self.epochs + 1):
                losses = []
                for b, mask in batches(rng.permutation(n_pairs)):
                    loss, grad = adapter_loss_and_grad(W32, pairs_q[b], pairs_r[b], self.side,
                                                       self.scale, mask)
                    losses.append(loss)
                    step += 1
                    first_moment = beta1 * first_moment + (1 - beta1) * grad
                    second_moment = beta2 * second_moment + (1 - beta2) * grad * grad
                    m_hat = first_moment / (1 - beta1 ** step)
                    v_hat = second_moment / (1 - beta2 ** step)
                    W -= self.lr * m_hat / (np.sqrt(v_hat) + ADAM_EPS)
                    W32 = W.astype(np.float32)
                ndcg = evaluate(W32)
                history.append({"epoch": epoch,
                                "train_loss": float(np.mean(losses)) if losses else float("nan"),
                                "dev_ndcg": ndcg})
                log.info("LinearAdapter epoch %d: train loss %.4f, dev ndcg@%d %.4f", epoch,
                         history[-1]["train_loss"], self.eval_k, ndcg)
                if ndcg > best_ndcg:
                    best_ndcg, best_W, best_epoch, since_best = ndcg, W32, epoch, 0
                else:
                    since_best += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(dev_ndcg=f"{ndcg:.4f}", best=f"{best_ndcg:.4f}")
                if since_best >= self.patience:
                    log.info("LinearAdapter: no dev improvement for %d epochs, stopping",
                             since_best)
                    break
        finally:
            if bar is not None:
                bar.close()
        self.W_ = best_W.copy()
        self.best_epoch_ = best_epoch
        self.history_ = history
        self.fit_seconds_ = time.perf_counter() - t_start
        log.info("LinearAdapter(side=%s): best epoch %d, dev ndcg@%d %.4f (identity %.4f), "
                 "%.2f s", self.side, best_epoch, self.eval_k, best_ndcg,
                 history[0]["dev_ndcg"], self.fit_seconds_)
        return self

    @staticmethod
    def _pairs(csr):
        """(query row, positive record) per train query with an answer: its highest-relevance
        answer, the first in CSR order (lowest record row) on ties."""
        n_q = csr.ptr.size - 1
        query_of_entry = np.repeat(np.arange(n_q, dtype=np.int64), csr.counts)
        order = np.lexsort((np.arange(csr.index.size), -csr.relevance, query_of_entry))
        has = csr.counts > 0
        first = order[csr.ptr[:-1][has]]  # groups keep their CSR start after the stable sort
        return query_of_entry[first], csr.index[first]

    @staticmethod
    def _dev_with_answers(dev, dev_q):
        counts = dev.csr(unique=True).counts
        if len(dev) == 0 or not counts.any():
            raise ValueError("dev: no dev query has an answer; training is early-stopped on "
                             "dev NDCG, pass dev queries with answers")
        if counts.all():
            return dev, dev_q
        keep = np.flatnonzero(counts)
        warnings.warn(f"dev: {len(dev) - keep.size} dev queries have no answers and are "
                      f"skipped", stacklevel=3)
        rel = dev.relevance
        sub = QuerySet(dev_q[keep], [dev.answers[i] for i in keep],
                       None if rel is None else [rel[i] for i in keep])
        return sub, dev_q[keep]

    # ------------------------------------------------------------------------------------
    # Applying

    def _fitted(self):
        if not hasattr(self, "W_"):
            raise RuntimeError("LinearAdapter: not fitted yet; call fit(corpus, train, dev) "
                               "first")
        return self.W_

    @staticmethod
    def _adapt(q, W):
        return _unit_rows(q @ W.T)

    def _adapt_corpus(self, corpus, W, out, chunk_rows):
        """Unit rows into ``out`` (the streaming normalisation every backend has), then, with
        ``W``, each block of them mapped and normalised again in place."""
        normalize_pass(_backends.get(self.backend), corpus, out, chunk_rows=chunk_rows)
        if W is not None:
            n, d = corpus.shape
            step = chunk_rows or chunk_rows_for(1, d, 8)  # float64 norm temporaries too
            for start in range(0, n, step):
                out[start:start + step] = _unit_rows(out[start:start + step] @ W.T)
        return out

    def transform_queries(self, q) -> np.ndarray:
        """Queries (n, d) float -> (n, d) float32 unit rows as the adapter scores them.

        ``side="query"``: ``normalize(q @ W_.T)``; ``side="records"``: ``normalize(q)``.
        """
        W = self._fitted()
        q = _validate.as_queries("queries", q, W.shape[0])
        return self._adapt(q, W) if self.side == "query" else _unit_rows(q)

    def transform_corpus(self, corpus, out=None, chunk_rows=None) -> np.ndarray:
        """Records (N, d) float16/float32 (array or memmap) -> (N, d) float32 unit rows.

        ``side="records"``: ``normalize(normalize(x) @ W_.T)``; ``side="query"``:
        ``normalize(x)``. Streams ``corpus`` in chunks of ``chunk_rows`` rows into ``out``
        (a float32 (N, d) array or memmap; allocated when None) and returns it.
        """
        W = self._fitted()
        corpus = _validate.as_corpus("corpus", corpus)
        n, d = corpus.shape
        if d != W.shape[0]:
            raise ValueError(f"corpus: has d={d} but the adapter was fitted with d={W.shape[0]}; "
                             f"use embeddings from the same model")
        if chunk_rows is not None:
            chunk_rows = _check_int("chunk_rows", chunk_rows, 1)
        if out is None:
            out = np.empty((n, d), dtype=np.float32)
        elif not isinstance(out, np.ndarray) or out.shape != (n, d) or out.dtype != np.float32:
            raise ValueError(f"out: expected a float32 array of shape {(n, d)}, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} "
                             f"{getattr(out, 'shape', '')}; allocate np.empty({(n, d)}, "
                             f"np.float32) or pass None")
        return self._adapt_corpus(corpus, W if self.side == "records" else None, out,
                                  chunk_rows)

    def search(self, queries, corpus, k) -> SearchResult:
        """Top-``k`` records per query under the adapter (cosine).

        queries: (n, d) float. corpus: (N, d) float16/float32 array or memmap.
        ``side="query"``: :func:`nudgefast.search` of the adapted queries over ``corpus`` as it
        is (streamed). ``side="records"``: the adapted corpus is materialised once per call,
        an (N, d) float32 copy (fine at the sizes of the paper's datasets; for repeated
        searches call :meth:`transform_corpus` once and search that). Returns a
        :class:`SearchResult`.
        """
        W = self._fitted()
        corpus = _validate.as_corpus("corpus", corpus)
        if corpus.shape[1] != W.shape[0]:
            raise ValueError(f"corpus: has d={corpus.shape[1]} but the adapter was fitted with "
                             f"d={W.shape[0]}; use embeddings from the same model")
        q = self.transform_queries(queries)
        if self.side == "records":
            corpus = self.transform_corpus(corpus)
        return search(q, corpus, k, backend=self.backend, progress=self.progress)
