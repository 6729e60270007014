"""Batched decoding: K sampled reasoning traces per question, and greedy answers for evaluation.

All prompts of a call go through the model in one batched forward pass, once per question; the
K trace rows of a question share that prefill (its cache rows are repeated). All rows then decode
together, one token per step, with the host one step behind the device and a compiled sampler;
finished rows leave the batch in bunches. For the same key the traces are those of the plain
loop of nrt-mlx 0.1 (tests/test_rollout.py keeps a copy of it), up to float rounding of the
logits (see ``_prefill``). A trace stops at the answer marker, at EOS, or at
``max_think_tokens``; an answer at EOS or its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from nrt_mlx import reuse
from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.vocab import Vocabulary


@dataclass
class Trace:
    tokens: list[int]  # the sampled reasoning z, without the marker and without EOS
    emitted_marker: bool  # the model wrote the marker itself
    # (prompt, think) states below the first adapted block, when the rollout kept them for the
    # update (nrt_mlx.reuse): the question's prompt, then this row's think tokens.
    states: tuple[reuse.States, reuse.States] | None = field(
        default=None, repr=False, compare=False
    )


@dataclass
class RolloutStats:
    tokens: int  # sampled tokens, all rows
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sample_tokens(logits: mx.array, key: mx.array, temperature: float, top_p: float) -> mx.array:
    """One token per row [B], with temperature and nucleus (top-p) filtering."""
    return mx.random.categorical(_filtered(logits, temperature, top_p), key=key)


def _filtered(logits: mx.array, temperature: float, top_p: float) -> mx.array:
    """Logits [B, V] at ``temperature``, with -inf outside the top-p nucleus."""
    scaled = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(before < top_p, sorted_logits, -float("inf"))
        # Scattered back to vocabulary order (a second argsort would give the same, slower).
        scaled = mx.put_along_axis(scaled, order, sorted_logits, axis=-1)
    return scaled


# (logits [n, V], key) -> (ids [n], the key for the next step)
Pick = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


def sampler(temperature: float, top_p: float) -> Pick:
    """``sample_tokens`` with a fresh subkey per step, compiled into one graph: the key comes in
    as an argument (a compiled function must not draw from the global random state)."""

    def pick(logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        key, sub = mx.random.split(key)
        return sample_tokens(logits, sub, temperature, top_p), key

    return mx.compile(pick)


def row_sampler(temperature: float, top_p: float) -> Pick:
    """``sampler`` with one key per row (``keys`` [n, 2], in the order of the logits' rows): each
    row's draw depends on its own key alone, not on which other rows share the batch."""

    def pick(logits: mx.array, keys: mx.array) -> tuple[mx.array, mx.array]:
        both = mx.vmap(mx.random.split)(keys)  # [n, 2, 2]: the next key and this step's subkey
        draw = mx.vmap(lambda row, key: mx.random.categorical(row, key=key))
        return draw(_filtered(logits, temperature, top_p), both[:, 1]), both[:, 0]

    return mx.compile(pick)


def row_keys(key: mx.array, rows: list[int]) -> mx.array:
    """[R, 2]: the key of each row, from ``key`` and the row's index alone (a hash of the two)."""
    mixed = key[None] ^ mx.array([[0, r] for r in rows], dtype=mx.uint32)
    return mx.vmap(lambda k: mx.random.split(k)[0])(mixed)


def greedy_pick(logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
    return mx.argmax(logits, axis=-1), key


# Finished rows stay in the batch (computed, never sampled) until they are at least this share of
# it: dropping them copies every layer's KV cache and waits for the device, which costs more than
# decoding a few spare rows (measured on SmolLM2-135M, scripts/bench_rollout.py).
FILTER_SHARE = 0.25


def _prefill(model: nn.Module, prompts: list[list[int]]) -> tuple[list, mx.array]:
    """All prompts in one forward pass, right-padded (each prompt's tokens keep their positions,
    causal attention never sees the padding after them); the cache is then rolled to mlx-lm's
    left-padded batch layout. Returns the batch cache and each prompt's last logits [Q, V].

    The logits differ from a forward pass over each prompt alone by float rounding only (~1e-6 on
    logits of size ~10): the CPU BLAS rounds a row of a matrix product differently depending on
    how many rows the product has, so no batching (equal-length groups included) is bit-exact.
    Sampling changes only where two tokens are that close to a tie."""
    rows = [make_prompt_cache(model) for _ in prompts]
    cache = [layer.merge([row[i] for row in rows]) for i, layer in enumerate(rows[0])]
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    for c in cache:
        c.prepare(lengths=lengths, right_padding=[width - n for n in lengths])
    tokens = mx.array([p + [0] * (width - len(p)) for p in prompts])
    logits = model(tokens, cache=cache)[mx.arange(len(prompts)), mx.array(lengths) - 1]
    for c in cache:
        c.finalize()
    return cache, logits


def _take(cache: list, logits: mx.array, rows: list[int]) -> mx.array:
    """Keep (or repeat) these rows of the batch cache; returns the same rows of ``logits``."""
    idx = mx.array(rows)
    for c in cache:
        c.filter(idx)
    return logits[idx]


def _decode(
    model: nn.Module,
    prompts: list[list[int]],
    copies: int,
    pick: Pick,
    key: mx.array,
    finished: Callable[[list[int]], bool],
    max_steps: int,
    per_row: bool = False,
    capture: reuse.Capture | None = None,
) -> tuple[list[list[int]], RolloutStats]:
    """``copies`` continuations of each prompt, rows in prompt order; ``pick(logits, key)``
    chooses the next tokens and ``finished(ids so far)`` ends a row. ``per_row``: ``key`` holds
    one key per row ([rows, 2], ``row_sampler``), and rows that end take their keys with them.

    The prompts are prefilled once each and their cache rows repeated ``copies`` times. Decoding
    is pipelined: step t + 1 is queued on the device before the host reads the ids of step t.
    When a row finished at step t, step t + 1 is sampled again over the rows still decoding with
    the same key, so every step draws over exactly the live rows, as an unpipelined loop that
    drops finished rows at once would (the random draws depend on the batch shape).

    With ``capture`` every model call's batch rows are noted with it, and a row cut at
    ``max_steps`` has its last token fed once more, so that every sampled token went through the
    model (``reuse.Capture.rows_states``).
    """
    start = time.perf_counter()
    cache, logits = _prefill(model, prompts)
    if capture is not None:
        capture.rows.append(list(range(len(prompts))))
    rows = [q for q in range(len(prompts)) for _ in range(copies)]
    if copies > 1:
        logits = _take(cache, logits, rows)
    out: list[list[int]] = [[] for _ in rows]
    owner = list(range(len(rows)))  # output row of each batch row
    live = list(range(len(rows)))  # batch rows still decoding
    tokens, key = pick(logits, key)
    mx.async_eval(tokens, key)
    for step in range(max_steps):
        if step + 1 < max_steps:  # queue the next step before reading this one
            ids = tokens if len(live) == len(owner) else _spread(tokens, live, len(owner))
            logits = model(ids[:, None], cache=cache)[:, -1, :]
            if capture is not None:
                capture.rows.append(list(owner))
            nxt, nxt_key = pick(logits if len(live) == len(owner) else logits[mx.array(live)], key)
            mx.async_eval(nxt, nxt_key)
        ended = set()
        for j, t in zip(live, tokens.tolist()):
            seq = out[owner[j]]
            seq.append(t)
            if finished(seq):
                ended.add(j)
        if step + 1 == max_steps or len(ended) == len(live):
            break
        if ended:
            kept = [i for i, j in enumerate(live) if j not in ended]
            live = [live[i] for i in kept]
            if per_row:  # the same step's keys, of the rows still decoding
                key = key[mx.array(kept)]
            if len(owner) - len(live) >= FILTER_SHARE * len(owner):
                logits = _take(cache, logits, live)
                owner, live = [owner[j] for j in live], list(range(len(live)))
            else:
                logits = logits[mx.array(live)]
            nxt, nxt_key = pick(logits, key)  # this step again, over the live rows only
            mx.async_eval(nxt, nxt_key)
        tokens, key = nxt, nxt_key
    if capture is not None:
        if step + 1 == max_steps:  # rows cut at the budget: their last token was never fed
            ids = tokens if len(live) == len(owner) else _spread(tokens, live, len(owner))
            model(ids[:, None], cache=cache)
            capture.rows.append(list(owner))
        mx.eval(capture.arrays())
    mx.synchronize()  # a step queued after the last row ended still costs its time
    seconds = time.perf_counter() - start
    return out, RolloutStats(sum(len(o) for o in out), seconds)


def _spread(tokens: mx.array, live: list[int], size: int) -> mx.array:
    """The live rows' ``tokens`` at their batch rows of a [size] input (finished rows get 0)."""
    return mx.zeros((size,), dtype=tokens.dtype).at[mx.array(live)].add(tokens)


class MarkerWatch:
    """Finds the answer marker at the end of a row as it is sampled.

    A special-token marker is its id. A text marker is found in the decoded text, however the
    model tokenises it: the trace is then the sampled ids before it, or, when the marker starts
    inside a token, the text before it tokenised again (as the released code re-tokenises traces).
    """

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.id = vocab.marker.ids[0] if vocab.marker.is_special else None
        self.text = vocab.marker.text
        # Tokens whose text can hold the marker: every token adds at least one byte (byte-level
        # BPE spells a CJK character in up to four tokens).
        self.window = len(self.text.encode("utf-8")) + 2

    def _tail(self, seq: list[int]) -> str:
        return self.vocab.decode(seq[-self.window :])

    def written(self, seq: list[int]) -> bool:
        return seq[-1] == self.id if self.id is not None else self.text in self._tail(seq)

    def begun(self, seq: list[int]) -> bool:
        """The row ends with a proper prefix of a text marker."""
        if self.id is not None:
            return False
        tail = self._tail(seq)
        return any(tail.endswith(self.text[:p]) for p in range(1, len(self.text)))

    def think(self, seq: list[int], budget: int) -> list[int] | None:
        """The trace before a written marker, or None when the marker began after ``budget``
        tokens. The sampled ids are kept when the marker starts on a token boundary."""
        if self.id is not None:
            return seq[:-1]
        text = self.vocab.decode(seq)
        start = text.find(self.text)
        if start >= len(self.vocab.decode(seq[:budget])):
            return None
        for k in range(len(seq) - 1, max(len(seq) - self.window - 2, -1), -1):
            if self.vocab.decode(seq[:k]) == text[:start]:
                return seq[:k]
        return self.vocab.encode_text(text[:start])


def sample_traces(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    vocab: Vocabulary,
    key: mx.array,
    questions: list[int] | None = None,
    keep_below: int = 0,
) -> tuple[list[list[Trace]], RolloutStats]:
    """``cfg.samples`` traces per prompt, traces[q][k]; ``key`` makes them deterministic.

    ``questions``: the index of each prompt's question among all those sampled with ``key`` (by
    every process of a run). Given, trace row k of question i draws every token from its own key,
    derived from ``key`` and i * K + k (``rollout.sample_keys: row``), so a trace does not depend
    on the other rows of the batch: a run on several processes samples what one process would.
    None: one key per decode step for the whole batch (``batch``, runs saved before ``row``).

    A trace ends when the model writes the marker, writes EOS (or, with ``cfg.stop_at_special``,
    any special token; that token is dropped), or reaches ``cfg.max_think_tokens`` (cut there; a
    text marker begun within the budget may still be completed).

    ``keep_below`` > 0 keeps, in each trace's ``states``, the states of blocks below that one
    (``nrt_mlx.reuse``) when the marker is a special token (a text marker's trace may be
    tokenised again, so its tokens need not be the ones that went through the model).
    """
    watch, stop, budget = (
        MarkerWatch(vocab),
        vocab.stop_ids(cfg.stop_at_special),
        cfg.max_think_tokens,
    )

    def finished(seq: list[int]) -> bool:
        if seq[-1] in stop or watch.written(seq):
            return True
        return len(seq) >= budget and not (len(seq) < budget + watch.window and watch.begun(seq))

    # Only a text marker begun within the budget lets a row run past it.
    steps = budget if watch.id is not None else budget + watch.window
    k = cfg.samples
    if questions is None:
        pick = sampler(cfg.temperature, cfg.top_p)
    else:
        pick = row_sampler(cfg.temperature, cfg.top_p)
        key = row_keys(key, [i * k + j for i in questions for j in range(k)])
    per_row = questions is not None
    if 0 < keep_below < len(model.layers) and watch.id is not None:
        with reuse.capturing(model, keep_below) as capture:
            seqs, stats = _decode(model, prompts, k, pick, key, finished, steps, per_row, capture)
    else:
        capture = None
        seqs, stats = _decode(model, prompts, k, pick, key, finished, steps, per_row)
    traces = []
    for seq in seqs:
        think = watch.think(seq, budget) if watch.written(seq) else None
        if think is not None:
            traces.append(Trace(think, True))
        elif seq[-1] in stop:  # a row let past the budget by a marker begun there is cut to it
            traces.append(Trace(seq[:-1][:budget], False))
        else:
            traces.append(Trace(seq[:budget], False))
    if capture is not None and not capture.problem:
        kept = capture.prompts([len(p) for p in prompts])
        rows = capture.rows_states([len(t.tokens) for t in traces])
        for r, (t, states) in enumerate(zip(traces, rows)):  # none when rows_states found a problem
            t.states = (kept[r // k], states)
    return [traces[q * k : (q + 1) * k] for q in range(len(prompts))], stats


def greedy_answers(
    model: nn.Module, contexts: list[list[int]], eos_ids: frozenset[int] | set[int], max_tokens: int
) -> list[list[int]]:
    """The greedy (argmax) continuation of each context up to EOS (dropped) or ``max_tokens``."""
    seqs, _ = _decode(
        model,
        contexts,
        1,
        greedy_pick,
        mx.random.key(0),  # unused
        lambda seq: seq[-1] in eos_ids or len(seq) >= max_tokens,
        max_tokens,
    )
    return [seq[:-1] if seq and seq[-1] in eos_ids else seq for seq in seqs]
