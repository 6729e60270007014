"""Rollout tokens/s of nrt-mlx's ``sample_traces`` against ``mlx_lm.batch_generate``, side by side.

    python scripts/bench_rollout.py [--model DIR] [--questions 2] [--samples 4] [--think 32]
                                    [--repeats 3] [--old /tmp/rollout_old.py]

Both generate ``samples`` continuations of each question's prompt with the same sampler settings
and the same token budget; ``batch_generate`` gets each prompt repeated ``samples`` times (what an
RL trainer built on mlx-lm does). They run alternately in one process, so a busy machine slows
both alike; the ratio is what to read, not the absolute rates. ``--old`` adds another
``rollout.py`` (e.g. a copy of an earlier version) as a third contender.

``rollout_throughput`` is the function other scripts (scripts/bench.py) call.

``--floor`` prints what bounds a decode step from below on this machine instead: the time to read
the model's weights once (numpy's sum over as many bytes: the memory bandwidth), one MLX matmul of
all of them at the batch's rows (the BLAS's best case, as if every linear were fused into one),
and the model's real decode step (mlx-lm's forward with a KV cache, which ``batch_generate`` and
the rollout both run). Each figure is the best of its repeats: other processes only slow it down.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bench_blas import best_seconds  # scripts/ is on sys.path when run as a script

import nrt_mlx  # noqa: F401  (loads the system BLAS: before mlx.core)

# isort: split
import mlx.core as mx
from mlx_lm.generate import batch_generate
from mlx_lm.sample_utils import make_sampler

from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.rollout import sample_traces
from nrt_mlx.vocab import Vocabulary

DEFAULT_MODEL = Path.home() / ".cache" / "nrt-mlx" / "SmolLM2-135M-Instruct-fp32"
DATA = Path(__file__).resolve().parent.parent / "recipes" / "data" / "train.jsonl"

# A contender: (prompts, cfg, key) -> (generated tokens, seconds).
Contender = Callable[[list[list[int]], RolloutConfig, mx.array], tuple[int, float]]


def nrt_contender(model, vocab: Vocabulary, sample: Callable = sample_traces) -> Contender:
    """``sample`` (``sample_traces`` of this or another rollout module) as a contender."""

    def run(prompts: list[list[int]], cfg: RolloutConfig, key: mx.array) -> tuple[int, float]:
        start = time.perf_counter()
        _, stats = sample(model, prompts, cfg, vocab, key)
        return stats.tokens, time.perf_counter() - start

    return run


def mlx_lm_contender(model, tokenizer) -> Contender:
    """``mlx_lm.batch_generate`` on every prompt repeated K times, all rows in one batch."""

    def run(prompts: list[list[int]], cfg: RolloutConfig, key: mx.array) -> tuple[int, float]:
        rows = [p for p in prompts for _ in range(cfg.samples)]
        mx.random.seed(int(mx.random.randint(0, 2**31 - 1, key=key).item()))
        start = time.perf_counter()
        out = batch_generate(
            model,
            tokenizer,
            rows,
            max_tokens=cfg.max_think_tokens,
            sampler=make_sampler(temp=cfg.temperature, top_p=cfg.top_p),
            completion_batch_size=len(rows),
            prefill_batch_size=len(rows),
        )
        # generation_tokens counts the stop token of a finished row, as RolloutStats does.
        return out.stats.generation_tokens, time.perf_counter() - start

    return run


def race(
    contenders: dict[str, Contender], prompts: list[list[int]], cfg: RolloutConfig, repeats: int
) -> dict[str, float]:
    """Median tokens/s of each contender over ``repeats`` rounds, run alternately in each round
    (after one warm-up round, which also compiles MLX's kernels)."""
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(repeats + 1):
        key = mx.random.key(r)
        for name, run in contenders.items():
            tokens, seconds = run(prompts, cfg, key)
            if r > 0:
                rates[name].append(tokens / seconds)
    return {name: statistics.median(v) for name, v in rates.items()}


def rollout_throughput(
    model,
    tokenizer,
    prompts: list[list[int]],
    samples: int,
    think: int,
    repeats: int = 3,
    temperature: float = 1.0,
    top_p: float = 1.0,
    extra: dict[str, Callable] | None = None,
) -> dict[str, float]:
    """Median rollout tokens/s of nrt-mlx (``"nrt"``) and of ``mlx_lm.batch_generate``
    (``"batch_generate"``) on ``prompts`` x ``samples`` continuations of up to ``think`` tokens,
    measured alternately in this process; ``extra`` adds other ``sample_traces`` functions by name.
    ``tokenizer`` is mlx-lm's TokenizerWrapper (``mlx_lm.load``)."""
    vocab = Vocabulary.of(tokenizer)
    cfg = RolloutConfig(
        samples=samples, max_think_tokens=think, temperature=temperature, top_p=top_p
    )
    contenders = {"nrt": nrt_contender(model, vocab)}
    for name, sample in (extra or {}).items():
        contenders[name] = nrt_contender(model, vocab, sample)
    contenders["batch_generate"] = mlx_lm_contender(model, tokenizer)
    return race(contenders, prompts, cfg, repeats)


def matmul(m: int, k: int, n: int) -> Callable[[], None]:
    """One fp32 [m, k] x [k, n] product in MLX (the weight stored [n, k], as nn.Linear's)."""
    x, w = mx.random.normal((m, k)), mx.random.normal((n, k))
    mx.eval(x, w)
    return lambda: mx.eval(x @ w.T)


def decode_floor(model, rows: int, context: int = 50) -> dict[str, float]:
    """Seconds of one decode step of ``rows`` rows after ``context`` cached positions, against
    the weights' read time and one matmul over all of them (see the module docstring)."""
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import make_prompt_cache

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    values = np.ones(weights // 4, dtype=np.float32)
    read = best_seconds(values.sum, 20)
    del values
    hidden = model.args.hidden_size
    gemm = best_seconds(matmul(rows, hidden, weights // 4 // hidden), 20)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.ones((rows, context), dtype=mx.int32), cache=cache))
    token = mx.ones((rows, 1), dtype=mx.int32)

    def step() -> None:
        for c in cache:  # every repeat decodes at the same position
            c.offset -= 1
        mx.eval(model(token, cache=cache))

    return {"weight_bytes": weights, "read": read, "gemm": gemm, "step": best_seconds(step, 20)}


def question_prompts(vocab: Vocabulary, count: int) -> list[list[int]]:
    """The first ``count`` questions of the bundled training data as chat prompts."""
    lines = DATA.read_text(encoding="utf-8").splitlines()[:count]
    return [vocab.encode_prompt(json.loads(line)["question"]) for line in lines]


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("rollout_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    import mlx_lm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--think", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--old", help="another rollout.py to race as 'old'")
    parser.add_argument("--floor", action="store_true", help="print a decode step's lower bounds")
    args = parser.parse_args()
    model, tokenizer = mlx_lm.load(args.model)
    if args.floor:
        rows = args.questions * args.samples
        f = decode_floor(model, rows)
        print(f"decode step of {rows} rows, {f['weight_bytes'] / 1e6:.0f} MB of weights:")
        print(f"  weights read once (numpy): {f['read'] * 1e3:6.1f} ms "
              f"({f['weight_bytes'] / f['read'] / 1e9:.1f} GB/s)")  # fmt: skip
        print(f"  one matmul over them all:  {f['gemm'] * 1e3:6.1f} ms")
        print(f"  mlx-lm decode step:        {f['step'] * 1e3:6.1f} ms")
        print(f"  twice batch_generate's tokens/s needs a step of {f['step'] / 2 * 1e3:.1f} ms")
        return
    prompts = question_prompts(Vocabulary.of(tokenizer), args.questions)
    extra = {"old": load_module(args.old).sample_traces} if args.old else None
    rates = rollout_throughput(
        model,
        tokenizer,
        prompts,
        args.samples,
        args.think,
        args.repeats,
        args.temperature,
        args.top_p,
        extra,
    )
    base = rates["batch_generate"]
    print(
        f"{args.questions} questions x K={args.samples} x think {args.think}, "
        f"median of {args.repeats}, tokens/s relative to mlx_lm.batch_generate:"
    )
    for name, rate in rates.items():
        print(f"  {name:16s} {rate / base:5.2f}x")


if __name__ == "__main__":
    main()
