"""Question/answer data from JSONL files.

Accepted records (field names configurable in the recipe's ``data`` section):

- ``{"question": ..., "answer": ...}``
- ``{"prompt": ..., "completion": ...}``
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last assistant turn is the reference
  answer; earlier turns (system turns included) are the context.

An optional ``options`` list (multiple choice) is kept for evaluation. Malformed lines and empty
answers are skipped and reported with their line numbers, or are errors with ``data.strict``.
Files are UTF-8 (a leading byte-order mark is accepted); any other byte is an error naming the
line, never a replacement character trained on.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from nrt_mlx.errors import NrtError
from nrt_mlx.recipe import DataConfig


@dataclass
class Example:
    messages: list[dict[str, str]]  # the context: system/user/assistant turns before the answer
    answer: str
    line: int
    options: list[str] | None = None

    @property
    def question(self) -> str:
        """The last user turn, for display."""
        for message in reversed(self.messages):
            if message["role"] == "user":
                return message["content"]
        return self.messages[-1]["content"] if self.messages else ""


@dataclass
class Dataset:
    path: str
    examples: list[Example]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    def __len__(self) -> int:
        return len(self.examples)

    def report(self) -> str:
        """One line saying what was kept and what was skipped (first lines shown)."""
        text = f"{self.path}: {len(self.examples)} examples"
        if self.skipped:
            shown = ", ".join(f"line {n} ({why})" for n, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            text += f", skipped {len(self.skipped)}: {shown}{more}"
        return text


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_record(
    record: object, cfg: DataConfig
) -> tuple[list[dict[str, str]], str, list[str] | None]:
    """Turn one JSON object into (context messages, reference answer, options). Raises ValueError."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    options = record.get("options")
    if options is not None and not (
        isinstance(options, list) and all(isinstance(o, str) for o in options)
    ):
        raise ValueError("'options' must be a list of strings")
    if cfg.messages_field in record:
        messages = record[cfg.messages_field]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"'{cfg.messages_field}' must be a non-empty list")
        for m in messages:
            if (
                not isinstance(m, dict)
                or _text(m.get("role")) is None
                or _text(m.get("content")) is None
            ):
                raise ValueError("each message needs string 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's reference answer")
        context = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        if not any(m["role"] == "user" for m in context):
            raise ValueError("no user turn before the answer")
        answer = messages[-1]["content"]
    else:
        for q_key, a_key in (
            (cfg.question_field, cfg.answer_field),
            (cfg.prompt_field, cfg.completion_field),
        ):
            if q_key in record or a_key in record:
                question, answer = _text(record.get(q_key)), _text(record.get(a_key))
                if question is None or answer is None:
                    raise ValueError(f"needs string fields '{q_key}' and '{a_key}'")
                break
        else:
            raise ValueError(
                f"no '{cfg.question_field}'/'{cfg.answer_field}', '{cfg.prompt_field}'/"
                f"'{cfg.completion_field}' or '{cfg.messages_field}' field"
            )
        if not question.strip():
            raise ValueError("empty question")
        context = [{"role": "user", "content": question}]
    if not answer.strip():
        raise ValueError("empty answer")
    if cfg.system_prompt and context[0]["role"] != "system":
        context = [{"role": "system", "content": cfg.system_prompt}] + context
    return context, answer, options


def load_jsonl(path: str | Path, cfg: DataConfig, key: str = "data.train") -> Dataset:
    """Read a JSONL file of question/answer records; see the module docstring for the formats."""
    if not path:
        raise NrtError(f"{key} is empty: set it to a JSONL file of question/answer records")
    p = Path(path).expanduser()
    if not p.is_file():
        raise NrtError(f"{key}: file not found: {p}")
    examples: list[Example] = []
    skipped: list[tuple[int, str]] = []
    with open(p, "rb") as f:
        for n, line in enumerate(_lines(f), start=1):
            raw = _decode(line, p, n)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                context, answer, options = parse_record(record, cfg)
            except (json.JSONDecodeError, ValueError) as err:
                reason = "invalid JSON" if isinstance(err, json.JSONDecodeError) else str(err)
                if cfg.strict:
                    raise NrtError(f"{p}:{n}: {reason} (data.strict is on)") from None
                skipped.append((n, reason))
                continue
            examples.append(Example(context, answer, n, options))
    if not examples:
        why = (
            f"; first problem: line {skipped[0][0]}: {skipped[0][1]}"
            if skipped
            else " (empty file)"
        )
        raise NrtError(f"{p}: no usable question/answer record{why}")
    return Dataset(str(p), examples, skipped)


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """The lines of a binary file as text mode splits them (at \\n, \\r\\n or \\r), undecoded."""
    for chunk in f:
        body = chunk[:-2] if chunk.endswith(b"\r\n") else chunk.rstrip(b"\n")
        yield from body.split(b"\r")


def _decode(line: bytes, path: Path, n: int) -> str:
    """One line as text: UTF-8 (a byte-order mark on line 1 is dropped), else a one-line error."""
    if n == 1 and line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8) :]
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise NrtError(
            f"{path}:{n}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
            "of the line); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def drop_long(
    data: Dataset,
    prompt_len: Callable[[Example], int],
    answer_len: Callable[[Example], int],
    max_prompt: int,
    max_answer: int,
) -> Dataset:
    """Skip (and count) examples whose prompt or answer is over the token limits."""
    kept = []
    for ex in data.examples:
        if (n := prompt_len(ex)) > max_prompt:
            data.skipped.append(
                (ex.line, f"prompt {n} tokens > data.max_prompt_tokens {max_prompt}")
            )
        elif (n := answer_len(ex)) > max_answer:
            data.skipped.append(
                (ex.line, f"answer {n} tokens > data.max_answer_tokens {max_answer}")
            )
        else:
            kept.append(ex)
    if not kept:
        raise NrtError(
            f"{data.path}: every record is over the length limits ({data.skipped[0][1]})"
        )
    data.examples = kept
    data.skipped.sort()
    return data
