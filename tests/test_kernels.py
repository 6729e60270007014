"""The CPU kernels (nrt_mlx/kernels.py) and the heap setting (nrt_mlx/heap.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from nrt_mlx import kernels
from nrt_mlx.model import load_model
from nrt_mlx.recipe import ModelConfig


def test_exp_is_within_4e7_of_float64_over_the_float32_range() -> None:
    x = np.linspace(-87.0, 88.0, 200_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    got = np.array(kernels.exp(mx.array(x))).astype(np.float64)
    assert np.max(np.abs(got - want) / want) < 4e-7
    # mx.exp's own error, for scale: the kernel is not less exact than what it replaces.
    assert np.max(np.abs(np.array(mx.exp(mx.array(x))) - want) / want) > 1e-6


def test_exp_clips_instead_of_overflowing() -> None:
    got = np.array(kernels.exp(mx.array([-1e4, -100.0, 100.0, 1e4])))
    assert np.all(np.isfinite(got)) and np.all(got >= 0)
    assert got[0] < 1e-37 and got[3] > 1e38


def test_swiglu_value_and_gradient_equal_mlx_lm() -> None:
    rng = np.random.default_rng(0)
    gate, up, cot = (mx.array(rng.normal(0, 4, (3, 5, 64)).astype(np.float32)) for _ in range(3))
    (want,), want_grads = mx.vjp(mlx_lm_swiglu, [gate, up], [cot])
    (got,), got_grads = mx.vjp(kernels.swiglu, [gate, up], [cot])
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(np.array(g), np.array(w), rtol=1e-4, atol=1e-5)


class _Scaled(nn.Module):
    """A gated MLP with one more child: not the computation SwiGLU makes."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.scale = nn.Linear(1, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return 2 * self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


def test_fast_mlps_keep_the_model_its_names_and_its_outputs(tiny_model_dir: Path) -> None:
    model, _ = load(str(tiny_model_dir))
    tokens = mx.array([[1, 5, 9, 13, 2, 7]])
    plain = model(tokens)
    other = model.layers[1].mlp = _Scaled(model.layers[1].mlp)
    names = sorted(k for k, _ in tree_flatten(model.parameters()))
    want = model(tokens)
    assert not np.allclose(np.array(want), np.array(plain), atol=1e-3)
    assert kernels.fast_mlps(model) == len(model.layers) - 1  # not the one that differs
    assert model.layers[1].mlp is other
    assert all(type(layer.mlp) is kernels.SwiGLU for i, layer in enumerate(model.layers) if i != 1)
    np.testing.assert_allclose(np.array(model(tokens)), np.array(want), rtol=1e-4, atol=1e-5)
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == names
    assert kernels.fast_mlps(model) == 0  # already done


def test_loaded_models_use_the_kernel_on_the_cpu(tiny_model_dir: Path) -> None:
    loaded = load_model(ModelConfig(path=str(tiny_model_dir)))
    assert all(type(layer.mlp) is kernels.SwiGLU for layer in loaded.model.layers)


# ---- heap ---------------------------------------------------------------------------------------

_FAULTS = """
import resource, sys
import nrt_mlx
import mlx.core as mx
x = mx.random.normal((16_000_000,))
mx.eval(x * 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    mx.eval(x * 2)  # a new 64 MB array each time
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, nrt_mlx.heap.keep_freed_memory())
"""


def _python(args: list[str], malloc: str | None) -> str:
    """stdout of this Python run with ``args``, NRT_MLX_MALLOC set to ``malloc`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "NRT_MLX_MALLOC"}
    if malloc is not None:
        env["NRT_MLX_MALLOC"] = malloc
    run = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, check=True
    )
    return run.stdout


def _faults(setting: str | None) -> tuple[int, str]:
    faults, kept = _python(["-c", _FAULTS], setting).split()
    return int(faults), kept


def test_freed_memory_is_reused_without_page_faults() -> None:
    kept, flag = _faults(None)
    system, system_flag = _faults("system")
    assert (flag, system_flag) == ("True", "False")
    # glibc maps every block above 32 MB afresh: ~16,000 page faults per 64 MB result.
    assert system > 3 * 12_000 and kept < 1_000, (kept, system)


def test_doctor_reports_the_heap_setting() -> None:
    lines = {}
    for setting in (None, "system"):
        out = _python(["-m", "nrt_mlx.cli", "doctor"], setting)
        lines[setting] = next(line for line in out.splitlines() if line.strip().startswith("heap:"))
    assert "kept for reuse" in lines[None]
    assert "defaults" in lines["system"] and "kept" not in lines["system"]
