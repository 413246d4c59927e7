"""Every input check in one place. Errors name the argument, what was wrong and the fix.

Checks here are cheap (shapes, dtypes, the small query matrices). The corpus is only checked
for shape and dtype here: its values (NaN/inf, zero rows) are checked inside the one streaming
pass that reads it anyway, so validation never costs a second pass over 10^8 rows.
"""
from __future__ import annotations

import numpy as np

from . import _arrays, _backends

CORPUS_DTYPES = (np.float16, np.float32, np.float64)
#: More threads than this is a mistake (no machine has that many cores), not a request.
MAX_THREADS = 1 << 12


def device_array_error(name: str, backend: str | None = None) -> TypeError:
    """The one error for a GPU array where a host array is needed: ``backend`` is the CPU
    backend it was given to (None: the function takes host arrays only)."""
    fix = f"a host copy ({name}.get() for CuPy, {name}.cpu().numpy() for torch)"
    if backend is None:
        return TypeError(f"{name}: a GPU array was given to a function that takes host arrays "
                         f"only; pass {fix}")
    return TypeError(f"{name}: a GPU array was given to a CPU backend (backend={backend!r}); "
                     f"use backend='cuda' (or 'auto'), which reads it in place, or pass {fix}")


def _host_array(name: str, value, allow_device: bool = False):
    """NumPy view of a host array-like; a CPU torch tensor (with grad, or bfloat16) is taken
    through ``detach()`` (and ``float()`` for bfloat16, which NumPy has no type for). A device
    array is copied to the host: only the small arguments (queries, rankings) come here; a
    corpus goes through :func:`as_corpus`, which never copies one."""
    if isinstance(value, np.ndarray):
        return value
    if _arrays.is_device(value):
        if not allow_device:  # an O(N) argument: never copied to the host behind the caller's back
            raise device_array_error(name)
        return _arrays.to_host(value, name)
    if _arrays._is_torch(value):
        return _arrays.torch_to_numpy(value)
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: expected a 2-D array, got {type(value).__name__}")
    try:
        return np.asarray(value)
    except Exception as exc:
        raise TypeError(f"{name}: expected a 2-D NumPy array (or np.memmap), got "
                        f"{type(value).__name__}") from exc


def as_size(name: str, value, *, allow_none: bool = True, upper: int | None = None):
    """A positive int size argument (chunk rows, block sizes, threads), or None when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: must be a positive int{' or None' if allow_none else ''}, got "
                        f"{value!r} ({type(value).__name__})")
    value = int(value)
    if value < 1 or (upper is not None and value > upper):
        bound = f"in [1, {upper}]" if upper is not None else ">= 1"
        raise ValueError(f"{name}: must be an int {bound}, got {value}"
                         + ("; leave it None for the default" if allow_none else ""))
    return value


def as_threads(name: str, value):
    """``n_threads``: None (all cores) or an int in [1, MAX_THREADS]."""
    return as_size(name, value, upper=MAX_THREADS)


def as_gammas(name: str, gammas) -> np.ndarray:
    """A NUDGE-N gamma grid: a non-empty 1-D list of finite values in [0, 4)."""
    try:
        arr = np.asarray(gammas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: expected a 1-D list of numbers, got {gammas!r}") from exc
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all() or np.any(arr < 0) \
            or np.any(arr >= 4):
        raise ValueError(f"{name}: must be a non-empty 1-D list of finite values in [0, 4) "
                         f"(the sphere step needs gamma < 4), got {gammas!r}")
    return arr


def as_step(name: str, value) -> float:
    """A fixed NUDGE-M step: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def as_corpus(name: str, corpus, backend: str | None = None):
    """A 2-D float16/32/64 array view of ``corpus``, never a copy: a NumPy view of an ndarray
    or memmap, or, when ``backend`` (a resolved name) reads device arrays, a CuPy view of a
    device array (CuPy, torch CUDA tensor, ``__cuda_array_interface__`` / DLPack object).
    A device array for a CPU backend (or ``backend=None``: host arrays only) is a TypeError
    naming the fix."""
    as_float32 = f"{name}.float()" if _arrays._is_torch(corpus) else f"{name}.astype(np.float32)"
    if _arrays.is_dask(corpus):
        # np.asarray would gather the whole corpus into this process, which a cluster exists
        # to avoid; the functions that read it on its workers check for it before this.
        raise TypeError(f"{name}: a dask array is read on its cluster by search, NudgeN.fit, "
                        f"NudgeM.fit and NudgeResult.apply only; here it would be gathered "
                        f"into this process: pass {name}.compute() if it fits in memory")
    if _arrays.is_device(corpus):
        if backend is None or not _backends.on_device(backend):
            raise device_array_error(name, backend)
        try:
            corpus = _arrays.device_view(corpus, name)
        except ImportError:
            raise
        except ValueError as exc:
            if str(exc).startswith(f"{name}:"):
                raise
            raise ValueError(f"{name}: could not be read as a GPU array ({exc}); pass a float32 "
                             f"or float16 CuPy array or torch CUDA tensor") from exc
        except Exception as exc:  # e.g. a dtype CuPy has no type for (torch.bfloat16)
            raise TypeError(f"{name}: could not be read as a GPU array ({type(exc).__name__}: "
                            f"{exc}); pass a float32 or float16 CuPy array or torch CUDA "
                            f"tensor (e.g. {name}.float())") from exc
    else:
        corpus = _host_array(name, corpus)
    if corpus.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (N, d), got {corpus.ndim}-D "
                         f"shape {tuple(corpus.shape)}; reshape it to (N, d)")
    if corpus.dtype.type not in CORPUS_DTYPES:
        raise TypeError(f"{name}: dtype {corpus.dtype} is not supported; use float32 or float16 "
                        f"(e.g. {as_float32})")
    if corpus.shape[0] == 0 or corpus.shape[1] == 0:
        raise ValueError(f"{name}: is empty (shape {tuple(corpus.shape)}); pass at least one "
                         f"record with d >= 1")
    return corpus


def as_queries(name: str, queries, d: int | None = None, dtype=np.float32,
               what: str = "query") -> np.ndarray:
    """A C-contiguous copy of a query matrix in ``dtype``, checked for shape and values;
    ``what``: what a row is, for the messages (a corrector's pairs are records)."""
    arr = _host_array(name, queries, allow_device=True)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array of shape (n, d), got {arr.ndim}-D shape "
                         f"{arr.shape}; reshape it (one row per query)")
    if arr.dtype.kind != "f":
        raise TypeError(f"{name}: dtype {arr.dtype} is not a float type; pass float32 embeddings "
                        f"(e.g. {name}.astype(np.float32))")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name}: has d={arr.shape[1]} but the corpus has d={d}; embed queries "
                         f"and corpus with the same model")
    out = np.array(arr, dtype=dtype, order="C", copy=True)
    if not np.isfinite(out).all():
        row = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
        raise ValueError(f"{name}: row {row} contains NaN or inf; drop or re-embed that {what}")
    if out.shape[0] and (norms := np.linalg.norm(out.astype(np.float64), axis=1)).min() == 0:
        row = int(np.flatnonzero(norms == 0)[0])
        raise ValueError(f"{name}: row {row} is a zero vector; drop or re-embed that {what}")
    return out


def as_k(name: str, k, n_records: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"{name}: must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"{name}: must be >= 1, got {k}")
    if k > n_records:
        raise ValueError(f"{name}={k} exceeds the number of records N={n_records}; use k <= N")
    return k


def corpus_row_error(name: str, corpus, row: int, normalize: bool) -> ValueError:
    """The error for a corpus row the streaming pass flagged (NaN/inf, or zero norm); a
    device corpus has that one row read back; a corrected view (``stored_row``: the stale row
    it corrects) is judged by its stored row."""
    if hasattr(corpus, "stored_row"):
        return row_error(name, row, corpus.stored_row(row), normalize)
    return row_error(name, row, _arrays.take_rows(corpus, [row])[0], normalize)


def row_error(name: str, row: int, values, normalize: bool) -> ValueError:
    """:func:`corpus_row_error` for a row whose ``values`` are at hand (a worker that holds
    the row's block: ``row`` is its global index)."""
    if not np.isfinite(values).all():
        return ValueError(f"{name}: row {row} contains NaN or inf; fix or drop that record "
                          f"before tuning")
    what = "a zero vector" if normalize else "not finite"
    return ValueError(f"{name}: row {row} is {what}; cosine similarity is undefined for it, "
                      f"drop that record or give it a real embedding")
