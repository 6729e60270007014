"""Rows (trace, null-think, SFT), truncation, and collated batches with their checks."""

from __future__ import annotations

import mlx_lm
import numpy as np
import pytest

from nrt_mlx.batch import ANSWER, MARKER, PAD, PROMPT, THINK, Row, build_rows, collate, sft_rows
from nrt_mlx.errors import NrtError
from nrt_mlx.rollout import Trace
from nrt_mlx.vocab import Vocabulary

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]

PROMPT_IDS = [11, 12, 13]
MARK = [3]
ANSWER_IDS = [40, 41, 2]


@pytest.fixture(scope="module")
def vocab(tiny_model_dir):
    return Vocabulary.of(mlx_lm.load(str(tiny_model_dir))[1], "\nAnswer:")


def _segments(row: Row, seg: int) -> list[int]:
    return [t for t, s in zip(row.tokens, row.segments) if s == seg]


def test_rows_layout_and_identical_answers(vocab) -> None:
    prompt = vocab.encode_prompt(CHAT)
    marker = vocab.marker.ids
    assert len(marker) > 1  # a text marker: its ids could merge with a trace's
    answer = vocab.encode_answer(" Madrid")
    # Traces whose text would merge with the marker if the row were tokenized as one string.
    thinks = [vocab.encode_text("so the answer is"), vocab.encode_text("Madrid"), []]
    traces = [Trace(z, emitted) for z, emitted in zip(thinks, [True, False, True])]
    for max_length in (512, None):
        rows = build_rows(prompt, traces, marker, answer, 5, max_length)
        assert len(rows) == 4 and [r.is_null for r in rows] == [False, False, False, True]
        for row, think in zip(rows, thinks + [[]]):
            assert row.tokens == prompt + think + marker + answer
            assert row.segments == (
                [PROMPT] * len(prompt)
                + [THINK] * len(think)
                + [MARKER] * len(marker)
                + [ANSWER] * len(answer)
            )
            assert _segments(row, ANSWER) == answer and row.question == 5
        assert [r.emitted_marker for r in rows] == [True, False, True, False]


def test_truncation_cuts_think_never_answer() -> None:
    traces = [Trace(list(range(100, 110)), True), Trace([7, 8], True)]
    rows = build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0, 10)
    assert [len(r.tokens) for r in rows] == [10, 9, 7]
    assert _segments(rows[0], THINK) == [100, 101, 102]
    assert all(_segments(r, ANSWER) == ANSWER_IDS for r in rows)
    # The cut row's marker no longer follows what was sampled: it gets the format term.
    assert [r.emitted_marker for r in rows] == [False, True, False]
    assert traces[0].tokens == list(range(100, 110))  # the trace itself is not cut
    with pytest.raises(NrtError, match=r"= 7 tokens exceed max_length=6"):
        build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0, 6)


def test_truncation_boundary_and_no_limit() -> None:
    traces = [Trace([100, 101, 102], True), Trace(list(range(100, 110)), True)]
    # Room for exactly 3 think tokens: the first trace fits whole and keeps its marker.
    rows = build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0, 10)
    assert [len(r.tokens) for r in rows] == [10, 10, 7]
    assert [r.emitted_marker for r in rows] == [True, False, False]
    # max_length=None never cuts.
    rows = build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0)
    assert [_segments(r, THINK) for r in rows] == [[100, 101, 102], list(range(100, 110)), []]
    assert [r.emitted_marker for r in rows] == [True, True, False]
    # No traces at all: only the null-think row.
    (null,) = build_rows(PROMPT_IDS, [], MARK, ANSWER_IDS, 4)
    assert null.is_null and null.question == 4
    assert null.tokens == PROMPT_IDS + MARK + ANSWER_IDS


def test_build_rows_bad_inputs() -> None:
    for max_length in (64, None):
        with pytest.raises(NrtError, match="prompt is empty"):
            build_rows([], [Trace([5], True)], MARK, ANSWER_IDS, 0, max_length)
        with pytest.raises(NrtError, match="answer is empty"):
            build_rows(PROMPT_IDS, [Trace([5], True)], MARK, [], 0, max_length)
        with pytest.raises(NrtError, match="marker has no token ids"):
            build_rows(PROMPT_IDS, [Trace([5], True)], [], ANSWER_IDS, 0, max_length)


def test_sft_rows() -> None:
    (row,) = sft_rows(PROMPT_IDS, ANSWER_IDS, 3, 6)
    assert row.tokens == PROMPT_IDS + ANSWER_IDS and row.segments == [PROMPT] * 3 + [ANSWER] * 3
    assert not row.is_null and not row.emitted_marker and row.question == 3
    with pytest.raises(NrtError, match="exceed max_length=5"):
        sft_rows(PROMPT_IDS, ANSWER_IDS, 3, 5)
    with pytest.raises(NrtError, match="prompt is empty"):
        sft_rows([], ANSWER_IDS, 3, 64)


def _two_questions() -> list[Row]:
    """Question 0: traces of 3 and 1 tokens, then its null row; question 1: one trace of 2."""
    traces = [Trace([20, 21, 22], True), Trace([23], False)]
    rows = build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0, 64)
    rows += build_rows([11, 14], [Trace([30, 31], True)], MARK, [50, 2], 1, 64)
    return rows


def test_collate() -> None:
    rows = _two_questions()
    batch = collate(rows, pad_id=0)
    tokens, segments = np.array(batch.tokens), np.array(batch.segments)
    assert tokens.shape == (5, 10) and tokens.dtype == np.int32
    assert segments.dtype == np.int32
    for b, row in enumerate(rows):
        n_tokens = len(row.tokens)
        assert tokens[b, :n_tokens].tolist() == row.tokens
        assert segments[b, :n_tokens].tolist() == row.segments
        assert (tokens[b, n_tokens:] == 0).all() and (segments[b, n_tokens:] == PAD).all()
        n = len(_segments(row, ANSWER))
        positions = np.array(batch.answer_positions)[b]
        assert tokens[b, positions[:n]].tolist() == _segments(row, ANSWER)
        assert (positions[n:] == 0).all()
        assert np.array(batch.answer_mask)[b].tolist() == [1.0] * n + [0.0] * (3 - n)
    assert np.array(batch.question).tolist() == [0, 0, 0, 1, 1]
    assert np.array(batch.is_null).tolist() == [False, False, True, False, True]
    assert np.array(batch.emitted_marker).tolist() == [True, False, False, True, False]
    assert np.array(batch.null_row).tolist() == [2, 2, 2, 4, 4]
    assert batch.old_logprobs is None


def test_collate_pads_with_the_pad_id() -> None:
    rows = _two_questions()
    tokens = np.array(collate(rows, pad_id=7).tokens)
    for b, row in enumerate(rows):
        assert (tokens[b, len(row.tokens) :] == 7).all()
    assert (tokens == 7).sum() == tokens.size - sum(len(r.tokens) for r in rows)


def test_collate_host_counts() -> None:
    rows = _two_questions()
    batch = collate(rows, pad_id=0)
    # Rows of 10, 8, 7 (null) and 7, 5 (null) tokens; traces of 3, 1 and 2 think tokens.
    assert [len(r.tokens) for r in rows] == [10, 8, 7, 7, 5]
    assert batch.num_tokens == 37 == int((np.array(batch.segments) != PAD).sum())
    assert batch.think_tokens == 6
    assert batch.trace_rows == 3
    assert all(type(x) is int for x in (batch.num_tokens, batch.think_tokens, batch.trace_rows))
    # Counts follow the rows of the batch, not the padded shape.
    one = collate(rows[3:], pad_id=0)
    assert (one.num_tokens, one.think_tokens, one.trace_rows) == (12, 2, 1)


def test_collate_without_null_rows() -> None:
    # SFT rows: no null-think rows, so null_row is 0 everywhere and every row is a trace row.
    rows = sft_rows(PROMPT_IDS, ANSWER_IDS, 0, 64) + sft_rows([11, 14], [50, 2], 1, 64)
    batch = collate(rows, pad_id=0)
    assert np.array(batch.null_row).tolist() == [0, 0]
    assert np.array(batch.is_null).tolist() == [False, False]
    assert (batch.num_tokens, batch.think_tokens, batch.trace_rows) == (10, 0, 2)
    assert np.array(batch.answer_mask).tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
    # Trace rows without their null rows also collate (nothing to check against).
    traces = _two_questions()
    batch = collate([traces[0], traces[1], traces[3]], pad_id=0)
    assert np.array(batch.null_row).tolist() == [0, 0, 0]
    assert batch.trace_rows == 3


def test_collate_bad_inputs() -> None:
    rows = _two_questions()
    with pytest.raises(NrtError, match="empty list"):
        collate([], 0)
    with pytest.raises(NrtError, match="question 0 has two null-think rows"):
        collate(rows + [rows[2]], 0)
    other = build_rows(PROMPT_IDS, [Trace([20], True)], MARK, [40, 42, 2], 0, 64)[0]
    with pytest.raises(NrtError, match="question 0 carry different answer ids"):
        collate(rows + [other], 0)
    with pytest.raises(NrtError, match="row 0 has 2 tokens and 1 segment ids"):
        collate([Row([1, 2], [0], 0, False, False)], 0)
    with pytest.raises(NrtError, match="row 0 has 0 tokens and 0 segment ids"):
        collate([Row([], [], 0, False, False)], 0)


def test_collate_needs_a_null_row_per_question() -> None:
    rows = _two_questions()
    # Once any row is a null-think row, every question of the batch needs its own.
    with pytest.raises(NrtError, match="question 0 has no null-think row in the batch"):
        collate(rows[:2] + rows[3:], 0)
    with pytest.raises(NrtError, match="question 1 has no null-think row in the batch"):
        collate(rows[:4], 0)
    # Whole questions in any order are fine.
    batch = collate(rows[3:] + rows[:3], 0)
    assert np.array(batch.null_row).tolist() == [1, 1, 4, 4, 4]


def test_collate_needs_a_trace_row() -> None:
    rows = _two_questions()
    with pytest.raises(NrtError, match="the batch has no trace rows, only null-think rows"):
        collate([rows[2]], 0)
    with pytest.raises(NrtError, match="no trace rows, only null-think rows"):
        collate([rows[2], rows[4]], 0)
    # One question with no traces is fine next to another that has some.
    (alone,) = build_rows([11, 15], [], MARK, [60, 2], 2)
    batch = collate(rows + [alone], 0)
    assert np.array(batch.null_row).tolist() == [2, 2, 2, 4, 4, 5]
    assert batch.trace_rows == 3
