"""Side-by-side: MLX's CPU matmul with the bundled BLAS and with the system OpenBLAS nrt-mlx loads.

    python scripts/bench_blas.py [--size 1024] [--repeats 5]

Each variant runs in its own process (the BLAS is chosen before ``mlx.core`` loads), alternating,
and the script prints the median seconds per fp32 matmul of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

CHILD = r"""
import json, sys, time
import nrt_mlx  # loads the system BLAS unless NRT_MLX_BLAS=0
from nrt_mlx.blas import blas_in_use
import mlx.core as mx
n, reps = int(sys.argv[1]), int(sys.argv[2])
a = mx.random.normal((n, n)); mx.eval(a)
mx.eval(a @ a)  # warm-up
times = []
for _ in range(reps):
    t = time.perf_counter(); mx.eval(a @ a); times.append(time.perf_counter() - t)
print(json.dumps({"blas": blas_in_use(), "times": times}))
"""


def run(size: int, repeats: int, system_blas: bool) -> dict:
    env = dict(os.environ)
    env["NRT_MLX_BLAS"] = env.get("NRT_MLX_BLAS", "") if system_blas else "0"
    if env["NRT_MLX_BLAS"] == "":
        env.pop("NRT_MLX_BLAS")
    return child_json([CHILD, str(size), str(repeats)], env)


def best_seconds(run: Callable[[], object], repeats: int = 10, seconds: float = 0.0) -> float:
    """The fastest of at least ``repeats`` calls of ``run`` (and of at least ``seconds`` of them),
    after one warm-up call. The best, not the median: other processes only ever slow a call down."""
    run()
    times: list[float] = []
    while sum(times) < seconds or len(times) < repeats:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def child_json(args: list[str], env: dict[str, str]) -> dict:
    """The JSON record a ``python -c`` child prints last (also used by bench_kernels.py)."""
    out = subprocess.run(
        [sys.executable, "-c", *args], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[bool, list[float]] = {True: [], False: []}
    names = {}
    for _ in range(args.rounds):
        for system in (False, True):
            r = run(args.size, args.repeats, system)
            results[system] += r["times"]
            names[system] = r["blas"]
    bundled, system = statistics.median(results[False]), statistics.median(results[True])
    print(f"fp32 matmul {args.size}x{args.size}, median of {len(results[True])} each")
    print(f"  {names[False]}: {bundled * 1e3:.1f} ms")
    print(f"  {names[True]}: {system * 1e3:.1f} ms")
    print(f"  speed-up: {bundled / system:.1f}x")


if __name__ == "__main__":
    main()
