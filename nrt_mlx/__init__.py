"""nrt-mlx: Native Reasoning Training on MLX.

The system BLAS is loaded before anything imports ``mlx.core`` (see ``nrt_mlx.blas``).
"""

from nrt_mlx.blas import use_system_blas

use_system_blas()

__version__ = "0.2.0"  # the package version (pyproject.toml reads it from here)
