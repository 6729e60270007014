"""The rollout's states below the adapters, reused by the update (nrt_mlx/reuse.py): the traces
are those sampled without keeping them, and the loss and gradients equal those of recomputing
every block (the tiny model; SmolLM2 in the real tier)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import tiny_recipe
from mlx.utils import tree_flatten

from nrt_mlx import reuse
from nrt_mlx.objective import nrt_loss
from nrt_mlx.recipe import ObjectiveConfig, recipe_from_dict
from nrt_mlx.rollout import sample_traces
from nrt_mlx.session import prepare
from nrt_mlx.step import build_batches, sample


def _session(tmp_path: Path, model_dir: Path, **sections: dict):
    sections.setdefault("lora", {"layers": 2, "rank": 4})
    sections.setdefault("rollout", {"samples": 3, "max_think_tokens": 12, "temperature": 1.5})
    sections.setdefault("train", {"steps": 1, "questions_per_step": 3})
    return prepare(recipe_from_dict(tiny_recipe(tmp_path, model_dir, **sections)))


def _grads(model: nn.Module, batch) -> tuple[float, dict[str, np.ndarray]]:
    def loss(m):
        return nrt_loss(m, batch, ObjectiveConfig(), 3.0, None, 1.0)[0]

    value, grads = nn.value_and_grad(model, loss)(model)
    return float(value), {k: np.array(v) for k, v in tree_flatten(grads)}


def _without_states(traces):
    return [[dataclasses.replace(t, states=None) for t in group] for group in traces]


def _check_equal(session, items, traces) -> None:
    with_states = build_batches(session, items, traces)[0]
    plain = build_batches(session, items, _without_states(traces))[0]
    assert with_states.prompt_replay is not None and plain.prompt_replay is None
    assert all(p.replay is not None for p in with_states.passes if p.grad)
    model = session.loaded.model
    model.eval()  # no LoRA dropout: the two losses must see the same model
    try:
        l1, g1 = _grads(model, plain)
        l2, g2 = _grads(model, with_states)
        # Replayed states are used, not ignored: wrong ones change the loss.
        p = with_states.passes[0]
        bad = dataclasses.replace(p, replay=reuse.Replay(p.replay.hidden * 2, p.replay.kv))
        wrong = dataclasses.replace(with_states, passes=(bad, *with_states.passes[1:]))
        l3, _ = _grads(model, wrong)
    finally:
        model.train()
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    assert abs(l3 - l1) > 1e-3 * abs(l1)
    scale = max(np.abs(v).max() for v in g1.values())
    assert scale > 0 and g1.keys() == g2.keys()
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)


def test_kept_states_give_the_loss_and_gradients_of_every_block(tmp_path, tiny_model_dir):
    session = _session(tmp_path, tiny_model_dir)
    assert session.reuse_below == 2  # the tiny model has 4 blocks, LoRA on the last 2
    items = session.train[:3]
    traces, _ = sample(session, items, mx.random.key(3))
    lengths = [len(t.tokens) for g in traces for t in g]
    assert max(lengths) == 12 and min(lengths) < 12  # rows cut at the budget and rows that ended
    assert all(t.states is not None for g in traces for t in g)
    # Keeping the states does not change what is sampled.
    model, vocab, cfg = session.loaded.model, session.vocab, session.recipe.rollout
    model.eval()
    prompts = [it.prompt for it in items]
    plain, _ = sample_traces(model, prompts, cfg, vocab, mx.random.key(3), [0, 1, 2])
    model.train()
    assert [[t.tokens for t in g] for g in plain] == [[t.tokens for t in g] for g in traces]
    assert all(t.states is None for g in plain for t in g)
    _check_equal(session, items, traces)


def test_states_follow_rows_dropped_from_the_batch(tmp_path, tiny_model_dir):
    """Many rows ending at different steps: the rollout drops them from its cache in bunches,
    and each row's states still come out whole."""
    session = _session(
        tmp_path,
        tiny_model_dir,
        rollout={"samples": 8, "max_think_tokens": 40, "temperature": 3.0},
        train={"steps": 1, "questions_per_step": 2},
    )
    items = session.train[:2]
    traces, _ = sample(session, items, mx.random.key(0))
    lengths = sorted(len(t.tokens) for g in traces for t in g)
    assert len(set(lengths)) > 4, lengths
    for group, item in zip(traces, items):
        for t in group:
            prompt, think = t.states
            assert len(prompt) == len(item.prompt) and len(think) == len(t.tokens)
    _check_equal(session, items, traces)


def test_no_states_without_a_shared_prompt_or_with_a_text_marker(tmp_path, tiny_model_dir):
    off = _session(tmp_path, tiny_model_dir, train={"steps": 1, "shared_prompt": False})
    assert off.reuse_below == 0
    text = _session(
        tmp_path,
        tiny_model_dir,
        rollout={"samples": 2, "max_think_tokens": 8, "marker": "\nAnswer:"},
    )
    assert text.reuse_below == 0
    traces, _ = sample(text, text.train[:2], mx.random.key(0))
    assert all(t.states is None for g in traces for t in g)
    # sample_traces itself keeps nothing for a text marker, even when asked to.
    model, prompts = text.loaded.model, [it.prompt for it in text.train[:2]]
    asked, _ = sample_traces(
        model, prompts, text.recipe.rollout, text.vocab, mx.random.key(0), None, 2
    )
    assert all(t.states is None for g in asked for t in g)
    batch = build_batches(text, text.train[:2], traces)[0]
    assert batch.prompt_replay is None


def test_a_capture_that_went_wrong_keeps_nothing() -> None:
    """Blocks that did not all add keys, or a row whose tokens were not all fed: ``problem``
    says why, and no states come out (the update then runs every block)."""
    kv = (mx.zeros((2, 1, 3, 4)), mx.zeros((2, 1, 3, 4)))
    capture = reuse.Capture(first=2)
    capture._pending = [kv]  # one of the two blocks below
    capture._close(mx.zeros((2, 3, 8)))
    assert capture.problem and not capture.calls
    capture = reuse.Capture(first=1)
    for width in (3, 1):  # the prefill, then one decode call
        capture._pending = [(mx.zeros((2, 1, width, 4)), mx.zeros((2, 1, width, 4)))]
        capture._close(mx.zeros((2, width, 8)))
        capture.rows.append([0, 1])
    assert capture.problem is None
    assert [len(s) for s in capture.rows_states([1, 0])] == [1, 0]
    assert capture.rows_states([2, 1]) == [] and "1 of its 2 tokens" in capture.problem


@pytest.mark.real
def test_smollm2_kept_states_give_the_same_loss(tmp_path):
    from nrt_mlx.export.default_model import default_model_dir

    session = _session(
        tmp_path,
        default_model_dir(),
        lora={"layers": 8, "rank": 4},
        rollout={"samples": 2, "max_think_tokens": 6},
        train={"steps": 1, "questions_per_step": 2},
        data={"max_prompt_tokens": 128, "max_answer_tokens": 64},
    )
    assert session.reuse_below == len(session.loaded.model.layers) - 8
    items = session.train[:2]
    traces, _ = sample(session, items, mx.random.key(0))
    _check_equal(session, items, traces)
