"""One training step: sample traces, build batches, update, read the figures.

One NRT step (``train.method: nrt``; docs/NRT.md, "One training step"):

1. ``sample``: take ``questions_per_step`` questions in a seeded, epoch-wise shuffled order and
   sample K traces per question in one batched generation (``nrt_mlx.rollout``);
2. ``build_batches``: K trace rows plus one null-think row per question (``nrt_mlx.batch``), for
   each of ``train.mini_batches`` disjoint mini-batches of whole questions (``mini_batch_bounds``),
   in micro-batches of whole questions (group normalisation needs all K rows and the null row);
3. ``update``: one AdamW update per mini-batch, on each of ``updates_per_rollout`` epochs over the
   rollout. Per micro-batch one forward pass gives the loss (``nrt_mlx.objective``), and the
   rewards too when the step makes one update; with several, ``fix_rewards`` fixes the rewards and
   the old log-probs of the clipped ratio from the sampling weights first. Gradients are
   accumulated, weighted by the micro-batch's share of the mini-batch's trace rows, and clipped;
4. ``step_metrics``: the step's figures, read from the device once.

Under ``mlx.launch`` (``nrt_mlx.distributed``) every rank does 1-3 for its block of each
mini-batch's questions; the ranks' gradients are summed before each update, so every rank makes
the update one process would make.

``train.method: sft`` trains plain LoRA SFT on ``[prompt | y* EOS]``: the baseline to compare with.
All randomness of a step comes from ``step_key(seed, step)``, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from nrt_mlx.batch import Batch, build_rows, collate, sft_rows
from nrt_mlx.objective import (
    Rewards,
    nrt_loss,
    reference_pass,
    released_normalizer,
    response_width,
    sft_loss,
)
from nrt_mlx.rollout import RolloutStats, Trace, sample_traces
from nrt_mlx.session import Encoded, Session, lr_schedule, updates_per_step, warn
from nrt_mlx.stats import trace_stats


@dataclass
class StepResult:
    """One step's logged metrics, and the questions and traces behind them (for samples.jsonl)."""

    metrics: dict[str, Any]
    items: list[Encoded]
    traces: list[list[Trace]] | None  # None for SFT
    rewards: list[float]  # raw trace reward per trace, in the order of ``traces``


def question_indices(n: int, seed: int, position: int, count: int, shuffle: bool) -> list[int]:
    """The ``count`` questions after ``position`` in a per-epoch shuffled order of ``n``."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for p in range(position, position + count):
        epoch, i = divmod(p, n)
        if epoch not in orders:
            rng = np.random.default_rng([seed, epoch])
            orders[epoch] = rng.permutation(n) if shuffle else np.arange(n)
        out.append(int(orders[epoch][i]))
    return out


def step_key(seed: int, step: int) -> tuple[mx.array, int]:
    """(key of the trace sampler, seed of the LoRA-dropout generator) of training step ``step``."""
    return mx.random.key(seed * 7_919 + step), seed * 1_000_003 + step


def sample(
    session: Session, items: list[Encoded], key: mx.array, questions: list[int] | None = None
) -> tuple[list[list[Trace]], RolloutStats]:
    """K traces per question from the current weights, without LoRA dropout; ``questions`` are
    the items' indices among the step's questions (default 0, 1, ...): with
    ``rollout.sample_keys: row`` every trace row's key derives from its index."""
    cfg, g = session.recipe.rollout, session.group
    if not items:  # a rank without a share of this step (fewer questions than ranks)
        return [], RolloutStats(0, 0.0)
    rows: list[int] | None = list(range(len(items))) if questions is None else questions
    if cfg.sample_keys == "batch":
        rows = None
        if g.size > 1:  # the ranks' batches must not draw the same numbers
            key = mx.random.split(key, g.size)[g.rank]
    model = session.loaded.model
    prompts = [it.prompt for it in items]
    # A prompt holding the marker would change below the adapters when its input row trains.
    marker = set(session.vocab.marker.ids)
    keep = 0 if any(marker & set(p) for p in prompts) else session.reuse_below
    model.eval()
    try:
        traces, stats = sample_traces(model, prompts, cfg, session.vocab, key, rows, keep)
    finally:
        model.train()
    if keep and any(t.states is None for group in traces for t in group):
        session.reuse_below = 0
        warn(
            "the rollout's states below the adapters could not be kept for this model; the "
            "update runs every layer from now on (slower, same numbers)"
        )
    return traces, stats


def build_batches(
    session: Session, items: list[Encoded], traces: list[list[Trace]] | None
) -> list[Batch]:
    """Micro-batches of whole questions: K trace rows and the null-think row (NRT), or the answer
    row (SFT), per question."""
    r, m = session.recipe, session.vocab.marker.ids
    rows = [
        sft_rows(it.prompt, it.answer, q, session.max_length)
        if traces is None
        else build_rows(it.prompt, traces[q], m, it.answer, q, session.max_length)
        for q, it in enumerate(items)
    ]
    per = r.train.micro_batch_questions or len(rows)
    return [
        collate(sum(rows[i : i + per], []), session.vocab.pad_id, session.shared_prompt)
        for i in range(0, len(rows), per)
    ]


def release_states(minis: list[list[Batch]], traces: list[list[Trace]]) -> None:
    """Lay the rollout's states out in the batches now and let the traces drop theirs, so the
    update holds one copy of them, not two (the batches' lazy layouts read the rollout's)."""
    replays = [
        a
        for mini in minis
        for b in mini
        for r in (b.prompt_replay, *(p.replay for p in b.passes))
        if r is not None
        for a in (r.hidden, r.kv)
    ]
    if replays:
        mx.eval(replays)
    for group in traces:
        for t in group:
            t.states = None


def mini_batch_bounds(questions: int, mini_batches: int) -> list[tuple[int, int]]:
    """[start, stop) of ``mini_batches`` consecutive, disjoint groups of the step's questions, of
    nearly equal sizes (they differ by at most one, the larger first)."""
    size, extra = divmod(questions, mini_batches)
    stops = np.cumsum([size + (i < extra) for i in range(mini_batches)])
    return [(int(a), int(b)) for a, b in zip([0, *stops[:-1]], stops)]


def fix_rewards(session: Session, minis: list[list[Batch]]) -> list[list[Rewards | None]]:
    """With several NRT updates per step: the rewards and the old log-probs of the clipped ratio of
    every micro-batch of every mini-batch, fixed from the weights that sampled the rollout before
    its first update (the batches in ``minis`` get their ``old_logprobs``), so the ratio is active
    from the second update on. Otherwise None per batch: the loss takes the rewards from its own
    forward pass."""
    r, model = session.recipe, session.loaded.model
    if r.train.method != "nrt" or updates_per_step(r) == 1:
        return [[None] * len(mini) for mini in minis]
    fixed: list[list[Rewards | None]] = []
    for mini in minis:
        fixed.append([])
        for i, b in enumerate(mini):
            rewards, lp = reference_pass(model, b, r.objective, r.rollout.temperature)
            mini[i] = dataclasses.replace(b, old_logprobs=lp)
            mx.eval(lp, rewards.advantage, rewards.token_signal)
            fixed[-1].append(rewards)
    return fixed


def update(
    session: Session,
    minis: list[list[Batch]],
    fixed: list[list[Rewards | None]],
    normalizer: float,
    totals: list[int],
) -> tuple[list[dict[str, mx.array]], tuple[mx.array, mx.array]]:
    """``updates_per_rollout`` epochs over the step's mini-batches, one optimizer update per
    mini-batch (LoRA dropout on), the loss divided by ``normalizer``.

    A micro-batch's gradient is weighted by its share of its mini-batch's trace rows on all ranks
    (``totals``); the ranks' sums are summed (``Group.sum_tree``) and clipped, so every rank makes
    the update one process would make with the whole mini-batch.

    Returns each micro-batch's loss figures of the first epoch (device arrays, mini-batch after
    mini-batch) and the clipped and counted tokens of the ratio over all updates.
    """
    r, model, group = session.recipe, session.loaded.model, session.group
    nrt = r.train.method == "nrt"
    schedule = lr_schedule(r)

    def weighted_loss(
        model: nn.Module, batch: Batch, weight: float, rewards: Any
    ) -> tuple[mx.array, dict]:
        if nrt:
            temperature = r.rollout.temperature
            loss, figures = nrt_loss(model, batch, r.objective, normalizer, rewards, temperature)
        else:
            loss, figures = sft_loss(model, batch, normalizer)
        return loss * weight, figures

    model.train()  # sampling and evaluation switch LoRA dropout off
    value_and_grad = nn.value_and_grad(model, weighted_loss)
    first: list[dict[str, mx.array]] = []
    clipped, counted = mx.array(0), mx.array(0)
    for n in range(r.train.updates_per_rollout):
        for mini, mini_fixed, total_rows in zip(minis, fixed, totals):
            grads = None
            for b, f in zip(mini, mini_fixed):
                (_, figures), g = value_and_grad(model, b, b.trace_rows / total_rows, f)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                if nrt:
                    clipped, counted = (
                        clipped + figures["clipped_tokens"],
                        counted + figures["ratio_tokens"],
                    )
                mx.eval(grads, figures)  # one micro-batch's graph at a time bounds the memory
                if n == 0:
                    first.append(figures)
            if grads is None:  # no question of this mini-batch is this rank's
                grads = tree_map(mx.zeros_like, model.trainable_parameters())
            grads = group.sum_tree(grads, "the gradient all-reduce")
            if r.optimizer.grad_clip > 0:
                grads, _ = optim.clip_grad_norm(grads, r.optimizer.grad_clip)
            session.optimizer.update(model, grads)
            # mlx leaves the rate of the update just made in the state: store the next update's,
            # so that the rate a step logs (and a checkpoint keeps) is its first update's.
            session.optimizer.learning_rate = schedule(session.optimizer.step)
            mx.eval(model.trainable_parameters(), session.optimizer.state)
    return first, (clipped, counted)


def step_scale(session: Session, minis: list[list[Batch]]) -> tuple[float, list[int]]:
    """N of the step's loss, and the trace rows of each mini-batch, over every rank's share."""
    mine = {
        "rows": [sum(b.trace_rows for b in mini) for mini in minis],
        "width": response_width([b for mini in minis for b in mini]),
    }
    parts = session.group.gather(mine, "the batch sizes of the step")
    totals = [sum(p["rows"][m] for p in parts) for m in range(len(minis))]
    normalizer = session.normalizer
    if normalizer is None:  # the whole rollout's width, whatever its mini- and micro-batches
        normalizer = released_normalizer(max(p["width"] for p in parts))
    return normalizer, totals


LOSS_FIGURES = ("loss", "trace_loss", "token_loss", "format_loss")


def read_figures(
    minis: list[list[Batch]],
    figures: list[dict[str, mx.array]],
    traces: list[list[list[Trace]]],
    clip: tuple[mx.array, mx.array],
    rollout: RolloutStats,
) -> dict[str, Any]:
    """This rank's share of the step's figures as plain values, read from the device in one sync:
    per mini-batch, its micro-batches' figures and its questions' traces (for ``gather``)."""
    mx.eval(figures, clip)
    flat = iter(figures)
    return {
        "records": [[_micro_record(b, next(flat)) for b in mini] for mini in minis],
        "traces": [[[[t.tokens, t.emitted_marker] for t in q] for q in mini] for mini in traces],
        "clip": [float(clip[0]), float(clip[1])],
        "sampled": [rollout.tokens, rollout.seconds],
        "peak": mx.get_peak_memory(),
    }


def _micro_record(b: Batch, f: dict[str, mx.array]) -> dict[str, Any]:
    record = {
        "rows": b.trace_rows,
        "tokens": b.num_tokens,
        "think_tokens": b.think_tokens,
        "loss": {k: float(f[k]) for k in LOSS_FIGURES if k in f},
        "null": np.array(b.is_null).tolist(),
        "nll": np.array(f["answer_nll"]).tolist(),
    }
    if "trace_reward" in f:
        record["reward"] = np.array(f["trace_reward"]).tolist()
        record["entropy"] = float(f["think_entropy"].sum())
    return record


def step_metrics(
    session: Session, parts: list[dict[str, Any]]
) -> tuple[dict[str, float], list[list[Trace]] | None, list[float]]:
    """The step's figures from every rank's ``read_figures`` (sums and counts over all rows, in
    the order of the step's questions), the traces of the step and the reward of each trace.

    Loss terms and answer NLL are means over trace rows (``null_answer_nll`` over null-think rows);
    then ``trace_stats`` of the traces with their rewards and the entropy over the rows' think tokens.
    """
    minis = range(len(parts[0]["records"]))
    records = [rec for m in minis for p in parts for rec in p["records"][m]]
    total = sum(rec["rows"] for rec in records)
    out: dict[str, float] = {}
    for key in LOSS_FIGURES:
        if key in records[0]["loss"]:
            out[key] = sum(rec["loss"][key] * rec["rows"] for rec in records) / total
    null = np.concatenate([np.array(rec["null"], dtype=bool) for rec in records])
    nll = np.concatenate([np.array(rec["nll"], dtype=np.float32) for rec in records])
    out["answer_nll"] = float(nll[~null].mean())
    if session.recipe.train.method != "nrt":
        return out, None, []
    out["null_answer_nll"] = float(nll[null].mean())
    if updates_per_step(session.recipe) > 1:
        clipped, counted = (np.float32(sum(p["clip"][i] for p in parts)) for i in (0, 1))
        out["clip_fraction"] = float(clipped / max(counted, np.float32(1)))
    rewards = np.concatenate([np.array(rec["reward"], dtype=np.float32) for rec in records])
    rewards = rewards[~null].tolist()
    entropy = sum(rec["entropy"] for rec in records)
    traces = [
        [Trace(tokens, emitted) for tokens, emitted in q]
        for m in minis
        for p in parts
        for q in p["traces"][m]
    ]
    think_tokens = sum(rec["think_tokens"] for rec in records)
    flat = [t for group in traces for t in group]
    return out | trace_stats(flat, entropy, think_tokens, rewards), traces, rewards


def train_step(session: Session, step: int) -> StepResult:
    """One step: sample, build batches, update, and the step's metrics. Under mlx.launch each
    rank takes its block of every mini-batch's questions (``Group.share``)."""
    r, g = session.recipe, session.group
    sample_key, dropout_seed = step_key(r.train.seed, step)
    mx.random.seed(dropout_seed)
    idx = question_indices(
        len(session.train),
        r.train.seed,
        session.position,
        r.train.questions_per_step,
        r.data.shuffle,
    )
    items = [session.train[i] for i in idx]
    shares = [g.share(a, b) for a, b in mini_batch_bounds(len(items), r.train.mini_batches)]
    mine = [q for share in shares for q in share]
    traces, rollout = None, RolloutStats(0, 0.0)
    if r.train.method == "nrt":
        # The questions' indices in the step, when they are not 0, 1, ... (one process).
        given = {} if mine == list(range(len(mine))) else {"questions": mine}
        traces, rollout = sample(session, [items[q] for q in mine], sample_key, **given)
    minis, by_mini, at = [], [], 0
    for share in shares:
        part = None if traces is None else traces[at : at + len(share)]
        minis.append(build_batches(session, [items[q] for q in share], part))
        by_mini.append(part or [])
        at += len(share)
    if traces is not None:
        release_states(minis, traces)
    normalizer, totals = step_scale(session, minis)
    fixed = fix_rewards(session, minis)
    lr = float(session.optimizer.learning_rate.item())  # the rate of this step's first update
    start = time.perf_counter()
    figures, clip = update(session, minis, fixed, normalizer, totals)
    seconds = time.perf_counter() - start
    session.position += len(items)
    mine = read_figures(minis, figures, by_mini, clip, rollout)
    parts = g.gather(mine, f"the figures of step {step}")
    metrics, traces, rewards = step_metrics(session, parts)
    out: dict[str, Any] = {"step": step, **metrics}
    if traces is not None:  # every rank's tokens over the slowest rank's time
        tokens, slowest = sum(p["sampled"][0] for p in parts), max(p["sampled"][1] for p in parts)
        out.update(sample_tokens_per_s=RolloutStats(tokens, slowest).tokens_per_second)
        out.update(sample_seconds=slowest)
    tokens = sum(rec["tokens"] for p in parts for mini in p["records"] for rec in mini)
    out.update(train_tokens_per_s=tokens / seconds if seconds > 0 else 0.0, train_seconds=seconds)
    out.update(peak_memory_gb=max(p["peak"] for p in parts) / 1e9, lr=lr)
    return StepResult(out, items, traces, rewards)
