"""A training session: data, model, adapters and optimizer, prepared once for a run.

``prepare`` loads what a recipe names (in a run directory its caller holds), tokenises the data
once, decides the shared-prompt layout (``shared_prompt_problem``) and builds the optimizer with
its learning-rate schedule (``lr_schedule``). ``nrt_mlx.step`` runs one training step on a
``Session``; ``nrt_mlx.trainer`` runs the steps of a run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from nrt_mlx import distributed, marker, prefix
from nrt_mlx.batch import THINK, build_rows, collate
from nrt_mlx.data import Dataset, Example, drop_long, load_data
from nrt_mlx.distributed import Group
from nrt_mlx.errors import NrtError
from nrt_mlx.model import (
    LoadedModel,
    adapter_config,
    add_adapters,
    load_model,
    num_lora_layers,
)
from nrt_mlx.objective import (
    answer_logprobs,
    default_normalizer,
    forward,
)
from nrt_mlx.recipe import Recipe, with_remote_code
from nrt_mlx.rollout import Trace
from nrt_mlx.rundir import RunDir
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
    # Blocks below the first adapted one, whose rollout states the update reuses (nrt_mlx.reuse;
    # 0: none, without the shared prompt or with a text marker)
    reuse_below: int = 0
    position: int = 0  # questions consumed so far (the data position a checkpoint saves)
    group: Group = field(default_factory=Group)  # the processes training the run (mlx.launch)


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
    train_data = load_data(recipe.data.train, recipe.data, "data.train")
    valid_data = (
        load_data(recipe.data.valid, recipe.data, "data.valid") if recipe.data.valid else None
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
        # A text marker's trace may be tokenised again: its tokens need not be the ones sampled.
        reuse_below=len(loaded.model.layers) - num_lora_layers(loaded.model, recipe.lora)
        if shared and m.is_special
        else 0,
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
