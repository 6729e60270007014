"""The six aggregators, group normalisation and null clipping against independent computations."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from nrt_mlx.errors import NrtError
from nrt_mlx.rewards import (
    AGGREGATORS,
    aggregate,
    clip_to_null,
    group_normalize,
    normalize_token_signal,
    register_aggregator,
)

MODES = [
    "log_prob",
    "prob",
    "geometric_mean",
    "arithmetic_mean",
    "weighted_sum_inverse_prob",
    "weighted_sum_log_prob",
]

# Two rows of known probabilities; row 1 has two answer tokens, its third entry is padding that
# holds garbage (the aggregators must ignore it).
C = [[0.5, 0.25, 0.8], [0.9, 0.1, 0.0]]
B = [[0.4, 0.5, 0.2], [0.3, 0.6, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]


def _inputs() -> tuple[mx.array, mx.array, mx.array]:
    garbage = -math.inf
    lc = [[math.log(v) for v in C[0]], [math.log(C[1][0]), math.log(C[1][1]), garbage]]
    lb = [[math.log(v) for v in B[0]], [math.log(B[1][0]), math.log(B[1][1]), 123.0]]
    return mx.array(lc), mx.array(MASK), mx.array(lb)


# Worked by hand from C and B: row 0 has prod c = 0.5 * 0.25 * 0.8 = 0.1, sum c = 1.55,
# sum c / b = 1.25 + 0.5 + 4 = 5.75; row 1 has prod c = 0.09, sum c = 1.0, sum c / b = 3 + 1/6.
HAND = {
    "log_prob": ([math.log(0.1), math.log(0.09)], [[1, 1, 1], [1, 1, 0]]),
    "prob": ([0.1, 0.09], [[0.1, 0.1, 0.1], [0.09, 0.09, 0]]),
    "geometric_mean": (
        [0.1 ** (1 / 3), 0.3],
        [[0.1 ** (1 / 3) / 3] * 3, [0.15, 0.15, 0]],
    ),
    "arithmetic_mean": ([1.55 / 3, 0.5], [[0.5 / 3, 0.25 / 3, 0.8 / 3], [0.45, 0.05, 0]]),
    "weighted_sum_inverse_prob": (
        [5.75 / 3, (3 + 1 / 6) / 2],
        [[1.25 / 3, 0.5 / 3, 4 / 3], [1.5, 1 / 12, 0]],
    ),
    "weighted_sum_log_prob": (
        [
            (0.5 * -math.log(0.4) + 0.25 * -math.log(0.5) + 0.8 * -math.log(0.2)) / 3,
            (0.9 * -math.log(0.3) + 0.1 * -math.log(0.6)) / 2,
        ],
        [
            [0.5 * -math.log(0.4) / 3, 0.25 * -math.log(0.5) / 3, 0.8 * -math.log(0.2) / 3],
            [0.9 * -math.log(0.3) / 2, 0.1 * -math.log(0.6) / 2, 0],
        ],
    ),
}


def test_registry_names_exactly_as_the_paper() -> None:
    assert list(AGGREGATORS)[:6] == MODES
    assert all(mode in AGGREGATORS for mode in MODES)
    assert [AGGREGATORS[m].needs_null for m in MODES] == [False] * 4 + [True] * 2


@pytest.mark.parametrize("mode", MODES)
def test_hand_computed_values(mode: str) -> None:
    lc, mask, lb = _inputs()
    reward, signal = aggregate(mode, lc, mask, lb)
    want_r, want_s = HAND[mode]
    np.testing.assert_allclose(np.array(reward), want_r, rtol=1e-5)
    np.testing.assert_allclose(np.array(signal), want_s, rtol=1e-5, atol=1e-7)


def _linear_reward(mode: str, c: mx.array, b: mx.array, n: int) -> mx.array:
    """R as a function of the probabilities themselves (not their logs), for one row of n tokens."""
    if mode == "log_prob":
        return mx.log(c).sum()
    if mode == "prob":
        return mx.prod(c)
    if mode == "geometric_mean":
        return mx.prod(c) ** (1.0 / n)
    if mode == "arithmetic_mean":
        return c.sum() / n
    if mode == "weighted_sum_inverse_prob":
        return (c / b).sum() / n
    return (c * -mx.log(b)).sum() / n


@pytest.mark.parametrize("mode", MODES)
def test_token_signal_is_alpha_times_c(mode: str) -> None:
    """s_i = (dR/dc_i) c_i, with dR/dc from autodiff of R written in probability space."""
    lc, mask, lb = _inputs()
    _, signal = aggregate(mode, lc, mask, lb)
    for row, n in ((0, 3), (1, 2)):
        c, b = mx.array(C[row][:n]), mx.array(B[row][:n])
        alpha = mx.grad(lambda c_: _linear_reward(mode, c_, b, n))(c)  # noqa: B023
        np.testing.assert_allclose(np.array(signal[row, :n]), np.array(alpha * c), rtol=1e-5)


def _reference_float64(mode: str, lc: np.ndarray, lb: np.ndarray, mask: np.ndarray):
    """Straightforward float64 numpy version of the table in NRT.md (per row, real tokens only)."""
    rewards, signals = [], np.zeros_like(lc)
    for r in range(lc.shape[0]):
        keep = mask[r] > 0
        x, y, n = lc[r][keep], lb[r][keep], keep.sum()
        c, b = np.exp(x), np.exp(y)
        if mode == "log_prob":
            reward, s = x.sum(), np.ones(n)
        elif mode == "prob":
            reward = np.exp(x.sum())
            s = np.full(n, reward)
        elif mode == "geometric_mean":
            reward = np.exp(x.mean())
            s = np.full(n, reward / n)
        elif mode == "arithmetic_mean":
            s = c / n
            reward = s.sum()
        elif mode == "weighted_sum_inverse_prob":
            s = c / b / n
            reward = s.sum()
        else:
            s = c * -y / n
            reward = s.sum()
        rewards.append(reward)
        signals[r][keep] = s
    return np.array(rewards), signals


@pytest.mark.parametrize("mode", MODES)
def test_long_answers_match_float64(mode: str) -> None:
    """T = 4096, log-probs down to -30: finite, and within 1e-4 relative of float64."""
    rng = np.random.default_rng(0)
    t = 4096
    lc = np.stack(
        [
            rng.uniform(-30.0, 0.0, t),  # prod c underflows to 0 in float64 too
            rng.uniform(-0.005, 0.0, t),  # a well-predicted answer: prod c ~ e^-10
            rng.uniform(-3.0, 0.0, t),
            np.full(t, -30.0),
        ]
    )
    lb = rng.uniform(-30.0, 0.0, (4, t))
    mask = np.ones((4, t))
    mask[2, 3000:] = 0.0  # a shorter answer in the same batch
    reward, signal = aggregate(
        mode,
        mx.array(lc, dtype=mx.float32),
        mx.array(mask, dtype=mx.float32),
        mx.array(lb, dtype=mx.float32),
    )
    reward, signal = np.array(reward), np.array(signal)
    assert np.isfinite(reward).all() and np.isfinite(signal).all()
    want_r, want_s = _reference_float64(
        mode,
        lc.astype(np.float32).astype(np.float64),
        lb.astype(np.float32).astype(np.float64),
        mask,
    )
    np.testing.assert_allclose(reward, want_r, rtol=1e-4, atol=0)
    np.testing.assert_allclose(signal, want_s, rtol=1e-4, atol=0)
    if mode == "geometric_mean":
        assert reward[0] > 0  # a product in log space, not a running product that underflows


def test_signal_zero_under_mask_and_empty_rows() -> None:
    lc = mx.array([[-1.0, mx.nan], [mx.inf, -mx.inf]])
    mask = mx.array([[1.0, 0.0], [0.0, 0.0]])
    for mode in MODES:
        reward, signal = aggregate(mode, lc, mask, mx.zeros_like(lc) - 1.0)
        assert np.isfinite(np.array(reward)).all(), mode
        assert np.array(signal)[0, 1] == 0 and not np.array(signal)[1].any(), mode


def test_custom_aggregator() -> None:
    def last_token(lp, mask, null):
        last = mask.sum(axis=-1).astype(mx.int32) - 1
        reward = mx.take_along_axis(lp, last[:, None], axis=1)[:, 0]
        return reward, mx.ones_like(lp) * 7.0

    register_aggregator("last_token", last_token)
    try:
        assert "last_token" in AGGREGATORS and "last_token" in list(AGGREGATORS)
        lc, mask, _ = _inputs()
        reward, signal = aggregate("last_token", lc, mask)
        np.testing.assert_allclose(np.array(reward), [math.log(0.8), math.log(0.1)], rtol=1e-6)
        np.testing.assert_array_equal(np.array(signal), 7.0 * np.array(MASK))
        with pytest.raises(NrtError, match="already registered"):
            register_aggregator("last_token", last_token)
        register_aggregator("last_token", lambda lp, m, n: (lp.sum(-1), m), overwrite=True)
        np.testing.assert_allclose(
            np.array(aggregate("last_token", lc, mask)[0])[0], math.log(0.1), rtol=1e-6
        )
    finally:
        AGGREGATORS.pop("last_token", None)


def test_custom_aggregator_needing_null_and_bad_shapes() -> None:
    register_aggregator("needs_b", lambda lp, m, n: (lp.sum(-1), n), needs_null=True)
    register_aggregator("bad_shape", lambda lp, m, n: (lp, m))
    try:
        lc, mask, lb = _inputs()
        with pytest.raises(NrtError, match="needs_b.*null_logprobs"):
            aggregate("needs_b", lc, mask)
        with pytest.raises(NrtError, match=r"bad_shape.*expected \(2,\) and \(2, 3\)"):
            aggregate("bad_shape", lc, mask)
    finally:
        AGGREGATORS.pop("needs_b", None)
        AGGREGATORS.pop("bad_shape", None)


def test_bad_inputs() -> None:
    lc, mask, lb = _inputs()
    with pytest.raises(NrtError, match="unknown aggregator 'probability'.*" + ".*".join(MODES)):
        aggregate("probability", lc, mask)
    for mode in ("weighted_sum_inverse_prob", "weighted_sum_log_prob"):
        with pytest.raises(NrtError, match=rf"{mode}.*null_logprobs of shape \(2, 3\)"):
            aggregate(mode, lc, mask)
    with pytest.raises(
        NrtError, match=r"mask must have the shape of answer_logprobs \(2, 3\), got \(2, 2\)"
    ):
        aggregate("log_prob", lc, mask[:, :2])
    with pytest.raises(NrtError, match=r"null_logprobs must have the shape.*got \(1, 3\)"):
        aggregate("weighted_sum_log_prob", lc, mask, lb[:1])
    with pytest.raises(NrtError, match=r"2-D \[B, T\], got shape \(3,\)"):
        aggregate("log_prob", lc[0], mask[0])
    with pytest.raises(NrtError, match="non-empty string"):
        register_aggregator("", lambda *a: a)
    with pytest.raises(NrtError, match="callable"):
        register_aggregator("x", 3)


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------


def test_group_normalize_by_hand() -> None:
    values = mx.array([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    groups = mx.array([0, 0, 0, 1, 1, 2])
    # group 0: mean 2, unbiased std 1; group 1: equal rewards; group 2: K = 1.
    np.testing.assert_allclose(
        np.array(group_normalize(values, groups)), [-1, 0, 1, 0, 0, 0], atol=1e-6
    )
    np.testing.assert_allclose(
        np.array(group_normalize(values, groups, scale_by_std=False)),
        [-1, 0, 1, 0, 0, 0],
        atol=1e-6,
    )


def test_group_normalize_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, 12)
    groups = np.repeat([4, 9, 2], 4)
    rng.shuffle(groups)
    mask = np.ones(12)
    mask[[0, 5]] = 0  # rows left out (null-think rows)
    got = group_normalize(
        mx.array(values, dtype=mx.float32), mx.array(groups), mask=mx.array(mask, dtype=mx.float32)
    )
    got_centred = group_normalize(
        mx.array(values, dtype=mx.float32),
        mx.array(groups),
        False,
        mx.array(mask, dtype=mx.float32),
    )
    want, want_centred = np.zeros(12), np.zeros(12)
    for g in set(groups):
        idx = np.flatnonzero((groups == g) & (mask > 0))
        want_centred[idx] = values[idx] - values[idx].mean()
        want[idx] = want_centred[idx] / values[idx].std(ddof=1)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(got_centred), want_centred, rtol=1e-5, atol=1e-6)


def test_group_normalize_extreme_values() -> None:
    # Rewards such as prod c_i / b_i can be huge: squares must not overflow.
    big = group_normalize(mx.array([1e30, 3e30, 2e30]), mx.array([0, 0, 0]))
    np.testing.assert_allclose(np.array(big), [-1, 1, 0], atol=1e-5)
    # log_prob rewards of long answers are large in magnitude but differ meaningfully.
    lp = group_normalize(mx.array([-60000.0, -60000.5]), mx.array([0, 0]))
    np.testing.assert_allclose(np.array(lp), [1 / math.sqrt(2), -1 / math.sqrt(2)], rtol=1e-4)
    # Equal rewards of any size give exactly 0, not +-1 from rounding.
    for v in (0.1, 1e-30, -60000.3, 7.7e20):
        assert not np.array(group_normalize(mx.full((8,), v), mx.zeros((8,), dtype=mx.int32))).any()


def test_normalize_token_signal_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    signal = rng.uniform(0, 1, (6, 5))
    mask = np.ones((6, 5))
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    groups = np.array([0, 0, 0, 1, 1, 1])
    rows = np.array([1, 1, 0, 1, 1, 0])  # the null-think rows take no part
    got = normalize_token_signal(
        mx.array(signal, dtype=mx.float32),
        mx.array(mask),
        mx.array(groups),
        row_mask=mx.array(rows),
    )
    want = np.zeros_like(signal)
    for g in (0, 1):
        keep = (groups[:, None] == g) & (mask > 0) & (rows[:, None] > 0)
        vals = signal[keep]
        want[keep] = (vals - vals.mean()) / vals.std(ddof=1)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    assert not np.array(got)[rows == 0].any()
    const = normalize_token_signal(mx.full((2, 3), 0.25), mx.ones((2, 3)), mx.array([0, 0]))
    assert not np.array(const).any()


def test_normalisation_bad_inputs() -> None:
    with pytest.raises(NrtError, match=r"groups must be \[B\] = \(3,\)"):
        group_normalize(mx.zeros((3,)), mx.zeros((2,), dtype=mx.int32))
    with pytest.raises(NrtError, match=r"values must be 1-D \[B\]"):
        group_normalize(mx.zeros((3, 1)), mx.zeros((3,), dtype=mx.int32))
    with pytest.raises(NrtError, match=r"mask must be \[B\] = \(3,\)"):
        group_normalize(mx.zeros((3,)), mx.zeros((3,), dtype=mx.int32), mask=mx.ones((4,)))
    with pytest.raises(NrtError, match=r"mask must have the shape"):
        normalize_token_signal(mx.zeros((2, 3)), mx.ones((2, 4)), mx.zeros((2,), dtype=mx.int32))
    with pytest.raises(NrtError, match=r"row_mask must be \[B\]"):
        normalize_token_signal(
            mx.zeros((2, 3)),
            mx.ones((2, 3)),
            mx.zeros((2,), dtype=mx.int32),
            row_mask=mx.ones((3,)),
        )


def test_clip_to_null() -> None:
    got = clip_to_null(mx.array([0.5, 0.2, -1.0]), mx.array([0.3, 0.4, -2.0]))
    np.testing.assert_allclose(np.array(got), [0.2, 0.0, 1.0], rtol=1e-6)
    with pytest.raises(NrtError, match=r"shape of trace_reward \(3,\), got \(2,\)"):
        clip_to_null(mx.zeros((3,)), mx.zeros((2,)))
