"""Token sequences for NRT: prompts, answer markers, training rows and padded batches.

For question x and reference y* (../shared/NRT.md, "Sequences")::

    training row k:  [prompt(x) | z_k | m | y* EOS]     k = 1..K
    null-think row:  [prompt(x) |       m | y* EOS]     one per question, placed last

Each segment is tokenized on its own and the ids are concatenated, so the answer ids are identical
in every row of a question (a BPE merge across z, m and y* would give each row different answer
tokens and break the per-token comparison with the null-think row). A row that is too long loses
think tokens from the end of z, never answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from nrt_mlx.errors import NrtError

# Segment ids of every token of a row.
PROMPT, THINK, MARKER, ANSWER, PAD = 0, 1, 2, 3, -1

# The marker "auto" falls back to when the vocabulary has no unused special token. It ends in a
# newline so that a separately tokenized answer starts a fresh line, as it would in plain text.
DEFAULT_TEXT_MARKER = "\nAnswer:\n"

# Plain prompt format for tokenizers without a chat template.
_FALLBACK_ROLES = {"user": "User", "assistant": "Assistant"}


# --------------------------------------------------------------------------------------------
# Tokenizer helpers (mlx_lm's TokenizerWrapper forwards attributes to the HF tokenizer, so the
# same calls work on both).
# --------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without any special tokens the tokenizer would add (BOS, EOS)."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def _has_chat_template(tokenizer: Any) -> bool:
    flag = getattr(tokenizer, "has_chat_template", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text by default (so the model expects one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = list(tokenizer.encode("a"))
    return bool(ids) and ids[0] == bos


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise NrtError("the tokenizer has no EOS token; set eos_token in tokenizer_config.json")
    return int(eos)


def eos_ids(tokenizer: Any) -> set[int]:
    """Every id that ends a generation (mlx-lm's wrapper may know several)."""
    return set(getattr(tokenizer, "eos_token_ids", None) or [_eos_id(tokenizer)])


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS (padding is never attended to)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else _eos_id(tokenizer)


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


def _fallback_prompt(messages: list[dict]) -> str:
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


def encode_prompt(
    tokenizer: Any, messages: Sequence[dict] | str, think_prefix: str = ""
) -> list[int]:
    """Token ids of prompt(x): the chat template with the generation prompt, then ``think_prefix``.

    Earlier turns and system turns are kept as context. Without a chat template a plain
    ``User: ... Assistant:`` format is used. A plain string is a single user turn. The BOS is added
    exactly once, and only when the tokenizer adds one to plain text (a template that writes
    ``{{ bos_token }}`` itself does not give a second one).
    """
    messages = _check_messages(messages)
    if _has_chat_template(tokenizer):
        text = _render_template(tokenizer, messages)
    else:
        text = _fallback_prompt(messages)
    ids = _encode(tokenizer, text + think_prefix)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        while len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        if _adds_bos(tokenizer) and (not ids or ids[0] != bos):
            ids = [bos] + ids
    if not ids:
        raise NrtError("the prompt encodes to no tokens")
    return ids


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of ``y* EOS``: the reference answer alone (never a BOS) followed by the EOS id."""
    if not isinstance(answer, str):
        raise NrtError(f"the reference answer must be a string, got {type(answer).__name__}")
    ids = _encode(tokenizer, answer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids and ids[0] == bos:
        ids = ids[1:]
    return ids + [_eos_id(tokenizer)]


# --------------------------------------------------------------------------------------------
# The answer marker m
# --------------------------------------------------------------------------------------------


@dataclass
class AnswerMarker:
    """The answer marker m that ends a trace: its text, its ids, and whether it is one special token."""

    text: str
    ids: list[int]
    is_special: bool  # a single special token already in the vocab


def _added_tokens(tokenizer: Any) -> dict[int, tuple[str, bool]]:
    """id -> (content, is_special) of the tokens added to the vocabulary (specials included)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out = {}
    for idx, tok in decoder.items():
        content = getattr(tok, "content", str(tok))
        out[int(idx)] = (content, bool(getattr(tok, "special", True)))
    return out


def _reserved_ids(tokenizer: Any) -> set[int]:
    """Ids a marker must never be: bos, eos (all of them), pad and unk."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
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


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One sequence of a batch, with a segment id per token."""

    tokens: list[int]
    segments: list[int]  # same length, PROMPT/THINK/MARKER/ANSWER
    question: int  # group id of the question within the batch
    is_null: bool
    emitted_marker: bool  # the sampled trace ended with the marker itself (False for null rows)


def _make_row(
    prompt: list[int],
    think: list[int],
    marker: list[int],
    answer: list[int],
    question: int,
    is_null: bool,
    emitted: bool,
) -> Row:
    parts = ((prompt, PROMPT), (think, THINK), (marker, MARKER), (answer, ANSWER))
    tokens = [int(t) for ids, _ in parts for t in ids]
    segments = [seg for ids, seg in parts for _ in ids]
    return Row(tokens, segments, question, is_null, emitted)


def _check_fixed_parts(
    prompt_ids: list[int], marker_ids: list[int], answer_ids: list[int], max_length: int
) -> int:
    """Room left for think tokens; raises when prompt + marker + answer alone do not fit."""
    if not prompt_ids:
        raise NrtError("the prompt is empty; the first token of a row has nothing to predict it")
    if not answer_ids:
        raise NrtError("the answer is empty; it needs at least the EOS id (use encode_answer)")
    fixed = len(prompt_ids) + len(marker_ids) + len(answer_ids)
    if fixed > max_length:
        raise NrtError(
            f"prompt ({len(prompt_ids)} tokens) + marker ({len(marker_ids)}) + answer "
            f"({len(answer_ids)}) = {fixed} tokens exceed max_length={max_length}; raise the "
            f"length limit or shorten the question/answer (think tokens are cut, answers never)"
        )
    return max_length - fixed


def build_rows(
    prompt_ids: Sequence[int],
    traces: list[list[int]],
    marker: AnswerMarker,
    answer_ids: Sequence[int],
    question: int,
    emitted_marker: list[bool],
    max_length: int,
) -> list[Row]:
    """K training rows ``[prompt | z_k | m | y* EOS]`` then ONE null-think row ``[prompt | m | y* EOS]``.

    ``traces`` hold think ids WITHOUT the marker; ``answer_ids`` already end with EOS
    (``encode_answer``). A row longer than ``max_length`` keeps only the first think tokens that
    fit; its marker then no longer follows what was sampled, so the row counts as
    ``emitted_marker=False`` (like a trace cut by the think limit) and gets the format term.
    """
    prompt, answer, m = list(prompt_ids), list(answer_ids), list(marker.ids)
    if not m:
        raise NrtError("the answer marker has no token ids")
    if len(emitted_marker) != len(traces):
        raise NrtError(f"emitted_marker has {len(emitted_marker)} flags for {len(traces)} traces")
    room = _check_fixed_parts(prompt, m, answer, max_length)
    rows = []
    for k, trace in enumerate(traces):
        think = list(trace)
        emitted = bool(emitted_marker[k])
        if len(think) > room:
            think, emitted = think[:room], False
        rows.append(_make_row(prompt, think, m, answer, question, False, emitted))
    rows.append(_make_row(prompt, [], m, answer, question, True, False))
    return rows


def sft_rows(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], question: int, max_length: int
) -> list[Row]:
    """One row ``[prompt | y* EOS]`` for plain supervised fine-tuning (answer tokens are the targets)."""
    prompt, answer = list(prompt_ids), list(answer_ids)
    _check_fixed_parts(prompt, [], answer, max_length)
    return [_make_row(prompt, [], [], answer, question, False, False)]


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Right-padded rows as MLX arrays. B rows, L tokens, T answer tokens (the longest answer)."""

    tokens: mx.array  # [B, L] int32, right-padded with pad id
    segments: mx.array  # [B, L] int32, PAD (-1) on padding
    answer_positions: (
        mx.array
    )  # [B, T] int32: index in `tokens` of the i-th answer token (0 where padded)
    answer_mask: mx.array  # [B, T] float32, 1 for real answer tokens (EOS included)
    question: mx.array  # [B] int32 group ids
    is_null: mx.array  # [B] bool
    emitted_marker: mx.array  # [B] bool
    null_row: mx.array  # [B] int32: index of the null-think row of the same question (-1: none)
    lengths: mx.array  # [B] int32
    # [B, L] log p_old(tokens[:, j]) under the weights that sampled the batch, for the clipped
    # importance ratio when one rollout batch gets several updates (loss.score_batch gives them).
    old_logprobs: mx.array | None = None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])


def _null_rows(rows: list[Row]) -> np.ndarray:
    null_of: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row.is_null:
            if row.question in null_of:
                raise NrtError(f"question {row.question} has two null-think rows in the batch")
            null_of[row.question] = i
    return np.array([null_of.get(row.question, -1) for row in rows], dtype=np.int32)


def _check_answers_agree(rows: list[Row]) -> None:
    """Every row of a question must carry the same answer ids (the null baseline compares per token)."""
    seen: dict[int, list[int]] = {}
    for row in rows:
        answer = [t for t, s in zip(row.tokens, row.segments) if s == ANSWER]
        if seen.setdefault(row.question, answer) != answer:
            raise NrtError(f"rows of question {row.question} carry different answer ids")


def collate(rows: list[Row], pad_id: int, length: int | None = None) -> Batch:
    """Right-pad rows into a Batch. ``length`` pads to at least that many tokens (fixed shapes)."""
    if not rows:
        raise NrtError("cannot collate an empty list of rows")
    for i, row in enumerate(rows):
        if len(row.tokens) != len(row.segments) or not row.tokens:
            raise NrtError(
                f"row {i} has {len(row.tokens)} tokens and {len(row.segments)} segment ids"
            )
    _check_answers_agree(rows)
    big_l = max(max(len(r.tokens) for r in rows), length or 0)
    answers = [[j for j, s in enumerate(r.segments) if s == ANSWER] for r in rows]
    big_t = max(1, max(len(a) for a in answers))
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
        null_row=mx.array(_null_rows(rows)),
        lengths=mx.array(np.array([len(r.tokens) for r in rows], dtype=np.int32)),
    )
