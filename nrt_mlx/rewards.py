"""Trace rewards and token signals of NRT, and their normalisation per question.

With the per-token answer probabilities under the trace, c_{k,i} = p(y*_i | x, z_k, m, y*_<i), and
without it (the null-think row), b_i = p(y*_i | x, m, y*_<i), an aggregator gives the trace reward
R_k and the token signal s_{k,i} = alpha_{k,i} c_{k,i} with alpha = dR/dc (../shared/NRT.md)::

    log_prob                   R = sum_i log c_i              s_i = 1
    prob                       R = prod_i c_i                 s_i = R
    geometric_mean             R = (prod_i c_i)^(1/T)         s_i = R / T
    arithmetic_mean            R = (1/T) sum_i c_i            s_i = c_i / T
    weighted_sum_inverse_prob  R = (1/T) sum_i c_i / b_i      s_i = (c_i / b_i) / T
    weighted_sum_log_prob      R = (1/T) sum_i c_i (-log b_i) s_i = c_i (-log b_i) / T

Inputs are log-probabilities [B, T] and a mask [B, T]; T counts the real answer tokens of each
row (EOS included). Products are taken as exp of a sum of log-probabilities, so a long answer
cannot underflow to a wrong value through repeated multiplication.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from nrt_mlx.errors import NrtError

AggregatorFn = Callable[[mx.array, mx.array, "mx.array | None"], tuple[mx.array, mx.array]]

# c_i / b_i is capped at e^80 per token: far beyond any real ratio (log-probs near -30 give e^30),
# yet small enough that a sum over thousands of tokens and K samples stays finite in float32.
MAX_LOG_RATIO = 80.0

# Rewards of a group that agree to this relative precision count as equal (float32 noise): the
# group's normalised values are then 0, as for a group whose std is exactly 0.
EQUAL_RTOL = 1e-6


@dataclass(frozen=True)
class Aggregator:
    """A registered aggregator: ``fn(answer_logprobs, mask, null_logprobs) -> (R [B], s [B, T])``."""

    name: str
    fn: AggregatorFn
    needs_null: bool = False


# name -> Aggregator; iterating gives the names, ``name in AGGREGATORS`` checks one.
AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(
    name: str, fn: AggregatorFn, needs_null: bool = False, overwrite: bool = False
) -> None:
    """Add an aggregator under ``name``.

    ``fn(answer_logprobs [B, T], mask [B, T] float, null_logprobs [B, T] | None)`` returns
    ``(trace_reward [B], token_signal [B, T])``. Log-probs arrive as 0 where the mask is 0, and the
    token signal is zeroed there afterwards. ``needs_null`` makes ``null_logprobs`` required.
    """
    if not isinstance(name, str) or not name:
        raise NrtError(f"an aggregator name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise NrtError(f"aggregator '{name}': fn must be callable, got {type(fn).__name__}")
    if name in AGGREGATORS and not overwrite:
        raise NrtError(
            f"aggregator '{name}' is already registered (pass overwrite=True to replace it)"
        )
    AGGREGATORS[name] = Aggregator(name, fn, needs_null)


def _counts(mask: mx.array) -> mx.array:
    """T per row, at least 1 so an empty row gives 0 instead of 0/0."""
    return mx.maximum(mask.sum(axis=-1), 1.0)


def _log_prob(lp: mx.array, mask: mx.array, null: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = sum_i log c_i, s_i = 1."""
    return lp.sum(axis=-1), mask


def _prob(lp: mx.array, mask: mx.array, null: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = prod_i c_i = exp(sum_i log c_i), s_i = R."""
    reward = mx.exp(lp.sum(axis=-1))
    return reward, reward[:, None] * mask


def _geometric_mean(
    lp: mx.array, mask: mx.array, null: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (prod_i c_i)^(1/T) = exp(mean_i log c_i), s_i = R / T."""
    n = _counts(mask)
    reward = mx.exp(lp.sum(axis=-1) / n)
    return reward, (reward / n)[:, None] * mask


def _arithmetic_mean(
    lp: mx.array, mask: mx.array, null: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i, s_i = c_i / T."""
    # Each c_i = exp(log c_i) is a number in (0, 1]: a sum of them cannot underflow as a product can.
    n = _counts(mask)[:, None]
    signal = mx.exp(lp) * mask / n
    return signal.sum(axis=-1), signal


def _weighted_sum_inverse_prob(
    lp: mx.array, mask: mx.array, null: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i / b_i, s_i = (c_i / b_i) / T, with c_i / b_i = exp(log c_i - log b_i)."""
    n = _counts(mask)[:, None]
    signal = mx.exp(mx.minimum(lp - null, MAX_LOG_RATIO)) * mask / n
    return signal.sum(axis=-1), signal


def _weighted_sum_log_prob(
    lp: mx.array, mask: mx.array, null: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i (-log b_i), s_i = c_i (-log b_i) / T."""
    n = _counts(mask)[:, None]
    signal = mx.exp(lp) * (-null) * mask / n
    return signal.sum(axis=-1), signal


for _name, _fn, _null in (
    ("log_prob", _log_prob, False),
    ("prob", _prob, False),
    ("geometric_mean", _geometric_mean, False),
    ("arithmetic_mean", _arithmetic_mean, False),
    ("weighted_sum_inverse_prob", _weighted_sum_inverse_prob, True),
    ("weighted_sum_log_prob", _weighted_sum_log_prob, True),
):
    register_aggregator(_name, _fn, needs_null=_null)


def _shape(x: mx.array) -> tuple[int, ...]:
    return tuple(x.shape)


def _check_2d(name: str, x: mx.array, expected: tuple[int, ...] | None = None) -> None:
    if not isinstance(x, mx.array):
        raise NrtError(f"{name} must be an mx.array, got {type(x).__name__}")
    if expected is None and x.ndim != 2:
        raise NrtError(f"{name} must be 2-D [B, T], got shape {_shape(x)}")
    if expected is not None and _shape(x) != expected:
        raise NrtError(f"{name} must have the shape of answer_logprobs {expected}, got {_shape(x)}")


def get_aggregator(mode: str) -> Aggregator:
    """The registered aggregator called ``mode``; an unknown name lists the valid ones."""
    if mode not in AGGREGATORS:
        raise NrtError(f"unknown aggregator '{mode}', valid: {', '.join(AGGREGATORS)}")
    return AGGREGATORS[mode]


def aggregate(
    mode: str,
    answer_logprobs: mx.array,
    mask: mx.array,
    null_logprobs: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """(trace_reward [B], token_signal [B, T]) of aggregator ``mode``.

    ``answer_logprobs`` are log c_{k,i}, ``null_logprobs`` log b_i of the same answer tokens
    (required by the weighted sums), ``mask`` 1 on real answer tokens. The token signal is 0 where
    the mask is 0; values under the mask are ignored (they may be anything, even inf).
    """
    agg = get_aggregator(mode)
    _check_2d("answer_logprobs", answer_logprobs)
    expected = _shape(answer_logprobs)
    _check_2d("mask", mask, expected)
    if null_logprobs is None and agg.needs_null:
        raise NrtError(
            f"aggregator '{mode}' weights tokens by the null-think probabilities b_i: pass "
            f"null_logprobs of shape {expected} (log-probs of the answer without the trace)"
        )
    valid = mask > 0
    fmask = valid.astype(mx.float32)
    lp = mx.where(valid, answer_logprobs.astype(mx.float32), 0.0)
    null = None
    if null_logprobs is not None:
        _check_2d("null_logprobs", null_logprobs, expected)
        null = mx.where(valid, null_logprobs.astype(mx.float32), 0.0)
    reward, signal = agg.fn(lp, fmask, null)
    if _shape(reward) != expected[:1] or _shape(signal) != expected:
        raise NrtError(
            f"aggregator '{mode}' returned shapes {_shape(reward)} and {_shape(signal)}, "
            f"expected {expected[:1]} and {expected}"
        )
    return reward.astype(mx.float32), mx.where(valid, signal, 0.0).astype(mx.float32)


# --------------------------------------------------------------------------------------------
# Normalisation per question
# --------------------------------------------------------------------------------------------


def _group_sum(same: mx.array, per_row: mx.array) -> mx.array:
    """For each row, the sum of ``per_row`` over the rows of its group."""
    return (same * per_row[None, :]).sum(axis=-1)


def _group_max(same: mx.array, per_row: mx.array, empty: float) -> mx.array:
    return mx.where(same, per_row[None, :], empty).max(axis=-1)


def _normalize(values: mx.array, mask: mx.array, groups: mx.array, scale_by_std: bool) -> mx.array:
    """(v - mean_g) / std_g over the masked entries of each group g (rows [B, N]); 0 elsewhere.

    Values are first shifted by their group's maximum, so equal values cancel exactly, and scaled
    by the largest deviation, so squares cannot overflow for rewards such as prod c_i / b_i. The
    std is the unbiased one (as torch.std in the reference recipe); a group with one entry, or
    whose entries agree to EQUAL_RTOL, gives 0.
    """
    valid = mask > 0
    fmask = valid.astype(mx.float32)
    values = mx.stop_gradient(values.astype(mx.float32))
    same = groups[:, None] == groups[None, :]
    fsame = same.astype(mx.float32)
    group_top = _group_max(same, mx.where(valid, values, -mx.inf).max(axis=-1), -mx.inf)
    dev = mx.where(valid, values - group_top[:, None], 0.0)
    scale = _group_max(same, mx.abs(dev).max(axis=-1), 0.0)
    size = _group_max(same, mx.where(valid, mx.abs(values), 0.0).max(axis=-1), 0.0)
    count = _group_sum(fsame, fmask.sum(axis=-1))
    equal = (scale <= EQUAL_RTOL * size) | (count <= 1)
    scale = mx.where(equal, 1.0, scale)
    dev = dev / scale[:, None]
    mean = _group_sum(fsame, dev.sum(axis=-1)) / mx.maximum(count, 1.0)
    centred = mx.where(valid, dev - mean[:, None], 0.0)
    if scale_by_std:
        var = _group_sum(fsame, (centred * centred).sum(axis=-1)) / mx.maximum(count - 1.0, 1.0)
        out = centred / mx.sqrt(mx.maximum(var, 1e-30))[:, None]
    else:
        out = centred * scale[:, None]
    return mx.where(valid & ~equal[:, None], out, 0.0)


def _check_groups(groups: mx.array, b: int) -> None:
    if not isinstance(groups, mx.array) or _shape(groups) != (b,):
        got = _shape(groups) if isinstance(groups, mx.array) else type(groups).__name__
        raise NrtError(f"groups must be [B] = ({b},) question ids, got {got}")


def group_normalize(
    values: mx.array, groups: mx.array, scale_by_std: bool = True, mask: mx.array | None = None
) -> mx.array:
    """A_k = (R_k - mean_g R) / std_g R over the rows k of each question g (``groups`` [B] ids).

    Without ``scale_by_std`` only the mean is removed. Rows where ``mask`` [B] is 0 (null-think
    rows) take no part and get 0; a group of one row, or of equal values, gets 0.
    """
    if not isinstance(values, mx.array) or values.ndim != 1:
        got = _shape(values) if isinstance(values, mx.array) else type(values).__name__
        raise NrtError(f"values must be 1-D [B] rewards, got {got}")
    b = values.shape[0]
    _check_groups(groups, b)
    if mask is None:
        mask = mx.ones((b,), dtype=mx.float32)
    elif _shape(mask) != (b,):
        raise NrtError(f"mask must be [B] = ({b},), got {_shape(mask)}")
    return _normalize(values[:, None], mask[:, None], groups, scale_by_std)[:, 0]


def normalize_token_signal(
    signal: mx.array,
    mask: mx.array,
    groups: mx.array,
    scale_by_std: bool = True,
    row_mask: mx.array | None = None,
) -> mx.array:
    """s_{k,i} <- (s_{k,i} - mean_g s) / std_g s over all answer tokens of the rows of question g.

    ``row_mask`` [B] leaves rows out (null-think rows); the result is 0 off the mask.
    """
    _check_2d("signal", signal)
    _check_2d("mask", mask, _shape(signal))
    b = signal.shape[0]
    _check_groups(groups, b)
    fmask = (mask > 0).astype(mx.float32)
    if row_mask is not None:
        if _shape(row_mask) != (b,):
            raise NrtError(f"row_mask must be [B] = ({b},), got {_shape(row_mask)}")
        fmask = fmask * (row_mask > 0).astype(mx.float32)[:, None]
    return _normalize(signal, fmask, groups, scale_by_std)


def clip_to_null(trace_reward: mx.array, null_reward: mx.array) -> mx.array:
    """R_k <- max(0, R_k - R_null): only what the trace adds over thinking nothing counts."""
    if _shape(trace_reward) != _shape(null_reward):
        raise NrtError(
            f"null_reward must have the shape of trace_reward {_shape(trace_reward)}, got {_shape(null_reward)}"
        )
    return mx.maximum(trace_reward - null_reward, 0.0)
