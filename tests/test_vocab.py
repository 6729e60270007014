"""Prompts, answers and markers on real tokenizers (with/without BOS and template)."""

from __future__ import annotations

import mlx_lm
import pytest
from tiny import CHATML_TEMPLATE

from nrt_mlx.errors import NrtError
from nrt_mlx.vocab import DEFAULT_TEXT_MARKER, AnswerMarker, Vocabulary, resolve_marker

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


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocabulary.of(tok)


@pytest.fixture(scope="module")
def bos_vocab(bos_tok):
    return Vocabulary.of(bos_tok)


def _plain(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_vocabulary_ids(tok, vocab) -> None:
    # tiny.py: <|endoftext|> (0) is the pad token, <|im_end|> (2) the EOS.
    assert vocab.tokenizer is tok
    assert (vocab.eos_id, vocab.pad_id, vocab.eos_ids) == (2, 0, frozenset({2}))
    assert vocab.marker == resolve_marker(tok)
    ids = vocab.encode_text("the capital of France")
    assert ids == _plain(tok, "the capital of France")
    assert vocab.decode(ids) == "the capital of France"


def test_vocabulary_pad_falls_back_to_eos(tiny_model_dir) -> None:
    tokenizer = _tokenizer(tiny_model_dir)
    tokenizer._tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    assert Vocabulary.of(tokenizer).pad_id == tokenizer.eos_token_id == 2


def test_prompt_with_template_keeps_system_and_earlier_turns(tok, vocab) -> None:
    ids = vocab.encode_prompt(CHAT)
    assert ids == _plain(tok, CHATML_TEXT)
    assert tok.decode(ids) == CHATML_TEXT
    assert vocab.encode_prompt(CHAT, think_prefix="Let me think.") == _plain(
        tok, CHATML_TEXT + "Let me think."
    )


def test_prompt_plain_string_is_a_user_turn(tok, vocab) -> None:
    want = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert vocab.encode_prompt("hello") == _plain(tok, want)


def test_prompt_bos_exactly_once(bos_tok, bos_vocab) -> None:
    bos = bos_tok.bos_token_id
    ids = bos_vocab.encode_prompt(CHAT)
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids[1:] == _plain(bos_tok, CHATML_TEXT)


def test_prompt_template_writing_its_own_bos_gives_one_bos(tiny_bos_model_dir) -> None:
    tokenizer = _tokenizer(tiny_bos_model_dir)
    tokenizer._tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    ids = Vocabulary.of(tokenizer).encode_prompt(CHAT)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[1:] == _plain(tokenizer, CHATML_TEXT)


def test_prompt_without_template(
    tiny_no_template_model_dir, tiny_bos_no_template_model_dir
) -> None:
    plain = _tokenizer(tiny_no_template_model_dir)
    assert plain.decode(Vocabulary.of(plain).encode_prompt(CHAT)) == PLAIN_TEXT
    assert plain.bos_token_id is None
    bos = _tokenizer(tiny_bos_no_template_model_dir)
    ids = Vocabulary.of(bos).encode_prompt(CHAT, think_prefix=" Hmm")
    assert ids[0] == bos.bos_token_id and ids.count(bos.bos_token_id) == 1
    assert ids[1:] == _plain(bos, PLAIN_TEXT + " Hmm")


def test_vocabulary_of_a_plain_hf_tokenizer(tok) -> None:
    # transformers answers eos_token_ids with one int: the vocabulary must still be built.
    hf = Vocabulary.of(tok._tokenizer)
    assert hf.encode_prompt(CHAT) == _plain(tok, CHATML_TEXT)
    assert hf.encode_answer(" Madrid") == _plain(tok, " Madrid") + [2]
    assert (hf.eos_id, hf.pad_id, hf.eos_ids) == (2, 0, frozenset({2}))
    assert hf.marker == AnswerMarker("<|reserved_0|>", [3], True)


def test_prompt_bad_messages(vocab) -> None:
    with pytest.raises(NrtError, match="at least one message"):
        vocab.encode_prompt([])
    with pytest.raises(NrtError, match="last message is an assistant turn"):
        vocab.encode_prompt(CHAT[:3])
    with pytest.raises(NrtError, match="message 0 must be a dict"):
        vocab.encode_prompt([{"role": "user"}])
    with pytest.raises(NrtError, match="no 'role'"):
        vocab.encode_prompt([{"content": "hi"}])


def test_answer_ends_with_eos_and_has_no_bos(tok, bos_tok, vocab, bos_vocab) -> None:
    for tokenizer, v in ((tok, vocab), (bos_tok, bos_vocab)):
        ids = v.encode_answer("Madrid is the capital.")
        assert ids == _plain(tokenizer, "Madrid is the capital.") + [tokenizer.eos_token_id]
        assert tokenizer.bos_token_id not in ids
    assert vocab.encode_answer("") == [tok.eos_token_id]
    with pytest.raises(NrtError, match="must be a string"):
        vocab.encode_answer(None)


def test_auto_marker_is_an_unused_reserved_token(tok, vocab, tiny_no_template_model_dir) -> None:
    marker = resolve_marker(tok)
    assert marker == AnswerMarker("<|reserved_0|>", [3], True)
    assert vocab.marker == marker
    plain = _tokenizer(tiny_no_template_model_dir)
    assert resolve_marker(plain).ids == [3]
    assert Vocabulary.of(plain, "auto").marker.ids == [3]


def test_auto_marker_skips_tokens_the_template_uses(tiny_model_dir) -> None:
    tokenizer = _tokenizer(tiny_model_dir)
    tokenizer._tokenizer.chat_template = CHATML_TEMPLATE + "{# <|reserved_0|> #}"
    assert resolve_marker(tokenizer).text == "<|reserved_1|>"
    assert Vocabulary.of(tokenizer).marker == AnswerMarker("<|reserved_1|>", [4], True)
    tokenizer._tokenizer.chat_template = CHATML_TEMPLATE + "{# <|reserved_0|><|reserved_1|> #}"
    # Left: <|endoftext|> (pad), <|im_end|> (eos), <|im_start|> (template): a text marker.
    marker = resolve_marker(tokenizer)
    assert marker.text == DEFAULT_TEXT_MARKER and not marker.is_special
    assert marker.ids == _plain(tokenizer, DEFAULT_TEXT_MARKER)
    assert Vocabulary.of(tokenizer).marker == marker


def test_explicit_markers(tok) -> None:
    text = resolve_marker(tok, "\nAnswer:")
    assert text == AnswerMarker("\nAnswer:", _plain(tok, "\nAnswer:"), False)
    assert len(text.ids) > 1
    assert Vocabulary.of(tok, "\nAnswer:").marker == text
    assert resolve_marker(tok, "<|reserved_1|>") == AnswerMarker("<|reserved_1|>", [4], True)
    with pytest.raises(NrtError, match="BOS/EOS/pad/unk"):
        resolve_marker(tok, "<|im_end|>")
    with pytest.raises(NrtError, match="BOS/EOS/pad/unk"):
        Vocabulary.of(tok, "<|im_end|>")
    with pytest.raises(NrtError, match="empty"):
        resolve_marker(tok, "")
