"""Figures of a set of sampled traces, the same for training steps, evaluation and the collapse
monitor: length, marker rate, entropy per think token, distinct-2, and the trace reward's spread.

These are what show policy collapse (docs/NRT.md, "Watching for collapse"): traces that shrink,
turn deterministic or repeat themselves while the reward still looks fine.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nrt_mlx.errors import NrtError
from nrt_mlx.rollout import Trace


def distinct_n(traces: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n over all traces together: |set of n-grams| / number of n-grams.

    1.0 means no n-gram repeats anywhere; values near 0 mean the traces repeat the same few n-grams
    (within a trace or across traces). With no n-gram at all (every trace shorter than n) nothing
    repeats, so the result is 1.0; short traces are the length figure's business.
    """
    if n < 1:
        raise NrtError(f"distinct_n needs n >= 1, got {n}")
    seen: set[tuple[int, ...]] = set()
    total = 0
    for trace in traces:
        ids = tuple(trace)
        for i in range(len(ids) - n + 1):
            seen.add(ids[i : i + n])
            total += 1
    return len(seen) / total if total else 1.0


def trace_stats(
    traces: Sequence[Trace],
    think_entropy: float | None = None,
    think_tokens: int | None = None,
    rewards: Sequence[float] | None = None,
) -> dict[str, float]:
    """trace_tokens_mean/min/max, marker_rate and distinct_2 of ``traces``; trace_entropy (nats per
    think token) from the summed entropy over the ``think_tokens`` scored; reward_mean and
    reward_std (population std over the traces) from their trace rewards."""
    lengths = [len(t.tokens) for t in traces]
    out: dict[str, float] = {}
    if rewards is not None:
        out["reward_mean"] = float(np.mean(rewards))
        out["reward_std"] = float(np.std(rewards))
    out |= {
        "trace_tokens_mean": float(np.mean(lengths)),
        "trace_tokens_min": int(np.min(lengths)),
        "trace_tokens_max": int(np.max(lengths)),
        "marker_rate": float(np.mean([t.emitted_marker for t in traces])),
        "distinct_2": distinct_n([t.tokens for t in traces], 2),
    }
    if think_entropy is not None:
        out["trace_entropy"] = think_entropy / think_tokens if think_tokens else 0.0
    return out
