"""Datasets: the shared on-disk format, discovery, seeded subsets and a synthetic generator.

On-disk format (one folder per dataset): ``corpus.npy`` float16 or float32 (N, d),
``corpus_ids.txt``, optionally ``corpus_text.jsonl.gz`` (``{"id", "text"}`` per record, in row
order), ``queries_{train,dev,test}.npy`` float16 or float32 and ``qrels_{split}.jsonl`` lines
``{"qid", "answers": [rows], "relevance": [grades]}`` (optionally ``"text"`` and other fields)
in row order. See ``shared/data/README``.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .queryset import QuerySet

log = logging.getLogger("nudgefast")

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
    folder: Path | None = None

    def record_ids(self) -> list[str] | None:
        """The record ids in row order (``corpus_ids.txt``), or None without them."""
        path = self.folder / "corpus_ids.txt" if self.folder else None
        if path is None or not path.is_file():
            return None
        return path.read_text(encoding="utf-8").splitlines()

    def record_texts(self) -> list[str] | None:
        """The record texts in row order (``corpus_text.jsonl.gz``), or None without them."""
        path = self.folder / "corpus_text.jsonl.gz" if self.folder else None
        if path is None or not path.is_file():
            return None
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()]

    def query_texts(self, split: str) -> list[str] | None:
        """The query texts of ``split`` (the qrels' ``"text"`` field), or None without them."""
        if split not in SPLITS:
            raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
        if self.folder is None:
            return None
        rows = _read_qrels(self.folder / f"qrels_{split}.jsonl")
        if not all("text" in r for r in rows):
            return None
        return [r["text"] for r in rows]


def load(folder: str | os.PathLike, mmap: bool = True) -> Dataset:
    """Load a dataset folder; the corpus is memory-mapped (read-only) unless ``mmap=False``."""
    folder = Path(folder)
    if not is_dataset(folder):
        missing = [f for f in ["corpus.npy"] + [f"{p}_{s}.{e}" for s in SPLITS
                                                for p, e in (("queries", "npy"), ("qrels", "jsonl"))]
                   if not (folder / f).is_file()]
        raise FileNotFoundError(f"dataset: {str(folder)!r} is not a dataset folder in the shared "
                                f"format (missing {', '.join(missing)}); see nudgefast.datasets")
    corpus = np.load(folder / "corpus.npy", mmap_mode="r" if mmap else None)
    sets = {split: QuerySet.load(folder, split) for split in SPLITS}
    return Dataset(folder.name, corpus, sets["train"], sets["dev"], sets["test"], folder=folder)


def _read_qrels(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_subset(source: str | os.PathLike, dest: str | os.PathLike, *, n_groups: int,
                 n_records: int, neighbours: int = 3, seed: int = 0, backend="auto") -> Path:
    """Write a seeded subset of the dataset folder ``source`` to ``dest``, same format.

    Queries are kept by *group* (all queries whose best-graded answer is the same record, e.g.
    the two descriptions of one package), ``n_groups`` groups drawn with ``seed``, each query in
    its original split. Records kept: every answer of a kept query; the ``neighbours`` nearest
    records of every kept query under the untuned embeddings (its real competitors, so the
    subset stays as hard as the whole); then records drawn at random up to ``n_records``.
    Kept records stay in their original order; answers, ids, texts and every other qrels field
    are carried over, dtypes unchanged.
    """
    from .search import search

    source, dest = Path(source), Path(dest)
    src = load(source)
    rng = np.random.default_rng(seed)
    qrels = {s: _read_qrels(source / f"qrels_{s}.jsonl") for s in SPLITS}
    qsets = {"train": src.train, "dev": src.dev, "test": src.test}

    def group_of(rec):
        rel = rec.get("relevance") or [1.0] * len(rec["answers"])
        return int(rec["answers"][int(np.argmax(rel))]) if rec["answers"] else -1

    groups = sorted({group_of(r) for s in SPLITS for r in qrels[s]} - {-1})
    if n_groups > len(groups):
        raise ValueError(f"n_groups: the source has {len(groups)} answer groups, asked for "
                         f"{n_groups}")
    chosen = set(rng.choice(groups, n_groups, replace=False).tolist())
    keep_q = {s: [i for i, r in enumerate(qrels[s]) if group_of(r) in chosen] for s in SPLITS}
    records = {int(a) for s in SPLITS for i in keep_q[s] for a in qrels[s][i]["answers"]}
    if neighbours:
        for s in SPLITS:
            q = qsets[s].embeddings[keep_q[s]]
            hits = search(q, src.corpus, neighbours, backend=backend, progress=False).indices
            records.update(int(x) for x in hits.ravel() if x >= 0)
    n_total = src.corpus.shape[0]
    if len(records) > n_records:
        raise ValueError(f"n_records: the kept queries already need {len(records)} records; "
                         f"ask for at least that many, or fewer groups or neighbours")
    rest = np.setdiff1d(np.arange(n_total), np.fromiter(records, np.int64))
    fill = rng.choice(rest, n_records - len(records), replace=False)
    rows = np.sort(np.concatenate([np.fromiter(records, np.int64), fill]))
    new_row = np.full(n_total, -1, np.int64)
    new_row[rows] = np.arange(rows.size)

    dest.mkdir(parents=True, exist_ok=True)
    np.save(dest / "corpus.npy", np.ascontiguousarray(src.corpus[rows]))
    ids_path = source / "corpus_ids.txt"
    if ids_path.is_file():
        ids = ids_path.read_text(encoding="utf-8").splitlines()
        (dest / "corpus_ids.txt").write_text("\n".join(ids[r] for r in rows) + "\n",
                                             encoding="utf-8")
    texts = src.record_texts()
    if texts is not None:
        # mtime=0: the same subset gives the same bytes.
        with open(dest / "corpus_text.jsonl.gz", "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            src_ids = ids if ids_path.is_file() else [str(r) for r in range(n_total)]
            for r in rows:
                gz.write((json.dumps({"id": src_ids[r], "text": texts[r]}, ensure_ascii=False)
                          + "\n").encode("utf-8"))
    for s in SPLITS:
        emb = np.load(source / f"queries_{s}.npy", mmap_mode="r")
        np.save(dest / f"queries_{s}.npy", np.ascontiguousarray(emb[keep_q[s]]))
        with open(dest / f"qrels_{s}.jsonl", "w", encoding="utf-8") as fh:
            for i in keep_q[s]:
                rec = dict(qrels[s][i])
                rec["answers"] = [int(new_row[a]) for a in rec["answers"]]
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    log.info("subset of %s: %d groups, %d records (%d needed), queries %s", source.name,
             n_groups, rows.size, len(records), {s: len(keep_q[s]) for s in SPLITS})
    return dest


def is_dataset(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "corpus.npy").is_file() and all(
        (folder / f"queries_{s}.npy").is_file() and (folder / f"qrels_{s}.jsonl").is_file()
        for s in SPLITS)


def find(root: str | os.PathLike | None = None) -> list[Path]:
    """Every dataset folder under ``root`` (default: ``$NUDGEFAST_DATA``, else the ``data``
    folder of a ``shared`` checkout next to the repository or the working directory)."""
    if root is None:
        root = os.environ.get("NUDGEFAST_DATA")
    if root is None:
        # A source checkout next to shared/ (the package imported from the checkout, or the
        # checkout being the working directory while an installed copy is imported).
        candidates = []
        for base in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
            candidates += [base.parent / "shared" / "data", base / "shared" / "data"]
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
    """The real dataset shipped in ``nudgefast/data`` (a seeded subset of pkg-search, float16),
    loaded into memory; the demo's default."""
    here = Path(__file__).parent / "data"
    for folder in sorted(p for p in here.iterdir() if p.is_dir()) if here.is_dir() else []:
        if is_dataset(folder):
            return load(folder, mmap=False)
    raise FileNotFoundError(f"the packaged dataset is missing from {here}: reinstall nudgefast "
                            f"(pip install .), or use datasets.synthetic()")
