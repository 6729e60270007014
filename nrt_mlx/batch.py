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
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace

import mlx.core as mx
import numpy as np

from nrt_mlx import reuse
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
    # the rollout's states below the adapters (Trace.states), for a shared-prompt batch
    states: tuple[reuse.States, reuse.States] | None = field(default=None, repr=False)


def _row(
    prompt: list[int], think: list[int], marker: list[int], answer: list[int], question: int,
    is_null: bool = False, emitted: bool = False,
    states: tuple[reuse.States, reuse.States] | None = None,
) -> Row:  # fmt: skip
    parts = ((prompt, PROMPT), (think, THINK), (marker, MARKER), (answer, ANSWER))
    tokens = [int(t) for ids, _ in parts for t in ids]
    segments = [seg for ids, seg in parts for _ in ids]
    return Row(tokens, segments, question, is_null, emitted, states)


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
            t.states,
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


@dataclass(frozen=True)
class Pass:
    """Rows of a shared-prompt batch that run through the model together (nrt_mlx.prefix): their
    think part ``[last prompt token | z]`` and, for trace rows, their answer part ``[m | y*]``
    (each without the row's last token; targets are the tokens one further). Without ``grad``
    the rows' log-probs are constants of the loss (the null-think rows, which run whole as their
    think part), so no backward runs for them."""

    rows: mx.array  # [n] int32 rows of the batch
    questions: mx.array  # [n] int32 each row's prompt in Batch.prompts
    think: mx.array  # [n, Wa] int32 inputs, right-padded
    think_targets: mx.array  # [n, Wa] int32
    think_valid: mx.array  # [n, Wa] bool: real think inputs
    answer: mx.array | None  # [n, Wb] int32 inputs, right-padded (None: null-think rows)
    answer_targets: mx.array | None  # [n, Wb] int32
    columns: mx.array  # [n, L]: column of [think | answer | 0] holding continuation token j
    grad: bool
    replay: reuse.Replay | None = None  # the think part's states below the adapters


@dataclass
class Batch:
    """Right-padded rows as MLX arrays: B rows, L tokens, T answer tokens (the longest answer).

    In the shared-prompt layout (``collate(share_prompt=True)``) ``tokens``, ``segments`` and
    ``answer_positions`` hold each row's continuation after its prompt, and the prompts are held
    once per question (``prompts``), for ``nrt_mlx.prefix``.
    """

    tokens: mx.array  # [B, L] int32, right-padded with the pad id
    segments: mx.array  # [B, L] int32, PAD (-1) on padding
    answer_positions: mx.array  # [B, T] int32: where in `tokens` the i-th answer token is (0: pad)
    answer_mask: mx.array  # [B, T] float32, 1 for real answer tokens (EOS included)
    question: mx.array  # [B] int32 group ids
    is_null: mx.array  # [B] bool
    emitted_marker: mx.array  # [B] bool
    null_row: mx.array  # [B] int32: the null-think row of the row's question (0 without one)
    num_tokens: int  # tokens the model runs (unpadded), for throughput figures
    think_tokens: int  # tokens of the traces z_k in the rows
    response_width: int  # longest [z | m | y* EOS] of a trace row (the released loss's W)
    trace_rows: int  # rows that are not null-think rows
    # [B, L] log p_old(tokens) under the weights that sampled the batch: set for several updates
    # per rollout (objective.reference_pass), it turns on the clipped ratio.
    old_logprobs: mx.array | None = None
    # The shared-prompt layout:
    prompts: mx.array | None = None  # [Q, P] each question's prompt, left-padded
    prompt_valid: mx.array | None = None  # [Q, P] bool: real prompt tokens
    prompt_of_row: mx.array | None = None  # [B] int32: the row's question in `prompts`
    passes: tuple[Pass, ...] = ()
    unpermute: mx.array | None = None  # [B]: where row b is in the passes' concatenated output
    prompt_replay: reuse.Replay | None = None  # the prompt pass's states below the adapters


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


def _check_rows(rows: list[Row]) -> list[list[int]]:
    """Each row's answer positions, after checking the rows agree on their question's answer."""
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
    return answers


def _split_prompts(rows: list[Row]) -> tuple[list[list[int]], list[int], list[Row]]:
    """(each question's prompt, in order of first appearance; the index of each row's question
    there; each row's continuation after the prompt)."""
    prompts: dict[int, list[int]] = {}
    body = []
    for row in rows:
        cut = next((j for j, s in enumerate(row.segments) if s != PROMPT), len(row.segments))
        if cut == len(row.segments):
            raise NrtError(f"a row of question {row.question} has nothing after its prompt")
        if prompts.setdefault(row.question, row.tokens[:cut]) != row.tokens[:cut]:
            raise NrtError(f"rows of question {row.question} carry different prompts")
        body.append(dataclass_replace(row, tokens=row.tokens[cut:], segments=row.segments[cut:]))
    order = {q: i for i, q in enumerate(prompts)}
    return list(prompts.values()), [order[r.question] for r in rows], body


# A further pass must save this share of the padded tokens of running the rows in one pass.
PASS_SAVING = 0.125
MAX_PASSES = 4


def split_passes(lengths: Sequence[int]) -> list[list[int]]:
    """Groups of row indices, longest rows first, each group padded to its own longest row: the
    split into at most MAX_PASSES groups with the fewest padded tokens, where each group after the
    first must save PASS_SAVING of the one-pass total (a pass costs a model call)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    if n == 0:
        return []
    penalty = PASS_SAVING * n * lengths[order[0]]
    # best[k][j]: cost of rows order[j:] in k passes; a pass over order[j:i] costs (i - j) * len_j.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(MAX_PASSES + 1)]
    cut: list[list[int]] = [[n] * (n + 1) for _ in range(MAX_PASSES + 1)]
    for k in range(MAX_PASSES + 1):
        best[k][n] = 0.0
    for k in range(1, MAX_PASSES + 1):
        for j in range(n - 1, -1, -1):
            for i in range(j + 1, n + 1):
                cost = (i - j) * lengths[order[j]] + (penalty if j else 0.0) + best[k - 1][i]
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, MAX_PASSES + 1), key=lambda k: (best[k][0], k))
    groups, j = [], 0
    while j < n:
        i = cut[k][j]
        groups.append(order[j:i])
        j, k = i, k - 1
    return groups


def _pass(
    body: list[Row], rows: list[int], questions: list[int], last: list[int], pad_id: int,
    width: int, grad: bool,
) -> Pass:  # fmt: skip
    """One ``Pass`` of ``rows``: trace rows split after their think tokens, null rows whole."""
    n = len(rows)
    inputs = [[last[questions[i]], *body[i].tokens[:-1]] for i in rows]
    split = [
        len(inputs[j]) if not grad else 1 + body[i].segments.count(THINK)
        for j, i in enumerate(rows)
    ]
    wa = max(split)
    wb = max(len(x) - s for x, s in zip(inputs, split))
    think = np.full((n, wa), pad_id, dtype=np.int32)
    think_targets = np.full((n, wa), pad_id, dtype=np.int32)
    answer = np.full((n, max(wb, 1)), pad_id, dtype=np.int32)
    answer_targets = np.full((n, max(wb, 1)), pad_id, dtype=np.int32)
    columns = np.full((n, width), wa + wb, dtype=np.int32)  # the zero column
    for j, (i, x, s) in enumerate(zip(rows, inputs, split)):
        targets = body[i].tokens
        think[j, :s], think_targets[j, :s] = x[:s], targets[:s]
        answer[j, : len(x) - s], answer_targets[j, : len(x) - s] = x[s:], targets[s:]
        columns[j, : len(x)] = np.concatenate([np.arange(s), wa + np.arange(len(x) - s)])
    replay = None
    if grad and all(body[i].states is not None for i in rows):
        kept = []
        for i, s in zip(rows, split):
            before, after = body[i].states  # the prompt's, the row's think tokens'
            last = before.take(len(before) - 1, len(before))
            kept.append(reuse.joined([last, after.take(0, s - 1)]))
        replay = reuse.layout(kept, wa, left=False)
    return Pass(
        rows=mx.array(np.array(rows, dtype=np.int32)),
        questions=mx.array(np.array([questions[i] for i in rows], dtype=np.int32)),
        think=mx.array(think),
        think_targets=mx.array(think_targets),
        think_valid=mx.array(np.arange(wa)[None] < np.array(split)[:, None]),
        answer=mx.array(answer) if wb else None,
        answer_targets=mx.array(answer_targets) if wb else None,
        columns=mx.array(columns),
        grad=grad,
        replay=replay,
    )


def _passes(
    body: list[Row], questions: list[int], last: list[int], pad_id: int
) -> tuple[tuple[Pass, ...], mx.array]:
    """Trace rows in groups of similar think lengths (``split_passes``), then the null-think rows
    without gradient; and where each row lands in the passes' concatenated output."""
    width = max(len(r.tokens) for r in body)
    trace = [i for i, r in enumerate(body) if not r.is_null]
    null = [i for i, r in enumerate(body) if r.is_null]
    think = [body[i].segments.count(THINK) for i in trace]
    groups = [([trace[i] for i in g], True) for g in split_passes(think)]
    groups += [(null, False)] if null else []
    passes = tuple(_pass(body, g, questions, last, pad_id, width, grad) for g, grad in groups)
    order = np.concatenate([g for g, _ in groups])
    return passes, mx.array(np.argsort(order).astype(np.int32))


def _prompt_states(body: list[Row], index: list[int], questions: int) -> list | None:
    """Each question's prompt states, when every trace row brought the rollout's states."""
    kept: list = [None] * questions
    for row, q in zip(body, index):
        if row.is_null:
            continue
        if row.states is None:
            return None
        kept[q] = row.states[0]
    return None if any(k is None for k in kept) else kept


def collate(rows: list[Row], pad_id: int, share_prompt: bool = False) -> Batch:
    """Right-pad rows into a Batch, after checking what the objective relies on; with
    ``share_prompt``, in the shared-prompt layout (each question's prompt once, the rows' tokens
    after it)."""
    if not rows:
        raise NrtError("cannot collate an empty list of rows")
    _check_rows(rows)
    null_row = _null_rows(rows)
    shared: dict = {}
    body = rows
    if share_prompt:
        prompts, index, body = _split_prompts(rows)
        width = max(len(p) for p in prompts)
        padded = np.full((len(prompts), width), pad_id, dtype=np.int32)
        for q, p in enumerate(prompts):
            padded[q, width - len(p) :] = p
        passes, unpermute = _passes(body, index, [p[-1] for p in prompts], pad_id)
        kept = _prompt_states(body, index, len(prompts))
        shared = dict(
            prompt_replay=None
            if kept is None
            else reuse.layout([k.take(0, len(k) - 1) for k in kept], width - 1, left=True),
            prompts=mx.array(padded),
            prompt_valid=mx.array(
                np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None]
            ),
            prompt_of_row=mx.array(np.array(index, dtype=np.int32)),
            passes=passes,
            unpermute=unpermute,
        )
    answers = [[j for j, s in enumerate(r.segments) if s == ANSWER] for r in body]
    big_l, big_t = max(len(r.tokens) for r in body), max(1, max(len(a) for a in answers))
    tokens = np.full((len(body), big_l), pad_id, dtype=np.int32)
    segments = np.full((len(body), big_l), PAD, dtype=np.int32)
    positions = np.zeros((len(body), big_t), dtype=np.int32)
    mask = np.zeros((len(body), big_t), dtype=np.float32)
    for b, row in enumerate(body):
        tokens[b, : len(row.tokens)] = row.tokens
        segments[b, : len(row.segments)] = row.segments
        positions[b, : len(answers[b])] = answers[b]
        mask[b, : len(answers[b])] = 1.0
    # With a shared prompt the model runs each prompt once, less its last token, which starts
    # every row's continuation instead.
    run = sum(len(p) - 1 for p in prompts) if share_prompt else 0
    return Batch(
        tokens=mx.array(tokens),
        segments=mx.array(segments),
        answer_positions=mx.array(positions),
        answer_mask=mx.array(mask),
        question=mx.array(np.array([r.question for r in rows], dtype=np.int32)),
        is_null=mx.array(np.array([r.is_null for r in rows], dtype=bool)),
        emitted_marker=mx.array(np.array([r.emitted_marker for r in rows], dtype=bool)),
        null_row=mx.array(null_row),
        num_tokens=run + sum(len(r.tokens) for r in body),
        think_tokens=int((segments == THINK).sum()),
        response_width=max(
            (sum(s != PROMPT for s in r.segments) for r in rows if not r.is_null), default=0
        ),
        trace_rows=sum(not r.is_null for r in rows),
        **shared,
    )
