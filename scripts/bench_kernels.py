"""The CPU kernels and the heap setting against what they replace, side by side in one run.

    python scripts/bench_kernels.py [--repeats 20]

Prints, for the shapes of the issue-11 workload (SmolLM2-135M, 8 rows x 33 tokens):

- ``exp``: ``mx.exp`` against ``nrt_mlx.kernels.exp`` (and numpy's, for scale), ns per element;
- SwiGLU forward and forward + backward: mlx-lm's ``swiglu`` against ``kernels.swiglu``;
- one SmolLM2 layer's forward with mlx-lm's MLP and with ``kernels.SwiGLU``;
- a 52 MB elementwise product (the size of the think pass's logits) with glibc's default heap
  and with ``nrt_mlx.heap`` (each in its own process): ms and page faults per product.

Timings alternate between the contenders; read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import nrt_mlx  # noqa: F401  (system BLAS and heap setting before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
from bench_blas import child_json  # scripts/ is on sys.path when run as a script
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu

from nrt_mlx import kernels

MODEL = Path.home() / ".cache" / "nrt-mlx" / "SmolLM2-135M-Instruct-fp32"

_HEAP_CHILD = """
import json, resource, time
import nrt_mlx, mlx.core as mx
x = mx.random.normal((8, 33, 49152))
mx.eval(x * 2)
faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
for _ in range({n}):
    mx.eval(x * 1.5)
print(json.dumps({{"ms": (time.perf_counter() - start) / {n} * 1e3,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / {n}}}))
"""


def race(contenders: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms per call of each contender, calls alternating."""
    for f in contenders.values():
        mx.eval(f())
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for name, f in contenders.items():
            start = time.perf_counter()
            mx.eval(f())
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def heap(setting: str | None, n: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "NRT_MLX_MALLOC"}
    if setting:
        env["NRT_MLX_MALLOC"] = setting
    return child_json([_HEAP_CHILD.format(n=n)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    n = args.repeats
    rng = np.random.default_rng(0)
    shape = (8, 33, 1536)  # the MLP's activation for 8 rows x 33 tokens
    gate, up, cot = (mx.array(rng.normal(0, 3, shape).astype(np.float32)) for _ in range(3))
    size = gate.size
    x = np.array(gate)

    print(f"# CPU kernels, {shape} float32 ({size:,} values), median of {n} alternated calls\n")
    t = race({"mx.exp": lambda: mx.exp(gate), "kernels.exp": lambda: kernels.exp(gate)}, n)
    start = time.perf_counter()
    for _ in range(n):
        np.exp(x)
    numpy_ms = (time.perf_counter() - start) / n * 1e3
    print("| exp | ms | ns/value |\n|---|---|---|")
    for name, ms in [*t.items(), ("numpy.exp", numpy_ms)]:
        print(f"| {name} | {ms:.2f} | {ms * 1e6 / size:.2f} |")
    print(f"\nkernels.exp is {t['mx.exp'] / t['kernels.exp']:.1f}x mx.exp\n")

    def vjp(f: Callable) -> Callable[[], object]:
        return lambda: mx.vjp(f, [gate, up], [cot])

    t = race(
        {
            "mlx-lm swiglu": lambda: mlx_lm_swiglu(gate, up),
            "kernels.swiglu": lambda: kernels.swiglu(gate, up),
            "mlx-lm swiglu, value and gradient": vjp(mlx_lm_swiglu),
            "kernels.swiglu, value and gradient": vjp(kernels.swiglu),
        },
        n,
    )
    print("| SwiGLU | ms |\n|---|---|")
    for name, ms in t.items():
        print(f"| {name} | {ms:.2f} |")

    if MODEL.exists():
        from mlx_lm import load

        model, _ = load(str(MODEL))
        layer = model.model.layers[0]
        h_dim = layer.mlp.gate_proj.weight.shape[1]
        h = mx.array(rng.normal(0, 1, (8, 33, h_dim)).astype(np.float32))
        plain = layer.mlp
        fast = kernels.SwiGLU(plain)

        def run(mlp: object) -> Callable[[], object]:
            def f() -> object:
                layer.mlp = mlp
                return layer(h, mask="causal")

            return f

        t = race({"mlx-lm MLP": run(plain), "kernels.SwiGLU": run(fast)}, n)
        layer.mlp = plain
        print(f"\n| SmolLM2 layer forward, [8, 33, {h_dim}] | ms |\n|---|---|")
        for name, ms in t.items():
            print(f"| {name} | {ms:.2f} |")
    else:
        print(
            f"\n(no {MODEL}: the layer comparison needs SmolLM2; `nrt-mlx quickstart` fetches it)"
        )

    print("\n| 52 MB product (8 x 33 x 49152 float32) | ms | page faults |\n|---|---|---|")
    for label, setting in [("glibc default", "system"), ("nrt_mlx.heap", None)]:
        r = heap(setting, n)
        print(f"| {label} | {r['ms']:.1f} | {r['faults']:.0f} |")


if __name__ == "__main__":
    main()
