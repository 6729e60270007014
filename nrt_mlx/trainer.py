"""The training loop: sample traces, build rows, one forward/backward, AdamW update, log, checkpoint.

One NRT step (``train.method: nrt``):

1. take ``questions_per_step`` questions in a seeded, epoch-wise shuffled order;
2. sample K traces per question in one batched generation (``nrt_mlx.rollout``);
3. build the rows ``[prompt | z_k | m | y* EOS]`` plus one null-think row per question
   (``nrt_mlx.sequences``);
4. for each micro-batch of whole questions, one forward pass gives the rewards (without gradient)
   and the loss (``nrt_mlx.loss``); gradients are accumulated, weighted by the micro-batch's share
   of rows, clipped, and applied by AdamW with warm-up and cosine decay.

``train.method: sft`` trains plain LoRA SFT on ``[prompt | y* EOS]``: the baseline to compare with.
Randomness is derived from (seed, step), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from nrt_mlx.collapse import distinct_n
from nrt_mlx.data import Dataset, Example, drop_long, load_jsonl
from nrt_mlx.errors import NrtError
from nrt_mlx.loss import nrt_loss, score_batch, sft_loss
from nrt_mlx.model import LoadedModel, adapter_config, add_adapters, load_model
from nrt_mlx.progress import Reporter
from nrt_mlx.recipe import Recipe, load_recipe, save_recipe
from nrt_mlx.rollout import Trace, sample_traces
from nrt_mlx.rundir import RunDir
from nrt_mlx.sequences import (
    AnswerMarker,
    Row,
    build_rows,
    collate,
    encode_answer,
    encode_prompt,
    eos_ids,
    pad_id,
    resolve_marker,
    sft_rows,
)

# Keys of the loss metrics that are averaged over training rows into the step's metrics.
_ROW_MEAN_KEYS = (
    "loss",
    "trace_loss",
    "token_loss",
    "format_loss",
    "answer_nll",
    "null_answer_nll",
    "trace_entropy",
)


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
    train: list[Encoded]
    valid: list[Encoded]
    marker: AnswerMarker
    eos_ids: set[int]
    optimizer: optim.Optimizer
    run: RunDir
    adapter_config: dict
    pad_id: int
    max_length: int
    normalizer: float
    data_report: str  # what was kept and skipped of data.train
    position: int = 0  # questions consumed so far (the data position a checkpoint saves)


@dataclass
class StepResult:
    """One step's logged metrics, and the questions and traces behind them (for samples.jsonl)."""

    metrics: dict[str, Any]
    items: list[Encoded]
    traces: list[list[Trace]] | None  # None for SFT
    rewards: list[float]  # raw trace reward per trace row, in the order of ``traces``


def encode_dataset(data: Dataset, tokenizer: Any, recipe: Recipe) -> list[Encoded]:
    """Tokenize prompts and answers once; drop (and count) examples over the length limits."""
    cache: dict[int, Encoded] = {}

    def enc(ex: Example) -> Encoded:
        if ex.line not in cache:
            cache[ex.line] = Encoded(
                ex,
                encode_prompt(tokenizer, ex.messages, recipe.rollout.think_prefix),
                encode_answer(tokenizer, ex.answer),
            )
        return cache[ex.line]

    drop_long(
        data,
        lambda ex: len(enc(ex).prompt),
        lambda ex: len(enc(ex).answer),
        recipe.data.max_prompt_tokens,
        recipe.data.max_answer_tokens,
    )
    return [cache[ex.line] for ex in data.examples]


def lr_schedule(recipe: Recipe) -> Any:
    """Linear warm-up to the learning rate, then cosine decay to ``min_lr_ratio`` of it."""
    o, steps = recipe.optimizer, recipe.train.steps * recipe.train.updates_per_rollout
    warmup = int(round(o.warmup_ratio * steps))
    cosine = optim.cosine_decay(
        o.learning_rate, max(steps - warmup, 1), o.learning_rate * o.min_lr_ratio
    )
    if warmup == 0:
        return cosine
    ramp = optim.linear_schedule(o.learning_rate / warmup, o.learning_rate, warmup)
    return optim.join_schedules([ramp, cosine], [warmup])


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


def _check_run_dir(run: RunDir) -> None:
    if run.latest_checkpoint() is not None or (run.metrics.exists() and run.metrics.stat().st_size):
        raise NrtError(
            f"run.dir {run.root} already holds a run: continue it with "
            f"'nrt-mlx train --resume {run.root}', or set run.dir to a new directory"
        )


def prepare(recipe: Recipe, resume: bool = False) -> Session:
    """Load data, model and adapters, and create the optimizer and run directory."""
    run = RunDir(Path(recipe.run.dir))
    if not resume:
        _check_run_dir(run)
    train_data = load_jsonl(recipe.data.train, recipe.data, "data.train")
    valid_data = (
        load_jsonl(recipe.data.valid, recipe.data, "data.valid") if recipe.data.valid else None
    )
    loaded = load_model(recipe.model)
    tok = loaded.tokenizer
    if recipe.train.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(loaded.model.layers[0])
    add_adapters(loaded.model, recipe.lora, recipe.train.seed)
    train = encode_dataset(train_data, tok, recipe)
    valid = encode_dataset(valid_data, tok, recipe) if valid_data else []
    marker = resolve_marker(tok, recipe.rollout.marker)
    # Record what was actually used: the resolved quantization and absolute paths.
    recipe.model.quantize = loaded.bits if loaded.bits is not None else "none"
    max_length = (
        recipe.data.max_prompt_tokens
        + recipe.rollout.max_think_tokens
        + len(marker.ids)
        + recipe.data.max_answer_tokens
    )
    normalizer = float(
        recipe.objective.normalizer
        or (recipe.rollout.max_think_tokens + recipe.data.max_answer_tokens)
    )
    extra = {
        "nrt_mlx": {
            "method": recipe.train.method,
            "aggregator": recipe.objective.aggregator,
            "marker": marker.text,
        }
    }
    session = Session(
        recipe=recipe,
        loaded=loaded,
        train=train,
        valid=valid,
        marker=marker,
        eos_ids=eos_ids(tok),
        optimizer=make_optimizer(recipe),
        run=run,
        adapter_config=adapter_config(loaded, recipe.lora, extra),
        pad_id=pad_id(tok),
        max_length=max_length,
        normalizer=normalizer,
        data_report=train_data.report(),
    )
    return session


def _rows_for_step(
    session: Session, items: list[Encoded], traces: list[list[Trace]] | None
) -> list[list[Row]]:
    """Rows per question: K trace rows and the null-think row (NRT), or the answer row (SFT)."""
    out = []
    for q, item in enumerate(items):
        if traces is None:
            out.append(sft_rows(item.prompt, item.answer, q, session.max_length))
            continue
        group = traces[q]
        out.append(
            build_rows(
                item.prompt,
                [t.tokens for t in group],
                session.marker,
                item.answer,
                q,
                [t.emitted_marker for t in group],
                session.max_length,
            )
        )
    return out


def _micro_batches(rows: list[list[Row]], per_batch: int) -> list[list[Row]]:
    """Whole questions per micro-batch: group normalisation needs all K rows and the null row."""
    per_batch = per_batch or len(rows)
    return [sum(rows[i : i + per_batch], []) for i in range(0, len(rows), per_batch)]


def train_step(session: Session, step: int) -> StepResult:
    """One optimizer step (or ``updates_per_rollout`` of them on one rollout batch)."""
    r = session.recipe
    model = session.loaded.model
    seed = r.train.seed
    mx.random.seed(seed * 1_000_003 + step)  # LoRA dropout, reproducible per step
    idx = question_indices(
        len(session.train),
        seed,
        session.position,
        r.train.questions_per_step,
        r.data.shuffle,
    )
    items = [session.train[i] for i in idx]
    nrt = r.train.method == "nrt"

    traces, sample_stats = None, None
    if nrt:
        model.eval()
        key = mx.random.key(seed * 7_919 + step)
        traces, sample_stats = sample_traces(
            model, [it.prompt for it in items], r.rollout, session.marker.ids, session.eos_ids, key
        )
    micro = _micro_batches(_rows_for_step(session, items, traces), r.train.micro_batch_questions)
    batches = [collate(mb, session.pad_id) for mb in micro]
    model.train()

    n_rows = [sum(not row.is_null for row in mb) for mb in micro]
    total_rows = sum(n_rows)
    fixed_rewards: list[Any] = [None] * len(batches)
    if nrt and r.train.updates_per_rollout > 1:
        # Several updates on one rollout batch: the rewards and the old log-probs of the clipped
        # importance ratio come from the weights that sampled the batch, fixed before any update.
        for i, b in enumerate(batches):
            fixed_rewards[i], lp = score_batch(model, b, r.objective)
            batches[i] = dataclasses.replace(b, old_logprobs=lp)
            mx.eval(lp, fixed_rewards[i].advantage)

    def weighted(
        model: nn.Module, batch: Any, weight: float, rewards: Any
    ) -> tuple[mx.array, dict]:
        if nrt:
            loss, metrics = nrt_loss(model, batch, r.objective, session.normalizer, rewards=rewards)
        else:
            loss, metrics = sft_loss(model, batch, session.normalizer)
        return loss * weight, metrics

    value_and_grad = nn.value_and_grad(model, weighted)

    start = time.perf_counter()
    lr = float(session.optimizer.learning_rate.item())  # the rate this step's update uses
    sums: dict[str, float] = {}
    rewards: list[float] = []
    train_tokens = 0
    for update in range(r.train.updates_per_rollout):
        grads = None
        for b, n, fixed in zip(batches, n_rows, fixed_rewards):
            (loss, metrics), g = value_and_grad(model, b, n / total_rows, fixed)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads, metrics)
            if update == 0:
                train_tokens += int(b.lengths.sum().item())
                for key in _ROW_MEAN_KEYS:
                    if key in metrics:
                        sums[key] = sums.get(key, 0.0) + float(metrics[key].item()) * n
                if "trace_reward" in metrics:
                    is_null = np.array(b.is_null)
                    rewards += np.array(metrics["trace_reward"])[~is_null].tolist()
        if r.optimizer.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, r.optimizer.grad_clip)
        session.optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), session.optimizer.state)
    train_seconds = time.perf_counter() - start
    session.position += len(items)

    out: dict[str, Any] = {"step": step}
    for key, total in sums.items():
        out[key] = total / total_rows
    if nrt:
        flat = [t for g in traces for t in g]
        lengths = [len(t.tokens) for t in flat]
        out["reward_mean"] = float(np.mean(rewards)) if rewards else 0.0
        out["reward_std"] = float(np.std(rewards)) if rewards else 0.0
        out["trace_tokens_mean"] = float(np.mean(lengths))
        out["trace_tokens_min"] = int(np.min(lengths))
        out["trace_tokens_max"] = int(np.max(lengths))
        out["marker_rate"] = float(np.mean([t.emitted_marker for t in flat]))
        out["distinct_2"] = distinct_n([t.tokens for t in flat], 2)
        out["sample_tokens_per_s"] = sample_stats.tokens_per_second
        out["sample_seconds"] = sample_stats.seconds
    out["train_tokens_per_s"] = train_tokens / train_seconds if train_seconds > 0 else 0.0
    out["train_seconds"] = train_seconds
    out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    out["lr"] = lr
    return StepResult(out, items, traces, rewards)


def _sample_record(session: Session, result: StepResult, max_traces: int = 4) -> dict[str, Any]:
    """The first question of the step with a few of its traces and their trace rewards."""
    tok = session.loaded.tokenizer
    item, rewards = result.items[0], result.rewards
    return {
        "step": result.metrics["step"],
        "question": item.example.question,
        "reference": item.example.answer,
        "traces": [
            {
                "text": tok.decode(t.tokens),
                "reward": rewards[i] if i < len(rewards) else None,
                "tokens": len(t.tokens),
                "emitted_marker": t.emitted_marker,
            }
            for i, t in enumerate(result.traces[0][:max_traces])
        ],
    }


def _checkpoint(session: Session, step: int) -> None:
    state = {
        "position": session.position,
        "rng": {"seed": session.recipe.train.seed, "scheme": "per-step: seed*1000003+step"},
    }
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
        r,
        samples=r.train.eval_samples,
        seed=r.train.seed,
        max_questions=r.train.eval_questions,
        generate=True,
        max_answer_tokens=min(64, r.data.max_answer_tokens),
    )
    report = evaluate(
        session.loaded.model, session.loaded.tokenizer, [e.example for e in session.valid], cfg
    )
    return {f"eval_{k}": v for k, v in report.summary.items() if isinstance(v, (int, float))}


def run_training(session: Session, start_step: int = 0, quiet: bool = False) -> Path:
    """Train from ``start_step`` to ``train.steps``: log, sample, evaluate, watch for collapse,
    checkpoint."""
    from nrt_mlx.collapse import CollapseMonitor

    r = session.recipe
    monitor = CollapseMonitor(r.train.collapse_fraction)
    monitor.replay(session.run.read_metrics())  # a resumed run keeps its starting values
    reporter = Reporter(r.train.steps, start_step, quiet, r.run.log_every)
    try:
        for step in range(start_step + 1, r.train.steps + 1):
            result = train_step(session, step)
            metrics = result.metrics
            for key, value in metrics.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise NrtError(f"step {step}: {key} is {value}; lower optimizer.learning_rate")
            stop = False
            if r.train.method == "nrt":
                warnings = monitor.update(step, metrics)
                for message in warnings:
                    reporter.warn(message)
                if warnings:
                    metrics["collapse_warning"] = " | ".join(warnings)
                stop = r.train.collapse_stop and monitor.collapsed
            if (
                session.valid
                and r.train.eval_every
                and (step % r.train.eval_every == 0 or step == r.train.steps)
            ):
                metrics.update(evaluate_valid(session))
            session.run.log_metrics(metrics)
            if (
                r.train.method == "nrt"
                and r.run.samples_every
                and (step == 1 or step % r.run.samples_every == 0)
            ):
                session.run.log_sample(_sample_record(session, result))
            reporter.step(metrics)
            if stop or step % r.run.save_every == 0 or step == r.train.steps:
                _checkpoint(session, step)
            if stop:
                reporter.warn(
                    f"stopped at step {step} on policy collapse (train.collapse_stop); "
                    f"checkpoint {session.run.checkpoint_dir(step)}"
                )
                break
    finally:
        reporter.close()
    return session.run.root


def start_run(recipe: Recipe) -> Session:
    """Prepare a new run and write its run directory's resolved recipe."""
    session = prepare(recipe)
    session.run.root.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, session.run.recipe)
    return session


def train(recipe: Recipe, quiet: bool = False) -> Path:
    """Start a new run as the recipe says; returns the run directory."""
    session = start_run(recipe)
    if not quiet:
        print(session.data_report)
    return run_training(session, 0, quiet)


def resume(run_dir: str | Path, quiet: bool = False, overrides: list[str] | None = None) -> Path:
    """Continue a run from its latest checkpoint, with the recipe it was started with."""
    run = RunDir(Path(run_dir))
    if not run.recipe.exists():
        raise NrtError(f"{run_dir}: not a run directory (no recipe.yaml)")
    step = run.latest_checkpoint()
    if step is None:
        raise NrtError(
            f"{run_dir}: no checkpoint to resume from; start it again with 'nrt-mlx train'"
        )
    recipe = load_recipe(run.recipe, overrides)
    recipe.run.dir = str(run.root)
    session = prepare(recipe, resume=True)
    state = run.load_checkpoint(step, session.loaded.model, session.optimizer)
    session.position = state["position"]
    run.truncate_logs(step)
    if step >= recipe.train.steps:
        return run.root
    return run_training(session, step, quiet)
