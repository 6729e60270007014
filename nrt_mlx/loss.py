"""The NRT loss (../shared/NRT.md, "From rewards to a loss") and the plain SFT loss.

One forward pass of ``model(tokens[:, :-1])`` gives the log-probability of every token. The
answer log-probs, under stop_gradient, give the rewards (the null-think row of each question, in
the same batch, gives b_i and R_null); the same log-probs, with gradient, give the loss::

    L_trace  = - A_k sum_{t in z_k, m} rho_t log p(t)
    L_token  = - sum_i s_{k,i} log p(y*_i | x, z_k, m, y*_<i)
    L_format = - log p(m | x, z_k)                 rows whose sample did not emit m
    L        = mean over training rows of (c_trace L_trace + c_token L_token + c_format L_format) / N

With A_k fixed, grad L_trace is the REINFORCE estimate -A_k grad log p(z_k, m | x), and grad
L_token the signal-weighted cross-entropy gradient: together the paper's eq. nrt_gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import ObjectiveConfig
from nrt_mlx.rewards import aggregate, clip_to_null, group_normalize, normalize_token_signal
from nrt_mlx.sequences import MARKER, THINK, Batch


def token_logprobs(logits: mx.array, targets: mx.array) -> mx.array:
    """log p(target) = logit[target] - logsumexp(logits), in float32. logits [..., V], targets [...]."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - mx.logsumexp(logits, axis=-1)


def entropy(logits: mx.array) -> mx.array:
    """H = logsumexp(l) - sum_v softmax(l)_v l_v, per position, without gradient."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    lse = mx.logsumexp(logits, axis=-1, keepdims=True)
    probs = mx.exp(logits - lse)
    return lse.squeeze(-1) - (probs * logits).sum(axis=-1)


def forward_logprobs(
    model: Any, batch: Batch, with_entropy: bool = False
) -> tuple[mx.array, mx.array | None]:
    """log p(tokens[:, j] | tokens[:, <j]) as [B, L] (0 at j = 0), and the entropy there if asked."""
    logits = model(batch.tokens[:, :-1])
    lp = token_logprobs(logits, batch.tokens[:, 1:])
    zero = mx.zeros((lp.shape[0], 1), dtype=lp.dtype)
    lp = mx.concatenate([zero, lp], axis=1)
    ent = mx.concatenate([zero, entropy(logits)], axis=1) if with_entropy else None
    return lp, ent


def answer_logprobs(logprobs: mx.array, batch: Batch) -> mx.array:
    """[B, T] log-probs of the answer tokens (0 where padded), from the [B, L] per-token log-probs."""
    return mx.take_along_axis(logprobs, batch.answer_positions, axis=1) * batch.answer_mask


@dataclass
class Rewards:
    """What the loss needs from the rewards; every field carries no gradient."""

    trace_reward: mx.array  # [B] raw trace reward R (null rows: R_null)
    advantage: mx.array  # [B] A: normalised (clipped) trace reward, 0 on null rows
    token_signal: mx.array  # [B, T] normalised s (ones under fixed_token_reward), 0 on null rows


def compute_rewards(answer_lp: mx.array, batch: Batch, cfg: ObjectiveConfig) -> Rewards:
    """Rewards from the [B, T] answer log-probs of a batch whose null rows give b_i and R_null."""
    answer_lp = mx.stop_gradient(answer_lp)
    mask = batch.answer_mask
    null_index = mx.maximum(batch.null_row, 0)
    reward, signal = aggregate(cfg.aggregator, answer_lp, mask, answer_lp[null_index])
    train = ~batch.is_null
    used = clip_to_null(reward, reward[null_index]) if cfg.clip_to_null else reward
    advantage = group_normalize(used, batch.question, cfg.scale_by_std, mask=train)
    if cfg.fixed_token_reward:
        # s = 1: the token term becomes plain cross-entropy of y* after each sampled trace.
        signal = mask * train[:, None]
    else:
        signal = normalize_token_signal(
            signal, mask, batch.question, cfg.scale_by_std, row_mask=train
        )
    return Rewards(reward, advantage, mx.stop_gradient(signal))


def score_batch(model: Any, batch: Batch, cfg: ObjectiveConfig) -> tuple[Rewards, mx.array]:
    """Rewards under the current weights and the [B, L] token log-probs, without gradient.

    For several updates per rollout batch: call once before the first update, keep the rewards
    fixed (pass them to ``nrt_loss``) and use the log-probs as ``old_logprobs``
    (``dataclasses.replace(batch, old_logprobs=lp)``).
    """
    _check_nrt_batch(batch)
    lp, _ = forward_logprobs(model, batch)
    lp = mx.stop_gradient(lp)
    return compute_rewards(answer_logprobs(lp, batch), batch, cfg), lp


def _check_nrt_batch(batch: Batch) -> None:
    null_row = np.array(batch.null_row)
    is_null = np.array(batch.is_null)
    missing = np.flatnonzero((null_row < 0) & ~is_null)
    if missing.size:
        q = int(np.array(batch.question)[missing[0]])
        raise NrtError(
            f"question {q} has no null-think row in the batch; the NRT loss needs one per question "
            f"(build_rows adds it, and micro-batches must keep whole questions)"
        )
    if not (~is_null).any():
        raise NrtError("the batch has no training rows, only null-think rows")


def _check_rewards(rewards: Rewards, shape: tuple[int, int]) -> None:
    got = (tuple(rewards.advantage.shape), tuple(rewards.token_signal.shape))
    if got != (shape[:1], shape):
        raise NrtError(
            f"rewards do not fit the batch: advantage {got[0]} and token_signal {got[1]}, "
            f"expected {shape[:1]} and {shape} (score the same batch that is trained on)"
        )


def _trace_weights(
    lp: mx.array, batch: Batch, advantage: mx.array, cfg: ObjectiveConfig
) -> tuple[mx.array, mx.array]:
    """rho_t per token ([B, L], no gradient; 0 where masked out) and the fraction masked out.

    rho_t = clamp(p/p_old, 1 - eps_low, 1 + eps_high) (CISPO); tokens with A > 0 and ratio above
    1 + eps_high, or A < 0 and ratio below 1 - eps_low, are masked. Without old log-probs rho = 1.
    """
    if batch.old_logprobs is None:
        return mx.ones_like(lp), mx.array(0.0)
    low, high = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    ratio = mx.exp(mx.stop_gradient(lp) - batch.old_logprobs)
    adv = advantage[:, None]
    masked = ((adv > 0) & (ratio > high)) | ((adv < 0) & (ratio < low))
    rho = mx.clip(ratio, low, high)
    segs = batch.segments
    trace = ((segs == THINK) | (segs == MARKER)) & ~batch.is_null[:, None]
    frac = (masked & trace).sum() / mx.maximum(trace.sum(), 1)
    return mx.where(masked, 0.0, rho), frac


def _row_mean(x: mx.array, rows: mx.array) -> mx.array:
    """Mean of [B] values over the rows where ``rows`` is 1."""
    return (x * rows).sum() / mx.maximum(rows.sum(), 1.0)


def _metrics(
    lp: mx.array,
    ent: mx.array,
    ans: mx.array,
    batch: Batch,
    rewards: Rewards,
    train: mx.array,
) -> dict[str, mx.array]:
    """The figures a user watches, all without gradient."""
    lp, ans = mx.stop_gradient(lp), mx.stop_gradient(ans)
    null = 1.0 - train
    n_answer = mx.maximum(batch.answer_mask.sum(axis=-1), 1.0)
    nll = -ans.sum(axis=-1) / n_answer
    think = (batch.segments == THINK).astype(mx.float32)
    reward = rewards.trace_reward
    reward_mean = _row_mean(reward, train)
    reward_var = _row_mean((reward - reward_mean) ** 2, train)
    return {
        "reward_mean": reward_mean,
        "reward_std": mx.sqrt(reward_var),
        "answer_nll": _row_mean(nll, train),
        "null_answer_nll": _row_mean(nll, null),
        "trace_tokens": _row_mean(think.sum(axis=-1), train),
        "marker_rate": _row_mean(batch.emitted_marker.astype(mx.float32), train),
        "trace_entropy": (ent * think).sum() / mx.maximum(think.sum(), 1.0),
        "trace_reward": reward,
        "advantage": rewards.advantage,
    }


def nrt_loss(
    model: Any,
    batch: Batch,
    cfg: ObjectiveConfig,
    normalizer: float,
    rewards: Rewards | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """NRT loss of a batch of K training rows plus one null-think row per question.

    ``normalizer`` N divides every row's token sums (the recipe's objective.normalizer, resolved
    by the trainer; must be > 0). ``rewards`` fixes the rewards (e.g. from ``score_batch`` before
    several updates); by default they come from the same forward pass, under stop_gradient.
    Returns the loss, a plain mean over training rows, and the metrics (scalars; ``trace_reward``
    and ``advantage`` [B]).
    """
    if not normalizer > 0:
        raise NrtError(f"the loss normalizer must be > 0, got {normalizer}")
    _check_nrt_batch(batch)
    lp, ent = forward_logprobs(model, batch, with_entropy=True)
    ans = answer_logprobs(lp, batch)
    if rewards is None:
        rewards = compute_rewards(ans, batch, cfg)
    _check_rewards(rewards, tuple(ans.shape))
    train = (~batch.is_null).astype(mx.float32)
    segs = batch.segments
    advantage = mx.stop_gradient(rewards.advantage) * train
    rho, masked_frac = _trace_weights(lp, batch, advantage, cfg)
    on_trace = (segs == THINK) | (segs == MARKER)
    trace_loss = -advantage * mx.where(on_trace, rho * lp, 0.0).sum(axis=-1)
    token_loss = -(mx.stop_gradient(rewards.token_signal) * ans).sum(axis=-1) * train
    needs_format = train * (~batch.emitted_marker).astype(mx.float32)
    format_loss = -mx.where(segs == MARKER, lp, 0.0).sum(axis=-1) * needs_format
    terms = {
        "trace_loss": _row_mean(trace_loss, train) / normalizer,
        "token_loss": _row_mean(token_loss, train) / normalizer,
        "format_loss": _row_mean(format_loss, train) / normalizer,
    }
    loss = (
        cfg.trace_coef * terms["trace_loss"]
        + cfg.token_coef * terms["token_loss"]
        + cfg.format_coef * terms["format_loss"]
    )
    metrics = {"loss": mx.stop_gradient(loss)}
    metrics.update({k: mx.stop_gradient(v) for k, v in terms.items()})
    metrics.update(_metrics(lp, ent, ans, batch, rewards, train))
    metrics["ratio_masked"] = masked_frac
    return loss, metrics


def sft_loss(
    model: Any, batch: Batch, normalizer: float = 0
) -> tuple[mx.array, dict[str, mx.array]]:
    """Cross-entropy of the answer tokens: -sum_i log p(y*_i | x, y*_<i) per row, mean over rows.

    Each row's sum is divided by ``normalizer`` when it is > 0, else by the row's answer length
    (CE per token). Null-think rows, if any, are left out.
    """
    lp, _ = forward_logprobs(model, batch)
    ans = answer_logprobs(lp, batch)
    rows = (~batch.is_null).astype(mx.float32)
    n_answer = batch.answer_mask.sum(axis=-1)
    nll = -ans.sum(axis=-1)
    per_row = nll / normalizer if normalizer > 0 else nll / mx.maximum(n_answer, 1.0)
    loss = _row_mean(per_row, rows)
    metrics = {
        "loss": mx.stop_gradient(loss),
        "answer_nll": mx.stop_gradient(_row_mean(nll / mx.maximum(n_answer, 1.0), rows)),
        "answer_tokens": _row_mean(n_answer, rows),
    }
    return loss, metrics
