"""Use a real BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel links a bundled reference (netlib) BLAS, ~40x slower than OpenBLAS on a
1024x1024 matmul (docs/CPU.md). Loading the system OpenBLAS with ``RTLD_GLOBAL`` before
``mlx.core`` is imported puts its ``sgemm_`` ahead of the bundled one in the global symbol scope, so
MLX calls it: the same effect as ``LD_PRELOAD`` without re-executing the process.

``NRT_MLX_BLAS=0`` turns this off; ``NRT_MLX_BLAS=/path/to/libblas.so.3`` picks a library.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import sys

# Debian/Ubuntu multiarch locations of libopenblas0-pthread / -openmp / -serial, best first.
_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/openblas-serial/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

_loaded: str | None = None


def find_system_blas() -> str | None:
    """Path of an installed OpenBLAS that exports the reference BLAS symbols, or None."""
    choice = os.environ.get("NRT_MLX_BLAS", "")
    if choice == "0":
        return None
    if choice and os.path.exists(choice):
        return choice
    arch = platform.machine()
    for pattern in _CANDIDATES:
        for path in glob.glob(pattern.format(arch=arch)):
            return path
    return None


def use_system_blas() -> str | None:
    """Load the system BLAS globally if we are on Linux and MLX is not imported yet.

    Returns the path in use (also when it was preloaded by ``LD_PRELOAD``), else None.
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    preload = os.environ.get("LD_PRELOAD", "")
    if "blas" in preload:
        _loaded = preload
        return _loaded
    if sys.platform != "linux" or "mlx.core" in sys.modules:
        return None
    path = find_system_blas()
    if path is None:
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    _loaded = path
    return path


def blas_in_use() -> str:
    """A one-line description of the BLAS behind MLX's CPU matmuls, for ``nrt-mlx doctor``."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _loaded:
        return f"system OpenBLAS ({_loaded})"
    return "bundled reference BLAS (slow: apt-get install libopenblas0-pthread)"
