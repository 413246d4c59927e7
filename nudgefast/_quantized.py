"""Search and NUDGE over a :class:`~nudgefast.quantize.QuantizedCorpus`: the passes over codes,
the query preparation each kind of pass needs, and rescoring.

Three ways to score a coded row, all streamed in row chunks of the codes (a memmap is read,
never copied whole; memory O(chunk + n_q k), and rescoring gathers the candidates of a block of
queries at a time):

- ``"float32"`` (int8/uint8, the default; and every fit): exact dequantized scores. Each chunk
  is dequantized to float32 by the backend's ``dequantize_rows`` (``u * step + min``, two
  float32 roundings: the same bits on every backend, within one float32 rounding of
  ``max(|min|, |step * u|)`` of :meth:`QuantizedCorpus.dequantize`'s float64 values) and goes
  through the backend's float ``topk_update``: ``search(q, codes)`` ranks exactly as a float
  search over these float32 rows (the :class:`DequantizedRows` view). Binary codes
  read as their +-1 sign vectors this way. As fast as a float32 pass (which is compute-bound at
  many queries), with 4-32x less to read.
- ``"int8"`` (int8/uint8 codes, when asked): the backend's ``qtopk_int8``, one integer inner
  product per (query, row): the query's weights ``q * step`` are rounded to int8 with one scale
  per query, so the score is ``q . dequantized row`` up to that rounding (|error| <= scale/2 *
  sum(u)); VNNI on the CPU, ``dp4a`` on the GPU. Rescoring makes the final order exact. A
  constant dimension (ST's step of 1 where max == min) does not set the query's scale: its
  weight is clipped (its codes are 0 for every row quantized within the ranges).
- ``"binary"`` (binary/ubinary codes): the backend's ``qtopk_hamming`` with the query's signs
  packed the same way: score ``d - 2 * Hamming``, the dot product of the +-1 sign vectors.

Rescoring (``rescore_multiplier=r``) takes each query's top ``k * r`` from the pass and ranks
them again by the exact float64 score of the float query against each candidate's dequantized
row (int8/uint8), its +-1 sign vector (binary), or its row in a float ``rescore_corpus``.
"""
from __future__ import annotations

import numpy as np

from . import _validate
from ._backends import numpy_backend
from .quantize import QuantizedCorpus

SCALAR = ("int8", "uint8")
#: The passes each precision offers, the default first.
QUERY_PRECISIONS = {"int8": ("float32", "int8"), "uint8": ("float32", "int8"),
                    "binary": ("binary", "float32"), "ubinary": ("binary", "float32")}


class DequantizedRows:
    """A read-only (N, d) float32 view of a quantized corpus: a slice or a list of rows
    dequantizes those rows only (``min + step * u`` in float32; binary: the +-1 sign of each
    dimension). The float kernels and the fit read it like a host array (``HOST_ROWS``)."""

    HOST_ROWS = True
    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, qc: QuantizedCorpus, backend=None, n_threads=None):
        self.qc = qc
        self.shape = (len(qc), qc.d)
        self.backend = backend  # whose dequantize_rows reads int8/uint8 slices (None: NumPy)
        self.n_threads = n_threads
        if qc.ranges is not None:
            self._low, self._step = qc.ranges.min, qc.ranges.step

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        codes = self.qc.codes[key]
        if codes.ndim == 1:
            return self.rows(codes[None, :])[0]
        return self.rows(codes)

    def chunk(self, start, stop) -> np.ndarray:
        """Rows ``start:stop`` dequantized into this view's one reused buffer: valid until the
        next call (the streaming pass consumes each chunk before reading the next)."""
        codes = self.qc.codes[start:stop]
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[0] < codes.shape[0]:
            buf = self._buf = np.empty((codes.shape[0], self.shape[1]), np.float32)
        return self.rows(codes, buf[:codes.shape[0]])

    def rows(self, codes, out=None) -> np.ndarray:
        """Float32 rows of ``codes`` (m, width), C-contiguous (into ``out`` when given)."""
        if out is None:
            out = np.empty((codes.shape[0], self.shape[1]), np.float32)
        if self.qc.precision in SCALAR:
            (self.backend or numpy_backend).dequantize_rows(
                np.ascontiguousarray(codes), self.qc.precision == "int8", self._low, self._step,
                out, n_threads=self.n_threads)
            return out
        packed = np.ascontiguousarray(codes).view(np.uint8)
        if self.qc.precision == "binary":
            packed = packed ^ np.uint8(0x80)  # binary = ubinary with the top bit flipped
        bits = np.unpackbits(packed, axis=1, count=self.shape[1])
        np.multiply(bits, 2, out=out, casting="unsafe")  # 0/1 -> 0/2 -> -1/+1
        out -= 1
        return out
        packed = np.ascontiguousarray(codes).view(np.uint8)
        if self.qc.precision == "binary":
            packed = packed ^ np.uint8(0x80)  # binary = ubinary with the top bit flipped
        bits = np.unpackbits(packed, axis=1, count=self.shape[1])
        x = bits.astype(np.float32)
        x *= 2
        x -= 1
        return x


def as_quantized_options(qc: QuantizedCorpus, query_precision, rescore_multiplier,
                         rescore_corpus):
    """Checked ``(query_precision, multiplier, rescore_corpus)`` for a search over ``qc``."""
    allowed = QUERY_PRECISIONS[qc.precision]
    if query_precision is None:
        query_precision = allowed[0]
    if query_precision not in allowed:
        hint = ("; the names are lower case" if isinstance(query_precision, str)
                and query_precision.lower() in allowed else "")
        raise ValueError(f"query_precision: {qc.precision} codes are searched with "
                         f"{' or '.join(map(repr, allowed))} queries, got "
                         f"{query_precision!r}{hint}")
    r = _validate.as_size("rescore_multiplier", rescore_multiplier)
    if rescore_corpus is not None:
        rescore_corpus = _validate.as_corpus("rescore_corpus", rescore_corpus)
        if rescore_corpus.shape != (len(qc), qc.d):
            raise ValueError(f"rescore_corpus: shape {tuple(rescore_corpus.shape)} differs from "
                             f"the quantized corpus ({len(qc)}, {qc.d}); pass the float rows "
                             f"the codes were quantized from")
        if r is None:
            raise ValueError("rescore_corpus: is only read to rescore candidates; pass "
                             "rescore_multiplier (e.g. 4) too")
    return query_precision, r, rescore_corpus


class Scorer:
    """One pass's per-chunk update over codes (``"int8"`` or ``"binary"`` passes): the
    queries prepared once, the backend op called per chunk."""

    def __init__(self, backend, qc: QuantizedCorpus, queries, query_precision, normalize):
        self.backend, self.qc, self.normalize = backend, qc, normalize
        self.rows = DequantizedRows(qc)  # what an error message reads a flagged row from
        q64 = np.asarray(queries, np.float64)
        if query_precision == "binary":
            self.qbits = np.packbits(q64 > 0, axis=1)
            if qc.precision == "binary":
                self.qbits ^= np.uint8(0x80)  # the codes' convention (it cancels in the XOR)
        else:
            low = qc.ranges.min.astype(np.float64)
            step = qc.ranges.step.astype(np.float64)
            self.qcodes, self.qscale = quantize_query_weights(q64 * step, qc.ranges.max > qc.ranges.min)
            self.qoffset = (q64 @ low).astype(np.float32)
            self.low, self.step = qc.ranges.min, qc.ranges.step
        self.query_precision = query_precision

    def __call__(self, chunk, row_offset, exclude, best_scores, best_index, n_threads):
        if self.query_precision == "binary":
            return self.backend.qtopk_hamming(self.qbits, chunk, row_offset, exclude, self.qc.d,
                                              best_scores, best_index, n_threads=n_threads)
        return self.backend.qtopk_int8(self.qcodes, self.qscale, self.qoffset, chunk, row_offset,
                                       exclude, self.qc.precision == "int8", self.low, self.step,
                                       self.normalize, best_scores, best_index,
                                       n_threads=n_threads)


def quantize_query_weights(w, live=None):
    """int8 codes and float32 scales of the rows of ``w`` (float64 (n_q, d)): ``w ~ scale *
    codes``, codes in [-127, 127], the largest |w| of a row over the ``live`` dimensions (all
    when None) mapped to 127, the others clipped (a row without live weight: codes 0, scale
    1)."""
    live = np.ones(w.shape[1], bool) if live is None else np.asarray(live, bool)
    amax = np.abs(w[:, live]).max(axis=1) if live.any() else np.zeros(w.shape[0])
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes), scale.astype(np.float32)


def rescore(queries, index, rows_of, normalize, k, *, name="corpus", block=256):
    """Each query's candidates ``index`` (n_q, m; -1 pads) ranked by their exact float64
    scores against ``rows_of(rows) -> float64 (len(rows), d)``: cosine with ``normalize``,
    else dot. A candidate row that is not finite (or of norm zero with ``normalize``) raises
    ValueError naming row and argument ``name``, as a float pass over it would. ``block``
    queries at a time: their candidates' rows are gathered together (memory O(block m d)).
    Returns ``(scores, index)`` (n_q, k) float64 sorted by (score desc, index asc), ``-inf``
    / ``-1`` where fewer candidates."""
    from .search import rank_rows

    out_s = np.full((index.shape[0], k), -np.inf)
    out_i = np.full((index.shape[0], k), -1, np.int64)
    for b in range(0, index.shape[0], block):
        idx = index[b:b + block]
        scores = np.full(idx.shape, -np.inf)
        qi, ki = np.nonzero(idx >= 0)
        if qi.size:
            rows, inv = np.unique(idx[qi, ki], return_inverse=True)
            vec = rows_of(rows)
            norms = np.linalg.norm(vec, axis=1)
            bad = ~np.isfinite(norms) | ((norms == 0) if normalize else False)
            if bad.any():
                row = int(rows[np.argmax(bad)])
                what = "a zero vector" if np.isfinite(norms[np.argmax(bad)]) else \
                    "contains NaN or inf"
                raise ValueError(f"{name}: row {row} is {what} (found rescoring it); fix or "
                                 f"drop that record")
            if normalize:
                vec /= norms[:, None]
            q = np.asarray(queries[b:b + block], np.float64)
            scores[qi, ki] = np.einsum("ij,ij->i", q[qi], vec[inv])
        s, i = rank_rows(scores, np.where(np.isneginf(scores), -1, idx), k)
        i[np.isneginf(s)] = -1
        out_s[b:b + block], out_i[b:b + block] = s, i
    return out_s, out_i


def requantize(vectors, qc: QuantizedCorpus, rows, backend=None):
    """Codes of tuned ``vectors`` (t, d) for the records ``rows`` of ``qc``, in its precision
    and ranges, each vector first scaled to its record's dequantized norm: the tuned rows are
    unit (NUDGE-N) or near it, the coded rows keep the corpus's scale, which the ranges fit.
    NUDGE-M's rows, up to 1 + gamma long, may leave the ranges and clip there: the result's
    float ``vectors`` are the exact tuned rows, the codes their approximation."""
    from .quantize import quantize

    base = DequantizedRows(qc, backend)[np.asarray(rows, np.int64)].astype(np.float64)
    norms = np.linalg.norm(base, axis=1)
    scaled = np.asarray(vectors, np.float64) * np.where(norms > 0, norms, 1.0)[:, None]
    return quantize(scaled.astype(np.float32), qc.precision, qc.ranges).codes


def rescore_rows(qc: QuantizedCorpus, rescore_corpus):
    """``rows_of`` for :func:`rescore`: rows of the float corpus when given, else the
    dequantized rows in float64 (binary: the +-1 signs)."""
    if rescore_corpus is not None:
        return lambda rows: np.asarray(rescore_corpus[rows], dtype=np.float64)
    if qc.precision in SCALAR:
        return lambda rows: qc.dequantize(rows, dtype=np.float64)
    view = DequantizedRows(qc)
    return lambda rows: view[rows].astype(np.float64)
