"""Shared-prompt forward pass: each question's prompt runs through the model once, and the K trace
rows and the null-think row of the question attend to its keys and values (docs/NRT.md, "Shared-
prompt training").

Every row of a question starts with the same prompt x, and the loss needs log-probs only after it
(of z, m and y*). So instead of B full rows ``[x | continuation]``:

1. the *prompt pass* runs the questions' prompts (without their last token, left-padded as
   mlx-lm's batched generation pads them) and records each layer's keys and values;
2. the *think pass* runs ``[last prompt token | z_k]`` per trace row (targets ``z_k, m_0``),
   attending to its question's recorded prompt and causally to itself, and records its keys and
   values too;
3. the *answer pass* runs ``[m | y*]`` (minus the last token) per trace row, attending to the
   prompt, to its own think pass and causally to itself.

Every pass counts a row's positions from its first real token (a left-padded prompt starts below
0): the positions of the full rows and of the rollout, whose states below the adapters the prompt
and think passes can take instead of running those blocks (``replay``, nrt_mlx/reuse.py).

The answer pass is split from the think pass because only tokens after the marker depend on the
marker's trainable input row (nrt_mlx/marker.py): the backward pass has to run through every layer
for them, but only through the LoRA layers for the think tokens. Null-think rows run
``[last prompt token | m | y*]`` in one pass of their own. Gradients flow through the recorded keys
and values, so loss and gradients equal the full-row forward up to float rounding
(tests/test_prefix.py).

``AttentionCache`` implements the two calls mlx-lm's attention layers make on a cache
(``update_and_fetch`` and, through ``create_attention_mask``, ``make_mask``); ``cache_problem``
refuses models whose own caches are not plain key/value caches, and the trainer probes the rest
numerically once (``session.shared_prompt_problem``).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from nrt_mlx import marker, reuse


class AttentionCache:
    """A layer's cache for one pass: the keys and values the pass's rows attend to before their
    own (``before_keys``/``before_values``: [n, heads, S_i, D] each, already one row per row of
    the pass), the pass's mask [n, 1, L, sum S_i + L], and its RoPE offset (an int, or [n] per
    row). With ``record`` it keeps the pass's own keys and values for a later pass."""

    def __init__(
        self,
        before_keys: list[mx.array],
        before_values: list[mx.array],
        mask: mx.array,
        offset: int | mx.array,
        record: bool,
    ) -> None:
        self.before_keys, self.before_values = before_keys, before_values
        self.mask, self.offset, self.record = mask, offset, record
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.record:
            self.keys, self.values = keys, values
        if not self.before_keys:
            return keys, values
        return (
            mx.concatenate([*self.before_keys, keys], axis=2),
            mx.concatenate([*self.before_values, values], axis=2),
        )

    def make_mask(self, n: int, return_array: bool = False, window_size: Any = None) -> mx.array:
        return self.mask


def _causal(n: int) -> mx.array:
    i = mx.arange(n)
    return i[:, None] >= i[None, :]


def _run(
    model: Any,
    inputs: mx.array,
    before: list[tuple[list[AttentionCache], mx.array | None, mx.array]],
    offset: int | mx.array,
    record: bool,
    replay: reuse.Replay | None = None,
) -> tuple[mx.array, list[AttentionCache]]:
    """Logits [n, L, V] of ``inputs`` [n, L], each row attending first to ``before``: per source,
    (caches of an earlier pass, the source row of each row or None for the same rows, the [n, S]
    mask of the source's real positions), then causally to itself; the blocks below the adapters
    taken from ``replay`` when given (``nrt_mlx.reuse``)."""
    n, width = inputs.shape
    masks = [
        mx.broadcast_to(valid[:, None, None, :], (n, 1, width, valid.shape[1]))
        for *_, valid in before
    ]
    masks.append(mx.broadcast_to(_causal(width)[None, None], (n, 1, width, width)))
    mask = mx.concatenate(masks, axis=-1)
    caches = []
    for layer in range(len(model.layers)):
        picked = [(c[layer], rows) for c, rows, _ in before]
        keys = [c.keys if rows is None else c.keys[rows] for c, rows in picked]
        values = [c.values if rows is None else c.values[rows] for c, rows in picked]
        caches.append(AttentionCache(keys, values, mask, offset, record))
    with marker.input_row_unused(model, inputs), reuse.replaying(model, replay):
        return model(inputs, cache=caches), caches


def real_lengths(valid: mx.array) -> mx.array:
    """[n] int32: the real tokens of each row of ``valid`` [n, W]."""
    return valid.sum(axis=1).astype(mx.int32)


def prompt_pass(
    model: Any, prompts: mx.array, valid: mx.array, replay: reuse.Replay | None = None
) -> list[AttentionCache] | None:
    """Run ``prompts`` [Q, P] (left-padded; ``valid`` marks real tokens) and record each layer's
    keys and values (below the adapters from ``replay`` when given). The logits are never used,
    so MLX never computes them. A pad position also attends to itself, so no attention row is
    empty (an empty one would be NaN)."""
    width = prompts.shape[1]
    if width == 0:
        return None
    mask = (_causal(width)[None] & valid[:, None, :]) | mx.eye(width, dtype=mx.bool_)[None]
    offset = real_lengths(valid) - width  # each row's first real token at position 0
    caches = [
        AttentionCache([], [], mask[:, None], offset, record=True) for _ in range(len(model.layers))
    ]
    with marker.input_row_unused(model, prompts), reuse.replaying(model, replay):
        model(prompts, cache=caches)
    return caches


def continuation_logits(
    model: Any,
    prompt: list[AttentionCache] | None,
    valid: mx.array,
    questions: mx.array,
    think: mx.array,
    answer: mx.array | None = None,
    think_valid: mx.array | None = None,
    replay: reuse.Replay | None = None,
) -> list[mx.array]:
    """Logits of rows of ``questions`` [n] after their recorded ``prompt`` (``valid`` [Q, P]):
    ``think`` [n, Wa] attends to the prompt; ``answer`` [n, Wb], when given, to the prompt, to
    the row's own think tokens (``think_valid`` [n, Wa]) and to itself, its positions starting
    after the row's real think tokens. Returns [think logits] or [think logits, answer logits].
    ``replay``: the think part's states below the adapters (``nrt_mlx.reuse``)."""
    if prompt is None:  # one-token prompts: nothing to attend to before the continuation
        before: list = []
        offset = 0
    else:
        before, offset = [(prompt, questions, valid[questions])], real_lengths(valid)[questions]
    logits, think_caches = _run(model, think, before, offset, answer is not None, replay)
    if answer is None:
        return [logits]
    lengths = real_lengths(think_valid)
    after = [*before, (think_caches, None, think_valid)]
    answer_logits, _ = _run(model, answer, after, offset + lengths, record=False)
    return [logits, answer_logits]


def cache_problem(model: Any) -> str | None:
    """None when mlx-lm's own prompt cache of ``model`` is plain key/value caches (what the passes
    above replace), else why shared-prompt passes cannot serve it: sliding-window layers keep
    only recent keys, recurrent layers keep a state instead of keys."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    kinds = {type(c).__name__ for c in make_prompt_cache(model)}
    if kinds != {KVCache.__name__}:
        return f"the model's attention caches are {', '.join(sorted(kinds))}, not plain KV caches"
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
    instance of their class, and (2) the keys and values that passes hand to later passes are
    explicit inputs and outputs of the checkpointed function: ``mx.checkpoint`` treats arrays it
    does not see as constants, so the gradient through the shared prompt would be lost.
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
            params = module.trainable_parameters()
            cache = next(
                (a for a in (*args, *kwargs.values()) if isinstance(a, AttentionCache)), None
            )
            if cache is None:

                def plain_call(p: Any, *a: Any, **k: Any) -> Any:
                    module.update(p)
                    return _plain(module, *a, **k)

                return mx.checkpoint(plain_call)(params, *args, **kwargs)
            n = len(cache.before_keys)

            def attending(p: Any, before: list[mx.array], *a: Any, **k: Any) -> Any:
                module.update(p)
                own = AttentionCache(before[:n], before[n:], cache.mask, cache.offset, cache.record)
                a, k = _swap(a, k, cache, own)
                out = _plain(module, *a, **k)
                return (out, own.keys, own.values) if cache.record else out

            before = [*cache.before_keys, *cache.before_values]
            out = mx.checkpoint(attending)(params, before, *args, **kwargs)
            if not cache.record:
                return out
            out, cache.keys, cache.values = out
            return out

        cls.__call__ = call
