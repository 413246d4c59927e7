"""Scalar (int8, uint8) and binary quantization of a corpus, code for code the same as
Sentence-Transformers' ``quantize_embeddings`` (``sentence_transformers.util.quantization``,
checked against 6.2.0 in tests/test_quantize.py), streamed in row chunks so a memory-mapped
corpus larger than RAM is never copied as floats.

The codes, per precision (``x``: the float rows, ``d`` dimensions):

- ``uint8``: per dimension ``u = clip(floor((x - min) / step), 0, 255)`` with the ranges cast to
  float32, ``step = (max - min) / 255`` in float32 and ``step = 1`` where it is 0 (a constant
  dimension: ST's rule, kept so the codes match; such a dimension codes ``x == min`` to 0). The
  arithmetic runs in ``result_type(x.dtype, float32)``: float32 for float16/float32 input,
  float64 for float64 input, as ST's NumPy expression promotes.
- ``int8``: ``u - 128`` (the same bytes with the top bit flipped).
- ``ubinary``: ``np.packbits(x > 0, axis=-1)``: (N, ceil(d/8)) uint8; byte ``j`` holds
  dimensions ``8j .. 8j+7``, dimension ``8j`` in the most significant bit (NumPy's big-endian
  bit order); the pad bits of the last byte are 0.
- ``binary``: the ``ubinary`` bytes minus 128, as int8 (top bit flipped). Both sides of a
  comparison flip the same bit, so Hamming distances are the same on either.

Dequantization (rescoring) restores ``min + step * u`` (``u = code + 128`` for int8), the lower
edge of the code's bucket, as ST's ``_dequantize_embeddings`` does in float64. So a query ``q``
scores a coded row as ``q . x = (q * step) . u + q . min``.
"""
from __future__ import annotations

import logging
import struct
import zipfile

import numpy as np

from . import _defaults, _validate
from .handoff import _read_npz, _replace_atomically

log = logging.getLogger(__name__)

PRECISIONS = ("int8", "uint8", "binary", "ubinary")
CODE_DTYPES = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
FORMAT = "nudgefast.quantized"
RANGES_FORMAT = "nudgefast.quantization_ranges"
VERSION = 1
#: ST warns below this many rows when the ranges come from the embeddings themselves.
FEW_CALIBRATION_ROWS = 100


def _as_precision(precision) -> str:
    if precision not in PRECISIONS:
        hint = "; keep float32 embeddings as they are" if precision == "float32" else ""
        if isinstance(precision, str) and precision.lower() in PRECISIONS and not hint:
            hint = f"; the names are lower case: {precision.lower()!r}"
        raise ValueError(f"precision: {precision!r} is not supported; use one of "
                         f"{', '.join(map(repr, PRECISIONS))}{hint}")
    return precision


def _code_width(precision: str, d: int) -> int:
    """Bytes per coded row: one per dimension, or one per 8 dimensions (packed bits)."""
    return d if precision in ("int8", "uint8") else (d + 7) // 8


def _chunk_rows(chunk_rows, d: int) -> int:
    """Rows per chunk: a float64 work tile of at most CHUNK_BYTES, unless the caller says."""
    chunk_rows = _validate.as_size("chunk_rows", chunk_rows)
    return chunk_rows or max(1, _defaults.CHUNK_BYTES // (8 * d))


def _row_error(name: str, chunk, lo: int) -> ValueError:
    row = lo + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
    return ValueError(f"{name}: row {row} contains NaN or inf; fix or drop that record before "
                      f"quantizing")


class QuantizationRanges:
    """Per-dimension ranges of int8/uint8 codes: ``min`` and ``max``, float32 arrays of shape
    (d,), exactly ST's ``ranges`` array (2, d) cast to float32 (ST casts before use, so nothing
    is lost). ``step`` (float32, (d,)) is ``(max - min) / 255``, 1 where that is 0.

    Build from ST's array (``from_array``), from calibration embeddings
    (``from_calibration``: one streaming pass), or load one saved beside codes. Read-only.
    """

    __slots__ = ("min", "max")

    def __init__(self, min, max, *, name: str = "ranges"):
        with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: refused below
            lo, hi = (np.array(v, dtype=np.float32, copy=True) for v in (min, max))
        if lo.ndim != 1 or lo.shape != hi.shape or lo.size == 0:
            raise ValueError(f"{name}: min and max must be 1-D arrays of the same length d >= 1 "
                             f"(one value per dimension), got shapes {lo.shape} and {hi.shape}")
        for what, v in (("min", lo), ("max", hi)):
            if not np.isfinite(v).all():
                j = int(np.flatnonzero(~np.isfinite(v))[0])
                raise ValueError(f"{name}: {what} of dimension {j} is NaN or inf in float32 "
                                 f"(the codes' precision); give finite ranges")
        if np.any(hi < lo):
            j = int(np.flatnonzero(hi < lo)[0])
            raise ValueError(f"{name}: max < min in dimension {j} ({hi[j]} < {lo[j]}); the "
                             f"first row (or the first of min/max) must be the minimum")
        with np.errstate(over="ignore"):
            step = (hi - lo) / np.float32(255)
        if not np.isfinite(step).all():
            j = int(np.flatnonzero(~np.isfinite(step))[0])
            raise ValueError(f"{name}: max - min of dimension {j} overflows float32; the "
                             f"ranges are not embedding values, check them")
        lo.flags.writeable = hi.flags.writeable = False
        object.__setattr__(self, "min", lo)
        object.__setattr__(self, "max", hi)

    def __setattr__(self, key, value):
        raise AttributeError("QuantizationRanges is read-only; build a new one")

    def __reduce__(self):  # copy and pickle rebuild through __init__ (the slots are read-only)
        return (QuantizationRanges, (self.min, self.max))

    @property
    def d(self) -> int:
        return self.min.size

    @property
    def step(self) -> np.ndarray:
        """float32 (d,): ``(max - min) / 255``, and 1 for a constant dimension (ST's rule)."""
        step = (self.max - self.min) / np.float32(255)
        return np.where(step == 0, np.float32(1), step)

    def to_array(self) -> np.ndarray:
        """ST's ``ranges``: float32 (2, d), row 0 the minima, row 1 the maxima."""
        return np.vstack((self.min, self.max))

    @classmethod
    def from_array(cls, ranges, *, name: str = "ranges") -> QuantizationRanges:
        """From ST's ``ranges`` array (2, d) (any float dtype; cast to float32 as ST does)."""
        if isinstance(ranges, cls):
            return ranges
        arr = _validate._host_array(name, ranges, allow_device=True)  # (2, d): small
        if arr.ndim != 2 or arr.shape[0] != 2 or arr.dtype.kind not in "fiu":
            raise ValueError(f"{name}: expected a QuantizationRanges or ST's (2, d) array of "
                             f"[minima, maxima], got {arr.dtype} shape {tuple(arr.shape)}")
        return cls(arr[0], arr[1], name=name)

    @classmethod
    def from_calibration(cls, calibration, *, chunk_rows=None,
                         name: str = "calibration") -> QuantizationRanges:
        """Per-dimension min and max of ``calibration`` ((n, d) float16/32/64, a memmap is
        read in row chunks), in its own dtype, then cast to float32: ST's
        ``np.vstack((np.min(c, axis=0), np.max(c, axis=0))).astype(np.float32)``."""
        calibration = _validate.as_corpus(name, calibration)
        rows = _chunk_rows(chunk_rows, calibration.shape[1])
        lo = hi = None
        for start in range(0, calibration.shape[0], rows):
            chunk = calibration[start:start + rows]
            cmin, cmax = chunk.min(axis=0), chunk.max(axis=0)  # NaN propagates
            if not (np.isfinite(cmin).all() and np.isfinite(cmax).all()):
                raise _row_error(name, chunk, start)
            lo = cmin if lo is None else np.minimum(lo, cmin)
            hi = cmax if hi is None else np.maximum(hi, cmax)
        return cls(lo, hi, name=name)

    def save(self, path) -> None:
        """Write the ranges alone to one ``.npz`` at ``path``, atomically (versioned)."""
        arrays = {"format": np.array(RANGES_FORMAT), "version": np.array(VERSION),
                  "ranges_min": self.min, "ranges_max": self.max}
        _replace_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path) -> QuantizationRanges:
        """Read ranges written by :meth:`save`, or the ranges inside a file
        :meth:`QuantizedCorpus.save` wrote. Bad files raise ValueError naming ``path``."""
        f, where = _read_npz(path, (RANGES_FORMAT, FORMAT), "quantization ranges", VERSION,
                             skip="codes")
        if "ranges_min" not in f:
            if str(f["format"]) == FORMAT and "precision" in f:
                raise ValueError(f"{where} holds {str(f['precision'])} codes, which have no ranges")
            raise ValueError(f"{where} is a damaged ranges file (no 'ranges_min'); save it again")
        try:
            return cls(f["ranges_min"], f["ranges_max"], name=where)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{where} is a damaged ranges file ({exc}); save it again") from exc

    def __eq__(self, other):
        return (isinstance(other, QuantizationRanges) and np.array_equal(self.min, other.min)
                and np.array_equal(self.max, other.max))

    __hash__ = None

    def __repr__(self):
        return f"QuantizationRanges(d={self.d})"


class QuantizedCorpus:
    """Codes of a corpus and what reading them needs.

    codes: (N, d) int8/uint8 for ``int8``/``uint8``, (N, ceil(d/8)) int8/uint8 for
        ``binary``/``ubinary`` (layout: see the module docstring); a NumPy array or memmap,
        kept as given (not copied).
    precision: one of ``PRECISIONS``.
    d: the embedding dimension (for binary codes it cannot be read off the width).
    ranges: :class:`QuantizationRanges` (or ST's (2, d) array) for int8/uint8; None for binary.

    Codes quantized elsewhere (ST's ``quantize_embeddings`` with its ``ranges``) are wrapped as
    ``QuantizedCorpus(codes, "int8", d, ranges)``.
    """

    def __init__(self, codes, precision, d=None, ranges=None):
        precision = _as_precision(precision)
        scalar = precision in ("int8", "uint8")
        if not isinstance(codes, np.ndarray):
            codes = _validate._host_array("codes", codes)
        want = np.dtype(CODE_DTYPES[precision])
        if codes.ndim != 2 or codes.dtype != want:
            raise ValueError(f"codes: {precision} codes are a 2-D {want} array, got "
                             f"{codes.dtype} shape {tuple(codes.shape)}")
        if d is None:
            if not scalar:
                raise ValueError(f"d: give the embedding dimension; {precision} codes pack 8 "
                                 f"dimensions per byte, so the width does not tell it")
            d = codes.shape[1]
        d = _validate.as_size("d", d, allow_none=False)
        if codes.shape[1] != _code_width(precision, d):
            raise ValueError(f"codes: {precision} codes of d={d} have {_code_width(precision, d)} "
                             f"columns, got {codes.shape[1]}; pass the d they were made from")
        if scalar:
            if ranges is None:
                raise ValueError(f"ranges: {precision} codes need the ranges they were "
                                 f"quantized with (ST's (2, d) array or QuantizationRanges)")
            ranges = QuantizationRanges.from_array(ranges)
            if ranges.d != d:
                raise ValueError(f"ranges: has d={ranges.d} but the codes have d={d}; pass the "
                                 f"ranges these codes were quantized with")
        elif ranges is not None:
            raise ValueError(f"ranges: {precision} codes have no ranges (the sign of each "
                             f"dimension is kept); leave it None")
        if not scalar and d % 8 and codes.shape[0]:
            # The pad bits (the low 8 - d % 8 bits of the last byte) are 0 in packbits' output,
            # and binary's flip of the top bit leaves them so; set ones would count in every
            # Hamming distance (codes of another d, or another bit order). One column is read.
            pad = np.uint8((1 << (8 - d % 8)) - 1)
            step = 1 << 20  # one column, in chunks: no N-sized temporary
            if any(np.any(codes[lo:lo + step, -1].view(np.uint8) & pad)
                   for lo in range(0, codes.shape[0], step)):
                raise ValueError(f"codes: the pad bits of the last byte are set, which packed "
                                 f"codes of d={d} never have; pass the d these codes were made "
                                 f"from (np.packbits order, dimension 8j in the top bit)")
        self.codes, self.precision, self.d, self.ranges = codes, precision, d, ranges

    def __len__(self):
        return self.codes.shape[0]

    def __repr__(self):
        return f"QuantizedCorpus(precision={self.precision!r}, n={len(self)}, d={self.d})"

    def dequantize(self, rows=None, *, out=None, dtype=np.float32, chunk_rows=None) -> np.ndarray:
        """Float rows ``min + step * u`` (``u = code + 128`` for int8), computed in float64
        as ST's ``_dequantize_embeddings`` and stored in ``dtype`` (float32 or float64; with
        float64, equal to ST's bit for bit).

        rows: None (all, in row chunks) or 1-D row indices (rescoring a candidate list).
        out: a writable (len(rows), d) array of ``dtype`` (a memmap for a large corpus).
        Returns ``out`` or a new array.
        """
        if self.ranges is None:
            raise ValueError(f"precision: {self.precision} codes keep only signs and have no "
                             f"ranges to dequantize with; unpack them with np.unpackbits")
        try:
            dt = None if dtype is None else np.dtype(dtype)  # np.dtype(None) would be float64
        except TypeError as exc:
            raise TypeError(f"dtype: must be float32 or float64, got {dtype!r}") from exc
        if dt is None or dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype: must be float32 or float64, got {dtype!r}")
        codes = self.codes
        if rows is not None:
            idx = np.asarray(rows)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                hint = "; for a mask pass np.flatnonzero(mask)" if idx.dtype == bool else ""
                raise ValueError(f"rows: expected 1-D integer row indices, got {idx.dtype} "
                                 f"shape {idx.shape}{hint}")
            if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
                raise IndexError(f"rows: indices must be in [0, {len(self)}) (no negative "
                                 f"indices: -1 pads candidate lists), got [{idx.min()}, {idx.max()}]")
            codes = codes[idx.astype(np.intp)]
        n = codes.shape[0]
        if out is None:
            out = np.empty((n, self.d), dtype=dt)
        elif (not isinstance(out, np.ndarray) or out.shape != (n, self.d)
              or out.dtype != dt or not out.flags.writeable or np.may_share_memory(out, self.codes)):
            raise ValueError(f"out: expected a writable {dt} array of shape {(n, self.d)}, "
                             f"not sharing memory with the codes, got "
                             f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
        low, step = self.ranges.min, self.ranges.step
        size = _chunk_rows(chunk_rows, self.d)
        for lo in range(0, n, size):
            v = codes[lo:lo + size].astype(np.float64)  # before the offset: int8 + 128 overflows
            if self.precision == "int8":
                v += 128
            v *= step
            v += low
            out[lo:lo + size] = v
        return out

    def save(self, path) -> None:
        """Write codes, precision, d and ranges to one ``.npz`` at ``path``, atomically
        (a temporary file beside it, fsync, rename), versioned. The codes are written in
        chunks (a memmap is not read into memory) and stored uncompressed, so
        ``load(path, mmap_mode="r")`` can map them again."""
        arrays = {"format": np.array(FORMAT), "version": np.array(VERSION),
                  "precision": np.array(self.precision), "d": np.array(self.d, np.int64),
                  "codes": self.codes}
        if self.ranges is not None:
            arrays["ranges_min"], arrays["ranges_max"] = self.ranges.min, self.ranges.max
        _replace_atomically(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path, mmap_mode=None) -> QuantizedCorpus:
        """Read a file :meth:`save` wrote. ``mmap_mode="r"`` (or ``"r+"``, ``"c"``) maps the
        codes from the file instead of reading them. A missing, damaged, foreign or newer file
        raises ValueError naming ``path``. Writing through an ``"r+"`` map (``apply(qc,
        out=qc.codes)``) leaves the archive's CRC of the codes stale: load it again with a
        ``mmap_mode`` (which does not read the CRC) or ``save`` it; a corpus tuned in place is
        best kept as a ``.npy`` memmap of the codes."""
        if mmap_mode not in (None, "r", "r+", "c"):
            raise ValueError(f"mmap_mode: must be None, 'r', 'r+' or 'c', got {mmap_mode!r}")
        f, where = _read_npz(path, (FORMAT,), "quantized corpus", VERSION,
                             skip="codes" if mmap_mode else None)
        try:
            codes = _npz_memmap(path, "codes", mmap_mode) if mmap_mode else f["codes"]
            ranges = (QuantizationRanges(f["ranges_min"], f["ranges_max"])
                      if "ranges_min" in f else None)
            return cls(codes, str(f["precision"]), int(f["d"]), ranges)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where} is a damaged quantized corpus file (missing or bad "
                             f"{exc}); save it again") from exc


def _npz_memmap(path, name, mode):
    """A memmap of member ``name`` of an uncompressed .npz (np.savez's output): the .npy data
    starts after the zip local header (30 bytes + file name + extra field) and the .npy header."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{name} is compressed and cannot be memory-mapped")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{name} has no zip local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape,
                     order="F" if fortran else "C")


def quantize(x, precision, ranges=None, calibration=None, *, out=None,
             chunk_rows=None) -> QuantizedCorpus:
    """Quantize float rows to ``precision`` as Sentence-Transformers'
    ``quantize_embeddings(x, precision, ranges, calibration_embeddings)`` does, byte for byte.

    x: (N, d) float16/float32/float64 NumPy array, memmap or CPU torch tensor; read in row
        chunks (``chunk_rows``, default: a 64 MiB float64 tile), never copied whole.
    precision: ``"int8"``, ``"uint8"``, ``"binary"`` or ``"ubinary"``.
    ranges: int8/uint8 only: :class:`QuantizationRanges` or ST's (2, d) array of [minima,
        maxima]. calibration: int8/uint8 only, instead of ranges: (n, d) float embeddings the
        ranges are computed from (one pass). With neither, the ranges are those of ``x``
        itself (an extra pass over ``x``; ST's default, which it advises against; a single row
        is an error, as in ST).
    out: a writable (N, d) (binary: (N, ceil(d/8))) int8/uint8 array, e.g. a memmap, to write
        the codes into, not sharing memory with ``x``; default a new array. After an error (a
        NaN/inf row found in a later chunk) what ``out`` holds is unspecified, as with
        ``NudgeResult.apply``: checking first would read the corpus twice.

    Returns a :class:`QuantizedCorpus` (codes, precision, d, ranges); ``.save`` keeps the
    ranges with the codes. NaN/inf rows are an error (ST would give undefined codes).
    """
    precision = _as_precision(precision)
    x = _validate.as_corpus("x", x)
    n, d = x.shape
    scalar = precision in ("int8", "uint8")
    rows = _chunk_rows(chunk_rows, d)
    if not scalar and (ranges is not None or calibration is not None):
        arg = "ranges" if ranges is not None else "calibration"
        raise ValueError(f"{arg}: {precision} quantization keeps the sign of each dimension "
                         f"and takes no ranges; leave {arg} None")
    if ranges is not None and calibration is not None:
        raise ValueError("calibration: give ranges or calibration embeddings, not both (ranges "
                         "win in ST); drop one")
    # out= and the calibration's width are checked before any pass over the data.
    width = _code_width(precision, d)
    want = np.dtype(CODE_DTYPES[precision])
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != (n, width)
                            or out.dtype != want or not out.flags.writeable):
        raise ValueError(f"out: expected a writable {want} array of shape {(n, width)} for "
                         f"{precision} codes, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")
    if out is not None and np.may_share_memory(out, x):
        raise ValueError("out: shares memory with x; the codes would overwrite rows not yet "
                         "read: pass a separate array (or memmap)")
    if calibration is not None and scalar:
        cal_shape = getattr(calibration, "shape", None)
        if cal_shape is not None and len(cal_shape) == 2 and cal_shape[1] != d:
            raise ValueError(f"calibration: has d={cal_shape[1]} but x has d={d}; calibrate "
                             f"with embeddings of the same model")
    if out is None:
        out = np.empty((n, width), dtype=want)
    if scalar:
        if ranges is not None:
            ranges = QuantizationRanges.from_array(ranges)
            if ranges.d != d:
                raise ValueError(f"ranges: has d={ranges.d} but x has d={d}; pass the ranges "
                                 f"of this embedding model")
        elif calibration is not None:
            ranges = QuantizationRanges.from_calibration(calibration, chunk_rows=rows)
            if ranges.d != d:
                raise ValueError(f"calibration: has d={ranges.d} but x has d={d}; calibrate "
                                 f"with embeddings of the same model")
        else:
            if n == 1:
                raise ValueError(f"ranges: cannot compute {precision} ranges from a single "
                                 f"row; pass ranges or calibration embeddings")
            if n < FEW_CALIBRATION_ROWS:
                log.warning("quantize: %s ranges from only %d rows of x; pass calibration "
                            "embeddings (or ranges) from more", precision, n)
            ranges = QuantizationRanges.from_calibration(x, chunk_rows=rows, name="x")
    if scalar:
        low, step = ranges.min, ranges.step
    for lo in range(0, n, rows):
        chunk = x[lo:lo + rows]
        if not np.isfinite(chunk).all():
            raise _row_error("x", chunk, lo)
        if scalar:
            # ST: np.clip(np.floor((x - starts) / steps), 0, 255), in the promoted dtype.
            t = np.subtract(chunk, low)
            t /= step
            np.floor(t, out=t)
            np.clip(t, 0, 255, out=t)
            code = t.astype(np.uint8)
        else:
            code = np.packbits(chunk > 0, axis=-1)
        if precision in ("int8", "binary"):
            code ^= 0x80  # u - 128 as int8, ST's (u - 128).astype(np.int8)
            code = code.view(np.int8)
        out[lo:lo + rows] = code
    log.info("quantize: %d rows of d=%d to %s", n, d, precision)
    return QuantizedCorpus(out, precision, d, ranges)
