"""Array libraries at the API boundary: which arguments live on a GPU, zero-copy CuPy views of
them, the few row operations the estimators do on a corpus, and results handed back in the
caller's library (as CuPy and cuML do): CuPy in, CuPy out; a torch CUDA tensor in, a torch CUDA
tensor out (through DLPack, no copy); any other ``__cuda_array_interface__`` or CUDA DLPack
object in, CuPy out; NumPy in, NumPy out.

A device corpus is never copied to the host: it is viewed as a CuPy array (no copy) and only
O(t) gathered rows come back. Small arrays (queries, answer lists, rankings: O(n_q d)) are moved
to the host. CuPy and torch are imported only when a device array is given, so the package
imports without them.
"""
from __future__ import annotations

import numpy as np

#: DLPack device types of CUDA memory: kDLCUDA, kDLCUDAManaged (what the CUDA backend reads).
_CUDA_DLPACK = (2, 13)


def _cupy():
    """The CuPy module (imported on first use; a device array cannot be read without it)."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError("a GPU array was given, and reading one needs CuPy: pip install "
                          "'nudgefast[cuda12]' or 'nudgefast[cuda13]' (or pass a host array)"
                          ) from exc
    return cupy


def _torch():
    import torch
    return torch


def _is_torch(x) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch" and hasattr(x, "is_cuda")


def is_device(x) -> bool:
    """Whether ``x`` lives in CUDA device memory: a CuPy array, a torch CUDA tensor, or any
    object with ``__cuda_array_interface__`` or a CUDA DLPack device. Reads no data."""
    if x is None or isinstance(x, (np.ndarray, list, tuple, str, bytes, int, float)):
        return False
    if _is_torch(x):
        return bool(x.is_cuda)
    try:
        if hasattr(x, "__cuda_array_interface__"):
            return True
    except Exception:  # a property that refuses to export (it is still device memory)
        return True
    device = getattr(x, "__dlpack_device__", None)
    if device is not None and hasattr(x, "__dlpack__"):
        try:
            return int(device()[0]) in _CUDA_DLPACK
        except Exception:
            return False
    return False


def device_view(x, name: str = "array"):
    """A CuPy array over the memory of device array ``x`` (the argument ``name``): no copy (a
    torch tensor is detached first; the view shares its memory). Raises when ``x`` is on
    another GPU than the current one, as the CUDA backend would in its corpus pass."""
    cp = _cupy()
    if isinstance(x, cp.ndarray):
        arr = x
    else:
        if _is_torch(x):
            x = x.detach()  # the same memory, without the autograd graph that blocks export
        try:
            has_cai = hasattr(x, "__cuda_array_interface__")
        except Exception:
            has_cai = False
        arr = cp.asarray(x) if has_cai else cp.from_dlpack(x)
    device = getattr(getattr(arr, "device", None), "id", None)
    if device is not None and device != cp.cuda.Device().id:
        raise ValueError(f"{name}: is on GPU {device} but the current device is "
                         f"{cp.cuda.Device().id}; use `with cupy.cuda.Device({device}):`")
    return arr


def torch_to_numpy(t) -> np.ndarray:
    """A host NumPy array of a torch tensor (CPU: a view; CUDA: one copy). bfloat16, which NumPy
    has no type for, is widened to float32."""
    t = t.detach()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return t.cpu().numpy()


def to_host(x, name: str = "array") -> np.ndarray:
    """A host copy of device array ``x``; for the small arguments only (queries, rankings)."""
    if _is_torch(x):
        return torch_to_numpy(x)
    return device_view(x, name).get()


def is_dask(x) -> bool:
    """Whether ``x`` is a ``dask.array.Array`` (by its type's name: imports nothing, reads no
    data). Such a corpus is read on its cluster (``nudgefast._dask``), never gathered here."""
    cls = type(x)
    return cls.__name__ == "Array" and cls.__module__.split(".", 1)[0] == "dask" \
        and hasattr(x, "chunks") and hasattr(x, "to_delayed")


def is_host(arr) -> bool:
    """Whether a validated array (see ``_validate.as_corpus``) is a host NumPy array / memmap,
    or a host view that reads as one (``HOST_ROWS``: a quantized corpus's dequantizing rows)."""
    return isinstance(arr, np.ndarray) or getattr(arr, "HOST_ROWS", False)


def xp(arr):
    """The array module of a validated array: NumPy for a host array, else CuPy."""
    return np if is_host(arr) else _cupy()


def take_rows(arr, rows) -> np.ndarray:
    """Rows ``rows`` of a validated (N, d) array as a host float64 (m, d) array. A device array
    is gathered on the device, a dask corpus (``_dask.DaskRows``) on its workers: only the m
    rows cross to the host, never the corpus."""
    rows = np.asarray(rows, dtype=np.int64)
    if getattr(arr, "DASK_ROWS", False):
        return arr.take(rows)
    if is_host(arr):
        return np.asarray(arr[rows], dtype=np.float64)
    cp = _cupy()
    return arr[cp.asarray(rows)].astype(np.float64).get()


def put_rows(arr, rows, values) -> None:
    """``arr[rows] = values`` (host ``rows``/``values``) where ``arr`` lives."""
    if is_host(arr):
        arr[rows] = values
        return
    cp = _cupy()
    if np.size(rows):
        arr[cp.asarray(np.asarray(rows, dtype=np.int64))] = cp.asarray(values)


def like(value, caller):
    """``value`` (a host NumPy array, or a CuPy array) in the array library of ``caller``:
    NumPy for a host caller; for a device caller CuPy, or a torch CUDA tensor when the caller
    is one (DLPack, no copy of a device ``value``)."""
    if not is_device(caller):
        return value if isinstance(value, np.ndarray) else to_host(value)
    if _is_torch(caller):
        if isinstance(value, np.ndarray):  # torch alone: a torch user need not have CuPy
            return _torch().as_tensor(value, device=caller.device)
        return _torch().from_dlpack(value)
    cp = _cupy()
    if isinstance(value, cp.ndarray):
        return value
    device = getattr(getattr(caller, "device", None), "id", None)
    if isinstance(device, int):  # the caller's GPU, not merely the current one
        with cp.cuda.Device(device):
            return cp.asarray(value)
    return cp.asarray(value)
