"""Batched rationale sampling: stops, determinism, log-probabilities, shared prompt caches."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.rollout import sample_tokens, sample_traces


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


def full_logprobs(model, ids):
    logits = model(mx.array(ids)[None])[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def test_traces_match_the_model_and_are_deterministic(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok.encode("What is the capital of France? Think first."), tok.encode("one two")]
    cfg = RolloutConfig(samples=3, max_think_tokens=12, temperature=0.8, top_p=0.95)
    traces, stats = sample_traces(model, prompts, cfg, [4], {2}, mx.random.key(3))
    again, _ = sample_traces(model, prompts, cfg, [4], {2}, mx.random.key(3))
    other, _ = sample_traces(model, prompts, cfg, [4], {2}, mx.random.key(4))
    flat = [t.tokens for g in traces for t in g]
    assert flat == [t.tokens for g in again for t in g]
    assert flat != [t.tokens for g in other for t in g]
    assert len(traces) == 2 and all(len(g) == 3 for g in traces)
    assert len({tuple(t.tokens) for t in traces[0]}) > 1  # K samples differ
    # Throughput counts every generated token, the stop tokens (marker, EOS) included.
    stops = sum(t.emitted_marker or t.ended_eos for g in traces for t in g)
    assert stats.tokens == sum(len(t) for t in flat) + stops and stats.tokens_per_second > 0
    # The prompt is shared through a left-padded batched cache: every trace's log-probs must equal
    # a plain forward pass over its own prompt + trace.
    for prompt, group in zip(prompts, traces):
        for t in group:
            ref = full_logprobs(model, prompt + t.tokens)
            expected = [ref[len(prompt) - 1 + i, tok_id] for i, tok_id in enumerate(t.tokens)]
            np.testing.assert_allclose(t.logprobs, expected, atol=1e-4)


def test_stops_at_marker_eos_and_budget(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok.encode("Why is the sky blue?")
    greedy = int(np.argmax(full_logprobs(model, prompt)[-1]))
    nearly_greedy = RolloutConfig(samples=2, max_think_tokens=6, temperature=1e-4)
    # The marker is the token the model will certainly write first: it stops at once.
    traces, _ = sample_traces(model, [prompt], nearly_greedy, [greedy], {2}, mx.random.key(0))
    assert all(t.emitted_marker and t.tokens == [] for t in traces[0])
    # A two-token text marker: the greedy continuation's first two tokens.
    second = int(np.argmax(full_logprobs(model, prompt + [greedy])[-1]))
    traces, _ = sample_traces(
        model, [prompt], nearly_greedy, [greedy, second], {2}, mx.random.key(0)
    )
    assert all(t.emitted_marker and t.tokens == [] for t in traces[0])
    # The same token as EOS instead: ends by EOS, no marker.
    traces, _ = sample_traces(model, [prompt], nearly_greedy, [9999], {greedy}, mx.random.key(0))
    assert all(t.ended_eos and not t.emitted_marker and t.tokens == [] for t in traces[0])
    # Neither: the budget ends it.
    traces, _ = sample_traces(model, [prompt], nearly_greedy, [9999], {9998}, mx.random.key(0))
    assert all(len(t.tokens) == 6 and not t.emitted_marker and not t.ended_eos for t in traces[0])


def test_top_p_keeps_only_the_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for i in range(200):
        tok, lp = sample_tokens(logits, mx.random.key(i), 1.0, 0.7)
        seen.add(int(tok.item()))
        assert float(lp.item()) == pytest.approx(float(logits[0, int(tok.item())].item()), abs=1e-5)
    assert seen == {0, 1}
