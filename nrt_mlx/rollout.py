"""Batched rationale sampling: every question of a step times K samples in one generation.

Each question's prompt is run through the model once; its KV cache is then copied into K rows of
one batched cache (mlx-lm's cache ``merge``), and all Q*K rows decode together, one token per step
for the whole batch. A row stops at the answer marker, at EOS, or at ``max_think_tokens``; finished
rows are filtered out of the batch so the remaining rows decode faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from nrt_mlx.recipe import RolloutConfig


@dataclass
class Trace:
    tokens: list[int]  # the sampled reasoning z, without the marker and without EOS
    logprobs: list[float]  # sampler log-probabilities (temperature 1) of ``tokens``
    emitted_marker: bool  # the model wrote the marker itself
    ended_eos: bool  # the model wrote EOS before any marker


@dataclass
class RolloutStats:
    tokens: int  # sampled tokens, all rows
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def sample_tokens(
    logits: mx.array, key: mx.array, temperature: float, top_p: float
) -> tuple[mx.array, mx.array]:
    """Sample one token per row with temperature and nucleus (top-p) filtering.

    Returns (tokens [B], log-probabilities [B] of those tokens under the untempered model).
    """
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    scaled = logits / temperature
    if top_p < 1.0:
        order = mx.argsort(-scaled, axis=-1)
        sorted_logits = mx.take_along_axis(scaled, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = mx.cumsum(probs, axis=-1) - probs
        sorted_logits = mx.where(before < top_p, sorted_logits, -float("inf"))
        inverse = mx.argsort(order, axis=-1)
        scaled = mx.take_along_axis(sorted_logits, inverse, axis=-1)
    tokens = mx.random.categorical(scaled, key=key)
    chosen = mx.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen


def _prefill(model: nn.Module, prompt: list[int]) -> tuple[list, mx.array]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    return cache, logits


def sample_traces(
    model: nn.Module,
    prompts: list[list[int]],
    cfg: RolloutConfig,
    marker_ids: list[int],
    eos_ids: set[int],
    key: mx.array,
    samples: int | None = None,
) -> tuple[list[list[Trace]], RolloutStats]:
    """Sample K traces for each prompt. Returns traces[q][k] and throughput figures.

    ``key`` makes the result deterministic; ``samples`` overrides ``cfg.samples``.
    """
    k = samples or cfg.samples
    start = time.perf_counter()
    prefilled = [_prefill(model, p) for p in prompts]
    n_layers = len(prefilled[0][0])
    cache = [
        prefilled[0][0][layer].merge(
            [prefilled[q][0][layer] for q in range(len(prompts)) for _ in range(k)]
        )
        for layer in range(n_layers)
    ]
    logits = mx.repeat(mx.concatenate([lg for _, lg in prefilled], axis=0), k, axis=0)

    n_rows = len(prompts) * k
    out_tokens: list[list[int]] = [[] for _ in range(n_rows)]
    out_logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    emitted = [False] * n_rows
    ended_eos = [False] * n_rows
    active = list(range(n_rows))  # row ids still decoding, in batch order
    m_len = len(marker_ids)
    sampled = 0
    for _ in range(cfg.max_think_tokens + m_len):
        key, sub = mx.random.split(key)
        tokens, logprobs = sample_tokens(logits, sub, cfg.temperature, cfg.top_p)
        mx.eval(tokens, logprobs)
        tok_list, lp_list = tokens.tolist(), logprobs.tolist()
        keep = []
        for i, row in enumerate(active):
            t = tok_list[i]
            out_tokens[row].append(t)
            out_logprobs[row].append(lp_list[i])
            sampled += 1
            seq = out_tokens[row]
            if len(seq) >= m_len and seq[-m_len:] == marker_ids:
                emitted[row] = True
                del seq[-m_len:], out_logprobs[row][-m_len:]
            elif t in eos_ids:
                ended_eos[row] = True
                seq.pop()
                out_logprobs[row].pop()
            elif len(seq) >= cfg.max_think_tokens:
                # Past the think budget: only a marker still being written may continue.
                tail = seq[cfg.max_think_tokens :]
                if not tail or marker_ids[: len(tail)] != tail or len(tail) >= m_len:
                    del seq[cfg.max_think_tokens :], out_logprobs[row][cfg.max_think_tokens :]
                else:
                    keep.append(i)
            else:
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
    traces = [
        Trace(out_tokens[r], out_logprobs[r], emitted[r], ended_eos[r]) for r in range(n_rows)
    ]
    grouped = [traces[q * k : (q + 1) * k] for q in range(len(prompts))]
    return grouped, RolloutStats(sampled, seconds)
