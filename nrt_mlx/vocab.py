"""The model's vocabulary as NRT uses it: prompt and answer encoding, the answer marker, EOS and pad.

``Vocabulary.of(tokenizer, marker)`` is built once per model and passed to every stage (rollout,
rows, eval, the reward inspector), so all of them encode and stop the same way. mlx-lm's
TokenizerWrapper forwards attributes to the Hugging Face tokenizer, so both kinds work.

Prompt and answer are encoded separately (docs/NRT.md, "Sequences"): ``prompt(x)`` is the chat
template with the generation prompt (plus an optional think prefix), ``y* EOS`` is the reference
answer alone followed by the EOS id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nrt_mlx.errors import NrtError

# The marker "auto" falls back to when the vocabulary has no unused special token. It ends in a
# newline so that a separately tokenized answer starts a fresh line, as it would in plain text.
DEFAULT_TEXT_MARKER = "\nAnswer:\n"

# Plain prompt format for tokenizers without a chat template.
_FALLBACK_ROLES = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class AnswerMarker:
    """The answer marker m that ends a trace: its text, its ids, and whether it is one special token."""

    text: str
    ids: list[int]
    is_special: bool  # a single special token already in the vocab


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer with what NRT needs of it, resolved once."""

    tokenizer: Any
    marker: AnswerMarker
    eos_ids: frozenset[int]  # every id that ends a generation (mlx-lm may know several)
    eos_id: int  # the one that ends a reference answer
    pad_id: int  # the pad token, else EOS (padding is never attended to)
    special_ids: frozenset[int]  # the vocabulary's special tokens, the marker excluded

    @classmethod
    def of(cls, tokenizer: Any, marker: str = "auto") -> Vocabulary:
        """The vocabulary of ``tokenizer`` with the recipe's ``rollout.marker`` resolved."""
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise NrtError("the tokenizer has no EOS token; set eos_token in tokenizer_config.json")
        pad = getattr(tokenizer, "pad_token_id", None)
        resolved = resolve_marker(tokenizer, marker)
        return cls(
            tokenizer=tokenizer,
            marker=resolved,
            eos_ids=frozenset(_eos_ids(tokenizer) or [int(eos)]),
            eos_id=int(eos),
            pad_id=int(pad) if pad is not None else int(eos),
            special_ids=frozenset(
                i for i, (_, special) in _added_tokens(tokenizer).items() if special
            )
            - frozenset(resolved.ids),
        )

    def stop_ids(self, at_special: bool) -> frozenset[int]:
        """Ids that end a trace without the marker: EOS, and every special token if asked."""
        return self.eos_ids | self.special_ids if at_special else self.eos_ids

    def encode_prompt(self, messages: Sequence[dict] | str, think_prefix: str = "") -> list[int]:
        """Token ids of prompt(x): the chat template with the generation prompt, then ``think_prefix``.

        Earlier turns and system turns are kept as context. Without a chat template a plain
        ``User: ... Assistant:`` format is used. A plain string is a single user turn. The BOS is
        added exactly once, and only when the tokenizer adds one to plain text (a template that
        writes ``{{ bos_token }}`` itself does not give a second one).
        """
        tok = self.tokenizer
        messages = _check_messages(messages)
        text = _render_template(tok, messages) if _has_chat_template(tok) else _plain(messages)
        ids = _encode(tok, text + think_prefix)
        bos = getattr(tok, "bos_token_id", None)
        if bos is not None:
            while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]
            if _adds_bos(tok) and (not ids or ids[0] != bos):
                ids = [bos] + ids
        if not ids:
            raise NrtError("the prompt encodes to no tokens")
        return ids

    def encode_answer(self, answer: str) -> list[int]:
        """Token ids of ``y* EOS``: the reference answer alone (never a BOS), then the EOS id."""
        if not isinstance(answer, str):
            raise NrtError(f"the reference answer must be a string, got {type(answer).__name__}")
        ids = _encode(self.tokenizer, answer)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids and ids[0] == bos:
            ids = ids[1:]
        return ids + [self.eos_id]

    def encode_text(self, text: str) -> list[int]:
        """Ids of free text (a trace the user wrote), without special tokens."""
        return _encode(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


# ---- prompts ------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens the tokenizer would add (BOS, EOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _has_chat_template(tokenizer: Any) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text (so the model expects one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = list(tokenizer.encode("a"))
    return bool(ids) and ids[0] == bos


def _check_messages(messages: Sequence[dict] | str) -> list[dict]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not messages:
        raise NrtError("a question needs at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise NrtError(f"message {i} must be a dict with a string 'content', got {msg!r}")
        if not isinstance(msg.get("role"), str):
            raise NrtError(f"message {i} has no 'role' (expected system, user or assistant)")
    if messages[-1]["role"] == "assistant":
        raise NrtError(
            "the last message is an assistant turn; pass the reference answer to encode_answer "
            "and only the context (ending with the user's turn) to encode_prompt"
        )
    return list(messages)


def _plain(messages: list[dict]) -> str:
    """A plain ``User: ... Assistant:`` transcript for tokenizers without a chat template."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    parts = ["\n\n".join(system)] if system else []
    for msg in messages:
        if msg["role"] != "system":
            role = _FALLBACK_ROLES.get(msg["role"], msg["role"].capitalize())
            parts.append(f"{role}: {msg['content']}")
    parts.append("Assistant:")
    return "\n\n".join(parts)


def _render_template(tokenizer: Any, messages: list[dict]) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja raises its own errors (e.g. "System role not supported")
        raise NrtError(f"the chat template rejected the messages: {err}") from None
    if not isinstance(text, str):
        raise NrtError("the chat template did not render to text")
    return text


# ---- the answer marker m --------------------------------------------------------------------------


def _added_tokens(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    """id -> (content, is_special) of the tokens added to the vocabulary (specials included)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = {}
    for idx, tok in decoder.items():
        content = getattr(tok, "content", str(tok))
        out[int(idx)] = (content, bool(getattr(tok, "special", True)))
    return out


def _eos_ids(tokenizer: Any) -> set[int]:
    """mlx-lm's ``eos_token_ids`` (a set); a plain Hugging Face tokenizer answers that name with
    one int (transformers maps ``*_ids`` to the token's id)."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids is None:
        return set()
    return {int(ids)} if isinstance(ids, int) else {int(i) for i in ids}


def _reserved_ids(tokenizer: Any) -> set[int]:
    """Ids a marker must never be: bos, eos (all of them), pad and unk."""
    ids = _eos_ids(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return ids


def _template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers keep several named templates
        return "\n".join(str(t) for t in template.values())
    return str(template or "")


def _auto_marker(tokenizer: Any) -> AnswerMarker:
    """An unused special token (names with "reserved" first), else ``DEFAULT_TEXT_MARKER``."""
    skip = _reserved_ids(tokenizer)
    template = _template_text(tokenizer)
    candidates = []
    for idx, (content, special) in _added_tokens(tokenizer).items():
        if idx in skip or not content.strip() or content in template:
            continue
        rank = 0 if "reserved" in content.lower() else (1 if special else 2)
        candidates.append((rank, idx, content))
    for _, idx, content in sorted(candidates):
        # The text must map back to exactly this token, or the sampler could never emit it as text.
        if _encode(tokenizer, content) == [idx]:
            return AnswerMarker(text=content, ids=[idx], is_special=True)
    return text_marker(tokenizer, DEFAULT_TEXT_MARKER)


def text_marker(tokenizer: Any, text: str) -> AnswerMarker:
    """The marker for a given text: one special token if the text is one, else its token ids."""
    if not text:
        raise NrtError(
            "the answer marker is empty; use 'auto' or a short text such as '\\nAnswer:'"
        )
    ids = _encode(tokenizer, text)
    if not ids:
        raise NrtError(f"the answer marker {text!r} encodes to no tokens")
    bad = set(ids) & _reserved_ids(tokenizer)
    if bad:
        raise NrtError(
            f"the answer marker {text!r} contains the tokenizer's BOS/EOS/pad/unk token "
            f"(id {sorted(bad)[0]}); pick another marker"
        )
    special = len(ids) == 1 and ids[0] in _added_tokens(tokenizer)
    return AnswerMarker(text=text, ids=ids, is_special=special)


def resolve_marker(tokenizer: Any, marker: str = "auto") -> AnswerMarker:
    """The answer marker m of the recipe's ``rollout.marker``.

    "auto": a special/added token already in the vocabulary that the chat template does not use and
    that is not bos/eos/pad/unk (names containing "reserved" preferred), else the text
    ``DEFAULT_TEXT_MARKER``. Any other string: that text (a single special token if it is one).
    """
    if marker == "auto":
        return _auto_marker(tokenizer)
    return text_marker(tokenizer, marker)
