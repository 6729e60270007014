"""Collapse diagnostics: distinct-n, and a monitor that fires on collapse and stays silent otherwise."""

import math
import random

import pytest

from nrt_mlx.collapse import CollapseMonitor
from nrt_mlx.errors import NrtError
from nrt_mlx.stats import distinct_n


def test_distinct_n_counts_repeated_ngrams_across_traces():
    # bigrams (1,2) (2,3) (3,1) (1,2) | (2,3) (3,4): 4 distinct of 6
    assert distinct_n([[1, 2, 3, 1, 2], [2, 3, 4]], 2) == pytest.approx(4 / 6)
    assert distinct_n([[5, 5, 5, 5, 5]], 1) == pytest.approx(1 / 5)
    assert distinct_n([[1, 2, 3]], 3) == 1.0
    assert distinct_n([[1], []], 2) == 1.0  # no bigram at all: nothing repeats
    with pytest.raises(NrtError, match="n >= 1"):
        distinct_n([[1, 2]], 0)


def _traces(rng: random.Random, length: int, vocab: int) -> list[list[int]]:
    """Four traces of ``length`` tokens drawn from the first ``vocab`` ids (small vocab = repetitive)."""
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(4)]


def _collapsing(step: int, rng: random.Random) -> dict:
    """Traces shrink from ~100 to ~5 tokens, entropy 2.5 -> 0.1 nats, vocabulary 500 ids -> 1."""
    decay = math.exp(-step / 6)
    length = max(5, int(100 * decay))
    vocab = max(1, int(500 * decay**3))
    return {
        "step": step,
        "reward_mean": 0.2 + 0.01 * step,  # the reward still looks fine
        "trace_tokens_mean": float(length),
        "trace_entropy": 0.1 + 2.4 * decay,
        "distinct_2": distinct_n(_traces(rng, length, vocab), 2),
        "marker_rate": 1.0,
    }


def _healthy(step: int, rng: random.Random) -> dict:
    """Noisy but stable length, entropy, diversity and marker rate; length even grows."""
    return {
        "step": step,
        "trace_tokens_mean": 80 + step + rng.uniform(-25, 25),
        "trace_entropy": 2.0 + rng.uniform(-0.5, 0.5),
        "distinct_2": distinct_n(_traces(rng, 80, 300), 2),
        "marker_rate": 0.8 + rng.uniform(-0.2, 0.2),
    }


def test_monitor_fires_once_per_kind_on_a_collapsing_run():
    rng = random.Random(0)
    monitor = CollapseMonitor(fraction=0.3, window=3, min_distinct=0.2)
    fired: dict[int, list[str]] = {}
    for step in range(1, 41):
        messages = monitor.update(step, _collapsing(step, rng))
        if messages:
            fired[step] = messages
    everything = [m for ms in fired.values() for m in ms]
    assert len(everything) == 3, everything  # length, entropy, repetition: each exactly once
    assert any("trace length" in m for m in everything)
    assert any("entropy" in m for m in everything)
    assert any("repetitive" in m and "distinct-2" in m for m in everything)
    # Nothing before the baseline exists, and the warnings come while the run goes on.
    assert min(fired) > 3 and max(fired) < 40
    # Clear and actionable: the step, the numbers and what to change.
    assert all(m.startswith("step ") and "weighted_sum_log_prob" in m for m in everything)
    assert monitor.collapsed
    assert set(monitor.warned) == {"length", "entropy", "repetition"}


def test_monitor_stays_silent_on_a_healthy_run():
    rng = random.Random(1)
    monitor = CollapseMonitor()
    for step in range(1, 101):
        assert monitor.update(step, _healthy(step, rng)) == []
    assert not monitor.collapsed


def test_one_bad_step_is_not_collapse_and_missing_keys_are_ignored():
    monitor = CollapseMonitor(fraction=0.3, window=3)
    for step in range(1, 20):
        length = 10.0 if step == 10 else 100.0  # one step at 10 %: the 3-step mean stays at 70 %
        assert monitor.update(step, {"trace_tokens_mean": length, "loss": 1.0}) == []
        assert monitor.update(step, {"eval_f1": 0.5, "trace_entropy": float("nan")}) == []
    assert not monitor.collapsed


def test_falling_marker_rate_warns_but_is_not_collapse():
    monitor = CollapseMonitor(fraction=0.5, window=2)
    messages = []
    for step, rate in enumerate([0.9, 0.9, 0.8, 0.3, 0.1, 0.0, 0.0], start=1):
        messages += monitor.update(step, {"marker_rate": rate})
    assert len(messages) == 1 and "marker" in messages[0] and "format_coef" in messages[0]
    assert not monitor.collapsed


def test_repetitive_from_the_start_is_not_a_fall():
    monitor = CollapseMonitor(min_distinct=0.2)
    for step in range(1, 10):
        assert monitor.update(step, {"distinct_2": 0.05}) == []


def test_replay_restores_a_resumed_run_without_repeating_warnings():
    rng = random.Random(0)
    records = [_collapsing(step, rng) for step in range(1, 41)]
    first = CollapseMonitor()
    for record in records[:30]:
        first.update(record["step"], record)
    resumed = CollapseMonitor()
    resumed.replay(records[:30])
    assert resumed.warned == first.warned and resumed.collapsed
    assert all(resumed.update(r["step"], r) == [] for r in records[30:])


def test_bad_settings_are_user_errors():
    for kwargs in ({"fraction": 0}, {"fraction": 1.5}, {"window": 0}, {"min_distinct": 2}):
        with pytest.raises(NrtError):
            CollapseMonitor(**kwargs)
