"""Drop-in replacements for ``nudge-ft`` 0.1.2: ``from nudgefast.compat import NUDGEM, NUDGEN``.

Same signature, same gamma, same tuned embeddings (to float32 rounding), computed by the
streaming kernels. Where the reference is wrong this module keeps its behaviour, so results
match; the native :class:`nudgefast.NudgeM` / :class:`nudgefast.NudgeN` do better:

- NUDGE-M returns the *left end* of the best segment (an answer there only ties its
  competitor) and divides by ``g + 1e-8``; native: the midpoint, exact bounds.
- Duplicate answers in a train list count once per occurrence in the query gradient, and
  twice as validation pairs in NUDGE-M; native: once.
- NUDGE-N with any validation query without answers gets a NaN accuracy for every gamma and so
  returns gamma = 0; native: such queries are skipped with a warning.

One defect of the reference is *not* kept: in NUDGE-N, a touched record whose query gradient
``c`` is parallel to its embedding ``e`` up to rounding (a train query equal to the record, as
recurring queries on real data produce) gets ``c.c - (e.c)^2`` slightly below 0 in float32; the
reference takes its ``sqrt`` (NaN), the NaN row is ranked first by ``torch.topk`` for every
validation query, every gamma > 0 then scores near 0 and it silently returns gamma = 0. Here that
quantity is computed in float64 and a record with ``c.c - (e.c)^2 <= 0`` gets no sphere step
(the reference's own rule for exactly 0); for gamma > 0 the snap rule then sends it to ``c/|c|``,
its own direction, so it stays put, no row is ever NaN and gamma is chosen as if the record
were well-behaved. NUDGE-M has no square root there and is unaffected.

Unlike the reference nothing is printed; progress goes through ``logging``.

``embeddings`` / ``nontrain_embeddings`` may be device arrays (CuPy, torch CUDA tensors,
``__cuda_array_interface__`` / DLPack), read in place by the GPU backend; the tuned embeddings
then come back on the device, in the library of ``embeddings`` (as the reference returns a
tensor on its ``device``).
"""
from __future__ import annotations

import warnings
from typing import List, TypedDict

import numpy as np

from ._defaults import NUDGE_N_GAMMAS, REFERENCE_EPS, VAL_BLOCK
from . import _arrays, _backends, _validate
from .nudge import NudgeResult, _fit_m, _fit_n, _prepare, _result


class QueriesAnswersDict(TypedDict):
    q_embs: np.ndarray
    q_ans_indx: List[List[int]]


def _nontrain_array(nontrain_embeddings):
    """The array of ``nontrain_embeddings``: the reference README passes (array, None)."""
    if isinstance(nontrain_embeddings, tuple):
        return nontrain_embeddings[0]
    return nontrain_embeddings


def _nontrain(nontrain_embeddings, d, backend):
    nontrain_embeddings = _nontrain_array(nontrain_embeddings)
    if nontrain_embeddings is None:
        return None
    arr = _validate.as_corpus("nontrain_embeddings", nontrain_embeddings, backend=backend)
    if arr.shape[1] != d:
        raise ValueError(f"nontrain_embeddings: has d={arr.shape[1]} but embeddings has d={d}")
    return arr


def queries_answers_dict(qs) -> QueriesAnswersDict:
    """A :class:`~nudgefast.QuerySet` in nudge-ft's form: float32 embeddings (a writable copy,
    as torch wants) and answer lists of Python ints."""
    return {"q_embs": np.array(qs.embeddings, dtype=np.float32),
            "q_ans_indx": [list(map(int, a)) for a in qs.answers]}


class _Compat:
    def __init__(self, device=None, *, backend="auto", n_threads=None, progress=False):
        # ``device`` is accepted for signature compatibility; the backend picks the hardware.
        self.device = device
        self.backend = backend
        self.n_threads = _validate.as_threads("n_threads", n_threads)
        self.progress = progress
        #: The :class:`NudgeResult` of the last call (gamma, touched records, accuracy).
        self.result_: NudgeResult | None = None

    def _prep(self, embeddings, train_set, val_set, nontrain_embeddings, *, unique_val):
        backend = self.backend
        extra = _nontrain_array(nontrain_embeddings)
        if backend == "auto" and _arrays.is_device(extra) and not _arrays.is_device(embeddings):
            # 'auto' follows a device array wherever it is: here the non-train rows.
            backend = _backends.resolve("auto", device_input="nontrain_embeddings")
        return _prepare(embeddings, train_set, val_set, backend, np.float32,
                        unique_train=False, unique_val=unique_val, skip_empty_val=False,
                        n_threads=self.n_threads, device_ok=True)

    def _apply(self, res, prep, embeddings):
        """The tuned embeddings, in the array library of the caller's ``embeddings``."""
        tuned = res.apply(prep.corpus, backend=prep.backend_name, n_threads=self.n_threads)
        return _arrays.like(tuned, embeddings)


class NUDGEM(_Compat):
    """nudge-ft's ``NUDGEM``: fine-tune embeddings within a ball (see the module notes)."""

    def finetune_embeddings(self, embeddings: np.ndarray, train_set: QueriesAnswersDict,
                            val_set: QueriesAnswersDict, nontrain_embeddings: np.ndarray = None,
                            val_batch_size: int = VAL_BLOCK, gamma: float = None) -> np.ndarray:
        """Returns the tuned embeddings (N, d) float32 (on the device for device
        ``embeddings``); score them by dot product."""
        val_batch_size = _validate.as_size("val_batch_size", val_batch_size, allow_none=False)
        prep = self._prep(embeddings, train_set, val_set, nontrain_embeddings, unique_val=False)
        extra = _nontrain(nontrain_embeddings, prep.corpus.shape[1], prep.backend_name)
        if gamma is None:
            res = _fit_m(prep, "left", REFERENCE_EPS, extra_corpus=extra, chunk_rows=None,
                         n_threads=self.n_threads, progress=self.progress,
                         val_block=val_batch_size)
        else:
            gamma = _validate.as_step("gamma", gamma)
            cnorm = np.linalg.norm(prep.grad, axis=1)
            beta = np.where(cnorm > 0, float(gamma) / np.where(cnorm > 0, cnorm, 1.0), 0.0)
            res = _result("nudge-m", prep, float(gamma), np.ones(cnorm.size), beta,
                          np.zeros(0), np.zeros(0), self.n_threads)
        self.result_ = res
        return self._apply(res, prep, embeddings)


class NUDGEN(_Compat):
    """nudge-ft's ``NUDGEN``: fine-tune embeddings on the unit sphere (see the module notes)."""

    def finetune_embeddings(self, embeddings: np.ndarray, train_set: QueriesAnswersDict,
                            val_set: QueriesAnswersDict, nontrain_embeddings: np.ndarray = None,
                            val_batch_size: int = VAL_BLOCK, val_k: int = 1,
                            gamma: float = None) -> np.ndarray:
        """Returns the tuned embeddings (N, d) float32, unit length (on the device for device
        ``embeddings``)."""
        val_batch_size = _validate.as_size("val_batch_size", val_batch_size, allow_none=False)
        val_k = _validate.as_size("val_k", val_k, allow_none=False)
        prep = self._prep(embeddings, train_set, val_set, nontrain_embeddings, unique_val=True)
        _validate.as_k("val_k", val_k, prep.corpus.shape[0])
        if (prep.val_csr.counts == 0).any():
            warnings.warn("val_set: a validation query has no answers; like nudge-ft every "
                          "gamma then scores NaN and gamma = 0 is returned (the native "
                          "nudgefast.NudgeN skips such queries)", stacklevel=2)
        extra = _nontrain(nontrain_embeddings, prep.corpus.shape[1], prep.backend_name)
        gammas = NUDGE_N_GAMMAS if gamma is None else _validate.as_gammas("gamma", [gamma])
        res = _fit_n(prep, int(val_k), gammas, extra_corpus=extra, chunk_rows=None,
                     n_threads=self.n_threads, progress=self.progress, val_block=val_batch_size)
        self.result_ = res
        return self._apply(res, prep, embeddings)


__all__ = ["NUDGEM", "NUDGEN", "QueriesAnswersDict", "queries_answers_dict"]
