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

    ``relevance`` (optional) gives a graded relevance per answer (finite, >= 0), same nesting
    as ``answers``; without it every answer has relevance 1.

    Immutable: the embeddings and every answer / relevance list are copied in at construction
    into read-only arrays, so editing what was passed afterwards changes nothing here (build a
    new QuerySet to change the answers). That keeps the cached CSR form always valid.
    """

    embeddings: np.ndarray
    answers: Sequence[Sequence[int]]
    relevance: Sequence[Sequence[float]] | None = None
    _csr: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        emb = _validate._host_array("QuerySet.embeddings", self.embeddings, allow_device=True)
        if emb.ndim != 2:
            raise ValueError(f"QuerySet.embeddings: expected shape (n, d), got {emb.shape}")
        emb = np.array(emb, copy=True)
        emb.flags.writeable = False
        answers = _answer_lists("QuerySet.answers", self.answers, emb.shape[0])
        relevance = None
        if self.relevance is not None:
            relevance = _grade_lists("QuerySet.relevance", self.relevance, answers)
        object.__setattr__(self, "embeddings", emb)
        object.__setattr__(self, "answers", answers)
        object.__setattr__(self, "relevance", relevance)

    def __repr__(self) -> str:
        pairs = sum(len(a) for a in self.answers)
        return (f"QuerySet({len(self)} queries, d={self.embeddings.shape[1]}, {pairs} answers"
                f"{', graded' if self.relevance is not None else ''})")

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
        answers, relevance = read_qrels(os.path.join(folder, f"qrels_{split}.jsonl"))
        return cls(np.asarray(emb, dtype=np.float32), answers, relevance)


def json_lines(path, name="qrels"):
    """(line number, object) for every non-blank line of a UTF-8 JSON-lines file; a line that
    is not a JSON object is an error naming ``name``, the file and the line."""
    with open(path, encoding="utf-8") as fh:
        no = 0
        try:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: {os.fspath(path)!r} line {no}: not valid JSON "
                                     f"({exc.msg}, column {exc.colno})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{name}: {os.fspath(path)!r} line {no}: expected a JSON "
                                     f"object, got {type(rec).__name__}")
                yield no, rec
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name}: {os.fspath(path)!r} is not UTF-8 text (byte "
                             f"{exc.start}); JSON lines are UTF-8") from None


def _short(text, width=40):
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def read_qrels(path, name="qrels"):
    """Answer and relevance lists of a shared-format qrels file (``{"answers": [...],
    "relevance": [...]}`` per line, relevance 1 when absent), checked line by line."""
    answers, relevance = [], []
    for no, rec in json_lines(path, name):
        where = f"{name}: {os.fspath(path)!r} line {no}"
        ans = rec.get("answers")
        if not isinstance(ans, list) or not all(
                isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in ans):
            got = "nothing" if "answers" not in rec else _short(json.dumps(ans))
            raise ValueError(f'{where}: "answers" must be a list of record positions (ints >= '
                             f'0), got {got}')
        rel = rec.get("relevance") or [1.0] * len(ans)
        if not (isinstance(rel, list) and len(rel) == len(ans) and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) for r in rel)):
            raise ValueError(f'{where}: "relevance" must be a list of numbers, one per answer '
                             f'({len(ans)}), got {_short(json.dumps(rel))}')
        answers.append(ans)
        relevance.append(rel)
    return answers, relevance


def _sequence(name, value, what):
    if value is None:
        raise TypeError(f"{name}: is None; give {what}")
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: a {type(value).__name__} is not {what}")
    if isinstance(value, np.ndarray):
        return list(value) if value.ndim else None
    if not hasattr(value, "__len__"):
        try:
            return list(value)  # a generator or other iterable: read it once
        except TypeError:
            return None
    return value


def _answer_lists(name, answers, n_queries):
    """One read-only int64 array per query, each entry a record row (checked for type)."""
    what = "one list of record indices per query, e.g. [[3], [5, 8]]"
    seq = _sequence(name, answers, what)
    if seq is None:
        raise TypeError(f"{name}: expected {what}, got {type(answers).__name__}")
    if len(seq) != n_queries:
        raise ValueError(f"{name}: has {len(seq)} lists for {n_queries} query embeddings; "
                         f"give one list per query")
    out = []
    for i, ans in enumerate(seq):
        if isinstance(ans, (int, np.integer)) and not isinstance(ans, bool):
            raise TypeError(f"{name}[{i}]: is the single number {ans}, not a list; give {what}")
        if isinstance(ans, (str, bytes)):
            raise TypeError(f"{name}[{i}]: is a {type(ans).__name__}, not a list of record "
                            f"indices")
        a = np.array(ans if hasattr(ans, "__len__") else list(ans))
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}]: expected a flat list of record indices, got shape "
                             f"{a.shape}")
        if a.size and a.dtype.kind not in "iu":
            if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
                pass  # whole numbers stored as floats are fine
            else:
                raise TypeError(f"{name}[{i}]: record indices must be integers, got dtype "
                                f"{a.dtype}")
        if a.size and a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
            raise ValueError(f"{name}[{i}]: record index {int(a.max())} is too large; answers "
                             f"are row indices into the corpus, 0 <= index < N")
        a = a.astype(np.int64)
        a.flags.writeable = False
        out.append(a)
    return tuple(out)


def _grade_lists(name, relevance, answers):
    seq = _sequence(name, relevance, "one list of grades per query")
    if seq is None or len(seq) != len(answers):
        got = "not a list" if seq is None else f"{len(seq)} lists"
        raise ValueError(f"{name}: has {got} for {len(answers)} queries; give one list of "
                         f"grades per query, or None")
    out = []
    for i, (r, a) in enumerate(zip(seq, answers)):
        try:
            g = np.array(r, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name}[{i}]: grades must be numbers, got {r!r}") from exc
        if g.size != a.size:
            raise ValueError(f"{name}[{i}]: has {g.size} grades for {a.size} answers; give one "
                             f"grade per answer")
        if not np.isfinite(g).all() or (g < 0).any():
            raise ValueError(f"{name}[{i}]: grades must be finite and >= 0, got {g.tolist()}")
        g.flags.writeable = False
        out.append(g)
    return tuple(out)


def _build_csr(answers, relevance, unique: bool) -> AnswerCSR:
    n = len(answers)
    ptr = np.zeros(n + 1, dtype=np.int64)
    idx_parts, rel_parts = [], []
    for i, ans in enumerate(answers):
        a = np.asarray(ans, dtype=np.int64)
        r = np.ones(a.size) if relevance is None else np.asarray(relevance[i], dtype=np.float64)
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
