"""Training rows and padded batches (docs/NRT.md, "Sequences")::

    trace row k:     [prompt(x) | z_k | m | y* EOS]     k = 1..K
    null-think row:  [prompt(x) |       m | y* EOS]     one per question, placed last

Each segment was tokenized on its own and the ids are concatenated, so the answer ids are identical
in every row of a question (a BPE merge across z, m and y* would break the per-token comparison with
the null-think row). A row that is too long loses think tokens from the end of z, never answer
tokens. ``collate`` checks everything the objective relies on, once, on the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from nrt_mlx.errors import NrtError
from nrt_mlx.rollout import Trace

# Segment ids of every token of a row.
PROMPT, THINK, MARKER, ANSWER, PAD = 0, 1, 2, 3, -1


@dataclass
class Row:
    """One sequence of a batch, with a segment id per token."""

    tokens: list[int]
    segments: list[int]  # same length, PROMPT/THINK/MARKER/ANSWER
    question: int  # group id of the question within the batch
    is_null: bool
    emitted_marker: bool  # the sampled trace ended with the marker itself (False for null rows)


def _row(
    prompt: list[int], think: list[int], marker: list[int], answer: list[int], question: int,
    is_null: bool = False, emitted: bool = False,
) -> Row:  # fmt: skip
    parts = ((prompt, PROMPT), (think, THINK), (marker, MARKER), (answer, ANSWER))
    tokens = [int(t) for ids, _ in parts for t in ids]
    segments = [seg for ids, seg in parts for _ in ids]
    return Row(tokens, segments, question, is_null, emitted)


def _think_room(prompt: list[int], marker: list[int], answer: list[int], max_length: int) -> int:
    """Room left for think tokens; raises when prompt + marker + answer alone do not fit."""
    if not prompt:
        raise NrtError("the prompt is empty; the first token of a row has nothing to predict it")
    if not answer:
        raise NrtError("the answer is empty; it needs at least the EOS id (use encode_answer)")
    fixed = len(prompt) + len(marker) + len(answer)
    if fixed > max_length:
        raise NrtError(
            f"prompt ({len(prompt)} tokens) + marker ({len(marker)}) + answer ({len(answer)}) = "
            f"{fixed} tokens exceed max_length={max_length}; raise the length limit or shorten the "
            f"question/answer (think tokens are cut, answers never)"
        )
    return max_length - fixed


def build_rows(
    prompt: Sequence[int],
    traces: Sequence[Trace],
    marker: Sequence[int],
    answer: Sequence[int],
    question: int,
    max_length: int | None = None,
) -> list[Row]:
    """K trace rows ``[prompt | z_k | m | y* EOS]``, then ONE null-think row ``[prompt | m | y* EOS]``.

    ``answer`` already ends with EOS. A row longer than ``max_length`` (None: no limit) keeps only
    the first think tokens that fit; its marker then no longer follows what was sampled, so the row
    counts as not having emitted it (like a trace cut by the think limit) and gets the format term.
    """
    prompt, marker, answer = list(prompt), list(marker), list(answer)
    if not marker:
        raise NrtError("the answer marker has no token ids")
    longest = max((len(t.tokens) for t in traces), default=0)
    limit = (
        max_length if max_length is not None else len(prompt) + longest + len(marker) + len(answer)
    )
    room = _think_room(prompt, marker, answer, limit)
    rows = [
        _row(
            prompt,
            t.tokens[:room],
            marker,
            answer,
            question,
            False,
            t.emitted_marker and len(t.tokens) <= room,
        )
        for t in traces
    ]
    return rows + [_row(prompt, [], marker, answer, question, is_null=True)]


def sft_rows(
    prompt: Sequence[int], answer: Sequence[int], question: int, max_length: int
) -> list[Row]:
    """One row ``[prompt | y* EOS]`` for plain supervised fine-tuning (answer tokens are the targets)."""
    _think_room(list(prompt), [], list(answer), max_length)
    return [_row(list(prompt), [], [], list(answer), question)]


@dataclass
class Batch:
    """Right-padded rows as MLX arrays: B rows, L tokens, T answer tokens (the longest answer)."""

    tokens: mx.array  # [B, L] int32, right-padded with the pad id
    segments: mx.array  # [B, L] int32, PAD (-1) on padding
    answer_positions: mx.array  # [B, T] int32: where in `tokens` the i-th answer token is (0: pad)
    answer_mask: mx.array  # [B, T] float32, 1 for real answer tokens (EOS included)
    question: mx.array  # [B] int32 group ids
    is_null: mx.array  # [B] bool
    emitted_marker: mx.array  # [B] bool
    null_row: mx.array  # [B] int32: the null-think row of the row's question (0 without one)
    num_tokens: int  # real (unpadded) tokens, for throughput figures
    think_tokens: int  # tokens of the traces z_k in the rows
    response_width: int  # longest [z | m | y* EOS] of a trace row (the released loss's W)
    trace_rows: int  # rows that are not null-think rows
    # [B, L] log p_old(tokens) under the weights that sampled the batch: set for several updates
    # per rollout (objective.reference_pass), it turns on the clipped ratio.
    old_logprobs: mx.array | None = None


def _null_rows(rows: list[Row]) -> np.ndarray:
    """Index of each row's null-think row; a batch with any null row needs one per question."""
    null_of: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row.is_null:
            if row.question in null_of:
                raise NrtError(f"question {row.question} has two null-think rows in the batch")
            null_of[row.question] = i
    if null_of:
        missing = sorted({r.question for r in rows} - set(null_of))
        if missing:
            raise NrtError(
                f"question {missing[0]} has no null-think row in the batch; the NRT loss needs one "
                f"per question (build_rows adds it, and micro-batches must keep whole questions)"
            )
        if all(r.is_null for r in rows):
            raise NrtError("the batch has no trace rows, only null-think rows")
    return np.array([null_of.get(r.question, 0) for r in rows], dtype=np.int32)


def collate(rows: list[Row], pad_id: int) -> Batch:
    """Right-pad rows into a Batch, after checking what the objective relies on."""
    if not rows:
        raise NrtError("cannot collate an empty list of rows")
    answers = []
    for i, row in enumerate(rows):
        if len(row.tokens) != len(row.segments) or not row.tokens:
            raise NrtError(
                f"row {i} has {len(row.tokens)} tokens and {len(row.segments)} segment ids"
            )
        answers.append([j for j, s in enumerate(row.segments) if s == ANSWER])
    seen: dict[int, list[int]] = {}
    for row, where in zip(rows, answers):
        if seen.setdefault(row.question, [row.tokens[j] for j in where]) != [
            row.tokens[j] for j in where
        ]:
            raise NrtError(f"rows of question {row.question} carry different answer ids")
    null_row = _null_rows(rows)
    big_l, big_t = max(len(r.tokens) for r in rows), max(1, max(len(a) for a in answers))
    tokens = np.full((len(rows), big_l), pad_id, dtype=np.int32)
    segments = np.full((len(rows), big_l), PAD, dtype=np.int32)
    positions = np.zeros((len(rows), big_t), dtype=np.int32)
    mask = np.zeros((len(rows), big_t), dtype=np.float32)
    for b, row in enumerate(rows):
        tokens[b, : len(row.tokens)] = row.tokens
        segments[b, : len(row.segments)] = row.segments
        positions[b, : len(answers[b])] = answers[b]
        mask[b, : len(answers[b])] = 1.0
    return Batch(
        tokens=mx.array(tokens),
        segments=mx.array(segments),
        answer_positions=mx.array(positions),
        answer_mask=mx.array(mask),
        question=mx.array(np.array([r.question for r in rows], dtype=np.int32)),
        is_null=mx.array(np.array([r.is_null for r in rows], dtype=bool)),
        emitted_marker=mx.array(np.array([r.emitted_marker for r in rows], dtype=bool)),
        null_row=mx.array(null_row),
        num_tokens=sum(len(r.tokens) for r in rows),
        think_tokens=int((segments == THINK).sum()),
        response_width=max(
            (sum(s != PROMPT for s in r.segments) for r in rows if not r.is_null), default=0
        ),
        trace_rows=sum(not r.is_null for r in rows),
    )
