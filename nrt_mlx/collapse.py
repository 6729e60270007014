"""Policy-collapse monitor: warns once per symptom when the traces shrink, freeze or repeat.

NRT's known failure (docs/NRT.md, "Watching for collapse"): with the wrong aggregator the reasoning
entropy falls to zero and the traces turn short and repetitive while the reward still looks fine.
The monitor watches four figures of the step metrics (computed by ``nrt_mlx.stats.trace_stats``):

    trace_tokens_mean   mean sampled trace length          warns below fraction x its start
    trace_entropy       mean per-token entropy on traces   warns below fraction x its start
    distinct_2          distinct bigrams / all bigrams     warns below min_distinct (repetition)
    marker_rate         share of traces that emit m        warns below fraction x its start

"Its start" is the mean of the first ``window`` steps that report the figure, and "now" is the mean
of the last ``window`` steps, so a single noisy step neither sets the baseline nor raises a warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from nrt_mlx.errors import NrtError

# Warnings that mean the policy collapsed (``CollapseMonitor.collapsed``); a falling marker rate is
# a format problem, worth a warning but not a reason to stop the run.
COLLAPSE_KINDS = ("length", "entropy", "repetition")

_REMEDY = (
    "if the run uses objective.aggregator arithmetic_mean, prob or log_prob, try "
    "weighted_sum_log_prob; otherwise lower optimizer.learning_rate or resume from an earlier "
    "checkpoint (train.collapse_stop: true stops the run here)"
)


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing / non-numeric / NaN value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


class CollapseMonitor:
    """Watches step metrics for policy collapse; each kind of warning is given once.

    ``fraction``: trace length, trace entropy and marker rate warn when their recent mean falls
    below ``fraction`` times their starting mean. ``window``: steps in the starting and the recent
    mean. ``min_distinct``: distinct-2 of the traces below this (having started above it) warns.
    """

    def __init__(self, fraction: float = 0.3, window: int = 3, min_distinct: float = 0.2) -> None:
        if not 0 < fraction < 1:
            raise NrtError(f"the collapse fraction must be in (0, 1), got {fraction}")
        if window < 1:
            raise NrtError(f"the collapse window must be at least 1 step, got {window}")
        if not 0 <= min_distinct <= 1:
            raise NrtError(f"min_distinct must be in [0, 1], got {min_distinct}")
        self.fraction = fraction
        self.window = window
        self.min_distinct = min_distinct
        self.history: dict[str, list[float]] = {}
        self.warned: dict[str, int] = {}  # kind -> step of its warning

    @property
    def collapsed(self) -> bool:
        """True once trace length, entropy or repetition has warned."""
        return any(kind in self.warned for kind in COLLAPSE_KINDS)

    def replay(self, records: Iterable[dict]) -> None:
        """Feed earlier metrics (e.g. metrics.jsonl of a resumed run) without returning warnings."""
        for record in records:
            if "step" in record:
                self.update(int(record["step"]), record)

    def update(self, step: int, metrics: dict) -> list[str]:
        """Record one step's metrics; returns the warnings raised by this step (usually none)."""
        for key in ("trace_tokens_mean", "trace_entropy", "distinct_2", "marker_rate"):
            value = _number(metrics.get(key))
            if value is not None:
                self.history.setdefault(key, []).append(value)
        found = [
            self._fallen("length", step, "trace_tokens_mean", "mean trace length", "{:.1f} tokens"),
            self._fallen("entropy", step, "trace_entropy", "trace entropy", "{:.3f} nats/token"),
            self._repetitive(step),
            self._fallen("marker", step, "marker_rate", "marker rate", "{:.0%}"),
        ]
        return [message for message in found if message]

    def _start_and_now(self, key: str) -> tuple[float, float] | None:
        """(mean of the first ``window`` values, mean of the last ``window``), once both exist."""
        values = self.history.get(key, [])
        if len(values) <= self.window:
            return None
        return _mean(values[: self.window]), _mean(values[-self.window :])

    def _fallen(self, kind: str, step: int, key: str, label: str, fmt: str) -> str | None:
        pair = self._start_and_now(key)
        if kind in self.warned or pair is None:
            return None
        start, now = pair
        if start <= 0 or now >= self.fraction * start:
            return None
        self.warned[kind] = step
        fell = (
            f"step {step}: {label} fell to {fmt.format(now)}, {now / start:.0%} of its starting "
            f"{fmt.format(start)} (threshold {self.fraction:.0%})"
        )
        if kind == "marker":
            return (
                f"{fell}: the model stops writing the answer marker, so traces run to the think "
                f"limit; raise objective.format_coef or rollout.max_think_tokens"
            )
        symptom = "traces shrink" if kind == "length" else "the traces turn deterministic"
        return f"{fell}: possible policy collapse ({symptom} while the reward may look fine); {_REMEDY}"

    def _repetitive(self, step: int) -> str | None:
        pair = self._start_and_now("distinct_2")
        if "repetition" in self.warned or pair is None:
            return None
        start, now = pair
        # Only a fall counts: a base model that repeats itself from step 1 has not collapsed.
        if start < self.min_distinct or now >= self.min_distinct:
            return None
        self.warned["repetition"] = step
        return (
            f"step {step}: traces turned repetitive: distinct-2 fell to {now:.2f} from {start:.2f} "
            f"(threshold {self.min_distinct:.2f}): possible policy collapse; {_REMEDY}"
        )
