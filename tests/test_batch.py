"""Prompts, answers, markers, rows and batches on real tokenizers (with/without BOS and template)."""

from __future__ import annotations

import mlx_lm
import numpy as np
import pytest
from tiny import CHATML_TEMPLATE

from nrt_mlx.errors import NrtError
from nrt_mlx.sequences import (
    ANSWER,
    DEFAULT_TEXT_MARKER,
    MARKER,
    PAD,
    PROMPT,
    THINK,
    AnswerMarker,
    Row,
    build_rows,
    collate,
    encode_answer,
    encode_prompt,
    resolve_marker,
    sft_rows,
)

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
]
CHATML_TEXT = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\nParis.<|im_end|>\n"
    "<|im_start|>user\nAnd of Spain?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PLAIN_TEXT = (
    "You are terse.\n\nUser: What is the capital of France?\n\nAssistant: Paris.\n\n"
    "User: And of Spain?\n\nAssistant:"
)


def _tokenizer(path):
    return mlx_lm.load(str(path))[1]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return _tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def bos_tok(tiny_bos_model_dir):
    return _tokenizer(tiny_bos_model_dir)


def _plain(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_prompt_with_template_keeps_system_and_earlier_turns(tok) -> None:
    ids = encode_prompt(tok, CHAT)
    assert ids == _plain(tok, CHATML_TEXT)
    assert tok.decode(ids) == CHATML_TEXT
    assert encode_prompt(tok, CHAT, think_prefix="Let me think.") == _plain(
        tok, CHATML_TEXT + "Let me think."
    )


def test_prompt_plain_string_is_a_user_turn(tok) -> None:
    want = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert encode_prompt(tok, "hello") == _plain(tok, want)


def test_prompt_bos_exactly_once(bos_tok) -> None:
    bos = bos_tok.bos_token_id
    ids = encode_prompt(bos_tok, CHAT)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1:] == _plain(bos_tok, CHATML_TEXT)


def test_prompt_template_writing_its_own_bos_gives_one_bos(tiny_bos_model_dir) -> None:
    tokenizer = _tokenizer(tiny_bos_model_dir)
    tokenizer._tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    ids = encode_prompt(tokenizer, CHAT)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_prompt_without_template(
    tiny_no_template_model_dir, tiny_bos_no_template_model_dir
) -> None:
    plain = _tokenizer(tiny_no_template_model_dir)
    assert plain.decode(encode_prompt(plain, CHAT)) == PLAIN_TEXT
    assert plain.bos_token_id is None
    bos = _tokenizer(tiny_bos_no_template_model_dir)
    ids = encode_prompt(bos, CHAT, think_prefix=" Hmm")
    assert ids[0] == bos.bos_token_id and ids.count(bos.bos_token_id) == 1
    assert ids[1:] == _plain(bos, PLAIN_TEXT + " Hmm")


def test_prompt_on_a_plain_hf_tokenizer(tok) -> None:
    assert encode_prompt(tok._tokenizer, CHAT) == _plain(tok, CHATML_TEXT)


def test_prompt_bad_messages(tok) -> None:
    with pytest.raises(NrtError, match="at least one message"):
        encode_prompt(tok, [])
    with pytest.raises(NrtError, match="last message is an assistant turn"):
        encode_prompt(tok, CHAT[:3])
    with pytest.raises(NrtError, match="message 0 must be a dict"):
        encode_prompt(tok, [{"role": "user"}])
    with pytest.raises(NrtError, match="no 'role'"):
        encode_prompt(tok, [{"content": "hi"}])


def test_answer_ends_with_eos_and_has_no_bos(tok, bos_tok) -> None:
    for tokenizer in (tok, bos_tok):
        ids = encode_answer(tokenizer, "Madrid is the capital.")
        assert ids == _plain(tokenizer, "Madrid is the capital.") + [tokenizer.eos_token_id]
        assert tokenizer.bos_token_id not in ids
    assert encode_answer(tok, "") == [tok.eos_token_id]
    with pytest.raises(NrtError, match="must be a string"):
        encode_answer(tok, None)


def test_auto_marker_is_an_unused_reserved_token(tok, tiny_no_template_model_dir) -> None:
    marker = resolve_marker(tok)
    assert marker == AnswerMarker("<|reserved_0|>", [3], True)
    assert resolve_marker(_tokenizer(tiny_no_template_model_dir)).ids == [3]


def test_auto_marker_skips_tokens_the_template_uses(tiny_model_dir) -> None:
    tokenizer = _tokenizer(tiny_model_dir)
    tokenizer._tokenizer.chat_template = CHATML_TEMPLATE + "{# <|reserved_0|> #}"
    assert resolve_marker(tokenizer).text == "<|reserved_1|>"
    tokenizer._tokenizer.chat_template = CHATML_TEMPLATE + "{# <|reserved_0|><|reserved_1|> #}"
    # Left: <|endoftext|> (pad), <|im_end|> (eos), <|im_start|> (template): a text marker.
    marker = resolve_marker(tokenizer)
    assert marker.text == DEFAULT_TEXT_MARKER and not marker.is_special
    assert marker.ids == _plain(tokenizer, DEFAULT_TEXT_MARKER)


def test_explicit_markers(tok) -> None:
    text = resolve_marker(tok, "\nAnswer:")
    assert text == AnswerMarker("\nAnswer:", _plain(tok, "\nAnswer:"), False)
    assert len(text.ids) > 1
    assert resolve_marker(tok, "<|reserved_1|>") == AnswerMarker("<|reserved_1|>", [4], True)
    with pytest.raises(NrtError, match="BOS/EOS/pad/unk"):
        resolve_marker(tok, "<|im_end|>")
    with pytest.raises(NrtError, match="empty"):
        resolve_marker(tok, "")


# --------------------------------------------------------------------------------------------
# Rows and batches
# --------------------------------------------------------------------------------------------

PROMPT_IDS = [11, 12, 13]
MARK = AnswerMarker("<m>", [3], True)
ANSWER_IDS = [40, 41, 2]


def _segments(row: Row, seg: int) -> list[int]:
    return [t for t, s in zip(row.tokens, row.segments) if s == seg]


def test_rows_layout_and_identical_answers(tok) -> None:
    prompt = encode_prompt(tok, CHAT)
    marker = resolve_marker(tok, "\nAnswer:")
    answer = encode_answer(tok, " Madrid")
    # Traces whose text would merge with the marker if the row were tokenized as one string.
    traces = [_plain(tok, "so the answer is"), _plain(tok, "Madrid"), []]
    rows = build_rows(prompt, traces, marker, answer, 5, [True, False, True], 512)
    assert len(rows) == 4 and [r.is_null for r in rows] == [False, False, False, True]
    for row, trace in zip(rows, traces + [[]]):
        assert row.tokens == prompt + trace + marker.ids + answer
        assert row.segments == (
            [PROMPT] * len(prompt)
            + [THINK] * len(trace)
            + [MARKER] * len(marker.ids)
            + [ANSWER] * len(answer)
        )
        assert _segments(row, ANSWER) == answer and row.question == 5
    assert [r.emitted_marker for r in rows] == [True, False, True, False]


def test_truncation_cuts_think_never_answer() -> None:
    traces = [list(range(100, 110)), [7, 8]]
    rows = build_rows(
        PROMPT_IDS,
        traces,
        MARK,
        ANSWER_IDS,
        0,
        [True, True],
        10,
    )
    assert [len(r.tokens) for r in rows] == [10, 9, 7]
    assert _segments(rows[0], THINK) == [100, 101, 102]
    assert all(_segments(r, ANSWER) == ANSWER_IDS for r in rows)
    # The cut row's marker no longer follows what was sampled: it gets the format term.
    assert [r.emitted_marker for r in rows] == [False, True, False]
    with pytest.raises(NrtError, match=r"= 7 tokens exceed max_length=6"):
        build_rows(PROMPT_IDS, traces, MARK, ANSWER_IDS, 0, [True, True], 6)


def test_build_rows_bad_inputs() -> None:
    with pytest.raises(NrtError, match="2 flags for 1 traces"):
        build_rows(PROMPT_IDS, [[5]], MARK, ANSWER_IDS, 0, [True, False], 64)
    with pytest.raises(NrtError, match="prompt is empty"):
        build_rows([], [[5]], MARK, ANSWER_IDS, 0, [True], 64)
    with pytest.raises(NrtError, match="answer is empty"):
        build_rows(PROMPT_IDS, [[5]], MARK, [], 0, [True], 64)


def test_sft_rows() -> None:
    (row,) = sft_rows(PROMPT_IDS, ANSWER_IDS, 3, 6)
    assert row.tokens == PROMPT_IDS + ANSWER_IDS and row.segments == [PROMPT] * 3 + [ANSWER] * 3
    assert not row.is_null and row.question == 3
    with pytest.raises(NrtError, match="exceed max_length=5"):
        sft_rows(PROMPT_IDS, ANSWER_IDS, 3, 5)


def _two_questions() -> list[Row]:
    rows = build_rows(
        PROMPT_IDS,
        [[20, 21, 22], [23]],
        MARK,
        ANSWER_IDS,
        0,
        [True, False],
        64,
    )
    rows += build_rows([11, 14], [[30, 31]], MARK, [50, 2], 1, [True], 64)
    return rows


def test_collate() -> None:
    rows = _two_questions()
    batch = collate(rows, pad_id=0)
    tokens, segments = np.array(batch.tokens), np.array(batch.segments)
    assert tokens.shape == (5, 10) and tokens.dtype == np.int32
    np.testing.assert_array_equal(np.array(batch.lengths), [len(r.tokens) for r in rows])
    for b, row in enumerate(rows):
        assert tokens[b, : len(row.tokens)].tolist() == row.tokens
        assert (tokens[b, len(row.tokens) :] == 0).all() and (
            segments[b, len(row.tokens) :] == PAD
        ).all()
        n = len(_segments(row, ANSWER))
        positions = np.array(batch.answer_positions)[b]
        assert tokens[b, positions[:n]].tolist() == _segments(row, ANSWER)
        assert (positions[n:] == 0).all()
        assert np.array(batch.answer_mask)[b].tolist() == [1.0] * n + [0.0] * (3 - n)
    assert np.array(batch.question).tolist() == [0, 0, 0, 1, 1]
    assert np.array(batch.is_null).tolist() == [False, False, True, False, True]
    assert np.array(batch.emitted_marker).tolist() == [True, False, False, True, False]
    assert np.array(batch.null_row).tolist() == [2, 2, 2, 4, 4]
    assert collate(rows, pad_id=0, length=16).tokens.shape == (5, 16)
    assert batch.old_logprobs is None


def test_collate_bad_inputs() -> None:
    rows = _two_questions()
    with pytest.raises(NrtError, match="empty list"):
        collate([], 0)
    with pytest.raises(NrtError, match="two null-think rows"):
        collate(rows + [rows[2]], 0)
    other = build_rows(PROMPT_IDS, [[20]], MARK, [40, 42, 2], 0, [True], 64)[0]
    with pytest.raises(NrtError, match="question 0 carry different answer ids"):
        collate(rows + [other], 0)
    with pytest.raises(NrtError, match="row 0 has 2 tokens and 1 segment ids"):
        collate([Row([1, 2], [0], 0, False, False)], 0)
