"""``nrt-mlx doctor``: what nrt-mlx will run on."""

from __future__ import annotations

import os
import platform
import sys


def _memory_gb() -> str:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return f"{pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        return "unknown"


def report() -> dict[str, str]:
    import mlx.core as mx
    import mlx_lm

    from nrt_mlx.blas import blas_in_use
    from nrt_mlx.heap import keep_freed_memory
    from nrt_mlx.model import backend

    out = {
        "platform": f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}",
        "mlx": f"{mx.__version__}, mlx-lm {mlx_lm.__version__}",
        "device": str(mx.default_device()),
        "backend": backend(),
        "blas": blas_in_use() if backend() == "cpu" else "not used (GPU matmuls)",
        "heap": (
            "freed memory kept for reuse (NRT_MLX_MALLOC=system: glibc's defaults)"
            if keep_freed_memory()
            else "the C library's defaults"
        ),
        "memory": _memory_gb(),
        "cpus": str(os.cpu_count()),
    }
    if backend() == "metal":
        info = mx.metal.device_info()
        out["gpu"] = (
            f"{info.get('device_name', '?')}, {info.get('memory_size', 0) / 2**30:.0f} GiB unified"
        )
    out["quantize auto"] = (
        "4-bit QLoRA" if backend() != "cpu" else "dense fp32 (CPU quantized matmul is slow)"
    )
    return out
