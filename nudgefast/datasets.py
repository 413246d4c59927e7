"""Datasets: the shared on-disk format, discovery, and a seeded synthetic generator.

On-disk format (one folder per dataset): ``corpus.npy`` float32 (N, d), ``corpus_ids.txt``,
``queries_{train,dev,test}.npy`` float32 and ``qrels_{split}.jsonl`` lines
``{"qid", "answers": [rows], "relevance": [grades]}`` in row order. See ``shared/data/README``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .queryset import QuerySet

SPLITS = ("train", "dev", "test")


@dataclass
class Dataset:
    """A corpus with train / dev (validation) / test query sets."""

    name: str
    corpus: np.ndarray
    train: QuerySet
    dev: QuerySet
    test: QuerySet
    synthetic: bool = False


def load(folder: str | os.PathLike, mmap: bool = True) -> Dataset:
    """Load a dataset folder; the corpus is memory-mapped (read-only) unless ``mmap=False``."""
    folder = Path(folder)
    corpus = np.load(folder / "corpus.npy", mmap_mode="r" if mmap else None)
    sets = {split: QuerySet.load(folder, split) for split in SPLITS}
    return Dataset(folder.name, corpus, sets["train"], sets["dev"], sets["test"])


def is_dataset(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "corpus.npy").is_file() and all(
        (folder / f"queries_{s}.npy").is_file() and (folder / f"qrels_{s}.jsonl").is_file()
        for s in SPLITS)


def find(root: str | os.PathLike | None = None) -> list[Path]:
    """Every dataset folder under ``root`` (default: ``$NUDGEFAST_DATA``, else the ``data``
    folder of a ``shared`` checkout next to the repository)."""
    if root is None:
        root = os.environ.get("NUDGEFAST_DATA")
    if root is None:
        here = Path(__file__).resolve().parents[1]
        candidates = [here.parent / "shared" / "data", here / "shared" / "data"]
        root = next((c for c in candidates if c.is_dir()), None)
        if root is None:
            return []
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_dataset(p))


def synthetic(n_records: int = 20_000, d: int = 64, n_train: int = 2_000, n_dev: int = 400,
              n_test: int = 400, *, n_clusters: int = 200, drift: float = 0.6,
              query_noise: float = 0.5, seed: int = 0, dtype=np.float32) -> Dataset:
    """A seeded synthetic retrieval task on which NUDGE has something to learn.

    Records are clustered unit vectors. Each record has a hidden "query-side" direction (its
    embedding plus a drift ``drift``, the embedding model's mismatch); queries lie near the
    query-side direction of their answers, so base cosine retrieval is imperfect and train
    queries show where a record should move. Popular records answer many queries (Zipf), some
    queries have 2-3 answers in one cluster, relevance is graded 1-2.
    """
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((n_clusters, d)))
    cluster = rng.integers(0, n_clusters, n_records)
    corpus = _unit(centers[cluster] + 0.6 * rng.standard_normal((n_records, d)) / np.sqrt(d) * 4)
    query_side = _unit(corpus + drift * rng.standard_normal((n_records, d)) / np.sqrt(d) * 2)
    # Popular records: queries draw their first answer with Zipf-like weights over a subset.
    n_pool = max(1, n_records // 4)
    pool = rng.choice(n_records, n_pool, replace=False)
    weights = 1.0 / np.arange(1, n_pool + 1) ** 0.8
    weights /= weights.sum()
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]

    def make(n):
        first = pool[rng.choice(n_pool, n, p=weights)]
        answers, relevance, emb = [], [], np.empty((n, d))
        for i, r in enumerate(first):
            ans = [int(r)]
            if rng.random() < 0.3:  # a multi-answer query: siblings from the same cluster
                sib = members[cluster[r]]
                extra = rng.choice(sib, min(len(sib), int(rng.integers(1, 3))), replace=False)
                ans += [int(x) for x in extra if x != r]
            rel = [2.0] + [1.0] * (len(ans) - 1)
            target = query_side[ans[0]] + 0.5 * sum(query_side[a] for a in ans[1:])
            emb[i] = target + query_noise * rng.standard_normal(d) / np.sqrt(d) * 2
            answers.append(ans)
            relevance.append(rel)
        return QuerySet(_unit(emb).astype(np.float32), answers, relevance)

    train, dev, test = make(n_train), make(n_dev), make(n_test)
    name = f"synthetic-N{n_records}-d{d}-seed{seed}"
    return Dataset(name, corpus.astype(dtype), train, dev, test, synthetic=True)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def packaged() -> Dataset:
    """The dataset the demo uses: a real one shipped in ``nudgefast/data`` when present,
    else the seeded synthetic one (``synthetic=True``)."""
    here = Path(__file__).parent / "data"
    for folder in sorted(p for p in here.iterdir() if p.is_dir()) if here.is_dir() else []:
        if is_dataset(folder):
            return load(folder, mmap=False)
    return synthetic()
