"""Policy-collapse monitor: warns once per symptom when the traces shrink, freeze or repeat.

NRT's known failure (docs/NRT.md, "Watching for collapse"): with the wrong aggregator the reasoning
entropy falls to zero and the traces turn short and repetitive while the reward still looks fine.
The monitor watches four figures of the step metrics (computed by ``nrt_mlx.stats.trace_stats``):

    trace_tokens_mean   mean sampled trace length          warns below fraction x its start
    trace_entropy       mean per-token entropy on traces   warns below fraction x its start
    distinct_2          distinct bigrams / all bigrams     warns below min_distinct (repetition)
    marker_rate         share of traces that emit m        warns below fraction x its start

Every figure is judged on enough traces, not on a fixed number of steps; each step counts with its
number of traces (``traces_per_step`` = questions_per_step x rollout.samples, 8 when not given),
so every mean below is a mean over traces. "Its start" is the mean of the first steps that report
the figure, taken until they hold ``min_traces`` traces (64) and ``window`` steps (3). "Now" is the
mean of the latest steps after those, again at least ``min_traces`` traces and ``window`` steps;
it is also tried over the latest 2, 4 and 8 x ``min_traces`` traces, so that a fall which lasts
is judged on more traces. The start and "now" share no trace: nothing warns before 2 x
``min_traces`` traces have been seen.

A fall of length, entropy or marker rate must also be larger than noise: "now" must lie below
fraction x start by ``z`` (3) standard errors, a one-sided test of "the true figure now is at least
fraction x its true start":

- marker rate, a share of traces: the score test for a ratio of two proportions (Farrington and
  Manning), on the marker counts of the two windows. The counts are divided by the steps'
  overdispersion (how many times more the step rates vary than binomial noise allows, at least 1),
  so samples of one question that behave alike count as fewer independent traces.
- trace length and entropy, means over traces: the gap in standard errors, the variance of one
  trace's figure estimated from how much neighbouring steps differ (a step's mean of n traces
  varies with variance / n), which leaves out a slow drift within a window.

Distinct-2 depends on how many traces are compared, not on a rate to count, so it has no test: it
warns when its mean over the recent ``min_traces`` traces falls below ``min_distinct``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from nrt_mlx.errors import NrtError

# Warnings that mean the policy collapsed (``CollapseMonitor.collapsed``); a falling marker rate is
# a format problem, worth a warning but not a reason to stop the run.
COLLAPSE_KINDS = ("length", "entropy", "repetition")

# Traces per step assumed when the caller does not say: half the default recipe's 4 questions x 4
# samples, so that an unknown count errs towards judging on more steps, not on fewer traces.
ASSUMED_TRACES_PER_STEP = 8

_FIGURES = ("trace_tokens_mean", "trace_entropy", "distinct_2", "marker_rate")

_REMEDY = (
    "if the run uses objective.aggregator arithmetic_mean, prob or log_prob, try "
    "weighted_sum_log_prob; otherwise lower optimizer.learning_rate or resume from an earlier "
    "checkpoint (train.collapse_stop: true stops the run here)"
)

Steps = Sequence[tuple[float, float]]  # (the step's value, its number of traces), oldest first

# "Now" is judged over the latest min_traces, 2 x, 4 x and 8 x min_traces traces: a fall that lasts
# is judged on more traces, so a small share (the marker rate) can show a significant fall.
_DOUBLINGS = 4


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing / non-numeric / NaN value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _traces(steps: Steps) -> float:
    return sum(n for _, n in steps)


def _mean(steps: Steps) -> float:
    """Mean over traces: each step's value weighted by its number of traces."""
    return sum(value * n for value, n in steps) / _traces(steps)


def _trace_variance(steps: Steps) -> float | None:
    """The variance of one trace's figure, estimated from how much neighbouring steps differ
    (a step's mean of n traces varies with variance / n); None for a single step.

    Successive differences (von Neumann) hold whatever makes steps differ (samples of one question
    alike, harder questions) but not a slow drift within the window, which is no noise.
    """
    if len(steps) < 2:
        return None
    squares = sum((b - a) ** 2 / (1 / n + 1 / m) for (a, n), (b, m) in zip(steps, steps[1:]))
    return squares / (len(steps) - 1)


def _dispersion(first: Steps, last: Steps) -> float:
    """How many times more the step rates vary than binomial noise allows, at least 1.

    1 when the steps vary as independent traces would; more when the traces of a step are alike
    (several samples of one question), which then count as fewer independent traces.
    """
    ratio, df = 0.0, 0
    for steps in (first, last):
        rate, variance = _mean(steps), _trace_variance(steps)
        if variance is not None and 0 < rate < 1:
            ratio += (len(steps) - 1) * variance / (rate * (1 - rate))
            df += len(steps) - 1
    return max(1.0, ratio / df) if df else 1.0


def ratio_fall_z(x0: float, n0: float, x1: float, n1: float, ratio: float) -> float:
    """Score statistic of H0 "p1 >= ratio x p0" from x0 of n0 and x1 of n1 (Farrington-Manning).

    Negative when x1 / n1 is below ratio x x0 / n0; -3 means 3 standard errors below, the standard
    error taken at the proportions most likely under p1 = ratio x p0. 0 when nothing can vary.
    """
    a = ratio * (n0 + n1)
    b = -(n0 + ratio * n1 + x1 + ratio * x0)
    c = x0 + x1
    p0 = (-b - math.sqrt(max(0.0, b * b - 4 * a * c))) / (2 * a)
    p1 = ratio * p0
    variance = p1 * (1 - p1) / n1 + ratio**2 * p0 * (1 - p0) / n0
    if variance <= 0:
        return 0.0
    return (x1 / n1 - ratio * x0 / n0) / math.sqrt(variance)


def mean_fall_z(first: Steps, last: Steps, ratio: float) -> float:
    """(now - ratio x start) in standard errors, for a mean over traces (trace length, entropy).

    Each window's trace variance comes from its neighbouring steps (``_trace_variance``); a window
    of one step is given the other window's relative spread. -inf when the figure is below ``ratio``
    x start and no step differs from the next (nothing to call noise).
    """
    start, now = _mean(first), _mean(last)
    v0, v1 = _trace_variance(first), _trace_variance(last)
    if v0 is None and v1 is not None and now:
        v0 = v1 * (start / now) ** 2
    if v1 is None and v0 is not None and start:
        v1 = v0 * (now / start) ** 2
    variance = (v1 or 0.0) / _traces(last) + ratio**2 * (v0 or 0.0) / _traces(first)
    gap = now - ratio * start
    if variance <= 0:
        return -math.inf if gap < 0 else 0.0
    return gap / math.sqrt(variance)


class CollapseMonitor:
    """Watches step metrics for policy collapse; each kind of warning is given once.

    ``fraction``: trace length, trace entropy and marker rate warn when their recent mean falls
    significantly below ``fraction`` times their starting mean. ``min_distinct``: distinct-2 of the
    traces below this (having started above it) warns. ``traces_per_step``: traces sampled per step
    (questions_per_step x rollout.samples; ``ASSUMED_TRACES_PER_STEP`` when not given).
    ``min_traces`` and ``window``: the fewest traces and steps in the starting and in the recent
    mean. ``z``: standard errors by which a figure must fall below ``fraction`` of its start.
    """

    def __init__(
        self,
        fraction: float = 0.3,
        window: int = 3,
        min_distinct: float = 0.2,
        *,
        traces_per_step: int | None = None,
        min_traces: int = 64,
        z: float = 3.0,
    ) -> None:
        if not 0 < fraction < 1:
            raise NrtError(f"the collapse fraction must be in (0, 1), got {fraction}")
        if window < 1:
            raise NrtError(f"the collapse window must be at least 1 step, got {window}")
        if not 0 <= min_distinct <= 1:
            raise NrtError(f"min_distinct must be in [0, 1], got {min_distinct}")
        if traces_per_step is not None and traces_per_step < 1:
            raise NrtError(f"traces_per_step must be at least 1, got {traces_per_step}")
        if min_traces < 1:
            raise NrtError(f"min_traces must be at least 1, got {min_traces}")
        if not z > 0:
            raise NrtError(f"z must be positive, got {z}")
        self.fraction = fraction
        self.window = window
        self.min_distinct = min_distinct
        self.traces_per_step = traces_per_step or ASSUMED_TRACES_PER_STEP
        self.min_traces = min_traces
        self.z = z
        # figure -> (value, traces) of each step that reported it
        self.history: dict[str, list[tuple[float, float]]] = {}
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
        for key in _FIGURES:
            value = _number(metrics.get(key))
            if value is not None:
                self.history.setdefault(key, []).append((value, float(self.traces_per_step)))
        found = [
            self._fallen("length", step, "trace_tokens_mean", "mean trace length", "{:.1f} tokens"),
            self._fallen("entropy", step, "trace_entropy", "trace entropy", "{:.3f} nats/token"),
            self._repetitive(step),
            self._fallen("marker", step, "marker_rate", "marker rate", "{:.0%}"),
        ]
        return [message for message in found if message]

    def _windows(self, key: str) -> tuple[Steps, list[Steps]] | None:
        """(the starting steps, the recent windows, shortest first), once a recent window exists.

        The start is the first steps that hold ``min_traces`` traces and ``window`` steps. The
        recent windows are the latest steps after the start that hold ``min_traces`` traces, 2 x,
        4 x and 8 x as many (and ``window`` steps), as far as there are such steps; they share no
        trace with the start.
        """
        steps = self.history.get(key, [])
        end, traces = 0, 0.0
        while end < len(steps) and (traces < self.min_traces or end < self.window):
            traces += steps[end][1]
            end += 1
        if traces < self.min_traces or end < self.window:
            return None
        recent: list[Steps] = []
        begin, traces = len(steps), 0.0
        for size in (self.min_traces * 2**i for i in range(_DOUBLINGS)):
            while begin > end and (traces < size or len(steps) - begin < self.window):
                begin -= 1
                traces += steps[begin][1]
            if traces < size or len(steps) - begin < self.window:
                break
            recent.append(steps[begin:])
        return (steps[:end], recent) if recent else None

    def _fallen(self, kind: str, step: int, key: str, label: str, fmt: str) -> str | None:
        windows = None if kind in self.warned else self._windows(key)
        if windows is None:
            return None
        first, recent = windows
        start = _mean(first)
        if start <= 0:
            return None
        last = next((steps for steps in recent if self._significant(kind, first, steps)), None)
        if last is None:
            return None
        now = _mean(last)
        self.warned[kind] = step
        fell = (
            f"step {step}: {label} fell to {fmt.format(now)} over the last {_traces(last):.0f} "
            f"traces, {now / start:.0%} of its starting {fmt.format(start)} over the first "
            f"{_traces(first):.0f} (threshold {self.fraction:.0%})"
        )
        if kind == "marker":
            return (
                f"{fell}: the model stops writing the answer marker, so traces run to the think "
                f"limit; raise objective.format_coef or rollout.max_think_tokens"
            )
        symptom = "traces shrink" if kind == "length" else "the traces turn deterministic"
        return f"{fell}: possible policy collapse ({symptom} while the reward may look fine); {_REMEDY}"

    def _significant(self, kind: str, first: Steps, last: Steps) -> bool:
        """Whether ``last`` is below ``fraction`` x ``first`` by at least ``z`` standard errors."""
        start, now = _mean(first), _mean(last)
        if now >= self.fraction * start:
            return False
        if kind != "marker":
            return mean_fall_z(first, last, self.fraction) <= -self.z
        # The marker rate is a share: x of n traces emitted the marker. Overdispersed steps count
        # as fewer independent traces.
        phi = _dispersion(first, last)
        n0, n1 = _traces(first) / phi, _traces(last) / phi
        return ratio_fall_z(start * n0, n0, now * n1, n1, self.fraction) <= -self.z

    def _repetitive(self, step: int) -> str | None:
        windows = None if "repetition" in self.warned else self._windows("distinct_2")
        if windows is None:
            return None
        first, last = windows[0], windows[1][0]
        start, now = _mean(first), _mean(last)
        # Only a fall counts: a base model that repeats itself from step 1 has not collapsed.
        if start < self.min_distinct or now >= self.min_distinct:
            return None
        self.warned["repetition"] = step
        return (
            f"step {step}: traces turned repetitive: distinct-2 fell to {now:.2f} over the last "
            f"{_traces(last):.0f} traces from {start:.2f} over the first {_traces(first):.0f} "
            f"(threshold {self.min_distinct:.2f}): possible policy collapse; {_REMEDY}"
        )
