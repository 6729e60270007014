"""The NRT loss on the tiny model against independently written expressions.

The references run one unpadded forward pass per row and take log-probs from
``mlx.nn.losses.cross_entropy``; rewards and normalisation are recomputed in float64 numpy.
"""

from __future__ import annotations

import dataclasses
import math

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nrt_mlx.errors import NrtError
from nrt_mlx.loss import Rewards, nrt_loss, score_batch, sft_loss, token_logprobs
from nrt_mlx.recipe import ObjectiveConfig
from nrt_mlx.sequences import (
    ANSWER,
    MARKER,
    THINK,
    Row,
    build_rows,
    collate,
    encode_answer,
    encode_prompt,
    resolve_marker,
    sft_rows,
)

NORM = 37.0
NO_SIGNAL = np.zeros((8, 64))  # the reference slices each row's answer length out of it


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    model.eval()
    return model, tok


def _rows(tok) -> list[Row]:
    """Two questions of K = 3 traces (one empty, one that did not emit the marker) + null rows."""
    rng = np.random.default_rng(0)
    marker = resolve_marker(tok)
    questions = [
        ("What is the capital of France?", " Paris is the capital"),
        ("two plus two", " four"),
    ]
    lengths = [(6, 0, 9), (4, 7, 2)]
    rows = []
    for q, ((question, answer), lens) in enumerate(zip(questions, lengths)):
        traces = [rng.integers(6, 400, n).tolist() for n in lens]
        rows += build_rows(
            encode_prompt(tok, [{"role": "user", "content": question}]),
            traces,
            marker,
            encode_answer(tok, answer),
            q,
            [True, False, True],
            256,
        )
    return rows


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------


def _row_logprobs(model, row: Row) -> mx.array:
    """log p(tokens[j] | tokens[<j]) for j = 1..n-1 of one unpadded row."""
    logits = model(mx.array(row.tokens[:-1])[None])[0]
    return -nn.losses.cross_entropy(logits, mx.array(row.tokens[1:]), reduction="none")


def _where(row: Row, *segs: int) -> np.ndarray:
    """Indices into _row_logprobs (shifted by one) of the tokens of the given segments."""
    return np.flatnonzero(np.isin(np.array(row.segments[1:]), segs))


def _pick(lp: mx.array, idx: np.ndarray) -> mx.array:
    return lp[mx.array(idx)] if idx.size else mx.zeros((0,))


def _reference_loss(model, rows, adv, signal, cfg, weights=None) -> mx.array:
    """mean over training rows of (c_trace L_trace + c_token L_token + c_format L_format) / N."""
    total, n = mx.array(0.0), 0
    for b, row in enumerate(rows):
        if row.is_null:
            continue
        n += 1
        lp = _row_logprobs(model, row)
        trace = _pick(lp, _where(row, THINK, MARKER))
        if weights is not None:
            trace = trace * mx.array(weights[b])
        answer = _pick(lp, _where(row, ANSWER))
        total = total - cfg.trace_coef * float(adv[b]) * trace.sum()
        total = total - cfg.token_coef * (mx.array(signal[b][: answer.shape[0]]) * answer).sum()
        if not row.emitted_marker:
            total = total - cfg.format_coef * _pick(lp, _where(row, MARKER)).sum()
    return total / n / NORM


def _aggregate64(mode: str, lc: np.ndarray, lb: np.ndarray):
    c, b, t = np.exp(lc), np.exp(lb), len(lc)
    table = {
        "log_prob": (lc.sum(), np.ones(t)),
        "prob": (np.prod(c), np.full(t, np.prod(c))),
        "geometric_mean": (np.prod(c) ** (1 / t), np.full(t, np.prod(c) ** (1 / t) / t)),
        "arithmetic_mean": (c.mean(), c / t),
        "weighted_sum_inverse_prob": ((c / b).mean(), c / b / t),
        "weighted_sum_log_prob": ((c * -np.log(b)).mean(), c * -np.log(b) / t),
    }
    return table[mode]


def _normalise64(values: np.ndarray, keep: np.ndarray, scale: bool) -> np.ndarray:
    """Group normalisation of the entries where keep is True (one question)."""
    out = np.zeros_like(values)
    vals = values[keep]
    if vals.size > 1 and vals.std() > 0:
        out[keep] = (vals - vals.mean()) / (vals.std(ddof=1) if scale else 1.0)
    return out


def _reference_rewards(model, rows, cfg):
    """Raw rewards [B], advantages [B] and token signals [B, T] in float64 numpy."""
    answers = [
        np.array(_pick(_row_logprobs(model, r), _where(r, ANSWER)), dtype=np.float64) for r in rows
    ]
    null_of = {r.question: i for i, r in enumerate(rows) if r.is_null}
    t = max(len(a) for a in answers)
    raw, sig = np.zeros(len(rows)), np.zeros((len(rows), t))
    for i, r in enumerate(rows):
        raw[i], s = _aggregate64(cfg.aggregator, answers[i], answers[null_of[r.question]])
        sig[i, : len(s)] = s
    used = raw.copy()
    if cfg.clip_to_null:
        used = np.array([max(0.0, raw[i] - raw[null_of[r.question]]) for i, r in enumerate(rows)])
    adv, signal = np.zeros(len(rows)), np.zeros_like(sig)
    for q in null_of:
        members = np.array([r.question == q and not r.is_null for r in rows])
        adv += _normalise64(used, members, cfg.scale_by_std)
        if cfg.fixed_token_reward:
            signal[members] = 1.0
        else:
            keep = members[:, None] & (
                np.arange(t)[None, :] < np.array([len(a) for a in answers])[:, None]
            )
            signal += _normalise64(sig, keep, cfg.scale_by_std)
    return raw, adv, signal, answers


def _grads(model, fn) -> dict[str, np.ndarray]:
    _, grads = nn.value_and_grad(model, fn)()
    return {k: np.array(v) for k, v in tree_flatten(grads)}


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    scale = max(np.abs(v).max() for v in want.values())
    assert scale > 1e-6  # the comparison is not between two zero gradients
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_token_logprobs_matches_log_softmax() -> None:
    x = np.random.default_rng(0).normal(0, 5, (2, 3, 11)).astype(np.float32)
    targets = np.array([[0, 4, 10], [3, 3, 7]])
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    want = np.take_along_axis(x64, targets[..., None], -1)[..., 0] - lse
    logits = mx.array(x)
    got = np.array(token_logprobs(logits, mx.array(targets)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    half = token_logprobs(logits.astype(mx.float16), mx.array(targets))
    assert half.dtype == mx.float32


def test_trace_gradient_is_reinforce(loaded) -> None:
    """Fixed A: grad L_trace = -(1/K') sum_k A_k grad log p(z_k, m | x) / N."""
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, tok.pad_token_id)
    adv = np.array([0.7, -1.3, 0.4, 0.0, 1.1, -0.2, -0.9, 0.0])
    fixed = Rewards(
        mx.zeros((8,)), mx.array(adv, dtype=mx.float32), mx.zeros(batch.answer_mask.shape)
    )
    cfg = ObjectiveConfig(trace_coef=1.0, token_coef=0.0, format_coef=0.0)
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM, rewards=fixed)[0])
    want = _grads(model, lambda: _reference_loss(model, rows, adv, NO_SIGNAL, cfg))
    _assert_grads_close(got, want)


def test_token_gradient_is_signal_weighted_cross_entropy(loaded) -> None:
    """Fixed s: grad L_token = -(1/K') sum_k sum_i s_ki grad log p(y*_i | x, z_k, m, y*_<i) / N."""
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, tok.pad_token_id)
    signal = np.random.default_rng(3).normal(0, 1, (8, int(batch.answer_mask.shape[1])))
    signal *= np.array(batch.answer_mask) * ~np.array(batch.is_null)[:, None]
    fixed = Rewards(mx.zeros((8,)), mx.zeros((8,)), mx.array(signal, dtype=mx.float32))
    cfg = ObjectiveConfig(trace_coef=0.0, token_coef=1.0, format_coef=0.0)
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM, rewards=fixed)[0])
    want = _grads(model, lambda: _reference_loss(model, rows, np.zeros(8), signal, cfg))
    _assert_grads_close(got, want)


CONFIGS = [
    ObjectiveConfig(),  # the released recipe: weighted_sum_log_prob, fixed token reward
    ObjectiveConfig(aggregator="geometric_mean", fixed_token_reward=False),
    ObjectiveConfig(
        aggregator="weighted_sum_inverse_prob", fixed_token_reward=False, clip_to_null=True
    ),
    ObjectiveConfig(aggregator="arithmetic_mean", fixed_token_reward=False),
    ObjectiveConfig(
        aggregator="log_prob", trace_coef=0.5, token_coef=2.0, format_coef=1.0, scale_by_std=False
    ),
    ObjectiveConfig(aggregator="prob", fixed_token_reward=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.aggregator)
def test_full_loss_value_and_gradient(loaded, cfg: ObjectiveConfig) -> None:
    """Rewards from the same forward pass, under stop_gradient, as a separate computation gives."""
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, tok.pad_token_id)
    raw, adv, signal, _ = _reference_rewards(model, rows, cfg)
    assert np.abs(adv).max() > 0.1  # the trace term is really exercised
    loss, metrics = nrt_loss(model, batch, cfg, NORM)
    want = _reference_loss(model, rows, adv, signal, cfg)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    np.testing.assert_allclose(np.array(metrics["trace_reward"]), raw, rtol=1e-4)
    np.testing.assert_allclose(np.array(metrics["advantage"]), adv, rtol=1e-3, atol=1e-4)
    # Rewards are constants for the gradient: the reference uses them as numbers.
    got = _grads(model, lambda: nrt_loss(model, batch, cfg, NORM)[0])
    ref = _grads(model, lambda: _reference_loss(model, rows, adv, signal, cfg))
    _assert_grads_close(got, ref)


def test_metrics(loaded) -> None:
    model, tok = loaded
    rows = _rows(tok)
    cfg = ObjectiveConfig()
    loss, m = nrt_loss(model, collate(rows, tok.pad_token_id), cfg, NORM)
    raw, _, _, answers = _reference_rewards(model, rows, cfg)
    train = [i for i, r in enumerate(rows) if not r.is_null]
    null = [i for i, r in enumerate(rows) if r.is_null]
    nll = np.array([-a.mean() for a in answers])
    expect = {
        "reward_mean": raw[train].mean(),
        "reward_std": raw[train].std(),
        "answer_nll": nll[train].mean(),
        "null_answer_nll": nll[null].mean(),
        "trace_tokens": np.mean([sum(s == THINK for s in rows[i].segments) for i in train]),
        "marker_rate": 4 / 6,
    }
    for key, value in expect.items():
        np.testing.assert_allclose(float(m[key]), value, rtol=1e-4, err_msg=key)
    total = (
        cfg.trace_coef * m["trace_loss"]
        + cfg.token_coef * m["token_loss"]
        + cfg.format_coef * m["format_loss"]
    )
    np.testing.assert_allclose(float(m["loss"]), float(total), rtol=1e-5)
    assert float(m["loss"]) == pytest.approx(float(loss)) and float(m["format_loss"]) > 0
    # Entropy of the next-token distribution at every position that predicts a think token.
    ents = []
    for i in train:
        logits = np.array(model(mx.array(rows[i].tokens[:-1])[None])[0], dtype=np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ents += list(-(p * np.log(p)).sum(-1)[_where(rows[i], THINK)])
    np.testing.assert_allclose(float(m["trace_entropy"]), np.mean(ents), rtol=1e-4)
    assert m["ratio_masked"].item() == 0.0


def test_score_batch(loaded) -> None:
    """Rewards and [B, L] token log-probs for several updates per rollout, without gradient."""
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, tok.pad_token_id)
    cfg = ObjectiveConfig()
    rewards, lp = score_batch(model, batch, cfg)
    _, adv, _, _ = _reference_rewards(model, rows, cfg)
    np.testing.assert_allclose(np.array(rewards.advantage), adv, rtol=1e-3, atol=1e-4)
    train = ~np.array(batch.is_null)
    np.testing.assert_array_equal(
        np.array(rewards.token_signal), np.array(batch.answer_mask) * train[:, None]
    )
    for b, row in enumerate(rows):
        want = np.array(_row_logprobs(model, row))
        np.testing.assert_allclose(np.array(lp)[b, 1 : len(row.tokens)], want, rtol=1e-4, atol=1e-5)
        assert np.array(lp)[b, 0] == 0


def test_padding_changes_nothing(loaded) -> None:
    model, tok = loaded
    rows = _rows(tok)
    cfg = ObjectiveConfig(aggregator="weighted_sum_inverse_prob", fixed_token_reward=False)
    tight = collate(rows, tok.pad_token_id)
    loose = collate(rows, 7, length=int(tight.tokens.shape[1]) + 13)
    (l1, m1), (l2, m2) = nrt_loss(model, tight, cfg, NORM), nrt_loss(model, loose, cfg, NORM)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    for key in m1:
        np.testing.assert_allclose(
            np.array(m1[key]), np.array(m2[key]), rtol=1e-4, atol=1e-6, err_msg=key
        )
    g1 = _grads(model, lambda: nrt_loss(model, tight, cfg, NORM)[0])
    g2 = _grads(model, lambda: nrt_loss(model, loose, cfg, NORM)[0])
    _assert_grads_close(g2, g1)


def test_row_order_and_batch_composition(loaded) -> None:
    """A question's loss does not depend on the other question sharing its batch (micro-batching)."""
    model, tok = loaded
    rows = _rows(tok)
    cfg = ObjectiveConfig(aggregator="weighted_sum_log_prob", fixed_token_reward=False)
    both = float(nrt_loss(model, collate(rows, 0), cfg, NORM)[0])
    first = float(nrt_loss(model, collate(rows[:4], 0), cfg, NORM)[0])
    second = float(nrt_loss(model, collate(rows[4:], 0), cfg, NORM)[0])
    np.testing.assert_allclose(both, (first + second) / 2, rtol=1e-4)


def _old_batch(batch, lp, shift: float):
    """old log-probs = current ones + shift on trace tokens (ratio p/p_old = exp(-shift))."""
    segs = np.array(batch.segments)
    trace = mx.array((segs == THINK) | (segs == MARKER))
    return dataclasses.replace(batch, old_logprobs=lp + shift * trace)


@pytest.mark.parametrize(
    "shift, kept, rho", [(-math.log(2), "neg", 1.28), (math.log(2), "pos", 0.8)]
)
def test_clipped_ratio_and_masking(loaded, shift: float, kept: str, rho: float) -> None:
    """ratio 2: A > 0 masked, A < 0 weighted 1.28; ratio 0.5: A < 0 masked, A > 0 weighted 0.8."""
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, tok.pad_token_id)
    cfg = ObjectiveConfig(trace_coef=1.0, token_coef=0.0, format_coef=0.0)
    rewards, lp = score_batch(model, batch, cfg)
    adv = np.array(rewards.advantage)
    same = _old_batch(batch, lp, 0.0)
    np.testing.assert_allclose(
        float(nrt_loss(model, same, cfg, NORM, rewards)[0]),
        float(nrt_loss(model, batch, cfg, NORM)[0]),
        rtol=1e-5,
    )
    shifted = _old_batch(batch, lp, shift)
    keep = adv < 0 if kept == "neg" else adv > 0
    weights = [
        np.full(len(_where(r, THINK, MARKER)), rho if keep[b] else 0.0) for b, r in enumerate(rows)
    ]
    loss, m = nrt_loss(model, shifted, cfg, NORM, rewards)
    want = _reference_loss(model, rows, adv, NO_SIGNAL, cfg, weights)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-4)
    n_trace = [len(w) for w in weights]
    train = [not r.is_null for r in rows]
    masked = sum(n for b, n in enumerate(n_trace) if train[b] and not keep[b]) / sum(
        np.array(n_trace)[train]
    )
    np.testing.assert_allclose(float(m["ratio_masked"]), masked, rtol=1e-5)
    _assert_grads_close(
        _grads(model, lambda: nrt_loss(model, shifted, cfg, NORM, rewards)[0]),
        _grads(model, lambda: _reference_loss(model, rows, adv, NO_SIGNAL, cfg, weights)),
    )


def test_sft_loss(loaded) -> None:
    model, tok = loaded
    prompt = encode_prompt(tok, "two plus two")
    rows = sft_rows(prompt, encode_answer(tok, " four"), 0, 64)
    rows += sft_rows(prompt[:-2], encode_answer(tok, " Paris is the capital of France"), 1, 64)
    batch = collate(rows, tok.pad_token_id)
    per_token = [-np.array(_pick(_row_logprobs(model, r), _where(r, ANSWER))) for r in rows]
    loss, m = sft_loss(model, batch)
    np.testing.assert_allclose(float(loss), np.mean([x.mean() for x in per_token]), rtol=1e-5)
    np.testing.assert_allclose(float(m["answer_nll"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(
        float(sft_loss(model, batch, 10.0)[0]),
        np.mean([x.sum() / 10 for x in per_token]),
        rtol=1e-5,
    )
    padded = collate(rows, 5, length=40)
    np.testing.assert_allclose(float(sft_loss(model, padded)[0]), float(loss), rtol=1e-5)


def test_bad_inputs(loaded) -> None:
    model, tok = loaded
    rows = _rows(tok)
    batch = collate(rows, 0)
    with pytest.raises(NrtError, match="normalizer must be > 0"):
        nrt_loss(model, batch, ObjectiveConfig(), 0)
    with pytest.raises(NrtError, match="unknown aggregator 'nope'"):
        nrt_loss(model, batch, ObjectiveConfig(aggregator="nope"), NORM)
    with pytest.raises(NrtError, match="question 0 has no null-think row"):
        nrt_loss(model, collate(rows[:3], 0), ObjectiveConfig(), NORM)
    wrong = Rewards(mx.zeros((8,)), mx.zeros((8,)), mx.zeros((8, 2)))
    with pytest.raises(NrtError, match=r"token_signal \(8, 2\), expected \(8,\) and \(8, 6\)"):
        nrt_loss(model, batch, ObjectiveConfig(), NORM, rewards=wrong)
    with pytest.raises(NrtError, match="no training rows"):
        nrt_loss(model, collate([rows[3]], 0), ObjectiveConfig(), NORM)
