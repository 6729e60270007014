"""The training loop: sample traces, build batches, update, log, checkpoint.

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
the update one process would make, and rank 0 alone logs and writes the run directory.

``train.method: sft`` trains plain LoRA SFT on ``[prompt | y* EOS]``: the baseline to compare with.
All randomness of a step comes from ``step_key(seed, step)``, so a resumed run repeats an
uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from nrt_mlx import distributed, marker, prefix
from nrt_mlx.batch import THINK, Batch, build_rows, collate, sft_rows
from nrt_mlx.data import Dataset, Example, drop_long
from nrt_mlx.data import load_data as load_jsonl  # prepare still calls it by its old name
from nrt_mlx.distributed import Group
from nrt_mlx.errors import NrtError
from nrt_mlx.fileio import fault_point
from nrt_mlx.model import ADAPTER_WEIGHTS, LoadedModel, adapter_config, add_adapters, load_model
from nrt_mlx.objective import (
    Rewards,
    answer_logprobs,
    default_normalizer,
    forward,
    nrt_loss,
    reference_pass,
    released_normalizer,
    response_width,
    sft_loss,
)
from nrt_mlx.progress import Reporter
from nrt_mlx.recipe import Recipe, recipe_from_dict, resume_overrides, save_recipe, with_remote_code
from nrt_mlx.rollout import RolloutStats, Trace, sample_traces
from nrt_mlx.rundir import RunDir
from nrt_mlx.stats import trace_stats
from nrt_mlx.vocab import Vocabulary


@dataclass
class Encoded:
    example: Example
    prompt: list[int]
    answer: list[int]


@dataclass
class Session:
    """Everything a training step needs, prepared once."""

    recipe: Recipe
    loaded: LoadedModel
    vocab: Vocabulary
    train: list[Encoded]
    valid: list[Encoded]
    optimizer: optim.Optimizer
    run: RunDir
    adapter_config: dict
    max_length: int  # longest row: prompt + think + marker + answer limits
    normalizer: float | None  # N of the loss; None: per step (objective.default_normalizer)
    data_report: str  # what was kept and skipped of data.train
    shared_prompt: bool = False  # NRT batches in the shared-prompt layout (nrt_mlx.prefix)
    position: int = 0  # questions consumed so far (the data position a checkpoint saves)
    group: Group = field(default_factory=Group)  # the processes training the run (mlx.launch)


@dataclass
class StepResult:
    """One step's logged metrics, and the questions and traces behind them (for samples.jsonl)."""

    metrics: dict[str, Any]
    items: list[Encoded]
    traces: list[list[Trace]] | None  # None for SFT
    rewards: list[float]  # raw trace reward per trace, in the order of ``traces``


def encode_dataset(data: Dataset, vocab: Vocabulary, recipe: Recipe) -> list[Encoded]:
    """Tokenize prompts and answers once; drop (and count) examples over the length limits."""
    think_prefix = recipe.rollout.think_prefix
    by_line = {
        ex.line: Encoded(
            ex, vocab.encode_prompt(ex.messages, think_prefix), vocab.encode_answer(ex.answer)
        )
        for ex in data.examples
    }
    drop_long(
        data,
        lambda ex: len(by_line[ex.line].prompt),
        lambda ex: len(by_line[ex.line].answer),
        recipe.data.max_prompt_tokens,
        recipe.data.max_answer_tokens,
    )
    return [by_line[ex.line] for ex in data.examples]


def updates_per_step(recipe: Recipe) -> int:
    """Optimizer updates of one step: one per mini-batch on each epoch over the rollout."""
    return recipe.train.updates_per_rollout * recipe.train.mini_batches


def lr_schedule(recipe: Recipe) -> Any:
    """The rate of optimizer update u = 0, 1, ...: linear warm-up over ``warmup_ratio`` of the run's
    updates (steps x updates_per_rollout x mini_batches), then ``schedule``: ``constant`` at the
    learning rate, or ``cosine`` / ``linear`` decay to ``min_lr_ratio`` of it over the rest."""
    o, steps = recipe.optimizer, recipe.train.steps * updates_per_step(recipe)
    warmup = int(round(o.warmup_ratio * steps))
    rest, end = max(steps - warmup, 1), o.learning_rate * o.min_lr_ratio
    if o.schedule == "cosine":
        after = optim.cosine_decay(o.learning_rate, rest, end)
    elif o.schedule == "linear":
        after = optim.linear_schedule(o.learning_rate, end, rest)
    else:  # a linear schedule from the rate to itself: constant
        after = optim.linear_schedule(o.learning_rate, o.learning_rate, rest)
    if warmup == 0:
        return after
    ramp = optim.linear_schedule(o.learning_rate / warmup, o.learning_rate, warmup)
    return optim.join_schedules([ramp, after], [warmup])


def make_optimizer(recipe: Recipe) -> optim.Optimizer:
    o = recipe.optimizer
    return optim.AdamW(
        learning_rate=lr_schedule(recipe),
        betas=list(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
    )


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


def warn(message: str) -> None:
    """A one-line warning on stderr, shown with --quiet too (by rank 0 alone under mlx.launch)."""
    if distributed.launched_rank():
        return
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_training(recipe: Recipe) -> None:
    """Refuse a recipe that loads but cannot train as it asks (before anything is loaded)."""
    r = recipe
    if r.train.method == "nrt" and r.rollout.samples == 1 and r.objective.trace_coef > 0:
        raise NrtError(
            "rollout.samples is 1: group normalisation of a single trace makes the trace term "
            "exactly 0 every step, so NRT cannot learn to reason; use 2 or more (or "
            "train.method: sft for the baseline)"
        )
    if r.train.eval_every and not r.data.valid:
        raise NrtError(
            f"train.eval_every is {r.train.eval_every} but data.valid is empty, so the run would "
            "never evaluate; set data.valid to a JSONL file, or train.eval_every to 0"
        )


def ready_to_train(recipe: Recipe, trust_remote_code: bool, source: str) -> None:
    """The refusals of a recipe that loads but must not train as it is (``check_training``, and
    model code from the Hub without the command line's --trust-remote-code): made before the run
    directory is locked or created, so that a refused command leaves it as it was."""
    check_training(recipe)
    recipe.model = with_remote_code(recipe.model, trust_remote_code, source)
    from nrt_mlx.plan import check_fits

    check_fits(recipe, source)  # the memory plan, from config.json alone: before any weight loads


def prepare(recipe: Recipe, group: Group | None = None) -> Session:
    """Load data, model and adapters, and create the optimizer, for a recipe ``ready_to_train``
    accepted, in a run directory its caller holds (``RunDir.claim`` or ``RunDir.lock``; rank 0 of
    a ``group``: the other ranks never write it)."""
    run = RunDir(Path(recipe.run.dir))
    train_data = load_jsonl(recipe.data.train, recipe.data, "data.train")
    valid_data = (
        load_jsonl(recipe.data.valid, recipe.data, "data.valid") if recipe.data.valid else None
    )
    loaded = load_model(recipe.model)
    if recipe.train.grad_checkpoint:
        prefix.grad_checkpoint(loaded.model.layers)
    add_adapters(loaded.model, recipe.lora, recipe.train.seed)
    vocab = Vocabulary.of(loaded.tokenizer, recipe.rollout.marker)
    nrt = recipe.train.method == "nrt"
    rows = marker.setup(loaded.model, vocab, recipe.rollout.marker_rows) if nrt else False
    shared = nrt and recipe.train.shared_prompt and _shared_prompt_fits(loaded.model, vocab)
    train = encode_dataset(train_data, vocab, recipe)
    valid = encode_dataset(valid_data, vocab, recipe) if valid_data else []
    if recipe.train.questions_per_step > len(train):
        warn(
            f"train.questions_per_step ({recipe.train.questions_per_step}) is more than the "
            f"{len(train)} usable examples of data.train: questions repeat within a step"
        )
    # Record what was actually used: the resolved quantization.
    recipe.model.quantize = loaded.bits if loaded.bits is not None else "none"
    d, m = recipe.data, vocab.marker
    extra = {
        "nrt_mlx": {
            "method": recipe.train.method,
            "aggregator": recipe.objective.aggregator,
            "marker": m.text,
            "marker_id": m.ids[0] if m.is_special else None,
            "marker_rows": marker.MARKER_FILE if rows else None,
        }
    }
    return Session(
        recipe=recipe,
        loaded=loaded,
        vocab=vocab,
        train=train,
        valid=valid,
        optimizer=make_optimizer(recipe),
        run=run,
        adapter_config=adapter_config(loaded, recipe.lora, extra),
        max_length=d.max_prompt_tokens
        + recipe.rollout.max_think_tokens
        + len(m.ids)
        + d.max_answer_tokens,
        normalizer=default_normalizer(recipe),
        data_report=train_data.report(),
        shared_prompt=shared,
        group=group or Group(),
    )


def shared_prompt_problem(model: nn.Module, vocab: Vocabulary) -> str | None:
    """None when shared-prompt passes give this model's full-row log-probs, else why not: its
    caches must be plain KV caches (``prefix.cache_problem``), and probe rows (three prompts of
    different lengths, traces of different lengths) must give the same answer and think log-probs
    both ways within 1e-3. That catches absolute position embeddings, RoPE variants that take no
    per-row offsets, and attention layers that build their masks in their own way."""
    problem = prefix.cache_problem(model)
    if problem:
        return problem
    words = "one two three four five six seven eight nine ten".split()
    rows = []
    for q, n in enumerate((1, 4, 9)):
        prompt = vocab.encode_prompt([{"role": "user", "content": " ".join(words[:n])}])
        traces = [Trace(vocab.encode_text(" ".join(words[: 2 + 3 * k])), False) for k in range(2)]
        rows += build_rows(prompt, traces, vocab.marker.ids, vocab.encode_answer(words[q]), q)
    model.eval()  # no LoRA dropout in the probe
    try:
        sums = []
        for share in (False, True):
            batch = collate(rows, vocab.pad_id, share)
            lp, _ = forward(model, batch)
            think = mx.where(batch.segments == THINK, lp, 0.0).sum(axis=1, keepdims=True)
            sums.append(mx.concatenate([answer_logprobs(lp, batch), think], axis=1))
        full, shared = sums
        diff = float(mx.abs(full - shared).max()) / max(float(mx.abs(full).max()), 1e-6)
    except Exception as exc:  # a model whose layers reject the passes' caches or offsets
        return f"its layers reject shared-prompt passes ({type(exc).__name__}: {exc})"
    finally:
        model.train()
    if not diff <= 1e-3:
        return f"probe log-probs differ by {diff:.1e} (relative) from the full rows"
    return None


def _shared_prompt_fits(model: nn.Module, vocab: Vocabulary) -> bool:
    """``shared_prompt_problem`` as a decision, with a warning when the answer is no."""
    why = shared_prompt_problem(model, vocab)
    if why:
        warn(f"train.shared_prompt is off for this model: {why}; every row runs in full (slower)")
    return why is None


# ---- one step -----------------------------------------------------------------------------------


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
    model.eval()
    try:
        prompts = [it.prompt for it in items]
        return sample_traces(model, prompts, cfg, session.vocab, key, rows)
    finally:
        model.train()


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


# ---- the run ------------------------------------------------------------------------------------


def _sample_record(session: Session, result: StepResult, max_traces: int = 4) -> dict[str, Any]:
    """The first question of the step with a few of its traces and their trace rewards."""
    item, rewards = result.items[0], result.rewards
    traces = [
        {
            "text": session.vocab.decode(t.tokens),
            "reward": rewards[i] if i < len(rewards) else None,
            "tokens": len(t.tokens),
            "emitted_marker": t.emitted_marker,
        }
        for i, t in enumerate(result.traces[0][:max_traces])
    ]
    return {
        "step": result.metrics["step"],
        "question": item.example.question,
        "reference": item.example.answer,
        "traces": traces,
    }


def _checkpoint(session: Session, step: int) -> None:
    state = {"position": session.position, "seed": session.recipe.train.seed}
    session.run.save_checkpoint(
        step,
        session.loaded.model,
        session.optimizer,
        session.adapter_config,
        state,
        session.recipe.run.keep_checkpoints,
    )


def evaluate_valid(session: Session) -> dict[str, float]:
    """The eval figures on the valid split within the recipe's budget, keys prefixed ``eval_``."""
    from nrt_mlx.evaluate import eval_config, evaluate

    r = session.recipe
    cfg = eval_config(
        r.rollout,
        samples=r.train.eval_samples,
        seed=r.train.seed,
        max_questions=r.train.eval_questions,
        extract=r.train.eval_extract,
        generate=True,
        max_answer_tokens=min(64, r.data.max_answer_tokens),
    )
    report = evaluate(session.loaded.model, session.vocab, [e.example for e in session.valid], cfg)
    return {f"eval_{k}": v for k, v in report.summary.items() if isinstance(v, (int, float))}


def run_training(session: Session, start_step: int = 0, quiet: bool = False) -> Path:
    """Train from ``start_step`` to ``train.steps``: log, sample, evaluate, watch for collapse,
    checkpoint. Under mlx.launch every rank runs the steps (and evaluates, so that they stay in
    step); rank 0 alone judges, logs and checkpoints."""
    from nrt_mlx.collapse import CollapseMonitor
    from nrt_mlx.tracking import Trackers

    r, g = session.recipe, session.group
    sync_state(session)
    monitor = CollapseMonitor(
        r.train.collapse_fraction, traces_per_step=r.train.questions_per_step * r.rollout.samples
    )
    if g.primary:
        monitor.replay(session.run.read_metrics())  # a resumed run keeps its starting values
    reporter = Reporter(r.train.steps, start_step, quiet, r.run.log_every, silent=not g.primary)
    trackers = Trackers(reporter.warn)  # train.report_to: never stops the run
    try:
        if g.primary:
            trackers.start(r, session.run.root, start_step)
        g.set_hint(continue_hint(session))
        for step in range(start_step + 1, r.train.steps + 1):
            fault_point(f"rank{g.rank}.step")  # TEST-ONLY: NRT_MLX_FAULT=rank1.step:2
            started = time.perf_counter()
            result = train_step(session, step)
            stop = judge(session, result.metrics, monitor, reporter) if g.primary else False
            if r.train.collapse_stop:  # every rank stops where rank 0 does
                stop = g.broadcast(stop, f"the end of step {step}")
            if (
                session.valid
                and r.train.eval_every
                and (step % r.train.eval_every == 0 or step == r.train.steps)
            ):
                result.metrics.update(evaluate_valid(session))
            if g.primary:
                record(session, result, trackers, reporter, stop)
            g.note_step(time.perf_counter() - started)
            if stop:
                reporter.warn(
                    f"stopped at step {step} on policy collapse (train.collapse_stop); "
                    f"checkpoint {session.run.checkpoint_dir(step)}"
                )
                break
    except KeyboardInterrupt:
        if not g.primary:
            raise SystemExit(130) from None  # rank 0 says where to continue from
        raise Interrupted(interrupted_message(session.run, r.model.trust_remote_code)) from None
    finally:
        trackers.close()
        reporter.close()
    distributed.dump_weights(session.loaded.model, g)
    return session.run.root


def judge(session: Session, metrics: dict[str, Any], monitor: Any, reporter: Reporter) -> bool:
    """Refuse a non-finite figure, warn of policy collapse; whether the run stops here."""
    r, step = session.recipe, metrics["step"]
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NrtError(f"step {step}: {key} is {value}; lower optimizer.learning_rate")
    warnings = monitor.update(step, metrics) if r.train.method == "nrt" else []
    for message in warnings:
        reporter.warn(message)
    if warnings:
        metrics["collapse_warning"] = " | ".join(warnings)
    return r.train.collapse_stop and monitor.collapsed


def record(
    session: Session, result: StepResult, trackers: Any, reporter: Reporter, stop: bool
) -> None:
    """Rank 0: log the step's metrics (and samples), report, checkpoint when it is due."""
    r, step, metrics = session.recipe, result.metrics["step"], result.metrics
    session.run.log_metrics(metrics)
    trackers.log(metrics)
    if r.train.method == "nrt" and r.run.samples_every:
        if step == 1 or step % r.run.samples_every == 0:
            session.run.log_sample(_sample_record(session, result))
    reporter.step(metrics)
    if stop or step % r.run.save_every == 0 or step == r.train.steps:
        _checkpoint(session, step)
        session.group.set_hint(continue_hint(session))


def sync_state(session: Session) -> None:
    """Every rank takes rank 0's trainable weights, optimizer state and data position (a resumed
    run's checkpoint is on rank 0's disk alone)."""
    g = session.group
    if g.size > 1:
        distributed.share_training_state(g, session.loaded.model, session.optimizer)
        session.position = g.broadcast(session.position, "the start (rank 0's data position)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while training; the message says where the last checkpoint is and how to go on."""


def resume_command(run: RunDir, trust_remote_code: bool, overrides: list[str] | None) -> str:
    words = ["nrt-mlx", "train", "--resume", str(run.root)]
    words += [w for item in overrides or [] for w in ("--set", item)]
    words += ["--trust-remote-code"] if trust_remote_code else []
    return " ".join(shlex.quote(w) for w in words)


def interrupted_message(
    run: RunDir, trust_remote_code: bool, overrides: list[str] | None = None
) -> str:
    """One line: the run's last checkpoint and the command that continues it."""
    command = resume_command(run, trust_remote_code, overrides)
    step = run.latest_checkpoint()
    if step is None:
        return f"interrupted before the first checkpoint; start the run again with: {command}"
    return (
        f"interrupted; the last checkpoint is {run.checkpoint_dir(step)} (step {step}); "
        f"continue with: {command}"
    )


def continue_hint(session: Session) -> str:
    """What to do when a rank of the run is lost now (``Group.set_hint``)."""
    if not session.group.primary:
        return "rank 0 names the checkpoint to continue from"
    command = resume_command(session.run, session.recipe.model.trust_remote_code, None)
    step = session.run.latest_checkpoint()
    where = (
        "there is no checkpoint yet; start the run again"
        if step is None
        else f"the last checkpoint is {session.run.checkpoint_dir(step)} (step {step}); continue"
    )
    return f"{where} under the same mlx.launch command with: {command}"


def start_run(recipe: Recipe, group: Group | None = None) -> Session:
    """Prepare a new run and write its run directory's resolved recipe."""
    recipe.run.overrides = []  # a record of another run's resumes (e.g. a model card's recipe)
    from nrt_mlx.tracking import require

    require(recipe.train.report_to)  # a missing tracker package: before the model loads
    group = group or Group()
    lead(group, recipe, 0)
    session = prepare(recipe, group)
    session.run.root.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, session.run.recipe)
    return session


def train(
    recipe: Recipe,
    quiet: bool = False,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> Path:
    """Start a new run as the recipe says; returns the run directory. Ranks other than 0 of a
    ``group`` (``distributed.join``) train the run rank 0 leads (``follow``)."""
    if group and not group.primary:
        return follow(group, trust_remote_code)
    ready_to_train(recipe, trust_remote_code, "recipe")  # before the run directory is created
    # One process per run directory, and never over files nrt-mlx did not write (rundir.claim).
    with RunDir(Path(recipe.run.dir)).claim():
        try:
            session = start_run(recipe, group)
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted before training started: nothing to resume; run the same command again"
            ) from None
        # Even with --quiet: skipped records are never silent.
        print(session.data_report, flush=True)
        return run_training(session, 0, quiet)


def resume(
    run_dir: str | Path,
    quiet: bool = False,
    overrides: list[str] | None = None,
    trust_remote_code: bool = False,
    group: Group | None = None,
) -> Path:
    """Continue a run from its latest checkpoint (from the start when it has none yet), with the
    recipe it was started with, on one process or a ``group`` (of any size: the data order is
    the same).

    ``overrides`` (``--set``) may change any key but those of ``recipe.RESUME_FIXED``; accepted
    changes go into the run's recipe.yaml, listed in run.overrides with the first step they apply
    to. The learning-rate schedule is recomputed for the new recipe (see recipes/reference.yaml).
    A refused override, or any error before training starts, leaves the run directory untouched.
    """
    if group and not group.primary:
        return follow(group, trust_remote_code)  # the run directory is rank 0's
    run = RunDir(Path(run_dir).expanduser().absolute()).check()
    # Refusals first, before the lock and the recovery touch anything.
    _, recipe, _ = _resume_recipes(run, run.latest_checkpoint() or 0, overrides, trust_remote_code)
    from nrt_mlx.tracking import require

    require(recipe.train.report_to)  # a missing tracker package: before the model loads
    with run.lock():  # one process per run directory, released however the process ends
        return _resume_locked(run, quiet, overrides, trust_remote_code, group or Group())


def _resume_recipes(
    run: RunDir, step: int, overrides: list[str] | None, trust_remote_code: bool
) -> tuple[Recipe, Recipe, list[dict]]:
    """(saved recipe, recipe to resume with, its run.overrides entries) of resuming from ``step``;
    a refused override or a missing --trust-remote-code is a one-line error."""
    saved = run.read_recipe()
    recipe = run.read_recipe(overrides) if overrides else copy.deepcopy(saved)
    entries = resume_overrides(saved, recipe, step + 1)
    if recipe.train.steps < step:
        raise NrtError(
            f"--set train.steps={recipe.train.steps}: the run is already at step {step}; "
            f"give a number above {step}"
        )
    ready_to_train(recipe, trust_remote_code, str(run.recipe))
    recipe.run.dir = str(run.root)
    return saved, recipe, entries


def _resume_locked(
    run: RunDir, quiet: bool, overrides: list[str] | None, trust_remote_code: bool, group: Group
) -> Path:
    step = run.recover()  # the newest intact checkpoint (0: none yet), damaged ones warned of
    if step == 0 and (run.adapters / ADAPTER_WEIGHTS).exists():
        # A trained run whose checkpoints were removed: starting it over would replace its adapters.
        raise NrtError(
            f"{run.root}: has adapters/ but no checkpoint to resume from (were checkpoints/ "
            "removed?); nrt-mlx will not train over them: start a new run in another directory"
        )
    saved, recipe, entries = _resume_recipes(run, step, overrides, trust_remote_code)
    lead(group, recipe, step)
    try:
        session = prepare(recipe, group)
        if step:
            state = run.load_checkpoint(step, session.loaded.model, session.optimizer)
            session.position = state["position"]
    except KeyboardInterrupt:
        message = interrupted_message(run, trust_remote_code, overrides or [])
        raise Interrupted(message) from None
    if entries:
        earlier = [{**e, "from_step": min(e["from_step"], step + 1)} for e in saved.run.overrides]
        recipe.run.overrides = earlier + entries
        save_recipe(recipe, run.recipe)
        changes = ", ".join(f"{e['key']} {e['was']!r} -> {e['value']!r}" for e in entries)
        print(
            f"resuming at step {step + 1} with {changes} (recorded in {run.recipe})",
            file=sys.stderr,
        )
        if step:
            _reschedule(session, saved)
    run.rewind(step)  # adapters/ and the logs as of the checkpoint; damaged newer ones moved
    if step >= recipe.train.steps:
        print(
            f"{run.root} is at step {step} of {recipe.train.steps}: nothing to train "
            "(extend it with --set train.steps=N)",
            file=sys.stderr,
        )
        return run.root
    return run_training(session, step, quiet)


def _reschedule(session: Session, saved: Recipe) -> None:
    """After a resume that changed the recipe: the rate of the next update from the recomputed
    schedule (the checkpoint holds the old schedule's), and a warning when the two differ."""
    update = session.optimizer.step
    rate = lr_schedule(session.recipe)(update)
    new, old = float(rate), float(lr_schedule(saved)(update))
    session.optimizer.learning_rate = rate
    if not math.isclose(new, old, rel_tol=1e-6):
        warn(
            f"the learning-rate schedule is recomputed for the resumed recipe: the next update's "
            f"rate is {new:.3g} (the old schedule's was {old:.3g})"
        )


# ---- ranks other than 0 (mlx.launch) --------------------------------------------------------------


def lead(group: Group, recipe: Recipe, step: int) -> None:
    """Rank 0: send the run's recipe and the step it starts from to the other ranks (``follow``),
    before every rank loads the model."""
    group.broadcast({"recipe": recipe.to_dict(), "step": step}, "the start (rank 0's recipe)")


def follow(group: Group, trust_remote_code: bool) -> Path:
    """A rank other than 0: train the run rank 0 leads, with its recipe from its step (the
    weights, optimizer state and data position come in ``sync_state``). It writes nothing: the
    run directory may not exist on this machine."""
    start = group.broadcast(None, "the start (rank 0's recipe)")
    recipe = recipe_from_dict(start["recipe"], "rank 0's recipe")
    ready_to_train(recipe, trust_remote_code, "rank 0's recipe")
    session = prepare(recipe, group)
    if start["step"] >= recipe.train.steps:
        return session.run.root
    return run_training(session, start["step"], quiet=True)
