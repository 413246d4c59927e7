"""QuerySet: query embeddings with their answer lists and optional graded relevance."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import _validate


@dataclass(frozen=True)
class AnswerCSR:
    """Answer lists in compressed rows: query ``i`` answers ``index[ptr[i]:ptr[i+1]]``."""

    ptr: np.ndarray  # (n + 1,) int64
    index: np.ndarray  # (nnz,) int64
    relevance: np.ndarray  # (nnz,) float64

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)

    def rows(self, start: int, stop: int) -> "AnswerCSR":
        lo, hi = self.ptr[start], self.ptr[stop]
        return AnswerCSR(self.ptr[start:stop + 1] - lo, self.index[lo:hi], self.relevance[lo:hi])


@dataclass(frozen=True)
class QuerySet:
    """Query embeddings ``(n, d)`` with one answer list each (record row indices).

    ``relevance`` (optional) gives a graded relevance per answer, same nesting as ``answers``;
    without it every answer has relevance 1. The arrays the caller passes are copied, never
    modified.
    """

    embeddings: np.ndarray
    answers: Sequence[Sequence[int]]
    relevance: Sequence[Sequence[float]] | None = None
    _csr: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        emb = np.asarray(self.embeddings)
        if emb.ndim != 2:
            raise ValueError(f"QuerySet.embeddings: expected shape (n, d), got {emb.shape}")
        if len(self.answers) != emb.shape[0]:
            raise ValueError(f"QuerySet.answers: has {len(self.answers)} lists for "
                             f"{emb.shape[0]} query embeddings; give one list per query")
        if self.relevance is not None and len(self.relevance) != len(self.answers):
            raise ValueError(f"QuerySet.relevance: has {len(self.relevance)} lists for "
                             f"{len(self.answers)} queries; give one per query or None")

    def __len__(self) -> int:
        return len(self.answers)

    def csr(self, *, unique: bool = True) -> AnswerCSR:
        """Answer lists as CSR. ``unique``: each record once per query (sorted, highest
        relevance kept); otherwise the lists as given (the reference counts duplicates)."""
        if unique not in self._csr:
            self._csr[unique] = _build_csr(self.answers, self.relevance, unique)
        return self._csr[unique]

    @classmethod
    def load(cls, folder: str | os.PathLike, split: str) -> "QuerySet":
        """Read ``queries_<split>.npy`` and ``qrels_<split>.jsonl`` from a dataset folder."""
        emb = np.load(os.path.join(folder, f"queries_{split}.npy"), mmap_mode="r")
        answers, relevance = [], []
        with open(os.path.join(folder, f"qrels_{split}.jsonl")) as fh:
            for line in fh:
                if line.strip():
                    rec = json.loads(line)
                    answers.append(rec["answers"])
                    relevance.append(rec.get("relevance") or [1.0] * len(rec["answers"]))
        return cls(np.asarray(emb, dtype=np.float32), answers, relevance)


def _build_csr(answers, relevance, unique: bool) -> AnswerCSR:
    n = len(answers)
    ptr = np.zeros(n + 1, dtype=np.int64)
    idx_parts, rel_parts = [], []
    for i, ans in enumerate(answers):
        a = np.asarray(ans)
        if a.ndim != 1:
            raise ValueError(f"answers[{i}]: expected a flat list of record indices, got shape "
                             f"{a.shape}")
        if a.size and a.dtype.kind not in "iu":
            if a.dtype.kind == "f" and np.all(a == np.round(a)):
                a = a.astype(np.int64)
            else:
                raise TypeError(f"answers[{i}]: record indices must be integers, got dtype "
                                f"{a.dtype}")
        a = a.astype(np.int64, copy=False)
        r = (np.ones(a.size) if relevance is None
             else np.asarray(relevance[i], dtype=np.float64).reshape(-1))
        if r.size != a.size:
            raise ValueError(f"relevance[{i}]: has {r.size} grades for {a.size} answers; give one "
                             f"grade per answer")
        if unique and a.size:
            order = np.lexsort((-r, a))  # by record, highest relevance first
            a, r = a[order], r[order]
            first = np.r_[True, a[1:] != a[:-1]]
            a, r = a[first], r[first]
        idx_parts.append(a)
        rel_parts.append(r)
        ptr[i + 1] = ptr[i] + a.size
    index = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int64)
    rel = np.concatenate(rel_parts) if rel_parts else np.zeros(0)
    return AnswerCSR(ptr, index.astype(np.int64), rel.astype(np.float64))


def check_answers(name: str, csr: AnswerCSR, n_records: int) -> None:
    """Answer indices must lie in [0, n_records)."""
    if csr.index.size == 0:
        return
    bad = (csr.index < 0) | (csr.index >= n_records)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        query = int(np.searchsorted(csr.ptr, pos, side="right") - 1)
        value = int(csr.index[pos])
        why = "is negative" if value < 0 else f"is >= N={n_records}"
        raise ValueError(f"{name}: answers[{query}] contains record {value}, which {why}; "
                         f"answers are row indices into the corpus, 0 <= index < N")


def as_queryset(name: str, value, d: int, dtype=np.float32) -> tuple[QuerySet, np.ndarray]:
    """Accept a QuerySet, a ``(embeddings, answers)`` tuple or a nudge-ft style dict."""
    if isinstance(value, dict) and "q_embs" in value:
        value = QuerySet(value["q_embs"], value["q_ans_indx"], value.get("q_ans_indx_rel"))
    elif isinstance(value, tuple) and len(value) in (2, 3):
        value = QuerySet(*value)
    if not isinstance(value, QuerySet):
        raise TypeError(f"{name}: expected a QuerySet(embeddings, answers[, relevance]), got "
                        f"{type(value).__name__}")
    emb = _validate.as_queries(f"{name}.embeddings", value.embeddings, d, dtype)
    return value, emb
