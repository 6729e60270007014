"""The NRT objective, in the order of docs/NRT.md: answer probabilities, trace reward R and token
signal s, clipping against the null-think reward, group normalisation, reward shaping, the loss.

A batch (``nrt_mlx.batch``) holds K rows ``[prompt | z_k | m | y* EOS]`` and one null-think row
``[prompt | m | y* EOS]`` per question, checked by ``collate`` when it was built (the loss only
refuses, from host-side counts, a batch that was built for SFT). One forward pass gives
log c_{k,i} on the trace rows and log b_i on the null row; under stop_gradient they give the rewards,
with gradient the loss. Training scores the tempered distribution softmax(logits / T) that the traces
were sampled from (T = ``rollout.temperature``); SFT and evaluation score the model itself (T = 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from nrt_mlx import prefix
from nrt_mlx.batch import MARKER, THINK, Batch
from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import ObjectiveConfig, Recipe

# ---- per-token answer probabilities ---------------------------------------------------------------


def token_logprobs(logits: mx.array, targets: mx.array, lse: mx.array | None = None) -> mx.array:
    """log p(target) = logit[target] - logsumexp(logits), in float32. logits [..., V], targets [...];
    ``lse``: logsumexp(logits) [...] when the caller has it already."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return picked - (mx.logsumexp(logits, axis=-1) if lse is None else lse)


def entropy(logits: mx.array, lse: mx.array | None = None) -> mx.array:
    """H = logsumexp(l) - sum_v softmax(l)_v l_v per position, without gradient (a diagnostic);
    ``lse`` as in ``token_logprobs``."""
    logits = mx.stop_gradient(logits.astype(mx.float32))
    lse = mx.logsumexp(logits, axis=-1) if lse is None else mx.stop_gradient(lse)
    return lse - (mx.exp(logits - lse[..., None]) * logits).sum(axis=-1)


def _scored(
    logits: mx.array, targets: mx.array, temperature: float, with_entropy: bool = True
) -> tuple[mx.array, mx.array]:
    """log p_T(targets) and the entropy of p_T (0 without ``with_entropy``), with p_T =
    softmax(logits / T); one logsumexp over the vocabulary serves both (it is the costliest part
    after the model, and the entropy costs as much again)."""
    logits = logits.astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    lse = mx.logsumexp(logits, axis=-1)
    lp = token_logprobs(logits, targets, lse)
    return lp, entropy(logits, lse) if with_entropy else mx.zeros_like(lp)


def _shared_forward(model: Any, batch: Batch, temperature: float) -> tuple[mx.array, mx.array]:
    """``forward`` of a shared-prompt batch: one prompt pass, then each of ``batch.passes``
    (think part, and answer part for trace rows; nrt_mlx.prefix), put back in row order."""
    valid = batch.prompt_valid[:, :-1]
    prompt = prefix.prompt_pass(model, batch.prompts[:, :-1], valid, batch.prompt_replay)
    lps, ents = [], []
    for p in batch.passes:
        logits = prefix.continuation_logits(
            model, prompt, valid, p.questions, p.think, p.answer, p.think_valid, p.replay
        )
        targets = [p.think_targets] if p.answer is None else [p.think_targets, p.answer_targets]
        # The entropy is a figure of the think positions only: those of a trace row's think pass.
        thinks = [p.answer is not None, False]
        scored = [_scored(lg, t, temperature, h) for lg, t, h in zip(logits, targets, thinks)]
        zero = mx.zeros((p.think.shape[0], 1), dtype=mx.float32)
        lp = mx.concatenate([lp for lp, _ in scored] + [zero], axis=1)
        ent = mx.concatenate([ent for _, ent in scored] + [zero], axis=1)
        lp = lp if p.grad else mx.stop_gradient(lp)
        lps.append(mx.take_along_axis(lp, p.columns, axis=1))
        ents.append(mx.take_along_axis(ent, p.columns, axis=1))
    return mx.concatenate(lps)[batch.unpermute], mx.concatenate(ents)[batch.unpermute]


def forward(model: Any, batch: Batch, temperature: float = 1.0) -> tuple[mx.array, mx.array]:
    """log p_T(tokens[:, j] | tokens[:, <j]) and the entropy of p_T there, [B, L] each (0 at j = 0),
    with p_T = softmax(logits / T): the distribution the sampler draws from (before top-p), as in
    the released code. T = 1 is the model itself. A shared-prompt batch gives them for every token
    of its continuations (their first token included: it follows the prompt)."""
    if batch.prompts is not None:
        return _shared_forward(model, batch, temperature)
    lp, ent = _scored(model(batch.tokens[:, :-1]), batch.tokens[:, 1:], temperature)
    zero = mx.zeros((lp.shape[0], 1), dtype=mx.float32)
    return mx.concatenate([zero, lp], axis=1), mx.concatenate([zero, ent], axis=1)


def answer_logprobs(lp: mx.array, batch: Batch) -> mx.array:
    """[B, T] log c_{k,i} (log b_i on null rows) of the answer tokens, 0 on padding."""
    return mx.take_along_axis(lp, batch.answer_positions, axis=1) * batch.answer_mask


# ---- aggregators: trace reward R [B] and token signal s = (dR/dc_i) c_i [B, T] ----------------------
# Inputs: log c [B, T] and log b [B, T] (0 off the mask), mask [B, T]; T counts each row's answer
# tokens. Products are exp of sums of logs, so long answers cannot underflow.

AggregatorFn = Callable[[mx.array, mx.array, "mx.array | None"], tuple[mx.array, mx.array]]

# c_i / b_i is capped at e^80 per token: far beyond any real ratio, yet a sum over thousands of
# tokens and K samples stays finite in float32.
MAX_LOG_RATIO = 80.0


def _length(mask: mx.array) -> mx.array:
    """T per row as [B, 1], at least 1 so an empty row gives 0 instead of 0/0."""
    return mx.maximum(mask.sum(axis=-1, keepdims=True), 1.0)


def log_prob(lc: mx.array, mask: mx.array, lb: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = sum_i log c_i, s_i = 1 (JLB / JEPO)."""
    return lc.sum(axis=-1), mask


def prob(lc: mx.array, mask: mx.array, lb: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = prod_i c_i, s_i = R (VeriFree)."""
    reward = mx.exp(lc.sum(axis=-1))
    return reward, reward[:, None] * mask


def geometric_mean(lc: mx.array, mask: mx.array, lb: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = (prod_i c_i)^(1/T), s_i = R / T (NRT-GM)."""
    n = _length(mask)
    reward = mx.exp(lc.sum(axis=-1) / n[:, 0])
    return reward, reward[:, None] / n * mask


def arithmetic_mean(lc: mx.array, mask: mx.array, lb: mx.array | None) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i, s_i = c_i / T (RLPR)."""
    signal = mx.exp(lc) * mask / _length(mask)
    return signal.sum(axis=-1), signal


def weighted_sum_inverse_prob(
    lc: mx.array, mask: mx.array, lb: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i / b_i, s_i = (c_i / b_i) / T (NRT-WS, 1/p weights)."""
    signal = mx.exp(mx.minimum(lc - lb, MAX_LOG_RATIO)) * mask / _length(mask)
    return signal.sum(axis=-1), signal


def weighted_sum_log_prob(
    lc: mx.array, mask: mx.array, lb: mx.array | None
) -> tuple[mx.array, mx.array]:
    """R = (1/T) sum_i c_i (-log b_i), s_i = c_i (-log b_i) / T (NRT-WS, the paper's best)."""
    signal = mx.exp(lc) * (-lb) * mask / _length(mask)
    return signal.sum(axis=-1), signal


@dataclass(frozen=True)
class Aggregator:
    fn: AggregatorFn
    needs_null: bool  # weights tokens by the null-think probabilities b_i


AGGREGATORS: dict[str, Aggregator] = {
    "log_prob": Aggregator(log_prob, False),
    "prob": Aggregator(prob, False),
    "geometric_mean": Aggregator(geometric_mean, False),
    "arithmetic_mean": Aggregator(arithmetic_mean, False),
    "weighted_sum_inverse_prob": Aggregator(weighted_sum_inverse_prob, True),
    "weighted_sum_log_prob": Aggregator(weighted_sum_log_prob, True),
}


def aggregate(
    mode: str, lc: mx.array, mask: mx.array, lb: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """(R [B], s [B, T]) of aggregator ``mode`` from log c and log b; s is 0 off the mask.

    Values off the mask are ignored (they may be anything, even inf).
    """
    if mode not in AGGREGATORS:
        raise NrtError(f"unknown aggregator '{mode}', valid: {', '.join(AGGREGATORS)}")
    agg = AGGREGATORS[mode]
    if agg.needs_null and lb is None:
        raise NrtError(f"aggregator '{mode}' weights tokens by b_i: pass the null-think log-probs")
    valid = mask > 0
    lc = mx.where(valid, lc.astype(mx.float32), 0.0)
    lb = None if lb is None else mx.where(valid, lb.astype(mx.float32), 0.0)
    reward, signal = agg.fn(lc, valid.astype(mx.float32), lb)
    return reward.astype(mx.float32), mx.where(valid, signal, 0.0).astype(mx.float32)


# ---- from rewards to advantages -------------------------------------------------------------------


def clip_to_null(reward: mx.array, null_reward: mx.array) -> mx.array:
    """R_k <- max(0, R_k - R_null): only what the trace adds over thinking nothing counts."""
    return mx.maximum(reward - null_reward, 0.0)


# Entries of a group that agree to this relative precision count as equal (float32 noise).
EQUAL_RTOL = 1e-6


def group_normalize(
    values: mx.array, mask: mx.array, groups: mx.array, scale_by_std: bool = True
) -> mx.array:
    """(v - mean_g v) / std_g v over the masked entries of each question g; 0 elsewhere.

    ``values`` and ``mask`` are [B, N] (N = 1 for trace rewards, T for token signals), ``groups``
    [B] question ids. std is the unbiased one (N - 1), as in the released code; a group with one
    entry, or whose entries are equal, gets 0. Without ``scale_by_std`` only the mean is removed.
    """
    valid = mask > 0
    values = mx.stop_gradient(values.astype(mx.float32))
    same = groups[:, None] == groups[None, :]  # [B, B]: rows of the same question

    def per_group(x: mx.array, reduce: str, empty: float = 0.0) -> mx.array:  # [B] -> [B]
        if reduce == "sum":
            return (same * x[None, :]).sum(axis=-1)
        return mx.where(same, x[None, :], empty).max(axis=-1)

    # Stabilisation: deviations from the group's maximum, divided by the largest one, lie in
    # [-1, 0], so equal values cancel exactly and squares cannot overflow (rewards such as
    # prod c_i / b_i span dozens of orders of magnitude); the result is the same (v - mean) / std.
    top = per_group(mx.where(valid, values, -mx.inf).max(axis=-1), "max", -mx.inf)
    dev = mx.where(valid, values - top[:, None], 0.0)
    scale = per_group(mx.abs(dev).max(axis=-1), "max")
    size = per_group(mx.where(valid, mx.abs(values), 0.0).max(axis=-1), "max")
    count = per_group(valid.sum(axis=-1).astype(mx.float32), "sum")
    equal = (scale <= EQUAL_RTOL * size) | (count <= 1)
    scale = mx.where(equal, 1.0, scale)
    dev = dev / scale[:, None]
    mean = per_group(dev.sum(axis=-1), "sum") / mx.maximum(count, 1.0)
    centred = mx.where(valid, dev - mean[:, None], 0.0)
    if scale_by_std:
        var = per_group((centred * centred).sum(axis=-1), "sum") / mx.maximum(count - 1.0, 1.0)
        out = centred / mx.sqrt(mx.maximum(var, 1e-30))[:, None]
    else:
        out = centred * scale[:, None]
    return mx.where(valid & ~equal[:, None], out, 0.0)


@dataclass
class Rewards:
    """What the loss needs from the rewards; no field carries a gradient."""

    trace_reward: mx.array  # [B] raw R (null rows: R_null)
    advantage: mx.array  # [B] A: normalised (clipped) trace reward, 0 on null rows
    token_signal: mx.array  # [B, T] normalised s (or 1 under fixed_token_reward), 0 on null rows


def shape_rewards(lc: mx.array, batch: Batch, cfg: ObjectiveConfig) -> Rewards:
    """Rewards from the [B, T] answer log-probs of a batch whose null rows give b_i and R_null."""
    if batch.trace_rows == batch.tokens.shape[0]:
        raise NrtError("the batch has no null-think rows; build NRT rows with batch.build_rows")
    lc = mx.stop_gradient(lc)
    mask, train = batch.answer_mask, ~batch.is_null
    lb = lc[batch.null_row]
    reward, signal = aggregate(cfg.aggregator, lc, mask, lb)
    used = clip_to_null(reward, reward[batch.null_row]) if cfg.clip_to_null else reward
    rows = train[:, None].astype(mx.float32)
    advantage = group_normalize(used[:, None], rows, batch.question, cfg.scale_by_std)
    if cfg.fixed_token_reward:  # s = 1: plain cross-entropy of y* after each sampled trace
        signal = mask * rows
    else:
        signal = group_normalize(signal, mask * rows, batch.question, cfg.scale_by_std)
    return Rewards(reward, advantage[:, 0], mx.stop_gradient(signal))


# ---- the loss ---------------------------------------------------------------------------------------


def clipped_ratio(
    lp: mx.array, old_lp: mx.array, advantage: mx.array, cfg: ObjectiveConfig
) -> tuple[mx.array, mx.array]:
    """rho_t = clamp(p / p_old, 1 - eps_low, 1 + eps_high) without gradient (CISPO), [B, L].

    Tokens with A > 0 and ratio above 1 + eps_high, or A < 0 and ratio below 1 - eps_low, are
    masked out (rho = 0); the mask is returned too.
    """
    low, high = 1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high
    ratio = mx.exp(mx.stop_gradient(lp) - old_lp)
    a = advantage[:, None]
    masked = ((a > 0) & (ratio > high)) | ((a < 0) & (ratio < low))
    return mx.where(masked, 0.0, mx.clip(ratio, low, high)), masked


def nrt_loss(
    model: Any,
    batch: Batch,
    cfg: ObjectiveConfig,
    normalizer: float,
    fixed: Rewards | None = None,
    temperature: float = 1.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """L = mean over trace rows of (c_trace L_trace + c_token L_token + c_format L_format) / N::

        L_trace  = - A_k sum_{t in z_k, m} rho_t log p(t)
        L_token  = - sum_i s_{k,i} log p(y*_i | x, z_k, m, y*_<i)
        L_format = - log p(m | x, z_k)         rows whose sample did not emit m itself

    With A fixed, grad L_trace is REINFORCE, grad L_token the signal-weighted cross-entropy: together
    the paper's eq. nrt_gradient. ``fixed`` rewards (from ``reference_pass``, with
    ``batch.old_logprobs``) serve several updates on one rollout; by default the rewards come from
    this same forward pass and rho = 1. Every probability, p, c, b and the think entropy, is of
    softmax(logits / ``temperature``), the distribution the traces were sampled from. Returns the
    loss and device arrays for the step figures.
    """
    lp, ent = forward(model, batch, temperature)
    lc = answer_logprobs(lp, batch)
    rewards = fixed if fixed is not None else shape_rewards(lc, batch, cfg)
    train = (~batch.is_null).astype(mx.float32)
    advantage = rewards.advantage * train
    on_trace = (batch.segments == THINK) | (batch.segments == MARKER)
    rho, masked = mx.ones_like(lp), mx.zeros(lp.shape, dtype=mx.bool_)
    if batch.old_logprobs is not None:
        rho, masked = clipped_ratio(lp, batch.old_logprobs, advantage, cfg)
    trace = -advantage * mx.where(on_trace, rho * lp, 0.0).sum(axis=-1)
    token = -(rewards.token_signal * lc).sum(axis=-1) * train
    emitted = batch.emitted_marker.astype(mx.float32)
    fmt = -mx.where(batch.segments == MARKER, lp, 0.0).sum(axis=-1) * train * (1.0 - emitted)
    rows = mx.maximum(train.sum(), 1.0)
    terms = {
        k: (v.sum() / rows) / normalizer
        for k, v in (("trace_loss", trace), ("token_loss", token), ("format_loss", fmt))
    }
    loss = (
        cfg.trace_coef * terms["trace_loss"]
        + cfg.token_coef * terms["token_loss"]
        + cfg.format_coef * terms["format_loss"]
    )
    think = batch.segments == THINK
    figures = {
        "loss": loss,
        **terms,
        "trace_reward": rewards.trace_reward,
        "answer_nll": -lc.sum(axis=-1) / mx.maximum(batch.answer_mask.sum(axis=-1), 1.0),
        "think_entropy": mx.where(think, ent, 0.0).sum(axis=-1),
        "clipped_tokens": (masked & on_trace & (train[:, None] > 0)).sum(),
        "ratio_tokens": (on_trace & (train[:, None] > 0)).sum(),
    }
    return loss, {k: mx.stop_gradient(v) for k, v in figures.items()}


def reference_pass(
    model: Any, batch: Batch, cfg: ObjectiveConfig, temperature: float = 1.0
) -> tuple[Rewards, mx.array]:
    """Rewards and [B, L] token log-probs under the weights that sampled the batch, no gradient:
    fixed before the first of several updates on one rollout (the old log-probs of rho). Scored at
    ``temperature`` like ``nrt_loss``."""
    lp, _ = forward(model, batch, temperature)
    lp = mx.stop_gradient(lp)
    return shape_rewards(answer_logprobs(lp, batch), batch, cfg), lp


# Rows of one GPU's micro-batch in the released recipe (actor.ppo_micro_batch_size_per_gpu).
RELEASED_MICRO_ROWS = 16


def default_normalizer(recipe: Recipe) -> float | None:
    """N, the divisor of every row's token sums, when it is a constant of the run; None when each
    step's rows decide it (``objective.normalizer: released`` for NRT: ``released_normalizer``).

    A number > 0 is used as given; 0 (what runs of nrt-mlx 0.1 store), and ``released`` for SFT,
    give the longest possible trace plus answer, max_think_tokens + max_answer_tokens.
    """
    n = recipe.objective.normalizer
    if n == "released":
        if recipe.train.method == "nrt":
            return None
        n = 0
    return float(n or recipe.rollout.max_think_tokens + recipe.data.max_answer_tokens)


def response_width(batches: list[Batch]) -> int:
    """W: the longest response [z | m | y* EOS] among the trace rows of ``batches`` (counted on
    the host when they were collated): the width the released code pads a rollout's responses to."""
    return max((b.response_width for b in batches), default=0)


def released_normalizer(width: int) -> float:
    """N = W / 16: the released code's gradient scale for the rollout's response width W.

    The released loss ("seq-mean-token-sum-norm" without its configured constant) divides each row's
    token sum l_k by W, sums over a GPU's micro-batch of 16 rows and scales by 1/G (G = 4 micro-
    batches per mini-batch); FSDP averages over D = 8 GPUs. One update of a 64-question mini-batch
    (K = 8: 512 rows = D G 16) thus follows

        grad (1 / (D G)) sum_k l_k / W  =  grad mean_k l_k / (W / 16),

    our mean over trace rows divided by N = W / 16.
    """
    return max(width, 1) / RELEASED_MICRO_ROWS


def sft_loss(
    model: Any, batch: Batch, normalizer: float = 0
) -> tuple[mx.array, dict[str, mx.array]]:
    """The SFT baseline: -sum_i log p(y*_i | x, y*_<i) per row, divided by ``normalizer`` when it
    is > 0, else by the row's answer length (CE per token); mean over rows."""
    lp, _ = forward(model, batch)
    lc = answer_logprobs(lp, batch)
    n_answer = mx.maximum(batch.answer_mask.sum(axis=-1), 1.0)
    nll = -lc.sum(axis=-1)
    loss = (nll / (normalizer if normalizer > 0 else n_answer)).mean()
    return loss, {"loss": mx.stop_gradient(loss), "answer_nll": mx.stop_gradient(nll / n_answer)}
