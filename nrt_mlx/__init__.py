"""nrt-mlx: Native Reasoning Training on MLX.

The system BLAS is loaded before anything imports ``mlx.core`` (see ``nrt_mlx.blas``), and on
Linux freed memory is kept for reuse (``nrt_mlx.heap``).
"""

from nrt_mlx.blas import use_system_blas
from nrt_mlx.heap import keep_freed_memory

use_system_blas()
keep_freed_memory()

__version__ = "0.2.0"  # the package version (pyproject.toml reads it from here)
