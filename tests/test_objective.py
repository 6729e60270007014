"""The NRT objective against independent computations.

Aggregators, group normalisation and null clipping are checked against hand-worked values, autodiff
and float64 numpy. The loss runs on the tiny model: the references run one unpadded forward pass per
row and take log-probs from ``mlx.nn.losses.cross_entropy``; rewards and normalisation are
recomputed in float64 numpy.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nrt_mlx.batch import ANSWER, MARKER, PAD, THINK, Batch, Row, build_rows, collate, sft_rows
from nrt_mlx.errors import NrtError
from nrt_mlx.objective import (
    AGGREGATORS,
    Aggregator,
    Rewards,
    aggregate,
    clip_to_null,
    default_normalizer,
    forward,
    group_normalize,
    nrt_loss,
    reference_pass,
    released_normalizer,
    response_width,
    sft_loss,
    token_logprobs,
)
from nrt_mlx.recipe import ObjectiveConfig, Recipe
from nrt_mlx.rollout import Trace
from nrt_mlx.stats import trace_stats
from nrt_mlx.vocab import Vocabulary

MODES = [
    "log_prob",
    "prob",
    "geometric_mean",
    "arithmetic_mean",
    "weighted_sum_inverse_prob",
    "weighted_sum_log_prob",
]

# ============================================================================================
# Aggregators
# ============================================================================================

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
    """An Aggregator put into AGGREGATORS is used by name; its signal is zeroed off the mask."""

    def last_token(lc, mask, lb):
        last = mask.sum(axis=-1).astype(mx.int32) - 1
        reward = mx.take_along_axis(lc, last[:, None], axis=1)[:, 0]
        return reward, mx.ones_like(lc) * 7.0

    AGGREGATORS["last_token"] = Aggregator(last_token, needs_null=False)
    try:
        lc, mask, _ = _inputs()
        reward, signal = aggregate("last_token", lc, mask)
        np.testing.assert_allclose(np.array(reward), [math.log(0.8), math.log(0.1)], rtol=1e-6)
        np.testing.assert_array_equal(np.array(signal), 7.0 * np.array(MASK))
        # Replacing the entry replaces the aggregator: it is looked up on every call.
        AGGREGATORS["last_token"] = Aggregator(lambda lc_, m, lb: (lc_.sum(-1), m), False)
        np.testing.assert_allclose(
            np.array(aggregate("last_token", lc, mask)[0])[0], math.log(0.1), rtol=1e-6
        )
    finally:
        AGGREGATORS.pop("last_token", None)


def test_custom_aggregator_needing_null() -> None:
    seen = {}

    def weights_by_b(lc, mask, lb):
        seen["lb"] = np.array(lb)
        return lc.sum(-1), mask * lb

    AGGREGATORS["needs_b"] = Aggregator(weights_by_b, needs_null=True)
    try:
        lc, mask, lb = _inputs()
        with pytest.raises(NrtError, match="'needs_b' weights tokens by b_i.*null-think log-probs"):
            aggregate("needs_b", lc, mask)
        _, signal = aggregate("needs_b", lc, mask, lb)
        # The aggregator sees log b with the padding entries set to 0 (the 123.0 is gone).
        want = np.where(np.array(MASK) > 0, np.log(np.maximum(B, 1e-30)), 0.0)
        np.testing.assert_allclose(seen["lb"], want, rtol=1e-6)
        np.testing.assert_allclose(np.array(signal), want, rtol=1e-6)
    finally:
        AGGREGATORS.pop("needs_b", None)


def test_bad_inputs() -> None:
    lc, mask, _ = _inputs()
    with pytest.raises(NrtError, match="unknown aggregator 'probability'.*" + ".*".join(MODES)):
        aggregate("probability", lc, mask)
    for mode in ("weighted_sum_inverse_prob", "weighted_sum_log_prob"):
        with pytest.raises(NrtError, match=rf"'{mode}' weights tokens by b_i"):
            aggregate(mode, lc, mask)


# ============================================================================================
# Normalisation and null clipping
# ============================================================================================


def _column(values) -> tuple[mx.array, mx.array]:
    """Trace rewards [B] as group_normalize takes them: values [B, 1] and a [B, 1] mask."""
    values = mx.array(values, dtype=mx.float32)
    return values[:, None], mx.ones((values.shape[0], 1))


def test_group_normalize_by_hand() -> None:
    values, mask = _column([1.0, 2.0, 3.0, 5.0, 5.0, 9.0])
    groups = mx.array([0, 0, 0, 1, 1, 2])
    # group 0: mean 2, unbiased std 1; group 1: equal rewards; group 2: K = 1.
    np.testing.assert_allclose(
        np.array(group_normalize(values, mask, groups))[:, 0], [-1, 0, 1, 0, 0, 0], atol=1e-6
    )
    np.testing.assert_allclose(
        np.array(group_normalize(values, mask, groups, scale_by_std=False))[:, 0],
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
    args = (
        mx.array(values, dtype=mx.float32)[:, None],
        mx.array(mask, dtype=mx.float32)[:, None],
        mx.array(groups),
    )
    got = np.array(group_normalize(*args))[:, 0]
    got_centred = np.array(group_normalize(*args, False))[:, 0]
    want, want_centred = np.zeros(12), np.zeros(12)
    for g in set(groups):
        idx = np.flatnonzero((groups == g) & (mask > 0))
        want_centred[idx] = values[idx] - values[idx].mean()
        want[idx] = want_centred[idx] / values[idx].std(ddof=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_centred, want_centred, rtol=1e-5, atol=1e-6)


def test_group_normalize_extreme_values() -> None:
    # Rewards such as prod c_i / b_i can be huge: squares must not overflow.
    big = group_normalize(*_column([1e30, 3e30, 2e30]), mx.array([0, 0, 0]))
    np.testing.assert_allclose(np.array(big)[:, 0], [-1, 1, 0], atol=1e-5)
    # log_prob rewards of long answers are large in magnitude but differ meaningfully.
    lp = group_normalize(*_column([-60000.0, -60000.5]), mx.array([0, 0]))
    np.testing.assert_allclose(np.array(lp)[:, 0], [1 / math.sqrt(2), -1 / math.sqrt(2)], rtol=1e-4)
    # Equal rewards of any size give exactly 0, not +-1 from rounding.
    for v in (0.1, 1e-30, -60000.3, 7.7e20):
        out = group_normalize(*_column([v] * 8), mx.zeros((8,), dtype=mx.int32))
        assert not np.array(out).any(), v


def test_group_normalize_token_signal_matches_numpy() -> None:
    """Token signals [B, T]: mean and std over all masked answer tokens of a question's rows."""
    rng = np.random.default_rng(2)
    signal = rng.uniform(0, 1, (6, 5))
    mask = np.ones((6, 5))
    mask[1, 3:] = 0
    mask[4, 1:] = 0
    groups = np.array([0, 0, 0, 1, 1, 1])
    rows = np.array([1, 1, 0, 1, 1, 0])  # the null-think rows take no part
    got = group_normalize(
        mx.array(signal, dtype=mx.float32),
        mx.array(mask * rows[:, None], dtype=mx.float32),
        mx.array(groups),
    )
    want = np.zeros_like(signal)
    for g in (0, 1):
        keep = (groups[:, None] == g) & (mask > 0) & (rows[:, None] > 0)
        vals = signal[keep]
        want[keep] = (vals - vals.mean()) / vals.std(ddof=1)
    np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=1e-6)
    assert not np.array(got)[rows == 0].any()
    const = group_normalize(mx.full((2, 3), 0.25), mx.ones((2, 3)), mx.array([0, 0]))
    assert not np.array(const).any()


def test_clip_to_null() -> None:
    got = clip_to_null(mx.array([0.5, 0.2, -1.0]), mx.array([0.3, 0.4, -2.0]))
    np.testing.assert_allclose(np.array(got), [0.2, 0.0, 1.0], rtol=1e-6)


# ============================================================================================
# The loss on the tiny model
# ============================================================================================

NORM = 37.0
NO_SIGNAL = np.zeros((8, 64))  # the reference slices each row's answer length out of it
QUESTIONS = [
    ("What is the capital of France?", " Paris is the capital"),
    ("two plus two", " four"),
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.eval()
    return model, Vocabulary.of(tok)


def _traces() -> list[list[Trace]]:
    """K = 3 traces per question: one empty, one that did not emit the marker."""
    rng = np.random.default_rng(0)
    lengths = [(6, 0, 9), (4, 7, 2)]
    return [
        [
            Trace(rng.integers(6, 400, n).tolist(), emitted)
            for n, emitted in zip(lens, [True, False, True])
        ]
        for lens in lengths
    ]


def _rows(vocab: Vocabulary) -> list[Row]:
    """Two questions of K = 3 traces + one null-think row each (8 rows)."""
    rows = []
    for q, ((question, answer), traces) in enumerate(zip(QUESTIONS, _traces())):
        rows += build_rows(
            vocab.encode_prompt([{"role": "user", "content": question}]),
            traces,
            vocab.marker.ids,
            vocab.encode_answer(answer),
            q,
            256,
        )
    return rows


def _pad(batch: Batch, pad_id: int, extra_tokens: int, extra_answer: int = 0) -> Batch:
    """``batch`` with ``extra_tokens`` more padding columns (and ``extra_answer`` answer slots)."""
    rows = batch.tokens.shape[0]
    return dataclasses.replace(
        batch,
        tokens=mx.concatenate(
            [batch.tokens, mx.full((rows, extra_tokens), pad_id, dtype=mx.int32)], axis=1
        ),
        segments=mx.concatenate(
            [batch.segments, mx.full((rows, extra_tokens), PAD, dtype=mx.int32)], axis=1
        ),
        answer_positions=mx.concatenate(
            [batch.answer_positions, mx.zeros((rows, extra_answer), dtype=mx.int32)], axis=1
        ),
        answer_mask=mx.concatenate([batch.answer_mask, mx.zeros((rows, extra_answer))], axis=1),
    )


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


def _row_logprobs(model, row: Row, temperature: float = 1.0) -> mx.array:
    """log p(tokens[j] | tokens[<j]) for j = 1..n-1 of one unpadded row, p = softmax(logits / T)."""
    logits = model(mx.array(row.tokens[:-1])[None])[0] / temperature
    return -nn.losses.cross_entropy(logits, mx.array(row.tokens[1:]), reduction="none")


def _where(row: Row, *segs: int) -> np.ndarray:
    """Indices into _row_logprobs (shifted by one) of the tokens of the given segments."""
    return np.flatnonzero(np.isin(np.array(row.segments[1:]), segs))


def _pick(lp: mx.array, idx: np.ndarray) -> mx.array:
    return lp[mx.array(idx)] if idx.size else mx.zeros((0,))


def _reference_loss(model, rows, adv, signal, cfg, weights=None, temperature=1.0) -> mx.array:
    """mean over training rows of (c_trace L_trace + c_token L_token + c_format L_format) / N."""
    total, n = mx.array(0.0), 0
    for b, row in enumerate(rows):
        if row.is_null:
            continue
        n += 1
        lp = _row_logprobs(model, row, temperature)
        trace = _pick(lp, _where(row, THINK, MARKER))
        if weights is not None:
            trace = trace * mx.array(weights[b])
        answer = _pick(lp, _where(row, ANSWER))
        total = total - cfg.trace_coef * float(adv[b]) * trace.sum()
        total = total - cfg.token_coef * (mx.array(signal[b][: answer.shape[0]]) * answer).sum()
        if not row.emitted_marker:
            total = total - cfg.format_coef * _pick(lp, _where(row, MARKER)).sum()
    return total / n / NORM


def _aggregate64(mode: str, lc: np.ndarray, lb: np.ndarray):
    c, b, t = np.exp(lc), np.exp(lb), len(lc)
    table = {
        "log_prob": (lc.sum(), np.ones(t)),
        "prob": (np.prod(c), np.full(t, np.prod(c))),
        "geometric_mean": (np.prod(c) ** (1 / t), np.full(t, np.prod(c) ** (1 / t) / t)),
        "arithmetic_mean": (c.mean(), c / t),
        "weighted_sum_inverse_prob": ((c / b).mean(), c / b / t),
        "weighted_sum_log_prob": ((c * -np.log(b)).mean(), c * -np.log(b) / t),
    }
    return table[mode]


def _normalise64(values: np.ndarray, keep: np.ndarray, scale: bool) -> np.ndarray:
    """Group normalisation of the entries where keep is True (one question)."""
    out = np.zeros_like(values)
    vals = values[keep]
    if vals.size > 1 and vals.std() > 0:
        out[keep] = (vals - vals.mean()) / (vals.std(ddof=1) if scale else 1.0)
    return out


def _reference_rewards(model, rows, cfg, answers=None):
    """Raw rewards [B], advantages [B] and token signals [B, T] in float64 numpy, from the answer
    log-probs of each row (``answers``; default: those of the model at temperature 1)."""
    if answers is None:
        answers = [
            np.array(_pick(_row_logprobs(model, r), _where(r, ANSWER)), dtype=np.float64)
            for r in rows
        ]
    null_of = {r.question: i for i, r in enumerate(rows) if r.is_null}
    t = max(len(a) for a in answers)
    raw, sig = np.zeros(len(rows)), np.zeros((len(rows), t))
    for i, r in enumerate(rows):
        raw[i], s = _aggregate64(cfg.aggregator, answers[i], answers[null_of[r.question]])
        sig[i, : len(s)] = s
    used = raw.copy()
    if cfg.clip_to_null:
        used = np.array([max(0.0, raw[i] - raw[null_of[r.question]]) for i, r in enumerate(rows)])
    adv, signal = np.zeros(len(rows)), np.zeros_like(sig)
    for q in null_of:
        members = np.array([r.question == q and not r.is_null for r in rows])
        adv += _normalise64(used, members, cfg.scale_by_std)
        if cfg.fixed_token_reward:
            signal[members] = 1.0
        else:
            keep = members[:, None] & (
                np.arange(t)[None, :] < np.array([len(a) for a in answers])[:, None]
            )
            signal += _normalise64(sig, keep, cfg.scale_by_std)
    if cfg.fixed_token_reward:  # s = 1 on the real answer tokens only
        signal *= np.arange(t)[None, :] < np.array([len(a) for a in answers])[:, None]
    return raw, adv, signal, answers


def _grads(model, fn) -> dict[str, np.ndarray]:
    _, grads = nn.value_and_grad(model, fn)()
    return {k: np.array(v) for k, v in tree_flatten(grads)}


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    scale = max(np.abs(v).max() for v in want.values())
    assert scale > 1e-6  # the comparison is not between two zero gradients
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_token_logprobs_matches_log_softmax() -> None:
    x = np.random.default_rng(0).normal(0, 5, (2, 3, 11)).astype(np.float32)
    targets = np.array([[0, 4, 10], [3, 3, 7]])
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    want = np.take_along_axis(x64, targets[..., None], -1)[..., 0] - lse
    logits = mx.array(x)
    got = np.array(token_logprobs(logits, mx.array(targets)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    half = token_logprobs(logits.astype(mx.float16), mx.array(targets))
    assert half.dtype == mx.float32


def test_default_normalizer() -> None:
    """released (the default): decided per step for NRT; 0 (what nrt-mlx 0.1 runs store), and
    released for SFT: max_think_tokens + max_answer_tokens; a number > 0: itself."""
    recipe = Recipe()
    recipe.rollout.max_think_tokens, recipe.data.max_answer_tokens = 100, 30
    assert recipe.objective.normalizer == "released"
    assert default_normalizer(recipe) is None
    recipe.train.method = "sft"
    got = default_normalizer(recipe)
    assert got == 130.0 and isinstance(got, float)
    recipe.train.method, recipe.objective.normalizer = "nrt", 0
    got = default_normalizer(recipe)
    assert got == 130.0 and isinstance(got, float)
    recipe.objective.normalizer = 37
    got = default_normalizer(recipe)
    assert got == 37.0 and isinstance(got, float)


def test_trace_gradient_is_reinforce(loaded) -> None:
    """Fixed A: grad L_trace = -(1/K') sum_k A_k grad log p(z_k, m | x) / N."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    adv = np.array([0.7, -1.3, 0.4, 0.0, 1.1, -0.2, -0.9, 0.0])
    fixed = Rewards(
        mx.zeros((8,)), mx.array(adv, dtype=mx.float32), mx.zeros(batch.answer_mask.shape)
    )
    cfg = ObjectiveConfig(trace_coef=1.0, token_coef=0.0, format_coef=0.0)
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM, fixed=fixed)[0])
    want = _grads(model, lambda: _reference_loss(model, rows, adv, NO_SIGNAL, cfg))
    _assert_grads_close(got, want)


def test_token_gradient_is_signal_weighted_cross_entropy(loaded) -> None:
    """Fixed s: grad L_token = -(1/K') sum_k sum_i s_ki grad log p(y*_i | x, z_k, m, y*_<i) / N."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    signal = np.random.default_rng(3).normal(0, 1, (8, int(batch.answer_mask.shape[1])))
    signal *= np.array(batch.answer_mask) * ~np.array(batch.is_null)[:, None]
    fixed = Rewards(mx.zeros((8,)), mx.zeros((8,)), mx.array(signal, dtype=mx.float32))
    cfg = ObjectiveConfig(trace_coef=0.0, token_coef=1.0, format_coef=0.0)
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM, fixed=fixed)[0])
    want = _grads(model, lambda: _reference_loss(model, rows, np.zeros(8), signal, cfg))
    _assert_grads_close(got, want)


CONFIGS = [
    ObjectiveConfig(),  # the released recipe: weighted_sum_log_prob, fixed token reward
    ObjectiveConfig(aggregator="geometric_mean", fixed_token_reward=False),
    ObjectiveConfig(
        aggregator="weighted_sum_inverse_prob", fixed_token_reward=False, clip_to_null=True
    ),
    ObjectiveConfig(aggregator="arithmetic_mean", fixed_token_reward=False),
    ObjectiveConfig(
        aggregator="log_prob", trace_coef=0.5, token_coef=2.0, format_coef=1.0, scale_by_std=False
    ),
    ObjectiveConfig(aggregator="prob", fixed_token_reward=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.aggregator)
def test_full_loss_value_and_gradient(loaded, cfg: ObjectiveConfig) -> None:
    """Rewards from the same forward pass, under stop_gradient, as a separate computation gives."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    raw, adv, signal, _ = _reference_rewards(model, rows, cfg)
    assert np.abs(adv).max() > 0.1  # the trace term is really exercised
    loss, figures = nrt_loss(model, batch, cfg, NORM)
    want = _reference_loss(model, rows, adv, signal, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    np.testing.assert_allclose(np.array(figures["trace_reward"]), raw, rtol=1e-4)
    # shape_rewards, as reference_pass runs it on the same weights: A and s as recomputed here.
    rewards, _ = reference_pass(model, batch, cfg)
    np.testing.assert_allclose(np.array(rewards.trace_reward), raw, rtol=1e-4)
    np.testing.assert_allclose(np.array(rewards.advantage), adv, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(rewards.token_signal), signal, rtol=1e-3, atol=1e-4)
    # Rewards are constants for the gradient: the reference uses them as numbers.
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM)[0])
    ref = _grads(model, lambda: _reference_loss(model, rows, adv, signal, cfg))
    _assert_grads_close(got, ref)


def test_figures(loaded) -> None:
    """The loss terms, per-row figures, and the step statistics the trainer makes of them."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    cfg = ObjectiveConfig()
    loss, m = nrt_loss(model, batch, cfg, NORM)
    raw, adv, signal, answers = _reference_rewards(model, rows, cfg)
    train = np.array([not r.is_null for r in rows])
    # Each term on its own against the reference with only that coefficient set.
    for key, coefs in (
        ("trace_loss", (1.0, 0.0, 0.0)),
        ("token_loss", (0.0, 1.0, 0.0)),
        ("format_loss", (0.0, 0.0, 1.0)),
    ):
        only = dataclasses.replace(
            cfg, trace_coef=coefs[0], token_coef=coefs[1], format_coef=coefs[2]
        )
        want = float(_reference_loss(model, rows, adv, signal, only))
        np.testing.assert_allclose(float(m[key]), want, rtol=1e-4, atol=1e-7, err_msg=key)
    total = (
        cfg.trace_coef * m["trace_loss"]
        + cfg.token_coef * m["token_loss"]
        + cfg.format_coef * m["format_loss"]
    )
    np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)
    assert float(m["loss"]) == pytest.approx(float(loss)) and float(m["format_loss"]) > 0
    # Per row: trace reward, answer NLL per token (null rows too), summed entropy over the think
    # positions (the next-token distribution at every position that predicts a think token).
    np.testing.assert_allclose(np.array(m["trace_reward"]), raw, rtol=1e-4)
    nll = np.array([-a.mean() for a in answers])
    np.testing.assert_allclose(np.array(m["answer_nll"]), nll, rtol=1e-4)
    ents = []
    for row in rows:
        logits = np.array(model(mx.array(row.tokens[:-1])[None])[0], dtype=np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ents.append(-(p * np.log(p)).sum(-1)[_where(row, THINK)])
    np.testing.assert_allclose(
        np.array(m["think_entropy"]), [e.sum() for e in ents], rtol=1e-4, atol=1e-6
    )
    assert (
        np.array(m["think_entropy"])[~train].sum() == 0 and np.array(m["think_entropy"]).max() > 0
    )
    # One update per rollout: no clipped ratio, nothing masked, every trace token counted.
    n_trace = sum(len(_where(r, THINK, MARKER)) for r in rows if not r.is_null)
    assert m["clipped_tokens"].item() == 0 and m["ratio_tokens"].item() == n_trace
    # The step's statistics as the trainer forms them (nrt_mlx.stats.trace_stats).
    traces = [t for group in _traces() for t in group]
    stats = trace_stats(
        traces,
        think_entropy=float(m["think_entropy"].sum()),
        think_tokens=batch.think_tokens,
        rewards=np.array(m["trace_reward"])[train].tolist(),
    )
    expect = {
        "reward_mean": raw[train].mean(),
        "reward_std": raw[train].std(),
        "trace_tokens_mean": np.mean(
            [sum(s == THINK for s in r.segments) for r in rows if not r.is_null]
        ),
        "marker_rate": 4 / 6,
        "trace_entropy": np.concatenate(ents).mean(),
    }
    for key, value in expect.items():
        np.testing.assert_allclose(stats[key], value, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(
        np.array(m["answer_nll"])[~train].mean(), nll[~train].mean(), rtol=1e-4
    )


def test_reference_pass(loaded) -> None:
    """Rewards and [B, L] token log-probs for several updates per rollout, without gradient."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    cfg = ObjectiveConfig()
    rewards, lp = reference_pass(model, batch, cfg)
    _, adv, _, _ = _reference_rewards(model, rows, cfg)
    np.testing.assert_allclose(np.array(rewards.advantage), adv, rtol=1e-3, atol=1e-4)
    train = ~np.array(batch.is_null)
    np.testing.assert_array_equal(
        np.array(rewards.token_signal), np.array(batch.answer_mask) * train[:, None]
    )
    for b, row in enumerate(rows):
        want = np.array(_row_logprobs(model, row))
        np.testing.assert_allclose(np.array(lp)[b, 1 : len(row.tokens)], want, rtol=1e-4, atol=1e-5)
        assert np.array(lp)[b, 0] == 0


def test_padding_changes_nothing(loaded) -> None:
    model, vocab = loaded
    rows = _rows(vocab)
    cfg = ObjectiveConfig(aggregator="weighted_sum_inverse_prob", fixed_token_reward=False)
    tight = collate(rows, vocab.pad_id)
    loose = _pad(collate(rows, 7), 7, extra_tokens=13, extra_answer=3)
    (l1, m1), (l2, m2) = nrt_loss(model, tight, cfg, NORM), nrt_loss(model, loose, cfg, NORM)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert m1.keys() == m2.keys()
    for key in m1:
        np.testing.assert_allclose(
            np.array(m1[key]), np.array(m2[key]), rtol=1e-4, atol=1e-6, err_msg=key
        )
    g1 = _grads(model, lambda: nrt_loss(model, tight, cfg, NORM)[0])
    g2 = _grads(model, lambda: nrt_loss(model, loose, cfg, NORM)[0])
    _assert_grads_close(g2, g1)


def test_row_order_and_batch_composition(loaded) -> None:
    """A question's loss does not depend on the other question sharing its batch (micro-batching)."""
    model, vocab = loaded
    rows = _rows(vocab)
    cfg = ObjectiveConfig(aggregator="weighted_sum_log_prob", fixed_token_reward=False)
    both = float(nrt_loss(model, collate(rows, 0), cfg, NORM)[0])
    first = float(nrt_loss(model, collate(rows[:4], 0), cfg, NORM)[0])
    second = float(nrt_loss(model, collate(rows[4:], 0), cfg, NORM)[0])
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-4)


def _old_batch(batch, lp, shift: float):
    """old log-probs = current ones + shift on trace tokens (ratio p/p_old = exp(-shift))."""
    segs = np.array(batch.segments)
    trace = mx.array((segs == THINK) | (segs == MARKER))
    return dataclasses.replace(batch, old_logprobs=lp + shift * trace)


@pytest.mark.parametrize(
    "shift, kept, rho", [(-math.log(2), "neg", 1.28), (math.log(2), "pos", 0.8)]
)
def test_clipped_ratio_and_masking(loaded, shift: float, kept: str, rho: float) -> None:
    """ratio 2: A > 0 masked, A < 0 weighted 1.28; ratio 0.5: A < 0 masked, A > 0 weighted 0.8."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    cfg = ObjectiveConfig(trace_coef=1.0, token_coef=0.0, format_coef=0.0)
    rewards, lp = reference_pass(model, batch, cfg)
    adv = np.array(rewards.advantage)
    train = np.array([not r.is_null for r in rows])
    assert (adv[train] != 0).all()  # every trace row is either kept or masked below
    same = _old_batch(batch, lp, 0.0)
    np.testing.assert_allclose(
        float(nrt_loss(model, same, cfg, NORM, rewards)[0]),
        float(nrt_loss(model, batch, cfg, NORM)[0]),
        rtol=1e-5,
    )
    shifted = _old_batch(batch, lp, shift)
    keep = adv < 0 if kept == "neg" else adv > 0
    weights = [
        np.full(len(_where(r, THINK, MARKER)), rho if keep[b] else 0.0) for b, r in enumerate(rows)
    ]
    loss, m = nrt_loss(model, shifted, cfg, NORM, rewards)
    want = _reference_loss(model, rows, adv, NO_SIGNAL, cfg, weights)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    n_trace = np.array([len(w) for w in weights])
    masked = int(n_trace[train & ~keep].sum())
    assert 0 < masked < n_trace[train].sum()
    assert m["clipped_tokens"].item() == masked
    assert m["ratio_tokens"].item() == n_trace[train].sum()
    _assert_grads_close(
        _grads(model, lambda: nrt_loss(model, shifted, cfg, NORM, rewards)[0]),
        _grads(model, lambda: _reference_loss(model, rows, adv, NO_SIGNAL, cfg, weights)),
    )


# Log-ratio shifts old - new, away from every clip bound: ratios 0.61 0.74 0.82 1 1.22 1.35 1.65.
SHIFTS = np.array([0.5, 0.3, 0.2, 0.0, -0.2, -0.3, -0.5])


@pytest.mark.parametrize("low, high", [(0.2, 0.28), (0.1, 0.4)])
def test_clip_counts_match_numpy(loaded, low: float, high: float) -> None:
    """clipped_tokens / ratio_tokens count exactly the think + marker tokens of the trace rows that
    the CISPO rule masks: A > 0 with ratio > 1 + eps_high, or A < 0 with ratio < 1 - eps_low."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    cfg = ObjectiveConfig(clip_ratio_low=low, clip_ratio_high=high)
    _, lp = reference_pass(model, batch, cfg)
    rng = np.random.default_rng(5)
    # Every position is shifted (prompt, answer, padding and null rows too): only the trace tokens
    # of trace rows may count. Null rows get an advantage as well; the loss must ignore it.
    shift = rng.choice(SHIFTS, size=tuple(lp.shape))
    adv = np.array([0.9, -0.6, 0.0, 1.5, -1.2, 0.4, 0.7, -2.0])
    fixed = Rewards(
        mx.zeros((8,)), mx.array(adv, dtype=mx.float32), mx.zeros(batch.answer_mask.shape)
    )
    old = dataclasses.replace(batch, old_logprobs=lp + mx.array(shift, dtype=mx.float32))
    _, m = nrt_loss(model, old, cfg, NORM, fixed)

    ratio = np.exp(-shift)
    a = adv[:, None]
    rule = ((a > 0) & (ratio > 1 + high)) | ((a < 0) & (ratio < 1 - low))
    on_trace = np.zeros(shift.shape, dtype=bool)
    for b, row in enumerate(rows):
        if not row.is_null:
            segs = np.array(row.segments)
            on_trace[b, : len(segs)] = (segs == THINK) | (segs == MARKER)
    want_clipped, want_counted = int((rule & on_trace).sum()), int(on_trace.sum())
    assert 0 < want_clipped < want_counted
    # The test tells the trace tokens apart: counting every masked position would differ.
    assert int(rule.sum()) != want_clipped
    assert m["clipped_tokens"].item() == want_clipped
    assert m["ratio_tokens"].item() == want_counted


def test_sft_loss(loaded) -> None:
    model, vocab = loaded
    prompt = vocab.encode_prompt("two plus two")
    rows = sft_rows(prompt, vocab.encode_answer(" four"), 0, 64)
    rows += sft_rows(prompt[:-2], vocab.encode_answer(" Paris is the capital of France"), 1, 64)
    batch = collate(rows, vocab.pad_id)
    per_token = [-np.array(_pick(_row_logprobs(model, r), _where(r, ANSWER))) for r in rows]
    loss, m = sft_loss(model, batch)
    np.testing.assert_allclose(float(loss), np.mean([x.mean() for x in per_token]), rtol=1e-5)
    np.testing.assert_allclose(np.array(m["answer_nll"]), [x.mean() for x in per_token], rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        float(sft_loss(model, batch, 10.0)[0]),
        np.mean([x.sum() / 10 for x in per_token]),
        rtol=1e-5,
    )
    padded = _pad(collate(rows, 5), 5, extra_tokens=13, extra_answer=2)
    np.testing.assert_allclose(float(sft_loss(model, padded)[0]), float(loss), rtol=1e-5)


def test_loss_bad_inputs(loaded) -> None:
    model, vocab = loaded
    rows = _rows(vocab)
    with pytest.raises(NrtError, match="unknown aggregator 'nope'"):
        nrt_loss(model, collate(rows, 0), ObjectiveConfig(aggregator="nope"), NORM)
    # Rows without null-think rows (as for SFT) give no b_i and no R_null.
    plain = [dataclasses.replace(r, emitted_marker=True) for r in rows if not r.is_null]
    with pytest.raises(NrtError, match="no null-think rows"):
        nrt_loss(model, collate(plain, 0), ObjectiveConfig(), NORM)
    with pytest.raises(NrtError, match="no null-think rows"):
        reference_pass(model, collate(plain, 0), ObjectiveConfig())


# ============================================================================================
# Temperature-consistent scoring and the released loss scale
# ============================================================================================

TEMPERATURE = 0.7


def _tempered64(model, row: Row, temperature: float) -> np.ndarray:
    """float64 numpy log softmax(logits / T) of one unpadded row, [n - 1, V]."""
    x = np.array(model(mx.array(row.tokens[:-1])[None])[0], dtype=np.float64) / temperature
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def test_forward_scores_logits_over_the_temperature(loaded) -> None:
    """log p and the entropy of softmax(logits / T) at every position; T = 1 is the model."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    lp, ent = forward(model, batch, TEMPERATURE)
    lp1, ent1 = forward(model, batch)
    for b, row in enumerate(rows):
        n = len(row.tokens)
        ls = _tempered64(model, row, TEMPERATURE)
        want_lp = ls[np.arange(n - 1), row.tokens[1:]]
        want_ent = -(np.exp(ls) * ls).sum(-1)
        np.testing.assert_allclose(np.array(lp)[b, 1:n], want_lp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(ent)[b, 1:n], want_ent, rtol=1e-5, atol=1e-5)
        # The tempered figures are not the model's own: T really reaches them.
        ls1 = _tempered64(model, row, 1.0)
        assert np.abs(ls1[np.arange(n - 1), row.tokens[1:]] - want_lp).max() > 0.05
        np.testing.assert_allclose(
            np.array(lp1)[b, 1:n], ls1[np.arange(n - 1), row.tokens[1:]], rtol=1e-5, atol=1e-5
        )
    np.testing.assert_array_equal(np.array(forward(model, batch, 1.0)[0]), np.array(lp1))
    np.testing.assert_array_equal(np.array(forward(model, batch, 1.0)[1]), np.array(ent1))


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: c.aggregator)
def test_rewards_and_loss_at_the_sampling_temperature(loaded, cfg: ObjectiveConfig) -> None:
    """Rewards (c, b), the loss, its gradient and the think entropy all score logits / T."""
    model, vocab = loaded
    rows = _rows(vocab)
    batch = collate(rows, vocab.pad_id)
    tempered = [_tempered64(model, r, TEMPERATURE) for r in rows]
    answers = [
        ls[_where(r, ANSWER), np.array(r.tokens[1:])[_where(r, ANSWER)]]
        for ls, r in zip(tempered, rows)
    ]
    raw, adv, signal, _ = _reference_rewards(model, rows, cfg, answers)
    assert np.abs(adv).max() > 0.1
    loss, figures = nrt_loss(model, batch, cfg, NORM, temperature=TEMPERATURE)
    np.testing.assert_allclose(np.array(figures["trace_reward"]), raw, rtol=1e-4)
    rewards, _ = reference_pass(model, batch, cfg, TEMPERATURE)
    np.testing.assert_allclose(np.array(rewards.trace_reward), raw, rtol=1e-4)
    np.testing.assert_allclose(np.array(rewards.advantage), adv, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.array(rewards.token_signal), signal, rtol=1e-3, atol=1e-4)
    # The think entropy figure is that of the distribution the traces were sampled from.
    want_ent = [-(np.exp(ls) * ls).sum(-1)[_where(r, THINK)].sum() for ls, r in zip(tempered, rows)]
    np.testing.assert_allclose(np.array(figures["think_entropy"]), want_ent, rtol=1e-4, atol=1e-5)
    want = _reference_loss(model, rows, adv, signal, cfg, temperature=TEMPERATURE)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    untempered = float(nrt_loss(model, batch, cfg, NORM)[0])
    assert abs(untempered - float(loss)) > 1e-3 * abs(float(loss))
    _assert_grads_close(
        _grads(model, lambda: nrt_loss(model, batch, cfg, NORM, temperature=TEMPERATURE)[0]),
        _grads(model, lambda: _reference_loss(model, rows, adv, signal, cfg, None, TEMPERATURE)),
    )


def test_response_width_is_the_longest_trace_response(loaded) -> None:
    """W counts think, marker and answer tokens of trace rows, over all the step's batches."""
    model, vocab = loaded
    rows = _rows(vocab)
    prompt = {
        q: len(vocab.encode_prompt([{"role": "user", "content": text}]))
        for q, (text, _) in enumerate(QUESTIONS)
    }
    per_question = [
        max(len(r.tokens) - prompt[q] for r in rows if r.question == q and not r.is_null)
        for q in (0, 1)
    ]
    assert per_question[0] != per_question[1]
    first, second = collate(rows[:4], vocab.pad_id), collate(rows[4:], vocab.pad_id)
    assert response_width([first]) == per_question[0]
    assert response_width([second]) == per_question[1]
    assert response_width([first, second]) == max(per_question)
    assert response_width([_pad(collate(rows, 7), 7, extra_tokens=13)]) == max(per_question)
    assert released_normalizer(max(per_question)) == max(per_question) / 16


def test_released_normalizer_gives_the_released_update_scale() -> None:
    """The released update of a 64-question mini-batch, K = 8 (512 rows): 8 GPUs, each 4 micro-
    batches of 16 rows, each micro-batch's loss sum_k l_k / W scaled by 1/4 (gradient
    accumulation), gradients averaged over the GPUs (FSDP). The loss is linear in the row sums l_k,
    so equal losses mean equal gradients: ours is mean_k l_k / N with N = released_normalizer(W)."""
    rng = np.random.default_rng(0)
    width = 3001
    row_sums = rng.normal(0.0, 300.0, 512)
    gpus = row_sums.reshape(8, 4, 16)
    released = np.mean([sum(micro.sum() / width / 4 for micro in gpu) for gpu in gpus])
    ours = row_sums.mean() / released_normalizer(width)
    np.testing.assert_allclose(ours, released, rtol=1e-12)
    # 0.1's constant, with the released lengths (think 2048, answers 4096), is 24 times larger.
    assert (2048 + 4096) / released_normalizer(4096) == 24
