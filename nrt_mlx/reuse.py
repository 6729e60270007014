"""The rollout's work below the adapters, kept for the update (docs/CPU.md, "Where a training
step's time goes").

The blocks below the first LoRA layer (``first`` of them) are frozen: for a prompt or think token
their output depends on the tokens alone, and the rollout computed it moments before the update
asks for it again. With a shared prompt (``nrt_mlx.prefix``) the update's prompt pass and think
passes can start at block ``first``:

* ``capturing`` (rollout side) records, for every position fed through the model, the hidden
  state entering block ``first`` and the keys and values of blocks ``0 .. first - 1``;
* ``States`` holds them per prompt and per trace row, ``layout`` pads them into a pass's shape;
* ``replaying`` (update side) stands in for blocks ``0 .. first - 1`` in a pass: each hands its
  recorded keys and values to the pass's cache (later passes attend to them) and the last one
  returns the recorded hidden state, so the pass computes only the adapted blocks.

Passes whose inputs hold the marker (the answer and null-think passes) still run every block: the
marker's input row trains. The positions are the rollout's (each row from 0 at its first real
token), which the shared-prompt passes use too. Values differ from recomputing them by float
rounding only (a matrix product rounds by its row count); tests/test_reuse.py compares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx


@dataclass
class States:
    """Positions of one prompt or one trace row: ``hidden`` [n, D] entering block ``first``,
    ``kv`` [2 first, kv_heads, n, head_dim]: the keys of blocks 0 .. first - 1, then their values."""

    hidden: mx.array
    kv: mx.array

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def take(self, start: int, stop: int) -> States:
        return States(self.hidden[start:stop], self.kv[:, :, start:stop])


def joined(parts: list[States]) -> States:
    if len(parts) == 1:
        return parts[0]
    return States(
        mx.concatenate([p.hidden for p in parts]), mx.concatenate([p.kv for p in parts], axis=2)
    )


@dataclass
class Replay:
    """A pass's states: ``hidden`` [rows, W, D], ``kv`` [2 first, rows, kv_heads, W, head_dim]."""

    hidden: mx.array
    kv: mx.array

    @property
    def first(self) -> int:
        return self.kv.shape[0] // 2


def layout(rows: list[States], width: int, left: bool) -> Replay:
    """Rows of states padded with zeros to ``width`` positions (on the left with ``left``, as the
    prompt pass pads its prompts; else on the right) and stacked."""

    def pad(x: mx.array, axis: int, n: int) -> mx.array:
        if n == 0:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (n, 0) if left else (0, n)
        return mx.pad(x, widths)

    hidden = [pad(r.hidden, 0, width - len(r)) for r in rows]
    kv = [pad(r.kv, 2, width - len(r)) for r in rows]
    return Replay(mx.stack(hidden), mx.stack(kv, axis=1))


# ---- the rollout side ---------------------------------------------------------------------------


class _Tap:
    """A block's cache that notes the keys and values the block adds, then passes them on."""

    def __init__(self, cache: Any, noted: list[tuple[mx.array, mx.array]]) -> None:
        self._cache, self._noted = cache, noted

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self._noted.append((keys, values))
        return self._cache.update_and_fetch(keys, values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class _Recorder:
    """A block of the model as it is, whose calls are noted: below ``first`` its new keys and
    values (through ``_Tap``), at ``first`` its input."""

    def __init__(self, block: Any, index: int, capture: Capture) -> None:
        self._block, self._index, self._capture = block, index, capture

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> Any:
        c = self._capture
        if self._index == c.first:
            c._close(x)
            return self._block(x, *args, **kwargs)
        if "cache" in kwargs:
            kwargs["cache"] = _Tap(kwargs["cache"], c._pending)
        elif len(args) >= 2:
            args = (args[0], _Tap(args[1], c._pending), *args[2:])
        return self._block(x, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


class Capture:
    """What ``capturing`` noted: one entry per model call, in call order. ``calls[i]`` is
    (hidden [B, L, D], kv [2 first, B, kv_heads, L, head_dim]); the caller notes which output row
    each batch row of the call belongs to (``rows``). ``problem`` says why nothing can be reused
    when the model's calls did not go as expected (its blocks do not all add keys to their cache,
    a row's tokens were not all fed): the update then runs every block."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.calls: list[tuple[mx.array, mx.array]] = []
        self.rows: list[list[int]] = []
        self.problem: str | None = None
        self._pending: list[tuple[mx.array, mx.array]] = []

    def _close(self, hidden: mx.array) -> None:
        pending, self._pending = self._pending, []
        if len(pending) != self.first:
            self.problem = f"{len(pending)} of the {self.first} blocks below added keys"
        if not self.problem:
            self.calls.append((hidden, mx.stack([k for k, _ in pending] + [v for _, v in pending])))

    def arrays(self) -> list[mx.array]:
        return [a for call in self.calls for a in call]

    def prompts(self, lengths: list[int]) -> list[States]:
        """Each prompt's states from the first call (the prefill: prompts right-padded)."""
        hidden, kv = self.calls[0]
        return [States(hidden[q, :n], kv[:, q, :, :n]) for q, n in enumerate(lengths)]

    def rows_states(self, counts: list[int]) -> list[States]:
        """Each output row's states over its first ``counts[r]`` decoded tokens: decode call c
        (c >= 1) fed each live row's c-th sampled token. Calls with the same batch rows are
        joined first, so a row costs a few slices, not one per token."""
        segments: list[tuple[list[int], int, States]] = []  # (batch rows, first call, states)
        start = 1
        for c in range(2, len(self.calls) + 1):
            if c == len(self.calls) or self.rows[c] != self.rows[start]:
                hidden = mx.concatenate([self.calls[i][0] for i in range(start, c)], axis=1)
                kv = mx.concatenate([self.calls[i][1] for i in range(start, c)], axis=3)
                segments.append((self.rows[start], start, States(hidden, kv)))
                start = c
        out = []
        for r, count in enumerate(counts):
            parts = []
            for rows, begin, seg in segments:
                if begin > count or r not in rows:
                    continue
                j, n = rows.index(r), min(seg.hidden.shape[1], count - begin + 1)
                parts.append(States(seg.hidden[j, :n], seg.kv[:, j, :, :n]))
            got = sum(len(p) for p in parts)
            if got != count:
                self.problem = f"row {r}: {got} of its {count} tokens were recorded"
                return []
            out.append(joined(parts) if parts else self.prompts([0])[0])  # no tokens: empty
        return out


@contextmanager
def capturing(model: Any, first: int) -> Iterator[Capture]:
    """Note, in every model call inside, the states ``Capture`` describes."""
    capture = Capture(first)
    layers = model.layers
    blocks = list(layers)
    try:
        for i in range(first + 1):
            layers[i] = _Recorder(blocks[i], i, capture)
        yield capture
    finally:
        layers[:] = blocks


# ---- the update side ----------------------------------------------------------------------------


class _Stand:
    """Block ``index`` below the first adapted one, in a pass that replays ``replay``."""

    def __init__(self, block: Any, index: int, replay: Replay) -> None:
        self._block, self._index, self._replay = block, index, replay

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        cache = kwargs.get("cache", args[1] if len(args) >= 2 else None)
        r, i = self._replay, self._index
        cache.update_and_fetch(r.kv[i], r.kv[r.first + i])
        return r.hidden if i == r.first - 1 else x

    def __getattr__(self, name: str) -> Any:
        return getattr(self._block, name)


@contextmanager
def replaying(model: Any, replay: Replay | None) -> Iterator[None]:
    """Inside, model calls take blocks 0 .. first - 1 from ``replay`` (None: run them)."""
    if replay is None:
        yield
        return
    layers = model.layers
    blocks = list(layers)
    try:
        for i in range(replay.first):
            layers[i] = _Stand(blocks[i], i, replay)
        yield
    finally:
        layers[:] = blocks
