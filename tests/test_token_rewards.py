"""nrt-mlx score (nrt_mlx.analysis.token_rewards): c_i, b_i, weights and every aggregator's reward
equal nrt_mlx.objective.aggregate on the same inputs."""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from typer.testing import CliRunner

from nrt_mlx.analysis.token_rewards import token_rewards
from nrt_mlx.cli import app
from nrt_mlx.objective import AGGREGATORS, aggregate
from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.vocab import Vocabulary

QUESTION = "What is the capital of France?"
ANSWER = "Paris is the capital"
TRACES = ["the capital of France is Paris so", "think: one two three"]


@pytest.fixture(scope="module")
def model_and_vocab(tiny_model_dir):
    model, tok = mlx_lm.load(str(tiny_model_dir))
    return model, Vocabulary.of(tok, "auto")


def answer_logprobs(model, context: list[int], answer: list[int]) -> np.ndarray:
    """log p(answer_i | context, answer_<i) from one plain forward pass."""
    ids = context + answer
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    start = len(context)
    return np.array([lp[start + i - 1, answer[i]] for i in range(len(answer))])


def test_given_traces_match_the_objective(model_and_vocab):
    model, vocab = model_and_vocab
    tok = vocab.tokenizer
    report = token_rewards(model, vocab, QUESTION, ANSWER, traces=TRACES)
    marker = vocab.marker
    prompt, answer = vocab.encode_prompt(QUESTION), vocab.encode_answer(ANSWER)
    null = answer_logprobs(model, prompt + marker.ids, answer)
    traces = [
        answer_logprobs(
            model, prompt + tok.encode(t, add_special_tokens=False) + marker.ids, answer
        )
        for t in TRACES
    ]
    assert report.token_ids == answer and len(report.tokens) == len(answer)
    assert report.marker == marker.text and report.traces == TRACES
    assert report.emitted_marker == [True, True]  # a given trace is taken as followed by the marker
    np.testing.assert_allclose(report.null_logprobs, null, atol=1e-4)
    np.testing.assert_allclose(report.trace_logprobs, traces, atol=1e-4)
    lp = mx.array(np.stack(traces).astype(np.float32))
    b = mx.array(np.stack([null, null]).astype(np.float32))
    mask = mx.ones(lp.shape)
    assert set(report.rewards) == set(AGGREGATORS)
    for name in AGGREGATORS:
        expected, _ = aggregate(name, lp, mask, b)
        np.testing.assert_allclose(report.rewards[name], np.array(expected), rtol=1e-4)
        own, _ = aggregate(name, b[:1], mask[:1], b[:1])
        assert report.null_rewards[name] == pytest.approx(float(own[0]), rel=1e-4)
    data = report.to_dict()
    np.testing.assert_allclose(data["b"], np.exp(null), rtol=1e-4)
    np.testing.assert_allclose(data["weight_inverse_prob"], np.exp(-null), rtol=1e-4)
    np.testing.assert_allclose(data["weight_neg_log_prob"], -null, rtol=1e-4)
    # A trace of nothing is the null row: c = b, and weighted_sum_inverse_prob = mean(b/b) = 1.
    empty = token_rewards(model, vocab, QUESTION, ANSWER, traces=[""])
    np.testing.assert_allclose(empty.trace_logprobs[0], empty.null_logprobs, atol=1e-5)
    assert empty.rewards["weighted_sum_inverse_prob"][0] == pytest.approx(1.0, rel=1e-5)


def test_long_traces_are_scored_like_short_ones(model_and_vocab):
    model, vocab = model_and_vocab
    long = " ".join(["the capital of France is Paris"] * 130)
    report = token_rewards(model, vocab, QUESTION, ANSWER, traces=[long, long])
    prompt, answer = vocab.encode_prompt(QUESTION), vocab.encode_answer(ANSWER)
    expected = answer_logprobs(model, prompt + vocab.encode_text(long) + vocab.marker.ids, answer)
    np.testing.assert_allclose(report.trace_logprobs, [expected, expected], atol=1e-4)


def test_sampled_traces_are_seeded(model_and_vocab):
    model, vocab = model_and_vocab
    rollout = RolloutConfig(samples=3, max_think_tokens=8)
    a = token_rewards(model, vocab, QUESTION, ANSWER, rollout=rollout, seed=0)
    b = token_rewards(model, vocab, QUESTION, ANSWER, rollout=rollout, seed=0)
    c = token_rewards(model, vocab, QUESTION, ANSWER, rollout=rollout, seed=5)
    assert len(a.traces) == 3 and a.rewards == b.rewards and a.traces == b.traces
    assert all(n <= 8 for n in a.trace_tokens) and len(a.trace_logprobs) == 3
    assert a.traces != c.traces and a.null_logprobs == c.null_logprobs
    table = a.table()
    assert "c_i z3" in table and "weighted_sum_log_prob" in table and "1/b_i" in table


def test_score_cli_json_table_and_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    base = ["score", "--model", str(tiny_model_dir), "--question", QUESTION, "--answer", ANSWER]
    result = runner.invoke(app, base + ["--trace", TRACES[0], "--trace", TRACES[1], "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["rewards"]) == set(AGGREGATORS) and len(data["c"]) == 2
    table = runner.invoke(app, base + ["--samples", "2", "--max-think", "4"])
    assert table.exit_code == 0 and "trace rewards" in table.stdout
    missing = runner.invoke(
        app, ["score", "--model", str(tmp_path / "nope"), "--question", "q", "--answer", "a"]
    )
    assert missing.exit_code == 2
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no such directory" in lines[0]
