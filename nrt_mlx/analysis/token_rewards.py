"""The reward inspector: per-token answer probabilities and every aggregator's trace reward.

For a question x, a reference answer y* (T tokens, EOS included) and traces z_k (given, or
sampled), one forward pass over the rows ``[x | z_k | m | y*]`` and the null row ``[x | m | y*]``
gives, per answer token i,

    c_{k,i} = p(y*_i | x, z_k, m, y*_<i)      b_i = p(y*_i | x, m, y*_<i)
    weighted-sum weights: 1 / b_i (weighted_sum_inverse_prob) and -log b_i (weighted_sum_log_prob)

and every aggregator's trace reward R_k, computed by ``nrt_mlx.objective.aggregate`` on exactly
these log-probabilities (the trainer's numbers). Low b_i marks the tokens that are hard
without reasoning; the weighted sums put the reward there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nrt_mlx.analysis.tables import render_text
from nrt_mlx.batch import build_rows
from nrt_mlx.errors import NrtError
from nrt_mlx.evaluate import row_likelihoods
from nrt_mlx.objective import AGGREGATORS, aggregate
from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.rollout import Trace, sample_traces
from nrt_mlx.vocab import Vocabulary

# b_i below HARD is a hard token (shown red), above EASY an easy one (dimmed).
HARD, EASY = 0.1, 0.9

# Traces shown as their own c_i columns; with more, the table shows the mean and max of c_i.
MAX_TRACE_COLUMNS = 4


@dataclass
class TokenRewards:
    question: str
    answer: str
    marker: str
    tokens: list[str]  # the answer tokens as text, EOS included
    token_ids: list[int]
    null_logprobs: list[float]  # log b_i
    trace_logprobs: list[list[float]]  # log c_{k,i}, [K][T]
    traces: list[str]
    trace_tokens: list[int]
    emitted_marker: list[bool]
    rewards: dict[str, list[float]]  # aggregator -> R_k of every trace
    null_rewards: dict[str, float]  # aggregator -> R of the null row itself (c = b)

    @property
    def b(self) -> np.ndarray:
        return np.exp(np.array(self.null_logprobs))

    @property
    def c(self) -> np.ndarray:
        return np.exp(np.array(self.trace_logprobs))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        b = self.b
        out["b"] = b.tolist()
        out["c"] = self.c.tolist()
        out["weight_inverse_prob"] = (1.0 / b).tolist()
        out["weight_neg_log_prob"] = (-np.array(self.null_logprobs)).tolist()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def tables(self) -> list[Any]:
        """rich renderables: the per-token table, the rewards table and the traces."""
        return [_token_table(self), _reward_table(self), _trace_text(self)]

    def table(self, width: int = 120) -> str:
        return render_text(self.tables(), width)


def _token_style(b: float) -> str:
    return "bold red" if b < HARD else "dim" if b > EASY else ""


def _styled(text: str, style: str) -> str:
    from rich.markup import escape

    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def _token_table(report: TokenRewards) -> Any:
    from rich.table import Table

    b, c = report.b, report.c
    k = len(report.traces)
    table = Table(
        title=f"answer tokens: b = p without a trace, c = p after the trace (red: hard, b < {HARD})",
        caption="c is green where the trace raised the token's probability, red where it lowered it",
    )
    for name in ("i", "token", "b_i", "-log b_i", "1/b_i"):
        table.add_column(name, justify="left" if name == "token" else "right")
    per_trace = k <= MAX_TRACE_COLUMNS
    heads = [f"c_i z{j + 1}" for j in range(k)] if per_trace else ["c_i mean", "c_i max"]
    for name in heads:
        table.add_column(name, justify="right")
    for i, token in enumerate(report.tokens):
        style = _token_style(float(b[i]))
        values = list(c[:, i]) if per_trace else [float(c[:, i].mean()), float(c[:, i].max())]
        cells = [
            _styled(f"{v:.4f}", "green" if v > b[i] else "red" if v < b[i] else "") for v in values
        ]
        table.add_row(
            str(i + 1),
            _styled(repr(token)[1:-1], style),
            _styled(f"{b[i]:.4f}", style),
            f"{-report.null_logprobs[i]:.3f}",
            f"{1.0 / b[i]:.3g}",
            *cells,
        )
    return table


def _reward_table(report: TokenRewards) -> Any:
    from rich.table import Table

    table = Table(title="trace rewards R (nrt_mlx.objective.aggregate)")
    table.add_column("aggregator")
    table.add_column("null (c = b)", justify="right")
    for j in range(len(report.traces)):
        table.add_column(f"z{j + 1}", justify="right")
    for name, values in report.rewards.items():
        null = report.null_rewards[name]
        cells = [
            _styled(f"{v:.4g}", "green" if v > null else "red" if v < null else "") for v in values
        ]
        table.add_row(name, f"{null:.4g}", *cells)
    return table


def _trace_text(report: TokenRewards) -> Any:
    from rich.text import Text

    text = Text()
    for j, trace in enumerate(report.traces):
        end = "marker" if report.emitted_marker[j] else "no marker"
        text.append(f"z{j + 1} ({report.trace_tokens[j]} tokens, {end}): ", style="bold")
        shown = trace if len(trace) <= 300 else trace[:299] + "…"
        text.append(shown.replace("\n", "\\n") + "\n")
    return text


def token_rewards(
    model: nn.Module,
    vocab: Vocabulary,
    question: str | list[dict],
    answer: str,
    traces: list[str] | None = None,
    rollout: RolloutConfig | None = None,
    seed: int = 0,
) -> TokenRewards:
    """c_i, b_i and every aggregator's reward for ``traces`` (texts, each taken as followed by the
    marker), or for K sampled ones. ``rollout`` gives the think prefix and, when sampling, K and
    the sampler settings; ``vocab`` the marker."""
    rollout = rollout or RolloutConfig()
    if not answer.strip():
        raise NrtError("score: the answer is empty")
    marker = vocab.marker
    prompt = vocab.encode_prompt(question, rollout.think_prefix)
    answer_ids = vocab.encode_answer(answer)
    was_training = model.training
    model.eval()
    try:
        if traces:
            group = [Trace(vocab.encode_text(text), emitted_marker=True) for text in traces]
        else:
            key = mx.random.key(seed)
            group = sample_traces(model, [prompt], rollout, vocab, key)[0][0]
        rows = build_rows(prompt, group, marker.ids, answer_ids, 0)
        scores = row_likelihoods(model, rows, vocab.pad_id)
    finally:
        model.train(was_training)
    trace_lp = np.stack([s.answer_logprobs for s in scores[:-1]])
    null_lp = scores[-1].answer_logprobs
    rewards, null_rewards = all_rewards(trace_lp, null_lp)
    return TokenRewards(
        question=question if isinstance(question, str) else json.dumps(question),
        answer=answer,
        marker=marker.text,
        tokens=[vocab.decode([t]) for t in answer_ids],
        token_ids=answer_ids,
        null_logprobs=null_lp.tolist(),
        trace_logprobs=trace_lp.tolist(),
        traces=[vocab.decode(t.tokens) for t in group],
        trace_tokens=[len(t.tokens) for t in group],
        emitted_marker=[t.emitted_marker for t in group],
        rewards=rewards,
        null_rewards=null_rewards,
    )


def all_rewards(
    trace_lp: np.ndarray, null_lp: np.ndarray
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Every aggregator's R_k for log c [K, T] against log b [T], and R of the null row itself."""
    k, t = trace_lp.shape
    lp = mx.array(trace_lp.astype(np.float32))
    null = mx.array(np.broadcast_to(null_lp, (k, t)).astype(np.float32))
    mask = mx.ones((k, t), dtype=mx.float32)
    rewards, null_rewards = {}, {}
    for name in AGGREGATORS:
        reward, _ = aggregate(name, lp, mask, null)
        own, _ = aggregate(name, null[:1], mask[:1], null[:1])
        rewards[name] = [float(v) for v in np.array(reward)]
        null_rewards[name] = float(np.array(own)[0])
    return rewards, null_rewards
