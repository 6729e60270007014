"""Shared-prompt forward pass: each question's prompt runs through the model once, and the K trace
rows and the null-think row of the question attend to its keys and values (docs/NRT.md, "Shared-
prompt training").

Every row of a question starts with the same prompt x, and the loss needs log-probs only after it
(of z, m and y*). So instead of B full rows ``[x | continuation]``, one *prompt pass* runs the
questions' prompts (without their last token, left-padded as mlx-lm's batched generation pads
them) and records each layer's keys and values; then *continuation passes* run ``[last prompt
token | continuation]`` per row, each row attending to its question's recorded prompt and then
causally to itself. Gradients flow through the recorded keys and values into the prompt pass, so
loss and gradients equal the full-row forward up to float rounding (tests/test_prefix.py).

The caches below implement the two calls mlx-lm's attention layers make on a cache
(``update_and_fetch`` and, through ``create_attention_mask``, ``make_mask``); ``supported`` checks
once per model that the result matches the full-row forward, since a model with absolute position
embeddings or sliding-window layers would not.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx


class _PromptCache:
    """A layer's cache in the prompt pass: records the prompt's keys and values."""

    offset = 0

    def __init__(self, mask: mx.array) -> None:
        self.mask = mask
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: Any = None) -> mx.array:
        return self.mask


class _ContinuationCache:
    """A layer's cache in a continuation pass: each row sees its question's recorded prompt
    keys and values, then its own."""

    def __init__(self, prompt: _PromptCache, questions: mx.array, mask: mx.array) -> None:
        self.prompt, self.questions, self.mask = prompt, questions, mask
        self.offset = prompt.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        before_k = self.prompt.keys[self.questions]
        before_v = self.prompt.values[self.questions]
        return mx.concatenate([before_k, keys], axis=2), mx.concatenate([before_v, values], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size: Any = None) -> mx.array:
        return self.mask


def _causal(n: int) -> mx.array:
    i = mx.arange(n)
    return i[:, None] >= i[None, :]


def prompt_pass(model: Any, prompts: mx.array, valid: mx.array) -> list[_PromptCache] | None:
    """Run ``prompts`` [Q, P] (left-padded; ``valid`` marks real tokens) and record each layer's
    keys and values. The model's logits are never used, so MLX never computes them. A pad position
    also attends to itself, so no attention row is empty (an empty one would be NaN)."""
    width = prompts.shape[1]
    if width == 0:
        return None
    eye = mx.eye(width, dtype=mx.bool_)
    mask = (_causal(width)[None] & valid[:, None, :]) | eye[None]
    caches = [_PromptCache(mask[:, None]) for _ in range(len(model.layers))]
    model(prompts, cache=caches)
    return caches


def continuation_logits(
    model: Any,
    caches: list[_PromptCache] | None,
    inputs: mx.array,
    questions: mx.array,
    valid: mx.array,
) -> mx.array:
    """Logits [n, W, V] of continuation rows ``inputs`` [n, W] of the questions ``questions`` [n],
    each attending to its question's recorded prompt (real tokens only) and causally to itself."""
    if caches is None:
        return model(inputs)
    n, width = inputs.shape
    before = mx.broadcast_to(valid[questions][:, None, None, :], (n, 1, width, valid.shape[1]))
    own = mx.broadcast_to(_causal(width)[None, None], (n, 1, width, width))
    mask = mx.concatenate([before, own], axis=-1)
    return model(inputs, cache=[_ContinuationCache(c, questions, mask) for c in caches])


def supported(model: Any) -> str | None:
    """None when shared-prompt passes give the full-row log-probs on ``model``, else why not.

    mlx-lm's own prompt cache of the model must be plain key/value caches (no sliding window, no
    recurrent state), and a small probe (two prompts of different lengths, made of ordinary token
    ids) must give the same log-probs both ways: that catches absolute position embeddings and
    attention layers that build their masks in their own way.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {KVCache.__name__}:
        return f"the model's attention caches are {', '.join(sorted(kinds))}, not plain KV caches"
    # Probe ids past the first few, which are often special tokens.
    vocab = model.args.vocab_size if hasattr(model, "args") else 64
    ids = [(7 + 13 * i) % max(vocab - 8, 1) + 8 for i in range(12)]
    rows = [(ids[:5], ids[5:9]), (ids[:3], ids[9:12]), (ids[2:9], ids[3:6])]
    full, shared = [], []
    width = max(len(p) for p, _ in rows)
    prompts = mx.array([[0] * (width - len(p)) + p for p, _ in rows])
    valid = mx.array([[False] * (width - len(p)) + [True] * len(p) for p, _ in rows])
    caches = prompt_pass(model, prompts[:, :-1], valid[:, :-1])
    for q, (p, c) in enumerate(rows):
        full.append(model(mx.array([p + c]))[0, len(p) - 1 :])
        inputs = mx.array([[p[-1], *c]])
        shared.append(continuation_logits(model, caches, inputs, mx.array([q]), valid[:, :-1])[0])
    a = mx.concatenate(full).astype(mx.float32)
    b = mx.concatenate(shared).astype(mx.float32)
    diff = float(mx.abs(a - b).max()) / max(float(mx.abs(a).max()), 1e-6)
    if not diff <= 1e-3:
        return f"a probe's logits differ by {diff:.1e} (relative) from the full-row forward pass"
    return None


# ---- gradient checkpointing that keeps the prompt's gradient -------------------------------------


def _swap(args: tuple, kwargs: dict, old: Any, new: Any) -> tuple[tuple, dict]:
    return (
        tuple(new if a is old else a for a in args),
        {k: new if v is old else v for k, v in kwargs.items()},
    )


def grad_checkpoint(layers: list[Any]) -> None:
    """Recompute each of ``layers`` in the backward pass instead of keeping its activations.

    Like mlx-lm's ``grad_checkpoint``, but (1) only these layer objects are checkpointed, not every
    instance of their class, and (2) the keys and values a shared-prompt pass hands between the
    prompt pass and the continuation passes are explicit outputs and inputs of the checkpointed
    function: ``mx.checkpoint`` treats arrays it does not see as constants, so the gradient
    through the shared prompt would be lost.
    """
    for layer in layers:
        layer._nrt_checkpoint = True
        cls = type(layer)
        if getattr(cls, "_nrt_plain_call", None) is not None:
            continue
        cls._nrt_plain_call = plain = cls.__call__

        def call(module: Any, *args: Any, _plain: Any = plain, **kwargs: Any) -> Any:
            if not getattr(module, "_nrt_checkpoint", False):
                return _plain(module, *args, **kwargs)
            cache = next(
                (
                    a
                    for a in (*args, *kwargs.values())
                    if isinstance(a, _PromptCache | _ContinuationCache)
                ),
                None,
            )
            params = module.trainable_parameters()
            if isinstance(cache, _PromptCache):

                def recorded(p: Any, *a: Any, **k: Any) -> Any:
                    module.update(p)
                    own = _PromptCache(cache.mask)
                    a, k = _swap(a, k, cache, own)
                    return _plain(module, *a, **k), own.keys, own.values

                out, cache.keys, cache.values = mx.checkpoint(recorded)(params, *args, **kwargs)
                return out
            if isinstance(cache, _ContinuationCache):

                def attending(p: Any, keys: mx.array, values: mx.array, *a: Any, **k: Any) -> Any:
                    module.update(p)
                    before = _PromptCache(cache.prompt.mask)
                    before.keys, before.values = keys, values
                    own = _ContinuationCache(before, cache.questions, cache.mask)
                    a, k = _swap(a, k, cache, own)
                    return _plain(module, *a, **k)

                keys, values = cache.prompt.keys, cache.prompt.values
                return mx.checkpoint(attending)(params, keys, values, *args, **kwargs)

            def plain_call(p: Any, *a: Any, **k: Any) -> Any:
                module.update(p)
                return _plain(module, *a, **k)

            return mx.checkpoint(plain_call)(params, *args, **kwargs)

        cls.__call__ = call
