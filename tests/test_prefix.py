"""Shared-prompt training: the same loss and gradients as running every row in full.

Each test builds one batch twice from the same rows (``collate`` with and without
``share_prompt``) and compares the NRT loss, its figures and the gradients of every trainable
parameter (LoRA and the trainable marker rows), on the tiny model and on SmolLM2-135M.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from nrt_mlx import marker, prefix
from nrt_mlx.batch import build_rows, collate, split_passes
from nrt_mlx.model import add_adapters
from nrt_mlx.objective import forward, nrt_loss, reference_pass
from nrt_mlx.recipe import LoraConfig, ObjectiveConfig
from nrt_mlx.rollout import Trace
from nrt_mlx.vocab import Vocabulary

QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("two plus two", "four"),
    ("Name a river, and explain why you chose it in one short sentence please.", "the Seine"),
]
THINK = [(6, 0, 9, 31), (4, 7, 2, 1), (12, 3, 25, 8)]  # K = 4 traces of very different lengths


def _prepare(model_dir: Path, checkpoint: bool = False) -> tuple[nn.Module, Vocabulary]:
    model, tok = mlx_lm.load(str(model_dir))
    if checkpoint:
        prefix.grad_checkpoint(model.layers)
    add_adapters(model, LoraConfig(layers=2, rank=4, dropout=0.0), 0)
    vocab = Vocabulary.of(tok, "auto")
    assert marker.setup(model, vocab, "eos")
    # LoRA B starts at 0: move every trainable weight so that every gradient path is exercised.
    rng = np.random.default_rng(1)
    model.update(
        tree_map(
            lambda p: p + mx.array(rng.normal(0, 0.02, p.shape).astype(np.float32)),
            model.trainable_parameters(),
        )
    )
    model.train()
    return model, vocab


def _rows(vocab: Vocabulary, questions: int = 3, k: int = 4) -> list:
    rng = np.random.default_rng(0)
    rows = []
    for q, ((question, answer), lengths) in enumerate(zip(QUESTIONS[:questions], THINK)):
        lengths = lengths[:k]
        traces = [
            Trace(rng.integers(20, 400, n).tolist(), bool(i % 2)) for i, n in enumerate(lengths)
        ]
        prompt = vocab.encode_prompt([{"role": "user", "content": question}])
        rows += build_rows(prompt, traces, vocab.marker.ids, vocab.encode_answer(answer), q + 5)
    return rows


def _grads(model: nn.Module, batch, cfg, temperature=1.0, fixed=None) -> tuple[float, dict, dict]:
    def loss(m):
        return nrt_loss(m, batch, cfg, 3.0, fixed, temperature)

    (value, figures), grads = nn.value_and_grad(model, loss)(model)
    flat = {k: np.array(v) for k, v in tree_flatten(grads)}
    return float(value), {k: np.array(v) for k, v in figures.items()}, flat


def _assert_same(full: tuple, shared: tuple) -> None:
    (l1, f1, g1), (l2, f2, g2) = full, shared
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    for key in ("trace_reward", "answer_nll", "think_entropy"):
        np.testing.assert_allclose(f2[key], f1[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert g1.keys() == g2.keys() and any("marker" in k for k in g1)
    scale = max(np.abs(v).max() for v in g1.values())
    assert scale > 1e-6
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[nn.Module, Vocabulary]:
    return _prepare(tiny_model_dir)


def test_layout_runs_each_prompt_once(tiny) -> None:
    model, vocab = tiny
    rows = _rows(vocab)
    full, shared = collate(rows, vocab.pad_id), collate(rows, vocab.pad_id, share_prompt=True)
    assert full.prompts is None and shared.prompts.shape[0] == len(QUESTIONS)
    prompts = [len(vocab.encode_prompt([{"role": "user", "content": q}])) for q, _ in QUESTIONS]
    k1 = len(THINK[0]) + 1
    assert full.num_tokens == sum(len(r.tokens) for r in rows)
    assert shared.num_tokens == full.num_tokens - sum(p * k1 - (p - 1) for p in prompts)
    assert shared.num_tokens < 0.75 * full.num_tokens
    # The null-think rows form one pass without gradient, padded only to their own length.
    null = [p for p in shared.passes if not p.grad]
    assert len(null) == 1 and null[0].answer is None
    assert null[0].think.shape[1] < shared.tokens.shape[1]
    # Trace rows: the answer part starts at the marker, whose input row needs the deep backward.
    for p in (p for p in shared.passes if p.grad):
        assert (np.array(p.answer[:, 0]) == vocab.marker.ids[0]).all()
    assert sorted(np.concatenate([np.array(p.rows) for p in shared.passes]).tolist()) == list(
        range(len(rows))
    )
    # The per-row arrays stay in row order: the same figures come out for the same rows.
    lp_full, _ = forward(model, full)
    lp_shared, _ = forward(model, shared)
    for b, row in enumerate(rows):
        cut = len(row.tokens) - int((np.array(shared.segments[b]) >= 0).sum())
        got = np.array(lp_shared[b, : len(row.tokens) - cut])
        np.testing.assert_allclose(
            got, np.array(lp_full[b, cut : len(row.tokens)]), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize(
    "cfg",
    [ObjectiveConfig(), ObjectiveConfig(aggregator="log_prob", clip_to_null=True, format_coef=1.0)],
    ids=["default", "log_prob_clipped"],
)
def test_loss_and_gradients_equal_full_rows(tiny, cfg: ObjectiveConfig) -> None:
    model, vocab = tiny
    rows = _rows(vocab)
    full = _grads(model, collate(rows, vocab.pad_id), cfg)
    shared = _grads(model, collate(rows, vocab.pad_id, share_prompt=True), cfg)
    assert np.abs(full[1]["trace_reward"]).max() > 0
    _assert_same(full, shared)


def test_clipped_ratio_and_temperature(tiny) -> None:
    """Several updates per rollout: fixed rewards and old log-probs from ``reference_pass``."""
    model, vocab = tiny
    rows = _rows(vocab)
    cfg = ObjectiveConfig(clip_ratio_low=0.01, clip_ratio_high=0.01)
    out = []
    for share in (False, True):
        batch = collate(rows, vocab.pad_id, share_prompt=share)
        rewards, lp = reference_pass(model, batch, cfg, 0.7)
        # Old log-probs a little off (by token id, the same in both layouts): the ratio clips.
        old = lp + 0.05 * ((batch.tokens % 3) - 1).astype(mx.float32)
        batch = dataclasses.replace(batch, old_logprobs=old)
        out.append(_grads(model, batch, cfg, 0.7, rewards))
    assert 0 < out[0][1]["clipped_tokens"] == out[1][1]["clipped_tokens"]
    _assert_same(*out)


def test_gradient_checkpointing_keeps_the_prompts_gradient(tiny_model_dir: Path, tiny) -> None:
    """mx.checkpoint sees only its inputs: the prompt's keys and values are passed explicitly."""
    plain, vocab = tiny
    model, _ = _prepare(tiny_model_dir, checkpoint=True)
    rows = _rows(vocab)
    want = _grads(plain, collate(rows, vocab.pad_id), ObjectiveConfig())
    for share in (False, True):
        got = _grads(model, collate(rows, vocab.pad_id, share_prompt=share), ObjectiveConfig())
        _assert_same(want, got)
    # Only the layers of the model that asked for it are checkpointed, not their whole class.
    other, _ = mlx_lm.load(str(tiny_model_dir))
    assert not getattr(other.layers[0], "_nrt_checkpoint", False)


def test_split_passes() -> None:
    assert split_passes([]) == []
    assert split_passes([5, 5, 5]) == [[0, 1, 2]]  # equal lengths: one pass
    groups = split_passes([10, 200, 12, 190, 11, 205])
    assert groups == [[5, 1, 3], [2, 4, 0]]  # longest first, each padded to its own longest
    lengths = np.random.default_rng(0).integers(1, 300, 40).tolist()
    groups = split_passes(lengths)
    assert sorted(sum(groups, [])) == list(range(40)) and len(groups) <= 4
    padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    assert padded < 0.8 * 40 * max(lengths)


def _gpt2(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A tiny GPT-2 (learned absolute position embeddings) with the tiny model's tokenizer."""
    config = {
        "model_type": "gpt2",
        "n_ctx": 128,
        "n_embd": 32,
        "n_head": 2,
        "n_layer": 2,
        "n_positions": 128,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_model_dir / name).read_text())
    from mlx_lm.utils import load_model

    model, _ = load_model(tmp_path, strict=False)
    weights = tree_map(
        lambda p: mx.random.normal(p.shape, key=mx.random.key(0)) * 0.5, model.parameters()
    )
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(weights)))
    return tmp_path


def _sliding(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """The tiny Llama with sliding-window attention in its first layer (mlx-lm's layer_types)."""
    out = tmp_path / "sliding"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["layer_types"] = ["sliding_attention"] + ["full_attention"] * (layers - 1)
    config["sliding_window"] = 8
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_probe_passes_a_model_with_absolute_positions(tmp_path: Path, tiny_model_dir, tiny) -> None:
    """GPT-2 adds learned position embeddings at the cache's offset: the passes count each row's
    positions from its first real token (a left-padded prompt starts below 0), so they are those
    of the full rows and the probe finds the same log-probs, as it does for the tiny Llama."""
    from nrt_mlx.session import shared_prompt_problem

    assert shared_prompt_problem(*tiny) is None
    model, tok = mlx_lm.load(str(_gpt2(tmp_path, tiny_model_dir)))
    assert shared_prompt_problem(model, Vocabulary.of(tok, "auto")) is None


def test_training_uses_the_layout_and_old_runs_keep_full_rows(
    tmp_path: Path, tiny_model_dir, capsys
) -> None:
    from helpers import tiny_recipe

    from nrt_mlx.recipe import load_recipe, recipe_from_dict, save_recipe
    from nrt_mlx.session import prepare
    from nrt_mlx.step import build_batches, sample

    recipe = recipe_from_dict(tiny_recipe(tmp_path, tiny_model_dir))
    session = prepare(recipe)
    assert session.shared_prompt
    items = session.train[:2]
    traces, _ = sample(session, items, mx.random.key(0))
    batch = build_batches(session, items, traces)[0]
    assert batch.prompts is not None and batch.prompts.shape[0] == 2
    # A run saved before train.shared_prompt existed resumes with full rows.
    path = tmp_path / "old.yaml"
    save_recipe(recipe, path)
    text = "\n".join(line for line in path.read_text().splitlines() if "shared_prompt" not in line)
    path.write_text(text)
    assert not load_recipe(path, saved_run=True).train.shared_prompt
    # A model the probe refuses (sliding-window layers keep only recent keys) trains on full
    # rows, with a warning.
    sliding = _sliding(tmp_path, tiny_model_dir)
    other = recipe_from_dict(tiny_recipe(tmp_path, sliding, name="slidingrun"))
    capsys.readouterr()
    assert not prepare(other).shared_prompt
    assert "train.shared_prompt is off for this model" in capsys.readouterr().err


@pytest.mark.real
def test_smollm2_loss_and_gradients_equal_full_rows() -> None:
    from nrt_mlx.export.default_model import default_model_dir
    from nrt_mlx.session import shared_prompt_problem

    model, vocab = _prepare(default_model_dir())
    assert shared_prompt_problem(model, vocab) is None
    rows = _rows(vocab, questions=2, k=2)  # prompts of different lengths, K = 2 and the null row
    full = _grads(model, collate(rows, vocab.pad_id), ObjectiveConfig())
    shared = _grads(model, collate(rows, vocab.pad_id, share_prompt=True), ObjectiveConfig())
    _assert_same(full, shared)
