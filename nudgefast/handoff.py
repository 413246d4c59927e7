"""The hand-off: a :class:`Delta` (the rows that changed since the previous one) written where the
vectors are served, touching only those rows.

A delta comes from :class:`nudgefast.Tuner` (every operation returns one) or from a fit
(:meth:`Delta.from_result`: every touched row). Targets hold the *served* vectors: the
normalised base embedding for every record NUDGE did not touch, the tuned vector for the
others. Writing a delta into a target that holds the previous state gives the new state.

Targets, and what :meth:`Delta.apply_to` returns (always the updated target, so
``target = delta.apply_to(target)`` is right for every kind): a NumPy array or ``np.memmap``
and a FAISS index are written in place and returned; a ``pyarrow.Table`` is immutable, so a new
table is returned; a ``.npy`` or ``.parquet`` path is updated and returned.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
import zipfile
from dataclasses import dataclass, field, fields

import numpy as np

from ._validate import CORPUS_DTYPES

log = logging.getLogger("nudgefast")

#: What :meth:`Delta.save` writes in the ``format`` key, and the newest ``version`` it reads.
FORMAT = "nudgefast.delta"
VERSION = 1
TARGETS = ("a writable (n, d) float NumPy array or np.memmap; a path ending in .npy or .parquet; "
           "a FAISS IndexFlatIP/IndexFlatL2 (by position), IndexIDMap/IndexIDMap2 or IndexIVF* "
           "(by id); a pyarrow.Table with columns 'id' and 'vector'")


@dataclass
class Delta:
    """Rows to write, and rows to delete, since the previous delta.

    indices: (r,) int64 sorted record positions to write. vectors: (r, d) float32 their new
    served vectors. tuned: (r,) bool, True where the vector is a tuned one, False where it is
    the normalised base embedding (a record reverted to base, or a new record NUDGE does not
    touch). new: (r,) bool, records added since the previous delta (positions at the end).
    deleted: (q,) int64 positions deleted since the previous delta. n_records: positions
    ``0 .. n_records - 1`` exist after this delta (deleted ones stay as positions).
    ids / deleted_ids: the record ids of ``indices`` / ``deleted`` when the corpus has ids,
    else None. gamma / previous_gamma: the step now and before (NaN before the first fit).
    summary: what the operation did (op, counts, rescanned validation queries, seconds).
    """

    variant: str
    gamma: float
    indices: np.ndarray
    vectors: np.ndarray
    tuned: np.ndarray
    new: np.ndarray
    deleted: np.ndarray
    n_records: int
    previous_gamma: float = float("nan")
    ids: np.ndarray | None = None
    deleted_ids: np.ndarray | None = None
    summary: dict = field(default_factory=dict)

    @property
    def reverted(self) -> np.ndarray:
        """(r,) bool: rows that went back to their base embedding (not new records)."""
        return ~self.tuned & ~self.new

    @classmethod
    def combine(cls, deltas) -> "Delta":
        """One delta with the effect of applying ``deltas`` in order (what ``nudgefast update``
        writes for several operations).

        A position written more than once keeps its last vector and ``tuned`` flag; ``new`` stays
        True when any delta added the record. Deleted positions accumulate, and a written row at a
        position deleted later is dropped (a FAISS or Arrow target would otherwise get it back); a
        delta writing a position an earlier one deleted is refused (the tuner never does: positions
        are never reused). gamma and n_records are the last delta's, previous_gamma the first's.
        ids / deleted_ids come along when the deltas carry them. ``summary["operations"]`` lists
        every delta's summary.
        """
        deltas = list(deltas)
        if not deltas:
            raise ValueError("deltas: nothing to combine; give at least one delta")
        if len({d.variant for d in deltas}) > 1:
            raise ValueError(f"deltas: mix variants {sorted({d.variant for d in deltas})}; combine "
                             f"the deltas of one tuner")
        dims = {d.vectors.shape[-1] for d in deltas}
        if len(dims) > 1:
            raise ValueError(f"deltas: vectors of d = {sorted(dims)}; combine the deltas of one "
                             f"tuner")
        shrink = [i for i in range(1, len(deltas))
                  if deltas[i].n_records < deltas[i - 1].n_records]
        if shrink:
            i = shrink[0]
            raise ValueError(f"deltas: delta {i} has n_records {deltas[i].n_records} after "
                             f"{deltas[i - 1].n_records} (records are never removed from the "
                             f"positions); combine the deltas of one tuner, in order")
        with_ids = [d.ids is not None for d in deltas]
        if any(with_ids) and not all(with_ids):
            raise ValueError("deltas: some carry record ids and some do not; combine the deltas of "
                             "one tuner")
        deleted = np.zeros(0, np.int64)
        for i, d in enumerate(deltas):
            again = d.indices[np.isin(d.indices, deleted)]
            if again.size:
                raise ValueError(f"deltas: delta {i} writes position {int(again[0])}, which an "
                                 f"earlier delta deleted; positions are never reused")
            deleted = np.union1d(deleted, d.deleted)
        indices = np.concatenate([d.indices for d in deltas]).astype(np.int64)
        # The last write of each position: first occurrence in the reversed sequence.
        positions, first = np.unique(indices[::-1], return_index=True)
        take = indices.size - 1 - first
        keep = ~np.isin(positions, deleted)
        take, positions = take[keep], positions[keep]
        d = deltas[-1].vectors.shape[1]
        vectors = np.concatenate([x.vectors.reshape(-1, d) for x in deltas])[take]
        tuned = np.concatenate([x.tuned for x in deltas]).astype(bool)[take]
        added = np.concatenate([x.indices[x.new] for x in deltas])
        new = np.isin(positions, added)
        ids = deleted_ids = None
        if all(with_ids):
            ids = np.concatenate([np.asarray(x.ids) for x in deltas])[take]
            gone = np.concatenate([x.deleted for x in deltas])
            gone_ids = np.concatenate([np.asarray(x.deleted_ids) for x in deltas])
            _, at = np.unique(gone, return_index=True)
            deleted_ids = gone_ids[at]
        last = deltas[-1]
        summary = {"op": "combined", "ops": [x.summary.get("op") for x in deltas],
                   "tuned": int(tuned.sum()), "reverted": int((~tuned & ~new).sum()),
                   "new": int(new.sum()), "deleted": int(deleted.size),
                   "touched": last.summary.get("touched"), "gamma": last.gamma,
                   "previous_gamma": deltas[0].previous_gamma,
                   "rescanned": sum(int(x.summary.get("rescanned", 0)) for x in deltas),
                   "seconds": sum(float(x.summary.get("seconds", 0.0)) for x in deltas),
                   "operations": [x.summary for x in deltas]}
        return cls(last.variant, last.gamma, positions, np.ascontiguousarray(vectors, np.float32),
                     tuned, new, deleted, last.n_records, previous_gamma=deltas[0].previous_gamma,
                     ids=ids, deleted_ids=deleted_ids, summary=summary)

    def __repr__(self) -> str:
        return (f"Delta({self.variant}, gamma={self.gamma:.6g}, write {self.indices.size} rows "
                f"({int(self.tuned.sum())} tuned, {int(self.reverted.sum())} reverted, "
                f"{int(self.new.sum())} new), delete {self.deleted.size}, n_records="
                f"{self.n_records})")

    def __eq__(self, other) -> bool:
        """Field by field: arrays by value, and NaN gammas (before the first fit) are equal."""
        if not isinstance(other, Delta):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))

    # ------------------------------------------------------------------------------------
    # Writing the rows where the vectors are served

    def apply_to(self, target, *, ids=None):
        """Write this delta's rows into ``target`` and return the updated target.

        Only the delta's rows are touched, and everything is checked before anything is
        written: a call that raises leaves the target as it was. By kind of target:

        - NumPy array or ``np.memmap`` (n, d), float16/32/64, writable: ``target[indices] =
          vectors`` (cast to its dtype), in place; returns ``target``. It needs at least
          ``n_records`` rows (grow it for new records first). Deleted positions are left as
          they are: positions never shift, the caller's id map decides they are gone.
        - a path (``str`` / ``os.PathLike``) ending in ``.npy``: the same through
          ``np.load(path, mmap_mode="r+")``, flushed; returns ``path``.
        - FAISS ``IndexFlat`` (IP or L2; for unit vectors L2 ranks like cosine): by position,
          in place through a view of its stored vectors; new records must continue at
          ``ntotal, ntotal + 1, ...`` and are appended with ``add``. It cannot delete (it
          numbers by position: removing a row renumbers every later one). Returns the index.
        - FAISS ``IndexIDMap`` / ``IndexIDMap2`` over an index with ``remove_ids``, or any
          ``IndexIVF``: by id, in place: ``remove_ids`` of the rows written and deleted, then
          ``add_with_ids``. Returns the index.
        - ``pyarrow.Table`` with columns ``id`` and ``vector`` (fixed_size_list or list of
          floats): upsert by id. Rows with a written id get the new vector (their other
          columns kept), rows with a deleted id go, other written ids are appended (other
          columns null); id and vector types are kept. Returns a new table.
        - a path ending in ``.parquet``: that table upsert, written to a temporary file beside
          it and renamed over it (atomic); returns ``path``.

        ids: targets keyed by id use the delta's ``ids`` / ``deleted_ids``, else the positions.
        ``ids=`` overrides both: one id per corpus position (the id of position p is
        ``ids[p]``); FAISS needs integers. Targets written by position take no ``ids``.
        """
        module = type(target).__module__.partition(".")[0]
        if isinstance(target, (str, os.PathLike)):
            result = _apply_path(self, target, ids)
        elif isinstance(target, np.ndarray):
            _by_position(ids, "an array")
            _write_array(self, target, "the array")
            result = target
        elif module == "faiss":
            result = _apply_faiss(self, target, ids)
        elif module == "pyarrow" and isinstance(target, _pyarrow().Table):
            result = _upsert(self, target, ids)
        else:
            raise TypeError(f"target: cannot write a delta into {type(target).__name__}; "
                            f"supported: {TARGETS}")
        log.info("delta applied to %s: %d rows written (%d records deleted in the delta)",
                 type(target).__name__, self.indices.size, self.deleted.size)
        return result

    # ------------------------------------------------------------------------------------
    # One file per delta

    def save(self, path) -> None:
        """Write the delta to one ``.npz`` file at exactly ``path``, atomically (a temporary
        file beside it, fsync, rename). No pickle: string ids are stored as a fixed-width
        unicode array, ``summary`` as JSON (NumPy scalars and arrays become numbers and lists).
        """
        arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
                  "variant": np.array(self.variant), "gamma": np.array(self.gamma, np.float64),
                  "previous_gamma": np.array(self.previous_gamma, np.float64),
                  "n_records": np.array(self.n_records, np.int64),
                  "summary": np.array(json.dumps(self.summary, default=_json_default))}
        for name in ("indices", "vectors", "tuned", "new", "deleted", "ids", "deleted_ids"):
            value = getattr(self, name)
            if value is not None:  # ids absent from the file: None
                value = np.asarray(value)
                arrays[name] = value.astype(str) if value.dtype.kind in "OS" else value
        _replace_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path) -> Delta:
        """Read a delta written by :meth:`save`. A missing, truncated or damaged file, a
        ``.npz`` that is not a delta, or one from a newer nudgefast raises ValueError naming
        ``path``."""
        f, where = _read_npz(path, (FORMAT,), "delta", VERSION)
        try:
            return cls(str(f["variant"]), float(f["gamma"]), f["indices"], f["vectors"],
                       f["tuned"], f["new"], f["deleted"], int(f["n_records"]),
                       previous_gamma=float(f["previous_gamma"]), ids=f.get("ids"),
                       deleted_ids=f.get("deleted_ids"), summary=json.loads(str(f["summary"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is a damaged delta file (missing or bad {exc}); save "
                             f"the delta again") from exc

    @classmethod
    def from_result(cls, result, corpus_ids=None) -> Delta:
        """The full delta of a fit (:class:`nudgefast.NudgeResult`): every touched row, tuned,
        nothing new or deleted, so a plain fit is handed off like a :class:`Tuner` operation.
        corpus_ids: one id per record (ints or strings), or None to key rows by position."""
        t = result.indices.size
        ids = deleted_ids = None
        if corpus_ids is not None:
            corpus_ids = np.asarray(corpus_ids)
            if corpus_ids.shape != (result.n_records,):
                raise ValueError(f"corpus_ids: expected one id per record ({result.n_records}), "
                                 f"got shape {corpus_ids.shape}")
            ids, deleted_ids = corpus_ids[result.indices], corpus_ids[:0]
        summary = {"op": "fit", "tuned": t, "reverted": 0, "new": 0, "deleted": 0, "touched": t,
                   "rescanned": 0, "gamma": result.gamma, "seconds": sum(result.timings.values())}
        return cls(result.variant, result.gamma, result.indices, result.vectors,
                   np.ones(t, bool), np.zeros(t, bool), np.zeros(0, np.int64), result.n_records,
                   ids=ids, deleted_ids=deleted_ids, summary=summary)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is not None and b is not None and np.array_equal(a, b)
    return a == b or (a != a and b != b)  # NaN == NaN


def _json_default(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"summary: {type(value).__name__} is not JSON serialisable")


def _read_npz(path, formats, what, newest, skip=None):
    """The members of a versioned nudgefast .npz (all but ``skip``) whose ``format`` is one of
    ``formats`` and whose ``version`` is at most ``newest``, and the ``path: ...`` prefix of
    errors about it. A missing, truncated or damaged file, another .npz, or one from a newer
    nudgefast raises ValueError naming ``path``. Shared by every file nudgefast saves as .npz
    (deltas, quantized corpora and their ranges)."""
    where = f"path: {os.fspath(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist or is not a file; give the file the "
                         f"{what} was saved to")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with data:
            f = {name: data[name] for name in data.files if name != skip}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{where} is not a readable {what} file ({type(exc).__name__}: {exc}); "
                         f"it is truncated or damaged: save it again") from exc
    if "format" not in f or str(f["format"]) not in formats:
        raise ValueError(f"{where} is an .npz file but not a nudgefast {what} (format "
                         f"{str(f.get('format'))!r}); read it with np.load")
    version = f.get("version")
    if version is None or version.dtype.kind not in "iu" or version.ndim != 0:
        raise ValueError(f"{where} is a damaged {what} file (no integer 'version'); save it again")
    if int(version) > newest:
        raise ValueError(f"{where} was written by a newer nudgefast (format version "
                         f"{int(version)}, this one reads up to {newest}); upgrade nudgefast")
    return f, where


def _replace_atomically(path, write, *, by_name=False) -> None:
    """``write(file)`` (``write(name)`` with ``by_name``: for writers that open the file
    themselves, like ``faiss.write_index``) into a temporary file beside ``path``, fsync,
    rename over ``path``: a reader sees the old file or the new one, never a torn one. The
    temporary name is unique (process, thread, random), so two saves of one path never write
    the same temporary file; created exclusively, with the umask's permissions."""
    target = os.fspath(path)
    if os.path.isdir(target):
        raise ValueError(f"path: {target} is a folder; give a file name inside it")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise ValueError(f"path: the folder {parent} does not exist; create it first")
    tmp = f"{target}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:12]}"
    try:
        with open(tmp, "xb"):  # claims the name; the writer below reopens it
            pass
        if by_name:
            write(tmp)
        with open(tmp, "rb+" if by_name else "wb") as fh:
            if not by_name:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _pyarrow():
    try:
        import pyarrow
    except ImportError as exc:
        raise ImportError("target: Arrow and Parquet targets need pyarrow; pip install "
                          "pyarrow") from exc
    return pyarrow


# ----------------------------------------------------------------------------------------
# Targets written by position


def _by_position(ids, what) -> None:
    if ids is not None:
        raise ValueError(f"ids: {what} is written by position, ids= is for targets keyed by id "
                         f"(IndexIDMap2, IndexIVF, Arrow); leave it None")


def _check_d(delta: Delta, d: int, what: str) -> None:
    if d != delta.vectors.shape[1]:
        raise ValueError(f"target: {what} has d={d} but the delta's vectors have "
                         f"d={delta.vectors.shape[1]}; apply a delta to the vectors of the "
                         f"corpus it was tuned on")


def _check_shape(delta: Delta, n: int, d: int, what: str, fix: str) -> None:
    _check_d(delta, d, what)
    last = int(delta.indices.max(initial=-1))
    need = max(delta.n_records, last + 1)
    if n < need:
        raise ValueError(f"target: {what} has {n} rows but the delta covers {need} records (it "
                         f"writes up to position {last}); {fix}")


def _write_array(delta: Delta, target: np.ndarray, what: str) -> None:
    if target.ndim != 2 or target.dtype.type not in CORPUS_DTYPES:
        raise TypeError(f"target: {what} is {target.dtype} of shape {target.shape}; expected a "
                        f"2-D float32 or float16 array (n, d) of served vectors")
    if not target.flags.writeable:
        raise ValueError(f"target: {what} is read-only; open it writable (np.load(path, "
                         f"mmap_mode='r+')) or pass a copy")
    _check_shape(delta, *target.shape, what, "grow it first (e.g. np.lib.format.open_memmap a "
                 "larger .npy file and copy the old rows in)")
    target[delta.indices] = delta.vectors
    if isinstance(target, np.memmap):
        target.flush()


def _apply_path(delta: Delta, path, ids):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".npy":
        _by_position(ids, "a .npy file")
        _write_array(delta, np.load(path, mmap_mode="r+"), repr(os.fspath(path)))
    elif ext == ".parquet":
        _pyarrow()
        import pyarrow.parquet as pq

        table = _upsert(delta, pq.read_table(path), ids)
        _replace_atomically(path, lambda fh: pq.write_table(table, fh))
    else:
        raise ValueError(f"target: path {os.fspath(path)!r} must end in .npy (written in place) "
                         f"or .parquet (rewritten); for another format pass the loaded array "
                         f"or table")
    return path


# ----------------------------------------------------------------------------------------
# Targets keyed by id


def _keys(delta: Delta, ids):
    """The keys of the rows written and of the rows deleted: ``ids`` at their positions when
    given, else the delta's ids, else the positions themselves; and which of the three."""
    if ids is not None:
        ids = np.asarray(ids)
        if ids.dtype.kind == "u" and ids.size and ids.max() > np.iinfo(np.int64).max:
            raise ValueError(f"ids: {int(ids.max())} does not fit in int64 (FAISS and the "
                             f"delta keep int64 ids); map the ids first")
        top = int(max(delta.indices.max(initial=-1), delta.deleted.max(initial=-1)))
        if ids.ndim != 1 or ids.shape[0] <= top:
            raise ValueError(f"ids: expected one id per corpus position (at least {top + 1}), "
                             f"got shape {ids.shape}")
        return ids[delta.indices], ids[delta.deleted], "ids="
    if delta.ids is None and delta.deleted_ids is None:
        return delta.indices, delta.deleted, "positions"
    if delta.ids is None or delta.deleted_ids is None:
        raise ValueError("delta: has ids for its written rows or its deleted rows but not both; "
                         "give both or neither")
    return np.asarray(delta.ids), np.asarray(delta.deleted_ids), "the delta's ids"


def _apply_faiss(delta: Delta, target, ids):
    import faiss

    index = faiss.downcast_index(target) if isinstance(target, faiss.Index) else target
    name = type(index).__name__
    if isinstance(index, faiss.IndexFlat) and not isinstance(index, faiss.IndexFlat1D):
        _by_position(ids, f"an {name}")
        _write_flat(delta, index, name, faiss)
        return target
    if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIVF)):
        raise TypeError(f"target: a FAISS {name} cannot be updated in place; supported: "
                        f"IndexFlatIP/IndexFlatL2 (by position), IndexIDMap/IndexIDMap2 over an "
                        f"index with remove_ids, IndexIVF* (by id); wrap it in "
                        f"faiss.IndexIDMap2, or rebuild it from the written array")
    if isinstance(index, faiss.IndexIDMap):
        name += f" over {type(faiss.downcast_index(index.index)).__name__}"
    _check_d(delta, index.d, f"the {name}")
    if not index.is_trained:
        raise ValueError(f"target: the {name} is not trained; train it before writing vectors")
    written, deleted, source = _keys(delta, ids)
    if written.dtype.kind not in "iu" or deleted.dtype.kind not in "iu":
        raise TypeError(f"ids: FAISS needs int64 ids, {source} are {written.dtype}; pass ids= "
                        f"an int64 id per corpus position, or key the index by position")
    written = written.astype(np.int64)
    gone = np.union1d(written, deleted.astype(np.int64))
    if gone.size:
        try:
            index.remove_ids(gone)
        except RuntimeError as exc:  # raised before anything is removed
            raise TypeError(f"target: the {name} cannot remove ids ({exc}); updating by id "
                            f"needs remove_ids: use IndexIDMap2 over IndexFlat, or an IndexIVF "
                            f"without an array direct map") from exc
    if written.size:
        index.add_with_ids(np.ascontiguousarray(delta.vectors, np.float32), written)
    return target


def _write_flat(delta: Delta, index, name: str, faiss) -> None:
    n = index.ntotal
    if delta.deleted.size:
        raise ValueError(f"target: an {name} numbers its vectors by position and cannot delete "
                         f"{delta.deleted.size} rows without renumbering every later one; keep "
                         f"the vectors in a faiss.IndexIDMap2 and apply by id")
    head = int(np.searchsorted(delta.indices, n))
    tail = delta.indices[head:]
    gap = np.flatnonzero(tail != n + np.arange(tail.size))
    if gap.size:
        raise ValueError(f"target: the {name} holds {n} vectors; new rows must continue at "
                         f"position {n}, {n + 1}, ... but the delta writes position "
                         f"{int(tail[gap[0]])} without {n + int(gap[0])}; apply the earlier "
                         f"deltas first")
    _check_shape(delta, n + tail.size, index.d, f"the {name}", "apply the earlier deltas first")
    if head:
        # A view of the index's own storage (no copy): writing it updates the index.
        stored = faiss.rev_swig_ptr(index.get_xb(), n * index.d).reshape(n, index.d)
        stored[delta.indices[:head]] = delta.vectors[:head]
    if tail.size:
        index.add(np.ascontiguousarray(delta.vectors[head:], np.float32))


def _upsert(delta: Delta, table, ids):
    pa = _pyarrow()
    import pyarrow.compute as pc

    missing = sorted({"id", "vector"} - set(table.column_names))
    if missing:
        raise ValueError(f"target: the table has no column {', '.join(map(repr, missing))}; "
                         f"expected 'id' and 'vector' (one row per record)")
    written, deleted, source = _keys(delta, ids)
    key_type = table.schema.field("id").type
    want = "iu" if pa.types.is_integer(key_type) else "UO" if (
        pa.types.is_string(key_type) or pa.types.is_large_string(key_type)) else ""
    if not want or written.dtype.kind not in want or deleted.dtype.kind not in want:
        raise TypeError(f"target: the table's id column is {key_type} but the keys are "
                        f"{written.dtype} ({source}); pass ids= one id of the table's type per "
                        f"corpus position")
    vector = table.schema.field("vector")
    vtype, d = vector.type, delta.vectors.shape[1]
    fixed = pa.types.is_fixed_size_list(vtype)
    if not ((fixed or pa.types.is_list(vtype) or pa.types.is_large_list(vtype))
            and pa.types.is_floating(vtype.value_type)):
        raise TypeError(f"target: column 'vector' is {vtype}; expected fixed_size_list<float32>"
                        f"[d] or list<float>")
    column = table["vector"].combine_chunks()
    lengths_ok = pc.all(pc.equal(pc.list_value_length(column), d)).as_py() is not False
    if (fixed and vtype.list_size != d) or column.null_count or not lengths_ok:
        raise ValueError(f"target: column 'vector' ({vtype}) does not hold {d} values in every "
                         f"row (the delta's d); apply a delta to the vectors of the corpus it "
                         f"was tuned on")
    vec = np.array(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d))
    at = pc.fill_null(pc.index_in(table["id"], value_set=pa.array(written).cast(key_type)), -1)
    at = np.asarray(at.to_numpy(), np.int64)
    hit = at >= 0
    vec[hit] = delta.vectors[at[hit]]
    keep = hit | ~np.asarray(pc.is_in(table["id"], value_set=pa.array(deleted).cast(key_type))
                             .to_numpy(zero_copy_only=False), bool)
    found = np.zeros(written.size, bool)
    found[at[hit]] = True

    def as_column(rows):
        values = pa.array(np.ascontiguousarray(rows, vec.dtype).ravel())
        return pa.FixedSizeListArray.from_arrays(values, d).cast(vtype)

    kept = table.drop_columns(["vector"]).filter(pa.array(keep)).add_column(
        table.schema.get_field_index("vector"), vector, as_column(vec[keep]))
    new_ids = pa.array(written[~found]).cast(key_type)
    appended = pa.Table.from_arrays(
        [new_ids if f.name == "id" else as_column(delta.vectors[~found]) if f.name == "vector"
         else pa.nulls(len(new_ids), f.type) for f in table.schema], schema=table.schema)
    return pa.concat_tables([kept, appended])
