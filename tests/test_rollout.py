"""Batched decoding: sampled traces (stops, determinism, the model's own distribution, shared
prompt caches), top-p, greedy answers against step-by-step argmax decoding, and the pipelined
decode loop against a plain copy of the unpipelined loop it replaced (same traces for the same key)."""

from dataclasses import replace

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from nrt_mlx import rollout
from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.rollout import MarkerWatch, greedy_answers, sample_tokens, sample_traces, sampler
from nrt_mlx.vocab import AnswerMarker, Vocabulary

MARKER, EOS = [4], {2}  # <|reserved_1|> and <|im_end|> of the tiny tokenizer


def V(tok, marker: list[int], eos: set[int], special: frozenset[int] = frozenset()) -> Vocabulary:
    """The tiny vocabulary with these marker ids (one id: a special-token marker, found by id;
    several: a text marker, found in the decoded text; ids outside the vocabulary: a marker that is
    never written) and these stop ids."""
    vocab = Vocabulary.of(tok)
    size = len(tok._tokenizer)
    text = tok.decode(marker) if all(i < size for i in marker) else "\x00never\x00"
    m = AnswerMarker(text, list(marker), is_special=len(marker) == 1 and marker[0] < size)
    return replace(vocab, marker=m, eos_ids=frozenset(eos), special_ids=special)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    return mlx_lm.load(str(tiny_model_dir))


def full_logprobs(model, ids):
    """log p(. | ids[:j+1]) at every position j, from one plain (unbatched, uncached) forward pass."""
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def nucleus(logprobs: np.ndarray, temperature: float, top_p: float) -> set[int]:
    """The tokens ``sample_tokens`` may draw: the smallest top-probability prefix of the tempered
    distribution whose mass reaches ``top_p`` (with a little slack for float rounding)."""
    scaled = logprobs / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    return {int(t) for t in order[before < top_p + 1e-4]}


def argmax_decode(model, context, eos, max_tokens, stop=None) -> list[int]:
    """Greedy decoding one token at a time, each from a plain forward pass over everything so far;
    ends after a token in ``eos`` (dropped), when the tokens end with ``stop`` (kept), or at
    ``max_tokens``."""
    out: list[int] = []
    while len(out) < max_tokens:
        nxt = int(np.argmax(full_logprobs(model, context + out)[-1]))
        if nxt in eos:
            break
        out.append(nxt)
        if stop and out[-len(stop) :] == stop:
            break
    return out


def ended_eos(trace, budget: int) -> bool:
    """A trace without the marker ended by EOS exactly when it is shorter than the think budget."""
    return not trace.emitted_marker and len(trace.tokens) < budget


def test_traces_are_deterministic_and_count_every_token(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [tok.encode("What is the capital of France? Think first."), tok.encode("one two")]
    cfg = RolloutConfig(samples=3, max_think_tokens=12, temperature=0.8, top_p=0.95)
    traces, stats = sample_traces(model, prompts, cfg, V(tok, MARKER, EOS), mx.random.key(3))
    again, _ = sample_traces(model, prompts, cfg, V(tok, MARKER, EOS), mx.random.key(3))
    other, _ = sample_traces(model, prompts, cfg, V(tok, MARKER, EOS), mx.random.key(4))
    flat = [t.tokens for g in traces for t in g]
    assert flat == [t.tokens for g in again for t in g]
    assert [t.emitted_marker for g in traces for t in g] == [
        t.emitted_marker for g in again for t in g
    ]
    assert flat != [t.tokens for g in other for t in g]
    assert len(traces) == 2 and all(len(g) == 3 for g in traces)
    assert len({tuple(t.tokens) for t in traces[0]}) > 1  # K samples differ
    for t in (t for g in traces for t in g):
        assert len(t.tokens) <= cfg.max_think_tokens
        assert MARKER[0] not in t.tokens and not EOS & set(t.tokens)  # stop tokens are dropped
    # Throughput counts every generated token, the stop tokens (marker, EOS) included.
    stops = sum(t.emitted_marker or ended_eos(t, 12) for g in traces for t in g)
    assert stats.tokens == sum(len(t) for t in flat) + stops and stats.tokens_per_second > 0


def test_every_sampled_token_is_in_the_models_nucleus(model_and_tokenizer):
    """Prompts of different lengths share one left-padded batched cache and finished rows leave
    the batch; every drawn token (stop tokens included) must still come from the top-p nucleus of
    the tempered distribution a plain forward pass over its own prompt + trace gives."""
    model, tok = model_and_tokenizer
    prompts = [
        tok.encode("What is the capital of France? Think first, then answer."),
        tok.encode("one two"),
        tok.encode("why is the sky blue"),
    ]
    cfg = RolloutConfig(samples=4, max_think_tokens=10, temperature=0.5, top_p=0.3)
    traces, _ = sample_traces(model, prompts, cfg, V(tok, MARKER, EOS), mx.random.key(7))
    sizes, drawn = [], 0
    for prompt, group in zip(prompts, traces):
        for t in group:
            stop = MARKER if t.emitted_marker else [2] if ended_eos(t, 10) else []
            ids = prompt + t.tokens + stop
            lp = full_logprobs(model, ids)
            for j in range(len(prompt), len(ids)):
                allowed = nucleus(lp[j - 1], cfg.temperature, cfg.top_p)
                assert ids[j] in allowed, (prompt, t, j)
                sizes.append(len(allowed))
                drawn += 1
    assert drawn > 40
    # The check has teeth: a token drawn from any other distribution would usually miss the nucleus.
    assert np.mean(sizes) < lp.shape[-1] / 4


def test_batched_traces_equal_greedy_decoding_one_prompt_at_a_time(model_and_tokenizer):
    """Sampling at a vanishing temperature is argmax decoding, whatever the key and the batch: the
    traces of several prompts sampled together through one batched cache equal plain step-by-step
    argmax decoding of each prompt on its own. (At a real temperature only the distribution is
    shared: the random draws depend on the batch shape.)"""
    model, tok = model_and_tokenizer
    prompts = [tok.encode("a longer question about the capital of France and Paris"), [7, 8]]
    budget = 9
    cold = RolloutConfig(samples=2, max_think_tokens=budget, temperature=1e-5)
    # A marker the first prompt's greedy continuation writes at its 4th token: that row finishes
    # early and leaves the batch while the others keep decoding.
    marker = [argmax_decode(model, prompts[0], set(), 4)[-1]]
    together, _ = sample_traces(model, prompts, cold, V(tok, marker, EOS), mx.random.key(0))
    for q, prompt in enumerate(prompts):
        alone, _ = sample_traces(model, [prompt], cold, V(tok, marker, EOS), mx.random.key(q + 1))
        ref = argmax_decode(model, prompt, EOS, budget, stop=marker)
        emitted = ref[-1:] == marker
        expected = ref[:-1] if emitted else ref
        for t in together[q] + alone[0]:
            assert t.tokens == expected and t.emitted_marker == emitted
    # The first prompt's rows left the batch early; the second prompt's rows decoded on without them.
    assert together[0][0].emitted_marker and len(together[0][0].tokens) < 4
    assert len(together[1][0].tokens) > len(together[0][0].tokens) + 1


def test_stops_at_marker_eos_and_budget(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = tok.encode("Why is the sky blue?")
    greedy = int(np.argmax(full_logprobs(model, prompt)[-1]))
    nearly_greedy = RolloutConfig(samples=2, max_think_tokens=6, temperature=1e-4)
    # The marker is the token the model will certainly write first: it stops at once.
    traces, _ = sample_traces(
        model, [prompt], nearly_greedy, V(tok, [greedy], EOS), mx.random.key(0)
    )
    assert all(t.emitted_marker and t.tokens == [] for t in traces[0])
    # A two-token text marker: the greedy continuation's first two tokens.
    second = int(np.argmax(full_logprobs(model, prompt + [greedy])[-1]))
    traces, _ = sample_traces(
        model, [prompt], nearly_greedy, V(tok, [greedy, second], EOS), mx.random.key(0)
    )
    assert all(t.emitted_marker and t.tokens == [] for t in traces[0])
    # The same token as EOS instead: ends by EOS, no marker, and EOS is not part of the trace.
    traces, stats = sample_traces(
        model, [prompt], nearly_greedy, V(tok, [9999], {greedy}), mx.random.key(0)
    )
    assert all(not t.emitted_marker and t.tokens == [] for t in traces[0])
    assert stats.tokens == 2  # one EOS per row
    # Neither: the budget ends it.
    traces, _ = sample_traces(
        model, [prompt], nearly_greedy, V(tok, [9999], {9998}), mx.random.key(0)
    )
    assert all(len(t.tokens) == 6 and not t.emitted_marker for t in traces[0])


def test_top_p_keeps_only_the_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = set()
    for i in range(200):
        tok = sample_tokens(logits, mx.random.key(i), 1.0, 0.7)
        assert tok.shape == (1,)
        seen.add(int(tok.item()))
    assert seen == {0, 1}
    # Without top-p every token can come out.
    everything = {int(sample_tokens(logits, mx.random.key(i), 1.0, 1.0).item()) for i in range(400)}
    assert everything == {0, 1, 2, 3}


def test_greedy_answers_equal_step_by_step_argmax(model_and_tokenizer):
    model, tok = model_and_tokenizer
    contexts = [
        tok.encode("What is the capital of France?\nAnswer:\n"),
        tok.encode("two plus two"),
        tok.encode("a much longer context about rivers, trees, birds and the world we live in"),
    ]
    max_tokens = 7
    expected = [argmax_decode(model, c, EOS, max_tokens) for c in contexts]
    assert greedy_answers(model, contexts, EOS, max_tokens) == expected
    assert all(len(e) == max_tokens for e in expected)  # no EOS: the budget ends every answer
    # An EOS the first answer writes after a few tokens: that answer stops there (EOS dropped) and
    # leaves the batch, the others continue (or stop wherever they write that token too).
    first = expected[0]
    j = next(i for i in range(1, max_tokens) if first[i] not in first[:i])
    eos = {first[j]}
    early = [argmax_decode(model, c, eos, max_tokens) for c in contexts]
    assert early[0] == first[:j]
    assert max(len(e) for e in early) > j  # another row outlived the first one
    assert greedy_answers(model, contexts, eos, max_tokens) == early
    assert greedy_answers(model, contexts, eos, 1) == [e[:1] for e in early]


@pytest.mark.parametrize("starts_at, emitted", [(4, True), (5, False)])
def test_a_marker_begun_within_the_budget_may_be_completed(model_and_tokenizer, starts_at, emitted):
    """Think budget 5, a two-token marker the model writes (greedily) from position ``starts_at``:
    begun within the budget it is completed past it; begun after it the trace is cut."""
    model, tok = model_and_tokenizer
    prompt = tok.encode("why is the sky blue")
    greedy = argmax_decode(model, prompt, set(), 8)
    marker = greedy[starts_at : starts_at + 2]
    assert all(greedy[i : i + 2] != marker for i in range(starts_at))  # not written earlier
    cfg = RolloutConfig(samples=1, max_think_tokens=5, temperature=1e-4)
    [[trace]], _ = sample_traces(model, [prompt], cfg, V(tok, marker, {-1}), mx.random.key(0))
    assert trace.emitted_marker is emitted
    assert trace.tokens == (greedy[:starts_at] if emitted else greedy[:5])


# ---- the pipelined loop against the loop it replaced ---------------------------------------------


def reference_sample(logits, key, temperature: float, top_p: float):
    """nrt-mlx 0.1's sampler, verbatim: top-p by two argsorts."""
    scaled = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(before < top_p, sorted_logits, -float("inf"))
        scaled = mx.take_along_axis(sorted_logits, mx.argsort(order, axis=-1), axis=-1)
    return mx.random.categorical(scaled, key=key)


def reference_traces(model, prompts, cfg: RolloutConfig, vocab: Vocabulary, key):
    """nrt-mlx 0.1's rollout as a plain loop: each prompt prefilled on its own, caches merged,
    one token per step for the whole batch, the ids read every step, finished rows dropped at
    once. Returns [(trace ids, emitted marker)] per question."""
    watch, stop, budget = (
        MarkerWatch(vocab),
        vocab.stop_ids(cfg.stop_at_special),
        cfg.max_think_tokens,
    )
    caches, last = [], []
    for p in prompts:
        cache = make_prompt_cache(model)
        last.append(model(mx.array(p)[None], cache=cache)[:, -1, :])
        caches.append(cache)
    rows = [q for q in range(len(prompts)) for _ in range(cfg.samples)]
    cache = [caches[0][i].merge([caches[q][i] for q in rows]) for i in range(len(caches[0]))]
    logits = mx.repeat(mx.concatenate(last, axis=0), cfg.samples, axis=0)
    out, active = [[] for _ in rows], list(range(len(rows)))
    for _ in range(budget + watch.window):
        key, sub = mx.random.split(key)
        tokens, keep = reference_sample(logits, sub, cfg.temperature, cfg.top_p), []
        for i, t in enumerate(tokens.tolist()):
            seq = out[active[i]]
            seq.append(t)
            done = seq[-1] in stop or watch.written(seq)
            done = done or (
                len(seq) >= budget and not (len(seq) < budget + watch.window and watch.begun(seq))
            )
            if not done:
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(active):
            for c in cache:
                c.filter(mx.array(keep))
            tokens, active = tokens[mx.array(keep)], [active[i] for i in keep]
        logits = model(tokens[:, None], cache=cache)[:, -1, :]
    traces = []
    for seq in out:
        think = watch.think(seq, budget) if watch.written(seq) else None
        if think is not None:
            traces.append((think, True))
        else:
            traces.append((seq[:-1][:budget] if seq[-1] in stop else seq[:budget], False))
    return [traces[q * cfg.samples : (q + 1) * cfg.samples] for q in range(len(prompts))]


# Ids 300-329 end a trace like EOS: with them rows finish at many different steps.
MANY_EOS = set(range(300, 330))


@pytest.mark.parametrize(
    "marker, cfg",
    [
        ([477], RolloutConfig(samples=4, max_think_tokens=12, temperature=0.3)),  # special, by id
        ([73, 225], RolloutConfig(samples=4, max_think_tokens=12)),  # text "e ", decoded
        ([73, 225], RolloutConfig(samples=3, max_think_tokens=10, temperature=0.7, top_p=0.6)),
        ([4], RolloutConfig(samples=2, max_think_tokens=16, stop_at_special=False)),
    ],
    ids=["special", "text", "text-top-p", "all-specials-kept"],
)
@pytest.mark.parametrize("filter_share", [0.0, rollout.FILTER_SHARE, 1.0])
def test_pipelined_traces_equal_the_plain_loop(
    model_and_tokenizer, monkeypatch, marker, cfg, filter_share
):
    """Prompts of different lengths prefilled in one padded batch, the host a step behind the
    device, finished rows dropped at once (share 0), in bunches (the default) or never (1):
    the traces equal those of the loop this replaced, for every key. (Exact equality rests on
    float rounding: the batched prefill and the changed batch shapes move logits by ~1e-6,
    test_batched_prefill_matches_one_prompt_at_a_time, which changes a draw only at a near-tie.)"""
    model, tok = model_and_tokenizer
    monkeypatch.setattr(rollout, "FILTER_SHARE", filter_share)
    prompts = [tok.encode("What is the capital of France? Think first."), tok.encode("one two")]
    prompts.append(tok.encode("why is the sky blue"))
    vocab = V(tok, marker, MANY_EOS)
    ends = set()
    for seed in range(3):
        got, _ = sample_traces(model, prompts, cfg, vocab, mx.random.key(seed))
        flat = [(t.tokens, t.emitted_marker) for g in got for t in g]
        assert [[(t.tokens, t.emitted_marker) for t in g] for g in got] == reference_traces(
            model, prompts, cfg, vocab, mx.random.key(seed)
        )
        ends |= {(len(t), m) for t, m in flat}
    # Rows ended at several steps, by the marker and by a stop id, and some ran to the budget.
    assert len({n for n, _ in ends}) > 3 and any(m for _, m in ends)
    assert any(not m and n < cfg.max_think_tokens for n, m in ends)


def test_batched_prefill_matches_one_prompt_at_a_time(model_and_tokenizer):
    """One padded forward pass for all prompts gives each prompt's last logits and KV cache as a
    forward pass over that prompt alone does, up to float rounding: the BLAS rounds a row
    differently depending on how many rows its matrix product has (bit-equality is impossible)."""
    model, tok = model_and_tokenizer
    prompts = [tok.encode("a much longer question about the capital of France"), [7, 8], [9]]
    cache, logits = rollout._prefill(model, prompts)
    width = max(len(p) for p in prompts)
    for q, p in enumerate(prompts):
        alone = make_prompt_cache(model)
        expected = model(mx.array(p)[None], cache=alone)[0, -1]
        assert mx.allclose(logits[q], expected, atol=1e-5, rtol=0).item()
        for batched, own in zip(cache, alone):  # left-padded: the prompt's keys end the row
            keys = batched.keys[q : q + 1, :, width - len(p) : width]
            assert mx.allclose(keys, own.keys[..., : len(p), :], atol=1e-5, rtol=0).item()
            assert batched.offset[q].item() == len(p)  # positions continue after the prompt


def test_the_compiled_sampler_draws_what_sample_tokens_draws():
    """Compiling the sampler (fused kernels) must not move a single draw, nor the key chain."""
    logits = mx.random.normal((5, 300), key=mx.random.key(1)) * 3
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1e-4, 1.0)]:
        pick = sampler(temperature, top_p)
        key = ref = mx.random.key(2)
        for _ in range(20):
            ids, key = pick(logits, key)
            ref, sub = mx.random.split(ref)
            assert mx.array_equal(ids, reference_sample(logits, sub, temperature, top_p)).item()
            assert mx.array_equal(key, ref).item()
