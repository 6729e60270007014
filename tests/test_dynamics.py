"""The training dynamics of the released recipe: learning-rate schedules, mini-batches with the
clipped ratio, scoring at the sampling temperature and the released loss scale, in the trainer.

The references are computed here independently: the rates by a plain Python formula, the
mini-batch updates by hand (rows, rewards and old log-probs fixed from the sampling weights, one
plain AdamW step per mini-batch in numpy).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import yaml
from helpers import tiny_recipe
from mlx.utils import tree_flatten, tree_unflatten

from nrt_mlx import session as session_module
from nrt_mlx import step, trainer
from nrt_mlx.batch import build_rows, collate
from nrt_mlx.errors import NrtError
from nrt_mlx.objective import RELEASED_MICRO_ROWS, nrt_loss, reference_pass
from nrt_mlx.recipe import Recipe, load_recipe, recipe_from_dict


def recipe_dict(tmp_path: Path, model_dir: Path, name: str = "run", **sections) -> dict:
    recipe = tiny_recipe(tmp_path, model_dir, name, run={"save_every": 100, "samples_every": 0})
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


# ---- learning-rate schedules ----------------------------------------------------------------------


def expected_rate(
    u: int, updates: int, lr: float, warmup_ratio: float, schedule: str, min_lr_ratio: float
) -> float:
    """The rate of optimizer update u (0-based) of a run of ``updates`` updates, by hand."""
    warmup = int(round(warmup_ratio * updates))
    if u < warmup:  # linear from lr / warmup towards lr
        return lr / warmup + (lr - lr / warmup) * u / warmup
    rest, end = max(updates - warmup, 1), lr * min_lr_ratio
    t = min(u - warmup, rest)
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr + (end - lr) * t / rest
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * t / rest))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.1, 0.3])
def test_schedule_gives_the_expected_rate_of_every_update(schedule: str, warmup_ratio: float):
    """One rate per optimizer update: steps x updates_per_rollout x mini_batches of them."""
    recipe = Recipe()
    recipe.train.steps, recipe.train.updates_per_rollout = 7, 2
    recipe.train.questions_per_step, recipe.train.mini_batches = 4, 3
    o = recipe.optimizer
    o.learning_rate, o.warmup_ratio, o.schedule, o.min_lr_ratio = 3e-4, warmup_ratio, schedule, 0.1
    updates = 7 * 2 * 3
    fn = session_module.lr_schedule(recipe)
    got = [float(fn(mx.array(u, dtype=mx.uint64)).item()) for u in range(updates)]
    want = [expected_rate(u, updates, 3e-4, warmup_ratio, schedule, 0.1) for u in range(updates)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if schedule == "constant":
        assert got[-1] == pytest.approx(3e-4)
    else:  # the decay spans exactly the run's updates: it ends one update after the last
        assert got[-1] < 3e-4 * 0.15
        last = fn(mx.array(updates, dtype=mx.uint64)).item()
        assert last == pytest.approx(3e-5, rel=1e-5)


def test_cosine_stays_the_default():
    """Runs started before the key existed resume with the schedule they had."""
    assert Recipe().optimizer.schedule == "cosine"
    assert recipe_from_dict({}).optimizer.schedule == "cosine"


@pytest.mark.parametrize(
    "schedule, method", [("constant", "nrt"), ("linear", "sft"), ("cosine", "nrt")]
)
def test_logged_rate_follows_the_schedule(tmp_path, tiny_model_dir, schedule: str, method: str):
    """metrics.jsonl's lr of step s is the rate of the step's first update, and the run makes
    exactly steps x updates_per_rollout x mini_batches updates."""
    steps, per_step = 3, 2 * 2
    recipe = recipe_from_dict(
        recipe_dict(
            tmp_path,
            tiny_model_dir,
            optimizer={
                "learning_rate": 1e-3,
                "warmup_ratio": 0.25,
                "schedule": schedule,
                "min_lr_ratio": 0.1,
            },
            train={
                "method": method,
                "steps": steps,
                "questions_per_step": 3,
                "mini_batches": 2,
                "updates_per_rollout": 2,
            },
        )
    )
    run = trainer.train(recipe, quiet=True)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in lines]
    updates = steps * per_step
    want = [expected_rate(s * per_step, updates, 1e-3, 0.25, schedule, 0.1) for s in range(steps)]
    np.testing.assert_allclose(logged, want, rtol=1e-5)
    state = mx.load(str(run / "checkpoints" / f"step_{steps:06d}" / "optimizer.safetensors"))
    assert int(state["step"].item()) == updates


# ---- mini-batches ---------------------------------------------------------------------------------


def test_mini_batch_bounds_split_whole_questions_nearly_equally():
    assert step.mini_batch_bounds(4, 1) == [(0, 4)]
    assert step.mini_batch_bounds(256, 4) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    assert step.mini_batch_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert step.mini_batch_bounds(3, 3) == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"train": {"questions_per_step": 4, "mini_batches": 5}},
            "train.mini_batches (5) exceeds train.questions_per_step (4)",
        ),
        ({"train": {"mini_batches": 0}}, "train.mini_batches must be at least 1"),
        ({"optimizer": {"schedule": "step"}}, "'constant', 'cosine', 'linear'"),
        ({"objective": {"normalizer": -3}}, "objective.normalizer must be >= 0"),
        ({"objective": {"normalizer": "padded"}}, "objective.normalizer: 'padded' is not valid"),
    ],
)
def test_recipe_refuses_bad_values_in_one_line(tmp_path, data: dict, expected: str):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(NrtError) as err:
        load_recipe(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_normalizer_released_round_trips_and_0_stays_0(tmp_path):
    """New recipes default to released; a saved 0 (nrt-mlx 0.1) loads as 0, not as the default."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"objective": {"normalizer": 0}}))
    assert load_recipe(path).objective.normalizer == 0
    path.write_text(yaml.safe_dump({}))
    assert load_recipe(path).objective.normalizer == "released"
    path.write_text(yaml.safe_dump(Recipe().to_dict()))
    assert load_recipe(path).objective.normalizer == "released"


def adamw_step(p: dict, grads: dict, m: dict, v: dict, lr: float, o) -> None:
    """One plain AdamW update in numpy (decoupled decay, no bias correction, as mlx's AdamW)."""
    b1, b2 = o.betas
    for k, g in grads.items():
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g * g
        p[k] = p[k] * (1 - lr * o.weight_decay) - lr * m[k] / (np.sqrt(v[k]) + o.eps)


def sequential_updates(model, recipe: Recipe, groups, prompts, fixed: bool) -> dict:
    """One AdamW update per group of rows, in order. ``fixed``: every group's rewards and old
    log-probs come from the weights before the first update; else from the weights at its update,
    with rho = 1 (what ignoring the staleness would do)."""
    o, t = recipe.optimizer, recipe.rollout.temperature
    # N = W / 16 with W the longest response of the whole rollout, not of each group.
    width = max(len(r.tokens) - prompts[id(r)] for g in groups for r in g if not r.is_null)
    normalizer = width / RELEASED_MICRO_ROWS
    batches = [collate(g, 0) for g in groups]
    scored = [reference_pass(model, b, recipe.objective, t) for b in batches] if fixed else None
    p = params(model)
    m = {k: np.zeros_like(x) for k, x in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for i, batch in enumerate(batches):
        if fixed:
            rewards, old = scored[i]
            batch = dataclasses.replace(batch, old_logprobs=old)
        else:
            rewards, _ = reference_pass(model, batch, recipe.objective, t)

        def loss(batch=batch, rewards=rewards):
            return nrt_loss(model, batch, recipe.objective, normalizer, rewards, t)[0]

        _, grads = nn.value_and_grad(model, loss)()
        adamw_step(p, {k: np.array(g) for k, g in tree_flatten(grads)}, m, v, o.learning_rate, o)
        model.update(tree_unflatten([(k, mx.array(x)) for k, x in p.items()]))
    return params(model)


def test_mini_batches_equal_sequential_updates_from_the_sampling_weights(
    tmp_path, tiny_model_dir, monkeypatch
):
    """3 questions in 2 mini-batches (2 + 1), micro-batches of one question: the adapters after one
    step equal two AdamW updates computed here on the same rows, with the rewards, the old
    log-probs of the clipped ratio and N fixed from the whole rollout under the sampling weights,
    at the sampling temperature."""
    sections = {
        "rollout": {"samples": 3, "max_think_tokens": 8, "temperature": 0.7},
        "optimizer": {
            "learning_rate": 2e-2,
            "warmup_ratio": 0.0,
            "schedule": "constant",
            "grad_clip": 0.0,
        },
        "train": {
            "steps": 1,
            "questions_per_step": 3,
            "mini_batches": 2,
            "micro_batch_questions": 1,
        },
    }
    recipe = recipe_from_dict(recipe_dict(tmp_path, tiny_model_dir, "a", **sections))
    reference = session_module.prepare(
        recipe_from_dict(recipe_dict(tmp_path, tiny_model_dir, "b", **sections))
    )
    session = session_module.prepare(recipe)
    start = params(session.loaded.model)
    assert start.keys() == params(reference.loaded.model).keys()
    seen = {}
    original = step.sample

    def spy(session_, items, key):
        seen["items"], (seen["traces"], stats) = items, original(session_, items, key)
        return seen["traces"], stats

    monkeypatch.setattr(step, "sample", spy)
    result = step.train_step(session, 1)
    got = params(session.loaded.model)

    items, traces, marker = seen["items"], seen["traces"], session.vocab.marker.ids
    rows = [
        build_rows(it.prompt, traces[q], marker, it.answer, q, session.max_length)
        for q, it in enumerate(items)
    ]
    prompts = {id(r): len(it.prompt) for it, group in zip(items, rows) for r in group}
    groups = [rows[0] + rows[1], rows[2]]
    model = reference.loaded.model
    want = sequential_updates(model, recipe, groups, prompts, fixed=True)
    scale = max(np.abs(want[k] - start[k]).max() for k in want)
    assert scale > 1e-3  # the adapters really moved
    # AdamW turns float rounding of a near-zero gradient into up to a learning rate's step: the
    # absolute tolerance is a small share of how far the adapters moved.
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=3e-4 * scale, err_msg=k)
    # The comparison can tell: rewards and ratio taken afresh at the second update differ.
    model.update(tree_unflatten([(k, mx.array(x)) for k, x in start.items()]))
    stale = sequential_updates(model, recipe, groups, prompts, fixed=False)
    assert max(np.abs(stale[k] - got[k]).max() for k in got) > 1e-2 * scale
    assert 0 < result.metrics["clip_fraction"] < 1  # the ratio is active from the second update


# ---- the loss normaliser --------------------------------------------------------------------------


@pytest.mark.parametrize("normalizer", ["released", 0, 20])
def test_the_step_divides_by_the_recipes_normalizer(
    tmp_path, tiny_model_dir, monkeypatch, normalizer
):
    """released: W / 16 with W the longest [z | m | y* EOS] of the whole rollout, the same for
    every micro-batch of every mini-batch; 0: max_think_tokens + max_answer_tokens, as nrt-mlx
    0.1 (and the runs it started) divided; a number: itself."""
    train = {"steps": 1, "questions_per_step": 3, "mini_batches": 2, "micro_batch_questions": 1}
    sections = {"objective": {"normalizer": normalizer}, "train": train}
    session = session_module.prepare(
        recipe_from_dict(recipe_dict(tmp_path, tiny_model_dir, **sections))
    )
    seen = []
    original = step.nrt_loss

    def spy(model, batch, cfg, n, *args):
        seen.append((batch, n))
        return original(model, batch, cfg, n, *args)

    monkeypatch.setattr(step, "nrt_loss", spy)
    step.train_step(session, 1)
    assert len(seen) == 3  # micro-batches of one question
    widths = []
    for batch, _ in seen:
        segments = np.array(batch.segments)  # PROMPT 0, PAD -1; think, marker, answer > 0
        widths += (segments > 0).sum(axis=1)[~np.array(batch.is_null)].tolist()
    assert len(set(widths)) > 1
    want = {"released": max(widths) / 16, 0: 8.0 + 48.0, 20: 20.0}[normalizer]
    assert [n for _, n in seen] == [want] * 3
