"""Batched decoding: K sampled reasoning traces per question, and greedy answers for evaluation.

Each prompt is run through the model once; its KV cache is copied into its rows of one batched
cache (mlx-lm's cache ``merge``), and all rows decode together, one token per step for the whole
batch. Finished rows are filtered out of the batch, so the remaining rows decode faster. A trace
stops at the answer marker, at EOS, or at ``max_think_tokens``; an answer at EOS or its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from nrt_mlx.recipe import RolloutConfig
from nrt_mlx.vocab import Vocabulary


@dataclass
class Trace:
    tokens: list[int]  # the sampled reasoning z, without the marker and without EOS
    emitted_marker: bool  # the model wrote the marker itself


@dataclass
class RolloutStats:
    tokens: int  # sampled tokens, all rows
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sample_tokens(logits: mx.array, key: mx.array, temperature: float, top_p: float) -> mx.array:
    """One token per row [B], with temperature and nucleus (top-p) filtering."""
    scaled = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(before < top_p, sorted_logits, -float("inf"))
        scaled = mx.take_along_axis(sorted_logits, mx.argsort(order, axis=-1), axis=-1)
    return mx.random.categorical(scaled, key=key)


def _prefill(model: nn.Module, prompt: list[int]) -> tuple[list, mx.array]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    return cache, logits


def _decode(
    model: nn.Module,
    prompts: list[list[int]],
    copies: int,
    pick: Callable[[mx.array], mx.array],
    finished: Callable[[list[int]], bool],
    max_steps: int,
) -> tuple[list[list[int]], RolloutStats]:
    """``copies`` continuations of each prompt, rows in prompt order; ``pick(logits) -> ids [B]``
    chooses the next tokens and ``finished(ids so far)`` ends a row."""
    start = time.perf_counter()
    prefilled = [_prefill(model, p) for p in prompts]
    rows = [q for q in range(len(prompts)) for _ in range(copies)]
    cache = [
        prefilled[0][0][layer].merge([prefilled[q][0][layer] for q in rows])
        for layer in range(len(prefilled[0][0]))
    ]
    logits = mx.repeat(mx.concatenate([lg for _, lg in prefilled], axis=0), copies, axis=0)
    out: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))  # rows still decoding, in batch order
    for _ in range(max_steps):
        tokens = pick(logits)
        keep = []
        for i, t in enumerate(tokens.tolist()):
            out[active[i]].append(t)
            if not finished(out[active[i]]):
                keep.append(i)
        if not keep:
            break
        if len(keep) < len(active):
            idx = mx.array(keep)
            for c in cache:
                c.filter(idx)
            tokens = tokens[idx]
            active = [active[i] for i in keep]
        logits = model(tokens[:, None], cache=cache)[:, -1, :]
    seconds = time.perf_counter() - start
    return out, RolloutStats(sum(len(o) for o in out), seconds)


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
) -> tuple[list[list[Trace]], RolloutStats]:
    """``cfg.samples`` traces per prompt, traces[q][k]; ``key`` makes them deterministic.

    A trace ends when the model writes the marker, writes EOS (or, with ``cfg.stop_at_special``,
    any special token; that token is dropped), or reaches ``cfg.max_think_tokens`` (cut there; a
    text marker begun within the budget may still be completed).
    """
    watch, stop, budget = (
        MarkerWatch(vocab),
        vocab.stop_ids(cfg.stop_at_special),
        cfg.max_think_tokens,
    )

    def pick(logits: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return sample_tokens(logits, sub, cfg.temperature, cfg.top_p)

    def finished(seq: list[int]) -> bool:
        if seq[-1] in stop or watch.written(seq):
            return True
        return len(seq) >= budget and not (len(seq) < budget + watch.window and watch.begun(seq))

    seqs, stats = _decode(model, prompts, cfg.samples, pick, finished, budget + watch.window)
    traces = []
    for seq in seqs:
        think = watch.think(seq, budget) if watch.written(seq) else None
        if think is not None:
            traces.append(Trace(think, True))
        elif seq[-1] in stop:  # a row let past the budget by a marker begun there is cut to it
            traces.append(Trace(seq[:-1][:budget], False))
        else:
            traces.append(Trace(seq[:budget], False))
    k = cfg.samples
    return [traces[q * k : (q + 1) * k] for q in range(len(prompts))], stats


def greedy_answers(
    model: nn.Module, contexts: list[list[int]], eos_ids: frozenset[int] | set[int], max_tokens: int
) -> list[list[int]]:
    """The greedy (argmax) continuation of each context up to EOS (dropped) or ``max_tokens``."""
    seqs, _ = _decode(
        model,
        contexts,
        1,
        lambda logits: mx.argmax(logits, axis=-1),
        lambda seq: seq[-1] in eos_ids or len(seq) >= max_tokens,
        max_tokens,
    )
    return [seq[:-1] if seq and seq[-1] in eos_ids else seq for seq in seqs]
