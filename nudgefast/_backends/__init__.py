"""The backend registry: one table from name to module, availability and the reason why not.

Every backend module implements the same ops with the same signatures (see
``numpy_backend``'s docstring for the contract). The estimators only call ops; they never
branch on the backend.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

#: Every backend, fastest first.
KNOWN = ("cuda", "cpp", "numba", "numpy")
#: The order ``backend="auto"`` tries: cuda where CuPy sees a CUDA device (its import fails
#: otherwise, with the reason), so without a device ``auto`` is cpp > numba > numpy.
AUTO_ORDER = ("cuda", "cpp", "numba", "numpy")
#: The backends that read device arrays (CuPy, torch CUDA tensors, ``__cuda_array_interface__``
#: / DLPack objects) in place; every other backend takes host arrays only.
DEVICE = ("cuda",)

_MODULES = {
    "cuda": "nudgefast._backends.cuda_backend",
    "numpy": "nudgefast._backends.numpy_backend",
    "numba": "nudgefast._backends.numba_backend",
    "cpp": "nudgefast._backends.cpp_backend",
}

_INSTALL_HINT = {
    "cuda": "install CuPy for your CUDA (pip install 'nudgefast[cuda12]' or "
            "'nudgefast[cuda13]') on a machine with an NVIDIA GPU",
    "numpy": "pip install numpy",
    "numba": "pip install numba",
    "cpp": "reinstall nudgefast from source so the extension builds: pip install . "
           "(needs a C++17 compiler with OpenMP)",
}


@dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can be used here and, if not, why and how to fix it."""

    name: str
    available: bool
    reason: str


_cache: dict[str, tuple[ModuleType | None, str]] = {}


def _shadowed_extension() -> str | None:
    """When the imported nudgefast is a source checkout without the compiled extension while
    an installed copy has it (``python -m nudgefast`` or ``import nudgefast`` run inside the
    checkout: the working directory comes first on sys.path), say so and how to fix it."""
    here = Path(__file__).resolve().parents[1]
    if not (here.parent / "setup.py").is_file() or any(here.glob("_cpu*.so")) \
            or any(here.glob("_cpu*.pyd")):
        return None
    try:
        from importlib.metadata import distribution
        installed = Path(distribution("nudgefast").locate_file("nudgefast")).resolve()
    except Exception:  # not installed at all
        return None
    if installed == here or not (any(installed.glob("_cpu*.so"))
                                 or any(installed.glob("_cpu*.pyd"))):
        return None
    return (f"the nudgefast imported here is the source folder {here}, which has no compiled "
            f"extension and shadows the installed package at {installed}, which has it "
            f"(Python puts the working directory first on sys.path); fix: run from outside "
            f"the source folder (the `nudgefast` command works anywhere), or build the "
            f"extension in place with pip install -e .")


def _load(name: str) -> tuple[ModuleType | None, str]:
    if name not in _cache:
        try:
            module = importlib.import_module(_MODULES[name])
            _cache[name] = (module, "available")
        except Exception as exc:  # ImportError, or a broken compiled module
            shadow = _shadowed_extension() if name == "cpp" else None
            if name == "cpp" and "NUDGEFAST_CPU_ISA" in str(exc):
                # The build is fine; the environment asks for a level this CPU cannot run, and
                # the message already names the variable and the allowed values.
                _cache[name] = (None, f"{type(exc).__name__}: {exc}")
                return _cache[name]
            fix = shadow or f"fix: {_INSTALL_HINT[name]}"
            _cache[name] = (None, f"{type(exc).__name__}: {exc}; {fix}")
    return _cache[name]


def backends() -> dict[str, BackendInfo]:
    """Every known backend, fastest first, with availability and the reason when missing."""
    out = {}
    for name in KNOWN:
        module, reason = _load(name)
        out[name] = BackendInfo(name, module is not None, reason)
    return out


def on_device(name: str) -> bool:
    """Whether backend ``name`` (resolved) takes device arrays."""
    return name in DEVICE


def resolve(name: str = "auto", *, device_input: str | None = None) -> str:
    """The backend name ``name`` stands for (``"auto"``: the fastest available); raises,
    with the reason and the fix, when it is unknown or not available here.

    device_input: the name of an argument that is a device array; ``"auto"`` then means the
    GPU backend (an error when it is not available: the array cannot be read here).
    """
    if name == "auto" and device_input is not None:
        for candidate in DEVICE:
            module, reason = _load(candidate)
            if module is not None:
                return candidate
        raise RuntimeError(f"{device_input}: is a GPU array but no GPU backend is available "
                           f"here ({reason}); pass a host array (.get() for CuPy, "
                           f".cpu().numpy() for torch) or fix the cuda backend")
    if name == "auto":
        tried = []
        for candidate in AUTO_ORDER:
            module, reason = _load(candidate)
            if module is not None:
                return candidate
            tried.append(f"{candidate}: {reason}")
        raise RuntimeError("no nudgefast backend is available; tried " + "; ".join(tried))
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is not known; choose one of "
                         f"{['auto', *KNOWN]}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend={name!r} is not available here: {reason}")
    return name


def get(name: str = "auto") -> ModuleType:
    """The backend module for ``name`` (``"auto"``: the fastest available)."""
    return _load(resolve(name))[0]
